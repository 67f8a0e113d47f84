"""Generate a corpus of malformed images from valid ones, by patching exact fields.

``python tests/hostile/gen.py DIR`` writes the corpus into DIR and a ``cases.json``
describing each file; ``generate(dir)`` does the same from Python and returns the cases.

Every case starts from a valid image made here (known guest content) and changes named
fields (offsets from ``vdisk.codec.vdk``: ``HEADER_FIELDS``, ``SNAPSHOT_FIELDS``, the L1/L2/
refcount entry structs).  When the point is to get past a checksum, the checksum chain is
re-signed: data -> L2 entry -> L2 table -> L1 entry -> L1 table -> header -> header checksum.
Header cases patch the newest slot and blank the older one, so that falling back to the
older generation (which is legitimate) cannot hide the damage.

A case says what must happen (``tests/test_hostile.py`` enforces it):
  open   "fail": opening (read-only, with the format named) must raise a VdiskError subclass
         "any":  opening may succeed
  read   "fail": reading the whole disk must raise (if the open succeeded)
         "any":  reading may succeed, but then must return the original guest bytes
         "raw":  reading must return the raw bytes of a named file (``raw_of``)
         "skip": the read cannot know (metadata that only ``check`` can judge)
  check  True: ``check`` must refuse (raise, or report corruption); False: not applicable
  error  the VdiskError class name expected first (optional)
  bug    the name of an open bug this case shows (see tests/test_found_bugs.py)
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from dataclasses import asdict, dataclass, field

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from vdisk.block import Image
from vdisk.codec import vdk as C
from vdisk.drivers.base import BackingRef, CreateOptions
from vdisk.drivers.vdk import VdkDriver
from vdisk.host import HostFile

SIZE = 1 << 20
CS = 4096


@dataclass
class Case:
    name: str
    file: str
    why: str
    format: str = "vdk"
    open: str = "any"
    read: str = "any"
    check: bool = True
    error: str | None = None
    content: str | None = None  # file holding the expected guest bytes
    raw_of: str | None = None
    rw_open: str = "any"  # "fail": opening read-write must be refused
    bug: str | None = None  # an open bug (tests/test_found_bugs.py) makes this case fail today
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- valid images
def make_valid(path: str, *, compression: str | None = None, snapshot: bool = True, seed: int = 1,
               backing: BackingRef | None = None, size: int = SIZE) -> bytes:
    """Create a vdk image with data in several L2 ranges (and a snapshot); returns its guest bytes."""
    rng = random.Random(seed)
    host = HostFile(path, create=True, lock=None)
    VdkDriver.create(host, size, CreateOptions(cluster_size=CS, compression=compression, backing=backing))
    host.close()
    img = Image(VdkDriver.open(HostFile(path, lock=None), read_only=False), path, None)
    content = bytearray(size)
    for off, n in ((0, 3 * CS), (5 * CS + 100, 2 * CS), (600 * 1024, 4 * CS), (size - 2 * CS, 2 * CS)):
        if off + n > size:
            continue
        if compression:
            data = (rng.randbytes(8) * (n // 8 + 1))[:n]
        else:
            data = rng.randbytes(n)
        img.write(off, data)
        content[off:off + n] = data
    if snapshot:
        img.snapshot_create("snap1")
        img.write(CS, b"after-snapshot" * 100)
        content[CS:CS + 1400] = b"after-snapshot" * 100
    img.close()
    return bytes(content)


# ----------------------------------------------------------------------------- patching
class VdkFile:
    """A vdk image in memory, with helpers to patch fields and re-sign checksums."""

    def __init__(self, data: bytes):
        self.b = bytearray(data)
        self.slot = self._newest_slot()

    def _newest_slot(self) -> int:
        best, gen = 0, -1
        for off in C.SLOT_OFFSETS:
            try:
                h = C.Header.decode(bytes(self.b[off:off + C.SLOT_SIZE]))
            except Exception:
                continue
            if h.generation > gen:
                best, gen = off, h.generation
        return best

    # header
    def hget(self, name: str) -> int:
        off, size = C.HEADER_FIELDS[name]
        return int.from_bytes(self.b[self.slot + off:self.slot + off + size], "little")

    def hset(self, name: str, value, *, resign: bool = True) -> "VdkFile":
        off, size = C.HEADER_FIELDS[name]
        raw = value if isinstance(value, bytes) else (value % (1 << (8 * size))).to_bytes(size, "little")
        self.b[self.slot + off:self.slot + off + size] = raw
        if resign:
            self.resign_header()
        return self

    def header_length(self) -> int:
        return self.hget("header_length")

    def resign_header(self, length: int | None = None) -> None:
        n = length or self.header_length()
        if not C.HEADER_FIXED + 8 <= n <= C.SLOT_SIZE:
            n = self._orig_len
        s = self.slot
        self.b[s + n - 8:s + n] = struct.pack("<Q", C.checksum(bytes(self.b[s:s + n - 8])))

    def blank_other_slot(self) -> "VdkFile":
        other = C.SLOT_OFFSETS[1] if self.slot == C.SLOT_OFFSETS[0] else C.SLOT_OFFSETS[0]
        self.b[other:other + C.SLOT_SIZE] = bytes(C.SLOT_SIZE)
        return self

    @property
    def _orig_len(self) -> int:
        return 200  # a valid header without names is 200 bytes

    # L1
    def l1(self) -> list[tuple[int, int]]:
        off, n = self.hget("l1_offset"), self.hget("l1_entries")
        return [C.L1_ENTRY.unpack_from(self.b, off + i * 16) for i in range(n)]

    def set_l1(self, i: int, l2_off: int | None = None, l2_sum: int | None = None, *, resign: bool = True):
        off, n = self.hget("l1_offset"), self.hget("l1_entries")
        o, s = C.L1_ENTRY.unpack_from(self.b, off + i * 16)
        C.L1_ENTRY.pack_into(self.b, off + i * 16, o if l2_off is None else l2_off, s if l2_sum is None else l2_sum)
        if resign:
            self.hset("l1_checksum", C.checksum(bytes(self.b[off:off + n * 16])))

    # L2
    def l2_entries(self):
        """(l1 index, entry index, absolute offset of the entry, L2Entry) of every non-empty entry."""
        out = []
        for i, (o, _s) in enumerate(self.l1()):
            if not o:
                continue
            for j in range(CS // C.L2_ENTRY_SIZE):
                e = C.L2Entry.decode(self.b[o:o + CS], j)
                if e.kind != C.T_UNALLOCATED:
                    out.append((i, j, o + j * C.L2_ENTRY_SIZE, e))
        return out

    def first_entry(self, kind: int):
        for item in self.l2_entries():
            if item[3].kind == kind:
                return item
        raise LookupError(f"no L2 entry of kind {kind}")

    def set_l2_raw(self, i: int, j: int, desc: int, length: int, codec: int, csum: int, birth: int = 1,
                   *, resign: bool = True):
        o = self.l1()[i][0]
        C.L2_ENTRY.pack_into(self.b, o + j * C.L2_ENTRY_SIZE, desc, length, codec, csum, birth)
        if resign:
            self.resign_l2(i)

    def resign_l2(self, i: int):
        o = self.l1()[i][0]
        self.set_l1(i, l2_sum=C.checksum(bytes(self.b[o:o + CS])))

    # refcounts
    def rt(self) -> list[tuple[int, int]]:
        off, n = self.hget("refcount_table_offset"), self.hget("refcount_table_entries")
        return [C.RT_ENTRY.unpack_from(self.b, off + i * 16) for i in range(n)]

    def set_refcount(self, cluster: int, value: int):
        per = CS // 4
        blk_off, _ = self.rt()[cluster // per]
        struct.pack_into("<I", self.b, blk_off + (cluster % per) * 4, value)
        rt_off, n = self.hget("refcount_table_offset"), self.hget("refcount_table_entries")
        C.RT_ENTRY.pack_into(self.b, rt_off + (cluster // per) * 16, blk_off, C.checksum(bytes(self.b[blk_off:blk_off + CS])))
        self.hset("refcount_table_checksum", C.checksum(bytes(self.b[rt_off:rt_off + n * 16])))

    # snapshot table
    def snap_table(self) -> tuple[int, int]:
        return self.hget("snapshot_table_offset"), self.hget("snapshot_table_length")

    def set_snap_field(self, name: str, value: int, record: int = 0, *, resign: bool = True):
        off, _ln = self.snap_table()
        assert record == 0
        foff, size = C.SNAPSHOT_FIELDS[name]
        self.b[off + foff:off + foff + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
        if resign:
            self.resign_snap_table()

    def resign_snap_table(self, length: int | None = None):
        off, ln = self.snap_table()
        self.hset("snapshot_table_checksum", C.checksum(bytes(self.b[off:off + (length or ln)])))

    def bytes(self) -> bytes:
        return bytes(self.b)


def zstd_claiming(content_size: int) -> bytes:
    """A 17-byte zstd frame: single segment, 8-byte Frame_Content_Size, one raw block of 1 byte."""
    return struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", content_size) + bytes([9, 0, 0]) + b"x"


# ----------------------------------------------------------------------------- corpus
def generate(outdir: str) -> list[Case]:
    os.makedirs(outdir, exist_ok=True)
    cases: list[Case] = []

    def valid(name, **kw) -> tuple[bytes, str]:
        path = os.path.join(outdir, name)
        content = make_valid(path, **kw)
        cpath = path + ".content"
        with open(cpath, "wb") as f:
            f.write(content)
        with open(path, "rb") as f:
            return f.read(), os.path.basename(cpath)

    base, base_content = valid("valid.vdk")
    comp, comp_content = valid("valid-zstd.vdk", compression="zstd", seed=2)

    def add(name: str, why: str, data: bytes, content: str = base_content, **kw) -> None:
        fname = f"{name}.vdk"
        with open(os.path.join(outdir, fname), "wb") as f:
            f.write(data)
        cases.append(Case(name, fname, why, content=content, **kw))

    def hdr(name, why, error=None, blank=True, **fields):
        v = VdkFile(base)
        for k, val in fields.items():
            v.hset(k, val)
        if blank:
            v.blank_other_slot()
        add(name, why, v.bytes(), open="fail", error=error)

    # --- header
    v = VdkFile(base).blank_other_slot()
    v.b[v.slot:v.slot + 8] = b"\x89QCW\r\n\x1a\n"
    add("bad-magic", "magic is not vdk's (opened with -f vdk)", v.bytes(), open="fail", error="CorruptImage")
    hdr("version-2", "version from the future", "UnsupportedFeature", version=2)
    hdr("version-0", "version 0 never existed", "UnsupportedFeature", version=0)
    hdr("incompat-unknown-bit", "unknown incompatible feature bit 5", "UnsupportedFeature", incompatible_features=1 << 5)
    hdr("incompat-bit-63", "unknown incompatible feature bit 63", "UnsupportedFeature", incompatible_features=1 << 63)
    v = VdkFile(base).blank_other_slot()
    v.hset("header_length", 8192, resign=False)
    add("header-length-huge", "header_length 8192 > slot size", v.bytes(), open="fail", error="CorruptImage")
    v = VdkFile(base).blank_other_slot()
    v.hset("header_length", 4294967295, resign=False)
    add("header-length-max", "header_length 2^32-1", v.bytes(), open="fail", error="CorruptImage")
    v = VdkFile(base).blank_other_slot()
    v.hset("header_length", 100, resign=False)
    add("header-length-short", "header_length shorter than the fixed header", v.bytes(), open="fail")
    v = VdkFile(base).blank_other_slot()
    v.hset("virtual_size", SIZE * 2, resign=False)
    add("header-checksum", "header changed without re-signing", v.bytes(), open="fail", error="CorruptImage")
    hdr("cluster-bits-11", "cluster_bits below 12", "CorruptImage", cluster_bits=11)
    hdr("cluster-bits-22", "cluster_bits above 21", "CorruptImage", cluster_bits=22)
    hdr("cluster-bits-max", "cluster_bits 2^32-1", "CorruptImage", cluster_bits=0xFFFFFFFF)
    hdr("compression-type-7", "unknown compression type", "CorruptImage", compression_type=7)
    hdr("virtual-size-2^63", "virtual size 2^63", "CorruptImage", virtual_size=1 << 63)
    # a virtual size whose L1 table would be 2^32-1 entries (64 GiB of L1): count x entry size
    hdr("l1-entries-overflow", "l1_entries 2^32-1 with a matching virtual size (64 GiB L1)", "UnsupportedFeature",
        virtual_size=(2**32 - 1) * CS * (CS // 32), l1_entries=2**32 - 1)
    hdr("l1-entries-mismatch", "l1_entries does not match the virtual size", "CorruptImage", l1_entries=7)
    hdr("l1-beyond-eof", "L1 table offset past the end of the file", "CorruptImage", l1_offset=1 << 40)
    hdr("l1-unaligned", "L1 table offset not cluster-aligned", "CorruptImage", l1_offset=VdkFile(base).hget("l1_offset") + 8)
    hdr("l1-in-header", "L1 table offset inside the header area", "CorruptImage", l1_offset=0)
    hdr("l1-past-2^56", "L1 table offset past 2^56", "CorruptImage", l1_offset=(1 << 56) + 8192)
    hdr("l1-checksum", "L1 checksum does not match the table", "CorruptImage", l1_checksum=12345)
    hdr("host-clusters-huge", "host_clusters far beyond the file size", "CorruptImage", host_clusters=1 << 50)
    hdr("host-clusters-zero", "host_clusters smaller than the header area", "CorruptImage", host_clusters=1)
    hdr("snapshot-count-huge", "snapshot_count 2^32-1", "CorruptImage", snapshot_count=2**32 - 1)
    hdr("snapshot-count-65536", "snapshot_count 65536 with a one-record table", "CorruptImage", snapshot_count=65536)
    hdr("snapshot-table-length-huge", "snapshot table length 2^32-1", "CorruptImage", snapshot_table_length=2**32 - 1)
    hdr("snapshot-table-beyond-eof", "snapshot table past the end of the file", "CorruptImage",
        snapshot_table_offset=1 << 45)
    hdr("snapshot-table-checksum", "snapshot table checksum wrong", "CorruptImage", snapshot_table_checksum=1)
    hdr("snapshot-table-empty-offset", "no snapshots but a table offset", "CorruptImage", snapshot_count=0)
    hdr("next-snapshot-id-low", "next snapshot id below an existing id", "CorruptImage", next_snapshot_id=1)
    hdr("next-snapshot-id-huge", "next snapshot id 2^64-1", "CorruptImage", next_snapshot_id=2**64 - 1)
    # refcount damage: reads need no refcounts, so only read-write opens and check refuse
    for name, why, fields in (
        ("refcount-table-zero", "refcount table of zero entries", {"refcount_table_entries": 0}),
        ("refcount-table-huge", "refcount table of 2^32-1 entries", {"refcount_table_entries": 2**32 - 1}),
        ("refcount-table-beyond-eof", "refcount table past the end of the file", {"refcount_table_offset": 1 << 44}),
        ("refcount-table-checksum", "refcount table checksum wrong", {"refcount_table_checksum": 99}),
    ):
        v = VdkFile(base)
        for k, val in fields.items():
            v.hset(k, val)
        v.blank_other_slot()
        add(name, why, v.bytes(), rw_open="fail")
    # backing reference in the header
    v = VdkFile(base).blank_other_slot()
    v.hset("backing_name_length", 2000)
    add("backing-name-too-long", "backing name length 2000 > 1024", v.bytes(), open="fail", error="CorruptImage")
    v = VdkFile(base).blank_other_slot()
    v.hset("backing_name_length", 3000 + 1, resign=False)
    v.hset("backing_format_length", 3)
    add("backing-name-past-header", "backing name runs past the header length", v.bytes(), open="fail")

    def with_tail(name, why, tail_name: bytes, tail_fmt: bytes, error="CorruptImage", open_="fail", **kw):
        v = VdkFile(base).blank_other_slot()
        s = v.slot
        pos = s + C.HEADER_FIXED
        # the base has no backing reference, so its image id (identity feature) follows the fixed part
        (incompat,) = struct.unpack_from("<Q", v.b, s + 24)
        iid = bytes(v.b[pos:pos + C.IMAGE_ID_SIZE]) if incompat & C.INCOMPAT_IDENTITY else b""
        tail = tail_name + tail_fmt + iid
        length = (C.HEADER_FIXED + len(tail) + 7) // 8 * 8 + 8
        v.b[pos:pos + length - C.HEADER_FIXED - 8] = tail + bytes(length - C.HEADER_FIXED - 8 - len(tail))
        v.hset("backing_name_length", len(tail_name), resign=False)
        v.hset("backing_format_length", len(tail_fmt), resign=False)
        v.hset("header_length", length, resign=False)
        v.resign_header(length)
        add(name, why, v.bytes(), open=open_, error=error, **kw)

    with_tail("backing-name-nul", "backing name contains NUL", b"base\0.vdk", b"vdk")
    with_tail("backing-name-not-utf8", "backing name is not UTF-8", b"\xff\xfe.vdk", b"vdk")
    with_tail("backing-format-unknown", "backing format qcow9", b"valid.vdk", b"qcow9", error="UnsupportedFeature", check=False)
    with_tail("backing-etc-passwd", "backing file /etc/passwd as raw", b"/etc/passwd", b"raw", error="BackingError", check=False)
    with_tail("backing-dotdot-passwd", "backing file ../../../../../../etc/passwd as raw",
              b"../../../../../../../../etc/passwd", b"raw", error="BackingError", check=False)
    with_tail("backing-missing", "backing file does not exist", b"no-such-file.vdk", b"vdk", error="BackingError", check=False)
    with_tail("backing-self", "backing file is the image itself", b"backing-self.vdk", b"vdk", error="BackingError", check=False)

    # --- L1 entries
    def l1case(name, why, l2_off, error="CorruptImage"):
        v = VdkFile(base)
        v.set_l1(0, l2_off=l2_off)
        add(name, why, v.bytes(), open="fail", error=error)

    l1case("l1-entry-unaligned", "L1 entry not cluster-aligned", VdkFile(base).l1()[0][0] + 16)
    l1case("l1-entry-beyond-eof", "L1 entry past the end of the file", 1 << 40)
    l1case("l1-entry-past-2^56", "L1 entry past 2^56", 1 << 57)
    l1case("l1-entry-in-header", "L1 entry pointing into the header", 4096)
    # an L1 entry that points at a refcount block, with a matching checksum: overlapping metadata
    v = VdkFile(base)
    blk = v.rt()[0][0]
    v.set_l1(0, l2_off=blk, l2_sum=C.checksum(bytes(v.b[blk:blk + CS])))
    add("l1-entry-overlaps-refcount", "L2 table overlapping a refcount block (checksums re-signed)", v.bytes(),
        read="fail")
    # L2 checksum mismatch (table changed, L1 not re-signed)
    v = VdkFile(base)
    i, j, pos, e = v.first_entry(C.T_DATA)
    v.b[pos + 20] ^= 0xFF
    add("l2-checksum", "L2 table does not match its checksum in L1", v.bytes(), read="fail")

    # --- L2 entries (re-signed up to the header)
    def l2case(name, why, src=base, content=base_content, kind=C.T_DATA, read="fail", **changes):
        v = VdkFile(src)
        i, j, pos, e = v.first_entry(kind)
        desc = changes.pop("desc", C.make_desc(e.kind, e.host_offset))
        v.set_l2_raw(i, j, desc, changes.pop("length", e.stored_length), changes.pop("codec", e.codec),
                     changes.pop("csum", e.checksum), e.birth)
        add(name, why, v.bytes(), content=content, read=read)

    e0 = VdkFile(base).first_entry(C.T_DATA)[3]
    l2case("l2-data-unaligned", "data cluster offset not aligned", desc=C.make_desc(C.T_DATA, e0.host_offset + 512))
    l2case("l2-data-beyond-eof", "data cluster past the end of the file", desc=C.make_desc(C.T_DATA, 1 << 40))
    l2case("l2-data-in-header", "data cluster inside the header", desc=C.make_desc(C.T_DATA, 0))
    l2case("l2-reserved-bits", "reserved descriptor bits set", desc=(1 << 62) | C.make_desc(C.T_DATA, e0.host_offset))
    l2case("l2-unknown-type", "L2 entry type 5", desc=(5 << 56) | e0.host_offset)
    l2case("l2-type-15-offset-2^56", "offset bits beyond 2^56 (type nibble 0xF)", desc=(0xF << 56) | e0.host_offset)
    l2case("l2-data-length", "data cluster with stored length 100", length=100)
    l2case("l2-zero-with-offset", "zero entry carrying an offset", desc=C.make_desc(C.T_ZERO, e0.host_offset))
    # an L2 entry mapping a cluster beyond the virtual size (last L2 table, last entry beyond size)
    v = VdkFile(base)
    v.hset("virtual_size", SIZE - 8 * CS)  # entries for the last 8 clusters now map past the end
    add("l2-maps-past-disk-end", "virtual size shrunk under mapped clusters (re-signed)", v.bytes(), read="fail",
        content=base_content, extra={"compare_prefix": SIZE - 8 * CS})
    # data checksum mismatch
    v = VdkFile(base)
    i, j, pos, e = v.first_entry(C.T_DATA)
    v.b[e.host_offset + 77] ^= 0x55
    add("data-checksum", "one data byte flipped", v.bytes(), read="fail", error="ChecksumMismatch")
    # two L2 entries sharing one data cluster (refcount 1): reads cannot know, check must
    v = VdkFile(base)
    ents = [x for x in v.l2_entries() if x[3].kind == C.T_DATA]
    (i1, j1, _p1, e1), (i2, j2, _p2, _e2) = ents[0], ents[5]
    v.set_l2_raw(i2, j2, C.make_desc(C.T_DATA, e1.host_offset), e1.stored_length, 0, e1.checksum, e1.birth)
    add("l2-overlapping-data", "two L2 entries point at the same data cluster (refcount 1)", v.bytes(), read="skip")
    # refcount too low for a used cluster (re-signed): only check can tell; read-write would reuse it
    v = VdkFile(base)
    v.set_refcount(e0.host_offset // CS, 0)
    add("refcount-zero-in-use", "a data cluster in use has refcount 0 (re-signed)", v.bytes(), read="any")

    # --- compressed clusters
    ce = VdkFile(comp).first_entry(C.T_COMPRESSED)[3]
    l2case("comp-length-zero", "compressed length 0", comp, comp_content, C.T_COMPRESSED, length=0)
    l2case("comp-length-cluster", "compressed length = cluster size", comp, comp_content, C.T_COMPRESSED, length=CS)
    l2case("comp-length-huge", "compressed length 2^32-1", comp, comp_content, C.T_COMPRESSED, length=2**32 - 1)
    l2case("comp-crosses-cluster", "compressed data crossing a cluster boundary", comp, comp_content, C.T_COMPRESSED,
           desc=C.make_desc(C.T_COMPRESSED, (ce.host_offset // CS) * CS + CS - 10), length=100)
    l2case("comp-unknown-codec", "compressed with codec 9", comp, comp_content, C.T_COMPRESSED, codec=9)
    l2case("comp-beyond-eof", "compressed data past the end of the file", comp, comp_content, C.T_COMPRESSED,
           desc=C.make_desc(C.T_COMPRESSED, 1 << 40))

    def comp_payload(name, why, payload: bytes, error="CorruptImage", bug=None):
        v = VdkFile(comp)
        i, j, pos, e = v.first_entry(C.T_COMPRESSED)
        # put the payload in a fresh cluster appended at the end; grow host_clusters to cover it
        hc = v.hget("host_clusters")
        newoff = hc * CS
        v.b.extend(bytes(newoff + CS - len(v.b)))
        v.b[newoff:newoff + len(payload)] = payload
        v.set_l2_raw(i, j, C.make_desc(C.T_COMPRESSED, newoff), len(payload), C.COMPRESSION_ZSTD,
                     C.checksum(payload), e.birth)
        v.hset("host_clusters", hc + 1)
        add(name, why, v.bytes(), content=comp_content, read="fail", error=error, bug=bug)

    import zstandard

    comp_payload("comp-garbage", "compressed bytes that are not zstd (checksum re-signed)", b"\x28\xb5\x2f\xfdgarbage" * 20)
    comp_payload("comp-wrong-size", "zstd frame of 100 bytes instead of a cluster",
                 zstandard.ZstdCompressor().compress(b"x" * 100))
    # a zstd bomb: a small frame claiming (and decompressing to) 64 MiB
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    if len(bomb) < CS:
        comp_payload("comp-bomb", "zstd frame that decompresses to 64 MiB", bomb)
    # 17 bytes of zstd frame whose header claims a 1 TiB / 3 GiB content size
    comp_payload("comp-bomb-header-1t", "zstd frame header claiming 1 TiB of content", zstd_claiming(1 << 40),
                 bug="vdk-zstd-content-size")
    comp_payload("comp-bomb-header-3g", "zstd frame header claiming 3 GiB of content", zstd_claiming(3 << 30),
                 bug="vdk-zstd-content-size")
    v = VdkFile(comp)
    i, j, pos, e = v.first_entry(C.T_COMPRESSED)
    v.b[e.host_offset + 3] ^= 0x01
    add("comp-data-checksum", "compressed bytes flipped", v.bytes(), content=comp_content, read="fail",
        error="ChecksumMismatch")

    # --- snapshot table records (re-signed)
    def snapcase(name, why, field_, value, error="CorruptImage", **kw):
        v = VdkFile(base)
        v.set_snap_field(field_, value)
        kw.setdefault("open", "fail")
        add(name, why, v.bytes(), error=error, **kw)

    snapcase("snap-name-length-zero", "snapshot name length 0", "name_length", 0)
    snapcase("snap-name-length-huge", "snapshot name length 65535", "name_length", 65535)
    snapcase("snap-unknown-flags", "snapshot with unknown flags", "flags", 1 << 7, error="UnsupportedFeature")
    snapcase("snap-id-too-big", "snapshot id >= next snapshot id", "id", 1000)
    snapcase("snap-size-huge", "snapshot virtual size 2^63", "virtual_size", 1 << 63)
    snapcase("snap-l1-beyond-eof", "snapshot L1 past the end of the file", "l1_offset", 1 << 40, open="any",
             extra={"snapshot": "snap1"})
    snapcase("snap-l1-entries-huge", "snapshot L1 of 2^32-1 entries", "l1_entries", 2**32 - 1, open="any",
             extra={"snapshot": "snap1"}, bug="vdk-check-huge-snapshot-l1")
    v = VdkFile(base)
    off, ln = v.snap_table()
    v.b[off + ln - 1] ^= 0xFF  # inside the name padding or name
    add("snap-table-bitflip", "snapshot table byte flipped (not re-signed)", v.bytes(), open="fail",
        error="CorruptImage")

    # --- truncated files
    for name, cut in (("truncated-half", len(base) // 2), ("truncated-one-slot", 4096), ("truncated-empty", 0),
                      ("truncated-last-byte", len(base) - 1)):
        add(name, f"file cut to {cut} bytes", base[:cut], open="fail", error="CorruptImage")

    # --- chains
    chain_cases(outdir, cases, base_content)
    # --- qcow2
    qcow2_cases(outdir, cases)
    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump([asdict(c) for c in cases], f, indent=1)
    return cases


def chain_cases(outdir: str, cases: list[Case], base_content: str) -> None:
    def overlay(path, backing_name, backing_fmt, size=SIZE):
        host = HostFile(path, create=True, lock=None)
        VdkDriver.create(host, size, CreateOptions(cluster_size=CS, backing=BackingRef(backing_name, backing_fmt)))
        host.close()

    # A -> B -> A
    overlay(os.path.join(outdir, "loop-a.vdk"), "loop-b.vdk", "vdk")
    overlay(os.path.join(outdir, "loop-b.vdk"), "loop-a.vdk", "vdk")
    cases.append(Case("backing-loop", "loop-a.vdk", "backing chain A -> B -> A", open="fail", check=False,
                      error="BackingError"))
    # over-long chain: 65 images (64 are allowed)
    d = os.path.join(outdir, "chain65")
    os.makedirs(d, exist_ok=True)
    host = HostFile(os.path.join(d, "c0.vdk"), create=True, lock=None)
    VdkDriver.create(host, SIZE, CreateOptions(cluster_size=CS))
    host.close()
    for k in range(1, 65):
        overlay(os.path.join(d, f"c{k}.vdk"), f"c{k - 1}.vdk", "vdk")
    cases.append(Case("chain-65-deep", "chain65/c64.vdk", "backing chain of 65 images", open="fail", check=False,
                      error="BackingError"))
    cases.append(Case("chain-64-deep-ok", "chain65/c63.vdk", "backing chain of 64 images: allowed", open="any",
                      check=False, read="zeros"))
    # a symlink in the image's directory that points at /etc/passwd, named as a raw backing file
    link = os.path.join(outdir, "passwd-link.raw")
    if not os.path.lexists(link):
        os.symlink("/etc/passwd", link)
    overlay(os.path.join(outdir, "backing-symlink-passwd.vdk"), "passwd-link.raw", "raw")
    cases.append(Case("backing-symlink-passwd", "backing-symlink-passwd.vdk",
                      "backing file is a symlink to /etc/passwd", open="fail", check=False, error="BackingError"))
    # a raw file that holds a vdk image, used as a backing file with format raw: never probed
    raw = os.path.join(outdir, "looks-like-vdk.raw")
    make_valid(raw, snapshot=False, seed=9)
    overlay(os.path.join(outdir, "raw-with-magic.vdk"), "looks-like-vdk.raw", "raw", size=os.path.getsize(raw))
    cases.append(Case("raw-backing-with-vdk-magic", "raw-with-magic.vdk",
                      "raw backing file that contains a vdk image: must read as raw bytes", read="raw",
                      raw_of="looks-like-vdk.raw", check=False))


# ----------------------------------------------------------------------------- qcow2
# header field -> (offset, size), big-endian (QEMU docs/interop/qcow2.txt)
Q_FIELDS = {
    "magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8), "incompatible_features": (72, 8),
    "compatible_features": (80, 8), "autoclear_features": (88, 8), "refcount_order": (96, 4),
    "header_length": (100, 4), "compression_type": (104, 1),
}


class Q2File:
    def __init__(self, data: bytes):
        self.b = bytearray(data)

    def get(self, name: str) -> int:
        off, size = Q_FIELDS[name]
        return int.from_bytes(self.b[off:off + size], "big")

    def set(self, name: str, value: int) -> "Q2File":
        off, size = Q_FIELDS[name]
        self.b[off:off + size] = (value % (1 << (8 * size))).to_bytes(size, "big")
        return self

    def cluster_size(self) -> int:
        return 1 << self.get("cluster_bits")

    def l1(self) -> list[int]:
        off = self.get("l1_table_offset")
        return [int.from_bytes(self.b[off + 8 * i:off + 8 * i + 8], "big") for i in range(self.get("l1_size"))]

    def set_l1(self, i: int, value: int) -> None:
        off = self.get("l1_table_offset")
        self.b[off + 8 * i:off + 8 * i + 8] = value.to_bytes(8, "big")

    def l2_entries(self):
        """(absolute offset of the entry, raw value) of every non-zero L2 entry."""
        out = []
        cs = self.cluster_size()
        for e in self.l1():
            o = e & 0x00FFFFFFFFFFFE00
            if not o:
                continue
            for j in range(cs // 8):
                v = int.from_bytes(self.b[o + 8 * j:o + 8 * j + 8], "big")
                if v:
                    out.append((o + 8 * j, v))
        return out

    def set_at(self, pos: int, value: int) -> None:
        self.b[pos:pos + 8] = (value % (1 << 64)).to_bytes(8, "big")


def make_valid_qcow2(path: str, *, compression: str | None = None, seed: int = 3) -> bytes:
    from vdisk.drivers import get_driver

    drv = get_driver("qcow2")
    rng = random.Random(seed)
    host = HostFile(path, create=True, lock=None)
    drv.create(host, SIZE, CreateOptions(cluster_size=CS, compression=compression))
    host.close()
    img = Image(drv.open(HostFile(path, lock=None), read_only=False), path, None)
    content = bytearray(SIZE)
    for off, n in ((0, 3 * CS), (5 * CS, 2 * CS), (600 * 1024, 4 * CS)):
        data = (rng.randbytes(8) * (n // 8 + 1))[:n] if compression else rng.randbytes(n)
        img.write(off, data)
        content[off:off + n] = data
    img.snapshot_create("snap1")
    img.write(CS, b"after-snapshot" * 100)
    content[CS:CS + 1400] = b"after-snapshot" * 100
    img.close()
    return bytes(content)


def qcow2_cases(outdir: str, cases: list[Case]) -> None:
    def valid(name, **kw):
        path = os.path.join(outdir, name)
        content = make_valid_qcow2(path, **kw)
        with open(path + ".content", "wb") as f:
            f.write(content)
        with open(path, "rb") as f:
            return f.read(), name + ".content"

    base, base_content = valid("valid.qcow2")
    comp, comp_content = valid("valid-zlib.qcow2", compression="zlib", seed=4)

    def add(name, why, data, content=base_content, **kw):
        fname = f"{name}.qcow2"
        with open(os.path.join(outdir, fname), "wb") as f:
            f.write(data)
        cases.append(Case(name, fname, why, format="qcow2", content=content, **kw))

    def hdr(name, why, error=None, src=None, **fields):
        q = Q2File(src or base)
        for k, v in fields.items():
            q.set(k, v)
        add(name, why, bytes(q.b), open="fail", error=error)

    q = Q2File(base)
    hdr("q-bad-magic", "magic is not qcow2's", "CorruptImage", magic=0x51464900)
    hdr("q-version-1", "qcow version 1", "UnsupportedFeature", version=1)
    hdr("q-version-4", "qcow2 version 4", "UnsupportedFeature", version=4)
    hdr("q-incompat-unknown", "unknown incompatible feature bit 20", "UnsupportedFeature",
        incompatible_features=q.get("incompatible_features") | 1 << 20)
    hdr("q-cluster-bits-8", "cluster_bits 8", None, cluster_bits=8)
    hdr("q-cluster-bits-22", "cluster_bits 22", None, cluster_bits=22)
    hdr("q-cluster-bits-max", "cluster_bits 2^32-1", None, cluster_bits=2**32 - 1)
    hdr("q-crypt-aes", "crypt_method 1 (AES)", "UnsupportedFeature", crypt_method=1)
    hdr("q-l1-beyond-eof", "L1 table past the end of the file", None, l1_table_offset=1 << 40)
    hdr("q-l1-unaligned", "L1 table offset not cluster-aligned", None, l1_table_offset=q.get("l1_table_offset") + 8)
    hdr("q-l1-size-huge", "l1_size 2^31 (16 GiB of L1)", None, l1_size=2**31)
    hdr("q-l1-size-too-small", "l1_size too small for the virtual size", None, l1_size=0)
    hdr("q-size-huge", "virtual size 2^63", None, size=2**63)
    hdr("q-refcount-order-7", "refcount_order 7 (128-bit refcounts)", None, refcount_order=7)
    hdr("q-header-length-huge", "header_length 2^32-8", None, header_length=2**32 - 8)
    hdr("q-header-length-short", "header_length 16", None, header_length=16)
    hdr("q-nb-snapshots-huge", "nb_snapshots 2^32-1", None, nb_snapshots=2**32 - 1)
    hdr("q-snapshots-beyond-eof", "snapshot table past the end of the file", None, snapshots_offset=1 << 40)
    hdr("q-backing-beyond-eof", "backing file name past the end of the header cluster", None,
        backing_file_offset=1 << 40, backing_file_size=100)
    hdr("q-backing-name-huge", "backing file name length 2^32-1", None, backing_file_offset=512,
        backing_file_size=2**32 - 1)
    hdr("q-compression-type-9", "compression type 9 with the compression bit", None,
        incompatible_features=q.get("incompatible_features") | 1 << 3, compression_type=9)
    hdr("q-data-file", "external data file bit without a data file", None,
        incompatible_features=q.get("incompatible_features") | 1 << 2)
    for name, why, fields in (
        ("q-refcount-table-zero", "refcount table of zero clusters", {"refcount_table_clusters": 0}),
        ("q-refcount-table-huge", "refcount table of 2^32-1 clusters", {"refcount_table_clusters": 2**32 - 1}),
        ("q-refcount-table-beyond-eof", "refcount table past the end of the file", {"refcount_table_offset": 1 << 40}),
    ):
        q = Q2File(base)
        for k, v in fields.items():
            q.set(k, v)
        add(name, why, bytes(q.b), rw_open="fail")
    # L1 / L2 entries (qcow2 has no checksums: patch directly)
    q = Q2File(base)
    first = q.l1()[0]
    q.set_l1(0, (first & ~0x00FFFFFFFFFFFE00) | (1 << 40))
    add("q-l1-entry-beyond-eof", "L1 entry past the end of the file", bytes(q.b), read="fail")
    q = Q2File(base)
    q.set_l1(0, first + 512)
    add("q-l1-entry-unaligned", "L1 entry not cluster-aligned", bytes(q.b), read="fail")
    pos, v = Q2File(base).l2_entries()[0]
    for name, why, val, bug in (
        ("q-l2-beyond-eof", "data cluster past the end of the file", (v & ~0x00FFFFFFFFFFFE00) | (1 << 40),
         "qcow2-data-beyond-eof"),
        ("q-l2-unaligned", "data cluster offset not aligned", v + 512, None),
        ("q-l2-reserved-bits", "reserved L2 bit 60 set", v | (1 << 60), "qcow2-l2-reserved-bits"),
    ):
        q = Q2File(base)
        q.set_at(pos, val)
        add(name, why, bytes(q.b), read="fail" if name != "q-l2-reserved-bits" else "any", bug=bug)
    # compressed entries
    qc = Q2File(comp)
    cents = [(p, v) for p, v in qc.l2_entries() if v & (1 << 62)]
    if cents:
        cpos, cv = cents[0]
        x = 62 - (12 - 8)
        for name, why, val in (
            ("q-comp-beyond-eof", "compressed data past the end of the file", (1 << 62) | (1 << 40)),
            ("q-comp-sectors-max", "compressed sector count at its maximum past EOF",
             (1 << 62) | (((1 << (12 - 8)) - 1) << x) | (len(comp) - 512)),
            ("q-comp-garbage", "compressed entry pointing at the L1 table (not deflate)",
             (1 << 62) | qc.get("l1_table_offset")),
        ):
            q = Q2File(comp)
            q.set_at(cpos, val)
            add(name, why, bytes(q.b), content=comp_content, read="fail")
    for name, cut in (("q-truncated-half", len(base) // 2), ("q-truncated-header", 50)):
        add(name, f"qcow2 file cut to {cut} bytes", base[:cut], read="fail" if cut > 4096 else "any",
            open="fail" if cut <= 4096 else "any")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus"
    cs = generate(out)
    print(f"{len(cs)} cases written to {out}")
