"""Operations on chains of images: linked and full clones, commit, rebase, flatten, remove.

All of them work through the ``Image`` API, and every image they touch is opened,
created or removed through the :class:`~vdisk.ops.context.OpenContext` their caller
passes (``ctx``, default :data:`~vdisk.ops.context.LOCAL`): its ``open`` is
:func:`vdisk.open`, which enforces the backing-reference policy and the locks (none
of these operations lifts the policy except when its caller passes
``unsafe_backing``), and its ``writable`` is where a change to another image's
snapshots goes (the CLI's :class:`vdisk.session.Session` hands it to the mount that
holds the image).  No operation opens a file or talks to a mount itself.

A linked clone of a vdk or pool image is an overlay on a snapshot of its source,
named by id (``#N``), and the source records the clone as a holder of that snapshot
(:mod:`vdisk.ops.holds`).  A file copied with ``cp`` keeps the identity of its
original; ``rm`` of such a copy releases nothing while the original is still at its
recorded place.  A linked clone of a pool image into the same pool is a *native*
clone: the new image shares its parent snapshot's tree, and the pool records the
clone and its hold in one catalog generation (``vdisk.drivers.pool``), so no
separate hold is taken or released here.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Callable

from .. import block
from ..drivers.base import BackingRef, Holder, SnapshotInfo, Status
from ..errors import BackingError, ImageNotFound, SnapshotNotFound, UsageError
from .context import LOCAL, OpenContext
from .holds import (HOLD_FORMATS, Dependant, dependants, hold, hold_plan, holder_path, refuse_unholdable_snapshot,
                    release)

ProgressFn = Callable[[int], None]
CHUNK = 4 << 20


def split_snapshot_spec(spec: str) -> tuple[str, str | None]:
    """``disk.vdk@snap`` -> (``disk.vdk``, ``snap``); a path that exists as given has no snapshot."""
    return block.split_image_spec(spec)


def backing_spec(image: str, spec: str) -> tuple[str, str | None]:
    """A ``-b BACKING[@SNAP]`` value as qemu-img reads it: a relative BACKING is
    relative to ``image``'s directory.  Returns (BACKING as given, SNAP)."""
    base_dir = os.path.dirname(block.abspath(image))
    if "@" in spec and not block.exists(os.path.join(base_dir, spec)):
        path, _, snap = spec.rpartition("@")
        if not snap or not path:
            raise UsageError(f"{spec}: expected BACKING@SNAPSHOT")
        return path, snap
    return spec, None



# ------------------------------------------------------------------------------ clone
@dataclass
class CloneResult:
    path: str
    linked: bool
    source: str
    snapshot: str | None
    size: int


def clone(src_spec: str, dst: str, *, full: bool = False, compression: str | None = None,
          progress: ProgressFn | None = None, fmt: str | None = None, unsafe_backing: bool = False,
          ctx: OpenContext = LOCAL) -> CloneResult:
    """``vdisk clone SRC[@SNAP] DST``: a linked clone (O(1), shares data with SRC's
    snapshot) or, with ``full``, an independent copy, in format ``fmt`` (default: vdk,
    or pool for ``POOL/IMAGE``).  A linked clone of a pool image into the same pool is
    a native clone, sharing the snapshot's tree."""
    src, snap = split_snapshot_spec(src_spec)
    if not block.exists(src):
        raise ImageNotFound(f"{src}: no such file")
    if os.path.lexists(dst) or block.exists(dst):
        raise UsageError(f"{dst}: exists already; refusing to overwrite it")
    if fmt is None:
        fmt = block.default_format(dst)
    src_fmt = block.detect_format(src)
    if full:
        from .convert import convert

        with ctx.open(src, read_only=True, format=src_fmt, snapshot=snap, unsafe_backing=unsafe_backing) as img:
            cluster = img.cluster_size if src_fmt == fmt else None
            convert(img, dst, format=fmt, cluster_size=cluster, compression=compression, progress=progress,
                    durable=True, ctx=ctx)
            return CloneResult(dst, False, src, snap, img.size)
    refuse_unholdable_snapshot(src, src_fmt, snap)
    abs_src = block.abspath(src)
    if src_fmt not in HOLD_FORMATS:
        # raw and qcow2: an overlay on the file as it is (as qemu-img create -b); no holds
        ctx.create(dst, None, format=fmt, backing_file=abs_src, backing_format=src_fmt,
                     unsafe_backing=unsafe_backing)
        with ctx.open(dst, read_only=True, backing=False) as img:
            return CloneResult(dst, True, src, None, img.size)
    if fmt not in HOLD_FORMATS:
        raise UsageError(f"a linked clone of a {src_fmt} image is an overlay on one of its snapshots, which only "
                         f"vdk and pool images can name; a {fmt} image cannot name a snapshot of its backing file "
                         f"(use --full for a {fmt} copy)")
    # Refuse what block.create would refuse before anything is written into the source.
    block.check_backing_allowed(dst, abs_src, unsafe_backing=unsafe_backing)
    if snap is None:
        snap = _auto_snapshot(src, dst, ctx, src_fmt)
    if src_fmt == "pool" and fmt == "pool" and _same_pool(src, dst):
        # A native clone: the pool records the clone and its hold in one generation.
        info = _snapshot_info(src, snap, ctx)
        ctx.create(dst, info.size, format="pool", backing_file=abs_src, backing_format="pool",
                     backing_snapshot=f"#{info.id}", unsafe_backing=unsafe_backing)
        return CloneResult(dst, True, src, info.name, info.size)
    holder = Holder(uuid.uuid4().hex, holder_path(src, dst))
    # The hold is committed before the clone exists: a crash in between leaves a hold
    # whose holder is missing (found and released by `vdisk check -r leaks`), never a
    # clone whose snapshot can vanish.
    info = hold(src, snap, holder, +1, ctx, src_fmt)
    try:
        with ctx.open(src, read_only=True, format=src_fmt, snapshot=f"#{info.id}") as view:
            cluster = view.cluster_size if fmt == src_fmt else None
        ctx.create(dst, info.size, format=fmt, cluster_size=cluster, backing_file=abs_src,
                     backing_format=src_fmt, backing_snapshot=f"#{info.id}", unsafe_backing=unsafe_backing,
                     image_id=holder.image_id)
    except BaseException:
        hold(src, f"#{info.id}", holder, -1, ctx, src_fmt)
        raise
    return CloneResult(dst, True, src, info.name, info.size)


def _same_pool(a: str, b: str) -> bool:
    from .. import pool

    wa, wb = pool.split(a), pool.split(b)
    return wa is not None and wb is not None and block._realpath(wa[0]) == block._realpath(wb[0])


def _snapshot_info(path: str, snap: str, ctx: OpenContext) -> SnapshotInfo:
    """Snapshot ``snap`` (a name or ``#ID``, also a hidden one by id) of ``path``."""
    with ctx.open(path, read_only=True, backing=False, force_share=True) as img:
        snaps = img.snapshot_list(hidden=True)
    for s in snaps:
        if (snap == f"#{s.id}") or (snap == s.name and not s.hidden):
            return s
    raise SnapshotNotFound(f"{path}: no snapshot {snap!r}")


def _auto_snapshot(src: str, dst: str, ctx: OpenContext, fmt: str = "vdk") -> str:
    """Cloning the live state of a vdk image: snapshot it first, so the source stays writable."""
    base = "clone-" + os.path.basename(dst).replace("/", "_").replace("@", "_").lstrip("#") or "clone"
    base = base.encode()[:200].decode(errors="ignore")

    def make(img: block.Image) -> str:
        names = {s.name for s in img.snapshot_list()}
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        img.snapshot_create(name)
        return name

    with ctx.writable(src, fmt) as img:
        return make(img)

# ------------------------------------------------------------------------------ commit
def _extents(img: block.Image, want) -> list[tuple[int, int, Status]]:
    return [(e.offset, e.length, e.status) for e in img.block_status(0, img.size, chain=False) if e.status in want]


def commit(path: str, *, keep: bool = False, progress: ProgressFn | None = None, base: str | None = None,
           unsafe_backing: bool = False, ctx: OpenContext = LOCAL) -> int:
    """Write the overlay's data into its backing image (or, with ``base``, into that
    deeper image of its chain, together with the data of the images between), then
    empty the overlay (unless ``keep``; with a deeper ``base`` the overlay is kept, as
    it still reads correctly and the images between would otherwise show through).
    Returns the number of guest bytes committed.  An overlay with internal snapshots
    is refused: they read through the same backing image, and snapshots do not change."""
    depth = 1
    with ctx.open(path, read_only=True, unsafe_backing=unsafe_backing) as probe:
        if probe.backing is None:
            raise UsageError(f"{path}: has no backing image to commit into")
        ref = probe.driver.backing_ref
        if ref.snapshot:
            raise UsageError(f"{path}: its backing is snapshot {ref.snapshot} of {ref.filename}; "
                             "snapshots are immutable (use rebase or flatten)")
        if probe.driver.has_snapshots():
            raise UsageError(f"{path}: has internal snapshots, which read through its backing image; committing "
                             "would change what they hold: delete them first (vdisk snapshot delete)")
        if base is not None:
            nodes = list(probe.chain())[1:]
            for depth, node in enumerate(nodes, start=1):  # noqa: B007
                if block.same_image(node.filename, base):
                    break
            else:
                raise UsageError(f"{base}: is not in the backing chain of {path}")
            keep = keep or depth > 1
    with ctx.open(path, unsafe_backing=unsafe_backing, writable_depth=depth) as top:
        target = top
        for _ in range(depth):
            target = target.backing
        if top.size > target.size:
            target.resize(top.size)
        done = 0
        for ext in top.block_status(0, top.size):
            if ext.depth < 0 or ext.depth >= depth or ext.status == Status.UNALLOCATED:
                continue  # the target (or below) holds it already, or nothing does
            n = min(ext.length, target.size - ext.offset)
            if n <= 0:
                continue
            if ext.status == Status.ZERO:
                target.write_zeroes(ext.offset, n)
            else:
                for pos in range(ext.offset, ext.offset + n, CHUNK):
                    m = min(CHUNK, ext.offset + n - pos)
                    target.write(pos, top.read(pos, m))
                    if progress:
                        progress(m)
            done += n
        target.flush()  # durable in the target before the overlay lets go of it
    if not keep:
        with ctx.open(path, backing=False) as top:
            top.make_empty()
    return done


# ------------------------------------------------------------------------------ rebase
def _check_no_loop(path: str, new_base: block.Image) -> None:
    for node in new_base.chain():
        if block.same_image(node.filename, path):
            raise BackingError(f"{path}: rebasing onto {new_base.filename} would make the chain loop")


def rebase(path: str, new_backing: str | None, new_format: str | None = None, *, unsafe: bool = False,
           progress: ProgressFn | None = None, unsafe_backing: bool = False,
           ctx: OpenContext = LOCAL) -> None:
    """Point ``path`` at ``new_backing`` (``None``: no backing; a path as the caller
    sees it, optionally ``@SNAP``).  Safe mode first copies into the overlay every
    range where the old and the new backing differ, so the guest content does not
    change; ``unsafe`` rewrites the reference only (the new backing need not exist
    yet).  The new backing must lie where :func:`vdisk.open` follows backing files,
    unless ``unsafe_backing``."""
    new_path, new_snap = split_snapshot_spec(new_backing) if new_backing else (None, None)
    if new_path is not None:
        if not block.exists(new_path):
            if not unsafe:
                raise ImageNotFound(f"new backing file {new_path}: no such file")
            if new_format is None:
                raise UsageError(f"new backing file {new_path} does not exist yet: give its format with -F")
            if new_snap is not None:
                raise UsageError(f"new backing file {new_path} does not exist yet: it has no snapshot {new_snap!r}")
        elif new_format is None:
            new_format = block.detect_format(new_path)
            if new_format == "raw":
                raise UsageError(f"new backing file {new_path}: give its format with -F (raw is never probed)")
        block.check_backing_allowed(path, block.abspath(new_path), unsafe_backing=unsafe_backing)
    if new_path is not None and block.exists(new_path):
        refuse_unholdable_snapshot(new_path, new_format, new_snap)
        # before taking the overlay's write lock: a loop would reach the overlay itself
        with ctx.open(new_path, read_only=True, format=new_format, snapshot=new_snap,
                        unsafe_backing=unsafe_backing, allow_backing_dirs=[os.path.dirname(block.abspath(path))]) as nb:
            _check_no_loop(path, nb)
    with ctx.open(path, read_only=True, backing=False) as cur:
        _refuse_if_snapshots(path, cur, new_path, unsafe)  # before anything changes anywhere
        image_id = cur.driver.image_id
        cur_format = cur.format
        old_plan = hold_plan(path, cur.driver.backing_ref, image_id, ctx)
    held: Holder | None = None
    held_before = False
    if new_path is not None and new_snap and new_format in HOLD_FORMATS:
        if cur_format not in HOLD_FORMATS:
            raise UsageError(f"{path}: only a vdk or pool image can read from a snapshot of a {new_format} image "
                             f"(the source records its holders by image identity, which {cur_format} images lack)")
        if image_id is None:
            raise UsageError(f"{path}: has no identity (made by vdisk 0.1) to hold a snapshot with; "
                             "make a new clone instead (vdisk clone)")
        held = Holder(image_id, holder_path(new_path, path))
        # One record per holder: if this image holds that snapshot already (it reads
        # from it now), the +1 only refreshes the record, and a failed rebase must not
        # take the record away with a -1: the snapshot could then be deleted under it.
        held_before = any(h.image_id == image_id for h in _snapshot_info(new_path, new_snap, ctx).holders)
        info = hold(new_path, new_snap, held, +1, ctx, new_format)
        new_snap = f"#{info.id}"
    try:
        _rebase(path, new_path, new_format, new_snap, unsafe, progress, unsafe_backing, ctx)
    except BaseException:
        if held is not None and not held_before:
            hold(new_path, new_snap, held, -1, ctx, new_format)
        raise
    if old_plan is not None and held is not None and block.same_image(old_plan.base, new_path) \
            and old_plan.snapshot == new_snap:
        return  # onto the same snapshot again: the one record was refreshed, keep it
    release(old_plan, f"rebased {path}", ctx)


def _refuse_if_snapshots(path: str, img: block.Image, new_path: str | None, unsafe: bool) -> None:
    """Internal snapshots read through the image's backing reference (what they do not
    hold reads from it, or as zeros without one); changing it would change what they
    hold, and snapshots do not change.  ``rebase -u`` is the user's word that the new
    backing holds the same data."""
    if not unsafe and img.driver.has_snapshots() and (img.driver.backing_ref is not None or new_path is not None):
        raise UsageError(f"{path}: has snapshots, which read through its backing reference; "
                         "delete them first (or rebase -u if the new backing holds the same data)")


def _rebase(path, new_path, new_format, new_snap, unsafe, progress, unsafe_backing, ctx) -> BackingRef | None:
    with ctx.open(path, unsafe_backing=unsafe_backing, backing=not unsafe) as top:
        old_ref = top.driver.backing_ref
        _refuse_if_snapshots(path, top, new_path, unsafe)  # again under the write lock
        new_ref = None
        if new_path is not None:
            rel = os.path.relpath(block.abspath(new_path), os.path.dirname(block.abspath(path)))
            new_ref = BackingRef(rel, new_format, new_snap)
            if not unsafe:
                with ctx.open(new_path, read_only=True, format=new_format, snapshot=new_snap,
                                unsafe_backing=unsafe_backing,
                                allow_backing_dirs=[os.path.dirname(block.abspath(path))]) as nb:
                    if top.backing is None:
                        # zeros copied in must stay explicit, hiding the new backing's
                        # data (without a backing image a driver may store them as holes)
                        top.attach_backing_image(nb)
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


def flatten(path: str, *, progress: ProgressFn | None = None, unsafe_backing: bool = False,
            ctx: OpenContext = LOCAL) -> None:
    """Pull all data the backing chain provides into ``path`` and drop the reference."""
    rebase(path, None, unsafe=False, progress=progress, unsafe_backing=unsafe_backing, ctx=ctx)


# ------------------------------------------------------------------------------ remove
def _describe(deps: list[Dependant]) -> str:
    parts = []
    for d in deps[:10]:
        what = f"{d.path} (snapshot {d.snapshot})" if d.snapshot else f"{d.path} (overlay)"
        if not d.present:
            what += " [not found at its recorded place]"
        parts.append(what)
    more = f" and {len(deps) - 10} more" if len(deps) > 10 else ""
    return ", ".join(parts) + more


def remove(path: str, *, recursive: bool = False, dry_run: bool = False,
           removed: Callable[[str], None] | None = None, ctx: OpenContext = LOCAL) -> list[str]:
    """Delete an image file, releasing the hold its backing reference has on a snapshot.

    An image that others depend on (holders of its snapshots, overlays next to it) is
    refused, naming them; ``recursive`` removes those first, depth first.  A holder not
    found at its recorded place stops even a recursive remove: `vdisk check -r leaks`
    releases such holds once it is really gone.  Returns the paths removed (or, with
    ``dry_run``, that would be), each reported to ``removed`` as it goes."""
    order: list[str] = []
    _plan_remove(os.fspath(path), recursive, order, set(), ctx)
    if dry_run:
        for p in order:
            if removed:
                removed(p)
        return order
    for p in order:
        _remove_one(p, ctx)
        if removed:
            removed(p)
    return order


def _plan_remove(path: str, recursive: bool, order: list[str], visiting: set[str], ctx: OpenContext) -> None:
    if not block.exists(path):
        raise ImageNotFound(f"{path}: no such file")
    key = block._realpath(path)
    if key in visiting or any(block.same_image(p, path) for p in order):
        return
    visiting.add(key)
    deps = dependants(path, ctx)
    missing = [d for d in deps if not d.present]
    if missing:
        raise UsageError(f"{path}: snapshots are held by images that are not where they were made: "
                         f"{_describe(missing)}; if they are really gone, `vdisk check -r leaks {path}` "
                         "releases their holds")
    if deps and not recursive:
        raise UsageError(f"{path}: images depend on it: {_describe(deps)}; remove them first, "
                         "or all of them with `vdisk rm -r`")
    for d in deps:
        _plan_remove(d.path, recursive, order, visiting, ctx)
    order.append(path)


def _remove_one(path: str, ctx: OpenContext) -> None:
    fmt = block.detect_format(path)
    with ctx.open(path, format=fmt, backing=False) as img:  # read-write: refuses an image in use
        plan = hold_plan(path, img.driver.backing_ref, img.driver.image_id, ctx)
    ctx.remove(path)
    release(plan, f"removed {path}", ctx)

