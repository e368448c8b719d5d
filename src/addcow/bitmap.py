"""The cluster bitmap in memory: lookups, runs, and which pages need writing.

Bit layout (docs/specification.md, "Bitmap")::

    byte:     0                     1
    bit:      b7 b6 b5 b4 b3 b2 b1 b0   b7 ... b0
    cluster:   7  6  5  4  3  2  1  0   15 ...  8

Cluster ``n`` is bit ``n % 8`` (least significant first) of byte ``n // 8``.
A set bit means the cluster lives in the image file; a clear bit means it is
read from the backing chain. Bits past the last cluster (padding in the last
byte) are zero.

States and rules:

* Bits only go from 0 to 1 while an image is open. ``set_range`` is the only
  mutator, so no code path can clear a bit.
* Every change marks the 4 KiB page of bitmap bytes it touched as dirty.
  :meth:`Bitmap.take_dirty` hands the dirty pages, as copies, to the image's
  flush, which writes them after the image file's data is durable (the crash
  ordering argument lives in :mod:`addcow.image.core`, which owns both files).
* Scans run at C speed: windows of the bitmap are turned into Python integers
  and searched with bit arithmetic, never with a Python loop over bits.

This class does no locking; :class:`addcow.image.AddCowImage` serialises
calls to ``set_range`` and ``take_dirty`` under its own lock.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 4096
"""Granularity of dirty tracking and of bitmap writes, in bitmap bytes."""

_MAX_WINDOW = 1 << 16
_COUNT_CHUNK = 1 << 20


class Bitmap:
    """One bit per cluster, held in a bytearray the size of the on-disk bitmap."""

    __slots__ = ("_allocated", "_dirty", "clusters", "data")

    def __init__(self, data: bytearray, clusters: int) -> None:
        self.data = data
        self.clusters = clusters
        self._dirty: set[int] = set()
        self._allocated = _popcount(data, clusters)

    @property
    def allocated(self) -> int:
        """Number of clusters whose bit is set."""
        return self._allocated

    @property
    def full(self) -> bool:
        return self._allocated == self.clusters

    def is_set(self, cluster: int) -> bool:
        return bool(self.data[cluster >> 3] >> (cluster & 7) & 1)

    def set_range(self, first: int, end: int) -> int:
        """Set the bits of clusters [first, end); return how many were newly set."""
        if first >= end:
            return 0
        data = self.data
        lo_byte, hi_byte = first >> 3, (end - 1) >> 3
        before = _popcount_bytes(data, lo_byte, hi_byte + 1)
        if lo_byte == hi_byte:
            data[lo_byte] |= ((1 << (end - first)) - 1) << (first & 7)
        else:
            data[lo_byte] |= (0xFF << (first & 7)) & 0xFF
            data[lo_byte + 1 : hi_byte] = b"\xff" * (hi_byte - lo_byte - 1)
            data[hi_byte] |= (1 << (((end - 1) & 7) + 1)) - 1
        added = _popcount_bytes(data, lo_byte, hi_byte + 1) - before
        if added:
            self._allocated += added
            self._dirty.update(range(lo_byte // PAGE, hi_byte // PAGE + 1))
        return added

    def state(self, first: int, end: int) -> int:
        """1 if every bit of clusters [first, end) is set, 0 if none is, else -1."""
        bits = int.from_bytes(self.data[first >> 3 : ((end - 1) >> 3) + 1], "little")
        mask = (1 << (end - first)) - 1
        bits = (bits >> (first & 7)) & mask
        return 1 if bits == mask else 0 if bits == 0 else -1

    def find(self, pos: int, end: int, value: bool) -> int:
        """First cluster in [pos, end) whose bit equals ``value``, or ``end``."""
        data = self.data
        window = 8
        while pos < end:
            lo = pos >> 3
            hi = min(lo + window, (end + 7) >> 3)
            bits = int.from_bytes(data[lo:hi], "little")
            if not value:
                bits = ~bits & ((1 << ((hi - lo) << 3)) - 1)
            bits >>= pos & 7
            if bits:
                return min(pos + (bits & -bits).bit_length() - 1, end)
            pos = hi << 3
            window = min(window << 3, _MAX_WINDOW)
        return end

    def runs(self, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Maximal runs (start, stop, bit) of equal bits covering [first, end)."""
        pos = first
        while pos < end:
            value = self.is_set(pos)
            stop = self.find(pos + 1, end, not value)
            yield pos, stop, value
            pos = stop

    def take_dirty(self) -> list[tuple[int, bytes]]:
        """Copies of the dirty pages as (byte offset, bytes), oldest state cleared.

        The copies are taken at the moment of the call, so they contain only bits
        whose data was written before the call. Consecutive pages are merged.
        """
        if not self._dirty:
            return []
        pages = sorted(self._dirty)
        self._dirty.clear()
        out: list[tuple[int, bytes]] = []
        start = prev = pages[0]
        for page in [*pages[1:], -1]:
            if page != prev + 1:
                lo, hi = start * PAGE, min((prev + 1) * PAGE, len(self.data))
                out.append((lo, bytes(self.data[lo:hi])))
                start = page
            prev = page
        return out

    def mark_dirty(self, chunks: list[tuple[int, bytes]]) -> None:
        """Put pages back on the dirty list after a failed write of them."""
        for offset, chunk in chunks:
            self._dirty.update(range(offset // PAGE, (offset + len(chunk) + PAGE - 1) // PAGE))

    def padding_bits(self) -> int:
        """The bits past the last cluster in the last byte (must be zero)."""
        spare = len(self.data) * 8 - self.clusters
        if not spare or not self.data:
            return 0
        return self.data[-1] >> (8 - spare) if spare < 8 else self.data[-1]

    def clear_padding(self) -> None:
        """Zero the padding bits (a repair; not a cluster bit going 1 to 0)."""
        spare = len(self.data) * 8 - self.clusters
        if spare and self.data:
            self.data[-1] &= (1 << (8 - spare)) - 1
            self._dirty.add((len(self.data) - 1) // PAGE)


def _popcount_bytes(data: bytearray, lo: int, hi: int) -> int:
    return int.from_bytes(data[lo:hi], "little").bit_count()


def _popcount(data: bytearray, clusters: int) -> int:
    """Set bits among the first ``clusters`` bits of ``data``."""
    total = 0
    full_bytes = clusters >> 3
    for lo in range(0, full_bytes, _COUNT_CHUNK):
        total += _popcount_bytes(data, lo, min(lo + _COUNT_CHUNK, full_bytes))
    tail = clusters & 7
    if tail:
        total += (data[full_bytes] & ((1 << tail) - 1)).bit_count()
    return total
