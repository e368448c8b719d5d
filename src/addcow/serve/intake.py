"""A connection's bytes, received straight into its protocol state machine's buffer.

Design
    :class:`Intake` is the asyncio protocol of one connection. As an
    :class:`asyncio.BufferedProtocol` it has a socket transport ``recv_into``
    the free space of the connection's receive buffer
    (:meth:`~addcow.nbd.connection.ServerConnection.receive_buffer`): no
    allocation per read, and a request is parsed where it arrived; a write's
    payload is copied once, into the bytes the image writes. Transports that
    hand over bytes instead (pipes) feed them in with one copy. TLS keeps the
    same path: the TLS layer decrypts into the same buffer.

    It is also a :class:`asyncio.StreamReaderProtocol` (whose stream reader
    is never fed), so that the connection's :class:`asyncio.StreamWriter`
    works as under :func:`asyncio.start_server`: ``drain``, ``close``,
    ``start_tls``.

    The session awaits :meth:`Intake.wait` when the connection needs more
    bytes. Reading pauses while :data:`~addcow.serve.limits.READ_SIZE` bytes
    wait to be parsed, and resumes when the session asks for more: a client
    that pipelines without limit stalls only itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ..nbd.connection import ServerConnection
from .limits import READ_SIZE

Connected = Callable[["Intake", asyncio.StreamWriter], Coroutine[Any, Any, None]]


class Intake(asyncio.StreamReaderProtocol, asyncio.BufferedProtocol):
    """Feeds one connection's bytes to its :class:`ServerConnection` ``conn``.

    ``connected(intake, writer)``, when given, is started as a task once the
    transport is up (the server's handler of the connection); without it
    (a read pipe), the caller makes the writer.
    """

    def __init__(self, conn: ServerConnection, connected: Connected | None = None) -> None:
        start = None
        if connected is not None:

            def start(
                _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> Coroutine[Any, Any, None]:
                return connected(self, writer)

        super().__init__(asyncio.StreamReader(), start)
        self.conn = conn
        # The transport read from: pause and resume go there (the TLS
        # transport after STARTTLS, set by whoever starts TLS).
        self.reading: asyncio.BaseTransport | None = None
        # Names apart from the base classes' (whose _paused is the writing side's).
        self._reading_paused = False
        self._fresh = False  # bytes (or the end) arrived since the last wait()
        self._ended = False
        self._lost_with: Exception | None = None
        self._data_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reading = transport
        super().connection_made(transport)

    # -- bytes in ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.received(nbytes)
        self._arrived()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._arrived()

    def eof_received(self) -> bool:
        self._ended = True
        self._arrived()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._lost_with = exc
        self._arrived()
        super().connection_lost(exc)

    def _arrived(self) -> None:
        self._fresh = True
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        transport = self.reading
        if (
            not self._reading_paused
            and not self._ended
            and isinstance(transport, asyncio.ReadTransport)
            and self.conn.buffered >= READ_SIZE
        ):
            transport.pause_reading()
            self._reading_paused = True

    # -- the session's side ---------------------------------------------------------------

    async def wait(self) -> None:
        """Until bytes arrive (or the peer's end, then fed to the connection as such);
        at once if some arrived since the last call. Raises the error that ended
        the connection, if one did."""
        transport = self.reading
        if self._reading_paused and isinstance(transport, asyncio.ReadTransport):
            self._reading_paused = False
            transport.resume_reading()
        if not self._fresh and not self._ended:
            self._data_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        self._fresh = False
        if self._ended:
            if self._lost_with is not None:
                raise self._lost_with
            self.conn.receive_data(b"")
