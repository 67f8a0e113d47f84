"""The transaction: the state a commit turns into a new generation, and the commit
protocol of section 13.2.

A transaction is everything changed since the current header was written.
``_commit`` ends it:

1. ``TxnState.begin`` opens a commit attempt;
2. ``_place_tables`` gives every dirty L2 table, the L1 table, the snapshot table,
   the changed refcount blocks and a new refcount table newly allocated clusters
   (allocating them changes refcounts, so it iterates to a fixed point);
3. they are written, the file is grown to the host area, fdatasync;
4. ``TxnState.commit``: the attempt stands, and a new transaction begins;
5. the header goes to the slot that does not hold the current one, fdatasync;
6. ``_release_pending``: the clusters the committed transaction freed may be
   reused, and holes are punched in them.

Contract.  A failure in steps 2-3 changes nothing durable, and
``TxnState.abort`` puts the in-memory state back exactly as it was before step 1,
so a later flush retries the same transaction.  A failure in step 5 leaves it
unknown whether that generation is durable: what either generation references
stays reserved (the committed transaction's frees wait in ``held_free`` for its
header; those of the transaction after it wait for the next header), and the next
commit first writes that same header again, to the same slot (``_header_unsure``),
before step 6 releases them.

State owned: ``txn`` (a :class:`TxnState`), ``slot``/``_slot_gen`` (the slot of the
current header) and ``_header_unsure``; ``header`` becomes the new generation's in
step 4.
"""

from __future__ import annotations

import array
import heapq
from dataclasses import MISSING, dataclass, field, fields

from ...codec import vdk as C
from ...errors import VdiskError

AUTO_COMMIT_DIRTY_L2 = 1024
AUTO_COMMIT_PENDING_FREE = 1 << 16
#: at most this many bytes of free clusters wait for their hole punch (see _release_pending)
PUNCH_SLACK_BYTES = 64 << 20

# The scope of each TxnState field: what happens to it when its transaction commits.
_IMAGE = {"scope": "image"}  # describes the image: kept across transactions
_TXN = {"scope": "txn"}  # this transaction's own: a new transaction starts from the default
#: the refcount array: kept across transactions, rolled back by an undo log instead of a copy
_UNDO = {"scope": "image", "rollback": "undo"}


def _array_q() -> array.array:
    return array.array("Q")


def _copy(value):
    """A copy of a field's value that no change to the original can reach.  The
    containers of TxnState hold ints only, so a shallow copy is a complete one; any
    other type is refused, so that a new kind of field gets a rollback rule."""
    if value is None or type(value) in (int, bool):
        return value
    if type(value) in (list, set, dict):
        return value.copy()
    if type(value) is array.array:
        return value[:]
    raise TypeError(f"TxnState cannot copy a {type(value).__name__} field: give it a rollback rule")


@dataclass(eq=False)
class TxnState:
    """Everything a commit attempt may change, in one object; ``begin``, ``commit`` and
    ``abort`` delimit the attempt.

    Transaction-scoped (reset to their defaults by ``commit``): ``dirty``, the flags
    and sets saying what the transaction changed, its packing cluster, and the
    clusters it freed (``pending_free``, ``dropped_new``), which ``commit`` hands
    to ``held_free``/``held_dropped``: they stay reserved until the header of
    *their* transaction is durable (``_release_pending``), also when that header's
    write fails and the next transaction frees more meanwhile.  (Which L2 tables
    the transaction changed is the L2 cache's dirty set, not a field here: an
    attempt only reads it.)  The rest describes the image and is kept.  All of it is state a commit attempt changes: placing
    the tables allocates clusters (``host_clusters``, ``rc``, ``free_heap``,
    ``scan_pos``, ``new_clusters``), drops the old tables (``pending_free``,
    ``dropped_new``, ``pack_cluster``) and rewrites the L1 and refcount table
    entries (``l1_off``/``l1_sum``, ``rt_off``/``rt_sum``).

    Why rollback is complete:

    * ``begin`` copies every field, iterating :func:`dataclasses.fields`, and
      ``abort`` restores every field from that copy: a field added later is covered
      without touching either method.  ``_copy`` refuses a type it cannot copy
      completely.
    * The refcount array (``rc``, 4 bytes per host cluster) is not copied: every
      change to it goes through ``AllocMixin._set_rc``, which logs the old value
      while an attempt is open (``undo``); ``abort`` replays the log backwards and
      cuts the array back to its length at ``begin``.
    * Nothing outside this object changes during an attempt: ``_place_tables``
      only reads ``header``, ``size``, ``snapshots`` and the dirty L2 tables
      (``l2cache.dirty_items()``); the L2 cache is updated (tables marked clean,
      emptied ones dropped) and ``header`` replaced only after ``commit``;
      ``_unwritten`` is empty (it is written before ``begin``).  The one
      exception is deliberate: ``broken``, set when a refcount would go below zero,
      stays set (the image is corrupt whether or not the attempt fails).
    * The bytes an aborted attempt wrote lie in clusters that are free in the
      durable state, or past its host area: nothing references them (``check``
      reports them as leaked space, a repair reclaims it).
    """

    # -- the allocator (alloc): the host area and its refcounts
    host_clusters: int = field(metadata=_IMAGE)
    rc: array.array | None = field(default=None, metadata=_UNDO)  # loaded on a writable open, or on demand
    free_heap: list[int] = field(default_factory=list, metadata=_IMAGE)  # candidates; checked when popped
    scan_pos: int = field(default=0, metadata=_IMAGE)  # refcounts below this were scanned into free_heap
    rt_off: array.array = field(default_factory=_array_q, metadata=_IMAGE)  # the refcount table
    rt_sum: array.array = field(default_factory=_array_q, metadata=_IMAGE)
    # -- the L1 of the live (or viewed) root (tables); compact: 8 bytes an entry
    l1_off: array.array = field(default_factory=_array_q, metadata=_IMAGE)
    l1_sum: array.array = field(default_factory=_array_q, metadata=_IMAGE)
    # -- what this transaction changed
    dirty: bool = field(default=False, metadata=_TXN)  # anything at all: the next flush commits
    l1_dirty: bool = field(default=False, metadata=_TXN)  # the live L1 is this transaction's copy
    snap_dirty: bool = field(default=False, metadata=_TXN)  # the snapshot table must be rewritten
    rc_dirty: set[int] = field(default_factory=set, metadata=_TXN)  # refcount blocks that changed
    new_clusters: set[int] = field(default_factory=set, metadata=_TXN)  # allocated in this transaction
    pack_cluster: int = field(default=-1, metadata=_TXN)  # where compressed frames are packed, or -1
    pack_used: int = field(default=0, metadata=_TXN)  # bytes of it in use
    pending_free: set[int] = field(default_factory=set, metadata=_TXN)  # refcount 0, durably referenced
    dropped_new: set[int] = field(default_factory=set, metadata=_TXN)  # allocated, dropped again: punch
    # -- the frees of the last committed transaction, until its header is durable
    held_free: set[int] = field(default_factory=set, metadata=_IMAGE)  # as pending_free: not reusable
    held_dropped: set[int] = field(default_factory=set, metadata=_IMAGE)  # free; punched on release

    def __post_init__(self) -> None:
        #: (cluster, old refcount) of every refcount change of the open attempt, else None
        self.undo: list[tuple[int, int]] | None = None
        self._saved: dict | None = None
        self._rc_len = 0

    def begin(self) -> None:
        """Open a commit attempt: remember every field, start logging refcount changes."""
        if self._saved is not None:
            raise RuntimeError("a commit attempt is open already")
        self._saved = {f.name: getattr(self, f.name) if f.metadata.get("rollback") == "undo"
                       else _copy(getattr(self, f.name)) for f in fields(self)}
        self._rc_len = len(self.rc) if self.rc is not None else 0
        self.undo = []

    def commit(self) -> None:
        """The attempt succeeded (its tables are durable): keep what it changed, hold
        the clusters it freed until its header is durable, and start the next
        transaction (transaction-scoped fields back to their defaults)."""
        self._saved = self.undo = None
        self.held_free |= self.pending_free
        self.held_dropped |= self.dropped_new
        for f in fields(self):
            if f.metadata["scope"] == "txn":
                setattr(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)

    def abort(self) -> None:
        """The attempt failed: every field, and every refcount, as at ``begin``."""
        saved, undo = self._saved, self.undo
        if saved is None:
            raise RuntimeError("no commit attempt is open")
        self._saved = self.undo = None
        rc = self.rc
        if rc is not None:
            n = self._rc_len
            for c, v in reversed(undo):
                if c < n:
                    rc[c] = v
            del rc[n:]
        for name, value in saved.items():
            setattr(self, name, value)


class TxnMixin:
    """flush, close and the commit of a transaction."""

    def flush(self) -> None:
        if self.read_only:
            return
        self._commit()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self.broken:
                self._commit()
                if not self._header_unsure:
                    self._punch_deferred()
        finally:
            self._closed = True
            self.host.close()

    def _maybe_commit(self) -> None:
        t = self.txn
        if len(self.l2cache.dirty) > AUTO_COMMIT_DIRTY_L2 or len(t.pending_free) > AUTO_COMMIT_PENDING_FREE:
            self._commit()

    def _commit(self, force: bool = False) -> None:
        """End the transaction: write a new generation (the steps of the module
        docstring).  Nothing to do if nothing changed, unless ``force`` (the header
        itself changed)."""
        t = self.txn
        if self.read_only or not (t.dirty or force or self._header_unsure):
            return
        self._check_writable()
        if self._header_unsure:
            self._write_header(self.header)
            self._header_unsure = False
            self._release_pending()
            if not (t.dirty or force):
                return
        if self._unwritten:
            self._rewrite_unwritten()
        t.begin()
        try:
            new, writes, emptied = self._place_tables()
            for off, data in writes:
                self.host.pwrite(off, data)
            if self.host.size() < t.host_clusters * self.cluster_size:
                self.host.truncate(t.host_clusters * self.cluster_size)
            self.host.flush()
        except BaseException:
            t.abort()
            raise
        allocated = len(t.new_clusters)
        t.commit()
        self.header = new
        self.l2cache.mark_clean()  # written: they may be evicted again
        for l2i in emptied:
            self.l2cache.pop(l2i)
        try:
            self._write_header(new)
        except BaseException:
            self._header_unsure = True
            raise
        self._release_pending(allocated)

    def _write_header(self, h: C.Header) -> None:
        """Write ``h`` over the slot that does not hold the current header, then sync.
        (Re-issuing a header whose write failed goes to the same slot again.)"""
        if h.generation != self._slot_gen:
            self.slot = 1 - self.slot
            self._slot_gen = h.generation
        data = h.encode()
        self.host.pwrite(C.SLOT_OFFSETS[self.slot], data + bytes(C.SLOT_SIZE - len(data)))
        self.host.flush()

    def _release_pending(self, allocated: int | None = None) -> None:
        """Step 6: the newest generation is durable, so what its transaction freed
        (``held_free``) may be reused.  The frees of the transaction open now are not
        touched: the durable header may still reference them.

        Hole punching: with ``allocated`` (what the committed transaction allocated),
        only the transaction's net frees are punched -- as many clusters as it freed
        beyond what it allocated, the highest free ones -- and the punch of the rest
        is deferred (at most ``PUNCH_SLACK_BYTES`` of them; past that, the highest go
        too).  A copy-on-write transaction frees about as many clusters as it
        allocates (the replaced data and tables), so in a stream of writes and
        flushes the freed clusters are rewritten by the next transaction (the
        allocator hands out the lowest free cluster first) instead of being punched
        and allocated again by the host file system: a fallocate punch of 64 KiB
        costs ~100 us on ext4 mounted with ``discard``, and was most of a commit.  A
        transaction that mostly frees (a discard, a snapshot deletion) still gives
        that space back at once.  ``close`` and ``check`` punch what waited
        (``_punch_deferred``).  Without ``allocated`` (a header written again after a
        failure), everything free is punched, as before."""
        t = self.txn
        freed = sorted(t.held_free)
        for c in freed:
            heapq.heappush(t.free_heap, c)
        t.held_free.clear()
        if t.held_dropped:
            # Written in a transaction that dropped them again: free, but their bytes
            # would stay in the file (check counts that as leaked space).
            rc = t.rc
            freed = sorted(set(freed).union(c for c in t.held_dropped if c < len(rc) and rc[c] == 0))
            t.held_dropped.clear()
        if allocated is None or not (self._unpunched or allocated):
            self._unpunched.update(freed)
            self._punch_deferred()
            return
        self._unpunched.update(freed)
        self._punch_deferred(max(0, len(freed) - allocated))

    def _punch_deferred(self, punch: int | None = None) -> None:
        """Punch the clusters whose punch was deferred: all of them (``punch`` None),
        or the ``punch`` highest and any beyond ``PUNCH_SLACK_BYTES`` (the lowest
        stay: the allocator hands them out first).  Only clusters free in the current
        state *and* in the durable one are punched: refcount 0 and neither pending
        nor held free (those the durable header may still reference).  A deferred
        cluster reused since (refcount > 0), or freed again and pending, leaves the
        set: its next release adds it again."""
        t = self.txn
        rc = t.rc
        if not self._unpunched:
            return
        if rc is None:
            self._unpunched.clear()
            return
        n = min(len(rc), t.host_clusters)
        free = sorted(c for c in self._unpunched
                      if c < n and rc[c] == 0 and c not in t.pending_free and c not in t.held_free)
        keep = 0 if punch is None else max(0, min(len(free) - punch, PUNCH_SLACK_BYTES >> self.cbits))
        self._unpunched = set(free[:keep])
        self._punch(free[keep:])

    def _place_tables(self) -> tuple[C.Header, list[tuple[int, bytes]], list[int]]:
        """Section 13.2, steps 2-5: give every dirty table a new home.  Returns the new
        header, the writes to issue, and the L2 indices whose table became empty (to
        leave the cache once the attempt stands).  Changes nothing but ``self.txn``."""
        t = self.txn
        cs = self.cluster_size
        cbits = self.cbits
        writes: list[tuple[int, bytes]] = []
        h = self.header
        # 1. L2 tables
        emptied: list[int] = []
        for l2i, tbl in self.l2cache.dirty_items():
            if tbl == self.zero_cluster:
                t.l1_off[l2i] = t.l1_sum[l2i] = 0
                emptied.append(l2i)
                continue
            c = self._alloc()
            data = bytes(tbl)
            writes.append((c << cbits, data))
            t.l1_off[l2i] = c << cbits
            t.l1_sum[l2i] = C.checksum(data)
        # 2. L1 table
        l1_offset, l1_n, l1_sum = h.l1_offset, h.l1_entries, h.l1_checksum
        if t.l1_dirty:
            l1_n = len(t.l1_off)
            if l1_n:
                data = C.encode_l1(t.l1_off, t.l1_sum)
                ncl = (len(data) + cs - 1) >> cbits
                l1_offset = self._alloc_run(ncl) << cbits
                writes.append((l1_offset, data + bytes(ncl * cs - len(data))))
                l1_sum = C.checksum(data)
            else:
                l1_offset, l1_sum = 0, 0
        # 3. snapshot table
        st_off, st_len, st_sum = h.snapshot_table_offset, h.snapshot_table_length, h.snapshot_table_checksum
        if t.snap_dirty:
            if st_off:
                for c in range(st_off >> cbits, (st_off + st_len + cs - 1) >> cbits):
                    self._decref(c)
            data = C.encode_snapshot_table(self.snapshots)
            if data:
                ncl = (len(data) + cs - 1) >> cbits
                st_off = self._alloc_run(ncl) << cbits
                writes.append((st_off, data + bytes(ncl * cs - len(data))))
                st_len, st_sum = len(data), C.checksum(data)
            else:
                st_off = st_len = st_sum = 0
        # 4. refcount blocks and table: placing them changes refcounts, so iterate to a fixed point
        per = self.rc_per_block
        rt_first, rt_ncl = -1, 0
        old_rt = (h.refcount_table_offset, h.refcount_table_entries)
        released_old_rt = False
        rc_placed: dict[int, int] = {}  # refcount block -> its new cluster
        while True:
            todo = [b for b in t.rc_dirty if b not in rc_placed]
            if todo:
                for b in sorted(todo):
                    rc_placed[b] = -1
                    if b < len(t.rt_off) and t.rt_off[b]:
                        self._decref(t.rt_off[b] >> cbits)
                    rc_placed[b] = self._alloc()
                continue
            if not released_old_rt:
                released_old_rt = True
                if old_rt[0]:
                    for c in range(old_rt[0] >> cbits, (old_rt[0] + old_rt[1] * C.RT_ENTRY_SIZE + cs - 1) >> cbits):
                        self._decref(c)
                continue
            nblocks = (t.host_clusters + per - 1) // per
            need = (nblocks * C.RT_ENTRY_SIZE + cs - 1) >> cbits
            if rt_first < 0 or need > rt_ncl:
                if rt_first >= 0:
                    for c in range(rt_first, rt_first + rt_ncl):
                        self._decref(c)
                rt_ncl = need
                rt_first = self._alloc_run(rt_ncl)
                continue
            break
        nblocks = (t.host_clusters + per - 1) // per
        t.rt_off.extend([0] * (nblocks - len(t.rt_off)))
        t.rt_sum.extend([0] * (nblocks - len(t.rt_sum)))
        for b, c in rc_placed.items():
            data = C.encode_refcount_block(t.rc, b * per, per)
            writes.append((c << cbits, data))
            t.rt_off[b] = c << cbits
            t.rt_sum[b] = C.checksum(data)
        rt_data = C.encode_refcount_table(t.rt_off[:nblocks], t.rt_sum[:nblocks])
        writes.append((rt_first << cbits, rt_data + bytes(rt_ncl * cs - len(rt_data))))
        new = h.replace(
            generation=h.generation + 1, virtual_size=self.size, l1_offset=l1_offset, l1_entries=l1_n,
            l1_checksum=l1_sum, refcount_table_offset=rt_first << cbits, refcount_table_entries=nblocks,
            refcount_table_checksum=C.checksum(rt_data), snapshot_table_offset=st_off,
            snapshot_count=len(self.snapshots), snapshot_table_length=st_len, snapshot_table_checksum=st_sum,
            host_clusters=t.host_clusters,
        )
        return new, writes, emptied

    def _punch(self, clusters: list[int]) -> None:
        i = 0
        while i < len(clusters):
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
                j += 1
            try:
                self.host.punch_hole(clusters[i] << self.cbits, (j - i + 1) << self.cbits)
            except VdiskError:
                pass  # space reclamation is best effort; the clusters are free either way
            i = j + 1
