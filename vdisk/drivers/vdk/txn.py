"""The transaction: the commit protocol of section 13.2.

A transaction is everything changed since the current header was written; it
ends with ``_commit``: place every dirty table in new clusters (``_place_tables``),
write them and fdatasync, write the header to the other slot and fdatasync, then
free what the new generation no longer references (``_release_pending``).

Contract.  A failure before the header write leaves the durable image as it was
and rolls the in-memory state back to what it was before the attempt, so a later
flush can retry.  A failure while writing or syncing the header leaves it unknown
whether that generation is durable: what either generation references stays
reserved, and the next commit first writes that same header again, to the same
slot.
"""

from __future__ import annotations

import array
import heapq

from ...codec import vdk as C
from ...errors import VdiskError

AUTO_COMMIT_DIRTY_L2 = 1024
AUTO_COMMIT_PENDING_FREE = 1 << 16


class TxnMixin:
    """flush, close and the commit of a transaction."""

    def flush(self) -> None:
        if self.read_only:
            return
        self._commit()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self.broken:
                self._commit()
        finally:
            self._closed = True
            self.host.close()

    def _maybe_commit(self) -> None:
        if len(self.l2dirty) > AUTO_COMMIT_DIRTY_L2 or len(self.pending_free) > AUTO_COMMIT_PENDING_FREE:
            self._commit()

    def _commit(self, force: bool = False) -> None:
        """Write a new generation: tables to new clusters, sync, header, sync.

        If the host fails before the header is written, the in-memory state is rolled
        back to what it was before the attempt (the durable image never saw it), so a
        later flush can retry.  If it fails while writing or syncing the header, that
        generation may or may not be durable: its clusters and the previous one's stay
        reserved, and the next commit first writes that same header again."""
        if self.read_only or not (self._dirty or force or self._header_unsure):
            return
        self._check_writable()
        if self._header_unsure:
            self._write_header(self.header)
            self._header_unsure = False
            self._release_pending()
            if not (self._dirty or force):
                return
        if self._unwritten:
            self._rewrite_unwritten()
        saved = self._save_state()
        self._undo = []
        try:
            new, writes = self._place_tables()
            for off, data in writes:
                self.host.pwrite(off, data)
            if self.host.size() < self.host_clusters * self.cluster_size:
                self.host.truncate(self.host_clusters * self.cluster_size)
            self.host.flush()
        except BaseException:
            self._restore_state(saved)
            raise
        finally:
            self._undo = None
        self.header = new
        self.new_clusters.clear()
        self.rc_dirty.clear()
        self.rc_placed.clear()
        self.l1_dirty = self.snap_dirty = self._dirty = False
        self.pack_cluster = -1
        try:
            self._write_header(new)
        except BaseException:
            self._header_unsure = True
            raise
        self._release_pending()

    def _write_header(self, h: C.Header) -> None:
        """Write ``h`` over the slot that does not hold the current header, then sync.
        (Re-issuing a header whose write failed goes to the same slot again.)"""
        if h.generation != self._slot_gen:
            self.slot = 1 - self.slot
            self._slot_gen = h.generation
        data = h.encode()
        self.host.pwrite(C.SLOT_OFFSETS[self.slot], data + bytes(C.SLOT_SIZE - len(data)))
        self.host.flush()

    def _release_pending(self) -> None:
        """The newest generation is durable: what it no longer references may be reused."""
        freed = sorted(self.pending_free)
        for c in freed:
            heapq.heappush(self.free_heap, c)
        self.pending_free.clear()
        if self.dropped_new:
            # Written in a transaction that dropped them again: free, but their bytes
            # would stay in the file (check counts that as leaked space).
            rc = self.rc
            freed = sorted(set(freed).union(c for c in self.dropped_new if c < len(rc) and rc[c] == 0))
            self.dropped_new.clear()
        self._punch(freed)

    def _save_state(self) -> dict:
        return {
            "host_clusters": self.host_clusters, "rc_len": len(self.rc), "l1_off": array.array("Q", self.l1_off),
            "l1_sum": array.array("Q", self.l1_sum), "l2dirty": set(self.l2dirty),
            "l2tables": {i: self.l2cache[i] for i in self.l2dirty}, "l1_dirty": self.l1_dirty,
            "snap_dirty": self.snap_dirty, "rt_off": array.array("Q", self.rt_off), "rt_sum": array.array("Q", self.rt_sum),
            "rc_dirty": set(self.rc_dirty), "rc_placed": dict(self.rc_placed),
            "pending_free": set(self.pending_free), "new_clusters": set(self.new_clusters),
            "free_heap": list(self.free_heap), "scan_pos": self._scan_pos, "pack": (self.pack_cluster, self.pack_used), "dirty": self._dirty,
        }

    def _restore_state(self, st: dict) -> None:
        rc = self.rc
        n = st["rc_len"]
        for c, v in reversed(self._undo):
            if c < n:
                rc[c] = v
        del rc[n:]
        self.host_clusters = st["host_clusters"]
        self.l1_off, self.l1_sum = st["l1_off"], st["l1_sum"]
        self.l2dirty = st["l2dirty"]
        self.l2cache.update(st["l2tables"])
        self.l1_dirty, self.snap_dirty = st["l1_dirty"], st["snap_dirty"]
        self.rt_off, self.rt_sum = st["rt_off"], st["rt_sum"]
        self.rc_dirty, self.rc_placed = st["rc_dirty"], st["rc_placed"]
        self.pending_free, self.new_clusters = st["pending_free"], st["new_clusters"]
        self.free_heap = st["free_heap"]
        self._scan_pos = st["scan_pos"]
        self.pack_cluster, self.pack_used = st["pack"]
        self._dirty = st["dirty"]

    def _place_tables(self) -> tuple[C.Header, list[tuple[int, bytes]]]:
        """Steps 1-4 of a commit: give every dirty table a new home; return the new
        header and the writes to issue."""
        cs = self.cluster_size
        cbits = self.cbits
        writes: list[tuple[int, bytes]] = []
        h = self.header
        # 1. L2 tables
        for l2i in sorted(self.l2dirty):
            tbl = self.l2cache[l2i]
            if tbl == self.zero_cluster:
                self.l1_off[l2i] = self.l1_sum[l2i] = 0
                del self.l2cache[l2i]
                continue
            c = self._alloc()
            data = bytes(tbl)
            writes.append((c << cbits, data))
            self.l1_off[l2i] = c << cbits
            self.l1_sum[l2i] = C.checksum(data)
        self.l2dirty.clear()
        # 2. L1 table
        l1_offset, l1_n, l1_sum = h.l1_offset, h.l1_entries, h.l1_checksum
        if self.l1_dirty:
            l1_n = len(self.l1_off)
            if l1_n:
                data = C.encode_l1(self.l1_off, self.l1_sum)
                ncl = (len(data) + cs - 1) >> cbits
                l1_offset = self._alloc_run(ncl) << cbits
                writes.append((l1_offset, data + bytes(ncl * cs - len(data))))
                l1_sum = C.checksum(data)
            else:
                l1_offset, l1_sum = 0, 0
        # 3. snapshot table
        st_off, st_len, st_sum = h.snapshot_table_offset, h.snapshot_table_length, h.snapshot_table_checksum
        if self.snap_dirty:
            if st_off:
                for c in range(st_off >> cbits, (st_off + st_len + cs - 1) >> cbits):
                    self._decref(c)
            data = C.encode_snapshot_table(self.snapshots)
            if data:
                ncl = (len(data) + cs - 1) >> cbits
                st_off = self._alloc_run(ncl) << cbits
                writes.append((st_off, data + bytes(ncl * cs - len(data))))
                st_len, st_sum = len(data), C.checksum(data)
            else:
                st_off = st_len = st_sum = 0
        # 4. refcount blocks and table: placing them changes refcounts, so iterate to a fixed point
        per = self.rc_per_block
        rt_first, rt_ncl = -1, 0
        old_rt = (h.refcount_table_offset, h.refcount_table_entries)
        released_old_rt = False
        while True:
            todo = [b for b in self.rc_dirty if b not in self.rc_placed]
            if todo:
                for b in sorted(todo):
                    self.rc_placed[b] = -1
                    if b < len(self.rt_off) and self.rt_off[b]:
                        self._decref(self.rt_off[b] >> cbits)
                    self.rc_placed[b] = self._alloc()
                continue
            if not released_old_rt:
                released_old_rt = True
                if old_rt[0]:
                    for c in range(old_rt[0] >> cbits, (old_rt[0] + old_rt[1] * C.RT_ENTRY_SIZE + cs - 1) >> cbits):
                        self._decref(c)
                continue
            nblocks = (self.host_clusters + per - 1) // per
            need = (nblocks * C.RT_ENTRY_SIZE + cs - 1) >> cbits
            if rt_first < 0 or need > rt_ncl:
                if rt_first >= 0:
                    for c in range(rt_first, rt_first + rt_ncl):
                        self._decref(c)
                rt_ncl = need
                rt_first = self._alloc_run(rt_ncl)
                continue
            break
        nblocks = (self.host_clusters + per - 1) // per
        self.rt_off.extend([0] * (nblocks - len(self.rt_off)))
        self.rt_sum.extend([0] * (nblocks - len(self.rt_sum)))
        for b, c in self.rc_placed.items():
            data = C.encode_refcount_block(self.rc, b * per, per)
            writes.append((c << cbits, data))
            self.rt_off[b] = c << cbits
            self.rt_sum[b] = C.checksum(data)
        rt_data = C.encode_refcount_table(self.rt_off[:nblocks], self.rt_sum[:nblocks])
        writes.append((rt_first << cbits, rt_data + bytes(rt_ncl * cs - len(rt_data))))
        new = h.replace(
            generation=h.generation + 1, virtual_size=self.size, l1_offset=l1_offset, l1_entries=l1_n,
            l1_checksum=l1_sum, refcount_table_offset=rt_first << cbits, refcount_table_entries=nblocks,
            refcount_table_checksum=C.checksum(rt_data), snapshot_table_offset=st_off,
            snapshot_count=len(self.snapshots), snapshot_table_length=st_len, snapshot_table_checksum=st_sum,
            host_clusters=self.host_clusters,
        )
        return new, writes

    def _punch(self, clusters: list[int]) -> None:
        i = 0
        while i < len(clusters):
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
                j += 1
            try:
                self.host.punch_hole(clusters[i] << self.cbits, (j - i + 1) << self.cbits)
            except VdiskError:
                pass  # space reclamation is best effort; the clusters are free either way
            i = j + 1
