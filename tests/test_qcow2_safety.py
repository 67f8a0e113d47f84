"""qcow2 safety: data clusters inside metadata, bounded zstd decoding, compact
tables, snapshot names, and the qemu-img habits vdisk follows (checked against
qemu-img on the same files).

Each test here failed on the code before the fix it comes with."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

import vdisk
from vdisk.codec import qcow2 as C
from vdisk.codec import qcow2_snapshot as QS
from vdisk.codec import zstd as Z
from vdisk.errors import CorruptImage, UsageError

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.usefixtures("require_qemu")
KiB, MiB = 1 << 10, 1 << 20
CS = 65536


# ---------------------------------------------------------------------- helpers
def header(path) -> C.Header:
    with open(path, "rb") as f:
        return C.decode_header(f.read(4096))


def read_u64(path, offset) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path, offset, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def l2_entry_offset(path, gci: int) -> int:
    """Host offset of the L2 entry of guest cluster ``gci`` (64 KiB clusters)."""
    h = header(path)
    l1i, l2i = divmod(gci, h.cluster_size // 8)
    l2 = read_u64(path, h.l1_table_offset + 8 * l1i) & C.OFFSET_MASK
    assert l2, "no L2 table"
    return l2 + 8 * l2i


def qemu_img(*args) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=120)


def qemu_check_clean(path) -> None:
    r = qemu_img("check", "-f", "qcow2", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leaked" not in r.stdout, r.stdout


def fresh(tmp_path, name="a.qcow2", size=4 * MiB, **kw) -> str:
    p = str(tmp_path / name)
    vdisk.create(p, size, format="qcow2", **kw)
    return p


# ---------------------------------------------------------------------- 1. data clusters inside metadata
def _image_with_two_clusters(tmp_path) -> str:
    p = fresh(tmp_path)
    with vdisk.open(p) as img:
        img.write(0, b"\x11" * CS)
        img.write(CS, b"\x22" * CS)
        img.snapshot_create("s1")  # a snapshot table and a snapshot L1 table
        img.write(2 * CS, b"\x33" * CS)
    return p


def _metadata_offsets(p) -> dict[str, int]:
    h = header(p)
    snap_l1 = read_u64(p, h.snapshots_offset)  # first field of the first snapshot entry
    return {
        "header": 0,
        "refcount table": h.refcount_table_offset,
        "refcount block": read_u64(p, h.refcount_table_offset) & C.OFFSET_MASK,
        "L1 table": h.l1_table_offset,
        "L2 table": read_u64(p, h.l1_table_offset) & C.OFFSET_MASK,
        "snapshot table": h.snapshots_offset,
        "snapshot L1 table": snap_l1,
    }


@pytest.mark.parametrize("target", ["refcount table", "refcount block", "L1 table", "L2 table",
                                    "snapshot table", "snapshot L1 table"])
def test_data_cluster_inside_metadata_is_refused_on_read(tmp_path, target):
    p = _image_with_two_clusters(tmp_path)
    meta = _metadata_offsets(p)[target]
    assert meta and meta % CS == 0
    write_u64(p, l2_entry_offset(p, 1), meta | C.FLAG_COPIED)
    with vdisk.open(p, read_only=True) as img:
        assert img.read(0, CS) == b"\x11" * CS  # the other clusters still read
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.read(CS, CS)
        with pytest.raises(CorruptImage, match=f"guest offset {CS} "):
            img.read(0, 3 * CS)
        assert img.check().exit_code == 2  # check reported it already


@pytest.mark.parametrize("target", ["header", "L1 table", "refcount block"])
def test_compressed_cluster_inside_metadata_is_refused(tmp_path, target):
    p = _image_with_two_clusters(tmp_path)
    meta = _metadata_offsets(p)[target]
    write_u64(p, l2_entry_offset(p, 1), C.encode_compressed(meta + 100, 300, 16))
    with vdisk.open(p, read_only=True) as img:
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.read(CS, 10)


def test_contiguous_run_into_metadata_is_refused(tmp_path):
    """A data cluster followed on the host by an L2 table: a read of both guest
    clusters must not run on into the table."""
    p = fresh(tmp_path, size=1 << 30)
    l2_span = CS * (CS // 8)
    with vdisk.open(p) as img:
        img.write(0, b"\x11" * CS)  # L2 table, then the data cluster
        img.write(l2_span, b"\x22" * CS)  # the second L2 table lands right after it
    first = read_u64(p, l2_entry_offset(p, 0)) & C.OFFSET_MASK
    second_l2 = read_u64(p, header(p).l1_table_offset + 8) & C.OFFSET_MASK
    assert second_l2 == first + CS
    write_u64(p, l2_entry_offset(p, 1), second_l2 | C.FLAG_COPIED)
    with vdisk.open(p, read_only=True) as img:
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.read(0, 2 * CS)


def test_write_into_metadata_is_refused_and_metadata_kept(tmp_path):
    """COPIED and refcount 1 (the L1 table's own): today's in-place rewrite would
    overwrite the L1 table with guest data."""
    p = _image_with_two_clusters(tmp_path)
    l1 = header(p).l1_table_offset
    write_u64(p, l2_entry_offset(p, 1), l1 | C.FLAG_COPIED)
    with open(p, "rb") as f:
        f.seek(l1)
        before = f.read(CS)
    with vdisk.open(p) as img:
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.write(CS, b"\xee" * CS)
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.write(CS + 5, b"\xee" * 100)
        with pytest.raises(CorruptImage, match=f"guest offset {CS} .*metadata"):
            img.discard(0, 2 * CS)
        with pytest.raises(CorruptImage, match="metadata"):
            img.snapshot_create("s2")
    with open(p, "rb") as f:
        f.seek(l1)
        assert f.read(CS) == before


def test_convert_of_image_pointing_at_its_l1_fails(tmp_path, run_vdisk):
    """The reported case: ``vdisk convert`` exited 0 and copied the L1 table as data."""
    p = _image_with_two_clusters(tmp_path)
    write_u64(p, l2_entry_offset(p, 1), header(p).l1_table_offset | C.FLAG_COPIED)
    out = str(tmp_path / "out.raw")
    r = run_vdisk("convert", "-O", "raw", p, out, expect=2)
    assert f"guest offset {CS}" in r.stderr and "metadata" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_metadata_index_follows_allocation_and_freeing(tmp_path):
    """Metadata that moves or is freed (L1 relocation on grow, snapshot tables and
    L1 copies, L2 tables freed with a snapshot) is reused for data without a false
    alarm, and the data reads back."""
    p = fresh(tmp_path, size=1 * MiB, cluster_size=4096)
    model = bytearray(1 * MiB)
    with vdisk.open(p) as img:
        for i in range(0, 1 * MiB, 12288):
            img.write(i, bytes([i % 251 + 1]) * 4096)
            model[i : i + 4096] = bytes([i % 251 + 1]) * 4096
        for k in range(3):
            img.snapshot_create(f"s{k}")
            img.write(k * 4096, b"\x77" * 4096)
            model[k * 4096 : (k + 1) * 4096] = b"\x77" * 4096
        img.resize(64 * MiB)  # the L1 table moves; its old cluster is freed
        model.extend(bytes(63 * MiB))
        for k in range(3):
            img.snapshot_delete(f"s{k}")
        for i in range(0, 2 * MiB, 4096):  # fills the freed clusters with data
            img.write(8 * MiB + i, b"\x55" * 4096)
            model[8 * MiB + i : 8 * MiB + i + 4096] = b"\x55" * 4096
        assert img.read(0, img.size) == bytes(model)
        assert img.check().exit_code == 0
    with vdisk.open(p, read_only=True) as img:
        assert img.read(0, img.size) == bytes(model)


# ---------------------------------------------------------------------- 2. bounded zstd
def rle_bomb(nblocks: int, *, content_size: int | None = None, window_log: int = 17) -> bytes:
    """A zstd frame of ``nblocks`` RLE blocks of 128 KiB: 4 bytes each."""
    if content_size is None:
        out = bytearray(b"\x28\xb5\x2f\xfd\x00") + bytes([(window_log - 10) << 3])
    else:
        out = bytearray(b"\x28\xb5\x2f\xfd\xc0") + bytes([(window_log - 10) << 3]) + struct.pack("<Q", content_size)
    for i in range(nblocks):
        last = 1 if i == nblocks - 1 else 0
        out += (last | (1 << 1) | (131072 << 3)).to_bytes(3, "little") + b"\x41"
    return bytes(out)


def zframe(data: bytes, **kw) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(**kw).compress(data)


def test_zstd_bounded_modes():
    data = bytes(range(256)) * (CS // 256)
    f = zframe(data, write_content_size=True)
    assert Z.decompress_bounded(f, CS) == data
    assert Z.decompress_bounded(f + b"\0" * 300, CS, exact=False) == data
    nofcs = zframe(data, write_content_size=False, write_checksum=True)
    assert Z.decompress_bounded(nofcs, CS, exact=False) == data
    two = zframe(data[:1000]) + zframe(data[1000:], write_content_size=False) + b"junk"
    assert Z.decompress_bounded(two, CS, exact=False) == data
    # vdk's rules: exactly one frame, its content size stated, nothing after it
    for bad, msg in [(f + b"\0", "not exactly one zstd frame"), (nofcs, "no content size"),
                     (two, "content size of 1000"), (f[:-5], "truncated")]:
        with pytest.raises(Z.CorruptFrame, match=msg):
            Z.decompress_bounded(bad, CS)
    # both modes
    for exact in (True, False):
        with pytest.raises(Z.CorruptFrame, match="content size of 65536 bytes, not 4096"):
            Z.decompress_bounded(f, 4096, exact=exact)
        with pytest.raises(Z.CorruptFrame, match="no zstd frame"):
            Z.decompress_bounded(b"\0" * 100, CS, exact=exact)
    with pytest.raises(Z.CorruptFrame, match="more than 4096 bytes"):
        Z.decompress_bounded(nofcs, 4096, exact=False)
    with pytest.raises(Z.CorruptFrame, match="decompresses to 1000 bytes, not 65536"):
        Z.decompress_bounded(zframe(data[:1000]), CS, exact=False)
    assert issubclass(Z.CorruptFrame, CorruptImage)


@pytest.mark.parametrize("exact", [True, False])
def test_zstd_bomb_allocates_about_one_cluster(exact):
    cases = [
        (rle_bomb(8191), "more than 65536 bytes" if not exact else "no content size"),  # 32 KiB -> 1 GiB
        (rle_bomb(8191, content_size=1 << 30), "content size of 1073741824"),
        (rle_bomb(4, window_log=30), "window of 1073741824 bytes"),
    ]
    for frame, msg in cases:
        tracemalloc.start()
        try:
            with pytest.raises(Z.CorruptFrame, match=msg):
                Z.decompress_bounded(frame, CS, exact=exact)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < CS + 256 * KiB, (msg, peak)


_BOMB_READER = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    import vdisk
    from vdisk.errors import VdiskError
    path = sys.argv[1]
    img = vdisk.open(path, read_only=True)
    img.read(4 * 65536, 65536)            # warm up: imports and caches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    err = None
    try:
        img.read(0, 65536)
    except VdiskError as exc:
        err = str(exc)
    peak = tracemalloc.get_traced_memory()[1]
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"error": err, "traced_peak": peak, "rss_growth_kib": grow}))
""")


def test_zstd_bomb_in_a_qcow2_cluster_read_in_bounded_memory(tmp_path):
    """The reported case: a 32 KiB zstd frame in a qcow2 compressed cluster made a
    one-cluster read peak at 1 GiB.  Measured in a fresh process."""
    p = fresh(tmp_path, compression="zstd")
    with vdisk.open(p) as img:
        img.write(4 * CS, os.urandom(CS // 2) * 2)
        d = img.driver
        bomb = rle_bomb(8191)
        assert len(bomb) <= 32 * KiB + 8
        entry = d._place_compressed(bomb)
        l2off, table = d._l2_for_write(0)
        table[0] = entry
        d._l2dirty.add(l2off)
    r = subprocess.run([sys.executable, "-c", _BOMB_READER, p], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["error"] and "guest offset 0" in res["error"], res
    assert res["traced_peak"] < 1 * MiB, res
    assert res["rss_growth_kib"] < 16 * 1024, res


def test_zstd_clusters_written_by_qemu_still_read(tmp_path, require_qemu):
    p = str(tmp_path / "q.qcow2")
    raw = str(tmp_path / "src.raw")
    with open(raw, "wb") as f:
        for i in range(32):
            f.write((bytes([i]) * 1000 + os.urandom(24)) * 64)
    r = qemu_img("convert", "-c", "-o", "compression_type=zstd", "-f", "raw", "-O", "qcow2", raw, p)
    assert r.returncode == 0, r.stderr
    with vdisk.open(p, read_only=True) as img, open(raw, "rb") as f:
        assert img.info()["compression_type"] == "zstd"
        assert img.read(0, img.size) == f.read()


# ---------------------------------------------------------------------- caches
def test_metadata_loaded_while_cache_is_full_of_dirty_tables_is_kept(tmp_path):
    """More dirty L2 tables than the cache holds (a snapshot clears COPIED in each):
    a table loaded then was evicted at once, and flush failed with KeyError."""
    p = fresh(tmp_path, size=32 * MiB, cluster_size=512)
    with vdisk.open(p) as img:
        for i in range(600):  # one L2 table (64 clusters of 512 bytes) each
            img.write(i * 32 * KiB, bytes([i % 255 + 1]) * 512)
    with vdisk.open(p) as img:
        img.snapshot_create("s1")
        img.write(0, b"\xff" * 512)
    with vdisk.open(p, read_only=True) as img:
        assert img.check().exit_code == 0
        assert img.read(0, 512) == b"\xff" * 512
        assert img.read(599 * 32 * KiB, 512) == bytes([599 % 255 + 1]) * 512


# ---------------------------------------------------------------------- 3. compact tables
def _traced_peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_32mib_l1_table_is_held_compactly(tmp_path, require_qemu):
    """A 32 MiB L1 table (128 GiB at 512-byte clusters: 4M entries) costs about
    32 MiB, not a multiple: no list of entries, no second copy while reading or
    writing it, and metadata_bytes() says so."""
    p = str(tmp_path / "big.qcow2")
    _, peak = _traced_peak(lambda: vdisk.create(p, 128 << 30, format="qcow2", cluster_size=512))
    assert header(p).l1_size == 4 << 20
    assert peak < 40 * MiB, peak
    img, peak = _traced_peak(lambda: vdisk.open(p, read_only=True))
    with img:
        assert peak < 40 * MiB, peak
        assert 32 * MiB <= img.driver.metadata_bytes() < 34 * MiB
        assert img.read(100 << 30, 4096) == bytes(4096)

    def write():
        with vdisk.open(p) as img:
            img.write(100 << 30, b"\x42" * 4096)
            img.flush()

    def snapshot():
        with vdisk.open(p) as img:
            img.snapshot_create("s1")
            img.write(100 << 30, b"\x43" * 512)

    for fn in (write, snapshot):
        _, peak = _traced_peak(fn)
        assert peak < 44 * MiB, (fn.__name__, peak)
    qemu_check_clean(p)
    with vdisk.open(p, read_only=True) as img:
        assert img.read(100 << 30, 1024) == b"\x43" * 512 + b"\x42" * 512
    with vdisk.open(p, read_only=True, snapshot="s1") as img:
        assert img.read(100 << 30, 1024) == b"\x42" * 1024


def test_metadata_bytes_counts_caches_and_stays_bounded(tmp_path):
    p = fresh(tmp_path, size=32 * MiB, cluster_size=512)
    with vdisk.open(p) as img:
        for i in range(1024):  # 1024 L2 tables of 512 bytes
            img.write(i * 32 * KiB, b"\x01" * 512)
    with vdisk.open(p, read_only=True) as img:
        d = img.driver
        start = d.metadata_bytes()
        assert start >= 8 * len(d.l1) + 8 * len(d.reftable)
        img.read(0, img.size)
        full = d.metadata_bytes()
        assert full - start >= 512 * 512  # the L2 cache is full
        assert full < start + 600 * 1024 + 512 * 1024  # and bounded (512 clean tables kept)


# ---------------------------------------------------------------------- 4. snapshot names
BAD_NAMES = ["\udcff", "caf\udce9", "", "x" * 256, "é" * 128, "a@b", "tab\there", "nl\n", "del\x7f", "c1\x85",
             " lead", "trail ", "#12", "a/b"]


def _file_bytes(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: ascii(n)[:20])
def test_bad_snapshot_name_refused_before_anything_is_written(tmp_path, name, require_qemu):
    p = _image_with_two_clusters(tmp_path)
    before = _file_bytes(p)
    with vdisk.open(p) as img:
        with pytest.raises(UsageError, match="snapshot name") as exc:
            img.snapshot_create(name)
        assert "\n" not in str(exc.value)
        assert [s.name for s in img.snapshot_list()] == ["s1"]
    assert _file_bytes(p) == before
    qemu_check_clean(p)


def test_good_snapshot_names_round_trip_through_qemu(tmp_path, require_qemu):
    p = _image_with_two_clusters(tmp_path)
    names = ["é" * 127, "x" * 255, "with space", "日本語"]
    with vdisk.open(p) as img:
        for n in names:
            img.snapshot_create(n)
        assert img.snapshot_list()[1].name == names[0]
        img.snapshot_revert("#1")  # by id
        assert img.read(2 * CS, CS) == bytes(CS)
    qemu_check_clean(p)
    r = qemu_img("snapshot", "-l", p)
    assert r.returncode == 0 and "日本語" in r.stdout


def test_non_utf8_snapshot_name_on_the_command_line_leaks_nothing(tmp_path, require_qemu):
    """The reported case: ``vdisk snapshot create IMG $'\\xff'`` leaked 34 clusters."""
    from conftest import vdisk_command

    p = _image_with_two_clusters(tmp_path)
    before = _file_bytes(p)
    argv = [a.encode() for a in vdisk_command()] + [b"snapshot", b"create", p.encode(), b"bad\xffname"]
    r = subprocess.run(argv, capture_output=True, timeout=120)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    assert "not valid UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert _file_bytes(p) == before
    qemu_check_clean(p)


# ---------------------------------------------------------------------- 5. qemu-img habits
def qemu_info(path) -> dict:
    r = qemu_img("info", "-f", "qcow2", "--output", "json", path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def qemu_map_data(path) -> list:
    """Extents of ``path`` that hold data in the image itself (depth 0)."""
    r = qemu_img("map", "-f", "qcow2", "--output", "json", path)
    assert r.returncode == 0, r.stderr
    return [e for e in json.loads(r.stdout) if e["data"] and e["depth"] == 0]


@pytest.mark.parametrize("size", [1, 511, 512, 513, 1000001, MiB + 1])
def test_create_rounds_size_up_to_sectors_as_qemu_img(tmp_path, size, require_qemu):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    vdisk.create(ours, size, format="qcow2")
    assert qemu_img("create", "-f", "qcow2", theirs, str(size)).returncode == 0
    want = qemu_info(theirs)["virtual-size"]
    assert want % 512 == 0 and want >= size
    assert qemu_info(ours)["virtual-size"] == want
    with vdisk.open(ours, read_only=True) as img:
        assert img.size == want
        assert img.read(0, want) == bytes(want)
    qemu_check_clean(ours)


def test_commit_empties_a_qcow2_overlay_as_qemu_img_commit(tmp_path, run_vdisk, require_qemu):
    base = fresh(tmp_path, "base.qcow2", size=8 * MiB)
    with vdisk.open(base) as img:
        img.write(0, b"\x01" * (2 * MiB))
    top = str(tmp_path / "top.qcow2")
    vdisk.create(top, format="qcow2", backing_file=base, backing_format="qcow2")
    with vdisk.open(top) as img:
        img.write(MiB - 100, b"\x02" * (3 * MiB))
        img.write_zeroes(5 * MiB, CS)
        img.write(7 * MiB, os.urandom(CS))
    qdir = tmp_path / "q"
    qdir.mkdir()
    shutil.copy(base, qdir / "base.qcow2")
    shutil.copy(top, qdir / "top.qcow2")
    with vdisk.open(top, read_only=True) as img:
        content = img.read(0, img.size)
    run_vdisk("commit", top)
    r = qemu_img("commit", "-f", "qcow2", str(qdir / "top.qcow2"))
    assert r.returncode == 0, r.stderr
    for t, b in ((top, base), (str(qdir / "top.qcow2"), str(qdir / "base.qcow2"))):
        qemu_check_clean(t)
        qemu_check_clean(b)
        assert qemu_map_data(t) == []  # nothing left in the overlay
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", base, str(qdir / "base.qcow2")).returncode == 0
    with vdisk.open(top, read_only=True) as img:
        assert img.read(0, img.size) == content
        assert img.check().exit_code == 0


def test_make_empty_keeps_snapshots(tmp_path, require_qemu):
    base = fresh(tmp_path, "base.qcow2", size=2 * MiB)
    top = str(tmp_path / "top.qcow2")
    vdisk.create(top, format="qcow2", backing_file=base, backing_format="qcow2")
    with vdisk.open(top) as img:
        img.write(0, b"\x05" * (MiB + 7))
        img.snapshot_create("s1")
        img.write(CS, b"\x06" * CS)
        img.make_empty()
        assert img.read(0, 2 * MiB) == bytes(2 * MiB)
        assert img.check().exit_code == 0
    qemu_check_clean(top)
    with vdisk.open(top, read_only=True, snapshot="s1") as img:
        assert img.read(0, MiB + 8) == b"\x05" * (MiB + 7) + b"\0"


def test_compressed_writes_default_to_zlib_as_qemu_img(tmp_path, require_qemu):
    raw = str(tmp_path / "src.raw")
    with open(raw, "wb") as f:
        f.write((b"compressible " * 5000)[: 4 * CS] + bytes(4 * CS))
    theirs = str(tmp_path / "theirs.qcow2")
    assert qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, theirs).returncode == 0
    assert qemu_info(theirs)["format-specific"]["data"]["compression-type"] == "zlib"
    for comp, opts, want in (("on", {}, "zlib"), ("default", {}, "zlib"), ("on", {"compression_type": "zstd"}, "zstd"),
                             (None, {"compression_type": "zstd"}, "zstd"), ("zstd", {}, "zstd")):
        ours = str(tmp_path / f"ours-{comp}-{want}.qcow2")
        vdisk.create(ours, 8 * CS, format="qcow2", compression=comp, options=opts)
        with vdisk.open(ours) as img, open(raw, "rb") as f:
            img.write(0, f.read())
        assert qemu_info(ours)["format-specific"]["data"]["compression-type"] == want
        qemu_check_clean(ours)
        with vdisk.open(ours, read_only=True) as img:
            assert img.info()["compressed_writes"] is (comp is not None)
            assert img.check().compressed_clusters == (4 if comp is not None else 0)
        assert qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, ours).returncode == 0


def _filled_with_snapshot(path, *, v2=False):
    r = qemu_img("create", "-f", "qcow2", "-o", "compat=0.10" if v2 else "compat=1.1", path, "16M")
    assert r.returncode == 0, r.stderr
    with vdisk.open(path) as img:
        img.write(0, b"\x01" * (16 * MiB))
        img.snapshot_create("s1")
        img.write(0, b"\x02" * MiB)


@pytest.mark.parametrize("new_size", [8 * MiB, 1000448, 3 * CS])
def test_shrink_under_snapshots_as_qemu_img(tmp_path, run_vdisk, new_size, require_qemu):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    _filled_with_snapshot(ours)
    shutil.copy(ours, theirs)
    run_vdisk("resize", "--shrink", ours, new_size)
    r = qemu_img("resize", "-f", "qcow2", "--shrink", theirs, str(new_size))
    assert r.returncode == 0, r.stderr
    for p in (ours, theirs):
        assert qemu_info(p)["virtual-size"] == new_size
        qemu_check_clean(p)
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs).returncode == 0
    with vdisk.open(ours, read_only=True, snapshot="s1") as img:  # the snapshot keeps its size and data
        assert img.size == 16 * MiB and img.read(0, img.size) == b"\x01" * (16 * MiB)
    run_vdisk("snapshot", "revert", ours, "s1")
    with vdisk.open(ours, read_only=True) as img:
        assert img.size == 16 * MiB and img.read(0, img.size) == b"\x01" * (16 * MiB)
    qemu_check_clean(ours)
    with vdisk.open(theirs) as img:  # grows again with zeros past the old end
        img.resize(16 * MiB)
        assert img.read(new_size, 16 * MiB - new_size) == bytes(16 * MiB - new_size)
    qemu_check_clean(theirs)


def test_resize_of_v2_image_with_snapshots_refused_as_qemu_img(tmp_path, run_vdisk, require_qemu):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    _filled_with_snapshot(ours, v2=True)
    shutil.copy(ours, theirs)
    before = _file_bytes(ours)
    for args in (["--shrink", "8M"], ["32M"]):
        r = run_vdisk("resize", *args[:-1], ours, args[-1], expect=1)
        assert "version 2" in r.stderr and "snapshots" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        q = qemu_img("resize", "-f", "qcow2", *args[:-1], theirs, args[-1])
        assert q.returncode == 1 and "v2 image which has snapshots" in q.stderr
    assert _file_bytes(ours) == before


def test_snapshot_rename_seen_by_qemu(tmp_path, require_qemu):
    from vdisk.errors import SnapshotExists

    p = _image_with_two_clusters(tmp_path)
    with vdisk.open(p) as img:
        img.snapshot_create("s2")
        before = _file_bytes(p)
        for bad in ("a@b", "\udcff", ""):
            with pytest.raises(UsageError):
                img.snapshot_rename("s1", bad)
        with pytest.raises(SnapshotExists):
            img.snapshot_rename("s1", "s2")
        assert _file_bytes(p) == before
        info = img.snapshot_rename("s1", "renamed")
        assert info.name == "renamed"
        img.snapshot_rename("#2", "second")
        assert [s.name for s in img.snapshot_list()] == ["renamed", "second"]
    qemu_check_clean(p)
    out = qemu_img("snapshot", "-l", p).stdout
    assert "renamed" in out and "second" in out and "s1" not in out
    with vdisk.open(p, read_only=True, snapshot="renamed") as img:
        assert img.read(0, 3 * CS) == b"\x11" * CS + b"\x22" * CS + bytes(CS)


def test_metadata_index_is_a_set():
    """The compact cluster set against a Python set, through random adds, runs,
    removals and range queries (folds included)."""
    import random

    from vdisk.drivers.qcow2 import _ClusterSet

    rnd = random.Random(7)
    model = set(rnd.randrange(5000) for _ in range(300))
    runs = [(a, a + rnd.randrange(1, 40)) for a in (rnd.randrange(5000) for _ in range(20))]
    for a, b in runs:
        model.update(range(a, b))
    class Small(_ClusterSet):
        FOLD = 64  # fold often

    cs = Small(iter(sorted(model, reverse=True)), runs)
    for step in range(20000):
        op = rnd.random()
        c = rnd.randrange(5000)
        if op < 0.35:
            cs.add(c)
            model.add(c)
        elif op < 0.4:
            n = rnd.randrange(1, 100)
            cs.add_range(c, n)
            model.update(range(c, c + n))
        elif op < 0.8:
            cs.discard(c)
            model.discard(c)
        else:
            n = rnd.randrange(1, 200)
            want = min((x for x in model if c <= x < c + n), default=None)
            assert cs.first_in(c, c + n) == want, (step, c, n)
        if step % 1000 == 0:
            assert all((x in cs) == (x in model) for x in range(5100))
    assert all((x in cs) == (x in model) for x in range(5100))


def test_many_big_overlapping_snapshot_l1_tables_open_quickly(tmp_path):
    """2000 snapshots whose 32 MiB L1 tables overlap: the metadata index holds runs,
    not 65536 clusters per table, and reads at most MAX_SNAPSHOT_L1_SCAN of them."""
    import time

    from vdisk.drivers.qcow2 import MAX_SNAPSHOT_L1_SCAN

    p = fresh(tmp_path, size=1 * MiB, cluster_size=512)
    with vdisk.open(p) as img:
        img.write(0, b"\x09" * 4096)
    h = header(p)
    end = os.path.getsize(p)
    l1s_at = (end + 511) // 512 * 512  # zeros past the image's clusters
    table_at = l1s_at + 64 * MiB
    snaps = [QS.Snapshot(l1_table_offset=l1s_at + 512 * i, l1_size=4 << 20, id=str(i + 1), name=f"s{i}",
                        disk_size=1 * MiB) for i in range(2000)]
    blob = QS.encode_snapshot_table(snaps)
    with open(p, "r+b") as f:
        f.seek(table_at)
        f.write(blob)
        f.seek(0)
        f.write(C.encode_header(h.replace(nb_snapshots=len(snaps), snapshots_offset=table_at)))
    t = time.monotonic()
    with vdisk.open(p, read_only=True) as img:
        assert img.read(0, 4096) == b"\x09" * 4096
        assert img.driver.metadata_bytes() < 2 * MiB
        assert img.driver._meta_partial and MAX_SNAPSHOT_L1_SCAN < 2000 * (32 * MiB)
    assert time.monotonic() - t < 20


def test_l2_cache_is_bounded_in_bytes_for_big_clusters(tmp_path):
    """With 2 MiB clusters an L2 table is 2 MiB: 512 cached tables were 1 GiB, which
    a hostile sparse file of distinct (empty) L2 tables could make a read hold."""
    big = 2 * MiB
    span = big * (big // 8)  # guest bytes one L2 table maps: 512 GiB
    p = fresh(tmp_path, size=64 * span, cluster_size=big)
    h = header(p)
    assert h.l1_size == 64
    first = (os.path.getsize(p) + big - 1) // big * big
    with open(p, "r+b") as f:
        for i in range(64):  # 64 distinct L2 tables of zeros in a sparse file
            f.seek(h.l1_table_offset + 8 * i)
            f.write(struct.pack(">Q", first + i * big))
        f.truncate(first + 64 * big)
    with vdisk.open(p, read_only=True) as img:
        tracemalloc.start()
        try:
            for i in range(64):
                assert img.read(i * span, 512) == bytes(512)
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held < 40 * MiB, held
        assert img.driver.metadata_bytes() < 40 * MiB


# ---------------------------------------------------------------------- crash points of the new operations
def _crash_states(ops):
    """Every prefix of the host operations, and random subsets of each stage between
    two flushes (the host may reorder a stage's writes)."""
    import random

    rng = random.Random(11)
    states = [ops[:k] for k in range(len(ops) + 1)]
    prev = 0
    for fi in [i for i, op in enumerate(ops) if op[0] == "f"]:
        for _ in range(3):
            states.append(ops[:prev] + [ops[i] for i in range(prev, fi) if rng.random() < 0.5])
        prev = fi + 1
    return states


def _sectors_from(guest: bytes, *allowed: bytes) -> bool:
    return all(any(a[p : p + 512] == guest[p : p + 512] for a in allowed if len(a) == len(guest))
               for p in range(0, len(guest), 512))


@pytest.mark.parametrize("what", ["shrink", "make_empty"])
def test_every_crash_point_of_shrink_and_make_empty(tmp_path, what):
    """A crash anywhere in a shrink under snapshots leaves the old image or the shrunk
    one (the size goes first); anywhere in make_empty, each sector is the overlay's or
    the backing image's.  No state has a corruption."""
    from test_qcow2 import _RecordingHost, _replay

    from vdisk.drivers.qcow2 import Qcow2Driver
    from vdisk.host import HostFile

    base = fresh(tmp_path, "base.qcow2", size=MiB, cluster_size=512)
    with vdisk.open(base) as img:
        img.write(0, b"\x0b" * MiB)
    p = str(tmp_path / "top.qcow2")
    vdisk.create(p, format="qcow2", cluster_size=512, backing_file=base, backing_format="qcow2")
    with vdisk.open(p) as img:
        img.write(0, os.urandom(300_000))
        img.snapshot_create("s")
        img.write(100_000, os.urandom(100_000))
        before = img.read(0, img.size)
        backing = img.backing.read(0, img.size)
    initial = _file_bytes(p)
    rec = _RecordingHost(HostFile(p))
    d = Qcow2Driver.open(rec, read_only=False)
    with vdisk.open(base, read_only=True) as b:
        d.attach_backing(b)
        if what == "shrink":
            d.resize(150_001)
            after = before[:150_001]
        else:
            d.make_empty()
            after = backing
        d.close()
    crash = str(tmp_path / "state.qcow2")
    for n, st_ops in enumerate(_crash_states(rec.log)):
        with open(crash, "wb") as f:
            f.write(_replay(initial, st_ops))
        with vdisk.open(crash, read_only=True) as img:
            res = img.check()
            assert res.corruptions == [], (n, res.corruptions[:5])
            guest = img.read(0, img.size)
            if what == "shrink":
                assert guest in (before, after), n
            else:
                assert _sectors_from(guest, before, after), n
            with vdisk.open(crash, read_only=True, snapshot="s") as snap:
                assert snap.size == MiB
