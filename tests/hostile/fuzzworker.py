"""Child process for tests/test_fuzz.py: exercises fuzzed vdk images sent by the parent,
under an address-space limit, so that no example can hurt the test process.

Protocol: the parent writes an 8-byte little-endian length, the format name padded to
8 bytes with NULs, and the image bytes; the
worker answers one JSON line: {"result": "accepted" | "refused" | "bug", "error": ...,
"known_bug": name or null, "seconds": ...}.  "bug" means an exception other than
VdiskError escaped.  The parent restarts the worker after a timeout.

    python tests/hostile/fuzzworker.py [--as-mib=N]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from crash.storage import MemStorage  # noqa: E402
from vdisk.block import Image  # noqa: E402
from vdisk.drivers.vdk import VdkDriver  # noqa: E402
from vdisk.errors import VdiskError  # noqa: E402

KNOWN_BUG_SIGNATURES = {
    "vdk-zstd-content-size": ("MemoryError", "_decompress"),
    "vdk-check-huge-snapshot-l1": ("MemoryError", "ref_run"),
}


def exercise(data: bytes, drv=VdkDriver) -> None:
    """Everything a user could do with an image; only VdiskError may escape."""
    VdkDriver = drv  # noqa: N806 - the driver under test
    img = Image(VdkDriver.open(MemStorage(data, "fuzz.vdk", read_only=True), read_only=True), "fuzz.vdk", None)
    try:
        for step in (lambda: img.read(0, img.size), lambda: img.block_status(0, img.size), img.check):
            try:
                step()
            except VdiskError:
                pass
        for s in img.snapshot_list():
            try:
                snap = Image(VdkDriver.open(MemStorage(data, "fuzz.vdk", read_only=True), read_only=True,
                                            snapshot=s.name), "fuzz.vdk", None)
                snap.read(0, snap.size)
                snap.close()
            except VdiskError:
                pass
    finally:
        img.close()
    rw = Image(VdkDriver.open(MemStorage(data, "fuzz.vdk"), read_only=False), "fuzz.vdk", None)
    try:
        n = min(rw.size, 3 * rw.cluster_size + 11)
        if n:
            rw.write(rw.size - n, b"\xa5" * n)
        rw.flush()
        rw.check()
    finally:
        try:
            rw.close()
        except VdiskError:
            pass


def known_bug(exc: BaseException) -> str | None:
    frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    for name, (etype, func) in KNOWN_BUG_SIGNATURES.items():
        if type(exc).__name__ == etype and func in frames:
            return name
    return None


def main() -> None:
    as_mib = 600
    for a in sys.argv[1:]:
        if a.startswith("--as-mib="):
            as_mib = int(a.split("=", 1)[1])
    resource.setrlimit(resource.RLIMIT_AS, (as_mib << 20, as_mib << 20))
    inp = sys.stdin.buffer
    out = sys.stdout
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        n = int.from_bytes(head, "little")
        fmt = inp.read(8).rstrip(b"\0").decode()
        data = inp.read(n)
        t0 = time.monotonic()
        reply: dict = {"result": "accepted", "error": None, "known_bug": None}
        try:
            from vdisk.drivers import get_driver

            exercise(data, get_driver(fmt))
        except VdiskError as exc:
            reply.update(result="refused", error=f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""
            reply.update(result="bug", error=f"{type(exc).__name__}: {str(exc)[:300]}{where}", known_bug=known_bug(exc))
            del exc
        reply["seconds"] = round(time.monotonic() - t0, 4)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
