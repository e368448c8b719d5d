"""The virtual disk as a binary file (:class:`ImageFile`), behind ``as_file``.

An ``io.RawIOBase`` over an open image with its own position: reads and
writes go through the image's ``readinto`` and ``write``, so they follow the
image's copy on write and crash ordering. It shares the image and closes
nothing: closing it does not close the image.
"""

from __future__ import annotations

import io
from typing import Any

from .core import ImageCore


class ImageFile(io.RawIOBase):
    """The virtual disk as a binary file; closing it does not close the image."""

    def __init__(self, image: ImageCore) -> None:
        super().__init__()
        self._image = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._image.readonly

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._image.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._image.size - self._pos))
        if n:
            self._image.readinto(view[:n], self._pos)
            self._pos += n
        return n

    def write(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        self._image.write(view, self._pos)
        self._pos += len(view)
        return len(view)

    def flush(self) -> None:
        if not self.closed and not self._image.readonly and not self._image.closed:
            self._image.flush()
