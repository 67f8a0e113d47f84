"""Encode and decode the on-disk structures of the vdk format, version 1.

No I/O happens here: bytes in, frozen dataclasses (or plain ints, on the hot path)
out, and back.  This module is the only code that knows the byte layouts -- the
header, L1 and L2 tables, refcount tables and blocks, the snapshot table and the
zstd framing of compressed clusters; the specification is ``formats/vdk.md`` and
``tests/test_vdk_codec.py`` holds the two together.  All integers are
little-endian.  All checksums are XXH3-64 (seed 0) of the bytes named, stored as a
little-endian u64.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass, field, replace

import xxhash

from ..errors import CorruptImage, UnsupportedFeature

MAGIC = b"\x89VDK\r\n\x1a\n"
VERSION = 1

SLOT_SIZE = 4096
SLOT_OFFSETS = (0, 4096)
HEADER_AREA = 8192  # both slots; clusters overlapping it are reserved
HEADER_FIXED = 192  # fixed part of a header slot; names follow

MIN_CLUSTER_BITS = 12
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16

MAX_OFFSET = 1 << 56  # host offsets must be below this (56-bit field)
MAX_VIRTUAL_SIZE = 1 << 56
MAX_BACKING_NAME = 1024
MAX_BACKING_FORMAT = 16
MAX_SNAPSHOT_NAME = 255
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE = 64 << 20

# feature bits
INCOMPAT_CORRUPT = 1 << 0  # a writer found corruption: open read-only only
INCOMPAT_IDENTITY = 1 << 1  # the header carries an image id; snapshot records list their holders
KNOWN_INCOMPAT = INCOMPAT_CORRUPT | INCOMPAT_IDENTITY
IMAGE_ID_SIZE = 16
MAX_HOLDER_PATH = 1024
MAX_HOLDERS = 65535
KNOWN_COMPAT = 0
KNOWN_AUTOCLEAR = 0

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_NONE: "none", COMPRESSION_ZSTD: "zstd"}

# L2 entry types (bits 56..59 of the descriptor)
T_UNALLOCATED = 0
T_ZERO = 1
T_DATA = 2
T_COMPRESSED = 3
TYPE_NAMES = {T_UNALLOCATED: "unallocated", T_ZERO: "zero", T_DATA: "data", T_COMPRESSED: "compressed"}

OFFSET_MASK = (1 << 56) - 1
TYPE_SHIFT = 56
RESERVED_DESC_MASK = 0xF << 60

L1_ENTRY = struct.Struct("<QQ")  # l2_offset, l2_checksum
L2_ENTRY = struct.Struct("<QIIQQ")  # descriptor, stored_length, codec, checksum, birth
RT_ENTRY = struct.Struct("<QQ")  # refcount block offset, its checksum
RC_ENTRY = struct.Struct("<I")
L1_ENTRY_SIZE = L1_ENTRY.size  # 16
L2_ENTRY_SIZE = L2_ENTRY.size  # 32
RT_ENTRY_SIZE = RT_ENTRY.size  # 16
RC_ENTRY_SIZE = RC_ENTRY.size  # 4


def checksum(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


# ----------------------------------------------------------------------------- header
_HEADER = struct.Struct(
    "<8s"  # 0 magic
    "I"  # 8 version
    "I"  # 12 header_length
    "Q"  # 16 generation
    "Q"  # 24 incompatible_features
    "Q"  # 32 compatible_features
    "Q"  # 40 autoclear_features
    "I"  # 48 cluster_bits
    "B"  # 52 compression_type
    "b"  # 53 compression_level
    "2x"  # 54 reserved
    "Q"  # 56 virtual_size
    "Q"  # 64 l1_offset
    "I"  # 72 l1_entries
    "4x"  # 76 reserved
    "Q"  # 80 l1_checksum
    "Q"  # 88 refcount_table_offset
    "I"  # 96 refcount_table_entries
    "4x"  # 100 reserved
    "Q"  # 104 refcount_table_checksum
    "Q"  # 112 snapshot_table_offset
    "I"  # 120 snapshot_count
    "I"  # 124 snapshot_table_length
    "Q"  # 128 snapshot_table_checksum
    "Q"  # 136 next_snapshot_id
    "Q"  # 144 host_clusters
    "Q"  # 152 dedup_table_offset
    "Q"  # 160 dedup_table_length
    "Q"  # 168 dedup_table_checksum
    "H"  # 176 backing_name_length
    "B"  # 178 backing_format_length
    "B"  # 179 backing_snapshot_length
    "12x"  # 180 reserved
)
assert _HEADER.size == HEADER_FIXED

#: field name -> (offset, size), for the specification test
HEADER_FIELDS = {
    "magic": (0, 8), "version": (8, 4), "header_length": (12, 4), "generation": (16, 8),
    "incompatible_features": (24, 8), "compatible_features": (32, 8), "autoclear_features": (40, 8),
    "cluster_bits": (48, 4), "compression_type": (52, 1), "compression_level": (53, 1),
    "virtual_size": (56, 8), "l1_offset": (64, 8), "l1_entries": (72, 4), "l1_checksum": (80, 8),
    "refcount_table_offset": (88, 8), "refcount_table_entries": (96, 4), "refcount_table_checksum": (104, 8),
    "snapshot_table_offset": (112, 8), "snapshot_count": (120, 4), "snapshot_table_length": (124, 4),
    "snapshot_table_checksum": (128, 8), "next_snapshot_id": (136, 8), "host_clusters": (144, 8),
    "dedup_table_offset": (152, 8), "dedup_table_length": (160, 8), "dedup_table_checksum": (168, 8),
    "backing_name_length": (176, 2), "backing_format_length": (178, 1), "backing_snapshot_length": (179, 1),
}


@dataclass(frozen=True)
class Header:
    """The vdk header, decoded (``formats/vdk.md``, "Header")."""

    generation: int
    cluster_bits: int
    virtual_size: int
    l1_offset: int = 0
    l1_entries: int = 0
    l1_checksum: int = 0
    refcount_table_offset: int = 0
    refcount_table_entries: int = 0
    refcount_table_checksum: int = 0
    snapshot_table_offset: int = 0
    snapshot_count: int = 0
    snapshot_table_length: int = 0
    snapshot_table_checksum: int = 0
    next_snapshot_id: int = 1
    host_clusters: int = 0
    compression_type: int = COMPRESSION_NONE
    compression_level: int = 3
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    dedup_table_offset: int = 0
    dedup_table_length: int = 0
    dedup_table_checksum: int = 0
    backing_name: str = ""
    backing_format: str = ""
    backing_snapshot: str = ""
    #: 16 bytes with INCOMPAT_IDENTITY, else empty
    image_id: bytes = b""
    version: int = VERSION

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def replace(self, **kw) -> Header:
        return replace(self, **kw)

    def encode(self) -> bytes:
        name = self.backing_name.encode()
        fmt = self.backing_format.encode("ascii")
        snap = self.backing_snapshot.encode()
        if len(name) > MAX_BACKING_NAME or len(fmt) > MAX_BACKING_FORMAT or len(snap) > MAX_SNAPSHOT_NAME:
            raise ValueError("backing reference too long")
        if name and not fmt:
            raise ValueError("a backing file needs its format")
        if b"\0" in name or b"\0" in fmt or b"\0" in snap:
            raise ValueError("NUL byte in the backing reference")
        if bool(self.incompatible_features & INCOMPAT_IDENTITY) != (len(self.image_id) == IMAGE_ID_SIZE):
            raise ValueError("an image id goes with the identity feature bit, and only with it")
        if self.image_id and not any(self.image_id):
            raise ValueError("an image id is never all zeros")
        tail = name + fmt + snap + self.image_id
        length = _align(HEADER_FIXED + len(tail), 8) + 8
        fixed = _HEADER.pack(
            MAGIC, self.version, length, self.generation, self.incompatible_features,
            self.compatible_features, self.autoclear_features, self.cluster_bits, self.compression_type,
            self.compression_level, self.virtual_size, self.l1_offset, self.l1_entries, self.l1_checksum,
            self.refcount_table_offset, self.refcount_table_entries, self.refcount_table_checksum,
            self.snapshot_table_offset, self.snapshot_count, self.snapshot_table_length,
            self.snapshot_table_checksum, self.next_snapshot_id, self.host_clusters, self.dedup_table_offset,
            self.dedup_table_length, self.dedup_table_checksum, len(name), len(fmt), len(snap),
        )
        body = fixed + tail
        body += bytes(length - 8 - len(body))
        return body + struct.pack("<Q", checksum(body))

    @classmethod
    def decode(cls, slot: bytes, *, check_features: bool = True) -> Header:
        """Decode one header slot.  Raises CorruptImage for a slot that is not a valid
        header (bad magic, bad checksum, out-of-range field) and, with
        ``check_features``, UnsupportedFeature for a valid header this implementation
        must not open (version, unknown incompatible bits).  A reader picks the newest
        slot that passes without ``check_features``, then checks that one."""
        if len(slot) < HEADER_FIXED or slot[:8] != MAGIC:
            raise CorruptImage("not a vdk image (bad magic)")
        (magic, version, length, gen, incompat, compat, autoclear, cbits, ctype, clevel, vsize, l1_off, l1_n, l1_sum,
         rt_off, rt_n, rt_sum, st_off, st_n, st_len, st_sum, next_id, host_clusters, dd_off, dd_len, dd_sum,
         name_len, fmt_len, snap_len) = _HEADER.unpack_from(slot)
        if not HEADER_FIXED + 8 <= length <= SLOT_SIZE or length % 8:
            raise CorruptImage(f"header length {length} is out of range")
        if length > len(slot):
            raise CorruptImage("header slot is truncated")
        (stored,) = struct.unpack_from("<Q", slot, length - 8)
        if stored != checksum(slot[: length - 8]):
            raise CorruptImage("header checksum mismatch")
        if check_features:  # before the fields: another version may define them otherwise
            check_header_features(version, incompat)
        id_len = IMAGE_ID_SIZE if incompat & INCOMPAT_IDENTITY else 0
        if name_len > MAX_BACKING_NAME or fmt_len > MAX_BACKING_FORMAT or HEADER_FIXED + name_len + fmt_len + snap_len + id_len > length - 8:
            raise CorruptImage("backing reference in the header is too long")
        pos = HEADER_FIXED
        try:
            name = slot[pos:pos + name_len].decode()
            fmt = slot[pos + name_len:pos + name_len + fmt_len].decode("ascii")
            snap = slot[pos + name_len + fmt_len:pos + name_len + fmt_len + snap_len].decode()
        except UnicodeDecodeError:
            raise CorruptImage("backing reference in the header is not valid UTF-8") from None
        id_pos = pos + name_len + fmt_len + snap_len
        image_id = bytes(slot[id_pos:id_pos + id_len])
        if id_len and not any(image_id):
            raise CorruptImage("image id is all zeros")
        if "\0" in name or "\0" in snap or "\0" in fmt:
            raise CorruptImage("backing reference contains a NUL byte")
        if name and not fmt:
            raise CorruptImage("backing file named without its format")
        if dd_off or dd_len or dd_sum:
            raise CorruptImage("reserved deduplication fields are not zero")
        return cls(
            generation=gen, cluster_bits=cbits, virtual_size=vsize, l1_offset=l1_off, l1_entries=l1_n,
            l1_checksum=l1_sum, refcount_table_offset=rt_off, refcount_table_entries=rt_n,
            refcount_table_checksum=rt_sum, snapshot_table_offset=st_off, snapshot_count=st_n,
            snapshot_table_length=st_len, snapshot_table_checksum=st_sum, next_snapshot_id=next_id,
            host_clusters=host_clusters, compression_type=ctype, compression_level=clevel,
            incompatible_features=incompat, compatible_features=compat, autoclear_features=autoclear & KNOWN_AUTOCLEAR,
            dedup_table_offset=dd_off, dedup_table_length=dd_len, dedup_table_checksum=dd_sum,
            backing_name=name, backing_format=fmt, backing_snapshot=snap, image_id=image_id, version=version,
        )


def slot_generation(slot: bytes) -> int | None:
    """The generation of a *valid* slot -- magic, header length and checksum right, the
    four fields every version keeps in place -- or None.  A reader makes the valid slot
    with the highest generation current, and only then decodes and checks it fully."""
    if len(slot) < HEADER_FIXED or slot[:8] != MAGIC:
        return None
    length, gen = struct.unpack_from("<IQ", slot, 12)
    if not HEADER_FIXED + 8 <= length <= min(SLOT_SIZE, len(slot)) or length % 8:
        return None
    (stored,) = struct.unpack_from("<Q", slot, length - 8)
    if stored != checksum(slot[: length - 8]):
        return None
    return gen


def check_header_features(version: int, incompat: int) -> None:
    if version != VERSION:
        raise UnsupportedFeature(f"vdk version {version} is not supported (this vdisk reads version {VERSION})")
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        raise UnsupportedFeature(f"image uses unknown incompatible features 0x{unknown:x}")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ----------------------------------------------------------------------------- geometry
def l2_entries(cluster_bits: int) -> int:
    return (1 << cluster_bits) // L2_ENTRY_SIZE


def l1_entries_for(virtual_size: int, cluster_bits: int) -> int:
    span = (1 << cluster_bits) * l2_entries(cluster_bits)
    return (virtual_size + span - 1) // span


def rc_entries(cluster_bits: int) -> int:
    return (1 << cluster_bits) // RC_ENTRY_SIZE


# ----------------------------------------------------------------------------- L2 entries
def make_desc(kind: int, host_offset: int = 0) -> int:
    return (kind << TYPE_SHIFT) | host_offset


def desc_type(desc: int) -> int:
    return (desc >> TYPE_SHIFT) & 0xF


def desc_offset(desc: int) -> int:
    return desc & OFFSET_MASK


@dataclass(frozen=True)
class L2Entry:
    """One L2 entry, decoded: the cluster's type, where it is stored and how."""

    kind: int
    host_offset: int = 0
    stored_length: int = 0
    codec: int = 0
    checksum: int = 0
    birth: int = 0

    def encode(self) -> bytes:
        return L2_ENTRY.pack(make_desc(self.kind, self.host_offset), self.stored_length, self.codec, self.checksum, self.birth)

    @classmethod
    def decode(cls, buf, index: int = 0) -> L2Entry:
        desc, length, codec, csum, birth = L2_ENTRY.unpack_from(buf, index * L2_ENTRY_SIZE)
        return cls(desc_type(desc), desc_offset(desc), length, codec, csum, birth)


def validate_l2_entry(desc: int, length: int, codec: int, cluster_size: int, host_limit: int) -> str | None:
    """Why this L2 entry is invalid, or None.  ``host_limit`` is the end of the host area."""
    if desc & RESERVED_DESC_MASK:
        return "reserved bits set in L2 entry"
    kind = desc_type(desc)
    off = desc_offset(desc)
    if kind in (T_UNALLOCATED, T_ZERO):
        if off or length or codec:
            return f"{TYPE_NAMES[kind]} L2 entry carries an offset or length"
        return None
    if kind == T_DATA:
        if off % cluster_size or off < HEADER_AREA:
            return f"data cluster offset {off:#x} is not a cluster-aligned offset past the header"
        if length != cluster_size or codec:
            return f"data cluster at {off:#x} has stored length {length}"
        if off + cluster_size > host_limit:
            return f"data cluster offset {off:#x} lies past the end of the image"
        return None
    if kind == T_COMPRESSED:
        if codec != COMPRESSION_ZSTD:
            return f"compressed cluster at {off:#x} uses unknown codec {codec}"
        if not 0 < length < cluster_size:
            return f"compressed cluster at {off:#x} has stored length {length} out of range"
        if off < HEADER_AREA:
            return f"compressed cluster at {off:#x} lies in the header area"
        if off + length > host_limit:
            return f"compressed cluster at {off:#x} lies past the end of the image"
        return None
    return f"unknown L2 entry type {kind}"


# ----------------------------------------------------------------------------- snapshots
_SNAP = struct.Struct("<QQqQQIIQIHH")  # 64 bytes fixed
SNAPSHOT_FIELDS = {
    "id": (0, 8), "generation": (8, 8), "create_time_ns": (16, 8), "virtual_size": (24, 8), "l1_offset": (32, 8),
    "l1_entries": (40, 4), "flags": (44, 4), "l1_checksum": (48, 8), "holds": (56, 4), "name_length": (60, 2),
    "holder_count": (62, 2),
}
_HOLDER = struct.Struct("<16sH")  # image id, path length; the path follows
HOLDER_FIELDS = {"image_id": (0, 16), "path_length": (16, 2)}
SNAP_HIDDEN = 1 << 0  # deleted by the user but kept while linked clones hold it
KNOWN_SNAP_FLAGS = SNAP_HIDDEN


@dataclass(frozen=True)
class HolderRecord:
    """An image that depends on a snapshot: its id, and where it was made, relative to
    the directory of the image holding the snapshot (a hint for finding it again)."""

    image_id: bytes
    path: str
    #: the record's bytes as :func:`decode_snapshot_table` read and checked them (a
    #: snapshot held by hundreds of clones re-encodes every holder at each commit)
    encoded: bytes | None = field(default=None, compare=False, repr=False)

    def encode(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        path = self.path.encode()
        if len(self.image_id) != IMAGE_ID_SIZE or not any(self.image_id):
            raise ValueError("a holder needs a 16-byte image id")
        if not 0 < len(path) <= MAX_HOLDER_PATH or b"\0" in path:
            raise ValueError("holder path length out of range")
        rec = _HOLDER.pack(self.image_id, len(path)) + path
        return rec + bytes(_align(len(rec), 8) - len(rec))


@dataclass(frozen=True)
class SnapshotRecord:
    """One record of the snapshot table, decoded."""

    id: int
    name: str
    generation: int
    create_time_ns: int
    virtual_size: int
    l1_offset: int
    l1_entries: int
    l1_checksum: int
    flags: int = 0
    #: every hold on the snapshot; ``holds - len(holders)`` were counted without an id (vdisk 0.1)
    holds: int = 0
    holders: tuple[HolderRecord, ...] = ()

    def encode(self) -> bytes:
        name = self.name.encode()
        if not 0 < len(name) <= MAX_SNAPSHOT_NAME:
            raise ValueError("snapshot name length out of range")
        if len(self.holders) > min(self.holds, MAX_HOLDERS):
            raise ValueError("more holder records than holds")
        rec = _SNAP.pack(self.id, self.generation, self.create_time_ns, self.virtual_size, self.l1_offset,
                         self.l1_entries, self.flags, self.l1_checksum, self.holds, len(name),
                         len(self.holders)) + name
        rec += bytes(_align(len(rec), 8) - len(rec))
        return rec + b"".join(h.encode() for h in self.holders)


def encode_snapshot_table(records) -> bytes:
    return b"".join(r.encode() for r in records)


def _decode_holders(buf: bytes, pos: int, count: int, sid: int) -> tuple[tuple[HolderRecord, ...], int]:
    """``count`` holder records from ``pos`` (8-aligned), each keeping its bytes, and
    the position after them."""
    unpack, hsize, end_of_table = _HOLDER.unpack_from, _HOLDER.size, len(buf)
    holders = []
    seen: set[bytes] = set()
    for _ in range(count):
        if pos + hsize > end_of_table:
            raise CorruptImage(f"snapshot {sid}: holder records run past the snapshot table")
        hid, plen = unpack(buf, pos)
        end = pos + hsize + plen
        if not 0 < plen <= MAX_HOLDER_PATH or end > end_of_table:
            raise CorruptImage(f"snapshot {sid}: a holder path length of {plen}")
        raw = buf[pos + hsize:end]
        try:
            hpath = raw.decode()
        except UnicodeDecodeError:
            raise CorruptImage(f"snapshot {sid}: a holder path that is not UTF-8") from None
        if b"\0" in raw or hid == _NO_ID or hid in seen:
            raise CorruptImage(f"snapshot {sid}: an invalid or duplicate holder record")
        seen.add(hid)
        nxt = (end + 7) & ~7  # pos is 8-aligned: the same as pos + _align(hsize + plen, 8)
        if nxt > end_of_table:  # the last record's padding is missing
            raise CorruptImage("snapshot table length does not match its records")
        holders.append(HolderRecord(hid, hpath, buf[pos:nxt]))
        pos = nxt
    return tuple(holders), pos


_NO_ID = bytes(IMAGE_ID_SIZE)


#: tables up to this length are remembered once decoded (see decode_snapshot_table)
_MEMO_MAX_TABLE = 1 << 20
_MEMO_ENTRIES = 4
_memo: dict[tuple[bytes, int, bool], tuple[SnapshotRecord, ...]] = {}


def decode_snapshot_table(buf: bytes, count: int, *, identity: bool = True) -> list[SnapshotRecord]:
    """Decode ``count`` records.  ``identity`` says the header has INCOMPAT_IDENTITY;
    without it, ``holder_count`` is reserved and must be zero.

    The result depends only on the arguments and its records are immutable, so the
    last few small tables decoded are remembered: a linked clone opens its source
    three times, and a snapshot that hundreds of clones hold has a table of hundreds
    of holder records.  Only a table that decoded without error is remembered."""
    buf = bytes(buf)
    key = (buf, count, identity)
    recs = _memo.get(key)
    if recs is None:
        recs = tuple(_decode_snapshot_table(buf, count, identity))
        if len(buf) <= _MEMO_MAX_TABLE:
            if len(_memo) >= _MEMO_ENTRIES:
                del _memo[next(iter(_memo))]  # the oldest
            _memo[key] = recs
    return list(recs)


def _decode_snapshot_table(buf: bytes, count: int, identity: bool) -> list[SnapshotRecord]:
    out = []
    pos = 0
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for _ in range(count):
        if pos + _SNAP.size > len(buf):
            raise CorruptImage("snapshot table is shorter than its snapshot count")
        (sid, gen, ctime, vsize, l1_off, l1_n, flags, l1_sum, holds, name_len, n_holders) = _SNAP.unpack_from(buf, pos)
        if not 0 < name_len <= MAX_SNAPSHOT_NAME or pos + _SNAP.size + name_len > len(buf):
            raise CorruptImage(f"snapshot {sid} has a name length of {name_len}")
        try:
            name = buf[pos + _SNAP.size:pos + _SNAP.size + name_len].decode()
        except UnicodeDecodeError:
            raise CorruptImage(f"snapshot {sid} has a name that is not UTF-8") from None
        if "\0" in name:
            raise CorruptImage(f"snapshot {sid} has a name with a NUL byte")
        if flags & ~KNOWN_SNAP_FLAGS:
            raise UnsupportedFeature(f"snapshot {name!r} has unknown flags 0x{flags:x}")
        if sid in seen_ids or (name in seen_names and not flags & SNAP_HIDDEN):
            raise CorruptImage(f"snapshot table has a duplicate snapshot {name!r} (id {sid})")
        if n_holders and not identity:
            raise CorruptImage(f"snapshot {sid} lists holders in an image without the identity feature")
        if n_holders > holds:
            raise CorruptImage(f"snapshot {sid} lists {n_holders} holders but counts {holds} holds")
        seen_ids.add(sid)
        if not flags & SNAP_HIDDEN:
            seen_names.add(name)
        pos += _align(_SNAP.size + name_len, 8)
        holders: tuple[HolderRecord, ...] = ()
        if n_holders:
            holders, pos = _decode_holders(buf, pos, n_holders, sid)
        out.append(SnapshotRecord(sid, name, gen, ctime, vsize, l1_off, l1_n, l1_sum, flags, holds, holders))
    if pos != len(buf):
        raise CorruptImage("snapshot table length does not match its records")
    return out


# ----------------------------------------------------------------------------- tables
def encode_l1(offsets, sums) -> bytes:
    """L1 (and refcount-table) entries from two equally long sequences of u64."""
    n = len(offsets)
    out = array.array("Q", bytes(16 * n))
    out[0::2] = offsets if isinstance(offsets, array.array) else array.array("Q", offsets)
    out[1::2] = sums if isinstance(sums, array.array) else array.array("Q", sums)
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def decode_l1(buf: bytes, n: int) -> tuple[array.array, array.array]:
    """The first ``n`` entries of ``buf`` as two compact arrays of u64 (offsets,
    checksums): 16 bytes of memory per entry, not the ~80 of Python lists."""
    a = array.array("Q")
    a.frombytes(memoryview(buf)[: n * L1_ENTRY_SIZE])
    if sys.byteorder != "little":
        a.byteswap()
    return a[0::2], a[1::2]


encode_refcount_table = encode_l1
decode_refcount_table = decode_l1


def encode_refcount_block(rc: array.array, start: int, count: int) -> bytes:
    """One refcount block (section 9.1): the ``count`` u32 refcounts ``rc[start:start +
    count]`` of an ``array('I')``, zeros for the clusters past the end of ``rc``."""
    part = rc[start:start + count]
    if len(part) < count:
        part.extend([0] * (count - len(part)))
    if sys.byteorder != "little":
        part.byteswap()
    return part.tobytes()


def decode_refcount_block(buf) -> array.array:
    """The refcounts of one refcount block, as an ``array('I')`` of ``len(buf) // 4``."""
    part = array.array("I")
    part.frombytes(buf)
    if sys.byteorder != "little":
        part.byteswap()
    return part


# ----------------------------------------------------------------------------- compressed clusters
def compress_cluster(data, level: int) -> bytes | None:
    """The stored bytes of a compressed cluster (section 8): one zstd frame whose header
    states its content size, or None when that frame would not be shorter than the
    cluster (``0 < stored_length < cs``; the cluster is then stored as data)."""
    from .zstd import compress_frame

    comp = compress_frame(data, level)
    return comp if len(comp) < len(data) else None


def decompress_cluster(buf, cluster_size: int) -> bytes:
    """The ``cluster_size`` bytes of a compressed cluster whose stored bytes are ``buf``:
    exactly one zstd frame stating a content size of ``cluster_size`` and nothing after
    it (section 8), decoded by the bounded decoder shared by every format
    (:func:`vdisk.codec.zstd.decompress_bounded`), which never allocates more than one
    cluster.  Raises :class:`~vdisk.codec.zstd.CorruptFrame` (a CorruptImage) whose
    message names no file: the caller prefixes the cluster it decoded."""
    from .zstd import decompress_bounded

    return decompress_bounded(buf, cluster_size, exact=True)
