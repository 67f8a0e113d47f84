"""vdisk.zeros.zero_runs against the obvious per-piece definition, on random and
adversarial buffers (zero bytes at piece starts, runs across pieces, clipped ends)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vdisk.zeros import GRANULE, is_zero_at, zero_runs


def reference(data: bytes, start: int, end: int, base: int, gran: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    i = start
    while i < end:
        pe = min(end, i + gran - (base + i) % gran)  # the end of the piece holding i
        if not any(data[i:pe]):
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], pe)
            else:
                runs.append((i, pe))
        i = pe
    return runs


_piece = st.sampled_from(["zero", "random", "zero-start", "zero-end", "one-byte"])


@st.composite
def buffers(draw):
    gran = draw(st.sampled_from([512, 4096]))
    kinds = draw(st.lists(_piece, min_size=1, max_size=40))
    out = bytearray()
    for k in kinds:
        if k == "zero":
            out += bytes(gran)
        elif k == "random":
            out += draw(st.binary(min_size=gran, max_size=gran))
        elif k == "zero-start":  # zero first byte, data later: the strided look must look closer
            out += bytes(gran - 1) + b"\x01"
        elif k == "zero-end":
            out += b"\x01" + bytes(gran - 1)
        else:
            piece = bytearray(gran)
            piece[draw(st.integers(0, gran - 1))] = draw(st.integers(1, 255))
            out += piece
    data = bytes(out)
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    base = draw(st.integers(0, 3 * gran))
    return data, start, end, base, gran


@settings(max_examples=400)
@given(buffers())
def test_zero_runs_is_the_per_piece_definition(case):
    data, start, end, base, gran = case
    assert zero_runs(data, start, end, base, gran) == reference(data, start, end, base, gran)
    assert zero_runs(bytearray(data), start, end, base, gran) == reference(data, start, end, base, gran)


def test_many_zero_started_pieces_fall_back_to_find():
    piece = bytes(GRANULE - 1) + b"\x01"
    data = piece * 40 + bytes(3 * GRANULE) + piece * 5
    assert zero_runs(data, 0, len(data), 0, GRANULE) == [(40 * GRANULE, 43 * GRANULE)]


def test_is_zero_at_beyond_the_shared_zero_buffer():
    big = bytes(9 << 20)
    assert is_zero_at(big, 0, len(big))
    assert not is_zero_at(big + b"\x01", 0, len(big) + 1)
    assert is_zero_at(b"\x01" + big, 1, len(big))
