"""A golden image built the way cloud images are built, for the benchmarks.

An ext4 file system about ``fill`` percent full of files (half of them text
from a small vocabulary, half random bytes followed by zeros), made with
``mke2fs -d``, then ``qemu-img convert -c -O qcow2``: zlib-compressed, 64 KiB
clusters, qcow2 version 3, the encoding of Ubuntu's and Debian's cloud images.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

KiB, MiB = 1 << 10, 1 << 20


def build(directory: str, size: int, *, fill: int = 40, seed: int = 20240229) -> tuple[str, str]:
    """Write ``golden-fs.raw`` (the file system) and ``golden.qcow2`` in ``directory``."""
    tree = os.path.join(directory, "golden-tree")
    fs = os.path.join(directory, "golden-fs.raw")
    golden = os.path.join(directory, "golden.qcow2")
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]  # fmt: skip
    target, total, i = size * fill // 100, 0, 0
    while total < target:
        n = min(rng.randint(4 * KiB, 4 * MiB), target - total + 4 * KiB)
        if i % 2:
            data = os.urandom(n // 2) + bytes(n - n // 2)
        else:
            text = bytearray()
            while len(text) < n:
                text += rng.choice(words) + b" "
            data = bytes(text[:n])
        where = os.path.join(tree, f"d{i % 37}")
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, f"f{i}"), "wb") as f:
            f.write(data)
        total, i = total + n, i + 1
    for path in (fs, golden):
        if os.path.exists(path):
            os.unlink(path)
    with open(fs, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, fs], check=True)
    subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=64k",
                    fs, golden], check=True)  # fmt: skip
    shutil.rmtree(tree)
    return fs, golden
