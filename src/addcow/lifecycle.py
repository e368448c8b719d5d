"""From a fresh add-cow image to a standalone raw disk: streaming and detaching.

Streaming copies every unallocated cluster from the backing chain into the
image file with :meth:`AddCowImage.populate`, in spans of up to
:data:`STREAM_SPAN` bytes. Its progress is durable as it goes: the image is
flushed every :data:`COMMIT_BYTES` bytes or :data:`COMMIT_SECONDS` seconds, and
flush writes data before bits (see :mod:`addcow.image`). A stream killed at any
moment (Ctrl-C, kill -9, power loss) therefore leaves an image that reads
correctly, and running it again skips every cluster whose bit reached the disk
and copies the rest: the result is the same as an uninterrupted run.

Detaching removes the .add-cow file of a complete image (every bit set, or
ALL_ALLOCATED), leaving the image file as a plain raw disk. It happens while
holding the image's exclusive lock, so no other addcow user can have it open.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import sysio
from .errors import AddCowError
from .image import AddCowImage

STREAM_SPAN = 32 << 20
"""Most bytes copied per populate call while streaming."""

COMMIT_BYTES = 256 << 20
"""Streaming flushes after this many bytes..."""

COMMIT_SECONDS = 5.0
"""...or this many seconds, whichever comes first."""


class IncompleteImageError(AddCowError):
    """The operation needs every cluster in the image file, and some are not."""


@dataclass
class StreamStats:
    """What a stream did: bytes written, bytes left as holes, seconds taken."""

    copied: int = 0
    zero: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.copied + self.zero


def unallocated_bytes(image: AddCowImage) -> int:
    """Bytes of the virtual disk still read from the backing chain."""
    if image.complete:
        return 0
    missing = image.total_clusters - image.allocated_clusters
    last = image.total_clusters - 1
    if not image.bitmap.is_set(last):
        # the last cluster may be partial
        missing -= 1
        return missing * image.cluster_size + (image.size - (last << image.cluster_bits))
    return missing * image.cluster_size


def stream(
    image: AddCowImage,
    *,
    rate: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StreamStats:
    """Copy every unallocated cluster from the backing chain; mark the image complete.

    ``rate`` limits the copy to about that many bytes per second. ``progress`` is
    called with the number of virtual bytes dealt with after each step.
    """
    stats = StreamStats()
    started = last_commit = time.monotonic()
    since_commit = 0
    bits = image.cluster_bits
    clusters = image.total_clusters
    span = max(1, STREAM_SPAN >> bits)
    buffer = bytearray(min(STREAM_SPAN, 4 << 20))
    pos = 0
    while not image.complete:
        first = image.bitmap.find(pos, clusters, False)
        if first >= clusters:
            break
        end = image.bitmap.find(first, min(clusters, first + span), True)
        lo, hi = first << bits, min(end << bits, image.size)
        written, zero = image.populate(lo, hi - lo, buffer)
        stats.copied += written
        stats.zero += zero
        since_commit += hi - lo
        pos = end
        if progress is not None:
            progress(hi - lo)
        now = time.monotonic()
        if since_commit >= COMMIT_BYTES or now - last_commit >= COMMIT_SECONDS:
            image.flush()
            since_commit, last_commit = 0, now
        if rate:
            ahead = stats.total / rate - (now - started)
            if ahead > 0:
                time.sleep(ahead)
    image.flush()
    stats.seconds = time.monotonic() - started
    return stats


def detach(image: AddCowImage, *, dry_run: bool = False) -> str:
    """Remove the .add-cow file of a complete image; return the raw image file's path.

    ``image`` must be open read-write (holding the exclusive lock). It is closed
    afterwards, unless ``dry_run``.
    """
    if not image.complete:
        missing = image.total_clusters - image.allocated_clusters
        raise IncompleteImageError(
            f"{image.path}: {missing} of {image.total_clusters} clusters are still in the "
            f"backing file; run 'addcow stream {image.path}' first"
        )
    image.flush()
    if dry_run:
        return image.image_path
    os.unlink(image.path)
    sysio.sync_directory(os.path.dirname(image.path) or ".")
    image.close()
    return image.image_path
