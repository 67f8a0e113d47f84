"""The block driver interface: one format's view of one image file.

A driver maps guest offsets of *its own layer* to bytes in a :class:`HostStorage`.
It knows nothing of the CLI, FUSE, or of how a chain was assembled: the generic
layer (:mod:`vdisk.block`) validates every request before it reaches a driver, and
hands the driver a :class:`BackingReader` for the image below it, if any.

Contract common to all operations: ``offset``/``length`` passed to a driver are
already checked to lie inside ``[0, size)`` and to be non-negative; lengths may be
zero; no alignment is required (drivers handle partial clusters themselves).
Drivers raise :class:`~vdisk.errors.VdiskError` subclasses only.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..errors import NotSupported, UsageError
from ..host import HostStorage


class Status(enum.IntEnum):
    """What a range of one layer holds."""

    UNALLOCATED = 0  # nothing here: reads fall through to the backing image (or zeros)
    ZERO = 1  # reads as zeros in this layer, whatever the backing image holds
    DATA = 2  # this layer holds the data


@dataclass(frozen=True)
class Extent:
    """A guest range and what holds it (``block_status``)."""

    offset: int
    length: int
    status: Status
    host_offset: int | None = None  # where the data lives in the host file (DATA, uncompressed only)
    compressed: bool = False
    depth: int = 0  # 0 = top image; set by the chain layer when it resolves fall-through

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class BackingRef:
    """A backing image as an overlay names it: file name (relative to the overlay), format, snapshot."""

    filename: str
    format: str
    snapshot: str | None = None


@dataclass(frozen=True)
class Holder:
    """An image that depends on a snapshot (a linked clone): its identity and where it
    was, relative to the directory of the image that holds the snapshot."""

    image_id: str  # 32 lower-case hex digits (a UUID without dashes)
    path: str


@dataclass(frozen=True)
class SnapshotInfo:
    """An internal snapshot, as a driver lists it."""

    id: int
    name: str
    created: float  # seconds since the epoch
    size: int  # guest size when the snapshot was taken
    generation: int = 0
    unique_bytes: int | None = None  # host bytes only this snapshot references
    holds: int = 0  # linked clones that depend on this snapshot
    extra: dict = field(default_factory=dict)
    holders: tuple[Holder, ...] = ()  # those of the holds recorded by identity
    hidden: bool = False  # deleted by the user, kept for its holders


@dataclass
class CheckResult:
    """What a consistency check found.  ``corruptions`` make ``vdisk check`` exit 2; leaks only, 3."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    leaked_clusters: int = 0
    repaired: list[str] = field(default_factory=list)
    checked_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0

    @property
    def exit_code(self) -> int:
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


@dataclass(frozen=True)
class CreateOptions:
    """What ``create`` makes: cluster size, compression, backing, the format's own ``-o`` options."""

    cluster_size: int | None = None  # None: the format's default
    compression: str | None = None  # None or "none": off; "zstd" (vdk, qcow2), "zlib" (qcow2)
    backing: BackingRef | None = None
    extra: dict = field(default_factory=dict)  # format-specific -o options, already split
    #: the new image's identity (32 hex digits), for formats that record one; None: a new random one
    image_id: str | None = None


def on_off(what: str, value) -> bool:
    """A boolean ``-o`` option (``on``/``off``, ``true``/``false``, ``yes``/``no``,
    ``1``/``0``, or a bool); ``what`` names it in the error ("vdi: static")."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise UsageError(f"{what} must be on or off (got {value!r})")


def block_pieces(offset: int, length: int, block_size: int):
    """Cut ``[offset, offset + length)`` at multiples of ``block_size``: yields
    (block index, offset within the block, guest offset, length) for each piece."""
    pos, end = offset, offset + length
    while pos < end:
        b, within = divmod(pos, block_size)
        n = min(block_size - within, end - pos)
        yield b, within, pos, n
        pos += n


class BackingReader(Protocol):
    """What a driver may do with the image below it: read, with zeros past its end."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def block_status(self, offset: int, length: int) -> list[Extent]: ...


class SiblingFiles(Protocol):
    """What a driver of a multi-file format (``opens_siblings``, e.g. VMDK's extent
    files) is handed to open the other files its image names: the chain layer
    resolves ``name`` relative to the image, applies the backing-file policy
    (allowed directories, each file once, never the image itself) and the image's
    lock mode.  The driver owns and closes what it opens."""

    def open(self, name: str, *, read_only: bool) -> HostStorage: ...


class BlockDriver(abc.ABC):
    """One image file in one format.  Subclasses set the class attributes and implement
    the required methods; the optional ones have a fallback or raise ``NotSupported``.
    """

    format_name: ClassVar[str]
    supports_backing: ClassVar[bool] = False
    default_cluster_size: ClassVar[int] = 65536
    #: the -o options ``create`` takes: name -> one line of help (``vdisk create -o help``)
    create_options: ClassVar[dict[str, str]] = {}
    #: ``open`` takes a keyword ``siblings`` (:class:`SiblingFiles`): the image names other files
    opens_siblings: ClassVar[bool] = False

    #: guest size in bytes; updated by ``resize``
    size: int
    #: granularity of allocation; requests need not be aligned to it
    cluster_size: int
    #: the backing image this one names, or None
    backing_ref: BackingRef | None = None
    #: the image's identity (32 hex digits), where the format records one; else None
    image_id: str | None = None
    read_only: bool = True
    host: HostStorage

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def probe(cls, head: bytes) -> bool:
        """Return True if ``head`` (the first 8 KiB of a file) is this format.

        Raw never claims a file: a raw image is only ever opened when named."""
        return False

    @classmethod
    @abc.abstractmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        """Write a new, empty image of guest ``size`` bytes into the empty ``host``.

        Must validate ``opts`` and raise ``UsageError`` for what it cannot honour.
        The image must be complete and durable (flushed) when this returns."""

    @classmethod
    @abc.abstractmethod
    def open(cls, host: HostStorage, *, read_only: bool, snapshot: str | None = None) -> BlockDriver:
        """Open the image in ``host``.  Validates every header field and table bound
        before use (``CorruptImage``/``UnsupportedFeature`` otherwise).  With
        ``snapshot``, opens that snapshot's state, read-only."""

    def verify_backing(self, backing: BlockDriver) -> None:
        """Called by the chain layer after opening the image ``backing_ref`` names:
        raise ``BackingError`` if it is not the image this one was made on (VMDK
        compares CIDs).  Default: any image will do."""

    def attach_backing(self, backing: BackingReader | None) -> None:
        """Called once by the chain layer after ``open``, with the image below (or None)."""
        self.backing = backing

    @abc.abstractmethod
    def close(self) -> None:
        """Flush (if writable) and release the host storage.  Idempotent."""

    # ------------------------------------------------------------------ data path
    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return guest bytes ``[offset, offset+length)``.  Ranges this layer does not
        hold come from ``self.backing`` (zeros if none).  Verifies data checksums where
        the format has them and raises ``ChecksumMismatch`` naming the guest offset."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes.  The write is visible to following reads at once and
        durable after the next successful ``flush``.  A crash before that flush leaves
        the image as it was after the previous flush, or with some of these writes:
        never with metadata pointing at unwritten or freed space."""

    def prepare_write(self, offset: int, data: bytes) -> object | None:
        """Work a later ``write(offset, data, prepared=...)`` of exactly these bytes can
        skip, done now: a pure function of its arguments and of settings fixed at
        open, so it may run in another thread while any other call runs on this
        driver (``vdisk convert`` computes it in its reading thread while its writer
        thread writes).  ``write`` uses the result only for the very ``data`` object
        and ``offset`` it was made for, and otherwise does the work itself.  Default:
        None (nothing to prepare); ``write`` then needs no ``prepared`` argument."""
        return None

    def start_writeback(self) -> None:
        """A hint from a bulk writer that will flush at its end: have the host storage
        start writing back what was written so far (``HostStorage.start_writeback``).
        Default: the driver's ``host``, if it has one."""
        host = getattr(self, "host", None)
        if host is not None:
            host.start_writeback()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros.  Fallback: write zero bytes."""
        step = 1 << 20
        pos = offset
        while pos < offset + length:
            n = min(step, offset + length - pos)
            self.write(pos, bytes(n))
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Drop the range's data; afterwards it reads as zeros.  Fallback: write_zeroes."""
        self.write_zeroes(offset, length)

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable in the host storage.  Only after this
        returns may a caller consider its writes safe from a power cut."""

    @abc.abstractmethod
    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe this layer only: contiguous, non-overlapping extents covering
        exactly ``[offset, offset+length)`` in order.  UNALLOCATED means "ask the
        backing image"."""

    def resize(self, new_size: int) -> None:
        """Change the guest size.  Growing reads as zeros (never backing data) in the
        new range; shrinking drops data past the end."""
        raise NotSupported(f"{self.format_name}: resize is not supported")

    # ------------------------------------------------------------------ metadata
    def info(self) -> dict[str, Any]:
        """Format-specific facts for ``vdisk info`` (cluster size, compression, ...)."""
        return {}

    def disk_usage(self) -> int:
        """Host bytes the image occupies."""
        return self.host.allocated_bytes()

    def check(self, *, repair: str | None = None) -> CheckResult:
        """Verify all metadata (and every data checksum, where the format has them).
        ``repair`` is None, "leaks" or "all"."""
        raise NotSupported(f"{self.format_name}: check is not supported")

    def set_backing(self, ref: BackingRef | None) -> None:
        """Rewrite the backing reference only (``rebase -u``)."""
        raise NotSupported(f"{self.format_name} images cannot have a backing file")

    def make_empty(self) -> None:
        """Drop all data of this layer so that reads fall through to the backing image."""
        raise NotSupported(f"{self.format_name}: cannot empty the image")

    def space_usage(self) -> dict | None:
        """Bytes referred to and unique per root (live state, snapshots), if the format knows."""
        return None

    # snapshots (optional)
    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        """Snapshots oldest first; ``space`` fills in ``unique_bytes`` where the format can;
        ``hidden`` includes snapshots deleted by the user but kept for their holders."""
        return []

    def has_snapshots(self) -> bool:
        """True if any snapshot exists, also one deleted but kept for linked clones."""
        return bool(self.snapshot_list())

    def snapshot_hold(self, name: str, delta: int, holder: Holder | None = None) -> SnapshotInfo:
        """Record that ``holder`` (a linked clone) depends on snapshot ``name`` (delta +1),
        or that it no longer does (-1; only ``holder.image_id`` counts, and None drops a
        hold recorded without an identity).  Dropping a hold that is not there raises
        ``SnapshotNotFound``.  A snapshot with holds survives ``snapshot_delete`` hidden
        until its last hold goes.  Formats that cannot record holds raise
        ``NotSupported``: nothing may then depend on their snapshots."""
        raise NotSupported(f"{self.format_name} images cannot record that a clone depends on their snapshots")

    def snapshot_create(self, name: str) -> SnapshotInfo:
        raise NotSupported(f"{self.format_name} images have no internal snapshots")

    def snapshot_delete(self, name: str) -> None:
        raise NotSupported(f"{self.format_name} images have no internal snapshots")

    def snapshot_revert(self, name: str) -> None:
        raise NotSupported(f"{self.format_name} images have no internal snapshots")

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        """Rename a snapshot (``new_name`` validated as for ``snapshot_create``)."""
        raise NotSupported(f"{self.format_name} images cannot rename snapshots")
