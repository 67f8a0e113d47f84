"""Human sizes: ``10G`` -> 10737418240 and back."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``512``, ``64K``, ``10G``, ``1.5G``, ``2TiB`` (binary units) into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r}: expected a number with an optional K, M, G, T, P or E suffix")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.upper()] if "." in number else int(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    if value >= 1 << 63:
        raise UsageError(f"invalid size {text!r}: too large")
    return int(value)


def format_size(n: int) -> str:
    """Format bytes the way ``qemu-img info`` does: ``1 GiB``, ``64 KiB``, ``1.5 MiB``."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        n /= 1024
        if n < 1024 or unit == "EiB":
            return f"{n:.3g} {unit}" if n != int(n) else f"{int(n)} {unit}"
    raise AssertionError("unreachable")
