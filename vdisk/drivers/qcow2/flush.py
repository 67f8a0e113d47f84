"""Write-back of the metadata, in the order that keeps a crash harmless
(QEMU: ``qcow2_cache_flush`` and the dependencies between its caches).

Concern: when and in which order cached metadata reaches the file.  L2 tables and
refcount blocks are cached in memory (:mod:`.tables`); modified ones are written
by ``flush`` in this order, with a host flush (fdatasync) between the stages:

  1. guest data (already written by ``write``) and refcount blocks holding the
     *increments* of new allocations;
  2. the refcount table, if it gained entries (or its relocated copy + header);
  3. L2 tables;
  4. the L1 table and the header (size, L1 location, snapshot table location);
  5. the *decrements* of clusters that lost a reference (kept aside in
     ``_pending_free`` until now, so that a freed cluster is never reused nor
     its refcount dropped before the last reference to it is gone on disk);
     freed clusters are then punched out of the host file.

A crash between stages leaves at worst leaked clusters (``check -r leaks``),
never a reference to a cluster whose refcount is zero on disk.  Refcounts are
exact after every ``flush``; the dirty bit is never set by this driver.  Tables
whose write fails stay dirty (and the L1 range marked, the header flagged), so the
next flush writes them again; decrements whose application fails are lost, which
leaks the clusters they would have freed.

May assume: every other module changes metadata in memory only, marks what it
changed (dirty tables, ``_mark_l1``, ``_reftable_dirty``, ``_hdr_dirty``) and
defers every dropped reference to ``_pending_free``.

Guarantees: after ``flush`` returns, everything written before it is durable.
``_maybe_flush`` (called at the end of each write) flushes once more than
``_dirty_max`` tables are dirty or 65536 decrements wait, so that dirty tables,
which the caches never evict, stay bounded.

State owned: ``_hdr_dirty`` (the header must be written at stage 4) and
``_dirty_max``.
"""

from __future__ import annotations

from ...codec import qcow2 as C


class FlushMixin:
    """flush and the order of its stages."""

    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        self._flush_metadata()

    def _maybe_flush(self) -> None:
        if len(self._l2cache.dirty) + len(self._rbcache.dirty) > self._dirty_max or len(self._pending_free) > 65536:
            self.flush()

    def _flush_metadata(self) -> None:
        host = self.host
        cs = self.cluster_size
        # 1. refcount increments (and guest data, written already)
        old_rt = self._ensure_reftable_capacity()
        self._write_dirty_refblocks()
        host.flush()
        # 2. refcount table
        if old_rt is not None:
            self._write_reftable()
            host.flush()
            self._write_header()
            host.flush()
            for c in range(old_rt[0] // cs, old_rt[0] // cs + old_rt[1]):
                self._free_cluster(c)
            self._reftable_dirty = False
        elif self._reftable_dirty:
            self._write_reftable()
            self._reftable_dirty = False
            host.flush()
        # 3. L2 tables
        dirty = self._l2cache.dirty_items()
        if dirty:
            for off, t in dirty:
                self._pwrite(off, C.encode_u64_table(t))
            self._l2cache.mark_clean()
            host.flush()
        # 4. L1 table and header
        if self._l1_hi > self._l1_lo or self._hdr_dirty:
            lo, hi = self._l1_lo, min(self._l1_hi, len(self.l1))
            if hi > lo:
                # only the changed entries, in whole 512-byte sectors
                lo &= ~63
                hi = min(len(self.l1), (hi + 63) & ~63)
                self._write_u64_table(self.hdr.l1_table_offset, self.l1, lo, hi)
            self._l1_lo = self._l1_hi = 0  # only once written: a failed write is retried
            if hi > lo and self._hdr_dirty:
                host.flush()
            if self._hdr_dirty:
                self._write_header()
                self._hdr_dirty = False
            host.flush()
        # 5. refcount decrements of dropped references
        if self._pending_free:
            self._apply_pending_free()
            # applying may have grown nothing (decrements only), but write the blocks
            self._write_dirty_refblocks()
            host.flush()
