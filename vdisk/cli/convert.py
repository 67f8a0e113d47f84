"""``vdisk convert``: copy an image's guest content into a new image."""

from __future__ import annotations

import click

from ..errors import UsageError
from . import CONTEXT_SETTINGS
from .errors import sigterm_unwinds
from .options import (SIZE, force_share_option, format_option, open_image, parse_o_options, progress_option,
                      quiet_option, unsafe_backing_option)
from .progress import progress_bar


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option(help="Source format (default: probed, raw if no magic).")
@click.option("-O", "--output-format", "out_fmt", default=None, metavar="FMT",
              help="Destination format (default: raw; pool for POOL/IMAGE).")
@click.option("-c", "--compress", is_flag=True, help="Compress the destination (zstd; zlib for qcow2, as qemu-img).")
@click.option("-o", "opts", multiple=True, metavar="OPT=VAL[,...]", help="Destination format options, as for create.")
@click.option("-s", "--snapshot", default=None, metavar="NAME", help="Copy this internal snapshot of SRC (as SRC@NAME).")
@click.option("-l", "snapshot_param", default=None, metavar="SNAPSHOT",
              help="qemu-img's spelling of -s: NAME, snapshot.name=NAME or snapshot.id=ID.")
@click.option("-n", "existing", is_flag=True, help="Write into the existing image DST instead of creating it.")
@click.option("--target-is-zero", is_flag=True, help="With -n: DST reads as zeros already; do not zero it.")
@click.option("-S", "--sparse-size", "sparse_size", type=SIZE, default=None, metavar="SIZE",
              help="Zero runs of at least SIZE are left unallocated (default: the cluster size); 0: allocate "
              "everything.")
@click.option("-B", "--backing", "backing_file", metavar="BACKING",
              help="DST is an overlay on BACKING (relative to DST's directory) holding only what differs.")
@click.option("-F", "--backing-format", "backing_format", metavar="FMT", help="BACKING's format (required for raw).")
@click.option("-r", "--rate-limit", "rate_limit", type=SIZE, default=None, metavar="RATE",
              help="At most RATE bytes a second (K, M, G suffixes).")
@click.option("-m", "coroutines", type=click.IntRange(1, 16), default=None,
              help="Source chunks read ahead while writing (qemu-img: parallel coroutines; default 2); "
                   "the destination is written by its own thread, two chunks behind the reads.")
@click.option("-W", "out_of_order", is_flag=True,
              help="Accepted for qemu-img's sake: vdisk writes in order, which is never slower here.")
@click.option("-T", "--source-cache", "src_cache", default=None, hidden=True,
              help="Accepted for qemu-img's sake: sources are read through the page cache.")
@click.option(
    "-t",
    "--cache",
    type=click.Choice(["unsafe", "writeback", "none", "writethrough", "directsync"]),
    default="unsafe",
    show_default=True,
    help="unsafe: leave flushing DST to the OS (as qemu-img convert); any other: start writing DST back to "
    "disk as it copies, and flush it before exiting.",
)
@progress_option()
@quiet_option()
@unsafe_backing_option()
@force_share_option()
@click.argument("src")
@click.argument("dst")
def convert(fmt, out_fmt, compress, opts, snapshot, snapshot_param, existing, target_is_zero, sparse_size,
            backing_file, backing_format, rate_limit, coroutines, out_of_order, src_cache, cache, progress, quiet,
            unsafe_backing, force_share, src, dst):
    """Copy SRC's guest content (its backing chain flattened) into a new image DST.

    SRC may be SRC@SNAP.  Zero and unallocated ranges are neither read nor written,
    so DST is sparse.  An existing DST is replaced once the copy is complete (unless
    it is in use); with -n, DST is written in place and must be as large as SRC.
    """
    from ..hostmem import keep_freed_buffers
    from ..ops.convert import convert as do_convert
    from ..session import SESSION

    keep_freed_buffers()
    kw = parse_o_options(opts)
    if "backing_file" in kw or "backing_format" in kw:
        raise UsageError("set the destination's backing file with -B (and -F), not with -o")
    if backing_format and not backing_file:
        raise UsageError("-F goes with -B")
    if target_is_zero and not existing:
        raise UsageError("--target-is-zero goes with -n")
    if existing and (kw or compress):
        raise UsageError("-n writes into an existing image: no -o or -c")
    if snapshot_param is not None:
        if snapshot is not None:
            raise UsageError("-s and -l both name a snapshot: give one")
        key, sep, val = snapshot_param.partition("=")
        if not sep:
            snapshot = snapshot_param
        elif key == "snapshot.name":
            snapshot = val
        elif key == "snapshot.id":
            snapshot = f"#{val}"
        else:
            raise UsageError(f"-l {snapshot_param}: expected NAME, snapshot.name=NAME or snapshot.id=ID")
    if compress:
        kw.setdefault("compression", "zlib" if out_fmt == "qcow2" else "zstd")
    with sigterm_unwinds(), open_image(src, fmt=fmt, snapshot=snapshot, unsafe_backing=unsafe_backing,
                                       force_share=force_share) as img:
        with progress_bar(img.size, "Converting", force=progress, quiet=quiet) as bar:
            do_convert(img, dst, format=out_fmt, progress=bar.update, durable=cache != "unsafe",
                       existing=existing, target_is_zero=target_is_zero,
                       sparse=sparse_size != 0, granularity=sparse_size or None,
                       backing_file=backing_file, backing_format=backing_format, rate_limit=rate_limit,
                       read_ahead=coroutines or 2, unsafe_backing=unsafe_backing, ctx=SESSION, **kw)
