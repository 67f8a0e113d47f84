"""The NBD protocol, server side, as pure encode/decode: no sockets here.

The protocol is ``doc/proto.md`` of the NetworkBlockDevice/nbd repository.  This
module holds its numbers, the layouts of its messages, the checks of a
transmission request (:func:`check_request`) and the encoders of replies; the
handshake's state machine is :mod:`vdisk.export.nbd.handshake`.  The server (:mod:`vdisk.export.nbd.server`) does the I/O and the work.

Conventions of the protocol
---------------------------
* Every integer is big-endian (network order); every struct here uses ``>``.
* Strings (export names, descriptions, metadata context names, error messages)
  are UTF-8, not NUL-terminated, at most 4096 bytes (:data:`MAX_STRING`).
* A server greets, the client answers with its flags, then sends options; each
  option but ``NBD_OPT_EXPORT_NAME`` gets one or more replies, the last of them
  final (an ACK or an error).  ``NBD_OPT_GO`` (or ``EXPORT_NAME``) ends the
  handshake; the transmission phase is requests and their replies.

What this server speaks
-----------------------
Fixed newstyle negotiation only (the oldstyle one is gone from the reference
server too), without TLS (``NBD_OPT_STARTTLS`` gets ``NBD_REP_ERR_POLICY``: the
server listens on a unix socket or on the address it is given).  Options:
EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT and
SET_META_CONTEXT with one context, ``base:allocation``; any other option gets
``NBD_REP_ERR_UNSUP``.  Commands: READ, WRITE, DISC, FLUSH, TRIM, CACHE (a no-op),
WRITE_ZEROES, BLOCK_STATUS; command flags FUA, NO_HOLE, DF, REQ_ONE.  No extended
headers, no FAST_ZERO, no resize.

Limits (each stated to the client or enforced with a named error)
----------------------------------------------------------------
* option data: at most :data:`MAX_OPTION_LENGTH` bytes, at most
  :data:`MAX_OPTIONS` options per handshake, at most :data:`MAX_QUERIES` metadata
  queries per option (more: ``NBD_REP_ERR_TOO_BIG``); names and queries at most
  :data:`MAX_STRING` bytes.  A longer option is a hard disconnect (its data would
  have to be read to go on, and the protocol lets a server refuse that).
* block sizes, sent in ``NBD_INFO_BLOCK_SIZE``: minimum 1, preferred 4096,
  maximum payload :data:`MAX_PAYLOAD` (32 MiB) -- the protocol's defaults, so
  clients that never ask (``NBD_OPT_EXPORT_NAME``) are served the same.  A READ
  longer than that gets an error; a WRITE longer than that is a hard disconnect
  (its payload is not read).
* a block status reply describes at most :data:`STATUS_SPAN` bytes and
  :data:`MAX_DESCRIPTORS` extents (the protocol lets a server answer less than
  was asked; clients ask again from where the reply ends).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import VdiskError

# ---------------------------------------------------------------- magic numbers
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71  # only named to tell a client that uses it what is wrong

# ---------------------------------------------------------------- handshake flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
#: what this server sends
HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# ---------------------------------------------------------------- transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# ---------------------------------------------------------------- options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# ---------------------------------------------------------------- option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_ERR = 1 << 31
REP_ERR_UNSUP = _ERR + 1
REP_ERR_POLICY = _ERR + 2
REP_ERR_INVALID = _ERR + 3
REP_ERR_PLATFORM = _ERR + 4
REP_ERR_TLS_REQD = _ERR + 5
REP_ERR_UNKNOWN = _ERR + 6
REP_ERR_SHUTDOWN = _ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _ERR + 8
REP_ERR_TOO_BIG = _ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---------------------------------------------------------------- commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush",
                 CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write-zeroes",
                 CMD_BLOCK_STATUS: "block-status"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# ---------------------------------------------------------------- structured replies
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

#: base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
#: the id this server gives base:allocation (any nonzero transient number would do)
BASE_ALLOCATION_ID = 1

# ---------------------------------------------------------------- errors
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# ---------------------------------------------------------------- limits
MAX_STRING = 4096
MAX_OPTION_LENGTH = 64 * 1024
MAX_OPTIONS = 256
MAX_QUERIES = 64
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
STATUS_SPAN = 1 << 30
MAX_DESCRIPTORS = 1 << 16

# ---------------------------------------------------------------- layouts
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zero bytes)
INFO_EXPORT_DATA = struct.Struct(">HQH")
INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
READ_CHUNK = struct.Struct(">IHHQIQ")  # CHUNK + the offset of an OFFSET_DATA chunk
DESCRIPTOR = struct.Struct(">II")

REQUEST_SIZE = REQUEST.size  # 28


class ProtocolError(VdiskError):
    """The peer broke the protocol in a way that ends the connection (a hard disconnect)."""


# ---------------------------------------------------------------- the export
@dataclass(frozen=True)
class Export:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""

    def transmission_flags(self, structured: bool) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
        if self.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if structured:
            flags |= FLAG_SEND_DF  # every read is answered with one chunk anyway
        return flags


@dataclass
class Negotiated:
    """The outcome of a handshake: what the transmission phase may use."""

    export: Export
    flags: int
    structured: bool = False
    #: metadata context id -> name, for the export in use
    contexts: dict[int, str] = field(default_factory=dict)
    #: the client asked for NBD_INFO_BLOCK_SIZE in its NBD_OPT_GO
    block_size_requested: bool = False


# ---------------------------------------------------------------- transmission
def check_request(neg: Negotiated, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str] | None:
    """Whether a request may be served: None, or (NBD error, message) for the error
    reply.  Raises :class:`ProtocolError` for a request that ends the connection (a
    WRITE whose payload is longer than :data:`MAX_PAYLOAD`: it is not read)."""
    export = neg.export
    end = offset + length
    name = COMMAND_NAMES.get(cmd)
    if cmd == CMD_WRITE and length > MAX_PAYLOAD:
        raise ProtocolError(f"write of {length} bytes, more than the maximum payload of {MAX_PAYLOAD}")
    if name is None:
        return EINVAL, f"unknown command {cmd}"
    allowed = CMD_FLAG_FUA if neg.flags & FLAG_SEND_FUA else 0
    if cmd == CMD_READ and neg.structured:
        allowed |= CMD_FLAG_DF
    elif cmd == CMD_WRITE_ZEROES:
        allowed |= CMD_FLAG_NO_HOLE
    elif cmd == CMD_BLOCK_STATUS:
        allowed |= CMD_FLAG_REQ_ONE
    if flags & ~allowed:
        return EINVAL, f"{name}: command flags {flags & ~allowed:#x} are not valid here"
    if cmd == CMD_FLUSH or cmd == CMD_DISC:
        if offset or length:
            return EINVAL, f"{name}: offset and length must be zero"
        return None
    if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM) and export.read_only:
        return EPERM, f"{name}: the export is read-only"
    if end > export.size:
        err = ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return err, f"{name}: {offset}+{length} ends past the end of the export ({export.size} bytes)"
    if cmd == CMD_READ and length > MAX_PAYLOAD:
        return (EOVERFLOW if neg.structured else EINVAL), \
            f"read of {length} bytes, more than the maximum payload of {MAX_PAYLOAD}"
    if cmd == CMD_BLOCK_STATUS:
        if not neg.contexts:
            return EINVAL, "block status without a metadata context (NBD_OPT_SET_META_CONTEXT)"
        if length == 0:
            return EINVAL, "block status of zero bytes"
    return None


def error_text(message: str) -> bytes:
    raw = message.encode("utf-8")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")
    return raw


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, type_: int, payload: bytes = b"", flags: int = REPLY_FLAG_DONE) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, len(payload)) + payload


def read_chunk_header(cookie: int, offset: int, length: int) -> bytes:
    """The header of the one OFFSET_DATA chunk (flagged DONE) that answers a read of
    ``length`` > 0 bytes at ``offset``; the data follows it."""
    return READ_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, REPLY_TYPE_NONE)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    text = error_text(message)
    return chunk(cookie, REPLY_TYPE_ERROR, struct.pack(">IH", error, len(text)) + text)


def error_reply(neg: Negotiated, cookie: int, error: int, message: str = "") -> bytes:
    """The error reply to a request: a structured error chunk if negotiated (with the
    message), else a simple reply."""
    if neg.structured:
        return error_chunk(cookie, error, message)
    return simple_reply(cookie, error)


def ok_reply(neg: Negotiated, cookie: int) -> bytes:
    """A successful reply without data (everything but a read and block status)."""
    return simple_reply(cookie)


def descriptors(extents, length: int, req_one: bool) -> list[tuple[int, int]]:
    """``(length, flags)`` extents, in order from the request's offset, made into what
    a block status chunk may carry: zero lengths dropped, neighbours with the same
    flags merged, at most ``length`` bytes (the query is at most :data:`STATUS_SPAN`),
    at most :data:`MAX_DESCRIPTORS` of them, or exactly one with ``req_one``."""
    out: list[list[int]] = []
    total = 0
    for n, flags in extents:
        if n <= 0:
            continue
        n = min(n, length - total)
        if n <= 0:
            break
        if out and out[-1][1] == flags:
            out[-1][0] += n
        else:
            if len(out) >= MAX_DESCRIPTORS:
                break
            out.append([n, flags])
        total += n
        if total >= length:
            break
    if req_one:
        out = out[:1]
    return [(n, f) for n, f in out]


def block_status_chunk(cookie: int, context_id: int, descs: list[tuple[int, int]], done: bool = True) -> bytes:
    if not descs:
        raise ValueError("a block status chunk needs at least one descriptor")
    payload = struct.pack(">I", context_id) + b"".join(DESCRIPTOR.pack(n, f) for n, f in descs)
    return chunk(cookie, REPLY_TYPE_BLOCK_STATUS, payload, REPLY_FLAG_DONE if done else 0)


# ---------------------------------------------------------------- the client's side (tests, tools)
def client_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def info_request_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_context_data(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server bytes into option replies: [(option, reply type, data)]."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = OPTION_REPLY.unpack_from(data, pos)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        pos += OPTION_REPLY.size
        out.append((option, rtype, data[pos : pos + length]))
        pos += length
    return out
