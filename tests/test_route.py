"""Routes: the one answer a store gives about where a whole range can be read from.

Each scenario starts from a diagram of which layer holds which 64 KiB cluster
and checks, range by range, the route the image answers (FILE with its
descriptor and offset, INLINE, REMOTE with its store and offset, POOL), and
that the bytes read through that route are the bytes ``readinto`` returns.
Host offsets of qcow2 clusters come from ``qemu-img map``, the referee.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from nbd_util import qemu_nbd
from qcow2_util import qemu_img, qemu_io

import addcow
from addcow.errors import RangeError
from addcow.image import AddCowImage
from addcow.stores.base import INLINE, POOL, Route, RouteKind, file_route
from addcow.stores.qcow2 import Qcow2File
from addcow.stores.raw import RawFile
from addcow.stores.remote.nbd import NBDStore

K = 64 * 1024  # the cluster size of every layer here


def through(route: Route, offset: int, length: int, img: AddCowImage) -> None:
    """The bytes read from where ``route`` points equal the image's own read."""
    expected = img.read(offset, length)
    if route.kind is RouteKind.FILE:
        assert os.pread(route.fd, length, route.offset) == expected
    elif route.kind is RouteKind.REMOTE:
        assert route.store is not None
        buf = bytearray(length)
        route.store.readinto(memoryview(buf), route.offset)
        assert buf == expected


def pattern_raw(path: Path, clusters: int, base: int) -> Path:
    """A raw file whose cluster i is filled with byte ``base + i``."""
    path.write_bytes(b"".join(bytes([base + i]) * K for i in range(clusters)))
    return path


def host_offset(qcow2: Path, guest: int) -> int:
    """Where qemu-img map says the guest byte ``guest`` of ``qcow2`` lies in the file."""
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", qcow2)):
        if e["start"] <= guest < e["start"] + e["length"] and e["depth"] == 0:
            assert e["data"] and "offset" in e, e
            return int(e["offset"]) + guest - int(e["start"])
    raise AssertionError(f"{guest} is not mapped in {qcow2}")


def golden_qcow2(tmp_path: Path) -> Path:
    """g.qcow2, clusters 0-7: C C . N N Z . C

    C compressed (``qemu-img convert -c`` of a source whose clusters 0, 1 and 7
    hold data), . unallocated (zero in the source), N normal (qemu-io writes
    clusters 3-4 in one request: contiguous host clusters), Z a zero cluster.
    """
    src = tmp_path / "g.src"
    src.write_bytes(
        b"".join(bytes([0x10 + i]) * K if i in (0, 1, 7) else bytes(K) for i in range(8))
    )
    qcow2 = tmp_path / "g.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, qcow2)
    qemu_io(qcow2, f"write -P 0x33 {3 * K} {2 * K}", f"write -z {5 * K} {K}")
    return qcow2


def test_a_raw_backing(tmp_path: Path) -> None:
    """cluster   0  1  2  3  4  5
    image     A  .  A  .  .  .      A allocated in the image file
    base.raw  b  b  b  b/          the backing ends half way into cluster 3
    """
    base = tmp_path / "base.raw"
    base.write_bytes(pattern_raw(base, 4, 0x60).read_bytes()[: 3 * K + K // 2])
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file="base.raw", backing_format="raw",
                  size=6 * K)  # fmt: skip
    with addcow.open(path) as img:
        img.write(b"\xa0" * K, 0)
        img.write(b"\xa2" * K, 2 * K)
        assert isinstance(img.backing, RawFile)
        image_fd, base_fd = img.image_fd, img.backing.fd
        cases = [
            ((100, 1000), file_route(image_fd, 100)),  # allocated
            ((K + 100, 1000), file_route(base_fd, K + 100)),  # in the backing
            ((K - 100, 200), INLINE),  # image file, then the backing
            ((0, 3 * K), INLINE),
            ((3 * K, K), INLINE),  # across the backing's end: file, then zeros
            ((4 * K, 2 * K), INLINE),  # past the backing's end: zeros
        ]
        for (offset, length), want in cases:
            got = img.route(offset, length)
            assert got == want, (offset, length)
            through(got, offset, length, img)
            assert got.in_place
        assert img.backing.route(3 * K, K) == INLINE, "the raw store itself, across its end"
        # A range readinto refuses reads in place: reading it only raises.
        assert img.route(5 * K, 2 * K) == INLINE
        with pytest.raises(RangeError):
            img.read(5 * K, 2 * K)


def test_a_local_qcow2_backing_with_compressed_clusters(tmp_path: Path) -> None:
    """cluster   0  1  2  3  4  5  6  7
    image     .  .  .  .  .  .  A  .
    g.qcow2   C  C  .  N  N  Z  .  C      (see golden_qcow2)
    base.raw  b  b  b  b  b  b  b  b      g.qcow2's backing (rebase -u)
    """
    qcow2 = golden_qcow2(tmp_path)
    pattern_raw(tmp_path / "base.raw", 8, 0x60)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "base.raw", "-F", "raw", qcow2)
    host = host_offset(qcow2, 3 * K)
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file="g.qcow2", backing_format="qcow2")
    with addcow.open(path) as img:
        img.write(b"\xa6" * K, 6 * K)
        store = img.backing
        assert isinstance(store, Qcow2File) and isinstance(store.backing, RawFile)
        cases = [
            ((100, 1000), POOL),  # compressed: inflating
            ((2 * K + 5, 1000), file_route(store.backing.fd, 2 * K + 5)),  # down to base.raw
            ((3 * K + 5, K), file_route(store.fd, host + 5)),  # N N: one contiguous host run
            ((5 * K, K), INLINE),  # zero cluster
            ((3 * K, 3 * K), INLINE),  # N N Z
            ((K, 2 * K), POOL),  # C, then base.raw
            ((6 * K, K), file_route(img.image_fd, 6 * K)),  # allocated in the image
            ((6 * K - 100, 200), INLINE),  # Z, then the image file
            ((7 * K - 100, 200), POOL),  # the image file, then C
        ]
        for (offset, length), want in cases:
            got = img.route(offset, length)
            assert got == want, (offset, length)
            through(got, offset, length, img)
        assert store.route(3 * K, 2 * K) == file_route(store.fd, host)


def test_add_cow_over_add_cow(tmp_path: Path) -> None:
    """cluster      0  1  2  3
    upper        U  .  .  U
    lower        .  L  .  L
    base.raw     b  b  b  b
    """
    pattern_raw(tmp_path / "base.raw", 4, 0x60)
    lower, upper = tmp_path / "lower.add-cow", tmp_path / "upper.add-cow"
    addcow.create(lower, image_file="lower.raw", backing_file="base.raw", backing_format="raw")
    with addcow.open(lower) as img:
        img.write(b"\xb1" * K, K)
        img.write(b"\xb3" * K, 3 * K)
    addcow.create(upper, image_file="upper.raw", backing_file="lower.add-cow",
                  backing_format="add-cow")  # fmt: skip
    with addcow.open(upper) as img:
        img.write(b"\xc0" * K, 0)
        img.write(b"\xc3" * K, 3 * K)
        below = img.backing
        assert isinstance(below, AddCowImage) and isinstance(below.backing, RawFile)
        cases = [
            ((10, 100), file_route(img.image_fd, 10)),
            ((K + 10, 100), file_route(below.image_fd, K + 10)),  # the lower image file
            ((2 * K + 10, 100), file_route(below.backing.fd, 2 * K + 10)),  # base.raw
            ((K, 2 * K), INLINE),  # lower: L, then base.raw
            ((0, 4 * K), INLINE),
        ]
        for (offset, length), want in cases:
            got = img.route(offset, length)
            assert got == want, (offset, length)
            through(got, offset, length, img)


def test_a_qcow2_golden_image_over_nbd_answers_remote_at_the_host_offset(
    tmp_path: Path,
) -> None:
    """cluster   0  1  2  3  4  5  6  7
    image     .  .  .  .  .  .  .  .
    g.qcow2   C  C  .  N  N  Z  .  C      served as bytes by qemu-nbd -f raw

    A run of normal clusters is read from the NBD export holding the qcow2
    file, at the run's host offset, once the run's L2 table is cached: mapping
    it otherwise reads the table over the network, which is the pool's job.
    """
    qcow2 = golden_qcow2(tmp_path)
    host = host_offset(qcow2, 3 * K)
    with qemu_nbd(qcow2, tmp_path / "g.sock") as uri:
        path = tmp_path / "d.add-cow"
        addcow.create(path, image_file="d.raw", backing_file=uri, backing_format="qcow2")
        with addcow.open(path) as img:
            assert isinstance(img.backing, Qcow2File) and img.backing.fd == -1
            assert img.route(3 * K + 5, K) == POOL, "its L2 table is not cached yet"
            img.read(0, 8 * K)
            got = img.route(3 * K + 5, K)
            assert got.kind is RouteKind.REMOTE and got.offset == host + 5
            assert isinstance(got.store, NBDStore) and got.store.uri == uri
            through(got, 3 * K + 5, K, img)
            assert not got.in_place
            for (offset, length), want in [
                ((100, 1000), POOL),  # compressed
                ((2 * K, K), INLINE),  # unallocated, no backing: zeros
                ((5 * K + 7, 100), INLINE),  # zero cluster
                ((3 * K, 3 * K), POOL),  # N N Z: remote and zeros mixed
            ]:
                assert img.route(offset, length) == want, (offset, length)
                through(want, offset, length, img)
