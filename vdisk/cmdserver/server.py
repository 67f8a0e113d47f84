"""The command server (``vdisk command-server start``): vdisk's command line imported
once, each command run by a fresh forked worker.

The master process imports :mod:`vdisk.cli`, the modules of the commands it serves
and the block layer (:func:`preimport`), fingerprints the vdisk source files it
loaded (path, mtime, size), freezes the garbage collector's view of them
(``gc.freeze()``, so forked workers do not touch, and copy, every page), listens on
``RUN_DIR/cmdserver.sock`` (mode 0600, in a run directory that passes
``control.run_dir_problem``) and keeps ``workers`` pre-forked workers blocked in
``accept()``.  A worker that accepts a connection tells the master (which forks a
replacement), serves that one command and exits:

1. refuses a peer whose uid (SO_PEERCRED) is not the server's;
2. reads the request (protocol: :mod:`vdisk.cmdserver.client`) with fds 0, 1, 2;
3. answers ``stale`` if any fingerprinted file changed (the client then runs the
   command in-process, and the master re-executes itself to load the new code);
4. applies cwd, environment, umask and fds, answers ``run PID`` and runs
   ``vdisk.cli.main(argv)``, then ``exit CODE``.

Stopping: the master stops on SIGTERM (``vdisk command-server stop`` sends it): it
removes the socket and closes a pipe that idle workers watch (they exit at once;
one that has taken a connection has let go of that pipe, so no command is cut
short; the pipe also ends idle workers if the master dies), and exits; running
workers finish their command.  One instance per run directory (a flock on
``cmdserver.lock``); the log is ``cmdserver.log`` there.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import io
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback

from vdisk.cmdserver import client as proto
from vdisk import unixaddr
from vdisk.errors import VdiskError

LOCK_NAME = "cmdserver.lock"
LOG_NAME = "cmdserver.log"
MAX_REQUEST = 4 << 20  # argv + environment: Linux's ARG_MAX is 2 MiB
REQUEST_TIMEOUT = 10.0
DEFAULT_WORKERS = 2
#: packages whose every module the server imports beyond the commands' own modules
PREIMPORT_PACKAGES = ("vdisk.drivers", "vdisk.codec", "vdisk.ops")
_UCRED = struct.Struct("3i")


def paths(d: str) -> tuple[str, str, str]:
    return (os.path.join(d, proto.SOCKET_NAME), os.path.join(d, LOCK_NAME), os.path.join(d, LOG_NAME))


# ---------------------------------------------------------------- loading and staleness
def preimport() -> None:
    """Import the command line, every routed command's module and the block layer."""
    import importlib
    import pkgutil

    import vdisk.cli

    for name, spec in vdisk.cli.COMMANDS.items():
        if name not in proto.IN_PROCESS:
            importlib.import_module(spec.partition(":")[0])
    for name in ("vdisk.block", "vdisk.session", "vdisk.cli.options", "vdisk.cli.output", "vdisk.cli.progress",
                 "vdisk.hostmem", "concurrent.futures"):  # the last: vdk's compression pool, compare
        importlib.import_module(name)
    # What an in-process command loads at its first use, a served one finds loaded: the
    # C library's fallocate and sync_file_range (ctypes, 2 ms: a clone's close punches).
    from vdisk import host

    host.libc()
    for pkg_name in PREIMPORT_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            with contextlib.suppress(Exception):  # an optional dependency missing: load it later
                importlib.import_module(info.name)


def fingerprint(since_ns: int = 1 << 62) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every vdisk source file loaded; a file modified since
    ``since_ns`` (when loading began) may have changed after it was read, so its
    entry never matches (the first command finds the server stale).  A file dated in
    the future is taken as it is (else the server would restart at every command)."""
    now = time.time_ns()
    root = os.path.dirname(os.path.dirname(os.path.abspath(proto.__file__))) + os.sep
    out = []
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.startswith(root) and f.endswith(".py"):
            with contextlib.suppress(OSError):
                st = os.stat(f)
                out.append((f, -1 if since_ns <= st.st_mtime_ns <= now else st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


def is_stale(fp: tuple[tuple[str, int, int], ...]) -> bool:
    for f, mtime, size in fp:
        try:
            st = os.stat(f)
        except OSError:
            return True
        if st.st_mtime_ns != mtime or st.st_size != size:
            return True
    return False


# ---------------------------------------------------------------- the master
class Server:
    def __init__(self, run_dir: str, workers: int = DEFAULT_WORKERS):
        self.run_dir = run_dir
        self.nworkers = workers
        self.sock_path, self.lock_path, self.log_path = paths(run_dir)
        self.idle: set[int] = set()
        self.started = time.time()
        self.served = 0
        self.fp: tuple = ()

    def bind(self) -> None:
        """Take the instance lock and the socket (raises VdiskError, one line)."""
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VdiskError(f"a command server is already running in {self.run_dir}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)  # left by a server that died: we hold the lock
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            unixaddr.bind(self.listener, self.sock_path)  # also a path longer than 107 bytes
        except OSError as exc:
            raise VdiskError(f"{self.sock_path}: cannot listen: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        self.sock_ino = os.stat(self.sock_path).st_ino
        self.listener.listen(128)
        self.notify_r, self.notify_w = os.pipe2(os.O_CLOEXEC)
        # idle workers watch this pipe: EOF (the master closed it, or died) means stop
        self.alive_r, self.alive_w = os.pipe2(os.O_CLOEXEC)
        self.listener.setblocking(False)

    def serve(self, ready=None) -> bool:
        """Run until stopped; True if the code went stale (the caller re-executes)."""
        gc.disable()
        self.master_pid = os.getpid()
        t0 = time.time_ns()
        preimport()
        self.fp = fingerprint(t0)
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, self._on_child)
        gc.collect()
        gc.freeze()
        if ready is not None:
            ready()
        stale = False
        crashes = 0
        running: set[int] = set()
        while True:
            # Top up the idle workers while no command runs, so that forking one (and
            # its prefault) does not compete with a command for the CPU; at once only
            # when none is left.
            while (len(self.idle) < self.nworkers and not self.stop_requested
                   and (not self.idle or not running)):
                self._spawn()
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([self.notify_r], [], [], 1.0)
                if readable:
                    for line in os.read(self.notify_r, 65536).splitlines():
                        kind, _, pid = line.partition(b" ")
                        if kind == b"took":
                            self.idle.discard(int(pid))
                            running.add(int(pid))
                            self.served += 1
                        elif kind == b"stale":
                            stale = True
            while True:
                try:
                    pid, _status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                running.discard(pid)
                if pid in self.idle:  # died without taking a request: do not fork in a tight loop
                    self.idle.discard(pid)
                    crashes += 1
                    print(f"vdisk command-server: idle worker {pid} died (status {_status})", file=sys.stderr)
                    time.sleep(min(5.0, 0.1 * crashes))
            if self.stop_requested or stale:
                break
        self.shutdown()
        return stale and not self.stop_requested

    def _on_child(self, *_):
        with contextlib.suppress(OSError):
            os.write(self.notify_w, b"child 0\n")

    def _on_term(self, *_):
        self.stop_requested = True
        with contextlib.suppress(OSError):
            os.write(self.notify_w, b"stop 0\n")

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                _Worker(self).run()
            except BaseException:  # noqa: BLE001 - a worker never returns into the master's loop
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            os._exit(0)
        self.idle.add(pid)

    def status(self) -> dict:
        return {"pid": self.master_pid, "socket": self.sock_path, "workers": self.nworkers, "served": self.served,
                "started": self.started, "modules": len(self.fp), "python": sys.executable}

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        os.close(self.alive_w)  # idle workers exit
        deadline = time.monotonic() + 5.0
        while self.idle and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.01)
            self.idle.discard(pid)
        self.listener.close()
        os.close(self.lock_fd)


# ---------------------------------------------------------------- a worker
def prefault() -> None:
    """While idle, take the copies of the master's pages a command would take one
    fault at a time: populate this worker's private writable memory (Linux 5.14 and
    later; 20 MiB per idle worker; a command then runs 1-2 ms faster), else touch
    every object the master loaded (taking references writes their reference counts:
    about half the page faults a forked command takes)."""
    from vdisk.hostmem import populate_private_writable

    if populate_private_writable():
        return
    for obj in gc.get_objects():
        del obj
    for mod in list(sys.modules.values()):
        for value in list(getattr(mod, "__dict__", {}).values()):
            del value


class _Worker:
    def __init__(self, server: Server):
        self.server = server

    def run(self) -> None:
        srv = self.server
        gc.enable()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(srv.alive_w)
        prefault()
        while True:
            readable, _, _ = select.select([srv.listener, srv.alive_r], [], [])
            if srv.alive_r in readable:
                return  # the master stopped or died
            try:
                conn, _ = srv.listener.accept()
                break
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            except OSError:
                return
        os.write(srv.notify_w, b"took %d\n" % os.getpid())
        srv.listener.close()
        for fd in (srv.notify_r, srv.lock_fd, srv.alive_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        with conn:
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.getuid():
            print(f"vdisk command-server: refused a peer of uid {uid}", file=sys.stderr)
            with contextlib.suppress(OSError):
                conn.sendall(b"refused uid %d is not the server's\n" % uid)
            return
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            fields, fds = read_request(conn)
        except (OSError, ValueError):
            return
        try:
            answer = self.check(fields, fds)
        except (OSError, ValueError):
            answer = b"proto"
        if answer is not None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(answer + b"\n")
            return
        argc = int(fields[5])
        argv = [os.fsdecode(a) for a in fields[6:6 + argc]]
        words = [a for a in argv if not a.startswith("-")]
        with contextlib.suppress(OSError):  # the log, until apply() gives fd 2 to the client
            os.write(2, f"vdisk command-server: worker {os.getpid()} runs {words[0] if words else '-'}\n".encode())
        self.apply(fields[6 + argc:], int(fields[4], 8), fds)
        conn.settimeout(None)
        conn.sendall(b"run %d\n" % os.getpid())
        code = run_command(argv)
        with contextlib.suppress(OSError):
            conn.sendall(b"exit %d\n" % code)

    def check(self, fields: list[bytes], fds: list[int]) -> bytes | None:
        """The answer to a request that runs no command here, or None (then the
        worker's cwd is the client's)."""
        srv = self.server
        if len(fields) < 6 or fields[0] != proto.MAGIC or fields[1] != proto.PROTOCOL:
            return b"proto"
        kind = fields[2]
        if kind == b"status":
            return b"status " + json.dumps(srv.status()).encode()
        if kind == b"stop":
            os.kill(srv.master_pid, signal.SIGTERM)
            return b"stopping %d" % srv.master_pid
        argc = int(fields[5])
        if kind != b"run" or len(fds) != 3 or argc < 0 or 6 + argc > len(fields):
            return b"proto"
        int(fields[4], 8)
        if is_stale(srv.fp):
            with contextlib.suppress(OSError):
                os.write(srv.notify_w, b"stale 0\n")
            return b"stale"
        try:
            os.chdir(fields[3])
        except OSError:
            return b"refused cwd"
        return None

    @staticmethod
    def apply(env: list[bytes], mask: int, fds: list[int]) -> None:
        os.environ.clear()
        for entry in env:
            name, sep, value = entry.partition(b"=")
            if sep and name:
                with contextlib.suppress(ValueError):
                    os.environb[name] = value
        os.umask(mask)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        encoding = os.environ.get("PYTHONIOENCODING", "").partition(":")[0] or sys.__stdout__.encoding
        sys.stdin = sys.__stdin__ = _text(0, "r", encoding, sys.__stdin__.errors)
        sys.stdout = sys.__stdout__ = _text(1, "w", encoding, sys.__stdout__.errors)
        sys.stderr = sys.__stderr__ = _text(2, "w", encoding, "backslashreplace")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _text(fd: int, mode: str, encoding: str, errors: str) -> io.TextIOWrapper:
    """A standard stream on ``fd`` as the interpreter makes one at start-up."""
    tty = os.isatty(fd)
    raw = io.FileIO(fd, mode, closefd=False)
    buf = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
    return io.TextIOWrapper(buf, encoding=encoding, errors=errors, line_buffering=tty or fd == 2,
                            write_through=fd == 2)


def read_request(conn: socket.socket) -> tuple[list[bytes], list[int]]:
    """The request's fields and the fds that came with it."""
    data = b""
    fds: list[int] = []
    cmsg_len = socket.CMSG_SPACE(3 * 4)
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        if len(data) >= 4 and int.from_bytes(data[:4], "big") > MAX_REQUEST:
            raise ValueError("request too long")
        chunk, anc, _flags, _addr = conn.recvmsg(65536, cmsg_len if not fds else 0)
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                n = len(payload) // 4
                fds.extend(struct.unpack(f"{n}i", payload[:n * 4]))
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ValueError("short request")
        data += chunk
    return data[4:].split(b"\0"), fds


def run_command(argv: list[str]) -> int:
    """``vdisk.cli.main(argv)``, as the interpreter would end it: the exit code."""
    sys.argv = ["vdisk", *argv]
    code = 0
    try:
        from vdisk.cli import main

        main(argv)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - as the interpreter: a traceback, exit 1
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - as the interpreter when flushing stdout fails at exit
        code = code or 120
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    return code & 0xFF


# ---------------------------------------------------------------- talking to a server
def query(run_dir: str, kind: bytes) -> str | None:
    """Send a ``status`` or ``stop`` request; the answer line, or None if no server."""
    s = proto.connect(os.path.join(run_dir, proto.SOCKET_NAME))
    if s is None:
        return None
    with contextlib.closing(s):
        s.settimeout(REQUEST_TIMEOUT)
        try:
            proto.send(s, proto.frame(kind, []))
            line = proto._Lines(s).next()
        except OSError:
            return None
    return line.decode(errors="replace") if line is not None else None


def status(run_dir: str) -> dict | None:
    line = query(run_dir, b"status")
    if line is None or not line.startswith("status "):
        return None
    try:
        return json.loads(line[7:])
    except ValueError:
        return None


# ---------------------------------------------------------------- the daemon's process
#: how the master starts: a fresh interpreter (-P: the cwd is not on sys.path), so no
#: click context or other state of the ``vdisk command-server start`` process lingers
_ENTRY = "from vdisk.cmdserver.server import daemon_main; daemon_main()"


def daemon_argv(workers: int, ready_fd: int | None = None) -> list[str]:
    argv = [sys.executable, "-P", "-c", _ENTRY, "--workers", str(workers)]
    return argv + (["--ready-fd", str(ready_fd)] if ready_fd is not None else [])


def daemon_main() -> None:
    """The master's process (``daemon_argv``): serve until stopped; when the code went
    stale, execute a fresh interpreter in its place to load the new code."""
    opts = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    workers = int(opts.get("--workers", DEFAULT_WORKERS))
    ready_fd = int(opts["--ready-fd"]) if "--ready-fd" in opts else None
    while "" in sys.path:
        sys.path.remove("")

    def report(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, line.encode(errors="replace") + b"\n")
                os.close(ready_fd)
            ready_fd = None

    try:
        from vdisk.export.fuse import control

        srv = Server(control.ensure_run_dir(), workers)
        srv.bind()
        print(f"vdisk command-server: pid {os.getpid()} listening on {srv.sock_path}", file=sys.stderr)
        stale = srv.serve(lambda: report(f"ok {os.getpid()}"))
    except VdiskError as exc:
        report(f"error {exc}")
        print(f"vdisk command-server: {exc}", file=sys.stderr)
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - the log gets the traceback, the starter one line
        report(f"error internal error: {type(exc).__name__}: {exc} (see the log)")
        traceback.print_exc()
        os._exit(1)
    if stale:
        print("vdisk command-server: vdisk's source files changed: restarting", file=sys.stderr)
        sys.stderr.flush()
        argv = daemon_argv(workers)
        os.execv(argv[0], argv)
    print("vdisk command-server: stopped", file=sys.stderr)
    sys.stderr.flush()
    os._exit(0)
