"""The FUSE file system: an export of one opened image (like QEMU's block/export/fuse.c).

Tree::

    /                 (ROOT_INODE)  xattrs user.vdisk.{pid,image,log,socket} for `vdisk umount`
    /disk             (DISK_INO)    the image's current state, rw unless the mount is read-only
    /snapshots/       (SNAPDIR_INO)
    /snapshots/NAME   (>= FIRST_SNAP_INO) one per internal snapshot, read-only, opened lazily

Concurrency rules (what may interleave at an ``await``)
--------------------------------------------------------
pyfuse3 runs each request handler as a trio coroutine.  The data-path handlers here
(read, write, fsync) never ``await``: every call into the image runs to completion
inside one step of the trio loop.  Control requests (snapshot create/delete, flush;
see :mod:`vdisk.export.fuse.control`) run in another trio task but also call the image
without awaiting.  Hence:

* the image and its driver are only ever used from the trio thread, one call at a
  time: drivers need not be thread-safe;
* a write whose reply reached the kernel is in the image before any later control
  request starts, so a snapshot contains every write acknowledged before it was
  asked for (without writeback caching, write(2) returns only after our reply);
* the only awaits are in control tasks *after* an image operation, to invalidate
  kernel caches from a worker thread (pyfuse3.invalidate_* may block until related
  requests finish, which needs the trio loop to keep serving).

Error rules: only ``pyfuse3.FUSEError`` leaves a handler (pyfuse3 lets any other
exception kill its worker task, after which the kernel side hangs).  VdiskError on
the data path -> EIO (ENOSPC for a full host), logged with the guest offset;
ChecksumMismatch -> EIO for that request only; any other CorruptImage, or a failed
flush of the image (vdisk/host.py: final until reopened) -> the mount turns
read-only (EROFS for writes from then on), logged once with the reason;
anything unexpected -> EIO and a traceback in the log.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Callable

import pyfuse3

import vdisk
from vdisk.drivers.base import SnapshotInfo
from vdisk.errors import (
    ChecksumMismatch,
    CorruptImage,
    HostIOError,
    SnapshotNotFound,
    UsageError,
    VdiskError,
)

log = logging.getLogger("vdisk.export.fuse")

ROOT_INO = pyfuse3.ROOT_INODE
DISK_INO = ROOT_INO + 1
SNAPDIR_INO = ROOT_INO + 2
FIRST_SNAP_INO = 16

DISK_NAME = b"disk"
SNAPDIR_NAME = b"snapshots"
# Long timeouts: nothing but this daemon changes what it serves, and it invalidates
# the kernel's caches itself when it does (snapshot create/delete, resize, revert).
TIMEOUT = 3600.0

XATTR_PREFIX = b"user.vdisk."

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _fuse_error(err: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(err)


def _guarded(fn: Callable) -> Callable:
    """For handlers off the data path: turn anything but FUSEError into EIO + traceback."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except VdiskError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s: unexpected error", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def open_snapshot_view(image: vdisk.Image, name: str) -> vdisk.Image:
    """Open snapshot ``name`` of the (already opened) ``image``, read-only.

    Readers of a snapshot lock a byte of the image file apart from the one the
    writer locks (see ``vdisk.host.HostFile``), so this works under the mount's own
    write lock.  It is safe because a snapshot's clusters are never rewritten while
    the snapshot exists, and the view is closed before the snapshot is deleted (see
    ``VdiskFS.snapshot_delete``)."""
    return vdisk.open(image.filename, format=image.format, snapshot=name)


class _Snap:
    __slots__ = ("name", "bname", "ino", "size", "created", "image", "opens")

    def __init__(self, name: str, ino: int, size: int, created: float):
        self.name = name
        self.bname = os.fsencode(name)
        self.ino = ino
        self.size = size
        self.created = created
        self.image: vdisk.Image | None = None
        self.opens = 0


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


class VdiskFS(pyfuse3.Operations):
    """pyfuse3 operations serving one opened :class:`vdisk.Image`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        image: vdisk.Image,
        *,
        read_only: bool | None = None,
        direct_io: bool = True,
        xattrs: dict[str, str] | None = None,
    ):
        super().__init__()
        self.image = image
        self.read_only = image.read_only if read_only is None else (read_only or image.read_only)
        #: why the mount turned read-only after a CorruptImage (None while healthy)
        self.failed: str | None = None
        #: an inactive mount (vdisk/export/fuse/activation.py) serves a read-only,
        #: lock-free view and refuses writes until it is activated
        self.inactive = False
        self.direct_io = direct_io
        self.xattrs = {XATTR_PREFIX + k.encode(): v.encode() for k, v in (xattrs or {}).items()}
        self.disk_size = image.size
        self.disk_opens = 0
        st = vdisk.block.host_stat(image.filename)  # the file, or an image's pool directory
        self._uid, self._gid = st.st_uid, st.st_gid
        # The disk is as readable as the image file (the mount uses allow_other as root).
        self._perm = stat.S_IMODE(st.st_mode) & 0o666
        self._mtime_ns = st.st_mtime_ns
        self._snaps: dict[bytes, _Snap] = {}
        self._snap_by_ino: dict[int, _Snap] = {}
        self._next_ino = FIRST_SNAP_INO
        #: fh -> Image for data requests; fh is the inode number
        self._fh_image: dict[int, vdisk.Image] = {DISK_INO: image}
        self.reload_snapshots()

    # ------------------------------------------------------------ snapshot table
    def reload_snapshots(self) -> None:
        """Sync the snapshot directory with the image's snapshot table.  Inodes of
        snapshots that still exist are kept; new ones get fresh, never reused inodes."""
        infos = {i.name: i for i in self.image.snapshot_list() if _valid_name(i.name)}
        for bname, snap in list(self._snaps.items()):
            info = infos.get(snap.name)
            if info is None or info.created != snap.created:
                self._drop_snap(snap)
        for name, info in infos.items():
            bname = os.fsencode(name)
            if bname not in self._snaps:
                snap = _Snap(name, self._next_ino, info.size, info.created)
                self._next_ino += 1
                self._snaps[bname] = snap
                self._snap_by_ino[snap.ino] = snap

    def _drop_snap(self, snap: _Snap) -> None:
        self._snaps.pop(snap.bname, None)
        self._snap_by_ino.pop(snap.ino, None)
        self._fh_image.pop(snap.ino, None)
        if snap.image is not None:
            img, snap.image = snap.image, None
            try:
                img.close()
            except Exception:
                log.exception("closing the view of snapshot %s", snap.name)

    def snapshot_names(self) -> list[str]:
        return [s.name for s in self._snaps.values()]

    def snapshot_create(self, name: str) -> SnapshotInfo:
        """Take a snapshot now.  Called from the trio thread between requests, so it
        holds every write acknowledged before (see the module's concurrency rules)."""
        self._writable_or_raise()
        info = self.image.snapshot_create(name)
        # Make it durable and visible to a second handle (the snapshot views).
        self.image.flush()
        self.reload_snapshots()
        return info

    def snapshot_delete(self, name: str) -> None:
        self._writable_or_raise()
        snap = self._snaps.get(os.fsencode(name))
        if snap is not None and snap.opens:
            raise UsageError(
                f"snapshot {name!r} is in use through the mount (snapshots/{name} is open {snap.opens} time(s)); "
                "close it (detach the loop device) first"
            )
        if snap is not None:
            self._drop_snap(snap)
        self.image.snapshot_delete(name)
        self.image.flush()
        self.reload_snapshots()

    def snapshot_hold(self, name: str, delta: int, holder=None) -> SnapshotInfo:
        """Record (or drop) a linked clone's hold on a snapshot (``holder``: a
        :class:`vdisk.drivers.base.Holder`); a hidden snapshot whose last hold goes is
        freed, so the listing is reloaded."""
        self._writable_or_raise()
        info = self.image.snapshot_hold(name, delta, holder)
        self.image.flush()
        self.reload_snapshots()
        return info

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        """Rename a snapshot; its view under snapshots/ takes the new name."""
        self._writable_or_raise()
        snap = self._snaps.get(os.fsencode(name))
        if snap is not None and snap.opens:
            raise UsageError(f"cannot rename snapshot {name!r} while it is open through the mount")
        if snap is not None:
            self._drop_snap(snap)
        info = self.image.snapshot_rename(name, new_name)
        self.image.flush()
        self.reload_snapshots()
        return info

    def snapshot_revert(self, name: str) -> None:
        self._writable_or_raise()
        if self.disk_opens:
            raise UsageError(f"cannot revert to {name!r} while the disk is open through the mount ({self.disk_opens} open)")
        self.image.snapshot_revert(name)
        self.image.flush()
        self.disk_size = self.image.size
        self.reload_snapshots()

    def swap_image(self, image: vdisk.Image, *, inactive: bool) -> vdisk.Image:
        """Serve ``image`` from now on (as an inactive mount if ``inactive``) and
        return the image served until now, for the caller to close.  Called under
        the engine's lock.  Refused while a snapshot file is open: its view reads
        through the old handle."""
        if image.size != self.disk_size:
            raise UsageError(f"{image.filename}: its size changed ({self.disk_size} -> {image.size} bytes) "
                             "while the mount served it")
        busy = [s.name for s in self._snaps.values() if s.opens]
        if busy:
            raise UsageError(f"snapshot {busy[0]!r} is open through the mount; close it first")
        for snap in list(self._snaps.values()):
            self._drop_snap(snap)
        old, self.image = self.image, image
        self._fh_image[DISK_INO] = image
        self.inactive = inactive
        self.reload_snapshots()
        return old

    def _writable_or_raise(self) -> None:
        if self.inactive:
            raise UsageError("the mount is inactive: run `vdisk activate` on it first")
        if self.failed is not None:
            raise CorruptImage(f"the mount turned read-only after an error: {self.failed}")
        if self.read_only:
            raise UsageError("the image is mounted read-only")

    def snap_entry_names(self) -> list[bytes]:
        return list(self._snaps)

    # ------------------------------------------------------------ errors
    def _data_error(self, exc: BaseException, what: str, fh: int, off: int, length: int) -> pyfuse3.FUSEError:
        """Log a data-path failure and pick the errno for it."""
        where = "disk" if fh == DISK_INO else f"snapshot {self._snap_name(fh)}"
        if isinstance(exc, ChecksumMismatch):
            log.error("%s of %d bytes at guest offset %d (%s): checksum mismatch at guest offset %d: %s",
                      what, length, off, where, exc.guest_offset, exc)
            return _fuse_error(errno.EIO)
        if isinstance(exc, CorruptImage):
            log.error("%s of %d bytes at guest offset %d (%s): %s", what, length, off, where, exc)
            self.fail(str(exc))
            return _fuse_error(errno.EIO)
        if isinstance(exc, HostIOError) and getattr(getattr(self.image.driver, "host", None), "flush_failed", None):
            # a failed flush is final (vdisk/host.py): what it should have written may be gone
            log.error("%s of %d bytes at guest offset %d (%s): %s", what, length, off, where, exc)
            self.fail(f"a flush of the image failed ({exc}); remount to go on")
            return _fuse_error(errno.EIO)
        if isinstance(exc, HostIOError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("%s of %d bytes at guest offset %d (%s): %s", what, length, off, where, exc)
            return _fuse_error(errno.ENOSPC)
        if isinstance(exc, VdiskError):
            log.error("%s of %d bytes at guest offset %d (%s): %s", what, length, off, where, exc)
            return _fuse_error(errno.EIO)
        log.error("%s of %d bytes at guest offset %d (%s): unexpected error", what, length, off, where,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return _fuse_error(errno.EIO)

    def fail(self, reason: str) -> None:
        """Turn the mount read-only after metadata corruption or a failed flush (s3ql's failsafe)."""
        if self.failed is None:
            self.failed = reason
            log.error("image %s: the mount is read-only from now on: %s", self.image.filename, reason)

    def _snap_name(self, ino: int) -> str:
        snap = self._snap_by_ino.get(ino)
        return snap.name if snap is not None else f"#{ino}"

    # ------------------------------------------------------------ data path
    async def read(self, fh, off, size):
        img = self._fh_image.get(fh)
        if img is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        end = img.size
        if off + size > end:
            if off >= end:
                return b""
            size = end - off
        try:
            return img.read(off, size)
        except Exception as exc:
            raise self._data_error(exc, "read", fh, off, size) from None

    async def write(self, fh, off, buf):
        if fh != DISK_INO or self.read_only or self.failed is not None or self.inactive:
            raise pyfuse3.FUSEError(errno.EROFS if fh == DISK_INO else errno.EBADF)
        n = len(buf)
        end = self.disk_size
        if off + n > end:
            if off >= end:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            n = end - off
            buf = memoryview(buf)[:n].tobytes()
        try:
            self.image.write(off, buf)
        except Exception as exc:
            raise self._data_error(exc, "write", fh, off, n) from None
        return n

    async def fsync(self, fh, datasync):
        if fh != DISK_INO or self.read_only or self.inactive:
            return
        try:
            self.image.flush()
        except Exception as exc:
            raise self._data_error(exc, "flush", fh, 0, 0) from None

    async def flush(self, fh):
        # close(2): nothing to do; durability is fsync's job (as for a block device).
        return

    # ------------------------------------------------------------ attributes
    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_uid = self._uid
        e.st_gid = self._gid
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self._mtime_ns
        e.st_blksize = 65536
        if ino == ROOT_INO:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 3
        elif ino == SNAPDIR_INO:
            e.st_mode = stat.S_IFDIR | 0o555
            e.st_nlink = 2
        elif ino == DISK_INO:
            ro = self.read_only or self.failed is not None
            e.st_mode = stat.S_IFREG | (self._perm & (0o444 if ro else 0o666))
            e.st_nlink = 1
            e.st_size = self.disk_size
            e.st_blocks = (self.disk_size + 511) // 512
        else:
            snap = self._snap_by_ino.get(ino)
            if snap is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            e.st_mode = stat.S_IFREG | (self._perm & 0o444)
            e.st_nlink = 1
            e.st_size = snap.size
            e.st_blocks = (snap.size + 511) // 512
            ns = int(snap.created * 1e9)
            e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = ns
        return e

    @_guarded
    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    @_guarded
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INO:
            if name == DISK_NAME:
                return self._attrs(DISK_INO)
            if name == SNAPDIR_NAME:
                return self._attrs(SNAPDIR_INO)
            if name == b".":
                return self._attrs(ROOT_INO)
        elif parent_inode == SNAPDIR_INO:
            snap = self._snaps.get(name)
            if snap is not None:
                return self._attrs(snap.ino)
            if name == b".":
                return self._attrs(SNAPDIR_INO)
            if name == b"..":
                return self._attrs(ROOT_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @_guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            if inode != DISK_INO:
                raise pyfuse3.FUSEError(errno.EROFS if inode in self._snap_by_ino else errno.EISDIR)
            new = attr.st_size
            if new != self.disk_size:
                if self.read_only or self.failed is not None or self.inactive:
                    raise pyfuse3.FUSEError(errno.EROFS)
                if new < self.disk_size:
                    # O_TRUNC / ftruncate would throw the disk away: refuse, like a
                    # block device (use `dd conv=notrunc`, or `vdisk resize --shrink`).
                    log.warning("refusing to shrink the disk from %d to %d bytes", self.disk_size, new)
                    raise pyfuse3.FUSEError(errno.EPERM)
                try:
                    self.image.resize(new)
                except VdiskError as exc:
                    log.error("resize to %d bytes: %s", new, exc)
                    raise pyfuse3.FUSEError(errno.EINVAL) from None
                self.disk_size = self.image.size
        # Times, mode and owner are not stored: accept and ignore (as a device node would).
        return self._attrs(inode)

    @_guarded
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = 65536
        s.f_frsize = 4096
        s.f_blocks = self.disk_size // 4096
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = 3 + len(self._snaps)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------ open / release
    @_guarded
    async def open(self, inode, flags, ctx):
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND)
        if inode == DISK_INO:
            if wants_write and (self.read_only or self.failed is not None):
                raise pyfuse3.FUSEError(errno.EROFS)
            self.disk_opens += 1
            return pyfuse3.FileInfo(fh=DISK_INO, direct_io=self.direct_io, keep_cache=not self.direct_io)
        snap = self._snap_by_ino.get(inode)
        if snap is None:
            if inode in (ROOT_INO, SNAPDIR_INO):
                raise pyfuse3.FUSEError(errno.EISDIR)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if wants_write:
            raise pyfuse3.FUSEError(errno.EROFS)
        if snap.image is None:
            try:
                snap.image = open_snapshot_view(self.image, snap.name)
            except SnapshotNotFound:
                self.reload_snapshots()
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except VdiskError as exc:
                log.error("opening snapshot %s: %s", snap.name, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            self._fh_image[snap.ino] = snap.image
        snap.opens += 1
        return pyfuse3.FileInfo(fh=snap.ino, direct_io=self.direct_io, keep_cache=not self.direct_io)

    @_guarded
    async def release(self, fh):
        if fh == DISK_INO:
            self.disk_opens -= 1
            return
        snap = self._snap_by_ino.get(fh)
        if snap is not None:
            snap.opens -= 1
            # Views stay open until the snapshot is deleted or the mount ends: reopening
            # costs a header and table read, and a loop device opens and closes often.

    @_guarded
    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EACCES if not self.read_only else errno.EROFS)

    # ------------------------------------------------------------ directories
    @_guarded
    async def opendir(self, inode, ctx):
        if inode not in (ROOT_INO, SNAPDIR_INO):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guarded
    async def readdir(self, fh, start_id, token):
        if fh == ROOT_INO:
            entries = [(DISK_NAME, DISK_INO), (SNAPDIR_NAME, SNAPDIR_INO)]
        else:
            entries = sorted((s.bname, s.ino) for s in self._snaps.values())
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), i + 1):
                break

    @_guarded
    async def releasedir(self, fh):
        return

    # ------------------------------------------------------------ xattrs (for `vdisk umount`)
    @_guarded
    async def getxattr(self, inode, name, ctx):
        if inode == ROOT_INO and name in self.xattrs:
            return self.xattrs[name]
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_guarded
    async def listxattr(self, inode, ctx):
        return list(self.xattrs) if inode == ROOT_INO else []

    async def forget(self, inode_list):
        # Inodes are static or owned by the snapshot table; nothing to free.
        return

    # ------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Close every snapshot view and the image (which flushes it)."""
        for snap in list(self._snaps.values()):
            if snap.image is not None:
                try:
                    snap.image.close()
                except Exception:
                    log.exception("closing the view of snapshot %s", snap.name)
                snap.image = None
        try:
            self.image.close()
        except VdiskError as exc:
            if self.failed is None:
                raise
            # the mount turned read-only: what could not be flushed is logged, not raised again
            log.error("closing image %s after the mount failed: %s", self.image.filename, exc)
