"""Copy one image's guest content into another: the engine under ``vdisk convert``.

What is copied: the source's chain is asked which ranges hold data; ZERO and
UNALLOCATED ranges are neither read nor written, data ranges are read in chunks
aligned to both images' cluster sizes (widened to whole destination clusters), and
the parts of a chunk that turn out to be all zeros are left out.

How: the calling thread reads (a reader thread joins in once reads turn out to wait,
``READ_AHEAD_BELOW``), plans each chunk's writes and the destination driver's
``prepare_write``, and a writer thread writes them in order, ``WRITE_BEHIND`` chunks
behind.  Only the writer touches the destination's state; the first failed write
stops the copy.  Creating, placing and flushing the destination is
:mod:`vdisk.ops.convert`'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..block import Image
from ..errors import UsageError
from .compare import ProgressFn, chunk_size_for, chunks, data_runs, is_zero, zeros
from .worker import Worker


@dataclass
class ConvertStats:
    """What a copy did, in guest bytes."""

    size: int = 0
    bytes_read: int = 0  # read from the source
    bytes_written: int = 0  # written to the destination
    bytes_skipped: int = 0  # never read: the source chain reports them as zeros
    zero_bytes_dropped: int = 0  # read, found all-zero, not written


def _sparse_pieces(dst: Image, off: int, data: bytes, gran: int) -> tuple[list, int]:
    """What writing ``data`` at ``off`` into a destination that reads as zeros takes:
    ``([(offset, bytes, prepared), ...], zero bytes left out)``, leaving out every
    ``gran``-aligned piece that is all zeros, each write with what the destination's
    driver prepared for it (``Image.prepare_write``: vdk's checksums).  Pure work:
    ``copy_content`` runs it in its reading thread, beside the writer.  The zero
    pieces are found by ``vdisk.zeros.zero_runs`` (a strided look at the pieces'
    first bytes, then memcmp; no Python step per piece): a 4 KiB loop here was
    175 000 ``is_zero`` calls per GiB of a static VDI, and a ``find`` of a 4 KiB zero
    needle over every chunk cost 0.04-0.1 s per GiB."""
    n = len(data)
    if is_zero(data):
        return [], n
    if n <= gran:
        return [(off, data, dst.prepare_write(off, data))], 0
    from ..zeros import zero_runs

    out = []
    dropped = 0
    pos = 0  # relative to data: the start of what is not written yet
    for a, b in zero_runs(data, 0, n, off, gran):
        if a > pos:
            piece = data[pos:a]
            out.append((off + pos, piece, dst.prepare_write(off + pos, piece)))
        dropped += b - a
        pos = b
    if pos < n:
        piece = data[pos:] if pos else data
        out.append((off + pos, piece, dst.prepare_write(off + pos, piece)))
    return out, dropped


class _Planned(tuple):
    """A data piece whose destination writes ``_sparse_pieces`` planned already."""

    __slots__ = ()


def _widen(runs: list[tuple[int, int, bool]], gran: int, size: int) -> list[tuple[int, int, bool]]:
    """Round data runs out to ``gran`` boundaries and merge what then touches, so a
    destination cluster is written once, whole, instead of once per small data run
    inside it (the few zero bytes this reads cost less than a read-modify-write)."""
    data: list[tuple[int, int]] = []
    for s, e, has in runs:
        if not has:
            continue
        s, e = s - s % gran, min(size, -(-e // gran) * gran)
        if data and s <= data[-1][1]:
            data[-1] = (data[-1][0], max(e, data[-1][1]))
        else:
            data.append((s, e))
    out: list[tuple[int, int, bool]] = []
    pos = 0
    for s, e in data:
        if s > pos:
            out.append((pos, s, False))
        out.append((s, e, True))
        pos = e
    if pos < size:
        out.append((pos, size, False))
    return out


#: the widest a data run is widened to for a destination whose driver writes part of a
#: new block without reading anything back (``fresh_partial_writes``): widening to its
#: whole block (32 MiB for VHDX) would only read, check and drop the source's holes
WIDEN_MAX = 1 << 20


def widen_granularity(dst: Image, gran: int) -> int:
    """What :func:`_plan` widens data runs to for ``dst``."""
    if getattr(getattr(dst, "driver", None), "fresh_partial_writes", False):
        return min(gran, WIDEN_MAX)
    return gran


def _plan(src: Image, chunk: int, gran: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, has_data)`` pieces of the source: whole zero runs, and data
    runs (widened to ``gran``) split into chunks aligned to ``chunk``."""
    for s, e, has_data in _widen(data_runs(src, 0, src.size), gran, src.size):
        if not has_data:
            yield s, e - s, False
        else:
            for off, n in chunks(s, e, chunk):
                yield off, n, True


#: read-ahead pays only where reading waits (a device, a network) or is slow work the
#: reader thread can do beside the writer (decompression): reads that the page cache
#: serves at memory speed gain nothing from the overlap on a small machine and cost a
#: thread handoff per chunk and page faults in the reader's malloc arena (measured on
#: a 1 GiB convert: about 20% more CPU, no shorter wall time).  So the caller's thread
#: reads and times the data a window at a time, and the reader thread starts once two
#: windows in a row (two, so that one window where the process lost its CPU does not
#: count) either read slower than READ_AHEAD_BELOW bytes a second or spent less than
#: READ_AHEAD_CPU of their wall time on the CPU (waiting).  A rate alone is no test:
#: page-cache reads between page-cache writes ran at 0.6-3 GiB/s here.
READ_AHEAD_BELOW = 256 << 20
READ_AHEAD_CPU = 0.5
#: the data read per timed window
READ_AHEAD_WINDOW = 32 << 20


def _read_ahead(src: Image, plan: Iterator[tuple[int, int, bool]], depth: int) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield ``(offset, length, data)`` (data None for zero runs), reading in the
    caller's thread while reads are fast, and with a reader thread ``depth`` data
    chunks ahead once two windows in a row were slow or waited (``READ_AHEAD_BELOW``,
    see there), to the end."""
    import time

    plan = iter(plan)
    got, spent, cpu, slow = 0, 0.0, 0.0, 0
    clock, cpu_clock = time.perf_counter, time.thread_time
    for off, n, has_data in plan:
        if not has_data:
            yield off, n, None
            continue
        t, c = clock(), cpu_clock()
        data = src.read(off, n)
        spent += clock() - t
        cpu += cpu_clock() - c
        got += n
        yield off, n, data
        if got >= READ_AHEAD_WINDOW:
            slow = slow + 1 if got < spent * READ_AHEAD_BELOW or cpu < spent * READ_AHEAD_CPU else 0
            if slow >= 2:
                yield from _threaded_read_ahead(src, plan, depth)
                return
            got, spent, cpu = 0, 0.0, 0.0


def _threaded_read_ahead(src: Image, plan: Iterator[tuple[int, int, bool]],
                         depth: int) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield ``(offset, length, data)`` (data None for zero runs) while a reader thread
    fetches the next ``depth`` data chunks, so reading the source overlaps writing
    the destination.  Only that thread touches ``src``; only the caller touches the
    destination, so neither image is used from two threads at once."""
    with Worker("vdisk-convert-read") as pool:
        queue: deque = deque()
        try:
            for off, n, has_data in plan:
                queue.append((off, n, pool.submit(src.read, off, n) if has_data else None))
                while len(queue) > depth or (queue and queue[0][2] is None):
                    o, ln, fut = queue.popleft()
                    yield o, ln, fut.result() if fut is not None else None
            while queue:
                o, ln, fut = queue.popleft()
                yield o, ln, fut.result() if fut is not None else None
        finally:
            for _o, _n, fut in queue:
                if fut is not None:
                    fut.cancel()


#: destination chunks queued behind the reads by default: a writer thread writes them
#: while the caller's thread reads (and zero-checks) the next.  Both spend most of
#: their time in the kernel copying pages, outside the GIL, so the two overlap on two
#: CPUs as qemu-img's thread pool does: a 1 GiB raw -> qcow2 convert 0.37-0.46 s ->
#: 0.24-0.29 s wall without the final sync (BENCHMARKS "writes behind the reads").
WRITE_BEHIND = 2


def _write_behind(pieces, put, tick, throttle, depth: int) -> None:
    """Run ``put(off, n, data)`` for each piece in one writer thread, at most
    ``depth`` pieces behind this thread's reads, in order.  The first error stops
    it: nothing queued after the failed piece is written, and it is raised here.
    Only the writer thread writes the destination (and reads ``base``) meanwhile;
    the caller's thread calls only its ``prepare_write``, which drivers keep pure."""
    failed: list[bool] = []

    def put_unless_failed(off: int, n: int, data: bytes | None) -> None:
        if failed:  # a piece before failed (the writer runs them one by one, in order)
            return
        try:
            put(off, n, data)
        except BaseException:
            failed.append(True)
            raise

    with Worker("vdisk-convert-write") as pool:
        queue: deque = deque()
        try:
            for off, n, data in pieces:
                queue.append((n, pool.submit(put_unless_failed, off, n, data)))
                if throttle:
                    throttle.account(n)
                while len(queue) > depth or (queue and queue[0][1].done()):
                    m, fut = queue.popleft()
                    fut.result()
                    tick(m)
            while queue:
                m, fut = queue.popleft()
                fut.result()
                tick(m)
        finally:
            for _m, fut in queue:  # after an error or an interrupt: write nothing more
                fut.cancel()


def copy_content(
    src: Image,
    dst: Image,
    *,
    progress: ProgressFn | None = None,
    chunk_size: int | None = None,
    granularity: int | None = None,
    read_ahead: int = 2,
    write_behind: int = 0,
    target_is_zero: bool = True,
    sparse: bool = True,
    base: Image | None = None,
    rate_limit: int | None = None,
    writeback_every: int = 0,
) -> ConvertStats:
    """Copy ``src``'s guest content into ``dst``.  Does not flush ``dst``.

    ``dst`` must read as zeros over ``[0, src.size)`` (a freshly created image) unless
    ``target_is_zero`` is False: then the source's zero ranges are zeroed in ``dst``
    too (``convert -n`` into an existing image).  ``sparse`` False writes every byte,
    zeros included, so the destination ends fully allocated (``-S 0``).  ``base``: the
    destination is an overlay on it (``-B``); only what differs from ``base`` is
    written, and zero ranges where ``base`` holds data become explicit zeros.

    ``granularity`` is the size of the zero pieces left unwritten (default: the
    destination's cluster size, at least 4 KiB).  ``read_ahead`` chunks are read by a
    helper thread while the previous ones are written, once the source's reads
    turn out to wait (``READ_AHEAD_BELOW``; 0: never a thread).  ``write_behind``
    chunks are written by a writer thread while the next are read (0: the caller's
    thread writes; see ``WRITE_BEHIND``): only for a destination (and ``base``) that
    nothing else uses meanwhile and that shares no state with ``src``.  ``rate_limit``
    caps the rate in guest bytes per second.  ``writeback_every``: for a copy the
    caller will flush, ask ``dst`` to start writing back each time that many more
    bytes were written (``vdisk.ops.convert.WRITEBACK_EVERY``; 0: never).  ``progress(n)`` gets guest
    bytes done since the previous call; the total is ``src.size``."""
    if dst.size < src.size:
        raise UsageError(f"{dst.filename}: destination ({dst.size} bytes) is smaller than the source ({src.size} bytes)")
    stats = ConvertStats(size=src.size)
    chunk = chunk_size or chunk_size_for(src, dst)
    gran = granularity or max(dst.cluster_size or 0, 4096)
    tick = progress or (lambda n: None)
    plan = _plan(src, chunk, widen_granularity(dst, gran))
    if read_ahead > 0:
        pieces = _read_ahead(src, plan, read_ahead)
    else:
        pieces = ((off, n, src.read(off, n) if has else None) for off, n, has in plan)
    throttle = _Throttle(rate_limit) if rate_limit else None
    if base is None and sparse and target_is_zero:
        # the zero scan, the cuts and the driver's preparation run in this (reading)
        # thread, so that the writer thread only writes
        pieces = ((off, n, data if data is None else _Planned(_sparse_pieces(dst, off, data, gran)))
                  for off, n, data in pieces)

    sent_at = [0]  # stats.bytes_written at the last start_writeback

    def put(off: int, n: int, data) -> None:
        """The destination's side of one piece (the only code that changes ``stats``)."""
        if writeback_every:
            if stats.bytes_written - sent_at[0] >= writeback_every:
                dst.start_writeback()
                sent_at[0] = stats.bytes_written
        if data is None:
            stats.bytes_skipped += n
            _zero_range(dst, off, n, target_is_zero, sparse, base, chunk)
        else:
            stats.bytes_read += n
            if type(data) is _Planned:
                writes, dropped = data
                stats.zero_bytes_dropped += dropped
                for woff, piece, prepared in writes:
                    dst.write(woff, piece, prepared)
                    stats.bytes_written += len(piece)
            elif base is not None:
                _write_differences(dst, base, off, data, gran, stats)
            elif sparse:  # into a destination that may hold anything
                _dense_or_zero_write(dst, off, data, gran, stats)
            else:
                dst.write(off, data)
                stats.bytes_written += n

    if write_behind > 0:
        _write_behind(pieces, put, tick, throttle, write_behind)
        return stats
    for off, n, data in pieces:
        put(off, n, data)
        if throttle:
            throttle.account(n)
        tick(n)
    return stats


def _zero_range(dst: Image, off: int, n: int, target_is_zero: bool, sparse: bool, base: Image | None,
                chunk: int) -> None:
    """A range the source reads as zeros: what the destination needs there."""
    if base is not None:
        for pos, m in chunks(off, off + n, chunk):
            if pos < base.size and not is_zero(_read_zero_extended(base, pos, m)):
                dst.write_zeroes(pos, m)  # an explicit zero hides the base's data
        return
    if not sparse:
        for pos, m in chunks(off, off + n, chunk):
            dst.write(pos, zeros(m))
        return
    if not target_is_zero:
        dst.write_zeroes(off, n)


def _dense_or_zero_write(dst: Image, off: int, data: bytes, gran: int, stats: ConvertStats) -> None:
    """Into a destination that may hold anything: zero granules become write_zeroes."""
    for p in range(0, len(data), gran):
        piece = data[p:p + gran]
        if is_zero(piece):
            dst.write_zeroes(off + p, len(piece))
            stats.zero_bytes_dropped += len(piece)
        else:
            dst.write(off + p, piece)
            stats.bytes_written += len(piece)


def _write_differences(dst: Image, base: Image, off: int, data: bytes, gran: int, stats: ConvertStats) -> None:
    """Into an overlay on ``base``: only the granules where the source differs."""
    old = _read_zero_extended(base, off, len(data))
    if old == data:
        stats.zero_bytes_dropped += len(data)
        return
    for p in range(0, len(data), gran):
        piece = data[p:p + gran]
        if piece == old[p:p + gran]:
            continue
        if is_zero(piece):
            dst.write_zeroes(off + p, len(piece))
        else:
            dst.write(off + p, piece)
            stats.bytes_written += len(piece)


def _read_zero_extended(img: Image, off: int, n: int) -> bytes:
    if off >= img.size:
        return zeros(n)
    m = min(n, img.size - off)
    data = img.read(off, m)
    return data if m == n else data + zeros(n - m)


class _Throttle:
    """Sleeps so that at most ``rate`` bytes a second pass (``convert -r``)."""

    def __init__(self, rate: int):
        import time

        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def account(self, n: int) -> None:
        import time

        self.done += n
        ahead = self.done / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)
