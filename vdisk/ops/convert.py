"""Copy an image's guest-visible content into a new image (``vdisk convert``).

The copy itself (sparseness, read-ahead, write-behind) is :mod:`vdisk.ops.copier`'s;
this module makes the destination, fresh so that what is not written reads as zeros,
and puts it into place.

The destination is built aside and put into place only once complete: a failed or
interrupted convert leaves an existing destination untouched (like ``qemu-img
convert``, an existing destination is replaced -- unless another process has it
open).

An interrupted convert leaves nothing behind, even when killed with SIGKILL (which
no handler sees).  The image is built in an *unnamed* file: ``open(dir,
O_TMPFILE)`` makes an inode in the destination's directory that has no name, so
the kernel frees it when the process dies, however it dies.  Only when the copy is
complete does it get a name: ``linkat`` of ``/proc/self/fd/N`` straight to the
destination when there is none yet (atomic: it fails rather than replace a file
that appeared meanwhile), or else to ``.NAME.vdisk-convert-PID`` followed by a
``rename`` over the old destination (a window of two system calls).

Where O_TMPFILE is not available (some file systems, or no ``/proc``), the image is
built under that same ``.NAME.vdisk-convert-PID`` name and unlinked on every exit
Python sees (errors, Ctrl-C, SIGTERM through the CLI's handler).  A process killed
outright leaves it behind, so every convert first removes the stale partials of
its destination directory: those whose PID is no longer running and that no
process holds open for writing (vdisk's image lock; the PID alone could be another
PID namespace's).  A partial of a running convert is never touched.
"""

from __future__ import annotations

import os
from .. import block
from ..block import Image
from ..errors import ImageNotFound, UsageError, VdiskError
from . import tmpfile
from .compare import ProgressFn
from .context import LOCAL, OpenContext
from .copier import WRITE_BEHIND, ConvertStats, copy_content


#: a copy that will be flushed (``convert -t writeback``, ``none``, ...) has its
#: destination start writing back every this many bytes written (``sync_file_range``,
#: no waiting): the device then writes while the copy goes on, instead of all at the
#: final flush.  1 GiB raw -> vdk onto the disk, in-process: 0.68 s -> 0.41-0.47 s,
#: qemu-img's default plus sync 0.55-0.57 s (BENCHMARKS "checksums where the data is
#: read, write-back as it goes").  Not for ``-t unsafe`` (the default, as
#: qemu-img's): the OS then writes back when it likes, and the copy itself does not
#: share the CPUs with the kernel's write-back.
WRITEBACK_EVERY = 16 << 20

def convert(
    src: Image,
    dst_path: str,
    *,
    format: str | None = None,
    cluster_size: int | None = None,
    compression: str | None = None,
    options: dict | None = None,
    progress: ProgressFn | None = None,
    chunk_size: int | None = None,
    durable: bool = False,
    existing: bool = False,
    target_is_zero: bool = False,
    sparse: bool = True,
    granularity: int | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    rate_limit: int | None = None,
    read_ahead: int = 2,
    write_behind: int = WRITE_BEHIND,
    unsafe_backing: bool = False,
    ctx: OpenContext = LOCAL,
) -> ConvertStats:
    """Create ``dst_path`` in ``format`` (default: raw, or pool for ``POOL/IMAGE``)
    with ``src``'s guest size and content.

    An existing regular file at ``dst_path`` is replaced atomically once the copy is
    complete; until then it is left as it was.  ``durable`` flushes the destination
    (and its directory) before returning; without it, as ``qemu-img convert``'s
    default ``cache=unsafe``, the data may still sit in the host page cache (a format
    driver that must flush to close consistently, as vdk does, still does).

    qemu-img's options: ``existing`` (-n) writes into the image already at
    ``dst_path`` (at least as large as ``src``) instead of creating one, zeroing what
    the source reads as zeros unless ``target_is_zero``; ``sparse`` False (-S 0)
    allocates every byte, ``granularity`` (-S N) sets the size of zero runs left out;
    ``backing_file`` (-B; relative to ``dst_path``'s directory, as in qemu-img) makes
    the destination an overlay on it holding only what differs; ``rate_limit`` (-r)
    caps bytes per second.

    An image in a pool (``POOL/IMAGE``, format pool) is made in place under its name
    and removed again if the copy fails; an existing one is never replaced.  The
    destination and ``-B``'s backing image are opened, created and removed through
    ``ctx``."""
    from ..drivers import get_driver

    dst_path = os.fspath(dst_path)
    if format is None:
        format = "pool" if block.default_format(dst_path) == "pool" else "raw"
    # A pool image as the destination is written from the caller's thread: the source
    # may be an image of the same pool, opened in this process.
    copy_kw = {"progress": progress, "chunk_size": chunk_size, "granularity": granularity, "sparse": sparse,
               "rate_limit": rate_limit, "read_ahead": read_ahead,
               "write_behind": 0 if format == "pool" else write_behind,
               "writeback_every": WRITEBACK_EVERY if durable else 0}
    if existing:
        if backing_file is not None:
            raise UsageError("-n writes into an existing image: it keeps its own backing file (no -B)")
        if not block.exists(dst_path):
            raise ImageNotFound(f"{dst_path}: no such file (-n writes into an existing image)")
        if block.same_image(dst_path, src.filename):
            raise UsageError(f"{dst_path}: source and destination are the same file")
        with ctx.open(dst_path, format=format, read_only=False, backing=False,
                        cache="writeback" if durable else "unsafe") as dst:
            stats = copy_content(src, dst, target_is_zero=target_is_zero, **copy_kw)
            dst.flush()
        return stats
    block.check_create_format(dst_path, format)
    if getattr(get_driver(format), "opens_by_name", False):
        return _convert_named(src, dst_path, format, cluster_size, compression, options, copy_kw, backing_file,
                              backing_format, unsafe_backing, ctx)
    target = os.path.realpath(dst_path) if os.path.islink(dst_path) else dst_path
    if os.path.exists(target):
        if not os.path.isfile(target):
            raise UsageError(f"{dst_path}: exists and is not a regular file")
        if block.same_image(target, src.filename):
            raise UsageError(f"{dst_path}: source and destination are the same file")
        tmpfile.refuse_if_in_use(target, ctx)
    directory, base_name = os.path.split(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise ImageNotFound(f"{dst_path}: directory {directory} does not exist")
    ref, base = None, None
    if backing_file is not None:
        ref, base = _open_output_backing(target, backing_file, backing_format, format, unsafe_backing, ctx)
    try:
        tmpfile.remove_stale_partials(directory, ctx)
        partial = os.path.join(directory, f".{base_name}{tmpfile.PARTIAL_MARK}{os.getpid()}")
        if os.path.lexists(partial):
            os.unlink(partial)
        unnamed = tmpfile.open_unnamed(directory)
        tmp = f"/proc/self/fd/{unnamed}" if unnamed is not None else partial
        try:
            if unnamed is None and ref is None:
                ctx.create(tmp, src.size, format=format, cluster_size=cluster_size, compression=compression,
                             options=options)
            else:
                if unnamed is None:
                    open(tmp, "xb").close()
                tmpfile.create_in(tmp, src.size, format, cluster_size, compression, options, backing=ref)
            dst = ctx.open(tmp, format=format, read_only=False, backing=False,
                             cache="writeback" if durable else "unsafe")
            try:
                if base is not None:
                    dst.attach_backing_image(base)  # so zeros over the base's data stay explicit
                stats = copy_content(src, dst, base=base, **copy_kw)
                if durable:
                    dst.flush()
            finally:
                dst.close()
            if unnamed is None:
                os.replace(partial, target)
            else:
                tmpfile.link_into_place(tmp, partial, target)
        except BaseException as exc:
            if unnamed is None:
                try:
                    os.unlink(partial)
                except OSError:
                    pass
            if isinstance(exc, VdiskError) and tmp in exc.message:
                # Name the file the user asked for, not our temporary one.
                exc.message = exc.message.replace(tmp, dst_path)
                exc.args = (exc.message,) + exc.args[1:]
            raise
        finally:
            if unnamed is not None:
                os.close(unnamed)  # the last reference: an unnamed inode is freed here
    finally:
        if base is not None:
            base.close()
    if durable:
        tmpfile.fsync_dir(directory)
    return stats


def _convert_named(src: Image, dst_path: str, fmt: str, cluster_size, compression, options, copy_kw: dict,
                   backing_file: str | None, backing_format: str | None, unsafe_backing: bool,
                   ctx: OpenContext) -> ConvertStats:
    """convert into an image a driver opens by name (a pool's): made under its name,
    removed again if the copy does not complete."""
    if block.exists(dst_path):
        raise UsageError(f"{dst_path}: exists already; an image in a pool is never replaced: remove it first "
                         "(vdisk rm), or write into it with -n")
    ref, base = None, None
    create_kw: dict = {}
    if backing_file is not None:
        ref, base = _open_output_backing(dst_path, backing_file, backing_format, fmt, unsafe_backing, ctx)
        create_kw = {"backing_file": ref.filename, "backing_format": ref.format, "unsafe_backing": unsafe_backing}
    try:
        ctx.create(dst_path, src.size, format=fmt, cluster_size=cluster_size, compression=compression,
                     options=options, **create_kw)
        try:
            dst = ctx.open(dst_path, format=fmt, read_only=False, backing=False)
            try:
                if base is not None:
                    dst.attach_backing_image(base)  # so zeros over the base's data stay explicit
                stats = copy_content(src, dst, base=base, **copy_kw)
                dst.flush()
            finally:
                dst.close()
        except BaseException:
            try:
                ctx.remove(dst_path)
            except (OSError, VdiskError):
                pass
            raise
    finally:
        if base is not None:
            base.close()
    return stats


def _open_output_backing(target: str, backing_file: str, backing_format: str | None, fmt: str,
                         unsafe_backing: bool, ctx: OpenContext):
    """``-B``: the backing reference the new image will store, and the backing image
    opened (as the new image will see it) to compare against."""
    from ..drivers import get_driver
    from ..drivers.base import BackingRef

    if not get_driver(fmt).supports_backing:
        raise UsageError(f"{fmt} images cannot have a backing file (-B)")
    directory = os.path.dirname(os.path.abspath(target))
    bpath = os.path.join(directory, backing_file)
    if not block.exists(bpath):
        raise ImageNotFound(f"backing file {bpath}: no such file (a relative -B is relative to the new image)")
    if backing_format is None:
        backing_format = block.detect_format(bpath)
        if backing_format == "raw":
            raise UsageError(f"backing file {bpath}: give its format with -F (raw is never probed)")
    block.check_backing_allowed(target, bpath, unsafe_backing=unsafe_backing)
    base = ctx.open(bpath, read_only=True, format=backing_format, unsafe_backing=unsafe_backing,
                      allow_backing_dirs=[directory])
    ref = BackingRef(os.path.relpath(os.path.abspath(bpath), directory), backing_format)
    return ref, base
