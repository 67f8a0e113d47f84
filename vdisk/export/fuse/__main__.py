"""The mount daemon: ``python -m vdisk.export.fuse [--read-only] [--ready-fd N] [--log-file F] [--trace F] IMAGE MOUNTPOINT``.

``vdisk mount`` starts this in the background and waits on ``--ready-fd`` for one
line, ``READY`` or ``ERROR <exit_code> <message>``.  Without ``--ready-fd`` it runs
in the foreground and logs to stderr (and to ``--log-file`` if given).  The log file is
opened with O_NOFOLLOW and O_CLOEXEC (``vdisk.export.fuse.daemon.open_log``): a symlink there
is refused, never followed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vdisk.errors import VdiskError


def setup_logging(log_file: str | None, foreground: bool, debug: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if log_file:
        from .daemon import open_log  # refuses a symlink (MountError)

        h = logging.StreamHandler(os.fdopen(open_log(log_file), "a", buffering=1))
        h.setFormatter(fmt)
        root.addHandler(h)
    if foreground:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    # pyfuse3 logs every request at debug level: keep it at INFO unless asked.
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vdisk.export.fuse")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--format", default=None)
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--log-file", default=None)
    p.add_argument("--no-direct-io", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--trace", default=None)
    p.add_argument("--inactive", action="store_true")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("image")
    p.add_argument("mountpoint")
    a = p.parse_args(argv)

    ready_fd = a.ready_fd

    def tell(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        try:
            os.write(ready_fd, line.encode() + b"\n")
            os.close(ready_fd)
        except OSError:
            pass
        ready_fd = None
        # From now on nothing should reach the inherited stdout/stderr but crashes.

    try:
        setup_logging(a.log_file, foreground=ready_fd is None, debug=a.debug)
    except VdiskError as exc:
        print(f"vdisk: {exc.message}", file=sys.stderr)
        tell(f"ERROR {exc.exit_code} {exc.message}")
        return exc.exit_code
    log = logging.getLogger("vdisk.export.fuse")

    from .daemon import serve

    try:
        serve(
            a.image,
            a.mountpoint,
            read_only=a.read_only,
            fmt=a.format,
            direct_io=not a.no_direct_io,
            log_file=a.log_file,
            ready=lambda: tell("READY"),
            options=a.options,
            trace=a.trace,
            inactive=a.inactive,
        )
    except VdiskError as exc:
        log.error("%s", exc)
        tell(f"ERROR {exc.exit_code} {exc.message}")
        return exc.exit_code
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            tell("ERROR 1 interrupted")
            return 130
        log.exception("the mount daemon failed")
        tell(f"ERROR 1 internal error: {type(exc).__name__}: {exc}")
        return 1
    tell("ERROR 1 the mount ended before it was ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
