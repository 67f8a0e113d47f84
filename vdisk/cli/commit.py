"""``vdisk commit [-b BASE] FILE``."""

from __future__ import annotations

import click

from vdisk import block
from vdisk.cli.options import progress_option, unsafe_backing_option
from vdisk.cli.progress import progress_bar
from vdisk.ops.chain import commit as _commit


@click.command()
@click.option("-d", "--keep", is_flag=True, help="Keep the overlay's data instead of emptying it.")
@click.option("-b", "--base", "base", metavar="BASE",
              help="Commit into BASE, an image deeper in the chain, with the data of the images between "
              "(FILENAME is then kept as it is, as -d).")
@unsafe_backing_option()
@progress_option()
@click.argument("filename")
def commit(keep, base, unsafe_backing, progress, filename):
    """Merge overlay FILENAME into its backing image, then empty the overlay.

    Refused for an overlay with internal snapshots (they read through the backing
    image) and for one whose backing image is a snapshot (snapshots do not change)."""
    from vdisk.hostmem import keep_freed_buffers

    keep_freed_buffers()
    with block.open(filename, read_only=True, backing=False) as img:
        size = img.size
    with progress_bar(size, "commit", force=progress) as bar:
        _commit(filename, keep=keep, base=base, progress=bar.update, unsafe_backing=unsafe_backing)
