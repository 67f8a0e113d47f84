"""Byte layouts of every format vdisk reads and writes, as pure encode/decode (no
I/O): one module per format, plus the helpers they share here."""

from __future__ import annotations

import array
import sys


def u32_table(buf, entries: int, byteorder: str) -> array.array:
    """The first ``entries`` unsigned 32-bit integers of ``buf`` (a block map, a BAT,
    a grain table), stored in ``byteorder`` ("little" or "big"), as native integers."""
    a = array.array("I")
    assert a.itemsize == 4
    a.frombytes(bytes(buf[:4 * entries]))
    if sys.byteorder != byteorder:
        a.byteswap()
    return a


def u32_bytes(entries, byteorder: str) -> bytes:
    """``entries`` (integers, or an ``array('I')``) as unsigned 32-bit integers in
    ``byteorder``: the inverse of :func:`u32_table`."""
    a = array.array("I", entries)
    if sys.byteorder != byteorder:
        a.byteswap()
    return a.tobytes()
