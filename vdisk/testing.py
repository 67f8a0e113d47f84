"""A test suite every block driver must pass (like trio's ``_check_streams``).

``check_block_driver(factory, tmp_dir)`` runs a fixed list of behaviours against a
driver.  ``factory(path, size)`` must create an image at ``path`` of ``size`` bytes
and return a callable ``opener(read_only=False)`` that opens it as an ``Image``.
Each check raises AssertionError with a message naming the behaviour.
"""

from __future__ import annotations

import os
import random
from typing import Callable

from .drivers.base import Status
from .errors import OutOfBounds, ReadOnlyImage

Opener = Callable[..., "object"]
Factory = Callable[[str, int], Opener]

SIZE = 3 * 1024 * 1024 + 512  # not a multiple of any cluster size


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def check_block_driver(factory: Factory, tmp_dir: str) -> list[str]:
    """Run every check; returns the names of the checks that ran."""
    ran = []
    for name, fn in CHECKS:
        path = os.path.join(tmp_dir, f"{name}.img")
        opener = factory(path, SIZE)
        fn(opener)
        ran.append(name)
    return ran


def _new_reads_zero(open_):
    with open_() as img:
        assert img.size == SIZE, f"size {img.size} != {SIZE}"
        assert img.read(0, 4096) == bytes(4096), "a new image must read as zeros"
        assert img.read(SIZE - 100, 100) == bytes(100), "the tail of a new image must read as zeros"


def _write_read_unaligned(open_):
    data = _pattern(1, 200_001)
    with open_() as img:
        img.write(12345, data)
        assert img.read(12345, len(data)) == data, "unaligned write must read back"
        assert img.read(12344, 1) == b"\0" and img.read(12345 + len(data), 1) == b"\0", "neighbours untouched"
        img.flush()
    with open_() as img:
        assert img.read(12345, len(data)) == data, "flushed write must survive reopen"


def _write_at_tail(open_):
    with open_() as img:
        img.write(SIZE - 7, b"1234567")
        assert img.read(SIZE - 8, 8) == b"\x001234567"
    with open_() as img:
        assert img.read(SIZE - 8, 8) == b"\x001234567", "tail write must survive close"


def _bounds(open_):
    with open_() as img:
        for off, n in ((SIZE, 1), (SIZE - 1, 2), (-1, 1)):
            try:
                img.read(off, n)
            except OutOfBounds:
                pass
            else:
                raise AssertionError(f"read({off}, {n}) past the end must raise OutOfBounds")
        try:
            img.write(SIZE - 1, b"ab")
        except OutOfBounds:
            pass
        else:
            raise AssertionError("write past the end must raise OutOfBounds")
        assert img.read(SIZE, 0) == b"", "empty read at the end is allowed"


def _zeroes_and_discard(open_):
    data = _pattern(2, 1 << 20)
    with open_() as img:
        img.write(0, data)
        img.write_zeroes(1000, 300_000)
        assert img.read(0, 1000) == data[:1000]
        assert img.read(1000, 300_000) == bytes(300_000), "write_zeroes must read as zeros"
        assert img.read(301_000, 1000) == data[301_000:302_000]
        img.discard(400_000, 200_000)
        assert img.read(400_000, 200_000) == bytes(200_000), "discard must read as zeros"
        assert img.read(600_000, 1000) == data[600_000:601_000]


def _block_status(open_):
    with open_() as img:
        img.write(1 << 20, _pattern(3, 65536))
        ext = img.block_status(0, img.size)
        assert ext[0].offset == 0 and ext[-1].end == img.size, "extents must cover the range"
        for a, b in zip(ext, ext[1:]):
            assert a.end == b.offset, "extents must be contiguous"
        data_at = [e for e in ext if e.status == Status.DATA and e.offset <= (1 << 20) < e.end]
        assert data_at, "written range must be reported as DATA"


def _read_only(open_):
    with open_() as img:
        img.write(0, b"x")
    with open_(read_only=True) as img:
        assert img.read(0, 1) == b"x"
        try:
            img.write(0, b"y")
        except ReadOnlyImage:
            pass
        else:
            raise AssertionError("write to a read-only image must raise ReadOnlyImage")


def _resize(open_):
    with open_() as img:
        img.write(SIZE - 4096, b"z" * 4096)
        img.resize(SIZE + (1 << 20))
        assert img.size == SIZE + (1 << 20)
        assert img.read(SIZE - 4096, 4096) == b"z" * 4096
        assert img.read(SIZE, 1 << 20) == bytes(1 << 20), "grown space must read as zeros"
        img.resize(SIZE - 2048, shrink=True)
        img.resize(SIZE)
        assert img.read(SIZE - 4096, 4096) == b"z" * 2048 + bytes(2048), "shrunk-away bytes must not come back"
    with open_() as img:
        assert img.size == SIZE


def _many_small_writes(open_):
    rnd = random.Random(4)
    model = bytearray(SIZE)
    with open_() as img:
        for i in range(300):
            off = rnd.randrange(0, SIZE - 5000)
            d = rnd.randbytes(rnd.randrange(1, 5000))
            img.write(off, d)
            model[off:off + len(d)] = d
            if i % 50 == 0:
                img.flush()
        assert img.read(0, SIZE) == bytes(model)
    with open_() as img:
        assert img.read(0, SIZE) == bytes(model), "content must survive reopen"


CHECKS = [
    ("new_reads_zero", _new_reads_zero),
    ("write_read_unaligned", _write_read_unaligned),
    ("write_at_tail", _write_at_tail),
    ("bounds", _bounds),
    ("zeroes_and_discard", _zeroes_and_discard),
    ("block_status", _block_status),
    ("read_only", _read_only),
    ("resize", _resize),
    ("many_small_writes", _many_small_writes),
]
