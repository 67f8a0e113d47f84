"""Where images are: names, paths and the backing-file policy.

An image is a file, or an image in a pool (``POOL/IMAGE``, POOL a directory or an
``s3://`` URL, found by name through the pool driver).  This module answers, without
opening an image: does it exist, what format does a new one get, which host object
does it live in, are two names the same image, and -- the backing-file policy, checked
here for every command -- may an image's backing file (or a VMDK's extent file) be
followed: it must lie under an allowed directory (the opened image's own, plus
``VDISK_BACKING_DIRS``, colon-separated, plus what the caller adds), unless
``unsafe_backing``.  ``vdisk.block`` re-exports these names.
"""

from __future__ import annotations

import os
import posixpath
import stat

from .drivers import get_driver
from .drivers.base import BackingRef
from .errors import BackingError, ImageNotFound, UsageError
from .host import HostFile


def _pool_image(path) -> bool:
    from . import pool

    return pool.split(path) is not None


def exists(path: str) -> bool:
    """True if ``path`` names an image (a file, or an image in a pool)."""
    path = os.fspath(path)
    if os.path.lexists(path):
        return True
    if _pool_image(path):
        return get_driver("pool").exists_named(path)
    return False


def default_format(path: str) -> str:
    """The format a new image at ``path`` gets when none is asked for: pool for
    ``POOL/IMAGE``, else vdk."""
    return "pool" if _pool_image(path) else "vdk"


def check_create_format(path: str, format: str) -> None:
    """Refuse to make a file of ``format`` where ``path`` names an image in a pool: the
    pool's directory holds its own objects, and the file would hide the image's name."""
    if not getattr(get_driver(format), "opens_by_name", False) and _pool_image(path):
        raise UsageError(f"{path}: names an image in the pool {os.path.dirname(path) or '.'}, which holds "
                         f"images of the pool format only (not {format})")


def image_key(path: str) -> tuple | None:
    """What identifies the image ``path`` names (a file's device and inode, a pool
    image's pool and name), or None if there is no such image."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        pass
    if not os.path.lexists(path) and _pool_image(path):
        cls = get_driver("pool")
        return cls.identity(path) if cls.exists_named(path) else None
    return None


def same_image(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` name the same existing image (file or pool image)."""
    ka = image_key(a)
    return ka is not None and ka == image_key(b)


def host_stat(path: str) -> os.stat_result:
    """The host object whose owner and mode stand for the image's (an export shows
    them): its file, or for an image in a pool the pool's directory."""
    path = os.fspath(path)
    try:
        return os.stat(path)
    except FileNotFoundError:
        if not _pool_image(path):
            raise
    if _is_url(path):  # a pool on an object store: no host object; the mounting user's, 0600
        import time as _time

        now = int(_time.time())
        ns = now * 10**9
        return os.stat_result((0o100600, 0, 0, 1, os.getuid(), os.getgid(), 0, now, now, now),
                              {"st_atime": float(now), "st_mtime": float(now), "st_ctime": float(now),
                               "st_atime_ns": ns, "st_mtime_ns": ns, "st_ctime_ns": ns})
    return os.stat(os.path.dirname(path) or ".")


def images_in(directory: str, limit: int = 100000) -> list[str]:
    """Paths of the images next to each other in ``directory``, sorted: its regular
    files, or the images of the pool whose directory it is.  At most ``limit``."""
    from . import pool

    if pool.is_pool_dir(directory):
        return [os.path.join(directory, n) for n in sorted(get_driver("pool").list_named(directory))[:limit]]
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [p for p in (os.path.join(directory, n) for n in names[:limit]) if os.path.isfile(p)]


def remove(path: str) -> None:
    """Delete an image: unlink its file, or drop it from its pool.  Callers check its
    dependants first (``vdisk.ops.chain.remove``)."""
    path = os.fspath(path)
    if not os.path.lexists(path) and _pool_image(path):
        get_driver("pool").remove_named(path)
        return
    os.unlink(path)


def _is_url(path) -> bool:
    return isinstance(path, str) and path.startswith("s3://")


def abspath(path: str) -> str:
    """``os.path.abspath``, except that an ``s3://`` name (an image in a pool on an
    object store) is absolute as it is."""
    return path if _is_url(path) else os.path.abspath(path)


def normpath(path: str) -> str:
    """``os.path.normpath``, keeping an ``s3://`` name's scheme."""
    return "s3://" + posixpath.normpath(path[5:]).lstrip("/") if _is_url(path) else os.path.normpath(path)


def _realpath(path: str) -> str:
    return path.rstrip("/") if _is_url(path) else os.path.realpath(path)


def _allowed_dirs(top_path: str, extra: list[str] | None) -> list[str]:
    dirs = [os.path.dirname(_realpath(top_path))]
    env = os.environ.get("VDISK_BACKING_DIRS", "")
    dirs += [os.path.realpath(p) for p in env.split(":") if p]
    dirs += [os.path.realpath(p) for p in (extra or [])]
    return dirs


def _is_under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def split_image_spec(spec: str) -> tuple[str, str | None]:
    """``IMAGE@SNAP`` -> (IMAGE, SNAP); a path that exists as given names no snapshot.
    A snapshot is named by its name or as ``#ID``."""
    spec = os.fspath(spec)
    if "@" not in spec or os.path.lexists(spec):
        return spec, None
    path, _, snap = spec.rpartition("@")
    if not path or not snap:
        raise UsageError(f"{spec}: expected IMAGE@SNAPSHOT")
    return path, snap


def check_backing_allowed(overlay_path: str, backing_path: str, *, unsafe_backing: bool = False,
                          allow_backing_dirs: list[str] | None = None) -> None:
    """Refuse to make ``overlay_path`` name ``backing_path`` when :func:`open` would
    then refuse to follow it: vdisk never makes an image it then refuses to open."""
    if unsafe_backing:
        return
    allowed = _allowed_dirs(overlay_path, allow_backing_dirs)
    if not _is_under(_realpath(backing_path), allowed):
        raise BackingError(
            f"{overlay_path}: backing file {backing_path} lies outside the directories vdisk follows backing "
            f"files into ({', '.join(allowed)}), so the image could not be opened; add its directory to "
            "VDISK_BACKING_DIRS", option_hint=("unsafe_backing", "or pass --unsafe-backing"))


def resolve_backing_path(overlay_path: str, ref: BackingRef) -> str:
    """The host path a backing reference names: relative names are relative to the overlay."""
    if os.path.isabs(ref.filename) or _is_url(ref.filename):
        return ref.filename
    if _is_url(overlay_path):
        from .pool import url_join

        return url_join(overlay_path, ref.filename)
    return os.path.join(os.path.dirname(os.path.abspath(overlay_path)), ref.filename)


class _SiblingFiles:
    """Opens the other files a multi-file image names (VMDK extents) for its driver,
    under the backing-file policy: relative to the image, inside the allowed
    directories (``allowed`` None: anywhere, ``unsafe_backing``), each file once in
    the whole chain and never the image itself, with the image's lock mode."""

    def __init__(self, path: str, allowed: list[str] | None, seen: set, lock: str, sync: bool):
        self.path, self.allowed, self.seen, self.lock, self.sync = path, allowed, seen, lock, sync

    def open(self, name: str, *, read_only: bool) -> HostFile:
        fpath = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        if self.allowed is not None and not _is_under(os.path.realpath(fpath), self.allowed):
            raise BackingError(
                f"{self.path}: extent file {name!r} lies outside the allowed directories "
                f"({', '.join(self.allowed)}); allow it with VDISK_BACKING_DIRS",
                option_hint=("unsafe_backing", "or --unsafe-backing"))
        try:
            st = os.stat(fpath)
        except FileNotFoundError:
            raise ImageNotFound(f"{self.path}: extent file {fpath} does not exist") from None
        except OSError as exc:
            raise BackingError(f"{self.path}: extent file {fpath}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise BackingError(f"{self.path}: extent file {fpath} is not a regular file or block device")
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            raise BackingError(f"{self.path}: extent file {name!r} is named twice in the chain "
                               "(or is the image itself)")
        self.seen.add(key)
        return HostFile(fpath, read_only=read_only, lock=self.lock, sync=self.sync)
