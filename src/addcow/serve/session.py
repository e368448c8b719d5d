"""One connection as the server sees it: its replies, buffers and budget.

Design
    A reply is always sent after its request's work is done, so a write's
    data is in the image file before its reply leaves. A single asyncio
    thread writes every reply whole, so replies never interleave on the wire.

    A reply goes straight to the socket with one ``writev`` when the
    transport has nothing queued (else to the transport). An inline read is
    read into a reused buffer behind room for its chunk header
    (:meth:`Client.reply_buffer`); small replies of inline requests are held
    and sent together when the session next waits (:meth:`Client.hold`,
    :meth:`Client.hold_read`, :meth:`Client.flush`), so the replies to a
    pipeline leave in one ``writev``. The transport's high-water mark is 0:
    ``drain`` waits until everything queued has reached the socket, which is
    also when a reply buffer lent to the transport may be written again and
    when the next large read can leave with ``sendfile``.

    The requests a connection has in the pool are counted against its budget
    (:data:`~addcow.serve.limits.MAX_REQUESTS` requests,
    :data:`~addcow.serve.limits.MAX_PAYLOAD` bytes); the session waits for
    room before it reads more.

    STARTTLS (:meth:`Client.start_tls`) and the close at the end
    (:meth:`Client.finish`, after the requests in flight have replied) are
    the connection's own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any

from ..nbd.connection import ServerConnection
from .export import Counters, Export
from .limits import (
    CLOSE_GRACE,
    MAX_FREE_BUFFERS,
    MAX_HELD,
    MAX_HELD_BYTES,
    MAX_PAYLOAD,
    MAX_REQUESTS,
    SEND_BUFFER,
    SHUTDOWN_GRACE,
)
from .tls import Identity, TLSConfig, peer_identity

log = logging.getLogger("addcow.serve")

IOV_MAX = 1024
"""Buffers one ``writev`` takes at most (Linux's ``IOV_MAX``)."""


class _Budget:
    """Counts requests and payload bytes in flight; waits when either is used up."""

    def __init__(self, requests: int, payload: int) -> None:
        self._requests = requests
        self._payload = payload
        self._used_requests = 0
        self._used_payload = 0
        self._changed = asyncio.Condition()

    async def acquire(self, cost: int) -> None:
        async with self._changed:
            # One request larger than the whole budget may still run, alone.
            await self._changed.wait_for(
                lambda: (
                    self._used_requests < self._requests
                    and (self._used_payload + cost <= self._payload or self._used_payload == 0)
                )
            )
            self._used_requests += 1
            self._used_payload += cost

    async def release(self, cost: int) -> None:
        async with self._changed:
            self._used_requests -= 1
            self._used_payload -= cost
            self._changed.notify_all()


class Client:
    """State of one connection as the server sees it."""

    def __init__(self, number: int, address: str, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.address = address
        self.label = f"connection {number}" + (f" from {address}" if address else "")
        self.connected_at = time.time()
        self.counters = Counters()
        self.writer = writer
        # The socket's descriptor, for replies written straight to it (-1: pipes).
        self.fd = -1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # Buffers for inline reads: free ones, and those lent to the transport
        # with a reply it could not send at once (free again once it is empty).
        self.free_buffers: list[bytearray] = []
        self.lent_buffers: list[bytearray] = []
        # Replies held back to leave with the next reply, or when the session
        # goes back to the socket for more requests (one ``writev`` for a
        # pipeline of replies instead of one each): small replies, and inline
        # read replies whose buffers (``held_buffers``) are reused once sent.
        self.held: list[bytes | memoryview] = []
        self.held_buffers: list[bytearray] = []
        self.held_bytes = 0
        self._flush_due = False
        self.conn: ServerConnection | None = None
        self.export: Export | None = None
        # Request tasks, and reads on the loop's connection to an NBD backing.
        self.tasks: set[asyncio.Future[Any]] = set()
        self.backing_reads = 0
        self.budget = _Budget(MAX_REQUESTS, MAX_PAYLOAD)
        self.task: asyncio.Task[Any] | None = None
        self.finishing = False
        self.identity: Identity | None = None  # the TLS client's certificate, once up

    def send(self, data: bytes | Sequence[bytes | memoryview]) -> bool:
        """Send one reply whole, after those before it.

        When nothing is queued in the transport, the reply is written straight
        to the socket (one ``writev``, no copy, no deferred write); what the
        socket does not take is queued in the transport, which keeps references
        to the buffers. Returns True if nobody holds the buffers any longer
        (everything was sent, or the connection is gone), so they may be reused.
        """
        writer = self.writer
        lent, self.held_buffers = self.held_buffers, []
        if writer.is_closing():
            self.held.clear()
            self.held_bytes = 0
            return True
        buffers = [data] if isinstance(data, bytes) else data
        if self.held:
            buffers = [*self.held, *buffers]
            self.held.clear()
            self.held_bytes = 0
        elif isinstance(data, bytes) and not data:
            return True
        transport = writer.transport
        sent = 0
        if self.fd >= 0 and len(buffers) <= IOV_MAX and not transport.get_write_buffer_size():
            try:
                sent = os.writev(self.fd, buffers)
            except OSError:
                sent = 0  # full (or broken: the transport then finds out and reports it)
            if sent == sum(map(len, buffers)):
                self._recycle(lent, self.free_buffers)
                return True
        rest: list[bytes | memoryview] = []
        for b in buffers:
            if sent >= len(b):
                sent -= len(b)
                continue
            rest.append(b[sent:] if sent else b)
            sent = 0
        writer.writelines(rest)
        self._recycle(lent, self.lent_buffers)
        return False

    def reply_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes for a read's reply (reused when free)."""
        free = self.free_buffers
        if self.lent_buffers and not self.writer.transport.get_write_buffer_size():
            # Every byte queued in the transport has reached the socket: the
            # buffers it was given may be written again.
            free.extend(self.lent_buffers)
            self.lent_buffers.clear()
        buf = free.pop() if free else bytearray(size)
        return buf if len(buf) >= size else bytearray(size)

    def flush_soon(self) -> None:
        """Send the held replies in the loop's next turn (once for all held by then)."""
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        self.flush()

    @staticmethod
    def _recycle(buffers: list[bytearray], into: list[bytearray]) -> None:
        """Keep inline read buffers for reuse (free, or lent to the transport)."""
        for buf in buffers:
            if len(into) >= MAX_FREE_BUFFERS:
                break
            into.append(buf)

    def hold_read(self, reply: Sequence[bytes | memoryview], buf: bytearray) -> None:
        """Send an inline read's reply (views of ``buf``) with the next one, or at
        the latest by :meth:`flush`; ``buf`` is reused once it is sent."""
        self.held.extend(reply)
        self.held_buffers.append(buf)
        self.held_bytes += sum(map(len, reply))
        if len(self.held) >= MAX_HELD or self.held_bytes >= MAX_HELD_BYTES:
            self.flush()

    def hold(self, reply: bytes) -> None:
        """Send a small reply with the next one, or at the latest by :meth:`flush`."""
        self.held.append(reply)
        if len(self.held) >= MAX_HELD:
            self.flush()

    def flush(self) -> None:
        """Send the replies held back (before the session waits for anything)."""
        if self.held:
            self.send(b"")

    async def finish(self) -> None:
        """Let requests in flight reply, then close the connection."""
        self.finishing = True
        self.flush()
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=SHUTDOWN_GRACE)
            if pending:
                log.warning(
                    "%s: %d requests still blocked (client not reading?); aborting",
                    self.label,
                    len(pending),
                )
                self.writer.transport.abort()
                await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        try:
            if not self.writer.is_closing():
                await asyncio.wait_for(self.writer.drain(), SHUTDOWN_GRACE)
        except (TimeoutError, ConnectionError, RuntimeError):
            self.writer.transport.abort()
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_GRACE)
        except TimeoutError:
            # A TLS close waits for the peer's close_notify, which a client that
            # has stopped reading never sends: ours is out, so let the socket go.
            self.writer.transport.abort()
        except (ConnectionError, RuntimeError, OSError):
            pass
        if self.export is not None:
            log.info(
                "%s closed: %s",
                self.label,
                self.counters,
                extra={"client": self.address, "export": self.export.info.name},
            )
        else:
            log.debug("%s closed", self.label)

    async def start_tls(self, conn: ServerConnection, tls: TLSConfig | None) -> bool:
        """Upgrade the connection after STARTTLS's ACK; False closes it.

        The ACK has been queued by the protocol and is sent first; then the
        handshake runs on the stream, with a deadline. A client whose
        certificate is not on the allow list is closed after the handshake.
        Replies then go through the TLS transport only: no more ``writev`` or
        ``sendfile`` straight to the socket.
        """
        if tls is None:  # pragma: no cover - the protocol offers STARTTLS only with TLS
            return False
        self.flush()
        await drain(self.writer)
        try:
            await self.writer.start_tls(tls.context, ssl_handshake_timeout=tls.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log.warning("%s: TLS handshake failed: %s", self.label, exc)
            return False
        self.fd = -1
        identity = peer_identity(self.writer.get_extra_info("ssl_object"))
        self.identity = identity
        if not tls.allows(identity):
            log.warning("%s: refused: %s is not on the --tls-authz list", self.label, identity)
            return False
        conn.tls_started()
        ssl_object = self.writer.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "?"
        log.info("%s: TLS started (%s), client %s", self.label, version, identity)
        return True


async def drain(writer: asyncio.StreamWriter) -> None:
    """Wait until the reply buffer is small again; nothing if the peer is gone.

    Once the connection is lost, ``StreamWriter.drain`` raises the reader's one
    saved exception object again and again; every raise lengthens its traceback,
    which keeps each caller's frame (and its read buffer) alive. So drain only
    while the transport is open, and drop the traceback of any failure.
    """
    if writer.is_closing():
        return
    try:
        await writer.drain()
    except (ConnectionError, RuntimeError) as exc:
        exc.__traceback__ = None
