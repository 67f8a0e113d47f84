"""Resizing a VHDX disk (dynamic or fixed, no parent).

Contract of :func:`resize` (called by the driver with a writable image): the new
size must be a multiple of the logical sector size (``UsageError`` otherwise).

- Growing: the allocated part of the old last block past the old size is zeroed
  first (it may hold bytes that a shrink dropped), the BAT gets entries for the new
  blocks (not present, or allocated for a fixed disk), moved to a new region at the
  end of the file if its region is too short (written and flushed there before both
  region tables name it), and only then the virtual disk size item is rewritten and
  flushed.  A crash at any point leaves the old size with its old content readable.
- Shrinking: the size item is rewritten and flushed first, then the BAT entries past
  the new end are cleared (their blocks leak; they were unreachable already).
"""

from __future__ import annotations

import array

from ...codec import vhdx as V
from ...errors import UsageError


def resize(drv, new_size: int) -> None:
    lay = drv.layout
    if new_size % lay.logical_sector_size:
        raise UsageError(f"vhdx: size {new_size} is not a multiple of the logical sector size "
                         f"{lay.logical_sector_size}")
    if new_size > V.MAX_VIRTUAL_SIZE:
        raise UsageError(f"vhdx: size {new_size} is larger than 64 TiB")
    drv._before_change()
    drv.flush()
    old = drv.size
    bs, ratio = lay.block_size, lay.chunk_ratio
    n_new = V.bat_entries(new_size, bs, ratio, False)
    if new_size > old:
        if old % bs:
            state, off = drv._entry(old // bs)
            if state == V.PAYLOAD_FULLY_PRESENT:
                drv.host.pwrite(off + old % bs, bytes(min(bs - old % bs, new_size - old)))
        table = drv._bat
        if n_new > len(table):
            table.extend([0] * (n_new - len(table)))
        if lay.leave_blocks_allocated:
            for b in range(-(-old // bs), -(-new_size // bs)):
                drv._allocate(b)
        drv.host.flush()
        if n_new * 8 > lay.bat_length:
            _move_bat(drv, n_new)
        else:
            drv.flush()
        _write_size(drv, new_size)
    else:
        _write_size(drv, new_size)
        keep = -(-new_size // bs)
        table = drv._bat
        for i in range(V.bat_index(keep, ratio) if keep else 0, len(table)):
            if table[i]:
                table[i] = 0
                drv._dirty_bat.add(i)
        drv.flush()
        del table[n_new:]
        drv._dirty_bat = {i for i in drv._dirty_bat if i < n_new}
    drv.size = lay.virtual_size = new_size


def _write_size(drv, size: int) -> None:
    drv.host.pwrite(drv.layout.size_item_offset, size.to_bytes(8, "little"))
    drv.host.flush()


def _move_bat(drv, n: int) -> None:
    lay = drv.layout
    length = -(-n * 8 // V.MiB) * V.MiB
    off = drv._end
    drv.host.truncate(off + length)
    drv._end = off + length
    raw = array.array("Q", drv._bat)
    import sys

    if sys.byteorder == "big":
        raw.byteswap()
    drv.host.pwrite(off, raw.tobytes())
    drv.host.flush()
    regions = [V.Region(r.guid, off, length, r.required) if r.guid == V.REGION_BAT else r for r in lay.regions]
    table = V.encode_region_table(regions)
    for roff in V.REGION_TABLE_OFFSETS:
        drv.host.pwrite(roff, table)
        drv.host.flush()
    lay.regions, lay.bat_offset, lay.bat_length = regions, off, length
    drv._dirty_bat.clear()
