"""Reads of an NBD golden image made from the server's event loop (:class:`LoopReader`).

Design note
===========

Why. A client's read of a range whose route is REMOTE (it lies in one NBD
store: an NBD backing, or the store holding the file of a qcow2 golden image
behind an NBD URI, at the route's offset) would otherwise go to the thread
pool: a worker sends the request on the store's blocking connection, waits
for the reply and wakes the loop, two thread hand-offs with the GIL traded at
each. Here the loop sends the request on a connection of its own and answers
the client when the reply arrives, as QEMU's NBD client runs in its block
layer's AIO context. Requests made in one turn of the loop leave in one
write; the replies that one receive brings are parsed in one pass. The
export holds one reader per such store (:meth:`~addcow.serve.export.Export.reader_of`).

What it takes from the store. :meth:`~addcow.stores.remote.nbd.NBDStore.loop_connection`
opens and negotiates the connection in a worker thread (connecting blocks),
with the checks of every reconnection (the size and block limits pinned at
open); the socket then becomes an asyncio transport. There is none for TLS
(an ``ssl`` socket cannot change hands after its handshake) nor for a server
that does not advertise multi-conn (it may serve one client at a time, and
the store already holds that one). Only reads the store would send unchanged
come here (:meth:`~addcow.stores.remote.nbd.NBDStore.loop_reads`: aligned, one
request long, inside the export); replies are checked by the same
:class:`~addcow.nbd.client.ClientConnection`, and land straight in the
caller's buffer.

Failures. What the store's own path does when a server goes away
(reconnecting with backoff, the reconnect delay, giving up at shutdown)
stays there. When this connection breaks (EOF, a reset, no reply within the
store's timeout) every read on it ends with False and its caller reads the
range through the store instead (a READ is idempotent); the transport is
aborted before the callers hear of it, so no more bytes land in their
buffers, and what landed before is overwritten by that read. A new connection
is opened on demand, at most once every :data:`REOPEN_AFTER` seconds. An
error reply (the server's EIO, say) raises
:class:`~addcow.errors.RemoteReadError` with its errno, as the store does;
a reply that breaks the protocol raises
:class:`~addcow.errors.RemoteReplyError` in every read on the connection,
which is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from ..errors import AddCowError
from ..nbd.client import ClientConnection, Event, RequestFailed
from ..stores.remote.nbd import NBDStore, failed_request

log = logging.getLogger("addcow.serve")

REOPEN_AFTER = 1.0
"""Seconds after a failed or broken connection before another is tried."""


class _Broken(Exception):
    """The connection failed; its reads go through the store."""


class _Channel(asyncio.Protocol):
    """One connection in the transmission phase: requests out, replies parsed."""

    def __init__(self, conn: ClientConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.failure: BaseException | None = None
        # Outstanding reads by cookie, oldest first, with their deadlines.
        self._waiting: dict[int, tuple[asyncio.Future[Event], float]] = {}
        self._flush_due = False
        self._timer: asyncio.TimerHandle | None = None
        # The bytes of the current need received so far (when it has no buffer).
        self._partial = bytearray()
        self._filled = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def read(self, view: memoryview, offset: int) -> asyncio.Future[Event]:
        """Queue a READ into ``view``; it leaves with the others of this turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Event] = loop.create_future()
        if self.failure is not None:
            future.set_exception(self.failure)
            return future
        cookie = self.conn.read(offset, view)
        self._waiting[cookie] = (future, time.monotonic() + self.timeout)
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_later(self.timeout, self._check_deadline)
        return future

    def _flush(self) -> None:
        self._flush_due = False
        if self.failure is None and self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting or self.failure is not None:
            return
        _future, deadline = next(iter(self._waiting.values()))
        left = deadline - time.monotonic()
        if left <= 0:
            self.fail(_Broken(f"no reply within {self.timeout:g} s"))
        else:
            self._timer = asyncio.get_running_loop().call_later(left, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            self._parse(memoryview(data))
        except AddCowError as exc:  # RemoteReplyError: the server broke the protocol
            self.fail(exc)

    def _parse(self, data: memoryview) -> None:
        conn, pos, size = self.conn, 0, len(data)
        while pos < size:
            need = conn.need
            take = min(need.size - self._filled, size - pos)
            if need.into is not None:
                need.into[self._filled : self._filled + take] = data[pos : pos + take]
            else:
                self._partial += data[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled < need.size:
                return
            self._filled = 0
            if need.into is not None:
                conn.feed(None)
            else:
                chunk = bytes(self._partial)
                self._partial.clear()
                conn.feed(chunk)
            for event in conn.events():
                cookie = getattr(event, "cookie", None)
                waiting = self._waiting.pop(cast(int, cookie), None)
                if waiting is not None and not waiting[0].done():
                    waiting[0].set_result(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            self.fail(_Broken(str(exc) if exc else "the server closed the connection"))

    def fail(self, exc: BaseException, *, abort: bool = True) -> None:
        """Stop: abort the transport first (no byte lands after), then tell every read."""
        if self.failure is not None:
            return
        self.failure = exc
        if abort and self.transport is not None:
            self.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, {}
        for future, _deadline in waiting.values():
            if not future.done():
                future.set_exception(exc)

    def close(self) -> None:
        """Send NBD_CMD_DISC after what is queued and close (reads in flight fail)."""
        if self.failure is None and self.transport is not None:
            self._flush()
            self.conn.disconnect()
            self.transport.write(self.conn.data_to_send())
            # No more data_received once the transport is closing: nothing lands.
            self.transport.close()
        self.fail(_Broken("closed"), abort=False)


class LoopReader:
    """Reads of one :class:`~addcow.stores.remote.nbd.NBDStore` from the event loop."""

    def __init__(self, store: NBDStore) -> None:
        self.store = store
        self._channel: _Channel | None = None
        self._opening: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        # Closed, or a store that never gets a connection of its own (TLS, no multi-conn).
        self._off = False

    @property
    def connected(self) -> bool:
        """Whether reads go out on the loop's connection now."""
        return self._channel is not None and self._channel.failure is None

    def start(self) -> None:
        """Open the connection in the background, unless it is open, opening, or
        the last attempt failed less than :data:`REOPEN_AFTER` seconds ago."""
        if self._off or self._opening is not None or self.connected:
            return
        if time.monotonic() >= self._retry_at:
            self._opening = asyncio.get_running_loop().create_task(self._open())

    async def opened(self) -> bool:
        """Wait for an opening under way; whether the connection is up."""
        if self._opening is not None:
            await asyncio.wait([self._opening])
        return self.connected

    def read(self, view: memoryview, offset: int) -> asyncio.Future[Event] | None:
        """Start a READ of ``len(view)`` bytes at ``offset`` into ``view``; None when
        this reader cannot take it now (the caller reads through the store).

        Its outcome is :func:`outcome` once the future is done (:func:`finish`
        waits for it).
        """
        if self._off or not self.store.loop_reads(offset, len(view)):
            return None
        channel = self._channel
        if channel is not None and channel.failure is not None:
            log.info("%s: the event loop's connection failed (%s); reads go through the "
                     "store until it is open again", self.store.uri, channel.failure)  # fmt: skip
            self._channel = channel = None
            self._retry_at = time.monotonic() + REOPEN_AFTER
        if channel is None:
            self.start()
            return None
        return channel.read(view, offset)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            got = await loop.run_in_executor(None, self.store.loop_connection)
            if got is None:
                self._off = True
                return
            sock, conn = got
            timeout = self.store.timeout
            try:
                _transport, channel = await loop.create_connection(
                    lambda: _Channel(conn, timeout), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            if self._off:
                channel.close()
            else:
                self._channel = channel
                log.info("%s: reads of unallocated clusters go out from the event loop",
                         self.store.uri)  # fmt: skip
        except (AddCowError, OSError) as exc:
            log.warning("%s: reads stay on the store's connections: %s", self.store.uri, exc)
            self._retry_at = time.monotonic() + REOPEN_AFTER
        finally:
            self._opening = None

    async def close(self) -> None:
        """Close the connection (reads in flight end as broken ones do)."""
        self._off = True
        if self._opening is not None:
            await asyncio.wait([self._opening])
        if self._channel is not None:
            self._channel.close()
            self._channel = None


async def finish(read: asyncio.Future[Event], uri: str, offset: int, length: int) -> bool:
    """Wait for a read :meth:`LoopReader.read` started, then its :func:`outcome`."""
    await asyncio.wait([read])
    return outcome(read, uri, offset, length)


def outcome(read: asyncio.Future[Event], uri: str, offset: int, length: int) -> bool:
    """A done read's outcome: True when its buffer is full, False when its
    connection broke (read the range through the store instead); the server's
    error reply or a protocol breach raises."""
    failure = read.exception()
    if isinstance(failure, _Broken):
        return False
    if failure is not None:
        raise failure
    event = read.result()
    if isinstance(event, RequestFailed):
        raise failed_request(uri, f"the read of bytes {offset}-{offset + length - 1}", event)
    return True
