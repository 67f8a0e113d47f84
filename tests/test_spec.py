"""formats/vdk.md, the sample images and the code must agree.

1. The byte-range tables of the specification (marked ``<!-- struct: NAME -->``),
   its bit and value tables, its constants and limits are parsed and compared with
   ``vdisk.codec.vdk`` -- not only with the codec's own field dictionaries but with
   the bytes its encoders really produce.
2. Every sample image in formats/samples is opened with ``vdisk.open``; its guest
   content must hash to what formats/samples/MANIFEST says and ``check`` must be
   clean.  The samples must keep showing what formats/README.md says they show.
3. A small second reader, written from the specification alone (struct, xxhash,
   zstandard -- no vdisk code), decodes every sample and recounts every refcount as
   section 9.2 defines them: if the spec leaves out something the code relies on,
   this reader disagrees.
4. scripts/make-samples still produces the same guest content.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib
import os
import re
import struct
import subprocess
import sys
from dataclasses import fields

import pytest
import xxhash
import zstandard

import vdisk
from vdisk.codec import vdk as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "formats", "vdk.md")
SAMPLES = os.path.join(ROOT, "formats", "samples")
MANIFEST = os.path.join(SAMPLES, "MANIFEST")

TYPE_WIDTH = {"u8": 1, "s8": 1, "u16": 2, "u32": 4, "s32": 4, "u64": 8, "s64": 8}
TYPE_FMT = {"u8": "B", "s8": "b", "u16": "H", "u32": "I", "s32": "i", "u64": "Q", "s64": "q"}


# ============================================================================ parsing the spec
def _spec_text() -> str:
    with open(SPEC, encoding="utf-8") as f:
        return f.read()


def _tables() -> dict[str, list[dict[str, str]]]:
    """Every marked table: ``<!-- kind: name -->`` (or ``<!-- name -->``) followed by a
    markdown table -> list of rows, each a dict from column header to cell text."""
    lines = _spec_text().splitlines()
    out: dict[str, list[dict[str, str]]] = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!--\s*(?:(\w+):\s*)?([\w-]+)\s*-->", line.strip())
        if not m:
            continue
        key = f"{m.group(1)}:{m.group(2)}" if m.group(1) else m.group(2)
        assert key not in out, f"table {key} is marked twice in vdk.md"
        j = i + 1
        rows = []
        while j < len(lines) and lines[j].startswith("|"):
            rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        assert len(rows) >= 2 and set(rows[1][0]) <= set("-: "), f"marker {key} is not followed by a table"
        header = rows[0]
        body = []
        for r in rows[2:]:
            assert len(r) == len(header), f"table {key}: row {r} has {len(r)} cells, header has {len(header)}"
            body.append(dict(zip(header, r)))
        out[key] = body
    return out


TABLES = _tables()


def _struct_rows(name: str) -> list[tuple[int, int, str, str]]:
    rows = TABLES[f"struct:{name}"]
    out = []
    for r in rows:
        off, size = int(r["Offset"]), int(r["Size"])
        out.append((off, size, r["Field"], r["Type"]))
    return out


def _unquote(s: str) -> str:
    return s.strip().strip("`").strip()


def _int_expr(text: str) -> int:
    """A small integer expression from the spec: ``4096``, ``1 << 56``, ``32 << 20``."""
    node = ast.parse(text.strip(), mode="eval").body

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.LShift: lambda: a << b, ast.Mult: lambda: a * b, ast.Add: lambda: a + b,
                   ast.Sub: lambda: a - b, ast.Pow: lambda: a ** b}
            return ops[type(n.op)]()
        raise ValueError(f"not a simple integer expression: {text!r}")

    return ev(node)


def _resolve(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


# ============================================================================ structs
def _check_tiling(rows, total: int, what: str) -> None:
    pos = 0
    for off, size, field, typ in sorted(rows):
        assert off == pos, f"{what}: field {field} at {off}, expected {pos} (gap or overlap)"
        if typ in TYPE_WIDTH:
            assert size == TYPE_WIDTH[typ], f"{what}: {field} is {typ} but {size} bytes"
        pos = off + size
    assert pos == total, f"{what}: fields end at {pos}, the structure is {total} bytes"


def _check_against_fields(rows, codec_fields: dict[str, tuple[int, int]], what: str) -> None:
    """Named rows match the codec's (offset, size) exactly; 'reserved' rows fill the gaps
    the codec leaves (or match its own 'reserved' entries)."""
    named = {f: (o, s) for o, s, f, _t in rows if f != "reserved"}
    codec_named = {k: v for k, v in codec_fields.items() if k != "reserved"}
    assert named == codec_named, f"{what}: spec and codec disagree: spec-only {set(named) - set(codec_named)}, " \
                                 f"codec-only {set(codec_named) - set(named)}, " \
                                 f"differing {[k for k in named if k in codec_named and named[k] != codec_named[k]]}"
    spec_reserved = sorted((o, s) for o, s, f, _t in rows if f == "reserved")
    covered = set()
    for o, s in codec_fields.values():
        covered.update(range(o, o + s))
    codec_reserved_bytes = {b for o, s in spec_reserved for b in range(o, o + s)}
    if "reserved" in codec_fields:
        o, s = codec_fields["reserved"]
        assert (o, s) in spec_reserved, f"{what}: codec reserved {o}+{s} is not in the spec"
    else:
        assert not codec_reserved_bytes & covered, f"{what}: a spec 'reserved' range overlaps a codec field"


def test_header_table_matches_codec_fields():
    rows = _struct_rows("header")
    _check_tiling(rows, C.HEADER_FIXED, "header")
    _check_against_fields(rows, C.HEADER_FIELDS, "header")
    assert C._HEADER.size == C.HEADER_FIXED


def _distinct_header() -> C.Header:
    """A header whose every numeric field has a different, recognisable value."""
    return C.Header(
        generation=0x1111_2222_3333_4444, cluster_bits=0x0000_1234, virtual_size=0x00AB_CDEF_0123,
        l1_offset=0x0101_0000, l1_entries=0x0202, l1_checksum=0x0303_0303_0303_0303,
        refcount_table_offset=0x0404_0000, refcount_table_entries=0x0505, refcount_table_checksum=0x0606_0606,
        snapshot_table_offset=0x0707_0000, snapshot_count=0x0808, snapshot_table_length=0x0909,
        snapshot_table_checksum=0x0A0A_0A0A, next_snapshot_id=0x0B0B, host_clusters=0x0C0C_0C0C,
        compression_type=1, compression_level=-5, incompatible_features=C.INCOMPAT_CORRUPT,
        compatible_features=0x0D0D_0000_0000_0000, autoclear_features=0x0E0E, dedup_table_offset=0x0F0F_0000,
        dedup_table_length=0x1010, dedup_table_checksum=0x1111_1111, backing_name="base image.vdk",
        backing_format="qcow2", backing_snapshot="#42",
    )


def test_header_bytes_are_where_the_spec_says():
    h = _distinct_header()
    raw = h.encode()
    expect = {f.name: getattr(h, f.name) for f in fields(h)}
    expect["magic"] = C.MAGIC
    expect["header_length"] = len(raw)
    expect["backing_name_length"] = len(h.backing_name.encode())
    expect["backing_format_length"] = len(h.backing_format)
    expect["backing_snapshot_length"] = len(h.backing_snapshot.encode())
    for off, size, field, typ in _struct_rows("header"):
        chunk = raw[off:off + size]
        if field == "reserved":
            assert chunk == bytes(size), f"reserved header bytes {off}+{size} are not zero"
        elif typ == "bytes":
            assert chunk == expect[field]
        else:
            (val,) = struct.unpack("<" + TYPE_FMT[typ], chunk)
            assert val == expect[field], f"header field {field} at {off}: {val:#x} != {expect[field]:#x}"


def test_header_tail_layout():
    h = _distinct_header()
    raw = h.encode()
    n, f, s = (len(x.encode()) for x in (h.backing_name, h.backing_format, h.backing_snapshot))
    rows = TABLES["layout:header-tail"]
    assert [r["Field"] for r in rows] == ["backing_name", "backing_format", "backing_snapshot", "image_id",
                                          "padding", "header_checksum"]
    assert [r["Offset"] for r in rows[:5]] == ["192", "192 + N", "192 + N + F", "192 + N + F + S",
                                               "192 + N + F + S + I"]
    ident = h.replace(incompatible_features=h.incompatible_features | C.INCOMPAT_IDENTITY,
                      image_id=bytes(range(16, 32))).encode()
    at = C.HEADER_FIXED + n + f + s
    assert ident[at:at + 16] == bytes(range(16, 32))
    assert len(ident) == (at + 16 + 7) // 8 * 8 + 8
    clean = h.replace(incompatible_features=C.INCOMPAT_IDENTITY, image_id=bytes(range(16, 32)),
                      dedup_table_offset=0, dedup_table_length=0, dedup_table_checksum=0)
    assert C.Header.decode(clean.encode()).image_id == bytes(range(16, 32))
    base = C.HEADER_FIXED
    assert raw[base:base + n] == h.backing_name.encode()
    assert raw[base + n:base + n + f] == h.backing_format.encode()
    assert raw[base + n + f:base + n + f + s] == h.backing_snapshot.encode()
    length = len(raw)
    assert length == (base + n + f + s + 7) // 8 * 8 + 8  # "smallest length" rule of section 4.2
    assert raw[base + n + f + s:length - 8] == bytes(length - 8 - (base + n + f + s))
    assert struct.unpack("<Q", raw[length - 8:])[0] == xxhash.xxh3_64_intdigest(raw[:length - 8])
    # bounds stated in the header table
    assert 200 == C.HEADER_FIXED + 8 and C.SLOT_SIZE == 4096


def test_snapshot_record_table():
    rows = _struct_rows("snapshot_record")
    _check_tiling(rows, 64, "snapshot record")
    _check_against_fields(rows, C.SNAPSHOT_FIELDS, "snapshot record")
    assert C._SNAP.size == 64
    rec = C.SnapshotRecord(id=0x0101, name="snap", generation=0x0202, create_time_ns=-3, virtual_size=0x0404,
                           l1_offset=0x0505_0000, l1_entries=0x0606, l1_checksum=0x0707_0707, flags=C.SNAP_HIDDEN,
                           holds=0x0909)
    raw = rec.encode()
    expect = {**{f.name: getattr(rec, f.name) for f in fields(rec)}, "name_length": 4, "holder_count": 0}
    for off, size, field, typ in rows:
        chunk = raw[off:off + size]
        if field == "reserved":
            assert chunk == bytes(size)
            continue
        (val,) = struct.unpack("<" + TYPE_FMT[typ], chunk)
        assert val == expect[field], f"snapshot field {field} at {off}"
    tail = TABLES["layout:snapshot-record-tail"]
    assert [(r["Offset"], r["Field"]) for r in tail] == [("64", "name"), ("64 + name_length", "padding"),
                                                         ("align(64 + name_length, 8)", "holders")]
    assert raw[64:68] == b"snap" and len(raw) == 72 and raw[68:] == bytes(4)


def test_holder_record_table():
    rows = _struct_rows("holder_record")
    _check_tiling(rows, 18, "holder record")
    _check_against_fields(rows, C.HOLDER_FIELDS, "holder record")
    hid = bytes(range(1, 17))
    rec = C.SnapshotRecord(id=1, name="snap", generation=2, create_time_ns=3, virtual_size=4, l1_offset=0,
                           l1_entries=0, l1_checksum=0, holds=3,
                           holders=(C.HolderRecord(hid, "c/clone.vdk"), C.HolderRecord(bytes(15) + b"x", "d")))
    raw = rec.encode()
    assert struct.unpack_from("<H", raw, C.SNAPSHOT_FIELDS["holder_count"][0])[0] == 2
    pos = 72  # after the 4-byte name and its padding
    assert raw[pos:pos + 16] == hid and struct.unpack_from("<H", raw, pos + 16)[0] == len("c/clone.vdk")
    assert raw[pos + 18:pos + 29] == b"c/clone.vdk" and raw[pos + 29:pos + 32] == bytes(3)
    pos += 32
    assert raw[pos + 15:pos + 16] == b"x" and raw[pos + 18:pos + 19] == b"d" and len(raw) == pos + 24
    tail = TABLES["layout:holder-record-tail"]
    assert [(r["Offset"], r["Field"]) for r in tail] == [("18", "path"), ("18 + path_length", "padding")]
    assert C.decode_snapshot_table(raw, 1) == [rec]
    with pytest.raises(vdisk.errors.CorruptImage, match="without the identity feature"):
        C.decode_snapshot_table(raw, 1, identity=False)


def test_l1_entry_table():
    rows = _struct_rows("l1_entry")
    _check_tiling(rows, C.L1_ENTRY_SIZE, "L1 entry")
    assert [f for _o, _s, f, _t in rows] == ["l2_offset", "l2_checksum"]
    raw = C.encode_l1([0x1122_3344_5566_0000], [0x99AA_BBCC_DDEE_FF00])
    assert struct.unpack_from("<Q", raw, rows[0][0])[0] == 0x1122_3344_5566_0000
    assert struct.unpack_from("<Q", raw, rows[1][0])[0] == 0x99AA_BBCC_DDEE_FF00
    assert C.L1_ENTRY.size == 16


def test_l2_entry_table_and_descriptor_bits():
    rows = _struct_rows("l2_entry")
    _check_tiling(rows, C.L2_ENTRY_SIZE, "L2 entry")
    assert [f for _o, _s, f, _t in rows] == ["descriptor", "stored_length", "codec", "checksum", "birth"]
    e = C.L2Entry(kind=C.T_COMPRESSED, host_offset=0x12_3456_7800, stored_length=0x0ABC, codec=C.COMPRESSION_ZSTD,
                  checksum=0x0102_0304_0506_0708, birth=0x0A0B)
    raw = e.encode()
    vals = {f: struct.unpack_from("<" + TYPE_FMT[t], raw, o)[0] for o, _s, f, t in rows}
    assert vals["stored_length"] == 0x0ABC and vals["codec"] == 1
    assert vals["checksum"] == 0x0102_0304_0506_0708 and vals["birth"] == 0x0A0B
    bits = {r["Field"]: r["Bits"] for r in TABLES["bits:l2_descriptor"]}
    assert set(bits) == {"host_offset", "type", "reserved"}

    def mask(spec: str) -> tuple[int, int]:
        lo, hi = (int(x) for x in spec.split("-"))
        return lo, ((1 << (hi - lo + 1)) - 1) << lo

    lo, m = mask(bits["host_offset"])
    assert lo == 0 and m == C.OFFSET_MASK and m == C.MAX_OFFSET - 1
    lo, m = mask(bits["type"])
    assert lo == C.TYPE_SHIFT and m == 0xF << C.TYPE_SHIFT
    _lo, m = mask(bits["reserved"])
    assert m == C.RESERVED_DESC_MASK
    assert vals["descriptor"] == (C.T_COMPRESSED << 56) | 0x12_3456_7800


def test_refcount_structures():
    rows = _struct_rows("refcount_table_entry")
    _check_tiling(rows, C.RT_ENTRY_SIZE, "refcount table entry")
    raw = C.encode_refcount_table([0x4000], [0xDEAD_BEEF])
    assert struct.unpack_from("<QQ", raw) == (0x4000, 0xDEAD_BEEF)
    assert [f for _o, _s, f, _t in rows] == ["refcount_block_offset", "refcount_block_checksum"]
    rows = _struct_rows("refcount_block_entry")
    _check_tiling(rows, C.RC_ENTRY_SIZE, "refcount block entry")
    assert C.RC_ENTRY.format in ("<I", b"<I")
    for cbits in range(C.MIN_CLUSTER_BITS, C.MAX_CLUSTER_BITS + 1):
        assert C.rc_entries(cbits) == (1 << cbits) // 4
        assert C.l2_entries(cbits) == (1 << cbits) // 32
        span = (1 << cbits) * ((1 << cbits) // 32)
        assert C.l1_entries_for(0, cbits) == 0
        assert C.l1_entries_for(1, cbits) == 1
        assert C.l1_entries_for(span, cbits) == 1
        assert C.l1_entries_for(span + 1, cbits) == 2


# ============================================================================ values, constants, limits
def _values(name: str) -> dict[int, str]:
    return {int(r.get("Value", r.get("Bit"))): r["Name"] for r in TABLES[f"values:{name}"]}


def test_l2_type_codes():
    assert _values("l2-types") == C.TYPE_NAMES
    assert (C.T_UNALLOCATED, C.T_ZERO, C.T_DATA, C.T_COMPRESSED) == (0, 1, 2, 3)


def test_compression_codes():
    assert _values("compression-types") == C.COMPRESSION_NAMES


def _mask(bits: dict[int, str]) -> int:
    m = 0
    for b in bits:
        m |= 1 << b
    return m


def test_feature_bits():
    incompat = _values("incompatible-features")
    assert _mask(incompat) == C.KNOWN_INCOMPAT
    assert incompat == {0: "corrupt", 1: "identity"} and C.INCOMPAT_CORRUPT == 1 << 0
    assert C.INCOMPAT_IDENTITY == 1 << 1
    assert _mask(_values("compatible-features")) == C.KNOWN_COMPAT
    assert _mask(_values("autoclear-features")) == C.KNOWN_AUTOCLEAR


def test_snapshot_flags():
    flags = _values("snapshot-flags")
    assert _mask(flags) == C.KNOWN_SNAP_FLAGS
    assert flags == {0: "hidden"} and C.SNAP_HIDDEN == 1 << 0


def test_constants_table():
    rows = TABLES["constants"]
    assert rows, "no constants in the spec"
    for r in rows:
        name, text = _unquote(r["Constant"]), _unquote(r["Value"])
        actual = _resolve(name)
        if isinstance(actual, bytes):
            assert bytes.fromhex(text) == actual, name
        elif isinstance(actual, tuple):
            assert tuple(_int_expr(x) for x in text.split(",")) == actual, name
        else:
            assert _int_expr(text) == actual, name
    named = {_unquote(r["Constant"]).rpartition(".")[2] for r in rows}
    for must in ("MAGIC", "VERSION", "SLOT_SIZE", "SLOT_OFFSETS", "HEADER_AREA", "HEADER_FIXED",
                 "L1_ENTRY_SIZE", "L2_ENTRY_SIZE", "RT_ENTRY_SIZE", "RC_ENTRY_SIZE"):
        assert must in named, f"the spec's constants table lacks {must}"


def test_limits_table():
    rows = TABLES["limits"]
    seen = set()
    for r in rows:
        assert r["Kind"].split()[0] in ("format", "implementation"), r
        for name, expr in re.findall(r"`([\w.]+) = ([^`]+)`", r["Constant"]):
            assert _resolve(name) == _int_expr(expr), f"limit {name}: spec says {expr}"
            seen.add(name.rpartition(".")[2])
    for must in ("MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS", "MAX_L1_BYTES", "MAX_SNAPSHOTS", "MAX_SNAPSHOT_NAME",
                 "MAX_BACKING_NAME", "MAX_BACKING_FORMAT", "MAX_CHAIN_DEPTH", "MAX_VIRTUAL_SIZE",
                 "MAX_SNAPSHOT_TABLE"):
        assert must in seen, f"the spec's limits table lacks {must}"


def test_spec_mentions_every_codec_constant_value_it_relies_on():
    text = _spec_text()
    # numbers quoted in prose that must follow the code
    assert f"0 to {C.MAX_BACKING_NAME}" in text and f"0 to {C.MAX_BACKING_FORMAT}" in text
    assert f"1 to {C.MAX_SNAPSHOT_NAME}" in text
    assert f"at most {C.MAX_SNAPSHOTS}" in text
    assert re.search(r"may\s+cross\s+one\s+cluster\s+boundary", text)  # compressed frames: section 8
    assert "from 200 (192 + 8) to 4096" in text


# ============================================================================ samples through vdisk
def _manifest() -> list[tuple[str, int, str, str | None]]:
    out = []
    with open(MANIFEST) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            digest, size, name, snap = line.split()
            out.append((digest, int(size), name, None if snap == "-" else snap))
    return out


SAMPLE_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(SAMPLES, "*.vdk")))


def test_samples_exist_and_are_small():
    assert {"empty.vdk", "data.vdk", "compressed.vdk", "snapshots.vdk", "overlay.vdk", "base.vdk",
            "clone.vdk", "clone-source.vdk"} <= set(SAMPLE_FILES)
    for name in SAMPLE_FILES:
        assert os.path.getsize(os.path.join(SAMPLES, name)) < 200 << 10, name
    listed = {name for _d, _s, name, snap in _manifest() if snap is None}
    assert listed == set(SAMPLE_FILES), "MANIFEST and the sample files disagree"
    readme = open(os.path.join(ROOT, "formats", "README.md")).read()
    for name in SAMPLE_FILES:
        assert name in readme, f"formats/README.md does not mention {name}"


@pytest.mark.parametrize("digest,size,name,snap", _manifest(),
                         ids=[f"{n}{s or ''}" for _d, _z, n, s in _manifest()])
def test_sample_guest_content(digest, size, name, snap):
    h = hashlib.sha256()
    with vdisk.open(os.path.join(SAMPLES, name), read_only=True, snapshot=snap) as img:
        assert img.format == "vdk"
        assert img.size == size
        for off in range(0, size, 64 << 10):
            h.update(img.read(off, min(64 << 10, size - off)))
    assert h.hexdigest() == digest


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_check_is_clean(name):
    with vdisk.open(os.path.join(SAMPLES, name), read_only=True) as img:
        res = img.check()
    assert not res.corruptions and not res.leaks, (res.corruptions, res.leaks)
    assert res.leaked_clusters == 0


def test_samples_show_what_the_readme_says():
    def op(name, **kw):
        return vdisk.open(os.path.join(SAMPLES, name), read_only=True, **kw)

    with op("empty.vdk") as img:
        assert img.block_status(chain=False)[0].status == vdisk.block.Status.UNALLOCATED
        assert len(img.block_status(chain=False)) == 1
    with op("data.vdk") as img:
        assert img.size % img.cluster_size and img.cluster_size == 4096
        assert len(img.driver.l1_off) == 3
    with op("compressed.vdk") as img:
        st = img.block_status(chain=False)
        assert any(e.compressed for e in st) and any(e.status.name == "DATA" and not e.compressed for e in st)
    with op("snapshots.vdk") as img:
        assert [s.name for s in img.snapshot_list()] == ["first", "second"]
    with op("overlay.vdk") as img:
        assert img.driver.backing_ref.filename == "base.vdk" and img.driver.backing_ref.format == "vdk"
        assert img.size > img.backing.size
        assert any(e.status.name == "ZERO" for e in img.block_status(chain=False))
    with op("clone.vdk") as img:
        ref = img.driver.backing_ref
        assert (ref.filename, ref.format, ref.snapshot) == ("clone-source.vdk", "vdk", "#1")
    with op("clone-source.vdk") as img:
        assert img.snapshot_list() == []
        [rec] = img.driver.snapshots
        assert rec.flags == C.SNAP_HIDDEN and rec.holds == 1 and rec.name == "gold"


def test_make_samples_reproduces_the_manifest(tmp_path):
    out = tmp_path / "samples"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make-samples"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "MANIFEST").read_text() == open(MANIFEST).read(), \
        "scripts/make-samples no longer produces the committed samples; rerun it and commit formats/samples"


# ============================================================================ a reader from the spec alone
class SpecReader:
    """Reads a vdk image using only what formats/vdk.md says (no vdisk code)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        slots = []
        for off in (0, 4096):
            gen = self._slot_generation(self.data[off:off + 4096])
            if gen is not None:
                slots.append((gen, -off, off))
        assert slots, f"{path}: no valid slot"
        _g, _o, self.slot = max(slots)  # the highest generation; on a tie, slot 0
        self.h = h = self._decode_header(self.data[self.slot:self.slot + 4096])  # checks only the chosen one
        self.cbits = h["cluster_bits"]
        assert 12 <= self.cbits <= 21
        self.cs = 1 << self.cbits
        self.l2_bits = self.cbits - 5
        self.limit = h["host_clusters"] * self.cs
        assert len(self.data) >= self.limit
        self.snapshots = self._snapshot_table()

    @staticmethod
    def _slot_generation(slot: bytes):
        """Section 4.1: a slot is valid when magic, header_length and checksum are right
        (whatever its version); its generation then takes part in the choice."""
        if slot[:8] != b"\x89VDK\r\n\x1a\n":
            return None
        (length,) = struct.unpack_from("<I", slot, 12)
        if length % 8 or not 200 <= length <= 4096:
            return None
        if struct.unpack_from("<Q", slot, length - 8)[0] != xxhash.xxh3_64_intdigest(slot[:length - 8]):
            return None
        return struct.unpack_from("<Q", slot, 16)[0]

    @staticmethod
    def _decode_header(slot: bytes):
        """The current header, checked as section 4.4 says (steps 1 and 2); None for an
        invalid slot."""
        if SpecReader._slot_generation(slot) is None:
            return None
        version, length = struct.unpack_from("<II", slot, 8)
        assert version == 1
        names = ["generation", "incompatible", "compatible", "autoclear"]
        h = dict(zip(names, struct.unpack_from("<QQQQ", slot, 16)))
        h["cluster_bits"], h["compression_type"], h["compression_level"] = struct.unpack_from("<IBb", slot, 48)
        assert slot[54:56] == b"\0\0" and slot[76:80] == bytes(4) and slot[100:104] == bytes(4)
        assert slot[180:192] == bytes(12)
        (h["virtual_size"], h["l1_offset"], h["l1_entries"]) = struct.unpack_from("<QQI", slot, 56)
        (h["l1_checksum"], h["rt_offset"], h["rt_entries"]) = struct.unpack_from("<QQI", slot, 80)
        (h["rt_checksum"], h["st_offset"], h["st_count"], h["st_length"], h["st_checksum"], h["next_id"],
         h["host_clusters"]) = struct.unpack_from("<QQIIQQQ", slot, 104)
        assert struct.unpack_from("<QQQ", slot, 152) == (0, 0, 0), "dedup fields must be zero in version 1"
        n, f, s = struct.unpack_from("<HBB", slot, 176)
        assert h["incompatible"] & ~2 == 0 and h["autoclear"] == 0  # only the identity bit
        i = 16 if h["incompatible"] & 2 else 0
        assert 192 + n + f + s + i <= length - 8
        assert n <= 1024 and f <= 16 and (f > 0 or n == 0)
        h["backing"] = (slot[192:192 + n].decode(), slot[192 + n:192 + n + f].decode("ascii"),
                        slot[192 + n + f:192 + n + f + s].decode())
        assert all("\0" not in x for x in h["backing"])
        h["image_id"] = slot[192 + n + f + s:192 + n + f + s + i]
        assert i == 0 or any(h["image_id"])
        assert 12 <= h["cluster_bits"] <= 21 and -7 <= h["compression_level"] <= 22
        assert slot[192 + n + f + s + i:length - 8] == bytes(length - 8 - (192 + n + f + s + i))
        return h

    def _run(self, off: int, n: int, csum: int) -> bytes:
        assert off % self.cs == 0 and off >= 8192 and off + n <= self.limit
        buf = self.data[off:off + n]
        assert xxhash.xxh3_64_intdigest(buf) == csum, f"checksum of {n} bytes at {off:#x}"
        return buf

    def _snapshot_table(self) -> list[dict]:
        h = self.h
        if h["st_count"] == 0:
            assert h["st_offset"] == h["st_length"] == 0
            return []
        buf = self._run(h["st_offset"], h["st_length"], h["st_checksum"])
        out, pos = [], 0
        for _ in range(h["st_count"]):
            (sid, gen, ctime, vsize, l1_off, l1_n, flags, l1_sum, holds, nlen,
             n_holders) = struct.unpack_from("<QQqQQIIQIHH", buf, pos)
            assert 1 <= nlen <= 255 and flags & ~1 == 0 and 1 <= sid < h["next_id"]
            assert n_holders <= holds and (n_holders == 0 or h["incompatible"] & 2)
            name = buf[pos + 64:pos + 64 + nlen].decode()
            assert "\0" not in name
            rec_len = (64 + nlen + 7) // 8 * 8
            assert buf[pos + 64 + nlen:pos + rec_len] == bytes(rec_len - 64 - nlen)
            pos += rec_len
            holders = []
            for _h in range(n_holders):  # section 10: holder records follow the name
                hid, plen = struct.unpack_from("<16sH", buf, pos)
                assert any(hid) and 1 <= plen <= 1024
                path = buf[pos + 18:pos + 18 + plen].decode()
                assert "\0" not in path
                hlen = (18 + plen + 7) // 8 * 8
                assert buf[pos + 18 + plen:pos + hlen] == bytes(hlen - 18 - plen)
                holders.append((hid, path))
                pos += hlen
            assert len({x[0] for x in holders}) == len(holders)
            out.append(dict(id=sid, generation=gen, virtual_size=vsize, l1_offset=l1_off, l1_entries=l1_n,
                            l1_checksum=l1_sum, flags=flags, holds=holds, name=name, holders=holders))
        assert pos == len(buf)
        assert len({r["id"] for r in out}) == len(out)
        return out

    def root(self, selector: str | None):
        if selector is None:
            h = self.h
            return h["virtual_size"], h["l1_offset"], h["l1_entries"], h["l1_checksum"]
        if selector.startswith("#"):
            [r] = [r for r in self.snapshots if r["id"] == int(selector[1:])]
        else:
            [r] = [r for r in self.snapshots if r["name"] == selector and not r["flags"] & 1]
        return r["virtual_size"], r["l1_offset"], r["l1_entries"], r["l1_checksum"]

    def l1(self, off: int, n: int, csum: int, vsize: int) -> list[tuple[int, int]]:
        span = self.cs * (self.cs // 32)
        assert n == -(-vsize // span)
        if n == 0:
            assert off == 0
            return []
        buf = self._run(off, n * 16, csum)
        return [struct.unpack_from("<QQ", buf, i * 16) for i in range(n)]

    def l2(self, off: int, csum: int, first_guest_cluster: int, vsize: int) -> list[tuple]:
        buf = self._run(off, self.cs, csum)
        out = []
        guest_clusters = -(-vsize // self.cs)
        for j in range(self.cs // 32):
            desc, length, codec, dsum, birth = struct.unpack_from("<QIIQQ", buf, j * 32)
            assert desc >> 60 == 0
            typ, host = (desc >> 56) & 0xF, desc & ((1 << 56) - 1)
            if typ in (0, 1):
                assert host == length == codec == 0
            elif typ == 2:
                assert host % self.cs == 0 and host >= 8192 and host + self.cs <= self.limit
                assert length == self.cs and codec == 0
            elif typ == 3:
                assert codec == 1 and 0 < length < self.cs and host >= 8192 and host + length <= self.limit
            else:
                raise AssertionError(f"type {typ}")
            if first_guest_cluster + j >= guest_clusters:
                assert typ == 0
            out.append((typ, host, length, dsum, birth))
        return out

    def cluster(self, typ, host, length, dsum) -> bytes:
        raw = self.data[host:host + (self.cs if typ == 2 else length)]
        assert xxhash.xxh3_64_intdigest(raw) == dsum
        if typ == 2:
            return raw
        out = zstandard.ZstdDecompressor().decompress(raw, max_output_size=self.cs)
        assert len(out) == self.cs
        return out

    def guest(self, selector: str | None = None) -> bytes:
        vsize, off, n, csum = self.root(selector)
        below = self._backing()
        out = bytearray()
        per = self.cs // 32
        for i, (l2_off, l2_sum) in enumerate(self.l1(off, n, csum, vsize)):
            entries = self.l2(l2_off, l2_sum, i * per, vsize) if l2_off else [(0, 0, 0, 0, 0)] * per
            for j, (typ, host, length, dsum, _birth) in enumerate(entries):
                g = (i * per + j) * self.cs
                if g >= vsize:
                    break
                if typ == 0:
                    out += below(g, self.cs)
                elif typ == 1:
                    out += bytes(self.cs)
                else:
                    out += self.cluster(typ, host, length, dsum)
        return bytes(out[:vsize])

    def _backing(self):
        name, fmt, snap = self.h["backing"]
        if not name:
            return lambda g, n: bytes(n)
        assert fmt == "vdk", "samples only use vdk backing images"
        content = SpecReader(os.path.join(os.path.dirname(self.path), name)).guest(snap or None)
        return lambda g, n: (content[g:g + n] + bytes(n))[:n]

    def refcounts_expected(self) -> list[int]:
        """Section 9.2, computed from scratch."""
        h, cs = self.h, self.cs
        exp = [0] * h["host_clusters"]

        def run(off, nbytes):
            for c in range(off // cs, -(-(off + nbytes) // cs)):
                exp[c] += 1

        for c in range(-(-8192 // cs)):
            exp[c] += 1
        run(h["rt_offset"], h["rt_entries"] * 16)
        for bo, _bs in self._rt():
            exp[bo // cs] += 1
        if h["st_offset"]:
            run(h["st_offset"], h["st_length"])
        roots = [(h["virtual_size"], h["l1_offset"], h["l1_entries"], h["l1_checksum"])]
        roots += [(r["virtual_size"], r["l1_offset"], r["l1_entries"], r["l1_checksum"]) for r in self.snapshots]
        seen_l1, seen_l2 = set(), set()
        per = cs // 32
        for vsize, off, n, csum in roots:
            if not off:
                continue
            run(off, n * 16)
            if off in seen_l1:
                continue
            seen_l1.add(off)
            for i, (l2_off, l2_sum) in enumerate(self.l1(off, n, csum, vsize)):
                if not l2_off:
                    continue
                exp[l2_off // cs] += 1
                if l2_off in seen_l2:
                    continue
                seen_l2.add(l2_off)
                for typ, host, length, dsum, _b in self.l2(l2_off, l2_sum, i * per, vsize):
                    if typ in (2, 3):
                        self.cluster(typ, host, length, dsum)
                        for c in self.touched(typ, host, length):
                            exp[c] += 1
        return exp

    def touched(self, typ: int, host: int, length: int) -> list[int]:
        """Host clusters an entry references (section 8: a frame may cross one boundary)."""
        if typ == 2:
            return [host // self.cs]
        first, last = host // self.cs, (host + length - 1) // self.cs
        assert last - first <= 1
        return [first] if first == last else [first, last]

    def _rt(self) -> list[tuple[int, int]]:
        h = self.h
        per = self.cs // 4
        assert h["rt_entries"] == -(-h["host_clusters"] // per)
        buf = self._run(h["rt_offset"], h["rt_entries"] * 16, h["rt_checksum"])
        return [struct.unpack_from("<QQ", buf, i * 16) for i in range(h["rt_entries"])]

    def refcounts_stored(self) -> list[int]:
        out = []
        for bo, bs in self._rt():
            blk = self._run(bo, self.cs, bs)
            out += struct.unpack(f"<{self.cs // 4}I", blk)
        assert all(v == 0 for v in out[self.h["host_clusters"]:])
        return out[:self.h["host_clusters"]]


@pytest.mark.parametrize("digest,size,name,snap", _manifest(),
                         ids=[f"{n}{s or ''}" for _d, _z, n, s in _manifest()])
def test_spec_reader_reads_the_samples(digest, size, name, snap):
    r = SpecReader(os.path.join(SAMPLES, name))
    content = r.guest(snap)
    assert len(content) == size
    assert hashlib.sha256(content).hexdigest() == digest


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_spec_reader_refcounts_match_the_samples(name):
    r = SpecReader(os.path.join(SAMPLES, name))
    assert r.refcounts_stored() == r.refcounts_expected()


def test_spec_reader_sees_the_structures_the_samples_promise():
    compressed = SpecReader(os.path.join(SAMPLES, "compressed.vdk"))
    h = compressed.h
    entries = []
    for i, (o, s) in enumerate(compressed.l1(h["l1_offset"], h["l1_entries"], h["l1_checksum"], h["virtual_size"])):
        if o:
            entries += compressed.l2(o, s, i * 128, h["virtual_size"])
    touching = [compressed.touched(typ, host, length) for typ, host, length, *_ in entries if typ == 3]
    packed = [c for cl in touching for c in cl]
    assert len(packed) > len(set(packed)), "no packing cluster holds more than one frame"
    assert any(len(cl) == 2 for cl in touching), "no compressed frame crosses a cluster boundary"
    stored = compressed.refcounts_stored()
    assert all(stored[c] == packed.count(c) for c in set(packed))
    assert any(stored[c] > 1 for c in set(packed))
    assert h["compression_type"] == 1
    # births are generations of the header that committed them
    assert all(0 < b <= h["generation"] for typ, _h, _l, _s, b in entries if typ in (2, 3))

    data = SpecReader(os.path.join(SAMPLES, "data.vdk"))
    with open(data.path, "rb") as f:
        head = f.read(8192)
    assert all(SpecReader._decode_header(head[o:o + 4096]) for o in (0, 4096)), "data.vdk should use both slots"
    empty = SpecReader(os.path.join(SAMPLES, "empty.vdk"))
    with open(empty.path, "rb") as f:
        head = f.read(8192)
    assert head[4096:] == bytes(4096) and empty.slot == 0

    snaps = SpecReader(os.path.join(SAMPLES, "snapshots.vdk"))
    first, second = snaps.snapshots
    stored = snaps.refcounts_stored()
    assert (first["name"], second["name"]) == ("first", "second")
    assert first["generation"] < second["generation"] < snaps.h["generation"]
    # the live L1 was rewritten after "second", so each snapshot's L1 is held by its record alone
    assert stored[first["l1_offset"] // 4096] == 1 and stored[second["l1_offset"] // 4096] == 1


# ============================================================================ slots, header checks, deviations
# Rules of sections 4.1, 4.4, 4.5 and 13.2 on images whose header slots are patched;
# strict xfails mark what vdisk 0.1 still does otherwise (section 15).
def _slot_gens(data) -> list[tuple[int, int]]:
    """(generation, slot offset) of each slot that is valid by section 4.1."""
    out = []
    for o in C.SLOT_OFFSETS:
        g = SpecReader._slot_generation(bytes(data[o:o + 4096]))
        if g is not None:
            out.append((g, o))
    return out


def _encode_unchecked(h: C.Header) -> bytes:
    """``h.encode()``, also for a backing name without a format, which the encoder refuses
    (built with a one-byte format that is then cut out and the slot re-signed)."""
    if not (h.backing_name and not h.backing_format):
        return h.encode()
    raw = bytearray(h.replace(backing_format="x").encode())
    length = struct.unpack_from("<I", raw, 12)[0]
    at = C.HEADER_FIXED + len(h.backing_name.encode())
    body = raw[:length - 8]
    del body[at]
    body.append(0)
    body[178] = 0  # backing_format_length
    return bytes(body) + struct.pack("<Q", C.checksum(bytes(body)))


def _copy_with_header(tmp_path, name: str, newest: bool = True, **changes) -> str:
    """A copy of a sample whose newest (or older) header slot is rewritten with ``changes``
    (and a valid checksum)."""
    src = os.path.join(SAMPLES, name)
    dst = str(tmp_path / name)
    with open(src, "rb") as f:
        data = bytearray(f.read())
    slots = _slot_gens(data)
    _gen, off = max(slots) if newest else min(slots)
    h = C.Header.decode(bytes(data[off:off + 4096]))
    if "incompatible_features" in changes:  # keep the identity bit (and so the image id) of the sample
        changes["incompatible_features"] |= h.incompatible_features & C.INCOMPAT_IDENTITY
    h = h.replace(**changes)
    raw = _encode_unchecked(h)
    data[off:off + 4096] = raw + bytes(4096 - len(raw))
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def _sample_digest(name: str) -> str:
    return [d for d, _s, n, snap in _manifest() if n == name and not snap][0]


def _digest(img) -> str:
    h = hashlib.sha256()
    for off in range(0, img.size, 64 << 10):
        h.update(img.read(off, min(64 << 10, img.size - off)))
    return h.hexdigest()


def test_samples_data_uses_both_slots_for_the_slot_tests():
    with open(os.path.join(SAMPLES, "data.vdk"), "rb") as f:
        head = f.read(8192)
    assert head[:4096] != bytes(4096) and head[4096:] != bytes(4096)
    assert sorted(_slot_gens(head)) == [(3, 4096), (4, 0)]


def test_damaged_version_in_the_older_slot(tmp_path):
    dst = _copy_with_header(tmp_path, "data.vdk", newest=False)
    with open(dst, "r+b") as f:
        data = bytearray(f.read(8192))
        older = min(_slot_gens(data))[1]
        f.seek(older + 8)
        f.write(struct.pack("<I", 7))  # damaged: version 7 and a wrong checksum
    with vdisk.open(dst, read_only=True) as img:  # the newer slot is intact
        assert img.driver.header.generation == 4
        assert _digest(img) == _sample_digest("data.vdk")


@pytest.mark.parametrize("changes", [dict(incompatible_features=1 << 5), dict(version=7),
                                     dict(incompatible_features=1 << 63, version=2),
                                     dict(dedup_table_offset=0x5000, dedup_table_length=8192),
                                     dict(backing_name="gone.vdk", backing_format="")],
                         ids=["unknown-incompat-bit", "version-7", "version-2-and-bit", "dedup", "name-no-format"])
def test_older_valid_slot_of_any_content_does_not_block(tmp_path, changes):
    """Section 4.1: only the current header must be a version and feature set the reader
    knows, with valid fields; the older slot, checksum-valid or not, is just older."""
    dst = _copy_with_header(tmp_path, "data.vdk", newest=False, **changes)
    with vdisk.open(dst, read_only=True) as img:
        assert img.driver.header.generation == 4
        assert _digest(img) == _sample_digest("data.vdk")
    with vdisk.open(dst) as img:  # a writer overwrites that older slot, nothing else
        img.write(0, b"after" * 100)
        img.flush()
        assert img.driver.header.generation == 5
    with open(dst, "rb") as f:
        head = f.read(8192)
    assert sorted(_slot_gens(head)) == [(4, 0), (5, 4096)]
    with vdisk.open(dst, read_only=True) as img:
        assert img.read(0, 500) == b"after" * 100
        res = img.check()
        assert not res.corruptions and not res.leaks


@pytest.mark.parametrize("name", ["empty.vdk", "data.vdk"])
@pytest.mark.parametrize("changes,error", [
    (dict(incompatible_features=1 << 5), vdisk.errors.UnsupportedFeature),
    (dict(version=2), vdisk.errors.UnsupportedFeature),
    (dict(version=0, incompatible_features=1 << 40), vdisk.errors.UnsupportedFeature),
], ids=["unknown-incompat-bit", "version-2", "version-0-and-bit"])
def test_newest_slot_with_unsupported_features_is_refused(tmp_path, name, changes, error):
    """Section 4.1: no fallback to the older slot when the current header is unsupported."""
    dst = _copy_with_header(tmp_path, name, **changes)
    with pytest.raises(error):
        vdisk.open(dst, read_only=True).close()


def test_nonzero_dedup_fields_in_the_only_slot_are_corruption(tmp_path):
    """Section 4.5: the dedup fields MUST be zero in version 1."""
    for field in ("dedup_table_offset", "dedup_table_length", "dedup_table_checksum"):
        dst = _copy_with_header(tmp_path, "empty.vdk", **{field: 1})
        with pytest.raises(vdisk.errors.CorruptImage, match="deduplication"):
            vdisk.open(dst, read_only=True).close()


def test_backing_name_without_format_in_the_only_slot_is_corruption(tmp_path):
    """Section 11.1: a backing name needs its format; the reader does not guess one."""
    dst = _copy_with_header(tmp_path, "empty.vdk", backing_name="base.vdk", backing_format="")
    with pytest.raises(vdisk.errors.CorruptImage, match="format"):
        vdisk.open(dst, read_only=True).close()


@pytest.mark.parametrize("changes,error,match", [
    (dict(dedup_table_checksum=1), vdisk.errors.CorruptImage, "deduplication"),
    (dict(backing_name="base.vdk", backing_format=""), vdisk.errors.CorruptImage, "format"),
    (dict(version=2, dedup_table_offset=0x5000), vdisk.errors.UnsupportedFeature, "version"),
    (dict(incompatible_features=1 << 3, dedup_table_offset=0x5000), vdisk.errors.UnsupportedFeature, "incompatible"),
], ids=["dedup", "name-no-format", "version-2-with-dedup", "unknown-bit-with-dedup"])
def test_newest_slot_failing_a_field_check_is_refused(tmp_path, changes, error, match):
    """Section 4.1: a checksum-valid newest slot is the current header; if its version,
    features or fields are wrong the image is refused, never opened at the older
    generation (whose clusters may have been reused: data.vdk's are)."""
    dst = _copy_with_header(tmp_path, "data.vdk", **changes)
    with pytest.raises(error, match=match):
        vdisk.open(dst, read_only=True).close()


@pytest.mark.parametrize("case", ["swap", "move", "odd-in-slot-0"])
def test_writer_alternates_from_the_slot_it_found(tmp_path, case):
    """Sections 4.1 and 13.2 step 8: the new header goes to the slot that does not hold the
    current header, whatever the parity of its generation; the current slot is untouched."""
    name = "empty.vdk" if case == "move" else "data.vdk"
    dst = str(tmp_path / name)
    with open(os.path.join(SAMPLES, name), "rb") as f:
        data = bytearray(f.read())
    s0, s1 = bytes(data[:4096]), bytes(data[4096:8192])
    if case == "swap":  # data.vdk: generation 4 (even) now in slot 1, 3 in slot 0
        data[:4096], data[4096:8192] = s1, s0
    elif case == "move":  # empty.vdk: its only header, generation 2, in slot 1; slot 0 empty
        data[:4096], data[4096:8192] = bytes(4096), s0
    else:  # data.vdk: the current header re-signed as generation 5 (odd) in slot 0
        h = C.Header.decode(s0).replace(generation=5)
        raw = h.encode()
        data[:4096] = raw + bytes(4096 - len(raw))
    with open(dst, "wb") as f:
        f.write(data)
    (gen, cur), = [max(_slot_gens(data))]
    other = 4096 - cur
    digest = hashlib.sha256(SpecReader(dst).guest()).hexdigest()
    assert digest == _sample_digest(name)
    current_bytes = bytes(data[cur:cur + 4096])
    with vdisk.open(dst) as img:
        assert img.driver.header.generation == gen
        img.write(0, b"first commit" * 10)
        img.flush()
        with open(dst, "rb") as f:
            head = f.read(8192)
        assert head[cur:cur + 4096] == current_bytes, "the current header was overwritten"
        assert max(_slot_gens(head)) == (gen + 1, other)
        img.write(4096, b"second commit" * 10)
        img.flush()
        with open(dst, "rb") as f:
            head = f.read(8192)
        assert sorted(_slot_gens(head)) == sorted([(gen + 1, other), (gen + 2, cur)])
    reader = SpecReader(dst)
    assert reader.slot == cur and reader.h["generation"] == gen + 2
    assert reader.refcounts_stored() == reader.refcounts_expected()
    with vdisk.open(dst, read_only=True) as img:
        assert img.driver.header.generation == gen + 2
        assert img.read(0, 120) == b"first commit" * 10 and img.read(4096, 130) == b"second commit" * 10
        assert hashlib.sha256(img.read(0, img.size)).digest() == hashlib.sha256(reader.guest()).digest()
        res = img.check()
        assert not res.corruptions and not res.leaks


def test_cluster_bits_out_of_range(tmp_path):
    dst = _copy_with_header(tmp_path, "empty.vdk", cluster_bits=200)
    with pytest.raises(vdisk.errors.CorruptImage):
        vdisk.open(dst, read_only=True).close()


@pytest.mark.parametrize("level", [127, 23, -8, -128])
def test_compression_level_out_of_range(tmp_path, level):
    dst = _copy_with_header(tmp_path, "empty.vdk", compression_level=level)
    with pytest.raises(vdisk.errors.CorruptImage, match="compression level"):
        vdisk.open(dst, read_only=True).close()


@pytest.mark.parametrize("level", [-7, 0, 19, 22])
def test_compression_level_in_range(tmp_path, level):
    dst = _copy_with_header(tmp_path, "compressed.vdk", compression_level=level)
    with vdisk.open(dst, read_only=True) as img:
        assert _digest(img) == _sample_digest("compressed.vdk")


def test_cluster_bits_just_out_of_range_is_corruption(tmp_path):
    for cbits in (11, 22):
        dst = _copy_with_header(tmp_path, "empty.vdk", cluster_bits=cbits)
        with pytest.raises(vdisk.errors.CorruptImage, match="cluster_bits"):
            vdisk.open(dst, read_only=True).close()


def test_virtual_size_past_the_implementation_limit_is_unsupported(tmp_path):
    """Section 17: the L1 limit is an implementation limit (1 TiB with 4 KiB clusters)."""
    vsize = (1 << 40) + 4096
    dst = _copy_with_header(tmp_path, "empty.vdk", virtual_size=vsize,
                            l1_entries=C.l1_entries_for(vsize, 12))
    with pytest.raises(vdisk.errors.UnsupportedFeature):
        vdisk.open(dst, read_only=True).close()


def _resign_tree(data: bytearray, slot: int, l1_index: int, l2_index: int, **entry) -> None:
    """Change one L2 entry of the live tree and recompute every checksum up to the header."""
    h = C.Header.decode(bytes(data[slot:slot + 4096]))
    cs = h.cluster_size
    l1 = bytearray(data[h.l1_offset:h.l1_offset + h.l1_entries * 16])
    l2_off, _ = struct.unpack_from("<QQ", l1, l1_index * 16)
    l2 = bytearray(data[l2_off:l2_off + cs])
    e = C.L2Entry.decode(bytes(l2), l2_index)
    e = C.L2Entry(**{**e.__dict__, **entry})
    l2[l2_index * 32:(l2_index + 1) * 32] = e.encode()
    data[l2_off:l2_off + cs] = l2
    struct.pack_into("<Q", l1, l1_index * 16 + 8, xxhash.xxh3_64_intdigest(bytes(l2)))
    data[h.l1_offset:h.l1_offset + len(l1)] = l1
    raw = h.replace(l1_checksum=xxhash.xxh3_64_intdigest(bytes(l1))).encode()
    data[slot:slot + 4096] = raw + bytes(4096 - len(raw))


def test_bytes_after_a_zstd_frame_are_corruption(tmp_path):
    """Section 8: the stored bytes MUST be exactly one frame with nothing after it."""
    dst = str(tmp_path / "compressed.vdk")
    with open(os.path.join(SAMPLES, "compressed.vdk"), "rb") as f:
        data = bytearray(f.read())
    reader = SpecReader(os.path.join(SAMPLES, "compressed.vdk"))
    h = reader.h
    (l2_off, l2_sum), *_ = reader.l1(h["l1_offset"], h["l1_entries"], h["l1_checksum"], h["virtual_size"])
    entries = reader.l2(l2_off, l2_sum, 0, h["virtual_size"])
    j, (_t, host, length, _s, _b) = next((j, e) for j, e in enumerate(entries) if e[0] == 3)
    longer = length + 3  # the frame plus three bytes that follow it
    assert longer < reader.cs and host + longer <= reader.limit
    _resign_tree(data, reader.slot, 0, j, stored_length=longer,
                 checksum=xxhash.xxh3_64_intdigest(bytes(data[host:host + longer])))
    with open(dst, "wb") as f:
        f.write(data)
    with vdisk.open(dst, read_only=True) as img:
        with pytest.raises(vdisk.errors.CorruptImage):
            img.read(j * reader.cs, reader.cs)


def test_current_header_failing_a_check_is_not_skipped(tmp_path):
    """Section 4.1: step-2 checks apply to the current header; no fallback to the older slot."""
    dst = _copy_with_header(tmp_path, "data.vdk", compression_type=9)
    with pytest.raises(vdisk.errors.CorruptImage, match="compression type"):
        vdisk.open(dst, read_only=True).close()


def test_torn_header_write_falls_back_to_the_previous_generation(tmp_path, monkeypatch):
    """Section 13.4: a crash that tears the header write of generation g+1 leaves generation g
    intact.  The state just before that header write is the state after the commit minus
    the hole punching of step 10 and with the new slot damaged."""
    from vdisk.drivers.vdk import VdkDriver

    dst = str(tmp_path / "data.vdk")
    with open(os.path.join(SAMPLES, "data.vdk"), "rb") as f:
        original = f.read()
    with open(dst, "wb") as f:
        f.write(original)
    before = hashlib.sha256(SpecReader(dst).guest()).hexdigest()
    monkeypatch.setattr(VdkDriver, "_punch", lambda self, clusters: None)  # step 10 never ran
    with vdisk.open(dst) as img:
        gen = img.driver.header.generation
        img.write(0, b"new data that never became durable" * 200)
        img.write_zeroes(600 << 10, 8192)
        img.flush()
        assert img.driver.header.generation == gen + 1
    with open(dst, "r+b") as f:
        (newest, off), = [max(_slot_gens(f.read(8192)))]
        assert newest == gen + 1
        f.seek(off + 100)
        f.write(bytes(4096 - 100))  # the header write stopped after 100 bytes
    with vdisk.open(dst, read_only=True) as img:
        assert img.driver.header.generation == gen
        res = img.check()
        # section 13.4: the abandoned transaction's clusters lie past the old host area,
        # which check reports as leaked space (section 16), never as corruption
        assert not res.corruptions and all("past the end of the host area" in m for m in res.leaks)
        h = hashlib.sha256()
        h.update(img.read(0, img.size))
    assert h.hexdigest() == before == [d for d, _s, n, snap in _manifest() if n == "data.vdk" and not snap][0]


def test_hexdump_examples_match_the_samples():
    """Every ``<!-- hexdump: FILE OFFSET LENGTH -->`` block shows the sample's real bytes."""
    lines = _spec_text().splitlines()
    found = 0
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!--\s*hexdump:\s*(\S+)\s+(\d+)\s+(\d+)\s*-->", line.strip())
        if not m:
            continue
        name, start, length = m.group(1), int(m.group(2)), int(m.group(3))
        assert lines[i + 1].startswith("```")
        shown = bytearray()
        for row in lines[i + 2:]:
            if row.startswith("```"):
                break
            addr, _, rest = row.partition("  ")
            assert int(addr, 16) == start + len(shown), f"hexdump of {name}: row {addr} out of order"
            shown += bytes.fromhex(" ".join(re.findall(r"\b[0-9a-f]{2}\b", rest.split("   ")[0])))
        with open(os.path.join(SAMPLES, name), "rb") as f:
            f.seek(start)
            assert bytes(shown) == f.read(length), f"hexdump of {name} does not match the file"
        found += 1
    assert found, "the spec has no hexdump example"


def test_header_rewritten_after_a_failed_header_write_goes_to_the_same_slot(tmp_path):
    """Section 13.2: after a failure in step 8 the writer writes the same header g + 1
    again to the same slot; the slot holding g is never touched, and the header after
    that goes to g's slot."""
    dst = str(tmp_path / "data.vdk")
    with open(os.path.join(SAMPLES, "data.vdk"), "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)
    (gen, cur), = [max(_slot_gens(data))]
    other = 4096 - cur
    with vdisk.open(dst) as img:
        host = img.driver.host
        real = host.pwrite
        calls = []

        def failing(off, buf, *a, **kw):
            if off < 8192 and not calls:
                calls.append(off)
                real(off, bytes(buf)[:100], *a, **kw)  # torn, then an error
                raise OSError(5, "injected header write failure")
            return real(off, buf, *a, **kw)

        host.pwrite = failing
        img.write(0, b"x" * 4096)
        with pytest.raises(OSError):
            img.flush()
        assert calls == [other]
        with open(dst, "rb") as f:
            assert f.read(8192)[cur:cur + 4096] == data[cur:cur + 4096]
        img.flush()  # re-issues generation gen + 1, to the same slot
        with open(dst, "rb") as f:
            head = f.read(8192)
        assert head[cur:cur + 4096] == data[cur:cur + 4096]
        assert max(_slot_gens(head)) == (gen + 1, other)
        img.write(4096, b"y" * 4096)
        img.flush()
        with open(dst, "rb") as f:
            head = f.read(8192)
        assert sorted(_slot_gens(head)) == sorted([(gen + 1, other), (gen + 2, cur)])
    with vdisk.open(dst, read_only=True) as img:
        assert img.read(0, 4096) == b"x" * 4096 and img.read(4096, 4096) == b"y" * 4096
        res = img.check()
        assert not res.corruptions and not res.leaks
