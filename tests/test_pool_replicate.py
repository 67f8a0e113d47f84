"""Continuous replication of a pool (``vdisk pool replicate``, formats/pool.md 13.6).

A writer process keeps writing and flushing rounds into an image of the source pool
(each round changes a known part of the image, so the image's content after round k
is a function of k); ``vdisk pool replicate`` runs continuously in its own process;
then the writer is killed with SIGKILL and the source is given up.  The replica must
open as a consistent earlier generation: every image holds exactly the content of
one flushed round, ``vdisk check`` and ``vdisk pool check`` are clean, commits are
refused until ``vdisk pool promote``, and after it the replica takes writes.  The
lag of every shipped generation is reported.  Local -> local here without servers;
local -> S3 and S3 -> S3 (a second bucket; failover, and ``--once`` shipping only what
is new) on the real SeaweedFS cluster
(tests/seaweed.py), started once for the module.

Also the live hand-over of an s3:// image from one mount (host A) to another (host
B) under a model workload (issue 16 item 5): by unmounting and mounting, and by
deactivating one mount and activating the other.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from imagetools import jrun, run

import vdisk

KiB = 1 << 10
MiB = 1 << 20
SIZE = 2 * MiB
CHUNK = 64 * KiB
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def round_bytes(k: int) -> bytes:
    import random

    return random.Random(k).randbytes(CHUNK)


def model(k: int) -> bytes:
    """The image's content after rounds 1..k."""
    img = bytearray(SIZE)
    for j in range(1, k + 1):
        off = (j * 3 * CHUNK) % SIZE
        img[off:off + CHUNK] = round_bytes(j)
    return bytes(img)


WRITER = """
import random, sys, vdisk
KiB = 1 << 10
SIZE, CHUNK = {size}, {chunk}
with vdisk.open({spec!r}) as img:
    k = 0
    while True:
        k += 1
        off = (k * 3 * CHUNK) % SIZE
        img.write(off, random.Random(k).randbytes(CHUNK))
        img.flush()
        print(k, flush=True)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _writer(spec: str) -> subprocess.Popen:
    code = textwrap.dedent(WRITER.format(size=SIZE, chunk=CHUNK, spec=spec))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def _replicator(src: str, dst: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vdisk.cli", "pool", "replicate", "--interval", "0.2", src, dst],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=30)


def pool_check_clean(url: str) -> None:
    """``vdisk pool check``: no corruption (exit 0), or leaks only (exit 3): the
    objects the source's old generations used, shipped with them, are leaks there as
    in the source until ``vdisk pool gc``."""
    from click.testing import CliRunner

    from vdisk.cli import cli

    r = CliRunner().invoke(cli, ["pool", "check", url])
    assert r.exit_code in (0, 3), r.stdout + r.stderr
    assert "error" not in r.stdout.lower().replace("no errors", ""), r.stdout


def failover(src: str, dst: str, rounds: int = 12) -> dict:
    """Write + flush ``rounds`` rounds while replicating, kill -9 the writer, stop
    the replicator; check the replica is one flushed round and works after promote."""
    run("create", "-f", "pool", f"{src}/disk", str(SIZE))
    w = _writer(f"{src}/disk")
    r = _replicator(src, dst)
    try:
        done = 0
        for line in w.stdout:
            done = int(line)
            if done >= rounds:
                break
        assert done >= rounds, w.stderr.read()
        time.sleep(0.5)  # a pass or two with the writer still going
        w.kill()  # the source's writer dies without closing: a lease left behind
        w.wait(timeout=30)
        done = max([done] + [int(x) for x in w.stdout.read().split()])  # what it flushed before dying
        time.sleep(0.6)
        r.send_signal(signal.SIGTERM)
        out, err = r.communicate(timeout=60)
        assert r.returncode == 0, err
    finally:
        _reap(w)
        _reap(r)
    lines = re.findall(r"^generation (\d+): (\d+) objects, .*, lag ([0-9.]+) s$", out, re.MULTILINE)
    assert lines, out
    lags = [float(x[2]) for x in lines]
    # the replica: read-only, consistent, one flushed round
    with vdisk.open(f"{dst}/disk", read_only=True) as img:
        data = img.read(0, img.size)
    states = {model(k): k for k in range(done + 2)}  # round done+1 may have been committed
    assert data in states, "the replica holds no flushed state of the image"
    shipped = states[data]
    assert shipped >= 1
    assert jrun("check", f"{dst}/disk")["vdisk-result"] == "clean"
    pool_check_clean(dst)
    if dst.startswith("s3://"):
        from vdisk.pool.s3 import S3Backend

        # the killed writer's lease stays in the source; none is shipped to the replica
        assert S3Backend(src).list("leases/") and not S3Backend(dst).list("leases/")
    res = run("create", "-f", "pool", f"{dst}/new", "1M", code=1)
    assert "is a replica of" in res.stderr and "promote" in res.stderr
    with pytest.raises(vdisk.VdiskError, match="replica"), vdisk.open(f"{dst}/disk") as img:
        img.write(0, b"x" * 4096)
        img.flush()
    # failover: promote and write; the source keeps its own history
    p = jrun("pool", "promote", dst)
    assert p["generation"] >= 2
    with vdisk.open(f"{dst}/disk") as img:
        img.write(0, b"promoted" * 512)
        img.flush()
    with vdisk.open(f"{dst}/disk", read_only=True) as img:
        assert img.read(0, 4096) == b"promoted" * 512
        assert img.read(4096, SIZE - 4096) == model(shipped)[4096:]
    pool_check_clean(dst)
    # a promoted pool is its own: replicating into it again is refused
    res = run("pool", "replicate", "--once", src, dst, code=1)
    assert "pool of its own" in res.stderr
    return {"rounds": done, "shipped_round": shipped, "generations": len(lines), "lags": lags}


# ---------------------------------------------------------------------------- local
def test_failover_local_to_local(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    run("pool", "create", src)
    r = failover(src, dst)
    assert r["generations"] >= 2 and all(lag >= 0 for lag in r["lags"])


def objects(root: str) -> set[str]:
    return {f"{d}/{n}" for d in ("packs", "index") if os.path.isdir(os.path.join(root, d))
            for n in os.listdir(os.path.join(root, d)) if not n.startswith(".")}


def _again_nothing_then_only_what_is_new(src: str, dst: str, objects, first: dict) -> set:
    """After a first ``--once`` (``first``): a second ships nothing; after one more write
    to ``src/a`` a third ships exactly the objects ``dst`` lacks, which it returns."""
    again = jrun("pool", "replicate", "--once", src, dst)
    assert again["generations"] == 0 and again["objects"] == 0 and again["generation"] == first["generation"]
    with vdisk.open(f"{src}/a") as img:
        img.write(CHUNK, round_bytes(2))
    new = objects(src) - objects(dst)
    third = jrun("pool", "replicate", "--once", src, dst)
    assert third["generations"] >= 1 and third["objects"] == len(new) >= 1  # only what is new
    return new


def test_once_is_incremental_and_json(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    run("pool", "create", src)
    run("create", "-f", "pool", f"{src}/a", "1M")
    with vdisk.open(f"{src}/a") as img:
        img.write(0, round_bytes(1))
    first = jrun("pool", "replicate", "--once", src, dst)
    assert first["generations"] >= 2 and first["objects"] >= 1 and first["lag"] >= 0
    new = _again_nothing_then_only_what_is_new(src, dst, objects, first)
    assert len(new) < len(objects(src))
    assert objects(src) <= objects(dst)
    with vdisk.open(f"{dst}/a", read_only=True) as img:
        assert img.read(0, 2 * CHUNK) == round_bytes(1) + round_bytes(2)
    assert sorted(os.listdir(os.path.join(src, "packs"))) == sorted(os.listdir(os.path.join(dst, "packs")))


def test_refusals(tmp_path):
    src = str(tmp_path / "src")
    run("pool", "create", src)
    other = str(tmp_path / "other")
    run("pool", "create", other)
    r = run("pool", "replicate", "--once", src, other, code=1)
    assert "another pool" in r.stderr and "Traceback" not in r.stderr
    r = run("pool", "replicate", "--once", src, src, code=1)
    assert "another store" in r.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_bytes(b"x")
    r = run("pool", "replicate", "--once", src, junk, code=1)
    assert "not a vdisk pool" in r.stderr
    # a first attempt that died after its marker, before the config: taken up again
    half = tmp_path / "half"
    half.mkdir()
    (half / "replica").write_bytes(b"partial")
    assert jrun("pool", "replicate", "--once", src, half)["generation"] >= 1
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "NOT-AN-OBJECT").write_bytes(b"x")  # a file no object name matches is still refused
    r = run("pool", "replicate", "--once", src, hidden, code=1)
    assert "not a vdisk pool" in r.stderr
    r = run("pool", "replicate", "--once", str(tmp_path / "nothing"), str(tmp_path / "d2"), code=1)
    assert "not a vdisk pool" in r.stderr
    r = run("pool", "replicate", "--interval", "0", src, str(tmp_path / "d3"), code=1)
    assert "--interval" in r.stderr
    r = run("pool", "promote", src, code=1)
    assert "is not a replica" in r.stderr
    # a replica whose history diverged from the source's (another source of the same id)
    dst = str(tmp_path / "dst")
    run("pool", "replicate", "--once", src, dst)
    import shutil

    fork = str(tmp_path / "fork")
    shutil.copytree(src, fork)
    run("create", "-f", "pool", f"{fork}/x", "1M")
    run("create", "-f", "pool", f"{src}/y", "1M")
    run("pool", "replicate", "--once", src, dst)
    r = run("pool", "replicate", "--once", fork, dst, code=1)
    assert "diverged" in r.stderr


# ---------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from seaweed import Cluster

    c = Cluster(str(tmp_path_factory.mktemp("seaweedfs")))
    try:
        c.start()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in c.env().items():
                mp.setenv(k, v)
            mp.setenv("VDISK_S3_LEASE_TTL", "3")
            mp.delenv("AWS_PROFILE", raising=False)
            yield c
    finally:
        c.stop(graceful=False)


def test_failover_s3_to_s3_second_bucket(cluster):
    tag = os.urandom(3).hex()
    src, dst = f"s3://vdisk-repl-a/{tag}", f"s3://vdisk-repl-b/{tag}"
    run("pool", "create", src)
    r = failover(src, dst)
    assert r["generations"] >= 2


def test_local_to_s3(cluster, tmp_path):
    src, dst = str(tmp_path / "src"), f"s3://vdisk-repl-b/local-{os.urandom(3).hex()}"
    run("pool", "create", src)
    run("create", "-f", "pool", f"{src}/a", "1M")
    with vdisk.open(f"{src}/a") as img:
        img.write(0, round_bytes(7))
    res = jrun("pool", "replicate", "--once", src, dst)
    assert res["generations"] >= 2
    with vdisk.open(f"{dst}/a", read_only=True) as img:
        assert img.read(0, CHUNK) == round_bytes(7)
    pool_check_clean(dst)
    r = run("pool", "replicate", "--once", src, "s3://vdisk-repl-a/" + os.urandom(3).hex() + "x", code=0)
    assert "generation" in r.stdout


def test_once_is_incremental_s3_to_s3(cluster):
    """Incremental between two buckets of the cluster: a second ``--once`` with nothing
    new ships nothing; after one more write it ships exactly the objects the replica
    lacks, far fewer than the pool holds, and the replica reads both writes."""
    from vdisk.pool.s3 import S3Backend

    def objs(url: str) -> set[str]:
        b = S3Backend(url)
        return {n for n in b.list() if n.startswith(("packs/", "index/"))}

    tag = os.urandom(3).hex()
    src, dst = f"s3://vdisk-repl-a/inc-{tag}", f"s3://vdisk-repl-b/inc-{tag}"
    run("pool", "create", src)
    run("create", "-f", "pool", f"{src}/a", str(SIZE))
    with vdisk.open(f"{src}/a") as img:
        for j in range(8):
            img.write(j * 4 * CHUNK, round_bytes(100 + j))
            img.flush()
    first = jrun("pool", "replicate", "--once", src, dst)
    assert first["generations"] >= 2 and first["objects"] >= 8
    new = _again_nothing_then_only_what_is_new(src, dst, objs, first)
    assert len(new) * 4 < len(objs(src)) and objs(src) <= objs(dst)
    with vdisk.open(f"{dst}/a", read_only=True) as img:
        assert img.read(CHUNK, CHUNK) == round_bytes(2) and img.read(4 * CHUNK, CHUNK) == round_bytes(101)
    pool_check_clean(dst)


# ---------------------------------------------------------------------------- live hand-over
@pytest.mark.fuse
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["remount", "activate"])
def test_live_handover_between_mounts(cluster, tmp_path, monkeypatch, how):
    """Live migration: a workload writes model rounds through host A's mount of an
    s3:// image (each round pwrite + fsync, so each is a committed flush); A hands
    over and the workload goes on through host B's mount.  ``remount``: A unmounts
    (flushing and releasing the lease), B mounts (taking the lease at once: it was
    released, no ttl to wait for).  ``activate``: B was mounted ``--inactive`` from
    the start, ``vdisk deactivate A`` flushes and releases the lease with A still
    mounted, ``vdisk activate B`` takes it.  After every round the whole image read
    through the current mount equals the model: no write lost or reordered across
    the hand-over.  The pause the workload sees is reported (figures:
    scripts/bench-pool-replicate)."""
    from vdisk.export.fuse.testing import Rig
    from vdisk.pool import lease as lm
    from vdisk.pool.s3 import S3Backend
    from vdisk.pool.store import Pool

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    pool = f"s3://vdisk-repl-a/mig-{os.urandom(3).hex()}"
    run("pool", "create", pool)
    img = f"{pool}/disk"
    run("create", "-f", "pool", img, str(SIZE))
    rig = Rig(str(tmp_path))
    k = 0

    def rounds(mnt: str, n: int) -> None:
        nonlocal k
        fd = os.open(os.path.join(mnt, "disk"), os.O_RDWR)
        try:
            for _ in range(n):
                k += 1
                os.pwrite(fd, round_bytes(k), (k * 3 * CHUNK) % SIZE)
                os.fsync(fd)
                assert os.pread(fd, SIZE, 0) == model(k), f"round {k}: the image is not the model's"
        finally:
            os.close(fd)

    try:
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        rig.mount(img, a)
        if how == "activate":
            rig.mount(img, b, inactive=True)
        rounds(a, 6)
        t = time.monotonic()
        if how == "remount":
            rig.umount(a)  # host A: flush, release the lease
            rig.mount(img, b)  # host B: takes the lease, reads the state A committed
        else:
            run("deactivate", a)
            run("activate", b)
        print(f"hand-over ({how}): {time.monotonic() - t:.2f} s")
        with open(os.path.join(b, "disk"), "rb") as f:
            assert f.read() == model(k)  # nothing A acknowledged is lost
        rounds(b, 6)
        assert k == 12
        p = Pool(pool, lock=False)
        try:
            rec = p.image_record("disk")
        finally:
            p.close()
        epoch, cur, _age = lm.current(S3Backend(pool), rec["id"])
        assert rec["writer"]["epoch"] == epoch >= 2 and cur and not cur.get("released")  # B holds it
        if how == "activate":
            with pytest.raises(OSError):  # A is inactive: it can never write over B
                with open(os.path.join(a, "disk"), "r+b", buffering=0) as f:
                    f.write(b"stale writer")
            rig.umount(a)
        rig.umount(b)
    finally:
        rig.cleanup()
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, SIZE) == model(12)
    assert jrun("check", img)["vdisk-result"] == "clean"


@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_live_handover_while_the_workload_writes(cluster, tmp_path, monkeypatch):
    """Live migration with the workload running through it, not stopped for it: a
    thread writes model rounds through host A's mount as fast as it can, each round
    acknowledged by pwrite only (an fsync every 8th round), and ``vdisk deactivate A``
    comes in the middle of that, unannounced.  Every round whose pwrite returned on A
    must be on B after ``vdisk activate B`` (deactivation flushes what A acknowledged),
    in order: B reads exactly the model after the last acknowledged round; the first
    round A refused (EROFS) left nothing.  The workload resumes on B with that round;
    the pause it saw (its last acknowledged write on A to its first on B) is reported."""
    import errno
    import threading

    from vdisk.export.fuse.testing import Rig

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    pool = f"s3://vdisk-repl-a/live-{os.urandom(3).hex()}"
    run("pool", "create", pool)
    img = f"{pool}/disk"
    run("create", "-f", "pool", img, str(SIZE))
    rig = Rig(str(tmp_path))
    acked: list[tuple[int, float]] = []  # (round, when its pwrite returned)
    refused: list[tuple[int, int]] = []  # (round, errno)

    def workload(mnt: str) -> None:
        fd = os.open(os.path.join(mnt, "disk"), os.O_RDWR)
        try:
            k = 0
            while k < 2000:
                k += 1
                try:
                    os.pwrite(fd, round_bytes(k), (k * 3 * CHUNK) % SIZE)
                    if k % 8 == 0:
                        os.fsync(fd)
                except OSError as exc:
                    refused.append((k, exc.errno))
                    return
                acked.append((k, time.monotonic()))
        finally:
            os.close(fd)

    try:
        a, b = str(tmp_path / "a"), str(tmp_path / "b")
        rig.mount(img, a)
        rig.mount(img, b, inactive=True)
        th = threading.Thread(target=workload, args=(a,), daemon=True)
        th.start()
        deadline = time.monotonic() + 60
        while len(acked) < 20:
            assert th.is_alive() and time.monotonic() < deadline, refused
            time.sleep(0.01)
        run("deactivate", a)  # while the thread writes
        th.join(60)
        assert not th.is_alive() and refused and refused[0][1] == errno.EROFS, (refused, len(acked))
        k, t_last = acked[-1]
        assert refused[0][0] == k + 1 and [r for r, _ in acked] == list(range(1, k + 1))
        with open(os.path.join(a, "disk"), "rb") as f:
            assert f.read() == model(k)  # A, inactive, serves what it committed: every acknowledged round
        run("activate", b)
        fd = os.open(os.path.join(b, "disk"), os.O_RDWR)
        try:
            assert os.pread(fd, SIZE, 0) == model(k), f"B does not hold the model after round {k}"
            for j in range(k + 1, k + 9):  # the workload goes on on B, from the refused round
                os.pwrite(fd, round_bytes(j), (j * 3 * CHUNK) % SIZE)
                if j == k + 1:
                    pause = time.monotonic() - t_last
                os.fsync(fd)
            assert os.pread(fd, SIZE, 0) == model(k + 8)
        finally:
            os.close(fd)
        print(f"hand-over under a running workload after {k} rounds: pause {pause:.2f} s")
        rig.umount(a)
        rig.umount(b)
    finally:
        rig.cleanup()
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, SIZE) == model(k + 8)
    assert jrun("check", img)["vdisk-result"] == "clean"
