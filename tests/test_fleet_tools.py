"""The fleet simulator's traces with a real tool: fio replays the iolog that
`vdisk fleet iolog` writes from a vdisk trace, request for request."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from imagetools import run

REPO = Path(__file__).resolve().parent.parent
SAMPLE_BOOT = REPO / "fleet" / "traces" / "sample-boot.trace"


def test_fio_replays_the_converted_trace(tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    log = tmp_path / "boot.iolog"
    res = run("fleet", "iolog", SAMPLE_BOOT, log, "--device", disk)
    assert f"{log}: 46 requests for {disk}" in res.stdout
    lines = log.read_text().splitlines()
    reads = sum(1 for x in lines if x.split()[1:2] == ["read"])
    writes = sum(1 for x in lines if x.split()[1:2] == ["write"])
    written = sum(int(x.split()[3]) for x in lines if x.split()[1:2] == ["write"])
    p = subprocess.run(["fio", "--name=replay", f"--read_iolog={log}", "--ioengine=psync", "--output-format=json"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["total_ios"] == reads and job["write"]["total_ios"] == writes
    assert job["write"]["io_bytes"] == written
