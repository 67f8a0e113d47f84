"""A compact set of host cluster indices: the data structure of the metadata index.

Concern: membership, first member in a range, adds and removals of single
clusters and of runs, in bounded memory -- 8 bytes a single member, 16 bytes a
run whatever its length.  Pure: no I/O, no knowledge of qcow2 beyond "clusters
are non-negative integers".  Used by :mod:`.cluster` for the index of clusters
that hold metadata.
"""

from __future__ import annotations

import array
import heapq
import sys
from bisect import bisect_left, bisect_right


class ClusterSet:
    """A set of host cluster indices held compactly.

    Single clusters (L2 tables, refcount blocks) live in a sorted ``array('Q')`` (8
    bytes a member) plus small sets of recent additions and removals, folded into
    the array once they hold ``FOLD`` members.  Runs of clusters (L1 tables, the
    refcount table, snapshot tables) live as disjoint ``[start, end)`` intervals in
    two sorted arrays (16 bytes a run, whatever its length).  Membership costs two
    set look-ups and two bisections."""

    FOLD = 4096
    __slots__ = ("_base", "_added", "_removed", "_starts", "_ends")

    def __init__(self, items=(), runs=()):
        self._added: set[int] = set()
        self._removed: set[int] = set()
        # sort in chunks, then merge: no list of every member at once
        chunks, chunk = [], []
        for c in items:
            chunk.append(c)
            if len(chunk) >= 65536:
                chunks.append(array.array("Q", sorted(chunk)))
                chunk = []
        if chunk:
            chunks.append(array.array("Q", sorted(chunk)))
        self._base = self._dedup(heapq.merge(*chunks) if len(chunks) > 1 else (chunks[0] if chunks else ()))
        self._starts = array.array("Q")
        self._ends = array.array("Q")
        for a, b in sorted((a, b) for a, b in runs if b > a):
            if self._ends and a <= self._ends[-1]:
                if b > self._ends[-1]:
                    self._ends[-1] = b
            else:
                self._starts.append(a)
                self._ends.append(b)

    @staticmethod
    def _dedup(sorted_iter) -> array.array:
        out = array.array("Q")
        last = None
        for c in sorted_iter:
            if c != last:
                out.append(c)
                last = c
        return out

    def _in_base(self, c: int) -> bool:
        b = self._base
        i = bisect_left(b, c)
        return i < len(b) and b[i] == c

    def _in_runs(self, c: int) -> bool:
        i = bisect_right(self._starts, c) - 1
        return i >= 0 and c < self._ends[i]

    def __contains__(self, c: int) -> bool:
        if c in self._added:
            return True
        if self._starts and self._in_runs(c):
            return True
        if c in self._removed:
            return False
        return self._in_base(c)

    def add(self, c: int) -> None:
        if c in self._removed:
            self._removed.discard(c)
        elif not self._in_base(c):
            self._added.add(c)
            self._maybe_fold()

    def add_range(self, c: int, n: int) -> None:
        """Add the run ``[c, c + n)``."""
        if n <= 0:
            return
        e = c + n
        st, en = self._starts, self._ends
        i = bisect_left(en, c)  # first run ending at or after c: touches or follows
        j = bisect_right(st, e)  # runs starting at or before e
        if i < j:
            c, e = min(c, st[i]), max(e, en[j - 1])
        st[i:j] = array.array("Q", [c])
        en[i:j] = array.array("Q", [e])

    def discard(self, c: int) -> None:
        if c in self._added:
            self._added.discard(c)
        elif c not in self._removed and self._in_base(c):
            self._removed.add(c)
            self._maybe_fold()
        if self._starts and self._in_runs(c):
            self.discard_range(c, 1)

    def discard_range(self, c: int, n: int) -> None:
        """Remove ``[c, c + n)`` from the runs (single members: see ``discard``)."""
        e = c + n
        st, en = self._starts, self._ends
        i = bisect_right(en, c)  # first run ending after c
        j = bisect_left(st, e)  # runs starting before e
        if i >= j:
            return
        ks, ke = array.array("Q"), array.array("Q")
        if st[i] < c:
            ks.append(st[i])
            ke.append(c)
        if en[j - 1] > e:
            ks.append(e)
            ke.append(en[j - 1])
        st[i:j] = ks
        en[i:j] = ke

    def first_in(self, start: int, end: int) -> int | None:
        """The smallest member in ``[start, end)``, or None."""
        if end - start <= 8:
            for c in range(start, end):
                if c in self:
                    return c
            return None
        cands = []
        i = bisect_right(self._starts, start) - 1
        if i >= 0 and start < self._ends[i]:
            return start
        if i + 1 < len(self._starts) and self._starts[i + 1] < end:
            cands.append(self._starts[i + 1])
        b = self._base
        k = bisect_left(b, start)
        while k < len(b) and b[k] < end:
            if b[k] not in self._removed:
                cands.append(b[k])
                break
            k += 1
        added = self._added
        if len(added) <= end - start:
            cands.extend(c for c in added if start <= c < end)
        else:
            stop = min(cands, default=end)
            for c in range(start, stop):
                if c in added:
                    cands.append(c)
                    break
        return min(cands, default=None)

    def _maybe_fold(self) -> None:
        if len(self._added) + len(self._removed) >= self.FOLD:
            rm = self._removed
            self._base = self._dedup(heapq.merge((c for c in self._base if c not in rm), sorted(self._added)))
            self._added = set()
            self._removed = set()

    def nbytes(self) -> int:
        n = len(self._added) + len(self._removed)
        return (len(self._base) + 2 * len(self._starts)) * 8 + sys.getsizeof(self._added) + sys.getsizeof(
            self._removed) + 32 * n

