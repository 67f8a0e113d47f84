"""``vdisk pool`` and its API (vdisk/pool/admin.py): gc frees what nothing needs and
keeps everything else readable, repacking keeps every image, snapshot and clone;
check finds corruption (exit 2) and leaks (exit 3); similar's estimates are close
to the exact figures; info's dedup ratio; offline dedup; the image-level check and
space accounting."""

from __future__ import annotations

import os
import random
import time

import pytest
from imagetools import jrun, run

import vdisk
from vdisk import block
from vdisk.codec import pool as pc
from vdisk.errors import ImageLocked
from vdisk.pool import admin
from vdisk.pool.store import Pool

B = 4096
MiB = 1 << 20


def physical(p: str) -> int:
    return admin.pool_info(p)["physical_bytes"]


def write(p: str, name: str, data: bytes, offset: int = 0, size: int = 64 * MiB) -> None:
    if not block.exists(f"{p}/{name}"):
        vdisk.create(f"{p}/{name}", size)
    with vdisk.open(f"{p}/{name}") as img:
        img.write(offset, data)


def read(spec: str, length: int, snapshot: str | None = None) -> bytes:
    with vdisk.open(spec, read_only=True, snapshot=snapshot) as img:
        return img.read(0, length)


def clone(p: str, src: str, snap: str, dst: str) -> None:
    block.create(f"{p}/{dst}", None, format="pool", backing_file=os.path.abspath(f"{p}/{src}"),
                 backing_format="pool", backing_snapshot=snap)


def pack_files(p: str) -> list[str]:
    d = os.path.join(p, "packs")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if not f.startswith("."))


# ---------------------------------------------------------------------- gc
def test_gc_frees_a_removed_images_unique_data_and_keeps_shared_data(pool):
    rnd = random.Random(1)
    shared, mine, theirs = rnd.randbytes(200 * B), rnd.randbytes(600 * B), rnd.randbytes(100 * B)
    write(pool, "a", shared + mine)
    write(pool, "b", shared + theirs)  # dedup: b stores only its own 100 blocks
    assert admin.pool_check(pool).exit_code == 0
    block.remove(f"{pool}/a")
    res = admin.pool_check(pool)
    assert res.exit_code == 0  # a's pack still holds b's shared blocks: not a leak, reclaimable
    assert res.reclaimable_bytes >= 600 * B
    before = physical(pool)
    rep = admin.pool_gc(pool)
    assert rep.packs_repacked == 1 and rep.blobs_moved >= 200
    assert rep.freed_bytes >= 600 * B * 0.95, rep
    assert before - physical(pool) == rep.freed_bytes
    assert read(f"{pool}/b", 300 * B) == shared + theirs
    assert admin.pool_check(pool).exit_code == 0
    again = admin.pool_gc(pool)  # nothing left to do
    assert again.freed_bytes == 0 and again.packs_repacked == 0 and again.packs_deleted == 0


def test_gc_deletes_the_packs_of_a_removed_image(pool):
    rnd = random.Random(2)
    write(pool, "keep", rnd.randbytes(50 * B))
    write(pool, "gone", rnd.randbytes(300 * B))
    block.remove(f"{pool}/gone")
    res = admin.pool_check(pool)
    assert res.exit_code == 3 and res.leaked_bytes >= 300 * B  # its pack is reached by no root any more
    assert "only older generations" in " ".join(res.leaks)
    rep = admin.pool_gc(pool)
    assert rep.packs_deleted >= 1 and rep.freed_bytes >= 300 * B
    assert admin.pool_check(pool).exit_code == 0
    assert read(f"{pool}/keep", 50 * B) == random.Random(2).randbytes(50 * B)


def test_repack_keeps_every_image_snapshot_clone_and_delta(pool):
    """A pack under half live is repacked; its live blobs include delta bases of
    another image, so those deltas are rebased; every state reads as before."""
    rnd = random.Random(3)
    base = rnd.randbytes(256 * B)
    write(pool, "gold", base)
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_create("s1")
    edited = bytearray(base[:50 * B])
    for i in range(50):
        edited[i * B + 100: i * B + 108] = rnd.randbytes(8)  # similar to gold's first 50 blocks
    write(pool, "sim", bytes(edited))
    over = rnd.randbytes(200 * B)
    with vdisk.open(f"{pool}/gold") as g:
        g.write(0, over)
        g.snapshot_create("s2")
        g.write(250 * B, rnd.randbytes(B))
    clone(pool, "gold", "s2", "c")
    with vdisk.open(f"{pool}/c") as c:
        c.write(10 * B, rnd.randbytes(3 * B))
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_delete("s1")  # blocks 50..199 of the first pack: nothing needs them
    info = admin.pool_info(pool)
    assert info["delta_blobs"] >= 40, "the test needs delta blobs based on gold's first pack"
    expect = {(f"{pool}/gold", None): read(f"{pool}/gold", 256 * B),
              (f"{pool}/gold", "s2"): read(f"{pool}/gold", 256 * B, "s2"),
              (f"{pool}/c", None): read(f"{pool}/c", 256 * B),
              (f"{pool}/sim", None): read(f"{pool}/sim", 50 * B)}
    rep = admin.pool_gc(pool)
    assert rep.packs_repacked >= 1 and rep.deltas_rebased >= 40 and rep.freed_bytes > 100 * B, rep
    for (spec, snap), data in expect.items():
        assert read(spec, len(data), snap) == data, (spec, snap)
    after = admin.pool_info(pool)
    assert after["delta_blobs"] == info["delta_blobs"]
    assert after["node_blobs"] <= info["node_blobs"]  # subtrees shared by gold, s2 and c stay shared
    assert after["unreferenced_bytes"] < info["unreferenced_bytes"]
    assert admin.pool_check(pool).exit_code == 0
    assert admin.pool_gc(pool).packs_repacked == 0
    with vdisk.open(f"{pool}/sim") as s:  # writable after gc (the index names the moved blobs)
        s.write(60 * B, base[60 * B: 61 * B])
    assert read(f"{pool}/sim", 61 * B)[60 * B:] == base[60 * B: 61 * B]


def test_gc_keeps_a_hidden_snapshot_a_clone_holds(pool):
    rnd = random.Random(4)
    old = rnd.randbytes(100 * B)
    write(pool, "gold", old)
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_create("s")
    clone(pool, "gold", "s", "c")
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_delete("s")  # held: hidden
        g.write(0, rnd.randbytes(100 * B))
    admin.pool_gc(pool)
    assert read(f"{pool}/c", 100 * B) == old
    assert admin.pool_check(pool).exit_code == 0


def test_gc_refuses_while_an_image_is_open(pool):
    write(pool, "a", b"x" * B)
    with vdisk.open(f"{pool}/a", read_only=True):
        with pytest.raises(ImageLocked, match="in use"):
            admin.pool_gc(pool)
        r = run("pool", "gc", pool, code=1)
        assert "in use" in r.stderr
    run("pool", "gc", pool)


def test_gc_deletes_stale_temporary_files_and_unlisted_segments(pool):
    write(pool, "a", random.Random(5).randbytes(20 * B))
    tmp = os.path.join(pool, "packs", ".tmp.1.2.3")
    with open(tmp, "wb") as f:
        f.write(b"x" * 1000)
    fresh = os.path.join(pool, "packs", ".tmp.1.2.4")
    with open(fresh, "wb") as f:
        f.write(b"y" * 10)
    os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    seg = os.path.join(pool, "index", "00000000000000ff")
    with open(seg, "wb") as f:
        f.write(pc.encode_segment(pc.SEG_FP, []))
    res = admin.pool_check(pool)
    assert res.exit_code == 3 and len(res.leaks) == 2, res.leaks
    rep = admin.pool_gc(pool)
    assert rep.tmp_files_deleted == 1 and rep.segments_deleted == 1
    assert not os.path.exists(tmp) and os.path.exists(fresh) and not os.path.exists(seg)
    assert admin.pool_check(pool).exit_code == 0


# ---------------------------------------------------------------------- check
def test_check_finds_a_flipped_byte_in_a_data_blob(pool):
    write(pool, "a", random.Random(6).randbytes(64 * B))
    assert run("pool", "check", pool).stdout.startswith("No errors")
    run("check", f"{pool}/a")
    big = max(pack_files(pool), key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(16 + 5 * B + 7)  # inside a raw data blob
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    res = jrun("pool", "check", pool, code=2)
    assert res["result"] == "corrupt" and res["corruptions"] >= 1
    assert any("checksum mismatch" in m for m in res["corruption-messages"])
    assert jrun("check", f"{pool}/a", code=2)["corruptions"] >= 1
    admin.pool_gc(pool)  # reachability does not depend on a data blob's bytes: gc may run
    assert admin.pool_check(pool).exit_code == 2  # and does not hide the damage


def test_gc_refuses_a_pool_whose_trees_are_damaged(pool):
    write(pool, "a", random.Random(6).randbytes(64 * B))
    write(pool, "b", random.Random(7).randbytes(8 * B))
    block.remove(f"{pool}/b")  # something gc would free
    ent = Pool(pool, lock=False)
    root = pc.Entry.from_json(ent.catalog["images"]["a"]["root"], "a")
    ent.close()
    with open(os.path.join(pool, "packs", f"{root.pack:016x}"), "r+b") as f:
        f.seek(root.offset + root.length // 2)  # inside a's root node
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    packs = pack_files(pool)
    with pytest.raises(Exception, match="damaged"):
        admin.pool_gc(pool)  # what the damaged node names cannot be known: nothing may go
    assert pack_files(pool) == packs
    assert admin.pool_check(pool).exit_code == 2


def test_check_finds_a_missing_pack(pool):
    write(pool, "a", random.Random(7).randbytes(16 * B))
    for f in pack_files(pool):
        os.unlink(f)
    res = admin.pool_check(pool)
    assert res.exit_code == 2 and any("missing" in m for m in res.corruptions)


def test_check_finds_a_leaked_pack_and_repairs_it(pool):
    write(pool, "a", random.Random(8).randbytes(16 * B))
    crashed = Pool(pool)  # a writer that put a pack and died before its commit
    crashed.append_blob(pc.RAW, random.Random(9).randbytes(B), 1)
    crashed.seal_pack()
    crashed.close()
    res = jrun("pool", "check", pool, code=3)
    assert res["result"] == "leaks" and res["leaked-objects"] == 1 and res["leaked-bytes"] > B
    assert "nothing refers to it" in res["leak-messages"][0]
    fixed = jrun("pool", "check", "-r", "leaks", pool)
    assert fixed["result"] == "clean" and fixed["leaks-fixed"] == 1 and fixed["repaired"]
    assert admin.pool_check(pool).exit_code == 0
    assert read(f"{pool}/a", 16 * B) == random.Random(8).randbytes(16 * B)


def test_image_check_and_space(pool):
    rnd = random.Random(10)
    write(pool, "a", rnd.randbytes(40 * B))
    with vdisk.open(f"{pool}/a") as img:
        img.snapshot_create("s")
        img.write(0, rnd.randbytes(10 * B))
    write(pool, "b", read(f"{pool}/a", 40 * B)[10 * B:])  # shares a's blocks 10..39
    r = jrun("check", f"{pool}/a")
    assert r["vdisk-result"] == "clean" and r["allocated-clusters"] == 40
    assert r["vdisk-checked-clusters"] >= 50  # live state and snapshot
    with vdisk.open(f"{pool}/a", read_only=True) as img:
        sp = img.space_usage()
    (sid,) = sp["snapshots"]
    live, snap = sp["live"], sp["snapshots"][sid]
    assert 10 * B <= live["unique_bytes"] < 10 * B + 20000  # its 10 new blocks, a leaf, nodes, a sketch
    assert 10 * B <= snap["unique_bytes"] < 10 * B + 20000  # the 10 blocks it holds alone
    assert live["shared_bytes"] >= 30 * B and live["referenced_bytes"] == live["unique_bytes"] + live["shared_bytes"]
    info = admin.pool_info(pool)
    (a,) = [i for i in info["per_image"] if i["image"] == "a"]
    assert a["total"]["unique_bytes"] >= 20 * B and a["total"]["shared_bytes"] >= 30 * B
    assert a["snapshots"][0]["unique_bytes"] == snap["unique_bytes"]


# ---------------------------------------------------------------------- info, ls
def test_info_dedup_and_compression_ratios(pool):
    data = random.Random(11).randbytes(500 * B)
    write(pool, "a", data)
    write(pool, "b", data)
    info = jrun("pool", "info", pool)
    assert info["images"] == 2 and info["data-blobs"] == 500
    assert info["dedup-ratio"] == pytest.approx(2.0, abs=0.01)
    assert info["compression-ratio"] == pytest.approx(1.0, abs=0.01)  # random bytes do not compress
    assert info["logical-bytes"] == 2 * 64 * MiB
    assert info["physical-bytes"] >= info["used-bytes"] >= 500 * B
    assert info["referenced-bytes"] >= 2 * 500 * B
    text = b"".join(b"line %08d of some text\n" % i for i in range(100 * B // 25))[: 100 * B]
    write(pool, "t", text)
    info = admin.pool_info(pool)
    assert info["data_blobs"] == 600 and info["data_bytes"] < (500 + 50) * B  # the text compresses
    assert info["compression_ratio"] == pytest.approx(600 * B / info["data_bytes"])
    # a snapshot and a clone share by lineage: not counted as deduplication
    with vdisk.open(f"{pool}/t") as t:
        t.snapshot_create("s")
    clone(pool, "t", "s", "tc")
    assert admin.pool_info(pool)["dedup_ratio"] == pytest.approx(info["dedup_ratio"])
    assert "dedup ratio:  " in run("pool", "info", pool).stdout


def test_ls_and_tree(pool):
    vdisk.create(f"{pool}/gold", MiB, options={"owner": "ops", "label": "os=debian:tier=gold"})
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_create("base")
        g.snapshot_create("v2")
    clone(pool, "gold", "base", "vm1")
    clone(pool, "gold", "base", "vm2")
    with vdisk.open(f"{pool}/vm1") as v:
        v.snapshot_create("x")
    clone(pool, "vm1", "x", "vm1b")
    ls = jrun("pool", "ls", pool)
    by = {i["name"]: i for i in ls}
    assert by["gold"]["owner"] == "ops" and by["gold"]["labels"] == {"os": "debian", "tier": "gold"}
    assert by["vm1"]["parent"] == "gold@base" and by["vm1b"]["parent"] == "vm1@x" and by["gold"]["parent"] is None
    tree = run("pool", "ls", "--tree", pool).stdout
    assert tree.splitlines() == [
        "gold (1 MiB)",
        "└── @base",
        "    ├── vm1 (1 MiB)",
        "    │   └── @x",
        "    │       └── vm1b (1 MiB)",
        "    └── vm2 (1 MiB)",
    ]
    assert "@v2" in run("pool", "ls", "--tree", "-l", pool).stdout
    forest = jrun("pool", "ls", "--tree", pool)
    assert [t["image"] for t in forest] == ["gold"]
    assert "os=debian" in run("pool", "ls", "-l", pool).stdout


def test_create_options(tmp_path):
    p = str(tmp_path / "p")
    r = jrun("pool", "create", "-o", "dedup=off,delta=off,zstd_level=9", p)
    assert r["settings"] == {"dedup": False, "delta": False, "compression": "zstd", "zstd_level": 9}
    assert run("pool", "create", "-o", "dedup=maybe", str(tmp_path / "q"), code=1).stderr.startswith("vdisk: ")
    run("pool", "create", "-o", "frobnicate=1", str(tmp_path / "q"), code=1)
    run("pool", "create", p, code=1)  # not empty


# ---------------------------------------------------------------------- similar
def test_similar_estimates_are_close_to_exact(tmp_path):
    p = str(tmp_path / "pool")
    admin.pool_create(p, {"delta": False})
    n = 16000  # about 1000 sampled hashes per image (1 in 16): a standard error under 2 points
    rnd = random.Random(12)
    base = [rnd.randbytes(B) for _ in range(n)]
    write(p, "base", b"".join(base))
    for name, frac in (("o0", 0.0), ("o50", 0.5), ("o90", 0.9)):
        k = int(n * frac)
        write(p, name, b"".join(base[:k]) + rnd.randbytes((n - k) * B))
    res = admin.pool_similar(p, exact=True)
    pairs = {(q["a"], q["b"]): q for q in res["pairs"]}
    assert len(pairs) == 6
    for other, frac in (("o0", 0.0), ("o50", 0.5), ("o90", 0.9)):
        q = pairs[("base", other)]
        ex = q["exact"]
        assert ex["a_in_b"] == pytest.approx(frac, abs=1e-9)
        assert ex["jaccard"] == pytest.approx(frac / (2 - frac), abs=1e-9)
        assert q["a_blocks"] == pytest.approx(n, rel=0.1)
    for q in res["pairs"]:
        for key in ("jaccard", "a_in_b", "b_in_a"):
            assert abs(q[key] - q["exact"][key]) < 0.05, (q["a"], q["b"], key, q[key], q["exact"][key])
    out = jrun("pool", "similar", p)
    assert out["pairs"][0]["a"] == "base" and out["pairs"][0]["b"] == "o90"
    assert "JACCARD" in run("pool", "similar", "--exact", p).stdout


def test_similar_against_another_pool(tmp_path):
    p1, p2 = str(tmp_path / "p1"), str(tmp_path / "p2")
    admin.pool_create(p1)
    admin.pool_create(p2)
    data = random.Random(13).randbytes(2000 * B)
    write(p1, "x", data)
    write(p2, "y", data)
    write(p2, "z", random.Random(14).randbytes(2000 * B))
    res = admin.pool_similar(p1, against=p2, exact=True)
    pairs = {(q["a"], q["b"]): q for q in res["pairs"]}
    assert set(pairs) == {("x", "y"), ("x", "z")}
    assert pairs[("x", "y")]["jaccard"] == 1.0 and pairs[("x", "z")]["jaccard"] == 0.0
    assert pairs[("x", "y")]["exact"]["shared_blocks"] == 2000


# ---------------------------------------------------------------------- dedup
def test_offline_dedup_then_gc_shrinks_a_dedup_off_pool(tmp_path):
    p = str(tmp_path / "pool")
    run("pool", "create", "-o", "dedup=off,delta=off", p)
    rnd = random.Random(15)
    data = rnd.randbytes(400 * B)
    write(p, "a", data)
    write(p, "b", data)
    write(p, "c", data[: 100 * B] + rnd.randbytes(100 * B))
    with vdisk.open(f"{p}/b") as img:
        img.snapshot_create("s")
    clone(p, "b", "s", "bc")
    info = admin.pool_info(p)
    assert info["data_blobs"] == 1000 and info["dedup_ratio"] == pytest.approx(1.0)
    before = info["physical_bytes"]
    res = jrun("pool", "dedup", p)
    assert res["dedup"]["duplicate-blobs"] == 500 and res["dedup"]["collisions"] == 0 and res["gc"] is None
    assert admin.pool_check(p).exit_code == 0  # the copies are unreferenced, still in their packs
    before_gc = physical(p)
    rep = admin.pool_gc(p)
    after = physical(p)
    assert before - after >= 500 * B * 0.95 and rep.freed_bytes == before_gc - after
    info = admin.pool_info(p)
    assert info["data_blobs"] == 500 and info["dedup_ratio"] == pytest.approx(1000 / 500)
    for name in ("a", "b", "bc"):
        assert read(f"{p}/{name}", 400 * B) == data
    assert read(f"{p}/b", 400 * B, "s") == data
    assert read(f"{p}/c", 100 * B) == data[: 100 * B]
    assert admin.pool_check(p).exit_code == 0
    assert admin.pool_dedup(p)["dedup"].duplicate_blobs == 0


def test_offline_dedup_rebases_deltas_and_refuses_open_images(tmp_path):
    p = str(tmp_path / "pool")
    admin.pool_create(p, {"dedup": False})  # delta on: a second copy becomes a delta, or a copy
    rnd = random.Random(16)
    base = rnd.randbytes(64 * B)
    write(p, "a", base)
    write(p, "b", base)
    near = bytearray(base)
    for i in range(64):
        near[i * B] ^= 1
    write(p, "c", bytes(near))
    with vdisk.open(f"{p}/a"), pytest.raises(ImageLocked, match="open"):
        admin.pool_dedup(p)
    res = admin.pool_dedup(p, gc=True)
    assert res["dedup"].duplicate_blobs >= 64 and res["gc"].freed_bytes > 0
    assert read(f"{p}/a", 64 * B) == base and read(f"{p}/b", 64 * B) == base
    assert read(f"{p}/c", 64 * B) == bytes(near)
    assert admin.pool_check(p).exit_code == 0


def test_a_sketch_too_large_for_one_blob_is_sampled_down(pool):
    """About 10000 sampled hashes (600 MiB of distinct data in one image) make a
    compressed sketch larger than a blob: the writer samples it down instead of
    failing every flush."""
    vdisk.create(f"{pool}/a", 1 << 30)
    rnd = random.Random(17)
    with vdisk.open(f"{pool}/a") as img:
        sk = img.driver.img.sketch
        for _ in range(12000 * 16):  # what writing 750 MiB of distinct blocks adds
            sk.add(rnd.getrandbits(64))
        img.write(0, b"x" * B)
    with vdisk.open(f"{pool}/a", read_only=True) as img:
        assert img.read(0, B) == b"x" * B
        assert img.driver.img.sketch.shift == 5
    assert admin.pool_check(pool).exit_code == 0


def _keys(obj, out: set) -> set:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            if k not in ("labels", "settings"):
                _keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _keys(v, out)
    return out


def test_every_json_key_is_in_the_help(tmp_path):
    p = str(tmp_path / "pool")
    outputs = {"create": jrun("pool", "create", "-o", "delta=off", p)}
    vdisk.create(f"{p}/a", MiB, options={"owner": "me", "label": "k=v"})
    write(p, "a", random.Random(18).randbytes(8 * B))
    with vdisk.open(f"{p}/a") as img:
        img.snapshot_create("s")
    clone(p, "a", "s", "b")
    with vdisk.open(f"{p}/a") as img:
        img.snapshot_delete("s")  # hidden, held by b
    outputs["info"] = jrun("pool", "info", p)
    outputs["ls"] = [jrun("pool", "ls", p), jrun("pool", "ls", "--tree", p)]
    outputs["check"] = jrun("pool", "check", p)
    outputs["gc"] = jrun("pool", "gc", p)
    outputs["similar"] = jrun("pool", "similar", "--exact", p)
    dd = jrun("pool", "dedup", "--gc", p)
    assert set(dd["gc"]) == set(outputs["gc"])  # its help refers to gc's keys
    outputs["dedup"] = {**dd, "gc": None}
    for cmd, out in outputs.items():
        text = " ".join(run("pool", cmd, "--help").stdout.split())
        missing = sorted(k for k in _keys(out, set()) if k not in text)
        assert not missing, f"vdisk pool {cmd} --help does not list {missing}"


def test_snapshot_list_shows_unique_bytes(pool):
    rnd = random.Random(19)
    write(pool, "a", rnd.randbytes(30 * B))
    with vdisk.open(f"{pool}/a") as img:
        img.snapshot_create("s")
        img.write(0, rnd.randbytes(10 * B))
    (s,) = jrun("snapshot", "list", f"{pool}/a")
    assert 10 * B <= s["vdisk-unique-bytes"] < 10 * B + 20000
