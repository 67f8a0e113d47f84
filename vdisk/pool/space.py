"""Space accounting of pool images (unique and shared bytes)."""

from __future__ import annotations

from ..codec import pool as pc


def image_space(driver) -> dict:
    """Stored bytes the live state refers to, and of those, the bytes no other root
    of this image (its snapshots) refers to."""
    img = driver.img
    live = {e.loc: e.length for _, e in img.walk() if e.kind in pc.DATA_KINDS}
    others: set = set()
    for s in driver._rec().get("snapshots", []):
        if s.get("root"):
            others |= {e.loc for _, e in img.walk(pc.Entry.from_json(s["root"], driver.spec))
                       if e.kind in pc.DATA_KINDS}
    return {"live": {"referenced": sum(live.values()),
                     "unique": sum(n for loc, n in live.items() if loc not in others)}}
