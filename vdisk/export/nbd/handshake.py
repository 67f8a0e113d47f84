"""The server side of NBD's fixed newstyle handshake, as pure bytes in, bytes out
(no sockets), in the way h11 does HTTP: :class:`Handshake` takes what the client
sent, answers it, and ends in the transmission phase with a
:class:`~vdisk.export.nbd.proto.Negotiated` or closed.  The numbers, limits and
message layouts it speaks are in :mod:`vdisk.export.nbd.proto`.
"""

from __future__ import annotations

import struct

from .proto import (
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CLIENT_FLAGS,
    CLIENT_FLAGS_KNOWN,
    EXPORT_NAME_REPLY,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    GREETING,
    HANDSHAKE_FLAGS,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_DATA,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_EXPORT_DATA,
    INFO_NAME,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    MAX_QUERIES,
    MAX_STRING,
    MIN_BLOCK,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    Export,
    Negotiated,
    ProtocolError,
    error_text,
)


def _valid_string(raw: bytes) -> str | None:
    if len(raw) > MAX_STRING or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


class Handshake:
    """The server side of a fixed newstyle handshake, without I/O.

    ``greeting()`` is what the server sends first.  Then the server reads exactly
    ``bytes_needed()`` bytes (never more: what follows the handshake belongs to the
    transmission phase), hands them to ``receive()`` and sends what it returns,
    until ``state`` is ``"transmission"`` (``negotiated`` holds the result) or
    ``"closed"`` (the client aborted; ``close_reason`` says why).  A violation that
    needs a hard disconnect raises :class:`ProtocolError` with a one-line message.

    ``exports`` are the exports served; the empty name selects the first (the
    default export).
    """

    def __init__(self, exports: list[Export]):
        if not exports:
            raise ValueError("a handshake needs at least one export")
        self.exports = list(exports)
        self.state = "greeting"
        self.negotiated: Negotiated | None = None
        self.close_reason: str | None = None
        self.options_seen = 0
        self._buf = bytearray()
        self._option = 0
        self._length = 0
        self._fixed = False
        self._no_zeroes = False
        self._structured = False
        #: (export, {id: name}) selected by the last NBD_OPT_SET_META_CONTEXT
        self._meta: tuple[Export, dict[int, str]] | None = None

    # ------------------------------------------------------------ driving
    def greeting(self) -> bytes:
        if self.state != "greeting":
            raise RuntimeError("greeting sent already")
        self.state = "client-flags"
        return GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)

    def bytes_needed(self) -> int:
        """How many more bytes ``receive`` needs before it can go on (0 once done)."""
        want = {"client-flags": CLIENT_FLAGS.size, "option-header": OPTION_HEADER.size,
                "option-data": self._length}.get(self.state, 0)
        return max(0, want - len(self._buf))

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the client (at most ``bytes_needed()`` of them); return the
        bytes to send back (maybe none)."""
        if self.state in ("greeting", "transmission", "closed"):
            raise RuntimeError(f"no data expected in state {self.state}")
        if len(data) > self.bytes_needed():
            raise RuntimeError("more data than the handshake asked for")
        self._buf += data
        out = bytearray()
        while self.state in ("client-flags", "option-header", "option-data") and self.bytes_needed() == 0:
            out += self._step()
        return bytes(out)

    def _step(self) -> bytes:
        buf = bytes(self._buf)
        self._buf.clear()
        if self.state == "client-flags":
            (flags,) = CLIENT_FLAGS.unpack(buf)
            if flags & ~CLIENT_FLAGS_KNOWN:
                raise ProtocolError(f"client sent unknown handshake flags {flags & ~CLIENT_FLAGS_KNOWN:#x}")
            self._fixed = bool(flags & FLAG_C_FIXED_NEWSTYLE)
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self.state = "option-header"
            return b""
        if self.state == "option-header":
            magic, option, length = OPTION_HEADER.unpack(buf)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x} (expected IHAVEOPT)")
            self.options_seen += 1
            if self.options_seen > MAX_OPTIONS:
                raise ProtocolError(f"more than {MAX_OPTIONS} options in one handshake")
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} carries {length} bytes, more than the limit "
                                    f"of {MAX_OPTION_LENGTH}")
            self._option, self._length = option, length
            self.state = "option-data"
            if length:
                return b""
            buf = b""
        # the option's data is complete
        self.state = "option-header"
        return self._option_reply(self._option, buf)

    # ------------------------------------------------------------ options
    def _find(self, name: str) -> Export | None:
        if name == "":
            return self.exports[0]
        for e in self.exports:
            if e.name == name:
                return e
        return None

    def _option_reply(self, option: int, data: bytes) -> bytes:
        if option == OPT_EXPORT_NAME:
            name = _valid_string(data)
            export = self._find(name) if name is not None else None
            if export is None:
                shown = name if name is not None else repr(data[:64])
                raise ProtocolError(f"client asked for export {shown!r}, which this server does not have")
            flags = export.transmission_flags(self._structured)
            self._enter(export, flags, block_size=False)
            reply = EXPORT_NAME_REPLY.pack(export.size, flags)
            return reply if self._no_zeroes else reply + bytes(124)
        if not self._fixed:
            raise ProtocolError(f"option {option} from a client that did not ask for fixed newstyle")
        if option == OPT_ABORT:
            self.state = "closed"
            self.close_reason = "client aborted the handshake"
            return option_reply(option, REP_ACK)
        if option == OPT_LIST:
            if data:
                return option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST carries no data")
            out = b""
            for e in self.exports:
                raw = e.name.encode()
                out += option_reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw + e.description.encode())
            return out + option_reply(option, REP_ACK)
        if option in (OPT_INFO, OPT_GO):
            return self._info(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                return option_reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY carries no data")
            self._structured = True
            return option_reply(option, REP_ACK)
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == OPT_STARTTLS:
            return option_reply(option, REP_ERR_POLICY, b"this server does not speak TLS")
        return option_reply(option, REP_ERR_UNSUP, error_text(f"option {option} is not supported"))

    def _info(self, option: int, data: bytes) -> bytes:
        if len(data) < 6:
            return option_reply(option, REP_ERR_INVALID, b"option data too short")
        (namelen,) = struct.unpack_from(">I", data)
        if namelen > len(data) - 6:
            return option_reply(option, REP_ERR_INVALID, b"export name runs past the option")
        name = _valid_string(data[4 : 4 + namelen])
        if name is None:
            return option_reply(option, REP_ERR_INVALID, b"export name is not a valid string")
        (count,) = struct.unpack_from(">H", data, 4 + namelen)
        if len(data) != 4 + namelen + 2 + 2 * count:
            return option_reply(option, REP_ERR_INVALID, b"information request list does not match the option length")
        requests = set(struct.unpack_from(f">{count}H", data, 6 + namelen))
        export = self._find(name)
        if export is None:
            return option_reply(option, REP_ERR_UNKNOWN, error_text(f"no export named {name!r}"))
        flags = export.transmission_flags(self._structured)
        out = option_reply(option, REP_INFO, INFO_EXPORT_DATA.pack(INFO_EXPORT, export.size, flags))
        out += option_reply(option, REP_INFO,
                            INFO_BLOCK_SIZE_DATA.pack(INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        if INFO_NAME in requests:
            out += option_reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests and export.description:
            out += option_reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        out += option_reply(option, REP_ACK)
        if option == OPT_GO:
            self._enter(export, flags, block_size=INFO_BLOCK_SIZE in requests)
        return out

    def _parse_queries(self, data: bytes) -> tuple[str, list[str]] | tuple[None, bytes]:
        """(export name, queries), or (None, error reply data)."""
        if len(data) < 8:
            return None, b"option data too short"
        (namelen,) = struct.unpack_from(">I", data)
        if namelen > len(data) - 8:
            return None, b"export name runs past the option"
        name = _valid_string(data[4 : 4 + namelen])
        if name is None:
            return None, b"export name is not a valid string"
        pos = 4 + namelen
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if count > MAX_QUERIES:
            return None, b"too many queries"
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                return None, b"query runs past the option"
            (qlen,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if qlen > len(data) - pos:
                return None, b"query runs past the option"
            q = _valid_string(data[pos : pos + qlen])
            pos += qlen
            if q is None or ":" not in q:
                return None, b"a query is not a valid namespace:name string"
            queries.append(q)
        if pos != len(data):
            return None, b"trailing bytes after the queries"
        return name, queries

    def _meta_context(self, option: int, data: bytes) -> bytes:
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self._meta = None  # replaced even when this one fails
        if not self._structured:
            return option_reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
        name, queries = self._parse_queries(data)
        if name is None:
            err = REP_ERR_TOO_BIG if queries == b"too many queries" else REP_ERR_INVALID
            return option_reply(option, err, queries)
        export = self._find(name)
        if export is None:
            return option_reply(option, REP_ERR_UNKNOWN, error_text(f"no export named {name!r}"))
        if setting:
            selected = BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        out = b""
        if selected:
            cid = BASE_ALLOCATION_ID if setting else 0
            out = option_reply(option, REP_META_CONTEXT, struct.pack(">I", cid) + BASE_ALLOCATION.encode())
        if setting:
            self._meta = (export, {BASE_ALLOCATION_ID: BASE_ALLOCATION} if selected else {})
        return out + option_reply(option, REP_ACK)

    def _enter(self, export: Export, flags: int, *, block_size: bool) -> None:
        contexts = {}
        if self._meta is not None and self._meta[0] is export and self._structured:
            contexts = dict(self._meta[1])
        self.negotiated = Negotiated(export, flags, self._structured, contexts, block_size)
        self.state = "transmission"
