"""Pool-level operations, the Python API behind ``vdisk pool``: create, info, ls,
check, gc, similar, dedup.  The CLI (:mod:`vdisk.cli.pool`) only formats what these
return.

Results are plain dicts (JSON-ready, snake_case keys; the CLI prints them with
hyphens) or the report objects of :mod:`.check` and :mod:`.gc`.  Every function
opens the pool itself, by its directory, and closes it before it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..codec import pool as pc
from ..errors import UsageError
from . import backend as be
from .check import PoolCheck, check_pool, stale_tmp_files
from .dedup import DedupReport, offline_dedup
from .gc import GcReport, collect
from .space import Root, accounting, bits, renumber, roots_of, scan
from .store import Pool

__all__ = [
    "lineage_tree",
    "parse_settings",
    "pool_check",
    "pool_create",
    "pool_dedup",
    "pool_gc",
    "pool_info",
    "pool_ls",
    "pool_similar",
]

_ON = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


# ---------------------------------------------------------------------- create
def parse_settings(options: dict[str, str]) -> dict:
    """Pool settings from ``-o`` values: dedup=on|off, delta=on|off, zstd_level=N
    (1 to 22), compression=zstd."""
    out: dict = {}
    for key, value in options.items():
        k = key.strip().replace("-", "_")
        v = str(value).strip().lower()
        if k in ("dedup", "delta"):
            if v not in _ON:
                raise UsageError(f"-o {k}={value}: expected on or off")
            out[k] = _ON[v]
        elif k in ("zstd_level", "level", "compression_level"):
            try:
                n = int(v)
            except ValueError:
                raise UsageError(f"-o {k}={value}: expected a number from 1 to 22") from None
            if not 1 <= n <= 22:
                raise UsageError(f"-o {k}={value}: the zstd level is from 1 to 22")
            out["zstd_level"] = n
        elif k in ("compression", "compression_type"):
            if v != "zstd":
                raise UsageError(f"-o {k}={value}: pools compress with zstd only")
            out["compression"] = "zstd"
        else:
            raise UsageError(f"unknown pool option {key!r} (known: dedup, delta, zstd_level)")
    return out


def pool_create(url: str, settings: dict | None = None) -> dict:
    """Create an empty pool in the directory ``url`` (new or empty); returns its
    identity and settings."""
    Pool.create(url, settings)
    pool = Pool(url, lock=False)
    try:
        return {"pool": pool.url, "pool_id": pool.pool_id, "settings": dict(pool.settings)}
    finally:
        pool.close()


# ---------------------------------------------------------------------- ls
def _snapshot_name(images: dict, parent: dict | None) -> str | None:
    """``IMAGE@SNAP`` (``IMAGE@#ID`` for a hidden snapshot) a clone's parent names."""
    if not parent:
        return None
    pname = parent.get("image")
    sid = parent.get("snapshot")
    prec = images.get(pname)
    if isinstance(prec, dict):
        for s in prec.get("snapshots", []):
            if s.get("id") == sid:
                return f"{pname}@#{sid}" if s.get("hidden") else f"{pname}@{s.get('name')}"
    return f"{pname}@#{sid}"


def _image_entry(images: dict, name: str, rec: dict) -> dict:
    par = rec.get("parent")
    snaps = [{"id": s.get("id"), "name": s.get("name"), "size": s.get("size"), "created": s.get("created"),
              "hidden": bool(s.get("hidden")), "holders": [h[1] for h in s.get("holders", [])]}
             for s in rec.get("snapshots", [])]
    b = rec.get("backing")
    return {"name": name, "id": rec.get("id"), "size": rec.get("size"), "created": rec.get("created"),
            "owner": rec.get("owner"), "labels": dict(rec.get("labels") or {}),
            "parent": _snapshot_name(images, par),
            "parent_image": par.get("image") if par else None,
            "parent_snapshot_id": par.get("snapshot") if par else None,
            "backing": ({"filename": b.get("filename"), "format": b.get("format"), "snapshot": b.get("snapshot")}
                        if b else None),
            "snapshots": snaps}


def pool_ls(url: str) -> list[dict]:
    """Every image of the pool, by name: size, owner, labels, parent (``IMAGE@SNAP``
    of a native clone), backing file, snapshots (with their holders)."""
    pool = Pool(url)
    try:
        images = pool.catalog["images"]
        return [_image_entry(images, n, images[n]) for n in sorted(images)]
    finally:
        pool.close()


def lineage_tree(images: list[dict]) -> list[dict]:
    """The lineage as a forest: ``[{image, snapshots: [{id, name, hidden, clones:
    [subtree, ...]}]}]`` from :func:`pool_ls`'s list.  Roots are the images that are
    no native clone of an image of the pool (or whose parent is gone).  Snapshots
    without clones are listed too."""
    by_name = {i["name"]: i for i in images}
    children: dict[tuple[str, object], list[str]] = {}
    roots = []
    for i in images:
        if i["parent_image"] in by_name:
            children.setdefault((i["parent_image"], i["parent_snapshot_id"]), []).append(i["name"])
        else:
            roots.append(i["name"])

    def node(name: str, seen: frozenset) -> dict:
        i = by_name[name]
        snaps = []
        for s in i["snapshots"]:
            kids = [k for k in children.get((name, s["id"]), []) if k not in seen]
            snaps.append({"id": s["id"], "name": s["name"], "hidden": s["hidden"],
                          "clones": [node(k, seen | {k}) for k in kids]})
        return {"image": name, "size": i["size"], "snapshots": snaps}

    out = [node(r, frozenset([r])) for r in roots]
    placed = set()

    def mark(t: dict) -> None:
        placed.add(t["image"])
        for s in t["snapshots"]:
            for c in s["clones"]:
                mark(c)

    for t in out:
        mark(t)
    for i in images:  # a lineage loop (never made by vdisk): still listed once
        if i["name"] not in placed:
            t = node(i["name"], frozenset([i["name"]]))
            out.append(t)
            mark(t)
    return out


# ---------------------------------------------------------------------- info
def _object_stats(backend: be.Backend) -> dict:
    kinds = {"config": "config", "gen": "generations", "packs": "packs", "index": "index"}
    out = {v: {"count": 0, "bytes": 0} for v in kinds.values()}
    out["other"] = {"count": 0, "bytes": 0}
    for name in backend.list(""):
        top = name.split("/", 1)[0]
        if top in ("locks", "leases"):
            continue
        k = kinds.get(top, "other")
        out[k]["count"] += 1
        out[k]["bytes"] += backend.size(name)
    if isinstance(backend, be.LocalBackend):
        tmp = stale_tmp_files(backend.root, age=-1e9)
        out["temporary"] = {"count": len(tmp), "bytes": sum(n for _, n in tmp)}
    return out


def _families(images: dict) -> dict[str, str]:
    """Image -> the first image of its lineage (native clones join their parent's)."""
    up: dict[str, str] = {}

    def find(x: str) -> str:
        path = []
        while up.get(x, x) != x:
            path.append(x)
            x = up[x]
        for p in path:
            up[p] = x
        return x

    for name in images:
        up.setdefault(name, name)
    for name, rec in images.items():
        par = rec.get("parent") if isinstance(rec, dict) else None
        if par and par.get("image") in images:
            a, b = find(name), find(par["image"])
            if a != b:
                up[max(a, b)] = min(a, b)
    return {n: find(n) for n in images}


def pool_info(url: str) -> dict:
    """Facts and space of the whole pool:

    - ``images``, ``snapshots`` (visible), ``hidden_snapshots``, ``clones``; ``lineage``:
      ``[{image, parent: IMAGE@SNAP}]`` of the native clones;
    - ``objects``: count and bytes per kind of object; ``physical_bytes``: all of them;
    - ``logical_bytes``: the images' sizes; ``used_bytes``: stored bytes of the blobs any
      image or snapshot reaches (data, tree nodes, sketches); ``unreferenced_bytes``:
      pack bytes no root reaches (gc frees or repacks them); ``referenced_bytes``: the
      sum over images of the bytes each live state reaches (shared blobs counted in
      each);
    - ``data_blobs`` (distinct stored data blobs) and their ``data_bytes``;
      ``referenced_blocks``: data blocks the images and snapshots map, a block shared
      through lineage (a snapshot, a clone of it) counted once, and ``mapped_blocks``:
      each state's blocks counted in each state; ``dedup_ratio`` = referenced_blocks /
      data_blobs (1.0: no duplicates; 2.0: every block stored once for two uses; as
      ZFS's dedupratio, sharing by snapshots and clones is not deduplication);
      ``compression_ratio`` = data_blobs * 4096 / data_bytes; ``delta_blobs`` and
      ``delta_bytes``, ``zstd_blobs``, ``raw_blobs``;
    - ``per_image``: ``[{image, size, parent, live: {referenced_bytes, unique_bytes,
      shared_bytes}, total: {...} (the live state and its snapshots together),
      snapshots: [{id, name, hidden, size, referenced_bytes, unique_bytes,
      shared_bytes}]}]``: unique bytes are reached by nothing else in the pool (what
      deleting that state, or the whole image, and then ``pool gc`` would free),
      shared = referenced - unique (``rbd du``, ZFS ``used``/``written``).
    """
    pool = Pool(url)
    try:
        return _info(pool)
    finally:
        pool.close()


def _info(pool: Pool) -> dict:
    cat = pool.catalog
    images = cat["images"]
    roots = roots_of(cat, pool.url, generation=pool.generation)
    fam_of_image = _families(images)
    fam_of_bit = [fam_of_image[r.image] for r in roots]
    fam_cache: dict[int, tuple] = {}
    leaves: dict[tuple[str, int], list[tuple[pc.Entry, int]]] = {}
    mapped = [0]

    def on_leaf(idx: int, e: pc.Entry, m: int, node: bytes) -> None:
        n = sum(1 for t in pc.ENTRY.iter_unpack(node) if t[4] in pc.DATA_KINDS)
        mapped[0] += n * m.bit_count()
        fams = fam_cache.get(m)
        if fams is None:
            fams = fam_cache[m] = tuple(sorted({fam_of_bit[b] for b in bits(m)}))
        for f in fams:
            leaves.setdefault((f, idx), []).append((e, n))

    found = scan(pool, roots, on_leaf=on_leaf)
    referenced_blocks = 0
    for group in leaves.values():
        if len(group) == 1:
            referenced_blocks += group[0][1]
            continue
        seen: set[tuple[int, int, int]] = set()
        for e, _n in group:
            node = pool.load_node(e, f"{pool.url}: leaf")
            for i, (_h, pk, off, _ln, k, _fl) in enumerate(pc.ENTRY.iter_unpack(node)):
                if k in pc.DATA_KINDS:
                    seen.add((i, pk, off))
        referenced_blocks += len(seen)
    stats = {"data_blobs": 0, "data_bytes": 0, "raw_blobs": 0, "zstd_blobs": 0, "delta_blobs": 0, "delta_bytes": 0,
             "node_blobs": 0, "node_bytes": 0, "sketch_blobs": 0, "sketch_bytes": 0}
    for n, k, _h in found.meta.values():
        if k in pc.DATA_KINDS:
            stats["data_blobs"] += 1
            stats["data_bytes"] += n
            if k == pc.DELTA:
                stats["delta_blobs"] += 1
                stats["delta_bytes"] += n
            elif k == pc.ZSTD:
                stats["zstd_blobs"] += 1
            else:
                stats["raw_blobs"] += 1
        elif k == pc.NODE:
            stats["node_blobs"] += 1
            stats["node_bytes"] += n
        else:
            stats["sketch_blobs"] += 1
            stats["sketch_bytes"] += n
    objects = _object_stats(pool.backend)
    used = sum(n for n, _k, _h in found.meta.values())
    acc = accounting(found)
    per_image = []
    by_image: dict[str, list[tuple[Root, dict]]] = {}
    for r, a in zip(roots, acc["roots"]):
        by_image.setdefault(r.image, []).append((r, a))
    for name in sorted(images):
        rec = images[name]
        states = by_image.get(name, [])
        live = next((a for r, a in states if r.snapshot is None), None)
        snaps = [{"id": r.snapshot.get("id"), "name": r.snapshot.get("name"), "hidden": bool(r.snapshot.get("hidden")),
                  "size": r.size, **a} for r, a in states if r.snapshot is not None]
        per_image.append({"image": name, "size": rec.get("size"), "parent": _snapshot_name(images, rec.get("parent")),
                          "live": live, "total": acc["images"].get(name), "snapshots": snaps})
    snapshots = [s for rec in images.values() for s in rec.get("snapshots", [])]
    d = stats["data_blobs"]
    return {
        "pool": pool.url, "pool_id": pool.pool_id, "generation": pool.generation, "settings": dict(pool.settings),
        "images": len(images), "snapshots": sum(1 for s in snapshots if not s.get("hidden")),
        "hidden_snapshots": sum(1 for s in snapshots if s.get("hidden")),
        "clones": sum(1 for rec in images.values() if rec.get("parent")),
        "lineage": [{"image": n, "parent": _snapshot_name(images, images[n].get("parent"))}
                    for n in sorted(images) if images[n].get("parent")],
        "objects": objects,
        "physical_bytes": sum(v["bytes"] for v in objects.values()),
        "logical_bytes": sum(int(rec.get("size", 0)) for rec in images.values()),
        "used_bytes": used,
        "unreferenced_bytes": max(0, objects["packs"]["bytes"] - used),
        "referenced_bytes": sum(a["referenced_bytes"] for r, a in zip(roots, acc["roots"]) if r.snapshot is None),
        **stats,
        "referenced_blocks": referenced_blocks,
        "mapped_blocks": mapped[0],
        "dedup_ratio": referenced_blocks / d if d else 1.0,
        "compression_ratio": d * pc.BLOCK / stats["data_bytes"] if stats["data_bytes"] else 1.0,
        "per_image": per_image,
    }


# ---------------------------------------------------------------------- check, gc, dedup
def pool_check(url: str, *, repair: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> PoolCheck:
    """Check the whole pool (:func:`vdisk.pool.check.check_pool`).  ``repair="leaks"``
    runs :func:`pool_gc` when leaks were found and the pool is not damaged, and checks
    again; ``repaired`` then says what gc freed."""
    if repair not in (None, "leaks"):
        raise UsageError(f"pool check repairs leaks only (-r leaks), not {repair!r}")
    res = check_pool(url, progress=progress)
    if repair and res.leaks and not res.corruptions:
        before = (len(res.leaks),)
        rep = pool_gc(url)
        res = check_pool(url, progress=progress)
        res.repaired.append(f"gc freed {rep.freed_bytes} bytes ({rep.packs_deleted} packs deleted, "
                            f"{rep.packs_repacked} repacked, {rep.segments_deleted} index segments and "
                            f"{rep.tmp_files_deleted} temporary files deleted)")
        res.leaks_fixed = max(0, before[0] - len(res.leaks))
    return res


def pool_gc(url: str, *, dry_run: bool = False, repack_below: float = 0.5) -> GcReport:
    """Free what no image or snapshot of the pool needs (:func:`vdisk.pool.gc.collect`);
    refused while any process has the pool open."""
    return collect(url, dry_run=dry_run, repack_below=repack_below)


def pool_dedup(url: str, *, gc: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Offline deduplication (:func:`vdisk.pool.dedup.offline_dedup`), then, with ``gc``,
    a gc that frees the duplicates.  Returns ``{"dedup": DedupReport, "gc": GcReport |
    None}``."""
    rep: DedupReport = offline_dedup(url, progress=progress)
    g = pool_gc(url) if gc else None
    return {"dedup": rep, "gc": g}


# ---------------------------------------------------------------------- similar
def _hash_arrays(pool: Pool, exact: bool) -> tuple[list[str], list, list[int]]:
    """(image names, per image a sorted array of distinct uint64 hashes, shifts):
    from the sketches, or (``exact``) every DATA entry's hash from the trees."""
    import numpy as np

    from .image import load_sketch

    images = pool.catalog["images"]
    names = sorted(images)
    if not exact:
        arrays, shifts = [], []
        for n in names:
            sk = load_sketch(pool, images[n].get("sketch"), f"{pool.url}/{n}")
            arrays.append(np.array(sorted(sk.items), dtype=np.uint64))
            shifts.append(sk.shift)
        return names, arrays, shifts
    roots = renumber([r for r in roots_of(pool.catalog, pool.url, generation=pool.generation) if r.snapshot is None])
    chunks: list[list] = [[] for _ in roots]

    def on_leaf(idx: int, e: pc.Entry, m: int, node: bytes) -> None:
        a = np.frombuffer(node, dtype=np.uint64).reshape(pc.FANOUT, 3)
        kinds = a[:, 2] >> np.uint64(48) & np.uint64(0xFF)
        h = a[:, 0][(kinds >= pc.RAW) & (kinds <= pc.DELTA)]
        for b in bits(m):
            chunks[b].append(h)

    scan(pool, roots, on_leaf=on_leaf)
    by_name = {r.image: np.unique(np.concatenate(chunks[i])) if chunks[i] else np.zeros(0, np.uint64)
               for i, r in enumerate(roots)}
    return names, [by_name[n] for n in names], [0] * len(names)


def _intersections(arrays: list, shift: int):
    """|A_i ∩ A_j| of every pair of the arrays sampled at ``shift`` (hashes below
    2**(64-shift)), as a numpy matrix: each array becomes a bit set over the distinct
    hashes of all of them, and a pair's count is the popcount of an AND."""
    import numpy as np

    limit = np.uint64((1 << (64 - shift)) - 1) if shift else None
    sampled = [a if limit is None else a[a <= limit] for a in arrays]
    allh = np.unique(np.concatenate(sampled)) if sampled else np.zeros(0, np.uint64)
    sets = []
    for a in sampled:
        row = np.zeros(len(allh), dtype=np.uint8)
        row[np.searchsorted(allh, a)] = 1
        sets.append(int.from_bytes(np.packbits(row, bitorder="little").tobytes(), "little"))
    n = len(sets)
    out = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        si = sets[i]
        out[i, i] = len(sampled[i])
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = (si & sets[j]).bit_count()
    return out, [len(a) for a in sampled]


def _similar_pairs(names_a, arrays_a, shifts_a, names_b, arrays_b, shifts_b, cross: bool) -> list[dict]:
    names = names_a + (names_b if cross else [])
    arrays = arrays_a + (arrays_b if cross else [])
    shifts = shifts_a + (shifts_b if cross else [])
    na = len(names_a)
    mats = {s: _intersections(arrays, s) for s in sorted(set(shifts))}
    pairs = []
    for i in range(na):
        for j in (range(na, len(names)) if cross else range(i + 1, na)):
            s = max(shifts[i], shifts[j])
            mat, sizes = mats[s]
            inter = int(mat[i, j])
            la, lb = sizes[i], sizes[j]
            union = la + lb - inter
            scale = 1 << s
            jac = inter / union if union else 0.0
            pairs.append({"a": names[i], "b": names[j],
                          "jaccard": jac,
                          "a_in_b": inter / la if la else 0.0, "b_in_a": inter / lb if lb else 0.0,
                          "shared_blocks": inter * scale, "a_blocks": la * scale, "b_blocks": lb * scale,
                          "sampled": s > 0, "shift": s, "samples": union,
                          # of the Jaccard estimate: the sampled hashes of the union are a sample of it
                          "stderr": math.sqrt(jac * (1 - jac) / union) if s and union else 0.0})
    return pairs


def pool_similar(url: str, *, against: str | None = None, exact: bool = False) -> dict:
    """The estimated shared fraction of every pair of images of the pool (or, with
    ``against``, of every image of this pool with every image of that one), from
    their sketches (formats/pool.md 8.2): ``{"pairs": [{a, b, jaccard, a_in_b,
    b_in_a, shared_blocks, a_blocks, b_blocks, ...}]}``, most similar first.  Block
    counts are distinct non-zero blocks.  ``exact`` adds, per pair, ``exact``: the
    same figures from every block of both trees (costs a walk of every tree).
    ``samples`` is the number of sampled hashes in the union of the pair's sketches
    and ``stderr`` the standard error of the Jaccard estimate it implies: below a few
    hundred samples (images of a few MiB of distinct data) the estimates are rough."""
    pool = Pool(url)
    other = Pool(against) if against else None
    try:
        names_a, arr_a, sh_a = _hash_arrays(pool, False)
        names_b, arr_b, sh_b = _hash_arrays(other, False) if other else ([], [], [])
        pairs = _similar_pairs(names_a, arr_a, sh_a, names_b, arr_b, sh_b, other is not None)
        if exact:
            en_a, ea, es_a = _hash_arrays(pool, True)
            en_b, eb, es_b = _hash_arrays(other, True) if other else ([], [], [])
            exact_pairs = _similar_pairs(en_a, ea, es_a, en_b, eb, es_b, other is not None)
            for p, q in zip(pairs, exact_pairs):
                assert (p["a"], p["b"]) == (q["a"], q["b"])
                p["exact"] = {k: q[k] for k in ("jaccard", "a_in_b", "b_in_a", "shared_blocks", "a_blocks",
                                                 "b_blocks")}
        pairs.sort(key=lambda p: (-p["jaccard"], p["a"], p["b"]))
        return {"pool": pool.url, "against": other.url if other else None, "images": len(names_a),
                "pairs": pairs}
    finally:
        pool.close()
        if other is not None:
            other.close()
