"""The end of a run: every disk, checkpoint and live clone read back and compared with
the model, and the space each VM takes.

What is read for a disk: every block its VM wrote (the model's map), every block
the disk's own layer holds (``block_status`` of the top image alone: a block there
that nothing wrote would be a stray write), and the golden image's blocks -- a
deterministic sample of ``check.sample`` of them per disk (``check.golden =
"sample"``), or all (``"full"``).  A checkpoint is read the same way through its
snapshot.  A deleted VM's disks must be gone.  Each mismatch names the VM, the disk,
the snapshot, the offset, what was expected and what was found; the first ten per
disk are kept.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import vdisk

from .. import block
from ..drivers.base import Status
from ..errors import VdiskError
from .model import BLOCK, DiskModel, block_bytes, describe, runs, token_name

if TYPE_CHECKING:
    from .runner import Fleet

MAX_MISMATCHES = 10


def _blocks_to_check(fleet: Fleet, img: block.Image, model: DiskModel, salt: int) -> list[int]:
    want = set(model.own)
    for ext in img.block_status(0, img.size, chain=False):
        if ext.status != Status.UNALLOCATED:
            want.update(range(ext.offset // BLOCK, -(-ext.end // BLOCK)))
    g = model.base
    if g is not None:
        if fleet.spec.check.golden == "full":
            want.update(g.blocks())
        elif fleet.spec.check.sample:
            total = g.count()
            if total:
                stride = max(1, total // fleet.spec.check.sample)
                start = salt % stride
                for i, b in enumerate(g.blocks()):
                    if i % stride == start:
                        want.add(b)
    nblocks = -(-model.size // BLOCK)
    return sorted(b for b in want if b < nblocks)


def check_image(fleet: Fleet, vm_name: str, path: str, fmt: str, model: DiskModel, snapshot: str | None,
                salt: int) -> dict:
    """Compare one image (or one of its snapshots) with ``model``."""
    what = f"{vm_name} {os.path.relpath(path, fleet.workdir)}" + (f"@{snapshot}" if snapshot else "")
    out = {"vm": vm_name, "disk": os.path.relpath(path, fleet.workdir), "snapshot": snapshot, "blocks": 0,
           "mismatches": []}
    try:
        img = vdisk.open(path, format=fmt, read_only=True, snapshot=snapshot)
    except VdiskError as exc:
        out["mismatches"].append({"offset": None, "message": f"{what}: cannot be opened: {exc}"})
        return out
    with img:
        blocks = _blocks_to_check(fleet, img, model, salt)
        for first, n in runs(blocks, 256):
            off = first * BLOCK
            length = min(n * BLOCK, img.size - off)
            try:
                got = img.read(off, length)
            except VdiskError as exc:
                out["mismatches"].append({"offset": off, "message": f"{what}: reading {length} bytes at {off}: {exc}"})
                continue
            out["blocks"] += n
            want = model.expected(first, n)[:length]
            if got == want:
                continue
            for k in range(n):
                a, b = got[k * BLOCK:(k + 1) * BLOCK], want[k * BLOCK:(k + 1) * BLOCK]
                if a != b:
                    bno = first + k
                    exp = token_name(model.token_of(bno))
                    out["mismatches"].append({"offset": bno * BLOCK, "expected": exp, "found": describe(a, bno),
                                              "message": f"{what}: block at offset {bno * BLOCK} holds "
                                                         f"{describe(a, bno)}, expected {exp}"})
                    if len(out["mismatches"]) >= MAX_MISMATCHES:
                        return out
    return out


def check_fleet(fleet: Fleet) -> dict:
    """Check every disk of every VM (closed by now) against its model."""
    results = []
    gone = []
    for vm in fleet.vms:
        for k, d in enumerate(vm.disks):
            if vm.deleted:
                if block.exists(d.path):
                    gone.append(f"{vm.name}: {d.path} was deleted but still exists")
                continue
            salt = vm.number * 16 + k
            results.append(check_image(fleet, vm.name, d.path, d.format, d.model, None, salt))
            for name, (path, model) in sorted(d.checkpoints.items()):
                results.append(check_image(fleet, vm.name, path, d.format, model, name, salt))
    mismatches = [m for r in results for m in r["mismatches"]]
    messages = [m["message"] for m in mismatches] + gone
    return {"passed": not messages, "images_checked": len(results), "blocks_checked": sum(r["blocks"] for r in results),
            "mismatch_count": len(messages), "mismatches": messages[:50],
            "checkpoints_checked": sum(1 for r in results if r["snapshot"]),
            "live_clones_checked": sum(1 for vm in fleet.vms if vm.number >= fleet.spec.fork.vms and not vm.deleted)}


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _chain_files(path: str, fmt: str) -> list[str]:
    try:
        with vdisk.open(path, format=fmt, read_only=True, force_share=True) as img:
            return [n.filename for n in img.chain()]
    except VdiskError:
        return [path]


def space_report(fleet: Fleet) -> dict:
    """Space per VM and for the fleet.  Files: a VM's unique bytes are the host bytes
    of its own disk files (data, metadata, its snapshots); shared bytes those of the
    images below them that it reads through (the golden image, a live clone's
    source), which other VMs share.  Pools: the pool's own accounting (bytes only
    this image reaches, and those it shares with others, as ``vdisk pool info``)."""
    per_vm: dict[str, dict] = {}
    pool_images: dict[str, dict] = {}
    pools = set()
    for vm in fleet.vms:
        for d in vm.disks:
            if d.format == "pool":
                pools.add(os.path.dirname(d.path))
    for p in sorted(pools):
        if not os.path.isdir(p):
            continue
        from ..pool.admin import pool_info

        info = pool_info(p)
        for item in info["per_image"]:
            pool_images[os.path.join(p, item["image"])] = item
    files_seen: set[str] = set()
    for vm in fleet.vms:
        unique = shared = 0
        if not vm.deleted:
            for d in vm.disks:
                if d.format == "pool":
                    item = pool_images.get(d.path) or {}
                    tot = item.get("total") or item.get("live") or {}
                    unique += int(tot.get("unique_bytes", 0))
                    shared += int(tot.get("shared_bytes", 0))
                    continue
                files = _chain_files(d.path, d.format)
                unique += _allocated(files[0])
                shared += sum(_allocated(f) for f in files[1:])
                files_seen.update(files)
        per_vm[vm.name] = {"unique_bytes": unique, "shared_bytes": shared}
    live = [v for v in fleet.vms if not v.deleted]
    uniq = [per_vm[v.name]["unique_bytes"] for v in live]
    golden = fleet.layout.golden_path
    if fleet.layout.format == "pool":
        item = pool_images.get(golden) or {}
        golden_bytes = int(((item.get("total") or {}).get("referenced_bytes")) or 0)
    else:
        golden_bytes = _allocated(golden)
    physical = _du(fleet.workdir)
    return {"per_vm": per_vm,
            "fleet": {"vms": len(live), "golden_bytes": golden_bytes, "unique_bytes_total": sum(uniq),
                      "unique_bytes_per_vm_mean": round(sum(uniq) / len(uniq)) if uniq else 0,
                      "unique_bytes_per_vm_median": sorted(uniq)[len(uniq) // 2] if uniq else 0,
                      "unique_bytes_per_vm_max": max(uniq) if uniq else 0,
                      "physical_bytes": physical,
                      "physical_bytes_per_vm": round(physical / len(live)) if live else 0}}


def _du(top: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(top):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


__all__ = ["block_bytes", "check_fleet", "check_image", "space_report"]
