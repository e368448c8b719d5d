"""Changing an image's size, backing or header (:class:`Reshaping`).

These need the image to themselves: no request may be in flight meanwhile.
Each writes the data and bitmap it changes first and the header last, so
that a crash leaves the old image or the new one:

* :meth:`~Reshaping.resize` grows (the grown area reads as zero) or shrinks
  (with ``shrink``);
* :meth:`~Reshaping.set_backing` records another backing file, or none,
  without touching data (rebase -u), after opening it as ``create`` would;
* :meth:`~Reshaping.rewrite_header` replaces header fields (amend).
"""

from __future__ import annotations

import os

from .. import sysio
from ..bitmap import Bitmap
from ..errors import BackingFormatError, RangeError
from ..format import (
    MAX_CLUSTERS,
    MAX_IMAGE_SIZE,
    V2_INCOMPAT_BACKING_URI,
    Header,
    bitmap_length,
    cluster_count,
)
from ..stores import open_backing, remote
from ..stores.base import BlockSource
from ..stores.chain import ChainGuard
from ..stores.magic import choose_backing_format
from .metafile import write_bitmap_pages
from .populate import Populating


class Reshaping(Populating):
    """Resize, rebase and header rewrites of :class:`~addcow.image.AddCowImage`."""

    def rewrite_header(self, header: Header) -> None:
        """Flush, then replace the header by ``header`` (same header_size), durably.

        For header-only changes (amend). The caller keeps the header consistent
        with the files: virtual size, cluster size and backing stay as they are.
        """
        self._check_write(0, 0)
        self.flush()
        self._rewrite_header(header)

    def chain_guard(self) -> ChainGuard:
        """A loop guard that already holds this image's own two files (and its root)."""
        guard = ChainGuard(self.backing_root, self.allowed_uris)
        guard.add(self._meta_fd, self.path)
        guard.add(self._image_fd, self.image_path)
        return guard

    def set_backing(self, name: str | None, fmt: str | None = None) -> None:
        """Record ``name`` (or no backing) without touching data (rebase -u).

        The new backing file is validated as ``create`` does: it must open as
        ``fmt`` (chosen as ``create`` does when None) and must not loop back to
        this image's files. The header is rewritten last.
        """
        self._check_write(0, 0)
        new_backing: BlockSource | None = None
        # The new backing, if any, is a file name: no more BACKING_URI bit.
        features = self.header.incompatible_features
        if self.header.version == 2:
            features &= ~V2_INCOMPAT_BACKING_URI
        if name is None:
            header = self.header.with_changes(
                backing_name=None, backing_format=None, incompatible_features=features
            )
        else:
            if remote.scheme_of(name) is not None:
                raise BackingFormatError(
                    f"{remote.shown(name)}: a backing URI is pinned, not named: use "
                    "addcow.lifecycle.repin (or a local file of that name: ./NAME)"
                )
            raw = os.fsencode(name)
            fmt = choose_backing_format(
                raw, fmt, self.path, self.header.version, guard=self.chain_guard()
            )
            new_backing = open_backing(
                raw, fmt, self.path, guard=self.chain_guard(), force_share=False
            )
        try:
            if name is not None:
                header = self.header.with_changes(
                    backing_name=raw, backing_format=fmt, incompatible_features=features
                )
            self.flush()
            self._rewrite_header(header)
        except BaseException:
            if new_backing is not None:
                new_backing.close()
            raise
        old, self.backing = self.backing, new_backing
        self._route_reads()
        if old is not None:
            old.close()

    def set_backing_uri(
        self, ref: remote.BackingURI, fmt: str, backing: BlockSource | None
    ) -> None:
        """Record the backing URI ``ref`` (pinned by :func:`addcow.stores.remote.pin`),
        read as ``fmt``, without touching data; the header is rewritten last.
        ``backing``, the golden image ``ref`` pins, becomes the image's backing (it
        is closed if the header cannot be written)."""
        try:
            self._check_write(0, 0)
            if self.header.version != 2:
                raise BackingFormatError(
                    f"{self.path}: a backing URI needs a version 2 image, not version "
                    f"{self.header.version} (addcow amend -o compat=2 first)"
                )
            header = self.header.with_changes(
                backing_name=ref.encode(),
                backing_format=fmt,
                incompatible_features=self.header.incompatible_features | V2_INCOMPAT_BACKING_URI,
            )
            self.flush()
            self._rewrite_header(header)
        except BaseException:
            if backing is not None:
                backing.close()
            raise
        old, self.backing = self.backing, backing
        self._route_reads()
        if old is not None:
            old.close()

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Change the virtual size; shrinking needs ``shrink`` and drops the tail.

        A grown area reads as zero (as it does on a qcow2 overlay), even where
        the backing file is longer than the old size. Order, so that a crash
        leaves the old or the new size, both consistent: the bitmap's new bytes
        (trailing bytes are ignored by readers), then the image file, then the
        header (version 2) or the image file's size (version 1) as the commit.
        """
        self._check_write(0, 0)
        self._check_attached()
        if not 0 < new_size <= MAX_IMAGE_SIZE:
            raise RangeError(f"{self.path}: new size {new_size} outside 1..{MAX_IMAGE_SIZE}")
        if cluster_count(new_size, self.cluster_bits) > MAX_CLUSTERS:
            raise RangeError(f"{self.path}: new size {new_size} needs too many clusters")
        if new_size == self.size:
            return
        if new_size < self.size and not shrink:
            raise RangeError(
                f"{self.path}: shrinking from {self.size} to {new_size} bytes discards "
                "the end of the disk; use --shrink (shrink=True) to do it"
            )
        if new_size > self.size:
            self._zero_tail_of_last_cluster()
        self.flush()
        with self._flush_lock, self._lock:
            if new_size > self.size:
                self._grow(new_size)
            else:
                self._shrink(new_size)

    def _zero_tail_of_last_cluster(self) -> None:
        """Before growing: the old last cluster's bytes past the old end must read zero."""
        bits = self.cluster_bits
        last = self.total_clusters - 1
        tail, end = (
            self.size,
            min((last + 1) << bits, sysio.file_size(self._image_fd, self.image_path)),
        )
        if tail % self.cluster_size == 0:
            return
        if not self._all_allocated and not self.bitmap.is_set(last):
            self.populate(last << bits, tail - (last << bits))
        if end > tail and not sysio.punch_hole(self._image_fd, tail, end - tail, self.image_path):
            sysio.write_zeros(self._image_fd, tail, end - tail, self.image_path)

    def _grow(self, new_size: int) -> None:
        old_size, bits = self.size, self.cluster_bits
        old_clusters = self.bitmap.clusters
        new_clusters = cluster_count(new_size, bits)
        data = bytearray(bitmap_length(new_clusters))
        data[: len(self.bitmap.data)] = self.bitmap.data
        bitmap = Bitmap(data, new_clusters)
        # The grown area must read zero: mark it allocated (a hole in the image file)
        # when the backing would otherwise show through, or to keep ALL_ALLOCATED true.
        backing_size = self.backing.size if self.backing is not None else 0
        if self._all_allocated or backing_size > old_size:
            bitmap.set_range(old_clusters, new_clusters)
        meta_end = self.header.header_size + len(data)
        sysio.truncate(self._meta_fd, meta_end, self.path)
        old_end = self.header.header_size + len(self.bitmap.data)
        sysio.allocate(self._meta_fd, old_end, meta_end - old_end, self.path)  # as create does
        write_bitmap_pages(self._meta_fd, self.path, self.header.header_size, bitmap.take_dirty())
        sysio.fdatasync(self._meta_fd, self.path)
        # Image file: anything past the old cluster end up to the new size reads zero.
        aligned_old = min(-(-old_size >> bits) << bits, new_size)
        file_size = sysio.file_size(self._image_fd, self.image_path)
        stale_end = min(file_size, new_size)
        if stale_end > aligned_old and not sysio.punch_hole(
            self._image_fd, aligned_old, stale_end - aligned_old, self.image_path
        ):
            sysio.write_zeros(self._image_fd, aligned_old, stale_end - aligned_old, self.image_path)
        if file_size < new_size:
            sysio.truncate(self._image_fd, new_size, self.image_path)
        sysio.fdatasync(self._image_fd, self.image_path)
        if self.header.version >= 2:
            self._rewrite_header(self.header.with_changes(image_size=new_size))
        self.bitmap, self.size = bitmap, new_size
        self._route_reads()

    def _shrink(self, new_size: int) -> None:
        bits = self.cluster_bits
        new_clusters = cluster_count(new_size, bits)
        if self.header.version >= 2:
            self._rewrite_header(self.header.with_changes(image_size=new_size))
        else:
            sysio.truncate(self._image_fd, new_size, self.image_path)
            sysio.fdatasync(self._image_fd, self.image_path)
        bitmap = Bitmap(bytearray(self.bitmap.data[: bitmap_length(new_clusters)]), new_clusters)
        bitmap.clear_padding()
        write_bitmap_pages(self._meta_fd, self.path, self.header.header_size, bitmap.take_dirty())
        sysio.truncate(self._meta_fd, self.header.header_size + len(bitmap.data), self.path)
        sysio.fdatasync(self._meta_fd, self.path)
        if self.header.version >= 2:
            sysio.truncate(self._image_fd, new_size, self.image_path)
            sysio.fdatasync(self._image_fd, self.image_path)
        self.bitmap, self.size = bitmap, new_size
        self._route_reads()
