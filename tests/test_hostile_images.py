"""Hostile .add-cow files: a fuzzer over the header and the bitmap.

Seeds: ``tests/corpus/*.add-cow`` (every malformed case of test_format.py, the
control images, huge sizes; regenerate with tests/corpus/make_corpus.py).
Hypothesis picks a seed and mutates it (byte edits, interesting 32/64-bit
values written over fields, truncation, extension, a bitmap of random bytes),
then the library does what ``addcow info``, ``check``, ``map`` and ``convert``
do, opens the image read-write, and runs every public call that changes an
image (create over it, rebase, resize, amend, stream, commit, detach).
Required: only :class:`addcow.AddCowError` subclasses escape; no example takes
more than 5 seconds (hypothesis deadline); no example allocates more than 64 MiB
(tracemalloc peak), whatever size the header claims (2^60 bytes and more).

``make test`` runs a few hundred examples; ``make campaign`` (ADDCOW_CAMPAIGN=1)
runs 20,000.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import addcow
from addcow import AddCowError, lifecycle
from addcow.check import check_image
from addcow.cli.mapping import map_entries
from addcow.copy import copy_to_raw
from addcow.info import image_info

CORPUS = sorted(Path(__file__).with_name("corpus").glob("*.add-cow"))
SEEDS = {p.stem: p.read_bytes() for p in CORPUS}
CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
EXAMPLES = 20_000 if CAMPAIGN else 250
MiB = 1 << 20
MEMORY_LIMIT = 64 * MiB
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, 1 << 60, 1 << 62, 1 << 63, (1 << 64) - 1]
stats = {"executions": 0, "refused": 0, "opened": 0}
# One worker runs the whole file (make test: --dist loadgroup): the report reads ``stats``.
pytestmark = pytest.mark.xdist_group("hostile-images")
BASE = bytes(range(256)) * (MiB // 256)
worked: Counter[str] = Counter()  # lifecycle calls that succeeded


def _setup(directory: Path) -> None:
    """The files the seeds name, as each example expects to find them."""
    with open(directory / "disk.raw", "wb") as f:  # streamed into or trimmed by the last one
        f.truncate(MiB)
    if (directory / "base.raw").exists():
        return
    (directory / "base.raw").write_bytes(BASE)
    os.mkfifo(directory / "fifo")


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 8300), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 120), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u64"), st.integers(0, 120), st.sampled_from(INTERESTING)),
    st.tuples(st.just("truncate"), st.integers(0, 8300), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 9000), st.integers(0, 255)),
)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        if kind == "byte" and pos < len(buf):
            buf[pos] = value
        elif kind in ("u32", "u64") and pos + 8 <= len(buf):
            fmt = "<I" if kind == "u32" else "<Q"
            struct.pack_into(fmt, buf, pos, value & (0xFFFFFFFF if kind == "u32" else ~0))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "extend":
            buf += bytes([value]) * pos
    return bytes(buf)


def exercise(path: Path) -> None:
    """What info, check, map and convert do, a read-write open, then every public
    library call that changes an image: create over it, rebase -u, resize,
    amend, stream, commit and detach. Each call either works or raises an
    AddCowError; the others still run."""
    stats["executions"] += 1
    try:
        image_info(str(path))
        check_image(path)
        with addcow.open(path, readonly=True) as img:
            map_entries(img, 0, img.size)
            img.read(0, min(img.size, 65536))
            img.read(img.size - min(img.size, 4096), min(img.size, 4096))
            if img.size <= 4 * MiB:
                copy_to_raw(img, str(path.with_name("out.raw")), force=True)
        with addcow.open(path) as img:
            img.write(b"x", 0)
        stats["opened"] += 1
    except AddCowError as exc:
        assert str(exc), "an error says what is wrong"
        stats["refused"] += 1
    for action in LIFECYCLE:
        try:
            action(path)
            worked[action.__name__] += 1
        except AddCowError as exc:
            assert str(exc), "an error says what is wrong"


def _create_over(path: Path) -> None:
    upper = path.with_name("upper.add-cow")
    upper.unlink(missing_ok=True)
    path.with_name("upper.raw").unlink(missing_ok=True)
    addcow.create(upper, image_file="upper.raw", backing_file=path.name, backing_format="add-cow")


def _small(img: addcow.AddCowImage) -> bool:
    return img.size <= 4 * MiB


def _rebase_unsafe(path: Path) -> None:
    with addcow.AddCowImage.open(path, with_backing=False) as img:
        img.set_backing("base.raw", "raw")


def _resize(path: Path) -> None:
    with addcow.open(path) as img:
        if _small(img):
            img.resize(img.size + 65536)
            img.resize(img.size - 65536, shrink=True)


def _amend(path: Path) -> None:
    with addcow.AddCowImage.open(path, with_backing=False) as img:
        version = img.header.version
        lifecycle.amend(img, 3 - version)
        lifecycle.amend(img, version)


def _stream(path: Path) -> None:
    with addcow.open(path) as img:
        if _small(img):
            lifecycle.stream(img, threads=1)


def _commit(path: Path) -> None:
    with addcow.AddCowImage.open(path, readonly=True, with_backing=False) as img:
        if _small(img):
            lifecycle.commit(img)
    (path.parent / "base.raw").write_bytes(BASE)  # the next example starts from the same base


def _detach(path: Path) -> None:
    image = addcow.open(path)
    try:
        if image.complete:
            lifecycle.detach(image)
    finally:
        image.close()


LIFECYCLE = (_create_over, _rebase_unsafe, _resize, _amend, _stream, _commit, _detach)


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=not CAMPAIGN,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          database=None)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(mutation, max_size=6),
    bitmap=st.none() | st.binary(max_size=64),
)
def test_mutated_images_raise_only_addcow_errors_in_bounded_memory(
    tmp_path: Path, seed: str, edits: list[tuple[str, int, int]], bitmap: bytes | None
) -> None:
    _setup(tmp_path)
    data = mutate(SEEDS[seed], edits)
    if bitmap is not None and len(data) >= 4096:
        data = data[:4096] + bitmap
    path = tmp_path / "d.add-cow"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        exercise(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{seed} {edits}: {peak} bytes allocated"


def test_every_seed_of_the_corpus(tmp_path: Path) -> None:
    """Each seed unmutated: the malformed ones are refused, the controls open."""
    assert len(SEEDS) >= 50
    _setup(tmp_path)
    opened: set[str] = set()
    for name, data in SEEDS.items():
        _setup(tmp_path)
        path = tmp_path / "d.add-cow"
        path.write_bytes(data)
        before = stats["opened"]
        exercise(path)
        if stats["opened"] > before:
            opened.add(name)
    # every lifecycle call really ran on the valid ones (a refusal is no test of it)
    assert set(worked) == {action.__name__ for action in LIFECYCLE}, worked
    # valid images, and what a reader must accept (test_format.py says why)
    assert opened == {
        "control_valid_v2", "control_valid_v1", "control_v2_no_backing_small_clusters",
        "unknown_autoclear_bits", "unknown_compatible_bits", "bits_past_the_last_cluster",
        "all_allocated_flag_bits_clear",  # check reports it; readers honour the flag
    }


def test_report_fuzz_executions() -> None:
    """Runs last in this file: prints what the fuzzer did (for docs/reliability.md)."""
    print(f"\nhostile images: {stats}")
    assert stats["executions"] >= len(SEEDS)
