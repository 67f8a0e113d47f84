"""Reachability and space accounting in a pool (formats/pool.md 4-6).

Everything that decides what a pool holds -- ``pool gc`` (what is live), ``pool
check`` (what must decode, what is leaked), ``pool info`` and ``image_space`` (who
refers to what) -- walks the same graph: the catalog names *roots* (each image's
live state and each snapshot, hidden ones too); a root is a tree of NODE blobs
whose leaves name data blobs; a DELTA blob names its base; a root has a sketch
blob.  :func:`scan` walks every tree of a set of roots level by level (all roots
at once), so a node shared by many roots -- a snapshot, a clone, an unchanged
subtree -- is read once, and it tags every blob it reaches with the set of roots
that reach it, as a bit mask (bit *i*: root *i*).  Space per root and per image
falls out of the masks:

- a root *refers to* every blob whose mask has its bit;
- a blob is *unique* to a root when its mask is that bit alone (deleting that
  snapshot frees it, ZFS ``written``-style "used"), and unique to an image when
  its mask holds no bit of another image's roots (``rbd du``'s "used").

Bytes are stored bytes of blobs (compressed sizes; nodes and sketches included),
each blob counted once however many entries name it.

Cost: one read of each distinct node, and of the first 24 bytes of each DELTA
blob; memory: a few dict entries per distinct blob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..codec import pool as pc
from ..errors import CorruptImage, VdiskError
from .store import Pool

_LEAF = pc.LEVELS - 1
_F = pc.FANOUT
_HDR = pc.PACK_HEADER.size
_ITER = pc.ENTRY.iter_unpack
_UNALLOC = pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)

Loc = tuple[int, int]  # (pack number, offset): a blob's identity


@dataclass
class Root:
    """One tree root the catalog names: an image's live state or one snapshot."""

    bit: int
    image: str
    image_id: str
    snapshot: dict | None  # the snapshot record; None: the live state
    entry: pc.Entry
    sketch: pc.Entry | None
    sketch_bytes: int
    size: int
    generation: int

    @property
    def label(self) -> str:
        if self.snapshot is None:
            return self.image
        return f"{self.image}@{self.snapshot.get('name')} (#{self.snapshot.get('id')})"


def roots_of(catalog: dict, what: str, *, generation: int = 0, first_bit: int = 0,
             errors: list[str] | None = None) -> list[Root]:
    """The roots of a catalog: each image's live state, then its snapshots (hidden
    ones too), bits from ``first_bit`` on.  A malformed record is an error (raised,
    or appended to ``errors`` and skipped)."""
    out: list[Root] = []
    images = catalog.get("images")
    if not isinstance(images, dict):
        _fail(errors, f"{what}: the catalog has no image table")
        return out
    for name, rec in images.items():
        w = f"{what}/{name}"
        try:
            if not isinstance(rec, dict):
                raise CorruptImage(f"{w}: not an image record")
            states = [(None, rec)] + [(s, s) for s in rec.get("snapshots") or []]
            for snap, r in states:
                if not isinstance(r, dict):
                    raise CorruptImage(f"{w}: bad snapshot record")
                sw = w if snap is None else f"{w}@{r.get('name')}"
                entry = pc.Entry.from_json(r["root"], sw) if r.get("root") is not None else _UNALLOC
                if entry.kind not in (pc.NODE, pc.UNALLOCATED):
                    raise CorruptImage(f"{sw}: its root is a {pc.KIND_NAMES.get(entry.kind)} blob, not a tree node")
                sk, skb = None, 0
                ref = r.get("sketch")
                if ref:
                    sk = pc.Entry.from_json(ref["ref"], f"{sw}: sketch")
                    skb = int(ref["bytes"])
                    int(ref["shift"])
                    if sk.kind != pc.SKETCH:
                        raise CorruptImage(f"{sw}: its sketch reference is not a sketch blob")
                out.append(Root(first_bit + len(out), str(name), str(rec.get("id")), snap, entry, sk, skb,
                                int(r.get("size", 0)), generation))
        except (KeyError, TypeError, ValueError, AttributeError):
            _fail(errors, f"{w}: malformed image record")
        except CorruptImage as exc:
            _fail(errors, str(exc))
    return out


def _fail(errors: list[str] | None, message: str) -> None:
    if errors is None:
        raise CorruptImage(message)
    errors.append(message)


def renumber(roots: list[Root]) -> list[Root]:
    """Give ``roots`` the bits 0, 1, ... in order (after a selection of them)."""
    for i, r in enumerate(roots):
        r.bit = i
    return roots


def bits(mask: int):
    """The bit numbers set in ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass
class Scan:
    """What :func:`scan` found: every blob reached (``meta``: loc -> (stored length,
    kind, hash); ``mask``: loc -> the roots reaching it), each DELTA blob's base,
    and counts."""

    roots: list[Root]
    meta: dict[Loc, tuple[int, int, int]] = field(default_factory=dict)
    mask: dict[Loc, int] = field(default_factory=dict)
    bases: dict[Loc, pc.Entry] = field(default_factory=dict)
    sketch_sizes: dict[Loc, int] = field(default_factory=dict)
    errors: list[str] | None = None
    nodes: int = 0
    entries: int = 0  # leaf entries visited (every allocated entry of every distinct leaf)

    def entry(self, loc: Loc) -> pc.Entry:
        n, k, h = self.meta[loc]
        return pc.Entry(h, loc[0], loc[1], n, k)

    def label(self, mask: int) -> str:
        """The name of the first root in ``mask`` (for messages)."""
        for b in bits(mask):
            if b < len(self.roots) and self.roots[b].bit == b:
                return self.roots[b].label
            for r in self.roots:
                if r.bit == b:
                    return r.label
        return "?"

    def _blob(self, pk: int, off: int, n: int, kind: int, h: int, m: int, where: Callable[[], str]) -> None:
        loc = (pk, off)
        old = self.meta.get(loc)
        if old is None:
            self.meta[loc] = (n, kind, h)
            self.mask[loc] = m
            return
        if old != (n, kind, h):
            _fail(self.errors, f"{where()}: blob {pk:016x}+{off} is named with two different lengths, kinds or "
                               f"hashes ({old[0]}/{pc.KIND_NAMES.get(old[1])}/{old[2]:016x} and "
                               f"{n}/{pc.KIND_NAMES.get(kind)}/{h:016x})")
        self.mask[loc] |= m


def _bad_ref(pk: int, off: int, n: int) -> bool:
    return pk == 0 or n == 0 or off < _HDR or off + n > pc.MAX_PACK


def scan(pool: Pool, roots: list[Root], *, errors: list[str] | None = None,
         on_leaf: Callable[[int, pc.Entry, int, bytes], None] | None = None,
         progress: Callable[[int], None] | None = None) -> Scan:
    """Walk every tree of ``roots`` (and their sketches and delta bases).

    Errors (an undecodable node, a bad entry, a missing pack) raise
    :class:`CorruptImage`, or, with ``errors``, are appended there and the walk goes
    on with what it can read.  ``on_leaf(leaf index, leaf entry, mask, leaf
    node)`` is called once per distinct leaf; ``progress(n)`` per node read."""
    if any(r.bit != i for i, r in enumerate(roots)):
        raise ValueError("scan: root i must have bit i (see renumber)")
    res = Scan(roots, errors=errors)
    # a node is keyed by its blob, not by where it is named: a tree that names one
    # subtree at many positions (512^3 of them, if hostile) costs one visit per level
    # (a valid tree names each node at one position; the first one seen is reported)
    level: dict[Loc, list] = {}
    for r in roots:
        m = 1 << r.bit
        if r.sketch is not None:
            res._blob(r.sketch.pack, r.sketch.offset, r.sketch.length, pc.SKETCH, r.sketch.hash, m,
                      lambda r=r: f"{r.label}: sketch")
            res.sketch_sizes[r.sketch.loc] = r.sketch_bytes
        e = r.entry
        if e.kind == pc.UNALLOCATED:
            continue
        cur = level.get(e.loc)
        if cur is None:
            level[e.loc] = [e, m, 0]
        else:
            cur[1] |= m
    what = pool.url
    for lv in range(pc.LEVELS):
        nxt: dict[Loc, list] = {}
        for _loc, (e, m, idx) in sorted(level.items()):
            try:
                node = pool.load_node(e, f"{what}: {res.label(m)}: tree node (level {lv}, index {idx})")
            except VdiskError as exc:
                _fail(errors, str(exc))
                continue
            res.nodes += 1
            if progress is not None:
                progress(1)
            res._blob(e.pack, e.offset, e.length, pc.NODE, e.hash, m,
                      lambda m=m: f"{what}: {res.label(m)}: tree node")
            if lv < _LEAF:
                base = idx * _F
                for i, (h, pk, off, n, k, fl) in enumerate(_ITER(node)):
                    if k == pc.UNALLOCATED and not (pk or off or n or fl):
                        continue
                    if k != pc.NODE or fl or _bad_ref(pk, off, n):
                        _fail(errors, f"{what}: {res.label(m)}: tree node (level {lv}, index {idx}) entry {i}: "
                                      f"a {pc.KIND_NAMES.get(k, k)} entry (flags {fl}) where a tree node is expected")
                        continue
                    cur = nxt.get((pk, off))
                    if cur is None:
                        nxt[(pk, off)] = [pc.Entry(h, pk, off, n, k), m, base + i]
                    else:
                        cur[1] |= m
                        if cur[0].hash != h or cur[0].length != n:
                            _fail(errors, f"{what}: {res.label(m)}: tree node {pk:016x}+{off} is named with two "
                                          "different lengths or hashes")
                continue
            count = 0
            meta, mask = res.meta, res.mask
            for i, (h, pk, off, n, k, fl) in enumerate(_ITER(node)):
                if k <= pc.ZERO and not (pk or off or n or fl):
                    continue
                if k in pc.DATA_KINDS and not fl and not _bad_ref(pk, off, n):
                    count += 1
                    loc = (pk, off)
                    old = meta.get(loc)
                    if old is None:
                        meta[loc] = (n, k, h)
                        mask[loc] = m
                    elif old == (n, k, h):
                        mask[loc] |= m
                    else:
                        res._blob(pk, off, n, k, h, m, lambda m=m, i=i, idx=idx: (
                            f"{what}: {res.label(m)}: block at guest offset {(idx * _F + i) * pc.BLOCK:#x}"))
                    continue
                _fail(errors, f"{what}: {res.label(m)}: block at guest offset {(idx * _F + i) * pc.BLOCK:#x}: "
                              f"a {pc.KIND_NAMES.get(k, k)} entry (flags {fl}) where data is expected")
            res.entries += count
            if on_leaf is not None:
                on_leaf(idx, e, m, node)
        level = nxt
    _scan_bases(pool, res)
    return res


def _scan_bases(pool: Pool, res: Scan) -> None:
    """Read the head of every DELTA blob: its base entry, which must be a RAW or
    ZSTD blob; the base is reached by every root that reaches the delta."""
    deltas = sorted(loc for loc, (_, k, _) in res.meta.items() if k == pc.DELTA)
    for loc in deltas:
        n = res.meta[loc][0]
        what = f"{pool.url}: {res.label(res.mask[loc])}: delta blob {loc[0]:016x}+{loc[1]}"
        if n <= pc.DELTA_HEAD:
            _fail(res.errors, f"{what}: truncated delta blob")
            continue
        try:
            head = read_head(pool, loc, pc.DELTA_HEAD)
            base = pc.unpack_entry(head, 0, what)
        except VdiskError as exc:
            _fail(res.errors, str(exc))
            continue
        if base.kind not in (pc.RAW, pc.ZSTD):
            _fail(res.errors, f"{what}: its base is a {pc.KIND_NAMES.get(base.kind)} blob, not RAW or ZSTD")
            continue
        res.bases[loc] = base
        res._blob(base.pack, base.offset, base.length, base.kind, base.hash, res.mask[loc], lambda w=what: f"{w}: base")


def read_head(pool: Pool, loc: Loc, n: int) -> bytes:
    """The first ``n`` bytes of the blob at ``loc`` (also in the pack being filled)."""
    return pool.read_stored(pc.Entry(0, loc[0], loc[1], n, pc.RAW), f"{pool.url}: blob {loc[0]:016x}+{loc[1]}")


# ---------------------------------------------------------------------- accounting
def bytes_by_mask(res: Scan) -> dict[int, int]:
    out: dict[int, int] = {}
    meta = res.meta
    for loc, m in res.mask.items():
        out[m] = out.get(m, 0) + meta[loc][0]
    return out


def accounting(res: Scan) -> dict:
    """Per root: referenced and unique bytes; per image (all its roots): referenced,
    unique and shared bytes, and its live state's."""
    by_mask = bytes_by_mask(res)
    referenced = [0] * len(res.roots)
    for m, n in by_mask.items():
        for b in bits(m):
            referenced[b] += n
    images: dict[str, int] = {}
    for r in res.roots:
        images[r.image] = images.get(r.image, 0) | (1 << r.bit)
    out: dict = {"roots": [], "images": {}}
    for r in res.roots:
        u = by_mask.get(1 << r.bit, 0)
        out["roots"].append({"referenced_bytes": referenced[r.bit], "unique_bytes": u,
                             "shared_bytes": referenced[r.bit] - u})
    for name, ib in images.items():
        ref = uniq = 0
        for m, n in by_mask.items():
            if m & ib:
                ref += n
                if not m & ~ib:
                    uniq += n
        out["images"][name] = {"referenced_bytes": ref, "unique_bytes": uniq, "shared_bytes": ref - uniq}
    return out


def image_space(driver) -> dict:
    """``space_usage`` of a pool image, in the shape every driver returns:
    ``{"live": {referenced_bytes, unique_bytes, shared_bytes}, "snapshots": {id:
    {...}}, "image": {...}}``.  Unique bytes are those no other root in the whole
    pool refers to -- what deleting that state (or, for "image", the image with its
    snapshots) and then ``pool gc`` would free; shared = referenced - unique.
    Flushes a writable image first, so the counts are those of its durable state."""
    img = driver.img
    if not img.read_only:
        img.flush()
    pool = img.pool
    roots = roots_of(pool.catalog, pool.url, generation=pool.generation)
    if img.snapshot is None:
        for r in roots:  # the open image's committed root, which may be newer than the catalog read
            if r.image == img.name and r.snapshot is None:
                r.entry = img.root
    res = scan(pool, roots)
    acc = accounting(res)
    out: dict = {"live": None, "snapshots": {}, "image": acc["images"].get(img.name)}
    for r, a in zip(roots, acc["roots"]):
        if r.image != img.name:
            continue
        if r.snapshot is None:
            out["live"] = a
        else:
            out["snapshots"][int(r.snapshot["id"])] = a
    return out
