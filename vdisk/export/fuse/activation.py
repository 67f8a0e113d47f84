"""Active and inactive mounts: handing an image's writer over between two mounts
without unmounting either, as QEMU inactivates a migration source's images and
activates the destination's (``blockdev-set-active``).

A read-write mount is *active*: it holds the image open for writing, so it holds the
image's write lock (a file) or its writer lease (an image in a pool on an object
store), and it listens on two control sockets: the image's (snapshot commands, found
by the image's identity, :func:`control.socket_path`) and its own
(:func:`control.mount_socket_path`, found by the mountpoint).

An *inactive* mount (``vdisk mount --inactive``, or an active one after
``vdisk deactivate``) serves the image's last committed state read-only through a
handle that takes no lock and no lease (as ``-U``); writes, truncation and hole
punching get EROFS, fsync succeeds (there is nothing to make durable), the disk may
stay open read-write (a migration target's QEMU opens its disk before it runs).  It
listens only on its own socket, so a snapshot command finds the active one.

Hand-over (host A active, host B inactive on the same image)::

    vdisk deactivate A    # flush; close the writer (lock or lease released)
    vdisk activate B      # open for writing (takes them); serve it from now on

Deactivation flushes before it lets go, so B's first read sees every write A
acknowledged; activation opens a fresh handle, so B never serves what it read
before.  Both run in the daemon's trio thread under the engine's lock, between two
FUSE requests.  Reads that were cached from the old handle are dropped with it
(snapshot views are reopened on their next open; a snapshot file that is open
refuses the switch).
"""

from __future__ import annotations

import logging
import os

import vdisk

log = logging.getLogger("vdisk.export.fuse")


def open_inactive(image_path: str, fmt: str | None) -> vdisk.Image:
    """The lock-free, lease-free read-only handle an inactive mount serves."""
    return vdisk.open(image_path, read_only=True, format=fmt, force_share=True)


class Activation:
    """Switches the mount of ``daemon`` (a :class:`vdisk.export.fuse.daemon._Daemon`)
    between active and inactive; called under the engine's lock."""

    def __init__(self, daemon, fmt: str | None):
        self.d = daemon
        self.fmt = fmt

    def state(self) -> dict:
        return {"active": not self.d.fs.inactive}

    def deactivate(self) -> dict:
        fs = self.d.fs
        if fs.inactive:
            return self.state()
        if fs.read_only:
            raise vdisk.errors.UsageError("a read-only mount has no writer to hand over")
        fs.image.flush()  # raises if it cannot: then nothing is let go
        ro = open_inactive(self.d.image_path, self.fmt or fs.image.format)
        try:
            old = fs.swap_image(ro, inactive=True)
        except BaseException:
            ro.close()
            raise
        self.d.stop_image_socket()
        old.close()  # the write lock or the lease goes here
        log.info("deactivated: %s is no longer open for writing here", self.d.image_path)
        return self.state()

    def activate(self) -> dict:
        fs = self.d.fs
        if not fs.inactive:
            return self.state()
        rw = vdisk.open(self.d.image_path, format=self.fmt or fs.image.format)  # ImageLocked: still held
        try:
            old = fs.swap_image(rw, inactive=False)
        except BaseException:
            rw.close()
            raise
        try:
            old.close()
        except vdisk.errors.VdiskError as exc:
            log.warning("closing the inactive handle: %s", exc)
        fs.failed = None
        self.d.start_image_socket()
        log.info("activated: %s is open for writing here (pid %d)", self.d.image_path, os.getpid())
        return self.state()

