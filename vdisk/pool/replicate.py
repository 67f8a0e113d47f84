"""Continuous replication of a pool to a second store (formats/pool.md 13.6).

Every object of a pool but ``gen/<N>`` (and the local ``locks/``, the object stores'
``leases/``) is immutable, so shipping a generation is: copy every immutable object
the replica lacks, make them durable (the barrier), then put ``gen/<N>`` in the
replica with the conditional put, last.  The replica therefore always holds a
complete, consistent generation: the newest one it was sent, or an earlier one.

A replica is marked by the object ``replica`` (written before its ``config``); a
pool holding it refuses every commit (writes, snapshots, new images) until
``vdisk pool promote`` deletes it.  Leases are never copied: a promoted replica
has no live writer, and an image record's ``writer`` epoch only sets the floor for
the next lease (13.3).

Order of one pass (:func:`ship_once`):

1. read the source's newest generation numbers, then the catalogs to ship
   (catalogs first: everything they name was durable, and so listed, before them);
2. list ``packs/`` and ``index/`` in both stores; copy what the replica lacks;
3. for each source generation newer than the replica's, ascending: if every index
   segment it lists is in the replica (a segment merged away and deleted by the
   source after a newer commit is not, and that generation is skipped), put it;
4. prune the replica's generations as a writer would (the newest 8 kept).

A source on a local directory is opened as a :class:`Pool` (it holds the gc lock
shared: gc cannot free a pack while it is being copied); packs on an object store
are never deleted (gc is not offered there).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..codec import pool as pc
from ..errors import ImageExists, ImageNotFound, UsageError, VdiskError
from . import backend as be
from .store import (
    CONFIG,
    GEN_PREFIX,
    KEEP_GENERATIONS,
    REPLICA,
    Pool,
    gen_name,
    open_backend,
)

COPIED_PREFIXES = ("packs/", "index/")
COPY_THREADS = 8


class NotAReplica(ImageExists):
    """The destination is not an empty store nor a replica of the source."""


def _gen_numbers(backend: be.Backend) -> list[int]:
    out = []
    for n in backend.list(GEN_PREFIX):
        try:
            out.append(int(n[len(GEN_PREFIX):], 16))
        except ValueError:
            continue
    return sorted(out)


def open_destination(src: Pool, dst_url: str) -> be.Backend:
    """The replica's backend, made a replica of ``src`` if it is empty; refuses a
    store that holds anything else."""
    if os.path.abspath(dst_url) == os.path.abspath(src.url) if not dst_url.startswith("s3://") \
            else dst_url.rstrip("/") == src.url.rstrip("/"):
        raise UsageError(f"{dst_url}: the replica must be another store than its source")
    if not dst_url.startswith("s3://"):
        if os.path.exists(dst_url) and not os.path.isdir(dst_url):
            raise NotAReplica(f"{dst_url}: exists and is not a directory")
        os.makedirs(dst_url, exist_ok=True)
    dst = open_backend(dst_url)
    try:
        if dst_url.startswith("s3://"):
            dst.ensure_bucket()
            names = dst.list("")
        else:
            names = os.listdir(dst_url)  # every file, not only those named like objects
        # empty, or only the marker of a first attempt that died before the config
        empty = not [n for n in names if n != REPLICA]
        if empty:
            marker = {"replica_of": src.url, "pool_id": src.pool_id, "since": time.time()}
            dst.put(REPLICA, pc.encode_json_object(pc.CONFIG_MAGIC, marker))
            dst.barrier()
            if not dst.put_if_absent(CONFIG, pc.encode_json_object(pc.CONFIG_MAGIC, src.config)):
                raise NotAReplica(f"{dst_url}: a pool is being created there by someone else")
            return dst
        check_destination(src, dst, dst_url)
        return dst
    except BaseException:
        dst.close()
        raise


def check_destination(src: Pool, dst: be.Backend, dst_url: str) -> None:
    """Refuse ``dst`` unless it is a replica of ``src``: the same pool_id, the
    ``replica`` marker, and no generation that the source does not hold too."""
    try:
        conf = pc.decode_json_object(pc.CONFIG_MAGIC, dst.get(CONFIG), f"{dst_url}: config")
    except be.ObjectMissing:
        raise NotAReplica(f"{dst_url}: holds objects and is not a vdisk pool (a replica is made in an "
                          "empty store)") from None
    if conf.get("pool_id") != src.pool_id:
        raise NotAReplica(f"{dst_url}: is another pool (pool_id {conf.get('pool_id')}), not a replica of "
                          f"{src.url}")
    try:
        dst.get(REPLICA)
    except be.ObjectMissing:
        raise NotAReplica(f"{dst_url}: is a pool of its own (promoted, or the source itself), not a replica: "
                          "refused, replicating would overwrite its history") from None


def _diverged(src: Pool, dst: be.Backend, dst_url: str, dst_newest: int, src_newest: int) -> None:
    if dst_newest > src_newest:
        raise NotAReplica(f"{dst_url}: holds generation {dst_newest}, newer than the source's {src_newest}: "
                          "not a replica of this history")
    if dst_newest == 0:
        return
    try:
        theirs = src.backend.get(gen_name(dst_newest))
    except be.ObjectMissing:
        return  # pruned in the source: nothing to compare with
    if dst.get(gen_name(dst_newest)) != theirs:
        raise NotAReplica(f"{dst_url}: its generation {dst_newest} differs from the source's: the histories "
                          "diverged")


def ship_once(src: Pool, dst: be.Backend, dst_url: str) -> list[dict]:
    """One pass: ship every source generation newer than the replica's; returns one
    record per generation put (generation, objects, bytes, lag seconds)."""
    check_destination(src, dst, dst_url)
    src_gens = _gen_numbers(src.backend)
    dst_gens = _gen_numbers(dst)
    dst_newest = dst_gens[-1] if dst_gens else 0
    src_newest = src_gens[-1] if src_gens else 0
    _diverged(src, dst, dst_url, dst_newest, src_newest)
    todo: list[tuple[int, bytes, dict]] = []
    for g in src_gens:
        if g <= dst_newest:
            continue
        try:
            raw = src.backend.get(gen_name(g))
        except be.ObjectMissing:
            continue  # pruned since we listed
        cat = pc.decode_json_object(pc.GEN_MAGIC, raw, f"{src.url}: {gen_name(g)}")
        if cat.get("pool_id") != src.pool_id or cat.get("generation") != g:
            raise VdiskError(f"{src.url}: {gen_name(g)} is not generation {g} of this pool")
        todo.append((g, raw, cat))
    if not todo:
        return []
    have = set()
    want: list[str] = []
    for prefix in COPIED_PREFIXES:
        have.update(dst.list(prefix))
        want += [n for n in src.backend.list(prefix) if n not in have]
    copied: list[tuple[str, int]] = []
    lock = threading.Lock()

    gone: list[str] = []

    def copy(name: str) -> None:
        try:
            data = src.backend.get(name)
        except be.ObjectMissing:
            # an index segment merged away since: a generation naming it is skipped; a
            # pack: gc deleted it (this process was paused past its gc lock's ttl, on an
            # object store), and the generations read may name it: none is shipped
            if name.startswith("packs/"):
                with lock:
                    gone.append(name)
            return
        dst.put(name, data)
        with lock:
            copied.append((name, len(data)))

    if want:
        with ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="vdisk-replicate") as ex:
            for f in [ex.submit(copy, n) for n in want]:
                f.result()
    have.update(n for n, _ in copied)
    dst.barrier()
    out: list[dict] = []
    n_obj, n_bytes = len(copied), sum(s for _, s in copied)
    if gone:
        return []  # the next pass reads the generations gc committed, and copies their packs
    for g, raw, cat in todo:
        segs = [r.get("name") for k in ("fp_segments", "sf_segments") for r in cat.get(k, [])]
        if any(s not in have for s in segs):
            continue
        check_destination(src, dst, dst_url)  # promoted meanwhile: stop
        if not dst.put_if_absent(gen_name(g), raw):
            raise NotAReplica(f"{dst_url}: generation {g} was written there by someone else")
        now = time.time()
        out.append({"generation": g, "objects": n_obj, "bytes": n_bytes + len(raw),
                    "committed": cat.get("committed"), "lag": max(0.0, now - float(cat.get("committed") or now)),
                    "images": len(cat.get("images", {}))})
        n_obj, n_bytes = 0, 0
    if out:
        newest = out[-1]["generation"]
        for g in _gen_numbers(dst):
            if g <= newest - KEEP_GENERATIONS:
                dst.delete(gen_name(g))
    return out


def replicate(src_url: str, dst_url: str, *, once: bool = False, interval: float = 1.0,
              report: Callable[[dict], None] | None = None, stop: threading.Event | None = None) -> dict:
    """Ship ``src_url``'s committed generations to ``dst_url`` (empty, or a replica
    of it): once, or every ``interval`` seconds until ``stop`` is set (or SIGINT /
    SIGTERM, when run in the main thread).  Returns a summary: passes,
    generations shipped, objects, bytes, the newest generation and its lag."""
    if interval <= 0 or interval > 86400:
        raise UsageError(f"--interval {interval}: expected seconds, more than 0 and at most 86400")
    src = Pool(src_url)
    stop = stop or threading.Event()
    old = {}
    if not once and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda *_: stop.set())
    summary = {"source": src.url, "replica": dst_url, "pool_id": src.pool_id, "passes": 0, "generations": 0,
               "objects": 0, "bytes": 0, "generation": None, "lag": None, "max_lag": None}
    try:
        dst = open_destination(src, dst_url)
        try:
            while True:
                shipped = ship_once(src, dst, dst_url)
                summary["passes"] += 1
                for r in shipped:
                    summary["generations"] += 1
                    summary["objects"] += r["objects"]
                    summary["bytes"] += r["bytes"]
                    summary["generation"], summary["lag"] = r["generation"], r["lag"]
                    summary["max_lag"] = max(summary["max_lag"] or 0.0, r["lag"])
                    if report:
                        report(r)
                if summary["generation"] is None:
                    gens = _gen_numbers(dst)
                    summary["generation"] = gens[-1] if gens else None
                if once or stop.wait(interval):
                    break
        finally:
            dst.close()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        src.close()
    return summary


def promote(url: str) -> dict:
    """Make a replica a pool of its own: delete its ``replica`` marker.  Stop
    ``vdisk pool replicate`` first (it refuses to ship to a promoted pool, but a
    pass under way may still put one generation)."""
    b = open_backend(url)
    try:
        try:
            raw = b.get(CONFIG)
        except be.ObjectMissing:
            raise ImageNotFound(f"{url}: not a vdisk pool (no config object)") from None
        conf = pc.decode_json_object(pc.CONFIG_MAGIC, raw, f"{url}: config")
        try:
            marker = pc.decode_json_object(pc.CONFIG_MAGIC, b.get(REPLICA), f"{url}: replica")
        except be.ObjectMissing:
            raise UsageError(f"{url}: is not a replica (nothing to promote)") from None
        if not _gen_numbers(b):
            raise VdiskError(f"{url}: the replica has no generation yet (nothing was shipped): not promoted")
        b.delete(REPLICA)
        b.barrier()
        return {"pool": url, "pool_id": conf.get("pool_id"), "was_replica_of": marker.get("replica_of"),
                "generation": _gen_numbers(b)[-1]}
    finally:
        b.close()


def status_line(r: dict) -> str:
    from ..sizes import format_size

    return (f"generation {r['generation']}: {r['objects']} objects, {format_size(r['bytes'])}, "
            f"lag {r['lag']:.2f} s")


__all__ = ["NotAReplica", "promote", "replicate", "ship_once", "status_line"]
