"""Finding zeros in buffers without a Python step per 4 KiB piece: what convert and
the sparse-keeping drivers (VHD, VDI, VHDX) use to leave holes where data is zero.
Pure functions on bytes-like objects, no I/O."""

from __future__ import annotations

#: the piece size zero runs are measured in (a page, and the smallest hole)
GRANULE = 4096
_ZBUF = bytes(4 << 20)
_ZVIEW = memoryview(_ZBUF)


def is_zero_at(data, a: int, n: int) -> bool:
    """True if ``data[a:a+n]`` (inside ``data``) is all zeros: compared in place
    (``startswith`` a view of a shared zero buffer, memcmp speed, no copy)."""
    step = len(_ZBUF)
    while n > step:
        if not data.startswith(_ZVIEW, a):
            return False
        a += step
        n -= step
    return data.startswith(_ZVIEW[:n], a)


def zero_runs(data, start: int, end: int, base: int, gran: int = GRANULE) -> list[tuple[int, int]]:
    """The maximal runs ``(a, b)`` (indices into ``data``) of ``data[start:end]`` made
    of whole pieces that are all zeros, a piece being a ``gran``-aligned range of
    addresses (``data[i]`` is at address ``base + i``) clipped to ``[start, end)``.

    Without a Python step per piece: the first byte of every piece is taken in one
    strided slice, and only pieces whose first byte is zero are looked at (random
    data: one in 256; text: none).  Where such pieces are many and not zero (data
    with zero bytes at every piece start), ``find`` of a zero needle skips the data
    between zero runs instead.  A run is measured by comparisons that double in
    length (then halve), so a run of k pieces costs O(log k) memcmp calls.  ``data``
    is ``bytes`` or ``bytearray``."""
    out: list[tuple[int, int]] = []
    if end <= start:
        return out

    def grow(e: int) -> int:  # ``e``: end of a zero piece; returns the end of its run
        step = gran
        while e < end:
            e2 = min(end, e + step)
            if is_zero_at(data, e, e2 - e):
                e = e2
                step *= 2
            elif step > gran:
                step //= 2
            else:
                break
        return e

    f = start + (-(base + start)) % gran  # the first piece start that is aligned
    i = start
    if f > start:  # a clipped first piece
        pe = min(f, end)
        if is_zero_at(data, start, pe - start):
            i = grow(pe)
            out.append((start, i))
        else:
            i = pe
    if i >= end:
        return out
    firsts = data[f:end:gran]  # firsts[j]: the first byte of the piece at f + j * gran
    j = -(-(i - f) // gran)
    misses = 0
    while misses < 16:
        j = firsts.find(0, j)
        if j < 0:
            return out
        p = f + j * gran
        pe = min(end, p + gran)
        if is_zero_at(data, p, pe - p):
            e = grow(pe)
            out.append((p, e))
            j = -(-(e - f) // gran)
            misses = 0
        else:
            j += 1
            misses += 1
    return _zero_runs_find(data, f + j * gran, end, base, gran, out, grow)


def _zero_runs_find(data, i: int, end: int, base: int, gran: int, out: list, grow) -> list[tuple[int, int]]:
    """:func:`zero_runs` from the aligned piece start ``i`` on, by ``find``."""
    needle = _ZVIEW[:min(gran, GRANULE)]
    nl = len(needle)
    while i < end:
        k = data.find(needle, i, end)
        if k < 0:
            r = (base + end) % gran  # a clipped last piece too short for the needle
            last = end - r
            if 0 < r < nl and last >= i and is_zero_at(data, last, r):
                out.append((last, end))
            break
        g = max(i, k - (base + k) % gran)  # the piece holding the zero run's start
        ge = min(end, g + gran - (base + g) % gran)
        if is_zero_at(data, g, ge - g):
            i = grow(ge)
            out.append((g, i))
        else:
            i = ge
    return out
