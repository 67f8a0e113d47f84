"""Unix socket addresses of any length.

A Unix socket's address holds at most 107 bytes of path (``sun_path`` is 108 bytes
with its NUL), and a run directory (``VDISK_RUN_DIR``, a deep ``$XDG_RUNTIME_DIR``,
a test's temporary directory) can be longer than that with a socket name under it.
``bind`` and ``connect`` here take such a path anyway: the socket's directory is
opened (``O_PATH``) and named through ``/proc/self/fd/N/``, which the kernel follows
to the same directory, so the socket file is made or found where the long path says.

Imports only the built-in ``posix`` and ``sys``: the command client uses it, which
imports nothing else (vdisk/cmdserver/client.py).
"""

import posix
import sys

#: the longest path a sockaddr_un holds
MAX_PATH = 107


def _encode(path) -> bytes:
    if isinstance(path, bytes):
        return path
    return path.encode(sys.getfilesystemencoding(), "surrogateescape")


def _at(fn, path):
    raw = _encode(path)
    if len(raw) <= MAX_PATH:
        return fn(raw)
    head, _, name = raw.rpartition(b"/")
    fd = posix.open(head or b".", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        short = b"/proc/self/fd/%d/%s" % (fd, name)
        if len(short) > MAX_PATH:  # the socket's own name is too long: nothing helps
            raise OSError(36, "File name too long", path)  # ENAMETOOLONG
        return fn(short)
    finally:
        posix.close(fd)


def bind(sock, path) -> None:
    """``sock.bind(path)``, also for a path longer than a socket address holds."""
    _at(sock.bind, path)


def connect(sock, path) -> None:
    """``sock.connect(path)``, also for a path longer than a socket address holds."""
    _at(sock.connect, path)
