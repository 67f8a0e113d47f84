"""Where an operation gets its images: the one object through which operations
open, create and remove images.

An operation that works on one image receives it opened (``compare``, ``convert``'s
source, ``map_extents``, ...).  The chain operations cannot: a clone must take a hold
on its source's snapshot, ``rm`` must find and open the images that depend on the one
it removes, ``rebase`` must read the old and the new backing image.  They receive an
:class:`OpenContext` instead, and every image they touch is opened through it, never
with :func:`vdisk.open` directly.  That keeps two decisions out of the operations:

- the backing-reference policy and the locks: :meth:`OpenContext.open` is
  :func:`vdisk.open`, which enforces both and lifts the policy only when its caller
  passes ``unsafe_backing``;
- who changes an image that is in use: :meth:`OpenContext.writable` opens the file
  read-write here; the session layer above (:class:`vdisk.session.Session`, which the
  CLI uses) overrides it to hand the change to the ``vdisk mount`` that holds the
  image.  An operation never talks to a mount.

:data:`LOCAL` is the default for callers of the Python API: everything opened here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from .. import block


class OpenContext:
    """Opens, creates and removes images for an operation (see the module docstring)."""

    def open(self, path: str, **kw) -> block.Image:
        """``path`` as :func:`vdisk.open` opens it (same keywords)."""
        return block.open(path, **kw)

    @contextlib.contextmanager
    def writable(self, path: str, fmt: str | None = None) -> Iterator[block.Image]:
        """``path``'s own layer opened read-write, for a change to its snapshots
        (create, hold); the object yielded has the ``snapshot_*`` methods of an Image."""
        with block.open(path, format=fmt, backing=False) as img:
            yield img

    def create(self, path: str, size: int | None, **kw) -> None:
        """A new image, as :func:`vdisk.create` makes it (same keywords)."""
        block.create(path, size, **kw)

    def remove(self, path: str) -> None:
        """Delete an image file (or a pool's image); the caller released its holds."""
        block.remove(path)


#: everything opened in this process
LOCAL = OpenContext()
