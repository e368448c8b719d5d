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
    and answered with an error; so the buffer holds at most one option or one
    request with its payload, plus what the server read beyond it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .. import zeros
from ..errors import AddCowError

# -- constants (proto.md, "Values") -------------------------------------------------

# "S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC') (also known as the INIT_PASSWD)"
NBDMAGIC = 0x4E42444D41474943
# "S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')"; the client repeats it before
# every option.
IHAVEOPT = 0x49484156454F5054
# "S: 64 bits, 0x3e889045565a9 (magic number for replies)"
OPT_REPLY_MAGIC = 0x3E889045565A9
# "C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)"
REQUEST_MAGIC = 0x25609513
# "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC ...)"
SIMPLE_REPLY_MAGIC = 0x67446698
# "S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)"
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags (16 bits).
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

# Option types.
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

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_REP_INFO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands ("Request types").
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# Command flags (16 bits).
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values ("The following error values are defined").
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation flags: "NBD_STATE_HOLE (bit 0)", "NBD_STATE_ZERO (bit 1)".
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# The metadata contexts this server offers, with the ids it hands out for them.
# qemu:allocation-depth (QEMU docs/interop/nbd.txt): "the entire 32-bit value
# represents a depth of which layer in a thin-provisioned backing chain provided
# the data (0 for unallocated, 1 for the active layer, 2 for the first backing
# layer, and so forth)."
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_IDS = {CONTEXT_BASE_ALLOCATION: 1, CONTEXT_ALLOCATION_DEPTH: 2}

# -- limits --------------------------------------------------------------------------

# "that string ... SHOULD be no longer than 256 bytes and MUST be no longer than
# 4096 bytes. This applies to export names and error messages (amongst others)."
MAX_STRING = 4096
# The largest option payload we buffer. GO needs 4 + 4096 + 2 + 2n bytes; a
# SET_META_CONTEXT with a few dozen full-length queries fits as well.
MAX_OPTION_DATA = 64 * 1024
# Options one connection may send before it is deemed a denial of service
# ("if a server believes a client's behaviour constitutes a denial of service,
# it MAY initiate a hard disconnect").
MAX_OPTIONS = 4096
# Block size constraints we advertise by default. "a client desiring maximum
# interoperability SHOULD ... limit NBD_CMD_READ and NBD_CMD_WRITE commands to a
# maximum block size of 2^25 (33,554,432)."
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 1 << 25
# Bytes before the data in a buffer for reply_read_into: a structured chunk
# header and its offset (a simple reply's header fits in it as well).
READ_HEADROOM = 28

# -- wire records ----------------------------------------------------------------------

# "S: 64 bits NBDMAGIC, S: 64 bits IHAVEOPT, S: 16 bits, handshake flags"
_GREETING = struct.Struct(">QQH")
# "C: 32 bits, client flags"
_CLIENT_FLAGS = struct.Struct(">I")
# "C: 64 bits IHAVEOPT, C: 32 bits, option, C: 32 bits, length of option data"
_OPTION_HEADER = struct.Struct(">QII")
# "S: 64 bits magic, S: 32 bits option, S: 32 bits reply type, S: 32 bits length"
_OPTION_REPLY = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: "64 bits, size of the export; 16 bits, transmission flags"
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_ZEROES = bytes(124)
# NBD_INFO_EXPORT payload: type, size, transmission flags ("length MUST be 12").
_INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum ("length MUST be 14").
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
# "C: 32 bits magic, 16 bits command flags, 16 bits type, 64 bits handle,
#  64 bits offset (unsigned), 32 bits length (unsigned)"
_REQUEST = struct.Struct(">IHHQQI")
# "S: 32 bits magic, S: 32 bits error, S: 64 bits handle"
_SIMPLE_REPLY = struct.Struct(">IIQ")
# "S: 32 bits magic, 16 bits flags, 16 bits type, 64 bits handle, 32 bits length"
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# OFFSET_HOLE payload: "64 bits: offset, 32 bits: hole size"
_HOLE = struct.Struct(">QI")
# ERROR payload: "32 bits: error, 16 bits: message length"
_ERROR = struct.Struct(">IH")
# BLOCK_STATUS descriptor: "32 bits, length of the extent, 32 bits, status flags"
_DESCRIPTOR = struct.Struct(">II")


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
class TransmissionStarted:
    """The handshake is over; requests for ``export`` follow."""

    export: ExportInfo
    flags: int
    structured: bool
    contexts: tuple[str, ...]


class Request(NamedTuple):
    """A valid command. ``data`` is the payload of a WRITE, else None.

    Immutable like the other events, but a NamedTuple: one is built per request,
    in a third of a frozen dataclass's time.
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
    | TransmissionStarted
    | Request
    | RequestError
    | Disconnect
    | ConnectionClosed
)


class State(enum.Enum):
    GREETING = "greeting"
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    DONE = "done"


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


class _Option(Exception):
    """Internal: end an option with an error reply."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class ServerConnection:
    """One NBD connection, server side, without I/O."""

    def __init__(self, exports: Sequence[ExportInfo]) -> None:
        if not exports:
            raise LocalProtocolError("a server needs at least one export")
        self.exports = tuple(exports)
        self.state = State.GREETING
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

    # -- input -------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The server's greeting: fixed newstyle, with NO_ZEROES offered."""
        if self.state is not State.GREETING:
            raise LocalProtocolError(f"initiate() in state {self.state.value}")
        self.state = State.CLIENT_FLAGS
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

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
        if self.state is State.DONE:
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
        if self.state is State.TRANSMISSION:
            return self._next_request()
        if self.state is State.OPTIONS:
            return self._next_option()
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags()
        if self.state is State.DONE:
            return NEED_DATA if not self._eof else ConnectionClosed(True, "connection closed")
        raise LocalProtocolError("next_event() before initiate()")

    def _need(self, what: str = "") -> Event | _NeedData:
        if not self._eof:
            return NEED_DATA
        clean = not self._buf and not self._skip and not what
        detail = "client closed the connection"
        if not clean:
            detail += f" in the middle of {what or 'a message'}"
        self.state = State.DONE
        self._buf.clear()
        self._skip = 0
        return ConnectionClosed(clean, detail)

    def _fail(self, message: str) -> RemoteProtocolError:
        self.state = State.DONE
        self._buf.clear()
        return RemoteProtocolError(message)

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:  # one copy (a bytearray slice would be two)
            chunk = bytes(view[:n])
        del self._buf[:n]
        return chunk

    # -- handshake ----------------------------------------------------------------------

    def _client_flags(self) -> Event | _NeedData:
        if len(self._buf) < _CLIENT_FLAGS.size:
            return self._need("the client flags" if self._buf else "")
        (flags,) = _CLIENT_FLAGS.unpack(self._take(_CLIENT_FLAGS.size))
        # "the server MUST drop the TCP connection if the client sets an unknown
        # flag, or a flag that does not match something advertised by the server."
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            raise self._fail(f"client flags {flags:#x} set unknown bits {unknown:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        return self.next_event()

    def _next_option(self) -> Event | _NeedData:
        if len(self._buf) < _OPTION_HEADER.size:
            return self._need("an option header" if self._buf else "")
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise self._fail(f"option magic {magic:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}")
        if self._options_seen >= MAX_OPTIONS:
            raise self._fail(f"more than {MAX_OPTIONS} options without entering transmission")
        if option == OPT_EXPORT_NAME and length > MAX_STRING:
            # EXPORT_NAME cannot be answered with an error: "If the chosen export
            # does not exist or requirements ... are not met ..., the server MUST
            # terminate the session."
            raise self._fail(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
        if length > MAX_OPTION_DATA:
            self._options_seen += 1
            # Skip the payload as it arrives; "NBD_REP_ERR_TOO_BIG: The request or
            # the reply is too large to process."
            del self._buf[: _OPTION_HEADER.size]
            skipped = min(length, len(self._buf))
            del self._buf[:skipped]
            self._skip = length - skipped
            message = f"option {option} carries {length} bytes; the limit is {MAX_OPTION_DATA}"
            self._reply(option, REP_ERR_TOO_BIG, message.encode())
            event = OptionRefused(option, REP_ERR_TOO_BIG, message)
            if self._skip:
                self._after_skip = event
                return self._need("an oversized option payload")
            return event
        if len(self._buf) < _OPTION_HEADER.size + length:
            return self._need("an option payload")
        del self._buf[: _OPTION_HEADER.size]
        data = self._take(length)
        self._options_seen += 1
        try:
            return self._option(option, data)
        except _Option as refusal:
            self._reply(option, refusal.reply, refusal.message.encode())
            return OptionRefused(option, refusal.reply, refusal.message)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data))
        self._out += data

    def _option(self, option: int, data: bytes) -> Event | _NeedData:
        if option == OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if option == OPT_ABORT:
            # "The server MUST reply with NBD_REP_ACK." "a server SHOULD ignore any
            # data sent by the client rather than rejecting the request".
            self._reply(option, REP_ACK)
            self.state = State.DONE
            self._buf.clear()
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
                self._reply(option, REP_SERVER, _U32.pack(len(name)) + name + text)
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
        # STARTTLS included: "If the server receives NBD_OPT_STARTTLS it MUST
        # respond with ... NBD_REP_ERR_UNSUP (if it does not support the
        # NBD_OPT_STARTTLS option at all)". Baseline: "Servers that receive
        # messages which they do not implement MUST reply to them with
        # NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message".
        raise _Option(REP_ERR_UNSUP, f"option {option} is not supported")

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
        self._out += _EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += _ZEROES
        return self._start(export, flags)

    def _start(self, export: ExportInfo, flags: int) -> Event:
        self.state = State.TRANSMISSION
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
        self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, export.size, flags))
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests and export.description:
            text = export.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + text)
        # Sent whether asked or not: our maximum is below the default "effectively
        # unlimited", so "The server MUST send this info if it is requested and it
        # intends to enforce block size constraints other than the defaults".
        self._reply(
            option,
            REP_INFO,
            _INFO_BLOCK_SIZE.pack(
                INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._start(export, flags)
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
            self._reply(option, REP_META_CONTEXT, _U32.pack(context_id) + context.encode())
        self._reply(option, REP_ACK)
        if setting:
            self.contexts = tuple(found)
            self._meta_export = export
        return self.next_event()

    # -- transmission -----------------------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        if len(self._buf) < _REQUEST.size:
            return self._need("a request header" if self._buf else "")
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(self._buf)
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
                del self._buf[: _REQUEST.size]
                skipped = min(length, len(self._buf))
                del self._buf[:skipped]
                self._skip = length - skipped
                message = f"{length} bytes is over the maximum block size {export.max_block}"
                event = self._refuse(cookie, command, flags, offset, length, EINVAL, message)
                if self._skip:
                    self._after_skip = event
                    return self._need("an oversized write payload")
                return event
            if len(self._buf) < _REQUEST.size + length:
                return self._need("a write payload")
            del self._buf[: _REQUEST.size]
            data = self._take(length)
        else:
            del self._buf[: _REQUEST.size]
        if command == CMD_DISC:
            # "The server MUST handle all outstanding requests ... and close".
            self.state = State.DONE
            self._buf.clear()
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
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply; with structured replies it carries ``message``."""
        self._check_transmission()
        if error <= 0 or error > 0xFFFFFFFF:
            raise LocalProtocolError(f"error value {error} is not a positive 32-bit number")
        if not self.structured:
            # Simple reply: "If it chooses not to [disconnect], it MUST NOT send any
            # payload for this request."
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        # "The server SHOULD prefer sending errors via a structured reply, as the
        # error can then be accompanied by a string payload"; "MUST NOT use a
        # simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL)".
        # "message length MUST NOT exceed the 4096 bytes string length limit".
        text = _truncate_utf8(message, MAX_STRING)
        payload = _ERROR.pack(error, len(text)) + text
        return (
            _CHUNK.pack(
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
            return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        length = len(data)
        if length == 0:
            return [
                _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
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
                    _CHUNK.pack(
                        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, cookie, _HOLE.size
                    )
                    + _HOLE.pack(offset + lo, hi - lo)
                )
            else:
                out.append(
                    _CHUNK.pack(
                        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + hi - lo
                    )
                    + _U64.pack(offset + lo)
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
            start = READ_HEADROOM - _SIMPLE_REPLY.size
            _SIMPLE_REPLY.pack_into(buf, start, SIMPLE_REPLY_MAGIC, 0, cookie)
            return [view[start:end]]
        if length >= zeros.GRANULE and not zeros.has_zero_segment(
            buf, READ_HEADROOM, length, offset
        ):
            # No zero segment: one data chunk (as reply_read would send).
            _CHUNK.pack_into(
                buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                cookie, 8 + length,
            )  # fmt: skip
            _U64.pack_into(buf, _CHUNK.size, offset)
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
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), b""
        head = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, 0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length
        ) + _U64.pack(offset)
        tail = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
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
            payload = bytearray(_U32.pack(CONTEXT_IDS[name]))
            for length, status in descriptors:
                if not 0 < length <= 0xFFFFFFFF:
                    raise LocalProtocolError(f"extent length {length} (must be 1..2^32-1)")
                payload += _DESCRIPTOR.pack(length, status)
            flags = REPLY_FLAG_DONE if i == len(extents) - 1 else 0
            out += _CHUNK.pack(
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
        return self._get(_U16, "a 16-bit field")

    def u32(self) -> int:
        return self._get(_U32, "a 32-bit field")

    def string(self, what: str, min_rest: int = 0) -> str:
        """A 32-bit length then that many bytes of UTF-8, leaving ``min_rest`` bytes."""
        length = self._get(_U32, f"the length of the {what}")
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
