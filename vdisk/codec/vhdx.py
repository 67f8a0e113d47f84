"""VHDX on-disk structures: bytes <-> frozen dataclasses, no I/O.

Written from Microsoft's "VHDX Format Specification v1.00" ([MS-VHDX]); the facts
vdisk relies on are in ``formats/vhdx.md``.  Every number is little-endian; GUIDs are
stored in Microsoft's mixed-endian layout (``uuid.UUID.bytes_le``).  Checksums are
CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final XOR
0xFFFFFFFF) over the whole structure with its 4-byte checksum field set to zero.

This module is the only place that knows the byte layout of the file type
identifier, the headers, the region table, the metadata table and its known items,
BAT entries and the log (entry header, descriptors, data sectors).  Decoders check
what the bytes themselves can tell (signature, checksum, counts that fit in the
structure); checks against the file (offsets inside it, overlaps) belong to the
driver (:mod:`vdisk.drivers.vhdx`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ..errors import CorruptImage

KiB = 1024
MiB = 1 << 20

# ---------------------------------------------------------------------- layout constants
FILE_SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
LOG_SECTOR = 4 * KiB
#: the first 1 MiB holds the header section; everything else is 1 MiB aligned
HEADER_SECTION_SIZE = 1 * MiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_METADATA_ITEM = 1 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 << 40  # 64 TiB

REGION_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
REGION_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

META_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
META_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
META_VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
META_LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
META_PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
META_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
#: the locator type of a VHDX parent
LOCATOR_VHDX = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
META_NAMES = {
    META_FILE_PARAMETERS: "file parameters",
    META_VIRTUAL_DISK_SIZE: "virtual disk size",
    META_VIRTUAL_DISK_ID: "virtual disk id",
    META_LOGICAL_SECTOR_SIZE: "logical sector size",
    META_PHYSICAL_SECTOR_SIZE: "physical sector size",
    META_PARENT_LOCATOR: "parent locator",
}

# BAT entry states (bits 0-2); the file offset in MiB is bits 20-63, bits 3-19 reserved
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
SB_NOT_PRESENT = 0
SB_PRESENT = 6
PAYLOAD_STATES = {0: "not present", 1: "undefined", 2: "zero", 3: "unmapped", 6: "fully present",
                  7: "partially present"}
BAT_STATE_MASK = 0x7
BAT_RESERVED_MASK = 0xFFFF8  # bits 3-19
BAT_OFFSET_SHIFT = 20

# ---------------------------------------------------------------------- structs
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")  # 80 bytes, then reserved to 4 KiB
_REGION_HDR = struct.Struct("<4sIII")  # 16
_REGION_ENTRY = struct.Struct("<16sQII")  # 32
_META_HDR = struct.Struct("<8sHH20s")  # 32
_META_ENTRY = struct.Struct("<16sIIII")  # 32
_FILE_PARAMS = struct.Struct("<II")  # 8
_LOG_HDR = struct.Struct("<4sIIIQII16sQQ")  # 64
_LOG_DESC = struct.Struct("<4s4s8sQQ")  # 32
_LOG_DATA = struct.Struct("<4sI4084sI")  # 4096
assert (_HEADER.size, _REGION_HDR.size, _REGION_ENTRY.size, _META_HDR.size, _META_ENTRY.size, _LOG_HDR.size,
        _LOG_DESC.size, _LOG_DATA.size) == (80, 16, 32, 32, 32, 64, 32, 4096)

#: field -> (offset, struct format) of each structure, for the spec test and the hostile corpus
HEADER_FIELDS = {"signature": (0, "4s"), "checksum": (4, "I"), "sequence_number": (8, "Q"),
                 "file_write_guid": (16, "16s"), "data_write_guid": (32, "16s"), "log_guid": (48, "16s"),
                 "log_version": (64, "H"), "version": (66, "H"), "log_length": (68, "I"), "log_offset": (72, "Q")}
REGION_FIELDS = {"signature": (0, "4s"), "checksum": (4, "I"), "entry_count": (8, "I"), "reserved": (12, "I")}
REGION_ENTRY_FIELDS = {"guid": (0, "16s"), "file_offset": (16, "Q"), "length": (24, "I"), "required": (28, "I")}
METADATA_FIELDS = {"signature": (0, "8s"), "reserved": (8, "H"), "entry_count": (10, "H")}
METADATA_ENTRY_FIELDS = {"item_id": (0, "16s"), "offset": (16, "I"), "length": (20, "I"), "flags": (24, "I")}
LOG_HEADER_FIELDS = {"signature": (0, "4s"), "checksum": (4, "I"), "entry_length": (8, "I"), "tail": (12, "I"),
                     "sequence_number": (16, "Q"), "descriptor_count": (24, "I"), "reserved": (28, "I"),
                     "log_guid": (32, "16s"), "flushed_file_offset": (48, "Q"), "last_file_offset": (56, "Q")}
LOG_DESC_FIELDS = {"signature": (0, "4s"), "trailing_bytes": (4, "4s"), "leading_bytes": (8, "8s"),
                   "file_offset": (16, "Q"), "sequence_number": (24, "Q")}

# ---------------------------------------------------------------------- CRC-32C


def _make_tables() -> list[list[int]]:
    """The byte-wise table and its seven slicing-by-8 successors."""
    t0 = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t0.append(c)
    out = [t0]
    for _ in range(7):
        prev = out[-1]
        out.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return out


_T = _make_tables()
_CRC_TABLE = _T[0]
_PAIRS = struct.Struct("<II")


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass the previous result as ``crc`` to continue it.
    Slicing-by-8: eight bytes a step (about 3x the byte-wise loop in CPython)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    c = crc ^ 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n = len(mv) & ~7
    for one, two in _PAIRS.iter_unpack(mv[:n]):
        one ^= c
        c = (t7[one & 0xFF] ^ t6[(one >> 8) & 0xFF] ^ t5[(one >> 16) & 0xFF] ^ t4[one >> 24]
             ^ t3[two & 0xFF] ^ t2[(two >> 8) & 0xFF] ^ t1[(two >> 16) & 0xFF] ^ t0[two >> 24])
    for b in mv[n:]:
        c = t0[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def checksum(buf: bytes, at: int = 4) -> int:
    """CRC-32C of ``buf`` with the 4 bytes at ``at`` (its checksum field) taken as zero."""
    return crc32c(bytes(buf[at + 4:]), crc32c(bytes(4), crc32c(bytes(buf[:at]))))


def sign(buf: bytearray, at: int = 4) -> bytearray:
    """Store the checksum of ``buf`` into its checksum field (in place); returns ``buf``."""
    buf[at:at + 4] = bytes(4)
    struct.pack_into("<I", buf, at, crc32c(bytes(buf)))
    return buf


def guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


ZERO_GUID = uuid.UUID(int=0)


# ---------------------------------------------------------------------- file type identifier
def encode_file_identifier(creator: str) -> bytes:
    """The first 64 KiB: signature and creator (UTF-16LE, at most 256 characters)."""
    c = creator.encode("utf-16-le")[:512]
    return (FILE_SIGNATURE + c).ljust(64 * KiB, b"\0")


# ---------------------------------------------------------------------- headers
@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int


def decode_header(buf: bytes, where: str) -> Header:
    """One 4 KiB header; CorruptImage if its signature or checksum is wrong."""
    if len(buf) < HEADER_SIZE:
        raise CorruptImage(f"vhdx {where}: truncated ({len(buf)} bytes)")
    buf = bytes(buf[:HEADER_SIZE])
    sig, csum, seq, fw, dw, lg, lver, ver, llen, loff = _HEADER.unpack_from(buf)
    if sig != b"head":
        raise CorruptImage(f"vhdx {where}: bad signature {sig!r}")
    if checksum(buf) != csum:
        raise CorruptImage(f"vhdx {where}: checksum mismatch")
    return Header(seq, guid(fw), guid(dw), guid(lg), lver, ver, llen, loff)


def encode_header(h: Header) -> bytes:
    buf = bytearray(HEADER_SIZE)
    _HEADER.pack_into(buf, 0, b"head", 0, h.sequence_number, h.file_write_guid.bytes_le, h.data_write_guid.bytes_le,
                      h.log_guid.bytes_le, h.log_version, h.version, h.log_length, h.log_offset)
    return bytes(sign(buf))


# ---------------------------------------------------------------------- region table
@dataclass(frozen=True)
class Region:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool


def decode_region_table(buf: bytes, where: str) -> list[Region]:
    if len(buf) < REGION_TABLE_SIZE:
        raise CorruptImage(f"vhdx {where}: truncated")
    buf = bytes(buf[:REGION_TABLE_SIZE])
    sig, csum, count, _ = _REGION_HDR.unpack_from(buf)
    if sig != b"regi":
        raise CorruptImage(f"vhdx {where}: bad signature {sig!r}")
    if checksum(buf) != csum:
        raise CorruptImage(f"vhdx {where}: checksum mismatch")
    if count > MAX_REGION_ENTRIES:
        raise CorruptImage(f"vhdx {where}: {count} entries (at most {MAX_REGION_ENTRIES} fit)")
    out = []
    for i in range(count):
        g, off, length, flags = _REGION_ENTRY.unpack_from(buf, _REGION_HDR.size + i * _REGION_ENTRY.size)
        out.append(Region(guid(g), off, length, bool(flags & 1)))
    return out


def encode_region_table(regions: list[Region]) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    _REGION_HDR.pack_into(buf, 0, b"regi", 0, len(regions), 0)
    for i, r in enumerate(regions):
        _REGION_ENTRY.pack_into(buf, 16 + 32 * i, r.guid.bytes_le, r.file_offset, r.length, int(r.required))
    return bytes(sign(buf))


# ---------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int  # from the start of the metadata region
    length: int
    is_user: bool
    is_virtual_disk: bool
    is_required: bool


def decode_metadata_table(buf: bytes) -> list[MetadataEntry]:
    if len(buf) < METADATA_TABLE_SIZE:
        raise CorruptImage("vhdx metadata table: truncated")
    sig, _, count, _ = _META_HDR.unpack_from(buf)
    if sig != b"metadata":
        raise CorruptImage(f"vhdx metadata table: bad signature {sig!r}")
    if count > MAX_METADATA_ENTRIES:
        raise CorruptImage(f"vhdx metadata table: {count} entries (at most {MAX_METADATA_ENTRIES})")
    out = []
    for i in range(count):
        g, off, length, flags, _ = _META_ENTRY.unpack_from(buf, 32 + 32 * i)
        out.append(MetadataEntry(guid(g), off, length, bool(flags & 1), bool(flags & 2), bool(flags & 4)))
    return out


def encode_metadata_table(entries: list[MetadataEntry]) -> bytes:
    buf = bytearray(METADATA_TABLE_SIZE)
    _META_HDR.pack_into(buf, 0, b"metadata", 0, len(entries), bytes(20))
    for i, e in enumerate(entries):
        flags = int(e.is_user) | int(e.is_virtual_disk) << 1 | int(e.is_required) << 2
        _META_ENTRY.pack_into(buf, 32 + 32 * i, e.item_id.bytes_le, e.offset, e.length, flags, 0)
    return bytes(buf)


@dataclass(frozen=True)
class FileParameters:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool


def decode_file_parameters(buf: bytes) -> FileParameters:
    if len(buf) < 8:
        raise CorruptImage("vhdx file parameters: item shorter than 8 bytes")
    bs, flags = _FILE_PARAMS.unpack_from(buf)
    return FileParameters(bs, bool(flags & 1), bool(flags & 2))


def encode_file_parameters(p: FileParameters) -> bytes:
    return _FILE_PARAMS.pack(p.block_size, int(p.leave_blocks_allocated) | int(p.has_parent) << 1)


def decode_u32(buf: bytes, what: str) -> int:
    if len(buf) < 4:
        raise CorruptImage(f"vhdx {what}: item shorter than 4 bytes")
    return struct.unpack_from("<I", buf)[0]


def decode_u64(buf: bytes, what: str) -> int:
    if len(buf) < 8:
        raise CorruptImage(f"vhdx {what}: item shorter than 8 bytes")
    return struct.unpack_from("<Q", buf)[0]


# ---------------------------------------------------------------------- BAT
def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block (each bitmap block covers 2^23 sectors)."""
    return ((1 << 23) * logical_sector_size) // block_size


def bat_entries(virtual_size: int, block_size: int, ratio: int, has_parent: bool) -> int:
    """How many BAT entries the image has: payload entries, with a sector bitmap
    entry after every ``ratio`` of them."""
    blocks = -(-virtual_size // block_size)
    bitmaps = -(-blocks // ratio)
    if has_parent:
        return bitmaps * (ratio + 1)
    return blocks + (blocks - 1) // ratio if blocks else 0


def bat_index(block: int, ratio: int) -> int:
    """BAT index of payload block ``block``."""
    return block + block // ratio


def bat_entry(value: int) -> tuple[int, int]:
    """(state, file offset in bytes) of one 64-bit BAT entry."""
    return value & BAT_STATE_MASK, (value >> BAT_OFFSET_SHIFT) << 20


def make_bat_entry(state: int, file_offset: int) -> int:
    return (file_offset >> 20) << BAT_OFFSET_SHIFT | state


# ---------------------------------------------------------------------- log
@dataclass(frozen=True)
class LogEntryHeader:
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int


@dataclass(frozen=True)
class LogDescriptor:
    kind: str  # "zero" or "data"
    file_offset: int
    sequence_number: int
    zero_length: int = 0  # "zero"
    leading: bytes = b""  # "data": the sector's first 8 bytes
    trailing: bytes = b""  # "data": the sector's last 4 bytes


def decode_log_header(buf: bytes) -> LogEntryHeader | None:
    """The entry header at the start of a 4 KiB log sector, or None if the sector
    does not start with ``loge``.  The checksum is not checked here (it covers the
    whole entry: :func:`checksum` over ``entry_length`` bytes)."""
    sig, csum, elen, tail, seq, count, _, lg, flushed, last = _LOG_HDR.unpack_from(buf)
    if sig != b"loge":
        return None
    return LogEntryHeader(csum, elen, tail, seq, count, guid(lg), flushed, last)


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors holding the 64-byte entry header and ``count`` 32-byte descriptors."""
    return -(-(64 + 32 * count) // LOG_SECTOR)


def decode_log_descriptor(buf: bytes, pos: int) -> LogDescriptor:
    sig, trailing, leading, off, seq = _LOG_DESC.unpack_from(buf, pos)
    if sig == b"zero":
        return LogDescriptor("zero", off, seq, zero_length=struct.unpack("<Q", leading)[0])
    if sig == b"desc":
        return LogDescriptor("data", off, seq, leading=leading, trailing=trailing)
    raise CorruptImage(f"vhdx log: descriptor with bad signature {sig!r}")


def decode_log_data(buf: bytes, pos: int) -> tuple[int, bytes]:
    """(sequence number, the 4084 middle bytes) of a data sector; CorruptImage if it is none."""
    sig, high, data, low = _LOG_DATA.unpack_from(buf, pos)
    if sig != b"data":
        raise CorruptImage(f"vhdx log: data sector with bad signature {sig!r}")
    return high << 32 | low, data


def encode_log_entry(*, sequence_number: int, log_guid: uuid.UUID, tail: int, flushed_file_offset: int,
                     last_file_offset: int, writes: list[tuple[int, bytes | int]]) -> bytes:
    """A complete, signed log entry.  ``writes``: (file offset, a 4 KiB sector) for a
    data descriptor or (file offset, length) for a zero descriptor; offsets and
    lengths multiples of 4 KiB."""
    nsec = descriptor_sectors(len(writes))
    data_sectors = [w for w in writes if not isinstance(w[1], int)]
    buf = bytearray((nsec + len(data_sectors)) * LOG_SECTOR)
    _LOG_HDR.pack_into(buf, 0, b"loge", 0, len(buf), tail, sequence_number, len(writes), 0, log_guid.bytes_le,
                       flushed_file_offset, last_file_offset)
    dpos = nsec * LOG_SECTOR
    for i, (off, what) in enumerate(writes):
        pos = 64 + 32 * i
        if isinstance(what, int):
            _LOG_DESC.pack_into(buf, pos, b"zero", bytes(4), struct.pack("<Q", what), off, sequence_number)
            continue
        if len(what) != LOG_SECTOR:
            raise ValueError("a data descriptor carries exactly one 4 KiB sector")
        _LOG_DESC.pack_into(buf, pos, b"desc", what[4092:], what[:8], off, sequence_number)
        _LOG_DATA.pack_into(buf, dpos, b"data", sequence_number >> 32, what[8:4092], sequence_number & 0xFFFFFFFF)
        dpos += LOG_SECTOR
    return bytes(sign(buf))


# ---------------------------------------------------------------------- parent locator
def decode_parent_locator(buf: bytes) -> tuple[uuid.UUID, dict[str, str]]:
    """(locator type, key -> value) of a parent locator item; strings are UTF-16LE."""
    if len(buf) < 20:
        raise CorruptImage("vhdx parent locator: shorter than its 20-byte header")
    ltype, _, count = struct.unpack_from("<16sHH", buf)
    if 20 + 12 * count > len(buf):
        raise CorruptImage(f"vhdx parent locator: {count} entries do not fit in {len(buf)} bytes")
    out = {}
    for i in range(count):
        koff, voff, klen, vlen = struct.unpack_from("<IIHH", buf, 20 + 12 * i)
        if koff + klen > len(buf) or voff + vlen > len(buf) or klen == 0 or klen % 2 or vlen % 2:
            raise CorruptImage(f"vhdx parent locator: entry {i} lies outside the item or is not UTF-16")
        try:
            k = bytes(buf[koff:koff + klen]).decode("utf-16-le")
            v = bytes(buf[voff:voff + vlen]).decode("utf-16-le")
        except UnicodeDecodeError:
            raise CorruptImage(f"vhdx parent locator: entry {i} is not valid UTF-16") from None
        out[k] = v
    return guid(ltype), out


def encode_parent_locator(ltype: uuid.UUID, entries: dict[str, str]) -> bytes:
    """A parent locator item: header, key/value entries, then the UTF-16LE strings."""
    head = struct.pack("<16sHH", ltype.bytes_le, 0, len(entries))
    table, strings = b"", b""
    base = 20 + 12 * len(entries)
    for k, v in entries.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        koff = base + len(strings)
        strings += kb
        voff = base + len(strings)
        strings += vb
        table += struct.pack("<IIHH", koff, voff, len(kb), len(vb))
    return head + table + strings
