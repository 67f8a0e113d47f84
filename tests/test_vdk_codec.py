"""The vdk codec (vdisk/codec/vdk.py) on its own: bytes in, records out, no I/O.

Rules tested here are those of formats/vdk.md sections 4 (header), 7 (L2 entries)
and 10 (snapshot table).  Where vdisk 0.1 deviates from the specification
(formats/vdk.md section 15) a strict xfail test says so; it starts passing, and
must then lose its marker, when the code is fixed.
"""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vdisk.codec import vdk as C
from vdisk.errors import CorruptImage, UnsupportedFeature

U8 = st.integers(0, (1 << 8) - 1)
S8 = st.integers(-128, 127)
U16 = st.integers(0, (1 << 16) - 1)
U32 = st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)
S64 = st.integers(-(1 << 63), (1 << 63) - 1)

NO_NUL_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))


def _utf8_max(n: int):
    return NO_NUL_TEXT.filter(lambda s: len(s.encode()) <= n)


ASCII_NO_NUL = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=C.MAX_BACKING_FORMAT)


@st.composite
def _backing_refs(draw):
    """(name, format, snapshot) of a valid header: a name always comes with a format
    (formats/vdk.md section 11.1); without a name the other two are ignored."""
    name = draw(_utf8_max(C.MAX_BACKING_NAME))
    fmt = draw(ASCII_NO_NUL.filter(bool) if name else ASCII_NO_NUL)
    return name, fmt, draw(_utf8_max(C.MAX_SNAPSHOT_NAME))


def _header(backing, **kw) -> C.Header:
    name, fmt, snap = backing
    return C.Header(backing_name=name, backing_format=fmt, backing_snapshot=snap, **kw)


#: valid version 1 headers as far as the codec checks them (cluster_bits, compression and
#: the other fields the driver checks after choosing the slot may hold anything)
headers = st.builds(
    _header, _backing_refs(),
    generation=U64, cluster_bits=U32, virtual_size=U64,
    l1_offset=U64, l1_entries=U32, l1_checksum=U64,
    refcount_table_offset=U64, refcount_table_entries=U32, refcount_table_checksum=U64,
    snapshot_table_offset=U64, snapshot_count=U32, snapshot_table_length=U32, snapshot_table_checksum=U64,
    next_snapshot_id=U64, host_clusters=U64, compression_type=U8, compression_level=S8,
    incompatible_features=st.sampled_from([0, C.INCOMPAT_CORRUPT]),
    compatible_features=U64, autoclear_features=st.just(0),
    dedup_table_offset=st.just(0), dedup_table_length=st.just(0), dedup_table_checksum=st.just(0),
)


def _slot(raw: bytes) -> bytes:
    return raw + bytes(C.SLOT_SIZE - len(raw))


def _reseal(slot: bytearray | bytes, length: int | None = None) -> bytes:
    """Recompute the checksum of a (modified) header slot, at header_length - 8."""
    slot = bytearray(slot)
    if length is None:
        (length,) = struct.unpack_from("<I", slot, 12)
    else:
        struct.pack_into("<I", slot, 12, length)
    struct.pack_into("<Q", slot, length - 8, xxhash.xxh3_64_intdigest(bytes(slot[:length - 8])))
    return bytes(slot)


def _patched(h: C.Header, fmt: str, offset: int, value) -> bytes:
    slot = bytearray(_slot(h.encode()))
    struct.pack_into(fmt, slot, offset, value)
    return _reseal(slot)


BASIC = C.Header(generation=7, cluster_bits=16, virtual_size=1 << 30, l1_offset=65536, l1_entries=1,
                 host_clusters=4, backing_name="base.vdk", backing_format="vdk", backing_snapshot="#3")


# ============================================================================ checksums
def test_checksum_is_xxh3_64_seed_0():
    assert C.checksum(b"") == 0x2D06800538D394C2  # published XXH3_64bits("") value
    assert C.checksum(b"vdk") == xxhash.xxh3_64_intdigest(b"vdk", seed=0)
    assert C.checksum(memoryview(b"abc")) == C.checksum(b"abc")


# ============================================================================ header
@settings(max_examples=300, deadline=None)
@given(headers)
def test_header_round_trip(h):
    raw = h.encode()
    assert len(raw) % 8 == 0 and C.HEADER_FIXED + 8 <= len(raw) <= C.SLOT_SIZE
    assert raw[:8] == C.MAGIC
    assert C.Header.decode(raw) == h
    assert C.Header.decode(_slot(raw)) == h  # what a reader sees: a whole, zero-padded slot
    assert C.Header.decode(_slot(raw), check_features=False) == h


@settings(max_examples=50, deadline=None)
@given(U64)
def test_header_keeps_unknown_compatible_bits_and_clears_unknown_autoclear_bits(bits):
    h = BASIC.replace(compatible_features=bits, autoclear_features=bits)
    d = C.Header.decode(h.encode())
    assert d.compatible_features == bits
    assert d.autoclear_features == bits & C.KNOWN_AUTOCLEAR == 0


def test_header_smallest_length_and_checksum_position():
    raw = BASIC.encode()
    tail = len("base.vdk") + len("vdk") + len("#3")
    assert len(raw) == (C.HEADER_FIXED + tail + 7) // 8 * 8 + 8
    assert struct.unpack_from("<I", raw, 12)[0] == len(raw)
    assert struct.unpack_from("<Q", raw, len(raw) - 8)[0] == C.checksum(raw[:-8])
    assert len(C.Header(generation=1, cluster_bits=12, virtual_size=0).encode()) == C.HEADER_FIXED + 8


def test_header_longer_than_needed_is_accepted():
    slot = _reseal(_slot(BASIC.encode()), length=C.SLOT_SIZE)
    assert C.Header.decode(slot) == BASIC


@pytest.mark.parametrize("length", [0, 8, C.HEADER_FIXED, C.HEADER_FIXED + 4, C.HEADER_FIXED + 12,
                                    C.SLOT_SIZE + 8, 1 << 31])
def test_header_length_out_of_range(length):
    slot = bytearray(_slot(C.Header(generation=1, cluster_bits=12, virtual_size=0).encode()))
    struct.pack_into("<I", slot, 12, length)
    if 16 <= length <= C.SLOT_SIZE:
        slot = bytearray(_reseal(slot, length))
    with pytest.raises(CorruptImage, match="length"):
        C.Header.decode(bytes(slot))


def test_header_length_past_a_short_buffer_is_truncation():
    raw = _reseal(_slot(BASIC.encode()), length=1024)
    with pytest.raises(CorruptImage, match="truncated"):
        C.Header.decode(raw[:512])


def test_header_shorter_than_the_fixed_part():
    with pytest.raises(CorruptImage):
        C.Header.decode(BASIC.encode()[:C.HEADER_FIXED - 1])


@pytest.mark.parametrize("slot", [bytes(C.SLOT_SIZE), b"QFI\xfb" + bytes(C.SLOT_SIZE - 4), b"\x89VDK\r\n\x1a\x00" * 512])
def test_header_bad_magic(slot):
    with pytest.raises(CorruptImage, match="magic"):
        C.Header.decode(slot)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_header_any_damaged_byte_is_corruption(data):
    raw = bytearray(_slot(BASIC.encode()))
    length = len(BASIC.encode())
    pos = data.draw(st.integers(0, length - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    check = data.draw(st.booleans())
    with pytest.raises(CorruptImage):
        C.Header.decode(bytes(raw), check_features=check)


@pytest.mark.parametrize("check", [False, True])
def test_header_damaged_version_byte_is_corruption_not_unsupported(check):
    """Section 4.1: the checksum decides validity before the version is looked at."""
    raw = bytearray(_slot(BASIC.encode()))
    raw[8] ^= 0x06  # version 7, checksum now wrong
    with pytest.raises(CorruptImage, match="checksum"):
        C.Header.decode(bytes(raw), check_features=check)


@pytest.mark.parametrize("version", [0, 2, 7, 0xFFFFFFFF])
def test_header_other_version_is_unsupported(version):
    raw = BASIC.replace(version=version).encode()  # a valid checksum
    with pytest.raises(UnsupportedFeature, match="version"):
        C.Header.decode(raw)
    # a slot that is merely valid: the version matters only once it is the current header
    h = C.Header.decode(raw, check_features=False)
    assert h.version == version and h == BASIC.replace(version=version)
    with pytest.raises(UnsupportedFeature, match="version"):
        C.check_header_features(h.version, h.incompatible_features)


@pytest.mark.parametrize("bit", range(2, 64))  # bit 0: corrupt, bit 1: identity
def test_header_unknown_incompatible_bit_is_unsupported(bit):
    raw = BASIC.replace(incompatible_features=1 << bit).encode()
    with pytest.raises(UnsupportedFeature, match="incompatible"):
        C.Header.decode(raw)
    h = C.Header.decode(raw, check_features=False)
    assert h.incompatible_features == 1 << bit
    with pytest.raises(UnsupportedFeature, match="incompatible"):
        C.check_header_features(h.version, h.incompatible_features)


def test_check_header_features_accepts_version_1_and_known_bits():
    C.check_header_features(C.VERSION, 0)
    C.check_header_features(C.VERSION, C.KNOWN_INCOMPAT)


# ---------------------------------------------------------------------------- reserved dedup fields
@pytest.mark.parametrize("field", ["dedup_table_offset", "dedup_table_length", "dedup_table_checksum"])
@pytest.mark.parametrize("value", [1, 1 << 16, (1 << 64) - 1])
@pytest.mark.parametrize("check", [False, True])
def test_header_nonzero_dedup_field_is_corruption(field, value, check):
    """Section 4.5: the three dedup fields MUST be zero in version 1."""
    raw = BASIC.replace(**{field: value}).encode()  # the codec still encodes them (for these tests)
    with pytest.raises(CorruptImage, match="deduplication"):
        C.Header.decode(raw, check_features=check)


def test_header_known_incompatible_bit_decodes():
    assert C.Header.decode(BASIC.replace(incompatible_features=C.INCOMPAT_CORRUPT).encode()).incompatible_features \
        == C.INCOMPAT_CORRUPT


def test_header_unknown_bits_are_checked_only_after_the_checksum():
    raw = bytearray(BASIC.replace(incompatible_features=1 << 9).encode())
    raw[-1] ^= 1
    with pytest.raises(CorruptImage, match="checksum"):
        C.Header.decode(bytes(raw))


# ---------------------------------------------------------------------------- backing reference
def test_longest_backing_reference_fits():
    name = "é" * (C.MAX_BACKING_NAME // 2)  # 1024 bytes of UTF-8
    h = BASIC.replace(backing_name=name, backing_format="f" * C.MAX_BACKING_FORMAT,
                      backing_snapshot="s" * C.MAX_SNAPSHOT_NAME)
    raw = h.encode()
    assert len(raw) <= C.SLOT_SIZE
    assert C.Header.decode(raw) == h


@pytest.mark.parametrize("kw", [
    {"backing_name": "n" * (C.MAX_BACKING_NAME + 1)},
    {"backing_name": "é" * (C.MAX_BACKING_NAME // 2) + "x"},  # 1025 bytes, 513 characters
    {"backing_format": "f" * (C.MAX_BACKING_FORMAT + 1)},
    {"backing_snapshot": "s" * (C.MAX_SNAPSHOT_NAME + 1)},
])
def test_long_backing_reference_refused_on_encode(kw):
    with pytest.raises(ValueError, match="too long"):
        BASIC.replace(**kw).encode()


def _with_lengths(name_len: int, fmt_len: int, snap_len: int, tail: bytes | None = None,
                  length: int = C.SLOT_SIZE) -> bytes:
    slot = bytearray(_slot(C.Header(generation=1, cluster_bits=12, virtual_size=0).encode()))
    struct.pack_into("<HBB", slot, 176, name_len, fmt_len, snap_len)
    if tail is None:
        tail = b"n" * name_len + b"f" * fmt_len + b"s" * snap_len
    slot[C.HEADER_FIXED:C.HEADER_FIXED + len(tail)] = tail
    return _reseal(slot, length)


def test_backing_lengths_inside_a_long_header_decode():
    h = C.Header.decode(_with_lengths(5, 3, 2))
    assert (h.backing_name, h.backing_format, h.backing_snapshot) == ("nnnnn", "fff", "ss")


@pytest.mark.parametrize("name_len,fmt_len,snap_len,length", [
    (C.MAX_BACKING_NAME + 1, 0, 0, C.SLOT_SIZE),
    (0xFFFF, 0, 0, C.SLOT_SIZE),
    (0, C.MAX_BACKING_FORMAT + 1, 0, C.SLOT_SIZE),
    (10, 3, 0, C.HEADER_FIXED + 8),  # does not fit in header_length
    (0, 0, 9, C.HEADER_FIXED + 16),  # 192 + 9 > 208 - 8
])
def test_backing_lengths_out_of_range_are_corruption(name_len, fmt_len, snap_len, length):
    with pytest.raises(CorruptImage, match="backing reference"):
        C.Header.decode(_with_lengths(name_len, fmt_len, snap_len, length=length))


@pytest.mark.parametrize("tail,lens", [
    (b"\xff\xfe", (2, 0, 0)),  # name not UTF-8
    (b"ab\0d", (4, 0, 0)),  # NUL in the name
    (b"abc\xc3", (3, 1, 0)),  # format not ASCII
    (b"ab#\0", (2, 0, 2)),  # NUL in the snapshot selector
    (b"ab\xc3\x28", (2, 0, 2)),  # snapshot selector not UTF-8
    (b"ab\0", (2, 1, 0)),  # NUL in the format
    (b"abv\0k", (2, 3, 0)),  # NUL inside the format
])
def test_backing_reference_bad_text_is_corruption(tail, lens):
    with pytest.raises(CorruptImage, match="backing reference"):
        C.Header.decode(_with_lengths(*lens, tail=tail))


@pytest.mark.parametrize("snap", ["", "#3"])
def test_backing_name_without_format_is_corruption(snap):
    """Section 11.1: F > 0 whenever N > 0; a reader never guesses the format."""
    raw = _with_lengths(4, 0, len(snap), tail=b"base" + snap.encode())
    with pytest.raises(CorruptImage, match="format"):
        C.Header.decode(raw)


def test_format_without_name_is_ignored_but_decodes():
    h = C.Header.decode(_with_lengths(0, 3, 0, tail=b"vdk"))
    assert h.backing_name == "" and h.backing_format == "vdk"


@pytest.mark.parametrize("fmt", ["qcöw2", "vdk\u2028", "\u00e9"])
def test_non_ascii_format_refused_on_encode(fmt):
    with pytest.raises(ValueError):  # UnicodeEncodeError is a ValueError
        BASIC.replace(backing_format=fmt).encode()


def test_backing_name_without_format_refused_on_encode():
    with pytest.raises(ValueError, match="format"):
        BASIC.replace(backing_format="").encode()


# ============================================================================ L1 and refcount tables
@given(st.lists(st.tuples(U64, U64), max_size=64))
def test_l1_and_refcount_table_round_trip(entries):
    offs, sums = [e[0] for e in entries], [e[1] for e in entries]
    raw = C.encode_l1(offs, sums)
    assert len(raw) == len(entries) * C.L1_ENTRY_SIZE
    def lists(pair):
        return tuple(list(x) for x in pair)

    assert lists(C.decode_l1(raw, len(entries))) == (offs, sums)
    assert lists(C.decode_refcount_table(C.encode_refcount_table(offs, sums), len(entries))) == (offs, sums)
    # a reader takes exactly n entries: padding after them is ignored
    assert lists(C.decode_l1(raw + bytes(64), len(entries))) == (offs, sums)


# ============================================================================ L2 entries
@given(st.sampled_from(sorted(C.TYPE_NAMES)), st.integers(0, C.OFFSET_MASK), U32, U32, U64, U64)
def test_l2_entry_round_trip(kind, off, length, codec, csum, birth):
    e = C.L2Entry(kind, off, length, codec, csum, birth)
    raw = e.encode()
    assert len(raw) == C.L2_ENTRY_SIZE
    assert C.L2Entry.decode(raw) == e
    assert C.L2Entry.decode(bytes(C.L2_ENTRY_SIZE) * 3 + raw, 3) == e
    desc = struct.unpack_from("<Q", raw)[0]
    assert C.desc_type(desc) == kind and C.desc_offset(desc) == off


CS = 1 << 16
LIMIT = 100 * CS  # host area of the examples below


def _v(kind, off=0, length=0, codec=0, cs=CS, limit=LIMIT, reserved=0):
    return C.validate_l2_entry(C.make_desc(kind, off) | reserved, length, codec, cs, limit)


@pytest.mark.parametrize("kind", [C.T_UNALLOCATED, C.T_ZERO])
def test_l2_unallocated_and_zero(kind):
    assert _v(kind) is None
    assert _v(kind, off=CS) is not None
    assert _v(kind, length=1) is not None
    assert _v(kind, codec=1) is not None
    # checksum and birth of these types are not looked at
    assert C.validate_l2_entry(C.make_desc(kind), 0, 0, CS, LIMIT) is None


def test_l2_data():
    assert _v(C.T_DATA, off=2 * CS, length=CS) is None
    assert _v(C.T_DATA, off=LIMIT - CS, length=CS) is None  # last cluster of the host area
    assert "past the end" in _v(C.T_DATA, off=LIMIT, length=CS)
    assert _v(C.T_DATA, off=2 * CS + 512, length=CS) is not None  # unaligned
    assert _v(C.T_DATA, off=0, length=CS) is not None  # the header cluster
    assert _v(C.T_DATA, off=2 * CS, length=CS - 1) is not None
    assert _v(C.T_DATA, off=2 * CS, length=0) is not None
    assert _v(C.T_DATA, off=2 * CS, length=CS, codec=1) is not None
    # with 4 KiB clusters, clusters 0 and 1 are both header clusters
    assert _v(C.T_DATA, off=4096, length=4096, cs=4096) is not None
    assert _v(C.T_DATA, off=8192, length=4096, cs=4096) is None


def test_l2_compressed():
    z = C.COMPRESSION_ZSTD
    assert _v(C.T_COMPRESSED, off=2 * CS + 100, length=500, codec=z) is None
    assert _v(C.T_COMPRESSED, off=2 * CS, length=CS - 1, codec=z) is None  # the largest frame
    assert _v(C.T_COMPRESSED, off=3 * CS - 10, length=10, codec=z) is None  # ends exactly at the boundary
    assert "unknown codec" in _v(C.T_COMPRESSED, off=2 * CS, length=500, codec=0)
    assert "unknown codec" in _v(C.T_COMPRESSED, off=2 * CS, length=500, codec=2)
    assert "out of range" in _v(C.T_COMPRESSED, off=2 * CS, length=0, codec=z)
    assert "out of range" in _v(C.T_COMPRESSED, off=2 * CS, length=CS, codec=z)
    assert _v(C.T_COMPRESSED, off=100, length=50, codec=z, cs=4096) is not None  # inside the header area
    assert _v(C.T_COMPRESSED, off=8192 + 5, length=50, codec=z, cs=4096) is None
    assert "past the end" in _v(C.T_COMPRESSED, off=LIMIT - 5, length=10, codec=z)


def test_l2_compressed_may_cross_one_cluster_boundary():
    """formats/vdk.md section 8: a frame may run on into the next host cluster."""
    z = C.COMPRESSION_ZSTD
    assert _v(C.T_COMPRESSED, off=3 * CS - 10, length=11, codec=z) is None
    assert _v(C.T_COMPRESSED, off=3 * CS - 1, length=CS - 1, codec=z) is None
    assert _v(C.T_COMPRESSED, off=8192 + 4000, length=100, codec=z, cs=4096) is None
    assert "past the end" in _v(C.T_COMPRESSED, off=LIMIT - 10, length=11, codec=z)


@pytest.mark.parametrize("kind", range(4, 16))
def test_l2_unknown_types(kind):
    assert "unknown L2 entry type" in _v(kind, off=2 * CS, length=CS)


@pytest.mark.parametrize("bit", range(60, 64))
@pytest.mark.parametrize("kind", sorted(C.TYPE_NAMES))
def test_l2_reserved_descriptor_bits(kind, bit):
    assert "reserved" in _v(kind, reserved=1 << bit)


def _spec_valid(desc: int, length: int, codec: int, cs: int, limit: int) -> bool:
    """formats/vdk.md section 7, written out independently of the codec."""
    if desc >> 60:
        return False
    kind, off = (desc >> 56) & 0xF, desc & ((1 << 56) - 1)
    if kind in (0, 1):
        return off == length == codec == 0
    if kind == 2:
        return off % cs == 0 and off >= 8192 and length == cs and codec == 0 and off + cs <= limit
    if kind == 3:
        return codec == 1 and 0 < length < cs and off >= 8192 and off + length <= limit
    return False


@settings(max_examples=1000, deadline=None)
@given(cbits=st.integers(C.MIN_CLUSTER_BITS, C.MAX_CLUSTER_BITS), kind=st.sampled_from([0, 1, 2, 3, 2, 3, 4, 15]),
       high=st.sampled_from([0, 0, 0, 1, 8]), cluster=st.integers(0, 1 << 12), in_cluster=st.integers(0, 1 << 22),
       where=st.sampled_from(["start", "any", "last", "middle"]),
       size=st.sampled_from(["0", "1", "cs-1", "cs", "cs+1", "any", "half+1"]),
       codec=st.sampled_from([1, 1, 0, 2, 1 << 20]), with_offset=st.booleans(), clusters=st.integers(3, 1 << 13))
@example(cbits=12, kind=3, high=0, cluster=3, in_cluster=0, where="last", size="cs-1", codec=1, with_offset=True,
         clusters=100)  # crosses a cluster boundary (allowed)
@example(cbits=12, kind=3, high=0, cluster=3, in_cluster=0, where="middle", size="half+1", codec=1,
         with_offset=True, clusters=100)  # crosses by one byte
@example(cbits=12, kind=2, high=0, cluster=99, in_cluster=0, where="start", size="cs", codec=0, with_offset=True,
         clusters=100)  # the last cluster of the host area
def test_l2_validation_matches_the_spec(cbits, kind, high, cluster, in_cluster, where, size, codec, with_offset,
                                        clusters):
    cs = 1 << cbits
    off = cluster * cs + {"start": 0, "any": in_cluster % cs, "last": cs - 1, "middle": cs // 2}[where]
    length = {"0": 0, "1": 1, "cs-1": cs - 1, "cs": cs, "cs+1": cs + 1, "any": in_cluster % cs,
              "half+1": cs // 2 + 1}[size]
    desc = (high << 60) | (kind << 56) | (off if with_offset else 0)
    limit = clusters * cs
    expect = _spec_valid(desc, length, codec, cs, limit)
    assert (C.validate_l2_entry(desc, length, codec, cs, limit) is None) == expect


# ============================================================================ snapshot table
def _rec(i: int, name: str | None = None, **kw) -> C.SnapshotRecord:
    args = dict(id=i, name=f"snap-{i}" if name is None else name, generation=10 + i, create_time_ns=1_700_000_000_000_000_000 + i,
                virtual_size=1 << 20, l1_offset=(4 + i) << 16, l1_entries=1, l1_checksum=0xABC + i)
    args.update(kw)
    return C.SnapshotRecord(**args)


records = st.builds(
    C.SnapshotRecord, id=U64, name=_utf8_max(C.MAX_SNAPSHOT_NAME).filter(lambda s: len(s.encode()) > 0),
    generation=U64, create_time_ns=S64, virtual_size=U64, l1_offset=U64, l1_entries=U32, l1_checksum=U64,
    flags=st.sampled_from([0, C.SNAP_HIDDEN]), holds=U32,
)


def _unique(recs):
    ids, names = set(), set()
    for r in recs:
        if r.id in ids or (not r.flags & C.SNAP_HIDDEN and r.name in names):
            return False
        ids.add(r.id)
        if not r.flags & C.SNAP_HIDDEN:
            names.add(r.name)
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=8).filter(_unique))
def test_snapshot_table_round_trip(recs):
    raw = C.encode_snapshot_table(recs)
    assert len(raw) % 8 == 0
    assert len(raw) == sum((64 + len(r.name.encode()) + 7) // 8 * 8 for r in recs)
    assert C.decode_snapshot_table(raw, len(recs)) == recs


def test_snapshot_record_layout():
    raw = _rec(1, "abc").encode()
    assert len(raw) == 72 and raw[64:67] == b"abc" and raw[67:] == bytes(5)
    assert struct.unpack_from("<H", raw, 60)[0] == 3
    assert len(_rec(1, "x" * 8).encode()) == 72 and len(_rec(1, "x" * 9).encode()) == 80


def test_snapshot_name_length_refused_on_encode():
    with pytest.raises(ValueError):
        _rec(1, "").encode()
    with pytest.raises(ValueError):
        _rec(1, "n" * (C.MAX_SNAPSHOT_NAME + 1)).encode()
    assert C.decode_snapshot_table(_rec(1, "n" * C.MAX_SNAPSHOT_NAME).encode(), 1)[0].name == "n" * 255


def _set_name_len(raw: bytes, pos: int, n: int) -> bytes:
    buf = bytearray(raw)
    struct.pack_into("<H", buf, pos + 60, n)
    return bytes(buf)


@pytest.mark.parametrize("n", [0, C.MAX_SNAPSHOT_NAME + 1, 0xFFFF, 100])
def test_snapshot_bad_name_length(n):
    raw = _set_name_len(C.encode_snapshot_table([_rec(1, "abc")]), 0, n)  # 100: runs past the table
    with pytest.raises(CorruptImage, match="name length"):
        C.decode_snapshot_table(raw, 1)


def test_snapshot_name_not_utf8():
    raw = bytearray(_rec(1, "abc").encode())
    raw[64] = 0xFF
    with pytest.raises(CorruptImage, match="UTF-8"):
        C.decode_snapshot_table(bytes(raw), 1)


@pytest.mark.parametrize("name", [b"\0", b"a\0b", b"abc\0"])
def test_snapshot_name_with_nul_is_corruption(name):
    raw = bytearray(_rec(1, "x" * len(name)).encode())
    raw[64:64 + len(name)] = name
    with pytest.raises(CorruptImage, match="NUL"):
        C.decode_snapshot_table(bytes(raw), 1)


def test_snapshot_duplicate_ids():
    raw = C.encode_snapshot_table([_rec(1, "a"), _rec(1, "b")])
    with pytest.raises(CorruptImage, match="duplicate"):
        C.decode_snapshot_table(raw, 2)


def test_snapshot_duplicate_visible_names():
    raw = C.encode_snapshot_table([_rec(1, "same"), _rec(2, "same")])
    with pytest.raises(CorruptImage, match="duplicate"):
        C.decode_snapshot_table(raw, 2)


@pytest.mark.parametrize("hidden_first", [True, False])
def test_snapshot_hidden_may_share_a_name(hidden_first):
    a, b = _rec(1, "same", flags=C.SNAP_HIDDEN, holds=2), _rec(2, "same")
    recs = [a, b] if hidden_first else [b, a]
    assert C.decode_snapshot_table(C.encode_snapshot_table(recs), 2) == recs


def test_snapshot_two_hidden_with_one_name():
    recs = [_rec(1, "x", flags=C.SNAP_HIDDEN, holds=1), _rec(2, "x", flags=C.SNAP_HIDDEN, holds=1), _rec(3, "x")]
    assert C.decode_snapshot_table(C.encode_snapshot_table(recs), 3) == recs


def test_snapshot_trailing_bytes():
    raw = C.encode_snapshot_table([_rec(1), _rec(2)])
    with pytest.raises(CorruptImage, match="length"):
        C.decode_snapshot_table(raw + bytes(8), 2)
    with pytest.raises(CorruptImage, match="length"):
        C.decode_snapshot_table(raw, 1)  # count smaller than the records present


def test_snapshot_table_shorter_than_its_count():
    raw = C.encode_snapshot_table([_rec(1), _rec(2)])
    with pytest.raises(CorruptImage, match="shorter"):
        C.decode_snapshot_table(raw, 3)
    with pytest.raises(CorruptImage):
        C.decode_snapshot_table(raw[:-8], 2)  # the padding of the last record is missing
    with pytest.raises(CorruptImage):
        C.decode_snapshot_table(raw[:40], 1)


@pytest.mark.parametrize("flags", [1 << 1, 1 << 31, C.SNAP_HIDDEN | 1 << 5])
def test_snapshot_unknown_flags_are_unsupported(flags):
    raw = _rec(1, flags=flags).encode()
    with pytest.raises(UnsupportedFeature, match="flags"):
        C.decode_snapshot_table(raw, 1)


def test_empty_snapshot_table():
    assert C.encode_snapshot_table([]) == b""
    assert C.decode_snapshot_table(b"", 0) == []
    with pytest.raises(CorruptImage):
        C.decode_snapshot_table(bytes(8), 0)


# ============================================================================ geometry
@pytest.mark.parametrize("cbits", range(C.MIN_CLUSTER_BITS, C.MAX_CLUSTER_BITS + 1))
def test_geometry(cbits):
    cs = 1 << cbits
    assert C.l2_entries(cbits) * C.L2_ENTRY_SIZE == cs
    assert C.rc_entries(cbits) * C.RC_ENTRY_SIZE == cs
    span = cs * C.l2_entries(cbits)
    assert [C.l1_entries_for(v, cbits) for v in (0, 1, span - 1, span, span + 1, 3 * span)] == [0, 1, 1, 1, 2, 3]


def _held_table(n: int) -> tuple[C.SnapshotRecord, bytes]:
    holders = tuple(C.HolderRecord(bytes([i % 251 + 1]) + bytes(14) + bytes([i // 251]), f"c/{i}.vdk" + "x" * (i % 9))
                    for i in range(n))
    rec = C.SnapshotRecord(1, "base", 1, 0, 1 << 30, 1 << 20, 8, 7, 0, n + 2, holders)
    return rec, C.encode_snapshot_table([rec])


def test_decoded_holders_re_encode_to_the_bytes_read():
    rec, buf = _held_table(40)
    (got,) = C.decode_snapshot_table(buf, 1)
    assert got == rec
    assert all(h.encoded is not None for h in got.holders)  # re-encoding reuses what was read
    assert C.encode_snapshot_table([got]) == buf
    # a holder made anew (no bytes kept) encodes the same as one read back
    fresh = C.HolderRecord(got.holders[3].image_id, got.holders[3].path)
    assert fresh == got.holders[3] and fresh.encode() == got.holders[3].encode()


def test_a_table_whose_last_holder_lacks_its_padding_is_refused():
    rec, buf = _held_table(3)
    last = rec.holders[-1]
    assert len(last.encode()) > 18 + len(last.path)  # the last record is padded
    with pytest.raises(CorruptImage, match="length does not match"):
        C.decode_snapshot_table(buf[:-1], 1)


def test_snapshot_tables_decoded_again_are_equal_fresh_lists_and_errors_are_not_remembered():
    rec, buf = _held_table(5)
    first = C.decode_snapshot_table(buf, 1)
    first.append("a caller's own change")
    again = C.decode_snapshot_table(bytearray(buf), 1)  # the same bytes, another object
    assert again == [rec]
    bad = bytearray(buf)
    struct.pack_into("<H", bad, 62, 4)  # holder_count 4 of 5 records: the length no longer matches
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(CorruptImage):
            C.decode_snapshot_table(bytes(bad), 1)
    with pytest.raises(CorruptImage):  # same bytes, but without the identity feature
        C.decode_snapshot_table(buf, 1, identity=False)
    assert C.decode_snapshot_table(buf, 1) == [rec]
