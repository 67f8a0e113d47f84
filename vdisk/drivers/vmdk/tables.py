"""The grain tables of one sparse extent, held in memory.

Contract: a :class:`GrainTables` maps a grain number to its grain table entry
(0 where no grain table exists).  Only the grain tables the directory names
(or that writes create) are held, 2 KiB each: since every table the directory
names lies inside the file and no two overlap, what a file can make vdisk hold
is bounded by its own size, whatever its header claims.
"""

from __future__ import annotations

import array
from collections.abc import Iterator

from ...codec import vmdk as V

N = V.GTES_PER_GT
_EMPTY = bytes(4 * N)


class GrainTables:
    def __init__(self, n_tables: int):
        self.n_tables = n_tables
        self.tables: dict[int, array.array] = {}

    def __len__(self) -> int:
        return self.n_tables * N

    def __getitem__(self, g: int) -> int:
        t = self.tables.get(g // N)
        return t[g % N] if t is not None else 0

    def __setitem__(self, g: int, value: int) -> None:
        i = g // N
        t = self.tables.get(i)
        if t is None:
            if not value:
                return
            t = self.tables[i] = array.array("I", _EMPTY)
        t[g % N] = value

    def set_table(self, i: int, entries: array.array) -> None:
        if any(entries):
            self.tables[i] = entries

    def table(self, i: int) -> array.array:
        """Grain table ``i`` (a copy of zeros where none is held)."""
        t = self.tables.get(i)
        return t if t is not None else array.array("I", _EMPTY)

    def items(self) -> Iterator[tuple[int, int]]:
        """(grain, entry) of every non-zero entry, in grain order."""
        for i in sorted(self.tables):
            base = i * N
            for j, e in enumerate(self.tables[i]):
                if e:
                    yield base + j, e

    def clear(self) -> None:
        self.tables.clear()

    def grow(self, n_tables: int) -> None:
        self.n_tables = max(self.n_tables, n_tables)

    def first_difference(self, other: GrainTables) -> int | None:
        """The first grain whose entries differ, or None."""
        for i in sorted(set(self.tables) | set(other.tables)):
            a, b = self.table(i), other.table(i)
            if a != b:
                return i * N + next(j for j in range(N) if a[j] != b[j])
        return None
