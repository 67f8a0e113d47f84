"""The VHD driver (format name "vpc", as qemu-img): Microsoft's Virtual Hard Disk.

Written from Microsoft's public "Virtual Hard Disk Image Format Specification"; the
byte layouts live in :mod:`vdisk.codec.vhd`, the facts and choices in
``formats/vhd.md``.

What it does
  - fixed disks (the guest disk, then a 512-byte footer): read, write, zeroes and
    discard as holes, resize;
  - dynamic disks (footer copy, dynamic header, BAT, blocks of a sector bitmap and
    data, footer): read (sectors whose bitmap bit is clear read as zeros), write
    (new blocks go at the end, their data 4 KiB-aligned, with every bitmap bit set;
    a block with a partial bitmap is first rewritten whole), zeroes and discard as
    holes inside allocated blocks, resize (the BAT moves to the end when it has no
    room left);
  - differencing disks: the parent is found through the parent locators (the
    relative Windows path first) and becomes the image's backing reference (format
    vpc), followed under the one backing policy of :func:`vdisk.open`; sectors whose
    bitmap bit is clear come from the parent; writes copy the rest of the block
    from the parent.  ``create`` with a backing file makes one (its parent must be a
    VHD), with a relative-path locator only.

Guest size: the footer's current size, or the CHS geometry's product for the
creator applications that size disks by geometry (Virtual PC, QEMU without
force_size), the rule QEMU follows.  vdisk writes the specification's geometry when
it is exact for the size, else the largest geometry (65535/16/255), so that every
reader takes the current size.

Crash safety: new blocks' BAT entries, bitmap changes and the end footer are
written by ``flush`` after the data is durable, so a crash leaves at worst unused
space after the last block (and no footer at the very end: dynamic disks are then
opened from the copy at offset 0, and a read-write open restores the footer).

Every structure is checked before use: checksums, sizes, the BAT inside the file,
blocks inside the file and clear of the metadata and of each other (CorruptImage).

The package: this module (probe, create, open and its checks, close, info, check);
``data`` (read, write, zeroes, flush, block status: a mixin); ``resize`` (resize,
the parent reference, make_empty: a mixin); ``layout`` (limits, the footer for a
new size); ``sparse`` (SEEK_DATA/SEEK_HOLE extents and hole-keeping writes into new
blocks, shared with the VDI driver).  ``VhdDriver.__init__`` lists all the state.
"""

from __future__ import annotations

import itertools
import os
import urllib.parse
import uuid
from array import array

from ... import budget
from ...codec import vhd as C
from ...errors import CorruptImage, NotSupported, UnsupportedFeature, UsageError
from ...host import HostStorage
from .. import register
from ..base import BackingRef, BlockDriver, CheckResult, CreateOptions, on_off
from .data import DataMixin
from .layout import ALIGN, MAX_SIZE, footer_for
from .resize import ResizeMixin
from .sparse import (
    GRANULE,
    fresh_granules,
    fresh_write,
    host_extents,
    is_hole,
    merge_extents,
)

__all__ = [
    "ALIGN",
    "GRANULE",
    "VhdDriver",
    "footer_for",
    "fresh_granules",
    "fresh_write",
    "host_extents",
    "is_hole",
    "merge_extents",
]

MIN_BLOCK, MAX_BLOCK = C.SECTOR, 32 << 20
DEFAULT_BLOCK = 2 << 20
MAX_LOCATOR_BYTES = 8192

@register
class VhdDriver(DataMixin, ResizeMixin, BlockDriver):
    format_name = "vpc"
    supports_backing = True
    default_cluster_size = DEFAULT_BLOCK
    #: writing part of a new block reads nothing back (the rest stays a hole), so
    #: ``convert`` need not widen data runs to whole blocks
    fresh_partial_writes = True
    create_options = {
        "subformat": "dynamic (the default: space is allocated as the guest writes) or fixed (the whole disk "
                     "up front, as Azure requires)",
        "force_size": "on (the default): the disk has exactly the size asked for (rounded up to 512 bytes), "
                      "as Azure and Hyper-V want; off: rounded up to the nearest CHS geometry, as qemu-img's "
                      "default and Virtual PC",
        "block_size": "dynamic and differencing disks: bytes per block, a power of two, 512 bytes to 32 MiB "
                      "(default 2M, what Hyper-V and qemu-img use)",
    }

    def __init__(self, host: HostStorage, read_only: bool):
        self.host = host
        self.read_only = read_only
        self.backing = None
        self.backing_ref = None
        self.footer: C.Footer
        self.dyn: C.DynHeader | None = None
        self.bat = array("I")
        self.state = bytearray()
        self.bitmaps: dict[int, bytes] = {}  # partial bitmaps read so far (bounded)
        self.dirty_bat: set[int] = set()
        self.pending_bitmaps: set[int] = set()
        self.dirty_bitmaps: dict[int, bytearray] = {}  # differencing: bitmaps changed since the last flush
        self.footer_pos = 0  # where the footer at the end is (or must go)
        self.footer_dirty = False
        self.meta: list[tuple[int, int]] = []  # host ranges of metadata (offset, length)
        self.fresh: dict[int, bytearray] = {}  # blocks that were holes this session: granules written
        self.touched: set[int] = set()  # blocks whose holes were looked for

    # ------------------------------------------------------------------ probe / create
    @classmethod
    def probe(cls, head: bytes, tail: bytes = b"") -> bool:
        """A dynamic or differencing disk has its footer copy at offset 0; a fixed
        disk only at the end: ``tail`` (the last 512 bytes) counts only when it is a
        valid fixed disk's footer, so that a raw disk whose guest wrote "conectix"
        near its end cannot become anything but the same bytes."""
        if head[:8] == C.FOOTER_COOKIE:
            return True
        if len(tail) >= C.FOOTER_SIZE and tail[-512:-504] == C.FOOTER_COOKIE:
            try:
                return C.decode_footer(tail[-512:]).disk_type == C.TYPE_FIXED
            except CorruptImage:
                return False
        return False

    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        extra = dict(opts.extra)
        sub = extra.pop("subformat", "dynamic")
        exact = on_off("vpc: force_size", extra.pop("force_size", "on"))
        bsize = extra.pop("block_size", None)
        if extra:
            raise UsageError(f"unknown vpc option(s): {', '.join(sorted(extra))} (see -o help)")
        if opts.compression not in (None, "none"):
            raise UsageError("vpc images cannot be compressed")
        if sub not in ("dynamic", "fixed"):
            raise UsageError(f"vpc: subformat must be dynamic or fixed (got {sub!r})")
        if bsize is None:
            bsize = opts.cluster_size or DEFAULT_BLOCK
        else:
            from ...sizes import parse_size
            bsize = parse_size(str(bsize))
        if bsize & (bsize - 1) or not MIN_BLOCK <= bsize <= MAX_BLOCK:
            raise UsageError(f"vpc: block size must be a power of two from 512 bytes to 32 MiB (got {bsize})")
        size = -(-size // C.SECTOR) * C.SECTOR
        if not exact:
            sectors = size // C.SECTOR
            chs = C.geometry(sectors)
            while C.chs_bytes(chs) < size and chs != C.MAX_CHS:
                sectors += 1
                chs = C.geometry(sectors)
            size = max(size, C.chs_bytes(chs))
        if size > MAX_SIZE:
            raise UsageError(f"vpc: {size} bytes is more than a VHD holds (2040 GiB)")
        uid = uuid.uuid4().bytes
        if opts.backing is not None:
            if sub == "fixed":
                raise UsageError("vpc: a fixed disk cannot have a backing file (a differencing disk is dynamic)")
            cls._create_differencing(host, size, bsize, uid, opts)
            return
        if sub == "fixed":
            host.truncate(size)
            host.pwrite(size, C.encode_footer(footer_for(size, C.TYPE_FIXED, C.NO_DATA_OFFSET, uid)))
            host.flush()
            return
        cls._create_dynamic(host, footer_for(size, C.TYPE_DYNAMIC, 512, uid), bsize, C.DynHeader(0, 0, bsize))

    @classmethod
    def _create_dynamic(cls, host, footer: C.Footer, bsize: int, dyn: C.DynHeader,
                        locator_data: list[bytes] = ()) -> None:
        size = footer.current_size
        entries = -(-size // bsize)
        pos = 512 + C.DYN_HEADER_SIZE
        locs = list(dyn.locators)
        for i, data in enumerate(locator_data):
            space = -(-len(data) // C.SECTOR) * C.SECTOR
            locs[i] = C.Locator(locs[i].platform_code, space, len(data), pos)
            host.pwrite(pos, data.ljust(space, b"\0"))
            pos += space
        table = pos
        end = table + C.bat_bytes(entries)
        end = -(-end // ALIGN) * ALIGN  # room to grow the BAT, and the first block's data aligned
        dyn = dyn.replace(table_offset=table, max_table_entries=entries, block_size=bsize, locators=tuple(locs))
        foot = C.encode_footer(footer)
        host.pwrite(0, foot)
        host.pwrite(512, C.encode_dyn_header(dyn))
        host.pwrite(table, b"\xff" * (end - table))
        host.pwrite(end, foot)
        host.flush()

    @classmethod
    def _create_differencing(cls, host, size, bsize, uid, opts: CreateOptions) -> None:
        ref = opts.backing
        if ref.format != "vpc":
            raise UsageError(f"vpc: a differencing VHD's parent must be a VHD (vpc), not {ref.format}")
        if ref.snapshot:
            raise UsageError("vpc: VHD images have no snapshots to be based on")
        base = os.path.join(os.path.dirname(os.path.abspath(host.name)), ref.filename)
        try:
            with open(base, "rb") as f:
                head = f.read(512)
                f.seek(max(0, os.fstat(f.fileno()).st_size - 512))
                tail = f.read(512)
        except OSError as exc:
            raise UsageError(f"vpc: cannot read the parent {base}: {exc.strerror}") from None
        try:
            parent = C.decode_footer(head)
        except CorruptImage:
            parent = C.decode_footer(tail)
        rel = ref.filename.replace("/", "\\")
        if not rel.startswith(("\\", ".")):
            rel = ".\\" + rel
        data = C.encode_locator_path(C.PLAT_W2RU, rel)
        locs = (C.Locator(C.PLAT_W2RU, 0, 0, 0),) + (C.NO_LOCATOR,) * (C.LOCATORS - 1)
        name = os.path.basename(ref.filename)[:256]
        dyn = C.DynHeader(0, 0, bsize, parent_unique_id=parent.unique_id, parent_timestamp=parent.timestamp,
                          parent_name=name, locators=locs)
        cls._create_dynamic(host, footer_for(size, C.TYPE_DIFFERENCING, 512, uid), bsize, dyn, [data])

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> VhdDriver:
        if snapshot is not None:
            raise UsageError("vpc images have no snapshots")
        d = cls(host, read_only)
        d._load()
        return d

    def _load(self) -> None:
        host = self.host
        name = host.name
        fsize = host.size()
        if fsize < C.FOOTER_SIZE:
            raise CorruptImage(f"{name}: {fsize} bytes is too short for a VHD (no footer)")
        head = host.pread(0, 512)
        tail = host.pread(fsize - 512, 512)
        footer = None
        fixed = None
        head_err = None
        if tail[:8] == C.FOOTER_COOKIE:
            try:
                fixed = C.decode_footer(tail)
            except CorruptImage:
                fixed = None
        if fixed is not None and fixed.disk_type == C.TYPE_FIXED and fixed.current_size == fsize - 512:
            # A fixed disk's footer, exactly at the end of its data: it wins over whatever its
            # guest wrote into sector 0 (which may look like a dynamic disk's footer copy)
            pass
        elif head[:8] == C.FOOTER_COOKIE:
            try:
                footer = C.decode_footer(head)
            except CorruptImage as exc:
                footer, head_err = None, exc
            if footer is not None and footer.disk_type == C.TYPE_FIXED:
                footer = None  # a fixed disk's first sector is guest data
        tail_ok = footer is not None and tail == head and fsize >= 1024
        if footer is None:
            try:
                footer = C.decode_footer(tail)
            except CorruptImage as exc:
                raise CorruptImage(f"{name}: {head_err or exc}") from None
            tail_ok = True
        if footer.version >> 16 != 1:
            raise UnsupportedFeature(f"{name}: VHD file format version {footer.version >> 16}."
                                     f"{footer.version & 0xFFFF} is not supported (only 1.x)")
        if footer.disk_type not in (C.TYPE_FIXED, C.TYPE_DYNAMIC, C.TYPE_DIFFERENCING):
            raise UnsupportedFeature(f"{name}: VHD disk type {footer.disk_type} "
                                     f"({C.TYPE_NAMES.get(footer.disk_type, 'unknown')}) is not supported")
        self.footer = footer
        self.size = footer.guest_size
        if self.size > MAX_SIZE:
            raise CorruptImage(f"{name}: the footer claims {self.size} bytes, more than a VHD holds (2040 GiB)")
        if footer.disk_type == C.TYPE_FIXED:
            if self.size > fsize - 512:
                raise CorruptImage(f"{name}: fixed disk of {self.size} bytes in a file of {fsize} bytes "
                                   "(truncated?)")
            self.cluster_size = 4096
            self.footer_pos = fsize - 512
            return
        self._load_dynamic(fsize, tail_ok)

    def _load_dynamic(self, fsize: int, tail_ok: bool) -> None:
        name = self.host.name
        f = self.footer
        end_meta = fsize - 512 if tail_ok else fsize
        if f.data_offset % C.SECTOR or not 512 <= f.data_offset <= end_meta - C.DYN_HEADER_SIZE:
            raise CorruptImage(f"{name}: dynamic header offset {f.data_offset} lies outside the file")
        try:
            dyn = C.decode_dyn_header(self.host.pread(f.data_offset, C.DYN_HEADER_SIZE))
        except CorruptImage as exc:
            raise CorruptImage(f"{name}: {exc}") from None
        if dyn.version >> 16 != 1:
            raise UnsupportedFeature(f"{name}: VHD dynamic header version {dyn.version:#x} is not supported")
        bs = dyn.block_size
        if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise UnsupportedFeature(f"{name}: VHD block size {bs} is not supported (a power of two from 512 "
                                     "bytes to 32 MiB)")
        n = dyn.max_table_entries
        if n < -(-self.size // bs):
            raise CorruptImage(f"{name}: the BAT has {n} entries, too few for {self.size} bytes of "
                               f"{bs}-byte blocks")
        if n > -(-MAX_SIZE // bs):
            raise CorruptImage(f"{name}: the BAT claims {n} entries, more than a VHD can have")
        t = dyn.table_offset
        if t < 512 or t + 4 * n > end_meta:
            raise CorruptImage(f"{name}: the BAT ({n} entries at {t}) lies outside the file")
        budget.charge(5 * n, f"{name}: the BAT")
        self.dyn = dyn
        self.cluster_size = bs
        self.bmsize = C.bitmap_size(bs)
        self.stride = self.bmsize + bs
        self.bat = C.decode_bat(self.host.pread(t, 4 * n), n)
        self.state = bytearray(n)
        meta = [(0, 512), (f.data_offset, C.DYN_HEADER_SIZE), (t, 4 * n)]
        if f.disk_type == C.TYPE_DIFFERENCING:
            self.backing_ref = self._parent_ref(dyn, end_meta, meta)
        self.meta = meta
        self._check_layout(end_meta)
        if not self.read_only and self.footer_pos + 512 != fsize:
            self._restore_end()

    def _check_layout(self, end_meta: int) -> None:
        """Blocks inside the file, clear of the metadata and of each other."""
        name = self.host.name
        ranges = [(o, ln, None) for o, ln in self.meta]
        stride = self.stride
        for i, e in enumerate(self.bat):
            if e != C.BAT_UNUSED:
                off = e * C.SECTOR
                if off + stride > end_meta:
                    raise CorruptImage(f"{name}: BAT entry {i} (guest offset {i * self.cluster_size}) points "
                                       f"past the end of the file ({off}+{stride} > {end_meta})")
                ranges.append((off, stride, i))
        ranges.sort()
        top = 0
        for (a, la, ia), (b, _lb, ib) in itertools.pairwise(ranges):
            top = max(top, a + la)
            if b < top:
                what = f"BAT entry {ib}" if ib is not None else "metadata"
                other = f"BAT entry {ia}" if ia is not None else "metadata"
                raise CorruptImage(f"{name}: {what} at {b} overlaps {other} at {a}")
        last = max((o + ln for o, ln, _ in ranges), default=0)
        self.footer_pos = max(last, end_meta if end_meta < self.host.size() else last)

    def _parent_ref(self, dyn: C.DynHeader, end_meta: int, meta: list):
        name = self.host.name
        found: dict[bytes, str] = {}
        for loc in dyn.locators:
            if not loc.used or loc.platform_code == C.PLAT_MAC:
                continue
            if loc.data_length > MAX_LOCATOR_BYTES or loc.data_offset < 512 or \
                    loc.data_offset + loc.data_length > end_meta:
                raise CorruptImage(f"{name}: parent locator {loc.platform_code!r} ({loc.data_length} bytes at "
                                   f"{loc.data_offset}) lies outside the file or is too long")
            if loc.data_length:
                meta.append((loc.data_offset, loc.data_length))
                found.setdefault(loc.platform_code,
                                 C.decode_locator_path(loc, self.host.pread(loc.data_offset, loc.data_length)))
        path = None
        if C.PLAT_W2RU in found:
            path = found[C.PLAT_W2RU].replace("\\", "/")
        elif C.PLAT_WI2R in found:
            path = found[C.PLAT_WI2R].replace("\\", "/")
        elif C.PLAT_MACX in found:
            url = urllib.parse.urlparse(found[C.PLAT_MACX])
            path = urllib.parse.unquote(url.path) if url.scheme == "file" else None
        else:
            for code in (C.PLAT_W2KU, C.PLAT_WI2K):
                if code in found:  # a Windows absolute path: the parent's file name, beside the child
                    path = found[code].replace("\\", "/").rsplit("/", 1)[-1]
                    break
        if not path and dyn.parent_name:
            path = dyn.parent_name.replace("\\", "/").rsplit("/", 1)[-1]
        if not path:
            raise CorruptImage(f"{name}: differencing VHD names no parent (no usable parent locator)")
        while path.startswith("./"):
            path = path[2:]
        if "\0" in path:
            raise CorruptImage(f"{name}: the parent locator holds a NUL character")
        return BackingRef(path, "vpc")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.host is None:
            return
        try:
            if not self.read_only:
                self.flush()
        finally:
            self.host.close()

    @property
    def dynamic(self) -> bool:
        return self.dyn is not None

    @property
    def differencing(self) -> bool:
        return self.footer.disk_type == C.TYPE_DIFFERENCING

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict:
        f = self.footer
        out = {"subformat": C.TYPE_NAMES.get(f.disk_type, str(f.disk_type)),
               "creator": f.creator_app.decode("latin-1").rstrip("\0 "),
               "geometry": "/".join(map(str, f.geometry)),
               "current_size": f.current_size}
        if self.dynamic:
            out.update(block_size=self.cluster_size, bat_entries=len(self.bat),
                       allocated_blocks=sum(1 for e in self.bat if e != C.BAT_UNUSED))
        return out

    def check(self, *, repair: str | None = None) -> CheckResult:
        """Everything ``open`` checks (it refuses a damaged image), plus: every bitmap
        readable, and the footer at the very end (its absence is a leak: a crash
        between a write and its flush; ``repair`` puts it back)."""
        res = CheckResult()
        if not self.dynamic:
            res.checked_clusters = self.size // 4096
            return res
        used = [i for i, e in enumerate(self.bat) if e != C.BAT_UNUSED]
        res.allocated_clusters = len(used)
        res.checked_clusters = len(self.bat)
        for b in used:
            self._bitmap(b)
        self.flush()
        if self.footer_pos + 512 != self.host.size() or \
                self.host.pread(self.footer_pos, 512) != C.encode_footer(self.footer):
            if repair and not self.read_only:
                self._restore_end()
                res.repaired.append("restored the footer at the end of the file")
            else:
                res.leaks.append(f"the footer is not at the end of the file ({self.footer_pos}): an interrupted "
                                 "write; a read-write open restores it")
        return res

    def make_empty(self) -> None:
        if not self.differencing:
            raise NotSupported("vpc: only a differencing disk can be emptied into its parent")
        self.flush()
        for i, e in enumerate(self.bat):
            if e != C.BAT_UNUSED:
                self.host.punch_hole(e * C.SECTOR, self.stride)
                self.bat[i] = C.BAT_UNUSED
                self.state[i] = 0
        self.bitmaps.clear()
        self.dirty_bitmaps.clear()
        self.fresh.clear()
        self._write_bat_entries(range(len(self.bat)))
        self.host.flush()
