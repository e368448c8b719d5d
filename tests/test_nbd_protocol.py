"""The sans-IO NBD protocol, byte by byte, in the order of proto.md.

No sockets: each test feeds the bytes a client would send to a
``ServerConnection`` and checks the events and the exact bytes it answers.
The export table used throughout::

    "disk"   1 MiB, read-write   (the default export, reached by "")
    "ro"     4 KiB, read-only
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addcow.nbd import connection, negotiation, transmission, wire
from addcow.nbd import events as nbd_events
from addcow.nbd.connection import ServerConnection
from addcow.nbd.events import (
    NEED_DATA,
    AbortRequested,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    LocalProtocolError,
    OptionRefused,
    RemoteProtocolError,
    Request,
    RequestError,
    StartTLS,
    TransmissionStarted,
)
from addcow.nbd.negotiation import TLS_OFF, TLS_ON, TLS_REQUIRE
from addcow.nbd.state import TRANSITIONS, State, Trigger

MiB = 1 << 20
DISK = ExportInfo("disk", MiB, description="a test disk")
RO = ExportInfo("ro", 4096, read_only=True)


def option(opt: int, data: bytes = b"") -> bytes:
    """C: IHAVEOPT, 32 bits option, 32 bits length, data."""
    return struct.pack(">QII", wire.IHAVEOPT, opt, len(data)) + data


def name_field(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def go_data(name: str, *infos: int) -> bytes:
    return name_field(name) + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_data(name: str, *queries: str) -> bytes:
    return name_field(name) + struct.pack(">I", len(queries)) + b"".join(map(name_field, queries))


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies: (option, reply type, payload)."""
    out = []
    while data:
        magic, opt, reply, length = struct.unpack(">QIII", data[:20])
        assert magic == wire.OPT_REPLY_MAGIC
        out.append((opt, reply, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def events(conn: ServerConnection) -> list[object]:
    found = []
    while (event := conn.next_event()) is not NEED_DATA:
        found.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return found


def negotiating(
    flags: int = wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES,
) -> ServerConnection:
    conn = ServerConnection([DISK, RO])
    conn.initiate()
    conn.receive_data(struct.pack(">I", flags))
    assert events(conn) == []
    return conn


def transmitting(
    structured: bool = True, contexts: tuple[str, ...] = (), name: str = ""
) -> ServerConnection:
    conn = negotiating()
    data = option(wire.OPT_STRUCTURED_REPLY) if structured else b""
    if contexts:
        data += option(wire.OPT_SET_META_CONTEXT, meta_data(name, *contexts))
    conn.receive_data(data + option(wire.OPT_GO, go_data(name)))
    started = events(conn)[-1]
    assert isinstance(started, TransmissionStarted)
    conn.data_to_send()
    return conn


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", wire.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# -- Fixed newstyle negotiation ---------------------------------------------------------


def test_greeting_is_nbdmagic_ihaveopt_and_handshake_flags() -> None:
    conn = ServerConnection([DISK])
    assert conn.initiate() == (
        b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"  # FIXED_NEWSTYLE | NO_ZEROES
    )
    with pytest.raises(LocalProtocolError):
        conn.initiate()


def test_client_flags_with_unknown_bits_drop_the_connection() -> None:
    # "the server MUST drop the TCP connection if the client sets an unknown flag"
    conn = ServerConnection([DISK])
    conn.initiate()
    conn.receive_data(b"\x00\x00\x00\x04")
    with pytest.raises(RemoteProtocolError, match="unknown bits 0x4"):
        conn.next_event()
    assert conn.state is State.DONE


def test_option_with_wrong_magic_drops_the_connection() -> None:
    conn = negotiating()
    conn.receive_data(option(wire.OPT_LIST).replace(b"IHAVEOPT", b"IHAVEOPX"))
    with pytest.raises(RemoteProtocolError, match="option magic"):
        conn.next_event()


def test_export_name_replies_size_and_flags_without_zeroes() -> None:
    conn = negotiating()
    conn.receive_data(option(wire.OPT_EXPORT_NAME, b"disk"))
    (event,) = events(conn)
    assert isinstance(event, TransmissionStarted)
    assert event.export is DISK and not event.structured and event.contexts == ()
    flags = (
        wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA | wire.FLAG_SEND_CACHE
        | wire.FLAG_CAN_MULTI_CONN | wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES
        | wire.FLAG_SEND_FAST_ZERO
    )  # fmt: skip
    assert conn.data_to_send() == struct.pack(">QH", MiB, flags)


def test_export_name_sends_124_zero_bytes_unless_no_zeroes() -> None:
    conn = negotiating(flags=wire.FLAG_C_FIXED_NEWSTYLE)
    conn.receive_data(option(wire.OPT_EXPORT_NAME, b""))
    events(conn)
    out = conn.data_to_send()
    assert len(out) == 8 + 2 + 124 and out[10:] == bytes(124)


def test_export_name_for_a_missing_export_terminates_the_session() -> None:
    # "If the chosen export does not exist ... the server MUST terminate the session."
    conn = negotiating()
    conn.receive_data(option(wire.OPT_EXPORT_NAME, b"nope"))
    with pytest.raises(RemoteProtocolError, match="no export named 'nope'"):
        conn.next_event()


def test_export_name_longer_than_4096_bytes_terminates_before_buffering() -> None:
    conn = negotiating()
    conn.receive_data(struct.pack(">QII", wire.IHAVEOPT, wire.OPT_EXPORT_NAME, 5000))
    with pytest.raises(RemoteProtocolError, match="5000-byte name"):
        conn.next_event()


def test_unknown_option_gets_err_unsup_and_haggling_goes_on() -> None:
    conn = negotiating()
    conn.receive_data(option(99, b"junk") + option(wire.OPT_STARTTLS) + option(wire.OPT_LIST))
    found = events(conn)
    assert [type(e) for e in found] == [OptionRefused, OptionRefused]
    replies = parse_replies(conn.data_to_send())
    assert [(o, r) for o, r, _ in replies] == [
        (99, wire.REP_ERR_UNSUP),
        (wire.OPT_STARTTLS, wire.REP_ERR_UNSUP),
        (wire.OPT_LIST, wire.REP_SERVER),
        (wire.OPT_LIST, wire.REP_SERVER),
        (wire.OPT_LIST, wire.REP_ACK),
    ]
    assert replies[2][2] == b"\x00\x00\x00\x04disk" + b"a test disk"
    assert replies[3][2] == b"\x00\x00\x00\x02ro"


def test_list_with_data_is_invalid() -> None:
    # "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
    conn = negotiating()
    conn.receive_data(option(wire.OPT_LIST, b"x"))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_INVALID


def test_abort_is_acknowledged_then_nothing_more_is_read() -> None:
    conn = negotiating()
    conn.receive_data(option(wire.OPT_ABORT) + b"trailing garbage")
    assert events(conn) == [AbortRequested()]
    assert parse_replies(conn.data_to_send()) == [(wire.OPT_ABORT, wire.REP_ACK, b"")]
    conn.receive_data(b"more")
    assert conn.next_event() is NEED_DATA


def test_go_replies_info_export_block_size_and_name_then_ack() -> None:
    conn = negotiating()
    conn.receive_data(
        option(
            wire.OPT_GO, go_data("", wire.INFO_NAME, wire.INFO_DESCRIPTION, wire.INFO_BLOCK_SIZE)
        )
    )
    (event,) = events(conn)
    assert isinstance(event, TransmissionStarted) and event.export is DISK
    replies = parse_replies(conn.data_to_send())
    assert [r for _, r, _ in replies] == [wire.REP_INFO] * 4 + [wire.REP_ACK]
    info = {struct.unpack(">H", d[:2])[0]: d[2:] for _, r, d in replies if r == wire.REP_INFO}
    assert info[wire.INFO_EXPORT] == struct.pack(">QH", MiB, event.flags)
    assert info[wire.INFO_NAME] == b"disk"
    assert info[wire.INFO_DESCRIPTION] == b"a test disk"
    assert info[wire.INFO_BLOCK_SIZE] == struct.pack(">III", 1, 4096, 32 * MiB)
    assert conn.state is State.TRANSMISSION


def test_info_stays_in_negotiation_and_read_only_flags_are_truthful() -> None:
    conn = negotiating()
    conn.receive_data(option(wire.OPT_INFO, go_data("ro")))
    assert events(conn) == []
    replies = parse_replies(conn.data_to_send())
    _size, flags = struct.unpack(">QH", replies[0][2][2:])
    assert flags & wire.FLAG_READ_ONLY
    assert not flags & (
        wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES | wire.FLAG_SEND_FAST_ZERO
    )
    assert not flags & wire.FLAG_SEND_DF  # structured replies were not negotiated
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize(
    ("data", "reply", "message"),
    [
        (go_data("nope"), wire.REP_ERR_UNKNOWN, "no export named 'nope'"),
        (struct.pack(">I", 100) + b"disk" + b"\0\0", wire.REP_ERR_INVALID, "overruns"),
        (struct.pack(">I", 5000) + bytes(5002), wire.REP_ERR_INVALID, "5000 bytes"),
        (go_data("disk") + b"\0\3", wire.REP_ERR_INVALID, "does not match"),
        (b"\0\0", wire.REP_ERR_INVALID, "too short"),
        (name_field("d\0") + b"\0\0", wire.REP_ERR_INVALID, "NUL"),
        (struct.pack(">I", 2) + b"\xff\xfe\0\0", wire.REP_ERR_INVALID, "UTF-8"),
    ],
    ids=["unknown", "overrun", "long-name", "info-count", "short", "nul", "utf8"],
)
def test_bad_go_is_refused_and_haggling_goes_on(data: bytes, reply: int, message: str) -> None:
    conn = negotiating()
    conn.receive_data(option(wire.OPT_GO, data) + option(wire.OPT_GO, go_data("disk")))
    refused, started = events(conn)
    assert isinstance(refused, OptionRefused) and refused.reply == reply
    assert message in refused.message
    assert isinstance(started, TransmissionStarted)
    assert parse_replies(conn.data_to_send())[0] == (wire.OPT_GO, reply, refused.message.encode())


def test_oversized_option_payload_is_skipped_unbuffered_and_refused_too_big() -> None:
    conn = negotiating()
    size = wire.MAX_OPTION_DATA + 1
    conn.receive_data(struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, size) + bytes(1000))
    assert conn.next_event() is NEED_DATA  # still skipping
    left = size - 1000
    while left > 1000:
        conn.receive_data(bytes(1000))
        left -= 1000
        assert conn.next_event() is NEED_DATA and conn.buffered == 0
    conn.receive_data(bytes(left) + option(wire.OPT_LIST))
    found = events(conn)
    assert isinstance(found[0], OptionRefused) and found[0].reply == wire.REP_ERR_TOO_BIG
    assert [r for _, r, _ in parse_replies(conn.data_to_send())] == [
        wire.REP_ERR_TOO_BIG, wire.REP_SERVER, wire.REP_SERVER, wire.REP_ACK,
    ]  # fmt: skip


def test_oversized_option_arriving_whole_is_refused_at_once() -> None:
    conn = negotiating()
    size = wire.MAX_OPTION_DATA + 1
    conn.receive_data(
        struct.pack(">QII", wire.IHAVEOPT, 99, size) + bytes(size) + option(wire.OPT_LIST)
    )
    refused, *rest = events(conn)
    assert isinstance(refused, OptionRefused) and refused.reply == wire.REP_ERR_TOO_BIG
    assert rest == [] and conn.buffered == 0
    assert [r for _, r, _ in parse_replies(conn.data_to_send())][-1] == wire.REP_ACK


def test_eof_while_skipping_an_oversized_option_is_not_clean() -> None:
    conn = negotiating()
    conn.receive_data(
        struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, wire.MAX_OPTION_DATA + 1) + b"x"
    )
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    closed = conn.next_event()
    assert isinstance(closed, ConnectionClosed) and not closed.clean
    assert conn.state is State.DONE and conn.buffered == 0


def test_endless_options_are_a_denial_of_service() -> None:
    conn = negotiating()
    conn.receive_data(option(99) * wire.MAX_OPTIONS + option(99))
    with pytest.raises(RemoteProtocolError, match="more than"):
        events(conn)


def test_handshake_fed_one_byte_at_a_time() -> None:
    conn = ServerConnection([DISK])
    conn.initiate()
    stream = b"\0\0\0\3" + option(wire.OPT_STRUCTURED_REPLY) + option(wire.OPT_GO, go_data("disk"))
    found: list[object] = []
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
        found += events(conn)
    assert [type(e) for e in found] == [TransmissionStarted]


# -- TLS: NBD_OPT_STARTTLS ----------------------------------------------------------------


def tls_negotiating(mode: str, flags: int = wire.FLAG_C_FIXED_NEWSTYLE) -> ServerConnection:
    conn = ServerConnection([DISK, RO], tls=mode)
    conn.initiate()
    conn.receive_data(struct.pack(">I", flags))
    assert events(conn) == []
    return conn


def start_tls(conn: ServerConnection) -> None:
    """STARTTLS, its ACK, then the end of the handshake as the server reports it."""
    conn.receive_data(option(wire.OPT_STARTTLS))
    assert events(conn) == [StartTLS()]
    assert parse_replies(conn.data_to_send()) == [(wire.OPT_STARTTLS, wire.REP_ACK, b"")]
    assert conn.state is State.TLS_HANDSHAKE
    conn.tls_started()
    assert conn.state is State.OPTIONS and conn.tls_active


def test_forcedtls_refuses_every_option_but_starttls_and_abort_with_tls_reqd() -> None:
    # "If the server receives any other option, including NBD_OPT_INFO and
    # unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has
    # not been initiated".
    conn = tls_negotiating(TLS_REQUIRE)
    refused = (wire.OPT_LIST, wire.OPT_INFO, wire.OPT_GO, wire.OPT_STRUCTURED_REPLY, 99)
    conn.receive_data(
        b"".join(
            option(o, go_data("") if o in (wire.OPT_INFO, wire.OPT_GO) else b"") for o in refused
        )
    )
    found = events(conn)
    assert [e.reply for e in found if isinstance(e, OptionRefused)] == [wire.REP_ERR_TLS_REQD] * 5
    replies = parse_replies(conn.data_to_send())
    assert [(o, r) for o, r, _ in replies] == [(o, wire.REP_ERR_TLS_REQD) for o in refused]
    assert not conn.structured and conn.state is State.OPTIONS
    conn.receive_data(option(wire.OPT_ABORT))
    assert events(conn) == [AbortRequested()]


def test_forcedtls_refuses_an_oversized_option_with_tls_reqd_and_skips_it() -> None:
    conn = tls_negotiating(TLS_REQUIRE)
    big = wire.MAX_OPTION_DATA + 1
    conn.receive_data(struct.pack(">QII", wire.IHAVEOPT, wire.OPT_LIST, big) + bytes(big))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_TLS_REQD
    conn.receive_data(option(wire.OPT_STARTTLS))
    assert events(conn) == [StartTLS()]


def test_forcedtls_export_name_before_starttls_terminates_the_session() -> None:
    # "If the server receives a request to enter transmission mode via
    # NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request
    # cannot error, it MUST terminate the session."
    conn = tls_negotiating(TLS_REQUIRE)
    conn.receive_data(option(wire.OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError, match="before NBD_OPT_STARTTLS"):
        conn.next_event()
    assert conn.state is State.DONE and conn.data_to_send() == b""


def test_after_the_handshake_negotiation_starts_from_nothing() -> None:
    # "the server MUST NOT preserve any negotiation state (such as a request for
    # NBD_OPT_STRUCTURED_REPLY, or metadata contexts from
    # NBD_OPT_SET_META_CONTEXT) issued before this command."
    conn = tls_negotiating(TLS_ON)
    conn.receive_data(
        option(wire.OPT_STRUCTURED_REPLY)
        + option(wire.OPT_SET_META_CONTEXT, meta_data("", "base:allocation"))
    )
    events(conn)
    conn.data_to_send()
    assert conn.structured and conn.contexts
    start_tls(conn)
    assert not conn.structured and conn.contexts == ()
    conn.receive_data(option(wire.OPT_GO, go_data("")))
    (started,) = events(conn)
    assert isinstance(started, TransmissionStarted)
    assert not started.structured and started.contexts == ()


def test_forcedtls_serves_once_tls_is_up() -> None:
    conn = tls_negotiating(TLS_REQUIRE)
    start_tls(conn)
    conn.receive_data(option(wire.OPT_STRUCTURED_REPLY) + option(wire.OPT_GO, go_data("ro")))
    found = events(conn)
    assert isinstance(found[-1], TransmissionStarted) and found[-1].export is RO


def test_tls_on_serves_a_client_that_never_asks() -> None:
    conn = tls_negotiating(TLS_ON)
    conn.receive_data(option(wire.OPT_EXPORT_NAME, b"disk"))
    (event,) = events(conn)
    assert isinstance(event, TransmissionStarted) and not conn.tls_active


def test_starttls_twice_is_invalid() -> None:
    # "If the server receives NBD_OPT_STARTTLS when TLS has already been
    # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
    conn = tls_negotiating(TLS_REQUIRE)
    start_tls(conn)
    conn.receive_data(option(wire.OPT_STARTTLS))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_INVALID


def test_starttls_with_data_is_invalid() -> None:
    # "The client MUST NOT send any additional data with the option."
    conn = tls_negotiating(TLS_REQUIRE)
    conn.receive_data(option(wire.OPT_STARTTLS, b"x"))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_INVALID
    assert conn.state is State.OPTIONS


def test_plain_bytes_after_starttls_drop_the_connection() -> None:
    # "all further data MUST be sent and received over TLS": anything already
    # sent in clear behind the option is not the start of a handshake.
    conn = tls_negotiating(TLS_REQUIRE)
    conn.receive_data(option(wire.OPT_STARTTLS) + option(wire.OPT_GO, go_data("")))
    with pytest.raises(RemoteProtocolError, match="data after NBD_OPT_STARTTLS"):
        conn.next_event()
    assert conn.state is State.DONE


def test_nothing_is_parsed_during_the_handshake() -> None:
    conn = tls_negotiating(TLS_ON)
    conn.receive_data(option(wire.OPT_STARTTLS))
    assert events(conn) == [StartTLS()]
    assert conn.next_event() is NEED_DATA and conn.state is State.TLS_HANDSHAKE


@pytest.mark.parametrize(
    ("mode", "flags"),
    [(TLS_OFF, wire.FLAG_C_FIXED_NEWSTYLE), (TLS_ON, 0)],
    ids=["tls-off", "not-fixed-newstyle"],
)
def test_starttls_is_unsupported_without_tls_or_fixed_newstyle(mode: str, flags: int) -> None:
    # NOTLS: "The server MUST operate in NOTLS mode unless ... the client
    # replied with NBD_FLAG_C_FIXED_NEWSTYLE".
    conn = tls_negotiating(mode, flags)
    conn.receive_data(option(wire.OPT_STARTTLS))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_UNSUP


def test_an_unknown_tls_mode_is_the_callers_bug() -> None:
    with pytest.raises(LocalProtocolError, match="tls must be one of"):
        ServerConnection([DISK], tls="maybe")


# -- Metadata contexts ----------------------------------------------------------------


def test_set_meta_context_needs_structured_replies_first() -> None:
    # "This option MUST NOT be requested unless structured replies have been
    # negotiated first. ... a server SHOULD send NBD_REP_ERR_INVALID."
    conn = negotiating()
    conn.receive_data(option(wire.OPT_SET_META_CONTEXT, meta_data("", "base:allocation")))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_INVALID


def test_set_meta_context_selects_known_contexts_with_ids() -> None:
    conn = negotiating()
    conn.receive_data(
        option(wire.OPT_STRUCTURED_REPLY)
        + option(
            wire.OPT_SET_META_CONTEXT,
            meta_data(
                "disk", "base:allocation", "qemu:allocation-depth", "base:", "x-foo:bar",
                "qemu:dirty-bitmap:b0", "base:allocation",
            ),
        )
        + option(wire.OPT_GO, go_data(""))
    )
    (started,) = events(conn)
    assert isinstance(started, TransmissionStarted)
    assert started.contexts == ("base:allocation", "qemu:allocation-depth")
    replies = parse_replies(conn.data_to_send())
    assert replies[1:4] == [
        (wire.OPT_SET_META_CONTEXT, wire.REP_META_CONTEXT, b"\0\0\0\1base:allocation"),
        (wire.OPT_SET_META_CONTEXT, wire.REP_META_CONTEXT, b"\0\0\0\2qemu:allocation-depth"),
        (wire.OPT_SET_META_CONTEXT, wire.REP_ACK, b""),
    ]


def test_contexts_set_for_another_export_do_not_carry_over() -> None:
    conn = negotiating()
    conn.receive_data(
        option(wire.OPT_STRUCTURED_REPLY)
        + option(wire.OPT_SET_META_CONTEXT, meta_data("ro", "base:allocation"))
        + option(wire.OPT_GO, go_data(""))
    )
    (started,) = events(conn)
    # Set for "ro", then GO went to the default export "disk".
    assert isinstance(started, TransmissionStarted) and started.contexts == ()
    conn.receive_data(request(wire.CMD_BLOCK_STATUS, 0, 512))
    (refused,) = events(conn)
    assert isinstance(refused, RequestError) and refused.error == wire.EINVAL


def test_list_meta_context_wildcards_and_empty_query_list() -> None:
    conn = negotiating()
    conn.receive_data(
        option(wire.OPT_STRUCTURED_REPLY)
        + option(wire.OPT_LIST_META_CONTEXT, meta_data("", "qemu:"))
        + option(wire.OPT_LIST_META_CONTEXT, meta_data(""))
        + option(wire.OPT_LIST_META_CONTEXT, meta_data("", "nocolon"))
    )
    (refused,) = events(conn)
    assert isinstance(refused, OptionRefused) and refused.reply == wire.REP_ERR_INVALID
    replies = parse_replies(conn.data_to_send())[1:]
    assert [(r, d) for _, r, d in replies] == [
        (wire.REP_META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
        (wire.REP_ACK, b""),
        (wire.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (wire.REP_META_CONTEXT, b"\0\0\0\0qemu:allocation-depth"),
        (wire.REP_ACK, b""),
        (wire.REP_ERR_INVALID, b"query 'nocolon' has no namespace"),
    ]


def test_meta_context_with_a_query_overrunning_the_option_is_invalid() -> None:
    conn = negotiating()
    bad = name_field("") + struct.pack(">I", 2) + name_field("base:allocation")
    conn.receive_data(option(wire.OPT_STRUCTURED_REPLY) + option(wire.OPT_SET_META_CONTEXT, bad))
    (event,) = events(conn)
    assert isinstance(event, OptionRefused) and event.reply == wire.REP_ERR_INVALID


# -- Transmission: requests -------------------------------------------------------------


def test_request_header_fields_are_parsed() -> None:
    conn = transmitting()
    conn.receive_data(request(wire.CMD_READ, 4096, 512, flags=wire.CMD_FLAG_FUA, cookie=0xDEADBEEF))
    assert events(conn) == [Request(0xDEADBEEF, wire.CMD_READ, wire.CMD_FLAG_FUA, 4096, 512)]


# Requests of every kind a run of plain reads may meet: plain reads (some out of
# range, unaligned, empty or too long), reads with flags, writes with payloads,
# other commands, and a wrong magic.
_REQUEST = st.one_of(
    st.tuples(
        st.just(wire.CMD_READ),
        st.sampled_from([0, 0, 0, wire.CMD_FLAG_FUA, wire.CMD_FLAG_DF]),
        st.one_of(
            st.integers(0, MiB + 4096),
            st.sampled_from([MiB - 65536, MiB - 4096, MiB - 512, MiB - 1, MiB, MiB + 512]),
        ),
        st.sampled_from([0, 1, 512, 4096, 65535, 65536, 1 << 20, (1 << 20) + 512]),
    ),
    st.tuples(
        st.sampled_from([wire.CMD_WRITE, wire.CMD_FLUSH, wire.CMD_TRIM, 99]),
        st.sampled_from([0, wire.CMD_FLAG_FUA]),
        st.integers(0, MiB),
        st.integers(0, 600),
    ),
    st.just((-1, 0, 0, 0)),  # a wrong magic: the connection is dropped
)


ALIGNED = ExportInfo("", MiB, min_block=512)


def _wire(reqs: list[tuple[int, int, int, int]]) -> bytes:
    out = b""
    for cookie, (cmd, flags, offset, length) in enumerate(reqs):
        if cmd < 0:
            out += struct.pack(">IHHQQI", 0x12345678, 0, wire.CMD_READ, cookie, 0, 512)
            continue
        out += request(cmd, offset, length, flags=flags, cookie=cookie)
        if cmd == wire.CMD_WRITE:
            out += bytes(length)
    return out


def _parsed(conn: ServerConnection, plain: bool, longest: int) -> list[object]:
    """Every event of the buffered requests, plain reads as the Requests they are."""
    found: list[object] = []
    while True:
        if plain:
            reads = conn.next_plain_reads(longest)
            if reads:
                found += [Request(c, wire.CMD_READ, 0, o, n) for c, o, n in reads]
                continue
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            return [*found, ("dropped", str(exc))]
        if event is NEED_DATA:
            return found
        found.append(event)


@settings(max_examples=300, deadline=None)
@given(st.lists(_REQUEST, max_size=40), st.integers(1, 8), st.sampled_from([4096, 65535]))
def test_plain_reads_are_the_requests_next_event_would_give(
    reqs: list[tuple[int, int, int, int]], pieces: int, longest: int
) -> None:
    """Taking runs of plain reads (:meth:`ServerConnection.next_plain_reads`) between
    events yields exactly the events, in order, that :meth:`next_event` alone
    yields from the same bytes arriving in the same pieces: only valid READs
    without flags and of at most ``longest`` bytes are taken, and everything
    else (refusals, writes, a wrong magic) is left to the parser of every request."""
    data = _wire(reqs)
    results = []
    for plain in (False, True):
        conn = ServerConnection([ALIGNED])
        conn.initiate()
        conn.receive_data(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
        conn.receive_data(option(wire.OPT_STRUCTURED_REPLY) + option(wire.OPT_GO, go_data("")))
        assert isinstance(events(conn)[-1], TransmissionStarted)
        found: list[object] = []
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            conn.receive_data(data[i : i + step])
            found += _parsed(conn, plain, longest)
            if found and isinstance(found[-1], tuple):
                break
        results.append(found)
    assert results[0] == results[1]


def test_write_payload_is_collected_across_reads() -> None:
    conn = transmitting()
    conn.receive_data(request(wire.CMD_WRITE, 10, 6) + b"abc")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"def" + request(wire.CMD_FLUSH, cookie=8))
    first, second = events(conn)
    assert isinstance(first, Request) and first.data == b"abcdef" and first.offset == 10
    assert second == Request(8, wire.CMD_FLUSH, 0, 0, 0)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (request(wire.CMD_READ, MiB - 512, 1024), wire.EINVAL),  # "read ... beyond the size"
        (request(wire.CMD_TRIM, MiB, 1), wire.EINVAL),
        (request(wire.CMD_CACHE, MiB + 1, 0), wire.EINVAL),
        (request(wire.CMD_BLOCK_STATUS, MiB, 512), wire.EINVAL),
        (request(wire.CMD_WRITE_ZEROES, MiB - 1, 2), wire.ENOSPC),  # "write zeroes ... ENOSPC"
        (request(wire.CMD_READ, (1 << 64) - 512, 1024), wire.EINVAL),  # offset + length wraps
        (request(wire.CMD_READ, 0, 32 * MiB + 1), wire.EINVAL),  # over the maximum block size
        (request(99), wire.EINVAL),  # unknown command
        (request(wire.CMD_READ, 0, 512, flags=1 << 9), wire.EINVAL),  # unknown flag
        (request(wire.CMD_WRITE_ZEROES, 0, 512, flags=wire.CMD_FLAG_REQ_ONE), wire.EINVAL),
        (request(wire.CMD_FLUSH, 512, 0), wire.EINVAL),  # "MUST be set to all-zero"
        (request(wire.CMD_BLOCK_STATUS, 0, 512), wire.EINVAL),  # no context selected
    ],
    ids=[
        "read-past-end", "trim-past-end", "cache-past-end", "status-past-end",
        "zero-past-end", "wrapping", "too-long", "unknown", "bad-flag", "flag-not-for-cmd",
        "flush-offset", "status-no-context",
    ],
)  # fmt: skip
def test_requests_the_spec_refuses(header: bytes, error: int) -> None:
    conn = transmitting()
    conn.receive_data(header + request(wire.CMD_FLUSH, cookie=9))
    refused, following = events(conn)
    assert isinstance(refused, RequestError) and refused.error == error and refused.cookie == 7
    assert following == Request(9, wire.CMD_FLUSH, 0, 0, 0)


def test_write_past_the_end_is_enospc_after_its_payload() -> None:
    conn = transmitting()
    conn.receive_data(
        request(wire.CMD_WRITE, MiB - 2, 4) + b"wxyz" + request(wire.CMD_FLUSH, cookie=9)
    )
    refused, following = events(conn)
    assert isinstance(refused, RequestError) and refused.error == wire.ENOSPC
    assert isinstance(following, Request) and following.cookie == 9


def test_structured_only_requests_before_structured_replies_are_einval() -> None:
    conn = transmitting(structured=False)
    conn.receive_data(
        request(wire.CMD_BLOCK_STATUS, 0, 512)
        + request(wire.CMD_READ, 0, 512, flags=wire.CMD_FLAG_DF)
    )
    status, df = events(conn)
    assert isinstance(status, RequestError) and status.error == wire.EINVAL
    assert "structured" in status.message
    assert isinstance(df, RequestError) and df.error == wire.EINVAL


def test_writes_on_a_read_only_export_are_eperm() -> None:
    conn = transmitting(name="ro")
    conn.receive_data(
        request(wire.CMD_WRITE, 0, 2) + b"hi" + request(wire.CMD_TRIM, 0, 512)
        + request(wire.CMD_WRITE_ZEROES, 0, 512) + request(wire.CMD_READ, 0, 512)
    )  # fmt: skip
    found = events(conn)
    assert [getattr(e, "error", 0) for e in found] == [wire.EPERM, wire.EPERM, wire.EPERM, 0]


def test_oversized_write_payload_is_skipped_without_buffering() -> None:
    conn = transmitting()
    length = 32 * MiB + 1
    conn.receive_data(request(wire.CMD_WRITE, 0, length))
    chunk = bytes(1 << 20)
    for _ in range(length // len(chunk)):
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA and conn.buffered == 0
    conn.receive_data(b"\0" + request(wire.CMD_FLUSH, cookie=9))
    refused, following = events(conn)
    assert isinstance(refused, RequestError) and refused.error == wire.EINVAL
    assert isinstance(following, Request) and following.cookie == 9


def test_oversized_write_arriving_whole_is_refused_then_the_next_request_parsed() -> None:
    # "The server SHOULD report an NBD_EINVAL error if ... [the length] is larger
    # than the advertised maximum block size."
    conn = transmitting()
    length = 32 * MiB + 1
    flush = request(wire.CMD_FLUSH, cookie=9)
    conn.receive_data(request(wire.CMD_WRITE, 0, length) + bytes(length) + flush)
    refused, following = events(conn)
    assert isinstance(refused, RequestError) and refused.error == wire.EINVAL
    assert following == Request(9, wire.CMD_FLUSH, 0, 0, 0)
    assert conn.buffered == 0


def read_into(conn: ServerConnection, data: bytes, piece: int) -> None:
    """Feed ``data`` as a socket read into the connection's free space would, in
    reads of at most ``piece`` bytes."""
    while data:
        with conn.receive_buffer() as space:
            n = min(len(space), len(data), piece)
            space[:n] = data[:n]
        conn.received(n)
        data = data[n:]


def test_requests_read_into_the_receive_buffer_in_pieces() -> None:
    conn = transmitting()
    payload = bytes(range(256)) * 16
    read = request(wire.CMD_READ, 8192, 512, cookie=2)
    stream = request(wire.CMD_WRITE, 4096, len(payload), cookie=1) + payload + read
    found: list[object] = []
    for i in range(0, len(stream), 1000):
        read_into(conn, stream[i : i + 1000], 1000)
        found += events(conn)
    assert found == [
        Request(1, wire.CMD_WRITE, 0, 4096, len(payload), payload),
        Request(2, wire.CMD_READ, 0, 8192, 512),
    ]
    assert conn.buffered == 0


def test_a_write_longer_than_the_receive_buffer_is_whole_and_the_buffer_shrinks_back() -> None:
    conn = transmitting()
    payload = bytes(range(251)) * (MiB // 251)
    assert len(payload) > connection.RECEIVE_SIZE
    read_into(conn, request(wire.CMD_WRITE, 0, len(payload)) + payload, 1 << 16)
    assert events(conn) == [Request(7, wire.CMD_WRITE, 0, 0, len(payload), payload)]
    read_into(conn, request(wire.CMD_FLUSH, cookie=9), 1 << 16)
    assert events(conn) == [Request(9, wire.CMD_FLUSH, 0, 0, 0)]
    with conn.receive_buffer() as space:
        assert connection.MIN_FREE <= len(space) <= connection.RECEIVE_SIZE


def test_oversized_write_payload_read_into_the_buffer_is_skipped() -> None:
    conn = transmitting()
    length = 32 * MiB + 1
    read_into(conn, request(wire.CMD_WRITE, 0, length), 1 << 16)
    assert conn.next_event() is NEED_DATA
    chunk = bytes(1 << 20)
    for _ in range(length // len(chunk)):
        read_into(conn, chunk, 1 << 16)
        assert conn.next_event() is NEED_DATA and conn.buffered == 0
    # The payload's last byte and the next request arrive in one read.
    read_into(conn, b"\0" + request(wire.CMD_FLUSH, cookie=9), 1 << 16)
    refused, following = events(conn)
    assert isinstance(refused, RequestError) and refused.error == wire.EINVAL
    assert following == Request(9, wire.CMD_FLUSH, 0, 0, 0)


def test_bad_request_magic_drops_the_connection() -> None:
    conn = transmitting()
    conn.receive_data(struct.pack(">I", 0x12560953) + request(wire.CMD_READ)[4:])
    with pytest.raises(RemoteProtocolError, match="request magic"):
        conn.next_event()


def test_disc_ends_reading() -> None:
    conn = transmitting()
    conn.receive_data(
        request(wire.CMD_READ, 0, 1) + request(wire.CMD_DISC) + request(wire.CMD_READ)
    )
    read, disc = events(conn)
    assert isinstance(read, Request) and disc == Disconnect()
    assert conn.next_event() is NEED_DATA


def test_eof_between_requests_is_clean_and_mid_payload_is_not() -> None:
    conn = transmitting()
    conn.receive_data(b"")
    assert events(conn) == [ConnectionClosed(True, "client closed the connection")]
    conn = transmitting()
    conn.receive_data(request(wire.CMD_WRITE, 0, 100) + bytes(10))
    conn.receive_data(b"")
    (closed,) = events(conn)
    assert isinstance(closed, ConnectionClosed) and not closed.clean
    assert "write payload" in closed.detail


# -- Transmission: replies ------------------------------------------------------------------


def test_simple_replies() -> None:
    conn = transmitting(structured=False)
    assert conn.reply_ok(5) == b"\x67\x44\x66\x98" + bytes(4) + struct.pack(">Q", 5)
    assert conn.reply_error(5, wire.EIO, "ignored") == struct.pack(">IIQ", 0x67446698, 5, 5)
    data = memoryview(b"hello")
    assert conn.reply_read(5, 0, data) == [struct.pack(">IIQ", 0x67446698, 0, 5), data]


def test_structured_error_carries_its_message() -> None:
    conn = transmitting()
    assert conn.reply_error(6, wire.EINVAL, "no") == (
        struct.pack(">IHHQI", 0x668E33EF, 1, 0x8001, 6, 8) + struct.pack(">IH", 22, 2) + b"no"
    )


def test_structured_read_sends_zero_runs_as_holes_on_disk_block_boundaries() -> None:
    conn = transmitting()
    # A read from 1000 of 12288 bytes: disk blocks [1000,4096) data, [4096,12288) zero,
    # [12288,13288) data.
    buf = bytearray(12288)
    buf[0] = 1
    buf[-1] = 2
    out = b"".join(conn.reply_read(3, 1000, memoryview(buf)))
    assert out == (
        struct.pack(">IHHQI", 0x668E33EF, 0, 1, 3, 8 + 3096) + struct.pack(">Q", 1000)
        + bytes(buf[:3096])
        + struct.pack(">IHHQI", 0x668E33EF, 0, 2, 3, 12) + struct.pack(">QI", 4096, 8192)
        + struct.pack(">IHHQI", 0x668E33EF, 1, 1, 3, 8 + 1000) + struct.pack(">Q", 12288)
        + bytes(buf[-1000:])
    )  # fmt: skip


def test_df_read_is_one_content_chunk_with_zeroes_present() -> None:
    conn = transmitting()
    buf = bytes(8192) + b"x"
    out = conn.reply_read(3, 0, memoryview(buf), df=True)
    assert len(out) == 2
    assert out[0] == struct.pack(">IHHQI", 0x668E33EF, 1, 1, 3, 8 + len(buf)) + bytes(8)
    assert bytes(out[1]) == buf
    holes = conn.reply_read(3, 0, memoryview(bytes(8192)), df=True)
    assert holes == [struct.pack(">IHHQI", 0x668E33EF, 1, 2, 3, 12) + struct.pack(">QI", 0, 8192)]


def test_block_status_reply_has_one_chunk_per_context() -> None:
    conn = transmitting(contexts=("base:allocation", "qemu:allocation-depth"))
    out = conn.reply_block_status(
        4,
        [
            ("base:allocation", [(4096, 0), (8192, wire.STATE_HOLE | wire.STATE_ZERO)]),
            ("qemu:allocation-depth", [(12288, 2)]),
        ],
    )
    assert out == (
        struct.pack(">IHHQI", 0x668E33EF, 0, 5, 4, 4 + 16)
        + struct.pack(">IIIII", 1, 4096, 0, 8192, 3)
        + struct.pack(">IHHQI", 0x668E33EF, 1, 5, 4, 4 + 8) + struct.pack(">III", 2, 12288, 2)
    )  # fmt: skip


def test_replies_misused_are_local_errors() -> None:
    conn = negotiating()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)
    conn = transmitting(contexts=("base:allocation",))
    with pytest.raises(LocalProtocolError, match="each selected context"):
        conn.reply_block_status(1, [("qemu:allocation-depth", [(1, 0)])])
    with pytest.raises(LocalProtocolError, match="extent length 0"):
        conn.reply_block_status(1, [("base:allocation", [(0, 0)])])
    with pytest.raises(LocalProtocolError, match="positive"):
        conn.reply_error(1, 0)


def test_read_around_caller_sent_data() -> None:
    """Structured: a data chunk without DONE before the bytes, NONE with DONE after."""
    conn = transmitting()
    head, tail = conn.reply_read_around(7, 4096, 65536)
    assert struct.unpack(">IHHQIQ", head) == (
        wire.STRUCTURED_REPLY_MAGIC, 0, wire.REPLY_TYPE_OFFSET_DATA, 7, 8 + 65536, 4096,
    )  # fmt: skip
    assert struct.unpack(">IHHQI", tail) == (
        wire.STRUCTURED_REPLY_MAGIC, wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_NONE, 7, 0,
    )  # fmt: skip
    simple = transmitting(structured=False)
    head, tail = simple.reply_read_around(9, 0, 65536)
    assert struct.unpack(">IIQ", head) == (wire.SIMPLE_REPLY_MAGIC, 0, 9)
    assert tail == b""


# -- States (addcow.nbd.state) ------------------------------------------------------------


def test_a_session_moves_only_along_the_transition_table() -> None:
    conn = ServerConnection([DISK])
    seen = [conn.state]
    steps = [
        b"\0\0\0\3",
        option(wire.OPT_STRUCTURED_REPLY) + option(wire.OPT_LIST),
        option(wire.OPT_GO, go_data("disk")),
        request(wire.CMD_READ, 0, 512),
        request(wire.CMD_DISC),
    ]
    conn.initiate()
    seen.append(conn.state)
    for data in steps:
        conn.receive_data(data)
        events(conn)
        seen.append(conn.state)
    assert seen == [
        State.GREETING, State.CLIENT_FLAGS, State.OPTIONS, State.OPTIONS,
        State.TRANSMISSION, State.TRANSMISSION, State.DONE,
    ]  # fmt: skip
    moves = {(a, b) for a, b in itertools.pairwise(seen) if a is not b}
    assert moves <= {(a, b) for a, table in TRANSITIONS.items() for b in table.values()}


def test_the_peer_can_end_every_state_that_reads_and_nothing_leaves_done() -> None:
    # "If either the client or the server detects a violation of a mandatory
    # condition ('MUST' etc.) by the other party, it MAY initiate a hard disconnect."
    for state in (State.CLIENT_FLAGS, State.OPTIONS, State.TRANSMISSION):
        assert TRANSITIONS[state][Trigger.PEER_ERROR] is State.DONE
        assert TRANSITIONS[state][Trigger.CLOSED] is State.DONE
    assert TRANSITIONS[State.DONE] == {}
    entering = {t for table in TRANSITIONS.values() for t, b in table.items()
                if b is State.TRANSMISSION}  # fmt: skip
    assert entering == {Trigger.EXPORT_NAME, Trigger.GO}


def test_state_changes_only_through_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = negotiating()
    with pytest.raises(AttributeError):
        conn.state = State.TRANSMISSION  # type: ignore[misc]
    # Take ABORT out of the table: the connection must now refuse to take it.
    monkeypatch.delitem(TRANSITIONS[State.OPTIONS], Trigger.ABORT)
    conn.receive_data(option(wire.OPT_ABORT))
    with pytest.raises(LocalProtocolError, match="NBD_OPT_ABORT in state options"):
        conn.next_event()


def test_entering_done_drops_what_is_buffered() -> None:
    conn = transmitting()
    conn.receive_data(request(wire.CMD_DISC) + request(wire.CMD_READ, 0, 512) + b"tail")
    assert events(conn) == [Disconnect()]
    assert conn.state is State.DONE and conn.buffered == 0
    conn = negotiating()
    conn.receive_data(option(wire.OPT_LIST).replace(b"IHAVEOPT", b"IHAVEOPX") + bytes(100))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.DONE and conn.buffered == 0


# -- Layout (addcow.nbd.wire) -------------------------------------------------------------


def test_wire_records_have_the_sizes_of_proto_md() -> None:
    sizes = {
        wire.GREETING: 8 + 8 + 2,  # NBDMAGIC, IHAVEOPT, handshake flags
        wire.CLIENT_FLAGS: 4,
        wire.OPTION_HEADER: 8 + 4 + 4,  # IHAVEOPT, option, length
        wire.OPTION_REPLY_HEADER: 8 + 4 + 4 + 4,  # magic, option, reply type, length
        wire.EXPORT_NAME_REPLY: 8 + 2,  # size, transmission flags
        wire.INFO_EXPORT_PAYLOAD: 12,  # "length MUST be 12"
        wire.INFO_BLOCK_SIZE_PAYLOAD: 14,  # "length MUST be 14"
        wire.REQUEST_HEADER: 4 + 2 + 2 + 8 + 8 + 4,
        wire.SIMPLE_REPLY_HEADER: 4 + 4 + 8,
        wire.CHUNK_HEADER: 4 + 2 + 2 + 8 + 4,
        wire.OFFSET_DATA_PAYLOAD: 8,
        wire.OFFSET_HOLE_PAYLOAD: 12,  # OFFSET_HOLE: "length MUST be exactly 12"
        wire.ERROR_PAYLOAD: 4 + 2,
        wire.BLOCK_STATUS_DESCRIPTOR: 4 + 4,
    }
    assert {record.format: record.size for record in sizes} == {
        record.format: size for record, size in sizes.items()
    }
    assert len(wire.EXPORT_NAME_ZEROES) == 124 and not any(wire.EXPORT_NAME_ZEROES)
    # The headroom of reply_read_into holds a chunk header and its offset, and a
    # simple reply's header fits in it too.
    assert wire.READ_HEADROOM == 28 >= wire.SIMPLE_REPLY_HEADER.size


def test_the_layout_is_exported_by_wire_alone() -> None:
    # One home for every constant: the protocol's modules export only their own names.
    names = {name for name in vars(wire) if name.isupper()}
    assert len(names) > 80
    for module in (connection, nbd_events, negotiation, transmission):
        exported = set(module.__all__)
        assert not exported & names, module.__name__
        assert all(hasattr(module, name) for name in exported), module.__name__
