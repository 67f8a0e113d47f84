"""The raw driver: the guest disk is the host file, byte for byte."""

from __future__ import annotations

from ..errors import UsageError
from ..host import HostStorage
from . import register
from .base import BlockDriver, CreateOptions, Extent, Status


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    default_cluster_size = 4096
    create_options = {
        "preallocation": "off (sparse, the default), falloc (reserve the space with posix_fallocate) "
                         "or full (write zeros over the whole disk)",
    }

    def __init__(self, host: HostStorage, read_only: bool):
        self.host = host
        self.read_only = read_only
        self.size = host.size()
        self.cluster_size = 4096
        self.backing = None

    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        if opts.backing is not None:
            raise UsageError("raw images cannot have a backing file")
        if opts.compression not in (None, "none"):
            raise UsageError("raw images cannot be compressed")
        extra = dict(opts.extra)
        prealloc = extra.pop("preallocation", "off")
        if extra:
            raise UsageError(f"unknown raw option(s): {', '.join(sorted(extra))} (see -o help)")
        if prealloc not in ("off", "falloc", "full"):
            raise UsageError(f"raw: preallocation must be off, falloc or full (got {prealloc!r})")
        host.truncate(size)
        if prealloc == "falloc":
            host.allocate(0, size)
        elif prealloc == "full":
            HostStorage.allocate(host, 0, size)  # zeros written: every block allocated on any file system
        host.flush()

    @classmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> RawDriver:
        if snapshot is not None:
            raise UsageError("raw images have no snapshots")
        return cls(host, read_only)

    def close(self) -> None:
        self.host.close()

    def read(self, offset: int, length: int) -> bytes:
        return self.host.pread(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.host.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.host.punch_hole(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.host.punch_hole(offset, length)

    def flush(self) -> None:
        self.host.flush()

    def resize(self, new_size: int) -> None:
        self.host.truncate(new_size)
        self.size = new_size

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Data vs holes, from SEEK_DATA/SEEK_HOLE where the host file supports them."""
        import os

        end = offset + length
        fd = getattr(self.host, "fd", None)
        if fd is None or length == 0:
            return [Extent(offset, length, Status.DATA, host_offset=offset)] if length else []
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                data = end
            data = min(data, end)
            if data > pos:
                out.append(Extent(pos, data - pos, Status.ZERO))
                pos = data
                if pos >= end:
                    break
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, pos + 1), end)
            out.append(Extent(pos, hole - pos, Status.DATA, host_offset=pos))
            pos = hole
        return out

    def info(self) -> dict:
        return {}
