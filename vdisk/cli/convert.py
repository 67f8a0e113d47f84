"""``vdisk convert``: copy an image's guest content into a new image."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from ..errors import UsageError
from .errors import sigterm_unwinds
from .options import (format_option, open_image, parse_o_options,
                      progress_option, quiet_option, unsafe_backing_option)
from .progress import progress_bar


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option(help="Source format (default: probed, raw if no magic).")
@click.option("-O", "--output-format", "out_fmt", default="raw", show_default=True, metavar="FMT", help="Destination format.")
@click.option("-c", "--compress", is_flag=True, help="Compress the destination (zstd).")
@click.option("-o", "opts", multiple=True, metavar="OPT=VAL[,...]", help="Destination format options, as for create.")
@click.option("-s", "--snapshot", default=None, metavar="NAME", help="Copy this internal snapshot of SRC.")
@click.option(
    "-t",
    "--cache",
    type=click.Choice(["unsafe", "writeback"]),
    default="unsafe",
    show_default=True,
    help="writeback: flush DST to disk before exiting; unsafe: leave that to the OS (as qemu-img convert).",
)
@progress_option()
@quiet_option()
@unsafe_backing_option()
@click.argument("src")
@click.argument("dst")
def convert(fmt, out_fmt, compress, opts, snapshot, cache, progress, quiet, unsafe_backing, src, dst):
    """Copy SRC's guest content (its backing chain flattened) into a new image DST.

    Zero and unallocated ranges are neither read nor written, so DST is sparse.
    An existing DST is replaced once the copy is complete (unless it is in use).
    """
    from ..ops.convert import convert as do_convert

    kw = parse_o_options(opts)
    if "backing_file" in kw or "backing_format" in kw:
        raise UsageError("convert makes a standalone image; backing_file cannot be set with -o")
    if compress:
        kw.setdefault("compression", "zstd")
    with sigterm_unwinds(), open_image(src, fmt=fmt, snapshot=snapshot, unsafe_backing=unsafe_backing) as img:
        with progress_bar(img.size, "Converting", force=progress, quiet=quiet) as bar:
            do_convert(img, dst, format=out_fmt, progress=bar.update, durable=cache == "writeback", **kw)
