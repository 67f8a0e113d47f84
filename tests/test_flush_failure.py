"""Flush-failure policy (vdisk/host.py, module docstring): after a failed flush the
storage refuses every later write, punch, truncate and flush ("the image must be
reopened", naming the original error); reads still work.

Why: when fdatasync fails, Linux may drop the dirty pages it could not write back (or
mark them clean), so a retried flush can succeed without the data ever reaching the
disk.  The fault model (tests/crash/storage.py, ``FaultyStorage``) does just that: a
failed flush drops every change since the last completed flush.

For vdk and qcow2, every host flush of a workload fails in turn, once (a transient
error: a retried flush at the device would succeed -- the dangerous case).  The caller
keeps going as a careless one would (more writes, more flushes).  Then:

1. no host flush succeeds after the failed one (the fault layer counts them);
2. no acknowledged flush is lost: the file as the process left it and the file after a
   power cut both open, ``check`` finds no corruption, and every 512-byte sector holds
   its content at the last acknowledged flush or one written after it.

Two stacks: the drivers on ``FailStopStorage`` over the fault-injecting storage (all
flush points), and the drivers on a real ``HostFile`` (through ``vdisk.open``) whose
``fdatasync`` fails once and whose file is then reset to what the completed flushes made
durable, as Linux may leave it.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

import vdisk
from crash.storage import CrashLog, FaultyStorage, MemStorage, RecordingStorage
from crash.workload import Config, create_image, open_image
from vdisk.errors import HostIOError, VdiskError
from vdisk.host import FailStopStorage, HostFile

SECTOR = 512
SIZE = 512 << 10
CONFIGS = [Config("vdk-4k", size=SIZE), Config("qcow2-4k", format="qcow2", size=SIZE)]


def workload(seed: int, n: int = 36) -> list[tuple]:
    """Writes of distinct patterns (4 KiB aligned, 4-16 KiB long) with a flush every few."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    for i in range(n):
        if i % 4 == 3:
            ops.append(("flush",))
        else:
            length = rng.choice((4096, 8192, 16384))
            off = rng.randrange(0, SIZE - length, 4096)
            ops.append(("write", off, bytes([i % 250 + 1]) * length))
    ops.append(("flush",))
    return ops


class Tracker:
    """What the guest may find in each sector: its content at the last acknowledged flush,
    or anything written (successfully or not) after it."""

    def __init__(self):
        self.model = bytearray(SIZE)
        self.acked = bytes(SIZE)
        self.since: list[tuple[int, bytes]] = []
        self.flush_ok_after_failure = 0

    def wrote(self, off: int, data: bytes, ok: bool) -> None:
        self.since.append((off, data))
        if ok:
            self.model[off:off + len(data)] = data

    def flushed(self) -> None:
        self.acked = bytes(self.model)
        self.since = []

    def problems(self, guest: bytes, what: str) -> list[str]:
        allowed: dict[int, set[bytes]] = {}
        for off, data in self.since:
            for p in range(off, off + len(data), SECTOR):
                allowed.setdefault(p, set()).add(data[p - off:p - off + SECTOR])
        bad = [p for p in range(0, SIZE, SECTOR)
               if guest[p:p + SECTOR] != self.acked[p:p + SECTOR] and guest[p:p + SECTOR] not in allowed.get(p, ())]
        if bad:
            return [f"{what}: {len(bad)} sectors lost an acknowledged write (first at guest offset {bad[0]:#x})"]
        return []


def drive(img: vdisk.Image, ops: list[tuple], t: Tracker) -> HostIOError | None:
    """Run ``ops``, going on after errors; return the first error."""
    first = None
    for op in ops:
        try:
            if op[0] == "write":
                try:
                    img.write(op[1], op[2])
                except VdiskError:
                    t.wrote(op[1], op[2], ok=False)
                    raise
                t.wrote(op[1], op[2], ok=True)
            else:
                img.flush()
                if first is not None:
                    t.flush_ok_after_failure += 1
                t.flushed()
        except HostIOError as exc:
            first = first or exc
    try:
        img.close()
    except HostIOError as exc:
        first = first or exc
    return first


def recovered(open_fn, t: Tracker, what: str) -> list[str]:
    try:
        with open_fn() as img:
            res = img.check()
            if res.corruptions:
                return [f"{what}: check finds corruption: {res.corruptions[:3]}"]
            guest = img.read(0, SIZE)
    except VdiskError as exc:
        return [f"{what}: {type(exc).__name__}: {exc}"]
    return t.problems(guest, what)


class CountingFaults(FaultyStorage):
    """A FaultyStorage that also counts the flushes that succeed after the injected one."""

    flushes_after_failure = 0

    def flush(self):
        super().flush()
        if self.injected:
            self.flushes_after_failure += 1


def _flush_points(cfg: Config, base: bytes, ops) -> int:
    dry = FaultyStorage(RecordingStorage(base, "top"))
    img = open_image(FailStopStorage(dry), cfg, None, read_only=False)
    assert drive(img, ops, Tracker()) is None
    return dry.counts["flush"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_no_acknowledged_flush_is_lost_on_the_fault_model(cfg):
    base = create_image(cfg, None)
    ops = workload(7)
    points = _flush_points(cfg, base, ops)
    assert points >= 9
    problems: list[str] = []
    for k in range(points):
        where = f"{cfg.name} flush#{k}"
        rec = RecordingStorage(base, "top")
        faulty = CountingFaults(rec, "flush", k, errno.EIO)
        host = FailStopStorage(faulty)
        t = Tracker()
        first = drive(open_image(host, cfg, None, read_only=False), ops, t)
        if first is None or first.errno != errno.EIO:
            problems.append(f"{where}: the failed flush did not reach the caller (first error {first!r})")
        if faulty.flushes_after_failure:
            problems.append(f"{where}: {faulty.flushes_after_failure} host flushes succeeded after the failed one")
        assert host.flush_failed is not None
        problems += recovered(lambda: open_image(MemStorage(rec.snapshot()), cfg, None, read_only=True), t,
                              f"{where}: reopened")
        cl = CrashLog(rec.base, rec.log)
        durable = cl.durable_state(cl.last_flush_before(len(rec.log)))
        problems += recovered(lambda: open_image(MemStorage(durable), cfg, None, read_only=True), t,
                              f"{where}: after a power cut")
    assert not problems, "\n".join(problems[:20])


# ------------------------------------------------------------------ a real HostFile
class FailingSync:
    """Replaces os.fdatasync for one file: its ``at``-th call fails with EIO once, after
    which the file is reset to its content at the last successful sync (Linux dropped
    the dirty pages); ``durable`` is that content (what a power cut leaves)."""

    def __init__(self, path: str, at: int):
        self.path = os.path.realpath(path)
        self.at = at
        self.calls = 0
        self.ok_after_failure = 0
        self.failed = False
        self._real = os.fdatasync
        with open(path, "rb") as f:
            self.durable = f.read()

    def __call__(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") != self.path:
            return self._real(fd)
        n = self.calls
        self.calls += 1
        if n == self.at:
            self.failed = True
            with open(self.path, "r+b") as f:  # the page cache forgets what it could not write
                f.truncate(0)
                f.write(self.durable)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)
        if self.failed:
            self.ok_after_failure += 1
        with open(self.path, "rb") as f:
            self.durable = f.read()


@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_no_acknowledged_flush_is_lost_on_a_real_file(tmp_path, monkeypatch, fmt):
    ops = workload(11)
    path = str(tmp_path / f"disk.{fmt}")
    vdisk.create(path, SIZE, format=fmt, cluster_size=4096)
    pristine = open(path, "rb").read()
    counter = FailingSync(path, -1)
    monkeypatch.setattr(os, "fdatasync", counter)
    assert drive(vdisk.open(path, format=fmt), ops, Tracker()) is None
    points = counter.calls
    assert points >= 9
    problems: list[str] = []
    for k in range(points):
        where = f"{fmt} fdatasync#{k}"
        with open(path, "wb") as f:
            f.write(pristine)
        sync = FailingSync(path, k)
        monkeypatch.setattr(os, "fdatasync", sync)
        t = Tracker()
        first = drive(vdisk.open(path, format=fmt), ops, t)
        monkeypatch.setattr(os, "fdatasync", sync._real)
        if first is None or first.errno != errno.EIO or "flush failed" not in str(first):
            problems.append(f"{where}: the failed flush did not reach the caller (first error {first!r})")
        if sync.ok_after_failure:
            problems.append(f"{where}: {sync.ok_after_failure} fdatasyncs succeeded after the failed one")
        problems += recovered(lambda: vdisk.open(path, format=fmt, read_only=True), t, f"{where}: reopened")
        cut = str(tmp_path / f"cut.{fmt}")
        with open(cut, "wb") as f:
            f.write(sync.durable)
        problems += recovered(lambda: vdisk.open(cut, format=fmt, read_only=True), t, f"{where}: after a power cut")
    assert not problems, "\n".join(problems[:20])


# ------------------------------------------------------------------ the rule itself
def _check_refusals(host, name: str) -> None:
    assert host.pread(0, 5) == b"hello", "reads go on after a failed flush"
    for what, call in [("write", lambda: host.pwrite(0, b"x")), ("write", lambda: host.pwritev(0, [b"x", b"y"])),
                       ("punch hole", lambda: host.punch_hole(0, 4096)), ("truncate", lambda: host.truncate(1 << 20)),
                       ("flush", host.flush), ("flush", host.flush)]:
        with pytest.raises(HostIOError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{name}: {what} refused: an earlier flush failed (flush failed: Input/output error"), msg
        assert "must be reopened" in msg and "\n" not in msg, msg
        assert e.value.errno == errno.EIO
    assert host.pread(0, 5) == b"hello"


def test_host_file_refuses_changes_after_a_failed_flush(tmp_path, monkeypatch):
    path = str(tmp_path / "f.img")
    with open(path, "wb") as f:
        f.write(b"hello" + bytes(8187))
    host = HostFile(path)
    try:
        host.pwrite(4096, b"dirty")
        sync = FailingSync(path, 0)
        monkeypatch.setattr(os, "fdatasync", sync)
        with pytest.raises(HostIOError, match=r"flush failed: Input/output error") as e:
            host.flush()
        assert e.value.errno == errno.EIO
        monkeypatch.setattr(os, "fdatasync", sync._real)  # the device works again: no matter
        _check_refusals(host, path)
        assert sync.ok_after_failure == 0
    finally:
        host.close()
    host = HostFile(path)  # reopening starts afresh
    try:
        host.pwrite(0, b"H")
        host.flush()
    finally:
        host.close()


def test_fail_stop_storage_applies_the_same_rule():
    host = FailStopStorage(FaultyStorage(MemStorage(b"hello" + bytes(8187), "mem"), "flush", 0, errno.EIO))
    host.pwrite(4096, b"dirty")
    with pytest.raises(HostIOError, match="flush failed"):
        host.flush()
    _check_refusals(host, "mem")


def test_unsafe_cache_never_fails_a_flush(tmp_path, monkeypatch):
    """cache=unsafe (sync=False) never calls fdatasync, so it never turns fail-stop."""
    path = str(tmp_path / "f.img")
    with open(path, "wb") as f:
        f.write(bytes(4096))
    host = HostFile(path, sync=False)
    try:
        monkeypatch.setattr(os, "fdatasync", FailingSync(path, 0))
        host.flush()
        host.pwrite(0, b"x")
        assert host.flush_failed is None
    finally:
        host.close()
