"""What ``vdisk info`` and ``vdisk map`` report: plain dicts, and their human rendering.

The dicts are the stable JSON output (``--output json``); keys are snake_case.

``image_info`` keys (always present, in this order; drivers may add more after them):

=====================  =====================================================================
filename               the path the image was opened by
format                 ``raw``, ``vdk``, ...
virtual_size           guest size in bytes
disk_size              host bytes the image file occupies (allocated blocks)
cluster_size           allocation granularity in bytes
compression            ``zstd``, ``zlib``, ... or null when off / not supported
read_only              whether it was opened read-only (info opens read-only)
backing_filename       the backing file as the image names it, or null
backing_format         its format, or null
backing_snapshot       the backing snapshot the image names (vdk clones: ``#ID``), or null
full_backing_filename  the backing file's resolved path, or null (also when not opened)
backing_snapshot_name  (only for a vdk backing snapshot named by id) its name
snapshots              list of {id, name, created (seconds since the epoch, float),
                       size, generation, unique_bytes (or null), holds, extra (dict)}
=====================  =====================================================================

``map_extents`` entries, like ``qemu-img map --output=json``, cover the range with no
gap; adjacent entries of the same kind are merged:

``start``, ``length``
    guest byte range.
``depth``
    index in the backing chain of the image that decides the range (0 = the top).
``present``
    some image in the chain holds the range (data, or an explicit zero).
``zero``
    the range reads as zeros.
``data``
    the range holds data (which may happen to be zeros).
``compressed``
    the data is stored compressed.
``offset``
    where the data starts in the host file of the image at ``depth``, or null.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any

from ..block import Image
from ..drivers.base import SnapshotInfo, Status
from ..sizes import format_size

INFO_KEYS = (
    "filename",
    "format",
    "virtual_size",
    "disk_size",
    "cluster_size",
    "compression",
    "read_only",
    "backing_filename",
    "backing_format",
    "backing_snapshot",
    "full_backing_filename",
    "snapshots",
)


def snapshot_dict(s: SnapshotInfo) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "created": s.created,
        "size": s.size,
        "generation": s.generation,
        "unique_bytes": s.unique_bytes,
        "holds": s.holds,
        "extra": dict(s.extra),
    }


def image_info(img: Image) -> dict[str, Any]:
    """The facts about one image (not its backing chain), as documented above."""
    raw = img.info()
    compression = raw.get("compression")
    if compression in ("none", ""):
        compression = None
    out: dict[str, Any] = {
        "filename": img.filename,
        "format": raw.get("format", img.format),
        "virtual_size": raw.get("virtual_size", img.size),
        "disk_size": raw.get("disk_size"),
        "cluster_size": raw.get("cluster_size", img.cluster_size),
        "compression": compression,
        "read_only": raw.get("read_only", img.read_only),
        "backing_filename": raw.get("backing_filename"),
        "backing_format": raw.get("backing_format"),
        "backing_snapshot": raw.get("backing_snapshot"),
        "full_backing_filename": raw.get("full_backing_filename"),
        "snapshots": [snapshot_dict(s) for s in img.snapshot_list()],
    }
    space = raw.get("space")
    if space:  # vdk: fill in what each snapshot alone holds
        unique = {s["id"]: s["unique_bytes"] for s in space.get("snapshots", [])}
        for s in out["snapshots"]:
            if s.get("unique_bytes") is None and s["id"] in unique:
                s["unique_bytes"] = unique[s["id"]]
    for key, value in raw.items():
        if key not in out:
            out[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def chain_info(img: Image) -> list[dict[str, Any]]:
    """``image_info`` for the image and each backing image, top first."""
    return [image_info(node) for node in img.chain()]


def _date(ts: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def render_info_human(info: dict[str, Any]) -> str:
    """``qemu-img info``-like text for one ``image_info`` dict."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual_size'])} ({info['virtual_size']} bytes)",
    ]
    if info.get("disk_size") is not None:
        lines.append(f"disk size: {format_size(info['disk_size'])}")
    lines.append(f"cluster_size: {info['cluster_size']}")
    if info.get("compression"):
        lines.append(f"compression: {info['compression']}")
    if info.get("backing_filename"):
        full = info.get("full_backing_filename")
        extra = f" (actual path: {full})" if full and full != info["backing_filename"] else ""
        lines.append(f"backing file: {info['backing_filename']}{extra}")
        lines.append(f"backing file format: {info['backing_format']}")
        if info.get("backing_snapshot"):
            name = info.get("backing_snapshot_name")
            shown = f"{name} ({info['backing_snapshot']})" if name and name != info["backing_snapshot"] else info["backing_snapshot"]
            lines.append(f"backing snapshot: {shown}")
    snaps = info.get("snapshots") or []
    if snaps:
        lines.append("Snapshot list:")
        with_unique = any(s.get("unique_bytes") is not None for s in snaps)
        rows = [("ID", "TAG", "DATE", "VM SIZE") + (("UNIQUE",) if with_unique else ())]
        for s in snaps:
            row = (str(s["id"]), s["name"], _date(s["created"]), format_size(s["size"]))
            if with_unique:
                row += (format_size(s["unique_bytes"]) if s.get("unique_bytes") is not None else "-",)
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    space = info.get("space")
    if space:
        lines.append("Space (host bytes; unique = what deleting it would free):")
        lines.append(f"    current state: {format_size(space['live_referenced_bytes'])} referenced, "
                     f"{format_size(space['live_unique_bytes'])} unique")
        for s in space.get("snapshots", []):
            lines.append(f"    snapshot {s['name']}: {format_size(s['referenced_bytes'])} referenced, "
                         f"{format_size(s['unique_bytes'])} unique")
        if space.get("hidden_snapshots_bytes"):
            lines.append(f"    deleted snapshots kept for linked clones: "
                         f"{format_size(space['hidden_snapshots_bytes'])}")
    extra = {k: v for k, v in info.items() if k not in INFO_KEYS and k not in ("space", "backing_snapshot_name")}
    if extra:
        lines.append("Format specific information:")
        for k, v in extra.items():
            if isinstance(v, dict) and v:
                if k != "format_specific":
                    lines.append(f"    {k.replace('_', ' ')}:")
                indent = "    " if k == "format_specific" else "        "
                for k2, v2 in v.items():
                    lines.append(f"{indent}{str(k2).replace('_', ' ')}: {_human_value(v2)}")
            else:
                lines.append(f"    {k.replace('_', ' ')}: {_human_value(v)}")
    return "\n".join(lines)


def _human_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_human_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_human_value(x) for x in v)
    return str(v)


def map_extents(img: Image, start: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    """The guest range ``[start, start+length)`` as ``qemu-img map``-style entries
    (see the module docstring), resolved through the backing chain."""
    if length is None:
        length = img.size - start
    length = max(0, min(length, img.size - start))
    if length == 0:
        return []
    bottom = sum(1 for _ in img.chain()) - 1
    out: list[dict[str, Any]] = []
    for ext in img.block_status(start, length, chain=True):
        if ext.length <= 0:
            continue
        depth = ext.depth if ext.depth >= 0 else bottom
        data = ext.status == Status.DATA
        entry = {
            "start": ext.offset,
            "length": ext.length,
            "depth": depth,
            "present": ext.status != Status.UNALLOCATED and ext.depth >= 0,
            "zero": not data,
            "data": data,
            "compressed": bool(ext.compressed),
            "offset": ext.host_offset if data else None,
        }
        if out:
            p = out[-1]
            same = all(p[k] == entry[k] for k in ("depth", "present", "zero", "data", "compressed"))
            contiguous = p["start"] + p["length"] == entry["start"] and (
                (p["offset"] is None and entry["offset"] is None)
                or (p["offset"] is not None and entry["offset"] is not None and p["offset"] + p["length"] == entry["offset"])
            )
            if same and contiguous:
                p["length"] += entry["length"]
                continue
        out.append(entry)
    return out


def render_map_human(img: Image, extents: list[dict[str, Any]]) -> str:
    """``qemu-img map``-like text: the ranges that hold data, where they live and in which file."""
    names = [node.filename for node in img.chain()]
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in extents:
        if not e["data"]:
            continue
        where = "compressed" if e["compressed"] or e["offset"] is None else f"{e['offset']:#x}"
        name = names[e["depth"]] if 0 <= e["depth"] < len(names) else "?"
        lines.append(f"{e['start']:<#16x}{e['length']:<#16x}{where:<16}{name}")
    return "\n".join(lines)
