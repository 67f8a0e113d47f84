"""Options and arguments every command shares: sizes, -f, --output, -U,
--unsafe-backing, -q, -p, ``-o key=val`` lists, and opening an image the way every
command does."""

from __future__ import annotations

import os
from typing import Any, Callable

import click

from .. import block as _block
from ..errors import UsageError, VdiskError
from ..sizes import parse_size


class SizeType(click.ParamType):
    """A size like ``10G``, ``512M``, ``4096``.  A bad one is a one-line ``vdisk:`` error."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except UsageError as exc:
            what = f"{param.human_readable_name}: " if param is not None else ""
            raise UsageError(f"{what}{exc.message}") from None


SIZE = SizeType()


def format_option(*names: str, default: str | None = None, help: str | None = None) -> Callable:  # noqa: A002
    """``-f/--format FMT``; passed to the command as ``fmt``."""
    names = names or ("-f", "--format")
    return click.option(
        *names,
        "fmt",
        default=default,
        metavar="FMT",
        help=help or "Image format (vdk, raw, ...); default: probed from the file, raw if no magic.",
    )


def output_option() -> Callable:
    """``--output human|json``; passed as ``output``."""
    return click.option(
        "--output",
        type=click.Choice(["human", "json"]),
        default="human",
        show_default=True,
        help="Output format; json is stable (keys documented in this help).",
    )


def unsafe_backing_option() -> Callable:
    """``--unsafe-backing``; passed as ``unsafe_backing``."""
    return click.option(
        "--unsafe-backing",
        is_flag=True,
        help="Follow backing files outside the image's directory and VDISK_BACKING_DIRS.",
    )


def quiet_option() -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")


def progress_option() -> Callable:
    return click.option(
        "-p", "--progress", is_flag=True, help="Show progress even when stderr is not a terminal."
    )


def open_image(
    filename: str,
    *,
    fmt: str | None = None,
    read_only: bool = True,
    unsafe_backing: bool = False,
    snapshot: str | None = None,
    backing: bool = True,
    force_share: bool = False,
) -> _block.Image:
    """Open an image (and its chain) the way every command does; errors are VdiskErrors
    that name the file.  ``FILENAME@SNAP`` opens that snapshot (read-only)."""
    path, snap = _block.split_image_spec(filename)
    if snap is not None:
        if snapshot is not None and snapshot != snap:
            raise UsageError(f"{filename}: two snapshots named ({snap!r} and {snapshot!r})")
        if not read_only:
            raise UsageError(f"{filename}: a snapshot is read-only; this command writes its image")
        snapshot = snap
    if os.path.isdir(path):
        raise VdiskError(f"{path}: is a directory, not an image file")
    return _block.open(
        path,
        format=fmt,
        read_only=read_only,
        snapshot=snapshot,
        backing=backing,
        unsafe_backing=unsafe_backing,
        force_share=force_share,
    )


def force_share_option() -> Callable:
    """``-U/--force-share``; passed as ``force_share``."""
    return click.option(
        "-U", "--force-share", is_flag=True,
        help="Open even while another process (a mount) writes the image; the result may be stale.",
    )


#: ``-o`` keys that map to ``vdisk.create`` arguments; the rest go to ``options``.
_O_ALIASES = {
    "cluster_size": "cluster_size",
    "compression": "compression",
    "compression_type": "compression",
    "backing_file": "backing_file",
    "backing_fmt": "backing_format",
    "backing_format": "backing_format",
}


def parse_o_options(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse ``-o key=val,key=val`` (repeatable; ``,,`` is a literal comma) into
    keyword arguments for :func:`vdisk.create`: ``cluster_size`` (a size),
    ``compression``, ``backing_file``, ``backing_format``, and ``options`` (a dict of
    the other keys, values as strings)."""
    out: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for value in values:
        items, cur, i = [], "", 0
        while i < len(value):
            if value[i] == ",":
                if value[i + 1 : i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                items.append(cur)
                cur = ""
            else:
                cur += value[i]
            i += 1
        items.append(cur)
        for item in items:
            if not item.strip():
                continue
            key, sep, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise UsageError(f"invalid -o option {item!r}: expected key=value")
            if key in _O_ALIASES:
                name = _O_ALIASES[key]
                out[name] = SIZE.convert(val, None, None) if name == "cluster_size" else val.strip()
            else:
                extra[key] = val
    if extra:
        out["options"] = extra
    return out
