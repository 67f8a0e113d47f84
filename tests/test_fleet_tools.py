"""The fleet simulator's traces with real tools: fio replays the iolog that
`vdisk fleet iolog` writes from a vdisk trace, request for request, on a file and on
qemu-storage-daemon's FUSE exports of qcow2 clones (scripts/bench-fleet's QEMU side)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
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


def _mounted(path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


@pytest.mark.fuse
def test_qsd_serves_clones_to_fio_replaying_the_trace(tmp_path, require_fuse):
    """The benchmark's QEMU side, small: a golden qcow2 image written by the
    simulator, two `qemu-img create -b` clones, one qemu-storage-daemon exporting
    both over FUSE, fio replaying the converted trace on each at once."""
    from vdisk.fleet import runner, spec, traces

    s = spec.load(str(REPO / "fleet" / "ci-small.toml"), vms=1,
                  sets=("golden.format=qcow2", "fork.format=qcow2", "fork.disks=1", "event=[]", "workload=[]"))
    r = runner.run(s, str(tmp_path / "sim"))
    assert r["passed"]
    golden = tmp_path / "sim" / "golden.qcow2"
    tr = traces.read_trace(str(SAMPLE_BOOT))
    args = ["qemu-storage-daemon"]
    exports, logs = [], []
    for i in range(2):
        clone = tmp_path / f"vm{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(clone)],
                       check=True)
        e = tmp_path / f"export{i}"
        e.write_bytes(b"")
        exports.append(e)
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={clone}",
                 "--blockdev", f"driver=qcow2,node-name=q{i},file=f{i}",
                 "--export", f"type=fuse,id=e{i},node-name=q{i},mountpoint={e},writable=on"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all(_mounted(e) for e in exports):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-storage-daemon's exports did not appear"
            time.sleep(0.05)
        job = ["fio", "--output-format=json", "--ioengine=psync", "--direct=1", "--thread"]
        for i, e in enumerate(exports):
            log = tmp_path / f"vm{i}.iolog"
            logs.append(traces.write_fio_iolog(tr, str(log), str(e), size=tr.size))
            job += [f"--name=vm{i}", f"--read_iolog={log}"]
        p = subprocess.run(job, capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 0, p.stderr
        jobs = json.loads(p.stdout[p.stdout.index("{"):])["jobs"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for e in exports:
            if _mounted(e):
                subprocess.run(["fusermount3", "-u", "-z", str(e)], capture_output=True, check=False)
    assert len(jobs) == 2
    for j, n in zip(jobs, logs):
        assert j["error"] == 0
        syncs = sum(1 for _t, op, _o, _n in tr.requests() if op == "F")
        assert j["read"]["total_ios"] + j["write"]["total_ios"] == n - syncs
