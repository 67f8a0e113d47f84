"""``vdisk pool create|info|ls|check|gc|similar|dedup``: a pool as a whole.

Every other command works on ``POOL/IMAGE`` as on a file; these work on the pool
(its directory).  The work is :mod:`vdisk.pool.admin`'s; this module only parses
and formats.
"""

from __future__ import annotations

import click

from vdisk.cli import CONTEXT_SETTINGS
from vdisk.cli.options import (
    output_option,
    parse_o_options,
    progress_option,
    quiet_option,
)
from vdisk.cli.output import emit, table
from vdisk.sizes import format_size

#: values under these keys are the user's or the format's own names: printed as they are
_KEEP_KEYS = {"labels", "settings"}


def json_keys(obj):
    """``obj`` with every dict key spelled with hyphens (``--output json`` style),
    except inside labels and settings."""
    if isinstance(obj, dict):
        return {k.replace("_", "-") if isinstance(k, str) else k: (v if k in _KEEP_KEYS else json_keys(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_keys(v) for v in obj]
    return obj


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


class _Progress:
    """``progress(done, total)`` for the admin functions, drawn by
    :func:`vdisk.cli.progress.progress_bar` once the total is known."""

    def __init__(self, label: str, force: bool, quiet: bool):
        self.label, self.force, self.quiet = label, force, quiet
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from vdisk.cli.progress import progress_bar

            self.bar = progress_bar(total, self.label, force=self.force, quiet=self.quiet).__enter__()
        self.bar.update(done - self.bar.done)

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.__exit__(None if ok else Exception)
            self.bar = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(exc_type is None)


class _PoolGroup(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):
        from vdisk.cli import remember_command

        name, cmd, rest = super().resolve_command(ctx, args)
        remember_command(ctx, cmd)
        return name, cmd, rest


@click.group(cls=_PoolGroup, context_settings=CONTEXT_SETTINGS)
def pool() -> None:
    """Create, inspect, check and clean up pools.

    A pool is a directory holding many images that share their data: every 4 KiB
    block is stored once across the pool (deduplication), a block similar to a
    stored one as a delta against it, the rest zstd-compressed.  Its images are
    POOL/IMAGE (POOL/IMAGE@SNAP for a snapshot) for every other command: create,
    convert -O pool, snapshot, clone (native, O(1), inside a pool), rm, mount, ...
    POOL may be s3://BUCKET[/PREFIX], a pool on an S3 object store, whose images
    have one writer at a time (a lease).  (formats/pool.md describes the layout.)"""


# ---------------------------------------------------------------------- create
@pool.command("create")
@click.option("-o", "options", multiple=True, metavar="OPTIONS",
              help="dedup=on|off (default on), delta=on|off (default on), zstd_level=N (1-22, default 3).")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_create(options, output, pool_dir):
    """Create an empty pool in the directory POOL (created; it must be empty if it
    exists), or at s3://BUCKET[/PREFIX] in an S3 object store (the bucket is made if
    missing; the prefix must hold no object; endpoint and credentials from
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    ~/.aws).

    \b
    JSON: {pool, pool-id, settings: {dedup, delta, compression, zstd_level}}
    """
    from vdisk.errors import UsageError
    from vdisk.pool.admin import parse_settings
    from vdisk.pool.admin import pool_create as create

    parsed = parse_o_options(options)
    raw = dict(parsed.pop("options", {}))
    if "compression" in parsed:
        raw["compression"] = parsed.pop("compression")
    if parsed:
        raise UsageError(f"unknown pool option(s): {', '.join(sorted(parsed))} (known: dedup, delta, zstd_level)")
    res = create(pool_dir, parse_settings(raw))

    def human(r):
        s = r["settings"]
        return (f"created pool {r['pool']} (dedup {'on' if s['dedup'] else 'off'}, "
                f"delta {'on' if s['delta'] else 'off'}, zstd level {s['zstd_level']})")

    emit(output, json_keys(res) if output == "json" else res, human)


# ---------------------------------------------------------------------- info
@pool.command("info")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_info(output, pool_dir):
    """Space and sharing of the whole pool and of each image and snapshot.

    Bytes are stored bytes (compressed; tree nodes and sketches included), each blob
    counted once.  "Unique" bytes of an image (its live state and its snapshots
    together), of a live state or of a snapshot are reached by nothing else in the
    pool: what deleting it and then `vdisk pool gc` frees (as `rbd du`, ZFS
    used/written); shared = referenced - unique.  The dedup ratio counts a block
    shared by snapshots and clones of one lineage once (as ZFS's dedupratio).

    \b
    JSON keys:
      pool, pool-id, generation, settings, images, snapshots, hidden-snapshots,
      clones, lineage: [{image, parent: "IMAGE@SNAP"}],
      objects: {config|generations|packs|index|other|temporary: {count, bytes}},
      physical-bytes (every object), logical-bytes (images' sizes),
      used-bytes (blobs any state reaches), unreferenced-bytes (pack bytes no
      state reaches: gc frees or repacks them), referenced-bytes (sum over
      images of what each live state reaches),
      data-blobs, data-bytes, raw-blobs, zstd-blobs, delta-blobs, delta-bytes,
      node-blobs, node-bytes, sketch-blobs, sketch-bytes,
      referenced-blocks (blocks mapped by all states, lineage sharing once),
      mapped-blocks (each state's blocks in each), dedup-ratio
      (referenced-blocks / data-blobs), compression-ratio (data-blobs * 4096 /
      data-bytes),
      per-image: [{image, size, parent, live: {referenced-bytes, unique-bytes,
      shared-bytes}, total: {...}, snapshots: [{id, name, hidden, size,
      referenced-bytes, unique-bytes, shared-bytes}]}]
    """
    from vdisk.pool.admin import pool_info as info

    res = info(pool_dir)
    emit(output, json_keys(res) if output == "json" else res, _render_info)


def _render_info(r: dict) -> str:
    s = r["settings"]
    o = r["objects"]
    on = {True: "on", False: "off"}
    lines = [
        f"pool:         {r['pool']} (id {r['pool_id']}, generation {r['generation']})",
        (f"settings:     dedup {on[bool(s.get('dedup'))]}, delta {on[bool(s.get('delta'))]}, "
        f"zstd level {s.get('zstd_level')}"),
        (f"images:       {r['images']} ({r['snapshots']} snapshots, {r['hidden_snapshots']} hidden, "
        f"{r['clones']} native clones)"),
        (f"physical:     {format_size(r['physical_bytes'])} (packs {format_size(o['packs']['bytes'])} in "
        f"{o['packs']['count']}, index {format_size(o['index']['bytes'])}, catalog "
        f"{format_size(o['generations']['bytes'] + o['config']['bytes'])})"),
        f"logical:      {format_size(r['logical_bytes'])}",
        (f"used:         {format_size(r['used_bytes'])} (data {format_size(r['data_bytes'])}, tree nodes "
        f"{format_size(r['node_bytes'])}, sketches {format_size(r['sketch_bytes'])}); unreferenced "
        f"{format_size(r['unreferenced_bytes'])}"),
        f"referenced:   {format_size(r['referenced_bytes'])} by the live states",
        (f"data blobs:   {r['data_blobs']} ({r['zstd_blobs']} zstd, {r['raw_blobs']} raw, {r['delta_blobs']} "
        f"delta-coded in {format_size(r['delta_bytes'])})"),
        f"dedup ratio:  {r['dedup_ratio']:.2f} ({r['referenced_blocks']} blocks referenced)",
        f"compression:  {r['compression_ratio']:.2f}",
    ]
    if r["per_image"]:
        rows = []
        for i in r["per_image"]:
            live, tot = i["live"] or {}, i["total"] or {}
            rows.append([i["image"], format_size(i["size"] or 0), i["parent"] or "-",
                         format_size(live.get("referenced_bytes", 0)), format_size(tot.get("unique_bytes", 0)),
                         format_size(tot.get("shared_bytes", 0)), format_size(live.get("unique_bytes", 0))])
            for sn in i["snapshots"]:
                name = f"  @{sn['name']}" + (" (deleted, held)" if sn["hidden"] else "")
                rows.append([name, format_size(sn["size"] or 0), "", format_size(sn["referenced_bytes"]),
                             format_size(sn["unique_bytes"]), format_size(sn["shared_bytes"]), ""])
        lines += ["", table(["IMAGE", "SIZE", "PARENT", "REFERENCED", "UNIQUE", "SHARED", "LIVE UNIQUE"], rows,
                            right={1, 3, 4, 5, 6})]
    return "\n".join(lines)


# ---------------------------------------------------------------------- ls
@pool.command("ls")
@click.option("--tree", is_flag=True, help="Draw the lineage: each image, its snapshots, the clones made of them.")
@click.option("-l", "--long", "long_", is_flag=True, help="Also the id, creation time, snapshots and backing file.")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_ls(tree, long_, output, pool_dir):
    """List the images of POOL: size, owner, labels and parent (IMAGE@SNAP of a
    native clone).

    \b
    JSON: a list of {name, id, size, created, owner, labels, parent,
      parent-image, parent-snapshot-id, backing: {filename, format, snapshot} or
      null, snapshots: [{id, name, size, created, hidden, holders}]};
      with --tree, the lineage instead: [{image, size, snapshots: [{id, name,
      hidden, clones: [the same, recursively]}]}], roots first.
    """
    from vdisk.pool.admin import lineage_tree
    from vdisk.pool.admin import pool_ls as ls

    images = ls(pool_dir)
    if tree:
        forest = lineage_tree(images)
        emit(output, json_keys(forest) if output == "json" else forest, lambda f: _render_tree(f, long_))
        return
    emit(output, json_keys(images) if output == "json" else images, lambda i: _render_ls(i, long_))


def _labels(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def _render_ls(images: list[dict], long_: bool) -> str:
    if not images:
        return "no images"
    import datetime

    headers = ["NAME", "SIZE", "OWNER", "LABELS", "PARENT"]
    if long_:
        headers = ["NAME", "SIZE", "OWNER", "LABELS", "PARENT", "SNAPSHOTS", "CREATED", "ID", "BACKING"]
    rows = []
    for i in images:
        row = [i["name"], format_size(i["size"] or 0), i["owner"] or "-", _labels(i["labels"]), i["parent"] or "-"]
        if long_:
            when = datetime.datetime.fromtimestamp(i["created"]).strftime("%Y-%m-%d %H:%M:%S") if i["created"] else "-"
            snaps = ",".join(s["name"] + ("(hidden)" if s["hidden"] else "") for s in i["snapshots"]) or "-"
            b = i["backing"]
            row += [snaps, when, i["id"] or "-", f"{b['filename']} ({b['format']})" if b else "-"]
        rows.append(row)
    return table(headers, rows, right={1})


def _render_tree(forest: list[dict], long_: bool) -> str:
    if not forest:
        return "no images"
    lines: list[str] = []

    def image(t: dict, tail: str, first: str) -> None:
        """``t``'s line after ``first``; its snapshots' lines after ``tail``."""
        lines.append(f"{first}{t['image']} ({format_size(t['size'] or 0)})")
        snaps = [s for s in t["snapshots"] if s["clones"] or long_]
        for k, s in enumerate(snaps):
            last = k == len(snaps) - 1
            name = s["name"] if not s["hidden"] else f"#{s['id']} ({s['name']}, deleted, held)"
            lines.append(f"{tail}{'└── ' if last else '├── '}@{name}")
            inner = tail + ("    " if last else "│   ")
            for c, child in enumerate(s["clones"]):
                clast = c == len(s["clones"]) - 1
                image(child, inner + ("    " if clast else "│   "), inner + ("└── " if clast else "├── "))

    for t in forest:
        image(t, "", "")
    return "\n".join(lines)


# ---------------------------------------------------------------------- check
@pool.command("check")
@click.option("-r", "--repair", type=click.Choice(["leaks"]), default=None,
              help="Free the leaks found (runs `vdisk pool gc`, which needs the pool to itself).")
@output_option()
@progress_option()
@quiet_option()
@click.argument("pool_dir", metavar="POOL")
@click.pass_context
def pool_check(ctx, repair, output, progress, quiet, pool_dir):
    """Check the whole pool: every catalog generation kept parses; every tree of
    every image and snapshot (in every generation) walks; every node, data blob,
    delta base and sketch decodes and matches its checksum; every pack's directory
    is sound and lists the blobs the trees name; the index segments are sound.

    Leaks are objects the newest generation does not need: packs no tree reaches
    (a removed image's, a crashed writer's), index segments no longer listed,
    temporary files older than an hour.  A pack a writer running now has not
    committed yet shows as a leak too.

    Exit codes (as qemu-img check): 0 clean, 2 corruptions found, 3 only leaks,
    1 error.

    \b
    JSON keys:
      pool, result ("clean" | "leaks" | "corrupt"), corruptions, leaks (counts),
      leaked-objects, leaked-bytes, reclaimable-bytes (unreachable blobs in packs
      that hold live ones: gc repacks them when under half live), generations,
      images, roots, packs, nodes, blobs, entries, index-segments,
      corruption-messages, leak-messages, leaks-fixed, repaired (messages)
    """
    from vdisk.pool.admin import pool_check as check

    with _Progress("checking", progress, quiet or output == "json") as bar:
        res = check(pool_dir, repair=repair, progress=bar)
    data = res.to_json()
    if not quiet or output == "json":
        emit(output, data, _render_check)
    ctx.exit(res.exit_code)


def _render_check(d: dict) -> str:
    lines = [f"ERROR {m}" for m in d["corruption-messages"]]
    lines += [f"Leak: {m}" for m in d["leak-messages"]]
    lines += [f"Repaired: {m}" for m in d["repaired"]]
    if lines:
        lines.append("")
    if d["corruptions"]:
        lines.append(f"{d['corruptions']} errors were found in the pool.")
        lines.append("Data may be corrupted, or further writes to the pool may corrupt it.")
    if d["leaks"]:
        lines.append(f"{d['leaked-objects']} leaked objects ({format_size(d['leaked-bytes'])}) were found in the pool.")
        lines.append("This means waste of space, but no harm to data (vdisk pool gc frees them).")
    if not d["corruptions"] and not d["leaks"]:
        lines.append("No errors were found in the pool.")
    lines.append(f"{d['generations']} generations, {d['images']} images ({d['roots']} trees), {d['nodes']} tree "
                 f"nodes, {d['blobs']} blobs in {d['packs']} packs, {d['index-segments']} index segments checked")
    if d["reclaimable-bytes"]:
        lines.append(f"{format_size(d['reclaimable-bytes'])} in packs that hold live data too are unreachable")
    return "\n".join(lines)


# ---------------------------------------------------------------------- gc
@pool.command("gc")
@click.option("-n", "--dry-run", is_flag=True, help="Change nothing; report what would be freed.")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_gc(dry_run, output, pool_dir):
    """Free what no image or snapshot of POOL needs: packs no tree reaches are
    deleted, packs less than half live are repacked (their live blobs copied, the
    trees that reach them rewritten, sharing kept), index segments no longer listed
    and temporary files older than an hour are deleted.  Refused while any image of
    the pool is open (gc needs the pool to itself); a crash during gc loses nothing.
    On an object store (s3://) "open" means a process that renewed its
    announcement in locks/gc/ within the lease ttl (VDISK_S3_LEASE_TTL), and gc
    also takes every image's lease (refused, naming the holder, while one is held)
    and commits a generation naming itself as every image's writer before it
    marks: a writer paused past the ttl then fails its next commit ("lost its
    lease") instead of committing data gc freed (formats/pool.md 13.7).

    \b
    JSON keys:
      pool, dry-run, freed-bytes (physical bytes before - after), deleted-bytes,
      written-bytes, live-bytes, packs-before, packs-after, packs-deleted,
      packs-repacked, blobs-moved, deltas-rebased, nodes-rewritten,
      segments-rewritten, segments-deleted, generations-deleted,
      tmp-files-deleted, generation, messages
    """
    from vdisk.pool.admin import pool_gc as gc

    rep = gc(pool_dir, dry_run=dry_run)
    emit(output, rep.to_json(), _render_gc)


def _render_gc(d: dict) -> str:
    if d["dry-run"]:
        return (f"would free about {format_size(max(0, d['freed-bytes']))}: delete {d['packs-deleted']} packs, "
                f"repack {d['packs-repacked']}")
    parts = [f"{d['packs-deleted']} packs deleted"]
    if d["packs-repacked"]:
        parts.append(f"{d['packs-repacked']} repacked ({d['blobs-moved']} blobs moved, {d['deltas-rebased']} deltas "
                     f"rebased, {d['nodes-rewritten']} tree nodes rewritten)")
    if d["segments-deleted"] or d["segments-rewritten"]:
        parts.append(f"{d['segments-deleted']} index segments deleted, {d['segments-rewritten']} rewritten")
    if d["tmp-files-deleted"]:
        parts.append(f"{d['tmp-files-deleted']} temporary files deleted")
    return (f"freed {format_size(max(0, d['freed-bytes']))}: " + ", ".join(parts)
            + f"; {d['packs-after']} packs, {format_size(d['live-bytes'])} live")


# ---------------------------------------------------------------------- similar
@pool.command("similar")
@click.option("--against", metavar="POOL2", help="Compare every image of POOL with every image of POOL2 instead.")
@click.option("--exact", is_flag=True, help="Also the exact figures, from every block of both trees (slower).")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_similar(against, exact, output, pool_dir):
    """How much every pair of images of POOL shares, estimated from their sketches
    (a sample of each image's block hashes kept by its writer, formats/pool.md 8.2):
    Jaccard |A∩B|/|A∪B| and containment |A∩B|/|A| of their sets of distinct
    non-zero blocks.  Fast whatever the images' sizes: a few KiB read per image.
    Most similar pairs first.

    \b
    JSON: {pool, against, images, pairs: [{a, b, jaccard, a-in-b, b-in-a,
      shared-blocks, a-blocks, b-blocks (estimated distinct blocks), sampled,
      shift (the sample is 1 / 2**shift of the hashes), samples (sampled
      hashes in the union of both sketches), stderr (standard error of the
      Jaccard estimate; large for images of a few MiB), exact: {jaccard,
      a-in-b, b-in-a, shared-blocks, a-blocks, b-blocks} with --exact}]}
    """
    from vdisk.pool.admin import pool_similar as similar

    res = similar(pool_dir, against=against, exact=exact)
    emit(output, json_keys(res) if output == "json" else res, _render_similar)


def _render_similar(r: dict) -> str:
    if not r["pairs"]:
        return "no pairs of images"
    exact = any("exact" in p for p in r["pairs"])
    headers = ["A", "B", "JACCARD", "±", "A IN B", "B IN A", "SHARED BLOCKS"]
    if exact:
        headers += ["EXACT JACCARD", "EXACT A IN B", "EXACT B IN A"]
    rows = []
    for p in r["pairs"]:
        row = [p["a"], p["b"], _pct(p["jaccard"]), _pct(p["stderr"]), _pct(p["a_in_b"]), _pct(p["b_in_a"]),
               ("~" if p["sampled"] else "") + str(p["shared_blocks"])]
        if exact:
            e = p["exact"]
            row += [_pct(e["jaccard"]), _pct(e["a_in_b"]), _pct(e["b_in_a"])]
        rows.append(row)
    return table(headers, rows, right=set(range(2, len(headers))))


# ---------------------------------------------------------------------- dedup
@pool.command("dedup")
@click.option("--gc", "then_gc", is_flag=True, help="Then run `vdisk pool gc` to free the duplicates.")
@output_option()
@progress_option()
@quiet_option()
@click.argument("pool_dir", metavar="POOL")
def pool_dedup(then_gc, output, progress, quiet, pool_dir):
    """Deduplicate offline: blocks stored more than once (images written with
    dedup=off, or duplicates two writers stored at the same time) are made to share
    one copy, after a byte-for-byte comparison; the trees are rewritten (sharing
    between snapshots and clones kept) and committed.  The copies no longer used
    stay until `vdisk pool gc` (or --gc) frees them.  Refused while an image of the
    pool is being written.  On an object store (s3://) dedup, like gc, needs the
    pool to itself and fences every writer first (formats/pool.md 13.7).

    \b
    JSON: {dedup: {pool, images, data-blobs, duplicate-blobs, duplicate-bytes,
      collisions (equal hashes, different bytes: kept apart), deltas-rebased,
      nodes-rewritten, generation}, gc: the keys of `vdisk pool gc` or null}
    """
    from vdisk.pool.admin import pool_dedup as dedup

    with _Progress("deduplicating", progress, quiet or output == "json") as bar:
        res = dedup(pool_dir, gc=then_gc, progress=bar)
    data = {"dedup": res["dedup"].to_json(), "gc": res["gc"].to_json() if res["gc"] is not None else None}

    def human(d):
        r = d["dedup"]
        text = (f"{r['duplicate-blobs']} duplicate blobs ({format_size(r['duplicate-bytes'])}) of "
                f"{r['data-blobs']} now share a copy; {r['nodes-rewritten']} tree nodes rewritten")
        if r["collisions"]:
            text += f"; {r['collisions']} blobs with equal hashes but different bytes kept apart"
        if d["gc"] is not None:
            text += "\n" + _render_gc(d["gc"])
        elif r["duplicate-blobs"]:
            text += "\nvdisk pool gc frees them"
        return text

    if not quiet or output == "json":
        emit(output, data, human)


# ---------------------------------------------------------------------- replicate
@pool.command("replicate")
@click.option("--once", is_flag=True, help="Ship what is committed now, then exit.")
@click.option("--interval", type=float, default=1.0, show_default=True, metavar="S",
              help="Seconds between passes when running continuously.")
@output_option()
@quiet_option()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
def pool_replicate(once, interval, output, quiet, src, dst):
    """Ship every committed generation of the pool SRC to DST (a directory or
    s3://BUCKET[/PREFIX]: empty, or a replica of SRC made by this command),
    incrementally: the objects DST lacks, then the generation's commit point, last,
    so that DST always opens as a complete earlier generation of SRC.  Runs until
    SIGINT/SIGTERM, or with --once ships what is committed now.  One line per
    generation shipped: its objects, bytes, and lag (now - its commit time).  DST
    is read-only until `vdisk pool promote DST`.

    \b
    JSON (--once): {source, replica, pool-id, passes, generations, objects, bytes,
                    generation, lag, max-lag}
    """
    import sys

    from vdisk.pool.replicate import replicate, status_line

    def report(r):
        if not quiet and output != "json":
            click.echo(status_line(r))
            sys.stdout.flush()

    res = replicate(src, dst, once=once, interval=interval, report=report)

    def human(r):
        lag = "-" if r["lag"] is None else f"{r['lag']:.2f} s"
        return (f"{r['replica']}: generation {r['generation']} of {r['source']} "
                f"({r['generations']} shipped, {r['objects']} objects, {format_size(r['bytes'])}; last lag {lag})")

    if output == "json" or not quiet:
        emit(output, json_keys(res) if output == "json" else res, human)


@pool.command("promote")
@output_option()
@click.argument("pool_dir", metavar="POOL")
def pool_promote(output, pool_dir):
    """Make the replica POOL a pool of its own (failover): it opens for writing
    from its newest shipped generation on.  Stop `vdisk pool replicate` first.

    \b
    JSON: {pool, pool-id, was-replica-of, generation}
    """
    from vdisk.pool.replicate import promote

    res = promote(pool_dir)
    emit(output, json_keys(res) if output == "json" else res,
         lambda r: f"promoted {r['pool']} (was a replica of {r['was_replica_of']}) at generation {r['generation']}")
