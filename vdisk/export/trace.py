"""Recording an export's requests (``vdisk mount --trace FILE``; format in formats/trace.md).

:class:`TracedImage` stands in for the opened :class:`vdisk.Image` an export
serves: ``read``, ``write``, ``flush``, ``discard`` and ``write_zeroes`` are timed
and recorded, everything else goes to the image untouched.  The export never
knows; with no trace the export holds the image itself and pays nothing.

The latency recorded is the time the request spent in vdisk (from the call into
the image to its return), not the kernel's round trip.

Concurrency: records may come from several threads (the kernel engine's readers);
one lock guards the buffer.  A small thread writes the buffer out every second, so
a killed mount loses at most the last second; :meth:`TraceWriter.close` writes the
rest and is called when the image closes.  Writes to the trace are whole lines.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time

from ..codec.trace import Header, Record, header_line, record_line
from ..errors import HostIOError, UsageError, VdiskError

FLUSH_INTERVAL = 1.0


def open_trace_file(path: str) -> int:
    """Create (or truncate) the trace file; a symlink there is refused, never followed."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        what = "is a symbolic link" if exc.errno == errno_mod.ELOOP else exc.strerror
        raise UsageError(f"trace file {path}: {what}") from None


class TraceWriter:
    def __init__(self, fd: int, header: Header):
        self._fd = fd
        self._lock = threading.Lock()
        self._buf: list[str] = [header_line(header)]
        self._t0 = time.monotonic_ns() - (time.time_ns() - header.start_ns)
        self._closed = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._flusher, name="vdisk-trace", daemon=True)
        self._thread.start()

    def now_us(self, t_ns: int) -> int:
        return max(0, (t_ns - self._t0) // 1000)

    def record(self, t_ns: int, op: str, offset: int, length: int, lat_ns: int, err: int) -> None:
        line = record_line(Record(self.now_us(t_ns), op, offset, length, lat_ns // 1000, err))
        with self._lock:
            self._buf.append(line)

    def _write_out(self) -> None:
        with self._lock:
            lines, self._buf = self._buf, []
        if not lines or self.error is not None:
            return
        data = "".join(lines).encode()
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:
            # tracing must never take the disk down: stop tracing, say so once
            self.error = f"writing the trace failed ({exc.strerror}); tracing stopped"
            import logging

            logging.getLogger("vdisk.export.trace").error("%s", self.error)

    def _flusher(self) -> None:
        while not self._closed.wait(FLUSH_INTERVAL):
            self._write_out()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join()
        self._write_out()
        os.close(self._fd)


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, HostIOError) and getattr(exc, "errno", None):
        return exc.errno
    return errno_mod.EIO


class TracedImage:
    """An opened image whose data requests are recorded by a :class:`TraceWriter`."""

    def __init__(self, image, writer: TraceWriter):
        self._image = image
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._image, name)

    def _timed(self, op: str, offset: int, length: int, fn, *args):
        t = time.monotonic_ns()
        try:
            result = fn(*args)
        except (VdiskError, OSError) as exc:
            self._writer.record(t, op, offset, length, time.monotonic_ns() - t, _errno_of(exc))
            raise
        self._writer.record(t, op, offset, length, time.monotonic_ns() - t, 0)
        return result

    def read(self, offset: int, length: int) -> bytes:
        return self._timed("R", offset, length, self._image.read, offset, length)

    def write(self, offset: int, data) -> None:
        return self._timed("W", offset, len(data), self._image.write, offset, data)

    def flush(self) -> None:
        return self._timed("F", 0, 0, self._image.flush)

    def discard(self, offset: int, length: int) -> None:
        return self._timed("D", offset, length, self._image.discard, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        return self._timed("Z", offset, length, self._image.write_zeroes, offset, length)

    def close(self) -> None:
        try:
            self._image.close()
        finally:
            self._writer.close()


def traced(image, path: str, name: str) -> TracedImage:
    """``image`` recording into a new trace file at ``path`` (``name``: the image as the
    user named it, for the header)."""
    fd = open_trace_file(path)
    return TracedImage(image, TraceWriter(fd, Header(size=image.size, start_ns=time.time_ns(), image=name)))
