"""``space_usage``: host bytes each root refers to, and bytes only it refers to
(ZFS ``refer`` and ``used``; DESIGN.md property 5's per-snapshot accounting).

Contract.  Commits first (the counts are those of the durable state), then walks
each root's tables with a dry run of the release recursion over a scratch copy of
the refcounts it touches: nothing is changed.  Costs one read of every table of
every root.
"""

from __future__ import annotations

from ...codec import vdk as C


class SpaceMixin:
    """space_usage."""

    def space_usage(self) -> dict:
        """Host bytes each root (the live state, each snapshot) refers to (data and
        tables), and bytes only it refers to -- what deleting it would free (ZFS
        ``refer`` and ``used``)."""
        self._commit()
        if self.txn.rc is None:
            self._load_refcounts()
        h = self.header
        roots = [("live", h.l1_offset, h.l1_entries, h.l1_checksum)]
        roots += [(r, r.l1_offset, r.l1_entries, r.l1_checksum) for r in self.snapshots]
        cs = self.cluster_size
        out = {"live": None, "snapshots": {}}
        for key, off, n, csum in roots:
            referenced, unique = self._walk_space(off, n, csum)
            entry = {"referenced_bytes": referenced * cs, "unique_bytes": unique * cs}
            if key == "live":
                out["live"] = entry
            else:
                out["snapshots"][key.id] = entry
        return out

    def _walk_space(self, off: int, n: int, csum: int) -> tuple[int, int]:
        """(data clusters referred to, clusters freed if this root went), by a dry run
        of the release recursion over a scratch copy of the touched refcounts."""
        if not off:
            return 0, 0
        cbits = self.cbits
        scratch: dict[int, int] = {}

        def dec(c: int) -> bool:
            v = scratch.get(c, self.txn.rc[c]) - 1
            scratch[c] = v
            return v == 0

        offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, "L1 table"), n)
        l1_clusters = (n * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> cbits
        referenced: set[int] = set()
        freed = 0
        l1_private = self.txn.rc[off >> cbits] == 1
        for o, s in zip(offs, sums):
            if not o:
                continue
            referenced.add(o >> cbits)
            tbl = self._read_checked(o, self.cluster_size, s, "L2 table")
            l2_freed = l1_private and dec(o >> cbits)
            freed += l2_freed
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                for c in self._entry_clusters(desc, slen):
                    referenced.add(c)
                    if l2_freed:
                        freed += dec(c)
        if l1_private:
            freed += l1_clusters
        return len(referenced) + l1_clusters, freed
