"""Sparse-file helpers the VHD and VDI drivers share: extents from SEEK_DATA/SEEK_HOLE,
and writes into new blocks that leave never-written zero granules as holes."""

from __future__ import annotations

import os

from ...host import HostStorage
from ...zeros import GRANULE, zero_runs
from ..base import Extent, Status


def host_extents(host: HostStorage, guest: int, hoff: int, n: int) -> list[Extent]:
    """Extents for ``n`` guest bytes from ``guest`` stored at host ``hoff``: DATA where
    the host file has data, ZERO over its holes (SEEK_DATA/SEEK_HOLE)."""
    fd = getattr(host, "fd", None)
    if fd is None or n == 0:
        return [Extent(guest, n, Status.DATA, host_offset=hoff)] if n else []
    out: list[Extent] = []
    pos, end = hoff, hoff + n
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError:
            data = end
        if data > pos:
            out.append(Extent(guest + pos - hoff, data - pos, Status.ZERO))
            pos = data
            if pos >= end:
                break
        try:
            hole = min(max(os.lseek(fd, pos, os.SEEK_HOLE), pos + 1), end)
        except OSError:
            hole = end
        out.append(Extent(guest + pos - hoff, hole - pos, Status.DATA, host_offset=pos))
        pos = hole
    return out




def fresh_write(host: HostStorage, hbase: int, written: bytearray, within: int, data) -> None:
    """Write ``data`` at ``within`` of a block that this session allocated at host
    ``hbase`` beyond the old end of the file (so it reads as zeros where never
    written): whole 4 KiB granules of zeros that were never written are left out,
    as holes.  ``written`` flags the granules written so far.  Zero granules are
    found by :func:`zero_runs` (no Python step per granule of data)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    g0, g1 = within // GRANULE, (within + n - 1) // GRANULE
    skip: list[int] = []  # granules (block numbering) left out, ascending
    for a, b in zero_runs(data, 0, n, within, GRANULE):
        ga, gb = -(-(within + a) // GRANULE), (within + b) // GRANULE  # whole granules only
        skip.extend(x for x in range(ga, gb) if not written[x])
    written[g0:g1 + 1] = b"\x01" * (g1 - g0 + 1)
    pos = 0  # relative to data
    for g in skip:
        written[g] = 0
        lo = g * GRANULE - within
        if lo > pos:
            host.pwrite(hbase + within + pos, data[pos:lo])
        pos = lo + GRANULE
    if pos < n:
        host.pwrite(hbase + within + pos, data[pos:] if pos else data)


def is_hole(host: HostStorage, off: int, n: int) -> bool:
    """True if the host range holds no data at all (a hole, or past the end)."""
    fd = getattr(host, "fd", None)
    if fd is None:
        return False
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + n
    except OSError:
        return True  # ENXIO: no data from here on


def fresh_granules(drv, b: int, hbase: int) -> bytearray | None:
    """The granule flags of block ``b`` (data at host ``hbase``) if it still reads as
    zeros everywhere no write of this session went: a block this session allocated,
    or one first touched now whose host range is one hole."""
    fresh = drv.fresh.get(b)
    if fresh is None and b not in drv.touched:
        drv.touched.add(b)
        if is_hole(drv.host, hbase, drv.cluster_size):
            fresh = drv.fresh[b] = bytearray(-(-drv.cluster_size // GRANULE))
    return fresh


def merge_extents(ext: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in ext:
        if out:
            p = out[-1]
            if p.status == e.status and p.end == e.offset and (
                    (p.host_offset is None and e.host_offset is None)
                    or (p.host_offset is not None and e.host_offset == p.host_offset + p.length)):
                out[-1] = Extent(p.offset, p.length + e.length, p.status, p.host_offset)
                continue
        out.append(e)
    return out
