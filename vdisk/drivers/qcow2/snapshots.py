"""Internal snapshots: the snapshot table, create, delete, revert, rename
(QEMU: ``qcow2-snapshot.c``).

Concern: the snapshot records and every change of them; what a snapshot does to
the refcounts of the tree it shares.

May assume: the tables, the look-up and metadata index, the refcounts and the
tree walks (:mod:`.trees`), and ``flush``.

Guarantees:
  - Names are validated (:func:`vdisk.drivers.names.validate_snapshot_name`) and
    checked for clashes before anything is written.
  - Every operation flushes before and after: durable when it returns.  A new
    snapshot table is always written elsewhere and the header switched to it at
    the flush; the old table's clusters are freed after that.
  - ``snapshot_create`` clears the COPIED flags of the active tree durably
    *before* the snapshot exists, so a crash can never leave COPIED on a cluster
    a snapshot references; an increment that would overflow a refcount is
    refused before anything changes (``_precheck_increment``).
  - ``snapshot_delete`` and ``snapshot_revert`` drop references through the
    deferred frees, then set COPIED again where the refcount became 1.
  - Reading the table bounds every entry against the file and
    ``MAX_SNAPSHOT_TABLE_BYTES`` before reading it whole.

State owned: ``snapshots`` (the decoded records, in table order),
``_snap_table_bytes`` (bytes of the table in the file) and ``_snapshot_view``
(the snapshot an image opened with ``snapshot=`` shows, else None).
"""

from __future__ import annotations

import dataclasses
import time

from ...codec import qcow2 as C
from ...codec import qcow2_snapshot as CS
from ...errors import CorruptImage, SnapshotExists, SnapshotNotFound, UsageError
from ..base import SnapshotInfo
from ..names import validate_snapshot_name
from .limits import MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS, ceil_div
from .tables import nonzero


class SnapshotMixin:
    """The snapshot table and the snapshot_* operations."""

    def _read_snapshot_table(self, offset: int, count: int) -> list[CS.Snapshot]:
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
            if pos + CS.SNAPSHOT_FIXED_SIZE > limit:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot table entry {i} lies past the end of the file")
            extra, length = CS.snapshot_entry_lengths(self.host.pread(pos, CS.SNAPSHOT_FIXED_SIZE))
            if extra > CS.MAX_SNAPSHOT_EXTRA:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {i} has {extra} bytes of extra data (too many)")
            total = (length + 7) & ~7
            # the padding of the last entry need not exist in the file
            if pos + length > limit:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot table entry {i} runs past the end of the file")
            snap, _ = CS.decode_snapshot(self.host.pread(pos, total), 0)
            if snap.l1_size * 8 > MAX_L1_BYTES:
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {snap.name!r} L1 table is too large")
            if snap.l1_size and (snap.l1_table_offset % cs or snap.l1_table_offset == 0):
                raise CorruptImage(f"{self.host.name}: qcow2 snapshot {snap.name!r} L1 table offset is not aligned")
            snaps.append(snap)
            pos += total
        self._snap_table_bytes = pos - offset
        return snaps

    def _find_snapshot(self, name: str) -> CS.Snapshot:
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

    def _write_snapshot_table(self, snaps: list[CS.Snapshot]) -> None:
        """Write a new snapshot table elsewhere and point the header at it (on flush)."""
        cs = self.cluster_size
        data = CS.encode_snapshot_table(snaps)
        old_off, old_n = self.hdr.snapshots_offset, self.hdr.nb_snapshots
        old_clusters = ceil_div(self._snap_table_bytes, cs) if old_n else 0
        if data:
            new = self._alloc(ceil_div(len(data), cs))
            self._meta.add_range(new // cs, ceil_div(len(data), cs))
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
        l1_off = self._alloc(ceil_div(n_l1 * 8, cs)) if n_l1 else 0
        if n_l1:
            self._meta.add_range(l1_off // cs, ceil_div(n_l1 * 8, cs))
            self._write_u64_table(l1_off, self.l1, 0, n_l1)
        # 3. the active tree gains a reference from the snapshot
        self._add_tree_refs(self.l1, +1)
        ids = [int(s.id) for s in self.snapshots if s.id.isdigit()]
        now = time.time()
        snap = CS.Snapshot(
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
        for c in range(snap.l1_table_offset // cs, snap.l1_table_offset // cs + ceil_div(snap.l1_size * 8, cs)):
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
        if ceil_div(new_size, cs * self.l2_entries) > len(l1):
            raise CorruptImage(f"{self.host.name}: snapshot {snap.name!r} L1 table is too small for its disk size")
        # the snapshot's tree gains a reference from the new active L1 ...
        self._add_tree_refs(l1, +1)
        # ... and the current active tree loses one
        old_l1 = self.l1
        self._add_tree_refs(old_l1, -1)
        old_off = self.hdr.l1_table_offset
        old_clusters = ceil_div(len(old_l1) * 8, cs)
        new_l1 = l1  # read for this revert only: clear its COPIED flags in place
        for i, e in enumerate(new_l1):
            if e & C.FLAG_COPIED:
                new_l1[i] = e & ~C.FLAG_COPIED
        new_off = self._alloc(ceil_div(len(new_l1) * 8, cs)) if len(new_l1) else 0
        if new_off:
            self._meta.add_range(new_off // cs, ceil_div(len(new_l1) * 8, cs))
        if old_off and old_clusters:
            for c in range(old_off // cs, old_off // cs + old_clusters):
                self._free_cluster(c)
        # clear COPIED in the shared L2 tables (safe side) before they become active
        for _, e in nonzero(new_l1):
            off = e & C.OFFSET_MASK
            if off:
                self._meta.add(off // cs)
                self._clear_l2_copied(off)
        self.l1 = new_l1
        self.hdr = self.hdr.replace(l1_table_offset=new_off, l1_size=len(new_l1), size=new_size)
        self.size = new_size
        self._mark_l1(0, len(new_l1))
        self._hdr_dirty = True
        self._dcache = None
        self.flush()
        self._fix_copied_flags()
        self.flush()
