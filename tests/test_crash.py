"""Crash consistency of the vdk driver, by replaying the write log (RELIABILITY.md).

For each workload (configs in ``tests/crash/workload.py``, seeds below), every prefix of
the host operation log is a crash state, plus a bounded random sample of states where
the operations issued since the last completed flush landed partly, in any order, or
torn at 512-byte sectors (tests/crash/storage.py, ``CrashLog.random_state``).  Every state must open, ``check`` clean of corruption, and
equal the guest state at an operation boundary between the last acknowledged barrier
and the operation in flight.

Environment: ``VDISK_CRASH_SEEDS`` (seeds per config, default 2), ``VDISK_CRASH_RANDOM``
(random states per workload, default 100).  ``scripts/crash-run --states N`` runs longer.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

from crash import figures
from crash.storage import CrashLog
from crash.workload import CONFIGS, QCOW2_CONFIGS, run_workload, verify

SEEDS = int(os.environ.get("VDISK_CRASH_SEEDS", "2"))
RANDOM_STATES = int(os.environ.get("VDISK_CRASH_RANDOM", "100"))
SEED_BASE = int(os.environ.get("VDISK_CRASH_SEED_BASE", "1000"))
CONTINUE_EVERY = 10  # every n-th state is also reopened read-write, written, snapshotted and re-checked


def crash_check(cfg, seed: int, random_states: int) -> dict:
    run = run_workload(cfg, seed)
    log = CrashLog(run.base, run.log)
    stats = Counter()
    failures: list[str] = []
    k = 0

    def one(state):
        nonlocal k
        v = verify(run, state, continue_after=(k % CONTINUE_EVERY == 0))
        k += 1
        stats["states"] += 1
        stats[f"states_{state.mode}"] += 1
        stats["leaked_clusters"] += v.leaked_clusters
        stats["states_with_open_bug"] += bool(v.known_bug_hits)
        if v.ok:
            if v.matched == -2:
                stats["per_sector_mix"] += 1
            else:
                stats["at_last_barrier" if v.matched == v.last_barrier else "at_later_boundary"] += 1
        else:
            failures.append(v.message)

    for state in log.prefix_states():
        one(state)
    rng = random.Random(seed * 7919 + 1)
    for _ in range(random_states):
        one(log.random_state(rng))
    stats["log_records"] = len(run.log)
    stats["flushes"] = len(log.flush_at)
    stats["operations"] = len(run.boundaries)
    stats["failures"] = len(failures)
    return {"stats": dict(stats), "failures": failures}


@pytest.mark.parametrize("cfg", CONFIGS + QCOW2_CONFIGS, ids=[c.name for c in CONFIGS + QCOW2_CONFIGS])
def test_crash_states(cfg):
    total = Counter()
    failures = []
    for i in range(SEEDS):
        out = crash_check(cfg, SEED_BASE + i, RANDOM_STATES)
        total.update(out["stats"])
        failures += [f"seed {SEED_BASE + i}: {m}" for m in out["failures"]]
    figures.record("crash", config=cfg.name, format=cfg.format, seeds=SEEDS, seed_base=SEED_BASE, random_per_seed=RANDOM_STATES,
                   **dict(total))
    assert total["states"] > 100
    assert not failures, f"{len(failures)} of {total['states']} crash states fail:\n" + "\n".join(failures[:20])


# ----------------------------------------------------------------------------- the harness itself
def _without_flushes(log, which):
    out, n = [], 0
    for rec in log:
        if rec[0] == "f":
            n += 1
            if which(n):
                continue
        out.append(rec)
    return out


def _failures_with_log(run, log, n_random=150):
    run.log = log
    cl = CrashLog(run.base, log)
    bad = 0
    for st in cl.prefix_states():
        bad += not verify(run, st).ok
    rng = random.Random(3)
    for _ in range(n_random):
        bad += not verify(run, cl.random_state(rng, mode="subset")).ok
    return bad


def test_harness_catches_missing_barrier_before_header():
    """Sanity of the harness: a driver that skipped the fdatasync between its tables and
    its header (every odd flush of a commit) must be caught: the header can land
    before the tables it points to."""
    from crash.workload import Config

    cfg = Config("harness-1", nops=30)
    run = run_workload(cfg, 7)
    bad = _failures_with_log(run, _without_flushes(run.log, lambda n: n % 2 == 1))
    assert bad > 0, "the harness did not notice a missing flush before the header write"


def test_harness_catches_unflushed_acknowledgement():
    """Sanity of the harness: if the flush that acknowledges a commit were not issued
    (every even flush), an acknowledged barrier could be lost: the harness must see it."""
    from crash.workload import Config

    cfg = Config("harness-2", nops=30)
    run = run_workload(cfg, 8)
    bad = _failures_with_log(run, _without_flushes(run.log, lambda n: n % 2 == 0))
    assert bad > 0, "the harness did not notice a lost acknowledged flush"
