"""The fleet spec file (TOML, formats/fleet.md): parsing, overrides and validation.

:func:`load` reads a file, applies ``--set KEY=VALUE`` overrides (and the CLI's
``--vms``, ``--duration``, ``--scale``), and returns a :class:`FleetSpec` of frozen
dataclasses.  Every key is checked: an unknown key, a wrong type or a value out of
range is a :class:`~vdisk.errors.UsageError` naming the file and the key
(``fleet.toml: workload[2].read_fraction: expected a number from 0 to 1, got 1.5``).
Paths in the spec (trace files) are relative to the spec file's directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UsageError
from ..sizes import parse_size

FORK_METHODS = ("linked", "full", "pool")
FORMATS = ("vdk", "qcow2")
WORKLOAD_KINDS = ("random", "log", "idle", "upgrade", "trace")
ACTIONS = ("checkpoint", "restore", "live_clone", "delete", "migrate")
TIMINGS = ("asap", "recorded")
MAX_VMS = 10_000
MAX_DISKS = 16
MAX_SIZE = 1 << 44


@dataclass(frozen=True)
class GoldenSpec:
    size: int | None = None  # None: the boot trace's disk size
    format: str = "vdk"
    fill: float = 0.1
    cluster_size: int | None = None


@dataclass(frozen=True)
class ForkSpec:
    vms: int = 4
    method: str = "linked"
    format: str = "vdk"
    disks: int = 1
    data_disk_size: int = 64 << 20
    pool_dedup: bool = True


@dataclass(frozen=True)
class BootSpec:
    trace: str
    format: str = "auto"
    timing: str = "asap"
    speed: float = 1.0
    disk: int | None = None  # msr: the DiskNumber to keep


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    kind: str
    vms: tuple[int, ...]  # resolved VM numbers
    ops: int | None = None
    rate: float = 0.0  # ops per second per VM; 0: as fast as the disk answers
    block_size: int = 4096
    read_fraction: float = 0.5
    span: float = 1.0
    flush_every: int = 0
    region_size: int = 16 << 20
    idle_seconds: float = 1.0
    burst_ops: int = 32
    files: int = 200
    file_size: int = 64 << 10
    version: int = 1
    trace: str | None = None
    format: str = "auto"
    timing: str = "asap"
    speed: float = 1.0
    disk: int | None = None
    loop: bool = False
    fold: bool = False


@dataclass(frozen=True)
class EventSpec:
    index: int
    action: str
    vm: int | str
    at: float | None = None
    after_ops: int | None = None
    name: str | None = None
    checkpoint: str | None = None
    to: str = "dir"
    workload: str | None = None


@dataclass(frozen=True)
class CheckSpec:
    golden: str = "sample"  # sample | full
    sample: int = 64


@dataclass(frozen=True)
class FleetSpec:
    path: str
    name: str
    seed: int = 1
    duration: float = 10.0
    golden: GoldenSpec = field(default_factory=GoldenSpec)
    fork: ForkSpec = field(default_factory=ForkSpec)
    boot: BootSpec | None = None
    workloads: tuple[WorkloadSpec, ...] = ()
    events: tuple[EventSpec, ...] = ()
    check: CheckSpec = field(default_factory=CheckSpec)

    def workload_of(self, vm: int) -> WorkloadSpec | None:
        for w in self.workloads:
            if vm in w.vms:
                return w
        return None

    def workload_named(self, name: str) -> WorkloadSpec | None:
        return next((w for w in self.workloads if w.name == name), None)


# ------------------------------------------------------------------ validation helpers
class _Table:
    """One TOML table being validated: typed getters that name the key in errors, and
    :meth:`done` to refuse the keys nobody asked for."""

    def __init__(self, where: str, prefix: str, data: Any):
        self.where = where
        self.prefix = prefix
        if not isinstance(data, dict):
            self.fail("", f"expected a table, got {_show(data)}")
        self.data = data
        self.seen: set[str] = set()

    def fail(self, key: str, msg: str):
        name = f"{self.prefix}{key}" if key else self.prefix.rstrip(".") or "(top level)"
        raise UsageError(f"{self.where}: {name}: {msg}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.get(key, default)
        if v is None:
            return None
        if not isinstance(v, str):
            self.fail(key, f"expected a string, got {_show(v)}")
        if choices is not None and v not in choices:
            self.fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return v

    def int(self, key: str, default: int | None = None, lo: int = 0, hi: int = 1 << 62) -> int | None:
        v = self.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected a whole number, got {_show(v)}")
        if not lo <= v <= hi:
            self.fail(key, f"expected a number from {lo} to {hi}, got {v}")
        return v

    def num(self, key: str, default: float | None = None, lo: float = 0.0, hi: float = 1e12) -> float | None:
        v = self.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"expected a number, got {_show(v)}")
        if not lo <= v <= hi:
            self.fail(key, f"expected a number from {lo:g} to {hi:g}, got {v:g}")
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {_show(v)}")
        return v

    def size(self, key: str, default: int | None = None, lo: int = 0, hi: int = MAX_SIZE) -> int | None:
        v = self.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(key, f"expected a size such as \"64M\" or a number of bytes, got {_show(v)}")
        try:
            n = parse_size(v)
        except (UsageError, ValueError):
            self.fail(key, f"{v!r} is not a size (such as 4K, 64M, 2G)")
        if not lo <= n <= hi:
            self.fail(key, f"expected a size from {lo} to {hi} bytes, got {n}")
        return n

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            self.fail(extra[0], f"unknown key (known here: {', '.join(sorted(self.seen))})")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _vm_selector(t: _Table, key: str, nvms: int) -> tuple[int, ...]:
    v = t.get(key, "all")
    if v == "all":
        return tuple(range(nvms))
    if isinstance(v, int) and not isinstance(v, bool):
        items = [v]
    elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        items = list(v)
    elif isinstance(v, str) and v.count("-") == 1 and v.count("%") == 2 and v.endswith("%"):
        a, _, b = v.replace("%", "").partition("-")
        try:
            fa, fb = float(a), float(b)
        except ValueError:
            fa = fb = -1.0
        if not 0 <= fa <= fb <= 100:
            t.fail(key, f"{v!r}: a share of the fleet is \"FROM%-TO%\" with 0 <= FROM <= TO <= 100")
        items = list(range(round(nvms * fa / 100), round(nvms * fb / 100)))
    elif isinstance(v, str) and "-" in v:
        a, _, b = v.partition("-")
        if not (a.strip().isdigit() and b.strip().isdigit()) or int(a) > int(b):
            t.fail(key, f"{v!r}: expected \"all\", a VM number, a list of them, a range \"FIRST-LAST\" "
                        "or a share \"FROM%-TO%\"")
        items = list(range(int(a), int(b) + 1))
    else:
        t.fail(key, f"{_show(v)}: expected \"all\", a VM number, a list of them, or a range \"FIRST-LAST\"")
    for x in items:
        if not 0 <= x < nvms:
            t.fail(key, f"VM {x} does not exist (the fleet has VMs 0 to {nvms - 1})")
    return tuple(sorted(set(items)))


def _rel(spec_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(spec_dir, path))


# ------------------------------------------------------------------ overrides
def apply_set(data: dict, assignment: str) -> None:
    """``KEY.SUB=VALUE`` (a TOML value; bare words are strings) into ``data``;
    ``workload[0].ops=5`` names an element of an array of tables."""
    key, eq, value = assignment.partition("=")
    if not eq or not key.strip():
        raise UsageError(f"--set {assignment!r}: expected KEY=VALUE (such as fork.format=qcow2)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    node: Any = data
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        name, idx = part, None
        if part.endswith("]") and "[" in part:
            name, _, rest = part.partition("[")
            if not rest[:-1].isdigit():
                raise UsageError(f"--set {assignment!r}: {part!r} is not NAME[INDEX]")
            idx = int(rest[:-1])
        last = i == len(parts) - 1
        if idx is not None:
            arr = node.get(name) if isinstance(node, dict) else None
            if not isinstance(arr, list) or idx >= len(arr):
                raise UsageError(f"--set {assignment!r}: the spec has no {name}[{idx}]")
            if last:
                arr[idx] = parsed
            else:
                node = arr[idx]
            continue
        if not isinstance(node, dict):
            raise UsageError(f"--set {assignment!r}: {'.'.join(parts[:i])} is not a table")
        if last:
            node[name] = parsed
        else:
            node = node.setdefault(name, {})


# ------------------------------------------------------------------ load
def load(path: str, *, sets: tuple[str, ...] = (), vms: int | None = None, duration: float | None = None,
         scale: float | None = None) -> FleetSpec:
    """Read, override and validate the spec file ``path``: ``sets`` and ``vms`` change
    the file's keys before validation; ``scale`` then multiplies op counts, event
    times and the duration; ``duration`` last sets the duration itself."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"fleet spec {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"fleet spec {path}: is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"fleet spec {path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"fleet spec {path}: not UTF-8 text") from None
    for s in sets:
        apply_set(data, s)
    if vms is not None:
        if not isinstance(data.get("fork", {}), dict):
            raise UsageError(f"fleet spec {path}: fork: expected a table")
        data.setdefault("fork", {})["vms"] = vms
    spec = parse(data, path)
    if scale is not None:
        spec = scaled(spec, scale)
    if duration is not None:  # after the scaling: the duration asked for is the one run
        if not 0 <= duration <= 86400:
            raise UsageError(f"--duration {duration:g}: expected 0 to 86400 seconds")
        spec = replace(spec, duration=float(duration))
        check_bounded(spec.duration, spec.workloads, os.path.basename(path))
    return spec


def check_bounded(duration: float, workloads, where: str) -> None:
    """A run must end: without a duration (0), every workload must end by itself."""
    if duration:
        return
    for i, w in enumerate(workloads):
        endless = w.kind in ("random", "log", "idle") or (w.kind == "trace" and w.loop)
        if endless and w.ops is None:
            raise UsageError(f"{where}: duration: 0 (no time limit) but workload[{i}] ({w.name}) never ends by "
                             "itself; give it ops, or give the run a duration")


def scaled(spec: FleetSpec, factor: float) -> FleetSpec:
    """Every op count, ``after_ops`` and the duration times ``factor`` (at least 1 op)."""
    if not 0 < factor <= 1000:
        raise UsageError(f"--scale {factor:g}: expected a factor above 0 (and at most 1000)")

    def n(x: int | None) -> int | None:
        return None if x is None else max(1, round(x * factor))

    wl = tuple(replace(w, ops=n(w.ops), files=n(w.files) if w.kind == "upgrade" else w.files)
               for w in spec.workloads)
    ev = tuple(replace(e, after_ops=n(e.after_ops), at=None if e.at is None else e.at * factor)
               for e in spec.events)
    return replace(spec, duration=spec.duration * factor, workloads=wl, events=ev)


def parse(data: dict, path: str = "<spec>") -> FleetSpec:
    where = os.path.basename(path)
    spec_dir = os.path.dirname(os.path.abspath(path))
    top = _Table(where, "", data)
    name = top.str("name", os.path.splitext(where)[0])
    seed = top.int("seed", 1, 0, (1 << 32) - 1)
    duration = top.num("duration", 10.0, 0.0, 86400.0)

    g = _Table(where, "golden.", top.get("golden", {}))
    golden = GoldenSpec(size=g.size("size", None, 1 << 20), format=g.str("format", "vdk", FORMATS),
                        fill=g.num("fill", 0.1, 0.0, 1.0), cluster_size=g.size("cluster_size", None, 512, 2 << 20))
    g.done()

    fk = _Table(where, "fork.", top.get("fork", {}))
    fork = ForkSpec(vms=fk.int("vms", 4, 1, MAX_VMS), method=fk.str("method", "linked", FORK_METHODS),
                    format=fk.str("format", "vdk", FORMATS), disks=fk.int("disks", 1, 1, MAX_DISKS),
                    data_disk_size=fk.size("data_disk_size", 64 << 20, 1 << 20),
                    pool_dedup=fk.bool("pool_dedup", True))
    fk.done()
    if fork.method == "pool" and golden.format != "vdk":
        fk.fail("method", "a pool fork imports the golden image into a pool; keep golden.format = \"vdk\"")
    if fork.method == "linked" and fork.format != golden.format:
        fk.fail("format", f"a linked clone of a {golden.format} golden image is {golden.format} too "
                          f"(set golden.format = \"{fork.format}\" as well)")

    boot = None
    if top.has("boot"):
        b = _Table(where, "boot.", top.get("boot"))
        tr = b.str("trace")
        if tr is None:
            b.fail("trace", "missing: the trace file the boot storm replays")
        boot = BootSpec(trace=_rel(spec_dir, tr), format=b.str("format", "auto", ("auto", "vdisk", "msr")),
                        timing=b.str("timing", "asap", TIMINGS), speed=b.num("speed", 1.0, 0.001, 1e6),
                        disk=b.int("disk", None, 0, 1 << 20))
        b.done()

    raw_wl = top.get("workload", [])
    if not isinstance(raw_wl, list):
        top.fail("workload", "expected an array of tables ([[workload]])")
    workloads = []
    owner: dict[int, str] = {}
    for i, item in enumerate(raw_wl):
        w = _Table(where, f"workload[{i}].", item)
        kind = w.str("kind", None, WORKLOAD_KINDS)
        if kind is None:
            w.fail("kind", f"missing (one of {', '.join(WORKLOAD_KINDS)})")
        wname = w.str("name", kind if not any(x.name == kind for x in workloads) else f"{kind}-{i}")
        sel = _vm_selector(w, "vms", fork.vms)
        defaults = _KIND_DEFAULTS[kind]
        ws = WorkloadSpec(
            name=wname, kind=kind, vms=sel, ops=w.int("ops", None, 1), rate=w.num("rate", 0.0, 0.0, 1e7),
            block_size=w.size("block_size", defaults.get("block_size", 4096), 4096, 16 << 20),
            read_fraction=w.num("read_fraction", defaults.get("read_fraction", 0.5), 0.0, 1.0),
            span=w.num("span", 1.0, 0.0001, 1.0), flush_every=w.int("flush_every", defaults.get("flush_every", 0), 0),
            region_size=w.size("region_size", 16 << 20, 4096), idle_seconds=w.num("idle_seconds", 1.0, 0.0, 3600.0),
            burst_ops=w.int("burst_ops", 32, 1, 1 << 20), files=w.int("files", 200, 1, 1 << 20),
            file_size=w.size("file_size", 64 << 10, 4096, 64 << 20), version=w.int("version", 1, 0, (1 << 32) - 1),
            trace=w.str("trace"), format=w.str("format", "auto", ("auto", "vdisk", "msr")),
            timing=w.str("timing", "asap", TIMINGS), speed=w.num("speed", 1.0, 0.001, 1e6),
            disk=w.int("disk", None, 0, 1 << 20), loop=w.bool("loop", False),
            fold=w.bool("fold", False))
        if ws.block_size % 4096:
            w.fail("block_size", f"{ws.block_size} is not a multiple of 4096 (the simulator writes 4 KiB blocks)")
        if kind == "trace":
            if ws.trace is None:
                w.fail("trace", "missing: a trace workload names its trace file")
            ws = replace(ws, trace=_rel(spec_dir, ws.trace))
        elif ws.trace is not None:
            w.fail("trace", f"only a trace workload replays a trace (this one is {kind})")
        w.done()
        if any(x.name == ws.name for x in workloads):
            w.fail("name", f"a workload named {ws.name!r} exists already")
        for vm in sel:
            if vm in owner:
                w.fail("vms", f"VM {vm} has a workload already ({owner[vm]!r}); give each VM one workload")
            owner[vm] = ws.name
        workloads.append(ws)

    raw_ev = top.get("event", [])
    if not isinstance(raw_ev, list):
        top.fail("event", "expected an array of tables ([[event]])")
    events = []
    clones: set[str] = set()
    for i, item in enumerate(raw_ev):
        e = _Table(where, f"event[{i}].", item)
        action = e.str("action", None, ACTIONS)
        if action is None:
            e.fail("action", f"missing (one of {', '.join(ACTIONS)})")
        vm = e.get("vm")
        if isinstance(vm, bool) or not isinstance(vm, (int, str)):
            e.fail("vm", f"expected a VM number or the name of a live clone, got {_show(vm)}")
        if isinstance(vm, int) and not 0 <= vm < fork.vms:
            e.fail("vm", f"VM {vm} does not exist (the fleet has VMs 0 to {fork.vms - 1})")
        if isinstance(vm, str) and vm not in clones:
            e.fail("vm", f"{vm!r} is not the name of a live clone made by an earlier event")
        at, after = e.num("at", None, 0.0, 86400.0), e.int("after_ops", None, 0)
        if (at is None) == (after is None):
            e.fail("at", "give exactly one of at (seconds into the run) and after_ops (the VM's op count)")
        ev = EventSpec(index=i, action=action, vm=vm, at=at, after_ops=after, name=e.str("name"),
                       checkpoint=e.str("checkpoint"), to=e.str("to", "dir", ("dir", "pool")),
                       workload=e.str("workload"))
        if action in ("checkpoint", "live_clone") and not ev.name:
            e.fail("name", f"missing: a {action} event names its {'checkpoint' if action == 'checkpoint' else 'clone'}")
        if action == "restore" and not ev.checkpoint:
            e.fail("checkpoint", "missing: the checkpoint to restore")
        if action == "live_clone":
            if ev.name in clones or (ev.name.isdigit()):
                e.fail("name", f"{ev.name!r} names a VM already")
            clones.add(ev.name)
            if ev.workload is not None and not any(w.name == ev.workload for w in workloads):
                e.fail("workload", f"no workload is named {ev.workload!r}")
        elif ev.workload is not None:
            e.fail("workload", "only a live clone takes a workload")
        if ev.name and action == "checkpoint":
            from ..drivers.names import validate_snapshot_name

            try:
                validate_snapshot_name(ev.name)
            except UsageError as exc:
                e.fail("name", str(exc))
        e.done()
        events.append(ev)

    c = _Table(where, "check.", top.get("check", {}))
    check = CheckSpec(golden=c.str("golden", "sample", ("sample", "full")), sample=c.int("sample", 64, 0, 1 << 30))
    c.done()
    top.done()
    check_bounded(duration, workloads, where)
    if boot is None and not workloads:
        top.fail("", "the spec runs nothing: give a [boot] trace or at least one [[workload]]")
    return FleetSpec(path=os.path.abspath(path), name=name, seed=seed, duration=duration, golden=golden, fork=fork,
                     boot=boot, workloads=tuple(workloads), events=tuple(events), check=check)


_KIND_DEFAULTS: dict[str, dict] = {
    "random": {"block_size": 8192, "read_fraction": 0.7},
    "log": {"block_size": 4096, "read_fraction": 0.0, "flush_every": 1},
    "idle": {"block_size": 4096, "read_fraction": 0.5},
    "upgrade": {"block_size": 4096, "read_fraction": 0.0},
    "trace": {},
}
