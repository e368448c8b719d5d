"""The server side of the NBD protocol as a state machine that never touches a socket.

Quotes marked "proto.md" are from the NetworkBlockDevice project's
``doc/proto.md``, the protocol's specification.

Use
    ::

        conn = ServerConnection(exports)          # exports[0] is the default export
        send(conn.initiate())                     # the greeting
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                send(conn.data_to_send())         # option replies, if any
                conn.receive_data(recv())         # b"" means the peer closed
                continue
            ...                                   # act on the event

    The handshake is the protocol's business: the connection answers every
    option itself from the export table it was given, queues the replies
    (taken with :meth:`ServerConnection.data_to_send`) and reports only what
    the server must act on. In the transmission phase each command arrives as
    a :class:`Request` (already checked: range, flags, permissions) or a
    :class:`RequestError` (refused; the server sends
    :meth:`ServerConnection.reply_error`). Replies are built by methods that
    return bytes (or a list of buffers, so a read's data is never copied);
    the server may send them in any order, as the protocol allows.

States
    ::

        GREETING --initiate()--> CLIENT_FLAGS --4 bytes--> OPTIONS
        OPTIONS --EXPORT_NAME / GO ack--> TRANSMISSION --NBD_CMD_DISC--> DONE
        OPTIONS --ABORT--> DONE        any state --peer error / EOF--> DONE

    The table of these moves is :data:`addcow.nbd.state.TRANSITIONS`; every
    change of :attr:`ServerConnection.state` goes through it
    (:meth:`ServerConnection._enter`), and entering DONE drops whatever was
    buffered or still to be skipped.

Layout
    Magics, numbers, limits and the struct of every record are in
    :mod:`addcow.nbd.wire`; this module builds and parses messages with them.

Errors
    ::

        AddCowError
        +-- ProtocolError              root of this module's errors
            +-- RemoteProtocolError    the peer broke a MUST and the spec lets (or
            |                          makes) us hang up: close the connection
            +-- LocalProtocolError     the server called this API wrongly (a bug)

    Requests the peer gets wrong but that the spec answers with an error reply
    (a range past the end, an unknown command, a write on a read-only export)
    are not exceptions: they are :class:`RequestError` events or option error
    replies, and the connection goes on. Nothing here uses ``assert`` on peer
    data; every length is checked before it is used.

Memory
    Option payloads over :data:`MAX_OPTION_DATA` and write payloads over the
    export's maximum block size are skipped as they arrive, never buffered,
    and answered with an error (both by :meth:`ServerConnection._skip_payload`);
    so the buffer holds at most one option or one request with its payload,
    plus what the server read beyond it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .. import zeros
from ..errors import AddCowError
from .state import TRANSITIONS, State, Trigger
from .wire import (
    BLOCK_STATUS_DESCRIPTOR,
    CHUNK_HEADER,
    CLIENT_FLAGS,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    COMMAND_NAMES,
    CONTEXT_ALLOCATION_DEPTH,
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_IDS,
    DEFAULT_MAX_BLOCK,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    EINVAL,
    EIO,
    ENOMEM,
    ENOSPC,
    ENOTSUP,
    EOVERFLOW,
    EPERM,
    ERROR_PAYLOAD,
    ESHUTDOWN,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    FLAG_ROTATIONAL,
    FLAG_SEND_CACHE,
    FLAG_SEND_DF,
    FLAG_SEND_FAST_ZERO,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_RESIZE,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_PAYLOAD,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_EXPORT_PAYLOAD,
    INFO_NAME,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_STRING,
    NBDMAGIC,
    OFFSET_DATA_PAYLOAD,
    OFFSET_HOLE_PAYLOAD,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_PEEK_EXPORT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    READ_HEADROOM,
    REP_ACK,
    REP_ERR_BLOCK_SIZE_REQD,
    REP_ERR_INVALID,
    REP_ERR_PLATFORM,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
)

__all__ = [
    "NEED_DATA",
    "AbortRequested",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "LocalProtocolError",
    "OptionRefused",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "RequestError",
    "ServerConnection",
    "State",
    "TransmissionStarted",
]
# The wire constants, importable from here as well as from addcow.nbd.wire.
__all__ += [
    "CMD_BLOCK_STATUS",
    "CMD_CACHE",
    "CMD_DISC",
    "CMD_FLAG_DF",
    "CMD_FLAG_FAST_ZERO",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "CMD_FLUSH",
    "CMD_READ",
    "CMD_TRIM",
    "CMD_WRITE",
    "CMD_WRITE_ZEROES",
    "COMMAND_NAMES",
    "CONTEXT_ALLOCATION_DEPTH",
    "CONTEXT_BASE_ALLOCATION",
    "CONTEXT_IDS",
    "DEFAULT_MAX_BLOCK",
    "DEFAULT_MIN_BLOCK",
    "DEFAULT_PREFERRED_BLOCK",
    "EINVAL",
    "EIO",
    "ENOMEM",
    "ENOSPC",
    "ENOTSUP",
    "EOVERFLOW",
    "EPERM",
    "ESHUTDOWN",
    "FLAG_CAN_MULTI_CONN",
    "FLAG_C_FIXED_NEWSTYLE",
    "FLAG_C_NO_ZEROES",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_HAS_FLAGS",
    "FLAG_NO_ZEROES",
    "FLAG_READ_ONLY",
    "FLAG_ROTATIONAL",
    "FLAG_SEND_CACHE",
    "FLAG_SEND_DF",
    "FLAG_SEND_FAST_ZERO",
    "FLAG_SEND_FLUSH",
    "FLAG_SEND_FUA",
    "FLAG_SEND_RESIZE",
    "FLAG_SEND_TRIM",
    "FLAG_SEND_WRITE_ZEROES",
    "IHAVEOPT",
    "INFO_BLOCK_SIZE",
    "INFO_DESCRIPTION",
    "INFO_EXPORT",
    "INFO_NAME",
    "MAX_OPTIONS",
    "MAX_OPTION_DATA",
    "MAX_STRING",
    "NBDMAGIC",
    "OPT_ABORT",
    "OPT_EXPORT_NAME",
    "OPT_GO",
    "OPT_INFO",
    "OPT_LIST",
    "OPT_LIST_META_CONTEXT",
    "OPT_PEEK_EXPORT",
    "OPT_REPLY_MAGIC",
    "OPT_SET_META_CONTEXT",
    "OPT_STARTTLS",
    "OPT_STRUCTURED_REPLY",
    "READ_HEADROOM",
    "REPLY_FLAG_DONE",
    "REPLY_TYPE_BLOCK_STATUS",
    "REPLY_TYPE_ERROR",
    "REPLY_TYPE_ERROR_OFFSET",
    "REPLY_TYPE_NONE",
    "REPLY_TYPE_OFFSET_DATA",
    "REPLY_TYPE_OFFSET_HOLE",
    "REP_ACK",
    "REP_ERR_BLOCK_SIZE_REQD",
    "REP_ERR_INVALID",
    "REP_ERR_PLATFORM",
    "REP_ERR_POLICY",
    "REP_ERR_SHUTDOWN",
    "REP_ERR_TLS_REQD",
    "REP_ERR_TOO_BIG",
    "REP_ERR_UNKNOWN",
    "REP_ERR_UNSUP",
    "REP_INFO",
    "REP_META_CONTEXT",
    "REP_SERVER",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRUCTURED_REPLY_MAGIC",
]

# -- errors ----------------------------------------------------------------------------


class ProtocolError(AddCowError):
    """Root of the NBD protocol errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol in a way that ends the connection."""


class LocalProtocolError(ProtocolError):
    """The server used :class:`ServerConnection` wrongly."""


# -- exports and events ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the protocol needs to know about one export."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_block: int = DEFAULT_MAX_BLOCK

    def transmission_flags(self, structured: bool) -> int:
        """The 16 transmission flags, set only for what the server really does."""
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE
        # One image shared by every connection, flushed as a whole: "the effects
        # of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible across all
        # connections when the server sends its reply".
        flags |= FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO
        # "MUST leave this flag clear if structured replies have not been negotiated"
        if structured:
            flags |= FLAG_SEND_DF
        return flags


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`ServerConnection.next_event` when it needs more bytes."""


@dataclass(frozen=True)
class OptionRefused:
    """An option answered with an error reply (worth a log line); haggling goes on."""

    option: int
    reply: int
    message: str


@dataclass(frozen=True)
class AbortRequested:
    """NBD_OPT_ABORT: the ack is queued; send it and close."""


@dataclass(frozen=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: send what is queued, run the TLS handshake
    on the socket, then call :meth:`ServerConnection.tls_started`."""


@dataclass(frozen=True)
class TransmissionStarted:
    """The handshake is over; requests for ``export`` follow."""

    export: ExportInfo
    flags: int
    structured: bool
    contexts: tuple[str, ...]


class Request(NamedTuple):
    """A valid command. ``data`` is the payload of a WRITE, else None.

    Immutable like the other events, but a NamedTuple: one is built for every
    request, and a tuple is the cheapest immutable record to build.
    """

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: bytes | None = None

    def __repr__(self) -> str:
        payload = "" if self.data is None else f", data=<{len(self.data)} bytes>"
        return (
            f"Request(cookie={self.cookie}, command={self.command}, flags={self.flags}, "
            f"offset={self.offset}, length={self.length}{payload})"
        )


@dataclass(frozen=True)
class RequestError:
    """A command refused as the spec prescribes; send ``reply_error`` for it."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    error: int
    message: str


@dataclass(frozen=True)
class Disconnect:
    """NBD_CMD_DISC: finish outstanding requests, then close."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its end. ``clean`` is False in the middle of a message."""

    clean: bool
    detail: str


Event = (
    OptionRefused
    | AbortRequested
    | StartTLS
    | TransmissionStarted
    | Request
    | RequestError
    | Disconnect
    | ConnectionClosed
)


# Command flags each command accepts. "NBD_CMD_FLAG_FUA; This flag is valid for
# all commands, provided NBD_FLAG_SEND_FUA has been negotiated".
_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}
_WRITING = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


TLS_OFF, TLS_ON, TLS_REQUIRE = "off", "on", "require"
TLS_MODES = (TLS_OFF, TLS_ON, TLS_REQUIRE)
"""``off``: no STARTTLS (NOTLS); ``on``: offered, not needed; ``require``: FORCEDTLS."""

_TLS_REQUIRED = "TLS is required: send NBD_OPT_STARTTLS first"


class _Option(Exception):
    """Internal: end an option with an error reply."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class ServerConnection:
    """One NBD connection, server side, without I/O."""

    def __init__(self, exports: Sequence[ExportInfo], *, tls: str = TLS_OFF) -> None:
        if not exports:
            raise LocalProtocolError("a server needs at least one export")
        if tls not in TLS_MODES:
            raise LocalProtocolError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        self.exports = tuple(exports)
        self.tls_mode = tls
        self.tls_active = False
        self.fixed_newstyle = False
        self._state = State.GREETING
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.flags = 0
        self.contexts: tuple[str, ...] = ()
        self._meta_export: ExportInfo | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._options_seen = 0
        # A message whose payload is being skipped rather than buffered:
        # (bytes still to skip, event to return when done).
        self._skip = 0
        self._after_skip: Event | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the connection is; it moves only as :data:`~addcow.nbd.state.TRANSITIONS` says."""
        return self._state

    def _enter(self, trigger: Trigger) -> None:
        """Take the move the table gives for ``trigger``; one it lacks is a bug of the caller.

        Entering DONE drops what is buffered and what was still to be skipped:
        nothing more is read.
        """
        target = TRANSITIONS[self._state].get(trigger)
        if target is None:
            raise LocalProtocolError(
                f"{trigger.value} in state {self._state.value}: no such transition"
            )
        self._state = target
        if target is State.DONE:
            self._buf.clear()
            self._skip = 0

    # -- input -------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The server's greeting: fixed newstyle, with NO_ZEROES offered."""
        self._enter(Trigger.GREETING)
        return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; an empty ``data`` means it closed its end."""
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return
        if self._state is State.DONE:
            return  # after DISC or ABORT nothing more is read
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed."""
        return len(self._buf)

    def data_to_send(self) -> bytes:
        """Replies the handshake queued (option replies), emptied by this call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA; raises RemoteProtocolError to hang up."""
        if self._skip:
            return self._need()
        if self._after_skip is not None:
            event, self._after_skip = self._after_skip, None
            return event
        if self._state is State.TRANSMISSION:
            return self._next_request()
        if self._state is State.OPTIONS:
            return self._next_option()
        if self._state is State.CLIENT_FLAGS:
            return self._client_flags()
        if self._state is State.TLS_HANDSHAKE:
            return NEED_DATA  # the TLS layer reads the socket until tls_started()
        if self._state is State.DONE:
            return NEED_DATA if not self._eof else ConnectionClosed(True, "connection closed")
        raise LocalProtocolError("next_event() before initiate()")

    def _need(self, what: str = "") -> Event | _NeedData:
        if not self._eof:
            return NEED_DATA
        clean = not self._buf and not self._skip and not what
        detail = "client closed the connection"
        if not clean:
            detail += f" in the middle of {what or 'a message'}"
        self._enter(Trigger.CLOSED)
        return ConnectionClosed(clean, detail)

    def _fail(self, message: str) -> RemoteProtocolError:
        self._enter(Trigger.PEER_ERROR)
        return RemoteProtocolError(message)

    def _skip_payload(self, header: int, length: int, event: Event, what: str) -> Event | _NeedData:
        """Drop a refused message: its ``header`` bytes, then its ``length``-byte payload.

        The payload is discarded as it arrives (:meth:`receive_data`), never
        buffered; ``event`` is returned once the last of it is gone.
        """
        del self._buf[:header]
        skipped = min(length, len(self._buf))
        del self._buf[:skipped]
        self._skip = length - skipped
        if self._skip:
            self._after_skip = event
            return self._need(what)
        return event

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:  # one copy (a bytearray slice would be two)
            chunk = bytes(view[:n])
        del self._buf[:n]
        return chunk

    # -- handshake ----------------------------------------------------------------------

    def _client_flags(self) -> Event | _NeedData:
        if len(self._buf) < CLIENT_FLAGS.size:
            return self._need("the client flags" if self._buf else "")
        (flags,) = CLIENT_FLAGS.unpack(self._take(CLIENT_FLAGS.size))
        # "the server MUST drop the TCP connection if the client sets an unknown
        # flag, or a flag that does not match something advertised by the server."
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            raise self._fail(f"client flags {flags:#x} set unknown bits {unknown:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self._enter(Trigger.CLIENT_FLAGS)
        return self.next_event()

    def _next_option(self) -> Event | _NeedData:
        if len(self._buf) < OPTION_HEADER.size:
            return self._need("an option header" if self._buf else "")
        magic, option, length = OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise self._fail(f"option magic {magic:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}")
        if self._options_seen >= MAX_OPTIONS:
            raise self._fail(f"more than {MAX_OPTIONS} options without entering transmission")
        if option == OPT_EXPORT_NAME and self._tls_required():
            # "If the server receives a request to enter transmission mode via
            # NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this
            # request cannot error, it MUST terminate the session."
            raise self._fail("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (TLS is required)")
        if option == OPT_EXPORT_NAME and length > MAX_STRING:
            # EXPORT_NAME cannot be answered with an error: "If the chosen export
            # does not exist or requirements ... are not met ..., the server MUST
            # terminate the session."
            raise self._fail(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
        if length > MAX_OPTION_DATA:
            self._options_seen += 1
            # Skip the payload as it arrives; "NBD_REP_ERR_TOO_BIG: The request or
            # the reply is too large to process."
            reply = REP_ERR_TOO_BIG
            message = f"option {option} carries {length} bytes; the limit is {MAX_OPTION_DATA}"
            if self._tls_required() and option not in (OPT_STARTTLS, OPT_ABORT):
                reply, message = REP_ERR_TLS_REQD, _TLS_REQUIRED
            self._reply(option, reply, message.encode())
            event = OptionRefused(option, reply, message)
            return self._skip_payload(
                OPTION_HEADER.size, length, event, "an oversized option payload"
            )
        if len(self._buf) < OPTION_HEADER.size + length:
            return self._need("an option payload")
        del self._buf[: OPTION_HEADER.size]
        data = self._take(length)
        self._options_seen += 1
        try:
            return self._option(option, data)
        except _Option as refusal:
            self._reply(option, refusal.reply, refusal.message.encode())
            return OptionRefused(option, refusal.reply, refusal.message)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _tls_required(self) -> bool:
        return self.tls_mode == TLS_REQUIRE and not self.tls_active

    def _option(self, option: int, data: bytes) -> Event | _NeedData:
        # FORCEDTLS: "If the server receives any other option, including
        # NBD_OPT_INFO and unsupported options, it MUST reply with
        # NBD_REP_ERR_TLS_REQD if TLS has not been initiated" (other than
        # STARTTLS and ABORT; EXPORT_NAME, which cannot error, is handled before).
        if self._tls_required() and option not in (OPT_STARTTLS, OPT_ABORT):
            raise _Option(REP_ERR_TLS_REQD, _TLS_REQUIRED)
        if option == OPT_STARTTLS:
            return self._opt_starttls(data)
        if option == OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if option == OPT_ABORT:
            # "The server MUST reply with NBD_REP_ACK." "a server SHOULD ignore any
            # data sent by the client rather than rejecting the request".
            self._reply(option, REP_ACK)
            self._enter(Trigger.ABORT)
            return AbortRequested()
        if option == OPT_LIST:
            # "The client MUST NOT send any additional data with the option, and
            # the server SHOULD reject a request that includes data with
            # NBD_REP_ERR_INVALID."
            if data:
                raise _Option(REP_ERR_INVALID, "NBD_OPT_LIST carries no data")
            for export in self.exports:
                # "32 bits, length of name; String, name of the export; If length of
                # name < (reply packet header length - 4), then the rest of the data
                # ... [is] a string suitable for direct display to a human being."
                name = export.name.encode()
                text = _truncate_utf8(export.description, MAX_STRING)
                self._reply(option, REP_SERVER, U32.pack(len(name)) + name + text)
            self._reply(option, REP_ACK)
            return self.next_event()
        if option in (OPT_INFO, OPT_GO):
            return self._opt_info_go(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                raise _Option(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
            self.structured = True
            self._reply(option, REP_ACK)
            return self.next_event()
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            return self._opt_meta_context(option, data)
        # "Servers that receive messages which they do not implement MUST reply
        # to them with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next
        # message".
        raise _Option(REP_ERR_UNSUP, f"option {option} is not supported")

    def _opt_starttls(self, data: bytes) -> Event | _NeedData:
        if self.tls_mode == TLS_OFF or not self.fixed_newstyle:
            # NOTLS ("The server MUST operate in NOTLS mode unless ... the client
            # replied with NBD_FLAG_C_FIXED_NEWSTYLE"): "If the server receives
            # NBD_OPT_STARTTLS it MUST respond with ... NBD_REP_ERR_UNSUP (if it
            # does not support the NBD_OPT_STARTTLS option at all)".
            raise _Option(REP_ERR_UNSUP, "TLS is not offered on this connection")
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been
            # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
            raise _Option(REP_ERR_INVALID, "TLS is already active")
        if data:
            # "The client MUST NOT send any additional data with the option."
            raise _Option(REP_ERR_INVALID, "NBD_OPT_STARTTLS carries no data")
        if self._buf:
            # "After an NBD_REP_ACK reply has been sent, ... all further data MUST
            # be sent and received over TLS": plain bytes already sent after the
            # option can only be a broken client (or an attacker's injection).
            raise self._fail("data after NBD_OPT_STARTTLS before the TLS handshake")
        self._reply(OPT_STARTTLS, REP_ACK)
        self._enter(Trigger.STARTTLS)
        return StartTLS()

    def tls_started(self) -> None:
        """The TLS handshake is done: negotiation starts again, from nothing.

        "When this command succeeds, the server MUST NOT preserve any
        negotiation state (such as a request for NBD_OPT_STRUCTURED_REPLY, or
        metadata contexts from NBD_OPT_SET_META_CONTEXT) issued before this
        command."
        """
        self._enter(Trigger.TLS_STARTED)
        self.tls_active = True
        self.structured = False
        self.contexts = ()
        self._meta_export = None

    def _find_export(self, name: str) -> ExportInfo | None:
        # 'A special, "empty", name ... is reserved for a "default" export'.
        if name == "":
            return self.exports[0]
        for export in self.exports:
            if export.name == name:
                return export
        return None

    def _opt_export_name(self, data: bytes) -> Event:
        try:
            name = _decode_string(data, "export name")
        except _Option as exc:
            raise self._fail(f"NBD_OPT_EXPORT_NAME: {exc.message}") from None
        export = self._find_export(name)
        if export is None:
            raise self._fail(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        flags = export.transmission_flags(self.structured)
        # "S: 64 bits, size ... S: 16 bits, transmission flags, S: 124 bytes, zeroes
        # (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)"
        self._out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += EXPORT_NAME_ZEROES
        return self._start(Trigger.EXPORT_NAME, export, flags)

    def _start(self, trigger: Trigger, export: ExportInfo, flags: int) -> Event:
        self._enter(trigger)
        self.export = export
        self.flags = flags
        # Contexts count only if "the final time it was sent, it referred to the
        # same export name that was ultimately selected for transmission phase".
        if self._meta_export is not export or not self.structured:
            self.contexts = ()
        return TransmissionStarted(export, flags, self.structured, self.contexts)

    def _opt_info_go(self, option: int, data: bytes) -> Event | _NeedData:
        # "32 bits, length of name (unsigned); MUST be no larger than the option
        # data length - 6; String: name of the export; 16 bits, number of
        # information requests; 16 bits x n - list of NBD_INFO information requests"
        reader = _Reader(data)
        name = reader.string("export name", min_rest=2)
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)] if reader.left == 2 * count else None
        if requests is None or reader.left:
            raise _Option(REP_ERR_INVALID, "information request list does not match the length")
        export = self._find_export(name)
        if export is None:
            # "NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server."
            raise _Option(REP_ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(self.structured)
        self._reply(option, REP_INFO, INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, export.size, flags))
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, U16.pack(INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests and export.description:
            text = export.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, U16.pack(INFO_DESCRIPTION) + text)
        # Sent whether asked or not: our maximum is below the default "effectively
        # unlimited", so "The server MUST send this info if it is requested and it
        # intends to enforce block size constraints other than the defaults".
        self._reply(
            option,
            REP_INFO,
            INFO_BLOCK_SIZE_PAYLOAD.pack(
                INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._start(Trigger.GO, export, flags)
        return self.next_event()

    def _opt_meta_context(self, option: int, data: bytes) -> Event | _NeedData:
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata contexts
            # (including when this command fails)".
            self.contexts = ()
            self._meta_export = None
        # "This option MUST NOT be requested unless structured replies have been
        # negotiated first. If a client attempts to do so, a server SHOULD send
        # NBD_REP_ERR_INVALID."
        if not self.structured:
            raise _Option(REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
        # "32 bits, length of export name; String, name of export; 32 bits, number
        # of queries; Zero or more queries, each being: 32 bits, length of query;
        # String, query"
        reader = _Reader(data)
        name = reader.string("export name", min_rest=4)
        count = reader.u32()
        queries = []
        for _ in range(count):
            if reader.left < 4:
                raise _Option(REP_ERR_INVALID, "query list is longer than the option")
            queries.append(reader.string("query"))
        if reader.left:
            raise _Option(REP_ERR_INVALID, f"{reader.left} bytes after the last query")
        export = self._find_export(name)
        if export is None:
            raise _Option(REP_ERR_UNKNOWN, f"no export named {name!r}")
        found: list[str] = []
        if not queries and not setting:
            # "If zero queries are sent, then the server MUST return all the
            # metadata contexts that are available"; for SET: "the server MUST
            # select no metadata contexts."
            found = list(CONTEXT_IDS)
        for query in queries:
            namespace, colon, leaf = query.partition(":")
            if not colon:
                raise _Option(REP_ERR_INVALID, f"query {query!r} has no namespace")
            for context in CONTEXT_IDS:
                ns, _, ctx_leaf = context.partition(":")
                # "base:" is a wildcard for LIST and "the server MUST ignore this
                # form during NBD_OPT_SET_META_CONTEXT"; unknown leaves and
                # namespaces are ignored, not errors.
                wanted = leaf == ctx_leaf or (leaf == "" and not setting)
                if ns == namespace and wanted and context not in found:
                    found.append(context)
        for context in found:
            context_id = CONTEXT_IDS[context] if setting else 0
            self._reply(option, REP_META_CONTEXT, U32.pack(context_id) + context.encode())
        self._reply(option, REP_ACK)
        if setting:
            self.contexts = tuple(found)
            self._meta_export = export
        return self.next_event()

    # -- transmission -----------------------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        if len(self._buf) < REQUEST_HEADER.size:
            return self._need("a request header" if self._buf else "")
        magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            # No length to skip by: the stream cannot be resynchronised.
            raise self._fail(f"request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}")
        export = self.export
        if export is None:  # pragma: no cover - set whenever state is TRANSMISSION
            raise LocalProtocolError("transmission without an export")
        data: bytes | None = None
        if command == CMD_WRITE:
            if length > export.max_block:
                # Refused, but the payload still follows: skip it without buffering.
                message = f"{length} bytes is over the maximum block size {export.max_block}"
                event = self._refuse(cookie, command, flags, offset, length, EINVAL, message)
                return self._skip_payload(
                    REQUEST_HEADER.size, length, event, "an oversized write payload"
                )
            if len(self._buf) < REQUEST_HEADER.size + length:
                return self._need("a write payload")
            del self._buf[: REQUEST_HEADER.size]
            data = self._take(length)
        else:
            del self._buf[: REQUEST_HEADER.size]
        if command == CMD_DISC:
            # "The server MUST handle all outstanding requests ... and close".
            self._enter(Trigger.DISC)
            return Disconnect()
        problem = self._check(export, command, flags, offset, length)
        if problem is not None:
            return self._refuse(cookie, command, flags, offset, length, *problem)
        return Request(cookie, command, flags, offset, length, data)

    def _refuse(
        self,
        cookie: int,
        command: int,
        flags: int,
        offset: int,
        length: int,
        error: int,
        message: str,
    ) -> RequestError:
        name = COMMAND_NAMES.get(command, f"command {command}")
        return RequestError(cookie, command, flags, offset, length, error, f"{name}: {message}")

    def _check(
        self, export: ExportInfo, command: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """The error a request gets, per proto.md "Error values", or None."""
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return EINVAL, "unknown command"
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command
        # flag. It also SHOULD return NBD_EINVAL if it receives a request with a
        # flag not explicitly documented as applicable to the given request."
        if not self.flags & FLAG_SEND_DF:
            allowed &= ~CMD_FLAG_DF
        if self.flags & FLAG_READ_ONLY:
            allowed &= ~CMD_FLAG_FAST_ZERO
        if flags & ~allowed:
            return EINVAL, f"flags {flags:#x} not valid for this command"
        # "it SHOULD return NBD_EPERM if it receives a write or trim request on a
        # read-only export."
        if command in _WRITING and export.read_only:
            return EPERM, "the export is read-only"
        if command == CMD_BLOCK_STATUS:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending
            # NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            if not self.structured:
                return EINVAL, "needs structured replies (NBD_OPT_STRUCTURED_REPLY)"
            if not self.contexts:
                return EINVAL, "no metadata context was selected"
            if length == 0:
                return EINVAL, "length 0 (a reply needs at least one extent)"
        if command == CMD_FLUSH:
            # "For a flush request, length and offset are reserved, and MUST be set
            # to all-zero."
            if offset or length:
                return EINVAL, "offset and length must be zero"
            return None
        if offset + length > export.size:
            where = f"{length} bytes at offset {offset} go past the end ({export.size})"
            # "The server SHOULD return NBD_ENOSPC if it receives a write request
            # including one or more sectors beyond the size of the device. ... It
            # SHOULD return NBD_EINVAL if it receives a read or trim request
            # including one or more sectors beyond the size of the device"; write
            # zeroes: "SHOULD return NBD_ENOSPC"; block status: "SHOULD return
            # NBD_EINVAL".
            if command in (CMD_WRITE, CMD_WRITE_ZEROES):
                return ENOSPC, where
            return EINVAL, where
        # "for NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE and NBD_CMD_WRITE_ZEROES
        # (except for when NBD_CMD_FLAG_FAST_ZERO is set), the client MUST NOT use a
        # length larger than any advertised maximum block size. The server SHOULD
        # report an NBD_EINVAL error if ... [it] is larger than the advertised
        # maximum block size." Write zeroes carries no payload, so we serve any
        # length of it (the limit protects memory, which zeroing does not use).
        if command in (CMD_READ, CMD_CACHE) and length > export.max_block:
            return EINVAL, f"{length} bytes is over the maximum block size {export.max_block}"
        # EOVERFLOW: "A server MAY reject a client's request with the error
        # NBD_EOVERFLOW if the length is too large to send without fragmentation".
        # A DF read up to the maximum block size is always sent whole, and longer
        # reads are refused above with EINVAL, so EOVERFLOW is never needed.
        if offset % export.min_block or length % export.min_block:
            return EINVAL, f"not aligned to the minimum block size {export.min_block}"
        return None

    # -- replies ------------------------------------------------------------------------------

    def _check_transmission(self) -> None:
        if self.export is None:
            raise LocalProtocolError("replies exist only in the transmission phase")

    def reply_ok(self, cookie: int) -> bytes:
        """Success without data (any command but READ and BLOCK_STATUS)."""
        self._check_transmission()
        # "If structured replies have been negotiated, a simple reply MAY be used
        # as a reply to any request other than NBD_CMD_READ, but only if the reply
        # has no data payload."
        return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply; with structured replies it carries ``message``."""
        self._check_transmission()
        if error <= 0 or error > 0xFFFFFFFF:
            raise LocalProtocolError(f"error value {error} is not a positive 32-bit number")
        if not self.structured:
            # Simple reply: "If it chooses not to [disconnect], it MUST NOT send any
            # payload for this request."
            return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        # "The server SHOULD prefer sending errors via a structured reply, as the
        # error can then be accompanied by a string payload"; "MUST NOT use a
        # simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL)".
        # "message length MUST NOT exceed the 4096 bytes string length limit".
        text = _truncate_utf8(message, MAX_STRING)
        payload = ERROR_PAYLOAD.pack(error, len(text)) + text
        return (
            CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)
            )
            + payload
        )

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: memoryview,
        *,
        df: bool = False,
        base: bytearray | None = None,
    ) -> list[bytes | memoryview]:
        """The reply to a successful READ of ``data`` at ``offset``, as buffers.

        With structured replies, runs of zeros (:func:`addcow.zeros.segments`)
        become OFFSET_HOLE chunks; with ``df`` (NBD_CMD_FLAG_DF) at most one
        content chunk is sent.
        """
        self._check_transmission()
        if not self.structured:
            return [SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        length = len(data)
        if length == 0:
            return [
                CHUNK_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
                )
            ]
        if df or length < zeros.GRANULE:
            # "If the area being read contains both data and a hole, the server MUST
            # use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present."
            runs = [(0, length, zeros.is_zero(_whole(data), 0, length))]
        elif base is not None:
            # data is base[READ_HEADROOM:][:length]: scan it there, without a copy.
            runs = zeros.segments(base, READ_HEADROOM, length, offset)
        else:
            runs = zeros.segments(_whole(data), 0, length, offset)
        out: list[bytes | memoryview] = []
        last = len(runs) - 1
        for i, (lo, hi, zero) in enumerate(runs):
            # Everything is in memory, so no error can follow the last chunk: it
            # may carry DONE ("MUST NOT do so for a content chunk if it would still
            # be possible to detect an error while transmitting the chunk").
            flags = REPLY_FLAG_DONE if i == last else 0
            if zero:
                out.append(
                    CHUNK_HEADER.pack(
                        STRUCTURED_REPLY_MAGIC,
                        flags,
                        REPLY_TYPE_OFFSET_HOLE,
                        cookie,
                        OFFSET_HOLE_PAYLOAD.size,
                    )
                    + OFFSET_HOLE_PAYLOAD.pack(offset + lo, hi - lo)
                )
            else:
                out.append(
                    CHUNK_HEADER.pack(
                        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + hi - lo
                    )
                    + OFFSET_DATA_PAYLOAD.pack(offset + lo)
                )
                out.append(data[lo:hi])
        return out

    def reply_read_into(
        self, buf: bytearray, cookie: int, offset: int, length: int, *, df: bool = False
    ) -> list[bytes | memoryview]:
        """:meth:`reply_read` for data already read into ``buf[READ_HEADROOM:][:length]``.

        When the reply is one chunk (the usual case for data) its header is
        written into the headroom, so the reply is one buffer: a view of ``buf``.
        """
        self._check_transmission()
        end = READ_HEADROOM + length
        view = memoryview(buf)
        if not self.structured:
            start = READ_HEADROOM - SIMPLE_REPLY_HEADER.size
            SIMPLE_REPLY_HEADER.pack_into(buf, start, SIMPLE_REPLY_MAGIC, 0, cookie)
            return [view[start:end]]
        if length >= zeros.GRANULE and not zeros.has_zero_segment(
            buf, READ_HEADROOM, length, offset
        ):
            # No zero segment: one data chunk (as reply_read would send).
            CHUNK_HEADER.pack_into(
                buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                cookie, 8 + length,
            )  # fmt: skip
            OFFSET_DATA_PAYLOAD.pack_into(buf, CHUNK_HEADER.size, offset)
            return [view[:end]]
        return self.reply_read(cookie, offset, view[READ_HEADROOM:end], df=df, base=buf)

    def reply_read_around(self, cookie: int, offset: int, length: int) -> tuple[bytes, bytes]:
        """The bytes that go before and after ``length`` data bytes sent by the caller.

        For a reply whose data the caller copies to the socket itself (``sendfile``).
        Structured: one OFFSET_DATA chunk *without* DONE, then a NONE chunk with
        DONE, because the data is not in memory yet ("The server MUST NOT set
        [DONE] for a content chunk if it would still be possible to detect an
        error while transmitting the chunk"). Simple: the header, and nothing
        after; an error in the middle can then only be answered by closing the
        connection.
        """
        self._check_transmission()
        if not self.structured:
            return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie), b""
        head = CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, 0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length
        ) + OFFSET_DATA_PAYLOAD.pack(offset)
        tail = CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
        )
        return head, tail

    def reply_block_status(
        self, cookie: int, extents: Sequence[tuple[str, Sequence[tuple[int, int]]]]
    ) -> bytes:
        """The reply to BLOCK_STATUS: for each context, its (length, flags) descriptors."""
        self._check_transmission()
        if not self.structured:
            raise LocalProtocolError("block status needs structured replies")
        if {name for name, _ in extents} != set(self.contexts) or len(extents) != len(
            self.contexts
        ):
            raise LocalProtocolError(
                f"block status must answer each selected context once: {self.contexts}"
            )
        out = bytearray()
        for i, (name, descriptors) in enumerate(extents):
            if not descriptors:
                raise LocalProtocolError(f"no extent for {name} (at least one is required)")
            payload = bytearray(U32.pack(CONTEXT_IDS[name]))
            for length, status in descriptors:
                if not 0 < length <= 0xFFFFFFFF:
                    raise LocalProtocolError(f"extent length {length} (must be 1..2^32-1)")
                payload += BLOCK_STATUS_DESCRIPTOR.pack(length, status)
            flags = REPLY_FLAG_DONE if i == len(extents) - 1 else 0
            out += CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)
            )
            out += payload
        return bytes(out)


# -- helpers ------------------------------------------------------------------------------------


class _Reader:
    """Length-checked reads from an option payload; shortfalls become ERR_INVALID."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def _get(self, st: struct.Struct, what: str) -> int:
        if self.left < st.size:
            raise _Option(REP_ERR_INVALID, f"option data too short for {what}")
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return int(value)

    def u16(self) -> int:
        return self._get(U16, "a 16-bit field")

    def u32(self) -> int:
        return self._get(U32, "a 32-bit field")

    def string(self, what: str, min_rest: int = 0) -> str:
        """A 32-bit length then that many bytes of UTF-8, leaving ``min_rest`` bytes."""
        length = self._get(U32, f"the length of the {what}")
        if length > MAX_STRING:
            raise _Option(REP_ERR_INVALID, f"{what} of {length} bytes (limit {MAX_STRING})")
        if length > self.left - min_rest:
            raise _Option(REP_ERR_INVALID, f"{what} length {length} overruns the option")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return _decode_string(raw, what)


def _decode_string(raw: bytes, what: str) -> str:
    # "a sequence of UTF-8 code points, which is not NUL terminated, MUST NOT
    # contain NUL characters, ... MUST be no longer than 4096 bytes."
    if len(raw) > MAX_STRING:
        raise _Option(REP_ERR_INVALID, f"{what} of {len(raw)} bytes (limit {MAX_STRING})")
    if b"\0" in raw:
        raise _Option(REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Option(REP_ERR_INVALID, f"{what} is not valid UTF-8") from None


def _truncate_utf8(message: str, limit: int) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


def _whole(data: memoryview) -> bytes | bytearray:
    """The bytes object behind ``data`` when it views all of it, else a copy."""
    obj = data.obj
    if isinstance(obj, (bytes, bytearray)) and len(obj) == data.nbytes:
        return obj
    return data.tobytes()
