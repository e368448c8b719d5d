"""Helpers for the qcow2 tests: QEMU as referee, a chain opener, map comparison.

``open_qcow2`` opens a qcow2 file the way the chain opener will: the backing
name is a file name taken literally (never ``json:``, never a protocol),
relative names start at the qcow2's directory, raw backings become
:class:`RawFile` and qcow2 backings open recursively, all under one
:class:`ChainGuard`.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

from conftest import require_tool, run

from addcow.backing import BlockSource, Extent, RawFile
from addcow.names import ChainGuard, resolve_name
from addcow.qcow2 import Qcow2File


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


def convert_raw(path: Path) -> bytes:
    """The guest disk as QEMU reads it (qemu-img convert -O raw)."""
    out = path.with_suffix(".referee.raw")
    qemu_img("convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


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
