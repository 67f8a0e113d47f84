"""Fault injection: every pread / pwrite / flush / truncate / punch_hole of a workload
fails in turn (EIO or ENOSPC, once or from then on).  RELIABILITY.md, "Host I/O errors".

For every injection point:
1. the first error that reaches the caller is the injected ``HostIOError`` (nothing
   else escapes: no AttributeError, no CorruptImage for a host error);
2. "the process dies": the file as it is then (page cache included) opens, ``check``
   finds no corruption, and the guest state is one the model allows (between the last
   acknowledged barrier and the failed operation);
3. "the power goes": the same for the file as the flushes that completed left it;
4. with a transient fault (once): a retried ``flush`` succeeds, and after close and
   reopen the image holds the state before or after the failed operation -- unless the
   fault was a failed flush: then the retried flush fails too (saying the image must be
   reopened) and the reopened image holds a state the model allows, or, if the driver
   has nothing left to write, it succeeds without flushing the host and the file holds
   the state before or after the failed operation.

The storage models the host: a failed flush drops the un-flushed changes, as Linux does
(``FaultyStorage``), and the drivers sit on ``vdisk.host.FailStopStorage``, which applies
HostFile's flush-failure rule (changes and flushes refused after a failed flush).

``VDISK_FAULT_POINTS`` bounds the injection points per workload (default 0: all of
them; n: n chosen evenly over the operation kinds).

Check 4 found bug vdk-retry-after-failed-commit (fixed in edf8b48); ``VDISK_FAULT_RETRY=0``
turns it off.
"""

from __future__ import annotations

import errno
import os
from collections import Counter

import pytest

from crash import figures
from crash.storage import CrashLog, FaultyStorage, RecordingStorage
from crash.workload import (BARRIERS, Config, Model, apply_op, create_image, generate_ops, make_backing, open_image,
                            read_state, state_digest)
from vdisk.errors import HostIOError, VdiskError
from vdisk.host import FailStopStorage

MAX_POINTS = int(os.environ.get("VDISK_FAULT_POINTS", "0"))
CHECK_RETRY = os.environ.get("VDISK_FAULT_RETRY", "1") == "1"

FAULT_CONFIGS = [
    Config("plain-4k", nops=25),
    Config("zstd-overlay-4k", compression="zstd", backing=True, size=1 << 20, nops=25),
    Config("qcow2-4k", format="qcow2", size=1 << 19, nops=25),
]


_STATES: dict[bytes, tuple[bytes, bytes]] = {}  # digest -> (guest bytes, snapshots digest)


def _dig(model: Model) -> bytes:
    d = model.digest()
    if d not in _STATES:
        _STATES[d] = (bytes(model.data), state_digest(b"", model.snaps))
    return d


def _per_sector(guest: bytes, snaps: dict, allowed: set[bytes]) -> bool:
    """qcow2 writes data in place: each sector may come from a different allowed state
    (of the same size and the same snapshots)."""
    sd = state_digest(b"", snaps)
    cands = [data for d in allowed if d in _STATES for data, s in [_STATES[d]] if s == sd and len(data) == len(guest)]
    if not cands:
        return False
    return all(any(c[p:p + 512] == guest[p:p + 512] for c in cands) for p in range(0, len(guest), 512))


class _Ctx:
    def __init__(self, cfg, backing_data):
        self.cfg = cfg
        self.backing_data = backing_data


def _run(cfg, seed, base, backing, backing_content, faulty: FaultyStorage, hosts: list | None = None):
    """Run the workload on ``faulty`` until the first error.  Returns
    (error or None, digests of the boundaries, index of last barrier, index of failed op, image).
    Every open goes through a new ``FailStopStorage`` (as a new HostFile), appended to ``hosts``."""
    hosts = [] if hosts is None else hosts

    def host():
        hosts.append(FailStopStorage(faulty))
        return hosts[-1]

    model = Model(cfg.size, backing_content)
    digests = [_dig(model)]
    kinds = ["create"]
    img = None
    op = ("open",)
    kinds.append("open")
    try:
        img = open_image(host(), cfg, backing, read_only=False)
        digests.append(_dig(model))
        for op in generate_ops(cfg, seed, lambda: model.size):
            kinds.append(op[0])
            if op[0] == "reopen":
                img.close()
                img = None
                img = open_image(host(), cfg, backing, read_only=False)
            elif apply_op(img, model, op) == "refused":
                kinds[-1] = f"{op[0]}-refused"  # no barrier
            digests.append(_dig(model))
        kinds.append("close")
        img.close()
        digests.append(_dig(model))
        return None, digests, kinds, img
    except VdiskError as exc:
        # the failed op may or may not have taken effect: both states are allowed
        digests.append(_model_after(model, op))
        if op[0] in ("write", "write_zeroes", "discard"):
            # a failed write leaves its range undefined: each byte old or new
            after = Model(model.size, bytes(model.data))
            apply_op(_NullImage(), after, op)
            global _LAST_MIX
            _LAST_MIX = (bytes(model.data), bytes(after.data), dict(model.snaps))
        return exc, digests, kinds, img


class _NullImage:
    """Takes any operation and does nothing: to compute the model state after an op."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def _model_after(model: Model, op) -> bytes:
    if op[0] in ("open", "reopen", "close", "flush"):
        return _dig(model)
    m = Model(model.size, bytes(model.data))
    m.snaps = dict(model.snaps)
    apply_op(_NullImage(), m, op)
    return _dig(m)


def _window(digests, kinds):
    b = max(i for i, k in enumerate(kinds[:-1]) if k in BARRIERS)
    return set(digests[b:])


_LAST_MIX = None


def _is_mix(guest: bytes, snaps: dict, mix) -> bool:
    if mix is None:
        return False
    before, after, bsnaps = mix
    if len(guest) != len(before) or snaps != bsnaps:
        return False
    return all(g == b or g == a for g, b, a in zip(guest, before, after))


def _mix_digest(mix) -> bytes:
    """Register the after-state of a failed write as a candidate for the per-sector check."""
    _before, after, bsnaps = mix
    d = state_digest(after, bsnaps)
    _STATES.setdefault(d, (after, state_digest(b"", bsnaps)))
    return d


def _state_ok(data: bytes, ctx, allowed: set[bytes], what: str, mix=None) -> str | None:
    try:
        guest, snaps, _leaked = read_state(data, ctx)
    except VdiskError as exc:
        return f"{what}: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        return f"{what}: unexpected {type(exc).__name__}: {exc}"
    if state_digest(guest, snaps) not in allowed and not _is_mix(guest, snaps, mix) and not (
            ctx.cfg.format != "vdk" and _per_sector(guest, snaps, allowed | ({_mix_digest(mix)} if mix else set()))):
        return f"{what}: recovered state is not one the model allows"
    return None


def inject(cfg, seed, op, at, err, sticky, base, backing, backing_content, check_retry=CHECK_RETRY) -> tuple[str, list[str]]:
    global _LAST_MIX
    _LAST_MIX = None
    _STATES.clear()
    rec = RecordingStorage(base, "top.vdk")
    faulty = FaultyStorage(rec, op, at, err, sticky)
    hosts: list[FailStopStorage] = []
    exc, digests, kinds, img = _run(cfg, seed, base, backing, backing_content, faulty, hosts)
    mix = _LAST_MIX
    problems: list[str] = []
    where = f"{op}#{at} {'sticky' if sticky else 'once'} {errno.errorcode[err]}"
    if exc is None:
        outcome = "absorbed" if faulty.injected else "not-reached"
    else:
        outcome = "raised"
        if not isinstance(exc, HostIOError):
            problems.append(f"{where}: first error is {type(exc).__name__}, not HostIOError: {exc}")
        elif exc.errno != err:
            problems.append(f"{where}: HostIOError has errno {exc.errno}, injected {err}")
    ctx = _Ctx(cfg, backing)
    allowed = _window(digests, kinds) if exc is not None else {digests[-1]}
    # 2. the process dies now: the file as the OS has it
    m = _state_ok(rec.snapshot(), ctx, allowed, f"{where}: reopened after the error", mix)
    if m:
        problems.append(m)
    # 3. the power goes now: what the completed flushes made durable
    cl = CrashLog(rec.base, rec.log)
    m = _state_ok(cl.durable_state(cl.last_flush_before(len(rec.log))), ctx, allowed,
                  f"{where}: after a power cut following the error", mix)
    if m:
        problems.append(m)
    # 4. a transient fault: retry the flush, close, reopen
    if exc is not None and not sticky and img is not None and check_retry:
        faulty.disarm()
        flush_failed = bool(hosts) and hosts[-1].flush_failed is not None
        try:
            img.flush()
            img.close()
        except VdiskError as exc2:
            if flush_failed and isinstance(exc2, HostIOError) and "must be reopened" in str(exc2):
                pass  # as it must: the data of the failed flush may be gone
            else:
                problems.append(f"{where}: after a transient {type(exc).__name__} in "
                                f"{kinds[-1]}, the retried flush/close raises {type(exc2).__name__}: {exc2}")
            try:
                img.close()
            except VdiskError:
                pass
            if flush_failed:
                m = _state_ok(rec.snapshot(), ctx, allowed, f"{where}: reopened after the refused retry", mix)
                if m:
                    problems.append(m)
        except Exception as exc2:  # noqa: BLE001
            problems.append(f"{where}: retried flush raises unexpected {type(exc2).__name__}: {exc2}")
        else:
            # After a failed host flush the image's flush may still succeed when the driver
            # has nothing left to write (it rolled its state back): then the file must hold
            # every acknowledged write, which this checks.  The host never flushes again.
            m = _state_ok(rec.snapshot(), ctx, set(digests[-2:]), f"{where}: after a successful retried flush", mix)
            if m:
                problems.append(m)
    elif img is not None and exc is not None:
        try:
            img.close()
        except VdiskError:
            pass
        except Exception as exc2:  # noqa: BLE001
            problems.append(f"{where}: close after the error raises unexpected {type(exc2).__name__}: {exc2}")
    return outcome, problems


def _points(counts: Counter, limit: int):
    """Injection points (op, k): all of them, or ``limit`` chosen evenly per op kind."""
    kinds = [k for k in FaultyStorage.OPS if counts[k]]
    out = []
    for kind in kinds:
        n = counts[kind]
        share = max(1, limit // len(kinds)) if limit else n
        if n <= share:
            ks = range(n)
        else:
            ks = sorted({round(i * (n - 1) / (share - 1)) for i in range(share)})
        out += [(kind, k) for k in ks]
    return out


def fault_campaign(cfg, seed, limit, check_retry=CHECK_RETRY):
    backing = backing_content = None
    if cfg.backing:
        backing, backing_content = make_backing(cfg, seed)
    base = create_image(cfg, backing)
    dry = FaultyStorage(RecordingStorage(base, "top.vdk"))
    exc, *_ = _run(cfg, seed, base, backing, backing_content, dry)
    assert exc is None, f"the workload fails without faults: {exc}"
    stats = Counter()
    problems = []
    for i, (kind, k) in enumerate(_points(dry.counts, limit)):
        for sticky in (False, True):
            err = (errno.EIO, errno.ENOSPC)[(i + sticky) % 2]
            outcome, probs = inject(cfg, seed, kind, k, err, sticky, base, backing, backing_content, check_retry)
            stats["injection_points"] += 1
            stats[f"points_{kind}"] += 1
            stats[outcome] += 1
            problems += probs
    stats["calls_pread"], stats["calls_pwrite"], stats["calls_flush"] = (dry.counts["pread"], dry.counts["pwrite"],
                                                                         dry.counts["flush"])
    return stats, problems


@pytest.mark.parametrize("cfg", FAULT_CONFIGS, ids=[c.name for c in FAULT_CONFIGS])
def test_fault_injection(cfg):
    stats, problems = fault_campaign(cfg, 4242, MAX_POINTS)
    figures.record("faults", config=cfg.name, failures=len(problems), retry_checked=CHECK_RETRY, **dict(stats))
    assert stats["raised"] > 0
    assert not problems, f"{len(problems)} problems in {stats['injection_points']} injection points:\n" + "\n".join(
        problems[:25])
