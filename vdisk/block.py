"""The generic block layer: an opened chain of images.

``Image`` wraps one driver and the ``Image`` below it (its backing image).  It checks
every request (bounds, read-only), hands the driver a reader for the backing image
that returns zeros past the backing image's end, resolves block status through the
chain, and owns opening and closing the whole chain.

Backing references are resolved relative to the overlay's directory.  A backing
file must lie under an allowed directory (by default, the directory of the image
that was opened, plus ``VDISK_BACKING_DIRS``, colon-separated), so that an image
from elsewhere cannot make vdisk read arbitrary host files; ``unsafe_backing=True``
lifts this.  Chains are at most ``MAX_CHAIN_DEPTH`` images deep, and loops are refused.
"""

from __future__ import annotations

import builtins
import os
import posixpath
from collections.abc import Iterator

from . import budget
from .drivers import foreign_format, get_driver, probe
from .drivers.base import (
    BackingRef,
    BlockDriver,
    CheckResult,
    CreateOptions,
    Extent,
    SnapshotInfo,
    Status,
)
from .errors import (
    BackingError,
    ImageNotFound,
    OutOfBounds,
    ReadOnlyImage,
    UnsupportedFeature,
    UsageError,
    VdiskError,
)
from .host import HostFile
from .paths import (  # noqa: F401 - the block layer's API since before they had a module
    _allowed_dirs,
    _is_under,
    _is_url,
    _pool_image,
    _realpath,
    _SiblingFiles,
    abspath,
    check_backing_allowed,
    check_create_format,
    default_format,
    exists,
    host_stat,
    image_key,
    images_in,
    normpath,
    remove,
    resolve_backing_path,
    same_image,
    split_image_spec,
)

MAX_CHAIN_DEPTH = 64
PROBE_BYTES = 8192


def detect_format(path: str) -> str:
    """The format of an existing image file, by its magic.  A file without a known
    magic is raw -- only when the user opens it by name, never as a backing file.  A
    format vdisk recognises but cannot open (VHD, VHDX, VDI, VMDK, QED, LUKS, ...) is
    refused by name, never taken for raw.  ``POOL/IMAGE`` names an image in a pool."""
    if _pool_image(path):
        return "pool"
    try:
        with builtins.open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
            tail = b""
            try:
                size = os.fstat(f.fileno()).st_size
                if size >= 1024:
                    f.seek(size - 512)
                    tail = f.read(512)
            except OSError:
                pass
    except FileNotFoundError:
        raise ImageNotFound(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VdiskError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise VdiskError(f"{path}: permission denied") from None
    fmt = probe(head, tail)
    if fmt:
        return fmt
    other = foreign_format(head, tail)
    if other == "damaged VHD":  # a footer at the end that no fixed disk has (probe() said no)
        raise UnsupportedFeature(f"{path}: ends in a VHD footer that is not a valid fixed disk's (bad checksum "
                                 "or disk type); give -f vpc to open it as a VHD anyway, or -f raw only if it "
                                 "really is a raw disk")
    if other:
        raise UnsupportedFeature(f"{path}: is a {other} image, a format vdisk does not support; "
                                 "give -f raw only if it really is a raw disk")
    return "raw"


class _BackingView:
    """The image below, as a driver sees it: reads past its end are zeros."""

    def __init__(self, image: Image):
        self._image = image

    @property
    def size(self) -> int:
        return self._image.size

    def read(self, offset: int, length: int) -> bytes:
        size = self._image.size
        if offset >= size:
            return bytes(length)
        if offset + length <= size:
            return self._image.read(offset, length)
        head = self._image.read(offset, size - offset)
        return head + bytes(offset + length - size)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        size = self._image.size
        out: list[Extent] = []
        if offset < size:
            out = self._image.block_status(offset, min(length, size - offset))
        if offset + length > size:
            start = max(offset, size)
            out.append(Extent(start, offset + length - start, Status.ZERO, depth=-1))
        return out


class Image:
    """An opened image and, through ``backing``, the rest of its chain."""

    def __init__(self, driver: BlockDriver, filename: str, backing: Image | None, snapshot: str | None = None):
        self.driver = driver
        self.filename = filename
        self.backing = backing
        self.snapshot = snapshot
        self._closed = False
        #: the format was guessed (raw, no magic): refuse writes that would make block 0
        #: look like another format, as qemu does, so a guest cannot change what it is
        self.guard_probe = False
        driver.attach_backing(_BackingView(backing) if backing is not None else None)

    def attach_backing_image(self, backing: Image) -> None:
        """Give an image opened with ``backing=False`` the backing image its reference
        names, opened by the caller: for a file whose name cannot locate it (convert
        -B builds its output in an unnamed file).  The caller closes ``backing``."""
        if self.backing is not None:
            raise UsageError(f"{self.filename}: has its backing image already")
        self.driver.attach_backing(_BackingView(backing))

    # ---------------------------------------------------------------- properties
    @property
    def format(self) -> str:
        return self.driver.format_name

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def cluster_size(self) -> int:
        return self.driver.cluster_size

    @property
    def read_only(self) -> bool:
        return self.driver.read_only

    def chain(self) -> Iterator[Image]:
        """This image, then each backing image down to the base."""
        node: Image | None = self
        while node is not None:
            yield node
            node = node.backing

    # ---------------------------------------------------------------- checks
    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise VdiskError(f"{self.filename}: image is closed")
        if offset < 0 or length < 0:
            raise OutOfBounds(f"{self.filename}: negative offset or length ({offset}, {length})")
        if offset + length > self.driver.size:
            raise OutOfBounds(
                f"{self.filename}: request {offset}+{length} ends past the end of the disk ({self.driver.size} bytes)"
            )

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.driver.read_only:
            raise ReadOnlyImage(f"{self.filename}: image is open read-only")

    # ---------------------------------------------------------------- data path
    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        return self.driver.read(offset, length)

    def write(self, offset: int, data: bytes, prepared: object | None = None) -> None:
        """Write ``data`` at ``offset``; ``prepared``: what ``prepare_write(offset,
        data)`` returned for these very bytes (None: nothing prepared)."""
        self._check_write(offset, len(data))
        if self.guard_probe and offset < PROBE_BYTES and data:
            self._check_probe(offset, data)
        if self.guard_probe and offset + len(data) > self.size - 512 and data and self.size >= 1024:
            self._check_probe_tail(offset, data)
        if data:
            if prepared is not None and type(data) is bytes:
                self.driver.write(offset, data, prepared=prepared)
            else:
                self.driver.write(offset, bytes(data) if not isinstance(data, bytes) else data)

    def start_writeback(self) -> None:
        """Hint that what was written so far will be flushed: start writing it back now
        (:meth:`BlockDriver.start_writeback`; no promise, ``flush`` is the promise)."""
        if not self.driver.read_only:
            self.driver.start_writeback()

    def prepare_write(self, offset: int, data: bytes) -> object | None:
        """The driver's pure work for a later ``write(offset, data, prepared=...)`` of
        exactly these bytes, which may be done in another thread than the write
        (:meth:`BlockDriver.prepare_write`); None if the driver has none."""
        if type(data) is not bytes or not data:
            return None
        return self.driver.prepare_write(offset, data)

    def _check_probe(self, offset: int, data: bytes) -> None:
        n = min(PROBE_BYTES, self.size)
        head = bytearray(self.driver.read(0, n))
        end = min(n, offset + len(data))
        head[offset:end] = data[: end - offset]
        other = probe(bytes(head)) or foreign_format(bytes(head))
        if other:
            raise ReadOnlyImage(f"{self.filename}: refusing to write a {other} header into an image whose "
                                "format was guessed as raw; open it with -f raw to allow it")

    def _check_probe_tail(self, offset: int, data: bytes) -> None:
        """As ``_check_probe``, for the last 512 bytes (a fixed VHD's footer)."""
        start = self.size - 512
        tail = bytearray(self.driver.read(start, 512))
        lo = max(offset, start)
        tail[lo - start:offset + len(data) - start] = data[lo - offset:]
        other = probe(b"", bytes(tail))
        if other:
            raise ReadOnlyImage(f"{self.filename}: refusing to write a {other} footer into an image whose "
                                "format was guessed as raw; open it with -f raw to allow it")

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if length:
            self.driver.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if length:
            self.driver.discard(offset, length)

    def flush(self) -> None:
        if not self.driver.read_only:
            self.driver.flush()

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        if self.driver.read_only:
            raise ReadOnlyImage(f"{self.filename}: image is open read-only")
        if new_size < 0:
            raise UsageError("size must not be negative")
        if new_size < self.size and not shrink:
            raise UsageError(
                f"{self.filename}: shrinking from {self.size} to {new_size} bytes drops data; pass --shrink to do it"
            )
        if new_size != self.size:
            self.driver.resize(new_size)

    def block_status(self, offset: int = 0, length: int | None = None, *, chain: bool = True) -> list[Extent]:
        """Extents of ``[offset, offset+length)``.  With ``chain``, UNALLOCATED ranges are
        resolved through the backing images (``depth`` says which image holds them) and
        what no image holds is reported as ZERO with depth -1... or UNALLOCATED at the
        base when there is no backing image at all."""
        if length is None:
            length = self.size - offset
        self._check(offset, length)
        if length == 0:
            return []
        own = self.driver.block_status(offset, length)
        if not chain or self.backing is None:
            return own
        out: list[Extent] = []
        view = _BackingView(self.backing)
        for ext in own:
            if ext.status != Status.UNALLOCATED:
                out.append(ext)
                continue
            for sub in view.block_status(ext.offset, ext.length):
                depth = sub.depth + 1 if sub.depth >= 0 else -1
                out.append(Extent(sub.offset, sub.length, sub.status, sub.host_offset, sub.compressed, depth))
        return _merge(out)

    # ---------------------------------------------------------------- metadata
    def info(self) -> dict:
        d = self.driver
        out = {
            "filename": self.filename,
            "format": d.format_name,
            "virtual_size": d.size,
            "disk_size": d.disk_usage(),
            "cluster_size": d.cluster_size,
            "read_only": d.read_only,
        }
        if d.backing_ref is not None:
            out["backing_filename"] = d.backing_ref.filename
            out["backing_format"] = d.backing_ref.format
            if d.backing_ref.snapshot:
                out["backing_snapshot"] = d.backing_ref.snapshot
            if self.backing is not None:
                out["full_backing_filename"] = self.backing.filename
                viewing = getattr(self.backing.driver, "viewing", None)  # vdk: the snapshot record
                if d.backing_ref.snapshot and viewing is not None:
                    out["backing_snapshot_name"] = viewing.name
        out.update(d.info())
        return out

    def check(self, *, repair: str | None = None) -> CheckResult:
        if repair and self.driver.read_only:
            raise ReadOnlyImage(f"{self.filename}: image is open read-only; cannot repair")
        return self.driver.check(repair=repair)

    def snapshot_list(self, *, space: bool = False, hidden: bool = False) -> list[SnapshotInfo]:
        return self.driver.snapshot_list(space=space, hidden=hidden)

    def snapshot_hold(self, name: str, delta: int, holder=None) -> SnapshotInfo:
        """See :meth:`BlockDriver.snapshot_hold`."""
        self._check_write(0, 0)
        return self.driver.snapshot_hold(name, delta, holder)

    def make_empty(self) -> None:
        self._check_write(0, 0)
        self.driver.make_empty()

    def set_backing(self, ref: BackingRef | None) -> None:
        """Rewrite the backing reference only; the image must be reopened to follow it."""
        self._check_write(0, 0)
        self.driver.set_backing(ref)

    def space_usage(self) -> dict | None:
        return self.driver.space_usage()

    def snapshot_create(self, name: str) -> SnapshotInfo:
        self._check_write(0, 0)
        return self.driver.snapshot_create(name)

    def snapshot_delete(self, name: str) -> None:
        self._check_write(0, 0)
        self.driver.snapshot_delete(name)

    def snapshot_revert(self, name: str) -> None:
        self._check_write(0, 0)
        self.driver.snapshot_revert(name)

    def snapshot_rename(self, name: str, new_name: str) -> SnapshotInfo:
        self._check_write(0, 0)
        return self.driver.snapshot_rename(name, new_name)

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Flush and close this image and its whole backing chain."""
        if self._closed:
            return
        self._closed = True
        try:
            self.driver.close()
        finally:
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Image {self.filename!r} {self.format} {self.size} bytes>"


def _merge(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if e.length == 0:
            continue
        if out:
            p = out[-1]
            if (
                p.status == e.status
                and p.depth == e.depth
                and p.compressed == e.compressed
                and p.end == e.offset
                and (
                    (p.host_offset is None and e.host_offset is None)
                    or (p.host_offset is not None and e.host_offset is not None and p.host_offset + p.length == e.host_offset)
                )
            ):
                out[-1] = Extent(p.offset, p.length + e.length, p.status, p.host_offset, p.compressed, p.depth)
                continue
        out.append(e)
    return out


def open(
    path: str,
    *,
    read_only: bool = False,
    format: str | None = None,
    snapshot: str | None = None,
    backing: bool = True,
    allow_backing_dirs: list[str] | None = None,
    unsafe_backing: bool = False,
    cache: str = "writeback",
    force_share: bool = False,
    writable_depth: int | None = None,
) -> Image:
    """Open an image and its backing chain.

    Every backing reference is followed only into an allowed directory: the directory
    of ``path`` (and below it), those in ``VDISK_BACKING_DIRS`` (colon-separated) and
    ``allow_backing_dirs``; ``unsafe_backing=True`` lifts this.  This is the one place
    the policy is enforced: operations open chains through here and never lift it
    themselves.

    ``writable_depth`` opens the backing image that many levels down read-write (1: the
    direct backing image), for operations that write into a backing image (commit).

    The tables the drivers of the whole chain hold count against one metadata memory
    budget (:mod:`vdisk.budget`); past it the open fails with ``ResourceLimit``.

    ``force_share`` (read-only opens only, like ``qemu-img -U``) takes no lock on the
    top image, so it opens even while another process writes it; what it reads may
    then be stale or, for data the writer frees meanwhile, fail its checksum.

    ``cache="unsafe"`` makes flushes of the top image no-ops (no fdatasync): for
    scratch output that is discarded if the process dies, as ``qemu-img convert`` does.

    ``format`` None probes the file's magic (raw if none).  ``snapshot`` opens that
    internal snapshot, read-only.  ``backing=False`` opens the top image alone (its
    unallocated ranges then read as zeros).
    """
    path = os.fspath(path)
    if snapshot is not None:
        read_only = True
    fmt = format or detect_format(path)
    guessed = format is None and fmt == "raw"
    allowed = None if unsafe_backing else _allowed_dirs(path, allow_backing_dirs)
    if force_share and not read_only:
        raise UsageError("force_share is for read-only opens")
    if cache not in ("writeback", "unsafe"):
        raise UsageError(f"unknown cache mode {cache!r} (writeback or unsafe)")
    if writable_depth is not None and (writable_depth < 1 or not backing):
        raise UsageError("writable_depth names a backing image: 1 or more, with the backing chain open")
    seen: set[tuple] = set()
    with budget.scope():  # one metadata memory budget for the whole chain
        img = _open_node(path, fmt, read_only, snapshot, backing, allowed, seen, 0, cache == "writeback",
                         lock="shared" if force_share else "auto", writable_depth=writable_depth)
    img.guard_probe = guessed
    return img


def _open_node(path, fmt, read_only, snapshot, with_backing, allowed, seen, depth, sync=True, lock="auto",
               writable_depth=None) -> Image:
    if depth >= MAX_CHAIN_DEPTH:
        raise BackingError(f"{path}: backing chain is deeper than {MAX_CHAIN_DEPTH} images")
    cls = get_driver(fmt)
    if getattr(cls, "opens_by_name", False):
        key = cls.identity(path)
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageNotFound(f"{path}: no such file") from None
        except OSError as exc:
            raise VdiskError(f"{path}: {exc.strerror}") from None
        key = (st.st_dev, st.st_ino)
    if key in seen:
        raise BackingError(f"{path}: backing chain loops back to this file")
    seen.add(key)
    if lock == "auto" and snapshot is not None:
        lock = "snapshot"
    if getattr(cls, "opens_by_name", False):
        driver = cls.open_named(path, read_only=read_only, snapshot=snapshot, force_share=lock == "shared")
    else:
        host = HostFile(path, read_only=read_only, lock=lock, sync=sync)
        extra = {}
        if getattr(cls, "opens_siblings", False):  # a multi-file format (VMDK): its extent files
            extra["siblings"] = _SiblingFiles(path, allowed, seen, lock, sync)
        try:
            driver = cls.open(host, read_only=read_only, snapshot=snapshot, **extra)
        except BaseException:
            host.close()
            raise
    below: Image | None = None
    try:
        ref = driver.backing_ref
        if ref is not None and with_backing:
            bpath = resolve_backing_path(path, ref)
            real = _realpath(bpath)
            if allowed is not None and not _is_under(real, allowed):
                raise BackingError(
                    f"{path}: backing file {ref.filename!r} lies outside the allowed directories "
                    f"({', '.join(allowed)}); allow it with VDISK_BACKING_DIRS",
                    option_hint=("unsafe_backing", "or --unsafe-backing"))
            if not exists(bpath):
                raise BackingError(f"{path}: backing file {bpath} does not exist")
            rw = writable_depth == depth + 1
            if rw and ref.snapshot:
                raise UsageError(f"{path}: its backing image is snapshot {ref.snapshot} of {ref.filename}, "
                                 "which is immutable")
            below = _open_node(bpath, ref.format, not rw, ref.snapshot, True, allowed, seen, depth + 1,
                               writable_depth=writable_depth)
            driver.verify_backing(below.driver)
        elif writable_depth is not None and writable_depth > depth:
            raise UsageError(f"{path}: the backing chain ends here, above the image to write into")
        return Image(driver, path, below, snapshot)
    except BaseException:
        driver.close()
        if below is not None:
            below.close()
        raise


def create(
    path: str,
    size: int | None = None,
    *,
    format: str | None = None,
    cluster_size: int | None = None,
    compression: str | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    backing_snapshot: str | None = None,
    options: dict | None = None,
    unsafe_backing: bool = False,
    allow_backing_dirs: list[str] | None = None,
    image_id: str | None = None,
) -> None:
    """Create a new image file.

    ``backing_file``, when relative, is relative to the new image's directory (as in
    qemu-img), and is stored relative to it.  Without ``size``, an overlay takes its
    backing image's size.  An overlay whose backing file :func:`open` would refuse to
    follow (outside the allowed directories) is refused here, with the reason, unless
    ``unsafe_backing``: vdisk never makes an image it then refuses to open.
    ``image_id`` sets the new image's identity where the format records one."""
    path = os.fspath(path)
    if format is None:  # vdk, or pool for POOL/IMAGE
        format = default_format(path)
    cls = get_driver(format)
    check_create_format(path, format)
    ref = None
    if backing_file is not None:
        if not cls.supports_backing:
            raise UsageError(f"{format} images cannot have a backing file")
        bpath = resolve_backing_path(path, BackingRef(os.fspath(backing_file), "", None))
        if not exists(bpath):
            hint = "" if os.path.isabs(backing_file) else " (a relative backing file is relative to the new image)"
            raise ImageNotFound(f"backing file {bpath}: no such file{hint}")
        if backing_format is None:
            backing_format = detect_format(bpath)
            if backing_format == "raw":
                raise UsageError(f"backing file {bpath}: give its format with -F (raw is never probed)")
        get_driver(backing_format)
        check_backing_allowed(path, bpath, unsafe_backing=unsafe_backing, allow_backing_dirs=allow_backing_dirs)
        if _is_url(path) or _is_url(bpath):  # in one bucket: relative to the image; else the URL
            same = _is_url(path) and _is_url(bpath) and path[5:].split("/")[0] == bpath[5:].split("/")[0]
            rel = posixpath.relpath(bpath[5:], posixpath.dirname(path[5:])) if same else bpath
        else:
            rel = os.path.relpath(os.path.abspath(bpath), os.path.dirname(os.path.abspath(path)))
        ref = BackingRef(rel, backing_format, backing_snapshot)
        with open(bpath, read_only=True, format=backing_format, snapshot=backing_snapshot,
                  unsafe_backing=unsafe_backing, allow_backing_dirs=_allowed_dirs(path, allow_backing_dirs)) as b:
            if size is None:
                size = b.size
            for node in b.chain():
                if same_image(node.filename, path):
                    raise BackingError(f"{path}: cannot be its own backing file")
    if size is None:
        raise UsageError("a size is needed (or a backing file to take it from)")
    if size < 0:
        raise UsageError("size must not be negative")
    opts = CreateOptions(cluster_size=cluster_size, compression=compression, backing=ref, extra=dict(options or {}),
                         image_id=image_id)
    if getattr(cls, "opens_by_name", False):
        cls.create_named(path, size, opts)
        return
    host = HostFile(path, create=True)
    try:
        cls.create(host, size, opts)
    except BaseException:
        host.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    host.close()
