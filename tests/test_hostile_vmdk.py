"""Hostile VMDK images: a generated corpus (tests/hostile/gen_vmdk.py) and a bounded,
deterministic fuzzer.

Each corpus image is opened in a child process (tests/hostile/probe.py) under an
address-space limit: open + read everything + block_status + check + read-write
open.  Every step must end in "ok" or a named VdiskError subclass (never another
exception, never silently wrong data), within 1 s and 200 MiB of peak RSS; what each
case expects (refused at open, at read, by check) is in the corpus.  A sample also
goes through the CLI (info, check, convert): one line on stderr, no traceback.

The fuzzer mutates valid monolithicSparse and streamOptimized images (header
fields, grain directory and table entries, markers, descriptor bytes, byte flips,
truncation) and runs each example in a worker process (``gen_vmdk.py --worker``,
the protocol of tests/hostile/fuzzworker.py, under a 600 MiB address-space limit:
open, read the first 4 MiB and the last, block_status and check of the whole disk,
read-write open, write, flush): only VdiskError may escape,
each example within 2 s.  Derandomized (the same examples every run) unless
``VDISK_FUZZ_RANDOM=1``; ``VDISK_FUZZ_EXAMPLES`` sets the count (default 600).
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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.codec import vmdk as V

HERE = Path(__file__).parent
WORKER = HERE / "hostile" / "gen_vmdk.py"  # its --worker mode
TIME_LIMIT = 1.0
RSS_LIMIT_MIB = 200
EXAMPLES = int(os.environ.get("VDISK_FUZZ_EXAMPLES", "600"))
FUZZ_TIME_LIMIT = 2.0

sys.path.insert(0, str(HERE / "hostile"))
import gen_vmdk
import judge
from judge import is_error

CORPUS = tempfile.mkdtemp(prefix="vdisk-hostile-vmdk-")
atexit.register(shutil.rmtree, CORPUS, True)
CASES = gen_vmdk.generate(CORPUS)


run_probe = judge.run_probe


def evaluate(case, res: dict) -> list[str]:
    """What is wrong with the way vdisk treated this image (empty: all is well)."""
    bad = judge.generic_faults(res, TIME_LIMIT, RSS_LIMIT_MIB)
    if "fatal" in res:
        return bad
    opened = res["open"] == "ok"
    if case.open == "fail" and opened:
        bad.append("opened, but must be refused at open")
    first = res["open"] if not opened else res.get("read")
    if case.error and is_error(first) and not first.startswith(case.error + ":"):
        bad.append(f"refused with {first.split(':', 1)[0]}, expected {case.error}")
    if opened:
        read = res.get("read")
        if case.read == "fail" and not is_error(read):
            bad.append(f"read of the damaged range must fail, got {read!r}")
        if read == "ok" and case.read == "any" and case.content:
            want = Path(CORPUS, case.content).read_bytes()
            if hashlib.sha256(want).hexdigest() != res["sha256"]:
                bad.append("read returned data that differs from the image's content (silently wrong)")
        if case.read == "any" and case.content and case.open != "fail" and read != "ok":
            bad.append(f"a readable image was refused: {read}")
    if case.check and not (res.get("check") == "corrupt" or is_error(res.get("check"))):
        bad.append(f"check must refuse the image, got {res.get('check')!r}")
    return bad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_vmdk(case):
    res = run_probe(os.path.join(CORPUS, case.file), case.format)
    bad = evaluate(case, res)
    assert not bad, f"{case.name} ({case.why}):\n  " + "\n  ".join(bad) + f"\n  probe: {json.dumps(res)[:1500]}"


def test_corpus_size():
    assert len(CASES) >= 80
    assert sum(c.open == "fail" for c in CASES) >= 60
    assert sum(c.read == "fail" for c in CASES) >= 10


CLI_SAMPLE = ["bad-magic", "grain-huge", "gd-past-eof", "gde-on-gd", "gte-past-eof", "descriptor-huge",
              "stream-grain-bomb", "stream-no-footer", "extent-etc-passwd", "extent-self", "parent-loop",
              "parent-cid-mismatch", "chain-65-deep", "extents-many", "desc-not-utf8"]


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_hostile_vmdk_cli(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    src = os.path.join(CORPUS, case.file)
    exe = Path(sys.executable).parent / "vdisk"
    env = {k: v for k, v in os.environ.items() if k not in ("VDISK_BACKING_DIRS", "VDISK_DEBUG")}
    for cmd in (["info", "-f", "vmdk", src], ["check", "-f", "vmdk", src],
                ["convert", "-f", "vmdk", "-O", "raw", src, str(tmp_path / "out.raw")]):
        r = subprocess.run([str(exe), *cmd], capture_output=True, text=True, timeout=60, env=env, check=False)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, f"vdisk {cmd[0]}: {r.stderr}"
        if cmd[0] == "convert" or (cmd[0] == "check" and case.open == "fail"):
            assert r.returncode != 0, f"vdisk {cmd[0]} accepted {name}"
        if r.returncode != 0 and cmd[0] != "check":
            lines = r.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("vdisk: "), f"vdisk {cmd[0]}: stderr {r.stderr!r}"
            assert len([ln for ln in lines if not ln.startswith("vdisk: warning: ")]) == 1, r.stderr


# ----------------------------------------------------------------------------- the fuzzer
BASES = [Path(CORPUS, "valid-sparse.vmdk").read_bytes(), Path(CORPUS, "valid-stream.vmdk").read_bytes()]
INTERESTING = st.one_of(
    st.sampled_from([0, 1, 2, 3, 8, 20, 21, 26, 127, 128, 129, 511, 512, 513, 4096, 65535, 65536, 2**31 - 1, 2**31,
                     2**32 - 1, 2**32, 1 << 40, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
mutation = st.one_of(
    st.tuples(st.just("header"), st.sampled_from(sorted(set(V.HEADER_FIELDS) - {"pad"})), INTERESTING),
    st.tuples(st.just("footer"), st.sampled_from(sorted(set(V.HEADER_FIELDS) - {"pad"})), INTERESTING),
    st.tuples(st.just("gd"), st.integers(0, 3), INTERESTING),
    st.tuples(st.just("gte"), st.integers(0, 63), INTERESTING),
    st.tuples(st.just("marker"), st.integers(0, 40), st.integers(0, 2), INTERESTING),
    st.tuples(st.just("desc"), st.integers(0, 600), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, 2**40), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**40)),
)


def _header_at(b: bytearray, at: int) -> V.SparseHeader | None:
    try:
        return V.decode_header(bytes(b[at:at + 512]))
    except Exception:  # noqa: BLE001 - an earlier mutation broke it: nothing to aim at
        return None


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind = m[0]
        h = _header_at(b, 0)
        foot = len(b) - 1024
        fh = _header_at(b, foot) if len(b) >= 1536 else None
        gd_at = h.gd_offset if h is not None and h.gd_offset != V.GD_AT_END else (fh.gd_offset if fh else None)
        if kind in ("header", "footer"):
            at = 0 if kind == "header" else foot
            if at < 0 or (kind == "footer" and fh is None):
                continue
            off, size = V.HEADER_FIELDS[m[1]]
            b[at + off:at + off + size] = (m[2] % (1 << (8 * size))).to_bytes(size, "little")
        elif kind == "gd" and gd_at is not None and (gd_at + 1) * 512 <= len(b):
            struct.pack_into("<I", b, gd_at * 512 + 4 * m[1], m[2] % 2**32)
        elif kind in ("gte", "marker") and gd_at is not None and (gd_at + 1) * 512 <= len(b):
            gt = struct.unpack_from("<I", b, gd_at * 512)[0]
            if not gt or (gt + 1) * 512 > len(b):
                continue
            pos = gt * 512 + 4 * (m[1] % 128)
            if kind == "gte":
                struct.pack_into("<I", b, pos, m[2] % 2**32)
                continue
            grain = struct.unpack_from("<I", b, pos)[0] * 512
            if grain and grain + 16 <= len(b):
                fmt, off = (("<Q", 0), ("<I", 8), ("<I", 12))[m[2]]
                struct.pack_into(fmt, b, grain + off, m[3] % (1 << (8 * struct.calcsize(fmt))))
        elif kind == "desc" and h is not None and h.descriptor_offset and (h.descriptor_offset + 2) * 512 <= len(b):
            b[h.descriptor_offset * 512 + m[1]] = m[2]
        elif kind == "flip" and b:
            b[m[1] % len(b)] ^= m[2]
        elif kind == "truncate":
            del b[m[1] % (len(b) + 1):]
    return bytes(b)


class Worker:
    def __init__(self):
        self.p = None

    def run(self, data: bytes) -> dict:
        if self.p is None or self.p.poll() is not None:
            self.p = subprocess.Popen([sys.executable, str(WORKER), "--worker=600"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.sel = selectors.DefaultSelector()
            self.sel.register(self.p.stdout, selectors.EVENT_READ)
        self.p.stdin.write(len(data).to_bytes(8, "little") + b"vmdk".ljust(8, b"\0") + data)
        self.p.stdin.flush()
        if not self.sel.select(timeout=FUZZ_TIME_LIMIT * 10):
            self.stop()
            return {"result": "timeout", "error": "no answer"}
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
atexit.register(WORKER_PROC.stop)
STATS = {"accepted": 0, "refused": 0}


def run_one(data: bytes) -> None:
    r = WORKER_PROC.run(data)
    assert r["result"] in ("accepted", "refused"), f"{r['result']}: {r['error']}"
    assert r["seconds"] <= FUZZ_TIME_LIMIT, f"an example took {r['seconds']} s"
    STATS[r["result"]] += 1


@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("VDISK_FUZZ_RANDOM") != "1",
          suppress_health_check=list(HealthCheck), database=None)
@given(base=st.sampled_from(range(len(BASES))), muts=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_vmdk(base, muts):
    run_one(mutate(BASES[base], muts))


def test_fuzz_vmdk_saw_both_outcomes():
    """Runs after the fuzzer: it reached both accepted and refused images (it aims somewhere)."""
    if STATS["accepted"] + STATS["refused"] == 0:
        for muts in ([("gte", 0, 2**31)], [("header", "grainSize", 3)], [("flip", 5000, 1)]):
            run_one(mutate(BASES[0], muts))
    assert STATS["refused"] > 0 and STATS["accepted"] > 0, STATS
