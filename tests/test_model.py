"""Model-based test: every driver and chain against an in-memory bytearray.

Random writes, zero writes, discards, resizes, flushes, reopens and, for vdk,
snapshot create / delete / revert, with every snapshot compared to its model and
``check`` clean after reopens and at the end.

``VDISK_MODEL_EXAMPLES`` sets the number of examples; otherwise it is 60% of the
Hypothesis profile's ``max_examples`` (60 by default, 600 exploring; tests/conftest.py).
"""

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vdisk

CONFIGS = {
    "raw": dict(format="raw"),
    "vdk-4k": dict(format="vdk", cluster_size=4096),
    "vdk-64k-zstd": dict(format="vdk", compression="zstd"),
    "vdk-over-vdk": dict(format="vdk", cluster_size=4096, backing="vdk"),
    "vdk-over-raw": dict(format="vdk", cluster_size=8192, backing="raw"),
    "qcow2-4k": dict(format="qcow2", cluster_size=4096),
    "vdk-over-qcow2": dict(format="vdk", cluster_size=4096, backing="qcow2"),
}
SNAPSHOTS = ("vdk", "qcow2")
MAX = 3 << 20


def _data(rng: random.Random, seed: int, n: int, kind: int) -> bytes:
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        return (b"vdisk model %d " % seed * (n // 12 + 1))[:n]  # compressible
    return bytes(n)


class ImageModel(RuleBasedStateMachine):
    @initialize(config=st.sampled_from(sorted(CONFIGS)), size=st.integers(1, 2 << 20),
                seed=st.integers(0, 2**32 - 1))
    def setup(self, config, size, seed):
        # data from a drawn seed, not os.urandom: a derandomized run writes the same bytes
        self.rng = random.Random(seed)
        self.dir = tempfile.mkdtemp(prefix="vdisk-model-")
        self.cfg = dict(CONFIGS[config])
        self.path = os.path.join(self.dir, "top.img")
        fmt = self.cfg["format"]
        if fmt == "qcow2":
            size = -(-size // 512) * 512  # create rounds up to whole sectors, as qemu-img
        self.model = bytearray(size)
        backing = self.cfg.get("backing")
        if backing:
            base = os.path.join(self.dir, "base.img")
            bsize = max(1, size - 12345)  # shorter base: zeros beyond it
            vdisk.create(base, bsize, format=backing)
            with vdisk.open(base, format=backing) as b:
                d = self.rng.randbytes(min(bsize, 300_000))
                b.write(0, d)
            self.model[:len(d)] = d
            vdisk.create(self.path, size, format=fmt, backing_file=base, backing_format=backing,
                         cluster_size=self.cfg.get("cluster_size"))
        else:
            vdisk.create(self.path, size, format=fmt, cluster_size=self.cfg.get("cluster_size"),
                         compression=self.cfg.get("compression"))
        self.img = vdisk.open(self.path, format=fmt)
        self.snaps: dict[str, bytes] = {}
        self.counter = 0

    def teardown(self):
        if hasattr(self, "img"):
            try:
                self._check_clean()
            finally:
                self.img.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    def _check_clean(self):
        if self.cfg["format"] != "raw":
            res = self.img.check()
            assert res.corruptions == [] and res.leaks == [], res

    @property
    def size(self):
        return len(self.model)

    @rule(data=st.data(), kind=st.integers(0, 2))
    def write(self, data, kind):
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.integers(1, min(200_000, self.size - off)))
        d = _data(self.rng, self.counter, n, kind)
        self.counter += 1
        self.img.write(off, d)
        self.model[off:off + n] = d

    @rule(data=st.data(), discard=st.booleans())
    def zero(self, data, discard):
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.integers(1, self.size - off))
        (self.img.discard if discard else self.img.write_zeroes)(off, n)
        self.model[off:off + n] = bytes(n)

    @rule(new=st.integers(1, MAX))
    def resize(self, new):
        # also shrinking under snapshots (qcow2 too, as qemu-img 7.2): they keep their size
        self.img.resize(new, shrink=True)
        if new < self.size:
            del self.model[new:]
        else:
            self.model.extend(bytes(new - self.size))

    @rule()
    def flush(self):
        self.img.flush()

    @rule()
    def reopen(self):
        self.img.close()
        self.img = vdisk.open(self.path, format=self.cfg["format"])
        self._check_clean()

    @precondition(lambda self: self.cfg["format"] in SNAPSHOTS)
    @rule()
    def snapshot(self):
        name = f"s{self.counter}"
        self.counter += 1
        self.img.snapshot_create(name)
        self.snaps[name] = bytes(self.model)

    @precondition(lambda self: self.cfg["format"] in SNAPSHOTS and self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.snapshot_delete(name)
        del self.snaps[name]

    @precondition(lambda self: self.cfg["format"] in SNAPSHOTS and self.snaps)
    @rule(data=st.data())
    def revert(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.snapshot_revert(name)
        self.model = bytearray(self.snaps[name])

    @precondition(lambda self: self.cfg["format"] in SNAPSHOTS and self.snaps)
    @rule(data=st.data())
    def read_snapshot(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.flush()
        with vdisk.open(self.path, snapshot=name) as s:
            assert s.read(0, s.size) == self.snaps[name], f"snapshot {name} differs from its model"

    @invariant()
    def content_matches(self):
        if hasattr(self, "img"):
            assert self.img.size == self.size
            assert self.img.read(0, self.size) == bytes(self.model)


ImageModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("VDISK_MODEL_EXAMPLES", max(1, settings().max_examples * 3 // 5))),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestImageModel = ImageModel.TestCase
