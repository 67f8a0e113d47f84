"""Helpers for tests that use real FUSE mounts (tests/test_fuse*.py), like trio.testing: everything a test sets up is torn down in
reverse order even when the test fails (ext4 mounts, loop devices, FUSE mounts,
daemons), each external command bounded in time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

CMD_TIMEOUT = 60


def need_loop():
    """Fail (never skip, as tests/conftest.py does for FUSE) without loop devices and mkfs.ext4."""
    import pytest

    if not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.fail("loop devices (/dev/loop-control, losetup) and mkfs.ext4 are needed: run scripts/setup.sh",
                    pytrace=False)


def run(*cmd, check=True, timeout=CMD_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p


def _mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Rig:
    """Tracks what a test set up; ``cleanup`` undoes it whatever state it is in."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.fs_mounts: list[str] = []  # ext4 mounts
        self.loops: list[str] = []
        self.fuse_mounts: list[str] = []
        self.pids: list[int] = []

    # -------------------------------------------------------------- FUSE
    def mount(self, image: str, mnt: str, *, read_only: bool = False, fmt: str | None = None, **kw) -> int:
        from vdisk.export.fuse.daemon import spawn

        os.makedirs(mnt, exist_ok=True)
        self.fuse_mounts.append(mnt)
        pid, _log = spawn(image, mnt, read_only=read_only, fmt=fmt, timeout=60, **kw)
        self.pids.append(pid)
        return pid

    def umount(self, mnt: str) -> None:
        from vdisk.export.fuse.daemon import unmount

        unmount(mnt, timeout=60)
        if mnt in self.fuse_mounts:
            self.fuse_mounts.remove(mnt)

    # -------------------------------------------------------------- loop + ext4
    def attach(self, path: str, *, read_only: bool = False) -> str:
        args = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [path]
        dev = run(*args).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        run("losetup", "-d", dev)
        self.loops.remove(dev)
        # losetup -d is asynchronous: wait until the device lets go of the file
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not run("losetup", dev, check=False).stdout.strip():
                return
            time.sleep(0.05)

    def mount_fs(self, dev: str, where: str, *opts: str) -> None:
        os.makedirs(where, exist_ok=True)
        args = ["mount"] + (["-o", ",".join(opts)] if opts else []) + [dev, where]
        run(*args)
        self.fs_mounts.append(where)

    def umount_fs(self, where: str) -> None:
        run("umount", where)
        self.fs_mounts.remove(where)

    # -------------------------------------------------------------- teardown
    def cleanup(self) -> None:
        for where in reversed(self.fs_mounts):
            run("umount", where, check=False)
            if _mounted(where):
                run("umount", "-l", where, check=False)
        for dev in reversed(self.loops):
            run("losetup", "-d", dev, check=False)
        for mnt in reversed(self.fuse_mounts):
            if _mounted(mnt):
                if run("fusermount3", "-u", mnt, check=False).returncode != 0:
                    run("fusermount3", "-u", "-z", mnt, check=False)
        for pid in self.pids:
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _alive(pid: int) -> bool:
    from .daemon import process_gone

    return not process_gone(pid)


def wait_until(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
