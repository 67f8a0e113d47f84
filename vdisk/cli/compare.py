"""``vdisk compare``: are two images' guest contents the same?"""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from .errors import errors_exit_with
from .options import force_share_option, format_option, open_image, progress_option, quiet_option, unsafe_backing_option
from .progress import progress_bar


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option("-f", "--format-a", help="Format of A (default: probed).")
@click.option("-F", "--format-b", "fmt_b", default=None, metavar="FMT", help="Format of B (default: probed).")
@click.option("-s", "--strict", is_flag=True, help="Images of different sizes are different.")
@progress_option()
@quiet_option()
@unsafe_backing_option()
@force_share_option()
@click.option("-T", "--source-cache", "src_cache", default=None, hidden=True,
              help="Accepted for qemu-img's sake: sources are read through the page cache.")
@click.argument("a")
@click.argument("b")
@click.pass_context
def compare(ctx, fmt, fmt_b, strict, progress, quiet, unsafe_backing, force_share, src_cache, a, b):
    """Compare the guest content of images A and B (each may be IMAGE@SNAP).

    Exit 0 if identical, 1 if different, 2 on error.  Like qemu-img, a size
    difference is allowed if the extra part reads as zeros, and a mismatch is
    reported at the start of the first differing 512-byte sector.
    """
    from ..ops.compare import compare as do_compare

    with errors_exit_with(2):
        with open_image(a, fmt=fmt, unsafe_backing=unsafe_backing, force_share=force_share) as ia, open_image(
            b, fmt=fmt_b, unsafe_backing=unsafe_backing, force_share=force_share
        ) as ib:
            with progress_bar(max(ia.size, ib.size), "Comparing", force=progress, quiet=quiet) as bar:
                res = do_compare(ia, ib, strict=strict, progress=bar.update)
    say = (lambda s: None) if quiet else click.echo
    if res.size_mismatch:
        if strict:
            say("Strict mode: Image size mismatch!")
            ctx.exit(1)
        say("Warning: Image size mismatch!")
    if res.identical:
        say("Images are identical.")
        ctx.exit(0)
    off = res.mismatch_offset or 0
    say(f"Content mismatch at offset {off - off % 512}!")
    ctx.exit(1)
