"""The ``vdisk`` command line: click's CliRunner for most cases, the installed console
script (subprocess) where "no traceback, one line" must hold for real, and qemu-img
as the reference for ``compare``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import click
import pytest
from click.testing import CliRunner
from imagetools import allocated, run
from imagetools import make_raw as write_raw
from imagetools import read_all as content

import vdisk
from vdisk.cli import EXTENSION_COMMANDS, cli, parse_o_options
from vdisk.errors import UsageError

MiB = 1 << 20


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vdisk: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], stderr


# ---------------------------------------------------------------------------- global
def test_version_and_help():
    assert run("--version").stdout.strip() == f"vdisk {vdisk.__version__}"
    out = run("--help").stdout
    for name in ("create", "info", "map", "check", "convert", "compare", "resize"):
        assert name in out


def test_o_options_split_into_create_arguments():
    kw = parse_o_options(["cluster_size=64K,compression=zstd", "backing_fmt=vdk,lazy=on,name=a,,b"])
    assert kw == {
        "cluster_size": 65536,
        "compression": "zstd",
        "backing_format": "vdk",
        "options": {"lazy": "on", "name": "a,b"},
    }
    with pytest.raises(UsageError, match="key=value"):
        parse_o_options(["cluster_size"])
    with pytest.raises(UsageError, match="invalid size"):
        parse_o_options(["cluster_size=huge"])


# ---------------------------------------------------------------------------- create / info
def test_create_and_info_raw(image_dir):
    img = image_dir / "a.raw"
    r = run("create", "-f", "raw", img, "10M")
    assert r.stdout.strip() == f"Formatting '{img}', fmt=raw size={10 * MiB}"
    assert os.path.getsize(img) == 10 * MiB
    info = json.loads(run("info", "--output", "json", img).stdout)
    assert info["format"] == "raw"
    assert info["virtual-size"] == 10 * MiB
    assert info["filename"] == str(img)
    assert info["backing-filename"] is None and info["snapshots"] == []
    human = run("info", img).stdout
    assert "file format: raw" in human
    assert f"virtual size: 10 MiB ({10 * MiB} bytes)" in human
    assert run("create", "-q", "-f", "raw", image_dir / "q.raw", "1M").stdout == ""


def test_create_and_info_vdk_with_options(image_dir):
    img = image_dir / "a.vdk"
    r = run("create", img, "1G", "-o", "cluster_size=128K,compression=zstd")
    assert "fmt=vdk" in r.stdout and "cluster_size=131072" in r.stdout
    info = json.loads(run("info", "--output", "json", img).stdout)
    assert (info["format"], info["virtual-size"], info["cluster-size"], info["vdisk-compression"]) == (
        "vdk", 1 << 30, 128 * 1024, "zstd"
    )
    assert 0 < info["actual-size"] < 4 * MiB


def test_info_backing_chain(image_dir):
    base = image_dir / "base.vdk"
    top = image_dir / "top.vdk"
    run("create", base, "4M")
    run("create", "-b", base, "-F", "vdk", top)
    chain = json.loads(run("info", "--backing-chain", "--output", "json", top).stdout)
    assert [c["virtual-size"] for c in chain] == [4 * MiB, 4 * MiB]
    assert chain[0]["backing-filename"] == "base.vdk" and chain[0]["backing-filename-format"] == "vdk"
    assert os.path.samefile(chain[0]["full-backing-filename"], base)
    assert chain[1]["backing-filename"] is None
    human = run("info", top).stdout
    assert "backing file: base.vdk" in human and "backing file format: vdk" in human
    # a missing backing file: info still describes the overlay, with a warning
    os.unlink(base)
    r = run("info", "--output", "json", top)
    assert json.loads(r.stdout)["backing-filename"] == "base.vdk"
    assert r.stderr.startswith("vdisk: warning:")
    r = run("info", "--backing-chain", top, code=1)
    assert_one_line_error(r.stderr, "base.vdk")


def test_create_errors_are_one_line(image_dir):
    r = run("create", "-f", "raw", image_dir / "x.raw", "12Q", code=1)
    assert_one_line_error(r.stderr, "12Q")
    assert not (image_dir / "x.raw").exists()
    run("create", "-f", "raw", image_dir / "x.raw", "1M")
    r = run("create", "-f", "raw", image_dir / "x.raw", "1M", code=1)
    assert_one_line_error(r.stderr, "exists")
    r = run("create", "-f", "nosuchformat", image_dir / "y.img", "1M", code=1)
    assert_one_line_error(r.stderr, "nosuchformat")
    r = run("create", "-f", "raw", image_dir / "z.raw", code=1)
    assert_one_line_error(r.stderr, "size")
    r = run("create", "-f", "raw", "-o", "compression=zstd", image_dir / "c.raw", "1M", code=1)
    assert_one_line_error(r.stderr, "compress")


def test_missing_file_is_one_line(image_dir):
    for cmd in (["info"], ["map"], ["check"], ["resize"], ["convert"]):
        args = cmd + [image_dir / "nope.img"] + (["1M"] if cmd == ["resize"] else [])
        args += [image_dir / "out.raw"] if cmd == ["convert"] else []
        r = run(*args, code=1)
        assert_one_line_error(r.stderr, "nope.img", "no such file")


def test_malformed_image_is_one_line(image_dir):
    bad = image_dir / "bad.vdk"
    bad.write_bytes(os.urandom(256 * 1024))
    for args in (["info", "-f", "vdk", bad], ["map", "-f", "vdk", bad], ["check", "-f", "vdk", bad],
                 ["convert", "-f", "vdk", bad, image_dir / "o.raw"]):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code not in (0, 70), (args, r.stderr)
        assert_one_line_error(r.stderr, "bad.vdk")


# ---------------------------------------------------------------------------- map
def test_map_json_and_human(image_dir):
    img = write_raw(image_dir / "m.raw", 8 * MiB, [(2 * MiB, b"x" * 8192)])
    ext = json.loads(run("map", "--output", "json", img).stdout)
    assert [(e["start"], e["length"], e["data"], e["zero"], e["offset"], e["depth"]) for e in ext] == [
        (0, 2 * MiB, False, True, None, 0),
        (2 * MiB, 8192, True, False, 2 * MiB, 0),
        (2 * MiB + 8192, 6 * MiB - 8192, False, True, None, 0),
    ]
    lines = run("map", img).stdout.splitlines()
    assert lines[0].split() == ["Offset", "Length", "Mapped", "to", "File"]
    assert lines[1].split() == ["0x200000", "0x2000", "0x200000", img]
    part = json.loads(run("map", "--output", "json", "--start-offset", "2M", "--max-length", "4K", img).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in part] == [(2 * MiB, 4096, True)]


def test_map_shows_backing_depth(image_dir):
    base = write_raw(image_dir / "base.raw", 4 * MiB, [(0, b"b" * 65536)])
    top = image_dir / "top.vdk"
    run("create", "-b", base, "-F", "raw", top)
    with vdisk.open(top) as img:
        img.write(MiB, b"t" * 65536)
        img.flush()
    ext = json.loads(run("map", "--output", "json", top).stdout)
    data = [(e["start"], e["depth"]) for e in ext if e["data"]]
    assert data == [(0, 1), (MiB, 0)]
    assert ext[-1]["start"] + ext[-1]["length"] == 4 * MiB


# ---------------------------------------------------------------------------- convert
def test_convert_raw_to_raw_sparse(image_dir):
    blob = os.urandom(123_457)
    src = write_raw(image_dir / "src.raw", 256 * MiB, [(0, b"MBR!"), (100 * MiB + 1, blob)])
    dst = image_dir / "dst.raw"
    r = run("convert", "-f", "raw", "-O", "raw", src, dst)
    assert r.stdout == "" and r.stderr == ""
    assert content(dst, "raw") == content(src, "raw")
    assert allocated(dst) < MiB


def _page_faults(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, env=dict(os.environ, VDISK_NO_COMMAND_SERVER="1"), stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    return usage.ru_minflt


def test_convert_reuses_its_buffers_instead_of_faulting_pages_in_again(image_dir):
    """vdisk.hostmem: a copy through the command keeps freed chunks for the next ones;
    the same copy through the bare API (no tuning, written from one thread) faults each
    chunk's pages in anew, and the tuning alone, on that same path, avoids it."""
    import random

    rnd = random.Random(5)
    src = image_dir / "src.raw"
    with open(src, "wb") as f:  # 1 MiB stripes: a hole, then two of data (bench-convert's pattern)
        for i in range(192):
            if i % 3:
                f.write(rnd.randbytes(MiB))
            else:
                f.seek(MiB, 1)
        f.truncate(192 * MiB)
    vdisk_cmd = os.path.join(os.path.dirname(sys.executable), "vdisk")
    tuned = _page_faults([vdisk_cmd, "convert", "-f", "raw", "-O", "qcow2", str(src), str(image_dir / "a.qcow2")])
    code = ("import sys, vdisk; from vdisk.ops.convert import convert; from vdisk.session import SESSION; "
            "from vdisk.hostmem import keep_freed_buffers; sys.argv[3] == 'tuned' and keep_freed_buffers(); "
            "convert(vdisk.open(sys.argv[1], read_only=True), sys.argv[2], format='qcow2', ctx=SESSION, "
            "write_behind=0)")
    bare = _page_faults([sys.executable, "-c", code, str(src), str(image_dir / "b.qcow2"), "bare"])
    tuned_api = _page_faults([sys.executable, "-c", code, str(src), str(image_dir / "c.qcow2"), "tuned"])
    assert content(image_dir / "a.qcow2", "qcow2") == content(src, "raw")
    pages = 128 * MiB // 4096  # the data copied, in pages
    assert bare > pages // 2, (tuned, tuned_api, bare)  # without the tuning, most chunks fault in again
    assert tuned_api < bare // 3, (tuned, tuned_api, bare)
    assert tuned < bare // 3, (tuned, tuned_api, bare)


def test_convert_raw_vdk_raw_round_trip_compressed(image_dir):
    text = b"all work and no play makes jack a dull boy\n" * 50_000
    src = write_raw(image_dir / "src.raw", 64 * MiB, [(MiB, text), (40 * MiB + 17, os.urandom(70_000))])
    mid = image_dir / "mid.vdk"
    back = image_dir / "back.raw"
    run("convert", "-c", "-O", "vdk", src, mid)
    info = json.loads(run("info", "--output", "json", mid).stdout)
    assert info["format"] == "vdk" and info["vdisk-compression"] == "zstd"
    assert info["actual-size"] < 2 * MiB  # 2.2 MB of repetitive text compresses, zeros are not stored
    assert any(e["vdisk-compressed"] for e in json.loads(run("map", "--output", "json", mid).stdout))
    run("convert", "-O", "raw", mid, back)
    assert content(back, "raw") == content(src, "raw")
    assert allocated(back) < 4 * MiB
    run("compare", src, mid)
    run("check", mid)


def test_convert_compress_needs_a_compressing_format(image_dir):
    src = write_raw(image_dir / "src.raw", MiB)
    r = run("convert", "-c", "-O", "raw", src, image_dir / "dst.raw", code=1)
    assert_one_line_error(r.stderr, "compress")
    assert not (image_dir / "dst.raw").exists()
    assert sorted(os.listdir(image_dir)) == ["src.raw"]


def test_convert_progress_is_forced_by_p(image_dir):
    src = write_raw(image_dir / "src.raw", 8 * MiB, [(MiB, b"z" * 4096)])
    r = run("convert", "-p", src, image_dir / "dst.raw")
    assert "(100.00/100%)" in r.stderr
    r = run("convert", src, image_dir / "dst2.raw")
    assert r.stderr == ""


# ---------------------------------------------------------------------------- compare
def test_compare_equal_different_and_sizes(image_dir):
    a = write_raw(image_dir / "a.raw", 4 * MiB, [(MiB, b"hello world")])
    b = write_raw(image_dir / "b.raw", 4 * MiB, [(MiB, b"hello world")])
    c = write_raw(image_dir / "c.raw", 4 * MiB, [(MiB, b"hello World")])
    longer = write_raw(image_dir / "l.raw", 6 * MiB, [(MiB, b"hello world")])
    dirty = write_raw(image_dir / "d.raw", 6 * MiB, [(MiB, b"hello world"), (5 * MiB + 1000, b"x")])
    assert run("compare", a, b).stdout == "Images are identical.\n"
    assert run("compare", a, c, code=1).stdout == f"Content mismatch at offset {MiB}!\n"
    assert run("compare", a, longer).stdout == "Warning: Image size mismatch!\nImages are identical.\n"
    assert run("compare", "-s", a, longer, code=1).stdout == "Strict mode: Image size mismatch!\n"
    out = run("compare", dirty, a, code=1).stdout
    assert out == f"Warning: Image size mismatch!\nContent mismatch at offset {5 * MiB + 512}!\n"
    assert run("compare", "-q", a, c, code=1).stdout == ""
    r = run("compare", a, image_dir / "missing.raw", code=2)
    assert_one_line_error(r.stderr, "missing.raw")


@pytest.mark.usefixtures("require_qemu")
def test_compare_agrees_with_qemu_img(image_dir):
    base = os.urandom(300_000)
    flipped = bytearray(base)
    flipped[123_456] ^= 0xFF
    cases = {
        "same": ([(MiB, base)], 4 * MiB, [(MiB, base)], 4 * MiB),
        "byte": ([(MiB, base)], 4 * MiB, [(MiB, bytes(flipped))], 4 * MiB),
        "hole-vs-zeros": ([], 4 * MiB, [(2 * MiB, bytes(65536))], 4 * MiB),
        "hole-vs-data": ([], 4 * MiB, [(3 * MiB + 777, b"\1")], 4 * MiB),
        "zero-tail": ([(0, base)], 3 * MiB, [(0, base)], 5 * MiB),
        "data-tail": ([(0, base)], 3 * MiB, [(0, base), (4 * MiB + 9000, b"!")], 5 * MiB),
        "odd-size": ([(0, b"abc")], MiB + 333, [(0, b"abc"), (MiB + 100, b"q")], MiB + 333),
    }
    for name, (wa, sa, wb, sb) in cases.items():
        a = write_raw(image_dir / f"{name}-a.raw", sa, wa)
        b = write_raw(image_dir / f"{name}-b.raw", sb, wb)
        for x, y in ((a, b), (b, a)):
            q = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", x, y],
                               capture_output=True, text=True, timeout=60)
            v = CliRunner().invoke(cli, ["compare", "-f", "raw", "-F", "raw", x, y])
            assert (v.exit_code, v.stdout) == (q.returncode, q.stdout), (name, q.stderr, v.stderr)


# ---------------------------------------------------------------------------- resize
def test_resize_grow_shrink_and_relative(image_dir):
    img = write_raw(image_dir / "r.raw", 4 * MiB, [(3 * MiB, b"tail data")])

    def size():
        return json.loads(run("info", "--output", "json", img).stdout)["virtual-size"]

    assert run("resize", img, "6M").stdout == "Image resized.\n"
    assert size() == 6 * MiB
    r = run("resize", img, "2M", code=1)
    assert_one_line_error(r.stderr, "--shrink")
    assert size() == 6 * MiB
    run("resize", img, "+1M")
    assert size() == 7 * MiB
    run("resize", img, "-1M", code=1)
    run("resize", "--shrink", img, "-1M")
    assert size() == 6 * MiB
    run("resize", "--shrink", img, "3M")
    assert size() == 3 * MiB
    r = run("resize", "--shrink", img, "-5M", code=1)
    assert_one_line_error(r.stderr, "shrink")
    r = run("resize", img, "12Q", code=1)
    assert_one_line_error(r.stderr, "12Q")


def test_resize_vdk_grows_with_zeros(image_dir):
    img = image_dir / "r.vdk"
    run("create", img, "2M")
    run("resize", img, "+2M")
    with vdisk.open(img, read_only=True) as i:
        assert i.size == 4 * MiB
        assert i.read(2 * MiB, 4096) == bytes(4096)


# ---------------------------------------------------------------------------- check
def test_check_raw_is_not_supported(image_dir):
    img = write_raw(image_dir / "c.raw", MiB)
    r = run("check", img, code=1)
    assert_one_line_error(r.stderr, "c.raw", "raw")


def test_check_clean_and_corrupt_vdk(image_dir):
    img = image_dir / "c.vdk"
    run("create", img, "4M")
    with vdisk.open(img) as i:
        i.write(MiB, os.urandom(65536))
        i.flush()
    assert "No errors were found on the image." in run("check", img).stdout
    clean = json.loads(run("check", "--output", "json", img).stdout)
    assert clean["vdisk-result"] == "clean" and clean["corruptions"] == 0 and clean["leaks"] == 0
    # flip one byte of the data cluster: its checksum no longer matches
    data = [e for e in json.loads(run("map", "--output", "json", img).stdout) if e["data"]]
    assert len(data) == 1 and data[0]["offset"] is not None
    with open(img, "r+b") as f:
        f.seek(data[0]["offset"] + 100)
        byte = f.read(1)
        f.seek(data[0]["offset"] + 100)
        f.write(bytes([byte[0] ^ 1]))
    r = run("check", "--output", "json", img, code=2)
    bad = json.loads(r.stdout)
    assert bad["vdisk-result"] == "corrupt" and bad["corruptions"] >= 1 and bad["vdisk-corruption-messages"]
    r = run("check", img, code=2)
    assert "errors were found on the image" in r.stdout
    r = run("compare", img, img, code=2)  # reading the damaged cluster is an error, not "different"
    assert_one_line_error(r.stderr)


# ---------------------------------------------------------------------------- extension points
def test_commands_from_other_modules_load_lazily(monkeypatch):
    @click.command("hello")
    @click.argument("who")
    def hello(who):
        """Say hello."""
        click.echo(f"hello {who}")

    mod = types.ModuleType("vdisk_test_ext")
    mod.hello_cmd = hello
    monkeypatch.setitem(sys.modules, "vdisk_test_ext", mod)
    monkeypatch.setitem(EXTENSION_COMMANDS, "hello", "vdisk_test_ext:hello_cmd")
    monkeypatch.delitem(cli.commands, "hello", raising=False)
    try:
        assert run("hello", "world").stdout == "hello world\n"
    finally:
        cli.commands.pop("hello", None)


def test_vdisk_errors_from_extension_commands_are_handled(monkeypatch):
    @cli.command("boom-test")
    def boom():
        raise UsageError("this went wrong\non two lines")

    try:
        r = run("boom-test", code=1)
        assert r.stderr == "vdisk: this went wrong on two lines\n"
    finally:
        cli.commands.pop("boom-test", None)


# ---------------------------------------------------------------------------- the real console script
def test_console_script_errors_are_one_line(image_dir, run_vdisk):
    r = run_vdisk("create", "-f", "raw", image_dir / "x.raw", "12Q", expect=1)
    assert_one_line_error(r.stderr, "12Q")
    r = run_vdisk("info", image_dir / "missing.vdk", expect=1)
    assert_one_line_error(r.stderr, "missing.vdk")
    bad = image_dir / "bad.vdk"
    bad.write_bytes(os.urandom(64 * 1024))
    r = run_vdisk("info", "-f", "vdk", bad, expect=None)
    assert r.returncode not in (0, 70)
    assert_one_line_error(r.stderr, "bad.vdk")


def test_console_script_round_trip(image_dir, run_vdisk):
    src = write_raw(image_dir / "src.raw", 32 * MiB, [(5 * MiB, os.urandom(200_000))])
    fmt = "vdk"
    mid = image_dir / f"mid.{fmt}"
    run_vdisk("convert", "-O", fmt, src, mid)
    run_vdisk("convert", "-O", "raw", mid, image_dir / "back.raw")
    r = run_vdisk("compare", src, image_dir / "back.raw")
    assert r.stdout == "Images are identical.\n" and "Traceback" not in r.stderr
    info = json.loads(run_vdisk("info", "--output", "json", mid).stdout)
    assert info["format"] == fmt and info["virtual-size"] == 32 * MiB


@pytest.mark.usefixtures("require_qemu")
def test_convert_to_and_from_qcow2_agrees_with_qemu_img(image_dir):
    src = write_raw(image_dir / "src.raw", 16 * MiB, [(3, b"start"), (9 * MiB + 5, os.urandom(150_000))])
    ours = image_dir / "ours.qcow2"
    run("convert", "-O", "qcow2", src, ours)
    q = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, ours],
                       capture_output=True, text=True, timeout=60)
    assert (q.returncode, q.stdout) == (0, "Images are identical.\n"), q.stderr
    assert subprocess.run(["qemu-img", "check", ours], capture_output=True, timeout=60).returncode == 0
    theirs = image_dir / "theirs.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, theirs], check=True, timeout=60)
    run("convert", "-O", "raw", theirs, image_dir / "back.raw")
    assert content(image_dir / "back.raw", "raw") == content(src, "raw")


def test_convert_an_internal_snapshot(image_dir):
    img = image_dir / "s.vdk"
    run("create", img, "4M")
    with vdisk.open(img) as i:
        i.write(0, b"before")
        i.snapshot_create("s1")
        i.write(0, b"after!")
        i.flush()
    run("convert", "-s", "s1", img, image_dir / "then.raw")
    run("convert", img, image_dir / "now.raw")
    assert content(image_dir / "then.raw", "raw")[:6] == b"before"
    assert content(image_dir / "now.raw", "raw")[:6] == b"after!"
    r = run("convert", "-s", "nosuch", img, image_dir / "x.raw", code=1)
    assert_one_line_error(r.stderr, "nosuch")
    info = json.loads(run("info", "--output", "json", img).stdout)
    assert [s["name"] for s in info["snapshots"]] == ["s1"]
    assert "Snapshot list:" in run("info", img).stdout


@pytest.mark.parametrize(
    "found, code, result, text",
    [
        ({}, 0, "clean", "No errors were found on the image."),
        ({"leaks": ["cluster 7 unreferenced"], "leaked_clusters": 1}, 3, "leaks",
         "1 leaked clusters were found on the image."),
        ({"corruptions": ["L2 table 0 checksum"], "leaks": ["cluster 9"]}, 2, "corrupt",
         "1 errors were found on the image."),
    ],
)
def test_check_exit_codes_and_output_follow_the_result(image_dir, monkeypatch, found, code, result, text):
    from vdisk.drivers.base import CheckResult

    seen = []

    def fake_check(self, *, repair=None):
        seen.append((repair, self.read_only))
        return CheckResult(checked_clusters=10, allocated_clusters=4, **found)

    monkeypatch.setattr(vdisk.Image, "check", fake_check)
    img = write_raw(image_dir / "c.raw", MiB)
    r = run("check", img, code=code)
    assert text in r.stdout
    d = json.loads(run("check", "--output", "json", img, code=code).stdout)
    assert d["vdisk-result"] == result
    assert d["corruptions"] == len(found.get("corruptions", []))
    assert d["leaks"] == len(found.get("leaks", []))
    assert d["vdisk-corruption-messages"] == found.get("corruptions", [])
    assert d["vdisk-leak-messages"] == found.get("leaks", [])
    run("check", "-r", "leaks", img, code=code)
    assert seen == [(None, True), (None, True), (None, False), ("leaks", False)]
