"""Table I/O and the table caches: how metadata tables get from the file into
memory and back (QEMU: ``qcow2-cache.c`` and the table helpers of ``qcow2.c``).

Concern: reading and writing tables of big-endian u64 entries (L1 tables, the
refcount table) in pieces, checking that a table read from the file lies inside
it, and the two caches of one-cluster tables -- L2 tables and refcount blocks --
keyed by host offset (:class:`vdisk.drivers.cache.TableCache`).

May assume: ``host``, ``cluster_size``, ``order`` (refcount order) and ``_eof``
are set (``header.HeaderMixin._load`` sets them before any table is read).

Guarantees:
  - ``_l2``/``_rb`` return a table only after checking that its offset is a
    cluster-aligned offset past the header cluster whose cluster lies inside the
    file (``CorruptImage`` otherwise).  The table returned is the cached object:
    a caller that changes it marks it dirty (``_l2cache.mark_dirty(off)`` /
    ``_rbcache.mark_dirty(off)``) before it loads another table, and a dirty
    table then stays cached until ``flush`` has written it.  Clean tables are
    evicted least recently used first past ``L2_CACHE_BYTES``/``RB_CACHE_BYTES``
    (16 to 4096 tables), never the one just loaded.
  - ``_read_u64_table``/``_write_u64_table`` never hold a second copy of a big
    table: they decode or encode ``TABLE_READ_CHUNK`` bytes at a time.
  - ``_pwrite`` is every metadata and data write of the driver: it keeps ``_eof``
    (the host file's size as far as the driver knows) up to date.

State owned: ``_eof``, ``_l2cache``, ``_rbcache``.
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...errors import CorruptImage
from ..cache import TableCache
from .limits import L2_CACHE_BYTES, MAX_HOST_OFFSET, MAX_L1_BYTES, RB_CACHE_BYTES, TABLE_READ_CHUNK, cache_tables


def nonzero(a: array.array):
    """(index, entry) for the non-zero entries of a table, skipping runs of zeros at C
    speed (a big L1 table is mostly zeros)."""
    step = 4096
    for i in range(0, len(a), step):
        chunk = a[i : i + step]
        if chunk.count(0) == len(chunk):
            continue
        for j, e in enumerate(chunk):
            if e:
                yield i + j, e


def extend_zeros(a: array.array, n: int) -> None:
    """Append ``n`` zero entries to ``a`` without a temporary list of ``n`` items."""
    zeros = array.array(a.typecode, bytes(a.itemsize * min(n, 1 << 16)))
    while n > 0:
        k = min(n, len(zeros))
        a.extend(zeros if k == len(zeros) else zeros[:k])
        n -= k


class TablesMixin:
    """Table I/O, bound checks of tables in the file, the L2 and refcount-block caches."""

    def _init_caches(self) -> None:
        """Empty caches sized for this image's clusters (called once at open)."""
        cs = self.cluster_size
        self._l2cache: TableCache[int, array.array] = TableCache(cache_tables(L2_CACHE_BYTES, cs))
        self._rbcache: TableCache[int, array.array] = TableCache(cache_tables(RB_CACHE_BYTES, cs))

    @property
    def _l2dirty(self) -> set[int]:
        """Offsets of the L2 tables changed since the last flush (the cache's dirty set;
        adding an offset of a cached table marks it dirty)."""
        return self._l2cache.dirty

    def _pwrite(self, offset: int, data) -> None:
        self.host.pwrite(offset, data)
        end = offset + len(data)
        if end > self._eof:
            self._eof = end

    def _check_table(self, offset: int, nbytes: int, what: str) -> None:
        """A table read from the file must be cluster aligned, not at 0, inside the file."""
        cs = self.cluster_size
        if offset == 0 or offset % cs:
            raise CorruptImage(f"{self.host.name}: qcow2 {what} offset {offset:#x} is not a valid cluster offset")
        if offset + nbytes > max(self._eof, 0) or offset >= MAX_HOST_OFFSET:
            raise CorruptImage(
                f"{self.host.name}: qcow2 {what} at {offset:#x} (+{nbytes} bytes) lies beyond the end of the file "
                f"({self._eof} bytes)"
            )

    def _read_u64_table(self, offset: int, nbytes: int) -> array.array:
        """A table of big-endian u64 entries, read in pieces (memory: the table, 8
        bytes an entry, plus one piece)."""
        a = array.array("Q")
        pos = offset
        end = offset + nbytes
        while pos < end:
            n = min(TABLE_READ_CHUNK, end - pos)
            C.extend_u64_table(a, self.host.pread(pos, n))
            pos += n
        return a

    def _write_u64_table(self, offset: int, a: array.array, lo: int, hi: int) -> None:
        """Write entries ``[lo, hi)`` of the table ``a`` that lives at ``offset``,
        encoded piece by piece (no second copy of a big table in memory)."""
        step = TABLE_READ_CHUNK // 8
        for i in range(lo, hi, step):
            j = min(hi, i + step)
            self._pwrite(offset + 8 * i, C.encode_u64_table(a[i:j]))

    def _read_l1(self, offset: int, l1_size: int, what: str) -> array.array:
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(f"{self.host.name}: qcow2 {what} size {l1_size} is too large")
        if l1_size == 0:
            return array.array("Q")
        self._check_table(offset, l1_size * 8, what)
        return self._read_u64_table(offset, l1_size * 8)

    def _l2(self, offset: int, where: str = "") -> array.array:
        t = self._l2cache.get(offset)
        if t is not None:
            return t
        cs = self.cluster_size
        if offset % cs or offset < cs:
            raise CorruptImage(f"{self.host.name}: qcow2 L2 table offset {offset:#x}{where} is not a valid cluster offset")
        if offset + cs > self._eof:
            raise CorruptImage(f"{self.host.name}: qcow2 L2 table at {offset:#x}{where} lies beyond the end of the file")
        # evicts clean tables, oldest first -- never the one just loaded: the caller
        # may modify it and mark it dirty (it would be lost, or KeyError at flush)
        return self._l2cache.put(offset, C.decode_u64_table(self.host.pread(offset, cs)))

    def _rb(self, offset: int) -> array.array:
        b = self._rbcache.get(offset)
        if b is not None:
            return b
        cs = self.cluster_size
        if offset % cs or offset < cs or offset + cs > self._eof:
            raise CorruptImage(f"{self.host.name}: qcow2 refcount block offset {offset:#x} is invalid or past the file end")
        return self._rbcache.put(offset, C.decode_refblock(self.host.pread(offset, cs), self.order))
