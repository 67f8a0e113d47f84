"""``python -m vdisk.vm build|boot|record-boot`` (``scripts/guest``)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from ..errors import VdiskError
from . import guest

#: what the recorded boot does once its userland is up, standing in for an init
#: system's start-up: walk the file system's metadata, run the package tools (which
#: read its database), load every program in /usr/bin once, write a boot log, sync
BOOT_WORK = ("find / -xdev -type f | wc -l >/dev/null && dpkg -l >/dev/null"
             " && cat /usr/bin/* >/dev/null && dd if=/dev/urandom of=/var/log/boot.log bs=64k count=16 2>/dev/null"
             " && sync")


def _log(msg: str) -> None:
    print(f"guest: {msg}", file=sys.stderr, flush=True)


def _linked_clone(build_dir: str, work: str) -> str:
    """A copy of the golden image in ``work`` (so the cached one is never written) and
    a linked clone of it; returns the clone's path."""
    from ..ops.chain import clone

    golden = os.path.join(work, "golden.vdk")
    shutil.copyfile(os.path.join(build_dir, "golden.vdk"), golden)
    dst = os.path.join(work, "vm.vdk")
    clone(golden, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/guest", description="Real QEMU guests on vdisk disks.")
    p.add_argument("--cache", default=guest.DEFAULT_CACHE, help="build cache directory (default %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or reuse) the golden guest and print its directory")
    b = sub.add_parser("boot", help="boot the guest from IMAGE (default: a linked clone of the golden image)")
    b.add_argument("image", nargs="?")
    b.add_argument("--trace", default=None, help="record the disk's requests (formats/trace.md)")
    r = sub.add_parser("record-boot", help="record a boot from a linked clone of the golden image")
    r.add_argument("out")
    a = p.parse_args(argv)
    try:
        build_dir = guest.ensure(a.cache, log=_log)
        if a.cmd == "build":
            print(build_dir)
            return 0
        from .run import booted

        with tempfile.TemporaryDirectory(prefix="vdisk-guest-") as work:
            if a.cmd == "record-boot":
                image, trace = _linked_clone(build_dir, work), os.path.abspath(a.out)
            else:
                image = os.path.abspath(a.image) if a.image else _linked_clone(build_dir, work)
                trace = a.trace
            with booted(image, build_dir, work, trace=trace) as g:
                _log(f"userland reached in {g.boot_seconds:.1f} s")
                if a.cmd == "boot":
                    print(g.run("uname -a; df -h /")[1], end="")
                else:
                    g.run(BOOT_WORK, timeout=600)
                g.poweroff()
        if a.cmd == "record-boot":
            _log(f"trace written to {a.out}")
        return 0
    except VdiskError as exc:
        print(f"guest: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
