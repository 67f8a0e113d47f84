"""``vdisk resize``: change the guest size."""

from __future__ import annotations

import click

from ..sizes import format_size
from . import CONTEXT_SETTINGS

from ..errors import UsageError
from .options import (SIZE, format_option, open_image, quiet_option)


@click.command(context_settings={**CONTEXT_SETTINGS, "ignore_unknown_options": True})
@format_option()
@click.option("--shrink", is_flag=True, help="Allow making the image smaller (drops data past the new end).")
@quiet_option()
@click.argument("filename")
@click.argument("size")
def resize(fmt, shrink, quiet, filename, size):
    """Set the guest size of FILENAME to SIZE, or grow/shrink it by +SIZE/-SIZE.

    Shrinking needs --shrink.  Growing adds a range that reads as zeros.
    """
    text = size.strip()
    sign = text[:1] if text[:1] in "+-" else ""
    amount = SIZE.convert(text[1:] if sign else text, None, None)
    with open_image(filename, fmt=fmt, read_only=False, backing=True) as img:
        if sign == "+":
            new = img.size + amount
        elif sign == "-":
            new = img.size - amount
            if new < 0:
                raise UsageError(f"{filename}: cannot shrink by {format_size(amount)}: the image is only {img.size} bytes")
        else:
            new = amount
        img.resize(new, shrink=shrink)
        img.flush()
    if not quiet:
        click.echo("Image resized.")
