"""Resizing the active state (QEMU: ``qcow2_co_truncate``, ``qcow2_grow_l1_table``,
``qcow2_shrink_l1_table``).

Concern: changing the guest size -- the L1 table's length and place, the clusters
past a new end, and what the range between old and new end reads as.

May assume: the look-up and ``_l2_for_write`` (:mod:`.cluster`), the allocator
(:mod:`.refcount`), ``write``/``write_zeroes`` (:mod:`.write`) and ``flush``.

Guarantees (qemu-img 7.2's behaviour):
  - Growing: the new range reads as zeros, never as stale bytes of the old last
    cluster nor as the backing image's data (zero clusters are written over the
    part the backing image covers).
  - Shrinking: the new size is made durable first, so a crash later leaves the
    shrunk image with clusters past its end still referenced (leaks), never the
    old size with part of its end dropped; the tail of the new last cluster is
    zeroed, so growing again cannot show the dropped bytes; every cluster and L2
    table past the end loses the active reference.  Durable when it returns.
  - Internal snapshots keep their own size and L1 table; a version 2 image with
    snapshots is not resized at all (``NotSupported``, as qemu-img).
  - ``_set_l1_size`` relocates the L1 table when it needs more clusters; the old
    clusters are freed only after the header points at the new table.

State owned: none (``size`` and the header's ``size``/``l1_*`` fields change).
"""

from __future__ import annotations

from ...codec import qcow2 as C
from ...errors import NotSupported, UsageError
from .limits import MAX_L1_BYTES, ceil_div
from .tables import extend_zeros


class ResizeMixin:
    """resize and the length of the active L1 table."""

    def resize(self, new_size: int) -> None:
        """Grow or shrink the active state, as qemu-img 7.2 does: also under internal
        snapshots (each keeps its own size and L1 table; clusters past the new end
        lose the active state's reference only), except in a version 2 image,
        whose snapshots may not record their size (NotSupported, like qemu-img's
        "Can't resize a v2 image which has snapshots")."""
        self._writable()
        cs = self.cluster_size
        old_size = self.size
        if new_size == old_size:
            return
        if self.snapshots and self.hdr.version < 3:
            raise NotSupported(
                f"{self.host.name}: cannot resize a version 2 (compat=0.10) qcow2 image that has internal snapshots"
            )
        per_l1 = cs * self.l2_entries
        need = ceil_div(new_size, per_l1)
        if need * 8 > MAX_L1_BYTES:
            raise UsageError(f"{self.host.name}: qcow2 size {new_size} needs an L1 table beyond {MAX_L1_BYTES} bytes")
        if new_size < old_size:
            # the new size first, durably: nothing past it is visible from then on, so
            # a crash in what follows leaves the shrunk image with clusters past its
            # end still referenced -- never the old size with part of its end dropped
            self.size = new_size
            self.hdr = self.hdr.replace(size=new_size)
            self._hdr_dirty = True
            self.flush()
            # zero the tail of the new last cluster, so that growing again (here or by
            # another implementation) cannot expose the dropped bytes
            tail = min(old_size, ceil_div(new_size, cs) * cs)
            if tail > new_size:
                kind = C.decode_l2_entry(self._entry(new_size // cs), self.cluster_bits).kind
                if kind in (C.NORMAL, C.COMPRESSED):
                    self.write(new_size, bytes(tail - new_size))
            # drop every cluster past the new end
            first_gone = ceil_div(new_size, cs)
            last = ceil_div(old_size, cs)
            for gci in range(first_gone, min(last, need * self.l2_entries)):
                l1i, l2i = divmod(gci, self.l2_entries)
                off = self.l1[l1i] & C.OFFSET_MASK
                if not off:
                    continue
                e = self._l2(off)[l2i]
                if e:
                    wl2, t = self._l2_for_write(l1i)
                    self._release_entry(t[l2i], gci)
                    t[l2i] = 0
                    self._l2cache.mark_dirty(wl2)
            for l1i in range(need, len(self.l1)):
                off = self.l1[l1i] & C.OFFSET_MASK
                if off:
                    for i, e in enumerate(self._l2(off)):
                        if e:
                            self._release_entry(e, l1i * self.l2_entries + i)
                    self._free_cluster(off // cs)  # written if dirty, then freed at the flush
            self._set_l1_size(need)
            self.flush()
            return
        else:
            if need > len(self.l1):
                self._set_l1_size(need)
        self.size = new_size
        self.hdr = self.hdr.replace(size=new_size)
        self._hdr_dirty = True
        if new_size > old_size:
            # the grown range must read as zeros, never as stale data or backing data
            tail_end = min(new_size, ceil_div(old_size, cs) * cs)
            if tail_end > old_size:
                kind = C.decode_l2_entry(self._entry(old_size // cs), self.cluster_bits).kind
                if kind in (C.NORMAL, C.COMPRESSED) or self.backing is not None:
                    self.write(old_size, bytes(tail_end - old_size))
            if self.backing is not None and self.backing.size > tail_end:
                z_end = min(new_size, self.backing.size)
                if z_end > tail_end:
                    self.write_zeroes(tail_end, z_end - tail_end)
        self.flush()

    def _set_l1_size(self, need: int) -> None:
        """Make the active L1 table ``need`` entries long, relocating it when it needs
        more clusters; the old clusters are freed after the header moves."""
        cs = self.cluster_size
        old_off = self.hdr.l1_table_offset
        old_clusters = ceil_div(len(self.l1) * 8, cs)
        new_clusters = ceil_div(need * 8, cs)
        if need > len(self.l1):
            extend_zeros(self.l1, need - len(self.l1))
        else:
            del self.l1[need:]
        if new_clusters > old_clusters or (old_off == 0 and need):
            new_off = self._alloc(new_clusters)
            self._meta.add_range(new_off // cs, new_clusters)
            if old_off and old_clusters:
                for c in range(old_off // cs, old_off // cs + old_clusters):
                    self._free_cluster(c)
            self.hdr = self.hdr.replace(l1_table_offset=new_off, l1_size=need)
        else:
            for c in range(old_off // cs + new_clusters, old_off // cs + old_clusters):
                self._free_cluster(c)
            self.hdr = self.hdr.replace(l1_size=need, l1_table_offset=old_off if need else 0)
        self._mark_l1(0, len(self.l1))
        self._hdr_dirty = True

