"""``vdisk pool gc`` and ``pool dedup`` on pools on an S3 object store (tier 3, the real
SeaweedFS cluster of tests/test_pool_s3.py, whose fixtures are reused).

What is shown: gc frees dead packs and every image and snapshot reads back the same;
dedup shares identical blocks; the ``gc`` lock (an announced object, vdisk/pool/objlock.py)
refuses a second gc and an open while gc holds it, naming the holder; gc refuses while a
writer holds a fresh lease, naming it; and the case the lock alone cannot cover: a writer
paused (SIGSTOP) past the ttl with packs put but not committed looks gone, gc deletes
those packs, and the writer, resumed, must fail its commit (Fenced) instead of committing
trees that name them.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from imagetools import jrun, run
import test_pool_s3 as _s3
from test_pool_s3 import _child, _expect, content, pattern

import vdisk
from vdisk.pool import backend as be
from vdisk.pool import lease as lm
from vdisk.pool.s3 import S3Backend
from vdisk.pool.store import Pool

MiB = 1 << 20
B = 4096
# the cluster (started once for this module, stopped at its end, also on failure) and a
# pool under a prefix of its own per test: the fixtures of tests/test_pool_s3.py
cluster = _s3.cluster
s3pool = _s3.s3pool


def _packs(url: str) -> set[str]:
    b = S3Backend(url)
    try:
        return set(b.list("packs/"))
    finally:
        b.close()


def _states(url: str) -> dict[str, bytes]:
    """The content of every image and every snapshot of the pool."""
    out = {}
    p = Pool(url, lock=False)
    try:
        images = {n: [s["name"] for s in r.get("snapshots", []) if not s.get("hidden")]
                  for n, r in p.catalog["images"].items()}
    finally:
        p.close()
    for n, snaps in images.items():
        out[n] = content(f"{url}/{n}")
        for s in snaps:
            out[f"{n}@{s}"] = content(f"{url}/{n}", snapshot=s)
    return out


def _write(img: str, offset: int, data: bytes) -> None:
    with vdisk.open(img) as w:
        w.write(offset, data)
        w.flush()


def _wait_gc(url: str, deadline_s: float = 30.0):
    """``pool gc`` once the lock and the lease of a paused process have gone stale."""
    from vdisk.pool import admin

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return admin.pool_gc(url)
        except vdisk.errors.ImageLocked as exc:
            assert "in use" in str(exc) or "being written" in str(exc), str(exc)
            assert time.monotonic() < deadline, f"gc still refused: {exc}"
            time.sleep(0.5)


# ---------------------------------------------------------------------------- gc
def test_gc_frees_dead_packs_and_every_state_reads_back(s3pool):
    a, b = f"{s3pool}/a", f"{s3pool}/b"
    run("create", a, "4M")
    run("create", b, "4M")
    _write(a, 0, pattern(1, 2 * MiB))
    _write(b, 0, pattern(2, MiB))
    run("snapshot", "-c", "s1", a)
    _write(a, 0, pattern(3, MiB))  # half of a's first data now lives only in s1
    run("snapshot", "-c", "tmp", b)
    _write(b, 0, pattern(4, MiB))  # b's first data lives only in tmp ...
    run("snapshot", "-d", "tmp", b)  # ... and is dead now
    run("create", f"{s3pool}/gone", "4M")
    _write(f"{s3pool}/gone", 0, pattern(5, MiB))
    run("rm", f"{s3pool}/gone")
    before = _states(s3pool)
    assert set(before) == {"a", "a@s1", "b"}
    packs_before = _packs(s3pool)
    rep = jrun("pool", "gc", s3pool)
    assert rep["packs-deleted"] + rep["packs-repacked"] > 0, rep
    assert rep["freed-bytes"] >= 1.5 * MiB, rep  # b's first MiB and gone's, less what repacking wrote
    packs_after = _packs(s3pool)
    assert len(packs_before - packs_after) == rep["packs-deleted"] + rep["packs-repacked"]
    assert _states(s3pool) == before
    r = run("pool", "check", s3pool)
    assert "No errors" in r.stdout, r.stdout
    # nothing of gc is left behind: no lock object, every lease released
    bk = S3Backend(s3pool)
    try:
        assert bk.list("locks/") == []
        for rec in Pool(s3pool, lock=False, backend=bk).catalog["images"].values():
            _, lrec, age = lm.current(bk, rec["id"])
            assert not lm.held(lrec, age)
    finally:
        bk.close()
    # the images are writable again at once after gc (gc's leases were released)
    _write(a, 3 * MiB, b"after gc" * 512)
    assert content(a)[3 * MiB: 3 * MiB + B] == b"after gc" * 512
    assert jrun("pool", "gc", s3pool)["packs-deleted"] == 0  # nothing more to free


def test_dedup_on_s3_shares_identical_blocks(s3pool):
    url = s3pool + "-nodedup"
    run("pool", "create", "-o", "dedup=off,delta=off", url)
    data = pattern(7, 200 * B)
    for n in ("x", "y", "z"):
        run("create", f"{url}/{n}", "1M")
        _write(f"{url}/{n}", 0, data)
    run("snapshot", "-c", "s", f"{url}/y")
    before = _states(url)
    res = jrun("pool", "dedup", "--gc", url)
    assert res["dedup"]["duplicate-blobs"] == 400 and res["dedup"]["collisions"] == 0, res
    assert res["gc"]["freed-bytes"] >= 400 * B * 0.9, res["gc"]
    assert _states(url) == before
    from vdisk.pool import admin

    assert admin.pool_info(url)["data_blobs"] == 200
    assert jrun("pool", "dedup", url)["dedup"]["duplicate-blobs"] == 0
    assert "No errors" in run("pool", "check", url).stdout


# ---------------------------------------------------------------------------- refusals
def test_a_second_gc_and_an_open_are_refused_while_gc_holds_the_lock(s3pool):
    img = f"{s3pool}/disk"
    run("create", img, "1M")
    _write(img, 0, pattern(8, 64 * B))
    bk = S3Backend(s3pool)
    lk = be.lock(bk, "gc", exclusive=True, what="pool gc")  # as a running gc holds it
    try:
        r = run("pool", "gc", s3pool, code=1)
        assert "in use by pool gc" in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback
        r = run("pool", "dedup", s3pool, code=1)
        assert "in use by pool gc" in r.stderr, r.stderr
        with pytest.raises(vdisk.errors.ImageLocked) as ei:
            vdisk.open(img)
        assert "garbage-collected" in str(ei.value) and f"pid {os.getpid()}" in str(ei.value)
        time.sleep(4)  # past the ttl (3 s): the holder renews, so it stays held
        run("pool", "gc", s3pool, code=1)
    finally:
        lk.release()
    assert bk.list("locks/") == []
    bk.close()
    with vdisk.open(img) as w:  # released: the pool opens again ...
        r = run("pool", "gc", s3pool, code=1)  # ... and an open image keeps gc out
        assert "in use by a process with the pool open" in r.stderr and f"pid {os.getpid()}" in r.stderr
        assert w.read(0, 64 * B) == pattern(8, 64 * B)
    jrun("pool", "gc", s3pool)


def test_gc_refuses_while_a_writer_holds_a_fresh_lease(s3pool):
    """A writer's lease, even without its gc-lock announcement (as after a network
    hiccup longer than the lock's ttl but not the lease's): gc refuses, naming it, and
    changes nothing."""
    img = f"{s3pool}/disk"
    run("create", img, "1M")
    _write(img, 0, pattern(9, 64 * B))
    bk = S3Backend(s3pool)
    p = Pool(s3pool, lock=False, backend=bk)
    image_id = p.catalog["images"]["disk"]["id"]
    gen = p.generation
    ls = lm.Lease(bk, image_id, img, ttl=60)
    ls.acquire()
    try:
        r = run("pool", "gc", s3pool, code=1)
        assert "being written by" in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr
        assert f"lease epoch {ls.epoch}" in r.stderr and "gc needs every writer out" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = run("pool", "dedup", s3pool, code=1)
        assert "being written by" in r.stderr, r.stderr
        p.reload()
        assert p.generation == gen  # nothing committed
        assert bk.list("locks/") == []  # gc's lock released on the way out
    finally:
        ls.release()
        p.close()
    jrun("pool", "gc", s3pool)
    assert content(img)[: 64 * B] == pattern(9, 64 * B)


# ---------------------------------------------------------------------------- fencing
def test_a_paused_writer_with_uncommitted_packs_is_fenced_by_gc(s3pool):
    """The lock alone is not enough: a writer paused past the ttl looks gone (its
    lock object and its lease go stale), gc deletes the packs it put but did not
    commit, and once resumed it must not commit trees naming them."""
    img, other = f"{s3pool}/disk", f"{s3pool}/other"
    run("create", img, "4M")
    run("create", other, "1M")
    _write(other, 0, pattern(10, 32 * B))
    a = _child(f"""
        import sys, vdisk
        img = vdisk.open({img!r})
        img.write(0, b"A1" * 2048 * 16); img.flush()
        print("flushed", flush=True)
        sys.stdin.readline()
        import random
        img.write(1 << 20, random.Random(11).randbytes(1 << 20))  # several packs' worth
        pool = img.driver.pool
        pool.seal_pack(); pool.backend.barrier()  # put, not committed
        print("put", flush=True)
        sys.stdin.readline()
        try:
            img.flush()
            print("committed", flush=True)
        except vdisk.errors.VdiskError as exc:
            print("refused " + type(exc).__name__, flush=True); print(exc, flush=True)
        try:
            img.close()
        except vdisk.errors.VdiskError:
            pass
    """)
    try:
        _expect(a, "flushed")
        packs_committed = _packs(s3pool)
        a.stdin.write("go\n")
        a.stdin.flush()
        _expect(a, "put")
        uncommitted = _packs(s3pool) - packs_committed
        assert len(uncommitted) >= 2, uncommitted
        os.kill(a.pid, signal.SIGSTOP)
        r = run("pool", "gc", s3pool, code=1)  # while A's lock is fresh: refused
        assert "in use by" in r.stderr
        rep = _wait_gc(s3pool)  # A missed its renewals: its lock and lease are stale
        assert rep.packs_deleted >= len(uncommitted), rep
        assert not (_packs(s3pool) & uncommitted)  # A's uncommitted packs are gone
        before = {"disk": content(img), "other": content(other)}
        assert before["disk"][: 64 * 1024] == b"A1" * 2048 * 16 and before["disk"][1 << 20:] == bytes(3 << 20)
        os.kill(a.pid, signal.SIGCONT)
        a.stdin.write("go\n")
        a.stdin.flush()
        _expect(a, "refused Fenced")
        why = a.stdout.readline()
        assert "lost its lease" in why and "pool gc" in why, why
        assert a.wait(30) == 0
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
            a.wait()
    assert {"disk": content(img), "other": content(other)} == before
    from vdisk.pool import admin

    chk = admin.pool_check(s3pool)  # what A put after resuming (its tree nodes) is a leak, no more
    assert chk.corruptions == [] and chk.exit_code in (0, 3), chk
    r = run("pool", "check", "-r", "leaks", s3pool)  # check, then gc, on S3 too
    assert "No errors" in r.stdout or "Repaired" in r.stdout, r.stdout
    assert admin.pool_check(s3pool).exit_code == 0
    with vdisk.open(img) as w:  # the image is writable again
        w.write(0, b"B1" * 2048)
        w.flush()
    assert content(img)[:B] == b"B1" * 2048


def test_gc_paused_past_its_ttl_while_the_pool_changed_deletes_nothing(s3pool, monkeypatch):
    """gc's own commit is guarded: built on the very generation it fenced and marked.
    Here a generation lands in between (as a writer's claim would, had gc been paused
    past its ttl): gc must fail and delete nothing."""
    from vdisk.pool import admin
    from vdisk.pool import gc as gcmod
    from vdisk.pool.store import Fenced

    img = f"{s3pool}/disk"
    run("create", img, "4M")
    _write(img, 0, pattern(12, 2 * MiB))
    _write(img, 0, pattern(13, MiB))  # half dead: packs to delete or repack, index records to drop
    before = content(img)
    packs = _packs(s3pool)
    real = gcmod._collect

    def meanwhile(pool, *a, **kw):
        other = Pool(s3pool, lock=False)
        try:
            other.commit(lambda cat: None)
        finally:
            other.close()
        return real(pool, *a, **kw)

    monkeypatch.setattr(gcmod, "_collect", meanwhile)
    with pytest.raises(Fenced) as ei:
        admin.pool_gc(s3pool)
    assert "paused past its lock's ttl" in str(ei.value) and "nothing was changed or deleted" in str(ei.value)
    assert _packs(s3pool) >= packs
    monkeypatch.setattr(gcmod, "_collect", real)
    assert content(img) == before
    rep = admin.pool_gc(s3pool)
    assert rep.packs_deleted + rep.packs_repacked > 0
    assert content(img) == before
