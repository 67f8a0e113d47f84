"""Operations on chains of images: linked and full clones, commit, rebase, flatten, remove.

All of them work through the ``Image`` API.  A linked clone of a vdk image is an
overlay whose backing reference names a snapshot of the source by id (``#N``), and
the source counts the clone as a *hold* on that snapshot: deleting the snapshot
then only hides it, and its data stays until the last clone holding it is
flattened, rebased elsewhere or removed with ``vdisk rm``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .. import block
from ..drivers.base import BackingRef, SnapshotInfo, Status
from ..errors import BackingError, ImageLocked, ImageNotFound, UsageError, VdiskError

ProgressFn = Callable[[int], None]
CHUNK = 4 << 20


def split_snapshot_spec(spec: str) -> tuple[str, str | None]:
    """``disk.vdk@snap`` -> (``disk.vdk``, ``snap``); a path that exists as given has no snapshot."""
    if os.path.exists(spec) or "@" not in spec:
        return spec, None
    path, _, snap = spec.rpartition("@")
    if not snap:
        raise UsageError(f"{spec}: empty snapshot name after '@'")
    return path, snap


_NO_MOUNT = object()


def _remote(path: str, op: str, **args):
    """Ask the mount daemon that owns ``path`` to do ``op``; ``_NO_MOUNT`` if none does."""
    from fusemount import control

    reply = control.request(path, {"op": op, **args})
    if reply is None:
        return _NO_MOUNT
    return control.result(reply)


def with_writable(path: str, fn: Callable[[block.Image], object], remote: tuple[str, dict] | None = None,
                  fmt: str | None = None):
    """Run ``fn(image)`` on ``path`` opened read-write; if a mount holds the image,
    send ``remote`` (op, args) to it over its control socket instead."""
    try:
        img = block.open(path, format=fmt, backing=False)
    except ImageLocked:
        if remote is None:
            raise
        res = _remote(path, remote[0], **remote[1])
        if res is _NO_MOUNT:
            raise
        return res
    with img:
        return fn(img)


def _snapshot_from(res) -> SnapshotInfo:
    if isinstance(res, SnapshotInfo):
        return res
    return SnapshotInfo(id=res["id"], name=res["name"], created=res["created"], size=res["size"],
                        generation=res.get("generation", 0), holds=res.get("holds", 0))


# ------------------------------------------------------------------------------ clone
@dataclass
class CloneResult:
    path: str
    linked: bool
    source: str
    snapshot: str | None
    size: int


def clone(src_spec: str, dst: str, *, full: bool = False, compression: str | None = None,
          progress: ProgressFn | None = None) -> CloneResult:
    """``vdisk clone SRC[@SNAP] DST``: a linked clone (O(1), shares data with SRC's
    snapshot) or, with ``full``, an independent vdk copy."""
    src, snap = split_snapshot_spec(src_spec)
    if not os.path.exists(src):
        raise ImageNotFound(f"{src}: no such file")
    if os.path.lexists(dst):
        raise UsageError(f"{dst}: exists already; refusing to overwrite it")
    fmt = block.detect_format(src)
    if full:
        from .convert import convert

        with block.open(src, read_only=True, format=fmt, snapshot=snap) as img:
            cluster = img.cluster_size if fmt == "vdk" else None
            convert(img, dst, format="vdk", cluster_size=cluster, compression=compression, progress=progress,
                    durable=True)
            return CloneResult(dst, False, src, snap, img.size)
    if fmt != "vdk":
        # raw and qcow2: an overlay on the file (or on a qcow2 snapshot by name); no holds
        block.create(dst, None, format="vdk", backing_file=src, backing_format=fmt, backing_snapshot=snap)
        with block.open(dst, read_only=True) as img:
            return CloneResult(dst, True, src, snap, img.size)
    if snap is None:
        snap = _auto_snapshot(src, dst)
    info = _snapshot_from(with_writable(src, lambda img: img.snapshot_hold(snap, +1),
                                        ("snapshot-hold", {"name": snap, "delta": 1}), fmt="vdk"))
    try:
        with block.open(src, read_only=True, format="vdk", snapshot=f"#{info.id}") as view:
            cluster = view.cluster_size
        block.create(dst, info.size, format="vdk", cluster_size=cluster, backing_file=src, backing_format="vdk",
                     backing_snapshot=f"#{info.id}")
    except BaseException:
        with_writable(src, lambda img: img.snapshot_hold(f"#{info.id}", -1),
                      ("snapshot-hold", {"name": f"#{info.id}", "delta": -1}), fmt="vdk")
        raise
    return CloneResult(dst, True, src, info.name, info.size)


def _auto_snapshot(src: str, dst: str) -> str:
    """Cloning the live state of a vdk image: snapshot it first, so the source stays writable."""
    base = "clone-" + os.path.basename(dst).replace("/", "_").lstrip("#") or "clone"

    def make(img: block.Image) -> str:
        names = {s.name for s in img.snapshot_list()}
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        img.snapshot_create(name)
        return name

    def remote_name() -> str:
        return base  # a mounted image: ask once with the plain name

    res = with_writable(src, make, ("snapshot-create", {"name": remote_name()}), fmt="vdk")
    return res if isinstance(res, str) else _snapshot_from(res).name


def _release_hold(overlay_path: str, ref: BackingRef | None) -> None:
    if ref is None or ref.format != "vdk" or not ref.snapshot or not ref.snapshot.startswith("#"):
        return
    base = block.resolve_backing_path(overlay_path, ref)
    if not os.path.exists(base):
        return
    try:
        with_writable(base, lambda img: img.snapshot_hold(ref.snapshot, -1),
                      ("snapshot-hold", {"name": ref.snapshot, "delta": -1}), fmt="vdk")
    except VdiskError:
        pass  # the base's snapshot is gone already: nothing is held


# ------------------------------------------------------------------------------ commit
def _extents(img: block.Image, want) -> list[tuple[int, int, Status]]:
    return [(e.offset, e.length, e.status) for e in img.block_status(0, img.size, chain=False) if e.status in want]


def commit(path: str, *, keep: bool = False, progress: ProgressFn | None = None) -> int:
    """Write the overlay's own clusters into its backing image, then empty the overlay
    (unless ``keep``).  Returns the number of guest bytes committed."""
    with block.open(path, backing=False) as top:
        ref = top.driver.backing_ref
        if ref is None:
            raise UsageError(f"{path}: has no backing image to commit into")
        if ref.snapshot:
            raise UsageError(f"{path}: its backing is snapshot {ref.snapshot} of {ref.filename}; "
                             "snapshots are immutable (use rebase or flatten)")
        base_path = block.resolve_backing_path(path, ref)
        with block.open(base_path, format=ref.format, unsafe_backing=True) as base:
            if top.size > base.size:
                base.resize(top.size)
            done = 0
            for off, n, status in _extents(top, (Status.DATA, Status.ZERO)):
                n = min(n, base.size - off)
                if n <= 0:
                    continue
                if status == Status.ZERO:
                    base.write_zeroes(off, n)
                else:
                    for pos in range(off, off + n, CHUNK):
                        m = min(CHUNK, off + n - pos)
                        base.write(pos, top.read(pos, m))
                        if progress:
                            progress(m)
                done += n
            base.flush()  # durable in the base before the overlay lets go of it
        if not keep:
            top.make_empty()
        return done


# ------------------------------------------------------------------------------ rebase
def _check_no_loop(path: str, new_base: block.Image) -> None:
    for node in new_base.chain():
        if os.path.exists(node.filename) and os.path.samefile(node.filename, path):
            raise BackingError(f"{path}: rebasing onto {new_base.filename} would make the chain loop")


def rebase(path: str, new_backing: str | None, new_format: str | None = None, *, unsafe: bool = False,
           progress: ProgressFn | None = None) -> None:
    """Point ``path`` at ``new_backing`` (``None``: no backing).  Safe mode first copies
    into the overlay every range where the old and the new backing differ, so the
    guest content does not change; ``unsafe`` rewrites the reference only."""
    new_path, new_snap = split_snapshot_spec(new_backing) if new_backing else (None, None)
    if new_path is not None:
        if not os.path.exists(new_path):
            raise ImageNotFound(f"new backing file {new_path}: no such file")
        if new_format is None:
            new_format = block.detect_format(new_path)
            if new_format == "raw":
                raise UsageError(f"new backing file {new_path}: give its format with -F (raw is never probed)")
    if new_path is not None:
        # before taking the overlay's write lock: a loop would reach the overlay itself
        with block.open(new_path, read_only=True, format=new_format, snapshot=new_snap, unsafe_backing=True) as nb:
            _check_no_loop(path, nb)
    held: SnapshotInfo | None = None
    if new_path is not None and new_snap and new_format == "vdk":
        held = _snapshot_from(with_writable(new_path, lambda img: img.snapshot_hold(new_snap, +1),
                                            ("snapshot-hold", {"name": new_snap, "delta": 1}), fmt="vdk"))
        new_snap = f"#{held.id}"
    try:
        old_ref = _rebase(path, new_path, new_format, new_snap, unsafe, progress)
    except BaseException:
        if held is not None:
            with_writable(new_path, lambda img: img.snapshot_hold(new_snap, -1),
                          ("snapshot-hold", {"name": new_snap, "delta": -1}), fmt="vdk")
        raise
    _release_hold(path, old_ref)


def _rebase(path, new_path, new_format, new_snap, unsafe, progress) -> BackingRef | None:
    with block.open(path, unsafe_backing=True, backing=not unsafe) as top:
        old_ref = top.driver.backing_ref
        if not unsafe and old_ref is not None and top.driver.has_snapshots():
            # Internal snapshots read through the same backing reference; changing it
            # would change what they hold, and snapshots do not change.
            raise UsageError(f"{path}: has snapshots that read through its backing image; "
                             "delete them first (or rebase -u if the new backing holds the same data)")
        new_ref = None
        if new_path is not None:
            rel = os.path.relpath(os.path.abspath(new_path), os.path.dirname(os.path.abspath(path)))
            new_ref = BackingRef(rel, new_format, new_snap)
            with block.open(new_path, read_only=True, format=new_format, snapshot=new_snap,
                            unsafe_backing=True) as nb:
                if not unsafe:
                    _copy_differences(top, nb, progress)
        elif not unsafe:
            _copy_differences(top, None, progress)
        top.flush()
        top.set_backing(new_ref)
        return old_ref


def _copy_differences(top: block.Image, new: block.Image | None, progress: ProgressFn | None) -> None:
    old = top.backing
    if old is None and new is None:
        return
    cs = max(top.cluster_size, 4096)
    for off, n, _status in _extents(top, (Status.UNALLOCATED,)):
        for pos in range(off, off + n, CHUNK):
            m = min(CHUNK, off + n - pos)
            a = _read_zero_extended(old, pos, m)
            b = _read_zero_extended(new, pos, m)
            if a != b:
                # copy cluster by cluster, only the clusters that differ
                for p in range(0, m, cs):
                    q = min(m, p + cs)
                    if a[p:q] != b[p:q]:
                        top.write(pos + p, a[p:q])
            if progress:
                progress(m)


def _read_zero_extended(img: block.Image | None, off: int, n: int) -> bytes:
    if img is None or off >= img.size:
        return bytes(n)
    m = min(n, img.size - off)
    data = img.read(off, m)
    return data if m == n else data + bytes(n - m)


def flatten(path: str, *, progress: ProgressFn | None = None) -> None:
    """Pull all data the backing chain provides into ``path`` and drop the reference."""
    rebase(path, None, unsafe=False, progress=progress)


def remove(path: str) -> None:
    """Delete an image file, releasing the hold its backing reference has on a snapshot."""
    if not os.path.exists(path):
        raise ImageNotFound(f"{path}: no such file")
    fmt = block.detect_format(path)
    with block.open(path, format=fmt, backing=False) as img:  # read-write: refuses an image in use
        ref = img.driver.backing_ref
    os.unlink(path)
    _release_hold(path, ref)
