"""FLAT (and VMFS) extents: a range of a plain file, and ZERO extents: nothing.

Contract: the same interface as :class:`.sparse.SparseExtent` (``sectors``,
``read_pieces``, ``status``, ``write``, ``zero``, ``flush``, ``close``); offsets
are relative to the extent.  A flat extent maps extent byte ``x`` to byte
``offset * 512 + x`` of its file: it always holds data (bytes past the end of
a short file read as zeros, as with a sparse raw file), so it never falls
through to a backing image.  A ZERO extent reads as zeros and refuses writes.
"""

from __future__ import annotations

from ...errors import NotSupported, ReadOnlyImage
from ...host import HostStorage
from ..base import Status

SECTOR = 512


class FlatExtent:
    def __init__(self, host: HostStorage, name: str, sectors: int, offset: int, read_only: bool):
        self.host = host
        self.name = name
        self.sectors = sectors
        self.base = offset * SECTOR
        self.read_only = read_only
        self.stream = False

    def read_pieces(self, offset: int, length: int):
        return [(offset, length, self.host.pread(self.base + offset, length))]

    def status(self, offset: int, length: int):
        return [(offset, length, Status.DATA, self.base + offset, False)]

    def write(self, offset: int, data: bytes, fill) -> None:
        if self.read_only:
            raise ReadOnlyImage(f"{self.name}: the descriptor makes this extent read-only")
        self.host.pwrite(self.base + offset, data)

    def zero(self, offset: int, length: int, has_backing: bool, fill) -> None:
        if self.read_only:
            raise ReadOnlyImage(f"{self.name}: the descriptor makes this extent read-only")
        if getattr(self.host, "fd", None) is not None:
            self.host.punch_hole(self.base + offset, length)
            return
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            self.host.pwrite(self.base + pos, bytes(min(step, offset + length - pos)))

    def allocated_grains(self) -> int:
        return 0

    def flush(self) -> None:
        if not self.read_only:
            self.host.flush()

    def close(self) -> None:
        self.host.close()


class ZeroExtent:
    def __init__(self, sectors: int):
        self.sectors = sectors
        self.name = "ZERO extent"
        self.read_only = True
        self.stream = False

    def read_pieces(self, offset: int, length: int):
        return [(offset, length, bytes(length))]

    def status(self, offset: int, length: int):
        return [(offset, length, Status.ZERO, None, False)]

    def write(self, offset: int, data: bytes, fill) -> None:
        raise NotSupported("a ZERO extent of a VMDK descriptor cannot be written")

    def zero(self, offset: int, length: int, has_backing: bool, fill) -> None:
        return None

    def allocated_grains(self) -> int:
        return 0

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
