"""Generate a corpus of malformed VHDX images from valid ones, by patching exact fields.

``python tests/hostile/gen_vhdx.py DIR`` writes the corpus into DIR; ``generate(dir)``
does the same from Python and returns the cases (``gen.Case``, whose fields say what
must happen; ``tests/test_hostile_vhdx.py`` enforces them).

Every case starts from a valid image made by vdisk's own driver (known guest content)
and changes named fields (offsets from ``vdisk.codec.vhdx``: ``HEADER_FIELDS``,
``REGION_ENTRY_FIELDS``, ``METADATA_ENTRY_FIELDS``, ``LOG_HEADER_FIELDS``, ...).  When
the point is to get past a checksum, the structure is re-signed.  Header cases patch
the current header and re-sign it, so that it stays the one that counts.

Log cases write entries built from the specification (``vdisk.codec.vhdx.
encode_log_entry``) into the log region and name their GUID in the current header:
a valid sequence must be replayed (the expected content is computed here, from what
the entries write), an invalid one ignored, and a valid one that writes where a log
may not write refused.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import uuid

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gen import Case

from vdisk.block import Image
from vdisk.codec import vhdx as V
from vdisk.drivers.base import CreateOptions
from vdisk.drivers.vhdx import VhdxDriver
from vdisk.host import HostFile

SIZE = 6 << 20
BS = 1 << 20
MiB = 1 << 20
#: guest ranges the valid image holds data in (blocks 0, 2 and 5; 1, 3 and 4 unallocated)
DATA_RANGES = ((0, 300_000), (2 * MiB + 4096, 70_000), (5 * MiB + 1000, MiB - 1000))


def make_valid(path: str, *, size: int = SIZE, block_size: int = BS, subformat: str = "dynamic", seed: int = 1,
               ranges=DATA_RANGES) -> bytes:
    """Create a VHDX image with data in ``ranges``; returns its guest bytes (None
    for an image over 64 MiB, whose content no case compares)."""
    rng = random.Random(seed)
    host = HostFile(path, create=True, lock=None)
    VhdxDriver.create(host, size, CreateOptions(cluster_size=block_size, extra={"subformat": subformat}))
    host.close()
    img = Image(VhdxDriver.open(HostFile(path, lock=None), read_only=False), path, None)
    content = bytearray(size) if size <= 64 * MiB else None
    for off, n in ranges:
        data = rng.randbytes(n)
        img.write(off, data)
        if content is not None:
            content[off:off + n] = data
    img.close()
    return None if content is None else bytes(content)


class VhdxFile:
    """A VHDX image as a bytearray, with named-field access to its structures."""

    def __init__(self, data: bytes):
        self.b = bytearray(data)

    def bytes(self) -> bytes:
        return bytes(self.b)

    # headers
    def slot_seq(self, slot: int) -> int:
        return struct.unpack_from("<Q", self.b, V.HEADER_OFFSETS[slot] + 8)[0]

    @property
    def current(self) -> int:
        return 0 if self.slot_seq(0) > self.slot_seq(1) else 1

    def _put(self, base: int, fields: dict, name: str, value) -> None:
        off, fmt = fields[name]
        if isinstance(value, uuid.UUID):
            value = value.bytes_le
        struct.pack_into("<" + fmt, self.b, base + off, value)

    def hget(self, name: str, slot: int | None = None):
        off, fmt = V.HEADER_FIELDS[name]
        slot = self.current if slot is None else slot
        return struct.unpack_from("<" + fmt, self.b, V.HEADER_OFFSETS[slot] + off)[0]

    def hset(self, name: str, value, *, slot: int | None = None, resign: bool = True) -> VhdxFile:
        slot = self.current if slot is None else slot
        base = V.HEADER_OFFSETS[slot]
        self._put(base, V.HEADER_FIELDS, name, value)
        if resign:
            self.resign(base, V.HEADER_SIZE)
        return self

    def resign(self, base: int, length: int) -> None:
        buf = bytearray(self.b[base:base + length])
        self.b[base:base + length] = V.sign(buf)

    # region tables
    def regions(self, table: int = 0) -> list[V.Region]:
        off = V.REGION_TABLE_OFFSETS[table]
        return V.decode_region_table(bytes(self.b[off:off + V.REGION_TABLE_SIZE]), "region table")

    def region(self, guid: uuid.UUID) -> tuple[int, V.Region]:
        return next((i, r) for i, r in enumerate(self.regions()) if r.guid == guid)

    def rset(self, i: int, name: str, value, *, tables=(0, 1), resign: bool = True) -> VhdxFile:
        for t in tables:
            base = V.REGION_TABLE_OFFSETS[t]
            if name in V.REGION_FIELDS:
                self._put(base, V.REGION_FIELDS, name, value)
            else:
                self._put(base + 16 + 32 * i, V.REGION_ENTRY_FIELDS, name, value)
            if resign:
                self.resign(base, V.REGION_TABLE_SIZE)
        return self

    # metadata
    @property
    def meta_off(self) -> int:
        return self.region(V.REGION_METADATA)[1].file_offset

    def meta_entries(self) -> list[V.MetadataEntry]:
        return V.decode_metadata_table(bytes(self.b[self.meta_off:self.meta_off + V.METADATA_TABLE_SIZE]))

    def meta_index(self, item: uuid.UUID) -> int:
        return next(i for i, e in enumerate(self.meta_entries()) if e.item_id == item)

    def mset(self, i: int, name: str, value) -> VhdxFile:
        base = self.meta_off
        if name in V.METADATA_FIELDS:
            self._put(base, V.METADATA_FIELDS, name, value)
        else:
            self._put(base + 32 + 32 * i, V.METADATA_ENTRY_FIELDS, name, value)
        return self

    def item_set(self, item: uuid.UUID, data: bytes) -> VhdxFile:
        e = self.meta_entries()[self.meta_index(item)]
        pos = self.meta_off + e.offset
        self.b[pos:pos + len(data)] = data
        return self

    # BAT
    @property
    def bat_off(self) -> int:
        return self.region(V.REGION_BAT)[1].file_offset

    def bat(self, i: int) -> int:
        return struct.unpack_from("<Q", self.b, self.bat_off + 8 * i)[0]

    def set_bat(self, i: int, value: int) -> VhdxFile:
        struct.pack_into("<Q", self.b, self.bat_off + 8 * i, value)
        return self

    # log
    def add_log(self, entries: list[bytes], *, at: int = 0, log_guid: uuid.UUID) -> VhdxFile:
        """Write ``entries`` back to back from log offset ``at`` and name ``log_guid`` in the current header."""
        pos = self.hget("log_offset") + at
        for e in entries:
            self.b[pos:pos + len(e)] = e
            pos += len(e)
        return self.hset("log_guid", log_guid)


def make_differencing(outdir: str, name: str = "child.vhdx", parent: str = "parent.vhdx",
                      locator: dict | None = None) -> tuple[bytes, bytes]:
    """A differencing disk ``name`` on a dynamic ``parent`` (both made here, in
    ``outdir``), built from the spec on top of a vdisk-made dynamic disk: HasParent,
    a parent locator item, a BAT of whole chunks with a sector bitmap block.  Block
    0 fully present (own data), 1 partially present (sectors 8-15 and 1000-1023
    its own), 2 zero (hides the parent's data), 3 and 5 not present (the parent's),
    4 partially present (its last sector its own).  Returns (the child's bytes, the
    guest content of the chain)."""
    rng = random.Random(31)
    ppath = os.path.join(outdir, parent)
    pcontent = make_valid(ppath)
    with open(ppath, "rb") as f:
        pv = VhdxFile(f.read())
    cpath = os.path.join(outdir, name)
    host = HostFile(cpath, create=True, lock=None)
    VhdxDriver.create(host, SIZE, CreateOptions(cluster_size=BS))
    host.close()
    with open(cpath, "rb") as f:
        v = VhdxFile(f.read())
    os.unlink(cpath)
    v.item_set(V.META_FILE_PARAMETERS, struct.pack("<II", BS, 2))
    ents = v.meta_entries()
    pos = max(e.offset + e.length for e in ents)
    pos = -(-pos // 8) * 8
    dwg = uuid.UUID(bytes_le=bytes(pv.b[V.HEADER_OFFSETS[pv.current] + 32:V.HEADER_OFFSETS[pv.current] + 48]))
    loc = locator if locator is not None else {"parent_linkage": "{" + str(dwg) + "}",
                                               "relative_path": ".\\" + parent,
                                               "absolute_win32_path": "C:\\VMs\\" + parent}
    item = V.encode_parent_locator(V.LOCATOR_VHDX, loc)
    v.mset(len(ents), "item_id", V.META_PARENT_LOCATOR).mset(len(ents), "offset", pos)
    v.mset(len(ents), "length", len(item)).mset(len(ents), "flags", 4 | 2)
    v.mset(0, "entry_count", len(ents) + 1)
    v.b[v.meta_off + pos:v.meta_off + pos + len(item)] = item
    lss = 512
    ratio = V.chunk_ratio(BS, lss)
    content = bytearray(pcontent)
    end = len(v.b)
    blocks = {}
    for b in (0, 1, 4):
        blocks[b] = end
        end += BS
    sb_off = end
    end += MiB
    v.b.extend(bytes(end - len(v.b)))
    bitmap = bytearray(MiB)

    def own(block: int, sectors) -> None:
        for s in sectors:
            data = rng.randbytes(lss)
            o = blocks[block] + s * lss
            v.b[o:o + lss] = data
            g = block * BS + s * lss
            content[g:g + lss] = data
            bit = (block % ratio) * (BS // lss) + s
            bitmap[bit >> 3] |= 1 << (bit & 7)

    for s in range(BS // lss):  # block 0: all its own
        data = rng.randbytes(lss)
        o = blocks[0] + s * lss
        v.b[o:o + lss] = data
        content[s * lss:(s + 1) * lss] = data
    own(1, list(range(8, 16)) + list(range(1000, 1024)))
    own(4, [BS // lss - 1])
    v.b[sb_off:sb_off + MiB] = bitmap
    content[2 * BS:3 * BS] = bytes(BS)
    bo = v.bat_off
    v.b[bo:bo + 8 * (ratio + 1)] = bytes(8 * (ratio + 1))  # the BAT of one whole chunk
    v.set_bat(V.bat_index(0, ratio), V.make_bat_entry(V.PAYLOAD_FULLY_PRESENT, blocks[0]))
    v.set_bat(V.bat_index(1, ratio), V.make_bat_entry(V.PAYLOAD_PARTIALLY_PRESENT, blocks[1]))
    v.set_bat(V.bat_index(2, ratio), V.make_bat_entry(V.PAYLOAD_ZERO, 0))
    v.set_bat(V.bat_index(4, ratio), V.make_bat_entry(V.PAYLOAD_PARTIALLY_PRESENT, blocks[4]))
    v.set_bat(ratio, V.make_bat_entry(V.SB_PRESENT, sb_off))
    with open(cpath, "wb") as f:
        f.write(v.bytes())
    return v.bytes(), bytes(content)


LOG_GUID = uuid.UUID("6c6f6721-0000-4000-8000-766469736b21")


def log_entry(seq: int, writes, *, tail: int = 0, flushed: int = 0, last: int = 0, guid=LOG_GUID) -> bytes:
    return V.encode_log_entry(sequence_number=seq, log_guid=guid, tail=tail, flushed_file_offset=flushed,
                              last_file_offset=last, writes=writes)


def replay_case(data: bytes, content: bytes, *, grow: bool, seed: int = 7):
    """A log entry that changes the disk in three ways, and the content after replay:
    a data sector into an allocated block, zeros over part of another, and a BAT
    sector that allocates block 1 at a new 1 MiB at the end of the file, whose first
    sector the entry also writes.  With ``grow`` the file is first extended over the
    new block (as a writer does before it logs the allocation); without, only the
    entry's LastFileOffset names the new end, and replay must extend the file
    ([MS-VHDX], "Log Entry Header": LastFileOffset).  Returns (the image bytes, the entry's writes, the content
    after replay, the LastFileOffset)."""
    rng = random.Random(seed)
    v = VhdxFile(data)
    content = bytearray(content)
    writes = []
    st0, off0 = V.bat_entry(v.bat(0))
    st5, off5 = V.bat_entry(v.bat(5))
    assert st0 == st5 == V.PAYLOAD_FULLY_PRESENT
    sector = rng.randbytes(4096)
    writes.append((off0 + 8192, sector))
    content[8192:8192 + 4096] = sector
    writes.append((off5 + 65536, 3 * 4096))
    content[5 * MiB + 65536:5 * MiB + 65536 + 3 * 4096] = bytes(3 * 4096)
    new_block = -(-len(data) // MiB) * MiB
    bat_sector = bytearray(v.b[v.bat_off:v.bat_off + 4096])
    struct.pack_into("<Q", bat_sector, 8 * 1, V.make_bat_entry(V.PAYLOAD_FULLY_PRESENT, new_block))
    writes.append((v.bat_off, bytes(bat_sector)))
    first = rng.randbytes(4096)
    writes.append((new_block, first))
    content[MiB:MiB + 4096] = first
    content[MiB + 4096:2 * MiB] = bytes(MiB - 4096)
    if grow:
        data = data + bytes(new_block + MiB - len(data))
    return data, writes, bytes(content), new_block + MiB


def generate(outdir: str) -> list[Case]:
    os.makedirs(outdir, exist_ok=True)
    cases: list[Case] = []

    def valid(name, **kw) -> tuple[bytes, str]:
        path = os.path.join(outdir, name)
        content = make_valid(path, **kw)
        if content is not None:
            with open(path + ".content", "wb") as f:
                f.write(content)
        with open(path, "rb") as f:
            return f.read(), os.path.basename(path) + ".content" if content is not None else None

    base, base_content = valid("valid.vhdx")
    fixed, _ = valid("valid-fixed.vhdx", subformat="fixed", seed=2)

    def add(name: str, why: str, data: bytes, content: str | None = base_content, **kw) -> None:
        fname = f"{name}.vhdx"
        with open(os.path.join(outdir, fname), "wb") as f:
            f.write(data)
        if kw.get("open") == "fail":
            kw.setdefault("check", True)
        else:
            kw.setdefault("check", False)
        cases.append(Case(name, fname, why, format="vhdx", content=content, **kw))

    def refused(name, why, v: VhdxFile, error="CorruptImage"):
        add(name, why, v.bytes(), open="fail", error=error)

    def F(data=base) -> VhdxFile:
        return VhdxFile(data)

    # --- file type identifier and headers
    v = F()
    v.b[0:8] = b"vhdxfilf"
    refused("bad-file-signature", "file type identifier is not 'vhdxfile'", v)
    refused("truncated-512k", "file cut inside the header section", VhdxFile(base[:512 * 1024]))
    refused("truncated-3m", "file cut after the log (no metadata region)", VhdxFile(base[:3 * MiB]))
    v = F()
    v.hset("sequence_number", 99, slot=0, resign=False).hset("sequence_number", 99, slot=1, resign=False)
    refused("both-headers-bad-checksum", "both headers fail their CRC-32C", v)
    v = F()
    v.b[V.HEADER_OFFSETS[0]:V.HEADER_OFFSETS[0] + 4] = b"xxxx"
    v.b[V.HEADER_OFFSETS[1]:V.HEADER_OFFSETS[1] + 4] = b"xxxx"
    refused("both-headers-bad-signature", "neither header has the 'head' signature", v)
    v = F()
    cur = v.current
    v.hset("log_length", 7, slot=cur, resign=False)
    add("current-header-bad-checksum", "the newer header fails its CRC: the older one counts", v.bytes())
    v = F()
    v.hset("sequence_number", v.hget("sequence_number", 1 - v.current), slot=v.current)
    refused("headers-same-sequence", "both headers valid with the same sequence number", v)
    refused("header-version-2", "header version 2", F().hset("version", 2), "UnsupportedFeature")
    refused("header-version-0", "header version 0", F().hset("version", 0), "UnsupportedFeature")
    refused("log-version-1", "log version 1", F().hset("log_version", 1), "UnsupportedFeature")
    refused("log-offset-unaligned", "log offset not 1 MiB aligned", F().hset("log_offset", MiB + 4096))
    refused("log-offset-zero", "log inside the header section", F().hset("log_offset", 0))
    refused("log-past-eof", "log offset 2^60", F().hset("log_offset", 1 << 60))
    refused("log-length-huge", "log length 4 GiB - 1 MiB", F().hset("log_length", (1 << 32) - MiB))
    refused("log-length-unaligned", "log length not a multiple of 1 MiB", F().hset("log_length", MiB + 512))
    v = F().hset("sequence_number", 2**64 - 1)
    add("sequence-max", "current header's sequence number is 2^64-1 (reads work; a change cannot advance it)",
        v.bytes())

    # --- region table
    v = F()
    for t in (0, 1):
        v.b[V.REGION_TABLE_OFFSETS[t] + 40] ^= 1
    refused("region-tables-bad-checksum", "both region tables fail their CRC-32C", v)
    v = F()
    v.b[V.REGION_TABLE_OFFSETS[0] + 40] ^= 1
    add("region-table-1-bad", "region table 1 fails its CRC: table 2 counts", v.bytes())
    refused("region-count-huge", "region entry count 2^32-1", F().rset(0, "entry_count", 2**32 - 1))
    refused("region-count-2048", "region entry count 2048 (2047 fit)", F().rset(0, "entry_count", 2048))
    bi, bat_r = F().region(V.REGION_BAT)
    mi, meta_r = F().region(V.REGION_METADATA)
    unknown = uuid.UUID("01234567-89ab-4cde-8f01-23456789abcd")
    v = F().rset(bi, "guid", unknown).rset(bi, "required", 0)
    refused("region-bat-missing", "no BAT region (its GUID unknown, optional)", v)
    v = F().rset(bi, "guid", unknown).rset(bi, "required", 1)
    refused("region-unknown-required", "an unknown region marked required", v, "UnsupportedFeature")
    v = F().rset(0, "entry_count", 3).rset(2, "guid", unknown).rset(2, "file_offset", 1 << 50)
    v.rset(2, "length", 1 << 20)
    add("region-unknown-optional", "an unknown optional region (pointing anywhere) is ignored", v.bytes())
    v = F().rset(mi, "guid", V.REGION_BAT)
    refused("region-bat-twice", "the BAT region listed twice", v)
    refused("region-bat-past-eof", "BAT region at 2^50", F().rset(bi, "file_offset", 1 << 50))
    refused("region-bat-unaligned", "BAT region not 1 MiB aligned", F().rset(bi, "file_offset", bat_r.file_offset + 4096))
    refused("region-bat-length-zero", "BAT region of length 0", F().rset(bi, "length", 0))
    refused("region-bat-length-huge", "BAT region of 4 GiB - 1 MiB", F().rset(bi, "length", (1 << 32) - MiB))
    refused("region-bat-on-metadata", "BAT region overlaps the metadata region",
            F().rset(bi, "file_offset", meta_r.file_offset))
    refused("region-bat-on-log", "BAT region overlaps the log", F().rset(bi, "file_offset", MiB))
    refused("region-metadata-in-header", "metadata region inside the header section", F().rset(mi, "file_offset", 0))

    # --- metadata
    v = F()
    v.b[v.meta_off:v.meta_off + 8] = b"metadatX"
    refused("meta-bad-signature", "metadata table signature wrong", v)
    refused("meta-count-huge", "metadata entry count 65535", F().mset(0, "entry_count", 65535))
    vs = F().meta_index(V.META_VIRTUAL_DISK_SIZE)
    fp = F().meta_index(V.META_FILE_PARAMETERS)
    refused("meta-item-past-region", "an item at offset 2^32-1", F().mset(vs, "offset", 2**32 - 1))
    refused("meta-item-length-huge", "an item of length 2^32-1", F().mset(vs, "length", 2**32 - 1))
    refused("meta-item-in-table", "an item inside the metadata table", F().mset(vs, "offset", 0))
    refused("meta-items-overlap", "two items overlap", F().mset(vs, "offset", F().meta_entries()[fp].offset + 4))
    refused("meta-item-short", "virtual disk size item of 4 bytes", F().mset(vs, "length", 4))
    refused("meta-size-missing", "no virtual disk size item (its GUID unknown, optional)",
            F().mset(vs, "item_id", unknown).mset(vs, "flags", 0))
    refused("meta-unknown-required", "an unknown required item", F().mset(vs, "item_id", unknown), "UnsupportedFeature")
    refused("meta-item-twice", "the file parameters item listed twice", F().mset(vs, "item_id", V.META_FILE_PARAMETERS))
    for name, bs in (("block-size-3m", 3 * MiB), ("block-size-0", 0), ("block-size-512m", 512 * MiB),
                     ("block-size-max", 2**32 - 1)):
        refused(name, f"block size {bs}", F().item_set(V.META_FILE_PARAMETERS, struct.pack("<I", bs)))
    refused("has-parent-no-locator", "HasParent without a parent locator item",
            F().item_set(V.META_FILE_PARAMETERS, struct.pack("<II", BS, 2)))
    refused("logical-sector-1000", "logical sector size 1000",
            F().item_set(V.META_LOGICAL_SECTOR_SIZE, struct.pack("<I", 1000)))
    refused("physical-sector-0", "physical sector size 0",
            F().item_set(V.META_PHYSICAL_SECTOR_SIZE, struct.pack("<I", 0)))
    refused("virtual-size-2^63", "virtual size 2^63", F().item_set(V.META_VIRTUAL_DISK_SIZE, struct.pack("<Q", 1 << 63)))
    refused("virtual-size-odd", "virtual size not a multiple of the sector size",
            F().item_set(V.META_VIRTUAL_DISK_SIZE, struct.pack("<Q", SIZE + 1)))
    refused("virtual-size-bat-short", "virtual size 1 TiB: the 1 MiB BAT region is too short",
            F().item_set(V.META_VIRTUAL_DISK_SIZE, struct.pack("<Q", 1 << 40)))

    # --- BAT
    fully = V.PAYLOAD_FULLY_PRESENT
    refused("bat-past-eof", "a block at 2^50", F().set_bat(1, V.make_bat_entry(fully, 1 << 50)))
    refused("bat-in-header", "a block at offset 0", F().set_bat(1, V.make_bat_entry(fully, 0)))
    refused("bat-on-bat", "a block on the BAT region", F().set_bat(1, V.make_bat_entry(fully, bat_r.file_offset)))
    refused("bat-on-log", "a block on the log", F().set_bat(1, V.make_bat_entry(fully, MiB)))
    _, off0 = V.bat_entry(F().bat(0))
    refused("bat-same-block", "two blocks at one offset", F().set_bat(1, V.make_bat_entry(fully, off0)))
    refused("bat-state-5", "a payload state that does not exist", F().set_bat(1, 5))
    refused("bat-partially-present", "partially present without a parent", F().set_bat(0, V.make_bat_entry(V.PAYLOAD_PARTIALLY_PRESENT, off0)))
    refused("bat-offset-max", "a block at the largest offset", F().set_bat(1, 2**64 - 1 - 1))
    add("bat-reserved-bits", "reserved bits set in an entry (ignored)", F().set_bat(0, F().bat(0) | 0xFFF8).bytes())
    add("bat-zero-state", "a not-present block marked zero, with an offset (reads zeros)",
        F().set_bat(1, V.make_bat_entry(V.PAYLOAD_ZERO, 1 << 50)).bytes())
    v = VhdxFile(fixed)
    _, f1 = V.bat_entry(v.bat(1))
    refused("fixed-blocks-overlap", "a fixed disk whose blocks overlap", v.set_bat(2, V.make_bat_entry(fully, f1)))

    # --- differencing disks (the chain is opened: the parent lies beside the child)
    diff, diff_content = make_differencing(outdir, "diff-valid.vhdx", "diff-parent.vhdx")
    with open(os.path.join(outdir, "diff-valid.vhdx.content"), "wb") as f:
        f.write(diff_content)
    ci = VhdxFile(diff).meta_index(V.META_PARENT_LOCATOR)
    loc_off = VhdxFile(diff).meta_entries()[ci].offset

    def dadd(name, why, v: VhdxFile, **kw):
        kw.setdefault("extra", {"files": ["diff-parent.vhdx"]})
        add(name, why, v.bytes(), content=kw.pop("content", None), **kw)

    D = lambda: VhdxFile(diff)
    dadd("diff-ok", "a valid differencing disk on its parent", D(), content="diff-valid.vhdx.content",
         rw_open="fail", extra={"files": ["diff-parent.vhdx"]})
    ratio = V.chunk_ratio(BS, 512)
    dadd("diff-sb-state-3", "a sector bitmap entry with a payload state", D().set_bat(ratio, 3), open="fail",
         error="CorruptImage")
    dadd("diff-sb-past-eof", "the sector bitmap block past the end", D().set_bat(ratio, V.make_bat_entry(6, 1 << 45)),
         open="fail", error="CorruptImage")
    dadd("diff-sb-on-block", "the sector bitmap block on a payload block",
         D().set_bat(ratio, D().bat(0)), open="fail", error="CorruptImage")
    dadd("diff-partial-no-bitmap", "a partially present block, no sector bitmap", D().set_bat(ratio, 0),
         open="fail", error="CorruptImage")
    dadd("diff-tail-entry-used", "a BAT entry past the last block of the disk in use",
         D().set_bat(ratio - 1, V.make_bat_entry(V.PAYLOAD_ZERO, 0)), open="fail", error="CorruptImage")
    v = D()
    v.b[v.meta_off + loc_off:v.meta_off + loc_off + 16] = unknown.bytes_le
    dadd("diff-locator-type", "a parent locator of unknown type", v, open="fail", error="UnsupportedFeature")
    v = D()
    struct.pack_into("<H", v.b, v.meta_off + loc_off + 18, 60000)
    dadd("diff-locator-count-huge", "60000 locator entries in a small item", v, open="fail", error="CorruptImage")
    v = D()
    struct.pack_into("<I", v.b, v.meta_off + loc_off + 20, 2**32 - 1)
    dadd("diff-locator-key-outside", "a locator key offset outside the item", v, open="fail", error="CorruptImage")
    for name, why, loc, err in (
        ("diff-locator-absolute-only", "the parent named only by an absolute Windows path",
         {"absolute_win32_path": "C:\\VMs\\p.vhdx"}, "UnsupportedFeature"),
        ("diff-locator-etc-passwd", "relative_path climbing out of the directory",
         {"relative_path": "..\\..\\..\\..\\etc\\passwd"}, "BackingError"),
        ("diff-locator-drive", "relative_path that is a drive path", {"relative_path": "C:\\x.vhdx"}, "CorruptImage"),
        ("diff-locator-missing-parent", "the parent does not exist", {"relative_path": "nope.vhdx"}, "BackingError"),
        ("diff-locator-self", "the disk names itself as its parent",
         {"relative_path": "diff-locator-self.vhdx"}, "BackingError"),
    ):
        data, _ = make_differencing(outdir, f"{name}.vhdx", f"{name}-parent.vhdx", locator=loc)
        os.unlink(os.path.join(outdir, f"{name}.vhdx"))
        dadd(name, why, VhdxFile(data), open="fail", error=err, check=err not in ("BackingError",),
             extra={"files": [f"{name}-parent.vhdx"]})

    # --- log
    with open(os.path.join(outdir, base_content), "rb") as f:
        base_bytes = f.read()
    for name, grow in (("log-valid", True), ("log-extends-file", False)):
        data, writes, replayed, last = replay_case(base, base_bytes, grow=grow)
        with open(os.path.join(outdir, name + ".content"), "wb") as f:
            f.write(replayed)
        e = log_entry(5, writes, flushed=len(data) // MiB * MiB, last=last)
        add(name, "a valid one-entry log: replayed (in memory read-only)" if grow else
            "a valid entry whose LastFileOffset is past the end: replay extends the file",
            F(data).add_log([e], log_guid=LOG_GUID).bytes(), content=name + ".content")
        if grow:
            good = e
    bad = bytearray(good)
    bad[100] ^= 1
    add("log-bad-crc", "the only entry fails its CRC: nothing to replay",
        F().add_log([bytes(bad)], log_guid=LOG_GUID).bytes())
    add("log-other-guid", "the entry carries another log GUID: nothing to replay",
        F().add_log([good], log_guid=uuid.UUID(int=5)).bytes())
    # two entries: a valid one, then one whose tail names the first, then a torn one
    s_first = random.Random(9).randbytes(4096)
    e1 = log_entry(10, [(off0 + 4096, s_first)], flushed=len(base), last=len(base))
    e2 = bytearray(log_entry(11, [(off0 + 8192, bytes(4096))], tail=0, flushed=len(base), last=len(base)))
    e2[200] ^= 0xFF
    c2 = bytearray(base_bytes)
    c2[4096:8192] = s_first
    with open(os.path.join(outdir, "log-torn-second.content"), "wb") as f:
        f.write(c2)
    add("log-torn-second", "two entries, the second torn: the first is replayed",
        F().add_log([e1, bytes(e2)], log_guid=LOG_GUID).bytes(), content="log-torn-second.content")
    e3 = log_entry(12, [(off0 + 4096, s_first)], tail=8 * 4096, flushed=len(base), last=len(base))
    add("log-tail-elsewhere", "the entry's tail names a sector holding no entry: no valid sequence",
        F().add_log([e3], log_guid=LOG_GUID).bytes())
    for name, why, w, kw in (
        ("log-writes-header", "a valid entry writes over header 1", [(V.HEADER_OFFSETS[0], bytes(4096))], {}),
        ("log-writes-log", "a valid entry writes into the log itself", [(MiB + 65536, bytes(4096))], {}),
        ("log-zero-huge", "a valid entry zeroes 2^62 bytes", [(off0, 1 << 62)], {}),
        ("log-writes-past-end", "a valid entry writes past its LastFileOffset", [(1 << 45, bytes(4096))], {}),
        ("log-flushed-past-eof", "the entry was written when the file was larger (truncated since)",
         [(off0, bytes(4096))], {"flushed": 1 << 40}),
        ("log-grows-huge", "the entry's LastFileOffset is 2^62", [(off0, bytes(4096))], {"last": 1 << 62}),
    ):
        e = log_entry(20, w, flushed=kw.get("flushed", len(base)), last=kw.get("last", len(base)))
        refused(name, why, F().add_log([e], log_guid=LOG_GUID))
    bat_sector = bytearray(F().b[bat_r.file_offset:bat_r.file_offset + 4096])
    struct.pack_into("<Q", bat_sector, 8, V.make_bat_entry(fully, 1 << 44))
    e = log_entry(21, [(bat_r.file_offset, bytes(bat_sector))], flushed=len(base), last=len(base))
    refused("log-bat-past-eof", "a valid entry makes a BAT entry point past the end", F().add_log([e], log_guid=LOG_GUID))
    e = bytearray(log_entry(22, [(off0, 4096)], flushed=len(base), last=len(base)))
    struct.pack_into("<I", e, V.LOG_HEADER_FIELDS["descriptor_count"][0], 2**32 - 1)
    add("log-desc-count-huge", "descriptor count 2^32-1: the entry is invalid",
        F().add_log([bytes(V.sign(e))], log_guid=LOG_GUID).bytes())
    e = bytearray(log_entry(23, [(off0, 4096)], flushed=len(base), last=len(base)))
    e[64:68] = b"zerX"
    add("log-desc-bad-signature", "a descriptor with an unknown signature: the entry is invalid",
        F().add_log([bytes(V.sign(e))], log_guid=LOG_GUID).bytes())
    e = bytearray(log_entry(24, [(off0, 4096)], flushed=len(base), last=len(base)))
    struct.pack_into("<I", e, 8, 1 << 31)
    add("log-entry-length-huge", "entry length 2 GiB: the entry is invalid",
        F().add_log([bytes(V.sign(e))], log_guid=LOG_GUID).bytes())
    # every sector of the log a forged entry header claiming the whole log: bounded scan
    v = F()
    lo = v.hget("log_offset")
    forged = bytearray(4096)
    struct.pack_into("<4sIIIQII16sQQ", forged, 0, b"loge", 1, v.hget("log_length"), 0, 1, 0, 0, LOG_GUID.bytes_le, 0, 0)
    for s in range(v.hget("log_length") // 4096):
        v.b[lo + s * 4096:lo + (s + 1) * 4096] = forged
    add("log-forged-everywhere", "every log sector a forged header claiming the whole log: none is an entry "
        "(cheaply: no descriptors, yet 256 sectors long), nothing to replay", v.add_log([], log_guid=LOG_GUID).bytes())
    return cases


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "hostile-vhdx-corpus"
    cs = generate(out)
    print(f"{len(cs)} cases written to {out}")
