"""Populate: copying unallocated clusters in from the backing chain (:class:`Populating`).

Copy on read and the step of streaming (``addcow stream``, ``addcow serve
--stream``). The virtual content never changes: the clusters are claimed,
their backing bytes written to the image file (file to file where the
backing stores them plainly, holes where they read as zero), and only then
their bits set, as copy on write does (see :mod:`.core`). A failure keeps
the bits of what was copied before it, so a stream resumes after it.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import sysio
from ..stores.base import Extent, RouteKind
from .core import ImageCore

_POPULATE_CHUNK = 4 << 20
"""Bytes read from the backing per step of populate (copy on read, streaming)."""


class Populated(NamedTuple):
    """What :meth:`Populating.populate` did, in bytes.

    ``written`` went into the image file; ``zero`` was left as zero (ranges the
    backing reports as holes or zero, never read, and zero bytes found in what
    was read); ``read`` was read from the backing chain (every written byte is
    one of them): what a stream's rate limit counts.
    """

    written: int
    zero: int
    read: int


class Populating(ImageCore):
    """``populate`` of :class:`~addcow.image.AddCowImage`."""

    def populate(self, offset: int, length: int, buffer: bytearray | None = None) -> Populated:
        """Copy the unallocated clusters touching the range in from the backing chain.

        This is copy on read and the step of streaming: the virtual content does
        not change, clusters already allocated are never touched, and ranges that
        read as zero (holes or zero bytes in the backing, or past its end) are
        punched in the image file instead of written. ``buffer`` is scratch space
        (reused across calls by a streaming loop). Returns what it did
        (:class:`Populated`).
        """
        self._check_write(offset, length)
        if length == 0 or self._all_allocated:
            return Populated(0, 0, 0)
        self._check_backing_open(offset)
        bits = self.cluster_bits
        claims = self._claim(offset >> bits, (offset + length + self.cluster_size - 1) >> bits)
        written = zero = read = done = 0
        reached = [0]  # in the claim being copied, the image file holds the backing's bytes below
        try:
            for first, end in claims:
                lo, hi = first << bits, min(end << bits, self.size)
                reached[0] = lo
                w, z, r = self._fill_from_backing(lo, hi, buffer, reached)
                written += w
                zero += z
                read += r
                done += 1
        except BaseException:
            # What was copied before the failure keeps its bits, as after success
            # (its data was written first), so a stream that ran out of space
            # resumes after it instead of from the start of its span.
            self._release(claims[:done], commit=True)
            if done < len(claims):
                first, end = claims[done]
                cut = end if reached[0] >= min(end << bits, self.size) else reached[0] >> bits
                self._release(claims[done:], commit=False, keep=(first, cut))
            raise
        self._release(claims, commit=True)
        return Populated(written, zero, read)

    def _fill_from_backing(
        self, lo: int, hi: int, buffer: bytearray | None, reached: list[int]
    ) -> Populated:
        """Make the image file's [lo, hi) equal to the backing chain's content.

        ``reached[0]`` follows the copy: below it the image file already holds
        the backing's bytes.
        """
        backing_end = lo if self.backing is None else min(hi, max(lo, self.backing.size))
        extents = (
            []
            if self.backing is None or backing_end <= lo
            else list(self.backing.block_status_at(lo, backing_end - lo, 1))
        )
        if backing_end < hi:
            extents.append(Extent(backing_end, hi - backing_end, 1, False, True, None))
        # Data that one local file of the backing holds plainly (its route is a
        # FILE: a raw file, a qcow2 file's normal clusters) is copied file to file
        # (a reflink where the file system shares extents).
        backing = self.backing
        # Zero ranges must read as zero in the image file: punched, in case it holds
        # old bytes there (a crash between data and bit, a shrink). Where the file
        # has no data in [lo, hi) at all (a fresh image file), nothing needs punching;
        # no one else writes these clusters while we hold their claims.
        punch = not sysio.is_hole(self._image_fd, lo, hi - lo)
        written = zero = read = 0
        for ext in extents:
            if ext.zero:
                if punch and not sysio.punch_hole(
                    self._image_fd, ext.offset, ext.length, self.image_path
                ):
                    sysio.write_zeros(self._image_fd, ext.offset, ext.length, self.image_path)
                zero += ext.length
                reached[0] = ext.offset + ext.length
                continue
            copy_from, delta = -1, 0
            if backing is not None and ext.depth == 1 and ext.host_offset is not None:
                route = backing.route(ext.offset, ext.length)
                if route.kind is RouteKind.FILE:
                    copy_from, delta = route.fd, route.offset - ext.offset
            pos, stop = ext.offset, ext.offset + ext.length
            while pos < stop:
                step = min(stop - pos, _POPULATE_CHUNK)
                if buffer is None or len(buffer) < step:
                    buffer = bytearray(max(step, _POPULATE_CHUNK))
                self._read_backing(memoryview(buffer)[:step], pos)
                w, z = sysio.write_sparse(
                    self._image_fd,
                    buffer,
                    step,
                    pos,
                    self.image_path,
                    punch=punch,
                    copy_from=copy_from,
                    copy_delta=delta,
                )
                written += w
                zero += z
                read += step
                pos += step
                reached[0] = pos
        return Populated(written, zero, read)
