"""What an NBD server connection is given, what it reports and what it raises.

:class:`~addcow.nbd.connection.ServerConnection` is told its exports as
:class:`ExportInfo` records; it reports what the server must act on as the
frozen events below (or :data:`NEED_DATA` when it needs more bytes) and raises
the errors below. Events carry no bytes to send: replies are built by the
connection's methods.

Errors
    ::

        AddCowError
        +-- ProtocolError              root of the NBD protocol's errors
            +-- RemoteProtocolError    the peer broke a MUST and the spec lets (or
            |                          makes) us hang up: close the connection
            +-- LocalProtocolError     the server called this API wrongly (a bug)

    Requests the peer gets wrong but that the spec answers with an error reply
    (a range past the end, an unknown command, a write on a read-only export)
    are not exceptions: they are :class:`RequestError` events or option error
    replies, and the connection goes on. Nothing in the protocol uses
    ``assert`` on peer data; every length is checked before it is used.

Steps
    The two phases, :mod:`addcow.nbd.negotiation` and
    :mod:`addcow.nbd.transmission`, parse one message at a time from the
    connection's buffer and answer with a :data:`Step`: an event, or what the
    connection must do before there is one (:class:`Need` more bytes,
    :class:`Skip` a refused payload, :class:`Move` along a transition of
    :data:`addcow.nbd.state.TRANSITIONS`), or None when a message was answered
    with queued replies alone. The phases never change the connection's state
    themselves: only the connection moves, and only through the table. Both
    take a whole message off the buffer with :func:`take`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..errors import AddCowError
from .state import Trigger
from .wire import (
    DEFAULT_MAX_BLOCK,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    FLAG_CAN_MULTI_CONN,
    FLAG_HAS_FLAGS,
    FLAG_READ_ONLY,
    FLAG_SEND_CACHE,
    FLAG_SEND_DF,
    FLAG_SEND_FAST_ZERO,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
)

__all__ = [
    "NEED_DATA",
    "AbortRequested",
    "ConnectionClosed",
    "Disconnect",
    "Event",
    "ExportInfo",
    "LocalProtocolError",
    "Move",
    "Need",
    "NeedData",
    "OptionRefused",
    "ProtocolError",
    "RemoteProtocolError",
    "Request",
    "RequestError",
    "Skip",
    "StartTLS",
    "Step",
    "TransmissionStarted",
    "take",
]

# -- errors ----------------------------------------------------------------------------


class ProtocolError(AddCowError):
    """Root of the NBD protocol errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol in a way that ends the connection."""


class LocalProtocolError(ProtocolError):
    """The server used :class:`~addcow.nbd.connection.ServerConnection` wrongly."""


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


class NeedData:
    """The type of :data:`NEED_DATA`, which is its only instance."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
"""Returned by :meth:`~addcow.nbd.connection.ServerConnection.next_event` when it
needs more bytes."""


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
    on the socket, then call :meth:`~addcow.nbd.connection.ServerConnection.tls_started`."""


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

# -- steps (from a phase to the connection) ----------------------------------------------
# NamedTuples, like Request: a phase returns one for most reads of the socket.


class Need(NamedTuple):
    """The buffer holds less than a whole message; ``what`` names a partial one."""

    what: str = ""


class Skip(NamedTuple):
    """Drop a refused message: its ``header`` bytes, then its ``length``-byte payload
    as it arrives; report ``event`` once it is gone. ``what`` names the payload."""

    header: int
    length: int
    event: Event
    what: str


class Move(NamedTuple):
    """Take the transition for ``trigger``, then report ``event`` (None: read on)."""

    trigger: Trigger
    event: Event | None = None


Step = Event | Need | Skip | Move | None
"""What a phase answers for the message at the head of the buffer."""


def take(buf: bytearray, start: int, end: int) -> bytes:
    """``buf[start:end]``, a message's payload, after which the message leaves ``buf``."""
    with memoryview(buf) as view:  # one copy (a bytearray slice would be two)
        data = bytes(view[start:end])
    del buf[:end]
    return data
