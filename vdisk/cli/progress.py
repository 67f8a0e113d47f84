"""Progress of long work (convert, commit, compare, ...) on stderr."""

from __future__ import annotations

import sys

import click
from typing import Any


class _Progress:
    """Progress on stderr: a click bar on a terminal, ``qemu-img -p``-style percentages
    otherwise.  ``update(n)`` adds ``n`` done units."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.done = 0
        self._bar = None
        self._tty = enabled and sys.stderr.isatty()
        self._last = -1

    def __enter__(self) -> _Progress:
        if self._tty:
            self._bar = click.progressbar(length=self.total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        elif self.enabled:
            self._print()
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            self._print()

    def _print(self) -> None:
        pct = min(100.0, 100.0 * self.done / self.total)
        if int(pct) != self._last:
            self._last = int(pct)
            sys.stderr.write(f"    ({pct:.2f}/100%)\r")
            sys.stderr.flush()

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, label: str = "", *, force: bool = False, quiet: bool = False) -> _Progress:
    """A progress display for long work: on when stderr is a terminal (or ``force``),
    off with ``quiet``.  Use as a context manager; pass ``.update`` to an operation."""
    return _Progress(total, label, enabled=not quiet and (force or sys.stderr.isatty()))
