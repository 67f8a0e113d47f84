"""Rendering results: ``--output json`` (stable, documented per command) or text
for a person."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Callable

import click


def one_line(text: str) -> str:
    """An error message as one line."""
    return " ".join(str(text).split()) or "error"


def _json_default(obj: Any) -> Any:
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
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def emit(output: str, obj: Any, human: Callable[[Any], str]) -> None:
    """Print ``obj`` as JSON or through ``human(obj) -> str``, following ``--output``."""
    if output == "json":
        emit_json(obj)
    else:
        text = human(obj)
        if text:
            click.echo(text)
