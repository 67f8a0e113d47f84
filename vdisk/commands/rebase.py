"""``vdisk rebase -b NEW [-F FMT] [-u] FILE``."""

from __future__ import annotations

import click

from vdisk import block
from vdisk.cli import progress_bar, progress_option
from vdisk.ops.chain import rebase as _rebase


@click.command()
@click.option("-b", "--backing", "backing", required=True, metavar="NEW[@SNAP]",
              help='New backing image ("" for none); relative paths are relative to the current directory.')
@click.option("-F", "--backing-format", "backing_format", metavar="FMT", help="Format of the new backing image.")
@click.option("-u", "--unsafe", is_flag=True, help="Only rewrite the reference; the guest content may change.")
@progress_option()
@click.argument("filename")
def rebase(backing, backing_format, unsafe, progress, filename):
    """Move overlay FILENAME onto another backing image, keeping its guest content:
    every range where the old and the new backing differ is copied into FILENAME first."""
    with block.open(filename, read_only=True, backing=False) as img:
        size = img.size
    with progress_bar(size, "rebase", force=progress and not unsafe) as bar:
        _rebase(filename, backing or None, backing_format, unsafe=unsafe, progress=bar.update)
