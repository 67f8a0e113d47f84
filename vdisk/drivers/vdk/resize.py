"""Changing the extent of the live state: ``resize`` and ``make_empty``.

Contract.  Both commit before returning.  Growing reads as zeros in the new range
(also over a longer backing image: zero entries hide it); shrinking drops every
cluster past the new end and keeps the bytes past it inside the last cluster zero.
The cost follows what is allocated, never the virtual size: only L1 entries that
are not zero (found at C speed) and the allocated entries of existing tables are
visited.  ``make_empty`` drops every cluster of the live state, so reads fall
through to the backing image (``commit`` empties an overlay this way).
"""

from __future__ import annotations

from ...codec import vdk as C

_unpack_l2 = C.L2_ENTRY.unpack_from
_ESZ = C.L2_ENTRY_SIZE


class ResizeMixin:
    """resize and make_empty."""

    def resize(self, new_size: int) -> None:
        """Set the guest size and commit.  Shrinking drops what lies past the new end:
        whole L2 tables past the last L1 entry kept, and the entries past the end in
        the one table the new end cuts.  Its cost follows what is allocated (the L1
        entries that are not zero are found at C speed, and only the allocated entries
        of existing tables are visited), never the virtual size: shrinking a 256 TiB
        disk holding a few MiB takes as long as shrinking a 1 GiB one."""
        t = self.txn
        self._check_writable()
        self._check_size(new_size, self.cbits)
        old = self.size
        cs = self.cluster_size
        n = C.l1_entries_for(new_size, self.cbits)
        if new_size < old:
            tail = min(old, (new_size + cs - 1) & ~(cs - 1))
            if tail > new_size:
                self.write(new_size, bytes(tail - new_size))  # keep bytes past the end zero
            # whole clusters past the end inside the L2 tables kept (the tables past
            # them go below)
            first = (new_size + cs - 1) >> self.cbits
            end = min((old + cs - 1) >> self.cbits, n << self.l2_bits)
            if end > first:
                self._drop_range(first, end)
        if n != len(t.l1_off):
            self._mark_l1_dirty()
            for l2i in self._allocated_l2_indices(n, len(t.l1_off)):
                self._release_l2_index(l2i)
            del t.l1_off[n:], t.l1_sum[n:]
            t.l1_off.extend([0] * (n - len(t.l1_off)))
            t.l1_sum.extend([0] * (n - len(t.l1_sum)))
        self.size = new_size
        t.dirty = True
        if new_size > old and self.backing is not None and self.backing.size > old:
            self._zero_range(old, min(new_size, self.backing.size) - old)
        self._commit(force=True)

    def _drop_range(self, first: int, last: int) -> None:
        """Unmap guest clusters [first, last): used past the end of the disk.  Visits
        only the L2 tables that exist, and copies one (section 13.3) only if it maps
        something in the range; the cost follows the allocated entries."""
        l2b = self.l2_bits
        mask = self.l2_mask
        if last <= first:
            return
        for l2i in self._allocated_l2_indices(first >> l2b, ((last - 1) >> l2b) + 1):
            lo = max(first, l2i << l2b)
            hi = min(last, (l2i + 1) << l2b)
            a, b = (lo & mask) * _ESZ, (((hi - 1) & mask) + 1) * _ESZ
            tbl = self._l2(l2i)
            if tbl is None or tbl.count(0, a, b) == b - a:
                continue  # nothing mapped here: leave the table (and its sharing) alone
            tbl = self._l2_for_write(l2i)
            for pos in range(a, b, _ESZ):
                desc, slen = _unpack_l2(tbl, pos)[:2]
                if desc:
                    self._release_entry(desc, slen)
            tbl[a:b] = bytes(b - a)

    def make_empty(self) -> None:
        """Drop every cluster of the live state: reads fall through to the backing
        image again (``commit`` empties the overlay this way)."""
        t = self.txn
        self._check_writable()
        self._mark_l1_dirty()
        for l2i in range(len(t.l1_off)):
            self._release_l2_index(l2i)
            t.l1_off[l2i] = t.l1_sum[l2i] = 0
        self._commit(force=True)
