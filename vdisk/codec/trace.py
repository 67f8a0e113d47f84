"""Request traces (``formats/trace.md``): lines <-> records, no I/O.

A trace is text: one header line, then one line per request.  :func:`header_line`
and :func:`record_line` make lines; :func:`parse_header` and :func:`parse_record`
read them back, raising :class:`TraceError` (a ``UsageError``: a trace is input a
user names, not an image) with the line number on anything that does not follow
the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..errors import UsageError

VERSION = 1
MAGIC = "# vdisk-trace"
#: op letters (formats/trace.md)
OPS = {"R": "read", "W": "write", "F": "flush", "D": "discard", "Z": "write_zeroes"}
#: no field of a record may exceed this (offsets of a 8 EiB disk fit)
MAX_FIELD = 1 << 63
#: a line longer than this is not a trace line (guards a reader fed a binary file)
MAX_LINE = 4096


class TraceError(UsageError):
    """A trace file that does not follow formats/trace.md."""


@dataclass(frozen=True, slots=True)
class Header:
    size: int
    start_ns: int
    image: str
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Record:
    t_us: int
    op: str
    offset: int
    length: int
    latency_us: int
    errno: int = 0


def _quote(name: str) -> str:
    # spaces, '%' and control characters as %XX; everything else as it is
    return quote(name, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%"))


def header_line(h: Header) -> str:
    return f"{MAGIC} {h.version} size={h.size} start={h.start_ns} image={_quote(h.image)}\n"


def record_line(r: Record) -> str:
    return f"{r.t_us} {r.op} {r.offset} {r.length} {r.latency_us} {r.errno}\n"


def _uint(text: str, what: str, lineno: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise TraceError(f"trace line {lineno}: {what} {text[:40]!r} is not an unsigned integer")
    value = int(text)
    if value > MAX_FIELD:
        raise TraceError(f"trace line {lineno}: {what} {value} is too large")
    return value


def parse_header(line: str) -> Header:
    if len(line) > MAX_LINE:
        raise TraceError("trace line 1: too long for a vdisk trace header")
    fields = line.rstrip("\n").split(" ")
    if len(fields) < 3 or " ".join(fields[:2]) != MAGIC:
        raise TraceError("not a vdisk trace: the first line must start with '# vdisk-trace'")
    version = _uint(fields[2], "version", 1)
    if version != VERSION:
        raise TraceError(f"vdisk trace version {version} is not supported (this vdisk reads version {VERSION})")
    keys: dict[str, str] = {}
    for f in fields[3:]:
        k, sep, v = f.partition("=")
        if sep:
            keys[k] = v
    if "size" not in keys:  # start= and image= are informative; a reader can do without
        raise TraceError("trace line 1: the header has no size=")
    return Header(size=_uint(keys["size"], "size", 1), start_ns=_uint(keys.get("start", "0"), "start", 1),
                  image=unquote(keys.get("image", ""), errors="replace"), version=version)


def parse_record(line: str, lineno: int) -> Record | None:
    """The record on ``line`` (with or without its newline), or None for a comment or
    an empty line."""
    if not line.strip() or line.startswith("#"):
        return None
    if len(line) > MAX_LINE:
        raise TraceError(f"trace line {lineno}: too long for a request line")
    fields = line.split()
    if len(fields) != 6:
        raise TraceError(f"trace line {lineno}: expected 6 fields (t op offset length latency errno), "
                         f"found {len(fields)}")
    t, op, off, length, lat, err = fields
    if op not in OPS:
        raise TraceError(f"trace line {lineno}: unknown op {op[:10]!r} (expected one of {''.join(OPS)})")
    return Record(_uint(t, "time", lineno), op, _uint(off, "offset", lineno), _uint(length, "length", lineno),
                  _uint(lat, "latency", lineno), _uint(err, "errno", lineno))
