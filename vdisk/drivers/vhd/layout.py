"""Limits of the VHD driver and the footer vdisk writes for a new size."""

from __future__ import annotations

import time

from ...codec import vhd as C

MAX_SIZE = 0xFF000000 * C.SECTOR  # 2040 GiB: BAT entries are 32-bit sector numbers
ALIGN = 4096  # vdisk places each block so that its data starts on a 4 KiB boundary


def footer_for(size: int, disk_type: int, data_offset: int, unique_id: bytes, exact: bool = True) -> C.Footer:
    """A new footer for a guest of ``size`` bytes (a multiple of 512)."""
    chs = C.geometry(size // C.SECTOR)
    if C.chs_bytes(chs) != size:
        chs = C.MAX_CHS  # every reader then takes current_size (formats/vhd.md, "Size")
    return C.Footer(disk_type=disk_type, current_size=size, original_size=size, data_offset=data_offset,
                    geometry=chs, unique_id=unique_id, timestamp=max(0, int(time.time()) - C.EPOCH_OFFSET))
