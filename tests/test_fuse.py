"""The FUSE export with the real kernel: ext4 on a loop device on MOUNTPOINT/disk, live
snapshots through the control socket, fio verify, kill -9 recovery, locking, read-only.

Every test cleans up its ext4 mounts, loop devices, FUSE mounts and daemons through
``vdisk.export.fuse.testing.Rig`` even when it fails, and is bounded in time.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import vdisk
from imagetools import flip_byte
from vdisk.export.fuse import control
from vdisk.export.fuse.testing import Rig, need_loop, run, wait_until
from vdisk.errors import VdiskError

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

MiB = 1 << 20


@pytest.fixture
def rig(tmp_path, monkeypatch):
    # Sockets and logs of the daemons go under the test's own directory.
    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    r = Rig(str(tmp_path))
    try:
        yield r
    finally:
        r.cleanup()
        for log in (tmp_path / "run").glob("*.log") if (tmp_path / "run").exists() else []:
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log}\n{text}")


def _files(seed: int, n: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    out = {}
    for i in range(n):
        size = rnd.choice([0, 1, 100, 511, 4096, 5000, 12345, 40000])
        out[f"d{i % 7}/f{i:04d}"] = rnd.randbytes(size)
    return out


def _write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


def _read_tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        if "lost+found" in dirpath:
            continue
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_ext4_on_loop_with_live_snapshot(rig, tmp_path):
    need_loop()
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 128 * MiB)  # vdk, the default format
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    disk = os.path.join(mnt, "disk")
    assert os.path.getsize(disk) == 128 * MiB
    assert os.listdir(os.path.join(mnt, "snapshots")) == []

    # ext4 on a loop device on the FUSE disk, a few hundred files
    dev = rig.attach(disk)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", dev)
    fsdir = str(tmp_path / "fs")
    rig.mount_fs(dev, fsdir)
    old = _files(1, 300)
    _write_tree(fsdir, old)
    rig.umount_fs(fsdir)
    rig.detach(dev)

    # live snapshot through the control socket of the running mount
    with pytest.raises(VdiskError, match="in use"):
        vdisk.open(img)
    reply = control.request(img, {"op": "snapshot-create", "name": "before"})
    assert reply is not None and reply["ok"], reply
    assert reply["result"]["name"] == "before"
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["before"]
    assert os.path.getsize(os.path.join(mnt, "snapshots", "before")) == 128 * MiB
    listed = control.result(control.request(img, {"op": "snapshot-list"}))
    assert [s["name"] for s in listed] == ["before"]

    # change the files on the live disk
    dev = rig.attach(disk)
    rig.mount_fs(dev, fsdir)
    new = _files(2, 200)
    for rel in list(old)[::3]:
        os.unlink(os.path.join(fsdir, rel))
    for rel in list(old)[1::3]:
        with open(os.path.join(fsdir, rel), "wb") as f:
            f.write(b"changed" * 100)
    _write_tree(fsdir, {"new/" + k: v for k, v in new.items()})
    changed = _read_tree(fsdir)
    rig.umount_fs(fsdir)
    rig.detach(dev)

    # the snapshot still holds the old files, byte for byte
    sdev = rig.attach(os.path.join(mnt, "snapshots", "before"), read_only=True)
    sdir = str(tmp_path / "snapfs")
    rig.mount_fs(sdev, sdir, "ro", "noload")
    assert _read_tree(sdir) == old
    rig.umount_fs(sdir)
    rig.detach(sdev)

    # and the live disk the new ones
    dev = rig.attach(disk, read_only=True)
    rig.mount_fs(dev, fsdir, "ro", "noload")
    assert _read_tree(fsdir) == changed
    rig.umount_fs(fsdir)
    rig.detach(dev)

    # deleting the snapshot live removes the entry at once
    wait_until(lambda: control.request(img, {"op": "snapshot-delete", "name": "before"})["ok"], 20,
               "the snapshot to be released")
    assert os.listdir(os.path.join(mnt, "snapshots")) == []
    assert not os.path.exists(os.path.join(mnt, "snapshots", "before"))

    rig.umount(mnt)
    assert control.request(img, {"op": "ping"}) is None
    with vdisk.open(img) as im:
        res = im.check()
        assert res.corruptions == [] and res.leaks == [], res
        assert im.snapshot_list() == []


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct_io", "page_cache"])
def test_snapshot_is_consistent_with_acknowledged_writes(rig, tmp_path, direct_io):
    """Writes acknowledged before the control request are in the snapshot; later ones are not."""
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 16 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt, direct_io=direct_io)
    disk = os.path.join(mnt, "disk")
    fd = os.open(disk, os.O_RDWR)
    try:
        for i in range(20):
            os.pwrite(fd, bytes([i + 1]) * 65536, i * 65536)
            assert control.call(img, "snapshot-create", name=f"s{i}")["name"] == f"s{i}"
        for i in range(20):
            with open(os.path.join(mnt, "snapshots", f"s{i}"), "rb") as f:
                data = f.read(21 * 65536)
            for j in range(21):
                want = bytes([j + 1]) * 65536 if j <= i else bytes(65536)
                assert data[j * 65536:(j + 1) * 65536] == want, (i, j)
    finally:
        os.close(fd)
    with pytest.raises(vdisk.errors.SnapshotExists):
        control.call(img, "snapshot-create", name="s0")
    with pytest.raises(vdisk.errors.SnapshotNotFound):
        control.call(img, "snapshot-delete", name="nope")
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        assert len(im.snapshot_list()) == 20
        assert im.check().exit_code == 0


def test_fio_verify(rig, tmp_path):
    if shutil.which("fio") is None:
        pytest.fail("fio is needed: run scripts/setup.sh", pytrace=False)
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 64 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    disk = os.path.join(mnt, "disk")
    common = ["--filename=" + disk, "--size=64M", "--direct=1", "--verify=crc32c", "--do_verify=1",
              "--verify_fatal=1", "--fallocate=none", "--output-format=json", "--runtime=60"]
    jobs = [
        ["--name=seq", "--rw=write", "--bs=1M", "--ioengine=psync"],
        ["--name=rand", "--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--size=16M"],
        ["--name=mixed", "--rw=randwrite", "--bsrange=512-128k", "--ioengine=psync", "--size=16M"],
    ]
    for job in jobs:
        p = run("fio", *common, *job, check=False, timeout=120, cwd=str(tmp_path))  # verify state files go there
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr
        out = json.loads(p.stdout[p.stdout.index("{"):])
        for j in out["jobs"]:
            assert j["error"] == 0, j
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        assert im.check().exit_code == 0


def _dead(pid: int) -> bool:
    from vdisk.export.fuse.daemon import process_gone

    return process_gone(pid)


def test_kill9_keeps_fsynced_writes(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 32 * MiB)
    mnt = str(tmp_path / "mnt")
    pid = rig.mount(img, mnt)
    disk = os.path.join(mnt, "disk")
    rnd = random.Random(7)
    synced: dict[int, bytes] = {}
    fd = os.open(disk, os.O_RDWR)
    try:
        for i in range(40):
            off = rnd.randrange(0, 32 * MiB - 70000) // 512 * 512
            data = rnd.randbytes(rnd.choice([512, 4096, 65536, 69632]))
            os.pwrite(fd, data, off)
            if i % 4 == 3:
                os.fsync(fd) if i % 8 == 3 else os.fdatasync(fd)
                # later writes may overlap: keep the newest fsynced content per byte range
                synced = {o: d for o, d in synced.items() if o + len(d) <= off or o >= off + len(data)}
                synced[off] = data
            else:
                # an unsynced write: whatever it overlaps is no longer a known synced state
                synced = {o: d for o, d in synced.items() if o + len(d) <= off or o >= off + len(data)}
                os.fdatasync(fd) if i % 4 == 2 else None
        # some writes after the last fsync, then the daemon dies
        os.pwrite(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _dead(pid), 20, "the daemon and all its threads to die")
    with pytest.raises(OSError) as ei:
        os.stat(disk)
    assert ei.value.errno == errno.ENOTCONN
    with pytest.raises(VdiskError, match="dead FUSE mount"):
        rig.mount(img, mnt)
    run("fusermount3", "-u", "-z", mnt)
    rig.fuse_mounts.remove(mnt)

    rig.mount(img, mnt)  # the lock died with the daemon
    with open(disk, "rb") as f:
        for off, data in synced.items():
            f.seek(off)
            assert f.read(len(data)) == data, off
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        res = im.check()
        assert res.corruptions == [] and res.leaks == [], res


def test_second_rw_mount_is_refused(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    rig.mount(img, str(tmp_path / "m1"))
    with pytest.raises(VdiskError, match="in use"):
        rig.mount(img, str(tmp_path / "m2"))
    with pytest.raises(VdiskError, match="in use"):
        rig.mount(img, str(tmp_path / "m3"), read_only=True)
    rig.umount(str(tmp_path / "m1"))
    # a read-only mount shares with other readers, but keeps writers out
    rig.mount(img, str(tmp_path / "m2"), read_only=True)
    rig.mount(img, str(tmp_path / "m3"), read_only=True)
    with pytest.raises(VdiskError, match="in use"):
        rig.mount(img, str(tmp_path / "m1"))


def test_read_only_mount_refuses_writes(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    with vdisk.open(img) as im:
        im.write(0, b"hello")
        im.snapshot_create("snap")
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt, read_only=True)
    disk = os.path.join(mnt, "disk")
    for path in (disk, os.path.join(mnt, "snapshots", "snap")):
        with open(path, "rb") as f:
            assert f.read(5) == b"hello"
        with pytest.raises(OSError) as ei:
            os.open(path, os.O_RDWR)
        assert ei.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        open(os.path.join(mnt, "newfile"), "wb")
    # no control socket on a read-only mount: the CLI gets None and reports the lock
    assert control.request(img, {"op": "snapshot-create", "name": "x"}) is None
    rig.umount(mnt)


def test_rw_mount_snapshot_files_are_read_only(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    control.call(img, "snapshot-create", name="s")
    with pytest.raises(OSError) as ei:
        os.open(os.path.join(mnt, "snapshots", "s"), os.O_WRONLY)
    assert ei.value.errno in (errno.EROFS, errno.EACCES)
    # O_TRUNC is ignored, as by a block device; shrinking is refused; growing resizes
    with open(os.path.join(mnt, "disk"), "wb") as f:
        with pytest.raises(OSError) as ei:
            f.truncate(4096)
        assert ei.value.errno == errno.EPERM
    assert os.path.getsize(os.path.join(mnt, "disk")) == 8 * MiB
    os.truncate(os.path.join(mnt, "disk"), 12 * MiB)  # growing resizes the image
    assert os.path.getsize(os.path.join(mnt, "disk")) == 12 * MiB
    with pytest.raises(PermissionError):
        os.truncate(os.path.join(mnt, "disk"), 8 * MiB)
    assert os.path.getsize(os.path.join(mnt, "disk")) == 12 * MiB
    # writes past the end: short, then ENOSPC, like a block device
    fd = os.open(os.path.join(mnt, "disk"), os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"a" * 8192, 12 * MiB - 4096) == 4096
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"a", 12 * MiB)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
    finally:
        os.close(fd)
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        assert im.size == 12 * MiB
        assert im.read(12 * MiB - 4096, 4096) == b"a" * 4096


def test_sigterm_flushes_and_unmounts(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    mnt = str(tmp_path / "mnt")
    pid = rig.mount(img, mnt)
    with open(os.path.join(mnt, "disk"), "r+b", buffering=0) as f:
        f.write(b"survives SIGTERM")
    os.kill(pid, signal.SIGTERM)
    from vdisk.export.fuse.daemon import is_mounted
    wait_until(lambda: not is_mounted(mnt), 30, "the mount to go away")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z",
               30, "the daemon to exit")
    with vdisk.open(img) as im:
        assert im.read(0, 16) == b"survives SIGTERM"
        assert im.check().exit_code == 0


def test_raw_image_and_cli_commands(rig, tmp_path):
    from click.testing import CliRunner

    from vdisk.cli.mount import mount_command, umount_command

    img = str(tmp_path / "disk.raw")
    vdisk.create(img, 4 * MiB, format="raw")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    rig.fuse_mounts.append(mnt)
    r = CliRunner().invoke(mount_command, ["--format", "raw", img, mnt])
    assert r.exit_code == 0, r.output
    assert "mounted" in r.output and "log" in r.output
    pid = int(os.getxattr(mnt, "user.vdisk.pid"))
    rig.pids.append(pid)
    with open(os.path.join(mnt, "disk"), "r+b", buffering=0) as f:
        f.write(b"raw!")
        os.fsync(f.fileno())
    assert os.listdir(os.path.join(mnt, "snapshots")) == []
    r = CliRunner().invoke(mount_command, ["--format", "raw", img, str(tmp_path)])
    assert r.exit_code != 0
    r = CliRunner().invoke(umount_command, [mnt])
    assert r.exit_code == 0, r.output
    with open(img, "rb") as f:
        assert f.read(4) == b"raw!"
    r = CliRunner().invoke(umount_command, [mnt])
    assert r.exit_code != 0 and "not mounted" in r.output


def test_umount_refuses_busy_mount(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 8 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    f = open(os.path.join(mnt, "disk"), "rb")
    try:
        with pytest.raises(VdiskError, match="busy"):
            rig.umount(mnt)
    finally:
        f.close()
    wait_until(lambda: _try_umount(rig, mnt), 20, "the unmount")


def _try_umount(rig, mnt):
    try:
        rig.umount(mnt)
        return True
    except VdiskError:
        return False


def test_foreground_mount(tmp_path, monkeypatch):
    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", "from vdisk.cli.mount import mount_command; mount_command()",
         "--foreground", img, str(mnt)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: os.path.exists(mnt / "disk"), 30, "the foreground mount")
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, out
        assert "mounted" in out and "closed" in out
        assert not os.path.exists(mnt / "disk")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)


def test_cli_snapshot_commands_go_through_the_mount(rig, tmp_path, run_vdisk):
    """`vdisk snapshot create/list/delete` on an image a rw mount holds: done live by the mount."""
    img = str(tmp_path / "disk.vdk")
    run_vdisk("create", img, "8M")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    rig.fuse_mounts.append(mnt)
    out = run_vdisk("mount", img, mnt).stdout
    assert "mounted" in out
    rig.pids.append(int(os.getxattr(mnt, "user.vdisk.pid")))
    with open(os.path.join(mnt, "disk"), "r+b", buffering=0) as f:
        f.write(b"live data")
    run_vdisk("snapshot", "create", img, "s1")
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["s1"]
    with open(os.path.join(mnt, "snapshots", "s1"), "rb") as f:
        assert f.read(9) == b"live data"
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", img).stdout)
    assert [r["name"] for r in rows] == ["s1"]
    r = run_vdisk("snapshot", "create", img, "s1", expect=None)
    assert r.returncode != 0 and "exists" in r.stderr
    wait_until(lambda: run_vdisk("snapshot", "rename", img, "s1", "s2", expect=None).returncode == 0, 20,
               "the snapshot file to be released")
    assert os.listdir(os.path.join(mnt, "snapshots")) == ["s2"]
    with open(os.path.join(mnt, "snapshots", "s2"), "rb") as f:
        assert f.read(9) == b"live data"
    wait_until(lambda: run_vdisk("snapshot", "delete", img, "s2", expect=None).returncode == 0, 20,
               "the snapshot file to be released")
    assert os.listdir(os.path.join(mnt, "snapshots")) == []
    r = run_vdisk("mount", img, str(tmp_path), expect=None)
    assert r.returncode != 0 and "in use" in r.stderr
    run_vdisk("umount", mnt)
    rig.fuse_mounts.remove(mnt)
    r = run_vdisk("snapshot", "list", "--output", "json", img)
    assert json.loads(r.stdout) == []


def test_live_snapshots_under_load(rig, tmp_path):
    """Snapshots taken while fio writes at queue depth 16: the mount keeps serving, every
    snapshot appears at once and the image checks clean afterwards."""
    if shutil.which("fio") is None:
        pytest.fail("fio is needed: run scripts/setup.sh", pytrace=False)
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 32 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    fio = subprocess.Popen(
        ["fio", "--name=load", f"--filename={mnt}/disk", "--direct=1", "--rw=randwrite", "--bs=4k",
         "--ioengine=libaio", "--iodepth=16", "--size=32M", "--time_based", "--runtime=4",
         "--fallocate=none", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)
        for i in range(8):
            control.call(img, "snapshot-create", name=f"load{i}")
            assert os.path.exists(os.path.join(mnt, "snapshots", f"load{i}"))
            time.sleep(0.2)
        out, err = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    assert json.loads(out[out.index("{"):])["jobs"][0]["error"] == 0
    for i in range(0, 8, 2):
        control.call(img, "snapshot-delete", name=f"load{i}")
    assert sorted(os.listdir(os.path.join(mnt, "snapshots"))) == [f"load{i}" for i in range(1, 8, 2)]
    rig.umount(mnt)
    with vdisk.open(img, read_only=True) as im:
        res = im.check()
        assert res.corruptions == [] and res.leaks == [], res


def test_checksum_mismatch_is_eio_for_that_request_only(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    with vdisk.open(img) as im:
        cs = im.cluster_size
        im.write(0, b"A" * cs + b"B" * cs)
        ext = [e for e in im.block_status(0, 2 * cs) if e.host_offset is not None]
    host = ext[0].host_offset
    flip_byte(img, host + 100)  # in the first data cluster
    mnt = str(tmp_path / "mnt")
    log = str(tmp_path / "mount.log")
    rig.mount(img, mnt, log_file=log)
    fd = os.open(os.path.join(mnt, "disk"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)
        assert ei.value.errno == errno.EIO
        assert os.pread(fd, 4096, cs) == b"B" * 4096  # the next request is fine
        assert os.pwrite(fd, b"C" * 4096, 2 * cs) == 4096  # and the mount stays writable
        assert os.pread(fd, 4096, 2 * cs) == b"C" * 4096
    finally:
        os.close(fd)
    rig.umount(mnt)
    text = open(log).read()
    assert "checksum mismatch at guest offset 0" in text, text
    assert "read-only from now on" not in text


def test_corrupt_metadata_turns_the_mount_read_only(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    with vdisk.open(img) as im:
        im.write(0, b"D" * 65536)
    with vdisk.open(img, read_only=True) as im:
        l2 = im.driver.l1_off[0]  # host offset of the first L2 table (vdk internals)
    assert l2
    flip_byte(img, l2 + 8)
    mnt = str(tmp_path / "mnt")
    log = str(tmp_path / "mount.log")
    rig.mount(img, mnt, log_file=log)
    fd = os.open(os.path.join(mnt, "disk"), os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.pread(fd, 4096, 0)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x" * 4096, 2 * MiB)
        assert ei.value.errno == errno.EROFS
    finally:
        os.close(fd)
    with pytest.raises(VdiskError, match="read-only after an error"):
        control.call(img, "snapshot-create", name="s")
    assert control.call(img, "status")["read_only"] is True
    rig.umount(mnt)  # still unmounts cleanly
    text = open(log).read()
    assert "read-only from now on" in text and "guest offset 0" in text, text


def test_live_revert_only_while_the_disk_is_closed(rig, tmp_path):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    mnt = str(tmp_path / "mnt")
    rig.mount(img, mnt)
    disk = os.path.join(mnt, "disk")
    with open(disk, "r+b", buffering=0) as f:
        f.write(b"before")
    control.call(img, "snapshot-create", name="s")
    f = open(disk, "r+b", buffering=0)
    try:
        f.write(b"after!")
        with pytest.raises(VdiskError, match="while the disk is open"):
            control.call(img, "snapshot-revert", name="s")
    finally:
        f.close()
    wait_until(lambda: control.request(img, {"op": "snapshot-revert", "name": "s"})["ok"], 20,
               "the disk to be released")
    with open(disk, "rb") as f:  # the kernel's cache of the disk was dropped
        assert f.read(6) == b"before"
    rig.umount(mnt)


def test_linked_clone_of_a_mounted_image(rig, tmp_path, run_vdisk):
    """`vdisk clone` of an image a rw mount holds: the mount takes the snapshot and the hold."""
    img = str(tmp_path / "gold.vdk")
    run_vdisk("create", img, "8M")
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    rig.fuse_mounts.append(mnt)
    run_vdisk("mount", img, mnt)
    rig.pids.append(int(os.getxattr(mnt, "user.vdisk.pid")))
    with open(os.path.join(mnt, "disk"), "r+b", buffering=0) as f:
        f.write(b"golden bytes")
        os.fsync(f.fileno())
    r = run_vdisk("info", img, expect=None)  # the mount holds the write lock
    assert r.returncode != 0 and "in use" in r.stderr and "--force-share" in r.stderr
    info = json.loads(run_vdisk("info", "-U", "--output", "json", img).stdout)
    assert info["virtual-size"] == 8 << 20
    clone = str(tmp_path / "clone.vdk")
    run_vdisk("clone", img, clone)
    with vdisk.open(clone) as c:
        assert c.read(0, 12) == b"golden bytes"
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", img).stdout)
    assert [(r["name"], r["vdisk-holds"]) for r in rows] == [("clone-clone.vdk", 1)]
    run_vdisk("rm", clone)  # releases the hold through the mount
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", img).stdout)
    assert [(r["name"], r["vdisk-holds"]) for r in rows] == [("clone-clone.vdk", 0)]
    run_vdisk("umount", mnt)
    rig.fuse_mounts.remove(mnt)


def test_mount_image_at_snapshot_serves_the_snapshot_read_only(rig, tmp_path, run_vdisk):
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    with vdisk.open(img) as i:
        i.write(0, b"old" * 1000)
        i.snapshot_create("s1")
        i.write(0, b"new" * 1000)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    r = run_vdisk("mount", f"{img}@s1", mnt)
    rig.fuse_mounts.append(mnt)
    assert "read-only" in r.stdout
    disk = os.path.join(mnt, "disk")
    with open(disk, "rb") as f:
        assert f.read(3000) == b"old" * 1000
    with pytest.raises(OSError) as ei:
        open(disk, "r+b")
    assert ei.value.errno in (errno.EROFS, errno.EACCES)
    with vdisk.open(img) as i:  # the snapshot mount does not hold the image's write lock
        assert i.read(0, 3) == b"new"
    run_vdisk("umount", mnt)
    rig.fuse_mounts.remove(mnt)


def test_hand_over_between_two_mounts_without_unmounting(rig, tmp_path, run_vdisk):
    """`vdisk mount --inactive` + `vdisk deactivate A; vdisk activate B`: the writer moves
    from A to B with both mounted; B serves every write A acknowledged, A refuses
    writes after, snapshot commands follow the writer, and it goes back the same way."""
    img = str(tmp_path / "disk.vdk")
    vdisk.create(img, 4 * MiB)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    rig.mount(img, a)
    os.makedirs(b)
    r = run_vdisk("mount", "--inactive", img, b)
    rig.fuse_mounts.append(b)
    rig.pids.append(int(os.getxattr(b, "user.vdisk.pid")))
    assert "(inactive)" in r.stdout
    fa = os.open(os.path.join(a, "disk"), os.O_RDWR)
    fb = os.open(os.path.join(b, "disk"), os.O_RDWR)  # a migration target opens its disk early
    try:
        os.pwrite(fa, b"A" * 4096, 0)
        os.fsync(fa)
        with pytest.raises(OSError) as exc:
            os.pwrite(fb, b"x" * 4096, 0)
        assert exc.value.errno == errno.EROFS
        os.fsync(fb)  # nothing to make durable: succeeds
        r = run_vdisk("activate", b, expect=1)  # A still writes
        assert "in use" in r.stderr and "Traceback" not in r.stderr
        run_vdisk("snapshot", "create", img, "on-a")  # goes to A, the writer
        assert "inactive" in run_vdisk("deactivate", a).stdout
        assert "active" in run_vdisk("activate", b).stdout
        assert os.pread(fb, 4096, 0) == b"A" * 4096  # nothing A acknowledged is lost
        os.pwrite(fb, b"B" * 4096, 4096)
        os.fsync(fb)
        with pytest.raises(OSError) as exc:
            os.pwrite(fa, b"x" * 4096, 0)
        assert exc.value.errno == errno.EROFS
        run_vdisk("snapshot", "create", img, "on-b")  # now goes to B
        assert sorted(os.listdir(os.path.join(b, "snapshots"))) == ["on-a", "on-b"]
        run_vdisk("deactivate", b)
        run_vdisk("activate", a)  # and back
        assert os.pread(fa, 8192, 0) == b"A" * 4096 + b"B" * 4096
        os.pwrite(fa, b"C" * 4096, 8192)
        os.fsync(fa)
    finally:
        os.close(fa)
        os.close(fb)
    r = run_vdisk("activate", str(tmp_path), expect=1)
    assert "no read-write or inactive vdisk mount" in r.stderr
    rig.umount(a)
    rig.umount(b)
    run_vdisk("check", img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 12288) == b"A" * 4096 + b"B" * 4096 + b"C" * 4096
        assert [s.name for s in im.snapshot_list()] == ["on-a", "on-b"]
