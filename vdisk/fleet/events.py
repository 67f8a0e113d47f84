"""Timed events on a running VM: checkpoint, restore, live clone, delete, migrate.

Each runs in the VM's own thread between two of its requests, holding the VM's lock,
so it sees the disks at one point of the VM's history (as a hypervisor pausing the
guest's I/O for a moment) and the model moves with it:

- ``checkpoint``: a snapshot of every disk of the VM at that point; the model of each
  is kept and the snapshot is checked against it at the end.
- ``restore``: every disk reverted to a checkpoint; the model becomes the
  checkpoint's model again.
- ``live_clone``: every disk cloned at that point (:meth:`Layout.live_clone`); the
  clone is a new VM with a copy of the model, which may run a workload of its own,
  while the original goes on writing.
- ``delete``: the VM's disks closed and removed through ``vdisk.ops.chain.remove``
  (which releases the holds on the golden image, and refuses a disk others still
  depend on); the check then verifies they are gone.
- ``migrate``: every disk mirrored while the VM keeps running into a new image in
  another directory or pool (:class:`Mirror`): a background copy, advanced a chunk
  after each of the VM's requests, with the VM's writes below the copy's cursor sent
  to both images (as QEMU's drive-mirror in write-blocking mode); at the end the VM
  switches to the copy and the source is removed.  The copy is flat (the whole
  disk, like drive-mirror's sync=full), and the source's checkpoints go with it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import vdisk

from ..errors import UsageError
from ..ops import chain, holds
from .disks import VM, Disk, Layout
from .spec import EventSpec

if TYPE_CHECKING:
    from .model import DiskModel

MIRROR_CHUNK = 4 << 20
ZERO_GRAIN = 64 << 10


class EventError(UsageError):
    """An event that cannot be carried out as the spec asks (a restore of a
    checkpoint that does not exist, deleting a VM whose disk a clone depends on)."""


def describe(ev: EventSpec) -> str:
    what = {"checkpoint": f"checkpoint {ev.name}", "restore": f"restore {ev.checkpoint}",
            "live_clone": f"live clone as {ev.name}", "delete": "delete", "migrate": f"migrate to {ev.to}"}
    when = f"at {ev.at:g} s" if ev.at is not None else f"after {ev.after_ops} ops"
    return f"event {ev.index} ({what[ev.action]} of VM {ev.vm}, {when})"


def checkpoint(vm: VM, name: str) -> float:
    """Snapshot every disk of ``vm``; returns the seconds it took."""
    t0 = time.perf_counter()
    for d in vm.disks:
        if name in d.checkpoints:
            raise EventError(f"{d.path} has a checkpoint {name!r} already")
        d.image.snapshot_create(name)
    elapsed = time.perf_counter() - t0
    for d in vm.disks:
        d.checkpoints[name] = (d.path, d.model.copy())
    vm.checkpoint_seconds.append(elapsed)
    return elapsed


def restore(vm: VM, name: str) -> float:
    t0 = time.perf_counter()
    for d in vm.disks:
        if d.mirror is not None:
            raise EventError(f"{d.path} is being migrated; restore it after the migration")
        held = d.checkpoints.get(name)
        if held is None or held[0] != d.path:
            why = f" ({d.no_restore})" if d.no_restore and held is not None else ""
            raise EventError(f"{d.path} has no checkpoint {name!r} to restore{why}")
    for d in vm.disks:
        d.image.snapshot_revert(name)
        d.model = d.checkpoints[name][1].copy()
    return time.perf_counter() - t0


def live_clone(layout: Layout, vm: VM, clone_name: str) -> tuple[float, list[Disk]]:
    """Clone every disk of ``vm`` now; returns (seconds, the clone's disks, closed)."""
    for d in vm.disks:
        if d.mirror is not None:
            raise EventError(f"{d.path} is being migrated; clone it after the migration")
    t0 = time.perf_counter()
    out = []
    snap = f"live-clone-{clone_name}"
    for k, d in enumerate(vm.disks):
        dst = sibling_path(d, clone_name, k)
        layout.live_clone(d, dst, snap)
        if d.format in ("vdk", "pool"):
            d.checkpoints[snap] = (d.path, d.model.copy())
        out.append(Disk(dst, d.format, d.model.copy()))
    return time.perf_counter() - t0, out


def sibling_path(d: Disk, vm_name: str, k: int) -> str:
    """Where disk ``k`` of a clone of ``d`` goes: next to ``d`` (in its directory, or
    its pool), so a linked clone's backing file is in its own directory and a pool
    clone is native, wherever ``d`` was migrated to."""
    where = os.path.dirname(d.path)
    if d.format == "pool":
        return os.path.join(where, f"{vm_name}-d{k}")
    return os.path.join(where, f"{vm_name}-d{k}.{d.format}")


def delete(vm: VM) -> float:
    t0 = time.perf_counter()
    for d in vm.disks:
        if d.mirror is not None:
            d.mirror.abandon()
        d.close()
    for d in vm.disks:
        chain.remove(d.path)
    vm.deleted = True
    return time.perf_counter() - t0


class Mirror:
    """A running migration of one disk (see the module's docstring)."""

    def __init__(self, disk: Disk, dst_path: str, dst_format: str):
        self.disk = disk
        self.src_path = disk.path
        self.dst_path = dst_path
        self.dst_format = dst_format
        self.size = disk.image.size
        deps = holds.dependants(disk.path) if disk.format in ("vdk", "pool") else []
        if deps:
            raise EventError(f"{disk.path}: cannot migrate, {len(deps)} image(s) depend on it "
                             f"({deps[0].path}); their snapshots would go with the source")
        vdisk.create(dst_path, self.size, format=dst_format)
        self.dst = vdisk.open(dst_path, format=dst_format)
        self.cursor = 0
        self.copied = 0
        self.started = time.perf_counter()

    def mirror_write(self, op: str, offset: int, length: int, data: bytes | None) -> None:
        """Send a request the VM just made to the source to the copy as well, if it
        touches what the copy holds already."""
        if offset >= self.cursor:
            return
        if op in ("W", "U"):
            self.dst.write(offset, data)
        elif op in ("D", "Z"):
            self.dst.write_zeroes(offset, length)
        elif op == "F":
            self.dst.flush()

    def step(self, nbytes: int = MIRROR_CHUNK) -> bool:
        """Copy the next chunk; True when the copy has reached the end."""
        if self.cursor >= self.size:
            return True
        n = min(nbytes, self.size - self.cursor)
        data = self.disk.image.read(self.cursor, n)
        if data.count(0) != len(data):
            for p in range(0, n, ZERO_GRAIN):  # zeros are not copied (drive-mirror's detect-zeroes)
                piece = data[p:p + ZERO_GRAIN]
                if piece.count(0) != len(piece):
                    self.dst.write(self.cursor + p, piece)
                    self.copied += len(piece)
        self.cursor += n
        return self.cursor >= self.size

    def switch(self) -> float:
        """The copy is complete: the VM's disk becomes the copy, the source goes."""
        self.dst.flush()
        d = self.disk
        d.close()
        chain.remove(self.src_path)
        d.image = self.dst
        d.path = self.dst_path
        d.format = self.dst_format
        d.checkpoints = {}
        d.no_restore = None
        d.mirror = None
        return time.perf_counter() - self.started

    def abandon(self) -> None:
        self.dst.close()
        self.disk.mirror = None


def migrate_start(layout: Layout, vm: VM, to: str) -> None:
    for k, d in enumerate(vm.disks):
        if d.mirror is not None:
            raise EventError(f"{d.path} is being migrated already")
        path, fmt = layout.migration_target(vm.name, k, to)
        d.mirror = Mirror(d, path, fmt)


def migrate_advance(vm: VM, finish: bool = False) -> float | None:
    """One copy step of every disk being migrated (all of it with ``finish``); returns
    the migration's seconds once the VM has switched to the copies, else None."""
    mirrors = [d.mirror for d in vm.disks if d.mirror is not None]
    if not mirrors:
        return None
    done = True
    for m in mirrors:
        while True:
            end = m.step()
            if end or not finish:
                break
        done = done and end
    if not done:
        return None
    return max(m.switch() for m in mirrors)


def models_of(vm: VM) -> list[DiskModel]:
    return [d.model for d in vm.disks]
