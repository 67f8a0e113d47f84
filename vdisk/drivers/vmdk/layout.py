"""Opening a VMDK: which file holds what (one sparse file, or a text descriptor
naming extent files).

Contract: :func:`open_layout` returns the parsed descriptor (None for a sparse
file without an embedded one) and the extents in guest order, every extent
opened and validated (:func:`.sparse.load` for SPARSE ones).  Extent files
are opened only through ``siblings`` (:class:`vdisk.drivers.base.SiblingFiles`),
which applies the backing-file policy of :mod:`vdisk.block`: relative to the
descriptor, inside the allowed directories unless ``unsafe_backing``, each file
once and never the descriptor itself, with the image's lock mode.  On any
error every file opened so far is closed again.

Also here: rewriting the descriptor text (the CID after a first write, the
extent size after a resize) without disturbing the rest of it.
"""

from __future__ import annotations

import re

from ...codec import vmdk as V
from ...errors import CorruptImage, UnsupportedFeature, UsageError, VdiskError
from ...host import HostStorage
from . import sparse
from .flat import FlatExtent, ZeroExtent

SECTOR = V.SECTOR


def _desc(raw: bytes, name: str) -> V.Descriptor:
    try:
        return V.decode_descriptor(raw)
    except (CorruptImage, UnsupportedFeature) as exc:
        raise type(exc)(f"{name}: {exc}") from None


def open_layout(host: HostStorage, name: str, *, read_only: bool, siblings) -> tuple[V.Descriptor | None, list, bytes]:
    """(descriptor, extents, descriptor text as stored)."""
    head = host.pread(0, V.HEADER_SIZE)
    if head[:4] == V.MAGIC:
        ext = sparse.load(host, name, read_only=read_only)
        h = ext.header
        desc, raw = None, b""
        if h.descriptor_offset:
            raw = host.pread(h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR)
            nul = raw.find(b"\0")
            raw = raw[:nul] if nul >= 0 else raw
            desc = _desc(raw, name)
            if len(desc.extents) != 1 or desc.extents[0].type != "SPARSE":
                raise CorruptImage(f"{name}: the descriptor inside a sparse file must name one SPARSE extent")
        return desc, [ext], raw
    if head[:4] == V.COWD_MAGIC:
        raise UnsupportedFeature(f"{name}: is an ESX COWD (vmfsSparse) disk, a VMDK variant vdisk does not support")
    if not V.looks_like_descriptor(head):
        raise CorruptImage(f"{name}: not a VMDK image (no sparse header, no '# Disk DescriptorFile')")
    size = host.size()
    if size > V.MAX_DESCRIPTOR_BYTES:
        raise CorruptImage(f"{name}: descriptor file of {size} bytes is larger than vdisk's limit of "
                           f"{V.MAX_DESCRIPTOR_BYTES}")
    raw = host.pread(0, size)
    desc = _desc(raw, name)
    if desc.sectors > V.MAX_CAPACITY_SECTORS:
        raise UnsupportedFeature(f"{name}: the extents add up to more than vdisk's size limit")
    if siblings is None:
        raise UsageError(f"{name}: a VMDK descriptor names extent files; open it with vdisk.open")
    extents: list = []
    try:
        for line in desc.extents:
            if line.access == "NOACCESS":
                raise UnsupportedFeature(f"{name}: extent {line.filename!r} is NOACCESS")
            ro = read_only or line.access == "RDONLY"
            if line.type == "ZERO":
                extents.append(ZeroExtent(line.sectors))
                continue
            h = siblings.open(line.filename, read_only=ro)
            try:
                if line.type in ("FLAT", "VMFS"):
                    extents.append(FlatExtent(h, line.filename, line.sectors, line.offset, ro))
                else:
                    extents.append(sparse.load(h, line.filename, read_only=ro, sectors=line.sectors))
            except BaseException:
                h.close()
                raise
    except BaseException:
        for e in extents:
            e.close()
        raise
    return desc, extents, raw.split(b"\0", 1)[0]


_CID_RE = re.compile(rb"^([ \t]*CID[ \t]*=[ \t]*)([0-9a-fA-F]+)", re.MULTILINE)
_PCID_RE = re.compile(rb"^([ \t]*parentCID[ \t]*=[ \t]*)([0-9a-fA-F]+)", re.MULTILINE)
_HINT_RE = re.compile(rb'^[ \t]*parentFileNameHint[ \t]*=.*\n?', re.MULTILINE)
_EXTENT_RE = re.compile(rb"^([ \t]*(?:RW|RDONLY)[ \t]+)(\d+)([ \t]+SPARSE\b)", re.MULTILINE)


def with_cid(raw: bytes, cid: int) -> bytes:
    new, n = _CID_RE.subn(lambda m: m.group(1) + b"%08x" % cid, raw, count=1)
    if not n:
        raise CorruptImage("descriptor has no CID line to update")
    return new


def with_parent(raw: bytes, parent_cid: int, hint: str | None) -> bytes:
    raw = _HINT_RE.sub(b"", raw)
    new, n = _PCID_RE.subn(lambda m: m.group(1) + b"%08x" % parent_cid, raw, count=1)
    if not n:
        raise CorruptImage("descriptor has no parentCID line to update")
    if hint is not None:
        if '"' in hint or "\n" in hint:
            raise UsageError("a VMDK parent file name may not hold quotes or newlines")
        m = _PCID_RE.search(new)
        eol = new.index(b"\n", m.end()) + 1 if b"\n" in new[m.end():] else len(new)
        new = new[:eol] + b'parentFileNameHint="' + hint.encode() + b'"\n' + new[eol:]
    return new


def with_parent_cid(raw: bytes, parent_cid: int) -> bytes:
    new, n = _PCID_RE.subn(lambda m: m.group(1) + b"%08x" % parent_cid, raw, count=1)
    if not n:
        raise CorruptImage("descriptor has no parentCID line to update")
    return new


def with_extent_sectors(raw: bytes, sectors: int) -> bytes:
    new, n = _EXTENT_RE.subn(lambda m: m.group(1) + str(sectors).encode() + m.group(3), raw, count=1)
    if not n:
        raise CorruptImage("descriptor has no SPARSE extent line to update")
    return new


def store_descriptor(host: HostStorage, raw: bytes, embedded: tuple[int, int] | None) -> None:
    """Write the descriptor text back: into the sparse file's descriptor area
    (``embedded`` = (offset, size) in sectors), or as the whole descriptor file."""
    if embedded is None:
        host.pwrite(0, raw)
        host.truncate(len(raw))
        return
    off, size = embedded
    if len(raw) >= size * SECTOR:
        raise VdiskError(f"{host.name}: the descriptor no longer fits its {size * SECTOR}-byte area")
    host.pwrite(off * SECTOR, raw + bytes(size * SECTOR - len(raw)))


def read_cid(path: str) -> int:
    """The CID of the VMDK at ``path`` (for a new overlay's parentCID)."""
    from ...host import HostFile

    host = HostFile(path, read_only=True, lock=None)
    try:
        head = host.pread(0, V.HEADER_SIZE)
        if head[:4] == V.MAGIC:
            h = V.decode_header(head)
            if not h.descriptor_offset or h.descriptor_size * SECTOR > V.MAX_DESCRIPTOR_BYTES:
                return V.NO_PARENT_CID
            raw = host.pread(h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR)
        elif V.looks_like_descriptor(head) and host.size() <= V.MAX_DESCRIPTOR_BYTES:
            raw = host.pread(0, host.size())
        else:
            raise UsageError(f"{path}: a VMDK overlay's parent must be a VMDK image")
        return _desc(raw, path).cid
    finally:
        host.close()
