"""Consistency check of a VMDK's sparse extents (``vdisk check``).

Contract: :func:`check_sparse` adds to a :class:`~vdisk.drivers.base.CheckResult`
what it finds in one sparse extent, changing nothing (unless ``repair``): a grain table entry
pointing past the end of the file or into metadata, two entries sharing one
grain, a compressed grain whose marker or data is bad (every compressed grain
is inflated): corruptions (exit 2; qemu-img's own check of VMDK looks only for
entries past the end of the file).  A redundant grain table that lags the
primary one (VMware keeps them in step; a crash between the two writes leaves
them apart, harmlessly: reads use the primary one) is reported as a leak
(exit 3), and ``repair`` rewrites it from the primary one.  Memory: one sorted
array of the allocated grains' sectors (4 bytes a grain).
"""

from __future__ import annotations

import array
import itertools

from ...errors import CorruptImage
from ..base import CheckResult

MAX_REPORTED = 20


def check_sparse(ext, res: CheckResult, repair: str | None = None) -> None:
    found = 0

    def bad(msg: str) -> None:
        nonlocal found
        found += 1
        if found <= MAX_REPORTED:
            res.corruptions.append(msg)

    gs = ext.header.grain_size
    used = array.array("I")
    for g, e in ext.gte.items():
        if ext.is_zero_entry(e):
            continue
        res.checked_clusters += 1
        res.allocated_clusters += 1
        try:
            if ext.header.compressed:
                ext._grain_data(g, e)
                res.compressed_clusters += 1
            else:
                ext.check_entry(g, e)
        except CorruptImage as exc:
            bad(str(exc))
            continue
        used.append(e)
    diff = ext.gte.first_difference(ext.rgte) if ext.rgte is not None else None
    if diff is not None:
        # a crash between the two table writes leaves this; reads use the primary one
        msg = (f"{ext.name}: the redundant grain table lags the primary one (first at guest sector "
               f"{diff * gs}); reads use the primary one")
        if repair:
            ext.sync_redundant()
            res.repaired.append(msg + ": rewritten from it")
        else:
            res.leaks.append(msg)
    if ext.rgd is not None and any(a == 0 and b != 0 or a != 0 and b == 0 for a, b in zip(ext.gd, ext.rgd)):
        bad(f"{ext.name}: the redundant grain directory disagrees with the primary one")
    s = sorted(used)
    span = 1 if ext.header.compressed else gs
    for a, b in itertools.pairwise(s):
        if b < a + span:
            bad(f"{ext.name}: two grain table entries share the grain at sector {b}")
    if found > MAX_REPORTED:
        res.corruptions.append(f"{ext.name}: ... and {found - MAX_REPORTED} more")
