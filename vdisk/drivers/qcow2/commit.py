"""Emptying the active state, for ``commit`` (QEMU: ``qcow2_make_empty``).

Concern: dropping every cluster of the active tree so that the whole image reads
through to its backing image again.

May assume: the tables, the refcounts (deferred frees) and ``flush``.

Guarantees: every L1 entry of the active state becomes 0 and each L2 table and
data cluster it referenced loses that reference (snapshots keep theirs, and so
their data); entries pointing into metadata are refused before anything changes
for them.  Durable when it returns; freed clusters are punched out of the file.
A crash in between leaves, sector by sector, the overlay's data or the backing
image's.

State owned: none.
"""

from __future__ import annotations

from ...codec import qcow2 as C
from .tables import nonzero


class CommitMixin:
    """make_empty."""

    def make_empty(self) -> None:
        """Drop every cluster of the active state: its L1 entries become zero, so all
        of it reads through to the backing image again (``commit`` empties an overlay
        this way).  Snapshots keep their data: only the active tree's references
        go.  Durable when this returns; freed clusters are punched out of the file."""
        self._writable()
        self.flush()
        cs = self.cluster_size
        per = self.l2_entries
        for l1i, l1e in nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            for i, e in enumerate(self._l2(off, f" (L1 index {l1i})")):
                if e:
                    self._release_entry(e, l1i * per + i)
            self._free_cluster(off // cs)
            self.l1[l1i] = 0
            self._mark_l1(l1i)
        self._ctail = None
        self._dcache = None
        self.flush()
