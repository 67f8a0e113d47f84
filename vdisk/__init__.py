"""vdisk: virtual disks with copy-on-write snapshots, clones, compression and checksums.

The Python API::

    import vdisk
    vdisk.create("disk.vdk", 10 << 30)
    with vdisk.open("disk.vdk") as img:
        img.write(0, b"hello")
        img.flush()
"""

from .block import Image, create, detect_format, open  # noqa: A004
from .errors import VdiskError

__all__ = ["Image", "VdiskError", "create", "detect_format", "open"]
__version__ = "0.1.0"
