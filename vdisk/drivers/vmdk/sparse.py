"""One hosted sparse extent: loading, lookup and reads (monolithicSparse,
streamOptimized, and each SPARSE extent of a descriptor layout).

Contract: :func:`load` validates the header (or a streamOptimized footer's
copy), the grain directory and every grain table against the file before any
of it is used: tables lie inside the file, after the header and outside the
descriptor, and no two metadata structures overlap.  Every grain table is held
in memory (one flat ``array('I')``, 4 bytes per grain, charged to
:mod:`vdisk.budget`).  A grain table entry is checked when it is used: inside
the file and outside every metadata structure; a compressed grain's marker
must name its own grain and claim at most twice the grain size, and its data
inflates to at most one grain (:func:`vdisk.codec.vmdk.inflate_grain`).

Offsets given to an extent are relative to the extent (the driver adds the
extent's start); ``read`` returns None pieces for unallocated grains so that
the driver can fill them from the backing image.  Writes live in
:mod:`.write` (a mixin of the same class).
"""

from __future__ import annotations

import array
import bisect
import itertools
import os

from ... import budget
from ...codec import vmdk as V
from ...errors import CorruptImage, UnsupportedFeature
from ...host import HostStorage
from ..base import Status
from .tables import GrainTables
from .write import SparseWriteMixin, _compressor

SECTOR = V.SECTOR
#: a compressed grain's marker may claim at most this many times the grain size
MAX_COMPRESSED_RATIO = 2


class SparseExtent(SparseWriteMixin):
    """A sparse extent file: header, grain directory, grain tables, grains."""

    def __init__(self, host: HostStorage, header: V.SparseHeader, name: str, read_only: bool, sectors: int,
                 gd: array.array, rgd: array.array | None, gte: GrainTables, rgte: GrainTables | None,
                 meta: list[tuple[int, int]], file_sectors: int, fresh_stream: bool, tail_sector: int):
        self.host = host
        self.header = header
        self.name = name
        self.read_only = read_only
        self.sectors = sectors
        self.gd = gd
        self.rgd = rgd
        self.gte = gte  # every grain table entry, GT i at [i*512, (i+1)*512)
        self.rgte = rgte
        self._meta = sorted(meta)  # (start, end) sectors of every metadata structure
        self._meta_starts = [s for s, _ in self._meta]
        self.file_sectors = file_sectors
        self.grain_bytes = header.grain_bytes
        self.stream = header.markers
        #: a streamOptimized image with no grain yet (made by create): it takes appends
        self.fresh_stream = fresh_stream
        self.tail_sector = tail_sector  # where a fresh stream's next grain goes
        self.fresh_tail = tail_sector  # where the empty stream's tail began
        self.dirty_gts: set[int] = set()
        self.gd_dirty = False
        self.next_sector = max(file_sectors, max((e for _s, e in self._meta), default=0))
        self.pending: tuple[int, bytearray] | None = None  # stream: a partly written grain
        self.wrote = False

    # ------------------------------------------------------------------ lookup
    def entry(self, grain: int) -> int:
        return self.gte[grain] if grain < len(self.gte) else 0

    def _overlaps_meta(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._meta_starts, start) - 1
        if i >= 0 and self._meta[i][1] > start:
            return True
        j = i + 1
        return j < len(self._meta) and self._meta[j][0] < end

    def is_zero_entry(self, e: int) -> bool:
        return e == V.GTE_ZERO and bool(self.header.flags & V.FLAG_ZEROED_GTE)

    def check_entry(self, grain: int, e: int) -> None:
        """Refuse an entry that points outside the file or into metadata."""
        where = f"{self.name}: grain table entry for guest sector {grain * self.header.grain_size}"
        if e >= self.file_sectors:
            raise CorruptImage(f"{where} points past the end of the file (sector {e} of {self.file_sectors})")
        span = 1 if self.header.compressed else self.header.grain_size
        if self._overlaps_meta(e, e + span):
            raise CorruptImage(f"{where} points into the image's metadata (sector {e})")

    def _grain_data(self, grain: int, e: int) -> bytes:
        """The whole grain ``grain`` (allocated at sector ``e``), decompressed."""
        self.check_entry(grain, e)
        gb = self.grain_bytes
        if not self.header.compressed:
            return self.host.pread(e * SECTOR, gb)
        where = f"{self.name}: compressed grain for guest sector {grain * self.header.grain_size}"
        limit = gb * MAX_COMPRESSED_RATIO
        if self.header.markers:
            head = self.host.pread(e * SECTOR, V.MARKER_HEAD)
            m = V.decode_marker(head + bytes(4))
            if not m.is_grain:
                raise CorruptImage(f"{where}: a metadata marker where a grain should be")
            if m.val != grain * self.header.grain_size:
                raise CorruptImage(f"{where}: its marker names guest sector {m.val}")
            if m.size > limit:
                raise CorruptImage(f"{where}: its marker claims {m.size} bytes, more than {limit}")
            end_sector = e + -(-(V.MARKER_HEAD + m.size) // SECTOR)
            if end_sector > self.file_sectors or self._overlaps_meta(e, end_sector):
                raise CorruptImage(f"{where}: its data runs past the end of the file or into metadata")
            comp = self.host.pread(e * SECTOR + V.MARKER_HEAD, m.size)
        else:
            comp = self.host.pread(e * SECTOR, min(limit, (self.file_sectors - e) * SECTOR))
        try:
            return V.inflate_grain(comp, gb)
        except CorruptImage as exc:
            raise CorruptImage(f"{where}: {exc}") from None

    def read_pieces(self, offset: int, length: int) -> list[tuple[int, int, bytes | None]]:
        """``(offset, length, data)`` pieces covering the range; data None where
        the extent holds nothing (unallocated grains)."""
        gb = self.grain_bytes
        out: list[tuple[int, int, bytes | None]] = []
        inflate: list[tuple[int, int, int, int, int]] = []  # (index in out, grain, entry, offset in it, length)
        pos, end = offset, offset + length
        pend = self.pending
        while pos < end:
            g = pos // gb
            in_g = pos - g * gb
            n = min(end - pos, gb - in_g)
            if pend is not None and pend[0] == g:
                out.append((pos, n, bytes(pend[1][in_g:in_g + n])))
                pos += n
                continue
            e = self.entry(g)
            if e == V.GTE_UNALLOCATED:
                run_end = self._unallocated_run(pos, end)
                out.append((pos, run_end - pos, None))
                pos = run_end
                continue
            if self.is_zero_entry(e):
                out.append((pos, n, bytes(n)))
            elif not self.header.compressed:
                # physically contiguous grains: one pread
                k = self._contiguous(g, e, (end - 1) // gb)
                run = min(end, (g + k) * gb) - pos
                out.append((pos, run, self.host.pread(e * SECTOR + in_g, run)))
                pos += run
                continue
            else:
                inflate.append((len(out), g, e, in_g, n))
                out.append((pos, n, b""))
            pos += n
        if inflate:  # compressed grains: inflated in threads when there are several (zlib lets go of the GIL)
            def one(item):
                return self._grain_data(item[1], item[2])[item[3]:item[3] + item[4]]
            datas = list(_compressor().map(one, inflate)) if len(inflate) > 1 else [one(inflate[0])]
            for (i, _g, _e, _in, _n), data in zip(inflate, datas):
                out[i] = (out[i][0], out[i][1], data)
        return out

    def _unallocated_run(self, pos: int, end: int) -> int:
        """Where the run of unallocated grains from ``pos`` ends (at most ``end``):
        a missing grain table is skipped whole."""
        gb = self.grain_bytes
        n = V.GTES_PER_GT
        pend = self.pending[0] if self.pending is not None else -1
        tables = self.gte.tables
        p = pos
        while p < end:
            g = p // gb
            if g == pend:
                break
            t = tables.get(g // n)
            if t is None:
                p = min(end, (g // n + 1) * n * gb)
                continue
            if t[g % n]:
                break
            p = min(end, (g + 1) * gb)
        return p

    def status(self, offset: int, length: int) -> list[tuple[int, int, Status, int | None, bool]]:
        gb = self.grain_bytes
        holes = _Holes(self.host)
        out: list[tuple[int, int, Status, int | None, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            g = pos // gb
            in_g = pos - g * gb
            n = min(end - pos, gb - in_g)
            e = self.entry(g)
            if self.pending is not None and self.pending[0] == g:
                out.append((pos, n, Status.DATA, None, True))
            elif e == V.GTE_UNALLOCATED:
                run_end = self._unallocated_run(pos, end)
                out.append((pos, run_end - pos, Status.UNALLOCATED, None, False))
                pos = run_end
                continue
            elif self.is_zero_entry(e):
                out.append((pos, n, Status.ZERO, None, False))
            elif self.header.compressed:
                out.append((pos, n, Status.DATA, None, True))
            else:
                k = self._contiguous(g, e, (end - 1) // gb)
                run_end = min(end, (g + k) * gb)
                if not holes.any_hole(e * SECTOR + in_g, run_end - pos):
                    out.append((pos, run_end - pos, Status.DATA, e * SECTOR + in_g, False))
                    pos = run_end
                    continue
                # zeroed grains are punched holes: they read as zeros
                for j in range(k):
                    p0 = max(pos, (g + j) * gb)
                    p1 = min(run_end, (g + j + 1) * gb)
                    h0 = (e + j * self.header.grain_size) * SECTOR
                    if holes.is_hole(h0, gb):
                        out.append((p0, p1 - p0, Status.ZERO, None, False))
                    else:
                        out.append((p0, p1 - p0, Status.DATA, h0 + p0 - (g + j) * gb, False))
                pos = run_end
                continue
            pos += n
        return out

    def _contiguous(self, g: int, e: int, last: int) -> int:
        """How many grains from ``g`` (allocated at sector ``e``, uncompressed) up to
        grain ``last`` lie back to back in the file; all of them checked."""
        n = V.GTES_PER_GT
        gs = self.header.grain_size
        tables = self.gte.tables
        k = 1
        while g + k <= last:
            t = tables.get((g + k) // n)
            if t is None or t[(g + k) % n] != e + k * gs:
                break
            k += 1
        if e + (k - 1) * gs >= self.file_sectors or self._overlaps_meta(e, e + k * gs):
            for j in range(k):  # name the first bad one
                self.check_entry(g + j, e + j * gs)
        return k

    def allocated_grains(self) -> int:
        return sum(1 for _g, e in self.gte.items() if not self.is_zero_entry(e))

    def close(self) -> None:
        self.host.close()


class _Holes:
    """Which host ranges are holes (SEEK_DATA/SEEK_HOLE), with few system calls over
    one block_status call: the last data and hole runs found are remembered."""

    def __init__(self, host: HostStorage):
        fd = getattr(host, "fd", None)
        self.fd = fd if isinstance(fd, int) and fd >= 0 else None
        self.hole = (0, 0)
        self.data = (0, 0)

    def any_hole(self, start: int, length: int) -> bool:
        """True if some of the range may be a hole (False: all data, one system call)."""
        if self.fd is None:
            return False
        try:
            return os.lseek(self.fd, start, os.SEEK_HOLE) < start + length
        except OSError:
            return True

    def is_hole(self, start: int, length: int) -> bool:
        if self.fd is None:
            return False
        end = start + length
        if self.hole[0] <= start and end <= self.hole[1]:
            return True
        if self.data[0] <= start < self.data[1]:
            return False
        try:
            d = os.lseek(self.fd, start, os.SEEK_DATA)
        except OSError:  # ENXIO: no data from here on
            self.hole = (start, 1 << 62)
            return True
        if d >= end:
            self.hole = (start, d)
            return True
        try:
            h = os.lseek(self.fd, d, os.SEEK_HOLE)
        except OSError:
            return False
        self.data = (d, h)
        return False


# ---------------------------------------------------------------------- loading
def _read_footer(host: HostStorage, name: str, fsize: int) -> V.SparseHeader:
    """The header copy of a streamOptimized footer: footer marker, header, end-of-stream marker."""
    if fsize % SECTOR or fsize < 4 * SECTOR:
        raise CorruptImage(f"{name}: streamOptimized image has no footer (truncated, or its writer never finished)")
    tail = host.pread(fsize - 3 * SECTOR, 3 * SECTOR)
    fm, eos = V.decode_marker(tail[:SECTOR]), V.decode_marker(tail[2 * SECTOR:])
    if fm.is_grain or fm.type != V.MARKER_FOOTER or eos.is_grain or eos.type != V.MARKER_EOS:
        raise CorruptImage(f"{name}: streamOptimized image has no footer (truncated, or its writer never finished)")
    try:
        return V.decode_header(tail[SECTOR:2 * SECTOR])
    except (CorruptImage, UnsupportedFeature) as exc:
        raise type(exc)(f"{name}: footer: {exc}") from None


def load(host: HostStorage, name: str, *, read_only: bool, sectors: int | None = None) -> SparseExtent:
    """Open a sparse extent; ``sectors`` is the size its descriptor gives it (None: the header's capacity)."""
    fsize = host.size()
    try:
        h = V.decode_header(host.pread(0, V.HEADER_SIZE))
    except (CorruptImage, UnsupportedFeature) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    fsec = -(-fsize // SECTOR)
    meta: list[tuple[int, int]] = [(0, 1)]
    if h.descriptor_offset or h.descriptor_size:
        if h.descriptor_size * SECTOR > V.MAX_DESCRIPTOR_BYTES:
            raise CorruptImage(f"{name}: embedded descriptor of {h.descriptor_size} sectors is larger than "
                               f"vdisk's limit of {V.MAX_DESCRIPTOR_BYTES} bytes")
        if h.descriptor_offset < 1 or h.descriptor_offset + h.descriptor_size > fsec:
            raise CorruptImage(f"{name}: embedded descriptor at sector {h.descriptor_offset} lies outside the file")
        meta.append((h.descriptor_offset, h.descriptor_offset + h.descriptor_size))
    gh = h
    fresh = False
    tail_sector = fsec
    if h.gd_offset == V.GD_AT_END:
        if not h.markers:
            raise CorruptImage(f"{name}: grain directory 'at the end' without streamOptimized markers")
        gh = _read_footer(host, name, fsize)
        if gh.gd_offset == V.GD_AT_END or (gh.capacity, gh.grain_size, gh.flags) != (h.capacity, h.grain_size, h.flags):
            raise CorruptImage(f"{name}: footer disagrees with the header")
        # only the footer's grain directory offset is used: the rest is the header's
        gh = h.with_(gd_offset=gh.gd_offset)
        meta.append((fsec - 3, fsec))
    if sectors is None:
        sectors = h.capacity
    if sectors > h.capacity:
        raise CorruptImage(f"{name}: descriptor gives the extent {sectors} sectors, its header only {h.capacity}")
    n_gd = gh.gd_entries
    with_rgd = gh.redundant and h.gd_offset != V.GD_AT_END
    budget.charge(n_gd * 4 * (2 if with_rgd else 1), f"{name}: the grain directory")

    def read_gd(off: int, what: str) -> array.array:
        if off < 1 or off + gh.gd_sectors > fsec:
            raise CorruptImage(f"{name}: {what} at sector {off} ({gh.gd_sectors} sectors) lies outside the file")
        meta.append((off, off + gh.gd_sectors))
        return V.decode_entries(host.pread(off * SECTOR, n_gd * 4))

    gd = read_gd(gh.gd_offset, "grain directory")
    rgd = read_gd(gh.rgd_offset, "redundant grain directory") if with_rgd else None
    tables = sum(1 for e in gd if e) + (sum(1 for e in rgd if e) if rgd is not None else 0)
    budget.charge(tables * V.GTES_PER_GT * 4, f"{name}: {tables} grain tables")
    gte = _read_tables(host, name, gd, gh, fsec, meta, "grain table")
    rgte = _read_tables(host, name, rgd, gh, fsec, meta, "redundant grain table") if rgd is not None else None
    _check_disjoint(name, meta)
    if gh.markers and not any(gd) and h.gd_offset == V.GD_AT_END:
        # an empty stream (as create writes it): its tail starts at the grain directory's marker
        fresh = True
        tail_sector = gh.gd_offset - 1
    return SparseExtent(host, gh, name, read_only, sectors, gd, rgd, gte, rgte, meta, fsec, fresh, tail_sector)


def _read_tables(host, name, gd: array.array, h: V.SparseHeader, fsec: int, meta: list, what: str) -> GrainTables:
    """Every grain table the directory names."""
    n = V.GTES_PER_GT
    gts = h.gt_sectors
    out = GrainTables(len(gd))
    order = sorted((off, i) for i, off in enumerate(gd) if off)
    k = 0
    while k < len(order):
        off, i = order[k]
        if off < 1 or off + gts > fsec:
            raise CorruptImage(f"{name}: {what} {i} at sector {off} lies outside the file")
        # read a run of consecutive tables in one piece (at most 1 MiB)
        j = k + 1
        while j < len(order) and order[j][0] == order[j - 1][0] + gts and (j - k) * gts * SECTOR < (1 << 20):
            j += 1
        buf = host.pread(off * SECTOR, (j - k) * gts * SECTOR)
        for m in range(k, j):
            o, idx = order[m]
            if o + gts > fsec:
                raise CorruptImage(f"{name}: {what} {idx} at sector {o} lies outside the file")
            meta.append((o, o + gts))
            rel = (m - k) * gts * SECTOR
            out.set_table(idx, V.decode_entries(buf[rel:rel + n * 4]))
        k = j
    return out


def _check_disjoint(name: str, meta: list[tuple[int, int]]) -> None:
    s = sorted(meta)
    for (a0, a1), (b0, b1) in itertools.pairwise(s):
        if b0 < a1:
            raise CorruptImage(f"{name}: metadata structures overlap (sectors {a0}-{a1 - 1} and {b0}-{b1 - 1}): "
                               "grain tables or directories point at each other or at the header")
