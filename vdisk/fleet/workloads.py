"""Workloads: generators of the requests one VM sends to its disk.

A workload yields :data:`Request` tuples ``(op, offset, length, due)``: ``op`` one of
``R`` read, ``W`` write (fresh content from the VM), ``U`` write of an OS-upgrade
block (content shared by every VM running the same upgrade), ``F`` flush, ``D``
discard, ``Z`` write zeroes; ``offset`` and ``length`` are whole 4 KiB blocks (trace
requests are widened to the blocks they touch); ``due`` is when the request should
be sent, in seconds from the start of the phase, or None for "as soon as the
previous one is answered" (a closed loop at queue depth 1, as a guest's
synchronous I/O).  The runner enforces ``ops`` and the phase's duration; a
generator may be endless.

Randomness comes from ``random.Random`` seeded by the fleet's seed and the VM's
number, so a run is repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..errors import UsageError
from .model import BLOCK
from .spec import WORKLOAD_KINDS, BootSpec, WorkloadSpec
from .traces import Trace

Request = tuple[str, int, int, float | None]


def _due(i: int, rate: float) -> float | None:
    return i / rate if rate > 0 else None


def _aligned_span(disk_size: int, span: float, block: int) -> int:
    n = int(disk_size * span) // block
    return max(1, n)


def random_mix(w: WorkloadSpec, disk_size: int, rng: random.Random) -> Iterator[Request]:
    """Random ``block_size`` requests over the first ``span`` of the disk, reads with
    probability ``read_fraction`` (8 KiB, 70/30 by default); a flush after every
    ``flush_every`` writes (0: never)."""
    bs = w.block_size
    slots = _aligned_span(disk_size, w.span, bs)
    writes = 0
    i = 0
    while True:
        off = rng.randrange(slots) * bs
        if rng.random() < w.read_fraction:
            yield "R", off, bs, _due(i, w.rate)
        else:
            yield "W", off, bs, _due(i, w.rate)
            writes += 1
            if w.flush_every and writes % w.flush_every == 0:
                yield "F", 0, 0, None
        i += 1


def log_append(w: WorkloadSpec, disk_size: int, rng: random.Random) -> Iterator[Request]:
    """Sequential ``block_size`` appends through a log region of ``region_size`` at
    three quarters of the disk (wrapping around), fsync after every ``flush_every``
    appends, as a database's journal."""
    bs = w.block_size
    region = min(w.region_size, disk_size) // bs * bs
    if region < bs:
        raise UsageError(f"workload {w.name}: region_size is smaller than block_size")
    start = min(disk_size * 3 // 4 // bs * bs, disk_size - region)
    pos = rng.randrange(region // bs) * bs
    i = 0
    while True:
        yield "W", start + pos, bs, _due(i, w.rate)
        pos = (pos + bs) % region
        i += 1
        if w.flush_every and i % w.flush_every == 0:
            yield "F", 0, 0, None


def idle_bursts(w: WorkloadSpec, disk_size: int, rng: random.Random) -> Iterator[Request]:
    """Mostly idle: pauses of ``idle_seconds`` on average (exponentially distributed),
    each followed by a burst of ``burst_ops`` random ``block_size`` requests sent as
    fast as the disk answers, then a flush."""
    bs = w.block_size
    slots = _aligned_span(disk_size, w.span, bs)
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / w.idle_seconds) if w.idle_seconds > 0 else 0.0
        for k in range(w.burst_ops):
            op = "R" if rng.random() < w.read_fraction else "W"
            yield op, rng.randrange(slots) * bs, bs, t if k == 0 else None
        yield "F", 0, 0, None


def os_upgrade(w: WorkloadSpec, disk_size: int, fleet_seed: int) -> Iterator[Request]:
    """An OS upgrade: ``files`` files of up to ``file_size`` at scattered places, each
    read, then rewritten in ``block_size`` pieces and flushed (dpkg fsyncs every
    file).  Places and content depend on the fleet's seed and ``version`` only, so
    every VM upgrading to the same version writes the same blocks at the same places."""
    rng = random.Random((fleet_seed << 32) ^ w.version ^ 0x0DA7E)
    nblocks = _aligned_span(disk_size, w.span, BLOCK)
    max_blocks = max(1, w.file_size // BLOCK)
    step = max(1, w.block_size // BLOCK)
    i = 0
    for _ in range(w.files):
        n = rng.randint(1, max_blocks)
        first = rng.randrange(max(1, nblocks - n))
        n = min(n, nblocks - first)
        yield "R", first * BLOCK, n * BLOCK, _due(i, w.rate)
        i += 1
        for b in range(first, first + n, step):
            yield "U", b * BLOCK, min(step, first + n - b) * BLOCK, _due(i, w.rate)
            i += 1
        yield "F", 0, 0, None


def replay(tr: Trace, disk_size: int, *, timing: str, speed: float, loop: bool, what: str,
           fold: bool = False) -> Iterator[Request]:
    """The requests of a trace, widened to whole 4 KiB blocks, with their recorded
    arrival times divided by ``speed`` (``timing = "recorded"``) or back to back
    (``asap``); ``loop`` starts over at the end, later by the trace's length;
    ``fold`` maps offsets past the disk's end back into it (modulo its size), for a
    trace of a bigger disk than the simulated one."""
    check_fits(tr, disk_size, what, fold)
    base = 0.0
    span = (tr.duration_us / 1e6 + 1e-3) / speed
    while True:
        for t, op, off, n in tr.requests():
            due = base + t / 1e6 / speed if timing == "recorded" else None
            if op == "F":
                yield "F", 0, 0, due
                continue
            start = off - off % BLOCK
            end = -(-(off + n) // BLOCK) * BLOCK
            if fold and end > disk_size:
                n = min(end - start, disk_size)
                start = start % (disk_size - n + 1) // BLOCK * BLOCK
                end = start + n
            if end > start:
                yield op, start, end - start, due
        if not loop:
            return
        base += span


def check_fits(tr: Trace, disk_size: int, what: str, fold: bool = False) -> None:
    """Refuse a trace that reaches past the disk (unless folded) or holds nothing."""
    if tr.end > disk_size and not fold:
        raise UsageError(f"{what}: trace {tr.path} reaches byte {tr.end}, past the end of the "
                         f"{disk_size}-byte disk; make the disk at least that large, "
                         "or set fold = true")
    if not len(tr):
        raise UsageError(f"{what}: trace {tr.path} holds no requests")


def make(w: WorkloadSpec, disk_size: int, vm: int, fleet_seed: int, traces: dict[str, Trace]) -> Iterator[Request]:
    """The request generator of workload ``w`` for VM number ``vm``."""
    rng = random.Random((fleet_seed << 20) ^ (vm * 0x9E3779B1) ^ WORKLOAD_KINDS.index(w.kind))
    if w.kind == "random":
        return random_mix(w, disk_size, rng)
    if w.kind == "log":
        return log_append(w, disk_size, rng)
    if w.kind == "idle":
        return idle_bursts(w, disk_size, rng)
    if w.kind == "upgrade":
        return os_upgrade(w, disk_size, fleet_seed)
    if w.kind == "trace":
        return replay(traces[w.trace], disk_size, timing=w.timing, speed=w.speed, loop=w.loop,
                      what=f"workload {w.name}", fold=w.fold)
    raise UsageError(f"unknown workload kind {w.kind!r}")


def boot(b: BootSpec, tr: Trace, disk_size: int) -> Iterator[Request]:
    return replay(tr, disk_size, timing=b.timing, speed=b.speed, loop=False, what="boot")
