"""Crash and fault harness of pools at the level of their storage backend.

A pool's storage is a :class:`vdisk.pool.backend.Backend`: whole immutable objects
(``put``), one atomic and durable commit point (``put_if_absent``), ``barrier`` to
make earlier puts durable.  So the crash model is the object store's, not the disk
sector's (RELIABILITY.md, "Pools"):

- an object exists whole or not at all (a put is atomic);
- every put, and every delete, of one backend instance becomes durable at that
  instance's next completed ``barrier`` or successful ``put_if_absent`` (each open
  :class:`~vdisk.pool.store.Pool` has its own backend, and a local backend fsyncs the
  files *it* wrote, so one writer's barrier says nothing of another's puts);
- of the puts and deletes not yet durable at the power cut, any subset may have
  happened (a put may be lost, a delete undone); a successful ``put_if_absent`` is
  durable when it returns.

Pieces:

``MemBackend``        a backend in a dict (subclass of ``LocalBackend`` only for the
                      lock files, which stay in the pool's directory).
``Recorder``          the shared objects of one pool and the log of every put /
                      put_if_absent / delete / barrier; ``backend()`` gives a new
                      ``RecordingBackend`` (one per ``Pool``) that logs under its own
                      instance number.  It also injects faults (``FaultPlan``).
``serve(root, make)``  while active, every ``Pool`` opened on directory ``root`` gets
                      ``make()`` as its backend (``vdisk.pool.store.open_backend`` is
                      wrapped), so ``vdisk.open("POOL/IMAGE")`` runs unchanged on it.
``CrashReplay``       rebuilds the object set a power cut after log record *p* can leave:
                      ``all`` (every issued change landed), ``durable`` (only what was
                      durable), ``subset`` (a random subset of the rest), ``prefix``
                      (the rest landed in issue order, up to a random record).
``run_workload``      a seeded workload through the Python API (images, writes with
                      duplicate and similar blocks, zeroes, discards, flushes, snapshots,
                      reverts, resizes, reopens, native clones, removal) with a model of
                      every image after every operation.
``verify``            opens a crash state (no repair), reads every image and snapshot,
                      checks them, and compares with the states the model allows.

It also holds the child-process side of the hostile-pool and fuzz tests (``probe_pool``
and ``python tests/crash/pool_backend.py worker``): see tests/test_pool_crash.py.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from vdisk.errors import HostIOError, VdiskError
from vdisk.pool import backend as be

# ----------------------------------------------------------------------------- backends


class MemBackend(be.LocalBackend):
    """Objects in ``objects`` (a dict, possibly shared); lock files under ``root``."""

    def __init__(self, root: str, objects: dict[str, bytes]):
        super().__init__(root)
        self.objects = objects

    def put(self, name, data):
        be._check_name(name)
        self.objects[name] = bytes(data)

    def put_if_absent(self, name, data):
        be._check_name(name)
        if name in self.objects:
            return False
        self.objects[name] = bytes(data)
        return True

    def _obj(self, name):
        be._check_name(name)
        try:
            return self.objects[name]
        except KeyError:
            raise be.ObjectMissing(f"{self.root}: object {name} is missing") from None

    def get(self, name):
        return self._obj(name)

    def get_range(self, name, offset, length):
        data = self._obj(name)
        if offset < 0 or length < 0:  # as pread(2)
            raise HostIOError(f"{self.root}: reading {name} failed: {os.strerror(_errno.EINVAL)}", _errno.EINVAL)
        return data[offset:offset + length]

    def size(self, name):
        return len(self._obj(name))

    def list(self, prefix=""):
        return sorted(n for n in self.objects if n.startswith(prefix))

    def delete(self, name):
        be._check_name(name)
        self.objects.pop(name, None)

    def barrier(self):
        pass

    def close(self):
        pass


@dataclass
class FaultPlan:
    """The ``at``-th call (0-based, counted over every backend of the recorder) of
    operation ``op`` fails with ``err``; only that one, or that one and every later one
    (``sticky``).  ``landed``: a failing ``put_if_absent`` has stored its object first
    (visible, not durable: the link was made, the directory fsync failed)."""

    op: str | None = None
    at: int = -1
    err: int = _errno.EIO
    sticky: bool = False
    landed: bool = False
    armed: bool = True
    counts: Counter = field(default_factory=Counter)
    injected: int = 0

    OPS = ("put", "put_if_absent", "barrier", "get", "get_range", "size", "list", "delete")

    def gate(self, op: str, where: str) -> bool:
        """Count the call; True if it must fail."""
        n = self.counts[op]
        self.counts[op] += 1
        if self.armed and op == self.op and (n == self.at or (self.sticky and n > self.at)):
            self.injected += 1
            return True
        return False

    def error(self, op: str, where: str) -> HostIOError:
        return HostIOError(f"{where}: {op} failed: {os.strerror(self.err)} (injected)", self.err)


# log records: ("put", inst, name, data) | ("pia", inst, name, data) (a put_if_absent that
# stored its object and returned True) | ("taken", inst, name) (one that returned False)
# | ("del", inst, name) | ("bar", inst) | ("lost", inst, names): a barrier of ``inst``
# failed, and the objects it had put since its last durable point are gone (a failed
# fsync is final: the page cache drops what it could not write back)
class Recorder:
    """One pool's objects, shared by every backend the pool code opens on it, and the log."""

    def __init__(self, root: str, base: dict[str, bytes], fault: FaultPlan | None = None):
        self.root = os.path.abspath(root)
        self.base = dict(base)
        self.objects = dict(base)
        self.log: list[tuple] = []
        self.fault = fault or FaultPlan()
        self._inst = 0
        self._since_sync: dict[int, list[str]] = {}

    def backend(self) -> RecordingBackend:
        self._inst += 1
        return RecordingBackend(self, self._inst)

    def mark(self) -> int:
        return len(self.log)


class RecordingBackend(be.LocalBackend):
    def __init__(self, rec: Recorder, inst: int):
        super().__init__(rec.root)
        self.rec = rec
        self.inst = inst

    def _gate(self, op: str, name: str = "") -> None:
        if self.rec.fault.gate(op, name):
            raise self.rec.fault.error(op, f"{self.root}: {name or op}")

    def _obj(self, name):
        be._check_name(name)
        try:
            return self.rec.objects[name]
        except KeyError:
            raise be.ObjectMissing(f"{self.root}: object {name} is missing") from None

    def put(self, name, data):
        be._check_name(name)
        self._gate("put", name)
        data = bytes(data)
        self.rec.objects[name] = data
        self.rec.log.append(("put", self.inst, name, data))
        self.rec._since_sync.setdefault(self.inst, []).append(name)

    def put_if_absent(self, name, data):
        be._check_name(name)
        fp = self.rec.fault
        if fp.gate("put_if_absent", name):
            if fp.landed and name not in self.rec.objects:
                # stored and visible, but its durability is unknown: a plain put
                self.rec.objects[name] = bytes(data)
                self.rec.log.append(("put", self.inst, name, bytes(data)))
            raise fp.error("put_if_absent", f"{self.root}: {name}")
        if name in self.rec.objects:
            self.rec.log.append(("taken", self.inst, name))
            return False
        data = bytes(data)
        self.rec.objects[name] = data
        self.rec.log.append(("pia", self.inst, name, data))
        self.rec._since_sync[self.inst] = []
        return True

    def get(self, name):
        self._gate("get", name)
        return self._obj(name)

    def get_range(self, name, offset, length):
        self._gate("get_range", name)
        data = self._obj(name)
        if offset < 0 or length < 0:
            raise HostIOError(f"{self.root}: reading {name} failed: {os.strerror(_errno.EINVAL)}", _errno.EINVAL)
        return data[offset:offset + length]

    def size(self, name):
        self._gate("size", name)
        return len(self._obj(name))

    def list(self, prefix=""):
        self._gate("list", prefix)
        return sorted(n for n in self.rec.objects if n.startswith(prefix))

    def delete(self, name):
        be._check_name(name)
        self._gate("delete", name)
        self.rec.objects.pop(name, None)
        self.rec.log.append(("del", self.inst, name))

    def barrier(self):
        if self.rec.fault.gate("barrier", ""):
            lost = self.rec._since_sync.pop(self.inst, [])
            for n in lost:
                self.rec.objects.pop(n, None)
            self.rec.log.append(("lost", self.inst, tuple(lost)))
            raise self.rec.fault.error("barrier", f"{self.root}: syncing objects")
        self.rec.log.append(("bar", self.inst))
        self.rec._since_sync[self.inst] = []

    def close(self):
        pass


# ----------------------------------------------------------------------------- serving
_SERVED: dict[str, object] = {}
_ORIG = None


def _open_backend(url: str):
    make = _SERVED.get(os.path.abspath(url))
    if make is not None:
        return make()
    return _ORIG(url)


@contextlib.contextmanager
def serve(root: str, make):
    """Every Pool opened on ``root`` meanwhile gets ``make()`` as its backend."""
    global _ORIG
    from vdisk.pool import store

    key = os.path.abspath(root)
    if _ORIG is None:
        _ORIG = store.open_backend
        store.open_backend = _open_backend
    _SERVED[key] = make
    try:
        yield
    finally:
        _SERVED.pop(key, None)
        if not _SERVED and _ORIG is not None:
            store.open_backend = _ORIG
            _ORIG = None


def read_dir_objects(root: str) -> dict[str, bytes]:
    """The objects of a pool directory (as LocalBackend lists them)."""
    lb = be.LocalBackend(root)
    try:
        return {n: lb.get(n) for n in lb.list("") if not n.startswith("locks/")}
    finally:
        lb.close()


def view_dir(root: str) -> str:
    """A second directory for the pool at ``root`` (its config file only, for
    ``is_pool_dir``, and its own lock files): crash states are opened there, so that
    the images the workload still has open (and locked) do not get in the way."""
    view = os.path.abspath(root) + ".view"
    if not os.path.exists(os.path.join(view, "config")):
        os.makedirs(view, exist_ok=True)
        with open(os.path.join(root, "config"), "rb") as f, open(os.path.join(view, "config"), "wb") as g:
            g.write(f.read())
    return view


# ----------------------------------------------------------------------------- crash states
@dataclass
class PoolCrashState:
    point: int  # log records [0, point) had completed
    mode: str  # all | durable | subset | prefix
    objects: dict[str, bytes]

    def describe(self) -> str:
        return f"power cut after record {self.point} ({self.mode})"

    def key(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for n in sorted(self.objects):
            h.update(n.encode() + b"\0" + hashlib.blake2b(self.objects[n], digest_size=16).digest())
        return h.digest()


class CrashReplay:
    """Crash states of a recorded log.  ``per_instance`` False: a barrier makes every
    backend's puts durable (a weaker model; the default is the local backend's)."""

    SYNCS = ("bar", "pia")

    def __init__(self, base: dict[str, bytes], log: list[tuple], *, per_instance: bool = True,
                 pia_syncs: bool = True):
        self.base = base
        self.log = log
        self.per_instance = per_instance
        self.pia_syncs = pia_syncs  # False: a broken backend whose barriers and commit point sync nothing else

    def durable_flags(self, point: int) -> list[bool]:
        """For records [0, point): True if the record was durable at the cut."""
        flags = [False] * point
        synced: set = set()
        anyone = False
        for i in range(point - 1, -1, -1):
            rec = self.log[i]
            kind, inst = rec[0], rec[1]
            if kind in ("put", "del"):
                flags[i] = anyone if not self.per_instance else inst in synced
            elif kind == "pia":
                flags[i] = True
            else:
                flags[i] = True  # bar, taken, lost: no change to replay
            if (kind == "bar" or kind == "pia") and self.pia_syncs:
                synced.add(inst)
                anyone = True
        return flags

    def state(self, point: int, mode: str, rng: random.Random | None = None) -> PoolCrashState:
        flags = self.durable_flags(point)
        objs = dict(self.base)
        keep = rng.random() if rng is not None else 0.5
        pending = [i for i in range(point) if not flags[i]]
        k = rng.randint(0, len(pending)) if (rng is not None and mode == "prefix") else 0
        landed = set()
        if mode == "all":
            landed = set(pending)
        elif mode == "subset":
            landed = {i for i in pending if rng.random() < keep}
        elif mode == "prefix":
            landed = set(pending[:k])
        for i in range(point):
            rec = self.log[i]
            kind = rec[0]
            if kind in ("put", "pia"):
                if flags[i] or i in landed:
                    objs[rec[2]] = rec[3]
            elif kind == "del":
                if flags[i] or i in landed:
                    objs.pop(rec[2], None)
            elif kind == "lost":
                for n in rec[2]:
                    objs.pop(n, None)
        return PoolCrashState(point, mode, objs)

    def points(self) -> range:
        return range(len(self.log) + 1)


# ----------------------------------------------------------------------------- model
B = 4096


def image_digest(size: int, data: bytes, snaps: dict[str, bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    h.update(data)
    for name in sorted(snaps):
        h.update(b"\0snap\0" + name.encode() + b"\0" + len(snaps[name]).to_bytes(8, "little"))
        h.update(snaps[name])
    return h.digest()


class ImgModel:
    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.snaps: dict[str, bytes] = {}

    def digest(self) -> bytes:
        return image_digest(len(self.data), bytes(self.data), self.snaps)


@dataclass
class Boundary:
    kind: str
    image: str | None  # the image the operation is about
    start: int  # first log record of the operation
    end: int | None  # log position when it returned (None: it failed)
    images: dict[str, bytes]  # every image's digest after the operation
    barrier_for: frozenset  # images whose state the operation made durable
    set_barrier: bool  # it changed which images exist (create, clone, rm), durably
    mix: tuple | None = None  # a failed write: (image, size, data before, data after, snapshots)


@dataclass
class PoolRun:
    seed: int
    root: str
    base: dict[str, bytes]
    log: list[tuple]
    boundaries: list[Boundary]
    states: dict[bytes, tuple[int, bytes, dict]]  # digest -> (size, data, snapshots), for messages
    counts: Counter


def _payload(rng: random.Random, n: int, written: list[bytes]) -> bytes:
    r = rng.random()
    if r < 0.3 or not written:
        return rng.randbytes(n)
    if r < 0.55:
        word = rng.randbytes(rng.randint(1, 24))
        return (word * (n // len(word) + 1))[:n]
    if r < 0.8:  # duplicates of earlier blocks (dedup)
        out = b"".join(rng.choice(written) for _ in range(-(-n // B)))
        return out[:n]
    # similar to an earlier block: a few bytes changed (delta against it)
    out = bytearray()
    while len(out) < n:
        blk = bytearray(rng.choice(written))
        for _ in range(rng.randint(1, 6)):
            p = rng.randrange(B)
            blk[p] = rng.randrange(256)
        out += blk
    return bytes(out[:n])


class Workload:
    """Runs a seeded workload on the pool at ``root`` through the Python API (the caller
    has made ``serve`` route the pool's backend to a Recorder) and keeps the model: every
    image's guest bytes and visible snapshots after every operation (``boundaries``).

    One image is open at a time for I/O (``cur``); pool-level operations (create, native
    clone of one of its snapshots, rm of another image) run while it is open, through
    Pools of their own, so commits race as between processes.  An operation that raises
    is recorded as a boundary with ``end`` None (its effect may or may not be there) and
    the error propagates."""

    def __init__(self, root: str, seed: int, *, size: int = 3 << 20, nops: int = 60, mark=lambda: 0):
        self.root = root
        self.rng = random.Random(seed)
        self.seed = seed
        self.size = size
        self.nops = nops
        self.mark = mark
        self.images: dict[str, ImgModel] = {}
        self.children: dict[str, set[str]] = {}  # image -> native clones of its snapshots
        self.parent: dict[str, str] = {}
        self.cur_name: str | None = None
        self.cur = None
        self.boundaries: list[Boundary] = []
        self.states: dict[bytes, tuple[int, bytes, dict]] = {}
        self.written: list[bytes] = []
        self.counts: Counter = Counter()
        self._n = {"img": 0, "snap": 0}

    # -------------------------------------------------------------- bookkeeping
    def _digests(self) -> dict[str, bytes]:
        out = {}
        for name, m in self.images.items():
            d = m.digest()
            out[name] = d
            if d not in self.states:
                self.states[d] = (len(m.data), bytes(m.data), dict(m.snaps))
        return out

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _op(self, kind: str, name: str | None, action, update, *, barrier: bool = True, set_barrier: bool = False,
            mix_write: tuple[int, int] | None = None) -> None:
        """Run ``action()`` on the pool, then ``update()`` on the model, and record the
        boundary.  If the action raises, the model after it is recorded as a failed
        boundary (``end`` None) and the error propagates."""
        start = self.mark()
        try:
            action()
        except VdiskError:
            before = bytes(self.images[name].data) if mix_write and name in self.images else None
            update()
            mix = None
            if before is not None:
                m = self.images[name]
                mix = (name, len(m.data), before, bytes(m.data), dict(m.snaps))
            self.boundaries.append(Boundary(f"failed-{kind}", name, start, None, self._digests(), frozenset(), False,
                                            mix))
            raise
        update()
        self.boundaries.append(Boundary(kind, name, start, self.mark(), self._digests(),
                                        frozenset([name]) if barrier and name else frozenset(), set_barrier))
        self.counts[kind] += 1

    # -------------------------------------------------------------- pool-level operations
    def op_create(self, size: int) -> None:
        import vdisk

        self._n["img"] += 1
        name = f"n{self._n['img']}" if self.images else "a"

        def update():
            self.images[name] = ImgModel(bytes(size))
            self.children[name] = set()

        self._op("create", name, lambda: vdisk.create(self.path(name), size), update, set_barrier=True)

    def op_open(self, name: str) -> None:
        import vdisk

        def action():
            self.cur = vdisk.open(self.path(name))
            self.cur_name = name

        self._op("open", name, action, lambda: None, barrier=False)

    def op_close(self, kind: str = "close") -> None:
        name = self.cur_name
        img = self.cur

        def action():
            self.cur = None  # closed even if its last flush fails
            self.cur_name = None
            img.close()

        self._op(kind, name, action, lambda: None)

    def op_clone(self) -> bool:
        from vdisk import block

        src = self.cur_name
        m = self.images[src]
        if not m.snaps:
            return False
        snap = self.rng.choice(sorted(m.snaps))
        self._n["img"] += 1
        name = f"c{self._n['img']}"

        def update():
            self.images[name] = ImgModel(m.snaps[snap])
            self.children[name] = set()
            self.children[src].add(name)
            self.parent[name] = src

        self._op("clone", name, lambda: block.create(self.path(name), None, format="pool",
                                                     backing_file=os.path.abspath(self.path(src)),
                                                     backing_format="pool", backing_snapshot=snap),
                 update, set_barrier=True)
        return True

    def op_rm(self) -> bool:
        from vdisk import block

        cands = [n for n in sorted(self.images) if n != self.cur_name and not self.children[n]]
        if not cands:
            return False
        name = self.rng.choice(cands)

        def update():
            del self.images[name]
            del self.children[name]
            par = self.parent.pop(name, None)
            if par is not None:
                self.children[par].discard(name)

        self._op("rm", name, lambda: block.remove(self.path(name)), update, set_barrier=True)
        return True

    def op_side(self) -> bool:
        """Another writer: open a second image, write, flush and close it while the
        current one stays open with its unflushed writes (commits from two Pools
        interleave)."""
        import vdisk

        others = [n for n in sorted(self.images) if n != self.cur_name]
        if not others:
            return False
        name = self.rng.choice(others)
        m = self.images[name]
        n = min(len(m.data), self.rng.choice([B, 3 * B, 5 * B + 1]))
        off = self.rng.randrange(0, len(m.data) - n + 1)
        data = _payload(self.rng, n, self.written)

        def action():
            with vdisk.open(self.path(name)) as img:
                img.write(off, data)
                img.flush()

        def update():
            m.data[off:off + n] = data

        self._op("side-write", name, action, update)
        return True

    def op_switch(self) -> bool:
        others = [n for n in sorted(self.images) if n != self.cur_name]
        if not others:
            return False
        self.op_close("switch-close")
        self.op_open(self.rng.choice(others))
        return True

    # -------------------------------------------------------------- image operations
    def step(self) -> None:
        rng = self.rng
        img = self.cur
        name = self.cur_name
        m = self.images[name]
        size = len(m.data)
        r = rng.random()
        if r < 0.40:
            n = min(size, rng.choice([1, 511, B, B + 17, 2 * B, 3 * B + 100, 8 * B, 24 * B]))
            off = rng.choice([rng.randrange(0, size - n + 1), rng.randrange(0, (size - n) // B + 1) * B])
            data = _payload(rng, n, self.written)
            for p in range(0, len(data) - B + 1, B):
                if len(self.written) < 64:
                    self.written.append(data[p:p + B])
                elif rng.random() < 0.2:
                    self.written[rng.randrange(64)] = data[p:p + B]

            def update():
                m.data[off:off + n] = data

            self._op("write", name, lambda: img.write(off, data), update, barrier=False, mix_write=(off, n))
        elif r < 0.46:
            n = min(size, rng.choice([B, 3 * B, B // 2 + 5, 10 * B]))
            off = rng.randrange(0, size - n + 1)
            self._op("write_zeroes", name, lambda: img.write_zeroes(off, n),
                     lambda: m.data.__setitem__(slice(off, off + n), bytes(n)), barrier=False, mix_write=(off, n))
        elif r < 0.52:
            n = min(size, rng.choice([B, 4 * B, 7 * B + 3, 600 * B]))
            off = rng.randrange(0, size - n + 1)
            self._op("discard", name, lambda: img.discard(off, n),
                     lambda: m.data.__setitem__(slice(off, off + n), bytes(n)), barrier=False, mix_write=(off, n))
        elif r < 0.64:
            self._op("flush", name, img.flush, lambda: None)
        elif r < 0.70 and len(m.snaps) < 3:
            self._n["snap"] += 1
            sname = f"s{self._n['snap']}"
            self._op("snapshot_create", name, lambda: img.snapshot_create(sname),
                     lambda: m.snaps.__setitem__(sname, bytes(m.data)))
        elif r < 0.74 and m.snaps:
            sname = rng.choice(sorted(m.snaps))
            self._op("snapshot_delete", name, lambda: img.snapshot_delete(sname), lambda: m.snaps.pop(sname))
        elif r < 0.77 and m.snaps:
            sname = rng.choice(sorted(m.snaps))

            def update():
                m.data = bytearray(m.snaps[sname])

            self._op("snapshot_revert", name, lambda: img.snapshot_revert(sname), update)
        elif r < 0.81:
            new = rng.choice([size + B * rng.randint(1, 60) + rng.randint(0, B - 1),
                              max(B, size - B * rng.randint(1, 100) - rng.randint(0, B - 1))])
            if new == size:
                return

            def update():
                if new < size:
                    del m.data[new:]
                else:
                    m.data.extend(bytes(new - size))

            self._op("resize", name, lambda: img.resize(new, shrink=True), update)
        elif r < 0.85:
            self.op_close("reopen-close")
            self.op_open(name)
        elif r < 0.90:
            if not self.op_clone():
                self._op("flush", name, img.flush, lambda: None)
        elif r < 0.93:
            if not self.op_rm():
                self.op_create(self.size // 2)
        elif r < 0.945:
            self.op_switch()
        elif r < 0.96:
            if not self.op_side():
                self.op_switch()
        else:
            self.op_create(self.size // 2)

    def run(self) -> None:
        self.boundaries.append(Boundary("base", None, 0, 0, {}, frozenset(), True))
        self.op_create(self.size)
        self.op_open("a")
        for _ in range(self.nops):
            self.step()
        self.op_close()

    def close_quietly(self) -> None:
        if self.cur is not None:
            try:
                self.cur.close()
            except VdiskError:
                pass
            self.cur = None


def create_pool_dir(root: str) -> dict[str, bytes]:
    """A new pool in ``root`` (on disk, as ``pool create`` makes it); returns its objects."""
    from vdisk.pool.store import Pool

    Pool.create(root)
    return read_dir_objects(root)


def run_workload(root: str, seed: int, *, nops: int = 60, size: int = 3 << 20, fault: FaultPlan | None = None,
                 base: dict | None = None) -> tuple[PoolRun, Recorder, Workload, BaseException | None]:
    """Run the workload on a recorded pool in ``root`` (created if ``base`` is None).
    Stops at the first VdiskError (returned as the 4th value)."""
    if base is None:
        base = create_pool_dir(root)
    rec = Recorder(root, base, fault)
    w = Workload(root, seed, size=size, nops=nops, mark=rec.mark)
    err = None
    with serve(root, rec.backend):
        try:
            w.run()
        except VdiskError as exc:
            err = exc  # the caller decides what to do with the image left open (w.cur)
    run = PoolRun(seed, root, base, list(rec.log), w.boundaries, w.states, w.counts)
    return run, rec, w, err


# ----------------------------------------------------------------------------- checking
@dataclass
class Verdict:
    ok: bool
    message: str = ""
    at_last_barrier: int = 0  # images recovered exactly as of their last barrier
    later: int = 0  # images recovered at a later boundary (the operation in flight)
    images: int = 0
    snapshots: int = 0
    leaked: int = 0
    leaked_objects: int = 0  # objects the pool check reports as leaks (a cut-short writer's)


def window(run: PoolRun, point: int) -> tuple[int, dict[str, int], int]:
    """(B_set, {image: B_image}, J) for a cut after ``point`` records."""
    b_set = 0
    b_img: dict[str, int] = {}
    j = 0
    for i, bd in enumerate(run.boundaries):
        done = bd.end is not None and bd.end <= point
        if done:
            if bd.set_barrier:
                b_set = i
            for n in bd.barrier_for:
                b_img[n] = i
        if bd.start < point or done:
            j = i
    return b_set, b_img, max(j, b_set, *b_img.values()) if b_img else max(j, b_set)


def read_pool(root: str, objects: dict[str, bytes], keep_data: bool = False) -> tuple[dict[str, tuple], object]:
    """Open every image of the pool in ``objects`` read-only (no repair), check it, read
    it and every snapshot; then check the whole pool (``vdisk pool check``).  Returns
    ({name: (digest, catalog record, corruptions, leaked, (size, data, {snapshot: data})
    or None)}, the pool check)."""
    import vdisk
    from vdisk.pool.check import check_pool as pool_check
    from vdisk.pool.store import Pool

    root = view_dir(root)
    out = {}
    with serve(root, lambda: MemBackend(root, objects)):
        p = Pool(root, lock=False)
        try:
            catalog = p.catalog
        finally:
            p.close()
        for name in sorted(catalog["images"]):
            path = os.path.join(root, name)
            with vdisk.open(path, read_only=True) as img:
                res = img.check()
                data = img.read(0, img.size) if img.size else b""
                ext = img.block_status(0, img.size)
                assert sum(e.length for e in ext) == img.size, "block_status does not cover the disk"
                snaps = [s.name for s in img.snapshot_list()]
                size = img.size
            sdata = {}
            for s in snaps:
                with vdisk.open(path, snapshot=s) as si:
                    sdata[s] = si.read(0, si.size) if si.size else b""
            out[name] = (image_digest(size, data, sdata), catalog["images"][name], list(res.corruptions),
                         res.leaked_clusters, (size, data, sdata) if keep_data else None)
        # native clones and the holds on their parents' snapshots go together
        ids = {rec["id"]: n for n, rec in catalog["images"].items()}
        for name, rec in catalog["images"].items():
            par = rec.get("parent")
            if par:
                prec = catalog["images"].get(par["image"])
                snap = next((s for s in (prec or {}).get("snapshots", []) if s["id"] == par["snapshot"]), None)
                if snap is None or not any(h[0] == rec["id"] for h in snap.get("holders", [])):
                    out[name][2].append(f"clone {name}: its parent snapshot {par} does not list it as a holder")
            for s in rec.get("snapshots", []):
                for h in s.get("holders", []):
                    if h[0] not in ids:
                        out[name][2].append(f"snapshot {s['name']} is held by image id {h[0]}, which does not exist")
        whole = pool_check(root)
    return out, whole


def allowed_at(run: PoolRun, point: int) -> tuple[list[set], dict[str, tuple[set, list, int]], str]:
    """What a cut after ``point`` records may leave: the allowed sets of image names, and
    for each image its allowed digests, the failed writes whose blocks may mix, and the
    index of its last barrier; plus a description of the window."""
    b_set, b_img, j = window(run, point)
    names_ok = [set(run.boundaries[i].images) for i in range(b_set, j + 1)]
    per_image: dict[str, tuple[set, list, int]] = {}
    for name in set().union(*names_ok):
        lo = b_img.get(name, b_set)
        bds = run.boundaries[lo:j + 1]
        per_image[name] = ({bd.images[name] for bd in bds if name in bd.images},
                           [bd.mix for bd in bds if bd.mix and bd.mix[0] == name], lo)
    return names_ok, per_image, f"[{b_set} ({run.boundaries[b_set].kind}), {j} ({run.boundaries[j].kind})]"


def _is_mix(mix, digest_of, got_size, got_data, got_snaps) -> bool:
    _name, size, before, after, snaps = mix
    if got_size != size or got_snaps != snaps:
        return False
    return all(got_data[p:p + B] in (before[p:p + B], after[p:p + B]) for p in range(0, size, B))


def check_pool(run: PoolRun, objects: dict[str, bytes], names_ok: list[set], per_image: dict, what: str, *,
               window_text: str = "", continue_after: bool = False) -> Verdict:
    """Open the pool in ``objects`` without repair; it must hold one of the allowed sets
    of images, each in one of its allowed states, and check clean of corruption."""
    try:
        got, whole = read_pool(run.root, objects, keep_data=True)
    except VdiskError as exc:
        return Verdict(False, f"{what}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug: report it with the state
        return Verdict(False, f"{what}: unexpected {type(exc).__name__}: {exc}")
    v = Verdict(True, leaked_objects=whole.leaked_objects)
    if whole.corruptions:
        return Verdict(False, f"{what}: pool check finds corruption: {'; '.join(whole.corruptions[:3])}")
    names = set(got)
    if names not in names_ok:
        return Verdict(False, f"{what}: the pool holds images {sorted(names)}, none of the allowed sets "
                       f"{window_text} {[sorted(n) for n in names_ok][:3]}")
    for name, (digest, _rec, corruptions, leaked, content) in sorted(got.items()):
        v.images += 1
        v.leaked += leaked
        v.snapshots += len(content[2])
        if corruptions:
            return Verdict(False, f"{what}: check of {name} finds corruption: {'; '.join(corruptions[:3])}")
        digests, mixes, lo = per_image[name]
        if digest in digests:
            lo_digest = run.boundaries[lo].images.get(name) if lo < len(run.boundaries) else None
            if digest == lo_digest:
                v.at_last_barrier += 1
            else:
                v.later += 1
            continue
        if any(_is_mix(mx, None, *content) for mx in mixes):
            v.later += 1
            continue
        bd = run.boundaries[lo].images.get(name) if lo < len(run.boundaries) else None
        detail = ""
        if bd in run.states:
            wsize, wdata, wsnaps = run.states[bd]
            gsize, gdata, gsnaps = content
            if wsize != gsize:
                detail = f"size {gsize} != {wsize}"
            elif sorted(wsnaps) != sorted(gsnaps):
                detail = f"snapshots {sorted(gsnaps)} != {sorted(wsnaps)}"
            else:
                diff = next((k for k in range(wsize) if wdata[k] != gdata[k]), None)
                detail = (f"first differing byte at guest offset {diff}" if diff is not None
                          else "guest equal; snapshot contents differ")
            detail = f" (against the last acknowledged state: {detail})"
        return Verdict(False, f"{what}: image {name} matches no allowed state {window_text}{detail}")
    if continue_after:
        msg = continue_after_crash(run.root, objects, sorted(got))
        if msg:
            return Verdict(False, f"{what}: after recovery: {msg}")
    return v


def verify(run: PoolRun, cs: PoolCrashState, *, continue_after: bool = False) -> Verdict:
    names_ok, per_image, text = allowed_at(run, cs.point)
    return check_pool(run, cs.objects, names_ok, per_image, cs.describe(), window_text=text,
                      continue_after=continue_after)


def continue_after_crash(root: str, objects: dict[str, bytes], names: list[str]) -> str | None:
    """Use the recovered pool: write, flush, snapshot and reopen each image; every write
    must read back and check must stay clean."""
    import vdisk

    objs = dict(objects)
    pat = bytes(range(256)) * 40
    root = view_dir(root)
    try:
        with serve(root, lambda: MemBackend(root, objs)):
            for name in names:
                path = os.path.join(root, name)
                with vdisk.open(path) as img:
                    n = min(img.size, len(pat))
                    off = min(3 * B + 5, img.size - n)
                    img.write(off, pat[:n])
                    img.flush()
                    if not any(s.name == "after-crash" for s in img.snapshot_list()):
                        img.snapshot_create("after-crash")
                    img.write(0, b"x" * min(img.size, 700))
                with vdisk.open(path, read_only=True) as img:
                    res = img.check()
                    if res.corruptions:
                        return f"{name}: check finds corruption: {'; '.join(res.corruptions[:3])}"
                    want = bytearray(pat[:n])
                    for k in range(max(0, min(700, img.size) - off)):
                        if k < n:
                            want[k] = ord("x")
                    got = img.read(off, n)
                    if got != bytes(want):
                        return f"{name}: a write made after recovery does not read back"
    except VdiskError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- faults
def inject(root: str, base: dict, seed: int, plan: FaultPlan, *, nops: int, size: int,
           retry: bool = True) -> tuple[str, list[str]]:
    """Run the workload with ``plan``; then check (RELIABILITY.md, "Pools"):

    1. the first error the workload sees is the injected HostIOError, one line;
    2. "the process dies now": the objects as they are open without repair, check clean,
       and hold a state between each image's last barrier and the failed operation;
    3. "the power goes now": the same for what was durable;
    4. a transient fault (``once``): a retried flush and close of the open image either
       succeed -- and then the image holds the state before or after the failed operation,
       durably -- or refuse with a HostIOError (a failed barrier is final), and then 2.
       and 3. hold again.
    Returns (outcome, problems): outcome "raised", "absorbed" or "not-reached"."""
    where = (f"{plan.op}#{plan.at} {'sticky' if plan.sticky else 'once'} {_errno.errorcode[plan.err]}"
             f"{' landed' if plan.landed else ''}")
    run, rec, w, exc = run_workload(root, seed, nops=nops, size=size, fault=plan, base=base)
    problems: list[str] = []
    if exc is None:
        outcome = "absorbed" if plan.injected else "not-reached"
    else:
        outcome = "raised"
        if not isinstance(exc, HostIOError):
            problems.append(f"{where}: first error is {type(exc).__name__}, not HostIOError: {exc}")
        elif exc.errno != plan.err:
            problems.append(f"{where}: HostIOError has errno {exc.errno}, injected {plan.err}")
        if "\n" in str(exc):
            problems.append(f"{where}: the error message is not one line: {str(exc)!r}")
    plan.armed = plan.sticky  # a sticky fault stays; a transient one is over

    def states(label: str) -> None:
        point = len(rec.log)
        names_ok, per_image, text = allowed_at(run, point)
        for cs in (PoolCrashState(point, "as left", dict(rec.objects)),
                   CrashReplay(run.base, rec.log).state(point, "durable")):
            was = plan.armed
            plan.armed = False
            try:
                v = check_pool(run, cs.objects, names_ok, per_image, f"{where}: {label}, {cs.mode}",
                               window_text=text)
            finally:
                plan.armed = was
            if not v.ok:
                problems.append(v.message)

    states("after the error")
    if exc is not None and not plan.sticky and w.cur is not None and retry:
        name = w.cur_name
        img, w.cur = w.cur, None
        with serve(root, rec.backend):
            try:
                img.flush()
                img.close()
            except HostIOError:
                # refused: a failed barrier is final until the image is reopened
                try:
                    img.close()
                except VdiskError:
                    pass
                states("after the refused retry")
            except Exception as exc2:  # noqa: BLE001
                problems.append(f"{where}: the retried flush/close raises {type(exc2).__name__}: {exc2}")
                try:
                    img.close()
                except Exception as exc3:  # noqa: BLE001
                    problems.append(f"{where}: and its close raises {type(exc3).__name__}: {exc3}")
            else:
                # acknowledged: every image as before or after the failed operation, durably
                before, after = run.boundaries[-2], run.boundaries[-1]
                run.boundaries.append(Boundary("retry", name, after.start, len(rec.log), dict(after.images),
                                               frozenset(), False))
                names_ok = [set(before.images), set(after.images)]
                per_image = {}
                for n in set(before.images) | set(after.images):
                    ds = {d for d in (before.images.get(n), after.images.get(n)) if d is not None}
                    per_image[n] = (ds, [after.mix] if after.mix and after.mix[0] == n else [],
                                    len(run.boundaries) - 3)
                for cs in (PoolCrashState(len(rec.log), "as left", dict(rec.objects)),
                           CrashReplay(run.base, rec.log).state(len(rec.log), "durable")):
                    v = check_pool(run, cs.objects, names_ok, per_image,
                                   f"{where}: after a successful retried flush, {cs.mode}")
                    if not v.ok:
                        problems.append(v.message)
    else:
        with serve(root, rec.backend):
            was, plan.armed = plan.armed, False
            try:
                w.close_quietly()
            except Exception as exc2:  # noqa: BLE001
                problems.append(f"{where}: close after the error raises {type(exc2).__name__}: {exc2}")
            finally:
                plan.armed = was
    return outcome, problems


def fault_points(counts: Counter, limit: int) -> list[tuple[str, int]]:
    """(op, k) injection points: every call, or at most ``limit`` per kind, evenly spread."""
    out = []
    for kind in FaultPlan.OPS:
        n = counts[kind]
        if not n:
            continue
        if not limit or n <= limit:
            ks = range(n)
        else:
            ks = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)}) if limit > 1 else [0]
        out += [(kind, k) for k in ks]
    return out


# ----------------------------------------------------------------------------- hostile pools
class PoolEditor:
    """Edits a pool directory in place, as an attacker with write access to it could:
    raw object bytes, the newest catalog (re-signed or not), and trees rewritten along
    one block's path with new nodes in a new pack (every hash re-computed), so that a
    damaged entry gets past the checksums above it."""

    def __init__(self, root: str):
        self.root = root

    # -------------------------------------------------------------- objects
    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
        with open(self.path(name), "wb") as f:
            f.write(data)

    def names(self, prefix: str) -> list[str]:
        d = self.path(prefix)
        return sorted(f"{prefix}{n}" for n in os.listdir(d)) if os.path.isdir(d) else []

    def newest_gen(self) -> str:
        return max(self.names("gen/"))

    # -------------------------------------------------------------- framed JSON
    def catalog(self) -> dict:
        from vdisk.codec import pool as pc

        return pc.decode_json_object(pc.GEN_MAGIC, self.read(self.newest_gen()), "gen")

    def set_catalog(self, cat, *, body: bytes | None = None) -> None:
        """Replace the newest generation, re-signed (``body``: raw JSON text instead)."""
        self.write(self.newest_gen(), self.signed(b"\x89VDKGEN\n", cat, body))

    def config(self) -> dict:
        from vdisk.codec import pool as pc

        return pc.decode_json_object(pc.CONFIG_MAGIC, self.read("config"), "config")

    def set_config(self, conf, *, body: bytes | None = None) -> None:
        self.write("config", self.signed(b"\x89VDKPOOL", conf, body))

    @staticmethod
    def signed(magic: bytes, value, body: bytes | None = None, version: int = 1) -> bytes:
        import json

        from vdisk.codec import pool as pc

        if body is None:
            body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        return pc.OBJ_HEADER.pack(magic, version, 0, pc.meta_hash(body)) + body

    # -------------------------------------------------------------- blobs and trees
    def add_pack(self, blobs: list[tuple[int, bytes, int]]) -> list:
        """A new pack holding ``blobs`` (kind, payload, hash); returns their entries."""
        from vdisk.codec import pool as pc

        number = int.from_bytes(os.urandom(8), "little") | 1
        data = bytearray(pc.pack_header(number))
        out, dir_ = [], []
        for kind, payload, h in blobs:
            dir_.append((len(data), len(payload), kind, h))
            out.append(pc.Entry(h, number, len(data), len(payload), kind))
            data += payload
        self.write(f"packs/{number:016x}", bytes(data) + pc.pack_trailer(dir_))
        return out

    def blob(self, e) -> bytes:
        return self.read(f"packs/{e.pack:016x}")[e.offset:e.offset + e.length]

    def node(self, e) -> bytearray:
        import zstandard

        return bytearray(zstandard.ZstdDecompressor().decompress(self.blob(e)))

    def store_node(self, node: bytes):
        import zstandard

        from vdisk.codec import pool as pc

        (e,) = self.add_pack([(pc.NODE, zstandard.ZstdCompressor().compress(bytes(node)), pc.meta_hash(bytes(node)))])
        return e

    def image_root(self, cat: dict, image: str, snapshot: str | None = None):
        from vdisk.codec import pool as pc

        rec = cat["images"][image]
        if snapshot is not None:
            rec = next(s for s in rec["snapshots"] if s["name"] == snapshot)
        return pc.Entry.from_json(rec["root"], "root")

    def path_nodes(self, root, bn: int) -> list[tuple]:
        """[(entry, node bytes, index in it)] from the root down to the leaf of block ``bn``."""
        from vdisk.codec import pool as pc

        out = []
        e = root
        for level in range(pc.LEVELS):
            node = self.node(e)
            idx = (bn >> (9 * (pc.LEVELS - 1 - level))) & (pc.FANOUT - 1)
            out.append((e, node, idx))
            e = pc.unpack_entry(node, idx, "edit")
        return out

    def leaf_entry(self, cat: dict, image: str, bn: int):
        from vdisk.codec import pool as pc

        _e, leaf, idx = self.path_nodes(self.image_root(cat, image), bn)[-1]
        return pc.unpack_entry(leaf, idx, "edit")

    def rewrite(self, image: str, bn: int, edit, *, level: int = 3, resign: bool = True) -> None:
        """``edit(node: bytearray, index)`` changes the node at ``level`` (3: the leaf) on
        the path of block ``bn`` of ``image``'s live tree; the nodes above it are stored
        anew (hashes re-computed unless ``resign`` is False) and the catalog re-signed."""
        from vdisk.codec import pool as pc

        cat = self.catalog()
        path = self.path_nodes(self.image_root(cat, image), bn)
        _e, node, idx = path[level]
        edit(node, idx)
        new = self.store_node(node)
        if not resign:
            new = pc.Entry(path[level][0].hash, new.pack, new.offset, new.length, new.kind)
        for lv in range(level - 1, -1, -1):
            _pe, pnode, pidx = path[lv]
            o = pidx * pc.ENTRY_SIZE
            pnode[o:o + pc.ENTRY_SIZE] = new.pack_bytes()
            new = self.store_node(pnode)
        cat["images"][image]["root"] = new.to_json()
        self.set_catalog(cat)

    def set_leaf_entry(self, image: str, bn: int, e) -> None:
        from vdisk.codec import pool as pc

        def edit(node, idx):
            node[idx * pc.ENTRY_SIZE:(idx + 1) * pc.ENTRY_SIZE] = e if isinstance(e, bytes) else e.pack_bytes()

        self.rewrite(image, bn, edit)


@dataclass
class HostileCase:
    name: str
    why: str
    refuse: str  # where vdisk must refuse: "list" (the pool), "open", "read", "check", "any" (anywhere or not)
    image: str = "a"  # the damaged image (for "open", "read", "check")
    data_may_change: bool = False  # a successful read may differ from the real content (the case changes it validly)
    error: str | None = None  # the error class expected (its name), if one is


def build_base_pool(root: str) -> dict:
    """The valid pool the corpus damages: image a (1 MiB: random, compressible, duplicate,
    similar and zero blocks; snapshot s1), its native clone c (of a@s1, then written),
    and b (small).  Returns the real content: {image: (size, data, {snapshot: data})}."""
    import vdisk
    from vdisk import block
    from vdisk.pool.store import Pool

    rng = random.Random(77)
    Pool.create(root)
    a = os.path.join(root, "a")
    vdisk.create(a, 1 << 20)
    content = {}
    with vdisk.open(a) as img:
        blk = rng.randbytes(B)
        img.write(0, rng.randbytes(8 * B))
        img.write(8 * B, (b"compressible" * 3000)[:8 * B])
        img.write(16 * B, blk * 4)  # duplicates
        similar = bytearray(blk)
        similar[100] ^= 0xFF
        img.write(20 * B, bytes(similar))  # a delta against blk
        img.write(64 * B + 100, rng.randbytes(3 * B))
        img.write(200 * B, rng.randbytes(B))  # a second leaf? no: 512 blocks a leaf; keep a far block
        img.flush()
        img.snapshot_create("s1")
        img.write(4 * B, rng.randbytes(2 * B))
        img.write_zeroes(30 * B, 2 * B)
    block.create(os.path.join(root, "c"), None, format="pool", backing_file=os.path.abspath(a), backing_format="pool",
                 backing_snapshot="s1")
    with vdisk.open(os.path.join(root, "c")) as img:
        img.write(2 * B, rng.randbytes(B))
    vdisk.create(os.path.join(root, "b"), 64 * B)
    with vdisk.open(os.path.join(root, "b")) as img:
        img.write(0, rng.randbytes(3 * B))
    for name in ("a", "b", "c"):
        with vdisk.open(os.path.join(root, name), read_only=True) as img:
            snaps = {s.name: None for s in img.snapshot_list()}
            content[name] = [img.size, img.read(0, img.size), snaps]
        for s in snaps:
            with vdisk.open(os.path.join(root, name), snapshot=s) as si:
                snaps[s] = si.read(0, si.size)
    return content


# ----------------------------------------------------------------------------- the probe (child side)
READ_LIMIT = 64 << 20  # bytes of an image the probe reads from its start (a valid image may be 256 TiB)
MAX_PROBED_IMAGES = 8
PROBE_PAYLOAD = (b"\xa5" * B) + bytes(range(256)) * 16 + (b"\xa5" * B)  # 3 blocks, a duplicate among them


def _err(exc: BaseException) -> str:
    import traceback

    if isinstance(exc, VdiskError):
        return f"{type(exc).__name__}: {exc}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
    return f"BUG {type(exc).__name__}: {str(exc)[:300]}{where}"


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _read_bounded(img) -> tuple[str, int]:
    h = hashlib.sha256()
    pos, end = 0, min(img.size, READ_LIMIT)
    while pos < end:
        n = min(1 << 20, end - pos)
        h.update(img.read(pos, n))
        pos += n
    if img.size > READ_LIMIT:
        h.update(img.read(img.size - B, B))
    return h.hexdigest(), img.size


def probe_pool(root: str, *, rw: bool = True) -> dict:
    """Everything a user does with a pool, each step "ok" or "ErrorClass: message" (a
    non-VdiskError is "BUG ..."): list the images; for each, open read-only, read (the
    first 64 MiB and the last block), block_status, info, list and read its snapshots,
    check; then open read-write, write, flush, snapshot, reopen and read back; create a
    new image, write and read it back."""
    import vdisk
    from vdisk.pool import IMAGE_NAME
    from vdisk.pool.store import Pool

    out: dict = {"images": {}}
    t0 = __import__("time").monotonic()
    names: list = []
    try:
        p = Pool(root, lock=False)
        try:
            names = list(p.catalog["images"])
        finally:
            p.close()
        out["list"] = "ok"
    except BaseException as exc:  # noqa: BLE001
        out["list"] = _err(exc)
    for name in names[:MAX_PROBED_IMAGES]:
        r = out["images"].setdefault(str(name), {})
        if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
            r["open"] = f"BUG the catalog's image name {name!r} was accepted"
            continue
        path = os.path.join(root, name)
        img = None
        try:
            img = vdisk.open(path, read_only=True)
            r["open"] = "ok"
        except BaseException as exc:  # noqa: BLE001
            r["open"] = _err(exc)
        if img is not None:
            snaps = []
            for step in ("read", "block_status", "info", "snapshots"):
                try:
                    if step == "read":
                        r["sha256"], r["size"] = _read_bounded(img)
                    elif step == "block_status":
                        n = min(img.size, READ_LIMIT)
                        ext = img.block_status(0, n)
                        if sum(e.length for e in ext) != n:
                            raise AssertionError("block_status does not cover the range")
                    elif step == "info":
                        img.driver.info()
                        img.driver.disk_usage()
                    else:
                        snaps = [s.name for s in img.snapshot_list(hidden=True)]
                    r[step] = "ok"
                except BaseException as exc:  # noqa: BLE001
                    r[step] = _err(exc)
            try:
                img.close()
            except BaseException as exc:  # noqa: BLE001
                r["close"] = _err(exc)
            r["snap"] = {}
            for s in snaps[:8]:
                try:
                    with vdisk.open(path, snapshot=s) as si:
                        r["snap"][s] = {"sha256": _read_bounded(si)[0]}
                    r["snap"][s]["read"] = "ok"
                except BaseException as exc:  # noqa: BLE001
                    r["snap"].setdefault(s, {})["read"] = _err(exc)
        try:
            with vdisk.open(path, read_only=True, backing=False) as top:
                res = top.check()
            r["check"] = "corrupt" if res.corruptions else "clean"
            r["check_messages"] = [str(m)[:200] for m in res.corruptions[:3]]
        except BaseException as exc:  # noqa: BLE001
            r["check"] = _err(exc)
        if rw:
            r["rw"] = _probe_rw(path)
    if rw and out["list"] == "ok":
        out["create"] = _probe_create(root)
    out["seconds"] = round(__import__("time").monotonic() - t0, 4)
    out["maxrss_mib"] = _peak_rss_mib()
    return out


def _probe_rw(path: str) -> str:
    import vdisk

    try:
        with vdisk.open(path) as img:
            if img.size < len(PROBE_PAYLOAD):
                img.resize(len(PROBE_PAYLOAD))
            off = min(40 * B, (img.size - len(PROBE_PAYLOAD)) // B * B)
            img.write(off, PROBE_PAYLOAD)
            img.write(off + B + 7, b"partial")
            img.flush()
            img.snapshot_create("probe-snap")
            img.snapshot_delete("probe-snap")
        want = bytearray(PROBE_PAYLOAD)
        want[B + 7:B + 14] = b"partial"
        with vdisk.open(path, read_only=True) as img:
            if img.read(off, len(want)) != bytes(want):
                return "BUG a write does not read back after reopening"
        return "ok"
    except BaseException as exc:  # noqa: BLE001
        return _err(exc)


def _probe_create(root: str) -> str:
    import vdisk

    path = os.path.join(root, "probe-new")
    try:
        vdisk.create(path, 16 * B)
        with vdisk.open(path) as img:
            img.write(0, PROBE_PAYLOAD)
        with vdisk.open(path, read_only=True) as img:
            if img.read(0, len(PROBE_PAYLOAD)) != PROBE_PAYLOAD:
                return "BUG a new image does not read back"
        return "ok"
    except BaseException as exc:  # noqa: BLE001
        return _err(exc)


def worker_main(as_mib: int = 600) -> None:
    """Serve probe requests: one JSON line in ({"root": dir, "rw": bool}), one out."""
    import json
    import resource
    import sys

    resource.setrlimit(resource.RLIMIT_AS, (as_mib << 20, as_mib << 20))
    for line in sys.stdin:
        req = json.loads(line)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) for this request
        except OSError:
            pass
        try:
            res = probe_pool(req["root"], rw=req.get("rw", True))
        except MemoryError:
            res = {"fatal": "MemoryError"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    if sys.argv[1:2] == ["worker"]:
        worker_main(int(sys.argv[2]) if len(sys.argv) > 2 else 600)


# ----------------------------------------------------------------------------- the hostile corpus
def _frame(data: bytes, *, content_size: bool = True) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


def _bomb_header(size: int) -> bytes:
    """A zstd frame header claiming ``size`` bytes of content, with one empty raw block."""
    # magic, frame header descriptor (FCS 8 bytes, single segment), the size, then the
    # last block: raw, 0 bytes
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little") + b"\x01\x00\x00"


def hostile_cases() -> list[tuple[HostileCase, object]]:
    """(case, edit(editor, content)) for every hostile pool of the corpus."""
    import copy

    from vdisk.codec import pool as pc

    cases: list[tuple[HostileCase, object]] = []

    def case(name, refuse, why, image="a", data_may_change=False, error=None):
        def deco(fn):
            cases.append((HostileCase(name, why, refuse, image, data_may_change, error), fn))
            return fn
        return deco

    def cat_edit(fn):
        def edit(ed, content):
            cat = ed.catalog()
            fn(cat)
            ed.set_catalog(cat)
        return edit

    def conf_edit(fn):
        def edit(ed, content):
            conf = ed.config()
            fn(conf)
            ed.set_config(conf)
        return edit

    # ------------------------------------------------------------- config
    case("config-bad-magic", "list", "config magic wrong")(
        lambda ed, c: ed.write("config", b"\x89VDKPOOX" + ed.read("config")[8:]))
    case("config-version-2", "list", "a future version", error="UnsupportedFeature")(
        lambda ed, c: ed.write("config", PoolEditor.signed(b"\x89VDKPOOL", ed.config(), version=2)))
    case("config-checksum", "list", "a byte of the JSON flipped", error="CorruptImage")(
        lambda ed, c: ed.write("config", ed.read("config")[:-2] + b"X" + ed.read("config")[-1:]))
    case("config-truncated", "list", "config cut to 10 bytes")(lambda ed, c: ed.write("config", ed.read("config")[:10]))
    case("config-empty", "list", "config of 0 bytes")(lambda ed, c: ed.write("config", b""))
    case("config-missing", "list", "no config object")(lambda ed, c: os.unlink(ed.path("config")))
    case("config-not-json", "list", "re-signed garbage", error="CorruptImage")(
        lambda ed, c: ed.set_config(None, body=b"\xff\xfe not json"))
    case("config-json-array", "list", "a JSON array", error="CorruptImage")(
        lambda ed, c: ed.set_config(None, body=b"[1,2,3]"))
    case("config-deep-nesting", "list", "JSON nested 100000 deep (recursion)", error="CorruptImage")(
        lambda ed, c: ed.set_config(None, body=b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}"))
    case("config-settings-string", "list", "settings not an object", error="CorruptImage")(
        conf_edit(lambda conf: conf.__setitem__("settings", "fast")))
    case("config-zstd-level-string", "list", "zstd_level not a number", error="CorruptImage")(
        conf_edit(lambda conf: conf["settings"].__setitem__("zstd_level", "max")))
    case("config-zstd-level-huge", "list", "zstd_level 10^9", error="CorruptImage")(
        conf_edit(lambda conf: conf["settings"].__setitem__("zstd_level", 10**9)))
    case("config-block-size", "list", "block_size 8192 (another layout)")(
        conf_edit(lambda conf: conf.__setitem__("block_size", 8192)))
    case("config-pool-id", "list", "the catalog belongs to another pool", error="CorruptImage")(
        conf_edit(lambda conf: conf.__setitem__("pool_id", "0" * 32)))

    # ------------------------------------------------------------- generations
    def newest_raw(fn):
        return lambda ed, c: ed.write(ed.newest_gen(), fn(ed.read(ed.newest_gen())))

    case("gen-bad-magic", "list", "newest generation's magic wrong", error="CorruptImage")(
        newest_raw(lambda b: b"\x89VDKGEX\n" + b[8:]))
    case("gen-version-2", "list", "newest generation of version 2", error="UnsupportedFeature")(
        lambda ed, c: ed.write(ed.newest_gen(), PoolEditor.signed(b"\x89VDKGEN\n", ed.catalog(), version=2)))
    case("gen-checksum", "list", "a byte of the newest generation flipped", error="CorruptImage")(
        newest_raw(lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:]))
    case("gen-truncated", "list", "newest generation cut in half", error="CorruptImage")(
        newest_raw(lambda b: b[:len(b) // 2]))
    case("gen-not-json", "list", "re-signed garbage", error="CorruptImage")(
        lambda ed, c: ed.set_catalog(None, body=b"{not json"))
    case("gen-json-array", "list", "a JSON array", error="CorruptImage")(
        lambda ed, c: ed.set_catalog(None, body=b"[]"))
    case("gen-deep-nesting", "list", "JSON nested 100000 deep", error="CorruptImage")(
        lambda ed, c: ed.set_catalog(None, body=b'{"images":{},"x":' + b"[" * 100000 + b"]" * 100000 + b"}"))
    case("gen-number-mismatch", "list", "generation field != its name", error="CorruptImage")(
        cat_edit(lambda cat: cat.__setitem__("generation", 3)))
    case("gen-none", "list", "every generation deleted", error="CorruptImage")(
        lambda ed, c: [os.unlink(ed.path(n)) for n in ed.names("gen/")])

    def junk_names(ed, c):
        ed.write("gen/zzzz", b"junk")
        ed.write("gen/00000000000000ffx", b"junk")
        ed.write("gen/.tmp.1.2.3", b"junk")
        ed.write("gen/sub/00000000000000ff", b"junk")

    case("gen-junk-names", "any", "files in gen/ that are no generation (must be ignored)")(junk_names)

    def huge_number(ed, c):
        cat = ed.catalog()
        cat["generation"] = 2**64 - 1
        ed.write("gen/ffffffffffffffff", PoolEditor.signed(b"\x89VDKGEN\n", cat))

    case("gen-number-max", "any", "newest generation 2^64-1 (the next has 17 digits)")(huge_number)
    case("gen-images-list", "list", "images is a list", error="CorruptImage")(
        cat_edit(lambda cat: cat.__setitem__("images", [])))
    case("gen-image-record-int", "list", "an image record that is a number", error="CorruptImage")(
        cat_edit(lambda cat: cat["images"].__setitem__("a", 5)))
    for nm, bad in [("slash", "x/../../etc"), ("dotdot", ".."), ("empty", ""), ("long", "a" * 300),
                    ("nul", "a\x00b"), ("at", "a@s1"), ("dot", ".hidden"), ("newline", "a\nb")]:
        case(f"gen-image-name-{nm}", "list", f"image name {bad[:20]!r} in the catalog", error="CorruptImage")(
            cat_edit(lambda cat, bad=bad: cat["images"].__setitem__(bad, copy.deepcopy(cat["images"]["b"]))))

    def field(img, key, value):
        return cat_edit(lambda cat: cat["images"][img].__setitem__(key, value))

    for nm, v in [("negative", -4096), ("huge", 2**70), ("string", "1048576"), ("float", 1.5),
                  ("bool", True), ("null", None), ("nan", float("nan")), ("inf", float("inf"))]:
        case(f"image-size-{nm}", "open", f"image size {v!r}", error="CorruptImage")(field("a", "size", v))
    case("image-size-max", "any", "a valid 256 TiB image (reads are bounded)", data_may_change=True)(
        field("a", "size", pc.MAX_BLOCKS * pc.BLOCK))
    case("image-id-missing", "open", "image record without id", error="CorruptImage")(
        cat_edit(lambda cat: cat["images"]["a"].pop("id")))
    case("image-id-int", "open", "image id a number", error="CorruptImage")(field("a", "id", 5))
    case("image-id-path", "open", "image id with a path (lock file name)", error="CorruptImage")(
        field("a", "id", "../../../../tmp/x"))

    def root_edit(fn):
        def edit(ed, c):
            cat = ed.catalog()
            r = list(cat["images"]["a"]["root"])
            fn(r, ed)
            cat["images"]["a"]["root"] = r
            ed.set_catalog(cat)
        return edit

    def pack_size(ed, r):
        return os.path.getsize(ed.path(f"packs/{r[0]}"))

    case("root-short-list", "open", "root reference of 2 items", error="CorruptImage")(
        cat_edit(lambda cat: cat["images"]["a"].__setitem__("root", [1, 2])))
    case("root-string", "open", "root a string", error="CorruptImage")(
        cat_edit(lambda cat: cat["images"]["a"].__setitem__("root", "abc")))
    case("root-negative-length", "open", "root length -1", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(2, -1)))
    case("root-negative-offset", "open", "root offset -100", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(1, -100)))
    case("root-offset-huge", "open", "root offset 2^40", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(1, 2**40)))
    case("root-length-huge", "open", "root length 2^20", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(2, 2**20)))
    case("root-past-pack-end", "read", "root blob runs past the end of its pack", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(1, pack_size(ed, r) - 10)))
    case("root-pack-missing", "read", "root in a pack that does not exist", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(0, "00000000deadbeef")))
    case("root-pack-traversal", "open", "root pack number '../../etc'", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(0, "../../etc")))
    case("root-pack-huge", "open", "root pack number of 17 hex digits", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(0, "1" * 17)))
    case("root-kind-zstd", "read", "root of data kind", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(3, pc.ZSTD)))
    case("root-kind-9", "open", "root of unknown kind", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(3, 9)))
    case("root-kind-negative", "open", "root of kind -1", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(3, -1)))
    case("root-hash-wrong", "read", "root hash wrong", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(4, "0123456789abcdef")))
    case("root-hash-huge", "open", "root hash of 20 hex digits", error="CorruptImage")(
        root_edit(lambda r, ed: r.__setitem__(4, "f" * 20)))

    # ------------------------------------------------------------- snapshots, lineage, backing
    def snap_edit(fn, img="a"):
        return cat_edit(lambda cat: fn(cat["images"][img]["snapshots"][0]))

    case("snapshots-object", "open", "snapshots an object, not a list", error="CorruptImage")(
        field("a", "snapshots", {"s1": 1}))
    case("snapshot-record-int", "open", "a snapshot record that is a number", error="CorruptImage")(
        field("a", "snapshots", [5]))
    case("snapshot-id-missing", "open", "snapshot without id", error="CorruptImage")(snap_edit(lambda s: s.pop("id")))
    case("snapshot-id-string", "open", "snapshot id 'x'", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("id", "x")))
    for nm, bad in [("int", 5), ("slash", "x/y"), ("at", "x@y"), ("escape", "\x1b[31mred"), ("long", "s" * 1000),
                    ("empty", ""), ("hash", "#1")]:
        case(f"snapshot-name-{nm}", "open", f"snapshot name {bad!r:.20}", error="CorruptImage")(
            snap_edit(lambda s, bad=bad: s.__setitem__("name", bad)))
    case("snapshot-size-negative", "open", "snapshot size -1", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("size", -1)))
    case("snapshot-size-huge", "open", "snapshot size 2^70", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("size", 2**70)))
    case("snapshot-holders-short", "open", "a holder of one item", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("holders", [[1]])))
    case("snapshot-holders-string", "open", "holders a string", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("holders", "ab")))
    case("snapshot-root-kind-9", "open", "snapshot root of unknown kind", error="CorruptImage")(
        snap_edit(lambda s: s.__setitem__("root", s["root"][:3] + [9] + s["root"][4:])))
    case("snapshot-root-past-pack", "any", "snapshot root past its pack's end (the snapshot's reads fail)")(
        snap_edit(lambda s: s.__setitem__("root", [s["root"][0], 2**25, 42, 5, s["root"][4]])))
    case("next-snapshot-id-string", "open", "next_snapshot_id 'x'", error="CorruptImage")(
        field("a", "next_snapshot_id", "x"))
    case("parent-string", "open", "parent a string", image="c", error="CorruptImage")(field("c", "parent", "a"))
    case("parent-missing-image", "any", "a clone whose parent image does not exist", image="c")(
        cat_edit(lambda cat: cat["images"]["c"].__setitem__("parent", {"image": "nope", "snapshot": 1})))
    case("backing-string", "open", "backing a string", error="CorruptImage")(field("a", "backing", "x"))
    case("backing-filename-int", "open", "backing filename a number", error="CorruptImage")(
        field("a", "backing", {"filename": 5, "format": "raw", "snapshot": None}))
    case("backing-etc-passwd", "open", "backing /etc/passwd as raw (outside the pool)", error="BackingError")(
        field("a", "backing", {"filename": "/etc/passwd", "format": "raw", "snapshot": None}))
    case("backing-self", "open", "an image that backs itself", error="BackingError")(
        field("a", "backing", {"filename": "a", "format": "pool", "snapshot": None}))
    case("backing-format-unknown", "open", "backing format 'vmdk9'")(
        field("a", "backing", {"filename": "b", "format": "vmdk9", "snapshot": None}))
    case("labels-list", "open", "labels a list", error="CorruptImage")(field("a", "labels", [1, 2]))

    # ------------------------------------------------------------- sketches
    def sketch_edit(fn):
        return cat_edit(lambda cat: fn(cat["images"]["a"]["sketch"]))

    case("sketch-bytes-huge", "any", "sketch of 2^40 bytes (loaded by a writer)")(
        sketch_edit(lambda s: s.__setitem__("bytes", 2**40)))
    case("sketch-bytes-negative", "any", "sketch of -1 bytes")(sketch_edit(lambda s: s.__setitem__("bytes", -1)))
    case("sketch-shift-huge", "any", "sketch shift 1000")(sketch_edit(lambda s: s.__setitem__("shift", 1000)))
    case("sketch-shift-negative", "any", "sketch shift -5")(sketch_edit(lambda s: s.__setitem__("shift", -5)))
    case("sketch-ref-kind-zstd", "any", "sketch reference of data kind")(
        sketch_edit(lambda s: s.__setitem__("ref", s["ref"][:3] + [pc.ZSTD] + s["ref"][4:])))
    case("sketch-string", "any", "sketch a string")(field("a", "sketch", "x"))

    def sketch_blob(payload: bytes, nbytes: int, hash_of: bytes | None = None):
        def edit(ed, c):
            (e,) = ed.add_pack([(pc.SKETCH, payload, pc.meta_hash(hash_of if hash_of is not None else b""))])
            cat = ed.catalog()
            cat["images"]["a"]["sketch"] = {"ref": e.to_json(), "bytes": nbytes, "shift": 4}
            ed.set_catalog(cat)
        return edit

    case("sketch-bomb-1t", "any", "sketch frame claiming 1 TiB, the catalog 64 MiB")(
        sketch_blob(_bomb_header(1 << 40), 64 << 20))
    case("sketch-odd-length", "any", "sketch of 13 bytes (records are 12)")(
        sketch_blob(_frame(b"x" * 13), 13, b"x" * 13))

    # ------------------------------------------------------------- index segments
    def seg_edit(fn, key="fp_segments"):
        return cat_edit(lambda cat: fn(cat[key]))

    case("segments-int", "list", "fp_segments a number", error="CorruptImage")(
        cat_edit(lambda cat: cat.__setitem__("fp_segments", 5)))
    case("segments-strings", "list", "sf_segments a list of strings", error="CorruptImage")(
        cat_edit(lambda cat: cat.__setitem__("sf_segments", ["index/1"])))
    case("segment-name-traversal", "any", "a segment named ../../../../etc/passwd")(
        seg_edit(lambda s: s.append({"name": "../../../../etc/passwd", "count": 1, "tier": 0})))
    case("segment-count-lies", "any", "the catalog's count != the segment's")(
        seg_edit(lambda s: s[0].__setitem__("count", s[0]["count"] + 1000)))
    case("segment-missing", "any", "the catalog names a segment that does not exist")(
        seg_edit(lambda s: s.append({"name": "index/00000000deadbeef", "count": 3, "tier": 0})))
    case("segment-tier-string", "any", "a segment tier 'x'")(seg_edit(lambda s: s[0].__setitem__("tier", "x")))

    def seg_file(fn):
        def edit(ed, c):
            name = ed.catalog()["fp_segments"][0]["name"]
            ed.write(name, fn(bytearray(ed.read(name)), ed))
        return edit

    def seg_count(b, ed, n=2**33):
        b[16:24] = n.to_bytes(8, "little")
        return bytes(b)

    case("segment-header-count-huge", "any", "segment header claims 2^33 records")(seg_file(seg_count))
    case("segment-summary-checksum", "any", "segment summary checksum")(
        seg_file(lambda b, ed: bytes(b[:-24]) + bytes(8) + bytes(b[-16:])))
    case("segment-truncated", "any", "segment cut in half")(seg_file(lambda b, ed: bytes(b[:len(b) // 2])))

    def lying_index(ed, c):
        """Fingerprint records for the probe's own blocks that name other blobs (of valid
        data): dedup must compare before sharing (and not crash on a bad entry)."""
        cat = ed.catalog()
        other = ed.leaf_entry(cat, "a", 0)
        recs = []
        for k, blk in enumerate([PROBE_PAYLOAD[:B], PROBE_PAYLOAD[B:2 * B], b"\xa5" * B]):
            _h, fp = pc.block_hash(blk)
            e = other.pack_bytes() if k != 1 else bytes(pc.ENTRY_SIZE - 2) + b"\x09\x00"
            recs.append((fp, e))
        recs.sort()
        data = pc.encode_segment(pc.SEG_FP, recs)
        name = "index/00000000000bad01"
        ed.write(name, data)
        cat["fp_segments"].append({"name": name, "count": len(recs), "tier": 0})
        ed.set_catalog(cat)

    case("segment-lying-records", "any", "index records naming the wrong blobs (a hint, verified)")(lying_index)

    # ------------------------------------------------------------- tree nodes and blobs
    def leaf(bn, fn, image="a"):
        """fn(editor, catalog, current entry) -> the new entry (Entry or 24 raw bytes)."""
        def edit(ed, c):
            cat = ed.catalog()
            ed.set_leaf_entry(image, bn, fn(ed, cat, ed.leaf_entry(cat, image, bn)))
        return edit

    def raw_entry(h, pack, off, length, kind, flags=0):
        return pc.ENTRY.pack(h, pack, off, length, kind, flags)

    E = pc.Entry
    case("leaf-kind-9", "read", "a leaf entry of unknown kind", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: raw_entry(e.hash, e.pack, e.offset, e.length, 9)))
    case("leaf-flags", "read", "a leaf entry with flags", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: raw_entry(e.hash, e.pack, e.offset, e.length, e.kind, 1)))
    case("leaf-node-kind", "read", "a node entry in a leaf", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: ed.image_root(cat, "a")))
    case("leaf-sketch-kind", "read", "a sketch entry in a leaf", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, e.offset, e.length, pc.SKETCH)))
    case("leaf-past-pack-end", "read", "a data blob past its pack's end", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, os.path.getsize(ed.path(f"packs/{e.pack:016x}")) - 100,
                                    e.length, e.kind)))
    case("leaf-offset-huge", "read", "a data blob at offset 2^32-1", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, 2**32 - 1, e.length, e.kind)))
    case("leaf-in-pack-header", "read", "a data blob at offset 0 (the pack header)", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, 0, e.length, e.kind)))
    case("leaf-pack-missing", "read", "a data blob in a missing pack", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, 0xDEAD01, e.offset, e.length, e.kind)))
    case("leaf-zero-with-blob", "read", "a ZERO entry naming a blob", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(0, e.pack, e.offset, e.length, pc.ZERO)))
    case("leaf-unallocated-with-blob", "read", "an UNALLOCATED entry naming a blob", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(0, e.pack, e.offset, e.length, pc.UNALLOCATED)))
    case("leaf-raw-short", "read", "a RAW blob of 100 bytes", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, e.offset, 100, pc.RAW)))
    case("leaf-zstd-not-zstd", "read", "a ZSTD entry on raw bytes", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: E(e.hash, e.pack, e.offset, e.length, pc.ZSTD)))
    case("leaf-hash-wrong", "read", "a data entry with the wrong hash", error="ChecksumMismatch")(
        leaf(0, lambda ed, cat, e: E(e.hash ^ 1, e.pack, e.offset, e.length, e.kind)))

    def new_blob(kind, payload, h=0):
        return lambda ed, cat, e: ed.add_pack([(kind, payload, h or e.hash)])[0]

    case("leaf-zstd-bomb-1t", "read", "a zstd frame claiming 1 TiB", error="CorruptImage")(
        leaf(0, new_blob(pc.ZSTD, _bomb_header(1 << 40))))
    case("leaf-zstd-bomb-3g", "read", "a zstd frame claiming 3 GiB", error="CorruptImage")(
        leaf(0, new_blob(pc.ZSTD, _bomb_header(3 << 30))))
    case("leaf-zstd-no-size", "read", "a zstd frame that does not state its size", error="CorruptImage")(
        leaf(0, new_blob(pc.ZSTD, _frame(bytes(range(256)) * 16, content_size=False))))
    case("leaf-zstd-small", "read", "a zstd frame of 100 bytes", error="CorruptImage")(
        leaf(0, new_blob(pc.ZSTD, _frame(b"y" * 100))))

    def delta_to(base_fn):
        def fn(ed, cat, e):
            base = base_fn(ed, cat, e)
            return ed.add_pack([(pc.DELTA, base.pack_bytes() + _frame(bytes(B)), e.hash)])[0]
        return fn

    delta_bn = 20  # block 20 of a is a delta against block 16 (see build_base_pool)
    case("delta-base-delta", "read", "a delta whose base is a delta", error="CorruptImage")(
        leaf(0, delta_to(lambda ed, cat, e: ed.leaf_entry(cat, "a", delta_bn))))
    case("delta-base-node", "read", "a delta whose base is a tree node", error="CorruptImage")(
        leaf(0, delta_to(lambda ed, cat, e: ed.image_root(cat, "a"))))
    case("delta-base-zero", "read", "a delta whose base is ZERO", error="CorruptImage")(
        leaf(0, delta_to(lambda ed, cat, e: pc.ZERO_ENTRY)))

    def delta_self(ed, cat, e):
        """A delta whose base entry names the delta blob itself, as ZSTD."""
        number = int.from_bytes(os.urandom(8), "little") | 1
        off = pc.PACK_HEADER.size
        payload_len = pc.DELTA_HEAD + len(_frame(bytes(B)))
        base = E(e.hash, number, off, payload_len, pc.ZSTD)
        payload = base.pack_bytes() + _frame(bytes(B))
        data = pc.pack_header(number) + payload + pc.pack_trailer([(off, len(payload), pc.DELTA, e.hash)])
        ed.write(f"packs/{number:016x}", data)
        return E(e.hash, number, off, len(payload), pc.DELTA)

    case("delta-base-itself", "read", "a delta whose base is itself", error="CorruptImage")(leaf(0, delta_self))
    case("delta-truncated", "read", "a delta blob of 24 bytes", error="CorruptImage")(
        leaf(delta_bn, lambda ed, cat, e: E(e.hash, e.pack, e.offset, pc.DELTA_HEAD, e.kind)))
    case("delta-bomb", "read", "a delta whose XOR frame claims 1 TiB", error="CorruptImage")(
        leaf(0, lambda ed, cat, e: ed.add_pack([(pc.DELTA, ed.leaf_entry(cat, "a", 16).pack_bytes()
                                                 + _bomb_header(1 << 40), e.hash)])[0]))
    case("delta-base-missing", "read", "a delta whose base's pack is missing", error="CorruptImage")(
        leaf(0, delta_to(lambda ed, cat, e: E(1, 0xDEAD03, 16, 4096, pc.RAW))))

    def node_edit(level, fn, bn=0):
        def edit(ed, c):
            ed.rewrite("a", bn, lambda node, idx: fn(ed, node, idx), level=level)
        return edit

    def set_child(e_fn):
        def fn(ed, node, idx):
            old = pc.unpack_entry(node, idx, "edit")
            node[idx * pc.ENTRY_SIZE:(idx + 1) * pc.ENTRY_SIZE] = e_fn(ed, old)
        return fn

    case("node-child-data-kind", "read", "an interior node entry of data kind", error="CorruptImage")(
        node_edit(2, set_child(lambda ed, o: E(o.hash, o.pack, o.offset, o.length, pc.ZSTD).pack_bytes())))
    case("node-child-kind-9", "read", "an interior node entry of kind 9", error="CorruptImage")(
        node_edit(1, set_child(lambda ed, o: raw_entry(o.hash, o.pack, o.offset, o.length, 9))))
    case("node-child-hash-wrong", "read", "a child node hash wrong", error="CorruptImage")(
        node_edit(0, set_child(lambda ed, o: E(o.hash ^ 1, o.pack, o.offset, o.length, o.kind).pack_bytes())))

    def child_blob(payload):
        def fn(ed, old):
            (e,) = ed.add_pack([(pc.NODE, payload, old.hash)])
            return e.pack_bytes()
        return fn

    case("node-wrong-size", "read", "a node that decodes to 4096 bytes", error="CorruptImage")(
        node_edit(2, set_child(child_blob(_frame(bytes(B))))))
    case("node-bomb", "read", "a node frame claiming 1 TiB", error="CorruptImage")(
        node_edit(2, set_child(child_blob(_bomb_header(1 << 40)))))

    def root_is_leaf(ed, c):
        cat = ed.catalog()
        path = ed.path_nodes(ed.image_root(cat, "a"), 0)
        cat["images"]["a"]["root"] = path[-1][0].to_json()  # the leaf as the root
        ed.set_catalog(cat)

    case("root-is-leaf", "read", "the root entry names a leaf", error="CorruptImage")(root_is_leaf)

    def shared_everywhere(ed, c):
        """Every entry of every interior node names the same child: 512^4 paths to one
        leaf (a walk that does not bound itself never ends)."""
        cat = ed.catalog()
        path = ed.path_nodes(ed.image_root(cat, "a"), 0)
        child = path[-1][0]
        for _lv in range(2, -1, -1):
            node = child.pack_bytes() * pc.FANOUT
            child = ed.store_node(node)
        cat["images"]["a"]["root"] = child.to_json()
        ed.set_catalog(cat)

    case("tree-shared-everywhere", "any", "all 512^3 interior entries name one subtree", data_may_change=True)(
        shared_everywhere)

    def past_size(ed, c):
        """Leaf entries past the end of the disk (block 300 on of a 256-block image)."""
        cat = ed.catalog()
        e = ed.leaf_entry(cat, "a", 0)

        def edit(node, idx):
            for i in range(300, 512):
                node[i * pc.ENTRY_SIZE:(i + 1) * pc.ENTRY_SIZE] = e.pack_bytes()
        ed.rewrite("a", 0, edit)

    case("leaf-entries-past-size", "any", "leaf entries past the end of the disk")(past_size)

    # ------------------------------------------------------------- packs and files
    def main_pack(ed):
        return f"packs/{ed.leaf_entry(ed.catalog(), 'a', 0).pack:016x}"

    case("pack-truncated", "read", "the data pack cut in half", error="CorruptImage")(
        lambda ed, c: ed.write(main_pack(ed), ed.read(main_pack(ed))[:len(ed.read(main_pack(ed))) // 2]))
    case("pack-empty", "read", "the data pack of 0 bytes", error="CorruptImage")(
        lambda ed, c: ed.write(main_pack(ed), b""))

    def flip_data(ed, c):
        e = ed.leaf_entry(ed.catalog(), "a", 0)
        b = bytearray(ed.read(f"packs/{e.pack:016x}"))
        b[e.offset + 10] ^= 0x40
        ed.write(f"packs/{e.pack:016x}", bytes(b))

    case("pack-data-flipped", "read", "a byte of a RAW blob flipped", error="ChecksumMismatch")(flip_data)
    case("pack-trailer-garbage", "any", "the pack directory damaged (readers go by entries)")(
        lambda ed, c: ed.write(main_pack(ed), ed.read(main_pack(ed))[:-40] + b"\xff" * 40))

    def pack_dir(ed, c):
        name = main_pack(ed)
        os.unlink(ed.path(name))
        os.makedirs(ed.path(name))

    case("pack-is-directory", "read", "a pack that is a directory")(pack_dir)

    def secret_link(ed, c):
        """A pack that is a symbolic link to a file outside the pool, and a RAW entry with
        the right hash for 4 KiB of it: reading the image would disclose that file (to
        whoever may write the pool but not read the file)."""
        secret = os.path.abspath(ed.root) + ".secret"  # beside the pool, not in it
        with open(secret, "wb") as f:
            f.write(random.Random(5).randbytes(2 * B))
        with open(secret, "rb") as f:
            blk = f.read()[16:16 + B]
        number = 0xE7C0000000000001
        os.symlink(secret, ed.path(f"packs/{number:016x}"))
        ed.set_leaf_entry("a", 0, E(pc.entry_hash(blk), number, 16, B, pc.RAW))

    case("pack-symlink-outside", "read", "a pack that is a symbolic link to a file outside the pool")(secret_link)

    def gen_symlink(ed, c):
        newest = ed.newest_gen()
        outside = os.path.abspath(ed.root) + ".gen-file"
        with open(outside, "wb") as f:
            f.write(ed.read(newest))
        os.unlink(ed.path(newest))
        os.symlink(outside, ed.path(newest))

    case("gen-symlink", "list", "the newest generation is a symbolic link")(gen_symlink)

    def dir_symlink(d):
        def edit(ed, c):
            outside = os.path.abspath(ed.root) + f".{d}-dir"
            os.rename(ed.path(d), outside)
            os.symlink(outside, ed.path(d))
        return edit

    case("packs-dir-symlink", "read", "packs/ is a symbolic link to a directory outside the pool")(
        dir_symlink("packs"))
    case("index-dir-symlink", "list", "index/ is a symbolic link to a directory outside the pool (gc deletes "
         "what it lists there)")(dir_symlink("index"))
    case("gen-dir-symlink", "list", "gen/ is a symbolic link to a directory outside the pool")(dir_symlink("gen"))

    return cases


def generate_corpus(out: str) -> tuple[list[HostileCase], dict]:
    """Build the base pool and one damaged copy per case under ``out``.  Returns the cases
    and the base pool's real content."""
    import shutil

    base = os.path.join(out, "base")
    content = build_base_pool(base)
    cases = []
    for case, edit in hostile_cases():
        d = os.path.join(out, case.name)
        shutil.copytree(base, d, symlinks=True, ignore=shutil.ignore_patterns("locks"))
        edit(PoolEditor(d), content)
        cases.append(case)
    return cases, content
