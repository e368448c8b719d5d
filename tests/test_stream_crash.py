"""``addcow stream`` killed with SIGKILL at random moments, then resumed.

The promise of ``addcow stream``: interrupted at any point, running the stream again
continues where it stopped and the result is byte-identical to an
uninterrupted run; at every interruption point the image still reads
correctly. Two tests:

* ``test_stream_killed_at_random_moments_then_resumed``: a small driver process
  imports :mod:`addcow.lifecycle`, lowers ``COMMIT_BYTES`` and ``STREAM_SPAN``
  (so that one stream of a 64 MiB image commits its progress 64 times) and
  streams; it is killed with SIGKILL after a seeded random delay, 20 times.
  After every kill: the image opens and reads exactly the expected content,
  ``addcow check`` finds no corruption, the allocation never goes backwards and
  the clusters allocated before streaming keep their bytes in the image file.
  When a run happens to finish, the image is built again and the kills go on.
  At the end the real ``addcow stream`` resumes, and the raw file is
  byte-identical to the expected content and to an uninterrupted run's.
* ``test_cli_stream_killed_then_resumed``: the same with the real command line
  (``python -m addcow stream``, default commit settings) on a 192 MiB image.

The image (64 KiB clusters, MiB numbers ``m``)::

    base.raw   60 MiB + 1234 bytes: m % 5 == 3 holes, m % 7 == 5 explicit zero
               bytes, the rest random data with a 4 KiB block of zeros at the start
               of every MiB with m % 3 == 0
    d.raw      the image file, created over old bytes: 0xEE in [8 MiB, 16 MiB)
    disk       64 MiB + 4321 bytes (larger than the backing, not a cluster multiple)
    allocated before streaming: a partial write at 2 MiB + 1000 (3 clusters),
               write_zeroes of [20 MiB, 21 MiB), discard of [30 MiB, 31 MiB),
               a partial write inside the old bytes at 9 MiB + 5, the disk's last
               100 bytes
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import addcow as addcow_cli

import addcow

MiB = 1 << 20
CLUSTER = 65536
SEED = 20240611
KILLS = 20

DRIVER = """
import sys
import addcow
from addcow import lifecycle, streaming

streaming.COMMIT_BYTES = int(sys.argv[2])
lifecycle.STREAM_SPAN = int(sys.argv[3])
with addcow.open(sys.argv[1]) as img:
    print("streaming", img.allocated_clusters, flush=True)
    lifecycle.stream(img)
print("done", flush=True)
"""


@dataclass
class Layout:
    base_size: int
    size: int
    ops: list[tuple[str, int, int]]  # (kind, offset, length): write, zero, discard
    garbage: tuple[int, int]


SMALL = Layout(
    base_size=60 * MiB + 1234,
    size=64 * MiB + 4321,
    ops=[
        ("write", 2 * MiB + 1000, 2 * CLUSTER + 3000),
        ("zero", 20 * MiB, MiB),
        ("discard", 30 * MiB, MiB),
        ("write", 9 * MiB + 5, 7000),
        ("write", 64 * MiB + 4221, 100),
    ],
    garbage=(8 * MiB, 16 * MiB),
)


def build(directory: Path, layout: Layout, seed: int) -> bytes:
    """Create base.raw, d.raw (with old bytes) and d.add-cow; return the expected disk."""
    rng = random.Random(seed)
    for name in ("base.raw", "d.raw", "d.add-cow"):
        (directory / name).unlink(missing_ok=True)
    base = directory / "base.raw"
    content = bytearray(layout.size)
    with open(base, "wb") as f:
        f.truncate(layout.base_size)
        for lo in range(0, layout.base_size, MiB):
            m, hi = lo // MiB, min(lo + MiB, layout.base_size)
            if m % 5 == 3:
                continue
            if m % 7 == 5:
                chunk = bytes(hi - lo)
            else:
                chunk = bytearray(rng.randbytes(hi - lo))
                if m % 3 == 0:
                    chunk[:4096] = bytes(min(4096, len(chunk)))
            f.seek(lo)
            f.write(chunk)
            content[lo:hi] = chunk
    raw = directory / "d.raw"
    img = directory / "d.add-cow"
    addcow.create(img, image_file="d.raw", backing_file="base.raw", backing_format="raw",
                  size=layout.size)
    with open(raw, "r+b") as f:  # old bytes under clear bits
        f.seek(layout.garbage[0])
        f.write(b"\xee" * (layout.garbage[1] - layout.garbage[0]))
    with addcow.open(img) as image:
        for kind, offset, length in layout.ops:
            if kind == "write":
                data = rng.randbytes(length)
                image.write(data, offset)
                content[offset : offset + length] = data
            elif kind == "zero":
                image.write_zeroes(offset, length)
                content[offset : offset + length] = bytes(length)
            else:
                image.discard(offset, length)
                content[offset : offset + length] = bytes(length)
    return bytes(content)


def digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def image_digest(path: Path) -> str:
    h = hashlib.sha256()
    with addcow.open(path, readonly=True) as img:
        buf = bytearray(8 * MiB)
        for pos in range(0, img.size, len(buf)):
            view = memoryview(buf)[: min(len(buf), img.size - pos)]
            img.readinto(view, pos)
            h.update(view)
    return h.hexdigest()


def allocated(path: Path) -> set[int]:
    with addcow.open(path, readonly=True) as img:
        return {c for c in range(img.total_clusters) if img.bitmap.is_set(c)}


def allocated_bytes(raw: Path, clusters: set[int], size: int) -> str:
    """Hash of the image file's bytes over ``clusters`` (what streaming must not touch)."""
    h = hashlib.sha256()
    with open(raw, "rb") as f:
        for c in sorted(clusters):
            f.seek(c * CLUSTER)
            h.update(f.read(min(CLUSTER, size - c * CLUSTER)))
    return h.hexdigest()


def base_fingerprint(path: Path) -> tuple[str, int]:
    return digest(path.read_bytes()), os.stat(path).st_mtime_ns


def check_consistent(img: Path) -> None:
    """addcow check: no corruption (exit 0, or 3 for leaks such as a full bitmap
    whose ALL_ALLOCATED flag the kill came too early to write)."""
    proc = addcow_cli("check", img, check=False)
    assert proc.returncode in (0, 3), f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def start_driver(img: Path, commit_bytes: int, span: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(img), str(commit_bytes), str(span)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("streaming"), line + proc.stderr.read() if proc.stderr else line
    return proc


def test_stream_killed_at_random_moments_then_resumed(tmp_path: Path) -> None:
    layout = SMALL
    rng = random.Random(SEED)
    commit_bytes, span = MiB, 256 << 10

    # an uninterrupted run: the reference for "byte-identical", and its duration
    ref = tmp_path / "ref"
    ref.mkdir()
    expected = build(ref, layout, SEED)
    want = digest(expected)
    assert image_digest(ref / "d.add-cow") == want
    started = time.monotonic()
    proc = start_driver(ref / "d.add-cow", commit_bytes, span)
    out, err = proc.communicate(timeout=120)
    duration = time.monotonic() - started
    assert proc.returncode == 0 and out.strip() == "done", err
    reference_raw = (ref / "d.raw").read_bytes()[: layout.size]
    assert digest(reference_raw) == want

    work = tmp_path / "work"
    work.mkdir()
    assert build(work, layout, SEED) == expected
    img, raw, base = work / "d.add-cow", work / "d.raw", work / "base.raw"
    os.utime(base, ns=(10**18, 10**18))
    base_before = base_fingerprint(base)
    pre = allocated(img)
    pre_bytes = allocated_bytes(raw, pre, layout.size)
    total = -(-layout.size // CLUSTER)
    assert 0 < len(pre) < total

    interrupted: list[int] = []  # allocated clusters seen after each kill mid-stream
    rounds = 1
    last = len(pre)
    for _ in range(KILLS):
        if len(allocated(img)) == total:
            # a run finished before its kill: start again from a fresh image
            assert build(work, layout, SEED) == expected
            os.utime(base, ns=(10**18, 10**18))
            rounds += 1
            last = len(pre)
        proc = start_driver(img, commit_bytes, span)
        time.sleep(rng.uniform(0, duration * 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), proc.returncode
        # the image reads exactly the expected content, whatever the moment
        assert image_digest(img) == want
        check_consistent(img)
        now = allocated(img)
        assert pre <= now, "a cluster allocated before streaming lost its bit"
        assert len(now) >= last, "allocation went backwards"
        assert allocated_bytes(raw, pre, layout.size) == pre_bytes, (
            "streaming rewrote an allocated cluster"
        )
        if len(pre) < len(now) < total:
            interrupted.append(len(now))
        last = len(now)
    assert base_fingerprint(base) == base_before

    # enough kills landed mid-stream, at different points, to mean something
    assert len(interrupted) >= KILLS // 2, (interrupted, rounds)
    assert len(set(interrupted)) >= KILLS // 4, interrupted

    # resuming with the real command finishes; the result is the uninterrupted one
    proc_cli = addcow_cli("stream", img)
    assert proc_cli.stderr.startswith(f"streamed {img}: ")
    with open(raw, "rb") as f:
        final = f.read()
    assert len(final) == layout.size
    assert digest(final) == want
    assert final == reference_raw
    assert image_digest(img) == want
    info = addcow_cli("info", "--output=json", img).stdout
    assert '"complete": true' in info and '"all_allocated"' in info
    assert base_fingerprint(base) == base_before


BIG = Layout(
    base_size=192 * MiB,
    size=192 * MiB + 512,
    ops=[("write", 5 * MiB + 3, 3 * CLUSTER), ("zero", 50 * MiB, 2 * MiB)],
    garbage=(100 * MiB, 101 * MiB),
)


def test_cli_stream_killed_then_resumed(tmp_path: Path) -> None:
    """The command as a user runs it: kill -9 at a few random moments, then resume."""
    rng = random.Random(SEED + 1)
    expected = build(tmp_path, BIG, SEED + 1)
    want = digest(expected)
    img, raw, base = tmp_path / "d.add-cow", tmp_path / "d.raw", tmp_path / "base.raw"
    os.utime(base, ns=(10**18, 10**18))
    base_before = base_fingerprint(base)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "addcow", "stream", str(img)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert image_digest(img) == want
        check_consistent(img)
    addcow_cli("stream", img)
    with open(raw, "rb") as f:
        assert digest(f.read()) == want
    assert base_fingerprint(base) == base_before
