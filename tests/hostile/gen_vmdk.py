"""Generate a corpus of malformed VMDK images (and descriptor layouts) from valid ones.

``python tests/hostile/gen_vmdk.py DIR`` writes the corpus into DIR and a
``cases.json``; ``generate(dir)`` does the same from Python and returns the cases
(:class:`gen.Case`, whose fields say what must happen: see tests/hostile/gen.py).

Every case starts from a valid image made here with vdisk's own VMDK driver
(monolithicSparse with 64 KiB grains, streamOptimized, descriptor files with FLAT,
SPARSE and ZERO extents) and changes named fields: header fields at the offsets of
``vdisk.codec.vmdk.HEADER_FIELDS``, grain directory and grain table entries,
stream markers and compressed grains, descriptor lines, parent references.  Each
case that has files beside it (extents, parents) lives in a directory of its own,
so that the backing-file policy (the image's directory) applies to it alone.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import zlib
from dataclasses import asdict

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gen import Case

import vdisk
from vdisk.codec import vmdk as V

SIZE = 4 << 20
GRAIN = 65536
S = 512

# where the data of a valid image lies (guest offset, length)
WRITES = ((0, 3 * GRAIN), (GRAIN * 5 + 100, 2 * GRAIN), (1 << 20, 4 * GRAIN), (SIZE - 2 * GRAIN, 2 * GRAIN))


def make_sparse(path: str, seed: int = 1, **kw) -> bytes:
    """A monolithicSparse image with data in several grains; returns its guest bytes."""
    rng = random.Random(seed)
    vdisk.create(path, SIZE, format="vmdk", **kw)
    content = bytearray(SIZE)
    with vdisk.open(path, format="vmdk", unsafe_backing=True) as img:
        for off, n in WRITES:
            data = rng.randbytes(n)
            img.write(off, data)
            content[off:off + n] = data
        content = bytearray(img.read(0, SIZE))  # a child: what its parent shows through
    return bytes(content)


def make_stream(path: str, seed: int = 2) -> bytes:
    """A streamOptimized image written sequentially (compressible data); returns its guest bytes."""
    rng = random.Random(seed)
    vdisk.create(path, SIZE, format="vmdk", options={"subformat": "streamOptimized"})
    content = bytearray(SIZE)
    with vdisk.open(path, format="vmdk") as img:
        for k, (off, n) in enumerate(WRITES):  # the first grains incompressible, the rest not
            data = rng.randbytes(n) if k == 0 else (rng.randbytes(16) * (n // 16 + 1))[:n]
            content[off:off + n] = data
        for g in range(0, SIZE, GRAIN):
            chunk = bytes(content[g:g + GRAIN])
            if any(chunk):
                img.write(g, chunk)
    return bytes(content)


class Sparse:
    """Field access to a sparse extent file's bytes."""

    def __init__(self, data: bytes):
        self.b = bytearray(data)

    def h(self) -> V.SparseHeader:
        return V.decode_header(bytes(self.b[:512]))

    def hset(self, name: str, value: int, at: int = 0) -> None:
        off, size = V.HEADER_FIELDS[name]
        self.b[at + off:at + off + size] = (value % (1 << (8 * size))).to_bytes(size, "little")

    def u32(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.b, off, value % (1 << 32))
        return struct.unpack_from("<I", self.b, off)[0]

    def gd_entry(self, i: int, value: int | None = None, gd_offset: int | None = None) -> int:
        return self.u32((gd_offset or self.h().gd_offset) * S + 4 * i, value)

    def gte_pos(self, grain: int, gd_offset: int | None = None) -> int:
        gt = self.gd_entry(grain // 512, gd_offset=gd_offset)
        return gt * S + 4 * (grain % 512)

    def descriptor(self) -> bytes:
        h = self.h()
        return bytes(self.b[h.descriptor_offset * S:(h.descriptor_offset + h.descriptor_size) * S]).split(b"\0")[0]

    def set_descriptor(self, text: bytes) -> None:
        h = self.h()
        area = h.descriptor_size * S
        self.b[h.descriptor_offset * S:h.descriptor_offset * S + area] = (text + bytes(area))[:area]

    def bytes(self) -> bytes:
        return bytes(self.b)


DESC = ('# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="{ct}"\n\n'
        '# Extent description\n{extents}\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = "4"\n')


def generate(outdir: str) -> list[Case]:
    os.makedirs(outdir, exist_ok=True)
    cases: list[Case] = []

    def path(*parts: str) -> str:
        p = os.path.join(outdir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def write(rel: str, data: bytes) -> None:
        with open(path(rel), "wb") as f:
            f.write(data)

    def content_file(name: str, data: bytes) -> str:
        write(name, data)
        return name

    base_content = make_sparse(path("valid-sparse.vmdk"))
    base_cf = content_file("valid-sparse.content", base_content)
    with open(path("valid-sparse.vmdk"), "rb") as f:
        base = f.read()
    stream_content = make_stream(path("valid-stream.vmdk"))
    stream_cf = content_file("valid-stream.content", stream_content)
    with open(path("valid-stream.vmdk"), "rb") as f:
        stream = f.read()

    def add(name: str, why: str, data: bytes, content: str | None = base_cf, **kw) -> Sparse | None:
        fname = f"{name}.vmdk"
        write(fname, data)
        cases.append(Case(name, fname, why, format="vmdk", content=content, **kw))
        return None

    def sparse(**fields) -> Sparse:
        v = Sparse(base)
        for k, val in fields.items():
            v.hset(k, val)
        return v

    cases.append(Case("valid-sparse", "valid-sparse.vmdk", "the base image itself", format="vmdk", content=base_cf,
                      check=False))
    cases.append(Case("valid-stream", "valid-stream.vmdk", "the stream base itself", format="vmdk",
                      content=stream_cf, check=False))

    # --- sparse header
    h = Sparse(base).h()
    hdr_cases = [
        ("bad-magic", {"magicNumber": 0x12345678}, "CorruptImage", "not KDMV"),
        ("cowd-magic", {"magicNumber": int.from_bytes(b"COWD", "little")}, "UnsupportedFeature", "ESX COWD"),
        ("version-0", {"version": 0}, "UnsupportedFeature", "version 0"),
        ("version-huge", {"version": 2**32 - 1}, "UnsupportedFeature", "version 2^32-1"),
        ("flags-unknown", {"flags": h.flags | (1 << 9)}, "UnsupportedFeature", "an unknown flag"),
        ("markers-no-compression", {"flags": h.flags | V.FLAG_MARKERS}, "UnsupportedFeature", "markers alone"),
        ("grain-zero", {"grainSize": 0}, "UnsupportedFeature", "grain size 0 (a division by zero)"),
        ("grain-odd", {"grainSize": 3}, "UnsupportedFeature", "grain size not a power of two"),
        ("grain-huge", {"grainSize": 1 << 40}, "UnsupportedFeature", "a grain of 512 TiB (allocation)"),
        ("gtes-zero", {"numGTEsPerGT": 0}, "UnsupportedFeature", "no entries per grain table"),
        ("gtes-huge", {"numGTEsPerGT": 2**32 - 1}, "UnsupportedFeature", "4 G entries per grain table"),
        ("capacity-huge", {"capacity": 2**63}, "UnsupportedFeature", "a capacity of 2^63 sectors"),
        ("capacity-64t", {"capacity": V.MAX_CAPACITY_SECTORS}, None, "2 M directory entries: budget or bounds"),
        ("gd-past-eof", {"gdOffset": 1 << 40}, "CorruptImage", "grain directory past the end"),
        ("gd-at-header", {"gdOffset": 0}, "CorruptImage", "grain directory on the header"),
        ("gd-on-descriptor", {"gdOffset": 1}, "CorruptImage", "grain directory on the descriptor"),
        ("rgd-equals-gd", {"rgdOffset": h.gd_offset}, "CorruptImage", "both directories at one place"),
        ("rgd-past-eof", {"rgdOffset": 2**64 - 2}, "CorruptImage", "redundant directory past the end"),
        ("descriptor-huge", {"descriptorSize": 1 << 40}, "CorruptImage", "a 512 TiB descriptor (allocation)"),
        ("descriptor-past-eof", {"descriptorOffset": 1 << 30}, "CorruptImage", "descriptor past the end"),
        ("newline-damaged", {"doubleEndLineChar1": 0x0A}, "CorruptImage", "a text-mode copy damaged the file"),
        ("compress-algo-unknown", {"compressAlgorithm": 7}, "UnsupportedFeature", "an unknown compression"),
        ("gd-at-end-no-markers", {"gdOffset": V.GD_AT_END}, "CorruptImage", "GD 'at the end' in a sparse file"),
    ]
    for name, fields, err, why in hdr_cases:
        add(name, why, sparse(**fields).bytes(), open="fail", error=err, check=False)

    # --- grain directory and grain tables
    def gd(name, why, i, value, **kw):
        v = Sparse(base)
        v.gd_entry(i, value)
        add(name, why, v.bytes(), open="fail", error="CorruptImage", check=False, **kw)

    gd("gde-past-eof", "a grain table past the end", 0, 1 << 31)
    gd("gde-on-descriptor", "a grain table on the descriptor", 0, 1)
    gd("gde-on-gd", "a grain table on the grain directory", 0, h.gd_offset)
    gd("gde-on-rgd", "a grain table on the redundant directory", 0, h.rgd_offset)
    gd("gde-at-eof-edge", "a grain table running past the end", 0, len(base) // S - 1)
    v2 = Sparse(base)
    v2.gd_entry(0, v2.gd_entry(0, gd_offset=h.rgd_offset))
    add("gt-shared-with-rgt", "the primary and redundant tables are one", v2.bytes(), open="fail",
        error="CorruptImage", check=False)

    def gte(name, why, grain, value, read="fail", check=True, content=base_cf):
        v = Sparse(base)
        for off in (h.gd_offset, h.rgd_offset):
            v.u32(v.gte_pos(grain, gd_offset=off), value)
        add(name, why, v.bytes(), read=read, check=check, content=content)

    first = Sparse(base).u32(Sparse(base).gte_pos(0))
    gte("gte-past-eof", "a grain past the end of the file", 0, 1 << 31)
    gte("gte-on-header", "a grain on the header (entry 1 without the zero-grain flag)", 0, 1)
    gte("gte-on-gt", "a grain on a grain table", 0, Sparse(base).gd_entry(0))
    gte("gte-on-gd", "a grain on the grain directory", 0, h.gd_offset)
    gte("gte-max", "entry 2^32-1", 1, 2**32 - 1)
    gte("gte-duplicate", "two guest grains share one host grain", 1, first, read="skip", check=True, content=None)
    v = Sparse(base)
    v.u32(v.gte_pos(0, gd_offset=h.rgd_offset), first + 128)
    add("rgt-disagrees", "the redundant table names another grain (a crash leaves this: check calls it a leak)",
        v.bytes(), read="any", check=False)

    # --- embedded descriptor
    def desc(name, why, text: bytes, err="CorruptImage", **kw):
        v = Sparse(base)
        v.set_descriptor(text)
        add(name, why, v.bytes(), open="fail", error=err, check=False, **kw)

    d0 = Sparse(base).descriptor()
    desc("desc-not-utf8", "descriptor bytes that are not text", b"# Disk DescriptorFile\n\xff\xfe\x80garbage\n")
    desc("desc-garbage-line", "a line that is neither key nor extent", d0 + b"\nthis is not a descriptor line\n")
    desc("desc-two-extents", "an embedded descriptor naming two extents",
         d0 + b'\nRW 100 SPARSE "other.vmdk"\n')
    desc("desc-no-extents", "no extent line", b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n")
    desc("desc-cid-garbage", "a CID that is not hex", d0.replace(b"CID=", b"CID=zz", 1))
    desc("desc-no-magic", "no '# Disk DescriptorFile'", b"version=1\n" + d0)
    desc("desc-version-9", "descriptor version 9", d0.replace(b"version=1", b"version=9"), err="UnsupportedFeature")
    desc("desc-vmfssparse", "an extent type vdisk does not read",
         d0.replace(b"SPARSE", b"VMFSSPARSE", 1), err="UnsupportedFeature")
    desc("desc-parent-cid-no-hint", "a parentCID without a parent file name",
         d0.replace(b"parentCID=ffffffff", b"parentCID=12345678"))

    # --- truncation
    add("truncated-header", "100 bytes of header", base[:100], open="fail", error="CorruptImage", check=False)
    add("truncated-tables", "cut inside the grain tables", base[:(h.gd_offset + 2) * S], open="fail",
        error="CorruptImage", check=False)
    add("truncated-grains", "cut inside the grains", base[:len(base) // 2], read="fail", check=True)
    add("empty-file", "zero bytes", b"", open="fail", error="CorruptImage", check=False)

    # --- streamOptimized
    sh = Sparse(stream).h()
    foot = len(stream) - 3 * S
    fh = V.decode_header(stream[foot + S:foot + 2 * S])

    def st(name, why, mutate, **kw):
        v = Sparse(stream)
        mutate(v)
        kw.setdefault("content", stream_cf)
        add(name, why, v.bytes(), **kw)

    assert sh.gd_offset == V.GD_AT_END
    add("stream-no-footer", "the stream ends before its footer", stream[:-3 * S], open="fail", error="CorruptImage",
        check=False, content=stream_cf)
    st("stream-footer-gd-past-eof", "the footer's directory past the end",
       lambda v: v.hset("gdOffset", 1 << 40, at=foot + S), open="fail", error="CorruptImage", check=False)
    st("stream-footer-gd-at-end", "the footer's directory 'at the end' too",
       lambda v: v.hset("gdOffset", V.GD_AT_END, at=foot + S), open="fail", error="CorruptImage", check=False)
    st("stream-footer-capacity", "the footer disagrees with the header",
       lambda v: v.hset("capacity", sh.capacity * 2, at=foot + S), open="fail", error="CorruptImage", check=False)
    st("stream-footer-marker-type", "no footer marker",
       lambda v: v.u32(foot + 12, 7), open="fail", error="CorruptImage", check=False)
    st("stream-footer-descriptor-huge", "the footer claims a 1 TiB descriptor (only its GD offset counts)",
       lambda v: v.hset("descriptorSize", 2**31 - 1, at=foot + S), read="any", check=False)
    st("stream-algo-2", "compression algorithm 2",
       lambda v: v.hset("compressAlgorithm", 2), open="fail", error="UnsupportedFeature", check=False)
    st("stream-gde-on-footer", "a grain table on the footer",
       lambda v: v.gd_entry(0, foot // S + 1, gd_offset=fh.gd_offset), open="fail", error="CorruptImage",
       check=False)
    gpos = Sparse(stream).u32(Sparse(stream).gte_pos(0, gd_offset=fh.gd_offset)) * S  # grain 0's marker

    def grain0(v: Sparse, payload: bytes | None = None, lba: int | None = None, size: int | None = None) -> None:
        if payload is not None:
            v.b[gpos + 12:gpos + 12 + len(payload)] = payload
            v.u32(gpos + 8, len(payload))
        if lba is not None:
            struct.pack_into("<Q", v.b, gpos, lba)
        if size is not None:
            v.u32(gpos + 8, size)

    old_size = struct.unpack_from("<I", stream, gpos + 8)[0]
    bomb = zlib.compress(bytes(8 << 20), 9)
    assert len(bomb) <= old_size, "the bomb must fit where the grain was"
    st("stream-grain-bomb", "a grain inflating to 8 MiB", lambda v: grain0(v, bomb), read="fail", check=True)
    st("stream-grain-garbage", "a grain that is not deflate data", lambda v: grain0(v, b"\x78\x9cNOT DEFLATE" * 4),
       read="fail", check=True)
    st("stream-grain-cut", "a deflate stream that ends early",
       lambda v: grain0(v, size=max(1, old_size // 3)), read="fail", check=True)
    st("stream-grain-size-huge", "a marker claiming 4 GiB", lambda v: grain0(v, size=2**32 - 1), read="fail",
       check=True)
    st("stream-grain-wrong-lba", "a marker naming another grain", lambda v: grain0(v, lba=128 * 7), read="fail",
       check=True)
    st("stream-gte-on-descriptor", "a grain entry on the descriptor",
       lambda v: v.u32(v.gte_pos(0, gd_offset=fh.gd_offset), 1), read="fail", check=True)

    # --- descriptor files with extents
    rng = random.Random(5)
    flat_data = rng.randbytes(1 << 20)

    def layout(name, why, extents: str, files: dict[str, bytes], ct="monolithicFlat", text: str | None = None,
               **kw):
        d = name
        for fname, data in files.items():
            write(os.path.join(d, fname), data)
        fname = os.path.join(d, f"{name}.vmdk")
        write(fname, (text if text is not None else DESC.format(ct=ct, extents=extents)).encode())
        kw.setdefault("check", False)
        cases.append(Case(name, fname, why, format="vmdk", **kw))

    cf_flat = content_file("flat.content", flat_data)
    layout("flat-valid", "a valid monolithicFlat layout", 'RW 2048 FLAT "d-flat.vmdk" 0', {"d-flat.vmdk": flat_data},
           content=cf_flat)
    cf_short = content_file("flat-short.content", flat_data[:4096] + bytes((1 << 20) - 4096))
    layout("flat-short-file", "a flat file shorter than its extent: zeros", 'RW 2048 FLAT "d-flat.vmdk" 0',
           {"d-flat.vmdk": flat_data[:4096]}, content=cf_short)
    cf_zero = content_file("flat-zero.content", flat_data[:S * 8] + bytes(S * 8))
    layout("flat-offset-zero", "a flat extent from an offset, then a ZERO extent",
           'RW 8 FLAT "d-flat.vmdk" 0\nRW 8 ZERO', {"d-flat.vmdk": flat_data}, content=cf_zero)
    layout("extent-outside", "an extent file outside the image's directory", 'RW 8 FLAT "../flat.content" 0', {},
           open="fail", error="BackingError")
    layout("extent-etc-passwd", "an extent naming /etc/passwd", 'RW 8 FLAT "/etc/passwd" 0', {}, open="fail",
           error="BackingError")
    layout("extent-self", "an extent naming the descriptor itself", 'RW 8 FLAT "extent-self.vmdk" 0', {},
           open="fail", error="BackingError")
    layout("extent-twice", "one file named by two extents", 'RW 8 FLAT "a.raw" 0\nRW 8 FLAT "a.raw" 8',
           {"a.raw": flat_data[:8192]}, open="fail", error="BackingError")
    layout("extent-missing", "an extent file that does not exist", 'RW 8 FLAT "nope.raw" 0', {}, open="fail",
           error="ImageNotFound")
    os.makedirs(path("extent-dir", "sub", "x"), exist_ok=True)
    layout("extent-dir", "an extent that is a directory", 'RW 8 FLAT "sub" 0', {}, open="fail")
    layout("extent-huge", "an extent of 2^60 sectors", f'RW {1 << 60} FLAT "a.raw" 0', {"a.raw": b"x"},
           open="fail", error="UnsupportedFeature")
    layout("extent-offset-huge", "a flat offset of 2^60 sectors", f'RW 8 FLAT "a.raw" {1 << 60}', {"a.raw": b"x"},
           open="fail", error="UnsupportedFeature")
    layout("extents-many", "5000 extents", "\n".join("RW 1 ZERO" for _ in range(5000)), {}, open="fail",
           error="UnsupportedFeature")
    layout("extent-noaccess", "a NOACCESS extent", 'NOACCESS 8 FLAT "a.raw" 0', {"a.raw": b"x"}, open="fail",
           error="UnsupportedFeature")
    layout("extent-vmfsrdm", "a raw device mapping", 'RW 8 VMFSRDM "a.raw"', {"a.raw": b"x"}, open="fail",
           error="UnsupportedFeature")
    layout("sparse-extent-is-descriptor", "a SPARSE extent that is a descriptor",
           'RW 8 SPARSE "inner.vmdk"', {"inner.vmdk": DESC.format(ct="x", extents='RW 8 ZERO').encode()},
           ct="twoGbMaxExtentSparse", open="fail", error="CorruptImage")
    layout("sparse-extent-too-small", "a SPARSE extent larger in the descriptor than its header",
           f'RW {SIZE // S * 2} SPARSE "s.vmdk"', {"s.vmdk": base}, ct="twoGbMaxExtentSparse", open="fail",
           error="CorruptImage")
    layout("sparse-extent-valid", "a valid descriptor with one sparse extent", f'RW {SIZE // S} SPARSE "s.vmdk"',
           {"s.vmdk": base}, ct="twoGbMaxExtentSparse", content=base_cf)
    layout("descriptor-huge", "a 2 MiB descriptor file", "", {}, text="# Disk DescriptorFile\n" + "#" * (2 << 20),
           open="fail", error="CorruptImage")
    cf_4k = content_file("flat-4k.content", flat_data[:4096])
    layout("descriptor-backtracking", "a line that made the key pattern backtrack quadratically (500000 spaces), "
           "200000 blank lines", "", {"d-flat.vmdk": flat_data},
           text="# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\nddb.x=a" + " " * 500_000 + "b\n"
           + "\n" * 200_000 + 'RW 8 FLAT "d-flat.vmdk" 0\n', content=cf_4k)
    layout("descriptor-nul", "NUL bytes cut the descriptor before its extents", "", {},
           text="# Disk DescriptorFile\nversion=1\n\0\nRW 8 ZERO\n", open="fail", error="CorruptImage")
    os.symlink("/etc/passwd", path("extent-symlink", "p.raw"))
    layout("extent-symlink", "an extent that is a symbolic link out of the directory", 'RW 8 FLAT "p.raw" 0', {},
           open="fail", error="BackingError")

    # --- parents
    def child(name, why, hint: str, pcid: int | None = None, parent: bytes | None = None, **kw):
        d = name
        if parent is not None:
            write(os.path.join(d, "parent.vmdk"), parent)
        v = Sparse(base)
        cid = pcid if pcid is not None else int(V.decode_descriptor(Sparse(parent or base).descriptor()).cid)
        v.set_descriptor(Sparse(base).descriptor().replace(
            b"parentCID=ffffffff", b'parentCID=%08x\nparentFileNameHint="%s"' % (cid, hint.encode())))
        fname = os.path.join(d, f"{name}.vmdk")
        write(fname, v.bytes())
        kw.setdefault("check", False)
        cases.append(Case(name, fname, why, format="vmdk", **kw))

    own_cid = V.decode_descriptor(Sparse(base).descriptor()).cid
    child("parent-self", "a disk that is its own parent", "parent-self.vmdk", pcid=own_cid, open="fail",
          error="BackingError")
    child("parent-etc-passwd", "a parent outside the directory", "/etc/passwd", pcid=own_cid, open="fail",
          error="BackingError")
    child("parent-missing", "a parent that does not exist", "nope.vmdk", pcid=own_cid, open="fail",
          error="BackingError")
    child("parent-cid-mismatch", "the parent changed after the child was made", "parent.vmdk", pcid=0x0BADC1D0,
          parent=base, open="fail", error="BackingError")
    child("parent-not-vmdk", "a parent that is not a VMDK", "parent.vmdk", pcid=own_cid, parent=b"\0" * 8192,
          open="fail", error="CorruptImage")
    child("parent-valid", "a valid child on a valid parent", "parent.vmdk", parent=base, content=base_cf)
    # a -> b -> a
    d = "parent-loop"
    for me, other in (("a", "b"), ("b", "a")):
        v = Sparse(base)
        v.set_descriptor(Sparse(base).descriptor().replace(
            b"parentCID=ffffffff", b'parentCID=%08x\nparentFileNameHint="%s.vmdk"' % (own_cid, other.encode())))
        write(os.path.join(d, f"{me}.vmdk"), v.bytes())
    cases.append(Case("parent-loop", os.path.join(d, "a.vmdk"), "two disks that are each other's parent",
                      format="vmdk", open="fail", error="BackingError", check=False))
    # a chain 65 deep
    d = "chain-65"
    for i in range(66):
        v = Sparse(base)
        if i < 65:
            v.set_descriptor(Sparse(base).descriptor().replace(
                b"parentCID=ffffffff", b'parentCID=%08x\nparentFileNameHint="%d.vmdk"' % (own_cid, i + 1)))
        write(os.path.join(d, f"{i}.vmdk"), v.bytes())
    cases.append(Case("chain-65-deep", os.path.join(d, "0.vmdk"), "a parent chain 66 disks deep", format="vmdk",
                      open="fail", error="BackingError", check=False))

    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump([asdict(c) for c in cases], f, indent=1)
    return cases


# ----------------------------------------------------------------------------- fuzz worker
def exercise(data: bytes) -> None:
    """What a user could do with one fuzzed sparse file; only VdiskError may escape.
    Reads are bounded (the first 4 MiB and the last MiB: a fuzzed capacity may be
    terabytes of zeros), block_status and check cover the whole disk."""
    from crash.storage import MemStorage

    from vdisk import budget
    from vdisk.block import Image
    from vdisk.drivers.vmdk import VmdkDriver
    from vdisk.errors import VdiskError

    with budget.scope():
        img = Image(VmdkDriver.open(MemStorage(data, "fuzz.vmdk", read_only=True), read_only=True), "fuzz.vmdk",
                    None)
    try:
        size = img.size
        for step in (lambda: img.read(0, min(size, 4 << 20)), lambda: img.read(max(0, size - (1 << 20)),
                                                                                min(size, 1 << 20)),
                     lambda: img.block_status(0, size), img.check):
            try:
                step()
            except VdiskError:
                pass
    finally:
        img.close()
    with budget.scope():
        rw = Image(VmdkDriver.open(MemStorage(data, "fuzz.vmdk"), read_only=False), "fuzz.vmdk", None)
    try:
        n = min(rw.size, 3 * rw.cluster_size + 11)
        for off in (rw.size - n, 0):
            if n:
                try:
                    rw.write(off, b"\xa5" * n)
                except VdiskError:
                    pass
        rw.flush()
        rw.check()
    finally:
        try:
            rw.close()
        except VdiskError:
            pass


def worker(as_mib: int) -> None:
    """The fuzzer's child: tests/hostile/fuzzworker.py's protocol (8-byte length,
    8-byte format name, the image; one JSON line back), for VMDK."""
    import resource
    import time
    import traceback

    from vdisk.errors import VdiskError

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    resource.setrlimit(resource.RLIMIT_AS, (as_mib << 20, as_mib << 20))
    inp, out = sys.stdin.buffer, sys.stdout
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        n = int.from_bytes(head, "little")
        inp.read(8)
        data = inp.read(n)
        t0 = time.monotonic()
        reply: dict = {"result": "accepted", "error": None}
        try:
            exercise(data)
        except VdiskError as exc:
            reply.update(result="refused", error=f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
            reply.update(result="bug", error=f"{type(exc).__name__}: {str(exc)[:300]}{where}")
            del exc
        reply["seconds"] = round(time.monotonic() - t0, 4)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1].startswith("--worker"):
        worker(int(sys.argv[1].partition("=")[2] or 600))
    else:
        for c in generate(sys.argv[1]):
            print(c.name, "-", c.why)
