"""qcow2 interoperability with QEMU: images written by qemu-img/qemu-io read back
through vdisk identically to ``qemu-img convert -O raw``; images written by vdisk
pass ``qemu-img check`` and ``qemu-img compare``; snapshots move both ways."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import vdisk
from vdisk.drivers.base import Status

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.usefixtures("require_qemu")

MiB = 1 << 20


def run(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    assert r.returncode in ok, f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def qio(path: str, *cmds: str, fmt: str = "qcow2") -> None:
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def qemu_raw(path: str, tmp, *extra: str) -> bytes:
    out = str(tmp / f"{os.path.basename(path)}.{len(extra)}.raw")
    if os.path.exists(out):
        os.unlink(out)
    run(QEMU_IMG, "convert", *extra, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def vdisk_raw(path: str, **kw) -> bytes:
    with vdisk.open(path, read_only=True, **kw) as img:
        return img.read(0, img.size)


def qcheck(path: str) -> None:
    r = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def write_mix(path: str, cs: int, size: int) -> None:
    qio(
        path,
        "write -P 0xab 0 64k",
        f"write -P 0x11 {cs + 100} 7000",
        f"write -P 0x22 {size - 4096} 4096",
        f"write -P 0x33 {size // 2} {3 * cs}",
        f"write -z {size // 2 + cs} {cs}",
        f"discard {size // 2 + 2 * cs} {cs}",
    )


# ---------------------------------------------------------------------- QEMU writes, vdisk reads
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cs", ["4k", "64k", "2M"])
def test_read_qemu_images(tmp_path, compat, cs):
    p = str(tmp_path / "q.qcow2")
    size = 16 * MiB
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cs}", p, str(size))
    write_mix(p, {"4k": 4096, "64k": 65536, "2M": 2 * MiB}[cs], size)
    assert vdisk.detect_format(p) == "qcow2"
    assert vdisk_raw(p) == qemu_raw(p, tmp_path)
    with vdisk.open(p, read_only=True) as img:
        assert img.info()["compat"] == compat
        assert img.check().exit_code == 0
    # and vdisk writes into QEMU's image (v2 too): in place, new clusters, zeros, discard
    csz = {"4k": 4096, "64k": 65536, "2M": 2 * MiB}[cs]
    with vdisk.open(p) as img:
        img.write(10, b"w" * 100)
        img.write(5 * MiB + 3, os.urandom(3 * csz))
        img.write_zeroes(size // 2, csz)
        img.discard(0, csz)
        expect = img.read(0, size)
    qcheck(p)
    assert qemu_raw(p, tmp_path) == expect


@pytest.mark.parametrize("refbits", [1, 8, 64])
def test_read_and_write_qemu_refcount_widths(tmp_path, refbits):
    p = str(tmp_path / "r.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"refcount_bits={refbits},cluster_size=4k", p, "4M")
    qio(p, "write -P 0x5a 10000 50000")
    with vdisk.open(p) as img:
        assert img.check().exit_code == 0
        img.write(1 * MiB, b"v" * 30000)
    qcheck(p)
    assert vdisk_raw(p) == qemu_raw(p, tmp_path)


def test_backing_chain_with_format(tmp_path):
    base = str(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", base, "8M")
    qio(base, "write -P 0x01 0 8M")
    run(QEMU_IMG, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qio(mid, "write -P 0x02 1M 100k", "write -z 2M 64k", "write -z 3M 1000")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 0x03 1040k 3000", "discard 4M 64k")
    with vdisk.open(top, read_only=True) as img:
        assert img.driver.backing_ref.filename == "mid.qcow2"
        assert img.driver.backing_ref.format == "qcow2"
        assert img.backing.driver.backing_ref.format == "qcow2"
    assert vdisk_raw(top) == qemu_raw(top, tmp_path)
    # mid's zero cluster hides the base
    with vdisk.open(mid, read_only=True) as img:
        st = img.block_status(2 * MiB, 64 * 1024, chain=False)
        assert [e.status for e in st] == [Status.ZERO]


@pytest.mark.parametrize("cs", ["16k", "64k", "2M"])
def test_read_extended_l2_subclusters(tmp_path, cs):
    base = str(tmp_path / "eb.qcow2")
    top = str(tmp_path / "et.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}", base, "8M")
    qio(base, "write -P 0x11 1000 3000", "write -z 100k 8k", "write -P 0x22 1M 200k")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}", "-b", "eb.qcow2",
        "-F", "qcow2", top)
    qio(top, "write -P 0x33 4k 2k", "write -z 1M 64k", "write -P 0x44 5M 100k", "discard 5M 64k")
    assert vdisk_raw(top) == qemu_raw(top, tmp_path)
    with vdisk.open(top, read_only=True) as img:
        assert img.info()["extended_l2"] is True
        assert img.check().exit_code == 0
        st = img.block_status(1 * MiB, 4096, chain=False)
        assert [e.status for e in st] == [Status.ZERO]
    comp = str(tmp_path / "ec.qcow2")
    run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}", top, comp)
    assert vdisk_raw(comp) == qemu_raw(top, tmp_path)
    with pytest.raises(vdisk.VdiskError, match="read-only"):
        vdisk.open(top)


def test_raw_backing_named_with_format(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(3 * MiB))
    top = str(tmp_path / "top.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "4M")
    qio(top, "write -P 0x44 100 1000")
    assert vdisk_raw(top) == qemu_raw(top, tmp_path)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", ["4k", "64k", "2M"])
def test_read_qemu_compressed(tmp_path, ctype, cs):
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        for i in range(48):
            f.write((b"block %d " % i) * 8000 if i % 3 else os.urandom(65536))
        f.write(bytes(MiB))
    p = str(tmp_path / "c.qcow2")
    run(QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}", src, p)
    with vdisk.open(p, read_only=True) as img:
        assert img.info()["compression_type"] == ctype
        assert any(e.compressed for e in img.block_status(0, img.size, chain=False))
        assert img.check().exit_code == 0
    assert vdisk_raw(p) == qemu_raw(p, tmp_path)
    # writing over compressed clusters (partial and full) keeps the image sound
    with vdisk.open(p) as img:
        img.write(1000, b"x" * 5000)
        img.write(0x40000, b"y" * 0x20000)
    qcheck(p)
    assert vdisk_raw(p) == qemu_raw(p, tmp_path)


def test_qemu_snapshots_read_by_vdisk(tmp_path):
    p = str(tmp_path / "s.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", p, "4M")
    qio(p, "write -P 0x01 0 1M")
    run(QEMU_IMG, "snapshot", "-c", "first", p)
    qio(p, "write -P 0x02 512k 1M")
    run(QEMU_IMG, "snapshot", "-c", "second", p)
    qio(p, "write -P 0x03 0 64k")
    first = qemu_raw(p, tmp_path, "-l", "snapshot.name=first")
    second = qemu_raw(p, tmp_path, "-l", "snapshot.name=second")
    with vdisk.open(p, read_only=True) as img:
        assert [s.name for s in img.snapshot_list()] == ["first", "second"]
        assert img.check().exit_code == 0
    assert vdisk_raw(p, snapshot="first") == first
    assert vdisk_raw(p, snapshot="second") == second
    cur = qemu_raw(p, tmp_path)
    assert vdisk_raw(p) == cur
    # vdisk writes (COW of shared clusters), deletes and reverts qemu's snapshots
    with vdisk.open(p) as img:
        img.write(600 * 1024, b"v" * 100000)
    qcheck(p)
    assert vdisk_raw(p, snapshot="first") == first
    with vdisk.open(p) as img:
        img.snapshot_delete("first")
    qcheck(p)
    with vdisk.open(p) as img:
        img.snapshot_revert("second")
    qcheck(p)
    assert qemu_raw(p, tmp_path) == second


def test_qemu_v2_snapshots(tmp_path):
    p = str(tmp_path / "s2.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", p, "2M")
    qio(p, "write -P 0x0a 0 300k")
    run(QEMU_IMG, "snapshot", "-c", "old", p)
    qio(p, "write -P 0x0b 100k 300k")
    old = qemu_raw(p, tmp_path, "-l", "snapshot.name=old")
    assert vdisk_raw(p, snapshot="old") == old
    with vdisk.open(p) as img:
        img.snapshot_create("ours")
        img.write(0, b"w" * 5000)
        img.snapshot_revert("old")
    qcheck(p)
    assert qemu_raw(p, tmp_path) == old
    assert "ours" in run(QEMU_IMG, "snapshot", "-l", p).stdout


def test_vdisk_snapshots_seen_by_qemu(tmp_path):
    p = str(tmp_path / "v.qcow2")
    vdisk.create(p, 4 * MiB, format="qcow2")
    a = os.urandom(MiB)
    with vdisk.open(p) as img:
        img.write(0, a)
        img.snapshot_create("snap-a")
        img.write(100, b"after" * 1000)
    qcheck(p)
    out = run(QEMU_IMG, "snapshot", "-l", p).stdout
    assert "snap-a" in out
    assert qemu_raw(p, tmp_path, "-l", "snapshot.name=snap-a")[:MiB] == a
    run(QEMU_IMG, "snapshot", "-c", "from-qemu", p)
    run(QEMU_IMG, "snapshot", "-a", "snap-a", p)
    qcheck(p)
    assert vdisk_raw(p)[:MiB] == a
    with vdisk.open(p) as img:
        assert [s.name for s in img.snapshot_list()] == ["snap-a", "from-qemu"]
        img.snapshot_revert("from-qemu")
        assert img.read(100, 5000) == b"after" * 1000
    run(QEMU_IMG, "snapshot", "-d", "snap-a", p)
    qcheck(p)
    with vdisk.open(p) as img:
        img.snapshot_delete("from-qemu")
    qcheck(p)


# ---------------------------------------------------------------------- vdisk writes, QEMU reads
@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
def test_vdisk_images_pass_qemu_check_and_compare(tmp_path, cs):
    p = str(tmp_path / "w.qcow2")
    size = 9 * MiB + 4096
    model = bytearray(size)
    vdisk.create(p, size, format="qcow2", cluster_size=cs)
    with vdisk.open(p) as img:
        for off, n in [(0, 70000), (cs - 10, 20), (3 * MiB + 7, 2 * MiB), (size - 5000, 5000)]:
            d = os.urandom(n)
            img.write(off, d)
            model[off : off + n] = d
        img.write_zeroes(3 * MiB, MiB)
        model[3 * MiB : 4 * MiB] = bytes(MiB)
        img.discard(0, 2 * cs)
        model[0 : 2 * cs] = bytes(2 * cs)
    raw = str(tmp_path / "model.raw")
    with open(raw, "wb") as f:
        f.write(model)
    qcheck(p)
    run(QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", p, raw)
    info = json.loads(run(QEMU_IMG, "info", "--output=json", p).stdout)
    assert info["cluster-size"] == cs and info["format-specific"]["data"]["compat"] == "1.1"


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_vdisk_compressed_read_by_qemu(tmp_path, ctype):
    p = str(tmp_path / "c.qcow2")
    vdisk.create(p, 8 * MiB, format="qcow2", compression=ctype)
    data = b"".join((b"cluster %d " % i) * 6000 for i in range(40))[: 6 * MiB]
    with vdisk.open(p) as img:
        img.write(0, data)
        img.write(12345, b"partial")  # over a compressed cluster
        st = img.block_status(0, img.size, chain=False)
        assert any(e.compressed for e in st)
    model = bytearray(data)
    model[12345:12352] = b"partial"
    qcheck(p)
    info = json.loads(run(QEMU_IMG, "info", "--output=json", p).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    assert qemu_raw(p, tmp_path)[: len(model)] == bytes(model)
    assert os.path.getsize(p) < 2 * MiB


def test_vdisk_overlay_on_qemu_base(tmp_path):
    base = str(tmp_path / "base.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", base, "4M")
    qio(base, "write -P 0x61 0 4M")
    top = str(tmp_path / "top.qcow2")
    vdisk.create(top, format="qcow2", cluster_size=65536, backing_file=base, backing_format="qcow2")
    with vdisk.open(top) as img:
        img.write(1000, b"Z" * 100)  # partial cluster: COW from the base
        img.write_zeroes(MiB, 65536)  # zero flag hides the base
        img.discard(2 * MiB, 65536 + 10)
        img.resize(6 * MiB)  # grown range reads zeros
    qcheck(top)
    info = json.loads(run(QEMU_IMG, "info", "--output=json", top).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    expect = bytearray(b"\x61" * 4 * MiB + bytes(2 * MiB))
    expect[1000:1100] = b"Z" * 100
    expect[MiB : MiB + 65536] = bytes(65536)
    expect[2 * MiB : 2 * MiB + 65546] = bytes(65546)
    assert qemu_raw(top, tmp_path) == bytes(expect)
    assert vdisk_raw(top) == bytes(expect)


def test_lazy_refcounts_dirty_image_is_replayed(tmp_path):
    p = str(tmp_path / "d.qcow2")
    run(QEMU_IMG, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", p, "4M")
    # qemu-io's abort leaves the dirty bit set and the refcounts stale
    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x77 0 300k", "-c", "abort", p],
                   capture_output=True)
    with vdisk.open(p, read_only=True) as img:
        assert img.info()["dirty"] is True
        assert img.read(0, 300 * 1024) == b"\x77" * 300 * 1024
    with vdisk.open(p) as img:
        assert img.info()["dirty"] is False
        img.write(400 * 1024, b"after")
    qcheck(p)
    assert qemu_raw(p, tmp_path)[: 300 * 1024] == b"\x77" * 300 * 1024


def test_resize_matches_qemu(tmp_path):
    p = str(tmp_path / "g.qcow2")
    vdisk.create(p, MiB, format="qcow2", cluster_size=4096)
    with vdisk.open(p) as img:
        img.write(0, b"q" * MiB)
        img.resize(3 * MiB + 100)
        img.resize(MiB // 2 + 512, shrink=True)
    qcheck(p)
    info = json.loads(run(QEMU_IMG, "info", "--output=json", p).stdout)
    assert info["virtual-size"] == MiB // 2 + 512
    run(QEMU_IMG, "resize", p, "2M")
    qcheck(p)
    data = vdisk_raw(p)
    assert data == b"q" * (MiB // 2 + 512) + bytes(2 * MiB - (MiB // 2 + 512))
    assert data == qemu_raw(p, tmp_path)
