"""Running a mount: the daemon's main loop, starting it in the background, and unmounting.

Life of a mount (``vdisk mount IMAGE MNT``):

1. the CLI spawns ``python -m vdisk.export.fuse --ready-fd N IMAGE MNT`` in a new session,
   stdout/stderr into the log file, and waits on the pipe for one line:
   ``READY`` or ``ERROR <exit_code> <message>``;
2. the daemon opens the image (taking the write lock for rw), binds the control socket
   (rw only), mounts with its engine, reports READY and serves.  Two engines serve the
   same handlers (vdisk.export.fuse.fs.VdiskFS): ``pyfuse3`` (libfuse + pyfuse3 + trio, the
   default) and ``kernel`` (vdisk.export.fuse.kernel: the FUSE protocol spoken on /dev/fuse
   by reader threads); ``vdisk mount --engine`` or $VDISK_FUSE_ENGINE chooses.  The
   control socket and signals are served by a trio loop in the main thread with
   either engine, under the engine's lock;
3. it ends when the file system is unmounted (``vdisk umount``/``fusermount3 -u``: the
   kernel closes the FUSE connection and the session loop returns), or on
   SIGTERM/SIGINT/SIGHUP (it flushes and unmounts itself; if the mount is busy it keeps
   serving and says so in the log; a second signal detaches it lazily and exits);
4. on the way out it closes every snapshot view and the image (which flushes it),
   removes the control socket and, if still mounted, unmounts.

The run directory (``control.run_dir()``: ``/run/vdisk`` for root, else
``$XDG_RUNTIME_DIR/vdisk`` or ``/tmp/vdisk-UID``) holds control sockets and logs.  It is
created mode 0700, and one that is a symlink, is not owned by the current uid or is
writable by group or others is refused (``secure_run_dir``): in /tmp another user
could have made it first and would then see or replace our sockets and logs.  Log files
are opened with O_NOFOLLOW (a planted symlink must not make us append to, or create, a
file elsewhere) and O_CLOEXEC.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import time

import pyfuse3
import trio

import vdisk
import vdisk.block
from vdisk.errors import VdiskError

from . import control
from .activation import Activation, open_inactive
from .fs import DISK_INO, SNAPDIR_INO, VdiskFS
from .mountpoint import MountError, check_mountpoint, is_mounted, mount_options

log = logging.getLogger("vdisk.export.fuse")

READY_TIMEOUT = 120.0

#: pyfuse3 worker tasks.  The data handlers never await, so a second worker could only
#: wait on pyfuse3's read lock: measured, one worker costs less CPU per request than
#: four (vdisk/export/fuse/PERFORMANCE.md).  VDISK_FUSE_MAX_TASKS overrides it for experiments.
MAX_TASKS = 1


def secure_run_dir() -> str:
    """``control.run_dir()``, created mode 0700 if missing; raises MountError (one line,
    naming it) for one that is a symlink, not a directory, not ours or writable by others
    (the checks are control.run_dir_problem's, which clients make too)."""
    try:
        return control.ensure_run_dir()
    except VdiskError as exc:
        raise MountError(exc.message) from None


def open_log(path: str) -> int:
    """Open (create, mode 0600) the log file for appending, never through a symlink;
    returns the descriptor (close-on-exec)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MountError(f"{path}: the log file is a symbolic link; refusing to follow it") from None
        raise MountError(f"{path}: cannot open the log file: {exc.strerror}") from None


# ---------------------------------------------------------------- engines
ENGINES = ("pyfuse3", "kernel")
#: the engine when none is named: VDISK_FUSE_ENGINE, else the kernel engine (it passes
#: the whole FUSE test suite, tests/test_fuse.py, and is faster: vdisk/export/fuse/PERFORMANCE.md;
#: tests/test_fuse_pyfuse3.py runs that suite on pyfuse3 too)
DEFAULT_ENGINE = "kernel"


def engine_name(engine: str | None = None) -> str:
    """``engine``, else $VDISK_FUSE_ENGINE, else DEFAULT_ENGINE; MountError if unknown."""
    name = engine or os.environ.get("VDISK_FUSE_ENGINE") or DEFAULT_ENGINE
    if name not in ENGINES:
        raise MountError(f"unknown FUSE engine {name!r} (known: {', '.join(ENGINES)})")
    return name


class Pyfuse3Engine:
    """pyfuse3 + trio: libfuse reads the requests, pyfuse3 runs each handler as a trio
    task.  Everything (handlers, control requests) runs in the trio thread, so no lock
    is needed (vdisk/export/fuse/fs.py's concurrency rules)."""

    name = "pyfuse3"

    def __init__(self, fs: VdiskFS):
        self.fs = fs
        self.lock = contextlib.nullcontext()

    def mount(self, mountpoint: str, *, read_only: bool, options: list[str] | None = None) -> None:
        try:
            pyfuse3.init(self.fs, mountpoint, mount_options(read_only, options))
        except RuntimeError as exc:
            raise MountError(f"{mountpoint}: mounting failed ({exc}); is /dev/fuse there and fusermount3 "
                             "installed?") from None

    def start(self) -> None:
        pass

    async def serve(self) -> None:
        await pyfuse3.main(min_tasks=1, max_tasks=int(os.environ.get("VDISK_FUSE_MAX_TASKS", MAX_TASKS)))

    def terminate(self) -> None:
        pyfuse3.terminate()

    def invalidate_entry(self, parent: int, name: bytes, deleted: int = 0) -> None:
        _quiet_inval_entry(parent, name, deleted)

    def invalidate_inode(self, ino: int) -> None:
        _quiet_inval_inode(ino)

    def close(self) -> None:
        # Unmount before closing the image, so no request can arrive after the final
        # flush.  libfuse skips this when the kernel already dropped the connection.
        pyfuse3.close(unmount=True)


def make_engine(name: str, fs: VdiskFS):
    if name == "kernel":
        from .kernel import mount as kmount
        from .kernel.engine import KernelEngine

        class _Kernel(KernelEngine):
            def mount(self, mountpoint, *, read_only, options=None):
                try:
                    super().mount(mountpoint, read_only=read_only, options=options)
                except (OSError, kmount.MountFailed) as exc:
                    raise MountError(f"{mountpoint}: mounting failed ({exc.strerror or exc}); is /dev/fuse "
                                     "there?") from None

            async def serve(self):
                # The reader threads serve; the trio thread waits for the connection to end.
                await trio.to_thread.run_sync(self.wait, abandon_on_cancel=True)

        return _Kernel(fs)
    return Pyfuse3Engine(fs)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------- the daemon
class _Daemon:
    def __init__(self, fs: VdiskFS, engine, image_path: str, mountpoint: str, sockets: control.MountSockets,
                 fmt: str | None):
        self.fs = fs
        self.engine = engine
        self.image_path = image_path
        self.mountpoint = mountpoint
        self.sockets = sockets
        self.activation = Activation(self, fmt)
        self.unmounted = False
        self._nursery = None
        self._image_scope = None

    # the image's control socket comes and goes with activation (activation.py)
    def start_image_socket(self) -> None:
        sock = self.sockets.bind_image()
        self._image_scope = trio.CancelScope()
        self._nursery.start_soon(self._serve_image_socket, sock, self._image_scope)

    def stop_image_socket(self) -> None:
        self.sockets.unlink_image()  # now: a mount activated next must find its own
        if self._image_scope is not None:
            self._image_scope.cancel()
            self._image_scope = None

    async def _serve_image_socket(self, sock, scope) -> None:
        with scope:
            try:
                await control.serve(sock, self.handle_control)
            finally:
                sock.close()

    async def handle_control(self, req: dict):
        """Control requests, run in the trio thread between FUSE requests: under the
        engine's lock (the kernel engine's readers are other threads), and the kernel
        caches invalidated afterwards, outside it."""
        with self.engine.lock:
            result, invalidations = self._control(req)
        for fn, *args in invalidations:
            # In a worker thread: these block until related requests finish, which needs
            # the engine to keep serving (see pyfuse3.invalidate_entry).
            await trio.to_thread.run_sync(fn, *args)
        return result

    def _control(self, req: dict):
        op = req["op"]
        fs = self.fs
        eng = self.engine
        if op == "ping":
            return "pong", []
        if op in ("activate", "deactivate"):
            return getattr(self.activation, op)(), [(eng.invalidate_inode, DISK_INO)]
        if op == "status":
            return {
                "pid": os.getpid(),
                "image": self.image_path,
                "mountpoint": self.mountpoint,
                "read_only": fs.read_only or fs.failed is not None,
                "failed": fs.failed,
                "snapshots": fs.snapshot_names(),
                "engine": eng.name,
                "active": not fs.inactive,
            }, []
        # Every successful reply carries a non-null result, so a client can tell
        # "done" from "no mount owns the image" (None from control.request).
        if op == "flush":
            if fs.failed is not None:
                # Nothing more can be made durable; let `vdisk umount` go on.
                return {"flushed": False, "failed": fs.failed}, []
            fs.image.flush()
            return {"flushed": True}, []
        if op == "snapshot-list":
            # space=True (unique bytes per snapshot) walks the tables and stalls the
            # FUSE requests meanwhile: only on request.
            infos = fs.image.snapshot_list(space=True) if req.get("space") else fs.image.snapshot_list()
            return [control.snapshot_to_json(i) for i in infos], []
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise vdisk.errors.UsageError(f"{op}: a snapshot name is needed")
        bname = os.fsencode(name)
        if op == "snapshot-create":
            info = fs.snapshot_create(name)
            log.info("snapshot %s created (live)", name)
            return control.snapshot_to_json(info), self._snapdir_changed(bname, 0)
        if op == "snapshot-delete":
            old = fs._snaps.get(bname)
            fs.snapshot_delete(name)
            log.info("snapshot %s deleted (live)", name)
            return {"name": name, "deleted": True}, self._snapdir_changed(bname, old.ino if old else 0)
        if op == "snapshot-hold":
            # a linked clone (vdisk clone) starts or stops depending on this snapshot
            delta, holder = control.hold_args(req)
            info = fs.snapshot_hold(name, delta, holder)
            log.info("snapshot %s: hold %+d (linked clone %s)", name, delta, holder.path if holder else "-")
            return control.snapshot_to_json(info), []
        if op == "snapshot-rename":
            new_name = req.get("new_name")
            if not isinstance(new_name, str) or not new_name:
                raise vdisk.errors.UsageError("snapshot-rename: a new name is needed")
            old = fs._snaps.get(bname)
            info = fs.snapshot_rename(name, new_name)
            log.info("snapshot %s renamed to %s (live)", name, new_name)
            return control.snapshot_to_json(info), \
                self._snapdir_changed(bname, old.ino if old else 0) + self._snapdir_changed(os.fsencode(new_name), 0)
        if op == "snapshot-revert":
            fs.snapshot_revert(name)
            log.info("disk reverted to snapshot %s", name)
            return {"name": name, "reverted": True}, \
                [(eng.invalidate_inode, DISK_INO)] + self._snapdir_changed(bname, 0)
        raise vdisk.errors.UsageError(f"unknown control operation {op!r}")

    def _snapdir_changed(self, bname: bytes, old_ino: int) -> list:
        eng = self.engine
        return [(eng.invalidate_entry, SNAPDIR_INO, bname, old_ino), (eng.invalidate_inode, SNAPDIR_INO)]

    async def signals(self, nursery) -> None:
        with trio.open_signal_receiver(*_STOP_SIGNALS) as sigs:
            # serve() blocked these before the mount became visible; one that came since
            # is delivered now, to this receiver
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            count = 0
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: ignored")
                    continue
                count += 1
                log.info("%s: flushing and unmounting", signal.Signals(signum).name)
                try:
                    with self.engine.lock:
                        self.fs.image.flush()
                except Exception:
                    log.exception("flush on %s failed", signal.Signals(signum).name)
                if count == 1:
                    rc, err = await trio.to_thread.run_sync(_fusermount, self.mountpoint, False)
                    if rc == 0:
                        self.unmounted = True
                        log.info("unmounted %s", self.mountpoint)
                        # The session loop ends by itself when the kernel drops the connection.
                        continue
                    log.warning("cannot unmount %s (%s); still serving. Send the signal again to "
                                "detach it lazily and exit", self.mountpoint, err.strip())
                else:
                    log.warning("second signal: detaching %s lazily and exiting", self.mountpoint)
                    self.engine.terminate()
                    return

    async def main(self, ready) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.signals, nursery)
            if self.sockets.mount is not None:
                await nursery.start(control.serve, self.sockets.mount, self.handle_control)
            if self.sockets.image is not None:
                self._image_scope = trio.CancelScope()
                nursery.start_soon(self._serve_image_socket, self.sockets.image, self._image_scope)
            ready()
            try:
                await self.engine.serve()
            finally:
                nursery.cancel_scope.cancel()


def _quiet_inval_entry(parent: int, name: bytes, deleted: int) -> None:
    try:
        pyfuse3.invalidate_entry(parent, name, deleted)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
            log.warning("invalidating entry %r: %s", name, exc)


def _quiet_inval_inode(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EBADF):
            log.warning("invalidating inode %d: %s", ino, exc)


def _fusermount(mountpoint: str, lazy: bool) -> tuple[int, str]:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return p.returncode, p.stderr


def serve(
    image_path: str,
    mountpoint: str,
    *,
    read_only: bool = False,
    fmt: str | None = None,
    direct_io: bool = True,
    log_file: str | None = None,
    ready=lambda: None,
    options: list[str] | None = None,
    engine: str | None = None,
    trace: str | None = None,
    inactive: bool = False,
) -> None:
    """Mount and serve until unmounted.  Raises VdiskError if the mount cannot be set
    up; ``ready()`` is called once the mount is live.  ``engine``: "pyfuse3" or
    "kernel" (default: $VDISK_FUSE_ENGINE, else DEFAULT_ENGINE).  ``trace``: record
    every request to the disk in this file (formats/trace.md).  ``inactive``: serve
    the image read-only without its lock or lease until ``vdisk activate``
    (vdisk/export/fuse/activation.py)."""
    image_path, snapshot = vdisk.block.split_image_spec(image_path)
    image_path = vdisk.block.abspath(image_path)
    mountpoint = os.path.abspath(mountpoint)
    ename = engine_name(engine)
    if inactive and (read_only or snapshot is not None or trace is not None):
        raise MountError("--inactive mounts the image itself read-write, untraced (no -r, no @SNAP, no --trace)")
    check_mountpoint(mountpoint)
    # IMAGE@SNAP serves that snapshot, read-only
    if inactive:
        image = open_inactive(image_path, fmt)
    else:
        image = vdisk.open(image_path, read_only=read_only or snapshot is not None, format=fmt, snapshot=snapshot)
    sockets = control.MountSockets(image_path, mountpoint)
    fs = None
    try:
        if trace is not None:
            from ..trace import traced

            name = image_path + (f"@{snapshot}" if snapshot is not None else "")
            image = traced(image, trace, name)
            log.info("tracing every request to %s", trace)
        xattrs = {"pid": str(os.getpid()), "image": image_path}
        if log_file:
            xattrs["log"] = log_file
        if inactive or not image.read_only:
            secure_run_dir()
            sockets.bind_mount()
            xattrs["socket"] = sockets.mount_path
            if not inactive:
                sockets.bind_image()
        writable = inactive or not image.read_only
        fs = VdiskFS(image, read_only=not writable, direct_io=direct_io, xattrs=xattrs)
        if inactive:  # writable once activated; until then fs.inactive refuses writes
            fs.read_only, fs.inactive = False, True
        eng = make_engine(ename, fs)
        # A stop signal that arrives once the mount is visible but before the daemon
        # listens for it must not kill the daemon unflushed: block them until then
        # (reader threads started meanwhile inherit the mask).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        eng.mount(mountpoint, read_only=not writable, options=options)
        log.info("mounted %s (%s, %s) on %s, pid %d, engine %s", image_path, image.format,
                 "inactive" if inactive else "read-only" if image.read_only else "read-write", mountpoint,
                 os.getpid(), ename)
        d = _Daemon(fs, eng, image_path, mountpoint, sockets, fmt)
        try:
            eng.start()
            trio.run(d.main, ready)
        except BaseException:
            log.exception("the FUSE main loop failed")
            raise
        finally:
            try:
                eng.close()
            except Exception:
                log.exception("closing the %s engine", ename)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        sockets.close()
        try:
            (fs if fs is not None else image).close()
        except VdiskError as exc:
            log.error("closing %s: %s", image_path, exc)
            raise
        log.info("image %s closed", image_path)


# ---------------------------------------------------------------- background start
def spawn(
    image_path: str,
    mountpoint: str,
    *,
    read_only: bool = False,
    fmt: str | None = None,
    log_file: str | None = None,
    direct_io: bool = True,
    timeout: float = READY_TIMEOUT,
    engine: str | None = None,
    trace: str | None = None,
    inactive: bool = False,
) -> tuple[int, str]:
    """Start the daemon in the background and wait until the mount is live.
    Returns (pid, log_file); raises the daemon's error if it could not mount.
    ``engine`` reaches the daemon as $VDISK_FUSE_ENGINE (default: ours, inherited)."""
    if engine is not None:
        engine_name(engine)  # refuse an unknown one here, in the caller
    file_path, snapshot = vdisk.block.split_image_spec(image_path)
    file_path = vdisk.block.abspath(file_path)
    image_path = file_path + (f"@{snapshot}" if snapshot is not None else "")
    mountpoint = os.path.abspath(mountpoint)
    if not vdisk.block.exists(file_path):
        raise vdisk.errors.ImageNotFound(f"{file_path}: no such file")
    check_mountpoint(mountpoint)
    if log_file is None:
        secure_run_dir()
        log_file = control.default_log_path(file_path)
    log_file = os.path.abspath(log_file)
    logfd = open_log(log_file)
    try:
        r, w = os.pipe()
    except OSError:
        os.close(logfd)
        raise
    cmd = [sys.executable, "-m", "vdisk.export.fuse", "--ready-fd", str(w), "--log-file", log_file]
    if read_only:
        cmd.append("--read-only")
    if inactive:
        cmd.append("--inactive")
    if fmt:
        cmd += ["--format", fmt]
    if not direct_io:
        cmd.append("--no-direct-io")
    if trace is not None:
        cmd += ["--trace", os.path.abspath(trace)]  # the daemon runs in /
    cmd += [image_path, mountpoint]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, pass_fds=(w,),
            start_new_session=True, close_fds=True,
            env=dict(os.environ, VDISK_FUSE_ENGINE=engine) if engine is not None else None,
            cwd="/",  # a daemon must not keep the caller's directory (and its file system) busy
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(logfd)
        os.close(w)
    line = b""
    deadline = time.monotonic() + timeout
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise MountError(f"the mount daemon did not get ready within {timeout:g} s; see {log_file}")
            import select

            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            line += chunk
    finally:
        os.close(r)
    text = line.decode(errors="replace").strip()
    if text == "READY":
        return proc.pid, log_file
    if text.startswith("ERROR "):
        _, code, msg = (text.split(" ", 2) + [""])[:3]
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        exc = VdiskError(msg)
        exc.exit_code = int(code) if code.isdigit() else 1
        raise exc
    rc = proc.wait(timeout=30)
    raise MountError(f"the mount daemon exited (status {rc}) before the mount was ready; see {log_file}")


# ---------------------------------------------------------------- unmount
def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = 120.0) -> None:
    """Flush, unmount and wait for the daemon to exit."""
    mountpoint = os.path.abspath(mountpoint)
    m = is_mounted(mountpoint)
    if m is None:
        raise MountError(f"{mountpoint}: not mounted")
    fstype, source = m
    if not (fstype.startswith("fuse") and source == "vdisk"):
        raise MountError(f"{mountpoint}: not a vdisk mount ({fstype} from {source})")
    pid = image = None
    try:
        pid = int(os.getxattr(mountpoint, "user.vdisk.pid"))
        image = os.getxattr(mountpoint, "user.vdisk.image").decode()
    except OSError:
        pass  # a dead daemon (ENOTCONN): just unmount
    if image is not None and not lazy:
        reply = control.request(image, {"op": "flush"})
        if reply is not None:
            control.result(reply)
    rc, err = _fusermount(mountpoint, lazy)
    if rc != 0:
        err = err.strip()
        if "busy" in err.lower():
            raise MountError(
                f"{mountpoint}: busy (a file under it is open: a loop device? `losetup -j {mountpoint}/disk`); "
                "close it, or use --lazy"
            )
        raise MountError(f"{mountpoint}: unmount failed: {err}")
    if pid is not None and not lazy:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"{mountpoint}: unmounted, but the daemon (pid {pid}) has not exited after {timeout:g} s")
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Some thread of ``pid`` still runs.  The leader of a multi-threaded daemon is a
    zombie as soon as it exits, while its other threads may still hold /dev/fuse and
    the image's lock: only when every thread is gone is the image free again."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return False


def process_gone(pid: int) -> bool:
    """Every thread of ``pid`` has exited (a zombie leader may be left)."""
    return not _alive(pid)
