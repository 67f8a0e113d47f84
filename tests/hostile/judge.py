"""What every hostile-image test module shares: run one image through the probe
(``probe.py``, a child process under memory and time limits) and judge the parts of
its result that are the same for every format -- no exception but a named
VdiskError escaped, every message one line, within the time and memory limits.
Each module adds what its corpus expects of each case (refused at open, read back
equal, check refuses, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).parent / "probe.py"
TIME_LIMIT = 1.0  # seconds for all the steps of one image (interpreter start-up excluded)
RSS_LIMIT_MIB = 200
CHILD_TIMEOUT = 60.0
STEPS = ("open", "read", "block_status", "check", "open_rw", "close")


def run_probe(path: str, fmt: str, snapshot: str | None = None, rw: bool = True,
              timeout: float = CHILD_TIMEOUT) -> dict:
    """The probe's result for one image (``fmt`` named; backing files only beside it)."""
    env = dict(os.environ, PROBE_RW="1" if rw else "0")
    env.pop("VDISK_BACKING_DIRS", None)
    r = subprocess.run([sys.executable, str(PROBE), path, fmt, snapshot or ""], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=os.path.dirname(path), check=False)
    assert r.returncode == 0, f"probe died (exit {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def is_error(step: str | None) -> bool:
    """A step that ended in a (named or bare) VdiskError message."""
    return bool(step) and step != "ok" and not step.startswith("BUG") and step not in ("clean", "leaks", "corrupt")


def generic_faults(res: dict, time_limit: float = TIME_LIMIT, rss_limit_mib: int = RSS_LIMIT_MIB) -> list[str]:
    """What is wrong with ``res`` whatever the case expected (empty: nothing)."""
    if "fatal" in res:
        return [f"probe: {res['fatal']}"]
    bad = []
    for step in STEPS:
        v = res.get(step)
        if v and v.startswith("BUG"):
            bad.append(f"{step}: a non-VdiskError escaped: {v}")
        elif is_error(v) and "\n" in v:
            bad.append(f"{step}: message is not one line: {v!r}")
        elif is_error(v) and v.split(":", 1)[0] == "VdiskError":
            bad.append(f"{step}: bare VdiskError, not a named subclass: {v}")
    if res["seconds"] > time_limit:
        bad.append(f"took {res['seconds']} s (limit {time_limit})")
    if res["maxrss_mib"] > rss_limit_mib:
        bad.append(f"peak RSS {res['maxrss_mib']} MiB (limit {rss_limit_mib})")
    return bad
