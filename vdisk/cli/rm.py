"""``vdisk rm [-r] [-n] FILE...``."""

from __future__ import annotations

import click

from vdisk.session import SESSION

from vdisk.ops.chain import remove


@click.command()
@click.option("-r", "--recursive", is_flag=True,
              help="Also remove every image that depends on FILE (its clones and overlays), deepest first.")
@click.option("-n", "--dry-run", is_flag=True, help="Only print what would be removed.")
@click.option("-v", "--verbose", is_flag=True, help="Print each image as it is removed.")
@click.argument("filenames", nargs=-1, required=True)
def rm(recursive, dry_run, verbose, filenames):
    """Delete images, releasing the hold a linked clone has on its source's snapshot.

    An image that others depend on -- linked clones holding one of its snapshots
    (also a deleted, hidden one), overlays next to it naming it as their backing
    file -- is refused, naming them, as `zfs destroy` and `rbd rm` refuse; -r
    removes the whole family instead.  A copy of a linked clone made with cp
    shares its identity: removing the copy releases nothing while the original is
    where it was made."""
    for f in filenames:
        remove(f, recursive=recursive, dry_run=dry_run, ctx=SESSION,
               removed=(lambda p: click.echo(f"would remove {p}" if dry_run else f"removed {p}"))
               if dry_run or verbose else None)
