"""Snapshot names: the rules every format's new snapshots follow, in one place.

A name that the command line, the FUSE ``.snapshots`` directory and ``IMAGE@SNAP``
can all carry unambiguously: 1 to 255 bytes of valid UTF-8, no control
characters, no '@' or '/', no leading '#' (``#ID`` selects a snapshot by id), no
surrounding white space.  Validation happens before a driver writes anything, so a
refused name leaves the image untouched.  No I/O; errors are one-line
:class:`~vdisk.errors.UsageError` messages that show the offending name printably,
whatever bytes it holds.
"""

from __future__ import annotations

from ..errors import UsageError

MAX_SNAPSHOT_NAME = 255  # bytes of UTF-8


def shown_name(name) -> str:
    """A printable one-line rendering of any would-be snapshot name (str, str holding
    surrogates as a non-UTF-8 argv decodes to, bytes, control characters)."""
    if isinstance(name, str):
        try:
            name = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no byte escapes to
            return ascii(name)
    text = bytes(name[:64]).decode("utf-8", "backslashreplace")  # a byte that is not UTF-8: \xff
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + ("..." if len(name) > 64 else "") + "'"


def validate_snapshot_name(name) -> str:
    """The name of a new snapshot as str, or a one-line UsageError before anything is
    written: 1 to 255 bytes of valid UTF-8 (a str holding surrogates, as a
    non-UTF-8 command-line argument decodes to, is not), no control characters
    (below 0x20, 0x7f, and the C1 range 0x80-0x9f), no '@' (``IMAGE@SNAP`` names a
    snapshot) or '/', no leading '#' (``#ID`` selects by id), no surrounding white
    space.  ``bytes`` are accepted if they are valid UTF-8."""
    if isinstance(name, (bytes, bytearray)):
        try:
            name = bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"invalid snapshot name {shown_name(bytes(name))}: not valid UTF-8") from None
    if not isinstance(name, str):
        raise UsageError(f"a snapshot name must be a string, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"invalid snapshot name {shown_name(name)}: not valid UTF-8") from None
    if not 0 < len(raw) <= MAX_SNAPSHOT_NAME:
        raise UsageError(f"snapshot name must be 1 to {MAX_SNAPSHOT_NAME} bytes long, not {len(raw)}")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in name):
        raise UsageError(f"invalid snapshot name {shown_name(name)}: no control characters")
    if "@" in name or "/" in name or name.startswith("#") or name != name.strip():
        raise UsageError(f"invalid snapshot name {shown_name(name)}: no '@', '/', leading '#' or surrounding spaces")
    return name
