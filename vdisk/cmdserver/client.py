"""The ``vdisk`` entry point: hand the command to a running command server, else run
it in-process.

This module is what every ``vdisk`` command imports first, so it imports only
modules built into the interpreter (``posix``, ``_socket``, ``_signal``): not even
``os`` and ``stat``, which the launcher's ``python -S`` has not loaded (1 ms), no
click, no :mod:`vdisk.cli`, no ``socket``, ``enum``, ``struct``, ``array`` or
``json`` (``python -X importtime`` shows the difference).

It runs the command in-process (``vdisk.cli.main()``, behaviour unchanged) when no
server runs (no socket, connection refused), for the commands never routed
(:data:`IN_PROCESS`), and whenever anything is unusual: the run directory fails the
checks of ``control.run_dir_problem``, the server's uid is not ours, a protocol or
version mismatch, the server answers "stale" (its loaded code changed on disk) or
refuses.  Only the server's "run" answer commits the command to the server; after
it, the client forwards SIGINT, SIGTERM and SIGHUP to the worker and exits with the
worker's exit code, or 70 with one line if the worker dies first.

Protocol (one unix stream connection per command, socket ``RUN_DIR/cmdserver.sock``
mode 0600): the client sends one frame, a 4-byte big-endian length and fields
separated by NUL bytes::

    vdisk-cmdserver  PROTOCOL  KIND  CWD  UMASK(octal)  ARGC  ARGV...  NAME=VALUE...

(KIND is ``run``, ``status`` or ``stop``) with fds 0, 1, 2 attached (SCM_RIGHTS).
The server answers lines: ``run PID`` then ``exit CODE``; or one of ``stale``,
``proto`` (a protocol mismatch), ``refused REASON``; or ``status JSON``.
"""

import _signal
import _socket
import posix
import sys

from vdisk import unixaddr

MAGIC = b"vdisk-cmdserver"
#: bumped on any change of the protocol; a mismatch makes the client run in-process
PROTOCOL = b"1"
SOCKET_NAME = "cmdserver.sock"
#: an internal error (BSD's EX_SOFTWARE): what vdisk exits with when its worker dies
EXIT_INTERNAL = 70
#: commands that always run in-process: long-running or daemon-like, or the server's own
IN_PROCESS = frozenset({"mount", "umount", "serve", "fleet", "bench", "command-server"})
#: ``pool`` subcommands that always run in-process
POOL_IN_PROCESS = frozenset({"replicate", "promote"})
_FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
_S_IFMT, _S_IFDIR = 0o170000, 0o040000


def _fsencode(name: str) -> bytes:
    return name.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _environb() -> dict:
    """The environment: ``os.environb`` where os is loaded (and may have changed it),
    else the one the process started with."""
    os = sys.modules.get("os")
    return os.environb if os is not None else posix.environ


def _getenv(name: str) -> str | None:
    """What ``os.environ.get(name)`` gives."""
    value = _environb().get(_fsencode(name))
    return None if value is None else value.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def run_dir() -> str:
    """Where the server's socket lives: ``vdisk.export.fuse.control.run_dir()``,
    duplicated because importing control costs more than the whole client
    (json, logging, socket, dataclasses); tests/test_cmdserver.py checks they agree."""
    xdg = _getenv("XDG_RUNTIME_DIR")
    if posix.geteuid() == 0:
        d = "/run/vdisk"
    elif xdg:
        d = xdg + "vdisk" if xdg.endswith("/") else xdg + "/vdisk"  # as os.path.join(xdg, "vdisk")
    else:
        d = f"/tmp/vdisk-{posix.getuid()}"
    found = _getenv("VDISK_RUN_DIR")
    return d if found is None else found


def run_dir_ok(d: str) -> bool:
    """``control.run_dir_problem(d) is None``, in short: a real directory of ours
    that no group or other user can write (else a socket there could be anyone's)."""
    try:
        st = posix.lstat(d)
    except OSError:
        return False
    return st.st_mode & _S_IFMT == _S_IFDIR and st.st_uid == posix.geteuid() and not st.st_mode & 0o022


def socket_path() -> str:
    d = run_dir()
    return d + SOCKET_NAME if d.endswith("/") else d + "/" + SOCKET_NAME


def routed(argv: list[str]) -> bool:
    """Whether this command may go to the server (else it always runs in-process)."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return True  # vdisk --help, vdisk -V
    if words[0] in IN_PROCESS:
        return False
    return not (words[0] == "pool" and any(w in POOL_IN_PROCESS for w in words[1:]))


def connect(path: str):
    """A connected socket to a server of our own uid, or None."""
    head = path.rpartition("/")[0]  # its directory, as os.path.dirname gives it
    if not run_dir_ok(head or ("/" if path.startswith("/") else "")):
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        unixaddr.connect(s, path)
        cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(cred[4:8], sys.byteorder) != posix.geteuid():
            s.close()
            return None
    except OSError:
        s.close()
        return None
    return s


def frame(kind: bytes, argv: list[str]) -> bytes:
    mask = posix.umask(0o022)
    posix.umask(mask)
    fields = [MAGIC, PROTOCOL, kind, posix.getcwdb(), b"%o" % mask, b"%d" % len(argv)]
    fields += [_fsencode(a) for a in argv]
    fields += [k + b"=" + v for k, v in _environb().items()]
    payload = b"\0".join(fields)
    return len(payload).to_bytes(4, "big") + payload


def send(s, data: bytes, fds: tuple[int, ...] = ()) -> None:
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))]
    n = s.sendmsg([data], anc if fds else [])
    if n < len(data):
        s.sendall(data[n:])


class _Lines:
    """Lines read from the server's socket."""

    def __init__(self, s):
        self.s = s
        self.buf = b""

    def next(self) -> bytes | None:
        while b"\n" not in self.buf:
            try:
                chunk = self.s.recv(4096)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def _exit_by(sig: int) -> None:
    """End as the command would have ended in-process on ``sig``."""
    if sig == _signal.SIGINT:
        sys.stderr.write("vdisk: interrupted\n")
        sys.stderr.flush()
        posix._exit(130)
    _signal.signal(sig, _signal.SIG_DFL)
    posix.kill(posix.getpid(), sig)
    posix._exit(128 + sig)


def run_on_server(argv: list[str]) -> int | None:
    """Run the command on a server; its exit code, or None to run it in-process."""
    try:
        s = connect(socket_path())
        if s is None:
            return None
        data = frame(b"run", argv)
    except (OSError, ValueError):
        return None
    worker = [0]
    pending: list[int] = []

    def forward(sig, _frame):
        if worker[0]:
            try:
                posix.kill(worker[0], sig)
            except OSError:
                pass
        pending.append(sig)

    saved = [(sig, _signal.signal(sig, forward)) for sig in _FORWARDED]
    try:
        send(s, data, (0, 1, 2))
    except OSError:  # e.g. fd 0, 1 or 2 is closed
        line = None
    else:
        lines = _Lines(s)
        line = lines.next()
    if line is None or not line.startswith(b"run "):
        # stale code, a refusal, a protocol mismatch or no answer: nothing ran there
        s.close()
        for sig, handler in saved:
            _signal.signal(sig, handler)
        if pending:
            _exit_by(pending[0])
        return None
    try:
        worker[0] = int(line[4:])
    except ValueError:
        worker[0] = -1
    for sig in pending:
        if worker[0] > 0:
            try:
                posix.kill(worker[0], sig)
            except OSError:
                pass
    line = lines.next()
    s.close()
    if line is not None and line.startswith(b"exit "):
        try:
            return int(line[5:])
        except ValueError:
            pass
    if pending and pending[-1] != _signal.SIGINT:
        _exit_by(pending[-1])  # the worker was killed by the signal we forwarded
    sys.stderr.write(f"vdisk: the command server's worker (pid {worker[0]}) died before the command "
                     "finished\n")
    sys.stderr.flush()
    return EXIT_INTERNAL


def main() -> None:
    """The ``vdisk`` console script."""
    argv = sys.argv[1:]
    if routed(argv) and (_getenv("VDISK_NO_COMMAND_SERVER") or "") in ("", "0"):
        code = run_on_server(argv)
        if code is not None:
            posix._exit(code & 0xFF)
    if sys.flags.no_site:  # the launcher runs python -S: in-process needs site-packages
        import site

        site.main()
    from vdisk.cli import main as in_process

    in_process()


if __name__ == "__main__":
    main()
