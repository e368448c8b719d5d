"""The server side of the NBD protocol as a state machine that never touches a socket.

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
    a :class:`~addcow.nbd.events.Request` (already checked: range, flags,
    permissions) or a :class:`~addcow.nbd.events.RequestError` (refused; the
    server sends :meth:`ServerConnection.reply_error`). Replies are built by
    methods that return bytes (or a list of buffers, so a read's data is never
    copied); the server may send them in any order, as the protocol allows.

Parts
    This object is thin: it owns the receive buffer, the state and the end of
    the peer's data, and composes the two phases. :mod:`addcow.nbd.negotiation`
    answers the client flags and the options, :mod:`addcow.nbd.transmission`
    checks requests and builds replies; both parse one message from the head
    of the buffer and return a :data:`~addcow.nbd.events.Step`, which the
    connection follows. The events and errors are :mod:`addcow.nbd.events`;
    magics, numbers, limits and the struct of every record are
    :mod:`addcow.nbd.wire`, imported from there by every user.

States
    ::

        GREETING --initiate()--> CLIENT_FLAGS --4 bytes--> OPTIONS
        OPTIONS --EXPORT_NAME / GO ack--> TRANSMISSION --NBD_CMD_DISC--> DONE
        OPTIONS --ABORT--> DONE        any state --peer error / EOF--> DONE

    The table of these moves is :data:`addcow.nbd.state.TRANSITIONS`; every
    change of :attr:`ServerConnection.state` goes through it
    (:meth:`ServerConnection._enter`), and entering DONE drops whatever was
    buffered or still to be skipped. A phase that finds the peer breaking a
    MUST raises :class:`~addcow.nbd.events.RemoteProtocolError`; the
    connection takes the PEER_ERROR move on its way out.

Memory
    Option payloads over :data:`~addcow.nbd.wire.MAX_OPTION_DATA` and write
    payloads over the export's maximum block size are skipped as they arrive,
    never buffered, and answered with an error (both by
    :meth:`ServerConnection._skip_payload`); so the buffer holds at most one
    option or one request with its payload, plus what the server read beyond it.

    The receive buffer is one preallocated ``bytearray`` that never changes
    size while in use: bytes are parsed from a start index, and received at
    an end index, either copied in (:meth:`ServerConnection.receive_data`) or
    read by the caller straight into the free space
    (:meth:`ServerConnection.receive_buffer`, then
    :meth:`ServerConnection.received`). When the free space runs short, the
    unparsed bytes move to the front; a message longer than the buffer gets a
    larger one, given up once it is parsed. A ``bytearray`` used as a queue
    (appended to, deleted from the front) is reallocated as it shrinks and
    grows: at tens of thousands of requests a second, that churn of large
    allocations costs a server more, in page faults, than parsing does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportInfo,
    LocalProtocolError,
    Move,
    Need,
    NeedData,
    RemoteProtocolError,
    Request,
    Skip,
    Step,
    TransmissionStarted,
)
from .negotiation import TLS_MODES, TLS_OFF, Negotiation
from .state import TRANSITIONS, State, Trigger
from .transmission import Transmission

__all__ = ["ServerConnection"]

RECEIVE_SIZE = 512 << 10
"""Bytes of the receive buffer (it grows for a longer message, then shrinks back)."""
MIN_FREE = 64 << 10
"""Free bytes :meth:`ServerConnection.receive_buffer` offers at least."""


class ServerConnection:
    """One NBD connection, server side, without I/O."""

    def __init__(self, exports: Sequence[ExportInfo], *, tls: str = TLS_OFF) -> None:
        if not exports:
            raise LocalProtocolError("a server needs at least one export")
        if tls not in TLS_MODES:
            raise LocalProtocolError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        self._state = State.GREETING
        self._negotiation = Negotiation(tuple(exports), tls)
        self._transmission: Transmission | None = None
        # Received bytes not yet parsed are self._buf[self._start:self._end].
        self._buf = bytearray(RECEIVE_SIZE)
        self._start = 0
        self._end = 0
        self._eof = False
        # A message whose payload is being skipped rather than buffered:
        # (bytes still to skip, event to return when done).
        self._skip = 0
        self._after_skip: Event | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the connection is; it moves only as :data:`~addcow.nbd.state.TRANSITIONS` says."""
        return self._state

    @property
    def tls_active(self) -> bool:
        """True once the TLS handshake is done (:meth:`tls_started`)."""
        return self._negotiation.tls_active

    @property
    def structured(self) -> bool:
        """Structured replies were negotiated (NBD_OPT_STRUCTURED_REPLY)."""
        return self._negotiation.structured

    @property
    def contexts(self) -> tuple[str, ...]:
        """The metadata contexts selected; in transmission, those that count for the export."""
        return self._negotiation.contexts

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
            self._start = self._end = 0
            self._skip = 0

    # -- input -------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The server's greeting: fixed newstyle, with NO_ZEROES offered."""
        self._enter(Trigger.GREETING)
        return self._negotiation.greeting()

    def tls_started(self) -> None:
        """The TLS handshake is done: negotiation starts again, from nothing
        (:meth:`addcow.nbd.negotiation.Negotiation.tls_started`)."""
        self._enter(Trigger.TLS_STARTED)
        self._negotiation.tls_started()

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
        n = len(data)
        self._make_room(n)
        self._buf[self._end : self._end + n] = data
        self._end += n

    def receive_buffer(self) -> memoryview:
        """Free space to read the peer's next bytes into (at least :data:`MIN_FREE`
        bytes); say how many were read with :meth:`received`."""
        self._make_room(MIN_FREE)
        return memoryview(self._buf)[self._end :]

    def received(self, count: int) -> None:
        """``count`` bytes were read into the start of :meth:`receive_buffer`'s space."""
        start = self._end
        if self._state is State.DONE:
            return  # after DISC or ABORT nothing more is read
        if self._skip:  # the head of them belongs to a payload being skipped
            n = min(self._skip, count)
            self._skip -= n
            count -= n
            if count:
                self._buf[start : start + count] = self._buf[start + n : start + n + count]
        self._end = start + count

    def _make_room(self, count: int) -> None:
        """At least ``count`` free bytes after the unparsed ones."""
        buf, start, end = self._buf, self._start, self._end
        if len(buf) - end >= count:
            return
        pending = end - start
        if pending + count <= RECEIVE_SIZE < len(buf):
            buf = bytearray(RECEIVE_SIZE)  # the longer message is parsed: shrink back
        elif pending + count > len(buf):
            buf = bytearray(max(2 * len(buf), pending + count))
        buf[:pending] = self._buf[start:end]
        self._buf, self._start, self._end = buf, 0, pending

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed."""
        return self._end - self._start

    def data_to_send(self) -> bytes:
        """Replies the handshake queued (option replies), emptied by this call."""
        out = bytes(self._negotiation.out)
        self._negotiation.out.clear()
        return out

    def next_plain_reads(self, longest: int) -> list[tuple[int, int, int]]:
        """Plain reads at the head of the buffer, taken from it as (cookie, offset,
        length) (:meth:`Transmission.plain_reads
        <addcow.nbd.transmission.Transmission.plain_reads>`, at most ``longest``
        bytes each); empty when the next request is of another kind, or when the
        connection is anywhere but in transmission: :meth:`next_event` comes next."""
        transmission = self._transmission
        if (
            transmission is None
            or self._state is not State.TRANSMISSION
            or self._skip
            or self._after_skip is not None
        ):
            return []
        reads, used = transmission.plain_reads(self._buf, self._start, self._end, longest)
        self._start += used
        return reads

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA; raises RemoteProtocolError to hang up."""
        if self._skip:
            return self._need()
        if self._after_skip is not None:
            event, self._after_skip = self._after_skip, None
            return event
        while True:
            step: Step | NeedData
            transmission = self._transmission
            if transmission is not None and self._state is State.TRANSMISSION:
                # The hot path: a request, parsed where it lies in the buffer.
                try:
                    step, used = transmission.next_request(self._buf, self._start, self._end)
                except RemoteProtocolError:
                    self._enter(Trigger.PEER_ERROR)
                    raise
                self._start += used
                if type(step) is Request:
                    return step
            else:
                step = self._parse()
            if isinstance(step, NeedData):
                return step
            answer = self._follow(step)
            if answer is not None:
                return answer

    def _parse(self) -> Step | NeedData:
        """What the handshake makes of the head of the buffer (outside transmission)."""
        state = self._state
        try:
            if state is State.OPTIONS:
                return self._negotiate(self._negotiation.next_option)
            if state is State.CLIENT_FLAGS:
                return self._negotiate(self._negotiation.client_flags)
        except RemoteProtocolError:
            self._enter(Trigger.PEER_ERROR)
            raise
        if state is State.TLS_HANDSHAKE:
            return NEED_DATA  # the TLS layer reads the socket until tls_started()
        if state is State.DONE:
            return NEED_DATA if not self._eof else ConnectionClosed(True, "connection closed")
        raise LocalProtocolError("next_event() before initiate()")

    def _negotiate(self, phase: Callable[[bytearray], Step]) -> Step:
        """``phase`` on a copy of the unparsed bytes (the handshake's messages are
        small and few); what it took from the head is parsed."""
        pending = self._buf[self._start : self._end]
        before = len(pending)
        step = phase(pending)
        self._start += before - len(pending)
        return step

    def _follow(self, step: Step) -> Event | NeedData | None:
        """Do what a phase asked; the event to report, or None to parse on."""
        if isinstance(step, Need):
            return self._need(step.what)
        if isinstance(step, Skip):
            return self._skip_payload(step)
        if isinstance(step, Move):
            self._enter(step.trigger)
            if isinstance(step.event, TransmissionStarted):
                self._transmission = Transmission(step.event)
            return step.event
        return step

    def _need(self, what: str = "") -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        clean = self._start == self._end and not self._skip and not what
        detail = "client closed the connection"
        if not clean:
            detail += f" in the middle of {what or 'a message'}"
        self._enter(Trigger.CLOSED)
        return ConnectionClosed(clean, detail)

    def _skip_payload(self, skip: Skip) -> Event | NeedData:
        """Drop a refused message: its header bytes, then its payload.

        The payload is discarded as it arrives (:meth:`receive_data`), never
        buffered; the step's event is returned once the last of it is gone.
        """
        self._start += skip.header
        skipped = min(skip.length, self._end - self._start)
        self._start += skipped
        self._skip = skip.length - skipped
        if self._skip:
            self._after_skip = skip.event
            return self._need(skip.what)
        return skip.event

    # -- replies (transmission phase) ---------------------------------------------------------

    def _transmitting(self) -> Transmission:
        """The transmission phase, set as the connection enters it."""
        if self._transmission is None:
            raise LocalProtocolError("replies exist only in the transmission phase")
        return self._transmission

    def reply_ok(self, cookie: int) -> bytes:
        """:meth:`Transmission.reply_ok <addcow.nbd.transmission.Transmission.reply_ok>`."""
        return self._transmitting().reply_ok(cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """:meth:`Transmission.reply_error <addcow.nbd.transmission.Transmission.reply_error>`."""
        return self._transmitting().reply_error(cookie, error, message)

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: memoryview,
        *,
        df: bool = False,
        base: bytearray | None = None,
    ) -> list[bytes | memoryview]:
        """:meth:`Transmission.reply_read <addcow.nbd.transmission.Transmission.reply_read>`."""
        return self._transmitting().reply_read(cookie, offset, data, df=df, base=base)

    def reply_read_into(
        self, buf: bytearray, cookie: int, offset: int, length: int, *, df: bool = False
    ) -> list[bytes | memoryview]:
        """:meth:`Transmission.reply_read_into
        <addcow.nbd.transmission.Transmission.reply_read_into>`."""
        return self._transmitting().reply_read_into(buf, cookie, offset, length, df=df)

    def reply_read_around(self, cookie: int, offset: int, length: int) -> tuple[bytes, bytes]:
        """:meth:`Transmission.reply_read_around
        <addcow.nbd.transmission.Transmission.reply_read_around>`."""
        return self._transmitting().reply_read_around(cookie, offset, length)

    def reply_block_status(
        self, cookie: int, extents: Sequence[tuple[str, Sequence[tuple[int, int]]]]
    ) -> bytes:
        """:meth:`Transmission.reply_block_status
        <addcow.nbd.transmission.Transmission.reply_block_status>`."""
        return self._transmitting().reply_block_status(cookie, extents)
