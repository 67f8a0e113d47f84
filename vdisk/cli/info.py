"""``vdisk info``: facts about an image (and its backing chain)."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from ..errors import BackingError
from .options import (force_share_option, format_option, open_image, output_option, unsafe_backing_option)
from .output import emit, one_line


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("--backing-chain", is_flag=True, help="Describe every image of the backing chain, top first.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
def info(fmt, output, backing_chain, unsafe_backing, force_share, filename):
    """Show facts about an image.

    \b
    JSON keys (an object; a list of them with --backing-chain):
      filename, format, virtual_size, disk_size (host bytes used),
      cluster_size, compression (null if off), read_only,
      backing_filename, backing_format, backing_snapshot,
      full_backing_filename (null if none or not opened),
      backing_snapshot_name (vdk clones, whose backing snapshot is "#ID"),
      snapshots: [{id, name, created (epoch seconds), size, generation,
                   unique_bytes, holds, extra}],
      then any format-specific keys.
    """
    from ..ops.mapping import chain_info, image_info, render_info_human

    try:
        img = open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share)
    except BackingError as exc:
        if backing_chain:
            raise
        # The image itself is fine: describe it without its (unreachable) backing chain.
        click.echo(f"vdisk: warning: {one_line(exc.message)}", err=True)
        img = open_image(filename, fmt=fmt, backing=False, force_share=force_share)
    with img:
        if backing_chain:
            data = chain_info(img)
            emit(output, data, lambda d: "\n\n".join(render_info_human(i) for i in d))
        else:
            emit(output, image_info(img), render_info_human)
