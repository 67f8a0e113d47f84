"""Workloads against the vdk driver, with a model of what the guest sees.

A workload is a list of operations generated from a seed.  ``run_workload`` performs
them through ``vdisk.block.Image`` on a ``RecordingStorage`` and records, for every
operation, the log range it issued and a digest of the model state after it (guest
size and bytes, and every snapshot's size and bytes).

The promise checked (RELIABILITY.md, "What vdisk promises after a crash"):
let B be the last *barrier* operation (flush, snapshot create/delete/revert, resize,
close) that had returned before the power cut, and J the operation in flight (or the
last one issued) at the power cut.  The recovered image must open, ``check`` must find
no corruption, and its state must equal the model state after some operation i with
B <= i <= J.  With vdk, i is in practice B (the last acknowledged commit) or the
commit in flight; the figures count how often each happened.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field

from vdisk.block import Image
from vdisk.codec import vdk as C
from vdisk.drivers import get_driver
from vdisk.drivers.base import BackingRef, CreateOptions
from vdisk.drivers.vdk import VdkDriver
from vdisk.errors import NotSupported, VdiskError

from .storage import CrashLog, CrashState, MemStorage, RecordingStorage

BARRIERS = {"create", "flush", "snapshot_create", "snapshot_delete", "snapshot_revert", "resize", "reopen", "close"}


# ----------------------------------------------------------------------------- model
class Model:
    def __init__(self, size: int, initial: bytes | None = None):
        self.data = bytearray(initial if initial is not None else bytes(size))
        assert len(self.data) == size
        self.snaps: dict[str, bytes] = {}

    @property
    def size(self) -> int:
        return len(self.data)

    def digest(self) -> bytes:
        return state_digest(bytes(self.data), {k: v for k, v in self.snaps.items()})


def state_digest(data: bytes, snaps: dict[str, bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
    for name in sorted(snaps):
        h.update(b"\0snap\0" + name.encode() + b"\0" + len(snaps[name]).to_bytes(8, "little"))
        h.update(snaps[name])
    return h.digest()


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Config:
    name: str
    size: int = 3 << 19  # 1.5 MiB: three L2 tables with 4 KiB clusters
    cluster_size: int = 4096
    compression: str | None = None
    backing: bool = False
    nops: int = 50
    snapshots: bool = True
    resize: bool = True
    format: str = "vdk"  # of the image under test; backing images are always vdk


CONFIGS = [
    Config("plain-4k"),
    Config("zstd-4k", compression="zstd"),
    Config("overlay-4k", backing=True),
    Config("zstd-overlay-4k", compression="zstd", backing=True, size=1 << 20),
    Config("plain-64k", cluster_size=65536, size=5 << 19),
]

#: qcow2 writes data in place, so its promise is per sector (see ``_sector_mix``)
QCOW2_CONFIGS = [
    Config("qcow2-4k", format="qcow2", size=1 << 19),
    Config("qcow2-zlib-4k", format="qcow2", compression="zlib", size=1 << 19),
    Config("qcow2-overlay-4k", format="qcow2", backing=True, size=1 << 19),
]

#: corruption messages of bugs (tests/test_found_bugs.py): counted apart while the bug is
#: open (in ``_OPEN`` there), unless VDISK_FOUND_BUGS=1 makes them fail
_BUG_MESSAGES = {
    "qcow2-crash-copied-flag": re.compile(r"COPIED flag 0 but refcount 1$"),
}


def _open_bug_messages() -> dict:
    from test_found_bugs import _OPEN

    return {k: v for k, v in _BUG_MESSAGES.items() if k in _OPEN}


KNOWN_BUG_MESSAGES = _open_bug_messages()
STRICT_BUGS = os.environ.get("VDISK_FOUND_BUGS") == "1"


# ----------------------------------------------------------------------------- operations
def _payload(rng: random.Random, n: int, compressible: bool) -> bytes:
    if compressible:
        word = rng.randbytes(rng.randint(1, 16))
        return (word * (n // len(word) + 1))[:n]
    return rng.randbytes(n)


def generate_ops(cfg: Config, seed: int, size_of=None):
    """Yield ``cfg.nops`` operations (then a flush); ``size_of()`` gives the current guest size."""
    rng = random.Random(seed)
    cs = cfg.cluster_size
    snaps: list[str] = []
    next_snap = 0
    for _ in range(cfg.nops):
        size = size_of() if size_of else cfg.size
        r = rng.random()
        if r < 0.45:
            n = rng.choice([1, 511, cs // 2, cs, cs + 17, 2 * cs, 3 * cs + 100, 5 * cs])
            n = min(n, size)
            off = rng.choice([rng.randrange(0, size - n + 1), rng.randrange(0, (size - n) // cs + 1) * cs])
            yield (("write", off, _payload(rng, n, cfg.compression is not None and rng.random() < 0.7)))
        elif r < 0.52:
            n = min(size, rng.choice([cs, 3 * cs, cs // 2 + 5, 10 * cs]))
            off = rng.randrange(0, size - n + 1)
            yield (("write_zeroes", off, n))
        elif r < 0.58:
            n = min(size, rng.choice([cs, 4 * cs, 7 * cs + 3]))
            off = rng.randrange(0, size - n + 1)
            yield (("discard", off, n))
        elif r < 0.75:
            yield (("flush",))
        elif r < 0.81 and cfg.snapshots and len(snaps) < 3:
            name = f"s{next_snap}"
            next_snap += 1
            snaps.append(name)
            yield (("snapshot_create", name))
        elif r < 0.85 and cfg.snapshots and snaps:
            name = snaps.pop(rng.randrange(len(snaps)))
            yield (("snapshot_delete", name))
        elif r < 0.88 and cfg.snapshots and snaps:
            yield (("snapshot_revert", rng.choice(snaps)))
        elif r < 0.92 and cfg.resize:
            new = rng.choice([size + cs * rng.randint(1, 40) + rng.randint(0, cs - 1), max(cs, size - cs * rng.randint(1, 20) - 7)])
            yield (("resize", new))
        elif r < 0.96:
            yield (("reopen",))
        else:
            yield (("flush",))
    yield ("flush",)


# ----------------------------------------------------------------------------- running
@dataclass
class Boundary:
    kind: str
    start: int  # first log record of the operation
    end: int  # log position when it returned
    digest: bytes
    snap_digest: bytes = b""  # the snapshots alone (for the per-sector promise of qcow2)


@dataclass
class Run:
    cfg: Config
    seed: int
    base: bytes  # the image as created (durable)
    log: list
    boundaries: list[Boundary]
    backing_data: bytes | None  # the backing image file (vdk), if any
    backing_content: bytes | None
    model_states: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)  # digest -> (size, data) for messages

    def crash_log(self) -> CrashLog:
        return CrashLog(self.base, self.log)


def make_backing(cfg: Config, seed: int) -> tuple[bytes, bytes]:
    """A vdk backing image with random content; returns (file bytes, guest content)."""
    rng = random.Random(seed ^ 0xBACC)
    st = MemStorage(name="base.vdk")
    VdkDriver.create(st, cfg.size, CreateOptions(cluster_size=cfg.cluster_size))
    drv = VdkDriver.open(st, read_only=False)
    img = Image(drv, "base.vdk", None)
    content = bytearray(cfg.size)
    for _ in range(12):
        n = rng.randint(1, 4 * cfg.cluster_size)
        off = rng.randrange(0, cfg.size - n)
        data = rng.randbytes(n)
        img.write(off, data)
        content[off:off + n] = data
    img.close()
    return st.snapshot(), bytes(content)


def driver_of(cfg: Config):
    return get_driver(cfg.format)


def open_image(storage, cfg: Config, backing_data: bytes | None, *, read_only: bool, snapshot: str | None = None,
               name: str = "top.vdk") -> Image:
    drv = driver_of(cfg).open(storage, read_only=read_only, snapshot=snapshot)
    below = None
    if backing_data is not None:
        below = Image(VdkDriver.open(MemStorage(backing_data, "base.vdk", read_only=True), read_only=True),
                      "base.vdk", None)
    return Image(drv, name, below, snapshot)


def create_image(cfg: Config, backing_data: bytes | None) -> bytes:
    st = MemStorage(name="top.vdk")
    ref = BackingRef("base.vdk", "vdk") if backing_data is not None else None
    driver_of(cfg).create(st, cfg.size, CreateOptions(cluster_size=cfg.cluster_size, compression=cfg.compression,
                                                 backing=ref))
    return st.snapshot()


def apply_op(img: Image, model: Model, op: tuple) -> str | None:
    """Perform ``op`` on the image (not reopen) and on the model.  Returns "refused" when
    the driver refused it with NotSupported (then it is no barrier)."""
    kind = op[0]
    if kind == "write":
        _, off, data = op
        if off + len(data) > model.size:
            return
        img.write(off, data)
        model.data[off:off + len(data)] = data
    elif kind in ("write_zeroes", "discard"):
        _, off, n = op
        if off + n > model.size:
            n = max(0, model.size - off)
            if n == 0:
                return
        getattr(img, kind)(off, n)
        model.data[off:off + n] = bytes(n)
    elif kind == "flush":
        img.flush()
    elif kind == "snapshot_create":
        img.snapshot_create(op[1])
        model.snaps[op[1]] = bytes(model.data)
    elif kind == "snapshot_delete":
        img.snapshot_delete(op[1])
        del model.snaps[op[1]]
    elif kind == "snapshot_revert":
        img.snapshot_revert(op[1])
        model.data = bytearray(model.snaps[op[1]])
    elif kind == "resize":
        new = op[1]
        if new == model.size:
            return "refused"  # Image.resize does nothing: no barrier
        try:
            img.resize(new, shrink=True)
        except NotSupported:  # qcow2: no shrinking under internal snapshots (as QEMU)
            return "refused"
        if new < model.size:
            del model.data[new:]
        else:
            model.data.extend(bytes(new - model.size))
    else:
        raise AssertionError(f"unknown op {op!r}")


def run_workload(cfg: Config, seed: int) -> Run:
    backing_data = backing_content = None
    if cfg.backing:
        backing_data, backing_content = make_backing(cfg, seed)
    base = create_image(cfg, backing_data)
    st = RecordingStorage(base, "top.vdk")
    model = Model(cfg.size, backing_content)
    boundaries = [Boundary("create", 0, 0, model.digest(), state_digest(b"", model.snaps))]
    states = {boundaries[0].digest: (model.size, bytes(model.data))}
    img = open_image(st, cfg, backing_data, read_only=False)
    for op in generate_ops(cfg, seed, lambda: model.size):
        start = st.mark()
        if op[0] == "reopen":
            img.close()
            img = open_image(st.reopen(), cfg, backing_data, read_only=False)
            kind = op[0]
        else:
            kind = op[0] if apply_op(img, model, op) != "refused" else f"{op[0]}-refused"
        d = model.digest()
        states.setdefault(d, (model.size, bytes(model.data)))
        boundaries.append(Boundary(kind, start, st.mark(), d, state_digest(b"", model.snaps)))
    start = st.mark()
    img.close()
    boundaries.append(Boundary("close", start, st.mark(), model.digest(), state_digest(b"", model.snaps)))
    return Run(cfg, seed, base, list(st.log), boundaries, backing_data, backing_content, states)


# ----------------------------------------------------------------------------- checking
@dataclass
class Verdict:
    ok: bool
    message: str = ""
    matched: int = -1  # index of the boundary the recovered state equals
    last_barrier: int = -1
    in_flight: int = -1
    leaked_clusters: int = 0
    known_bug_hits: int = 0


def allowed_window(run: Run, point: int) -> tuple[int, int]:
    b = 0
    j = 0
    for i, bd in enumerate(run.boundaries):
        if bd.kind in BARRIERS and bd.end <= point:
            b = i
        if bd.start < point or bd.end <= point:
            j = i
    return b, max(b, j)


def read_state(storage_bytes: bytes, run: Run) -> tuple[bytes, dict[str, bytes], int]:
    """Open a crash state read-only: check it, read the guest and every snapshot."""
    img = open_image(MemStorage(storage_bytes, "top.vdk", read_only=True), run.cfg, run.backing_data, read_only=True)
    try:
        res = img.check()
        corruptions = list(res.corruptions)
        known = 0
        if not STRICT_BUGS:
            rest = [c for c in corruptions if not any(rx.search(c) for rx in KNOWN_BUG_MESSAGES.values())]
            known = len(corruptions) - len(rest)
            corruptions = rest
        if corruptions:
            raise _Corrupt("; ".join(corruptions[:3]))
        data = img.read(0, img.size)
        st = img.block_status(0, img.size)
        assert sum(e.length for e in st) == img.size, "block_status does not cover the disk"
        names = [s.name for s in img.snapshot_list()]
    finally:
        img.close()
    snaps = {}
    for name in names:
        s = open_image(MemStorage(storage_bytes, "top.vdk", read_only=True), run.cfg, run.backing_data,
                       read_only=True, snapshot=name)
        try:
            snaps[name] = s.read(0, s.size)
        finally:
            s.close()
    read_state.known_bug_hits = known
    return data, snaps, res.leaked_clusters


class _Corrupt(Exception):
    pass


def verify(run: Run, cs: CrashState, *, continue_after: bool = False) -> Verdict:
    b, j = allowed_window(run, cs.point)
    try:
        data, snaps, leaked = read_state(cs.data, run)
    except _Corrupt as exc:
        return Verdict(False, f"{cs.describe()}: check finds corruption: {exc}", last_barrier=b, in_flight=j)
    except VdiskError as exc:
        return Verdict(False, f"{cs.describe()}: {type(exc).__name__}: {exc}", last_barrier=b, in_flight=j)
    except Exception as exc:  # noqa: BLE001 - a bug: report it with the state
        return Verdict(False, f"{cs.describe()}: unexpected {type(exc).__name__}: {exc}", last_barrier=b, in_flight=j)
    known = getattr(read_state, "known_bug_hits", 0)
    d = state_digest(data, snaps)
    for i in range(j, b - 1, -1):
        if run.boundaries[i].digest == d:
            v = Verdict(True, matched=i, last_barrier=b, in_flight=j, leaked_clusters=leaked)
            break
    else:
        i = _sector_mix(run, b, j, data, snaps) if run.cfg.format != "vdk" else None
        v = Verdict(True, matched=-2, last_barrier=b, in_flight=j, leaked_clusters=leaked) if i is not None else None
    if v is None:
        want = run.model_states.get(run.boundaries[b].digest)
        detail = ""
        if want is not None:
            wsize, wdata = want
            if wsize != len(data):
                detail = f"size {len(data)} != {wsize}"
            else:
                diff = next((k for k in range(wsize) if wdata[k] != data[k]), None)
                detail = (f"first differing byte at guest offset {diff}" if diff is not None
                          else f"guest equal; snapshots differ ({sorted(snaps)})")
        return Verdict(False, f"{cs.describe()}: recovered state matches no operation boundary in "
                       f"[{b} ({run.boundaries[b].kind}), {j} ({run.boundaries[j].kind})]: {detail}",
                       last_barrier=b, in_flight=j)
    v.known_bug_hits = known
    if continue_after:
        msg = _continue_after(run, cs)
        if msg:
            return Verdict(False, f"{cs.describe()}: after recovery: {msg}", matched=v.matched, last_barrier=b,
                           in_flight=j)
    return v


def _sector_mix(run: Run, b: int, j: int, data: bytes, snaps: dict[str, bytes]) -> int | None:
    """The weaker promise of formats that write data in place (qcow2): the snapshots equal
    those of one boundary in [b, j], and each 512-byte guest sector equals that sector
    at some boundary in [b, j] of the same guest size.  A shrink is not atomic either
    (as in QEMU, the clusters it cuts off are dropped before the header changes): while
    one is in flight, the old-size disk may read zeros (or, in an overlay, the backing
    image's data) from the new end on."""
    sd = state_digest(b"", snaps)
    cands = []
    for i in range(b, j + 1):
        bd = run.boundaries[i]
        size, sdata = run.model_states[bd.digest]
        if bd.snap_digest == sd and size == len(data):
            cands.append(sdata)
        if bd.kind == "resize" and i > 0:
            psize, pdata = run.model_states[run.boundaries[i - 1].digest]
            if psize > size and psize == len(data) and run.boundaries[i - 1].snap_digest == sd:
                cands.append(pdata[:size] + bytes(psize - size))
                if run.backing_content is not None:  # dropped clusters fall through to the backing image
                    below = run.backing_content[size:psize]
                    cands.append(pdata[:size] + below + bytes(psize - size - len(below)))
    if not cands:
        return None
    mv = memoryview(data)
    for pos in range(0, len(data), 512):
        piece = mv[pos:pos + 512]
        if not any(c[pos:pos + 512] == piece for c in cands):
            return None
    return len(cands)


def _continue_after(run: Run, cs: CrashState) -> str | None:
    """Open the recovered image read-write, write, flush, reopen: still consistent?"""
    st = MemStorage(cs.data, "top.vdk")
    try:
        img = open_image(st, run.cfg, run.backing_data, read_only=False)
        size = img.size
        data = bytes(range(256)) * (run.cfg.cluster_size * 2 // 256)
        off = min(size - len(data), run.cfg.cluster_size * 3 + 5) if size > len(data) else 0
        data = data[:size - off]
        img.write(off, data)
        img.snapshot_create("after-crash") if not any(s.name == "after-crash" for s in img.snapshot_list()) else None
        img.write(0, b"x" * min(size, 700))
        img.close()
        img = open_image(st, run.cfg, run.backing_data, read_only=True)
        try:
            res = img.check()
            bad = [c for c in res.corruptions
                   if STRICT_BUGS or not any(rx.search(c) for rx in KNOWN_BUG_MESSAGES.values())]
            if bad:
                return "check finds corruption: " + "; ".join(bad[:3])
            if img.read(off, len(data)) != data:
                return "a write made after recovery does not read back"
        finally:
            img.close()
    except VdiskError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
