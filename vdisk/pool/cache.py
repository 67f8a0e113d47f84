"""A bounded cache of immutable objects' bytes, for pools on an object store.

Objects of a pool other than ``config``, ``gen/<N>`` and leases are never rewritten
(formats/pool.md 3), so a cached byte range can never become stale and the cache
needs no invalidation: only a deleted object is dropped (``drop``) so that its memory
goes.  Entries are whole objects (the packs this process wrote, objects read whole)
or the exact ranges read (blobs: a lazy clone fetches what its guest reads and no
more).  Least recently used entries go first once the bytes held pass the bound.

Thread-safe (one lock; nothing slow is done under it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ObjectCache:
    def __init__(self, limit_bytes: int):
        self.limit = max(0, int(limit_bytes))
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._whole: set[str] = set()
        self._by_name: dict[str, set[int]] = {}
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
            self._items[key] = data
            self._by_name.setdefault(name, set()).add(offset)
            self.bytes += len(data)
            if whole or offset == 0 and name in self._whole:
                self._whole.add(name)
            while self.bytes > self.limit and self._items:
                (n, o), d = self._items.popitem(last=False)
                self.bytes -= len(d)
                offs = self._by_name.get(n)
                if offs is not None:
                    offs.discard(o)
                    if not offs:
                        del self._by_name[n]
                if o == 0:
                    self._whole.discard(n)

    def get_whole(self, name: str) -> bytes | None:
        with self._lock:
            if name not in self._whole:
                self.misses += 1
                return None
            d = self._items.get((name, 0))
            if d is None:
                self.misses += 1
                return None
            self._items.move_to_end((name, 0))
            self.hits += 1
            return d

    def get(self, name: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` if one cached entry holds them all (a whole
        object also answers a range past its end with what it has)."""
        with self._lock:
            d = self._items.get((name, offset))
            if d is not None and len(d) >= length:
                self._items.move_to_end((name, offset))
                self.hits += 1
                return d[:length]
            if name in self._whole:
                w = self._items.get((name, 0))
                if w is not None:
                    self._items.move_to_end((name, 0))
                    self.hits += 1
                    return w[offset:offset + length]
            self.misses += 1
            return None

    def drop(self, name: str) -> None:
        with self._lock:
            for o in self._by_name.pop(name, set()):
                d = self._items.pop((name, o), None)
                if d is not None:
                    self.bytes -= len(d)
            self._whole.discard(name)
