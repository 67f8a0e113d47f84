"""The request path: read, write, write_zeroes/discard and block_status, and the
compression of the clusters they store (sections 7, 8 and 12).

Contract (that of :class:`~vdisk.drivers.base.BlockDriver`): requests are already
bounds-checked by the block layer and need no alignment.  A read verifies the
checksum of every data cluster it returns and raises ``ChecksumMismatch`` with the
guest offset of a mismatch; compressed clusters are decoded by the codec's
bounded decoder.  A write never touches a byte the durable header references: a
guest cluster goes to a newly allocated cluster (or, when compression is on and
saves space, to a frame packed into the transaction's packing cluster), except a
data cluster this transaction allocated and nothing else references, which is
rewritten in place.  Whole clusters of zeros become zero (or unallocated) entries.

State owned: ``_wq`` (data writes queued during one ``write`` call and issued as
one pwritev per run of adjacent host bytes) and ``_unwritten`` (data whose write
failed: the entries already point at it, so reads are served from here and the
commit writes it again before anything references it durably).  Compression runs
in a thread pool shared by all images (zstandard releases the GIL).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...codec import vdk as C
from ...errors import ChecksumMismatch, CorruptImage
from ..base import Extent, Status

_unpack_l2 = C.L2_ENTRY.unpack_from
_pack_l2 = C.L2_ENTRY.pack_into
_ESZ = C.L2_ENTRY_SIZE
_SHIFT = C.TYPE_SHIFT
_MASK = C.OFFSET_MASK
_T_UNALLOC, _T_ZERO, _T_DATA, _T_COMP = C.T_UNALLOCATED, C.T_ZERO, C.T_DATA, C.T_COMPRESSED

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None


def _compress_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        # imported here: concurrent.futures imports logging, 5-8 ms on every command
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="vdk-zstd")
    return _pool


def _is_zero(content, zero: bytes) -> bool:
    """``content == zero`` (one cluster), at memcmp speed also for a memoryview:
    comparing a memoryview compares item by item (289 us for 64 KiB of zeros, against
    2.5 us for bytes), so a view whose first byte is zero is compared as a copy."""
    if type(content) is memoryview:
        return not content[0] and content.tobytes() == zero
    return content == zero


class _Prepared:
    """What ``prepare_write`` computed for one ``write(offset, data)``: the checksum of
    each whole cluster of ``data`` from guest cluster ``first`` on (None: all zeros)."""

    __slots__ = ("offset", "data", "first", "sums")

    def __init__(self, offset: int, data: bytes, first: int, sums: list):
        self.offset, self.data, self.first, self.sums = offset, data, first, sums


class IoMixin:
    """read, write, write_zeroes/discard, block_status and cluster compression."""

    def prepare_write(self, offset: int, data: bytes) -> _Prepared | None:
        """The checksums (and zero tests) of the whole clusters of a later uncompressed
        ``write(offset, data)``: reads only ``cluster_size``, ``cbits``, ``compression``
        and ``zero_cluster``, fixed at open, so it may run in another thread."""
        if self.compression:
            return None  # compressed clusters are checksummed after compression
        cs = self.cluster_size
        cbits = self.cbits
        first = (offset + cs - 1) >> cbits
        last = (offset + len(data)) >> cbits
        if last <= first:
            return None
        mv = memoryview(data)
        zero = self.zero_cluster
        checksum = C.checksum
        sums = []
        for ci in range(first, last):
            content = mv[(ci << cbits) - offset:((ci + 1) << cbits) - offset]
            sums.append(None if _is_zero(content, zero) else checksum(content))
        return _Prepared(offset, data, first, sums)

    def read(self, offset: int, length: int) -> bytes:
        out = []
        cbits = self.cbits
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            ci = pos >> cbits
            in_off = pos & (cs - 1)
            l2i = ci >> self.l2_bits
            tbl = self.l2cache.get(l2i)
            if tbl is None:
                tbl = self._l2(l2i)
            if tbl is None:
                # whole L2 range unallocated: one read from below
                run_end = min(end, ((l2i + 1) << (self.l2_bits + cbits)))
                out.append(self._below(pos, run_end - pos))
                pos = run_end
                continue
            desc, slen, _codec, csum, _b = _unpack_l2(tbl, (ci & self.l2_mask) * _ESZ)
            kind = desc >> _SHIFT
            n = min(cs - in_off, end - pos)
            if kind == _T_DATA:
                host = desc & _MASK
                # extend over clusters contiguous on the host
                run = [(csum, ci)]
                nxt = pos + n
                while nxt < end and (nxt >> cbits) >> self.l2_bits == l2i:
                    d2, _s2, _c2, cs2, _b2 = _unpack_l2(tbl, ((nxt >> cbits) & self.l2_mask) * _ESZ)
                    if d2 >> _SHIFT != _T_DATA or (d2 & _MASK) != host + len(run) * cs:
                        break
                    run.append((cs2, nxt >> cbits))
                    nxt = min(nxt + cs, end)
                buf = self.host.pread(host, len(run) * cs)
                if self._unwritten:
                    buf = self._patch_unwritten(host, buf)
                mv = memoryview(buf)
                for k, (s, cidx) in enumerate(run):
                    if C.checksum(mv[k * cs:(k + 1) * cs]) != s:
                        raise ChecksumMismatch(
                            f"{self.name}: data checksum mismatch in the cluster at guest offset {cidx << cbits:#x}",
                            cidx << cbits)
                out.append(buf[in_off:in_off + (nxt - pos)])
                pos = nxt
            elif kind == _T_UNALLOC:
                out.append(self._below(pos, n))
                pos += n
            elif kind == _T_ZERO:
                out.append(self.zero_cluster[:n])
                pos += n
            else:
                data = self._decompress(ci, desc & _MASK, slen, csum)
                out.append(data[in_off:in_off + n])
                pos += n
        return out[0] if len(out) == 1 else b"".join(out)

    def _below(self, offset: int, length: int) -> bytes:
        if self.backing is None:
            return bytes(length)
        return self.backing.read(offset, length)

    def _patch_unwritten(self, host: int, buf: bytes) -> bytes:
        """``buf`` as read from ``host``, with the data of failed writes laid over it."""
        cs = self.cluster_size
        out = None
        for k in range(len(buf) // cs):
            mem = self._unwritten.get(host + k * cs)
            if mem is not None:
                out = out or bytearray(buf)
                out[k * cs:(k + 1) * cs] = mem
        return bytes(out) if out is not None else buf

    def _decompress(self, ci: int, host: int, slen: int, csum: int) -> bytes:
        raw = self._unwritten.get(host) if self._unwritten else None
        if raw is None:
            raw = self.host.pread(host, slen)
        if C.checksum(raw) != csum:
            raise ChecksumMismatch(
                f"{self.name}: data checksum mismatch in the compressed cluster at guest offset {ci << self.cbits:#x}",
                ci << self.cbits)
        try:
            return C.decompress_cluster(raw, self.cluster_size)
        except CorruptImage as exc:
            raise self._corrupt(f"compressed cluster at guest offset {ci << self.cbits:#x}: {exc}") from None

    def _read_cluster(self, ci: int) -> bytes:
        start = ci << self.cbits
        n = min(self.cluster_size, self.size - start)
        data = self.read(start, n)
        if n < self.cluster_size:
            data += bytes(self.cluster_size - n)
        return data

    def _cluster_for_merge(self, ci: int) -> bytearray:
        """Guest cluster ``ci`` as a new bytearray, for a partial write to patch.  A data
        cluster whose L2 table is cached is read straight from the host and verified
        against its entry's checksum, as ``read`` would, without ``read``'s general
        path and its extra copy; anything else goes through ``_read_cluster``."""
        cs = self.cluster_size
        tbl = self.l2cache.get(ci >> self.l2_bits)
        if tbl is not None and not self._unwritten and (ci + 1) << self.cbits <= self.size:
            desc, _slen, _codec, csum, _b = _unpack_l2(tbl, (ci & self.l2_mask) * _ESZ)
            if desc >> _SHIFT == _T_DATA:
                buf = bytearray(self.host.pread(desc & _MASK, cs))
                if len(buf) != cs or C.checksum(buf) != csum:
                    raise ChecksumMismatch(
                        f"{self.name}: data checksum mismatch in the cluster at guest offset {ci << self.cbits:#x}",
                        ci << self.cbits)
                return buf
        return bytearray(self._read_cluster(ci))

    def write(self, offset: int, data: bytes, prepared: _Prepared | None = None) -> None:
        self._check_writable()
        sums = None
        if (type(prepared) is _Prepared and prepared.data is data and prepared.offset == offset
                and not self.compression):
            sums = prepared
        cs = self.cluster_size
        cbits = self.cbits
        end = offset + len(data)
        mv = memoryview(data)
        first_full = (offset + cs - 1) >> cbits
        last_full = end >> cbits  # exclusive
        compressed = None
        if self.compression and last_full - first_full >= 2:
            chunks = [mv[(ci << cbits) - offset:((ci + 1) << cbits) - offset] for ci in range(first_full, last_full)]
            compressed = dict(zip(range(first_full, last_full), _compress_pool().map(self._compress, chunks)))
        pos = offset
        try:
            while pos < end:
                ci = pos >> cbits
                in_off = pos & (cs - 1)
                n = min(cs - in_off, end - pos)
                if n == cs:
                    if not self.compression:
                        # whole clusters up to the end of this L2 table or of the data: one step
                        k = min((end - pos) >> cbits, ((((ci >> self.l2_bits) + 1) << self.l2_bits) - ci))
                        self._store_run(ci, mv[pos - offset:pos - offset + (k << cbits)], k,
                                        sums.sums[ci - sums.first:ci - sums.first + k] if sums else None)
                        pos += k << cbits
                        continue
                    content = mv[pos - offset:pos - offset + cs]
                else:
                    merged = self._cluster_for_merge(ci)
                    merged[in_off:in_off + n] = mv[pos - offset:pos - offset + n]
                    if self._rewrite_part(ci, merged, in_off, n):
                        pos += n
                        continue
                    content = merged  # nothing changes it once queued: no bytes() copy
                self._store(ci, content, compressed.get(ci) if compressed else None)
                pos += n
        finally:
            self._write_queued()
        self._maybe_commit()

    def _write_queued(self) -> None:
        """Issue the data writes ``_store`` queued, one pwritev per run of adjacent host
        bytes.  Within one ``write`` call each guest cluster is stored once, and the
        partial clusters at its ends are read before anything is queued, so no read
        sees a queued cluster."""
        q = self._wq
        if not q:
            return
        self._wq = []
        q.sort(key=lambda w: w[0])
        try:
            start, bufs, nxt = q[0][0], [q[0][1]], q[0][0] + len(q[0][1])
            for off, buf in q[1:]:
                if off == nxt and len(bufs) < 512:
                    bufs.append(buf)
                else:
                    self.host.pwritev(start, bufs)
                    start, bufs = off, [buf]
                nxt = off + len(buf)
            self.host.pwritev(start, bufs)
        except BaseException:
            # The entries already point at these bytes: keep them in memory, serve reads
            # from here, and write them again before the next commit.
            for off, buf in q:
                self._unwritten[off] = bytes(buf)
            raise
        if self._unwritten:
            for off, _buf in q:
                self._unwritten.pop(off, None)

    def _rewrite_unwritten(self) -> None:
        for off, buf in sorted(self._unwritten.items()):
            self.host.pwrite(off, buf)
        self._unwritten.clear()

    def _compress(self, content) -> bytes | None:
        if _is_zero(content, self.zero_cluster):
            return None
        return C.compress_cluster(content, self.header.compression_level)

    def _rewrite_part(self, ci: int, merged: bytearray, in_off: int, n: int) -> bool:
        """The fast path of a partial write: a data cluster this transaction allocated
        and nothing else references is rewritten in place, and only the ``n`` changed
        bytes go to the host.  False if the cluster does not qualify."""
        t = self.txn
        l2i = ci >> self.l2_bits
        if l2i not in self.l2cache.dirty or self.compression:
            return False
        tbl = self.l2cache[l2i]
        pos = (ci & self.l2_mask) * _ESZ
        desc = _unpack_l2(tbl, pos)[0]
        if desc >> _SHIFT != _T_DATA:
            return False
        host = desc & _MASK
        c = host >> self.cbits
        if c not in t.new_clusters or t.rc[c] != 1 or host in self._unwritten:
            return False
        if merged == self.zero_cluster:
            return False  # let _store turn it into a zero entry
        self._wq.append((host + in_off, memoryview(merged)[in_off:in_off + n]))  # merged is not changed again
        _pack_l2(tbl, pos, desc, self.cluster_size, 0, C.checksum(merged), self.header.generation + 1)
        return True

    def _store(self, ci: int, content, comp: bytes | None = None) -> None:
        """Make guest cluster ``ci`` hold ``content`` (exactly one cluster of bytes)."""
        l2i = ci >> self.l2_bits
        tbl = self._l2_for_write(l2i)
        pos = (ci & self.l2_mask) * _ESZ
        desc, slen, _codec, _csum, _birth = _unpack_l2(tbl, pos)
        kind = desc >> _SHIFT
        birth = self.header.generation + 1
        if _is_zero(content, self.zero_cluster):
            self._release_entry(desc, slen)
            _pack_l2(tbl, pos, (_T_ZERO << _SHIFT) if self.backing is not None else 0, 0, 0, 0, 0)
            return
        if self.compression:
            if comp is None:
                comp = self._compress(content)
            if comp is not None:
                host = self._alloc_piece(len(comp))
                self._wq.append((host, comp))
                self._release_entry(desc, slen)
                _pack_l2(tbl, pos, (_T_COMP << _SHIFT) | host, len(comp), C.COMPRESSION_ZSTD, C.checksum(comp), birth)
                return
        csum = C.checksum(content)
        if kind == _T_DATA:
            c = (desc & _MASK) >> self.cbits
            if c in self.txn.new_clusters and self.txn.rc[c] == 1:  # ours alone and not yet committed: rewrite in place
                self._wq.append((desc & _MASK, content))
                _pack_l2(tbl, pos, desc, self.cluster_size, 0, csum, birth)
                return
        c = self._alloc()
        self._wq.append((c << self.cbits, content))
        self._release_entry(desc, slen)
        _pack_l2(tbl, pos, (_T_DATA << _SHIFT) | (c << self.cbits), self.cluster_size, 0, csum, birth)

    def _store_run(self, ci0: int, mv: memoryview, k: int, sums: list | None = None) -> None:
        """What ``_store(ci0 + j, mv[j * cs:(j + 1) * cs])`` for j < k does, for ``k``
        whole, uncompressed clusters of one L2 table, with the clusters that need a
        new host cluster allocated in one step (``_alloc_many``) and queued as one
        write per host-contiguous run.  As in ``_store``, new clusters are allocated
        before any replaced entry is released.  ``sums``: each cluster's checksum
        (None: all zeros), from ``prepare_write``, else computed here."""
        cs = self.cluster_size
        cbits = self.cbits
        t = self.txn
        tbl = self._l2_for_write(ci0 >> self.l2_bits)
        birth = self.header.generation + 1
        zero = self.zero_cluster
        zero_desc = (_T_ZERO << _SHIFT) if self.backing is not None else 0
        base = (ci0 & self.l2_mask) * _ESZ
        checksum = C.checksum
        fresh = []  # (j, old desc, old length, checksum): clusters that get a new host cluster
        for j in range(k):
            content = mv[j << cbits:(j + 1) << cbits]
            pos = base + j * _ESZ
            desc, slen, _codec, _csum, _birth = _unpack_l2(tbl, pos)
            if sums is not None:
                csum = sums[j]
            else:
                csum = None if _is_zero(content, zero) else checksum(content)
            if csum is None:
                self._release_entry(desc, slen)
                _pack_l2(tbl, pos, zero_desc, 0, 0, 0, 0)
                continue
            if desc >> _SHIFT == _T_DATA:
                c = (desc & _MASK) >> cbits
                if c in t.new_clusters and t.rc[c] == 1:  # ours alone and not yet committed: rewrite in place
                    self._wq.append((desc & _MASK, content))
                    _pack_l2(tbl, pos, desc, cs, 0, csum, birth)
                    continue
            fresh.append((j, desc, slen, csum))
        if not fresh:
            return
        clusters = self._alloc_many(len(fresh))
        run_j = run_c = -2
        run_n = 0
        for (j, _desc, _slen, csum), c in zip(fresh, clusters):
            _pack_l2(tbl, base + j * _ESZ, (_T_DATA << _SHIFT) | (c << cbits), cs, 0, csum, birth)
            if j == run_j + run_n and c == run_c + run_n:
                run_n += 1
                continue
            if run_n:
                self._wq.append((run_c << cbits, mv[run_j << cbits:(run_j + run_n) << cbits]))
            run_j, run_c, run_n = j, c, 1
        self._wq.append((run_c << cbits, mv[run_j << cbits:(run_j + run_n) << cbits]))
        for _j, desc, slen, _csum in fresh:
            if desc:
                self._release_entry(desc, slen)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._zero_range(offset, length)
        self._maybe_commit()

    discard = write_zeroes

    def _zero_range(self, offset: int, length: int) -> None:
        self._check_writable()
        cs = self.cluster_size
        end = offset + length
        head_end = min(end, (offset + cs - 1) & ~(cs - 1))
        if head_end > offset:
            self.write(offset, bytes(head_end - offset))
        first = head_end >> self.cbits
        last = end >> self.cbits
        if end > head_end and end & (cs - 1) and (end >> self.cbits) >= first:
            tail_start = max(head_end, last << self.cbits)
            if tail_start < end:
                self.write(tail_start, bytes(end - tail_start))
        new_desc = (_T_ZERO << _SHIFT) if self.backing is not None else 0
        ci = first
        while ci < last:
            l2i = ci >> self.l2_bits
            l2_end = min(last, (l2i + 1) << self.l2_bits)
            if self.backing is None and self.txn.l1_off[l2i] == 0 and l2i not in self.l2cache:
                ci = l2_end  # nothing here and nothing below
                continue
            tbl = self._l2_for_write(l2i)
            for c in range(ci, l2_end):
                pos = (c & self.l2_mask) * _ESZ
                desc, slen = _unpack_l2(tbl, pos)[:2]
                if desc == new_desc:
                    continue
                self._release_entry(desc, slen)
                _pack_l2(tbl, pos, new_desc, 0, 0, 0, 0)
            ci = l2_end

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        cbits = self.cbits
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            ci = pos >> cbits
            l2i = ci >> self.l2_bits
            tbl = self._l2(l2i)
            if tbl is None:
                n = min(end, (l2i + 1) << (self.l2_bits + cbits)) - pos
                ext = Extent(pos, n, Status.UNALLOCATED)
            else:
                desc = _unpack_l2(tbl, (ci & self.l2_mask) * _ESZ)[0]
                kind = desc >> _SHIFT
                n = min(cs - (pos & (cs - 1)), end - pos)
                if kind == _T_DATA:
                    ext = Extent(pos, n, Status.DATA, (desc & _MASK) + (pos & (cs - 1)))
                elif kind == _T_COMP:
                    ext = Extent(pos, n, Status.DATA, None, True)
                elif kind == _T_ZERO:
                    ext = Extent(pos, n, Status.ZERO)
                else:
                    ext = Extent(pos, n, Status.UNALLOCATED)
            if out:
                p = out[-1]
                if p.status == ext.status and p.compressed == ext.compressed and (
                        (p.host_offset is None and ext.host_offset is None)
                        or (p.host_offset is not None and ext.host_offset == p.host_offset + p.length)):
                    out[-1] = Extent(p.offset, p.length + n, p.status, p.host_offset, p.compressed)
                    pos += n
                    continue
            out.append(ext)
            pos += n
        return out
