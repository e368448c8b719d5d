"""What a backing store is: :class:`BlockSource`, the :class:`Extent` it describes
its allocation with, and :class:`StoreFormat`, the entry a format registers.

A backing store is anything with a size that can fill a buffer and describe
its allocation: what an unallocated cluster of an image is read from. Every
store module of this package builds on this one and on :mod:`.chain`; none
imports the package itself, whose ``__init__`` holds the registry and the
chain opener above them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

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

    def reads_in_place(self, offset: int, length: int) -> bool:
        """Whether reading the range only copies bytes from files (or zeros): no
        decompressing, nothing an event loop should not wait for."""

    def close(self) -> None: ...


def read_as_backing(source: BlockSource | None, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``source`` as a backing reads: zeros past its end, or
    everywhere when there is no source."""
    inside = 0 if source is None else max(0, min(len(view), source.size - offset))
    if source is not None and inside:
        source.readinto(view[:inside], offset)
    if inside < len(view):
        sysio.fill_zero(view[inside:])


BackingOpener = Callable[[bytes, str], BlockSource]
"""Opens a name a store records for its own backing, with the format it records
for it, relative to the store's file and under the chain's guard."""


class Opener(Protocol):
    """How a format opens the file at ``path`` read-only as a store."""

    def __call__(
        self, path: str, *, guard: ChainGuard, force_share: bool, open_backing: BackingOpener
    ) -> BlockSource: ...


@dataclass(frozen=True)
class StoreFormat:
    """A format of backing file, as the registry of :mod:`addcow.stores` knows it.

    ``magic`` holds the (offset, bytes) its files start with: looked at only to
    refuse (recording a file that starts with it as raw, opening it as another
    format), never to choose a format. ``over_uri`` says whether it can be read
    through a backing URI; ``commit_target`` whether ``commit`` may write an
    image's clusters into a backing of this format; ``names_backing`` the
    formats its own header may record for a backing of its own.
    """

    name: str
    open: Opener
    magic: tuple[tuple[int, bytes], ...] = ()
    over_uri: bool = False
    commit_target: bool = False
    names_backing: tuple[str, ...] = ()
