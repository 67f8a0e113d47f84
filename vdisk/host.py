"""Host storage: the bottom layer.  A local file with pread/pwrite/fsync/punch-hole.

Everything above talks to a :class:`HostStorage`; tests substitute recording or
fault-injecting implementations (see ``tests/crash``).  Errors from the operating
system become :class:`~vdisk.errors.HostIOError` naming the file and the operation.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from .errors import HostIOError, ImageExists, ImageLocked, ImageNotFound, VdiskError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# The C library is already loaded into the process: no need to search for it
# (ctypes.util.find_library runs ldconfig, 10 ms on every command).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

# Open file description locks (Linux >= 3.15): owned by the open file, not the
# process, so two opens in one process conflict like two processes do, and the
# kernel drops them when the descriptor closes or the process dies (no stale locks).
_F_OFD_SETLK = 37


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

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` back to back from ``offset`` (one system call where possible)."""
        self.pwrite(offset, b"".join(buffers))

    def flush(self) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise NotImplementedError

    def punch_hole(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def allocated_bytes(self) -> int:
        return self.size()

    def close(self) -> None:
        pass


def _oserror(name: str, what: str, exc: OSError) -> VdiskError:
    if exc.errno == errno.ENOENT:
        return ImageNotFound(f"{name}: no such file")
    return HostIOError(f"{name}: {what} failed: {os.strerror(exc.errno or 0)}", exc.errno)


class HostFile(HostStorage):
    """A regular file (or block device) on the local machine."""

    def __init__(self, path: str, *, read_only: bool = False, create: bool = False, lock: str | None = "auto",
                 sync: bool = True):
        """``sync`` False makes ``flush`` a no-op (``cache=unsafe``: for scratch files such as
        a convert's destination before its rename; a crash may then lose anything).
        ``lock``: "write" (one writer), "read" (readers of the live state, excluded by a
        writer), "snapshot" (readers of an immutable snapshot: they coexist with a
        writer), None (no lock), or "auto": "read" when read_only, else "write"."""
        self.name = path
        self.read_only = read_only
        self.sync = sync
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
        if lock == "auto":
            lock = "read" if read_only else "write"
        if lock:
            try:
                self._lock(lock)
            except BaseException:
                os.close(self.fd)
                raise

    def _lock(self, mode: str) -> None:
        # Byte 0 guards the live state: a writer locks it exclusively, live readers
        # share it.  Byte 1 is shared by readers of snapshots, which never change, so
        # they do not conflict with the writer.  Locks sit on bytes, not data: the
        # file's contents are untouched.
        l_type = fcntl.F_WRLCK if mode == "write" else fcntl.F_RDLCK
        start = 1 if mode == "snapshot" else 0
        write = mode == "write"
        # struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
        arg = struct.pack("hhqqi4x", l_type, os.SEEK_SET, start, 1, 0)
        try:
            fcntl.fcntl(self.fd, _F_OFD_SETLK, arg)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                if write:
                    hint = "close it there first"
                else:
                    hint = "-U/--force-share reads it anyway (the result may be stale)"
                raise ImageLocked(
                    f"{self.name}: image is in use by another process "
                    f"(it is being {'used' if write else 'written'}); {hint}"
                ) from None
            raise _oserror(self.name, "lock", exc) from None

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
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise _oserror(self.name, f"write of {len(data)} bytes at {offset}", exc) from None

    def pwritev(self, offset: int, buffers: list) -> None:
        total = sum(len(b) for b in buffers)
        try:
            n = os.pwritev(self.fd, buffers, offset)
        except OSError as exc:
            raise _oserror(self.name, f"write of {total} bytes at {offset}", exc) from None
        if n < total:  # short write: finish the rest the simple way
            self.pwrite(offset + n, memoryview(b"".join(buffers))[n:])

    def flush(self) -> None:
        if not self.sync:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise _oserror(self.name, "flush", exc) from None

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
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _oserror(self.name, f"truncate to {size}", exc) from None

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        rc = _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if rc != 0:
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
