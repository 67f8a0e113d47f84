"""``vdisk clone SRC[@SNAPSHOT] DST``."""

from __future__ import annotations

import click

from vdisk.session import SESSION

from vdisk.cli.options import progress_option, unsafe_backing_option
from vdisk.cli.progress import progress_bar
from vdisk.ops.chain import clone as _clone


@click.command()
@click.option("--full", is_flag=True, help="Copy all data: an independent image instead of a linked clone.")
@click.option("-c", "--compress", is_flag=True, help="With --full: compress the copy.")
@click.option("-f", "-O", "--format", "fmt", default=None, metavar="FMT",
              help="Format of DEST (default: vdk, pool for POOL/IMAGE; a linked clone of a snapshot is vdk or pool).")
@unsafe_backing_option()
@progress_option()
@click.argument("source")
@click.argument("dest")
def clone(full, compress, fmt, unsafe_backing, progress, source, dest):
    """Make DEST a clone of SOURCE[@SNAPSHOT].

    A linked clone (the default) is a vdk overlay on the snapshot: it is created in
    constant time and holds only metadata until written.  Without @SNAPSHOT, a vdk
    SOURCE gets a new snapshot named clone-DEST first, so SOURCE stays writable; a raw
    or qcow2 SOURCE becomes DEST's backing file as it is.  A snapshot of a raw or
    qcow2 image cannot be cloned linked: those formats cannot record that the clone
    needs it (use --full).  SOURCE's snapshot cannot vanish under the clone: SOURCE
    records DEST as its holder, deleting the snapshot keeps its data until the last
    holder is flattened, rebased elsewhere or removed with `vdisk rm`, and `vdisk rm
    SOURCE` is refused while clones depend on it.  A linked clone must be able to
    follow its backing file: SOURCE must lie in DEST's directory or below it, or in
    a directory of VDISK_BACKING_DIRS, unless --unsafe-backing.

    In a pool, POOL/IMAGE[@SNAPSHOT] -> POOL/NEW is a native clone: it shares the
    snapshot's data and the pool records it as the snapshot's holder in one step.
    Between a pool and a file, or two pools, the clone is an overlay on the
    snapshot as above (a pool image follows backing files in its pool's directory,
    so a file beside the pool needs VDISK_BACKING_DIRS)."""
    if full:
        from vdisk.hostmem import keep_freed_buffers

        keep_freed_buffers()
    if compress and not full:
        raise click.UsageError("-c goes with --full")
    if full:
        from vdisk import block
        from vdisk.ops.chain import split_snapshot_spec

        path, snap = split_snapshot_spec(source)
        with block.open(path, read_only=True, snapshot=snap, unsafe_backing=unsafe_backing) as img:
            size = img.size
        comp = None
        if compress:
            comp = "zlib" if fmt == "qcow2" else "zstd"
        with progress_bar(size, "clone", force=progress) as bar:
            _clone(source, dest, full=True, compression=comp, progress=bar.update, fmt=fmt,
                   unsafe_backing=unsafe_backing, ctx=SESSION)
    else:
        _clone(source, dest, fmt=fmt, unsafe_backing=unsafe_backing, ctx=SESSION)
