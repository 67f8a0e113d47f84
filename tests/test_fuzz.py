"""Fuzzing the vdk reader (and writer) with hypothesis: mutate valid images, then open,
read everything, block_status, list and read snapshots, check, and open read-write +
write + flush.  Only VdiskError may escape; the examples run in a worker process
(tests/hostile/fuzzworker.py) under a 600 MiB address-space limit, each within 2 s.  RELIABILITY.md, "Fuzzing".

Mutations: random byte flips anywhere; overwrites of named fields (header, L1 and L2
entries, snapshot records, refcounts) with the checksum chain re-signed so that the
mutation gets past the checksums; truncation.

``VDISK_FUZZ_EXAMPLES`` (default 1500; plus half as many pure byte-flip examples) sets the number of hypothesis examples.
A failure that matches an open bug of tests/test_found_bugs.py is counted apart
(and fails only with ``VDISK_FOUND_BUGS=1``).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crash import figures
from crash.storage import MemStorage
from vdisk.block import Image
from vdisk.codec import vdk as C
from vdisk.drivers.base import CreateOptions
from vdisk.drivers.vdk import VdkDriver

sys.path.insert(0, str(Path(__file__).parent / "hostile"))
import gen  # noqa: E402

EXAMPLES = int(os.environ.get("VDISK_FUZZ_EXAMPLES", "1500"))
TIME_LIMIT = 2.0  # seconds per example in the worker
AS_MIB = 600  # the worker's address-space limit
WORKER = Path(__file__).parent / "hostile" / "fuzzworker.py"
STRICT_BUGS = os.environ.get("VDISK_FOUND_BUGS") == "1"
from test_found_bugs import _OPEN as OPEN_BUGS  # noqa: E402 - the one list of open bugs


def _make(cluster: int, compression: str | None, size: int, seed: int) -> bytes:
    import random

    rng = random.Random(seed)
    s = MemStorage(name="fuzz.vdk")
    VdkDriver.create(s, size, CreateOptions(cluster_size=cluster, compression=compression))
    img = Image(VdkDriver.open(s, read_only=False), "fuzz.vdk", None)
    for k in range(6):
        n = rng.randint(1, 3 * cluster)
        off = rng.randrange(0, size - n)
        data = (rng.randbytes(7) * (n // 7 + 1))[:n] if compression else rng.randbytes(n)
        img.write(off, data)
        if k == 2:
            img.snapshot_create("snap1")
        if k == 4:
            img.write_zeroes(0, cluster)
    img.close()
    return s.snapshot()


BASES = [
    _make(4096, None, 1 << 20, 1),
    _make(4096, "zstd", 1 << 20, 2),
    _make(65536, None, 1 << 21, 3),
]

INTERESTING = st.one_of(
    st.sampled_from([0, 1, 2, 7, 8, 12, 16, 21, 22, 255, 256, 4095, 4096, 4097, 65535, 65536, 1 << 20, 2**31 - 1,
                     2**31, 2**32 - 1, 2**32, 1 << 40, 1 << 56, (1 << 56) + 4096, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**40), st.integers(1, 255)),
    st.tuples(st.just("header"), st.sampled_from(sorted(C.HEADER_FIELDS)), INTERESTING),
    st.tuples(st.just("l1"), st.integers(0, 7), st.booleans(), INTERESTING),
    st.tuples(st.just("l2"), st.integers(0, 40), st.integers(0, 4), INTERESTING),
    st.tuples(st.just("snap"), st.sampled_from(sorted(C.SNAPSHOT_FIELDS)), INTERESTING),
    st.tuples(st.just("refcount"), st.integers(0, 200), INTERESTING),
    st.tuples(st.just("truncate"), st.integers(0, 2**40)),
)


def mutate(data: bytes, muts) -> bytes:
    v = gen.VdkFile(data)
    for m in muts:
        kind = m[0]
        try:
            if kind == "flip":
                if v.b:
                    v.b[m[1] % len(v.b)] ^= m[2]
            elif kind == "header":
                v.hset(m[1], m[2])
            elif kind == "l1":
                l1 = v.l1()
                if l1:
                    i = m[1] % len(l1)
                    v.set_l1(i, l2_off=m[3] if m[2] else None, l2_sum=None if m[2] else m[3] % 2**64)
            elif kind == "l2":
                ents = v.l2_entries()
                if ents:
                    i, j, _pos, e = ents[m[1] % len(ents)]
                    fields = [C.make_desc(e.kind, e.host_offset), e.stored_length, e.codec, e.checksum, e.birth]
                    limits = [2**64, 2**32, 2**32, 2**64, 2**64]
                    fields[m[2]] = m[3] % limits[m[2]]
                    v.set_l2_raw(i, j, *fields)
            elif kind == "snap":
                if v.hget("snapshot_count"):
                    v.set_snap_field(m[1], m[2])
            elif kind == "refcount":
                rt = v.rt()
                if rt:
                    v.set_refcount(m[1] % (len(rt) * (gen.CS // 4)), m[2] % 2**32)
            elif kind == "truncate":
                del v.b[m[1] % (len(v.b) + 1):]
        except (IndexError, struct_error, ValueError, LookupError):
            pass  # the generator's own view of the image no longer parses: keep what we have
    return v.bytes()


struct_error = __import__("struct").error


class Worker:
    """The long-lived child (tests/hostile/fuzzworker.py) that runs the examples."""

    def __init__(self):
        self.p = None

    def start(self):
        self.p = subprocess.Popen([sys.executable, str(WORKER), f"--as-mib={AS_MIB}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)

    def run(self, data: bytes, fmt: str = "vdk") -> dict:
        if self.p is None or self.p.poll() is not None:
            self.start()
        self.p.stdin.write(len(data).to_bytes(8, "little") + fmt.encode().ljust(8, b"\0") + data)
        self.p.stdin.flush()
        if not self.sel.select(timeout=TIME_LIMIT * 10):  # wall clock on a shared machine
            self.stop()
            return {"result": "timeout", "error": f"no answer within {TIME_LIMIT * 10} s"}
        line = self.p.stdout.readline()
        if not line:
            self.stop()
            return {"result": "bug", "error": "the worker died", "known_bug": None}
        return json.loads(line)

    def stop(self):
        if self.p is not None:
            self.p.kill()
            self.p.wait()
            self.p = None


WORKER_PROC = Worker()
STATS = {"iterations": 0, "refused": 0, "accepted": 0, "known_bug_hits": 0, "failures": 0, "slow": 0}


def run_one(data: bytes, fmt: str = "vdk") -> None:
    STATS["iterations"] += 1
    r = WORKER_PROC.run(data, fmt)
    if r["result"] in ("accepted", "refused"):
        STATS[r["result"]] += 1
        if r.get("seconds", 0) > TIME_LIMIT:
            STATS["slow"] += 1
            STATS["failures"] += 1
            raise AssertionError(f"an example took {r['seconds']} s (limit {TIME_LIMIT} s)")
        return
    if r.get("known_bug") in OPEN_BUGS and not STRICT_BUGS:
        STATS["known_bug_hits"] += 1
        return
    STATS["failures"] += 1
    raise AssertionError(f"{r['result']}: {r['error']}")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("VDISK_FUZZ_RANDOM") != "1",
          suppress_health_check=list(HealthCheck), database=None)
@given(base=st.sampled_from(range(len(BASES))), muts=st.lists(mutation, min_size=1, max_size=4))
def _fuzz(base, muts):
    run_one(mutate(BASES[base], muts))


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=os.environ.get("VDISK_FUZZ_RANDOM") != "1",
          suppress_health_check=list(HealthCheck), database=None)
@given(base=st.sampled_from(range(len(BASES))), flips=st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 255)),
                                                                 min_size=1, max_size=16))
def _fuzz_flips(base, flips):
    data = bytearray(BASES[base])
    for pos, x in flips:
        data[pos % len(data)] ^= x
    run_one(bytes(data))


# ----------------------------------------------------------------------------- qcow2
def _make_qcow2(compression: str | None, seed: int) -> bytes:
    import random

    from vdisk.drivers import get_driver

    q = get_driver("qcow2")
    rng = random.Random(seed)
    s = MemStorage(name="fuzz.qcow2")
    q.create(s, 1 << 20, CreateOptions(cluster_size=4096, compression=compression))
    img = Image(q.open(s, read_only=False), "fuzz.qcow2", None)
    for k in range(6):
        n = rng.randint(1, 3 * 4096)
        off = rng.randrange(0, (1 << 20) - n)
        img.write(off, (rng.randbytes(7) * (n // 7 + 1))[:n] if compression else rng.randbytes(n))
        if k == 2:
            img.snapshot_create("snap1")
    img.close()
    return s.snapshot()


Q_BASES = [_make_qcow2(None, 11), _make_qcow2("zlib", 12)]

q_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**40), st.integers(1, 255)),
    st.tuples(st.just("header"), st.sampled_from(sorted(gen.Q_FIELDS)), INTERESTING),
    st.tuples(st.just("l1"), st.integers(0, 7), INTERESTING),
    st.tuples(st.just("l2"), st.integers(0, 40), INTERESTING),
    st.tuples(st.just("truncate"), st.integers(0, 2**40)),
)


def _q_sane(q) -> bool:
    """Whether the generator may walk the tables (after a header mutation it may not)."""
    return 9 <= q.get("cluster_bits") <= 21 and 0 < q.get("l1_size") < 4096 and \
        q.get("l1_table_offset") + 8 * q.get("l1_size") <= len(q.b)


def q_mutate(data: bytes, muts) -> bytes:
    q = gen.Q2File(data)
    for m in muts:
        if m[0] in ("l1", "l2") and not _q_sane(q):
            continue
        try:
            if m[0] == "flip":
                if q.b:
                    q.b[m[1] % len(q.b)] ^= m[2]
            elif m[0] == "header":
                q.set(m[1], m[2])
            elif m[0] == "l1":
                q.set_l1(m[1] % q.get("l1_size"), m[2] % 2**64)
            elif m[0] == "l2":
                ents = [e for e in q.l2_entries() if e[0] + 8 <= len(q.b)]
                if ents:
                    q.set_at(ents[m[1] % len(ents)][0], m[2])
            elif m[0] == "truncate":
                del q.b[m[1] % (len(q.b) + 1):]
        except (IndexError, ValueError, OverflowError):
            pass
    return bytes(q.b)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=os.environ.get("VDISK_FUZZ_RANDOM") != "1",
          suppress_health_check=list(HealthCheck), database=None)
@given(base=st.sampled_from(range(len(Q_BASES))), muts=st.lists(q_mutation, min_size=1, max_size=4))
def _fuzz_qcow2(base, muts):
    run_one(q_mutate(Q_BASES[base], muts), "qcow2")


def test_fuzz_qcow2():
    before = dict(STATS)
    try:
        _fuzz_qcow2()
    finally:
        WORKER_PROC.stop()
        figures.record("fuzz", format="qcow2", examples_setting=EXAMPLES // 2,
                       **{k: STATS[k] - before[k] for k in STATS})
    assert STATS["iterations"] - before["iterations"] > 0


def test_fuzz_vdk():
    before = dict(STATS)
    try:
        _fuzz()
        _fuzz_flips()
    finally:
        WORKER_PROC.stop()
        figures.record("fuzz", format="vdk", examples_setting=EXAMPLES,
                       **{k: STATS[k] - before[k] for k in STATS})
    assert STATS["iterations"] - before["iterations"] > 0
