"""VMDK on-disk structures: bytes <-> frozen dataclasses, no I/O.

Written from VMware's "Virtual Disk Format 1.1" specification (see
``formats/vmdk.md``).  All numbers are little-endian.  This module is the only
place that knows the byte layout of the sparse extent header, of grain
directory and grain table entries, of streamOptimized markers, and the grammar
of the text descriptor; the driver (:mod:`vdisk.drivers.vmdk`) works with the
values.

Decoders check what the bytes themselves can tell (magic, lengths, field
ranges that do not depend on the file); checks against the file (offsets
inside it, tables not overlapping) belong to the driver, which knows its size.
Every decoder raises :class:`~vdisk.errors.CorruptImage` (or
``UnsupportedFeature``) with a message that names no file; callers prefix it.
"""

from __future__ import annotations

import array
import re
import struct
import zlib
from dataclasses import dataclass, replace

from ..errors import CorruptImage, UnsupportedFeature
from . import u32_bytes, u32_table

SECTOR = 512
MAGIC = b"KDMV"  # 0x564d444b little-endian
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
#: ESX's older copy-on-write extent (vmfsSparse), refused by name
COWD_MAGIC = b"COWD"

# header flags
FLAG_NL_TEST = 1 << 0  # the newline-detection characters are valid
FLAG_REDUNDANT_GT = 1 << 1  # a redundant grain directory and tables are kept
FLAG_ZEROED_GTE = 1 << 2  # a grain table entry of 1 means "a grain of zeros"
FLAG_COMPRESSED = 1 << 16  # grains are compressed
FLAG_MARKERS = 1 << 17  # grains and metadata are preceded by markers
FLAGS_KNOWN = FLAG_NL_TEST | FLAG_REDUNDANT_GT | FLAG_ZEROED_GTE | FLAG_COMPRESSED | FLAG_MARKERS

COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1

#: gdOffset of a streamOptimized header whose grain directory is found through the footer
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# marker types (a marker whose size field is 0 is a metadata marker)
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

GTE_UNALLOCATED = 0
GTE_ZERO = 1  # only with FLAG_ZEROED_GTE

# ---------------------------------------------------------------- limits (vdisk's, not the format's)
#: grain sizes accepted, in sectors: powers of two, 4 KiB .. 16 MiB (VMware and QEMU write 64 KiB)
MIN_GRAIN_SECTORS = 8
MAX_GRAIN_SECTORS = 32768
#: grain table entries per table: the specification fixes 512
GTES_PER_GT = 512
#: the largest capacity accepted: the 32-bit sector offsets of grain table entries
#: address 2 TiB of one extent file; the capacity itself is capped at 64 TiB
MAX_CAPACITY_SECTORS = (64 << 40) // SECTOR
#: the largest text descriptor read (embedded or a file of its own)
MAX_DESCRIPTOR_BYTES = 1 << 20
#: extents in one descriptor
MAX_EXTENTS = 4096


# ---------------------------------------------------------------- sparse extent header (512 bytes)
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # 79 bytes, then 433 bytes of padding
HEADER_SIZE = 512
assert _HEADER.size == 79

#: field -> (offset, size) in the header, for the spec test
HEADER_FIELDS = {
    "magicNumber": (0, 4), "version": (4, 4), "flags": (8, 4), "capacity": (12, 8), "grainSize": (20, 8),
    "descriptorOffset": (28, 8), "descriptorSize": (36, 8), "numGTEsPerGT": (44, 4), "rgdOffset": (48, 8),
    "gdOffset": (56, 8), "overHead": (64, 8), "uncleanShutdown": (72, 1), "singleEndLineChar": (73, 1),
    "nonEndLineChar": (74, 1), "doubleEndLineChar1": (75, 1), "doubleEndLineChar2": (76, 1),
    "compressAlgorithm": (77, 2), "pad": (79, 433),
}
NEWLINE_CHARS = b"\n \r\n"


@dataclass(frozen=True)
class SparseHeader:
    """A hosted sparse extent header; every offset and size is in sectors."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int = 0
    compress_algorithm: int = COMPRESS_NONE
    newline_chars: bytes = NEWLINE_CHARS

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def redundant(self) -> bool:
        return bool(self.flags & FLAG_REDUNDANT_GT)

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def gt_coverage(self) -> int:
        """Sectors one grain table covers."""
        return self.gtes_per_gt * self.grain_size

    @property
    def gd_entries(self) -> int:
        return -(-self.capacity // self.gt_coverage)

    @property
    def gt_sectors(self) -> int:
        """Sectors one grain table occupies."""
        return -(-self.gtes_per_gt * 4 // SECTOR)

    @property
    def gd_sectors(self) -> int:
        return -(-self.gd_entries * 4 // SECTOR)

    def encode(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, self.flags, self.capacity, self.grain_size, self.descriptor_offset,
                           self.descriptor_size, self.gtes_per_gt, self.rgd_offset, self.gd_offset, self.overhead,
                           self.unclean_shutdown, self.newline_chars, self.compress_algorithm)
        return raw + bytes(HEADER_SIZE - len(raw))

    def with_(self, **kw) -> SparseHeader:
        return replace(self, **kw)


def decode_header(buf: bytes) -> SparseHeader:
    """Parse and range-check a sparse extent header (the first 512 bytes of a
    monolithicSparse/streamOptimized file, or a streamOptimized footer's copy)."""
    if len(buf) < HEADER_SIZE:
        raise CorruptImage(f"sparse header truncated ({len(buf)} of {HEADER_SIZE} bytes)")
    (magic, version, flags, capacity, grain, d_off, d_size, ngte, rgd, gd, overhead, unclean, nl,
     algo) = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        if magic == COWD_MAGIC:
            raise UnsupportedFeature("an ESX COWD (vmfsSparse) extent, which vdisk does not support")
        raise CorruptImage(f"bad sparse extent magic {magic!r}")
    if version not in (1, 2, 3):
        raise UnsupportedFeature(f"sparse extent version {version} (vdisk reads versions 1 to 3)")
    unknown = flags & ~FLAGS_KNOWN
    if unknown:
        raise UnsupportedFeature(f"unknown sparse extent flags {unknown:#x}")
    if flags & FLAG_NL_TEST and nl != NEWLINE_CHARS:
        raise CorruptImage("newline-detection characters are damaged (the file went through a text-mode copy?)")
    if grain & (grain - 1) or not MIN_GRAIN_SECTORS <= grain <= MAX_GRAIN_SECTORS:
        raise UnsupportedFeature(f"grain size of {grain} sectors (vdisk reads powers of two from "
                                 f"{MIN_GRAIN_SECTORS} to {MAX_GRAIN_SECTORS})")
    if ngte != GTES_PER_GT:
        raise UnsupportedFeature(f"{ngte} grain table entries per table (the specification fixes {GTES_PER_GT})")
    if capacity > MAX_CAPACITY_SECTORS:
        raise UnsupportedFeature(f"capacity of {capacity} sectors is past vdisk's limit of {MAX_CAPACITY_SECTORS}")
    compressed = bool(flags & FLAG_COMPRESSED)
    if compressed and algo != COMPRESS_DEFLATE:
        raise UnsupportedFeature(f"compression algorithm {algo} (vdisk reads deflate, 1)")
    if not compressed and algo not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise UnsupportedFeature(f"compression algorithm {algo}")
    if flags & FLAG_MARKERS and not compressed:
        raise UnsupportedFeature("markers without compressed grains")
    return SparseHeader(version, flags, capacity, grain, d_off, d_size, ngte, rgd, gd, overhead, unclean,
                        algo if compressed else COMPRESS_NONE, nl)


# ---------------------------------------------------------------- grain directory / tables
def decode_entries(buf: bytes) -> array.array:
    """Little-endian uint32 entries (grain directory or grain table), sector numbers."""
    if len(buf) % 4:
        raise CorruptImage("table length is not a multiple of 4 bytes")
    return u32_table(buf, len(buf) // 4, "little")


def encode_entries(a: array.array) -> bytes:
    return u32_bytes(a, "little")


# ---------------------------------------------------------------- streamOptimized markers
_MARKER = struct.Struct("<QII")  # lba/numSectors, size, type (the type only when size == 0)
MARKER_HEAD = 12  # a grain marker's lba + size precede its compressed data
MARKER_FIELDS = {"val": (0, 8), "size": (8, 4), "type": (12, 4), "pad": (16, 496)}


@dataclass(frozen=True)
class Marker:
    """A marker: ``size`` > 0 is a compressed grain (``val``: its first guest
    sector); ``size`` 0 is a metadata marker of ``type`` (``val``: the sectors of
    metadata that follow it)."""

    val: int
    size: int
    type: int = 0

    @property
    def is_grain(self) -> bool:
        return self.size > 0


def decode_marker(buf: bytes) -> Marker:
    if len(buf) < 16:
        raise CorruptImage("marker truncated")
    val, size, typ = _MARKER.unpack_from(buf, 0)
    if size:
        return Marker(val, size)
    if typ not in (MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER):
        raise CorruptImage(f"unknown marker type {typ}")
    return Marker(val, 0, typ)


def encode_meta_marker(typ: int, sectors: int) -> bytes:
    """A metadata marker sector (type, number of sectors that follow)."""
    return _MARKER.pack(sectors, 0, typ) + bytes(SECTOR - _MARKER.size)


def encode_grain(lba: int, data: bytes, level: int = 6) -> bytes:
    """A compressed grain: marker head + zlib stream, padded to whole sectors."""
    comp = zlib.compress(data, level)
    raw = struct.pack("<QI", lba, len(comp)) + comp
    return raw + bytes(-len(raw) % SECTOR)


def inflate_grain(comp: bytes, grain_bytes: int) -> bytes:
    """Inflate one compressed grain, producing at most ``grain_bytes``: a stream
    that would inflate past the grain is refused before more is produced.  A
    short result (the last grain of a disk) is zero-padded to the grain."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(comp, grain_bytes)
        if d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1):
            raise CorruptImage(f"compressed grain inflates past the grain size ({grain_bytes} bytes)")
    except zlib.error as exc:
        raise CorruptImage(f"compressed grain is not valid deflate data ({exc})") from None
    if not d.eof:
        raise CorruptImage("compressed grain ends before its deflate stream does")
    return out + bytes(grain_bytes - len(out)) if len(out) < grain_bytes else out


# ---------------------------------------------------------------- text descriptor
EXTENT_TYPES_READ = ("FLAT", "SPARSE", "ZERO", "VMFS")
ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
NO_PARENT_CID = 0xFFFFFFFF

_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)[ \t]+(\d+)[ \t]+([A-Z]+)(?:[ \t]+"([^"]*)"(?:[ \t]+(\d+))?)?$')
# lines are stripped before matching, and no pattern may backtrack over a long line
_KEY_RE = re.compile(r'^([A-Za-z][A-Za-z0-9_.]*)[ \t]*=[ \t]*(.*)$')


@dataclass(frozen=True)
class ExtentLine:
    access: str  # RW, RDONLY, NOACCESS
    sectors: int
    type: str  # FLAT, SPARSE, ZERO, VMFS
    filename: str | None = None
    offset: int = 0  # sectors into the file (FLAT)


@dataclass(frozen=True)
class Descriptor:
    version: int
    cid: int
    parent_cid: int
    create_type: str
    extents: tuple[ExtentLine, ...]
    parent_hint: str | None = None
    #: every ``key = value`` pair in order (ddb.* included), values unquoted
    entries: tuple[tuple[str, str], ...] = ()

    @property
    def sectors(self) -> int:
        return sum(e.sectors for e in self.extents)

    def get(self, key: str) -> str | None:
        for k, v in self.entries:
            if k == key:
                return v
        return None


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v


def _hex32(key: str, v: str) -> int:
    try:
        n = int(v, 16)
    except ValueError:
        raise CorruptImage(f"descriptor: {key}={v!r} is not a hexadecimal number") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise CorruptImage(f"descriptor: {key}={v!r} is not a 32-bit number")
    return n


def looks_like_descriptor(head: bytes) -> bool:
    return head.startswith(DESCRIPTOR_MAGIC)


def decode_descriptor(raw: bytes) -> Descriptor:
    """Parse a text descriptor (ASCII/UTF-8, NUL-terminated when embedded).  The
    subset accepted is written down in ``formats/vmdk.md``."""
    if len(raw) > MAX_DESCRIPTOR_BYTES:
        raise CorruptImage(f"descriptor of {len(raw)} bytes is larger than vdisk's limit of {MAX_DESCRIPTOR_BYTES}")
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImage("descriptor is not UTF-8 text") from None
    if not text.startswith(DESCRIPTOR_MAGIC.decode()):
        raise CorruptImage("descriptor does not start with '# Disk DescriptorFile'")
    entries: list[tuple[str, str]] = []
    extents: list[ExtentLine] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, typ, name, off = m.groups()
            if typ not in EXTENT_TYPES_READ:
                raise UnsupportedFeature(f"descriptor line {lineno}: extent type {typ} (vdisk reads "
                                         f"{', '.join(EXTENT_TYPES_READ)})")
            if typ != "ZERO" and not name:
                raise CorruptImage(f"descriptor line {lineno}: a {typ} extent names no file")
            if typ == "SPARSE" and off not in (None, "0"):
                raise CorruptImage(f"descriptor line {lineno}: a SPARSE extent with an offset")
            if int(sectors) > MAX_CAPACITY_SECTORS or (off and int(off) > MAX_CAPACITY_SECTORS):
                raise UnsupportedFeature(f"descriptor line {lineno}: extent past vdisk's size limit")
            if name is not None and ("\0" in name or not name):
                raise CorruptImage(f"descriptor line {lineno}: empty extent file name")
            extents.append(ExtentLine(access, int(sectors), typ, name, int(off or 0)))
            if len(extents) > MAX_EXTENTS:
                raise UnsupportedFeature(f"descriptor names more than {MAX_EXTENTS} extents")
            continue
        m = _KEY_RE.match(line)
        if not m:
            raise CorruptImage(f"descriptor line {lineno} is neither 'key = value' nor an extent: {line[:60]!r}")
        entries.append((m.group(1), _unquote(m.group(2))))
    keys = dict(entries)
    try:
        version = int(keys.get("version", "1"))
    except ValueError:
        raise CorruptImage(f"descriptor: version={keys.get('version')!r} is not a number") from None
    if version not in (1, 2, 3):
        raise UnsupportedFeature(f"descriptor version {version}")
    cid = _hex32("CID", keys["CID"]) if "CID" in keys else NO_PARENT_CID
    parent_cid = _hex32("parentCID", keys["parentCID"]) if "parentCID" in keys else NO_PARENT_CID
    create_type = keys.get("createType", "")
    if not extents:
        raise CorruptImage("descriptor names no extents")
    hint = keys.get("parentFileNameHint")
    if hint is not None and ("\0" in hint or not hint):
        raise CorruptImage("descriptor: empty parentFileNameHint")
    return Descriptor(version, cid, parent_cid, create_type, tuple(extents), hint, tuple(entries))


def encode_descriptor(*, cid: int, parent_cid: int, create_type: str, extents: list[ExtentLine],
                      parent_hint: str | None = None, ddb: list[tuple[str, str]] | None = None) -> bytes:
    """A text descriptor as VMware and qemu-img write them."""
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:08x}", f"parentCID={parent_cid:08x}",
             f'createType="{create_type}"']
    if parent_hint is not None:
        if '"' in parent_hint or "\n" in parent_hint:
            raise CorruptImage("a parent file name may not hold quotes or newlines")
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description"]
    for e in extents:
        s = f"{e.access} {e.sectors} {e.type}"
        if e.filename is not None:
            if '"' in e.filename or "\n" in e.filename:
                raise CorruptImage("an extent file name may not hold quotes or newlines")
            s += f' "{e.filename}"'
            if e.type == "FLAT":
                s += f" {e.offset}"
        lines.append(s)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    for k, v in ddb or ():
        lines.append(f'{k} = "{v}"')
    return ("\n".join(lines) + "\n").encode()


def geometry(sectors: int) -> tuple[int, int, int]:
    """CHS geometry for the descriptor's ddb, as VMware's IDE disks: 16 heads, 63 sectors."""
    cyl = min(sectors // (16 * 63), 16383)
    return max(cyl, 1), 16, 63
