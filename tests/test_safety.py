"""Safety around clones, holds, backing references and formats vdisk does not know.

Each test here failed on vdisk 0.1: it removed images that clones depended on, let a
copy's removal break the real clone, let commit write outside the allowed
directories, reported a broken chain as clean, and took a VHD for raw.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

import vdisk
from vdisk.ops import chain

MiB = 1 << 20


def _gold(d, name="gold.vdk", data=b"golden"):
    p = os.path.join(d, name)
    vdisk.create(p, 4 * MiB)
    with vdisk.open(p) as img:
        img.write(0, data * 100)
        img.snapshot_create("s1")
        img.write(0, b"later!" * 100)
    return p


def _read(path, n=600, **kw):
    with vdisk.open(path, read_only=True, **kw) as img:
        return img.read(0, n)


# ------------------------------------------------------------------ rm and dependants
def test_rm_refuses_an_image_with_linked_clones_and_names_them(image_dir, run_vdisk):
    d = str(image_dir)
    gold = _gold(d)
    c = os.path.join(d, "c.vdk")
    run_vdisk("clone", f"{gold}@s1", c)
    r = run_vdisk("rm", gold, expect=1)
    assert r.stderr.count("\n") == 1 and "c.vdk" in r.stderr and "rm -r" in r.stderr
    assert os.path.exists(gold) and _read(c) == b"golden" * 100
    # deleting the snapshot hides it; the image still may not go while the clone holds it
    run_vdisk("snapshot", "delete", gold, "s1")
    r = run_vdisk("rm", gold, expect=1)
    assert "c.vdk" in r.stderr
    assert _read(c) == b"golden" * 100


def test_rm_refuses_a_raw_or_qcow2_base_with_an_overlay_next_to_it(image_dir, run_vdisk):
    d = str(image_dir)
    base = os.path.join(d, "base.qcow2")
    run_vdisk("create", "-f", "qcow2", base, "1M")
    run_vdisk("clone", base, os.path.join(d, "top.vdk"))
    r = run_vdisk("rm", base, expect=1)
    assert "top.vdk" in r.stderr and "overlay" in r.stderr
    assert os.path.exists(base)


def test_rm_recursive_removes_the_whole_family_deepest_first(image_dir, run_vdisk):
    d = str(image_dir)
    gold = _gold(d)
    c1, c2 = os.path.join(d, "c1.vdk"), os.path.join(d, "c2.vdk")
    run_vdisk("clone", f"{gold}@s1", c1)
    run_vdisk("clone", c1, c2)  # a clone of the clone (snapshots c1 first)
    r = run_vdisk("rm", "-r", "-n", gold)
    assert r.stdout.split("\n")[:3] == [f"would remove {c2}", f"would remove {c1}", f"would remove {gold}"]
    assert all(os.path.exists(p) for p in (gold, c1, c2))
    run_vdisk("rm", "-r", gold)
    assert not any(os.path.exists(p) for p in (gold, c1, c2))


def test_removing_a_copy_of_a_clone_keeps_the_real_clone_alive(image_dir, run_vdisk):
    """vdisk 0.1: copy a linked clone, delete the snapshot, rm the copy, and the real
    clone breaks ("no snapshot named '#1'")."""
    d = str(image_dir)
    gold = _gold(d)
    c = os.path.join(d, "c.vdk")
    run_vdisk("clone", f"{gold}@s1", c)
    copy = os.path.join(d, "copy.vdk")
    shutil.copyfile(c, copy)
    run_vdisk("snapshot", "delete", gold, "s1")
    run_vdisk("rm", copy)
    assert _read(c) == b"golden" * 100
    with vdisk.open(gold, read_only=True, backing=False) as img:
        (snap,) = img.snapshot_list(hidden=True)
        assert snap.hidden and snap.holds == 1 and snap.holders[0].path == "c.vdk"
    run_vdisk("rm", c)  # the real holder: its removal frees the hidden snapshot
    with vdisk.open(gold, read_only=True, backing=False) as img:
        assert img.snapshot_list(hidden=True) == []


def test_check_reports_and_releases_holds_whose_holder_is_gone(image_dir, run_vdisk):
    d = str(image_dir)
    gold = _gold(d)
    c = os.path.join(d, "c.vdk")
    run_vdisk("clone", f"{gold}@s1", c)
    run_vdisk("check", gold)  # the holder is there: clean
    os.unlink(c)  # deleted by hand, not with vdisk rm
    r = run_vdisk("check", "--output", "json", gold, expect=3)
    d_ = json.loads(r.stdout)
    assert d_["vdisk-result"] == "leaks" and any("c.vdk" in m for m in d_["vdisk-leak-messages"])
    run_vdisk("snapshot", "delete", gold, "s1")
    r = run_vdisk("check", "-r", "leaks", gold)
    assert "released" in r.stdout
    with vdisk.open(gold, read_only=True, backing=False) as img:
        assert img.snapshot_list(hidden=True) == []  # the hidden snapshot was freed with its last hold
    run_vdisk("check", gold)


def test_failed_release_is_reported_not_swallowed(image_dir, run_vdisk):
    d = str(image_dir)
    gold = _gold(d)
    c = os.path.join(d, "c.vdk")
    run_vdisk("clone", f"{gold}@s1", c)
    with vdisk.open(gold, backing=False):  # holds the write lock: the release cannot happen
        r = run_vdisk("rm", c, expect=None)
    assert r.returncode != 0 and "stays" in r.stderr and "check -r leaks" in r.stderr
    assert not os.path.exists(c)
    with vdisk.open(gold, read_only=True, backing=False) as img:
        assert img.snapshot_list()[0].holds == 1  # left held, and said so: check -r releases it
    run_vdisk("check", "-r", "leaks", gold)
    with vdisk.open(gold, read_only=True, backing=False) as img:
        assert img.snapshot_list()[0].holds == 0


def test_images_of_vdisk_0_1_keep_working_with_anonymous_holds(image_dir, run_vdisk):
    """formats/samples/v0.1: a clone made by vdisk 0.1 (a hold without identity)."""
    src_dir = os.path.join(os.path.dirname(__file__), "..", "formats", "samples", "v0.1")
    d = str(image_dir)
    for name in ("clone-source.vdk", "clone.vdk"):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(d, name))
    src, c = os.path.join(d, "clone-source.vdk"), os.path.join(d, "clone.vdk")
    with vdisk.open(src, read_only=True, backing=False) as img:
        assert img.driver.image_id is None
        (snap,) = img.snapshot_list(hidden=True)
        assert snap.holds == 1 and snap.holders == ()
    r = run_vdisk("rm", src, expect=1)
    assert "0.1" in r.stderr
    run_vdisk("check", src)  # a hold without identity cannot be verified: not a leak
    run_vdisk("rm", c)
    with vdisk.open(src, read_only=True, backing=False) as img:
        assert img.snapshot_list(hidden=True) == []
    run_vdisk("rm", src)


# ------------------------------------------------------------------ snapshots that cannot be held
def test_linked_clone_of_a_qcow2_snapshot_is_refused(image_dir, run_vdisk):
    d = str(image_dir)
    a = os.path.join(d, "a.qcow2")
    run_vdisk("create", "-f", "qcow2", a, "1M")
    run_vdisk("snapshot", "create", a, "s2")
    r = run_vdisk("clone", f"{a}@s2", os.path.join(d, "c.vdk"), expect=1)
    assert "cannot record" in r.stderr and "--full" in r.stderr
    assert not os.path.exists(os.path.join(d, "c.vdk"))
    r = run_vdisk("create", "-f", "vdk", "-b", "a.qcow2@s2", os.path.join(d, "t.vdk"), expect=1)
    assert "cannot record" in r.stderr
    run_vdisk("create", "-f", "vdk", os.path.join(d, "o.vdk"), "1M")
    r = run_vdisk("rebase", "-b", "a.qcow2@s2", "-F", "qcow2", os.path.join(d, "o.vdk"), expect=1)
    assert "cannot record" in r.stderr
    run_vdisk("clone", "--full", f"{a}@s2", os.path.join(d, "full.vdk"))  # a copy is fine


# ------------------------------------------------------------------ commit
def test_commit_refuses_an_overlay_with_snapshots(image_dir, run_vdisk):
    d = str(image_dir)
    base = os.path.join(d, "base.vdk")
    top = os.path.join(d, "top.vdk")
    vdisk.create(base, MiB)
    vdisk.create(top, backing_file=base)
    with vdisk.open(top) as img:
        img.write(0, b"A" * 4096)
        img.snapshot_create("s")
        img.write(0, b"B" * 4096)
    r = run_vdisk("commit", top, expect=1)
    assert "snapshots" in r.stderr
    assert _read(top, 4096, snapshot="s") == b"A" * 4096
    assert _read(base, 4096) == bytes(4096)


def test_commit_into_a_deeper_base(image_dir, run_vdisk):
    d = str(image_dir)
    base, mid, top = (os.path.join(d, n) for n in ("base.vdk", "mid.vdk", "top.vdk"))
    vdisk.create(base, MiB)
    vdisk.create(mid, backing_file=base)
    vdisk.create(top, backing_file=mid)
    with vdisk.open(mid) as img:
        img.write(0, b"m" * 8192)
    with vdisk.open(top) as img:
        img.write(4096, b"t" * 4096)
    run_vdisk("commit", "-b", base, top)
    want = b"m" * 4096 + b"t" * 4096
    assert _read(base, 8192) == want and _read(top, 8192) == want


# ------------------------------------------------------------------ the backing policy
def _hostile_overlay(d, backing_name, backing_format="raw"):
    """An overlay as a hostile party would ship it, naming any backing file."""
    p = os.path.join(d, "evil.vdk")
    vdisk.create(p, MiB)
    from vdisk.drivers.base import BackingRef

    with vdisk.open(p, backing=False) as img:
        img.set_backing(BackingRef(backing_name, backing_format))
    return p


def test_commit_cannot_write_outside_the_allowed_directories(tmp_path, run_vdisk):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    victim = outside / "victim.raw"
    victim.write_bytes(b"precious" * 512)
    top = _hostile_overlay(str(inside), "../out/victim.raw")
    with vdisk.open(top, backing=False) as img:
        img.write(0, b"EVIL" * 1024)
    for cmd in (["commit"], ["map"], ["flatten"], ["compare"], ["convert", "-O", "raw"], ["rebase", "-b", ""]):
        args = cmd + [top] + ([str(inside / "o.raw")] if cmd[0] == "convert" else [top] if cmd[0] == "compare" else [])
        r = run_vdisk(*args, expect=2 if cmd[0] == "compare" else 1)  # compare: 1 means "different"
        assert "outside the allowed directories" in r.stderr, cmd
    assert victim.read_bytes() == b"precious" * 512
    run_vdisk("commit", "--unsafe-backing", top)  # asked for: allowed
    assert victim.read_bytes()[:4096] == b"EVIL" * 1024


@pytest.mark.parametrize("name", ["/etc/shadow", "../../etc/passwd", "missing.raw", "evil.vdk"])
def test_check_fails_on_a_broken_or_hostile_chain(image_dir, run_vdisk, name):
    fmt = "vdk" if name == "evil.vdk" else "raw"
    top = _hostile_overlay(str(image_dir), name, fmt)  # evil.vdk names itself: a loop
    r = run_vdisk("check", top, expect=1)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vdisk: ")
    assert "No errors" not in r.stdout


def test_vdisk_never_makes_an_image_it_then_refuses(tmp_path, run_vdisk, monkeypatch):
    gold = _gold(str(tmp_path))
    sub = tmp_path / "vms"
    sub.mkdir()
    r = run_vdisk("clone", f"{gold}@s1", str(sub / "a.vdk"), expect=1)
    assert "VDISK_BACKING_DIRS" in r.stderr and not (sub / "a.vdk").exists()
    with vdisk.open(gold, read_only=True, backing=False) as img:
        assert img.snapshot_list()[0].holds == 0  # nothing was held for the refused clone
    r = run_vdisk("create", "-f", "vdk", "-b", "../gold.vdk", "-F", "vdk", str(sub / "b.vdk"), expect=1)
    assert "VDISK_BACKING_DIRS" in r.stderr and not (sub / "b.vdk").exists()
    # a clone into the directory above the source is fine, and opens without a flag
    run_vdisk("clone", f"{gold}@s1", str(tmp_path / "c.vdk"))
    run_vdisk("info", str(tmp_path / "c.vdk"))
    # with the directory allowed, both are made and both open
    env = {"VDISK_BACKING_DIRS": str(tmp_path)}
    run_vdisk("clone", f"{gold}@s1", str(sub / "a.vdk"), env=env)
    run_vdisk("create", "-f", "vdk", "-b", "../gold.vdk", "-F", "vdk", str(sub / "b.vdk"), env=env)
    run_vdisk("info", str(sub / "a.vdk"), env=env)
    run_vdisk("info", str(sub / "b.vdk"), env=env)


def test_relative_backing_is_relative_to_the_new_image_as_in_qemu_img(tmp_path, run_vdisk):
    d = tmp_path / "d"
    d.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(d / "qtop.qcow2")], check=True, cwd=tmp_path)
    run_vdisk("create", "-f", "vdk", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.vdk"), cwd=str(tmp_path))
    with vdisk.open(str(d / "top.vdk"), read_only=True) as img:
        assert os.path.samefile(img.backing.filename, d / "base.qcow2")
        assert img.driver.backing_ref.filename == "base.qcow2"


# ------------------------------------------------------------------ foreign formats
def _vhd_fixed(path, size=MiB):
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">Q", footer, 48, size)
    with open(path, "wb") as f:
        f.write(bytes(size) + bytes(footer))


_MAGICS = {"vhd-dynamic": (0, b"conectix"), "vhdx": (0, b"vhdxfile"), "vmdk": (0, b"KDMV"),
           "vmdk-cowd": (0, b"COWD"), "qed": (0, b"QED\0"), "luks": (0, b"LUKS\xba\xbe"),
           "vdi": (0x40, b"\x7f\x10\xda\xbe")}


def _magic_only(path, kind):
    if kind == "vhd-fixed":
        _vhd_fixed(path)
        return
    head = bytearray(MiB)
    off, magic = _MAGICS[kind]
    head[off:off + len(magic)] = magic
    with open(path, "wb") as f:
        f.write(bytes(head))


@pytest.mark.parametrize("kind", ["vmdk-cowd", "qed", "luks"])
def test_foreign_formats_are_refused_by_name_never_taken_for_raw(image_dir, run_vdisk, kind):
    p = str(image_dir / f"x.{kind}")
    _magic_only(p, kind)
    before = open(p, "rb").read()
    name = {"vmdk-cowd": "VMware ESX COWD", "qed": "QED", "luks": "LUKS"}[kind]
    for args in (["info", p], ["resize", p, "+1M"], ["snapshot", "create", p, "s"], ["check", p]):
        r = run_vdisk(*args, expect=1)
        assert f"is a {name}" in r.stderr, args
    assert open(p, "rb").read() == before
    run_vdisk("info", "-f", "raw", p)  # named raw by the user: opened as raw


@pytest.mark.parametrize("kind", ["vhd-fixed", "vhd-dynamic", "vhdx", "vdi", "vmdk"])
def test_a_broken_image_of_a_supported_format_is_never_taken_for_raw(image_dir, run_vdisk, kind):
    """A file with only the magic of a format vdisk reads is opened by that format's
    driver and refused, naming the format and the file; it is never served as raw."""
    p = str(image_dir / f"x.{kind}")
    _magic_only(p, kind)
    before = open(p, "rb").read()
    word = {"vhd-fixed": "vhd", "vhd-dynamic": "vhd", "vhdx": "vhdx", "vdi": "vdi", "vmdk": "extent"}[kind]
    for args in (["info", p], ["resize", p, "+1M"], ["snapshot", "create", p, "s"], ["check", p]):
        r = run_vdisk(*args, expect=None)
        assert r.returncode in (1, 2), (args, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert word in r.stderr.lower() and "x." + kind in r.stderr, (args, r.stderr)
    assert open(p, "rb").read() == before
    run_vdisk("info", "-f", "raw", p)  # named raw by the user: opened as raw


def test_a_guessed_raw_image_cannot_be_turned_into_another_format(image_dir):
    p = str(image_dir / "disk.img")
    open(p, "wb").write(bytes(MiB))
    qcow_magic = b"QFI\xfb\0\0\0\3"
    with vdisk.open(p) as img:  # format guessed: raw
        with pytest.raises(vdisk.errors.ReadOnlyImage, match="guessed"):
            img.write(0, qcow_magic)
        img.write(4096 * 4, b"ordinary data")  # other writes are fine
        img.write(0, b"boot sector")
    with vdisk.open(p, format="raw") as img:  # named: the user knows it is raw
        img.write(0, qcow_magic)
    assert open(p, "rb").read(8) == qcow_magic


# ------------------------------------------------------------------ one metadata budget per chain
def test_metadata_budget_covers_the_whole_chain(image_dir, monkeypatch, run_vdisk):
    """A 12.5 TiB vdk image holds a 1.6 MB L1 table; under a 4 MiB budget one opens,
    a chain of three does not, and the error names the budget (design property 6)."""
    d = str(image_dir)
    size = 100_000 * (128 << 20)  # 100,000 L1 entries of 64 KiB clusters
    paths = [os.path.join(d, f"l{i}.vdk") for i in range(3)]
    vdisk.create(paths[0], size)
    vdisk.create(paths[1], backing_file=paths[0])
    vdisk.create(paths[2], backing_file=paths[1])
    monkeypatch.setenv("VDISK_METADATA_BUDGET", "4M")
    with vdisk.open(paths[0], read_only=True):
        pass
    with pytest.raises(vdisk.errors.ResourceLimit, match="VDISK_METADATA_BUDGET"):
        vdisk.open(paths[2], read_only=True)
    r = run_vdisk("info", paths[2], expect=1)
    assert "VDISK_METADATA_BUDGET" in r.stderr and r.stderr.count("\n") == 1
    monkeypatch.delenv("VDISK_METADATA_BUDGET")
    with vdisk.open(paths[2], read_only=True) as img:  # the default budget is far larger
        assert img.size == size


def test_vdk_l1_tables_are_compact(image_dir):
    """An L1 table of 400,000 distinct entries (6.4 MB on disk) decodes into arrays of
    16 bytes an entry (at most 3x the table while decoding); as Python lists of ints it
    took 80 bytes an entry, 32 MB."""
    import random
    import tracemalloc

    from vdisk.codec import vdk as C

    rnd = random.Random(1)
    n = 400_000
    offs = [rnd.randrange(1, 1 << 40) << 16 for _ in range(n)]
    sums = [rnd.getrandbits(64) for _ in range(n)]
    buf = C.encode_l1(offs, sums)
    tracemalloc.start()
    try:
        got_offs, got_sums = C.decode_l1(buf, n)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(got_offs) == offs and list(got_sums) == sums
    assert peak < 3 * len(buf), f"decoding {len(buf)} bytes of L1 peaked at {peak} bytes"
    p = str(image_dir / "big.vdk")
    vdisk.create(p, n * (128 << 20))
    with vdisk.open(p, read_only=True) as img:
        assert img.driver.l1_off.itemsize == 8 and len(img.driver.l1_off) == n


def test_rebase_of_a_standalone_image_keeps_its_content_and_snapshots(image_dir, run_vdisk):
    """A safe rebase of a vdk image without a backing file onto another image: the
    zeros it copies in must stay explicit (a driver may store zeros as holes when
    there is no backing image), and an image with snapshots is refused, since its
    snapshots would start reading the new backing image."""
    d = str(image_dir)
    other = os.path.join(d, "other.raw")
    open(other, "wb").write(b"\xee" * MiB)
    img = os.path.join(d, "img.vdk")
    vdisk.create(img, MiB)
    with vdisk.open(img) as i:
        i.write(4096, b"own" * 100)
    before = _read(img, MiB)
    run_vdisk("rebase", "-b", "other.raw", "-F", "raw", img)
    assert _read(img, MiB) == before
    snap = os.path.join(d, "snap.vdk")
    vdisk.create(snap, MiB)
    with vdisk.open(snap) as i:
        i.snapshot_create("s")
    r = run_vdisk("rebase", "-b", "other.raw", "-F", "raw", snap, expect=1)
    assert "snapshots" in r.stderr
    assert _read(snap, MiB, snapshot="s") == bytes(MiB)
