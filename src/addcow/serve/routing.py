"""How a request is served: in the event loop, on the loop's connection to an NBD
store, or in the thread pool.

Design
    Each request the session reads goes to :meth:`Router._request`, which
    decides where it runs, with one small function per policy decision
    (``_writes_inline``, ``_reads_inline``, ``_sendfile_waits``,
    ``_replies_over_bound``). A read asks the image one question first,
    :meth:`~addcow.image.AddCowImage.route`, and every decision and action
    takes that answer (:class:`~addcow.stores.base.Route`): FILE or INLINE
    reads in the loop, FILE with its descriptor and offset for ``sendfile``,
    REMOTE with its store and offset for the loop's connection to that
    store, POOL for a thread. An answer holds only until the backing may be
    released (see "Completing while in use" in :mod:`addcow.image.finish`),
    so it is used before the request waits for anything; a read that waits
    first (for the socket to drain, for the budget) asks again when it acts.

    Plain reads (no flags, shorter than ``SENDFILE_MIN``)
    come as a run the session took from the connection's buffer at once
    (:meth:`~addcow.nbd.connection.ServerConnection.next_plain_reads`), and
    :meth:`Router._plain_reads` answers each whose route is FILE with one
    ``preadv`` into a reply buffer and its reply held: no event, request,
    task or coroutine per read. The first read it cannot answer so (any
    other route, a short read) goes to :meth:`Router._request` like any
    request, and the run goes on after it.

    The hot paths stay in the event loop: reads up to ``INLINE_READ_MAX``, and
    writes up to ``INLINE_WRITE_MAX`` into allocated clusters or inside one
    cluster (copy on write included, when the backing bytes are in the page
    cache). An inline read is read into a reply buffer of the connection
    (:mod:`addcow.serve.session`), or, from ``SENDFILE_MIN`` bytes on and when
    the range lies in one file, sent with ``sendfile`` (page cache to socket,
    no copy in Python); the small replies of inline requests are held and sent
    together when the session next waits.

    A read whose route is REMOTE (it lies wholly in one NBD store: the
    backing, or the store holding a qcow2 golden image's file, at the
    route's offset) needs no thread either: the loop sends it on a
    connection of its own to that server (the export's
    :class:`~addcow.serve.loop_reader.LoopReader` of the store) and replies
    from the callback when the data is in the reply buffer. Where that
    connection cannot take it (TLS, no multi-conn, it broke), the pool reads
    it through the image, whose store reconnects as it must.

    Everything else runs in the thread pool (:meth:`Router._execute`, one
    task per request, counted against the connection's budget); its reply
    leaves when the library call is done, so replies leave in completion
    order ("Replies need not be sent in the same order as requests",
    proto.md).

The pool
    :class:`Router` owns the thread pool and knows which library calls are in
    it; it is the :class:`~addcow.serve.live.LivePool` of
    :mod:`addcow.serve.live`, and tells it what requests did:
    ``live.check_complete`` after one that allocates, ``live.copy_on_read``
    after a read's reply. :class:`~addcow.serve.server.NBDServer` is a
    Router: it adds the sockets, the export table, the connections and the
    shutdown, and hands each request of a session to :meth:`Router._request`.

Errors
    Library errors (:class:`~addcow.errors.AddCowError`) and ``OSError`` become
    NBD error replies (:func:`nbd_errno`); a request never takes the server
    down.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
from ..nbd import wire
from ..nbd.connection import ServerConnection
from ..nbd.events import Request
from ..stores.base import Route, RouteKind
from . import live
from . import loop_reader as loop_store
from .export import Export, block_status
from .limits import INLINE_READ_MAX, INLINE_WRITE_MAX, MAX_PAYLOAD, MAX_REQUESTS, SENDFILE_MIN
from .session import Client, drain

log = logging.getLogger("addcow.serve")

_T = TypeVar("_T")


class Router:
    """Serves the requests of every connection, and owns the thread pool they may run in."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="addcow-io")
        # Request tasks in the pool (shutdown waits for them), and whether the
        # server is stopping.
        self._requests: set[asyncio.Task[None]] = set()
        self._stopping = False
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
        """Whether :meth:`~addcow.serve.server.NBDServer.stop` has been called."""
        return self._stopping

    async def _client_call(self, fn: Callable[..., _T], *args: Any) -> _T:
        self._client_calls += 1
        try:
            return await self.call(fn, *args)
        finally:
            self._client_calls -= 1

    # -- requests -----------------------------------------------------------------------

    def _request(
        self, client: Client, conn: ServerConnection, req: Request
    ) -> Coroutine[Any, Any, None] | None:
        """Serve one request: in the event loop where the policy allows, else in the pool.

        Returns None once the session may read on (an inline request has been
        answered or its reply held, a read sent to an NBD store), else what
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
        if req.command in _ALLOCATING_COMMANDS and not export.live.writes_open.is_set():
            return self._held_write(client, conn, export, req)
        return self._dispatch(client, conn, export, req)

    async def _serve_plain_reads(
        self,
        client: Client,
        conn: ServerConnection,
        export: Export,
        reads: list[tuple[int, int, int]],
    ) -> None:
        """A run of plain reads: answered in place (:meth:`_plain_reads`), any read it
        leaves through :meth:`_request`, in turn; then inline replies are bounded."""
        i = 0
        while i < len(reads):
            i = self._plain_reads(client, conn, export, reads, i)
            if i < len(reads):
                cookie, offset, length = reads[i]
                read = Request(cookie, wire.CMD_READ, 0, offset, length, None)
                waiting = self._request(client, conn, read)
                if waiting is not None:
                    await waiting
                i += 1
        if _replies_over_bound(client):
            await _bound_inline_replies(client)

    def _plain_reads(
        self,
        client: Client,
        conn: ServerConnection,
        export: Export,
        reads: list[tuple[int, int, int]],
        first: int,
    ) -> int:
        """Answer plain reads (cookie, offset, length) from ``reads[first]`` on while
        their route is one file; return the index of the first one left (the
        caller sends it to :meth:`_request`), or ``len(reads)``."""
        # Bound once per run: the loop below is the server's hottest.
        route_of, reply_buffer, preadv = export.image.route, client.reply_buffer, os.preadv
        reply, hold, file, headroom = (
            conn.reply_read_into,
            client.hold_read,
            RouteKind.FILE,
            wire.READ_HEADROOM,
        )
        done = first
        served = 0
        try:
            for cookie, offset, length in reads[first:]:
                route = route_of(offset, length)
                if route.kind is not file:
                    break
                end = headroom + length
                buf = reply_buffer(end)
                try:
                    n = preadv(route.fd, [memoryview(buf)[headroom:end]], route.offset)
                except OSError as exc:
                    n = -1
                    read = Request(cookie, wire.CMD_READ, 0, offset, length, None)
                    _read_failed(client, conn, read, exc, buf)
                if n == length:
                    hold(reply(buf, cookie, offset, length), buf)
                elif n >= 0:  # a short read: the image's own path reads or reports the rest
                    client.free_buffers.append(buf)
                    break
                done += 1
                served += length
        finally:
            if done > first:
                export.live.last_request = time.monotonic()
                client.counters.count_reads(done - first, served)
                export.counters.count_reads(done - first, served)
        return done

    def _dispatch(
        self, client: Client, conn: ServerConnection, export: Export, req: Request
    ) -> Coroutine[Any, Any, None] | None:
        """:meth:`_request` once the request is counted and may run."""
        if _writes_inline(req):
            reply = self._inline_write(client, conn, export, req)
            if reply is not None:
                client.hold(reply)
                return None
        if req.command != wire.CMD_READ:
            return self._submit(client, req)
        route = export.image.route(req.offset, req.length)
        if _reads_inline(req, route):
            if export.live.copies_on_read or _sendfile_waits(client, req):
                return self._serve_inline_read(client, conn, export, req, route)
            # _serve_inline_read with nothing to wait for before the read.
            self._inline_read(client, conn, export, req, route)
            return _bound_inline_replies(client) if _replies_over_bound(client) else None
        if self._start_backing_read(client, conn, export, req, route):
            return None
        return self._submit(client, req, remote=route.kind is RouteKind.REMOTE)

    async def _held_write(
        self, client: Client, conn: ServerConnection, export: Export, req: Request
    ) -> None:
        """A write while a handoff holds the export's writes (:mod:`addcow.serve.handoff`):
        it waits, then runs; the session reads nothing more from this connection
        meanwhile, so the connection's requests keep their order."""
        client.flush()
        await export.live.writes_open.wait()
        waiting = self._dispatch(client, conn, export, req)
        if waiting is not None:
            await waiting

    async def _serve_inline_read(
        self, client: Client, conn: ServerConnection, export: Export, req: Request, route: Route
    ) -> None:
        """An inline read with the waits around it: for sendfile, for room, for copy on read."""
        if _sendfile_waits(client, req):
            client.flush()
            await drain(client.writer)
            route = export.image.route(req.offset, req.length)  # asked again after a wait
        self._inline_read(client, conn, export, req, route)
        await _bound_inline_replies(client)
        if export.live.copies_on_read:
            client.flush()
            await live.copy_on_read(export, req.offset, req.length)

    async def _submit(self, client: Client, req: Request, *, remote: bool = False) -> None:
        """Hand a request to the pool once the budget has room; its task sends the reply.

        ``remote``: a read whose route was REMOTE; its task tries the loop's
        connection to that store first (:meth:`_read_remote`).
        """
        cost = req.length if req.command in _PAYLOAD_COMMANDS else 0
        client.flush()
        await client.budget.acquire(cost)
        task = asyncio.create_task(self._execute(client, req, cost, remote))
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _inline_read(
        self, client: Client, conn: ServerConnection, export: Export, req: Request, route: Route
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
        if req.length >= SENDFILE_MIN and self._sendfile_read(client, conn, export, req, route):
            return
        end = wire.READ_HEADROOM + req.length
        buf = client.reply_buffer(end)
        try:
            export.image.readinto(memoryview(buf)[wire.READ_HEADROOM : end], req.offset)
        except (AddCowError, OSError) as exc:
            _read_failed(client, conn, req, exc, buf)
            return
        df = bool(req.flags & wire.CMD_FLAG_DF)
        client.hold_read(conn.reply_read_into(buf, req.cookie, req.offset, req.length, df=df), buf)

    def _start_backing_read(
        self, client: Client, conn: ServerConnection, export: Export, req: Request, route: Route
    ) -> bool:
        """Send a read whose route is REMOTE on the loop's own connection to its
        store, its reply to follow when the data comes; False if it cannot go there.

        No task and no thread: :meth:`_backing_read_done` replies from the
        reader's callback, into a reply buffer as inline reads do. Reads with
        copy on read take the task path (:meth:`_read_remote`), whose queue may
        make them wait. At most :data:`MAX_REQUESTS` of a connection's reads
        are here at once, besides the budget of its pool requests.
        """
        reader = _remote_reader(export, route)
        if reader is None or client.backing_reads >= MAX_REQUESTS or export.live.copies_on_read:
            return False
        end = wire.READ_HEADROOM + req.length
        buf = client.reply_buffer(end)
        read = self._send_backing_read(reader, memoryview(buf)[wire.READ_HEADROOM : end], route)
        if read is None:
            client.free_buffers.append(buf)
            return False
        client.backing_reads += 1
        client.tasks.add(read)
        done = functools.partial(self._backing_read_done, client, req, buf, reader.store.uri)
        read.add_done_callback(done)
        return True

    def _send_backing_read(
        self, reader: loop_store.LoopReader, view: memoryview, route: Route
    ) -> asyncio.Future[Any] | None:
        """Send a read of ``route.offset`` in the reader's store on the loop's own
        connection to it; None if that connection cannot take it now.

        The read is one of :meth:`pending` until it is done, so completion waits
        for it before it releases the backing, as for a call in the pool; and it
        counts as a client's call, which streaming yields to.
        """
        read = reader.read(view, route.offset)
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
        self, client: Client, req: Request, buf: bytearray, uri: str, read: asyncio.Future[Any]
    ) -> None:
        """Reply to a read :meth:`_start_backing_read` sent to the NBD store at
        ``uri`` (or hand it to the pool)."""
        client.backing_reads -= 1
        client.tasks.discard(read)
        conn, export = client.conn, client.export
        if read.cancelled() or conn is None or export is None or client.writer.is_closing():
            return
        try:
            done = loop_store.outcome(read, uri, req.offset, req.length)
        except AddCowError as exc:
            log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
            client.send(conn.reply_error(req.cookie, nbd_errno(exc), str(exc)))
            return
        if not done:  # the connection broke: the store reads it, reconnecting as needed
            if not self._stopping:
                task = asyncio.create_task(self._submit(client, req, remote=True))
                client.tasks.add(task)
                task.add_done_callback(client.tasks.discard)
            return
        df = bool(req.flags & wire.CMD_FLAG_DF)
        client.hold_read(conn.reply_read_into(buf, req.cookie, req.offset, req.length, df=df), buf)
        client.flush_soon()

    def _sendfile_read(
        self, client: Client, conn: ServerConnection, export: Export, req: Request, route: Route
    ) -> bool:
        """Send a read whose route is FILE with ``sendfile``; False if it cannot.

        The bytes are at the route's offset in its file: the guest offset in the
        image file or a raw backing, the host offset of a run of normal
        clusters in a qcow2 file. Only when the transport has nothing queued
        (so the bytes go straight to the socket in order) and the range starts
        with data in that file (one ``lseek(SEEK_DATA)``; a range that starts
        in a file hole is left to the buffered path, which sends it as
        OFFSET_HOLE). Zero bytes after that start go out as data: a server MAY
        send holes, it need not. If the socket fills up, the rest is read into
        a buffer and queued; if that read fails, the header has promised bytes
        that cannot follow, so the connection is closed.
        """
        offset, length = req.offset, req.length
        fd, at = route.fd, route.offset
        writer = client.writer
        if route.kind is not RouteKind.FILE or client.fd < 0 or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size():
            return False
        try:
            if os.lseek(fd, at, os.SEEK_DATA) != at:
                return False
        except OSError:  # ENXIO: no data from offset to the end of the file
            return False
        head, tail = conn.reply_read_around(req.cookie, offset, length)
        sent = 0
        if client.send(head):
            while sent < length:
                try:
                    count = os.sendfile(client.fd, fd, at + sent, length - sent)
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
        self, client: Client, conn: ServerConnection, export: Export, req: Request
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

    async def _execute(self, client: Client, req: Request, cost: int, remote: bool) -> None:
        conn, export = client.conn, client.export
        try:
            if conn is None or export is None:  # pragma: no cover - set before requests
                return
            try:
                reply = await self._perform(conn, export, req, remote)
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
            await drain(client.writer)
        finally:
            await client.budget.release(cost)

    async def _perform(
        self, conn: ServerConnection, export: Export, req: Request, remote: bool
    ) -> bytes | list[bytes | memoryview]:
        image = export.image
        call = self._client_call
        command, flags, offset, length = req.command, req.flags, req.offset, req.length
        fua = bool(flags & wire.CMD_FLAG_FUA)
        if command == wire.CMD_READ:
            buf = bytearray(length)
            if not (remote and await self._read_remote(export, buf, offset)):
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

    async def _read_remote(self, export: Export, buf: bytearray, offset: int) -> bool:
        """:meth:`_send_backing_read` into ``buf``, awaited; False if it did not go
        there (or that connection broke). The route is asked here, when the read
        is sent: the task may have waited since :meth:`_request` asked."""
        route = export.image.route(offset, len(buf))
        reader = _remote_reader(export, route)
        read = None if reader is None else self._send_backing_read(reader, memoryview(buf), route)
        if reader is None or read is None:
            return False
        return await loop_store.finish(read, reader.store.uri, offset, len(buf))


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


def _write(image: AddCowImage, data: bytes, offset: int, fua: bool) -> None:
    image.write(data, offset, fua=fua)


_PAYLOAD_COMMANDS = (wire.CMD_READ, wire.CMD_WRITE, wire.CMD_CACHE)
_ALLOCATING_COMMANDS = (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES, wire.CMD_TRIM)


# -- where a request runs: the policy of the event loop's fast paths ------------------


def _read_failed(
    client: Client, conn: ServerConnection, req: Request, exc: Exception, buf: bytearray
) -> None:
    """An inline read failed: one log line, its error reply sent, ``buf`` free again."""
    log.warning("%s: %s failed: %s", client.label, _describe(req), exc)
    client.send(conn.reply_error(req.cookie, nbd_errno(exc), str(exc)))
    client.free_buffers.append(buf)


PLAIN_READ_MAX = min(INLINE_READ_MAX, SENDFILE_MIN - 1)
"""The longest read :meth:`Router._plain_reads` answers (longer ones may leave with
``sendfile``)."""


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


def _reads_inline(req: Request, route: Route) -> bool:
    """Whether a read runs in the event loop: a small one that only copies from
    files or fills zeros (its route is FILE or INLINE)."""
    return req.length <= INLINE_READ_MAX and route.in_place


def _remote_reader(export: Export, route: Route) -> loop_store.LoopReader | None:
    """The export's loop reader of the store a REMOTE route names; None for any
    other route, or a store the loop cannot read."""
    return export.reader_of(route.store) if route.kind is RouteKind.REMOTE else None


def _sendfile_waits(client: Client, req: Request) -> bool:
    """Whether an inline read must first let the socket drain: it may leave with
    ``sendfile``, which needs the transport empty (its bytes go straight to the
    socket), and replies are queued."""
    return req.length >= SENDFILE_MIN and bool(client.writer.transport.get_write_buffer_size())


def _replies_over_bound(client: Client) -> bool:
    """Whether inline replies queued in the transport pass :data:`MAX_PAYLOAD`.

    Inline replies skip the payload budget; past this bound the session waits
    for the client to read, so a client that never reads its replies stops
    being read from.
    """
    return client.writer.transport.get_write_buffer_size() > MAX_PAYLOAD


async def _bound_inline_replies(client: Client) -> None:
    """After an inline read: bound what it queued, as the budget bounds pool requests."""
    if _replies_over_bound(client):
        client.flush()
        await drain(client.writer)


def _then_flush(
    image: AddCowImage, fua: bool, call: Callable[[int, int], None]
) -> Callable[[int, int], None]:
    def run(offset: int, length: int) -> None:
        call(offset, length)
        if fua:
            image.flush()

    return run


def _describe(req: Request) -> str:
    name = wire.COMMAND_NAMES.get(req.command, str(req.command))
    return f"{name} of {req.length} bytes at {req.offset}"
