"""Running a fleet: prepare the golden image, fork the VMs, run the boot storm and the
steady phase with one thread per VM, fire the events, then check every disk.

Concurrency model: one Python thread per VM (live clones get their own when they
are made), each sending its workload's requests one at a time (queue depth 1 per
VM: a closed loop, as a guest's synchronous I/O; a fleet of N VMs has N requests in
flight).  A VM's thread is the only one touching its disks and its model, and it
runs the VM's events itself between two requests, under the VM's lock, so an event
sees a single point of the VM's history.  The GIL is released in the host I/O and
in zstd/xxhash; on a small machine the fleet is CPU-bound, which is what it
measures: the cost of the storage stack per request.

A monitor thread calls ``progress`` twice a second with a snapshot of the counters
(phase, elapsed, ops, errors) for a progress display.  The first error of any VM
stops the whole fleet (every thread checks a shared stop flag between requests),
and the run's result records it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from ..errors import VdiskError
from . import events as ev_mod
from . import workloads
from .check import check_fleet, space_report
from .disks import VM, Disk, Layout, timed
from .model import BLOCK, DiskModel, Golden, vm_token
from .spec import EventSpec, FleetSpec
from .stats import Recorder, series, summarize
from .traces import Trace, read_trace

ProgressFn = Callable[[dict], None]


class FleetFailed(VdiskError):
    """The run stopped on an error, or its model check found a mismatch."""

    exit_code = 1


class _Phase:
    def __init__(self, name: str):
        self.name = name
        self.start = time.perf_counter()
        self.elapsed = 0.0
        self.recorders: dict[str, Recorder] = {}


class Fleet:
    def __init__(self, spec: FleetSpec, workdir: str | None = None, *, keep: bool = False,
                 progress: ProgressFn | None = None):
        self.spec = spec
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="vdisk-fleet-")
        self.keep = keep or not self._own_dir
        self.progress = progress
        self.layout = Layout(spec, self.workdir)
        self.traces: dict[str, Trace] = {}
        self.vms: list[VM] = []
        self.by_name: dict[str, VM] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.event_log: list[dict] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._phase: _Phase | None = None
        self.phases: dict[str, _Phase] = {}
        self.fork_total = 0.0
        self.golden: Golden | None = None

    # ------------------------------------------------------------------ set-up
    def _trace(self, path: str, kind: str, disk: int | None) -> Trace:
        key = path
        if key not in self.traces:
            self.traces[key] = read_trace(path, kind, disk)
        return self.traces[key]

    def prepare(self) -> None:
        s = self.spec
        extra: set[int] = set()
        boot_tr = None
        if s.boot is not None:
            boot_tr = self._trace(s.boot.trace, s.boot.format, s.boot.disk)
            for _t, op, off, n in boot_tr.requests():
                if op == "R":
                    extra.update(range(off // BLOCK, -(-(off + n) // BLOCK)))
        for w in s.workloads:
            if w.kind == "trace":
                self._trace(w.trace, w.format, w.disk)
        size = s.golden.size
        if size is None:
            size = max(boot_tr.size if boot_tr else 0, 64 << 20)
            size = -(-size // (1 << 20)) * (1 << 20)
        if boot_tr is not None:
            workloads.check_fits(boot_tr, size, "boot")
        for w in s.workloads:
            if w.kind == "trace":
                workloads.check_fits(self.traces[w.trace], size, f"workload {w.name}", w.fold)
        self.golden = Golden(size, s.seed, s.golden.fill, extra)
        self._progress_note("golden")
        self.layout.make_golden(self.golden)

    def fork_all(self) -> None:
        """Fork every VM from the golden image, one after the other, timing each."""
        self._progress_note("fork")
        t0 = time.perf_counter()
        for i in range(self.spec.fork.vms):
            name = f"vm{i:03d}"
            sec, made = timed(self.layout.fork, name)
            disks = [Disk(p, fmt, DiskModel(self.golden if based else None,
                                            self.golden.size if based else self.spec.fork.data_disk_size))
                     for p, fmt, based in made]
            vm = VM(i, name, disks)
            vm.fork_seconds = sec
            self._add_vm(vm)
        self.fork_total = time.perf_counter() - t0
        for vm in self.vms:
            for d in vm.disks:
                d.open()

    def _add_vm(self, vm: VM) -> None:
        with self._lock:
            self.vms.append(vm)
            self.by_name[vm.name] = vm
            self.by_name[str(vm.number)] = vm

    # ------------------------------------------------------------------ requests
    def _do(self, vm: VM, req: tuple, rec: Recorder, t_phase: float, spread: bool) -> None:
        """Send one request; ``spread`` sends it to any of the VM's disks (synthetic
        workloads), else to disk 0 (a boot or a trace: one recorded disk)."""
        op, off, n, _due = req
        disk = vm.disks[(off // BLOCK + vm.ops) % len(vm.disks)] if spread and len(vm.disks) > 1 else vm.disks[0]
        if op != "F" and off + n > disk.model.size:
            off = (off % max(BLOCK, disk.model.size - n + 1)) // BLOCK * BLOCK  # a data disk may be smaller
        img = disk.image
        data = None
        if op in ("W", "U"):
            first, cnt = off // BLOCK, n // BLOCK
            token = vm_token(vm.number, vm.next_token_seq()) if op == "W" else upgrade_token(vm)
            data = DiskModel.data(first, cnt, token)
            t0 = time.perf_counter()
            img.write(off, data)
            lat = time.perf_counter() - t0
            disk.model.write(first, cnt, token)
        elif op == "R":
            t0 = time.perf_counter()
            img.read(off, n)
            lat = time.perf_counter() - t0
        elif op == "F":
            t0 = time.perf_counter()
            img.flush()
            lat = time.perf_counter() - t0
        else:  # D, Z
            t0 = time.perf_counter()
            if op == "D":
                img.discard(off, n)
            else:
                img.write_zeroes(off, n)
            lat = time.perf_counter() - t0
            disk.model.write(off // BLOCK, n // BLOCK, 0)
        if disk.mirror is not None:
            disk.mirror.mirror_write(op, off, n, data)
        rec.add(t0 - t_phase, lat * 1e6, op, n)
        vm.ops += 1

    # ------------------------------------------------------------------ events
    def _due_events(self, vm: VM, pending: list[EventSpec], now: float, final: bool) -> None:
        """Fire the VM's events that are due (all of them with ``final``), in spec order."""
        i = 0
        while i < len(pending):
            e = pending[i]
            ready = final or (e.at is not None and now >= e.at) or (e.after_ops is not None and vm.ops >= e.after_ops)
            if not ready:
                i += 1
                continue
            pending.pop(i)
            self._fire(vm, e)
            if vm.deleted:
                pending.clear()

    def _fire(self, vm: VM, e: EventSpec) -> None:
        entry = {"event": e.index, "action": e.action, "vm": vm.name,
                 "at_s": round(time.perf_counter() - self._phase.start, 6), "vm_ops": vm.ops, "seconds": None}
        try:
            with vm.lock:
                if e.action == "checkpoint":
                    entry["seconds"] = ev_mod.checkpoint(vm, e.name)
                elif e.action == "restore":
                    entry["seconds"] = ev_mod.restore(vm, e.checkpoint)
                elif e.action == "live_clone":
                    sec, disks = ev_mod.live_clone(self.layout, vm, e.name)
                    entry["seconds"] = sec
                    self._start_clone(e, disks)
                elif e.action == "delete":
                    entry["seconds"] = ev_mod.delete(vm)
                elif e.action == "migrate":
                    ev_mod.migrate_start(self.layout, vm, e.to)
                    entry["started"] = True
        except VdiskError as exc:
            raise VdiskError(f"{ev_mod.describe(e)}: {exc}") from None
        finally:
            vm.events.append(entry)
            with self._lock:
                self.event_log.append(entry)

    def _start_clone(self, e: EventSpec, disks: list[Disk]) -> None:
        number = self.spec.fork.vms + sum(1 for v in self.vms if v.number >= self.spec.fork.vms)
        clone = VM(number, e.name, disks)
        for d in disks:
            d.open()
        self._add_vm(clone)
        w = self.spec.workload_named(e.workload) if e.workload else None
        if w is not None or any(str(x.vm) == e.name for x in self.spec.events):
            self._spawn(clone, w, "steady")
        # else: a clone with nothing to do needs no thread; its disks are closed (and
        # so flushed) with every other disk at the end of the run

    # ------------------------------------------------------------------ threads
    def _spawn(self, vm: VM, w, phase: str, boot_tr: Trace | None = None) -> None:
        t = threading.Thread(target=self._vm_main, args=(vm, w, phase, boot_tr), name=f"fleet-{vm.name}", daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _vm_main(self, vm: VM, w, phase: str, boot_tr: Trace | None) -> None:
        ph = self._phase
        vm.workload = w
        rec = ph.recorders.setdefault(vm.name, Recorder())
        try:
            if phase == "boot":
                gen = workloads.boot(self.spec.boot, boot_tr, vm.disks[0].model.size)
                limit, duration = None, None
            else:
                size = vm.disks[0].model.size
                gen = workloads.make(w, size, vm.number, self.spec.seed, self.traces) if w is not None else iter(())
                limit, duration = (w.ops if w is not None else None), (self.spec.duration or None)
            pending = [e for e in self.spec.events if self.by_name.get(str(e.vm)) is vm] if phase == "steady" else []
            spread = phase == "steady" and w is not None and w.kind != "trace"
            self._run_requests(vm, gen, rec, ph, limit, duration, pending, spread)
            if not vm.deleted and not self.stop.is_set():
                self._wait_for_timed(vm, pending, ph, duration)
                self._due_events(vm, pending, time.perf_counter() - ph.start, final=True)
            if not vm.deleted and not self.stop.is_set():
                with vm.lock:
                    sec = ev_mod.migrate_advance(vm, finish=True)
                    if sec is not None:
                        self._log_migration(vm, sec)
                    for d in vm.disks:
                        d.image.flush()
        except VdiskError as exc:
            self._failed(vm, exc.message if hasattr(exc, "message") else str(exc))
        except OSError as exc:
            self._failed(vm, f"{exc.filename or ''}: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - a bug: still reported, the fleet stops
            if os.environ.get("VDISK_DEBUG"):
                import traceback

                traceback.print_exc()
            self._failed(vm, f"internal error: {type(exc).__name__}: {exc}")

    def _failed(self, vm: VM, msg: str) -> None:
        vm.error = msg
        with self._lock:
            self.errors.append(f"{vm.name}: {msg}")
        self.stop.set()

    def _log_migration(self, vm: VM, sec: float) -> None:
        for entry in reversed(vm.events):
            if entry["action"] == "migrate" and entry["seconds"] is None:
                entry["seconds"] = sec
                break

    def _run_requests(self, vm, gen, rec, ph, limit, duration, pending, spread) -> None:
        start = ph.start
        n = 0
        for req in gen:
            if self.stop.is_set() or vm.deleted:
                return
            now = time.perf_counter() - start
            if duration is not None and now >= duration:
                return
            if limit is not None and n >= limit:
                return
            if pending:
                self._due_events(vm, pending, now, final=False)
                if vm.deleted:
                    return
            due = req[3]
            if due is not None and due > now:
                if duration is not None and due >= duration:
                    return
                self._sleep_until(vm, due, ph, pending)
                if self.stop.is_set() or vm.deleted:
                    return
            with vm.lock:
                self._do(vm, req, rec, start, spread)
                if any(d.mirror is not None for d in vm.disks):
                    sec = ev_mod.migrate_advance(vm)
                    if sec is not None:
                        self._log_migration(vm, sec)
            n += 1
        return

    def _sleep_until(self, vm, due, ph, pending) -> None:
        while not self.stop.is_set():
            now = time.perf_counter() - ph.start
            if now >= due:
                return
            nxt = min([e.at for e in pending if e.at is not None and e.at > now] + [due])
            self.stop.wait(min(0.05, max(0.0, nxt - now)))
            if pending:
                self._due_events(vm, pending, time.perf_counter() - ph.start, final=False)
                if vm.deleted:
                    return

    def _wait_for_timed(self, vm, pending, ph, duration) -> None:
        """A VM done with its requests still keeps its timed events' appointments
        (within the phase's duration)."""
        while not self.stop.is_set() and not vm.deleted:
            now = time.perf_counter() - ph.start
            timed_ = [e.at for e in pending if e.at is not None and (duration is None or e.at < duration)]
            if not timed_:
                return
            nxt = min(timed_)
            if nxt > now:
                self.stop.wait(min(0.05, nxt - now))
                continue
            self._due_events(vm, pending, now, final=False)

    def _run_phase(self, name: str, starter: Callable[[], None]) -> None:
        ph = _Phase(name)
        self._phase = ph
        self.phases[name] = ph
        with self._lock:
            self._threads = []
        try:
            starter()
            while True:
                with self._lock:
                    alive = [t for t in self._threads if t.is_alive()]
                if not alive:
                    break
                self._report_progress(ph)
                alive[0].join(0.5)
        except BaseException:  # interrupted: let every VM thread stop before the disks close
            self.stop.set()
            with self._lock:
                threads = list(self._threads)
            for t in threads:
                t.join(10)
            raise
        ph.elapsed = time.perf_counter() - ph.start
        self._report_progress(ph)

    def _report_progress(self, ph: _Phase) -> None:
        if self.progress is None:
            return
        ops = sum(len(r) for r in list(ph.recorders.values()))
        el = time.perf_counter() - ph.start
        self.progress({"phase": ph.name, "elapsed_s": el, "ops": ops, "iops": ops / el if el > 0 else 0.0,
                       "vms": sum(1 for v in self.vms if not v.deleted), "errors": len(self.errors),
                       "duration_s": self.spec.duration if ph.name == "steady" else None})

    def _progress_note(self, phase: str) -> None:
        if self.progress is not None:
            self.progress({"phase": phase, "elapsed_s": 0.0, "ops": 0, "iops": 0.0, "vms": len(self.vms),
                           "errors": 0, "duration_s": None})

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Run the whole fleet and return its result (formats/fleet.md lists the keys)."""
        try:
            return self._run()
        except BaseException:
            if self._own_dir and not self.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _run(self) -> dict:
        t_all = time.perf_counter()
        try:
            self.prepare()
            self.fork_all()
            if self.spec.boot is not None:
                tr = self.traces[self.spec.boot.trace]
                self._run_phase("boot", lambda: [self._spawn(vm, None, "boot", tr) for vm in list(self.vms)])
            if not self.stop.is_set() and (self.spec.workloads or self.spec.events):
                self._run_phase("steady", lambda: [self._spawn(vm, self.spec.workload_of(vm.number), "steady")
                                                   for vm in list(self.vms)])
        finally:
            for vm in self.vms:
                for d in vm.disks:
                    if d.mirror is not None:
                        d.mirror.abandon()
                    try:
                        d.close()
                    except VdiskError as exc:
                        self.errors.append(f"{vm.name}: closing {d.path}: {exc}")
        self._progress_note("check")
        check = check_fleet(self) if not self.errors else {"passed": False, "skipped": "the run stopped on an error"}
        space = space_report(self)
        result = self._result(check, space, time.perf_counter() - t_all)
        if self._own_dir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return result

    def _result(self, check: dict, space: dict, wall: float) -> dict:
        s = self.spec
        phases = {name: {**summarize(list(ph.recorders.values()), ph.elapsed),
                         "series": series(list(ph.recorders.values()), ph.elapsed)}
                  for name, ph in self.phases.items()}
        cps = [x for vm in self.vms for x in vm.checkpoint_seconds]
        forks = sorted(vm.fork_seconds for vm in self.vms if vm.number < s.fork.vms)
        per_vm = []
        for vm in self.vms:
            item = {"name": vm.name, "number": vm.number, "clone": vm.number >= s.fork.vms, "deleted": vm.deleted,
                    "error": vm.error, "fork_s": round(vm.fork_seconds, 6),
                    "checkpoint_s": [round(x, 6) for x in vm.checkpoint_seconds],
                    "disks": [{"path": os.path.relpath(d.path, self.workdir), "format": d.format,
                               "checkpoints": sorted(d.checkpoints)} for d in vm.disks],
                    "phases": {name: summarize([ph.recorders[vm.name]], ph.elapsed)
                               for name, ph in self.phases.items() if vm.name in ph.recorders},
                    "space": space["per_vm"].get(vm.name), "events": vm.events}
            per_vm.append(item)
        return {
            "spec": s.name, "spec_file": s.path, "workdir": self.workdir if self.keep else None,
            "vms": s.fork.vms, "fork_method": s.fork.method, "format": self.layout.format,
            "disks_per_vm": s.fork.disks, "golden": {"size": self.golden.size if self.golden else None,
                                                     "data_blocks": self.golden.count() if self.golden else 0},
            "wall_s": round(wall, 3),
            "fork": {"total_s": round(self.fork_total, 6), "per_vm_mean_s": round(sum(forks) / len(forks), 6) if forks else 0,
                     "per_vm_max_s": round(forks[-1], 6) if forks else 0},
            "checkpoint": {"count": len(cps), "mean_s": round(sum(cps) / len(cps), 6) if cps else 0,
                           "max_s": round(max(cps), 6) if cps else 0},
            "phases": phases, "space": space["fleet"], "events": self.event_log,
            "errors": self.errors, "check": check,
            "passed": not self.errors and bool(check.get("passed")),
            "per_vm": per_vm,
        }


def upgrade_token(vm: VM) -> int:
    from .model import UPGRADE

    w = vm.workload
    version = w.version if w is not None else 0
    return UPGRADE | (version & 0xFFFFFFFF)


def run(spec: FleetSpec, workdir: str | None = None, *, keep: bool = False, progress: ProgressFn | None = None) -> dict:
    """Run ``spec`` (in ``workdir``, kept, or a temporary directory removed at the end
    unless ``keep``) and return the result; :class:`FleetFailed` is not raised here:
    the caller decides (``result["passed"]``)."""
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        if os.listdir(workdir):
            raise VdiskError(f"{workdir}: the fleet's work directory must be empty")
    return Fleet(spec, workdir, keep=keep, progress=progress).run()
