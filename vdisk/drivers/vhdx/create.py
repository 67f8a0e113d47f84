"""Creating a VHDX file (dynamic or fixed).

Contract: ``create_image(host, size, opts)`` writes a complete, empty, flushed image
into the empty ``host`` and raises ``UsageError`` for an option it cannot honour.
Layout written (every structure 1 MiB aligned, as [MS-VHDX] requires):

  0        file type identifier ("vhdxfile", creator "vdisk")
  64 KiB   header 1 (sequence 0), 128 KiB header 2 (sequence 1), log GUID zero
  192 KiB  region table 1, 256 KiB region table 2 (identical: BAT and metadata, required)
  1 MiB    the log (``log_size``, default 1 MiB), empty
  then     the metadata region (1 MiB: table + the five required items)
  then     the BAT region (its entries rounded up to 1 MiB)
  then     payload blocks: none for dynamic; all of them, in order, for fixed
           (the file is extended sparsely over them)

The guest size is rounded up to whole logical sectors, as qemu-img does.
"""

from __future__ import annotations

import uuid

from ...codec import vhdx as V
from ...errors import UsageError
from ...host import HostStorage
from ...sizes import parse_size
from ..base import CreateOptions

CREATE_OPTIONS = {
    "subformat": "dynamic (blocks allocated as written, the default) or fixed (every block allocated)",
    "block_size": "payload block size, a power of two from 1M to 256M (default 8M below 1 GiB, else 32M); "
                  "also -o cluster_size",
    "log_size": "log size, a multiple of 1M (default 1M)",
    "logical_sector_size": "512 (the default) or 4096",
}


def _size_opt(extra: dict, key: str, default: int) -> int:
    if key not in extra:
        return default
    try:
        return parse_size(extra.pop(key))
    except (UsageError, ValueError):
        raise UsageError(f"vhdx: {key} must be a size") from None


def create_image(host: HostStorage, size: int, opts: CreateOptions) -> None:
    if opts.backing is not None:
        raise UsageError("vhdx: vdisk does not write differencing disks (a backing file)")
    if opts.compression not in (None, "none"):
        raise UsageError("vhdx images cannot be compressed")
    extra = dict(opts.extra)
    sub = str(extra.pop("subformat", "dynamic"))
    if sub not in ("dynamic", "fixed"):
        raise UsageError(f"vhdx: subformat must be dynamic or fixed (got {sub!r})")
    default_bs = (8 << 20) if size < (1 << 30) else (32 << 20)
    bs = _size_opt(extra, "block_size", opts.cluster_size or default_bs)
    log_size = _size_opt(extra, "log_size", V.MiB)
    lss = _size_opt(extra, "logical_sector_size", 512)
    if extra:
        raise UsageError(f"vhdx: unknown option(s): {', '.join(sorted(extra))} (see -o help)")
    if not (V.MIN_BLOCK_SIZE <= bs <= V.MAX_BLOCK_SIZE) or bs & (bs - 1):
        raise UsageError(f"vhdx: block_size {bs} is not a power of two from 1M to 256M")
    if log_size % V.MiB or not log_size or log_size > (1 << 30):
        raise UsageError(f"vhdx: log_size {log_size} is not a multiple of 1M up to 1G")
    if lss not in (512, 4096):
        raise UsageError(f"vhdx: logical_sector_size must be 512 or 4096 (got {lss})")
    size = -(-size // lss) * lss
    if size > V.MAX_VIRTUAL_SIZE:
        raise UsageError(f"vhdx: size {size} is larger than 64 TiB")

    ratio = V.chunk_ratio(bs, lss)
    nbat = V.bat_entries(size, bs, ratio, False)
    log_off = V.HEADER_SECTION_SIZE
    meta_off = log_off + log_size
    bat_off = meta_off + V.MiB
    bat_len = max(V.MiB, -(-nbat * 8 // V.MiB) * V.MiB)
    data_off = bat_off + bat_len

    host.pwrite(0, V.encode_file_identifier("vdisk"))
    fw, dw = uuid.uuid4(), uuid.uuid4()
    for slot in (0, 1):
        h = V.Header(slot, fw, dw, V.ZERO_GUID, 0, 1, log_size, log_off)
        host.pwrite(V.HEADER_OFFSETS[slot], V.encode_header(h))
    regions = [V.Region(V.REGION_BAT, bat_off, bat_len, True), V.Region(V.REGION_METADATA, meta_off, V.MiB, True)]
    table = V.encode_region_table(regions)
    for off in V.REGION_TABLE_OFFSETS:
        host.pwrite(off, table)

    items = [
        (V.META_FILE_PARAMETERS, V.encode_file_parameters(V.FileParameters(bs, sub == "fixed", False)), False),
        (V.META_VIRTUAL_DISK_SIZE, size.to_bytes(8, "little"), True),
        (V.META_VIRTUAL_DISK_ID, uuid.UUID(hex=opts.image_id).bytes_le if opts.image_id else uuid.uuid4().bytes_le,
         True),
        (V.META_LOGICAL_SECTOR_SIZE, lss.to_bytes(4, "little"), True),
        (V.META_PHYSICAL_SECTOR_SIZE, (4096).to_bytes(4, "little"), True),
    ]
    entries, payload, pos = [], b"", V.METADATA_TABLE_SIZE
    for item_id, data, vd in items:
        entries.append(V.MetadataEntry(item_id, pos, len(data), False, vd, True))
        payload += data
        pos += len(data)
    host.pwrite(meta_off, V.encode_metadata_table(entries) + payload)

    end = data_off
    if sub == "fixed":
        blocks = -(-size // bs)
        bat = [0] * nbat
        for b in range(blocks):
            bat[V.bat_index(b, ratio)] = V.make_bat_entry(V.PAYLOAD_FULLY_PRESENT, data_off + b * bs)
        step = 1 << 17
        for i in range(0, nbat, step):
            chunk = bat[i:i + step]
            host.pwrite(bat_off + i * 8, b"".join(v.to_bytes(8, "little") for v in chunk))
        end = data_off + blocks * bs
    host.truncate(max(end, bat_off + bat_len))
    host.flush()
