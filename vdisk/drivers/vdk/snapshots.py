"""Internal snapshots and their holders (sections 10, 11.2 and 14).

Contract.  Creating a snapshot costs the same on any image: it commits, then
counts one more reference to the live L1 table and appends a record.  Deleting one
releases its L1 and recurses only into tables whose count reaches zero; a
snapshot that linked clones hold is hidden instead, and freed when its last hold
goes.  Reverting makes a snapshot's L1 the live one.  Every operation commits
before and after, so it is durable when it returns and a failure leaves the
previous generation.  New names are validated before anything is written, by the
one validator every format uses (:func:`vdisk.drivers.names.validate_snapshot_name`).

State owned: ``snapshots`` (the snapshot records, in table order, hidden ones
included), ``viewing`` (the record a snapshot-opened image shows, else None) and
``txn.snap_dirty`` (the table must be rewritten at the next commit).
"""

from __future__ import annotations

import time
import uuid

from ...codec import vdk as C
from ...errors import SnapshotExists, SnapshotNotFound, UsageError
from ..base import Holder, SnapshotInfo
from ..names import validate_snapshot_name


class SnapshotMixin:
    """snapshot_* operations and the snapshot records."""

    def _find_snapshot(self, name: str, *, include_hidden: bool = False) -> C.SnapshotRecord:
        if name.startswith("#") and name[1:].isdigit():
            for r in self.snapshots:
                if r.id == int(name[1:]):
                    return r
        for r in self.snapshots:
            if r.name == name and (include_hidden or not r.flags & C.SNAP_HIDDEN):
                return r
        raise SnapshotNotFound(f"{self.name}: no snapshot named {name!r}")

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
        self.txn.snap_dirty = True
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
        self.txn.snap_dirty = True
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
        self.txn.pack_cluster = -1
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
        self.txn.snap_dirty = True
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
        self.txn.snap_dirty = True
        self._commit(force=True)
        return self._info_of(new)
