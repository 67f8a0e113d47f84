"""``check``: verify an image from every root and, if asked, repair it (section 16).

Contract.  Walks the live state and every snapshot, verifies every checksum
(tables and data, compressed clusters decoded), recounts the references and
compares them with the stored refcounts: fewer stored than found is corruption
(exit 2); more is a leak (exit 3), and so is file space that no cluster in use
needs.  What it finds is reported as messages in the ``CheckResult``, never
raised.  A writable image is committed first, so the check sees the
durable state; ``repair="leaks"`` (only when nothing is corrupt) and
``repair="all"`` rewrite the refcounts through an ordinary commit and give leaked
file space back, touching nothing the durable header references.

State owned: none; it reads the tables directly (not through the L2 cache) and
changes refcounts only through ``_set_rc`` and ``_commit``.
"""

from __future__ import annotations

import array
import os

from ...codec import vdk as C
from ...errors import ChecksumMismatch, CorruptImage, UsageError
from ..base import CheckResult

_SHIFT, _MASK = C.TYPE_SHIFT, C.OFFSET_MASK
_T_UNALLOC, _T_DATA, _T_COMP = C.T_UNALLOCATED, C.T_DATA, C.T_COMPRESSED


class CheckMixin:
    """check and its helpers."""

    def check(self, *, repair: str | None = None) -> CheckResult:
        """Walk every table from every root (live state and each snapshot), verify each
        checksum (tables and data), recount references and compare with the stored
        refcounts.  Fewer stored than found is corruption; more is a leak, and so is
        file space that holds data no cluster in use needs (``_check_file_space``).
        A repair of leaks also gives that space back."""
        if repair and self.read_only:
            raise UsageError(f"{self.name}: open the image read-write to repair it")
        if not self.read_only:
            self._commit()
            self._punch_deferred()  # free clusters whose punch waited are not leaked space
        res = CheckResult()
        cs = self.cluster_size
        cbits = self.cbits
        h = self.header
        nclusters = h.host_clusters
        expected = array.array("I", bytes(4 * nclusters))
        stored = self.txn.rc
        if stored is None:
            try:
                self._load_refcounts()
                stored = self.txn.rc
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
        reserved = (C.HEADER_AREA + cs - 1) // cs

        def ref(c: int, what: str) -> None:
            if 0 <= c < nclusters:
                expected[c] += 1
            else:
                res.corruptions.append(f"{what} references cluster {c} past the end of the image")

        def ref_run(off: int, nbytes: int, what: str) -> None:
            for c in range(off >> cbits, (off + nbytes + cs - 1) >> cbits):
                ref(c, what)

        for c in range(reserved):
            ref(c, "header")
        if stored is not None:
            ref_run(h.refcount_table_offset, h.refcount_table_entries * C.RT_ENTRY_SIZE, "refcount table")
            for o in self.txn.rt_off[:h.refcount_table_entries]:
                ref(o >> cbits, "refcount table")
        if h.snapshot_table_offset:
            ref_run(h.snapshot_table_offset, h.snapshot_table_length, "snapshot table")
        roots = [("live state", h.l1_offset, h.l1_entries, h.l1_checksum, h.virtual_size)]
        roots += [(f"snapshot {r.name!r}", r.l1_offset, r.l1_entries, r.l1_checksum, r.virtual_size)
                  for r in self.snapshots]
        seen_l1: set[int] = set()
        seen_l2: set[int] = set()
        for what, off, n, csum, vsize in roots:
            if not off:
                continue
            if vsize > C.MAX_VIRTUAL_SIZE or n != C.l1_entries_for(vsize, cbits):
                res.corruptions.append(f"{self.name}: L1 table of {what} has {n} entries for a {vsize}-byte disk")
                continue
            if off % cs or off + n * C.L1_ENTRY_SIZE > nclusters * cs:
                res.corruptions.append(f"{self.name}: L1 table of {what} at {off:#x} lies outside the image")
                continue
            ref_run(off, n * C.L1_ENTRY_SIZE, f"L1 table of {what}")
            if off in seen_l1:
                continue
            seen_l1.add(off)
            try:
                offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, f"L1 table of {what}"), n)
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
                continue
            for l2i, (o, s) in enumerate(zip(offs, sums)):
                if not o:
                    continue
                ref(o >> cbits, f"L1 table of {what}")
                if o in seen_l2:
                    continue
                seen_l2.add(o)
                self._check_l2(l2i, o, s, vsize, what, ref, res)
        if stored is not None:
            bad = 0
            for c in range(nclusters):
                e, s = expected[c], stored[c]
                if s < e:
                    res.corruptions.append(f"cluster {c}: refcount {s} but {e} references")
                    bad += 1
                elif s > e:
                    res.leaks.append(f"cluster {c}: refcount {s} but {e} references" if e
                                     else f"cluster {c} is leaked (refcount {s}, no references)")
                    if e == 0:
                        res.leaked_clusters += 1
            res.allocated_clusters = sum(1 for v in expected if v)
            fix = (repair == "all") or (repair == "leaks" and not res.corruptions)
            if fix and (res.leaks or (repair == "all" and bad)):
                for c in range(nclusters):
                    if stored[c] != expected[c] and (repair == "all" or stored[c] > expected[c]):
                        self._set_rc(c, expected[c])
                        if expected[c] == 0:
                            self.txn.pending_free.add(c)
                self.txn.dirty = True
                self._commit()
                res.repaired = res.leaks + ([m for m in res.corruptions if "refcount" in m] if repair == "all" else [])
                res.leaks = []
                res.leaked_clusters = 0
                if repair == "all":
                    res.corruptions = [m for m in res.corruptions if "refcount" not in m]
        fix = (repair == "all") or (repair == "leaks" and not res.corruptions)
        self._check_file_space(res, expected, stored, nclusters, fix)
        return res

    def _check_l2(self, l2i, off, csum, vsize, what, ref, res) -> None:
        cs = self.cluster_size
        cbits = self.cbits
        base_guest = l2i << (self.l2_bits + cbits)
        try:
            tbl = self._read_checked(off, cs, csum, f"L2 table for guest offset {base_guest:#x} in {what}")
        except CorruptImage as exc:
            res.corruptions.append(str(exc))
            return
        limit = self.header.host_clusters * cs
        for j, (desc, slen, codec, dsum, _birth) in enumerate(C.L2_ENTRY.iter_unpack(tbl)):
            if desc == 0 and slen == 0 and codec == 0:
                continue
            guest = base_guest + (j << cbits)
            why = C.validate_l2_entry(desc, slen, codec, cs, limit)
            if why is None and guest >= vsize and desc >> _SHIFT != _T_UNALLOC:
                why = "entry maps a cluster past the end of the disk"
            if why:
                res.corruptions.append(f"{what}: L2 entry for guest offset {guest:#x}: {why}")
                continue
            kind = desc >> _SHIFT
            if kind not in (_T_DATA, _T_COMP):
                continue
            host = desc & _MASK
            for hc in self._entry_clusters(desc, slen):
                ref(hc, f"L2 entry for guest offset {guest:#x}")
            res.checked_clusters += 1
            try:
                if kind == _T_DATA:
                    if C.checksum(self.host.pread(host, cs)) != dsum:
                        raise ChecksumMismatch(f"{self.name}: data checksum mismatch in the cluster at guest "
                                               f"offset {guest:#x} ({what})", guest)
                else:
                    res.compressed_clusters += 1
                    self._decompress(guest >> cbits, host, slen, dsum)
            except CorruptImage as exc:
                res.corruptions.append(str(exc))

    def _check_file_space(self, res: CheckResult, expected, stored, nclusters: int, fix: bool) -> None:
        """Leaked file space, which no refcount shows: bytes of the file past the host
        area (``host_clusters * cs``), and free clusters past the last cluster in use
        (stored and counted refcount 0) that still hold data.  Both are what a writer
        leaves when it dies or fails (ENOSPC) in the middle of a transaction: the data
        it wrote to clusters that the surviving header does not count.  Each is a leak
        (exit 3); with ``fix`` the bytes past the area are truncated away and the free
        clusters punched.  Neither needs a new header: nothing the durable header
        references is touched (the check committed first), so a crash during the
        repair leaves the image as it was or with less leaked space.  A free cluster
        that reads as zeros is not a leak (a file system that cannot punch holes gets
        zeros written instead), nor is a hole.  The bytes past the area of a block
        device are not the image's, and are left alone."""
        cs = self.cluster_size
        cbits = self.cbits
        found: list[str] = []
        # free clusters at the end of the host area that hold data
        tail_data: list[int] = []
        if stored is not None and self.txn.host_clusters == nclusters:
            t0 = nclusters
            while t0 > 0 and not expected[t0 - 1] and not stored[t0 - 1]:
                t0 -= 1
            if t0 < nclusters:
                tail_data = self._clusters_holding_data(t0, nclusters)
        if tail_data:
            found.append(f"{len(tail_data)} free clusters past the last cluster in use (from cluster "
                         f"{tail_data[0]} to {tail_data[-1]}) still hold data ({len(tail_data) * cs} bytes)")
        # bytes past the host area
        area = self.txn.host_clusters * cs
        size = self.host.size()
        extra = size - area if size > area and self._host_is_regular_file() else 0
        if extra:
            found.append(f"{extra} bytes past the end of the host area ({area} bytes) belong to no cluster")
        if not found:
            return
        if not fix:
            res.leaks += found
            res.leaked_clusters += len(tail_data) + ((extra + cs - 1) >> cbits)
            return
        if tail_data:
            self._punch(tail_data)
        if extra:
            self.host.truncate(area)
        self.host.flush()
        res.repaired += found

    def _clusters_holding_data(self, first: int, last: int) -> list[int]:
        """Clusters in [first, last) whose bytes in the file are not all zeros.  Holes
        are skipped without reading them where the host file can say where its data
        is (SEEK_DATA); the rest is read in large pieces."""
        cbits = self.cbits
        cs = self.cluster_size
        zero = self.zero_cluster
        out: list[int] = []
        step = max(cs, 4 << 20)
        for start, end in self._host_data_ranges(first << cbits, last << cbits):
            c0 = start >> cbits
            c1 = min(last, (end + cs - 1) >> cbits)
            pos = c0 << cbits
            while pos < c1 << cbits:
                n = min(step, (c1 << cbits) - pos)
                buf = self.host.pread(pos, n)
                for i in range(0, n, cs):
                    if buf[i:i + cs] != zero:
                        out.append((pos + i) >> cbits)
                pos += n
        return out

    def _host_data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [start, end) that may hold data in the host file: its data
        extents (lseek SEEK_DATA / SEEK_HOLE) when the host is a local file descriptor
        that supports them, else the whole range."""
        import errno

        fd = getattr(self.host, "fd", None)
        if not isinstance(fd, int) or fd < 0 or not hasattr(os, "SEEK_DATA"):
            return [(start, end)]
        out: list[tuple[int, int]] = []
        pos = start
        try:
            while pos < end:
                try:
                    d = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                        break
                    raise
                if d >= end:
                    break
                h = min(end, os.lseek(fd, d, os.SEEK_HOLE))
                out.append((d, h))
                pos = h
        except OSError:
            return [(start, end)]
        return out

    def _host_is_regular_file(self) -> bool:
        """Whether the host is a file whose length is the image's (not a block device,
        whose size is the device's).  Storage other than a local file counts as one."""
        fd = getattr(self.host, "fd", None)
        if not isinstance(fd, int) or fd < 0:
            return True
        import stat

        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            return False
