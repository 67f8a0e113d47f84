"""Every ``vdisk`` command on every format and on chains mixing them, through the CLI.

Each case runs the installed ``vdisk`` script (the ``run_vdisk`` fixture) on a small
image or chain and checks the real outcome: the exit code, and the guest content
afterwards, read back in-process through :func:`vdisk.open` and, where QEMU can read
every image involved (raw and qcow2), with ``qemu-img compare`` against a plain file
holding the expected bytes.  A refusal must be one line on stderr starting
``vdisk: ``, exit 1, no traceback and no "internal error".

Kinds of image (top first): ``raw``, ``vdk``, ``qcow2``, and chains such as
``vdk/qcow2`` (a vdk overlay on a qcow2 image) or ``qcow2/vdk/raw``.  Every layer
writes its own 64 KiB chunks of data and of zeros (zeros that hide data below), so
that which layer must answer for each chunk is known (``vdisk map`` is held to it).

Cases where vdisk is wrong fail; none is marked xfail or skipped.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import vdisk
from vdisk.drivers.base import Status

CHUNK = 64 << 10
SIZE = 2 << 20
NCHUNKS = SIZE // CHUNK
MiB = 1 << 20

# what each level writes, level 0 being the base: (data chunks, zero chunks)
LEVEL_WRITES = [
    (list(range(16)), [10]),
    ([4, 5, 6, 7, 20, 21], [2, 3]),
    ([6, 7, 8, 9, 21, 22], [12, 20]),
]

SINGLE = ["raw", "vdk", "qcow2", "vmdk", "vpc", "vdi"]
CHAINS = ["vdk/qcow2", "qcow2/vdk", "vdk/raw", "qcow2/raw", "vdk/qcow2/raw", "qcow2/vdk/raw", "vmdk/vmdk",
          "vdk/vmdk", "vpc/vpc", "vdk/vdi"]
KINDS = SINGLE + CHAINS
WRITABLE_TOP = [k for k in KINDS if not k.startswith("raw")]  # snapshots, backing files
QEMU_FORMATS = {"raw", "qcow2", "vmdk", "vpc", "vdi"}


def kind_id(kind: str) -> str:
    return kind.replace("/", "-over-")


def chunk_data(level: int, chunk: int) -> bytes:
    return random.Random(f"vdisk-matrix-{level}-{chunk}").randbytes(CHUNK)


@dataclass
class Chain:
    dir: Path
    layers: list[tuple[Path, str]]  # (path, format), top first
    models: list[bytes]  # guest content of each layer read through its chain, top first
    owner: list[tuple[int, str] | None]  # per chunk of the top: (depth, "data" | "zero") of who answers

    @property
    def top(self) -> Path:
        return self.layers[0][0]

    @property
    def fmt(self) -> str:
        return self.layers[0][1]

    @property
    def model(self) -> bytes:
        return self.models[0]

    def qemu_reads(self, depth: int = 0) -> bool:
        # (QEMU reads a differencing VHD as if it had no parent)
        return all(fmt in QEMU_FORMATS for _, fmt in self.layers[depth:]) and \
            not any(fmt == "vpc" for _, fmt in self.layers[depth:-1])

    def expected(self, data: bytes | None = None, name: str = "expected.raw") -> Path:
        """A plain file with ``data`` (default: the top's content), for compare."""
        p = self.dir / name
        p.write_bytes(self.model if data is None else data)
        return p


def build(kind: str, d: Path) -> Chain:
    fmts = kind.split("/")[::-1]  # base first
    names = {1: ["top"], 2: ["base", "top"], 3: ["base", "mid", "top"]}[len(fmts)]
    model = bytearray(SIZE)
    models: list[bytes] = []
    layers: list[tuple[Path, str]] = []
    owner: list[tuple[int, str] | None] = [None] * NCHUNKS
    below: tuple[Path, str] | None = None
    for level, (fmt, name) in enumerate(zip(fmts, names)):
        path = d / f"{name}.{fmt}"
        if below is None:
            vdisk.create(str(path), SIZE, format=fmt)
        else:
            vdisk.create(str(path), None, format=fmt, backing_file=str(below[0]), backing_format=below[1])
        data_chunks, zero_chunks = LEVEL_WRITES[level]
        with vdisk.open(str(path), format=fmt) as img:
            for c in data_chunks:
                buf = chunk_data(level, c)
                img.write(c * CHUNK, buf)
                model[c * CHUNK:(c + 1) * CHUNK] = buf
                owner[c] = (level, "data")
            for c in zero_chunks:
                img.write_zeroes(c * CHUNK, CHUNK)
                model[c * CHUNK:(c + 1) * CHUNK] = bytes(CHUNK)
                owner[c] = (level, "zero")
            img.flush()
        models.append(bytes(model))
        layers.append((path, fmt))
        below = (path, fmt)
    top_level = len(fmts) - 1
    return Chain(d, layers[::-1], models[::-1],
                 [None if o is None else (top_level - o[0], o[1]) for o in owner])


@pytest.fixture
def make_chain(image_dir):
    return lambda kind: build(kind, image_dir)


# ---------------------------------------------------------------------------- helpers
def read_all(path, **kw) -> bytes:
    with vdisk.open(str(path), read_only=True, **kw) as img:
        return img.read(0, img.size)


def image_size(path) -> int:
    with vdisk.open(str(path), read_only=True) as img:
        return img.size


def assert_content(path, want: bytes, what: str = "") -> None:
    got = read_all(path)
    assert len(got) == len(want), f"{what or path}: size {len(got)}, expected {len(want)}"
    if got != want:
        first = next(i for i in range(len(want)) if got[i] != want[i])
        pytest.fail(f"{what or path}: content differs from the expected, first at offset {first} "
                    f"(chunk {first // CHUNK})", pytrace=False)


def assert_clean(path) -> None:
    """The image's own check (vdk, qcow2) finds nothing."""
    with vdisk.open(str(path), read_only=True, backing=False) as img:
        if img.format == "raw":
            return
        res = img.check()
        assert res.corruptions == [] and res.leaks == [], (str(path), res)


def qemu(*args, expect: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120)
    if expect is not None and r.returncode != expect:
        pytest.fail(f"`qemu-img {' '.join(map(str, args))}` exited {r.returncode}, expected {expect}\n"
                    f"--- stdout\n{r.stdout}--- stderr\n{r.stderr}", pytrace=False)
    return r


def qemu_compare(path, fmt: str, expected: Path) -> None:
    """qemu-img reads ``path`` (and its chain) as ``expected``, sizes included."""
    qemu("compare", "-f", fmt, "-F", "raw", path, expected)
    q = json.loads(qemu("info", "--output", "json", "-f", fmt, path).stdout)
    assert q["virtual-size"] == expected.stat().st_size, f"qemu-img: {path} has {q['virtual-size']} bytes"


def assert_ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r


def assert_refused(r: subprocess.CompletedProcess, pattern: str | None = None, code: int = 1) -> str:
    """A clean refusal: exit ``code``, one line ``vdisk: ...`` on stderr, no traceback."""
    err = r.stderr
    assert "Traceback" not in err, f"traceback on stderr:\n{err}"
    assert "internal error" not in err, f"internal error: {err.strip()}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vdisk: "), f"stderr is not one line 'vdisk: ...':\n{err}"
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr: {err.strip()}"
    if pattern is not None:
        assert re.search(pattern, lines[0], re.IGNORECASE), f"message {lines[0]!r} does not match {pattern!r}"
    return lines[0]


@pytest.fixture
def vd(run_vdisk):
    """``vd(*args)``: run vdisk expecting exit 0 and no traceback; ``vd(..., expect=N)`` or
    ``expect=None`` as ``run_vdisk``."""
    def run(*args, expect=0, **kw):
        r = run_vdisk(*args, expect=expect, **kw)
        return r if expect is None else assert_ok(r)
    return run


def info_json(vd, path, *extra):
    return json.loads(vd("info", "--output", "json", *extra, path).stdout)


def backing_of(path) -> tuple[str, str] | None:
    """(file name, format) of the image's backing reference, read in-process."""
    with vdisk.open(str(path), read_only=True, backing=False) as img:
        ref = img.driver.backing_ref
        return None if ref is None else (Path(ref.filename).name, ref.format)


def own_data_chunks(path) -> list[int]:
    """Chunks the image itself (not its backing chain) holds data for."""
    with vdisk.open(str(path), read_only=True, backing=False) as img:
        return sorted({c for e in img.block_status(0, img.size, chain=False) if e.status == Status.DATA
                       for c in range(e.offset // CHUNK, (e.offset + e.length + CHUNK - 1) // CHUNK)})


def snapshot_names(path) -> list[str]:
    with vdisk.open(str(path), read_only=True, backing=False) as img:
        return [s.name for s in img.snapshot_list()]


def write_chunks(path, writes: dict[int, bytes | None], model: bytes) -> bytes:
    """Write whole chunks in-process (None: write zeroes); the new model."""
    m = bytearray(model)
    with vdisk.open(str(path)) as img:
        for c, data in writes.items():
            if data is None:
                img.write_zeroes(c * CHUNK, CHUNK)
                data = bytes(CHUNK)
            else:
                img.write(c * CHUNK, data)
            m[c * CHUNK:(c + 1) * CHUNK] = data
    return bytes(m)


def other_raw(d: Path, name: str = "other.raw") -> tuple[Path, bytes]:
    """A raw image with different data in every chunk."""
    data = random.Random("vdisk-matrix-other").randbytes(SIZE)
    p = d / name
    p.write_bytes(data)
    return p, data


# Each `vdisk` run costs ~0.2 s of CPU, nearly all of it start-up: commands that
# work on the top image only run on fewer kinds than those that read or rewrite chains.
SNAP_KINDS = ["vdk", "qcow2", "qcow2/raw", "vdk/qcow2/raw"]
SOME = SINGLE + ["vdk/qcow2", "qcow2/vdk/raw"]


def kinds(ks):
    return pytest.mark.parametrize("kind", ks, ids=kind_id)


parametrize_kinds = kinds(KINDS)
parametrize_writable = kinds(WRITABLE_TOP)


# ---------------------------------------------------------------------------- create
@pytest.mark.parametrize("fmt", SINGLE)
def test_create(vd, image_dir, fmt, require_qemu):
    p = image_dir / f"new.{fmt}"
    vd("create", "-f", fmt, p, "3M")
    assert_content(p, bytes(3 * MiB))
    info = info_json(vd, p)
    assert (info["format"], info["virtual-size"], info.get("backing-filename")) == (fmt, 3 * MiB, None), info
    if fmt in QEMU_FORMATS:
        q = json.loads(qemu("info", "--output", "json", "-f", fmt, p).stdout)
        assert q["virtual-size"] == 3 * MiB
        if fmt in ("qcow2", "vmdk"):
            qemu("check", p)
    assert_refused(vd("create", "-f", fmt, p, "1M", expect=None), "exist")
    assert image_size(p) == 3 * MiB


OVERLAY_CASES = [(k, f) for k in SINGLE for f in ("vdk", "qcow2")] + [("vdk/qcow2/raw", "qcow2")]


@pytest.mark.parametrize("kind,fmt", OVERLAY_CASES, ids=[f"{f}-over-{kind_id(k)}" for k, f in OVERLAY_CASES])
def test_create_overlay(vd, make_chain, kind, fmt, require_qemu):
    """An overlay made by the CLI (-b, -F) reads as what it covers."""
    ch = make_chain(kind)
    p = ch.dir / f"overlay.{fmt}"
    vd("create", "-q", "-f", fmt, "-b", ch.top, "-F", ch.fmt, p)
    assert_content(p, ch.model)
    assert image_size(p) == SIZE
    assert backing_of(p) == (ch.top.name, ch.fmt)
    if fmt in QEMU_FORMATS and ch.qemu_reads():
        qemu_compare(p, fmt, ch.expected())
    assert_clean(p)


# ---------------------------------------------------------------------------- info, map, check
@parametrize_kinds
def test_info(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    infos = info_json(vd, ch.top, "--backing-chain")
    assert isinstance(infos, list) and len(infos) == len(ch.layers), infos
    for i, (info, (path, fmt)) in enumerate(zip(infos, ch.layers)):
        assert Path(info["filename"]).name == path.name
        assert info["format"] == fmt
        assert info["virtual-size"] == SIZE
        if i + 1 < len(ch.layers):
            assert Path(info["backing-filename"]).name == ch.layers[i + 1][0].name
            assert info["backing-filename-format"] == ch.layers[i + 1][1]
        else:
            assert info.get("backing-filename") is None
    if kind in ("vdk", "qcow2"):  # human output
        human = vd("info", ch.top).stdout
        assert re.search(rf"file format:\s*{ch.fmt}\b", human), human
    if ch.qemu_reads():
        q = json.loads(qemu("info", "--output", "json", "--backing-chain", ch.top).stdout)
        assert [x["format"] for x in q] == [fmt for _, fmt in ch.layers]


@parametrize_kinds
def test_map(vd, make_chain, kind):
    ch = make_chain(kind)
    extents = json.loads(vd("map", "--output", "json", ch.top).stdout)
    pos = 0
    for e in extents:
        assert e["start"] == pos, f"extents do not cover the disk without gaps: {extents}"
        pos += e["length"]
    assert pos == SIZE, extents
    if kind == "vdk":
        vd("map", ch.top)  # human output

    def covering(c):
        return [e for e in extents if e["start"] < (c + 1) * CHUNK and e["start"] + e["length"] > c * CHUNK]

    for c, own in enumerate(ch.owner):
        if own is None:
            continue
        depth, what = own
        for e in covering(c):
            if what == "data":
                assert e["data"] and not e["zero"] and e["depth"] == depth, (
                    f"chunk {c} holds data of depth {depth}, map says {e}")
            elif ch.layers[depth][1] != "raw":  # raw may store written zeros as data
                assert e["zero"] and not e["data"] and e["depth"] == depth, (
                    f"chunk {c} was zeroed at depth {depth}, map says {e}")


@kinds(SOME)
def test_check(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    if ch.fmt == "raw":
        assert_refused(vd("check", ch.top, expect=None), "check")
        return
    res = json.loads(vd("check", "--output", "json", ch.top).stdout)
    assert res["vdisk-result"] == "clean" and res["corruptions"] == 0 and res["leaks"] == 0, res
    if ch.fmt in ("qcow2", "vmdk") and ch.qemu_reads():
        qemu("check", ch.top)


@parametrize_kinds
def test_compare(vd, make_chain, kind):
    ch = make_chain(kind)
    good = ch.expected()
    vd("compare", "-F", "raw", ch.top, good)
    if kind not in SINGLE:
        return
    bad = bytearray(ch.model)
    off = 7 * CHUNK + 1000
    bad[off] ^= 0x5A
    badp = ch.expected(bytes(bad), "bad.raw")
    r = vd("compare", "-F", "raw", ch.top, badp, expect=1)
    assert str(off - off % 512) in r.stdout + r.stderr, (r.stdout, r.stderr)
    if kind == "vdk":
        vd("compare", "-f", "raw", "-F", ch.fmt, good.name, ch.top.name, cwd=ch.dir)  # other order, relative
        vd("compare", "-F", "raw", ch.top, ch.expected(ch.model + bytes(CHUNK), "longer.raw"))  # extra zeros
        vd("compare", "-s", "-F", "raw", ch.top, ch.dir / "longer.raw", expect=1)


# ---------------------------------------------------------------------------- convert, resize
MEASURE_CASES = {("raw", "qcow2"), ("vdk", "qcow2"), ("qcow2", "vdk"), ("qcow2/raw", "qcow2"),
                 ("qcow2/vdk/raw", "qcow2")}
CONVERT_CASES = [(k, out) for k in SINGLE for out in SINGLE if out != k] + [(k, "qcow2") for k in CHAINS]


@pytest.mark.parametrize("kind,out", CONVERT_CASES, ids=[f"{kind_id(k)}-to-{o}" for k, o in CONVERT_CASES])
def test_convert(vd, make_chain, kind, out, require_qemu):
    ch = make_chain(kind)
    dst = ch.dir / f"converted.{out}"
    measured = None
    if (kind, out) in MEASURE_CASES:
        # measure's required size holds what convert makes; for qcow2 it is qemu-img's figure
        measured = json.loads(vd("measure", "-O", out, "--output", "json", ch.top).stdout)
        assert set(measured) == {"required", "fully-allocated"}, measured
        assert 0 < measured["required"] <= measured["fully-allocated"], measured
        if out == "qcow2" and ch.qemu_reads():
            q = json.loads(qemu("measure", "-O", out, "--output", "json", ch.top).stdout)
            assert measured == {k: q[k] for k in measured}, (measured, q)
    vd("convert", "-q", "-O", out, ch.top, dst)
    if measured is not None:
        made = dst.stat().st_size
        assert made <= measured["required"], f"convert made {made} bytes, measure said {measured}"
    assert_content(dst, ch.model, "converted image")
    assert vdisk.detect_format(str(dst)) == out and backing_of(dst) is None
    if out in QEMU_FORMATS:
        qemu_compare(dst, out, ch.expected())
    if out in ("qcow2", "vmdk"):
        qemu("check", dst)
    assert_clean(dst)
    assert_content(ch.top, ch.model, "source after convert")


@kinds(SINGLE + ["qcow2/vdk", "vdk/qcow2/raw"])
def test_resize(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    vd("resize", "-q", ch.top, "+1M")
    grown = ch.model + bytes(MiB)
    assert_content(ch.top, grown, "grown image")
    if ch.qemu_reads():
        qemu_compare(ch.top, ch.fmt, ch.expected(grown, "grown.raw"))
    if kind == "vdk":
        assert_refused(vd("resize", ch.top, "1M", expect=None), "shrink")
        assert image_size(ch.top) == SIZE + MiB
    vd("resize", "-q", "--shrink", ch.top, "1M")
    assert_content(ch.top, ch.model[:MiB], "shrunk image")
    if ch.qemu_reads():
        qemu_compare(ch.top, ch.fmt, ch.expected(ch.model[:MiB], "shrunk.raw"))
    assert_clean(ch.top)
    for (path, _), model in zip(ch.layers[1:], ch.models[1:]):
        assert_content(path, model, f"{path.name} (below the resized image)")


# ---------------------------------------------------------------------------- snapshots
SNAPSHOT_KEYS = {"id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec",
                 "icount", "vdisk-size", "vdisk-generation", "vdisk-unique-bytes", "vdisk-holds"}


RAW_SNAPSHOT_CASES = {
    "create": ("create", [], ["s1"]),
    "delete": ("delete", [], ["s1"]),
    "revert": ("revert", [], ["s1"]),
    "rename": ("rename", [], ["s1", "s2"]),
}


def test_snapshot_list_on_raw_lists_none_as_qemu_img(vd, make_chain):
    """A raw image has no snapshots to list: exit 0 and nothing, as qemu-img snapshot -l."""
    ch = make_chain("raw")
    assert json.loads(vd("snapshot", "list", "--output", "json", ch.top).stdout) == []
    assert vd("snapshot", "list", ch.top).stdout.strip() == "no snapshots"
    assert subprocess.run(["qemu-img", "snapshot", "-l", str(ch.top)], capture_output=True).returncode == 0


@pytest.mark.parametrize("case", sorted(RAW_SNAPSHOT_CASES))
def test_snapshot_on_raw_is_refused(vd, make_chain, case):
    """raw has no internal snapshots: every snapshot command says so (exit 1, one line)."""
    sub, opts, name = RAW_SNAPSHOT_CASES[case]
    ch = make_chain("raw")
    assert_refused(vd("snapshot", sub, *opts, ch.top, *name, expect=None), r"snapshot|not supported")
    assert_content(ch.top, ch.model)


@kinds(SNAP_KINDS)
def test_snapshot_create(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    vd("snapshot", "create", ch.top, "s1")
    assert snapshot_names(ch.top) == ["s1"]
    later = write_chunks(ch.top, {0: chunk_data(9, 0), 7: None, 25: chunk_data(9, 25)}, ch.model)
    assert read_all(ch.top, snapshot="s1") == ch.model, "snapshot s1 does not hold the state it was taken of"
    if kind in SINGLE:
        vd("compare", "-q", "-F", "raw", f"{ch.top}@s1", ch.expected())
    assert_content(ch.top, later)
    assert_clean(ch.top)
    if ch.fmt == "qcow2" and ch.qemu_reads():
        assert re.search(r"\bs1\b", qemu("snapshot", "-l", ch.top).stdout)
        qemu("check", ch.top)
        qemu_compare(ch.top, ch.fmt, ch.expected(later, "later.raw"))
    if kind == "qcow2":  # each refusal on one format (the other has its own case)
        assert_refused(vd("snapshot", "create", ch.top, "s1", expect=None), "exist")


@kinds(SNAP_KINDS)
def test_snapshot_list(vd, make_chain, kind):
    ch = make_chain(kind)
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
        img.write(0, chunk_data(9, 0))
        img.snapshot_create("s2")
    snaps = json.loads(vd("snapshot", "list", "--output", "json", ch.top).stdout)
    assert [s["name"] for s in snaps] == ["s1", "s2"], snaps
    for s in snaps:
        assert SNAPSHOT_KEYS <= set(s), f"snapshot list JSON lacks {SNAPSHOT_KEYS - set(s)}: {s}"
        assert s["vdisk-size"] == SIZE and s["vdisk-holds"] == 0 and isinstance(s["id"], str), s
    if ch.fmt == "qcow2" and ch.qemu_reads():
        q = json.loads(qemu("info", "--output", "json", ch.top).stdout)["snapshots"]
        assert [(x["id"], x["name"]) for x in q] == [(x["id"], x["name"]) for x in snaps], (q, snaps)
    if kind == "qcow2":
        human = vd("snapshot", "list", ch.top).stdout
        assert re.search(r"\bs1\b", human) and re.search(r"\bs2\b", human), human
        info = info_json(vd, ch.top)
        assert [s["name"] for s in info["snapshots"]] == ["s1", "s2"], info["snapshots"]


@kinds(SNAP_KINDS)
def test_snapshot_delete(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    later = write_chunks(ch.top, {3: chunk_data(9, 3), 6: None}, ch.model)
    vd("snapshot", "delete", ch.top, "s1")
    assert snapshot_names(ch.top) == []
    assert_content(ch.top, later)
    assert_clean(ch.top)
    if ch.fmt == "qcow2" and ch.qemu_reads():
        qemu("check", ch.top)
        qemu_compare(ch.top, ch.fmt, ch.expected(later, "later.raw"))
    if kind == "vdk":
        assert_refused(vd("snapshot", "delete", ch.top, "s1", expect=None), "s1")


@kinds(SNAP_KINDS)
def test_snapshot_revert(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    write_chunks(ch.top, {0: chunk_data(9, 0), 5: None, 21: None, 30: chunk_data(9, 30)}, ch.model)
    vd("snapshot", "revert", ch.top, "s1")
    assert_content(ch.top, ch.model, "reverted image")
    assert snapshot_names(ch.top) == ["s1"]
    assert_clean(ch.top)
    if ch.qemu_reads():
        qemu_compare(ch.top, ch.fmt, ch.expected())
        qemu("check", ch.top)
    if kind == "qcow2":
        assert_refused(vd("snapshot", "revert", ch.top, "nosuch", expect=None), "nosuch")


@kinds(["vdk", "qcow2", "qcow2/vdk", "vdk/qcow2/raw"])
def test_snapshot_rename(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    later = write_chunks(ch.top, {0: chunk_data(9, 0)}, ch.model)
    holder = None
    if ch.fmt == "vdk":  # a linked clone names the snapshot by id: it goes on reading it
        holder = ch.dir / "holder.vdk"
        vd("clone", f"{ch.top}@s1", holder)
    vd("snapshot", "rename", ch.top, "s1", "renamed")
    assert snapshot_names(ch.top) == ["renamed"]
    assert read_all(ch.top, snapshot="renamed") == ch.model
    assert_content(ch.top, later)
    assert_clean(ch.top)
    if holder is not None:
        assert_content(holder, ch.model, "clone of the renamed snapshot")
    if ch.fmt == "qcow2" and ch.qemu_reads():
        out = qemu("snapshot", "-l", ch.top).stdout
        assert re.search(r"\brenamed\b", out) and not re.search(r"\bs1\b", out), out
    if kind == "vdk":
        assert_refused(vd("snapshot", "rename", ch.top, "s1", "x", expect=None), "s1")


# ---------------------------------------------------------------------------- clones
@kinds(SOME + ["qcow2/raw"])
def test_clone_linked(vd, make_chain, kind):
    ch = make_chain(kind)
    c = ch.dir / "clone.vdk"
    vd("clone", ch.top, c)
    assert_content(c, ch.model, "linked clone")
    assert vdisk.detect_format(str(c)) == "vdk" and backing_of(c) == (ch.top.name, ch.fmt)
    if ch.fmt == "vdk":
        # the live state of a vdk image is cloned through a snapshot taken for it
        assert "clone-clone.vdk" in snapshot_names(ch.top)
    write_chunks(c, {1: chunk_data(8, 1), 4: None}, ch.model)
    assert_content(ch.top, ch.model, "source after writing its clone")
    assert_clean(c)
    assert_clean(ch.top)


@kinds(["vdk", "qcow2/raw", "qcow2/vdk/raw"])
def test_clone_full(vd, make_chain, kind):
    ch = make_chain(kind)
    c = ch.dir / "full.vdk"
    vd("clone", "--full", ch.top, c)
    assert_content(c, ch.model, "full clone")
    assert vdisk.detect_format(str(c)) == "vdk" and backing_of(c) is None
    write_chunks(ch.top, {1: chunk_data(8, 1)}, ch.model)
    assert_content(c, ch.model, "full clone after writing its source")
    assert_clean(c)


@kinds(SINGLE + ["vdk/qcow2"])
def test_clone_snapshot(vd, make_chain, kind):
    ch = make_chain(kind)
    c = ch.dir / "clone.vdk"
    if ch.fmt in ("raw", "vmdk", "vpc", "vdi"):  # no internal snapshots
        assert_refused(vd("clone", f"{ch.top}@s1", c, expect=None))
        assert not c.exists()
        return
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    later = write_chunks(ch.top, {0: chunk_data(9, 0), 6: None}, ch.model)
    if ch.fmt == "qcow2":
        # qcow2 cannot record a clone's hold on its snapshot: refused, by design
        assert_refused(vd("clone", f"{ch.top}@s1", c, expect=None), "snapshot")
        assert not c.exists()
        return
    vd("clone", f"{ch.top}@s1", c)
    assert_content(c, ch.model, "clone of s1")
    assert_content(ch.top, later, "source")
    with vdisk.open(str(ch.top), read_only=True, backing=False) as img:
        (s1,) = [s for s in img.snapshot_list() if s.name == "s1"]
        assert s1.holds == 1, s1
    assert_clean(c)


# ---------------------------------------------------------------------------- commit
@kinds(["vdk"] + CHAINS)
def test_commit(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    if len(ch.layers) == 1:
        if kind == "vdk":
            assert_refused(vd("commit", ch.top, expect=None), "backing")
        return
    vd("commit", ch.top)
    base, bfmt = ch.layers[1]
    assert_content(base, ch.model, f"{base.name} after commit (must hold the overlay's data)")
    assert_content(ch.top, ch.model, "overlay after commit")
    assert_clean(base)
    assert_clean(ch.top)
    for (path, _), model in zip(ch.layers[2:], ch.models[2:]):
        assert_content(path, model, f"{path.name} (below the committed-into image)")
    if ch.qemu_reads(1):
        qemu_compare(base, bfmt, ch.expected())
    if ch.qemu_reads():
        qemu_compare(ch.top, ch.fmt, ch.expected())
    assert own_data_chunks(ch.top) == [], "the overlay was not emptied"


def test_commit_into_snapshot_is_refused(vd, make_chain):
    ch = make_chain("vdk")
    c = ch.dir / "clone.vdk"
    vd("clone", ch.top, c)
    write_chunks(c, {1: chunk_data(8, 1)}, ch.model)
    assert_refused(vd("commit", c, expect=None), "snapshot")
    assert_content(ch.top, ch.model)


# ---------------------------------------------------------------------------- rebase, flatten
@parametrize_writable
def test_rebase(vd, make_chain, kind, require_qemu):
    """Onto another image (for a single image: giving it a backing file), content kept."""
    ch = make_chain(kind)
    other, _ = other_raw(ch.dir)
    if ch.fmt == "vmdk":  # a VMDK's parent is a VMDK: parentFileNameHint records no format
        assert_refused(vd("rebase", "-b", other, "-F", "raw", ch.top, expect=None), "must be a VMDK")
        assert_content(ch.top, ch.model, "image whose rebase was refused")
        assert backing_of(ch.top) == (None if len(ch.layers) == 1 else (ch.layers[1][0].name, "vmdk"))
        return
    if ch.fmt in ("vpc", "vdi"):  # a VHD's parent is a VHD; a VDI has none (VirtualBox's differencing: no)
        assert_refused(vd("rebase", "-b", other, "-F", "raw", ch.top, expect=None), "VHD|backing file")
        assert_content(ch.top, ch.model, "image whose rebase was refused")
        assert backing_of(ch.top) == (None if len(ch.layers) == 1 else (ch.layers[1][0].name, ch.layers[1][1]))
        return
    vd("rebase", "-b", other, "-F", "raw", ch.top)
    assert_content(ch.top, ch.model, "rebased image")
    assert backing_of(ch.top) == ("other.raw", "raw")
    assert_clean(ch.top)
    if ch.fmt == "qcow2":
        qemu_compare(ch.top, ch.fmt, ch.expected())
    for (path, _), model in zip(ch.layers[1:], ch.models[1:]):
        assert_content(path, model, f"{path.name} (the old backing chain)")


@kinds(["vdk/qcow2", "qcow2/raw"])
def test_rebase_unsafe(vd, make_chain, kind):
    ch = make_chain(kind)
    other, odata = other_raw(ch.dir)
    vd("rebase", "-u", "-b", other, "-F", "raw", ch.top)
    want = bytearray(odata)
    for c, own in enumerate(ch.owner):
        if own is not None and own[0] == 0:
            want[c * CHUNK:(c + 1) * CHUNK] = ch.model[c * CHUNK:(c + 1) * CHUNK]
    assert_content(ch.top, bytes(want), "unsafely rebased image (its own chunks over the new backing)")


@kinds(["vdk/raw", "qcow2/vdk/raw"])
def test_rebase_none(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    vd("rebase", "-b", "", ch.top)
    assert_content(ch.top, ch.model, "image rebased onto nothing")
    assert backing_of(ch.top) is None
    if ch.fmt == "qcow2":
        qemu_compare(ch.top, ch.fmt, ch.expected())
    assert_clean(ch.top)


@kinds([k for k in CHAINS if k.count("/") == 2])
def test_rebase_skip_middle(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    base, bfmt = ch.layers[2]
    vd("rebase", "-b", base, "-F", bfmt, ch.top)
    assert_content(ch.top, ch.model, "image rebased past its middle layer")
    assert backing_of(ch.top) == (base.name, bfmt)
    if ch.fmt in QEMU_FORMATS and bfmt in QEMU_FORMATS:
        qemu_compare(ch.top, ch.fmt, ch.expected())
    assert_clean(ch.top)


@kinds(["vdk", "vdk/qcow2", "qcow2/vdk/raw"])
def test_rebase_loop_is_refused(vd, make_chain, kind):
    """Rebasing an image onto one whose chain reaches it back: a clean refusal."""
    ch = make_chain(kind)
    victims = [(p, f) for p, f in ch.layers[1:] if f != "raw"] or [ch.layers[0]]
    victim = victims[0][0]
    before = backing_of(victim)
    assert_refused(vd("rebase", "-b", ch.top, "-F", ch.fmt, victim, expect=None), "loop")
    assert backing_of(victim) == before
    assert_content(ch.top, ch.model)


@parametrize_kinds
def test_flatten(vd, make_chain, kind, require_qemu):
    ch = make_chain(kind)
    if ch.fmt == "raw":
        assert_refused(vd("flatten", ch.top, expect=None))
        return
    vd("flatten", ch.top)
    assert_content(ch.top, ch.model, "flattened image")
    assert backing_of(ch.top) is None
    if ch.fmt == "qcow2":
        qemu_compare(ch.top, ch.fmt, ch.expected())
        qemu("check", ch.top)
    assert_clean(ch.top)
    for (path, _), model in zip(ch.layers[1:], ch.models[1:]):
        assert_content(path, model, f"{path.name} (below the flattened image)")


def test_flatten_with_snapshots_is_refused(vd, make_chain):
    ch = make_chain("vdk/qcow2")
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    assert_refused(vd("flatten", ch.top, expect=None), "snapshot")
    assert_content(ch.top, ch.model)
    assert read_all(ch.top, snapshot="s1") == ch.model


# ---------------------------------------------------------------------------- rm
@kinds(["raw", "vdk", "qcow2", "qcow2/vdk/raw"])
def test_rm(vd, make_chain, kind):
    ch = make_chain(kind)
    vd("rm", ch.top)
    assert not ch.top.exists()
    for (path, _), model in zip(ch.layers[1:], ch.models[1:]):
        assert_content(path, model, f"{path.name} (below the removed image)")
        assert_clean(path)
    if kind == "vdk":
        assert_refused(vd("rm", ch.top, expect=None), "no such file")


@kinds(["vdk/qcow2", "qcow2/vdk/raw"])
def test_rm_refuses_dependants(vd, make_chain, kind):
    """An image an overlay names as its backing file is not removed (-r removes the family)."""
    ch = make_chain(kind)
    base = ch.layers[-1][0]
    assert_refused(vd("rm", base, expect=None), ch.layers[-2][0].name)
    assert base.exists()
    assert_content(ch.top, ch.model)
    vd("rm", "-r", base)
    assert [p for p, _ in ch.layers if p.exists()] == []


def test_rm_clone_releases_its_hold(vd, make_chain):
    ch = make_chain("vdk")
    c = ch.dir / "clone.vdk"
    with vdisk.open(str(ch.top)) as img:
        img.snapshot_create("s1")
    vd("clone", f"{ch.top}@s1", c)
    vd("snapshot", "delete", ch.top, "s1")  # hidden: the clone still reads it
    assert snapshot_names(ch.top) == []
    assert_content(c, ch.model, "clone of a deleted snapshot")
    assert_refused(vd("rm", ch.top, expect=None), "clone")  # the clone holds the hidden snapshot
    vd("rm", c)
    assert not c.exists()
    with vdisk.open(str(ch.top), read_only=True, backing=False) as img:
        assert not img.driver.has_snapshots(), "the deleted snapshot outlived its last clone"
    assert_clean(ch.top)
    assert_content(ch.top, ch.model)

