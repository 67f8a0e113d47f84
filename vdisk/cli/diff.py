"""``vdisk diff export`` / ``vdisk diff import``: incremental streams between snapshots
(formats/diff.md), as ``rbd export-diff`` and ``zfs send -i``."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS
from .options import (
    format_option,
    open_image,
    output_option,
    progress_option,
    quiet_option,
    unsafe_backing_option,
)
from .output import emit
from .progress import progress_bar


class _DiffGroup(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):
        from vdisk.cli import remember_command

        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest


@click.group(cls=_DiffGroup, context_settings=CONTEXT_SETTINGS)
def diff() -> None:
    """Export the changes between two snapshots as a checksummed stream, and apply
    such a stream to an image (formats/diff.md).

    \b
    vdisk diff export disk.vdk@mon disk.vdk@tue tue.vdiff
    vdisk diff import tue.vdiff copy.vdk        # copy.vdk holds disk.vdk@mon
    """


def _human(d: dict) -> str:
    what = "full stream" if d["full"] else "incremental stream"
    return (f"{what}: {d['records']} records, {d['data_bytes']} bytes of data, {d['zero_bytes']} bytes of zeros, "
            f"{d['stream_size']} bytes")


@diff.command("export", context_settings=CONTEXT_SETTINGS)
@format_option("-f", "--format", help="Format of both images (default: probed).")
@click.option("--from-start", is_flag=True, help="A full stream of IMAGE@B (no base), even if two images are given.")
@click.option("--resume", is_flag=True, help="Continue FILE.part, left by an interrupted export, from its last "
              "complete record.")
@progress_option()
@quiet_option()
@unsafe_backing_option()
@output_option()
@click.argument("images", nargs=-1, required=True)
@click.argument("file")
def export(fmt, from_start, resume, progress, quiet, unsafe_backing, output, images, file):
    """Write the changes from A to B into FILE: `export A B FILE`, or `export B FILE`
    for a full stream.  A and B are images of the same size (usually IMAGE@SNAP
    snapshots of one image; POOL/IMAGE@SNAP works too).  The stream is written to
    FILE.part and renamed when complete.

    JSON keys: records, data_records, zero_records, data_bytes, zero_bytes,
    stream_size, size, full, resumed_records."""
    from ..errors import UsageError
    from ..hostmem import keep_freed_buffers
    from ..ops.diff import export_diff

    keep_freed_buffers()
    if len(images) > 2:
        raise UsageError("diff export takes at most two images (A and B) and FILE")
    if from_start:
        images = images[-1:]
    target_name = images[-1]
    base_name = images[0] if len(images) == 2 else None
    with open_image(target_name, fmt=fmt, unsafe_backing=unsafe_backing) as target:
        if base_name is None:
            summary = _export(None, target, file, resume, progress, quiet, export_diff)
        else:
            with open_image(base_name, fmt=fmt, unsafe_backing=unsafe_backing) as base:
                summary = _export(base, target, file, resume, progress, quiet, export_diff)
    if not quiet or output == "json":
        emit(output, summary.as_dict(), _human)


def _export(base, target, file, resume, progress, quiet, export_diff):
    with progress_bar(target.size, "Exporting", force=progress, quiet=quiet) as bar:
        return export_diff(base, target, file, resume=resume, progress=bar.update)


@diff.command("import", context_settings=CONTEXT_SETTINGS)
@format_option("-f", "--format", help="Format of IMAGE (default: probed).")
@click.option("--resume", is_flag=True, help="Continue an interrupted import of FILE into IMAGE "
              "(FILE.import-progress).")
@progress_option()
@quiet_option()
@unsafe_backing_option()
@output_option()
@click.argument("file")
@click.argument("image")
def import_(fmt, resume, progress, quiet, unsafe_backing, output, file, image):
    """Apply the stream FILE to IMAGE.  An incremental stream needs IMAGE to hold its
    base where it changes it (checked per record); each record's checksum is verified
    before it is written.  Progress is kept in FILE.import-progress, so --resume can
    continue an interrupted import.

    JSON keys: as for export."""
    from ..hostmem import keep_freed_buffers
    from ..ops.diff import import_diff

    keep_freed_buffers()
    with open_image(image, fmt=fmt, read_only=False, unsafe_backing=unsafe_backing) as img, \
            progress_bar(img.size, "Importing", force=progress, quiet=quiet) as bar:
        summary = import_diff(file, img, image_name=image, resume=resume, progress=bar.update)
    if not quiet or output == "json":
        emit(output, summary.as_dict(), _human)
