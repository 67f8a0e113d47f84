"""Errors on the command line: every VdiskError or OSError becomes one line
``vdisk: <message>`` on stderr and the error's exit code (:func:`fail`)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import click

from ..errors import VdiskError
from .output import one_line as _one_line


def fail(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"vdisk: {_one_line(message)}", err=True)
    ctx.exit(code)


def oserror_message(exc: OSError) -> str:
    what = os.strerror(exc.errno) if exc.errno else str(exc)
    name = exc.filename if exc.filename is not None else None
    return f"{name}: {what}" if name else what


@contextlib.contextmanager
def errors_exit_with(code: int) -> Iterator[None]:
    """Within the block, errors that would exit 1 exit ``code`` instead (``compare``
    exits 2 on errors, since 1 means "different")."""
    try:
        yield
    except VdiskError as exc:
        if exc.exit_code < code:
            exc.exit_code = code
        raise
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        err = VdiskError(oserror_message(exc))
        err.exit_code = code
        raise err from None


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so ``finally`` clauses run
    (convert removes its half-written temporary file).  Main thread only.  The C
    module ``_signal``, as the command client uses: :mod:`signal` builds its enums
    at import, 2 ms of a convert's start-up."""
    import _signal as signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
