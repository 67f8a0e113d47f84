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
    written), emptying the active state (``make_empty``, for ``commit``),
    compressed full-cluster writes when the image was created with compression;
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
write, discard and snapshot walks (:mod:`.cluster`); allocation refuses to hand
out metadata whose refcount is 0.

Memory: tables are ``array('Q')`` (8 bytes an entry), read and written in 1 MiB
pieces; ``metadata_bytes()`` says what the driver holds (for one budget per
chain), and the L1 and refcount tables are charged to :mod:`vdisk.budget` at open.

``check`` semantics follow qemu-img: refcount lower than the references, COPIED set
on a shared cluster, bad offsets or reserved bits are corruptions (exit 2); refcount
higher than the references is a leak (exit 3), and so is COPIED clear on a cluster
with refcount 1 (harmless: a crash inside ``snapshot_create`` can leave it).
``repair="leaks"`` lowers leaked refcounts and sets such COPIED flags;
``repair="all"`` rebuilds the whole refcount structure past the used clusters.

Crash consistency: metadata is cached and written back by ``flush`` in an order
after which a crash leaves at worst leaked clusters (:mod:`.flush` says which).

The package is split by concern as QEMU splits ``block/qcow2*.c``.  The driver
is one class, :class:`Qcow2Driver`, assembled from one mixin per module (mixins
rather than objects that call each other: the concerns share one image's state
and call each other both ways, as QEMU's files share one ``BDRVQcow2State``).  No
mixin has an ``__init__`` or state of its own: ``Qcow2Driver.__init__`` below
lists all the state in one place, and each module's docstring states its
contract -- what it may assume, what it guarantees, which of that state it owns
(alone changes and keeps consistent; the others read it or call the owner).

  ==============  =====================================================  ===============
  module          concern                                                QEMU
  ==============  =====================================================  ===============
  ``header``      open: header, extensions, bounds; header rewrites,     qcow2.c
                  the backing reference, info
  ``create``      create and its options                                 qcow2.c
  ``tables``      table I/O in pieces, bound checks, the L2 and          qcow2-cache.c
                  refcount-block caches (``drivers/cache.py``)
  ``cluster``     guest cluster -> L2 entry, L2 tables for writing,      qcow2-cluster.c
                  the metadata-overlap index
  ``clusterset``  the compact cluster set behind that index              --
  ``refcount``    refcounts, allocation, deferred frees, refcount table  qcow2-refcount.c
  ``trees``       references of whole L1 trees, COPIED flags             qcow2-refcount.c
  ``flush``       write-back order of the metadata (crash safety)        qcow2-cache.c
  ``read``        read, block_status                                     qcow2.c
  ``write``       write, write_zeroes, discard                           qcow2.c
  ``resize``      resize, the L1 table's length                          qcow2.c
  ``commit``      make_empty                                             qcow2.c
  ``snapshots``   the snapshot table, snapshot_*                         qcow2-snapshot.c
  ``check``       check and repair                                       qcow2-refcount.c
  ``limits``      implementation limits (no state)                       --
  ==============  =====================================================  ===============

The byte layouts are :mod:`vdisk.codec.qcow2`'s; snapshot names are
:mod:`vdisk.drivers.names`'s, shared with vdk.
"""

from __future__ import annotations

import array

from ...codec import qcow2 as C
from ...codec import qcow2_snapshot as CS
from ...host import HostStorage
from .. import register
from ..base import BackingRef, BlockDriver
from ..cache import TableCache
from ..names import MAX_SNAPSHOT_NAME, validate_snapshot_name
from .check import CheckMixin
from .cluster import MappingMixin
from .clusterset import ClusterSet
from .commit import CommitMixin
from .create import CreateMixin
from .flush import FlushMixin
from .header import HeaderMixin
from .limits import (
    DIRTY_FLUSH_THRESHOLD,
    L2_CACHE_BYTES,
    MAX_BACKING_NAME,
    MAX_CHECK_CLUSTERS,
    MAX_CLUSTER_BITS,
    MAX_HOST_OFFSET,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOT_L1_SCAN,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    RB_CACHE_BYTES,
    SNAPSHOT_RECORD_BYTES,
    TABLE_READ_CHUNK,
)
from .read import ReadMixin
from .refcount import RefcountMixin
from .resize import ResizeMixin
from .snapshots import SnapshotMixin
from .tables import TablesMixin
from .trees import TreesMixin
from .write import WriteMixin

#: the name this index had when it lived in ``drivers/qcow2.py``
_ClusterSet = ClusterSet

__all__ = [
    "Qcow2Driver",
    "validate_snapshot_name",
    "MAX_SNAPSHOT_NAME",
    "DIRTY_FLUSH_THRESHOLD",
    "L2_CACHE_BYTES",
    "MAX_BACKING_NAME",
    "MAX_CHECK_CLUSTERS",
    "MAX_CLUSTER_BITS",
    "MAX_HOST_OFFSET",
    "MAX_L1_BYTES",
    "MAX_REFTABLE_BYTES",
    "MAX_SNAPSHOT_L1_SCAN",
    "MAX_SNAPSHOT_TABLE_BYTES",
    "MAX_SNAPSHOTS",
    "MIN_CLUSTER_BITS",
    "RB_CACHE_BYTES",
    "SNAPSHOT_RECORD_BYTES",
    "TABLE_READ_CHUNK",
]


@register
class Qcow2Driver(
    HeaderMixin,
    CreateMixin,
    TablesMixin,
    MappingMixin,
    RefcountMixin,
    TreesMixin,
    FlushMixin,
    ReadMixin,
    WriteMixin,
    ResizeMixin,
    CommitMixin,
    SnapshotMixin,
    CheckMixin,
    BlockDriver,
):
    format_name = "qcow2"
    supports_backing = True
    default_cluster_size = 65536

    # ------------------------------------------------------------------ state
    # All the state of one open image, by the module that owns it (changes it and
    # keeps it consistent; the others read it or call the owner).  Set from the
    # file at open (``header.HeaderMixin._load``) unless ``__init__`` sets it.
    # header
    hdr: C.Header  # the header as on disk, or as it will be after the next flush
    exts: list[C.HeaderExtension]
    cluster_bits: int
    cluster_size: int
    l2_entries: int  # entries of one L2 table
    extl2: bool  # extended L2 entries (subclusters; read-only)
    order: int  # refcounts are 1 << order bits wide
    rc_max: int
    rb_entries: int  # refcounts in one refcount block
    size: int  # guest size of the active state (or of the snapshot viewed)
    comp_type: int  # compression type of compressed clusters
    compress_writes: bool  # full-cluster writes are stored compressed
    backing_ref: BackingRef | None
    # tables
    _eof: int  # size of the host file, as far as this driver knows
    _l2cache: TableCache[int, array.array]  # L2 tables by host offset
    _rbcache: TableCache[int, array.array]  # refcount blocks by host offset
    # cluster
    l1: array.array  # the active L1 table (or the viewed snapshot's)
    _l1_lo: int  # entries [_l1_lo, _l1_hi) of the active L1 changed since the last flush
    _l1_hi: int
    _meta: ClusterSet  # host clusters that hold metadata
    _meta_partial: bool  # snapshot L1 tables past MAX_SNAPSHOT_L1_SCAN are not in _meta
    # refcount
    reftable: array.array
    reftable_capacity: int  # entries the refcount table's clusters hold
    _reftable_dirty: bool
    _free_hint: int  # no free cluster lies below this one
    _pending_free: dict[int, int]  # cluster -> references to drop at the end of the next flush
    # flush
    _hdr_dirty: bool  # the header must be written at the next flush
    _dirty_max: int  # dirty tables past which a write flushes
    # read
    _dcache: tuple[int, bytes] | None  # the last decompressed cluster (descriptor, data)
    # write
    _ctail: tuple[int, int] | None  # (next free byte, end of its cluster) for compressed data
    # snapshots
    snapshots: list[CS.Snapshot]
    _snap_table_bytes: int  # bytes of the snapshot table in the file
    _snapshot_view: CS.Snapshot | None  # the snapshot an image opened with snapshot= shows

    def __init__(self, host: HostStorage, read_only: bool):
        """A driver with nothing loaded yet: ``open`` then reads the image."""
        self.host = host
        self.read_only = read_only
        self.backing = None  # the image below (attach_backing)
        self.backing_ref = None
        self._closed = False
        self._l1_lo = self._l1_hi = 0
        self._meta_partial = False
        self._reftable_dirty = False
        self._free_hint = 0
        self._pending_free = {}
        self._hdr_dirty = False
        self._dcache = None
        self._ctail = None
        self._snap_table_bytes = 0
        self._snapshot_view = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head[:4] == C.MAGIC

    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> Qcow2Driver:
        if snapshot is not None:
            read_only = True
        self = cls(host, read_only)
        self._load(snapshot)
        return self

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

    def metadata_bytes(self) -> int:
        """Bytes of metadata this driver holds in memory now, for one memory budget
        per chain (the block layer sums it over the images of a chain).

        Counted: the L1 table in use (8 bytes an entry, ``array('Q')``), the refcount
        table (8 bytes an entry), every cached L2 table and refcount block, clean or
        dirty (a table is a compact array of the cluster's entries), the
        metadata-cluster index (8 bytes a metadata cluster, see :mod:`.cluster`),
        the snapshot records, the last decompressed cluster and the refcount
        decrements waiting for the next flush.  The
        compact arrays are exact; Python containers (the snapshot records, the
        pending decrements, the dirty sets) are estimated per item.

        It changes as the caches fill: clean L2 tables are kept up to
        ``L2_CACHE_BYTES`` and refcount blocks up to ``RB_CACHE_BYTES`` (at least 16
        and at most 4096 of each); dirty ones stay until the next flush (``write``
        flushes past ``DIRTY_FLUSH_THRESHOLD`` of them).  At open it is about the L1 table plus the refcount table."""
        n = self.l1.itemsize * len(self.l1) + self.reftable.itemsize * len(self.reftable)
        n += self._l2cache.nbytes(100) + self._rbcache.nbytes(100)
        n += self._meta.nbytes()
        n += sum(SNAPSHOT_RECORD_BYTES + len(s.id) + len(s.name) + len(s.extra_tail) for s in self.snapshots)
        n += len(self._dcache[1]) if self._dcache is not None else 0
        n += 100 * len(self._pending_free) + 60 * (len(self._l2cache.dirty) + len(self._rbcache.dirty))
        return n
