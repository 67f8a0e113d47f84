"""Consistency check of a VMDK's sparse extents (``vdisk check``).

Contract: :func:`check_sparse` adds to a :class:`~vdisk.drivers.base.CheckResult`
what it finds in one sparse extent, changing nothing: a grain table entry
pointing past the end of the file or into metadata, two entries sharing one
grain, a redundant grain table that disagrees with the primary one (VMware
keeps them in step), a compressed grain whose marker or data is bad (every
compressed grain is inflated).  qemu-img's own check of VMDK looks only for
entries past the end of the file; these are all corruptions (exit 2).  VMDK
keeps no allocation map, so there are no leaks to report.  Memory: one sorted
array of the allocated grains' sectors (4 bytes a grain).
"""

from __future__ import annotations

import array
import itertools

from ...errors import CorruptImage
from ..base import CheckResult

MAX_REPORTED = 20


def check_sparse(ext, res: CheckResult) -> None:
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
        bad(f"{ext.name}: the redundant grain table disagrees with the primary one "
            f"(first at guest sector {diff * gs})")
    if ext.rgd is not None and any(a == 0 and b != 0 or a != 0 and b == 0 for a, b in zip(ext.gd, ext.rgd)):
        bad(f"{ext.name}: the redundant grain directory disagrees with the primary one")
    s = sorted(used)
    span = 1 if ext.header.compressed else gs
    for a, b in itertools.pairwise(s):
        if b < a + span:
            bad(f"{ext.name}: two grain table entries share the grain at sector {b}")
    if found > MAX_REPORTED:
        res.corruptions.append(f"{ext.name}: ... and {found - MAX_REPORTED} more")
