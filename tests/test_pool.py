"""The pool store and driver through the Python API: data, dedup, delta, snapshots,
native clones, concurrent writers, and a model-based test against an in-memory model.
"""

from __future__ import annotations

import os
import random

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vdisk
from vdisk import block
from vdisk.codec import pool as pc
from vdisk.errors import ImageExists, ImageLocked, SnapshotNotFound, UsageError
from vdisk.pool.store import Pool

B = 4096


def packs_bytes(p: str) -> int:
    d = os.path.join(p, "packs")
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) if os.path.isdir(d) else 0


def data_blobs(p: str) -> int:
    pool = Pool(p, lock=False)
    try:
        n = 0
        for name in pool.backend.list("packs/"):
            size = pool.backend.size(name)
            number = int(name.split("/")[1], 16)
            tail = pool.backend.get_range(name, max(0, size - (1 << 20)), 1 << 20)
            head = pool.backend.get_range(name, 0, 16)
            n += sum(1 for _, _, k, _ in pc.parse_pack_trailer(head, tail, size, number, name) if k in pc.DATA_KINDS)
        return n
    finally:
        pool.close()


def test_write_read_reopen(pool):
    vdisk.create(f"{pool}/a", 8 << 20)
    data = random.Random(1).randbytes(3 * B + 100)
    with vdisk.open(f"{pool}/a") as img:
        img.write(B + 7, data)
        assert img.read(B + 7, len(data)) == data  # before the flush: from memory
    with vdisk.open(f"{pool}/a", read_only=True) as img:
        assert img.format == "pool" and img.size == 8 << 20
        assert img.read(0, B + 7) == bytes(B + 7)
        assert img.read(B + 7, len(data)) == data
        assert img.read((8 << 20) - B, B) == bytes(B)


def test_identical_blocks_are_stored_once_across_images(pool):
    blk = random.Random(2).randbytes(64 * B)
    for name in ("a", "b", "c"):
        vdisk.create(f"{pool}/{name}", 1 << 20)
        with vdisk.open(f"{pool}/{name}") as img:
            img.write(0, blk)
            img.write(512 << 10, blk)  # twice in the same image too
    assert data_blobs(pool) == 64
    for name in ("a", "b", "c"):
        with vdisk.open(f"{pool}/{name}", read_only=True) as img:
            assert img.read(0, len(blk)) == blk and img.read(512 << 10, len(blk)) == blk


def test_a_fingerprint_collision_is_not_shared(pool, monkeypatch):
    """xxh3 is not collision-resistant: a block whose fingerprint matches another's
    must still be compared byte for byte before it is shared."""
    vdisk.create(f"{pool}/a", 1 << 20)
    real = pc.block_hash
    monkeypatch.setattr(pc, "block_hash", lambda data: (real(data)[0], real(b"same")[1]))
    x, y = b"x" * B, b"y" * B
    with vdisk.open(f"{pool}/a") as img:
        img.write(0, x)
        img.write(B, y)  # same (forced) fingerprint, other bytes
        monkeypatch.setattr(pc, "block_hash", real)
        assert img.read(0, B) == x
    monkeypatch.setattr(pc, "block_hash", real)


def test_similar_blocks_become_deltas(pool):
    rnd = random.Random(3)
    base = rnd.randbytes(32 * B)
    edited = bytearray(base)
    for i in range(32):
        edited[i * B + 100: i * B + 108] = rnd.randbytes(8)  # a small in-place edit of every block
    vdisk.create(f"{pool}/a", 1 << 20)
    vdisk.create(f"{pool}/b", 1 << 20)
    with vdisk.open(f"{pool}/a") as img:
        img.write(0, base)
    before = packs_bytes(pool)
    with vdisk.open(f"{pool}/b") as img:
        img.write(0, bytes(edited))
    grown = packs_bytes(pool) - before
    assert grown < 32 * B // 4, grown  # far less than storing the 32 random blocks again
    with vdisk.open(f"{pool}/b", read_only=True) as img:
        assert img.read(0, len(edited)) == edited
        assert any(e.compressed for e in img.block_status(0, 32 * B))


def test_snapshot_revert_and_native_clone(pool):
    vdisk.create(f"{pool}/gold", 4 << 20)
    one = b"1" * (2 * B)
    with vdisk.open(f"{pool}/gold") as img:
        img.write(0, one)
        img.snapshot_create("s")
        img.write(0, b"2" * B)
    before = packs_bytes(pool)
    block.create(f"{pool}/clone", None, format="pool", backing_file=os.path.abspath(f"{pool}/gold"),
                 backing_format="pool", backing_snapshot="s")
    assert packs_bytes(pool) == before  # O(1): no data or tree written
    with vdisk.open(f"{pool}/clone") as c:
        assert c.read(0, 2 * B) == one and c.driver.backing_ref is None
        c.write(B, b"3" * B)
    with vdisk.open(f"{pool}/gold", read_only=True) as g:
        (snap,) = g.snapshot_list()
        assert [h.path for h in snap.holders] == ["clone"]
        assert g.read(0, 2 * B) == b"2" * B + b"1" * B
    with vdisk.open(f"{pool}/gold", snapshot="s") as s:
        assert s.read(0, 2 * B) == one
    with vdisk.open(f"{pool}/gold") as g:
        g.snapshot_delete("s")  # held: hidden, not gone
        assert g.snapshot_list() == [] and len(g.snapshot_list(hidden=True)) == 1
        with pytest.raises(SnapshotNotFound):
            g.snapshot_revert("s")
    with vdisk.open(f"{pool}/clone", read_only=True) as c:
        assert c.read(0, 2 * B) == b"1" * B + b"3" * B
    block.remove(f"{pool}/clone")  # drops the hold: the hidden snapshot goes with it
    with vdisk.open(f"{pool}/gold", read_only=True) as g:
        assert g.snapshot_list(hidden=True) == []
    assert not block.exists(f"{pool}/clone")


def test_remove_refuses_an_image_others_depend_on(pool):
    vdisk.create(f"{pool}/gold", 1 << 20)
    with vdisk.open(f"{pool}/gold") as img:
        img.snapshot_create("s")
    block.create(f"{pool}/c", None, format="pool", backing_file=os.path.abspath(f"{pool}/gold"),
                 backing_format="pool", backing_snapshot="s")
    with pytest.raises(UsageError, match="c"):
        block.remove(f"{pool}/gold")
    assert block.exists(f"{pool}/gold")


def test_one_writer_per_image(pool):
    vdisk.create(f"{pool}/a", 1 << 20)
    with vdisk.open(f"{pool}/a"):
        with pytest.raises(ImageLocked):
            vdisk.open(f"{pool}/a")
        with pytest.raises(ImageLocked):
            vdisk.open(f"{pool}/a", read_only=True)
        with vdisk.open(f"{pool}/a", read_only=True, force_share=True):
            pass


def test_two_writers_of_two_images_commit_independently(pool):
    vdisk.create(f"{pool}/a", 1 << 20)
    vdisk.create(f"{pool}/b", 1 << 20)
    a = vdisk.open(f"{pool}/a")
    b = vdisk.open(f"{pool}/b")
    try:
        for i in range(5):  # interleaved commits: each retries on the other's generation
            a.write(i * B, bytes([65 + i]) * B)
            a.flush()
            b.write(i * B, bytes([97 + i]) * B)
            b.flush()
            with vdisk.open(f"{pool}/a", read_only=True, force_share=True) as r:
                assert r.read(i * B, B) == bytes([65 + i]) * B
    finally:
        a.close()
        b.close()
    with vdisk.open(f"{pool}/a", read_only=True) as r, vdisk.open(f"{pool}/b", read_only=True) as s:
        assert r.read(0, 5 * B) == b"".join(bytes([65 + i]) * B for i in range(5))
        assert s.read(0, 5 * B) == b"".join(bytes([97 + i]) * B for i in range(5))


def test_resize_and_discard(pool):
    vdisk.create(f"{pool}/a", 1 << 20)
    with vdisk.open(f"{pool}/a") as img:
        img.write(0, b"z" * (1 << 20))
        img.resize(B + 10, shrink=True)
        img.resize(1 << 20)
        assert img.read(0, B + 10) == b"z" * (B + 10)
        assert img.read(B + 10, 100) == bytes(100)  # grown range reads zeros, not the old data
        img.write(0, b"q" * (3 * B))
        img.discard(B, B)
        assert img.read(0, 3 * B) == b"q" * B + bytes(B) + b"q" * B
    with vdisk.open(f"{pool}/a", read_only=True) as img:
        assert img.size == 1 << 20 and img.read(0, 3 * B) == b"q" * B + bytes(B) + b"q" * B


def test_image_names_are_checked(pool):
    with pytest.raises(UsageError):
        vdisk.create(f"{pool}/.hidden", 1 << 20)
    with pytest.raises(ImageExists):
        vdisk.create(f"{pool}/x", 1 << 20)
        vdisk.create(f"{pool}/x", 1 << 20)


# ------------------------------------------------------------------ model-based
SIZE = 64 * B
_PATTERNS = [bytes([i]) * B for i in range(1, 4)] + [random.Random(9).randbytes(B) for _ in range(3)]


class PoolModel(RuleBasedStateMachine):
    """Random writes (from a few patterns, so that dedup and deltas happen), discards,
    flushes, reopens, snapshots, reverts and native clones against a model; after
    every step each image and snapshot reads as its model."""

    @initialize()
    def setup(self):
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="vdisk-poolmodel-")
        self.pool = os.path.join(self.dir, "p")
        Pool.create(self.pool)
        vdisk.create(f"{self.pool}/i0", SIZE)
        self.model = {"i0": bytearray(SIZE)}
        self.snaps: dict[str, bytes] = {}
        self.open = {"i0": vdisk.open(f"{self.pool}/i0")}
        self.n = 0

    def teardown(self):
        import shutil

        for img in getattr(self, "open", {}).values():
            img.close()
        shutil.rmtree(getattr(self, "dir", "/nonexistent"), ignore_errors=True)

    def _name(self, i):
        names = sorted(self.model)
        return names[i % len(names)]

    @rule(i=st.integers(0, 9), off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * B), pat=st.integers(0, 5),
          shift=st.integers(0, 100))
    def write(self, i, off, n, pat, shift):
        name = self._name(i)
        n = min(n, SIZE - off)
        data = (_PATTERNS[pat] * 4)[shift: shift + n]
        data = bytearray(data)
        if pat >= 3 and n > 8:
            data[n // 2] ^= 0xFF  # similar but not equal: a delta candidate
        self.open[name].write(off, bytes(data))
        self.model[name][off: off + n] = data

    @rule(i=st.integers(0, 9), off=st.integers(0, SIZE - 1), n=st.integers(1, 8 * B))
    def discard(self, i, off, n):
        name = self._name(i)
        n = min(n, SIZE - off)
        self.open[name].discard(off, n)
        self.model[name][off: off + n] = bytes(n)

    @rule(i=st.integers(0, 9))
    def reopen(self, i):
        name = self._name(i)
        self.open[name].close()
        self.open[name] = vdisk.open(f"{self.pool}/{name}")

    @rule(i=st.integers(0, 9))
    def snapshot(self, i):
        name = self._name(i)
        self.n += 1
        s = f"s{self.n}"
        self.open[name].snapshot_create(s)
        self.snaps[f"{name}@{s}"] = bytes(self.model[name])

    @rule(j=st.integers(0, 99))
    def revert(self, j):
        if not self.snaps:
            return
        key = sorted(self.snaps)[j % len(self.snaps)]
        name, s = key.split("@")
        self.open[name].snapshot_revert(s)
        self.model[name][:] = self.snaps[key]

    @rule(j=st.integers(0, 99))
    def clone(self, j):
        if not self.snaps or len(self.model) >= 5:
            return
        key = sorted(self.snaps)[j % len(self.snaps)]
        name, s = key.split("@")
        self.n += 1
        new = f"i{self.n}"
        block.create(f"{self.pool}/{new}", None, format="pool", backing_file=os.path.abspath(f"{self.pool}/{name}"),
                     backing_format="pool", backing_snapshot=s)
        self.model[new] = bytearray(self.snaps[key])
        self.open[new] = vdisk.open(f"{self.pool}/{new}")

    @invariant()
    def reads_match(self):
        if not hasattr(self, "open"):
            return
        for name, img in self.open.items():
            assert img.read(0, SIZE) == self.model[name], name

    def check_snapshots(self):
        for key, content in self.snaps.items():
            name, snap = key.split("@")
            with vdisk.open(f"{self.pool}/{name}", snapshot=snap) as s:
                assert s.read(0, SIZE) == content, key

    @rule()
    def snapshots_match(self):
        self.check_snapshots()


PoolModel.TestCase.settings = settings(settings(), stateful_step_count=30,
                                        max_examples=max(20, settings().max_examples // 2),
                                        suppress_health_check=[HealthCheck.too_slow])
test_pool_model_steps = PoolModel.TestCase
