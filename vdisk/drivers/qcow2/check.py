"""Consistency check and repair (QEMU: ``qcow2_check_refcounts`` and its repair
paths in ``qcow2-refcount.c``).

Concern: rebuilding every refcount from the mapping tables (active L1, snapshot
tables and L1s, refcount structures), comparing with the stored ones, and
repairing.  Semantics follow qemu-img: refcount lower than the references,
COPIED set on a shared cluster, bad offsets or reserved bits are corruptions
(exit 2); refcount higher than the references is a leak (exit 3), and so is
COPIED clear on a cluster with refcount 1 (harmless: a crash inside
``snapshot_create`` can leave it).  ``repair="leaks"`` lowers leaked refcounts
and sets such COPIED flags; ``repair="all"`` rebuilds the whole refcount
structure past the used clusters.

May assume: the tables, the refcounts, the metadata index and the COPIED-flag
fix-up (:mod:`.trees`).  Also called at a read-write open of an image with the
dirty bit set (``_repair_all``).

Guarantees: a check without repair changes nothing (it flushes a writable image
first, so that it sees what is on disk); memory is one 8-byte counter per host
cluster, refused (``NotSupported``) past ``MAX_CHECK_CLUSTERS``.  A repair
writes the new refcount structure completely and flushes before the header
points at it, and is durable when it returns.

State owned: none (a repair replaces ``reftable`` and empties the refcount-block
cache and the pending frees).
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...errors import CorruptImage, NotSupported, UsageError, VdiskError
from ..base import CheckResult
from .limits import MAX_CHECK_CLUSTERS, MAX_REFTABLE_BYTES, ceil_div
from .tables import nonzero


class CheckMixin:
    """check, and the repairs it can make."""

    def _compute_refcounts(self, res: CheckResult, *, include_refcount_structures: bool = True, check_copied: bool = True):
        """Count every reference to every host cluster.  Returns (counts, n_file_clusters).
        Problems found on the way go to ``res.corruptions``."""
        cs = self.cluster_size
        eof = self._eof
        nclusters = ceil_div(eof, cs)
        if nclusters > MAX_CHECK_CLUSTERS:
            raise NotSupported(
                f"{self.host.name}: the file spans {nclusters} clusters; check handles at most {MAX_CHECK_CLUSTERS}"
            )
        counts = array.array("Q", bytes(8 * (nclusters + 1)))
        # clusters referenced past the end of the file are reported, not counted
        def add(c: int, what: str) -> None:
            if c >= nclusters:
                res.corruptions.append(f"{what}: cluster {c} lies beyond the end of the file")
                return
            counts[c] += 1

        def add_range(off: int, nbytes: int, what: str) -> None:
            if nbytes <= 0:
                return
            for c in range(off // cs, (off + nbytes - 1) // cs + 1):
                add(c, what)

        add(0, "header")
        h = self.hdr

        def walk(l1: array.array, label: str, active: bool) -> None:
            for l1i, l1e in nonzero(l1):
                off = l1e & C.OFFSET_MASK
                if not off:
                    continue
                if off % cs:
                    res.corruptions.append(f"{label} L1 entry {l1i}: L2 offset {off:#x} is not cluster aligned")
                    continue
                if off + cs > eof:
                    res.corruptions.append(f"{label} L1 entry {l1i}: L2 table at {off:#x} lies beyond the end of the file")
                    continue
                add(off // cs, f"{label} L2 table")
                if l1e & C.L1_RESERVED:
                    res.corruptions.append(f"{label} L1 entry {l1i}: reserved bits set ({l1e & C.L1_RESERVED:#x})")
                if active and check_copied:
                    _copied_check(res, f"{label} L1 entry {l1i}", bool(l1e & C.FLAG_COPIED), self._rc(off // cs))
                try:
                    t = self._l2(off)
                except CorruptImage as exc:
                    res.corruptions.append(str(exc))
                    continue
                entries = enumerate(t) if not self.extl2 else enumerate(map(C.ext_l2_descriptor, t[0::2]))
                for l2i, e in entries:
                    if not e:
                        continue
                    res.checked_clusters += 1
                    ent = C.decode_l2_entry(e, self.cluster_bits)
                    gofs = (l1i * self.l2_entries + l2i) * cs
                    if ent.reserved and not self.extl2:
                        res.corruptions.append(
                            f"{label} guest offset {gofs}: L2 entry has reserved bits set ({ent.reserved:#x})"
                        )
                    if ent.kind == C.COMPRESSED:
                        res.compressed_clusters += 1
                        res.allocated_clusters += 1
                        a, b = C.compressed_host_range(ent)
                        if a >= eof:
                            res.corruptions.append(f"{label} guest offset {gofs}: compressed data beyond the end of file")
                            continue
                        add_range(a, b - a, f"{label} compressed cluster")
                        continue
                    if ent.host_offset:
                        if ent.host_offset % cs:
                            res.corruptions.append(
                                f"{label} guest offset {gofs}: data cluster offset {ent.host_offset:#x} not aligned"
                            )
                            continue
                        if ent.kind == C.NORMAL:
                            res.allocated_clusters += 1
                        add(ent.host_offset // cs, f"{label} data cluster at guest offset {gofs}")
                        if active and check_copied:
                            rc = self._rc(ent.host_offset // cs)
                            _copied_check(res, f"{label} guest offset {gofs}", bool(ent.copied), rc)

        if len(self.l1):
            add_range(h.l1_table_offset, len(self.l1) * 8, "active L1 table")
        if self._snapshot_view is None:
            walk(self.l1, "active", True)
        else:
            act = self._read_l1(h.l1_table_offset, h.l1_size, "active L1 table")
            walk(act, "active", False)
        if h.nb_snapshots:
            add_range(h.snapshots_offset, getattr(self, "_snap_table_bytes", 0), "snapshot table")
        for s in self.snapshots:
            try:
                l1 = self._read_l1(s.l1_table_offset, s.l1_size, f"snapshot {s.name!r} L1 table")
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
                continue
            add_range(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.name!r} L1 table")
            walk(l1, f"snapshot {s.name!r}", False)
        if include_refcount_structures:
            add_range(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
            for ri, e in enumerate(self.reftable):
                off = e & C.OFFSET_MASK
                if not off:
                    continue
                if off % cs or off + cs > eof:
                    res.corruptions.append(f"refcount table entry {ri}: block offset {off:#x} invalid")
                    continue
                add(off // cs, "refcount block")
        return counts, nclusters

    def check(self, *, repair: str | None = None) -> CheckResult:
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"qcow2: repair must be 'leaks' or 'all' (got {repair!r})")
        if repair and self.read_only:
            raise VdiskError(f"{self.host.name}: image is open read-only; cannot repair")
        if not self.read_only:
            self.flush()
        res = self._check_once()
        if repair is None or (not res.corruptions and not res.leaks):
            return res
        if repair == "leaks" or not res.corruptions:
            counts, _ = self._compute_refcounts(CheckResult())
            fixed = 0
            for c in self._stored_clusters():
                rc = self._rc(c)
                want = counts[c] if c < len(counts) else 0
                if rc > want:
                    self._rc_set(c, want)
                    fixed += 1
            self._write_dirty_refblocks()
            self.host.flush()
            self._free_hint = 0
            self._build_meta_index()
            if self._snapshot_view is None:
                self._fix_copied_flags()
                self._flush_metadata()
            after = self._check_once()
            after.repaired.append(f"{fixed} leaked cluster(s) freed; COPIED flags set where refcount is 1")
            return after
        self._repair_all(res)
        after = self._check_once()
        after.repaired.append("refcounts rebuilt from the mapping tables; COPIED flags fixed")
        return after

    def _stored_clusters(self):
        """Every cluster index that has a stored refcount (all of each existing block)."""
        for ri, e in enumerate(self.reftable):
            if e & C.OFFSET_MASK:
                yield from range(ri * self.rb_entries, (ri + 1) * self.rb_entries)

    def _check_once(self) -> CheckResult:
        res = CheckResult()
        counts, nclusters = self._compute_refcounts(res)
        leaked = 0
        rbe = self.rb_entries
        for ri, e in enumerate(self.reftable):
            base = ri * rbe
            off = e & C.OFFSET_MASK
            blk = None
            if off:
                try:
                    blk = self._rb(off)
                except CorruptImage as exc:
                    res.corruptions.append(str(exc))
            seg = counts[base : min(base + rbe, nclusters)]
            if blk is not None:
                try:
                    same = array.array(blk.typecode, seg) == blk[: len(seg)] and not any(blk[len(seg) :])
                except OverflowError:
                    same = False
            else:
                same = not any(seg)
            if same:
                continue
            for i in range(rbe):
                c = base + i
                rc = blk[i] if blk is not None else 0
                want = counts[c] if c < nclusters else 0
                if rc == want:
                    continue
                if rc > want:
                    leaked += 1
                    if len(res.leaks) < 1000:
                        res.leaks.append(f"cluster {c}: refcount {rc}, references {want}")
                else:
                    res.corruptions.append(f"cluster {c}: refcount {rc} but {want} reference(s)")
        for c in range(len(self.reftable) * rbe, nclusters):
            if counts[c]:
                res.corruptions.append(f"cluster {c}: has no refcount block but {counts[c]} reference(s)")
        res.leaked_clusters = leaked
        if leaked > len(res.leaks):
            res.leaks.append(f"... {leaked} leaked clusters in all")
        return res

    def _repair_all(self, res: CheckResult) -> None:
        """Rebuild the whole refcount structure from the mapping tables (new refcount
        table and blocks written past every used cluster), then fix COPIED flags."""
        cs = self.cluster_size
        self._rbcache.clear()
        self._pending_free.clear()
        counts, nclusters = self._compute_refcounts(CheckResult(), include_refcount_structures=False, check_copied=False)
        used_end = nclusters
        while used_end > 0 and counts[used_end - 1] == 0:
            used_end -= 1
        rbe = self.rb_entries
        nb = nt = 0
        while True:
            total = used_end + nb + nt
            nb2 = ceil_div(total, rbe)
            nt2 = ceil_div(nb2 * 8, cs)
            if (nb2, nt2) == (nb, nt):
                break
            nb, nt = nb2, nt2
        if nt * cs > MAX_REFTABLE_BYTES:
            raise VdiskError(f"{self.host.name}: rebuilt refcount table would be too large")
        total = used_end + nb + nt
        full = array.array("Q", bytes(8 * total))
        for c in range(min(used_end, len(counts))):
            full[c] = counts[c]
        blocks_at = used_end
        table_at = used_end + nb
        for c in range(used_end, total):
            full[c] = 1
        reftable = array.array("Q", bytes(8 * (nt * cs // 8)))
        for ri in range(nb):
            b = C.new_refblock(cs, self.order)
            chunk = full[ri * rbe : (ri + 1) * rbe]
            for i, v in enumerate(chunk):
                if v > self.rc_max:
                    raise VdiskError(f"{self.host.name}: cluster {ri * rbe + i} needs refcount {v}, beyond the limit")
                b[i] = v
            off = (blocks_at + ri) * cs
            self._pwrite(off, C.encode_refblock(b, self.order))
            reftable[ri] = off
        self._pwrite(table_at * cs, C.encode_u64_table(reftable))
        self.host.flush()
        self.hdr = self.hdr.replace(refcount_table_offset=table_at * cs, refcount_table_clusters=nt)
        self._write_header()
        self.host.flush()
        self.reftable = reftable
        self.reftable_capacity = len(reftable)
        self._reftable_dirty = False
        self._free_hint = 0
        self._build_meta_index()  # the refcount structure moved
        self._fix_copied_flags()
        self._flush_metadata()


def _copied_check(res: CheckResult, what: str, copied: bool, rc: int) -> None:
    """COPIED set on a shared cluster is a corruption (a write would go in place into
    data a snapshot shares).  COPIED clear on a cluster with refcount 1 only costs a
    needless copy-on-write -- a crash between the two updates leaves it -- so it is
    reported with the leaks and fixed by ``check -r leaks``."""
    if copied and rc != 1:
        res.corruptions.append(f"{what}: COPIED flag 1 but refcount {rc}")
    elif not copied and rc == 1:
        res.leaks.append(f"{what}: COPIED flag 0 but refcount 1 (harmless; fixed by repairing leaks)")
