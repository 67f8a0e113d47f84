"""Consistency checks of a pool: one image (``vdisk check POOL/IMAGE``) and the
whole pool (``vdisk pool check POOL``).

What is checked (formats/pool.md):

- every catalog generation kept parses (framing, checksum, JSON, pool id, number);
- every root of every generation (each image's live state, each snapshot, hidden
  ones too) walks: every node decodes and matches its hash, every entry is of a kind
  its level allows and names a blob inside a pack;
- every data blob decodes and matches its entry's hash (a DELTA blob through its
  base, which must be a RAW or ZSTD blob), every sketch decodes;
- every pack's header, blob directory and footer are sound, and every blob named
  by a tree is a blob of its pack's directory, with the same length, kind and hash;
- every index segment the newest catalog lists is sound and sorted.

Corruptions make the check exit 2.  *Leaks* (exit 3 when there is nothing worse):
objects nothing in the newest generation needs -- packs no root reaches (a
crashed writer's, or a removed image's), index segments no longer listed,
temporary files older than an hour.  ``vdisk pool gc`` frees them (``pool check -r
leaks`` runs it).  Blobs no root reaches inside packs that hold live ones too are
not leaks (gc frees them only by repacking); they are counted as reclaimable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..codec import pool as pc
from ..drivers.base import CheckResult
from ..errors import CorruptImage, VdiskError
from . import backend as be
from .space import Root, Scan, renumber, roots_of, scan
from .store import GEN_PREFIX, Pool, pack_name

TMP_AGE = 3600  # a temporary file older than this belongs to no running writer


# ---------------------------------------------------------------------- one image
def check_image(driver, *, repair: str | None = None) -> CheckResult:
    """Walk the image's trees (its live state and every snapshot, hidden ones too),
    decode and verify every node, data blob, delta base and sketch.  Space nothing
    refers to belongs to the pool, not to one image: ``vdisk pool check`` reports it
    and ``vdisk pool gc`` frees it, so ``repair`` changes nothing here."""
    res = CheckResult()
    img = driver.img
    pool = img.pool
    errors: list[str] = []
    roots = renumber([r for r in roots_of(pool.catalog, pool.url, generation=pool.generation, errors=errors)
                      if r.image == img.name])
    for r in roots:
        if r.snapshot is None and img.snapshot is None:
            r.entry = img.root  # the open image's committed root
    live = 0 if roots and roots[0].snapshot is None else -1
    counts = {"allocated": 0, "compressed": 0}

    def on_leaf(idx: int, e: pc.Entry, m: int, node: bytes) -> None:
        if live < 0 or not m & 1:
            return
        for (_h, _pk, _off, _n, k, _fl) in pc.ENTRY.iter_unpack(node):
            if k in pc.DATA_KINDS:
                counts["allocated"] += 1
                if k != pc.RAW:
                    counts["compressed"] += 1

    found = scan(pool, roots, errors=errors, on_leaf=on_leaf)
    verify_blobs(pool, found, errors)
    res.corruptions = errors
    res.checked_clusters = found.entries
    res.allocated_clusters = counts["allocated"]
    res.compressed_clusters = counts["compressed"]
    return res


def verify_blobs(pool: Pool, found: Scan, errors: list[str], progress: Callable[[int], None] | None = None) -> int:
    """Decode every data blob and sketch ``found`` reached, in pack order, checking
    each against its hash.  Returns how many were decoded."""
    n = 0
    for loc in sorted(found.meta):
        length, kind, h = found.meta[loc]
        if kind == pc.NODE:
            continue
        e = pc.Entry(h, loc[0], loc[1], length, kind)
        what = f"{pool.url}: {found.label(found.mask[loc])}: {pc.KIND_NAMES.get(kind)} blob {loc[0]:016x}+{loc[1]}"
        try:
            if kind == pc.SKETCH:
                data = pool.load_meta(e, found.sketch_sizes.get(loc, 0), what)
                pc.decode_sketch(data, what)
            else:
                pool.decode_block(e, what)
        except VdiskError as exc:
            errors.append(str(exc))
        n += 1
        if progress is not None:
            progress(1)
    return n


# ---------------------------------------------------------------------- the pool
@dataclass
class PoolCheck:
    """What ``pool check`` found (``exit_code``: 0 clean, 2 corrupt, 3 leaks only)."""

    pool: str
    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    leaked_objects: int = 0
    leaked_bytes: int = 0
    reclaimable_bytes: int = 0  # unreachable blobs inside packs that hold live ones
    repaired: list[str] = field(default_factory=list)
    leaks_fixed: int = 0
    generations: int = 0
    images: int = 0
    roots: int = 0
    packs: int = 0
    nodes: int = 0
    blobs: int = 0
    entries: int = 0
    segments: int = 0

    @property
    def exit_code(self) -> int:
        return 2 if self.corruptions else 3 if self.leaks else 0

    @property
    def result(self) -> str:
        return {0: "clean", 2: "corrupt", 3: "leaks"}[self.exit_code]

    def to_json(self) -> dict:
        return {"pool": self.pool, "result": self.result, "corruptions": len(self.corruptions),
                "leaks": len(self.leaks), "leaked-objects": self.leaked_objects, "leaked-bytes": self.leaked_bytes,
                "reclaimable-bytes": self.reclaimable_bytes, "generations": self.generations,
                "images": self.images, "roots": self.roots, "packs": self.packs, "nodes": self.nodes,
                "blobs": self.blobs, "entries": self.entries, "index-segments": self.segments,
                "corruption-messages": list(self.corruptions), "leak-messages": list(self.leaks),
                "leaks-fixed": self.leaks_fixed, "repaired": list(self.repaired)}


def check_pool(url: str, *, progress: Callable[[int, int], None] | None = None) -> PoolCheck:
    """Check the whole pool at ``url`` (see the module docstring).  Holds the pool's
    gc lock shared (as every user does), so gc cannot free anything under it; writers
    may go on, and a pack a running writer has put but not committed yet shows as a
    leak.  ``progress(done, total)`` is called as blobs are verified."""
    out = PoolCheck(url)
    try:
        pool = Pool(url)
    except CorruptImage as exc:
        out.corruptions.append(str(exc))
        return out
    try:
        _check(pool, out, progress)
    finally:
        pool.close()
    return out


def _check(pool: Pool, out: PoolCheck, progress) -> None:
    errs = out.corruptions
    backend = pool.backend
    # generations: every one kept must parse; the newest decides what is live
    catalogs: list[tuple[int, dict]] = []
    for name in backend.list(GEN_PREFIX):
        try:
            number = int(name[len(GEN_PREFIX):], 16)
        except ValueError:
            errs.append(f"{pool.url}: {name}: not a generation name")
            continue
        try:
            cat = pool._read_generation(name)
        except be.ObjectMissing:
            continue  # pruned since it was listed
        except VdiskError as exc:
            errs.append(str(exc))
            continue
        if cat.get("generation") != number:
            errs.append(f"{pool.url}: {name} says it is generation {cat.get('generation')}")
            continue
        catalogs.append((number, cat))
    catalogs.sort(key=lambda c: c[0], reverse=True)
    out.generations = len(catalogs)
    if not catalogs:
        errs.append(f"{pool.url}: no readable catalog generation")
        return
    newest_no, newest = catalogs[0]
    out.images = len(newest.get("images") or {})
    roots: list[Root] = []
    seen: set = set()
    newest_mask = 0
    for number, cat in catalogs:
        for r in roots_of(cat, f"{pool.url} (generation {number})", generation=number, errors=errs):
            key = (r.entry, r.sketch)
            if key in seen and number != newest_no:
                continue  # an older generation's copy of a root already walked
            seen.add(key)
            r.bit = len(roots)
            roots.append(r)
            if number == newest_no:
                newest_mask |= 1 << r.bit
    out.roots = sum(1 for r in roots if r.generation == newest_no)

    found = scan(pool, roots, errors=errs)
    out.nodes, out.entries = found.nodes, found.entries
    total = sum(1 for _, k, _ in found.meta.values() if k != pc.NODE)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    out.blobs = verify_blobs(pool, found, errs, step)

    # packs: sound trailers; every blob a tree names is in its pack's directory
    listed = backend.list("packs/")
    out.packs = len(listed)
    by_pack: dict[int, list] = {}
    for loc in found.meta:
        by_pack.setdefault(loc[0], []).append(loc)
    present: set[int] = set()
    directories: dict[int, dict[int, tuple[int, int, int]]] = {}
    for name in listed:
        try:
            number = int(name.split("/", 1)[1], 16)
        except ValueError:
            out.leaks.append(f"{name}: not a pack name")
            _leak(out, backend, name)
            continue
        present.add(number)
        locs = by_pack.get(number, [])
        size = None
        try:
            size = backend.size(name)
            directory = read_pack_directory(backend, name, number, size)
        except VdiskError as exc:
            if locs:
                errs.append(str(exc))
            else:
                out.leaks.append(f"{name}: damaged, and nothing refers to it ({exc})")
                _leak(out, backend, name, size)
            continue
        directories[number] = directory
        live_bytes = 0
        live_newest = False
        for loc in locs:
            n, k, h = found.meta[loc]
            if directory.get(loc[1]) != (n, k, h):
                errs.append(f"{pool.url}: {found.label(found.mask[loc])}: blob {number:016x}+{loc[1]} is not in "
                            "its pack's directory (or differs from it)")
            if found.mask[loc] & newest_mask:
                live_newest = True
                live_bytes += n
        if not live_newest:
            why = "only older generations refer to it" if locs else "nothing refers to it"
            out.leaks.append(f"{name} ({size} bytes): {why}")
            _leak(out, backend, name, size)
        else:
            out.reclaimable_bytes += sum(n for (o, (n, _k, _h)) in directory.items()) - live_bytes
    for number in sorted(set(by_pack) - present):
        errs.append(f"{pool.url}: {pack_name(number)} is missing ({found.label(found.mask[by_pack[number][0]])} "
                    "refers to it)")

    # index segments: those listed must be sound; unlisted ones are leaks
    listed_segs = {}
    for key, kind in (("fp_segments", pc.SEG_FP), ("sf_segments", pc.SEG_SF)):
        for rec in newest.get(key) or []:
            try:
                listed_segs[str(rec["name"])] = (kind, int(rec["count"]))
            except (KeyError, TypeError, ValueError):
                errs.append(f"{pool.url}: bad index segment record {rec!r}")
    out.segments = len(listed_segs)
    for name, (kind, count) in sorted(listed_segs.items()):
        try:
            check_segment(backend, name, kind, count, directories)
        except be.ObjectMissing:
            errs.append(f"{pool.url}: index segment {name} is listed but missing (an index is a hint: "
                        "no data is lost, duplicates of its blocks are missed)")
        except (VdiskError, ValueError) as exc:
            errs.append(f"{pool.url}: index segment {name}: {exc} (an index is a hint: no data is lost)")
    for name in backend.list("index/"):
        if name not in listed_segs:
            out.leaks.append(f"{name}: an index segment no generation lists")
            _leak(out, backend, name)
    # temporary files of puts that never finished
    if isinstance(backend, be.LocalBackend):
        for path, size in stale_tmp_files(backend.root):
            out.leaks.append(f"{os.path.relpath(path, backend.root)}: a temporary file older than an hour")
            out.leaked_objects += 1
            out.leaked_bytes += size


def _leak(out: PoolCheck, backend: be.Backend, name: str, size: int | None = None) -> None:
    out.leaked_objects += 1
    if size is None:
        try:
            size = backend.size(name)
        except VdiskError:
            size = 0
    out.leaked_bytes += size


def read_pack_directory(backend: be.Backend, name: str, number: int, size: int) -> dict[int, tuple[int, int, int]]:
    """offset -> (length, kind, hash) of every blob in a pack's directory."""
    what = f"{backend.url}: {name}"
    if size < pc.PACK_HEADER.size + pc.PACK_FOOTER.size:
        raise CorruptImage(f"{what}: truncated pack")
    head = backend.get_range(name, 0, pc.PACK_HEADER.size)
    foot = backend.get_range(name, size - pc.PACK_FOOTER.size, pc.PACK_FOOTER.size)
    count = pc.PACK_FOOTER.unpack_from(foot)[0] if len(foot) == pc.PACK_FOOTER.size else 0
    want = min(size - pc.PACK_HEADER.size, pc.PACK_FOOTER.size + min(count, pc.MAX_PACK_BLOBS) * pc.PACK_DIR_ENTRY.size)
    tail = backend.get_range(name, size - want, want)
    return {o: (n, k, h) for o, n, k, h in pc.parse_pack_trailer(head, tail, size, number, what)}


def check_segment(backend: be.Backend, name: str, kind: int, count: int,
                  directories: dict[int, dict[int, tuple[int, int, int]]] | None = None) -> None:
    """A listed index segment: its framing, summary, record order and entries; a
    fingerprint's low half must be its entry's hash; with ``directories`` (pack
    number -> its directory), every record must name a blob of a pack, as it is
    there (after gc, no record names a blob that is gone)."""
    from .index import Segment

    seg = Segment(backend, name, count)
    if seg.kind != kind:
        raise CorruptImage("a segment of the other index")
    last = None
    for p in range(seg.pages):
        data = seg.read_page(p)
        first = data[: pc.SEG_KEY]
        if seg.summary[p * pc.SEG_KEY: (p + 1) * pc.SEG_KEY] != first:
            raise CorruptImage(f"page {p} does not start with the key its summary names")
        for i in range(0, len(data), pc.SEG_RECORD):
            k = data[i: i + pc.SEG_KEY]
            if last is not None and k <= last:
                raise CorruptImage(f"records out of order in page {p}")
            last = k
            e = pc.unpack_entry(data[i + pc.SEG_KEY: i + pc.SEG_RECORD], 0, f"{name}: page {p}")
            if e.kind not in (pc.DATA_KINDS if kind == pc.SEG_FP else (pc.RAW, pc.ZSTD)):
                raise CorruptImage(f"a record names a {pc.KIND_NAMES.get(e.kind)} entry")
            if kind == pc.SEG_FP and int.from_bytes(k[8:], "big") != e.hash:
                raise CorruptImage(f"page {p}: a fingerprint that is not its entry's hash")
            if directories is not None and directories.get(e.pack, {}).get(e.offset) != (e.length, e.kind, e.hash):
                raise CorruptImage(f"page {p}: a record names blob {e.pack:016x}+{e.offset}, which its pack "
                                   "does not hold")


def stale_tmp_files(root: str, age: float = TMP_AGE) -> list[tuple[str, int]]:
    """(path, size) of the ``.tmp.*`` files under a local pool older than ``age`` seconds."""
    out = []
    limit = time.time() - age
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "locks" and not d.startswith(".")]
        for f in filenames:
            if f.startswith(".tmp."):
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                if st.st_mtime < limit:
                    out.append((p, st.st_size))
    return out


__all__ = ["PoolCheck", "check_image", "check_pool", "read_pack_directory", "stale_tmp_files"]
