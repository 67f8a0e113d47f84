"""The VHDX driver: Hyper-V's format ([MS-VHDX] v1.00), dynamic and fixed disks.

Byte layouts live in :mod:`vdisk.codec.vhdx`; ``formats/vhdx.md`` says what vdisk
reads, writes and refuses, and why.

What it does
  - reads dynamic and fixed disks: the current of the two headers, the region
    table, the metadata items, the BAT with its sector-bitmap entries interleaved
    every ``chunk_ratio`` payload entries (:mod:`.load` checks every field);
  - replays the log on open ([MS-VHDX], "Log"; :mod:`.log`): read-write, into the
    file -- after checking that the replayed state is a valid image, so a log that
    would leave a corrupt one is refused before anything is written -- after which
    both headers are rewritten with a zero log GUID; read-only, in memory (the file
    is not touched, and reads see the replayed state).
    QEMU refuses a read-only open of such an image instead; vdisk replays in memory
    because a read-only open must not change the file, yet ``info``/``convert``/
    ``compare`` of an image Hyper-V did not close cleanly should still work and
    read what Hyper-V would;
  - writes them: a write into an allocated block goes in place; a write into a
    block that is not allocated (and is not all zeros, which such a block already
    reads as) allocates a whole block at the 1 MiB-aligned end of the file;
  - ``create``: subformat dynamic (the default) or fixed, ``block_size``,
    ``log_size``, ``logical_sector_size``.

Crash safety of writes (the log is not used for them; it stays empty): new BAT
entries are held in memory and written by ``flush`` only after the data they point
at has been flushed, then flushed themselves.  A power cut thus leaves every BAT
entry pointing at data that reached the disk, or at nothing (the block reads as it
did); the cost of a cut is leaked space at the end of the file.  Each entry lies
in one 512-byte sector of the BAT, so a torn sector write cannot mix an entry's
old and new bytes.  Before the first change after an open, the non-current header
is rewritten with new FileWriteGuid and DataWriteGuid and a higher sequence number,
and flushed, as the spec asks.

  - ``resize`` (grow and shrink; :mod:`.resize`).

  - reads differencing disks as the top of a backing chain: the parent locator's
    ``relative_path`` becomes the backing reference (format vhdx), followed under
    the one backing-reference policy of :func:`vdisk.open`; blocks not present
    come from the parent, partially present ones sector by sector from the
    chunk's sector bitmap; the locator's ``parent_linkage`` must be the parent's
    DataWriteGuid (``verify_backing``).

What it refuses: writing differencing disks, parents named only by absolute
Windows paths, unknown required regions and metadata items (UnsupportedFeature),
snapshots, and creating an image with a backing file (NotSupported / UsageError).
"""

from __future__ import annotations

import uuid

from ...codec import vhdx as V
from ...errors import (
    BackingError,
    CorruptImage,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from ...host import HostStorage
from ...zeros import is_zero_at, zero_runs
from .. import register
from ..base import (
    BackingRef,
    BlockDriver,
    CheckResult,
    CreateOptions,
    Extent,
    Status,
    block_pieces,
)
from ..vhd.sparse import host_extents
from . import log as L
from .create import CREATE_OPTIONS, create_image
from .load import bat_bytes, load_headers, load_layout

_ZERO_STATES = (V.PAYLOAD_ZERO, V.PAYLOAD_UNMAPPED, V.PAYLOAD_UNDEFINED)
_GRANULE = 4096


@register
class VhdxDriver(BlockDriver):
    format_name = "vhdx"
    default_cluster_size = 32 << 20
    create_options = CREATE_OPTIONS
    #: writing part of a new block reads nothing back (the rest stays a hole), so
    #: ``convert`` need not widen data runs to whole 32 MiB blocks
    fresh_partial_writes = True

    def __init__(self, host: HostStorage, store: HostStorage, layout, read_only: bool, log_state: str):
        self.host = host  # the file
        self.store = store  # what reads see: the file, or the file with the log overlaid
        self.layout = layout
        self.read_only = read_only
        self.size = layout.virtual_size
        self.cluster_size = layout.block_size
        self.backing = None
        self.image_id = layout.disk_id.hex
        self.log_state = log_state
        self._bat = layout.bat
        self._dirty_bat: set[int] = set()
        self._headers_updated = False
        self._end = self._file_end()
        self._bitmaps: dict[int, bytes] = {}  # payload block -> its bits of the sector bitmap
        if layout.has_parent:
            self.backing_ref = BackingRef(layout.parent_path, "vhdx")

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head[:8] == V.FILE_SIGNATURE

    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        create_image(host, size, opts)

    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> VhdxDriver:
        if snapshot is not None:
            raise UsageError(f"{host.name}: vhdx images have no internal snapshots")
        try:
            return cls._open(host, read_only)
        except VdiskError as exc:
            # the layers below say "vhdx: ..."; the user needs to know which file
            if not exc.message.startswith(host.name):
                exc.message = f"{host.name}: {exc.message}"
                exc.args = (exc.message,)
            raise

    @classmethod
    def _open(cls, host: HostStorage, read_only: bool) -> VhdxDriver:
        size = host.size()
        hdr, slot = load_headers(host, size)
        store = host
        state = "clean"
        writes: list = []
        if hdr.log_guid != V.ZERO_GUID and hdr.log_length:
            writes, last = L.scan(host, hdr, size)
            if writes:
                store = L.Overlay(host, writes, last)
                state = "replayed in memory"
        layout = load_layout(store, hdr, slot, store.size())  # the replayed state, checked before any write
        if layout.has_parent and not read_only:
            raise UnsupportedFeature("vhdx: writing differencing disks is not supported (they are read-only "
                                     "in vdisk; convert the chain to write it)")
        if not read_only and hdr.log_guid != V.ZERO_GUID:
            if writes:
                L.replay(host, writes, last)
                store, state = host, "replayed"
            hdr, slot = _rewrite_headers(host, hdr, slot, V.ZERO_GUID, new_file_guid=True)
            layout = load_layout(store, hdr, slot, store.size())
        drv = cls(host, store, layout, read_only, state)
        drv._headers_updated = not read_only and state != "clean"
        return drv

    def verify_backing(self, backing: BlockDriver) -> None:
        """A differencing disk's ``parent_linkage`` must be its parent's DataWriteGuid:
        a parent written since the child was made no longer holds what the child was
        made on, and reading the pair would give a mix of old and new data
        (``BackingError``).  Checked only when the locator has a linkage and the
        parent is a VHDX disk."""
        linkage = self.layout.parent_linkage
        if linkage is None or not isinstance(backing, VhdxDriver):
            return
        want = linkage.strip().strip("{}").lower()
        have = str(backing.layout.header.data_write_guid)
        if want != have:
            raise BackingError(f"vhdx: the parent was changed since this differencing disk was made (its "
                               f"DataWriteGuid is {have}, the parent locator names {want})")

    def attach_backing(self, backing) -> None:
        """As the base class; also :meth:`verify_backing`, for a chain layer that does
        not call it itself (the parent's driver is reached through the reader's image)."""
        super().attach_backing(backing)
        parent = getattr(getattr(backing, "_image", None), "driver", None)
        if parent is not None:
            self.verify_backing(parent)

    def close(self) -> None:
        try:
            if not self.read_only and self.host.flush_failed is None:
                self.flush()
        finally:
            self.store.close()

    # ------------------------------------------------------------------ helpers
    def _file_end(self) -> int:
        end = self.store.size()
        step = self.layout.chunk_ratio + 1
        for i, v in enumerate(self._bat):
            if ((i + 1) % step or self.layout.has_parent) and v & V.BAT_STATE_MASK in (6, 7):
                end = max(end, ((v >> V.BAT_OFFSET_SHIFT) << 20) + self.cluster_size)
        return -(-end // V.MiB) * V.MiB

    def _entry(self, block: int) -> tuple[int, int]:
        v = self._bat[V.bat_index(block, self.layout.chunk_ratio)]
        return v & V.BAT_STATE_MASK, (v >> V.BAT_OFFSET_SHIFT) << 20

    def _pieces(self, offset: int, length: int):
        return block_pieces(offset, length, self.cluster_size)

    # ------------------------------------------------------------------ data path
    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for block, within, pos, n in self._pieces(offset, length):
            state, off = self._entry(block)
            if state == V.PAYLOAD_FULLY_PRESENT:
                out += self.store.pread(off + within, n)
            elif state == V.PAYLOAD_NOT_PRESENT and self.backing is not None:
                out += self.backing.read(pos, n)
            elif state == V.PAYLOAD_PARTIALLY_PRESENT:
                for a, b, own in self._runs(block, within, n):
                    base = block * self.cluster_size
                    if own:
                        out += self.store.pread(off + a, b - a)
                    elif self.backing is not None:
                        out += self.backing.read(base + a, b - a)
                    else:
                        out += bytes(b - a)
            else:
                out += bytes(n)
        return bytes(out)

    def _runs(self, block: int, within: int, n: int):
        """(start, end, in this disk?) runs of ``[within, within+n)`` of a partially present
        block, from its sector bitmap: bit ``s % 8`` of byte ``s // 8`` is sector ``s``."""
        bits = self._bitmaps.get(block)
        lay = self.layout
        lss = lay.logical_sector_size
        if bits is None:
            spb = self.cluster_size // lss
            ratio = lay.chunk_ratio
            v = self._bat[(block // ratio) * (ratio + 1) + ratio]
            sb_off = (v >> V.BAT_OFFSET_SHIFT) << 20
            bits = self.store.pread(sb_off + (block % ratio) * spb // 8, spb // 8)
            if len(self._bitmaps) > 4096:
                self._bitmaps.clear()
            self._bitmaps[block] = bits
        pos, end = within, within + n
        while pos < end:
            s = pos // lss
            own = bool(bits[s >> 3] >> (s & 7) & 1)
            nxt = (s + 1) * lss
            while nxt < end and bool(bits[(nxt // lss) >> 3] >> ((nxt // lss) & 7) & 1) == own:
                nxt += lss
            nxt = min(nxt, end)
            yield pos, nxt, own
            pos = nxt

    def write(self, offset: int, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        for block, within, pos, n in self._pieces(offset, len(data)):
            a = pos - offset
            state, off = self._entry(block)
            fresh = False
            if state != V.PAYLOAD_FULLY_PRESENT:
                if is_zero_at(data, a, n):
                    continue  # the block reads as zeros already
                off = self._allocate(block)
                fresh = True
            self._before_change()
            self._write_sparse(off + within, data, a, a + n, fresh)

    def _write_sparse(self, at: int, data: bytes, start: int, end: int, fresh: bool) -> None:
        """pwrite ``data[start:end]`` at file offset ``at``, leaving out the 4 KiB granules
        that are all zeros where the file holds zeros already (a block allocated just
        now, which is a hole, or zeros read back), so that converting a disk with runs
        of zeros keeps the file sparse, as qemu-img's does."""
        skips = zero_runs(data, start, end, at - start, _GRANULE)  # no Python step per granule
        if not fresh:
            skips = [r for a, b in skips for r in self._file_zeros(at - start, a, b)]
        view = memoryview(data)
        pos = start  # the start of what is not written yet
        for a, b in skips:
            if a > pos:
                self.host.pwrite(at + pos - start, view[pos:a])
            pos = b
        if pos < end:
            self.host.pwrite(at + pos - start, view[pos:end])

    def _file_zeros(self, shift: int, a: int, b: int) -> list[tuple[int, int]]:
        """The runs of whole granules of ``[a, b)`` (file offset ``shift + a`` on) where
        the file reads as zeros (what it does not hold counts as not zero)."""
        old = self.host.pread(shift + a, b - a)
        if len(old) < b - a:
            old += b"\x01" * (b - a - len(old))
        return [(a + x, a + y) for x, y in zero_runs(old, 0, b - a, shift + a, _GRANULE)]

    def _before_change(self) -> None:
        if self._headers_updated:
            return
        hdr, slot = _rewrite_headers(self.host, self.layout.header, self.layout.header_slot, V.ZERO_GUID,
                                     new_file_guid=True)
        self.layout.header, self.layout.header_slot = hdr, slot
        self._headers_updated = True

    def _allocate(self, block: int) -> int:
        self._before_change()
        off = self._end
        if off + self.cluster_size > V.MAX_VIRTUAL_SIZE * 2:
            raise CorruptImage("vhdx: the file would grow past what the BAT can address")
        self.host.truncate(off + self.cluster_size)
        self._end = off + self.cluster_size
        i = V.bat_index(block, self.layout.chunk_ratio)
        self._bat[i] = V.make_bat_entry(V.PAYLOAD_FULLY_PRESENT, off)
        self._dirty_bat.add(i)
        return off

    def flush(self) -> None:
        if self.read_only:
            return
        self.host.flush()  # the data new BAT entries point at is on disk before they are
        if self._dirty_bat:
            for first in sorted({i - i % 512 for i in self._dirty_bat}):
                count = min(512, len(self._bat) - first)
                self.host.pwrite(self.layout.bat_offset + first * 8, bat_bytes(self._bat, first, count))
            self._dirty_bat.clear()
            self.host.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        holes = self.store is self.host  # (not through a log replayed in memory)
        for block, within, pos, n in self._pieces(offset, length):
            state, off = self._entry(block)
            if state == V.PAYLOAD_FULLY_PRESENT and holes:
                # ZERO over the file's holes in the block (SEEK_HOLE), as the VHD and VDI
                # drivers do: convert then neither reads nor checks them
                for e in host_extents(self.host, pos, off + within, n):
                    self._append_merged(out, e)
                continue
            if state == V.PAYLOAD_FULLY_PRESENT:
                e = Extent(pos, n, Status.DATA, host_offset=off + within)
            elif state == V.PAYLOAD_PARTIALLY_PRESENT:
                base = block * self.cluster_size
                for a, b, own in self._runs(block, within, n):
                    sub = Extent(base + a, b - a, Status.DATA if own else Status.UNALLOCATED,
                                 host_offset=off + a if own else None)
                    out.append(sub)
                continue
            elif state in _ZERO_STATES:
                e = Extent(pos, n, Status.ZERO)
            else:
                e = Extent(pos, n, Status.UNALLOCATED)
            self._append_merged(out, e)
        return out

    @staticmethod
    def _append_merged(out: list[Extent], e: Extent) -> None:
        """Append ``e``, merged into the last extent if of the same status and (for
        data) contiguous in the file."""
        if out and out[-1].status == e.status and out[-1].end == e.offset and (
                e.host_offset is None or out[-1].host_offset + out[-1].length == e.host_offset):
            p = out[-1]
            out[-1] = Extent(p.offset, p.length + e.length, p.status, p.host_offset)
        else:
            out.append(e)

    def resize(self, new_size: int) -> None:
        """See :mod:`.resize`."""
        from .resize import resize

        resize(self, new_size)

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict:
        lay = self.layout
        return {
            "vhdx-subformat": "differencing" if lay.has_parent else "fixed" if lay.leave_blocks_allocated
            else "dynamic",
            "vhdx-block-size": lay.block_size,
            "vhdx-logical-sector-size": lay.logical_sector_size,
            "vhdx-physical-sector-size": lay.physical_sector_size,
            "vhdx-log-size": lay.header.log_length,
            "vhdx-log": self.log_state,
            "vhdx-disk-id": str(lay.disk_id),
        }

    def check(self, *, repair: str | None = None) -> CheckResult:
        """Every structure was checked when the image was opened (:mod:`.load`): a
        damaged image does not open.  This counts the allocated blocks."""
        res = CheckResult()
        blocks = -(-self.size // self.cluster_size)
        res.checked_clusters = blocks
        res.allocated_clusters = sum(self._entry(b)[0] == V.PAYLOAD_FULLY_PRESENT for b in range(blocks))
        return res


def _rewrite_headers(host: HostStorage, hdr: V.Header, slot: int, log_guid: uuid.UUID, *,
                     new_file_guid: bool) -> tuple[V.Header, int]:
    """Write the non-current header slot with ``log_guid``, new write GUIDs and the
    next sequence number, flush, then the other slot the same way (both stay valid);
    returns the new current header and its slot."""
    if hdr.sequence_number > (1 << 64) - 3:
        raise CorruptImage(f"vhdx: header sequence number {hdr.sequence_number} cannot be advanced")
    fw = uuid.uuid4() if new_file_guid else hdr.file_write_guid
    cur = hdr
    for _ in range(2):
        slot = 1 - slot
        cur = V.Header(cur.sequence_number + 1, fw, uuid.uuid4() if cur is hdr else cur.data_write_guid,
                       log_guid, 0, 1, hdr.log_length, hdr.log_offset)
        host.pwrite(V.HEADER_OFFSETS[slot], V.encode_header(cur))
        host.flush()
    return cur, slot
