"""``vdisk snapshot create|list|delete|revert|rename``: internal snapshots.

qemu-img's spellings work too: ``snapshot -l FILE``, ``-c NAME FILE``, ``-a NAME
FILE`` (apply: revert), ``-d NAME FILE``.  On an image that a ``vdisk mount`` holds
read-write, every one of them goes to the mount over its control socket, so a
snapshot holds every write the mount acknowledged before the call.
"""

from __future__ import annotations

import click

from vdisk import block
from vdisk.cli.options import force_share_option, format_option, output_option
from vdisk.cli.output import emit, table
from vdisk.drivers.base import SnapshotInfo
from vdisk.errors import ImageLocked
from vdisk.session import SESSION
from vdisk.sizes import format_size

#: qemu-img snapshot's flags -> (subcommand, takes a snapshot name)
_QEMU_FLAGS = {"-l": ("list", False), "-c": ("create", True), "-a": ("revert", True), "-d": ("delete", True)}


def snapshot_json(s: SnapshotInfo) -> dict:
    """One snapshot as ``qemu-img info --output json`` lists it, with vdisk's own facts
    under ``vdisk-`` keys (the same as ``vdisk info``'s)."""
    from vdisk.ops.mapping import snapshot_dict
    from vdisk.ops.mapping import snapshot_json as to_json

    d = snapshot_dict(s)
    d["extra"].pop("referenced_bytes", None)  # as info lists snapshots
    return to_json(d)


class _SnapshotGroup(click.Group):
    """Accepts qemu-img's ``-l | -c NAME | -a NAME | -d NAME`` before FILE, and the
    options of the subcommand after it (``vdisk snapshot -l -U FILE``)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        from vdisk.cli import remember_command

        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in _QEMU_FLAGS:
            sub, named = _QEMU_FLAGS[args[0]]
            rest = args[1:]
            if named:
                if not rest:
                    raise click.UsageError(f"{args[0]} needs a snapshot name", ctx=ctx)
                name, rest = rest[0], rest[1:]
            opts = [a for a in rest if a.startswith("-")]
            files = [a for a in rest if not a.startswith("-")]
            if len(files) != 1:
                raise click.UsageError(f"{args[0]} needs exactly one image file", ctx=ctx)
            args = [sub, *opts, files[0]] + ([name] if named else [])
        return super().parse_args(ctx, args)


@click.group(cls=_SnapshotGroup)
def snapshot() -> None:
    """Create, list, delete, revert and rename internal snapshots (vdk, qcow2).

    Also as qemu-img spells it: `vdisk snapshot -l FILE`, `-c NAME FILE`, `-a NAME
    FILE` (revert), `-d NAME FILE`.  A snapshot is named by its name or, in every
    command, by its id spelled #ID (`#3`; on the command line quote it, as '#3').
    Names are 1 to 255 bytes of UTF-8 without '@', '/', control characters, a
    leading '#' or surrounding spaces."""


@snapshot.command("create")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_create(fmt, filename, name):
    """Take snapshot NAME of FILENAME's current state (O(1) for vdk)."""
    with SESSION.writable(filename, fmt) as img:
        img.snapshot_create(name)


@snapshot.command("delete")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_delete(fmt, filename, name):
    """Delete snapshot NAME, freeing what nothing else references.  A snapshot that
    linked clones depend on disappears from the list but keeps its data until the
    last clone is flattened, rebased or removed."""
    with SESSION.writable(filename, fmt) as img:
        img.snapshot_delete(name)


@snapshot.command("revert")
@format_option()
@click.argument("filename")
@click.argument("name")
def snapshot_revert(fmt, filename, name):
    """Make FILENAME's current state equal to snapshot NAME (later snapshots stay)."""
    with SESSION.writable(filename, fmt) as img:
        img.snapshot_revert(name)


@snapshot.command("rename")
@format_option()
@click.argument("filename")
@click.argument("name")
@click.argument("new_name")
def snapshot_rename(fmt, filename, name, new_name):
    """Rename snapshot NAME of FILENAME to NEW_NAME.  Linked clones name their
    snapshot by id, so they go on reading it."""
    with SESSION.writable(filename, fmt) as img:
        img.snapshot_rename(name, new_name)


@snapshot.command("list")
@format_option()
@output_option()
@force_share_option()
@click.argument("filename")
def snapshot_list(fmt, output, force_share, filename):
    """List snapshots.

    \b
    JSON: a list, one object per snapshot, with the keys qemu-img info's
      "snapshots" entries have -- id (a string), name, vm-state-size,
      date-sec, date-nsec, vm-clock-sec, vm-clock-nsec, icount (0 where
      vdisk keeps no VM state) -- and vdisk's own: vdisk-size (guest bytes),
      vdisk-generation, vdisk-unique-bytes (host bytes deleting it would free,
      or null), vdisk-holds (linked clones depending on it), vdisk-holders
      (those recorded by identity: [{image-id, path}]).
    """
    try:
        with block.open(filename, format=fmt, read_only=True, backing=False, force_share=force_share) as img:
            snaps = img.snapshot_list(space=True)
    except ImageLocked:
        with SESSION.writable(filename, fmt) as img:  # a mount holds it: ask the mount
            snaps = img.snapshot_list()
    rows = [snapshot_json(s) for s in snaps]

    def human(rows):
        if not rows:
            return "no snapshots"
        import datetime

        body = []
        for r in rows:
            when = datetime.datetime.fromtimestamp(r["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
            uniq = "-" if r["vdisk-unique-bytes"] is None else format_size(r["vdisk-unique-bytes"])
            body.append([r["id"], r["name"], format_size(r["vdisk-size"]), uniq, str(r["vdisk-holds"]), when])
        return table(["ID", "NAME", "SIZE", "UNIQUE", "HOLDS", "CREATED"], body, right={0, 2, 3, 4})

    emit(output, rows, human)


