"""Block drivers, by format name.  Each driver module registers itself on import;
a driver is imported when its format is first named (or when probing a file).

Also the magic tables, read without importing any driver: :func:`probe` names the
format vdisk opens that a file's first bytes (or last 512) carry, and
:func:`foreign_format` the formats vdisk recognises only to refuse them by name."""

from __future__ import annotations

import importlib

from ..errors import UnsupportedFeature
from .base import BlockDriver

_DRIVERS: dict[str, type[BlockDriver]] = {}
#: format name -> module (in this package) that implements it
KNOWN_FORMATS = {"raw": "raw", "vdk": "vdk", "qcow2": "qcow2", "pool": "pool", "vmdk": "vmdk", "vhdx": "vhdx",
                 "vpc": "vhd", "vdi": "vdi"}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    _DRIVERS[cls.format_name] = cls
    return cls


def _import(name: str) -> None:
    mod = KNOWN_FORMATS[name]
    try:
        importlib.import_module(f"{__name__}.{mod}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{mod}":
            raise


def get_driver(name: str) -> type[BlockDriver]:
    if name not in _DRIVERS and name in KNOWN_FORMATS:
        _import(name)
    try:
        return _DRIVERS[name]
    except KeyError:
        raise UnsupportedFeature(f"unknown image format {name!r} (known: {', '.join(sorted(KNOWN_FORMATS))})") from None


def all_drivers() -> dict[str, type[BlockDriver]]:
    for name in KNOWN_FORMATS:
        if name not in _DRIVERS:
            _import(name)
    return dict(_DRIVERS)


#: format -> (offset, magic) pairs, any of which marks a file of that format: probing
#: needs no driver imported (each driver's ``probe`` agrees; tests/test_drivers.py
#: holds the two together)
MAGICS: dict[str, tuple[tuple[int, bytes], ...]] = {
    "vdk": ((0, b"\x89VDK\r\n\x1a\n"), (4096, b"\x89VDK\r\n\x1a\n")),
    "qcow2": ((0, b"QFI\xfb"),),
    "vmdk": ((0, b"KDMV"), (0, b"# Disk DescriptorFile")),
    "vhdx": ((0, b"vhdxfile"),),
    "vpc": ((0, b"conectix"),),
    "vdi": ((0x40, b"\x7f\x10\xda\xbe"),),
}
#: formats that may carry their magic only in the file's last 512 bytes (a fixed VHD's
#: one footer): the driver's ``probe(head, tail)`` confirms (a fixed disk's valid footer)
TAIL_MAGICS: dict[str, bytes] = {"vpc": b"conectix"}


def probe(head: bytes, tail: bytes = b"") -> str | None:
    """The format whose magic ``head`` (or ``tail``, the file's last 512 bytes, see
    ``TAIL_MAGICS``) carries, or None.  Raw is never probed."""
    for name, magics in MAGICS.items():
        if any(head[off:off + len(m)] == m for off, m in magics):
            return name
    if len(tail) >= 512:
        for name, magic in TAIL_MAGICS.items():
            if tail[-512:-512 + len(magic)] == magic and get_driver(name).probe(head, tail):
                return name
    return None


#: formats vdisk knows by their magic but cannot open: (name, offset, magic)
FOREIGN_MAGICS = (
    ("VMware ESX COWD (vmfsSparse)", 0, b"COWD"),
    ("QED", 0, b"QED\x00"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("Parallels", 0, b"WithoutFreeSpace"),
    ("Parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format"),
    ("DMG", -512, b"koly"),
    ("damaged VHD", -512, b"conectix"),
)


def foreign_format(head: bytes, tail: bytes = b"") -> str | None:
    """The name of a disk format vdisk recognises but does not support, or None.
    ``tail`` is the file's last 512 bytes (VHD's footer, DMG's trailer)."""
    for name, off, magic in FOREIGN_MAGICS:
        buf = tail if off < 0 else head[off:]
        if off < 0 and len(tail) < 512:
            continue
        if buf.startswith(magic):
            return name
    if head[:4] == b"QFI\xfb" and head[4:8] in (b"\x00\x00\x00\x01",):
        return "qcow (version 1)"
    return None
