"""Creating an image (QEMU: ``qcow2_co_create``).

Concern: turning ``CreateOptions`` (cluster size, compression, backing file, and
the ``-o`` options qemu-img takes: ``refcount_bits``, ``compression_type``,
``compat``, ``lazy_refcounts``/``preallocation`` off) into a new version 3 image.

May assume: ``host`` is empty; ``open``, ``resize`` and ``flush`` of the driver.

Guarantees: every option is validated (``UsageError``) before anything is
written; the size is rounded up to whole 512-byte sectors, as qemu-img does.
The image written is a header cluster (header, extensions -- backing format,
vdisk's options, the feature-name table if it fits -- and the backing file name),
a refcount table and one refcount block; then it is opened and resized to its
size (the L1 table is allocated there).  Complete and flushed when ``create``
returns.

State owned: none.
"""

from __future__ import annotations

from ...codec import qcow2 as C
from ...errors import UsageError
from ...host import HostStorage
from ..base import CreateOptions
from .limits import MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, ceil_div


class CreateMixin:
    """The ``create`` class method."""

    @classmethod
    def create(cls, host: HostStorage, size: int, opts: CreateOptions) -> None:
        cs = opts.cluster_size or cls.default_cluster_size
        if cs & (cs - 1) or not (1 << MIN_CLUSTER_BITS) <= cs <= (1 << MAX_CLUSTER_BITS):
            raise UsageError(f"qcow2: cluster size must be a power of two between 512 and 2M (got {cs})")
        cbits = cs.bit_length() - 1
        comp = opts.compression
        if comp in (None, "none", "off", "false", "no", "0"):
            comp = None
        elif comp in ("on", "true", "yes", "1", "default"):
            comp = ""  # compressed writes, of compression_type (zlib, as qemu-img, if not given)
        elif comp not in ("zlib", "zstd"):
            raise UsageError(f"qcow2: compression must be zlib or zstd (got {comp!r})")
        extra = dict(opts.extra)
        order = 4
        if "refcount_bits" in extra:
            try:
                bits = int(extra.pop("refcount_bits"))
            except ValueError:
                raise UsageError("qcow2: refcount_bits must be a number") from None
            if bits <= 0 or bits & (bits - 1) or bits > 64:
                raise UsageError("qcow2: refcount_bits must be a power of two between 1 and 64")
            order = bits.bit_length() - 1
        ctype_opt = extra.pop("compression_type", None)
        if ctype_opt is not None:
            if ctype_opt not in ("zlib", "zstd"):
                raise UsageError(f"qcow2: compression_type must be zlib or zstd (got {ctype_opt!r})")
            if comp and comp != ctype_opt:
                raise UsageError("qcow2: compression and compression_type disagree")
        ctype_name = comp or ctype_opt or "zlib"
        if comp == "":
            comp = ctype_name
        compat = str(extra.pop("compat", "1.1"))
        if compat not in ("1.1", "v3", "3"):
            raise UsageError(f"qcow2: only compat=1.1 (version 3) images can be created (got {compat!r})")
        for key, off_values in (("lazy_refcounts", ("off", "false", "0")), ("preallocation", ("off",))):
            if key in extra and str(extra.pop(key)).lower() not in off_values:
                raise UsageError(f"qcow2: {key} is not supported")
        if extra:
            raise UsageError(f"qcow2: unknown option(s): {', '.join(sorted(extra))}")
        if size < 0 or size > (1 << 62):
            raise UsageError(f"qcow2: size {size} out of range")
        size = ceil_div(size, 512) * 512  # as qemu-img: whole sectors (513 -> 1024)

        incompat = 0
        ctype = C.COMPRESSION_ZSTD if ctype_name == "zstd" else C.COMPRESSION_ZLIB
        if ctype != C.COMPRESSION_ZLIB:
            incompat |= C.INCOMPAT_COMPRESSION
        hdr = C.Header(
            version=3,
            backing_file_offset=0,
            backing_file_size=0,
            cluster_bits=cbits,
            size=0,
            crypt_method=0,
            l1_size=0,
            l1_table_offset=0,
            refcount_table_offset=cs,
            refcount_table_clusters=1,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=incompat,
            refcount_order=order,
            header_length=C.V3_HEADER_LENGTH,
            compression_type=ctype,
        )
        exts = []
        if opts.backing is not None:
            exts.append(C.backing_format_extension(opts.backing.format))
        if comp is not None:
            exts.append(C.encode_vdisk_options({"compress": comp}))
        ft = C.HeaderExtension(C.EXT_FEATURE_TABLE, C.encode_feature_table(C.default_feature_table()))
        name = opts.backing.filename.encode() if opts.backing is not None else b""
        if len(name) > MAX_BACKING_NAME:
            raise UsageError(f"qcow2: backing file name longer than {MAX_BACKING_NAME} bytes")
        if opts.backing is not None and opts.backing.snapshot:
            raise UsageError("qcow2: a backing file cannot name a snapshot")
        head = C.encode_header_area(hdr, exts + [ft], name, cs)
        if head is None:
            head = C.encode_header_area(hdr, exts, name, cs)
        if head is None:
            raise UsageError("qcow2: header, extensions and backing file name do not fit in one cluster")
        reftable = C.encode_u64_table([2 * cs]) + bytes(cs - 8)
        rb = C.new_refblock(cs, order)
        for i in range(3):
            rb[i] = 1
        host.pwrite(0, head.ljust(cs, b"\0") + reftable + C.encode_refblock(rb, order))
        host.flush()
        drv = cls.open(host, read_only=False)
        try:
            if size:
                drv.resize(size)
            drv.flush()
        finally:
            drv._release(close_host=False)
