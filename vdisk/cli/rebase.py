"""``vdisk rebase -b NEW [-F FMT] [-u] FILE``."""

from __future__ import annotations

import os

import click

from vdisk.session import SESSION

from vdisk import block
from vdisk.cli.options import progress_option, unsafe_backing_option
from vdisk.cli.progress import progress_bar
from vdisk.ops.chain import backing_spec
from vdisk.ops.chain import rebase as _rebase


@click.command()
@click.option("-b", "--backing", "backing", required=True, metavar="NEW[@SNAP]",
              help='New backing image ("" for none); a relative NEW is relative to FILENAME\'s directory, '
              "as in qemu-img.")
@click.option("-F", "--backing-format", "backing_format", metavar="FMT", help="Format of the new backing image.")
@click.option("-u", "--unsafe", is_flag=True,
              help="Only rewrite the reference; the guest content may change, and NEW need not exist yet.")
@unsafe_backing_option()
@progress_option()
@click.argument("filename")
def rebase(backing, backing_format, unsafe, unsafe_backing, progress, filename):
    """Move overlay FILENAME onto another backing image, keeping its guest content:
    every range where the old and the new backing differ is copied into FILENAME first."""
    from vdisk.hostmem import keep_freed_buffers

    keep_freed_buffers()
    new = None
    if backing:
        path, snap = backing_spec(filename, backing)
        new = os.path.join(os.path.dirname(os.path.abspath(filename)), path) + (f"@{snap}" if snap else "")
    with block.open(filename, read_only=True, backing=False) as img:
        size = img.size
    with progress_bar(size, "rebase", force=progress and not unsafe) as bar:
        _rebase(filename, new, backing_format, unsafe=unsafe, progress=bar.update, unsafe_backing=unsafe_backing,
                ctx=SESSION)
