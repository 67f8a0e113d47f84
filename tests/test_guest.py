"""A real Linux guest (Debian's kernel, a debootstrap root) booting and running from a
vdisk linked clone under QEMU, with a live snapshot taken while it runs.

The guest is built once per recipe by vdisk.vm.guest (about a minute, cached in
/var/tmp/vdisk-guest); each test copies the golden image into its own directory so
the cached one is never written.  QEMU runs under TCG (no KVM here), the disk is
``MOUNTPOINT/disk`` of a ``vdisk mount`` opened with cache=none.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from imagetools import run

from vdisk.codec.trace import parse_header, parse_record
from vdisk.vm import guest as G
from vdisk.vm.run import booted

pytestmark = [pytest.mark.fuse]


@pytest.fixture(scope="module")
def build_dir():
    return G.ensure(G.DEFAULT_CACHE)


def _debugfs_cat(disk: str, path: str) -> bytes:
    p = subprocess.run(["debugfs", "-R", f"cat {path}", disk], capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _e2fsck(disk: str) -> None:
    p = subprocess.run(["e2fsck", "-fn", disk], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"e2fsck -fn {disk}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"


def test_module_order_follows_depends_and_softdeps(build_dir):
    with open(os.path.join(build_dir, "manifest.json")) as f:
        mods = __import__("json").load(f)["modules"]
    for before, after in [("virtio", "virtio_pci"), ("virtio_ring", "virtio_blk"), ("jbd2", "ext4"),
                          ("mbcache", "ext4"), ("crc32c_generic", "jbd2")]:
        assert mods.index(before) < mods.index(after), mods


def test_guest_runs_from_a_linked_clone_with_a_live_snapshot(build_dir, tmp_path):
    golden = tmp_path / "golden.vdk"
    shutil.copyfile(os.path.join(build_dir, "golden.vdk"), golden)
    vm = tmp_path / "vm.vdk"
    assert run("clone", str(golden), str(vm)).exit_code == 0
    trace = tmp_path / "boot.trace"
    with booted(str(vm), build_dir, str(tmp_path), trace=str(trace)) as g:
        # programs from the guest's own root write files and check them
        g.run("mkdir /data && head -c 3000000 /dev/urandom > /data/before.bin && cp /bin/ls /data/ls")
        _, out = g.run("/data/ls /data && sha256sum /data/before.bin")
        assert "before.bin" in out and "ls" in out
        before_sum = out.split()[-2]
        g.run("echo written-before-the-snapshot > /data/before.txt && sync")
        # a live snapshot: the guest freezes its file system (as a guest agent does),
        # vdisk snapshots through the mount, the guest thaws and goes on
        g.run("fsfreeze -f /")
        r = run("snapshot", "create", str(vm), "live")
        assert r.exit_code == 0, r.output
        g.run("fsfreeze -u /")
        g.run("echo written-after-the-snapshot > /data/after.txt && rm /data/before.txt && sync")
        g.poweroff()
    # the image and its snapshot: clean file systems holding what was written when
    raw_now, raw_snap = tmp_path / "now.raw", tmp_path / "snap.raw"
    assert run("convert", "-O", "raw", str(vm), str(raw_now)).exit_code == 0
    assert run("convert", "-O", "raw", f"{vm}@live", str(raw_snap)).exit_code == 0
    _e2fsck(str(raw_now))
    _e2fsck(str(raw_snap))
    assert _debugfs_cat(str(raw_snap), "/data/before.txt") == b"written-before-the-snapshot\n"
    assert _debugfs_cat(str(raw_snap), "/data/after.txt") == b""  # not there yet
    assert _debugfs_cat(str(raw_now), "/data/after.txt") == b"written-after-the-snapshot\n"
    assert _debugfs_cat(str(raw_now), "/data/before.txt") == b""  # removed after the snapshot
    import hashlib

    assert hashlib.sha256(_debugfs_cat(str(raw_snap), "/data/before.bin")).hexdigest() == before_sum
    assert run("check", str(vm)).exit_code == 0
    # the golden image was only read: the clone's writes are the clone's
    assert run("compare", str(golden), os.path.join(build_dir, "golden.vdk")).exit_code == 0
    # the mount recorded the boot and the workload
    lines = trace.read_text().splitlines(keepends=True)
    header = parse_header(lines[0])
    assert header.size == 1 << 30
    recs = [r for i, line in enumerate(lines[1:], 2) if (r := parse_record(line, i)) is not None]
    ops = {r.op for r in recs}
    assert {"R", "W", "F"} <= ops
    assert all(r.errno == 0 for r in recs)
    assert sum(r.length for r in recs if r.op == "W") >= 3_000_000


def test_a_killed_guest_and_a_live_snapshot_without_freeze_recover_by_journal(build_dir, tmp_path):
    """No freeze this time: the snapshot is taken while the guest is writing and
    syncing, and then QEMU is killed with SIGKILL mid-write.  Both the snapshot (a
    crash-consistent point) and the image (a crash) must be ext4 file systems whose
    journal brings them back clean, holding everything synced before."""
    import hashlib

    golden = tmp_path / "golden.vdk"
    shutil.copyfile(os.path.join(build_dir, "golden.vdk"), golden)
    vm = tmp_path / "vm.vdk"
    run("clone", str(golden), str(vm))
    with booted(str(vm), build_dir, str(tmp_path)) as g:
        g.run("mkdir /data && head -c 2000000 /dev/urandom > /data/synced.bin && sync")
        _, out = g.run("sha256sum /data/synced.bin")
        synced_sum = out.split()[-2]
        # a writer that keeps rewriting and fsyncing files, in the background
        g.run("(i=0; while :; do dd if=/dev/urandom of=/data/churn$((i % 4)) bs=64k count=16 conv=fsync;"
              " i=$((i + 1)); done) >/dev/null 2>&1 &")
        g.run("sleep 1")
        run("snapshot", "create", str(vm), "crash-point")
        g.run("sleep 1")
        g.kill()  # SIGKILL: no unmount, no sync in the guest
    for spec, raw in ((f"{vm}@crash-point", tmp_path / "snap.raw"), (str(vm), tmp_path / "now.raw")):
        run("convert", "-O", "raw", spec, str(raw))
        fix = subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True, text=True, check=False)
        assert fix.returncode in (0, 1), f"e2fsck -fy {spec}: exit {fix.returncode}\n{fix.stdout}\n{fix.stderr}"
        _e2fsck(str(raw))  # clean after the journal's replay
        assert hashlib.sha256(_debugfs_cat(str(raw), "/data/synced.bin")).hexdigest() == synced_sum
    run("check", str(vm))
