"""Child process for tests/test_hostile.py and tests/test_fuzz.py: open one image under
an address-space limit and report, as one JSON line on stdout, what each step did.

    python tests/hostile/probe.py IMAGE FORMAT [SNAPSHOT] [--as-mib N]

Steps: open read-only (with the chain), read the whole disk (sha256 of the bytes),
block_status of the whole disk, check (top image only), open read-write (no chain).
Each step reports "ok" or "ErrorClass: message"; an exception that is not a VdiskError
is reported as "BUG ErrorClass: message" with its traceback's last line.  Also: the
elapsed time of the steps and the peak RSS of this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

DEFAULT_AS_MIB = 400


def _err(exc: BaseException) -> str:
    from vdisk.errors import VdiskError

    if isinstance(exc, VdiskError):
        return f"{type(exc).__name__}: {exc}"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"BUG {type(exc).__name__}: {exc}{where}"


def _peak_rss_mib() -> float:
    """Peak RSS of this process image.  (getrusage's ru_maxrss would also count the
    parent's RSS at fork time, which Linux carries across exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def probe(path: str, fmt: str, snapshot: str | None) -> dict:
    import vdisk.block as block

    out: dict = {}
    t0 = time.monotonic()
    img = None
    try:
        img = block.open(path, read_only=True, format=fmt, snapshot=snapshot)
        out["open"] = "ok"
    except BaseException as exc:  # noqa: BLE001
        out["open"] = _err(exc)
    if img is not None:
        try:
            h = hashlib.sha256()
            step = 1 << 20
            pos = 0
            while pos < img.size:
                n = min(step, img.size - pos)
                h.update(img.read(pos, n))
                pos += n
            out["read"] = "ok"
            out["sha256"] = h.hexdigest()
            out["size"] = img.size
        except BaseException as exc:  # noqa: BLE001
            out["read"] = _err(exc)
        try:
            ext = img.block_status(0, img.size)
            if sum(e.length for e in ext) != img.size:
                raise AssertionError("block_status does not cover the disk")
            out["block_status"] = "ok"
        except BaseException as exc:  # noqa: BLE001
            out["block_status"] = _err(exc)
        try:
            img.close()
        except BaseException as exc:  # noqa: BLE001
            out["close"] = _err(exc)
    # check, as `vdisk check` does it: the top image alone
    try:
        with block.open(path, read_only=True, format=fmt, backing=False) as top:
            res = top.check()
        out["check"] = "corrupt" if res.corruptions else ("leaks" if res.leaks else "clean")
        out["check_messages"] = res.corruptions[:3]
    except BaseException as exc:  # noqa: BLE001
        out["check"] = _err(exc)
    # read-write open of the top image (on a copy would be kinder; the corpus is scratch)
    if os.environ.get("PROBE_RW") == "1":
        try:
            rw = block.open(path, read_only=False, format=fmt, backing=False)
            out["open_rw"] = "ok"
            rw.driver.read_only = True  # never write to the corpus: close without committing
            rw.close()
        except BaseException as exc:  # noqa: BLE001
            out["open_rw"] = _err(exc)
    out["seconds"] = round(time.monotonic() - t0, 4)
    out["maxrss_mib"] = _peak_rss_mib()
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    as_mib = DEFAULT_AS_MIB
    for a in sys.argv[1:]:
        if a.startswith("--as-mib="):
            as_mib = int(a.split("=", 1)[1])
    limit = as_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path, fmt = args[0], args[1]
    snapshot = args[2] if len(args) > 2 and args[2] else None
    try:
        res = probe(path, fmt, snapshot)
    except MemoryError:
        res = {"fatal": "MemoryError"}
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
