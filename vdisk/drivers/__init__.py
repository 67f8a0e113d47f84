"""Block drivers, by format name.  Drivers register here; the chain layer picks them."""

from __future__ import annotations

from ..errors import UnsupportedFeature
from .base import BlockDriver

_DRIVERS: dict[str, type[BlockDriver]] = {}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    _DRIVERS[cls.format_name] = cls
    return cls


def _load() -> None:
    if _DRIVERS:
        return
    import importlib

    for mod in ("raw", "vdk", "qcow2"):  # registering imports
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def get_driver(name: str) -> type[BlockDriver]:
    _load()
    try:
        return _DRIVERS[name]
    except KeyError:
        raise UnsupportedFeature(f"unknown image format {name!r} (known: {', '.join(sorted(_DRIVERS))})") from None


def all_drivers() -> dict[str, type[BlockDriver]]:
    _load()
    return dict(_DRIVERS)


def probe(head: bytes) -> str | None:
    """The format whose magic ``head`` carries, or None.  Raw is never probed."""
    _load()
    for name, cls in _DRIVERS.items():
        if cls.probe(head):
            return name
    return None
