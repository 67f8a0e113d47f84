"""The run directory and log files of mount daemons (vdisk/export/fuse/daemon.py, __main__.py).

The run directory (control sockets, default logs) is created mode 0700, and one that is
a symlink, is not owned by the current uid or is writable by group or others is refused
with one line naming it, by ``vdisk mount`` and by the daemon before it binds its
socket.  Log files are opened with O_NOFOLLOW and O_CLOEXEC: a symlinked log is refused
and its target left untouched.  Nothing here mounts: every refusal comes first.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

import vdisk
from vdisk.export.fuse.daemon import MountError, open_log, secure_run_dir, spawn

OTHER_UID = 54321


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "disk.vdk")
    vdisk.create(path, 1 << 20, format="vdk")
    return path


def _use(monkeypatch, d) -> str:
    monkeypatch.setenv("VDISK_RUN_DIR", str(d))
    return str(d)


def test_created_private(tmp_path, monkeypatch):
    d = _use(monkeypatch, tmp_path / "run" / "vdisk")
    old = os.umask(0)
    try:
        assert secure_run_dir() == d
    finally:
        os.umask(old)
    st = os.lstat(d)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert secure_run_dir() == d  # and accepted once it exists


@pytest.mark.root
def test_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    d = _use(monkeypatch, tmp_path / "vdisk-0")
    os.mkdir(d, 0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(MountError) as e:
        secure_run_dir()
    msg = str(e.value)
    assert msg.startswith(f"{d}: refusing to use this run directory") and f"owned by uid {OTHER_UID}" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_writable_by_others_is_refused(tmp_path, monkeypatch, mode):
    d = _use(monkeypatch, tmp_path / "vdisk-0")
    os.mkdir(d)
    os.chmod(d, mode)
    with pytest.raises(MountError, match=rf"^{d}: refusing .* writable by group or others \(mode {mode:04o}\)"):
        secure_run_dir()


def test_symlink_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    d = _use(monkeypatch, tmp_path / "vdisk-0")
    os.symlink(real, d)
    with pytest.raises(MountError, match="is a symbolic link"):
        secure_run_dir()


def test_open_log_refuses_a_symlink_and_sets_cloexec(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    link = tmp_path / "disk.mount.log"
    os.symlink(target, link)
    with pytest.raises(MountError, match=r"log file is a symbolic link; refusing to follow it"):
        open_log(str(link))
    assert target.read_bytes() == b"precious\n"
    os.symlink(tmp_path / "missing", tmp_path / "dangling.log")
    with pytest.raises(MountError, match="symbolic link"):
        open_log(str(tmp_path / "dangling.log"))
    assert not (tmp_path / "missing").exists(), "a dangling symlink must not create its target"
    fd = open_log(str(tmp_path / "ok.log"))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(fd).st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


def test_spawn_refuses_a_bad_run_dir_before_starting(tmp_path, monkeypatch, image, mountpoint):
    d = _use(monkeypatch, tmp_path / "vdisk-0")
    os.mkdir(d)
    os.chmod(d, 0o777)
    with pytest.raises(MountError, match="writable by group or others"):
        spawn(image, str(mountpoint), timeout=30)
    assert os.listdir(d) == [], "nothing may be created in a refused run directory"


def test_spawn_refuses_a_symlinked_log(tmp_path, monkeypatch, image, mountpoint):
    _use(monkeypatch, tmp_path / "run")
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    link = tmp_path / "mount.log"
    os.symlink(target, link)
    with pytest.raises(MountError, match="symbolic link"):
        spawn(image, str(mountpoint), log_file=str(link), timeout=30)
    assert target.read_bytes() == b"precious\n"


def test_vdisk_mount_says_why_in_one_line(tmp_path, run_vdisk, image, mountpoint):
    d = tmp_path / "vdisk-0"
    d.mkdir()
    os.chmod(d, 0o777)
    r = run_vdisk("mount", image, mountpoint, expect=1, env={"VDISK_RUN_DIR": str(d)})
    err = r.stderr.strip()
    assert err == (f"vdisk: {d}: refusing to use this run directory: it is writable by group or others (mode 0777); "
                   "another user may have made it (remove it, or set VDISK_RUN_DIR to a private directory)"), r.stderr


def _daemon(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdisk.export.fuse", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_daemon_refuses_a_symlinked_log(tmp_path, image, mountpoint):
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    link = tmp_path / "mount.log"
    os.symlink(target, link)
    r = _daemon(["--log-file", str(link), image, str(mountpoint)], {"VDISK_RUN_DIR": str(tmp_path / "run")})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"vdisk: {link}: the log file is a symbolic link; refusing to follow it", r.stderr
    assert target.read_bytes() == b"precious\n"


@pytest.mark.root
def test_daemon_refuses_a_foreign_run_dir_before_binding(tmp_path, image, mountpoint):
    d = tmp_path / "vdisk-0"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    log = tmp_path / "mount.log"
    r = _daemon(["--log-file", str(log), image, str(mountpoint)], {"VDISK_RUN_DIR": str(d)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"{d}: refusing to use this run directory: it is owned by uid {OTHER_UID}" in log.read_text()
    assert os.listdir(d) == [], "no control socket in a foreign run directory"
    with vdisk.open(image) as img:  # and the daemon let go of the image
        img.write(0, b"ok")


def test_clients_never_talk_to_a_socket_in_a_run_directory_others_control(tmp_path, monkeypatch):
    """A planted socket in a directory another user could write would answer vdisk's
    control requests (snapshot-hold, flush...): the client refuses to connect."""
    import vdisk
    from vdisk.export.fuse import control
    from vdisk.errors import VdiskError

    d = tmp_path / "run"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    monkeypatch.setenv("VDISK_RUN_DIR", str(d))
    img = str(tmp_path / "x.vdk")
    vdisk.create(img, 1 << 20)
    with pytest.raises(VdiskError, match="writable by group or others"):
        control.request(img, {"op": "ping"})
    os.chmod(d, 0o700)
    assert control.request(img, {"op": "ping"}) is None  # ours: no mount owns the image
