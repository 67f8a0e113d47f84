"""The VHDX driver against QEMU's: images qemu-img writes, vdisk reads byte for byte
(and the other way round), logs built from the specification are replayed as QEMU
replays them, crash states of vdisk's writes always open with flushed data intact,
and formats/vhdx.md states the byte offsets the codec uses.

Every comparison with QEMU runs the real qemu-img / qemu-io (``require_qemu``).
"""

from __future__ import annotations

import json
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
from vdisk.codec import vhdx as V
from vdisk.errors import (
    ImageLocked,
    NotSupported,
    ReadOnlyImage,
    UnsupportedFeature,
    UsageError,
)
from vdisk.sizes import parse_size

sys.path.insert(0, str(Path(__file__).parent / "hostile"))
sys.path.insert(0, str(Path(__file__).parent))
import gen_vhdx as G
from imagetools import run

MiB = 1 << 20
ROOT = Path(__file__).parent.parent


def qemu(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert r.returncode == 0, f"qemu-img {' '.join(map(str, args))}: {r.stdout}{r.stderr}"
    return r


def pattern(size: int, seed: int) -> bytes:
    """A guest disk with data, holes and zero-filled runs at assorted alignments."""
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = rng.choice([512, 4096, 65536, 300_000, MiB, 3 * MiB])
        kind = rng.random()
        if kind < 0.45:
            chunk = rng.randbytes(min(n, size - pos))
            buf[pos:pos + len(chunk)] = chunk
        pos += n + rng.choice([0, 0, 512, MiB, 5 * MiB])
    return bytes(buf)


def read_all(path, **kw) -> bytes:
    with vdisk.open(path, read_only=True, **kw) as img:
        return img.read(0, img.size)


# ----------------------------------------------------------------------------- qemu-img writes, vdisk reads
QEMU_VECTORS = [("dynamic", None, None), ("fixed", None, None), ("dynamic", "1M", None), ("fixed", "1M", None),
                ("dynamic", "32M", "4M"), ("dynamic", "256M", "1M"), ("fixed", "2M", "2M")]


@pytest.mark.parametrize("sub,bs,log", QEMU_VECTORS, ids=["-".join(x for x in v if x) for v in QEMU_VECTORS])
def test_reads_what_qemu_writes(tmp_path, require_qemu, sub, bs, log):
    size = 21 * MiB + 3584  # not a multiple of any block size
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(size, 7))
    img = tmp_path / "q.vhdx"
    opts = ",".join([f"subformat={sub}"] + ([f"block_size={bs}"] if bs else []) + ([f"log_size={log}"] if log else []))
    qemu("convert", "-f", "raw", "-O", "vhdx", "-o", opts, raw, img)
    assert read_all(img) == raw.read_bytes()
    info = json.loads(run("info", "--output", "json", img).stdout)
    assert info["format"] == "vhdx" and info["virtual-size"] == size
    spec = info["format-specific"]["data"] if "format-specific" in info else info
    flat = json.dumps(spec)
    assert f'"vhdx-subformat": "{sub}"' in flat
    if bs:
        assert f'"vhdx-block-size": {parse_size(bs)}' in flat
    run("compare", img, raw)  # vdisk's own compare: identical
    run("check", img)
    out = tmp_path / "back.raw"
    run("convert", "-O", "raw", img, out)
    qemu("compare", "-f", "vhdx", "-F", "raw", img, out)


def test_reads_qemu_create_empty(tmp_path, require_qemu):
    img = tmp_path / "e.vhdx"
    qemu("create", "-f", "vhdx", img, "100M")
    with vdisk.open(img, read_only=True) as i:
        assert i.size == 100 * MiB
        assert i.read(0, MiB) == bytes(MiB) and i.read(99 * MiB, MiB) == bytes(MiB)
        assert all(e.status != 2 for e in i.block_status())


# ----------------------------------------------------------------------------- vdisk writes, qemu-img reads
@pytest.mark.parametrize("sub,bs", [("dynamic", None), ("fixed", None), ("dynamic", 1 << 20), ("fixed", 2 << 20),
                                    ("dynamic", 256 << 20)])
def test_qemu_reads_what_vdisk_writes(tmp_path, require_qemu, sub, bs):
    size = 37 * MiB
    path = tmp_path / "v.vhdx"
    vdisk.create(path, size, format="vhdx", cluster_size=bs, options={"subformat": sub})
    model = bytearray(size)
    rng = random.Random(3)
    with vdisk.open(path) as img:
        for k in range(40):
            n = rng.choice([1, 511, 4096, 70_000, MiB + 7])
            off = rng.randrange(0, size - n)
            data = rng.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
            if k % 9 == 0:
                img.flush()
        img.write_zeroes(5 * MiB, 2 * MiB)
        model[5 * MiB:7 * MiB] = bytes(2 * MiB)
    expect = tmp_path / "model.raw"
    expect.write_bytes(bytes(model))
    qemu("check", path)
    qemu("compare", "-f", "vhdx", "-F", "raw", path, expect)
    info = json.loads(qemu("info", "--output", "json", path).stdout)
    assert info["virtual-size"] == size and info["format"] == "vhdx"
    assert read_all(path) == bytes(model)


def test_convert_both_ways(tmp_path, require_qemu):
    raw = tmp_path / "a.raw"
    raw.write_bytes(pattern(13 * MiB, 11))
    v = tmp_path / "a.vhdx"
    run("convert", "-O", "vhdx", "-o", "block_size=1M", raw, v)
    qemu("check", v)
    qemu("compare", "-f", "vhdx", "-F", "raw", v, raw)
    # sparse: holes of the source stay unallocated
    with vdisk.open(v, read_only=True) as img:
        assert any(e.status != 2 for e in img.block_status())
    q = tmp_path / "a.qcow2"
    run("convert", "-O", "qcow2", v, q)
    qemu("compare", q, raw)
    f = tmp_path / "fixed.vhdx"
    run("convert", "-O", "vhdx", "-o", "subformat=fixed", q, f)
    qemu("compare", "-f", "vhdx", "-F", "raw", f, raw)
    # runs of zeros inside allocated blocks stay holes in the file, as qemu-img leaves them
    for opts, out in (("block_size=1M", v), ("subformat=fixed", f)):
        qv = tmp_path / f"q-{out.name}"
        qemu("convert", "-f", "raw", "-O", "vhdx", "-o", opts, raw, qv)
        assert out.stat().st_blocks * 512 <= qv.stat().st_blocks * 512 + MiB, (opts, out.stat(), qv.stat())


def test_resize_moves_the_bat_and_qemu_agrees(tmp_path, require_qemu):
    path = tmp_path / "r.vhdx"
    vdisk.create(path, 8 * MiB, format="vhdx", cluster_size=MiB)
    with vdisk.open(path) as img:
        img.write(0, b"\xab" * 4096)
        img.write(8 * MiB - 4096, b"\xcd" * 4096)
        img.resize(200 << 30)  # 200 GiB of 1 MiB blocks: more entries than the 1 MiB BAT region holds
        img.write((200 << 30) - 4096, b"\xef" * 4096)
    qemu("check", path)
    info = json.loads(qemu("info", "--output", "json", path).stdout)
    assert info["virtual-size"] == 200 << 30
    for off, byte in ((0, 0xAB), (8 * MiB - 4096, 0xCD), ((200 << 30) - 4096, 0xEF), (8 * MiB, 0)):
        r = subprocess.run(["qemu-io", "-f", "vhdx", "-r", "-c", f"read -P {byte} {off} 4096", str(path)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with vdisk.open(path) as img:
        img.resize(4 * MiB, shrink=True)
        img.resize(8 * MiB)
        assert img.read(4 * MiB, 4 * MiB) == bytes(4 * MiB), "shrunk-away data came back"
    qemu("check", path)


# ----------------------------------------------------------------------------- the log
def _logged_image(tmp_path, *, grow=True) -> tuple[Path, bytes]:
    """A vdisk-made image carrying a one-entry log built from the spec, and the
    content the log's replay gives."""
    base = tmp_path / "base.vhdx"
    content = G.make_valid(str(base))
    data, writes, expect, last = G.replay_case(base.read_bytes(), content, grow=grow)
    entry = G.log_entry(3, writes, flushed=len(data) // MiB * MiB, last=last)
    path = tmp_path / "logged.vhdx"
    path.write_bytes(G.VhdxFile(data).add_log([entry], log_guid=G.LOG_GUID).bytes())
    assert read_all(base) == content and expect != content
    return path, expect


def test_read_only_open_replays_in_memory_and_qemu_agrees(tmp_path, require_qemu):
    path, expect = _logged_image(tmp_path)
    before = path.read_bytes()
    with vdisk.open(path, read_only=True) as img:
        assert img.read(0, img.size) == expect
        assert img.info()["vhdx-log"] == "replayed in memory"
    assert path.read_bytes() == before, "a read-only open changed the file"
    r = qemu("info", path, check=False)  # QEMU refuses a read-only open of a dirty log ...
    assert r.returncode != 0 and "log" in r.stderr
    copy = tmp_path / "q.vhdx"
    shutil.copyfile(path, copy)
    qemu("check", "-r", "all", copy, check=False)  # ... and replays it here
    out = tmp_path / "q.raw"
    qemu("convert", "-O", "raw", copy, out)
    assert out.read_bytes() == expect


def test_read_write_open_replays_and_clears_the_log(tmp_path, require_qemu):
    path, expect = _logged_image(tmp_path)
    with vdisk.open(path) as img:
        assert img.info()["vhdx-log"] == "replayed"
        assert img.read(0, img.size) == expect
    v = G.VhdxFile(path.read_bytes())
    for slot in (0, 1):  # both headers valid, log GUID zero
        h = V.decode_header(bytes(v.b[V.HEADER_OFFSETS[slot]:V.HEADER_OFFSETS[slot] + 4096]), "h")
        assert h.log_guid == V.ZERO_GUID
    assert v.slot_seq(0) != v.slot_seq(1)
    qemu("check", path)  # no log left for QEMU to complain about
    out = tmp_path / "expect.raw"
    out.write_bytes(expect)
    qemu("compare", "-f", "vhdx", "-F", "raw", path, out)
    with vdisk.open(path, read_only=True) as img:
        assert img.info()["vhdx-log"] == "clean"


def test_replay_extends_the_file_to_last_file_offset(tmp_path):
    """[MS-VHDX]: a file shorter than the entry's LastFileOffset is extended to it.
    (QEMU 7.2 extends it only when LastFileOffset is not 1 MiB aligned, so it refuses
    this image after its replay; vdisk follows the spec.)"""
    path, expect = _logged_image(tmp_path, grow=False)
    size = path.stat().st_size
    assert read_all(path) == expect
    with vdisk.open(path) as img:
        assert img.read(0, img.size) == expect
    assert path.stat().st_size > size and path.stat().st_size % MiB == 0
    assert read_all(path) == expect


def test_torn_log_entry_is_ignored(tmp_path, require_qemu):
    base = tmp_path / "b.vhdx"
    content = G.make_valid(str(base))
    v = G.VhdxFile(base.read_bytes())
    _, off0 = V.bat_entry(v.bat(0))
    sec = random.Random(5).randbytes(4096)
    e1 = G.log_entry(40, [(off0, sec)], flushed=len(v.b), last=len(v.b))
    e2 = bytearray(G.log_entry(41, [(off0 + 4096, bytes(4096))], flushed=len(v.b), last=len(v.b)))
    e2[-1] ^= 1  # the power went while the second entry was written
    path = tmp_path / "t.vhdx"
    path.write_bytes(v.add_log([e1, bytes(e2)], log_guid=G.LOG_GUID).bytes())
    want = sec + content[4096:]
    assert read_all(path) == want
    qemu("check", "-r", "all", path, check=False)
    out = tmp_path / "t.raw"
    qemu("convert", "-O", "raw", path, out)
    assert out.read_bytes() == want


# ----------------------------------------------------------------------------- crash safety of writes
def test_crash_states_keep_flushed_data(tmp_path):
    """Power cuts at random points of a write workload (allocating and in-place
    writes, flushes between): every crash state opens, and every byte holds what the
    last completed flush made durable or what the interrupted epoch wrote there."""
    from crash.storage import CrashLog, MemStorage, RecordingStorage

    from vdisk.block import Image
    from vdisk.drivers.base import CreateOptions
    from vdisk.drivers.vhdx import VhdxDriver

    size = 12 * MiB
    m = MemStorage(name="c.vhdx")
    VhdxDriver.create(m, size, CreateOptions(cluster_size=MiB))
    rec = RecordingStorage(m.snapshot(), "c.vhdx")
    img = Image(VhdxDriver.open(rec, read_only=False), "c.vhdx", None)
    rng = random.Random(12)
    model = bytearray(size)
    epochs = []  # (log position at the end of the epoch's flush, model after it)
    for _ in range(8):
        slots = rng.sample(range(size // 65536), 5)  # disjoint writes within an epoch
        for s in slots:
            data = rng.randbytes(rng.choice([512, 4096, 65536]))
            img.write(s * 65536, data)
            model[s * 65536:s * 65536 + len(data)] = data
        img.flush()
        epochs.append((rec.mark(), bytes(model)))
    img.close()
    cl = CrashLog(rec.base, rec.log)
    crash_rng = random.Random(99)
    for k in range(160):
        st = cl.random_state(crash_rng)
        done = [e for e in epochs if e[0] <= st.durable]
        old = done[-1][1] if done else bytes(size)
        later = [e for e in epochs if e[0] > st.durable]
        new = later[0][1] if later else old
        d = Image(VhdxDriver.open(MemStorage(st.data, "c.vhdx", read_only=True), read_only=True), "c", None)
        got = d.read(0, size)
        d.close()
        for off in range(0, size, 4096):
            g, o, n = got[off:off + 4096], old[off:off + 4096], new[off:off + 4096]
            if g != o and g != n:
                assert all(a in (b, c) for a, b, c in zip(g, o, n)), f"{st.describe()}: wrong data at {off}"


# ----------------------------------------------------------------------------- refusals, chains, locks
def test_refusals(tmp_path):
    path = tmp_path / "x.vhdx"
    vdisk.create(path, 4 * MiB, format="vhdx")
    with pytest.raises(UsageError, match="backing file"):
        vdisk.create(tmp_path / "o.vhdx", format="vhdx", backing_file=path, backing_format="vhdx")
    for opts, what in (({"subformat": "sparse"}, "subformat"), ({"block_size": "3M"}, "block_size"),
                       ({"log_size": "1000"}, "log_size"), ({"colour": "red"}, "unknown")):
        with pytest.raises(UsageError, match=what):
            vdisk.create(tmp_path / f"bad-{what}.vhdx", MiB, format="vhdx", options=opts)
        assert not (tmp_path / f"bad-{what}.vhdx").exists()
    with vdisk.open(path) as img, pytest.raises(NotSupported):
        img.snapshot_create("s")
    with vdisk.open(path, read_only=True) as img, pytest.raises(ReadOnlyImage):
        img.write(0, b"x")
    diff = tmp_path / "diff.vhdx"
    diff.write_bytes(G.VhdxFile(path.read_bytes()).item_set(V.META_FILE_PARAMETERS,
                                                             struct.pack("<II", 8 * MiB, 2)).bytes())
    with pytest.raises(vdisk.errors.CorruptImage, match="parent locator"):
        vdisk.open(diff, read_only=True)
    r = run("info", diff, code=2)
    assert "parent locator" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- differencing disks
def test_differencing_disk_reads_through_its_parent(tmp_path):
    """A differencing disk built from the spec (tests/hostile/gen_vhdx.py): fully and
    partially present blocks (sector bitmap), a zero block hiding the parent's data,
    blocks that are the parent's.  (No other tool here reads these -- QEMU refuses
    them -- so the reference is the content the generator computed.)"""
    _, expect = G.make_differencing(str(tmp_path))
    child = tmp_path / "child.vhdx"
    with vdisk.open(child, read_only=True) as img:
        assert [n.format for n in img.chain()] == ["vhdx", "vhdx"]
        assert img.info()["backing_filename"] == "parent.vhdx"
        assert img.info()["vhdx-subformat"] == "differencing"
        assert img.read(0, img.size) == expect
        for off, n in ((MiB + 8 * 512 - 3, 9 * 512), (MiB + 1000 * 512 - 1, 30 * 512), (5 * MiB - 700, 1400)):
            assert img.read(off, n) == expect[off:off + n]  # unaligned reads across own/parent sectors
        ext = img.block_status(chain=False)
        own = {(e.offset, e.length) for e in ext if e.status == 2}
        assert (MiB + 8 * 512, 8 * 512) in own and (0, MiB) in own and (5 * MiB - 512, 512) in own
        assert any(e.status == 1 and e.offset == 2 * MiB for e in ext)  # the zero block
    out = tmp_path / "flat.raw"
    run("convert", "-O", "raw", child, out)
    assert out.read_bytes() == expect
    run("compare", child, out)
    with pytest.raises(UnsupportedFeature, match="writing differencing"):
        vdisk.open(child)
    with vdisk.open(child, read_only=True, backing=False) as top:  # alone: the parent's ranges read as zeros
        alone = top.read(3 * MiB, MiB)
        assert alone == bytes(MiB)
    # an overlay of another format on top of the chain
    ov = tmp_path / "ov.vdk"
    vdisk.create(ov, format="vdk", backing_file="child.vhdx", backing_format="vhdx")
    with vdisk.open(ov) as img:
        img.write(0, b"top")
        assert img.read(3, len(expect) - 3) == expect[3:]


def test_differencing_parent_follows_the_backing_policy(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    G.make_differencing(str(sub), locator={"relative_path": "..\\parent.vhdx"})
    G.make_valid(str(tmp_path / "parent.vhdx"))
    with pytest.raises(vdisk.errors.BackingError, match="outside"):
        vdisk.open(sub / "child.vhdx", read_only=True)
    with vdisk.open(sub / "child.vhdx", read_only=True, allow_backing_dirs=[str(tmp_path)]) as img:
        assert img.backing.filename.endswith("parent.vhdx")



def test_chains_over_vhdx(tmp_path, require_qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(pattern(9 * MiB, 21))
    base = tmp_path / "base.vhdx"
    qemu("convert", "-O", "vhdx", raw, base)
    ov = tmp_path / "ov.qcow2"
    qemu("create", "-f", "qcow2", "-b", "base.vhdx", "-F", "vhdx", ov)
    with vdisk.open(ov) as img:
        assert img.read(0, img.size) == raw.read_bytes()
        assert [n.format for n in img.chain()] == ["qcow2", "vhdx"]
        img.write(MiB, b"\x11" * 4096)
    want = bytearray(raw.read_bytes())
    want[MiB:MiB + 4096] = b"\x11" * 4096
    exp = tmp_path / "want.raw"
    exp.write_bytes(bytes(want))
    qemu("compare", ov, exp)
    vk = tmp_path / "ov.vdk"
    run("create", "-f", "vdk", "-b", "base.vhdx", vk)  # the backing format probed: vhdx is never raw
    with vdisk.open(vk, read_only=True) as img:
        assert img.info()["backing_format"] == "vhdx" and img.read(0, img.size) == raw.read_bytes()
    # the one backing-reference policy holds for vhdx backing files too
    sub = tmp_path / "sub"
    sub.mkdir()
    qemu("create", "-f", "qcow2", "-b", "../base.vhdx", "-F", "vhdx", sub / "o.qcow2")
    with pytest.raises(vdisk.errors.BackingError, match="outside"):
        vdisk.open(sub / "o.qcow2", read_only=True)


def test_locks_interoperate_with_qemu(tmp_path, require_qemu):
    path = tmp_path / "l.vhdx"
    vdisk.create(path, 4 * MiB, format="vhdx")
    with vdisk.open(path):
        r = qemu("info", path, check=False)
        assert r.returncode != 0 and "lock" in r.stderr.lower()
        qemu("info", "-U", path)
    p = subprocess.Popen(["qemu-io", "-f", "vhdx", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        p.stdin.write("read 0 512\n")
        p.stdin.flush()
        p.stdout.readline()
        with pytest.raises(ImageLocked):
            vdisk.open(path)
    finally:
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait(timeout=30)


def test_probe_and_foreign_table():
    from vdisk.block import foreign_format
    from vdisk.drivers import probe

    head = b"vhdxfile" + bytes(8184)
    assert probe(head) == "vhdx" and foreign_format(head) is None


# ----------------------------------------------------------------------------- the spec
_TABLES = {"Header": V.HEADER_FIELDS, "Region table header": V.REGION_FIELDS,
           "Region table entry": V.REGION_ENTRY_FIELDS, "Metadata table header": V.METADATA_FIELDS,
           "Metadata table entry": V.METADATA_ENTRY_FIELDS, "Log entry header": V.LOG_HEADER_FIELDS,
           "Log descriptor": V.LOG_DESC_FIELDS}


def test_spec_tables_match_the_codec():
    """formats/vhdx.md's byte-range tables give every field the codec reads, at its offset and size."""
    text = (ROOT / "formats" / "vhdx.md").read_text()
    for title, fields in _TABLES.items():
        m = re.search(rf"^#+ [^\n]*{re.escape(title)}\b[^\n]*\n(.*?)(?=^#)", text, re.MULTILINE | re.DOTALL)
        assert m, f"formats/vhdx.md has no section '{title}'"
        rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*`?(\w+)`?\s*\|", m.group(1), re.MULTILINE)
        doc = {name: (int(off), int(size)) for off, size, name in rows}
        for name, (off, fmt) in fields.items():
            assert name in doc, f"{title}: field {name} missing from formats/vhdx.md"
            assert doc[name] == (off, struct.calcsize("<" + fmt)), f"{title}.{name}: doc {doc[name]}"
    for const, value in (("64 KiB", V.HEADER_OFFSETS[0]), ("192 KiB", V.REGION_TABLE_OFFSETS[0])):
        assert const in text and value in (64 << 10, 192 << 10)


def test_registered():
    from vdisk.drivers import KNOWN_FORMATS, MAGICS, get_driver

    assert KNOWN_FORMATS["vhdx"] == "vhdx" and MAGICS["vhdx"] == ((0, b"vhdxfile"),)
    drv = get_driver("vhdx")
    assert drv.format_name == "vhdx" and set(drv.create_options) >= {"subformat", "block_size", "log_size"}
    assert os.path.exists(ROOT / "vdisk" / "drivers" / "vhdx" / "__init__.py")


def test_disk_past_4g_with_sector_bitmap_entries(tmp_path, require_qemu):
    """Past 2^23 sectors the BAT interleaves a sector bitmap entry; both directions."""
    size = (4 << 30) + 3 * MiB
    raw = tmp_path / "big.raw"
    tail = random.Random(8).randbytes(3 * MiB)
    with open(raw, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(b"\x42" * 4096)
        f.seek(size - len(tail))
        f.write(tail)
    q = tmp_path / "q.vhdx"
    qemu("convert", "-O", "vhdx", "-o", "block_size=1M", raw, q)
    with vdisk.open(q, read_only=True) as img:
        assert img.size == size
        assert img.read(4096, 4096) == b"\x42" * 4096 and img.read(size - len(tail), len(tail)) == tail
        assert img.read(2 << 30, MiB) == bytes(MiB)
    v = tmp_path / "v.vhdx"
    vdisk.create(v, size, format="vhdx", cluster_size=MiB)
    with vdisk.open(v) as img:
        img.write(4096, b"\x42" * 4096)
        img.write(size - len(tail), tail)
    qemu("check", v)
    qemu("compare", "-f", "vhdx", "-F", "raw", v, raw)
    # a garbage sector bitmap entry (qemu-img before 8.0 could write one) is ignored
    g = G.VhdxFile(v.read_bytes()).set_bat(4096, V.make_bat_entry(3, 1 << 45))
    v2 = tmp_path / "g.vhdx"
    v2.write_bytes(g.bytes())
    with vdisk.open(v2) as img:
        assert img.read(size - len(tail), len(tail)) == tail
        img.write(3 << 30, b"\x01" * 4096)  # allocates a new block at the end of the file, not at 2^45
    assert v2.stat().st_size < 64 * MiB


def test_crc32c_known_answers():
    """RFC 3720 (iSCSI) B.4 vectors and the usual check value; continuing a CRC."""
    assert V.crc32c(b"123456789") == 0xE3069283
    assert V.crc32c(bytes(32)) == 0x8A9136AA
    assert V.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert V.crc32c(bytes(range(32))) == 0x46DD794E
    data = random.Random(1).randbytes(100_003)
    assert V.crc32c(data[37:], V.crc32c(data[:37])) == V.crc32c(data)
    buf = bytearray(4096)
    buf[100] = 7
    V.sign(buf)
    assert V.checksum(bytes(buf)) == struct.unpack_from("<I", buf, 4)[0]


def test_a_log_that_would_corrupt_the_image_is_refused_before_writing(tmp_path):
    """A valid entry whose replay would leave a BAT entry past the end of the file:
    the read-write open refuses it without changing a byte (the replayed state is
    checked in memory first)."""
    base = tmp_path / "b.vhdx"
    G.make_valid(str(base))
    v = G.VhdxFile(base.read_bytes())
    sector = bytearray(v.b[v.bat_off:v.bat_off + 4096])
    struct.pack_into("<Q", sector, 8, V.make_bat_entry(V.PAYLOAD_FULLY_PRESENT, 1 << 44))
    e = G.log_entry(8, [(v.bat_off, bytes(sector))], flushed=len(v.b), last=len(v.b))
    path = tmp_path / "bad.vhdx"
    path.write_bytes(v.add_log([e], log_guid=G.LOG_GUID).bytes())
    before = path.read_bytes()
    for ro in (True, False):
        with pytest.raises(vdisk.errors.CorruptImage, match="outside the file"):
            vdisk.open(path, read_only=ro)
    assert path.read_bytes() == before


def test_differencing_disk_refuses_a_changed_parent(tmp_path):
    """parent_linkage names the parent's DataWriteGuid; a write to the parent changes
    it (vdisk changes it before the first write, as the spec asks), and the child is
    then refused instead of read as a mix of old and new."""
    _, expect = G.make_differencing(str(tmp_path))
    child = tmp_path / "child.vhdx"
    assert read_all(child) == expect
    with vdisk.open(tmp_path / "parent.vhdx") as p:
        p.write(3 * MiB, b"changed")
    with pytest.raises(vdisk.errors.BackingError, match="parent was changed"):
        vdisk.open(child, read_only=True)
    with vdisk.open(child, read_only=True, backing=False) as top:  # the disk alone still opens
        assert top.read(0, MiB) == expect[:MiB]


def test_4k_logical_sectors(tmp_path, require_qemu):
    """logical_sector_size=4096 (a 4Kn disk, as Hyper-V makes them): the chunk ratio
    doubles; vdisk reads back what it wrote.  qemu-img 7.2 refuses such disks
    ("Operation not supported"), so the reference here is the written model."""
    path = tmp_path / "4k.vhdx"
    vdisk.create(path, 10 * MiB + 4096, format="vhdx", cluster_size=MiB, options={"logical_sector_size": "4096"})
    data = random.Random(2).randbytes(3 * MiB)
    with vdisk.open(path) as img:
        assert img.size == 10 * MiB + 4096
        img.write(MiB - 100, data)
    with vdisk.open(path, read_only=True) as img:
        assert img.info()["vhdx-logical-sector-size"] == 4096
        assert img.read(MiB - 100, len(data)) == data and img.read(0, MiB - 100) == bytes(MiB - 100)
    assert qemu("info", path, check=False).returncode != 0  # (documents the QEMU limit this test relies on)
    with pytest.raises(UsageError, match="logical_sector_size"):
        vdisk.create(tmp_path / "bad.vhdx", MiB, format="vhdx", options={"logical_sector_size": "1024"})
