"""The kernel engine's request loop: /dev/fuse -> VdiskFS's handlers -> /dev/fuse.

Threads and descriptors
-----------------------
``threads`` reader threads (default 2, ``VDISK_FUSE_THREADS``), each blocked in
``readv`` on its own /dev/fuse descriptor: the mount's, or one cloned from it with
FUSE_DEV_IOC_CLONE.  The kernel hands each request to one waiting reader; the reply
must go to the descriptor it was read from, and each thread only writes replies to
its own.  Each thread has its own preallocated request buffer (max_write + 4 KiB) and
reply header; a request's data (a WRITE's payload) is a memoryview into that buffer,
valid until the thread's next read, and never kept: ``Image.write`` copies it before
it returns.

Concurrency rules (what may run at once; which lock guards what)
----------------------------------------------------------------
* ``KernelEngine.lock`` (one ``threading.Lock``) guards the VdiskFS object, the image
  and its driver, and every snapshot view: every handler call runs under it, from
  start to finish, and so does every control request (snapshot create/delete/hold/
  revert, flush, status; vdisk.export.fuse.daemon) and the flush on a signal.  Drivers
  therefore never see two calls at once and need not be thread-safe.
* Outside the lock, and so in parallel with one handler: reading a request from
  /dev/fuse and decoding it, encoding the reply and writing it to /dev/fuse, and
  the kernel's own work on other requests.  That overlap (the kernel round trip of
  one request while Python serves another) is what the second thread buys at queue
  depth > 1; the GIL is released in readv/writev and in the image's pread/pwrite.
* A WRITE's handler has returned (the data is in the image, visible to a snapshot)
  and the lock is released *before* its reply is written to /dev/fuse; the kernel
  completes write(2) only after that reply (no writeback cache is negotiated).  So
  any control request that starts after a write(2) returned takes the lock after
  that write's handler released it, and a live snapshot holds every write
  acknowledged before it was asked for.  Writes still in flight when the snapshot
  is taken may or may not be in it, as with a block device.
* Kernel cache invalidations (FUSE_NOTIFY_INVAL_ENTRY/INODE/DELETE) are written to
  /dev/fuse *without* the lock, from the control path's worker thread: the kernel may
  block them until requests on the same directory finish, which needs the readers.
* Handlers are ``async def`` but never await on this path; each is driven by
  ``coro.send(None)`` to completion under the lock.  One that suspends would be
  waiting for the trio loop, which does not serve this engine: the request fails
  with EIO and the log names the handler (so a future awaiting handler shows up at
  once rather than hanging the mount).

Negotiated at INIT (what a disk export needs, nothing that would delay a write's
reply): ATOMIC_O_TRUNC, BIG_WRITES + MAX_PAGES (requests up to 1 MiB), ASYNC_DIO (an
aio submitter's O_DIRECT requests are all in flight at once, up to max_background 64),
ASYNC_READ, PARALLEL_DIROPS, DO_READDIRPLUS, AUTO_INVAL_DATA; never WRITEBACK_CACHE.
Opens with direct_io also get FOPEN_PARALLEL_DIRECT_WRITES (7.38) so the kernel does
not serialise direct writes on the inode lock (our own lock serialises them anyway;
measured: no difference either way on this machine).  Knobs for experiments:
VDISK_FUSE_THREADS (readers, default 2), VDISK_FUSE_ASYNC_READ=0,
VDISK_FUSE_PARALLEL_DIRECT_WRITES=0.

End of a mount: unmounting (``vdisk umount``, fusermount3 -u, umount) makes the
kernel end the connection; every reader gets ENODEV and exits, and ``wait()``
returns.  ``terminate()`` makes ``wait()`` return at once (the daemon's second
signal); ``close()`` then detaches the mount lazily if it is still there and, under
the lock, marks the engine closed so that a request still arriving gets EIO instead
of touching a closed image.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

import pyfuse3

from ..fs import DISK_INO, DISK_NAME, ROOT_INO, SNAPDIR_INO, SNAPDIR_NAME
from . import mount as kmount
from . import proto
from .fallocate import fallocate

log = logging.getLogger("vdisk.export.fuse.kernel")

DEFAULT_THREADS = 2
#: requests up to 1 MiB (max_pages 256, the kernel's default fuse.max_pages_limit)
MAX_WRITE = 1 << 20
#: in-flight asynchronous requests the kernel may queue (async direct I/O at depth 16)
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48


class _Awaited(Exception):
    pass


def _run(coro):
    """Drive a handler coroutine that never suspends to completion; its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise _Awaited(getattr(coro, "__qualname__", repr(coro)))


def _entry(e: pyfuse3.EntryAttributes) -> proto.Entry:
    return proto.Entry(_attr(e), e.generation, e.entry_timeout, e.attr_timeout)


def _attr(e: pyfuse3.EntryAttributes) -> proto.Attr:
    return proto.Attr(e.st_ino, e.st_size, e.st_blocks, e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns, e.st_mode,
                      e.st_nlink, e.st_uid, e.st_gid, e.st_rdev, e.st_blksize)


class _SetattrFields:
    """What pyfuse3.SetattrFields tells a setattr handler, from fuse_setattr_in.valid."""

    __slots__ = (
        "update_atime",
        "update_ctime",
        "update_gid",
        "update_mode",
        "update_mtime",
        "update_size",
        "update_uid",
    )

    def __init__(self, valid: int):
        self.update_mode = bool(valid & proto.FATTR_MODE)
        self.update_uid = bool(valid & proto.FATTR_UID)
        self.update_gid = bool(valid & proto.FATTR_GID)
        self.update_size = bool(valid & proto.FATTR_SIZE)
        self.update_atime = bool(valid & (proto.FATTR_ATIME | 1 << 7))
        self.update_mtime = bool(valid & (proto.FATTR_MTIME | 1 << 8))
        self.update_ctime = bool(valid & proto.FATTR_CTIME)


class _SetattrAttr:
    __slots__ = ("st_atime_ns", "st_ctime_ns", "st_gid", "st_mode", "st_mtime_ns", "st_size", "st_uid")

    def __init__(self, size, mode, uid, gid, atime_ns, mtime_ns, ctime_ns):
        self.st_size, self.st_mode, self.st_uid, self.st_gid = size, mode, uid, gid
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = atime_ns, mtime_ns, ctime_ns


class KernelEngine:
    """Serve a :class:`vdisk.export.fuse.fs.VdiskFS` on a FUSE mount, speaking the protocol itself."""

    name = "kernel"

    def __init__(self, fs, *, threads: int | None = None, max_write: int = MAX_WRITE,
                 async_read: bool | None = None, parallel_direct_writes: bool | None = None):
        self.fs = fs
        self.lock = threading.Lock()
        if threads is None:
            threads = int(os.environ.get("VDISK_FUSE_THREADS", DEFAULT_THREADS))
        self.nthreads = max(1, threads)
        self.max_write = max_write
        if async_read is None:
            async_read = os.environ.get("VDISK_FUSE_ASYNC_READ", "1") not in ("0", "")
        self.async_read = async_read
        if parallel_direct_writes is None:
            parallel_direct_writes = os.environ.get("VDISK_FUSE_PARALLEL_DIRECT_WRITES", "1") not in ("0", "")
        self.parallel_direct_writes = parallel_direct_writes
        self.bufsize = max(proto.MIN_READ_BUFFER, proto.WRITE_DATA_OFFSET + max_write + 4096)
        self.mountpoint: str | None = None
        self.fds: list[int] = []
        #: negotiated at INIT
        self.minor = 0
        self.kernel_minor = 0
        self.flags = 0
        self.destroyed = False
        self._closed = False
        self._open_flags_extra = 0
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._count_lock = threading.Lock()
        self._done = threading.Event()
        self._ops = {
            proto.INIT: self._op_init,
            proto.DESTROY: self._op_destroy,
            proto.LOOKUP: self._op_lookup,
            proto.FORGET: self._op_noreply,
            proto.BATCH_FORGET: self._op_noreply,
            proto.INTERRUPT: self._op_noreply,
            proto.NOTIFY_REPLY: self._op_noreply,
            proto.GETATTR: self._op_getattr,
            proto.SETATTR: self._op_setattr,
            proto.OPEN: self._op_open,
            proto.CREATE: self._op_create,
            proto.FLUSH: self._op_flush,
            proto.FSYNC: self._op_fsync,
            proto.RELEASE: self._op_release,
            proto.OPENDIR: self._op_opendir,
            proto.READDIR: self._op_readdir,
            proto.READDIRPLUS: self._op_readdirplus,
            proto.RELEASEDIR: self._op_releasedir,
            proto.STATFS: self._op_statfs,
            proto.GETXATTR: self._op_getxattr,
            proto.LISTXATTR: self._op_listxattr,
            proto.ACCESS: self._op_access,
            proto.FALLOCATE: self._op_fallocate,
            proto.SYNCFS: self._op_syncfs,
        }
        # opcodes whose handler does not touch the file system (no lock needed)
        self._unlocked = {proto.INIT, proto.FORGET, proto.BATCH_FORGET, proto.INTERRUPT, proto.NOTIFY_REPLY,
                          proto.ACCESS, proto.DESTROY}

    # ------------------------------------------------------------ life cycle
    def mount(self, mountpoint: str, *, read_only: bool, options: list[str] | None = None,
              via: str | None = None) -> None:
        """Mount on ``mountpoint`` and clone one descriptor per extra thread (``via``:
        see :func:`vdisk.export.fuse.kernel.mount.mount`)."""
        fd = kmount.mount(mountpoint, fsname="vdisk", subtype="vdisk", read_only=read_only,
                          allow_other=os.geteuid() == 0, extra=options, via=via)
        self.mountpoint = mountpoint
        self.fds = [fd]
        try:
            for _ in range(self.nthreads - 1):
                self.fds.append(kmount.clone_fd(fd))
        except OSError as exc:
            log.warning("cannot clone the /dev/fuse descriptor (%s): serving with %d thread(s)", exc,
                        len(self.fds))

    def start(self) -> None:
        self._running = len(self.fds)
        for i, fd in enumerate(self.fds):
            t = threading.Thread(target=self._serve, args=(fd,), name=f"fuse-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the connection ended (unmounted) or ``terminate()``; False if
        ``timeout`` passed first."""
        return self._done.wait(timeout)

    def terminate(self) -> None:
        self._done.set()

    @property
    def connected(self) -> bool:
        return not self._done.is_set() or any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """After ``wait()``: no request may reach the file system any more; detach the
        mount if it is still there (``terminate()`` while busy)."""
        with self.lock:
            self._closed = True
        alive = [t for t in self._threads if t.is_alive()]
        for t in alive:
            t.join(0.2)
        if any(t.is_alive() for t in self._threads) and self.mountpoint is not None:
            rc, err = kmount.unmount(self.mountpoint, lazy=True)
            if rc not in (0, errno.EINVAL, errno.ENOENT):
                log.warning("detaching %s: %s", self.mountpoint, err)
        # Descriptors of threads that ended are ours to close; a thread still blocked in
        # readv keeps its own (the process's exit closes it and ends the connection).
        for t, fd in zip(self._threads, self.fds):
            if not t.is_alive():
                try:
                    os.close(fd)
                except OSError:
                    pass

    # ------------------------------------------------------------ notifications
    def _notify(self, msg: bytes, what: str) -> None:
        if not self.fds or self._done.is_set():
            return
        try:
            os.write(self.fds[0], msg)
        except OSError as exc:
            # ENOENT: the kernel has nothing cached there; ENODEV/EBADF: unmounted
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ENODEV, errno.ENOTCONN):
                log.warning("invalidating %s: %s", what, exc)

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's attributes and cached data of ``ino``."""
        self._notify(proto.notify_inval_inode(ino, 0, 0), f"inode {ino}")

    def invalidate_entry(self, parent: int, name: bytes, deleted: int = 0) -> None:
        """Drop the kernel's dentry ``parent``/``name``; with ``deleted`` (the inode the
        name pointed to) also tell it that inode is gone (as pyfuse3.invalidate_entry)."""
        if deleted:
            self._notify(proto.notify_delete(parent, deleted, name), f"entry {name!r}")
        else:
            self._notify(proto.notify_inval_entry(parent, name), f"entry {name!r}")

    # ------------------------------------------------------------ the loop
    def _serve(self, fd: int) -> None:
        try:
            self._loop(fd)
        except BaseException:
            log.exception("FUSE reader thread %s failed", threading.current_thread().name)
        finally:
            with self._count_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._done.set()

    def _loop(self, fd: int) -> None:
        # Hot path: locals only; READ and WRITE inline, everything else through _ops.
        fs = self.fs
        lock = self.lock
        fs_read, fs_write = fs.read, fs.write
        buf = bytearray(self.bufsize)
        mv = memoryview(buf)
        bufs = [buf]
        hdr = bytearray(proto.OUT_HEADER.size)
        wout = bytearray(proto.OUT_HEADER.size + proto.WRITE_OUT.size)
        pack_hdr = proto.OUT_HEADER.pack_into
        pack_wout = proto.WRITE_OUT.pack_into
        unpack_head = proto.IN_HEADER.unpack_from
        unpack_rw = proto.RW_IN.unpack_from
        readv, writev, write = os.readv, os.writev, os.write
        READ, WRITE = proto.READ, proto.WRITE
        HDR = proto.IN_HEADER.size
        DATA = proto.WRITE_DATA_OFFSET
        FUSEError = pyfuse3.FUSEError
        ops = self._ops
        while True:
            try:
                n = readv(fd, bufs)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:  # unmounted: the connection is gone
                    return
                raise
            _length, opcode, unique, nodeid = unpack_head(buf, 0)[:4]
            err = 0
            if opcode == READ:
                fh, off, size = unpack_rw(buf, HDR)[:3]
                with lock:
                    if self._closed:
                        err = errno.EIO
                    else:
                        try:
                            data = _run(fs_read(fh, off, size))
                        except FUSEError as exc:
                            err = exc.errno
                        except _Awaited:
                            log.error("the read handler awaited; the kernel engine cannot serve it")
                            err = errno.EIO
                        except BaseException:
                            log.exception("read of %d bytes at %d", size, off)
                            err = errno.EIO
                if not err:
                    pack_hdr(hdr, 0, 16 + len(data), 0, unique)
                    try:
                        writev(fd, (hdr, data))
                    except OSError as exc:
                        if self._reply_failed(exc):
                            return
                    continue
            elif opcode == WRITE:
                fh, off, size = unpack_rw(buf, HDR)[:3]
                if n != DATA + size:
                    err = errno.EINVAL
                else:
                    with lock:
                        if self._closed:
                            err = errno.EIO
                        else:
                            try:
                                written = _run(fs_write(fh, off, mv[DATA:n]))
                            except FUSEError as exc:
                                err = exc.errno
                            except _Awaited:
                                log.error("the write handler awaited; the kernel engine cannot serve it")
                                err = errno.EIO
                            except BaseException:
                                log.exception("write of %d bytes at %d", size, off)
                                err = errno.EIO
                if not err:
                    pack_hdr(wout, 0, 24, 0, unique)
                    pack_wout(wout, 16, written, 0)
                    try:
                        write(fd, wout)
                    except OSError as exc:
                        if self._reply_failed(exc):
                            return
                    continue
            else:
                op = ops.get(opcode)
                if op is None:
                    err = errno.ENOSYS
                else:
                    body = mv[HDR:n]
                    try:
                        if opcode in self._unlocked:
                            out = op(nodeid, body)
                        else:
                            with lock:
                                if self._closed:
                                    raise FUSEError(errno.EIO)
                                out = op(nodeid, body)
                    except FUSEError as exc:
                        err = exc.errno
                    except _Awaited:
                        log.error("%s: the handler awaited; the kernel engine cannot serve it",
                                  proto.OPCODE_NAMES.get(opcode, opcode))
                        err = errno.EIO
                    except Exception:
                        log.exception("%s request failed", proto.OPCODE_NAMES.get(opcode, opcode))
                        err = errno.EIO
                    if not err:
                        if out is None:  # no reply (FORGET, INTERRUPT...)
                            continue
                        try:
                            writev(fd, (proto.OUT_HEADER.pack(16 + len(out), 0, unique), out))
                        except OSError as exc:
                            if self._reply_failed(exc):
                                return
                        continue
            # an error reply
            pack_hdr(hdr, 0, 16, -err, unique)
            try:
                write(fd, hdr)
            except OSError as exc:
                if self._reply_failed(exc):
                    return

    def _reply_failed(self, exc: OSError) -> bool:
        """A reply could not be written; True if the connection is gone."""
        if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile: nobody waits
            return False
        if exc.errno == errno.ENODEV:
            return True
        log.error("writing a reply to /dev/fuse: %s", exc)
        return False

    # ------------------------------------------------------------ requests
    def _op_noreply(self, nodeid, body):
        return None

    def _op_init(self, nodeid, body):
        init = proto.parse_init(body)
        if init.major < proto.KERNEL_VERSION:
            log.error("the kernel speaks FUSE %d.%d; 7.%d or newer is needed", init.major, init.minor,
                      proto.MIN_MINOR)
            raise pyfuse3.FUSEError(errno.EPROTO)
        if init.major > proto.KERNEL_VERSION:
            # Answer our major only; the kernel sends INIT again with it.
            return proto.encode_init_out(minor=proto.PROTO_MINOR, max_readahead=0, flags=0, max_background=0,
                                         congestion_threshold=0, max_write=0, time_gran=0, max_pages=0)
        minor = min(init.minor, proto.PROTO_MINOR)
        if minor < proto.MIN_MINOR:
            log.error("the kernel speaks FUSE 7.%d; 7.%d or newer is needed", init.minor, proto.MIN_MINOR)
            raise pyfuse3.FUSEError(errno.EPROTO)
        want = (proto.ATOMIC_O_TRUNC  # O_TRUNC reaches open(), which ignores it, as a block device does
                | proto.BIG_WRITES | proto.MAX_PAGES  # requests up to max_write
                | proto.ASYNC_DIO  # several O_DIRECT requests of one aio submitter in flight
                | proto.PARALLEL_DIROPS | proto.DO_READDIRPLUS | proto.AUTO_INVAL_DATA)
        if self.async_read:
            want |= proto.ASYNC_READ
        # never WRITEBACK_CACHE: write(2) must return only after our handler ran (module doc)
        flags = want & init.flags
        self.minor, self.kernel_minor, self.flags = minor, init.minor, flags
        if self.parallel_direct_writes and minor >= 38:
            self._open_flags_extra = proto.FOPEN_PARALLEL_DIRECT_WRITES
        max_pages = self.max_write // 4096
        log.info("FUSE protocol 7.%d (kernel 7.%d), %d reader thread(s), requests up to %d KiB, flags %#x",
                 minor, init.minor, len(self.fds), self.max_write >> 10, flags)
        return proto.encode_init_out(minor=minor, max_readahead=init.max_readahead, flags=flags,
                                     max_background=MAX_BACKGROUND, congestion_threshold=CONGESTION_THRESHOLD,
                                     max_write=self.max_write, time_gran=1, max_pages=max_pages)

    def _op_destroy(self, nodeid, body):
        self.destroyed = True
        return b""

    def _op_lookup(self, nodeid, body):
        name = proto.parse_name(body)
        return proto.encode_entry(_entry(_run(self.fs.lookup(nodeid, name, None))))

    def _op_getattr(self, nodeid, body):
        e = _run(self.fs.getattr(nodeid, None))
        return proto.encode_attr_out(_attr(e), e.attr_timeout)

    def _op_setattr(self, nodeid, body):
        (valid, _pad, fh, size, _lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, _u4,
         uid, gid, _u5) = proto.SETATTR_IN.unpack_from(body, 0)
        attr = _SetattrAttr(size, mode, uid, gid, atime * 10**9 + atimensec, mtime * 10**9 + mtimensec,
                            ctime * 10**9 + ctimensec)
        e = _run(self.fs.setattr(nodeid, attr, _SetattrFields(valid), fh if valid & proto.FATTR_FH else None,
                                 None))
        return proto.encode_attr_out(_attr(e), e.attr_timeout)

    def _open_flags(self, fi) -> int:
        flags = 0
        if fi.direct_io:
            flags |= proto.FOPEN_DIRECT_IO | self._open_flags_extra
        if fi.keep_cache:
            flags |= proto.FOPEN_KEEP_CACHE
        if fi.nonseekable:
            flags |= proto.FOPEN_NONSEEKABLE
        return flags

    def _op_open(self, nodeid, body):
        flags, _open_flags = proto.OPEN_IN.unpack_from(body, 0)
        fi = _run(self.fs.open(nodeid, flags, None))
        return proto.encode_open_out(fi.fh, self._open_flags(fi))

    def _op_create(self, nodeid, body):
        flags, mode, _umask, _oflags = proto.CREATE_IN.unpack_from(body, 0)
        name = proto.parse_name(body, proto.CREATE_IN.size)
        fi, e = _run(self.fs.create(nodeid, name, mode, flags, None))
        return proto.encode_entry(_entry(e)) + proto.encode_open_out(fi.fh, self._open_flags(fi))

    def _op_flush(self, nodeid, body):
        fh = proto.FLUSH_IN.unpack_from(body, 0)[0]
        _run(self.fs.flush(fh))
        return b""

    def _op_fsync(self, nodeid, body):
        fh, fsync_flags, _pad = proto.FSYNC_IN.unpack_from(body, 0)
        _run(self.fs.fsync(fh, bool(fsync_flags & proto.FSYNC_FDATASYNC)))
        return b""

    def _op_syncfs(self, nodeid, body):
        # syncfs(2)/sync(1) on the mount: make the image durable, as fsync on the disk does
        _run(self.fs.fsync(DISK_INO, False))
        return b""

    def _op_release(self, nodeid, body):
        fh = proto.RELEASE_IN.unpack_from(body, 0)[0]
        _run(self.fs.release(fh))
        return b""

    def _op_opendir(self, nodeid, body):
        fh = _run(self.fs.opendir(nodeid, None))
        return proto.encode_open_out(fh, 0)

    def _op_releasedir(self, nodeid, body):
        fh = proto.RELEASE_IN.unpack_from(body, 0)[0]
        _run(self.fs.releasedir(fh))
        return b""

    def _dir_entries(self, ino: int) -> list[bytes]:
        """The names VdiskFS.readdir lists, in its order (pyfuse3's readdir takes a
        pyfuse3 token, so the listing is made here from the same tree)."""
        if ino == ROOT_INO:
            return [DISK_NAME, SNAPDIR_NAME]
        if ino == SNAPDIR_INO:
            return sorted(self.fs.snap_entry_names())
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _readdir(self, body, plus: bool) -> bytes:
        fh, off, size = proto.RW_IN.unpack_from(body, 0)[:3]
        names = self._dir_entries(fh)
        out = []
        used = 0
        for i in range(off, len(names)):
            name = names[i]
            try:
                e = _entry(_run(self.fs.lookup(fh, name, None)))
            except pyfuse3.FUSEError:
                continue  # gone meanwhile
            dtype = proto.dtype_of(e.attr.mode)
            rec = proto.encode_direntplus(e, i + 1, name, dtype) if plus else \
                proto.encode_dirent(e.attr.ino, i + 1, name, dtype)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _op_readdir(self, nodeid, body):
        return self._readdir(body, plus=False)

    def _op_readdirplus(self, nodeid, body):
        return self._readdir(body, plus=True)

    def _op_statfs(self, nodeid, body):
        s = _run(self.fs.statfs(None))
        return proto.encode_statfs(blocks=s.f_blocks, bfree=s.f_bfree, bavail=s.f_bavail, files=s.f_files,
                                   ffree=s.f_ffree, bsize=s.f_bsize, namelen=s.f_namemax, frsize=s.f_frsize)

    def _op_getxattr(self, nodeid, body):
        size = proto.GETXATTR_IN.unpack_from(body, 0)[0]
        name = proto.parse_name(body, proto.GETXATTR_IN.size)
        value = _run(self.fs.getxattr(nodeid, name, None))
        return self._sized(bytes(value), size)

    def _op_listxattr(self, nodeid, body):
        size = proto.GETXATTR_IN.unpack_from(body, 0)[0]
        names = _run(self.fs.listxattr(nodeid, None))
        return self._sized(b"".join(bytes(n) + b"\0" for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:  # the caller asks how large a buffer it needs
            return proto.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise pyfuse3.FUSEError(errno.ERANGE)
        return value

    def _op_access(self, nodeid, body):
        # default_permissions: the kernel checks the modes itself and never asks
        return b""

    def _op_fallocate(self, nodeid, body):
        fh, off, length, mode, _pad = proto.FALLOCATE_IN.unpack_from(body, 0)
        fallocate(self.fs, fh, off, length, mode)
        return b""
