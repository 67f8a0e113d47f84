"""Cluster mapping: guest cluster -> L2 entry, L2 tables for writing, and the
index of clusters that hold metadata (QEMU: ``qcow2-cluster.c``).

Concern: looking up the L2 entry of a guest cluster (standard and extended L2
entries), finding or allocating the L2 table a write changes, and refusing any
mapping that points into metadata.

May assume: the header fields (``cluster_bits``, ``l2_entries``, ``extl2``), the
table caches (:mod:`.tables`) and the allocator (:mod:`.refcount`).

Guarantees:
  - ``_entry(gci)`` is the raw L2 entry of guest cluster ``gci`` in the active
    (or viewed) L1 -- 0 where there is no L2 table; with extended L2 entries, the
    first word with bit 0 cleared (``C.ext_l2_descriptor``).
  - ``_l2_for_write(l1i)`` returns ``(offset, table)`` of an L2 table that only
    the active L1 references (refcount 1, COPIED set in its L1 entry): a new
    zeroed table, the table itself, or a copy of a table shared with a snapshot
    (entries of the copy carry no COPIED flag; the old table loses the active
    reference at the next flush).  The caller marks it dirty after changing it.
  - Metadata is never data: ``_build_meta_index`` indexes every cluster that holds
    metadata (header, refcount table and blocks, the active L1 and its L2
    tables, the snapshot table, snapshot L1 tables and the L2 tables they use, up
    to ``MAX_SNAPSHOT_L1_SCAN`` bytes of snapshot L1s); ``_guard`` and
    ``_data_offset`` refuse an L2 entry that points into it (``CorruptImage``
    naming the guest offset), ``_refuse_meta`` refuses to hand such a cluster out.
    Whoever allocates metadata adds it (``_meta.add``/``add_range``); the
    refcount module removes clusters whose refcount drops to 0.

State owned: ``l1`` (the active L1 table, or the viewed snapshot's),
``_l1_lo``/``_l1_hi`` (entries of the active L1 changed since the last flush),
``_meta`` (a :class:`.clusterset.ClusterSet`) and ``_meta_partial`` (True if
snapshot L1 tables were left out of it).
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...errors import CorruptImage
from .clusterset import ClusterSet
from .limits import MAX_SNAPSHOT_L1_SCAN, TABLE_READ_CHUNK, ceil_div
from .tables import nonzero


class MappingMixin:
    """L1/L2 look-up and allocation, the metadata-overlap index."""

    # ------------------------------------------------------------------ the active L1
    def _mark_l1(self, lo: int, hi: int | None = None) -> None:
        """Entries ``[lo, hi)`` (default: entry ``lo``) of the active L1 changed."""
        hi = lo + 1 if hi is None else hi
        if self._l1_hi <= self._l1_lo:
            self._l1_lo, self._l1_hi = lo, hi
        else:
            self._l1_lo, self._l1_hi = min(self._l1_lo, lo), max(self._l1_hi, hi)

    # ------------------------------------------------------------------ look-up
    def _entry(self, gci: int) -> int:
        l1i, l2i = divmod(gci, self.l2_entries)
        if l1i >= len(self.l1):
            return 0
        l1e = self.l1[l1i]
        off = l1e & C.OFFSET_MASK
        if not off:
            return 0
        if self.extl2:
            # bit 0 is not a zero flag with extended entries: the bitmap says
            return C.ext_l2_descriptor(self._l2(off, f" (L1 index {l1i})")[2 * l2i])
        return self._l2(off, f" (L1 index {l1i})")[l2i]

    def _l2_slot(self, gci: int) -> tuple[array.array | None, int]:
        """(the L2 table of guest cluster ``gci``, or None where there is none; the
        index of its entry there).  Standard L2 entries: the entry is ``table[index]``,
        as ``_entry`` returns it; for scanning a table's neighbouring entries."""
        l1i, l2i = divmod(gci, self.l2_entries)
        if l1i >= len(self.l1):
            return None, l2i
        off = self.l1[l1i] & C.OFFSET_MASK
        if not off:
            return None, l2i
        return self._l2(off, f" (L1 index {l1i})"), l2i

    def _ext_bitmap(self, gci: int) -> int:
        l1i, l2i = divmod(gci, self.l2_entries)
        if l1i >= len(self.l1) or not self.l1[l1i] & C.OFFSET_MASK:
            return 0
        return self._l2(self.l1[l1i] & C.OFFSET_MASK)[2 * l2i + 1]  # the second word: the bitmap

    def _ext_pieces(self, offset: int, length: int):
        """Extended L2 entries: (guest pos, length, kind, host offset or entry) per subcluster run."""
        cs = self.cluster_size
        scs = cs // C.SUBCLUSTERS
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            e = self._entry(gci)
            if e & C.FLAG_COMPRESSED:
                n = min(cs - coff, end - pos)
                yield pos, n, "c", e
                pos += n
                continue
            bm = self._ext_bitmap(gci)
            alloc, zero = C.decode_subcluster_bitmap(bm)
            host = e & C.OFFSET_MASK
            sc = coff // scs
            n = min(scs - coff % scs, end - pos)
            if alloc >> sc & 1:
                if not host or host % cs:
                    raise CorruptImage(
                        f"{self.host.name}: qcow2 subcluster at guest offset {pos} is allocated without a valid cluster"
                    )
                self._guard(host, gci)
                yield pos, n, "d", host + coff
            elif zero >> sc & 1:
                yield pos, n, "z", None
            else:
                yield pos, n, "u", None
            pos += n

    def _pieces(self, offset: int, length: int):
        """(guest pos, length, kind, host offset of the data or 0) for each cluster of
        the range -- each subcluster run with extended L2 entries; kind is one of
        ``C.NORMAL``, ``C.ZERO``, ``C.UNALLOCATED``, ``C.COMPRESSED``."""
        if self.extl2:
            kinds = {"d": C.NORMAL, "z": C.ZERO, "u": C.UNALLOCATED, "c": C.COMPRESSED}
            for pos, n, kind, x in self._ext_pieces(offset, length):
                yield pos, n, kinds[kind], (x if kind == "d" else 0)
            return
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            n = min(cs - coff, end - pos)
            ent = C.decode_l2_entry(self._entry(gci), self.cluster_bits)
            yield pos, n, ent.kind, ent.host_offset + coff if ent.kind == C.NORMAL else 0
            pos += n

    def _data_offset(self, ent: C.L2Entry, gci: int) -> int:
        """The host offset of a standard data cluster, validated (also against the
        metadata index: a data cluster inside metadata is corruption)."""
        host = ent.host_offset
        where = f"{self.host.name}: qcow2 L2 entry for guest offset {gci * self.cluster_size}"
        if ent.reserved:
            raise CorruptImage(f"{where} has reserved bits set ({ent.reserved:#x})")
        if host % self.cluster_size:
            raise CorruptImage(f"{where}: data cluster {host:#x} is not cluster aligned")
        if host >= self._eof:
            raise CorruptImage(f"{where}: data cluster {host:#x} lies beyond the end of the file ({self._eof} bytes)")
        if (host >> self.cluster_bits) in self._meta:
            raise CorruptImage(f"{where} points at host offset {host:#x}, which holds qcow2 metadata (run check)")
        return host

    # ------------------------------------------------------------------ L2 tables for writing
    def _l2_for_write(self, l1i: int) -> tuple[int, array.array]:
        """The L2 table for L1 index ``l1i``, allocated and owned by the active L1 only."""
        cs = self.cluster_size
        l1e = self.l1[l1i]
        off = l1e & C.OFFSET_MASK
        if not off:
            new = self._alloc(1)
            self._meta.add(new // cs)
            t = self._l2cache.put(new, array.array("Q", bytes(cs)), dirty=True)
            self.l1[l1i] = new | C.FLAG_COPIED
            self._mark_l1(l1i)
            return new, t
        t = self._l2(off, f" (L1 index {l1i})")
        if self._rc(off // cs) == 1:
            if not l1e & C.FLAG_COPIED:
                self.l1[l1i] = off | C.FLAG_COPIED
                self._mark_l1(l1i)
            return off, t
        # shared with a snapshot: copy the table.  The data clusters keep their
        # refcounts (each L1 -> L2 path counts once) and stay shared, so no entry
        # of the copy may carry the COPIED flag.
        new = self._alloc(1)
        self._meta.add(new // cs)
        t2 = array.array("Q", t)
        for i, e in enumerate(t2):
            if e & C.FLAG_COPIED:
                t2[i] = e & ~C.FLAG_COPIED
        self._l2cache.put(new, t2, dirty=True)
        self.l1[l1i] = new | C.FLAG_COPIED
        self._mark_l1(l1i)
        self._free_cluster(off // cs)
        return new, t2

    # ------------------------------------------------------------------ the metadata index
    def _build_meta_index(self) -> None:
        """Index every host cluster that holds metadata: the header cluster, the
        refcount table and blocks, the active L1 table and its L2 tables, the
        snapshot table, each snapshot's L1 table and the L2 tables they point to.

        A data cluster (standard or compressed L2 entry) inside one of them is
        corruption: reads, writes and snapshot operations refuse it (``_guard``)
        instead of handing metadata out as guest data or overwriting it.  The index
        is kept up to date as metadata is allocated (``_meta.add``) and freed
        (refcount 0 in ``_apply_pending_free``).  Offsets that are invalid (not
        aligned, past the end of the file) are left out: other checks report them.
        Snapshot L1 tables are read once here, up to ``MAX_SNAPSHOT_L1_SCAN`` bytes
        in all; L2 tables that only snapshots past that amount use are not indexed."""
        cs = self.cluster_size
        h = self.hdr
        eof = self._eof
        self._meta_partial = False

        runs = []

        def table(off: int, nbytes: int) -> None:
            if off and not off % cs and nbytes > 0 and off < eof:
                runs.append((off // cs, ceil_div(min(off + nbytes, eof), cs)))

        def l2s(l1):
            for _, e in nonzero(l1):
                off = e & C.OFFSET_MASK
                if off and not off % cs and off < eof:
                    yield off // cs

        table(h.refcount_table_offset, h.refcount_table_clusters * cs)
        table(h.l1_table_offset, h.l1_size * 8)
        if h.nb_snapshots:
            table(h.snapshots_offset, self._snap_table_bytes)
        roots = [(s.l1_table_offset, s.l1_size) for s in self.snapshots]
        if self._snapshot_view is not None:
            roots.insert(0, (h.l1_table_offset, h.l1_size))
        for off, n in roots:
            if n and not off % cs and off + n * 8 <= eof:
                table(off, n * 8)

        def members():
            yield 0  # the header
            yield from l2s(self.reftable)  # refcount block offsets: same layout as L1 entries
            if self._snapshot_view is None:
                yield from l2s(self.l1)
            seen = set()
            scanned = 0
            for off, n in roots:
                if not n or off % cs or off + n * 8 > eof or (off, n) in seen:
                    continue
                seen.add((off, n))
                if scanned + n * 8 > MAX_SNAPSHOT_L1_SCAN:
                    self._meta_partial = True
                    continue
                scanned += n * 8
                pos, end = off, off + n * 8
                while pos < end:
                    k = min(TABLE_READ_CHUNK, end - pos)
                    yield from l2s(C.decode_u64_table(self.host.pread(pos, k)))
                    pos += k

        self._meta = ClusterSet(members(), runs)

    def _guard(self, e: int, gci: int) -> None:
        """Refuse the L2 entry ``e`` (guest cluster ``gci``) if the host clusters it
        references hold metadata (see ``_build_meta_index``)."""
        if e & C.FLAG_COMPRESSED:
            ent = C.decode_l2_entry(e, self.cluster_bits)
            a, b = C.compressed_host_range(ent)
            hit = self._meta.first_in(a >> self.cluster_bits, ((b - 1) >> self.cluster_bits) + 1)
        else:
            off = e & C.OFFSET_MASK
            hit = off >> self.cluster_bits if off and (off >> self.cluster_bits) in self._meta else None
        if hit is not None:
            raise CorruptImage(
                f"{self.host.name}: qcow2 L2 entry for guest offset {gci * self.cluster_size} points at host "
                f"offset {hit * self.cluster_size:#x}, which holds qcow2 metadata (run check)"
            )

    def _refuse_meta(self, start: int, end: int) -> None:
        """Clusters about to be handed out must not hold metadata (a refcount of 0 on
        metadata is corruption; reusing the cluster would overwrite it)."""
        hit = self._meta.first_in(start, end)
        if hit is not None:
            raise CorruptImage(
                f"{self.host.name}: qcow2 metadata at host offset {hit * self.cluster_size:#x} has refcount 0 "
                "(run check -r all)"
            )
