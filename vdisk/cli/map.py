"""``vdisk map``: which guest ranges are data, zeros or in a backing image."""

from __future__ import annotations

import json

import click

from . import CONTEXT_SETTINGS

from ..errors import UsageError
from .options import (SIZE, force_share_option, format_option, open_image, output_option, unsafe_backing_option)


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

    --output json prints what qemu-img map --output json prints: a list of extents
    covering the range without gaps, adjacent extents of the same kind merged.
    Keys qemu-img prints have qemu-img's names and meaning; vdisk's own keys start
    with "vdisk-".  Every key is always present: where qemu-img leaves "offset" out,
    vdisk prints null.

    \b
    JSON: [{start, length (guest bytes),
            depth (the image of the chain that decides the range; 0 = the top),
            present (some image holds the range: data or explicit zeros),
            zero (reads as zeros), data (holds data),
            offset (host offset in that image's file, or null: not stored
              there, or compressed),
            vdisk-compressed (the data is stored compressed)}, ...]
    """
    from ..ops.mapping import map_extents, map_json, render_map_human

    with open_image(filename, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share) as img:
        if start_offset > img.size:
            raise UsageError(f"--start-offset {start_offset} is past the end of the image ({img.size} bytes)")
        extents = map_extents(img, start_offset, max_length)
        if output == "json":
            # one extent a line, as qemu-img prints them: a large map stays greppable
            click.echo("[" + ",\n".join(json.dumps(e) for e in map_json(extents)) + "]")
        else:
            click.echo(render_map_human(img, extents))
