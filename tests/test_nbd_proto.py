"""The NBD protocol core (vdisk.export.nbd.proto) without sockets: the handshake
state machine, request checks and reply encoders, byte for byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdisk.errors import UsageError
from vdisk.export.nbd import proto
from vdisk.export.nbd.handshake import Handshake
from vdisk.export.nbd.server import parse_address

EXPORT = proto.Export("disk", 1 << 30, description="a test disk")
RO = proto.Export("ro", 4096, read_only=True)

FIXED = struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE)
FIXED_NZ = struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)


def started(exports=(EXPORT,), flags=FIXED) -> Handshake:
    hs = Handshake(list(exports))
    hs.greeting()
    assert hs.bytes_needed() == 4
    assert hs.receive(flags) == b""
    return hs


def send(hs: Handshake, option: int, data: bytes = b"") -> list[tuple[int, int, bytes]]:
    """Feed one option, exactly as many bytes as the machine asks for at a time."""
    msg = proto.client_option(option, data)
    out = b""
    pos = 0
    while pos < len(msg):
        n = hs.bytes_needed()
        assert n > 0
        out += hs.receive(msg[pos : pos + n])
        pos += n
    return proto.parse_option_replies(out) if option != proto.OPT_EXPORT_NAME else out


def test_greeting_layout():
    hs = Handshake([EXPORT])
    g = hs.greeting()
    assert g[:8] == b"NBDMAGIC" and g[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", g[16:]) == (proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES,)
    assert hs.state == "client-flags"


def test_unknown_client_flags_end_the_handshake():
    hs = Handshake([EXPORT])
    hs.greeting()
    with pytest.raises(proto.ProtocolError, match="unknown handshake flags 0x4"):
        hs.receive(struct.pack(">I", 4 | proto.FLAG_C_FIXED_NEWSTYLE))


def test_go_with_structured_replies_and_block_status():
    hs = started()
    assert send(hs, proto.OPT_STRUCTURED_REPLY) == [(proto.OPT_STRUCTURED_REPLY, proto.REP_ACK, b"")]
    replies = send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("disk", ("base:allocation",)))
    assert replies == [
        (proto.OPT_SET_META_CONTEXT, proto.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (proto.OPT_SET_META_CONTEXT, proto.REP_ACK, b""),
    ]
    replies = send(hs, proto.OPT_GO, proto.info_request_data("disk", (proto.INFO_BLOCK_SIZE, proto.INFO_NAME,
                                                                      proto.INFO_DESCRIPTION)))
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for o, t, d in replies if t == proto.REP_INFO}
    assert replies[-1] == (proto.OPT_GO, proto.REP_ACK, b"")
    size, flags = struct.unpack(">QH", infos[proto.INFO_EXPORT])
    assert size == 1 << 30
    assert flags & proto.FLAG_HAS_FLAGS and flags & proto.FLAG_CAN_MULTI_CONN
    assert flags & proto.FLAG_SEND_TRIM and flags & proto.FLAG_SEND_WRITE_ZEROES and flags & proto.FLAG_SEND_DF
    assert not flags & proto.FLAG_READ_ONLY
    assert struct.unpack(">III", infos[proto.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    assert infos[proto.INFO_NAME] == b"disk" and infos[proto.INFO_DESCRIPTION] == b"a test disk"
    assert hs.state == "transmission" and hs.bytes_needed() == 0
    neg = hs.negotiated
    assert neg.structured and neg.contexts == {1: "base:allocation"} and neg.block_size_requested
    assert neg.export is EXPORT and neg.flags == flags


def test_read_only_export_flags():
    flags = RO.transmission_flags(structured=False)
    assert flags & proto.FLAG_READ_ONLY
    assert not flags & (proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES | proto.FLAG_SEND_FUA | proto.FLAG_SEND_DF)


def test_empty_name_is_the_default_export_and_info_does_not_end_the_handshake():
    hs = started()
    replies = send(hs, proto.OPT_INFO, proto.info_request_data(""))
    assert replies[-1][1] == proto.REP_ACK
    assert hs.state == "option-header"
    send(hs, proto.OPT_GO, proto.info_request_data(""))
    assert hs.state == "transmission" and hs.negotiated.export is EXPORT
    assert not hs.negotiated.structured and not hs.negotiated.contexts


def test_export_name_option():
    hs = started()
    out = send(hs, proto.OPT_EXPORT_NAME, b"disk")
    assert len(out) == 8 + 2 + 124 and out[10:] == bytes(124)
    assert struct.unpack(">QH", out[:10])[0] == 1 << 30
    assert hs.state == "transmission"
    hs = started(flags=FIXED_NZ)
    assert len(send(hs, proto.OPT_EXPORT_NAME, b"")) == 10


def test_export_name_of_an_unknown_export_is_a_hard_disconnect():
    hs = started()
    with pytest.raises(proto.ProtocolError, match="export 'nope'"):
        send(hs, proto.OPT_EXPORT_NAME, b"nope")


def test_unknown_and_refused_options_get_errors_and_the_handshake_goes_on():
    hs = started()
    assert send(hs, 99, b"xyz") == [(99, proto.REP_ERR_UNSUP, b"option 99 is not supported")]
    assert send(hs, proto.OPT_STARTTLS)[0][1] == proto.REP_ERR_POLICY
    assert send(hs, proto.OPT_EXTENDED_HEADERS)[0][1] == proto.REP_ERR_UNSUP
    assert send(hs, proto.OPT_LIST, b"x")[0][1] == proto.REP_ERR_INVALID
    assert send(hs, proto.OPT_STRUCTURED_REPLY, b"x")[0][1] == proto.REP_ERR_INVALID
    assert hs.state == "option-header"


def test_list_and_abort():
    hs = started()
    replies = send(hs, proto.OPT_LIST)
    assert replies == [(proto.OPT_LIST, proto.REP_SERVER, struct.pack(">I", 4) + b"disk" + b"a test disk"),
                       (proto.OPT_LIST, proto.REP_ACK, b"")]
    assert send(hs, proto.OPT_ABORT) == [(proto.OPT_ABORT, proto.REP_ACK, b"")]
    assert hs.state == "closed" and hs.bytes_needed() == 0


@pytest.mark.parametrize("data, why", [
    (b"", "too short"),
    (struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0), "runs past"),
    (struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\0\1", "does not match"),
    (struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0), "not a valid string"),
])
def test_malformed_info_requests(data, why):
    hs = started()
    (reply,) = send(hs, proto.OPT_GO, data)
    assert reply[1] == proto.REP_ERR_INVALID and why.encode() in reply[2]
    assert hs.state == "option-header"


def test_go_to_an_unknown_export():
    hs = started()
    (reply,) = send(hs, proto.OPT_GO, proto.info_request_data("other"))
    assert reply[1] == proto.REP_ERR_UNKNOWN
    assert hs.state == "option-header"


def test_meta_contexts():
    hs = started()
    # before structured replies: refused
    assert send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("disk", ("base:allocation",)))[0][1] \
        == proto.REP_ERR_INVALID
    send(hs, proto.OPT_STRUCTURED_REPLY)
    # listing: no query lists everything, with id 0
    assert send(hs, proto.OPT_LIST_META_CONTEXT, proto.meta_context_data("disk", ()))[0] == \
        (proto.OPT_LIST_META_CONTEXT, proto.REP_META_CONTEXT, bytes(4) + b"base:allocation")
    assert send(hs, proto.OPT_LIST_META_CONTEXT, proto.meta_context_data("disk", ("base:",)))[0][1] == \
        proto.REP_META_CONTEXT
    # unknown namespaces and leaves are ignored, not errors
    assert send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("disk", ("qemu:dirty-bitmap:x", "base:y"))) \
        == [(proto.OPT_SET_META_CONTEXT, proto.REP_ACK, b"")]
    # a query without a namespace, too many queries, an unknown export
    assert send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("disk", ("nocolon",)))[0][1] == \
        proto.REP_ERR_INVALID
    assert send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("disk", ("base:allocation",) * 65)
                )[0][1] == proto.REP_ERR_TOO_BIG
    assert send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("zz", ("base:allocation",)))[0][1] == \
        proto.REP_ERR_UNKNOWN
    # a truncated query list
    data = proto.meta_context_data("disk", ("base:allocation",))[:-3]
    assert send(hs, proto.OPT_SET_META_CONTEXT, data)[0][1] == proto.REP_ERR_INVALID
    # the last SET wins: it failed, so no context is selected at GO
    send(hs, proto.OPT_GO, proto.info_request_data("disk"))
    assert hs.negotiated.contexts == {}


def test_meta_context_of_another_export_is_not_carried_into_go():
    hs = started(exports=(EXPORT, RO))
    send(hs, proto.OPT_STRUCTURED_REPLY)
    send(hs, proto.OPT_SET_META_CONTEXT, proto.meta_context_data("ro", ("base:allocation",)))
    send(hs, proto.OPT_GO, proto.info_request_data("disk"))
    assert hs.negotiated.export is EXPORT and hs.negotiated.contexts == {}


def test_option_limits():
    hs = started()
    with pytest.raises(proto.ProtocolError, match="more than the limit"):
        hs.receive(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.OPT_GO, proto.MAX_OPTION_LENGTH + 1))
    hs = started()
    with pytest.raises(proto.ProtocolError, match="bad option magic"):
        hs.receive(proto.OPTION_HEADER.pack(0x1234, proto.OPT_GO, 0))
    hs = started()
    for _ in range(proto.MAX_OPTIONS):
        send(hs, 99)
    with pytest.raises(proto.ProtocolError, match="more than 256 options"):
        send(hs, 99)


def test_non_fixed_client_may_only_name_an_export():
    hs = started(flags=bytes(4))
    with pytest.raises(proto.ProtocolError, match="fixed newstyle"):
        send(hs, proto.OPT_LIST)
    hs = started(flags=bytes(4))
    send(hs, proto.OPT_EXPORT_NAME, b"disk")
    assert hs.state == "transmission"


def test_receive_refuses_more_than_it_asked_for():
    hs = started()
    with pytest.raises(RuntimeError):
        hs.receive(bytes(17))


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_any_bytes_give_replies_or_a_protocol_error(data):
    """Whatever a client sends, the machine asks for a bounded number of bytes, and
    answers, ends or raises ProtocolError -- nothing else."""
    hs = started()
    pos = 0
    try:
        while pos < len(data) and hs.state not in ("transmission", "closed"):
            n = hs.bytes_needed()
            assert 0 < n <= max(proto.OPTION_HEADER.size, proto.MAX_OPTION_LENGTH)
            hs.receive(data[pos : pos + n])
            pos += n
    except proto.ProtocolError as exc:
        assert "\n" not in exc.message


def neg(structured=True, contexts=True, export=EXPORT) -> proto.Negotiated:
    return proto.Negotiated(export, export.transmission_flags(structured), structured,
                            {1: proto.BASE_ALLOCATION} if contexts else {})


@pytest.mark.parametrize("n, flags, cmd, offset, length, error", [
    (neg(), 0, proto.CMD_READ, 0, 4096, None),
    (neg(), proto.CMD_FLAG_DF, proto.CMD_READ, 0, 4096, None),
    (neg(structured=False), proto.CMD_FLAG_DF, proto.CMD_READ, 0, 4096, proto.EINVAL),
    (neg(), 0, proto.CMD_READ, (1 << 30) - 512, 1024, proto.EINVAL),
    (neg(), 0, proto.CMD_READ, 0, proto.MAX_PAYLOAD + 1, proto.EOVERFLOW),
    (neg(structured=False), 0, proto.CMD_READ, 0, proto.MAX_PAYLOAD + 1, proto.EINVAL),
    (neg(), proto.CMD_FLAG_FUA, proto.CMD_WRITE, 0, 4096, None),
    (neg(), 0, proto.CMD_WRITE, 1 << 30, 1, proto.ENOSPC),
    (neg(), proto.CMD_FLAG_NO_HOLE, proto.CMD_WRITE, 0, 4096, proto.EINVAL),
    (neg(), proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FUA, proto.CMD_WRITE_ZEROES, 0, 1 << 30, None),
    (neg(), proto.CMD_FLAG_FAST_ZERO, proto.CMD_WRITE_ZEROES, 0, 4096, proto.EINVAL),
    (neg(), 0, proto.CMD_WRITE_ZEROES, 0, (1 << 30) + 1, proto.ENOSPC),
    (neg(), 0, proto.CMD_TRIM, 4096, (1 << 30), proto.EINVAL),
    (neg(export=RO), 0, proto.CMD_WRITE, 0, 512, proto.EPERM),
    (neg(export=RO), 0, proto.CMD_TRIM, 0, 512, proto.EPERM),
    (neg(export=RO), 0, proto.CMD_WRITE_ZEROES, 0, 512, proto.EPERM),
    (neg(export=RO), proto.CMD_FLAG_FUA, proto.CMD_READ, 0, 512, proto.EINVAL),  # FUA not advertised
    (neg(), 0, proto.CMD_FLUSH, 0, 0, None),
    (neg(), 0, proto.CMD_FLUSH, 0, 1, proto.EINVAL),
    (neg(), proto.CMD_FLAG_REQ_ONE, proto.CMD_BLOCK_STATUS, 0, 1 << 30, None),
    (neg(contexts=False), 0, proto.CMD_BLOCK_STATUS, 0, 4096, proto.EINVAL),
    (neg(), 0, proto.CMD_BLOCK_STATUS, 0, 0, proto.EINVAL),
    (neg(), proto.CMD_FLAG_REQ_ONE, proto.CMD_READ, 0, 4096, proto.EINVAL),
    (neg(), 0, proto.CMD_CACHE, 0, 4096, None),
    (neg(), 0, 42, 0, 0, proto.EINVAL),
    (neg(), 1 << 9, proto.CMD_READ, 0, 512, proto.EINVAL),
])
def test_check_request(n, flags, cmd, offset, length, error):
    got = proto.check_request(n, flags, cmd, offset, length)
    assert (got[0] if got else None) == error
    if got:
        assert got[1] and "\n" not in got[1]


def test_an_oversized_write_ends_the_connection():
    with pytest.raises(proto.ProtocolError, match="maximum payload"):
        proto.check_request(neg(), 0, proto.CMD_WRITE, 0, proto.MAX_PAYLOAD + 1)


def test_reply_layouts():
    assert proto.simple_reply(0x1122, 5) == struct.pack(">IIQ", 0x67446698, 5, 0x1122)
    h = proto.read_chunk_header(7, 4096, 512)
    assert h == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 7, 520, 4096)
    assert proto.none_chunk(3) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 3, 0)
    e = proto.error_chunk(9, proto.EIO, "bad")
    assert e == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 9, 9, 5, 3) + b"bad"
    assert proto.error_reply(neg(structured=False), 9, proto.EIO, "bad") == proto.simple_reply(9, proto.EIO)
    b = proto.block_status_chunk(4, 1, [(4096, 0), (8192, 3)])
    assert b == struct.pack(">IHHQIIIIII", 0x668E33EF, 1, 5, 4, 20, 1, 4096, 0, 8192, 3)
    with pytest.raises(ValueError):
        proto.block_status_chunk(4, 1, [])


def test_error_messages_are_cut_to_the_string_limit_on_a_character_boundary():
    e = proto.error_chunk(1, proto.EIO, "é" * 3000)  # 6000 bytes of UTF-8
    (mlen,) = struct.unpack(">H", e[24:26])
    assert mlen <= proto.MAX_STRING
    e[26:].decode("utf-8")


def test_descriptors():
    d = proto.descriptors
    assert d([(4096, 0), (4096, 0), (0, 3), (8192, 3)], 1 << 20, False) == [(8192, 0), (8192, 3)]
    assert d([(4096, 0), (8192, 3)], 6000, False) == [(4096, 0), (1904, 3)]
    assert d([(4096, 0), (8192, 3)], 1 << 20, True) == [(4096, 0)]
    many = [(512, i % 2) for i in range(proto.MAX_DESCRIPTORS + 10)]
    assert len(d(many, 1 << 40, False)) == proto.MAX_DESCRIPTORS


@pytest.mark.parametrize("spec, want", [
    ("unix:/run/x.sock", ("unix", "/run/x.sock")),
    ("tcp:127.0.0.1:10809", ("tcp", "127.0.0.1", 10809)),
    ("tcp:[::1]:0", ("tcp", "::1", 0)),
    ("tcp:localhost:1", ("tcp", "localhost", 1)),
])
def test_addresses(spec, want):
    assert parse_address(spec) == want


@pytest.mark.parametrize("spec", ["tcp::10809", "tcp:10809", "tcp:host:port", "tcp:h:70000", "unix:", "/x.sock",
                                  "nbd://x"])
def test_bad_addresses(spec):
    with pytest.raises(UsageError) as exc:
        parse_address(spec)
    assert spec in exc.value.message
