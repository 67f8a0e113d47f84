"""Shared pieces of the benchmark scripts: test data, timing, tables."""

from __future__ import annotations

import os
import random
import resource
import statistics
import subprocess
import sys
import time

VENV_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin")
VDISK = os.path.join(VENV_BIN, "vdisk") if os.path.exists(os.path.join(VENV_BIN, "vdisk")) else "vdisk"


def make_mixed_raw(path: str, size: int, seed: int = 1) -> None:
    """A raw image of mixed content in 1 MiB stripes: a third zeros (holes), a third
    compressible text, a third random bytes."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randrange(2, 11)))
             for _ in range(5000)]
    chunk = 1 << 20
    with open(path, "wb") as f:
        for i in range(size // chunk):
            kind = i % 3
            if kind == 0:
                f.seek(chunk, 1)
            elif kind == 1:
                text = b" ".join(rnd.choice(words) for _ in range(chunk // 5))
                f.write(text[:chunk].ljust(chunk, b" "))
            else:
                f.write(rnd.randbytes(chunk))
        f.truncate(size)


def timed(cmd: list[str]) -> float:
    """Wall time of ``cmd``.  Dirty pages left by the previous run are written back
    first (not timed), so that no run pays for another's writeback."""
    return timed_cpu(cmd)[0]


def timed_cpu(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+system) of ``cmd``, after writing back dirty pages."""
    os.sync()
    time.sleep(0.2)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def median(xs):
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPUs, load {load:.1f}, Python {sys.version.split()[0]}"
