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
"""

from __future__ import annotations

import itertools
import os
import time
import urllib.parse
import uuid
from array import array

from .. import budget
from ..codec import vhd as C
from ..errors import (
    BackingError,
    CorruptImage,
    NotSupported,
    UnsupportedFeature,
    UsageError,
)
from ..host import HostStorage
from . import register
from .base import BackingRef, BlockDriver, CheckResult, CreateOptions, Extent, Status

MAX_SIZE = 0xFF000000 * C.SECTOR  # 2040 GiB: BAT entries are 32-bit sector numbers
MIN_BLOCK, MAX_BLOCK = C.SECTOR, 32 << 20
DEFAULT_BLOCK = 2 << 20
MAX_LOCATOR_BYTES = 8192
ALIGN = 4096  # vdisk places each block so that its data starts on a 4 KiB boundary
_FULL, _PARTIAL = 1, 2  # block bitmap states (0: not read yet)


def host_extents(host: HostStorage, guest: int, hoff: int, n: int) -> list[Extent]:
    """Extents for ``n`` guest bytes from ``guest`` stored at host ``hoff``: DATA where
    the host file has data, ZERO over its holes (SEEK_DATA/SEEK_HOLE)."""
    fd = getattr(host, "fd", None)
    if fd is None or n == 0:
        return [Extent(guest, n, Status.DATA, host_offset=hoff)] if n else []
    out: list[Extent] = []
    pos, end = hoff, hoff + n
    while pos < end:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
        except OSError:
            data = end
        if data > pos:
            out.append(Extent(guest + pos - hoff, data - pos, Status.ZERO))
            pos = data
            if pos >= end:
                break
        try:
            hole = min(max(os.lseek(fd, pos, os.SEEK_HOLE), pos + 1), end)
        except OSError:
            hole = end
        out.append(Extent(guest + pos - hoff, hole - pos, Status.DATA, host_offset=pos))
        pos = hole
    return out


GRANULE = 4096
_ZERO_GRANULE = bytes(GRANULE)
_BIG = 64 * GRANULE
_ZERO_BIG = bytes(_BIG)


def fresh_write(host: HostStorage, hbase: int, written: bytearray, within: int, data) -> None:
    """Write ``data`` at ``within`` of a block that this session allocated at host
    ``hbase`` beyond the old end of the file (so it reads as zeros where never
    written): whole 4 KiB granules of zeros that were never written are left out,
    as holes.  ``written`` flags the granules written so far.  Zero granules are
    found with ``bytes.find`` (no look at the bytes between two zero runs)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    g0, g1 = within // GRANULE, (within + n - 1) // GRANULE
    skip: list[int] = []  # granules (block numbering) left out, ascending
    i = 0
    while True:
        p = data.find(_ZERO_GRANULE, i)
        if p < 0:
            break
        a = -(-(within + p) // GRANULE) * GRANULE - within  # the first granule boundary at or after p
        while True:
            if a + _BIG <= n and data.startswith(_ZERO_BIG, a):
                step = _BIG
            elif a + GRANULE <= n and data.startswith(_ZERO_GRANULE, a):
                step = GRANULE
            else:
                break
            g = (within + a) // GRANULE
            skip.extend(x for x in range(g, g + step // GRANULE) if not written[x])
            a += step
        i = max(a, p + 1)
    written[g0:g1 + 1] = b"\x01" * (g1 - g0 + 1)
    pos = 0  # relative to data
    for g in skip:
        written[g] = 0
        lo = g * GRANULE - within
        if lo > pos:
            host.pwrite(hbase + within + pos, data[pos:lo])
        pos = lo + GRANULE
    if pos < n:
        host.pwrite(hbase + within + pos, data[pos:] if pos else data)


def is_hole(host: HostStorage, off: int, n: int) -> bool:
    """True if the host range holds no data at all (a hole, or past the end)."""
    fd = getattr(host, "fd", None)
    if fd is None:
        return False
    try:
        return os.lseek(fd, off, os.SEEK_DATA) >= off + n
    except OSError:
        return True  # ENXIO: no data from here on


def fresh_granules(drv, b: int, hbase: int) -> bytearray | None:
    """The granule flags of block ``b`` (data at host ``hbase``) if it still reads as
    zeros everywhere no write of this session went: a block this session allocated,
    or one first touched now whose host range is one hole."""
    fresh = drv.fresh.get(b)
    if fresh is None and b not in drv.touched:
        drv.touched.add(b)
        if is_hole(drv.host, hbase, drv.cluster_size):
            fresh = drv.fresh[b] = bytearray(-(-drv.cluster_size // GRANULE))
    return fresh


def merge_extents(ext: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in ext:
        if out:
            p = out[-1]
            if p.status == e.status and p.end == e.offset and (
                    (p.host_offset is None and e.host_offset is None)
                    or (p.host_offset is not None and e.host_offset == p.host_offset + p.length)):
                out[-1] = Extent(p.offset, p.length + e.length, p.status, p.host_offset)
                continue
        out.append(e)
    return out


def _parse_bool(name: str, text) -> bool:
    if text in (True, "on", "true", "yes", "1"):
        return True
    if text in (False, "off", "false", "no", "0"):
        return False
    raise UsageError(f"vpc: {name} must be on or off (got {text!r})")


def footer_for(size: int, disk_type: int, data_offset: int, unique_id: bytes, exact: bool = True) -> C.Footer:
    """A new footer for a guest of ``size`` bytes (a multiple of 512)."""
    chs = C.geometry(size // C.SECTOR)
    if C.chs_bytes(chs) != size:
        chs = C.MAX_CHS  # every reader then takes current_size (formats/vhd.md, "Size")
    return C.Footer(disk_type=disk_type, current_size=size, original_size=size, data_offset=data_offset,
                    geometry=chs, unique_id=unique_id, timestamp=max(0, int(time.time()) - C.EPOCH_OFFSET))


class _Zeros:
    """A length, standing for that many zero bytes (only ``len`` is asked of it)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@register
class VhdDriver(BlockDriver):
    format_name = "vpc"
    supports_backing = True
    default_cluster_size = DEFAULT_BLOCK
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
        exact = _parse_bool("force_size", extra.pop("force_size", "on"))
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
            from ..sizes import parse_size
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

    def verify_backing(self, backing) -> None:
        """The parent must be the disk this one was made on: its footer's unique id is
        the one the dynamic header recorded (an all-zero id, as some tools write, is
        not checked)."""
        want = self.dyn.parent_unique_id if self.dyn is not None else bytes(16)
        got = getattr(getattr(backing, "footer", None), "unique_id", None)
        if want != bytes(16) and got is not None and got != want:
            raise BackingError(f"{self.host.name}: its parent {self.backing_ref.filename} is not the disk it was "
                               f"made on (unique id {got.hex()}, the child records {want.hex()})")

    def set_backing(self, ref) -> None:
        """No parent: a differencing disk becomes a dynamic one (the footers first: a
        crash before the header is rewritten leaves a dynamic disk whose header still
        has unused locators).  A new parent (a VHD) replaces the relative locator's
        path where it fits in the locator's space."""
        if ref is None:
            if not self.differencing:
                return
            self.flush()
            footer = self.footer.replace(disk_type=C.TYPE_DYNAMIC)
            self.host.pwrite(0, C.encode_footer(footer))
            self.host.pwrite(self.footer_pos, C.encode_footer(footer))
            self.host.flush()
            dyn = self.dyn.replace(parent_unique_id=bytes(16), parent_timestamp=0, parent_name="",
                                   locators=(C.NO_LOCATOR,) * C.LOCATORS)
            self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
            self.host.flush()
            self.footer, self.dyn, self.backing_ref = footer, dyn, None
            return
        if ref.format != "vpc" or not self.differencing:
            raise NotSupported(f"vpc: a VHD's parent must be a VHD, named when it is created (not {ref.format}"
                               f"{'' if self.differencing else ' for a disk that is not a differencing one'})")
        rel = ref.filename.replace("/", "\\")
        data = C.encode_locator_path(C.PLAT_W2RU, rel if rel.startswith(("\\", ".")) else ".\\" + rel)
        for i, loc in enumerate(self.dyn.locators):
            if loc.platform_code == C.PLAT_W2RU and len(data) <= -(-loc.data_length // C.SECTOR) * C.SECTOR:
                break
        else:
            raise NotSupported("vpc: the differencing disk has no room for that parent's path")
        parent = os.path.join(os.path.dirname(os.path.abspath(self.host.name)), ref.filename)
        try:
            with open(parent, "rb") as f:
                head = f.read(512)
                f.seek(max(0, os.fstat(f.fileno()).st_size - 512))
                tail = f.read(512)
            pf = C.decode_footer(head if head[:8] == C.FOOTER_COOKIE else tail)
        except (OSError, CorruptImage) as exc:
            raise UsageError(f"vpc: cannot read the new parent {parent}: {exc}") from None
        self.flush()
        space = -(-loc.data_length // C.SECTOR) * C.SECTOR
        self.host.pwrite(loc.data_offset, data.ljust(space, b"\0"))
        locs = list(self.dyn.locators)
        locs[i] = C.Locator(C.PLAT_W2RU, loc.data_space, len(data), loc.data_offset)
        locs = [x if j == i or x.platform_code == C.PLAT_NONE else C.NO_LOCATOR for j, x in enumerate(locs)]
        dyn = self.dyn.replace(parent_unique_id=pf.unique_id, parent_timestamp=pf.timestamp,
                               parent_name=os.path.basename(ref.filename)[:256], locators=tuple(locs))
        self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
        self.host.flush()
        self.dyn = dyn
        self.backing_ref = BackingRef(ref.filename, "vpc")

    def _restore_end(self) -> None:
        """After an interrupted write: cut what follows the last block, put the footer back."""
        self.host.truncate(self.footer_pos)
        self.host.pwrite(self.footer_pos, C.encode_footer(self.footer))
        self.host.flush()

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
        bs = self.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            b, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            yield b, within, pos, n
            pos += n

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

    # ------------------------------------------------------------------ resize
    def resize(self, new_size: int) -> None:
        new_size = -(-new_size // C.SECTOR) * C.SECTOR
        if new_size > MAX_SIZE:
            raise UsageError(f"vpc: {new_size} bytes is more than a VHD holds (2040 GiB)")
        old = self.size
        if not self.dynamic:
            footer = footer_for(new_size, C.TYPE_FIXED, C.NO_DATA_OFFSET, self.footer.unique_id)
            footer = footer.replace(creator_app=self.footer.creator_app if self.footer.sized_by_current_size
                                    else C.CREATOR_APP, original_size=self.footer.original_size)
            self.host.pwrite(new_size, C.encode_footer(footer))
            self.host.flush()
            if new_size > old:
                self.host.punch_hole(old, min(512, new_size - old))
            self.host.truncate(new_size + 512)
            self.host.flush()
            self.footer, self.size, self.footer_pos = footer, new_size, new_size
            return
        self.flush()
        bs = self.cluster_size
        need = -(-new_size // bs)
        n = len(self.bat)
        # zeros beyond the old end, or beyond the new one: the tail of the partial block
        cut = min(old, new_size)
        b = cut // bs
        if cut % bs and b < n and self.bat[b] != C.BAT_UNUSED:
            self.write_zeroes(cut, bs - cut % bs)
        for i in range(need, n):
            if self.bat[i] != C.BAT_UNUSED:
                self.host.punch_hole(self.bat[i] * C.SECTOR, self.stride)
                self.bat[i] = C.BAT_UNUSED
        self.flush()
        dyn = self.dyn
        if need > n:
            budget.charge(5 * (need - n), f"{self.host.name}: the BAT")
            self.bat.extend([C.BAT_UNUSED] * (need - n))
            self.state.extend(bytes(need - n))
            if dyn.table_offset + C.bat_bytes(need) > self._bat_room_end():
                dyn = self._move_bat(need)
        else:
            del self.bat[need:]
            del self.state[need:]
        self._write_bat_entries(range(len(self.bat)), dyn.table_offset)
        self.host.pwrite(dyn.table_offset + 4 * len(self.bat),
                         b"\xff" * (C.bat_bytes(len(self.bat)) - 4 * len(self.bat)))
        dyn = dyn.replace(max_table_entries=need)
        footer = footer_for(new_size, self.footer.disk_type, self.footer.data_offset, self.footer.unique_id)
        footer = footer.replace(original_size=self.footer.original_size)
        self.host.flush()
        self.host.pwrite(self.footer.data_offset, C.encode_dyn_header(dyn))
        self.host.pwrite(0, C.encode_footer(footer))
        self.host.pwrite(self.footer_pos, C.encode_footer(footer))
        self.host.flush()
        self.dyn, self.footer, self.size = dyn, footer, new_size
        self.meta = [(o, ln) for o, ln in self.meta[:2]] + [(dyn.table_offset, 4 * need)] + self.meta[3:]
        if self.differencing and self.backing is not None and new_size > old and self.backing.size > old:
            self.write_zeroes(old, min(new_size, self.backing.size) - old)  # grown space: zeros, not the parent's
            self.flush()

    def _bat_room_end(self) -> int:
        t = self.dyn.table_offset
        starts = [e * C.SECTOR for e in self.bat if e != C.BAT_UNUSED]
        starts += [o for o, _ in self.meta if o > t] + [self.footer_pos]
        return min(s for s in starts if s > t)

    def _move_bat(self, need: int) -> C.DynHeader:
        """Put a BAT of ``need`` entries at the end of the file (its old place is left unused)."""
        p = -(-self.footer_pos // ALIGN) * ALIGN
        room = -(-(C.bat_bytes(need)) // ALIGN) * ALIGN
        self.host.pwrite(p, b"\xff" * room)
        self.footer_pos = p + room
        return self.dyn.replace(table_offset=p)

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
