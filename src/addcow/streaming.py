"""Streaming, written once: which clusters to copy next, when to commit, how fast.

Two drivers copy every unallocated cluster of an image from its backing chain
into its image file: the threads of :func:`addcow.lifecycle.stream` (``addcow
stream``) and the event-loop task of :func:`addcow.serve.live.stream` (``addcow
serve --stream``). Both copy with :meth:`~addcow.image.AddCowImage.populate`,
which claims the clusters, writes their data and only then sets their bits, so
a span may be copied while clients write, and spans may finish in any order.
What they share lives here; each driver only decides how to wait (a thread
blocks, the event loop awaits) and how large its spans are.

Spans
    :func:`next_span` walks the bitmap from a cluster number to the next run
    of unallocated clusters, cut at a span size: one bitmap scan at C speed
    per span, never a loop over clusters.

Commits
    Progress is made durable by ``flush`` (data, then bits: the order argued
    in :mod:`addcow.image.core`) after :data:`COMMIT_BYTES` bytes written or
    :data:`COMMIT_SECONDS` seconds, whichever comes first
    (:class:`CommitPolicy`). A stream killed at any moment therefore loses at
    most that much work, and a rerun copies only what is still unallocated.

Rate
    :class:`RateLimit` says how long to wait so that the bytes read from the
    backing chain stay at about the asked rate on average. Ranges the backing
    reports as holes or zero are never read (populate punches them), so they
    cost nothing: a sparse disk streams at the pace of its data. A span is
    copied at full speed and the wait comes after it, so under a rate a span
    is a tenth of a second's worth (:meth:`RateLimit.span`): larger ones would
    reach a remote golden server as bursts at line rate, whatever the rate
    asked.
"""

from __future__ import annotations

import time

from .image import AddCowImage

COMMIT_BYTES = 256 << 20
"""A stream flushes after writing this many bytes..."""

COMMIT_SECONDS = 5.0
"""...or after this many seconds, whichever comes first."""


def next_span(image: AddCowImage, pos: int, span_bytes: int) -> tuple[int, int, int] | None:
    """The next run of unallocated clusters at or after cluster ``pos``.

    Returns (lo, hi, after): the byte range, at most ``span_bytes`` long (one
    cluster at least) and cut at the virtual size, and the cluster number after
    it; None when no cluster from ``pos`` on is unallocated.
    """
    bitmap, clusters, bits = image.bitmap, image.total_clusters, image.cluster_bits
    first = bitmap.find(pos, clusters, False)
    if first >= clusters:
        return None
    end = bitmap.find(first, min(clusters, first + max(1, span_bytes >> bits)), True)
    return first << bits, min(end << bits, image.size), end


class CommitPolicy:
    """When a stream flushes: every :data:`COMMIT_BYTES` written or :data:`COMMIT_SECONDS`."""

    def __init__(self) -> None:
        self.bytes = COMMIT_BYTES
        self.seconds = COMMIT_SECONDS
        self._written = 0
        self._last = time.monotonic()

    def copied(self, written: int) -> bool:
        """Count ``written`` bytes; True (and start counting again) when a flush is due."""
        self._written += written
        now = time.monotonic()
        if self._written >= self.bytes or now - self._last >= self.seconds:
            self._written, self._last = 0, now
            return True
        return False


class RateLimit:
    """Keeps the bytes read from the backing at about ``rate`` per second (None: no limit)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self._since = time.monotonic()
        self._base = 0

    def span(self, span_bytes: int) -> int:
        """The span size to use: ``span_bytes``, or a tenth of a second's worth under a rate."""
        return min(span_bytes, self.rate // 10) if self.rate else span_bytes

    def delay(self, done: int) -> float:
        """Seconds to wait, after ``done`` bytes read since the start, to keep the rate."""
        if not self.rate:
            return 0.0
        return max(0.0, (done - self._base) / self.rate - (time.monotonic() - self._since))

    def restart(self, rate: int | None, done: int) -> None:
        """Keep ``rate`` from now on, ``done`` bytes read so far (a new rate, a resume).

        Counting again from now means that neither time spent paused nor the
        bytes under an earlier rate turn into a burst.
        """
        self.rate = rate
        self._since = time.monotonic()
        self._base = done
