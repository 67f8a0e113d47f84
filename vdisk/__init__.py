"""vdisk: virtual disks with copy-on-write snapshots, clones, compression and checksums.

The Python API::

    import vdisk
    vdisk.create("disk.vdk", 10 << 30)
    with vdisk.open("disk.vdk") as img:
        img.write(0, b"hello")
        img.flush()
"""

__all__ = ["Image", "VdiskError", "create", "detect_format", "open"]
__version__ = "0.1.0"

_FROM_BLOCK = {"Image", "create", "detect_format", "open"}


def __getattr__(name: str):
    # The block layer loads on first use, so `vdisk --help` and commands that open no
    # image do not pay for it (command start-up is part of performance); the errors
    # too, which the command's client (vdisk.cmdserver.client) never needs.
    if name == "VdiskError":
        from .errors import VdiskError

        globals()[name] = VdiskError
        return VdiskError
    if name in _FROM_BLOCK:
        from . import block

        value = getattr(block, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vdisk' has no attribute {name!r}")
