"""Locks interoperate with QEMU's (vdisk/host.py, HostFile): vdisk and qemu-img / qemu-io /
qemu-storage-daemon refuse each other as they refuse themselves.

vdisk holding the image: a vdisk writer makes ``qemu-img info`` (without -U; of a qcow2
image -- QEMU reads raw files, as which it sees vdk, sharing writes) and ``qemu-io -c
write`` fail with QEMU's lock error, ``qemu-img info -U`` still works; a
vdisk reader lets ``qemu-img info`` in and keeps ``qemu-io`` writes out; a force-share
reader and a snapshot reader keep nobody out.

QEMU holding the image: while qemu-storage-daemon serves it read-write (an NBD export on
a unix socket in the test's directory), vdisk's writer and live reader opens fail with
ImageLocked and `vdisk snapshot create`, `resize` and `mount` fail with one line; a
read-only qemu-storage-daemon lets vdisk readers in and keeps writers out.

Every daemon a test starts is stopped in a fixture finalizer, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

import vdisk
from vdisk.errors import ImageLocked
from vdisk.host import HostFile

QEMU_TIMEOUT = 60
QEMU_LOCK_ERROR = "Failed to get shared \"write\" lock"


@pytest.fixture(autouse=True)
def _need_qemu():
    missing = [t for t in ("qemu-img", "qemu-io", "qemu-storage-daemon") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh", pytrace=False)


def qemu(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=QEMU_TIMEOUT)


def make_image(tmp_path, fmt: str) -> str:
    path = str(tmp_path / f"disk.{fmt}")
    vdisk.create(path, 4 << 20, format=fmt)
    with vdisk.open(path, format=fmt) as img:
        img.write(0, b"A" * 65536)
        if fmt != "raw":
            img.snapshot_create("s1")
        img.write(0, b"B" * 65536)
    return path


def qemu_fmt(fmt: str) -> list[str]:
    # vdk is not a QEMU format: qemu-img sees it as raw, and the locks are the file's anyway
    return ["-f", "qcow2" if fmt == "qcow2" else "raw"]


# ------------------------------------------------------------------ vdisk holds the image
@pytest.mark.parametrize("fmt", ["qcow2", "vdk", "raw"])
def test_vdisk_writer_keeps_qemu_out(tmp_path, fmt):
    path = make_image(tmp_path, fmt)
    with vdisk.open(path, format=fmt) as w:
        w.write(4096, b"w" * 4096)
        r = qemu("qemu-img", "info", *qemu_fmt(fmt), path)
        if fmt == "qcow2":
            assert r.returncode == 1, r.stdout
            assert QEMU_LOCK_ERROR in r.stderr, r.stderr
        else:
            # QEMU's raw driver reads with "write" shared (its own raw writers let it in too)
            assert r.returncode == 0, r.stderr
        r = qemu("qemu-io", *qemu_fmt(fmt), "-c", "write 0 4k", path)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, (r.stdout, r.stderr)
        r = qemu("qemu-img", "info", "-U", *qemu_fmt(fmt), path)
        assert r.returncode == 0, r.stderr
        assert "virtual size: " in r.stdout
        w.flush()
    # nothing was written behind vdisk's back: the image is clean and holds vdisk's data
    with vdisk.open(path, format=fmt, read_only=True) as img:
        assert img.read(0, 4096) == b"B" * 4096 and img.read(4096, 4096) == b"w" * 4096
        if fmt != "raw":
            res = img.check()
            assert not res.corruptions and not res.leaks, (res.corruptions, res.leaks)
    # released on close: qemu-io writes now
    r = qemu("qemu-io", *qemu_fmt(fmt), "-c", "write 0 4k", path)
    assert r.returncode == 0, r.stderr


def test_vdisk_writer_in_another_process_keeps_qemu_out(tmp_path):
    path = make_image(tmp_path, "qcow2")
    code = ("import sys, vdisk; img = vdisk.open(sys.argv[1]); img.write(0, b'x' * 4096); "
            "print('ready', flush=True); sys.stdin.read(); img.close()")
    p = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        r = qemu("qemu-img", "info", path)
        assert r.returncode == 1 and QEMU_LOCK_ERROR in r.stderr, r.stderr
        r = qemu("qemu-img", "snapshot", "-c", "s2", path)
        assert r.returncode != 0 and "lock" in r.stderr, r.stderr
        p.communicate("", timeout=30)
        assert p.returncode == 0, p.stderr
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert qemu("qemu-img", "snapshot", "-c", "s2", path).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "vdk"])
def test_vdisk_reader_keeps_qemu_writers_out(tmp_path, fmt):
    path = make_image(tmp_path, fmt)
    with vdisk.open(path, format=fmt, read_only=True) as r:
        assert r.read(0, 4) == b"BBBB"
        got = qemu("qemu-io", *qemu_fmt(fmt), "-c", "write 0 4k", path)
        assert got.returncode != 0 and 'Failed to get "write" lock' in got.stderr, got.stderr
        got = qemu("qemu-img", "info", *qemu_fmt(fmt), path)  # readers share
        assert got.returncode == 0, got.stderr
        got = qemu("qemu-io", "-r", *qemu_fmt(fmt), "-c", "read 0 4k", path)
        assert got.returncode == 0, got.stderr


def test_force_share_and_snapshot_readers_keep_nobody_out(tmp_path):
    path = make_image(tmp_path, "qcow2")
    shared = HostFile(path, read_only=True, lock="shared")
    try:
        with vdisk.open(path, snapshot="s1") as snap:
            assert snap.read(0, 4) == b"AAAA"
            got = qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x43 65536 4k", path)
            assert got.returncode == 0, got.stderr
            assert snap.read(0, 65536) == b"A" * 65536
            with vdisk.open(path) as w:  # and vdisk's own writer too
                w.write(0, b"D")
    finally:
        shared.close()


def test_qemu_reader_keeps_vdisk_writer_out(tmp_path):
    """qemu-io -r (no -U) as a long-running reader: vdisk's writer is refused, its reader is not."""
    path = make_image(tmp_path, "qcow2")
    p = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        _wait_for_lock(path, 201, p)
        with pytest.raises(ImageLocked, match="does not share \"write\""):
            vdisk.open(path)
        with vdisk.open(path, read_only=True) as r:
            assert r.read(0, 4) == b"BBBB"
    finally:
        _stop(p)
    with vdisk.open(path) as w:
        w.write(0, b"x")


def _wait_for_lock(path: str, byte: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until some process holds an OFD lock on ``byte`` of ``path`` (from /proc/locks)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited ({proc.returncode}): {proc.stderr.read()!r}")
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "OFDLCK" in parts and dev in parts and int(parts[-2]) <= byte <= int(parts[-1]):
                    return
        time.sleep(0.02)
    raise AssertionError(f"{proc.args[0]} did not lock byte {byte} of {path} within {timeout} s")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None:
            f.close()


# ------------------------------------------------------------------ QEMU holds the image
@pytest.fixture
def storage_daemon(tmp_path):
    """Start qemu-storage-daemon serving an image over NBD on a unix socket in the test's
    directory; stopped (and waited for) at teardown whatever the test did."""
    procs = []

    def start(path: str, *, read_only: bool = False) -> subprocess.Popen:
        sock = str(tmp_path / f"nbd{len(procs)}.sock")
        ro = "on" if read_only else "off"
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,filename={path},node-name=f,read-only={ro}",
               "--blockdev", f"driver=qcow2,file=f,node-name=q,read-only={ro}",
               "--nbd-server", f"addr.type=unix,addr.path={sock}",
               "--export", f"type=nbd,id=e,node-name=q,writable={'off' if read_only else 'on'}"]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(p)
        # options are processed in order: once the NBD socket is there, the image is open
        deadline = time.monotonic() + QEMU_TIMEOUT
        while not os.path.exists(sock):
            if p.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited ({p.returncode}): {p.stderr.read()!r}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-storage-daemon did not start")
            time.sleep(0.02)
        _wait_for_lock(path, 100, p)
        return p

    yield start
    for p in procs:
        _stop(p)


def test_storage_daemon_keeps_vdisk_out(tmp_path, storage_daemon, run_vdisk, mountpoint):
    path = make_image(tmp_path, "qcow2")
    storage_daemon(path)
    with pytest.raises(ImageLocked) as e:
        vdisk.open(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: image is in use by another process") and "\n" not in msg, msg
    assert "write" in msg
    with pytest.raises(ImageLocked, match=r"being written") as e:
        vdisk.open(path, read_only=True)
    assert e.value.option_hint[0] == "force_share"  # the CLI adds "-U/--force-share" where a command has it
    # a force-share reader and a snapshot reader still read (they share everything)
    with vdisk.open(path, read_only=True, force_share=True) as r:
        assert r.read(0, 4) == b"BBBB"
    with vdisk.open(path, snapshot="s1") as s:
        assert s.read(0, 4) == b"AAAA"
    for args in (("snapshot", "create", path, "s2"), ("resize", path, "8M"), ("mount", path, mountpoint)):
        r = run_vdisk(*args, expect=1, env={"VDISK_RUN_DIR": str(tmp_path / "run")})
        err = r.stderr.strip()
        assert err.startswith("vdisk: ") and "image is in use by another process" in err, (args, r.stderr)
        assert len(err.splitlines()) == 1, (args, r.stderr)
    # the image is untouched by the refused commands
    r = qemu("qemu-img", "info", "-U", "--output", "json", path)
    assert '"virtual-size": 4194304' in r.stdout, r.stdout
    assert "s2" not in r.stdout


def test_read_only_storage_daemon_lets_vdisk_readers_in(tmp_path, storage_daemon):
    path = make_image(tmp_path, "qcow2")
    storage_daemon(path, read_only=True)
    with pytest.raises(ImageLocked, match="does not share \"write\""):
        vdisk.open(path)
    with vdisk.open(path, read_only=True) as r:
        assert r.read(0, 4) == b"BBBB"


def test_locks_released_when_the_daemon_is_killed(tmp_path, storage_daemon):
    path = make_image(tmp_path, "qcow2")
    p = storage_daemon(path)
    with pytest.raises(ImageLocked):
        vdisk.open(path)
    p.kill()
    p.wait(timeout=30)
    with vdisk.open(path) as w:
        w.write(0, b"after")


@pytest.mark.fuse
def test_vdisk_mount_keeps_qemu_out(tmp_path, monkeypatch):
    """The reported case: while `vdisk mount` serves a qcow2 read-write, qemu-img info and
    qemu-io writes used to work (and leak clusters)."""
    from vdisk.export.fuse.testing import Rig

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    path = make_image(tmp_path, "qcow2")
    rig = Rig(str(tmp_path))
    try:
        mnt = str(tmp_path / "mnt")
        rig.mount(path, mnt)
        r = qemu("qemu-img", "info", path)
        assert r.returncode == 1 and QEMU_LOCK_ERROR in r.stderr, (r.stdout, r.stderr)
        r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", path)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, (r.stdout, r.stderr)
        assert qemu("qemu-img", "info", "-U", path).returncode == 0
        with open(os.path.join(mnt, "disk"), "r+b") as f:
            f.write(b"M" * 4096)
            f.flush()
            os.fsync(f.fileno())
        rig.umount(mnt)
    finally:
        rig.cleanup()
    r = qemu("qemu-img", "check", path)
    assert r.returncode == 0, r.stdout + r.stderr  # no leaks: nobody wrote behind the mount's back
    with vdisk.open(path, read_only=True) as img:
        assert img.read(0, 4096) == b"M" * 4096
