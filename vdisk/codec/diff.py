"""Diff streams (``formats/diff.md``): bytes <-> frozen dataclasses, no I/O.

A stream is a 64-byte header, then records of a 40-byte head (DATA records followed by
their payload), the last one an END record.  Every structure carries an xxh3-64 so a
reader can refuse a damaged one before acting on it; every length is bounded here,
before a caller allocates anything for it.  Errors are :class:`DiffStreamError` with
a message the caller prefixes with the file's name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from ..errors import VdiskError

MAGIC = b"VDKDIFF\n"
VERSION = 1
HEADER_SIZE = 64
RECORD_SIZE = 40
#: header flag: the stream has no base (a full stream: it sets every byte of the image)
FLAG_FULL = 1
KNOWN_FLAGS = FLAG_FULL

DATA, ZERO, END = 1, 2, 3
KINDS = {DATA: "DATA", ZERO: "ZERO", END: "END"}
#: implementation limit: the longest DATA payload a reader accepts (writers use 1 MiB)
MAX_DATA = 16 << 20
#: largest virtual size (offsets are u64, kept below 2^63)
MAX_SIZE = 1 << 62

_HEADER = struct.Struct("<8sIIQQ24sQ")  # magic version flags size chunk reserved checksum
_RECORD = struct.Struct("<IIQQQQ")  # kind reserved offset length base_hash checksum
assert _HEADER.size == HEADER_SIZE and _RECORD.size == RECORD_SIZE


class DiffStreamError(VdiskError):
    """A diff stream that does not follow formats/diff.md (truncated, damaged, foreign)."""

    exit_code = 2


def xxh64(data: bytes, seed: int = 0) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


@dataclass(frozen=True, slots=True)
class Header:
    size: int
    full: bool
    chunk: int = 1 << 20
    version: int = VERSION

    @property
    def checksum(self) -> int:
        return struct.unpack_from("<Q", encode_header(self), 56)[0]


@dataclass(frozen=True, slots=True)
class Record:
    """One record.  For END, ``offset`` is the number of records before it, ``length``
    the DATA payload bytes, ``base_hash`` the digest of all record checksums."""

    kind: int
    offset: int
    length: int
    base_hash: int = 0
    checksum: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


def encode_header(h: Header) -> bytes:
    flags = FLAG_FULL if h.full else 0
    body = _HEADER.pack(MAGIC, h.version, flags, h.size, h.chunk, bytes(24), 0)[:56]
    return body + struct.pack("<Q", xxh64(body))


def decode_header(buf: bytes) -> Header:
    if len(buf) < HEADER_SIZE:
        if MAGIC.startswith(buf[:8]) and buf:
            raise DiffStreamError(f"truncated header ({len(buf)} of {HEADER_SIZE} bytes)")
        raise DiffStreamError("not a vdisk diff stream (no header)")
    magic, version, flags, size, chunk, _res, checksum = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise DiffStreamError("not a vdisk diff stream (bad magic)")
    if xxh64(bytes(buf[:56])) != checksum:
        raise DiffStreamError("header checksum mismatch")
    if version != VERSION:
        raise DiffStreamError(f"diff stream version {version} is not supported (only {VERSION})")
    if flags & ~KNOWN_FLAGS:
        raise DiffStreamError(f"unknown header flags {flags & ~KNOWN_FLAGS:#x}")
    if size > MAX_SIZE:
        raise DiffStreamError(f"virtual size {size} is out of range")
    if not 0 < chunk <= MAX_DATA:
        raise DiffStreamError(f"chunk size {chunk} is out of range")
    return Header(size=size, full=bool(flags & FLAG_FULL), chunk=chunk, version=version)


def record_checksum(index: int, head32: bytes, payload: bytes = b"") -> int:
    """xxh3-64, seeded with the record's index, over the head's first 32 bytes and the payload."""
    h = xxhash.xxh3_64(seed=index)
    h.update(head32)
    h.update(payload)
    return h.intdigest()


def encode_record(index: int, kind: int, offset: int, length: int, base_hash: int = 0,
                  payload: bytes = b"") -> tuple[bytes, int]:
    """The bytes of record ``index`` (head + payload) and its checksum."""
    if kind == DATA and len(payload) != length:
        raise ValueError("DATA payload length differs from the record's length")
    head32 = _RECORD.pack(kind, 0, offset, length, base_hash, 0)[:32]
    cs = record_checksum(index, head32, payload)
    return head32 + struct.pack("<Q", cs) + payload, cs


def decode_record_head(index: int, buf: bytes, header: Header, pos: int) -> Record:
    """Parse and bound-check a record head; ``pos`` is where the previous record ended
    (records are in increasing offset order and never overlap).  The checksum is
    verified by :func:`verify_record` once the payload is read."""
    kind, reserved, offset, length, base_hash, checksum = _RECORD.unpack_from(buf)
    where = f"record {index}"
    if kind not in KINDS:
        raise DiffStreamError(f"{where}: unknown record type {kind}")
    if reserved != 0:
        raise DiffStreamError(f"{where}: reserved field is not zero")
    rec = Record(kind, offset, length, base_hash, checksum)
    if kind == END:
        return rec
    where = f"record {index} (offset {offset})"
    if length == 0 or offset > header.size or length > header.size - offset:
        raise DiffStreamError(f"{where}: range of {length} bytes lies outside the {header.size}-byte disk")
    if offset < pos:
        raise DiffStreamError(f"{where}: overlaps or precedes the previous record (which ended at {pos})")
    if kind == DATA and length > MAX_DATA:
        raise DiffStreamError(f"{where}: {length}-byte payload exceeds the limit of {MAX_DATA}")
    return rec


def verify_record(index: int, buf: bytes, rec: Record, payload: bytes = b"") -> None:
    if record_checksum(index, bytes(buf[:32]), payload) != rec.checksum:
        where = f"record {index}" + ("" if rec.kind == END else f" (offset {rec.offset})")
        raise DiffStreamError(f"{where}: checksum mismatch")


def checksums_digest(checksums: list[int] | bytes) -> int:
    """The END record's digest: xxh3-64 over every record checksum as u64 LE, in order."""
    if isinstance(checksums, (bytes, bytearray)):
        return xxh64(bytes(checksums))
    return xxh64(b"".join(struct.pack("<Q", c) for c in checksums))


def pack_checksum(cs: int) -> bytes:
    return struct.pack("<Q", cs)
