"""Mounting a FUSE file system without libfuse: get a /dev/fuse descriptor for a new
mount, clone more descriptors of its session, and detach it.

* As root, with the mount(2) system call (through ctypes): open /dev/fuse, then mount
  type ``fuse.SUBTYPE`` with ``fd=N,rootmode=40000,user_id=U,group_id=G`` and the
  file system options; the descriptor is the connection.
* Otherwise through ``fusermount3`` (setuid root), the way libfuse does it: it gets
  one end of a unix socket pair in ``_FUSE_COMMFD``, mounts, and sends the /dev/fuse
  descriptor back over the socket (SCM_RIGHTS).

The kernel sends FUSE_INIT as soon as the mount exists; nothing here reads it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import struct
import subprocess

from . import proto

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountFailed(OSError):
    pass


def _fs_options(read_only: bool, allow_other: bool, extra: list[str]) -> list[str]:
    opts = ["default_permissions"]
    if allow_other:
        opts.append("allow_other")
    opts += [o for o in extra if o not in ("ro", "rw", "default_permissions", "allow_other")]
    return opts


def mount(mountpoint: str, *, fsname: str, subtype: str, read_only: bool, allow_other: bool,
          extra: list[str] | None = None, via: str | None = None) -> int:
    """Mount a new FUSE file system on ``mountpoint``; return its /dev/fuse descriptor
    (close-on-exec).  ``via``: "syscall" or "fusermount" (default: the syscall as root,
    else fusermount3).  Raises MountFailed."""
    extra = list(extra or [])
    if via not in (None, "syscall", "fusermount"):
        raise ValueError(f"unknown mount method {via!r}")
    if via == "syscall" or (via is None and os.geteuid() == 0):
        return _mount_syscall(mountpoint, fsname=fsname, subtype=subtype, read_only=read_only,
                              allow_other=allow_other, extra=extra)
    return mount_fusermount(mountpoint, fsname=fsname, subtype=subtype, read_only=read_only,
                            allow_other=allow_other, extra=extra)


def _mount_syscall(mountpoint, *, fsname, subtype, read_only, allow_other, extra) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        st = os.stat(mountpoint)
        data = [f"fd={fd}", f"rootmode={st.st_mode & 0o170000:o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}"] + _fs_options(read_only, allow_other, extra)
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        for fstype in (f"fuse.{subtype}", "fuse"):
            rc = _libc.mount(fsname.encode(), os.fsencode(mountpoint), fstype.encode(), flags,
                             ",".join(data).encode())
            if rc == 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.ENODEV:  # ENODEV: a kernel without subtypes; try plain "fuse"
                break
        raise MountFailed(err, f"mount(2) of {mountpoint} failed: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise


def mount_fusermount(mountpoint, *, fsname, subtype, read_only, allow_other, extra) -> int:
    """Mount through fusermount3 and receive the descriptor it opened."""
    opts = [f"fsname={fsname}", f"subtype={subtype}"] + _fs_options(read_only, allow_other, extra)
    if read_only:
        opts.append("ro")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            p = subprocess.Popen(["fusermount3", "-o", ",".join(opts), "--", mountpoint], env=env,
                                 pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise MountFailed(exc.errno, f"cannot run fusermount3: {exc.strerror}") from None
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        _out, err = p.communicate(timeout=60)
        if p.returncode != 0 or not fds:
            for f in fds:
                os.close(f)
            raise MountFailed(errno.EIO, f"fusermount3 failed: {err.decode(errors='replace').strip()}")
        fd = fds[0]
        os.set_inheritable(fd, False)
        return fd
    finally:
        ours.close()
        theirs.close()


def clone_fd(session_fd: int) -> int:
    """A new /dev/fuse descriptor attached to the session of ``session_fd``
    (FUSE_DEV_IOC_CLONE): requests are handed out to whichever descriptor reads
    first, and each reply must go to the descriptor its request came from."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, proto.DEV_IOC_CLONE, struct.pack("=I", session_fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(mountpoint: str, *, lazy: bool = False) -> tuple[int, str]:
    """(0, "") on success, else (errno or exit status, message)."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) == 0:
            return 0, ""
        err = ctypes.get_errno()
        return err, os.strerror(err)
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return p.returncode, p.stderr.strip()
