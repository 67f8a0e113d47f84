"""Opening an image: the header, its extensions and every bound read from them;
the header's later rewrites (QEMU: ``qcow2_do_open``, ``qcow2_update_header``,
``qcow2_change_backing_file``).

Concern: deciding whether an image can be opened (and how: read-only only for
some features), validating every size and offset the header gives before
anything is sized from it, loading the L1 and refcount tables and the snapshot
table, and writing the header cluster back.

May assume: a freshly constructed driver (``Qcow2Driver.__init__`` set the
defaults of all runtime state) and the loaders of the other modules.

Guarantees:
  - Refused with ``UnsupportedFeature``: versions other than 2 and 3, unknown
    incompatible feature bits (named from the image's feature table), external
    data files, encryption, unknown compression types; writing images with
    extended L2 entries or persistent bitmaps.  ``CorruptImage``: a bad magic,
    cluster_bits outside 9..21, tables outside the file or beyond the limits of
    :mod:`.limits`, an L1 table too small for the size, a write open of an image
    marked corrupt.  The refcount table, the L1 table and the snapshot records are
    charged to :mod:`vdisk.budget` before they are read, the metadata index once
    it is built.
  - A read-write open clears the autoclear bits (vdisk maintains none of their
    features) and repairs an image with the dirty bit (refcounts rebuilt from
    the mapping tables) before anything else is written.
  - A backing file without a backing-format extension is probed and accepted
    only if it is qcow2 or vdk (raw is never probed).
  - ``set_backing`` rewrites the whole header cluster, durably, in one write.

State owned: ``hdr`` (the decoded header as it is, or will be at the next flush,
on disk), ``exts`` (its extensions), the geometry (``cluster_bits``,
``cluster_size``, ``l2_entries``, ``extl2``, ``order``, ``rc_max``,
``rb_entries``), ``size``, ``comp_type``, ``compress_writes``, ``backing_ref``.
"""

from __future__ import annotations

import array
import os

from ... import budget
from ...codec import qcow2 as C
from ...errors import BackingError, CorruptImage, UnsupportedFeature, UsageError
from ..base import BackingRef, CheckResult
from .limits import (
    DIRTY_FLUSH_THRESHOLD,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    SNAPSHOT_RECORD_BYTES,
    ceil_div,
)


class HeaderMixin:
    """Open (header validation and loading), header writes, the backing reference, info."""

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
        need = ceil_div(h.size, cs * self.l2_entries)
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
        self._init_caches()
        self._dirty_max = max(8, min(DIRTY_FLUSH_THRESHOLD, self._l2cache.capacity // 2))
        if snapshot is not None:
            snap = self._find_snapshot(snapshot)
            self._snapshot_view = snap
            self.l1 = self._read_l1(snap.l1_table_offset, snap.l1_size, f"snapshot {snap.name!r} L1 table")
            self.size = snap.disk_size if snap.disk_size is not None else h.size
            if ceil_div(self.size, cs * self.l2_entries) > snap.l1_size:
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

    def _write_header(self) -> None:
        self._pwrite(0, C.encode_header(self.hdr))

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
