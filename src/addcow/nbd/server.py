"""The asyncio NBD server: sockets, the export table, and a thread pool for I/O.

Design
    One :class:`Export` per image file, opened once at start-up and shared by
    every connection to it: the library's :class:`~addcow.image.AddCowImage`
    is thread-safe, so there is one bitmap, one set of claims and one flush
    for all connections. That is what makes ``NBD_FLAG_CAN_MULTI_CONN``
    honest: a FLUSH on any connection runs ``image.flush()``, which makes
    every write that any connection has completed durable.

    Each connection runs one task that reads bytes, feeds them to the sans-IO
    :class:`~addcow.nbd.protocol.ServerConnection` and starts one task per
    request. Request tasks run the library call in the thread pool and write
    their reply when it is done, so replies leave in completion order
    ("Replies need not be sent in the same order as requests", proto.md). A
    single asyncio thread writes every reply whole, so replies never
    interleave on the wire.

    The hot paths stay in the event loop: reads up to ``INLINE_READ_MAX``, and
    writes up to ``INLINE_WRITE_MAX`` into allocated clusters or inside one
    cluster (copy on write included, when the backing bytes are in the page
    cache). A reply goes straight to the socket with one
    ``writev`` when the transport has nothing queued (else to the transport);
    an inline read is read into a reused buffer behind room for its chunk
    header, or, from ``SENDFILE_MIN`` bytes on and when the range lies in one
    file, sent with ``sendfile`` (page cache to socket, no copy in Python);
    small replies of inline writes are held and sent together when the
    session next waits. A reply is always sent after its request's work is
    done, so a write's data is in the image file before its reply leaves.
    The transport's high-water mark is 0: ``drain`` waits until everything
    queued has reached the socket, which is also when the next large read can
    leave with ``sendfile`` again.

    A read that lies wholly in an NBD backing (no cluster of it allocated)
    needs no thread either: the loop sends it on a connection of its own to
    the golden server (:mod:`addcow.nbd.loop_store`) and replies from the
    callback when the data is in the reply buffer. Where that connection
    cannot take it (TLS, no multi-conn, it broke), the pool reads it through
    the store, which reconnects as it must.

    In the code: :meth:`NBDServer._session` is the dispatch loop over the
    connection's events; :meth:`NBDServer._request` decides where a request
    runs, with one small function per policy decision (``_writes_inline``,
    ``_reads_inline``, ``_sendfile_waits``, ``_replies_over_bound``).

Live features
    The server is the :class:`~addcow.nbd.live.LivePool` of
    :mod:`addcow.nbd.live` (its thread pool, the client calls in it, whether
    it stops) and tells it what requests did: ``live.check_complete`` after
    one that allocates, ``live.copy_on_read`` after a read's reply.

Bounds (per connection)
    At most :data:`MAX_REQUESTS` requests in flight and :data:`MAX_PAYLOAD`
    bytes of read/write payload held by them; the reading task waits for room
    before it reads more, so a client that pipelines without limit, or never
    reads its replies (the writer's ``drain`` then blocks every request task),
    only stalls itself. Memory per connection is at most the budget plus one
    request (the export's maximum block size, 32 MiB) plus one read buffer.

Errors
    Library errors (:class:`~addcow.errors.AddCowError`) and ``OSError`` become
    NBD error replies (:func:`nbd_errno`); a request never takes the server
    down. A peer that breaks the protocol so that the spec lets us hang up
    (:class:`~addcow.nbd.protocol.RemoteProtocolError`) loses its connection
    only, with one log line.

Shutdown
    :meth:`NBDServer.stop` (SIGINT/SIGTERM): stop listening, stop reading
    from every connection, let requests in flight finish and send their
    replies (for at most :data:`SHUTDOWN_GRACE` seconds, then the connection
    is aborted), close the connections, flush and close the images.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import remote, sysio
from ..errors import (
    AddCowError,
    AddCowIOError,
    ClosedImageError,
    RangeError,
    ReadOnlyError,
    RemoteBackingError,
    SlowZeroError,
)
from ..image import AddCowImage
from . import live, loop_store, wire
from .live import LiveOptions, LiveState
from .loop_store import LoopReader
from .protocol import (
    NEED_DATA,
    TLS_OFF,
    TLS_REQUIRE,
    AbortRequested,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    OptionRefused,
    RemoteProtocolError,
    Request,
    RequestError,
    ServerConnection,
    StartTLS,
    TransmissionStarted,
)
from .store import NBDStore
from .tls import Identity, TLSConfig, peer_identity

log = logging.getLogger("addcow.serve")

MAX_REQUESTS = 64
"""Requests one connection may have in flight."""
MAX_PAYLOAD = 64 << 20
"""Bytes of read/write payload one connection's requests may hold at once."""
READ_SIZE = 256 << 10
"""Bytes asked of the socket per read."""
MAX_EXTENTS = 1 << 16
"""Most extents examined for one BLOCK_STATUS (the spec lets a reply fall short)."""
SHUTDOWN_GRACE = 10.0
"""Seconds a connection's requests get to finish at shutdown."""
CLOSE_GRACE = 1.0
"""Seconds a closing TLS connection waits for the client's close_notify."""
SHARED_WAIT = 60.0
"""Seconds a client over the ``--shared`` limit waits for a turn before it is closed."""
INLINE_READ_MAX = 1 << 20
"""Reads up to this size run in the event loop instead of the pool (0: never).

They block the loop for one ``pread`` (from the page cache, usually), which costs
far less than handing the request to a thread and back."""


SENDFILE_MIN = 64 << 10
"""Inline reads at least this long, of data in one file, go out with ``sendfile``.

The kernel then hands the page-cache pages to the socket: no copy into a
Python buffer and none out of it. Smaller reads stay with ``preadv``, where the
extra ``lseek`` and the second chunk would cost more than the copy they save."""


INLINE_WRITE_MAX = 256 << 10
"""Writes up to this size may run in the event loop (0: never).

Into allocated clusters that is one ``pwrite``; inside one unallocated cluster
it is its copy on write, when the backing bytes are in the page cache
(:meth:`~addcow.image.AddCowImage.write_nowait`); otherwise the pool does it."""
MAX_FREE_BUFFERS = 16
"""Inline read buffers one connection keeps for reuse (and tracks while lent)."""
MAX_HELD = 64
"""Replies (buffers of them) held back at most before they are sent together."""
MAX_HELD_BYTES = 256 << 10
"""Bytes of replies held back at most before they are sent together."""
SEND_BUFFER = 4 << 20
"""SO_SNDBUF asked for each connection (the kernel caps it at ``wmem_max``)."""
_IOV_MAX = 1024


@dataclass(slots=True)
class Counters:
    """Requests and bytes served, by kind (the names of QEMU's ``query-blockstats``)."""

    rd_operations: int = 0
    rd_bytes: int = 0
    wr_operations: int = 0  # writes and write-zeroes
    wr_bytes: int = 0
    unmap_operations: int = 0  # trims
    unmap_bytes: int = 0
    flush_operations: int = 0

    def count(self, command: int, length: int) -> None:
        if command == wire.CMD_READ:
            self.rd_operations += 1
            self.rd_bytes += length
        elif command in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES):
            self.wr_operations += 1
            self.wr_bytes += length
        elif command == wire.CMD_TRIM:
            self.unmap_operations += 1
            self.unmap_bytes += length
        elif command == wire.CMD_FLUSH:
            self.flush_operations += 1

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __str__(self) -> str:
        return (
            f"{self.rd_operations} reads ({self.rd_bytes} bytes), "
            f"{self.wr_operations} writes ({self.wr_bytes} bytes), "
            f"{self.unmap_operations} trims, {self.flush_operations} flushes"
        )


@dataclass
class Export:
    """One served image: its protocol description and the open image."""

    info: ExportInfo
    image: AddCowImage
    live: LiveState = field(default_factory=LiveState)
    counters: Counters = field(default_factory=Counters)
    # Reads of an NBD backing from the event loop (:mod:`addcow.nbd.loop_store`).
    reader: LoopReader | None = None

    @classmethod
    def from_image(
        cls,
        image: AddCowImage,
        name: str,
        *,
        read_only: bool,
        live: LiveOptions | None = None,
    ) -> Export:
        backing = getattr(image.backing, "path", None)
        description = f"add-cow image {image.path} (data in {image.image_path}"
        description += f", backing file {backing})" if backing else ")"
        info = ExportInfo(name=name, size=image.size, read_only=read_only, description=description)
        reader = LoopReader(image.backing) if type(image.backing) is NBDStore else None
        return cls(info, image, LiveState(live or LiveOptions()), reader=reader)


_T = TypeVar("_T")


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value for a failed request (proto.md "Error values")."""
    if isinstance(exc, ReadOnlyError):
        return wire.EPERM
    if isinstance(exc, RangeError):
        return wire.EINVAL
    if isinstance(exc, ClosedImageError):
        return wire.ESHUTDOWN
    code = exc.errno if isinstance(exc, (AddCowIOError, RemoteBackingError, OSError)) else None
    # "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC."
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return wire.ENOSPC
    if code in (errno.EPERM, errno.EACCES, errno.EROFS):
        return wire.EPERM
    # "The server SHOULD NOT return NBD_ENOMEM if at all possible."
    return wire.EIO


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


class _Client:
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
        if self.fd >= 0 and len(buffers) <= _IOV_MAX and not transport.get_write_buffer_size():
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


class NBDServer:
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
        self.exports = list(exports)
        self._infos = [e.info for e in exports]
        self._by_info = {id(e.info): e for e in exports}
        self.max_connections = max_connections
        self.tls = tls
        self._slot_freed = asyncio.Condition()
        self._wake: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="addcow-io")
        self._servers: list[asyncio.Server] = []
        self._bound: list[BoundSocket] = []
        self._clients: set[_Client] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._count = 0
        self.started_at = time.time()
        self.uris: list[str] = []  # where it listens, as the NBD URIs clients use
        # Library calls in the pool (completion waits for them) and how many of
        # them serve clients (streaming yields to those).
        self._calls: set[asyncio.Future[Any]] = set()
        self._client_calls = 0

    # -- the thread pool, as live.LivePool ---------------------------------------------

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run a library call in the pool, tracked in :meth:`pending` until it is done."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return future

    @property
    def busy(self) -> int:
        """Library calls in the pool on behalf of clients right now."""
        return self._client_calls

    def pending(self) -> set[asyncio.Future[Any]]:
        """The library calls in the pool right now (a new set)."""
        return set(self._calls)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` has been called."""
        return self._stopping

    async def _client_call(self, fn: Callable[..., _T], *args: Any) -> _T:
        self._client_calls += 1
        try:
            return await self.call(fn, *args)
        finally:
            self._client_calls -= 1

    @property
    def clients(self) -> list[_Client]:
        """The connections being served (a new list)."""
        return list(self._clients)

    def start_live(self) -> None:
        """Start copy on read and streaming tasks and the loop's connections to NBD
        backings; finish exports already complete."""
        for export in self.exports:
            live.start(self, export)
            if export.reader is not None and not export.image.complete:
                export.reader.start()

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
            server = await asyncio.start_server(
                self._accept, host=host, port=port, limit=READ_SIZE, reuse_address=True
            )
        except OSError as exc:
            raise AddCowIOError(
                f"cannot listen on {host} port {port}: {_strerror(exc)}", exc.errno
            ) from exc
        self._servers.append(server)
        return self._listening_on(server.sockets[0])

    async def listen_socket(self, sock: socket.socket) -> str:
        """Serve on a stream socket that already listens (Unix or TCP); returns the NBD URI.

        The socket's path, if it has one, stays where it is: whoever bound it
        removes it.
        """
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            extra: dict[str, Any] = {}
            if sys.version_info >= (3, 13) and isinstance(
                asyncio.get_running_loop(), asyncio.BaseEventLoop
            ):
                extra["cleanup_socket"] = False
            server = await asyncio.start_unix_server(
                self._accept, sock=sock, limit=READ_SIZE, **extra
            )
        else:
            server = await asyncio.start_server(self._accept, sock=sock, limit=READ_SIZE)
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
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        # A task of its own, so that stop() can cancel it without cancelling us.
        await asyncio.create_task(self._accept(reader, writer))

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
        if stat.S_ISSOCK(st_in.st_mode) and _same_file(st_in, st_out):
            await self.serve_connection(socket.socket(fileno=os.dup(0)))
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", 0)
        )
        transport, proto = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
            os.fdopen(os.dup(1), "wb", 0),
        )
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        await asyncio.create_task(self._accept(reader, writer))

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
            if export.reader is not None:
                await export.reader.close()
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count += 1
        client = _Client(self._count, _address(writer.get_extra_info("peername")), writer)
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
            await self._session(client, reader)
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
            await self._finish(client)
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

    async def _finish(self, client: _Client) -> None:
        """Let requests in flight reply, then close the connection."""
        client.finishing = True
        client.flush()
        if client.tasks:
            _done, pending = await asyncio.wait(client.tasks, timeout=SHUTDOWN_GRACE)
            if pending:
                log.warning(
                    "%s: %d requests still blocked (client not reading?); aborting",
                    client.label,
                    len(pending),
                )
                client.writer.transport.abort()
                await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
        try:
            if not client.writer.is_closing():
                await asyncio.wait_for(client.writer.drain(), SHUTDOWN_GRACE)
        except (TimeoutError, ConnectionError, RuntimeError):
            client.writer.transport.abort()
        client.writer.close()
        try:
            await asyncio.wait_for(client.writer.wait_closed(), CLOSE_GRACE)
        except TimeoutError:
            # A TLS close waits for the peer's close_notify, which a client that
            # has stopped reading never sends: ours is out, so let the socket go.
            client.writer.transport.abort()
        except (ConnectionError, RuntimeError, OSError):
            pass
        if client.export is not None:
            log.info(
                "%s closed: %s",
                client.label,
                client.counters,
                extra={"client": client.address, "export": client.export.info.name},
            )
        else:
            log.debug("%s closed", client.label)

    async def _session(self, client: _Client, reader: asyncio.StreamReader) -> None:
        """Feed the connection what the peer sends and act on each event, until one ends it."""
        conn = ServerConnection(self._infos, tls=self.tls.mode if self.tls else TLS_OFF)
        client.conn = conn
        client.send(conn.initiate())
        while True:
            event = conn.next_event()
            if not isinstance(event, Request):  # requests queue no output
                client.send(conn.data_to_send())
            if event is NEED_DATA:
                client.flush()
                if self._stopping:
                    return
                await client.writer.drain()
                conn.receive_data(await reader.read(READ_SIZE))
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
                if not await self._start_tls(client, conn):
                    return
            elif isinstance(event, AbortRequested):
                log.debug("%s: client aborted the handshake", client.label)
                return
            elif isinstance(event, ConnectionClosed):
                if not event.clean:
                    log.warning("%s: %s", client.label, event.detail)
                return

    async def _start_tls(self, client: _Client, conn: ServerConnection) -> bool:
        """Upgrade the connection after STARTTLS's ACK; False closes it.

        The ACK has been queued by the protocol and is sent first; then the
        handshake runs on the stream, with a deadline. A client whose
        certificate is not on the allow list is closed after the handshake.
        Replies then go through the TLS transport only: no more ``writev`` or
        ``sendfile`` straight to the socket.
        """
        tls = self.tls
        if tls is None:  # pragma: no cover - the protocol offers STARTTLS only with TLS
            return False
        client.flush()
        await _drain(client.writer)
        try:
            await client.writer.start_tls(tls.context, ssl_handshake_timeout=tls.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log.warning("%s: TLS handshake failed: %s", client.label, exc)
            return False
        client.fd = -1
        identity = peer_identity(client.writer.get_extra_info("ssl_object"))
        client.identity = identity
        if not tls.allows(identity):
            log.warning("%s: refused: %s is not on the --tls-authz list", client.label, identity)
            return False
        conn.tls_started()
        ssl_object = client.writer.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "?"
        log.info("%s: TLS started (%s), client %s", client.label, version, identity)
        return True

    # -- requests -----------------------------------------------------------------------

    def _request(
        self, client: _Client, conn: ServerConnection, req: Request
    ) -> Coroutine[Any, Any, None] | None:
        """Serve one request: in the event loop where the policy allows, else in the pool.

        Returns None once the session may read on (an inline request has been
        answered or its reply held, a read sent to the NBD backing), else what
        the session must await first: the waits around an inline read, or a
        pool request getting its task and budget. The common inline read needs
        no coroutine at all, which is most of its cost after the system calls.
        """
        export = client.export
        if export is None:  # pragma: no cover - set by TransmissionStarted
            raise RuntimeError("request before the export is known")
        export.live.last_request = time.monotonic()
        client.counters.count(req.command, req.length)
        export.counters.count(req.command, req.length)
        if _writes_inline(req):
            reply = self._inline_write(client, conn, export, req)
            if reply is not None:
                client.hold(reply)
                return None
        if _reads_inline(export, req):
            if export.live.copies_on_read or _sendfile_waits(client, req):
                return self._serve_inline_read(client, conn, export, req)
            # _serve_inline_read with nothing to wait for before the read.
            self._inline_read(client, conn, export, req)
            return _bound_inline_replies(client) if _replies_over_bound(client) else None
        if self._start_backing_read(client, conn, export, req):
            return None
        return self._submit(client, req)

    async def _serve_inline_read(
        self, client: _Client, conn: ServerConnection, export: Export, req: Request
    ) -> None:
        """An inline read with the waits around it: for sendfile, for room, for copy on read."""
        await _wait_for_sendfile(client, req)
        self._inline_read(client, conn, export, req)
        await _bound_inline_replies(client)
        if export.live.copies_on_read:
            client.flush()
            await live.copy_on_read(export, req.offset, req.length)

    async def _submit(self, client: _Client, req: Request) -> None:
        """Hand a request to the pool once the budget has room; its task sends the reply."""
        cost = req.length if req.command in _PAYLOAD_COMMANDS else 0
        client.flush()
        await client.budget.acquire(cost)
        task = asyncio.create_task(self._execute(client, req, cost))
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _inline_read(
        self, client: _Client, conn: ServerConnection, export: Export, req: Request
    ) -> None:
        """A read done in the event loop, and its reply queued: no task, no thread hand-off.

        The data is read into one of the connection's reply buffers after room
        for the chunk header, so a reply of one data chunk is one buffer. It is
        held until the session goes back to the socket (or the held replies
        reach :data:`MAX_HELD_BYTES`), so the replies to a pipeline of reads
        leave in one ``writev``; a buffer is reused once the socket took it.
        A small read from the page cache is a copy that takes less time than
        the hand-off of a request to a worker thread and back, so the loop
        does it itself.
        """
        if req.length >= SENDFILE_MIN and self._sendfile_read(client, conn, export, req):
            return
        end = wire.READ_HEADROOM + req.length
        buf = client.reply_buffer(end)
        try:
            export.image.readinto(memoryview(buf)[wire.READ_HEADROOM : end], req.offset)
        except (AddCowError, OSError) as exc:
            log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
            client.send(conn.reply_error(req.cookie, nbd_errno(exc), str(exc)))
            client.free_buffers.append(buf)
            return
        df = bool(req.flags & wire.CMD_FLAG_DF)
        client.hold_read(conn.reply_read_into(buf, req.cookie, req.offset, req.length, df=df), buf)

    def _start_backing_read(
        self, client: _Client, conn: ServerConnection, export: Export, req: Request
    ) -> bool:
        """Send a read that lies wholly in an NBD backing on the loop's own connection
        to it, its reply to follow when the data comes; False if it cannot go there.

        No task and no thread: :meth:`_backing_read_done` replies from the
        reader's callback, into a reply buffer as inline reads do. Reads with
        copy on read take the task path (:meth:`_read_backing`), whose queue may
        make them wait. At most :data:`MAX_REQUESTS` of a connection's reads
        are here at once, besides the budget of its pool requests.
        """
        if (
            export.reader is None
            or req.command != wire.CMD_READ
            or client.backing_reads >= MAX_REQUESTS
            or export.live.copies_on_read
        ):
            return False
        end = wire.READ_HEADROOM + req.length
        buf = client.reply_buffer(end)
        read = self._send_backing_read(
            export, memoryview(buf)[wire.READ_HEADROOM : end], req.offset
        )
        if read is None:
            client.free_buffers.append(buf)
            return False
        client.backing_reads += 1
        client.tasks.add(read)
        read.add_done_callback(functools.partial(self._backing_read_done, client, req, buf))
        return True

    def _send_backing_read(
        self, export: Export, view: memoryview, offset: int
    ) -> asyncio.Future[Any] | None:
        """Send a read that lies wholly in an NBD backing on the loop's own connection
        to it; None if it does not, or that connection cannot take it now.

        The read is one of :meth:`pending` until it is done, so completion waits
        for it before it releases the backing, as for a call in the pool; and it
        counts as a client's call, which streaming yields to.
        """
        reader = export.reader
        if reader is None or export.image.backing_for(offset, len(view)) is not reader.store:
            return None
        read = reader.read(view, offset)
        if read is None:
            return None
        self._client_calls += 1
        self._calls.add(read)

        def done(_: asyncio.Future[Any]) -> None:
            self._client_calls -= 1
            self._calls.discard(read)

        read.add_done_callback(done)
        return read

    def _backing_read_done(
        self, client: _Client, req: Request, buf: bytearray, read: asyncio.Future[Any]
    ) -> None:
        """Reply to a read :meth:`_start_backing_read` sent (or hand it to the pool)."""
        client.backing_reads -= 1
        client.tasks.discard(read)
        conn, export = client.conn, client.export
        if read.cancelled() or conn is None or export is None or client.writer.is_closing():
            return
        reader = export.reader
        assert reader is not None
        try:
            done = loop_store.outcome(read, reader.store.uri, req.offset, req.length)
        except AddCowError as exc:
            log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
            client.send(conn.reply_error(req.cookie, nbd_errno(exc), str(exc)))
            return
        if not done:  # the connection broke: the store reads it, reconnecting as needed
            if not self._stopping:
                task = asyncio.create_task(self._submit(client, req))
                client.tasks.add(task)
                task.add_done_callback(client.tasks.discard)
            return
        df = bool(req.flags & wire.CMD_FLAG_DF)
        client.hold_read(conn.reply_read_into(buf, req.cookie, req.offset, req.length, df=df), buf)
        client.flush_soon()

    def _sendfile_read(
        self, client: _Client, conn: ServerConnection, export: Export, req: Request
    ) -> bool:
        """Send a read of data that lies in one file with ``sendfile``; False if it cannot.

        Only when the transport has nothing queued (so the bytes go straight to
        the socket in order) and the range starts with data in that file (one
        ``lseek(SEEK_DATA)``; a range that starts in a file hole is left to the
        buffered path, which sends it as OFFSET_HOLE). Zero bytes after that
        start go out as data: a server MAY send holes, it need not. If the
        socket fills up, the rest is read into a buffer and queued; if that read
        fails, the header has promised bytes that cannot follow, so the
        connection is closed.
        """
        offset, length = req.offset, req.length
        fd = export.image.source_fd(offset, length)
        writer = client.writer
        if fd < 0 or client.fd < 0 or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size():
            return False
        try:
            if os.lseek(fd, offset, os.SEEK_DATA) != offset:
                return False
        except OSError:  # ENXIO: no data from offset to the end of the file
            return False
        head, tail = conn.reply_read_around(req.cookie, offset, length)
        sent = 0
        if client.send(head):
            while sent < length:
                try:
                    count = os.sendfile(client.fd, fd, offset + sent, length - sent)
                except OSError:  # the socket is full (or the file misbehaves)
                    break
                if not count:
                    break
                sent += count
        if sent < length:
            rest = bytearray(length - sent)
            try:
                export.image.readinto(rest, offset + sent)
            except (AddCowError, OSError) as exc:
                log.error(
                    "%s: %s failed after its reply began, closing: %s",
                    client.label, _describe(req), exc,
                )  # fmt: skip
                writer.transport.abort()
                return True
            client.send([memoryview(rest)])
        if tail:
            client.hold(tail)
        return True

    def _inline_write(
        self, client: _Client, conn: ServerConnection, export: Export, req: Request
    ) -> bytes | None:
        """A small write done in the event loop, or None (for the pool).

        Into allocated clusters: one ``pwrite``. Inside one unallocated cluster:
        its copy on write when nothing needs waiting for (no other writer's claim,
        backing bytes in the page cache). Either is cheaper than a round trip
        through the pool, where the loop and the workers contend for the GIL and
        the request waits for a thread to be scheduled.
        """
        try:
            data = req.data if req.data is not None else b""
            if not export.image.write_nowait(data, req.offset):
                return None
        except (AddCowError, OSError) as exc:
            log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
            return conn.reply_error(req.cookie, nbd_errno(exc), str(exc))
        live.check_complete(self, export)
        return conn.reply_ok(req.cookie)

    async def _execute(self, client: _Client, req: Request, cost: int) -> None:
        conn, export = client.conn, client.export
        try:
            if conn is None or export is None:  # pragma: no cover - set before requests
                return
            try:
                reply = await self._perform(conn, export, req)
            except (AddCowError, OSError) as exc:
                code = nbd_errno(exc)
                log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
                reply = conn.reply_error(req.cookie, code, str(exc))
            except Exception as exc:
                log.exception("%s: %s failed unexpectedly", client.label, _describe(req))
                reply = conn.reply_error(req.cookie, wire.EIO, f"internal error: {exc}")
            client.send(reply)
            command = req.command
            if command in _ALLOCATING_COMMANDS:
                live.check_complete(self, export)
            elif command in _PAYLOAD_COMMANDS and export.live.copies_on_read:
                await live.copy_on_read(export, req.offset, req.length)
            await _drain(client.writer)
        finally:
            await client.budget.release(cost)

    async def _perform(
        self, conn: ServerConnection, export: Export, req: Request
    ) -> bytes | list[bytes | memoryview]:
        image = export.image
        call = self._client_call
        command, flags, offset, length = req.command, req.flags, req.offset, req.length
        fua = bool(flags & wire.CMD_FLAG_FUA)
        if command == wire.CMD_READ:
            buf = bytearray(length)
            if not await self._read_backing(export, buf, offset):
                await call(image.readinto, buf, offset)
            return conn.reply_read(
                req.cookie, offset, memoryview(buf), df=bool(flags & wire.CMD_FLAG_DF)
            )
        if command == wire.CMD_WRITE:
            data = req.data if req.data is not None else b""
            await call(_write, image, data, offset, fua)
        elif command == wire.CMD_FLUSH:
            await call(image.flush)
        elif command == wire.CMD_TRIM:
            await call(_then_flush(image, fua, image.discard), offset, length)
        elif command == wire.CMD_WRITE_ZEROES:
            may_unmap = not flags & wire.CMD_FLAG_NO_HOLE
            fast = bool(flags & wire.CMD_FLAG_FAST_ZERO)

            def zero() -> None:
                image.write_zeroes(offset, length, may_unmap=may_unmap, fast=fast)
                if fua:
                    image.flush()

            try:
                await call(zero)
            except SlowZeroError as exc:
                # "if NBD_CMD_FLAG_FAST_ZERO is set, the server MUST fail quickly with
                # NBD_ENOTSUP unless the request can be serviced in less time than a
                # corresponding NBD_CMD_WRITE, and SHOULD NOT alter the contents". The
                # library refuses before changing anything when zeroing would mean
                # writing zero bytes (partial clusters, or a file system that can
                # neither punch holes nor zero ranges in place).
                return conn.reply_error(req.cookie, wire.ENOTSUP, str(exc))
        elif command == wire.CMD_CACHE:
            # "performing the actions of NBD_CMD_READ but replying with just status":
            # the bytes land in the page cache (and, with copy-on-read, the image).
            await call(image.readinto, bytearray(length), offset)
        elif command == wire.CMD_BLOCK_STATUS:
            contexts = conn.contexts
            req_one = bool(flags & wire.CMD_FLAG_REQ_ONE)
            extents = await call(block_status, image, offset, length, contexts, req_one)
            return conn.reply_block_status(req.cookie, extents)
        return conn.reply_ok(req.cookie)

    async def _read_backing(self, export: Export, buf: bytearray, offset: int) -> bool:
        """:meth:`_send_backing_read` into ``buf``, awaited; False if it did not go
        there (or that connection broke)."""
        read = self._send_backing_read(export, memoryview(buf), offset)
        if read is None or export.reader is None:
            return False
        return await loop_store.finish(read, export.reader.store.uri, offset, len(buf))


def _write(image: AddCowImage, data: bytes, offset: int, fua: bool) -> None:
    image.write(data, offset, fua=fua)


_PAYLOAD_COMMANDS = (wire.CMD_READ, wire.CMD_WRITE, wire.CMD_CACHE)
_ALLOCATING_COMMANDS = (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES, wire.CMD_TRIM)


# -- where a request runs: the policy of the event loop's fast paths ------------------


def _writes_inline(req: Request) -> bool:
    """Whether a write may be tried in the event loop (the image may still refuse).

    Only small ones, so the loop is not held for long, and none with FUA, whose
    reply waits for the disk.
    """
    return (
        req.command == wire.CMD_WRITE
        and req.length <= INLINE_WRITE_MAX
        and not req.flags & wire.CMD_FLAG_FUA
    )


def _reads_inline(export: Export, req: Request) -> bool:
    """Whether a read runs in the event loop: a small one that only copies from files."""
    return (
        req.command == wire.CMD_READ
        and req.length <= INLINE_READ_MAX
        and export.image.reads_in_place(req.offset, req.length)
    )


def _sendfile_waits(client: _Client, req: Request) -> bool:
    """Whether an inline read must first let the socket drain: it may leave with
    ``sendfile``, which needs the transport empty (its bytes go straight to the
    socket), and replies are queued."""
    return req.length >= SENDFILE_MIN and bool(client.writer.transport.get_write_buffer_size())


async def _wait_for_sendfile(client: _Client, req: Request) -> None:
    """Before an inline read that may leave with ``sendfile``: let the socket drain."""
    if _sendfile_waits(client, req):
        client.flush()
        await _drain(client.writer)


def _replies_over_bound(client: _Client) -> bool:
    """Whether inline replies queued in the transport pass :data:`MAX_PAYLOAD`.

    Inline replies skip the payload budget; past this bound the session waits
    for the client to read, so a client that never reads its replies stops
    being read from.
    """
    return client.writer.transport.get_write_buffer_size() > MAX_PAYLOAD


async def _bound_inline_replies(client: _Client) -> None:
    """After an inline read: bound what it queued, as the budget bounds pool requests."""
    if _replies_over_bound(client):
        client.flush()
        await _drain(client.writer)


async def _drain(writer: asyncio.StreamWriter) -> None:
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


def _then_flush(
    image: AddCowImage, fua: bool, call: Callable[[int, int], None]
) -> Callable[[int, int], None]:
    def run(offset: int, length: int) -> None:
        call(offset, length)
        if fua:
            image.flush()

    return run


def block_status(
    image: AddCowImage, offset: int, length: int, contexts: Iterable[str], req_one: bool
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Descriptors (length, flags) per context for [offset, offset+length).

    ``base:allocation``: NBD_STATE_ZERO where the range reads as zero, and
    NBD_STATE_HOLE where no layer holds data for it (the ``data`` column of
    ``addcow map`` is false). ``qemu:allocation-depth``: 0 where no layer has
    the range, else the ``depth`` of ``addcow map`` plus one (1 = the image
    file, 2 = the first backing file, ...).
    """
    wanted = list(contexts)
    out: dict[str, list[list[int]]] = {name: [] for name in wanted}
    for count, ext in enumerate(image.block_status(offset, length)):
        for name in wanted:
            if name == wire.CONTEXT_BASE_ALLOCATION:
                status = (0 if ext.data else wire.STATE_HOLE) | (wire.STATE_ZERO if ext.zero else 0)
            else:
                status = ext.depth + 1 if ext.present else 0
            descs = out[name]
            if descs and descs[-1][1] == status:
                descs[-1][0] += ext.length
            else:
                descs.append([ext.length, status])
        # "If the client used the NBD_CMD_FLAG_REQ_ONE flag, each chunk contains
        # exactly one descriptor"; the server "MAY return fewer descriptors ... if
        # looking up the information would be too resource-intensive".
        if req_one and all(len(d) > 1 for d in out.values()):
            break
        if count + 1 >= MAX_EXTENTS:
            break
    result: list[tuple[str, list[tuple[int, int]]]] = []
    for name in wanted:
        descs = out[name][:1] if req_one else out[name]
        result.append((name, [(n, s) for n, s in descs]))
    return result


def _describe(req: Request) -> str:
    name = wire.COMMAND_NAMES.get(req.command, str(req.command))
    return f"{name} of {req.length} bytes at {req.offset}"


# -- sockets and stdio at start-up -------------------------------------------------------


@dataclass(frozen=True)
class BoundSocket:
    """A Unix socket this process bound: its path, and the inode it created there."""

    path: str
    dev: int
    ino: int

    def remove(self) -> None:
        """Unlink the path if it still names this socket (else someone else's file is there)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.dev, self.ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def bind_unix(path: str) -> tuple[socket.socket, BoundSocket]:
    """A new Unix socket listening at ``path``, and what it created there.

    Only a stale socket (one nobody listens on) is replaced; a live socket, a
    file, a folder or anything else at ``path`` is refused and left alone.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise _listen_error(path, exc) from exc
            _remove_stale_socket(path)
            try:
                sock.bind(path)
            except OSError as again:
                raise _listen_error(path, again) from again
        st = os.lstat(path)
        bound = BoundSocket(path, st.st_dev, st.st_ino)
        try:
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            bound.remove()
            raise _listen_error(path, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock, bound


def _address(peer: Any) -> str:
    """A peer address as people write it: ``127.0.0.1:4242``, ``[::1]:4242``; "" for none."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    return str(peer) if peer else ""


def socket_uri(sock: socket.socket, *, tls: bool = False) -> str:
    """The NBD URI of a listening Unix or TCP socket (``nbds`` ones with ``tls``)."""
    name = sock.getsockname()
    scheme = "nbds" if tls else "nbd"
    if sock.family == socket.AF_UNIX:
        path = name.decode(errors="surrogateescape") if isinstance(name, bytes) else name
        return f"{scheme}+unix:///?socket={path}"
    host, port = name[0], name[1]
    host_part = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host_part}:{port}/"


def stdio_problem() -> str | None:
    """What keeps stdin/stdout from carrying an NBD connection, or None if nothing does.

    Each must be a connected stream socket or a pipe; otherwise this names
    what it is: ``"a regular file"``, ``"a terminal"``, ... stdout is looked at
    first: in ``addcow serve --stdio img > file`` typed at a terminal, the file
    is the mistake.
    """
    for fd in (1, 0):
        try:
            st = os.fstat(fd)
        except OSError:
            return "a closed descriptor"
        if stat.S_ISFIFO(st.st_mode):
            continue
        if stat.S_ISSOCK(st.st_mode):
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type != socket.SOCK_STREAM:
                    return "a socket that is not a stream socket"
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return "a listening socket"
            continue
        if os.isatty(fd):
            return "a terminal"
        return sysio.file_kind(st.st_mode)
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _strerror(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno)


def _listen_error(path: str, exc: OSError) -> AddCowIOError:
    return AddCowIOError(f"{path}: cannot listen: {_strerror(exc)}", exc.errno)


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket nobody listens on; refuse to replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddCowError(f"{path}: exists and is {sysio.file_kind(st.st_mode)}, not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: the socket file holds no data. Unlink it only while
        # it is still the file examined.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.lstat(path), st):
                os.unlink(path)
        return
    except FileNotFoundError:
        return
    except (TimeoutError, BlockingIOError):
        pass  # a listener whose backlog is full: it is alive
    except OSError as exc:
        raise AddCowIOError(
            f"{path}: cannot tell whether a server listens there: {_strerror(exc)}", exc.errno
        ) from exc
    finally:
        probe.close()
    raise AddCowError(f"{path}: another server is listening on this socket")
