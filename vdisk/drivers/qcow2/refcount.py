"""Refcounts and cluster allocation (QEMU: ``qcow2-refcount.c``, its allocation half).

Concern: the refcount of every host cluster (the refcount table and its blocks),
allocating runs of free clusters, dropping references, and growing the refcount
table.  The byte layout of refcount blocks is the codec's
(``C.decode_refblock``/``encode_refblock``).

May assume: the header fields (``cluster_size``, ``order``, ``rc_max``,
``rb_entries``), the table caches (:mod:`.tables`) and the metadata index
(:mod:`.cluster`: ``_meta``, ``_guard``, ``_refuse_meta``).

Guarantees:
  - Every change is made in memory (dirty refcount blocks, ``_reftable_dirty``)
    and reaches the file only through ``flush`` (:mod:`.flush`), in its order.
  - ``_alloc(n)`` returns the host offset of ``n`` contiguous clusters whose
    refcount is now 1, never a cluster that holds metadata; refcount blocks the
    run needs are created and placed right after it.  ``_rc_set`` refuses a
    refcount beyond the image's ``refcount_bits`` (``VdiskError``) before changing
    anything.
  - A dropped reference (``_free_cluster``, ``_release_entry``) is applied only
    at the end of the next flush (``_apply_pending_free``), after the last
    reference to the cluster is gone on disk: a freed cluster is never reused, nor
    its refcount lowered, while the file still points at it.  A cluster whose
    refcount reaches 0 leaves the metadata index and the caches, and its space
    is punched out of the host file.
  - ``_ensure_reftable_capacity`` moves the refcount table to bigger clusters
    once it outgrew its own; the old clusters are freed after the header points
    to the new one.

State owned: ``reftable`` (``array('Q')``) and ``reftable_capacity`` (entries
its clusters hold), ``_reftable_dirty``, ``_free_hint`` (no free cluster lies
below it), ``_pending_free`` (cluster -> references to drop at the next flush).
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...errors import CorruptImage, VdiskError
from .limits import MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, ceil_div
from .tables import extend_zeros


def _ones(blk, n: int):
    """``n`` refcounts of 1 in the type of the refcount block ``blk`` (an array of the
    codec's type code; a list for narrow refcounts)."""
    if isinstance(blk, array.array):
        return array.array(blk.typecode, [1]) * n
    return [1] * n


class RefcountMixin:
    """Per-cluster refcounts, allocation and deferred frees."""

    def _rc(self, c: int) -> int:
        ri, i = divmod(c, self.rb_entries)
        if ri >= len(self.reftable):
            return 0
        off = self.reftable[ri] & C.OFFSET_MASK
        if not off:
            return 0
        return self._rb(off)[i]

    def _rc_set(self, c: int, value: int) -> None:
        if value > self.rc_max or value < 0:
            raise VdiskError(
                f"{self.host.name}: refcount of cluster {c} would be {value}, beyond the "
                f"{1 << self.order}-bit limit of this image"
            )
        ri, i = divmod(c, self.rb_entries)
        off = self.reftable[ri] & C.OFFSET_MASK if ri < len(self.reftable) else 0
        if not off:
            off = self._create_refblock(ri)
        self._rb(off)[i] = value
        self._rbcache.mark_dirty(off)

    def _rc_set_run(self, start: int, end: int) -> None:
        """Refcount 1 for clusters ``[start, end)``: what ``_rc_set(c, 1)`` for each
        does (a block is created where a range has none), one slice per block."""
        rbe = self.rb_entries
        c = start
        while c < end:
            ri, i = divmod(c, rbe)
            k = min(rbe - i, end - c)
            self._rc_set(c, 1)  # creates the block if needed, marks it dirty
            if k > 1:
                blk = self._rb(self.reftable[ri] & C.OFFSET_MASK)
                blk[i + 1 : i + k] = _ones(blk, k - 1)
            c += k

    def _create_refblock(self, ri: int) -> int:
        """A new refcount block for range ``ri``, placed at that range's first cluster
        (free by definition: no block means every refcount in the range is 0)."""
        c0 = ri * self.rb_entries
        off = c0 * self.cluster_size
        if off >= MAX_HOST_OFFSET:
            raise VdiskError(f"{self.host.name}: qcow2 image is full (host offset limit reached)")
        self._refuse_meta(c0, c0 + 1)
        self._meta.add(c0)
        if ri >= len(self.reftable):
            if (ri + 1) * 8 > MAX_REFTABLE_BYTES:
                raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
            extend_zeros(self.reftable, ri + 1 - len(self.reftable))
        b = C.new_refblock(self.cluster_size, self.order)
        b[0] = 1
        self._rbcache.put(off, b, dirty=True)
        self.reftable[ri] = off
        self._reftable_dirty = True
        return off

    def _has_block(self, ri: int) -> bool:
        return ri < len(self.reftable) and bool(self.reftable[ri] & C.OFFSET_MASK)

    def _alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous free clusters (refcount set to 1); return the
        first cluster's host offset.

        Ranges without a refcount block count as free.  Blocks the run needs are
        placed right after it (a block lives in the range it describes when that
        range has none yet), so runs longer than one block's range stay contiguous."""
        rbe = self.rb_entries
        c = self._free_hint
        start = c
        run = 0
        first_free = None
        while run < n:
            ri, i = divmod(c, rbe)
            if not self._has_block(ri):
                if run == 0:
                    start = c
                    if first_free is None:
                        first_free = start
                take = min(rbe - i, n - run)
                run += take
                c += take
                continue
            blk = self._rb(self.reftable[ri] & C.OFFSET_MASK)
            # scan this block without a call per cluster
            while i < rbe and run < n:
                if blk[i] == 0:
                    if run == 0:
                        start = ri * rbe + i
                        if first_free is None:
                            first_free = start
                    run += 1
                else:
                    run = 0
                i += 1
            c = ri * rbe + i
        end = start + n
        if end * self.cluster_size > MAX_HOST_OFFSET:
            raise VdiskError(f"{self.host.name}: qcow2 image is full (host offset limit reached)")
        self._refuse_meta(start, end)
        # refcount blocks for the ranges of the run that have none, placed after it
        pending = [ri for ri in range(start // rbe, (end - 1) // rbe + 1) if not self._has_block(ri)]
        placed: dict[int, int] = {}
        taken: set[int] = set()
        q = end
        while pending:
            ri = pending.pop(0)
            while True:
                qri, qi = divmod(q, rbe)
                if q not in taken and (not self._has_block(qri) or self._rb(self.reftable[qri] & C.OFFSET_MASK)[qi] == 0):
                    break
                q += 1
            self._refuse_meta(q, q + 1)
            placed[ri] = q
            taken.add(q)
            qri = q // rbe
            if not self._has_block(qri) and qri not in placed and qri not in pending:
                pending.append(qri)
            q += 1
        for ri, cl in placed.items():
            if ri >= len(self.reftable):
                if (ri + 1) * 8 > MAX_REFTABLE_BYTES:
                    raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
                extend_zeros(self.reftable, ri + 1 - len(self.reftable))
            off = cl * self.cluster_size
            self._rbcache.put(off, C.new_refblock(self.cluster_size, self.order), dirty=True)
            self._meta.add(cl)
            self.reftable[ri] = off
            self._reftable_dirty = True
        for cl in placed.values():
            self._rc_set(cl, 1)
        self._rc_set_run(start, end)
        # clusters before the first free one found are all in use: skip them next time
        self._free_hint = end if first_free == start else first_free
        return start * self.cluster_size

    def _free_cluster(self, c: int, count: int = 1) -> None:
        """Drop one reference to cluster ``c`` -- applied at the end of the next flush."""
        self._pending_free[c] = self._pending_free.get(c, 0) + count

    def _incref(self, c: int) -> None:
        self._rc_set(c, self._rc(c) + 1)

    def _clusters_of_range(self, start: int, end: int) -> range:
        cs = self.cluster_size
        return range(start // cs, (end - 1) // cs + 1)

    def _release_entry(self, e: int, gci: int) -> None:
        """The L2 entry ``e`` (of guest cluster ``gci``) is being replaced: drop its
        references.  One pointing into metadata is refused first (dropping its
        reference would free the metadata)."""
        if not e:
            return
        self._guard(e, gci)
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.COMPRESSED:
            a, b = C.compressed_host_range(ent)
            for c in self._clusters_of_range(a, b):
                self._free_cluster(c)
        elif ent.host_offset and ent.kind in (C.NORMAL, C.ZERO):
            self._free_cluster(ent.host_offset // self.cluster_size)

    def _entry_refs(self, e: int):
        """Host clusters an L2 entry references (one reference each)."""
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.COMPRESSED:
            a, b = C.compressed_host_range(ent)
            return self._clusters_of_range(a, b)
        if ent.host_offset and ent.kind in (C.NORMAL, C.ZERO):
            return (ent.host_offset // self.cluster_size,)
        return ()

    # ------------------------------------------------------------------ the refcount table
    def _ensure_reftable_capacity(self) -> tuple[int, int] | None:
        """If the in-memory refcount table outgrew its clusters, allocate a bigger
        one.  Returns (old offset, old clusters) to free once the header points to the new one."""
        if len(self.reftable) <= self.reftable_capacity:
            return None
        cs = self.cluster_size
        while True:
            want_entries = len(self.reftable) + 2 + len(self.reftable) // 4
            n = ceil_div(want_entries * 8, cs)
            if n * cs > MAX_REFTABLE_BYTES:
                raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
            off = self._alloc(n)
            if len(self.reftable) <= n * cs // 8:
                break
            for c in range(off // cs, off // cs + n):  # grew past it while allocating: again
                self._rc_set(c, 0)
        old = (self.hdr.refcount_table_offset, self.hdr.refcount_table_clusters)
        self._meta.add_range(off // cs, n)
        self.hdr = self.hdr.replace(refcount_table_offset=off, refcount_table_clusters=n)
        self.reftable_capacity = n * cs // 8
        return old

    def _write_reftable(self) -> None:
        cs = self.cluster_size
        off = self.hdr.refcount_table_offset
        self._write_u64_table(off, self.reftable, 0, len(self.reftable))
        pad = self.hdr.refcount_table_clusters * cs - len(self.reftable) * 8
        if pad > 0:
            self._pwrite(off + len(self.reftable) * 8, bytes(pad))

    def _write_dirty_refblocks(self) -> bool:
        dirty = self._rbcache.dirty_items()
        if not dirty:
            return False
        for off, b in dirty:
            self._pwrite(off, C.encode_refblock(b, self.order))
        self._rbcache.mark_clean()
        return True

    # ------------------------------------------------------------------ deferred frees
    def _apply_pending_free(self) -> None:
        cs = self.cluster_size
        freed = []
        pending, self._pending_free = self._pending_free, {}
        for c, k in sorted(pending.items()):
            rc = self._rc(c)
            if rc < k:
                raise CorruptImage(
                    f"{self.host.name}: qcow2 refcount of cluster {c} ({rc}) is lower than its references; "
                    "run check -r all"
                )
            self._rc_set(c, rc - k)
            if rc == k:
                freed.append(c)
                self._meta.discard(c)
                self._l2cache.pop(c * cs)  # also a dirty one: the table is gone
                self._rbcache.discard_clean(c * cs)
        if freed:
            self._free_hint = min(self._free_hint, freed[0])
            self._ctail = None
            self._dcache = None
            # give the space back to the host, in runs
            start = prev = freed[0]
            for c in freed[1:] + [None]:
                if c is not None and c == prev + 1:
                    prev = c
                    continue
                if start * cs < self._eof:
                    host_end = min((prev + 1) * cs, self._eof)
                    try:
                        self.host.punch_hole(start * cs, host_end - start * cs)
                    except VdiskError:
                        pass
                if c is not None:
                    start = prev = c
