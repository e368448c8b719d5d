"""Qcow2File against QEMU: every image variant qemu-img and qemu-io make.

For each image the whole guest disk read through :class:`Qcow2File` must
equal ``qemu-img convert -O raw`` byte for byte, random unaligned reads must
equal the same bytes, and ``block_status_at`` must agree with ``qemu-img map
--output=json`` on which ranges come from which depth and which are
zero/data/present (and, for data, at which host offset).

Allocation diagrams of the hand-written images (64 KiB clusters unless said;
``base`` is a raw file, ``.`` unallocated, ``Z`` zero, ``D`` data)::

    v3_zero_clusters   D Z D . . . Z Z D(4k) . D(100k, unaligned) ...
    over_raw           base 2 MiB (pattern, a hole at 1 MiB) under a 4 MiB qcow2:
                       D at 64k, Z at 192k over base data, past 2 MiB nothing
    over_qcow2         base.raw <- mid.qcow2 (D 64k, Z 192k) <- top.qcow2 (D 256k)
    extl2              base.raw (2 MiB) <- 3 MiB, 2 KiB subclusters: 4k written,
                       4k zero, 64k full, 8k discarded, 2k zero + 6k data,
                       16k across the backing's end, a whole cluster discarded
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_tool, run
from qcow2_util import (
    assert_map_matches,
    convert_raw,
    create,
    open_qcow2,
    qemu_img,
    qemu_io,
    qemu_map,
    read_all,
)

from addcow.backing import Extent, RawFile
from addcow.errors import (
    BackingError,
    BackingLoopError,
    LockError,
    Qcow2UnsupportedError,
)
from addcow.names import ChainGuard
from addcow.qcow2 import Qcow2File
from addcow.qcow2 import store as qstore

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


COMPRESSED = {n for n in IMAGES if "zlib" in n or "zstd" in n or "compressed" in n}
ZERO_CLUSTERS = {"v3_zero_clusters", "extl2", "extl2_16k", "over_raw", "over_qcow2"}
SUBCLUSTERS = {"extl2", "extl2_16k", "extl2_converted"}


def check_variant(name: str, store: Qcow2File, extents: list[Extent]) -> None:
    """The image really holds what its variant is about (so the comparison means something)."""
    assert any(not e.present for e in extents) or name in ("c512",), "an unallocated range"
    if name in COMPRESSED:
        assert any(e.data and e.host_offset is None for e in extents), "a compressed cluster"
    if name in ZERO_CLUSTERS:
        assert any(e.present and e.zero and e.host_offset is None for e in extents)
    if name in SUBCLUSTERS:
        assert store.header.extended_l2
        assert any(e.length % store.header.cluster_size for e in extents)
    if name.startswith("over_"):
        assert {e.depth for e in extents if e.present} >= {0, 1}


class Referee:
    """What QEMU says about one image: its guest bytes (convert -O raw)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = convert_raw(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Referee]:
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("qcow2")
    return {name: Referee(build(d)) for name, build in IMAGES.items()}


@pytest.mark.parametrize("name", IMAGES)
def test_whole_disk_equals_qemu_convert(images: dict[str, Referee], name: str) -> None:
    ref = images[name]
    with_store = open_qcow2(ref.path)
    try:
        assert with_store.size == len(ref.raw)
        assert read_all(with_store) == ref.raw
    finally:
        with_store.close()


@pytest.mark.parametrize("name", IMAGES)
def test_random_unaligned_reads_equal_qemu(images: dict[str, Referee], name: str) -> None:
    ref = images[name]
    store = open_qcow2(ref.path)
    rng = random.Random(name)
    size = store.size
    try:
        for _ in range(60):
            offset = rng.randrange(0, size + 4096)
            length = rng.choice([1, 511, 513, 4095, 70000, 300000, 2 * MiB + 3])
            buf = bytearray(length)
            assert store.readinto(memoryview(buf), offset) == length
            want = ref.raw[offset : offset + length]
            want += bytes(length - len(want))  # zeros past the end, like RawFile
            assert bytes(buf) == want, (offset, length)
    finally:
        store.close()


@pytest.mark.parametrize("name", IMAGES)
def test_block_status_agrees_with_qemu_map(images: dict[str, Referee], name: str) -> None:
    ref = images[name]
    store = open_qcow2(ref.path)
    try:
        extents = assert_map_matches(store, ref.path)
        check_variant(name, store, extents)
        # the map is also right about content: zero ranges read as zeros
        for e in extents:
            if e.zero:
                assert ref.raw[e.offset : e.offset + e.length].count(0) == e.length
    finally:
        store.close()


@pytest.mark.parametrize("name", ["zlib", "extl2", "over_qcow2", "c512", "size_unaligned"])
def test_block_status_of_a_subrange_is_the_whole_map_clipped(
    images: dict[str, Referee], name: str
) -> None:
    store = open_qcow2(images[name].path)
    try:
        whole = list(store.block_status_at(0, store.size, 0))
        rng = random.Random(name)
        for _ in range(30):
            offset = rng.randrange(0, store.size)
            length = rng.randrange(1, store.size - offset + 8192)
            depth = rng.randrange(0, 3)
            part = list(store.block_status_at(offset, length, depth))
            assert part[0].offset == offset
            assert sum(e.length for e in part) == length
            for e in part:
                for pos in {e.offset, e.offset + e.length - 1}:
                    if pos >= store.size:
                        assert (e.present, e.zero, e.depth) == (False, True, depth)
                        continue
                    w = next(x for x in whole if x.offset <= pos < x.offset + x.length)
                    assert (e.depth - depth, e.present, e.zero) == (w.depth, w.present, w.zero)
                    if e.host_offset is not None:
                        assert w.host_offset is not None
                        assert e.host_offset - e.offset == w.host_offset - w.offset
    finally:
        store.close()


def test_block_status_past_the_end_is_absent_at_this_depth(images: dict[str, Referee]) -> None:
    store = open_qcow2(images["over_raw"].path)
    try:
        assert list(store.block_status_at(store.size, 4096, 2)) == [
            Extent(store.size, 4096, 2, False, True, None)
        ]
        assert store.readinto(memoryview(bytearray(0)), store.size) == 0
    finally:
        store.close()


def test_zero_cluster_does_not_fall_through_to_the_backing(images: dict[str, Referee]) -> None:
    """over_raw: 192k is a zero cluster over backing data 0x63."""
    ref = images["over_raw"]
    assert (ref.path.parent / "over_raw_base.raw").read_bytes()[192 * KiB] == 0x63
    store = open_qcow2(ref.path)
    try:
        buf = bytearray(64 * KiB)
        store.readinto(memoryview(buf), 192 * KiB)
        assert buf == bytes(64 * KiB)
        ext = list(store.block_status_at(192 * KiB, 64 * KiB, 0))
        assert ext == [Extent(192 * KiB, 64 * KiB, 0, True, True, None)]
    finally:
        store.close()


def test_header_fields_match_qemu_img_info(images: dict[str, Referee]) -> None:
    import json

    for name in ("v2_64k", "zstd_c4k", "extl2", "over_qcow2"):
        path = images[name].path
        info = json.loads(qemu_img("info", "--output=json", path))
        store = open_qcow2(path)
        try:
            h = store.header
            assert h.cluster_size == info["cluster-size"]
            assert store.size == info["virtual-size"]
            data = info["format-specific"]["data"]
            assert h.version == (2 if data["compat"] == "0.10" else 3)
            assert h.compression == data.get("compression-type", "zlib")
            assert h.extended_l2 == data.get("extended-l2", False)
            assert store.backing_name == (
                info["backing-filename"].encode() if "backing-filename" in info else None
            )
            assert store.backing_format == info.get("backing-filename-format")
        finally:
            store.close()


def test_size_not_a_multiple_of_512_is_cut_to_whole_sectors(tmp_path: Path) -> None:
    """QEMU opens the disk as size // 512 sectors; so does addcow."""
    from qcow2_util import patch

    p = create(tmp_path / "odd.qcow2", "1M")
    qemu_io(p, "write -P 0x31 1047552 1024")
    patch(p, 24, "Q", MiB - 1)
    store = open_qcow2(p)
    try:
        assert store.size == MiB - 512 == len(convert_raw(p))
        assert read_all(store) == convert_raw(p)
    finally:
        store.close()


def test_backing_names_are_file_names_never_json_or_protocols(tmp_path: Path) -> None:
    """A name like json:{...} or nbd://... is a (missing) file in the qcow2's directory."""
    for name in ('json:{"file.driver":"file","file.filename":"/etc/passwd"}',
                 "nbd://localhost/x"):
        p = create(tmp_path / "named.qcow2", "1M")
        qemu_img("rebase", "-u", "-b", name, "-F", "raw", p)
        with pytest.raises(BackingError) as info:
            open_qcow2(p)
        assert f"{tmp_path}/{name}: cannot open backing file" in str(info.value)
        p.unlink()


def test_chain_file_ids_and_close(images: dict[str, Referee]) -> None:
    d = images["over_qcow2"].path.parent
    store = open_qcow2(images["over_qcow2"].path)
    mid = store.backing
    assert isinstance(mid, Qcow2File)
    base = mid.backing
    assert isinstance(base, RawFile)
    ids = {(os.stat(p).st_dev, os.stat(p).st_ino)
           for p in (d / "over_qcow2.qcow2", d / "chain_mid.qcow2", d / "chain_base.raw")}
    assert store.file_ids() == ids
    store.close()
    assert (store.fd, mid.fd, base.fd) == (-1, -1, -1)
    store.close()  # closing twice is harmless


def test_backing_name_without_an_opener_is_refused(images: dict[str, Referee]) -> None:
    with pytest.raises(BackingError, match=r"names backing file 'over_raw_base\.raw'"):
        Qcow2File(str(images["over_raw"].path), guard=ChainGuard(), force_share=False,
                  open_backing=None)


def test_a_qcow2_that_is_its_own_backing_is_a_loop(tmp_path: Path) -> None:
    p = create(tmp_path / "self.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", p)
    with pytest.raises(BackingLoopError, match="already used"):
        open_qcow2(p)


def test_a_qcow2_chain_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    prev = create(tmp_path / "l0.qcow2", "1M")
    for i in range(1, 18):
        prev = create(tmp_path / f"l{i}.qcow2", "1M", backing=prev, backing_fmt="qcow2")
    with pytest.raises(BackingLoopError, match="deeper than 16"):
        open_qcow2(prev)


def test_qemu_cannot_write_a_qcow2_addcow_reads(tmp_path: Path) -> None:
    p = create(tmp_path / "locked.qcow2", "1M")
    store = open_qcow2(p)
    try:
        proc = run([require_tool("qemu-io"), "-c", "write 0 512", str(p)], check=False)
        assert proc.returncode != 0
        assert "lock" in proc.stderr
    finally:
        store.close()
    qemu_io(p, "write 0 512")  # free again once closed


def test_addcow_refuses_a_qcow2_qemu_is_writing(tmp_path: Path) -> None:
    import subprocess

    p = create(tmp_path / "busy.qcow2", "1M")
    proc = subprocess.Popen([require_tool("qemu-io"), str(p)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                open_qcow2(p).close()
            except LockError as exc:
                assert "busy.qcow2" in str(exc)
                break
            assert time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.05)
        open_qcow2(p, force_share=True).close()  # -U: no locks taken
    finally:
        proc.communicate(b"quit\n", timeout=30)


def test_zstd_image_without_the_zstandard_package(
    images: dict[str, Referee], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
    with pytest.raises(Qcow2UnsupportedError) as info:
        open_qcow2(images["zstd"].path)
    assert "this qcow2 image uses zstd compression: pip install zstandard (or addcow[zstd])" in (
        str(info.value)
    )
    open_qcow2(images["zlib"].path).close()  # zlib needs nothing


def test_concurrent_readers_with_tiny_caches(
    images: dict[str, Referee], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads reading at once through caches of two tables / two clusters."""
    monkeypatch.setattr(qstore, "L2_CACHE_BYTES", 1)
    monkeypatch.setattr(qstore, "CLUSTER_CACHE_BYTES", 1)
    for name in ("zlib_c4k", "zstd", "extl2", "c512"):
        ref = images[name]
        store = open_qcow2(ref.path)
        errors: list[BaseException] = []

        def reader(seed: int, store: Qcow2File = store, ref: Referee = ref,
                   errors: list[BaseException] = errors) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(40):
                    off = rng.randrange(store.size)
                    n = rng.randrange(1, 200000)
                    buf = bytearray(n)
                    store.readinto(memoryview(buf), off)
                    want = ref.raw[off : off + n]
                    assert bytes(buf) == want + bytes(n - len(want))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert not errors, errors
            assert len(store._l2_cache) <= 1
            assert len(store._clusters) <= 2
        finally:
            store.close()


def test_normal_runs_are_one_preadv_each(
    images: dict[str, Referee], monkeypatch: pytest.MonkeyPatch
) -> None:
    """v3_64k: a 1 MiB read of contiguous clusters is one preadv into the caller's buffer."""
    store = open_qcow2(images["v3_64k"].path)
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fd == store.fd:
            calls.append(len(buffers[0]))
        return real(fd, buffers, offset)

    try:
        runs = [e for e in store.block_status_at(0, store.size, 0) if e.data]
        run = max(runs, key=lambda e: e.length)
        assert run.length >= 256 * KiB
        monkeypatch.setattr(os, "preadv", counting)
        buf = bytearray(run.length - 1000)
        store.readinto(memoryview(buf), run.offset + 1000)
        assert calls == [run.length - 1000]
        assert bytes(buf) == images["v3_64k"].raw[run.offset + 1000 : run.offset + run.length]
    finally:
        store.close()


def test_terabyte_sparse_image_opens_fast_in_bounded_memory(tmp_path: Path) -> None:
    p = create(tmp_path / "huge.qcow2", "1T")
    qemu_io(p, "write -P 0x77 0 64k", "write -P 0x78 512G 4k", "write -P 0x79 1099511562240 64k")
    tracemalloc.start()
    start = time.monotonic()
    try:
        store = open_qcow2(p)
        extents = list(store.block_status_at(0, store.size, 0))
        buf = bytearray(64 * KiB)
        store.readinto(memoryview(buf), store.size - 64 * KiB)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert elapsed < 1.0
        assert peak < 100 * MiB
        assert buf == b"\x79" * (64 * KiB)
        assert [e for e in extents if e.data] == [
            e for e in assert_map_matches(store, p) if e.data
        ]
        assert len(qemu_map(p)) == len(extents)
    finally:
        store.close()
