"""The fleet's images: the golden image, forking it into VMs' disks (linked clone,
full clone, clone in a pool), and a VM's disks with their models.

Everything goes through vdisk's Python API: :func:`vdisk.create`, :func:`vdisk.open`,
:func:`vdisk.ops.chain.clone` and the pool's admin API; no subprocess, no CLI.

Layout of the work directory::

    golden.vdk | golden.qcow2        the golden image (fork.method linked or full)
    pool/                            the fleet's pool (fork.method pool): golden, VMs
    NAME-dK.vdk | NAME-dK.qcow2      disk K of the VM called NAME (vm000, ..., or a
                                     live clone's name), next to the golden image
    migrated/                        disks migrated to another directory
    migrate-pool/                    the pool disks are migrated into (to = "pool")

A VM's disks sit next to the golden image because a linked clone names its backing
file and vdisk follows backing files only inside the image's own directory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import vdisk

from .. import block
from ..ops import chain
from ..ops.context import OpenContext
from .model import BLOCK, DiskModel, Golden
from .spec import FleetSpec

GOLDEN_SNAPSHOT = "base"


class _ThroughOpenImage(OpenContext):
    """Opens images here, but takes holds on ``path`` through its image ``img``,
    which the VM holds open for writing (as a mount would)."""

    def __init__(self, path: str, img: vdisk.Image):
        self.path, self.img = path, img

    @contextlib.contextmanager
    def writable(self, path: str, fmt: str | None = None):
        if not block.same_image(path, self.path):
            with super().writable(path, fmt) as other:
                yield other
            return
        yield self.img


class Disk:
    """One disk of a VM: where it is, its open image, what it must hold, and the
    checkpoints (snapshots) it has with what each must hold."""

    def __init__(self, path: str, fmt: str, model: DiskModel):
        self.path = path
        self.format = fmt
        self.model = model
        self.image: block.Image | None = None
        #: snapshot name -> (the image file holding it, its model), checked at the end
        self.checkpoints: dict[str, tuple[str, DiskModel]] = {}
        #: set while the disk is being migrated (vdisk.fleet.events.Mirror)
        self.mirror = None
        #: the disk may no longer take internal snapshots of its own history
        #: (a qcow2 disk after a live clone sits on a new overlay): why, or None
        self.no_restore: str | None = None

    def open(self) -> None:
        self.image = vdisk.open(self.path, format=self.format)

    def close(self) -> None:
        if self.image is not None:
            img, self.image = self.image, None
            img.close()


class VM:
    """A simulated VM: a name, a number (its writes' tokens carry it), its disks, and
    the lock that serialises everything done to its disks (the workload's requests
    and the events), since an opened image serves one caller at a time."""

    def __init__(self, number: int, name: str, disks: list[Disk]):
        self.number = number
        self.name = name
        self.disks = disks
        self.lock = threading.Lock()
        self.seq = 0
        self.ops = 0
        self.deleted = False
        self.fork_seconds = 0.0
        self.checkpoint_seconds: list[float] = []
        self.events: list[dict] = []
        self.error: str | None = None
        self.workload = None  # the WorkloadSpec it runs in the current phase

    def next_token_seq(self) -> int:
        self.seq += 1
        return self.seq


class Layout:
    """Where a fleet's images go, and how each kind is made."""

    def __init__(self, spec: FleetSpec, workdir: str):
        self.spec = spec
        self.dir = os.path.abspath(workdir)
        self.method = spec.fork.method
        self.pool_dir = os.path.join(self.dir, "pool")
        self.migrate_pool = os.path.join(self.dir, "migrate-pool")
        self._lock = threading.Lock()
        if self.method == "pool":
            self.format = "pool"
            self.golden_path = os.path.join(self.pool_dir, "golden")
        else:
            self.format = spec.fork.format
            self.golden_path = os.path.join(self.dir, f"golden.{spec.golden.format}")

    def disk_path(self, vm_name: str, k: int) -> str:
        if self.method == "pool":
            return os.path.join(self.pool_dir, f"{vm_name}-d{k}")
        return os.path.join(self.dir, f"{vm_name}-d{k}.{self.format}")

    # ------------------------------------------------------------------ golden
    def make_golden(self, golden: Golden) -> None:
        """Create the golden image and write its deterministic content; snapshot it
        as ``base`` where the format can (vdk, pool: linked clones name the snapshot)."""
        os.makedirs(self.dir, exist_ok=True)
        g = self.spec.golden
        if self.method == "pool":
            from ..pool.admin import pool_create

            pool_create(self.pool_dir, {"dedup": self.spec.fork.pool_dedup})
            vdisk.create(self.golden_path, golden.size, format="pool")
        else:
            vdisk.create(self.golden_path, golden.size, format=g.format, cluster_size=g.cluster_size)
        with vdisk.open(self.golden_path, format=self.golden_format) as img:
            for first, n in golden.runs(256):
                img.write(first * BLOCK, DiskModel.data(first, n, golden.token))
            img.flush()
            if self.golden_format in ("vdk", "pool"):
                img.snapshot_create(GOLDEN_SNAPSHOT)

    @property
    def golden_format(self) -> str:
        return "pool" if self.method == "pool" else self.spec.golden.format

    # ------------------------------------------------------------------ forking
    def fork(self, vm_name: str) -> list[tuple[str, str, bool]]:
        """Make the disks of a new VM: disk 0 forked from the golden image, the others
        empty data disks.  Returns (path, format, based on the golden image)."""
        out = []
        src = self.golden_path
        if self.golden_format in ("vdk", "pool"):
            src = f"{self.golden_path}@{GOLDEN_SNAPSHOT}"
        p0 = self.disk_path(vm_name, 0)
        if self.method == "full":
            chain.clone(src, p0, full=True, fmt=self.format)
        else:
            chain.clone(src, p0, fmt=self.format)
        out.append((p0, self.format, True))
        for k in range(1, self.spec.fork.disks):
            pk = self.disk_path(vm_name, k)
            vdisk.create(pk, self.spec.fork.data_disk_size, format=self.format)
            out.append((pk, self.format, False))
        return out

    def live_clone(self, src: Disk, clone_path: str, snap: str) -> None:
        """Clone ``src`` (open, being written by its VM) at this instant into
        ``clone_path``: the clone sees the crash-consistent state of now, the source
        goes on.  vdk and pool: a snapshot, then a linked clone of it (the hold is
        taken through the source's open image).  qcow2, which cannot record who
        depends on its snapshots: the source's file becomes the read-only base of two
        new overlays, one the VM goes on writing, one the clone (as QEMU's
        blockdev-snapshot does)."""
        img = src.image
        if src.format in ("vdk", "pool"):
            img.flush()
            img.snapshot_create(snap)

            chain.clone(f"{src.path}@{snap}", clone_path, fmt=src.format, ctx=_ThroughOpenImage(src.path, img))
            return
        # qcow2: external snapshot
        img.flush()
        src.close()
        base = _free_name(src.path, ".base")
        os.rename(src.path, base)
        chain.clone(base, src.path, fmt="qcow2")
        chain.clone(base, clone_path, fmt="qcow2")
        src.open()
        src.checkpoints = {n: (base if p == src.path else p, m) for n, (p, m) in src.checkpoints.items()}
        src.no_restore = (f"{src.path} was live-cloned: it is now an overlay on {os.path.basename(base)}, "
                          "which holds its earlier snapshots (qcow2 cannot record a clone's dependence on a snapshot)")

    def migration_target(self, vm_name: str, k: int, to: str) -> tuple[str, str]:
        """(path, format) of disk ``k`` of ``vm_name`` migrated ``to`` dir or pool."""
        with self._lock:
            if to == "pool":
                if not os.path.isdir(self.migrate_pool):
                    from ..pool.admin import pool_create

                    pool_create(self.migrate_pool, {"dedup": self.spec.fork.pool_dedup})
                return os.path.join(self.migrate_pool, f"{vm_name}-d{k}"), "pool"
            d = os.path.join(self.dir, "migrated")
            os.makedirs(d, exist_ok=True)
            fmt = "vdk" if self.format == "pool" else self.format
            return os.path.join(d, f"{vm_name}-d{k}.{fmt}"), fmt


def _free_name(path: str, suffix: str) -> str:
    n = 1
    while True:
        cand = f"{path}{suffix}{n}"
        if not os.path.lexists(cand):
            return cand
        n += 1


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return time.perf_counter() - t0, r
