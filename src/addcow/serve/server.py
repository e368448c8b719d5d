"""The NBD server's life: sockets, the export table, connections, shutdown.

Design
    :class:`NBDServer` serves a list of exports (:mod:`addcow.serve.export`,
    one per image, shared by every connection) on the sockets it is given or
    binds (:mod:`addcow.serve.sockets`), or on stdin/stdout. It is a
    :class:`~addcow.serve.routing.Router`: the thread pool, and how each
    request is served, are there.

    Each connection runs one task that acts on each event of its sans-IO
    :class:`~addcow.nbd.connection.ServerConnection` (:meth:`NBDServer._session`),
    whose buffer the connection's protocol (:mod:`addcow.serve.intake`)
    receives the peer's bytes into: a request goes to
    :meth:`~addcow.serve.routing.Router._request`, which answers it in the
    event loop or starts a task for it; the connection's replies, buffers and
    budget are its :class:`~addcow.serve.session.Client`'s. Before a new
    connection is greeted it waits for a turn under ``--shared``
    (:data:`~addcow.serve.limits.SHARED_WAIT` at most).

Live features
    :meth:`NBDServer.start_live` starts, per export, the tasks of
    :mod:`addcow.serve.live` (copy on read, streaming, completion) and the
    event loop's connection to an NBD backing.

Errors
    A request never takes the server down (:mod:`addcow.serve.routing`). A
    peer that breaks the protocol so that the spec lets us hang up
    (:class:`~addcow.nbd.events.RemoteProtocolError`) loses its connection
    only, with one log line; so does a connection that fails in any other way.

Shutdown
    :meth:`NBDServer.stop` (SIGINT/SIGTERM): stop listening, stop reading from
    every connection, let requests in flight finish and send their replies
    (for at most :data:`~addcow.serve.limits.SHUTDOWN_GRACE` seconds, then
    the connection is aborted), close the connections, flush and close the
    images.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import AddCowError, AddCowIOError
from ..nbd.connection import ServerConnection
from ..nbd.events import (
    NEED_DATA,
    AbortRequested,
    ConnectionClosed,
    Disconnect,
    OptionRefused,
    RemoteProtocolError,
    Request,
    RequestError,
    StartTLS,
    TransmissionStarted,
)
from ..nbd.negotiation import TLS_OFF, TLS_REQUIRE
from ..nbd.wire import CMD_READ
from ..stores import remote
from . import live
from .export import Export
from .intake import Connected, Intake
from .limits import SHARED_WAIT, SHUTDOWN_GRACE
from .routing import PLAIN_READ_MAX, Router
from .session import Client
from .sockets import (
    BoundSocket,
    bind_unix,
    peer_address,
    same_file,
    socket_uri,
    stdio_problem,
    strerror,
)
from .tls import TLSConfig

log = logging.getLogger("addcow.serve")


class NBDServer(Router):
    """Serves a list of exports (the first is the default) until stopped."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        max_connections: int = 0,
        workers: int = 8,
        tls: TLSConfig | None = None,
    ) -> None:
        if not exports:
            raise ValueError("at least one export is needed")
        names = [e.info.name for e in exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names must be unique: {names}")
        super().__init__(workers)
        self.exports = list(exports)
        self._infos = [e.info for e in exports]
        self._by_info = {id(e.info): e for e in exports}
        self.max_connections = max_connections
        self.tls = tls
        self._slot_freed = asyncio.Condition()
        self._wake: asyncio.Task[None] | None = None
        self._servers: list[asyncio.Server] = []
        self._bound: list[BoundSocket] = []
        self._clients: set[Client] = set()
        self._stopped = asyncio.Event()
        self._count = 0
        self.started_at = time.time()
        self.uris: list[str] = []  # where it listens, as the NBD URIs clients use

    @property
    def clients(self) -> list[Client]:
        """The connections being served (a new list)."""
        return list(self._clients)

    def start_live(self) -> None:
        """Start copy on read and streaming tasks and the loop's connection to an
        NBD backing; finish exports already complete.

        The reader of an image's own backing, when that is an NBD store, opens
        its connection now, so the first reads need not wait for it; the
        readers of stores deeper down (the NBD store holding a qcow2 golden
        image) are made and opened by the first read routed to them.
        """
        for export in self.exports:
            live.start(self, export)
            reader = None if export.image.complete else export.reader_of(export.image.backing)
            if reader is not None:
                reader.start()

    # -- listening ------------------------------------------------------------------

    async def listen_unix(self, path: str) -> str:
        """Listen on a new Unix socket at ``path``; returns the NBD URI.

        A socket file nobody listens on is replaced (it holds no data); anything
        else at ``path`` is refused and left as it is. The socket bound is
        remembered by inode, for :meth:`remove_sockets`.
        """
        sock, bound = bind_unix(path)
        try:
            uri = await self.listen_socket(sock)
        except BaseException:
            bound.remove()
            sock.close()
            raise
        self._bound.append(bound)
        return uri  # listen_socket remembered it

    async def listen_tcp(self, host: str, port: int) -> str:
        """Listen on TCP (``port`` 0 picks a free one); returns the NBD URI."""
        try:
            server = await asyncio.get_running_loop().create_server(
                self._protocol, host=host, port=port, reuse_address=True
            )
        except OSError as exc:
            raise AddCowIOError(
                f"cannot listen on {host} port {port}: {strerror(exc)}", exc.errno
            ) from exc
        self._servers.append(server)
        return self._listening_on(server.sockets[0])

    async def listen_socket(self, sock: socket.socket) -> str:
        """Serve on a stream socket that already listens (Unix or TCP); returns the NBD URI.

        The socket's path, if it has one, stays where it is: whoever bound it
        removes it.
        """
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            extra: dict[str, Any] = {}
            if sys.version_info >= (3, 13) and isinstance(loop, asyncio.BaseEventLoop):
                extra["cleanup_socket"] = False
            server = await loop.create_unix_server(self._protocol, sock=sock, **extra)
        else:
            server = await loop.create_server(self._protocol, sock=sock)
        self._servers.append(server)
        return self._listening_on(sock)

    def _listening_on(self, sock: socket.socket) -> str:
        """Remember and return the URI a client uses: ``nbds`` when TLS is required."""
        uri = socket_uri(sock, tls=self.tls is not None and self.tls.mode == TLS_REQUIRE)
        self.uris.append(uri)
        return uri

    def remove_sockets(self) -> None:
        """Unlink each socket :meth:`listen_unix` bound, if its path still names it."""
        for bound in self._bound:
            bound.remove()
        self._bound.clear()

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one connection on a connected stream socket until it ends."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[asyncio.Task[Any]] = loop.create_future()

        async def accept(intake: Intake, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                started.set_result(task)
            await self._accept(intake, writer)

        await loop.connect_accepted_socket(lambda: self._intake(accept), sock)
        # A task of its own, so that stop() can cancel it without cancelling us.
        await (await started)

    async def serve_stdio(self) -> None:
        """Serve one connection on stdin/stdout (inetd style, libnbd connect_command).

        Both must be sockets or pipes (:func:`stdio_problem`). When they are one
        socket (a socketpair, an inetd connection) it is served as a socket,
        so large reads can leave with ``sendfile``; otherwise through pipe
        transports.
        """
        problem = stdio_problem()
        if problem is not None:
            raise AddCowError(f"stdin/stdout must be a socket or pipe, found {problem}")
        st_in, st_out = os.fstat(0), os.fstat(1)
        if stat.S_ISSOCK(st_in.st_mode) and same_file(st_in, st_out):
            await self.serve_connection(socket.socket(fileno=os.dup(0)))
            return
        loop = asyncio.get_running_loop()
        _, intake = await loop.connect_read_pipe(
            lambda: self._intake(None), os.fdopen(os.dup(0), "rb", 0)
        )
        transport, proto = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(os.dup(1), "wb", 0),
        )
        writer = asyncio.StreamWriter(transport, proto, None, loop)
        await asyncio.create_task(self._accept(intake, writer))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Begin a clean shutdown (idempotent)."""
        if self._stopping:
            return
        # Only a server that listened or served has something to report.
        log.log(logging.INFO if self.uris or self._count else logging.DEBUG, "shutting down")
        self._stopping = True
        # Requests and streams waiting for a golden server to come back fail now,
        # so that the shutdown does not wait out the reconnect delay.
        remote.interrupt_waits()
        for server in self._servers:
            server.close()
        for client in list(self._clients):
            if client.task is not None and not client.finishing:
                client.task.cancel()
        self._stopped.set()
        # Clients waiting for a --shared turn are closed now, not after SHARED_WAIT.
        self._wake = asyncio.get_running_loop().create_task(self._wake_waiters())

    async def _wake_waiters(self) -> None:
        async with self._slot_freed:
            self._slot_freed.notify_all()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        """After :meth:`stop`: wait for connections, then flush and close images."""
        tasks = [c.task for c in self._clients if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=3 * SHUTDOWN_GRACE)
        if self._requests:
            await asyncio.wait(self._requests, timeout=SHUTDOWN_GRACE)
        for export in self.exports:
            await live.stop_tasks(export, SHUTDOWN_GRACE)
            await export.close_readers()
        # No request may still be inside the library when its image closes: wait
        # for every thread, then close (which flushes) in this thread.
        self._pool.shutdown(wait=True)
        for export in self.exports:
            try:
                export.image.close()
            except AddCowError as exc:
                log.error("%s: closing failed: %s", export.image.path, exc)
        log.log(logging.INFO if self.uris or self._count else logging.DEBUG, "stopped")

    # -- one connection ---------------------------------------------------------------

    def _protocol(self) -> Intake:
        """A new connection's protocol, served by :meth:`_accept`."""
        return self._intake(self._accept)

    def _intake(self, accept: Connected | None) -> Intake:
        """A new connection's protocol with its state machine; ``accept`` serves it."""
        conn = ServerConnection(self._infos, tls=self.tls.mode if self.tls else TLS_OFF)
        return Intake(conn, accept)

    async def _accept(self, intake: Intake, writer: asyncio.StreamWriter) -> None:
        self._count += 1
        client = Client(self._count, peer_address(writer.get_extra_info("peername")), writer)
        label = client.label
        writer.transport.set_write_buffer_limits(high=0)  # drain() waits until empty
        if self._stopping:
            writer.close()
            return
        if not await self._wait_for_slot(label):
            writer.close()
            return
        client.task = asyncio.current_task()
        self._clients.add(client)
        log.debug("%s opened", label, extra={"client": client.address})
        try:
            await self._session(client, intake)
        except RemoteProtocolError as exc:
            log.warning("%s: protocol violation, closing: %s", label, exc)
        except (ConnectionError, BrokenPipeError) as exc:
            log.info("%s: connection lost: %s", label, exc)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except Exception:  # never let one connection take the server down
            log.exception("%s: internal error, closing the connection", label)
        finally:
            await client.finish()
            self._clients.discard(client)
            async with self._slot_freed:
                self._slot_freed.notify()

    async def _wait_for_slot(self, label: str) -> bool:
        """Wait (at most :data:`SHARED_WAIT` seconds) until fewer than ``--shared`` clients.

        As with qemu-nbd, a client over the limit waits for a turn before it is
        greeted, instead of being dropped; one that waits too long is closed
        with a log line. False if it was closed (or the server is stopping).
        """
        if not self.max_connections or len(self._clients) < self.max_connections:
            return True
        log.info("%s waits: already %d connections (--shared)", label, len(self._clients))
        try:
            async with self._slot_freed:
                await asyncio.wait_for(
                    self._slot_freed.wait_for(
                        lambda: self._stopping or len(self._clients) < self.max_connections
                    ),
                    SHARED_WAIT,
                )
        except TimeoutError:
            log.warning(
                "%s refused: still %d connections after %.0f s (--shared)",
                label,
                len(self._clients),
                SHARED_WAIT,
            )
            return False
        return not self._stopping

    async def _session(self, client: Client, intake: Intake) -> None:
        """Act on each event of the connection, until one ends it."""
        conn = intake.conn
        client.conn = conn
        client.send(conn.initiate())
        # Runs of plain reads are looked for once the last request was a read: a
        # stream of writes does not pay for a look that finds none.
        after_read = True
        while True:
            export = client.export
            if after_read and export is not None and not export.live.copies_on_read:
                reads = conn.next_plain_reads(PLAIN_READ_MAX)
                if reads:
                    if client.writer.is_closing():
                        return  # as below: nobody reads the replies
                    await self._serve_plain_reads(client, conn, export, reads)
                    continue
            event = conn.next_event()
            if event is not NEED_DATA:
                after_read = type(event) is Request and event.command == CMD_READ
            if not isinstance(event, Request):  # requests queue no output
                client.send(conn.data_to_send())
            if event is NEED_DATA:
                client.flush()
                if self._stopping:
                    return
                await client.writer.drain()
                await intake.wait()
            elif isinstance(event, Request):
                if client.writer.is_closing():
                    # The peer is gone: nobody will read the replies of what it
                    # still had in the pipe, so do not run them.
                    return
                waiting = self._request(client, conn, event)
                if waiting is not None:
                    await waiting
            elif isinstance(event, RequestError):
                log.debug("%s: refused %s", client.label, event.message)
                client.send(conn.reply_error(event.cookie, event.error, event.message))
            elif isinstance(event, TransmissionStarted):
                client.export = self._by_info[id(event.export)]
                client.export.live.changed.set()
                log.info(
                    "%s: serving export %r%s (structured replies %s, contexts %s)",
                    client.label,
                    event.export.name,
                    f", TLS, client {client.identity}" if client.identity is not None else "",
                    "on" if event.structured else "off",
                    ", ".join(event.contexts) or "none",
                    extra={"client": client.address, "export": event.export.name},
                )
            elif isinstance(event, OptionRefused):
                log.debug("%s: option %d refused: %s", client.label, event.option, event.message)
            elif isinstance(event, Disconnect):
                log.debug("%s: client disconnected (NBD_CMD_DISC)", client.label)
                return
            elif isinstance(event, StartTLS):
                if not await client.start_tls(conn, self.tls):
                    return
                intake.reading = client.writer.transport
            elif isinstance(event, AbortRequested):
                log.debug("%s: client aborted the handshake", client.label)
                return
            elif isinstance(event, ConnectionClosed):
                if not event.clean:
                    log.warning("%s: %s", client.label, event.detail)
                return
