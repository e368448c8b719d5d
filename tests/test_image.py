"""The library's API: create, open, chains, loops, errors, locks, durability.

Most scenarios use the ``base_raw`` fixture (tests/conftest.py)::

    cluster (64 KiB):  0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15
    base.raw byte:    10  11  12  13  14  15  16  17  --hole--------  1c  1d  1e  1f
"""

from __future__ import annotations

import array
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern, require_tool, run

import addcow
from addcow import (
    MAX_CHAIN_DEPTH,
    AddCowError,
    AddCowIOError,
    BackingFormatError,
    BackingLoopError,
    ClosedImageError,
    Header,
    ImageFileError,
    LockError,
    RangeError,
    ReadOnlyError,
)

MiB = 1 << 20


def base_byte(cluster: int) -> int:
    """What base_raw holds in ``cluster`` (0 in its holes)."""
    return 0 if 8 <= cluster < 12 else 0x10 + cluster


def base_bytes(size: int = 16 * CLUSTER) -> bytes:
    out = b"".join(pattern(base_byte(c), CLUSTER) for c in range(16))
    return out[:size].ljust(size, b"\0")


@pytest.fixture
def img_path(tmp_path: Path, base_raw: Path) -> Path:
    """A fresh version 2 add-cow image over base.raw (defaults: size and cluster size)."""
    path = tmp_path / "disk.add-cow"
    addcow.create(path, image_file="disk.raw", backing_file="base.raw")
    return path


def extents(img: addcow.AddCowImage, offset: int = 0, length: int | None = None) -> list[tuple]:
    """block_status as (start, length, depth, present, zero), adjacent equal entries merged."""
    out: list[list[int | bool]] = []
    for e in img.block_status(offset, length):
        if out and out[-1][2:] == [e.depth, e.present, e.zero] and (
            out[-1][0] + out[-1][1] == e.offset  # type: ignore[operator]
        ):
            out[-1][1] += e.length  # type: ignore[operator]
        else:
            out.append([e.offset, e.length, e.depth, e.present, e.zero])
    return [tuple(x) for x in out]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def on_disk_bits(path: Path) -> int:
    raw = path.read_bytes()
    header = Header.unpack(raw)
    return int.from_bytes(raw[header.header_size :], "little")


def write_header(path: Path, header: Header, image_size: int) -> None:
    """Write a hand-made .add-cow file (header + all-zero bitmap)."""
    clusters = -(-image_size // header.cluster_size)
    path.write_bytes(header.pack() + bytes((clusters + 7) // 8))


# == create =========================================================================


def test_create_defaults_size_and_cluster_size_from_backing(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        assert img.size == 16 * CLUSTER
        assert img.cluster_size == 65536
        assert img.total_clusters == 16
        assert img.allocated_clusters == 0
        assert img.header.version == 2
        assert img.header.backing_format == "raw"
        assert img.read(0, img.size) == base_bytes()


def test_create_makes_a_sparse_image_file(img_path: Path) -> None:
    raw = img_path.parent / "disk.raw"
    assert raw.stat().st_size == 16 * CLUSTER
    assert raw.stat().st_blocks == 0
    assert img_path.stat().st_size == 4096 + 2
    header = Header.unpack(img_path.read_bytes())
    assert (header.image_name, header.backing_name) == (b"disk.raw", b"base.raw")


def test_create_extends_an_empty_image_file_sparse(tmp_path: Path, base_raw: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(100_000)  # exists, holds no data
    addcow.create(tmp_path / "disk.add-cow", image_file=raw, backing_file=base_raw)
    st = raw.stat()
    assert st.st_size == 16 * CLUSTER
    assert st.st_blocks == 0, "the extension is sparse"


def test_old_bytes_under_clear_bits_are_never_read(tmp_path: Path, base_raw: Path) -> None:
    """Bytes in the image file under a clear bit (left by a crash between data and
    bit, or written behind addcow's back) are ignored until the cluster is written."""
    raw = tmp_path / "disk.raw"
    addcow.create(tmp_path / "disk.add-cow", image_file=raw, backing_file=base_raw)
    with open(raw, "r+b") as f:
        f.write(pattern(0xAB, 100_000))
    with addcow.open(tmp_path / "disk.add-cow") as img:
        assert img.read(0, 100_000) == base_bytes()[:100_000]
        img.write(b"new", 10)
        assert img.read(0, 20) == base_bytes()[:10] + b"new" + base_bytes()[13:20]
    # Copy on write filled the rest of cluster 0 from the backing, not the old bytes.
    assert raw.read_bytes()[:CLUSTER] == base_bytes()[:10] + b"new" + base_bytes()[13:CLUSTER]


def test_create_without_backing_needs_a_size_or_an_existing_image_file(tmp_path: Path) -> None:
    with pytest.raises(AddCowError, match="a size is needed"):
        addcow.create(tmp_path / "a.add-cow", image_file="a.raw")
    with open(tmp_path / "b.raw", "wb") as f:
        f.truncate(5000)
    addcow.create(tmp_path / "b.add-cow", image_file="b.raw")
    with addcow.open(tmp_path / "b.add-cow") as img:
        assert img.size == 5000
        assert img.read(0, 5000) == bytes(5000), "no backing: unallocated reads as zero"
    (tmp_path / "c.raw").write_bytes(b"x" * 5000)
    addcow.create(tmp_path / "c.add-cow", image_file="c.raw", image_file_raw=True)
    with addcow.open(tmp_path / "c.add-cow") as img:
        assert img.size == 5000
        assert img.read(0, 5000) == b"x" * 5000, "its data is the disk's content"


def test_raw_image_larger_than_backing_reads_zeros_past_its_end(
    tmp_path: Path, base_raw: Path
) -> None:
    path = tmp_path / "big.add-cow"
    addcow.create(path, image_file="big.raw", backing_file="base.raw", size=20 * CLUSTER)
    with addcow.open(path) as img:
        assert img.size == 20 * CLUSTER
        assert img.read(15 * CLUSTER, 5 * CLUSTER) == pattern(0x1F, CLUSTER) + bytes(4 * CLUSTER)
        assert extents(img, 14 * CLUSTER) == [
            (14 * CLUSTER, 2 * CLUSTER, 1, True, False),
            # Past the backing's end the top layer decides "zero", as qemu-img map says.
            (16 * CLUSTER, 4 * CLUSTER, 0, False, True),
        ]
        # A partial write past the backing's end: copy on write fills zeros.
        img.write(b"tail", 17 * CLUSTER + 100)
        assert img.read(17 * CLUSTER, CLUSTER) == bytes(100) + b"tail" + bytes(CLUSTER - 104)


def test_raw_image_smaller_than_backing_ignores_the_backing_tail(
    tmp_path: Path, base_raw: Path
) -> None:
    path = tmp_path / "small.add-cow"
    addcow.create(path, image_file="small.raw", backing_file="base.raw", size=3 * CLUSTER + 5)
    with addcow.open(path) as img:
        assert img.size == 3 * CLUSTER + 5
        assert img.total_clusters == 4
        assert img.read(0, img.size) == base_bytes(3 * CLUSTER + 5)
        img.write(b"!", 3 * CLUSTER + 4)  # the last byte of a partial last cluster
        assert img.read(3 * CLUSTER, 5) == pattern(0x13, 4) + b"!"
        with pytest.raises(RangeError):
            img.read(3 * CLUSTER + 5, 1)
    assert (tmp_path / "small.raw").stat().st_size == 3 * CLUSTER + 5


def test_v1_image_size_is_its_image_file_size(tmp_path: Path, base_raw: Path) -> None:
    raw = tmp_path / "v1.raw"
    with open(raw, "wb") as f:
        f.truncate(20 * CLUSTER)
    addcow.create(tmp_path / "v1.add-cow", image_file="v1.raw", backing_file="base.raw", version=1)
    header = Header.unpack((tmp_path / "v1.add-cow").read_bytes())
    assert (header.version, header.backing_format, header.image_size) == (1, "raw", None)
    with addcow.open(tmp_path / "v1.add-cow") as img:
        assert img.size == 20 * CLUSTER
        assert img.read(16 * CLUSTER - 1, 2) == b"\x1f\x00"


def test_create_v1_refuses_other_cluster_sizes_and_add_cow_backing(
    tmp_path: Path, img_path: Path
) -> None:
    with pytest.raises(AddCowError, match="65536 for a version 1 image"):
        addcow.create(tmp_path / "x.add-cow", image_file="x.raw", size=MiB, version=1,
                      cluster_size=4096)
    with pytest.raises(BackingFormatError, match="version 1 image can only record a raw"):
        addcow.create(tmp_path / "y.add-cow", image_file="y.raw", backing_file=img_path,
                      backing_format="add-cow", version=1)


# == relative names ================================================================


def test_relative_names_are_resolved_against_the_add_cow_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tmp/a/base.raw is the real backing; tmp/b/base.raw and tmp/b/c/disk.raw are decoys
    # that a resolution against the current directory (tmp/b/c) would pick up.
    (tmp_path / "a" / "vm").mkdir(parents=True)
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "base.raw").write_bytes(pattern(0x61, 2 * CLUSTER))
    (tmp_path / "b" / "base.raw").write_bytes(pattern(0xEE, 2 * CLUSTER))
    (tmp_path / "b" / "c" / "disk.raw").write_bytes(pattern(0xDD, 2 * CLUSTER))

    monkeypatch.chdir(tmp_path / "a")
    addcow.create("vm/disk.add-cow", image_file="disk.raw", backing_file="../base.raw")
    vm = tmp_path / "a" / "vm"
    assert (vm / "disk.raw").exists()
    assert not (tmp_path / "a" / "disk.raw").exists()
    header = Header.unpack((vm / "disk.add-cow").read_bytes())
    assert (header.image_name, header.backing_name) == (b"disk.raw", b"../base.raw")

    monkeypatch.chdir(tmp_path / "b" / "c")
    for path in (str(vm / "disk.add-cow"), "../../a/vm/disk.add-cow"):
        with addcow.open(path) as img:
            assert img.image_path == os.path.join(os.path.dirname(path), "disk.raw")
            assert img.read(1, 2 * CLUSTER - 1) == pattern(0x61, 2 * CLUSTER - 1)
            img.write(b"w", 0)
    assert (vm / "disk.raw").read_bytes()[:2] == b"wa"
    assert (tmp_path / "b" / "c" / "disk.raw").read_bytes() == pattern(0xDD, 2 * CLUSTER)

    # The same from a separate process started in the decoy directory.
    proc = run(
        [sys.executable, "-c",
         "import addcow, sys\n"
         "with addcow.open(sys.argv[1], readonly=True) as img:\n"
         "    sys.stdout.write(img.read(0, 3).hex())\n",
         "../../a/vm/disk.add-cow"],
        cwd=tmp_path / "b" / "c",
    )
    assert proc.stdout == "776161"


# == backing chains ================================================================


@pytest.fixture
def chain(tmp_path: Path, base_raw: Path) -> Path:
    """top.add-cow -> mid.add-cow -> base.raw, laid out as::

        cluster:   0    1    2    3    4 ... 7   8-11   12-15
        top        .    .    T    .    .         T .    .
        mid        .    M    M    .    .         .      .
        base      10   11   12   13   14 ... 17  hole   1c-1f
        reads     10    M    T   13   14 ... 17  T 0    1c-1f
        depth      2    1    0    2    2         0 2    2
    """
    addcow.create(tmp_path / "mid.add-cow", image_file="mid.raw", backing_file="base.raw")
    with addcow.open(tmp_path / "mid.add-cow") as mid:
        mid.write(pattern(0x4D, 2 * CLUSTER), CLUSTER)
    addcow.create(
        tmp_path / "top.add-cow", image_file="top.raw", backing_file="mid.add-cow",
        backing_format="add-cow",
    )
    with addcow.open(tmp_path / "top.add-cow") as top:
        top.write(pattern(0x54, CLUSTER), 2 * CLUSTER)
        top.write(pattern(0x54, 100), 8 * CLUSTER)
    return tmp_path / "top.add-cow"


def test_chain_reads_go_down_the_chain(chain: Path) -> None:
    with addcow.open(chain) as top:
        assert top.read(0, CLUSTER) == pattern(0x10, CLUSTER)
        assert top.read(CLUSTER, CLUSTER) == pattern(0x4D, CLUSTER)
        assert top.read(2 * CLUSTER, CLUSTER) == pattern(0x54, CLUSTER)
        assert top.read(3 * CLUSTER, 5 * CLUSTER) == base_bytes()[3 * CLUSTER : 8 * CLUSTER]
        assert top.read(8 * CLUSTER, CLUSTER) == pattern(0x54, 100) + bytes(CLUSTER - 100)
        assert top.read(12 * CLUSTER, 4 * CLUSTER) == base_bytes()[12 * CLUSTER :]
        # One read across every layer at once.
        assert top.read(CLUSTER - 1, CLUSTER + 2) == b"\x10" + pattern(0x4D, CLUSTER) + b"\x54"


def test_chain_block_status_depths(chain: Path) -> None:
    with addcow.open(chain) as top:
        assert extents(top) == [
            (0, CLUSTER, 2, True, False),
            (CLUSTER, CLUSTER, 1, True, False),
            (2 * CLUSTER, CLUSTER, 0, True, False),
            (3 * CLUSTER, 5 * CLUSTER, 2, True, False),
            (8 * CLUSTER, CLUSTER, 0, True, False),
            (9 * CLUSTER, 3 * CLUSTER, 2, True, True),  # the backing's hole
            (12 * CLUSTER, 4 * CLUSTER, 2, True, False),
        ]


def test_chain_write_copies_from_the_middle_layer(chain: Path) -> None:
    with addcow.open(chain) as top:
        top.write(b"x", CLUSTER + 10)
        assert top.read(CLUSTER, 20) == pattern(0x4D, 10) + b"x" + pattern(0x4D, 9)
        assert extents(top, CLUSTER, CLUSTER) == [(CLUSTER, CLUSTER, 0, True, False)]


def test_chain_of_max_depth_opens_and_one_more_is_refused(tmp_path: Path, base_raw: Path) -> None:
    below, fmt = "base.raw", "raw"
    for level in range(1, MAX_CHAIN_DEPTH + 1):
        addcow.create(tmp_path / f"l{level}.add-cow", image_file=f"l{level}.raw",
                      backing_file=below, backing_format=fmt)
        below, fmt = f"l{level}.add-cow", "add-cow"
    deepest = tmp_path / f"l{MAX_CHAIN_DEPTH}.add-cow"
    with addcow.open(deepest) as img:
        assert img.read(0, 1) == b"\x10"
        assert {e.depth for e in img.block_status()} == {MAX_CHAIN_DEPTH}

    with pytest.raises(BackingLoopError) as info:
        addcow.create(tmp_path / "too-deep.add-cow", image_file="too-deep.raw",
                      backing_file=deepest, backing_format="add-cow")
    assert f"deeper than {MAX_CHAIN_DEPTH} levels" in str(info.value)

    # A hand-made image one level deeper than allowed.
    over = tmp_path / "over.add-cow"
    with open(tmp_path / "over.raw", "wb") as f:
        f.truncate(16 * CLUSTER)
    write_header(over, Header(version=2, image_name=b"over.raw", backing_name=deepest.name.encode(),
                              backing_format="add-cow", image_size=16 * CLUSTER), 16 * CLUSTER)
    with pytest.raises(BackingLoopError) as info:
        addcow.open(over)
    assert f"backing chain deeper than {MAX_CHAIN_DEPTH} levels" in str(info.value)
    assert str(tmp_path / "base.raw") in str(info.value)


# == loops =========================================================================


def test_create_refuses_image_file_equal_to_backing(tmp_path: Path, base_raw: Path) -> None:
    with pytest.raises(ImageFileError) as info:
        addcow.create(tmp_path / "x.add-cow", image_file="base.raw", backing_file="base.raw")
    assert "part of the backing chain" in str(info.value)
    os.link(base_raw, tmp_path / "hardlink.raw")
    with pytest.raises(ImageFileError, match="part of the backing chain"):
        addcow.create(tmp_path / "x.add-cow", image_file="hardlink.raw", backing_file="base.raw")
    assert not (tmp_path / "x.add-cow").exists()


def test_create_refuses_the_add_cow_file_as_its_own_image_file(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match=r"cannot be the \.add-cow file itself"):
        addcow.create(tmp_path / "x.add-cow", image_file="x.add-cow", size=MiB)


def test_open_refuses_image_file_equal_to_backing(tmp_path: Path, base_raw: Path) -> None:
    path = tmp_path / "loop.add-cow"
    write_header(path, Header(version=2, image_name=b"base.raw", backing_name=b"base.raw",
                              backing_format="raw", image_size=16 * CLUSTER), 16 * CLUSTER)
    with pytest.raises(BackingLoopError) as info:
        addcow.open(path)
    message = str(info.value)
    assert str(tmp_path / "base.raw") in message
    assert "already used as" in message and "must not loop" in message
    # A symbolic link to the same file is the same file.
    (tmp_path / "link.raw").symlink_to("base.raw")
    write_header(path, Header(version=2, image_name=b"link.raw", backing_name=b"base.raw",
                              backing_format="raw", image_size=16 * CLUSTER), 16 * CLUSTER)
    with pytest.raises(BackingLoopError, match="already used as"):
        addcow.open(path, readonly=True)


def test_open_refuses_the_add_cow_file_as_its_own_image_file(tmp_path: Path) -> None:
    path = tmp_path / "self.add-cow"
    write_header(path, Header(version=2, image_name=b"self.add-cow", image_size=4096,
                              cluster_bits=12), 4096)
    os.truncate(path, 8192)  # big enough to pass the image file size check
    with pytest.raises(BackingLoopError) as info:
        addcow.open(path)
    assert f"{path}: the file is already used as {path}" in str(info.value)


def test_open_refuses_two_add_cow_files_naming_each_other(tmp_path: Path) -> None:
    for name, other in (("a", "b"), ("b", "a")):
        with open(tmp_path / f"{name}.raw", "wb") as f:
            f.truncate(MiB)
        write_header(tmp_path / f"{name}.add-cow",
                     Header(version=2, image_name=f"{name}.raw".encode(),
                            backing_name=f"{other}.add-cow".encode(), backing_format="add-cow",
                            image_size=MiB), MiB)
    for name in ("a", "b"):
        for readonly in (False, True):
            with pytest.raises(BackingLoopError) as info:
                addcow.open(tmp_path / f"{name}.add-cow", readonly=readonly)
            assert f"{name}.add-cow" in str(info.value)
            assert "must not loop" in str(info.value)
    # Nothing was left locked or open: a plain image can use a.raw read-write now
    # (once a.add-cow, which names it, is gone: two images never share one).
    (tmp_path / "a.add-cow").unlink()
    addcow.create(tmp_path / "c.add-cow", image_file="a.raw")
    with addcow.open(tmp_path / "c.add-cow") as img:
        img.write(b"ok", 0)


# == backing format ================================================================


def test_create_refuses_a_qcow2_backing_without_a_format(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    run([qemu_img, "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M"])
    with pytest.raises(BackingFormatError) as info:
        addcow.create(tmp_path / "x.add-cow", image_file="x.raw", backing_file="base.qcow2")
    message = str(info.value)
    assert str(tmp_path / "base.qcow2") in message
    assert message.endswith("if it is a qcow2 image, give -F qcow2")
    assert not (tmp_path / "x.add-cow").exists()
    assert not (tmp_path / "x.raw").exists()
    addcow.create(tmp_path / "x.add-cow", image_file="x.raw", backing_file="base.qcow2",
                  backing_format="qcow2")
    with addcow.open(tmp_path / "x.add-cow", readonly=True) as img:
        assert img.size == 1 << 20 and img.read(0, 4096) == bytes(4096)


def test_create_refuses_an_add_cow_backing_without_a_format(
    tmp_path: Path, img_path: Path
) -> None:
    with pytest.raises(BackingFormatError) as info:
        addcow.create(tmp_path / "x.add-cow", image_file="x.raw", backing_file="disk.add-cow")
    assert "add-cow header" in str(info.value) and "-F" in str(info.value)
    addcow.create(tmp_path / "x.add-cow", image_file="x.raw", backing_file="disk.add-cow",
                  backing_format="add-cow")
    with addcow.open(tmp_path / "x.add-cow") as img:
        assert img.read(0, 1) == b"\x10"


def test_create_records_raw_for_a_raw_guest_disk(tmp_path: Path, base_raw: Path) -> None:
    addcow.create(tmp_path / "x.add-cow", image_file="x.raw", backing_file="base.raw")
    raw = (tmp_path / "x.add-cow").read_bytes()
    assert raw[68:84] == b"raw" + bytes(13)


# == misuse errors =================================================================


def test_read_only_open_refuses_writes(img_path: Path) -> None:
    with addcow.open(img_path, readonly=True) as img:
        for call in (lambda: img.write(b"x", 0), lambda: img.write_zeroes(0, CLUSTER),
                     lambda: img.discard(0, CLUSTER), lambda: img.as_file().write(b"x")):
            with pytest.raises(ReadOnlyError, match="opened read-only"):
                call()
        img.flush()  # nothing to do, not an error
        assert img.read(0, 1) == b"\x10"
    assert (img_path.parent / "disk.raw").stat().st_blocks == 0


def test_closed_image_raises_closed_image_error(img_path: Path) -> None:
    img = addcow.open(img_path)
    f = img.as_file()
    img.close()
    img.close()  # closing twice is fine
    assert img.closed
    calls = [
        lambda: img.read(0, 1), lambda: img.readinto(bytearray(1), 0),
        lambda: img.write(b"x", 0), lambda: img.write_zeroes(0, 1), lambda: img.discard(0, 1),
        lambda: img.flush(), lambda: f.read(1),
    ]
    for call in calls:
        with pytest.raises(ClosedImageError, match="image is closed"):
            call()


def test_reads_follow_the_backing_through_rebase_resize_and_release(tmp_path: Path) -> None:
    """The read fast path names files by descriptor: after each change of backing,
    size or completeness a read gives the new content, never a file that was closed
    (whose descriptor number another file may have taken)."""
    size = 4 * CLUSTER
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"a" * size)
    b.write_bytes(b"b" * (2 * CLUSTER))  # shorter than the disk: zeros past its end
    img_path = tmp_path / "d.add-cow"
    addcow.create(img_path, image_file="d.raw", backing_file=a, backing_format="raw")
    with addcow.open(img_path) as img:
        img.write(b"w" * CLUSTER, 0)
        assert img.read(0, 2 * CLUSTER) == b"w" * CLUSTER + b"a" * CLUSTER
        img.set_backing(str(b), "raw")
        # a file opened now may take the closed backing's descriptor number
        with open(a, "rb"):
            assert img.read(CLUSTER, CLUSTER) == b"b" * CLUSTER
            assert img.read(3 * CLUSTER, 16) == bytes(16)
        img.resize(CLUSTER * 5)
        assert img.read(4 * CLUSTER, 16) == bytes(16)
        for c in range(1, 5):
            img.populate(c * CLUSTER, CLUSTER)
        img.flush()
        img.release_backing()
        with open(b, "rb"):
            assert img.read(0, 5 * CLUSTER) == (
                b"w" * CLUSTER + b"b" * CLUSTER + bytes(3 * CLUSTER)
            )
    with pytest.raises(ClosedImageError):
        img.readinto(bytearray(16), 0)


def test_out_of_range_requests_raise_range_error(img_path: Path) -> None:
    size = 16 * CLUSTER
    with addcow.open(img_path) as img:
        calls = [
            lambda: img.read(size, 1), lambda: img.read(size - 1, 2), lambda: img.read(-1, 1),
            lambda: img.read(0, -1), lambda: img.read(0, size + 1),
            lambda: img.read(0, 1 << 62),  # must not try to allocate 4 EiB first
            lambda: img.readinto(bytearray(2), size - 1),
            lambda: img.write(b"xy", size - 1), lambda: img.write(b"x", -1),
            lambda: img.write_zeroes(size, 1), lambda: img.write_zeroes(0, -1),
            lambda: img.discard(size - 1, 2), lambda: img.discard(-CLUSTER, CLUSTER),
            lambda: list(img.block_status(size, 1)), lambda: list(img.block_status(-1, 1)),
        ]
        for i, call in enumerate(calls):
            with pytest.raises(RangeError, match=f"outside the disk \\(size {size}\\)"):
                call()
                pytest.fail(f"call {i} did not raise")
        assert img.read(size, 0) == b""
        img.write(b"", size)
        assert img.allocated_clusters == 0


def test_non_byte_buffers_are_read_and_written_as_bytes(img_path: Path) -> None:
    """Buffers of any item size (array('I'), memoryview casts) count in bytes."""
    with addcow.open(img_path) as img:
        img.write(b"x", 0)  # cluster 0 allocated, cluster 1 not: two runs
        words = array.array("I", range(1000, 1032))  # 128 bytes
        img.write(memoryview(words), CLUSTER - 64)
        assert img.read(CLUSTER - 64, 128) == words.tobytes()
        back = array.array("I", bytes(128))
        assert img.readinto(back, CLUSTER - 64) == 128
        assert back == words
        img.write(words, 3 * CLUSTER - 64)  # the plain buffer, not a memoryview
        assert img.read(3 * CLUSTER - 64, 128) == words.tobytes()


# == locking =======================================================================

_CHILD = """
import addcow, json, sys
kw = json.loads(sys.argv[2])
try:
    with addcow.open(sys.argv[1], **kw) as img:
        print("OK", img.read(0, 4).hex())
except addcow.AddCowError as exc:
    print(type(exc).__name__, exc)
"""


def open_in_child(path: Path, **kw: bool) -> str:
    return run([sys.executable, "-c", _CHILD, str(path), json.dumps(kw)]).stdout.strip()


def test_second_read_write_open_in_another_process_is_refused(img_path: Path) -> None:
    with addcow.open(img_path):
        out = open_in_child(img_path)
        assert out.startswith(f"LockError {img_path}: failed to get write lock"), out
        assert "in use by another process" in out
        out = open_in_child(img_path, readonly=True)
        assert out.startswith(f"LockError {img_path}: failed to get read lock"), out
    assert open_in_child(img_path) == "OK 10101010"


def test_second_read_write_open_in_the_same_process_is_refused(img_path: Path) -> None:
    """OFD locks belong to the open file, so two opens in one process conflict too."""
    with addcow.open(img_path):
        with pytest.raises(LockError) as info:
            addcow.open(img_path)
        assert str(img_path) in str(info.value)
        with pytest.raises(LockError):
            addcow.open(img_path, readonly=True)
    with addcow.open(img_path):
        pass


def test_read_only_opens_share(img_path: Path) -> None:
    with addcow.open(img_path, readonly=True) as a, addcow.open(img_path, readonly=True) as b:
        assert a.read(0, 4) == b.read(0, 4)
        assert open_in_child(img_path, readonly=True) == "OK 10101010"
        out = open_in_child(img_path)
        assert out.startswith(f"LockError {img_path}: failed to get write lock"), out


def test_image_file_shared_by_two_add_cow_files_is_refused(img_path: Path) -> None:
    other = img_path.parent / "other.add-cow"
    write_header(other, Header(version=2, image_name=b"disk.raw", image_size=16 * CLUSTER),
                 16 * CLUSTER)
    with addcow.open(img_path):
        out = open_in_child(other)
        assert out.startswith(f"LockError {img_path.parent / 'disk.raw'}: failed to "), out


def test_force_share_inspects_an_image_in_use(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.write(b"\x99" * 4, 0)
        img.flush()
        assert open_in_child(img_path, readonly=True, force_share=True) == "OK 99999999"
        with addcow.open(img_path, readonly=True, force_share=True) as peek:
            assert peek.read(0, 4) == b"\x99" * 4


def test_qemu_io_cannot_write_the_backing_file_while_an_image_uses_it(
    img_path: Path, base_raw: Path
) -> None:
    qemu_io = require_tool("qemu-io")
    before = sha256(base_raw)
    with addcow.open(img_path):
        proc = run([qemu_io, "-f", "raw", "-c", "write -P 0x66 0 4k", str(base_raw)],
                   check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr, proc.stderr
        assert "Is another process using the image" in proc.stderr
        # The image file is refused to QEMU writers as well.
        raw = img_path.parent / "disk.raw"
        proc = run([qemu_io, "-f", "raw", "-c", "write 0 4k", str(raw)], check=False)
        assert 'Failed to get "write" lock' in proc.stderr, proc.stderr
        # Reading the backing file read-only is shared.
        proc = run([qemu_io, "-r", "-f", "raw", "-c", "read -P 0x10 0 4k", str(base_raw)])
        assert "read 4096/4096 bytes" in proc.stdout
    assert sha256(base_raw) == before
    run([qemu_io, "-f", "raw", "-c", "write -P 0x66 0 4k", str(base_raw)])  # lock released


def test_addcow_refuses_a_backing_file_qemu_is_writing(img_path: Path, base_raw: Path) -> None:
    qemu_io = require_tool("qemu-io")
    holder = subprocess.Popen(
        [qemu_io, "-f", "raw", str(base_raw)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("write -P 0x10 0 512\n")
        holder.stdin.flush()
        assert "wrote 512/512 bytes" in holder.stdout.readline() + holder.stdout.readline()
        with pytest.raises(LockError) as info:
            addcow.open(img_path)
        assert str(base_raw) in str(info.value)
    finally:
        holder.communicate("quit\n", timeout=30)


# == concurrency ===================================================================


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_concurrent_partial_writes_into_one_unallocated_cluster_all_survive(
    tmp_path: Path, cluster_size: int
) -> None:
    clusters, threads = 96, 8
    backing = tmp_path / "base.raw"
    backing.write_bytes(b"".join(pattern(c % 200 + 1, cluster_size) for c in range(clusters)))
    path = tmp_path / "disk.add-cow"
    addcow.create(path, image_file="disk.raw", backing_file="base.raw", cluster_size=cluster_size)
    piece = cluster_size // (2 * threads)
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    with addcow.open(path) as img:
        def writer(t: int) -> None:
            try:
                for c in range(clusters):
                    barrier.wait()
                    # Thread t writes the (2t+1)-th piece of cluster c; even pieces stay.
                    img.write(pattern(0xA0 + t, piece), c * cluster_size + (2 * t + 1) * piece)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                barrier.abort()

        pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        assert not errors, errors
        assert img.allocated_clusters == clusters
        for c in range(clusters):
            want = b"".join(
                pattern(0xA0 + i // 2, piece) if i % 2 else pattern(c % 200 + 1, piece)
                for i in range(2 * threads)
            )
            assert img.read(c * cluster_size, cluster_size) == want, f"cluster {c}"
    with addcow.open(path, readonly=True) as img:
        assert img.allocated_clusters == clusters


# == the backing file never changes ================================================


def test_backing_bytes_and_mtime_never_change(chain: Path, tmp_path: Path) -> None:
    """A whole session on the top of a chain leaves every lower file untouched."""
    lower = [tmp_path / "base.raw", tmp_path / "mid.add-cow", tmp_path / "mid.raw"]
    for p in lower:
        os.utime(p, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = {p: (sha256(p), p.stat().st_mtime_ns) for p in lower}
    with addcow.open(chain) as img:
        for i in range(16):
            img.write(pattern(i, 5000), i * CLUSTER + 60000)
            if i % 3 == 0:
                img.flush()
        img.write(pattern(0x77, 3 * CLUSTER), 4 * CLUSTER - 1, fua=True)
        img.write_zeroes(5 * CLUSTER + 7, 2 * CLUSTER)
        img.write_zeroes(10 * CLUSTER, 2 * CLUSTER, may_unmap=False)
        img.discard(0, 3 * CLUSTER + 5)
        img.discard(13 * CLUSTER - 3, 3 * CLUSTER + 3)
        with img.as_file() as f:
            f.seek(7 * CLUSTER)
            f.write(b"file view")
        img.flush()
        assert img.complete
    with addcow.open(chain, readonly=True) as img:
        img.read(0, img.size)
    after = {p: (sha256(p), p.stat().st_mtime_ns) for p in lower}
    assert after == before


# == the file view =================================================================


def test_as_file_works_with_copyfileobj_seek_and_tell(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.write(b"hello", CLUSTER - 2)
        want = img.read(0, img.size)
        f = img.as_file()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.writable() and f.seekable()
        out = io.BytesIO()
        shutil.copyfileobj(f, out, 100_000)  # chunks that straddle clusters
        assert out.getvalue() == want
        assert f.tell() == img.size
        assert f.read(10) == b""
        assert f.seek(-3, io.SEEK_END) == img.size - 3
        assert f.read() == want[-3:]
        assert f.seek(CLUSTER - 2) == CLUSTER - 2
        assert f.read(5) == b"hello"
        assert f.seek(-5, io.SEEK_CUR) == CLUSTER - 2
        assert f.tell() == CLUSTER - 2
        assert f.write(b"HELLO") == 5
        assert f.tell() == CLUSTER + 3
        assert img.read(CLUSTER - 2, 5) == b"HELLO"
        with pytest.raises(ValueError):
            f.seek(-1)
        with pytest.raises(ValueError):
            f.seek(0, 7)
        # A buffered reader over it, as libraries use files.
        f.seek(0)
        reader = io.BufferedReader(f)
        assert reader.read(CLUSTER + 3) == want[: CLUSTER - 2] + b"HELLO"
        f.close()
        assert not img.closed, "closing the view leaves the image open"
        assert img.read(0, 1) == b"\x10"


def test_copyfileobj_into_the_file_view(img_path: Path) -> None:
    src = io.BytesIO(bytes(range(256)) * 1000)
    with addcow.open(img_path) as img:
        f = img.as_file()
        f.seek(12345)
        shutil.copyfileobj(src, f)
        assert img.read(12345, 256000) == bytes(range(256)) * 1000


# == durability ordering ===========================================================


class SyscallLog:
    """Records os.pwritev and os.fdatasync calls as (call, file, offset)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, img: addcow.AddCowImage) -> None:
        self.calls: list[tuple[str, str, int | None]] = []
        self.names = {
            os.path.realpath(img.path): "meta",
            os.path.realpath(img.image_path): "image",
        }
        real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

        def pwritev(fd: int, buffers: list[memoryview], offset: int, *rest: int) -> int:
            self.calls.append(("write", self.which(fd), offset))
            return real_pwritev(fd, buffers, offset, *rest)

        def fdatasync(fd: int) -> None:
            self.calls.append(("sync", self.which(fd), None))
            real_fdatasync(fd)

        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def which(self, fd: int) -> str:
        return self.names.get(os.readlink(f"/proc/self/fd/{fd}"), "other")

    def take(self) -> list[tuple[str, str, int | None]]:
        calls, self.calls = self.calls, []
        return calls


def check_flush_order(calls: list[tuple[str, str, int | None]], header_size: int) -> None:
    """Data then image sync, then bitmap pages, then the .add-cow sync last."""
    image_sync = calls.index(("sync", "image", None))
    bitmap_writes = [
        i for i, c in enumerate(calls)
        if c[:2] == ("write", "meta") and c[2] is not None and c[2] >= header_size
    ]
    data_writes = [i for i, c in enumerate(calls) if c[:2] == ("write", "image")]
    assert bitmap_writes, calls
    assert all(i < image_sync for i in data_writes), calls
    assert all(i > image_sync for i in bitmap_writes), calls
    assert calls[-1] == ("sync", "meta", None), calls
    assert "other" not in {c[1] for c in calls}, calls


def test_flush_syncs_data_before_bitmap_and_metadata_last(
    img_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with addcow.open(img_path) as img:
        log = SyscallLog(monkeypatch, img)
        img.write(b"a" * 100, 10)
        img.write(b"b" * (3 * CLUSTER), 5 * CLUSTER - 7)
        img.write_zeroes(12 * CLUSTER, CLUSTER)
        writes = log.take()
        assert {c[1] for c in writes} <= {"image"}, "bits reach the disk only at flush"
        assert on_disk_bits(img_path) == 0
        img.flush()
        calls = log.take()
        check_flush_order(calls, img.header.header_size)
        assert on_disk_bits(img_path) == sum(1 << c for c in (0, 4, 5, 6, 7, 12))
        # Nothing new: a flush still syncs the image file but writes no bitmap page.
        img.flush()
        calls = log.take()
        assert [c for c in calls if c[0] == "write"] == [], calls


def test_fua_write_is_durable_on_return(img_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with addcow.open(img_path) as img:
        log = SyscallLog(monkeypatch, img)
        img.write(b"fua", 3 * CLUSTER + 1, fua=True)
        calls = log.take()
        assert calls[0] == ("write", "image", 3 * CLUSTER), calls
        check_flush_order(calls, img.header.header_size)
        assert on_disk_bits(img_path) == 1 << 3, "the bit is on disk before write returns"
        # FUA on an allocated cluster syncs the data too.
        img.write(b"again", 3 * CLUSTER + 1, fua=True)
        calls = log.take()
        assert calls[0] == ("write", "image", 3 * CLUSTER + 1)
        assert ("sync", "image", None) in calls[1:], calls


def test_failed_bitmap_write_stays_pending_for_the_next_flush(
    img_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with addcow.open(img_path) as img:
        img.write(pattern(0x66, 16 * CLUSTER), 0)  # every cluster: flush would set the flag
        log = SyscallLog(monkeypatch, img)
        real_pwritev = os.pwritev
        failures = [1]

        def failing_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            if failures and log.which(fd) == "meta":
                failures.pop()
                raise OSError(errno.EIO, "Input/output error")
            return real_pwritev(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", failing_pwritev)
        with pytest.raises(AddCowIOError) as info:
            img.flush()
        assert info.value.errno == errno.EIO
        assert str(img_path) in str(info.value)
        assert on_disk_bits(img_path) == 0, "the on-disk bitmap is behind, never ahead"
        assert not Header.unpack(img_path.read_bytes()).all_allocated
        img.flush()
        assert on_disk_bits(img_path) == 0xFFFF
        assert Header.unpack(img_path.read_bytes()).all_allocated


def test_failed_copy_on_write_leaves_the_cluster_unallocated(
    img_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with addcow.open(img_path) as img:
        real_pwritev = os.pwritev

        def failing_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", failing_pwritev)
        with pytest.raises(AddCowIOError) as info:
            img.write(b"lost", CLUSTER + 5)
        assert info.value.errno == errno.ENOSPC
        assert "disk.raw: write at offset 65536" in str(info.value)
        assert img.allocated_clusters == 0
        assert img.read(CLUSTER, 16) == pattern(0x11, 16)
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        img.write(b"kept", CLUSTER + 5)  # the claim was released: no deadlock
        assert img.read(CLUSTER, 16) == pattern(0x11, 5) + b"kept" + pattern(0x11, 7)
        assert img.allocated_clusters == 1


def test_all_allocated_set_after_every_cluster_is_written_and_flushed(
    img_path: Path, base_raw: Path
) -> None:
    with addcow.open(img_path) as img:
        img.write(pattern(0x55, 15 * CLUSTER), 0)
        img.flush()
        assert not Header.unpack(img_path.read_bytes()).all_allocated
        assert not img.complete
        img.write(b"last", 16 * CLUSTER - 4)
        assert img.complete
        assert not Header.unpack(img_path.read_bytes()).all_allocated, "flag only after flush"
        img.flush()
        header = Header.unpack(img_path.read_bytes())
        assert header.all_allocated
        assert img_path.read_bytes()[36] & 1
        want = img.read(0, img.size)
    base_raw.unlink()
    for readonly in (True, False):
        with addcow.open(img_path, readonly=readonly) as img:
            assert img.complete
            assert img.read(0, img.size) == want
            assert want[-CLUSTER:] == pattern(0x1F, CLUSTER - 4) + b"last"
            assert {(e.depth, e.present) for e in img.block_status()} == {(0, True)}
            if not readonly:
                img.write(b"still writable", 0)


def test_all_allocated_update_changes_only_its_field(tmp_path: Path, base_raw: Path) -> None:
    """Setting ALL_ALLOCATED rewrites bytes 36-43 only, wherever the names are.

    A header written by another writer may keep its names anywhere in the name
    area; moving them would risk a torn header on a crash.
    """
    path = tmp_path / "far.add-cow"
    with open(tmp_path / "far.raw", "wb") as f:
        f.truncate(16 * CLUSTER)
    header = bytearray(8192)
    header[:84] = Header(version=2, image_name=b"far.raw", backing_name=b"base.raw",
                         backing_format="raw", image_size=16 * CLUSTER,
                         header_size=8192).pack()[:84]
    header[12:16] = (7000).to_bytes(4, "little")  # backing name at 7000
    header[20:24] = (5000).to_bytes(4, "little")  # image name at 5000
    header[7000:7008] = b"base.raw"
    header[5000:5007] = b"far.raw"
    path.write_bytes(bytes(header) + bytes(2))
    with addcow.open(path) as img:
        img.write(pattern(0x33, img.size), 0)
        img.flush()
        assert img.header.all_allocated
    raw = path.read_bytes()
    changed = [i for i in range(8192) if raw[i] != header[i]]
    assert changed == [36], f"header bytes changed: {changed[:10]}"
    assert raw[36] == 0x01
    assert raw[8192:] == b"\xff\xff"


def test_discard_and_zeroes_over_whole_clusters_punch_holes(img_path: Path) -> None:
    raw = img_path.parent / "disk.raw"
    with addcow.open(img_path) as img:
        img.write(pattern(0x42, 4 * CLUSTER), 0)
        img.flush()
        full = raw.stat().st_blocks
        assert full * 512 >= 4 * CLUSTER
        img.discard(CLUSTER, CLUSTER)  # allocated: punched
        img.write_zeroes(2 * CLUSTER, CLUSTER)  # may_unmap: punched
        img.discard(6 * CLUSTER, 2 * CLUSTER)  # unallocated: now allocated and zero
        img.discard(9 * CLUSTER + 1, CLUSTER)  # partial clusters: nothing happens
        img.flush()
        assert raw.stat().st_blocks * 512 <= full * 512 - 2 * CLUSTER
        assert img.read(CLUSTER, 2 * CLUSTER) == bytes(2 * CLUSTER)
        assert img.read(6 * CLUSTER, 2 * CLUSTER) == bytes(2 * CLUSTER)
        assert img.read(9 * CLUSTER, 2 * CLUSTER) == base_bytes()[9 * CLUSTER : 11 * CLUSTER]
        assert img.allocated_clusters == 6
        assert extents(img, 0, 8 * CLUSTER) == [
            (0, CLUSTER, 0, True, False),
            (CLUSTER, 2 * CLUSTER, 0, True, True),
            (3 * CLUSTER, CLUSTER, 0, True, False),
            (4 * CLUSTER, 2 * CLUSTER, 1, True, False),
            (6 * CLUSTER, 2 * CLUSTER, 0, True, True),
        ]


def test_discard_and_zeroes_of_a_whole_large_disk_stay_small(tmp_path: Path) -> None:
    """mkfs discards the whole device: 2^24 clusters must not become 2^24 objects."""
    path = tmp_path / "big.add-cow"
    addcow.create(path, image_file="big.raw", size=1 << 40)
    with addcow.open(path) as img:
        assert img.total_clusters == 1 << 24
        tracemalloc.start()
        try:
            img.discard(0, 1 << 39)
            img.write_zeroes(1 << 39, 1 << 39)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * MiB, f"{peak} bytes allocated for a whole-disk discard"
        assert img.allocated_clusters == 1 << 24
        assert img.read((1 << 40) - 5, 5) == bytes(5)
    assert Header.unpack(path.read_bytes()[:4096]).all_allocated
    assert (tmp_path / "big.raw").stat().st_blocks == 0


def iter_all(img: addcow.AddCowImage) -> Iterator[bytes]:
    for off in range(0, img.size, CLUSTER):
        yield img.read(off, min(CLUSTER, img.size - off))


def test_counters_follow_allocation(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        assert (img.allocated_clusters, img.total_clusters) == (0, 16)
        img.write(b"x", CLUSTER - 1)
        img.write(b"y", CLUSTER - 1)
        assert img.allocated_clusters == 1
        img.write(b"xy", CLUSTER - 1)
        assert img.allocated_clusters == 2
        assert b"".join(iter_all(img))[CLUSTER - 1 : CLUSTER + 1] == b"xy"
    with addcow.open(img_path, readonly=True) as img:
        assert img.allocated_clusters == 2
        assert not img.complete


def test_failed_sync_of_the_image_file_stops_writes(
    tmp_path: Path, base_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail-stop: after fdatasync of the image file fails, no bit of the lost writes
    reaches the disk, later writes and flushes are refused, reads go on, and a reopen
    shows only what was durable."""
    from addcow import sysio

    path = tmp_path / "f.add-cow"
    addcow.create(path, image_file="f.raw", backing_file=base_raw)
    with addcow.open(path) as img:
        img.write(b"\xaa" * CLUSTER, 0)
        img.flush()
        img.write(b"\xbb" * CLUSTER, 2 * CLUSTER)
        real_sync = sysio.fdatasync

        def failing_sync(fd: int, name: str) -> None:
            if name.endswith("f.raw"):
                raise addcow.AddCowIOError(f"{name}: fdatasync: Input/output error", 5)
            real_sync(fd, name)

        monkeypatch.setattr(sysio, "fdatasync", failing_sync)
        with pytest.raises(addcow.AddCowIOError, match="Input/output error"):
            img.flush()
        monkeypatch.setattr(sysio, "fdatasync", real_sync)
        with pytest.raises(addcow.AddCowIOError, match="reopen the image to recover"):
            img.write(b"\xcc", 0)
        with pytest.raises(addcow.AddCowIOError, match="reopen the image to recover"):
            img.write_nowait(b"\xcc" * 512, 512)  # inside one allocated cluster
        with pytest.raises(addcow.AddCowIOError, match="reopen the image to recover"):
            img.flush()
        assert img.read(0, 4) == b"\xaa" * 4
    with addcow.open(path, readonly=True) as img:
        assert img.allocated_clusters == 1  # cluster 2's bit was never persisted
        assert img.read(2 * CLUSTER, 4) == bytes([0x12]) * 4  # from the backing again


# == write_nowait (the event loop's writes) ===========================================


def test_write_nowait_into_allocated_clusters_is_one_write(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.write(pattern(0xA1, 3 * CLUSTER), 2 * CLUSTER)
        before_bits = img.allocated_clusters
        data = pattern(0xB2, 2 * CLUSTER)
        assert img.write_nowait(data, 2 * CLUSTER + 100)  # spans clusters 2-4
        assert img.allocated_clusters == before_bits
        expected = bytearray(base_bytes())
        expected[2 * CLUSTER : 5 * CLUSTER] = pattern(0xA1, 3 * CLUSTER)
        expected[2 * CLUSTER + 100 : 4 * CLUSTER + 100] = data
        assert img.read(0, img.size) == bytes(expected)


def test_write_nowait_inside_one_allocated_cluster_checks_as_write(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.write(pattern(0xA1, CLUSTER), 2 * CLUSTER)
        assert img.write_nowait(b"\xb2" * 512, 2 * CLUSTER + 512)
        assert img.read(2 * CLUSTER + 512, 512) == b"\xb2" * 512
        with pytest.raises(addcow.RangeError):
            img.write_nowait(b"\xb2" * 512, img.size - 256)
    with addcow.open(img_path, readonly=True) as img, pytest.raises(addcow.ReadOnlyError):
        img.write_nowait(b"\xb2" * 512, 2 * CLUSTER)
    with pytest.raises(addcow.ClosedImageError):
        img.write_nowait(b"\xb2" * 512, 2 * CLUSTER)


def test_write_nowait_refuses_a_span_with_an_unallocated_cluster(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.write(pattern(0xA1, CLUSTER), 2 * CLUSTER)
        before = img.read(0, img.size)
        assert not img.write_nowait(pattern(0xB2, CLUSTER), 2 * CLUSTER + 100)  # 2 and 3
        assert img.read(0, img.size) == before
        assert img.allocated_clusters == 1


def test_write_nowait_copies_one_unallocated_cluster_on_write(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        # the backing's bytes must be in the page cache (RWF_NOWAIT reads)
        img.read(0, img.size)
        assert img.write_nowait(pattern(0xC3, 1000), 5 * CLUSTER + 3000)
        assert img.bitmap.is_set(5)
        expected = bytearray(pattern(base_byte(5), CLUSTER))
        expected[3000:4000] = pattern(0xC3, 1000)
        assert img.read(5 * CLUSTER, CLUSTER) == bytes(expected)
    assert on_disk_bits(img_path) >> 5 & 1  # flushed at close: data, then the bit


def test_write_nowait_leaves_a_claimed_cluster_to_write(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        claims = img._claim(6, 7)  # another writer is copying cluster 6
        try:
            assert not img.write_nowait(pattern(0xD4, 512), 6 * CLUSTER)
        finally:
            img._release(claims, commit=False)
        assert not img.bitmap.is_set(6)
        assert img.read(6 * CLUSTER, CLUSTER) == pattern(base_byte(6), CLUSTER)


def test_write_nowait_copies_several_unallocated_clusters_on_write(img_path: Path) -> None:
    with addcow.open(img_path) as img:
        img.read(0, img.size)  # backing bytes cached
        data = pattern(0xE5, 2 * CLUSTER)
        assert img.write_nowait(data, 2 * CLUSTER + 5000)  # clusters 2, 3 and 4
        assert [img.bitmap.is_set(c) for c in range(1, 6)] == [False, True, True, True, False]
        expected = bytearray(base_bytes())
        expected[2 * CLUSTER + 5000 : 4 * CLUSTER + 5000] = data
        assert img.read(0, img.size) == bytes(expected)
        with open(img.image_path, "rb") as f:  # head and tail copied from the backing
            f.seek(2 * CLUSTER)
            assert f.read(3 * CLUSTER) == bytes(expected[2 * CLUSTER : 5 * CLUSTER])


def test_a_route_reads_in_place_only_where_no_store_has_work_to_do(tmp_path: Path) -> None:
    """The NBD server reads in its event loop only what is a plain copy from files:
    allocated clusters, a raw backing; never a compressed qcow2 cluster."""
    qemu_img = require_tool("qemu-img")
    raw = tmp_path / "g.raw"
    raw.write_bytes(bytes(range(1, 256)) * (4 * CLUSTER // 255 + 1))
    run([qemu_img, "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(raw),
         str(tmp_path / "g.qcow2")])  # fmt: skip
    for backing, fmt, in_place in (("g.raw", "raw", True), ("g.qcow2", "qcow2", False)):
        path = tmp_path / f"over-{fmt}.add-cow"
        addcow.create(path, image_file=f"over-{fmt}.raw", backing_file=backing,
                      backing_format=fmt)  # fmt: skip
        with addcow.open(path) as img:
            img.write(b"\x01" * CLUSTER, 0)
            assert img.route(100, 4096).in_place, "allocated: the image file"
            assert img.route(CLUSTER + 100, 4096).in_place is in_place
            assert img.route(CLUSTER - 100, 200).in_place is in_place  # mixed
            assert img.read(CLUSTER + 100, 4096) == raw.read_bytes()[CLUSTER + 100 : CLUSTER + 4196]
