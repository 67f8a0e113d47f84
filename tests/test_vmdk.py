"""VMDK: images qemu-img makes in every subformat read identically through vdisk;
images vdisk writes pass ``qemu-img check`` and read identically through qemu-img;
descriptor layouts, differencing disks (parentCID), the extent-file policy, locks,
streamOptimized's write-once rule, resize, and the codec against formats/vmdk.md."""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import vdisk
from vdisk.codec import vmdk as V
from vdisk.drivers.base import Status
from vdisk.errors import BackingError, ImageLocked, NotSupported, UsageError, VdiskError

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.usefixtures("require_qemu")

MiB = 1 << 20
GiB = 1 << 30
SIZE = 5 * MiB + 3 * 512  # not a multiple of the grain: a partial last grain


def run(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), check=False, capture_output=True, text=True)
    assert r.returncode in ok, f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def make_raw(path, size=SIZE, seed=1) -> bytes:
    """A raw disk with random data, a hole, a run of zeros inside data, and data at the tail."""
    rnd = random.Random(seed)
    buf = bytearray(size)
    buf[0:MiB] = rnd.randbytes(MiB)
    buf[MiB + 4096:MiB + 4096 + 300_000] = bytes(300_000)  # zeros, written
    buf[3 * MiB + 777:3 * MiB + 777 + 200_000] = rnd.randbytes(200_000)
    buf[size - 5000:] = rnd.randbytes(5000)
    with open(path, "wb") as f:
        f.write(buf)
    return bytes(buf)


def read_all(path, **kw) -> bytes:
    with vdisk.open(path, read_only=True, **kw) as img:
        return img.read(0, img.size)


def cid_of(path) -> int:
    with vdisk.open(path, read_only=True) as img:
        return img.driver.cid


def qemu_raw(path, out) -> bytes:
    run(QEMU_IMG, "convert", "-O", "raw", path, str(out))
    return Path(out).read_bytes()


# ----------------------------------------------------------------------------- qemu-img's images, read by vdisk
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat",
                                 "twoGbMaxExtentFlat"])
def test_qemu_vectors_read_identically(tmp_path, sub):
    raw = make_raw(tmp_path / "src.raw")
    img = tmp_path / f"{sub}.vmdk"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(tmp_path / "src.raw"), str(img))
    assert read_all(img) == raw
    with vdisk.open(img, read_only=True) as im:
        assert im.format == "vmdk" and im.size == SIZE
        ext = im.block_status(0, im.size)
        assert ext[0].offset == 0 and ext[-1].end == SIZE
        assert im.info()["vmdk_create_type"] == sub
        assert im.check().corruptions == []
    r = run(str(vdisk_exe()), "compare", "-f", "raw", "-F", "vmdk", str(tmp_path / "src.raw"), str(img))
    assert "identical" in r.stdout


def test_qemu_stream_holes_are_unallocated(tmp_path):
    make_raw(tmp_path / "src.raw")
    img = tmp_path / "s.vmdk"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(tmp_path / "src.raw"),
        str(img))
    with vdisk.open(img, read_only=True) as im:
        st = {e.status for e in im.block_status(2 * MiB, 64 * 1024, chain=False)}
        assert st == {Status.UNALLOCATED}
        assert all(e.compressed for e in im.block_status(0, MiB) if e.status == Status.DATA)


def test_multi_extent_across_2g_boundary(tmp_path):
    """twoGbMaxExtent* layouts have extents of 2 GiB: data straddling the boundary reads back."""
    size = 4 * GiB + MiB
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for off in (0, 2 * GiB - 3000, 4 * GiB + 100):
            f.seek(off)
            f.write(random.Random(off).randbytes(6000))
    for sub in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        img = tmp_path / f"{sub}.vmdk"
        run(QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(src), str(img))
        with vdisk.open(img, read_only=True) as im, open(src, "rb") as f:
            assert len(im.info()["extents"]) == 3
            for off in (0, 2 * GiB - 3000, 4 * GiB + 100):
                f.seek(off)
                assert im.read(off, 6000) == f.read(6000), (sub, off)
        with vdisk.open(img) as im:  # write across the extent boundary
            im.write(2 * GiB - 10, b"x" * 20)
        r = run(QEMU_IO, "-f", "vmdk", "-c", f"read -P 0x78 {2 * GiB - 10} 20", str(img))
        assert "20 bytes" in r.stdout
        run(QEMU_IMG, "check", str(img))


# ----------------------------------------------------------------------------- vdisk's images, read by qemu
@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_vdisk_convert_output_passes_qemu(tmp_path, sub):
    raw = make_raw(tmp_path / "src.raw")
    out = tmp_path / "out.vmdk"
    run(str(vdisk_exe()), "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(tmp_path / "src.raw"),
        str(out))
    run(QEMU_IMG, "check", str(out))
    run(QEMU_IMG, "compare", "-f", "raw", "-F", "vmdk", str(tmp_path / "src.raw"), str(out))
    assert qemu_raw(out, tmp_path / "back.raw") == raw
    assert read_all(out) == raw
    info = run(QEMU_IMG, "info", str(out)).stdout
    assert f"create type: {sub}" in info


def test_vdisk_writes_qemu_reads_and_back(tmp_path):
    """vdisk writes into its own image and into one qemu-img made; qemu-io writes into
    vdisk's; each reads what the other wrote."""
    rnd = random.Random(7)
    mine = tmp_path / "mine.vmdk"
    theirs = tmp_path / "theirs.vmdk"
    vdisk.create(mine, SIZE, format="vmdk")
    run(QEMU_IMG, "create", "-f", "vmdk", str(theirs), str(SIZE))
    for path in (mine, theirs):
        m = bytearray(SIZE)
        with vdisk.open(path) as img:
            for _ in range(60):
                off = rnd.randrange(0, SIZE - 70_000)
                d = rnd.randbytes(rnd.randrange(1, 70_000))
                img.write(off, d)
                m[off:off + len(d)] = d
            img.write_zeroes(4096, 200_000)
            m[4096:204_096] = bytes(200_000)
        run(QEMU_IMG, "check", str(path))
        assert qemu_raw(path, tmp_path / "q.raw") == m
        run(QEMU_IO, "-f", "vmdk", "-c", "write -P 0x5a 1000 70000", str(path))
        m[1000:71000] = b"\x5a" * 70000
        assert read_all(path) == m
        with vdisk.open(path, read_only=True) as img:
            assert img.check().corruptions == []


def test_redundant_grain_tables_kept_in_step(tmp_path):
    path = tmp_path / "r.vmdk"
    vdisk.create(path, 40 * MiB, format="vmdk")
    with vdisk.open(path) as img:
        for off in (0, 5 * MiB, 33 * MiB + 17):  # two grain tables
            img.write(off, b"q" * 100_000)
    data = Path(path).read_bytes()
    h = V.decode_header(data[:512])
    assert h.redundant and h.rgd_offset and h.gd_offset
    n = h.gd_entries
    gd = V.decode_entries(data[h.gd_offset * 512:h.gd_offset * 512 + 4 * n])
    rgd = V.decode_entries(data[h.rgd_offset * 512:h.rgd_offset * 512 + 4 * n])
    for a, b in zip(gd, rgd):
        assert a != b
        gt = data[a * 512:a * 512 + 2048]
        assert gt == data[b * 512:b * 512 + 2048] and any(gt)
    run(QEMU_IMG, "check", str(path))


def test_descriptor_layouts_take_writes(tmp_path):
    make_raw(tmp_path / "src.raw")
    for sub in ("monolithicFlat", "twoGbMaxExtentSparse"):
        img = tmp_path / f"{sub}.vmdk"
        run(QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", str(tmp_path / "src.raw"),
            str(img))
        with vdisk.open(img) as im:
            old_cid = im.driver.cid
            im.write(2 * MiB + 5, b"w" * 150_000)
        cid = im.driver.cid  # given at the flush that closing made
        assert cid != old_cid
        with vdisk.open(img, read_only=True) as im:
            assert im.read(2 * MiB + 5, 150_000) == b"w" * 150_000
            assert im.driver.cid == cid
        r = run(QEMU_IO, "-f", "vmdk", "-c", f"read -P 0x77 {2 * MiB + 5} 150000", str(img))
        assert "150000 bytes" in r.stdout
        run(QEMU_IMG, "check", str(img))
        text = Path(img).read_text()
        assert re.search(rf"^CID={cid:08x}$", text, re.MULTILINE), "the first write gives the disk a new CID"


# ----------------------------------------------------------------------------- streamOptimized is written once
def test_stream_rewrite_refused_like_qemu(tmp_path):
    make_raw(tmp_path / "src.raw")
    out = tmp_path / "s.vmdk"
    run(str(vdisk_exe()), "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
        str(tmp_path / "src.raw"), str(out))
    with vdisk.open(out) as img:
        with pytest.raises(NotSupported, match="written once"):
            img.write(0, b"x")
        with pytest.raises(NotSupported, match="written once"):
            img.write(2 * MiB, b"x")  # an unallocated grain of an image that holds data
    # qemu-io refuses to rewrite an allocated grain of a streamOptimized image too
    r = run(QEMU_IO, "-f", "vmdk", "-c", "write -P 1 0 512", str(out), ok=(0, 1))
    assert "failed" in (r.stdout + r.stderr).lower()


def test_stream_sequential_writes_and_one_partial_grain(tmp_path):
    path = tmp_path / "s.vmdk"
    vdisk.create(path, SIZE, format="vmdk", options={"subformat": "streamOptimized"})
    run(QEMU_IMG, "check", str(path))
    assert read_all(path) == bytes(SIZE)  # an empty stream is a complete image
    data = random.Random(3).randbytes(SIZE)
    with vdisk.open(path) as img:
        img.write(0, data[:100_000])  # ends inside a grain: buffered
        img.write(100_000, data[100_000:3 * MiB])
        img.flush()  # a complete image at every flush
        run(QEMU_IMG, "check", "-U", str(path))
        img.write(4 * MiB, data[4 * MiB:])
        with pytest.raises(NotSupported):
            img.write(0, b"again")
    want = data[:3 * MiB] + bytes(MiB) + data[4 * MiB:]
    assert read_all(path) == want
    run(QEMU_IMG, "check", str(path))
    assert qemu_raw(path, tmp_path / "b.raw") == want
    tail = Path(path).read_bytes()[-1536:]
    assert V.decode_marker(tail[:512]).type == V.MARKER_FOOTER and V.decode_marker(tail[1024:]).type == V.MARKER_EOS
    assert V.decode_header(Path(path).read_bytes()[:512]).gd_offset == V.GD_AT_END


# ----------------------------------------------------------------------------- differencing disks
def test_qemu_child_read_through_chain(tmp_path):
    base = tmp_path / "base.vmdk"
    child = tmp_path / "child.vmdk"
    run(QEMU_IMG, "create", "-f", "vmdk", str(base), "4M")
    run(QEMU_IO, "-f", "vmdk", "-c", "write -P 0x11 0 2M", str(base))
    run(QEMU_IMG, "create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(child))
    run(QEMU_IO, "-f", "vmdk", "-c", "write -P 0x22 1M 100k", str(child))
    want = qemu_raw(child, tmp_path / "c.raw")
    with vdisk.open(child, read_only=True) as img:
        assert img.backing is not None and img.info()["backing_filename"] == "base.vmdk"
        assert img.read(0, img.size) == want
        assert {e.depth for e in img.block_status(0, img.size) if e.status == Status.DATA} == {0, 1}


def test_vdisk_child_read_by_qemu_and_cid_checked(tmp_path):
    base = tmp_path / "base.vmdk"
    child = tmp_path / "child.vmdk"
    vdisk.create(base, 4 * MiB, format="vmdk")
    with vdisk.open(base) as b:
        b.write(0, b"\x11" * (2 * MiB))
    vdisk.create(child, format="vmdk", backing_file="base.vmdk", backing_format="vmdk")
    with vdisk.open(child) as c:
        c.write(MiB + 3, b"\x22" * 100_000)  # a partial grain: the rest comes from the parent
    want = bytearray(b"\x11" * (2 * MiB) + bytes(2 * MiB))
    want[MiB + 3:MiB + 3 + 100_000] = b"\x22" * 100_000
    assert read_all(child) == want
    run(QEMU_IMG, "check", str(child))
    assert qemu_raw(child, tmp_path / "c.raw") == want
    # the parent changes after the child was made: its CID no longer matches
    with vdisk.open(base) as b:
        b.write(0, b"\x33")
    with pytest.raises(BackingError, match="CID"):
        vdisk.open(child, read_only=True)


def test_parent_loop_and_self_extent_refused(tmp_path):
    a = tmp_path / "a.vmdk"
    vdisk.create(a, MiB, format="vmdk")
    cid = cid_of(a)
    # a's parent is a itself (CID matching, so only the loop can stop it)
    data = bytearray(a.read_bytes())
    text = data[512:512 * 21].split(b"\0")[0]
    new = text.replace(b"parentCID=ffffffff", b'parentCID=%08x\nparentFileNameHint="a.vmdk"' % cid)
    data[512:512 + len(new)] = new
    a.write_bytes(data)
    with pytest.raises(BackingError, match="loops"):
        vdisk.open(a, read_only=True)
    d = tmp_path / "d.vmdk"
    d.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                 'RW 2048 FLAT "d.vmdk" 0\n')
    with pytest.raises(BackingError, match="named twice|image itself"):
        vdisk.open(d, read_only=True)


def test_extent_files_follow_the_backing_policy(tmp_path):
    inside = tmp_path / "vm"
    inside.mkdir()
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"S" * 4096)
    d = inside / "d.vmdk"
    d.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                 'RW 8 FLAT "../secret.raw" 0\n')
    with pytest.raises(BackingError, match="outside the allowed directories"):
        vdisk.open(d, read_only=True)
    with vdisk.open(d, read_only=True, unsafe_backing=True) as img:
        assert img.read(0, 4096) == b"S" * 4096
    r = subprocess.run([str(vdisk_exe()), "info", str(d)], check=False, capture_output=True, text=True)
    assert r.returncode != 0 and "outside the allowed" in r.stderr and "Traceback" not in r.stderr
    missing = inside / "m.vmdk"
    missing.write_text('# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\nRW 8 FLAT "nope.raw" 0\n')
    with pytest.raises(VdiskError, match="does not exist"):
        vdisk.open(missing, read_only=True)


def test_locks_cover_every_extent(tmp_path):
    make_raw(tmp_path / "src.raw")
    img = tmp_path / "f.vmdk"
    run(QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(tmp_path / "src.raw"),
        str(img))
    flat = tmp_path / "f-flat.vmdk"
    with vdisk.open(img):
        for path, fmt in ((img, "vmdk"), (flat, "raw")):
            r = run(QEMU_IO, "-f", fmt, "-c", "write 0 512", str(path), ok=(0, 1))
            assert "lock" in r.stderr, (path, r.stderr)
    proc = subprocess.Popen([QEMU_IO, "-f", "vmdk", str(img)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()
        with pytest.raises(ImageLocked):
            vdisk.open(flat, format="raw")
        with pytest.raises(ImageLocked):
            vdisk.open(img)
    finally:
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(10)


# ----------------------------------------------------------------------------- resize, create options
def test_resize_past_the_grain_directory(tmp_path):
    path = tmp_path / "g.vmdk"
    vdisk.create(path, MiB, format="vmdk", cluster_size=4096)  # one GT covers 2 MiB
    with vdisk.open(path) as img:
        img.write(MiB - 10, b"e" * 10)
        img.resize(300 * MiB)  # many more GD entries than the directory's sector holds
        img.write(299 * MiB, b"f" * 5000)
    with vdisk.open(path, read_only=True) as img:
        assert img.size == 300 * MiB
        assert img.read(MiB - 10, 10) == b"e" * 10 and img.read(299 * MiB, 5000) == b"f" * 5000
        assert img.read(MiB, 4096) == bytes(4096)
        assert img.check().corruptions == []
    run(QEMU_IMG, "check", str(path))
    r = run(QEMU_IO, "-f", "vmdk", "-c", f"read -P 0x66 {299 * MiB} 5000", str(path))
    assert "5000 bytes" in r.stdout
    assert f"{300 * MiB} bytes" in run(QEMU_IMG, "info", str(path)).stdout


def test_create_options_refused_clearly(tmp_path):
    for kw in ({"options": {"subformat": "monolithicFlat"}}, {"options": {"nope": "1"}}, {"cluster_size": 3000},
               {"compression": "zstd", "options": {"subformat": "streamOptimized"}}, {"compression": "zlib"}):
        with pytest.raises(UsageError):
            vdisk.create(tmp_path / "x.vmdk", MiB, format="vmdk", **kw)
        assert not (tmp_path / "x.vmdk").exists()


# ----------------------------------------------------------------------------- the codec against formats/vmdk.md
def test_spec_tables_match_the_codec():
    doc = (Path(__file__).parent.parent / "formats" / "vmdk.md").read_text()

    def table(section: str) -> dict:
        text = doc.split(f"\n## {section}.", 1)[1].split("\n## ", 1)[0]
        return {name: (int(off), int(size))
                for off, size, name in re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \|", text, re.MULTILINE)}

    assert table("4") == V.HEADER_FIELDS
    assert table("6") == V.MARKER_FIELDS
    assert sum(size for _o, size in V.HEADER_FIELDS.values()) == V.HEADER_SIZE
    h = V.SparseHeader(1, 3, 2048, 128, 1, 20, 512, 21, 26, 128)
    raw = h.encode()
    assert len(raw) == 512 and V.decode_header(raw) == h
    for name, (off, size) in V.HEADER_FIELDS.items():
        if name in ("capacity", "gdOffset"):
            assert int.from_bytes(raw[off:off + size], "little") == {"capacity": 2048, "gdOffset": 26}[name]
    assert struct.unpack_from("<QII", V.encode_meta_marker(V.MARKER_GD, 4)) == (4, 0, V.MARKER_GD)
    for limit in ("MAX_DESCRIPTOR_BYTES", "MAX_EXTENTS", "MIN_GRAIN_SECTORS", "MAX_GRAIN_SECTORS"):
        assert f"`{limit}` = {getattr(V, limit)}" in doc, limit


def test_inflate_is_bounded():
    import zlib

    bomb = zlib.compress(bytes(64 << 20))
    with pytest.raises(VdiskError, match="past the grain size"):
        V.inflate_grain(bomb, 65536)
    assert V.inflate_grain(zlib.compress(b"abc"), 16) == b"abc" + bytes(13)
    with pytest.raises(VdiskError, match="ends before"):
        V.inflate_grain(zlib.compress(b"a" * 1000)[:-6], 4096)


def vdisk_exe():
    return Path(sys.executable).parent / "vdisk"


def test_convert_into_a_child_with_backing(tmp_path):
    """convert -B makes a VMDK child holding only what differs from its parent (the
    parent's CID found although convert builds the file unnamed)."""
    raw = bytearray(make_raw(tmp_path / "src.raw"))
    base = tmp_path / "base.vmdk"
    run(str(vdisk_exe()), "convert", "-f", "raw", "-O", "vmdk", str(tmp_path / "src.raw"), str(base))
    raw[2 * MiB:2 * MiB + 4096] = b"\x44" * 4096
    (tmp_path / "new.raw").write_bytes(raw)
    child = tmp_path / "child.vmdk"
    run(str(vdisk_exe()), "convert", "-f", "raw", "-O", "vmdk", "-B", "base.vmdk", "-F", "vmdk",
        str(tmp_path / "new.raw"), str(child))
    assert read_all(child) == raw
    with vdisk.open(child, read_only=True) as img:
        own = [e for e in img.block_status(0, img.size) if e.status == Status.DATA and e.depth == 0]
        assert sum(e.length for e in own) == 65536  # one grain of its own
    run(QEMU_IMG, "check", str(child))
    run(QEMU_IMG, "compare", "-f", "raw", "-F", "vmdk", str(tmp_path / "new.raw"), str(child))


def test_rebase_unsafe_onto_a_vmdk_parent(tmp_path):
    a, b, c = (tmp_path / f"{n}.vmdk" for n in "abc")
    for p in (a, b):
        vdisk.create(p, MiB, format="vmdk")
    vdisk.create(c, format="vmdk", backing_file="a.vmdk", backing_format="vmdk")
    run(str(vdisk_exe()), "rebase", "-u", "-b", "b.vmdk", "-F", "vmdk", str(c))
    text = Path(c).read_bytes()[512:512 * 21].split(b"\0")[0].decode()
    bcid = cid_of(b)
    assert f"parentCID={bcid:08x}" in text and 'parentFileNameHint="b.vmdk"' in text
    with vdisk.open(c, read_only=True) as img:
        assert img.backing.filename.endswith("b.vmdk")
    assert "backing file: b.vmdk" in run(QEMU_IMG, "info", str(c)).stdout
    r = subprocess.run([str(vdisk_exe()), "rebase", "-u", "-b", "a.vmdk", "-F", "raw", str(c)], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "must be a VMDK" in r.stderr


# ----------------------------------------------------------------------------- model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

MODEL_SIZE = 3 * MiB + 512
op = hst.one_of(
    hst.tuples(hst.just("write"), hst.integers(0, MODEL_SIZE - 1), hst.integers(1, 200_000), hst.integers(0, 255)),
    hst.tuples(hst.just("zero"), hst.integers(0, MODEL_SIZE - 1), hst.integers(1, 300_000), hst.just(0)),
    hst.tuples(hst.just("discard"), hst.integers(0, MODEL_SIZE - 1), hst.integers(1, 300_000), hst.just(0)),
    hst.tuples(hst.just("reopen"), hst.just(0), hst.just(0), hst.just(0)),
)


@settings(max_examples=int(os.environ.get("VDISK_VMDK_MODEL_EXAMPLES", "25")), deadline=None, suppress_health_check=list(HealthCheck))
@given(child=hst.booleans(), zeroed=hst.booleans(), ops=hst.lists(op, min_size=1, max_size=25))
def test_model_monolithic_sparse(tmp_path_factory, child, zeroed, ops):
    """Random writes, zeroes, discards and reopens of a monolithicSparse disk (or a
    child on a parent holding data) read as an in-memory model, through vdisk and
    through qemu-img, and pass both checks."""
    d = tmp_path_factory.mktemp("model")
    top = d / "top.vmdk"
    opts = {"zeroed_grain": "on" if zeroed else "off"}
    model = bytearray(MODEL_SIZE)
    if child:
        vdisk.create(d / "base.vmdk", MODEL_SIZE, format="vmdk")
        with vdisk.open(d / "base.vmdk") as b:
            model[:] = random.Random(9).randbytes(MODEL_SIZE)
            b.write(0, bytes(model))
        vdisk.create(top, format="vmdk", backing_file="base.vmdk", backing_format="vmdk", options=opts)
    else:
        vdisk.create(top, MODEL_SIZE, format="vmdk", options=opts)
    img = vdisk.open(top)
    try:
        for kind, off, n, val in ops:
            n = min(n, MODEL_SIZE - off)
            if kind == "write":
                img.write(off, bytes([val]) * n)
                model[off:off + n] = bytes([val]) * n
            elif kind in ("zero", "discard"):
                getattr(img, "write_zeroes" if kind == "zero" else "discard")(off, n)
                model[off:off + n] = bytes(n)
            else:
                img.close()
                img = vdisk.open(top)
            assert img.read(0, MODEL_SIZE) == model
    finally:
        img.close()
    assert read_all(top) == model
    with vdisk.open(top, read_only=True) as im:
        assert im.check().corruptions == []
    run(QEMU_IMG, "check", str(top))
    (d / "model.raw").write_bytes(model)
    run(QEMU_IMG, "compare", "-f", "raw", "-F", "vmdk", str(d / "model.raw"), str(top))


# ----------------------------------------------------------------------------- crash states
def test_crash_states_of_monolithic_sparse():
    """Power cuts anywhere in a workload of writes (new grains, rewrites, partial
    grains over a parent-less disk), zeroes and flushes: every crash state opens, its
    check is clean, and every sector reads as it was at the last completed flush or
    after a later operation (never a grain table entry pointing at unwritten data)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from crash.storage import CrashLog, MemStorage, RecordingStorage

    from vdisk.block import Image
    from vdisk.drivers.base import CreateOptions
    from vdisk.drivers.vmdk import VmdkDriver

    size = 2 * MiB
    mem = MemStorage(name="c.vmdk")
    VmdkDriver.create(mem, size, CreateOptions())
    base = mem.snapshot()
    rec = RecordingStorage(base, "c.vmdk")
    img = Image(VmdkDriver.open(rec, read_only=False), "c.vmdk", None)
    rng = random.Random(int(os.environ.get("VDISK_VMDK_CRASH_SEED", "11")))
    model = bytearray(size)
    bounds = [(0, bytes(model))]  # (log position after an operation, the disk then)
    flushed = [0]  # indexes into bounds of completed flushes (the driver's, several host flushes each)
    for i in range(40):
        r = rng.random()
        if r < 0.6:
            off = rng.randrange(0, size - 1)
            n = min(size - off, rng.choice([100, 4096, 65536, 150_000]))
            data = bytes([rng.randrange(1, 256)]) * n
            img.write(off, data)
            model[off:off + n] = data
        elif r < 0.75:
            off = rng.randrange(0, size - 1) // 65536 * 65536
            n = min(size - off, 65536 * rng.randint(1, 3))
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        else:
            img.flush()
            flushed.append(len(bounds))
        bounds.append((rec.mark(), bytes(model)))
    img.close()
    flushed.append(len(bounds))
    bounds.append((rec.mark(), bytes(model)))
    log = CrashLog(base, rec.log)
    states = list(log.prefix_states(step=3)) + [log.random_state(random.Random(k))
                                                  for k in range(int(os.environ.get("VDISK_VMDK_CRASH_STATES", "150")))]
    for st_ in states:
        # the disk as the last flush that completed before the cut left it, or after a later operation
        at_durable = max(i for i in flushed if bounds[i][0] <= st_.durable)
        last = next((i for i, (m, _) in enumerate(bounds) if m >= st_.point), len(bounds) - 1)
        cands = [bounds[i][1] for i in range(at_durable, last + 1)]
        with Image(VmdkDriver.open(MemStorage(st_.data, "c.vmdk"), read_only=True), "c.vmdk", None) as im:
            got = im.read(0, size)
            res = im.check()
            assert res.corruptions == [], st_.describe()
            assert all("redundant grain table lags" in m for m in res.leaks), (st_.describe(), res.leaks)
        if any(got == c for c in cands):
            continue
        for s in range(0, size, 512):
            piece = got[s:s + 512]
            assert any(piece == c[s:s + 512] for c in cands), f"{st_.describe()}: sector {s // 512} never held this"


def test_check_repairs_a_lagging_redundant_table(tmp_path):
    path = tmp_path / "r.vmdk"
    vdisk.create(path, 4 * MiB, format="vmdk")
    with vdisk.open(path) as img:
        img.write(0, b"z" * 200_000)
    data = bytearray(Path(path).read_bytes())
    h = V.decode_header(bytes(data[:512]))
    rgt = struct.unpack_from("<I", data, h.rgd_offset * 512)[0]
    struct.pack_into("<I", data, rgt * 512 + 4, 0)  # the redundant entry of grain 1 never landed
    Path(path).write_bytes(data)
    exe = str(vdisk_exe())
    r = subprocess.run([exe, "check", str(path)], check=False, capture_output=True, text=True)
    assert r.returncode == 3 and "lags" in r.stdout + r.stderr
    run(exe, "check", "-r", "leaks", str(path))
    run(exe, "check", str(path))
    after = Path(path).read_bytes()
    gt = struct.unpack_from("<I", after, h.gd_offset * 512)[0]
    assert after[rgt * 512:rgt * 512 + 2048] == after[gt * 512:gt * 512 + 2048]
    assert read_all(path)[:200_000] == b"z" * 200_000


def test_rdonly_and_zero_extents(tmp_path):
    (tmp_path / "a.raw").write_bytes(b"A" * 4096)
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", str(tmp_path / "s.vmdk"), "4096")
    d = tmp_path / "d.vmdk"
    d.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="custom"\n'
                 'RDONLY 8 FLAT "a.raw" 0\nRW 8 ZERO\nRDONLY 8 SPARSE "s.vmdk"\n')
    from vdisk.errors import ReadOnlyImage

    with vdisk.open(d) as img:
        assert img.size == 3 * 4096 and img.read(0, 4096) == b"A" * 4096 and img.read(4096, 8192) == bytes(8192)
        for off in (0, 2 * 4096):
            with pytest.raises(ReadOnlyImage, match="read-only"):
                img.write(off, b"x")
        with pytest.raises(NotSupported, match="ZERO extent"):
            img.write(4096, b"x")
    assert (tmp_path / "a.raw").read_bytes() == b"A" * 4096
