"""Storage backends of a pool: where its objects live.

A pool is a set of named, immutable objects (``formats/pool.md`` section 3), so all
it needs from a store is what both a local directory and an S3 bucket give:

``put(name, data)``
    Store a whole object, replacing nothing: names are never reused, except the
    lock and scratch objects of the local backend.  Not durable until ``barrier``.
``put_if_absent(name, data) -> bool``
    The commit point: store the object only if no object of that name exists,
    atomically, and durably (with every earlier ``put``) when it returns True;
    False if the name was taken (another writer committed first).
``get(name)``, ``get_range(name, offset, length)``
    Read a whole object, or ``length`` bytes of it from ``offset`` (fewer only at its
    end).  A missing object is :class:`ObjectMissing`.
``list(prefix)``
    The names under ``prefix``, sorted.
``delete(name)``
    Drop an object (missing is not an error).
``barrier()``
    Make every completed ``put`` durable.

Object names are ``/``-separated paths of ``[a-z0-9._-]`` parts, chosen by the pool
code only (never taken from a user or read from a file unchecked).

Errors are :class:`~vdisk.errors.HostIOError` (the store failed) or
:class:`ObjectMissing`; nothing else leaves a backend.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading

from ..errors import HostIOError, VdiskError

_NAME = re.compile(r"^[a-z0-9._-]+(/[a-z0-9._-]+)*$")


class ObjectMissing(VdiskError):
    """The object does not exist."""


def _check_name(name: str) -> None:
    if not _NAME.match(name) or ".." in name.split("/"):
        raise ValueError(f"bad object name {name!r}")


class Backend:
    """The interface; see the module docstring for each operation's contract."""

    url: str = "<backend>"

    def put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_if_absent(self, name: str, data: bytes) -> bool:
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        raise NotImplementedError

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self.get(name)[offset:offset + length]

    def list(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def size(self, name: str) -> int:
        return len(self.get(name))

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Objects as files under a directory: ``name`` is the file's relative path.

    ``put`` writes a temporary file and renames it into place (a reader never sees
    half an object); ``barrier`` fsyncs the files and directories written since the
    last barrier; ``put_if_absent`` links a fully written and fsynced temporary file
    to its name (``link`` fails if the name exists: atomic, and exclusive between
    processes), then fsyncs the directory.  Reads use one cached descriptor per
    object (objects never change once written)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root
        self._dirty_files: list[str] = []
        self._dirty_dirs: set[str] = set()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._tmp_seq = 0
        #: a failed fsync is final (Linux may drop the pages it could not write back and
        #: report success to the next fsync): after one, every change is refused
        self._sync_failed: int | None = None  # the errno of the failed fsync
        self._safe_dirs: set[str] = set()

    # -------------------------------------------------------------- helpers
    def _path(self, name: str) -> str:
        _check_name(name)
        d = name.rpartition("/")[0]
        if d and d not in self._safe_dirs:
            self._check_dir(d)
        return os.path.join(self.root, name)

    def _check_dir(self, d: str) -> None:
        """Refuse a directory of the pool that is a symbolic link: a pool's objects are
        files of its own tree.  Through ``index -> /etc`` a reader would take other
        files for objects, and gc, which deletes the objects it lists and no catalog
        names, would delete them.  (Object files are opened with O_NOFOLLOW.)"""
        p = self.root
        for part in d.split("/"):
            p = os.path.join(p, part)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                return  # not made yet: a put makes it
            except OSError as exc:
                raise HostIOError(f"{self.root}: {d} cannot be examined: {os.strerror(exc.errno or 0)}",
                                  exc.errno) from None
            if stat.S_ISLNK(st.st_mode):
                raise HostIOError(f"{self.root}: {os.path.relpath(p, self.root)} is a symbolic link (refused: "
                                  "a pool's objects are files in its own directory)", errno.ELOOP)
        self._safe_dirs.add(d)

    def _writable(self) -> None:
        if self._sync_failed is not None:
            raise HostIOError(f"{self.root}: an earlier sync failed ({os.strerror(self._sync_failed)}); "
                              "no change is made until the pool is reopened", self._sync_failed)

    def _err(self, name: str, what: str, exc: OSError) -> VdiskError:
        if exc.errno == errno.ENOENT:
            return ObjectMissing(f"{self.root}: object {name} is missing")
        if exc.errno == errno.ELOOP:
            return HostIOError(f"{self.root}: object {name} is a symbolic link (refused: a pool's objects are "
                               "files in its own directory)", exc.errno)
        return HostIOError(f"{self.root}: {what} {name} failed: {os.strerror(exc.errno or 0)}", exc.errno)

    def _write_tmp(self, path: str, data: bytes, *, sync: bool) -> str:
        d = os.path.dirname(path)
        with self._lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        tmp = os.path.join(d, f".tmp.{os.getpid()}.{threading.get_ident()}.{seq}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            os.makedirs(d, exist_ok=True)
            self._dirty_dirs.add(os.path.dirname(d))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp

    # -------------------------------------------------------------- interface
    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self._writable()
        try:
            tmp = self._write_tmp(path, data, sync=False)
            os.rename(tmp, path)
        except OSError as exc:
            raise self._err(name, "writing", exc) from None
        with self._lock:
            self._dirty_files.append(path)
            self._dirty_dirs.add(os.path.dirname(path))

    def put_if_absent(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        self.barrier()
        try:
            tmp = self._write_tmp(path, data, sync=True)
        except OSError as exc:
            self._sync_failed = exc.errno or errno.EIO
            raise self._err(name, "writing", exc) from None
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise self._err(name, "writing", exc) from None
        finally:
            _unlink_quietly(tmp)
        try:
            _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            self._sync_failed = exc.errno or errno.EIO
            raise self._err(name, "syncing the directory of", exc) from None
        return True

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self._path(name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise self._err(name, "opening", exc) from None
            with self._lock:
                if len(self._fds) >= 256:
                    for old in list(self._fds)[:64]:
                        os.close(self._fds.pop(old))
                self._fds[name] = fd
        return fd

    def get(self, name: str) -> bytes:
        try:
            with open(os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), "rb") as f:
                return f.read()
        except OSError as exc:
            raise self._err(name, "reading", exc) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd(name), length, offset)
        except OSError as exc:
            raise self._err(name, "reading", exc) from None

    def size(self, name: str) -> int:
        try:
            st = os.stat(self._path(name), follow_symlinks=False)
        except OSError as exc:
            raise self._err(name, "reading", exc) from None
        if stat.S_ISLNK(st.st_mode):
            raise self._err(name, "reading", OSError(errno.ELOOP, "symbolic link"))
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        out: list[str] = []
        top = prefix.rstrip("/")
        start = os.path.join(base, top) if top else base
        if "/" in prefix:
            self._check_dir(prefix.rpartition("/")[0])
        for dirpath, dirnames, filenames in os.walk(start):  # not into symbolic links
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, base)
            for f in filenames:
                if f.startswith("."):
                    continue
                out.append(f if rel == "." else f"{rel}/{f}")
        return sorted(n for n in out if n.startswith(prefix) and _NAME.match(n))

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._writable()
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._err(name, "deleting", exc) from None
        with self._lock:
            self._dirty_dirs.add(os.path.dirname(path))

    def barrier(self) -> None:
        self._writable()
        with self._lock:
            files, self._dirty_files = self._dirty_files, []
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        try:
            for path in files:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # deleted since (a scratch object)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for d in sorted(dirs):
                if os.path.isdir(d):
                    _fsync_dir(d)
        except OSError as exc:
            self._sync_failed = exc.errno or errno.EIO
            raise HostIOError(f"{self.root}: syncing objects failed: {os.strerror(exc.errno or 0)}",
                              exc.errno) from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class LocalLock:
    """An OFD lock on a file under the pool's ``locks/`` directory (local pools only):
    shared or exclusive, never waited for; the kernel drops it when the process dies."""

    _F_OFD_SETLK = 37

    def __init__(self, root: str, name: str, exclusive: bool):
        import fcntl
        import struct as _struct

        _check_name(name)
        d = os.path.join(root, "locks")
        os.makedirs(d, exist_ok=True)
        if os.path.islink(d):
            raise HostIOError(f"{root}: locks is a symbolic link (refused: a pool's lock files are its own)",
                              errno.ELOOP)
        self.path = os.path.join(d, name)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise HostIOError(f"{self.path}: cannot open the lock file: {os.strerror(exc.errno or 0)}",
                              exc.errno) from None
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        arg = _struct.pack("hhqqi4x", kind, 0, 0, 1, 0)
        try:
            fcntl.fcntl(self.fd, self._F_OFD_SETLK, arg)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockBusy(name) from None
            raise HostIOError(f"{self.path}: locking failed: {os.strerror(exc.errno or 0)}", exc.errno) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LockBusy(Exception):
    """Someone else holds lock ``name``; ``holder`` describes who, where the lock can
    tell (on an object store)."""

    def __init__(self, name: str, holder: str | None = None):
        super().__init__(holder or name)
        self.name, self.holder = name, holder


def lock(backend: Backend, name: str, exclusive: bool, *, what: str | None = None):
    """A shared or exclusive lock ``name`` of the pool: an OFD lock on a local pool
    (:class:`LocalLock`), an announced, renewed object on an object store
    (:class:`~.objlock.ObjectLock`: a holder paused past the ttl loses it without
    knowing, so nothing may rely on it alone for safety; ``pool gc`` fences writers
    in the catalog too).  Refused at once with :class:`LockBusy`."""
    if not isinstance(backend, LocalBackend):
        from .objlock import ObjectLock

        return ObjectLock(backend, name, exclusive, what=what)
    return LocalLock(backend.root, name, exclusive)
