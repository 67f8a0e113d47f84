"""Byte layouts of a pool (``formats/pool.md``): bytes <-> values, no I/O.

All integers are little-endian.  Hashes are xxh3 (64 or 128 bits) of the bytes named,
stored as little-endian integers.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

import xxhash

from ..errors import CorruptImage
from . import zstd as zcodec

BLOCK = 4096  # the pool's block: the unit of mapping, dedup and compression
FANOUT = 512  # entries per tree node
LEVELS = 4  # tree levels (3 interior + leaves): 512**4 blocks = 256 TiB
MAX_BLOCKS = FANOUT ** LEVELS
ZERO_BLOCK = bytes(BLOCK)

# entry kinds (formats/pool.md 5.1)
UNALLOCATED, ZERO, RAW, ZSTD, DELTA, NODE, SKETCH = range(7)
DATA_KINDS = (RAW, ZSTD, DELTA)
KIND_NAMES = {UNALLOCATED: "unallocated", ZERO: "zero", RAW: "raw", ZSTD: "zstd", DELTA: "delta",
              NODE: "node", SKETCH: "sketch"}

# ------------------------------------------------------------------ entries
ENTRY = struct.Struct("<QQIHBB")  # hash, pack, offset, length, kind, flags
ENTRY_SIZE = ENTRY.size  # 24
NODE_BYTES = FANOUT * ENTRY_SIZE  # 12288
EMPTY_ENTRY = bytes(ENTRY_SIZE)
MAX_BLOB = 65535


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one block (or node, or sketch) is: its content hash and its blob."""

    hash: int  # data: low 64 bits of xxh3-128 of the block; node/sketch: xxh3-64 of the decoded bytes
    pack: int  # the pack object's number; 0 for UNALLOCATED and ZERO
    offset: int  # byte offset of the blob in the pack
    length: int  # stored bytes of the blob
    kind: int

    def pack_bytes(self) -> bytes:
        return ENTRY.pack(self.hash, self.pack, self.offset, self.length, self.kind, 0)

    @property
    def loc(self) -> tuple[int, int]:
        return (self.pack, self.offset)

    def to_json(self) -> list:
        return [f"{self.pack:016x}", self.offset, self.length, self.kind, f"{self.hash:016x}"]

    @classmethod
    def from_json(cls, v, what: str) -> Entry:
        try:
            pack, off, length, kind, h = v
            if not (_is_hex64(pack) and _is_hex64(h) and _is_uint(off, 32) and _is_uint(length, 16)
                    and _is_uint(kind, 8)):
                raise ValueError
            e = cls(int(h, 16), int(pack, 16), off, length, kind)
        except (TypeError, ValueError):
            raise CorruptImage(f"{what}: bad blob reference {_shown(v)}") from None
        check_entry(e, what)
        return e


ZERO_ENTRY = Entry(0, 0, 0, 0, ZERO)
_HEX64 = re.compile(r"[0-9a-f]{1,16}")


def _is_hex64(v) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _is_uint(v, bits: int) -> bool:
    return type(v) is int and 0 <= v < (1 << bits)


def _shown(v) -> str:
    """A catalog value in an error message: one line, at most 80 characters."""
    text = ascii(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_entry(e: Entry, what: str) -> None:
    if e.kind > SKETCH:
        raise CorruptImage(f"{what}: unknown entry kind {e.kind}")
    if e.kind in (UNALLOCATED, ZERO):
        if e.pack or e.offset or e.length:
            raise CorruptImage(f"{what}: {KIND_NAMES[e.kind]} entry names a blob")
        return
    if e.pack == 0 or e.length == 0 or e.offset < PACK_HEADER.size or e.offset + e.length > MAX_PACK:
        raise CorruptImage(f"{what}: blob reference outside any pack ({e.pack:016x}+{e.offset}, {e.length})")


def unpack_entry(buf, index: int, what: str) -> Entry:
    h, pack, off, length, kind, flags = ENTRY.unpack_from(buf, index * ENTRY_SIZE)
    e = Entry(h, pack, off, length, kind)
    if flags or (kind != UNALLOCATED and kind != ZERO and kind > SKETCH):
        raise CorruptImage(f"{what}: entry {index} has unknown flags or kind")
    check_entry(e, what)
    return e


# ------------------------------------------------------------------ blobs
def compress(data: bytes, cctx) -> bytes:
    return cctx.compress(data)


def decompress(buf: bytes, expected: int, what: str) -> bytes:
    """One zstd frame stating ``expected`` as its content size (refused otherwise
    before anything is allocated), decoded to exactly that."""
    import zstandard

    try:
        size = zstandard.frame_content_size(buf)
    except zstandard.ZstdError:
        raise CorruptImage(f"{what}: not a zstd frame") from None
    if size != expected:
        raise CorruptImage(f"{what}: zstd frame of {size} bytes where {expected} are expected")
    try:
        out = zcodec._decompressor(zcodec.window_limit(expected)).decompress(buf)
    except zstandard.ZstdError as exc:
        raise CorruptImage(f"{what}: bad zstd data: {exc}") from None
    if len(out) != expected:
        raise CorruptImage(f"{what}: zstd frame decodes to {len(out)} bytes, not {expected}")
    return out


def xor_blocks(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(BLOCK, "little")


DELTA_HEAD = ENTRY_SIZE  # a delta blob starts with its base's entry


def block_hash(data: bytes) -> tuple[int, bytes]:
    """(the 64-bit entry hash, the 16-byte fingerprint) of one block."""
    d = xxhash.xxh3_128_digest(data)
    return int.from_bytes(d[8:], "big"), d


def entry_hash(data: bytes) -> int:
    return xxhash.xxh3_128_intdigest(data) & 0xFFFFFFFFFFFFFFFF


def meta_hash(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


# ------------------------------------------------------------------ packs
PACK_MAGIC = b"\x89VDKPACK"
PACK_HEADER = struct.Struct("<8sQ")  # magic, pack number
PACK_DIR_ENTRY = struct.Struct("<IHBBQ")  # offset, length, kind, 0, hash
PACK_FOOTER = struct.Struct("<IIQ8s")  # blob count, 0, xxh3-64 of the directory, magic
TARGET_PACK = 4 << 20  # a pack is sealed once it holds this much
MAX_PACK = 64 << 20  # no blob lies past this offset in a pack
MAX_PACK_BLOBS = MAX_PACK // 16


def pack_header(number: int) -> bytes:
    return PACK_HEADER.pack(PACK_MAGIC, number)


def pack_trailer(blobs: list[tuple[int, int, int, int]]) -> bytes:
    """The directory and footer that end a pack: (offset, length, kind, hash) per blob."""
    d = b"".join(PACK_DIR_ENTRY.pack(o, n, k, 0, h) for o, n, k, h in blobs)
    return d + PACK_FOOTER.pack(len(blobs), 0, meta_hash(d), PACK_MAGIC)


def parse_pack_trailer(head: bytes, tail: bytes, size: int, number: int, what: str) -> list[tuple[int, int, int, int]]:
    """The blob directory of a pack, from its header and its last bytes (``tail`` must
    hold the footer and the directory: ``trailer_size`` tells how much)."""
    magic, num = PACK_HEADER.unpack_from(head)
    if magic != PACK_MAGIC or num != number:
        raise CorruptImage(f"{what}: not pack {number:016x} (bad header)")
    if len(tail) < PACK_FOOTER.size:
        raise CorruptImage(f"{what}: truncated pack")
    count, _, dhash, fmagic = PACK_FOOTER.unpack_from(tail, len(tail) - PACK_FOOTER.size)
    if fmagic != PACK_MAGIC or count > MAX_PACK_BLOBS:
        raise CorruptImage(f"{what}: bad pack footer")
    dlen = count * PACK_DIR_ENTRY.size
    if dlen + PACK_FOOTER.size > len(tail) or dlen + PACK_FOOTER.size + PACK_HEADER.size > size:
        raise CorruptImage(f"{what}: pack directory larger than the pack")
    d = tail[len(tail) - PACK_FOOTER.size - dlen: len(tail) - PACK_FOOTER.size]
    if meta_hash(d) != dhash:
        raise CorruptImage(f"{what}: pack directory checksum mismatch")
    out = []
    end_data = size - PACK_FOOTER.size - dlen
    for i in range(count):
        o, n, k, _, h = PACK_DIR_ENTRY.unpack_from(d, i * PACK_DIR_ENTRY.size)
        if o < PACK_HEADER.size or o + n > end_data or k not in (RAW, ZSTD, DELTA, NODE, SKETCH):
            raise CorruptImage(f"{what}: pack directory entry {i} is out of bounds")
        out.append((o, n, k, h))
    return out


# ------------------------------------------------------------------ index segments
SEG_MAGIC = b"\x89VDKSEG\n"
SEG_HEADER = struct.Struct("<8sIIQ")  # magic, kind, record size, record count
SEG_KEY = 16
SEG_RECORD = SEG_KEY + ENTRY_SIZE  # 40
SEG_PAGE = 256  # records per page; the summary holds each page's first key
SEG_FOOTER = struct.Struct("<QQ8s")  # xxh3-64 of the summary, 0, magic
SEG_FP, SEG_SF = 1, 2
MAX_SEG_RECORDS = 1 << 34


def encode_segment(kind: int, records: list[tuple[bytes, bytes]]) -> bytes:
    """A sorted run: header, records (16-byte key, 24-byte entry), the summary (the
    first key of every page of ``SEG_PAGE`` records), footer."""
    body = b"".join(k + v for k, v in records)
    summary = b"".join(records[i][0] for i in range(0, len(records), SEG_PAGE))
    return (SEG_HEADER.pack(SEG_MAGIC, kind, SEG_RECORD, len(records)) + body + summary
            + SEG_FOOTER.pack(meta_hash(summary), 0, SEG_MAGIC))


def segment_layout(head: bytes, size: int, what: str) -> tuple[int, int, int]:
    """(kind, record count, offset of the summary) from a segment's header, checked
    against its size."""
    if len(head) < SEG_HEADER.size or size < SEG_HEADER.size + SEG_FOOTER.size:
        raise CorruptImage(f"{what}: truncated index segment")
    magic, kind, rsize, count = SEG_HEADER.unpack_from(head)
    if magic != SEG_MAGIC or rsize != SEG_RECORD or kind not in (SEG_FP, SEG_SF) or count > MAX_SEG_RECORDS:
        raise CorruptImage(f"{what}: bad index segment header")
    pages = -(-count // SEG_PAGE)
    sum_off = SEG_HEADER.size + count * SEG_RECORD
    if sum_off + pages * SEG_KEY + SEG_FOOTER.size != size:
        raise CorruptImage(f"{what}: index segment size does not match its record count")
    return kind, count, sum_off


def check_summary(summary: bytes, footer: bytes, what: str) -> None:
    if len(footer) != SEG_FOOTER.size:
        raise CorruptImage(f"{what}: truncated index segment")
    h, _, magic = SEG_FOOTER.unpack(footer)
    if magic != SEG_MAGIC or meta_hash(summary) != h:
        raise CorruptImage(f"{what}: index segment summary checksum mismatch")


# ------------------------------------------------------------------ config and catalog
CONFIG_MAGIC = b"\x89VDKPOOL"
GEN_MAGIC = b"\x89VDKGEN\n"
OBJ_HEADER = struct.Struct("<8sIIQ")  # magic, version, 0, xxh3-64 of the JSON body
VERSION = 1
MAX_CATALOG = 256 << 20


def encode_json_object(magic: bytes, value: dict) -> bytes:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return OBJ_HEADER.pack(magic, VERSION, 0, meta_hash(body)) + body


def decode_json_object(magic: bytes, buf: bytes, what: str) -> dict:
    if len(buf) < OBJ_HEADER.size or len(buf) > MAX_CATALOG:
        raise CorruptImage(f"{what}: truncated or oversized object")
    m, version, _, h = OBJ_HEADER.unpack_from(buf)
    if m != magic:
        raise CorruptImage(f"{what}: bad magic")
    if version != VERSION:
        from ..errors import UnsupportedFeature

        raise UnsupportedFeature(f"{what}: pool format version {version} (this vdisk reads version {VERSION})")
    body = buf[OBJ_HEADER.size:]
    if meta_hash(body) != h:
        raise CorruptImage(f"{what}: checksum mismatch")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise CorruptImage(f"{what}: not valid JSON") from None
    if not isinstance(value, dict):
        raise CorruptImage(f"{what}: not a JSON object")
    return value


def check_config(conf: dict, what: str) -> None:
    """The config's fields that readers and writers use, checked once at open
    (section 6.1): another block size is another layout; the settings must be usable."""
    if not isinstance(conf.get("pool_id"), str):
        raise CorruptImage(f"{what}: no pool_id")
    bs = conf.get("block_size", BLOCK)
    if bs != BLOCK:
        from ..errors import UnsupportedFeature

        raise UnsupportedFeature(f"{what}: block size {_shown(bs)} (this vdisk reads pools of {BLOCK}-byte blocks)")
    st = conf.get("settings", {})
    if not isinstance(st, dict):
        raise CorruptImage(f"{what}: settings are not an object")
    for key in ("dedup", "delta"):
        if key in st and not isinstance(st[key], bool):
            raise CorruptImage(f"{what}: setting {key} is not true or false")
    if "zstd_level" in st and not (type(st["zstd_level"]) is int and -(1 << 17) <= st["zstd_level"] <= 22):
        raise CorruptImage(f"{what}: setting zstd_level {_shown(st['zstd_level'])} is not a zstd level")
    if st.get("compression", "zstd") != "zstd":
        raise CorruptImage(f"{what}: compression {_shown(st['compression'])} is not zstd")


MAX_IMAGE_SIZE = MAX_BLOCKS * BLOCK
_IMAGE_ID = re.compile(r"[0-9a-f]{1,64}")


def check_catalog(cat: dict, what: str) -> None:
    """Every field of a generation that vdisk reads has the type and range section 6.2
    gives it, so that no later use of it can fail other than with CorruptImage: image
    names (they become paths), ids (lock file names), sizes, references, snapshots
    (their names become paths and command-line arguments), holders, lineage, backing
    references, sketches and index segment lists.  Unknown fields are left alone."""
    from ..pool import IMAGE_NAME

    def bad(msg: str):
        raise CorruptImage(f"{what}: {msg}")

    images = cat.get("images")
    if not isinstance(images, dict):
        bad("has no image table")
    for key in ("fp_segments", "sf_segments"):
        segs = cat.get(key, [])
        if not isinstance(segs, list) or not all(isinstance(r, dict) for r in segs):
            bad(f"{key} is not a list of segment records")
    for name, rec in images.items():
        if not IMAGE_NAME.fullmatch(name):
            bad(f"image name {_shown(name)} is not a valid image name")
        where = f"image {name}"
        if not isinstance(rec, dict):
            bad(f"{where}: record is not an object")
        _check_state(rec, where, bad)
        if not isinstance(rec.get("id"), str) or not _IMAGE_ID.fullmatch(rec["id"]):
            bad(f"{where}: id {_shown(rec.get('id'))} is not hexadecimal")
        snaps = rec.get("snapshots", [])
        if not isinstance(snaps, list):
            bad(f"{where}: snapshots are not a list")
        if type(rec.get("next_snapshot_id", 1)) is not int:
            bad(f"{where}: next_snapshot_id is not an integer")
        par = rec.get("parent")
        if par is not None and not (isinstance(par, dict) and isinstance(par.get("image"), str)
                                    and type(par.get("snapshot")) is int):
            bad(f"{where}: parent {_shown(par)} is not an image and a snapshot id")
        bk = rec.get("backing")
        if bk is not None and not (isinstance(bk, dict) and isinstance(bk.get("filename"), str)
                                   and isinstance(bk.get("format"), str)
                                   and isinstance(bk.get("snapshot"), (str, type(None)))):
            bad(f"{where}: backing reference {_shown(bk)} is not a file name, format and snapshot")
        if not isinstance(rec.get("labels", {}), dict) or not isinstance(rec.get("owner"), (str, type(None))):
            bad(f"{where}: labels or owner of the wrong type")
        for s in snaps:
            if not isinstance(s, dict):
                bad(f"{where}: a snapshot record is not an object")
            if type(s.get("id")) is not int or s["id"] < 0:
                bad(f"{where}: snapshot id {_shown(s.get('id'))} is not a number")
            sname = s.get("name")
            if not _snapshot_name_ok(sname):
                bad(f"{where}: snapshot name {_shown(sname)} is not a valid snapshot name")
            _check_state(s, f"{where}: snapshot {sname}", bad)
            holders = s.get("holders", [])
            if not isinstance(holders, list) or not all(
                    isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in holders):
                bad(f"{where}: snapshot {sname}: holders are not [image id, name] pairs")
            if not isinstance(s.get("hidden", False), bool) or not isinstance(s.get("created", 0), (int, float)):
                bad(f"{where}: snapshot {sname}: hidden or created of the wrong type")


def _check_state(rec: dict, where: str, bad) -> None:
    """The fields an image and a snapshot share: size, root, sketch."""
    size = rec.get("size")
    if type(size) is not int or not 0 <= size <= MAX_IMAGE_SIZE:
        bad(f"{where}: size {_shown(size)} out of range")
    if rec.get("root") is not None:
        Entry.from_json(rec["root"], f"{where}: root")
    sk = rec.get("sketch")
    if sk is not None:
        if not (isinstance(sk, dict) and _is_uint(sk.get("bytes"), 32) and _is_uint(sk.get("shift"), 7)
                and sk["shift"] <= 64):
            bad(f"{where}: bad sketch reference {_shown(sk)}")
        Entry.from_json(sk.get("ref"), f"{where}: sketch")


def _snapshot_name_ok(name) -> bool:
    from ..drivers.names import validate_snapshot_name
    from ..errors import UsageError

    if not isinstance(name, str):
        return False
    try:
        validate_snapshot_name(name)
    except UsageError:
        return False
    return True


# ------------------------------------------------------------------ sketches
SKETCH_REC = struct.Struct("<QI")  # sampled hash, count


def encode_sketch(items: dict[int, int]) -> bytes:
    return b"".join(SKETCH_REC.pack(h, c) for h, c in sorted(items.items()))


def decode_sketch(buf: bytes, what: str) -> dict[int, int]:
    if len(buf) % SKETCH_REC.size:
        raise CorruptImage(f"{what}: bad sketch length")
    return {h: c for h, c in SKETCH_REC.iter_unpack(buf)}
