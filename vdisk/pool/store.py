"""A pool: its configuration, catalog generations, packs and blob codec (formats/pool.md).

:class:`Pool` is one process's view of a pool: the newest catalog it has read, the
pack it is filling, its indexes and caches.  Everything a pool holds is an
immutable object; the only change of state is committing a new catalog generation
(``gen/<N>``) with ``put_if_absent``, the pool's one atomic commit point.  Writers of
different images commit independently: a commit is a *mutation* (a function applied
to the newest catalog), re-applied to the newer catalog if another writer committed
first, so that each writer changes only the fields it owns.

Concurrency: a :class:`Pool` is used by one image at a time (the block layer
serialises calls per image); two images open in one process have two Pools.
Between processes: an image has one writer (an exclusive lock ``locks/img-<id>``),
readers of its live state share a lock that excludes the writer, readers of
snapshots take none; every open Pool holds ``locks/gc`` shared, and ``pool gc``
takes it exclusively (formats/pool.md 9).  On an object store the image locks are
leases (:mod:`.lease`) and the gc lock is an announced object (:mod:`.objlock`),
which a holder paused past its ttl loses unknowingly: there gc and dedup also fence
every writer in the catalog (:mod:`.gc`).
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from ..codec import pool as pc
from ..errors import (
    CorruptImage,
    HostIOError,
    ImageExists,
    ImageLocked,
    ImageNotFound,
    VdiskError,
)
from . import backend as be
from .index import SegmentIndex, new_object_name

CONFIG = "config"
#: present in a replica (vdisk pool replicate): every commit is refused until promoted
REPLICA = "replica"
GEN_PREFIX = "gen/"
KEEP_GENERATIONS = 8
NODE_CACHE = 4096  # decoded nodes kept (12 KiB each: 48 MiB)
BASE_CACHE = 1024  # decoded delta bases kept (4 MiB)
BLOCK_CACHE_MB = 64  # decoded blocks of reads kept (VDISK_POOL_BLOCK_CACHE_MB)
COMMIT_RETRIES = 1000

DEFAULT_SETTINGS = {"dedup": True, "delta": True, "compression": "zstd", "zstd_level": 3}


class BlobMismatch(CorruptImage):
    """A blob does not decode to the content its entry's hash names."""


def gen_name(n: int) -> str:
    return f"gen/{n:016x}"


def pack_name(n: int) -> str:
    return f"packs/{n:016x}"


def empty_catalog(pool_id: str) -> dict:
    return {"pool_id": pool_id, "generation": 1, "committed": time.time(), "images": {},
            "fp_segments": [], "sf_segments": []}


def open_backend(url: str) -> be.Backend:
    if url.startswith("s3://"):
        from .s3 import S3Backend

        return S3Backend(url)
    return be.LocalBackend(url)


class Fenced(ImageLocked):
    """This writer's lease was taken over: it may commit nothing more."""


class Pool:
    """An opened pool.  ``lock`` False (tests, ``pool gc`` itself) takes no gc lock."""

    def __init__(self, url: str, *, lock: bool = True, backend: be.Backend | None = None):
        self.url = url
        self.backend = backend or open_backend(url)
        #: a directory (OFD locks) or an object store (leases and fencing)
        self.local = isinstance(self.backend, be.LocalBackend)
        #: a pack is sealed once it holds this much (an object store may want smaller ones)
        self.pack_target = int(getattr(self.backend, "pack_target", pc.TARGET_PACK))
        #: (image name, image id, lease epoch) of the image this Pool writes on an
        #: object store: every commit checks that the catalog still names the epoch
        self.fence: tuple[str, str, int] | None = None
        self._gc_lock = None
        try:
            raw = self.backend.get(CONFIG)
        except be.ObjectMissing:
            raise ImageNotFound(f"{url}: not a vdisk pool (no config object)") from None
        self.config = pc.decode_json_object(pc.CONFIG_MAGIC, raw, f"{url}: config")
        pc.check_config(self.config, f"{url}: config")
        self.pool_id = str(self.config.get("pool_id", ""))
        self.settings = dict(DEFAULT_SETTINGS)
        self.settings.update(self.config.get("settings", {}))
        try:
            marker = pc.decode_json_object(pc.CONFIG_MAGIC, self.backend.get(REPLICA), f"{url}: replica")
        except be.ObjectMissing:
            marker = None
        #: the source this pool is a read-only replica of (formats/pool.md 13.6), or None
        self.replica_of: str | None = str(marker.get("replica_of")) if marker is not None else None
        if lock:
            try:
                self._gc_lock = be.lock(self.backend, "gc", exclusive=False)
            except be.LockBusy as exc:
                if exc.holder:  # an object store: gc and dedup hold it exclusively there
                    raise ImageLocked(f"{url}: the pool is being garbage-collected or deduplicated by "
                                      f"{exc.holder} (vdisk pool gc/dedup)") from None
                raise ImageLocked(f"{url}: the pool is being garbage-collected (vdisk pool gc)") from None
        self.catalog: dict = {}
        self.generation = 0
        try:
            self.reload()
        except BaseException:
            if self._gc_lock is not None:
                self._gc_lock.release()
            raise
        self.fp = SegmentIndex(self.backend, pc.SEG_FP, self.catalog.get("fp_segments", []))
        self.sf = SegmentIndex(self.backend, pc.SEG_SF, self.catalog.get("sf_segments", []))
        self._pending: bytearray | None = None
        self._pending_no = 0
        self._pending_dir: list[tuple[int, int, int, int]] = []
        self._sealed: list[int] = []  # packs put since the last commit
        self._nodes: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bases: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        #: decoded, verified data blocks of reads: (pack, offset) -> (entry hash, block)
        self._blocks: OrderedDict[tuple[int, int], tuple[int, bytes]] = OrderedDict()
        self._block_limit = block_cache_blocks()
        self._cctx = None
        self._merged_away: set[str] = set()
        self.closed = False
        #: set when a barrier failed: what it was to make durable may be lost (a failed
        #: fsync is final, RELIABILITY.md), so nothing may be committed on top of it
        self.sync_failed: str | None = None
        self._sync_errno: int | None = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, url: str, settings: dict | None = None) -> None:
        pool_id = uuid.uuid4().hex
        conf = {"pool_id": pool_id, "created": time.time(), "block_size": pc.BLOCK,
                "settings": {**DEFAULT_SETTINGS, **(settings or {})}}
        if url.startswith("s3://"):
            backend = open_backend(url)
            try:
                backend.ensure_bucket()
                if backend.list(""):
                    raise ImageExists(f"{url}: holds objects already (a pool is made under an empty prefix)")
                if not backend.put_if_absent(CONFIG, pc.encode_json_object(pc.CONFIG_MAGIC, conf)):
                    raise ImageExists(f"{url}: a pool is being created there by someone else")
                if not backend.put_if_absent(gen_name(1),
                                             pc.encode_json_object(pc.GEN_MAGIC, empty_catalog(pool_id))):
                    raise ImageExists(f"{url}: a pool is being created there by someone else")
            finally:
                backend.close()
            return
        if os.path.exists(url) and (not os.path.isdir(url) or os.listdir(url)):
            raise ImageExists(f"{url}: exists already and is not an empty directory")
        os.makedirs(url, exist_ok=True)
        backend = be.LocalBackend(url)
        backend.put(CONFIG, pc.encode_json_object(pc.CONFIG_MAGIC, conf))
        if not backend.put_if_absent(gen_name(1), pc.encode_json_object(pc.GEN_MAGIC, empty_catalog(pool_id))):
            raise ImageExists(f"{url}: a pool is being created there by someone else")

    # ------------------------------------------------------------------ catalog
    def _read_generation(self, name: str) -> dict:
        raw = self.backend.get(name)
        cat = pc.decode_json_object(pc.GEN_MAGIC, raw, f"{self.url}: {name}")
        if cat.get("pool_id") != self.pool_id:
            raise CorruptImage(f"{self.url}: {name} belongs to another pool")
        pc.check_catalog(cat, f"{self.url}: {name}")
        return cat

    def reload(self) -> None:
        """Read the newest generation.  Generations are written whole and atomically,
        so the newest one is complete; a damaged one is corruption, not a torn write."""
        names = self.backend.list(GEN_PREFIX)
        gens = []
        for n in names:
            try:
                gens.append((int(n[len(GEN_PREFIX):], 16), n))
            except ValueError:
                continue
        if not gens:
            raise CorruptImage(f"{self.url}: the pool has no catalog generation")
        number, name = max(gens)
        cat = self._read_generation(name)
        if cat.get("generation") != number:
            raise CorruptImage(f"{self.url}: {name} says it is generation {cat.get('generation')}")
        self.catalog, self.generation = cat, number
        if hasattr(self, "fp"):
            self.fp.refresh(cat.get("fp_segments", []))
            self.sf.refresh(cat.get("sf_segments", []))

    def commit(self, mutate: Callable[[dict], None]) -> None:
        """Make every pack put so far durable, then commit ``mutate`` applied to the
        newest catalog as the next generation.  ``mutate`` may raise (nothing is then
        committed) and may run several times, on newer catalogs each time."""
        if self.sync_failed is not None:
            raise HostIOError(f"{self.url}: an earlier sync of the pool's objects failed ({self.sync_failed}); "
                              "the image must be reopened (its writes since the last flush are lost)",
                              self._sync_errno)
        if self.replica_of is not None:
            from ..errors import ReadOnlyImage

            raise ReadOnlyImage(f"{self.url}: is a replica of {self.replica_of} (read-only; "
                                "`vdisk pool promote` makes it writable)")
        self.seal_pack()
        try:
            self.backend.barrier()
        except HostIOError as exc:
            self.sync_failed, self._sync_errno = str(exc), exc.errno
            raise
        for _ in range(COMMIT_RETRIES):
            cat = copy.deepcopy(self.catalog)
            self._check_fence(cat)
            mutate(cat)
            cat["generation"] = self.generation + 1
            cat["committed"] = time.time()
            # lineage: which generation this one is built on (section 6.2)
            cat["commit_id"] = os.urandom(8).hex()
            cat["parent_id"] = self.catalog.get("commit_id")
            data = pc.encode_json_object(pc.GEN_MAGIC, cat)
            if self.backend.put_if_absent(gen_name(self.generation + 1), data) and \
                    self._landed(self.generation + 1, cat["commit_id"]):
                self.catalog, self.generation = cat, self.generation + 1
                self._sealed.clear()
                self._prune_generations()
                return
            self.reload()
        raise VdiskError(f"{self.url}: could not commit after {COMMIT_RETRIES} attempts (too many writers)")

    def _check_fence(self, cat: dict) -> None:
        """Refuse to build a generation on ``cat`` if it no longer names this writer's
        lease epoch: another writer claimed the image since (formats/pool.md 13.3)."""
        if self.fence is None:
            return
        name, image_id, epoch = self.fence
        rec = cat["images"].get(name)
        if not isinstance(rec, dict) or rec.get("id") != image_id:
            return  # removed: the mutation says so itself
        w = rec.get("writer") or {}
        if w.get("epoch") != epoch:
            from .lease import describe

            raise Fenced(f"{self.url}/{name}: this writer lost its lease (epoch {epoch}) to "
                         f"{describe(w)}; nothing since its last flush was committed")

    def _landed(self, number: int, commit_id: str) -> bool:
        """After our put of generation ``number`` succeeded: is it in the pool's history?
        Yes if it is the newest, or if the generation after it was built on it (another
        writer committed on top at once: re-applying ours would apply it twice).  No if
        a newer generation descends from another ``number`` -- our put took a number
        freed by pruning, below the newest, and no reader takes it."""
        newest = self._newest_number()
        if newest == number:
            return True
        try:
            nxt = self._read_generation(gen_name(number + 1))
        except be.ObjectMissing:
            return False
        return nxt.get("parent_id") == commit_id

    def _newest_number(self) -> int:
        """The largest generation number in the store.  A commit counts only if its
        generation is the newest: a writer whose catalog is older than the pruned
        generations could otherwise put a number freed by pruning (formats/pool.md 6.2)."""
        best = 0
        for n in self.backend.list(GEN_PREFIX):
            try:
                best = max(best, int(n[len(GEN_PREFIX):], 16))
            except ValueError:
                continue
        return best

    def _prune_generations(self) -> None:
        if self.generation % KEEP_GENERATIONS:
            return
        for n in self.backend.list(GEN_PREFIX):
            try:
                g = int(n[len(GEN_PREFIX):], 16)
            except ValueError:
                continue
            if g <= self.generation - KEEP_GENERATIONS:
                self.backend.delete(n)

    def image_record(self, name: str) -> dict:
        rec = self.catalog["images"].get(name)
        if not isinstance(rec, dict):
            raise ImageNotFound(f"{self.url}/{name}: no such image in the pool")
        return rec

    # ------------------------------------------------------------------ packs
    def _new_pack(self) -> None:
        self._pending_no = int.from_bytes(os.urandom(8), "little") | 1
        self._pending = bytearray(pc.pack_header(self._pending_no))
        self._pending_dir = []

    def append_blob(self, kind: int, payload: bytes, h: int) -> pc.Entry:
        """Store one blob in the pack being filled; its entry is valid at once (reads of
        it are served from memory until the pack is put)."""
        n = len(payload)
        if n > pc.MAX_BLOB:
            raise VdiskError(f"{self.url}: blob of {n} bytes is too large")
        if self._pending is None or len(self._pending) + n > self.pack_target:
            self.seal_pack()
            self._new_pack()
        off = len(self._pending)
        self._pending += payload
        self._pending_dir.append((off, n, kind, h))
        return pc.Entry(h, self._pending_no, off, n, kind)

    def seal_pack(self) -> None:
        """Put the pack being filled (not yet durable: ``commit`` makes it so)."""
        if self._pending is None or not self._pending_dir:
            return
        data = bytes(self._pending) + pc.pack_trailer(self._pending_dir)
        self.backend.put(pack_name(self._pending_no), data)
        self._sealed.append(self._pending_no)
        self._pending = None
        self._pending_dir = []

    def read_stored(self, e: pc.Entry, what: str) -> bytes:
        if e.pack == self._pending_no and self._pending is not None:
            if e.offset + e.length > len(self._pending):
                raise CorruptImage(f"{what}: blob past the end of its pack")
            return bytes(self._pending[e.offset: e.offset + e.length])
        try:
            data = self.backend.get_range(pack_name(e.pack), e.offset, e.length)
        except be.ObjectMissing:
            raise CorruptImage(f"{what}: its pack {e.pack:016x} is missing") from None
        if len(data) != e.length:
            raise CorruptImage(f"{what}: blob runs past the end of pack {e.pack:016x}")
        return data

    # ------------------------------------------------------------------ blob codec
    @property
    def cctx(self):
        if self._cctx is None:
            import zstandard

            self._cctx = zstandard.ZstdCompressor(level=int(self.settings.get("zstd_level", 3)), write_checksum=False,
                                                  write_content_size=True)
        return self._cctx

    def decode_block(self, e: pc.Entry, what: str, *, verify: bool = True) -> bytes:
        """The 4 KiB block an entry names, checked against its hash."""
        if e.kind == pc.ZERO or e.kind == pc.UNALLOCATED:
            return pc.ZERO_BLOCK
        stored = self.read_stored(e, what)
        if e.kind == pc.RAW:
            if len(stored) != pc.BLOCK:
                raise CorruptImage(f"{what}: raw blob of {len(stored)} bytes")
            block = stored
        elif e.kind == pc.ZSTD:
            block = pc.decompress(stored, pc.BLOCK, what)
        elif e.kind == pc.DELTA:
            if len(stored) <= pc.DELTA_HEAD:
                raise CorruptImage(f"{what}: truncated delta blob")
            base_e = pc.unpack_entry(stored, 0, what)
            if base_e.kind not in (pc.RAW, pc.ZSTD):
                raise CorruptImage(f"{what}: delta against a {pc.KIND_NAMES.get(base_e.kind)} blob")
            base = self._base(base_e, what)
            block = pc.xor_blocks(base, pc.decompress(stored[pc.DELTA_HEAD:], pc.BLOCK, what))
        else:
            raise CorruptImage(f"{what}: a {pc.KIND_NAMES.get(e.kind, e.kind)} entry where data is expected")
        if verify and pc.entry_hash(block) != e.hash:
            raise BlobMismatch(f"{what}: checksum mismatch")
        return block

    def cached_block(self, e: pc.Entry, what: str) -> bytes:
        """``decode_block`` for the image read path, through a bounded cache of decoded
        blocks that were checked against their hash when read from the store (a blob
        never changes: packs are immutable and their numbers never reused).  ``check``,
        ``scrub`` and ``gc`` call ``decode_block`` itself, which always reads the store."""
        hit = self._blocks.get(e.loc)
        if hit is not None and hit[0] == e.hash:
            self._blocks.move_to_end(e.loc)
            return hit[1]
        block = self.decode_block(e, what)
        if self._block_limit:
            self._blocks[e.loc] = (e.hash, block)
            if len(self._blocks) > self._block_limit:
                self._blocks.popitem(last=False)
        return block

    def has_block(self, e: pc.Entry) -> bool:
        hit = self._blocks.get(e.loc)
        return hit is not None and hit[0] == e.hash

    def _base(self, e: pc.Entry, what: str) -> bytes:
        b = _lru_get(self._bases, e.loc)
        if b is None:
            b = self.decode_block(e, f"{what} (its delta base)")
            _lru_put(self._bases, e.loc, b, BASE_CACHE)
        return b

    def load_node(self, e: pc.Entry, what: str) -> bytes:
        node = _lru_get(self._nodes, e.loc)
        if node is not None:
            return node
        if e.kind != pc.NODE:
            raise CorruptImage(f"{what}: a {pc.KIND_NAMES.get(e.kind, e.kind)} entry where a tree node is expected")
        node = pc.decompress(self.read_stored(e, what), pc.NODE_BYTES, what)
        if pc.meta_hash(node) != e.hash:
            raise BlobMismatch(f"{what}: tree node checksum mismatch")
        _lru_put(self._nodes, e.loc, node, NODE_CACHE)
        return node

    def store_node(self, node: bytes) -> pc.Entry:
        """Store a tree node; an empty one is no node at all (UNALLOCATED)."""
        if node == bytes(pc.NODE_BYTES):
            return pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)
        e = self.append_blob(pc.NODE, self.cctx.compress(node), pc.meta_hash(node))
        self._nodes[e.loc] = bytes(node)
        return e

    def store_meta(self, data: bytes) -> pc.Entry:
        return self.append_blob(pc.SKETCH, self.cctx.compress(data), pc.meta_hash(data))

    def load_meta(self, e: pc.Entry, size: int, what: str) -> bytes:
        if e.kind != pc.SKETCH:
            raise CorruptImage(f"{what}: not a sketch blob")
        if size < 0 or size > (64 << 20):
            raise CorruptImage(f"{what}: sketch of {size} bytes")
        data = pc.decompress(self.read_stored(e, what), size, what)
        if pc.meta_hash(data) != e.hash:
            raise BlobMismatch(f"{what}: sketch checksum mismatch")
        return data

    # ------------------------------------------------------------------ indexes
    def write_indexes(self, *, everything: bool) -> Callable[[dict], None] | None:
        """Write the indexes' memory tables as segments (when full, or ``everything``)
        and merge a tier when one is due; returns the catalog mutation naming them."""
        changes: list[tuple[str, list[dict], set[str]]] = []
        for key, idx in (("fp_segments", self.fp), ("sf_segments", self.sf)):
            added: list[dict] = []
            removed: set[str] = set()
            if idx.mem and (everything or idx.full):
                rec = idx.write_memtable(lambda: new_object_name("index"))
                if rec:
                    added.append(rec)
            group = idx.plan_merge()
            if group:
                merged = idx.merge(group, lambda: new_object_name("index"))
                added.append(merged)
                removed |= {s.name for s in group}
                self._merged_away |= removed
            if added or removed:
                changes.append((key, added, removed))
        if not changes:
            return None

        def mutate(cat: dict) -> None:
            for key, added, removed in changes:
                lst = [r for r in cat.get(key, []) if r.get("name") not in removed]
                have = {r.get("name") for r in lst}
                lst += [r for r in added if r["name"] not in have]
                cat[key] = lst
        return mutate

    def after_commit_indexes(self) -> None:
        """Follow the committed lists, and delete the segments this writer merged away:
        the index is a hint, so a reader that still lists one only misses its records."""
        self.fp.refresh(self.catalog.get("fp_segments", []))
        self.sf.refresh(self.catalog.get("sf_segments", []))
        listed = {r.get("name") for key in ("fp_segments", "sf_segments") for r in self.catalog.get(key, [])}
        for name in sorted(self._merged_away - listed):
            self.backend.delete(name)
        self._merged_away.clear()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backend.close()
        if self._gc_lock is not None:
            self._gc_lock.release()


def block_cache_blocks() -> int:
    """Blocks the cache of decoded blocks holds: ``VDISK_POOL_BLOCK_CACHE_MB`` (default
    64 MiB; 0 turns it off)."""
    try:
        mb = float(os.environ.get("VDISK_POOL_BLOCK_CACHE_MB", BLOCK_CACHE_MB))
    except ValueError:
        from ..errors import UsageError

        raise UsageError(f"VDISK_POOL_BLOCK_CACHE_MB={os.environ.get('VDISK_POOL_BLOCK_CACHE_MB')!r}: "
                         "expected a number") from None
    return max(0, int(mb * (1 << 20)) // pc.BLOCK)


def _lru_get(cache: OrderedDict, key):
    """``cache[key]`` (now the most recently used), or None."""
    v = cache.get(key)
    if v is not None:
        cache.move_to_end(key)
    return v


def _lru_put(cache: OrderedDict, key, value, limit: int) -> None:
    """Store ``value``, dropping the least recently used entry past ``limit``."""
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)


def new_image_record(size: int, image_id: str | None = None) -> dict:
    return {"id": image_id or uuid.uuid4().hex, "size": size, "created": time.time(), "owner": None, "labels": {},
            "root": None, "sketch": None, "parent": None, "backing": None, "snapshots": [], "next_snapshot_id": 1}


def root_of(rec: dict, what: str) -> pc.Entry:
    r = rec.get("root")
    if r is None:
        return pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)
    return pc.Entry.from_json(r, what)
