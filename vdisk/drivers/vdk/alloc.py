"""Refcounts and allocation: who may use which host cluster (sections 9 and 13.1).

State owned (fields of :class:`.txn.TxnState`, ``self.txn``): the refcount array
``rc`` (one u32 per host cluster, loaded on a writable open), ``host_clusters``
(the end of the host area), the free-cluster heap (``free_heap`` with
``scan_pos``), and the transaction's allocation sets: ``new_clusters``
(allocated in this transaction), ``pending_free`` (dropped here but referenced by
the durable header; with ``held_free``, those of the last committed transaction
until its header is durable), ``dropped_new`` (allocated and dropped again) and
the packing cluster of compressed frames (``pack_cluster``, ``pack_used``).  Every
refcount change goes through ``_set_rc``, which marks the refcount block dirty
and, while a commit attempt is open, logs the old value for its rollback.

Guarantees.  ``_alloc`` never returns a cluster the durable header references:
only refcount-0 clusters that are not pending free (or held), else the next one
past the end.  A cluster whose refcount drops to 0 becomes reusable at once only if this
transaction allocated it; otherwise it stays pending until the next header is
durable (``_release_pending``).  Releasing a table instance recurses into what it
names only when its own count reaches zero, so deleting a snapshot costs what it
frees (Rodeh; DESIGN.md property 2).  A refcount that would go below zero or
overflow marks the image broken (no more writes) and raises ``CorruptImage``.
"""

from __future__ import annotations

import array
import heapq

from ...codec import vdk as C

_SHIFT, _MASK = C.TYPE_SHIFT, C.OFFSET_MASK
_T_DATA, _T_COMP = C.T_DATA, C.T_COMPRESSED
SCAN_CHUNK = 65536  # refcounts scanned for free clusters at a time, when the heap runs dry


class AllocMixin:
    """Refcounts, the free-cluster heap, allocation and the release of table trees."""

    def _set_rc(self, c: int, v: int) -> None:
        """The one way a refcount changes (logged for the rollback of an open commit attempt)."""
        t = self.txn
        rc = t.rc
        if t.undo is not None:
            t.undo.append((c, rc[c]))
        rc[c] = v
        t.rc_dirty.add(c // self.rc_per_block)

    def _alloc(self) -> int:
        """One free cluster, the lowest known free one first, else appended at the end.
        The heap holds candidates (freed clusters, and those a scan found); an entry is
        checked when it is popped, so stale or duplicate ones are harmless."""
        t = self.txn
        rc = t.rc
        heap = t.free_heap
        while True:
            if heap:
                c = heapq.heappop(heap)
                if c < t.host_clusters and rc[c] == 0 and c not in t.pending_free and c not in t.held_free:
                    break
                continue
            if t.scan_pos < t.host_clusters:
                start = t.scan_pos
                chunk = rc[start:start + SCAN_CHUNK]
                t.scan_pos = start + len(chunk)
                for i, v in enumerate(chunk):
                    if not v:
                        heap.append(start + i)  # ascending: still a heap
                continue
            c = t.host_clusters
            t.host_clusters += 1
            rc.append(0)
            break
        self._set_rc(c, 1)
        t.new_clusters.add(c)
        t.dirty = True
        return c

    def _alloc_many(self, n: int) -> list[int]:
        """``n`` clusters, exactly those ``n`` calls of ``_alloc`` would return, in that
        order: from the free heap (and the scan) while candidates are left, the rest
        appended at the end of the host area in one step (contiguous)."""
        t = self.txn
        out: list[int] = []
        while len(out) < n:
            if t.free_heap:
                out.append(self._alloc())
                continue
            if t.scan_pos < t.host_clusters:
                if t.host_clusters - t.scan_pos > SCAN_CHUNK or 0 in t.rc[t.scan_pos:t.host_clusters]:
                    out.append(self._alloc())  # scans (a chunk), then allocates
                    continue
                t.scan_pos = t.host_clusters  # what that scan would find: no free cluster
            first = self._append(n - len(out))
            out.extend(range(first, first + n - len(out)))
        return out

    def _alloc_run(self, n: int) -> int:
        """``n`` contiguous clusters: one comes from the free list, more are appended."""
        if n == 1:
            return self._alloc()
        return self._append(n)

    def _append(self, n: int) -> int:
        """``n`` new clusters at the end of the host area; the first one's index."""
        t = self.txn
        first = t.host_clusters
        t.host_clusters += n
        if t.undo is None:  # no commit attempt open: nothing to log, set them all at once
            t.rc.extend(array.array(t.rc.typecode, [1]) * n)
            rpb = self.rc_per_block
            t.rc_dirty.update(range(first // rpb, (first + n - 1) // rpb + 1))
            t.new_clusters.update(range(first, first + n))
        else:
            t.rc.extend([0] * n)
            for c in range(first, first + n):
                self._set_rc(c, 1)
                t.new_clusters.add(c)
        t.dirty = True
        return first

    def _alloc_piece(self, n: int) -> int:
        """Room for ``n`` (< cluster size) compressed bytes, packed after the previous
        piece; a piece may run on into the next cluster when that one is the next
        to be appended to the file, as it is while a fresh image fills up."""
        t = self.txn
        cs = self.cluster_size
        c = t.pack_cluster
        if c >= 0 and t.pack_used + n <= cs:
            self._incref(c)
            off = (c << self.cbits) + t.pack_used
            t.pack_used += n
        elif c >= 0 and t.pack_used < cs and c + 1 == t.host_clusters:
            off = (c << self.cbits) + t.pack_used
            self._incref(c)
            t.pack_cluster = self._append(1)  # c + 1
            t.pack_used = t.pack_used + n - cs
        else:
            t.pack_cluster = self._alloc()
            off = t.pack_cluster << self.cbits
            t.pack_used = n
        return off

    def _incref(self, c: int) -> None:
        v = self.txn.rc[c]
        if v >= 0xFFFFFFFF:
            raise self._corrupt(f"refcount of cluster {c} would overflow")
        self._set_rc(c, v + 1)

    def _decref(self, c: int) -> None:
        """Drop one reference; at zero the cluster is free again at once if this
        transaction allocated it, else pending free until the next header is durable."""
        t = self.txn
        v = t.rc[c]
        if v == 0:
            self._mark_broken(f"refcount of cluster {c} would drop below zero")
        self._set_rc(c, v - 1)
        t.dirty = True
        if v == 1:
            if c == t.pack_cluster:
                t.pack_cluster = -1
            if self._unwritten:
                lo, hi = c << self.cbits, (c + 1) << self.cbits
                for off in [o for o in self._unwritten if lo <= o < hi]:
                    del self._unwritten[off]
            if c in t.new_clusters:
                t.new_clusters.discard(c)
                heapq.heappush(t.free_heap, c)
                t.dropped_new.add(c)
            else:
                t.pending_free.add(c)

    def _mark_broken(self, why: str):
        self.broken = why
        raise self._corrupt(why)

    def _entry_clusters(self, desc: int, slen: int) -> tuple[int, ...]:
        """Host clusters an L2 entry references: one for data, one or two (a compressed
        cluster may cross one cluster boundary) for compressed, none otherwise."""
        kind = desc >> _SHIFT
        if kind == _T_DATA:
            return ((desc & _MASK) >> self.cbits,)
        if kind == _T_COMP:
            off = desc & _MASK
            first, last = off >> self.cbits, (off + slen - 1) >> self.cbits
            return (first,) if first == last else (first, last)
        return ()

    def _release_entry(self, desc: int, slen: int) -> None:
        kind = desc >> _SHIFT
        if kind == _T_DATA:
            self._decref((desc & _MASK) >> self.cbits)
        elif kind == _T_COMP:
            for c in self._entry_clusters(desc, slen):
                self._decref(c)

    def _release_l2(self, off: int, csum: int) -> None:
        c = off >> self.cbits
        if self.txn.rc[c] == 1:
            tbl = self._read_checked(off, self.cluster_size, csum, "L2 table")
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                self._release_entry(desc, slen)
        self._decref(c)

    def _release_l1(self, off: int, n: int, csum: int) -> None:
        if not off:
            return
        first = off >> self.cbits
        ncl = (n * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits
        if self.txn.rc[first] == 1:
            offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, "L1 table"), n)
            for o, s in zip(offs, sums):
                if o:
                    self._release_l2(o, s)
        for c in range(first, first + ncl):
            self._decref(c)
