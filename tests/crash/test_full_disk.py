"""A really full file system: the image on a small tmpfs runs out of space.

The image file and the .add-cow file live on a 1 MiB tmpfs (``mount -t tmpfs
-o size=1m``; the test suite runs as root, as ``make test`` needs for its
system packages), the backing file outside it. Writes to distinct clusters
fill it until the kernel answers ENOSPC. Required: that write raises
AddCowIOError with errno ENOSPC; every earlier write still reads back, the
failed one reads its old content (the backing) or new content, nothing else;
after close and reopen the same holds and ``check_image`` is clean; once space
is freed, the same write succeeds.

Where mounting is not permitted (an unprivileged container), the same scenario
runs on the normal file system with ENOSPC injected into the image file's
writes after the same number of clusters by :class:`storage.Layer`: that
substitute is the one documented in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from storage import ENOSPC, Fault, Layer

import addcow
from addcow.check import check_image

CLUSTER = 65536
CLUSTERS = 64  # a 4 MiB virtual disk: more than the file system holds


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "1m") -> Iterator[bool]:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    try:
        yield proc.returncode == 0
    finally:
        if proc.returncode == 0:
            subprocess.run(["umount", str(where)], check=True)


def test_enospc_from_a_full_file_system(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"".join(bytes([0x40 + c]) * CLUSTER for c in range(CLUSTERS)))
    with small_filesystem(tmp_path / "mnt") as mounted:
        d = tmp_path / "mnt"
        filler = d / "filler"
        filler.write_bytes(b"\x01" * 3 * CLUSTER)  # freed later, to make room
        path = d / "d.add-cow"
        addcow.create(path, image_file="d.raw", backing_file=base, backing_format="raw")
        layer = Layer({"image": d / "d.raw"}, record=False,
                      fault=None if mounted else Fault(0, ENOSPC))
        written: list[int] = []
        failed_at = -1
        with layer.active(), addcow.open(path) as img:
            if not mounted:
                layer.fault = None  # count: fail the 10th write to the image file
            for c in range(CLUSTERS):
                if not mounted and c == 10:
                    layer.fault = Fault(len(layer.calls), ENOSPC)
                try:
                    img.write(bytes([0x80 + c]) * CLUSTER, c * CLUSTER)
                    img.flush()
                except addcow.AddCowIOError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    assert "No space left on device" in str(exc)
                    failed_at = c
                    break
                written.append(c)
            assert failed_at > 0, "the file system never filled up"
            shown = img.read(failed_at * CLUSTER, CLUSTER)
            old, new = bytes([0x40 + failed_at]), bytes([0x80 + failed_at])
            assert shown in (old * CLUSTER, new * CLUSTER)
            for c in written:
                assert img.read(c * CLUSTER, CLUSTER) == bytes([0x80 + c]) * CLUSTER
        result = check_image(path)
        assert result.corruptions == 0 and result.check_errors == 0, result.messages
        with addcow.open(path) as img:
            for c in written:
                assert img.read(c * CLUSTER, CLUSTER) == bytes([0x80 + c]) * CLUSTER
            assert img.read(failed_at * CLUSTER, CLUSTER) == bytes([0x40 + failed_at]) * CLUSTER
            filler.unlink()
            img.write(bytes([0x80 + failed_at]) * CLUSTER, failed_at * CLUSTER)  # the retry
            img.flush()
        with addcow.open(path, readonly=True) as img:
            assert img.read(failed_at * CLUSTER, CLUSTER) == bytes([0x80 + failed_at]) * CLUSTER
            assert img.allocated_clusters == len(written) + 1
        assert check_image(path).exit_status == 0
        print(f"\nfull disk: {'tmpfs' if mounted else 'injected'} ENOSPC at cluster {failed_at}")


def _allocated(path: Path) -> int:
    out = subprocess.run([sys.executable, "-m", "addcow", "info", "--output=json", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return int(json.loads(out)["format-specific"]["data"]["allocated-clusters"])


def test_a_stream_that_fills_the_file_system_keeps_its_progress(tmp_path: Path) -> None:
    """``addcow stream`` onto a 20 MiB tmpfs from a 48 MiB backing: it fails with
    ENOSPC in one line, but the clusters copied before the failing write keep
    their bits, so each rerun after space is freed goes further, and what was
    copied reads as the backing."""
    size = 48 << 20
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(1, 256)) * (size // 255) + b"\x01" * (size % 255))
    with small_filesystem(tmp_path / "mnt", "20m") as mounted:
        assert mounted, "mount -t tmpfs failed (make test runs as root)"
        d = tmp_path / "mnt"
        path = d / "d.add-cow"
        addcow.create(path, image_file="d.raw", backing_file=base, backing_format="raw")
        filler = d / "filler"
        filler.write_bytes(b"\x01" * (6 << 20))
        counts = []
        for rerun in range(3):
            if rerun == 2:
                filler.unlink()
            proc = subprocess.run([sys.executable, "-m", "addcow", "stream", str(path)],
                                  capture_output=True, text=True, timeout=120)
            lines = proc.stderr.splitlines()
            assert proc.returncode == 1, proc.stderr
            assert len(lines) == 1 and lines[0].startswith("addcow: "), proc.stderr
            assert "No space left on device" in lines[0]
            counts.append(_allocated(path))
        assert counts[0] * CLUSTER >= 8 << 20, counts  # most of the free space was used
        assert counts[1] == counts[0], counts  # no room: no progress, nothing lost
        assert counts[2] * CLUSTER >= counts[0] * CLUSTER + (4 << 20), counts
        result = check_image(path)
        assert result.corruptions == 0 and result.check_errors == 0, result.messages
        with addcow.open(path, readonly=True) as img, open(base, "rb") as f:
            assert img.allocated_clusters == counts[2]
            for c in range(img.total_clusters):
                if img.bitmap.is_set(c):
                    f.seek(c * CLUSTER)
                    assert img.read(c * CLUSTER, CLUSTER) == f.read(CLUSTER), c
