"""The control channel of a read-write export (a mount; the NBD server speaks it too,
:mod:`vdisk.export.nbd.control`): a unix socket that takes JSON requests.

While ``vdisk mount`` has an image open read-write, it holds the image's write lock,
so no other process can open it to take a snapshot.  The mount daemon listens on a
unix socket instead and does the work inside its trio loop, between two FUSE
requests, so a snapshot holds every write acknowledged before the request.

Protocol: the client connects, sends one JSON object on one line, reads one JSON
object on one line, and the server closes.  Requests::

    {"op": "ping"}
    {"op": "snapshot-list", "space": false}       (space: also unique_bytes; slower)
    {"op": "snapshot-create", "name": "NAME"}
    {"op": "snapshot-delete", "name": "NAME"}
    {"op": "snapshot-revert", "name": "NAME"}     (refused while the disk is open)
    {"op": "snapshot-rename", "name": "NAME", "new_name": "NEW"}
    {"op": "snapshot-hold", "name": "NAME|#ID", "delta": 1|-1,
     "holder": {"image_id": HEX, "path": PATH}}   (a linked clone starts/stops using it)
    {"op": "flush"}
    {"op": "status"}

Replies: ``{"ok": true, "result": ...}`` (never a null result: delete, revert and
flush answer ``{"name": ..., "deleted": true}`` and the like) or ``{"ok": false, "error": "message",
"type": "SnapshotExists", "exit_code": 1}`` (``type`` names a class of
:mod:`vdisk.errors`).  A snapshot in a result is
``{"id", "name", "created", "size", "generation", "unique_bytes", "holds"}``.

The socket lives in the run directory (``/run/vdisk`` for root, else
``$XDG_RUNTIME_DIR/vdisk`` or ``/tmp/vdisk-UID``), named after the image file's
device and inode numbers, so any path that names the image (symlink, relative,
bind mount) finds it and the path length limit of unix sockets never bites.  It is
mode 0600, and the server also checks the peer's uid (root or the daemon's own).

Client use (the CLI's ``snapshot`` commands, when opening the image fails with
ImageLocked)::

    from vdisk.export.fuse import control
    reply = control.request(path, {"op": "snapshot-create", "name": "before-upgrade"})
    if reply is None: ...             # no mount owns the image: report ImageLocked as is
    result = control.result(reply)    # raises the VdiskError the daemon reported
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
from dataclasses import asdict

from vdisk import errors as _errors
from vdisk.drivers.base import Holder
from vdisk import unixaddr
from vdisk.errors import UsageError, VdiskError

log = logging.getLogger("vdisk.export.fuse.control")

MAX_REQUEST = 64 * 1024
DEFAULT_TIMEOUT = 120.0


# ---------------------------------------------------------------- paths
def run_dir() -> str:
    """Where sockets and logs of mount daemons live (created on demand)."""
    if os.geteuid() == 0:
        d = "/run/vdisk"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = os.path.join(os.environ["XDG_RUNTIME_DIR"], "vdisk")
    else:
        d = f"/tmp/vdisk-{os.getuid()}"
    return os.environ.get("VDISK_RUN_DIR", d)


def _image_key(image_path: str) -> str:
    """The image's identity as a file name: a file's device and inode, or for an
    image in a pool a digest of its pool's real path and its name."""
    try:
        st = os.stat(image_path)
    except FileNotFoundError:
        from vdisk import block

        key = block.image_key(image_path)
        if key is None:
            raise
        import hashlib

        return "pool-" + hashlib.sha256(repr(key).encode()).hexdigest()[:20]
    return f"{st.st_dev:x}-{st.st_ino:x}"


def socket_path(image_path: str) -> str:
    """The control socket of the mount that owns ``image_path`` (which must exist)."""
    return os.path.join(run_dir(), f"{_image_key(image_path)}.sock")


def mount_socket_path(mountpoint: str) -> str:
    """The control socket of the mount on ``mountpoint`` itself, active or not
    (``vdisk activate``/``deactivate`` talk to it; vdisk/export/fuse/activation.py)."""
    import hashlib

    digest = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:32]
    return os.path.join(run_dir(), f"mnt-{digest}.sock")


def default_log_path(image_path: str) -> str:
    base = os.path.basename(image_path) or "image"
    return os.path.join(run_dir(), f"{base}.{_image_key(image_path)}.mount.log")


def run_dir_problem(d: str) -> str | None:
    """Why ``d`` must not be used as the run directory, or None: it must be a real
    directory of ours that no group or other user can write (else another user could
    plant a socket there and answer our requests, or swap our logs)."""
    import stat as _stat

    try:
        st = os.lstat(d)
    except OSError as exc:
        return exc.strerror
    euid = os.geteuid()
    if _stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not _stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != euid:
        return f"is owned by uid {st.st_uid}, not by us (uid {euid})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {_stat.S_IMODE(st.st_mode):04o})"
    return None


def refuse_run_dir(d: str, problem: str) -> VdiskError:
    return VdiskError(f"{d}: refusing to use this run directory: it {problem}; another user may have made it "
                      "(remove it, or set VDISK_RUN_DIR to a private directory)")


def ensure_run_dir() -> str:
    """The run directory, created mode 0700 if missing, and checked (run_dir_problem)."""
    d = run_dir()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(d)), exist_ok=True)
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise VdiskError(f"{d}: cannot create the run directory: {exc.strerror}") from None
    problem = run_dir_problem(d)
    if problem:
        raise refuse_run_dir(d, problem)
    return d


# ---------------------------------------------------------------- client
def request(image_path: str, req: dict, *, timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """Send ``req`` to the mount daemon that owns ``image_path``; return its reply,
    or None if no mount owns the image (no socket, or a stale one)."""
    try:
        path = socket_path(image_path)
    except OSError:
        return None
    return request_at(path, image_path, req, timeout=timeout)


def request_at(path: str, what: str, req: dict, *, timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """``req`` sent to the control socket ``path`` (errors name ``what``); None if
    nobody listens there."""
    d = os.path.dirname(path)
    if not os.path.lexists(d):
        return None  # no mount has run here yet
    problem = run_dir_problem(d)
    if problem:  # a socket there could be anyone's: never send it our requests
        raise refuse_run_dir(d, problem)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            unixaddr.connect(s, path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return None
            raise VdiskError(f"{what}: cannot reach the mount's control socket {path}: {exc.strerror}") from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 16 << 20:
                    raise VdiskError(f"{what}: the mount's control reply is too large")
        except socket.timeout:
            raise VdiskError(f"{what}: the mount did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise VdiskError(f"{what}: control request failed: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not data:
        raise VdiskError(f"{what}: the mount closed the control connection without a reply")
    try:
        reply = json.loads(data)
    except ValueError:
        raise VdiskError(f"{what}: the mount sent a malformed control reply") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise VdiskError(f"{what}: the mount sent a malformed control reply")
    return reply


def result(reply: dict):
    """The result of a successful reply; for a failed one, raise the VdiskError it names."""
    if reply.get("ok"):
        return reply.get("result")
    cls = getattr(_errors, str(reply.get("type", "")), None)
    msg = str(reply.get("error", "control request failed"))
    if not (isinstance(cls, type) and issubclass(cls, VdiskError)):
        cls = VdiskError
    try:
        exc = cls(msg)
    except TypeError:  # classes with extra constructor arguments
        exc = VdiskError(msg)
        exc.exit_code = reply.get("exit_code", 1)
    raise exc


def call(image_path: str, op: str, **args):
    """``request`` + ``result``; raises LookupError if no mount owns the image."""
    reply = request(image_path, {"op": op, **args})
    if reply is None:
        raise LookupError(f"no mount owns {image_path}")
    return result(reply)


def hold_args(req: dict) -> tuple[int, Holder | None]:
    """(delta, holder) of a ``snapshot-hold`` request, checked (UsageError)."""
    delta = req.get("delta")
    if delta not in (1, -1):
        raise UsageError("snapshot-hold: delta must be 1 or -1")
    holder = req.get("holder")
    if holder is None:
        return delta, None
    if not (isinstance(holder, dict) and isinstance(holder.get("image_id"), str)
            and isinstance(holder.get("path"), str)):
        raise UsageError("snapshot-hold: holder must be {image_id, path}")
    return delta, Holder(holder["image_id"], holder["path"])


def snapshot_to_json(info) -> dict:
    d = asdict(info)
    d.pop("extra", None)
    return d


def error_reply(exc: BaseException) -> dict:
    if isinstance(exc, VdiskError):
        return {"ok": False, "error": exc.message, "type": type(exc).__name__, "exit_code": exc.exit_code}
    return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}", "type": "VdiskError", "exit_code": 1}


# ---------------------------------------------------------------- server
def bind_socket(image_path: str, path: str | None = None) -> socket.socket:
    """Create the listening socket of ``image_path`` (or at ``path``), replacing a
    stale one: we hold the image's write lock (or the mountpoint), so no other live
    server can own that name."""
    ensure_run_dir()
    path = path or socket_path(image_path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        unixaddr.bind(s, path)  # also a path longer than a socket address holds
    finally:
        os.umask(old)
    s.listen(16)
    return s


class MountSockets:
    """A mount's control sockets: its own (``mount``, while it can write or be
    activated) and the image's (``image``, while it holds the image for writing)."""

    def __init__(self, image_path: str, mountpoint: str):
        self.image_path = image_path
        self.mount_path = mount_socket_path(mountpoint)
        self.mount = self.image = None
        self._image_bound = False

    def bind_mount(self) -> None:
        self.mount = bind_socket(self.image_path, self.mount_path)

    def bind_image(self):
        self.image = bind_socket(self.image_path)
        self._image_bound = True
        return self.image

    def unlink_image(self) -> None:
        if self._image_bound:
            self._image_bound = False
            _unlink(socket_path(self.image_path))

    def close(self) -> None:
        self.unlink_image()
        if self.mount is not None:
            _unlink(self.mount_path)
        for s in (self.mount, self.image):
            if s is not None:
                s.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def serve(listen_sock: socket.socket, handler, *, task_status=None) -> None:
    """Serve control requests forever.  ``handler(req) -> result`` is an async function
    raising VdiskError for refusals; it runs in the trio thread."""
    import trio

    tsock = trio.socket.from_stdlib_socket(listen_sock)
    if task_status is not None:
        task_status.started()
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await tsock.accept()
            nursery.start_soon(_serve_one, conn, handler)


async def _serve_one(conn, handler) -> None:
    import trio

    with conn:
        try:
            if peer_uid(conn) not in (0, os.geteuid()):
                await conn.send(_line(DENIED))
                return
            data = b""
            with trio.move_on_after(READ_TIMEOUT):
                while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                    chunk = await conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            req = parse_request(data)
            if req is None:
                reply = MALFORMED
            else:
                try:
                    reply = {"ok": True, "result": await handler(req)}
                except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                    reply = failure_reply(req, exc)
            out = _line(reply)
            while out:
                n = await conn.send(out)
                out = out[n:]
        except OSError as exc:
            log.warning("control connection: %s", exc)


def serve_blocking(listen_sock: socket.socket, handler) -> None:
    """Serve control requests in the calling thread, one connection at a time, until
    ``listen_sock`` is shut down (``shutdown(SHUT_RDWR)`` wakes the accept).
    ``handler(req) -> result`` runs in this thread; the caller makes it take what
    locks it needs.  For exports without a trio loop (the NBD server)."""
    while True:
        try:
            conn, _ = listen_sock.accept()
        except OSError:
            return
        with conn:
            try:
                if peer_uid(conn) not in (0, os.geteuid()):
                    conn.sendall(_line(DENIED))
                    continue
                conn.settimeout(READ_TIMEOUT)
                data = b""
                while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                req = parse_request(data)
                if req is None:
                    reply = MALFORMED
                else:
                    try:
                        reply = {"ok": True, "result": handler(req)}
                    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
                        reply = failure_reply(req, exc)
                conn.sendall(_line(reply))
            except OSError as exc:
                log.warning("control connection: %s", exc)


#: what a peer of another uid is told
DENIED = {"ok": False, "error": "permission denied", "type": "VdiskError", "exit_code": 1}
MALFORMED = {"ok": False, "error": "malformed request", "type": "UsageError", "exit_code": 1}
#: seconds a client has to send its request
READ_TIMEOUT = 30


def _line(reply: dict) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def parse_request(data: bytes) -> dict | None:
    """The request one line holds, or None if it is not ``{"op": STR, ...}``."""
    try:
        req = json.loads(data)
    except ValueError:
        return None
    return req if isinstance(req, dict) and isinstance(req.get("op"), str) else None


def failure_reply(req: dict, exc: BaseException) -> dict:
    """The reply to a request whose handler raised ``exc`` (logged: a refusal as
    info, anything else, a bug, with its traceback)."""
    if not isinstance(exc, VdiskError):
        log.exception("control request %r failed", req)
    else:
        log.info("control request %r refused: %s", req, exc)
    return error_reply(exc)
