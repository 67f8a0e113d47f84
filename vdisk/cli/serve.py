"""``vdisk serve``: serve an image over NBD until stopped (as ``qemu-nbd`` does).

It stays in the foreground.  Once it listens it prints one line per address to
stdout, ``serving IMAGE (FMT, read-write, SIZE bytes) at URI``, and writes
``--pid-file`` if asked: a script waits for either.  SIGTERM or SIGINT stops it:
it stops accepting, lets the requests being served finish, flushes and closes the
image, removes its unix sockets and the pid file, and exits 0.
"""

from __future__ import annotations

import os
import sys

import click

from .options import (
    force_share_option,
    format_option,
    open_image,
    unsafe_backing_option,
)


@click.command()
@click.option("--nbd", "addresses", multiple=True, required=True, metavar="unix:PATH|tcp:HOST:PORT",
              help="Where to listen: a unix socket, or a TCP address with an explicit HOST (127.0.0.1, a "
                   "host's address; port 0 picks a free one).  Repeatable.")
@click.option("-r", "--read-only", is_flag=True, help="Serve the disk read-only (takes a shared lock).")
@format_option()
@click.option("--export-name", default="", show_default=True, metavar="NAME",
              help="The export's name; the empty name (a client's default) selects it too.")
@click.option("--description", default="", metavar="TEXT", help="The export's description (NBD_OPT_LIST).")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the server's pid here once it listens; removed on exit.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Connections served at once; more are closed at once.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection to stderr.")
@force_share_option()
@unsafe_backing_option()
@click.argument("image")
def serve(addresses, read_only, fmt, export_name, description, pid_file, max_connections, verbose, force_share,
          unsafe_backing, image):
    """Serve IMAGE (or its snapshot, IMAGE@SNAP, read-only) over NBD.

    QEMU attaches it with `-drive file=nbd+unix:///NAME?socket=PATH,format=raw` (or
    `nbd://HOST:PORT/NAME`); qemu-img, qemu-io and fio's nbd engine take the same URIs.
    Several clients may connect at once (multi-conn); they all see one image.  Block status (base:allocation) shows the image's allocation, trim
    and write-zeroes reach the image.  Unix sockets are made mode 0600.  No TLS:
    listen on a unix socket or on an address only trusted hosts reach.

    While it serves IMAGE read-write, `vdisk snapshot` (create, delete, rename, and
    revert with no client connected) and `vdisk clone IMAGE@SNAP` work on IMAGE: the
    server makes the change between two requests, so a snapshot holds every write
    a client had a reply for, as with `vdisk mount`.
    """
    import logging
    import signal

    from ..block import split_image_spec
    from ..errors import UsageError
    from ..export.nbd.control import NbdControl
    from ..export.nbd.server import NbdServer

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s vdisk serve: %(levelname)s %(message)s")
    if force_share and not read_only:
        raise UsageError("-U (--force-share) serves a disk another process writes: only with -r")
    snap = split_image_spec(image)[1]
    img = open_image(image, fmt=fmt, read_only=read_only or snap is not None, unsafe_backing=unsafe_backing,
                     force_share=force_share)
    wrote_pid = False
    server = ctl = None
    try:
        server = NbdServer(img, export_name=export_name, read_only=read_only, description=description,
                           max_connections=max_connections)

        def stop(signum, frame):
            server.stop()

        # before anyone can know we listen: a stop signal from then on flushes
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        uris = [server.listen(a) for a in addresses]
        if not server.read_only:  # snapshot commands on the image come to us
            ctl = NbdControl(server, img.filename)
            ctl.start()
        if pid_file:  # before the lines: whoever waits for a line finds the pid file too
            tmp = f"{pid_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, pid_file)
            wrote_pid = True
        mode = "read-only" if server.read_only else "read-write"
        for uri in uris:
            click.echo(f"serving {image} ({img.format}, {mode}, {img.size} bytes) at {uri}")
        sys.stdout.flush()
        server.serve_forever()
    finally:
        try:
            if ctl is not None:
                ctl.close()
            if server is not None:
                server.close()
            img.close()
        finally:
            if wrote_pid:
                try:
                    os.unlink(pid_file)
                except OSError:
                    pass
