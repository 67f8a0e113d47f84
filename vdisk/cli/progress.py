"""Progress of long work (convert, commit, compare, ...) on stderr.

On a terminal a bar drawn by tqdm (imported only then); elsewhere, with ``-p``, the
percentages qemu-img prints (``    (42.00/100%)``), one per whole percent.  Work that
ends without an error always shows 100%, whatever the operation counted on the way
(commit counts only the clusters it copies).
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """``update(n)`` adds ``n`` done units of ``total``."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.done = 0
        self._bar = None
        self._tty = enabled and sys.stderr.isatty()
        self._last = -1

    def __enter__(self) -> Progress:
        if self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label or None, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=True, dynamic_ncols=True)
        elif self.enabled:
            self._print()
        return self

    def update(self, n: int) -> None:
        n = min(n, self.total - self.done)
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            self._print()

    def _print(self) -> None:
        pct = 100.0 * self.done / self.total
        if int(pct) != self._last:
            self._last = int(pct)
            sys.stderr.write(f"    ({pct:.2f}/100%)\r")
            sys.stderr.flush()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.update(self.total - self.done)  # finished: 100%
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, label: str = "", *, force: bool = False, quiet: bool = False) -> Progress:
    """A progress display for long work: on when stderr is a terminal (or ``force``),
    off with ``quiet``.  Use as a context manager; pass ``.update`` to an operation."""
    return Progress(total, label, enabled=not quiet and (force or sys.stderr.isatty()))
