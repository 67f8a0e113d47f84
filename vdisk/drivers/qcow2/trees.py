"""Whole-tree walks: the references of an L1 tree, and the COPIED flags of the
active tree (QEMU: ``qcow2_update_snapshot_refcount`` and the COPIED checks of
``qcow2-refcount.c``).

Concern: what a snapshot operation or a repair does to every cluster an L1 table
reaches -- counting one reference more or less for each, and keeping bit 63
(COPIED) of the active L1/L2 entries equal to "refcount is 1".

May assume: the look-up (:mod:`.cluster`) and the refcounts (:mod:`.refcount`).

Guarantees:
  - ``_tree_refs(l1)`` yields each host cluster the tree of ``l1`` references, once
    per reference (each L2 table, then its entries' clusters); an entry pointing
    into metadata raises ``CorruptImage`` (``_guard``).
  - ``_add_tree_refs(l1, +1)`` is all or nothing: an increment that would overflow
    a refcount raises ``UnsupportedFeature`` with every increment taken back;
    ``_precheck_increment`` is the same as a dry run.  ``-1`` defers each drop to
    the next flush (``_free_cluster``).
  - ``_clear_copied_flags`` clears COPIED everywhere in the active tree;
    ``_fix_copied_flags`` sets it exactly where the refcount is 1.  Both change
    tables in memory only (dirty), written by the next flush.

State owned: none.
"""

from __future__ import annotations

import array
import itertools

from ...codec import qcow2 as C
from ...errors import UnsupportedFeature
from .tables import nonzero


class TreesMixin:
    """Reference walks over whole L1 trees and the COPIED flags."""

    def _tree_refs(self, l1: array.array):
        """Every host cluster the tree of ``l1`` references, once per reference: each
        L2 table, then the clusters of its entries.  Entries pointing into metadata
        are refused (``_guard``)."""
        cs = self.cluster_size
        per = self.l2_entries
        for l1i, l1e in nonzero(l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            yield off // cs
            for i, e in enumerate(self._l2(off, f" (L1 index {l1i})")):
                if e:
                    self._guard(e, l1i * per + i)
                    yield from self._entry_refs(e)

    def _add_tree_refs(self, l1: array.array, delta: int) -> None:
        """One reference more (``delta`` +1) or less (-1) to every cluster of the tree
        of ``l1``.  An increment that would overflow a refcount (or a tree pointing
        into metadata) raises with nothing changed."""
        if delta > 0:
            self._incref_tree(l1, keep=True)
        else:
            for c in self._tree_refs(l1):
                self._free_cluster(c)

    def _precheck_increment(self, l1: array.array) -> None:
        """Raise before anything changes if one more reference to the tree of ``l1``
        would overflow a refcount (or the tree points into metadata)."""
        self._incref_tree(l1, keep=False)

    def _incref_tree(self, l1: array.array, *, keep: bool) -> None:
        """Increment every reference of the tree of ``l1`` in memory; on a failure take
        every increment back and raise; without ``keep`` take them back anyway (a dry
        run: the refcounts themselves count, so no memory per cluster is needed -- a
        dict of every data cluster cost ~100 bytes a cluster)."""
        done = 0
        failure = None
        try:
            for c in self._tree_refs(l1):
                rc = self._rc(c)
                if rc + 1 > self.rc_max:
                    failure = UnsupportedFeature(
                        f"{self.host.name}: cluster {c} would need refcount {rc + 1} or more, beyond the "
                        f"{1 << self.order}-bit refcounts of this image (create it with wider refcount_bits)"
                    )
                    break
                self._rc_set(c, rc + 1)
                done += 1
        except BaseException:
            self._decref_first(l1, done)
            raise
        if failure is not None or not keep:
            self._decref_first(l1, done)
        if failure is not None:
            raise failure

    def _decref_first(self, l1: array.array, n: int) -> None:
        """Take back the increments of the first ``n`` references of the tree."""
        for c in itertools.islice(self._tree_refs(l1), n):
            self._rc_set(c, self._rc(c) - 1)

    def _clear_copied_flags(self) -> None:
        for l1i, l1e in nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            if l1e & C.FLAG_COPIED:
                self.l1[l1i] = l1e & ~C.FLAG_COPIED
                self._mark_l1(l1i)
            self._clear_l2_copied(off)

    def _clear_l2_copied(self, off: int) -> None:
        """Clear COPIED in every entry of the L2 table at ``off`` (then dirty, if any was set)."""
        t = self._l2(off)
        if any(e & C.FLAG_COPIED for e in t):
            for i, e in enumerate(t):
                if e & C.FLAG_COPIED:
                    t[i] = e & ~C.FLAG_COPIED
            self._l2cache.mark_dirty(off)

    def _fix_copied_flags(self) -> None:
        """Make bit 63 of the active L1/L2 entries say exactly "refcount is 1"."""
        cs = self.cluster_size
        for l1i, l1e in nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            own = self._rc(off // cs) == 1
            want = off | (C.FLAG_COPIED if own else 0)
            if l1e != want:
                self.l1[l1i] = want
                self._mark_l1(l1i)
            t = self._l2(off)
            changed = False
            for i, e in enumerate(t):
                if not e or e & C.FLAG_COMPRESSED:
                    if e & C.FLAG_COMPRESSED and e & C.FLAG_COPIED:
                        t[i] = e & ~C.FLAG_COPIED
                        changed = True
                    continue
                h = e & C.OFFSET_MASK
                flag = bool(h) and self._rc(h // cs) == 1
                ne = (e | C.FLAG_COPIED) if flag else (e & ~C.FLAG_COPIED)
                if ne != e:
                    t[i] = ne
                    changed = True
            if changed:
                self._l2cache.mark_dirty(off)
