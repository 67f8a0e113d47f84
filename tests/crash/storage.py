"""Host storages for crash and fault tests.

``MemStorage``        a HostStorage in a bytearray.
``RecordingStorage``  a MemStorage that logs every pwrite / truncate / punch_hole / flush,
                      like dm-log-writes: the log can be replayed to rebuild the file as a
                      power cut at any point could have left it.
``FaultyStorage``     wraps any HostStorage and makes the k-th pread / pwrite / flush /
                      truncate / punch_hole fail with EIO or ENOSPC, once or from then on.
                      A failed flush drops the writes it should have made durable.

The crash model (RELIABILITY.md, "The crash model"): everything before the last
*completed* flush is durable.  Of the operations issued after it and before the
power cut, any subset may have reached the medium, in any order, and each write may be
torn at 512-byte sector boundaries (some of its sectors written, others not); a sector
that reached the medium holds what the page cache held for it after some operation
(never a later write to it without an earlier one).  A punch_hole is treated like a
write of zeros (it may land or not, sector by sector); a truncate may land or not.

A failed flush (the fault model): Linux does not keep the dirty pages an fsync failed to
write back -- it marks them clean (or drops them) and reports the error once, so a
later fsync succeeds without them.  ``FaultyStorage`` models the worst case: on an
injected flush failure none of the un-flushed changes reached the medium and the page
cache forgets them too (``RecordingStorage.drop_dirty``: the file reads as the last
completed flush left it, and no later flush brings those changes back).
"""

from __future__ import annotations

import errno as _errno
import os
import random
from collections import Counter
from dataclasses import dataclass

from vdisk.errors import HostIOError
from vdisk.host import HostStorage

SECTOR = 512

# log records: ("w", offset, data) | ("t", size) | ("p", offset, length) | ("f",)
#              | ("r", content): page cache and medium reset to ``content`` (a failed flush)
Record = tuple


class MemStorage(HostStorage):
    def __init__(self, data: bytes = b"", name: str = "<mem>", read_only: bool = False):
        self.buf = bytearray(data)
        self.name = name
        self.read_only = read_only
        self.closed = False

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise HostIOError(f"{self.name}: bad pread({offset}, {length})", _errno.EINVAL)
        data = bytes(self.buf[offset:offset + length])
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data) -> None:
        data = bytes(data)
        if self.read_only:
            raise HostIOError(f"{self.name}: write to a read-only storage", _errno.EBADF)
        if offset < 0:
            raise HostIOError(f"{self.name}: bad pwrite offset {offset}", _errno.EINVAL)
        _apply_write(self.buf, offset, data)

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if self.read_only:
            raise HostIOError(f"{self.name}: truncate of a read-only storage", _errno.EBADF)
        _apply_truncate(self.buf, size)

    def punch_hole(self, offset: int, length: int) -> None:
        if self.read_only:
            raise HostIOError(f"{self.name}: punch of a read-only storage", _errno.EBADF)
        _apply_punch(self.buf, offset, length)

    def close(self) -> None:
        self.closed = True

    def snapshot(self) -> bytes:
        return bytes(self.buf)


def _apply_write(buf: bytearray, offset: int, data: bytes) -> None:
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


def _apply_truncate(buf: bytearray, size: int) -> None:
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


def _apply_punch(buf: bytearray, offset: int, length: int) -> None:
    end = min(offset + length, len(buf))  # FALLOC_FL_KEEP_SIZE
    if end > offset:
        buf[offset:end] = bytes(end - offset)


def apply(buf: bytearray, rec: Record) -> None:
    kind = rec[0]
    if kind == "w":
        _apply_write(buf, rec[1], rec[2])
    elif kind == "t":
        _apply_truncate(buf, rec[1])
    elif kind == "p":
        _apply_punch(buf, rec[1], rec[2])
    elif kind == "r":
        buf[:] = rec[1]


class RecordingStorage(MemStorage):
    """A MemStorage that logs every change and flush.  ``base`` is the content the log
    starts from (durable)."""

    def __init__(self, data: bytes = b"", name: str = "<rec>"):
        super().__init__(data, name)
        self.base = bytes(data)
        self.log: list[Record] = []

    def pwrite(self, offset: int, data) -> None:
        data = bytes(data)
        super().pwrite(offset, data)
        self.log.append(("w", offset, data))

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.log.append(("t", size))

    def punch_hole(self, offset: int, length: int) -> None:
        super().punch_hole(offset, length)
        self.log.append(("p", offset, length))

    def flush(self) -> None:
        self.log.append(("f",))

    def drop_dirty(self) -> None:
        """A flush failed: every change since the last completed flush is lost, from the
        page cache (reads return the durable content) and for every later flush."""
        cl = CrashLog(self.base, self.log)
        durable = cl.durable_state(cl.last_flush_before(len(self.log)))
        self.buf = bytearray(durable)
        self.log.append(("r", durable))

    def mark(self) -> int:
        """The log position now: records [0, mark) were issued before this point."""
        return len(self.log)

    def reopen(self) -> "RecordingStorage":
        """The same storage, reopened after a close (the driver closes its host)."""
        self.closed = False
        return self


# ----------------------------------------------------------------------------- crash states
@dataclass
class CrashState:
    point: int  # records [0, point) had been issued when the power went
    durable: int  # records [0, durable) were covered by a completed flush
    mode: str  # "prefix", "subset", "torn"
    data: bytes

    def describe(self) -> str:
        return f"crash at record {self.point} (durable up to {self.durable}, {self.mode})"


class CrashLog:
    """Rebuilds crash states from a log.  Prefix states are built incrementally;
    durable bases (the state at each completed flush) are cached."""

    def __init__(self, base: bytes, log: list[Record]):
        self.base = base
        self.log = log
        self.flush_at = [i for i, r in enumerate(log) if r[0] == "f"]
        self._durable_cache: dict[int, bytes] = {}

    def last_flush_before(self, point: int) -> int:
        """Number of records made durable by the last flush among records [0, point)."""
        d = 0
        for i in self.flush_at:
            if i < point:
                d = i + 1
            else:
                break
        return d

    def prefix_states(self, step: int = 1):
        """Every prefix of the log (every ``step``-th, always including the last)."""
        buf = bytearray(self.base)
        n = len(self.log)
        for p in range(n + 1):
            if p % step == 0 or p == n:
                yield CrashState(p, self.last_flush_before(p), "prefix", bytes(buf))
            if p < n:
                apply(buf, self.log[p])
                if self.log[p][0] == "f":
                    self._durable_cache.setdefault(p + 1, bytes(buf))

    def durable_state(self, durable: int) -> bytes:
        got = self._durable_cache.get(durable)
        if got is None:
            buf = bytearray(self.base)
            for rec in self.log[:durable]:
                apply(buf, rec)
            got = self._durable_cache[durable] = bytes(buf)
        return got

    def random_state(self, rng: random.Random, mode: str | None = None, point: int | None = None) -> CrashState:
        """A power cut at a random point: the durable prefix, then, of the records issued
        since the last completed flush, what a volatile write cache may have let through.

        The unit is the 512-byte sector, and each sector goes to the medium as the page
        cache held it at some moment: its content after some record that touched it
        (all earlier records included -- a sector never holds a later write without an
        earlier one to the same sector).  ``subset``: a random subset of the records
        lands whole, in any order (each sector then holds its content after the last
        landed record touching it).  ``torn``: every sector independently (writes torn
        at sector boundaries, any order)."""
        n = len(self.log)
        if point is None:
            point = rng.randint(0, n)
        durable = self.last_flush_before(point)
        epoch = [r for r in self.log[durable:point] if r[0] != "f"]
        mode = mode or rng.choice(("subset", "torn"))
        keep = rng.random()
        base = self.durable_state(durable)
        cur = bytearray(base)  # the page cache
        out = bytearray(base)  # the medium
        for rec in epoch:
            apply(cur, rec)
            if rec[0] == "r":  # a failed flush: what was un-flushed is gone, also from the medium
                out = bytearray(rec[1])
                continue
            if rec[0] == "t":
                if rng.random() < keep:
                    _apply_truncate(out, rec[1])
                continue
            landed = rng.random() < keep
            start, end = (rec[1], rec[1] + len(rec[2])) if rec[0] == "w" else (rec[1], rec[1] + rec[2])
            sec = start // SECTOR * SECTOR
            while sec < end:
                nxt = sec + SECTOR
                if (landed if mode == "subset" else rng.random() < keep):
                    hi = min(nxt, len(cur))
                    if hi > sec:
                        if hi > len(out):
                            out.extend(bytes(hi - len(out)))
                        out[sec:hi] = cur[sec:hi]
                sec = nxt
        return CrashState(point, durable, mode, bytes(out))


# ----------------------------------------------------------------------------- faults
class FaultyStorage(HostStorage):
    """Wraps ``inner``; the ``at``-th call (0-based) of operation ``op`` fails with ``err``
    -- only that call (``sticky=False``) or that call and every later one of that kind
    (``sticky=True``).  ``armed=False`` passes everything through (to count calls).

    A failed flush drops the un-flushed changes (``inner.drop_dirty()``, when ``inner``
    records them; ``drop_dirty=False`` keeps them, the model before this one)."""

    OPS = ("pread", "pwrite", "flush", "truncate", "punch_hole")

    def __init__(self, inner: HostStorage, op: str | None = None, at: int = -1, err: int = _errno.EIO,
                 sticky: bool = False, drop_dirty: bool = True):
        self.inner = inner
        self.name = inner.name
        self.read_only = inner.read_only
        self.op, self.at, self.err, self.sticky = op, at, err, sticky
        self.drop_dirty = drop_dirty
        self.armed = op is not None
        self.counts: Counter = Counter()
        self.injected = 0

    def _gate(self, op: str) -> None:
        n = self.counts[op]
        self.counts[op] += 1
        if self.armed and op == self.op and (n == self.at or (self.sticky and n > self.at)):
            self.injected += 1
            if op == "flush" and self.drop_dirty and hasattr(self.inner, "drop_dirty"):
                self.inner.drop_dirty()
            raise HostIOError(f"{self.name}: {op} failed: {os.strerror(self.err)} (injected)", self.err)

    def disarm(self) -> None:
        self.armed = False

    def pread(self, offset, length):
        self._gate("pread")
        return self.inner.pread(offset, length)

    def pwrite(self, offset, data):
        self._gate("pwrite")
        return self.inner.pwrite(offset, data)

    def flush(self):
        self._gate("flush")
        return self.inner.flush()

    def size(self):
        return self.inner.size()

    def truncate(self, size):
        self._gate("truncate")
        return self.inner.truncate(size)

    def punch_hole(self, offset, length):
        self._gate("punch_hole")
        return self.inner.punch_hole(offset, length)

    def allocated_bytes(self):
        return self.inner.allocated_bytes()

    def close(self):
        return self.inner.close()
