"""Helpers for the qcow2 tests: QEMU as referee, a chain opener, map comparison.

``open_qcow2`` opens a qcow2 file the way the chain opener will: the backing
name is a file name taken literally (never ``json:``, never a protocol),
relative names start at the qcow2's directory, raw backings become
:class:`RawFile` and qcow2 backings open recursively, all under one
:class:`ChainGuard`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import require_tool, run

from addcow.stores import BlockSource, Extent
from addcow.stores.chain import ChainGuard, resolve_name
from addcow.stores.qcow2 import Qcow2File
from addcow.stores.raw import RawFile


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return run([require_tool("qemu-img"), *map(str, args)]).stdout


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    cmd: list[str] = [require_tool("qemu-io"), "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    run([*cmd, str(path)])


def create(path: Path, size: str | int, *options: str, backing: Path | None = None,
           backing_fmt: str = "raw") -> Path:
    """qemu-img create -f qcow2 with ``-o`` options, optionally over a backing file."""
    args: list[str] = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(options)]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def convert_raw(path: Path, fmt: str = "qcow2") -> bytes:
    """The guest disk as QEMU reads it (qemu-img convert -f FMT -O raw)."""
    out = path.with_name(path.name + ".referee.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def data_segments(path: Path, lo: int = 0, hi: int | None = None,
                  block: int = 1) -> list[tuple[int, int]]:  # fmt: skip
    """The data segments (SEEK_DATA/SEEK_HOLE) of ``path`` in the whole blocks of
    [lo, hi) (the whole file by default)."""
    if hi is None:
        hi = os.stat(path).st_size
    lo, hi = -(-lo // block) * block, hi // block * block
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = lo
        while pos < hi:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= hi:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, min(end, hi)))
            pos = end
    finally:
        os.close(fd)
    return found


def qemu_map(path: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(qemu_img("map", "--output=json", path))
    return result


def open_qcow2(path: Path | str, guard: ChainGuard | None = None,
               force_share: bool = False) -> Qcow2File:
    """Open a qcow2 file and its backing chain (raw or qcow2 backings)."""
    guard = guard if guard is not None else ChainGuard()
    path = str(path)

    def open_backing(name: bytes, fmt: str) -> BlockSource:
        target = resolve_name(name, path)
        guard.descend(target)
        if fmt == "raw":
            return RawFile(target, guard=guard, force_share=force_share)
        return open_qcow2(target, guard, force_share)

    return Qcow2File(path, guard=guard, force_share=force_share, open_backing=open_backing)


def read_all(store: BlockSource) -> bytes:
    buf = bytearray(store.size)
    store.readinto(memoryview(buf), 0)
    return bytes(buf)


def assert_map_matches(store: BlockSource, path: Path) -> list[Extent]:
    """block_status_at over the whole disk agrees with qemu-img map, byte range by range.

    Compared at every boundary either side reports: depth, present, zero; and
    for data ranges the host offset (None for compressed clusters, which QEMU
    reports without an offset). Zero ranges' offsets are not compared: QEMU
    shows the reserved host cluster of a zero cluster, addcow shows none.
    """
    ours = list(store.block_status_at(0, store.size, 0))
    theirs = qemu_map(path)
    assert sum(e.length for e in ours) == store.size
    assert ours[0].offset == 0
    for a, b in itertools.pairwise(ours):
        assert a.offset + a.length == b.offset, (a, b)
    qemu = [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e.get("offset"))
            for e in theirs]
    mine = [(e.offset, e.length, e.depth, e.present, e.zero, e.host_offset) for e in ours]
    cuts = sorted({s for s, *_ in qemu} | {s for s, *_ in mine} | {store.size})
    for lo, hi in itertools.pairwise(cuts):
        q = _at(qemu, lo)
        m = _at(mine, lo)
        assert (q[0], q[1], q[2]) == (m[0], m[1], m[2]), (
            f"[{lo:#x}, {hi:#x}): qemu depth/present/zero {q[:3]}, addcow {m[:3]}"
        )
        if q[1] and not q[2]:
            assert q[3] == m[3], f"[{lo:#x}, {hi:#x}): qemu offset {q[3]}, addcow {m[3]}"
    return ours


def _at(entries: list[tuple[int, int, int, bool, bool, int | None]], pos: int
        ) -> tuple[int, bool, bool, int | None]:
    for start, length, depth, present, zero, offset in entries:
        if start <= pos < start + length:
            return depth, present, zero, None if offset is None else offset + pos - start
    raise AssertionError(f"no extent covers {pos:#x}")


# -- building and patching images ---------------------------------------------------

def patch(path: Path, offset: int, fmt: str, *values: int | bytes) -> None:
    """Overwrite ``struct.pack(">" + fmt, *values)`` at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, *values))


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def l1_entry(path: Path, index: int) -> tuple[int, int]:
    """(file offset of L1 entry ``index``, its value)."""
    l1_offset = read_u64(path, 40)
    at = l1_offset + 8 * index
    return at, read_u64(path, at)


def l2_entry(path: Path, l1_index: int, l2_index: int, entry_size: int = 8
             ) -> tuple[int, int]:
    """(file offset of an L2 entry, its first word)."""
    _, l1 = l1_entry(path, l1_index)
    at = (l1 & 0x00FFFFFFFFFFFE00) + entry_size * l2_index
    return at, read_u64(path, at)


# -- images of every variant, made by qemu-img and qemu-io ----------------------------

KiB = 1024
MiB = 1 << 20


def source_raw(path: Path, size: int, seed: int) -> Path:
    """A raw disk of mixed blocks: random (incompressible), text, a byte pattern,
    zeros, with a zero region from 2 MiB to 6 MiB (unallocated after convert)."""
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB]), size - pos)
        kind = rng.randrange(4)
        if kind == 0:
            chunk = rng.randbytes(n)
        elif kind == 1:
            chunk = (b"qcow2 text block %d " % pos * (n // 16 + 1))[:n]
        elif kind == 2:
            chunk = bytes([rng.randrange(1, 256)]) * n
        else:
            chunk = bytes(n)
        buf[pos : pos + n] = chunk
        pos += n
    buf[2 * MiB : 6 * MiB] = bytes(len(buf[2 * MiB : 6 * MiB]))
    path.write_bytes(buf)
    return path


def base_raw(path: Path, size: int = 2 * MiB) -> Path:
    """A raw backing: 64 KiB blocks of byte 0x60 + i, a hole at [1 MiB, 1 MiB + 256 KiB)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // (64 * KiB)):
            if MiB <= i * 64 * KiB < MiB + 256 * KiB:
                continue
            f.seek(i * 64 * KiB)
            f.write(bytes([0x60 + i % 128]) * (64 * KiB))
    return path


def converted(d: Path, name: str, *options: str, compress: bool = False,
              size: int = 6 * MiB + 12800, seed: int = 1) -> Path:
    src = source_raw(d / f"{name}.src", size, seed)
    out = d / f"{name}.qcow2"
    args = ["convert", "-q", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if options:
        args += ["-o", ",".join(options)]
    qemu_img(*args, src, out)
    src.unlink()
    return out


def _v3_zero_clusters(d: Path) -> Path:
    p = create(d / "v3_zero_clusters.qcow2", "4M", "compat=1.1")
    qemu_io(p, "write -P 0x11 0 192k", "write -z 64k 64k", "write -z 1M 128k",
            "write -P 0x22 1536k 4k", "discard 128k 64k", "write -P 0x33 3000k 100k",
            "write -P 0x34 4095k 1k")
    return p


def _v2_written(d: Path) -> Path:
    p = create(d / "v2_written.qcow2", "3M", "compat=0.10")
    qemu_io(p, "write -P 0x11 0 100k", "write -z 512k 64k", "write -P 0x12 1000k 3k")
    return p


def _size_unaligned(d: Path) -> Path:
    p = create(d / "size_unaligned.qcow2", 1000448)
    qemu_io(p, "write -P 0x5a 999424 1024", "write -P 0x5b 0 512")
    return p


def _qemu_io_compressed(d: Path) -> Path:
    p = create(d / "qemu_io_compressed.qcow2", "1M")
    qemu_io(p, "write -c -P 0x41 0 64k", "write -c -P 0x42 64k 64k",
            "write -c -P 0x43 512k 64k")
    return p


def _over_raw(d: Path) -> Path:
    base = base_raw(d / "over_raw_base.raw")
    p = create(d / "over_raw.qcow2", "4M", backing=base)
    qemu_io(p, "write -P 0x44 64k 64k", "write -z 192k 64k", "write -P 0x45 1100k 10k",
            "write -P 0x46 2000k 100k")
    return p


def _over_qcow2(d: Path) -> Path:
    base = base_raw(d / "chain_base.raw")
    mid = create(d / "chain_mid.qcow2", "4M", backing=base)
    qemu_io(mid, "write -P 0x44 64k 64k", "write -z 192k 64k")
    top = create(d / "over_qcow2.qcow2", "4M", backing=mid, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x55 256k 64k", "write -z 64k 4k")
    return top


def _over_compressed(d: Path) -> Path:
    low = converted(d, "chain_zlib", compress=True, size=3 * MiB + 4096, seed=7)
    top = create(d / "over_compressed.qcow2", "4M", backing=low, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x66 1M 64k")
    return top


def _extl2(d: Path) -> Path:
    base = base_raw(d / "extl2_base.raw")
    p = create(d / "extl2.qcow2", "3M", "extended_l2=on", backing=base)
    qemu_io(p, "write -P 0x11 4k 4k", "write -z 16k 4k", "write -P 0x12 64k 64k",
            "discard 72k 8k", "write -P 0x13 128k 8k", "write -z 128k 2k",
            "write -P 0x14 2040k 16k", "write -P 0x15 192k 64k", "discard 192k 64k",
            "write -z 320k 64k", "write -P 0x16 2500k 3k")
    return p


def _extl2_16k(d: Path) -> Path:
    p = create(d / "extl2_16k.qcow2", "1M", "extended_l2=on", "cluster_size=16k")
    qemu_io(p, "write -P 0x21 0 512", "write -z 1k 512", "write -P 0x22 8k 1k",
            "write -P 0x23 33k 20k", "discard 48k 16k", "write -P 0x24 1040384 8k")
    return p


IMAGES: dict[str, Callable[[Path], Path]] = {
    "v2_64k": lambda d: converted(d, "v2_64k", "compat=0.10"),
    "v3_64k": lambda d: converted(d, "v3_64k", "compat=1.1"),
    "c512": lambda d: converted(d, "c512", "cluster_size=512", size=1536 * KiB),
    "c4k": lambda d: converted(d, "c4k", "cluster_size=4k"),
    "c2m": lambda d: converted(d, "c2m", "cluster_size=2M"),
    "v2_written": _v2_written,
    "v3_zero_clusters": _v3_zero_clusters,
    "size_unaligned": _size_unaligned,
    "zlib": lambda d: converted(d, "zlib", compress=True),
    "zlib_v2": lambda d: converted(d, "zlib_v2", "compat=0.10", compress=True),
    "zlib_c512": lambda d: converted(d, "zlib_c512", "cluster_size=512", compress=True,
                                     size=1536 * KiB),
    "zlib_c4k": lambda d: converted(d, "zlib_c4k", "cluster_size=4k", compress=True),
    "zlib_c2m": lambda d: converted(d, "zlib_c2m", "cluster_size=2M", compress=True),
    "zstd": lambda d: converted(d, "zstd", "compression_type=zstd", compress=True),
    "zstd_c4k": lambda d: converted(d, "zstd_c4k", "compression_type=zstd", "cluster_size=4k",
                                    compress=True),
    "zstd_c2m": lambda d: converted(d, "zstd_c2m", "compression_type=zstd",
                                    "cluster_size=2M", compress=True),
    "qemu_io_compressed": _qemu_io_compressed,
    "extl2_zlib": lambda d: converted(d, "extl2_zlib", "extended_l2=on", compress=True),
    "extl2_converted": lambda d: converted(d, "extl2_converted", "extended_l2=on"),
    "extl2": _extl2,
    "extl2_16k": _extl2_16k,
    "over_raw": _over_raw,
    "over_qcow2": _over_qcow2,
    "over_compressed": _over_compressed,
}
