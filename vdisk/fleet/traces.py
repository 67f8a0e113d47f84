"""Request traces: reading vdisk's own (``vdisk mount --trace``, formats/trace.md) and
the MSR Cambridge block-trace CSV, and writing fio's iolog version 2.

A parsed trace is a :class:`Trace`: parallel arrays of arrival time (microseconds
from the first request), operation, offset and length, so that one trace shared by
a hundred VMs costs its size once.  Operations are the single letters of
formats/trace.md: ``R`` read, ``W`` write, ``F`` flush, ``D`` discard, ``Z`` write
zeroes.  Requests that failed when they were recorded (errno not 0) are skipped: a
replay repeats what the guest's disk did, not what it was refused.

Bad input is a :class:`~vdisk.errors.UsageError` naming the file and the line,
never a traceback; a trace is read line by line, and at most ``MAX_REQUESTS``
requests are kept.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..codec import trace as T
from ..errors import UsageError

OPS = "RWFDZ"
MAX_REQUESTS = 5_000_000  # 25 bytes each in memory: 125 MB at most
#: Windows FILETIME ticks (100 ns) per microsecond
_FILETIME_PER_US = 10
_MSR_TYPES = {"read": "R", "write": "W"}


@dataclass
class Trace:
    """A request trace: ``t`` (microseconds since the first request), ``op`` (one of
    OPS as its byte value), ``offset`` and ``length`` in bytes; ``size`` is the disk
    size the trace names (its header, or the end of its furthest request)."""

    path: str
    kind: str
    size: int = 0
    t: array = field(default_factory=lambda: array("q"))
    op: bytearray = field(default_factory=bytearray)
    offset: array = field(default_factory=lambda: array("q"))
    length: array = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.op)

    def append(self, t: int, op: str, offset: int, length: int) -> None:
        if len(self.op) >= MAX_REQUESTS:
            raise UsageError(f"{self.path}: more than {MAX_REQUESTS} requests; cut the trace down")
        self.t.append(t)
        self.op.append(ord(op))
        self.offset.append(offset)
        self.length.append(length)

    def requests(self) -> Iterator[tuple[int, str, int, int]]:
        """(t, op, offset, length) in arrival order."""
        for i in range(len(self.op)):
            yield self.t[i], chr(self.op[i]), self.offset[i], self.length[i]

    @property
    def end(self) -> int:
        """One past the furthest byte any request touches."""
        return max((o + n for o, n in zip(self.offset, self.length)), default=0)

    @property
    def duration_us(self) -> int:
        return self.t[-1] if len(self.t) else 0

    def counts(self) -> dict[str, int]:
        return {op: self.op.count(ord(op)) for op in OPS}


def _number(text: str, path: str, lineno: int, what: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{path}:{lineno}: {what} {text!r} is not an unsigned decimal number")
    return int(text)


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline); a torn last line (no newline) is
    skipped, as formats/trace.md asks of readers."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"trace {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"trace {path}: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text") from None
            yield lineno, text.rstrip("\n").rstrip("\r")


def read_vdisk_trace(path: str) -> Trace:
    """A trace written by ``vdisk mount --trace`` (formats/trace.md, version 1), parsed
    by the format's own codec (:mod:`vdisk.codec.trace`)."""
    tr = Trace(path, "vdisk")
    lines = _read_lines(path)
    first = next(lines, None)
    if first is None:
        raise UsageError(f"{path}: empty trace (no header line)")
    try:
        tr.size = T.parse_header(first[1]).size
        for lineno, text in lines:
            rec = T.parse_record(text, lineno)
            if rec is None or rec.errno != 0:
                continue
            if len(tr) >= MAX_REQUESTS:
                raise UsageError(f"more than {MAX_REQUESTS} requests; cut the trace down")
            tr.append(rec.t_us, rec.op, rec.offset, rec.length)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.message}") from None
    _arrival_order(tr)
    tr.size = max(tr.size, tr.end)
    return tr


def _arrival_order(tr: Trace) -> None:
    """Sort by arrival time (lines are written in reply order), stably, and make
    times relative to the first request."""
    t = tr.t
    if any(t[i] > t[i + 1] for i in range(len(t) - 1)):
        order = sorted(range(len(t)), key=t.__getitem__)
        tr.t = array("q", (t[i] for i in order))
        tr.op = bytearray(tr.op[i] for i in order)
        tr.offset = array("q", (tr.offset[i] for i in order))
        tr.length = array("q", (tr.length[i] for i in order))
    if len(tr.t):
        t0 = tr.t[0]
        tr.t = array("q", (x - t0 for x in tr.t))


def read_msr_csv(path: str, disk: int | None = None) -> Trace:
    """An MSR Cambridge block trace (SNIA IOTTA): CSV lines
    ``Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`` with the
    timestamp in Windows FILETIME units (100 ns) and Type ``Read`` or ``Write``.
    ``disk`` keeps the requests of that DiskNumber only (a file may mix disks)."""
    tr = Trace(path, "msr")
    t0 = None
    last = 0
    for lineno, text in _read_lines(path):
        if not text.strip() or text.startswith("#"):
            continue
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 7:
            raise UsageError(f"{path}:{lineno}: expected 7 comma-separated fields "
                             f"(Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime), found {len(parts)}")
        if lineno == 1 and parts[0].lower() == "timestamp":
            continue  # a header line
        ts = _number(parts[0], path, lineno, "Timestamp")
        dn = _number(parts[2], path, lineno, "DiskNumber")
        op = _MSR_TYPES.get(parts[3].lower())
        if op is None:
            raise UsageError(f"{path}:{lineno}: Type {parts[3]!r} is neither Read nor Write")
        off = _number(parts[4], path, lineno, "Offset")
        n = _number(parts[5], path, lineno, "Size")
        _number(parts[6], path, lineno, "ResponseTime")
        if disk is not None and dn != disk:
            continue
        if t0 is None:
            t0 = ts
        t_us = max(0, ts - t0) // _FILETIME_PER_US
        last = max(last, t_us)  # MSR files are in time order; keep a replay monotonic anyway
        tr.append(last, op, off, n)
    tr.size = tr.end
    return tr


def detect_kind(path: str) -> str:
    """``vdisk`` if the file starts with a vdisk trace header, ``msr`` for CSV."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise UsageError(f"trace {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"trace {path}: {exc.strerror}") from None
    if head.startswith(b"# vdisk-trace"):
        return "vdisk"
    if path.lower().endswith(".csv") or b"," in head.split(b"\n", 1)[0]:
        return "msr"
    raise UsageError(f"trace {path}: neither a vdisk trace ('# vdisk-trace' header) nor an MSR CSV file; "
                     "name its format with format = \"vdisk\" or \"msr\"")


def read_trace(path: str, kind: str = "auto", disk: int | None = None) -> Trace:
    """Read a trace of ``kind`` vdisk, msr or auto (by its first bytes)."""
    if kind == "auto":
        kind = detect_kind(path)
    if kind == "vdisk":
        return read_vdisk_trace(path)
    if kind == "msr":
        return read_msr_csv(path, disk)
    raise UsageError(f"trace format {kind!r}: expected vdisk, msr or auto")


def write_fio_iolog(tr: Trace, out_path: str, device: str, *, align: int = 4096, size: int | None = None,
                    timed: bool = False) -> int:
    """Write ``tr`` as a fio iolog (version 2) on ``device``, for ``fio --read_iolog``.
    Requests are aligned to ``align`` as the simulator aligns them (so that direct I/O
    accepts them) and clipped to ``size``; zero-writes become writes and discards are
    left out (fio 3.33's replay does not take trims); with ``timed``, the gaps between
    requests become ``wait`` lines.  Returns the number of requests written."""
    n_out = 0
    prev_t = 0
    with open(out_path, "w") as f:
        f.write("fio version 2 iolog\n")
        f.write(f"{device} add\n{device} open\n")
        for t, op, off, n in tr.requests():
            if timed and t > prev_t:
                f.write(f"{device} wait {t - prev_t} 0\n")
            prev_t = t
            if op == "F":
                f.write(f"{device} sync 0 0\n")
                n_out += 1
                continue
            if op == "D":
                continue
            start = off - off % align
            end = -(-(off + n) // align) * align
            if size is not None:
                end = min(end, size)
            if end <= start:
                continue
            action = "read" if op == "R" else "write"
            f.write(f"{device} {action} {start} {end - start}\n")
            n_out += 1
        f.write(f"{device} close\n")
    os.chmod(out_path, 0o644)
    return n_out
