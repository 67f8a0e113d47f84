"""One metadata memory budget for a whole opened chain (design property 6).

Drivers hold tables in memory (L1 tables, refcounts, snapshot tables).  A hostile
image -- or a chain of 64 of them -- can claim tables of many GiB; before a driver
allocates one it calls :func:`charge` with the bytes it will hold, and the chain
being opened is refused with :class:`~vdisk.errors.ResourceLimit` once the sum would
pass the budget: ``VDISK_METADATA_BUDGET`` bytes (a size such as ``2G``), 1 GiB by
default, far above what real images of any supported size need.

:func:`vdisk.open` opens a chain inside :func:`scope`; code that opens a driver
outside one (tests, tools) is not limited.  Concurrency: the budget lives in a
context variable, so threads and trio tasks opening chains at once each have
their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from .errors import ResourceLimit, UsageError
from .sizes import format_size, parse_size

DEFAULT_BUDGET = 1 << 30
_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("vdisk_metadata_budget", default=None)


class _Budget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.limit:
            raise ResourceLimit(
                f"{what} needs {format_size(nbytes)} of memory, and the chain's metadata would then exceed "
                f"the budget of {format_size(self.limit)} (VDISK_METADATA_BUDGET)")
        self.used += nbytes


def limit_from_env() -> int:
    text = os.environ.get("VDISK_METADATA_BUDGET", "")
    if not text:
        return DEFAULT_BUDGET
    try:
        return parse_size(text)
    except (UsageError, ValueError):
        raise UsageError(f"VDISK_METADATA_BUDGET={text!r} is not a size") from None


@contextlib.contextmanager
def scope(limit: int | None = None) -> Iterator[None]:
    """Charges made inside the block count against one budget (nested scopes share
    the outermost one)."""
    if _current.get() is not None:
        yield
        return
    token = _current.set(_Budget(limit_from_env() if limit is None else limit))
    try:
        yield
    finally:
        _current.reset(token)


def charge(nbytes: int, what: str) -> None:
    """Count ``nbytes`` of metadata the caller is about to hold; ResourceLimit if the
    chain's budget cannot take them."""
    b = _current.get()
    if b is not None:
        b.charge(nbytes, what)
