"""VHD ("vpc") on-disk structures: bytes <-> frozen dataclasses, no I/O.

Written from Microsoft's public "Virtual Hard Disk Image Format Specification"
(version 1.0, 2006); the facts vdisk relies on are in ``formats/vhd.md``.  Every
number in a VHD is big-endian.  This module knows the byte layouts of the footer
(512 bytes, also copied at offset 0 of dynamic and differencing disks), the dynamic
disk header (1024 bytes) with its eight parent locator entries, the block
allocation table (BAT) and the per-block sector bitmaps, the checksum and the CHS
geometry algorithm.  The driver (:mod:`vdisk.drivers.vhd`) works with the values.

Decoders check what the bytes alone can tell (cookies, checksums, reserved values);
checks against the file (offsets inside it, BAT entries that overlap) are the
driver's, which knows the file's size.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass, replace

from ..errors import CorruptImage
from . import u32_bytes, u32_table

SECTOR = 512
FOOTER_COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
FEATURES_RESERVED = 0x2  # "must always be set"
FORMAT_VERSION = 0x00010000
DYN_VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # a fixed disk's data offset
BAT_UNUSED = 0xFFFFFFFF

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
TYPE_NAMES = {0: "none", 1: "reserved (deprecated)", TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic",
              TYPE_DIFFERENCING: "differencing", 5: "reserved (deprecated)", 6: "reserved (deprecated)"}

#: seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC)
EPOCH_OFFSET = 946684800

#: the largest CHS geometry a footer can hold (the specification's algorithm caps here)
MAX_CHS = (65535, 16, 255)

#: creator applications whose disks are sized by the footer's current size, not by the
#: CHS geometry (the rule QEMU follows, so that both read the same size; see formats/vhd.md)
SIZE_BY_CURRENT_SIZE = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", b"vdsk")
CREATOR_APP = b"vdsk"
CREATOR_VERSION = 0x00010000
CREATOR_HOST_OS = b"Wi2k"  # the specification's two codes are "Wi2k" and "Mac "; QEMU writes Wi2k too

# parent locator platform codes
PLAT_NONE = b"\0\0\0\0"
PLAT_W2RU = b"W2ru"  # Windows relative path, UTF-16 little-endian
PLAT_W2KU = b"W2ku"  # Windows absolute path, UTF-16 little-endian
PLAT_WI2R = b"Wi2r"  # deprecated: relative path, ANSI
PLAT_WI2K = b"Wi2k"  # deprecated: absolute path, ANSI
PLAT_MAC = b"Mac "  # Mac OS alias blob (not a path)
PLAT_MACX = b"MacX"  # file URL, UTF-8
LOCATORS = 8

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_DYN = struct.Struct(">8sQQIIII16sII512s")  # 576 bytes, then the locators, then 256 reserved
_LOCATOR = struct.Struct(">4sIIIQ")
DYN_LOCATORS_OFFSET = 576
assert _FOOTER.size == FOOTER_SIZE and _DYN.size == 576 and _LOCATOR.size == 24

#: field -> (offset, size) in the footer (checked against formats/vhd.md by tests/test_vhd.py)
FOOTER_FIELDS = {
    "cookie": (0, 8), "features": (8, 4), "file_format_version": (12, 4), "data_offset": (16, 8),
    "timestamp": (24, 4), "creator_application": (28, 4), "creator_version": (32, 4),
    "creator_host_os": (36, 4), "original_size": (40, 8), "current_size": (48, 8), "disk_geometry": (56, 4),
    "disk_type": (60, 4), "checksum": (64, 4), "unique_id": (68, 16), "saved_state": (84, 1),
    "reserved": (85, 427),
}
DYN_FIELDS = {
    "cookie": (0, 8), "data_offset": (8, 8), "table_offset": (16, 8), "header_version": (24, 4),
    "max_table_entries": (28, 4), "block_size": (32, 4), "checksum": (36, 4), "parent_unique_id": (40, 16),
    "parent_timestamp": (56, 4), "reserved1": (60, 4), "parent_unicode_name": (64, 512),
    "parent_locator_entries": (576, 192), "reserved2": (768, 256),
}
LOCATOR_FIELDS = {"platform_code": (0, 4), "platform_data_space": (4, 4), "platform_data_length": (8, 4),
                  "reserved": (12, 4), "platform_data_offset": (16, 8)}


def checksum(buf: bytes, field_offset: int) -> int:
    """The one's complement of the byte sum of ``buf`` with the 4-byte checksum field
    at ``field_offset`` taken as zeros (the specification's footer/header checksum)."""
    total = sum(buf) - sum(buf[field_offset:field_offset + 4])
    return (~total) & 0xFFFFFFFF


def geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of ``total_sectors``: the
    specification's algorithm (appendix "CHS calculation"), which rounds down and caps
    at 65535 x 16 x 255."""
    ts = min(total_sectors, 65535 * 16 * 255)
    if ts >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = ts // spt
    else:
        spt = 17
        cth = ts // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = ts // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = ts // spt
    return cth // heads, heads, spt


def chs_bytes(chs: tuple[int, int, int]) -> int:
    c, h, s = chs
    return c * h * s * SECTOR


# ---------------------------------------------------------------------- footer
@dataclass(frozen=True)
class Footer:
    disk_type: int
    current_size: int
    original_size: int
    data_offset: int  # the dynamic header's offset; NO_DATA_OFFSET for a fixed disk
    geometry: tuple[int, int, int]
    unique_id: bytes
    timestamp: int = 0
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS
    features: int = FEATURES_RESERVED
    version: int = FORMAT_VERSION
    saved_state: int = 0

    def replace(self, **kw) -> Footer:
        return replace(self, **kw)

    @property
    def sized_by_current_size(self) -> bool:
        """True when the guest size is ``current_size``; else it is the CHS product."""
        return self.creator_app in SIZE_BY_CURRENT_SIZE or self.geometry == MAX_CHS

    @property
    def guest_size(self) -> int:
        if self.sized_by_current_size:
            return self.current_size // SECTOR * SECTOR
        return chs_bytes(self.geometry)


def decode_footer(buf: bytes) -> Footer:
    """Decode 512 bytes of footer; CorruptImage for a bad cookie or checksum."""
    if len(buf) < FOOTER_SIZE:
        raise CorruptImage(f"vhd footer: {len(buf)} bytes, a footer has {FOOTER_SIZE}")
    (cookie, features, version, data_off, ts, app, app_ver, host_os, orig, cur, cyl, heads, spt, dtype, csum,
     uid, saved, _reserved) = _FOOTER.unpack_from(buf, 0)
    if cookie != FOOTER_COOKIE:
        raise CorruptImage(f"vhd footer: bad cookie {cookie!r} (expected {FOOTER_COOKIE!r})")
    want = checksum(bytes(buf[:FOOTER_SIZE]), 64)
    if csum != want:
        raise CorruptImage(f"vhd footer: checksum {csum:#010x} does not match the footer ({want:#010x})")
    return Footer(disk_type=dtype, current_size=cur, original_size=orig, data_offset=data_off,
                  geometry=(cyl, heads, spt), unique_id=uid, timestamp=ts, creator_app=app,
                  creator_version=app_ver, creator_host_os=host_os, features=features, version=version,
                  saved_state=saved)


def encode_footer(f: Footer) -> bytes:
    c, h, s = f.geometry
    raw = _FOOTER.pack(FOOTER_COOKIE, f.features, f.version, f.data_offset, f.timestamp, f.creator_app,
                       f.creator_version, f.creator_host_os, f.original_size, f.current_size, c, h, s,
                       f.disk_type, 0, f.unique_id, f.saved_state, bytes(427))
    return raw[:64] + struct.pack(">I", checksum(raw, 64)) + raw[68:]


# ---------------------------------------------------------------------- dynamic header
@dataclass(frozen=True)
class Locator:
    platform_code: bytes
    data_space: int  # as stored: the specification says sectors, Windows writes bytes (see formats/vhd.md)
    data_length: int  # bytes
    data_offset: int  # absolute file offset of the locator's data

    @property
    def used(self) -> bool:
        return self.platform_code != PLAT_NONE


NO_LOCATOR = Locator(PLAT_NONE, 0, 0, 0)


@dataclass(frozen=True)
class DynHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""  # decoded from UTF-16 big-endian, trailing NULs dropped
    locators: tuple[Locator, ...] = (NO_LOCATOR,) * LOCATORS
    data_offset: int = NO_DATA_OFFSET
    version: int = DYN_VERSION

    def replace(self, **kw) -> DynHeader:
        return replace(self, **kw)


def decode_dyn_header(buf: bytes) -> DynHeader:
    if len(buf) < DYN_HEADER_SIZE:
        raise CorruptImage(f"vhd dynamic header: {len(buf)} bytes, the header has {DYN_HEADER_SIZE}")
    (cookie, data_off, table_off, version, entries, bsize, csum, puid, pts, _r1, pname) = _DYN.unpack_from(buf, 0)
    if cookie != DYN_COOKIE:
        raise CorruptImage(f"vhd dynamic header: bad cookie {cookie!r} (expected {DYN_COOKIE!r})")
    want = checksum(bytes(buf[:DYN_HEADER_SIZE]), 36)
    if csum != want:
        raise CorruptImage(f"vhd dynamic header: checksum {csum:#010x} does not match the header ({want:#010x})")
    try:
        name = pname.decode("utf-16-be").split("\0", 1)[0]
    except UnicodeDecodeError:
        raise CorruptImage("vhd dynamic header: the parent's name is not valid UTF-16") from None
    locs = tuple(Locator(*_LOCATOR.unpack_from(buf, DYN_LOCATORS_OFFSET + 24 * i)[:3],
                         _LOCATOR.unpack_from(buf, DYN_LOCATORS_OFFSET + 24 * i)[4]) for i in range(LOCATORS))
    return DynHeader(table_offset=table_off, max_table_entries=entries, block_size=bsize, parent_unique_id=puid,
                     parent_timestamp=pts, parent_name=name, locators=locs, data_offset=data_off, version=version)


def encode_dyn_header(h: DynHeader) -> bytes:
    pname = h.parent_name.encode("utf-16-be")
    if len(pname) > 512:
        raise ValueError("parent name longer than 256 UTF-16 code units")
    raw = bytearray(_DYN.pack(DYN_COOKIE, h.data_offset, h.table_offset, h.version, h.max_table_entries,
                              h.block_size, 0, h.parent_unique_id, h.parent_timestamp, 0, pname.ljust(512, b"\0")))
    for loc in h.locators:
        raw += _LOCATOR.pack(loc.platform_code, loc.data_space, loc.data_length, 0, loc.data_offset)
    raw += bytes(256)
    struct.pack_into(">I", raw, 36, checksum(bytes(raw), 36))
    return bytes(raw)


def decode_locator_path(loc: Locator, data: bytes) -> str:
    """The path a locator's data names, as text (Windows separators kept)."""
    data = data[:loc.data_length]
    try:
        if loc.platform_code in (PLAT_W2RU, PLAT_W2KU):
            return data.decode("utf-16-le").split("\0", 1)[0]
        if loc.platform_code == PLAT_MACX:
            return data.decode("utf-8").split("\0", 1)[0]
        if loc.platform_code in (PLAT_WI2R, PLAT_WI2K):
            return data.decode("latin-1").split("\0", 1)[0]
    except UnicodeDecodeError:
        raise CorruptImage(f"vhd parent locator {loc.platform_code!r}: the path is not valid text") from None
    raise CorruptImage(f"vhd parent locator {loc.platform_code!r}: not a path")


def encode_locator_path(code: bytes, path: str) -> bytes:
    if code in (PLAT_W2RU, PLAT_W2KU):
        return path.encode("utf-16-le")
    if code == PLAT_MACX:
        return path.encode("utf-8")
    raise ValueError(f"cannot encode a locator of platform {code!r}")


# ---------------------------------------------------------------------- BAT and bitmaps
def bitmap_size(block_size: int) -> int:
    """Bytes of one block's sector bitmap: one bit per sector, padded to whole sectors."""
    return ((block_size // SECTOR + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


def bat_bytes(entries: int) -> int:
    """Bytes the BAT takes on disk: four per entry, padded to whole sectors."""
    return (4 * entries + SECTOR - 1) // SECTOR * SECTOR


def decode_bat(buf: bytes, entries: int) -> array.array:
    """BAT entries (sector offsets of blocks, BAT_UNUSED for none) as native integers."""
    return u32_table(buf, entries, "big")


def encode_bat(entries) -> bytes:
    return u32_bytes(entries, "big")


def bitmap_runs(bitmap: bytes, first: int, count: int) -> list[tuple[int, int, bool]]:
    """Runs of sectors ``[first, first+count)`` of one block: (first sector, sectors,
    bit set).  Bit ``i`` of the bitmap is bit ``7 - i % 8`` of byte ``i // 8`` (the most
    significant bit of each byte is the lowest sector)."""
    out: list[tuple[int, int, bool]] = []
    i = first
    end = first + count
    while i < end:
        bit = bool(bitmap[i >> 3] & (0x80 >> (i & 7)))
        j = i + 1
        while j < end:
            byte = bitmap[j >> 3]
            if (j & 7) == 0 and end - j >= 8 and byte in (0, 0xFF):
                if bool(byte) != bit:
                    break
                j += 8
                continue
            if bool(byte & (0x80 >> (j & 7))) != bit:
                break
            j += 1
        out.append((i, j - i, bit))
        i = j
    return out


def set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set the bits of sectors ``[first, first+count)`` (bit order as ``bitmap_runs``)."""
    i, end = first, first + count
    while i < end and i & 7:
        bitmap[i >> 3] |= 0x80 >> (i & 7)
        i += 1
    whole = (end - i) >> 3
    if whole:
        bitmap[i >> 3:(i >> 3) + whole] = b"\xff" * whole
        i += whole << 3
    while i < end:
        bitmap[i >> 3] |= 0x80 >> (i & 7)
        i += 1
