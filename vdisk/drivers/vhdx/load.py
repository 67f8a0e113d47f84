"""Loading a VHDX file: headers, region table, metadata, BAT -- every field checked.

Contract of :func:`load_headers`: returns the current header (the valid one of the two
with the higher sequence number; [MS-VHDX], "Headers") and which slot it is in, after
checking its version, its log version and where its log lies.  Two valid headers
with the same sequence number are refused (the spec leaves no way to choose).

Contract of :func:`load_layout`: given a storage whose log has been replayed (or is
overlaid), returns a :class:`Layout` with every value the driver uses, checked:

- the region table (table 1, or table 2 if table 1 is damaged): known regions (BAT,
  metadata) once each, 1 MiB aligned, inside the file, overlapping neither each
  other, the header section nor the log; an unknown region marked required is
  refused (``UnsupportedFeature``);
- the metadata table: items inside the metadata region (after its 64 KiB table),
  at most 1 MiB, not overlapping, none twice; an unknown required item is refused;
  the five required items present and valid (block size a power of two in 1..256
  MiB, sector sizes 512 or 4096, virtual size a multiple of the logical sector size
  and at most 64 TiB);
- the BAT: long enough for the virtual size, every present payload block 1 MiB
  aligned, inside the file (the part of a block the guest can read) and
  overlapping no other block or structure; payload states only those of a disk
  without a parent.  Sector bitmap entries are ignored (see ``_check_bat``).

Differencing disks (HasParent): the parent locator item must be present, of the
VHDX locator type, and give a ``relative_path`` (Windows separators become ``/``);
a parent named only by an absolute Windows path is refused (UnsupportedFeature),
as vdisk follows backing files relative to the overlay only.  Their BAT is checked
as above, and also every sector bitmap entry (not present, or present: 1 MiB
inside the file, overlapping nothing); a partially present block needs its
chunk's sector bitmap.
"""

from __future__ import annotations

import array
import itertools
import struct
import sys
from dataclasses import dataclass

from ... import budget
from ...codec import vhdx as V
from ...errors import CorruptImage, UnsupportedFeature
from ...host import HostStorage


@dataclass
class Layout:
    header: V.Header
    header_slot: int
    bat_offset: int
    bat_length: int
    metadata_offset: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    virtual_size: int
    disk_id: object
    leave_blocks_allocated: bool
    chunk_ratio: int
    bat: array.array  # every BAT entry, as stored
    regions: list
    size_item_offset: int  # file offset of the virtual disk size item
    has_parent: bool = False
    parent_path: str | None = None  # relative to the image's directory, "/"-separated
    parent_linkage: str | None = None  # the parent's DataWriteGuid as the locator names it


def load_headers(host: HostStorage, file_size: int) -> tuple[V.Header, int]:
    if file_size < V.HEADER_SECTION_SIZE:
        raise CorruptImage(f"vhdx: file of {file_size} bytes is shorter than the 1 MiB header section")
    ident = host.pread(0, 8)
    if ident != V.FILE_SIGNATURE:
        raise CorruptImage(f"vhdx: bad file type identifier {ident!r} (expected {V.FILE_SIGNATURE!r})")
    found: list[tuple[V.Header, int]] = []
    errors = []
    for slot, off in enumerate(V.HEADER_OFFSETS):
        try:
            found.append((V.decode_header(host.pread(off, V.HEADER_SIZE), f"header {slot + 1}"), slot))
        except CorruptImage as exc:
            errors.append(str(exc))
    if not found:
        raise CorruptImage(f"{errors[0]}, and {errors[1].removeprefix('vhdx ')}: no valid header")
    if len(found) == 2 and found[0][0].sequence_number == found[1][0].sequence_number:
        raise CorruptImage("vhdx: both headers are valid and carry the same sequence number "
                           f"{found[0][0].sequence_number}; the current one cannot be told")
    hdr, slot = max(found, key=lambda x: x[0].sequence_number)
    if hdr.version != 1:
        raise UnsupportedFeature(f"vhdx: header version {hdr.version} (vdisk reads version 1)")
    if hdr.log_version != 0:
        raise UnsupportedFeature(f"vhdx: log version {hdr.log_version} (vdisk reads version 0)")
    if hdr.log_length % V.MiB or hdr.log_offset % V.MiB or hdr.log_offset < V.HEADER_SECTION_SIZE:
        raise CorruptImage(f"vhdx: log at {hdr.log_offset} of {hdr.log_length} bytes is not 1 MiB aligned "
                           "after the header section")
    if hdr.log_offset + hdr.log_length > file_size:
        raise CorruptImage(f"vhdx: log at {hdr.log_offset} of {hdr.log_length} bytes runs past the end of the "
                           f"file ({file_size} bytes)")
    return hdr, slot


def _regions(host: HostStorage) -> list[V.Region]:
    errors = []
    for i, off in enumerate(V.REGION_TABLE_OFFSETS):
        try:
            return V.decode_region_table(host.pread(off, V.REGION_TABLE_SIZE), f"region table {i + 1}")
        except CorruptImage as exc:
            errors.append(str(exc))
    raise CorruptImage(f"{errors[0]}, and {errors[1].removeprefix('vhdx ')}: no valid region table")


def _check_disjoint(spans: list[tuple[int, int, str]], what: str) -> None:
    spans = sorted(s for s in spans if s[1] > 0)
    for (a, alen, aname), (b, _blen, bname) in itertools.pairwise(spans):
        if a + alen > b:
            raise CorruptImage(f"vhdx: {aname} at {a} overlaps {bname} at {b}{what}")


def load_layout(host: HostStorage, hdr: V.Header, slot: int, file_size: int) -> Layout:
    regions = _regions(host)
    bat = meta = None
    spans = [(0, V.HEADER_SECTION_SIZE, "the header section"), (hdr.log_offset, hdr.log_length, "the log")]
    for r in regions:
        if r.guid not in (V.REGION_BAT, V.REGION_METADATA):
            if r.required:
                raise UnsupportedFeature(f"vhdx: unknown required region {r.guid}")
            continue
        name = "BAT region" if r.guid == V.REGION_BAT else "metadata region"
        if (bat if r.guid == V.REGION_BAT else meta) is not None:
            raise CorruptImage(f"vhdx: the region table lists the {name} twice")
        if r.file_offset % V.MiB or r.length % V.MiB or r.length == 0 or r.file_offset < V.HEADER_SECTION_SIZE:
            raise CorruptImage(f"vhdx: {name} at {r.file_offset} of {r.length} bytes is not 1 MiB aligned")
        if r.file_offset + r.length > file_size:
            raise CorruptImage(f"vhdx: {name} at {r.file_offset} of {r.length} bytes runs past the end of the "
                               f"file ({file_size} bytes)")
        spans.append((r.file_offset, r.length, name))
        if r.guid == V.REGION_BAT:
            bat = r
        else:
            meta = r
    if bat is None or meta is None:
        raise CorruptImage(f"vhdx: the region table has no {'BAT' if bat is None else 'metadata'} region")
    _check_disjoint(spans, "")
    items, where = _metadata(host, meta)

    def item(key, what):
        if key not in items:
            raise CorruptImage(f"vhdx: required metadata item '{what}' is missing")
        return items[key]

    params = V.decode_file_parameters(item(V.META_FILE_PARAMETERS, "file parameters"))
    vsize = V.decode_u64(item(V.META_VIRTUAL_DISK_SIZE, "virtual disk size"), "virtual disk size")
    lss = V.decode_u32(item(V.META_LOGICAL_SECTOR_SIZE, "logical sector size"), "logical sector size")
    pss = V.decode_u32(item(V.META_PHYSICAL_SECTOR_SIZE, "physical sector size"), "physical sector size")
    raw_id = item(V.META_VIRTUAL_DISK_ID, "virtual disk id")
    if len(raw_id) < 16:
        raise CorruptImage("vhdx virtual disk id: item shorter than 16 bytes")
    bs = params.block_size
    if not (V.MIN_BLOCK_SIZE <= bs <= V.MAX_BLOCK_SIZE) or bs & (bs - 1):
        raise CorruptImage(f"vhdx: block size {bs} is not a power of two from 1 MiB to 256 MiB")
    if lss not in (512, 4096):
        raise CorruptImage(f"vhdx: logical sector size {lss} (512 or 4096)")
    if pss not in (512, 4096):
        raise CorruptImage(f"vhdx: physical sector size {pss} (512 or 4096)")
    if vsize > V.MAX_VIRTUAL_SIZE or vsize % lss:
        raise CorruptImage(f"vhdx: virtual disk size {vsize} is not a multiple of the sector size {lss} "
                           "up to 64 TiB")
    parent_path = linkage = None
    if params.has_parent:
        parent_path, linkage = _parent(item(V.META_PARENT_LOCATOR, "parent locator"))
    ratio = V.chunk_ratio(bs, lss)
    n = V.bat_entries(vsize, bs, ratio, params.has_parent)
    if n * 8 > bat.length:
        raise CorruptImage(f"vhdx: BAT region of {bat.length} bytes is too short for {n} entries")
    budget.charge(n * 8, "the vhdx BAT")
    table = array.array("Q", host.pread(bat.file_offset, n * 8))
    if sys.byteorder == "big":
        table.byteswap()
    _check_bat(table, bs, ratio, vsize, file_size, spans, params.has_parent)
    return Layout(hdr, slot, bat.file_offset, bat.length, meta.file_offset, bs, lss, pss, vsize,
                  V.guid(raw_id[:16]), params.leave_blocks_allocated, ratio, table, regions,
                  where[V.META_VIRTUAL_DISK_SIZE], params.has_parent, parent_path, linkage)


def _parent(raw: bytes) -> tuple[str, str | None]:
    ltype, kv = V.decode_parent_locator(raw)
    if ltype != V.LOCATOR_VHDX:
        raise UnsupportedFeature(f"vhdx: parent locator of unknown type {ltype}")
    rel = kv.get("relative_path")
    if not rel:
        where = kv.get("absolute_win32_path") or kv.get("volume_path") or "no path at all"
        raise UnsupportedFeature(f"vhdx: the parent of this differencing disk is named only by an absolute "
                                 f"Windows path ({where}); vdisk follows parents relative to the disk")
    path = rel.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    if not path or "\0" in path or path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise CorruptImage(f"vhdx: parent locator relative_path {rel!r} is not a relative path")
    return path, kv.get("parent_linkage")


def _metadata(host: HostStorage, meta: V.Region) -> tuple[dict, dict]:
    entries = V.decode_metadata_table(host.pread(meta.file_offset, V.METADATA_TABLE_SIZE))
    out = {}
    where = {}
    spans = []
    for e in entries:
        name = V.META_NAMES.get(e.item_id, str(e.item_id))
        if e.item_id in out:
            raise CorruptImage(f"vhdx: metadata item '{name}' is listed twice")
        if e.item_id not in V.META_NAMES:
            if e.is_required:
                raise UnsupportedFeature(f"vhdx: unknown required metadata item {e.item_id}")
            continue
        if e.length > V.MAX_METADATA_ITEM or (e.length and e.offset < V.METADATA_TABLE_SIZE) or \
                e.offset + e.length > meta.length:
            raise CorruptImage(f"vhdx: metadata item '{name}' at {e.offset} of {e.length} bytes lies outside "
                               f"the metadata region's items ({meta.length} bytes)")
        spans.append((e.offset, e.length, f"metadata item '{name}'"))
        out[e.item_id] = host.pread(meta.file_offset + e.offset, e.length)
        where[e.item_id] = meta.file_offset + e.offset
    _check_disjoint(spans, " in the metadata region")
    return out, where


def _check_bat(table: array.array, bs: int, ratio: int, vsize: int, file_size: int, spans: list,
               has_parent: bool) -> None:
    blocks = []
    nblocks = -(-vsize // bs)
    for i, v in enumerate(table):
        state, off = v & V.BAT_STATE_MASK, (v >> V.BAT_OFFSET_SHIFT) << 20
        if (i + 1) % (ratio + 1) == 0 and has_parent:
            if state not in (V.SB_NOT_PRESENT, V.SB_PRESENT):
                raise CorruptImage(f"vhdx: sector bitmap entry {i} has state {state}")
            if state == V.SB_PRESENT:
                blocks.append((off, V.MiB, f"sector bitmap block {i // (ratio + 1)}", V.MiB))
            continue
        if (i + 1) % (ratio + 1) == 0:
            # a sector bitmap entry: a disk without a parent has no use for it, and
            # qemu-img before 8.0 wrote garbage into some (QEMU commit "block/vhdx: fix
            # dynamic VHDX BAT corruption"), so it is neither checked nor used
            continue
        block = i - i // (ratio + 1)
        if block >= nblocks:  # a differencing disk's BAT ends with whole chunks
            if state != V.PAYLOAD_NOT_PRESENT:
                raise CorruptImage(f"vhdx: BAT entry {i} of block {block}, past the end of the disk, has state {state}")
            continue
        if state not in V.PAYLOAD_STATES or (state == V.PAYLOAD_PARTIALLY_PRESENT and not has_parent):
            raise CorruptImage(f"vhdx: BAT entry {i} has state {state}, not one of a disk without a parent")
        if state in (V.PAYLOAD_FULLY_PRESENT, V.PAYLOAD_PARTIALLY_PRESENT):
            blocks.append((off, bs, f"payload block {block}", min(bs, vsize - block * bs)))
            if state == V.PAYLOAD_PARTIALLY_PRESENT:
                sb = table[(block // ratio) * (ratio + 1) + ratio] if (block // ratio) * (ratio + 1) + ratio < len(
                    table) else 0
                if sb & V.BAT_STATE_MASK != V.SB_PRESENT:
                    raise CorruptImage(f"vhdx: payload block {block} is partially present, but its chunk has "
                                       "no sector bitmap")
    for off, length, name, used in blocks:
        if off < V.HEADER_SECTION_SIZE or off + used > file_size:
            raise CorruptImage(f"vhdx: {name} at {off} lies outside the file ({file_size} bytes)")
    _check_disjoint(spans + [(o, n, name) for o, n, name, _ in blocks], "")


def bat_bytes(table: array.array, first: int, count: int) -> bytes:
    """Entries ``[first, first+count)`` of the BAT as stored (little-endian)."""
    return struct.pack(f"<{count}Q", *table[first:first + count])
