"""How large a new image would be (``vdisk measure``, as ``qemu-img measure``).

Two numbers for converting a source (or a new image of a given size) into a target
format:

``required``
    the size the target's file needs (its apparent size, which is at least the
    bytes it occupies) for the source's data: what ``vdisk convert`` writes into a
    fresh file never exceeds it.
``fully_allocated``
    the file size once every guest cluster holds data.

The source's data is what its chain's block status reports as data (zeros and
unallocated ranges are not copied by convert), counted in whole clusters of the
target, as qemu-img does.

Per target format:

raw
    the guest size, both numbers (a raw file is as long as its disk; with
    ``size`` it is rounded up to 512 bytes), as qemu-img measure says.
qcow2
    qemu's own arithmetic (``qcow2_measure`` in QEMU's ``block/qcow2.c``): the
    metadata of a fully allocated image -- one header cluster, L2 tables for every
    guest cluster, the L1 table, and refcount blocks and table for all of it --
    plus the source's data clusters.  The numbers equal ``qemu-img measure -O
    qcow2``'s for the same source and options.
vdk
    from the layout in ``formats/vdk.md``: the reserved header clusters, one
    cluster per data cluster (a compressed one takes less), one L2 table per
    ``cs * cs/32`` bytes of guest that hold data, the L1 table run, and refcount
    blocks and table counting every cluster including themselves (a fixed point).
    The commit protocol never overwrites live metadata, so the file also keeps the
    space of earlier generations' tables: the generation ``create`` wrote (its L1
    run, refcount block and table) and, per automatic commit of a long convert
    (one every ``AUTO_COMMIT_DIRTY_L2`` dirty L2 tables), one more L1 run,
    refcount table and refcount blocks and one rewritten L2 table.  Freed clusters
    are hole-punched, so the bytes allocated stay below the file size.

A ``backing_file`` option makes ``required`` assume every cluster is written (the
new image's backing file may share nothing with the source), as qemu-img does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..block import Image
from ..drivers.base import Status, on_off
from ..errors import UsageError

MEASURE_FORMATS = ("raw", "qcow2", "vdk")

# qcow2 (QEMU's block/qcow2.h)
_QCOW2_MAX_L1_SIZE = 32 << 20
_QCOW2_REFTABLE_ENTRY = 8


@dataclass(frozen=True)
class Measurement:
    required: int
    fully_allocated: int

    def as_json(self) -> dict[str, int]:
        """``measure --output json``: qemu-img's keys."""
        return {"required": self.required, "fully-allocated": self.fully_allocated}


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def _align(n: int, a: int) -> int:
    return _ceil_div(n, a) * a


def data_usage(img: Image, cluster_size: int, span: int | None = None) -> tuple[int, int]:
    """(clusters, spans): how many ``cluster_size`` clusters of the guest hold data
    in ``img``'s chain, and how many ``span``-byte ranges contain such a cluster
    (0 without ``span``)."""
    clusters = spans = 0
    last_c = last_s = -1
    if img.size == 0:
        return 0, 0
    for ext in img.block_status(0, img.size, chain=True):
        if ext.status != Status.DATA or ext.length <= 0:
            continue
        first = max(ext.offset // cluster_size, last_c + 1)
        end = (ext.offset + ext.length - 1) // cluster_size
        if first > end:
            continue
        clusters += end - first + 1
        last_c = end
        if span:
            per = span // cluster_size
            s0, s1 = max(first // per, last_s + 1), end // per
            if s0 <= s1:
                spans += s1 - s0 + 1
                last_s = s1
    return clusters, spans


def _no_options(fmt: str, options: dict[str, Any]) -> None:
    if options:
        raise UsageError(f"unknown {fmt} option(s): {', '.join(sorted(options))}")


# ------------------------------------------------------------------------------ qcow2
def qcow2_refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table that count ``clusters`` clusters and
    themselves: the fixed point QEMU's ``qcow2_refcount_metadata_size`` finds."""
    blocks_per_table_cluster = cluster_size // _QCOW2_REFTABLE_ENTRY
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = _ceil_div(clusters + table + blocks, refcounts_per_block)
        table = _ceil_div(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def qcow2_prealloc_size(total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """File size of a fully allocated qcow2 image (QEMU's ``qcow2_calc_prealloc_size``)."""
    l2e = 16 if extended_l2 else 8
    aligned = _align(total_size, cluster_size)
    meta = cluster_size  # the header
    nl2e = _align(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e  # L2 tables
    nl1e = _align(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8  # the L1 table
    meta += qcow2_refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _measure_qcow2(size: int, data_clusters: int | None, cluster_size: int | None, backing: bool,
                   options: dict[str, Any]) -> Measurement:
    cs = cluster_size or 65536
    if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
        raise UsageError(f"qcow2: cluster size must be a power of two between 512 and 2M (got {cs})")
    opts = dict(options)
    compat = str(opts.pop("compat", "1.1"))
    if compat not in ("1.1", "v3", "3", "0.10", "v2", "2"):
        raise UsageError(f"qcow2: invalid compat {compat!r} (1.1 or 0.10)")
    order = 4
    if "refcount_bits" in opts:
        try:
            bits = int(opts.pop("refcount_bits"))
        except ValueError:
            raise UsageError("qcow2: refcount_bits must be a number") from None
        if bits <= 0 or bits & (bits - 1) or bits > 64:
            raise UsageError("qcow2: refcount_bits must be a power of two between 1 and 64")
        if compat in ("0.10", "v2", "2") and bits != 16:
            raise UsageError("qcow2: compat=0.10 images have 16-bit refcounts")
        order = bits.bit_length() - 1
    extended_l2 = on_off("extended_l2", opts.pop("extended_l2", "off"))
    if extended_l2 and cs < 16384:
        raise UsageError("qcow2: extended_l2 needs a cluster size of at least 16K")
    prealloc = str(opts.pop("preallocation", "off")).lower()
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UsageError(f"qcow2: invalid preallocation {prealloc!r} (off, metadata, falloc or full)")
    ctype = opts.pop("compression_type", None)
    if ctype is not None and ctype not in ("zlib", "zstd"):
        raise UsageError(f"qcow2: compression_type must be zlib or zstd (got {ctype!r})")
    on_off("lazy_refcounts", opts.pop("lazy_refcounts", "off"))
    _no_options("qcow2", opts)

    virtual = _align(size, cs)
    l2e = 16 if extended_l2 else 8
    if _ceil_div(virtual // cs, cs // l2e) * 8 > _QCOW2_MAX_L1_SIZE:
        raise UsageError("qcow2: the image size is too large (try a larger cluster size)")
    if data_clusters is None:
        required = 0
    elif backing:
        required = virtual
    else:
        required = data_clusters * cs
    if prealloc in ("falloc", "full"):
        required = virtual
    fully = qcow2_prealloc_size(virtual, cs, order, extended_l2)
    return Measurement(required=fully - virtual + required, fully_allocated=fully)


# ------------------------------------------------------------------------------ vdk
def vdk_file_size(size: int, cluster_size: int, data_clusters: int, l2_tables: int) -> int:
    """Upper bound of the file size of a vdk image that ``vdisk convert`` (or
    ``create`` then writes) makes with ``data_clusters`` clusters of data in
    ``l2_tables`` L2 tables: see the module docstring."""
    from ..codec import vdk as C
    from ..drivers.vdk import AUTO_COMMIT_DIRTY_L2

    cs = cluster_size
    cbits = cs.bit_length() - 1
    reserved = _ceil_div(C.HEADER_AREA, cs)
    l1_entries = C.l1_entries_for(size, cbits)
    l1 = _ceil_div(l1_entries * C.L1_ENTRY_SIZE, cs)
    per_block = cs // C.RC_ENTRY_SIZE
    # the generation create wrote: its L1 run, refcount blocks and table
    b0 = _ceil_div(reserved + l1 + 2, per_block)
    t0 = _ceil_div(b0 * C.RT_ENTRY_SIZE, cs)
    fixed = reserved + data_clusters + l2_tables + l1 + (l1 + b0 + t0)
    commits = l2_tables // AUTO_COMMIT_DIRTY_L2  # automatic commits while writing
    blocks = table = 0
    while True:
        total = fixed + table + blocks + commits * (l1 + table + blocks + 1)
        nb = _ceil_div(total, per_block)
        nt = _ceil_div(nb * C.RT_ENTRY_SIZE, cs)
        if (nb, nt) == (blocks, table):
            return total * cs
        blocks, table = nb, nt


def _measure_vdk(size: int, img: Image | None, cluster_size: int | None, compression: str | None,
                 backing: bool, options: dict[str, Any]) -> Measurement:
    from ..codec import vdk as C
    from ..drivers.vdk import MAX_L1_BYTES

    cs = cluster_size or (1 << C.DEFAULT_CLUSTER_BITS)
    if cs & (cs - 1) or not 1 << C.MIN_CLUSTER_BITS <= cs <= 1 << C.MAX_CLUSTER_BITS:
        raise UsageError(f"cluster size {cs} must be a power of two from 4 KiB to 2 MiB")
    if compression not in (None, "none", "off", "zstd"):
        raise UsageError(f"unknown compression {compression!r} for vdk (none or zstd)")
    opts = dict(options)
    if "compression_level" in opts:
        try:
            level = int(opts.pop("compression_level"))
        except ValueError:
            raise UsageError("compression_level must be a number") from None
        if not -7 <= level <= 19:
            raise UsageError("compression_level must be from -7 to 19")
    _no_options("vdk", opts)
    cbits = cs.bit_length() - 1
    if size > C.MAX_VIRTUAL_SIZE or C.l1_entries_for(size, cbits) * C.L1_ENTRY_SIZE > MAX_L1_BYTES:
        raise UsageError(f"virtual size {size} is too large for {cs}-byte clusters")
    span = cs * C.l2_entries(cbits)
    all_clusters, all_tables = _ceil_div(size, cs), C.l1_entries_for(size, cbits)
    fully = vdk_file_size(size, cs, all_clusters, all_tables)
    if img is None:
        data, tables = 0, 0
    elif backing:
        data, tables = all_clusters, all_tables
    else:
        data, tables = data_usage(img, cs, span)
    return Measurement(required=vdk_file_size(size, cs, data, tables), fully_allocated=fully)


# ------------------------------------------------------------------------------ entry
def measure(
    target_format: str,
    *,
    source: Image | None = None,
    size: int | None = None,
    cluster_size: int | None = None,
    compression: str | None = None,
    backing_file: str | None = None,
    options: dict[str, Any] | None = None,
) -> Measurement:
    """Measure converting ``source`` (an opened image, its whole chain counts) or a
    new image of ``size`` bytes into ``target_format`` with these create options
    (those of ``vdisk create -o``)."""
    if (source is None) == (size is None):
        raise UsageError("measure needs either a source image or a size, not both")
    if size is not None and size < 0:
        raise UsageError("size must not be negative")
    vsize = source.size if source is not None else size
    opts = dict(options or {})
    backing = backing_file is not None
    if target_format == "raw":
        if backing:
            raise UsageError("raw images cannot have a backing file")
        if compression not in (None, "none", "off"):
            raise UsageError("raw images cannot be compressed")
        if cluster_size is not None:
            raise UsageError("raw images have no cluster size")
        opts.pop("preallocation", None)
        _no_options("raw", opts)
        n = vsize if source is not None else _align(vsize, 512)
        return Measurement(required=n, fully_allocated=n)
    if target_format == "qcow2":
        if compression not in (None, "none", "off", "zlib", "zstd"):
            raise UsageError(f"qcow2: compression must be zlib or zstd (got {compression!r})")
        data = None
        if source is not None:
            cs = cluster_size or 65536
            if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
                raise UsageError(f"qcow2: cluster size must be a power of two between 512 and 2M (got {cs})")
            data = data_usage(source, cs)[0] if not backing else 0
        return _measure_qcow2(vsize, data, cluster_size, backing, opts)
    if target_format == "vdk":
        return _measure_vdk(vsize, source, cluster_size, compression, backing, opts)
    raise UsageError(f"cannot measure for format {target_format!r} (one of {', '.join(MEASURE_FORMATS)})")
