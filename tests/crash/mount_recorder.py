"""Serve an image through the real FUSE export while recording every host operation.

    python -m tests.crash.mount_recorder IMAGE MOUNTPOINT LOGFILE

A power cut cannot be simulated with the mount daemon itself: ``kill -9`` leaves the
host file's page cache intact, so every write that reached the daemon survives, and
there is no device-mapper (dm-flakey, dm-log-writes) on every test machine.  So this
program does what the daemon does (``vdisk.export.fuse.daemon.serve``: ``VdiskFS`` over the
image, the same mount options, ``direct_io`` as ``vdisk mount`` uses by default,
pyfuse3's main loop in trio with one worker), except that the image lives in a
:class:`~tests.crash.storage.RecordingStorage` loaded from IMAGE.  Every pwrite,
truncate, punch_hole and flush the driver issues is logged, so a test can rebuild the
host file as a power cut at any point (and any torn or reordered subset of the writes
since the last completed flush) could have left it.

Protocol:

* it prints ``READY`` on stdout once the mount is live (a traceback on stderr and a
  non-zero exit status if it cannot mount);
* ``getxattr(MOUNTPOINT, "user.powercut.mark")`` returns the number of log records
  so far (ASCII).  FUSE requests are handled one at a time, so a mark taken right
  after ``fsync`` returned is the log position at which that fsync was acknowledged;
* on SIGTERM (or SIGINT) it unmounts (lazily if the mount is busy), closes the image
  (which flushes it, as the daemon does), and writes LOGFILE: a pickle of
  ``{"format", "size", "base", "log", "events"}``: ``base`` the image file's bytes
  (durable), ``log`` the records of :mod:`tests.crash.storage`, ``events`` one tuple
  per FUSE data request: ``("write", pos_before, pos_after, offset, length)`` or
  ``("fsync", pos_before, pos_after)``.  IMAGE itself is never written.
* it exits 0 after writing LOGFILE.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import subprocess
import sys

import pyfuse3
import trio

import vdisk
from vdisk.export.fuse.daemon import mount_options
from vdisk.export.fuse.fs import ROOT_INO, VdiskFS
from vdisk.block import Image
from vdisk.drivers import get_driver

from .storage import RecordingStorage

log = logging.getLogger("powercut")

MARK_XATTR = b"user.powercut.mark"


class RecordingFS(VdiskFS):
    """VdiskFS unchanged on the data path, plus the mark xattr and a request log."""

    def __init__(self, image: Image, storage: RecordingStorage, **kw):
        super().__init__(image, **kw)
        self.storage = storage
        self.events: list[tuple] = []

    async def write(self, fh, off, buf):
        before = len(self.storage.log)
        n = await super().write(fh, off, buf)
        self.events.append(("write", before, len(self.storage.log), off, n))
        return n

    async def fsync(self, fh, datasync):
        before = len(self.storage.log)
        await super().fsync(fh, datasync)
        self.events.append(("fsync", before, len(self.storage.log)))

    async def getxattr(self, inode, name, ctx):
        if inode == ROOT_INO and name == MARK_XATTR:
            return str(len(self.storage.log)).encode()
        return await super().getxattr(inode, name, ctx)


def _fusermount(mountpoint: str, lazy: bool) -> tuple[int, str]:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return p.returncode, p.stderr


async def _signals(mountpoint: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        task_status.started()
        async for signum in sigs:
            log.info("%s: unmounting", signal.Signals(signum).name)
            rc, err = await trio.to_thread.run_sync(_fusermount, mountpoint, False)
            if rc != 0:
                log.warning("unmount failed (%s); detaching lazily", err.strip())
                rc, err = await trio.to_thread.run_sync(_fusermount, mountpoint, True)
            if rc != 0:
                log.error("lazy unmount failed too (%s); terminating the session", err.strip())
                pyfuse3.terminate()
            return  # the session loop ends when the kernel drops the connection


async def _main(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_signals, mountpoint)
        print("READY", flush=True)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=1)
        finally:
            nursery.cancel_scope.cancel()


def record(image_path: str, mountpoint: str, log_path: str, *, fmt: str | None = None,
           direct_io: bool = True) -> None:
    image_path = os.path.abspath(image_path)
    mountpoint = os.path.abspath(mountpoint)
    fmt = fmt or vdisk.detect_format(image_path)
    with open(image_path, "rb") as f:
        base = f.read()
    storage = RecordingStorage(base, os.path.basename(image_path))
    driver = get_driver(fmt).open(storage, read_only=False)
    image = Image(driver, image_path, None)
    if driver.backing_ref is not None:
        image.close()
        raise SystemExit(f"{image_path}: images with a backing file are not supported here")
    size = image.size
    fs = RecordingFS(image, storage, direct_io=direct_io)
    try:
        pyfuse3.init(fs, mountpoint, mount_options(False))
        try:
            trio.run(_main, mountpoint)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        fs.close()  # closes the image: its final flush is part of the log
    out = {"format": fmt, "size": size, "base": base, "log": list(storage.log), "events": fs.events}
    tmp = log_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_path)
    log.info("%d log records, %d requests written to %s", len(storage.log), len(fs.events), log_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crash.mount_recorder")
    p.add_argument("--format", default=None, help="image format (default: probed)")
    p.add_argument("--no-direct-io", action="store_true")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("logfile")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pyfuse3").setLevel(logging.INFO)
    record(a.image, a.mountpoint, a.logfile, fmt=a.format, direct_io=not a.no_direct_io)
    return 0


if __name__ == "__main__":
    sys.exit(main())
