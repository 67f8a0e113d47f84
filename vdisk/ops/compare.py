"""Compare the guest-visible content of two images, the way ``qemu-img compare`` does.

Ranges that read as zeros in both images (ZERO or UNALLOCATED after resolving the
backing chains) are never read.  A range that holds data on one side only is read
from that side and must be all zeros.  If the images differ in size, the part past
the end of the smaller one must read as zeros for them to count as identical
(``strict=True`` makes any size difference a mismatch).

Also holds the small byte helpers the other operations share: fast zero tests, the
first differing byte of two buffers, data runs from block status, aligned chunking.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from ..block import Image
from ..drivers.base import Status

#: Bytes read per request.  Large enough that per-call Python overhead is noise,
#: small enough to stay in cache-friendly, bounded memory.
DEFAULT_CHUNK = 4 << 20

ProgressFn = Callable[[int], None]

_ZEROS: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """A cached all-zero ``bytes`` of length ``n`` (for memcmp-speed zero tests)."""
    z = _ZEROS.get(n)
    if z is None:
        if len(_ZEROS) > 64:
            _ZEROS.clear()
        z = _ZEROS[n] = bytes(n)
    return z


def is_zero(data: bytes) -> bool:
    """True if every byte of ``data`` is zero.  Compares against a zero buffer (memcmp)."""
    return data == zeros(len(data))


def first_nonzero(data: bytes) -> int:
    """Index of the first non-zero byte of ``data``, or ``len(data)`` if there is none."""
    return len(data) - len(data.lstrip(b"\0"))


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where ``a`` and ``b`` differ, or the shorter length if
    one is a prefix of the other (equal buffers: their length)."""
    n = min(len(a), len(b))
    step = 65536
    for start in range(0, n, step):
        end = min(start + step, n)
        if a[start:end] != b[start:end]:
            x = int.from_bytes(a[start:end], "little") ^ int.from_bytes(b[start:end], "little")
            return start + ((x & -x).bit_length() - 1) // 8
    return n


def data_runs(img: Image, start: int, end: int) -> list[tuple[int, int, bool]]:
    """``[start, end)`` of ``img`` as ``(run_start, run_end, has_data)`` runs, resolved
    through the backing chain: ``has_data`` False means the run reads as zeros without
    reading it (ZERO or UNALLOCATED).  Adjacent runs of the same kind are merged."""
    runs: list[tuple[int, int, bool]] = []
    if end <= start:
        return runs
    for ext in img.block_status(start, end - start, chain=True):
        if ext.length <= 0:
            continue
        has = ext.status == Status.DATA
        if runs and runs[-1][2] == has and runs[-1][1] == ext.offset:
            runs[-1] = (runs[-1][0], ext.end, has)
        else:
            runs.append((ext.offset, ext.end, has))
    return runs


def overlay_runs(
    a: list[tuple[int, int, bool]], b: list[tuple[int, int, bool]]
) -> Iterator[tuple[int, int, bool, bool]]:
    """Walk two run lists covering the same range; yield ``(start, end, a_data, b_data)``
    for each piece where neither side changes kind."""
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if e > s:
            yield s, e, a[i][2], b[j][2]
        if a[i][1] == e:
            i += 1
        if j < len(b) and b[j][1] == e:
            j += 1


def chunk_size_for(*images: Image, base: int = DEFAULT_CHUNK) -> int:
    """A chunk size that is a multiple of every image's cluster size (and at least ``base``)."""
    size = base
    for img in images:
        cs = img.cluster_size or 1
        size = math.lcm(size, cs)
    return size


def chunks(start: int, end: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Split ``[start, end)`` at multiples of ``chunk``; yield ``(offset, length)``."""
    pos = start
    while pos < end:
        nxt = min(end, (pos // chunk + 1) * chunk)
        yield pos, nxt - pos
        pos = nxt


@dataclass
class CompareResult:
    """What ``compare`` found: identical or not, and where they first differ."""

    identical: bool
    #: first differing guest byte (exact), None if identical
    mismatch_offset: int | None = None
    size_a: int = 0
    size_b: int = 0
    bytes_read: int = 0

    @property
    def size_mismatch(self) -> bool:
        return self.size_a != self.size_b


def overlay_pieces(runs_a, runs_b, chunk: int) -> Iterator[tuple[int, int, bool, bool]]:
    """``(offset, length, read_a, read_b)`` pieces of two sides' data runs: a span
    where neither side has data is one piece, any other is cut into ``chunk``s."""
    for s, e, da, db in overlay_runs(runs_a, runs_b):
        if not da and not db:
            yield s, e - s, False, False
        else:
            for off, n in chunks(s, e, chunk):
                yield off, n, da, db


def _plan(a: Image, b: Image, chunk: int) -> Iterator[tuple[int, int, bool, bool]]:
    """``(offset, length, read_a, read_b)`` pieces covering ``max(a.size, b.size)``.
    A side not read reads as zeros there (no data, or past its end).  All block
    status is asked for before the first piece is yielded, so it never runs while a
    helper thread reads the same image."""
    common = min(a.size, b.size)
    runs_a, runs_b = data_runs(a, 0, common), data_runs(b, 0, common)
    bigger_is_a = a.size > b.size
    bigger = a if bigger_is_a else b
    tail = data_runs(bigger, common, bigger.size)
    yield from overlay_pieces(runs_a, runs_b, chunk)
    for s, e, has in tail:
        if not has:
            yield s, e - s, False, False
        else:
            for off, n in chunks(s, e, chunk):
                yield off, n, bigger_is_a, not bigger_is_a


def compare(
    a: Image,
    b: Image,
    *,
    strict: bool = False,
    progress: ProgressFn | None = None,
    chunk_size: int | None = None,
    read_ahead: int = 2,
) -> CompareResult:
    """Compare the guest content of ``a`` and ``b``; stop at the first difference.

    Each image is read by its own helper thread, ``read_ahead`` chunks ahead of the
    comparison (0: no threads); an image is never read from two threads at once.
    ``progress(n)`` is called with the number of guest bytes dealt with since the last
    call (the total is ``max(a.size, b.size)``)."""
    res = CompareResult(identical=True, size_a=a.size, size_b=b.size)
    if strict and a.size != b.size:
        res.identical = False
        res.mismatch_offset = min(a.size, b.size)
        return res
    chunk = chunk_size or chunk_size_for(a, b)
    tick = progress or (lambda n: None)

    def check(off: int, n: int, x: bytes | None, y: bytes | None) -> int | None:
        if x is not None and y is not None:
            res.bytes_read += 2 * n
            return None if x == y else off + first_difference(x, y)
        if x is None and y is None:
            return None
        data = x if x is not None else y
        res.bytes_read += n
        return None if is_zero(data) else off + first_nonzero(data)

    plan = _plan(a, b, chunk)
    if read_ahead <= 0:
        for off, n, ra, rb in plan:
            bad = check(off, n, a.read(off, n) if ra else None, b.read(off, n) if rb else None)
            if bad is not None:
                res.identical, res.mismatch_offset = False, bad
                return res
            tick(n)
        return res

    from concurrent.futures import ThreadPoolExecutor  # here: its import costs every command ~10 ms

    with ThreadPoolExecutor(1, "vdisk-compare-a") as pool_a, ThreadPoolExecutor(1, "vdisk-compare-b") as pool_b:
        queue: deque = deque()

        def settle(limit: int) -> int | None:
            while len(queue) > limit:
                off, n, fa, fb = queue.popleft()
                bad = check(off, n, fa.result() if fa else None, fb.result() if fb else None)
                if bad is not None:
                    return bad
                tick(n)
            return None

        try:
            for off, n, ra, rb in plan:
                queue.append((off, n, pool_a.submit(a.read, off, n) if ra else None,
                              pool_b.submit(b.read, off, n) if rb else None))
                bad = settle(read_ahead)
                if bad is not None:
                    break
            else:
                bad = settle(0)
        finally:
            for _o, _n, fa, fb in queue:
                for f in (fa, fb):
                    if f is not None:
                        f.cancel()
    if bad is not None:
        res.identical, res.mismatch_offset = False, bad
    return res
