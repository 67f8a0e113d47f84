"""``vdisk fleet``: the fleet simulator (:mod:`vdisk.fleet`, spec format in
formats/fleet.md).

    vdisk fleet run SPEC [--vms N] [--duration S] [--scale F] [--set KEY=VALUE ...]
                         [--dir DIR] [--keep] [--output human|json] [--report FILE.html]
    vdisk fleet validate SPEC [...the same overrides]
    vdisk fleet iolog TRACE OUT --device PATH [--timed]

``run`` exits 0 when the run finished and its model check passed, 1 otherwise.
"""

from __future__ import annotations

import sys
import time

import click

from . import CONTEXT_SETTINGS
from .options import output_option


class _FleetGroup(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):
        from vdisk.cli import remember_command

        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest


@click.group(cls=_FleetGroup, context_settings=CONTEXT_SETTINGS)
def fleet() -> None:
    """Simulate a fleet of VMs forked from one golden image: a boot storm replaying a
    recorded trace, steady workloads (trace replay, random 8K 70/30, log append with
    fsync, idle with bursts, OS upgrade) and timed events (checkpoint, restore, live
    clone, delete, migrate), all through vdisk's Python API; report IOPS, MB/s,
    latency, space per VM and fork/checkpoint times; and check every disk against a
    model of what its VM wrote (formats/fleet.md)."""


def _overrides(f):
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a spec key (a TOML value), e.g. --set fork.format=qcow2 "
                          "--set 'workload[0].ops=100'.  Repeatable.")(f)
    f = click.option("--scale", type=float, default=None,
                     help="Multiply every op count, after_ops, at and the duration by this factor.")(f)
    f = click.option("--duration", type=click.FloatRange(min=0), default=None,
                     help="Seconds the steady phase lasts at most (spec: duration).")(f)
    f = click.option("--vms", type=click.IntRange(min=1), default=None, help="Number of VMs (spec: fork.vms).")(f)
    return f


def _load(spec_path, vms, duration, scale, sets):
    from ..fleet import spec as spec_mod

    return spec_mod.load(spec_path, sets=tuple(sets), vms=vms, duration=duration, scale=scale)


class _ProgressLine:
    """One status line on stderr, redrawn in place (only on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = 0.0
        self._shown = False

    def __call__(self, p: dict) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.25 and p["phase"] not in ("golden", "fork", "check"):
            return
        self._last = now
        if p["phase"] in ("golden", "fork", "check"):
            what = {"golden": "writing the golden image", "fork": "forking the VMs",
                    "check": "checking every disk against the model"}[p["phase"]]
            text = f"fleet: {what}..."
        else:
            dur = f"/{p['duration_s']:g}" if p.get("duration_s") else ""
            text = (f"fleet: {p['phase']} {p['elapsed_s']:.1f}{dur} s, {p['vms']} VMs, {p['ops']} requests, "
                    f"{p['iops']:.0f} req/s" + (f", {p['errors']} errors" if p["errors"] else ""))
        sys.stderr.write("\r\x1b[K" + text)
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@fleet.command("run")
@_overrides
@click.option("--dir", "workdir", metavar="DIR", default=None,
              help="Work directory (must be empty or new; kept afterwards).  Default: a temporary one, removed.")
@click.option("--keep", is_flag=True, help="Keep the temporary work directory (its path is in the report).")
@click.option("--report", "report_path", metavar="FILE.html", default=None,
              help="Also write an HTML report with plots (throughput and p99 over time, space per VM).")
@output_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("-p", "--progress", "force_progress", is_flag=True,
              help="Show progress even when stderr is not a terminal.")
@click.argument("spec_path", metavar="SPEC")
def fleet_run(vms, duration, scale, sets, workdir, keep, report_path, output, quiet, force_progress, spec_path):
    """Run the fleet SPEC describes and report per VM and for the fleet.  Exit 0 when
    every VM ran and every disk, checkpoint and live clone matched the model, 1
    otherwise.  --output json prints the result document of formats/fleet.md."""
    from ..fleet import report, runner

    spec = _load(spec_path, vms, duration, scale, sets)
    line = _ProgressLine(not quiet and (force_progress or sys.stderr.isatty()))
    try:
        result = runner.run(spec, workdir, keep=keep, progress=line)
    finally:
        line.done()
    if report_path:
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(report.html_page(result))
    if output == "json":
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(report.human(result))
    if not result["passed"]:
        first = (result["errors"] or result["check"].get("mismatches") or ["the model check failed"])[0]
        click.echo(f"vdisk: fleet {spec.name} failed: {first}", err=True)
        sys.exit(1)


@fleet.command("validate")
@_overrides
@output_option()
@click.argument("spec_path", metavar="SPEC")
def fleet_validate(vms, duration, scale, sets, output, spec_path):
    """Check SPEC (and its traces) without running it; print what it would run."""
    import dataclasses

    from ..fleet import traces

    spec = _load(spec_path, vms, duration, scale, sets)
    paths = ([spec.boot.trace] if spec.boot else []) + [w.trace for w in spec.workloads if w.kind == "trace"]
    info = {}
    for p in paths:
        kind = spec.boot.format if spec.boot and p == spec.boot.trace else "auto"
        tr = traces.read_trace(p, kind)
        info[p] = {"kind": tr.kind, "requests": len(tr), "size": tr.size, "duration_us": tr.duration_us,
                   "ops": tr.counts()}
    doc = {"spec": dataclasses.asdict(spec), "traces": info}
    if output == "json":
        import json

        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{spec.path}: valid; {spec.fork.vms} VMs ({spec.fork.method}, {spec.fork.format}), "
               f"{len(spec.workloads)} workloads, {len(spec.events)} events, duration {spec.duration:g} s")
    for p, t in info.items():
        click.echo(f"  trace {p}: {t['kind']}, {t['requests']} requests over {t['duration_us'] / 1e6:.2f} s, "
                   f"disk {t['size']} bytes")


@fleet.command("iolog")
@click.option("--device", required=True, metavar="PATH", help="The file or device fio should replay onto.")
@click.option("--format", "kind", type=click.Choice(["auto", "vdisk", "msr"]), default="auto", show_default=True)
@click.option("--timed", is_flag=True, help="Keep the recorded gaps between requests (fio wait lines).")
@click.argument("trace_path", metavar="TRACE")
@click.argument("out_path", metavar="OUT")
def fleet_iolog(device, kind, timed, trace_path, out_path):
    """Convert TRACE (a vdisk trace or an MSR CSV) to fio's iolog version 2 in OUT, for
    `fio --read_iolog=OUT`: requests widened to 4 KiB blocks as the simulator replays
    them, discards left out."""
    from ..fleet import traces

    tr = traces.read_trace(trace_path, kind)
    n = traces.write_fio_iolog(tr, out_path, device, timed=timed)
    click.echo(f"{out_path}: {n} requests for {device}")
