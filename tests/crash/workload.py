"""A seeded random workload on a small add-cow image, and the model that judges it.

The image (4 KiB clusters)::

    base.raw   BASE_SIZE bytes: every cluster a distinct non-zero pattern, except
               clusters 5-7 (a hole) and 11 (explicit zero bytes)
    d.raw      the image file, holding old bytes under clear bits: 0xEE in
               clusters 16-24, so that a bit set without its data would show garbage
    d.add-cow  SIZE bytes (larger than the backing, the last cluster partial)

Operations: writes (whole and partial clusters, across cluster boundaries),
FUA writes, write_zeroes (with and without unmap), discard, flush, populate
(copy on read) and, rarely, a whole ``stream``.

:class:`Model` tracks, per byte of the virtual disk, what a reader may see after
a crash: ``durable`` (every write acknowledged before the last completed flush,
and FUA writes) plus the values of every write begun since (``pending``); a
byte that matches neither is a violation.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import addcow
from addcow import lifecycle, streaming
from addcow.check import check_image

CLUSTER = 4096
CLUSTERS = 40
SIZE = CLUSTERS * CLUSTER - 1234
BASE_SIZE = 30 * CLUSTER + 100
GARBAGE = (16 * CLUSTER, 25 * CLUSTER)


def base_bytes() -> bytes:
    out = bytearray()
    for c in range(-(-BASE_SIZE // CLUSTER)):
        if 5 <= c <= 7 or c == 11:
            out += bytes(CLUSTER)
        else:
            out += bytes((0x20 + c + i // 512) & 0xFF or 1 for i in range(CLUSTER))
    return bytes(out[:BASE_SIZE])


def build(directory: Path) -> bytes:
    """Create the three files; return the virtual disk's content."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("base.raw", "d.raw", "d.add-cow"):
        (directory / name).unlink(missing_ok=True)
    base = base_bytes()
    with open(directory / "base.raw", "wb") as f:
        for c in range(-(-BASE_SIZE // CLUSTER)):
            chunk = base[c * CLUSTER : (c + 1) * CLUSTER]
            if 5 <= c <= 7:
                continue  # a hole
            f.seek(c * CLUSTER)
            f.write(chunk)
        f.truncate(BASE_SIZE)
    addcow.create(directory / "d.add-cow", image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=SIZE, cluster_size=CLUSTER)
    with open(directory / "d.raw", "r+b") as f:  # old bytes under clear bits
        f.seek(GARBAGE[0])
        f.write(b"\xee" * (GARBAGE[1] - GARBAGE[0]))
        f.flush()
        os.fdatasync(f.fileno())
    return base + bytes(SIZE - BASE_SIZE)


Op = tuple[Any, ...]


def gen_ops(seed: int, count: int, *, stream: bool = True) -> list[Op]:
    """A deterministic list of operations (independent of what the image does)."""
    rng = random.Random(seed)
    ops: list[Op] = []
    for i in range(count):
        r = rng.random()
        offset = rng.randrange(SIZE)
        if rng.random() < 0.4:  # cluster aligned
            offset -= offset % CLUSTER
        length = rng.choice([1, 100, 511, 4096, 4097, 3 * CLUSTER + 7, rng.randrange(1, 20000)])
        length = max(1, min(length, SIZE - offset))
        if r < 0.45:
            data = bytes([rng.randrange(1, 256)]) * length
            ops.append(("write", offset, data, rng.random() < 0.15))
        elif r < 0.55:
            ops.append(("zero", offset, length, rng.random() < 0.7))
        elif r < 0.63:
            ops.append(("discard", offset, length))
        elif r < 0.78:
            ops.append(("flush",))
        elif r < 0.92 or not stream or i < count // 2:
            ops.append(("populate", offset, length))
        else:
            ops.append(("stream",))
    return ops


def run_op(img: addcow.AddCowImage, op: Op) -> None:
    kind = op[0]
    if kind == "write":
        img.write(op[2], op[1], fua=op[3])
    elif kind == "zero":
        img.write_zeroes(op[1], op[2], may_unmap=op[3])
    elif kind == "discard":
        img.discard(op[1], op[2])
    elif kind == "flush":
        img.flush()
    elif kind == "populate":
        img.populate(op[1], op[2])
    elif kind == "stream":
        saved = lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES
        lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES = 3 * CLUSTER, 5 * CLUSTER
        try:
            lifecycle.stream(img, threads=1)  # one thread: crash points in call order
        finally:
            lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES = saved
    else:
        raise ValueError(op)


def whole_clusters(offset: int, length: int) -> tuple[int, int]:
    """AddCowImage._whole_clusters, for the model of discard."""
    lo = -(-offset // CLUSTER) * CLUSTER
    end = offset + length
    hi = end if end == SIZE else end - end % CLUSTER
    return lo, max(lo, hi)


def effect(op: Op) -> tuple[int, bytes] | None:
    """The bytes an operation gives the virtual disk (None: content unchanged)."""
    kind = op[0]
    if kind == "write":
        return op[1], op[2]
    if kind == "zero":
        return op[1], bytes(op[2])
    if kind == "discard":
        lo, hi = whole_clusters(op[1], op[2])
        return (lo, bytes(hi - lo)) if lo < hi else None
    return None


@dataclass
class Model:
    """What the disk may read after a crash (see the module docstring)."""

    durable: bytearray
    latest: bytearray = field(init=False)
    pending: list[tuple[int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.latest = bytearray(self.durable)

    def begin(self, op: Op) -> None:
        eff = effect(op)
        if eff is not None:
            offset, data = eff
            self.pending.append((offset, data))
            self.latest[offset : offset + len(data)] = data

    def ack(self, op: Op) -> None:
        if op[0] in ("flush", "stream"):  # stream ends with a flush
            self.flushed()
        elif op[0] == "write" and op[3]:  # FUA: this write is durable
            offset, data = op[1], op[2]
            self.durable[offset : offset + len(data)] = data
            self._forget(offset, offset + len(data))

    def flushed(self) -> None:
        """A flush completed (single-threaded: every write before it was acknowledged)."""
        self.durable = bytearray(self.latest)
        self.pending = []

    def _forget(self, lo: int, hi: int) -> None:
        kept: list[tuple[int, bytes]] = []
        for off, data in self.pending:
            end = off + len(data)
            if end <= lo or off >= hi:
                kept.append((off, data))
                continue
            if off < lo:
                kept.append((off, data[: lo - off]))
            if end > hi:
                kept.append((hi, data[hi - off :]))
        self.pending = kept

    def violations(self, actual: bytes, limit: int = 5) -> list[str]:
        """Bytes that are neither durable nor the value of a write begun since."""
        out: list[str] = []
        d = self.durable
        for c in range(-(-SIZE // CLUSTER)):
            lo, hi = c * CLUSTER, min((c + 1) * CLUSTER, SIZE)
            if actual[lo:hi] == d[lo:hi]:
                continue
            near = [(o, v) for o, v in self.pending if o < hi and o + len(v) > lo]
            for i in range(lo, hi):
                a = actual[i]
                if a == d[i] or any(o <= i < o + len(v) and v[i - o] == a for o, v in near):
                    continue
                out.append(
                    f"cluster {c} byte {i}: read {a:#x}, durable {d[i]:#x}, "
                    f"pending {sorted({v[i - o] for o, v in near if o <= i < o + len(v)})}"
                )
                break
            if len(out) >= limit:
                break
        return out


def verify(path: Path, model: Model, *, reopen_write: bool = False) -> list[str]:
    """Check an image after a crash; return the problems found (empty: fine)."""
    problems: list[str] = []
    result = check_image(path)
    if result.corruptions or result.check_errors:
        problems.append(f"check: {result.messages}")
    with addcow.open(path, readonly=True) as img:
        actual = img.read(0, SIZE)
        problems += model.violations(actual)
    if reopen_write and not problems:
        # the image is usable again: a write after the crash lands and survives
        with addcow.open(path) as img:
            img.write(b"\x5a" * 5000, CLUSTER + 300)
        with addcow.open(path, readonly=True) as img:
            if img.read(CLUSTER + 300, 5000) != b"\x5a" * 5000:
                problems.append("a write after recovery did not survive")
        result = check_image(path)
        if result.corruptions or result.check_errors:
            problems.append(f"check after recovery write: {result.messages}")
    return problems


def run_workload(
    path: Path, ops: list[Op], note: Callable[..., None], *, close: bool = True
) -> None:
    """Run ``ops`` on the image, noting "begin"/"ack" of each (and "open"/"close")."""
    img = addcow.open(path)
    note("open")
    for i, op in enumerate(ops):
        note("begin", i)
        run_op(img, op)
        note("ack", i)
    if close:
        note("begin", "close")
        img.close()
        note("ack", "close")


def replay(model: Model, ops: list[Op], event: tuple[Any, ...]) -> None:
    """Advance the model by one noted event."""
    if event[0] == "begin" and event[1] != "close":
        model.begin(ops[event[1]])
    elif event[0] == "ack":
        if event[1] == "close":
            model.flushed()
        else:
            model.ack(ops[event[1]])
