"""A guest booted from a vdisk image through ``vdisk mount``: :func:`booted`.

The image is served by the FUSE export (``vdisk.export.fuse``) at a mount point in
the run directory and QEMU opens ``MOUNTPOINT/disk`` as its raw virtio drive with
``cache=none``, so every request of the guest reaches vdisk.  Cleanup is
unconditional: QEMU is killed if it still runs, then the image is unmounted
(which flushes it), even when the body raised.
"""

from __future__ import annotations

import contextlib
import os

from .qemu import Guest


@contextlib.contextmanager
def booted(image: str, build_dir: str, run_dir: str, *, trace: str | None = None, fmt: str | None = None,
           boot_timeout: float = 240.0, memory_mb: int = 512):
    from ..export.fuse.daemon import spawn, unmount

    mnt = os.path.join(run_dir, "mnt")
    os.makedirs(mnt, exist_ok=True)
    spawn(image, mnt, fmt=fmt, trace=trace, log_file=os.path.join(run_dir, "mount.log"))
    try:
        with Guest(build_dir, os.path.join(mnt, "disk"), run_dir, memory_mb=memory_mb) as guest:
            guest.start(boot_timeout=boot_timeout)
            yield guest
    finally:
        unmount(mnt)
