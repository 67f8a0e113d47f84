"""Snapshots, backing chains and clones through the Python API and the CLI."""

import json
import os
import subprocess

import pytest

import vdisk
from vdisk.errors import BackingError, ImageNotFound, SnapshotExists, SnapshotNotFound, UsageError
from vdisk.ops import chain

VDISK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "vdisk")


def run(*args, check=True):
    p = subprocess.run([VDISK, *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture
def gold(tmp_path):
    path = str(tmp_path / "gold.vdk")
    vdisk.create(path, 8 << 20)
    data = os.urandom(3 << 20)
    with vdisk.open(path) as img:
        img.write(1 << 20, data)
    return path, data


def test_snapshot_create_list_delete_revert(gold):
    path, data = gold
    with vdisk.open(path) as img:
        img.snapshot_create("before")
        img.write(1 << 20, b"new" * 1000)
        with pytest.raises(SnapshotExists):
            img.snapshot_create("before")
        assert [s.name for s in img.snapshot_list()] == ["before"]
        img.snapshot_revert("before")
        assert img.read(1 << 20, 3 << 20) == data
        img.snapshot_delete("before")
        assert img.snapshot_list() == []
        with pytest.raises(SnapshotNotFound):
            img.snapshot_delete("before")
        assert img.check().exit_code == 0


def test_snapshot_delete_frees_exactly_its_unique_space(gold):
    path, _ = gold
    with vdisk.open(path) as img:
        img.snapshot_create("a")
        img.write(1 << 20, os.urandom(1 << 20))  # 16 clusters now unique to "a"
        img.snapshot_create("b")
        unique = {s.name: s.unique_bytes for s in img.snapshot_list(space=True)}
        before = img.driver.rc.count(0)
        img.snapshot_delete("a")
        freed = img.driver.rc.count(0) - before
        # what the listing promised is what deleting gave back (data plus a's own L1 and L2)
        assert freed * img.cluster_size == unique["a"] >= 1 << 20
        assert img.check().exit_code == 0


def test_delete_a_middle_snapshot_keeps_the_others(gold):
    path, data = gold
    states = {}
    with vdisk.open(path) as img:
        for i in range(4):
            img.write(i * 65536, bytes([i + 1]) * 65536)
            img.snapshot_create(f"s{i}")
            states[f"s{i}"] = img.read(0, img.size)
        img.snapshot_delete("s1")
        img.snapshot_delete("s2")
    for name in ("s0", "s3"):
        with vdisk.open(path, snapshot=name) as s:
            assert s.read(0, s.size) == states[name]
    with vdisk.open(path) as img:
        assert img.check().exit_code == 0


def test_overlay_reads_through_and_zero_past_shorter_base(tmp_path):
    base = str(tmp_path / "base.raw")
    vdisk.create(base, 1 << 20, format="raw")
    with vdisk.open(base, format="raw") as b:
        b.write(0, b"B" * (1 << 20))
    top = str(tmp_path / "top.vdk")
    vdisk.create(top, 3 << 20, backing_file=base, backing_format="raw")
    with vdisk.open(top) as t:
        assert t.read((1 << 20) - 2, 4) == b"BB\0\0"
        t.write(10, b"top")
        assert t.read(8, 7) == b"BBtopBB"
        depths = {e.depth for e in t.block_status()}
        assert depths == {0, 1, -1} or depths >= {0, 1}
    with open(top, "rb") as f:
        assert b"base.raw" in f.read(8192)  # stored relative to the overlay


def test_backing_without_format_is_refused_for_raw(tmp_path):
    base = str(tmp_path / "base.raw")
    vdisk.create(base, 1 << 20, format="raw")
    with pytest.raises(UsageError, match="raw is never probed"):
        vdisk.create(str(tmp_path / "top.vdk"), None, backing_file=base)


def test_missing_backing_file_is_named(tmp_path):
    base = str(tmp_path / "base.vdk")
    vdisk.create(base, 1 << 20)
    top = str(tmp_path / "top.vdk")
    vdisk.create(top, None, backing_file=base)
    os.unlink(base)
    with pytest.raises(BackingError, match="base.vdk"):
        vdisk.open(top)


def test_loop_is_refused(tmp_path):
    a, b = str(tmp_path / "a.vdk"), str(tmp_path / "b.vdk")
    vdisk.create(a, 1 << 20)
    vdisk.create(b, None, backing_file=a)
    with pytest.raises(BackingError, match="loop"):
        chain.rebase(a, b)
    # an image made to point at its own overlay is refused when opened
    with vdisk.open(a) as img:
        img.set_backing(vdisk.drivers.base.BackingRef("b.vdk", "vdk"))
    with pytest.raises(BackingError, match="loop"):
        vdisk.open(b)


def test_commit_rebase_flatten_keep_content(tmp_path):
    base, top, other = (str(tmp_path / n) for n in ("base.vdk", "top.vdk", "other.vdk"))
    vdisk.create(base, 4 << 20)
    with vdisk.open(base) as b:
        b.write(0, os.urandom(2 << 20))
    vdisk.create(top, None, backing_file=base)
    with vdisk.open(top) as t:
        t.write(512 << 10, os.urandom(1 << 20))
        t.write_zeroes(3 << 20, 65536)
        want = t.read(0, t.size)
    chain.commit(top)
    with vdisk.open(base) as b:
        assert b.read(0, b.size) == want
    with vdisk.open(top) as t:
        assert t.read(0, t.size) == want
        assert all(e.status == 0 for e in t.block_status(chain=False)), "commit empties the overlay"
    vdisk.create(other, 4 << 20)
    with vdisk.open(other) as o:
        o.write(0, os.urandom(4 << 20))
    chain.rebase(top, other)
    with vdisk.open(top) as t:
        assert t.read(0, t.size) == want
        assert t.driver.backing_ref.filename == "other.vdk"
    chain.flatten(top)
    with vdisk.open(top) as t:
        assert t.read(0, t.size) == want and t.backing is None
        assert t.check().exit_code == 0


def test_unsafe_rebase_only_rewrites_the_reference(tmp_path):
    a, b, top = (str(tmp_path / n) for n in ("a.vdk", "b.vdk", "top.vdk"))
    for p, byte in ((a, b"a"), (b, b"b")):
        vdisk.create(p, 1 << 20)
        with vdisk.open(p) as img:
            img.write(0, byte * 100)
    vdisk.create(top, None, backing_file=a)
    chain.rebase(top, b, unsafe=True)
    with vdisk.open(top) as t:
        assert t.read(0, 1) == b"b"


def test_linked_clone_is_constant_size_and_survives_snapshot_delete(gold):
    path, data = gold
    with vdisk.open(path) as img:
        img.snapshot_create("golden")
    d = os.path.dirname(path)
    sizes = []
    for i in range(5):
        chain.clone(f"{path}@golden", os.path.join(d, f"c{i}.vdk"))
        sizes.append(os.stat(os.path.join(d, f"c{i}.vdk")).st_blocks)
    assert len(set(sizes)) == 1 and sizes[0] * 512 <= 512 << 10, "a linked clone holds only metadata"
    chain.clone(os.path.join(d, "c0.vdk"), os.path.join(d, "cc.vdk"))  # a clone of a clone
    with vdisk.open(path) as img:
        assert img.snapshot_list()[0].holds == 5
        img.snapshot_delete("golden")  # held: hidden, data kept
        img.write(1 << 20, bytes(3 << 20))
        assert img.snapshot_list() == []
    for name in ("c3.vdk", "cc.vdk"):
        with vdisk.open(os.path.join(d, name)) as c:
            assert c.read(1 << 20, 3 << 20) == data
    for i in range(1, 5):
        chain.remove(os.path.join(d, f"c{i}.vdk"))
    with vdisk.open(path) as img:
        assert img.info()["format_specific"]["hidden_snapshots"] == 1  # c0 still holds it
        assert img.check().exit_code == 0


def test_full_clone_is_independent(gold, tmp_path):
    path, data = gold
    dst = str(tmp_path / "full.vdk")
    chain.clone(path, dst, full=True)
    os.unlink(path)
    with vdisk.open(dst) as c:
        assert c.backing is None and c.read(1 << 20, 3 << 20) == data


def test_clone_source_missing(tmp_path):
    with pytest.raises(ImageNotFound):
        chain.clone(str(tmp_path / "nope.vdk"), str(tmp_path / "c.vdk"))


def test_cli_snapshot_clone_info_chain(gold):
    path, _ = gold
    d = os.path.dirname(path)
    run("snapshot", "create", path, "s1")
    snaps = json.loads(run("snapshot", "list", "--output", "json", path).stdout)
    assert [s["name"] for s in snaps] == ["s1"] and snaps[0]["vdisk-unique-bytes"] == 0
    run("clone", f"{path}@s1", os.path.join(d, "c.vdk"))
    info = json.loads(run("info", "--backing-chain", "--output", "json", os.path.join(d, "c.vdk")).stdout)
    assert len(info) == 2 and info[1]["filename"].endswith("gold.vdk")
    p = run("snapshot", "delete", path, "nope", check=False)
    assert p.returncode != 0 and "nope" in p.stderr
    run("rm", os.path.join(d, "c.vdk"))
    run("snapshot", "delete", path, "s1")
    assert json.loads(run("snapshot", "list", "--output", "json", path).stdout) == []
    assert run("check", path).returncode == 0


def test_a_refused_rebase_onto_the_snapshot_an_image_reads_keeps_its_hold(gold, tmp_path):
    """A clone with snapshots of its own, rebased onto the very snapshot it reads
    through, is refused (its snapshots read through the reference). The refusal must
    leave the clone's hold on that snapshot: deleting the snapshot afterwards only hides
    it, and the clone still reads its data. (Before, the rebase took a +1 hold, which
    only refreshed the clone's one record, and undid it with a -1 that removed the
    record: the delete then freed the snapshot under the clone. Found by the chain
    model's random exploration.)"""
    path, data = gold
    c1, c2 = str(tmp_path / "c1.vdk"), str(tmp_path / "c2.vdk")
    chain.clone(path, c1)  # gold gets the snapshot c1 reads through
    chain.clone(c1, c2)  # c1 gets a snapshot of its own
    with vdisk.open(path, read_only=True) as g:
        [snap] = g.snapshot_list()
        before = [(s.id, s.holds, s.holders) for s in g.snapshot_list(hidden=True)]
    with pytest.raises(UsageError, match="has snapshots"):
        chain.rebase(c1, f"{path}@{snap.name}")
    with vdisk.open(path, read_only=True) as g:
        assert [(s.id, s.holds, s.holders) for s in g.snapshot_list(hidden=True)] == before  # nothing changed
    run("snapshot", "delete", path, snap.name)
    with vdisk.open(path, read_only=True) as g:
        [hidden] = g.snapshot_list(hidden=True)
        assert hidden.hidden and hidden.holds == 1  # kept for c1
    for img in (c1, c2):
        with vdisk.open(img, read_only=True) as i:
            assert i.read(1 << 20, len(data)) == data
            assert i.check().exit_code == 0
    assert run("check", path).returncode == 0


def test_a_rebase_that_fails_after_its_hold_keeps_a_hold_the_image_had(gold, tmp_path, monkeypatch):
    """A rebase takes its hold on the new snapshot before it rewrites the image, and
    gives it back if the rewrite fails, but not a hold the image had before it (its
    one record on the snapshot it reads through now)."""
    path, _data = gold
    c1 = str(tmp_path / "c1.vdk")
    chain.clone(path, c1)
    with vdisk.open(path, read_only=True) as g:
        [snap] = g.snapshot_list()
        assert snap.holds == 1
    chain.rebase(c1, f"{path}@{snap.name}")  # onto the same snapshot: fine, one record

    def broken(*args, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(chain, "_rebase", broken)
    with pytest.raises(OSError):
        chain.rebase(c1, f"{path}@{snap.name}")
    with vdisk.open(path, read_only=True) as g:
        [after] = g.snapshot_list()
        assert after.holds == 1 and [h.path for h in after.holders] == ["c1.vdk"]
    other = str(tmp_path / "other.vdk")
    vdisk.create(other, 8 << 20)
    with vdisk.open(other) as o:
        o.snapshot_create("s")
    with pytest.raises(OSError):
        chain.rebase(c1, f"{other}@s")  # a new hold: given back
    with vdisk.open(other, read_only=True) as o:
        assert o.snapshot_list()[0].holds == 0
