"""Rendering results: ``--output json`` (stable, documented per command) or text
for a person."""

from __future__ import annotations

from typing import Any, Callable

import click


def one_line(text: str) -> str:
    """An error message as one line."""
    return " ".join(str(text).split()) or "error"


def _json_default(obj: Any) -> Any:
    import dataclasses
    import enum

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.name.lower()
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def emit_json(obj: Any) -> None:
    import json  # only commands that print JSON pay for it

    click.echo(json.dumps(obj, indent=2, default=_json_default))


def emit(output: str, obj: Any, human: Callable[[Any], str]) -> None:
    """Print ``obj`` as JSON or through ``human(obj) -> str``, following ``--output``."""
    if output == "json":
        emit_json(obj)
    else:
        text = human(obj)
        if text:
            click.echo(text)


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide (East Asian) characters take two,
    combining marks none."""
    import unicodedata

    w = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def printable(text: str) -> str:
    """``text`` with control characters (and undecodable bytes of a file name) shown
    as escapes, so a table row stays one line."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # os.fsdecode's stand-in for a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows under headers, each column as wide as its widest cell (by display width,
    so names of any length and script stay aligned); columns in ``right`` are
    right-aligned.  The last column is not padded."""
    cells = [[printable(str(c)) for c in r] for r in [headers, *rows]]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            pad = " " * (widths[i] - display_width(c))
            if i == len(r) - 1 and i not in right:
                parts.append(c)
            else:
                parts.append(pad + c if i in right else c + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
