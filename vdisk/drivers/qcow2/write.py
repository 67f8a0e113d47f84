"""The write path: write, write_zeroes and discard (QEMU: ``qcow2_co_pwritev_part``,
``qcow2_subcluster_zeroize``, ``qcow2_cluster_discard``).

Concern: where new guest data goes and what the L2 entries say afterwards.

May assume: the look-up and ``_l2_for_write`` (:mod:`.cluster`), the allocator
(:mod:`.refcount`), ``_cluster_content`` (:mod:`.read`) for the rest of a
partially written cluster, and ``flush`` (:mod:`.flush`) for durability.

Guarantees:
  - A write is visible to following reads at once and durable after the next
    flush; every table it changes is marked dirty.
  - Data goes in place only into a cluster the active state owns alone (COPIED
    *and* refcount 1: a wrong flag cannot make it write into a cluster a snapshot
    shares); otherwise into newly allocated clusters (whole-cluster runs at once;
    a partial cluster is merged with its current content, the backing image's
    included), and the replaced entry's references are dropped at the next flush.
  - An entry pointing into metadata is refused (``CorruptImage``) before anything
    is allocated or released for it.
  - With ``compress_writes``, a full cluster is stored compressed when that saves
    a sector; compressed clusters are packed into a shared tail cluster
    (``_ctail``), each packed one holding one reference on it.
  - ``write_zeroes`` and ``discard`` give a whole cluster the zero flag (version
    3); without a backing image ``discard``, and version 2, leave it unallocated
    instead (it reads as zeros as well); version 2 over a backing image gets zero
    bytes written, having no zero flag.  A partial cluster gets zero bytes
    written unless it reads as zeros already.

State owned: ``_ctail`` ((next free byte, end of its cluster) where the next
compressed cluster may go, or None).
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...errors import VdiskError
from .limits import ceil_div


class WriteMixin:
    """write, write_zeroes, discard."""

    def _writable(self) -> None:
        if self.read_only:
            raise VdiskError(f"{self.host.name}: image is open read-only")

    def write(self, offset: int, data: bytes) -> None:
        self._writable()
        cs = self.cluster_size
        mv = memoryview(data)
        pos = offset
        end = offset + len(data)
        while pos < end:
            gci, coff = divmod(pos, cs)
            l1i, l2i = divmod(gci, self.l2_entries)
            n = min(cs - coff, end - pos)
            l2off, t = self._l2_for_write(l1i)
            e = t[l2i]
            if e:
                self._guard(e, gci)  # before anything is allocated or released for it
            src = mv[pos - offset : pos - offset + n]
            if self._owned(e, gci):
                # owned alone: rewrite in place, merging following clusters of this
                # L2 table that are owned too and host-contiguous
                host = e & C.OFFSET_MASK
                j = l2i + 1
                while pos + n < end and j < self.l2_entries:
                    e2 = t[j]
                    if (e2 & C.OFFSET_MASK) != host + (j - l2i) * cs or not self._owned(e2, gci + j - l2i):
                        break
                    n += min(cs, end - pos - n)
                    j += 1
                self._pwrite(host + coff, mv[pos - offset : pos - offset + n])
                pos += n
                continue
            if n == cs and not self.compress_writes:
                # full clusters needing allocation: allocate a run, write it at once
                k = 1
                while pos + (k + 1) * cs <= end and l2i + k < self.l2_entries and k < 256:
                    e2 = t[l2i + k]
                    if e2:  # an empty entry is neither owned nor pointing anywhere
                        if self._owned(e2, gci + k):
                            break
                        self._guard(e2, gci + k)
                    k += 1
                new = self._alloc(k)
                self._pwrite(new, mv[pos - offset : pos - offset + k * cs])
                for j in range(k):
                    if t[l2i + j]:
                        self._release_entry(t[l2i + j], gci + j)
                # the new entries, COPIED (bit 63: above every offset, so no carry)
                t[l2i : l2i + k] = array.array("Q", range(new | C.FLAG_COPIED, (new | C.FLAG_COPIED) + k * cs, cs))
                self._l2cache.mark_dirty(l2off)
                pos += k * cs
                continue
            if n == cs:
                buf = src
            else:
                base = bytearray(self._cluster_content(gci, e))
                base[coff : coff + n] = src
                buf = base
            new_e = self._store_cluster(buf, full=(n == cs))
            self._release_entry(e, gci)
            t[l2i] = new_e
            self._l2cache.mark_dirty(l2off)
            pos += n
        self._dcache = None
        self._maybe_flush()

    def _owned(self, e: int, gci: int) -> bool:
        """A normal data cluster referenced by the active table only (COPIED, and
        refcount 1 -- checked as well, so that a wrong flag cannot make us write
        into a cluster a snapshot shares).  An entry pointing into metadata is
        refused (CorruptImage), never rewritten in place."""
        if not e & C.FLAG_COPIED or e & (C.FLAG_COMPRESSED | C.FLAG_ZERO):
            return False
        self._guard(e, gci)
        h = e & C.OFFSET_MASK
        return bool(h) and self._rc(h // self.cluster_size) == 1

    def _store_cluster(self, buf, *, full: bool) -> int:
        """Write one cluster of guest data somewhere new; return its L2 entry."""
        cs = self.cluster_size
        if full and self.compress_writes:
            blob = C.compress_cluster(bytes(buf), self.comp_type)
            if len(blob) <= cs - 512:
                return self._place_compressed(blob)
        new = self._alloc(1)
        self._pwrite(new, buf)
        return new | C.FLAG_COPIED

    def _place_compressed(self, blob: bytes) -> int:
        cs = self.cluster_size
        n = len(blob)
        # each compressed entry holds one reference on its host cluster: with narrow
        # refcounts keep room for a few snapshots' references too
        share_cap = max(1, (self.rc_max + 1) // 8)
        if (
            self._ctail is not None
            and self._ctail[0] + n <= self._ctail[1]
            and self._rc(self._ctail[0] // cs) < share_cap
        ):
            at = self._ctail[0]
            self._incref(at // cs)  # the open cluster gains a reference
        else:
            k = ceil_div(n, cs)
            at = self._alloc(k)  # fresh clusters: their refcount 1 is this entry's
        end = at + n
        self._pwrite(at, blob)
        cend = ((end - 1) // cs + 1) * cs
        self._ctail = (end, cend) if end < cend else None
        return C.encode_compressed(at, n, self.cluster_bits)

    def _zero_or_discard(self, offset: int, length: int, discard: bool) -> None:
        self._writable()
        cs = self.cluster_size
        pos = offset
        end = offset + length
        v3 = self.hdr.version >= 3
        while pos < end:
            gci, coff = divmod(pos, cs)
            n = min(cs - coff, end - pos)
            full = n == cs or (coff == 0 and pos + n >= self.size)
            if not full:
                cur = self._entry(gci)
                kind = C.decode_l2_entry(cur, self.cluster_bits).kind
                if not (kind == C.ZERO or (kind == C.UNALLOCATED and self.backing is None)):
                    self.write(pos, bytes(n))
                pos += n
                continue
            l1i, l2i = divmod(gci, self.l2_entries)
            cur = self._entry(gci)
            ent = C.decode_l2_entry(cur, self.cluster_bits)
            if self.backing is None:
                if ent.kind == C.UNALLOCATED or (ent.kind == C.ZERO and not discard):
                    pos += n
                    continue
                want = 0 if (discard or not v3) else C.FLAG_ZERO
            else:
                if not v3:
                    self.write(pos, bytes(n))
                    pos += n
                    continue
                if ent.kind == C.ZERO and not ent.host_offset:
                    pos += n
                    continue
                want = C.FLAG_ZERO
            l2off, t = self._l2_for_write(l1i)
            old = t[l2i]
            self._release_entry(old, gci)
            t[l2i] = want
            self._l2cache.mark_dirty(l2off)
            pos += n
        self._dcache = None
        self._maybe_flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._zero_or_discard(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        self._zero_or_discard(offset, length, discard=True)
