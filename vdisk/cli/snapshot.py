"""``vdisk snapshot create|list|delete|revert``: internal snapshots.

On an image that a ``vdisk mount`` holds read-write, create, list and delete go to
the mount over its control socket, so the snapshot holds every write the mount
acknowledged before the call.
"""

from __future__ import annotations

import datetime

import click

from vdisk.cli.options import format_option, output_option
from vdisk.cli.output import emit
from vdisk.drivers.base import SnapshotInfo
from vdisk.errors import ImageLocked
from vdisk.ops.chain import _snapshot_from, with_writable
from vdisk.sizes import format_size
from vdisk import block


def _as_json(s: SnapshotInfo) -> dict:
    return {"id": s.id, "name": s.name, "created": s.created, "size": s.size, "generation": s.generation,
            "unique_bytes": s.unique_bytes, "holds": s.holds}


@click.group()
def snapshot() -> None:
    """Create, list, delete and revert internal snapshots (vdk, qcow2)."""


@snapshot.command("create")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_create(fmt, filename, name):
    """Take snapshot NAME of FILENAME's current state (O(1) for vdk)."""
    with_writable(filename, lambda img: img.snapshot_create(name), ("snapshot-create", {"name": name}), fmt=fmt)


@snapshot.command("delete")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_delete(fmt, filename, name):
    """Delete snapshot NAME, freeing what nothing else references.  A snapshot that
    linked clones depend on disappears from the list but keeps its data until the
    last clone is flattened, rebased or removed."""
    with_writable(filename, lambda img: img.snapshot_delete(name), ("snapshot-delete", {"name": name}), fmt=fmt)


@snapshot.command("revert")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_revert(fmt, filename, name):
    """Make FILENAME's current state equal to snapshot NAME (later snapshots stay)."""
    with_writable(filename, lambda img: img.snapshot_revert(name), ("snapshot-revert", {"name": name}), fmt=fmt)


@snapshot.command("list")
@format_option()
@output_option()
@click.argument("filename")
def snapshot_list(fmt, output, filename):
    """List snapshots.  JSON: a list of {id, name, created (seconds since the epoch),
    size (guest bytes), generation, unique_bytes (host bytes that deleting it would
    free), holds (linked clones depending on it)}."""
    try:
        with block.open(filename, format=fmt, read_only=True, backing=False) as img:
            snaps = img.snapshot_list(space=True)
    except ImageLocked:
        res = with_writable(filename, lambda img: None, ("snapshot-list", {}), fmt=fmt)
        snaps = [_snapshot_from(s) for s in res]
    rows = [_as_json(s) for s in snaps]

    def human(rows):
        if not rows:
            return "no snapshots"
        lines = [f"{'ID':>4}  {'NAME':<24} {'SIZE':>10} {'UNIQUE':>10} {'HOLDS':>5}  CREATED"]
        for r in rows:
            when = datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M:%S")
            uniq = "-" if r["unique_bytes"] is None else format_size(r["unique_bytes"])
            lines.append(f"{r['id']:>4}  {r['name']:<24} {format_size(r['size']):>10} {uniq:>10} {r['holds']:>5}  {when}")
        return "\n".join(lines)

    emit(output, rows, human)
