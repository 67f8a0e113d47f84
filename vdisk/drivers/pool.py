"""The pool driver: one image of a pool behind the block driver interface, so that
every command, chains and the exports work on ``POOL/IMAGE`` as on a file.

Unlike the file drivers it opens by name (``opens_by_name``): the block layer hands
it ``POOL/IMAGE`` instead of a host file.  The data path is in
:mod:`vdisk.pool.image`; this module maps the interface onto it and onto the
catalog (snapshots, holds, lineage).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, ClassVar

from .. import pool as poolmod
from ..codec import pool as pc
from ..errors import (
    ImageExists,
    ImageNotFound,
    NotSupported,
    SnapshotExists,
    SnapshotNotFound,
    UsageError,
    VdiskError,
)
from ..pool.image import PoolImage, find_snapshot
from ..pool.store import Pool, new_image_record
from . import register
from .base import (
    BackingRef,
    BlockDriver,
    CheckResult,
    CreateOptions,
    Extent,
    Holder,
    SnapshotInfo,
    Status,
)
from .names import validate_snapshot_name as check_snapshot_name


class _NoHost:
    """Stands in for ``driver.host``: a pool image has no host file."""

    def __init__(self, name: str, read_only: bool):
        self.name = name
        self.read_only = read_only
        self.flush_failed = None

    def close(self) -> None:
        pass


@register
class PoolDriver(BlockDriver):
    format_name = "pool"
    supports_backing = True
    opens_by_name: ClassVar[bool] = True
    default_cluster_size = pc.BLOCK
    create_options: ClassVar[dict[str, str]] = {"owner": "who owns the image (free text)",
                                                 "label": "KEY=VALUE labels, separated by ':'"}

    def __init__(self, img: PoolImage, spec: str):
        self.img = img
        self.pool = img.pool
        self.spec = spec
        self.size = img.size
        self.cluster_size = pc.BLOCK
        self.read_only = img.read_only
        self.image_id = img.image_id
        self.host = _NoHost(spec, img.read_only)
        rec = self.pool.image_record(img.name)
        b = rec.get("backing")
        self.backing_ref = BackingRef(b["filename"], b["format"], b.get("snapshot")) if b else None
        self.backing = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, host, size, opts):  # pragma: no cover - the block layer calls create_named
        raise NotSupported("pool images are created by name")

    @classmethod
    def open(cls, host, *, read_only, snapshot=None):  # pragma: no cover
        raise NotSupported("pool images are opened by name")

    @classmethod
    def open_named(cls, spec: str, *, read_only: bool, snapshot: str | None = None,
                   force_share: bool = False) -> PoolDriver:
        where = poolmod.split(spec)
        if where is None:
            raise ImageNotFound(f"{spec}: not an image in a pool")
        pool = Pool(where[0])
        try:
            img = PoolImage(pool, where[1], read_only=read_only, snapshot=snapshot, force_share=force_share)
        except BaseException:
            pool.close()
            raise
        return cls(img, spec)

    @classmethod
    def identity(cls, spec: str) -> tuple:
        where = poolmod.split(spec)
        return ("pool", _real(where[0]), where[1]) if where else ("pool", spec)

    @classmethod
    def exists_named(cls, spec: str) -> bool:
        where = poolmod.split(spec)
        if where is None:
            return False
        pool = Pool(where[0], lock=False)
        try:
            return where[1] in pool.catalog["images"]
        finally:
            pool.close()

    @classmethod
    def list_named(cls, pool_dir: str) -> list[str]:
        """The names of the images of the pool in ``pool_dir`` (none if an ``s3://``
        name, recognised by its spelling, holds no pool)."""
        try:
            pool = Pool(pool_dir, lock=False)
        except ImageNotFound:
            if poolmod.is_url(pool_dir):
                return []
            raise
        try:
            return list(pool.catalog["images"])
        finally:
            pool.close()

    @classmethod
    def create_named(cls, spec: str, size: int, opts: CreateOptions) -> None:
        where = poolmod.split(spec)
        if where is None:
            raise ImageNotFound(f"{spec}: not an image in a pool")
        pool_dir, name = where
        poolmod.check_image_name(name)
        if opts.cluster_size not in (None, pc.BLOCK):
            raise UsageError(f"pool images have {pc.BLOCK}-byte blocks (cluster size {opts.cluster_size} asked)")
        if opts.compression not in (None, "none", "zstd"):
            raise UsageError(f"pool images are zstd-compressed ({opts.compression} asked)")
        if size > pc.MAX_BLOCKS * pc.BLOCK:
            raise UsageError(f"a pool image holds at most {pc.MAX_BLOCKS * pc.BLOCK} bytes")
        extra = dict(opts.extra)
        owner = extra.pop("owner", None)
        labels = _parse_labels(extra.pop("label", None))
        if extra:
            raise UsageError(f"unknown pool image options: {', '.join(sorted(extra))}")
        pool = Pool(pool_dir)
        try:
            rec = new_image_record(size, opts.image_id)
            rec["owner"] = owner
            rec["labels"] = labels
            parent = None
            ref = opts.backing
            if ref is not None:
                src = poolmod.url_join(spec, ref.filename) if poolmod.is_url(pool_dir) else \
                    os.path.normpath(os.path.join(pool_dir, ref.filename))
                inside = poolmod.split(src)
                if ref.format == "pool" and inside and _real(inside[0]) == _real(pool_dir) \
                        and ref.snapshot:
                    parent = (inside[1], ref.snapshot)  # a clone inside the pool: shares the tree
                else:
                    rec["backing"] = {"filename": ref.filename, "format": ref.format, "snapshot": ref.snapshot}
            holder = [rec["id"], name]

            def mutate(cat: dict) -> None:
                if name in cat["images"]:
                    raise ImageExists(f"{spec}: the pool has an image of that name already")
                new = dict(rec)
                if parent is not None:
                    prec = cat["images"].get(parent[0])
                    if not isinstance(prec, dict):
                        raise ImageNotFound(f"{pool_dir}/{parent[0]}: no such image in the pool")
                    snap = find_snapshot(prec, parent[1], f"{pool_dir}/{parent[0]}")
                    snap.setdefault("holders", []).append(list(holder))
                    new["root"] = snap.get("root")
                    new["sketch"] = snap.get("sketch")
                    new["parent"] = {"image": parent[0], "snapshot": snap["id"]}
                    # what the snapshot does not hold reads from the parent's backing image
                    # (kept by the parent, which cannot let go of it while the clone holds
                    # its snapshot); the clone names it too, relative to the same directory
                    new["backing"] = copy.deepcopy(prec.get("backing"))
                cat["images"][name] = new

            pool.commit(mutate)
        finally:
            pool.close()

    @classmethod
    def remove_named(cls, spec: str) -> None:
        """Drop the image from the catalog, and its hold on its parent's snapshot in the
        same generation.  Refused while a snapshot of it has holders or it is open."""
        where = poolmod.split(spec)
        if where is None:
            raise ImageNotFound(f"{spec}: not an image in a pool")
        pool_dir, name = where
        pool = Pool(pool_dir)
        try:
            img = PoolImage(pool, name, read_only=False)  # the writer's lock: refuses an image in use
            try:
                def mutate(cat: dict) -> None:
                    rec = cat["images"].get(name)
                    if not isinstance(rec, dict):
                        raise ImageNotFound(f"{spec}: no such image in the pool")
                    held = [s for s in rec.get("snapshots", []) if s.get("holders")]
                    if held:
                        raise UsageError(f"{spec}: images depend on its snapshots "
                                         f"({', '.join(h[1] for s in held for h in s['holders'])})")
                    _drop_parent_hold(cat, rec)
                    del cat["images"][name]

                pool.commit(mutate)
                img.read_only = True  # nothing left to flush
            finally:
                img.close()
            if not pool.local:  # its leases go with it
                from ..pool.lease import lease_dir

                for n in pool.backend.list(lease_dir(img.image_id)):
                    pool.backend.delete(n)
        finally:
            pool.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.img.close()
        finally:
            self.pool.close()

    # ------------------------------------------------------------------ data path
    def read(self, offset: int, length: int) -> bytes:
        return self.img.read(offset, length, self.backing)

    def write(self, offset: int, data: bytes) -> None:
        self.img.write(offset, data, self.backing)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.img.zero(offset, length, self.backing, unmap=False)

    def discard(self, offset: int, length: int) -> None:
        self.img.zero(offset, length, self.backing, unmap=True)

    def flush(self) -> None:
        self.img.flush()

    def block_status(self, offset: int, length: int) -> list[Extent]:
        runs: list[list] = []
        end = offset + length
        pos = offset
        B = pc.BLOCK
        leaf_index, leaf = -1, None
        while pos < end:
            bn = pos // B
            n = min(B - (pos - bn * B), end - pos)
            if bn >> 9 != leaf_index:  # one lookup per leaf, not per block
                leaf_index = bn >> 9
                leaf = self.img._leaf(leaf_index)
            if leaf is None:  # a whole leaf's range is unallocated
                n = min(((bn >> 9) + 1) * 512 * B, end) - pos
                st, comp = Status.UNALLOCATED, False
            else:
                e = pc.unpack_entry(leaf, bn & 511, self.spec)
                st = {pc.UNALLOCATED: Status.UNALLOCATED, pc.ZERO: Status.ZERO}.get(e.kind, Status.DATA)
                comp = e.kind in (pc.ZSTD, pc.DELTA)
            if runs and runs[-1][2] == st and runs[-1][3] == comp:
                runs[-1][1] += n
            else:
                runs.append([pos, n, st, comp])
            pos += n
        return [Extent(o, n, st, None, comp) for o, n, st, comp in runs]

    def resize(self, new_size: int) -> None:
        if self.read_only:
            raise VdiskError(f"{self.spec}: image is read-only")
        if new_size > pc.MAX_BLOCKS * pc.BLOCK:
            raise UsageError(f"a pool image holds at most {pc.MAX_BLOCKS * pc.BLOCK} bytes")
        if new_size < self.size:
            self.img.truncate_tail(new_size)
        self.img.size = self.size = new_size
        self.img.size_changed = True
        self.img.flush()

    # ------------------------------------------------------------------ metadata
    def _rec(self) -> dict:
        return self.pool.image_record(self.img.name)

    def info(self) -> dict[str, Any]:
        rec = self._rec()
        out = {"pool": self.pool.url, "image": self.img.name, "block-size": pc.BLOCK,
               "owner": rec.get("owner"), "labels": rec.get("labels", {}), "generation": self.pool.generation}
        if rec.get("parent"):
            out["parent"] = f"{rec['parent']['image']}@#{rec['parent']['snapshot']}"
        return out

    def disk_usage(self) -> int:
        """Stored bytes of the distinct blobs the live state refers to (a block it holds
        twice counts once; blobs shared with other images count in full)."""
        return sum({e.loc: e.length for _, e in self.img.walk() if e.kind in pc.DATA_KINDS}.values())

    def set_backing(self, ref: BackingRef | None) -> None:
        """Also ends a native clone's lineage (rebase, flatten): its tree holds all its
        data, so it lets go of its parent's snapshot, in the same generation."""
        name = self.img.name
        value = {"filename": ref.filename, "format": ref.format, "snapshot": ref.snapshot} if ref else None

        def mutate(cat: dict) -> None:
            rec = cat["images"][name]
            rec["backing"] = value
            _drop_parent_hold(cat, rec)
            rec["parent"] = None

        self.img.flush()
        self.pool.commit(mutate)
        self.backing_ref = ref
        self.img.has_backing = ref is not None

    def make_empty(self) -> None:
        if self.has_snapshots():
            raise UsageError(f"{self.spec}: has snapshots; emptying it would drop data they share")
        self.img.dirty.clear()
        self.img.root = pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)
        self.img.size_changed = True
        self.img._sketch = None
        self.img.sketch_ref = None
        self.img.flush()

    def check(self, *, repair: str | None = None) -> CheckResult:
        from ..pool.check import check_image

        return check_image(self, repair=repair)

    # ------------------------------------------------------------------ snapshots
    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        """With ``space``, ``unique_bytes`` is what only that snapshot reaches in the
        whole pool (:func:`vdisk.pool.space.image_space`: a walk of every tree)."""
        usage = self.space_usage()["snapshots"] if space else {}
        out = []
        for s in self._rec().get("snapshots", []):
            if s.get("hidden") and not hidden:
                continue
            holders = tuple(Holder(str(h[0]), str(h[1])) for h in s.get("holders", []))
            u = usage.get(int(s["id"]))
            out.append(SnapshotInfo(int(s["id"]), str(s["name"]), float(s["created"]), int(s["size"]),
                                    holds=len(holders), holders=holders, hidden=bool(s.get("hidden")),
                                    unique_bytes=u["unique_bytes"] if u else None,
                                    extra={"referenced_bytes": u["referenced_bytes"]} if u else {}))
        return out

    def has_snapshots(self) -> bool:
        return bool(self._rec().get("snapshots"))

    def snapshot_create(self, name: str) -> SnapshotInfo:
        if self.read_only:
            raise VdiskError(f"{self.spec}: image is read-only")
        check_snapshot_name(name)
        img = self.img
        img.flush()
        iname = img.name
        root = None if img.root.kind == pc.UNALLOCATED else img.root.to_json()
        made: dict = {}

        def mutate(cat: dict) -> None:
            rec = cat["images"][iname]
            if any(s["name"] == name and not s.get("hidden") for s in rec["snapshots"]):
                raise SnapshotExists(f"{self.spec}: snapshot {name!r} exists already")
            sid = int(rec.get("next_snapshot_id", 1))
            rec["next_snapshot_id"] = sid + 1
            snap = {"id": sid, "name": name, "created": time.time(), "size": img.size, "root": root,
                    "sketch": img.sketch_ref, "holders": [], "hidden": False}
            rec["snapshots"].append(snap)
            made.clear()
            made.update(snap)

        self.pool.commit(mutate)
        return SnapshotInfo(made["id"], name, made["created"], made["size"])

    def _find(self, cat: dict, spec: str) -> dict:
        return find_snapshot(cat["images"][self.img.name], spec, self.spec)

    def snapshot_delete(self, name: str) -> None:
        if self.read_only:
            raise VdiskError(f"{self.spec}: image is read-only")
        iname = self.img.name

        def mutate(cat: dict) -> None:
            rec = cat["images"][iname]
            s = self._find(cat, name)
            if s.get("holders"):
                s["hidden"] = True  # kept for the clones that depend on it
            else:
                rec["snapshots"] = [x for x in rec["snapshots"] if x is not s]

        self.img.flush()  # a barrier: the writes before it are durable when it returns
        self.pool.commit(mutate)

    def snapshot_revert(self, name: str) -> None:
        if self.read_only:
            raise VdiskError(f"{self.spec}: image is read-only")
        s = self._find(self.pool.catalog, name)
        img = self.img
        img.dirty.clear()
        img.root = pc.Entry.from_json(s["root"], self.spec) if s.get("root") else pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)
        img.size = self.size = int(s["size"])
        img._sketch = None
        img.sketch_ref = s.get("sketch")
        img.size_changed = True
        img.flush()

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        check_snapshot_name(new_name)
        iname = self.img.name

        def mutate(cat: dict) -> None:
            rec = cat["images"][iname]
            s = self._find(cat, name)
            if any(x["name"] == new_name and not x.get("hidden") for x in rec["snapshots"] if x is not s):
                raise SnapshotExists(f"{self.spec}: snapshot {new_name!r} exists already")
            s["name"] = new_name

        self.pool.commit(mutate)
        s = self._find(self.pool.catalog, new_name)
        return SnapshotInfo(int(s["id"]), new_name, float(s["created"]), int(s["size"]))

    def snapshot_hold(self, name: str, delta: int, holder: Holder | None = None) -> SnapshotInfo:
        iname = self.img.name

        def mutate(cat: dict) -> None:
            rec = cat["images"][iname]
            s = find_snapshot(rec, name, self.spec) if not name.startswith("#") else self._find(cat, name)
            hs = s.setdefault("holders", [])
            if delta > 0:
                if holder is None:
                    raise UsageError("a hold on a pool snapshot needs the holder's identity")
                # one record per holder, as vdk keeps it: the same image holding again
                # (a retried clone, a rebase onto the snapshot it reads) refreshes it
                hs[:] = [h for h in hs if h[0] != holder.image_id] + [[holder.image_id, holder.path]]
                return
            mine = [h for h in hs if holder is not None and h[0] == holder.image_id]
            if not mine:
                raise SnapshotNotFound(f"{self.spec}: snapshot {name} has no hold of {holder}")
            hs.remove(mine[0])
            if not hs and s.get("hidden"):
                rec["snapshots"] = [x for x in rec["snapshots"] if x is not s]

        self.pool.commit(mutate)
        for s in self.snapshot_list(hidden=True):
            if name in (s.name, f"#{s.id}"):
                return s
        return SnapshotInfo(0, name, 0.0, self.size)

    def space_usage(self) -> dict | None:
        from ..pool.space import image_space

        return image_space(self)


def _real(pool_dir: str) -> str:
    """What identifies a pool's location: its real path, or its URL."""
    return pool_dir.rstrip("/") if poolmod.is_url(pool_dir) else os.path.realpath(pool_dir)


def _drop_parent_hold(cat: dict, rec: dict) -> None:
    par = rec.get("parent")
    if not par:
        return
    prec = cat["images"].get(par.get("image"))
    if not isinstance(prec, dict):
        return
    for s in prec.get("snapshots", []):
        if s.get("id") == par.get("snapshot"):
            s["holders"] = [h for h in s.get("holders", []) if h[0] != rec["id"]]
            if not s["holders"] and s.get("hidden"):
                prec["snapshots"] = [x for x in prec["snapshots"] if x is not s]
            return


def _parse_labels(text: str | None) -> dict:
    if not text:
        return {}
    out = {}
    for part in text.split(":"):
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise UsageError(f"label {part!r}: expected KEY=VALUE")
        out[k] = v
    return out


