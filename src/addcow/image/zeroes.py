"""Zeroes and discard: making whole clusters read as zero (:class:`Zeroing`).

    ``write_zeroes`` over whole clusters punches a hole in the image file (or
    with ``may_unmap=False`` zeroes it in place) and sets the bits; partial
    clusters are written with zero bytes through the copy-on-write path.
    ``discard`` over whole clusters punches holes and sets the bits of
    unallocated ones, so they read as zero and streaming skips them (like
    dm-clone's discard); over partial clusters it does nothing, which the
    NBD and block layer contract of discard allows.


Both claim the clusters they change and set bits only after the image file
reads as zero there, as copy on write does (see :mod:`.core`).
"""

from __future__ import annotations

from .. import sysio
from ..errors import SlowZeroError
from .core import ImageCore


class Zeroing(ImageCore):
    """``write_zeroes`` and ``discard`` of :class:`~addcow.image.AddCowImage`."""

    def write_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = True, fast: bool = False
    ) -> None:
        """Make [offset, offset+length) read as zero.

        Whole clusters are punched out of the image file (``may_unmap``) or zeroed
        in place, and marked allocated; partial clusters get zero bytes written.
        With ``fast`` it is done only if it is fast, else nothing changes and
        :class:`SlowZeroError` is raised (NBD's FAST_ZERO): the range must cover
        whole clusters (the disk's end counts), and the file system must punch
        the hole (``may_unmap``) or zero the range in place (FALLOC_FL_ZERO_RANGE)
        instead of the fallback that writes zero bytes.
        """
        self._check_write(offset, length)
        lo, hi = self._whole_clusters(offset, length)
        if fast and (lo != offset or hi != offset + length):
            raise SlowZeroError(
                f"{self.path}: zeroing {length} bytes at {offset} is fast only over whole "
                f"{self.cluster_size}-byte clusters"
            )
        if fast:
            self._zero_whole(lo, hi, unmap=may_unmap, allocate=True, fast=True)
            return
        if lo >= hi:
            self._write_zero_bytes(offset, length)
            return
        self._write_zero_bytes(offset, lo - offset)
        self._zero_whole(lo, hi, unmap=may_unmap, allocate=True)
        self._write_zero_bytes(hi, offset + length - hi)

    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters in the range: they read as zero afterwards.

        Partial clusters at either end are left as they are.
        """
        self._check_write(offset, length)
        lo, hi = self._whole_clusters(offset, length)
        if lo < hi:
            self._zero_whole(lo, hi, unmap=True, allocate=False)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        if length > 0:
            self.write(bytes(length), offset)

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """The cluster-aligned part of a range (the image's end counts as aligned)."""
        mask = self.cluster_size - 1
        lo = (offset + mask) & ~mask
        end = offset + length
        hi = end if end == self.size else end & ~mask
        return lo, max(lo, hi)

    def _zero_whole(
        self, lo: int, hi: int, *, unmap: bool, allocate: bool, fast: bool = False
    ) -> None:
        """Zero the whole clusters of [lo, hi) and set their bits.

        With ``allocate`` False (discard) an unsupported hole punch is not an
        error: the clusters are then left as they were. With ``fast`` an
        unsupported punch or zero range raises SlowZeroError (nothing changed).
        """
        bits = self.cluster_bits
        first, end = lo >> bits, (hi + self.cluster_size - 1) >> bits
        claims = self._claim(first, end)
        try:
            if unmap:
                punched = sysio.punch_hole(self._image_fd, lo, hi - lo, self.image_path)
                if not punched and allocate:
                    if fast:
                        raise SlowZeroError(f"{self.image_path}: cannot punch holes")
                    sysio.zero_range(self._image_fd, lo, hi - lo, self.image_path)
                commit = punched or allocate
            elif fast:
                if not sysio.try_zero_range(self._image_fd, lo, hi - lo, self.image_path):
                    raise SlowZeroError(f"{self.image_path}: cannot zero ranges in place")
                commit = True
            else:
                sysio.zero_range(self._image_fd, lo, hi - lo, self.image_path)
                commit = True
        except BaseException:
            self._release(claims, commit=False)
            raise
        self._release(claims, commit=commit)
