"""A reference model of an add-cow image against the real thing.

The model is the specification in a few lines: one bytearray per layer (the
backing chain's content, and the image file's content with one "allocated"
flag per cluster). A read takes each cluster from the image layer if it is
allocated, else from the backing layer (zeros past its end). Hypothesis drives
random sequences of write / write_zeroes (may_unmap either way) / discard /
flush / close and reopen, at offsets and lengths chosen to straddle cluster
boundaries, on several layouts: 4 KiB and 64 KiB clusters, a virtual size that
is not a cluster multiple, an image larger and one smaller than its backing,
no backing, an add-cow backing, and both format versions (version 1: 64 KiB
clusters and a raw backing).

After every step the full disk and a random range must read as the model
says; ``allocated_clusters``, ``block_status`` and (after a close) the bitmap
on disk must agree with the model's allocation flags.

Semantics modelled, from docs/specification.md and the image module's design note:

* write: every touched cluster that is unallocated is first copied from the
  backing (copy on write), then the data lands; the clusters become allocated.
* write_zeroes: the same as writing zero bytes (whole clusters may be punched,
  partial ones are written through copy on write).
* discard: whole clusters of the range (the image's end counts as a cluster
  boundary) read as zero and are allocated; partial clusters are unchanged.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import addcow

KiB = 1024
PATTERN = bytes(range(256)) * 1025


@dataclass(frozen=True)
class Layout:
    version: int
    cluster: int
    size: int
    backing_size: int | None  # None: no backing file
    addcow_backing: bool = False  # the backing is itself an add-cow image over a raw file


LAYOUTS = {
    "V2Small4k": Layout(2, 4 * KiB, 20 * 4 * KiB, 11 * 4 * KiB + 1000),
    "V2OddSize64k": Layout(2, 64 * KiB, 5 * 64 * KiB + 12345, 6 * 64 * KiB),
    "V2NoBacking4k": Layout(2, 4 * KiB, 13 * 4 * KiB + 7, None),
    "V2AddCowBacking4k": Layout(2, 4 * KiB, 18 * 4 * KiB, 14 * 4 * KiB, addcow_backing=True),
    "V1Raw64k": Layout(1, 64 * KiB, 6 * 64 * KiB, 4 * 64 * KiB + 777),
    "V1OddSize64k": Layout(1, 64 * KiB, 3 * 64 * KiB + 5000, 3 * 64 * KiB + 5000),
}


def make_backing(directory: str, layout: Layout) -> tuple[str | None, str | None, bytes]:
    """Create the backing file(s); return (name, format, virtual content)."""
    if layout.backing_size is None:
        return None, None, b""
    rng = random.Random(layout.size * 7 + layout.cluster)
    size = layout.backing_size
    content = bytearray(rng.randbytes(size))
    raw = os.path.join(directory, "base.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        # Leave some clusters as holes and some as explicit zeros.
        for pos in range(0, size, layout.cluster):
            kind = (pos // layout.cluster) % 4
            chunk = content[pos : pos + layout.cluster]
            if kind == 1:
                content[pos : pos + len(chunk)] = bytes(len(chunk))  # a hole
                continue
            if kind == 2:
                content[pos : pos + len(chunk)] = bytes(len(chunk))
                chunk = content[pos : pos + len(chunk)]
            f.seek(pos)
            f.write(chunk)
    if not layout.addcow_backing:
        return "base.raw", "raw", bytes(content)
    mid = os.path.join(directory, "mid.add-cow")
    addcow.create(mid, image_file="mid.raw", backing_file="base.raw", cluster_size=layout.cluster)
    with addcow.open(mid) as img:
        for cluster in range(0, size // layout.cluster, 3):
            img.write(b"\xee" * 100, cluster * layout.cluster + 50)
        img.discard(2 * layout.cluster, layout.cluster)
        content = bytearray(img.read(0, img.size))
    return "mid.add-cow", "add-cow", bytes(content)


class Model:
    """The reference: a backing layer and an image layer with allocation flags."""

    def __init__(self, size: int, cluster: int, backing: bytes) -> None:
        self.size = size
        self.cluster = cluster
        self.backing = bytearray(backing[:size].ljust(size, b"\0"))
        self.image = bytearray(size)
        self.clusters = (size + cluster - 1) // cluster
        self.allocated = [False] * self.clusters

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            c = pos // self.cluster
            stop = min(end, (c + 1) * self.cluster)
            layer = self.image if self.allocated[c] else self.backing
            out += layer[pos:stop]
            pos = stop
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        for c in range(offset // self.cluster, (offset + len(data) - 1) // self.cluster + 1):
            if not self.allocated[c]:
                lo, hi = c * self.cluster, min((c + 1) * self.cluster, self.size)
                self.image[lo:hi] = self.backing[lo:hi]  # copy on write
                self.allocated[c] = True
        self.image[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        end = offset + length
        first = -(-offset // self.cluster)
        stop = self.clusters if end == self.size else end // self.cluster
        for c in range(first, stop):
            lo, hi = c * self.cluster, min((c + 1) * self.cluster, self.size)
            self.image[lo:hi] = bytes(hi - lo)
            self.allocated[c] = True


def ranges(layout: Layout) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) inside the disk, often starting or ending near a cluster edge."""
    size, cluster = layout.size, layout.cluster
    clusters = (size + cluster - 1) // cluster
    near_edge = st.builds(
        lambda c, d: min(max(c * cluster + d, 0), size - 1),
        st.integers(0, clusters), st.integers(-3, 3),
    )
    offset = st.one_of(near_edge, st.integers(0, size - 1))
    length = st.one_of(
        st.integers(1, 16),
        st.integers(1, 3 * cluster),
        st.builds(lambda k, d: max(1, k * cluster + d), st.integers(1, 3), st.integers(-2, 2)),
        st.just(size),
    )
    return st.tuples(offset, length).map(lambda t: (t[0], min(t[1], size - t[0])))


def make_machine(name: str, layout: Layout) -> type[RuleBasedStateMachine]:
    span = ranges(layout)

    class ImageMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = tempfile.mkdtemp(prefix=f"addcow-model-{name}-")
            backing_name, fmt, content = make_backing(self.dir, layout)
            self.path = os.path.join(self.dir, "disk.add-cow")
            addcow.create(
                self.path, image_file="disk.raw", backing_file=backing_name, backing_format=fmt,
                size=layout.size, cluster_size=layout.cluster, version=layout.version,
            )
            self.model = Model(layout.size, layout.cluster, content)
            self.img: addcow.AddCowImage | None = addcow.open(self.path)
            self.counter = 0
            assert self.img.size == layout.size
            assert self.img.cluster_size == layout.cluster
            assert self.img.total_clusters == self.model.clusters

        def teardown(self) -> None:
            if self.img is not None:
                self.img.close()
            shutil.rmtree(self.dir, ignore_errors=True)

        @property
        def image(self) -> addcow.AddCowImage:
            assert self.img is not None
            return self.img

        def probe(self, at: tuple[int, int]) -> None:
            offset, length = at
            got = self.image.read(offset, length)
            want = self.model.read(offset, length)
            if got != want:
                bad = next(i for i in range(length) if got[i] != want[i])
                raise AssertionError(
                    f"read({offset}, {length}) differs first at byte {offset + bad}: "
                    f"got {got[bad]:#x}, model {want[bad]:#x}"
                )

        # -- operations ---------------------------------------------------------

        @rule(at=span, probe=span, fua=st.booleans())
        def write(self, at: tuple[int, int], probe: tuple[int, int], fua: bool) -> None:
            offset, length = at
            self.counter += 1
            shift = (self.counter * 37) % 256
            data = PATTERN[shift : shift + length]
            if len(data) < length:
                data = (data * (length // max(1, len(data)) + 1))[:length]
            self.image.write(data, offset, fua=fua)
            self.model.write(offset, data)
            self.probe(probe)

        @rule(at=span, probe=span)
        def write_nowait(self, at: tuple[int, int], probe: tuple[int, int]) -> None:
            """The event loop's write: done at once, or nothing done and left to write()."""
            offset, length = at
            self.counter += 1
            data = bytes([(self.counter * 53) % 255 + 1]) * length
            if not self.image.write_nowait(data, offset):
                self.image.write(data, offset)
            self.model.write(offset, data)
            self.probe(probe)

        @rule(at=span, probe=span, may_unmap=st.booleans())
        def write_zeroes(
            self, at: tuple[int, int], probe: tuple[int, int], may_unmap: bool
        ) -> None:
            offset, length = at
            self.image.write_zeroes(offset, length, may_unmap=may_unmap)
            self.model.write(offset, bytes(length))
            self.probe(probe)

        @rule(at=span, probe=span)
        def discard(self, at: tuple[int, int], probe: tuple[int, int]) -> None:
            offset, length = at
            self.image.discard(offset, length)
            self.model.discard(offset, length)
            self.probe(probe)

        @rule(probe=span)
        def flush(self, probe: tuple[int, int]) -> None:
            self.image.flush()
            self.probe(probe)

        @rule(probe=span, readonly_look=st.booleans())
        def close_and_reopen(self, probe: tuple[int, int], readonly_look: bool) -> None:
            self.image.close()
            self.img = None
            self.check_bitmap_on_disk()
            if readonly_look:
                with addcow.open(self.path, readonly=True) as ro:
                    assert ro.read(0, layout.size) == self.model.read(0, layout.size)
                    assert ro.allocated_clusters == sum(self.model.allocated)
            self.img = addcow.open(self.path)
            self.probe(probe)

        @rule(at=span)
        def read(self, at: tuple[int, int]) -> None:
            self.probe(at)

        @rule(at=span)
        def block_status_of_a_range(self, at: tuple[int, int]) -> None:
            offset, length = at
            self.check_extents(offset, length)

        # -- checks after every step ----------------------------------------------

        @invariant()
        def full_read_matches(self) -> None:
            self.probe((0, layout.size))

        @invariant()
        def allocation_matches(self) -> None:
            assert self.image.allocated_clusters == sum(self.model.allocated)
            assert self.image.total_clusters == self.model.clusters
            self.check_extents(0, layout.size)

        def check_extents(self, offset: int, length: int) -> None:
            cluster = layout.cluster
            seen: dict[int, set[bool]] = {}
            pos = offset
            for ext in self.image.block_status(offset, length):
                assert ext.offset == pos, f"gap or overlap at {pos}: {ext}"
                assert ext.length > 0, ext
                pos += ext.length
                allocated = ext.present and ext.depth == 0
                if allocated:
                    assert ext.host_offset == ext.offset, ext
                else:
                    assert ext.depth >= 1 or not ext.present, ext
                if ext.zero:
                    assert self.model.read(ext.offset, ext.length) == bytes(ext.length), (
                        f"extent says zero but the model has data: {ext}"
                    )
                for c in range(ext.offset // cluster, (ext.offset + ext.length - 1) // cluster + 1):
                    seen.setdefault(c, set()).add(allocated)
            assert pos == offset + length, f"extents end at {pos}, not {offset + length}"
            for c, states in seen.items():
                assert states == {self.model.allocated[c]}, (
                    f"cluster {c}: block_status says allocated={states}, "
                    f"model says {self.model.allocated[c]}"
                )

        def check_bitmap_on_disk(self) -> None:
            """After a close the on-disk bitmap is exactly the model's flags."""
            with open(self.path, "rb") as f:
                raw = f.read()
            header = addcow.Header.unpack(raw)
            bitmap = raw[header.header_size :]
            assert len(bitmap) == (self.model.clusters + 7) // 8
            bits = int.from_bytes(bitmap, "little")
            for c, flag in enumerate(self.model.allocated):
                assert bool(bits >> c & 1) == flag, f"cluster {c}: on-disk bit != model"
            assert bits >> self.model.clusters == 0, "padding bits past the last cluster"
            if header.version == 2:
                assert header.all_allocated == all(self.model.allocated)

    ImageMachine.__name__ = ImageMachine.__qualname__ = name
    return ImageMachine


_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

for _name, _layout in LAYOUTS.items():
    _machine = make_machine(_name, _layout)
    _machine.TestCase.settings = _SETTINGS
    globals()[f"Test{_name}"] = _machine.TestCase
del _name, _layout, _machine


def test_model_layouts_cover_the_required_cases() -> None:
    """The layouts above cover both versions, 4 KiB and 64 KiB clusters, sizes that are
    not a multiple of the cluster and backings smaller and larger than the disk."""
    cases = LAYOUTS.values()
    assert {lay.cluster for lay in cases} >= {4 * KiB, 64 * KiB}
    assert {lay.version for lay in cases} == {1, 2}
    assert any(lay.size % lay.cluster for lay in cases if lay.version == 2)
    assert any(lay.size % lay.cluster for lay in cases if lay.version == 1)
    assert any(lay.backing_size is not None and lay.size > lay.backing_size for lay in cases)
    assert any(lay.backing_size is not None and lay.size < lay.backing_size for lay in cases)
    assert all(lay.cluster == 64 * KiB and not lay.addcow_backing
               for lay in cases if lay.version == 1)
