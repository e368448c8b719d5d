"""The raw store: a plain file or block device read as a backing (:class:`RawFile`).

Bytes past its end read as zero, so a raw image file larger than its backing
reads zeros there. Its extents carry host offsets equal to their guest
offsets, so callers may copy from its descriptor file to file; its route
(:meth:`RawFile.route`) is that descriptor at the same offset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .. import sysio
from ..errors import BackingError, ImageFileError
from ..locking import lock_raw
from .base import INLINE, BackingOpener, Extent, Route, StoreFormat, file_route
from .chain import ChainGuard


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

    def route(self, offset: int, length: int) -> Route:
        """FILE at the same offset inside the file; INLINE (zeros) past its end."""
        if offset + length <= self.size and offset >= 0:
            return file_route(self.fd, offset)
        return INLINE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_raw(
    path: str, *, guard: ChainGuard, force_share: bool, open_backing: BackingOpener
) -> RawFile:
    """Open ``path`` as a raw store (a raw file names no backing of its own)."""
    return RawFile(path, force_share=force_share, guard=guard)


def describe_raw(path: str, *, guard: ChainGuard, force_share: bool) -> dict[str, Any]:
    """What ``qemu-img info`` shows of a raw file: its size and blocks, from ``stat``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageFileError(f"{path}: {exc.strerror}") from exc
    return {
        "filename": path,
        "format": "raw",
        "virtual-size": st.st_size,
        "actual-size": st.st_blocks * 512,
        "dirty-flag": False,
    }


FORMAT = StoreFormat("raw", open_raw, describe_raw, over_uri=True, commit_target=True)
