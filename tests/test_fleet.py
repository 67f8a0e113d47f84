"""The fleet simulator (vdisk.fleet, `vdisk fleet`): trace readers, the spec file, the
model, whole runs on every fork method, the model check catching a corrupted disk,
and every shipped spec running (scaled down)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from imagetools import run

import vdisk
from vdisk.errors import UsageError
from vdisk.fleet import model, runner, spec, traces, workloads

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "fleet"
CI_SPEC = FLEET / "ci-small.toml"
SAMPLE_BOOT = FLEET / "traces" / "sample-boot.trace"
SAMPLE_MSR = FLEET / "traces" / "sample-msr.csv"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ traces
def test_vdisk_trace_sample():
    tr = traces.read_vdisk_trace(str(SAMPLE_BOOT))
    assert tr.size == 64 << 20
    # 48 request lines, one of which failed when recorded (errno 5) and is not replayed
    assert len(tr) == 47
    c = tr.counts()
    assert c["F"] == 3 and c["Z"] == 1 and c["D"] == 1
    assert list(tr.t) == sorted(tr.t) and tr.t[0] == 0
    first = next(tr.requests())
    assert first == (0, "R", 0, 512)


def test_vdisk_trace_sorted_by_arrival_and_torn_line(tmp_path):
    p = tmp_path / "t.trace"
    p.write_bytes(b"# vdisk-trace 1 size=1048576 start=0 image=x future=1\n"
                  b"# a comment\n"
                  b"500 W 4096 4096 10 0\n"
                  b"100 R 0 4096 700 0\n"
                  b"900 R 8192 409")  # torn last line: skipped
    tr = traces.read_vdisk_trace(str(p))
    assert list(tr.requests()) == [(0, "R", 0, 4096), (400, "W", 4096, 4096)]


@pytest.mark.parametrize("text, message", [
    ("# vdisk-trace 2 size=1\n0 R 0 1 1 0\n", "version 2 is not supported"),
    ("# something else\n", "not a vdisk trace"),
    ("# vdisk-trace 1 size=4096\n0 X 0 1 1 0\n", "unknown op 'X'"),
    ("# vdisk-trace 1 size=4096\n0 R 0 1 1\n", "expected 6 fields"),
    ("# vdisk-trace 1 size=4096\n0 R -5 1 1 0\n", "offset '-5'"),
    ("", "empty trace"),
])
def test_vdisk_trace_refused(tmp_path, text, message):
    p = write(tmp_path / "bad.trace", text)
    with pytest.raises(UsageError, match=message) as ei:
        traces.read_vdisk_trace(p)
    assert "\n" not in str(ei.value)
    assert "bad.trace" in str(ei.value)


def test_msr_csv_sample():
    tr = traces.read_msr_csv(str(SAMPLE_MSR))
    assert len(tr) == 9
    assert tr.t[0] == 0
    # FILETIME is 100 ns: 128166372003066894 - ...061629 = 5265 ticks = 526 us
    assert tr.t[1] == 526
    assert list(tr.requests())[1] == (526, "W", 3154284544, 8192)
    only0 = traces.read_msr_csv(str(SAMPLE_MSR), disk=0)
    assert list(only0.requests()) == [(0, "R", 1048576, 4096)]
    assert traces.read_trace(str(SAMPLE_MSR)).kind == "msr"
    assert traces.read_trace(str(SAMPLE_BOOT)).kind == "vdisk"


@pytest.mark.parametrize("line, message", [
    ("128166372003061629,hm,1,Trim,0,4096,1", "neither Read nor Write"),
    ("128166372003061629,hm,1,Read,0,4096", "expected 7"),
    ("x,hm,1,Read,0,4096,1", "Timestamp 'x'"),
])
def test_msr_csv_refused(tmp_path, line, message):
    p = write(tmp_path / "bad.csv", line + "\n")
    with pytest.raises(UsageError, match=message):
        traces.read_msr_csv(p)


def test_fio_iolog(tmp_path):
    tr = traces.read_vdisk_trace(str(SAMPLE_BOOT))
    out = tmp_path / "boot.iolog"
    n = traces.write_fio_iolog(tr, str(out), "/dev/nbd0")
    lines = out.read_text().splitlines()
    assert lines[:3] == ["fio version 2 iolog", "/dev/nbd0 add", "/dev/nbd0 open"]
    assert lines[-1] == "/dev/nbd0 close"
    body = lines[3:-1]
    assert len(body) == n == 46  # the discard is left out
    assert body[0] == "/dev/nbd0 read 0 4096"  # widened to whole 4 KiB blocks
    assert "/dev/nbd0 sync 0 0" in body
    assert all(int(x.split()[2]) % 4096 == 0 and int(x.split()[3]) % 4096 == 0 for x in body)
    timed = tmp_path / "timed.iolog"
    traces.write_fio_iolog(tr, str(timed), "/dev/nbd0", timed=True)
    assert any(" wait " in x for x in timed.read_text().splitlines())


# ------------------------------------------------------------------ spec
def test_ci_spec_loads():
    s = spec.load(str(CI_SPEC))
    assert s.fork.vms == 4 and s.fork.disks == 2 and s.boot is not None
    assert s.boot.trace == str(SAMPLE_BOOT)
    assert [w.kind for w in s.workloads] == ["random", "log", "idle", "upgrade", "trace"]
    assert s.workload_of(0).name == "db" and s.workload_of(3).kind == "upgrade"
    assert {e.action for e in s.events} == set(spec.ACTIONS)


def _spec_text(extra: str = "", workload: str = 'kind = "random"\nops = 10') -> str:
    return f"""
name = "t"
[golden]
size = "16M"
[fork]
vms = 2
[[workload]]
{workload}
{extra}
"""


@pytest.mark.parametrize("text, message", [
    (_spec_text() + "\nbogus = 1\n", "bogus: unknown key"),
    (_spec_text(workload='kind = "random"\nops = 10\nread_fraction = 1.5'),
     r"workload\[0\].read_fraction: expected a number from 0 to 1, got 1.5"),
    (_spec_text(workload='kind = "sideways"'), "workload\\[0\\].kind: 'sideways' is not one of"),
    (_spec_text(workload='kind = "random"\nvms = [5]'), "VM 5 does not exist"),
    (_spec_text(workload='kind = "random"\nblock_size = "6K"'), "not a multiple of 4096"),
    (_spec_text(workload='kind = "random"\nblock_size = "lots"'), "'lots' is not a size"),
    (_spec_text(workload='kind = "trace"'), "a trace workload names its trace file"),
    (_spec_text('[[event]]\naction = "restore"\nvm = 0\nat = 1.0'), "the checkpoint to restore"),
    (_spec_text('[[event]]\naction = "delete"\nvm = "nobody"\nat = 1.0'), "not the name of a live clone"),
    (_spec_text('[[event]]\naction = "delete"\nvm = 0'), "exactly one of at"),
    (_spec_text('[[event]]\naction = "checkpoint"\nvm = 0\nat = 1\nname = "a@b"'), "event\\[0\\].name"),
    (_spec_text().replace("[fork]\nvms = 2", "[fork]\nvms = 2\nmethod = \"pool\"\nformat = \"qcow2\"")
     .replace('[golden]\nsize = "16M"', '[golden]\nsize = "16M"\nformat = "qcow2"'), "fork.method"),
    (_spec_text().replace('[golden]\nsize = "16M"', '[golden]\nsize = "16M"\nformat = "qcow2"'),
     "fork.format: a linked clone"),
    ('name = "t"\n[fork]\nvms = 0\n', "fork.vms: expected a number from 1"),
    ('name = "t"\n', "runs nothing"),
    ("name = 't\n", "not valid TOML"),
])
def test_spec_refused(tmp_path, text, message):
    p = write(tmp_path / "s.toml", text)
    with pytest.raises(UsageError, match=message) as ei:
        spec.load(p)
    assert "\n" not in str(ei.value) and "s.toml" in str(ei.value)


def test_spec_two_workloads_for_one_vm(tmp_path):
    text = _spec_text(workload='kind = "random"\nvms = "0-1"\n\n[[workload]]\nkind = "log"\nvms = [1]')
    with pytest.raises(UsageError, match="VM 1 has a workload already"):
        spec.load(write(tmp_path / "s.toml", text))


def test_spec_endless_without_duration(tmp_path):
    p = write(tmp_path / "s.toml", _spec_text(workload='kind = "log"'))
    assert spec.load(p).duration == 10.0
    with pytest.raises(UsageError, match="never ends by itself"):
        spec.load(p, duration=0)


def test_spec_overrides(tmp_path):
    s = spec.load(str(CI_SPEC), sets=("fork.format=qcow2", "golden.format=qcow2", "workload[0].ops=7", "seed=3"),
                  vms=6, scale=0.5, duration=1.5)
    assert s.fork.format == "qcow2" and s.golden.format == "qcow2" and s.fork.vms == 6 and s.seed == 3
    assert s.workloads[0].ops == 4  # 7 * 0.5, rounded
    assert s.events[0].after_ops == 50  # 100 * 0.5
    assert s.duration == 1.5  # --duration after --scale
    with pytest.raises(UsageError, match="no workload\\[9\\]"):
        spec.load(str(CI_SPEC), sets=("workload[9].ops=1",))
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        spec.load(str(CI_SPEC), sets=("fork.vms",))


def test_vm_shares_scale_with_the_fleet():
    for n in (3, 4, 7, 100):  # its events name VMs 0 to 2
        s = spec.load(str(FLEET / "steady-mix.toml"), vms=n)
        covered = sorted(v for w in s.workloads for v in w.vms)
        assert covered == list(range(n))  # each VM exactly once, whatever the size


# ------------------------------------------------------------------ model and workloads
def test_block_content_and_description():
    t = model.vm_token(3, 17)
    data = model.block_bytes(t, 42)
    assert len(data) == model.BLOCK
    assert model.describe(data, 42) == "write #17 of VM number 3"
    assert "written for block 42" in model.describe(data, 43)
    assert model.describe(bytes(4096), 0) == "zeros"
    assert model.describe(b"\x01" * 4096, 0) == "bytes no simulator write produced"
    assert model.block_bytes(t, 1) != model.block_bytes(t, 2)


def test_golden_is_deterministic():
    a = model.Golden(8 << 20, 5, 0.3, extra=[7])
    b = model.Golden(8 << 20, 5, 0.3, extra=[7])
    c = model.Golden(8 << 20, 6, 0.3)
    assert a.bitmap == b.bitmap and a.bitmap != c.bitmap
    assert a.has(7)
    assert 0.15 < a.count() / a.nblocks < 0.5
    d = model.DiskModel(a, a.size)
    d.write(7, 1, 0)
    assert d.token_of(7) == 0 and a.token_of(7) == a.token
    cp = d.copy()
    d.write(8, 2, 99)
    assert cp.token_of(8) == a.token_of(8) and d.token_of(9) == 99


def test_workloads_are_repeatable_and_in_bounds():
    s = spec.load(str(CI_SPEC))
    size = 64 << 20
    for w in s.workloads:
        if w.kind == "trace":
            continue
        g1 = workloads.make(w, size, 1, s.seed, {})
        g2 = workloads.make(w, size, 1, s.seed, {})
        a = [next(g1) for _ in range(50)]
        assert a == [next(g2) for _ in range(50)]
        for op, off, n, _due in a:
            assert op in "RWUF"
            assert off % 4096 == 0 and n % 4096 == 0 and off + n <= size


# ------------------------------------------------------------------ whole runs
#: An open bug the fleet found in pools (vdisk/pool/store.py, Pool.commit): when two
#: Pools of one pool commit at once, a writer whose generation N+1 was put but built
#: on at once by another writer (N+2) takes its commit for lost, reloads and applies
#: its mutation again, which then fails ("snapshot ... exists already", "no such image
#: in the pool") although the first commit went through.  Runs with several VMs
#: committing to one pool at once hit it now and then, so they run only with
#: VDISK_FOUND_BUGS=1 (the convention of tests/test_found_bugs.py); the sequential
#: pool run below covers the pool's fork and events meanwhile.
METHODS = [
    pytest.param((), id="vdk-linked"),
    pytest.param(("fork.method=full",), id="vdk-full"),
    pytest.param(("fork.format=qcow2", "golden.format=qcow2"), id="qcow2-linked"),
    pytest.param(("fork.method=full", "fork.format=qcow2"), id="qcow2-full"),
    pytest.param(("fork.method=pool",), id="pool"),
]


@pytest.mark.parametrize("sets", METHODS)
def test_ci_fleet_runs_and_checks(tmp_path, sets):
    s = spec.load(str(CI_SPEC), sets=sets)
    r = runner.run(s, str(tmp_path / "w"))
    assert r["errors"] == []
    assert r["passed"], r["check"]
    c = r["check"]
    # 3 VMs left (one deleted) + the live clone, two disks each
    assert c["images_checked"] >= 8 and c["blocks_checked"] > 1000
    assert c["checkpoints_checked"] >= 3 and c["live_clones_checked"] == 1
    assert set(r["phases"]) == {"boot", "steady"}
    assert r["phases"]["boot"]["ops"] == 4 * 47  # every VM replays the 47 requests of the sample boot
    assert {e["action"] for e in r["events"]} == set(spec.ACTIONS)
    assert all(e["seconds"] is not None for e in r["events"])
    deleted = [v for v in r["per_vm"] if v["deleted"]]
    assert [v["name"] for v in deleted] == ["vm002"]
    for d in deleted[0]["disks"]:
        assert not vdisk.block.exists(os.path.join(r["workdir"], d["path"]))
    migrated = next(v for v in r["per_vm"] if v["name"] == "vm001")
    assert all(d["path"].startswith("migrated/") for d in migrated["disks"])
    assert r["fork"]["total_s"] > 0 and r["checkpoint"]["count"] == 3
    sp = r["space"]
    assert sp["vms"] == 4 and sp["golden_bytes"] > 0 and sp["unique_bytes_total"] > 0


def test_model_check_catches_a_disk_changed_behind_its_back(tmp_path, monkeypatch):
    """Corrupt one VM's disk after its workload, before the check: the check must
    name the VM, the offset and what was expected, and the run must fail."""
    s = spec.load(str(CI_SPEC))
    real_check = runner.check_fleet
    seen = {}

    def corrupt_then_check(fleet):
        vm = fleet.by_name["vm003"]
        d = vm.disks[0]
        bno = sorted(d.model.own)[5]
        seen["offset"] = bno * model.BLOCK
        with vdisk.open(d.path, format=d.format) as img:
            img.write(bno * model.BLOCK, b"\xee" * model.BLOCK)
        return real_check(fleet)

    monkeypatch.setattr(runner, "check_fleet", corrupt_then_check)
    r = runner.run(s, str(tmp_path / "w"))
    assert not r["passed"] and not r["check"]["passed"]
    assert r["check"]["mismatch_count"] == 1
    msg = r["check"]["mismatches"][0]
    assert msg.startswith("vm003 vm003-d0.vdk:")
    assert f"at offset {seen['offset']}" in msg
    assert "bytes no simulator write produced" in msg and "expected upgrade block" in msg


def test_model_check_catches_a_stray_write(tmp_path, monkeypatch):
    s = spec.load(str(CI_SPEC))
    real_check = runner.check_fleet

    def corrupt_then_check(fleet):
        vm = fleet.by_name["vm000"]
        d = vm.disks[1]  # the data disk: a block nobody wrote there
        free = next(b for b in range(d.model.size // model.BLOCK) if b not in d.model.own)
        with vdisk.open(d.path, format=d.format) as img:
            img.write(free * model.BLOCK, model.block_bytes(model.vm_token(0, 1), free))
        return real_check(fleet)

    monkeypatch.setattr(runner, "check_fleet", corrupt_then_check)
    r = runner.run(s, str(tmp_path / "w"))
    assert not r["passed"]
    assert any("vm000 vm000-d1.vdk:" in m and "expected zeros" in m for m in r["check"]["mismatches"])


def test_cli_run_json_and_html(tmp_path):
    html = tmp_path / "r.html"
    res = run("fleet", "run", CI_SPEC, "--vms", "2", "--set", "event=[]", "--set", "workload[0].vms=[0]",
              "--set", "workload[1].vms=[1]", "--set", "workload[2].vms=[]", "--set", "workload[3].vms=[]",
              "--output", "json", "--report", html, "-q")
    doc = json.loads(res.stdout)
    for key in ("spec", "vms", "fork_method", "format", "fork", "checkpoint", "phases", "space", "events",
                "errors", "check", "passed", "per_vm", "golden", "wall_s"):
        assert key in doc
    assert doc["passed"] and doc["vms"] == 2
    p = doc["phases"]["steady"]
    for key in ("ops", "iops", "mb_per_s", "latency_us", "series"):
        assert key in p
    assert set(p["latency_us"]) >= {"p50", "p99", "p99_9"}
    page = html.read_text()
    assert page.count("<svg") == 7  # IOPS, MB/s and p99 for two phases, and space per VM
    human = run("fleet", "run", CI_SPEC, "--vms", "2", "--set", "event=[]", "--set", "workload[2].vms=[]",
                "--set", "workload[3].vms=[]", "--set", "workload[0].vms=[0]", "--set", "workload[1].vms=[1]")
    assert "model check: passed" in human.stdout


def test_cli_errors_are_one_line(tmp_path):
    r = run("fleet", "run", tmp_path / "none.toml", code=1)
    assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    p = write(tmp_path / "s.toml", _spec_text("oops = 3"))
    r = run("fleet", "run", p, code=1)
    assert "oops: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_qcow2_restore_after_live_clone_is_a_clear_failure(tmp_path):
    s = spec.load(str(CI_SPEC), sets=("fork.format=qcow2", "golden.format=qcow2", "event[1].after_ops=250"))
    r = runner.run(s, str(tmp_path / "w"))
    assert not r["passed"]
    assert len(r["errors"]) == 1
    assert "event 1 (restore before of VM 0" in r["errors"][0] and "live-cloned" in r["errors"][0]


def test_delete_of_a_vm_a_clone_depends_on_is_refused(tmp_path):
    s = spec.load(str(CI_SPEC), sets=("event[6].vm=0", "event[6].after_ops=260"))
    r = runner.run(s, str(tmp_path / "w"))
    assert not r["passed"]
    assert "event 6 (delete of VM 0" in r["errors"][0] and "depend on it" in r["errors"][0]


def test_workdir_must_be_empty(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(vdisk.VdiskError, match="must be empty"):
        runner.run(spec.load(str(CI_SPEC)), str(tmp_path))


SHIPPED = [p.name for p in sorted(FLEET.glob("*.toml"))]


def test_pool_fleet_one_writer_at_a_time(tmp_path):
    """Clones in a pool, one VM thread (several at once: test_ci_fleet_runs_and_checks[pool]):
    fork, checkpoint, restore, migrate into another pool, a live clone there (native:
    next to its source), and the model check of all of it."""
    text = """
name = "pool-seq"
seed = 11
[golden]
size = "16M"
fill = 0.3
[fork]
vms = 1
method = "pool"
disks = 2
data_disk_size = "4M"
[[workload]]
kind = "random"
ops = 240
flush_every = 8
[[event]]
action = "checkpoint"
vm = 0
after_ops = 40
name = "cp"
[[event]]
action = "restore"
vm = 0
after_ops = 90
checkpoint = "cp"
[[event]]
action = "migrate"
vm = 0
after_ops = 100
to = "pool"
[[event]]
action = "live_clone"
vm = 0
after_ops = 180
name = "twin"
"""
    r = runner.run(spec.load(write(tmp_path / "p.toml", text)), str(tmp_path / "w"))
    assert r["errors"] == [] and r["passed"], r["check"]
    assert r["format"] == "pool" and r["check"]["live_clones_checked"] == 1
    vm = r["per_vm"][0]
    assert all(d["path"].startswith("migrate-pool/") for d in vm["disks"])
    assert r["space"]["unique_bytes_total"] > 0
    twin = next(v for v in r["per_vm"] if v["name"] == "twin")
    assert all(d["path"].startswith("migrate-pool/twin-") for d in twin["disks"])
    assert twin["space"]["shared_bytes"] > 0  # a native clone shares its parent's blocks


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_runs(tmp_path, name):
    """Every spec in fleet/ runs, scaled down to 4 VMs and a fraction of its length,
    and passes its model check."""
    s = spec.load(str(FLEET / name), vms=4, scale=0.1, duration=1.0)
    r = runner.run(s, str(tmp_path / "w"))
    assert r["errors"] == [] and r["passed"], r["check"]
    assert r["check"]["blocks_checked"] > 0


def test_the_documented_example_is_a_valid_spec():
    import tomllib

    text = (REPO / "formats" / "fleet.md").read_text()
    example = text.split("## Example", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    s = spec.parse(tomllib.loads(example), str(FLEET / "example.toml"))
    assert s.fork.vms == 100 and len(s.workloads) == 2 and len(s.events) == 2
    assert sorted(v for w in s.workloads for v in w.vms) == list(range(100))


def test_every_documented_key_is_known():
    """The key tables of formats/fleet.md list exactly the keys the parser takes."""
    import re

    text = (REPO / "formats" / "fleet.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` +\|", text, re.MULTILINE))
    fields = set()
    for cls in (spec.GoldenSpec, spec.ForkSpec, spec.BootSpec, spec.EventSpec, spec.CheckSpec):
        fields |= {f for f in cls.__dataclass_fields__ if f != "index"}
    fields |= {"name", "seed", "duration", "kind", "vms", "ops", "rate", "block_size", "span"}
    assert fields <= documented | {"trace"}, fields - documented


def test_cli_validate():
    res = run("fleet", "validate", CI_SPEC, "--vms", "5")
    assert "valid; 5 VMs (linked, vdk), 5 workloads, 7 events" in res.stdout
    doc = json.loads(run("fleet", "validate", CI_SPEC, "--output", "json").stdout)
    assert doc["spec"]["fork"]["vms"] == 4
    t = doc["traces"][str(SAMPLE_BOOT)]
    assert t["kind"] == "vdisk" and t["requests"] == 47 and t["ops"]["F"] == 3
    r = run("fleet", "validate", CI_SPEC, "--set", "fork.method=sideways", code=1)
    assert "fork.method: 'sideways' is not one of linked, full, pool" in r.stderr


def test_model_check_catches_a_damaged_checkpoint(tmp_path, monkeypatch):
    """One byte of a data cluster a checkpoint holds, flipped in the file: the read
    fails its checksum and the check names the VM, the image and the snapshot."""
    from vdisk.drivers.base import Status

    s = spec.load(str(CI_SPEC))
    real_check = runner.check_fleet

    def corrupt_then_check(fleet):
        path = next(p for p, _m in fleet.by_name["vm000"].disks[0].checkpoints.values())
        with vdisk.open(path, read_only=True, snapshot="before", backing=False) as img:
            ext = next(e for e in img.block_status(0, img.size, chain=False)
                       if e.status == Status.DATA and e.host_offset)
        with open(path, "r+b") as f:
            f.seek(ext.host_offset + 100)
            b = f.read(1)
            f.seek(ext.host_offset + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        return real_check(fleet)

    monkeypatch.setattr(runner, "check_fleet", corrupt_then_check)
    r = runner.run(s, str(tmp_path / "w"))
    assert not r["passed"]
    assert any(m.startswith("vm000 vm000-d0.vdk@before: reading") for m in r["check"]["mismatches"]), \
        r["check"]["mismatches"]


def test_pool_commit_race_found_by_the_fleet(tmp_path):
    """The pool bug the fleet found, alone: snapshots of one pool image while other
    images of the same pool flush; no snapshot may be reported as existing already
    when it was just made.  Pool.commit took its own commit for lost when another
    writer committed on top of it at once, and applied it twice; generations now
    name the one they are built on (formats/pool.md 6.2)."""
    import threading

    from vdisk.pool.admin import pool_create

    pool = str(tmp_path / "pool")
    pool_create(pool, {})
    for i in range(4):
        vdisk.create(f"{pool}/im{i}", 16 << 20, format="pool")
    stop = threading.Event()

    def writer(i):
        with vdisk.open(f"{pool}/im{i}") as img:
            n = 0
            while not stop.is_set():
                img.write((n % 512) * 4096, bytes([n % 251 + 1]) * 4096)
                img.flush()
                n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 4)]
    for t in threads:
        t.start()
    errors = []
    try:
        with vdisk.open(f"{pool}/im0") as img:
            for k in range(150):
                try:
                    img.snapshot_create(f"s{k}")
                except vdisk.VdiskError as exc:
                    errors.append(str(exc))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


def test_trace_length_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(traces, "MAX_REQUESTS", 10)
    p = write(tmp_path / "long.trace", "# vdisk-trace 1 size=1048576\n" + "".join(f"{i} R 0 4096 1 0\n"
                                                                                 for i in range(11)))
    with pytest.raises(UsageError, match="more than 10 requests"):
        traces.read_vdisk_trace(p)
