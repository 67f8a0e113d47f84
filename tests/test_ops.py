"""Image operations (vdisk.ops) through the Python API: compare, convert, map, info."""

from __future__ import annotations

import os
import threading
import time

import pytest

import vdisk
from imagetools import allocated, make_raw, read_all
from vdisk.errors import ImageLocked, UsageError, VdiskError
from vdisk.ops import compare, convert, copy_content, image_info, map_extents
from vdisk.ops.compare import chunks, first_difference, first_nonzero, is_zero, overlay_runs
from vdisk.ops.copier import _widen

MiB = 1 << 20




# ---------------------------------------------------------------------------- helpers
def test_byte_helpers():
    assert is_zero(bytes(5000)) and is_zero(b"")
    assert not is_zero(bytes(4999) + b"\1")
    assert first_nonzero(bytes(100)) == 100
    assert first_nonzero(bytes(70000) + b"x") == 70000
    a = os.urandom(300_000)
    for i in (0, 1, 7, 65535, 65536, 65537, 299_999):
        b = bytearray(a)
        b[i] ^= 0x40
        assert first_difference(a, bytes(b)) == i
    assert first_difference(a, a) == len(a)
    assert first_difference(b"abc", b"abcdef") == 3


def test_chunks_are_aligned_and_cover_the_range():
    got = list(chunks(100, 10_000, 4096))
    assert got == [(100, 3996), (4096, 4096), (8192, 1808)]
    assert list(chunks(5, 5, 4096)) == []


def test_overlay_runs_splits_at_every_boundary():
    a = [(0, 10, False), (10, 30, True), (30, 40, False)]
    b = [(0, 20, True), (20, 40, False)]
    assert list(overlay_runs(a, b)) == [
        (0, 10, False, True),
        (10, 20, True, True),
        (20, 30, True, False),
        (30, 40, False, False),
    ]


def test_widen_rounds_data_runs_to_destination_clusters():
    runs = [(0, 4096, False), (4096, 8192, True), (8192, 12288, False), (12288, 16384, True),
            (16384, 200_000, False), (200_000, 200_100, True), (200_100, 200_200, False)]
    assert _widen(runs, 65536, 200_200) == [(0, 65536, True), (65536, 196608, False), (196608, 200_200, True)]
    assert _widen(runs, 4096, 200_200) == [
        (0, 4096, False), (4096, 8192, True), (8192, 12288, False), (12288, 16384, True),
        (16384, 196608, False), (196608, 200_200, True)]
    assert _widen([(0, 100, False)], 4096, 100) == [(0, 100, False)]


# ---------------------------------------------------------------------------- compare
def test_compare_identical_and_first_difference(image_dir):
    data = os.urandom(10_000)
    a = make_raw(image_dir / "a.raw", 8 * MiB, [(3 * MiB + 5, data)])
    b = make_raw(image_dir / "b.raw", 8 * MiB, [(3 * MiB + 5, data)])
    changed = bytearray(data)
    changed[1234] ^= 1
    c = make_raw(image_dir / "c.raw", 8 * MiB, [(3 * MiB + 5, bytes(changed))])
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(b, format="raw", read_only=True) as ib:
        res = compare(ia, ib)
        assert res.identical and res.mismatch_offset is None
        # only the data ranges were read, not the 8 MiB
        assert 0 < res.bytes_read <= 2 * 64 * 1024
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(c, format="raw", read_only=True) as ic:
        res = compare(ia, ic)
        assert not res.identical
        assert res.mismatch_offset == 3 * MiB + 5 + 1234


def test_compare_written_zeros_equal_a_hole(image_dir):
    a = make_raw(image_dir / "a.raw", 4 * MiB, [(MiB, bytes(8192))])  # data extent that holds zeros
    b = make_raw(image_dir / "b.raw", 4 * MiB)
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(b, format="raw", read_only=True) as ib:
        assert compare(ia, ib).identical
        assert compare(ib, ia).identical


def test_compare_data_against_hole_reports_first_nonzero_byte(image_dir):
    a = make_raw(image_dir / "a.raw", 4 * MiB, [(MiB, bytes(100) + b"\xff")])
    b = make_raw(image_dir / "b.raw", 4 * MiB)
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(b, format="raw", read_only=True) as ib:
        assert compare(ib, ia).mismatch_offset == MiB + 100


def test_compare_different_sizes(image_dir):
    small = make_raw(image_dir / "small.raw", 2 * MiB, [(0, b"same")])
    zero_tail = make_raw(image_dir / "zt.raw", 5 * MiB, [(0, b"same")])
    data_tail = make_raw(image_dir / "dt.raw", 5 * MiB, [(0, b"same"), (4 * MiB + 7, b"!")])
    with vdisk.open(small, format="raw", read_only=True) as s, vdisk.open(zero_tail, format="raw", read_only=True) as z:
        res = compare(s, z)
        assert res.identical and res.size_mismatch
        strict = compare(s, z, strict=True)
        assert not strict.identical
    with vdisk.open(small, format="raw", read_only=True) as s, vdisk.open(data_tail, format="raw", read_only=True) as d:
        res = compare(d, s)
        assert not res.identical and res.mismatch_offset == 4 * MiB + 7


# ---------------------------------------------------------------------------- convert
def test_convert_raw_to_raw_is_equal_and_sparse(image_dir):
    chunk = os.urandom(200_000)
    src = make_raw(image_dir / "src.raw", 64 * MiB, [(0, b"boot"), (17 * MiB + 3, chunk), (64 * MiB - 4, b"tail")])
    dst = str(image_dir / "dst.raw")
    with vdisk.open(src, format="raw", read_only=True) as img:
        stats = convert(img, dst, format="raw")
    assert read_all(dst, "raw") == read_all(src, "raw")
    assert os.path.getsize(dst) == 64 * MiB
    # only the data extents were read and written; the destination stays sparse
    assert stats.bytes_read < 2 * MiB
    assert stats.bytes_skipped > 60 * MiB
    assert allocated(dst) < 2 * MiB
    assert not [n for n in os.listdir(image_dir) if "vdisk-convert" in n]


def test_convert_leaves_zero_clusters_inside_data_unwritten(image_dir):
    # One 4 MiB data extent (written explicitly) that is mostly zeros.
    payload = bytearray(4 * MiB)
    payload[0:10] = b"0123456789"
    payload[3 * MiB : 3 * MiB + 5] = b"later"
    src = make_raw(image_dir / "src.raw", 8 * MiB, [(0, bytes(payload))])
    assert allocated(src) >= 4 * MiB
    dst = str(image_dir / "dst.raw")
    with vdisk.open(src, format="raw", read_only=True) as img:
        stats = convert(img, dst)
    assert stats.bytes_read == 4 * MiB
    assert stats.bytes_written <= 2 * 4096
    assert allocated(dst) <= 64 * 1024
    assert read_all(dst, "raw") == read_all(src, "raw")


def test_convert_replaces_existing_destination_and_refuses_same_file(image_dir):
    src = make_raw(image_dir / "src.raw", MiB, [(0, b"new content")])
    dst = make_raw(image_dir / "dst.raw", 3 * MiB, [(0, b"old content")])
    with vdisk.open(src, format="raw", read_only=True) as img:
        convert(img, dst)
        with pytest.raises(UsageError, match="same file"):
            convert(img, src)
    assert read_all(dst, "raw")[:11] == b"new content"
    assert os.path.getsize(dst) == MiB


def test_convert_refuses_a_destination_in_use(image_dir):
    src = make_raw(image_dir / "src.raw", MiB, [(0, b"x")])
    dst = make_raw(image_dir / "dst.raw", MiB, [(0, b"keep me")])
    with vdisk.open(dst, format="raw") as busy, vdisk.open(src, format="raw", read_only=True) as img:
        with pytest.raises(ImageLocked):
            convert(img, dst)
        assert busy.read(0, 7) == b"keep me"


def test_failed_convert_keeps_destination_and_leaves_no_temp_file(image_dir):
    src = make_raw(image_dir / "src.raw", MiB, [(0, b"x")])
    dst = make_raw(image_dir / "dst.raw", MiB, [(0, b"keep me")])
    with vdisk.open(src, format="raw", read_only=True) as img:
        with pytest.raises(VdiskError):
            convert(img, dst, format="raw", compression="zstd")  # raw cannot compress
    assert read_all(dst, "raw")[:7] == b"keep me"
    assert sorted(os.listdir(image_dir)) == ["dst.raw", "src.raw"]


def test_convert_reports_progress_over_the_whole_disk(image_dir):
    src = make_raw(image_dir / "src.raw", 9 * MiB + 512, [(5 * MiB, b"x" * 5000)])
    done = []
    with vdisk.open(src, format="raw", read_only=True) as img:
        convert(img, str(image_dir / "dst.raw"), progress=done.append)
    assert sum(done) == 9 * MiB + 512


def _data_source(image_dir, mib: int) -> tuple[str, bytes]:
    data = os.urandom(mib * MiB)
    return make_raw(image_dir / "src.raw", mib * MiB, [(0, data)]), data


def test_copy_content_writes_behind_the_reads_in_order_from_one_thread(image_dir):
    src, data = _data_source(image_dir, 12)
    dst = str(image_dir / "dst.vdk")
    vdisk.create(dst, 12 * MiB)
    writers, offsets = set(), []
    with vdisk.open(src, format="raw", read_only=True) as s, vdisk.open(dst) as d:
        real = d.write

        real_prepare = d.prepare_write
        preparers, prepared = set(), []

        def write(off, buf, ready=None):
            writers.add(threading.current_thread().name)
            offsets.append(off)
            prepared.append(ready is not None)
            return real(off, buf, ready)

        def prepare_write(off, buf):
            preparers.add(threading.current_thread().name)
            return real_prepare(off, buf)

        d.write, d.prepare_write = write, prepare_write
        done = []
        copy_content(s, d, write_behind=2, chunk_size=MiB, progress=done.append)
        d.flush()
    assert len(writers) == 1 and next(iter(writers)).startswith("vdisk-convert-write"), writers
    # vdk's checksums were prepared in the reading thread, for every write
    assert preparers == {threading.current_thread().name} and all(prepared), (preparers, prepared)
    assert offsets == sorted(offsets) and len(offsets) >= 12
    assert sum(done) == 12 * MiB
    assert read_all(dst, "vdk") == data
    with vdisk.open(dst, read_only=True) as img:
        assert img.check().exit_code == 0


def test_prepared_vdk_writes_are_bound_to_their_bytes_and_offset(image_dir):
    """``prepare_write``'s checksums are used only for the very bytes object and
    offset they were made for; anything else is checksummed by the write itself."""
    cs = 64 << 10
    path = str(image_dir / "p.vdk")
    vdisk.create(path, 8 * MiB)
    a = os.urandom(cs) + bytes(cs) + os.urandom(2 * cs)  # a zero cluster inside
    b = os.urandom(len(a))
    with vdisk.open(path) as img:
        ready = img.prepare_write(cs, a)
        assert ready is not None
        img.write(cs, a, ready)  # used: the bytes and offset it was made for
        img.write(8 * cs, b, ready)  # other bytes, other offset: ignored
        img.write(16 * cs, bytes(b), img.prepare_write(16 * cs, a))  # other bytes, same offset
        img.write(24 * cs + 512, a, img.prepare_write(24 * cs, a))  # same bytes, other offset
        img.flush()
    with vdisk.open(path, read_only=True) as img:
        assert img.read(cs, len(a)) == a
        assert img.read(8 * cs, len(b)) == b
        assert img.read(16 * cs, len(b)) == b
        assert img.read(24 * cs + 512, len(a)) == a
        result = img.check()
        assert result.exit_code == 0, result
        # the prepared zero cluster became no data at all
        assert all(e.status.name != "DATA" for e in img.block_status(2 * cs, cs)), img.block_status(2 * cs, cs)
        assert any(e.status.name == "DATA" for e in img.block_status(cs, cs))
    raw = make_raw(image_dir / "r.raw", MiB, [])
    with vdisk.open(raw, format="raw") as img:
        assert img.prepare_write(0, a) is None  # raw has nothing to prepare
    comp = str(image_dir / "c.vdk")
    vdisk.create(comp, MiB, compression="zstd")
    with vdisk.open(comp) as img:
        assert img.prepare_write(0, a) is None  # checksums follow the compression


def test_a_failed_write_behind_stops_the_copy_and_raises_it(image_dir):
    from vdisk.errors import HostIOError

    src, _data = _data_source(image_dir, 16)
    dst = str(image_dir / "dst.raw")
    vdisk.create(dst, 16 * MiB, format="raw")
    calls = []
    with vdisk.open(src, format="raw", read_only=True) as s, vdisk.open(dst, format="raw") as d:
        def write(off, buf, ready=None):
            calls.append(off)
            if len(calls) == 3:
                raise HostIOError(f"{dst}: write failed: No space left on device")
            time.sleep(0.01)  # the reads run ahead meanwhile: pieces are queued when it fails

        d.write = write
        with pytest.raises(HostIOError, match="No space left"):
            copy_content(s, d, write_behind=2, chunk_size=MiB)
    assert len(calls) == 3, calls  # nothing queued after the failed piece was written


def test_convert_that_fails_in_its_writer_thread_leaves_no_file(image_dir, monkeypatch):
    from vdisk.drivers.raw import RawDriver
    from vdisk.errors import HostIOError

    src, _data = _data_source(image_dir, 8)
    real = RawDriver.write
    seen = []

    def failing(self, off, buf):
        seen.append(threading.current_thread().name)
        if len(seen) == 2:
            raise HostIOError("write failed: Input/output error")
        return real(self, off, buf)

    monkeypatch.setattr(RawDriver, "write", failing)
    with vdisk.open(src, format="raw", read_only=True) as img:
        with pytest.raises(HostIOError, match="Input/output error"):
            convert(img, str(image_dir / "dst.raw"), format="raw", chunk_size=MiB)
    assert seen[-1].startswith("vdisk-convert-write")
    assert sorted(os.listdir(image_dir)) == ["src.raw"]


def test_copy_content_refuses_a_smaller_destination(image_dir):
    src = make_raw(image_dir / "src.raw", 2 * MiB)
    dst = make_raw(image_dir / "dst.raw", MiB)
    with vdisk.open(src, format="raw", read_only=True) as s, vdisk.open(dst, format="raw") as d:
        with pytest.raises(UsageError, match="smaller"):
            copy_content(s, d)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_convert_raw_vdk_raw_round_trip(image_dir, compression):
    blob = os.urandom(300_000)
    text = b"compressible " * 20_000
    src = make_raw(image_dir / "src.raw", 48 * MiB, [(MiB + 3, blob), (20 * MiB, text), (48 * MiB - 5, b"last!")])
    mid = str(image_dir / "mid.vdk")
    back = str(image_dir / "back.raw")
    with vdisk.open(src, format="raw", read_only=True) as img:
        convert(img, mid, format="vdk", compression=compression)
    with vdisk.open(mid, format="vdk", read_only=True) as img:
        assert img.size == 48 * MiB
        assert image_info(img)["format"] == "vdk"
        with vdisk.open(src, format="raw", read_only=True) as s:
            assert compare(s, img).identical
        convert(img, back, format="raw")
    assert read_all(back, "raw") == read_all(src, "raw")
    # the vdk copy is small: only data clusters were written
    assert allocated(mid) < 6 * MiB
    assert allocated(back) < 4 * MiB


# ---------------------------------------------------------------------------- map / info
def test_map_extents_cover_the_disk_and_name_data(image_dir):
    src = make_raw(image_dir / "m.raw", 4 * MiB, [(MiB, b"d" * 4096)])
    with vdisk.open(src, format="raw", read_only=True) as img:
        ext = map_extents(img)
        assert ext[0]["start"] == 0
        assert all(a["start"] + a["length"] == b["start"] for a, b in zip(ext, ext[1:]))
        assert ext[-1]["start"] + ext[-1]["length"] == 4 * MiB
        data = [e for e in ext if e["data"]]
        assert [(e["start"], e["length"], e["offset"], e["zero"]) for e in data] == [(MiB, 4096, MiB, False)]
        assert all(e["zero"] and not e["data"] and e["offset"] is None for e in ext if e not in data)
        part = map_extents(img, MiB - 10, 20)
        assert [(e["start"], e["length"], e["data"]) for e in part] == [(MiB - 10, 10, False), (MiB, 10, True)]


def test_image_info_has_the_documented_keys(image_dir):
    from vdisk.ops.mapping import INFO_KEYS

    src = make_raw(image_dir / "i.raw", 3 * MiB)
    with vdisk.open(src, format="raw", read_only=True) as img:
        info = image_info(img)
    assert tuple(info)[: len(INFO_KEYS)] == INFO_KEYS
    assert info["virtual_size"] == 3 * MiB and info["format"] == "raw"
    assert info["snapshots"] == [] and info["backing_filename"] is None and info["compression"] is None


def test_convert_and_compare_flatten_a_backing_chain(image_dir):
    base = make_raw(image_dir / "base.raw", 8 * MiB, [(0, b"B" * 100_000), (6 * MiB, b"base tail")])
    top = str(image_dir / "top.vdk")
    vdisk.create(top, format="vdk", backing_file=base, backing_format="raw")
    with vdisk.open(top) as img:
        img.write(50_000, b"T" * 70_000)
        img.flush()
    expected = bytearray(read_all(base, "raw"))
    expected[50_000:120_000] = b"T" * 70_000
    flat = str(image_dir / "flat.raw")
    with vdisk.open(top, read_only=True, format="vdk") as img:
        assert img.read(0, img.size) == bytes(expected)
        depths = {e["depth"] for e in map_extents(img) if e["data"]}
        assert depths == {0, 1}
        convert(img, flat)
        with vdisk.open(flat, format="raw", read_only=True) as f:
            assert compare(img, f).identical
    assert read_all(flat, "raw") == bytes(expected)


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
def test_compare_and_copy_with_and_without_reader_threads(image_dir, read_ahead):
    blob = os.urandom(3 * MiB)
    a = make_raw(image_dir / "a.raw", 8 * MiB, [(MiB, blob)])
    changed = bytearray(blob)
    changed[100_000] ^= 1  # early in the data: later chunks are still queued when it is found
    b = make_raw(image_dir / "b.raw", 8 * MiB, [(MiB, bytes(changed))])
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(b, format="raw", read_only=True) as ib:
        res = compare(ia, ib, chunk_size=65536, read_ahead=read_ahead)
        assert res.mismatch_offset == MiB + 100_000
        assert res.bytes_read < 2 * MiB  # stopped early instead of reading everything
        assert compare(ia, ia, chunk_size=65536, read_ahead=read_ahead).identical
    dst = make_raw(image_dir / "c.raw", 8 * MiB)
    with vdisk.open(a, format="raw", read_only=True) as ia, vdisk.open(dst, format="raw") as d:
        stats = copy_content(ia, d, chunk_size=65536, read_ahead=read_ahead)
        assert stats.bytes_read == 3 * MiB and stats.bytes_written == 3 * MiB
    assert read_all(dst, "raw") == read_all(a, "raw")


def test_a_durable_convert_starts_write_back_as_it_goes(image_dir, monkeypatch):
    """``convert -t writeback`` (durable) asks the destination to start writing back
    every WRITEBACK_EVERY bytes it wrote; the default (-t unsafe) never does."""
    from vdisk.block import Image
    from vdisk.ops import convert as convert_fn
    import importlib

    cv = importlib.import_module("vdisk.ops.convert")
    monkeypatch.setattr(cv, "WRITEBACK_EVERY", 2 * MiB)
    src, data = _data_source(image_dir, 12)
    calls = []
    real = Image.start_writeback

    def counting(self):
        calls.append(self.filename)
        return real(self)

    monkeypatch.setattr(Image, "start_writeback", counting)
    with vdisk.open(src, format="raw", read_only=True) as s:
        convert_fn(s, str(image_dir / "durable.vdk"), format="vdk", durable=True, chunk_size=MiB)
        assert len(calls) >= 4, calls  # 12 MiB written, every 2 MiB
        del calls[:]
        convert_fn(s, str(image_dir / "unsafe.vdk"), format="vdk", durable=False, chunk_size=MiB)
        assert calls == []
    assert read_all(str(image_dir / "durable.vdk"), "vdk") == data
    assert read_all(str(image_dir / "unsafe.vdk"), "vdk") == data


def test_host_start_writeback_asks_the_kernel_only_for_a_synced_file(tmp_path, monkeypatch):
    from vdisk import host as H

    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(MiB)
    synced, unsafe = H.HostFile(path), H.HostFile(path, sync=False, lock=None)
    try:
        synced.pwrite(0, os.urandom(MiB))
        synced.start_writeback()  # the real call, on a real file: no error, no wait
        seen = []

        class Libc:
            def sync_file_range(self, *args):
                seen.append(args)
                return 0

        monkeypatch.setattr(H, "libc", Libc)  # what the lazy loader would give
        synced.start_writeback()
        unsafe.start_writeback()
        assert seen == [(synced.fd, 0, 0, 2)]  # SYNC_FILE_RANGE_WRITE over the whole file
    finally:
        unsafe.close()
        synced.close()


def test_prepared_writes_into_never_written_entries_keep_zeros_over_a_backing_file(image_dir):
    """vdk's prepared writes into never-written L2 entries and into entries written
    before: in an overlay, a zero cluster of the data must hide the backing file's
    bytes, a data cluster replaces them, and what was written before is replaced,
    not leaked (check is clean)."""
    cs = 64 << 10
    base = make_raw(image_dir / "base.raw", 4 * MiB, [])
    with open(base, "r+b") as f:
        f.write(b"\xaa" * (4 * MiB))
    top = str(image_dir / "top.vdk")
    vdisk.create(top, format="vdk", backing_file=base, backing_format="raw")
    a = os.urandom(cs) + bytes(cs) + os.urandom(cs) + bytes(2 * cs) + os.urandom(3 * cs)
    b = bytes(cs) + os.urandom(2 * cs) + bytes(cs) + os.urandom(4 * cs)
    with vdisk.open(top) as img:
        img.write(0, a, img.prepare_write(0, a))  # entries never written
        img.write(16 * cs, a[:4 * cs], img.prepare_write(16 * cs, a[:4 * cs]))
        img.flush()
        img.write(16 * cs, b, img.prepare_write(16 * cs, b))  # half of them written before
        img.flush()
    with vdisk.open(top, read_only=True) as img:
        assert img.read(0, len(a)) == a  # zeros, not the base's 0xaa
        assert img.read(16 * cs, len(b)) == b
        assert img.read(8 * cs, 8 * cs) == b"\xaa" * (8 * cs)  # untouched: still the base
        result = img.check()
        assert result.exit_code == 0, result
    without = str(image_dir / "plain.vdk")
    vdisk.create(without, 4 * MiB)
    with vdisk.open(without) as img:
        img.write(0, a, img.prepare_write(0, a))
        img.flush()
        assert img.read(0, len(a)) == a
        # a plain image's zero clusters stay unallocated: only the 5 data clusters are stored
        data = [e for e in img.block_status(0, len(a)) if e.status.name == "DATA"]
        assert sum(e.length for e in data) == 5 * cs, img.block_status(0, len(a))
