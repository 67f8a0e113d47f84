"""The VHD ("vpc") driver against formats/vhd.md and against qemu-img.

Test vectors are made by the real ``qemu-img convert -O vpc`` with each subformat
option; vdisk must read them identically (its own ``compare`` and
``qemu-img compare``).  Images vdisk writes must read back identically with
qemu-img (which has no ``check`` for vpc: compare only).  Differencing disks are
vdisk's alone here: QEMU 7.2 reads a differencing VHD as if it had no parent.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess

import pytest

import vdisk
from vdisk.codec import vhd as C
from vdisk.drivers.vhd import VhdDriver
from vdisk.errors import CorruptImage, UnsupportedFeature, VdiskError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "formats", "vhd.md")
MiB = 1 << 20


def qemu_img(*args, expect: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    if expect is not None and r.returncode != expect:
        pytest.fail(f"qemu-img {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}", pytrace=False)
    return r


def qemu_size(path) -> int:
    return json.loads(qemu_img("info", "--output", "json", "-f", "vpc", path).stdout)["virtual-size"]


def mixed(size: int, seed: int = 1) -> bytes:
    """Data runs, zeros and a partial last block."""
    rnd = random.Random(seed)
    buf = bytearray(size)
    for _ in range(30):
        off = rnd.randrange(0, size - 1)
        n = min(rnd.randrange(1, 300_000), size - off)
        buf[off:off + n] = rnd.randbytes(n)
    buf[-700:] = rnd.randbytes(700)
    return bytes(buf)


def read_all(path, **kw) -> bytes:
    with vdisk.open(str(path), read_only=True, **kw) as img:
        return img.read(0, img.size)


# ---------------------------------------------------------------------------- the spec
def _spec_tables() -> dict[str, dict[str, tuple[int, int]]]:
    with open(SPEC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!--\s*struct:\s*([\w-]+)\s*-->", line.strip())
        if not m:
            continue
        rows = {}
        for row in lines[i + 3:]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip("|").split("|")]
            rows[cells[2]] = (int(cells[0], 0), int(cells[1]))
        out[m.group(1)] = rows
    return out


def test_spec_tables_match_the_codec():
    t = _spec_tables()
    assert t["footer"] == C.FOOTER_FIELDS
    assert t["dynamic-header"] == C.DYN_FIELDS
    assert t["parent-locator"] == C.LOCATOR_FIELDS
    for table, size in ((C.FOOTER_FIELDS, 512), (C.DYN_FIELDS, 1024), (C.LOCATOR_FIELDS, 24)):
        pos = 0
        for off, n in table.values():  # contiguous, in order, filling the structure
            assert off == pos
            pos += n
        assert pos == size


def test_encoders_put_fields_where_the_spec_says():
    f = C.Footer(disk_type=C.TYPE_DYNAMIC, current_size=0x123456789A00, original_size=0x1111, data_offset=512,
                 geometry=(1000, 16, 63), unique_id=bytes(range(16)), timestamp=0x01020304)
    raw = C.encode_footer(f)
    F = C.FOOTER_FIELDS
    assert raw[:8] == b"conectix"
    assert struct.unpack_from(">Q", raw, F["current_size"][0])[0] == 0x123456789A00
    assert struct.unpack_from(">Q", raw, F["data_offset"][0])[0] == 512
    assert struct.unpack_from(">HBB", raw, F["disk_geometry"][0]) == (1000, 16, 63)
    assert struct.unpack_from(">I", raw, F["disk_type"][0])[0] == 3
    assert raw[F["unique_id"][0]:F["unique_id"][0] + 16] == bytes(range(16))
    assert struct.unpack_from(">I", raw, F["checksum"][0])[0] == C.checksum(raw, 64)
    # the checksum is the one's complement of the byte sum with the field as zeros
    zeroed = raw[:64] + bytes(4) + raw[68:]
    assert struct.unpack_from(">I", raw, 64)[0] == (~sum(zeroed)) & 0xFFFFFFFF
    assert C.decode_footer(raw) == f
    loc = C.Locator(C.PLAT_W2RU, 512, 20, 1536)
    h = C.DynHeader(table_offset=2048, max_table_entries=7, block_size=2 * MiB, parent_name="base.vhd",
                    locators=(loc,) + (C.NO_LOCATOR,) * 7)
    raw = C.encode_dyn_header(h)
    D = C.DYN_FIELDS
    assert raw[:8] == b"cxsparse" and len(raw) == 1024
    assert struct.unpack_from(">QII", raw, D["table_offset"][0]) == (2048, 0x00010000, 7)
    assert struct.unpack_from(">I", raw, D["block_size"][0])[0] == 2 * MiB
    assert raw[64:64 + 16] == "base.vhd".encode("utf-16-be")
    L = C.LOCATOR_FIELDS
    assert raw[576 + L["platform_code"][0]:580] == b"W2ru"
    assert struct.unpack_from(">Q", raw, 576 + L["platform_data_offset"][0])[0] == 1536
    assert C.decode_dyn_header(raw) == h


def test_bitmap_bit_order_is_msb_first():
    bm = bytes([0b10100000, 0xFF]) + bytes(510)
    assert C.bitmap_runs(bm, 0, 16) == [(0, 1, True), (1, 1, False), (2, 1, True), (3, 5, False), (8, 8, True)]


def test_geometry_is_the_specification_algorithm():
    # values from the specification's algorithm worked by hand: 17 sectors per track up to 16 heads
    assert C.geometry(4 * 17 * 1024 - 17) == (1023, 4, 17)
    assert C.geometry(65535 * 16 * 255 * 2) == C.MAX_CHS  # capped
    assert C.geometry(65535 * 16 * 63) == (65535 * 16 * 63 // 255 // 16, 16, 255)


@pytest.mark.parametrize("size", ["3M", "10M", "100M", "1G", "1023M"])
def test_force_size_off_rounds_as_qemu_img(image_dir, run_vdisk, size, require_qemu):
    """-o force_size=off sizes the disk up to a CHS geometry exactly as qemu-img's default."""
    q, v = image_dir / "q.vhd", image_dir / "v.vhd"
    qemu_img("create", "-q", "-f", "vpc", q, size)
    run_vdisk("create", "-q", "-f", "vpc", "-o", "force_size=off", v, size)
    with vdisk.open(str(v), read_only=True) as img:
        assert img.size == qemu_size(q) == qemu_size(v)


@pytest.mark.parametrize("sub", ["fixed", "dynamic"])
def test_default_keeps_the_size_asked_for_azure(image_dir, run_vdisk, sub, require_qemu):
    """Azure wants a fixed VHD of a whole number of MiB: vdisk keeps the size exactly
    (force_size=on is its default), and qemu-img reads the same size."""
    p = image_dir / "azure.vhd"
    run_vdisk("create", "-q", "-f", "vpc", "-o", f"subformat={sub}", p, "1000M")
    assert qemu_size(p) == 1000 * MiB
    with vdisk.open(str(p), read_only=True) as img:
        assert img.size == 1000 * MiB and img.info()["subformat"] == sub
    tail = p.read_bytes()[-512:]
    f = C.decode_footer(tail)
    assert f.current_size == 1000 * MiB and f.disk_type == (C.TYPE_FIXED if sub == "fixed" else C.TYPE_DYNAMIC)
    if sub == "fixed":
        assert p.stat().st_size == 1000 * MiB + 512


# ---------------------------------------------------------------------------- qemu-img's images
QEMU_VECTORS = {"dynamic": "subformat=dynamic", "fixed": "subformat=fixed",
                "fixed-force-size": "subformat=fixed,force_size=on", "dynamic-force-size": "force_size=on"}


@pytest.mark.parametrize("name", sorted(QEMU_VECTORS))
def test_reads_qemu_img_vectors(image_dir, run_vdisk, name, require_qemu):
    data = mixed(5 * MiB + 3 * 512)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    out = image_dir / "q.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", QEMU_VECTORS[name], src, out)
    size = qemu_size(out)
    assert size >= len(data)
    got = read_all(out, format="vpc")
    assert len(got) == size and got == data + bytes(size - len(data))
    assert vdisk.detect_format(str(out)) == "vpc"  # fixed disks too, from the footer at the end
    run_vdisk("compare", "-f", "vpc", "-F", "raw", out, src)
    with vdisk.open(str(out), read_only=True) as img:
        assert img.check().exit_code == 0


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_vdisk_images_read_back_with_qemu(image_dir, run_vdisk, sub, require_qemu):
    data = mixed(7 * MiB + 512, seed=2)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    out = image_dir / "v.vhd"
    run_vdisk("convert", "-q", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", src, out)
    assert qemu_size(out) == len(data)
    qemu_img("compare", "-f", "vpc", "-F", "raw", out, src)
    # in-place writes, zeroes and discards, then qemu-img reads the model
    model = bytearray(data)
    rnd = random.Random(3)
    with vdisk.open(str(out)) as img:
        for _ in range(60):
            off = rnd.randrange(0, len(data) - 1)
            n = min(rnd.randrange(1, 200_000), len(data) - off)
            if rnd.random() < 0.3:
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                d = rnd.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
    exp = image_dir / "model.raw"
    exp.write_bytes(bytes(model))
    qemu_img("compare", "-f", "vpc", "-F", "raw", out, exp)
    # and what qemu writes, vdisk reads
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 1536 70000", str(out)], check=True,
                   capture_output=True)
    model[1536:1536 + 70000] = b"\x5a" * 70000
    assert read_all(out) == bytes(model)


def test_convert_output_is_as_sparse_as_qemu_img(image_dir, run_vdisk, require_qemu):
    data = mixed(16 * MiB, seed=4)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    q, v = image_dir / "q.vhd", image_dir / "v.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", src, q)
    run_vdisk("convert", "-q", "-f", "raw", "-O", "vpc", src, v)
    used_q, used_v = q.stat().st_blocks * 512, v.stat().st_blocks * 512
    assert used_v <= used_q * 1.05 + 64 * 1024, (used_v, used_q)


def test_locks_keep_qemu_out_while_vdisk_writes(image_dir, require_qemu):
    p = image_dir / "l.vhd"
    vdisk.create(str(p), 4 * MiB, format="vpc")
    with vdisk.open(str(p)) as img:
        img.write(0, b"x")
        r = qemu_img("info", "-f", "vpc", p, expect=None)
        assert r.returncode != 0 and "lock" in r.stderr.lower()
    qemu_img("info", "-f", "vpc", p)


# ---------------------------------------------------------------------------- differencing disks
def test_differencing_disk_reads_through_its_parent(image_dir, run_vdisk):
    base, child = image_dir / "base.vhd", image_dir / "child.vhd"
    data = mixed(6 * MiB, seed=5)
    vdisk.create(str(base), len(data), format="vpc")
    with vdisk.open(str(base)) as b:
        b.write(0, data)
    run_vdisk("create", "-q", "-f", "vpc", "-b", "base.vhd", "-F", "vpc", child)
    info = json.loads(run_vdisk("info", "--output", "json", child).stdout)
    assert info["backing-filename"] == "base.vhd" and info["backing-filename-format"] == "vpc"
    model = bytearray(data)
    with vdisk.open(str(child)) as c:
        assert c.read(0, c.size) == data
        c.write(3 * MiB + 100, b"C" * 5000)
        c.write_zeroes(5 * MiB, 4096)
        model[3 * MiB + 100:3 * MiB + 5100] = b"C" * 5000
        model[5 * MiB:5 * MiB + 4096] = bytes(4096)
    assert read_all(child) == bytes(model)
    assert read_all(base) == data  # the parent is untouched
    # the locator is a relative Windows path, the parent's id is recorded
    with vdisk.open(str(child), read_only=True, backing=False) as c:
        d = c.driver
        assert d.dyn.locators[0].platform_code == C.PLAT_W2RU
        assert d.dyn.parent_unique_id == C.decode_footer(base.read_bytes()[:512]).unique_id
    # commit the child into the parent, then the parent alone holds the model
    run_vdisk("commit", child)
    assert read_all(base) == bytes(model)


def test_differencing_parent_outside_allowed_dirs_is_refused(image_dir, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    base = other / "base.vhd"
    vdisk.create(str(base), 4 * MiB, format="vpc")
    child = image_dir / "child.vhd"
    vdisk.create(str(child), format="vpc", backing_file=str(base), backing_format="vpc", unsafe_backing=True)
    with pytest.raises(vdisk.errors.BackingError, match="outside the allowed"):
        vdisk.open(str(child))
    with vdisk.open(str(child), unsafe_backing=True) as c:
        assert c.backing is not None


def test_differencing_chain_loop_is_refused(image_dir):
    p, a, b = image_dir / "p.vhd", image_dir / "a.vhd", image_dir / "b.vhd"
    vdisk.create(str(p), 4 * MiB, format="vpc")
    vdisk.create(str(a), format="vpc", backing_file="p.vhd", backing_format="vpc")
    vdisk.create(str(b), format="vpc", backing_file="a.vhd", backing_format="vpc")
    os.replace(b, p)  # a -> p (which names a) -> a
    with pytest.raises(vdisk.errors.BackingError, match="loops"):
        vdisk.open(str(a))


# ---------------------------------------------------------------------------- crashes and damage
def test_crash_before_flush_leaves_a_readable_image(image_dir, require_qemu):
    """New blocks' BAT entries and the end footer are written at flush: a copy of the
    file taken before the flush opens (from the footer copy at 0), reads the old
    content, check calls the missing footer a leak, a read-write open restores it."""
    p = image_dir / "c.vhd"
    vdisk.create(str(p), 8 * MiB, format="vpc")
    with vdisk.open(str(p)) as img:
        img.write(0, b"A" * 4096)
    with vdisk.open(str(p)) as img:
        img.write(4 * MiB, b"B" * 8192)  # a new block, over the old footer
        crashed = image_dir / "crashed.vhd"
        shutil.copy(p, crashed)
    with vdisk.open(str(crashed), read_only=True) as img:
        assert img.read(0, 4096) == b"A" * 4096
        assert img.read(4 * MiB, 8192) == bytes(8192)
        res = img.check()
        assert res.corruptions == [] and res.leaks and res.exit_code == 3
    with vdisk.open(str(crashed)) as img:
        assert img.check().exit_code == 0
    assert crashed.read_bytes()[-512:] == crashed.read_bytes()[:512]
    qemu_img("compare", "-f", "vpc", "-F", "vpc", crashed, p, expect=1)  # B was lost, A kept
    assert read_all(p)[4 * MiB:4 * MiB + 8192] == b"B" * 8192


def _dynamic(image_dir, name="h.vhd") -> tuple[str, bytearray]:
    p = str(image_dir / name)
    vdisk.create(p, 6 * MiB, format="vpc")
    with vdisk.open(p) as img:
        img.write(0, b"x" * 5000)
        img.write(4 * MiB, b"y" * 5000)
    with open(p, "rb") as f:
        return p, bytearray(f.read())


def _patch_dyn(raw: bytearray, field: str, fmt: str, value) -> None:
    off = 512 + C.DYN_FIELDS[field][0]
    struct.pack_into(fmt, raw, off, value)
    struct.pack_into(">I", raw, 512 + 36, C.checksum(bytes(raw[512:1536]), 36))


def _open_fails(p, raw, exc=CorruptImage, match=None):
    with open(p, "wb") as f:
        f.write(raw)
    with pytest.raises(exc, match=match):
        vdisk.open(p, format="vpc", read_only=True).close()


def test_damaged_structures_are_refused_by_name(image_dir):
    p, good = _dynamic(image_dir)
    raw = bytearray(good)
    raw[100] ^= 1  # footer copy checksum: falls back to the footer at the end, which is fine
    with open(p, "wb") as f:
        f.write(raw)
    with vdisk.open(p, read_only=True) as img:
        assert img.read(0, 5000) == b"x" * 5000
    raw[-412] ^= 1  # both footers bad
    _open_fails(p, raw, match="checksum")
    raw = bytearray(good)
    raw[512 + 40] ^= 1  # dynamic header checksum
    _open_fails(p, raw, match="dynamic header: checksum")
    raw = bytearray(good)
    _patch_dyn(raw, "max_table_entries", ">I", 0x7FFFFFFF)
    _open_fails(p, raw, match="BAT")
    raw = bytearray(good)
    _patch_dyn(raw, "block_size", ">I", 3 << 20)
    _open_fails(p, raw, UnsupportedFeature, match="block size")
    raw = bytearray(good)
    _patch_dyn(raw, "table_offset", ">Q", 1 << 40)
    _open_fails(p, raw, match="outside the file")
    # BAT entries: past the end, at each other, at the metadata
    with open(p, "wb") as f:
        f.write(good)
    with vdisk.open(p, read_only=True) as img:
        t, e0, e2 = img.driver.dyn.table_offset, img.driver.bat[0], img.driver.bat[2]
    for value, what in ((0xFFFFFF00, "past the end"), (e0, "overlaps"), (e0 + 1, "overlaps"), (1, "overlaps")):
        raw = bytearray(good)
        struct.pack_into(">I", raw, t + 8, value)
        _open_fails(p, raw, match=what)
    assert e2 != C.BAT_UNUSED
    # a disk type vdisk does not know
    raw = bytearray(good)
    for base in (0, len(raw) - 512):
        struct.pack_into(">I", raw, base + 60, 6)
        struct.pack_into(">I", raw, base + 64, C.checksum(bytes(raw[base:base + 512]), 64))
    _open_fails(p, raw, UnsupportedFeature, match="disk type")


def test_probing(image_dir):
    fixed = image_dir / "f.vhd"
    vdisk.create(str(fixed), 2 * MiB, format="vpc", options={"subformat": "fixed"})
    assert vdisk.detect_format(str(fixed)) == "vpc"
    # a raw disk whose last sector looks like a dynamic disk's footer is never taken for one
    raw = image_dir / "r.raw"
    foot = C.encode_footer(C.Footer(C.TYPE_DYNAMIC, 1 << 20, 1 << 20, 512, (1, 16, 63), bytes(16)))
    raw.write_bytes(bytes(1 << 20) + foot)
    with pytest.raises(VdiskError, match="VHD"):
        vdisk.detect_format(str(raw))
    from vdisk.drivers import probe

    assert probe(bytes(8192), foot) is None
    assert probe(bytes(8192), fixed.read_bytes()[-512:]) == "vpc"
    assert VhdDriver.probe(b"conectix" + bytes(100))


def test_resize_grows_past_the_bat_room(image_dir, require_qemu):
    """Growing beyond the BAT's room moves the BAT to the end; qemu-img agrees."""
    p = image_dir / "g.vhd"
    vdisk.create(str(p), 4 * MiB, format="vpc", options={"block_size": "4096"})
    data = mixed(4 * MiB, seed=7)
    with vdisk.open(str(p)) as img:
        img.write(0, data)
        old_table = img.driver.dyn.table_offset
        img.resize(64 * MiB)
        assert img.driver.dyn.table_offset != old_table
        img.write(60 * MiB, b"z" * 10000)
    model = data + bytes(60 * MiB - 4 * MiB) + b"z" * 10000 + bytes(4 * MiB - 10000)
    assert read_all(p) == model
    exp = image_dir / "m.raw"
    exp.write_bytes(model)
    qemu_img("compare", "-f", "vpc", "-F", "raw", p, exp)
    with vdisk.open(str(p)) as img:
        img.resize(1 * MiB, shrink=True)
    exp.write_bytes(model[:MiB])
    qemu_img("compare", "-f", "vpc", "-F", "raw", p, exp)


def test_differencing_writes_sector_by_sector(image_dir):
    """A write into a differencing disk takes only its sectors from the child: the
    rest of the block still comes from the parent (map says so), and the bitmap bits
    reach the disk only with the flush."""
    base, child = image_dir / "base.vhd", image_dir / "child.vhd"
    data = mixed(4 * MiB, seed=8)
    vdisk.create(str(base), len(data), format="vpc")
    with vdisk.open(str(base)) as b:
        b.write(0, data)
    vdisk.create(str(child), format="vpc", backing_file="base.vhd", backing_format="vpc")
    with vdisk.open(str(child)) as c:
        c.write(1000, b"w" * 3000)  # sectors 1..7, two of them partly
        c.flush()
        own = [e for e in c.block_status(0, c.size, chain=False) if e.status != vdisk.drivers.base.Status.UNALLOCATED]
        assert [(e.offset, e.length) for e in own] == [(512, 3584)]
        bm = c.driver._bitmap(0)
        assert bm[0] == 0b01111111 and not any(bm[1:])
        c.write(MiB, b"u" * 512)
        before_flush = image_dir / "crashed.vhd"
        shutil.copy(child, before_flush)
    want = bytearray(data)
    want[1000:4000] = b"w" * 3000
    assert read_all(child) == bytes(want[:MiB]) + b"u" * 512 + bytes(want[MiB + 512:])
    # a crash before the flush: the new sector's bit is not on disk, the parent answers
    assert read_all(before_flush) == bytes(want)


def test_rebase_and_flatten_of_a_differencing_disk(image_dir, run_vdisk):
    a, b, child = image_dir / "a.vhd", image_dir / "b.vhd", image_dir / "child.vhd"
    for p, fill in ((a, b"A"), (b, b"B")):
        vdisk.create(str(p), 4 * MiB, format="vpc")
        with vdisk.open(str(p)) as img:
            img.write(0, fill * (4 * MiB))
    vdisk.create(str(child), format="vpc", backing_file="a.vhd", backing_format="vpc")
    with vdisk.open(str(child)) as c:
        c.write(MiB, b"c" * 100)
    run_vdisk("rebase", "-u", "-b", "b.vhd", "-F", "vpc", child)
    got = read_all(child)
    assert got[:MiB] == b"B" * MiB and got[MiB:MiB + 100] == b"c" * 100
    r = run_vdisk("rebase", "-u", "-b", "a.vhd", "-F", "raw", child, expect=1)
    assert "VHD" in r.stderr
    run_vdisk("flatten", child)
    with vdisk.open(str(child), read_only=True) as c:
        assert c.backing is None and c.info()["subformat"] == "dynamic"
        assert c.read(0, c.size) == got
    os.unlink(b)  # the flattened disk needs its old parent no more
    assert read_all(child) == got


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_a_broken_vhd_is_refused_never_taken_for_raw(image_dir, run_vdisk, kind):
    """A file with a VHD cookie but no valid footer: every command refuses it, in one
    line naming the damage; -f raw still opens it when the user says so."""
    p = image_dir / "x.vhd"
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">Q", footer, 48, MiB)
    p.write_bytes(bytes(MiB) + bytes(footer) if kind == "fixed" else bytes(footer) + bytes(MiB))
    before = p.read_bytes()
    for args in (["info", p], ["resize", p, "+1M"], ["check", p], ["map", p]):
        r = run_vdisk(*args, expect=None)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(r"VHD|vhd footer", lines[0]), r.stderr
    assert p.read_bytes() == before
    run_vdisk("info", "-f", "raw", p)


def test_a_parent_that_is_not_the_one_recorded_is_refused(image_dir):
    base, child = image_dir / "base.vhd", image_dir / "child.vhd"
    vdisk.create(str(base), 4 * MiB, format="vpc")
    vdisk.create(str(child), format="vpc", backing_file="base.vhd", backing_format="vpc")
    os.unlink(base)
    vdisk.create(str(base), 4 * MiB, format="vpc")  # another disk under the same name
    with pytest.raises(vdisk.errors.BackingError, match="not the disk it was made on"):
        vdisk.open(str(child))
    with vdisk.open(str(child), backing=False, read_only=True) as c:  # alone, it still opens
        assert c.size == 4 * MiB


def test_a_guessed_raw_image_cannot_be_turned_into_a_fixed_vhd(image_dir):
    """Probing reads a fixed VHD's footer at the end of a file: a guest of a raw image
    whose format was guessed may not write one there (as it may not write a header at
    the start); named raw, it may."""
    p = str(image_dir / "disk.img")
    with open(p, "wb") as f:
        f.write(bytes(MiB))
    from vdisk.drivers.vhd import footer_for

    foot = C.encode_footer(footer_for(MiB - 512, C.TYPE_FIXED, C.NO_DATA_OFFSET, bytes(16)))
    with vdisk.open(p) as img:  # format guessed: raw
        with pytest.raises(vdisk.errors.ReadOnlyImage, match="guessed"):
            img.write(MiB - 512, foot)
        with pytest.raises(vdisk.errors.ReadOnlyImage, match="guessed"):
            img.write(MiB - 1024, bytes(512) + foot)
        img.write(MiB - 512, foot[:60])  # no checksum: not a valid footer, allowed...
    with pytest.raises(UnsupportedFeature, match="VHD footer"):  # ...and then refused by name, never raw
        vdisk.detect_format(p)
    with vdisk.open(p, format="raw") as img:
        img.write(MiB - 512, foot)
    assert vdisk.detect_format(p) == "vpc"


@pytest.mark.parametrize("fmt", ["vpc", "vdi"])
def test_zero_granules_of_new_blocks_stay_holes_but_zeros_over_data_are_written(image_dir, fmt):
    p = image_dir / f"z.{fmt}"
    vdisk.create(str(p), 8 * MiB, format=fmt)
    want = bytearray(8 * MiB)
    with vdisk.open(str(p)) as img:
        for off, data in ((0, b"d" * 8192 + bytes(1 << 20) + b"e" * 100),  # a new block: its zeros stay holes
                          (4096, bytes(8192)),  # zeros over written data: written
                          (3 * MiB - 4096, b"f" * 10 + bytes(65536 * 3))):
            img.write(off, data)
            want[off:off + len(data)] = data
        used = p.stat().st_blocks * 512
    assert read_all(p) == bytes(want)
    assert used < 256 * 1024, used  # 8 KiB, 4 KiB, 4 KiB of data and the metadata, not MiBs of zeros
