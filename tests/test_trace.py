"""Request traces (formats/trace.md): the line codec and the recorder, without a mount
(tests/test_guest.py records a real boot through one)."""

from __future__ import annotations

import errno
import os

import pytest

import vdisk
from vdisk.codec import trace as T
from vdisk.errors import HostIOError, UsageError
from vdisk.export.trace import traced


def test_header_round_trips_and_quotes_the_name():
    h = T.Header(size=1 << 30, start_ns=123, image="/a dir/100%\nx.vdk")
    line = T.header_line(h)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert " image=/a%20dir/100%25%0Ax.vdk\n" in line
    assert T.parse_header(line) == h


def test_reader_ignores_unknown_header_keys_and_comments():
    h = T.parse_header("# vdisk-trace 1 size=10 start=5 image=x later=thing\n")
    assert (h.size, h.start_ns, h.image) == (10, 5, "x")
    assert T.parse_record("# a comment\n", 2) is None
    assert T.parse_record("\n", 3) is None
    assert T.parse_record("7 W 4096 512 9 5\n", 4) == T.Record(7, "W", 4096, 512, 9, 5)


@pytest.mark.parametrize("line, words", [
    ("# vdisk-trace 2 size=1 start=1\n", "version 2 is not supported"),
    ("hello\n", "not a vdisk trace"),
    ("# vdisk-trace 1 start=1\n", "no size="),
    ("# vdisk-trace 1 size=1 start=x\n", "start .x. is not"),
    ("# vdisk-trace 1 size=-1 start=1\n", "size '-1' is not an unsigned integer"),
])
def test_bad_headers_are_named(line, words):
    with pytest.raises(UsageError, match=words):
        T.parse_header(line)


@pytest.mark.parametrize("line, words", [
    ("1 X 0 0 0 0", "unknown op 'X'"),
    ("1 R 0 0 0", "expected 6 fields"),
    ("1 R 0x10 0 0 0", "offset '0x10'"),
    ("1 R ٣ 0 0 0", "offset"),  # a non-ASCII digit is not a digit here
    (f"1 R {1 << 64} 0 0 0", "too large"),
    ("1 R " + "9" * 5000 + " 0 0 0", "too long"),
])
def test_bad_records_are_named_with_their_line(line, words):
    with pytest.raises(UsageError, match=words) as e:
        T.parse_record(line, 17)
    assert "line 17" in str(e.value)


def _read(path):
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    return T.parse_header(lines[0]), [T.parse_record(x, i) for i, x in enumerate(lines[1:], 2)]


def test_traced_image_records_every_data_request(tmp_path):
    path = tmp_path / "d.vdk"
    vdisk.create(str(path), 1 << 20, format="vdk")
    img = traced(vdisk.open(str(path)), str(tmp_path / "t.trace"), "d.vdk")
    img.write(4096, b"x" * 8192)
    assert img.read(4096, 4) == b"xxxx"
    img.write_zeroes(0, 4096)
    img.discard(65536, 65536)
    img.flush()
    assert img.size == 1 << 20  # everything else is the image's own
    img.close()
    header, recs = _read(tmp_path / "t.trace")
    assert header.image == "d.vdk" and header.size == 1 << 20
    assert [(r.op, r.offset, r.length, r.errno) for r in recs] == [
        ("W", 4096, 8192, 0), ("R", 4096, 4, 0), ("Z", 0, 4096, 0), ("D", 65536, 65536, 0), ("F", 0, 0, 0)]
    assert [r.t_us for r in recs] == sorted(r.t_us for r in recs)


def test_a_failed_request_is_recorded_with_its_errno(tmp_path):
    class Failing:
        size = 4096

        def read(self, off, n):
            raise HostIOError("boom", errno=errno.ENOSPC)

        def close(self):
            pass

    img = traced(Failing(), str(tmp_path / "t.trace"), "f")
    with pytest.raises(HostIOError):
        img.read(0, 512)
    img.close()
    _, recs = _read(tmp_path / "t.trace")
    assert [(r.op, r.errno) for r in recs] == [("R", errno.ENOSPC)]


def test_trace_file_symlink_is_refused(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / "t.trace")
    vdisk.create(str(tmp_path / "d.vdk"), 1 << 20, format="vdk")
    with vdisk.open(str(tmp_path / "d.vdk")) as img, pytest.raises(UsageError, match="symbolic link"):
        traced(img, str(tmp_path / "t.trace"), "d")
    assert not os.path.exists(tmp_path / "elsewhere")


def test_shipped_boot_trace_parses():
    path = os.path.join(os.path.dirname(__file__), "..", "fleet", "traces", "debian-boot.trace")
    header, recs = _read(path)
    assert header.size > 0 and len(recs) > 100
    assert {r.op for r in recs if r} >= {"R", "W", "F"}
