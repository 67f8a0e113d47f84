"""The FUSE kernel protocol (``include/uapi/linux/fuse.h``, major 7) as pure encode/decode.

No I/O here: bytes in, values out, and back (as h11 does for HTTP).  The engine
(:mod:`vdisk.export.fuse.kernel.engine`) reads requests from /dev/fuse into a buffer, decodes
them with the ``Struct`` objects below and writes the replies these functions build.

Conventions (from the header)
-----------------------------
* Byte order and alignment are the host's (the kernel and the server share a
  machine): every struct here uses ``=`` (native order, standard sizes, no implicit
  padding); the header pads every struct to a multiple of 8 bytes by hand, and so do we.
* A request is ``fuse_in_header`` (40 bytes; ``len`` is the whole request) followed
  by the opcode's argument struct and, for some opcodes, NUL-terminated names or the
  data of a WRITE.
* A reply is ``fuse_out_header`` (16 bytes: ``len`` of the whole reply, ``error`` = 0
  or a negative errno, ``unique`` of the request) followed, on success, by the
  opcode's out struct.  A notification is the same header with ``unique`` = 0 and
  ``error`` = the notify code.
* FORGET, BATCH_FORGET and INTERRUPT get no reply.

Version: the kernel sends its (major, minor) in INIT; we answer major 7 and
``min(kernel minor, PROTO_MINOR)``.  Everything encoded here has had this layout since
7.23 (``fuse_init_out`` of 64 bytes) except what only a newer minor defines
(``FOPEN_PARALLEL_DIRECT_WRITES``, 7.38): the engine only uses that when the negotiated
minor has it.  Nothing is negotiated that would change a request's layout
(no FUSE_SECURITY_CTX / FUSE_CREATE_SUPP_GROUP, so ``total_extlen`` stays 0; no
FUSE_SETXATTR_EXT).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

KERNEL_VERSION = 7
#: the newest minor whose layouts and flags this module knows (see the module doc)
PROTO_MINOR = 38
#: the oldest minor we accept: fuse_init_out with max_pages (7.28) and FUSE_MAX_PAGES
MIN_MINOR = 28

ROOT_ID = 1
MIN_READ_BUFFER = 8192

# ---------------------------------------------------------------- opcodes
LOOKUP = 1
FORGET = 2  # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36  # no reply (we never answer EAGAIN)
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41  # no reply
BATCH_FORGET = 42  # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50

#: opcodes the kernel sends without waiting for (or accepting) a reply
NO_REPLY_OPCODES = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})

OPCODE_NAMES = {v: k for k, v in dict(globals()).items()
                if isinstance(v, int) and k.isupper() and 1 <= v <= 64 and k not in ("ROOT_ID", "KERNEL_VERSION",
                                                                                    "PROTO_MINOR", "MIN_MINOR")}

# ---------------------------------------------------------------- notify codes
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6

# ---------------------------------------------------------------- INIT flags (fuse_init_in/out.flags)
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
INIT_EXT = 1 << 30

# ---------------------------------------------------------------- open flags (fuse_open_out.open_flags)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6  # 7.38

# ---------------------------------------------------------------- other flag words
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_CTIME = 1 << 10

FSYNC_FDATASYNC = 1 << 0
GETATTR_FH = 1 << 0

# fallocate(2) modes (linux/falloc.h) as they arrive in fuse_fallocate_in.mode
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t): attach a new /dev/fuse fd to a session
DEV_IOC_CLONE = (2 << 30) | (4 << 16) | (229 << 8) | 0

# ---------------------------------------------------------------- structs
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen(u16), padding(u16)
IN_HEADER = struct.Struct("=IIQQIIIHH")
#: fuse_out_header: len, error (0 or -errno), unique
OUT_HEADER = struct.Struct("=IiQ")
#: fuse_read_in and fuse_write_in share this layout:
#: fh, offset, size, read_flags/write_flags, lock_owner, flags, padding
RW_IN = struct.Struct("=QQIIQII")
#: fuse_write_out: size, padding
WRITE_OUT = struct.Struct("=II")
#: fuse_init_in up to flags (16 bytes, since 7.6); flags2 follows from 7.36
INIT_IN = struct.Struct("=IIII")
INIT_IN_FLAGS2 = struct.Struct("=I")
#: fuse_init_out (64 bytes since 7.23): major, minor, max_readahead, flags,
#: max_background(u16), congestion_threshold(u16), max_write, time_gran,
#: max_pages(u16), map_alignment(u16), flags2, unused
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
#: attr_valid_nsec, then a fuse_attr
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")
#: fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then a fuse_attr
ATTR_OUT_HEAD = struct.Struct("=QII")
#: fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("=IIQ")
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
#: atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("=II")
#: fuse_create_in: flags, mode, umask, open_flags
CREATE_IN = struct.Struct("=IIII")
#: fuse_open_out: fh, open_flags, padding (backing_id from 7.40)
OPEN_OUT = struct.Struct("=QII")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("=QIIQ")
#: fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("=QIIQ")
#: fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("=QII")
#: fuse_getxattr_in: size, padding (then the NUL-terminated name)
GETXATTR_IN = struct.Struct("=II")
#: fuse_getxattr_out: size, padding (the answer to a size probe, size 0)
GETXATTR_OUT = struct.Struct("=II")
#: fuse_access_in: mask, padding
ACCESS_IN = struct.Struct("=II")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
KSTATFS = struct.Struct("=QQQQQIIII24x")
#: fuse_interrupt_in: unique
INTERRUPT_IN = struct.Struct("=Q")
#: fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("=QQQII")
#: fuse_batch_forget_in: count, dummy; then count x fuse_forget_one (nodeid, nlookup)
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
#: fuse_dirent: ino, off, namelen, type, then the name, padded to 8 bytes
DIRENT = struct.Struct("=QQII")
#: fuse_notify_inval_inode_out: ino, off, len
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")
#: fuse_notify_inval_entry_out: parent, namelen, flags (padding before 7.38); then name, NUL
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")
#: fuse_notify_delete_out: parent, child, namelen, padding; then name, NUL
NOTIFY_DELETE_OUT = struct.Struct("=QQII")

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size  # 128
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size  # 104
#: where a WRITE's data starts in the request
WRITE_DATA_OFFSET = IN_HEADER.size + RW_IN.size  # 80


class ProtocolError(Exception):
    """A request the kernel should never send (too short, unknown version...)."""


# ---------------------------------------------------------------- values
class Attr(NamedTuple):
    """What ``fuse_attr`` carries (times in nanoseconds since the epoch)."""

    ino: int
    size: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    mode: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096


class Entry(NamedTuple):
    """A looked-up name: ``fuse_entry_out`` (timeouts in seconds)."""

    attr: Attr
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


class RequestHeader(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int


def _split_time(t: float) -> tuple[int, int]:
    """Seconds as (seconds, nanoseconds), both >= 0."""
    if t <= 0:
        return 0, 0
    sec = int(t)
    return sec, min(int(round((t - sec) * 1e9)), 999_999_999)


def _split_ns(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec & 0xFFFF_FFFF_FFFF_FFFF, nsec


# ---------------------------------------------------------------- decoding
def parse_header(buf, n: int | None = None) -> RequestHeader:
    n = len(buf) if n is None else n
    if n < IN_HEADER.size:
        raise ProtocolError(f"request of {n} bytes is shorter than fuse_in_header")
    h = RequestHeader(*IN_HEADER.unpack_from(buf, 0)[:8])
    if h.len != n:
        raise ProtocolError(f"request header says {h.len} bytes, {n} were read")
    return h


def parse_init(body) -> InitIn:
    if len(body) < INIT_IN.size:
        raise ProtocolError("INIT request too short")
    major, minor, readahead, flags = INIT_IN.unpack_from(body, 0)
    if major == KERNEL_VERSION and minor >= 36 and len(body) >= INIT_IN.size + 4 and flags & INIT_EXT:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    return InitIn(major, minor, readahead, flags)


def parse_name(body, offset: int = 0) -> bytes:
    """A NUL-terminated name at ``offset`` of a request body."""
    mv = memoryview(body)[offset:]
    raw = bytes(mv)
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("name without its terminating NUL")
    return raw[:end]


def parse_two_names(body, offset: int = 0) -> tuple[bytes, bytes]:
    raw = bytes(memoryview(body)[offset:])
    a, sep, rest = raw.partition(b"\0")
    b, sep2, _ = rest.partition(b"\0")
    if not sep or not sep2:
        raise ProtocolError("names without their terminating NULs")
    return a, b


# ---------------------------------------------------------------- encoding
def out_header(length: int, error: int, unique: int) -> bytes:
    return OUT_HEADER.pack(length, error, unique)


def reply(unique: int, payload: bytes = b"") -> bytes:
    """A successful reply with ``payload`` (the opcode's out struct)."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def error_reply(unique: int, err: int) -> bytes:
    """An error reply; ``err`` is a positive errno."""
    if err <= 0:
        raise ValueError("an error reply needs a positive errno")
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def encode_attr(a: Attr) -> bytes:
    at, atn = _split_ns(a.atime_ns)
    mt, mtn = _split_ns(a.mtime_ns)
    ct, ctn = _split_ns(a.ctime_ns)
    return ATTR.pack(a.ino, a.size, a.blocks, at, mt, ct, atn, mtn, ctn, a.mode, a.nlink, a.uid, a.gid,
                     a.rdev, a.blksize, 0)


def decode_attr(buf, offset: int = 0) -> Attr:
    (ino, size, blocks, at, mt, ct, atn, mtn, ctn, mode, nlink, uid, gid, rdev, blksize,
     _flags) = ATTR.unpack_from(buf, offset)
    return Attr(ino, size, blocks, at * 10**9 + atn, mt * 10**9 + mtn, ct * 10**9 + ctn, mode, nlink, uid, gid,
                rdev, blksize)


def encode_entry(e: Entry) -> bytes:
    """``fuse_entry_out``."""
    es, ens = _split_time(e.entry_timeout)
    as_, ans = _split_time(e.attr_timeout)
    return ENTRY_OUT_HEAD.pack(e.attr.ino, e.generation, es, as_, ens, ans) + encode_attr(e.attr)


def encode_attr_out(a: Attr, timeout: float) -> bytes:
    """``fuse_attr_out``."""
    s, ns = _split_time(timeout)
    return ATTR_OUT_HEAD.pack(s, ns, 0) + encode_attr(a)


def encode_open_out(fh: int, open_flags: int) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, 0)


def encode_write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def encode_init_out(*, minor: int, max_readahead: int, flags: int, max_background: int,
                    congestion_threshold: int, max_write: int, time_gran: int, max_pages: int) -> bytes:
    return INIT_OUT.pack(KERNEL_VERSION, minor, max_readahead, flags & 0xFFFF_FFFF, max_background,
                         congestion_threshold, max_write, time_gran, max_pages, 0, 0)


def encode_statfs(*, blocks: int, bfree: int, bavail: int, files: int, ffree: int, bsize: int,
                  namelen: int, frsize: int) -> bytes:
    return KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def dirent_size(name: bytes, plus: bool = False) -> int:
    return _pad8((ENTRY_OUT_SIZE if plus else 0) + DIRENT.size + len(name))


def encode_dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_dirent``: ``off`` is the offset of the *next* entry (what a later
    READDIR passes back to continue after this one)."""
    raw = DIRENT.pack(ino, off, len(name), dtype) + name
    return raw + b"\0" * (_pad8(len(raw)) - len(raw))


def encode_direntplus(entry: Entry, off: int, name: bytes, dtype: int) -> bytes:
    """One ``fuse_direntplus``: a ``fuse_entry_out`` then a ``fuse_dirent``."""
    raw = encode_entry(entry) + DIRENT.pack(entry.attr.ino, off, len(name), dtype) + name
    return raw + b"\0" * (_pad8(len(raw)) - len(raw))


def decode_dirents(buf, plus: bool = False) -> list[tuple[int, int, bytes, int]]:
    """(ino, next offset, name, type) of each entry of a READDIR(PLUS) reply body (for tests)."""
    out = []
    pos = 0
    mv = memoryview(buf)
    while pos < len(mv):
        base = pos + (ENTRY_OUT_SIZE if plus else 0)
        ino, off, namelen, dtype = DIRENT.unpack_from(mv, base)
        name = bytes(mv[base + DIRENT.size: base + DIRENT.size + namelen])
        out.append((ino, off, name, dtype))
        pos += dirent_size(name, plus)
    return out


def notify_inval_inode(ino: int, off: int = 0, length: int = 0) -> bytes:
    """Drop the kernel's cached attributes of ``ino`` and (``length`` 0: all of) its data
    from ``off``; ``off`` < 0 drops only the attributes."""
    body = NOTIFY_INVAL_INODE_OUT.pack(ino, off, length)
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body


def notify_inval_entry(parent: int, name: bytes) -> bytes:
    """Drop the kernel's dentry ``parent``/``name`` (and its negative cache)."""
    body = NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY, 0) + body


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """Tell the kernel that ``parent``/``name`` (inode ``child``) was deleted."""
    body = NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_DELETE, 0) + body


def dtype_of(mode: int) -> int:
    """The dirent type (DT_*) of a file mode: the S_IFMT bits shifted down."""
    return (mode >> 12) & 0o17
