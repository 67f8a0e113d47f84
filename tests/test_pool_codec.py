"""formats/pool.md against vdisk/codec/pool.py: every layout the spec states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import xxhash

from vdisk.codec import pool as pc
from vdisk.errors import CorruptImage, UnsupportedFeature

SPEC = (Path(__file__).resolve().parent.parent / "formats" / "pool.md").read_text()


def test_struct_sizes_match_the_spec():
    assert pc.ENTRY_SIZE == 24 and pc.NODE_BYTES == 12288 and pc.FANOUT ** pc.LEVELS * pc.BLOCK == 256 << 40
    assert pc.PACK_HEADER.size == 16 and pc.PACK_DIR_ENTRY.size == 16 and pc.PACK_FOOTER.size == 24
    assert pc.SEG_HEADER.size == 24 and pc.SEG_RECORD == 40 and pc.SEG_FOOTER.size == 24 and pc.SEG_PAGE == 256
    assert pc.OBJ_HEADER.size == 24
    assert "| 0      | 8    | hash" in SPEC and "| 23     | 1    | flags" in SPEC


def test_magics_are_the_spec_bytes():
    for magic in (pc.PACK_MAGIC, pc.CONFIG_MAGIC, pc.GEN_MAGIC):
        spelled = " ".join(f"{b:02X}" for b in magic)
        assert spelled in SPEC, spelled
    assert '"\\x89VDKSEG\\n"' in SPEC


def test_entry_layout():
    e = pc.Entry(0x1122334455667788, 0xA1, 0x40, 0x1234, pc.ZSTD)
    raw = e.pack_bytes()
    assert raw[0:8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[8:16] == (0xA1).to_bytes(8, "little")
    assert raw[16:20] == (0x40).to_bytes(4, "little")
    assert raw[20:22] == (0x1234).to_bytes(2, "little")
    assert raw[22] == pc.ZSTD and raw[23] == 0
    assert pc.unpack_entry(raw, 0, "t") == e
    kinds = dict(re.findall(r"(\d) (UNALLOCATED|ZERO|RAW|ZSTD|DELTA|NODE|SKETCH)", SPEC))
    assert {int(k): v for k, v in kinds.items()} == {k: v.upper() for k, v in pc.KIND_NAMES.items()}


@pytest.mark.parametrize("bad", [
    pc.Entry(0, 5, 0, 0, pc.ZERO),  # a zero entry naming a pack
    pc.Entry(0, 5, 8, 10, pc.RAW),  # a blob inside the pack header
    pc.Entry(0, 5, pc.MAX_PACK, 10, pc.RAW),  # past 64 MiB
    pc.Entry(0, 0, 16, 10, pc.RAW),  # pack 0
])
def test_bad_entries_are_refused(bad):
    with pytest.raises(CorruptImage):
        pc.unpack_entry(bad.pack_bytes(), 0, "t")


def test_flags_and_unknown_kinds_are_refused():
    raw = bytearray(pc.Entry(0, 0, 0, 0, pc.ZERO).pack_bytes())
    raw[23] = 1
    with pytest.raises(CorruptImage):
        pc.unpack_entry(bytes(raw), 0, "t")
    raw[23], raw[22] = 0, 9
    with pytest.raises(CorruptImage):
        pc.unpack_entry(bytes(raw), 0, "t")


def test_entry_hash_is_the_low_half_of_xxh3_128():
    blk = bytes(range(256)) * 16
    assert pc.entry_hash(blk) == xxhash.xxh3_128_intdigest(blk) & (2**64 - 1)
    h, fp = pc.block_hash(blk)
    assert h == pc.entry_hash(blk) and fp == xxhash.xxh3_128_digest(blk)


def test_pack_trailer_round_trip_and_checks():
    blobs = [(16, 100, pc.ZSTD, 7), (116, 4096, pc.RAW, 8)]
    body = pc.pack_header(0xAB) + bytes(100 + 4096)
    data = body + pc.pack_trailer(blobs)
    assert data[:8] == pc.PACK_MAGIC and data[8:16] == (0xAB).to_bytes(8, "little")
    got = pc.parse_pack_trailer(data[:16], data[-(24 + 32):], len(data), 0xAB, "t")
    assert got == blobs
    with pytest.raises(CorruptImage):
        pc.parse_pack_trailer(data[:16], data[-(24 + 32):], len(data), 0xAC, "t")  # another pack's name
    broken = bytearray(data)
    broken[-30] ^= 1  # the directory
    with pytest.raises(CorruptImage):
        pc.parse_pack_trailer(bytes(broken[:16]), bytes(broken[-(24 + 32):]), len(broken), 0xAB, "t")


def test_segment_layout():
    recs = sorted((i.to_bytes(16, "big"), pc.Entry(i, 3, 16, 1, pc.RAW).pack_bytes()) for i in range(1, 300))
    data = pc.encode_segment(pc.SEG_FP, recs)
    kind, count, sum_off = pc.segment_layout(data[:24], len(data), "t")
    assert (kind, count, sum_off) == (pc.SEG_FP, 299, 24 + 40 * 299)
    assert data[24:40] == recs[0][0] and data[40:64] == recs[0][1]
    summary = data[sum_off:len(data) - 24]
    assert summary == recs[0][0] + recs[256][0]
    pc.check_summary(summary, data[-24:], "t")
    with pytest.raises(CorruptImage):
        pc.segment_layout(data[:24], len(data) + 1, "t")  # a count that lies about the size


def test_framed_json_objects():
    obj = pc.encode_json_object(pc.GEN_MAGIC, {"a": 1})
    assert obj[:8] == pc.GEN_MAGIC and obj[8:12] == (1).to_bytes(4, "little")
    assert obj[16:24] == xxhash.xxh3_64_intdigest(obj[24:]).to_bytes(8, "little")
    assert pc.decode_json_object(pc.GEN_MAGIC, obj, "t") == {"a": 1}
    with pytest.raises(CorruptImage):
        pc.decode_json_object(pc.CONFIG_MAGIC, obj, "t")
    with pytest.raises(CorruptImage):
        pc.decode_json_object(pc.GEN_MAGIC, obj[:-1] + b"2", "t")
    future = obj[:8] + (2).to_bytes(4, "little") + obj[12:]
    with pytest.raises(UnsupportedFeature):
        pc.decode_json_object(pc.GEN_MAGIC, future, "t")


def test_decompress_refuses_a_frame_that_claims_another_size():
    import zstandard

    big = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(CorruptImage):
        pc.decompress(big, pc.BLOCK, "t")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096))
    with pytest.raises(CorruptImage):
        pc.decompress(no_size, pc.BLOCK, "t")
    with pytest.raises(CorruptImage):
        pc.decompress(b"garbage", pc.BLOCK, "t")


def test_xor_delta_round_trip():
    a = bytes(range(256)) * 16
    b = bytearray(a)
    b[100:110] = b"x" * 10
    d = pc.xor_blocks(bytes(b), a)
    assert d.count(0) == 4096 - sum(1 for i in range(100, 110) if a[i] != ord("x"))
    assert pc.xor_blocks(d, a) == bytes(b)
