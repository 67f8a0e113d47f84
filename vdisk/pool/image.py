"""One image of a pool, open for reading or writing: its block tree, the write path
with inline dedup and delta compression, and its sketch (formats/pool.md 5, 6, 8).

The tree maps block numbers (4 KiB each) to entries through ``LEVELS`` levels of
512-entry nodes.  Nodes are immutable once stored; a writer keeps the leaves it
changed in ``dirty`` (block number >> 9 -> a mutable copy) and, at ``flush``, stores
them and then every node above them, bottom up, ending in a new root.  Until then a
lookup consults ``dirty`` first and otherwise walks the tree of the last root: the
parents of a dirty leaf are not touched before the flush, so the walk is right for
every other leaf.  Snapshots and clones share subtrees: taking one records the root.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..codec import pool as pc
from ..errors import (
    ChecksumMismatch,
    CorruptImage,
    ImageLocked,
    ImageNotFound,
    ReadOnlyImage,
    VdiskError,
)
from . import backend as be
from . import features
from .index import fp_key, safe_get, sf_key
from .store import BlobMismatch, Pool, root_of

B = pc.BLOCK
F = pc.FANOUT
DIRTY_LIMIT = 4096  # dirty leaves (48 MiB) before a write commits on its own
LEAF_MEMO = 4096  # clean leaves remembered by leaf index (references to the node cache's bytes)
_EMPTY_NODE = bytes(pc.NODE_BYTES)
_UNALLOC = pc.Entry(0, 0, 0, 0, pc.UNALLOCATED)
_POOL = None


def _executor() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vdisk-pool")
    return _POOL


class PoolImage:
    def __init__(self, pool: Pool, name: str, *, read_only: bool, snapshot: str | None = None,
                 force_share: bool = False):
        self.pool = pool
        self.name = name
        self.what = f"{pool.url}/{name}"
        rec = pool.image_record(name)
        self.image_id = str(rec["id"])
        self.read_only = read_only or snapshot is not None
        self.snapshot = None
        self._lock = None
        if snapshot is not None:
            snap = find_snapshot(rec, snapshot, self.what)
            self.snapshot = snap
            self.root = pc.Entry.from_json(snap["root"], self.what) if snap.get("root") else _UNALLOC
            self.size = int(snap["size"])
            self.sketch_ref = snap.get("sketch")
        else:
            if not pool.local:
                rec = self._lease_or_check(rec, force_share)
            elif not self.read_only or not force_share:
                try:
                    self._lock = be.lock(pool.backend, f"img-{self.image_id}", exclusive=not self.read_only)
                except be.LockBusy:
                    verb = "written" if self.read_only else "used"
                    raise ImageLocked(f"{self.what}: image is being {verb} by another process",
                                      option_hint=("force_share", "(use -U/--force-share to read it anyway)")) from None
            self.root = root_of(rec, self.what)
            self.size = int(rec["size"])
            self.sketch_ref = rec.get("sketch")
        if self.size < 0 or self.size > pc.MAX_BLOCKS * B:
            raise CorruptImage(f"{self.what}: size {self.size} out of range")
        self.dirty: dict[int, bytearray] = {}
        self._sketch: features.Sketch | None = None
        self.size_changed = False
        self.has_backing = rec.get("backing") is not None

    def _lease_or_check(self, rec: dict, force_share: bool) -> dict:
        """On an object store: a writer takes the image's lease and claims it in the
        catalog (fencing every older writer, formats/pool.md 13.3), and reads its state
        from the catalog it claimed on; a reader of the live state refuses a held
        lease unless it shares."""
        from . import lease as lm

        pool = self.pool
        if self.read_only:
            if not force_share:
                lm.check_no_writer(pool.backend, self.image_id, self.what)
            return rec
        lease = lm.Lease(pool.backend, self.image_id, self.what)
        try:
            floor = int((rec.get("writer") or {}).get("epoch", 0))
        except (TypeError, ValueError):
            floor = 0
        lease.acquire(floor)
        try:
            name, image_id, epoch, who = self.name, self.image_id, lease.epoch, dict(lease.record)

            def claim(cat: dict) -> None:
                r = cat["images"].get(name)
                if not isinstance(r, dict) or r.get("id") != image_id:
                    raise ImageNotFound(f"{self.what}: no such image in the pool")
                w = r.get("writer") or {}
                if int(w.get("epoch", 0)) >= epoch:
                    raise ImageLocked(f"{self.what}: image was taken for writing by {lm.describe(w)}")
                r["writer"] = {k: who[k] for k in ("epoch", "host", "pid", "since")}

            pool.commit(claim)
            pool.fence = (name, image_id, epoch)
        except BaseException:
            lease.release()
            raise
        self._lock = lease
        return pool.image_record(name)

    # ------------------------------------------------------------------ tree
    @property
    def root(self) -> pc.Entry:
        """The committed tree's root; setting it forgets the clean leaves looked up."""
        return self._root

    @root.setter
    def root(self, e: pc.Entry) -> None:
        self._root = e
        self._leaves: dict[int, bytes | None] = {}

    def _leaf(self, li: int) -> bytes | bytearray | None:
        d = self.dirty.get(li)
        if d is not None:
            return d
        try:
            return self._leaves[li]
        except KeyError:
            pass
        leaf = self._clean_leaf(li)
        if len(self._leaves) >= LEAF_MEMO:
            self._leaves.clear()
        self._leaves[li] = leaf
        return leaf

    def _clean_leaf(self, li: int) -> bytes | None:
        """The leaf ``li`` of the committed tree (None: unallocated), walked from the
        root through the pool's node cache."""
        e = self.root
        for level in range(pc.LEVELS - 1):
            if e.kind == pc.UNALLOCATED:
                return None
            node = self.pool.load_node(e, f"{self.what}: tree node")
            shift = 9 * (pc.LEVELS - 2 - level)
            e = pc.unpack_entry(node, (li >> shift) & (F - 1), f"{self.what}: tree node")
        if e.kind == pc.UNALLOCATED:
            return None
        return self.pool.load_node(e, f"{self.what}: leaf")

    def entry(self, bn: int) -> pc.Entry:
        leaf = self._leaf(bn >> 9)
        if leaf is None:
            return _UNALLOC
        return pc.unpack_entry(leaf, bn & (F - 1), f"{self.what}: leaf of block {bn}")

    def _mutable_leaf(self, li: int) -> bytearray:
        d = self.dirty.get(li)
        if d is None:
            cur = self._leaf(li)
            d = self.dirty[li] = bytearray(cur if cur is not None else _EMPTY_NODE)
        return d

    def _store_tree(self) -> pc.Entry:
        """Store the dirty leaves and the nodes above them; returns the new root."""
        pool = self.pool
        level_dirty = {li: pool.store_node(bytes(leaf)) for li, leaf in sorted(self.dirty.items())}
        for level in range(pc.LEVELS - 2, -1, -1):  # parents of the level below
            parents: dict[int, bytearray] = {}
            for idx, e in level_dirty.items():
                pi = idx >> 9
                node = parents.get(pi)
                if node is None:
                    cur = self._node_at(level, pi)
                    node = parents[pi] = bytearray(cur if cur is not None else _EMPTY_NODE)
                o = (idx & (F - 1)) * pc.ENTRY_SIZE
                node[o: o + pc.ENTRY_SIZE] = e.pack_bytes()
            level_dirty = {pi: pool.store_node(bytes(n)) for pi, n in sorted(parents.items())}
        (root,) = level_dirty.values()
        return root

    def _node_at(self, level: int, index: int) -> bytes | None:
        """The clean node at ``level`` (0 = root) covering node ``index`` of that level."""
        e = self.root
        for lv in range(level):
            if e.kind == pc.UNALLOCATED:
                return None
            node = self.pool.load_node(e, f"{self.what}: tree node")
            shift = 9 * (level - lv - 1)
            e = pc.unpack_entry(node, (index >> shift) & (F - 1), f"{self.what}: tree node")
        if e.kind == pc.UNALLOCATED:
            return None
        return self.pool.load_node(e, f"{self.what}: tree node")

    def walk(self, root: pc.Entry | None = None):
        """(block number, entry) of every allocated entry under ``root`` (default: the
        image's committed root), in order; visits each node once.  A node that one tree
        names twice (a hostile tree: 512^3 paths can lead to one leaf) is walked at its
        first position only, so the walk is bounded by the nodes stored."""
        stack = [((root or self.root), 0, 0)]
        seen: set[tuple[int, int]] = set()
        while stack:
            e, level, base = stack.pop()
            if e.kind == pc.UNALLOCATED or e.loc in seen:
                continue
            seen.add(e.loc)
            node = self.pool.load_node(e, f"{self.what}: tree node")
            span = F ** (pc.LEVELS - 1 - level)
            if level == pc.LEVELS - 1:
                for i in range(F):
                    c = pc.unpack_entry(node, i, f"{self.what}: leaf")
                    if c.kind != pc.UNALLOCATED:
                        yield base + i, c
                continue
            for i in range(F - 1, -1, -1):
                c = pc.unpack_entry(node, i, f"{self.what}: tree node")
                if c.kind != pc.UNALLOCATED:
                    stack.append((c, level + 1, base + i * span))

    # ------------------------------------------------------------------ reading
    def read_block(self, bn: int, backing) -> bytes:
        return self._block(self.entry(bn), bn, backing)

    def _block(self, e: pc.Entry, bn: int, backing) -> bytes:
        if e.kind == pc.UNALLOCATED:
            if backing is not None:
                return _read_backing(backing, bn * B, B)
            return pc.ZERO_BLOCK
        if e.kind == pc.ZERO:
            return pc.ZERO_BLOCK
        try:
            return self.pool.cached_block(e, self.what)
        except BlobMismatch:
            raise ChecksumMismatch(f"{self.what}: checksum mismatch at guest offset {bn * B:#x}", bn * B) from None
        except CorruptImage:  # again, for the message that names the guest offset
            return self.pool.decode_block(e, f"{self.what}: block at guest offset {bn * B:#x}")

    def _entries(self, first: int, last: int) -> list[pc.Entry]:
        """The entries of blocks ``first`` to ``last`` (inclusive); each leaf looked up once."""
        out = []
        what = self.what
        bn = first
        while bn <= last:
            leaf = self._leaf(bn >> 9)
            stop = min(last, bn | (F - 1))
            if leaf is None:
                out += [_UNALLOC] * (stop - bn + 1)
            else:
                out += [pc.unpack_entry(leaf, i & (F - 1), what) for i in range(bn, stop + 1)]
            bn = stop + 1
        return out

    def read(self, offset: int, length: int, backing) -> bytes:
        """Guest bytes; the leaf of each run of 512 blocks is looked up once, and a
        block read before is served from the pool's cache of decoded blocks (a warm
        4 KiB read is a leaf and a dict lookup).  On an object store the blobs of the
        range that are not cached are fetched first, adjacent ones in one request,
        several requests at once (``backend.prefetch``)."""
        if length <= 0:
            return b""
        first, last = offset // B, (offset + length - 1) // B
        entries = self._entries(first, last)
        if last > first and hasattr(self.pool.backend, "prefetch"):
            self._prefetch(entries)
        parts = [self._block(e, first + i, backing) for i, e in enumerate(entries)]
        head, tail = offset - first * B, (last + 1) * B - offset - length
        if len(parts) == 1:
            blk = parts[0]
            return blk if not head and not tail else blk[head: B - tail]
        if head:
            parts[0] = parts[0][head:]
        if tail:
            parts[-1] = parts[-1][: B - tail]
        return b"".join(parts)

    def _prefetch(self, entries: list[pc.Entry]) -> None:
        from .store import pack_name

        pool = self.pool
        pending = pool._pending_no if pool._pending is not None else None
        want = [(pack_name(e.pack), e.offset, e.length) for e in entries
                if e.kind in pc.DATA_KINDS and e.pack != pending and not pool.has_block(e)]
        if len(want) > 1:
            pool.backend.prefetch(want)

    # ------------------------------------------------------------------ writing
    @property
    def sketch(self) -> features.Sketch:
        if self._sketch is None:
            self._sketch = load_sketch(self.pool, self.sketch_ref, self.what)
        return self._sketch

    def _set(self, bn: int, e: pc.Entry) -> None:
        leaf = self._mutable_leaf(bn >> 9)
        o = (bn & (F - 1)) * pc.ENTRY_SIZE
        old = pc.unpack_entry(leaf, bn & (F - 1), self.what)
        if old.kind in pc.DATA_KINDS:
            self.sketch.remove(old.hash)
        if e.kind in pc.DATA_KINDS:
            self.sketch.add(e.hash)
        leaf[o: o + pc.ENTRY_SIZE] = e.pack_bytes()

    def write(self, offset: int, data: bytes, backing) -> None:
        if self.read_only:
            raise ReadOnlyImage(f"{self.what}: image is read-only")
        mv = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            bn = pos // B
            inner = pos - bn * B
            if inner or end - pos < B:  # a partial block: read, modify, write
                n = min(B - inner, end - pos)
                blk = bytearray(self.read_block(bn, backing))
                blk[inner: inner + n] = mv[pos - offset: pos - offset + n]
                self._store_blocks(bn, bytes(blk))
                pos += n
                continue
            nblk = min((end - pos) // B, 256)
            self._store_blocks(bn, mv[pos - offset: pos - offset + nblk * B])
            pos += nblk * B
        if len(self.dirty) > DIRTY_LIMIT:
            self.flush()

    def _store_blocks(self, first: int, buf) -> None:
        """Store whole blocks ``first, first+1, ...`` from ``buf``: zeros become ZERO
        entries, duplicates (fingerprint hit, verified byte for byte) share the stored
        blob, similar blocks become deltas, the rest are compressed."""
        pool = self.pool
        dedup = pool.settings.get("dedup", True)
        n = len(buf) // B
        blocks = [bytes(buf[i * B:(i + 1) * B]) for i in range(n)]
        todo: list[int] = []  # indexes of blocks to store
        fps: list[bytes | None] = [None] * n
        hashes = [0] * n
        result: list[pc.Entry | None] = [None] * n
        batch_first: dict[bytes, int] = {}
        for i, blk in enumerate(blocks):
            if blk == pc.ZERO_BLOCK:
                result[i] = pc.ZERO_ENTRY
                continue
            h, fp = pc.block_hash(blk)
            hashes[i], fps[i] = h, fp
            if dedup:
                if fp in batch_first:
                    continue  # filled in once the first copy is stored
                hit = safe_get(pool.fp, fp_key(fp))
                if hit is not None:
                    e = self._verified(hit, blk)
                    if e is not None:
                        result[i] = e
                        continue
                batch_first[fp] = i
            todo.append(i)
        if todo:
            self._compress_and_store(blocks, todo, hashes, fps, result)
        for i in range(n):
            e = result[i]
            if e is None:
                e = result[batch_first[fps[i]]]
            self._set(first + i, e)

    def _verified(self, hit: bytes, blk: bytes) -> pc.Entry | None:
        try:
            e = pc.unpack_entry(hit, 0, "index")
            if e.kind not in pc.DATA_KINDS:
                return None
            if self.pool.decode_block(e, "index hit") == blk:
                return e
        except VdiskError:
            pass
        return None

    def _compress_and_store(self, blocks, todo, hashes, fps, result) -> None:
        pool = self.pool
        cctx_compress = pool.cctx.compress
        if len(todo) >= 8:
            comp = list(_executor().map(_compress, [blocks[i] for i in todo], [pool.settings.get("zstd_level", 3)] * len(todo)))
        else:
            comp = [cctx_compress(blocks[i]) for i in todo]
        sfs = None
        if pool.settings.get("delta", True):
            sfs = features.superfeatures(b"".join(blocks[i] for i in todo), len(todo))
        for j, i in enumerate(todo):
            blk = blocks[i]
            c = comp[j]
            kind, payload = (pc.ZSTD, c) if len(c) < B else (pc.RAW, blk)
            if sfs is not None:
                best = self._delta(blk, sfs[j], len(payload))
                if best is not None:
                    kind, payload = pc.DELTA, best
            e = pool.append_blob(kind, payload, hashes[i])
            result[i] = e
            if pool.settings.get("dedup", True):
                pool.fp.add(fp_key(fps[i]), e.pack_bytes())
            if sfs is not None and kind != pc.DELTA:
                eb = e.pack_bytes()
                for k, sf in enumerate(sfs[j]):
                    pool.sf.add(sf_key(k, sf), eb)

    def _delta(self, blk: bytes, sfs: tuple[int, ...], plain: int) -> bytes | None:
        pool = self.pool
        for k, sf in enumerate(sfs):
            hit = safe_get(pool.sf, sf_key(k, sf))
            if hit is None:
                continue
            try:
                base_e = pc.unpack_entry(hit, 0, "similarity index")
                if base_e.kind not in (pc.RAW, pc.ZSTD):
                    continue
                base = pool._base(base_e, "similarity index hit")
            except VdiskError:
                continue
            d = pool.cctx.compress(pc.xor_blocks(blk, base))
            if pc.DELTA_HEAD + len(d) < plain * 0.8:
                return base_e.pack_bytes() + d
            return None
        return None

    def zero(self, offset: int, length: int, backing, *, unmap: bool) -> None:
        """Whole blocks in the range become ZERO (or, with ``unmap`` and no backing
        image, UNALLOCATED); partial blocks at its ends are written with zeros."""
        if self.read_only:
            raise ReadOnlyImage(f"{self.what}: image is read-only")
        end = offset + length
        first = -(-offset // B)
        last = end // B
        if first >= last:
            self.write(offset, bytes(length), backing)
            return
        if offset < first * B:
            self.write(offset, bytes(first * B - offset), backing)
        e = _UNALLOC if unmap and backing is None and not self.has_backing else pc.ZERO_ENTRY
        for bn in range(first, last):
            if e.kind == pc.UNALLOCATED and (bn & (F - 1)) == 0 and bn + F <= last and (bn >> 9) not in self.dirty \
                    and self._leaf(bn >> 9) is None:
                continue
            self._set(bn, e)
        if last * B < end:
            self.write(last * B, bytes(end - last * B), backing)
        if len(self.dirty) > DIRTY_LIMIT:
            self.flush()

    def truncate_tail(self, new_size: int) -> None:
        """Drop entries past ``new_size`` (shrink) so that growing again reads zeros."""
        first = -(-new_size // B)
        last = -(-self.size // B)
        if new_size % B:
            bn = new_size // B
            e = self.entry(bn)
            if e.kind != pc.UNALLOCATED:
                blk = bytearray(self.read_block(bn, None))
                blk[new_size % B:] = bytes(B - new_size % B)
                self._store_blocks(bn, bytes(blk))
        for bn in range(first, last):
            if self.entry(bn).kind != pc.UNALLOCATED:
                self._set(bn, _UNALLOC)

    # ------------------------------------------------------------------ commit
    def flush(self) -> None:
        """Store the tree, the sketch and full index tables, then commit them."""
        if self.read_only:
            return
        pool = self.pool
        if not self.dirty and not self.size_changed and not (self._sketch and self._sketch.changed):
            idx = pool.write_indexes(everything=False)
            if idx is not None:
                pool.commit(idx)
                pool.after_commit_indexes()
            return
        root = self._store_tree() if self.dirty else self.root
        sketch_ref = self.sketch_ref
        if self._sketch is not None and self._sketch.changed:
            data = pc.encode_sketch(self._sketch.items)
            sk = self._sketch
            while len(pool.cctx.compress(data)) > pc.MAX_BLOB:  # ~10000 hashes of 16384 fit in one blob
                sk.shift += 1  # a sample of a sample is a sample (formats/pool.md 8.2)
                sk.items = {k: v for k, v in sk.items.items() if features.sampled(k, sk.shift)}
                data = pc.encode_sketch(sk.items)
            sketch_ref = {"ref": pool.store_meta(data).to_json(), "bytes": len(data), "shift": self._sketch.shift}
        idx = pool.write_indexes(everything=False)
        name, size, image_id = self.name, self.size, self.image_id

        def mutate(cat: dict) -> None:
            rec = cat["images"].get(name)
            if not isinstance(rec, dict) or rec.get("id") != image_id:
                raise VdiskError(f"{self.what}: the image was removed while open")
            rec["root"] = None if root.kind == pc.UNALLOCATED else root.to_json()
            rec["size"] = size
            rec["sketch"] = sketch_ref
            if idx is not None:
                idx(cat)

        pool.commit(mutate)
        self.root = root
        self.dirty.clear()
        self.sketch_ref = sketch_ref
        if self._sketch is not None:
            self._sketch.changed = False
        self.size_changed = False
        if idx is not None:
            pool.after_commit_indexes()

    def close(self) -> None:
        try:
            if not self.read_only:
                self.flush()
                idx = self.pool.write_indexes(everything=True)
                if idx is not None:
                    self.pool.commit(idx)
                    self.pool.after_commit_indexes()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if self.pool.fence is not None and self.pool.fence[0] == self.name:
                self.pool.fence = None


_LOCAL_CCTX = {}


def _compress(blk: bytes, level: int) -> bytes:
    import threading

    import zstandard

    key = (threading.get_ident(), level)
    c = _LOCAL_CCTX.get(key)
    if c is None:
        c = _LOCAL_CCTX[key] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return c.compress(blk)


def _read_backing(backing, offset: int, length: int) -> bytes:
    if offset >= backing.size:
        return bytes(length)
    n = min(length, backing.size - offset)
    data = backing.read(offset, n)
    return data + bytes(length - n)


def find_snapshot(rec: dict, spec: str, what: str) -> dict:
    from ..errors import SnapshotNotFound

    snaps = rec.get("snapshots", [])
    if spec.startswith("#"):
        for s in snaps:
            if f"#{s.get('id')}" == spec:
                return s
    else:
        for s in snaps:
            if s.get("name") == spec and not s.get("hidden"):
                return s
    raise SnapshotNotFound(f"{what}: no snapshot {spec!r}")


def load_sketch(pool: Pool, ref: dict | None, what: str) -> features.Sketch:
    if not ref:
        return features.Sketch()
    try:
        e = pc.Entry.from_json(ref["ref"], what)
        data = pool.load_meta(e, int(ref["bytes"]), f"{what}: sketch")
        return features.Sketch(pc.decode_sketch(data, what), int(ref["shift"]))
    except (KeyError, TypeError, ValueError):
        raise CorruptImage(f"{what}: bad sketch reference") from None
