"""qcow2 on-disk structures: bytes <-> frozen dataclasses, no I/O.

Written from the public specification (QEMU ``docs/interop/qcow2.txt``).  All
numbers in qcow2 are big-endian.  This module is the only place that knows the
byte layout of the header, header extensions, L1/L2 entries and refcount entries
(and of the header cluster, extended L2 entries and vdisk's own header
extension); the snapshot table is :mod:`vdisk.codec.qcow2_snapshot`'s; the driver (:mod:`vdisk.drivers.qcow2`) works with the values.

Decoders check only what the bytes themselves can tell (lengths, magic, padding
bounds); semantic checks against the file (offsets inside it, table sizes against
the virtual size) belong to the driver, which knows the file size.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass, replace

from ..errors import CorruptImage

MAGIC = b"QFI\xfb"

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
#: vdisk's own extension (unknown types are ignored and preserved by other readers):
#: ASCII options, currently ``compress=zlib`` or ``compress=zstd`` -- the image was
#: created with compression and full-cluster writes are stored compressed.
EXT_VDISK_OPTIONS = 0x76644B31  # "vdK1"

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112  # through compression_type, padded to a multiple of 8

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3_TAIL = struct.Struct(">QQQII")  # 32 bytes: 72..103

# L1 / L2 / refcount-table entry fields
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
FLAG_COPIED = 1 << 63
FLAG_COMPRESSED = 1 << 62
FLAG_ZERO = 1 << 0
L1_RESERVED = 0x7F000000000001FF
L2_STD_RESERVED = 0x3F000000000001FE
REFTABLE_RESERVED = 0x1FF

assert _HEADER_V2.size == 72 and _HEADER_V3_TAIL.size == 32


# ---------------------------------------------------------------------- header
@dataclass(frozen=True)
class Header:
    """The qcow2 header, decoded (QEMU's docs/interop/qcow2.txt)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    #: header bytes past the fields this module knows (v3, header_length > 105), kept verbatim
    unknown_fields: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def replace(self, **kw) -> Header:
        return replace(self, **kw)


def decode_header(buf: bytes) -> Header:
    """Decode the header at the start of ``buf`` (which should hold the first cluster,
    or at least the first 4 KiB).  Raises ``CorruptImage`` for a bad magic/length."""
    if len(buf) < V2_HEADER_LENGTH:
        raise CorruptImage(f"qcow2 header: file too short ({len(buf)} bytes) for a qcow2 header")
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap, snap_off) = (
        _HEADER_V2.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise CorruptImage(f"qcow2 header: bad magic {magic!r} (expected {MAGIC!r})")
    common = dict(
        version=version,
        backing_file_offset=bfo,
        backing_file_size=bfs,
        cluster_bits=cbits,
        size=size,
        crypt_method=crypt,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
    )
    if version < 3:
        return Header(**common)
    if len(buf) < V3_MIN_HEADER_LENGTH:
        raise CorruptImage("qcow2 header: version 3 header truncated")
    incompat, compat, autoclear, rorder, hlen = _HEADER_V3_TAIL.unpack_from(buf, 72)
    if hlen < V3_MIN_HEADER_LENGTH:
        raise CorruptImage(f"qcow2 header: header_length {hlen} is below the minimum of {V3_MIN_HEADER_LENGTH}")
    if hlen % 8:
        raise CorruptImage(f"qcow2 header: header_length {hlen} is not a multiple of 8")
    if hlen > len(buf):
        raise CorruptImage(f"qcow2 header: header_length {hlen} runs past the first cluster")
    ctype = buf[104] if hlen > 104 else 0
    unknown = bytes(buf[V3_HEADER_LENGTH:hlen]) if hlen > V3_HEADER_LENGTH else b""
    return Header(
        **common,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=rorder,
        header_length=hlen,
        compression_type=ctype,
        unknown_fields=unknown,
    )


def encode_header(h: Header) -> bytes:
    """The ``header_length`` bytes of ``h`` (72 for version 2)."""
    out = _HEADER_V2.pack(
        MAGIC,
        h.version,
        h.backing_file_offset,
        h.backing_file_size,
        h.cluster_bits,
        h.size,
        h.crypt_method,
        h.l1_size,
        h.l1_table_offset,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        h.nb_snapshots,
        h.snapshots_offset,
    )
    if h.version < 3:
        return out
    out += _HEADER_V3_TAIL.pack(
        h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order, h.header_length
    )
    if h.header_length > 104:
        tail = bytes([h.compression_type]) + bytes(7)  # compression_type + padding to 112
        out += tail[: h.header_length - 104]
    if h.header_length > V3_HEADER_LENGTH:
        out += h.unknown_fields.ljust(h.header_length - V3_HEADER_LENGTH, b"\0")
    return out


# ---------------------------------------------------------------------- header extensions
@dataclass(frozen=True)
class HeaderExtension:
    """One header extension: its type and raw data."""

    type: int
    data: bytes


@dataclass(frozen=True)
class FeatureName:
    """One entry of the feature name table."""

    kind: int  # 0 incompatible, 1 compatible, 2 autoclear
    bit: int
    name: str


def decode_extensions(buf: bytes, start: int, end: int) -> list[HeaderExtension]:
    """Header extensions in ``buf[start:end]`` up to the end marker.  ``end`` bounds
    the area (the end of the first cluster, or the backing file name if earlier)."""
    out: list[HeaderExtension] = []
    pos = start
    while True:
        if pos + 8 > end:
            # no room for an end marker: treat the area as ended (QEMU writes one, but
            # a header filling the cluster exactly is not an error)
            return out
        etype, elen = struct.unpack_from(">II", buf, pos)
        if etype == EXT_END:
            return out
        if elen > end - pos - 8:
            raise CorruptImage(
                f"qcow2 header extension 0x{etype:08x} at byte {pos}: length {elen} runs past the header area"
            )
        out.append(HeaderExtension(etype, bytes(buf[pos + 8 : pos + 8 + elen])))
        pos += 8 + ((elen + 7) & ~7)
        if len(out) > 4096:
            raise CorruptImage("qcow2 header: too many header extensions")


def encode_extensions(exts: list[HeaderExtension]) -> bytes:
    """Extensions followed by the end marker, each padded to 8 bytes."""
    out = bytearray()
    for e in exts:
        out += struct.pack(">II", e.type, len(e.data)) + e.data
        out += bytes(-len(out) % 8)
    out += bytes(8)
    return bytes(out)


def decode_feature_table(data: bytes) -> list[FeatureName]:
    out = []
    for pos in range(0, len(data) - len(data) % 48, 48):
        kind, bit = data[pos], data[pos + 1]
        name = data[pos + 2 : pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append(FeatureName(kind, bit, name))
    return out


def encode_feature_table(names: list[FeatureName]) -> bytes:
    return b"".join(bytes([f.kind, f.bit]) + f.name.encode()[:46].ljust(46, b"\0") for f in names)


def default_feature_table() -> list[FeatureName]:
    return [FeatureName(k, b, n) for (k, b), n in sorted(FEATURE_NAMES.items())]


def backing_format_extension(fmt: str) -> HeaderExtension:
    """The backing-format extension naming ``fmt`` (the name's bytes, no terminator)."""
    return HeaderExtension(EXT_BACKING_FORMAT, fmt.encode())


def backing_format(exts: list[HeaderExtension]) -> str | None:
    """The backing format the extensions record (the last such extension), or None."""
    fmt = None
    for e in exts:
        if e.type == EXT_BACKING_FORMAT:
            fmt = e.data.decode("utf-8", "replace")
    return fmt


def encode_vdisk_options(options: dict[str, str]) -> HeaderExtension:
    """vdisk's own extension: ASCII ``key=value`` pairs separated by commas."""
    return HeaderExtension(EXT_VDISK_OPTIONS, ",".join(f"{k}={v}" for k, v in options.items()).encode("ascii"))


def decode_vdisk_options(data: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of vdisk's extension (pairs without '=' are ignored)."""
    return dict(kv.split("=", 1) for kv in data.decode("ascii", "replace").split(",") if "=" in kv)


def encode_header_area(
    hdr: Header, exts: list[HeaderExtension], backing_name: bytes, cluster_size: int
) -> bytes | None:
    """The start of the first cluster: header, extensions (with the end marker), then the
    backing file name right after them -- ``backing_file_offset``/``_size`` set to
    where it lands (0 without a name).  None if that does not fit in one cluster."""
    base = encode_header(hdr)
    ext = encode_extensions(exts)
    bfo = len(base) + len(ext) if backing_name else 0
    if len(base) + len(ext) + len(backing_name) > cluster_size:
        return None
    hdr = hdr.replace(backing_file_offset=bfo, backing_file_size=len(backing_name))
    return encode_header(hdr) + ext + backing_name


# ---------------------------------------------------------------------- L1 / L2 entries
@dataclass(frozen=True)
class L1Entry:
    """One L1 entry, decoded."""

    l2_offset: int  # 0: no L2 table
    copied: bool
    reserved: int  # reserved bits that are set (should be 0)


def decode_l1_entry(e: int) -> L1Entry:
    return L1Entry(e & OFFSET_MASK, bool(e & FLAG_COPIED), e & L1_RESERVED)


def encode_l1_entry(l2_offset: int, copied: bool) -> int:
    return (l2_offset & OFFSET_MASK) | (FLAG_COPIED if copied and l2_offset else 0)


# kinds of L2 entries
UNALLOCATED = 0
ZERO = 1  # reads as zeros; host_offset may describe a preallocated cluster
NORMAL = 2
COMPRESSED = 3


@dataclass(frozen=True)
class L2Entry:
    """One L2 entry, decoded."""

    kind: int
    host_offset: int = 0  # NORMAL/ZERO: cluster offset; COMPRESSED: byte offset of the data
    copied: bool = False
    compressed_size: int = 0  # COMPRESSED: bytes from host_offset to the end of its last sector
    reserved: int = 0


def compressed_layout(cluster_bits: int) -> tuple[int, int]:
    """(number of offset bits x, mask of the sector-count field) for compressed descriptors."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << (cluster_bits - 8)) - 1


def decode_l2_entry(e: int, cluster_bits: int) -> L2Entry:
    if e & FLAG_COMPRESSED:
        x, smask = compressed_layout(cluster_bits)
        off = e & ((1 << x) - 1)
        nsect = ((e >> x) & smask) + 1
        return L2Entry(COMPRESSED, off, False, nsect * 512 - (off & 511), e & FLAG_COPIED)
    off = e & OFFSET_MASK
    copied = bool(e & FLAG_COPIED)
    if e & FLAG_ZERO:
        return L2Entry(ZERO, off, copied, 0, e & L2_STD_RESERVED)
    if off == 0:
        return L2Entry(UNALLOCATED, 0, copied, 0, e & L2_STD_RESERVED)
    return L2Entry(NORMAL, off, copied, 0, e & L2_STD_RESERVED)


def encode_normal(host_offset: int, copied: bool) -> int:
    return host_offset | (FLAG_COPIED if copied else 0)


def encode_zero(host_offset: int = 0, copied: bool = False) -> int:
    return host_offset | FLAG_ZERO | (FLAG_COPIED if copied and host_offset else 0)


def encode_compressed(host_offset: int, length: int, cluster_bits: int) -> int:
    """A compressed descriptor for ``length`` bytes of compressed data at byte ``host_offset``."""
    x, smask = compressed_layout(cluster_bits)
    extra = ((host_offset + length - 1) >> 9) - (host_offset >> 9)
    if host_offset >> x or extra > smask or length <= 0:
        raise ValueError("compressed cluster does not fit a descriptor")
    return FLAG_COMPRESSED | (extra << x) | host_offset


def compressed_host_range(e: L2Entry) -> tuple[int, int]:
    """[start, end) host bytes a compressed entry occupies (as refcounted)."""
    return e.host_offset, e.host_offset + e.compressed_size


def l2_entries(cluster_size: int, extended: bool) -> int:
    """Entries of one L2 table: 8 bytes each, 16 with extended L2 entries."""
    return cluster_size // 16 if extended else cluster_size // 8


# extended L2 entries: two u64 words per entry, the standard descriptor then a
# bitmap of 32 subclusters (low half: allocated, high half: reads as zeros)
SUBCLUSTERS = 32


def ext_l2_descriptor(e: int) -> int:
    """The first word of an extended L2 entry as a standard descriptor: bit 0 is not
    a zero flag there (the bitmap says), so it is cleared unless compressed."""
    return e if e & FLAG_COMPRESSED else e & ~FLAG_ZERO


def decode_subcluster_bitmap(bm: int) -> tuple[int, int]:
    """(allocated bits, zero bits) of an extended L2 entry's bitmap, bit i = subcluster i."""
    return bm & 0xFFFFFFFF, bm >> 32


# ---------------------------------------------------------------------- tables of u64
def decode_u64_table(buf: bytes) -> array.array:
    """Big-endian u64 table (L1, L2, refcount table) -> array('Q') of host-order ints
    (8 bytes an entry; no intermediate copy of ``buf``)."""
    n = len(buf) // 8
    a = array.array("Q")
    a.frombytes(memoryview(buf)[: n * 8])
    if sys.byteorder == "little":
        a.byteswap()
    return a


def extend_u64_table(a: array.array, buf) -> None:
    """Append the big-endian u64 entries of ``buf`` (a whole number of them) to ``a``,
    so a big table can be decoded piece by piece as it is read."""
    a.extend(decode_u64_table(buf))


def encode_u64_table(a) -> bytes:
    b = array.array("Q", a)
    if sys.byteorder == "little":
        b.byteswap()
    return b.tobytes()


# ---------------------------------------------------------------------- refcount blocks
_RC_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def _typecode(order: int) -> str:
    tc = _RC_TYPECODES[order]
    if order == 5 and array.array("I").itemsize != 4:
        tc = "L"
    return tc


def refcount_max(order: int) -> int:
    return (1 << (1 << order)) - 1


def refblock_entries(cluster_size: int, order: int) -> int:
    """Refcounts in one refcount block of ``1 << order`` bits each."""
    return (cluster_size * 8) >> order


def decode_refblock(buf: bytes, order: int) -> array.array:
    """A refcount block -> array of ints, one per cluster (``len(buf)*8 >> order`` entries)."""
    if order >= 3:
        a = array.array(_typecode(order))
        a.frombytes(bytes(buf))
        if sys.byteorder == "little" and a.itemsize > 1:
            a.byteswap()
        return a
    bits = 1 << order
    per = 8 // bits
    mask = (1 << bits) - 1
    out = array.array("B", bytes(len(buf) * per))
    for i, byte in enumerate(buf):
        if byte:
            for j in range(per):
                out[i * per + j] = (byte >> (j * bits)) & mask
    return out


def new_refblock(cluster_size: int, order: int) -> array.array:
    return decode_refblock(bytes(cluster_size), order)


def encode_refblock(a: array.array, order: int) -> bytes:
    if order >= 3:
        b = array.array(a.typecode, a)
        if sys.byteorder == "little" and b.itemsize > 1:
            b.byteswap()
        return b.tobytes()
    bits = 1 << order
    per = 8 // bits
    out = bytearray(len(a) // per)
    for i in range(len(out)):
        v = 0
        for j in range(per):
            v |= a[i * per + j] << (j * bits)
        out[i] = v
    return bytes(out)


# ---------------------------------------------------------------------- compression
def compress_cluster(data: bytes, ctype: int) -> bytes:
    """Compress one cluster: raw deflate (no zlib header) or a zstd frame."""
    if ctype == COMPRESSION_ZLIB:
        import zlib

        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if ctype == COMPRESSION_ZSTD:
        import zstandard

        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    raise ValueError(f"unknown compression type {ctype}")


def decompress_cluster(buf: bytes, ctype: int, cluster_size: int) -> bytes:
    """Decompress until one cluster is produced; bytes past the stream are ignored.
    Raises ``CorruptImage`` if the stream is bad or too short.  Never allocates more
    than about one cluster, whatever the stream claims or expands to: zlib output
    is capped at ``cluster_size``; zstd goes through the shared bounded decoder
    (:func:`vdisk.codec.zstd.decompress_bounded`, QEMU's rules: frames up to
    exactly one cluster, then anything)."""
    try:
        if ctype == COMPRESSION_ZLIB:
            import zlib

            d = zlib.decompressobj(-15)
            out = d.decompress(buf, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            from .zstd import decompress_bounded

            out = decompress_bounded(buf, cluster_size, exact=False)
        else:
            raise CorruptImage(f"unknown compression type {ctype}")
    except CorruptImage as exc:
        raise CorruptImage(f"compressed cluster: {exc}") from None
    except Exception as exc:  # zlib.error
        raise CorruptImage(f"compressed cluster does not decompress: {exc}") from None
    if len(out) != cluster_size:
        raise CorruptImage(f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out
