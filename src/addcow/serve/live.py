"""Finishing an image while it is served: copy on read, streaming, completion, detach.

``addcow serve --copy-on-read``
    After the reply to a READ (or CACHE) that touched unallocated clusters has
    been sent, the range goes into a bounded queue; one task per export takes
    ranges from it and runs :meth:`~addcow.image.AddCowImage.populate` in the
    thread pool. Populate copies only clusters that are still unallocated and
    claims them while it copies, so a cluster a client wrote (before, or while
    the copy ran) is never overwritten. The queue holds at most
    :data:`COR_QUEUE` ranges; when it is full the connection waits before it
    reads its next request (back pressure, bounded memory). Doing it after the
    reply keeps the read's latency that of a plain read.

``addcow serve --stream [--stream-rate BYTES/S]``
    A task per export populates the unallocated clusters in spans
    (:data:`SPAN_IDLE` bytes, :data:`SPAN_BUSY` while clients are active) in
    the thread pool; spans, commits and the rate limit (bytes read from the
    backing) are :mod:`addcow.streaming`'s, as for ``addcow stream``. It yields to client
    I/O: before each span it waits, up to :data:`MAX_YIELD` seconds, until no
    client call is in the pool and no request arrived for :data:`BUSY_WINDOW`
    seconds, so a busy client slows the stream down without ever stopping it.
    Progress is logged every :data:`PROGRESS_SECONDS` (logger
    ``addcow.serve.live``). The control socket may pause it (the span being
    copied finishes, the next waits), resume it and change its rate
    (:func:`pause_stream`, :func:`resume_stream`, :func:`set_stream_rate`);
    a new rate or a resume counts from that moment, so time spent paused
    never turns into a burst.

Starting and cancelling a stream while serving
    :func:`start_stream` (the control socket's ``stream-start``) starts the
    same task on a server started without ``--stream``, or again after a
    cancel; it walks the bitmap from the start, so what is allocated is
    skipped. :func:`cancel_stream` (``stream-cancel``) asks the task to stop:
    it starts no new span, lets the spans in the pool finish (each one's data
    is written before its bits are set, as for any populate) and ends; then
    the image is flushed, so what was copied is durable when the reply goes.
    Nothing is cancelled mid-call. Completion stays that of the image: when
    the last bit is set, by whichever stream, client or copy on read,
    :func:`check_complete` finishes it as below.

Completion (always, for writable exports)
    When every bit is set (by streaming, copy on read or client writes) the
    server waits for the library calls that were in the pool at that moment
    (the only ones that may still be reading the backing file; see
    "Completing while in use" in :mod:`addcow.image.finish`), then calls
    :meth:`~addcow.image.AddCowImage.release_backing`: the image is flushed,
    a version 2 header gets ALL_ALLOCATED, reads go straight to the raw file
    and the backing file is closed. With ``--detach-when-complete`` it then
    calls :meth:`~addcow.image.AddCowImage.detach_in_place`: the .add-cow file
    is removed and the connected clients go on using the raw file through the
    same open descriptor; from then on a FLUSH only syncs that file. Without
    it, :func:`detach` (the control socket's ``detach``) does the same later.

What this module needs of the server
    :class:`LivePool`, and nothing else: a way to run library calls in the
    server's thread pool (:meth:`LivePool.call`), how many of the calls in it
    serve clients (:attr:`LivePool.busy`, which streaming yields to), the calls
    in it at a given moment (:meth:`LivePool.pending`, which completion waits
    for) and whether the server is shutting down (:attr:`LivePool.stopping`;
    completion does not begin then). The server implements it (through
    :class:`~addcow.serve.routing.Router`, which owns the pool), keeps the
    dispatch of requests, and tells this module what each one did:
    :func:`check_complete` after a request that allocates, :func:`copy_on_read`
    after a read whose reply has been sent. The state it keeps per export
    (:class:`~addcow.serve.export.LiveOptions`,
    :class:`~addcow.serve.export.LiveState`) is a field of the
    :class:`~addcow.serve.export.Export`, defined beside it, below this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..errors import AddCowError
from ..image import Populated
from ..streaming import CommitPolicy, RateLimit, next_span
from ..units import human_size
from .export import (
    STREAM_CONCLUDED,
    STREAM_NONE,
    STREAM_PAUSED,
    STREAM_RUNNING,
    Export,
    LiveState,
)

log = logging.getLogger("addcow.serve.live")

COR_QUEUE = 256
"""Ranges waiting for copy on read, per export."""
SPAN_IDLE = 8 << 20
"""Bytes streamed per populate call when no client is active."""
SPAN_BUSY = 1 << 20
"""Bytes streamed per populate call while clients are active."""
BUSY_WINDOW = 0.02
"""A client that sent a request this recently (seconds) counts as active."""
MAX_YIELD = 0.2
"""Longest wait (seconds) for clients to go quiet before the next span."""
PROGRESS_SECONDS = 2.0
"""Seconds between progress lines."""
REMOTE_SPANS = 4
"""Spans streamed at once from a backing URI while no client is active and no rate
is set: their reads wait on the network, and one is in flight while another is
written."""


_T = TypeVar("_T")


class LivePool(Protocol):
    """The server's thread pool, as the live features use it."""

    def call(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` in the pool; :meth:`pending` includes it until it is done."""

    @property
    def busy(self) -> int:
        """Library calls in the pool on behalf of clients right now."""

    def pending(self) -> set[asyncio.Future[Any]]:
        """The calls in the pool right now (a new set)."""

    @property
    def stopping(self) -> bool:
        """Whether the server is shutting down."""


class LiveError(AddCowError):
    """A control request the export's state does not allow (nothing was changed)."""


def start(pool: LivePool, export: Export) -> None:
    """Start copy on read and streaming for a writable export; finish it if it is complete."""
    state = export.live
    if export.info.read_only:
        return
    if state.options.copy_on_read:
        state.cor_queue = asyncio.Queue(COR_QUEUE)
        state.tasks.append(asyncio.create_task(copy_on_read_worker(pool, export)))
    if state.options.stream and state.stream_status == STREAM_NONE:
        start_stream(pool, export, state.options.stream_rate)
    check_complete(pool, export)


def start_stream(pool: LivePool, export: Export, rate: int | None) -> bool:
    """Start streaming the export at ``rate`` bytes per second (None or 0: no limit).

    False, and the stream concluded, if the export is already complete. A
    :class:`LiveError` if it is read-only, already streaming or the server is
    stopping.
    """
    state = export.live
    name = export.info.name
    if export.info.read_only:
        raise LiveError(f"{name}: read-only export; streaming needs it writable")
    if state.stream_status in (STREAM_RUNNING, STREAM_PAUSED):
        raise LiveError(f"{name}: already streaming (status {state.stream_status})")
    if pool.stopping:
        raise LiveError(f"{name}: the server is shutting down")
    state.rate = RateLimit(rate or None)
    if export.image.complete:
        state.stream_status = STREAM_CONCLUDED
        return False
    state.stream_status = STREAM_RUNNING
    state.stream_done = state.stream_read = 0
    state.cancelling = False
    state.resumed.set()
    state.tasks = [task for task in state.tasks if not task.done()]
    state.stream_task = asyncio.create_task(stream(pool, export))
    state.tasks.append(state.stream_task)
    return True


def check_complete(pool: LivePool, export: Export) -> None:
    """Once every cluster is allocated, release the backing (and detach) once."""
    state = export.live
    if state.finishing or export.info.read_only or not export.image.complete:
        return
    if export.image.closed or pool.stopping:
        return
    state.finishing = True
    state.finish_task = asyncio.create_task(finish(pool, export))
    state.tasks.append(state.finish_task)


async def copy_on_read(export: Export, offset: int, length: int) -> None:
    """After a read's reply: queue its range if it touched the backing (waits if full)."""
    queue = export.live.cor_queue
    if queue is not None and has_unallocated(export, offset, length):
        await queue.put((offset, length))


def has_unallocated(export: Export, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) touches a cluster still read from the backing."""
    image = export.image
    if length <= 0 or image.complete:
        return False
    bits = image.cluster_bits
    first, last = offset >> bits, (offset + length - 1) >> bits
    if first == last:
        return not image.bitmap.data[first >> 3] >> (first & 7) & 1
    return image.bitmap.find(first, last + 1, False) <= last


async def copy_on_read_worker(pool: LivePool, export: Export) -> None:
    """Populate the ranges clients read from the backing, one after the other."""
    state, image = export.live, export.image
    queue = state.cor_queue
    assert queue is not None
    buffer = bytearray(4 << 20)
    failures = 0
    while True:
        offset, length = await queue.get()
        try:
            # Merge ranges that are already waiting and touch this one.
            while not queue.empty() and length < (8 << 20):
                nxt_off, nxt_len = queue.get_nowait()
                queue.task_done()
                if nxt_off == offset + length:
                    length += nxt_len
                else:
                    await _populate(pool, export, offset, length, buffer)
                    offset, length = nxt_off, nxt_len
            await _populate(pool, export, offset, length, buffer)
        except AddCowError as exc:
            failures += 1
            if failures <= 3:
                log.warning("%s: copy on read failed: %s", image.path, exc)
        finally:
            queue.task_done()
        check_complete(pool, export)


async def _populate(
    pool: LivePool, export: Export, offset: int, length: int, buffer: bytearray
) -> None:
    if has_unallocated(export, offset, length):
        await pool.call(export.image.populate, offset, length, buffer)


async def stream(pool: LivePool, export: Export) -> None:
    """Copy every unallocated cluster in the background, yielding to clients.

    A stream that fails (a read of the backing or a write of the image file
    fails, the golden server stays away past the retry window) logs one line
    and ends with status ``none``, as a cancelled one does: what it copied
    keeps its bits, clients are served as before, and ``stream-start`` may try
    again (QEMU's block-stream likewise ends its job on an error).
    """
    try:
        await _stream(pool, export)
    except (AddCowError, OSError) as exc:
        export.live.stream_status = STREAM_NONE
        log.error("%s: stream failed: %s", export.image.path, exc)


async def _stream(pool: LivePool, export: Export) -> None:
    state, image = export.live, export.image
    rate = state.rate = state.rate or RateLimit(state.options.stream_rate)
    total = image.unallocated_bytes
    log.info("%s: streaming %s from the backing file", image.path, human_size(total))
    run = _ServedStream(pool, export, total)
    pos = 0
    wrapped = False
    try:
        while not image.complete and not state.cancelling:
            if not state.resumed.is_set():
                await run.settle_all()
                await state.resumed.wait()
                rate.restart(rate.rate, state.stream_read)
                continue
            busy = await _yield_to_clients(pool, state)
            wide = bool(image.header.backing_uri) and not rate.rate and not busy
            while len(run.running) >= (REMOTE_SPANS if wide else 1):
                await run.settle()
            span = next_span(image, pos, rate.span(SPAN_BUSY if busy else SPAN_IDLE))
            if span is None:
                if run.running:
                    await run.settle_all()  # what they copy decides what is left
                    continue
                if wrapped:
                    # The rest is being allocated by client writes right now.
                    await asyncio.sleep(0.01)
                pos, wrapped = 0, True
                continue
            wrapped = False
            lo, hi, pos = span
            run.start(lo, hi)
        await run.settle_all()
    finally:
        run.abandon()
    ended = "complete" if image.complete else "cancelled"
    log.info(
        "%s: stream %s: %s copied, %s left as zero, %.2f s",
        image.path,
        ended,
        human_size(run.copied),
        human_size(run.zero),
        time.monotonic() - rate.started,
    )
    if not image.complete:
        state.stream_status = STREAM_NONE
        return
    state.stream_status = STREAM_CONCLUDED
    check_complete(pool, export)


class _ServedStream:
    """The spans a server's stream has in the pool, and what finishing one does."""

    def __init__(self, pool: LivePool, export: Export, total: int) -> None:
        self.pool, self.export, self.total = pool, export, total
        self.commits = CommitPolicy()
        self.running: dict[asyncio.Future[Populated], tuple[int, bytearray]] = {}
        self.buffers: list[bytearray] = []
        self.copied = self.zero = 0
        self.last_log = time.monotonic()

    def start(self, lo: int, hi: int) -> None:
        buffer = self.buffers.pop() if self.buffers else bytearray(4 << 20)
        call = self.pool.call(self.export.image.populate, lo, hi - lo, buffer)
        self.running[call] = (hi - lo, buffer)

    async def settle(self) -> None:
        """Wait for a span to finish and account for it."""
        done, _ = await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
        for call in done:
            length, buffer = self.running.pop(call)
            self.buffers.append(buffer)
            await self._finished(length, call.result())

    async def settle_all(self) -> None:
        while self.running:
            await self.settle()

    def abandon(self) -> None:
        """After a failure or a cancel: the spans still in the pool end on their own
        (the server's shutdown waits for them); their errors are dropped, the first
        one raised already."""
        for call in self.running:
            call.add_done_callback(_drop_result)
        self.running.clear()

    async def _finished(self, length: int, did: Populated) -> None:
        state, image = self.export.live, self.export.image
        rate = state.rate
        assert rate is not None
        self.copied, self.zero = self.copied + did.written, self.zero + did.zero
        state.stream_done += length
        state.stream_read += did.read
        state.stream_copied += did.written
        if self.commits.copied(did.written):
            await self.pool.call(image.flush)
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_SECONDS:
            self.last_log = now
            left = image.unallocated_bytes
            total = self.total
            percent = 100.0 * (total - left) / total if total else 100.0
            log.info(
                "%s: stream progress: %s of %s (%.0f%%), %s/s",
                image.path,
                human_size(total - left),
                human_size(total),
                percent,
                human_size(state.stream_done / max(now - rate.started, 1e-9)),
            )
        ahead = rate.delay(state.stream_read)
        if ahead > 0 and not state.cancelling:
            # A wait computed under a slow rate must not outlast a new one (or a cancel).
            state.rate_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.rate_changed.wait(), ahead)


def _drop_result(call: asyncio.Future[Populated]) -> None:
    if not call.cancelled():
        call.exception()


async def _yield_to_clients(pool: LivePool, state: LiveState) -> bool:
    """Wait (bounded) for clients to be quiet; True if they were active."""
    deadline = time.monotonic() + MAX_YIELD
    busy = False
    while time.monotonic() < deadline:
        quiet = time.monotonic() - state.last_request >= BUSY_WINDOW
        if quiet and not pool.busy:
            return busy
        busy = True
        await asyncio.sleep(BUSY_WINDOW / 2)
    return busy


async def finish(pool: LivePool, export: Export) -> None:
    """The image is complete: release the backing, then detach if asked."""
    image = export.image
    # Only calls already in the pool may still be reading the backing file.
    pending = pool.pending()
    if pending:
        await asyncio.wait(pending)
    try:
        had_backing = image.backing is not None
        await pool.call(image.release_backing)
        await export.close_readers()
        log.info(
            "%s: complete: every cluster is in %s, ALL_ALLOCATED is durable%s; "
            "serving the raw file directly",
            image.path,
            image.image_path,
            ", backing file closed" if had_backing else "",
        )
        if export.live.options.detach_when_complete:
            raw = await pool.call(image.detach_in_place)
            log.info("%s: detached: removed the .add-cow file; serving %s", image.path, raw)
    except AddCowError as exc:
        log.error("%s: finishing the image failed: %s", image.path, exc)
    finally:
        export.live.changed.set()


def _streaming(export: Export) -> LiveState:
    state = export.live
    if state.stream_status == STREAM_NONE:
        raise LiveError(f"{export.info.name}: not streaming (stream-start starts a stream)")
    return state


def pause_stream(export: Export) -> bool:
    """Pause the export's stream after the span being copied; False if it was paused."""
    state = _streaming(export)
    if state.stream_status != STREAM_RUNNING:
        return False
    state.resumed.clear()
    state.stream_status = STREAM_PAUSED
    log.info("%s: stream paused", export.image.path)
    return True


def resume_stream(export: Export) -> bool:
    """Resume a paused stream; False if it was not paused."""
    state = _streaming(export)
    if state.stream_status != STREAM_PAUSED:
        return False
    state.stream_status = STREAM_RUNNING
    state.resumed.set()
    state.rate_changed.set()
    log.info("%s: stream resumed", export.image.path)
    return True


async def cancel_stream(pool: LivePool, export: Export) -> bool:
    """Stop the export's stream after the spans in the pool, then flush; False if it
    was not running or paused (it concluded, or another cancel stopped it)."""
    state = _streaming(export)
    task = state.stream_task
    if state.stream_status not in (STREAM_RUNNING, STREAM_PAUSED) or task is None:
        return False
    first = not state.cancelling
    if first:
        state.cancelling = True
        state.resumed.set()  # a paused stream wakes up to end
        state.rate_changed.set()  # and one waiting to keep its rate
        log.info("%s: stream cancelling", export.image.path)
    await asyncio.wait([task])
    image = export.image
    if not image.closed and not image.detached:
        await pool.call(image.flush)
    return first and state.stream_status == STREAM_NONE


def set_stream_rate(export: Export, rate: int) -> None:
    """Stream at most ``rate`` bytes per second from now on (0: no limit)."""
    state = _streaming(export)
    if rate < 0:
        raise LiveError(
            f"stream rate: expected 0 (no limit) or more bytes per second, found {rate}"
        )
    limit = state.rate = state.rate or RateLimit(None)
    limit.restart(rate or None, state.stream_read)
    state.rate_changed.set()
    log.info("%s: stream rate %s", export.image.path, f"{rate} bytes/s" if rate else "unlimited")


async def detach(pool: LivePool, export: Export) -> str:
    """Remove the .add-cow file of a complete export and serve its raw file; its path.

    The image is released first (as on completion), so the header that says
    every cluster is allocated is durable before the file goes.
    """
    image = export.image
    if export.info.read_only:
        raise LiveError(f"{export.info.name}: read-only export; detach needs it writable")
    if not image.detached:
        if not image.complete:
            left = image.total_clusters - image.allocated_clusters
            raise LiveError(
                f"{export.info.name}: not complete: {left} of {image.total_clusters} clusters "
                "are still read from the backing file"
            )
        check_complete(pool, export)
        if export.live.finish_task is not None:
            await asyncio.shield(export.live.finish_task)
    if image.detached:
        return image.image_path
    if image.backing is not None:  # finishing failed (logged): do not go on
        raise LiveError(f"{export.info.name}: the backing file could not be released")
    raw = await pool.call(image.detach_in_place)
    log.info("%s: detached: removed the .add-cow file; serving %s", image.path, raw)
    return raw


async def stop_tasks(export: Export, grace: float) -> None:
    """At shutdown: let queued copy on read finish (bounded), stop the rest."""
    state = export.live
    if state.cor_queue is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.cor_queue.join(), grace)
    for task in state.tasks:
        task.cancel()
    if state.tasks:
        await asyncio.wait(state.tasks, timeout=grace)
