"""The ``vdisk`` launcher: the executable ``vdisk`` script, written by
``scripts/setup.sh`` over the console script pip generates.

pip's script starts with ``import re`` (to strip a Windows ``-script.pyw`` or
``.exe`` suffix from ``sys.argv[0]``), which loads enum, functools, collections and
the regular expression engine before vdisk's code runs: 12-15 ms on the benchmark
machine, more than the whole command server path of a short command.  The launcher
does only what the console script does on Linux: call
:func:`vdisk.cmdserver.client.main` with the interpreter's argv.

It also runs the interpreter with ``-S``: importing :mod:`site` (site-packages, the
``.pth`` files) is another ~2 ms, and a command the server runs needs none of it.
The launcher puts the directory vdisk was imported from (at install time) first on
``sys.path`` instead; the client calls ``site.main()`` itself before it falls back to
running the command in-process, so that path sees the same ``sys.path`` as pip's.

Installing it::

    .venv/bin/python -m vdisk.cmdserver.launcher .venv/bin/vdisk

rewrites the file (atomically, only when its text differs) for the interpreter that
runs this module.  ``scripts/setup.sh`` does it at every run, also when pip was
skipped, so a ``pip install -e .`` that put pip's script back is undone by the next
setup; without it ``vdisk`` works the same, only slower to start.

This module is not imported by the launcher (the launcher imports only
:mod:`vdisk.cmdserver.client`).
"""

from __future__ import annotations

import os
import sys

#: the marker line by which the installed launcher is recognised
MARKER = "# vdisk launcher (vdisk/cmdserver/launcher.py): pip's console script without its import re, under -S"

_BODY = """{marker}
import sys
sys.path.insert(0, {root!r})  # run with -S: where vdisk is, without site's 2 ms
from vdisk.cmdserver.client import main
if __name__ == "__main__":
    sys.exit(main())
"""


def package_root() -> str:
    """The directory the running vdisk package was imported from."""
    import vdisk

    return os.path.dirname(os.path.dirname(os.path.abspath(vdisk.__file__)))


def text(python: str | None = None) -> str:
    """The launcher's text for interpreter ``python`` (default: this one)."""
    python = os.path.abspath(python or sys.executable)
    if " " in python or len(python) > 120:  # longer than a kernel's #! line takes: as pip decides it
        head = f"#!/bin/sh\n'''exec' \"{python}\" -S \"$0\" \"$@\"\n' '''\n"
    else:
        head = f"#!{python} -S\n"
    return head + _BODY.format(marker=MARKER, root=package_root())


def install(path: str, python: str | None = None) -> bool:
    """Write the launcher to ``path`` (mode 0755) unless it holds it already; True if written."""
    want = text(python)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == want:
                return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(want)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # a vdisk starting meanwhile reads the old or the new script, whole
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m vdisk.cmdserver.launcher PATH  (writes the vdisk launcher to PATH "
              "for this interpreter)", file=sys.stderr)
        return 1
    try:
        install(args[0])
    except OSError as exc:
        print(f"vdisk launcher: {args[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
