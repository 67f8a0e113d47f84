"""Creating VMDK images: monolithicSparse (read-write) and streamOptimized
(written once by convert).

Contract: :func:`create` writes a complete, empty image into the empty ``host``
and flushes it.  The layout is the one qemu-img and VMware Workstation use:

- monolithicSparse: header (sector 0), embedded descriptor (sectors 1-20),
  redundant grain directory and its grain tables, grain directory and its
  grain tables, every table preallocated (zeros: unallocated), the overhead
  rounded up to a whole grain; grains follow.  Version 1, flags: valid
  newline test + redundant tables (+ zeroed-grain entries with
  ``zeroed_grain=on``).
- streamOptimized: header (version 3, compressed grains with markers, grain
  directory "at the end"), embedded descriptor, padding to one grain; then the
  tail of an empty stream: grain directory marker + an all-zero grain
  directory, footer marker + footer (the header with the directory's offset),
  end-of-stream marker.  Writes (:mod:`.write`) append grains in place of that
  tail and write it anew after them.

An overlay (``opts.backing``, monolithicSparse only) records the parent as
``parentFileNameHint`` (relative to the new image, as vdisk's backing files)
and the parent's current CID as ``parentCID``.
"""

from __future__ import annotations

import array
import os
import random

from ...codec import vmdk as V
from ...errors import UsageError
from ...host import HostStorage
from ..base import CreateOptions

SECTOR = V.SECTOR
DESCRIPTOR_SECTORS = 20
SUBFORMATS = ("monolithicSparse", "streamOptimized")
#: the largest disk vdisk creates: grain table entries address 2 TiB of one file
MAX_CREATE_BYTES = (2 << 40) - (64 << 20)

OPTIONS = {
    "subformat": "monolithicSparse (the default, read-write) or streamOptimized (compressed, written once: "
                 "for convert)",
    "adapter_type": "ide (default), buscontroller, lsilogic or legacyESX: the ddb.adapterType recorded",
    "hwversion": "the ddb.virtualHWVersion recorded (default 4)",
    "zeroed_grain": "on or off (default): grain table entries may mark a grain as zeros (monolithicSparse)",
}


def new_cid() -> int:
    while True:
        cid = random.getrandbits(32)
        if cid not in (0xFFFFFFFF, 0xFFFFFFFE):
            return cid


def _extent_name(host: HostStorage) -> str:
    base = os.path.basename(getattr(host, "name", "") or "")
    if not base or base.isdigit():  # an unnamed file (convert builds its output in /proc/self/fd/N)
        return "disk.vmdk"
    return base


def _directory_of(host: HostStorage) -> str:
    """The directory the new image is in (a backing file is named relative to it).
    convert builds its output in an unnamed file, ``/proc/self/fd/N``: that link
    names the file's directory."""
    name = os.path.abspath(getattr(host, "name", "") or ".")
    if name.startswith("/proc/self/fd/"):
        try:
            return os.path.dirname(os.readlink(name))
        except OSError:
            pass
    return os.path.dirname(name)


def create(host: HostStorage, size: int, opts: CreateOptions) -> None:
    extra = dict(opts.extra)
    sub = extra.pop("subformat", "monolithicSparse")
    adapter = extra.pop("adapter_type", "ide")
    hw = extra.pop("hwversion", "4")
    zeroed = extra.pop("zeroed_grain", "off")
    if extra:
        raise UsageError(f"unknown vmdk option(s): {', '.join(sorted(extra))} (see -o help)")
    if sub not in SUBFORMATS:
        raise UsageError(f"vmdk: vdisk creates subformat monolithicSparse or streamOptimized (got {sub!r}); "
                         "the multi-file layouts (twoGbMaxExtentSparse, monolithicFlat) are read and written, "
                         "not created")
    if adapter not in ("ide", "buscontroller", "lsilogic", "legacyESX"):
        raise UsageError(f"vmdk: adapter_type must be ide, buscontroller, lsilogic or legacyESX (got {adapter!r})")
    if not str(hw).isdigit():
        raise UsageError(f"vmdk: hwversion must be a number (got {hw!r})")
    if zeroed not in ("on", "off"):
        raise UsageError(f"vmdk: zeroed_grain must be on or off (got {zeroed!r})")
    stream = sub == "streamOptimized"
    if opts.compression not in (None, "none"):
        if not stream:
            raise UsageError("vmdk: only streamOptimized images are compressed (-o subformat=streamOptimized)")
        if opts.compression not in ("zlib", "deflate", "on", "default"):
            raise UsageError(f"vmdk: grains are compressed with deflate (zlib), not {opts.compression}")
    grain = opts.cluster_size or 65536
    gs = grain // SECTOR
    if grain % SECTOR or gs & (gs - 1) or not V.MIN_GRAIN_SECTORS <= gs <= V.MAX_GRAIN_SECTORS:
        raise UsageError(f"vmdk: the grain size (cluster size) must be a power of two from "
                         f"{V.MIN_GRAIN_SECTORS * SECTOR} to {V.MAX_GRAIN_SECTORS * SECTOR} bytes")
    if size > MAX_CREATE_BYTES:
        raise UsageError(f"vmdk: a sparse VMDK holds at most {MAX_CREATE_BYTES} bytes (2 TiB less a little)")
    sectors = -(-size // SECTOR)
    parent_cid, hint = V.NO_PARENT_CID, None
    if opts.backing is not None:
        if stream:
            raise UsageError("vmdk: a streamOptimized image cannot have a parent (backing file)")
        if opts.backing.format != "vmdk":
            raise UsageError(f"vmdk: a VMDK's parent must be a VMDK image (VMware's parentFileNameHint), "
                             f"not {opts.backing.format}")
        if opts.backing.snapshot:
            raise UsageError("vmdk: a VMDK's parent cannot be an internal snapshot")
        from .layout import read_cid

        ppath = opts.backing.filename
        if not os.path.isabs(ppath):
            ppath = os.path.join(_directory_of(host), ppath)
        parent_cid, hint = read_cid(ppath), opts.backing.filename
    flags = V.FLAG_NL_TEST
    if stream:
        flags |= V.FLAG_COMPRESSED | V.FLAG_MARKERS
    else:
        flags |= V.FLAG_REDUNDANT_GT
        if zeroed == "on":
            flags |= V.FLAG_ZEROED_GTE
    cyl, heads, secs = V.geometry(sectors)
    desc = V.encode_descriptor(
        cid=new_cid(), parent_cid=parent_cid, create_type=sub, parent_hint=hint,
        extents=[V.ExtentLine("RW", sectors, "SPARSE", _extent_name(host))],
        ddb=[("ddb.virtualHWVersion", str(hw)), ("ddb.geometry.cylinders", str(cyl)),
             ("ddb.geometry.heads", str(heads)), ("ddb.geometry.sectors", str(secs)),
             ("ddb.adapterType", adapter)])
    if len(desc) >= DESCRIPTOR_SECTORS * SECTOR:
        raise UsageError("vmdk: the descriptor (with its parent file name) does not fit its 10 KiB area")
    h = V.SparseHeader(version=3 if stream else 1, flags=flags, capacity=sectors, grain_size=gs,
                       descriptor_offset=1, descriptor_size=DESCRIPTOR_SECTORS, gtes_per_gt=V.GTES_PER_GT,
                       rgd_offset=0, gd_offset=0, overhead=0,
                       compress_algorithm=V.COMPRESS_DEFLATE if stream else V.COMPRESS_NONE)
    n_gd = h.gd_entries
    gd_sectors, gt_sectors = h.gd_sectors, h.gt_sectors
    start = 1 + DESCRIPTOR_SECTORS
    if stream:
        overhead = -(-start // gs) * gs
        h = h.with_(gd_offset=V.GD_AT_END, overhead=overhead)
        gd_off = overhead + 1
        tail = (V.encode_meta_marker(V.MARKER_GD, gd_sectors) + bytes(gd_sectors * SECTOR)
                + V.encode_meta_marker(V.MARKER_FOOTER, 1) + h.with_(gd_offset=gd_off).encode()
                + V.encode_meta_marker(V.MARKER_EOS, 0))
        host.pwrite(0, h.encode() + desc)
        host.pwrite(overhead * SECTOR, tail)
        host.flush()
        return
    rgd_off = start
    rgt_off = rgd_off + gd_sectors
    gd_off = rgt_off + n_gd * gt_sectors
    gt_off = gd_off + gd_sectors
    overhead = -(-(gt_off + n_gd * gt_sectors) // gs) * gs
    h = h.with_(rgd_offset=rgd_off, gd_offset=gd_off, overhead=overhead)
    host.truncate(overhead * SECTOR)
    host.pwrite(0, h.encode() + desc)
    for d_off, t_off in ((rgd_off, rgt_off), (gd_off, gt_off)):
        entries = V.encode_entries(array.array("I", (t_off + i * gt_sectors for i in range(n_gd))))
        host.pwrite(d_off * SECTOR, entries)
    host.flush()
