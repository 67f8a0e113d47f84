"""``vdisk create``: a new image, or an overlay of a backing image."""

from __future__ import annotations

import contextlib
import os

import click

from .. import block
from ..errors import UsageError, VdiskError
from . import CONTEXT_SETTINGS
from .options import SIZE, format_option, open_image, parse_o_options, quiet_option, unsafe_backing_option

#: -o keys every format with a backing file takes (handled by create itself)
_COMMON_OPTIONS = {
    "backing_file": "file name of a backing image (as -b)",
    "backing_fmt": "format of the backing image (as -F)",
}


def format_options_help(fmt: str) -> str:
    """``-o help``: the options FMT's create takes, as qemu-img lists them."""
    from ..drivers import get_driver

    cls = get_driver(fmt)
    opts = dict(cls.create_options)
    if cls.supports_backing:
        opts.update(_COMMON_OPTIONS)
    if not opts:
        return f"The {fmt} format takes no options."
    width = max(len(k) for k in opts)
    return f"Supported {fmt} options:\n" + "\n".join(f"  {k:<{width}}  - {v}" for k, v in sorted(opts.items()))


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option(help="Image format: vdk (default; pool for POOL/IMAGE), raw, ...")
@click.option(
    "-o",
    "opts",
    multiple=True,
    metavar="OPT=VAL[,...]",
    help="Format options: cluster_size=64K, compression=zstd, backing_file=, backing_fmt=, "
    "and any option the format defines.  Repeatable.",
)
@click.option("-b", "--backing", "backing_file", metavar="BACKING[@SNAP]",
              help="Create an overlay of BACKING (or of its snapshot SNAP); a relative BACKING is relative "
              "to FILENAME's directory, as in qemu-img.")
@click.option("-F", "--backing-format", "backing_format", metavar="FMT", help="BACKING's format (required for raw).")
@unsafe_backing_option()
@quiet_option()
@click.argument("filename", required=False)
@click.argument("size", type=SIZE, required=False)
def create(fmt, opts, backing_file, backing_format, unsafe_backing, quiet, filename, size):
    """Create a new image FILENAME of SIZE bytes (10G, 512M, ...).

    With -b, SIZE defaults to the backing image's size, and BACKING must lie where
    vdisk follows backing files (FILENAME's directory or below, or a directory in
    VDISK_BACKING_DIRS) unless --unsafe-backing.  An existing FILENAME is never
    overwritten.  `-o help` lists the options of the format.
    """
    if any(part.strip() in ("help", "?") for o in opts for part in o.split(",")):
        click.echo(format_options_help(fmt or (block.default_format(filename) if filename else "vdk")))
        return
    if filename is None:
        raise click.UsageError("Missing argument 'FILENAME'.")
    fmt = fmt or block.default_format(filename)
    kw = parse_o_options(opts)
    backing_file = backing_file or kw.pop("backing_file", None)
    backing_format = backing_format or kw.pop("backing_format", None)
    kw.pop("backing_file", None)
    kw.pop("backing_format", None)
    if backing_format and not backing_file:
        raise UsageError("-F needs a backing file (-b)")
    if size is None and not backing_file:
        raise UsageError("a size is needed (or a backing file to take it from with -b)")
    if backing_file:
        from ..ops.chain import backing_spec

        backing_file, snap = backing_spec(filename, backing_file)
        if snap is not None:
            from ..ops.chain import clone as _clone
            from ..session import SESSION

            if backing_format not in (None, "vdk", "pool") or size is not None or kw:
                raise UsageError("-b BACKING@SNAP makes a linked clone of the snapshot: "
                                 "no -F other than vdk or pool, no size and no -o")
            _clone(os.path.join(os.path.dirname(os.path.abspath(filename)), backing_file) + "@" + snap,
                   filename, fmt=fmt, unsafe_backing=unsafe_backing, ctx=SESSION)
            if not quiet:
                click.echo(f"Formatting '{filename}', fmt={fmt} backing_file={backing_file}@{snap}")
            return
    block.create(filename, size, format=fmt, backing_file=backing_file, backing_format=backing_format,
                  unsafe_backing=unsafe_backing, **kw)
    if not quiet:
        if size is None:
            with contextlib.suppress(VdiskError, OSError):
                with open_image(filename, fmt=fmt, backing=False) as img:
                    size = img.size
        parts = [f"Formatting '{filename}', fmt={fmt}", f"size={size}"]
        if kw.get("cluster_size"):
            parts.append(f"cluster_size={kw['cluster_size']}")
        if kw.get("compression"):
            parts.append(f"compression={kw['compression']}")
        if backing_file:
            parts.append(f"backing_file={backing_file}")
            if backing_format:
                parts.append(f"backing_fmt={backing_format}")
        for k, v in (kw.get("options") or {}).items():
            parts.append(f"{k}={v}")
        click.echo(" ".join(parts))
