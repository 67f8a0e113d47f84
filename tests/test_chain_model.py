"""Model-based test of snapshots and clones across images.

A golden vdk image, linked clones of its snapshots (and clones of clones), with
random writes, snapshot create / delete (also of snapshots clones depend on),
revert, rebase, flatten, rm, full clones and commit of an overlay; after every step
every image and every snapshot reads exactly as its model, every image's backing
chain is the one the model predicts, and ``check`` is clean on every image.

The model predicts every refusal too, from its own state (never by asking vdisk):

- a rebase onto a snapshot of an image whose chain reaches the rebased image (the
  image itself, a clone of it, a clone of a clone, an image rebased onto one of
  those) would make the chain loop: ``BackingError``, checked before anything else;
- a flatten of an image that has a backing image and snapshots (visible ones, or
  deleted ones that a clone still holds, which stay hidden until the last holder
  lets go), and a rebase of an image with snapshots whether it has a backing image
  or not, are refused with ``UsageError``.

``VDISK_MODEL_EXAMPLES`` sets the number of examples; otherwise it is a quarter of
the Hypothesis profile's ``max_examples`` (see tests/conftest.py).
"""

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pytest

import vdisk
from vdisk.errors import BackingError, UsageError
from vdisk.ops import chain

SIZE = 1 << 20


class ChainModel(RuleBasedStateMachine):
    @initialize(cluster=st.sampled_from([4096, 16384]), compression=st.sampled_from([None, "zstd"]),
                seed=st.integers(0, 2**32 - 1))
    def setup(self, cluster, compression, seed):
        # data from a drawn seed, not os.urandom: a derandomized run writes the same bytes
        self.rng = random.Random(seed)
        self.dir = tempfile.mkdtemp(prefix="vdisk-chain-")
        self.images: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytes]] = {}
        # what each image reads through, (image, snapshot), or None; a clone of the
        # live state reads through the snapshot that ``clone`` takes first
        self.backing: dict[str, tuple[str, str] | None] = {}
        # deleted snapshots that a clone held when they were deleted
        self.hidden: dict[str, set[str]] = {}
        self.n = 0
        path = self._path("gold")
        vdisk.create(path, SIZE, cluster_size=cluster, compression=compression)
        with vdisk.open(path) as img:
            d = self.rng.randbytes(SIZE // 2)
            img.write(SIZE // 4, d)
        self.images["gold"] = bytearray(SIZE)
        self.images["gold"][SIZE // 4:SIZE // 4 + len(d)] = d
        self._add("gold", None)

    def teardown(self):
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _path(self, name):
        return os.path.join(self.dir, name + ".vdk")

    def _fresh(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def _add(self, name, backing):
        self.snaps[name] = {}
        self.backing[name] = backing
        self.hidden[name] = set()

    def _chain(self, name):
        """``name``, then every image it reads through, as the model has it."""
        out = []
        while name is not None:
            out.append(name)
            ref = self.backing[name]
            name = ref[0] if ref else None
        return out

    def _held(self, img, snap):
        return any(ref == (img, snap) for ref in self.backing.values())

    def _has_snapshots(self, name):
        """Visible snapshots, or deleted ones a clone still holds (freed with the last hold)."""
        return bool(self.snaps[name]) or any(self._held(name, s) for s in self.hidden[name])

    def _all_snaps(self):
        return [(img, s) for img, ss in sorted(self.snaps.items()) for s in sorted(ss)]

    @rule(data=st.data())
    def write(self, data):
        name = data.draw(st.sampled_from(sorted(self.images)))
        off = data.draw(st.integers(0, SIZE - 1))
        n = data.draw(st.integers(1, min(70_000, SIZE - off)))
        d = data.draw(st.sampled_from([b"\0", b"x", None]))
        buf = self.rng.randbytes(n) if d is None else d * n
        with vdisk.open(self._path(name)) as img:
            img.write(off, buf)
        self.images[name][off:off + n] = buf

    @rule(data=st.data())
    def snapshot(self, data):
        name = data.draw(st.sampled_from(sorted(self.images)))
        snap = self._fresh("s")
        with vdisk.open(self._path(name)) as img:
            img.snapshot_create(snap)
        self.snaps[name][snap] = bytes(self.images[name])

    @precondition(lambda self: self._all_snaps())
    @rule(data=st.data())
    def clone(self, data):
        src, snap = data.draw(st.sampled_from(self._all_snaps()))
        new = self._fresh("c")
        chain.clone(f"{self._path(src)}@{snap}", self._path(new))
        self.images[new] = bytearray(self.snaps[src][snap])
        self._add(new, (src, snap))

    @rule(data=st.data())
    def clone_live(self, data):
        src = data.draw(st.sampled_from(sorted(self.images)))
        new = self._fresh("c")
        chain.clone(self._path(src), self._path(new))
        self.images[new] = bytearray(self.images[src])
        auto = f"clone-{new}.vdk"
        self.snaps[src][auto] = bytes(self.images[src])
        self._add(new, (src, auto))

    @precondition(lambda self: self._all_snaps())
    @rule(data=st.data())
    def delete_snapshot(self, data):
        img, snap = data.draw(st.sampled_from(self._all_snaps()))
        with vdisk.open(self._path(img)) as i:
            i.snapshot_delete(snap)
        del self.snaps[img][snap]
        if self._held(img, snap):
            self.hidden[img].add(snap)

    @precondition(lambda self: self._all_snaps())
    @rule(data=st.data())
    def revert(self, data):
        img, snap = data.draw(st.sampled_from(self._all_snaps()))
        with vdisk.open(self._path(img)) as i:
            i.snapshot_revert(snap)
        self.images[img] = bytearray(self.snaps[img][snap])

    @precondition(lambda self: len(self.images) > 1)
    @rule(data=st.data())
    def flatten(self, data):
        name = data.draw(st.sampled_from(sorted(k for k in self.images if k != "gold")))
        if self._refuses_rebase(name):
            with pytest.raises(UsageError, match="has snapshots"):
                chain.flatten(self._path(name))
            return
        chain.flatten(self._path(name))
        self.backing[name] = None

    @precondition(lambda self: len(self.images) > 1 and self._all_snaps())
    @rule(data=st.data())
    def rebase(self, data):
        name = data.draw(st.sampled_from(sorted(k for k in self.images if k != "gold")))
        img, snap = data.draw(st.sampled_from(self._all_snaps()))
        new = f"{self._path(img)}@{snap}"
        if name in self._chain(img):
            # onto itself, or onto anything that reads through it: checked first,
            # before the snapshots of the image are looked at
            with pytest.raises(BackingError, match="loop"):
                chain.rebase(self._path(name), new)
            return
        if self._refuses_rebase(name, onto=True):
            with pytest.raises(UsageError, match="has snapshots"):
                chain.rebase(self._path(name), new)
            return
        chain.rebase(self._path(name), new)
        self.backing[name] = (img, snap)

    @rule(data=st.data())
    def commit_overlay(self, data):
        """Full-clone an image, put an overlay on the copy, write into the overlay,
        commit it: the copy must then read as the overlay did, and the overlay still so."""
        name = data.draw(st.sampled_from(sorted(self.images)))
        base, top = self._fresh("b"), self._fresh("t")
        chain.clone(self._path(name), self._path(base), full=True)
        vdisk.create(self._path(top), None, backing_file=self._path(base))
        model = bytearray(self.images[name])
        with vdisk.open(self._path(top)) as t:
            for _ in range(data.draw(st.integers(1, 4))):
                off = data.draw(st.integers(0, SIZE - 1))
                n = data.draw(st.integers(1, min(70_000, SIZE - off)))
                if data.draw(st.booleans()):
                    buf = self.rng.randbytes(n)
                    t.write(off, buf)
                else:
                    buf = bytes(n)
                    t.write_zeroes(off, n)
                model[off:off + n] = buf
        chain.commit(self._path(top))
        with vdisk.open(self._path(base)) as b:
            assert b.read(0, b.size) == bytes(model), "commit: the base differs from the overlay's content"
            assert b.check().exit_code == 0
        with vdisk.open(self._path(top)) as t:
            assert t.read(0, t.size) == bytes(model), "commit: the overlay changed"
            assert t.check().exit_code == 0
        chain.remove(self._path(top))
        chain.remove(self._path(base))

    @precondition(lambda self: len(self.images) > 1)
    @rule(data=st.data())
    def remove(self, data):
        name = data.draw(st.sampled_from(sorted(k for k in self.images if k != "gold")))
        # images that read through it (rebased onto it or cloned from it) keep it alive
        if any(name in self._chain(other)[1:] for other in self.images):
            return
        chain.remove(self._path(name))
        del self.images[name], self.snaps[name], self.backing[name], self.hidden[name]

    def _refuses_rebase(self, name, onto=False):
        """An image with snapshots (also deleted ones that clones still hold) refuses a
        flatten while it has a backing image, and any rebase onto a backing image
        (``onto``), backed or not: its snapshots read through the backing reference
        too (as zeros where there is none).  The model decides; vdisk must agree."""
        has, backed = self._has_snapshots(name), self.backing[name] is not None
        with vdisk.open(self._path(name), read_only=True, backing=False) as img:
            assert img.driver.has_snapshots() == has, f"{name}: has_snapshots() is not {has} as in the model"
            assert (img.driver.backing_ref is not None) == backed, f"{name}: backing reference is not as in the model"
        return has and (backed or onto)

    @invariant()
    def everything_matches(self):
        if not hasattr(self, "dir"):
            return
        for name, model in self.images.items():
            with vdisk.open(self._path(name), read_only=True) as img:
                assert img.read(0, img.size) == bytes(model), f"{name} differs from its model"
                got = [os.path.basename(n.filename) for n in img.chain()]
                want = [os.path.basename(self._path(x)) for x in self._chain(name)]
                assert got == want, f"{name}: backing chain is {got}, the model says {want}"
            for snap, smodel in self.snaps[name].items():
                with vdisk.open(self._path(name), snapshot=snap) as s:
                    assert s.read(0, s.size) == smodel, f"{name}@{snap} differs from its model"
            with vdisk.open(self._path(name), backing=False) as img:
                res = img.check()
                assert res.corruptions == [] and res.leaks == [], (name, res)


ChainModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", max(1, settings().max_examples // 4))),
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestChainModel = ChainModel.TestCase
