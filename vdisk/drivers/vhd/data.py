"""VHD data path: reads, writes, zeroes, flush and block status of dynamic and
differencing disks (fixed disks are the file itself).  A mixin of
:class:`vdisk.drivers.vhd.VhdDriver`; its state is listed in ``VhdDriver.__init__``.

Contract: BAT entries, bitmaps and the end footer that new writes need are kept in
memory (``dirty_bat``, ``pending_bitmaps``, ``dirty_bitmaps``, ``footer_dirty``) and
written by ``flush`` only after the data is durable."""

from __future__ import annotations

from ...codec import vhd as C
from ...errors import CorruptImage
from ..base import Extent, Status, block_pieces
from .layout import ALIGN
from .sparse import GRANULE, fresh_granules, fresh_write, host_extents, merge_extents

_FULL, _PARTIAL = 1, 2  # block bitmap states (0: not read yet)


class _Zeros:
    """A length, standing for that many zero bytes (only ``len`` is asked of it)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class DataMixin:
    # ------------------------------------------------------------------ bitmaps
    def _bitmap(self, b: int) -> bytes | None:
        """Block ``b``'s bitmap, or None if every bit is set."""
        st = self.state[b]
        if st == _FULL:
            return None
        bm = self.dirty_bitmaps.get(b) or self.bitmaps.get(b)
        if bm is None:
            bm = self.host.pread(self.bat[b] * C.SECTOR, self.bmsize)
            nbits = self.cluster_size // C.SECTOR
            if bm[:nbits // 8] == b"\xff" * (nbits // 8) and (nbits % 8 == 0):
                self.state[b] = _FULL
                return None
            self.state[b] = _PARTIAL
            if len(self.bitmaps) > 4096:
                self.bitmaps.clear()
            self.bitmaps[b] = bm
        return bm

    def _fallback(self, off: int, n: int) -> bytes:
        if self.differencing and self.backing is not None:
            return self.backing.read(off, n)
        return bytes(n)

    # ------------------------------------------------------------------ data path
    def _pieces(self, offset: int, length: int):
        return block_pieces(offset, length, self.cluster_size)

    def read(self, offset: int, length: int) -> bytes:
        if not self.dynamic:
            return self.host.pread(offset, length)
        out = []
        for b, within, pos, n in self._pieces(offset, length):
            e = self.bat[b]
            if e == C.BAT_UNUSED:
                out.append(self._fallback(pos, n))
                continue
            data_at = e * C.SECTOR + self.bmsize
            bm = self._bitmap(b)
            if bm is None:
                out.append(self.host.pread(data_at + within, n))
                continue
            first = within // C.SECTOR
            last = (within + n - 1) // C.SECTOR
            buf = bytearray()
            for s, cnt, bit in C.bitmap_runs(bm, first, last - first + 1):
                lo = max(s * C.SECTOR, within)
                hi = min((s + cnt) * C.SECTOR, within + n)
                buf += self.host.pread(data_at + lo, hi - lo) if bit else self._fallback(pos - within + lo, hi - lo)
            out.append(bytes(buf))
        return b"".join(out)

    def write(self, offset: int, data: bytes) -> None:
        if not self.dynamic:
            self.host.pwrite(offset, data)
            return
        view = memoryview(data)
        for b, within, pos, n in self._pieces(offset, len(data)):
            if self.differencing:
                self._diff_write(b, within, view[pos - offset:pos - offset + n])
                continue
            e = self._writable_block(b, whole=(within == 0 and n == self.cluster_size))
            piece = data if n == len(data) else view[pos - offset:pos - offset + n]
            fresh = fresh_granules(self, b, e * C.SECTOR + self.bmsize) if not self.differencing else None
            if fresh is not None:
                fresh_write(self.host, e * C.SECTOR + self.bmsize, fresh, within, piece)
            else:
                self.host.pwrite(e * C.SECTOR + self.bmsize + within, piece)

    def _writable_block(self, b: int, whole: bool = False) -> int:
        """Block ``b``'s BAT entry, with the block allocated and every bitmap bit set."""
        e = self.bat[b]
        if e == C.BAT_UNUSED:
            return self._allocate(b)
        if self._bitmap(b) is not None:
            content = None if whole else self.read(b * self.cluster_size,
                                                  min(self.cluster_size, self.size - b * self.cluster_size))
            if content is not None:
                self.host.pwrite(e * C.SECTOR + self.bmsize, content)
            self.state[b] = _FULL
            self.bitmaps.pop(b, None)
            self.pending_bitmaps.add(b)  # its bits are set by flush, after the data is durable
        return e

    def _allocate(self, b: int) -> int:
        bs, bm = self.cluster_size, self.bmsize
        p = -(-(self.footer_pos + bm) // ALIGN) * ALIGN - bm
        if (p + bm + bs) // C.SECTOR >= C.BAT_UNUSED:
            raise CorruptImage(f"{self.host.name}: the file would pass 2 TiB, the most a BAT entry can address")
        e = p // C.SECTOR
        if self.differencing:  # no sector present yet: its bits are set as sectors are written
            self.host.pwrite(p, bytes(bm))
            self.dirty_bitmaps[b] = bytearray(bm)
            self.state[b] = _PARTIAL
        else:
            self.host.pwrite(p, b"\xff" * bm)
            self.fresh[b] = bytearray(-(-bs // GRANULE))
            self.state[b] = _FULL
        self.bat[b] = e
        self.dirty_bat.add(b)
        self.footer_pos = p + bm + bs
        self.footer_dirty = True
        return e

    def _diff_write(self, b: int, within: int, piece, zero: bool = False) -> None:
        """Write into block ``b`` of a differencing disk: the sectors written get their
        bitmap bits set (by ``flush``, after the data), the others keep reading the
        parent; a partly written sector is first filled from what it reads as."""
        n = len(piece)
        if self.bat[b] == C.BAT_UNUSED:
            self._allocate(b)
        bm = self._dirty_bitmap(b)
        data_at = self.bat[b] * C.SECTOR + self.bmsize
        lo, hi = within - within % C.SECTOR, -(-(within + n) // C.SECTOR) * C.SECTOR
        guest = b * self.cluster_size
        if lo == within and hi == within + n:
            if zero:
                self.host.punch_hole(data_at + lo, n)
            else:
                self.host.pwrite(data_at + lo, piece)
        else:
            buf = bytearray(hi - lo)
            if lo < within:
                buf[:C.SECTOR] = self.read(guest + lo, C.SECTOR)
            if hi > within + n:
                buf[-C.SECTOR:] = self.read(guest + hi - C.SECTOR, C.SECTOR)
            buf[within - lo:within - lo + n] = bytes(n) if zero else piece
            self.host.pwrite(data_at + lo, buf)
        C.set_bits(bm, lo // C.SECTOR, (hi - lo) // C.SECTOR)

    def _dirty_bitmap(self, b: int) -> bytearray:
        bm = self.dirty_bitmaps.get(b)
        if bm is None:
            cur = self._bitmap(b)
            bm = self.dirty_bitmaps[b] = bytearray(b"\xff" * self.bmsize if cur is None else cur)
            self.bitmaps.pop(b, None)
        return bm

    def write_zeroes(self, offset: int, length: int) -> None:
        if not self.dynamic:
            self.host.punch_hole(offset, length)
            return
        for b, within, pos, n in self._pieces(offset, length):
            if self.differencing:
                self._diff_write(b, within, _Zeros(n), zero=True)
                continue
            if self.bat[b] == C.BAT_UNUSED:
                continue  # reads as zeros already
            e = self._writable_block(b)
            self.host.punch_hole(e * C.SECTOR + self.bmsize + within, n)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        if self.read_only:
            return
        if not (self.dirty_bat or self.pending_bitmaps or self.footer_dirty or self.dirty_bitmaps):
            self.host.flush()
            return
        if self.host.size() < self.footer_pos:
            self.host.truncate(self.footer_pos)  # every block inside the file before a BAT entry names it
        self.host.flush()  # the data first: nothing may point at unwritten blocks
        for b in sorted(self.pending_bitmaps):
            self.host.pwrite(self.bat[b] * C.SECTOR, b"\xff" * self.bmsize)
        self.pending_bitmaps.clear()
        for b, bm in sorted(self.dirty_bitmaps.items()):
            self.host.pwrite(self.bat[b] * C.SECTOR, bytes(bm))
        self.dirty_bitmaps.clear()
        self._write_bat_entries(self.dirty_bat)
        self.dirty_bat.clear()
        if self.footer_dirty:
            self.host.pwrite(self.footer_pos, C.encode_footer(self.footer))
            self.footer_dirty = False
        self.host.flush()

    def _write_bat_entries(self, which, table: int | None = None) -> None:
        t = self.dyn.table_offset if table is None else table
        sectors = sorted({i // 128 for i in which})
        for s in sectors:
            lo, hi = s * 128, min((s + 1) * 128, len(self.bat))
            self.host.pwrite(t + 4 * lo, C.encode_bat(self.bat[lo:hi]))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.dynamic:
            return host_extents(self.host, offset, offset, length)
        absent = Status.UNALLOCATED if self.differencing else Status.ZERO
        out: list[Extent] = []
        for b, within, pos, n in self._pieces(offset, length):
            e = self.bat[b]
            if e == C.BAT_UNUSED:
                out.append(Extent(pos, n, absent))
                continue
            data_at = e * C.SECTOR + self.bmsize
            bm = self._bitmap(b)
            if bm is None:
                out += host_extents(self.host, pos, data_at + within, n)
                continue
            first, last = within // C.SECTOR, (within + n - 1) // C.SECTOR
            for s, cnt, bit in C.bitmap_runs(bm, first, last - first + 1):
                lo, hi = max(s * C.SECTOR, within), min((s + cnt) * C.SECTOR, within + n)
                if bit:
                    out += host_extents(self.host, pos - within + lo, data_at + lo, hi - lo)
                else:
                    out.append(Extent(pos - within + lo, hi - lo, absent))
        return merge_extents(out)
