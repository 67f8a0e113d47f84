"""``vdisk clone SRC[@SNAPSHOT] DST``."""

from __future__ import annotations

import click

from vdisk.cli import progress_bar, progress_option
from vdisk.ops.chain import clone as _clone


@click.command()
@click.option("--full", is_flag=True, help="Copy all data: an independent image instead of a linked clone.")
@click.option("-c", "--compress", is_flag=True, help="With --full: compress the copy (zstd).")
@progress_option()
@click.argument("source")
@click.argument("dest")
def clone(full, compress, progress, source, dest):
    """Make DEST a clone of SOURCE[@SNAPSHOT].

    A linked clone (the default) is a vdk overlay on the snapshot: it is created in
    constant time and holds only metadata until written.  Without @SNAPSHOT, a vdk
    SOURCE gets a new snapshot named clone-DEST first, so SOURCE stays writable; a raw
    or qcow2 SOURCE becomes DEST's backing file as it is.  The snapshot cannot vanish
    under the clone: deleting it keeps its data until the last clone is flattened,
    rebased elsewhere or removed with `vdisk rm`."""
    if compress and not full:
        raise click.UsageError("-c goes with --full")
    if full:
        from vdisk import block
        from vdisk.ops.chain import split_snapshot_spec

        path, snap = split_snapshot_spec(source)
        with block.open(path, read_only=True, snapshot=snap) as img:
            size = img.size
        with progress_bar(size, "clone", force=progress) as bar:
            _clone(source, dest, full=True, compression="zstd" if compress else None, progress=bar.update)
    else:
        _clone(source, dest)
