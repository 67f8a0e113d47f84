"""VDI (VirtualBox) on-disk structures: bytes <-> frozen dataclasses, no I/O.

Written from VirtualBox's public description of the VDI layout (the VDI header
structures of VirtualBox's storage sources, documented in ``formats/vdi.md``).
Every number in a VDI is little-endian.  This module knows the 512-byte header
(pre-header text, signature, version 1.1 header, legacy and LCHS geometry, UUIDs)
and the block map; the driver (:mod:`vdisk.drivers.vdi`) works with the values.

Decoders check what the bytes alone can tell (signature, version); checks against
the file (the map inside it, entries in range and distinct) are the driver's.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass, replace

from ..errors import CorruptImage, UnsupportedFeature
from . import u32_bytes, u32_table

SIGNATURE = 0xBEDA107F
SIGNATURE_OFFSET = 0x40
MAGIC = struct.pack("<I", SIGNATURE)  # b"\x7f\x10\xda\xbe" at 0x40
VERSION_1_1 = 0x00010001  # major 1 (high half), minor 1
HEADER_SIZE_V1 = 0x180  # the version 1.1 header without the LCHS geometry (QEMU writes this)
HEADER_SIZE_V1_PLUS = 0x190  # with it (VirtualBox writes this)
HEADER_AREA = 512  # the header with its padding: the map follows at 512 or later
PRE_HEADER = b"<<< vdisk Virtual Disk Image >>>\n"
SECTOR = 512
DEFAULT_BLOCK_SIZE = 1 << 20

TYPE_NORMAL = 1  # dynamic: blocks allocated on first write
TYPE_FIXED = 2  # static: every block allocated at creation
TYPE_UNDO = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "static", TYPE_UNDO: "undo", TYPE_DIFF: "differencing"}

BLOCK_FREE = 0xFFFFFFFF  # not allocated: reads as zeros (or from the parent of a differencing image)
BLOCK_ZERO = 0xFFFFFFFE  # discarded: reads as zeros

_HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16sIIII40s")
assert _HEADER.size == HEADER_AREA

#: field -> (offset, size) (checked against formats/vdi.md by tests/test_vdi.py)
HEADER_FIELDS = {
    "pre_header": (0x000, 64), "signature": (0x040, 4), "version": (0x044, 4), "header_size": (0x048, 4),
    "image_type": (0x04C, 4), "image_flags": (0x050, 4), "description": (0x054, 256),
    "offset_blocks": (0x154, 4), "offset_data": (0x158, 4), "cylinders": (0x15C, 4), "heads": (0x160, 4),
    "sectors": (0x164, 4), "sector_size": (0x168, 4), "unused1": (0x16C, 4), "disk_size": (0x170, 8),
    "block_size": (0x178, 4), "block_extra": (0x17C, 4), "blocks_in_image": (0x180, 4),
    "blocks_allocated": (0x184, 4), "uuid_image": (0x188, 16), "uuid_last_snap": (0x198, 16),
    "uuid_link": (0x1A8, 16), "uuid_parent": (0x1B8, 16), "lchs_cylinders": (0x1C8, 4),
    "lchs_heads": (0x1CC, 4), "lchs_sectors": (0x1D0, 4), "lchs_sector_size": (0x1D4, 4),
    "padding": (0x1D8, 40),
}


@dataclass(frozen=True)
class Header:
    image_type: int
    disk_size: int
    block_size: int
    blocks_in_image: int
    blocks_allocated: int
    offset_blocks: int
    offset_data: int
    uuid_image: bytes
    pre_header: bytes = PRE_HEADER
    version: int = VERSION_1_1
    header_size: int = HEADER_SIZE_V1_PLUS
    image_flags: int = 0
    description: bytes = b""
    legacy_geometry: tuple[int, int, int, int] = (0, 0, 0, SECTOR)  # cylinders, heads, sectors, sector size
    block_extra: int = 0
    uuid_last_snap: bytes = bytes(16)
    uuid_link: bytes = bytes(16)
    uuid_parent: bytes = bytes(16)
    lchs: tuple[int, int, int, int] = (0, 0, 0, 0)
    unused1: int = 0

    def replace(self, **kw) -> Header:
        return replace(self, **kw)

    @property
    def sector_size(self) -> int:
        return self.legacy_geometry[3]


def decode_header(buf: bytes) -> Header:
    """Decode the first 512 bytes.  CorruptImage for a bad signature; UnsupportedFeature
    for a version other than 1.1 (0.0 and 1.0 images predate VirtualBox 1.4)."""
    if len(buf) < HEADER_AREA:
        raise CorruptImage(f"vdi header: file too short ({len(buf)} bytes) for a VDI header")
    (pre, sig, version, hsize, itype, flags, desc, off_blocks, off_data, cyl, heads, secs, ssize, unused1,
     dsize, bsize, bextra, nblocks, nalloc, uimg, usnap, ulink, uparent, lc, lh, ls, lss, _pad) = (
        _HEADER.unpack_from(buf, 0))
    if sig != SIGNATURE:
        raise CorruptImage(f"vdi header: bad signature {sig:#010x} (expected {SIGNATURE:#010x})")
    if version != VERSION_1_1:
        raise UnsupportedFeature(f"vdi header: version {version >> 16}.{version & 0xFFFF} is not supported "
                                 "(only 1.1)")
    if hsize < HEADER_SIZE_V1 or hsize > HEADER_AREA - 0x48:
        raise CorruptImage(f"vdi header: header size {hsize:#x} is outside {HEADER_SIZE_V1:#x}.."
                           f"{HEADER_AREA - 0x48:#x}")
    lchs = (lc, lh, ls, lss) if hsize >= HEADER_SIZE_V1_PLUS else (0, 0, 0, 0)
    return Header(image_type=itype, disk_size=dsize, block_size=bsize, blocks_in_image=nblocks,
                  blocks_allocated=nalloc, offset_blocks=off_blocks, offset_data=off_data, uuid_image=uimg,
                  pre_header=pre.rstrip(b"\0"), version=version, header_size=hsize, image_flags=flags,
                  description=desc.rstrip(b"\0"),
                  legacy_geometry=(cyl, heads, secs, ssize), block_extra=bextra, uuid_last_snap=usnap,
                  uuid_link=ulink, uuid_parent=uparent, lchs=lchs, unused1=unused1)


def encode_header(h: Header) -> bytes:
    lchs = h.lchs if h.header_size >= HEADER_SIZE_V1_PLUS else (0, 0, 0, 0)
    return _HEADER.pack(h.pre_header.ljust(64, b"\0")[:64], SIGNATURE, h.version, h.header_size, h.image_type,
                        h.image_flags, h.description.ljust(256, b"\0")[:256], h.offset_blocks, h.offset_data,
                        *h.legacy_geometry, h.unused1, h.disk_size, h.block_size, h.block_extra,
                        h.blocks_in_image, h.blocks_allocated, h.uuid_image, h.uuid_last_snap, h.uuid_link,
                        h.uuid_parent, *lchs, bytes(40))


def decode_map(buf: bytes, entries: int) -> array.array:
    """Block map entries as native integers (little-endian on disk)."""
    return u32_table(buf, entries, "little")


def encode_map(entries) -> bytes:
    return u32_bytes(entries, "little")


def lchs_geometry(disk_size: int) -> tuple[int, int, int, int]:
    """A logical CHS geometry for the header (VirtualBox recomputes its own when it is
    zero; vdisk writes the common 16 heads x 63 sectors translation, capped at 16383
    cylinders)."""
    sectors = disk_size // SECTOR
    cyl = min(sectors // (16 * 63), 16383)
    return (cyl, 16, 63, SECTOR) if cyl else (0, 0, 0, 0)
