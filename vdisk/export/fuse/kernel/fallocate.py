"""fallocate(2) on the mount's disk file, as the kernel engine serves FUSE_FALLOCATE:
hole punching frees clusters (``fallocate -p``, a loop device's discard), zeroing a
range writes zeroes, and the disk never grows this way.  The flags are Linux's
(``linux/falloc.h``), as the kernel passes them in the request.
"""

from __future__ import annotations

import errno

import pyfuse3

from ..fs import DISK_INO
from . import proto


def fallocate(fs, fh: int, off: int, length: int, mode: int) -> None:
    """fallocate(2) on an open file of the mount (``fs`` a VdiskFS; called under the
    engine's lock).  On the disk:

    * FALLOC_FL_PUNCH_HOLE (always with KEEP_SIZE) -> ``Image.discard``: the range
      reads as zeros and the clusters it covers are freed (what ``fallocate -p`` and
      a loop device's discard, ``blkdiscard``/``fstrim``, do);
    * FALLOC_FL_ZERO_RANGE -> ``Image.write_zeroes``;
    * plain allocation (mode 0 or KEEP_SIZE alone) inside the disk: nothing to do;
    * a range past the end is clipped with KEEP_SIZE and refused (ENOSPC) without
      it, as the disk cannot grow this way; other modes: EOPNOTSUPP.

    Snapshots are read-only (EBADF, as for write), and a read-only or failed mount
    answers EROFS.  Errors are mapped as for writes (``VdiskFS._data_error``)."""
    known = proto.FALLOC_FL_KEEP_SIZE | proto.FALLOC_FL_PUNCH_HOLE | proto.FALLOC_FL_ZERO_RANGE
    if mode & ~known or (mode & proto.FALLOC_FL_PUNCH_HOLE and mode & proto.FALLOC_FL_ZERO_RANGE):
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
    if fh != DISK_INO or fs.read_only or fs.failed is not None or fs.inactive:
        raise pyfuse3.FUSEError(errno.EROFS if fh == DISK_INO else errno.EBADF)
    end = fs.disk_size
    if off + length > end:
        if not mode & proto.FALLOC_FL_KEEP_SIZE:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        length = max(0, end - off)
    if not mode & (proto.FALLOC_FL_PUNCH_HOLE | proto.FALLOC_FL_ZERO_RANGE) or length == 0:
        return
    what = "discard" if mode & proto.FALLOC_FL_PUNCH_HOLE else "write_zeroes"
    try:
        if what == "discard":
            fs.image.discard(off, length)
        else:
            fs.image.write_zeroes(off, length)
    except Exception as exc:
        raise fs._data_error(exc, what, fh, off, length) from None

