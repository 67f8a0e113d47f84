"""``vdisk flatten FILE``."""

from __future__ import annotations

import click

from vdisk.session import SESSION

from vdisk import block
from vdisk.cli.options import progress_option, unsafe_backing_option
from vdisk.cli.progress import progress_bar
from vdisk.ops.chain import flatten as _flatten


@click.command()
@unsafe_backing_option()
@progress_option()
@click.argument("filename")
def flatten(unsafe_backing, progress, filename):
    """Copy everything FILENAME reads from its backing chain into it and drop the backing reference."""
    from vdisk.hostmem import keep_freed_buffers

    keep_freed_buffers()
    with block.open(filename, read_only=True, backing=False) as img:
        size = img.size
    with progress_bar(size, "flatten", force=progress) as bar:
        _flatten(filename, progress=bar.update, unsafe_backing=unsafe_backing, ctx=SESSION)
