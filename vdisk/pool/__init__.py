"""Pools: many images in one deduplicated store (formats/pool.md).

An image in a pool is named ``POOL/IMAGE`` (``POOL/IMAGE@SNAP`` for a snapshot),
where POOL is the pool's directory, as ``rbd`` names ``pool/image@snap``.  This
module only recognises such names (cheaply: it is on every command's path); the
pool itself is in :mod:`.store`, :mod:`.image` and the driver
:mod:`vdisk.drivers.pool`.
"""

from __future__ import annotations

import os
import re

CONFIG_MAGIC = b"\x89VDKPOOL"
#: image names: what a file name, an rbd image name and an IMAGE@SNAP spelling all allow
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")


def is_pool_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "config"), "rb") as f:
            return f.read(8) == CONFIG_MAGIC
    except OSError:
        return False


def split(path: str) -> tuple[str, str] | None:
    """(pool directory, image name) if ``path`` names an image in a pool, else None.
    A file that exists at ``path`` is a file, never a pool image."""
    path = os.fspath(path)
    if os.path.lexists(path) or path.endswith("/"):
        return None
    pool_dir, name = os.path.split(path)
    if not name or not is_pool_dir(pool_dir or "."):
        return None
    return pool_dir or ".", name


def check_image_name(name: str) -> None:
    from ..errors import UsageError

    if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):  # fullmatch: "$" lets a final newline by
        raise UsageError(f"{name!r}: an image name in a pool is 1 to 128 letters, digits and . _ + - "
                         "(not starting with . + or -)")
