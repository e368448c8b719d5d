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
import zlib
from pathlib import Path

import pytest
from conftest import require_tool, run
from qcow2_util import (
    IMAGES,
    KiB,
    MiB,
    assert_map_matches,
    convert_raw,
    create,
    open_qcow2,
    qemu_img,
    qemu_io,
    qemu_map,
    read_all,
)

from addcow.errors import BackingError, BackingLoopError, LockError, Qcow2UnsupportedError
from addcow.stores import Extent
from addcow.stores.chain import ChainGuard
from addcow.stores.qcow2 import Qcow2File
from addcow.stores.qcow2 import store as qstore
from addcow.stores.raw import RawFile

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
    assert (
        "this qcow2 image uses zstd compression; to read it, install the 'zstd' "
        "extra: pip install 'addcow[zstd]' (from a checkout: pip install '.[zstd]')"
    ) in str(info.value)
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


def test_a_compressed_cluster_is_inflated_as_far_as_reads_need(
    images: dict[str, Referee], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first read inflates up to its last byte; a read further in inflates the
    whole cluster; the bytes are qemu's either way."""
    ref = images["zlib"]
    # qemu-img map gives no host offset for compressed data.
    cluster = next(e for e in qemu_map(ref.path) if e["data"] and "offset" not in e)
    start = cluster["start"]
    wanted: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self.inner = real(wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            wanted.append(max_length)
            return self.inner.decompress(data, max_length)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    store = open_qcow2(ref.path)
    try:
        for offset, length in [(1000, 3000), (0, 4000), (60 * KiB, 4 * KiB), (8, 8)]:
            buf = bytearray(length)
            store.readinto(memoryview(buf), start + offset)
            assert bytes(buf) == ref.raw[start + offset : start + offset + length]
    finally:
        store.close()
    assert wanted == [4000, 64 * KiB]


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


def test_terabyte_sparse_image_opens_in_bounded_memory(tmp_path: Path) -> None:
    """Memory and content only: the time of open and map is measured by
    benchmarks/bench_image.py (case 7), never by a timed unit test."""
    p = create(tmp_path / "huge.qcow2", "1T")
    qemu_io(p, "write -P 0x77 0 64k", "write -P 0x78 512G 4k", "write -P 0x79 1099511562240 64k")
    tracemalloc.start()
    try:
        store = open_qcow2(p)
        extents = list(store.block_status_at(0, store.size, 0))
        buf = bytearray(64 * KiB)
        store.readinto(memoryview(buf), store.size - 64 * KiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert peak < 100 * MiB
        assert buf == b"\x79" * (64 * KiB)
        assert [e for e in extents if e.data] == [
            e for e in assert_map_matches(store, p) if e.data
        ]
        assert len(qemu_map(p)) == len(extents)
    finally:
        store.close()
