"""Every command on images in a pool (``POOL/IMAGE``), through the CLI, as on files:
create, info, map, check, compare, convert (file <-> pool, pool -> pool), snapshots,
clones (native inside a pool; overlays between pools and files), commit, rebase,
flatten, resize, rm (refused while others depend on an image; -r), measure, and a
FUSE mount of a pool image."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from imagetools import jrun, run

import vdisk
from vdisk.pool.store import Pool

MiB = 1 << 20
B = 4096


def catalog(p: str) -> dict:
    pl = Pool(p, lock=False)
    try:
        return pl.catalog
    finally:
        pl.close()


def generation(p: str) -> int:
    pl = Pool(p, lock=False)
    try:
        return pl.generation
    finally:
        pl.close()


def packs(p: str) -> dict[str, int]:
    d = os.path.join(p, "packs")
    return {f: os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)} if os.path.isdir(d) else {}


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fill(path: str, writes, fmt: str | None = None) -> None:
    with vdisk.open(path, format=fmt) as img:
        for off, data in writes:
            img.write(off, data)


def content(path: str, **kw) -> bytes:
    with vdisk.open(path, read_only=True, **kw) as img:
        return img.read(0, img.size)


def holders(path: str, snap: str) -> list[str]:
    with vdisk.open(path, read_only=True, backing=False) as img:
        for s in img.snapshot_list(hidden=True):
            if snap in (s.name, f"#{s.id}"):
                return [h.path for h in s.holders]
    raise AssertionError(f"{path}: no snapshot {snap}")


# ---------------------------------------------------------------------------- create, info, map, check
def test_create_makes_a_pool_image_not_a_file(pool):
    r = run("create", f"{pool}/a", "16M")
    assert "fmt=pool" in r.stdout
    assert not os.path.lexists(f"{pool}/a")  # in the catalog, not a file among the pool's objects
    assert "a" in catalog(pool)["images"]
    info = jrun("info", f"{pool}/a")
    assert info["format"] == "pool" and info["virtual-size"] == 16 * MiB and info["cluster-size"] == B
    assert info["format-specific"]["type"] == "pool"
    assert info["format-specific"]["data"]["image"] == "a"
    # a file format cannot live inside a pool's directory
    r = run("create", "-f", "vdk", f"{pool}/b", "1M", code=1)
    assert "pool" in r.stderr and not os.path.lexists(f"{pool}/b")
    run("create", f"{pool}/a", "1M", code=1)  # never overwritten
    assert jrun("info", f"{pool}/a")["virtual-size"] == 16 * MiB


def test_info_backing_chain_of_a_pool_overlay(pool):
    run("create", f"{pool}/base", "4M")
    run("create", "-b", "base", "-F", "pool", f"{pool}/top")  # -b is relative to the pool's directory
    chain = jrun("info", "--backing-chain", f"{pool}/top")
    assert [c["format"] for c in chain] == ["pool", "pool"]
    assert chain[0]["backing-filename"] == "base" and chain[0]["backing-filename-format"] == "pool"
    assert chain[0]["full-backing-filename"] == os.path.join(pool, "base")
    assert chain[1]["virtual-size"] == 4 * MiB


def test_map_and_check(pool):
    img = f"{pool}/a"
    run("create", img, "8M")
    fill(img, [(B, pattern(1, 3 * B)), (4 * MiB, b"x" * B)])
    extents = json.loads(run("map", "--output", "json", img).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(B, 3 * B), (4 * MiB, B)]
    assert extents[0]["start"] == 0 and extents[-1]["start"] + extents[-1]["length"] == 8 * MiB
    assert "pool/a" in run("map", img).stdout
    res = jrun("check", img)
    assert res["format"] == "pool" and res["vdisk-result"] == "clean" and res["allocated-clusters"] == 4
    assert "No errors were found" in run("check", img).stdout


# ---------------------------------------------------------------------------- compare, convert
def _source_raw(tmp_path) -> tuple[str, bytes]:
    src = str(tmp_path / "src.raw")
    size = 6 * MiB + 3 * B
    writes = [(0, pattern(2, 100_000)), (2 * MiB + 17, pattern(3, 5000)), (size - B, pattern(4, B)),
              (3 * MiB, bytes(B) + b"\1" + bytes(B))]
    vdisk.create(src, size, format="raw")
    fill(src, writes, fmt="raw")
    return src, content(src, format="raw")


def test_convert_round_trip_and_compare(pool, tmp_path):
    src, want = _source_raw(tmp_path)
    run("convert", "-f", "raw", src, f"{pool}/a")  # file -> pool: the pool format by default
    assert jrun("info", f"{pool}/a")["format"] == "pool"
    assert content(f"{pool}/a") == want
    assert "identical" in run("compare", "-f", "raw", src, f"{pool}/a").stdout

    back = str(tmp_path / "back.raw")
    run("convert", f"{pool}/a", back)  # pool -> file: raw by default, as qemu-img
    with open(back, "rb") as f:
        assert f.read() == want

    q = str(tmp_path / "a.qcow2")
    run("convert", "-O", "qcow2", f"{pool}/a", q)
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, q], check=False,
                       capture_output=True, text=True, timeout=60)  # qemu-utils: scripts/setup.sh
    assert p.returncode == 0, p.stdout + p.stderr
    assert content(q) == want

    run("convert", f"{pool}/a", f"{pool}/b")  # pool -> pool
    assert content(f"{pool}/b") == want
    run("compare", f"{pool}/a", f"{pool}/b")
    fill(f"{pool}/b", [(5 * MiB, b"!")])
    r = run("compare", f"{pool}/a", f"{pool}/b", code=1)
    assert f"offset {5 * MiB}" in r.stdout

    # an image in a pool is never replaced; -n writes into it
    r = run("convert", "-f", "raw", src, f"{pool}/b", code=1)
    assert "exists already" in r.stderr
    assert content(f"{pool}/b") != want
    run("convert", "-n", "-f", "raw", src, f"{pool}/b")
    assert content(f"{pool}/b") == want
    run("convert", "-O", "raw", src, f"{pool}/c", code=1)  # a raw file cannot go into the pool
    assert "c" not in catalog(pool)["images"] and not os.path.lexists(f"{pool}/c")


def test_convert_of_a_snapshot_and_with_backing(pool, tmp_path):
    img = f"{pool}/a"
    run("create", img, "2M")
    fill(img, [(0, b"one" * 1000)])
    run("snapshot", "-c", "s1", img)
    fill(img, [(0, b"two" * 1000)])
    run("convert", f"{img}@s1", f"{pool}/old")
    assert content(f"{pool}/old")[:3000] == b"one" * 1000
    # -B: the new pool image is an overlay on the old one holding only what differs
    run("convert", "-B", "old", "-F", "pool", img, f"{pool}/diff")
    info = jrun("info", f"{pool}/diff")
    assert info["backing-filename"] == "old"
    assert content(f"{pool}/diff") == content(img)
    assert info["actual-size"] < 3 * B


def test_failed_convert_leaves_no_image(pool, tmp_path, monkeypatch):
    import sys

    src, _ = _source_raw(tmp_path)
    conv = sys.modules["vdisk.ops.convert"]

    def boom(*a, **kw):
        raise vdisk.VdiskError("injected failure")

    monkeypatch.setattr(conv, "copy_content", boom)
    r = run("convert", "-f", "raw", src, f"{pool}/x", code=1)
    assert "injected failure" in r.stderr
    assert "x" not in catalog(pool)["images"]


# ---------------------------------------------------------------------------- snapshots
def test_snapshot_commands(pool):
    img = f"{pool}/a"
    run("create", img, "1M")
    fill(img, [(0, b"A" * B)])
    run("snapshot", "-c", "s1", img)
    run("snapshot", "create", img, "s2")
    assert [s["name"] for s in json.loads(run("snapshot", "list", "--output", "json", img).stdout)] == ["s1", "s2"]
    assert "s1" in run("snapshot", "-l", img).stdout
    run("snapshot", "rename", img, "s2", "later")
    fill(img, [(0, b"B" * B)])
    run("snapshot", "-a", "s1", img)
    assert content(img)[:B] == b"A" * B
    assert content(img, snapshot="later")[:B] == b"A" * B
    run("snapshot", "-d", "s1", img)
    snaps = jrun("info", img)["snapshots"]
    assert [s["name"] for s in snaps] == ["later"]
    run("snapshot", "-d", "nope", img, code=1)


# ---------------------------------------------------------------------------- clones
def test_native_clone_is_o1_and_holds_its_snapshot(pool):
    src = f"{pool}/a"
    run("create", src, "16M")
    fill(src, [(0, pattern(5, 4 * MiB))])
    run("snapshot", "-c", "s", src)
    before_packs, before_gen = packs(pool), generation(pool)
    run("clone", f"{src}@s", f"{pool}/b")
    # O(1): no data written, one catalog generation records clone and hold together
    assert packs(pool) == before_packs
    assert generation(pool) == before_gen + 1
    assert content(f"{pool}/b") == content(src, snapshot="s")
    assert holders(src, "s") == ["b"]  # a holder's path is relative to the pool's directory
    info = jrun("info", f"{pool}/b")
    assert info["backing-filename"] is None
    assert info["format-specific"]["data"]["parent"].startswith("a@#")
    assert json.loads(run("snapshot", "list", "--output", "json", src).stdout)[0]["vdisk-holds"] == 1

    # the clone is writable and independent of the source's later writes
    fill(f"{pool}/b", [(0, b"clone")])
    fill(src, [(B, b"source")])
    assert content(f"{pool}/b")[:5] == b"clone" and content(f"{pool}/b")[B:B + 6] != b"source"

    # nothing a user depends on can go: rm names the dependant; a deleted snapshot hides
    r = run("rm", src, code=1)
    assert "pool/b" in r.stderr and "remove them first" in r.stderr
    run("snapshot", "-d", "s", src)
    assert jrun("info", src)["snapshots"] == []
    assert content(f"{pool}/b")[B:2 * B] == content(src, snapshot="#1")[B:2 * B]
    run("rm", src, code=1)
    run("rm", f"{pool}/b")  # drops its hold, and the hidden snapshot with it
    with vdisk.open(src, read_only=True) as img:
        assert img.snapshot_list(hidden=True) == []
    run("rm", src)
    assert catalog(pool)["images"] == {}


def test_clone_of_the_live_state_snapshots_it_first(pool):
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, b"before")])
    run("clone", src, f"{pool}/c")
    assert [s["name"] for s in jrun("info", src)["snapshots"]] == ["clone-c"]
    fill(src, [(0, b"AFTER!")])  # the source stays writable
    assert content(f"{pool}/c")[:6] == b"before"
    assert holders(src, "clone-c") == ["c"]


def test_create_b_snap_makes_a_native_clone(pool):
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, b"data")])
    run("snapshot", "-c", "s", src)
    run("create", "-b", "a@s", f"{pool}/b")  # relative to the pool's directory
    assert content(f"{pool}/b")[:4] == b"data"
    assert holders(src, "s") == ["b"]


def test_native_clone_of_an_overlay_reads_its_backing(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("VDISK_BACKING_DIRS", str(tmp_path))
    base = str(tmp_path / "base.vdk")
    vdisk.create(base, 2 * MiB)
    fill(base, [(0, b"base" * 1000)])
    run("create", "-b", "../base.vdk", "-F", "vdk", f"{pool}/ov")
    fill(f"{pool}/ov", [(MiB, b"overlay")])
    run("snapshot", "-c", "s", f"{pool}/ov")
    run("clone", f"{pool}/ov@s", f"{pool}/nc")
    assert content(f"{pool}/nc") == content(f"{pool}/ov")
    assert content(f"{pool}/nc")[:4] == b"base"
    # flatten: the clone takes in what it read through its chain and lets go of its parent
    run("flatten", f"{pool}/nc")
    info = jrun("info", f"{pool}/nc")
    assert info["backing-filename"] is None and "parent" not in info["format-specific"]["data"]
    assert holders(f"{pool}/ov", "s") == []
    assert content(f"{pool}/nc") == content(f"{pool}/ov")


def test_linked_clone_from_a_pool_image_to_a_vdk_file(pool, tmp_path):
    src = f"{pool}/a"
    run("create", src, "2M")
    fill(src, [(0, pattern(6, 64 * 1024))])
    run("snapshot", "-c", "s", src)
    dst = str(tmp_path / "x.vdk")
    run("clone", f"{src}@s", dst)
    info = jrun("info", dst)
    assert info["format"] == "vdk"
    assert info["backing-filename"] == "pool/a" and info["backing-filename-format"] == "pool"
    assert info["vdisk-backing-snapshot"].startswith("#")
    assert content(dst) == content(src, snapshot="s")
    assert holders(src, "s") == ["../x.vdk"]  # relative to the pool's directory
    r = run("rm", src, code=1)
    assert "x.vdk" in r.stderr
    run("snapshot", "-d", "s", src)
    assert content(dst) == content(src, snapshot="#1")
    run("rm", dst)  # releases its hold: the hidden snapshot goes with it
    with vdisk.open(src, read_only=True) as img:
        assert img.snapshot_list(hidden=True) == []
    run("rm", src)


def test_linked_clone_from_a_vdk_file_into_a_pool(pool, tmp_path, monkeypatch):
    src = str(tmp_path / "disk.vdk")
    vdisk.create(src, 2 * MiB)
    fill(src, [(0, pattern(7, 100_000))])
    # a pool image follows backing files in its pool's directory; the file is beside it
    r = run("clone", src, f"{pool}/y", code=1)
    assert "VDISK_BACKING_DIRS" in r.stderr
    with vdisk.open(src, read_only=True) as img:
        assert img.snapshot_list() == []  # nothing was taken before the refusal
    monkeypatch.setenv("VDISK_BACKING_DIRS", str(tmp_path))
    run("clone", src, f"{pool}/y")
    info = jrun("info", f"{pool}/y")
    assert info["format"] == "pool" and info["backing-filename"] == "../disk.vdk"
    assert content(f"{pool}/y") == content(src)
    assert holders(src, "clone-y") == ["pool/y"]
    fill(src, [(0, b"later")])
    assert content(f"{pool}/y")[:5] != b"later"
    run("clone", src, f"{pool}/z")
    assert holders(src, "clone-z") == ["pool/z"]
    run("rm", f"{pool}/z")  # a pool overlay's hold on a file's snapshot goes with it
    assert holders(src, "clone-z") == []
    raw = str(tmp_path / "plain.raw")
    vdisk.create(raw, MiB, format="raw")
    run("clone", raw, f"{pool}/onraw")  # raw: an overlay on the file as it is
    info = jrun("info", f"{pool}/onraw")
    assert info["backing-filename"] == "../plain.raw" and info["backing-filename-format"] == "raw"
    r = run("rm", raw, code=1)  # the images of a pool beside a file are next to it
    assert "pool/onraw (overlay)" in r.stderr
    run("rm", f"{pool}/onraw")
    run("rm", raw)
    # rm -r: the family, deepest first, releasing every hold
    r = run("rm", "-r", "-n", src)
    assert r.stdout.splitlines() == [f"would remove {pool}/y", f"would remove {src}"]
    run("rm", "-r", src)
    assert not os.path.exists(src) and "y" not in catalog(pool)["images"]


def test_clone_between_pools(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("VDISK_BACKING_DIRS", str(tmp_path))  # pools side by side, as files in sibling directories
    other = str(tmp_path / "other")
    Pool.create(other)
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, b"shared")])
    run("snapshot", "-c", "s", src)
    run("clone", f"{src}@s", f"{other}/b")
    info = jrun("info", f"{other}/b")
    assert info["backing-filename"] == "../pool/a" and info["backing-filename-format"] == "pool"
    assert content(f"{other}/b")[:6] == b"shared"
    assert holders(src, "s") == ["../other/b"]
    run("rm", f"{other}/b")
    assert holders(src, "s") == []


def test_full_clone(pool, tmp_path):
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, pattern(8, 300_000))])
    run("clone", "--full", src, f"{pool}/full")
    run("clone", "--full", "-c", src, str(tmp_path / "full.vdk"))
    assert content(f"{pool}/full") == content(src) == content(str(tmp_path / "full.vdk"))
    info = jrun("info", f"{pool}/full")
    assert info["backing-filename"] is None and "parent" not in info["format-specific"]["data"]
    run("rm", src)  # nothing depends on it
    assert content(f"{pool}/full")[:300_000] == pattern(8, 300_000)


# ---------------------------------------------------------------------------- commit, rebase, flatten, resize
def test_commit_rebase_flatten(pool):
    run("create", f"{pool}/base", "2M")
    fill(f"{pool}/base", [(0, b"b" * 2 * B)])
    run("create", "-b", "base", "-F", "pool", f"{pool}/top")
    fill(f"{pool}/top", [(B, b"t" * B)])
    r = run("rm", f"{pool}/base", code=1)  # an overlay next to it in the pool
    assert "pool/top (overlay)" in r.stderr
    run("commit", f"{pool}/top")
    assert content(f"{pool}/base")[:2 * B] == b"b" * B + b"t" * B
    assert [e["data"] for e in json.loads(run("map", "--output", "json", f"{pool}/top").stdout)
            if e["depth"] == 0] == []
    run("create", f"{pool}/other", "2M")
    run("rebase", "-b", "other", f"{pool}/top")  # relative to the pool's directory
    assert jrun("info", f"{pool}/top")["backing-filename"] == "other"
    assert content(f"{pool}/top")[:2 * B] == b"b" * B + b"t" * B  # copied in: the guest sees no change
    run("flatten", f"{pool}/top")
    assert jrun("info", f"{pool}/top")["backing-filename"] is None
    assert content(f"{pool}/top")[:2 * B] == b"b" * B + b"t" * B
    run("rm", f"{pool}/base")
    run("rm", f"{pool}/other")


def test_rm_sees_file_overlays_beside_the_pool(pool, tmp_path):
    run("create", f"{pool}/a", "1M")
    top = str(tmp_path / "top.vdk")
    run("create", "-f", "vdk", "-b", "pool/a", "-F", "pool", top)
    r = run("rm", f"{pool}/a", code=1)
    assert "top.vdk (overlay)" in r.stderr
    r = run("rm", "-r", "-v", f"{pool}/a")
    assert r.stdout.splitlines() == [f"removed {top}", f"removed {pool}/a"]


def test_commit_into_a_deeper_base(pool):
    run("create", f"{pool}/base", "1M")
    run("create", "-b", "base", "-F", "pool", f"{pool}/mid")
    run("create", "-b", "mid", "-F", "pool", f"{pool}/top")
    fill(f"{pool}/mid", [(0, b"m")])
    fill(f"{pool}/top", [(B, b"t")])
    run("commit", "-b", f"{pool}/base", f"{pool}/top")
    data = content(f"{pool}/base", backing=False)
    assert data[0:1] == b"m" and data[B:B + 1] == b"t"


def test_flatten_of_a_native_clone_frees_its_source(pool):
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, b"x" * B)])
    run("snapshot", "-c", "s", src)
    run("clone", f"{src}@s", f"{pool}/b")
    run("flatten", f"{pool}/b")
    assert holders(src, "s") == []
    run("snapshot", "-d", "s", src)
    run("rm", src)
    assert content(f"{pool}/b")[:B] == b"x" * B


def test_rebase_a_vdk_file_onto_a_pool_snapshot(pool, tmp_path):
    src = f"{pool}/a"
    run("create", src, "1M")
    fill(src, [(0, b"pool")])
    run("snapshot", "-c", "s", src)
    top = str(tmp_path / "top.vdk")
    vdisk.create(top, MiB)
    run("rebase", "-b", "pool/a@s", top)
    assert jrun("info", top)["backing-filename-format"] == "pool"
    assert holders(src, "s") == ["../top.vdk"]
    assert content(top)[:4] == bytes(4)  # safe rebase: the guest content did not change
    run("rebase", "-b", "pool/a@s", top)  # onto the same snapshot again: still one record, as in vdk
    assert holders(src, "s") == ["../top.vdk"]
    os.unlink(top)  # behind vdisk's back: a stale hold, a leak check reports and releases
    res = jrun("check", src, code=3)
    assert any("holder" in m for m in res["vdisk-leak-messages"])
    run("check", "-r", "leaks", src)
    assert holders(src, "s") == []


def test_resize(pool):
    img = f"{pool}/a"
    run("create", img, "1M")
    fill(img, [(MiB - B, b"z" * B)])
    run("resize", img, "+1M")
    assert jrun("info", img)["virtual-size"] == 2 * MiB
    assert content(img)[MiB - B:] == b"z" * B + bytes(MiB)
    run("resize", img, "512K", code=1)  # shrinking needs --shrink
    run("resize", "--shrink", img, "512K")
    run("resize", img, "1M")
    assert content(img) == bytes(MiB)


def test_measure(pool, tmp_path):
    img = f"{pool}/a"
    run("create", img, "8M")
    fill(img, [(0, pattern(9, MiB)), (4 * MiB, pattern(10, 2 * B))])
    raw = str(tmp_path / "a.raw")
    run("convert", img, raw)
    for fmt in ("qcow2", "vdk", "raw"):
        m = jrun("measure", "-O", fmt, img)
        assert m == jrun("measure", "-f", "raw", "-O", fmt, raw), fmt
        assert m["required"] >= MiB + 2 * B
    out = str(tmp_path / "a.qcow2")
    run("convert", "-O", "qcow2", img, out)
    assert os.path.getsize(out) <= jrun("measure", "-O", "qcow2", img)["required"]


def test_rm_recursive_of_a_family(pool, tmp_path):
    src = f"{pool}/a"
    run("create", src, "1M")
    run("clone", src, f"{pool}/b")
    run("clone", f"{pool}/b", f"{pool}/c")
    run("clone", f"{pool}/c", str(tmp_path / "d.vdk"))
    r = run("rm", src, code=1)
    assert "pool/b" in r.stderr
    r = run("rm", "-r", "-v", src)
    assert r.stdout.splitlines() == [f"removed {tmp_path}/d.vdk", f"removed {pool}/c", f"removed {pool}/b",
                                     f"removed {src}"]
    assert catalog(pool)["images"] == {} and not os.path.exists(tmp_path / "d.vdk")


def test_missing_pool_image_is_a_one_line_error(pool):
    for cmd in (["info"], ["map"], ["check"], ["snapshot", "-l"], ["rm"]):
        r = run(*cmd, f"{pool}/nope", code=1)
        assert "nope" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- mount
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_mount_and_dd(pool, tmp_path, monkeypatch):
    from vdisk.export.fuse.testing import Rig
    from vdisk.export.fuse.testing import run as sh

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    img = f"{pool}/disk"
    run("create", img, "8M")
    fill(img, [(0, b"old" * 1000)])
    run("snapshot", "-c", "before", img)
    data = pattern(11, MiB)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    mnt = str(tmp_path / "mnt")
    rig = Rig(str(tmp_path))
    try:
        rig.mount(img, mnt)
        assert os.path.getsize(os.path.join(mnt, "disk")) == 8 * MiB
        assert os.listdir(os.path.join(mnt, "snapshots")) == ["before"]
        sh("dd", f"if={src}", f"of={mnt}/disk", "bs=64k", f"seek={MiB // 65536}", "conv=notrunc,fsync",
           "oflag=direct")
        # while mounted, snapshot commands go through the mount's control socket
        run("snapshot", "-c", "during", img)
        assert sorted(os.listdir(os.path.join(mnt, "snapshots"))) == ["before", "during"]
        with open(os.path.join(mnt, "snapshots", "before"), "rb") as f:
            assert f.read(3000) == b"old" * 1000
        # a native clone of the live state: the mount takes the snapshot it needs
        run("clone", img, f"{pool}/live")
        r = run("rm", img, code=1)  # a clone depends on it (and the mount holds it)
        assert "pool/live" in r.stderr
        rig.umount(mnt)
    finally:
        rig.cleanup()
    got = content(img)
    assert got[:3000] == b"old" * 1000 and got[MiB:2 * MiB] == data
    assert content(img, snapshot="during")[MiB:2 * MiB] == data
    assert content(img, snapshot="before")[MiB:2 * MiB] == bytes(MiB)
    assert content(f"{pool}/live")[MiB:2 * MiB] == data
    assert holders(img, "clone-live") == ["live"]
    assert jrun("check", img)["vdisk-result"] == "clean"
