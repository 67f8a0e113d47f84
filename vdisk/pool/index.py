"""The pool's key -> entry indexes on storage, with bounded memory (formats/pool.md 7).

Two indexes share this code: the fingerprint index (16-byte xxh3-128 of a block ->
the entry of a blob holding it), which inline dedup asks for every block written,
and the similarity index (super-feature -> the entry of a block that had it), which
delta compression asks.  Both are hints: every hit is verified (fingerprint hits
byte for byte against the stored block), so an entry that is stale (its blob freed,
a collision, a crash between writing a segment and the generation naming it) costs
a lookup, never data.

An index is a list of immutable sorted runs ("segments", as in an LSM tree) plus an
in-memory table of recent additions.  A segment's summary (the first key of every
page of 256 records) stays in memory: 16 bytes per 256 blocks, 16 MiB per TiB of
unique data.  A lookup binary-searches the summary of each segment, then reads one
page (10 KiB) through a bounded LRU cache.  The memory table is written out as a new
segment once it holds ``MEMTABLE_LIMIT`` records (or when the writer closes); runs
are merged size-tiered: four segments of one tier become one of the next.

Not thread-safe: the pool image that owns an index serialises its calls.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict

from ..codec import pool as pc
from ..errors import CorruptImage, VdiskError
from .backend import Backend, ObjectMissing

MEMTABLE_LIMIT = 1 << 16
#: runs are not merged past this many records (each lookup then probes one more
#: run per MAX_MERGED unique blocks: 4 GiB of unique data; see formats/pool.md 7)
MAX_MERGED = 1 << 20
PAGE_CACHE_BYTES = 32 << 20
_PAGE_BYTES = pc.SEG_PAGE * pc.SEG_RECORD
_TIER_FANIN = 4


class Segment:
    def __init__(self, backend: Backend, name: str, count: int):
        self.backend = backend
        self.name = name
        what = f"{backend.url}: index segment {name}"
        size = backend.size(name)
        head = backend.get_range(name, 0, pc.SEG_HEADER.size)
        kind, n, sum_off = pc.segment_layout(head, size, what)
        if n != count:
            raise CorruptImage(f"{what}: holds {n} records, the catalog says {count}")
        self.kind = kind
        self.count = n
        tail = backend.get_range(name, sum_off, size - sum_off)
        self.summary = tail[: len(tail) - pc.SEG_FOOTER.size]
        pc.check_summary(self.summary, tail[len(tail) - pc.SEG_FOOTER.size:], what)
        self.pages = len(self.summary) // pc.SEG_KEY
        self.what = what

    def page_for(self, key: bytes) -> int:
        """The page that would hold ``key`` (-1: before the first key)."""
        s = self.summary
        lo, hi = 0, self.pages
        while lo < hi:
            mid = (lo + hi) >> 1
            if s[mid * 16: mid * 16 + 16] <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    def read_page(self, page: int) -> bytes:
        off = pc.SEG_HEADER.size + page * _PAGE_BYTES
        n = min(pc.SEG_PAGE, self.count - page * pc.SEG_PAGE) * pc.SEG_RECORD
        data = self.backend.get_range(self.name, off, n)
        if len(data) != n:
            raise CorruptImage(f"{self.what}: truncated page {page}")
        return data

    def records(self):
        """Every (key, entry bytes), in order, a page at a time."""
        for p in range(self.pages):
            data = self.read_page(p)
            for i in range(0, len(data), pc.SEG_RECORD):
                yield data[i: i + pc.SEG_KEY], data[i + pc.SEG_KEY: i + pc.SEG_RECORD]


def _search_page(data: bytes, key: bytes) -> bytes | None:
    lo, hi = 0, len(data) // pc.SEG_RECORD
    while lo < hi:
        mid = (lo + hi) >> 1
        k = data[mid * pc.SEG_RECORD: mid * pc.SEG_RECORD + pc.SEG_KEY]
        if k < key:
            lo = mid + 1
        elif k > key:
            hi = mid
        else:
            off = mid * pc.SEG_RECORD + pc.SEG_KEY
            return data[off: off + pc.ENTRY_SIZE]
    return None


class SegmentIndex:
    """One index: its segments (as the catalog lists them) and the memory table."""

    def __init__(self, backend: Backend, kind: int, listed: list[dict]):
        self.backend = backend
        self.kind = kind
        self.segments: list[Segment] = []
        self.tiers: dict[str, int] = {}
        for rec in listed:
            self._load(rec)
        self.mem: dict[bytes, bytes] = {}
        self._pages: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._page_limit = max(16, PAGE_CACHE_BYTES // _PAGE_BYTES)

    def _load(self, rec: dict) -> None:
        try:
            name, count, tier = str(rec["name"]), int(rec["count"]), int(rec.get("tier", 0))
        except (KeyError, TypeError, ValueError):
            raise CorruptImage(f"{self.backend.url}: bad index segment record {rec!r}") from None
        try:
            seg = Segment(self.backend, name, count)
        except ObjectMissing:
            return  # an index is a hint: a lost segment loses dedup, never data
        except ValueError:
            raise CorruptImage(f"{self.backend.url}: bad index segment name {name!r}") from None
        if seg.kind != self.kind:
            raise CorruptImage(f"{seg.what}: segment of the wrong index")
        self.segments.append(seg)
        self.tiers[name] = tier

    def refresh(self, listed: list[dict]) -> None:
        """Follow a newer catalog's list of segments (others may have added or merged)."""
        want = {r.get("name") for r in listed}
        self.segments = [s for s in self.segments if s.name in want]
        have = {s.name for s in self.segments}
        for rec in listed:
            if rec.get("name") not in have:
                self._load(rec)
        self._pages = OrderedDict((k, v) for k, v in self._pages.items() if k[0] in want)

    def get(self, key: bytes) -> bytes | None:
        v = self.mem.get(key)
        if v is not None:
            return v
        for seg in reversed(self.segments):  # newest first
            p = seg.page_for(key)
            if p < 0:
                continue
            ck = (seg.name, p)
            data = self._pages.get(ck)
            if data is None:
                try:
                    data = seg.read_page(p)
                except (ObjectMissing, CorruptImage):
                    continue
                self._pages[ck] = data
                if len(self._pages) > self._page_limit:
                    self._pages.popitem(last=False)
            else:
                self._pages.move_to_end(ck)
            v = _search_page(data, key)
            if v is not None:
                return v
        return None

    def add(self, key: bytes, entry: bytes) -> None:
        self.mem[key] = entry

    @property
    def full(self) -> bool:
        return len(self.mem) >= MEMTABLE_LIMIT

    # ------------------------------------------------------------ writing runs
    def write_memtable(self, new_name) -> dict | None:
        """Write the memory table as a segment; returns its catalog record (None if empty)."""
        if not self.mem:
            return None
        records = sorted(self.mem.items())
        name = new_name()
        self.backend.put(name, pc.encode_segment(self.kind, records))
        self.mem = {}
        rec = {"name": name, "count": len(records), "tier": 0}
        self._load(rec)
        return rec

    def plan_merge(self) -> list[Segment] | None:
        """Segments of the lowest tier that has ``_TIER_FANIN`` of them, if any."""
        by_tier: dict[int, list[Segment]] = {}
        for s in self.segments:
            by_tier.setdefault(self.tiers.get(s.name, 0), []).append(s)
        for tier in sorted(by_tier):
            group = by_tier[tier][:_TIER_FANIN]
            if len(group) == _TIER_FANIN and sum(s.count for s in group) <= MAX_MERGED:
                return group
        return None

    def merge(self, segs: list[Segment], new_name) -> dict:
        """Merge ``segs`` into one new segment (a later segment's record wins a key);
        returns its catalog record.  The merged run is built in memory (at most
        ``MAX_MERGED`` records, 40 MiB) before it is stored as one object."""
        import heapq

        order = {s.name: i for i, s in enumerate(self.segments)}
        streams = [((k, -order[s.name], v) for k, v in s.records()) for s in segs]
        records: list[tuple[bytes, bytes]] = []
        last = None
        for k, _, v in heapq.merge(*streams):
            if k == last:
                continue
            last = k
            records.append((k, v))
        name = new_name()
        self.backend.put(name, pc.encode_segment(self.kind, records))
        tier = max(self.tiers.get(s.name, 0) for s in segs) + 1
        return {"name": name, "count": len(records), "tier": tier}


def fp_key(fp: bytes) -> bytes:
    return fp


_SF = struct.Struct("<QQ")


def sf_key(i: int, sf: int) -> bytes:
    return _SF.pack(i, sf)


def new_object_name(prefix: str) -> str:
    return f"{prefix}/{int.from_bytes(os.urandom(8), 'little') | 1:016x}"


def safe_get(index: SegmentIndex, key: bytes) -> bytes | None:
    try:
        return index.get(key)
    except VdiskError:
        return None
