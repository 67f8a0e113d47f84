"""``vdisk check``: an image's metadata, checksums and whole backing chain."""

from __future__ import annotations

import click

from . import CONTEXT_SETTINGS

from ..errors import NotSupported, UsageError
from .options import (force_share_option, format_option, open_image, output_option, unsafe_backing_option)
from .output import emit


@click.command(context_settings=CONTEXT_SETTINGS)
@format_option()
@output_option()
@click.option("-r", "--repair", type=click.Choice(["leaks", "all"]), default=None, help="Repair leaks, or everything.")
@unsafe_backing_option()
@force_share_option()
@click.argument("filename")
@click.pass_context
def check(ctx, fmt, output, repair, unsafe_backing, force_share, filename):
    """Check an image's metadata and data checksums, and its whole backing chain:
    a backing file that is missing, loops or lies outside the allowed directories is
    an error (exit 1), and each backing image's metadata is checked too.  For a vdk
    image, holds on its snapshots whose holder is gone count as leaks (-r leaks
    releases them).  Repairs apply to FILENAME only.

    Exit codes: 0 clean, 2 corruptions found, 3 only leaked clusters, 1 error
    (e.g. the format has no check, as raw, or the chain cannot be opened).

    \b
    JSON keys: filename, format, result ("clean" | "leaks" | "corrupt"),
      corruptions, leaks (counts), leaked_clusters, corruption_messages,
      leak_messages, repaired (messages), checked_clusters,
      allocated_clusters, compressed_clusters; backing: the same keys for
      each backing image, top to base.
    """
    if repair and force_share:
        raise UsageError("-r repairs the image and -U shares it with a writer: not both")
    from ..ops.chain import release_stale_holds, stale_holds

    results = []
    with open_image(filename, fmt=fmt, read_only=repair is None, unsafe_backing=unsafe_backing,
                    force_share=force_share) as top:
        for depth, img in enumerate(top.chain()):
            try:
                res = img.check(repair=repair if depth == 0 else None)
            except NotSupported:
                if depth == 0:
                    raise NotSupported(f"{filename}: the {img.format} format has no consistency check") from None
                continue
            results.append((img, res, bool(repair) and depth == 0))
    entries = []
    worst = 0
    for img, res, stale_release in results:
        leaks = list(res.leaks)
        repaired = list(res.repaired)
        if img.format == "vdk" and img.snapshot is None:
            if stale_release:
                repaired += release_stale_holds(img.filename)
            leaks += [f"a hold that nothing uses: {h.reason}" for h in stale_holds(img.filename)]
        code = 2 if res.corruptions else 3 if leaks else 0
        if code == 2 or (code == 3 and worst != 2):
            worst = code
        entries.append({
            "filename": img.filename if entries else filename,
            "format": img.format,
            "result": {0: "clean", 2: "corrupt", 3: "leaks"}[code],
            "corruptions": len(res.corruptions),
            "leaks": len(leaks),
            "leaked_clusters": res.leaked_clusters,
            "corruption_messages": list(res.corruptions),
            "leak_messages": leaks,
            "repaired": repaired,
            "checked_clusters": res.checked_clusters,
            "allocated_clusters": res.allocated_clusters,
            "compressed_clusters": res.compressed_clusters,
        })
    data = dict(entries[0])
    data["backing"] = entries[1:]
    emit(output, data, _render_check)
    ctx.exit(worst)


def _render_check(d: dict) -> str:
    out = [_render_check_one(d)]
    for b in d.get("backing", ()):
        out.append(f"\nBacking image {b['filename']} ({b['format']}):\n" + _render_check_one(b))
    return "\n".join(out)


def _render_check_one(d: dict) -> str:
    lines = [f"ERROR {m}" for m in d["corruption_messages"]]
    lines += [f"Leak: {m}" for m in d["leak_messages"]]
    lines += [f"Repaired: {m}" for m in d["repaired"]]
    if lines:
        lines.append("")
    if d["corruptions"]:
        lines.append(f"{d['corruptions']} errors were found on the image.")
        lines.append("Data may be corrupted, or further writes to the image may corrupt it.")
    if d["leaks"]:
        if d["corruptions"]:
            lines.append("")
        n = d["leaked_clusters"] or d["leaks"]
        lines.append(f"{n} leaked clusters were found on the image.")
        lines.append("This means waste of disk space, but no harm to data.")
    if not d["corruptions"] and not d["leaks"]:
        lines.append("No errors were found on the image.")
    if d["checked_clusters"] or d["allocated_clusters"]:
        lines.append(
            f"{d['checked_clusters']} clusters checked; {d['allocated_clusters']} allocated, "
            f"{d['compressed_clusters']} compressed"
        )
    return "\n".join(lines)
