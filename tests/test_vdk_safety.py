"""Safety of the vdk driver and of convert against what users hit in the field:

1. shrinking a huge sparse image costs what is allocated, not the virtual size;
2. ``check`` counts file space that a dead or failed writer left behind (bytes past
   the host area, free clusters at its end that still hold data) as leaked, and
   ``check -r leaks`` gives it back;
3. a convert killed with SIGKILL leaves no partial output behind (or the next
   convert into the directory removes it);
4. snapshot names are validated before anything is written (non-UTF-8, empty, too
   long, '@', control characters) with a one-line usage error.

Timings are CPU time of this process (``time.process_time``) with generous bounds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import vdisk_command

import vdisk
from vdisk.codec import vdk as C
from vdisk.drivers.vdk import validate_snapshot_name
from vdisk.errors import ChecksumMismatch, UsageError
from vdisk.ops import convert
from vdisk.ops.tmpfile import PARTIAL_MARK, remove_stale_partials

MiB = 1 << 20
TiB = 1 << 40


def _partials(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if PARTIAL_MARK in n)


def _generation(path) -> int:
    with vdisk.open(path, read_only=True) as img:
        return img.info()["format_specific"]["generation"]


# ============================================================================ 1. shrink cost
def test_shrinking_a_256_tib_sparse_image_costs_what_is_allocated(image_dir):
    """``resize --shrink`` of a 256 TiB image holding 2 MiB to 256 MiB walked every one
    of its 2^32 guest clusters (minutes of CPU); it must follow the allocated data."""
    path = str(image_dir / "huge.vdk")
    size = 256 * TiB
    head, tail = os.urandom(MiB), os.urandom(MiB)
    vdisk.create(path, size, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, head)
        img.write(size - MiB, tail)
    t0 = time.process_time()
    with vdisk.open(path) as img:
        img.resize(256 * MiB, shrink=True)
    spent = time.process_time() - t0
    assert spent < 20, f"shrinking took {spent:.1f} s of CPU"
    with vdisk.open(path, read_only=True) as img:
        assert img.size == 256 * MiB
        assert img.read(0, MiB) == head
        assert img.read(MiB, 255 * MiB) == bytes(255 * MiB)
        res = img.check()
        assert res.exit_code == 0, res
        assert res.checked_clusters == MiB // img.cluster_size  # the tail's clusters are gone


def test_shrink_inside_a_table_shared_with_a_snapshot_keeps_the_snapshot(image_dir):
    """The new end cuts an L2 table that a snapshot shares: the live copy drops the
    clusters past the end, the snapshot keeps all of them."""
    path = str(image_dir / "s.vdk")
    vdisk.create(path, 64 * MiB, format="vdk", cluster_size=4096)  # 4 KiB clusters: 512 per L2 (2 MiB)
    data = os.urandom(8 * MiB)
    with vdisk.open(path) as img:
        img.write(0, data)
        img.snapshot_create("before")
        img.resize(3 * MiB + 12345, shrink=True)  # inside the second L2 table, inside a cluster
        assert img.read(0, img.size) == data[:3 * MiB + 12345]
        img.resize(4 * MiB, shrink=False)
        assert img.read(0, img.size) == data[:3 * MiB + 12345] + bytes(MiB - 12345)
        img.resize(1, shrink=True)  # not cluster-aligned, the first cluster stays
        assert img.read(0, 1) == data[:1]
    with vdisk.open(path, snapshot="before") as snap:
        assert snap.read(0, snap.size) == data + bytes(56 * MiB)
    with vdisk.open(path, read_only=True) as img:
        res = img.check()
        assert res.exit_code == 0, res


# ============================================================================ 2. leaked file space
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import vdisk
    img = vdisk.open(sys.argv[1])
    for i in range(48):  # 48 MiB of new clusters, never committed
        img.write(i << 20, os.urandom(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _host_area(path) -> int:
    with vdisk.open(path, read_only=True) as img:
        return img.info()["format_specific"]["host_clusters"] * img.cluster_size


def test_check_counts_and_reclaims_what_a_killed_writer_left_past_the_host_area(image_dir, run_vdisk):
    path = str(image_dir / "k.vdk")
    vdisk.create(path, 1 << 30, format="vdk")
    first = os.urandom(MiB)
    with vdisk.open(path) as img:
        img.write(512 * MiB, first)
    area = _host_area(path)
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, path], capture_output=True, timeout=120, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert os.path.getsize(path) >= area + 32 * MiB  # the dead writer's data lies past the host area
    assert _host_area(path) == area
    out = run_vdisk("check", path, expect=3).stdout
    assert "past the end of the host area" in out
    run_vdisk("check", "-r", "leaks", path, expect=0)
    assert os.path.getsize(path) == area
    assert "No errors" in run_vdisk("check", path, expect=0).stdout
    with vdisk.open(path, read_only=True) as img:
        assert img.read(512 * MiB, MiB) == first
        assert img.read(0, MiB) == bytes(MiB)


def _free_tail(path) -> tuple[int, int, int]:
    """(first, end, cluster size) of the free clusters at the end of the host area."""
    with vdisk.open(path, read_only=True) as img:
        d = img.driver
        d._load_refcounts()
        end = d.host_clusters
        first = end
        while first > 0 and d.rc[first - 1] == 0:
            first -= 1
        return first, end, d.cluster_size


def test_check_counts_and_reclaims_free_clusters_at_the_end_that_hold_data(image_dir, run_vdisk):
    """A writer that died after writing into free clusters at the end of the host area
    (the surviving header counts them as free) leaves them full: a leak; the repair
    punches them, and what is in use stays."""
    path = str(image_dir / "t.vdk")
    vdisk.create(path, 256 * MiB, format="vdk")
    keep = os.urandom(2 * MiB)
    with vdisk.open(path) as img:
        img.write(0, keep)
        img.flush()
        img.write(64 * MiB, os.urandom(16 * MiB))
        img.flush()
        img.discard(64 * MiB, 16 * MiB)  # freed (and punched) at the next commit
    first, end, cs = _free_tail(path)
    assert end - first >= 100, (first, end)
    assert "No errors" in run_vdisk("check", path, expect=0).stdout  # free and punched: no leak
    with open(path, "r+b") as f:  # what the dead writer wrote there
        f.seek(first * cs)
        f.write(os.urandom((end - first) * cs))
    before = os.stat(path).st_blocks * 512
    out = run_vdisk("check", path, expect=3).stdout
    assert f"{end - first} free clusters past the last cluster in use" in out, out
    with vdisk.open(path, read_only=True) as img:
        res = img.check()
        assert not res.corruptions and res.leaked_clusters == end - first, res
    run_vdisk("check", "-r", "leaks", path, expect=0)
    after = os.stat(path).st_blocks * 512
    assert before - after >= (end - first) * cs
    assert "No errors" in run_vdisk("check", path, expect=0).stdout
    with vdisk.open(path, read_only=True) as img:
        assert img.read(0, 2 * MiB) == keep
        assert img.read(64 * MiB, 16 * MiB) == bytes(16 * MiB)


@pytest.mark.parametrize("drop", ["discard", "shrink"])
def test_data_written_and_dropped_in_one_transaction_leaves_no_leaked_space(image_dir, drop):
    """Clusters allocated, written and freed again before a commit (a guest that
    writes then trims before flushing; a shrink after a write) must not keep their
    bytes in the file: the check above would count them as leaked."""
    path = str(image_dir / "d.vdk")
    vdisk.create(path, 64 * MiB, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, os.urandom(MiB))
        img.flush()
        img.write(8 * MiB, os.urandom(4 * MiB))
        if drop == "discard":
            img.discard(8 * MiB, 4 * MiB)
        else:
            img.resize(MiB, shrink=True)
    with vdisk.open(path, read_only=True) as img:
        res = img.check()
        assert res.exit_code == 0, res


def test_check_api_reports_leaked_file_space_and_repair_all_reclaims_it(image_dir):
    path = str(image_dir / "a.vdk")
    vdisk.create(path, 16 * MiB, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, b"x" * 70000)
    area = _host_area(path)
    with open(path, "ab") as f:
        f.write(os.urandom(3 * MiB))
    with vdisk.open(path, read_only=True) as img:
        res = img.check()
        assert res.exit_code == 3 and not res.corruptions, res
        assert res.leaked_clusters == 3 * MiB // img.cluster_size
    with vdisk.open(path) as img:
        res = img.check(repair="all")
        assert res.exit_code == 0 and res.repaired, res
    assert os.path.getsize(path) == area
    with vdisk.open(path, read_only=True) as img:
        assert img.check().exit_code == 0
        assert img.read(0, 70000) == b"x" * 70000


# ============================================================================ 3. convert killed
def _wait_writing(proc: subprocess.Popen, directory: str, timeout: float = 60) -> None:
    """Until ``proc`` has a file in ``directory`` open (its output, named or not)."""
    deadline = time.monotonic() + timeout
    prefix = os.path.realpath(directory) + "/"
    while time.monotonic() < deadline:
        assert proc.poll() is None, "convert ended before it could be killed"
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
        except FileNotFoundError:
            fds = []
        for fd in fds:
            try:
                if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(prefix):
                    time.sleep(0.1)  # into the copy
                    return
            except OSError:
                pass
        time.sleep(0.01)
    pytest.fail("convert never opened its output")


def _random_raw(path, size) -> str:
    with open(path, "wb") as f:
        f.writelines(os.urandom(16 * MiB) for _ in range(size // (16 * MiB)))
    return str(path)


def _kill_convert(src: str, out_dir, extra_code: str = "") -> None:
    code = f"import sys\nimport vdisk.ops.convert\n{extra_code}\nfrom vdisk.cli import main\nsys.argv[0] = 'vdisk'\nsys.exit(main())"
    argv = [sys.executable, "-c", code, "convert", "-f", "raw", "-O", "vdk", "-c", src, str(out_dir / "dst.vdk")]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_writing(proc, str(out_dir))
        assert proc.poll() is None, "convert ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


def test_convert_killed_with_sigkill_leaves_nothing_behind(tmp_path):
    src = _random_raw(tmp_path / "src.raw", 256 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    _kill_convert(src, out)
    assert os.listdir(out) == []  # no partial output, no destination
    with vdisk.open(src, format="raw", read_only=True) as img:
        convert(img, str(out / "dst.vdk"), format="vdk")
    assert os.listdir(out) == ["dst.vdk"]
    r = subprocess.run(vdisk_command() + ["compare", "-f", "raw", "-F", "vdk", src, str(out / "dst.vdk")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_next_convert_removes_what_a_killed_convert_left_without_o_tmpfile(tmp_path):
    """Where the unnamed file is not available, the output is built under
    ``.dst.vdk.vdisk-convert-PID``; SIGKILL leaves it, the next convert removes it."""
    src = _random_raw(tmp_path / "src.raw", 256 * MiB)
    out = tmp_path / "out"
    out.mkdir()
    # (``vdisk.ops.convert`` the attribute is the function; the module is in sys.modules)
    _kill_convert(src, out, "sys.modules['vdisk.ops.tmpfile'].open_unnamed = lambda d: None")
    left = _partials(out)
    assert len(left) == 1 and left[0].startswith(".dst.vdk" + PARTIAL_MARK), os.listdir(out)
    vdisk.create(str(tmp_path / "small.raw"), MiB, format="raw")
    with vdisk.open(str(tmp_path / "small.raw"), format="raw", read_only=True) as img:
        convert(img, str(out / "other.vdk"), format="vdk")
    assert os.listdir(out) == ["other.vdk"]


def test_stale_partial_cleanup_keeps_partials_of_running_or_lock_holding_converts(tmp_path):
    d = tmp_path
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        running = d / f".a.vdk{PARTIAL_MARK}{sleeper.pid}"
        stale = d / f".b.vdk{PARTIAL_MARK}{gone.pid}"
        locked = d / f".c.vdk{PARTIAL_MARK}{gone.pid}"
        unrelated = d / f"d.vdk{PARTIAL_MARK}{gone.pid}"  # not a hidden partial name
        for p in (running, stale, locked, unrelated):
            p.write_bytes(b"partial")
        holder = vdisk.open(str(locked), format="raw")  # a writer holds it (its pid may be elsewhere)
        try:
            assert remove_stale_partials(str(d)) == [str(stale)]
        finally:
            holder.close()
        assert sorted(os.listdir(d)) == sorted(p.name for p in (running, locked, unrelated))
    finally:
        sleeper.kill()
        sleeper.wait()


# ============================================================================ 4. snapshot names
BAD_NAMES = [
    b"snap\xff",  # not UTF-8
    "snap\udcff",  # what a non-UTF-8 argument decodes to (surrogateescape)
    "snap\ud800",  # a lone surrogate
    "",
    b"",
    "x" * 256,
    "\u00e9" * 128,  # 256 bytes of UTF-8
    "a@b",
    "a\x01b",
    "tab\there",
    "nl\n",
    "del\x7f",
    "nul\0",
    "/x",
    "#1",
    " x",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[ascii(n) for n in BAD_NAMES])
def test_bad_snapshot_names_are_refused_before_anything_is_written(image_dir, name):
    path = str(image_dir / "n.vdk")
    vdisk.create(path, MiB, format="vdk")
    gen = _generation(path)
    with pytest.raises(UsageError) as exc:
        validate_snapshot_name(name)
    assert "\n" not in str(exc.value)
    with vdisk.open(path) as img:
        with pytest.raises(UsageError) as exc:
            img.snapshot_create(name)
        msg = str(exc.value)
        assert "\n" not in msg and msg.isprintable(), msg
        assert img.snapshot_list() == []
    assert _generation(path) == gen


@pytest.mark.parametrize("name", ["ok", "a" * 255, "\u00e9" * 127, "caf\u00e9-1.0_x", b"bytes-ok"])
def test_good_snapshot_names_are_accepted(image_dir, name):
    want = name.decode() if isinstance(name, bytes) else name
    assert validate_snapshot_name(name) == want
    path = str(image_dir / "g.vdk")
    vdisk.create(path, MiB, format="vdk")
    with vdisk.open(path) as img:
        img.snapshot_create(want)
        assert [s.name for s in img.snapshot_list()] == [want]


def test_non_utf8_snapshot_name_on_the_command_line_is_a_usage_error(image_dir):
    path = str(image_dir / "c.vdk")
    vdisk.create(path, MiB, format="vdk")
    gen = _generation(path)
    argv = [os.fsencode(a) for a in vdisk_command()] + [b"snapshot", b"create", os.fsencode(path), b"snap\xff"]
    r = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("vdisk: ") and "not valid UTF-8" in err, err
    assert "internal error" not in err and "Traceback" not in err
    assert "snap\\xff" in err
    for bad in (b"a@b", b"ctl\x01", b"x" * 256):
        r = subprocess.run(argv[:-1] + [bad], capture_output=True, timeout=120, check=False)
        assert r.returncode == 1 and r.stderr.decode().count("\n") == 1, r.stderr
    with vdisk.open(path, read_only=True) as img:
        assert img.snapshot_list() == []
    assert _generation(path) == gen


# ---------------------------------------------------------------- frees after a failed header sync
class _Scripted:
    """A MemStorage whose next calls can be made to fail: ``fail_flush_in`` (the n-th
    flush from now, 1-based) and ``fail_table_write`` (the next pwrite past the
    header area).  Nothing is dropped on a failure: the page cache keeps it."""

    def __new__(cls, inner):
        from vdisk.host import HostStorage

        class S(HostStorage):
            def __init__(self):
                self.inner, self.name, self.read_only = inner, inner.name, False
                self.fail_flush_in = 0
                self.fail_table_write = False

            def pread(self, o, n):
                return self.inner.pread(o, n)

            def pwrite(self, o, d):
                if self.fail_table_write and o >= 8192:
                    self.fail_table_write = False
                    raise vdisk.errors.HostIOError("table write failed (injected)", 5)
                self.inner.pwrite(o, d)

            def flush(self):
                if self.fail_flush_in:
                    self.fail_flush_in -= 1
                    if self.fail_flush_in == 0:
                        raise vdisk.errors.HostIOError("flush failed (injected)", 5)

            def size(self):
                return self.inner.size()

            def truncate(self, n):
                self.inner.truncate(n)

            def punch_hole(self, o, n):
                self.inner.punch_hole(o, n)

        return S()


def test_frees_wait_for_their_own_header_after_a_failed_header_sync():
    """vdk once released a later transaction's frees with the rewrite of a header
    whose fdatasync had failed, punching clusters the durable generation still
    used: the live L1 failed its checksum and the image no longer opened."""
    from tests.crash.storage import MemStorage
    from vdisk.drivers.base import CreateOptions
    from vdisk.drivers.vdk import VdkDriver

    cs = 4096
    mem = MemStorage()
    VdkDriver.create(mem, 64 * cs, CreateOptions(cluster_size=cs))
    host = _Scripted(mem)
    drv = VdkDriver.open(host, read_only=False)
    drv.write(0, b"A" * cs)
    drv.flush()
    drv.write(0, b"B" * cs)  # frees the cluster that held A
    host.fail_flush_in = 2  # this commit: the tables' sync, then the header's sync fails
    with pytest.raises(vdisk.errors.HostIOError):
        drv.flush()
    drv.write(cs, b"C" * cs)
    host.fail_table_write = True  # the next commit rewrites the header, then fails on its tables
    with pytest.raises(vdisk.errors.HostIOError):
        drv.flush()
    # the process dies here: the file as the OS has it must open and hold B (the
    # generation whose header did land) or, at most, also C
    reopened = VdkDriver.open(MemStorage(bytes(mem.buf)), read_only=True)
    assert reopened.read(0, cs) == b"B" * cs
    assert reopened.read(cs, cs) in (bytes(cs), b"C" * cs)
    res = reopened.check()
    assert not res.corruptions, res.corruptions


# -- the request path and commit costs of issue 14 item 4:
# The vdk request path and commit costs of issue 14 item 4:
#
# 1. a commit defers the hole punch of the clusters its successor will allocate again
#    (a copy-on-write transaction frees about what it allocates), never punches a
#    cluster the durable header or the open transaction references, and ``close``
#    and ``check`` punch what waited;
# 2. a transaction that mostly frees (a discard) still gives the space back at its
#    commit;
# 3. a partial write reads the old cluster through ``_cluster_for_merge``, which
#    verifies its checksum (a damaged cluster is not laundered into a new checksum),
#    and a rewrite of a cluster private to the transaction stays in place.

CS = 65536


def _count_punches(img) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    host = img.driver.host
    inner = host.punch_hole

    def punch_hole(off, n):
        calls.append((off, n))
        inner(off, n)

    host.punch_hole = punch_hole
    return calls


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_steady_writes_and_flushes_reuse_freed_clusters_without_punching(tmp_path):
    path = str(tmp_path / "a.vdk")
    size = 64 * MiB
    vdisk.create(path, size, format="vdk")
    rnd = random.Random(1)
    shadow = bytearray(rnd.randbytes(size))
    with vdisk.open(path) as img:
        img.write(0, bytes(shadow))
        img.flush()
        calls = _count_punches(img)
        for batch in (200, 32, 32, 32, 32, 32, 32):  # a smaller transaction after a large one too
            for _ in range(batch):
                off = rnd.randrange(size // 4096) * 4096
                data = rnd.randbytes(4096)
                img.write(off, data)
                shadow[off:off + 4096] = data
            img.flush()
        host_clusters = img.driver.host_clusters
        # each commit freed about what it allocated: nothing punched, the freed clusters were reused
        assert not calls, calls
        deferred = set(img.driver._unpunched)
        assert deferred, "the freed clusters wait for reuse"
        rc = img.driver.rc
        assert all(rc[c] == 0 for c in deferred)
        res = img.check()  # punches what waited: no leaked space
        assert not res.corruptions and res.leaked_clusters == 0, res
        assert not img.driver._unpunched
    # the host area did not grow by a transaction's worth per commit: freed clusters were reused
    assert host_clusters <= size // CS + 200, host_clusters
    with vdisk.open(path, read_only=True) as img:
        assert img.read(0, size) == bytes(shadow)
        res = img.check()
        assert not res.corruptions and not res.leaks, res


def test_close_punches_the_deferred_clusters(tmp_path):
    path = str(tmp_path / "b.vdk")
    vdisk.create(path, 16 * MiB, format="vdk")
    rnd = random.Random(2)
    with vdisk.open(path) as img:
        img.write(0, rnd.randbytes(16 * MiB))
        img.flush()
        for _ in range(3):
            for c in rnd.sample(range(256), 40):
                img.write(c * CS + 4096, rnd.randbytes(4096))
            img.flush()
        deferred = sorted(img.driver._unpunched)
        assert deferred
        calls = _count_punches(img)
    punched = {off // CS for off, n in calls for off in range(off, off + n, CS)}
    assert set(deferred) <= punched, (deferred, calls)
    with vdisk.open(path, read_only=True) as img:
        res = img.check()
        assert not res.corruptions and not res.leaks, res


def test_discard_gives_the_space_back_at_its_commit(tmp_path):
    path = str(tmp_path / "c.vdk")
    vdisk.create(path, 64 * MiB, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, os.urandom(32 * MiB))
        img.flush()
        full = _allocated(path)
        img.discard(0, 16 * MiB)
        img.flush()
        after = _allocated(path)
        assert after <= full - 15 * MiB, (full, after)
        assert img.read(0, 16 * MiB) == bytes(16 * MiB)


def test_deferred_punch_skips_clusters_still_referenced(tmp_path):
    """A deferred cluster that was reused, or that is pending free (the durable
    header still names it), is not punched."""
    path = str(tmp_path / "d.vdk")
    vdisk.create(path, 8 * MiB, format="vdk")
    rnd = random.Random(3)
    data = rnd.randbytes(8 * MiB)
    with vdisk.open(path) as img:
        img.write(0, data)
        img.flush()
        img.write(4096, b"x" * 4096)  # frees guest cluster 0's old host cluster at the commit
        img.flush()
        d = img.driver
        t = d.txn
        d._punch_deferred()  # what really waited
        in_use = [c for c in range(d.host_clusters) if d.rc[c] > 0]
        d._unpunched.update(in_use)  # as if they had been freed and reused since
        calls = _count_punches(img)
        d._punch_deferred()
        assert not calls, calls
        # a cluster pending free (refcount 0, the durable header names it) is not punched either
        img.write(8192, b"y" * 4096)  # rewrite in place: guest cluster 0 is private now
        img.write(3 * CS, b"z" * 4096)  # guest cluster 3's old cluster becomes pending free
        assert t.pending_free
        d._unpunched.update(t.pending_free)
        d._punch_deferred()
        assert not calls, calls
    with vdisk.open(path, read_only=True) as img:
        expect = bytearray(data)
        expect[4096:8192] = b"x" * 4096
        expect[8192:12288] = b"y" * 4096
        expect[3 * CS:3 * CS + 4096] = b"z" * 4096
        assert img.read(0, 8 * MiB) == bytes(expect)


def test_partial_write_verifies_the_old_cluster(tmp_path):
    path = str(tmp_path / "e.vdk")
    vdisk.create(path, 4 * MiB, format="vdk")
    with vdisk.open(path) as img:
        img.write(0, os.urandom(4 * MiB))
        img.flush()
        d = img.driver
        img.read(0, 4096)  # the L2 table is cached: the fast path of _cluster_for_merge
        host_off = C.L2_ENTRY.unpack_from(d._l2(0), 5 * C.L2_ENTRY_SIZE)[0] & C.OFFSET_MASK
        with open(path, "r+b") as f:  # damage guest cluster 5 on the host
            f.seek(host_off + 100)
            f.write(b"\xff" * 8)
        with pytest.raises(ChecksumMismatch):
            img.write(5 * CS + 4096, b"a" * 4096)
        # the entry still names the damaged cluster with its old checksum: reads still fail
        with pytest.raises(ChecksumMismatch):
            img.read(5 * CS, 4096)


def test_rewrite_of_a_private_cluster_stays_in_place(tmp_path):
    path = str(tmp_path / "f.vdk")
    vdisk.create(path, 4 * MiB, format="vdk")
    base = os.urandom(4 * MiB)
    with vdisk.open(path) as img:
        img.write(0, base)
        img.flush()
        img.write(2 * CS + 4096, b"1" * 4096)  # copy-on-write: a new host cluster
        d = img.driver
        tbl = d._l2(0)
        first = C.L2_ENTRY.unpack_from(tbl, 2 * C.L2_ENTRY_SIZE)[0] & C.OFFSET_MASK
        host_clusters = d.host_clusters
        img.write(2 * CS + 8192, b"2" * 4096)  # private to the transaction: in place
        img.write(2 * CS, b"3" * 100)  # unaligned, in place too
        assert C.L2_ENTRY.unpack_from(tbl, 2 * C.L2_ENTRY_SIZE)[0] & C.OFFSET_MASK == first
        assert d.host_clusters == host_clusters
    expect = bytearray(base)
    expect[2 * CS + 4096:2 * CS + 8192] = b"1" * 4096
    expect[2 * CS + 8192:2 * CS + 12288] = b"2" * 4096
    expect[2 * CS:2 * CS + 100] = b"3" * 100
    with vdisk.open(path, read_only=True) as img:
        assert img.read(0, 4 * MiB) == bytes(expect)
        assert not img.check().corruptions
