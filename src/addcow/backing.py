"""What a backing store is, and the raw one.

A backing store is anything with a size that can fill a buffer and describe
its allocation (:class:`BlockSource`): what an unallocated cluster is read from.
The stores:

* :class:`RawFile` (here), a plain file or block device. Bytes past its end
  read as zero, so a raw image file larger than its backing reads zeros there.
* :class:`addcow.qcow2.Qcow2File`, a qcow2 file read natively.
* another add-cow image (:class:`addcow.image.AddCowImage`), opened read-only.

The qcow2 and add-cow stores may have backings of their own: a chain, opened
by :func:`addcow.image.open_backing`. A new kind of store implements
:class:`BlockSource` in its own module and gets one branch there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from . import sysio
from .errors import BackingError
from .locking import lock_raw
from .names import ChainGuard


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


class RawFile:
    """A raw backing file, opened read-only; reads past its end return zeros.

    ``size`` and ``fd`` are plain attributes (read on the image's read fast path).
    """

    def __init__(self, path: str, *, force_share: bool = False, guard: ChainGuard) -> None:
        self.path = path
        guard.check_path(path)
        try:
            self.fd = sysio.open_file(path, os.O_RDONLY)
        except OSError as exc:
            raise BackingError(f"{path}: cannot open backing file: {exc.strerror}") from exc
        try:
            guard.add(self.fd, path)
            guard.check_open(self.fd, path)
            if not force_share:
                lock_raw(self.fd, path, writable=False)
            self.size = sysio.file_size(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise

    def readinto(self, buffer: memoryview, offset: int) -> int:
        sysio.pread_zero_fill(self.fd, buffer, offset, self.path)
        return len(buffer)

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        end = min(offset + length, self.size)
        for start, stop, has_data in sysio.data_runs(self.fd, offset, end):
            yield Extent(start, stop - start, depth, True, not has_data, start)
        if offset + length > end:
            lo = max(offset, end)
            yield Extent(lo, offset + length - lo, depth, False, True, None)

    def file_ids(self) -> set[tuple[int, int]]:
        st = os.fstat(self.fd)
        return {(st.st_dev, st.st_ino)}

    def reads_in_place(self, offset: int, length: int) -> bool:
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_as_backing(source: BlockSource | None, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``source`` as a backing reads: zeros past its end, or
    everywhere when there is no source."""
    inside = 0 if source is None else max(0, min(len(view), source.size - offset))
    if source is not None and inside:
        source.readinto(view[:inside], offset)
    if inside < len(view):
        sysio.fill_zero(view[inside:])
