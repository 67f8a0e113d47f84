"""The read path and block status (QEMU: ``qcow2_co_preadv_part``,
``qcow2_co_block_status``).

Concern: turning guest ranges into bytes -- data clusters read in host-contiguous
runs, zero clusters, compressed clusters, and ranges this layer does not hold
read from the backing image (zeros without one) -- and describing this layer's
ranges as extents.

May assume: the look-up and the metadata index (:mod:`.cluster`), and that the
block layer checked ``[offset, offset + length)`` against the size.

Guarantees:
  - Every host offset is validated before it is read (``_data_offset``,
    ``_guard``): an entry pointing into metadata or past the end of the file
    raises ``CorruptImage`` naming the guest offset; a run of data clusters is cut
    before the first metadata cluster, so the next round names it.
  - A compressed cluster is decoded into at most one cluster of memory
    (``C.decompress_cluster``); the last one decoded is kept (``_dcache``) for
    reads of its other parts.  Whoever changes mappings or frees clusters drops
    ``_dcache``.
  - ``block_status`` covers exactly the range asked, in order, merging
    neighbouring pieces of the same kind (and host-contiguous data).

State owned: ``_dcache`` ((descriptor, data) of the last decompressed cluster, or None).
"""

from __future__ import annotations

from ...codec import qcow2 as C
from ...errors import CorruptImage
from ..base import Extent, Status

_CZ = C.FLAG_COMPRESSED | C.FLAG_ZERO
_NOT_COPIED = ~C.FLAG_COPIED & 0xFFFFFFFFFFFFFFFF


class ReadMixin:
    """read, block_status and the content of a whole guest cluster."""

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        if self.extl2:
            return self._read_ext(offset, length)
        cs = self.cluster_size
        cbits = self.cluster_bits
        nl2 = self.l2_entries
        parts: list[bytes] = []  # joined once at the end (a single part is returned as is)
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            t, i = self._l2_slot(gci)
            e = t[i] if t is not None else 0
            n = min(cs - coff, end - pos)
            if not e & _CZ and e & C.OFFSET_MASK:  # a standard data cluster
                host = self._data_offset(C.decode_l2_entry(e, cbits), gci)
                # extend over host-contiguous clusters of this L2 table: an entry that
                # is exactly the next host cluster (COPIED aside) has no reserved bits
                nxt = host + coff + n
                j = i + 1
                eof = self._eof
                while pos + n < end and n < (4 << 20) and j < nl2:
                    if t[j] & _NOT_COPIED != nxt or nxt >= eof:
                        break
                    step = min(cs, end - pos - n)
                    n += step
                    nxt += step
                    j += 1
                if n > cs - coff:
                    # the run must not reach into metadata: one look-up for all of it;
                    # cut it before the first metadata cluster (the next round names it)
                    first = (host >> cbits) + 1
                    hit = self._meta.first_in(first, (host + coff + n - 1 >> cbits) + 1)
                    if hit is not None:
                        n = (hit << cbits) - host - coff
                parts.append(self.host.pread(host + coff, n))
                pos += n
                continue
            ent = C.decode_l2_entry(e, cbits)
            kind = ent.kind
            if kind == C.UNALLOCATED:
                if t is None:  # no L2 table: the rest of its range is unallocated
                    n = min(end - pos, (nl2 - i) * cs - coff)
                else:
                    j = i + 1
                    while pos + n < end and j < nl2 and (
                            not t[j] or C.decode_l2_entry(t[j], cbits).kind == C.UNALLOCATED):
                        n += min(cs, end - pos - n)
                        j += 1
                if self.backing is not None:
                    parts.append(self.backing.read(pos, n))
                else:
                    parts.append(bytes(n))
            elif kind == C.ZERO:
                if ent.reserved:
                    self._data_offset(ent, gci)  # raises
                parts.append(bytes(n))
            else:
                parts.append(self._decompress(e, ent, gci)[coff : coff + n])
            pos += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_ext(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pieces = list(self._ext_pieces(offset, length))
        i = 0
        while i < len(pieces):
            pos, n, kind, x = pieces[i]
            if kind == "u":
                j = i + 1
                while j < len(pieces) and pieces[j][2] == "u":
                    n += pieces[j][1]
                    j += 1
                out += self.backing.read(pos, n) if self.backing is not None else bytes(n)
                i = j
                continue
            if kind == "d":
                out += self.host.pread(x, n)
            elif kind == "z":
                out += bytes(n)
            else:
                coff = pos % self.cluster_size
                out += self._decompress(x, C.decode_l2_entry(x, self.cluster_bits), pos // self.cluster_size)[
                    coff : coff + n
                ]
            i += 1
        return bytes(out)

    def _decompress(self, e: int, ent: C.L2Entry, gci: int) -> bytes:
        if self._dcache is not None and self._dcache[0] == e:
            return self._dcache[1]
        a, b = C.compressed_host_range(ent)
        where = f"{self.host.name}: qcow2 compressed cluster at guest offset {gci * self.cluster_size}"
        if b > self._eof + 512:
            raise CorruptImage(f"{where} (host offset {a:#x}) lies beyond the end of the file")
        self._guard(e, gci)
        try:
            data = C.decompress_cluster(self.host.pread(a, b - a), self.comp_type, self.cluster_size)
        except CorruptImage as exc:
            raise CorruptImage(f"{where} (host offset {a:#x}): {exc}") from None
        self._dcache = (e, data)
        return data

    def _cluster_content(self, gci: int, e: int) -> bytes:
        cs = self.cluster_size
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.NORMAL:
            return self.host.pread(self._data_offset(ent, gci), cs)
        if ent.kind == C.ZERO:
            return bytes(cs)
        if ent.kind == C.COMPRESSED:
            return self._decompress(e, ent, gci)
        if self.backing is not None:
            return self.backing.read(gci * cs, cs)
        return bytes(cs)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for pos, n, kind, host in (self._pieces(offset, length) if self.extl2 else self._runs(offset, length)):
            if kind == C.NORMAL:
                ext = Extent(pos, n, Status.DATA, host_offset=host)
            elif kind == C.COMPRESSED:
                ext = Extent(pos, n, Status.DATA, compressed=True)
            elif kind == C.ZERO:
                ext = Extent(pos, n, Status.ZERO)
            else:
                ext = Extent(pos, n, Status.UNALLOCATED)
            if out:
                p = out[-1]
                if (
                    p.status == ext.status
                    and p.compressed == ext.compressed
                    and (p.host_offset is None) == (ext.host_offset is None)
                    and (p.host_offset is None or p.host_offset + p.length == ext.host_offset)
                ):
                    out[-1] = Extent(p.offset, p.length + n, p.status, p.host_offset, p.compressed)
                    continue
            out.append(ext)
        return out

    def _runs(self, offset: int, length: int):
        """What ``_pieces`` yields for standard L2 entries, with neighbouring clusters
        of one L2 table merged where ``block_status`` would merge them: data clusters
        that are host-contiguous, and runs of unallocated or of zero clusters.  An
        absent L2 table is one unallocated run; entries are scanned as integers, the
        codec's decoder only for those that are not plain data or 0."""
        cs = self.cluster_size
        cbits = self.cluster_bits
        nl2 = self.l2_entries
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            t, i = self._l2_slot(gci)
            if t is None:
                n = min(end - pos, (nl2 - i) * cs - coff)
                yield pos, n, C.UNALLOCATED, 0
                pos += n
                continue
            e = t[i]
            n = min(cs - coff, end - pos)
            j = i + 1
            if not e & _CZ and e & C.OFFSET_MASK:
                host = (e & C.OFFSET_MASK) + coff
                nxt = host + n
                while pos + n < end and j < nl2 and t[j] & _NOT_COPIED == nxt:
                    step = min(cs, end - pos - n)
                    n += step
                    nxt += step
                    j += 1
                yield pos, n, C.NORMAL, host
            else:
                kind = C.decode_l2_entry(e, cbits).kind
                if kind in (C.UNALLOCATED, C.ZERO):
                    while pos + n < end and j < nl2 and (t[j] == e or C.decode_l2_entry(t[j], cbits).kind == kind):
                        n += min(cs, end - pos - n)
                        j += 1
                yield pos, n, kind, 0
            pos += n
