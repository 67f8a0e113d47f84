"""Holds: which images depend on a snapshot, and taking and releasing those holds.

A linked clone of a vdk or pool image names a snapshot of its source by id (``#N``),
and the source records the clone as a *holder* of that snapshot: the clone's identity
(the image id in its header) and the place it was made (relative to the source's
directory, or the pool's for a pool image).  A deleted snapshot with holders is only
hidden; its data stays until the last holder lets go (``flatten``, ``rebase``,
``rm``).  Formats that cannot record a holder (raw, qcow2) cannot be the source of a
clone of a snapshot.

Every image is opened through the :class:`~vdisk.ops.context.OpenContext` the caller
passes (``ctx``): holds change the source's snapshots, which for an image a mount
serves only the mount may do, and the context decides how to reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import block
from ..drivers.base import BackingRef, Holder, SnapshotInfo
from ..errors import BackingError, SnapshotNotFound, UsageError, VdiskError
from .context import LOCAL, OpenContext

#: formats whose snapshots record their holders, so that a linked clone may depend on them
HOLD_FORMATS = ("vdk", "pool")


def hold(base: str, snap: str, holder: Holder | None, delta: int, ctx: OpenContext = LOCAL,
         fmt: str | None = None) -> SnapshotInfo:
    """Add ``delta`` holds by ``holder`` on snapshot ``snap`` of ``base``; returns the snapshot."""
    with ctx.writable(base, fmt or _hold_format(base)) as img:
        return img.snapshot_hold(snap, delta, holder)


def _hold_format(path: str) -> str:
    """The format of ``path`` if it can record holds, else vdk (which then fails to
    open it, naming why): a hold is never asked of a probed raw file."""
    try:
        fmt = block.detect_format(path)
    except VdiskError:
        return "vdk"
    return fmt if fmt in HOLD_FORMATS else "vdk"


def holder_path(base: str, holder_file: str) -> str:
    return os.path.relpath(block.abspath(holder_file), os.path.dirname(block.abspath(base)))


def refuse_unholdable_snapshot(src: str, fmt: str, snap: str | None) -> None:
    if snap is not None and fmt not in HOLD_FORMATS:
        raise UsageError(
            f"{src}: a {fmt} image cannot record that a clone depends on its snapshot {snap!r}, so the snapshot "
            "could be deleted under the clone (qemu-img snapshot -d would do it); make a full copy instead "
            "(vdisk clone --full, or vdisk convert), or convert the image to vdk first")


# ------------------------------------------------------------------------------ hold plans
@dataclass(frozen=True)
class HoldPlan:
    """What removing (or rebasing) an overlay does to the hold it has on its base."""

    base: str  # the base image's path
    snapshot: str  # selector of the held snapshot
    holder: Holder | None  # None: a hold counted without identity (vdisk 0.1)
    copy_of: str | None = None  # the overlay is a copy of this holder: release nothing
    format: str = "vdk"  # the base image's format


def _image_id_of(path: str, ctx: OpenContext) -> str | None:
    try:
        with ctx.open(path, read_only=True, backing=False, force_share=True) as img:
            return img.driver.image_id
    except VdiskError:
        return None


def hold_plan(overlay_path: str, ref: BackingRef | None, image_id: str | None,
              ctx: OpenContext = LOCAL) -> HoldPlan | None:
    """Which hold ``overlay_path`` (with backing reference ``ref`` and identity
    ``image_id``) has on its base, if any; decided before the overlay changes."""
    if ref is None or ref.format not in HOLD_FORMATS or not ref.snapshot or not ref.snapshot.startswith("#"):
        return None
    base = block.resolve_backing_path(overlay_path, ref)
    if not block.exists(base):
        return None  # the base is gone already: nothing is held
    if image_id is None:
        return HoldPlan(base, ref.snapshot, None, format=ref.format)
    try:
        with ctx.open(base, read_only=True, format=ref.format, backing=False, force_share=True) as b:
            snaps = {f"#{s.id}": s for s in b.snapshot_list(hidden=True)}
    except VdiskError as exc:
        raise BackingError(f"{overlay_path}: cannot read the holds of its base {base}: {exc}") from None
    rec = snaps.get(ref.snapshot)
    mine = [h for h in rec.holders if h.image_id == image_id] if rec else []
    if not mine:
        if rec is not None and rec.holds > len(rec.holders):
            return HoldPlan(base, ref.snapshot, None, format=ref.format)  # made by vdisk 0.1, held without identity
        return None
    recorded = os.path.join(os.path.dirname(block.abspath(base)), mine[0].path)
    if not block.same_image(recorded, overlay_path) and block.exists(recorded) \
            and _image_id_of(recorded, ctx) == image_id:
        return HoldPlan(base, ref.snapshot, mine[0], copy_of=recorded, format=ref.format)
    return HoldPlan(base, ref.snapshot, mine[0], format=ref.format)


def release(plan: HoldPlan | None, what: str, ctx: OpenContext = LOCAL) -> None:
    """Carry out ``plan`` after the overlay let go of its base.  A release that fails
    is an error naming what is left held, never silence."""
    if plan is None or plan.copy_of is not None:
        return
    try:
        if plan.holder is None:
            hold(plan.base, plan.snapshot, None, -1, ctx, plan.format)
        else:
            hold(plan.base, plan.snapshot, Holder(plan.holder.image_id, plan.holder.path), -1, ctx, plan.format)
    except SnapshotNotFound:
        return  # released already (by check -r, or a retried command)
    except VdiskError as exc:
        raise VdiskError(f"{what}, but its hold on {plan.base} snapshot {plan.snapshot} stays: {exc}; "
                         f"`vdisk check -r leaks {plan.base}` releases holds whose holder is gone") from None


@dataclass(frozen=True)
class Dependant:
    """An image that reads through another: a holder of one of its snapshots, or an
    overlay on it found next to it."""

    path: str
    snapshot: str | None  # the snapshot it depends on (name, or #id when hidden)
    present: bool  # found at its recorded place with its identity


def dependants(path: str, ctx: OpenContext = LOCAL) -> list[Dependant]:
    """Images that depend on ``path``: the holders its snapshots record (vdk, pool;
    a holder's path is relative to ``path``'s directory, a pool's for a pool image),
    and overlays next to it (:func:`_neighbours`) whose backing file is ``path``."""
    out: list[Dependant] = []
    seen: set[str] = set()
    fmt = block.detect_format(path)
    base_dir = os.path.dirname(block.abspath(path))
    if fmt in HOLD_FORMATS:
        with ctx.open(path, read_only=True, format=fmt, backing=False, force_share=True) as img:
            snaps = img.snapshot_list(hidden=True)
        for s in snaps:
            label = f"#{s.id}" if s.hidden else s.name
            for h in s.holders:
                where = block.normpath(os.path.join(base_dir, h.path))
                present = block.exists(where) and _image_id_of(where, ctx) == h.image_id
                out.append(Dependant(where, label, present))
                seen.add(where)
            for _ in range(s.holds - len(s.holders)):
                out.append(Dependant("(a clone made by vdisk 0.1, identity not recorded)", label, False))
    for cand in _neighbours(base_dir):
        if cand in seen or block.same_image(cand, path):
            continue
        try:
            cfmt = block.detect_format(cand)
            if cfmt == "raw":
                continue
            with ctx.open(cand, read_only=True, format=cfmt, backing=False, force_share=True) as o:
                ref = o.driver.backing_ref
        except VdiskError:
            continue
        if ref is not None and block.same_image(block.resolve_backing_path(cand, ref), path):
            out.append(Dependant(block.normpath(cand), ref.snapshot, True))
            seen.add(block.normpath(cand))
    return out


def _neighbours(base_dir: str, limit: int = 100000) -> list[str]:
    """The images next to those in ``base_dir``, where :func:`dependants` looks for
    overlays: the images in it (files, or a pool's images), and across a pool's
    boundary, which a pool's directory is one level below: for a pool, the files beside
    it; for a directory, the images of the pools in it."""
    from .. import pool

    out = block.images_in(base_dir, limit)
    if pool.is_pool_dir(base_dir):
        return out + block.images_in(os.path.dirname(base_dir), limit)
    try:
        entries = sorted(e.path for e in os.scandir(base_dir) if e.is_dir(follow_symlinks=False))
    except OSError:
        return out
    for d in entries[:limit]:
        if len(out) >= limit:
            break
        if pool.is_pool_dir(d):
            out += block.images_in(d, limit - len(out))
    return out


@dataclass(frozen=True)
class StaleHold:
    snapshot: str
    holder: Holder | None  # None: a hold without identity
    reason: str


def stale_holds(path: str, ctx: OpenContext = LOCAL) -> list[StaleHold]:
    """Holds on ``path``'s snapshots whose holder is not at its recorded place with
    its identity (deleted by hand, or a clone whose creation was cut short)."""
    out = []
    base_dir = os.path.dirname(block.abspath(path))
    with ctx.open(path, read_only=True, format=_hold_format(path), backing=False, force_share=True) as img:
        snaps = img.snapshot_list(hidden=True)
    for s in snaps:
        label = f"#{s.id}" + ("" if s.hidden else f" ({s.name})")
        for h in s.holders:
            where = block.normpath(os.path.join(base_dir, h.path))
            if not block.exists(where):
                out.append(StaleHold(f"#{s.id}", h, f"snapshot {label}: holder {h.image_id} is not at {where}"))
            elif _image_id_of(where, ctx) != h.image_id:
                out.append(StaleHold(f"#{s.id}", h, f"snapshot {label}: {where} is not holder {h.image_id}"))
    return out


def release_stale_holds(path: str, ctx: OpenContext = LOCAL) -> list[str]:
    """Release every hold :func:`stale_holds` finds; returns what was released."""
    done = []
    for st in stale_holds(path, ctx):
        try:
            hold(path, st.snapshot, st.holder, -1, ctx)
        except SnapshotNotFound:
            continue
        done.append(f"released a hold whose holder is gone ({st.reason})")
    return done
