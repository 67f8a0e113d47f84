"""Garbage collection of a pool (``vdisk pool gc``).

**gc** runs with the pool to itself: it takes ``locks/gc`` exclusively, which every
process that has the pool open holds shared (formats/pool.md 9), so no writer has
packs put but not committed and no reader walks an old root.  Then:

1. *mark*: walk every root of the newest generation (each image's live state and
   every snapshot, hidden ones too) with :func:`vdisk.pool.space.scan`: every node,
   data blob, delta base and sketch it reaches is live.  Any damage stops gc before
   it changes anything (what a damaged node points to cannot be known, so nothing
   could be freed safely): run ``pool check``.
2. *repack*: a pack whose live blobs fill less than half of it is rewritten: its
   live blobs are copied to new packs, every DELTA blob whose base moved is
   rewritten to name the new base (its base entry is part of its payload), and
   every tree that reaches a moved blob is rewritten bottom up, a node at a time,
   memoised by node so that subtrees shared by snapshots and clones stay shared.
   The index segments are rewritten to name the moved blobs and to drop records of
   blobs in deleted packs (an index is a hint, but a stale hint costs a lookup).
   The new roots, sketches and segments are committed as a new generation.
3. *sweep*: the generations before the newest are deleted (they may name what is
   about to go), then the packs with nothing live and the repacked ones, the index
   segments the newest generation does not list, and ``.tmp.*`` files older than
   an hour.

A crash anywhere leaves the pool consistent: before the commit, the new packs are
leaks; after it, the old packs are (they are deleted last).  Before deleting
anything, the new generation is walked again and gc stops if it still reaches a
pack about to go.

Offline deduplication (``vdisk pool dedup``) is :mod:`.dedup`; it shares the tree
rewriting, the locks and the fencing of writers defined here.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..codec import pool as pc
from ..errors import CorruptImage, ImageLocked, VdiskError
from . import backend as be
from .check import stale_tmp_files
from .index import Segment, new_object_name
from .space import Loc, Root, Scan, roots_of, scan
from .store import GEN_PREFIX, Pool, pack_name

REPACK_BELOW = 0.5  # repack a pack whose live blobs fill less than this fraction of it
REPACK_ROUNDS = 4
_LEAF = pc.LEVELS - 1
_ITER = pc.ENTRY.iter_unpack
_E = pc.ENTRY_SIZE


@dataclass
class GcReport:
    pool: str
    dry_run: bool = False
    freed_bytes: int = 0  # physical bytes before - after (net of what was written)
    deleted_bytes: int = 0
    written_bytes: int = 0
    live_bytes: int = 0  # stored bytes of every live blob
    packs_before: int = 0
    packs_after: int = 0
    packs_deleted: int = 0  # nothing live in them
    packs_repacked: int = 0
    blobs_moved: int = 0
    deltas_rebased: int = 0  # delta blobs rewritten because their base moved
    nodes_rewritten: int = 0
    segments_rewritten: int = 0
    segments_deleted: int = 0
    generations_deleted: int = 0
    tmp_files_deleted: int = 0
    generation: int = 0
    messages: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------- helpers
def physical_bytes(backend: be.Backend) -> int:
    """Bytes of every object of the pool (lock files aside), and of temporary files."""
    total = 0
    for name in backend.list(""):
        if name.startswith("locks/"):
            continue
        try:
            total += backend.size(name)
        except VdiskError:
            continue
    if isinstance(backend, be.LocalBackend):
        total += sum(n for _, n in stale_tmp_files(backend.root, age=-1e9))
    return total


def _pack_number(name: str) -> int | None:
    try:
        return int(name.split("/", 1)[1], 16)
    except (IndexError, ValueError):
        return None


def stop_on_damage(errors: list[str], url: str, doing: str) -> None:
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CorruptImage(f"{url}: {doing} refused: the pool is damaged: {errors[0]}{more}; "
                           "see vdisk pool check")


# ---------------------------------------------------------------------- rewriting
class Rewriter:
    """Rewrites trees so that entries name relocated blobs (``reloc``: old loc -> new
    entry) and nodes stored in ``moving`` packs are stored anew; memoised per node,
    so a subtree shared by many roots is rewritten once and stays shared."""

    def __init__(self, pool: Pool, reloc: dict[Loc, pc.Entry], moving: set[int]):
        self.pool = pool
        self.reloc = reloc
        self.moving = moving
        self.memo: dict[tuple[int, Loc], pc.Entry] = {}
        self.nodes_rewritten = 0

    def root(self, e: pc.Entry) -> pc.Entry:
        return self._fix(e, 0)

    def _fix(self, e: pc.Entry, lv: int) -> pc.Entry:
        if e.kind == pc.UNALLOCATED:
            return e
        key = (lv, e.loc)
        done = self.memo.get(key)
        if done is not None:
            return done
        node = self.pool.load_node(e, f"{self.pool.url}: tree node")
        buf: bytearray | None = None
        if lv == _LEAF:
            reloc = self.reloc
            for i, (_h, pk, off, _n, k, _fl) in enumerate(_ITER(node)):
                if k in pc.DATA_KINDS:
                    new = reloc.get((pk, off))
                    if new is not None:
                        if buf is None:
                            buf = bytearray(node)
                        buf[i * _E: (i + 1) * _E] = new.pack_bytes()
        else:
            for i, (h, pk, off, n, k, _fl) in enumerate(_ITER(node)):
                if k != pc.NODE:
                    continue
                child = pc.Entry(h, pk, off, n, k)
                new = self._fix(child, lv + 1)
                if new != child:
                    if buf is None:
                        buf = bytearray(node)
                    buf[i * _E: (i + 1) * _E] = new.pack_bytes()
        if buf is None and e.pack not in self.moving:
            out = e
        else:
            out = self.pool.store_node(bytes(buf if buf is not None else node))
            self.nodes_rewritten += 1
        self.memo[key] = out
        return out


def map_catalog(new_roots: dict[pc.Entry, pc.Entry], reloc: dict[Loc, pc.Entry]) -> Callable[[dict], None]:
    """A catalog mutation: each root and sketch reference named in the maps is
    replaced; anything else (changed by someone else meanwhile) is left alone."""
    def mutate(cat: dict) -> None:
        for rec in cat["images"].values():
            for r in [rec, *rec.get("snapshots", [])]:
                if r.get("root") is not None:
                    e = pc.Entry.from_json(r["root"], "catalog")
                    new = new_roots.get(e)
                    if new is not None:
                        r["root"] = None if new.kind == pc.UNALLOCATED else new.to_json()
                sk = r.get("sketch")
                if sk:
                    e = pc.Entry.from_json(sk["ref"], "catalog")
                    new = reloc.get(e.loc)
                    if new is not None and new.hash == e.hash:
                        sk["ref"] = new.to_json()
    return mutate


def remap_indexes(pool: Pool, reloc: dict[Loc, pc.Entry], gone: set[int]) -> tuple[Callable[[dict], None] | None,
                                                                                      list[str], list[str]]:
    """Rewrite the index segments that name moved blobs (``reloc``) or blobs in packs
    about to be deleted (``gone``; such records are dropped), and drop unreadable
    segments from the list (an index is a hint).  Returns the catalog mutation, the
    new segment names and the old ones it replaces."""
    replaced: dict[str, dict | None] = {}
    made: list[str] = []
    for key in ("fp_segments", "sf_segments"):
        for rec in pool.catalog.get(key) or []:
            try:
                name, count, tier = str(rec["name"]), int(rec["count"]), int(rec.get("tier", 0))
                seg = Segment(pool.backend, name, count)
                records = list(seg.records())
            except (KeyError, TypeError, ValueError, VdiskError):
                replaced[str(rec.get("name")) if isinstance(rec, dict) else repr(rec)] = None
                continue
            out: list[tuple[bytes, bytes]] = []
            changed = False
            for k, v in records:
                _h, pk, off, _n, _k, _fl = pc.ENTRY.unpack(v)
                new = reloc.get((pk, off))
                if new is not None:
                    out.append((k, new.pack_bytes()))
                    changed = True
                elif pk in gone:
                    changed = True
                else:
                    out.append((k, v))
            if not changed:
                continue
            if out:
                nn = new_object_name("index")
                pool.backend.put(nn, pc.encode_segment(seg.kind, out))
                made.append(nn)
                replaced[name] = {"name": nn, "count": len(out), "tier": tier}
            else:
                replaced[name] = None
    if not replaced:
        return None, [], []

    def mutate(cat: dict) -> None:
        for key in ("fp_segments", "sf_segments"):
            lst = []
            for rec in cat.get(key) or []:
                name = str(rec.get("name")) if isinstance(rec, dict) else repr(rec)
                if name in replaced:
                    if replaced[name] is not None:
                        lst.append(dict(replaced[name]))
                else:
                    lst.append(rec)
            cat[key] = lst
    return mutate, made, [n for n in replaced if n.startswith("index/")]


def _relocate(pool: Pool, found: Scan, moving: set[int]) -> tuple[dict[Loc, pc.Entry], int]:
    """Copy every live blob of the ``moving`` packs to the pack being filled: plain
    data and sketches as they are, verified; then DELTA blobs that move or whose base
    moved, with the new base entry.  Returns (old loc -> new entry, deltas rebased)."""
    reloc: dict[Loc, pc.Entry] = {}
    for loc in sorted(found.meta):
        if loc[0] not in moving:
            continue
        n, k, h = found.meta[loc]
        if k not in (pc.RAW, pc.ZSTD, pc.SKETCH):
            continue
        e = pc.Entry(h, loc[0], loc[1], n, k)
        what = f"{pool.url}: {found.label(found.mask[loc])}: blob {loc[0]:016x}+{loc[1]}"
        if k != pc.SKETCH:
            pool.decode_block(e, what)  # never copy a damaged blob as if it were sound
        reloc[loc] = pool.append_blob(k, pool.read_stored(e, what), h)
    rebased = 0
    for loc, base in sorted(found.bases.items()):
        new_base = reloc.get(base.loc)
        if loc[0] not in moving and new_base is None:
            continue
        n, k, h = found.meta[loc]
        e = pc.Entry(h, loc[0], loc[1], n, k)
        what = f"{pool.url}: {found.label(found.mask[loc])}: delta blob {loc[0]:016x}+{loc[1]}"
        pool.decode_block(e, what)
        payload = pool.read_stored(e, what)
        if new_base is not None:
            payload = new_base.pack_bytes() + payload[pc.DELTA_HEAD:]
            rebased += 1
        reloc[loc] = pool.append_blob(pc.DELTA, payload, h)
    return reloc, rebased


def rewrite_roots(pool: Pool, roots: list[Root], rw: Rewriter) -> dict[pc.Entry, pc.Entry]:
    new_roots: dict[pc.Entry, pc.Entry] = {}
    for r in roots:
        if r.entry.kind == pc.UNALLOCATED or r.entry in new_roots:
            continue
        new = rw.root(r.entry)
        if new != r.entry:
            new_roots[r.entry] = new
    return new_roots


# ---------------------------------------------------------------------- gc
def collect(url: str, *, repack_below: float = REPACK_BELOW, dry_run: bool = False,
            tmp_age: float | None = None) -> GcReport:
    """Garbage-collect the pool at ``url`` (see the module docstring).  Refused
    (:class:`ImageLocked`) while any process has the pool open.  ``dry_run`` changes
    nothing and reports what would be freed (deleted_bytes; the repacking's cost is
    not known without doing it)."""
    from .check import TMP_AGE

    with pool_to_itself(url, "gc", fence=not dry_run) as (pool, guard):
        return _collect(pool, repack_below, dry_run, TMP_AGE if tmp_age is None else tmp_age, guard)


@contextlib.contextmanager
def pool_to_itself(url: str, doing: str, *, fence: bool = True):
    """The pool at ``url`` opened without announcing itself, with the ``gc`` lock held
    exclusively (:func:`exclusive`) and, on an object store with ``fence``, every
    writer fenced (:func:`fence_writers`): yields ``(pool, guard)``, guard None where
    nothing was fenced.  Leases, lock and pool are let go on the way out."""
    pool = Pool(url, lock=False)
    try:
        lk = exclusive(pool, url, doing)
        leases: list = []
        try:
            pool.reload()
            guard = fence_writers(pool, url, doing, leases) if fence and not pool.local else None
            yield pool, guard
        finally:
            for ls in leases:
                ls.release()
            lk.release()
    finally:
        pool.close()


def exclusive(pool: Pool, url: str, doing: str):
    """The ``gc`` lock, exclusively: no process has the pool open (on an object store:
    none that renewed its announcement within the ttl)."""
    try:
        return be.lock(pool.backend, "gc", exclusive=True, what=f"pool {doing}")
    except be.LockBusy as exc:
        by = f" by {exc.holder}" if exc.holder else ""
        raise ImageLocked(f"{url}: the pool is in use{by} (an image of it is open, or a check, gc or dedup runs); "
                          f"{doing} needs it to itself: close its images and run {doing} again") from None


def fence_writers(pool: Pool, url: str, doing: str, leases: list) -> Callable[[dict], None]:
    """On an object store, with the ``gc`` lock held exclusively: make sure no writer
    can commit any more what it wrote before (formats/pool.md 9).  The lock alone does
    not: a writer paused past the ttl looks gone, and once resumed would commit trees
    naming packs that gc, finding nothing live in them, deleted.  So: take every
    image's lease (a fresh one -- a writer at work -- refuses, naming it), then commit
    one generation naming this process's epoch as every image's writer; from then on a
    paused writer's commit finds another epoch in the catalog and fails
    (:class:`~.store.Fenced`).  Returns the guard that the commit of the work must
    pass: the catalog it is built on is still the very one fenced and marked, so a
    writer that took an image over while *this* process was paused past the ttl makes
    that commit fail instead, before anything is deleted.  The leases are appended to
    ``leases`` (the caller releases them)."""
    from . import lease as lm
    from .store import Fenced

    fenced: dict[str, tuple[str, int, dict]] = {}
    for name, rec in sorted(pool.catalog["images"].items()):
        try:
            image_id = str(rec["id"])
            floor = int((rec.get("writer") or {}).get("epoch", 0))
        except (KeyError, TypeError, ValueError):
            raise CorruptImage(f"{url}/{name}: bad image id or writer in the catalog") from None
        ls = lm.Lease(pool.backend, image_id, f"{url}/{name}")
        try:
            ls.acquire(floor)
        except ImageLocked as exc:
            raise ImageLocked(f"{exc}; {doing} needs every writer out of the pool: close it and run "
                              f"{doing} again") from None
        leases.append(ls)
        fenced[name] = (image_id, ls.epoch, dict(ls.record))

    def claim_all(cat: dict) -> None:
        have = {n: str(r.get("id")) for n, r in cat["images"].items() if isinstance(r, dict)}
        if have != {n: v[0] for n, v in fenced.items()}:
            raise ImageLocked(f"{url}: images were created or removed while {doing} took the writers' leases; "
                              f"run {doing} again")
        for n, (_id, epoch, who) in fenced.items():
            r = cat["images"][n]
            w = r.get("writer") or {}
            if int(w.get("epoch", 0)) >= epoch:
                raise ImageLocked(f"{url}/{n}: image was taken for writing by {lm.describe(w)} while {doing} "
                                  f"took its lease; run {doing} again")
            r["writer"] = {k: who[k] for k in ("epoch", "host", "pid", "since")}
            r["writer"]["by"] = f"pool {doing}"

    if fenced:
        pool.commit(claim_all)
    marked = pool.catalog.get("commit_id")

    def guard(cat: dict) -> None:
        if cat.get("commit_id") != marked:
            raise Fenced(f"{url}: {doing} was paused past its lock's ttl and the pool changed meanwhile "
                         f"(generation {cat.get('generation')} is not the one it marked); nothing was "
                         f"changed or deleted: run {doing} again")
    return guard


def _collect(pool: Pool, repack_below: float, dry_run: bool, tmp_age: float,
             guard: Callable[[dict], None] | None = None) -> GcReport:
    backend = pool.backend
    rep = GcReport(pool.url, dry_run=dry_run)
    before = physical_bytes(backend)
    # the segments there are now: only these may be swept (on an object store a writer
    # that took over while gc was paused past its ttl may have put and listed new ones)
    segments_seen = set(backend.list("index/"))
    errors: list[str] = []
    roots = roots_of(pool.catalog, pool.url, generation=pool.generation, errors=errors)
    stop_on_damage(errors, pool.url, "gc")
    found = scan(pool, roots, errors=errors)
    stop_on_damage(errors, pool.url, "gc")
    rep.live_bytes = sum(n for n, _, _ in found.meta.values())

    live_by_pack: dict[int, int] = {}
    for (pk, _off), (n, _k, _h) in found.meta.items():
        live_by_pack[pk] = live_by_pack.get(pk, 0) + n
    packs = {}
    for name in backend.list("packs/"):
        number = _pack_number(name)
        if number is not None:
            packs[number] = (name, backend.size(name))
    missing = set(live_by_pack) - set(packs)
    if missing:
        stop_on_damage([f"{pack_name(min(missing))} is missing"], pool.url, "gc")
    rep.packs_before = len(packs)
    dead = {p for p in packs if p not in live_by_pack}
    sparse = {p for p, (_name, size) in packs.items()
              if p in live_by_pack and live_by_pack[p] < repack_below * (size - pc.PACK_HEADER.size)}
    gone = dead | sparse
    if dry_run:
        rep.packs_deleted = len(dead)
        rep.packs_repacked = len(sparse)
        rep.deleted_bytes = sum(packs[p][1] for p in gone)
        rep.written_bytes = sum(live_by_pack[p] for p in sparse)
        rep.freed_bytes = rep.deleted_bytes - rep.written_bytes
        rep.packs_after = len(packs) - len(gone) + (1 if sparse else 0)
        return rep

    # repack: copy, rewrite the trees; rewriting can leave other packs sparse (a pack
    # whose deltas were all rebased), so again with those, a few rounds at most
    reloc: dict[Loc, pc.Entry] = {}
    cat_mutations: list[Callable[[dict], None]] = []
    repacked: set[int] = set()
    new_cat = pool.catalog
    cur_roots, cur_found = roots, found
    for _round in range(REPACK_ROUNDS):
        if not sparse:
            break
        moved, rebased = _relocate(pool, cur_found, sparse)
        rep.deltas_rebased += rebased
        rw = Rewriter(pool, moved, sparse)
        new_roots = rewrite_roots(pool, cur_roots, rw)
        rep.nodes_rewritten += rw.nodes_rewritten
        for old, tgt in reloc.items():  # compose: an old loc -> where its blob is now
            if tgt.loc in moved:
                reloc[old] = moved[tgt.loc]
        reloc.update(moved)
        mutate = map_catalog(new_roots, moved)
        cat_mutations.append(mutate)
        repacked |= sparse
        # walk the catalog about to be committed: what it does not reach goes, and
        # it must reach nothing in a pack about to go (by construction; checked)
        new_cat = copy.deepcopy(new_cat)
        mutate(new_cat)
        errors = []
        cur_roots = roots_of(new_cat, pool.url, generation=pool.generation + 1, errors=errors)
        cur_found = scan(pool, cur_roots, errors=errors)
        stop_on_damage(errors, pool.url, "gc (walking the repacked trees)")
        live_now: dict[int, int] = {}
        for (pk, _off), (n, _k, _h) in cur_found.meta.items():
            live_now[pk] = live_now.get(pk, 0) + n
        if set(live_now) & repacked:
            raise VdiskError(f"{pool.url}: gc: the repacked trees still refer to pack "
                             f"{min(set(live_now) & repacked):016x}; nothing was changed "
                             "(a bug in vdisk: please report it)")
        gone = {p for p in packs if p not in live_now}
        sparse = {p for p, (_name, size) in packs.items()
                  if p in live_now and live_now[p] < repack_below * (size - pc.PACK_HEADER.size)}
    rep.blobs_moved = len(reloc)
    rep.packs_repacked = len(repacked)
    cat_mutate = None
    if cat_mutations:
        def cat_mutate(cat: dict) -> None:
            for m in cat_mutations:
                m(cat)
    idx_mutate, seg_made, seg_replaced = remap_indexes(pool, reloc, gone) if gone else (None, [], [])
    rep.segments_rewritten = len(seg_made)
    mutations = [m for m in (cat_mutate, idx_mutate) if m is not None]
    if mutations:
        pool.commit(lambda cat: [m(cat) for m in [guard, *mutations] if m is not None])
        pool.after_commit_indexes()
    rep.generation = pool.generation

    # sweep
    deleted = 0
    if gone or seg_replaced:
        for name in backend.list(GEN_PREFIX):
            try:
                number = int(name[len(GEN_PREFIX):], 16)
            except ValueError:
                continue
            if number < pool.generation:
                deleted += _delete(backend, name)
                rep.generations_deleted += 1
    for p in sorted(gone):
        deleted += _delete(backend, packs[p][0])
    rep.packs_deleted = len(gone - repacked)
    listed = {str(r.get("name")) for key in ("fp_segments", "sf_segments") for r in pool.catalog.get(key) or []
              if isinstance(r, dict)}
    for name in backend.list("index/"):
        if name not in listed and name in segments_seen:
            deleted += _delete(backend, name)
            rep.segments_deleted += 1
    if isinstance(backend, be.LocalBackend):
        for path, size in stale_tmp_files(backend.root, age=tmp_age):
            try:
                os.unlink(path)
            except OSError:
                continue
            deleted += size
            rep.tmp_files_deleted += 1
    backend.barrier()
    rep.deleted_bytes = deleted
    after = physical_bytes(backend)
    rep.freed_bytes = before - after
    rep.written_bytes = max(0, after - (before - deleted))
    rep.packs_after = len(backend.list("packs/"))
    return rep


def _delete(backend: be.Backend, name: str) -> int:
    try:
        size = backend.size(name)
    except be.ObjectMissing:
        return 0
    backend.delete(name)
    return size
