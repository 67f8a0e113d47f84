"""Latency and throughput accounting.

Each VM has one :class:`Recorder` per phase; only the VM's thread appends to it
(no lock).  A request's latency is the wall time of its call into the Image API,
from just before the call to its return, in microseconds; its time is when it
was sent, in seconds from the start of the phase.  Summaries and time series are
computed after the phase from the raw samples (8 bytes per number: a million
requests cost about 24 MB).
"""

from __future__ import annotations

import math
from array import array

DATA_OPS = "RWUZD"


class Recorder:
    def __init__(self) -> None:
        self.t = array("d")
        self.lat = array("d")
        self.nbytes = array("q")
        self.op = bytearray()
        self.elapsed = 0.0

    def add(self, t: float, lat_us: float, op: str, nbytes: int) -> None:
        self.t.append(t)
        self.lat.append(lat_us)
        self.nbytes.append(nbytes)
        self.op.append(ord(op))

    def __len__(self) -> int:
        return len(self.op)


def percentile(sorted_values, q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest-rank; 0.0 when empty."""
    n = len(sorted_values)
    if not n:
        return 0.0
    k = min(n - 1, max(0, math.ceil(q * n) - 1))
    return float(sorted_values[k])


def summarize(recs: list[Recorder], elapsed: float) -> dict:
    """Counts, IOPS, MB/s (10^6 bytes) and latency percentiles over ``recs`` for a
    phase that lasted ``elapsed`` seconds.  ``ops`` counts every request, flushes
    included; IOPS and the latency figures are over the data requests (reads and
    writes of all kinds), flushes have their own latency figures."""
    reads = writes = flushes = rbytes = wbytes = 0
    data_lat = array("d")
    read_lat = array("d")
    write_lat = array("d")
    flush_lat = array("d")
    for r in recs:
        for i, o in enumerate(r.op):
            c = chr(o)
            if c == "R":
                reads += 1
                rbytes += r.nbytes[i]
                data_lat.append(r.lat[i])
                read_lat.append(r.lat[i])
            elif c == "F":
                flushes += 1
                flush_lat.append(r.lat[i])
            else:
                writes += 1
                wbytes += r.nbytes[i]
                data_lat.append(r.lat[i])
                write_lat.append(r.lat[i])
    dl = sorted(data_lat)
    fl = sorted(flush_lat)
    el = elapsed if elapsed > 0 else 1e-9
    return {
        "elapsed_s": round(elapsed, 6),
        "ops": reads + writes + flushes,
        "reads": reads, "writes": writes, "flushes": flushes,
        "read_bytes": rbytes, "write_bytes": wbytes,
        "iops": round((reads + writes) / el, 1),
        "mb_per_s": round((rbytes + wbytes) / el / 1e6, 3),
        "latency_us": {"p50": round(percentile(dl, 0.50), 1), "p99": round(percentile(dl, 0.99), 1),
                       "p99_9": round(percentile(dl, 0.999), 1),
                       "mean": round(sum(dl) / len(dl), 1) if dl else 0.0},
        "read_latency_us": _pcts(sorted(read_lat)),
        "write_latency_us": _pcts(sorted(write_lat)),
        "flush_latency_us": _pcts(fl),
    }


def _pcts(xs) -> dict:
    return {"p50": round(percentile(xs, 0.50), 1), "p99": round(percentile(xs, 0.99), 1)}


def series(recs: list[Recorder], elapsed: float, points: int = 60) -> list[dict]:
    """Fleet throughput and p99 over time: the phase cut into about ``points`` bins
    (at least 0.1 s each); each bin's IOPS, MB/s and p99 latency of the data requests
    sent in it."""
    if elapsed <= 0:
        return []
    width = max(0.1, elapsed / points)
    nbins = max(1, math.ceil(elapsed / width))
    ops = [0] * nbins
    byt = [0] * nbins
    lats: list[list[float]] = [[] for _ in range(nbins)]
    for r in recs:
        for i, o in enumerate(r.op):
            if chr(o) == "F":
                continue
            b = min(nbins - 1, int(r.t[i] / width))
            ops[b] += 1
            byt[b] += r.nbytes[i]
            lats[b].append(r.lat[i])
    out = []
    for b in range(nbins):
        w = min(width, elapsed - b * width) or width
        lats[b].sort()
        out.append({"t": round(b * width, 3), "iops": round(ops[b] / w, 1), "mb_per_s": round(byt[b] / w / 1e6, 3),
                    "p99_us": round(percentile(lats[b], 0.99), 1)})
    return out
