"""Writes into a sparse extent (a mixin of :class:`.sparse.SparseExtent`).

monolithicSparse (uncompressed grains): a write into an allocated grain goes
in place; a write into an unallocated grain allocates a whole grain at the end
of the file (the rest of the grain filled from the backing image, or zeros),
and a grain table that does not exist yet is allocated there too.  The new
grain table entries are kept in memory and written -- into the grain table and
into the redundant one, as VMware keeps them in step -- only by ``flush``,
after the grain data is durable: a crash never leaves an entry pointing at
unwritten data (at worst an appended grain nobody points at).

streamOptimized (compressed grains with markers): written once, sequentially,
as ``convert`` and ``create`` do.  Only an image that holds no grain yet (as
``create`` makes it) takes writes: each grain is compressed and appended when
it is complete (or when a write moves to another grain, or at ``flush``);
``flush`` writes the tail VMware's stream layout ends with (grain tables and
directory with their markers, the footer, the end-of-stream marker) after the
last grain, and the next grain overwrites that tail.  A write to a grain
already written raises ``NotSupported``: qemu-img too refuses to rewrite an
allocated grain of a streamOptimized image ("Could not write to allocated
cluster for streamOptimized"), and vdisk also refuses writes into a stream
image that already holds data (convert it to monolithicSparse to edit it).
"""

from __future__ import annotations

import array
import bisect
import os
from collections.abc import Callable

from ...codec import vmdk as V
from ...errors import NotSupported, ReadOnlyImage

SECTOR = V.SECTOR
MAX_FILE_SECTORS = 0xFFFFFFFF  # grain table entries are 32-bit sector numbers

Fill = Callable[[int, int], bytes]
_pool = None


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads: it makes its own


os.register_at_fork(after_in_child=_forget_pool)


def _compressor():
    """The threads that compress and inflate stream grains (one per CPU, made on first use)."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                                   thread_name_prefix="vdisk-vmdk-deflate")
    return _pool


class SparseWriteMixin:
    # ------------------------------------------------------------------ helpers
    def _add_meta(self, start: int, end: int) -> None:
        bisect.insort(self._meta, (start, end))
        self._meta_starts = [s for s, _ in self._meta]

    def _take(self, sectors: int) -> int:
        sec = self.next_sector
        if sec + sectors > MAX_FILE_SECTORS:
            raise NotSupported(f"{self.name}: the extent file is full (sparse extents address 2 TiB)")
        self.next_sector = sec + sectors
        self.file_sectors = max(self.file_sectors, self.next_sector)
        return sec

    def _alloc_gt(self, gt: int) -> None:
        h = self.header
        for directory in (self.gd, self.rgd):
            if directory is None:
                continue
            sec = self._take(h.gt_sectors)
            self.host.pwrite(sec * SECTOR, bytes(h.gt_sectors * SECTOR))
            self._add_meta(sec, sec + h.gt_sectors)
            directory[gt] = sec
        self.gd_dirty = True

    def _alloc_grain(self, g: int, grain: bytes | None) -> None:
        """Append grain ``g`` (None: a grain of zeros, left a hole at the end of the file)."""
        gt = g // V.GTES_PER_GT
        if self.gd[gt] == 0:
            self._alloc_gt(gt)
        sec = self._take(self.header.grain_size)
        if grain is None:
            self.host.truncate(max(self.host.size(), self.next_sector * SECTOR))
        else:
            self.host.pwrite(sec * SECTOR, grain)
        self.gte[g] = sec
        if self.rgte is not None:
            self.rgte[g] = sec
        self.dirty_gts.add(gt)

    def _set_entry(self, g: int, value: int) -> None:
        self.gte[g] = value
        if self.rgte is not None:
            self.rgte[g] = value
        self.dirty_gts.add(g // V.GTES_PER_GT)

    # ------------------------------------------------------------------ writes
    def write(self, offset: int, data: bytes, fill: Fill) -> None:
        """Write extent bytes; ``fill(offset, length)`` gives what an unallocated grain
        holds underneath (the backing image's bytes, or zeros)."""
        if self.read_only:
            raise ReadOnlyImage(f"{self.name}: the descriptor makes this extent read-only")
        self.wrote = True
        if self.stream:
            self._stream_write(offset, data)
            return
        gb = self.grain_bytes
        mv = memoryview(data)
        pos = 0
        while pos < len(data):
            off = offset + pos
            g = off // gb
            in_g = off - g * gb
            n = min(len(data) - pos, gb - in_g)
            e = self.entry(g)
            if e and not self.is_zero_entry(e):
                self.check_entry(g, e)
                self.host.pwrite(e * SECTOR + in_g, mv[pos:pos + n])
            elif n == gb:
                self._alloc_grain(g, bytes(mv[pos:pos + n]))
            else:
                base = bytearray(gb) if self.is_zero_entry(e) else bytearray(fill(g * gb, gb))
                base[in_g:in_g + n] = mv[pos:pos + n]
                self._alloc_grain(g, bytes(base))
            pos += n

    def zero(self, offset: int, length: int, has_backing: bool, fill: Fill) -> None:
        """Make the range read as zeros in this extent."""
        if self.read_only:
            raise ReadOnlyImage(f"{self.name}: the descriptor makes this extent read-only")
        self.wrote = True
        gb = self.grain_bytes
        pos, end = offset, offset + length
        punch = getattr(self.host, "fd", None) is not None  # a HostFile: a punched range reads as zeros
        while pos < end:
            g = pos // gb
            in_g = pos - g * gb
            n = min(end - pos, gb - in_g)
            e = self.entry(g)
            pend = self.pending is not None and self.pending[0] == g
            if self.stream:
                if pend:
                    self.pending[1][in_g:in_g + n] = bytes(n)
                elif e:
                    self._stream_write(pos, bytes(n))  # refused with the reason
            elif e == V.GTE_UNALLOCATED:
                if has_backing:
                    if n == gb and self.header.flags & V.FLAG_ZEROED_GTE:
                        self._set_entry(g, V.GTE_ZERO)
                    elif n == gb:
                        self._alloc_grain(g, None)  # a hole at the end of the file: reads as zeros
                    else:
                        self.write(pos, bytes(n), fill)
            elif not self.is_zero_entry(e):
                self.check_entry(g, e)
                if punch and n == gb:
                    self.host.punch_hole(e * SECTOR, gb)
                else:
                    self.host.pwrite(e * SECTOR + in_g, bytes(n))
            pos += n

    # ------------------------------------------------------------------ stream writes
    def _refuse_stream(self, why: str) -> NotSupported:
        return NotSupported(f"{self.name}: streamOptimized VMDK images are written once, in one sequential pass "
                            f"(create or convert), and {why}; qemu-img also refuses to rewrite a grain of one. "
                            "Convert it to subformat=monolithicSparse to change it")

    def _stream_write(self, offset: int, data: bytes) -> None:
        if self.read_only or not self.fresh_stream:
            raise self._refuse_stream("this one holds data already")
        gb = self.grain_bytes
        end_of_extent = self.sectors * SECTOR
        batch: list[tuple[int, bytes]] = []  # whole grains of this write, compressed together
        mv = memoryview(data)
        pos = 0
        while pos < len(data):
            off = offset + pos
            g = off // gb
            in_g = off - g * gb
            n = min(len(data) - pos, gb - in_g)
            if self.pending is None or self.pending[0] != g:
                if self.entry(g) or any(b[0] == g for b in batch[-1:]):
                    raise self._refuse_stream(f"the grain at byte {g * gb} of the extent is written already")
                if n == gb:
                    batch.append((g, bytes(mv[pos:pos + n])))
                    pos += n
                    continue
                self._append_batch(batch)
                if self.pending is not None:
                    self._commit_pending()
                self.pending = (g, bytearray(gb))
            self.pending[1][in_g:in_g + n] = mv[pos:pos + n]
            if in_g + n == gb or off + n >= end_of_extent:
                self._commit_pending()
            pos += n
        self._append_batch(batch)

    def _append_batch(self, batch: list[tuple[int, bytes]]) -> None:
        """Compress whole grains (in threads: zlib lets go of the GIL) and append them in order."""
        if not batch:
            return
        if self.pending is not None:
            self._commit_pending()
        todo = [(g, d) for g, d in batch if d.count(0) != len(d)]  # grains of zeros are left out
        gs = self.header.grain_size
        if len(todo) > 1:
            recs = list(_compressor().map(lambda item: V.encode_grain(item[0] * gs, item[1]), todo))
        else:
            recs = [V.encode_grain(g * gs, d) for g, d in todo]
        for (g, _d), rec in zip(todo, recs):
            self._append(g, rec)
        batch.clear()

    def _commit_pending(self) -> None:
        g, buf = self.pending
        self.pending = None
        if not any(buf):
            return  # a grain of zeros is left out: it reads as zeros
        self._append(g, V.encode_grain(g * self.header.grain_size, bytes(buf)))

    def _append(self, g: int, rec: bytes) -> None:
        if self.tail_sector == self.fresh_tail:
            # the first grain overwrites the empty image's tail: it is metadata no more
            self._meta = [m for m in self._meta if m[1] <= self.tail_sector]
            self._meta_starts = [s for s, _ in self._meta]
        sec = self.tail_sector
        if sec + len(rec) // SECTOR > MAX_FILE_SECTORS:
            raise NotSupported(f"{self.name}: the extent file is full (sparse extents address 2 TiB)")
        self.host.pwrite(sec * SECTOR, rec)
        self.gte[g] = sec
        self.tail_sector = sec + len(rec) // SECTOR
        self.file_sectors = max(self.file_sectors, self.tail_sector)
        self.next_sector = self.tail_sector

    def stream_tail(self) -> None:
        """Append the grain tables, grain directory, footer and end-of-stream marker after the last grain."""
        if self.pending is not None:
            self._commit_pending()
        h = self.header
        parts: list[bytes] = []
        sec = self.tail_sector
        gd = array.array("I", bytes(4 * len(self.gd)))
        for i in range(len(self.gd)):
            table = self.gte.table(i)
            if not any(table):
                continue
            parts.append(V.encode_meta_marker(V.MARKER_GT, h.gt_sectors))
            gd[i] = sec + 1
            raw = V.encode_entries(table)
            parts.append(raw + bytes(h.gt_sectors * SECTOR - len(raw)))
            sec += 1 + h.gt_sectors
        parts.append(V.encode_meta_marker(V.MARKER_GD, h.gd_sectors))
        gd_sec = sec + 1
        raw = V.encode_entries(gd)
        parts.append(raw + bytes(h.gd_sectors * SECTOR - len(raw)))
        sec += 1 + h.gd_sectors
        parts.append(V.encode_meta_marker(V.MARKER_FOOTER, 1))
        parts.append(h.with_(gd_offset=gd_sec).encode())
        parts.append(V.encode_meta_marker(V.MARKER_EOS, 0))
        blob = b"".join(parts)
        self.host.pwrite(self.tail_sector * SECTOR, blob)
        self.host.truncate(self.tail_sector * SECTOR + len(blob))

    # ------------------------------------------------------------------ flush
    def flush(self) -> None:
        if self.read_only:
            return
        if self.stream:
            if self.fresh_stream and self.wrote:
                self.stream_tail()
            self.host.flush()
            return
        if not (self.dirty_gts or self.gd_dirty):
            self.host.flush()
            return
        self.host.flush()  # the grains first: no entry may point at unwritten data
        for gt in sorted(self.dirty_gts):
            for table, directory in ((self.gte, self.gd), (self.rgte, self.rgd)):
                if table is not None:
                    self.host.pwrite(directory[gt] * SECTOR, V.encode_entries(table.table(gt)))
        if self.gd_dirty:
            self.host.pwrite(self.header.gd_offset * SECTOR, V.encode_entries(self.gd))
            if self.rgd is not None:
                self.host.pwrite(self.header.rgd_offset * SECTOR, V.encode_entries(self.rgd))
        self.dirty_gts.clear()
        self.gd_dirty = False
        self.host.flush()

    def sync_redundant(self) -> None:
        """Rewrite the redundant grain tables from the primary ones; durable on return."""
        if self.rgte is None:
            return
        for i in set(self.gte.tables) | set(self.rgte.tables):
            if self.gte.table(i) != self.rgte.table(i):
                self.rgte.tables[i] = array.array("I", self.gte.table(i))
                self.dirty_gts.add(i)
        self.flush()

    def make_empty(self) -> None:
        """Drop every grain (``commit`` empties the overlay it committed); durable on
        return.  The file is cut back to its metadata."""
        if self.stream:
            raise self._refuse_stream("cannot be emptied")
        self.gte.clear()
        if self.rgte is not None:
            self.rgte.clear()
        self.dirty_gts.update(i for i, off in enumerate(self.gd) if off)
        self.flush()
        end = max(max(e for _s, e in self._meta), self.header.overhead)
        self.host.truncate(end * SECTOR)
        self.host.flush()
        self.next_sector = self.file_sectors = end

    # ------------------------------------------------------------------ resize
    def set_capacity(self, sectors: int) -> None:
        """Grow or shrink a monolithicSparse extent to ``sectors``; durable on return.
        Grains past the new end are dropped; growing past what the grain directory
        can hold moves the directories to the end of the file."""
        h = self.header
        gb = self.grain_bytes
        new_h = h.with_(capacity=sectors)
        keep = -(-sectors * SECTOR // gb)  # grains that stay
        for g in [g for g, _e in self.gte.items() if g >= keep]:
            self._set_entry(g, 0)
        if self.rgte is not None:
            for g in [g for g, _e in self.rgte.items() if g >= keep]:
                self._set_entry(g, 0)
        tail = sectors * SECTOR % gb
        if tail and keep - 1 < len(self.gte):
            e = self.entry(keep - 1)
            if e and not self.is_zero_entry(e):
                self.check_entry(keep - 1, e)
                self.host.pwrite(e * SECTOR + tail, bytes(gb - tail))
        need = new_h.gd_entries
        if need > len(self.gd):
            slots = h.gd_sectors * SECTOR // 4
            extra = need - len(self.gd)
            self.gd.extend(array.array("I", bytes(4 * extra)))
            if self.rgd is not None:
                self.rgd.extend(array.array("I", bytes(4 * extra)))
            self.gte.grow(need)
            if self.rgte is not None:
                self.rgte.grow(need)
            if need > slots:  # the directories move to the end of the file
                size = -(-need * 4 // SECTOR)
                gd_off = self._take(size)
                self._add_meta(gd_off, gd_off + size)
                rgd_off = h.rgd_offset
                if self.rgd is not None:
                    rgd_off = self._take(size)
                    self._add_meta(rgd_off, rgd_off + size)
                new_h = new_h.with_(gd_offset=gd_off, rgd_offset=rgd_off)
            self.gd_dirty = True
        self.header = new_h
        self.sectors = sectors
        self.flush()
        self.host.pwrite(0, new_h.encode())
        self.host.flush()
