"""The mountpoint's side of a mount: checking that a directory can take a new mount
(it exists, nothing is mounted there, no dead FUSE mount is left), finding what is
mounted where (``/proc/self/mountinfo``), and the FUSE mount options vdisk uses.
Errors are one-line :class:`MountError` messages naming the mountpoint.
"""

from __future__ import annotations

import errno
import os

import pyfuse3

from vdisk.errors import VdiskError


class MountError(VdiskError):
    """The mount could not be set up (mountpoint missing, busy, daemon died...)."""


def mount_options(read_only: bool, extra: list[str] | None = None) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add("fsname=vdisk")
    opts.add("subtype=vdisk")
    # The kernel sends at most max_pages (negotiated by libfuse from max_write: 1 MiB
    # with libfuse 3.14 and the default fuse.max_pages_limit) per request anyway;
    # max_read only caps reads lower than that, so leave it unlimited.
    if read_only:
        opts.add("ro")
    if os.geteuid() == 0:
        # Root: let other users (a VM runner, a loop device owner) use the mount; the
        # file modes (default_permissions) still apply.
        opts.add("allow_other")
    for o in extra or []:
        opts.add(o)
    return opts


def _dead_mount(mountpoint: str) -> MountError:
    return MountError(
        f"{mountpoint}: a dead FUSE mount is still there (its daemon died); "
        f"run `vdisk umount {mountpoint}` (or fusermount3 -u -z) first"
    )


def check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: mountpoint does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(mountpoint) from None
        raise MountError(f"{mountpoint}: {exc.strerror}") from None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    m = is_mounted(mountpoint)
    if m is not None:
        if m[0].startswith("fuse"):
            try:
                pid = os.getxattr(mountpoint, "user.vdisk.pid").decode()
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    raise _dead_mount(mountpoint) from None
            else:
                raise MountError(f"{mountpoint}: a vdisk mount is there already (daemon pid {pid})")
        raise MountError(f"{mountpoint}: something is mounted there already ({m[0]})")


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                mp = fields[4].encode().decode("unicode_escape")
                out.append((mp, rfields[0], rfields[1]))
    return out


def is_mounted(mountpoint: str) -> tuple[str, str] | None:
    real = os.path.realpath(mountpoint) if os.path.exists(mountpoint) else os.path.abspath(mountpoint)
    for mp, fstype, source in _mountinfo():
        if mp == real or mp == os.path.abspath(mountpoint):
            return fstype, source
    return None
