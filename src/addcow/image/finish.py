"""Finishing an image while it is in use: releasing the backing, detaching in
place (:class:`Finishing`).

Completing while in use
    A server streaming an image (``addcow serve --stream``) finishes it without
    closing it. :meth:`release_backing` closes the backing file of a complete
    image. Why that is safe with requests still arriving: a bit never goes back
    to 0, and every path that reads the backing (``readinto``, copy on write,
    ``populate``, ``block_status``) decides to do so from bits it saw unset.
    Copy on write and populate hold claims on those clusters and set the bits
    only after their backing reads, so once every bit is set none of them is
    still reading it; a read or block status that looked at the bitmap *after*
    it became full sees only set bits and never touches the backing. What is
    left are readers that looked *before* and may still be inside the backing:
    the caller must let those drain first (the server waits for every request
    that was in flight when it saw the image complete). Then
    :meth:`release_backing` flushes (data, bitmap, then the ALL_ALLOCATED flag
    of a version 2 header), sets ``_all_allocated`` so readers stop consulting
    the bitmap, and only then closes the backing.
    :meth:`detach_in_place` then removes the .add-cow file as
    :func:`addcow.lifecycle.detach` does (trim the image file, unlink, sync the
    directory) but keeps the image open: from then on it is *detached*, a raw
    disk. Nothing writes the .add-cow file any more (it is gone; its descriptor
    stays open until :meth:`close`): every bit is set, so writes never change
    the bitmap, ``flush`` only ``fdatasync``\\ s the image file, and header
    changes (resize, rebase, amend) are refused.

:meth:`trim_image_file` is the step of detaching that cuts the image file to
the virtual size.
"""

from __future__ import annotations

import os

from .. import sysio
from ..errors import BackingError
from .core import ImageCore


class Finishing(ImageCore):
    """``release_backing`` and ``detach_in_place`` of :class:`~addcow.image.AddCowImage`."""

    def release_backing(self) -> None:
        """Close the backing chain of a complete image that stays open.

        See "Completing while in use" above: the caller must first let every
        call that began before the image became complete return. This flushes
        (a version 2 header gets ALL_ALLOCATED), then sets the in-memory
        all-allocated state so readers ignore the bitmap, then closes the
        backing. Raises BackingError if a cluster is still unallocated.
        """
        self._check_write(0, 0)
        if not self.complete:
            raise BackingError(
                f"{self.path}: {self.total_clusters - self.allocated_clusters} clusters "
                "are still read from the backing file"
            )
        self.flush()
        self._all_allocated = True  # version 1: the full bitmap is durable, same meaning
        backing, self.backing = self.backing, None
        self._route_reads()
        if backing is not None:
            backing.close()

    def detach_in_place(self) -> str:
        """Remove the .add-cow file but keep serving the image file; return its path.

        The steps of :func:`addcow.lifecycle.detach` (flush, trim the image file,
        unlink, sync the directory) without closing: afterwards the image is
        :attr:`detached` and behaves as a raw disk (see "Completing while in
        use"). Needs :meth:`release_backing` first.
        """
        self._check_write(0, 0)
        if self._detached:
            return self.image_path
        if not self._all_allocated or self.backing is not None:
            raise BackingError(f"{self.path}: release_backing() must come before detaching")
        self.flush()
        self.trim_image_file()
        with self._flush_lock:
            sysio.unlink(self.path, "the .add-cow file")
            self._detached = True
        sysio.sync_directory(os.path.dirname(self.path) or ".")
        return self.image_path

    def trim_image_file(self) -> None:
        """Cut an image file longer than the virtual size down to it (before detaching).

        The bytes past the virtual size are not part of the disk; a standalone raw
        disk must be exactly the virtual size.
        """
        self._check_write(0, 0)
        if sysio.file_size(self._image_fd, self.image_path) > self.size:
            sysio.truncate(self._image_fd, self.size, self.image_path)
            sysio.fdatasync(self._image_fd, self.image_path)
