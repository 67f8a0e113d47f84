"""``vdisk map``: which guest ranges are data, zeros or in a backing image."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from ..errors import UsageError
from .options import (SIZE, force_share_option, format_option, open_image, output_option, unsafe_backing_option)
from .output import emit


@click.command("map", context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("--start-offset", type=SIZE, default=0, help="First guest byte to map.")
@click.option("--max-length", type=SIZE, default=None, help="Map at most this many bytes.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
def map_(fmt, output, start_offset, max_length, unsafe_backing, force_share, filename):
    """Show how the guest disk maps to data, zeros and backing images.

    Human output lists the ranges holding data (offset, length, host offset, file),
    like qemu-img map.

    \b
    JSON: a list of extents covering the range without gaps, each
      {start, length, depth (0 = top image), present, zero, data,
       compressed, offset (host offset of the data, or null)}.
    """
    from ..ops.mapping import map_extents, render_map_human

    with open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share) as img:
        if start_offset > img.size:
            raise UsageError(f"--start-offset {start_offset} is past the end of the image ({img.size} bytes)")
        extents = map_extents(img, start_offset, max_length)
        emit(output, extents, lambda e: render_map_human(img, e))
