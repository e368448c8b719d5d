"""Benchmark: ``addcow view`` and ``addcow fold`` of a large, sparsely allocated image.

A 1 TiB image (64 KiB clusters, 16,777,216 of them) over a sparse 1 TiB raw
backing, 1% of its clusters allocated in runs of 64 (4 MiB) spread evenly over
the disk (every L2 table of the view maps some: 2048 tables), the bitmap written
directly. Each step runs in a process of its own, as a user runs it
(``python -m addcow view``, ``qemu-io`` writing 16 scattered clusters through the
view, ``python -m addcow fold``); the figures are wall time and peak resident
memory (``ru_maxrss`` of the child). Targets: under a second each, memory bounded
by the bitmap (2 MiB here), not by the virtual size.

    .venv/bin/python benchmarks/bench_view.py [--size 1T] [--percent 1] [--workdir DIR]
                                              [--json [DIR]]

``--json`` writes the figures to one file in ``benchmarks/results/`` (or DIR);
``record.py`` describes it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import record

import addcow
from addcow.format import Header

CLUSTER = 65536
RUN = 64


def child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return seconds, usage.ru_maxrss


def build(d: str, size: int, percent: float) -> int:
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.truncate(size)
    image = os.path.join(d, "d.add-cow")
    addcow.create(image, image_file="d.raw", backing_file="base.raw", backing_format="raw")
    clusters = size // CLUSTER
    every = int(RUN * 100 / percent)
    bitmap = bytearray(clusters // 8)
    for first in range(0, clusters - RUN + 1, every):
        bitmap[first // 8 : (first + RUN) // 8] = b"\xff" * (RUN // 8)
    with open(image, "r+b") as f:
        header = Header.unpack(f.read(4096))
        f.seek(header.header_size)
        f.write(bitmap)
    return clusters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1T", help="virtual size (suffix G or T)")
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--workdir", default=None)
    record.add_option(p)
    args = p.parse_args()
    run = record.Run("bench_view", args)
    size = int(args.size[:-1]) << {"G": 30, "T": 40}[args.size[-1].upper()]
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        clusters = build(d, size, args.percent)
        image, view = os.path.join(d, "d.add-cow"), os.path.join(d, "v.qcow2")
        with addcow.open(image, readonly=True) as img:
            allocated = img.allocated_clusters
        print(f"addcow from {os.path.dirname(addcow.__file__)}")
        print(f"image {args.size}: {clusters} clusters, {allocated} allocated "
              f"({100 * allocated / clusters:.2f}%), bitmap {clusters // 8 >> 10} KiB")  # fmt: skip
        py = [sys.executable, "-m", "addcow"]
        t_view, m_view = child([*py, "view", image, view])
        view_size = os.stat(view).st_size
        view_blocks = os.stat(view).st_blocks * 512
        writes = []
        for n in range(16):
            writes += ["-c", f"write -P 0x{n + 1:02x} {(n * size // 16) + 12345 * CLUSTER} 4096"]
        subprocess.run(["qemu-io", "-f", "qcow2", *writes, view], check=True, capture_output=True)
        t_fold, m_fold = child([*py, "fold", image])
        t_start, m_start = child([*py, "--version"])
        with addcow.open(image, readonly=True) as img:
            after = img.allocated_clusters
        print(f"view: {t_view:.2f} s, peak RSS {m_view >> 10} MiB; view file {view_size >> 20} "
              f"MiB apparent, {view_blocks >> 20} MiB on disk")  # fmt: skip
        print(
            f"fold (16 clusters written through the view): {t_fold:.2f} s, "
            f"peak RSS {m_fold >> 10} MiB; {after - allocated} clusters newly allocated"
        )
        print(f"(python -m addcow --version alone: {t_start:.2f} s, {m_start >> 10} MiB)")
    info = {"size": size, "clusters": clusters, "allocated": allocated}
    rows = {
        "view": {"seconds": t_view, "peak_rss_kib": m_view, "target_seconds": 1.0},
        "fold": {"seconds": t_fold, "peak_rss_kib": m_fold, "target_seconds": 1.0,
                 "newly_allocated": after - allocated},
        "python -m addcow --version": {"seconds": t_start, "peak_rss_kib": m_start},
    }  # fmt: skip
    run.write(info=info, rows=rows)


if __name__ == "__main__":
    main()
