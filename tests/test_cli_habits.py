"""qemu-img's habits: spellings, exit codes, progress, tables (issue: a CLI a qemu-img
user can use without reading the manual).  Where qemu-img has the same command, the
test runs both on the same files."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import vdisk

MiB = 1 << 20


def _qemu(*args, check=True):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, check=check)


# ------------------------------------------------------------------ exit codes and one-line errors
@pytest.mark.parametrize("args", [["info"], ["bogus-command"], ["create", "-f"], ["convert", "--nope", "a", "b"],
                                  ["snapshot", "-c"], ["snapshot", "-l", "a", "b"]])
def test_usage_errors_exit_1_on_one_line(run_vdisk, args):
    """qemu-img exits 1 on a usage error; click's default, 2, is vdisk's "corrupt"."""
    r = run_vdisk(*args, expect=1)
    assert r.stderr.startswith("vdisk: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--help" in r.stderr
    assert _qemu(*(["info"] if args == ["info"] else ["bogus-command"]), check=False).returncode == 1


def test_help_and_version_exit_0(run_vdisk):
    assert "Usage:" in run_vdisk("--help").stdout
    assert run_vdisk("--version").stdout.startswith("vdisk ")
    assert "Usage:" in run_vdisk("snapshot", "--help").stdout


# ------------------------------------------------------------------ snapshot spellings
@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_qemu_img_snapshot_flags(image_dir, run_vdisk, fmt):
    p = str(image_dir / f"s.{fmt}")
    run_vdisk("create", "-f", fmt, p, "1M")
    with vdisk.open(p) as img:
        img.write(0, b"one" * 100)
    run_vdisk("snapshot", "-c", "first", p)
    with vdisk.open(p) as img:
        img.write(0, b"two" * 100)
    out = run_vdisk("snapshot", "-l", p).stdout
    assert "first" in out
    run_vdisk("snapshot", "-a", "first", p)
    with vdisk.open(p, read_only=True) as img:
        assert img.read(0, 300) == b"one" * 100
    if fmt == "qcow2":  # QEMU sees what vdisk made
        assert "first" in _qemu("snapshot", "-l", p).stdout
    run_vdisk("snapshot", "-d", "first", p)
    assert run_vdisk("snapshot", "-l", p).stdout.strip() == "no snapshots"
    if fmt == "qcow2":
        assert "first" not in _qemu("snapshot", "-l", p).stdout
        _qemu("check", p)


@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_snapshot_rename_keeps_content_and_clones(image_dir, run_vdisk, fmt):
    p = str(image_dir / f"r.{fmt}")
    run_vdisk("create", "-f", fmt, p, "1M")
    with vdisk.open(p) as img:
        img.write(0, b"kept" * 100)
        img.snapshot_create("old")
        img.write(0, b"live" * 100)
    clone = str(image_dir / "c.vdk")
    if fmt == "vdk":
        run_vdisk("clone", f"{p}@old", clone)
    run_vdisk("snapshot", "rename", p, "old", "new")
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", p).stdout)
    assert [r["name"] for r in rows] == ["new"]
    with vdisk.open(p, read_only=True, snapshot="new") as img:
        assert img.read(0, 400) == b"kept" * 100
    if fmt == "vdk":
        with vdisk.open(clone, read_only=True) as img:
            assert img.read(0, 400) == b"kept" * 100
        assert rows[0]["vdisk-holds"] == 1
    else:
        assert "new" in _qemu("snapshot", "-l", p).stdout
        _qemu("check", p)
    r = run_vdisk("snapshot", "rename", p, "new", "bad@name", expect=1)
    assert "@" in r.stderr


def test_snapshot_list_json_has_qemu_img_info_keys(image_dir, run_vdisk):
    p = str(image_dir / "q.qcow2")
    _qemu("create", "-f", "qcow2", p, "1M")
    _qemu("snapshot", "-c", "s1", p)
    ours = json.loads(run_vdisk("snapshot", "list", "--output", "json", p).stdout)
    theirs = json.loads(_qemu("info", "--output", "json", p).stdout)["snapshots"]
    assert len(ours) == len(theirs) == 1
    shared = set(theirs[0])
    assert shared <= set(ours[0]), shared - set(ours[0])
    for key in ("id", "name", "date-sec", "vm-state-size"):
        assert ours[0][key] == theirs[0][key], key


def test_snapshot_table_stays_aligned_with_long_and_wide_names(image_dir, run_vdisk):
    p = str(image_dir / "t.vdk")
    vdisk.create(p, MiB)
    names = ["a", "x" * 60, "日本語のスナップショット", "naïve"]
    with vdisk.open(p) as img:
        for n in names:
            img.snapshot_create(n)
    from vdisk.cli.output import display_width

    lines = run_vdisk("snapshot", "list", p).stdout.rstrip("\n").split("\n")
    assert len(lines) == 1 + len(names)
    size_col = lines[0].index("SIZE") + len("SIZE")  # right-aligned column: ends where its header ends
    for line, name in zip(lines[1:], names):
        assert name in line
        # the SIZE cell ("1 MiB", right-aligned) ends at the same display column in every row
        assert display_width(line[: line.index(" MiB") + len(" MiB")]) == size_col, line


# ------------------------------------------------------------------ progress
def test_progress_reaches_100_percent(image_dir, run_vdisk):
    base, top = str(image_dir / "b.vdk"), str(image_dir / "t.vdk")
    vdisk.create(base, 64 * MiB)
    vdisk.create(top, backing_file=base)
    with vdisk.open(top) as img:
        img.write(0, b"x" * MiB)  # 1 MiB of 64: commit copies only that
    r = run_vdisk("commit", "-p", top)
    assert "(100.00/100%)" in r.stderr
    r = run_vdisk("convert", "-p", "-O", "raw", base, str(image_dir / "o.raw"))
    assert "(100.00/100%)" in r.stderr


# ------------------------------------------------------------------ create -o
def test_create_o_help_lists_the_format_options(run_vdisk):
    out = run_vdisk("create", "-f", "vdk", "-o", "help").stdout
    assert out.startswith("Supported vdk options:") and "cluster_size" in out and "backing_file" in out
    assert "preallocation" in run_vdisk("create", "-f", "raw", "-o", "help").stdout
    assert "Supported qcow2 options:" in run_vdisk("create", "-f", "qcow2", "-o", "?").stdout


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_raw_preallocation_allocates_as_qemu_img_does(image_dir, run_vdisk, mode):
    ours, theirs = image_dir / f"v-{mode}.raw", image_dir / f"q-{mode}.raw"
    run_vdisk("create", "-f", "raw", "-o", f"preallocation={mode}", ours, "8M")
    _qemu("create", "-q", "-f", "raw", "-o", f"preallocation={mode}", theirs, "8M")
    assert os.path.getsize(ours) == os.path.getsize(theirs) == 8 * MiB
    if mode == "off":  # sparse (qemu-img also writes its first 4 KiB block)
        assert os.stat(ours).st_blocks <= os.stat(theirs).st_blocks <= 8
    else:
        assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks >= 8 * MiB // 512
    assert open(ours, "rb").read() == bytes(8 * MiB)


def test_vdk_preallocation_other_than_off_is_refused_with_the_reason(image_dir, run_vdisk):
    r = run_vdisk("create", "-f", "vdk", "-o", "preallocation=metadata", image_dir / "x.vdk", "1M", expect=1)
    assert "copy-on-write" in r.stderr and not (image_dir / "x.vdk").exists()


# ------------------------------------------------------------------ bench
@pytest.mark.parametrize("fmt", ["vdk", "qcow2", "raw"])
def test_bench_reports_as_qemu_img_does(image_dir, run_vdisk, fmt):
    p = str(image_dir / f"b.{fmt}")
    run_vdisk("create", "-f", fmt, p, "4M")
    r = run_vdisk("bench", "-c", "600", "-w", "-s", "8k", "--pattern", "7", p)
    first, second = r.stdout.splitlines()
    assert first == "Sending 600 write requests, 8192 bytes each, 64 in parallel (starting at offset 0, step size 8192)"
    assert second.startswith("Run completed in ") and second.endswith(" seconds.")
    with vdisk.open(p, read_only=True) as img:  # 600 x 8 KiB wraps around the 4 MiB disk
        assert img.read(0, 4 * MiB) == bytes([7]) * (4 * MiB)
    r = run_vdisk("bench", "-c", "100", "-U", p)
    if fmt == "qcow2":
        q = _qemu("bench", "-c", "100", "-U", p)
        assert q.stdout.splitlines()[0] == r.stdout.splitlines()[0]


# ------------------------------------------------------------------ IMAGE@SNAP everywhere an image is read
@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_image_at_snapshot_is_read_by_every_reading_command(image_dir, run_vdisk, fmt):
    p = str(image_dir / f"i.{fmt}")
    run_vdisk("create", "-f", fmt, p, "1M")
    with vdisk.open(p) as img:
        img.write(0, b"snap" * 1024)
        img.snapshot_create("s1")
        img.write(0, b"live" * 1024)
    sid = json.loads(run_vdisk("snapshot", "list", "--output", "json", p).stdout)[0]["id"]
    for spec in (f"{p}@s1", f"{p}@#{sid}"):
        assert json.loads(run_vdisk("info", "--output", "json", spec).stdout)["virtual-size"] == MiB
        run_vdisk("map", spec)
        run_vdisk("check", spec)
        out = str(image_dir / "o.raw")
        run_vdisk("convert", "-O", "raw", spec, out)
        assert open(out, "rb").read(4096) == b"snap" * 1024
        os.unlink(out)
        run_vdisk("compare", spec, f"{p}@s1")
        assert run_vdisk("compare", spec, p, expect=1).stdout.startswith("Content mismatch")
    r = run_vdisk("info", f"{p}@nope", expect=1)
    assert "nope" in r.stderr
    r = run_vdisk("resize", f"{p}@s1", "2M", expect=1)  # snapshots are read-only
    assert r.stderr.count("\n") == 1


def test_compare_takes_U_and_s_as_qemu_img(image_dir, run_vdisk):
    a, b = str(image_dir / "a.raw"), str(image_dir / "b.raw")
    open(a, "wb").write(bytes(MiB))
    open(b, "wb").write(bytes(2 * MiB))
    assert run_vdisk("compare", "-U", "-f", "raw", "-F", "raw", a, b).returncode == 0
    r = run_vdisk("compare", "-s", "-f", "raw", "-F", "raw", a, b, expect=1)
    q = _qemu("compare", "-s", "-f", "raw", "-F", "raw", a, b, check=False)
    assert q.returncode == 1 and r.stdout.strip() == q.stdout.strip()


# ------------------------------------------------------------------ convert's qemu-img options
def _mixed_source(d, name="src.raw", size=4 * MiB):
    p = str(d / name)
    with open(p, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"A" * 65536)
        f.seek(MiB)
        f.write(os.urandom(3 * 65536))
        f.seek(3 * MiB)
        f.write(bytes(65536))  # a data extent of zeros
    return p


@pytest.mark.parametrize("out_fmt", ["raw", "vdk", "qcow2"])
def test_convert_n_writes_into_an_existing_image_and_zeroes_the_rest(image_dir, run_vdisk, out_fmt):
    src = _mixed_source(image_dir)
    dst = str(image_dir / f"dst.{out_fmt}")
    run_vdisk("create", "-f", out_fmt, dst, "4M")
    with vdisk.open(dst, format=out_fmt) as img:  # stale content that the source does not have
        img.write(2 * MiB, b"stale" * 1000)
        img.write(0, b"Z" * 100000)
    run_vdisk("convert", "-n", "-f", "raw", "-O", out_fmt, src, dst)
    run_vdisk("compare", "-f", "raw", "-F", out_fmt, src, dst)
    assert _qemu("compare", "-f", "raw", "-F", out_fmt if out_fmt != "vdk" else "raw", src,
                 dst if out_fmt != "vdk" else src).returncode == 0
    r = run_vdisk("convert", "-n", "-f", "raw", "-O", out_fmt, src, str(image_dir / "missing"), expect=1)
    assert "no such file" in r.stderr


def test_convert_S_0_allocates_everything_as_qemu_img(image_dir, run_vdisk):
    src = _mixed_source(image_dir)
    ours, theirs = str(image_dir / "o.raw"), str(image_dir / "q.raw")
    run_vdisk("convert", "-S", "0", "-f", "raw", "-O", "raw", src, ours)
    _qemu("convert", "-S", "0", "-f", "raw", "-O", "raw", src, theirs)
    assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks >= 4 * MiB // 512
    run_vdisk("convert", "-f", "raw", "-O", "raw", src, ours)
    assert os.stat(ours).st_blocks < 4 * MiB // 512 // 2  # sparse by default


@pytest.mark.parametrize("out_fmt", ["vdk", "qcow2"])
def test_convert_B_writes_only_what_differs_from_the_backing_file(image_dir, run_vdisk, out_fmt):
    base = str(image_dir / "base.qcow2")
    _qemu("create", "-q", "-f", "qcow2", base, "4M")
    subprocess.run(["qemu-io", "-c", "write -P 0x41 0 1M", "-c", "write -P 0x42 2M 1M", base],
                   check=True, capture_output=True)
    src = str(image_dir / "src.qcow2")
    _qemu("create", "-q", "-f", "qcow2", src, "4M")
    subprocess.run(["qemu-io", "-c", "write -P 0x41 0 1M", "-c", "write -P 0x43 64k 64k", src],
                   check=True, capture_output=True)  # differs from base at 64k, and has zeros at 2M
    dst = str(image_dir / f"dst.{out_fmt}")
    run_vdisk("convert", "-O", out_fmt, "-B", "base.qcow2", "-F", "qcow2", src, dst)
    run_vdisk("compare", src, dst)
    with vdisk.open(dst, read_only=True) as img:
        assert img.driver.backing_ref.filename == "base.qcow2"
        own = [e for e in img.block_status(0, img.size, chain=False) if e.status.name == "DATA"]
        assert sum(e.length for e in own) <= 128 << 10  # only the differing cluster(s)
    if out_fmt == "qcow2":
        assert _qemu("compare", src, dst).returncode == 0
        _qemu("check", dst)


def test_convert_l_and_rate_limit_and_qemu_img_no_op_flags(image_dir, run_vdisk):
    p = str(image_dir / "s.vdk")
    vdisk.create(p, MiB)
    with vdisk.open(p) as img:
        img.write(0, b"snap" * 1000)
        img.snapshot_create("s1")
        img.write(0, b"live" * 1000)
    out = str(image_dir / "o.raw")
    for spec in ("s1", "snapshot.name=s1", "snapshot.id=1"):
        run_vdisk("convert", "-W", "-m", "4", "-U", "-l", spec, "-O", "raw", p, out)
        assert open(out, "rb").read(4000) == b"snap" * 1000
    r = run_vdisk("convert", "-l", "bogus=1", "-O", "raw", p, out, expect=1)
    assert "snapshot.name" in r.stderr
    import time

    t0 = time.monotonic()
    run_vdisk("convert", "-r", "8M", "-O", "raw", "-S", "0", p, out)  # 1 MiB at 8 MiB/s: >= 1/8 s
    assert time.monotonic() - t0 >= 0.12


def test_convert_c_to_qcow2_is_zlib_as_qemu_img(image_dir, run_vdisk):
    src = _mixed_source(image_dir)
    dst = str(image_dir / "c.qcow2")
    run_vdisk("convert", "-c", "-f", "raw", "-O", "qcow2", src, dst)
    info = json.loads(_qemu("info", "--output", "json", dst).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    assert _qemu("compare", "-f", "raw", src, dst).returncode == 0


# ------------------------------------------------------------------ hints name only options the command has
def test_hints_never_name_an_option_the_command_lacks(tmp_path, run_vdisk):
    from vdisk.drivers.base import BackingRef

    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "b.raw").write_bytes(bytes(MiB))
    top = str(inside / "t.vdk")
    vdisk.create(top, MiB)
    with vdisk.open(top, backing=False) as img:
        img.set_backing(BackingRef("../out/b.raw", "raw"))
    r = run_vdisk("map", top, expect=1)  # map has --unsafe-backing
    assert "--unsafe-backing" in r.stderr
    r = run_vdisk("resize", top, "2M", expect=1)  # resize has not
    assert "outside" in r.stderr and "--unsafe-backing" not in r.stderr
    p = str(tmp_path / "w.vdk")
    vdisk.create(p, MiB)
    with vdisk.open(p):  # a writer holds it
        r = run_vdisk("info", p, expect=1)
        assert "-U/--force-share" in r.stderr
        r = run_vdisk("clone", "--full", p, str(tmp_path / "c.vdk"), expect=1)
        assert "in use" in r.stderr and "-U" not in r.stderr
        r = run_vdisk("snapshot", "-l", "-U", p)  # qemu-img's spelling, with -U


# ------------------------------------------------------------------ clone -f/-O, rebase -u onto a file to come
def test_clone_takes_the_format_of_the_clone(image_dir, run_vdisk):
    base = str(image_dir / "base.qcow2")
    _qemu("create", "-q", "-f", "qcow2", base, "1M")
    c = str(image_dir / "c.qcow2")
    run_vdisk("clone", "-f", "qcow2", base, c)  # a qcow2 overlay, as qemu-img create -b would make
    info = json.loads(_qemu("info", "--output", "json", c).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == "base.qcow2"
    full = str(image_dir / "full.qcow2")
    run_vdisk("clone", "--full", "-O", "qcow2", base, full)
    assert json.loads(_qemu("info", "--output", "json", full).stdout).get("backing-filename") is None
    gold = str(image_dir / "g.vdk")
    vdisk.create(gold, MiB)
    r = run_vdisk("clone", "-f", "qcow2", gold, str(image_dir / "x.qcow2"), expect=1)
    assert "snapshot" in r.stderr and "--full" in r.stderr


def test_rebase_u_onto_a_backing_file_that_does_not_exist_yet(image_dir, run_vdisk):
    top = str(image_dir / "t.qcow2")
    _qemu("create", "-q", "-f", "qcow2", top, "1M")
    run_vdisk("rebase", "-u", "-b", "later.qcow2", "-F", "qcow2", top)
    info = json.loads(_qemu("info", "-U", "--output", "json", top).stdout)
    assert info["backing-filename"] == "later.qcow2"
    r = run_vdisk("rebase", "-u", "-b", "later2.qcow2", top, expect=1)  # no -F: cannot know its format
    assert "-F" in r.stderr
    _qemu("create", "-q", "-f", "qcow2", str(image_dir / "later.qcow2"), "1M")
    run_vdisk("info", top)  # now it opens, with its chain


# ------------------------------------------------------------------ signals
def test_sigterm_stops_a_convert_with_143_and_leaves_no_file(tmp_path):
    """SIGTERM during a convert unwinds it (``vdisk.cli.errors.sigterm_unwinds``): exit
    128 + 15 as a shell reports a killed command, and neither the output nor a
    partial file is left; the source is untouched."""
    import signal
    import time

    from conftest import vdisk_command

    src = tmp_path / "src.raw"
    data = os.urandom(8 * MiB)
    src.write_bytes(data)
    out = tmp_path / "out.vdk"
    # -r 1M: about 8 s to copy, so the signal lands in the middle of it
    proc = subprocess.Popen(vdisk_command() + ["convert", "-r", "1M", "-f", "raw", "-O", "vdk", str(src), str(out)],
                            env=dict(os.environ, VDISK_NO_COMMAND_SERVER="1"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]
    assert src.read_bytes() == data
