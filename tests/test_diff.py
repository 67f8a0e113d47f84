"""Incremental streams between snapshots (vdisk diff export / import, formats/diff.md)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from imagetools import flip_byte, run

import vdisk
from vdisk.codec import diff as codec
from vdisk.codec.diff import DiffStreamError
from vdisk.errors import UsageError, VdiskError
from vdisk.ops.compare import compare
from vdisk.ops.diff import (
    BaseMismatch,
    Interrupted,
    export_diff,
    import_diff,
    progress_path,
)

MiB = 1 << 20
SIZE = 8 * MiB


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def new(path, fmt="vdk", size=SIZE):
    vdisk.create(str(path), size, format=fmt)
    return str(path)


def write(path, writes, snap=None, zero=()):
    with vdisk.open(str(path)) as img:
        for off, data in writes:
            img.write(off, data)
        for off, n in zero:
            img.write_zeroes(off, n)
        if snap:
            img.snapshot_create(snap)


def read(spec, off=0, n=SIZE):
    path, snap = vdisk.block.split_image_spec(str(spec))
    with vdisk.open(path, read_only=True, snapshot=snap) as img:
        return img.read(off, n)


def same(a, b) -> bool:
    pa, sa = vdisk.block.split_image_spec(str(a))
    pb, sb = vdisk.block.split_image_spec(str(b))
    with vdisk.open(pa, read_only=True, snapshot=sa) as ia, vdisk.open(pb, read_only=True, snapshot=sb) as ib:
        return compare(ia, ib, strict=True).identical


def export(a, b, out, **kw):
    pb, sb = vdisk.block.split_image_spec(str(b))
    with vdisk.open(pb, read_only=True, snapshot=sb) as ib:
        if a is None:
            return export_diff(None, ib, str(out), **kw)
        pa, sa = vdisk.block.split_image_spec(str(a))
        with vdisk.open(pa, read_only=True, snapshot=sa) as ia:
            return export_diff(ia, ib, str(out), **kw)


def apply(stream, target, **kw):
    with vdisk.open(str(target)) as img:
        return import_diff(str(stream), img, image_name=str(target), **kw)


def history(path):
    """Snapshots A, B, C of ``path``: B rewrites, zeroes and adds; C changes one chunk."""
    write(path, [(0, pattern(2 * MiB, 1)), (5 * MiB, pattern(MiB, 2))], snap="A")
    write(path, [(MiB + 4096, pattern(4096, 3)), (7 * MiB, pattern(MiB, 4))], zero=[(5 * MiB, MiB)], snap="B")
    write(path, [(3 * MiB, pattern(65536, 5))], snap="C")


@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_snapshot_round_trip_rebuilds_b_from_a(tmp_path, fmt):
    img = new(tmp_path / f"src.{fmt}", fmt)
    history(img)
    s = export(None, f"{img}@A", tmp_path / "a.full")
    assert s.full and s.data_bytes > 0
    d = export(f"{img}@A", f"{img}@B", tmp_path / "ab.vdiff")
    # B changed the chunk at 1 MiB, zeroed the one at 5 MiB and added one at 7 MiB
    assert (d.data_records, d.zero_records) == (2, 1) and d.zero_bytes == MiB
    assert d.stream_size == os.path.getsize(tmp_path / "ab.vdiff")
    dst = new(tmp_path / f"dst.{fmt}", fmt)
    apply(tmp_path / "a.full", dst)
    assert same(dst, f"{img}@A")
    apply(tmp_path / "ab.vdiff", dst)
    assert same(dst, f"{img}@B")
    assert read(dst, 5 * MiB, MiB) == bytes(MiB)


def test_raw_files_round_trip(tmp_path):
    a = new(tmp_path / "a.raw", "raw")
    write(a, [(0, pattern(3 * MiB, 1))])
    b = str(tmp_path / "b.raw")
    shutil.copy(a, b)
    write(b, [(2 * MiB, pattern(MiB, 9))], zero=[(0, 4096)])
    dst = str(tmp_path / "dst.raw")
    shutil.copy(a, dst)
    export(a, b, tmp_path / "s")
    with vdisk.open(dst, format="raw") as img:
        import_diff(str(tmp_path / "s"), img, image_name=dst)
    assert same(dst, b)


def test_chain_a_b_c_applied_to_a_copy_of_a_equals_c(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(f"{img}@A", f"{img}@B", tmp_path / "ab")
    export(f"{img}@B", f"{img}@C", tmp_path / "bc")
    dst = new(tmp_path / "dst.vdk")
    export(None, f"{img}@A", tmp_path / "a")
    apply(tmp_path / "a", dst)
    apply(tmp_path / "ab", dst)
    assert not same(dst, f"{img}@C")
    apply(tmp_path / "bc", dst)
    assert same(dst, f"{img}@C")
    # C's stream holds only the chunk C changed
    with open(tmp_path / "bc", "rb") as f:
        assert os.fstat(f.fileno()).st_size < MiB + 4096


def test_pool_to_file_and_file_to_pool(tmp_path, pool):
    src = new(f"{pool}/src", "pool")
    history(src)
    export(None, f"{src}@A", tmp_path / "a")
    export(f"{src}@A", f"{src}@B", tmp_path / "ab")
    dst = new(tmp_path / "dst.vdk")
    apply(tmp_path / "a", dst)
    apply(tmp_path / "ab", dst)
    assert same(dst, f"{src}@B")
    # and back: a file's snapshots into a pool image
    f = new(tmp_path / "f.vdk")
    history(f)
    export(None, f"{f}@B", tmp_path / "fb")
    export(f"{f}@B", f"{f}@C", tmp_path / "fbc")
    pimg = new(f"{pool}/copy", "pool")
    apply(tmp_path / "fb", pimg)
    apply(tmp_path / "fbc", pimg)
    assert same(pimg, f"{f}@C")


def test_full_stream_sets_every_byte_of_a_dirty_target(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(None, f"{img}@B", tmp_path / "b")
    dst = new(tmp_path / "dst.vdk")
    write(dst, [(6 * MiB, pattern(2 * MiB, 8)), (4 * MiB, pattern(4096, 8))])
    apply(tmp_path / "b", dst)
    assert same(dst, f"{img}@B")


def test_images_of_different_sizes_are_refused(tmp_path):
    a, b = new(tmp_path / "a.vdk"), new(tmp_path / "b.vdk", size=SIZE * 2)
    with pytest.raises(UsageError, match="differ in size"):
        export(a, b, tmp_path / "s")
    assert not os.path.exists(tmp_path / "s.part")


def test_import_onto_an_image_of_another_size_is_refused(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(f"{img}@A", f"{img}@B", tmp_path / "s")
    dst = new(tmp_path / "dst.vdk", size=SIZE * 2)
    with pytest.raises(UsageError, match=r"is 16777216 bytes, but the stream .* 8388608-byte disk"):
        apply(tmp_path / "s", dst)


def test_import_onto_an_image_not_holding_the_base_writes_nothing_of_that_record(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(f"{img}@A", f"{img}@B", tmp_path / "s")
    dst = new(tmp_path / "dst.vdk")  # empty: not A
    with pytest.raises(BaseMismatch, match=r"does not hold the stream's base at record 0 \(offset 1048576"):
        apply(tmp_path / "s", dst)
    assert read(dst) == bytes(SIZE)


def _record_positions(stream):
    """(index, kind, offset, start of head) of each record."""
    out = []
    with open(stream, "rb") as f:
        f.seek(codec.HEADER_SIZE)
        i = 0
        while True:
            pos = f.tell()
            kind, _r, off, n, _bh, _cs = struct.unpack("<IIQQQQ", f.read(codec.RECORD_SIZE))
            out.append((i, kind, off, n, pos))
            if kind == codec.END:
                return out
            if kind == codec.DATA:
                f.seek(n, 1)
            i += 1


def _prepared(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(None, f"{img}@A", tmp_path / "a")
    export(f"{img}@A", f"{img}@B", tmp_path / "s")
    dst = new(tmp_path / "dst.vdk")
    apply(tmp_path / "a", dst)
    return img, dst, str(tmp_path / "s")


def test_a_flipped_payload_byte_refuses_that_record_and_keeps_its_range(tmp_path):
    img, dst, s = _prepared(tmp_path)
    recs = _record_positions(s)
    i, _kind, off, n, pos = next(r for r in recs if r[1] == codec.DATA and r[0] > 0)
    flip_byte(s, pos + codec.RECORD_SIZE + 100)
    with pytest.raises(DiffStreamError, match=rf"record {i} \(offset {off}\): checksum mismatch"):
        apply(s, dst)
    assert read(dst, off, n) == read(f"{img}@A", off, n)
    # the records before it were applied, and recorded for --resume
    assert os.path.exists(progress_path(s))


@pytest.mark.parametrize("where", ["header", "record head", "end"])
def test_flipped_bytes_in_metadata_are_refused(tmp_path, where):
    img, dst, s = _prepared(tmp_path)
    recs = _record_positions(s)
    at = {"header": 20, "record head": recs[0][4] + 12, "end": recs[-1][4] + 24}[where]
    flip_byte(s, at)
    with pytest.raises(DiffStreamError):
        apply(s, dst)
    if where != "end":
        assert same(dst, f"{img}@A")


def test_truncated_streams_are_refused_naming_the_record(tmp_path):
    _img, dst, s = _prepared(tmp_path)
    full = Path(s).read_bytes()
    recs = _record_positions(s)
    last_data = [r for r in recs if r[1] == codec.DATA][-1]
    cut = last_data[4] + codec.RECORD_SIZE + 10  # inside its payload
    t = str(tmp_path / "t")
    for n, msg in [(0, "no header"), (30, "truncated header"),
                   (cut, rf"truncated in record {last_data[0]} \(offset {last_data[2]}\): 10 of"),
                   (len(full) - 1, "truncated at record 3"), (recs[-1][4], "no END record")]:
        with open(t, "wb") as f:
            f.write(full[:n])
        with pytest.raises(DiffStreamError, match=msg):
            apply(t, dst)
        if os.path.exists(progress_path(t)):
            os.unlink(progress_path(t))


def test_a_foreign_file_and_a_bad_version_are_refused(tmp_path):
    dst = new(tmp_path / "dst.vdk")
    foreign = tmp_path / "f"
    foreign.write_bytes(b"QFI\xfb" + bytes(200))
    with pytest.raises(DiffStreamError, match="not a vdisk diff stream"):
        apply(foreign, dst)
    body = bytearray(codec.encode_header(codec.Header(size=SIZE, full=True)))
    body[8:12] = struct.pack("<I", 2)
    body[56:64] = struct.pack("<Q", codec.xxh64(bytes(body[:56])))
    (tmp_path / "v").write_bytes(bytes(body))
    with pytest.raises(DiffStreamError, match="version 2 is not supported"):
        apply(tmp_path / "v", dst)


def test_a_huge_length_is_refused_before_reading_it(tmp_path):
    big = 1 << 40
    dst = new(tmp_path / "dst.vdk", "raw", size=big)  # sparse
    # a record head claiming a 512 GiB payload (its checksum is valid for the head alone)
    head32 = struct.pack("<IIQQQ", codec.DATA, 0, 0, 1 << 39, 0)
    cs = codec.record_checksum(0, head32)
    (tmp_path / "s").write_bytes(codec.encode_header(codec.Header(size=big, full=True)) + head32
                                 + struct.pack("<Q", cs))
    with vdisk.open(dst, format="raw") as img, pytest.raises(DiffStreamError, match="exceeds the limit"):
        import_diff(str(tmp_path / "s"), img, image_name=dst)


def test_reordered_records_are_refused(tmp_path):
    img, dst, s = _prepared(tmp_path)
    recs = _record_positions(s)
    data = Path(s).read_bytes()
    r0 = data[recs[0][4]:recs[1][4]]
    r1 = data[recs[1][4]:recs[2][4]]
    (tmp_path / "r").write_bytes(data[:recs[0][4]] + r1 + r0 + data[recs[2][4]:])
    with pytest.raises(DiffStreamError, match="record 0"):
        apply(tmp_path / "r", dst)
    assert same(dst, f"{img}@A")


def test_interrupted_export_resumes_to_the_same_stream(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    export(None, f"{img}@B", tmp_path / "whole")
    expect = Path(tmp_path / "whole").read_bytes()
    out = tmp_path / "s"
    with pytest.raises(Interrupted):
        export(None, f"{img}@B", out, stop_after=3)
    assert not out.exists() and os.path.exists(f"{out}.part")
    with pytest.raises(UsageError, match="give --resume"):
        export(None, f"{img}@B", out)
    # a torn last record, as a power cut leaves it
    with open(f"{out}.part", "r+b") as f:
        f.truncate(os.path.getsize(f"{out}.part") - 5)
    s = export(None, f"{img}@B", out, resume=True)
    assert s.resumed_records == 2
    assert Path(out).read_bytes() == expect
    assert not os.path.exists(f"{out}.part")


def test_resume_of_an_export_for_other_images_is_refused(tmp_path):
    img = new(tmp_path / "src.vdk")
    history(img)
    out = tmp_path / "s"
    with pytest.raises(Interrupted):
        export(f"{img}@A", f"{img}@B", out, stop_after=1)
    with pytest.raises(UsageError, match="header differs"):
        export(None, f"{img}@B", out, resume=True)
    # the same kind of stream, but B is no longer what the first record was made from
    write(img, [(MiB, pattern(MiB, 6))], snap="B2")
    with pytest.raises(UsageError, match="no longer matches"):
        export(f"{img}@A", f"{img}@B2", out, resume=True)
    s = export(f"{img}@A", f"{img}@B", out, resume=True)
    assert s.resumed_records == 1 and s.records == 3


def test_interrupted_import_resumes(tmp_path):
    img, dst, s = _prepared(tmp_path)
    with pytest.raises(Interrupted):
        apply(s, dst, checkpoint_every=1, stop_after=2)
    # the second record was applied after the last checkpoint: applied again on resume
    with open(progress_path(s)) as f:
        assert '"records": 1' in f.read()
    with pytest.raises(UsageError, match="give --resume"):
        apply(s, dst)
    r = apply(s, dst, resume=True)
    assert r.resumed_records == 1
    assert same(dst, f"{img}@B")
    assert not os.path.exists(progress_path(s))
    with pytest.raises(UsageError, match="no interrupted import"):
        apply(s, dst, resume=True)


def test_an_import_stopped_by_a_truncated_stream_resumes_with_the_whole_stream(tmp_path):
    img, dst, s = _prepared(tmp_path)
    whole = Path(s).read_bytes()
    last = _record_positions(s)[-2]
    Path(s).write_bytes(whole[:last[4] + 50])  # the last DATA record is cut
    with pytest.raises(DiffStreamError, match="truncated in record"):
        apply(s, dst)
    assert '"records": 2' in Path(progress_path(s)).read_text()
    Path(s).write_bytes(whole)
    assert apply(s, dst, resume=True).resumed_records == 2
    assert same(dst, f"{img}@B")


def test_resume_with_another_stream_of_the_same_header_is_refused(tmp_path):
    img, dst, s = _prepared(tmp_path)
    with pytest.raises(Interrupted):
        apply(s, dst, checkpoint_every=1, stop_after=3)  # checkpointed after 2
    # the stream from A to C has the same header, the same record 0, another record 1
    os.unlink(s)
    export(f"{img}@A", f"{img}@C", s)
    with pytest.raises(UsageError, match="another stream"):
        apply(s, dst, resume=True)


def test_resume_into_another_image_is_refused(tmp_path):
    _img, dst, s = _prepared(tmp_path)
    with pytest.raises(Interrupted):
        apply(s, dst, checkpoint_every=1, stop_after=2)
    other = str(tmp_path / "other.vdk")
    shutil.copy(dst, other)
    with pytest.raises(UsageError, match="another image"):
        apply(s, other, resume=True)


def test_cli_export_import_json_and_one_line_errors(tmp_path):
    import json

    img = new(tmp_path / "src.vdk")
    history(img)
    r = run("diff", "export", f"{img}@A", tmp_path / "a", "--output", "json")
    assert json.loads(r.stdout)["full"] is True
    r = run("diff", "export", f"{img}@A", f"{img}@B", tmp_path / "ab", "--output", "json")
    j = json.loads(r.stdout)
    assert (j["records"], j["data_bytes"], j["zero_bytes"]) == (3, 2 * MiB, MiB)
    assert j["stream_size"] == os.path.getsize(tmp_path / "ab")
    dst = new(tmp_path / "dst.vdk")
    run("diff", "import", tmp_path / "a", dst, "-q")
    r = run("diff", "import", tmp_path / "ab", dst)
    assert "3 records" in r.stdout
    assert same(dst, f"{img}@B")
    # errors: one line, no traceback
    # applying it again is harmless (every range already holds its result) ...
    run("diff", "import", tmp_path / "ab", dst, "-q")
    assert same(dst, f"{img}@B")
    # ... but an image holding neither A nor B is refused
    r = run("diff", "import", tmp_path / "ab", new(tmp_path / "empty.vdk"), code=1)
    assert r.stderr.count("\n") == 1 and "does not hold the stream's base at record 0" in r.stderr
    flip_byte(tmp_path / "ab", 70)
    r = run("diff", "import", tmp_path / "ab", dst, code=2)
    assert r.stderr.count("\n") == 1 and "record 0" in r.stderr
    r = run("diff", "import", tmp_path / "missing", dst, code=1)
    assert "no such file" in r.stderr and r.stderr.count("\n") == 1
    r = run("diff", "export", f"{img}@A", f"{img}@B", tmp_path / "ab", code=1)
    assert "already exists" in r.stderr
    r = run("diff", "export", img, img, img, tmp_path / "x", code=1)
    assert "at most two images" in r.stderr
    r = run("diff", "import", "--resume", tmp_path / "a", dst, code=1)
    assert "no interrupted import" in r.stderr


def test_header_and_record_layout_match_the_spec():
    h = codec.encode_header(codec.Header(size=SIZE, full=False, chunk=MiB))
    assert len(h) == 64 and h[:8] == b"VDKDIFF\n"
    assert struct.unpack_from("<IIQQ", h, 8) == (1, 0, SIZE, MiB)
    assert h[32:56] == bytes(24)
    assert struct.unpack_from("<Q", h, 56)[0] == codec.xxh64(h[:56])
    rec, cs = codec.encode_record(5, codec.DATA, 4096, 3, 0xABC, b"xyz")
    assert struct.unpack_from("<IIQQQQ", rec) == (1, 0, 4096, 3, 0xABC, cs)
    assert rec[40:] == b"xyz"
    import xxhash

    assert cs == xxhash.xxh3_64_intdigest(rec[:32] + b"xyz", 5)
    with pytest.raises(DiffStreamError, match="unknown header flags"):
        bad = bytearray(h)
        bad[12] = 2
        bad[56:] = struct.pack("<Q", codec.xxh64(bytes(bad[:56])))
        codec.decode_header(bytes(bad))
    assert isinstance(DiffStreamError("x"), VdiskError)


def _spec_table(title: str) -> list[tuple[int, int, str]]:
    text = (Path(__file__).parent.parent / "formats" / "diff.md").read_text()
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows.append((int(cells[0]), int(cells[1]), cells[2]))
    return rows


def test_formats_diff_md_tables_match_the_codec():
    header = _spec_table("Header (64 bytes")
    record = _spec_table("Record head (40 bytes)")
    for rows, total in ((header, codec.HEADER_SIZE), (record, codec.RECORD_SIZE)):
        pos = 0
        for off, size, _name in rows:
            assert off == pos
            pos += size
        assert pos == total
    h = codec.encode_header(codec.Header(size=12345, full=True, chunk=4096))
    fields = {name: h[off:off + size] for off, size, name in header}
    assert fields["magic"] == codec.MAGIC
    assert int.from_bytes(fields["version"], "little") == 1
    assert int.from_bytes(fields["flags"], "little") == codec.FLAG_FULL
    assert int.from_bytes(fields["size"], "little") == 12345
    assert int.from_bytes(fields["chunk"], "little") == 4096
    assert int.from_bytes(fields["checksum"], "little") == codec.xxh64(h[:56])
    rec, cs = codec.encode_record(2, codec.ZERO, 512, 1024, 77)
    f = {name: int.from_bytes(rec[off:off + size], "little") for off, size, name in record}
    assert (f["type"], f["offset"], f["length"], f["base_hash"], f["checksum"]) == (codec.ZERO, 512, 1024, 77, cs)


def test_a_killed_cli_export_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    img = new(tmp_path / "src.raw", "raw", size=64 * MiB)
    with open(img, "r+b") as f:
        f.write(os.urandom(64 * MiB))
    out = tmp_path / "s"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "diff", "export", img, str(out), "-q"], env=env)
    part = f"{out}.part"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(part) and os.path.getsize(part) > 3 * MiB:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(60)
    if proc.returncode == 0:  # finished before it could be killed: nothing to resume
        pytest.skip("the export finished before it was killed")
    assert os.path.exists(part) and not out.exists()
    run("diff", "export", "--resume", img, out, "-q")
    dst = new(tmp_path / "dst.raw", "raw", size=64 * MiB)
    with vdisk.open(dst, format="raw") as d:
        import_diff(str(out), d, image_name=dst)
    assert Path(dst).read_bytes() == Path(img).read_bytes()


def test_every_flipped_byte_is_refused_with_a_named_error(tmp_path):
    import random

    img, dst, s = _prepared(tmp_path)
    whole = Path(s).read_bytes()
    recs = _record_positions(s)
    spots = list(range(codec.HEADER_SIZE)) + [r[4] + k for r in recs for k in range(codec.RECORD_SIZE)]
    rnd = random.Random(7)
    spots += [rnd.randrange(len(whole)) for _ in range(20)]
    pristine = str(tmp_path / "pristine.vdk")
    shutil.copy(dst, pristine)
    bad = tmp_path / "bad"
    for at in spots:
        data = bytearray(whole)
        data[at] ^= 1 << rnd.randrange(8)
        bad.write_bytes(bytes(data))
        with pytest.raises(VdiskError):
            apply(bad, dst)
        if os.path.exists(progress_path(bad)):
            os.unlink(progress_path(bad))
            shutil.copy(pristine, dst)
