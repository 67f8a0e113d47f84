"""``vdisk mount`` and ``vdisk umount``: serve an image through FUSE, and stop serving it.

They raise :class:`~vdisk.errors.VdiskError` for failures, which the CLI turns into
``vdisk: <message>`` and the error's exit code; run alone (no such handler around
them) they do the same themselves.
"""

from __future__ import annotations

import functools
import sys

import click

from ..errors import VdiskError


def _errors_to_exit(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VdiskError as exc:
            click.echo(f"vdisk: {exc.message}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.command("mount")
@click.option("--read-only", "-r", is_flag=True, help="Serve the disk read-only (takes a shared lock).")
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("--format", "fmt", default=None, help="Image format (default: probed; raw only when given).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Log of the mount daemon (default: in /run/vdisk, printed on start).")
@click.option("--engine", type=click.Choice(["pyfuse3", "kernel"]), default=None,
              help="FUSE engine: pyfuse3 (libfuse + pyfuse3 + trio) or kernel (the FUSE protocol on "
                   "/dev/fuse in Python, faster). Default: $VDISK_FUSE_ENGINE, else kernel.")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Record every request to the disk (time, op, offset, length, latency) in FILE; "
                   "the format is in formats/trace.md.")
@click.option("--inactive", is_flag=True,
              help="Serve IMAGE read-only, taking neither its write lock nor its writer lease, until "
                   "`vdisk activate MOUNTPOINT` (a hand-over target: see `vdisk activate --help`).")
@click.option("--no-direct-io", is_flag=True, hidden=True,
              help="Let the kernel page-cache the disk file (direct_io is on by default).")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_errors_to_exit
def mount_command(read_only, foreground, fmt, log_file, engine, trace, inactive, no_direct_io, image, mountpoint):
    """Serve IMAGE (or its snapshot, IMAGE@SNAP, read-only) through FUSE at MOUNTPOINT.

    MOUNTPOINT/disk is the image's current state (read-write unless --read-only),
    MOUNTPOINT/snapshots/NAME each internal snapshot, read-only.  Attach the disk to a
    loop device with `losetup -f --show MOUNTPOINT/disk`.  While mounted read-write,
    `vdisk snapshot create IMAGE NAME` works live through the mount.  fsync on the
    disk is durable.  Stop with `vdisk umount MOUNTPOINT`.
    """
    if foreground:
        import os

        from vdisk.export.fuse.__main__ import main as daemon_main

        if engine:
            os.environ["VDISK_FUSE_ENGINE"] = engine  # the daemon's serve() reads it

        args = []
        if read_only:
            args.append("--read-only")
        if fmt:
            args += ["--format", fmt]
        if log_file:
            args += ["--log-file", log_file]
        if no_direct_io:
            args.append("--no-direct-io")
        if trace:
            args += ["--trace", trace]
        if inactive:
            args.append("--inactive")
        sys.exit(daemon_main(args + [image, mountpoint]))
    from vdisk.export.fuse.daemon import spawn

    pid, log = spawn(image, mountpoint, read_only=read_only, fmt=fmt, log_file=log_file,
                     direct_io=not no_direct_io, engine=engine, trace=trace, inactive=inactive)
    from vdisk.block import split_image_spec

    ro = read_only or split_image_spec(image)[1] is not None
    mode = "inactive" if inactive else "read-only" if ro else "read-write"
    click.echo(f"mounted {image} on {mountpoint} ({mode}); daemon pid {pid}, log {log}")


@click.command("umount")
@click.option("--lazy", "-z", is_flag=True, help="Detach even if busy (fusermount3 -u -z); do not wait.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the daemon to flush and exit.")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_errors_to_exit
def umount_command(lazy, timeout, mountpoint):
    """Flush the image served at MOUNTPOINT, unmount it and wait for the daemon to exit."""
    from vdisk.export.fuse.daemon import unmount

    unmount(mountpoint, lazy=lazy, timeout=timeout)


def _ask_mount(mountpoint: str, op: str):
    import os

    from vdisk.export.fuse import control
    from vdisk.export.fuse.mountpoint import MountError

    reply = control.request_at(control.mount_socket_path(mountpoint), mountpoint, {"op": op})
    if reply is None:
        raise MountError(f"{mountpoint}: no read-write or inactive vdisk mount is there"
                         + ("" if os.path.isdir(mountpoint) else " (no such directory)"))
    return control.result(reply)


@click.command("activate")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="While another process still holds the image for writing, try again for this long.")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_errors_to_exit
def activate_command(wait, mountpoint):
    """Make the inactive mount at MOUNTPOINT the image's writer.

    It opens the image for writing (taking its write lock, or for an image in a pool
    on an object store its writer lease) and serves that from now on: MOUNTPOINT/disk
    takes writes, snapshot commands on the image reach this mount.  Hand-over between
    two mounts of one image, without unmounting either (a VM moving hosts):

      vdisk deactivate A; vdisk activate B

    Fails, naming the holder, while another process still holds the image for
    writing (unless it lets go within --wait).
    """
    import time

    from vdisk.errors import ImageLocked

    deadline = time.monotonic() + wait
    while True:
        try:
            _ask_mount(mountpoint, "activate")
            break
        except ImageLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    click.echo(f"{mountpoint}: active (the image is open for writing here)")


@click.command("deactivate")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@_errors_to_exit
def deactivate_command(mountpoint):
    """Let the read-write mount at MOUNTPOINT stop being the image's writer.

    It flushes, closes the image for writing (releasing its write lock or writer
    lease) and goes on serving the last committed state read-only until
    `vdisk activate` or `vdisk umount`; writes to MOUNTPOINT/disk fail with EROFS
    meanwhile.  Everything acknowledged before is durable when this returns.
    """
    _ask_mount(mountpoint, "deactivate")
    click.echo(f"{mountpoint}: inactive (the image is no longer open for writing here)")

