"""The vdk driver: our copy-on-write format (specification: formats/vdk.md).

How a write stays crash-safe (DESIGN.md, property 1): nothing that the last durable
header references is ever overwritten.  Data goes to clusters allocated in the
current transaction; L2 tables, the L1 table, the snapshot table and the refcount
blocks that change are written to new clusters at commit (``flush``); then one
fdatasync; then the header goes to the older of the two header slots with the next
generation number; then a second fdatasync.  Clusters whose refcount drops to zero
during a transaction stay reserved ("pending free") until that header is durable,
so a crash at any point leaves the previous generation intact.

Snapshots share tables lazily (Rodeh, "B-trees, shadowing, and clones"): a
refcount counts references from *table instances*, so taking a snapshot only
increments the refcount of the live L1 table.  The first change after that copies
the L1 (incrementing each L2 it names) and each L2 it touches (incrementing each
data cluster that L2 names).  Deleting a snapshot decrements its L1 and recurses
only into tables whose count reaches zero: it costs what it frees.

Concurrency: a driver instance is used by one caller at a time (the FUSE layer
serialises requests on its trio thread); nothing here locks.
"""

from __future__ import annotations

import array
import heapq
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from ... import budget
from ...codec import vdk as C
from ...errors import ChecksumMismatch, CorruptImage, UnsupportedFeature, SnapshotExists, SnapshotNotFound, UsageError, VdiskError
from ...host import HostStorage
from .. import register
from ..base import BackingRef, BlockDriver, CheckResult, CreateOptions, Extent, Holder, SnapshotInfo, Status

MAX_L1_BYTES = 32 << 20  # implementation limit: L1 tables up to 32 MiB (2 Mi entries)
AUTO_COMMIT_DIRTY_L2 = 1024
AUTO_COMMIT_PENDING_FREE = 1 << 16

_unpack_l2 = C.L2_ENTRY.unpack_from
_pack_l2 = C.L2_ENTRY.pack_into
_ESZ = C.L2_ENTRY_SIZE
_SHIFT = C.TYPE_SHIFT
_MASK = C.OFFSET_MASK
_T_UNALLOC, _T_ZERO, _T_DATA, _T_COMP = C.T_UNALLOCATED, C.T_ZERO, C.T_DATA, C.T_COMPRESSED

_pool: ThreadPoolExecutor | None = None


def _compress_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="vdk-zstd")
    return _pool


def _shown_name(name: str | bytes) -> str:
    """A printable, one-line rendering of a snapshot name that may be anything (bytes,
    surrogate-escaped argv, control characters)."""
    if isinstance(name, str):
        try:
            name = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return ascii(name)
    more = "..." if len(name) > 64 else ""
    text = bytes(name[:64]).decode("utf-8", "backslashreplace")  # a byte that is not UTF-8: \xff
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + more + "'"


def validate_snapshot_name(name: str | bytes) -> str:
    """Refuse a name a new snapshot may not have, with a one-line UsageError, before
    anything is written; return the name as str.  A name is 1 to 255 bytes of valid
    UTF-8 (a str holding surrogates, as a non-UTF-8 command-line argument decodes to,
    is not) without '@' (``IMAGE@SNAP`` names a snapshot), '/', control characters
    (below 0x20, and 0x7f), a leading '#' (``#ID`` selects by id) or leading or
    trailing white space."""
    if isinstance(name, (bytes, bytearray)):
        try:
            text = bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"invalid snapshot name {_shown_name(bytes(name))}: not valid UTF-8") from None
    elif isinstance(name, str):
        text = name
    else:
        raise UsageError(f"a snapshot name must be a string, not {type(name).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"invalid snapshot name {_shown_name(text)}: not valid UTF-8") from None
    if not 0 < len(raw) <= C.MAX_SNAPSHOT_NAME:
        raise UsageError(f"snapshot name must be 1 to {C.MAX_SNAPSHOT_NAME} bytes long, not {len(raw)}")
    if any(ch < 0x20 or ch == 0x7F for ch in raw):
        raise UsageError(f"invalid snapshot name {_shown_name(text)}: no control characters")
    if "@" in text or "/" in text or text.startswith("#") or text != text.strip():
        raise UsageError(f"invalid snapshot name {_shown_name(text)}: no '@', '/', leading '#' or surrounding spaces")
    return text


@register
class VdkDriver(BlockDriver):
    format_name = "vdk"
    supports_backing = True
    supports_snapshots = True
    supports_compression = True
    supports_discard = True
    default_cluster_size = 1 << C.DEFAULT_CLUSTER_BITS

    create_options = {
        "cluster_size": "4K to 2M, a power of two (default 64K)",
        "compression": "none (default) or zstd: how new clusters are written (compression_type is the same)",
        "compression_level": "zstd level, -7 to 19 (default 3)",
        "preallocation": "off only (vdk writes every change to a new cluster)",
    }

    # ================================================================ open / create
    @classmethod
    def probe(cls, head: bytes) -> bool:
        # either slot may be the valid one; a file with the magic in either is vdk
        return head[:8] == C.MAGIC or head[C.SLOT_SIZE:C.SLOT_SIZE + 8] == C.MAGIC

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
        drv.rc = array.array("I", [1] * reserved)
        drv.host_clusters = reserved
        drv.l1_off = array.array("Q", bytes(8 * C.l1_entries_for(size, cbits)))
        drv.l1_sum = array.array("Q", drv.l1_off)
        drv.l1_dirty = True
        drv.snap_dirty = True
        drv.rc_dirty = set(range((reserved + drv.rc_per_block - 1) // drv.rc_per_block))
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

    def __init__(self, host: HostStorage, hdr: C.Header, *, read_only: bool):
        self.host = host
        self.name = host.name
        self.header = hdr
        self.read_only = read_only
        self.cbits = hdr.cluster_bits
        self.cluster_size = cs = 1 << self.cbits
        self.l2_bits = (cs // C.L2_ENTRY_SIZE).bit_length() - 1
        self.l2_mask = (1 << self.l2_bits) - 1
        self.rc_per_block = C.rc_entries(self.cbits)
        self.size = hdr.virtual_size
        self.zero_cluster = bytes(cs)
        self.backing = None
        self.backing_ref = (BackingRef(hdr.backing_name, hdr.backing_format, hdr.backing_snapshot or None)
                            if hdr.backing_name else None)
        self.compression = hdr.compression_type
        self.host_clusters = hdr.host_clusters
        self.snapshots: list[C.SnapshotRecord] = []
        self.viewing: C.SnapshotRecord | None = None
        # in-memory state
        self.l1_off = array.array("Q")  # compact: 8 bytes an entry (budget.charge counts them)
        self.l1_sum = array.array("Q")
        self.l2cache: dict[int, bytearray] = {}
        self.l2dirty: set[int] = set()
        self.l1_dirty = False
        self.snap_dirty = False
        self.rc: array.array | None = None
        self.rt_off = array.array("Q")
        self.rt_sum = array.array("Q")
        self.rc_dirty: set[int] = set()
        self.rc_placed: dict[int, int] = {}
        self.pending_free: set[int] = set()
        self.dropped_new: set[int] = set()  # allocated and freed again in a transaction: punched at commit
        self.new_clusters: set[int] = set()
        self.free_heap: list[int] = []
        self._scan_pos = 0  # refcounts below this index have been scanned into free_heap
        self.pack_cluster = -1
        self.pack_used = 0
        self._wq: list[tuple[int, object]] = []  # data writes queued by _store (see _write_queued)
        self._undo: list[tuple[int, int]] | None = None  # refcount changes of a commit in progress
        self._header_unsure = False  # a header write failed: it may or may not be durable
        self._unwritten: dict[int, bytes] = {}  # host offset -> data whose write failed (retried at commit)
        self.slot = 0  # index of the header slot holding the current header
        self._slot_gen = hdr.generation
        self._dirty = False
        self._closed = False
        self.broken: str | None = None

    # ---------------------------------------------------------------- loading
    def _corrupt(self, what: str) -> CorruptImage:
        return CorruptImage(f"{self.name}: {what}")

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
        if offset + nbytes > self.host_clusters * cs:
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
            self.l1_off, self.l1_sum = array.array("Q"), array.array("Q")
            return
        budget.charge(n * C.L1_ENTRY_SIZE * 2, f"{self.name}: {what} ({n} entries)")  # the buffer and the arrays
        buf = self._read_checked(offset, n * C.L1_ENTRY_SIZE, csum, what)
        offs, sums = C.decode_l1(buf, n)
        limit = self.host_clusters * self.cluster_size
        for i, o in enumerate(offs):
            if o and (o % self.cluster_size or o < C.HEADER_AREA or o + self.cluster_size > limit):
                raise self._corrupt(f"{what} entry {i} points at {o:#x}, outside the image or unaligned")
        self.l1_off, self.l1_sum = offs, sums

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
        if self.rc is not None:
            return
        h = self.header
        per = self.rc_per_block
        nblocks = (self.host_clusters + per - 1) // per
        if h.refcount_table_entries != nblocks:
            raise self._corrupt(f"refcount table has {h.refcount_table_entries} entries; "
                                f"{self.host_clusters} clusters need {nblocks}")
        budget.charge(nblocks * C.RT_ENTRY_SIZE * 2 + self.host_clusters * C.RC_ENTRY_SIZE,
                      f"{self.name}: refcounts of {self.host_clusters} clusters")
        buf = self._read_checked(h.refcount_table_offset, nblocks * C.RT_ENTRY_SIZE, h.refcount_table_checksum,
                                 "refcount table")
        self.rt_off, self.rt_sum = C.decode_refcount_table(buf, nblocks)
        rc = array.array("I")
        for b, (o, s) in enumerate(zip(self.rt_off, self.rt_sum)):
            rc.extend(C.decode_refcount_block(self._read_checked(o, self.cluster_size, s, f"refcount block {b}")))
        del rc[self.host_clusters:]
        self.rc = rc
        # Free clusters are found lazily (``_alloc`` scans the refcounts a chunk at a
        # time when the heap runs dry), so opening a large image costs no scan.
        self.free_heap = []
        self._scan_pos = 0

    # ================================================================ allocation
    def _set_rc(self, c: int, v: int) -> None:
        if self._undo is not None:
            self._undo.append((c, self.rc[c]))
        self.rc[c] = v
        self.rc_dirty.add(c // self.rc_per_block)

    def _alloc(self) -> int:
        """One free cluster, the lowest known free one first, else appended at the end.
        The heap holds candidates (freed clusters, and those a scan found); an entry is
        checked when it is popped, so stale or duplicate ones are harmless."""
        rc = self.rc
        heap = self.free_heap
        while True:
            if heap:
                c = heapq.heappop(heap)
                if c < self.host_clusters and rc[c] == 0 and c not in self.pending_free:
                    break
                continue
            if self._scan_pos < self.host_clusters:
                start = self._scan_pos
                chunk = rc[start:start + 65536]
                self._scan_pos = start + len(chunk)
                for i, v in enumerate(chunk):
                    if not v:
                        heap.append(start + i)  # ascending: still a heap
                continue
            c = self.host_clusters
            self.host_clusters += 1
            rc.append(0)
            break
        self._set_rc(c, 1)
        self.new_clusters.add(c)
        self._dirty = True
        return c

    def _alloc_run(self, n: int) -> int:
        """``n`` contiguous clusters: one comes from the free list, more are appended."""
        if n == 1:
            return self._alloc()
        return self._append(n)

    def _append(self, n: int) -> int:
        first = self.host_clusters
        self.host_clusters += n
        self.rc.extend([0] * n)
        for c in range(first, first + n):
            self._set_rc(c, 1)
            self.new_clusters.add(c)
        self._dirty = True
        return first

    def _incref(self, c: int) -> None:
        v = self.rc[c]
        if v >= 0xFFFFFFFF:
            raise self._corrupt(f"refcount of cluster {c} would overflow")
        self._set_rc(c, v + 1)

    def _decref(self, c: int) -> None:
        v = self.rc[c]
        if v == 0:
            self._mark_broken(f"refcount of cluster {c} would drop below zero")
        self._set_rc(c, v - 1)
        self._dirty = True
        if v == 1:
            if c == self.pack_cluster:
                self.pack_cluster = -1
            if self._unwritten:
                lo, hi = c << self.cbits, (c + 1) << self.cbits
                for off in [o for o in self._unwritten if lo <= o < hi]:
                    del self._unwritten[off]
            if c in self.new_clusters:
                self.new_clusters.discard(c)
                heapq.heappush(self.free_heap, c)
                self.dropped_new.add(c)
            else:
                self.pending_free.add(c)

    def _mark_broken(self, why: str):
        self.broken = why
        raise self._corrupt(why)

    def _entry_clusters(self, desc: int, slen: int) -> tuple[int, ...]:
        """Host clusters an L2 entry references: one for data, one or two (a compressed
        cluster may cross one cluster boundary) for compressed, none otherwise."""
        kind = desc >> _SHIFT
        if kind == _T_DATA:
            return ((desc & _MASK) >> self.cbits,)
        if kind == _T_COMP:
            off = desc & _MASK
            first, last = off >> self.cbits, (off + slen - 1) >> self.cbits
            return (first,) if first == last else (first, last)
        return ()

    def _release_entry(self, desc: int, slen: int) -> None:
        kind = desc >> _SHIFT
        if kind == _T_DATA:
            self._decref((desc & _MASK) >> self.cbits)
        elif kind == _T_COMP:
            for c in self._entry_clusters(desc, slen):
                self._decref(c)

    # ================================================================ tables
    def _l2(self, l2i: int) -> bytearray | None:
        """The L2 table for index ``l2i`` (cached), or None if there is none."""
        tbl = self.l2cache.get(l2i)
        if tbl is not None:
            return tbl
        off = self.l1_off[l2i]
        if off == 0:
            return None
        buf = self._read_checked(off, self.cluster_size, self.l1_sum[l2i],
                                 f"L2 table for guest offset {l2i << (self.l2_bits + self.cbits):#x}")
        tbl = bytearray(buf)
        self._validate_l2(tbl, l2i)
        if len(self.l2cache) >= 8192:
            for k in [k for k in self.l2cache if k not in self.l2dirty][:4096]:
                del self.l2cache[k]
        self.l2cache[l2i] = tbl
        return tbl

    def _validate_l2(self, tbl, l2i: int) -> None:
        cs = self.cluster_size
        limit = self.host_clusters * cs
        base = l2i << self.l2_bits
        n_valid = max(0, min(1 << self.l2_bits, ((self.size + cs - 1) >> self.cbits) - base))
        for j, (desc, length, codec, _csum, _birth) in enumerate(C.L2_ENTRY.iter_unpack(tbl)):
            if desc == 0 and length == 0 and codec == 0:
                continue
            why = C.validate_l2_entry(desc, length, codec, cs, limit)
            if why is None and j >= n_valid and desc >> _SHIFT != _T_UNALLOC:
                why = "entry maps a cluster past the end of the disk"
            if why:
                raise self._corrupt(f"L2 entry for guest offset {(base + j) << self.cbits:#x}: {why}")

    def _mark_l1_dirty(self) -> None:
        if self.l1_dirty:
            return
        h = self.header
        if h.l1_offset:
            first = h.l1_offset >> self.cbits
            ncl = (h.l1_entries * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits
            if self.rc[first] > 1:  # shared with a snapshot: our copy references every L2 too
                for o in self.l1_off:
                    if o:
                        self._incref(o >> self.cbits)
            for c in range(first, first + ncl):
                self._decref(c)
        self.l1_dirty = True
        self._dirty = True

    def _l2_for_write(self, l2i: int) -> bytearray:
        if l2i in self.l2dirty:
            return self.l2cache[l2i]
        self._mark_l1_dirty()
        tbl = self._l2(l2i)
        if tbl is None:
            tbl = bytearray(self.cluster_size)
        else:
            c = self.l1_off[l2i] >> self.cbits
            if self.rc[c] > 1:  # shared: the copy references every data cluster too
                for (desc, slen, _c, _s, _b) in C.L2_ENTRY.iter_unpack(tbl):
                    for hc in self._entry_clusters(desc, slen):
                        self._incref(hc)
            self._decref(c)
        self.l1_off[l2i] = 0
        self.l1_sum[l2i] = 0
        self.l2cache[l2i] = tbl
        self.l2dirty.add(l2i)
        self._dirty = True
        return tbl

    # ================================================================ read path
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

    # ================================================================ write path
    def _check_writable(self) -> None:
        if self.broken:
            raise self._corrupt(f"image was found corrupt earlier ({self.broken}); refusing to write")

    def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
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
                    content = mv[pos - offset:pos - offset + cs]
                else:
                    old = self._read_cluster(ci)
                    merged = bytearray(old)
                    merged[in_off:in_off + n] = mv[pos - offset:pos - offset + n]
                    if self._rewrite_part(ci, merged, in_off, n):
                        pos += n
                        continue
                    content = bytes(merged)
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
        if content == self.zero_cluster:
            return None
        return C.compress_cluster(content, self.header.compression_level)

    def _rewrite_part(self, ci: int, merged: bytearray, in_off: int, n: int) -> bool:
        """The fast path of a partial write: a data cluster this transaction allocated
        and nothing else references is rewritten in place, and only the ``n`` changed
        bytes go to the host.  False if the cluster does not qualify."""
        l2i = ci >> self.l2_bits
        if l2i not in self.l2dirty or self.compression:
            return False
        tbl = self.l2cache[l2i]
        pos = (ci & self.l2_mask) * _ESZ
        desc = _unpack_l2(tbl, pos)[0]
        if desc >> _SHIFT != _T_DATA:
            return False
        host = desc & _MASK
        c = host >> self.cbits
        if c not in self.new_clusters or self.rc[c] != 1 or host in self._unwritten:
            return False
        if merged == self.zero_cluster:
            return False  # let _store turn it into a zero entry
        self._wq.append((host + in_off, bytes(merged[in_off:in_off + n])))
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
        if content == self.zero_cluster:
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
            if c in self.new_clusters and self.rc[c] == 1:  # ours alone and not yet committed: rewrite in place
                self._wq.append((desc & _MASK, content))
                _pack_l2(tbl, pos, desc, self.cluster_size, 0, csum, birth)
                return
        c = self._alloc()
        self._wq.append((c << self.cbits, content))
        self._release_entry(desc, slen)
        _pack_l2(tbl, pos, (_T_DATA << _SHIFT) | (c << self.cbits), self.cluster_size, 0, csum, birth)

    def _alloc_piece(self, n: int) -> int:
        """Room for ``n`` (< cluster size) compressed bytes, packed after the previous
        piece; a piece may run on into the next cluster when that one is the next
        to be appended to the file, as it is while a fresh image fills up."""
        cs = self.cluster_size
        c = self.pack_cluster
        if c >= 0 and self.pack_used + n <= cs:
            self._incref(c)
            off = (c << self.cbits) + self.pack_used
            self.pack_used += n
        elif c >= 0 and self.pack_used < cs and c + 1 == self.host_clusters:
            off = (c << self.cbits) + self.pack_used
            self._incref(c)
            self.pack_cluster = self._append(1)  # c + 1
            self.pack_used = self.pack_used + n - cs
        else:
            self.pack_cluster = self._alloc()
            off = self.pack_cluster << self.cbits
            self.pack_used = n
        return off

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
            if self.backing is None and self.l1_off[l2i] == 0 and l2i not in self.l2cache:
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

    def resize(self, new_size: int) -> None:
        """Set the guest size and commit.  Shrinking drops what lies past the new end:
        whole L2 tables past the last L1 entry kept, and the entries past the end in
        the one table the new end cuts.  Its cost follows what is allocated (the L1
        entries that are not zero are found at C speed, and only the allocated entries
        of existing tables are visited), never the virtual size: shrinking a 256 TiB
        disk holding a few MiB takes as long as shrinking a 1 GiB one."""
        self._check_writable()
        self._check_size(new_size, self.cbits)
        old = self.size
        cs = self.cluster_size
        n = C.l1_entries_for(new_size, self.cbits)
        if new_size < old:
            tail = min(old, (new_size + cs - 1) & ~(cs - 1))
            if tail > new_size:
                self.write(new_size, bytes(tail - new_size))  # keep bytes past the end zero
            # whole clusters past the end inside the L2 tables kept (the tables past
            # them go below)
            first = (new_size + cs - 1) >> self.cbits
            end = min((old + cs - 1) >> self.cbits, n << self.l2_bits)
            if end > first:
                self._drop_range(first, end)
        if n != len(self.l1_off):
            self._mark_l1_dirty()
            for l2i in self._allocated_l2_indices(n, len(self.l1_off)):
                self._release_l2_index(l2i)
            del self.l1_off[n:], self.l1_sum[n:]
            self.l1_off.extend([0] * (n - len(self.l1_off)))
            self.l1_sum.extend([0] * (n - len(self.l1_sum)))
        self.size = new_size
        self._dirty = True
        if new_size > old and self.backing is not None and self.backing.size > old:
            self._zero_range(old, min(new_size, self.backing.size) - old)
        self._commit(force=True)

    def _drop_range(self, first: int, last: int) -> None:
        """Unmap guest clusters [first, last): used past the end of the disk.  Visits
        only the L2 tables that exist, and copies one (section 13.3) only if it maps
        something in the range; the cost follows the allocated entries."""
        l2b = self.l2_bits
        mask = self.l2_mask
        if last <= first:
            return
        for l2i in self._allocated_l2_indices(first >> l2b, ((last - 1) >> l2b) + 1):
            lo = max(first, l2i << l2b)
            hi = min(last, (l2i + 1) << l2b)
            a, b = (lo & mask) * _ESZ, (((hi - 1) & mask) + 1) * _ESZ
            tbl = self._l2(l2i)
            if tbl is None or tbl.count(0, a, b) == b - a:
                continue  # nothing mapped here: leave the table (and its sharing) alone
            tbl = self._l2_for_write(l2i)
            for pos in range(a, b, _ESZ):
                desc, slen = _unpack_l2(tbl, pos)[:2]
                if desc:
                    self._release_entry(desc, slen)
            tbl[a:b] = bytes(b - a)

    def _allocated_l2_indices(self, lo: int, hi: int) -> list[int]:
        """The L2 indices in [lo, hi) that have a table (a non-zero L1 entry, or a table
        changed in this transaction), ascending.  The L1 entries are scanned at C speed
        (``itertools.compress``), so even a 2 Mi-entry L1 costs milliseconds."""
        from itertools import compress

        hi = min(hi, len(self.l1_off))
        if lo >= hi:
            return []
        found = set(compress(range(lo, hi), self.l1_off[lo:hi]))
        found.update(i for i in self.l2dirty if lo <= i < hi)
        return sorted(found)

    def _release_l2_index(self, l2i: int) -> None:
        if l2i in self.l2dirty:
            tbl = self.l2cache[l2i]
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                self._release_entry(desc, slen)
            self.l2dirty.discard(l2i)
        elif self.l1_off[l2i]:
            self._release_l2(self.l1_off[l2i], self.l1_sum[l2i])
        self.l2cache.pop(l2i, None)

    # ================================================================ freeing trees
    def _release_l2(self, off: int, csum: int) -> None:
        c = off >> self.cbits
        if self.rc[c] == 1:
            tbl = self._read_checked(off, self.cluster_size, csum, "L2 table")
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                self._release_entry(desc, slen)
        self._decref(c)

    def _release_l1(self, off: int, n: int, csum: int) -> None:
        if not off:
            return
        first = off >> self.cbits
        ncl = (n * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits
        if self.rc[first] == 1:
            offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, "L1 table"), n)
            for o, s in zip(offs, sums):
                if o:
                    self._release_l2(o, s)
        for c in range(first, first + ncl):
            self._decref(c)

    # ================================================================ commit
    def flush(self) -> None:
        if self.read_only:
            return
        self._commit()

    def _maybe_commit(self) -> None:
        if len(self.l2dirty) > AUTO_COMMIT_DIRTY_L2 or len(self.pending_free) > AUTO_COMMIT_PENDING_FREE:
            self._commit()

    def _commit(self, force: bool = False) -> None:
        """Write a new generation: tables to new clusters, sync, header, sync.

        If the host fails before the header is written, the in-memory state is rolled
        back to what it was before the attempt (the durable image never saw it), so a
        later flush can retry.  If it fails while writing or syncing the header, that
        generation may or may not be durable: its clusters and the previous one's stay
        reserved, and the next commit first writes that same header again."""
        if self.read_only or not (self._dirty or force or self._header_unsure):
            return
        self._check_writable()
        if self._header_unsure:
            self._write_header(self.header)
            self._header_unsure = False
            self._release_pending()
            if not (self._dirty or force):
                return
        if self._unwritten:
            self._rewrite_unwritten()
        saved = self._save_state()
        self._undo = []
        try:
            new, writes = self._place_tables()
            for off, data in writes:
                self.host.pwrite(off, data)
            if self.host.size() < self.host_clusters * self.cluster_size:
                self.host.truncate(self.host_clusters * self.cluster_size)
            self.host.flush()
        except BaseException:
            self._restore_state(saved)
            raise
        finally:
            self._undo = None
        self.header = new
        self.new_clusters.clear()
        self.rc_dirty.clear()
        self.rc_placed.clear()
        self.l1_dirty = self.snap_dirty = self._dirty = False
        self.pack_cluster = -1
        try:
            self._write_header(new)
        except BaseException:
            self._header_unsure = True
            raise
        self._release_pending()

    def _write_header(self, h: C.Header) -> None:
        """Write ``h`` over the slot that does not hold the current header, then sync.
        (Re-issuing a header whose write failed goes to the same slot again.)"""
        if h.generation != self._slot_gen:
            self.slot = 1 - self.slot
            self._slot_gen = h.generation
        data = h.encode()
        self.host.pwrite(C.SLOT_OFFSETS[self.slot], data + bytes(C.SLOT_SIZE - len(data)))
        self.host.flush()

    def _release_pending(self) -> None:
        """The newest generation is durable: what it no longer references may be reused."""
        freed = sorted(self.pending_free)
        for c in freed:
            heapq.heappush(self.free_heap, c)
        self.pending_free.clear()
        if self.dropped_new:
            # Written in a transaction that dropped them again: free, but their bytes
            # would stay in the file (check counts that as leaked space).
            rc = self.rc
            freed = sorted(set(freed).union(c for c in self.dropped_new if c < len(rc) and rc[c] == 0))
            self.dropped_new.clear()
        self._punch(freed)

    def _save_state(self) -> dict:
        return {
            "host_clusters": self.host_clusters, "rc_len": len(self.rc), "l1_off": array.array("Q", self.l1_off),
            "l1_sum": array.array("Q", self.l1_sum), "l2dirty": set(self.l2dirty),
            "l2tables": {i: self.l2cache[i] for i in self.l2dirty}, "l1_dirty": self.l1_dirty,
            "snap_dirty": self.snap_dirty, "rt_off": array.array("Q", self.rt_off), "rt_sum": array.array("Q", self.rt_sum),
            "rc_dirty": set(self.rc_dirty), "rc_placed": dict(self.rc_placed),
            "pending_free": set(self.pending_free), "new_clusters": set(self.new_clusters),
            "free_heap": list(self.free_heap), "scan_pos": self._scan_pos, "pack": (self.pack_cluster, self.pack_used), "dirty": self._dirty,
        }

    def _restore_state(self, st: dict) -> None:
        rc = self.rc
        n = st["rc_len"]
        for c, v in reversed(self._undo):
            if c < n:
                rc[c] = v
        del rc[n:]
        self.host_clusters = st["host_clusters"]
        self.l1_off, self.l1_sum = st["l1_off"], st["l1_sum"]
        self.l2dirty = st["l2dirty"]
        self.l2cache.update(st["l2tables"])
        self.l1_dirty, self.snap_dirty = st["l1_dirty"], st["snap_dirty"]
        self.rt_off, self.rt_sum = st["rt_off"], st["rt_sum"]
        self.rc_dirty, self.rc_placed = st["rc_dirty"], st["rc_placed"]
        self.pending_free, self.new_clusters = st["pending_free"], st["new_clusters"]
        self.free_heap = st["free_heap"]
        self._scan_pos = st["scan_pos"]
        self.pack_cluster, self.pack_used = st["pack"]
        self._dirty = st["dirty"]

    def _place_tables(self) -> tuple[C.Header, list[tuple[int, bytes]]]:
        """Steps 1-4 of a commit: give every dirty table a new home; return the new
        header and the writes to issue."""
        cs = self.cluster_size
        cbits = self.cbits
        writes: list[tuple[int, bytes]] = []
        h = self.header
        # 1. L2 tables
        for l2i in sorted(self.l2dirty):
            tbl = self.l2cache[l2i]
            if tbl == self.zero_cluster:
                self.l1_off[l2i] = self.l1_sum[l2i] = 0
                del self.l2cache[l2i]
                continue
            c = self._alloc()
            data = bytes(tbl)
            writes.append((c << cbits, data))
            self.l1_off[l2i] = c << cbits
            self.l1_sum[l2i] = C.checksum(data)
        self.l2dirty.clear()
        # 2. L1 table
        l1_offset, l1_n, l1_sum = h.l1_offset, h.l1_entries, h.l1_checksum
        if self.l1_dirty:
            l1_n = len(self.l1_off)
            if l1_n:
                data = C.encode_l1(self.l1_off, self.l1_sum)
                ncl = (len(data) + cs - 1) >> cbits
                l1_offset = self._alloc_run(ncl) << cbits
                writes.append((l1_offset, data + bytes(ncl * cs - len(data))))
                l1_sum = C.checksum(data)
            else:
                l1_offset, l1_sum = 0, 0
        # 3. snapshot table
        st_off, st_len, st_sum = h.snapshot_table_offset, h.snapshot_table_length, h.snapshot_table_checksum
        if self.snap_dirty:
            if st_off:
                for c in range(st_off >> cbits, (st_off + st_len + cs - 1) >> cbits):
                    self._decref(c)
            data = C.encode_snapshot_table(self.snapshots)
            if data:
                ncl = (len(data) + cs - 1) >> cbits
                st_off = self._alloc_run(ncl) << cbits
                writes.append((st_off, data + bytes(ncl * cs - len(data))))
                st_len, st_sum = len(data), C.checksum(data)
            else:
                st_off = st_len = st_sum = 0
        # 4. refcount blocks and table: placing them changes refcounts, so iterate to a fixed point
        per = self.rc_per_block
        rt_first, rt_ncl = -1, 0
        old_rt = (h.refcount_table_offset, h.refcount_table_entries)
        released_old_rt = False
        while True:
            todo = [b for b in self.rc_dirty if b not in self.rc_placed]
            if todo:
                for b in sorted(todo):
                    self.rc_placed[b] = -1
                    if b < len(self.rt_off) and self.rt_off[b]:
                        self._decref(self.rt_off[b] >> cbits)
                    self.rc_placed[b] = self._alloc()
                continue
            if not released_old_rt:
                released_old_rt = True
                if old_rt[0]:
                    for c in range(old_rt[0] >> cbits, (old_rt[0] + old_rt[1] * C.RT_ENTRY_SIZE + cs - 1) >> cbits):
                        self._decref(c)
                continue
            nblocks = (self.host_clusters + per - 1) // per
            need = (nblocks * C.RT_ENTRY_SIZE + cs - 1) >> cbits
            if rt_first < 0 or need > rt_ncl:
                if rt_first >= 0:
                    for c in range(rt_first, rt_first + rt_ncl):
                        self._decref(c)
                rt_ncl = need
                rt_first = self._alloc_run(rt_ncl)
                continue
            break
        nblocks = (self.host_clusters + per - 1) // per
        self.rt_off.extend([0] * (nblocks - len(self.rt_off)))
        self.rt_sum.extend([0] * (nblocks - len(self.rt_sum)))
        for b, c in self.rc_placed.items():
            data = C.encode_refcount_block(self.rc, b * per, per)
            writes.append((c << cbits, data))
            self.rt_off[b] = c << cbits
            self.rt_sum[b] = C.checksum(data)
        rt_data = C.encode_refcount_table(self.rt_off[:nblocks], self.rt_sum[:nblocks])
        writes.append((rt_first << cbits, rt_data + bytes(rt_ncl * cs - len(rt_data))))
        new = h.replace(
            generation=h.generation + 1, virtual_size=self.size, l1_offset=l1_offset, l1_entries=l1_n,
            l1_checksum=l1_sum, refcount_table_offset=rt_first << cbits, refcount_table_entries=nblocks,
            refcount_table_checksum=C.checksum(rt_data), snapshot_table_offset=st_off,
            snapshot_count=len(self.snapshots), snapshot_table_length=st_len, snapshot_table_checksum=st_sum,
            host_clusters=self.host_clusters,
        )
        return new, writes

    def _punch(self, clusters: list[int]) -> None:
        i = 0
        while i < len(clusters):
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
                j += 1
            try:
                self.host.punch_hole(clusters[i] << self.cbits, (j - i + 1) << self.cbits)
            except VdiskError:
                pass  # space reclamation is best effort; the clusters are free either way
            i = j + 1

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self.broken:
                self._commit()
        finally:
            self._closed = True
            self.host.close()

    # ================================================================ block status
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

    # ================================================================ info
    def info(self) -> dict:
        h = self.header
        snaps = [s for s in self.snapshots if not s.flags & C.SNAP_HIDDEN]
        space = self.space_usage() if not self.read_only or self.viewing is None else None
        return {
            "space": space and {
                "live_referenced_bytes": space["live"]["referenced_bytes"],
                "live_unique_bytes": space["live"]["unique_bytes"],
                "snapshots": [{"name": r.name, "id": r.id, **space["snapshots"][r.id]} for r in snaps],
                "hidden_snapshots_bytes": sum(space["snapshots"][r.id]["unique_bytes"]
                                              for r in self.snapshots if r.flags & C.SNAP_HIDDEN),
            },
            "cluster_size": self.cluster_size,
            "compression": C.COMPRESSION_NAMES[h.compression_type],
            "format_specific": {
                "version": h.version,
                "image_id": self.image_id,
                "generation": h.generation,
                "host_clusters": h.host_clusters,
                "snapshot_count": len(snaps),
                "hidden_snapshots": len(self.snapshots) - len(snaps),
                "corrupt": bool(h.incompatible_features & C.INCOMPAT_CORRUPT),
                "compression_level": h.compression_level,
            },
        }

    def set_backing(self, ref: BackingRef | None) -> None:
        self._check_writable()
        new = self.header.replace(backing_name=ref.filename if ref else "", backing_format=ref.format if ref else "",
                                  backing_snapshot=(ref.snapshot or "") if ref else "")
        try:
            new.encode()
        except ValueError as exc:
            raise UsageError(f"backing reference: {exc}") from None
        self.header = new
        self.backing_ref = ref
        self._commit(force=True)

    # ================================================================ snapshots
    def _find_snapshot(self, name: str, *, include_hidden: bool = False) -> C.SnapshotRecord:
        if name.startswith("#") and name[1:].isdigit():
            for r in self.snapshots:
                if r.id == int(name[1:]):
                    return r
        for r in self.snapshots:
            if r.name == name and (include_hidden or not r.flags & C.SNAP_HIDDEN):
                return r
        raise SnapshotNotFound(f"{self.name}: no snapshot named {name!r}")

    @property
    def image_id(self) -> str | None:
        return self.header.image_id.hex() if self.header.image_id else None

    def _info_of(self, r: C.SnapshotRecord) -> SnapshotInfo:
        return SnapshotInfo(id=r.id, name=r.name, created=r.create_time_ns / 1e9, size=r.virtual_size,
                            generation=r.generation, holds=r.holds,
                            holders=tuple(Holder(h.image_id.hex(), h.path) for h in r.holders),
                            hidden=bool(r.flags & C.SNAP_HIDDEN))

    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        """Visible snapshots (and, with ``hidden``, the hidden ones), oldest first; with
        ``space``, ``unique_bytes`` is filled in (a walk of each snapshot's tables)."""
        usage = self.space_usage()["snapshots"] if space else {}
        out = []
        for r in self.snapshots:
            if r.flags & C.SNAP_HIDDEN and not hidden:
                continue
            info = self._info_of(r)
            if space:
                info = SnapshotInfo(**{**info.__dict__, "unique_bytes": usage[r.id]["unique_bytes"],
                                       "extra": {"referenced_bytes": usage[r.id]["referenced_bytes"]}})
            out.append(info)
        return out

    def has_snapshots(self) -> bool:
        return bool(self.snapshots)

    def snapshot_create(self, name: str) -> SnapshotInfo:
        validate_snapshot_name(name)
        if any(r.name == name and not r.flags & C.SNAP_HIDDEN for r in self.snapshots):
            raise SnapshotExists(f"{self.name}: a snapshot named {name!r} exists already")
        if len(self.snapshots) >= C.MAX_SNAPSHOTS:
            raise UsageError(f"{self.name}: at most {C.MAX_SNAPSHOTS} snapshots")
        self._commit()
        h = self.header
        if h.l1_offset:
            first = h.l1_offset >> self.cbits
            for c in range(first, first + ((h.l1_entries * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits)):
                self._incref(c)
        rec = C.SnapshotRecord(id=h.next_snapshot_id, name=name, generation=h.generation,
                               create_time_ns=time.time_ns(), virtual_size=self.size, l1_offset=h.l1_offset,
                               l1_entries=h.l1_entries, l1_checksum=h.l1_checksum)
        self.snapshots.append(rec)
        self.header = h.replace(next_snapshot_id=h.next_snapshot_id + 1)
        self.snap_dirty = True
        self._commit(force=True)
        return self._info_of(rec)

    def snapshot_delete(self, name: str) -> None:
        rec = self._find_snapshot(name)
        self._commit()
        idx = self.snapshots.index(rec)
        if rec.holds:
            self.snapshots[idx] = C.SnapshotRecord(**{**rec.__dict__, "flags": rec.flags | C.SNAP_HIDDEN})
        else:
            del self.snapshots[idx]
            self._release_l1(rec.l1_offset, rec.l1_entries, rec.l1_checksum)
        self.snap_dirty = True
        self._commit(force=True)

    def snapshot_revert(self, name: str) -> None:
        rec = self._find_snapshot(name)
        self._commit()
        h = self.header
        if rec.l1_offset:
            first = rec.l1_offset >> self.cbits
            for c in range(first, first + ((rec.l1_entries * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> self.cbits)):
                self._incref(c)
        self._release_l1(h.l1_offset, h.l1_entries, h.l1_checksum)
        self.header = h.replace(l1_offset=rec.l1_offset, l1_entries=rec.l1_entries, l1_checksum=rec.l1_checksum)
        self.l2cache.clear()
        self.size = rec.virtual_size
        self._load_l1(rec.l1_offset, rec.l1_entries, rec.l1_checksum, rec.virtual_size, "L1 table")
        self.pack_cluster = -1
        self._commit(force=True)

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        """Give snapshot ``name`` the name ``new_name``; clones name it by id, so they
        keep reading it."""
        new_name = validate_snapshot_name(new_name)
        self._check_writable()
        rec = self._find_snapshot(name)
        if any(r.name == new_name and not r.flags & C.SNAP_HIDDEN for r in self.snapshots if r is not rec):
            raise SnapshotExists(f"{self.name}: a snapshot named {new_name!r} exists already")
        self._commit()
        idx = self.snapshots.index(rec)
        new = C.SnapshotRecord(**{**rec.__dict__, "name": new_name})
        self.snapshots[idx] = new
        self.snap_dirty = True
        self._commit(force=True)
        return self._info_of(new)

    def snapshot_hold(self, name: str, delta: int, holder: Holder | None = None) -> SnapshotInfo:
        """Add (delta +1) or drop (-1) a linked clone's hold on a snapshot, recorded by
        the holder's identity (section 11.2 of the spec).  Dropping an identity that
        holds nothing raises SnapshotNotFound and changes nothing; ``holder`` None drops
        one hold that vdisk 0.1 counted without an identity.  A hidden snapshot whose
        last hold goes is freed."""
        if delta not in (1, -1):
            raise UsageError("a hold changes by +1 or -1")
        self._check_writable()
        rec = self._find_snapshot(name, include_hidden=True)
        hid = bytes.fromhex(holder.image_id) if holder is not None else None
        holders = list(rec.holders)
        mine = [h for h in holders if h.image_id == hid] if hid is not None else []
        if delta > 0:
            if hid is None:
                raise UsageError("a new hold needs the holder's identity")
            path = holder.path
            try:
                new_h = C.HolderRecord(hid, path)
                new_h.encode()
            except ValueError as exc:
                raise UsageError(f"holder {path!r}: {exc}") from None
            if mine:  # the same image holding again (a retried clone): keep one record
                holders = [new_h if h.image_id == hid else h for h in holders]
                holds = rec.holds
            else:
                if len(holders) >= C.MAX_HOLDERS:
                    raise UsageError(f"{self.name}: snapshot {rec.name!r} has {C.MAX_HOLDERS} holders already")
                holders.append(new_h)
                holds = rec.holds + 1
        else:
            if hid is not None:
                if not mine:
                    raise SnapshotNotFound(f"{self.name}: image {holder.image_id} holds no snapshot {name!r}")
                holders = [h for h in holders if h.image_id != hid]
            elif rec.holds <= len(holders):
                raise SnapshotNotFound(f"{self.name}: snapshot {name!r} has no hold without an identity")
            holds = rec.holds - 1
        self._commit()
        if holders and not self.header.incompatible_features & C.INCOMPAT_IDENTITY:
            # an image made by vdisk 0.1: it gets an identity with its first holder record
            self.header = self.header.replace(
                incompatible_features=self.header.incompatible_features | C.INCOMPAT_IDENTITY,
                image_id=uuid.uuid4().bytes)
        idx = self.snapshots.index(rec)
        if holds == 0 and rec.flags & C.SNAP_HIDDEN:
            del self.snapshots[idx]
            self._release_l1(rec.l1_offset, rec.l1_entries, rec.l1_checksum)
            new = C.SnapshotRecord(**{**rec.__dict__, "holds": 0, "holders": ()})
        else:
            new = C.SnapshotRecord(**{**rec.__dict__, "holds": holds, "holders": tuple(holders)})
            self.snapshots[idx] = new
        self.snap_dirty = True
        self._commit(force=True)
        return self._info_of(new)

    # ================================================================ check
    def check(self, *, repair: str | None = None) -> CheckResult:
        """Walk every table from every root (live state and each snapshot), verify each
        checksum (tables and data), recount references and compare with the stored
        refcounts.  Fewer stored than found is corruption; more is a leak, and so is
        file space that holds data no cluster in use needs (``_check_file_space``).
        A repair of leaks also gives that space back."""
        if repair and self.read_only:
            raise UsageError(f"{self.name}: open the image read-write to repair it")
        if not self.read_only:
            self._commit()
        res = CheckResult()
        cs = self.cluster_size
        cbits = self.cbits
        h = self.header
        nclusters = h.host_clusters
        expected = array.array("I", bytes(4 * nclusters))
        stored = self.rc
        if stored is None:
            try:
                self._load_refcounts()
                stored = self.rc
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
        reserved = (C.HEADER_AREA + cs - 1) // cs

        def ref(c: int, what: str) -> None:
            if 0 <= c < nclusters:
                expected[c] += 1
            else:
                res.corruptions.append(f"{what} references cluster {c} past the end of the image")

        def ref_run(off: int, nbytes: int, what: str) -> None:
            for c in range(off >> cbits, (off + nbytes + cs - 1) >> cbits):
                ref(c, what)

        for c in range(reserved):
            ref(c, "header")
        if stored is not None:
            ref_run(h.refcount_table_offset, h.refcount_table_entries * C.RT_ENTRY_SIZE, "refcount table")
            for o in self.rt_off[:h.refcount_table_entries]:
                ref(o >> cbits, "refcount table")
        if h.snapshot_table_offset:
            ref_run(h.snapshot_table_offset, h.snapshot_table_length, "snapshot table")
        roots = [("live state", h.l1_offset, h.l1_entries, h.l1_checksum, h.virtual_size)]
        roots += [(f"snapshot {r.name!r}", r.l1_offset, r.l1_entries, r.l1_checksum, r.virtual_size)
                  for r in self.snapshots]
        seen_l1: set[int] = set()
        seen_l2: set[int] = set()
        for what, off, n, csum, vsize in roots:
            if not off:
                continue
            if vsize > C.MAX_VIRTUAL_SIZE or n != C.l1_entries_for(vsize, cbits):
                res.corruptions.append(f"{self.name}: L1 table of {what} has {n} entries for a {vsize}-byte disk")
                continue
            if off % cs or off + n * C.L1_ENTRY_SIZE > nclusters * cs:
                res.corruptions.append(f"{self.name}: L1 table of {what} at {off:#x} lies outside the image")
                continue
            ref_run(off, n * C.L1_ENTRY_SIZE, f"L1 table of {what}")
            if off in seen_l1:
                continue
            seen_l1.add(off)
            try:
                offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, f"L1 table of {what}"), n)
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
                continue
            for l2i, (o, s) in enumerate(zip(offs, sums)):
                if not o:
                    continue
                ref(o >> cbits, f"L1 table of {what}")
                if o in seen_l2:
                    continue
                seen_l2.add(o)
                self._check_l2(l2i, o, s, vsize, what, ref, res)
        if stored is not None:
            bad = 0
            for c in range(nclusters):
                e, s = expected[c], stored[c]
                if s < e:
                    res.corruptions.append(f"cluster {c}: refcount {s} but {e} references")
                    bad += 1
                elif s > e:
                    res.leaks.append(f"cluster {c}: refcount {s} but {e} references" if e
                                     else f"cluster {c} is leaked (refcount {s}, no references)")
                    if e == 0:
                        res.leaked_clusters += 1
            res.allocated_clusters = sum(1 for v in expected if v)
            fix = (repair == "all") or (repair == "leaks" and not res.corruptions)
            if fix and (res.leaks or (repair == "all" and bad)):
                for c in range(nclusters):
                    if stored[c] != expected[c] and (repair == "all" or stored[c] > expected[c]):
                        self._set_rc(c, expected[c])
                        if expected[c] == 0:
                            self.pending_free.add(c)
                self._dirty = True
                self._commit()
                res.repaired = res.leaks + ([m for m in res.corruptions if "refcount" in m] if repair == "all" else [])
                res.leaks = []
                res.leaked_clusters = 0
                if repair == "all":
                    res.corruptions = [m for m in res.corruptions if "refcount" not in m]
        fix = (repair == "all") or (repair == "leaks" and not res.corruptions)
        self._check_file_space(res, expected, stored, nclusters, fix)
        return res

    def _check_file_space(self, res: CheckResult, expected, stored, nclusters: int, fix: bool) -> None:
        """Leaked file space, which no refcount shows: bytes of the file past the host
        area (``host_clusters * cs``), and free clusters past the last cluster in use
        (stored and counted refcount 0) that still hold data.  Both are what a writer
        leaves when it dies or fails (ENOSPC) in the middle of a transaction: the data
        it wrote to clusters that the surviving header does not count.  Each is a leak
        (exit 3); with ``fix`` the bytes past the area are truncated away and the free
        clusters punched.  Neither needs a new header: nothing the durable header
        references is touched (the check committed first), so a crash during the
        repair leaves the image as it was or with less leaked space.  A free cluster
        that reads as zeros is not a leak (a file system that cannot punch holes gets
        zeros written instead), nor is a hole.  The bytes past the area of a block
        device are not the image's, and are left alone."""
        cs = self.cluster_size
        cbits = self.cbits
        found: list[str] = []
        # free clusters at the end of the host area that hold data
        tail_data: list[int] = []
        if stored is not None and self.host_clusters == nclusters:
            t0 = nclusters
            while t0 > 0 and not expected[t0 - 1] and not stored[t0 - 1]:
                t0 -= 1
            if t0 < nclusters:
                tail_data = self._clusters_holding_data(t0, nclusters)
        if tail_data:
            found.append(f"{len(tail_data)} free clusters past the last cluster in use (from cluster "
                         f"{tail_data[0]} to {tail_data[-1]}) still hold data ({len(tail_data) * cs} bytes)")
        # bytes past the host area
        area = self.host_clusters * cs
        size = self.host.size()
        extra = size - area if size > area and self._host_is_regular_file() else 0
        if extra:
            found.append(f"{extra} bytes past the end of the host area ({area} bytes) belong to no cluster")
        if not found:
            return
        if not fix:
            res.leaks += found
            res.leaked_clusters += len(tail_data) + ((extra + cs - 1) >> cbits)
            return
        if tail_data:
            self._punch(tail_data)
        if extra:
            self.host.truncate(area)
        self.host.flush()
        res.repaired += found

    def _clusters_holding_data(self, first: int, last: int) -> list[int]:
        """Clusters in [first, last) whose bytes in the file are not all zeros.  Holes
        are skipped without reading them where the host file can say where its data
        is (SEEK_DATA); the rest is read in large pieces."""
        cbits = self.cbits
        cs = self.cluster_size
        zero = self.zero_cluster
        out: list[int] = []
        step = max(cs, 4 << 20)
        for start, end in self._host_data_ranges(first << cbits, last << cbits):
            c0 = start >> cbits
            c1 = min(last, (end + cs - 1) >> cbits)
            pos = c0 << cbits
            while pos < c1 << cbits:
                n = min(step, (c1 << cbits) - pos)
                buf = self.host.pread(pos, n)
                for i in range(0, n, cs):
                    if buf[i:i + cs] != zero:
                        out.append((pos + i) >> cbits)
                pos += n
        return out

    def _host_data_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [start, end) that may hold data in the host file: its data
        extents (lseek SEEK_DATA / SEEK_HOLE) when the host is a local file descriptor
        that supports them, else the whole range."""
        import errno

        fd = getattr(self.host, "fd", None)
        if not isinstance(fd, int) or fd < 0 or not hasattr(os, "SEEK_DATA"):
            return [(start, end)]
        out: list[tuple[int, int]] = []
        pos = start
        try:
            while pos < end:
                try:
                    d = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                        break
                    raise
                if d >= end:
                    break
                h = min(end, os.lseek(fd, d, os.SEEK_HOLE))
                out.append((d, h))
                pos = h
        except OSError:
            return [(start, end)]
        return out

    def _host_is_regular_file(self) -> bool:
        """Whether the host is a file whose length is the image's (not a block device,
        whose size is the device's).  Storage other than a local file counts as one."""
        fd = getattr(self.host, "fd", None)
        if not isinstance(fd, int) or fd < 0:
            return True
        import stat

        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            return False

    def _check_l2(self, l2i, off, csum, vsize, what, ref, res) -> None:
        cs = self.cluster_size
        cbits = self.cbits
        base_guest = l2i << (self.l2_bits + cbits)
        try:
            tbl = self._read_checked(off, cs, csum, f"L2 table for guest offset {base_guest:#x} in {what}")
        except CorruptImage as exc:
            res.corruptions.append(str(exc))
            return
        limit = self.header.host_clusters * cs
        for j, (desc, slen, codec, dsum, _birth) in enumerate(C.L2_ENTRY.iter_unpack(tbl)):
            if desc == 0 and slen == 0 and codec == 0:
                continue
            guest = base_guest + (j << cbits)
            why = C.validate_l2_entry(desc, slen, codec, cs, limit)
            if why is None and guest >= vsize and desc >> _SHIFT != _T_UNALLOC:
                why = "entry maps a cluster past the end of the disk"
            if why:
                res.corruptions.append(f"{what}: L2 entry for guest offset {guest:#x}: {why}")
                continue
            kind = desc >> _SHIFT
            if kind not in (_T_DATA, _T_COMP):
                continue
            host = desc & _MASK
            for hc in self._entry_clusters(desc, slen):
                ref(hc, f"L2 entry for guest offset {guest:#x}")
            res.checked_clusters += 1
            try:
                if kind == _T_DATA:
                    if C.checksum(self.host.pread(host, cs)) != dsum:
                        raise ChecksumMismatch(f"{self.name}: data checksum mismatch in the cluster at guest "
                                               f"offset {guest:#x} ({what})", guest)
                else:
                    res.compressed_clusters += 1
                    self._decompress(guest >> cbits, host, slen, dsum)
            except CorruptImage as exc:
                res.corruptions.append(str(exc))

    # ================================================================ chains and space
    def make_empty(self) -> None:
        """Drop every cluster of the live state: reads fall through to the backing
        image again (``commit`` empties the overlay this way)."""
        self._check_writable()
        self._mark_l1_dirty()
        for l2i in range(len(self.l1_off)):
            self._release_l2_index(l2i)
            self.l1_off[l2i] = self.l1_sum[l2i] = 0
        self._commit(force=True)

    def space_usage(self) -> dict:
        """Host bytes each root (the live state, each snapshot) refers to (data and
        tables), and bytes only it refers to -- what deleting it would free (ZFS
        ``refer`` and ``used``)."""
        self._commit()
        if self.rc is None:
            self._load_refcounts()
        h = self.header
        roots = [("live", h.l1_offset, h.l1_entries, h.l1_checksum)]
        roots += [(r, r.l1_offset, r.l1_entries, r.l1_checksum) for r in self.snapshots]
        cs = self.cluster_size
        out = {"live": None, "snapshots": {}}
        for key, off, n, csum in roots:
            referenced, unique = self._walk_space(off, n, csum)
            entry = {"referenced_bytes": referenced * cs, "unique_bytes": unique * cs}
            if key == "live":
                out["live"] = entry
            else:
                out["snapshots"][key.id] = entry
        return out

    def _walk_space(self, off: int, n: int, csum: int) -> tuple[int, int]:
        """(data clusters referred to, clusters freed if this root went), by a dry run
        of the release recursion over a scratch copy of the touched refcounts."""
        if not off:
            return 0, 0
        cbits = self.cbits
        scratch: dict[int, int] = {}

        def dec(c: int) -> bool:
            v = scratch.get(c, self.rc[c]) - 1
            scratch[c] = v
            return v == 0

        offs, sums = C.decode_l1(self._read_checked(off, n * C.L1_ENTRY_SIZE, csum, "L1 table"), n)
        l1_clusters = (n * C.L1_ENTRY_SIZE + self.cluster_size - 1) >> cbits
        referenced: set[int] = set()
        freed = 0
        l1_private = self.rc[off >> cbits] == 1
        for o, s in zip(offs, sums):
            if not o:
                continue
            referenced.add(o >> cbits)
            tbl = self._read_checked(o, self.cluster_size, s, "L2 table")
            l2_freed = l1_private and dec(o >> cbits)
            freed += l2_freed
            for (desc, slen, *_rest) in C.L2_ENTRY.iter_unpack(tbl):
                for c in self._entry_clusters(desc, slen):
                    referenced.add(c)
                    if l2_freed:
                        freed += dec(c)
        if l1_private:
            freed += l1_clusters
        return len(referenced) + l1_clusters, freed
