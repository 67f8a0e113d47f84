"""What ``vdisk info`` and ``vdisk map`` report: plain dicts, their ``--output json``
form, and their human rendering.

Two forms.  ``image_info`` and ``map_extents`` are the Python API: dicts with
snake_case keys, documented below.  ``info_json``, ``chain_info_json`` and
``map_json`` turn them into what ``--output json`` prints: qemu-img's JSON, so that a
tool written for ``qemu-img info/map/check --output json`` reads vdisk's output.  The
JSON conventions, shared by every command's ``--output json`` (see
:func:`json_safe`, :data:`JSON_CONVENTIONS`):

- every key qemu-img prints keeps qemu-img's name, type and place (kebab-case);
- every key qemu-img does not have is vdisk's own and starts with ``vdisk-``;
  nested keys of vdisk's own objects are kebab-case without the prefix, and so are
  the keys of ``format-specific.data`` of vdisk's own format (vdk), which qemu-img
  does not know (for qcow2, ``data`` holds qemu-img's keys and ``vdisk-`` ones);
- the structure is the same for every format: every key is always present, and
  where qemu-img leaves a key out (no backing file, no host offset, ...) vdisk
  prints ``null``;
- strings are valid Unicode: bytes of a file name that are not UTF-8 are printed
  as U+FFFD, one per byte (as qemu-img does).

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
                       size, generation, unique_bytes (or null), holds, extra (dict),
                       holders (list of {image_id, path})}
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
    where the range is stored in the host file of the image at ``depth`` (data, or
    zeros the format keeps allocated), or null.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import os
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
        "holders": [{"image_id": h.image_id, "path": h.path} for h in s.holders],
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
            "offset": ext.host_offset if ext.status != Status.UNALLOCATED else None,
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


# ------------------------------------------------------------------------ --output json
#: The conventions of every ``--output json`` (info, map, check, measure), for --help.
JSON_CONVENTIONS = (
    "Keys qemu-img prints have qemu-img's names and meaning; vdisk's own keys start "
    "with 'vdisk-'.  Every key is always present, for every format: where qemu-img "
    "leaves a key out, vdisk prints null.  Bytes of a file name that are not UTF-8 "
    "print as U+FFFD, as qemu-img prints them."
)

#: the order of ``info --output json`` keys: qemu-img's, then vdisk's own
INFO_JSON_KEYS = (
    "virtual-size",
    "filename",
    "format",
    "actual-size",
    "cluster-size",
    "dirty-flag",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
    "vdisk-compression",
    "vdisk-read-only",
    "vdisk-backing-snapshot",
    "vdisk-backing-snapshot-name",
    "vdisk-space",
)

#: keys of one snapshot in ``info --output json``
SNAPSHOT_JSON_KEYS = (
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
    "icount",
    "vdisk-size",
    "vdisk-generation",
    "vdisk-unique-bytes",
    "vdisk-holds",
    "vdisk-holders",
)

#: keys of one ``map --output json`` entry
MAP_JSON_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset", "vdisk-compressed")

#: format-specific ``data`` keys qemu-img prints, per format it knows; a driver's
#: other keys get the ``vdisk-`` prefix there.  Formats not listed here (vdk) are
#: vdisk's own: their keys are printed without a prefix.
QEMU_FORMAT_DATA_KEYS: dict[str, frozenset[str]] = {
    "qcow2": frozenset({"compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                        "extended-l2", "data-file", "data-file-raw", "bitmaps", "encrypt"}),
    "raw": frozenset(),
}

#: keys of ``image_info`` that the generic part of the JSON consumes
_CONSUMED = frozenset(INFO_KEYS) | {"space", "backing_snapshot_name", "dirty", "format_specific"}


def valid_text(s: str) -> str:
    """``s`` as valid Unicode: the bytes a file name decoded with ``surrogateescape``
    could not decode become U+FFFD, one per byte (qemu-img prints them so)."""
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = s.encode("utf-8", "surrogatepass")
    out = raw.decode("utf-8", "replace")
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with every string (keys too) made valid Unicode (:func:`valid_text`),
    tuples and sets as lists, dataclasses as dicts: what ``json.dumps`` prints as
    valid JSON that every parser reads the same way."""
    if isinstance(obj, str):
        return valid_text(obj)
    if isinstance(obj, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    return obj


def _kebab(key: Any) -> str:
    return str(key).replace("_", "-")


def kebab_tree(v: Any) -> Any:
    """Dict keys (at every level) in kebab-case, as qemu-img spells its keys."""
    if isinstance(v, dict):
        return {_kebab(k): kebab_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [kebab_tree(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return kebab_tree(dataclasses.asdict(v))
    return v


def _split_time(seconds: float | None) -> tuple[int, int]:
    """(seconds, nanoseconds) of a float time.  Microsecond precision: a float of
    today's epoch seconds has no more, and qemu records microseconds."""
    if seconds is None:
        return 0, 0
    us = round(seconds * 1_000_000)
    sec, usec = divmod(us, 1_000_000)
    return sec, usec * 1000


def snapshot_json(s: dict[str, Any]) -> dict[str, Any]:
    """One snapshot of ``image_info`` as qemu-img's SnapshotInfo, plus vdisk's keys."""
    extra = dict(s.get("extra") or {})
    date_sec, date_nsec = _split_time(s.get("created"))
    if "date_sec" in extra:  # a format that keeps the exact time
        date_sec, date_nsec = int(extra.pop("date_sec")), int(extra.pop("date_nsec", 0))
    clock = int(extra.pop("vm_clock_nsec", 0) or 0)
    out = {
        "id": str(extra.pop("id", s["id"])),
        "name": s["name"],
        "vm-state-size": int(extra.pop("vm_state_size", 0) or 0),
        "date-sec": date_sec,
        "date-nsec": date_nsec,
        "vm-clock-sec": clock // 1_000_000_000,
        "vm-clock-nsec": clock % 1_000_000_000,
        "icount": int(extra.pop("icount", 0) or 0),
        "vdisk-size": s.get("size"),
        "vdisk-generation": s.get("generation"),
        "vdisk-unique-bytes": s.get("unique_bytes"),
        "vdisk-holds": s.get("holds", 0),
        "vdisk-holders": kebab_tree(s.get("holders") or []),
    }
    for k, v in extra.items():
        out[f"vdisk-{_kebab(k)}"] = kebab_tree(v)
    return out


def _format_specific(info: dict[str, Any]) -> dict[str, Any]:
    fmt = info["format"]
    fields: dict[str, Any] = {}
    fs = info.get("format_specific")
    if isinstance(fs, dict):
        fields.update(fs)
    for k, v in info.items():
        if k not in _CONSUMED:
            fields[k] = v
    qemu_keys = QEMU_FORMAT_DATA_KEYS.get(fmt)
    data: dict[str, Any] = {}
    for k, v in fields.items():
        name = _kebab(k)
        if qemu_keys is not None and name not in qemu_keys:
            name = f"vdisk-{name}"
        data[name] = kebab_tree(v)
    return {"type": fmt, "data": data}


def _qemu_backing_path(info: dict[str, Any]) -> str | None:
    """The opened backing file's name as qemu-img prints it: the backing name
    relative to the directory of the overlay's name as given (vdisk opened the same
    file through the overlay's absolute directory)."""
    name = info.get("backing_filename")
    if info.get("full_backing_filename") is None or name is None:
        return None
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(info["filename"]), name)


def info_to_json(info: dict[str, Any]) -> dict[str, Any]:
    """An ``image_info`` dict as ``info --output json`` prints it (keys: ``INFO_JSON_KEYS``)."""
    out = {
        "virtual-size": info["virtual_size"],
        "filename": info["filename"],
        "format": info["format"],
        "actual-size": info.get("disk_size"),
        "cluster-size": info.get("cluster_size"),
        "dirty-flag": bool(info.get("dirty", False)),
        "backing-filename": info.get("backing_filename"),
        "full-backing-filename": _qemu_backing_path(info),
        "backing-filename-format": info.get("backing_format"),
        "snapshots": [snapshot_json(s) for s in info.get("snapshots") or []],
        "format-specific": _format_specific(info),
        "vdisk-compression": info.get("compression"),
        "vdisk-read-only": info.get("read_only"),
        "vdisk-backing-snapshot": info.get("backing_snapshot"),
        "vdisk-backing-snapshot-name": info.get("backing_snapshot_name"),
        "vdisk-space": kebab_tree(info["space"]) if info.get("space") else None,
    }
    return json_safe(out)


def info_json(img: Image) -> dict[str, Any]:
    """``vdisk info --output json`` of one image."""
    return info_to_json(image_info(img))


def chain_to_json(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``chain_info`` as ``info --backing-chain --output json`` prints it: a list, top
    image first, each backing image named as its overlay's full-backing-filename
    (as qemu-img names them)."""
    out = [info_to_json(i) for i in infos]
    for over, below in itertools.pairwise(out):
        if over["full-backing-filename"] is not None:
            below["filename"] = over["full-backing-filename"]
    return out


def chain_info_json(img: Image) -> list[dict[str, Any]]:
    """``vdisk info --backing-chain --output json`` of an opened chain."""
    return chain_to_json(chain_info(img))


def map_json(extents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``map_extents`` entries as ``map --output json`` prints them (``MAP_JSON_KEYS``)."""
    return [
        {
            "start": e["start"],
            "length": e["length"],
            "depth": e["depth"],
            "present": e["present"],
            "zero": e["zero"],
            "data": e["data"],
            "offset": e["offset"],
            "vdisk-compressed": e["compressed"],
        }
        for e in extents
    ]


def cluster_stats(img: Image) -> dict[str, int]:
    """qemu-img check's block fragmentation counts for the image's own layer (not its
    backing chain), from its block status in guest order, in clusters of the image:
    ``total`` (guest clusters), ``allocated`` (holding data), ``compressed``, and
    ``fragmented`` (a data cluster not stored right after the previous one; every
    compressed cluster counts, as in qemu-img)."""
    cs = img.cluster_size
    size = img.size
    stats = {"total": -(-size // cs) if cs else 0, "allocated": 0, "fragmented": 0, "compressed": 0}
    if not size or not cs:
        return stats
    last = -1  # the last cluster counted
    next_host = None  # where the next data cluster would be if not fragmented
    for ext in img.block_status(0, size, chain=False):
        if ext.status != Status.DATA or ext.length <= 0:
            continue
        first = max(ext.offset // cs, last + 1)
        end = (ext.offset + ext.length - 1) // cs
        if first > end:
            continue
        n = end - first + 1
        stats["allocated"] += n
        if ext.compressed:
            stats["compressed"] += n
            stats["fragmented"] += n
        elif ext.host_offset is not None:
            host = ext.host_offset + first * cs - ext.offset
            if next_host is not None and host != next_host:
                stats["fragmented"] += 1
            next_host = host + n * cs
        last = end
    return stats
