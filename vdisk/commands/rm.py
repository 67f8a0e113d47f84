"""``vdisk rm FILE``."""

from __future__ import annotations

import click

from vdisk.ops.chain import remove


@click.command()
@click.argument("filenames", nargs=-1, required=True)
def rm(filenames):
    """Delete images, releasing the hold a linked clone has on its source's snapshot."""
    for f in filenames:
        remove(f)
