"""Process memory tuning: for the commands that stream a disk's data, and for the
command server's forked workers.

A copy (convert, commit, rebase, flatten, a full clone, diff export and import)
reads and writes the data in chunks of 1-2 MiB, each a fresh ``bytes`` object.
glibc's malloc hands a block that size out of the heap and, when it is freed,
gives the heap's top back to the kernel (its trim threshold follows the largest
freed block), so the next chunk faults its pages in again: about 110 000 minor
page faults and 0.3-1.5 s of kernel time per GiB converted, measured with
``/usr/bin/time`` on ``vdisk convert`` of scripts/bench-convert's 1 GiB image
(qemu-img reuses its buffers: 4 700 faults).  Keeping freed memory in the process
up to a bound brings vdisk to about 5 200 faults.

:func:`keep_freed_buffers` raises glibc's thresholds with ``mallopt`` for the
current process only; a library user decides for their own process.  On another
C library it does nothing.

:func:`populate_private_writable` is for a process forked from a large parent (the
command server's idle worker, :mod:`vdisk.cmdserver.server`): every page it writes
first is copied from the parent then, one fault at a time, during its command.
Populating its writable private memory ahead (``madvise(MADV_POPULATE_WRITE)``,
Linux 5.14) takes those copies while the worker is still idle.
"""

from __future__ import annotations

_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_MADV_POPULATE_WRITE = 23  # from Linux's <asm-generic/mman-common.h>
_M_MMAP_THRESHOLD = -3

#: free memory the heap may keep at its top before it is returned to the kernel
TRIM_THRESHOLD = 64 << 20
#: blocks below this come from the heap (glibc's largest allowed value on 64-bit)
MMAP_THRESHOLD = 32 << 20

_done = False


def keep_freed_buffers() -> bool:
    """Let this process keep up to ``TRIM_THRESHOLD`` bytes of freed heap for its
    next chunks.  Returns whether glibc took the settings (False elsewhere)."""
    global _done
    if _done:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def populate_private_writable() -> int:
    """Fault in, writable, every private writable mapping of this process but its
    stack (copying the pages it still shares with its parent): the bytes populated,
    0 where the kernel or the C library cannot (the caller falls back)."""
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        with open("/proc/self/maps", "rb") as f:
            maps = f.read().splitlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    done = 0
    for line in maps:
        fields = line.split()
        perms, name = fields[1], fields[5] if len(fields) > 5 else b""
        if perms[1:2] != b"w" or perms[3:4] != b"p" or (name.startswith(b"[") and name != b"[heap]"):
            continue  # read-only, shared, or the stack, vvar, vdso: left alone
        start, end = (int(x, 16) for x in fields[0].split(b"-"))
        if madvise(start, end - start, _MADV_POPULATE_WRITE) == 0:
            done += end - start
        elif ctypes.get_errno() == 22 and not done:  # EINVAL at once: a kernel before 5.14
            return 0
    return done
