"""``vdisk check``: an image's metadata, checksums and whole backing chain."""

from __future__ import annotations

import os

import click

from . import CONTEXT_SETTINGS

from ..errors import NotSupported, UsageError
from .options import (force_share_option, format_option, open_image, output_option, unsafe_backing_option)
from .output import emit

#: ``check --output json`` keys of one image: qemu-img check's, then vdisk's own
CHECK_JSON_KEYS = (
    "filename",
    "format",
    "check-errors",
    "image-end-offset",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "vdisk-result",
    "vdisk-leaked-clusters",
    "vdisk-checked-clusters",
    "vdisk-corruption-messages",
    "vdisk-leak-messages",
    "vdisk-repaired",
)


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
    releases them).  Repairs apply to FILENAME only; after a repair the counts
    describe the repaired image (and the *-fixed counts what was fixed), as
    qemu-img reports them.

    Exit codes: 0 clean, 2 corruptions found, 3 only leaked clusters, 1 error
    (e.g. the format has no check, as raw, or the chain cannot be opened).

    --output json prints what qemu-img check --output json prints, with the same
    keys.  Keys qemu-img prints have qemu-img's names and meaning; vdisk's own
    keys start with "vdisk-".  Every key is always present, for every format
    (where qemu-img leaves out a count that is 0, vdisk prints 0).  Bytes of a
    file name that are not UTF-8 print as U+FFFD, as qemu-img prints them.

    \b
    JSON keys (qemu-img's):
      filename, format, check-errors (always 0: an error that stops the
      check is exit 1), image-end-offset (end of the image in its file),
      corruptions, leaks, corruptions-fixed, leaks-fixed,
      total-clusters (guest clusters), allocated-clusters (guest clusters of
      this image holding data), fragmented-clusters, compressed-clusters
    JSON keys (vdisk's):
      vdisk-result ("clean" | "leaks" | "corrupt"), vdisk-leaked-clusters,
      vdisk-checked-clusters (clusters whose metadata and checksums were
      verified, in all snapshots), vdisk-corruption-messages,
      vdisk-leak-messages, vdisk-repaired (messages),
      vdisk-backing: the same keys (but vdisk-backing) for each backing image,
      top to base.
    """
    if repair and force_share:
        raise UsageError("-r repairs the image and -U shares it with a writer: not both")
    from ..ops.holds import HOLD_FORMATS, release_stale_holds, stale_holds
    from ..session import SESSION
    from ..ops.mapping import cluster_stats, json_safe

    results = []
    before = None
    with open_image(filename, fmt=fmt, read_only=repair is None, unsafe_backing=unsafe_backing,
                    force_share=force_share) as top:
        for depth, img in enumerate(top.chain()):
            try:
                if depth == 0 and repair:
                    # what there was to fix: qemu-img reports the counts fixed and left
                    before = img.check(repair=None)
                res = img.check(repair=repair if depth == 0 else None)
            except NotSupported:
                if depth == 0:
                    raise NotSupported(f"{filename}: the {img.format} format has no consistency check") from None
                continue
            results.append((img, res, bool(repair) and depth == 0, cluster_stats(img),
                            _image_end_offset(img, res)))
    entries = []
    worst = 0
    for img, res, repaired_here, stats, end in results:
        leaks = list(res.leaks)
        repaired = list(res.repaired)
        released = []
        if img.format in HOLD_FORMATS and img.snapshot is None:
            if repaired_here:
                released = release_stale_holds(img.filename, SESSION)
                repaired += released
            leaks += [f"a hold that nothing uses: {h.reason}" for h in stale_holds(img.filename, SESSION)]
        code = 2 if res.corruptions else 3 if leaks else 0
        if code == 2 or (code == 3 and worst != 2):
            worst = code
        fixed_corruptions = fixed_leaks = 0
        if repaired_here and before is not None:
            fixed_corruptions = max(0, len(before.corruptions) - len(res.corruptions))
            fixed_leaks = max(0, len(before.leaks) - len(res.leaks)) + len(released)
        entries.append({
            "filename": img.filename if entries else filename,
            "format": img.format,
            "check-errors": 0,
            "image-end-offset": end,
            "corruptions": len(res.corruptions),
            "leaks": len(leaks),
            "corruptions-fixed": fixed_corruptions,
            "leaks-fixed": fixed_leaks,
            "total-clusters": stats["total"],
            "allocated-clusters": stats["allocated"],
            "fragmented-clusters": stats["fragmented"],
            "compressed-clusters": stats["compressed"],
            "vdisk-result": {0: "clean", 2: "corrupt", 3: "leaks"}[code],
            "vdisk-leaked-clusters": res.leaked_clusters,
            "vdisk-checked-clusters": res.checked_clusters,
            "vdisk-corruption-messages": list(res.corruptions),
            "vdisk-leak-messages": leaks,
            "vdisk-repaired": repaired,
        })
    data = dict(entries[0])
    data["vdisk-backing"] = entries[1:]
    emit(output, json_safe(data) if output == "json" else data, _render_check)
    ctx.exit(worst)


def _image_end_offset(img, res) -> int:
    """Where the image ends in its file: what the driver reports, else the file's
    size rounded up to a whole cluster (qemu-img: the end of the last cluster in use);
    0 for an image that is not a file (in a pool)."""
    end = getattr(res, "image_end_offset", None)
    if end is not None:
        return end
    cs = img.cluster_size or 1
    try:
        size = img.driver.host.size()
    except (AttributeError, OSError):
        try:
            size = os.path.getsize(img.filename)
        except OSError:
            return 0
    return -(-size // cs) * cs


def _render_check(d: dict) -> str:
    out = [_render_check_one(d)]
    for b in d.get("vdisk-backing", ()):
        out.append(f"\nBacking image {b['filename']} ({b['format']}):\n" + _render_check_one(b))
    return "\n".join(out)


def _render_check_one(d: dict) -> str:
    """qemu-img check's text, then what vdisk checked."""
    lines = [f"ERROR {m}" for m in d["vdisk-corruption-messages"]]
    lines += [f"Leak: {m}" for m in d["vdisk-leak-messages"]]
    lines += [f"Repaired: {m}" for m in d["vdisk-repaired"]]
    if lines:
        lines.append("")
    if d["leaks-fixed"] or d["corruptions-fixed"]:
        lines.append(f"The following inconsistencies were found and repaired:\n\n"
                     f"    {d['leaks-fixed']} leaked clusters\n    {d['corruptions-fixed']} corruptions\n")
    if d["corruptions"]:
        lines.append(f"{d['corruptions']} errors were found on the image.")
        lines.append("Data may be corrupted, or further writes to the image may corrupt it.")
    if d["leaks"]:
        if d["corruptions"]:
            lines.append("")
        n = d["vdisk-leaked-clusters"] or d["leaks"]
        lines.append(f"{n} leaked clusters were found on the image.")
        lines.append("This means waste of disk space, but no harm to data.")
    if not d["corruptions"] and not d["leaks"]:
        lines.append("No errors were found on the image.")
    total = d["total-clusters"]
    if total:
        alloc, frag, comp = d["allocated-clusters"], d["fragmented-clusters"], d["compressed-clusters"]
        def pct(n: int, of: int) -> float:
            return 100.0 * n / of if of else 0.0

        lines.append(f"{alloc}/{total} = {pct(alloc, total):.2f}% allocated, {pct(frag, alloc):.2f}% fragmented, "
                     f"{pct(comp, alloc):.2f}% compressed clusters")
    if d["image-end-offset"]:
        lines.append(f"Image end offset: {d['image-end-offset']}")
    if d["vdisk-checked-clusters"]:
        lines.append(f"{d['vdisk-checked-clusters']} clusters checked (metadata and data checksums, all snapshots)")
    return "\n".join(lines)
