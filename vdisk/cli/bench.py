"""``vdisk bench``: time a run of reads or writes through the block layer, as
``qemu-img bench`` does (same options, same report)."""

from __future__ import annotations

import time

import click

from ..errors import UsageError
from .options import SIZE, force_share_option, format_option, open_image, quiet_option


@click.command()
@click.option("-c", "--count", type=click.IntRange(min=1), default=75000, show_default=True,
              help="Number of requests.")
@click.option("-d", "--depth", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests in flight (accepted for qemu-img's sake; vdisk issues them one after another).")
@format_option()
@click.option("--flush-interval", type=click.IntRange(min=0), default=0,
              help="With -w: flush after every this many requests (0: only at the end).")
@click.option("-n", "--no-cache", "nocache", is_flag=True, help="Accepted for qemu-img's sake (cache=none).")
@click.option("-o", "--offset", type=SIZE, default=0, help="Offset of the first request.")
@click.option("--pattern", type=click.IntRange(0, 255), default=0xA5, show_default=True,
              help="With -w: the byte written.")
@click.option("-s", "--buffer-size", "bufsize", type=SIZE, default=4096, show_default=True,
              help="Bytes per request.")
@click.option("-S", "--step-size", "step", type=SIZE, default=None, help="Distance between requests (default: -s).")
@click.option("-t", "--cache", type=click.Choice(["writeback", "unsafe", "none", "writethrough", "directsync"]),
              default="writeback", help="Cache mode (unsafe skips the final flush).")
@click.option("-w", "--write", is_flag=True, help="Write instead of read.")
@force_share_option()
@quiet_option()
@click.argument("filename")
def bench(count, depth, fmt, flush_interval, nocache, offset, pattern, bufsize, step, cache, write, force_share,
          quiet, filename):
    """Run COUNT requests of BUFFER_SIZE bytes against FILENAME (reads by default)
    and report how long they took.  Requests start at OFFSET and advance by
    STEP_SIZE, wrapping around at the end of the image, as in qemu-img bench."""
    if write and force_share:
        raise UsageError("-U is for reading: a benchmark that writes needs the image to itself")
    step = bufsize if step is None else step
    with open_image(filename, fmt=fmt, read_only=not write, force_share=force_share) as img:
        if bufsize <= 0 or bufsize > img.size:
            raise UsageError(f"buffer size {bufsize} must be 1 to the image's size ({img.size} bytes)")
        if offset + bufsize > img.size:
            raise UsageError(f"offset {offset} + buffer size {bufsize} lies past the end of the image")
        if not quiet:
            click.echo(f"Sending {count} {'write' if write else 'read'} requests, {bufsize} bytes each, "
                       f"{depth} in parallel (starting at offset {offset}, step size {step})")
        data = bytes([pattern]) * bufsize
        pos = offset
        start = time.perf_counter()
        for i in range(count):
            if write:
                img.write(pos, data)
                if flush_interval and (i + 1) % flush_interval == 0:
                    img.flush()
            else:
                img.read(pos, bufsize)
            pos += step
            if pos + bufsize > img.size:
                pos = offset
        if write and cache != "unsafe":
            img.flush()
        elapsed = time.perf_counter() - start
    if not quiet:
        click.echo(f"Run completed in {elapsed:.3f} seconds.")
