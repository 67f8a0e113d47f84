"""The qcow2 driver: QEMU's copy-on-write format, versions 2 and 3.

Written from the public specification (QEMU ``docs/interop/qcow2.txt``); the byte
layouts live in :mod:`vdisk.codec.qcow2`.

What it does
  - reads v2 and v3 images: L1/L2 lookup, zero clusters, compressed clusters (zlib
    raw deflate, zstd), backing file + backing format, internal snapshots;
  - writes v3 (and v2) images: allocating writes with copy-on-write of partial
    clusters from the backing image, in-place rewrites of clusters it owns alone
    (refcount 1), copy-on-write of clusters and L2 tables shared with snapshots,
    zero clusters, discard, resize (also shrinking under internal snapshots, as
    qemu-img 7.2; a version 2 image with snapshots is not resized at all, as
    qemu-img), internal snapshots (create, delete, revert, rename; names follow
    ``vdisk.drivers.names.validate_snapshot_name``, checked before anything is
    written), emptying the
    active state (``make_empty``, for ``commit``), compressed full-cluster writes
    when the image was created with compression;
  - ``create`` rounds the size up to whole 512-byte sectors, as qemu-img does;
  - ``check`` rebuilds the refcounts from the L1/L2/snapshot tables and compares.

Extended L2 entries (subclusters) are read, never written (read-only open).

What it refuses (UnsupportedFeature): unknown incompatible feature bits, external
data files, encryption; writing an image with extended L2 entries, with persistent
bitmaps, or with the corrupt bit set (CorruptImage).  An image with the dirty bit
is repaired on a read-write open (refcounts rebuilt from the tables) and read as
is on a read-only open.  A backing file without a backing-format extension is
probed, and accepted only if it is qcow2 or vdk (raw is never probed).

Compression: reads zlib (raw deflate) and zstd clusters, never producing more than
one cluster whatever the stream claims (zstd through the shared bounded decoder,
:mod:`vdisk.codec.zstd`).  Images created with ``compression`` carry a vdisk
header extension (type 0x76644b31, ignored and kept by QEMU) that makes
full-cluster writes go compressed when that saves a sector.  ``compression`` "on"
(or "default") compresses with ``compression_type``, zlib unless given, as
qemu-img; "zlib"/"zstd" name the type.

Metadata is never data: a standard or compressed L2 entry whose host clusters hold
metadata (header, refcount table or blocks, L1 and L2 tables, snapshot table,
snapshot L1 tables) is refused with CorruptImage naming the guest offset, on read,
write, discard and snapshot walks (``_build_meta_index``); allocation refuses to
hand out metadata whose refcount is 0.

Memory: tables are ``array('Q')`` (8 bytes an entry), read and written in 1 MiB
pieces; ``metadata_bytes()`` says what the driver holds (for one budget per
chain), and the L1 and refcount tables are charged to :mod:`vdisk.budget` at open.

``check`` semantics follow qemu-img: refcount lower than the references, COPIED set
on a shared cluster, bad offsets or reserved bits are corruptions (exit 2); refcount
higher than the references is a leak (exit 3), and so is COPIED clear on a cluster
with refcount 1 (harmless: a crash inside ``snapshot_create`` can leave it).
``repair="leaks"`` lowers leaked refcounts and sets such COPIED flags;
``repair="all"`` rebuilds the whole refcount structure past the used clusters.

Metadata caching and the write order (crash consistency)
  L2 tables and refcount blocks are cached in memory; modified ones are written
  by ``flush`` in this order, with a host flush (fdatasync) between the stages:

    1. guest data (already written by ``write``) and refcount blocks holding the
       *increments* of new allocations;
    2. the refcount table, if it gained entries (or its relocated copy + header);
    3. L2 tables;
    4. the L1 table and the header (size, L1 location, snapshot table location);
    5. the *decrements* of clusters that lost a reference (kept aside in
       ``_pending_free`` until now, so that a freed cluster is never reused nor
       its refcount dropped before the last reference to it is gone on disk);
       freed clusters are then punched out of the host file.

  A crash between stages leaves at worst leaked clusters (``check -r leaks``),
  never a reference to a cluster whose refcount is zero on disk.  Refcounts are
  exact after every ``flush``; the dirty bit is never set by this driver.
"""

from __future__ import annotations

import array
import dataclasses
import heapq
import itertools
import os
import sys
import time
from bisect import bisect_left, bisect_right

from ... import budget
from ...codec import qcow2 as C
from ...errors import (
    BackingError,
    CorruptImage,
    NotSupported,
    SnapshotExists,
    SnapshotNotFound,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from ...host import HostStorage
from .. import register
from ..base import BackingRef, BlockDriver, CheckResult, CreateOptions, Extent, SnapshotInfo, Status
from ..cache import TableCache
from ..names import validate_snapshot_name

# Implementation limits (bounded allocation: sizes read from a file are checked
# against these before anything is allocated).
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
MAX_CHECK_CLUSTERS = 1 << 27  # check keeps one 8-byte counter per host cluster
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# clean tables kept in memory: by bytes (a table is one cluster, 512 bytes to 2 MiB),
# between 16 and 4096 tables -- 512 L2 tables and 256 refcount blocks of 64 KiB
L2_CACHE_BYTES = 32 << 20
RB_CACHE_BYTES = 16 << 20

DIRTY_FLUSH_THRESHOLD = 256  # metadata tables dirty before an automatic flush (fewer if they are big)
#: snapshot L1 bytes read at open to list the L2 tables only snapshots use (beyond
#: this, such tables are not in the metadata index: see ``_build_meta_index``)
MAX_SNAPSHOT_L1_SCAN = 64 << 20
TABLE_READ_CHUNK = 1 << 20  # big tables are read in pieces: no second copy in memory
SNAPSHOT_RECORD_BYTES = 400  # memory of one decoded snapshot table entry, its strings aside


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _cache_tables(nbytes: int, cluster_size: int) -> int:
    """How many tables of one cluster fit ``nbytes`` (16 to 4096)."""
    return max(16, min(4096, nbytes // cluster_size))


def _nonzero(a: array.array):
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


def _extend_zeros(a: array.array, n: int) -> None:
    """Append ``n`` zero entries to ``a`` without a temporary list of ``n`` items."""
    zeros = array.array(a.typecode, bytes(a.itemsize * min(n, 1 << 16)))
    while n > 0:
        k = min(n, len(zeros))
        a.extend(zeros if k == len(zeros) else zeros[:k])
        n -= k


class _ClusterSet:
    """A set of host cluster indices held compactly.

    Single clusters (L2 tables, refcount blocks) live in a sorted ``array('Q')`` (8
    bytes a member) plus small sets of recent additions and removals, folded into
    the array once they hold ``FOLD`` members.  Runs of clusters (L1 tables, the
    refcount table, snapshot tables) live as disjoint ``[start, end)`` intervals in
    two sorted arrays (16 bytes a run, whatever its length).  Membership costs two
    set look-ups and two bisections."""

    FOLD = 4096
    __slots__ = ("_base", "_added", "_removed", "_starts", "_ends")

    def __init__(self, items=(), runs=()):
        self._added: set[int] = set()
        self._removed: set[int] = set()
        # sort in chunks, then merge: no list of every member at once
        chunks, chunk = [], []
        for c in items:
            chunk.append(c)
            if len(chunk) >= 65536:
                chunks.append(array.array("Q", sorted(chunk)))
                chunk = []
        if chunk:
            chunks.append(array.array("Q", sorted(chunk)))
        self._base = self._dedup(heapq.merge(*chunks) if len(chunks) > 1 else (chunks[0] if chunks else ()))
        self._starts = array.array("Q")
        self._ends = array.array("Q")
        for a, b in sorted((a, b) for a, b in runs if b > a):
            if self._ends and a <= self._ends[-1]:
                if b > self._ends[-1]:
                    self._ends[-1] = b
            else:
                self._starts.append(a)
                self._ends.append(b)

    @staticmethod
    def _dedup(sorted_iter) -> array.array:
        out = array.array("Q")
        last = None
        for c in sorted_iter:
            if c != last:
                out.append(c)
                last = c
        return out

    def _in_base(self, c: int) -> bool:
        b = self._base
        i = bisect_left(b, c)
        return i < len(b) and b[i] == c

    def _in_runs(self, c: int) -> bool:
        i = bisect_right(self._starts, c) - 1
        return i >= 0 and c < self._ends[i]

    def __contains__(self, c: int) -> bool:
        if c in self._added:
            return True
        if self._starts and self._in_runs(c):
            return True
        if c in self._removed:
            return False
        return self._in_base(c)

    def add(self, c: int) -> None:
        if c in self._removed:
            self._removed.discard(c)
        elif not self._in_base(c):
            self._added.add(c)
            self._maybe_fold()

    def add_range(self, c: int, n: int) -> None:
        """Add the run ``[c, c + n)``."""
        if n <= 0:
            return
        e = c + n
        st, en = self._starts, self._ends
        i = bisect_left(en, c)  # first run ending at or after c: touches or follows
        j = bisect_right(st, e)  # runs starting at or before e
        if i < j:
            c, e = min(c, st[i]), max(e, en[j - 1])
        st[i:j] = array.array("Q", [c])
        en[i:j] = array.array("Q", [e])

    def discard(self, c: int) -> None:
        if c in self._added:
            self._added.discard(c)
        elif c not in self._removed and self._in_base(c):
            self._removed.add(c)
            self._maybe_fold()
        if self._starts and self._in_runs(c):
            self.discard_range(c, 1)

    def discard_range(self, c: int, n: int) -> None:
        """Remove ``[c, c + n)`` from the runs (single members: see ``discard``)."""
        e = c + n
        st, en = self._starts, self._ends
        i = bisect_right(en, c)  # first run ending after c
        j = bisect_left(st, e)  # runs starting before e
        if i >= j:
            return
        ks, ke = array.array("Q"), array.array("Q")
        if st[i] < c:
            ks.append(st[i])
            ke.append(c)
        if en[j - 1] > e:
            ks.append(e)
            ke.append(en[j - 1])
        st[i:j] = ks
        en[i:j] = ke

    def first_in(self, start: int, end: int) -> int | None:
        """The smallest member in ``[start, end)``, or None."""
        if end - start <= 8:
            for c in range(start, end):
                if c in self:
                    return c
            return None
        cands = []
        i = bisect_right(self._starts, start) - 1
        if i >= 0 and start < self._ends[i]:
            return start
        if i + 1 < len(self._starts) and self._starts[i + 1] < end:
            cands.append(self._starts[i + 1])
        b = self._base
        k = bisect_left(b, start)
        while k < len(b) and b[k] < end:
            if b[k] not in self._removed:
                cands.append(b[k])
                break
            k += 1
        added = self._added
        if len(added) <= end - start:
            cands.extend(c for c in added if start <= c < end)
        else:
            stop = min(cands, default=end)
            for c in range(start, stop):
                if c in added:
                    cands.append(c)
                    break
        return min(cands, default=None)

    def _maybe_fold(self) -> None:
        if len(self._added) + len(self._removed) >= self.FOLD:
            rm = self._removed
            self._base = self._dedup(heapq.merge((c for c in self._base if c not in rm), sorted(self._added)))
            self._added = set()
            self._removed = set()

    def nbytes(self) -> int:
        n = len(self._added) + len(self._removed)
        return (len(self._base) + 2 * len(self._starts)) * 8 + sys.getsizeof(self._added) + sys.getsizeof(
            self._removed) + 32 * n


@register
class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    supports_backing = True
    default_cluster_size = 65536

    # ================================================================== open / create
    def __init__(self, host: HostStorage, read_only: bool):
        self.host = host
        self.read_only = read_only
        self.backing = None
        self.backing_ref = None
        self._closed = False
        self._snapshot_view: C.Snapshot | None = None
        self._snap_table_bytes = 0

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head[:4] == C.MAGIC

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        cs = opts.cluster_size or cls.default_cluster_size
        if cs & (cs - 1) or not (1 << MIN_CLUSTER_BITS) <= cs <= (1 << MAX_CLUSTER_BITS):
            raise UsageError(f"qcow2: cluster size must be a power of two between 512 and 2M (got {cs})")
        cbits = cs.bit_length() - 1
        comp = opts.compression
        if comp in (None, "none", "off", "false", "no", "0"):
            comp = None
        elif comp in ("on", "true", "yes", "1", "default"):
            comp = ""  # compressed writes, of compression_type (zlib, as qemu-img, if not given)
        elif comp not in ("zlib", "zstd"):
            raise UsageError(f"qcow2: compression must be zlib or zstd (got {comp!r})")
        extra = dict(opts.extra)
        order = 4
        if "refcount_bits" in extra:
            try:
                bits = int(extra.pop("refcount_bits"))
            except ValueError:
                raise UsageError("qcow2: refcount_bits must be a number") from None
            if bits <= 0 or bits & (bits - 1) or bits > 64:
                raise UsageError("qcow2: refcount_bits must be a power of two between 1 and 64")
            order = bits.bit_length() - 1
        ctype_opt = extra.pop("compression_type", None)
        if ctype_opt is not None:
            if ctype_opt not in ("zlib", "zstd"):
                raise UsageError(f"qcow2: compression_type must be zlib or zstd (got {ctype_opt!r})")
            if comp and comp != ctype_opt:
                raise UsageError("qcow2: compression and compression_type disagree")
        ctype_name = comp or ctype_opt or "zlib"
        if comp == "":
            comp = ctype_name
        compat = str(extra.pop("compat", "1.1"))
        if compat not in ("1.1", "v3", "3"):
            raise UsageError(f"qcow2: only compat=1.1 (version 3) images can be created (got {compat!r})")
        for key, off_values in (("lazy_refcounts", ("off", "false", "0")), ("preallocation", ("off",))):
            if key in extra and str(extra.pop(key)).lower() not in off_values:
                raise UsageError(f"qcow2: {key} is not supported")
        if extra:
            raise UsageError(f"qcow2: unknown option(s): {', '.join(sorted(extra))}")
        if size < 0 or size > (1 << 62):
            raise UsageError(f"qcow2: size {size} out of range")
        size = _ceil_div(size, 512) * 512  # as qemu-img: whole sectors (513 -> 1024)

        incompat = 0
        ctype = C.COMPRESSION_ZSTD if ctype_name == "zstd" else C.COMPRESSION_ZLIB
        if ctype != C.COMPRESSION_ZLIB:
            incompat |= C.INCOMPAT_COMPRESSION
        hdr = C.Header(
            version=3,
            backing_file_offset=0,
            backing_file_size=0,
            cluster_bits=cbits,
            size=0,
            crypt_method=0,
            l1_size=0,
            l1_table_offset=0,
            refcount_table_offset=cs,
            refcount_table_clusters=1,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=incompat,
            refcount_order=order,
            header_length=C.V3_HEADER_LENGTH,
            compression_type=ctype,
        )
        exts = []
        if opts.backing is not None:
            exts.append(C.backing_format_extension(opts.backing.format))
        if comp is not None:
            exts.append(C.encode_vdisk_options({"compress": comp}))
        ft = C.HeaderExtension(C.EXT_FEATURE_TABLE, C.encode_feature_table(C.default_feature_table()))
        name = opts.backing.filename.encode() if opts.backing is not None else b""
        if len(name) > MAX_BACKING_NAME:
            raise UsageError(f"qcow2: backing file name longer than {MAX_BACKING_NAME} bytes")
        if opts.backing is not None and opts.backing.snapshot:
            raise UsageError("qcow2: a backing file cannot name a snapshot")
        head = C.encode_header_area(hdr, exts + [ft], name, cs)
        if head is None:
            head = C.encode_header_area(hdr, exts, name, cs)
        if head is None:
            raise UsageError("qcow2: header, extensions and backing file name do not fit in one cluster")
        reftable = C.encode_u64_table([2 * cs]) + bytes(cs - 8)
        rb = C.new_refblock(cs, order)
        for i in range(3):
            rb[i] = 1
        host.pwrite(0, head.ljust(cs, b"\0") + reftable + C.encode_refblock(rb, order))
        host.flush()
        drv = cls.open(host, read_only=False)
        try:
            if size:
                drv.resize(size)
            drv.flush()
        finally:
            drv._release(close_host=False)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> Qcow2Driver:
        if snapshot is not None:
            read_only = True
        self = cls(host, read_only)
        self._load(snapshot)
        return self

    def _load(self, snapshot: str | None) -> None:
        host = self.host
        self._eof = host.size()
        head = host.pread(0, 4096)
        if head[:4] != C.MAGIC:
            raise CorruptImage(f"{host.name}: not a qcow2 image (bad magic {bytes(head[:4])!r})")
        # version and cluster_bits before anything is sized from them
        h = C.decode_header(head)
        if h.version not in (2, 3):
            raise UnsupportedFeature(f"{host.name}: qcow2 version {h.version} is not supported (only 2 and 3)")
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise CorruptImage(
                f"{host.name}: qcow2 cluster_bits {h.cluster_bits} out of range "
                f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS})"
            )
        cs = 1 << h.cluster_bits
        if cs > len(head):
            head = host.pread(0, cs)
        h = C.decode_header(head)
        self.hdr = h
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs
        name = host.name
        # --- features
        if h.crypt_method != 0:
            raise UnsupportedFeature(f"{name}: encrypted qcow2 images are not supported (crypt_method {h.crypt_method})")
        if h.version == 2:
            if h.refcount_order != 4:
                raise CorruptImage(f"{name}: qcow2 v2 refcount_order must be 4")
        if h.refcount_order > 6:
            raise CorruptImage(f"{name}: qcow2 refcount_order {h.refcount_order} is larger than 6")
        # header extensions (area: after the header, up to the backing name or the cluster end)
        ext_start = h.header_length if h.version >= 3 else C.V2_HEADER_LENGTH
        ext_end = cs
        if h.backing_file_offset:
            if h.backing_file_offset > cs or h.backing_file_size > MAX_BACKING_NAME:
                raise CorruptImage(f"{name}: qcow2 backing file name is too long or outside the first cluster")
            if h.backing_file_offset + h.backing_file_size > cs:
                raise CorruptImage(f"{name}: qcow2 backing file name runs past the first cluster")
            if h.backing_file_offset < ext_start:
                raise CorruptImage(f"{name}: qcow2 backing file name overlaps the header")
            ext_end = h.backing_file_offset
        self.exts = C.decode_extensions(head, ext_start, ext_end)
        ext_types = {e.type for e in self.exts}
        incompat = h.incompatible_features
        unknown = incompat & ~C.INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedFeature(f"{name}: qcow2 image uses unknown incompatible features: {self._feature_names(0, unknown)}")
        if incompat & C.INCOMPAT_DATA_FILE or C.EXT_DATA_FILE in ext_types:
            raise UnsupportedFeature(f"{name}: qcow2 images with an external data file are not supported")
        self.extl2 = bool(incompat & C.INCOMPAT_EXTL2)
        if self.extl2:
            if h.cluster_bits < 14:
                raise CorruptImage(f"{name}: qcow2 extended L2 entries need clusters of at least 16 KiB")
            if not self.read_only:
                raise UnsupportedFeature(
                    f"{name}: qcow2 images with extended L2 entries (subclusters) can only be opened read-only"
                )
        if C.EXT_CRYPTO in ext_types:
            raise UnsupportedFeature(f"{name}: encrypted qcow2 images are not supported")
        if incompat & C.INCOMPAT_COMPRESSION:
            if h.header_length <= 104 or h.compression_type == 0:
                raise CorruptImage(f"{name}: qcow2 compression type bit set but compression_type is zlib or missing")
        elif h.compression_type != 0:
            raise CorruptImage(f"{name}: qcow2 compression_type {h.compression_type} set without its feature bit")
        if h.compression_type not in C.COMPRESSION_NAMES:
            raise UnsupportedFeature(f"{name}: qcow2 compression type {h.compression_type} is not supported")
        if incompat & C.INCOMPAT_CORRUPT and not self.read_only:
            raise CorruptImage(
                f"{name}: qcow2 image is marked corrupt; it can only be opened read-only "
                "(repair it with 'qemu-img check -r all')"
            )
        if (C.EXT_BITMAPS in ext_types or h.autoclear_features & C.AUTOCLEAR_BITMAPS) and not self.read_only:
            raise UnsupportedFeature(f"{name}: qcow2 image has persistent dirty bitmaps; vdisk opens it read-only only")
        self.order = h.refcount_order
        self.rc_max = C.refcount_max(self.order)
        self.l2_entries = C.l2_entries(cs, self.extl2)
        self.rb_entries = C.refblock_entries(cs, self.order)
        # --- size and L1
        if h.size > (1 << 63) - 1:
            raise CorruptImage(f"{name}: qcow2 virtual size {h.size} is too large")
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(f"{name}: qcow2 L1 table size {h.l1_size} entries is too large (limit {MAX_L1_BYTES // 8})")
        need = _ceil_div(h.size, cs * self.l2_entries)
        if h.l1_size < need:
            raise CorruptImage(
                f"{name}: qcow2 L1 table ({h.l1_size} entries) is too small for the virtual size {h.size} "
                f"(needs {need})"
            )
        # --- refcount table
        if h.refcount_table_clusters == 0:
            raise CorruptImage(f"{name}: qcow2 refcount table has no clusters")
        if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
            raise CorruptImage(f"{name}: qcow2 refcount table ({h.refcount_table_clusters} clusters) is too large")
        self._check_table(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        budget.charge(h.refcount_table_clusters * cs, f"{name}: qcow2 refcount table")
        self.reftable = self._read_u64_table(h.refcount_table_offset, h.refcount_table_clusters * cs)
        self.reftable_capacity = len(self.reftable)
        # --- L1
        if h.l1_size:
            self._check_table(h.l1_table_offset, h.l1_size * 8, "L1 table")
            budget.charge(h.l1_size * 8, f"{name}: qcow2 L1 table ({h.l1_size} entries)")
            self.l1 = self._read_u64_table(h.l1_table_offset, h.l1_size * 8)
        else:
            self.l1 = array.array("Q")
        # --- snapshots
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise CorruptImage(f"{name}: qcow2 image claims {h.nb_snapshots} snapshots (limit {MAX_SNAPSHOTS})")
        budget.charge(h.nb_snapshots * SNAPSHOT_RECORD_BYTES, f"{name}: qcow2 snapshot table ({h.nb_snapshots} entries)")
        self.snapshots = self._read_snapshot_table(h.snapshots_offset, h.nb_snapshots)
        # --- backing file
        if h.backing_file_offset and h.backing_file_size:
            raw_name = head[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
            try:
                bname = bytes(raw_name).decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptImage(f"{name}: qcow2 backing file name is not valid UTF-8") from None
            fmt = C.backing_format(self.exts)
            if fmt is None:
                fmt = self._probe_backing_format(bname)
            self.backing_ref = BackingRef(bname, fmt)
        # --- state
        self.size = h.size
        self.comp_type = h.compression_type
        self.compress_writes = False
        for e in self.exts:
            if e.type == C.EXT_VDISK_OPTIONS:
                opts = C.decode_vdisk_options(e.data)
                self.compress_writes = opts.get("compress") in ("zlib", "zstd")
        # L2 tables and refcount blocks by host offset; dirty ones stay until flushed
        self._l2cache: TableCache[int, array.array] = TableCache(_cache_tables(L2_CACHE_BYTES, cs))
        self._rbcache: TableCache[int, array.array] = TableCache(_cache_tables(RB_CACHE_BYTES, cs))
        self._dirty_max = max(8, min(DIRTY_FLUSH_THRESHOLD, self._l2cache.capacity // 2))
        self._pending_free: dict[int, int] = {}
        self._l1_lo = self._l1_hi = 0  # entries [lo, hi) of the active L1 changed since the last flush
        self._reftable_dirty = False
        self._hdr_dirty = False
        self._free_hint = 0
        self._ctail: tuple[int, int] | None = None  # (next free byte, end of cluster) for compressed data
        self._dcache: tuple[int, bytes] | None = None  # last decompressed cluster (descriptor, data)
        if snapshot is not None:
            snap = self._find_snapshot(snapshot)
            self._snapshot_view = snap
            self.l1 = self._read_l1(snap.l1_table_offset, snap.l1_size, f"snapshot {snap.name!r} L1 table")
            self.size = snap.disk_size if snap.disk_size is not None else h.size
            if _ceil_div(self.size, cs * self.l2_entries) > snap.l1_size:
                raise CorruptImage(f"{name}: snapshot {snap.name!r} L1 table is too small for its disk size")
        self._build_meta_index()
        budget.charge(self._meta.nbytes(), f"{name}: qcow2 metadata index")
        if not self.read_only:
            changed = False
            if h.autoclear_features:
                # we maintain none of the autoclear features: clear them before writing
                self.hdr = self.hdr.replace(autoclear_features=0)
                changed = True
            if incompat & C.INCOMPAT_DIRTY:
                # refcounts may be stale: rebuild them from the mapping tables before any write
                self._repair_all(CheckResult())
                self.hdr = self.hdr.replace(incompatible_features=self.hdr.incompatible_features & ~C.INCOMPAT_DIRTY)
                changed = True
            if changed:
                self._write_header()
                self.host.flush()

    def _feature_names(self, kind: int, bits: int) -> str:
        table = {}
        for e in self.exts:
            if e.type == C.EXT_FEATURE_TABLE:
                for f in C.decode_feature_table(e.data):
                    table[(f.kind, f.bit)] = f.name
        names = []
        for b in range(64):
            if bits >> b & 1:
                names.append(table.get((kind, b)) or C.FEATURE_NAMES.get((kind, b)) or f"bit {b}")
        return ", ".join(names)

    def _probe_backing_format(self, bname: str) -> str:
        from .. import probe

        base = os.path.dirname(os.path.abspath(self.host.name))
        path = bname if os.path.isabs(bname) else os.path.join(base, bname)
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError:
            raise BackingError(
                f"{self.host.name}: backing file {bname!r} has no format recorded and cannot be read to probe it "
                "(backing format unknown, raw is never probed)"
            ) from None
        fmt = probe(head)
        if fmt not in ("qcow2", "vdk"):
            raise BackingError(
                f"{self.host.name}: backing file {bname!r} has no format recorded: backing format unknown, "
                "raw is never probed (set it with rebase -u -F FORMAT)"
            )
        return fmt

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

    def _mark_l1(self, lo: int, hi: int | None = None) -> None:
        """Entries ``[lo, hi)`` (default: entry ``lo``) of the active L1 changed."""
        hi = lo + 1 if hi is None else hi
        if self._l1_hi <= self._l1_lo:
            self._l1_lo, self._l1_hi = lo, hi
        else:
            self._l1_lo, self._l1_hi = min(self._l1_lo, lo), max(self._l1_hi, hi)

    def _read_l1(self, offset: int, l1_size: int, what: str) -> array.array:
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(f"{self.host.name}: qcow2 {what} size {l1_size} is too large")
        if l1_size == 0:
            return array.array("Q")
        self._check_table(offset, l1_size * 8, what)
        return self._read_u64_table(offset, l1_size * 8)

    def _read_snapshot_table(self, offset: int, count: int) -> list[C.Snapshot]:
        self._snap_table_bytes = 0
        if count == 0:
            return []
        cs = self.cluster_size
        if offset == 0 or offset % cs or offset >= self._eof:
            raise CorruptImage(f"{self.host.name}: qcow2 snapshot table offset {offset:#x} is invalid or past the file end")
        snaps = []
        pos = offset
        limit = min(self._eof, offset + MAX_SNAPSHOT_TABLE_BYTES)
        for i in range(count):
            if pos + C.SNAPSHOT_FIXED_SIZE > limit:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot table entry {i} lies past the end of the file")
            extra, length = C.snapshot_entry_lengths(self.host.pread(pos, C.SNAPSHOT_FIXED_SIZE))
            if extra > C.MAX_SNAPSHOT_EXTRA:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {i} has {extra} bytes of extra data (too many)")
            total = (length + 7) & ~7
            # the padding of the last entry need not exist in the file
            if pos + length > limit:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot table entry {i} runs past the end of the file")
            snap, _ = C.decode_snapshot(self.host.pread(pos, total), 0)
            if snap.l1_size * 8 > MAX_L1_BYTES:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {snap.name!r} L1 table is too large")
            if snap.l1_size and (snap.l1_table_offset % cs or snap.l1_table_offset == 0):
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {snap.name!r} L1 table offset is not aligned")
            snaps.append(snap)
            pos += total
        self._snap_table_bytes = pos - offset
        return snaps

    def _build_meta_index(self) -> None:
        """Index every host cluster that holds metadata: the header cluster, the
        refcount table and blocks, the active L1 table and its L2 tables, the
        snapshot table, each snapshot's L1 table and the L2 tables they point to.

        A data cluster (standard or compressed L2 entry) inside one of them is
        corruption: reads, writes and snapshot operations refuse it (``_guard``)
        instead of handing metadata out as guest data or overwriting it.  The index
        is kept up to date as metadata is allocated (``_meta.add``) and freed
        (refcount 0 in ``_apply_pending_free``).  Offsets that are invalid (not
        aligned, past the end of the file) are left out: other checks report them.
        Snapshot L1 tables are read once here, up to ``MAX_SNAPSHOT_L1_SCAN`` bytes
        in all; L2 tables that only snapshots past that amount use are not indexed."""
        cs = self.cluster_size
        h = self.hdr
        eof = self._eof
        self._meta_partial = False

        runs = []

        def table(off: int, nbytes: int) -> None:
            if off and not off % cs and nbytes > 0 and off < eof:
                runs.append((off // cs, _ceil_div(min(off + nbytes, eof), cs)))

        def l2s(l1):
            for _, e in _nonzero(l1):
                off = e & C.OFFSET_MASK
                if off and not off % cs and off < eof:
                    yield off // cs

        table(h.refcount_table_offset, h.refcount_table_clusters * cs)
        table(h.l1_table_offset, h.l1_size * 8)
        if h.nb_snapshots:
            table(h.snapshots_offset, self._snap_table_bytes)
        roots = [(s.l1_table_offset, s.l1_size) for s in self.snapshots]
        if self._snapshot_view is not None:
            roots.insert(0, (h.l1_table_offset, h.l1_size))
        for off, n in roots:
            if n and not off % cs and off + n * 8 <= eof:
                table(off, n * 8)

        def members():
            yield 0  # the header
            yield from l2s(self.reftable)  # refcount block offsets: same layout as L1 entries
            if self._snapshot_view is None:
                yield from l2s(self.l1)
            seen = set()
            scanned = 0
            for off, n in roots:
                if not n or off % cs or off + n * 8 > eof or (off, n) in seen:
                    continue
                seen.add((off, n))
                if scanned + n * 8 > MAX_SNAPSHOT_L1_SCAN:
                    self._meta_partial = True
                    continue
                scanned += n * 8
                pos, end = off, off + n * 8
                while pos < end:
                    k = min(TABLE_READ_CHUNK, end - pos)
                    yield from l2s(C.decode_u64_table(self.host.pread(pos, k)))
                    pos += k

        self._meta = _ClusterSet(members(), runs)

    def _guard(self, e: int, gci: int) -> None:
        """Refuse the L2 entry ``e`` (guest cluster ``gci``) if the host clusters it
        references hold metadata (see ``_build_meta_index``)."""
        if e & C.FLAG_COMPRESSED:
            ent = C.decode_l2_entry(e, self.cluster_bits)
            a, b = C.compressed_host_range(ent)
            hit = self._meta.first_in(a >> self.cluster_bits, ((b - 1) >> self.cluster_bits) + 1)
        else:
            off = e & C.OFFSET_MASK
            hit = off >> self.cluster_bits if off and (off >> self.cluster_bits) in self._meta else None
        if hit is not None:
            raise CorruptImage(
                f"{self.host.name}: qcow2 L2 entry for guest offset {gci * self.cluster_size} points at host "
                f"offset {hit * self.cluster_size:#x}, which holds qcow2 metadata (run check)"
            )

    def _find_snapshot(self, name: str) -> C.Snapshot:
        if name.startswith("#") and name[1:].isdigit():  # #ID: by id only
            for s in self.snapshots:
                if s.id == name[1:]:
                    return s
            raise SnapshotNotFound(f"{self.host.name}: no snapshot with id {name[1:]}")
        for s in self.snapshots:
            if s.name == name:
                return s
        for s in self.snapshots:
            if s.id == name:
                return s
        raise SnapshotNotFound(f"{self.host.name}: no snapshot named {name!r}")

    # ================================================================== lifecycle
    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only:
                self.flush()
        finally:
            self._release(close_host=True)

    def _release(self, *, close_host: bool) -> None:
        self._closed = True
        if close_host:
            self.host.close()

    # ================================================================== low-level metadata access
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

    def _rc(self, c: int) -> int:
        ri, i = divmod(c, self.rb_entries)
        if ri >= len(self.reftable):
            return 0
        off = self.reftable[ri] & C.OFFSET_MASK
        if not off:
            return 0
        return self._rb(off)[i]

    def _rc_set(self, c: int, value: int) -> None:
        if value > self.rc_max or value < 0:
            raise VdiskError(
                f"{self.host.name}: refcount of cluster {c} would be {value}, beyond the "
                f"{1 << self.order}-bit limit of this image"
            )
        ri, i = divmod(c, self.rb_entries)
        off = self.reftable[ri] & C.OFFSET_MASK if ri < len(self.reftable) else 0
        if not off:
            off = self._create_refblock(ri)
        self._rb(off)[i] = value
        self._rbcache.mark_dirty(off)

    def _create_refblock(self, ri: int) -> int:
        """A new refcount block for range ``ri``, placed at that range's first cluster
        (free by definition: no block means every refcount in the range is 0)."""
        c0 = ri * self.rb_entries
        off = c0 * self.cluster_size
        if off >= MAX_HOST_OFFSET:
            raise VdiskError(f"{self.host.name}: qcow2 image is full (host offset limit reached)")
        self._refuse_meta(c0, c0 + 1)
        self._meta.add(c0)
        if ri >= len(self.reftable):
            if (ri + 1) * 8 > MAX_REFTABLE_BYTES:
                raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
            _extend_zeros(self.reftable, ri + 1 - len(self.reftable))
        b = C.new_refblock(self.cluster_size, self.order)
        b[0] = 1
        self._rbcache.put(off, b, dirty=True)
        self.reftable[ri] = off
        self._reftable_dirty = True
        return off

    def _refuse_meta(self, start: int, end: int) -> None:
        """Clusters about to be handed out must not hold metadata (a refcount of 0 on
        metadata is corruption; reusing the cluster would overwrite it)."""
        hit = self._meta.first_in(start, end)
        if hit is not None:
            raise CorruptImage(
                f"{self.host.name}: qcow2 metadata at host offset {hit * self.cluster_size:#x} has refcount 0 "
                "(run check -r all)"
            )

    def _has_block(self, ri: int) -> bool:
        return ri < len(self.reftable) and bool(self.reftable[ri] & C.OFFSET_MASK)

    def _alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous free clusters (refcount set to 1); return the
        first cluster's host offset.

        Ranges without a refcount block count as free.  Blocks the run needs are
        placed right after it (a block lives in the range it describes when that
        range has none yet), so runs longer than one block's range stay contiguous."""
        rbe = self.rb_entries
        c = self._free_hint
        start = c
        run = 0
        first_free = None
        while run < n:
            ri, i = divmod(c, rbe)
            if not self._has_block(ri):
                if run == 0:
                    start = c
                    if first_free is None:
                        first_free = start
                take = min(rbe - i, n - run)
                run += take
                c += take
                continue
            blk = self._rb(self.reftable[ri] & C.OFFSET_MASK)
            # scan this block without a call per cluster
            while i < rbe and run < n:
                if blk[i] == 0:
                    if run == 0:
                        start = ri * rbe + i
                        if first_free is None:
                            first_free = start
                    run += 1
                else:
                    run = 0
                i += 1
            c = ri * rbe + i
        end = start + n
        if end * self.cluster_size > MAX_HOST_OFFSET:
            raise VdiskError(f"{self.host.name}: qcow2 image is full (host offset limit reached)")
        self._refuse_meta(start, end)
        # refcount blocks for the ranges of the run that have none, placed after it
        pending = [ri for ri in range(start // rbe, (end - 1) // rbe + 1) if not self._has_block(ri)]
        placed: dict[int, int] = {}
        taken: set[int] = set()
        q = end
        while pending:
            ri = pending.pop(0)
            while True:
                qri, qi = divmod(q, rbe)
                if q not in taken and (not self._has_block(qri) or self._rb(self.reftable[qri] & C.OFFSET_MASK)[qi] == 0):
                    break
                q += 1
            self._refuse_meta(q, q + 1)
            placed[ri] = q
            taken.add(q)
            qri = q // rbe
            if not self._has_block(qri) and qri not in placed and qri not in pending:
                pending.append(qri)
            q += 1
        for ri, cl in placed.items():
            if ri >= len(self.reftable):
                if (ri + 1) * 8 > MAX_REFTABLE_BYTES:
                    raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
                _extend_zeros(self.reftable, ri + 1 - len(self.reftable))
            off = cl * self.cluster_size
            self._rbcache.put(off, C.new_refblock(self.cluster_size, self.order), dirty=True)
            self._meta.add(cl)
            self.reftable[ri] = off
            self._reftable_dirty = True
        for cl in placed.values():
            self._rc_set(cl, 1)
        for i in range(start, end):
            self._rc_set(i, 1)
        # clusters before the first free one found are all in use: skip them next time
        self._free_hint = end if first_free == start else first_free
        return start * self.cluster_size

    def _free_cluster(self, c: int, count: int = 1) -> None:
        """Drop one reference to cluster ``c`` -- applied at the end of the next flush."""
        self._pending_free[c] = self._pending_free.get(c, 0) + count

    def _incref(self, c: int) -> None:
        self._rc_set(c, self._rc(c) + 1)

    def _clusters_of_range(self, start: int, end: int) -> range:
        cs = self.cluster_size
        return range(start // cs, (end - 1) // cs + 1)

    def _release_entry(self, e: int, gci: int) -> None:
        """The L2 entry ``e`` (of guest cluster ``gci``) is being replaced: drop its
        references.  One pointing into metadata is refused first (dropping its
        reference would free the metadata)."""
        if not e:
            return
        self._guard(e, gci)
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.COMPRESSED:
            a, b = C.compressed_host_range(ent)
            for c in self._clusters_of_range(a, b):
                self._free_cluster(c)
        elif ent.host_offset and ent.kind in (C.NORMAL, C.ZERO):
            self._free_cluster(ent.host_offset // self.cluster_size)

    def _entry_refs(self, e: int):
        """Host clusters an L2 entry references (one reference each)."""
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.COMPRESSED:
            a, b = C.compressed_host_range(ent)
            return self._clusters_of_range(a, b)
        if ent.host_offset and ent.kind in (C.NORMAL, C.ZERO):
            return (ent.host_offset // self.cluster_size,)
        return ()

    # ------------------------------------------------------------------ mapping lookup
    def _entry(self, gci: int) -> int:
        l1i, l2i = divmod(gci, self.l2_entries)
        if l1i >= len(self.l1):
            return 0
        l1e = self.l1[l1i]
        off = l1e & C.OFFSET_MASK
        if not off:
            return 0
        if self.extl2:
            # bit 0 is not a zero flag with extended entries: the bitmap says
            return C.ext_l2_descriptor(self._l2(off, f" (L1 index {l1i})")[2 * l2i])
        return self._l2(off, f" (L1 index {l1i})")[l2i]

    def _ext_bitmap(self, gci: int) -> int:
        l1i, l2i = divmod(gci, self.l2_entries)
        if l1i >= len(self.l1) or not self.l1[l1i] & C.OFFSET_MASK:
            return 0
        return self._l2(self.l1[l1i] & C.OFFSET_MASK)[2 * l2i + 1]  # the second word: the bitmap

    def _ext_pieces(self, offset: int, length: int):
        """Extended L2 entries: (guest pos, length, kind, host offset or entry) per subcluster run."""
        cs = self.cluster_size
        scs = cs // C.SUBCLUSTERS
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            e = self._entry(gci)
            if e & C.FLAG_COMPRESSED:
                n = min(cs - coff, end - pos)
                yield pos, n, "c", e
                pos += n
                continue
            bm = self._ext_bitmap(gci)
            alloc, zero = C.decode_subcluster_bitmap(bm)
            host = e & C.OFFSET_MASK
            sc = coff // scs
            n = min(scs - coff % scs, end - pos)
            if alloc >> sc & 1:
                if not host or host % cs:
                    raise CorruptImage(
                        f"{self.host.name}: qcow2 subcluster at guest offset {pos} is allocated without a valid cluster"
                    )
                self._guard(host, gci)
                yield pos, n, "d", host + coff
            elif zero >> sc & 1:
                yield pos, n, "z", None
            else:
                yield pos, n, "u", None
            pos += n

    def _read_ext(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pieces = list(self._ext_pieces(offset, length))
        i = 0
        while i < len(pieces):
            pos, n, kind, x = pieces[i]
            if kind == "u":
                j = i + 1
                while j < len(pieces) and pieces[j][2] == "u":
                    n += pieces[j][1]
                    j += 1
                out += self.backing.read(pos, n) if self.backing is not None else bytes(n)
                i = j
                continue
            if kind == "d":
                out += self.host.pread(x, n)
            elif kind == "z":
                out += bytes(n)
            else:
                coff = pos % self.cluster_size
                out += self._decompress(x, C.decode_l2_entry(x, self.cluster_bits), pos // self.cluster_size)[
                    coff : coff + n
                ]
            i += 1
        return bytes(out)

    def _l2_for_write(self, l1i: int) -> tuple[int, array.array]:
        """The L2 table for L1 index ``l1i``, allocated and owned by the active L1 only."""
        cs = self.cluster_size
        l1e = self.l1[l1i]
        off = l1e & C.OFFSET_MASK
        if not off:
            new = self._alloc(1)
            self._meta.add(new // cs)
            t = self._l2cache.put(new, array.array("Q", bytes(cs)), dirty=True)
            self.l1[l1i] = new | C.FLAG_COPIED
            self._mark_l1(l1i)
            return new, t
        t = self._l2(off, f" (L1 index {l1i})")
        if self._rc(off // cs) == 1:
            if not l1e & C.FLAG_COPIED:
                self.l1[l1i] = off | C.FLAG_COPIED
                self._mark_l1(l1i)
            return off, t
        # shared with a snapshot: copy the table.  The data clusters keep their
        # refcounts (each L1 -> L2 path counts once) and stay shared, so no entry
        # of the copy may carry the COPIED flag.
        new = self._alloc(1)
        self._meta.add(new // cs)
        t2 = array.array("Q", t)
        for i, e in enumerate(t2):
            if e & C.FLAG_COPIED:
                t2[i] = e & ~C.FLAG_COPIED
        self._l2cache.put(new, t2, dirty=True)
        self.l1[l1i] = new | C.FLAG_COPIED
        self._mark_l1(l1i)
        self._free_cluster(off // cs)
        return new, t2

    # ================================================================== data path
    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        if self.extl2:
            return self._read_ext(offset, length)
        cs = self.cluster_size
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            e = self._entry(gci)
            ent = C.decode_l2_entry(e, self.cluster_bits)
            n = min(cs - coff, end - pos)
            kind = ent.kind
            if kind == C.NORMAL:
                host = self._data_offset(ent, gci)
                # extend over host-contiguous clusters
                while pos + n < end and n < (4 << 20):
                    e2 = C.decode_l2_entry(self._entry((pos + n) // cs), self.cluster_bits)
                    if e2.kind != C.NORMAL or e2.host_offset != host + coff + n or e2.reserved:
                        break
                    if e2.host_offset >= self._eof:
                        break
                    n += min(cs, end - pos - n)
                if n > cs - coff:
                    # the run must not reach into metadata: one look-up for all of it;
                    # cut it before the first metadata cluster (the next round names it)
                    first = (host >> self.cluster_bits) + 1
                    hit = self._meta.first_in(first, (host + coff + n - 1 >> self.cluster_bits) + 1)
                    if hit is not None:
                        n = (hit << self.cluster_bits) - host - coff
                out += self.host.pread(host + coff, n)
            elif kind == C.UNALLOCATED:
                while pos + n < end:
                    g2 = (pos + n) // cs
                    if C.decode_l2_entry(self._entry(g2), self.cluster_bits).kind != C.UNALLOCATED:
                        break
                    n += min(cs, end - pos - n)
                if self.backing is not None:
                    out += self.backing.read(pos, n)
                else:
                    out += bytes(n)
            elif kind == C.ZERO:
                if ent.reserved:
                    self._data_offset(ent, gci)  # raises
                out += bytes(n)
            else:
                out += self._decompress(e, ent, gci)[coff : coff + n]
            pos += n
        return bytes(out)

    def _data_offset(self, ent: C.L2Entry, gci: int) -> int:
        """The host offset of a standard data cluster, validated (also against the
        metadata index: a data cluster inside metadata is corruption)."""
        host = ent.host_offset
        where = f"{self.host.name}: qcow2 L2 entry for guest offset {gci * self.cluster_size}"
        if ent.reserved:
            raise CorruptImage(f"{where} has reserved bits set ({ent.reserved:#x})")
        if host % self.cluster_size:
            raise CorruptImage(f"{where}: data cluster {host:#x} is not cluster aligned")
        if host >= self._eof:
            raise CorruptImage(f"{where}: data cluster {host:#x} lies beyond the end of the file ({self._eof} bytes)")
        if (host >> self.cluster_bits) in self._meta:
            raise CorruptImage(f"{where} points at host offset {host:#x}, which holds qcow2 metadata (run check)")
        return host

    def _decompress(self, e: int, ent: C.L2Entry, gci: int) -> bytes:
        if self._dcache is not None and self._dcache[0] == e:
            return self._dcache[1]
        a, b = C.compressed_host_range(ent)
        where = f"{self.host.name}: qcow2 compressed cluster at guest offset {gci * self.cluster_size}"
        if b > self._eof + 512:
            raise CorruptImage(f"{where} (host offset {a:#x}) lies beyond the end of the file")
        self._guard(e, gci)
        try:
            data = C.decompress_cluster(self.host.pread(a, b - a), self.comp_type, self.cluster_size)
        except CorruptImage as exc:
            raise CorruptImage(f"{where} (host offset {a:#x}): {exc}") from None
        self._dcache = (e, data)
        return data

    def _cluster_content(self, gci: int, e: int) -> bytes:
        cs = self.cluster_size
        ent = C.decode_l2_entry(e, self.cluster_bits)
        if ent.kind == C.NORMAL:
            return self.host.pread(self._data_offset(ent, gci), cs)
        if ent.kind == C.ZERO:
            return bytes(cs)
        if ent.kind == C.COMPRESSED:
            return self._decompress(e, ent, gci)
        if self.backing is not None:
            return self.backing.read(gci * cs, cs)
        return bytes(cs)

    def _writable(self) -> None:
        if self.read_only:
            raise VdiskError(f"{self.host.name}: image is open read-only")

    def write(self, offset: int, data: bytes) -> None:
        self._writable()
        cs = self.cluster_size
        mv = memoryview(data)
        pos = offset
        end = offset + len(data)
        while pos < end:
            gci, coff = divmod(pos, cs)
            l1i, l2i = divmod(gci, self.l2_entries)
            n = min(cs - coff, end - pos)
            l2off, t = self._l2_for_write(l1i)
            e = t[l2i]
            if e:
                self._guard(e, gci)  # before anything is allocated or released for it
            src = mv[pos - offset : pos - offset + n]
            if self._owned(e, gci):
                # owned alone: rewrite in place, merging following clusters of this
                # L2 table that are owned too and host-contiguous
                host = e & C.OFFSET_MASK
                j = l2i + 1
                while pos + n < end and j < self.l2_entries:
                    e2 = t[j]
                    if (e2 & C.OFFSET_MASK) != host + (j - l2i) * cs or not self._owned(e2, gci + j - l2i):
                        break
                    n += min(cs, end - pos - n)
                    j += 1
                self._pwrite(host + coff, mv[pos - offset : pos - offset + n])
                pos += n
                continue
            if n == cs and not self.compress_writes:
                # full clusters needing allocation: allocate a run, write it at once
                k = 1
                while (
                    pos + (k + 1) * cs <= end
                    and l2i + k < self.l2_entries
                    and not self._owned(t[l2i + k], gci + k)
                    and k < 256
                ):
                    self._guard(t[l2i + k], gci + k)
                    k += 1
                new = self._alloc(k)
                self._pwrite(new, mv[pos - offset : pos - offset + k * cs])
                for j in range(k):
                    self._release_entry(t[l2i + j], gci + j)
                    t[l2i + j] = (new + j * cs) | C.FLAG_COPIED
                self._l2cache.mark_dirty(l2off)
                pos += k * cs
                continue
            if n == cs:
                buf = src
            else:
                base = bytearray(self._cluster_content(gci, e))
                base[coff : coff + n] = src
                buf = base
            new_e = self._store_cluster(buf, full=(n == cs))
            self._release_entry(e, gci)
            t[l2i] = new_e
            self._l2cache.mark_dirty(l2off)
            pos += n
        self._dcache = None
        self._maybe_flush()

    def _owned(self, e: int, gci: int) -> bool:
        """A normal data cluster referenced by the active table only (COPIED, and
        refcount 1 -- checked as well, so that a wrong flag cannot make us write
        into a cluster a snapshot shares).  An entry pointing into metadata is
        refused (CorruptImage), never rewritten in place."""
        if not e & C.FLAG_COPIED or e & (C.FLAG_COMPRESSED | C.FLAG_ZERO):
            return False
        self._guard(e, gci)
        h = e & C.OFFSET_MASK
        return bool(h) and self._rc(h // self.cluster_size) == 1

    def _store_cluster(self, buf, *, full: bool) -> int:
        """Write one cluster of guest data somewhere new; return its L2 entry."""
        cs = self.cluster_size
        if full and self.compress_writes:
            blob = C.compress_cluster(bytes(buf), self.comp_type)
            if len(blob) <= cs - 512:
                return self._place_compressed(blob)
        new = self._alloc(1)
        self._pwrite(new, buf)
        return new | C.FLAG_COPIED

    def _place_compressed(self, blob: bytes) -> int:
        cs = self.cluster_size
        n = len(blob)
        # each compressed entry holds one reference on its host cluster: with narrow
        # refcounts keep room for a few snapshots' references too
        share_cap = max(1, (self.rc_max + 1) // 8)
        if (
            self._ctail is not None
            and self._ctail[0] + n <= self._ctail[1]
            and self._rc(self._ctail[0] // cs) < share_cap
        ):
            at = self._ctail[0]
            self._incref(at // cs)  # the open cluster gains a reference
        else:
            k = _ceil_div(n, cs)
            at = self._alloc(k)  # fresh clusters: their refcount 1 is this entry's
        end = at + n
        self._pwrite(at, blob)
        cend = ((end - 1) // cs + 1) * cs
        self._ctail = (end, cend) if end < cend else None
        return C.encode_compressed(at, n, self.cluster_bits)

    def _maybe_flush(self) -> None:
        if len(self._l2cache.dirty) + len(self._rbcache.dirty) > self._dirty_max or len(self._pending_free) > 65536:
            self.flush()

    def _zero_or_discard(self, offset: int, length: int, discard: bool) -> None:
        self._writable()
        cs = self.cluster_size
        pos = offset
        end = offset + length
        v3 = self.hdr.version >= 3
        while pos < end:
            gci, coff = divmod(pos, cs)
            n = min(cs - coff, end - pos)
            full = n == cs or (coff == 0 and pos + n >= self.size)
            if not full:
                cur = self._entry(gci)
                kind = C.decode_l2_entry(cur, self.cluster_bits).kind
                if not (kind == C.ZERO or (kind == C.UNALLOCATED and self.backing is None)):
                    self.write(pos, bytes(n))
                pos += n
                continue
            l1i, l2i = divmod(gci, self.l2_entries)
            cur = self._entry(gci)
            ent = C.decode_l2_entry(cur, self.cluster_bits)
            if self.backing is None:
                if ent.kind == C.UNALLOCATED or (ent.kind == C.ZERO and not discard):
                    pos += n
                    continue
                want = 0 if (discard or not v3) else C.FLAG_ZERO
            else:
                if not v3:
                    self.write(pos, bytes(n))
                    pos += n
                    continue
                if ent.kind == C.ZERO and not ent.host_offset:
                    pos += n
                    continue
                want = C.FLAG_ZERO
            l2off, t = self._l2_for_write(l1i)
            old = t[l2i]
            self._release_entry(old, gci)
            t[l2i] = want
            self._l2cache.mark_dirty(l2off)
            pos += n
        self._dcache = None
        self._maybe_flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._zero_or_discard(offset, length, discard=False)

    def discard(self, offset: int, length: int) -> None:
        self._zero_or_discard(offset, length, discard=True)

    # ================================================================== flush
    def flush(self) -> None:
        if self.read_only or self._closed:
            return
        self._flush_metadata()

    def _ensure_reftable_capacity(self) -> tuple[int, int] | None:
        """If the in-memory refcount table outgrew its clusters, allocate a bigger
        one.  Returns (old offset, old clusters) to free once the header points to the new one."""
        if len(self.reftable) <= self.reftable_capacity:
            return None
        cs = self.cluster_size
        while True:
            want_entries = len(self.reftable) + 2 + len(self.reftable) // 4
            n = _ceil_div(want_entries * 8, cs)
            if n * cs > MAX_REFTABLE_BYTES:
                raise VdiskError(f"{self.host.name}: qcow2 refcount table would exceed {MAX_REFTABLE_BYTES} bytes")
            off = self._alloc(n)
            if len(self.reftable) <= n * cs // 8:
                break
            for c in range(off // cs, off // cs + n):  # grew past it while allocating: again
                self._rc_set(c, 0)
        old = (self.hdr.refcount_table_offset, self.hdr.refcount_table_clusters)
        self._meta.add_range(off // cs, n)
        self.hdr = self.hdr.replace(refcount_table_offset=off, refcount_table_clusters=n)
        self.reftable_capacity = n * cs // 8
        return old

    def _write_reftable(self) -> None:
        cs = self.cluster_size
        off = self.hdr.refcount_table_offset
        self._write_u64_table(off, self.reftable, 0, len(self.reftable))
        pad = self.hdr.refcount_table_clusters * cs - len(self.reftable) * 8
        if pad > 0:
            self._pwrite(off + len(self.reftable) * 8, bytes(pad))

    def _write_dirty_refblocks(self) -> bool:
        dirty = self._rbcache.dirty_items()
        if not dirty:
            return False
        for off, b in dirty:
            self._pwrite(off, C.encode_refblock(b, self.order))
        self._rbcache.mark_clean()
        return True

    def _flush_metadata(self) -> None:
        host = self.host
        cs = self.cluster_size
        # 1. refcount increments (and guest data, written already)
        old_rt = self._ensure_reftable_capacity()
        self._write_dirty_refblocks()
        host.flush()
        # 2. refcount table
        if old_rt is not None:
            self._write_reftable()
            host.flush()
            self._write_header()
            host.flush()
            for c in range(old_rt[0] // cs, old_rt[0] // cs + old_rt[1]):
                self._free_cluster(c)
            self._reftable_dirty = False
        elif self._reftable_dirty:
            self._write_reftable()
            self._reftable_dirty = False
            host.flush()
        # 3. L2 tables
        dirty = self._l2cache.dirty_items()
        if dirty:
            for off, t in dirty:
                self._pwrite(off, C.encode_u64_table(t))
            self._l2cache.mark_clean()
            host.flush()
        # 4. L1 table and header
        if self._l1_hi > self._l1_lo or self._hdr_dirty:
            lo, hi = self._l1_lo, min(self._l1_hi, len(self.l1))
            if hi > lo:
                # only the changed entries, in whole 512-byte sectors
                lo &= ~63
                hi = min(len(self.l1), (hi + 63) & ~63)
                self._write_u64_table(self.hdr.l1_table_offset, self.l1, lo, hi)
            self._l1_lo = self._l1_hi = 0  # only once written: a failed write is retried
            if hi > lo and self._hdr_dirty:
                host.flush()
            if self._hdr_dirty:
                self._write_header()
                self._hdr_dirty = False
            host.flush()
        # 5. refcount decrements of dropped references
        if self._pending_free:
            self._apply_pending_free()
            # applying may have grown nothing (decrements only), but write the blocks
            self._write_dirty_refblocks()
            host.flush()

    def _apply_pending_free(self) -> None:
        cs = self.cluster_size
        freed = []
        pending, self._pending_free = self._pending_free, {}
        for c, k in sorted(pending.items()):
            rc = self._rc(c)
            if rc < k:
                raise CorruptImage(
                    f"{self.host.name}: qcow2 refcount of cluster {c} ({rc}) is lower than its references; "
                    "run check -r all"
                )
            self._rc_set(c, rc - k)
            if rc == k:
                freed.append(c)
                self._meta.discard(c)
                self._l2cache.pop(c * cs)  # also a dirty one: the table is gone
                self._rbcache.discard_clean(c * cs)
        if freed:
            self._free_hint = min(self._free_hint, freed[0])
            self._ctail = None
            self._dcache = None
            # give the space back to the host, in runs
            start = prev = freed[0]
            for c in freed[1:] + [None]:
                if c is not None and c == prev + 1:
                    prev = c
                    continue
                if start * cs < self._eof:
                    host_end = min((prev + 1) * cs, self._eof)
                    try:
                        self.host.punch_hole(start * cs, host_end - start * cs)
                    except VdiskError:
                        pass
                if c is not None:
                    start = prev = c

    def _write_header(self) -> None:
        self._pwrite(0, C.encode_header(self.hdr))

    # ================================================================== block status
    def _pieces(self, offset: int, length: int):
        if self.extl2:
            kinds = {"d": C.NORMAL, "z": C.ZERO, "u": C.UNALLOCATED, "c": C.COMPRESSED}
            for pos, n, kind, x in self._ext_pieces(offset, length):
                yield pos, n, kinds[kind], (x if kind == "d" else 0)
            return
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            gci, coff = divmod(pos, cs)
            n = min(cs - coff, end - pos)
            ent = C.decode_l2_entry(self._entry(gci), self.cluster_bits)
            yield pos, n, ent.kind, ent.host_offset + coff if ent.kind == C.NORMAL else 0
            pos += n

    def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for pos, n, kind, host in self._pieces(offset, length):
            if kind == C.NORMAL:
                ext = Extent(pos, n, Status.DATA, host_offset=host)
            elif kind == C.COMPRESSED:
                ext = Extent(pos, n, Status.DATA, compressed=True)
            elif kind == C.ZERO:
                ext = Extent(pos, n, Status.ZERO)
            else:
                ext = Extent(pos, n, Status.UNALLOCATED)
            if out:
                p = out[-1]
                if (
                    p.status == ext.status
                    and p.compressed == ext.compressed
                    and (p.host_offset is None) == (ext.host_offset is None)
                    and (p.host_offset is None or p.host_offset + p.length == ext.host_offset)
                ):
                    out[-1] = Extent(p.offset, p.length + n, p.status, p.host_offset, p.compressed)
                    continue
            out.append(ext)
        return out

    # ================================================================== resize
    def resize(self, new_size: int) -> None:
        """Grow or shrink the active state, as qemu-img 7.2 does: also under internal
        snapshots (each keeps its own size and L1 table; clusters past the new end
        lose the active state's reference only), except in a version 2 image,
        whose snapshots may not record their size (NotSupported, like qemu-img's
        "Can't resize a v2 image which has snapshots")."""
        self._writable()
        cs = self.cluster_size
        old_size = self.size
        if new_size == old_size:
            return
        if self.snapshots and self.hdr.version < 3:
            raise NotSupported(
                f"{self.host.name}: cannot resize a version 2 (compat=0.10) qcow2 image that has internal snapshots"
            )
        per_l1 = cs * self.l2_entries
        need = _ceil_div(new_size, per_l1)
        if need * 8 > MAX_L1_BYTES:
            raise UsageError(f"{self.host.name}: qcow2 size {new_size} needs an L1 table beyond {MAX_L1_BYTES} bytes")
        if new_size < old_size:
            # the new size first, durably: nothing past it is visible from then on, so
            # a crash in what follows leaves the shrunk image with clusters past its
            # end still referenced -- never the old size with part of its end dropped
            self.size = new_size
            self.hdr = self.hdr.replace(size=new_size)
            self._hdr_dirty = True
            self.flush()
            # zero the tail of the new last cluster, so that growing again (here or by
            # another implementation) cannot expose the dropped bytes
            tail = min(old_size, _ceil_div(new_size, cs) * cs)
            if tail > new_size:
                kind = C.decode_l2_entry(self._entry(new_size // cs), self.cluster_bits).kind
                if kind in (C.NORMAL, C.COMPRESSED):
                    self.write(new_size, bytes(tail - new_size))
            # drop every cluster past the new end
            first_gone = _ceil_div(new_size, cs)
            last = _ceil_div(old_size, cs)
            for gci in range(first_gone, min(last, need * self.l2_entries)):
                l1i, l2i = divmod(gci, self.l2_entries)
                off = self.l1[l1i] & C.OFFSET_MASK
                if not off:
                    continue
                e = self._l2(off)[l2i]
                if e:
                    wl2, t = self._l2_for_write(l1i)
                    self._release_entry(t[l2i], gci)
                    t[l2i] = 0
                    self._l2cache.mark_dirty(wl2)
            for l1i in range(need, len(self.l1)):
                off = self.l1[l1i] & C.OFFSET_MASK
                if off:
                    for i, e in enumerate(self._l2(off)):
                        if e:
                            self._release_entry(e, l1i * self.l2_entries + i)
                    self._free_cluster(off // cs)  # written if dirty, then freed at the flush
            self._set_l1_size(need)
            self.flush()
            return
        else:
            if need > len(self.l1):
                self._set_l1_size(need)
        self.size = new_size
        self.hdr = self.hdr.replace(size=new_size)
        self._hdr_dirty = True
        if new_size > old_size:
            # the grown range must read as zeros, never as stale data or backing data
            tail_end = min(new_size, _ceil_div(old_size, cs) * cs)
            if tail_end > old_size:
                kind = C.decode_l2_entry(self._entry(old_size // cs), self.cluster_bits).kind
                if kind in (C.NORMAL, C.COMPRESSED) or self.backing is not None:
                    self.write(old_size, bytes(tail_end - old_size))
            if self.backing is not None and self.backing.size > tail_end:
                z_end = min(new_size, self.backing.size)
                if z_end > tail_end:
                    self.write_zeroes(tail_end, z_end - tail_end)
        self.flush()

    def _set_l1_size(self, need: int) -> None:
        """Make the active L1 table ``need`` entries long, relocating it when it needs
        more clusters; the old clusters are freed after the header moves."""
        cs = self.cluster_size
        old_off = self.hdr.l1_table_offset
        old_clusters = _ceil_div(len(self.l1) * 8, cs)
        new_clusters = _ceil_div(need * 8, cs)
        if need > len(self.l1):
            _extend_zeros(self.l1, need - len(self.l1))
        else:
            del self.l1[need:]
        if new_clusters > old_clusters or (old_off == 0 and need):
            new_off = self._alloc(new_clusters)
            self._meta.add_range(new_off // cs, new_clusters)
            if old_off and old_clusters:
                for c in range(old_off // cs, old_off // cs + old_clusters):
                    self._free_cluster(c)
            self.hdr = self.hdr.replace(l1_table_offset=new_off, l1_size=need)
        else:
            for c in range(old_off // cs + new_clusters, old_off // cs + old_clusters):
                self._free_cluster(c)
            self.hdr = self.hdr.replace(l1_size=need, l1_table_offset=old_off if need else 0)
        self._mark_l1(0, len(self.l1))
        self._hdr_dirty = True

    # ================================================================== chains
    def make_empty(self) -> None:
        """Drop every cluster of the active state: its L1 entries become zero, so all
        of it reads through to the backing image again (``commit`` empties an overlay
        this way).  Snapshots keep their data: only the active tree's references
        go.  Durable when this returns; freed clusters are punched out of the file."""
        self._writable()
        self.flush()
        cs = self.cluster_size
        per = self.l2_entries
        for l1i, l1e in _nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            for i, e in enumerate(self._l2(off, f" (L1 index {l1i})")):
                if e:
                    self._release_entry(e, l1i * per + i)
            self._free_cluster(off // cs)
            self.l1[l1i] = 0
            self._mark_l1(l1i)
        self._ctail = None
        self._dcache = None
        self.flush()

    # ================================================================== memory
    def metadata_bytes(self) -> int:
        """Bytes of metadata this driver holds in memory now, for one memory budget
        per chain (the block layer sums it over the images of a chain).

        Counted: the L1 table in use (8 bytes an entry, ``array('Q')``), the refcount
        table (8 bytes an entry), every cached L2 table and refcount block, clean or
        dirty (a table is a compact array of the cluster's entries), the
        metadata-cluster index (8 bytes a metadata cluster, see
        ``_build_meta_index``), the snapshot records, the last decompressed
        cluster and the refcount decrements waiting for the next flush.  The
        compact arrays are exact; Python containers (the snapshot records, the
        pending decrements, the dirty sets) are estimated per item.

        It changes as the caches fill: clean L2 tables are kept up to
        ``L2_CACHE_BYTES`` and refcount blocks up to ``RB_CACHE_BYTES`` (at least 16
        and at most 4096 of each); dirty ones
        stay until the next flush (``write`` flushes past ``DIRTY_FLUSH_THRESHOLD``
        of them).  At open it is about the L1 table plus the refcount table."""
        n = self.l1.itemsize * len(self.l1) + self.reftable.itemsize * len(self.reftable)
        n += self._l2cache.nbytes(100) + self._rbcache.nbytes(100)
        n += self._meta.nbytes()
        n += sum(SNAPSHOT_RECORD_BYTES + len(s.id) + len(s.name) + len(s.extra_tail) for s in self.snapshots)
        n += len(self._dcache[1]) if self._dcache is not None else 0
        n += 100 * len(self._pending_free) + 60 * (len(self._l2cache.dirty) + len(self._rbcache.dirty))
        return n

    # ================================================================== info
    def info(self) -> dict:
        h = self.hdr
        return {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "qcow2_version": h.version,
            "cluster_size": self.cluster_size,
            "refcount_bits": 1 << h.refcount_order,
            "compression_type": C.COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type)),
            "compressed_writes": self.compress_writes,
            "lazy_refcounts": bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS),
            "dirty": bool(h.incompatible_features & C.INCOMPAT_DIRTY),
            "corrupt": bool(h.incompatible_features & C.INCOMPAT_CORRUPT),
            "extended_l2": bool(h.incompatible_features & C.INCOMPAT_EXTL2),
            "l1_size": len(self.l1),
            "snapshots": len(self.snapshots),
            "snapshot": self._snapshot_view.name if self._snapshot_view else None,
        }

    # ================================================================== backing reference
    def set_backing(self, ref: BackingRef | None) -> None:
        self._writable()
        cs = self.cluster_size
        exts = [e for e in self.exts if e.type != C.EXT_BACKING_FORMAT]
        name = b""
        if ref is not None:
            if ref.snapshot:
                raise UsageError("qcow2: a backing file cannot name a snapshot")
            exts.insert(0, C.backing_format_extension(ref.format))
            name = ref.filename.encode()
            if len(name) > MAX_BACKING_NAME:
                raise UsageError(f"qcow2: backing file name longer than {MAX_BACKING_NAME} bytes")
        self.flush()
        hdr = self.hdr
        head = C.encode_header_area(hdr, exts, name, cs)
        if head is None:
            raise UsageError("qcow2: header, extensions and backing file name do not fit in one cluster")
        self.hdr = C.decode_header(head.ljust(cs, b"\0"))
        self.exts = exts
        self._pwrite(0, head.ljust(cs, b"\0"))
        self.host.flush()
        self.backing_ref = ref

    # ================================================================== tree walks
    def _tree_refs(self, l1: array.array):
        """Every host cluster the tree of ``l1`` references, once per reference: each
        L2 table, then the clusters of its entries.  Entries pointing into metadata
        are refused (``_guard``)."""
        cs = self.cluster_size
        per = self.l2_entries
        for l1i, l1e in _nonzero(l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            yield off // cs
            for i, e in enumerate(self._l2(off, f" (L1 index {l1i})")):
                if e:
                    self._guard(e, l1i * per + i)
                    yield from self._entry_refs(e)

    def _add_tree_refs(self, l1: array.array, delta: int) -> None:
        """One reference more (``delta`` +1) or less (-1) to every cluster of the tree
        of ``l1``.  An increment that would overflow a refcount (or a tree pointing
        into metadata) raises with nothing changed."""
        if delta > 0:
            self._incref_tree(l1, keep=True)
        else:
            for c in self._tree_refs(l1):
                self._free_cluster(c)

    def _precheck_increment(self, l1: array.array) -> None:
        """Raise before anything changes if one more reference to the tree of ``l1``
        would overflow a refcount (or the tree points into metadata)."""
        self._incref_tree(l1, keep=False)

    def _incref_tree(self, l1: array.array, *, keep: bool) -> None:
        """Increment every reference of the tree of ``l1`` in memory; on a failure take
        every increment back and raise; without ``keep`` take them back anyway (a dry
        run: the refcounts themselves count, so no memory per cluster is needed -- a
        dict of every data cluster cost ~100 bytes a cluster)."""
        done = 0
        failure = None
        try:
            for c in self._tree_refs(l1):
                rc = self._rc(c)
                if rc + 1 > self.rc_max:
                    failure = UnsupportedFeature(
                        f"{self.host.name}: cluster {c} would need refcount {rc + 1} or more, beyond the "
                        f"{1 << self.order}-bit refcounts of this image (create it with wider refcount_bits)"
                    )
                    break
                self._rc_set(c, rc + 1)
                done += 1
        except BaseException:
            self._decref_first(l1, done)
            raise
        if failure is not None or not keep:
            self._decref_first(l1, done)
        if failure is not None:
            raise failure

    def _decref_first(self, l1: array.array, n: int) -> None:
        """Take back the increments of the first ``n`` references of the tree."""
        for c in itertools.islice(self._tree_refs(l1), n):
            self._rc_set(c, self._rc(c) - 1)

    def _clear_copied_flags(self) -> None:
        for l1i, l1e in _nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            if l1e & C.FLAG_COPIED:
                self.l1[l1i] = l1e & ~C.FLAG_COPIED
                self._mark_l1(l1i)
            t = self._l2(off)
            if any(e & C.FLAG_COPIED for e in t):
                for i, e in enumerate(t):
                    if e & C.FLAG_COPIED:
                        t[i] = e & ~C.FLAG_COPIED
                self._l2cache.mark_dirty(off)

    def _fix_copied_flags(self) -> None:
        """Make bit 63 of the active L1/L2 entries say exactly "refcount is 1"."""
        cs = self.cluster_size
        for l1i, l1e in _nonzero(self.l1):
            off = l1e & C.OFFSET_MASK
            if not off:
                continue
            own = self._rc(off // cs) == 1
            want = off | (C.FLAG_COPIED if own else 0)
            if l1e != want:
                self.l1[l1i] = want
                self._mark_l1(l1i)
            t = self._l2(off)
            changed = False
            for i, e in enumerate(t):
                if not e or e & C.FLAG_COMPRESSED:
                    if e & C.FLAG_COMPRESSED and e & C.FLAG_COPIED:
                        t[i] = e & ~C.FLAG_COPIED
                        changed = True
                    continue
                h = e & C.OFFSET_MASK
                flag = bool(h) and self._rc(h // cs) == 1
                ne = (e | C.FLAG_COPIED) if flag else (e & ~C.FLAG_COPIED)
                if ne != e:
                    t[i] = ne
                    changed = True
            if changed:
                self._l2cache.mark_dirty(off)

    # ================================================================== snapshots
    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        out = []
        for s in self.snapshots:
            out.append(
                SnapshotInfo(
                    id=int(s.id) if s.id.isdigit() else 0,
                    name=s.name,
                    created=s.date_sec + s.date_nsec / 1e9,
                    size=s.disk_size if s.disk_size is not None else self.hdr.size,
                    extra={"id": s.id, "vm_state_size": s.vm_state_size, "vm_clock_nsec": s.vm_clock_nsec},
                )
            )
        return out

    def _write_snapshot_table(self, snaps: list[C.Snapshot]) -> None:
        """Write a new snapshot table elsewhere and point the header at it (on flush)."""
        cs = self.cluster_size
        data = C.encode_snapshot_table(snaps)
        old_off, old_n = self.hdr.snapshots_offset, self.hdr.nb_snapshots
        old_clusters = _ceil_div(self._snap_table_bytes, cs) if old_n else 0
        if data:
            new = self._alloc(_ceil_div(len(data), cs))
            self._meta.add_range(new // cs, _ceil_div(len(data), cs))
            self._pwrite(new, data)
        else:
            new = 0
        self.hdr = self.hdr.replace(snapshots_offset=new, nb_snapshots=len(snaps))
        self._hdr_dirty = True
        if old_n and old_off:
            for c in range(old_off // cs, old_off // cs + old_clusters):
                self._free_cluster(c)
        self._snap_table_bytes = len(data)
        self.snapshots = snaps

    def snapshot_create(self, name: str) -> SnapshotInfo:
        name = validate_snapshot_name(name)  # before anything is written
        self._writable()
        if any(s.name == name for s in self.snapshots):
            raise SnapshotExists(f"{self.host.name}: snapshot {name!r} exists already")
        if len(self.snapshots) >= MAX_SNAPSHOTS:
            raise UsageError(f"{self.host.name}: too many snapshots")
        self.flush()
        cs = self.cluster_size
        self._precheck_increment(self.l1)
        # 1. every cluster becomes shared: clear the COPIED flags first, durably, so a
        #    crash can never leave COPIED set on a cluster a snapshot references
        self._clear_copied_flags()
        self.flush()
        # 2. copy of the active L1 (the COPIED flags mean nothing in a snapshot's table;
        #    none is set after step 1), written piece by piece from the active one
        n_l1 = len(self.l1)
        l1_off = self._alloc(_ceil_div(n_l1 * 8, cs)) if n_l1 else 0
        if n_l1:
            self._meta.add_range(l1_off // cs, _ceil_div(n_l1 * 8, cs))
            self._write_u64_table(l1_off, self.l1, 0, n_l1)
        # 3. the active tree gains a reference from the snapshot
        self._add_tree_refs(self.l1, +1)
        ids = [int(s.id) for s in self.snapshots if s.id.isdigit()]
        now = time.time()
        snap = C.Snapshot(
            l1_table_offset=l1_off,
            l1_size=n_l1,
            id=str(max(ids, default=0) + 1),
            name=name,
            date_sec=int(now),
            date_nsec=int((now % 1) * 1e9),
            vm_clock_nsec=0,
            vm_state_size=0,
            disk_size=self.size,
            extra_size=16,  # vm_state_size (64 bits) and disk_size
        )
        self._write_snapshot_table(self.snapshots + [snap])
        self.flush()
        return self.snapshot_list()[-1]

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        """Give snapshot ``name`` (or ``#ID``) the name ``new_name`` (validated as for
        ``snapshot_create``): a new snapshot table is written elsewhere and the
        header switched to it at the flush, as for every snapshot table change."""
        new_name = validate_snapshot_name(new_name)
        self._writable()
        snap = self._find_snapshot(name)
        if any(s.name == new_name for s in self.snapshots if s is not snap):
            raise SnapshotExists(f"{self.host.name}: snapshot {new_name!r} exists already")
        self.flush()
        renamed = dataclasses.replace(snap, name=new_name)
        self._write_snapshot_table([renamed if s is snap else s for s in self.snapshots])
        self.flush()
        return next(i for i, s in zip(self.snapshot_list(), self.snapshots) if s is renamed)

    def snapshot_delete(self, name: str) -> None:
        self._writable()
        snap = self._find_snapshot(name)
        self.flush()
        cs = self.cluster_size
        l1 = self._read_l1(snap.l1_table_offset, snap.l1_size, f"snapshot {snap.name!r} L1 table")
        self._write_snapshot_table([s for s in self.snapshots if s is not snap])
        self._add_tree_refs(l1, -1)
        for c in range(snap.l1_table_offset // cs, snap.l1_table_offset // cs + _ceil_div(snap.l1_size * 8, cs)):
            self._free_cluster(c)
        self.flush()
        self._fix_copied_flags()
        self.flush()

    def snapshot_revert(self, name: str) -> None:
        self._writable()
        snap = self._find_snapshot(name)
        self.flush()
        cs = self.cluster_size
        l1 = self._read_l1(snap.l1_table_offset, snap.l1_size, f"snapshot {snap.name!r} L1 table")
        new_size = snap.disk_size if snap.disk_size is not None else self.hdr.size
        if _ceil_div(new_size, cs * self.l2_entries) > len(l1):
            raise CorruptImage(f"{self.host.name}: snapshot {snap.name!r} L1 table is too small for its disk size")
        # the snapshot's tree gains a reference from the new active L1 ...
        self._add_tree_refs(l1, +1)
        # ... and the current active tree loses one
        old_l1 = self.l1
        self._add_tree_refs(old_l1, -1)
        old_off = self.hdr.l1_table_offset
        old_clusters = _ceil_div(len(old_l1) * 8, cs)
        new_l1 = l1  # read for this revert only: clear its COPIED flags in place
        for i, e in enumerate(new_l1):
            if e & C.FLAG_COPIED:
                new_l1[i] = e & ~C.FLAG_COPIED
        new_off = self._alloc(_ceil_div(len(new_l1) * 8, cs)) if len(new_l1) else 0
        if new_off:
            self._meta.add_range(new_off // cs, _ceil_div(len(new_l1) * 8, cs))
        if old_off and old_clusters:
            for c in range(old_off // cs, old_off // cs + old_clusters):
                self._free_cluster(c)
        # clear COPIED in the shared L2 tables (safe side) before they become active
        for _, e in _nonzero(new_l1):
            off = e & C.OFFSET_MASK
            if off:
                self._meta.add(off // cs)
                t = self._l2(off)
                if any(x & C.FLAG_COPIED for x in t):
                    for i, x in enumerate(t):
                        if x & C.FLAG_COPIED:
                            t[i] = x & ~C.FLAG_COPIED
                    self._l2cache.mark_dirty(off)
        self.l1 = new_l1
        self.hdr = self.hdr.replace(l1_table_offset=new_off, l1_size=len(new_l1), size=new_size)
        self.size = new_size
        self._mark_l1(0, len(new_l1))
        self._hdr_dirty = True
        self._dcache = None
        self.flush()
        self._fix_copied_flags()
        self.flush()

    # ================================================================== check / repair
    def _compute_refcounts(self, res: CheckResult, *, include_refcount_structures: bool = True, check_copied: bool = True):
        """Count every reference to every host cluster.  Returns (counts, n_file_clusters).
        Problems found on the way go to ``res.corruptions``."""
        cs = self.cluster_size
        eof = self._eof
        nclusters = _ceil_div(eof, cs)
        if nclusters > MAX_CHECK_CLUSTERS:
            raise NotSupported(
                f"{self.host.name}: the file spans {nclusters} clusters; check handles at most {MAX_CHECK_CLUSTERS}"
            )
        counts = array.array("Q", bytes(8 * (nclusters + 1)))
        # clusters referenced past the end of the file are reported, not counted
        def add(c: int, what: str) -> None:
            if c >= nclusters:
                res.corruptions.append(f"{what}: cluster {c} lies beyond the end of the file")
                return
            counts[c] += 1

        def add_range(off: int, nbytes: int, what: str) -> None:
            if nbytes <= 0:
                return
            for c in range(off // cs, (off + nbytes - 1) // cs + 1):
                add(c, what)

        add(0, "header")
        h = self.hdr

        def walk(l1: array.array, label: str, active: bool) -> None:
            for l1i, l1e in _nonzero(l1):
                off = l1e & C.OFFSET_MASK
                if not off:
                    continue
                if off % cs:
                    res.corruptions.append(f"{label} L1 entry {l1i}: L2 offset {off:#x} is not cluster aligned")
                    continue
                if off + cs > eof:
                    res.corruptions.append(f"{label} L1 entry {l1i}: L2 table at {off:#x} lies beyond the end of the file")
                    continue
                add(off // cs, f"{label} L2 table")
                if l1e & C.L1_RESERVED:
                    res.corruptions.append(f"{label} L1 entry {l1i}: reserved bits set ({l1e & C.L1_RESERVED:#x})")
                if active and check_copied:
                    _copied_check(res, f"{label} L1 entry {l1i}", bool(l1e & C.FLAG_COPIED), self._rc(off // cs))
                try:
                    t = self._l2(off)
                except CorruptImage as exc:
                    res.corruptions.append(str(exc))
                    continue
                entries = enumerate(t) if not self.extl2 else enumerate(map(C.ext_l2_descriptor, t[0::2]))
                for l2i, e in entries:
                    if not e:
                        continue
                    res.checked_clusters += 1
                    ent = C.decode_l2_entry(e, self.cluster_bits)
                    gofs = (l1i * self.l2_entries + l2i) * cs
                    if ent.reserved and not self.extl2:
                        res.corruptions.append(
                            f"{label} guest offset {gofs}: L2 entry has reserved bits set ({ent.reserved:#x})"
                        )
                    if ent.kind == C.COMPRESSED:
                        res.compressed_clusters += 1
                        res.allocated_clusters += 1
                        a, b = C.compressed_host_range(ent)
                        if a >= eof:
                            res.corruptions.append(f"{label} guest offset {gofs}: compressed data beyond the end of file")
                            continue
                        add_range(a, b - a, f"{label} compressed cluster")
                        continue
                    if ent.host_offset:
                        if ent.host_offset % cs:
                            res.corruptions.append(
                                f"{label} guest offset {gofs}: data cluster offset {ent.host_offset:#x} not aligned"
                            )
                            continue
                        if ent.kind == C.NORMAL:
                            res.allocated_clusters += 1
                        add(ent.host_offset // cs, f"{label} data cluster at guest offset {gofs}")
                        if active and check_copied:
                            rc = self._rc(ent.host_offset // cs)
                            _copied_check(res, f"{label} guest offset {gofs}", bool(ent.copied), rc)

        if len(self.l1):
            add_range(h.l1_table_offset, len(self.l1) * 8, "active L1 table")
        if self._snapshot_view is None:
            walk(self.l1, "active", True)
        else:
            act = self._read_l1(h.l1_table_offset, h.l1_size, "active L1 table")
            walk(act, "active", False)
        if h.nb_snapshots:
            add_range(h.snapshots_offset, self._snap_table_bytes, "snapshot table")
        for s in self.snapshots:
            try:
                l1 = self._read_l1(s.l1_table_offset, s.l1_size, f"snapshot {s.name!r} L1 table")
            except CorruptImage as exc:
                res.corruptions.append(str(exc))
                continue
            add_range(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.name!r} L1 table")
            walk(l1, f"snapshot {s.name!r}", False)
        if include_refcount_structures:
            add_range(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
            for ri, e in enumerate(self.reftable):
                off = e & C.OFFSET_MASK
                if not off:
                    continue
                if off % cs or off + cs > eof:
                    res.corruptions.append(f"refcount table entry {ri}: block offset {off:#x} invalid")
                    continue
                add(off // cs, "refcount block")
        return counts, nclusters

    def check(self, *, repair: str | None = None) -> CheckResult:
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"qcow2: repair must be 'leaks' or 'all' (got {repair!r})")
        if repair and self.read_only:
            raise VdiskError(f"{self.host.name}: image is open read-only; cannot repair")
        if not self.read_only:
            self.flush()
        res = self._check_once()
        if repair is None or (not res.corruptions and not res.leaks):
            return res
        if repair == "leaks" or not res.corruptions:
            counts, _ = self._compute_refcounts(CheckResult())
            fixed = 0
            for c in self._stored_clusters():
                rc = self._rc(c)
                want = counts[c] if c < len(counts) else 0
                if rc > want:
                    self._rc_set(c, want)
                    fixed += 1
            self._write_dirty_refblocks()
            self.host.flush()
            self._free_hint = 0
            self._build_meta_index()
            if self._snapshot_view is None:
                self._fix_copied_flags()
                self._flush_metadata()
            after = self._check_once()
            after.repaired.append(f"{fixed} leaked cluster(s) freed; COPIED flags set where refcount is 1")
            return after
        self._repair_all(res)
        after = self._check_once()
        after.repaired.append("refcounts rebuilt from the mapping tables; COPIED flags fixed")
        return after

    def _stored_clusters(self):
        """Every cluster index that has a stored refcount (all of each existing block)."""
        for ri, e in enumerate(self.reftable):
            if e & C.OFFSET_MASK:
                yield from range(ri * self.rb_entries, (ri + 1) * self.rb_entries)

    def _check_once(self) -> CheckResult:
        res = CheckResult()
        counts, nclusters = self._compute_refcounts(res)
        leaked = 0
        rbe = self.rb_entries
        for ri, e in enumerate(self.reftable):
            base = ri * rbe
            off = e & C.OFFSET_MASK
            blk = None
            if off:
                try:
                    blk = self._rb(off)
                except CorruptImage as exc:
                    res.corruptions.append(str(exc))
            seg = counts[base : min(base + rbe, nclusters)]
            if blk is not None:
                try:
                    same = array.array(blk.typecode, seg) == blk[: len(seg)] and not any(blk[len(seg) :])
                except OverflowError:
                    same = False
            else:
                same = not any(seg)
            if same:
                continue
            for i in range(rbe):
                c = base + i
                rc = blk[i] if blk is not None else 0
                want = counts[c] if c < nclusters else 0
                if rc == want:
                    continue
                if rc > want:
                    leaked += 1
                    if len(res.leaks) < 1000:
                        res.leaks.append(f"cluster {c}: refcount {rc}, references {want}")
                else:
                    res.corruptions.append(f"cluster {c}: refcount {rc} but {want} reference(s)")
        for c in range(len(self.reftable) * rbe, nclusters):
            if counts[c]:
                res.corruptions.append(f"cluster {c}: has no refcount block but {counts[c]} reference(s)")
        res.leaked_clusters = leaked
        if leaked > len(res.leaks):
            res.leaks.append(f"... {leaked} leaked clusters in all")
        return res

    def _repair_all(self, res: CheckResult) -> None:
        """Rebuild the whole refcount structure from the mapping tables (new refcount
        table and blocks written past every used cluster), then fix COPIED flags."""
        cs = self.cluster_size
        self._rbcache.clear()
        self._pending_free.clear()
        counts, nclusters = self._compute_refcounts(CheckResult(), include_refcount_structures=False, check_copied=False)
        used_end = nclusters
        while used_end > 0 and counts[used_end - 1] == 0:
            used_end -= 1
        rbe = self.rb_entries
        nb = nt = 0
        while True:
            total = used_end + nb + nt
            nb2 = _ceil_div(total, rbe)
            nt2 = _ceil_div(nb2 * 8, cs)
            if (nb2, nt2) == (nb, nt):
                break
            nb, nt = nb2, nt2
        if nt * cs > MAX_REFTABLE_BYTES:
            raise VdiskError(f"{self.host.name}: rebuilt refcount table would be too large")
        total = used_end + nb + nt
        full = array.array("Q", bytes(8 * total))
        for c in range(min(used_end, len(counts))):
            full[c] = counts[c]
        blocks_at = used_end
        table_at = used_end + nb
        for c in range(used_end, total):
            full[c] = 1
        reftable = array.array("Q", bytes(8 * (nt * cs // 8)))
        for ri in range(nb):
            b = C.new_refblock(cs, self.order)
            chunk = full[ri * rbe : (ri + 1) * rbe]
            for i, v in enumerate(chunk):
                if v > self.rc_max:
                    raise VdiskError(f"{self.host.name}: cluster {ri * rbe + i} needs refcount {v}, beyond the limit")
                b[i] = v
            off = (blocks_at + ri) * cs
            self._pwrite(off, C.encode_refblock(b, self.order))
            reftable[ri] = off
        self._pwrite(table_at * cs, C.encode_u64_table(reftable))
        self.host.flush()
        self.hdr = self.hdr.replace(refcount_table_offset=table_at * cs, refcount_table_clusters=nt)
        self._write_header()
        self.host.flush()
        self.reftable = reftable
        self.reftable_capacity = len(reftable)
        self._reftable_dirty = False
        self._free_hint = 0
        self._build_meta_index()  # the refcount structure moved
        self._fix_copied_flags()
        self._flush_metadata()


def _copied_check(res: CheckResult, what: str, copied: bool, rc: int) -> None:
    """COPIED set on a shared cluster is a corruption (a write would go in place into
    data a snapshot shares).  COPIED clear on a cluster with refcount 1 only costs a
    needless copy-on-write -- a crash between the two updates leaves it -- so it is
    reported with the leaks and fixed by ``check -r leaks``."""
    if copied and rc != 1:
        res.corruptions.append(f"{what}: COPIED flag 1 but refcount {rc}")
    elif not copied and rc == 1:
        res.leaks.append(f"{what}: COPIED flag 0 but refcount 1 (harmless; fixed by repairing leaks)")

