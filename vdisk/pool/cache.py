"""A bounded cache of immutable objects' bytes, for pools on an object store.

Objects of a pool other than ``config``, ``gen/<N>`` and leases are never rewritten
(formats/pool.md 3), so a cached byte range can never become stale and the cache
needs no invalidation: only a deleted object is dropped (``drop``) so that its memory
goes.  Entries are whole objects (the packs this process wrote, objects read whole)
or the ranges fetched (blobs, or runs of adjacent blobs: a lazy clone fetches what
its guest reads and little more).  A request is answered by the one entry that
starts at or before it and covers it.  Least recently used entries go first once the
bytes held pass the bound.

Thread-safe (one lock; nothing slow is done under it).
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict


class ObjectCache:
    def __init__(self, limit_bytes: int):
        self.limit = max(0, int(limit_bytes))
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._offsets: dict[str, list[int]] = {}  # sorted offsets of each object's entries
        self._whole: set[str] = set()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def put(self, name: str, offset: int, data: bytes, *, whole: bool = False) -> None:
        if len(data) > self.limit:
            return
        with self._lock:
            key = (name, offset)
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            else:
                bisect.insort(self._offsets.setdefault(name, []), offset)
            self._items[key] = data
            self.bytes += len(data)
            if whole:
                self._whole.add(name)
            while self.bytes > self.limit and self._items:
                (n, o), d = self._items.popitem(last=False)
                self._forget(n, o, d)

    def _forget(self, name: str, offset: int, data: bytes) -> None:
        self.bytes -= len(data)
        offs = self._offsets.get(name)
        if offs is not None:
            i = bisect.bisect_left(offs, offset)
            if i < len(offs) and offs[i] == offset:
                del offs[i]
            if not offs:
                del self._offsets[name]
        if offset == 0:
            self._whole.discard(name)

    def get_whole(self, name: str) -> bytes | None:
        with self._lock:
            d = self._items.get((name, 0)) if name in self._whole else None
            if d is None:
                self.misses += 1
                return None
            self._items.move_to_end((name, 0))
            self.hits += 1
            return d

    def get(self, name: str, offset: int, length: int, *, count: bool = True) -> bytes | None:
        """``length`` bytes at ``offset`` if a cached entry covers them (a whole object
        also answers a range past its end with what it has)."""
        with self._lock:
            offs = self._offsets.get(name)
            if offs:
                i = bisect.bisect_right(offs, offset) - 1
                if i >= 0:
                    start = offs[i]
                    d = self._items[(name, start)]
                    rel = offset - start
                    if rel + length <= len(d) or (start == 0 and name in self._whole):
                        self._items.move_to_end((name, start))
                        if count:
                            self.hits += 1
                        return d[rel:rel + length]
            if count:
                self.misses += 1
            return None

    def drop(self, name: str) -> None:
        with self._lock:
            for o in list(self._offsets.get(name, [])):
                d = self._items.pop((name, o), None)
                if d is not None:
                    self._forget(name, o, d)
            self._whole.discard(name)
