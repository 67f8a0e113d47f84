"""Hostile images: a generated corpus of malformed vdk images and chains (tests/hostile/gen.py).

Each image is opened in a child process (tests/hostile/probe.py) under a 400 MiB
address-space limit and a timeout: open + read everything + block_status + check
(+ read-write open).  Every step must end in "ok" or a named VdiskError -- never
another exception, never wrong data -- within 1 s and 200 MiB of peak RSS; each case's
expectations (refused at open, at read, by check, ...) are in the corpus.  A sample also
goes through the real CLI (info / check / convert): non-zero exit, one line on stderr,
no traceback.  RELIABILITY.md, "Hostile input".

Cases that show an open bug (``bug=`` in the corpus) are run by tests/test_found_bugs.py.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from crash import figures

HERE = Path(__file__).parent
TIME_LIMIT = 1.0  # seconds for all the steps of one image (interpreter start-up excluded)
RSS_LIMIT_MIB = 200
CHILD_TIMEOUT = 30.0

sys.path.insert(0, str(HERE / "hostile"))
import gen
import judge
from judge import is_error

CORPUS = tempfile.mkdtemp(prefix="vdisk-hostile-")
atexit.register(shutil.rmtree, CORPUS, True)
CASES = gen.generate(CORPUS)
from test_found_bugs import _OPEN

OPEN_BUGS = set() if os.environ.get("VDISK_FOUND_BUGS") == "1" else set(_OPEN)
_results: dict[str, str] = {}


def run_probe(path: str, fmt: str, snapshot: str | None = None, rw: bool = True) -> dict:
    return judge.run_probe(path, fmt, snapshot, rw, timeout=CHILD_TIMEOUT)


def evaluate(case: gen.Case, res: dict) -> list[str]:
    """What is wrong with the way vdisk treated this hostile image (empty: refused properly)."""
    bad = judge.generic_faults(res, TIME_LIMIT, RSS_LIMIT_MIB)
    if "fatal" in res:
        return bad
    opened = res["open"] == "ok"
    if case.open == "fail" and opened:
        bad.append("opened, but must be refused at open")
    first_error = res["open"] if not opened else res.get("read")
    if case.error and is_error(first_error) and not first_error.startswith(case.error + ":"):
        bad.append(f"refused with {first_error.split(':', 1)[0]}, expected {case.error}")
    if opened:
        read = res.get("read")
        if case.read == "fail" and not is_error(read):
            bad.append(f"read of the damaged range must fail, got {read!r}")
        if read == "ok":
            if case.read == "any" and case.content:
                want = Path(CORPUS, case.content).read_bytes()
                if hashlib.sha256(want).hexdigest() != res["sha256"]:
                    bad.append("read returned data that differs from the image's real content (silently wrong)")
            elif case.read == "raw":
                want = Path(CORPUS, case.raw_of).read_bytes()
                if hashlib.sha256(want).hexdigest() != res["sha256"]:
                    bad.append("raw backing file was not read as raw bytes")
            elif case.read == "zeros":
                if hashlib.sha256(bytes(res["size"])).hexdigest() != res["sha256"]:
                    bad.append("expected zeros")
    if case.check and not (res["check"] == "corrupt" or is_error(res["check"])):
        bad.append(f"check must refuse the image, got {res['check']!r}")
    if case.rw_open == "fail" and not is_error(res.get("open_rw")):
        bad.append(f"read-write open must be refused, got {res.get('open_rw')!r}")
    return bad


def _id(c):
    return c.name


@pytest.mark.parametrize("case", [c for c in CASES if c.bug not in OPEN_BUGS], ids=_id)
def test_hostile_image(case):
    res = run_probe(os.path.join(CORPUS, case.file), case.format, case.extra.get("snapshot"))
    bad = evaluate(case, res)
    _results[case.name] = "refused" if not bad else "FAILED"
    assert not bad, f"{case.name} ({case.why}):\n  " + "\n  ".join(bad) + f"\n  probe: {json.dumps(res)[:1500]}"


def test_corpus_size():
    vdk = [c for c in CASES if c.format == "vdk"]
    assert len(vdk) >= 40, f"only {len(vdk)} hostile vdk images"
    assert sum(c.format == "qcow2" for c in CASES) >= 30


# ----------------------------------------------------------------------------- the CLI
CLI_SAMPLE = ["bad-magic", "version-2", "incompat-unknown-bit", "cluster-bits-max", "l1-entries-overflow",
              "l1-beyond-eof", "snapshot-count-huge", "refcount-table-zero", "backing-etc-passwd", "backing-loop",
              "chain-65-deep", "l2-checksum", "data-checksum", "comp-garbage", "comp-bomb", "truncated-half",
              "snap-name-length-huge", "l2-overlapping-data", "q-bad-magic", "q-l1-size-huge", "q-refcount-table-zero",
              "q-comp-garbage"]


def _vdisk() -> list[str]:
    exe = Path(sys.executable).parent / "vdisk"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vdisk.cli"]


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_hostile_cli(name, tmp_path):
    case = next(c for c in CASES if c.name == name)
    src = os.path.join(CORPUS, case.file)
    env = {k: v for k, v in os.environ.items() if k not in ("VDISK_BACKING_DIRS", "VDISK_DEBUG")}
    out = {}
    for cmd in (["info", "-f", case.format, src], ["check", "-f", case.format, src],
                ["convert", "-f", case.format, "-O", "raw", src, str(tmp_path / "out.raw")]):
        r = subprocess.run(_vdisk() + cmd, capture_output=True, text=True, timeout=60, env=env)
        out[cmd[0]] = r
        assert "Traceback" not in r.stderr, f"vdisk {cmd[0]}: traceback:\n{r.stderr}"
        assert "internal error" not in r.stderr, f"vdisk {cmd[0]}: {r.stderr}"
        if r.returncode != 0 and cmd[0] != "check":
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vdisk: "), f"vdisk {cmd[0]}: stderr {r.stderr!r}"
    if case.open == "fail":
        for k in ("info", "check", "convert"):
            if k == "check" and not case.check:
                continue
            if k == "info" and not case.check and out[k].returncode == 0:
                # a chain problem: `info` describes the top image (no guest data is read)
                # and must name the problem as a warning, as qemu-img info does
                err = out[k].stderr.strip().splitlines()
                assert len(err) == 1 and err[0].startswith("vdisk: warning: "), f"vdisk info {name}: {out[k].stderr!r}"
                continue
            assert out[k].returncode != 0, f"vdisk {k} accepted {name}: {out[k].stdout[:300]}"
    if case.check:
        assert out["check"].returncode in (1, 2), f"vdisk check {name} exited {out['check'].returncode}"
    if case.read == "fail":
        assert out["convert"].returncode != 0, f"vdisk convert copied {name} although reading it must fail"
    if out["convert"].returncode == 0 and case.read == "any" and case.content:
        got = (tmp_path / "out.raw").read_bytes()
        want = Path(CORPUS, case.content).read_bytes()
        assert got == want, f"vdisk convert of {name} produced wrong data"


def test_hostile_figures():
    """Runs last in this file: record how many hostile images were refused properly."""
    ran = [c for c in CASES if c.bug not in OPEN_BUGS]
    refused = sum(1 for v in _results.values() if v == "refused")
    figures.record("hostile", corpus=len(CASES), vdk_images=sum(c.format == "vdk" for c in CASES),
                   qcow2_images=sum(c.format == "qcow2" for c in CASES), run=len(_results),
                   refused=refused, failures=len(_results) - refused, open_bug_cases=len(CASES) - len(ran),
                   cli_sample=len(CLI_SAMPLE), cli_commands=3 * len(CLI_SAMPLE))
