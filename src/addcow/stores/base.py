"""What a backing store is: :class:`BlockSource`, the :class:`Extent` it describes
its allocation with, and :class:`StoreFormat`, the entry a format registers.

A backing store is anything with a size that can fill a buffer and describe
its allocation: what an unallocated cluster of an image is read from. Every
store module of this package builds on this one and on :mod:`.chain`; none
imports the package itself, whose ``__init__`` holds the registry and the
chain opener above them all.

Routes. Every store answers one question about a range before it is read,
:meth:`BlockSource.route`: where the whole range can be read from
(:class:`Route`). A caller that may not wait (an event loop) acts on the
answer: ``sendfile`` or ``preadv`` from a FILE route, ``readinto`` in place
for an INLINE one, a request on its own connection to a REMOTE store, the
thread pool for POOL. A store whose range is in its backing passes the
question down (:func:`route_as_backing`), so one question goes down the chain
once. Past a store's end the bytes are zeros, as for ``readinto``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from .. import sysio
from .chain import ChainGuard


class Extent(NamedTuple):
    """One range of the virtual disk with uniform allocation.

    ``depth`` is the layer holding the data: 0 is this image's image file, 1 its
    backing, and so on. ``present`` is False where no layer holds the range (it
    reads as zero); ``depth`` is then the layer that decided so. ``host_offset``
    is where the bytes can be read directly in the raw file of that layer, or
    None. ``compressed`` marks data stored compressed (a qcow2 layer's
    compressed clusters): present, with no host offset.
    """

    offset: int
    length: int
    depth: int
    present: bool
    zero: bool
    host_offset: int | None
    compressed: bool = False

    @property
    def data(self) -> bool:
        return self.present and not self.zero


class RouteKind(enum.Enum):
    """Where a range can be read from; see :class:`Route`."""

    FILE = "file"
    """One local file descriptor holds the whole range, contiguously."""
    INLINE = "inline"
    """Read only by copying from local files or filling zeros, but not from one file."""
    REMOTE = "remote"
    """The whole range lies in one remote store that an event loop can read."""
    POOL = "pool"
    """Anything else: decompressing, HTTP, remote and local mixed, a refusal to map."""


class Route(NamedTuple):
    """The answer of :meth:`BlockSource.route` for a range [offset, offset+length).

    FILE: ``fd`` holds the range at ``offset`` in that file (``sendfile`` and
    inline reads may use it; it stays valid only until the store may be
    closed, so use it at once). INLINE: ``readinto`` only copies from files
    or zeros, so an event loop may call it, though not as one file. REMOTE:
    ``store`` holds the range at ``offset`` in that store (a remote store
    read from the event loop). POOL: a thread must read it (``readinto``).
    """

    kind: RouteKind
    fd: int = -1
    offset: int = 0
    store: BlockSource | None = None

    @property
    def in_place(self) -> bool:
        """True for FILE and INLINE: reading only copies from local files or zeros."""
        return self.kind is RouteKind.FILE or self.kind is RouteKind.INLINE


INLINE = Route(RouteKind.INLINE)
POOL = Route(RouteKind.POOL)


def file_route(fd: int, offset: int) -> Route:
    """The range lies at ``offset`` in the file open as ``fd``."""
    return Route(RouteKind.FILE, fd, offset)


def remote_route(store: BlockSource, offset: int) -> Route:
    """The range lies at ``offset`` in the remote ``store``."""
    return Route(RouteKind.REMOTE, offset=offset, store=store)


def joined(parts: Sequence[Route]) -> Route:
    """The route of a range made of parts with these routes, in order: the one
    route of a single part; for several, INLINE when every part reads in place,
    else POOL."""
    if len(parts) == 1:
        return parts[0]
    return INLINE if all(part.in_place for part in parts) else POOL


class BlockSource(Protocol):
    """What an image needs from its backing store."""

    @property
    def size(self) -> int: ...

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` with the bytes at ``offset`` (zeros past the end)."""

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Extents covering [offset, offset+length), tagged from ``depth``."""

    def file_ids(self) -> set[tuple[int, int]]:
        """(device, inode) of every file this source reads, down the chain."""

    def route(self, offset: int, length: int) -> Route:
        """Where the whole of [offset, offset+length) can be read from (zeros past the end)."""

    def close(self) -> None: ...


def read_as_backing(source: BlockSource | None, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``source`` as a backing reads: zeros past its end, or
    everywhere when there is no source."""
    inside = 0 if source is None else max(0, min(len(view), source.size - offset))
    if source is not None and inside:
        source.readinto(view[:inside], offset)
    if inside < len(view):
        sysio.fill_zero(view[inside:])


def route_as_backing(source: BlockSource | None, offset: int, length: int) -> Route:
    """The route of a range read as :func:`read_as_backing` reads it: zeros past
    the end of ``source``, or everywhere when there is none."""
    inside = 0 if source is None else max(0, min(length, source.size - offset))
    if source is None or not inside:
        return INLINE
    if inside == length:
        return source.route(offset, length)
    return joined((source.route(offset, inside), INLINE))


BackingOpener = Callable[[bytes, str], BlockSource]
"""Opens a name a store records for its own backing, with the format it records
for it, relative to the store's file and under the chain's guard."""


class Opener(Protocol):
    """How a format opens the file at ``path`` read-only as a store."""

    def __call__(
        self, path: str, *, guard: ChainGuard, force_share: bool, open_backing: BackingOpener
    ) -> BlockSource: ...


class Describer(Protocol):
    """How a format describes the file at ``path`` as ``qemu-img info`` does, as a
    JSON-ready dict: from the file's metadata alone, never its data. A file it
    names is checked against ``guard`` and at most stat'ed, never opened; a
    backing file is given as ``full-backing-filename`` and
    ``backing-filename-format``, for ``info --backing-chain`` to follow."""

    def __call__(self, path: str, *, guard: ChainGuard, force_share: bool) -> dict[str, Any]: ...


class StoreFormat(NamedTuple):
    """A format of backing file, as the registry of :mod:`addcow.stores` knows it.

    ``open`` opens a file of the format as a store; ``describe`` says what
    ``addcow info`` shows of one. ``magic`` holds the (offset, bytes) its files
    start with: looked at only to refuse (recording a file that starts with it
    as raw, opening it as another format), never to choose a format.
    ``over_uri`` says whether it can be read through a backing URI;
    ``commit_target`` whether ``commit`` may write an image's clusters into a
    backing of this format.
    """

    name: str
    open: Opener
    describe: Describer
    magic: tuple[tuple[int, bytes], ...] = ()
    over_uri: bool = False
    commit_target: bool = False
