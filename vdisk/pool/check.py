"""Consistency check of a pool image (``vdisk check POOL/IMAGE``)."""

from __future__ import annotations

from ..codec import pool as pc
from ..drivers.base import CheckResult
from ..errors import VdiskError


def check_image(driver, *, repair: str | None = None) -> CheckResult:
    """Walk the image's tree (live state and snapshots), decode and verify every block."""
    res = CheckResult()
    img = driver.img
    roots = [("live state", img.root)]
    for s in driver._rec().get("snapshots", []):
        if s.get("root"):
            roots.append((f"snapshot {s['name']}", pc.Entry.from_json(s["root"], driver.spec)))
    seen: set[tuple[int, int]] = set()
    for label, root in roots:
        try:
            for bn, e in img.walk(root):
                res.checked_clusters += 1
                if e.kind not in pc.DATA_KINDS or e.loc in seen:
                    continue
                seen.add(e.loc)
                res.allocated_clusters += 1
                if e.kind != pc.RAW:
                    res.compressed_clusters += 1
                try:
                    img.pool.decode_block(e, f"{driver.spec}: {label}: block at guest offset {bn * pc.BLOCK:#x}")
                except VdiskError as exc:
                    res.corruptions.append(exc.message if hasattr(exc, "message") else str(exc))
        except VdiskError as exc:
            res.corruptions.append(f"{label}: {exc}")
    return res
