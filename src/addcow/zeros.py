"""Finding zero bytes at memcmp speed, in the caller's buffer.

Every "is this all zero?" in addcow is answered here: the sparse writer
behind streaming and copy on read (:func:`addcow.sysio.write_sparse`),
convert and compare (:mod:`addcow.copy`), and the NBD server's OFFSET_HOLE
chunks (:mod:`addcow.nbd.transmission`). A comparison is ``startswith`` of a zero
buffer at an offset: memcmp in C, no copy of the data, and no Python loop per
byte. Where one C-level search can settle a whole buffer (``find`` of a zero
block, a strided slice of first bytes), it is used before any per-block test.

Holes are found at :data:`GRANULE`, the block of file systems and of the page
cache, and the granularity of the NBD server's holes.
"""

from __future__ import annotations

GRANULE = 4096
"""Runs of zero bytes this large and aligned are holes (in files and NBD replies)."""

ZEROS = bytes(1 << 20)
"""A zero buffer to compare with and copy from."""

ZERO_VIEW = memoryview(ZEROS)
"""Slices of it are prefixes to compare with and copy from, without copying zero
bytes first."""
_BLOCK = ZERO_VIEW[:GRANULE]

Buffer = bytes | bytearray


def is_zero(buf: Buffer, lo: int, hi: int) -> bool:
    """True if ``buf[lo:hi]`` holds only zero bytes."""
    step, zero = len(ZEROS), ZERO_VIEW
    return all(buf.startswith(zero[: min(step, hi - pos)], pos) for pos in range(lo, hi, step))


def is_zero_block(buf: Buffer, pos: int, end: int) -> bool:
    """True if the block of :data:`GRANULE` bytes at ``pos`` (cut at ``end``) is zero."""
    return buf.startswith(_BLOCK[: min(GRANULE, end - pos)], pos)


def zero_run_end(buf: Buffer, pos: int, end: int) -> int:
    """Where the run of zero bytes at ``pos`` ends, at :data:`GRANULE` steps, before ``end``.

    Galloping: steps double while they are all zero and halve when not, so a
    long run costs a few dozen comparisons instead of one per block.
    """
    step = GRANULE
    while pos < end:
        n = min(step, end - pos)
        if buf.startswith(ZERO_VIEW[:n], pos):
            pos += n
            step = min(step << 1, len(ZEROS))
        elif step > GRANULE:
            step >>= 1
        else:
            break
    return pos


def data_run_end(buf: Buffer, pos: int, end: int) -> int:
    """Where the run of data blocks at ``pos`` ends: the first block of :data:`GRANULE`
    bytes from ``pos`` on (at steps of GRANULE, cut at ``end``) that is all zero, or
    ``end``.

    One strided slice takes the first byte of every block; only blocks whose
    first byte is zero are compared, so data costs C-speed work, not a Python
    step per block (which would also hold the GIL from the threads around).
    """
    samples = buf[pos:end:GRANULE]
    i = samples.find(0)
    while i >= 0:
        block = pos + i * GRANULE
        if buf.startswith(_BLOCK[: min(GRANULE, end - block)], block):
            return block
        i = samples.find(0, i + 1)
    return end


def segments(buf: Buffer, start: int, length: int, offset: int) -> list[tuple[int, int, bool]]:
    """``buf[start:start+length]``, the disk's bytes at ``offset``, as (lo, hi, zero) runs.

    Runs end on multiples of :data:`GRANULE` of the disk (not of the buffer), so
    holes line up with the disk's blocks even for an unaligned read; positions
    count from ``start``.
    """
    if buf.find(_BLOCK, start, start + length) < 0:
        # No zero block anywhere (the common case for data): one run, found by one
        # search. A partial block at either end is then data, which is allowed.
        return [(0, length, False)]
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    while pos < length:
        end = min(length, (offset + pos) // GRANULE * GRANULE + GRANULE - offset)
        zero = buf.startswith(ZERO_VIEW[: end - pos], start + pos)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], end, zero)
        else:
            runs.append((pos, end, zero))
        pos = end
    return runs


def has_zero_segment(buf: Buffer, start: int, length: int, offset: int) -> bool:
    """Whether a run of :func:`segments` would be zero, without building the runs.

    Looks at the first byte of each disk-aligned block with one strided slice
    and compares whole blocks only where that byte is zero (:func:`data_run_end`).
    """
    if length == GRANULE and not offset % GRANULE:  # one aligned block: the usual read
        return not buf[start] and buf.startswith(_BLOCK, start)
    end = start + length
    first = min(end, start + (-offset) % GRANULE)  # the first disk-aligned block
    if first > start and not buf[start] and buf.startswith(ZERO_VIEW[: first - start], start):
        return True
    return data_run_end(buf, first, end) < end
