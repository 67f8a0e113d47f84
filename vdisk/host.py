"""Host storage: the bottom layer.  A local file with pread/pwrite/fsync/punch-hole.

Everything above talks to a :class:`HostStorage`; tests substitute recording or
fault-injecting implementations (see ``tests/crash``).  Errors from the operating
system become :class:`~vdisk.errors.HostIOError` naming the file and the operation.

Flush failures are final (as PostgreSQL decided in 2018, and QEMU's file driver does):
when ``fdatasync`` fails, Linux may already have dropped the dirty pages it could not
write, or marked them clean, so a retried flush can succeed without the data ever
reaching the disk.  A storage whose flush failed therefore refuses every later
``pwrite``/``pwritev``/``punch_hole``/``truncate``/``flush`` with a
:class:`~vdisk.errors.HostIOError` saying the image must be reopened and naming the
original error; reads still work.  Reopening re-reads what is really on the disk.
:class:`HostFile` applies this rule itself; :class:`FailStopStorage` applies it to any
other storage.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import HostIOError, ImageExists, ImageLocked, ImageNotFound, VdiskError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 2
_libc_loaded = None


def libc():
    """The C library's ``fallocate`` and ``sync_file_range`` (not in :mod:`os`), loaded
    at first use: importing ctypes costs every command 2 ms.  The library is already
    in the process, so there is nothing to search for (ctypes.util.find_library runs
    ldconfig, 10 ms)."""
    global _libc_loaded
    if _libc_loaded is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _libc_loaded = lib
    return _libc_loaded

# Open file description locks (Linux >= 3.15): owned by the open file, not the
# process, so two opens in one process conflict like two processes do, and the
# kernel drops them when the descriptor closes or the process dies (no stale locks).
_F_OFD_GETLK = 36
_F_OFD_SETLK = 37

# QEMU's image locking (block/file-posix.c), which vdisk speaks so that both refuse
# each other as they refuse themselves.  One byte per block-layer permission:
# byte PERM_BASE + bit is locked (shared) by a user that holds the permission, byte
# SHARED_BASE + bit by a user that does not let others hold it.  Bits as QEMU's
# BLK_PERM_* (QEMU >= 6.2 has these four; bit 4, "graph-mod", is gone).
_PERM_BASE = 100
_SHARED_BASE = 200
_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED, _RESIZE = 0, 1, 2, 3
_PERM_NAMES = {_CONSISTENT_READ: "consistent read", _WRITE: "write", _WRITE_UNCHANGED: "write unchanged",
               _RESIZE: "resize"}
#: lock mode -> (permissions held, permissions not shared with others)
_LOCK_PERMS = {
    # qemu-img/qemu-storage-daemon/QEMU with a writable image (a format node's file)
    "write": ((_CONSISTENT_READ, _WRITE, _RESIZE), (_WRITE, _RESIZE)),
    # qemu-img info/convert without -U, a read-only backing file
    "read": ((_CONSISTENT_READ,), (_WRITE, _RESIZE)),
    # qemu-img -U (force-share): reads, lets anyone do anything
    "shared": ((_CONSISTENT_READ,), ()),
    # a reader of an immutable internal snapshot: as -U (see HostFile)
    "snapshot": ((_CONSISTENT_READ,), ()),
}


class HostStorage:
    """What the drivers need from the place an image lives.

    Contracts:
    - ``pread`` returns exactly ``length`` bytes; bytes past the end of the storage read as zeros.
    - ``pwrite`` writes all of ``data`` or raises; it is not durable until ``flush`` returns.
    - ``flush`` makes every completed ``pwrite``/``punch_hole``/``truncate`` durable.
    - ``punch_hole`` deallocates a range; it then reads as zeros.  It may be a no-op
      for storage that cannot punch, except that the range must then read as zeros
      only if ``punch_hole_zeroes`` is true.
    """

    name: str = "<storage>"
    read_only: bool = True
    #: why changes are refused: the error of a failed flush (see the module); None while usable
    flush_failed: HostIOError | None = None

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` back to back from ``offset`` (one system call where possible)."""
        self.pwrite(offset, b"".join(buffers))

    def flush(self) -> None:
        raise NotImplementedError

    def start_writeback(self) -> None:
        """Ask the OS to start writing what was written so far to the device, without
        waiting and without any promise (``flush`` is the promise): a bulk writer that
        flushes at its end calls it as it goes, so the device works while it copies.
        Default: nothing."""

    def size(self) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise NotImplementedError

    def punch_hole(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def allocated_bytes(self) -> int:
        return self.size()

    def allocate(self, offset: int, length: int) -> None:
        """Reserve host space for the range (posix_fallocate; the file grows to cover
        it) so later writes there cannot fail for lack of space.  Fallback: write zeros."""
        end = offset + length
        pos = offset
        while pos < end:
            n = min(end - pos, 1 << 20)
            self.pwrite(pos, bytes(n))
            pos += n

    def close(self) -> None:
        pass


def _refused_after_failed_flush(storage: HostStorage, what: str) -> HostIOError:
    cause = storage.flush_failed
    text = cause.message
    if text.startswith(storage.name + ": "):
        text = text[len(storage.name) + 2:]
    return HostIOError(f"{storage.name}: {what} refused: an earlier flush failed ({text}), so data written before "
                       "it may never reach the disk; the image must be reopened", cause.errno)


class FailStopStorage(HostStorage):
    """Wraps any :class:`HostStorage` and applies the flush-failure rule of the module
    (which :class:`HostFile` applies itself): after ``inner.flush`` raised once,
    changes and flushes are refused; reads go on."""

    def __init__(self, inner: HostStorage):
        self.inner = inner
        self.name = inner.name
        self.read_only = inner.read_only
        self.flush_failed = None

    def _check(self, what: str) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, what)

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data) -> None:
        self._check("write")
        self.inner.pwrite(offset, data)

    def pwritev(self, offset: int, buffers: list) -> None:
        self._check("write")
        self.inner.pwritev(offset, buffers)

    def start_writeback(self) -> None:
        self.inner.start_writeback()

    def flush(self) -> None:
        self._check("flush")
        try:
            self.inner.flush()
        except HostIOError as exc:
            self.flush_failed = exc
            raise

    def size(self) -> int:
        return self.inner.size()

    def truncate(self, size: int) -> None:
        self._check("truncate")
        self.inner.truncate(size)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check("punch hole")
        self.inner.punch_hole(offset, length)

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes()

    def close(self) -> None:
        self.inner.close()


def _oserror(name: str, what: str, exc: OSError) -> VdiskError:
    if exc.errno == errno.ENOENT:
        return ImageNotFound(f"{name}: no such file")
    return HostIOError(f"{name}: {what} failed: {os.strerror(exc.errno or 0)}", exc.errno)


class HostFile(HostStorage):
    """A regular file (or block device) on the local machine.

    Locking: the OFD byte-range locks QEMU takes on image files (``_LOCK_PERMS``), so
    vdisk and qemu-img/qemu-io/qemu-storage-daemon/QEMU exclude each other exactly as
    each excludes itself.  A mode is a set of permissions held (each a shared lock on
    byte 100 + bit) and a set not shared with others (byte 200 + bit); opening then
    tests that nobody else holds a permission we do not share (bytes 100 + bit) and
    that nobody refuses to share one we hold (bytes 200 + bit), and fails with
    :class:`ImageLocked` otherwise.  Two vdisk opens conflict through the same bytes
    (OFD locks belong to the open file, so also within one process).

    - ``"write"``: consistent read + write + resize, sharing neither write nor resize
      (what a writable ``qemu-img``/``qemu-storage-daemon`` takes): one writer at a
      time, and no writer while anyone reads without force-share.
    - ``"read"``: consistent read, not sharing write or resize (``qemu-img info``
      without ``-U``; QEMU's read-only backing files): readers share, writers are refused.
    - ``"shared"``: consistent read, sharing everything (``-U``/force-share): it
      excludes nobody, and is excluded only by a user that declares the file's content
      inconsistent (QEMU does for some block-job targets).
    - ``"snapshot"``: a reader of an internal snapshot, which never changes while it
      exists (vdisk's writers never rewrite a snapshot's clusters): it must coexist
      with the writer, so it may neither hold write/resize nor unshare them -- in QEMU's
      terms it is a ``-U`` reader (as ``qemu-img convert -U -l SNAP`` on a live image),
      the same bytes as ``"shared"``.  It therefore blocks nothing QEMU needs either.
      Nothing in the lock bytes stops a writer from deleting the snapshot under it
      (QEMU's ``-U`` readers have the same exposure): that is the snapshot layer's
      business (holders of linked clones; a mount closes its views first).
    - ``None``: no lock; ``"auto"``: ``"read"`` when read-only, else ``"write"``.

    Bytes 0 and 1 (vdisk's former private bytes) are no longer used: QEMU's bytes
    express all of vdisk's rules, and QEMU leaves byte 0 to libvirt.
    """

    def __init__(self, path: str, *, read_only: bool = False, create: bool = False, lock: str | None = "auto",
                 sync: bool = True):
        """``sync`` False makes ``flush`` a no-op (``cache=unsafe``: for scratch files such as
        a convert's destination before its rename; a crash may then lose anything).
        ``lock``: "write", "read", "shared", "snapshot", None or "auto" (see the class)."""
        self.name = path
        self.read_only = read_only
        self.sync = sync
        self.flush_failed = None
        if lock == "auto":
            lock = "read" if read_only else "write"
        if lock is not None and lock not in _LOCK_PERMS:
            raise ValueError(f"unknown lock mode {lock!r}")
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags, 0o644)
        except FileExistsError:
            raise ImageExists(f"{path}: file exists already") from None
        except IsADirectoryError:
            raise VdiskError(f"{path}: is a directory, not an image file") from None
        except PermissionError:
            raise HostIOError(f"{path}: permission denied", errno.EACCES) from None
        except OSError as exc:
            raise _oserror(path, "open", exc) from None
        if lock:
            try:
                self._lock(lock)
            except BaseException:
                os.close(self.fd)  # drops the bytes locked so far
                raise

    def _flock(self, cmd: int, l_type: int, start: int, length: int = 1) -> int:
        # struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
        arg = struct.pack("hhqqi4x", l_type, os.SEEK_SET, start, length, 0)
        got = fcntl.fcntl(self.fd, cmd, arg)
        return struct.unpack("hhqqi4x", got)[0]

    def _lock(self, mode: str) -> None:
        """Take ``mode``'s bytes, then test the other side's (as QEMU does: lock first,
        so that of two racing opens at least one sees the other).  The file's
        contents are untouched: locks sit on byte numbers, not data."""
        held, unshared = _LOCK_PERMS[mode]
        try:
            for bit in held:
                self._flock(_F_OFD_SETLK, fcntl.F_RDLCK, _PERM_BASE + bit)
            for bit in unshared:
                self._flock(_F_OFD_SETLK, fcntl.F_RDLCK, _SHARED_BASE + bit)
            # Somebody holds a permission we do not share (a writer, for write/resize)...
            for bit in unshared:
                if self._flock(_F_OFD_GETLK, fcntl.F_WRLCK, _PERM_BASE + bit) != fcntl.F_UNLCK:
                    raise self._locked(mode, bit, holder=True)
            # ...or refuses to share one we hold (a writer or a reader without -U).
            for bit in held:
                if self._flock(_F_OFD_GETLK, fcntl.F_WRLCK, _SHARED_BASE + bit) != fcntl.F_UNLCK:
                    raise self._locked(mode, bit, holder=False)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):  # an exclusive lock on one of our bytes
                raise ImageLocked(f"{self.name}: image is in use by another process (it holds an exclusive "
                                  f"lock on the QEMU lock bytes); close it there first") from None
            raise _oserror(self.name, "lock", exc) from None

    def _locked(self, mode: str, bit: int, holder: bool) -> ImageLocked:
        perm = _PERM_NAMES[bit]
        if holder:
            what = f'it is being written: another process holds the "{perm}" permission'
        elif bit == _CONSISTENT_READ:
            what = 'another process declares its content inconsistent (it does not share "consistent read")'
        else:
            what = f'it is being read or written by a process that does not share "{perm}"'
        option_hint = None
        if mode == "write":
            hint = "close it there first"
        elif bit == _CONSISTENT_READ:
            hint = "try again when it is done"
        else:
            hint = "try again when the writer is done"
            option_hint = ("force_share", "or read it anyway with -U/--force-share (the result may be stale)")
        return ImageLocked(f"{self.name}: image is in use by another process ({what}); {hint}",
                           option_hint=option_hint)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise _oserror(self.name, f"read of {length} bytes at {offset}", exc) from None
        if len(data) < length:
            # A short read is the end of the file (or a racing truncate): zeros follow.
            more = b""
            while len(data) + len(more) < length:
                chunk = os.pread(self.fd, length - len(data) - len(more), offset + len(data) + len(more))
                if not chunk:
                    break
                more += chunk
            data = data + more + bytes(length - len(data) - len(more))
        return data

    def pwrite(self, offset: int, data) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "write")
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise _oserror(self.name, f"write of {len(data)} bytes at {offset}", exc) from None

    def pwritev(self, offset: int, buffers: list) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "write")
        total = sum(len(b) for b in buffers)
        try:
            n = os.pwritev(self.fd, buffers, offset)
        except OSError as exc:
            raise _oserror(self.name, f"write of {total} bytes at {offset}", exc) from None
        if n < total:  # short write: finish the rest the simple way
            self.pwrite(offset + n, memoryview(b"".join(buffers))[n:])

    def start_writeback(self) -> None:
        """sync_file_range(SYNC_FILE_RANGE_WRITE) over the whole file: the kernel starts
        writing its dirty pages back and returns.  A hint: its errors are ignored (a
        failed write-back shows at the next ``flush``, which fdatasync reports)."""
        if self.sync and self.flush_failed is None:
            libc().sync_file_range(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        """fdatasync; if it fails, the file refuses changes from then on (see the module)."""
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "flush")
        if not self.sync:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            err = _oserror(self.name, "flush", exc)
            if isinstance(err, HostIOError):
                self.flush_failed = err
            raise err from None

    def size(self) -> int:
        try:
            st = os.fstat(self.fd)
            if st.st_size == 0 and not os.path.isfile(self.name):
                # Block devices report size 0 in st_size; ask the device.
                return os.lseek(self.fd, 0, os.SEEK_END)
            return st.st_size
        except OSError as exc:
            raise _oserror(self.name, "stat", exc) from None

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "truncate")
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _oserror(self.name, f"truncate to {size}", exc) from None

    def allocate(self, offset: int, length: int) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "allocate")
        if length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                HostStorage.allocate(self, offset, length)
                return
            raise _oserror(self.name, f"allocate {offset}+{length}", exc) from None

    def punch_hole(self, offset: int, length: int) -> None:
        if self.flush_failed is not None:
            raise _refused_after_failed_flush(self, "punch hole")
        if length <= 0:
            return
        rc = libc().fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
            import ctypes

            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                # No hole punching here: write zeros instead so the contract holds.
                end = min(offset + length, self.size())
                pos = offset
                while pos < end:
                    n = min(end - pos, 1 << 20)
                    self.pwrite(pos, bytes(n))
                    pos += n
                return
            raise HostIOError(f"{self.name}: punch hole at {offset}+{length} failed: {os.strerror(err)}", err)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
