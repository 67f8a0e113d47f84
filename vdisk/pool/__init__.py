"""Pools: many images in one deduplicated store (formats/pool.md).

An image in a pool is named ``POOL/IMAGE`` (``POOL/IMAGE@SNAP`` for a snapshot),
where POOL is the pool's directory or ``s3://BUCKET[/PREFIX]`` (a pool on an object
store), as ``rbd`` names ``pool/image@snap``.  An ``s3://`` name is recognised by its
spelling alone (no request is made until the image is opened).  This
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


def is_url(path) -> bool:
    """True for ``s3://...``: a pool (or an image in one) on an object store."""
    return isinstance(path, str) and path.startswith("s3://")


def is_pool_dir(path: str) -> bool:
    if is_url(path):
        return bool(path[5:].strip("/"))  # checked when opened
    try:
        with open(os.path.join(path, "config"), "rb") as f:
            return f.read(8) == CONFIG_MAGIC
    except OSError:
        return False


def split(path: str) -> tuple[str, str] | None:
    """(pool directory, image name) if ``path`` names an image in a pool, else None.
    A file that exists at ``path`` is a file, never a pool image."""
    path = os.fspath(path)
    if is_url(path):
        pool_url, sep, name = path[5:].rpartition("/")
        if not sep or not pool_url.strip("/") or not name:
            return None
        return "s3://" + pool_url.rstrip("/"), name
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


def url_join(base: str, rel: str) -> str:
    """``rel`` relative to the directory of the ``s3://`` name ``base`` (a backing
    reference inside an object store), normalised; never above the bucket."""
    import posixpath

    if is_url(rel):
        return rel
    bucket, _, path = base[5:].partition("/")
    joined = posixpath.normpath(posixpath.join("/", posixpath.dirname(path), rel))
    return f"s3://{bucket}{joined}" if joined != "/" else f"s3://{bucket}"
