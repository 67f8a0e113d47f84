"""Malformed VHD ("vpc") and VDI images, made from valid ones by patching named fields.

``python tests/hostile/gen_vhd_vdi.py DIR`` writes the corpus into DIR with a
``cases.json``; ``generate(dir)`` does the same from Python and returns the cases.
Field offsets come from ``vdisk.codec.vhd`` (``FOOTER_FIELDS``, ``DYN_FIELDS``,
``LOCATOR_FIELDS``) and ``vdisk.codec.vdi`` (``HEADER_FIELDS``); VHD checksums are
recomputed after each patch when the point is to get past them.

A case says what must happen (``tests/test_hostile_vhd_vdi.py`` enforces it):
  open   "fail": opening (read-only, format named, with the chain) must raise a VdiskError
         "any": it may open, but then every read returns ``content`` exactly
  error  the VdiskError class name expected (optional)
  check  True: ``check`` must refuse (raise or report corruption)

Also ``fuzz_main``: the child process of the bounded fuzzer (same test module).
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
from dataclasses import asdict, dataclass

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import vdisk
from vdisk.codec import vdi as VDI
from vdisk.codec import vhd as VHD

MiB = 1 << 20
SIZE = 6 * MiB


@dataclass
class Case:
    name: str
    file: str
    why: str
    format: str
    open: str = "fail"
    error: str | None = None
    check: bool = False
    content: str | None = None


def _content(seed: int) -> list[tuple[int, bytes]]:
    rnd = random.Random(seed)
    return [(0, rnd.randbytes(5000)), (2 * MiB + 4096, rnd.randbytes(70000)), (SIZE - 3000, rnd.randbytes(3000))]


def make_valid(path: str, fmt: str, options: dict | None = None, seed: int = 1, **kw) -> bytes:
    vdisk.create(path, SIZE if "backing_file" not in kw else None, format=fmt, options=options or {}, **kw)
    with vdisk.open(path) as img:
        for off, data in _content(seed):
            img.write(off, data)
        return img.read(0, img.size)


# ------------------------------------------------------------------ patch helpers
class Vhd:
    def __init__(self, raw: bytes):
        self.b = bytearray(raw)
        self.fixed = VHD.decode_footer(bytes(self.b[-512:])).disk_type == VHD.TYPE_FIXED

    def footer(self, field: str, fmt: str, value, where=("head", "tail"), sign=True):
        for w in where:
            if w == "head" and self.fixed:
                continue
            base = 0 if w == "head" else len(self.b) - 512
            struct.pack_into(fmt, self.b, base + VHD.FOOTER_FIELDS[field][0], value)
            if sign:
                struct.pack_into(">I", self.b, base + 64, VHD.checksum(bytes(self.b[base:base + 512]), 64))
        return self

    def dyn(self, field: str, fmt: str, value, sign=True, at: int = 0):
        struct.pack_into(fmt, self.b, 512 + VHD.DYN_FIELDS[field][0] + at, value)
        if sign:
            struct.pack_into(">I", self.b, 512 + 36, VHD.checksum(bytes(self.b[512:1536]), 36))
        return self

    def locator(self, i: int, field: str, fmt: str, value):
        return self.dyn("parent_locator_entries", fmt, value, at=24 * i + VHD.LOCATOR_FIELDS[field][0])

    @property
    def table(self) -> int:
        return struct.unpack_from(">Q", self.b, 512 + 16)[0]

    def bat(self, i: int) -> int:
        return struct.unpack_from(">I", self.b, self.table + 4 * i)[0]

    def set_bat(self, i: int, value: int):
        struct.pack_into(">I", self.b, self.table + 4 * i, value)
        return self


def _vdi_patch(raw: bytes, field: str, fmt: str, value, at: int | None = None) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, VDI.HEADER_FIELDS[field][0] if at is None else at, value)
    return bytes(b)


# ------------------------------------------------------------------ the corpus
def generate(d: str) -> list[Case]:
    os.makedirs(d, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes, why: str, fmt: str, opening: str = "fail", **kw) -> None:
        fn = f"{name}.{'vhd' if fmt == 'vpc' else 'vdi'}"
        with open(os.path.join(d, fn), "wb") as f:
            f.write(data)
        cases.append(Case(name, fn, why, fmt, opening, **kw))

    def expect(name: str, data: bytes) -> str:
        fn = f"{name}.content"
        with open(os.path.join(d, fn), "wb") as f:
            f.write(data)
        return fn

    # valid images
    dyn_path, fixed_path, base_path = (os.path.join(d, n) for n in ("valid-dyn.vhd", "valid-fixed.vhd", "base.vhd"))
    dyn_content = make_valid(dyn_path, "vpc")
    fixed_content = make_valid(fixed_path, "vpc", {"subformat": "fixed"})
    make_valid(base_path, "vpc", seed=2)
    child_path = os.path.join(d, "valid-child.vhd")
    make_valid(child_path, "vpc", seed=3, backing_file="base.vhd", backing_format="vpc")
    with vdisk.open(child_path, read_only=True) as c:
        child_content = c.read(0, c.size)
    vdi_path, vdis_path = os.path.join(d, "valid.vdi"), os.path.join(d, "valid-static.vdi")
    vdi_content = make_valid(vdi_path, "vdi")
    vdis_content = make_valid(vdis_path, "vdi", {"static": "on"})
    with open(dyn_path, "rb") as f:
        dyn = f.read()
    with open(fixed_path, "rb") as f:
        fixed = f.read()
    with open(child_path, "rb") as f:
        child = f.read()
    with open(vdi_path, "rb") as f:
        vdi = f.read()
    cases += [Case("valid-dyn", "valid-dyn.vhd", "a valid dynamic VHD", "vpc", "any", content=expect("dyn", dyn_content)),
              Case("valid-fixed", "valid-fixed.vhd", "a valid fixed VHD", "vpc", "any",
                   content=expect("fixed", fixed_content)),
              Case("valid-child", "valid-child.vhd", "a valid differencing VHD", "vpc", "any",
                   content=expect("child", child_content)),
              Case("valid-vdi", "valid.vdi", "a valid dynamic VDI", "vdi", "any", content=expect("vdi", vdi_content)),
              Case("valid-vdi-static", "valid-static.vdi", "a valid static VDI", "vdi", "any",
                   content=expect("vdis", vdis_content))]
    c_dyn = "dyn.content"

    # ---- VHD footers
    V = Vhd
    add("vhd-cookie", bytes(V(dyn).footer("cookie", ">8s", b"connectx", sign=False).b), "no footer cookie", "vpc")
    add("vhd-footer-checksum", bytes(V(dyn).footer("checksum", ">I", 0x1234, sign=False).b),
        "both footers fail their checksum", "vpc", error="CorruptImage")
    add("vhd-head-checksum-only", bytes(V(dyn).footer("checksum", ">I", 0x1234, ("head",), sign=False).b),
        "the copy at 0 is damaged: the footer at the end serves", "vpc", "any", content=c_dyn)
    add("vhd-tail-missing", dyn[:-512], "a crash left no footer at the end: the copy at 0 serves", "vpc", "any",
        content=c_dyn)
    add("vhd-size-huge", bytes(V(dyn).footer("current_size", ">Q", 1 << 60).b), "current size 2^60", "vpc")
    add("vhd-size-past-bat", bytes(V(dyn).footer("current_size", ">Q", 64 * MiB).b),
        "a size the BAT cannot cover", "vpc", error="CorruptImage")
    add("vhd-chs-sized-huge", bytes(V(dyn).footer("creator_application", ">4s", b"vpc ")
                                    .footer("disk_geometry", ">I", 65000 << 16 | 16 << 8 | 63).b),
        "sized by a geometry larger than the BAT", "vpc")
    add("vhd-type-unknown", bytes(V(dyn).footer("disk_type", ">I", 7).b), "disk type 7", "vpc",
        error="UnsupportedFeature")
    add("vhd-version-2", bytes(V(dyn).footer("file_format_version", ">I", 0x00020000).b), "version 2.0", "vpc",
        error="UnsupportedFeature")
    add("vhd-data-offset-past-end", bytes(V(dyn).footer("data_offset", ">Q", 1 << 50).b),
        "dynamic header offset past the end", "vpc", error="CorruptImage")
    add("vhd-data-offset-unaligned", bytes(V(dyn).footer("data_offset", ">Q", 513).b),
        "dynamic header offset not on a sector", "vpc", error="CorruptImage")
    # ---- dynamic header
    add("vhd-dyn-cookie", bytes(V(dyn).dyn("cookie", ">8s", b"cxspars\0").b), "no cxsparse", "vpc",
        error="CorruptImage")
    add("vhd-dyn-checksum", bytes(V(dyn).dyn("checksum", ">I", 1, sign=False).b), "header checksum", "vpc",
        error="CorruptImage")
    for bs, tag in ((0, "0"), (3 * MiB, "3m"), (1 << 31, "2g"), (256, "256")):
        add(f"vhd-block-size-{tag}", bytes(V(dyn).dyn("block_size", ">I", bs).b), f"block size {bs}", "vpc",
            error="UnsupportedFeature")
    add("vhd-entries-huge", bytes(V(dyn).dyn("max_table_entries", ">I", 0xFFFFFFFF).b), "4 G BAT entries", "vpc",
        error="CorruptImage")
    add("vhd-entries-few", bytes(V(dyn).dyn("max_table_entries", ">I", 1).b), "1 entry for 3 blocks", "vpc",
        error="CorruptImage")
    add("vhd-table-past-end", bytes(V(dyn).dyn("table_offset", ">Q", (1 << 64) - 512).b), "BAT at 2^64", "vpc",
        error="CorruptImage")
    add("vhd-table-at-zero", bytes(V(dyn).dyn("table_offset", ">Q", 0).b), "BAT over the footer copy", "vpc",
        error="CorruptImage")
    add("vhd-table-at-header", bytes(V(dyn).dyn("table_offset", ">Q", 512).b), "BAT over the dynamic header",
        "vpc", error="CorruptImage")
    # ---- BAT
    v = V(dyn)
    e0, e1 = v.bat(0), v.bat(1)
    add("vhd-bat-past-end", bytes(V(dyn).set_bat(1, 0xFFFFFF00).b), "a block past the end", "vpc",
        error="CorruptImage")
    add("vhd-bat-duplicate", bytes(V(dyn).set_bat(1, e0).b), "two entries, one block", "vpc", error="CorruptImage")
    add("vhd-bat-overlap", bytes(V(dyn).set_bat(1, e0 + 8).b), "blocks overlapping", "vpc", error="CorruptImage")
    add("vhd-bat-at-footer-copy", bytes(V(dyn).set_bat(1, 0).b), "a block over the footer copy", "vpc",
        error="CorruptImage")
    add("vhd-bat-at-bat", bytes(V(dyn).set_bat(1, v.table // 512).b), "a block over the BAT", "vpc",
        error="CorruptImage")
    add("vhd-truncated", dyn[:e1 * 512 + 4096], "file cut inside a block", "vpc", error="CorruptImage")
    # a partial bitmap: sectors with a clear bit read as zeros
    b = bytearray(dyn)
    b[e0 * 512] = 0b01111111  # sector 0 of block 0: not present
    cut = bytearray(dyn_content)
    cut[:512] = bytes(512)
    add("vhd-bitmap-partial", bytes(b), "sector 0's bitmap bit clear", "vpc", "any",
        content=expect("bitmap-partial", bytes(cut)))
    # a fixed disk whose guest wrote a dynamic footer copy into sector 0
    forged = bytearray(fixed)
    forged[:512] = dyn[:512]
    forged[512:1536] = dyn[512:1536]
    cont = bytearray(fixed_content)
    cont[:1536] = forged[:1536]
    add("vhd-fixed-forged-head", bytes(forged), "fixed disk, its guest forged a dynamic header at 0", "vpc", "any",
        content=expect("fixed-forged", bytes(cont)))
    add("vhd-fixed-truncated", fixed[:MiB] + fixed[-512:], "fixed disk shorter than its size", "vpc",
        error="CorruptImage")
    # ---- differencing disks: locators
    locs = [VHD.decode_dyn_header(child[512:1536]).locators[0]]
    w = V(child)
    for i in range(8):
        w.locator(i, "platform_code", ">4s", b"\0\0\0\0")
    w.dyn("parent_unicode_name", ">512s", bytes(512))
    add("vhd-child-no-parent", bytes(w.b), "differencing, no locator, no name", "vpc", error="CorruptImage")
    add("vhd-child-locator-huge", bytes(V(child).locator(0, "platform_data_length", ">I", 0x7FFFFFFF).b),
        "a 2 GiB locator", "vpc", error="CorruptImage")
    add("vhd-child-locator-past-end", bytes(V(child).locator(0, "platform_data_offset", ">Q", 1 << 40).b),
        "locator past the end", "vpc", error="CorruptImage")

    def with_path(code: bytes, path: str) -> bytes:
        x = V(child)
        data = VHD.encode_locator_path(code, path) if code != VHD.PLAT_WI2R else path.encode()
        off = locs[0].data_offset
        x.b[off:off + 512] = data.ljust(512, b"\0")[:512]
        x.locator(0, "platform_code", ">4s", code).locator(0, "platform_data_length", ">I", len(data))
        return bytes(x.b)

    add("vhd-child-outside", with_path(VHD.PLAT_W2RU, "..\\..\\..\\..\\etc\\passwd"),
        "the parent is outside the allowed directories", "vpc", error="BackingError")
    add("vhd-child-self", with_path(VHD.PLAT_W2RU, ".\\vhd-child-self.vhd"), "its own parent", "vpc",
        error="BackingError")
    add("vhd-child-missing", with_path(VHD.PLAT_W2RU, ".\\nothere.vhd"), "the parent does not exist", "vpc",
        error="BackingError")
    add("vhd-child-windows-absolute", with_path(VHD.PLAT_W2KU, "C:\\VMs\\disks\\base.vhd"),
        "an absolute Windows path: the parent's name beside the child", "vpc", "any", content="child.content")
    add("vhd-child-nul", with_path(VHD.PLAT_W2RU, "base.vhd\0/etc/passwd"),
        "a NUL in the path: only what precedes it counts", "vpc", "any", content="child.content")
    add("vhd-child-raw-parent", with_path(VHD.PLAT_W2RU, ".\\valid.vdi"),
        "the parent is not a VHD", "vpc")
    add("vhd-child-bad-utf16", bytes(V(child).locator(0, "platform_data_length", ">I", 3).b),
        "an odd-length UTF-16 path", "vpc", error="CorruptImage")

    # ---- VDI
    P = _vdi_patch
    for field, value, err, why in (
            ("signature", 0x12345678, "CorruptImage", "no signature"),
            ("version", 0x00000001, "UnsupportedFeature", "version 0.1"),
            ("header_size", 0xFFFFFFFF, "CorruptImage", "header size 4 GiB"),
            ("image_type", 4, "UnsupportedFeature", "differencing"),
            ("image_type", 0, "UnsupportedFeature", "image type 0"),
            ("sector_size", 0, "UnsupportedFeature", "sector size 0"),
            ("block_size", 0, "UnsupportedFeature", "block size 0"),
            ("block_size", 0x80000000, "UnsupportedFeature", "block size 2 GiB"),
            ("block_size", 3 << 20, "UnsupportedFeature", "block size 3 MiB"),
            ("block_extra", 0xFFFFFFFF, "UnsupportedFeature", "block extra 4 GiB"),
            ("blocks_in_image", 0xFFFFFFF0, "CorruptImage", "4 G blocks, map past the end"),
            ("blocks_in_image", 1, "CorruptImage", "too few blocks for the size"),
            ("blocks_allocated", 0xFFFFFFFF, "CorruptImage", "more allocated than exist"),
            ("offset_blocks", 0xFFFFFE00, "CorruptImage", "map past the end"),
            ("offset_blocks", 0, "CorruptImage", "map over the header"),
            ("offset_data", 513, "CorruptImage", "data not on a sector"),
            ("offset_data", 512, "CorruptImage", "data over the map"),
            ("offset_data", 0xFFFFFE00, "CorruptImage", "data past the end: blocks past the end")):
        add(f"vdi-{field}-{value:x}", P(vdi, field, "<I", value), why, "vdi", error=err)
    add("vdi-disk-size-huge", P(vdi, "disk_size", "<Q", 1 << 62), "disk size 2^62", "vdi", error="CorruptImage")
    add("vdi-truncated", vdi[:MiB + 4096], "file cut inside the data", "vdi", error="CorruptImage")
    m = VDI.HEADER_AREA
    add("vdi-map-past-image", P(vdi, "signature", "<I", 100, at=m + 4), "an entry past the image's blocks", "vdi",
        error="CorruptImage")
    add("vdi-map-duplicate", P(P(vdi, "signature", "<I", 0, at=m + 8), "signature", "<I", 0, at=m),
        "two entries, one block", "vdi", error="CorruptImage")
    blk = bytearray(vdi_content)
    blk[:MiB] = bytes(MiB)
    add("vdi-map-discarded", P(vdi, "signature", "<I", VDI.BLOCK_ZERO, at=m), "a discarded entry reads zeros",
        "vdi", "any", content=expect("vdi-discarded", bytes(blk)))
    add("vdi-count-low", P(vdi, "blocks_allocated", "<I", 0), "the header's count lost (a leak)", "vdi", "any",
        content="vdi.content")
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump([asdict(c) for c in cases], f, indent=1)
    return cases


# ------------------------------------------------------------------ the fuzzer's child
def exercise(data: bytes, fmt: str) -> None:
    """Everything a user could do with an image in memory; only VdiskError may escape."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from crash.storage import MemStorage

    from vdisk.block import Image
    from vdisk.drivers import get_driver
    from vdisk.errors import VdiskError

    cls = get_driver(fmt)
    img = Image(cls.open(MemStorage(data, "fuzz", read_only=True), read_only=True), "fuzz", None)
    try:
        for step in (lambda: img.read(0, img.size), lambda: img.block_status(0, img.size), img.check):
            try:
                step()
            except VdiskError:
                pass
    finally:
        img.close()
    store = MemStorage(data, "fuzz")
    rw = Image(cls.open(store, read_only=False), "fuzz", None)
    try:
        n = min(rw.size, 70000)
        for step in (lambda: rw.write(rw.size - n, b"\xa5" * n), lambda: rw.write(0, b"\x5a" * min(n, 5000)),
                     lambda: rw.write_zeroes(0, min(rw.size, 3000)), rw.flush,
                     lambda: rw.resize(rw.size + MiB), lambda: rw.resize(max(0, rw.size - 3 * MiB), shrink=True)):
            try:
                step()
            except VdiskError:
                pass
    finally:
        rw.close()
    again = Image(cls.open(MemStorage(bytes(store.buf), "fuzz", read_only=True), read_only=True), "fuzz", None)
    again.read(0, again.size)
    again.close()


def fuzz_main(corpus: str, iterations: int, seed: int | None) -> None:
    """Child: mutate the valid images of ``corpus`` and exercise each; one JSON line."""
    import resource
    import time
    import traceback

    from vdisk.errors import VdiskError

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    bases = []
    for fn, fmt in (("valid-dyn.vhd", "vpc"), ("valid-fixed.vhd", "vpc"), ("valid-child.vhd", "vpc"),
                    ("valid.vdi", "vdi"), ("valid-static.vdi", "vdi")):
        with open(os.path.join(corpus, fn), "rb") as f:
            bases.append((fn, fmt, f.read()))
    rnd = random.Random(seed if seed is not None else 20261202)
    stats = {"iterations": 0, "accepted": 0, "refused": 0, "slowest": 0.0}
    failures = []
    for i in range(iterations):
        fn, fmt, base = bases[i % len(bases)]
        b = bytearray(base)
        hot = [0, 512, 1024, 1536, len(b) - 512, 2048, 4096] if fmt == "vpc" else [0, 0x150, 0x170, 0x180, 512]
        for _ in range(rnd.randint(1, 6)):
            kind = rnd.random()
            pos = (rnd.choice(hot) + rnd.randrange(0, 512)) if kind < 0.8 else rnd.randrange(len(b))
            pos %= len(b)
            if kind < 0.5:
                b[pos] ^= 1 << rnd.randrange(8)
            elif kind < 0.9:
                w = rnd.choice((1, 2, 4, 8))
                val = rnd.choice((0, 0xFF, 0x7F, 0x80, rnd.randrange(256)))
                b[pos:pos + w] = bytes([val]) * w
            else:
                del b[pos:]
                if not b:
                    b = bytearray(1)
        t0 = time.monotonic()
        try:
            exercise(bytes(b), fmt)
            stats["accepted"] += 1
        except VdiskError:
            stats["refused"] += 1
        except MemoryError:
            failures.append(f"{fn} #{i}: MemoryError")
        except Exception as exc:  # noqa: BLE001
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"{fn} #{i}: {type(exc).__name__}: {exc} at {os.path.basename(tb.filename)}:{tb.lineno}")
        stats["slowest"] = max(stats["slowest"], round(time.monotonic() - t0, 3))
        stats["iterations"] += 1
    stats["failures"] = failures[:20]
    sys.stdout.write(json.dumps(stats) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--fuzz":
        fuzz_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] else None)
    else:
        for c in generate(sys.argv[1]):
            print(c.name)
