"""Rendering a fleet run's result: the human summary, and an HTML page with inline SVG
plots (throughput and p99 latency over time for each phase, space per VM) drawn
here, so the report needs nothing installed and opens in any browser.

The result dict itself is the ``--output json`` document (keys documented in
formats/fleet.md).
"""

from __future__ import annotations

import html
import json

from ..sizes import format_size


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows under headers, columns as wide as their widest cell; ``right`` ones
    right-aligned."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                               for i, c in enumerate(row)).rstrip() for row in cells)


def human(r: dict) -> str:
    lines = [f"fleet {r['spec']}: {r['vms']} VMs, {r['fork_method']} clones ({r['format']}), "
             f"{r['disks_per_vm']} disk(s) each, golden {format_size(r['golden']['size'] or 0)}; wall {r['wall_s']:.1f} s",
             f"fork: {r['vms']} VMs in {r['fork']['total_s'] * 1000:.1f} ms "
             f"({r['fork']['per_vm_mean_s'] * 1000:.2f} ms each, max {r['fork']['per_vm_max_s'] * 1000:.2f} ms)"]
    if r["checkpoint"]["count"]:
        c = r["checkpoint"]
        lines.append(f"checkpoints: {c['count']}, {c['mean_s'] * 1000:.2f} ms on average, max {c['max_s'] * 1000:.2f} ms")
    lines.append("")
    rows = []
    for name, p in r["phases"].items():
        lat = p["latency_us"]
        rows.append([name, f"{p['elapsed_s']:.2f}", str(p["ops"]), f"{p['iops']:.0f}", f"{p['mb_per_s']:.1f}",
                     _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["p99_9"])])
    if rows:
        lines.append(table(["phase", "seconds", "requests", "IOPS", "MB/s", "p50 ms", "p99 ms", "p99.9 ms"], rows,
                           right=set(range(1, 8))))
        lines.append("")
    rows = []
    for vm in r["per_vm"]:
        sp = vm["space"] or {}
        cells = [vm["name"] + (" (clone)" if vm["clone"] else "") + (" (deleted)" if vm["deleted"] else "")]
        for name in r["phases"]:
            p = vm["phases"].get(name)
            cells += [f"{p['iops']:.0f}" if p else "-", _ms(p["latency_us"]["p99"]) if p else "-"]
        cells += [format_size(sp.get("unique_bytes", 0)), format_size(sp.get("shared_bytes", 0)),
                  f"{vm['fork_s'] * 1000:.2f}" if not vm["clone"] else "-", str(len(vm["events"]))]
        rows.append(cells)
    heads = ["vm"]
    for name in r["phases"]:
        heads += [f"{name} IOPS", f"{name} p99 ms"]
    heads += ["unique", "shared", "fork ms", "events"]
    if len(rows) > 40:  # a big fleet: the first and last twenty
        rows = rows[:20] + [["..."] + [""] * (len(heads) - 1)] + rows[-20:]
    lines.append(table(heads, rows, right=set(range(1, len(heads)))))
    sp = r["space"]
    lines.append("")
    lines.append(f"space: golden {format_size(sp['golden_bytes'])}, unique per VM {format_size(sp['unique_bytes_per_vm_mean'])} "
                 f"on average (max {format_size(sp['unique_bytes_per_vm_max'])}), all files "
                 f"{format_size(sp['physical_bytes'])} ({format_size(sp['physical_bytes_per_vm'])} per VM)")
    for e in r["errors"]:
        lines.append(f"error: {e}")
    c = r["check"]
    if c.get("passed"):
        lines.append(f"model check: passed ({c['images_checked']} images, {c['checkpoints_checked']} checkpoints, "
                     f"{c['live_clones_checked']} live clones, {c['blocks_checked']} blocks compared)")
    elif "skipped" in c:
        lines.append(f"model check: not run ({c['skipped']})")
    else:
        lines.append(f"model check: FAILED, {c['mismatch_count']} mismatches")
        for m in c["mismatches"][:20]:
            lines.append(f"  {m}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- SVG
W, H, PAD = 640, 220, 48


def _tick(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _line_plot(title: str, points: list[tuple[float, float]], ylabel: str, color: str) -> str:
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    xmax = max(xs) or 1.0
    ymax = max(ys) or 1.0
    iw, ih = W - 2 * PAD, H - 2 * PAD

    def sx(x):
        return PAD + iw * x / xmax

    def sy(y):
        return H - PAD - ih * y / ymax

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(points))
    ticks = "".join(f'<text x="{PAD - 6}" y="{sy(ymax * k / 4) + 4:.1f}" text-anchor="end" font-size="10">'
                    f'{_tick(ymax * k / 4)}</text><line x1="{PAD}" x2="{W - PAD}" y1="{sy(ymax * k / 4):.1f}" '
                    f'y2="{sy(ymax * k / 4):.1f}" stroke="#ddd"/>' for k in range(5))
    xt = "".join(f'<text x="{sx(xmax * k / 4):.1f}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">'
                 f'{_tick(xmax * k / 4)}</text>' for k in range(5))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">'
            f'<title>{html.escape(title)}</title>{ticks}{xt}'
            f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>'
            f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">seconds</text>'
            f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle" font-size="11">'
            f'{html.escape(ylabel)}</text>'
            f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/></svg>')


def _space_plot(per_vm: list[dict]) -> str:
    vms = [v for v in per_vm if v["space"] is not None and not v["deleted"]]
    if not vms:
        return "<p>space: no VMs left</p>"
    top = max((v["space"]["unique_bytes"] + v["space"]["shared_bytes"]) for v in vms) or 1
    n = len(vms)
    iw, ih = W - 2 * PAD, H - 2 * PAD
    bw = iw / n
    bars = []
    for i, v in enumerate(vms):
        u, s = v["space"]["unique_bytes"], v["space"]["shared_bytes"]
        x = PAD + i * bw
        hu, hs = ih * u / top, ih * s / top
        bars.append(f'<rect x="{x:.1f}" y="{H - PAD - hu:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{hu:.1f}" '
                    f'fill="#d62728"><title>{html.escape(v["name"])}: unique {format_size(u)}</title></rect>')
        bars.append(f'<rect x="{x:.1f}" y="{H - PAD - hu - hs:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{hs:.1f}" '
                    f'fill="#aec7e8"><title>{html.escape(v["name"])}: shared {format_size(s)}</title></rect>')
    ticks = "".join(f'<text x="{PAD - 6}" y="{H - PAD - ih * k / 4 + 4:.1f}" text-anchor="end" font-size="10">'
                    f'{html.escape(format_size(int(top * k / 4)))}</text>' for k in range(5))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img">'
            f'<title>space per VM</title>{ticks}'
            f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">space per VM: unique (red) and shared '
            f'(blue)</text>{"".join(bars)}'
            f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">{n} VMs</text></svg>')


def html_page(r: dict) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vdisk fleet {html.escape(r['spec'])}</title>"
             "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}pre{background:#f6f6f6;"
             "padding:1em;overflow:auto}svg{display:block;margin:1em 0}</style></head><body>",
             f"<h1>vdisk fleet: {html.escape(r['spec'])}</h1>",
             f"<p>{'model check passed' if r['passed'] else '<b>FAILED</b>'}</p>",
             f"<pre>{html.escape(human(r))}</pre>"]
    for name, p in r["phases"].items():
        s = p["series"]
        parts.append(f"<h2>{html.escape(name)} phase</h2>")
        parts.append(_line_plot(f"{name}: fleet IOPS", [(x["t"], x["iops"]) for x in s], "IOPS", "#1f77b4"))
        parts.append(_line_plot(f"{name}: fleet MB/s", [(x["t"], x["mb_per_s"]) for x in s], "MB/s", "#2ca02c"))
        parts.append(_line_plot(f"{name}: p99 latency", [(x["t"], x["p99_us"] / 1000) for x in s], "ms", "#d62728"))
    parts.append("<h2>space</h2>")
    parts.append(_space_plot(r["per_vm"]))
    parts.append("<h2>the result as JSON</h2>")
    parts.append(f"<pre>{html.escape(json.dumps({k: v for k, v in r.items() if k != 'per_vm'}, indent=1))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
