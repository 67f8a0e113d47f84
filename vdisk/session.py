"""The session layer: open an image for writing here, or hand the request to the
mount that holds it.

An image that a read-write ``vdisk mount`` serves is locked by the mount's daemon; a
command that changes its snapshots (create, delete, revert, rename, the holds of
linked clones) must then ask the daemon over its control socket, so that the change
happens between FUSE requests and a snapshot holds every write the mount
acknowledged before it.  :class:`Session` makes that one decision for every caller:
its :meth:`~Session.writable` yields an opened :class:`~vdisk.block.Image` or, when a
mount holds the image, a :class:`MountedImage` with the same snapshot methods.  It is
an :class:`~vdisk.ops.context.OpenContext`, the object operations open every image
through, so the CLI passes :data:`SESSION` to them and they never reach a mount, nor
open a file, themselves.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import block
from .drivers.base import Holder, SnapshotInfo
from .errors import ImageLocked
from .ops.context import OpenContext


def snapshot_from_json(res) -> SnapshotInfo:
    """A snapshot as the control socket sends it."""
    if isinstance(res, SnapshotInfo):
        return res
    return SnapshotInfo(id=res["id"], name=res["name"], created=res["created"], size=res["size"],
                        generation=res.get("generation", 0), holds=res.get("holds", 0),
                        holders=tuple(Holder(h["image_id"], h["path"]) for h in res.get("holders", ())),
                        hidden=bool(res.get("hidden", False)))


class MountedImage:
    """An image a mount holds read-write: its snapshot operations, done by the mount."""

    def __init__(self, path: str):
        self.filename = path

    def _ask(self, op: str, **args):
        from vdisk.export.fuse import control

        reply = control.request(self.filename, {"op": op, **args})
        if reply is None:
            raise ImageLocked(f"{self.filename}: image is in use by another process, and no vdisk mount "
                              "that could do this for it owns it; close it there first")
        return control.result(reply)

    def snapshot_create(self, name: str) -> SnapshotInfo:
        return snapshot_from_json(self._ask("snapshot-create", name=name))

    def snapshot_delete(self, name: str) -> None:
        self._ask("snapshot-delete", name=name)

    def snapshot_revert(self, name: str) -> None:
        self._ask("snapshot-revert", name=name)

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        return snapshot_from_json(self._ask("snapshot-rename", name=name, new_name=new_name))

    def snapshot_hold(self, name: str, delta: int, holder: Holder | None = None) -> SnapshotInfo:
        args: dict = {"name": name, "delta": delta}
        if holder is not None:
            args["holder"] = {"image_id": holder.image_id, "path": holder.path}
        return snapshot_from_json(self._ask("snapshot-hold", **args))

    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        # unique bytes need a walk of every table, which stalls the mount: only on request
        return [snapshot_from_json(s) for s in self._ask("snapshot-list", space=space)]


def _mount_owns(path: str) -> bool:
    from vdisk.export.fuse import control

    return control.request(path, {"op": "ping"}) is not None


class Session(OpenContext):
    """Opens images for the CLI's operations; a change to the snapshots of an image
    that a read-write mount holds goes to that mount."""

    @contextlib.contextmanager
    def writable(self, path: str, fmt: str | None = None) -> Iterator[block.Image | MountedImage]:
        """``path`` opened read-write (its own layer, no backing chain), or, if a
        read-write mount holds it, a :class:`MountedImage` that asks the mount."""
        try:
            img = block.open(path, format=fmt, backing=False)
        except ImageLocked:
            if not _mount_owns(path):
                raise
            yield MountedImage(path)
            return
        with img:
            yield img


#: the session of a command
SESSION = Session()
