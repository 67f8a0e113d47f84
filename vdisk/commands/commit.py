"""``vdisk commit FILE``."""

from __future__ import annotations

import click

from vdisk import block
from vdisk.cli import progress_bar, progress_option
from vdisk.ops.chain import commit as _commit


@click.command()
@click.option("-d", "--keep", is_flag=True, help="Keep the overlay's data instead of emptying it.")
@progress_option()
@click.argument("filename")
def commit(keep, progress, filename):
    """Merge overlay FILENAME into its backing image, then empty the overlay."""
    with block.open(filename, read_only=True, backing=False) as img:
        size = img.size
    with progress_bar(size, "commit", force=progress) as bar:
        _commit(filename, keep=keep, progress=bar.update)
