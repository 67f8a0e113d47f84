"""A bounded cache of metadata tables with write-back tracking, shared by the drivers.

A driver keeps the tables it reads (qcow2: L2 tables and refcount blocks, keyed by
host offset; vdk: L2 tables, keyed by L2 index) in a :class:`TableCache`.  The cache
only holds and evicts: reading a table from the file, validating it and writing it
back stay with the driver, which alone knows the format.

Contract.
  - A table is any object the driver modifies in place (``array('Q')``,
    ``bytearray``); the cache never copies it, so a table returned by ``get`` or
    ``put`` is the cached one, and changing it changes the cache.
  - A changed table must be marked dirty (``put(..., dirty=True)`` or
    ``mark_dirty``) before the next ``put`` of another key: only then is it
    protected from eviction.  Dirty tables are never evicted; they stay until the
    driver has written them and calls ``mark_clean`` (or drops them with ``pop`` or
    ``clear``).  So the cache may hold more than ``capacity`` tables while many are
    dirty: bounding those is the driver's business (flush past a threshold).
  - Eviction happens in ``put`` only, never in ``get``: once ``len`` exceeds
    ``capacity`` the least recently used clean tables are dropped, down to
    ``low_water`` (default ``capacity``), and never the table just put -- its caller
    may be about to modify it and mark it dirty.
  - ``get`` counts as a use (least recently used goes first).

Not thread-safe: a driver serialises its own calls (the block layer holds one lock
per image).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class TableCache(Generic[K, T]):
    """Tables by key, least recently used first; clean ones evicted past ``capacity``."""

    __slots__ = ("capacity", "low_water", "dirty", "_tables")

    def __init__(self, capacity: int, *, low_water: int | None = None):
        if capacity < 1:
            raise ValueError("a table cache holds at least one table")
        self.capacity = capacity
        #: evicting stops once this many tables are left (batch eviction if below capacity)
        self.low_water = capacity if low_water is None else max(0, min(low_water, capacity))
        #: keys of the tables changed since they were last written (read it; change it
        #: through ``put``/``mark_dirty``/``mark_clean``)
        self.dirty: set[K] = set()
        self._tables: OrderedDict[K, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, key: K) -> bool:
        return key in self._tables

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self._tables)

    def get(self, key: K, default: T | None = None) -> T | None:
        """The cached table for ``key`` (now the most recently used), or ``default``."""
        t = self._tables.get(key)
        if t is None:
            return default
        self._tables.move_to_end(key)
        return t

    def __getitem__(self, key: K) -> T:
        t = self.get(key)
        if t is None:
            raise KeyError(key)
        return t

    def put(self, key: K, table: T, *, dirty: bool = False) -> T:
        """Cache ``table`` under ``key`` (replacing any table there) as the most recently
        used, dirty if asked; then evict clean tables past ``capacity``.  Returns ``table``."""
        tables = self._tables
        tables[key] = table
        tables.move_to_end(key)
        if dirty:
            self.dirty.add(key)
        if len(tables) > self.capacity:
            excess = len(tables) - self.low_water
            victims = []
            for k in tables:
                if k not in self.dirty and k != key:
                    victims.append(k)
                    if len(victims) >= excess:
                        break
            for k in victims:
                del tables[k]
        return table

    def mark_dirty(self, key: K) -> None:
        """The cached table for ``key`` was changed: keep it until it is written."""
        if key not in self._tables:
            raise KeyError(key)
        self.dirty.add(key)

    def dirty_items(self) -> list[tuple[K, T]]:
        """The dirty tables, by ascending key (the order to write them in)."""
        return [(k, self._tables[k]) for k in sorted(self.dirty)]

    def mark_clean(self, keys: Iterable[K] | None = None) -> None:
        """These tables (default: all dirty ones) are written: they may be evicted again."""
        if keys is None:
            self.dirty.clear()
        else:
            self.dirty.difference_update(keys)

    def pop(self, key: K, default: T | None = None) -> T | None:
        """Drop the table for ``key``, also a dirty one (its content is no longer wanted)."""
        self.dirty.discard(key)
        return self._tables.pop(key, default)

    def discard_clean(self, key: K) -> None:
        """Drop the table for ``key`` unless it is dirty."""
        if key not in self.dirty:
            self._tables.pop(key, None)

    def clear(self) -> None:
        """Drop every table, dirty ones included."""
        self._tables.clear()
        self.dirty.clear()

    def values(self):
        return self._tables.values()

    def items(self):
        return self._tables.items()

    def nbytes(self, per_table: int = 100) -> int:
        """Memory of the cached tables: each one's buffer plus ``per_table`` for the
        object and its slot (an estimate; exact for the buffers)."""
        return sum(memoryview(t).nbytes + per_table for t in self._tables.values())
