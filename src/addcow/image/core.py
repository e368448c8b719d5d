"""The core of an open add-cow image: opening, reads, writes, copy on write,
claims, flush and its crash ordering, close, block status (:class:`ImageCore`).

Three files make one image: the .add-cow file (header and bitmap), the image
file (raw, holds every allocated cluster at its guest offset) and the backing
store (read-only; :mod:`addcow.stores`). A cluster is in one of two states::

    bit 0  UNALLOCATED  reads come from the backing chain (zeros past its end)
    bit 1  ALLOCATED    reads come from the image file

and it moves only from UNALLOCATED to ALLOCATED, never back.

Requests are split into runs of clusters in the same state, one system call
per run. A read inside clusters of one state that a single file holds takes a
fast path with no lock and no allocation: ``_read_fds`` names that file for
each state (the image file for ALLOCATED; for UNALLOCATED a raw backing file
that covers the whole disk, else none), so the bit indexes it. It is
recomputed (:meth:`ImageCore._route_reads`) whenever what it depends on
changes, and always before a file it named is closed: a stale descriptor
could by then be another file's.

Copy on write
    A write that touches an unallocated cluster writes the whole cluster: the
    bytes it does not cover (the unaligned head and tail) are read from the
    backing chain first and sent in the same ``pwritev``. While that happens
    the cluster is *claimed*: other writers touching it wait, so two partial
    writes into one unallocated cluster both survive. Readers never wait: until
    the bit is set they read the backing, which is still the cluster's content.

Zeroes, discard and populate
    They set bits without a caller's data (:mod:`.zeroes`, :mod:`.populate`),
    through the claims and the crash ordering below.

Crash ordering (why a crash never exposes zeros or garbage)
    1. Data reaches the image file (``pwritev`` returns) before its bit is set
       in memory.
    2. ``flush`` copies the dirty bitmap pages *first*, then ``fdatasync``\\ s the
       image file, then writes the copied pages and ``fdatasync``\\ s the .add-cow
       file. Every bit in the copy had its data written before the copy was
       taken, so the data is durable before any bit that points at it.
    3. Between flushes the on-disk bitmap lags the one in memory. After a crash
       a lagging bit reads from the backing: the cluster shows its content from
       before the unflushed write, which is what a disk may show for a write
       that was never flushed. A later write to it copies from the backing
       again, so stale bytes in the image file are never exposed.
    4. ``fua=True`` flushes before the write returns.
    5. When every bit is set and durable, a version 2 header gets the
       ALL_ALLOCATED flag (written last, then synced); readers may then ignore
       the bitmap and backing.
    If writing bitmap pages fails, they stay dirty in memory and the error is
    raised; the on-disk bitmap is only ever behind, never ahead.
    If syncing the *image file* fails, the kernel may already have dropped the
    unwritten data, and a later sync could report success without it; so the
    image stops accepting writes and flushes (fail-stop, like dm-clone's fail
    mode): every later write or flush raises, reads still work, and the bits of
    the lost writes are never persisted. Reopening the image recovers it: the
    on-disk bitmap then shows only data that was durable.

Locking
    One ``threading.Lock`` guards the bitmap, the claim set and the dirty pages;
    I/O runs outside it. ``flush`` calls are serialised by a second lock. Files
    are locked against other processes as :mod:`addcow.locking` describes.

The rest of :class:`~addcow.image.AddCowImage` builds on this class: changing
the size or the backing (:mod:`.reshape`), finishing while in use
(:mod:`.finish`), the file view (:mod:`.fileobj`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Self

from .. import sysio
from ..errors import (
    AddCowError,
    AddCowIOError,
    BackingError,
    ClosedImageError,
    ImageFileError,
    LockError,
    RangeError,
    ReadOnlyError,
)
from ..format import V2_COMPAT_ALL_ALLOCATED, Header
from ..stores import open_backing
from ..stores.base import (
    INLINE,
    POOL,
    BlockSource,
    Extent,
    Route,
    file_route,
    joined,
    read_as_backing,
    route_as_backing,
)
from ..stores.chain import ChainGuard
from ..stores.raw import RawFile
from .metafile import (
    ImageFiles,
    backing_format,
    open_image_files,
    write_bitmap_pages,
    write_features,
    write_header,
)

Buffer = bytes | bytearray | memoryview


class ImageCore:
    """An open add-cow image's state and core I/O; see :class:`~addcow.image.AddCowImage`.

    The image owns and closes the three kinds of file it opened itself: the
    .add-cow file, the image file and the backing chain.
    """

    def __init__(
        self, path: str, files: ImageFiles, backing: BlockSource | None, readonly: bool
    ) -> None:
        header = files.header
        self.path = path
        self.header = header
        self.image_path = files.image_path
        self.size = files.size
        self.readonly = readonly
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bitmap = files.bitmap
        self.backing = backing
        self._meta_fd = files.meta_fd
        self._image_fd = files.image_fd
        self._all_allocated = header.all_allocated or files.bitmap.full
        self._closed = False
        self._read_fds = (-1, -1)
        self._route_reads()
        self._lock = threading.Lock()
        self._claims_done = threading.Condition(self._lock)
        self._claimed: set[tuple[int, int]] = set()  # runs of clusters being allocated
        self._flush_lock = threading.Lock()
        self._failed: str | None = None
        self.backing_root: str | None = None
        self.allowed_uris: tuple[str, ...] = ()
        """The directory every file this image names must stay in (None: no limit)."""
        self._detached = False

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        force_share: bool = False,
        probe_backing: bool = False,
        with_backing: bool = True,
        backing_root: str | None = None,
        allowed_uris: Sequence[str] = (),
        guard: ChainGuard | None = None,
    ) -> Self:
        """Open the image at ``path``; see :func:`addcow.open`.

        ``with_backing=False`` opens only the .add-cow file and the image file,
        for work that never reads an unallocated cluster (changing the header,
        committing into the backing); such a read then raises BackingError.
        """
        path = os.fspath(path)
        if force_share and not readonly:
            raise LockError(f"{path}: force_share (-U) is only allowed for read-only opens")
        guard = guard if guard is not None else ChainGuard(backing_root, allowed_uris)
        files = open_image_files(
            path,
            meta_writable=not readonly,
            image_writable=not readonly,
            lock=not force_share,
            guard=guard,
        )
        header, bitmap = files.header, files.bitmap
        try:
            backing: BlockSource | None = None
            # A complete image (flag set, or every bit set) never reads its backing:
            # it is not opened, so it may already have been removed.
            complete = header.all_allocated or bitmap.full
            if with_backing and header.backing_name is not None and not complete:
                backing = open_header_backing(
                    header, path, guard=guard, force_share=force_share, probe=probe_backing
                )
            image = cls(path, files, backing, readonly)
            image.backing_root = guard.root
            image.allowed_uris = guard.allowed_uris
        except BaseException:
            if backing is not None:
                backing.close()
            files.close()
            raise
        if not readonly and header.version >= 2:
            flags = header.compatible_features
            if bitmap.full:
                flags |= V2_COMPAT_ALL_ALLOCATED  # a crash came between bitmap and flag
            if header.autoclear_features or flags != header.compatible_features:
                try:
                    image._rewrite_features(
                        header.with_changes(autoclear_features=0, compatible_features=flags)
                    )
                except BaseException:
                    image.close()
                    raise
        return image

    # -- properties ---------------------------------------------------------------

    @property
    def allocated_clusters(self) -> int:
        return self.bitmap.allocated

    @property
    def total_clusters(self) -> int:
        return self.bitmap.clusters

    @property
    def unallocated_bytes(self) -> int:
        """Bytes of the virtual disk still read from the backing chain."""
        if self.complete:
            return 0
        missing = self.total_clusters - self.allocated_clusters
        last = self.total_clusters - 1
        if self.bitmap.is_set(last):
            return missing * self.cluster_size
        # the last cluster may be partial
        return (missing - 1) * self.cluster_size + self.size - (last << self.cluster_bits)

    @property
    def complete(self) -> bool:
        """True when every cluster lives in the image file."""
        return self._all_allocated or self.bitmap.full

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def detached(self) -> bool:
        """True after :meth:`detach_in_place`: the .add-cow file is gone."""
        return self._detached

    @property
    def image_fd(self) -> int:
        """The image file's descriptor, for zero-copy reads (copy_file_range).

        Only for reading allocated ranges; writing through it bypasses the bitmap.
        """
        return self._image_fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} size={self.size} closed={self._closed}>"

    # -- reads --------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the virtual disk from ``offset``."""
        if not 0 <= length <= self.size:  # checked before allocating the buffer
            raise RangeError(
                f"{self.path}: read of {length} bytes at offset {offset} "
                f"is outside the disk (size {self.size})"
            )
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buffer: Buffer, offset: int) -> int:
        """Fill ``buffer`` with the virtual disk's bytes at ``offset``; return its length."""
        view = buffer if type(buffer) is memoryview else memoryview(buffer)
        length = view.nbytes
        # Fast path, kept inline (it is the hot path of random reads): when the whole
        # request lies in clusters of one state that one file holds (_read_fds), one
        # preadv straight into the caller's buffer. Anything unusual (closed, out of
        # range, mixed clusters, a backing that is not one raw file, a short read)
        # falls through to the general path, which handles or reports it; an I/O
        # error is reported at once, not retried there.
        end = offset + length
        if offset >= 0 and end <= self.size:
            bits = self.cluster_bits
            first = offset >> bits
            if (end - 1) >> bits == first:
                fd = self._read_fds[self.bitmap.data[first >> 3] >> (first & 7) & 1]
            else:
                state = self.bitmap.state(first, ((end - 1) >> bits) + 1)
                fd = self._read_fds[state] if state >= 0 else -1  # -1: mixed
            if fd >= 0:
                # os.preadv is looked up at call time, so a test's storage layer sees it.
                try:
                    done = os.preadv(fd, (view,), offset)
                except OSError as exc:
                    name = self.image_path if fd == self._image_fd else self._backing_name()
                    raise AddCowIOError.wrap(f"{name}: read at offset {offset}", exc) from exc
                if done == length:
                    return length
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")  # offsets below count bytes, not items
        if self._closed:
            raise ClosedImageError(f"{self.path}: image is closed")
        if offset < 0 or offset + length > self.size:
            raise RangeError(
                f"{self.path}: read of {length} bytes at offset {offset} "
                f"is outside the disk (size {self.size})"
            )
        if length == 0:
            return 0
        bits = self.cluster_bits
        first = offset >> bits
        last = (offset + length - 1) >> bits
        if self._all_allocated or (
            first == last and self.bitmap.data[first >> 3] >> (first & 7) & 1
        ):
            sysio.pread_full(self._image_fd, view, offset, self.image_path)
            return length
        for run_first, run_end, allocated in self.bitmap.runs(first, last + 1):
            lo = max(offset, run_first << bits)
            hi = min(offset + length, run_end << bits)
            part = view[lo - offset : hi - offset]
            if allocated:
                sysio.pread_full(self._image_fd, part, lo, self.image_path)
            else:
                self._read_backing(part, lo)
        return length

    def route(self, offset: int, length: int) -> Route:
        """Where the whole of [offset, offset+length) can be read from.

        Every cluster allocated: the image file at ``offset`` (FILE). None
        allocated: the backing chain's route for the range (INLINE zeros past
        its end). Mixed: INLINE when every part reads in place, else POOL. A
        range :meth:`readinto` refuses at once (out of range, closed) is INLINE:
        reading it only raises. A bit set after this call does not make the
        answer wrong for a read that was in flight with the write that set it
        (see "Copy on write" above); a descriptor or store in the answer is
        valid only until the next call that may release the backing, so use it
        at once.
        """
        end = offset + length
        if offset < 0 or length <= 0 or end > self.size or self._closed:
            return INLINE
        bits = self.cluster_bits
        first = offset >> bits
        if (end - 1) >> bits == first:  # one cluster: the read fast path's answer, if any
            fd = self._read_fds[self.bitmap.data[first >> 3] >> (first & 7) & 1]
            if fd >= 0:
                return file_route(fd, offset)
        if self._all_allocated:
            return file_route(self._image_fd, offset)
        stop = ((end - 1) >> bits) + 1
        state = self.bitmap.state(first, stop)
        if state == 1:
            return file_route(self._image_fd, offset)
        if state == 0:
            return route_as_backing(self.backing, offset, length)
        parts = []
        for run_first, run_end, allocated in self.bitmap.runs(first, stop):
            lo, hi = max(offset, run_first << bits), min(end, run_end << bits)
            part = (
                file_route(self._image_fd, lo)
                if allocated
                else route_as_backing(self.backing, lo, hi - lo)
            )
            if not part.in_place:
                return POOL
            parts.append(part)
        return joined(parts)

    def _route_reads(self) -> None:
        """Name the file of each state for :meth:`readinto`'s fast path (none once closed)."""
        backing = self.backing
        if self._closed:
            self._read_fds = (-1, -1)
        elif self._all_allocated:
            self._read_fds = (self._image_fd, self._image_fd)
        elif type(backing) is RawFile and backing.size >= self.size:
            self._read_fds = (backing.fd, self._image_fd)
        else:
            self._read_fds = (-1, self._image_fd)

    def _backing_name(self) -> str:
        return str(getattr(self.backing, "path", None) or getattr(self.backing, "uri", "backing"))

    def _check_backing_open(self, offset: int) -> None:
        """Refuse to treat a backing that was not opened as if there were none."""
        opened = self.backing is not None or self.header.backing_name is None
        if not opened and not self._all_allocated:
            raise BackingError(
                f"{self.path}: the image was opened without its backing file, and the "
                f"unallocated range at offset {offset} needs it"
            )

    def _read_backing(self, view: memoryview, offset: int) -> None:
        if self.backing is None:
            self._check_backing_open(offset)
        read_as_backing(self.backing, view, offset)

    # -- writes -------------------------------------------------------------------

    def write(self, data: Buffer, offset: int, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on return."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")  # offsets below count bytes, not items
        length = view.nbytes
        self._check_write(offset, length)
        if length:
            bits = self.cluster_bits
            first = offset >> bits
            last = (offset + length - 1) >> bits
            if self._all_allocated or (
                first == last and self.bitmap.data[first >> 3] >> (first & 7) & 1
            ):
                sysio.pwrite_full(self._image_fd, [view], offset, self.image_path)
            else:
                self._write_runs(view, offset, first, last + 1)
        if fua:
            self.flush()

    def write_nowait(self, data: Buffer, offset: int) -> bool:
        """Write ``data`` at ``offset`` if that needs no waiting; False: nothing done.

        For a caller that must not block (an event loop): a write into clusters
        that are all allocated (one ``pwrite``), or all unallocated, unclaimed and
        with the rest of their clusters in the page cache (a raw backing file read
        with ``RWF_NOWAIT``; one ``pwrite`` of head, data and tail). Crash ordering
        as :meth:`write`: the bits are set after the data is written. Anything
        else (a mix, a claim held by another writer, an uncached backing, a
        backing that is not a raw file) returns False, for :meth:`write`.
        """
        # Fast path, kept inline (the hot path of small writes): bytes inside one
        # allocated cluster, or anywhere in a complete image, are one pwrite; no bit
        # changes. Anything unusual falls through to the general path below.
        length = len(data)
        end = offset + length
        if (
            type(data) is bytes
            and length
            and offset >= 0
            and end <= self.size
            and not self._closed
            and not self.readonly
            and self._failed is None
        ):
            bits = self.cluster_bits
            first = offset >> bits
            if self._all_allocated or (
                first == (end - 1) >> bits and self.bitmap.data[first >> 3] >> (first & 7) & 1
            ):
                try:  # os.pwritev looked up at call time: a test's storage layer sees it
                    done = os.pwritev(self._image_fd, (data,), offset)
                except OSError as exc:
                    raise AddCowIOError.wrap(
                        f"{self.image_path}: write at offset {offset}", exc
                    ) from exc
                if done == length:
                    return True
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = view.nbytes
        self._check_write(offset, length)
        if length == 0 or self._all_allocated:
            if length:
                sysio.pwrite_full(self._image_fd, [view], offset, self.image_path)
            return True
        bits = self.cluster_bits
        first = offset >> bits
        end = ((offset + length - 1) >> bits) + 1
        bitmap = self.bitmap
        if bitmap.state(first, end) != 1:
            if not isinstance(self.backing, RawFile) and self.backing is not None:
                return False
            with self._lock:
                if any(a < end and first < b for a, b in self._claimed):
                    return False
                state = bitmap.state(first, end)  # again, under the lock
                if state == -1:
                    return False
                claims = [(first, end)] if state == 0 else []
                self._claimed.update(claims)
            if claims:
                try:
                    done = self._copy_on_write(view, offset, first, end, nowait=True)
                except BaseException:
                    self._release(claims, commit=False)
                    raise
                self._release(claims, commit=done)
                return done
        sysio.pwrite_full(self._image_fd, [view], offset, self.image_path)
        return True

    def _read_backing_nowait(self, view: memoryview, offset: int) -> bool:
        """:meth:`_read_backing` from the page cache only (raw backing); False if not."""
        backing = self.backing
        if backing is None:
            self._read_backing(view, offset)
            return True
        if not isinstance(backing, RawFile):
            return False
        inside = max(0, min(len(view), backing.size - offset))
        if inside:
            try:
                n = os.preadv(backing.fd, [view[:inside]], offset, os.RWF_NOWAIT)
            except OSError:
                return False  # not cached, or no RWF_NOWAIT here: the caller waits
            if n != inside:
                return False
        if inside < len(view):
            sysio.fill_zero(view[inside:])
        return True

    def _write_runs(self, view: memoryview, offset: int, first: int, end: int) -> None:
        bits = self.cluster_bits
        claims = self._claim(first, end)
        try:
            for run_first, run_end, allocated in self.bitmap.runs(first, end):
                lo = max(offset, run_first << bits)
                hi = min(offset + len(view), run_end << bits)
                part = view[lo - offset : hi - offset]
                if allocated:
                    sysio.pwrite_full(self._image_fd, [part], lo, self.image_path)
                else:
                    self._copy_on_write(part, lo, run_first, run_end)
        except BaseException:
            self._release(claims, commit=False)
            raise
        self._release(claims, commit=True)

    def _copy_on_write(
        self, part: memoryview, lo: int, first: int, end: int, *, nowait: bool = False
    ) -> bool:
        """Write ``part`` at ``lo`` plus the backing's bytes for the rest of clusters [first, end).

        With ``nowait`` the backing's bytes come from the page cache only; False
        if they are not there, and nothing is written.
        """
        read = self._read_backing_nowait if nowait else self._read_backing_waiting
        start = first << self.cluster_bits
        stop = min(end << self.cluster_bits, self.size)
        hi = lo + len(part)
        buffers = [part]
        if lo > start:
            head = memoryview(bytearray(lo - start))
            if not read(head, start):
                return False
            buffers.insert(0, head)
        if hi < stop:
            tail = memoryview(bytearray(stop - hi))
            if not read(tail, hi):
                return False
            buffers.append(tail)
        sysio.pwrite_full(self._image_fd, buffers, start, self.image_path)
        return True

    def _read_backing_waiting(self, view: memoryview, offset: int) -> bool:
        """:meth:`_read_backing`, in the shape of :meth:`_read_backing_nowait`."""
        self._read_backing(view, offset)
        return True

    def _check_write(self, offset: int, length: int) -> None:
        if self._closed:
            raise ClosedImageError(f"{self.path}: image is closed")
        if self.readonly:
            raise ReadOnlyError(f"{self.path}: image is opened read-only")
        self._check_not_failed()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(
                f"{self.path}: request of {length} bytes at offset {offset} "
                f"is outside the disk (size {self.size})"
            )

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise AddCowIOError(
                f"{self.path}: writes are refused after a failed sync of the image file "
                f"({self._failed}); reopen the image to recover"
            )

    # -- claims: serialising allocation of one cluster ------------------------------

    def _claim(self, first: int, end: int) -> list[tuple[int, int]]:
        """Claim the unallocated clusters of [first, end); wait for other claims.

        Returns the claimed runs. Allocated clusters are not claimed: writes to
        them need no copy on write.
        """
        with self._lock:
            # Runs, not cluster numbers: claiming a whole disk costs one entry.
            while any(a < end and first < b for a, b in self._claimed):
                self._claims_done.wait()
            runs = [(a, b) for a, b, allocated in self.bitmap.runs(first, end) if not allocated]
            self._claimed.update(runs)
            return runs

    def _release(
        self,
        claims: list[tuple[int, int]],
        *,
        commit: bool,
        keep: tuple[int, int] | None = None,
    ) -> None:
        """Drop claims; with ``commit``, set their bits first (data is written).

        ``keep`` names clusters [first, end) whose data is written although the
        claims are not committed: their bits are set too.
        """
        if not claims:
            return
        with self._lock:
            if keep is not None:
                self.bitmap.set_range(*keep)
            for a, b in claims:
                if commit:
                    self.bitmap.set_range(a, b)
            self._claimed.difference_update(claims)
            self._claims_done.notify_all()

    # -- durability ---------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (see "Crash ordering" above)."""
        if self._closed:
            raise ClosedImageError(f"{self.path}: image is closed")
        if self.readonly:
            return
        self._check_not_failed()
        with self._flush_lock:
            if self._detached:  # the .add-cow file is gone: a raw disk now
                try:
                    sysio.fdatasync(self._image_fd, self.image_path)
                except AddCowIOError as exc:
                    self._failed = str(exc)
                    raise
                return
            with self._lock:
                chunks = self.bitmap.take_dirty()
                now_full = self.bitmap.full and not self._all_allocated
            try:
                sysio.fdatasync(self._image_fd, self.image_path)
            except AddCowIOError as exc:
                self._failed = str(exc)
                raise
            if chunks:
                try:
                    write_bitmap_pages(self._meta_fd, self.path, self.header.header_size, chunks)
                    sysio.fdatasync(self._meta_fd, self.path)
                except AddCowError:
                    with self._lock:
                        self.bitmap.mark_dirty(chunks)
                    raise
            if now_full:
                if self.header.version >= 2:
                    flags = self.header.compatible_features | V2_COMPAT_ALL_ALLOCATED
                    self._rewrite_features(self.header.with_changes(compatible_features=flags))
                self._all_allocated = True
                self._route_reads()

    def _rewrite_features(self, header: Header) -> None:
        """Write ``header``'s compatible and autoclear feature fields in place, durably.

        Only those 16 bytes of the first sector are written: the names stay where
        they are, so a torn write cannot damage them.
        """
        self._check_attached()
        write_features(self._meta_fd, self.path, header)
        self.header = header

    def _rewrite_header(self, header: Header) -> None:
        self._check_attached()
        write_header(self._meta_fd, self.path, header, self.header.header_size)
        self.header = header

    def _check_attached(self) -> None:
        if self._detached:
            raise ImageFileError(f"{self.path}: detached (the .add-cow file was removed)")

    def file_ids(self) -> set[tuple[int, int]]:
        """(device, inode) of the .add-cow file, the image file and the backing chain."""
        ids = {(st.st_dev, st.st_ino) for st in map(os.fstat, (self._meta_fd, self._image_fd))}
        if self.backing is not None:
            ids |= self.backing.file_ids()
        return ids

    def close(self) -> None:
        """Flush (read-write images), then close every file this image opened."""
        if self._closed:
            return
        try:
            if not self.readonly and self._failed is None:
                self.flush()
        finally:
            self._closed = True
            self._route_reads()
            if self.backing is not None:
                self.backing.close()
            os.close(self._image_fd)
            os.close(self._meta_fd)

    # -- allocation ----------------------------------------------------------------

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents describing where each byte of [offset, offset+length) comes from."""
        return self._block_status(offset, length, 0)

    def _block_status(self, offset: int, length: int | None, depth: int) -> Iterator[Extent]:
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RangeError(
                f"{self.path}: block status of {length} bytes at offset {offset} "
                f"is outside the disk (size {self.size})"
            )
        end = offset + length
        bits = self.cluster_bits
        if self._all_allocated:
            whole = (offset >> bits, (end >> bits) + 1, True)
            runs: Iterator[tuple[int, int, bool]] = iter([whole])
        else:
            runs = self.bitmap.runs(offset >> bits, (end + self.cluster_size - 1) >> bits)
        for run_first, run_end, allocated in runs:
            lo = max(offset, run_first << bits)
            hi = min(end, run_end << bits)
            if lo >= hi:
                continue
            if allocated:
                for start, stop, has_data in sysio.data_runs(self._image_fd, lo, hi):
                    yield Extent(start, stop - start, depth, True, not has_data, start)
            else:
                yield from self._backing_status(lo, hi, depth)

    def _backing_status(self, lo: int, hi: int, depth: int) -> Iterator[Extent]:
        self._check_backing_open(lo)
        covered = lo
        if self.backing is not None:
            covered = min(hi, max(lo, self.backing.size))
            if covered > lo:
                yield from self.backing.block_status_at(lo, covered - lo, depth + 1)
        if covered < hi:
            yield Extent(covered, hi - covered, depth, False, True, None)

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Block status with depths counted from ``depth`` (for use as a backing)."""
        return self._block_status(offset, length, depth)


def open_header_backing(
    header: Header, path: str, *, guard: ChainGuard, force_share: bool, probe: bool = False
) -> BlockSource:
    """Open the backing that ``header`` (of the .add-cow file at ``path``) names."""
    if header.backing_name is None:
        raise BackingError(f"{path}: the image has no backing file")
    fmt = backing_format(header, path, probe=probe)
    return open_backing(
        header.backing_name,
        fmt,
        path,
        guard=guard,
        force_share=force_share,
        uri=header.backing_uri,
    )
