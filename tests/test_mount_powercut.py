"""A power cut under the FUSE mount: what an fsync on MOUNTPOINT/disk acknowledged survives.

``kill -9`` of the mount daemon (tests/test_fuse.py) cannot test durability: the host
file's page cache outlives the process.  Here the image is served by
``tests/crash/mount_recorder.py`` -- the real FUSE export (``VdiskFS``, the daemon's
mount options, direct_io) over a ``RecordingStorage`` -- and the test does its I/O
through the kernel: rounds of pwrites of distinct patterns (4 KiB to 200 KiB, aligned
and not, overwriting earlier ones), each round ended by ``os.fsync`` on the disk file,
then a few writes no fsync covers, then a clean stop (SIGTERM: unmount, close).  After
each fsync returns, the test reads the log position (the ``user.powercut.mark``
xattr): from that point on, the round is acknowledged.

From the log it rebuilds the host file as a power cut could have left it (the crash
model of tests/crash/storage.py): at every flush boundary (just before and just after
each flush), and at random points with a random subset, or a random set of 512-byte
sectors, of the writes issued since the last completed flush (``CrashLog.random_state``);
half of the random cuts fall inside an fsync, while the driver commits.
Each state is written to a file and opened with ``vdisk.open`` (read-only, format
probed), and must:

* open as its format, and ``check`` must find no corruption (leaks are allowed; raw
  has nothing to check);
* read back exactly, everywhere, what the last fsync acknowledged before the cut
  left -- except the 512-byte sectors that a later write (one that had reached the
  mount before the cut) touched: each of those must hold its acknowledged content or
  its content after one of those later writes, never anything else;
* after the clean stop (the whole log), hold every write, synced or not.

A self-check makes sure the checker would notice lost acknowledged data: the same
log with the flushes of the fsyncs removed must fail.

Environment: ``VDISK_POWERCUT_STATES`` (random crash states per format, default 200;
the flush boundaries are always all checked), ``VDISK_POWERCUT_SEED`` (the workload's
and the states' seed; default fixed under CI, random otherwise and printed).  A longer
run::

    VDISK_POWERCUT_STATES=5000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_mount_powercut.py
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crash import figures
from crash.storage import SECTOR, CrashLog, CrashState

import vdisk
from vdisk.drivers.base import CheckResult

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.timeout(300)]

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
ROUNDS = 6
SELF_CHECK_STATES = 20  # random states of the log without the fsyncs' flushes
MARK_XATTR = "user.powercut.mark"
REPO = Path(__file__).resolve().parent.parent

STATES = int(os.environ.get("VDISK_POWERCUT_STATES", "200"))
_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
SEED = int(os.environ.get("VDISK_POWERCUT_SEED") or (20240611 if _CI else random.randrange(1 << 30)))

FORMATS = {
    # name: vdisk.create options
    "vdk-4k": {"format": "vdk", "cluster_size": 4096},
    "vdk-64k-zstd": {"format": "vdk", "cluster_size": 65536, "compression": "zstd"},
    "qcow2-64k": {"format": "qcow2"},
    "raw": {"format": "raw"},
}


# ----------------------------------------------------------------------------- the workload
@dataclass
class Write:
    offset: int
    data: bytes
    mark: int = -1  # log position when the test issued it
    requests: list = field(default_factory=list)  # (pos_before, offset, length) of its FUSE write requests


@dataclass
class Round:
    writes: list[Write]
    synced: bool
    ack: int = -1  # log position after its fsync returned (synced rounds)


def _pattern(rng: random.Random, n: int, tag: int) -> bytes:
    # Distinct per write: a 16-byte stamp (write tag, position) every 512 bytes over
    # random bytes, so a sector from the wrong write or the wrong place never matches.
    out = bytearray(rng.randbytes(n))
    for pos in range(0, n, 512):
        out[pos:pos + 16] = (tag.to_bytes(8, "little") + pos.to_bytes(8, "little"))[:max(0, min(16, n - pos))]
    return bytes(out)


def make_workload(rng: random.Random) -> list[Round]:
    rounds = []
    tag = 1
    hot = [rng.randrange(0, SIZE // (256 * KiB)) * 256 * KiB for _ in range(3)]  # overwritten again and again
    for r in range(ROUNDS + 1):
        writes = []
        for _ in range(rng.randint(3, 7)):
            n = rng.choice([4 * KiB, 4 * KiB, 8 * KiB, 12 * KiB + 512, 64 * KiB, 100 * KiB + 1536, 200 * KiB])
            where = rng.random()
            if where < 0.4:
                off = rng.choice(hot) + rng.randrange(0, 64) * 512
            elif where < 0.8:
                off = rng.randrange(0, (SIZE - n) // 4096 + 1) * 4096
            else:  # not even sector-aligned
                n = rng.choice([4 * KiB, 5 * KiB + 3, 9000])
                off = rng.randrange(0, SIZE - n + 1)
            off = min(off, SIZE - n)
            writes.append(Write(off, _pattern(rng, n, tag)))
            tag += 1
        rounds.append(Round(writes, synced=r < ROUNDS))
    return rounds


# ----------------------------------------------------------------------------- the mount
class Recorder:
    """The recorder subprocess and its mount; ``cleanup`` undoes both whatever happened."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.logfile = tmp / "recording.pkl"
        self.errfile = tmp / "recorder.err"
        self.proc: subprocess.Popen | None = None

    def start(self, image: Path) -> None:
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.crash.mount_recorder", str(image), str(self.mnt), str(self.logfile)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"READY":
            raise AssertionError(f"the recorder did not get ready ({line!r}):\n{self.stderr()}")

    def mark(self) -> int:
        return int(os.getxattr(self.mnt, MARK_XATTR))

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the recorder did not exit within 60 s of SIGTERM:\n{self.stderr()}") from None
        assert rc == 0, f"the recorder exited with status {rc}:\n{self.stderr()}"
        assert not _mounted(self.mnt), "the recorder exited but left its mount"
        with open(self.logfile, "rb") as f:
            return pickle.load(f)

    def stderr(self) -> str:
        try:
            return self.errfile.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        if _mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True,
                           timeout=30)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.proc.stdout.close()


def _mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4].encode().decode("unicode_escape") == real for line in f)


def run_workload(rec: Recorder, rounds: list[Round]) -> None:
    fd = os.open(rec.mnt / "disk", os.O_RDWR)
    try:
        assert os.fstat(fd).st_size == SIZE
        for rnd in rounds:
            for w in rnd.writes:
                w.mark = rec.mark()
                assert os.pwrite(fd, w.data, w.offset) == len(w.data)
            if rnd.synced:
                os.fsync(fd)
                rnd.ack = rec.mark()
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the checker
class Expectation:
    """What a power cut at log position ``point`` may leave, per 512-byte sector."""

    def __init__(self, rounds: list[Round]):
        self.rounds = rounds
        self.writes = [w for r in rounds for w in r.writes]
        # the state each synced round acknowledged: acked[k] after k rounds (acked[0]: zeros)
        self.acked = [bytes(SIZE)]
        self.ack_at = [0]
        cur = bytearray(SIZE)
        for r in rounds:
            for w in r.writes:
                cur[w.offset:w.offset + len(w.data)] = w.data
            if r.synced:
                self.acked.append(bytes(cur))
                self.ack_at.append(r.ack)
        self.final = bytes(cur)

    def acknowledged(self, point: int) -> int:
        """How many rounds an fsync had acknowledged at ``point``."""
        k = 0
        for i, at in enumerate(self.ack_at):
            if at <= point:
                k = i
        return k

    def verify(self, data: bytes, point: int) -> tuple[str, str | None]:
        """("exact" | "newer" | "mixed", None) or (kind, why it is wrong)."""
        k = self.acknowledged(point)
        base = self.acked[k]
        if data == base:
            return "exact", None
        later = [(w, [q for q in w.requests if q[0] < point]) for r in self.rounds[k:] for w in r.writes]
        cur = bytearray(base)
        for w, reqs in later:
            for _, off, n in reqs:
                cur[off:off + n] = w.data[off - w.offset:off - w.offset + n]
        if data == cur:
            return "newer", None
        # every version of every sector a later write had touched before the cut
        versions: dict[int, list[bytes]] = {}
        cur = bytearray(base)
        for w, reqs in later:
            for _, off, n in reqs:
                cur[off:off + n] = w.data[off - w.offset:off - w.offset + n]
                for s in range(off // SECTOR, (off + n - 1) // SECTOR + 1):
                    vs = versions.setdefault(s, [base[s * SECTOR:(s + 1) * SECTOR]])
                    vs.append(bytes(cur[s * SECTOR:(s + 1) * SECTOR]))
        if len(data) != SIZE:
            return "mixed", f"the disk is {len(data)} bytes, not {SIZE}"
        expect = bytearray(base)
        for s, vs in versions.items():
            got = data[s * SECTOR:(s + 1) * SECTOR]
            if got not in vs:
                return "mixed", (f"sector at guest offset {s * SECTOR} (written after the fsync of round {k}) holds "
                                 f"neither its acknowledged content nor a later write's")
            expect[s * SECTOR:(s + 1) * SECTOR] = got
        if data != expect:
            bad = next(i for i in range(SIZE) if data[i] != expect[i])
            return "mixed", (f"acknowledged data lost: guest offset {bad} differs from what the fsync of round {k} "
                             f"acknowledged (log position {self.ack_at[k]}), and no later write touched it")
        return "mixed", None


def attach_requests(rounds: list[Round], events: list[tuple]) -> None:
    """Give each test write the FUSE write requests that carried it (by log position),
    and check that the mount saw the test's I/O as issued."""
    writes = [w for r in rounds for w in r.writes]
    wreqs = [e for e in events if e[0] == "write"]
    i = 0
    for j, w in enumerate(writes):
        nxt = writes[j + 1].mark if j + 1 < len(writes) else None
        got = 0
        while i < len(wreqs) and (nxt is None or wreqs[i][1] < nxt):
            _, before, _after, off, n = wreqs[i]
            assert off == w.offset + got, f"write {j}: request at {off}, expected {w.offset + got}"
            w.requests.append((before, off, n))
            got += n
            i += 1
        assert got == len(w.data), f"write {j} of {len(w.data)} bytes at {w.offset}: the mount got {got} bytes"
    assert i == len(wreqs), f"{len(wreqs) - i} FUSE write requests the test did not issue"
    fsyncs = [e for e in events if e[0] == "fsync"]
    assert len(fsyncs) == sum(r.synced for r in rounds), f"{len(fsyncs)} fsync requests for {ROUNDS} fsyncs"


def _put(path: Path, data: bytes) -> None:
    # Rewritten in place: truncating a file of several MiB for every state costs more
    # than checking the state.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _check(img) -> CheckResult:
    # raw has no metadata to check (and says so: NotSupported)
    return CheckResult() if img.format == "raw" else img.check()


def check_state(path: Path, fmt: str, state: CrashState, exp: Expectation) -> tuple[str, int]:
    """Write the state to ``path``, open and check it; returns (outcome, leaked clusters).
    Raises AssertionError naming the state on any failure."""
    _put(path, state.data)
    try:
        with vdisk.open(path, read_only=True) as img:
            assert img.format == fmt, f"opens as {img.format}"
            res = _check(img)
            assert not res.corruptions, f"check finds corruption: {'; '.join(res.corruptions[:3])}"
            assert img.size == SIZE, f"the disk is {img.size} bytes"
            data = img.read(0, img.size)
    except (AssertionError, vdisk.VdiskError) as exc:
        raise AssertionError(f"{state.describe()}: {type(exc).__name__}: {exc}") from None
    kind, why = exp.verify(data, state.point)
    if why:
        raise AssertionError(f"{state.describe()}, {exp.acknowledged(state.point)} rounds acknowledged: {why}")
    return kind, res.leaked_clusters


def crash_states(cl: CrashLog, rng: random.Random, n_random: int, events: list[tuple]):
    """Every flush boundary (the prefix just before and just after each flush, and the
    whole log), then ``n_random`` random cuts with torn or partial epochs: half of them
    inside an fsync (while the driver commits), the others anywhere."""
    points = sorted({0, len(cl.log)} | {i for i in cl.flush_at} | {i + 1 for i in cl.flush_at})
    prefix = dict.fromkeys(points)
    for st in cl.prefix_states():
        if st.point in prefix:
            yield st
    commits = [(e[1], e[2]) for e in events if e[0] == "fsync" and e[2] > e[1]]
    for _ in range(n_random):
        if commits and rng.random() < 0.5:
            lo, hi = rng.choice(commits)
            yield cl.random_state(rng, point=rng.randint(lo + 1, hi))
        else:
            yield cl.random_state(rng)


def _without_fsync_flushes(log: list, events: list, rounds: list[Round]) -> tuple[list, list, list[Round]]:
    """The log as a mount whose fsync skipped every host flush would have left it
    (positions of marks and requests moved to match)."""
    drop = set()
    for e in events:
        if e[0] == "fsync":
            drop |= {i for i in range(e[1], e[2]) if log[i][0] == "f"}
    keep = [r for i, r in enumerate(log) if i not in drop]
    shift = [0] * (len(log) + 1)
    for i in range(len(log)):
        shift[i + 1] = shift[i] + (i in drop)

    def moved(p: int) -> int:
        return p - shift[p]

    moved_events = [(e[0], moved(e[1]), moved(e[2])) + tuple(e[3:]) for e in events]
    out = []
    for r in rounds:
        ws = [Write(w.offset, w.data, moved(w.mark), [(moved(b), o, n) for b, o, n in w.requests]) for w in r.writes]
        out.append(Round(ws, r.synced, moved(r.ack) if r.synced else -1))
    return keep, moved_events, out


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name", list(FORMATS))
def test_powercut_under_mount(name, tmp_path):
    opts = FORMATS[name]
    fmt = opts["format"]
    seed = SEED + sum(map(ord, name))
    rng = random.Random(seed)
    where = f"[{name}, VDISK_POWERCUT_SEED={SEED}]"
    image = tmp_path / f"disk.{fmt}"
    vdisk.create(image, SIZE, **opts)
    rounds = make_workload(rng)

    t0 = time.monotonic()
    rec = Recorder(tmp_path)
    try:
        rec.start(image)
        run_workload(rec, rounds)
        recording = rec.stop()
    except BaseException:
        print(f"--- recorder log {where}\n{rec.stderr()}")
        raise
    finally:
        rec.cleanup()
    t_mount = time.monotonic() - t0
    assert recording["format"] == fmt and recording["size"] == SIZE
    with open(image, "rb") as f:
        assert recording["base"] == f.read()
    log, events = recording["log"], recording["events"]
    attach_requests(rounds, events)
    exp = Expectation(rounds)
    cl = CrashLog(recording["base"], log)
    assert cl.flush_at, f"{where} no host flush in the whole log"
    for r in rounds:
        if r.synced:  # an fsync that returned must have issued a host flush after the round's writes
            assert any(r.writes[-1].mark < i < r.ack for i in cl.flush_at), \
                f"{where} the fsync acknowledged at log position {r.ack} issued no host flush"

    state_path = tmp_path / f"state.{fmt}"
    stats: Counter = Counter()
    failures: list[str] = []
    t1 = time.monotonic()
    for state in crash_states(cl, random.Random(seed * 7919 + 1), STATES, events):
        try:
            kind, leaked = check_state(state_path, fmt, state, exp)
        except AssertionError as exc:
            failures.append(str(exc))
            continue
        stats["states"] += 1
        stats[f"states_{state.mode}"] += 1
        stats[f"outcome_{kind}"] += 1
        stats["leaked_clusters"] += leaked
        stats["states_with_leaks"] += bool(leaked)
    t_states = time.monotonic() - t1

    # The clean stop made everything durable, synced or not.
    final = CrashLog(recording["base"], log).durable_state(len(log))
    _put(state_path, final)
    with vdisk.open(state_path, read_only=True) as img:
        res = _check(img)
        assert not res.corruptions and not res.leaks, f"{where} after the clean stop: {res.corruptions + res.leaks}"
        assert img.read(0, SIZE) == exp.final, f"{where} after the clean stop the disk does not hold every write"

    # Self-check: had fsync not flushed the host, the checker must see acknowledged data lost.
    bad_log, bad_events, bad_rounds = _without_fsync_flushes(log, events, rounds)
    bad_exp = Expectation(bad_rounds)
    bad_cl = CrashLog(recording["base"], bad_log)
    caught = 0
    for state in crash_states(bad_cl, random.Random(seed), SELF_CHECK_STATES, bad_events):
        try:
            check_state(state_path, fmt, state, bad_exp)
        except AssertionError:
            caught += 1

    figures.record("mount-powercut", config=name, seed=SEED, random_states=STATES, log_records=len(log),
                   flushes=len(cl.flush_at), fuse_requests=len(events), writes=len(exp.writes), rounds=ROUNDS,
                   failures=len(failures), mount_seconds=round(t_mount, 2), check_seconds=round(t_states, 2),
                   selfcheck_caught=caught, **dict(stats))
    assert not failures, f"{where} {len(failures)} of {len(failures) + stats['states']} crash states fail:\n" + \
        "\n".join(failures[:10])
    assert stats["states"] >= STATES
    assert caught, f"{where} the checker did not notice fsyncs that never reached the medium"
