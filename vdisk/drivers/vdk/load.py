"""Opening and creating a vdk image: the header choice, then loading and validating
every table it references before anything uses it (DESIGN.md, property 6).

Contract.  ``open`` reads both header slots, makes the newest valid one current
(never falling back to an older slot when the current one fails a check), then
validates every header field and table bound: a malformed image raises a named
``CorruptImage`` / ``UnsupportedFeature`` with the file's name, never a huge
allocation (``budget.charge`` accounts for every table held in memory).  After it
returns, ``header``, ``size``, ``snapshots`` and the L1 arrays describe the chosen
root (the live state or one snapshot, then read-only); a writable image also has
its refcounts and refcount table loaded.  Tables below the L1 (L2 tables, data)
are read and validated lazily, by :mod:`.tables` and :mod:`.io`.

``_read_checked`` is the one way metadata is read: bounds first, then the
checksum.  ``create`` writes the first header through the ordinary commit
(:mod:`.txn`), so a new image is made exactly as every later generation is.
"""

from __future__ import annotations

import array
import uuid
from typing import TYPE_CHECKING

from ... import budget
from ...codec import vdk as C
from ...errors import CorruptImage, UnsupportedFeature, UsageError
from ...host import HostStorage
from ..base import CreateOptions

if TYPE_CHECKING:
    from . import VdkDriver

MAX_L1_BYTES = 32 << 20  # implementation limit: L1 tables up to 32 MiB (2 Mi entries)


class LoadMixin:
    """open, create, and the loading and validation of the header and the tables it names."""

    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        cs = opts.cluster_size or cls.default_cluster_size
        if cs & (cs - 1) or not 1 << C.MIN_CLUSTER_BITS <= cs <= 1 << C.MAX_CLUSTER_BITS:
            raise UsageError(f"cluster size {cs} must be a power of two from 4 KiB to 2 MiB")
        cbits = cs.bit_length() - 1
        comp = {None: C.COMPRESSION_NONE, "none": C.COMPRESSION_NONE, "off": C.COMPRESSION_NONE,
                "zstd": C.COMPRESSION_ZSTD}.get(opts.compression)
        if comp is None:
            raise UsageError(f"unknown compression {opts.compression!r} for vdk (none or zstd)")
        extra = dict(opts.extra)
        prealloc = extra.pop("preallocation", "off")
        if prealloc != "off":
            raise UsageError(f"vdk: preallocation={prealloc} is not supported: vdk writes every change to a "
                             "new cluster (copy-on-write), so space reserved now would never be written in place")
        try:
            level = int(extra.pop("compression_level", 3))
        except ValueError:
            raise UsageError("compression_level must be a whole number from -7 to 19") from None
        if not -7 <= level <= 19:
            raise UsageError("compression_level must be from -7 to 19")
        if extra:
            raise UsageError(f"unknown vdk option(s): {', '.join(sorted(extra))}")
        cls._check_size(size, cbits)
        ref = opts.backing
        hdr = C.Header(generation=1, cluster_bits=cbits, virtual_size=size, compression_type=comp,
                       compression_level=level, incompatible_features=C.INCOMPAT_IDENTITY,
                       image_id=bytes.fromhex(opts.image_id) if opts.image_id else uuid.uuid4().bytes,
                       backing_name=ref.filename if ref else "", backing_format=ref.format if ref else "",
                       backing_snapshot=(ref.snapshot or "") if ref else "")
        try:
            hdr.encode()
        except ValueError as exc:
            raise UsageError(f"backing reference: {exc}") from None
        reserved = (C.HEADER_AREA + cs - 1) // cs
        host.truncate(reserved * cs)
        drv = cls(host, hdr, read_only=False)
        drv.slot = 1  # the first commit flips to slot 0
        drv.txn.rc = array.array("I", [1] * reserved)
        drv.txn.host_clusters = reserved
        drv.txn.l1_off = array.array("Q", bytes(8 * C.l1_entries_for(size, cbits)))
        drv.txn.l1_sum = array.array("Q", drv.txn.l1_off)
        drv.txn.l1_dirty = True
        drv.txn.snap_dirty = True
        drv.txn.rc_dirty = set(range((reserved + drv.rc_per_block - 1) // drv.rc_per_block))
        drv._commit(force=True)

    @staticmethod
    def _check_size(size: int, cbits: int) -> None:
        if size < 0 or size > C.MAX_VIRTUAL_SIZE:
            raise UsageError(f"virtual size {size} is out of range")
        if C.l1_entries_for(size, cbits) * C.L1_ENTRY_SIZE > MAX_L1_BYTES:
            limit = MAX_L1_BYTES // C.L1_ENTRY_SIZE * C.l2_entries(cbits) << cbits
            raise UsageError(f"virtual size {size} is too large for {1 << cbits}-byte clusters (limit {limit} bytes)")

    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> VdkDriver:
        head = host.pread(0, C.HEADER_AREA)
        hdr, slot = cls._pick_header(head, host.name)
        if not C.MIN_CLUSTER_BITS <= hdr.cluster_bits <= C.MAX_CLUSTER_BITS:
            raise CorruptImage(f"{host.name}: cluster_bits {hdr.cluster_bits} out of range "
                               f"({C.MIN_CLUSTER_BITS}..{C.MAX_CLUSTER_BITS})")
        if not -7 <= hdr.compression_level <= 22:
            raise CorruptImage(f"{host.name}: compression level {hdr.compression_level} out of range")
        if hdr.incompatible_features & C.INCOMPAT_CORRUPT and not read_only:
            raise CorruptImage(f"{host.name}: image is marked corrupt; it can only be opened read-only (vdisk check)")
        drv = cls(host, hdr, read_only=read_only or snapshot is not None)
        drv.slot = slot
        drv._load(snapshot)
        return drv

    @staticmethod
    def _pick_header(head: bytes, name: str) -> tuple[C.Header, int]:
        """The current header and the index of its slot: of the valid slots (magic,
        length, checksum), the one with the highest generation.  Only that one is then
        decoded and checked; an older slot may hold anything, and a current header that
        fails a check is an error, never a reason to fall back to the older one."""
        gens = [C.slot_generation(head[off:off + C.SLOT_SIZE]) for off in C.SLOT_OFFSETS]
        valid = [(g, i) for i, g in enumerate(gens) if g is not None]
        if not valid:
            if head[:8] != C.MAGIC and head[C.SLOT_SIZE:C.SLOT_SIZE + 8] != C.MAGIC:
                raise CorruptImage(f"{name}: not a vdk image (bad magic)")
            raise CorruptImage(f"{name}: no valid header slot (both fail their checksum or length)")
        _gen, slot = max(valid, key=lambda v: (v[0], -v[1]))
        off = C.SLOT_OFFSETS[slot]
        try:
            return C.Header.decode(head[off:off + C.SLOT_SIZE]), slot
        except (CorruptImage, UnsupportedFeature) as exc:
            raise type(exc)(f"{name}: {exc}") from None

    def _load(self, snapshot: str | None) -> None:
        h = self.header
        if not C.MIN_CLUSTER_BITS <= h.cluster_bits <= C.MAX_CLUSTER_BITS:
            raise self._corrupt(f"cluster_bits {h.cluster_bits} out of range ({C.MIN_CLUSTER_BITS}..{C.MAX_CLUSTER_BITS})")
        if h.compression_type not in C.COMPRESSION_NAMES:
            raise self._corrupt(f"unknown compression type {h.compression_type}")
        file_size = self.host.size()
        cs = self.cluster_size
        reserved = (C.HEADER_AREA + cs - 1) // cs
        if h.host_clusters < reserved or h.host_clusters * cs > file_size:
            raise self._corrupt(
                f"header says the image holds {h.host_clusters} clusters but the file has {file_size} bytes "
                "(truncated image?)")
        if h.virtual_size > C.MAX_VIRTUAL_SIZE:
            raise self._corrupt(f"virtual size {h.virtual_size} is out of range")
        try:
            self._check_size(h.virtual_size, h.cluster_bits)
        except UsageError as exc:  # a valid image past this implementation's L1 limit
            raise UnsupportedFeature(f"{self.name}: {exc}") from None
        if h.next_snapshot_id >= 1 << 63:
            raise self._corrupt("next snapshot id out of range")
        self.snapshots = self._load_snapshot_table()
        if snapshot is None:
            self._load_l1(h.l1_offset, h.l1_entries, h.l1_checksum, h.virtual_size, "live L1 table")
        else:
            rec = self._find_snapshot(snapshot, include_hidden=snapshot.startswith("#"))
            self._load_l1(rec.l1_offset, rec.l1_entries, rec.l1_checksum, rec.virtual_size,
                          f"L1 table of snapshot {rec.name!r}")
            self.size = rec.virtual_size
            self.viewing = rec
        if not self.read_only:
            self._load_refcounts()

    def _check_run(self, offset: int, nbytes: int, what: str) -> None:
        cs = self.cluster_size
        if offset % cs or offset < C.HEADER_AREA:
            raise self._corrupt(f"{what} offset {offset:#x} is not cluster-aligned past the header")
        if offset + nbytes > self.txn.host_clusters * cs:
            raise self._corrupt(f"{what} at {offset:#x}+{nbytes} lies past the end of the image")

    def _read_checked(self, offset: int, nbytes: int, csum: int, what: str) -> bytes:
        self._check_run(offset, nbytes, what)
        buf = self.host.pread(offset, nbytes)
        if C.checksum(buf) != csum:
            raise self._corrupt(f"{what} at {offset:#x} fails its checksum")
        return buf

    def _load_l1(self, offset: int, n: int, csum: int, vsize: int, what: str) -> None:
        if n != C.l1_entries_for(vsize, self.cbits):
            raise self._corrupt(f"{what} has {n} entries; a {vsize}-byte disk needs {C.l1_entries_for(vsize, self.cbits)}")
        if n == 0:
            if offset:
                raise self._corrupt(f"{what} is empty but has an offset")
            self.txn.l1_off, self.txn.l1_sum = array.array("Q"), array.array("Q")
            return
        budget.charge(n * C.L1_ENTRY_SIZE * 2, f"{self.name}: {what} ({n} entries)")  # the buffer and the arrays
        buf = self._read_checked(offset, n * C.L1_ENTRY_SIZE, csum, what)
        offs, sums = C.decode_l1(buf, n)
        limit = self.txn.host_clusters * self.cluster_size
        for i, o in enumerate(offs):
            if o and (o % self.cluster_size or o < C.HEADER_AREA or o + self.cluster_size > limit):
                raise self._corrupt(f"{what} entry {i} points at {o:#x}, outside the image or unaligned")
        self.txn.l1_off, self.txn.l1_sum = offs, sums

    def _load_snapshot_table(self) -> list[C.SnapshotRecord]:
        h = self.header
        if h.snapshot_count > C.MAX_SNAPSHOTS:
            raise self._corrupt(f"snapshot count {h.snapshot_count} exceeds the limit of {C.MAX_SNAPSHOTS}")
        if h.snapshot_table_length > C.MAX_SNAPSHOT_TABLE:
            raise self._corrupt(f"snapshot table length {h.snapshot_table_length} exceeds {C.MAX_SNAPSHOT_TABLE}")
        if h.snapshot_count == 0:
            if h.snapshot_table_length or h.snapshot_table_offset:
                raise self._corrupt("empty snapshot table has a length or offset")
            return []
        budget.charge(h.snapshot_table_length * 3, f"{self.name}: snapshot table")  # the bytes and the records
        buf = self._read_checked(h.snapshot_table_offset, h.snapshot_table_length, h.snapshot_table_checksum,
                                 "snapshot table")
        recs = C.decode_snapshot_table(buf, h.snapshot_count,
                                       identity=bool(h.incompatible_features & C.INCOMPAT_IDENTITY))
        for r in recs:
            if r.id >= h.next_snapshot_id:
                raise self._corrupt(f"snapshot {r.name!r} has id {r.id} >= next id {h.next_snapshot_id}")
            if r.virtual_size > C.MAX_VIRTUAL_SIZE:
                raise self._corrupt(f"snapshot {r.name!r} has size {r.virtual_size} out of range")
        return recs

    def _load_refcounts(self) -> None:
        if self.txn.rc is not None:
            return
        h = self.header
        per = self.rc_per_block
        nblocks = (self.txn.host_clusters + per - 1) // per
        if h.refcount_table_entries != nblocks:
            raise self._corrupt(f"refcount table has {h.refcount_table_entries} entries; "
                                f"{self.txn.host_clusters} clusters need {nblocks}")
        budget.charge(nblocks * C.RT_ENTRY_SIZE * 2 + self.txn.host_clusters * C.RC_ENTRY_SIZE,
                      f"{self.name}: refcounts of {self.txn.host_clusters} clusters")
        buf = self._read_checked(h.refcount_table_offset, nblocks * C.RT_ENTRY_SIZE, h.refcount_table_checksum,
                                 "refcount table")
        self.txn.rt_off, self.txn.rt_sum = C.decode_refcount_table(buf, nblocks)
        rc = array.array("I")
        for b, (o, s) in enumerate(zip(self.txn.rt_off, self.txn.rt_sum)):
            rc.extend(C.decode_refcount_block(self._read_checked(o, self.cluster_size, s, f"refcount block {b}")))
        del rc[self.txn.host_clusters:]
        self.txn.rc = rc
        # Free clusters are found lazily (``_alloc`` scans the refcounts a chunk at a
        # time when the heap runs dry), so opening a large image costs no scan.
        self.txn.free_heap = []
        self.txn.scan_pos = 0
