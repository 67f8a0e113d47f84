"""The mapping tables: L1 entries, the L2 cache, and copy-on-write of shared tables
(sections 6, 7 and 13.3).

State owned: ``l2cache``, a :class:`vdisk.drivers.cache.TableCache` (shared with
qcow2) of L2 index -> bytearray: clean tables as read, and the transaction's
dirty ones (``l2cache.dirty``: indices whose table was changed in this
transaction; their L1 entry is 0 until the commit places them), which it never
evicts; and these fields of :class:`.txn.TxnState`: ``l1_off``/``l1_sum`` (the
live or viewed root's L1: offsets and checksums of its L2 tables, compact
``array('Q')``) and ``l1_dirty``.

Contract.  ``_l2`` returns a table only after its checksum and every entry have
been validated against the image bounds; clean tables may be evicted at any time,
dirty ones never.  ``_l2_for_write`` returns a table that this transaction owns
alone: the first change after a snapshot copies the L1 (incrementing each L2 it
names) and the L2 (incrementing each cluster its entries touch), then drops this
root's reference to the old instance -- nothing the durable header references is
ever modified in place.
"""

from __future__ import annotations

from ...codec import vdk as C
from ..cache import TableCache

_SHIFT, _T_UNALLOC = C.TYPE_SHIFT, C.T_UNALLOCATED
L2_CACHE_MAX = 8192  # tables; past this, the least recently used clean ones go, down to half


def l2_cache() -> TableCache[int, bytearray]:
    """An empty L2 cache (L2 index -> table)."""
    return TableCache(L2_CACHE_MAX, low_water=L2_CACHE_MAX // 2)


class TablesMixin:
    """L1/L2 access, the L2 cache and copy-on-write of shared tables."""

    def _l2(self, l2i: int) -> bytearray | None:
        """The L2 table for index ``l2i`` (cached), or None if there is none."""
        tbl = self.l2cache.get(l2i)
        if tbl is not None:
            return tbl
        off = self.txn.l1_off[l2i]
        if off == 0:
            return None
        buf = self._read_checked(off, self.cluster_size, self.txn.l1_sum[l2i],
                                 f"L2 table for guest offset {l2i << (self.l2_bits + self.cbits):#x}")
        tbl = bytearray(buf)
        self._validate_l2(tbl, l2i)
        return self.l2cache.put(l2i, tbl)

    def _validate_l2(self, tbl, l2i: int) -> None:
        cs = self.cluster_size
        limit = self.txn.host_clusters * cs
        base = l2i << self.l2_bits
        n_valid = max(0, min(1 << self.l2_bits, ((self.size + cs - 1) >> self.cbits) - base))
        for j, (desc, length, codec, _csum, _birth) in enumerate(C.L2_ENTRY.iter_unpack(tbl)):
            if desc == 0 and length == 0 and codec == 0:
                continue
            why = C.validate_l2_entry(desc, length, codec, cs, limit)
            if why is None and j >= n_valid and desc >> _SHIFT != _T_UNALLOC:
                why = "entry maps a cluster past the end of the disk"
            if why:
                raise self._corrupt(f"L2 entry for guest offset {(base + j) << self.cbits:#x}: {why}")

    def _mark_l1_dirty(self) -> None:
        t = self.txn
        if t.l1_dirty:
            return
        h = self.header
        if h.l1_offset:
            first = h.l1_offset >> self.cbits
            ncl = (h.l1_entries * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits
            if t.rc[first] > 1:  # shared with a snapshot: our copy references every L2 too
                for o in t.l1_off:
                    if o:
                        self._incref(o >> self.cbits)
            for c in range(first, first + ncl):
                self._decref(c)
        t.l1_dirty = True
        t.dirty = True

    def _l2_for_write(self, l2i: int) -> bytearray:
        t = self.txn
        if l2i in self.l2cache.dirty:
            return self.l2cache[l2i]
        self._mark_l1_dirty()
        tbl = self._l2(l2i)
        if tbl is None:
            tbl = bytearray(self.cluster_size)
        else:
            c = t.l1_off[l2i] >> self.cbits
            if t.rc[c] > 1:  # shared: the copy references every data cluster too
                for (desc, slen, _c, _s, _b) in C.L2_ENTRY.iter_unpack(tbl):
                    for hc in self._entry_clusters(desc, slen):
                        self._incref(hc)
            self._decref(c)
        t.l1_off[l2i] = 0
        t.l1_sum[l2i] = 0
        self.l2cache.put(l2i, tbl, dirty=True)
        t.dirty = True
        return tbl

    def _allocated_l2_indices(self, lo: int, hi: int) -> list[int]:
        """The L2 indices in [lo, hi) that have a table (a non-zero L1 entry, or a table
        changed in this transaction), ascending.  The L1 entries are scanned at C speed
        (``itertools.compress``), so even a 2 Mi-entry L1 costs milliseconds."""
        from itertools import compress

        t = self.txn
        hi = min(hi, len(t.l1_off))
        if lo >= hi:
            return []
        found = set(compress(range(lo, hi), t.l1_off[lo:hi]))
        found.update(i for i in self.l2cache.dirty if lo <= i < hi)
        return sorted(found)

    def _release_l2_index(self, l2i: int) -> None:
        t = self.txn
        if l2i in self.l2cache.dirty:
            tbl = self.l2cache[l2i]
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                self._release_entry(desc, slen)
        elif t.l1_off[l2i]:
            self._release_l2(t.l1_off[l2i], t.l1_sum[l2i])
        self.l2cache.pop(l2i)  # also a dirty one: the table is gone
