"""The VDI driver against formats/vdi.md and against qemu-img.

Test vectors are made by the real ``qemu-img convert -O vdi`` (dynamic, and
``-o static=on``); vdisk must read them identically.  Images vdisk writes must pass
``qemu-img check`` and read back identically with qemu-img.
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
from vdisk.codec import vdi as C
from vdisk.errors import CorruptImage, UnsupportedFeature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "formats", "vdi.md")
MiB = 1 << 20


def qemu_img(*args, expect: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    if expect is not None and r.returncode != expect:
        pytest.fail(f"qemu-img {' '.join(map(str, args))} exited {r.returncode}: {r.stdout}{r.stderr}",
                    pytrace=False)
    return r


def mixed(size: int, seed: int = 1) -> bytes:
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


def test_spec_table_matches_the_codec():
    with open(SPEC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("<!-- struct: header -->")
    rows = {}
    for row in lines[start + 3:]:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip("|").split("|")]
        rows[cells[2]] = (int(cells[0], 0), int(cells[1]))
    assert rows == C.HEADER_FIELDS
    pos = 0
    for off, n in rows.values():
        assert off == pos
        pos += n
    assert pos == C.HEADER_AREA
    h = C.Header(image_type=C.TYPE_FIXED, disk_size=0x123456789, block_size=MiB, blocks_in_image=0x1235,
                 blocks_allocated=7, offset_blocks=512, offset_data=MiB, uuid_image=bytes(range(16)),
                 lchs=(1, 2, 3, 512))
    raw = C.encode_header(h)
    F = C.HEADER_FIELDS

    def u32(name):
        return struct.unpack_from("<I", raw, F[name][0])[0]

    assert raw[0x40:0x44] == b"\x7f\x10\xda\xbe" == C.MAGIC
    assert u32("version") == 0x00010001 and u32("header_size") == 0x190 and u32("image_type") == 2
    assert struct.unpack_from("<Q", raw, F["disk_size"][0])[0] == 0x123456789
    assert (u32("block_size"), u32("blocks_in_image"), u32("blocks_allocated")) == (MiB, 0x1235, 7)
    assert (u32("offset_blocks"), u32("offset_data"), u32("sector_size")) == (512, MiB, 512)
    assert raw[F["uuid_image"][0]:F["uuid_image"][0] + 16] == bytes(range(16))
    assert u32("lchs_heads") == 2
    assert C.decode_header(raw) == h


@pytest.mark.parametrize("opts", ["static=off", "static=on"])
def test_reads_qemu_img_vectors(image_dir, run_vdisk, opts, require_qemu):
    data = mixed(5 * MiB + 3 * 512)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    out = image_dir / "q.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", "-o", opts, src, out)
    assert vdisk.detect_format(str(out)) == "vdi"
    assert read_all(out) == data
    run_vdisk("compare", "-F", "raw", out, src)
    with vdisk.open(str(out), read_only=True) as img:
        assert img.check().exit_code == 0
        assert img.info()["subformat"] == ("static" if opts == "static=on" else "dynamic")
    # vdisk writes into qemu's image; qemu-img checks and reads it
    model = bytearray(data)
    with vdisk.open(str(out)) as img:
        img.write(2 * MiB - 100, b"V" * 300_000)
        model[2 * MiB - 100:2 * MiB + 299_900] = b"V" * 300_000
        img.write(len(data) - 10, b"T" * 10)
        model[-10:] = b"T" * 10
    qemu_img("check", out)
    exp = image_dir / "m.raw"
    exp.write_bytes(bytes(model))
    qemu_img("compare", "-f", "vdi", "-F", "raw", out, exp)


@pytest.mark.parametrize("static", [False, True])
def test_vdisk_images_pass_qemu_img_check(image_dir, run_vdisk, static, require_qemu):
    data = mixed(7 * MiB + 512, seed=2)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    out = image_dir / "v.vdi"
    run_vdisk("convert", "-q", "-f", "raw", "-O", "vdi", *(["-o", "static=on"] if static else []), src, out)
    qemu_img("check", out)
    qemu_img("compare", "-f", "vdi", "-F", "raw", out, src)
    info = json.loads(qemu_img("info", "--output", "json", out).stdout)
    assert info["format"] == "vdi" and info["virtual-size"] == len(data)
    model = bytearray(data)
    rnd = random.Random(3)
    with vdisk.open(str(out)) as img:
        for _ in range(60):
            off = rnd.randrange(0, len(data) - 1)
            n = min(rnd.randrange(1, 200_000), len(data) - off)
            if rnd.random() < 0.3:
                img.discard(off, n)
                model[off:off + n] = bytes(n)
            else:
                d = rnd.randbytes(n)
                img.write(off, d)
                model[off:off + n] = d
    qemu_img("check", out)
    exp = image_dir / "model.raw"
    exp.write_bytes(bytes(model))
    qemu_img("compare", "-f", "vdi", "-F", "raw", out, exp)
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x5a 1536 70000", str(out)], check=True,
                   capture_output=True)
    model[1536:1536 + 70000] = b"\x5a" * 70000
    assert read_all(out) == bytes(model)


def test_convert_output_is_as_sparse_as_qemu_img(image_dir, run_vdisk, require_qemu):
    data = mixed(16 * MiB, seed=4)
    src = image_dir / "src.raw"
    src.write_bytes(data)
    for opts in ([], ["-o", "static=on"]):
        q, v = image_dir / "q.vdi", image_dir / "v.vdi"
        for p in (q, v):
            if p.exists():
                p.unlink()
        qemu_img("convert", "-f", "raw", "-O", "vdi", *opts, src, q)
        run_vdisk("convert", "-q", "-f", "raw", "-O", "vdi", *opts, src, v)
        used_q, used_v = q.stat().st_blocks * 512, v.stat().st_blocks * 512
        assert used_v <= used_q * 1.05 + 64 * 1024, (opts, used_v, used_q)


def test_resize(image_dir, require_qemu):
    p = image_dir / "r.vdi"
    vdisk.create(str(p), 4 * MiB, format="vdi")
    data = mixed(4 * MiB, seed=5)
    with vdisk.open(str(p)) as img:
        img.write(0, data)
        img.resize(40 * MiB)
        img.write(39 * MiB, b"g" * 5000)
    model = data + bytes(35 * MiB) + b"g" * 5000 + bytes(MiB - 5000)
    assert read_all(p) == model
    qemu_img("check", p)
    # shrinking over allocated blocks keeps the host blocks dense (qemu-img check agrees)
    with vdisk.open(str(p)) as img:
        img.resize(MiB + 512, shrink=True)
    model = model[:MiB + 512]
    assert read_all(p) == model
    qemu_img("check", p)
    exp = image_dir / "m.raw"
    exp.write_bytes(model)
    qemu_img("compare", "-f", "vdi", "-F", "raw", p, exp)
    with vdisk.open(str(p), read_only=True) as img:
        assert img.driver.used == img.driver.next == 2
        assert p.stat().st_size == img.driver.hdr.offset_data + 2 * MiB
    # past the map's room: a clear refusal
    q = image_dir / "q.vdi"
    qemu_img("create", "-q", "-f", "vdi", q, "3M")  # QEMU's map has room for 128 blocks
    with vdisk.open(str(q)) as img, pytest.raises(vdisk.errors.UsageError, match="room"):
        img.resize(200 * MiB)


def test_crash_between_map_and_header_is_a_leak_repaired(image_dir, require_qemu):
    p = image_dir / "c.vdi"
    vdisk.create(str(p), 8 * MiB, format="vdi")
    with vdisk.open(str(p)) as img:
        img.write(0, b"a" * 5000)
        img.write(3 * MiB, b"b" * 5000)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<I", raw, C.HEADER_FIELDS["blocks_allocated"][0], 1)  # the header write was lost
    p.write_bytes(raw)
    with vdisk.open(str(p), read_only=True) as img:
        res = img.check()
        assert res.corruptions == [] and res.exit_code == 3
        assert img.read(3 * MiB, 5000) == b"b" * 5000
    with vdisk.open(str(p)) as img:  # a read-write open rewrites the count
        assert img.check().exit_code == 0
        img.write(5 * MiB, b"c" * 10)  # and a new block goes after the last, not over block 1
    qemu_img("check", p)
    got = read_all(p)
    assert got[:5000] == b"a" * 5000 and got[3 * MiB:3 * MiB + 5000] == b"b" * 5000
    assert got[5 * MiB:5 * MiB + 10] == b"c" * 10


def test_crash_before_flush_loses_only_new_blocks(image_dir, require_qemu):
    p = image_dir / "f.vdi"
    vdisk.create(str(p), 8 * MiB, format="vdi")
    with vdisk.open(str(p)) as img:
        img.write(0, b"a" * 5000)
    with vdisk.open(str(p)) as img:
        img.write(4 * MiB, b"n" * 5000)
        img.write(100, b"o" * 10)  # an allocated block: written in place
        crashed = image_dir / "crashed.vdi"
        shutil.copy(p, crashed)
    got = read_all(crashed)
    assert got[4 * MiB:4 * MiB + 5000] == bytes(5000)
    assert got[100:110] == b"o" * 10
    with vdisk.open(str(crashed)) as img:
        img.write(6 * MiB, b"m" * 10)  # reuses the lost block's space
    qemu_img("check", crashed)


def _image(image_dir) -> tuple[str, bytes]:
    p = str(image_dir / "h.vdi")
    vdisk.create(p, 6 * MiB, format="vdi")
    with vdisk.open(p) as img:
        img.write(0, b"x" * 5000)
        img.write(4 * MiB, b"y" * 5000)
    with open(p, "rb") as f:
        return p, f.read()


def _patched(good: bytes, field: str, fmt: str, value, at: int | None = None) -> bytes:
    raw = bytearray(good)
    struct.pack_into(fmt, raw, C.HEADER_FIELDS[field][0] if at is None else at, value)
    return bytes(raw)


@pytest.mark.parametrize("case", [
    ("signature", "<I", 0x12345678, CorruptImage, "signature"),
    ("version", "<I", 0x00010000, UnsupportedFeature, "version"),
    ("image_type", "<I", 4, UnsupportedFeature, "differencing"),
    ("sector_size", "<I", 4096, UnsupportedFeature, "sector size"),
    ("block_size", "<I", 3 << 20, UnsupportedFeature, "block size"),
    ("block_extra", "<I", 512, UnsupportedFeature, "extra"),
    ("blocks_in_image", "<I", 0xFFFFFFF5, CorruptImage, "blocks|map"),
    ("blocks_in_image", "<I", 2, CorruptImage, "cannot hold"),
    ("offset_blocks", "<I", 1 << 30, CorruptImage, "map"),
    ("offset_blocks", "<I", 0x400, CorruptImage, "another entry"),
    ("offset_data", "<I", 512, CorruptImage, "overlaps"),
    ("blocks_allocated", "<I", 100, CorruptImage, "allocated"),
], ids=lambda c: f"{c[0]}-{c[2]:#x}")
def test_damaged_header_is_refused_by_name(image_dir, case):
    field, fmt, value, exc, match = case
    p, good = _image(image_dir)
    with open(p, "wb") as f:
        f.write(_patched(good, field, fmt, value))
    with pytest.raises(exc, match=re.compile(match, re.IGNORECASE)):
        vdisk.open(p, format="vdi", read_only=True).close()


@pytest.mark.parametrize("entry,value,match", [
    (0, 6, "past the image"), (0, 1, "another entry"), (5, 3, "past the end of the file"),
])
def test_damaged_map_is_refused_by_name(image_dir, entry, value, match):
    p, good = _image(image_dir)
    with open(p, "wb") as f:
        f.write(_patched(good, "signature", "<I", value, at=512 + 4 * entry))
    with pytest.raises(CorruptImage, match=match):
        vdisk.open(p, format="vdi", read_only=True).close()


def test_huge_map_is_charged_to_the_budget(image_dir, monkeypatch):
    """A map claiming millions of entries is refused before it is read (file too short),
    and a map inside the file counts against VDISK_METADATA_BUDGET."""
    p = image_dir / "b.vdi"
    vdisk.create(str(p), 64 * MiB, format="vdi")
    monkeypatch.setenv("VDISK_METADATA_BUDGET", "100")
    with pytest.raises(vdisk.errors.ResourceLimit, match="block map"):
        vdisk.open(str(p), read_only=True)


def test_a_broken_vdi_is_refused_never_taken_for_raw(image_dir, run_vdisk):
    p = image_dir / "x.vdi"
    head = bytearray(MiB)
    head[0x40:0x44] = C.MAGIC
    p.write_bytes(bytes(head))
    for args in (["info", p], ["resize", p, "+1M"], ["check", p]):
        r = run_vdisk(*args, expect=None)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "vdi header" in lines[0], r.stderr
    assert p.read_bytes() == bytes(head)
    run_vdisk("info", "-f", "raw", p)


def test_locks_keep_qemu_out_while_vdisk_writes_and_back(image_dir, require_qemu):
    p = image_dir / "l.vdi"
    vdisk.create(str(p), 4 * MiB, format="vdi")
    with vdisk.open(str(p)) as img:
        img.write(0, b"x")
        r = qemu_img("info", "-f", "vdi", p, expect=None)
        assert r.returncode != 0 and "lock" in r.stderr.lower()
    proc = subprocess.Popen(["qemu-io", "-f", "vdi", str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        proc.stdin.write("write -P 0x41 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()  # "wrote 512/512 bytes ...": qemu-io holds its write lock now
        with pytest.raises(vdisk.errors.ImageLocked):
            vdisk.open(str(p))
    finally:
        proc.communicate("quit\n", timeout=30)
    assert read_all(p)[:512] == b"A" * 512
