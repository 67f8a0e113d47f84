"""Pools on an S3 object store, on a real SeaweedFS cluster (tier 3).

The cluster (tests/seaweed.py: a master, three volume servers with replication 001,
a filer with the S3 gateway, all on 127.0.0.1) is started once for the module and
stopped at its end, also when a test fails.  Each test has its own pool under its own
prefix.  What is shown here: every command on ``s3://BUCKET/PREFIX/IMAGE``, the
conditional put, the writer lease (a second writer's error names the holder; a
writer that lost its lease while paused cannot commit over the new one), flushed
data surviving a kill -9 of the writer, a volume server killed during writes, a lazy
clone fetching about what its reader reads, a dead store giving one clear error, a
mount of IMAGE and of IMAGE@SNAP, the
write-back of packs bounded, and ``vdisk diff export``/``import`` with s3:// images as
source and as destination (to and from local pools and files; resumed after an
interrupted export and a killed import).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from imagetools import jrun, run
from seaweed import Cluster, FaultProxy

import vdisk

MiB = 1 << 20
BUCKET = "vdisk-test"
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("seaweedfs")))
    try:
        c.start()
        with pytest.MonkeyPatch.context() as mp:
            for k, v in c.env().items():
                mp.setenv(k, v)
            mp.setenv("VDISK_S3_LEASE_TTL", "3")  # leases expire quickly in these tests
            mp.delenv("AWS_PROFILE", raising=False)
            yield c
    finally:
        c.stop(graceful=False)


@pytest.fixture
def s3pool(cluster, request):
    url = f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')[:60]}-{os.urandom(3).hex()}"
    run("pool", "create", url)
    return url


def pattern(seed: int, n: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def content(spec: str, **kw) -> bytes:
    with vdisk.open(spec, read_only=True, **kw) as img:
        return img.read(0, img.size)


def _child(code: str, **popen) -> subprocess.Popen:
    """A Python process (another "host" as far as the pool knows: its own cache, its own
    lease) running ``code``; it talks over stdin/stdout lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


def _expect(p: subprocess.Popen, want: str) -> str:
    line = p.stdout.readline().strip()
    if line != want:
        p.kill()
        raise AssertionError(f"child said {line!r}, expected {want!r}; stderr: {p.stderr.read()}")
    return line


# ---------------------------------------------------------------------------- commands
def test_every_command_on_an_s3_pool(s3pool, tmp_path):
    raw = tmp_path / "src.raw"
    data = pattern(1, 3 * MiB) + bytes(MiB)
    raw.write_bytes(data)
    img = f"{s3pool}/disk"
    run("convert", "-f", "raw", "-O", "pool", raw, img)
    run("compare", "-f", "raw", raw, img)
    info = jrun("info", img)
    assert info["format"] == "pool" and info["virtual-size"] == 4 * MiB
    run("snapshot", "-c", "s1", img)
    assert [s["name"] for s in jrun("snapshot", "list", img)] == ["s1"]
    # a native clone shares the snapshot's tree and holds it
    run("clone", f"{img}@s1", f"{s3pool}/clone")
    assert content(f"{s3pool}/clone") == data
    r = run("rm", img, code=1)
    assert f"{s3pool}/clone" in r.stderr  # named where it is, not as a mangled local path
    with vdisk.open(f"{s3pool}/clone") as c:
        c.write(0, b"clone!" * 100)
        c.flush()
    assert content(f"{s3pool}/clone")[:600] == b"clone!" * 100
    assert content(img) == data and content(img, snapshot="s1") == data
    run("create", f"{s3pool}/empty", "16M")
    assert content(f"{s3pool}/empty") == bytes(16 * MiB)
    assert jrun("check", img)["vdisk-result"] == "clean"
    names = sorted(i["name"] for i in jrun("pool", "ls", s3pool))
    assert names == ["clone", "disk", "empty"]
    assert jrun("pool", "info", s3pool)["images"] == 3
    r = run("pool", "check", s3pool)
    assert "No errors" in r.stdout
    run("convert", "-O", "raw", f"{img}@s1", tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == data
    run("rm", f"{s3pool}/clone")
    run("rm", img)
    assert [i["name"] for i in jrun("pool", "ls", s3pool)] == ["empty"]
    from vdisk.pool.s3 import S3Backend

    leases = S3Backend(s3pool).list("leases/")
    assert leases == []  # the removed images' went with them; "empty" was never opened for writing
    assert jrun("pool", "info", s3pool)["objects"]["other"]["count"] == 0


def test_pool_create_refuses_a_used_prefix_and_bad_urls(s3pool, cluster):
    r = run("pool", "create", s3pool, code=1)
    assert "holds objects already" in r.stderr
    r = run("pool", "create", "s3://Bad_Bucket/x", code=1)
    assert "not a valid bucket name" in r.stderr
    r = run("info", f"s3://{BUCKET}/no-pool-here/img", code=1)
    assert "not a vdisk pool" in r.stderr
    # (gc and dedup on object stores: tests/test_pool_s3_gc.py)


def test_conditional_put(cluster):
    from vdisk.pool.s3 import S3Backend

    b = S3Backend(f"s3://{BUCKET}/cond-{os.urandom(3).hex()}")
    b.ensure_bucket()
    assert b.put_if_absent("gen/0000000000000001", b"mine")
    assert not b.put_if_absent("gen/0000000000000001", b"theirs")
    # a retry of our own put whose answer was lost finds our bytes: it is ours
    assert b.put_if_absent("gen/0000000000000001", b"mine")
    assert b.get("gen/0000000000000001") == b"mine"
    b.put("packs/0000000000000003", b"p" * 1000)  # written back
    assert b.get_range("packs/0000000000000003", 10, 5) == b"ppppp"
    b.barrier()
    assert b.list("packs/") == ["packs/0000000000000003"]
    assert b.get_range("packs/0000000000000003", 2000, 10) == b""
    b.close()


# ---------------------------------------------------------------------------- leases
def test_second_writer_is_refused_naming_the_holder(s3pool):
    img = f"{s3pool}/disk"
    run("create", img, "4M")
    with vdisk.open(img) as w:
        w.write(0, b"x" * 4096)
        w.flush()
        with pytest.raises(vdisk.errors.ImageLocked) as ei:
            vdisk.open(img)
        msg = str(ei.value)
        assert socket.gethostname() in msg and f"pid {os.getpid()}" in msg and "since" in msg
        r = run("info", img, code=1)  # a reader of the live state that does not share
        assert "being written by" in r.stderr
        run("info", "-U", img)
    with vdisk.open(img) as w2:  # released at close: free at once
        assert w2.read(0, 4096) == b"x" * 4096


def test_a_writer_that_lost_its_lease_cannot_commit(s3pool):
    """A writer is paused (SIGSTOP) past its lease; a second one takes the image over
    and commits; the first, resumed, must fail its flush and change nothing."""
    img = f"{s3pool}/disk"
    run("create", img, "4M")
    a = _child(f"""
        import sys, vdisk
        img = vdisk.open({img!r})
        img.write(0, b"A1" * 2048); img.flush()
        print("flushed", flush=True)
        sys.stdin.readline()
        img.write(0, b"A2" * 2048); img.write(8192, b"A2" * 2048)
        try:
            img.flush()
            print("committed", flush=True)
        except vdisk.errors.VdiskError as exc:
            print("refused", flush=True); print(exc, flush=True)
        try:
            img.close()
        except vdisk.errors.VdiskError:
            pass
    """)
    try:
        _expect(a, "flushed")
        os.kill(a.pid, signal.SIGSTOP)
        # the lease is held while A runs ...
        with pytest.raises(vdisk.errors.ImageLocked):
            vdisk.open(img)
        deadline = time.monotonic() + 30
        while True:  # ... and free once A, paused, missed its renewals (ttl 3 s)
            try:
                b = vdisk.open(img)
                break
            except vdisk.errors.ImageLocked:
                assert time.monotonic() < deadline, "the paused writer's lease never expired"
                time.sleep(0.5)
        with b:
            assert b.read(0, 4096) == b"A1" * 2048  # B sees everything A flushed
            b.write(0, b"B1" * 2048)
            b.flush()
            os.kill(a.pid, signal.SIGCONT)
            a.stdin.write("go\n")
            a.stdin.flush()
            _expect(a, "refused")
            why = a.stdout.readline()
            assert "lost its lease" in why and f"pid {os.getpid()}" in why
        assert a.wait(30) == 0
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
            a.wait()
    got = content(img)
    assert got[:4096] == b"B1" * 2048 and got[8192:12288] == bytes(4096)  # nothing of A's second round
    assert jrun("check", img)["vdisk-result"] == "clean"


def test_flushed_data_survives_kill_9_of_the_writer(s3pool):
    img = f"{s3pool}/disk"
    run("create", img, "8M")
    data = pattern(7, 2 * MiB)
    a = _child(f"""
        import os, vdisk
        from test_pool_s3 import pattern
        img = vdisk.open({img!r})
        img.write(MiB := 1 << 20, pattern(7, 2 * MiB)); img.flush()
        print("flushed", flush=True)
        img.write(0, b"unflushed" * 100)   # never flushed: may be lost, never half-there
        os.kill(os.getpid(), 9)
    """)
    _expect(a, "flushed")
    a.wait(30)
    assert a.returncode == -9
    # the dead writer's lease expires (ttl 3 s); then a new writer opens, no repair
    deadline = time.monotonic() + 30
    while True:
        try:
            w = vdisk.open(img)
            break
        except vdisk.errors.ImageLocked as exc:
            assert "being written by" in str(exc)
            assert time.monotonic() < deadline
            time.sleep(0.5)
    with w:
        assert w.read(MiB, 2 * MiB) == data
        assert w.read(0, 900) in (bytes(900), b"unflushed" * 100)
    assert jrun("check", img)["vdisk-result"] == "clean"
    assert "No errors" in run("pool", "check", s3pool).stdout


def test_kill_9_of_a_writer_mid_commit(s3pool):
    """The writer writes and flushes 256 KiB chunks in a loop and is killed at some
    point inside that loop (mostly inside a flush: packs going up, the generation being
    put); the next writer opens the image without repair, every acknowledged chunk is
    there, and the one in flight is wholly there or wholly absent."""
    img = f"{s3pool}/disk"
    run("create", img, "16M")
    a = _child(f"""
        import vdisk
        from test_pool_s3 import pattern
        img = vdisk.open({img!r})
        print("open", flush=True)
        for i in range(64):
            img.write(i * 262144, pattern(300 + i, 262144))
            img.flush()
            print(i, flush=True)
    """)
    _expect(a, "open")
    acked = -1
    while acked < 5:
        acked = int(a.stdout.readline())
    a.kill()  # SIGKILL, while it is in a later write or flush
    a.wait(30)
    for line in a.stdout.read().split():
        acked = int(line)
    deadline = time.monotonic() + 30
    while True:
        try:
            w = vdisk.open(img, read_only=True)
            break
        except vdisk.errors.ImageLocked:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    with w:
        for i in range(acked + 1):
            assert w.read(i * 262144, 262144) == pattern(300 + i, 262144), f"acknowledged chunk {i} lost"
        nxt = w.read((acked + 1) * 262144, 262144)
        assert nxt in (bytes(262144), pattern(301 + acked, 262144))
    assert jrun("check", img)["vdisk-result"] == "clean"
    assert "No errors" in run("pool", "check", s3pool).stdout


# ---------------------------------------------------------------------------- faults
@pytest.mark.timeout(300)
def test_a_volume_server_killed_during_writes(s3pool, cluster):
    """Writes go on or fail cleanly while one of three volume servers is down; after
    its restart, every flushed write reads back."""
    img = f"{s3pool}/disk"
    run("create", img, "32M")
    acked: dict[int, bytes] = {}
    failures = []
    with vdisk.open(img) as w:
        for i in range(16):
            if i == 6:
                cluster.kill("volume2")
            chunk = pattern(100 + i, MiB)
            try:
                w.write(i * MiB, chunk)
                w.flush()
                acked[i] = chunk
            except vdisk.errors.VdiskError as exc:
                failures.append(str(exc))
                break  # a failed flush is final for this open (as a failed fsync)
    cluster.restart("volume2")
    cluster.wait_ready()
    assert len(acked) >= 6
    for f in failures:
        assert "s3://" in f  # a clear error naming the store
    got = content(img)
    for i, chunk in acked.items():
        assert got[i * MiB:(i + 1) * MiB] == chunk, f"flushed MiB {i} lost"
    assert jrun("check", img)["vdisk-result"] == "clean"
    print(f"volume server down: {len(acked) - 6} of {16 - 6} MiB flushes went on, {len(failures)} failed")


def test_a_dead_store_is_one_clear_error(cluster, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("VDISK_S3_ATTEMPTS", "2")
    monkeypatch.setenv("VDISK_S3_CONNECT_TIMEOUT", "1")
    r = run("info", f"s3://{BUCKET}/gone/img", code=1)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://vdisk-test/gone" in lines[0] and "failed" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.fuse
@pytest.mark.timeout(240)
def test_store_errors_and_slowness_are_retried_then_eio(s3pool, cluster, tmp_path, monkeypatch):
    """Between client and gateway, a proxy that answers 503 or is slow: a few errors are
    retried away; a store that keeps failing gives one clear error to a command and
    EIO to a reader of a mount (which then goes on once the store is back)."""
    from vdisk.export.fuse.testing import Rig

    proxy = FaultProxy(cluster.state["ports"]["s3"])
    rig = Rig(str(tmp_path))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("VDISK_S3_ATTEMPTS", "3")
        monkeypatch.setenv("VDISK_S3_READ_TIMEOUT", "2")
        monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
        img = f"{s3pool}/disk"
        run("create", img, "8M")
        data = pattern(21, 4 * MiB)
        with vdisk.open(img) as w:
            w.write(0, data)
        proxy.set("error", budget=2)  # transient: retried with backoff
        assert content(img)[:4 * MiB] == data
        assert proxy.injected == 2
        proxy.set("slow", delay=0.1)  # slow, within the timeouts: only slower
        assert content(img)[:4 * MiB] == data
        proxy.set("error")  # down for good: bounded retries, then one line naming the store
        r = run("info", img, code=1)
        assert r.stderr.count("\n") == 1 and f"{s3pool}" in r.stderr and "SlowDown" in r.stderr
        proxy.set("ok")
        mnt = str(tmp_path / "mnt")
        rig.mount(img, mnt)
        proxy.set("error")
        fd = os.open(os.path.join(mnt, "disk"), os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 65536)
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [buf], 2 * MiB)  # never read by the mount: must be fetched
            assert ei.value.errno == 5  # EIO, not a hang
            proxy.set("ok")
            assert os.preadv(fd, [buf], 2 * MiB) == 65536 and bytes(buf) == data[2 * MiB:2 * MiB + 65536]
        finally:
            os.close(fd)
        rig.umount(mnt)
        logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "run").iterdir() if f.suffix == ".log")
        assert "SlowDown" in logs and s3pool in logs  # the mount's log says why
    finally:
        proxy.set("ok")
        rig.cleanup()
        proxy.close()


def test_the_write_back_of_packs_is_bounded(s3pool, cluster, monkeypatch):
    """Issue 16 item 1, a bounded write-back: packs are uploaded in the background, but
    never more than VDISK_S3_WRITEBACK_MB of them at once; a writer faster than the
    store (here a proxy holding every chunk 1 ms) waits instead of piling up memory,
    and everything it wrote reads back after the flush."""
    from vdisk.pool.s3 import S3Backend

    proxy = FaultProxy(cluster.state["ports"]["s3"])
    seen: list[int] = []
    upload = S3Backend._upload

    def counting(self, name, data):
        seen.append(self._in_flight)  # this upload's bytes included
        return upload(self, name, data)

    try:
        img = f"{s3pool}/disk"
        run("create", img, "16M")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("VDISK_S3_WRITEBACK_MB", "1")
        monkeypatch.setattr(S3Backend, "_upload", counting)
        proxy.set("slow", delay=0.001)
        data = pattern(31, 4 * MiB)
        with vdisk.open(img) as w:
            for off in range(0, len(data), MiB):
                w.write(off, data[off:off + MiB])
            w.flush()
        proxy.set("ok")
        assert len(seen) >= 8, seen
        assert max(seen) <= MiB, f"{max(seen)} bytes in flight, the bound is {MiB}"
        assert max(seen) >= MiB // 2, seen  # the writer did get ahead of the store: the bound held it
    finally:
        proxy.set("ok")
        proxy.close()
        monkeypatch.undo()
    assert content(img)[:4 * MiB] == data
    assert jrun("check", img)["vdisk-result"] == "clean"


# ---------------------------------------------------------------------------- lazy clones
def test_a_lazy_clone_fetches_about_what_it_reads(s3pool):
    """A clone on another "host" (a fresh process view: its own empty cache) reads
    1 MiB of a 16 MiB golden image: it fetches that MiB and some tree nodes, not the
    image."""
    from vdisk.pool.image import PoolImage
    from vdisk.pool.store import Pool

    golden = f"{s3pool}/golden"
    run("create", golden, "16M")
    with vdisk.open(golden) as g:
        g.write(0, pattern(5, 16 * MiB))
    run("snapshot", "-c", "base", golden)
    run("clone", f"{golden}@base", f"{s3pool}/vm1")
    pool = Pool(s3pool)
    try:
        img = PoolImage(pool, "vm1", read_only=True)
        before = pool.backend.bytes_fetched
        got = img.read(4 * MiB, MiB, None)
        fetched = pool.backend.bytes_fetched - before
        img.close()
    finally:
        pool.close()
    assert got == pattern(5, 16 * MiB)[4 * MiB:5 * MiB]
    assert MiB <= fetched < 1.2 * MiB, fetched  # random data: stored raw, 4 KiB per block
    print(f"lazy clone: read {MiB} bytes, fetched {fetched} bytes ({fetched / MiB:.3f}x)")


# ---------------------------------------------------------------------------- mount
@pytest.mark.fuse
@pytest.mark.timeout(180)
def test_mount_an_s3_pool_image(s3pool, tmp_path, monkeypatch):
    from vdisk.export.fuse.testing import Rig
    from vdisk.export.fuse.testing import run as sh

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    img = f"{s3pool}/disk"
    run("create", img, "8M")
    run("snapshot", "-c", "empty", img)
    data = pattern(11, MiB)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    mnt = str(tmp_path / "mnt")
    rig = Rig(str(tmp_path))
    try:
        rig.mount(img, mnt)
        assert os.path.getsize(os.path.join(mnt, "disk")) == 8 * MiB
        sh("dd", f"if={src}", f"of={mnt}/disk", "bs=64k", f"seek={MiB // 65536}", "conv=notrunc,fsync",
           "oflag=direct")
        with open(os.path.join(mnt, "disk"), "rb") as f:
            f.seek(MiB)
            assert f.read(MiB) == data
        r = run("info", img, code=1)  # the mount holds the lease
        assert "being written by" in r.stderr
        rig.umount(mnt)
    finally:
        rig.cleanup()
    got = content(img)
    assert got[MiB:2 * MiB] == data and got[:MiB] == bytes(MiB)
    assert content(img, snapshot="empty") == bytes(8 * MiB)
    assert json.loads(run("check", img, "--output", "json").stdout)["vdisk-result"] == "clean"


@pytest.mark.fuse
def test_mount_a_snapshot_of_an_s3_pool_image(s3pool, tmp_path, monkeypatch):
    """``vdisk mount s3://BUCKET/PREFIX/IMAGE@SNAP``: read-only, the snapshot's content
    while the image has moved on, writes refused; it takes no lease, so a writer can
    open the image meanwhile."""
    import errno

    from vdisk.export.fuse.testing import run as sh

    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    img = f"{s3pool}/disk"
    run("create", img, "4M")
    old = pattern(12, 2 * MiB)
    with vdisk.open(img) as w:
        w.write(0, old)
        w.snapshot_create("s1")
        w.write(0, pattern(13, MiB))
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    try:
        run("mount", f"{img}@s1", mnt)
        with open(os.path.join(mnt, "disk"), "rb") as f:
            assert f.read(2 * MiB) == old
        with pytest.raises(OSError) as ei:
            fd = os.open(os.path.join(mnt, "disk"), os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
        assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        with vdisk.open(img) as w:  # the snapshot's mount holds no lease
            w.write(3 * MiB, b"live" * 1024)
        run("umount", mnt)
    finally:
        if os.path.ismount(mnt):
            sh("fusermount3", "-u", "-z", mnt)
    assert content(img, snapshot="s1")[:2 * MiB] == old
    assert content(img)[:MiB] == pattern(13, MiB)


# ---------------------------------------------------------------------------- hosts
def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def three_namespaces():
    """Network namespaces "store", "host A" and "host B" of this test's own, with a veth
    link from each host to the store (10.213.0.0/30 and 10.213.0.4/30); removed at the
    end, also when the test fails."""
    tag = f"{os.getpid() % 100000}"
    ns = {k: f"vdk{k}{tag}" for k in ("s", "a", "b")}
    made = []
    try:
        for n in ns.values():
            _sh("ip", "netns", "add", n)
            made.append(n)
            _sh("ip", "-n", n, "link", "set", "lo", "up")
        for host, store_ip, host_ip in (("a", "10.213.0.1", "10.213.0.2"), ("b", "10.213.0.5", "10.213.0.6")):
            v0, v1 = f"vs{host}{tag}", f"vh{host}{tag}"
            _sh("ip", "link", "add", v0, "netns", ns["s"], "type", "veth", "peer", "name", v1, "netns", ns[host])
            _sh("ip", "-n", ns["s"], "addr", "add", f"{store_ip}/30", "dev", v0)
            _sh("ip", "-n", ns[host], "addr", "add", f"{host_ip}/30", "dev", v1)
            _sh("ip", "-n", ns["s"], "link", "set", v0, "up")
            _sh("ip", "-n", ns[host], "link", "set", v1, "up")
        yield ns
    finally:
        for n in made:  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "delete", n], check=False, capture_output=True, timeout=30)


def _on_host(ns: str, cluster: Cluster, endpoint: str, code: str) -> dict:
    env = {**os.environ, **cluster.env(), "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"host {ns}: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.timeout(240)
def test_two_hosts_in_their_own_network_namespaces(three_namespaces, tmp_path, monkeypatch):
    """Host A creates and fills a golden image in an s3:// pool; host B, another process
    in another network namespace with its own cache, clones it lazily and reads part of
    it: it fetches about what it reads; then it mounts the clone, reads and writes it."""
    ns = three_namespaces
    monkeypatch.setenv("VDISK_RUN_DIR", str(tmp_path / "run"))
    c = Cluster(str(tmp_path / "store"), netns=ns["s"], s3_bind="0.0.0.0")  # inside the store namespace
    try:
        c.start()
        port = c.state["ports"]["s3"]
        pool = f"s3://{BUCKET}/hosts"
        a = _on_host(ns["a"], c, f"http://10.213.0.1:{port}", f"""
            import json, vdisk
            from imagetools import run
            from test_pool_s3 import pattern
            run("pool", "create", {pool!r})
            run("create", "{pool}/golden", "16M")
            with vdisk.open("{pool}/golden") as g:
                g.write(0, pattern(9, 16 << 20))
            run("snapshot", "-c", "base", "{pool}/golden")
            print(json.dumps({{"ok": True}}))
        """)
        assert a["ok"]
        b = _on_host(ns["b"], c, f"http://10.213.0.5:{port}", f"""
            import json, vdisk
            from imagetools import run
            from test_pool_s3 import pattern
            from vdisk.pool.store import Pool
            from vdisk.pool.image import PoolImage
            run("clone", "{pool}/golden@base", "{pool}/vm1")
            pool = Pool({pool!r})
            img = PoolImage(pool, "vm1", read_only=True)
            before = pool.backend.bytes_fetched
            got = img.read(6 << 20, 2 << 20, None)
            fetched = pool.backend.bytes_fetched - before
            img.close(); pool.close()
            import os, subprocess, sys
            vd = os.path.join(os.path.dirname(sys.executable), "vdisk")
            mnt = {str(tmp_path / "mnt")!r}
            os.makedirs(mnt, exist_ok=True)
            subprocess.run([vd, "mount", "{pool}/vm1", mnt], check=True, timeout=60)
            try:
                with open(os.path.join(mnt, "disk"), "r+b") as f:
                    f.seek(1 << 20)
                    mounted = f.read(1 << 20) == pattern(9, 16 << 20)[1 << 20: 2 << 20]
                    f.seek(0); f.write(b"host B" * 100); f.flush(); os.fsync(f.fileno())
            finally:
                subprocess.run([vd, "umount", mnt], check=True, timeout=60)
            with vdisk.open("{pool}/vm1", read_only=True) as v:
                written = v.read(0, 600) == b"host B" * 100
            print(json.dumps({{"same": got == pattern(9, 16 << 20)[6 << 20: 8 << 20], "fetched": fetched,
                              "mounted": mounted, "written": written}}))
        """)
        assert b["same"] and b["mounted"] and b["written"]
        assert 2 * MiB <= b["fetched"] < 2.2 * MiB, b
        print(f"host B: read {2 * MiB} bytes of a 16 MiB golden image's clone, fetched {b['fetched']}")
    finally:
        c.stop(graceful=False)


# ---------------------------------------------------------------------------- diff streams
def _diff_history(img: str) -> None:
    """Snapshots A and B of the 8 MiB s3:// image ``img``: B rewrites part of a chunk,
    zeroes one and adds one."""
    with vdisk.open(img) as w:
        w.write(0, pattern(21, 2 * MiB))
        w.write(5 * MiB, pattern(22, MiB))
        w.snapshot_create("A")
        w.write(MiB + 4096, pattern(23, 4096))
        w.write_zeroes(5 * MiB, MiB)
        w.write(7 * MiB, pattern(24, MiB))
        w.snapshot_create("B")


def test_diff_export_import_between_s3_local_pools_and_files(s3pool, tmp_path):
    """``vdisk diff export`` from an s3:// image's snapshots, ``vdisk diff import`` into
    an image of another s3:// pool, of a local pool and a file, and back from a file's
    snapshots into an s3:// image (issue 16 item 7)."""
    src = f"{s3pool}/src"
    run("create", src, "8M")
    _diff_history(src)
    full, ab = tmp_path / "a.full", tmp_path / "ab.vdiff"
    assert jrun("diff", "export", f"{src}@A", full)["full"] is True
    j = jrun("diff", "export", f"{src}@A", f"{src}@B", ab)
    assert (j["data_records"], j["zero_records"], j["zero_bytes"]) == (2, 1, MiB)
    # into another s3:// pool, a local pool and a file
    other = f"{s3pool}-dst"
    run("pool", "create", other)
    local = tmp_path / "pool"
    run("pool", "create", local)
    targets = [f"{other}/copy", f"{local}/copy", str(tmp_path / "copy.vdk")]
    for t in targets:
        run("create", "-f", "pool" if "://" in t or str(local) in t else "vdk", t, "8M")
        run("diff", "import", full, t, "-q")
        assert content(t) == content(src, snapshot="A")
        run("diff", "import", ab, t, "-q")
        assert content(t) == content(src, snapshot="B")
        run("compare", f"{src}@B", t)
    assert jrun("check", f"{other}/copy")["vdisk-result"] == "clean"
    r = run("pool", "check", other, code=3)  # leaks only: the packs B's import overwrote, until gc
    assert "no harm to data" in r.stdout and "Error" not in r.stdout
    # a damaged stream is refused before anything of that record reaches the s3:// image
    bad = tmp_path / "bad.vdiff"
    bad.write_bytes(ab.read_bytes())
    from imagetools import flip_byte

    run("create", f"{other}/a-only", "8M")
    run("diff", "import", full, f"{other}/a-only", "-q")
    flip_byte(bad, 70)  # in record 0's payload
    r = run("diff", "import", bad, f"{other}/a-only", code=2)
    assert "record 0" in r.stderr and r.stderr.count("\n") == 1
    assert content(f"{other}/a-only") == content(src, snapshot="A")
    # and back: a local file's snapshots into an s3:// image
    f = str(tmp_path / "f.vdk")
    vdisk.create(f, 8 * MiB, format="vdk")
    with vdisk.open(f) as w:
        w.write(3 * MiB, pattern(25, MiB))
        w.snapshot_create("X")
        w.write(3 * MiB + 8192, pattern(26, 65536))
        w.snapshot_create("Y")
    run("diff", "export", f"{f}@X", tmp_path / "x", "-q")
    run("diff", "export", f"{f}@X", f"{f}@Y", tmp_path / "xy", "-q")
    back = f"{s3pool}/back"
    run("create", back, "8M")
    run("diff", "import", tmp_path / "x", back, "-q")
    run("diff", "import", tmp_path / "xy", back, "-q")
    run("compare", f"{f}@Y", back)
    assert jrun("check", back)["vdisk-result"] == "clean"


def test_diff_export_from_s3_and_import_into_s3_resume(s3pool, tmp_path):
    """Resumable on an object store (issue 16 item 7): an export from s3:// snapshots
    stopped after 2 records resumes to the very stream an uninterrupted export writes;
    ``vdisk diff import`` into an s3:// image killed with SIGKILL after its second
    checkpoint resumes (once the dead importer's lease expired) to the target's B."""
    src = f"{s3pool}/src"
    run("create", src, "8M")
    _diff_history(src)
    from vdisk.ops.diff import Interrupted, export_diff, progress_path

    whole, out = tmp_path / "whole", tmp_path / "s"
    run("diff", "export", f"{src}@A", f"{src}@B", whole, "-q")
    with vdisk.open(src, read_only=True, snapshot="A") as ia, vdisk.open(src, read_only=True, snapshot="B") as ib, \
            pytest.raises(Interrupted):
        export_diff(ia, ib, str(out), stop_after=2)
    assert not out.exists() and os.path.exists(f"{out}.part")
    assert jrun("diff", "export", "--resume", f"{src}@A", f"{src}@B", out)["resumed_records"] == 2
    assert out.read_bytes() == whole.read_bytes()
    # a target holding A, then an importer killed mid-stream
    run("diff", "export", f"{src}@A", tmp_path / "a", "-q")
    dst = f"{s3pool}/dst"
    run("create", dst, "8M")
    run("diff", "import", tmp_path / "a", dst, "-q")
    child = _child(f"""
        import os, vdisk
        from vdisk.ops.diff import import_diff
        n = 0
        def tick(_n):
            global n
            n += 1
            print(n, flush=True)
            if n == 3:
                os.kill(os.getpid(), 9)   # after record 2 was checkpointed, record 3 written
        with vdisk.open({dst!r}) as img:
            import_diff({str(out)!r}, img, image_name={dst!r}, checkpoint_every=1, progress=tick)
        print("finished", flush=True)
    """)
    said = child.communicate(timeout=60)[0].split()
    assert child.returncode == -9 and said == ["1", "2", "3"], (child.returncode, said)
    with open(progress_path(str(out))) as f:
        assert json.load(f)["records"] == 2  # record 3 was written after the last checkpoint
    deadline = time.monotonic() + 30
    while True:  # the killed importer's lease (ttl 3 s) is in the way until it expires, named
        r = run("diff", "import", out, dst, code=1)
        if "being written by" not in r.stderr:
            break
        assert f"(pid {child.pid})" in r.stderr
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert "give --resume" in r.stderr  # a plain import does not start over the interrupted one
    r = run("diff", "import", "--resume", out, dst, "--output", "json")
    assert json.loads(r.stdout)["resumed_records"] == 2
    assert not os.path.exists(progress_path(str(out)))
    assert content(dst) == content(src, snapshot="B")
    assert jrun("check", dst)["vdisk-result"] == "clean"


def test_read_caches_follow_writes_flushes_and_roots(tmp_path):
    import random  # issue 16: clean leaves remembered per root, decoded blocks per blob

    from vdisk.pool.image import PoolImage
    from vdisk.pool.store import Pool, new_image_record
    B, url = 4096, str(tmp_path / "pool")
    p = Pool.create(url) or Pool(url)
    p.commit(lambda cat: cat["images"].__setitem__("img", new_image_record(64 * MiB)))
    img = PoolImage(p, "img", read_only=False)
    a, b = random.Random(1).randbytes(3 * B), random.Random(2).randbytes(B)
    img.write(B, a, None), img.flush()
    old = img.root
    assert img.read(B, 3 * B, None) == a and img.read(B + 100, 5000, None) == a[100:5100]
    img.write(2 * B, b, None)  # a dirty leaf wins over the remembered clean one
    assert img.read(B, 3 * B, None) == a[:B] + b + a[2 * B:]
    img.flush()
    assert img.read(2 * B, B, None) == b
    img.root = old  # as snapshot_revert does: the remembered leaves go with the root
    assert img.read(2 * B, B, None) == a[B:2 * B] and img.read(40 * MiB, 2 * B, None) == bytes(2 * B)
    img.close(), p.close()


def test_fast_ranges_fall_back_and_give_up():
    from types import SimpleNamespace

    from vdisk.pool import s3http
    client = SimpleNamespace(meta=SimpleNamespace(endpoint_url="http://127.0.0.1:9"),  # nothing listens
                             generate_presigned_url=lambda op, Params, ExpiresIn: "http://127.0.0.1:9/b/k?X=1")
    f = s3http.FastRanges(client, "b", 0.5, 0.5)
    assert all(f.get_range("k", 16, 4096) is None for _ in range(s3http.GIVE_UP + 1))  # the caller asks boto3
    assert not f.on and f.fallbacks == s3http.GIVE_UP


def test_fast_ranges_reconnect_when_the_store_closed_a_kept_alive_connection():
    """The store may close an idle keep-alive connection: the next GET on it fails once
    and is repeated on a new connection, not handed to boto3 (and never gives up)."""
    import http.server
    import threading
    from types import SimpleNamespace

    from vdisk.pool import s3http

    body = bytes(range(256)) * 64
    conns = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            conns.append(self.client_address)
            a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
            part = body[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{a + len(part) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part)
            self.close_connection = True  # as an idle timeout would, without saying so

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/b/k?X-Amz-Signature=1"
        client = SimpleNamespace(meta=SimpleNamespace(endpoint_url=url),
                                 generate_presigned_url=lambda op, Params, ExpiresIn: url)
        f = s3http.FastRanges(client, "b", 2.0, 2.0)
        for off in (16, 4096, 9000):
            assert f.get_range("k", off, 100) == body[off:off + 100]
        assert (f.hits, f.fallbacks) == (3, 0) and len(conns) == 3
        assert len({port for _h, port in conns}) == 3  # each on a new connection
        f.close()
    finally:
        srv.shutdown()
        srv.server_close()
