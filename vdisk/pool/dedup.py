"""Offline deduplication of a pool (``vdisk pool dedup``).

dedup finds data blobs with equal content stored more than once -- an image
written with ``dedup=off``, or duplicates two concurrent writers both stored --
by grouping the blobs every tree reaches by entry hash and comparing each
candidate with the group's first block byte for byte; every entry naming a
duplicate is made to name one copy (a RAW or ZSTD one if there is one), DELTA
blobs based on a duplicate are rewritten to be based on that copy, and the trees
are rewritten as gc rewrites them.  It holds every image's writer lock (images
being written are refused) and the gc lock shared, and frees nothing itself:
``pool gc`` then frees the duplicates.

On an object store it takes ``locks/gc`` exclusively instead and fences every writer
through the catalog first, as gc does (:func:`.gc.pool_to_itself`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..codec import pool as pc
from ..errors import CorruptImage, ImageLocked
from . import backend as be
from .gc import Rewriter, map_catalog, pool_to_itself, remap_indexes, rewrite_roots, stop_on_damage
from .space import Loc, renumber, roots_of, scan
from .store import Pool


@dataclass
class DedupReport:
    pool: str
    images: int = 0
    data_blobs: int = 0  # distinct data blobs the trees reach
    duplicate_blobs: int = 0  # blobs no entry names any more (gc frees them)
    duplicate_bytes: int = 0
    collisions: int = 0  # equal hashes, different bytes: kept apart
    deltas_rebased: int = 0
    nodes_rewritten: int = 0
    generation: int = 0

    def to_json(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def offline_dedup(url: str, *, progress: Callable[[int, int], None] | None = None) -> DedupReport:
    """Make every entry naming a copy of a block name one stored blob (see the module
    docstring).  Refused (:class:`ImageLocked`) while an image of the pool is written,
    or while gc runs."""
    if not url.startswith("s3://"):
        return _offline_dedup_local(url, progress)
    with pool_to_itself(url, "dedup") as (pool, guard):
        return _dedup(pool, {str(rec["id"]) for rec in pool.catalog["images"].values()}, progress, guard)


def _offline_dedup_local(url: str, progress) -> DedupReport:
    """A local pool: every image's writer lock exclusively, the gc lock shared (readers
    of snapshots may stay)."""
    pool = Pool(url)
    locks: list = []
    try:
        for name, rec in sorted(pool.catalog["images"].items()):
            try:
                locks.append(be.lock(pool.backend, f"img-{rec['id']}", exclusive=True))
            except be.LockBusy:
                raise ImageLocked(f"{url}/{name}: image is open; dedup rewrites the trees of every image of the "
                                  "pool: close it and run dedup again") from None
            except (KeyError, TypeError, ValueError):
                raise CorruptImage(f"{url}/{name}: bad image id in the catalog") from None
        pool.reload()
        return _dedup(pool, {str(rec["id"]) for rec in pool.catalog["images"].values()}, progress)
    finally:
        for lk in locks:
            lk.release()
        pool.close()


def _dedup(pool: Pool, locked: set[str], progress, guard: Callable[[dict], None] | None = None) -> DedupReport:
    rep = DedupReport(pool.url)
    errors: list[str] = []
    roots = renumber([r for r in roots_of(pool.catalog, pool.url, generation=pool.generation, errors=errors)
                      if r.image_id in locked])
    stop_on_damage(errors, pool.url, "dedup")
    rep.images = len({r.image for r in roots})
    found = scan(pool, roots, errors=errors)
    stop_on_damage(errors, pool.url, "dedup")
    by_hash: dict[int, list[Loc]] = {}
    for loc, (_n, k, h) in found.meta.items():
        if k in pc.DATA_KINDS:
            by_hash.setdefault(h, []).append(loc)
    rep.data_blobs = sum(len(v) for v in by_hash.values())
    groups = [sorted(v) for v in by_hash.values() if len(v) > 1]
    pack_live: dict[int, int] = {}
    for (pk, _off), (n, _k, _h) in found.meta.items():
        pack_live[pk] = pack_live.get(pk, 0) + n
    reloc: dict[Loc, pc.Entry] = {}
    for done, locs in enumerate(groups, 1):
        # the copy kept: a plain (RAW or ZSTD) one if there is one (never a delta on a
        # delta), in the pack holding the most live data (so the copies given up are in
        # emptier packs, which gc deletes or repacks), the smallest
        locs.sort(key=lambda loc: (found.meta[loc][1] == pc.DELTA, -pack_live[loc[0]], found.meta[loc][0], loc))
        while len(locs) > 1:
            keep = found.entry(locs[0])
            ref = pool.decode_block(keep, f"{pool.url}: blob {keep.pack:016x}+{keep.offset}")
            rest = []
            for loc in locs[1:]:
                e = found.entry(loc)
                if pool.decode_block(e, f"{pool.url}: blob {e.pack:016x}+{e.offset}") == ref:
                    reloc[loc] = keep
                    rep.duplicate_blobs += 1
                    rep.duplicate_bytes += e.length
                else:
                    rest.append(loc)
            rep.collisions += len(rest)
            locs = rest
        if progress is not None:
            progress(done, len(groups))
    if not reloc:
        rep.generation = pool.generation
        return rep
    # deltas based on a duplicate: based on the copy kept instead (equal bytes: same XOR)
    rebased: dict[Loc, pc.Entry] = {}
    for loc, base in sorted(found.bases.items()):
        new_base = reloc.get(base.loc)
        if new_base is None or loc in reloc:
            continue
        e = found.entry(loc)
        payload = pool.read_stored(e, f"{pool.url}: delta blob")
        rebased[loc] = pool.append_blob(pc.DELTA, new_base.pack_bytes() + payload[pc.DELTA_HEAD:], e.hash)
    rep.deltas_rebased = len(rebased)
    for loc, tgt in list(reloc.items()):
        if tgt.loc in rebased:
            reloc[loc] = rebased[tgt.loc]
    reloc.update(rebased)
    rw = Rewriter(pool, reloc, set())
    new_roots = rewrite_roots(pool, roots, rw)
    rep.nodes_rewritten = rw.nodes_rewritten
    idx_mutate, _made, _old = remap_indexes(pool, reloc, set())
    mutate = map_catalog(new_roots, {})

    def both(cat: dict) -> None:
        if guard is not None:
            guard(cat)
        mutate(cat)
        if idx_mutate is not None:
            idx_mutate(cat)

    pool.commit(both)
    pool.after_commit_indexes()
    rep.generation = pool.generation
    return rep
