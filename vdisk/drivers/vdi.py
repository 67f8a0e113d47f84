"""The VDI driver: VirtualBox's Virtual Disk Image, version 1.1.

Written from VirtualBox's public description of the layout; the byte layouts live
in :mod:`vdisk.codec.vdi`, the facts and choices in ``formats/vdi.md``.

What it does
  - dynamic ("normal") and static ("fixed") images: read, write, zeroes and discard
    (holes punched inside allocated blocks; a block is never unmapped, so the host
    blocks stay dense as VirtualBox and QEMU expect), resize (growing within the
    block map's room -- vdisk's own images start their data at 1 MiB, room for
    256 GiB more; shrinking moves the last host blocks into the freed ones);
  - ``create`` with ``-o static=on`` (as qemu-img) for a static image (sparse on the
    host, as qemu-img makes it).

What it refuses: versions other than 1.1, undo and differencing images, sector
sizes other than 512, block sizes that are not a power of two from 4 KiB to 32 MiB
(VirtualBox and QEMU use 1 MiB), extra data before blocks (UnsupportedFeature);
map entries past the image's blocks, pointing past the end of the file or at each
other (CorruptImage).

Crash safety: a new block's data is written at the end of the data area; its map
entry and the header's count of allocated blocks are written by ``flush`` once the
data is durable.  A crash loses the unflushed blocks (their space is reused) and
never leaves an entry pointing at unwritten data.
"""

from __future__ import annotations

import uuid

from .. import budget
from ..codec import vdi as C
from ..errors import CorruptImage, NotSupported, UnsupportedFeature, UsageError
from ..host import HostStorage
from . import register
from .base import (
    BlockDriver,
    CheckResult,
    CreateOptions,
    Extent,
    Status,
    block_pieces,
    on_off,
)
from .vhd.sparse import (
    GRANULE,
    fresh_granules,
    fresh_write,
    host_extents,
    merge_extents,
)

MIN_BLOCK, MAX_BLOCK = 4096, 32 << 20
MAX_BLOCKS = 0xFFFFFFF0
DATA_ALIGN = 1 << 20  # vdisk's images start their data here (as VirtualBox's do): room for the map to grow


@register
class VdiDriver(BlockDriver):
    format_name = "vdi"
    default_cluster_size = C.DEFAULT_BLOCK_SIZE
    #: writing part of a new block reads nothing back (the rest stays a hole), so
    #: ``convert`` need not widen data runs to whole blocks
    fresh_partial_writes = True
    create_options = {
        "static": "on: every block allocated at creation (a VirtualBox \"fixed\" image; sparse on the host, as "
                  "qemu-img makes it); off (the default): a dynamic image",
    }

    def __init__(self, host: HostStorage, read_only: bool):
        self.host = host
        self.read_only = read_only
        self.backing = None
        self.dirty: set[int] = set()
        self.header_dirty = False
        self.fresh: dict[int, bytearray] = {}  # blocks that were holes this session: granules written
        self.touched: set[int] = set()  # blocks whose holes were looked for

    @classmethod
    def probe(cls, head: bytes, tail: bytes = b"") -> bool:
        return head[C.SIGNATURE_OFFSET:C.SIGNATURE_OFFSET + 4] == C.MAGIC

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        extra = dict(opts.extra)
        static = on_off("vdi: static", extra.pop("static", "off"))
        if extra:
            raise UsageError(f"unknown vdi option(s): {', '.join(sorted(extra))} (see -o help)")
        if opts.backing is not None:
            raise UsageError("vdi images cannot have a backing file")
        if opts.compression not in (None, "none"):
            raise UsageError("vdi images cannot be compressed")
        bs = opts.cluster_size or C.DEFAULT_BLOCK_SIZE
        if bs != C.DEFAULT_BLOCK_SIZE:
            raise UsageError("vdi: blocks are 1 MiB (what VirtualBox and qemu-img read)")
        size = -(-size // C.SECTOR) * C.SECTOR
        n = -(-size // bs)
        if n > MAX_BLOCKS:
            raise UsageError(f"vdi: {size} bytes is more than a VDI holds")
        off_data = -(-(C.HEADER_AREA + 4 * n) // DATA_ALIGN) * DATA_ALIGN
        hdr = C.Header(image_type=C.TYPE_FIXED if static else C.TYPE_NORMAL, disk_size=size, block_size=bs,
                       blocks_in_image=n, blocks_allocated=n if static else 0, offset_blocks=C.HEADER_AREA,
                       offset_data=off_data, uuid_image=uuid.uuid4().bytes, uuid_last_snap=uuid.uuid4().bytes,
                       lchs=C.lchs_geometry(size))
        entries = range(n) if static else [C.BLOCK_FREE] * n
        host.pwrite(0, C.encode_header(hdr))
        for i in range(0, n, 1 << 18):  # the map in pieces of 1 MiB
            host.pwrite(C.HEADER_AREA + 4 * i, C.encode_map(entries[i:i + (1 << 18)]))
        host.truncate(off_data + (n * bs if static else 0))
        host.flush()

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> VdiDriver:
        if snapshot is not None:
            raise UsageError("vdi images have no snapshots")
        d = cls(host, read_only)
        d._load()
        return d

    def _load(self) -> None:
        name = self.host.name
        fsize = self.host.size()
        try:
            h = C.decode_header(self.host.pread(0, C.HEADER_AREA) if fsize >= C.HEADER_AREA else
                                self.host.pread(0, fsize))
        except (CorruptImage, UnsupportedFeature) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        if h.image_type not in (C.TYPE_NORMAL, C.TYPE_FIXED):
            what = C.TYPE_NAMES.get(h.image_type)
            raise UnsupportedFeature(f"{name}: VDI image type {h.image_type}"
                                     f"{f' ({what})' if what else ''} is not supported (dynamic and static only)")
        if h.sector_size != C.SECTOR:
            raise UnsupportedFeature(f"{name}: VDI sector size {h.sector_size} is not supported (only 512)")
        bs = h.block_size
        if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise UnsupportedFeature(f"{name}: VDI block size {bs} is not supported (a power of two from 4 KiB "
                                     "to 32 MiB)")
        if h.block_extra:
            raise UnsupportedFeature(f"{name}: VDI blocks with {h.block_extra} bytes of extra data are not "
                                     "supported")
        n = h.blocks_in_image
        if n > MAX_BLOCKS or n * bs < h.disk_size:
            raise CorruptImage(f"{name}: {n} blocks of {bs} bytes cannot hold the disk's {h.disk_size} bytes")
        if h.blocks_allocated > n:
            raise CorruptImage(f"{name}: the header counts {h.blocks_allocated} allocated blocks of {n}")
        if h.offset_blocks % C.SECTOR or h.offset_data % C.SECTOR:
            raise CorruptImage(f"{name}: the block map ({h.offset_blocks}) or the data ({h.offset_data}) does not "
                               "start on a 512-byte boundary")
        if h.offset_blocks < 0x48 + h.header_size or h.offset_data < h.offset_blocks + 4 * n:
            raise CorruptImage(f"{name}: the block map ({n} entries at {h.offset_blocks}) overlaps the header or "
                               f"the data at {h.offset_data}")
        if h.offset_blocks + 4 * n > fsize:
            raise CorruptImage(f"{name}: the block map ({n} entries at {h.offset_blocks}) lies past the end of "
                               f"the file ({fsize} bytes)")
        budget.charge(5 * n, f"{name}: the block map")
        self.hdr = h
        self.size = h.disk_size // C.SECTOR * C.SECTOR
        self.cluster_size = bs
        self.bmap = C.decode_map(self.host.pread(h.offset_blocks, 4 * n), n)
        seen = bytearray(n)
        top, used = -1, 0
        limit = (fsize - h.offset_data) // bs if fsize >= h.offset_data else 0
        for i, e in enumerate(self.bmap):
            if e >= C.BLOCK_ZERO:
                continue
            if e >= n:
                raise CorruptImage(f"{name}: block map entry {i} names host block {e}, past the image's {n} blocks")
            if e >= limit:
                raise CorruptImage(f"{name}: block map entry {i} (guest offset {i * bs}) points past the end of "
                                   f"the file")
            if seen[e]:
                raise CorruptImage(f"{name}: block map entry {i} names host block {e}, which another entry "
                                   "names too")
            seen[e] = 1
            used += 1
            top = max(top, e)
        self.used = used
        self.next = top + 1  # new blocks go after the last one, whatever the header counts
        if not self.read_only:
            end = h.offset_data + self.next * bs
            if fsize > end:
                self.host.truncate(end)  # blocks of writes a crash interrupted before their flush
            if h.blocks_allocated != used and used == self.next:
                self.header_dirty = True
                self.flush()

    def close(self) -> None:
        if self.host is None:
            return
        try:
            if not self.read_only:
                self.flush()
        finally:
            self.host.close()

    # ------------------------------------------------------------------ data path
    def _pieces(self, offset: int, length: int):
        return block_pieces(offset, length, self.cluster_size)

    def _at(self, e: int) -> int:
        return self.hdr.offset_data + e * self.cluster_size

    def read(self, offset: int, length: int) -> bytes:
        """Pieces in consecutive host blocks are read with one pread (no copy to join them)."""
        out = []
        run_at, run_n = -1, 0  # the pending host range
        zeros = 0  # the pending run of zeros
        for b, within, _pos, n in self._pieces(offset, length):
            e = self.bmap[b]
            if e >= C.BLOCK_ZERO:
                if run_n:
                    out.append(self.host.pread(run_at, run_n))
                    run_n = 0
                zeros += n
                continue
            if zeros:
                out.append(bytes(zeros))
                zeros = 0
            at = self._at(e) + within
            if run_n and run_at + run_n == at:
                run_n += n
                continue
            if run_n:
                out.append(self.host.pread(run_at, run_n))
            run_at, run_n = at, n
        if run_n:
            out.append(self.host.pread(run_at, run_n))
        if zeros:
            out.append(bytes(zeros))
        return out[0] if len(out) == 1 else b"".join(out)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for b, within, pos, n in self._pieces(offset, len(data)):
            e = self.bmap[b]
            if e >= C.BLOCK_ZERO:
                e = self._allocate(b)
            piece = data if n == len(data) else view[pos - offset:pos - offset + n]
            fresh = fresh_granules(self, b, self._at(e))
            if fresh is not None:
                fresh_write(self.host, self._at(e), fresh, within, piece)
            else:
                self.host.pwrite(self._at(e) + within, piece)

    def _allocate(self, b: int) -> int:
        """A new host block for guest block ``b``, after the last one: beyond the end of
        the file, so it reads as zeros until written."""
        e = self.next
        self.next += 1
        self.used += 1
        self.bmap[b] = e
        self.fresh[b] = bytearray(-(-self.cluster_size // GRANULE))
        self.dirty.add(b)
        self.header_dirty = True
        return e

    def write_zeroes(self, offset: int, length: int) -> None:
        for b, within, _pos, n in self._pieces(offset, length):
            e = self.bmap[b]
            if e < C.BLOCK_ZERO:
                self.host.punch_hole(self._at(e) + within, n)

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        if self.read_only:
            return
        if not (self.dirty or self.header_dirty):
            self.host.flush()
            return
        end = self._at(self.next)
        if self.host.size() < end:
            self.host.truncate(end)  # the last block's unwritten tail: zeros, as a hole
        self.host.flush()  # the data first: no entry may point at unwritten data
        self._write_entries(self.dirty)
        self.dirty.clear()
        self.hdr = self.hdr.replace(blocks_allocated=self.used)
        self.host.pwrite(0, C.encode_header(self.hdr))
        self.header_dirty = False
        self.host.flush()

    def _write_entries(self, which) -> None:
        for s in sorted({i // 128 for i in which}):
            lo, hi = s * 128, min((s + 1) * 128, len(self.bmap))
            self.host.pwrite(self.hdr.offset_blocks + 4 * lo, C.encode_map(self.bmap[lo:hi]))

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for b, within, pos, n in self._pieces(offset, length):
            e = self.bmap[b]
            if e >= C.BLOCK_ZERO:
                out.append(Extent(pos, n, Status.ZERO))
            else:
                out += host_extents(self.host, pos, self._at(e) + within, n)
        return merge_extents(out)

    # ------------------------------------------------------------------ resize
    def resize(self, new_size: int) -> None:
        new_size = -(-new_size // C.SECTOR) * C.SECTOR
        bs = self.cluster_size
        h = self.hdr
        need = -(-new_size // bs)
        room = (h.offset_data - h.offset_blocks) // 4
        if need > room:
            raise UsageError(f"vdi: {self.host.name} has room in its block map for {room} blocks "
                             f"({room * bs} bytes); convert it to grow it further")
        self.flush()
        old, n = self.size, len(self.bmap)
        cut = min(old, new_size)
        b = cut // bs
        if cut % bs and b < n and self.bmap[b] < C.BLOCK_ZERO:
            self.host.punch_hole(self._at(self.bmap[b]) + cut % bs, bs - cut % bs)
        drop = [i for i in range(need, n) if self.bmap[i] < C.BLOCK_ZERO]
        if drop:
            self._drop(drop)
        if need > n:
            budget.charge(5 * (need - n), f"{self.host.name}: the block map")
            self.bmap.extend([C.BLOCK_FREE] * (need - n))
        else:
            del self.bmap[need:]
        self._write_entries(range(len(self.bmap)))
        self.host.flush()
        self.hdr = self.hdr.replace(disk_size=new_size, blocks_in_image=need, blocks_allocated=self.used,
                                    lchs=C.lchs_geometry(new_size))
        self.host.pwrite(0, C.encode_header(self.hdr))
        self.host.truncate(self._at(self.next))
        self.host.flush()
        self.size = new_size

    def _drop(self, drop: list[int]) -> None:
        """Free the host blocks of guest blocks ``drop``, then move the host blocks past
        the new count into the freed places so that the host blocks stay dense.  Three
        durable steps: the entries freed; the blocks copied; the entries repointed --
        no entry ever points at data that is not its own."""
        for i in drop:
            self.bmap[i] = C.BLOCK_FREE
            self.fresh.pop(i, None)
        self._write_entries(drop)
        self.host.flush()
        owner = {e: i for i, e in enumerate(self.bmap) if e < C.BLOCK_ZERO}
        k = len(owner)
        movers = sorted(h for h in owner if h >= k)
        holes = [h for h in range(k) if h not in owner][:len(movers)]
        bs = self.cluster_size
        for src, dst in zip(movers, holes):
            for off in range(0, bs, 1 << 20):
                n = min(1 << 20, bs - off)
                self.host.pwrite(self._at(dst) + off, self.host.pread(self._at(src) + off, n))
        self.host.flush()
        moved = []
        for src, dst in zip(movers, holes):
            self.bmap[owner[src]] = dst
            moved.append(owner[src])
        self._write_entries(moved)
        self.host.flush()
        self.used = self.next = k

    def set_backing(self, ref) -> None:
        if ref is not None:
            raise NotSupported("vdi images cannot have a backing file")

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict:
        h = self.hdr
        return {"subformat": C.TYPE_NAMES.get(h.image_type, str(h.image_type)), "block_size": h.block_size,
                "blocks": h.blocks_in_image, "allocated_blocks": self.used,
                "uuid": str(uuid.UUID(bytes_le=h.uuid_image))}

    def check(self, *, repair: str | None = None) -> CheckResult:
        """Everything ``open`` checks (it refuses a damaged map), plus the header's
        count of allocated blocks and host blocks no entry names (leaks)."""
        res = CheckResult(checked_clusters=len(self.bmap), allocated_clusters=self.used)
        if self.hdr.blocks_allocated != self.used and not self.dirty:
            if repair and not self.read_only and self.used == self.next:
                self.header_dirty = True
                self.flush()
                res.repaired.append("the header's count of allocated blocks")
            else:
                res.leaks.append(f"the header counts {self.hdr.blocks_allocated} allocated blocks, the map "
                                 f"{self.used}")
        if self.next != self.used:
            res.leaks.append(f"{self.next - self.used} host blocks before the last one are named by no entry")
            res.leaked_clusters = self.next - self.used
        return res
