"""Bugs found by the reliability work, each as a failing test with its exact reproduction.

These tests FAIL until the bug is fixed in vdisk/ (they are not xfail-ed, so that
nobody mistakes a hidden bug for a passing suite).  They are kept out of the default
run: ``scripts/test`` runs them only when asked (``VDISK_FOUND_BUGS=1``); the
engineer who fixes a bug turns its test on by removing it from ``_OPEN``.
See RELIABILITY.md, "Bugs found".
"""

from __future__ import annotations

import errno
import os

import pytest

from crash.storage import FaultyStorage, MemStorage
from vdisk.block import Image
from vdisk.drivers.base import CreateOptions
from vdisk.drivers.vdk import VdkDriver
from vdisk.errors import HostIOError

#: bugs still open: their tests are skipped unless VDISK_FOUND_BUGS=1
_OPEN: set[str] = set()


def bug(name: str):
    run = os.environ.get("VDISK_FOUND_BUGS") == "1" or name not in _OPEN
    return pytest.mark.skipif(not run, reason=f"open bug {name}: run with VDISK_FOUND_BUGS=1")


@bug("vdk-retry-after-failed-commit")
def test_vdk_flush_can_be_retried_after_a_transient_host_error():
    """BUG vdk-retry-after-failed-commit: when a commit fails (EIO/ENOSPC from a table
    pwrite or from either fdatasync), ``_commit`` has already decremented the refcounts
    of the old refcount table / refcount blocks / snapshot table and moved state
    (``rc_placed``, ``l2dirty``) without rolling back; the retried commit decrements
    them again and raises CorruptImage "refcount of cluster N would drop below zero"
    and marks the driver broken.  The image on disk is fine (reopening it is clean);
    only the session is lost, with a misleading "corrupt" message."""
    st = MemStorage(name="t.vdk")
    VdkDriver.create(st, 1 << 20, CreateOptions(cluster_size=4096))
    faulty = FaultyStorage(st, "flush", 0, errno.EIO)  # the first fdatasync fails, once
    img = Image(VdkDriver.open(faulty, read_only=False), "t.vdk", None)
    img.write(0, b"a" * 4096)
    with pytest.raises(HostIOError):
        img.flush()
    img.flush()  # today: CorruptImage: t.vdk: refcount of cluster 4 would drop below zero
    img.close()
    img = Image(VdkDriver.open(MemStorage(st.snapshot(), "t.vdk", read_only=True), read_only=True), "t.vdk", None)
    assert not img.check().corruptions
    assert img.read(0, 4096) == b"a" * 4096


@bug("vdk-retry-after-failed-commit")
def test_fault_campaign_with_retries():
    """The fault campaign of tests/test_faults.py with check 4 (retry after a transient
    fault) on: every transient failure of a commit must leave a session that can flush."""
    from test_faults import FAULT_CONFIGS, fault_campaign

    stats, problems = fault_campaign(FAULT_CONFIGS[0], 4242, 60, check_retry=True)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:10])
