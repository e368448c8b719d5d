"""From a fresh add-cow image to a standalone raw disk: streaming and detaching.

Streaming copies every unallocated cluster from the backing chain into the
image file with :meth:`AddCowImage.populate`, in spans of up to
:data:`STREAM_SPAN` bytes (less under a rate: :mod:`addcow.streaming` says
why), :data:`STREAM_THREADS` spans at once. Its progress is durable as it
goes (:mod:`addcow.streaming` says when it commits), and
flush writes data before bits (see :mod:`addcow.image.core`). A stream killed at
any moment (Ctrl-C, kill -9, power loss) therefore leaves an image that reads
correctly, and running it again skips every cluster whose bit reached the disk
and copies the rest: the result is the same as an uninterrupted run. Spans
finish in any order; their writeback is started in file order, so the file
system lays the file out as one thread would, by a thread of its own, so that
no copying thread waits on a busy disk for a hint. From a backing URI (without a
rate) spans are smaller (:data:`STREAM_SPAN_REMOTE`), more are copied at once
(:data:`STREAM_THREADS_REMOTE`), and the written spans are settled as the
copy goes (:data:`SETTLE_LAG`): a performance hint only, since durability
still comes from the commits' fdatasync.

Detaching removes the .add-cow file of a complete image (every bit set, or
ALL_ALLOCATED), leaving the image file as a plain raw disk. It happens while
holding the image's exclusive lock, so no other addcow user can have it open.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from . import sysio
from .errors import (
    AddCowError,
    AmendError,
    BackingFormatError,
    IncompleteImageError,
    RemoteChangedError,
)
from .format import V1_CLUSTER_BITS, V1_HEADER_SIZE, Header
from .image import AddCowImage
from .image.metafile import open_image_file
from .locking import lock_raw
from .stores import BlockSource, open_backing, read_as_backing, registry, remote
from .stores.chain import ChainGuard, resolve_name
from .stores.magic import choose_backing_format
from .streaming import CommitPolicy, RateLimit, next_span

STREAM_SPAN = 32 << 20
"""Most bytes copied per populate call while streaming."""

WRITEBACK_BYTES = 8 << 20
"""Commit starts writeback of the raw backing after copying this many bytes."""

STREAM_THREADS = min(4, os.cpu_count() or 1)
"""Spans streamed at once: reading the backing, scanning it for zeros and writing
overlap across cores (``preadv``, ``copy_file_range``, ``fdatasync``, zlib and zstd
release the GIL)."""

STREAM_SPAN_REMOTE = 8 << 20
"""Span of a stream from a backing URI without a rate: smaller spans start their
writeback sooner, and SETTLE_LAG of them bound what is not yet on disk."""

SETTLE_LAG = 2
"""Spans a stream from a backing URI leaves in writeback before it waits for the
oldest and drops its pages from the page cache (as nbdcopy does): the copied
pages neither pile up dirty nor crowd the cache, and writing them to disk
overlaps the copy."""

STREAM_THREADS_REMOTE = 8
"""Spans streamed at once from a backing URI: their reads wait on the network,
not on a core, and one span's read is in flight while others are written."""


class StreamStats:
    """What a stream did: bytes written, bytes left as holes, bytes read from the
    backing (what a rate counts), seconds taken."""

    def __init__(self) -> None:
        self.copied = 0
        self.zero = 0
        self.read = 0
        self.seconds = 0.0

    @property
    def total(self) -> int:
        return self.copied + self.zero


def stream(
    image: AddCowImage,
    *,
    rate: int | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> StreamStats:
    """Copy every unallocated cluster from the backing chain; mark the image complete.

    ``rate`` limits the copy to about that many bytes per second read from the
    backing chain (ranges it reports as holes or zero are not read and cost
    nothing: :class:`~addcow.image.Populated`). ``progress`` is
    called with the number of virtual bytes dealt with after each step.
    ``threads`` spans are copied at once (the calling thread is one of them;
    default :data:`STREAM_THREADS`, or :data:`STREAM_THREADS_REMOTE` from a
    backing URI without a rate: under a rate more spans at once only make the
    first burst larger).
    """
    remote_copy = bool(image.header.backing_uri) and rate is None
    if threads is None:
        threads = STREAM_THREADS_REMOTE if remote_copy else STREAM_THREADS
    run = _StreamRun(image, rate, progress, remote=remote_copy)
    try:
        _run_stream(image, run, threads)
    finally:
        if run.settle_fd >= 0:
            os.close(run.settle_fd)
    image.flush()
    run.stats.seconds = time.monotonic() - run.rate.started
    return run.stats


def _run_stream(image: AddCowImage, run: _StreamRun, threads: int) -> None:
    """Copy with ``threads`` threads (the calling one among them) until done or failed."""
    workers = [
        threading.Thread(target=run.work_or_record, name=f"addcow-stream-{i}")
        for i in range(1, threads)
    ]
    writer = threading.Thread(target=run.write_back, name="addcow-writeback")
    try:
        try:
            # Started in here: if one cannot start, those that did are still joined.
            for thread in [writer, *workers]:
                thread.start()
            run.work()
        except BaseException as exc:
            # Ctrl-C or an error: the other threads stop after the span they are in.
            # Ctrl-C stops the process: a span waiting for a golden server to come
            # back fails now, not after the reconnect delay.
            run.stopping.set()
            if isinstance(exc, KeyboardInterrupt):
                remote.interrupt_waits()
            raise
        finally:
            # They are joined in every case: only then may the caller close the image.
            # The writer last: its queue ends after the last span a worker queued.
            interrupted: KeyboardInterrupt | None = None
            for worker in [*workers, writer]:
                if worker is writer:
                    run.writeback.put(None)
                while worker.is_alive():
                    try:
                        worker.join()
                    except KeyboardInterrupt as exc:
                        interrupted = exc
                        run.stopping.set()
                        remote.interrupt_waits()
            if interrupted is not None:
                raise interrupted
        if run.error is not None:
            raise run.error
    except BaseException:
        _keep_progress(image)
        raise


def _keep_progress(image: AddCowImage) -> None:
    """After a failed stream, make the bits of what was copied durable if possible.

    The error that stopped the stream is the one to report; if this flush fails
    too (the file system is still full), the bits stay in memory for the image's
    close, and a rerun copies those clusters again.
    """
    with contextlib.suppress(AddCowError):
        image.flush()


class _StreamRun:
    """One stream: the spans handed out so far, the totals, and when to commit.

    Spans go out in order under :attr:`lock`; each thread copies its own with
    :meth:`AddCowImage.populate`, which claims the clusters, writes the data and
    only then sets their bits. A flush from any thread makes every bit already
    set durable after its data (the order :mod:`addcow.image.core` keeps), so
    spans finishing out of order change nothing about what a crash can leave.
    """

    def __init__(
        self,
        image: AddCowImage,
        rate: int | None,
        progress: Callable[[int], None] | None,
        *,
        remote: bool = False,
    ) -> None:
        self.image = image
        self.rate = RateLimit(rate)
        self.commits = CommitPolicy()
        self.progress = progress
        self.stats = StreamStats()
        self.lock = threading.Lock()
        self.pos = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        # Spans whose writeback is not started yet, in file order: [lo, hi, done, written].
        self.writeback_queue: collections.deque[list[int]] = collections.deque()
        # A copy from a backing URI without a rate (``remote``) takes spans of
        # STREAM_SPAN_REMOTE and settles them: of the spans whose writeback has
        # started (oldest first), all but the last SETTLE_LAG are waited for and
        # dropped from the page cache.
        self.remote = remote
        self.span_bytes = STREAM_SPAN_REMOTE if remote else STREAM_SPAN
        self.writing_back: collections.deque[tuple[int, int]] = collections.deque()
        # Spans to start writing back, in file order, for :meth:`write_back`; None ends it.
        self.writeback: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        # Settling waits through a descriptor of its own, so that a writeback error
        # stays for the commit's fdatasync to report (sysio.settle_writeback).
        self.settle_fd = sysio.reopen_for_settling(image.image_fd) if remote else -1

    def next_span(self) -> tuple[int, int] | None:
        """The next span to copy (lock held), or None when the stream is over."""
        if self.stopping.is_set() or self.error is not None or self.image.complete:
            return None
        span = next_span(self.image, self.pos, self.rate.span(self.span_bytes))
        if span is None:
            return None
        lo, hi, self.pos = span
        self.writeback_queue.append([lo, hi, 0, 0])
        return lo, hi

    def span_done(self, lo: int, written: int) -> list[tuple[int, int]]:
        """Queue for writeback the finished spans no unfinished one precedes (lock held).

        In file order, as one thread would: the file system allocates blocks at
        writeback, and spans written back out of order end up in more extents.
        Returns the spans to settle (:func:`addcow.sysio.settle_writeback`) once
        the lock is released: for a ``remote`` copy, those more than SETTLE_LAG
        spans behind the newest one written back.
        """
        for entry in self.writeback_queue:
            if entry[0] == lo:
                entry[2:] = [1, written]
                break
        while self.writeback_queue and self.writeback_queue[0][2]:
            first, last, _done, wrote = self.writeback_queue.popleft()
            if wrote:
                self.writeback.put((first, last))
                if self.settle_fd >= 0:
                    self.writing_back.append((first, last))
        due: list[tuple[int, int]] = []
        while len(self.writing_back) > SETTLE_LAG:
            due.append(self.writing_back.popleft())
        return due

    def work(self) -> None:
        """Copy spans until none is left (or another thread failed)."""
        image = self.image
        buffer = bytearray(min(STREAM_SPAN, 4 << 20))
        while True:
            with self.lock:
                span = self.next_span()
            if span is None:
                return
            lo, hi = span
            written, zero, read = image.populate(lo, hi - lo, buffer)
            with self.lock:
                due = self.span_done(lo, written)
                self.stats.copied += written
                self.stats.zero += zero
                self.stats.read += read
                if self.progress is not None:
                    self.progress(hi - lo)
                commit = self.commits.copied(written)
                ahead = self.rate.delay(self.stats.read)
            for first, last in due:
                sysio.settle_writeback(self.settle_fd, first, last - first)
            if commit:
                image.flush()
            if ahead > 0:
                self.stopping.wait(ahead)  # a rate limit that Ctrl-C cuts short

    def write_back(self) -> None:
        """Start writeback of the queued spans, in their order, so the next flush has
        less to wait for (hints: a failure shows at that flush)."""
        while (span := self.writeback.get()) is not None:
            sysio.start_writeback(self.image.image_fd, span[0], span[1] - span[0])

    def work_or_record(self) -> None:
        """:meth:`work` in a helper thread: its error stops the others and is raised later."""
        try:
            self.work()
        except BaseException as exc:  # re-raised by stream() in the calling thread
            with self.lock:
                if self.error is None:
                    self.error = exc
            self.stopping.set()


def detach(image: AddCowImage, *, dry_run: bool = False) -> str:
    """Remove the .add-cow file of a complete image; return the raw image file's path.

    ``image`` must be open read-write (holding the exclusive lock). It is closed
    afterwards, unless ``dry_run``.
    """
    if not image.complete:
        missing = image.total_clusters - image.allocated_clusters
        raise IncompleteImageError(
            f"{image.path}: {missing} of {image.total_clusters} clusters are still in the "
            f"backing file; run 'addcow stream {image.path}' first"
        )
    image.flush()
    if dry_run:
        return image.image_path
    image.release_backing()
    path = image.detach_in_place()
    image.close()
    return path


def rebase(
    image: AddCowImage,
    backing: str | None,
    fmt: str | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    backing_sha256: str | None = None,
) -> int:
    """Switch to a new backing file (None: no backing) keeping the content identical.

    Every unallocated cluster whose content differs between the old and the new
    backing is first copied into the image file from the old one; the header
    changes last, after that data is durable. Returns the bytes copied.

    ``backing`` may be a backing URI (:func:`addcow.stores.remote.pin` records it, under
    the image's policy): ``fmt`` defaults to the recorded format when the backing
    is a URI already, else raw. With ``backing_sha256`` the whole new golden image
    is read and must have that SHA-256, which is then recorded. When the old and
    the new record pin the same HTTP resource (same URI, size and validator), no
    cluster can differ and none is read. The old backing must be readable (the
    image opened with it); for one whose pin no longer holds, see :func:`repin`.
    """
    guard = image.chain_guard()
    new: BlockSource | None = None
    if backing is not None and remote.scheme_of(backing) is not None:
        return _rebase_onto_uri(image, backing, fmt, backing_sha256, progress)
    if backing is not None:
        name = os.fsencode(backing)
        fmt = choose_backing_format(name, fmt, image.path, image.header.version, guard=guard)
        new = open_backing(name, fmt, image.path, guard=guard, force_share=False)
    copied = 0
    try:
        copied = _copy_differences(image, new, progress)
    finally:
        if new is not None:
            new.close()
    image.set_backing(backing, fmt)
    return copied


def _rebase_onto_uri(
    image: AddCowImage,
    uri: str,
    fmt: str | None,
    sha256: str | None,
    progress: Callable[[int], None] | None,
) -> int:
    old = recorded_uri(image)
    fmt = fmt or (image.header.backing_format if old is not None else None)
    ref, new = remote.pin(uri, fmt, guard=image.chain_guard(), sha256=sha256)
    try:
        same = (
            old is not None
            and (ref.etag or ref.last_modified) is not None
            and old._replace(sha256=None) == ref._replace(sha256=None)
            and fmt == image.header.backing_format
        )
        copied = 0 if same else _copy_differences(image, new, progress)
    except BaseException:
        new.close()
        raise
    if same and old is not None and ref.sha256 is None:
        ref = ref._replace(sha256=old.sha256)  # the same pinned bytes: their digest holds
    image.set_backing_uri(ref, fmt or "raw", new)
    return copied


def recorded_uri(image: AddCowImage) -> remote.BackingURI | None:
    """The URI record of an image whose backing is a URI, else None."""
    header = image.header
    if not header.backing_uri or header.backing_name is None:
        return None
    return remote.BackingURI.decode(header.backing_name)


def repin(
    image: AddCowImage,
    uri: str,
    fmt: str | None = None,
    *,
    unsafe: bool = False,
    sha256: str | None = None,
    why: str = "",
) -> None:
    """Record ``uri`` as the backing without reading the old golden image: for an
    image whose pin no longer holds (the server's ETag changed, say), opened with
    ``with_backing=False``. ``why`` says what the old pin met (for a refusal).

    With ``unsafe`` (``rebase -u``) the caller asserts the content is the same: the
    record takes the server's current identity (the policy checks of ``create``
    apply), and keeps a recorded sha256, which digests the content asserted
    unchanged. Otherwise the image's recorded sha256 is the only proof the new
    golden image holds the old one's bytes: the whole resource is read at its new
    pin and must digest to it, in the recorded format; an image without one is
    refused, unchanged. ``sha256`` (``--backing-sha256``), when given, must be the
    recorded one (or, with ``unsafe``, is checked against the resource and recorded).
    """
    old = recorded_uri(image)
    recorded_fmt = image.header.backing_format if old is not None else None
    fmt = fmt or recorded_fmt
    guard = image.chain_guard()
    if unsafe:
        ref, new = remote.pin(uri, fmt, guard=guard, sha256=sha256)
        if ref.sha256 is None and old is not None:
            ref = ref._replace(sha256=old.sha256)
        image.set_backing_uri(ref, fmt or "raw", new)
        return
    reason = f"{why}; " if why else ""
    if old is None or old.sha256 is None:
        raise RemoteChangedError(
            f"{reason}{image.path}: the golden image this image was made over cannot be "
            "read to compare with, and no sha256 of it is recorded, so a safe rebase cannot "
            f"check {remote.shown(uri)}; if its content is the same, rebase -u re-pins it"
        )
    if sha256 is not None and sha256 != old.sha256:
        raise RemoteChangedError(
            f"{reason}{image.path}: expected --backing-sha256 to be the recorded "
            f"sha256 {old.sha256}, found {sha256}"
        )
    if fmt != recorded_fmt:
        raise BackingFormatError(
            f"{image.path}: expected backing format {recorded_fmt} (the recorded one: the "
            f"same bytes read as another format are another disk), found {fmt}"
        )
    ref, new = remote.pin(uri, fmt, guard=guard, sha256=old.sha256)
    image.set_backing_uri(ref, fmt or "raw", new)


def _copy_differences(
    image: AddCowImage, new: BlockSource | None, progress: Callable[[int], None] | None
) -> int:
    cluster = image.cluster_size
    old_buf, new_buf = bytearray(STREAM_SPAN), bytearray(STREAM_SPAN)
    copied = 0
    pos = 0
    while not image.complete:
        span = next_span(image, pos, STREAM_SPAN)
        if span is None:
            break
        lo, hi, pos = span
        length = hi - lo
        image.readinto(memoryview(old_buf)[:length], lo)
        read_as_backing(new, memoryview(new_buf)[:length], lo)
        if old_buf[:length] != new_buf[:length]:
            for c in range(0, length, cluster):
                stop = min(c + cluster, length)
                if old_buf[c:stop] != new_buf[c:stop]:
                    copied += image.populate(lo + c, stop - c).written
        if progress is not None:
            progress(length)
    image.flush()
    return copied


def amend(image: AddCowImage, version: int) -> None:
    """Rewrite the header as version 1 or 2, where the content allows it."""
    header = image.header
    if version == header.version:
        return
    if version == 2:
        new = Header(
            version=2,
            image_name=header.image_name,
            backing_name=header.backing_name,
            backing_format=header.backing_format,
            image_size=image.size,
            cluster_bits=header.cluster_bits,
            header_size=header.header_size,
        )
        if header.backing_name is not None and header.backing_format is None:
            raise AmendError(
                f"{image.path}: the backing format is not recorded; record it first with "
                f"'addcow rebase -u -b {os.fsdecode(header.backing_name)} -F raw {image.path}'"
            )
    elif version == 1:
        problems = []
        if header.cluster_bits != V1_CLUSTER_BITS:
            problems.append(f"cluster size {header.cluster_size} (version 1 has 65536)")
        if header.header_size != V1_HEADER_SIZE:
            problems.append(f"header size {header.header_size} (version 1 has 4096)")
        if header.backing_format not in (None, "raw"):
            problems.append(f"a {header.backing_format} backing file (version 1 records raw only)")
        if header.backing_uri:
            problems.append("a backing URI (version 1 records file names only)")
        file_size = sysio.file_size(image.image_fd, image.image_path)
        if file_size != image.size:
            problems.append(
                f"an image file of {file_size} bytes for a {image.size}-byte disk (version 1 "
                "takes its size from the image file)"
            )
        if problems:
            raise AmendError(f"{image.path}: cannot convert to version 1: " + "; ".join(problems))
        new = Header(
            version=1,
            image_name=header.image_name,
            backing_name=header.backing_name,
            backing_format=header.backing_format,
        )
    else:
        raise AmendError(f"unsupported compat level {version}: expected 1 or 2")
    image.rewrite_header(Header.unpack(new.pack()))


def commit(image: AddCowImage, *, progress: Callable[[int], None] | None = None) -> int:
    """Write every allocated cluster of ``image`` into its backing file.

    ``image`` must be opened with ``with_backing=False`` (its backing is opened
    here, writable). A raw backing receives the data by ``copy_file_range``
    (holes are punched); an add-cow backing through its own write path. A
    shorter backing is grown first. The image itself is not changed and stays
    valid: its allocated clusters now equal the backing's, the others still read
    from the backing. Returns the bytes committed.
    """
    header = image.header
    if header.backing_name is None:
        raise AddCowError(f"{image.path}: the image has no backing file to commit into")
    if header.backing_format is None:
        raise BackingFormatError(
            f"{image.path}: the backing format is not recorded; record it first with "
            f"'addcow rebase -u -b {os.fsdecode(header.backing_name)} -F raw {image.path}'"
        )
    if header.backing_uri:
        raise BackingFormatError(
            f"{image.path}: the backing is a URI, which addcow only reads; commit writes into "
            "local backing files"
        )
    targets = registry.names(commit_target=True)
    if header.backing_format not in targets:
        raise BackingFormatError(
            f"{image.path}: the backing file is {header.backing_format}, which addcow only "
            f"reads; commit writes into {' or '.join(targets)} backing files"
        )
    path = resolve_name(header.backing_name, image.path)
    guard = image.chain_guard()
    guard.check_path(path)
    if header.backing_format == "add-cow":
        with AddCowImage.open(path, guard=guard) as target:
            if target.size < image.size:
                target.resize(image.size)
            return _commit_runs(image, _AddCowTarget(target), progress)
    raw = RawTarget(path, guard)
    try:
        raw.grow(image.size)
        return _commit_runs(image, raw, progress)
    finally:
        raw.close()


class _Target(Protocol):
    def copy(self, image: AddCowImage, offset: int, length: int) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


def _commit_runs(
    image: AddCowImage, target: _Target, progress: Callable[[int], None] | None
) -> int:
    bits, clusters = image.cluster_bits, image.total_clusters
    committed = 0
    for first, end, allocated in image.bitmap.runs(0, clusters):
        if not allocated and not image.complete:
            continue
        lo, hi = first << bits, min(end << bits, image.size)
        for start, stop, has_data in sysio.data_runs(image.image_fd, lo, hi):
            if has_data:
                target.copy(image, start, stop - start)
            else:
                target.zero(start, stop - start)
            committed += stop - start
            if progress is not None:
                progress(stop - start)
    target.flush()
    return committed


class RawTarget:
    """A raw backing file opened for writing by commit."""

    def __init__(self, path: str, guard: ChainGuard) -> None:
        self.path = path
        self.fd = open_image_file(path, readonly=False, what="backing file")
        try:
            guard.add(self.fd, path)
            guard.check_open(self.fd, path)
            lock_raw(self.fd, path, writable=True)
        except BaseException:
            os.close(self.fd)
            raise
        # copied bytes whose writeback is not started yet, from offset pending_lo on
        self.pending_lo = -1
        self.pending = 0

    def grow(self, size: int) -> None:
        if sysio.file_size(self.fd, self.path) < size:
            sysio.truncate(self.fd, size, self.path)

    def copy(self, image: AddCowImage, offset: int, length: int) -> None:
        if not sysio.copy_range(image.image_fd, self.fd, offset, length, self.path):
            # No copy_file_range between these files: through a buffer instead.
            buffer = bytearray(min(length, STREAM_SPAN))
            for pos in range(offset, offset + length, len(buffer)):
                view = memoryview(buffer)[: min(len(buffer), offset + length - pos)]
                image.readinto(view, pos)
                sysio.pwrite_full(self.fd, [view], pos, self.path)
        self._written(offset, offset + length)

    def _written(self, lo: int, hi: int) -> None:
        """Start writeback of what was copied every WRITEBACK_BYTES, so flush waits less."""
        if self.pending_lo < 0:
            self.pending_lo = lo
        self.pending += hi - lo
        if self.pending >= WRITEBACK_BYTES:
            sysio.start_writeback(self.fd, self.pending_lo, hi - self.pending_lo)
            self.pending_lo, self.pending = -1, 0

    def zero(self, offset: int, length: int) -> None:
        if not sysio.punch_hole(self.fd, offset, length, self.path):
            sysio.write_zeros(self.fd, offset, length, self.path)

    def flush(self) -> None:
        sysio.fdatasync(self.fd, self.path)

    def close(self) -> None:
        os.close(self.fd)


class _AddCowTarget:
    """An add-cow backing receiving commit through its own write path."""

    def __init__(self, target: AddCowImage) -> None:
        self.target = target
        self.buffer = bytearray(STREAM_SPAN)

    def copy(self, image: AddCowImage, offset: int, length: int) -> None:
        pos = offset
        while pos < offset + length:
            step = min(len(self.buffer), offset + length - pos)
            view = memoryview(self.buffer)[:step]
            image.readinto(view, pos)
            self.target.write(view, pos)
            pos += step

    def zero(self, offset: int, length: int) -> None:
        self.target.write_zeroes(offset, length)

    def flush(self) -> None:
        self.target.flush()
