"""The command server (``vdisk command-server``, :mod:`vdisk.cmdserver`): a command run
through it behaves as in-process (stdout, stderr, exit code, cwd, environment, umask),
stale code and anything unusual fall back to in-process, peers of another uid are
refused, and a worker that dies makes the client exit 70.

Every test starts its own server in a private VDISK_RUN_DIR and stops it (killing it
if need be) even when the test fails.  ``VDISK_NO_COMMAND_SERVER=1`` gives the
in-process reference in the same environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import vdisk_command

from vdisk.cmdserver import client

SRC = Path(client.__file__)


class Server:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.env = {k: v for k, v in os.environ.items() if k != "VDISK_NO_COMMAND_SERVER"}
        self.env["VDISK_RUN_DIR"] = str(run_dir)
        self.pid: int | None = None

    @property
    def log(self) -> str:
        try:
            return (self.run_dir / "cmdserver.log").read_text()
        except FileNotFoundError:
            return ""

    def served(self) -> int:
        """How many commands workers have run (one log line each), plus how many times
        the server restarted on changed sources: another engineer editing vdisk/ while
        the tests run makes a command fall back to in-process, rightly (see
        assert_served)."""
        return len(re.findall(r"worker \d+ runs", self.log))

    def restarts(self) -> int:
        return self.log.count("changed: restarting")

    def assert_served(self, before: tuple[int, int], n: int) -> None:
        """``n`` commands since ``before`` (served(), restarts()) ran on the server,
        unless the server restarted meanwhile because vdisk's sources changed."""
        if self.restarts() == before[1]:
            assert self.served() == before[0] + n, f"not served by the server: {self.log}"

    def mark(self) -> tuple[int, int]:
        return self.served(), self.restarts()

    def vdisk(self, *args, in_process=False, env=None, umask=None, cwd=None, timeout=60,
              **kw) -> subprocess.CompletedProcess:
        e = dict(self.env, **(env or {}))
        if in_process:
            e["VDISK_NO_COMMAND_SERVER"] = "1"
        pre = (lambda: os.umask(umask)) if umask is not None else None
        return subprocess.run(vdisk_command() + [str(a) for a in args], check=False, env=e, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=pre, **kw)

    def both(self, *args, **kw) -> subprocess.CompletedProcess:
        """Run through the server and in-process; assert the same result; return it."""
        before = self.mark()
        r = self.vdisk(*args, **kw)
        self.assert_served(before, 1)
        ref = self.vdisk(*args, in_process=True, **kw)
        assert (r.returncode, r.stdout, r.stderr) == (ref.returncode, ref.stdout, ref.stderr)
        return r

    def start(self, *extra) -> None:
        r = self.vdisk("command-server", "start", *extra)
        assert r.returncode == 0, r.stderr
        m = re.search(r"pid (\d+)", r.stdout)
        assert m, r.stdout
        self.pid = int(m.group(1))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.vdisk("command-server", "stop", timeout=30)
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "run")
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def image(tmp_path, server):
    img = tmp_path / "a.vdk"
    r = server.vdisk("create", "-q", img, "64M", in_process=True)
    assert r.returncode == 0, r.stderr
    return img


# ---------------------------------------------------------------------------- the client itself
def test_client_imports_almost_nothing():
    code = ("import sys; before = set(sys.modules); import vdisk.cmdserver.client; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert loaded <= {"vdisk", "vdisk.errors", "__future__", "vdisk.cmdserver", "vdisk.cmdserver.client",
                      "_socket", "vdisk.unixaddr"}, loaded  # unixaddr imports only posix and sys


@pytest.mark.parametrize("env", [{}, {"VDISK_RUN_DIR": "/x/y"}, {"XDG_RUNTIME_DIR": "/run/user/5"}])
def test_run_dir_is_controls(monkeypatch, env):
    from vdisk.export.fuse import control

    for k in ("VDISK_RUN_DIR", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert client.run_dir() == control.run_dir()


def test_run_dir_checks_are_controls(tmp_path):
    from vdisk.export.fuse import control

    ok = tmp_path / "ok"
    ok.mkdir(mode=0o700)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(ok)
    for d in (ok, loose, link, tmp_path / "missing"):
        assert client.run_dir_ok(str(d)) == (control.run_dir_problem(str(d)) is None), d


def test_routing():
    assert client.routed(["info", "x"]) and client.routed(["pool", "ls", "p"]) and client.routed(["--help"])
    for argv in (["mount", "x", "m"], ["umount", "m"], ["serve", "x"], ["fleet", "run"], ["bench", "x"],
                 ["command-server", "stop"], ["pool", "replicate", "a", "b"], ["pool", "promote", "b"]):
        assert not client.routed(argv), argv


def test_no_server_runs_in_process(tmp_path):
    s = Server(tmp_path / "run")  # never started
    img = tmp_path / "a.vdk"
    r = s.vdisk("create", "-q", img, "1M")
    assert r.returncode == 0 and img.exists(), r.stderr
    assert s.vdisk("info", img).stdout == s.vdisk("info", img, in_process=True).stdout
    # a stale socket file (the server died): connection refused, in-process
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    import socket

    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(tmp_path / "run" / client.SOCKET_NAME))
    r = s.vdisk("info", img)
    assert r.returncode == 0 and "virtual size: 1 MiB" in r.stdout, r.stderr


# ---------------------------------------------------------------------------- same as in-process
def test_info_same_as_in_process(server, image):
    r = server.both("info", image)
    assert r.returncode == 0 and "virtual size: 64 MiB" in r.stdout
    server.both("info", "--output", "json", image)


def test_failing_command_one_line_error(server, tmp_path):
    r = server.both("info", tmp_path / "missing.vdk")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("vdisk: "), r.stderr
    r = server.both("resize", tmp_path / "missing.vdk")  # a usage error
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr


def test_clone_and_snapshot(server, image, tmp_path):
    before = server.mark()
    r = server.vdisk("snapshot", "create", image, "base")
    assert r.returncode == 0, r.stderr
    r = server.vdisk("clone", f"{image}@base", tmp_path / "c.vdk")
    assert r.returncode == 0, r.stderr
    server.assert_served(before, 2)
    ref = server.vdisk("clone", f"{image}@base", tmp_path / "d.vdk", in_process=True)
    assert (r.stdout, r.stderr) == (ref.stdout.replace("d.vdk", "c.vdk"), ref.stderr)
    a = server.vdisk("info", "--output", "json", tmp_path / "c.vdk", in_process=True)
    assert a.returncode == 0 and "backing" in a.stdout
    assert server.vdisk("check", tmp_path / "c.vdk", in_process=True).returncode == 0


def test_cwd_relative_paths(server, image, tmp_path):
    server.both("info", "a.vdk", cwd=tmp_path)
    r = server.vdisk("create", "-q", "rel.vdk", "1M", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "rel.vdk").exists(), r.stderr


def test_environment_is_the_clients(server, image, tmp_path):
    r = server.both("info", image, env={"VDISK_METADATA_BUDGET": "bogus"})
    assert r.returncode == 1 and "VDISK_METADATA_BUDGET" in r.stderr, r.stderr
    # and a variable the server has but the client does not is not the command's either
    server.stop()
    server.env["VDISK_METADATA_BUDGET"] = "bogus"
    server.start()
    env = {k: v for k, v in server.env.items() if k != "VDISK_METADATA_BUDGET"}
    before = server.mark()
    r = server.vdisk("info", image)  # with it: an error
    assert r.returncode == 1
    r = subprocess.run(vdisk_command() + ["info", str(image)], check=False, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    server.assert_served(before, 2)
    server.env = env
    # VDISK_BACKING_DIRS: a backing file outside the overlay's directory
    (tmp_path / "b").mkdir()
    r = server.both("create", "-q", "-b", image, "-F", "vdk", tmp_path / "b" / "ov.vdk")
    assert r.returncode == 1 and "VDISK_BACKING_DIRS" in r.stderr, r.stderr
    r = server.vdisk("create", "-q", "-b", image, "-F", "vdk", tmp_path / "b" / "ov.vdk",
                     env={"VDISK_BACKING_DIRS": str(tmp_path)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_umask_honoured(server, tmp_path, mask):
    r = server.vdisk("create", "-q", tmp_path / "s.vdk", "1M", umask=mask)
    assert r.returncode == 0, r.stderr
    r = server.vdisk("create", "-q", tmp_path / "p.vdk", "1M", umask=mask, in_process=True)
    assert r.returncode == 0, r.stderr
    mode = (tmp_path / "s.vdk").stat().st_mode & 0o777
    assert mode == (tmp_path / "p.vdk").stat().st_mode & 0o777
    assert not mode & mask


def test_stdin_and_terminal_less_streams(server, image):
    # fds 0, 1, 2 are the client's: output to a file works, as does a closed stdin
    with open(image.parent / "out.txt", "w") as out:
        r = subprocess.run(vdisk_command() + ["info", str(image)], check=False, env=server.env, stdout=out,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "virtual size: 64 MiB" in (image.parent / "out.txt").read_text()


# ---------------------------------------------------------------------------- fallbacks and refusals
def test_stale_code_falls_back_and_restarts(server, image):
    st = SRC.stat()
    try:
        os.utime(SRC, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        before = server.served()
        r = server.vdisk("info", image)
        assert r.returncode == 0 and "virtual size: 64 MiB" in r.stdout, r.stderr
        assert server.served() == before  # answered "stale": ran in-process
        deadline = time.monotonic() + 60
        while "restarting" not in server.log or "listening" not in server.log.rpartition("restarting")[2]:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
        while not (server.run_dir / client.SOCKET_NAME).exists():
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
        r = server.both("info", image)  # the new code is served
    finally:
        os.utime(SRC, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_excluded_commands_run_in_process(server, image):
    before = server.mark()
    r = server.vdisk("command-server", "status")
    assert r.returncode == 0 and f"pid {server.pid}" in r.stdout
    r = server.vdisk("bench", "--help")
    assert r.returncode == 0
    r = server.vdisk("pool", "promote", "--help")
    assert r.returncode == 0
    assert server.served() == before[0]


def test_protocol_mismatch_is_refused(server):
    s = client.connect(str(server.run_dir / client.SOCKET_NAME))
    assert s is not None
    with contextlib.closing(s):
        payload = b"\0".join([client.MAGIC, b"999", b"run", b"/", b"22", b"0"])
        client.send(s, len(payload).to_bytes(4, "big") + payload, (0, 1, 2))
        assert client._Lines(s).next() == b"proto"


def test_peer_of_another_uid_is_refused():
    if os.geteuid() != 0:
        pytest.skip("needs root: the test connects as uid 65534 (nobody) with os.setuid in a forked child")
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="vdisk-cmdserver-")  # pytest's tmp_path is not reachable by nobody
    server = Server(Path(top) / "run")
    try:
        server.start()
        os.chmod(top, 0o711)
        _peer_of_another_uid_is_refused(server)
    finally:
        server.stop()
        shutil.rmtree(top, ignore_errors=True)


def _peer_of_another_uid_is_refused(server):
    sock = server.run_dir / client.SOCKET_NAME
    server.run_dir.chmod(0o711)  # so nobody may reach the socket, were its mode wrong

    def as_nobody() -> str:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                import socket

                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(str(sock))
                except PermissionError:
                    os.write(w, b"EACCES")
                    os._exit(0)
                payload = b"\0".join([client.MAGIC, client.PROTOCOL, b"run", b"/", b"22", b"1", b"info"])
                try:  # the server answers before it reads: it may have closed already (EPIPE)
                    s.sendall(len(payload).to_bytes(4, "big") + payload)
                except OSError:
                    pass
                os.write(w, s.recv(4096) or b"EOF")
            except BaseException as e:  # say what went wrong instead of an empty answer
                os.write(w, repr(e).encode())
            finally:
                os._exit(0)
        os.close(w)
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return out.decode()

    assert as_nobody() == "EACCES"  # the socket is 0600
    sock.chmod(0o666)  # as if its mode were wrong: the server still checks SO_PEERCRED
    assert as_nobody().startswith("refused uid 65534")
    assert "refused a peer of uid 65534" in server.log


def test_killed_worker_exits_70(server, image, tmp_path):
    # a command that waits on stdin: `convert` from a fifo it reads only when written
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = dict(server.env)
    p = subprocess.Popen(vdisk_command() + ["info", "-f", "raw", str(fifo)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (m := re.findall(r"worker (\d+) runs info", server.log)):
            assert time.monotonic() < deadline, server.log
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(int(m[-1]), signal.SIGKILL)
        out, err = p.communicate(timeout=30)
    finally:
        with contextlib.suppress(OSError):
            p.kill()
        with contextlib.suppress(OSError):  # let nothing hang on the fifo
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert p.returncode == 70, (out, err)
    assert len(err.splitlines()) == 1 and "worker" in err and "died" in err, err


def test_sigint_is_forwarded(server, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = subprocess.Popen(vdisk_command() + ["info", "-f", "raw", str(fifo)], env=server.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "runs info" not in server.log:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.02)
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        with contextlib.suppress(OSError):
            p.kill()
    assert p.returncode == 130, (out, err)
    assert err.strip() == "vdisk: interrupted", err


def test_status_and_stop(server):
    r = server.vdisk("command-server", "status")
    assert r.returncode == 0 and "command server running" in r.stdout
    r = server.vdisk("command-server", "start")  # one per run directory
    assert r.returncode == 0 and "already running" in r.stdout
    r = server.vdisk("command-server", "stop")
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert not (server.run_dir / client.SOCKET_NAME).exists()
    r = server.vdisk("command-server", "status")
    assert r.returncode == 1 and r.stderr.startswith("vdisk: no command server running"), r.stderr
    # idle workers went with the master: no process is left with this run directory
    mine = str(server.run_dir).encode()
    left = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if p.name.isdigit() and b"daemon_main" in (p / "cmdline").read_bytes() and mine in (p / "environ").read_bytes():
                left.append(p.name)
    assert not left, left


def test_fingerprint_distrusts_files_changed_while_loading():
    from vdisk.cmdserver import server as srv

    fp = srv.fingerprint()
    assert any(f.endswith("cmdserver/client.py") for f, _, _ in fp)
    assert not srv.is_stale(fp)
    # every file modified since loading began (here: since the epoch) never matches
    assert all(mtime == -1 for _, mtime, _ in srv.fingerprint(0))
    assert srv.is_stale(srv.fingerprint(0))


def test_launcher_does_not_import_re(server, image, tmp_path):
    """The launcher scripts/setup.sh writes over pip's console script imports only the
    client before a served command runs (pip's script imports re first: 12-15 ms)."""
    from vdisk.cmdserver import launcher

    script = tmp_path / "vdisk"
    assert launcher.install(str(script)) and not launcher.install(str(script))
    e = dict(server.env, PYTHONPROFILEIMPORTTIME="1")
    before = server.mark()
    r = subprocess.run([str(script), "info", str(image)], env=e, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    server.assert_served(before, 1)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "vdisk.cmdserver.client" in imported, r.stderr
    assert "re" not in imported and "enum" not in imported, sorted(imported)
    assert "site" not in imported, sorted(imported)  # python -S: a served command needs no site-packages
    assert "os" not in imported and "stat" not in imported, sorted(imported)  # the client needs only posix
    assert r.stdout == server.vdisk("info", image, in_process=True).stdout
    # in-process (no server), the client imports site itself: click and the rest are found
    e["VDISK_NO_COMMAND_SERVER"] = "1"
    r2 = subprocess.run([str(script), "info", str(image)], env=e, capture_output=True, text=True, timeout=60,
                        stdin=subprocess.DEVNULL)
    assert r2.returncode == 0, r2.stderr
    imported2 = {line.split("|")[-1].strip() for line in r2.stderr.splitlines() if line.startswith("import time:")}
    assert {"site", "click", "vdisk.cli"} <= imported2, sorted(imported2)
    assert r2.stdout == r.stdout


def _faults_writing_after_fork(populate: bool) -> tuple[int, int]:
    """Minor faults a forked child takes writing one byte per page of 32 MiB its
    parent had written, after populate_private_writable() or not; and what it populated."""
    import resource

    from vdisk.hostmem import populate_private_writable

    buf = bytearray(b"\1" * (32 << 20))  # the parent's pages, shared with the child after fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            done = populate_private_writable() if populate else 0
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(0, len(buf), 4096):
                buf[i] = 2
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            os.write(w, f"{faults} {done}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).split()
    os.close(r)
    os.waitpid(pid, 0)
    return int(out[0]), int(out[1])


def test_an_idle_worker_copies_its_parents_pages_before_it_takes_a_command():
    plain, _ = _faults_writing_after_fork(False)
    populated, done = _faults_writing_after_fork(True)
    assert plain >= 8000, plain  # one copy-on-write fault per page of the 32 MiB
    assert done >= 32 << 20 and populated < 200, (populated, done)


def test_a_run_directory_longer_than_a_socket_address_holds(tmp_path):
    """The server's socket path can be longer than a Unix socket address holds
    (vdisk/unixaddr.py): the server listens there and the client reaches it."""
    run_dir = tmp_path / ("r" * 60) / ("u" * 60)
    run_dir.mkdir(parents=True, mode=0o700)
    run_dir.parent.chmod(0o700)
    assert len(str(run_dir / client.SOCKET_NAME)) > 107
    s = Server(run_dir)
    try:
        s.start()
        img = tmp_path / "a.vdk"
        assert s.vdisk("create", "-q", img, "1M", in_process=True).returncode == 0
        before = s.mark()
        r = s.vdisk("info", img)
        assert r.returncode == 0, r.stderr
        s.assert_served(before, 1)
    finally:
        s.stop()
