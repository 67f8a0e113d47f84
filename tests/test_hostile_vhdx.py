"""Hostile VHDX images: a generated corpus (tests/hostile/gen_vhdx.py) and a bounded,
deterministic fuzz of the VHDX reader and writer.

Corpus: each image is copied (a read-write open replays a log into the file) and
probed in a child process (tests/hostile/probe.py: open + read everything +
block_status + check + read-write open) under a 400 MiB address-space limit.  Every
step must end in "ok" or a named VdiskError -- never another exception, never wrong
data -- within 1 s and 200 MiB of peak RSS; each case's expectations (refused at
open, with which error; or read with the content the generator computed, for the
log cases the content after the log's replay) are in the corpus.  A sample goes
through the real CLI too (info / check / convert): one line on stderr, no traceback.

Fuzz: mutations of valid images (a dynamic one, a fixed one, one with a log to
replay, a differencing one) -- byte flips, named header / region / metadata / BAT fields re-signed past
their checksums, log entries with random writes, truncation -- run in a worker
process (this module run as a script, ``--worker``; the protocol of
tests/hostile/fuzzworker.py) under a 600 MiB address-space limit: open, read the
first 8 MiB, the last MiB and the start of every data extent, block_status of the
whole disk, check, then open read-write, write near the end, flush, reopen and read
the write back.  (A mutated image may legitimately claim a disk of many GiB, so the
worker never reads a whole disk in one call, as tests/hostile/fuzzworker.py does.)
Only VdiskError may escape, each example within 2 s.  ``VDISK_FUZZ_EXAMPLES`` scales it (this
module runs a fifth of it, plus half as many flip-only examples); derandomized
unless ``VDISK_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def exercise(data: bytes) -> None:
    """What a user could do with an image; only VdiskError may escape."""
    from crash.storage import MemStorage

    from vdisk.block import Image
    from vdisk.drivers import get_driver
    from vdisk.errors import VdiskError

    drv = get_driver("vhdx")
    img = Image(drv.open(MemStorage(data, "fuzz.vhdx", read_only=True), read_only=True), "fuzz.vhdx", None)
    try:
        size = img.size
        steps = [lambda: img.read(0, min(size, 8 << 20)), lambda: img.read(max(0, size - (1 << 20)), min(size, 1 << 20))]
        for step in steps:
            try:
                step()
            except VdiskError:
                pass
        try:
            ext = img.block_status(0, size)
            for e in [e for e in ext if e.status == 2][:64]:
                img.read(e.offset, min(e.length, 65536))
        except VdiskError:
            pass
        try:
            img.check()
        except VdiskError:
            pass
    finally:
        img.close()
    store = MemStorage(data, "fuzz.vhdx")
    rw = Image(drv.open(store, read_only=False), "fuzz.vhdx", None)
    try:
        n = min(rw.size, 3 * 4096 + 11)
        if n:
            rw.write(rw.size - n, b"\xa5" * n)
        rw.flush()
    finally:
        try:
            rw.close()
        except VdiskError:
            pass
    if n:
        store.read_only, store.closed = True, False  # reopen the same bytes (no copy of a grown file)
        back = Image(drv.open(store, read_only=True), "f", None)
        try:
            got = back.read(back.size - n, n)
        finally:
            back.close()
        if got != b"\xa5" * n:
            raise AssertionError("a flushed write did not read back after reopening")


def _worker_main() -> None:
    import resource
    import time
    import traceback

    from vdisk.errors import VdiskError

    resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))
    inp, out = sys.stdin.buffer, sys.stdout
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        n = int.from_bytes(head, "little")
        inp.read(8)
        data = inp.read(n)
        t0 = time.monotonic()
        reply = {"result": "accepted", "error": None}
        try:
            exercise(data)
        except VdiskError as exc:
            reply.update(result="refused", error=f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
            reply.update(result="bug", error=f"{type(exc).__name__}: {str(exc)[:300]}{where}")
            del exc
        reply["seconds"] = round(time.monotonic() - t0, 4)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
    sys.exit(0)

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TIME_LIMIT = 1.0
RSS_LIMIT_MIB = 200
FUZZ_TIME_LIMIT = 2.0
EXAMPLES = max(20, int(os.environ.get("VDISK_FUZZ_EXAMPLES", "1500")) // 10)

sys.path.insert(0, str(HERE / "hostile"))
import gen_vhdx as G
import judge

from vdisk.codec import vhdx as V

CORPUS = tempfile.mkdtemp(prefix="vdisk-hostile-vhdx-")
atexit.register(shutil.rmtree, CORPUS, True)
CASES = G.generate(CORPUS)


def run_probe(path: str) -> dict:
    return judge.run_probe(path, "vhdx")


_is_error = judge.is_error


def evaluate(case, res: dict) -> list[str]:
    bad = judge.generic_faults(res, TIME_LIMIT, RSS_LIMIT_MIB)
    if "fatal" in res:
        return bad
    opened = res["open"] == "ok"
    if case.open == "fail":
        if opened:
            bad.append("opened, but must be refused at open")
        elif case.error and not res["open"].startswith(case.error + ":"):
            bad.append(f"refused with {res['open'].split(':', 1)[0]}, expected {case.error}")
        if case.check and not _is_error(res.get("check")):
            bad.append(f"check must refuse the image, got {res.get('check')!r}")
    else:
        if not opened:
            bad.append(f"must open, got {res['open']}")
        elif res.get("read") != "ok":
            bad.append(f"must read, got {res.get('read')}")
        elif case.content:
            want = Path(CORPUS, case.content).read_bytes()
            if hashlib.sha256(want).hexdigest() != res["sha256"]:
                bad.append("read returned data that differs from the image's real content (silently wrong)")
        if case.rw_open == "fail" and not _is_error(res.get("open_rw")):
            bad.append(f"read-write open must be refused, got {res.get('open_rw')}")
        elif case.rw_open != "fail" and res.get("open_rw") != "ok":
            bad.append(f"read-write open must work, got {res.get('open_rw')}")
    return bad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_vhdx_image(case, tmp_path):
    path = tmp_path / case.file
    for name in [case.file, *case.extra.get("files", [])]:  # a differencing disk's parent lies beside it
        shutil.copyfile(os.path.join(CORPUS, name), tmp_path / name)
    res = run_probe(str(path))
    bad = evaluate(case, res)
    assert not bad, f"{case.name} ({case.why}):\n  " + "\n  ".join(bad) + f"\n  probe: {json.dumps(res)[:1500]}"


def test_corpus_size():
    assert len(CASES) >= 60, len(CASES)
    assert sum(c.name.startswith("log-") for c in CASES) >= 15


def test_read_write_open_replays_into_a_copy(tmp_path):
    """The probe's read-write open replays the log into the file: afterwards the log
    GUID is zero, the file reads the same without any log, and the replay is not
    done again."""
    case = next(c for c in CASES if c.name == "log-valid")
    path = tmp_path / "l.vhdx"
    shutil.copyfile(os.path.join(CORPUS, case.file), path)
    res = run_probe(str(path))
    assert res["open_rw"] == "ok"
    v = G.VhdxFile(path.read_bytes())
    assert v.hget("log_guid") == bytes(16)
    res2 = run_probe(str(path))
    assert res2["sha256"] == res["sha256"] == hashlib.sha256(Path(CORPUS, case.content).read_bytes()).hexdigest()


CLI_SAMPLE = ["bad-file-signature", "both-headers-bad-checksum", "region-count-huge", "meta-unknown-required",
              "has-parent-no-locator", "diff-ok", "diff-locator-etc-passwd", "diff-locator-absolute-only", "bat-past-eof", "bat-same-block", "log-writes-header", "log-forged-everywhere",
              "virtual-size-bat-short", "log-valid"]


def _vdisk() -> list[str]:
    exe = Path(sys.executable).parent / "vdisk"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vdisk.cli"]


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_hostile_vhdx_cli(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    src = tmp_path / case.file
    for f in [case.file, *case.extra.get("files", [])]:
        shutil.copyfile(os.path.join(CORPUS, f), tmp_path / f)
    before = src.read_bytes()
    out = {}
    for cmd in (["info", "-f", "vhdx", src], ["check", "-f", "vhdx", src],
                ["convert", "-f", "vhdx", "-O", "raw", src, tmp_path / "out.raw"]):
        r = subprocess.run(_vdisk() + [str(c) for c in cmd], capture_output=True, text=True, timeout=60, check=False)
        out[cmd[0]] = r
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        if r.returncode:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vdisk: "), f"vdisk {cmd[0]}: {r.stderr!r}"
    assert src.read_bytes() == before, "a read-only command changed the image"
    if case.open == "fail":
        if not case.check and out["info"].returncode == 0:
            # a chain problem: `info` describes the top image and names the problem as a
            # warning, as qemu-img info does (tests/test_hostile.py holds the same rule)
            err = out["info"].stderr.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("vdisk: warning: "), out["info"].stderr
            del out["info"]
        assert all(r.returncode != 0 for r in out.values()), {k: r.returncode for k, r in out.items()}
    else:
        assert all(r.returncode == 0 for r in out.values()), {k: r.stderr for k, r in out.items()}
        assert (tmp_path / "out.raw").read_bytes() == Path(CORPUS, case.content).read_bytes()


# ----------------------------------------------------------------------------- fuzz
def _bases() -> list[bytes]:
    d = tempfile.mkdtemp(prefix="vdisk-fuzz-vhdx-")
    try:
        out = []
        for name, kw in (("d", {}), ("f", {"subformat": "fixed", "seed": 4, "size": 3 << 20,
                                   "ranges": ((0, 5000), (2 << 20, 9000))})):
            G.make_valid(os.path.join(d, name), **kw)
            out.append(Path(d, name).read_bytes())
        out.append(Path(CORPUS, next(c for c in CASES if c.name == "log-valid").file).read_bytes())
        out.append(G.make_differencing(d)[0])  # opened alone here: the parent's ranges read as zeros
        return out
    finally:
        shutil.rmtree(d, True)


BASES = _bases()
INTERESTING = st.one_of(
    st.sampled_from([0, 1, 2, 6, 7, 511, 512, 4095, 4096, 65536, 1 << 20, (1 << 20) + 4096, 2 << 20, 3 << 20,
                     256 << 20, 2**31, 2**32 - 1, 2**32, 1 << 40, 1 << 46, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**40), st.integers(1, 255)),
    st.tuples(st.just("header"), st.sampled_from(["sequence_number", "log_version", "version", "log_length",
                                                  "log_offset"]), INTERESTING),
    st.tuples(st.just("region"), st.integers(0, 2), st.sampled_from(sorted(V.REGION_ENTRY_FIELDS)), INTERESTING),
    st.tuples(st.just("meta"), st.integers(0, 5), st.sampled_from(["offset", "length", "flags"]), INTERESTING),
    st.tuples(st.just("item"), st.sampled_from(sorted(V.META_NAMES, key=str)), INTERESTING),
    st.tuples(st.just("bat"), st.one_of(st.integers(0, 8), st.sampled_from([4095, 4096, 4097])), INTERESTING),
    st.tuples(st.just("log"), st.integers(1, 2**64 - 1),
              st.lists(st.tuples(INTERESTING, st.one_of(st.none(), INTERESTING)), min_size=1, max_size=3),
              INTERESTING, INTERESTING),
    st.tuples(st.just("truncate"), st.integers(0, 2**40)),
)
_FIELD_MAX = {"H": 2**16, "I": 2**32, "Q": 2**64}


def mutate(data: bytes, muts) -> bytes:
    v = G.VhdxFile(data)
    for m in muts:
        kind = m[0]
        try:
            if kind == "flip":
                if v.b:
                    v.b[m[1] % len(v.b)] ^= m[2]
            elif kind == "header":
                v.hset(m[1], m[2] % _FIELD_MAX[V.HEADER_FIELDS[m[1]][1]])
            elif kind == "region":
                fmt = V.REGION_ENTRY_FIELDS[m[2]][1]
                val = G.uuid.UUID(int=m[3] % 2**128) if fmt == "16s" else m[3] % _FIELD_MAX[fmt]
                v.rset(m[1], m[2], val)
            elif kind == "meta":
                v.mset(m[1], m[2], m[3] % 2**32)
            elif kind == "item":
                v.item_set(m[1], struct.pack("<Q", m[2]))
            elif kind == "bat":
                v.set_bat(m[1], m[2])
            elif kind == "log":
                writes = [(off % 2**64 & ~4095, (n % 2**64 & ~4095) if n is not None else bytes(4096))
                          for off, n in m[2]]
                # LastFileOffset at most 64 MiB past the end: the worker's storage is a bytearray,
                # not a sparse file (the corpus holds the cases of far larger values)
                e = G.log_entry(m[1], writes, flushed=m[3] % 2**64, last=m[4] % (len(v.b) + (64 << 20)))
                v.add_log([e], log_guid=G.LOG_GUID)
            elif kind == "truncate":
                del v.b[m[1] % (len(v.b) + 1):]
        except (IndexError, ValueError, StopIteration, struct.error, OverflowError, V.CorruptImage):
            pass  # the generator's own view no longer parses: keep what we have
    return v.bytes()


class Worker:
    """The long-lived fuzz worker (this module with ``--worker``), restarted after a timeout."""

    def __init__(self):
        self.p = None

    def run(self, data: bytes) -> dict:
        if self.p is None or self.p.poll() is not None:
            self.p = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.sel = selectors.DefaultSelector()
            self.sel.register(self.p.stdout, selectors.EVENT_READ)
        self.p.stdin.write(len(data).to_bytes(8, "little") + b"vhdx".ljust(8, b"\0") + data)
        self.p.stdin.flush()
        if not self.sel.select(timeout=FUZZ_TIME_LIMIT * 10):
            self.stop()
            return {"result": "timeout", "error": f"no answer within {FUZZ_TIME_LIMIT * 10} s"}
        line = self.p.stdout.readline()
        if not line:
            self.stop()
            return {"result": "bug", "error": "the worker died"}
        return json.loads(line)

    def stop(self):
        if self.p is not None:
            self.p.kill()
            self.p.wait()
            self.p = None


WORKER_PROC = Worker()
STATS = {"accepted": 0, "refused": 0}


def run_one(data: bytes) -> None:
    r = WORKER_PROC.run(data)
    assert r["result"] in ("accepted", "refused"), f"{r['result']}: {r['error']}"
    assert r["seconds"] <= FUZZ_TIME_LIMIT, f"an example took {r['seconds']} s (limit {FUZZ_TIME_LIMIT} s)"
    STATS[r["result"]] += 1


_SETTINGS = {"deadline": None, "derandomize": os.environ.get("VDISK_FUZZ_RANDOM") != "1",
             "suppress_health_check": list(HealthCheck), "database": None}


@settings(max_examples=EXAMPLES, **_SETTINGS)
@given(base=st.sampled_from(range(len(BASES))), muts=st.lists(mutation, min_size=1, max_size=4))
def _fuzz(base, muts):
    run_one(mutate(BASES[base], muts))


@settings(max_examples=EXAMPLES // 2, **_SETTINGS)
@given(base=st.sampled_from(range(len(BASES))),
       flips=st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 255)), min_size=1, max_size=16))
def _fuzz_flips(base, flips):
    data = bytearray(BASES[base])
    for pos, x in flips:
        data[pos % (len(data) // 4)] ^= x  # the metadata lives in the first part of these small files
    run_one(bytes(data))


def test_fuzz_vhdx():
    try:
        _fuzz()
        _fuzz_flips()
    finally:
        WORKER_PROC.stop()
    # both outcomes must occur, or the mutations miss the structures they aim at
    assert STATS["accepted"] > 0 and STATS["refused"] > 0, STATS
