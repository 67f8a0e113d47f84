"""Figures of a reliability run: each test records what it counted.

Every call appends one JSON line to ``$VDISK_FIGURES`` (default:
``$TMPDIR/vdisk-reliability-figures.jsonl``) and prints it, so that a run with
``pytest -s`` (or ``scripts/crash-run``) shows them and the numbers in RELIABILITY.md
can be reproduced.
"""

from __future__ import annotations

import json
import os
import tempfile
import time


def figures_path() -> str:
    return os.environ.get("VDISK_FIGURES") or os.path.join(tempfile.gettempdir(), "vdisk-reliability-figures.jsonl")


def record(kind: str, **numbers) -> dict:
    entry = {"kind": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **numbers}
    line = json.dumps(entry, sort_keys=True)
    print(f"\nFIGURES {line}")
    try:
        with open(figures_path(), "a") as f:
            f.write(line + "\n")
    except OSError:
        pass
    return entry
