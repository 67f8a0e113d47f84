"""A new image file under no name until it is complete: how ``convert`` writes its
output so that a crash or a failure never leaves a half-written file under the name
the user asked for, and never touches a file already there before the copy is done.

- :func:`open_unnamed` makes an unnamed file in the target's directory (O_TMPFILE);
  :func:`create_in` formats it, and :func:`link_into_place` gives it its name once
  the copy is complete (atomic: linked there, or linked as the partial name and
  renamed over an existing file).
- Where O_TMPFILE is not available, the output is a hidden partial file
  ``.NAME`` + :data:`PARTIAL_MARK` + PID, renamed into place; a killed convert leaves
  it behind and the next convert in that directory removes it
  (:func:`remove_stale_partials`) once its PID runs no more and nobody holds it.
"""

from __future__ import annotations

import os

from ..errors import UsageError, VdiskError
from .context import LOCAL, OpenContext


def refuse_if_in_use(path: str, ctx: OpenContext) -> None:
    """Fail if another process holds ``path`` open through vdisk (a VM, a mount).
    Opened as raw, so nothing in the file is parsed: only the lock is taken."""
    ctx.open(path, format="raw", read_only=True, backing=False).close()


#: what names a partial output: ``.NAME`` + PARTIAL_MARK + the PID of its convert
PARTIAL_MARK = ".vdisk-convert-"


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def remove_stale_partials(directory: str, ctx: OpenContext = LOCAL) -> list[str]:
    """Remove the partial outputs (``.NAME.vdisk-convert-PID``) in ``directory`` that
    a killed convert left: those whose PID runs no more and that no process holds
    open for writing.  Returns the paths removed.  Best effort: what cannot be
    checked or removed is left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    me = os.getpid()
    for name in names:
        head, mark, pid = name.rpartition(PARTIAL_MARK)
        if not mark or not head.startswith(".") or len(head) < 2 or not pid.isdigit():
            continue
        if int(pid) == me or pid_running(int(pid)):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            refuse_if_in_use(path, ctx)  # a writer holds it (another PID namespace?): keep it
            os.unlink(path)
        except (OSError, VdiskError):
            continue
        removed.append(path)
    return removed


def open_unnamed(directory: str) -> int | None:
    """A descriptor of a new unnamed file in ``directory`` (O_TMPFILE) that can be
    reopened and linked through ``/proc/self/fd``, or None where that is not
    possible (the caller then uses a named partial file)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return None
    try:
        fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError:
        return None  # EOPNOTSUPP, EISDIR (no O_TMPFILE), ...: the named fallback reports real errors
    if not os.path.exists(f"/proc/self/fd/{fd}"):
        os.close(fd)
        return None
    return fd


def create_in(path: str, size: int, fmt: str, cluster_size: int | None, compression: str | None,
               options: dict | None, backing=None) -> None:
    """``block.create`` into an existing, empty file (``path`` is ``/proc/self/fd/N``
    of an unnamed one; ``block.create`` insists on making the file itself)."""
    from ..drivers import get_driver
    from ..drivers.base import CreateOptions
    from ..host import HostFile

    if size < 0:
        raise UsageError("size must not be negative")
    cls = get_driver(fmt)
    host = HostFile(path)
    try:
        cls.create(host, size, CreateOptions(cluster_size=cluster_size, compression=compression,
                                             extra=dict(options or {}), backing=backing))
    finally:
        host.close()


def link_into_place(proc_path: str, partial: str, target: str) -> None:
    """Give the finished unnamed file the name ``target``: linked there directly if
    nothing is there (atomic), else linked as ``partial`` and renamed over it."""
    def link(dst: str) -> None:
        # linkat(AT_SYMLINK_FOLLOW) follows the /proc link to the inode.  os.link calls
        # plain link(2), which does not follow, unless it is given a directory fd.
        dfd = os.open(os.path.dirname(dst) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(proc_path, os.path.basename(dst), dst_dir_fd=dfd, follow_symlinks=True)
        finally:
            os.close(dfd)

    try:
        link(target)
        return
    except FileExistsError:
        pass
    link(partial)
    try:
        os.replace(partial, target)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise


def fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
