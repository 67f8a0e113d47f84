"""Hostile VHD and VDI images: a generated corpus (tests/hostile/gen_vhd_vdi.py) and a
bounded deterministic fuzzer.

Each corpus image is opened in a child process (tests/hostile/probe.py, the probe of
tests/test_hostile.py) under an address-space limit: open with the chain, read
everything, block_status, check, read-write open.  Every step must end in "ok" or a
named VdiskError -- never another exception, never wrong data -- within the time
and memory limits; the case says whether the open must fail (and with which error).
A sample also goes through the CLI: exit 1 or 2, one line on stderr, no traceback.

The fuzzer (one child process, 1 GiB address-space limit) mutates the valid images
of the corpus -- bytes of the footers, headers, BAT and block map, and truncations --
and runs open, read, block_status, check, writes, zeroes, resize and a reopen on
each: only VdiskError may escape.  ``VDISK_FUZZ_RANDOM=1`` uses a random seed,
``VDISK_FUZZ_EXAMPLES`` sets the number of examples (default 400).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
GEN = HERE / "hostile" / "gen_vhd_vdi.py"
TIME_LIMIT = 1.0
RSS_LIMIT_MIB = 200

sys.path.insert(0, str(HERE / "hostile"))
import gen_vhd_vdi as gen
import judge

CORPUS = tempfile.mkdtemp(prefix="vdisk-hostile-vhd-vdi-")
atexit.register(shutil.rmtree, CORPUS, True)
CASES = gen.generate(CORPUS)


run_probe = judge.run_probe
_is_error = judge.is_error


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_image(case):
    path = os.path.join(CORPUS, case.file)
    with open(path, "rb") as f:
        before = f.read()
    res = run_probe(path, case.format)
    with open(path, "wb") as f:  # the read-write open may repair: later cases see the file as made
        f.write(before)
    assert "fatal" not in res, res
    bad = judge.generic_faults(res, TIME_LIMIT, RSS_LIMIT_MIB)
    opened = res["open"] == "ok"
    if case.open == "fail" and opened:
        bad.append("opened, but must be refused at open")
    if case.error and not opened and not res["open"].startswith(case.error + ":"):
        bad.append(f"refused with {res['open']}, expected {case.error}")
    if opened:
        if res.get("read") != "ok":
            bad.append(f"read failed: {res.get('read')}")
        elif case.content:
            want = Path(CORPUS, case.content).read_bytes()
            if hashlib.sha256(want).hexdigest() != res["sha256"] or len(want) != res["size"]:
                bad.append("read returned data that differs from the image's real content (silently wrong)")
        if _is_error(res.get("block_status")):
            bad.append(f"block_status failed on an image that opened: {res['block_status']}")
    if case.check and not (res["check"] == "corrupt" or _is_error(res["check"])):
        bad.append(f"check must refuse the image, got {res['check']!r}")
    assert not bad, f"{case.name} ({case.why}):\n  " + "\n  ".join(bad) + f"\n  probe: {json.dumps(res)[:1500]}"


def test_corpus_covers_both_formats():
    fmts = [c.format for c in CASES]
    assert fmts.count("vpc") >= 30 and fmts.count("vdi") >= 20
    assert sum(c.open == "fail" for c in CASES) >= 45


CLI_SAMPLE = ["vhd-footer-checksum", "vhd-bat-overlap", "vhd-child-outside", "vhd-entries-huge",
              "vdi-map-duplicate", "vdi-blocks_in_image-fffffff0", "vdi-image_type-4"]


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_hostile_cli(name, run_vdisk, tmp_path):
    case = next(c for c in CASES if c.name == name)
    p = tmp_path / case.file
    shutil.copy(os.path.join(CORPUS, case.file), p)
    for args in (["info", p], ["check", p], ["convert", "-O", "raw", p, tmp_path / "out.raw"]):
        r = run_vdisk(*args, expect=None, env={"VDISK_BACKING_DIRS": ""})
        if args[0] == "info" and name == "vhd-child-outside":  # info shows the image, warns of its parent
            assert r.returncode == 0 and "outside the allowed directories" in r.stderr, r.stderr
            continue
        assert r.returncode in (1, 2), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vdisk: "), r.stderr


def test_fuzz():
    n = int(os.environ.get("VDISK_FUZZ_EXAMPLES", "400"))
    seed = str(random.randrange(1 << 30)) if os.environ.get("VDISK_FUZZ_RANDOM") == "1" else ""
    r = subprocess.run([sys.executable, str(GEN), "--fuzz", CORPUS, str(n), seed], capture_output=True, text=True,
                       timeout=1200, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["iterations"] == n
    assert not stats["failures"], f"seed {seed or 'fixed'}: " + "\n".join(stats["failures"])
    assert stats["accepted"] > 0 and stats["refused"] > 0, stats  # the mutations reach both outcomes
    assert stats["slowest"] < 5.0, stats


# ---------------------------------------------------------------------------- power cuts
CRASH_STATES = int(os.environ.get("VDISK_CRASH_STATES", "250"))
SECTOR = 512


def _variant(kind: str, d: str):
    """(image bytes, a function making its parent Image (or None), driver class, size)."""
    from crash.storage import MemStorage

    import vdisk
    from vdisk.block import Image
    from vdisk.drivers import get_driver

    size = 2 << 20
    path = os.path.join(d, f"{kind}.img")

    def parent():
        return None
    if kind == "vpc-child":
        base = os.path.join(d, "base.vhd")
        vdisk.create(base, size, format="vpc", options={"block_size": "65536"})
        with vdisk.open(base) as b:
            b.write(0, random.Random(9).randbytes(size))
        vdisk.create(path, size, format="vpc", backing_file="base.vhd", backing_format="vpc",
                     options={"block_size": "65536"})
        with open(base, "rb") as f:
            pbytes = f.read()

        def parent():  # a new one each time: closing an image closes its backing chain
            return Image(get_driver("vpc").open(MemStorage(pbytes, "base", read_only=True), read_only=True),
                         "base", None)
    elif kind == "vpc":
        vdisk.create(path, size, format="vpc", options={"block_size": "65536"})
    else:
        size = 3 << 20
        vdisk.create(path, size, format="vdi")
    with open(path, "rb") as f:
        return f.read(), parent, get_driver("vpc" if kind.startswith("vpc") else "vdi"), size


@pytest.mark.parametrize("kind", ["vpc", "vpc-child", "vdi"])
def test_power_cuts(kind, tmp_path):
    """Writes, zeroes and flushes on a recorded storage; then power cuts at random
    points (whole writes or torn at sectors, any order since the last flush).  Every
    crash state must open, check without corruption, and read, sector by sector, as
    the last completed flush left it or as one of the writes issued since."""
    from crash.storage import CrashLog, MemStorage, RecordingStorage

    from vdisk.block import Image

    data, parent, cls, size = _variant(kind, str(tmp_path))
    rec = RecordingStorage(data, "crash")
    img = Image(cls.open(rec, read_only=False), "crash", parent())
    rnd = random.Random(f"power-cuts-{kind}")
    model = bytearray(img.read(0, size))
    flushed = [(rec.mark(), bytes(model))]  # (log position after the driver's flush, content)
    ops = []  # (log position before, offset, bytes after the op in its sectors)
    for i in range(40):
        off = rnd.randrange(0, size - 1)
        n = min(rnd.randrange(1, 150_000), size - off)
        before = rec.mark()
        if rnd.random() < 0.25:
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        else:
            img.write(off, rnd.randbytes(n))
            model[off:off + n] = img.read(off, n)
        lo, hi = off // SECTOR * SECTOR, -(-(off + n) // SECTOR) * SECTOR
        ops.append((before, lo, bytes(model[lo:hi])))
        if i % 6 == 5:
            img.flush()
            flushed.append((rec.mark(), bytes(model)))
    img.flush()
    flushed.append((rec.mark(), bytes(model)))
    img.driver.read_only = True  # the run is over: closing must not write anything more
    img.close()
    log = CrashLog(rec.base, rec.log)
    checked = 0
    for k in range(CRASH_STATES):
        st = log.random_state(random.Random(k))
        base_pos, base = max((m, c) for m, c in flushed if m <= st.durable or m == flushed[0][0])
        cands: dict[int, set] = {}
        for pos, lo, after in ops:
            if pos >= st.point or pos < base_pos:
                continue
            for s in range(0, len(after), SECTOR):
                cands.setdefault(lo + s, set()).add(after[s:s + SECTOR])
        for rw in (False, True):
            drv = cls.open(MemStorage(st.data, "state", read_only=not rw), read_only=not rw)
            got = Image(drv, "state", parent())
            try:
                res = got.check()
                assert not res.corruptions, (st.describe(), res.corruptions)
                content = got.read(0, size)
            finally:
                got.driver.read_only = True
                got.close()
            for s in range(0, size, SECTOR):
                sec = content[s:s + SECTOR]
                if sec != base[s:s + SECTOR] and sec not in cands.get(s, ()):
                    pytest.fail(f"{kind}: {st.describe()}: sector {s // SECTOR} holds data that neither the "
                                f"last flush nor any write since left there ({'read-write' if rw else 'read-only'} "
                                "open)", pytrace=False)
        checked += 1
    assert checked == CRASH_STATES
