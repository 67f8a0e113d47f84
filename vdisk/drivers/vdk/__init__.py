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

The driver is one class, :class:`VdkDriver`, assembled from one mixin per concern
(as QEMU splits ``block/qcow2*.c``); each module's docstring states its contract
and the state it owns, and ``VdkDriver.__init__`` creates every attribute, in one
place (the transaction-scoped ones are the fields of :class:`txn.TxnState`):

==============  =============================================================
``load``        open and create; the header choice; loading and validating tables
``alloc``       refcounts, the free-cluster heap, allocation, releasing table trees
``tables``      L1/L2 access, the L2 cache, copy-on-write of shared tables
``io``          read, write, write_zeroes/discard, block_status, compression
``txn``         the transaction: commit protocol, placing tables, header write
``snapshots``   snapshot create/delete/revert/rename/hold, snapshot records
``resize``      resize and make_empty
``check``       check and repair
``space``       space_usage
==============  =============================================================

Mixins on one class rather than composed objects: the concerns call each other at
every step of a write (io -> tables -> alloc -> io), and one ``self`` keeps those
calls direct.  The mixins are not drivers on their own: each may call the methods
of the others through ``self``, and none keeps state of its own beyond what
``__init__`` lists.  One rule keeps rollback complete: whatever a commit attempt
changes is a field of ``TxnState`` (see its docstring).  Byte layouts live in
:mod:`vdisk.codec.vdk` only.

Concurrency: a driver instance is used by one caller at a time (the FUSE layer
serialises requests on its trio thread); nothing here locks.
"""

from __future__ import annotations

import array

from ...codec import vdk as C
from ...errors import CorruptImage, UsageError
from ...host import HostStorage
from .. import register
from ..base import BackingRef, BlockDriver
from ..names import validate_snapshot_name
from .alloc import AllocMixin
from .check import CheckMixin
from .io import IoMixin
from .load import MAX_L1_BYTES, LoadMixin
from .resize import ResizeMixin
from .snapshots import SnapshotMixin
from .space import SpaceMixin
from .tables import TablesMixin, l2_cache
from .txn import AUTO_COMMIT_DIRTY_L2, AUTO_COMMIT_PENDING_FREE, TxnMixin, TxnState

__all__ = ["AUTO_COMMIT_DIRTY_L2", "AUTO_COMMIT_PENDING_FREE", "MAX_L1_BYTES", "VdkDriver", "validate_snapshot_name"]


@register
class VdkDriver(LoadMixin, AllocMixin, TablesMixin, IoMixin, TxnMixin, SnapshotMixin, ResizeMixin, CheckMixin,
                SpaceMixin, BlockDriver):
    format_name = "vdk"
    supports_backing = True  # read by create, convert and the block layer
    default_cluster_size = 1 << C.DEFAULT_CLUSTER_BITS

    create_options = {
        "cluster_size": "4K to 2M, a power of two (default 64K)",
        "compression": "none (default) or zstd: how new clusters are written (compression_type is the same)",
        "compression_level": "zstd level, -7 to 19 (default 3)",
        "preallocation": "off only (vdk writes every change to a new cluster)",
    }

    @classmethod
    def probe(cls, head: bytes) -> bool:
        # either slot may be the valid one; a file with the magic in either is vdk
        return head[:8] == C.MAGIC or head[C.SLOT_SIZE:C.SLOT_SIZE + 8] == C.MAGIC


    def __init__(self, host: HostStorage, hdr: C.Header, *, read_only: bool):
        """Every attribute of an open image, grouped by the module that owns it (the
        one that changes it; any module may read it)."""
        # -- fixed when opened (here)
        self.host = host
        self.name = host.name
        self.read_only = read_only
        self.cbits = hdr.cluster_bits
        self.cluster_size = cs = 1 << self.cbits
        self.l2_bits = (cs // C.L2_ENTRY_SIZE).bit_length() - 1
        self.l2_mask = (1 << self.l2_bits) - 1
        self.rc_per_block = C.rc_entries(self.cbits)
        self.zero_cluster = bytes(cs)
        self.compression = hdr.compression_type
        self.backing = None  # the image below (attach_backing), or None
        self.backing_ref = (BackingRef(hdr.backing_name, hdr.backing_format, hdr.backing_snapshot or None)
                            if hdr.backing_name else None)
        # -- the root: the current header (and changes to it the next commit writes),
        #    the guest size and the snapshot records (load, txn, snapshots, resize)
        self.header = hdr
        self.size = hdr.virtual_size
        self.snapshots: list[C.SnapshotRecord] = []
        self.viewing: C.SnapshotRecord | None = None  # the snapshot a snapshot-opened image shows
        # -- the transaction-scoped state: allocation, refcounts, the L1 arrays, what the
        #    open transaction changed (one object, rolled back as a unit: txn.TxnState)
        self.txn = TxnState(host_clusters=hdr.host_clusters)
        # -- the L2 cache (tables): L2 index -> table, the transaction's changed ones dirty
        self.l2cache = l2_cache()
        # -- the request path (io)
        self._wq: list[tuple[int, object]] = []  # data writes queued by _store (see _write_queued)
        self._unwritten: dict[int, bytes] = {}  # host offset -> data whose write failed (retried at commit)
        # -- the commit (txn)
        self._header_unsure = False  # a header write failed: it may or may not be durable
        self._unpunched: set[int] = set()  # free clusters whose hole punch is deferred (txn._release_pending)
        self.slot = 0  # index of the header slot holding the current header
        self._slot_gen = hdr.generation
        self._closed = False
        self.broken: str | None = None  # why the image was found corrupt while writing: no more writes

    # read-only views of the transaction state, for tests and tools
    @property
    def rc(self) -> array.array | None:
        return self.txn.rc

    @property
    def l1_off(self) -> array.array:
        return self.txn.l1_off

    @property
    def host_clusters(self) -> int:
        return self.txn.host_clusters

    @property
    def image_id(self) -> str | None:
        return self.header.image_id.hex() if self.header.image_id else None

    def _corrupt(self, what: str) -> CorruptImage:
        return CorruptImage(f"{self.name}: {what}")

    def _check_writable(self) -> None:
        if self.broken:
            raise self._corrupt(f"image was found corrupt earlier ({self.broken}); refusing to write")

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
