"""Large reads served with ``sendfile``: the wire shape, content, and what happens when it stops.

Reads of at least ``SENDFILE_MIN`` bytes that lie in one file go from the page
cache to the socket without a Python buffer. Their structured reply is an
OFFSET_DATA chunk without DONE, then a NONE chunk with DONE (the data is not in
memory when the header leaves, so an error could still follow). These tests
check that shape and the content against the library, with a real ``addcow
serve``; and, with the server in this process, the two ways a ``sendfile``
falls short: the socket fills (the rest is read and queued: same bytes) and
the rest cannot be read (the header promised bytes that cannot follow: the
connection is closed, the server serves others).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern
from nbd_util import STRUCTURED_REPLY_MAGIC, InProcessServer, RawClient, served
from qcow2_util import qemu_img, qemu_map

import addcow
from addcow.errors import AddCowIOError
from addcow.serve import routing

OFFSET_DATA, OFFSET_HOLE, NONE = 1, 2, 0
DONE = 1
SIZE = 16 * CLUSTER


@pytest.fixture
def image(tmp_path: Path, base_raw: Path) -> Path:
    """Clusters 0-5 written (0x30 + i); 6-15 from the backing (8-11 are holes there)."""
    path = tmp_path / "s.add-cow"
    addcow.create(path, image_file="s.raw", backing_file=base_raw, backing_format="raw")
    with addcow.open(path) as img:
        for i in range(6):
            img.write(pattern(0x30 + i, CLUSTER), i * CLUSTER)
    return path


def content(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, img.size)


def chunks(c: RawClient, cookie: int) -> list[tuple[int, int, bytes]]:
    """(flags, type, payload) of every chunk of one structured reply."""
    out = []
    while True:
        kind, flags, rtype, got, payload = c.reply()
        assert kind == STRUCTURED_REPLY_MAGIC
        assert got == cookie
        out.append((flags, rtype, payload))
        if flags & DONE:
            return out


@pytest.mark.parametrize(
    ("where", "first"), [("image file", 1), ("raw backing", 12)], ids=["image", "backing"]
)
def test_large_read_from_one_file_is_data_then_done(
    tmp_path: Path, image: Path, where: str, first: int
) -> None:
    expected = content(image)
    offset, length = first * CLUSTER, 4 * CLUSTER
    with served(tmp_path, image) as srv, RawClient(srv.socket) as c:
        c.start()
        c.request(0, offset, length, cookie=9)
        got = chunks(c, 9)
    assert [(flags, rtype) for flags, rtype, _ in got] == [(0, OFFSET_DATA), (DONE, NONE)], where
    (at,) = struct.unpack(">Q", got[0][2][:8])
    assert at == offset
    assert got[0][2][8:] == expected[offset : offset + length]
    assert got[1][2] == b""


def test_large_read_from_a_qcow2_backing_leaves_from_the_host_offset(tmp_path: Path) -> None:
    """A run of normal clusters of a local qcow2 backing lies in one file, at its
    host offset (qemu-img map, the referee, says where; not the guest offset):
    it leaves with sendfile, as data then done, with the backing's bytes."""
    data = b"".join(pattern(0x40 + i, CLUSTER) for i in range(8))
    (tmp_path / "g.src").write_bytes(data)
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", tmp_path / "g.src", tmp_path / "g.qcow2")
    offset, length = 2 * CLUSTER, 4 * CLUSTER
    maps = qemu_map(tmp_path / "g.qcow2")
    (run,) = [e for e in maps if e["start"] <= offset < e["start"] + e["length"]]
    assert run["data"] and run["start"] + run["length"] >= offset + length, run
    assert run["offset"] + offset - run["start"] != offset, "host and guest offsets differ"
    path = tmp_path / "q.add-cow"
    addcow.create(path, image_file="q.raw", backing_file="g.qcow2", backing_format="qcow2")
    with served(tmp_path, path) as srv, RawClient(srv.socket) as c:
        c.start()
        c.request(0, offset, length, cookie=4)
        got = chunks(c, 4)
    assert [(flags, rtype) for flags, rtype, _ in got] == [(0, OFFSET_DATA), (DONE, NONE)]
    assert got[0][2] == struct.pack(">Q", offset) + data[offset : offset + length]


def test_large_read_starting_in_a_backing_hole_is_sent_as_a_hole(
    tmp_path: Path, image: Path
) -> None:
    offset, length = 8 * CLUSTER, 4 * CLUSTER  # backing clusters 8-11: a file hole
    with served(tmp_path, image) as srv, RawClient(srv.socket) as c:
        c.start()
        c.request(0, offset, length, cookie=3)
        got = chunks(c, 3)
    assert [rtype for _, rtype, _ in got] == [OFFSET_HOLE]
    assert struct.unpack(">QI", got[0][2]) == (offset, length)


def test_large_read_with_simple_replies(tmp_path: Path, image: Path) -> None:
    expected = content(image)
    with served(tmp_path, image) as srv, RawClient(srv.socket) as c:
        c.start(structured=False)
        c.request(0, 2 * CLUSTER, 4 * CLUSTER, cookie=5)
        assert c.simple_reply() == (0, 5)
        assert c.recv_exact(4 * CLUSTER) == expected[2 * CLUSTER : 6 * CLUSTER]


def test_pipelined_large_reads_while_the_client_does_not_read(
    tmp_path: Path, image: Path
) -> None:
    """The socket fills up; every reply still arrives whole, with its own bytes."""
    expected = content(image)
    ranges = [((i * 3) % 13 * CLUSTER, 3 * CLUSTER) for i in range(200)]
    done: dict[int, bytes] = {}
    with served(tmp_path, image) as srv, RawClient(srv.socket) as c:
        c.start()
        for cookie, (offset, length) in enumerate(ranges):
            c.request(0, offset, length, cookie=cookie)
        time.sleep(0.5)  # 200 x 192 KiB: more than the socket holds
        parts: dict[int, bytearray] = {}
        while len(done) < len(ranges):
            # Chunks of different replies may interleave: collect them by cookie.
            _kind, flags, rtype, cookie, payload = c.reply()
            assert cookie not in done, f"chunk after DONE for cookie {cookie}"
            offset, length = ranges[cookie]
            part = parts.setdefault(cookie, bytearray(length))
            if rtype == OFFSET_DATA:
                (at,) = struct.unpack(">Q", payload[:8])
                part[at - offset : at - offset + len(payload) - 8] = payload[8:]
            else:
                assert rtype in (OFFSET_HOLE, NONE), rtype
            if flags & DONE:
                done[cookie] = bytes(parts.pop(cookie))
    for cookie, (offset, length) in enumerate(ranges):
        assert done[cookie] == expected[offset : offset + length], cookie


# -- the server in this process, with sendfile made to fall short ---------------------------


def test_socket_full_mid_sendfile_sends_the_rest_from_a_buffer(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = content(image)
    calls = []

    def short_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        if len(calls) % 2:
            return os.sendfile(out_fd, in_fd, offset, min(count, 1000))
        raise BlockingIOError(errno.EAGAIN, "full")

    monkeypatch.setattr(routing.os, "sendfile", short_sendfile)
    srv = InProcessServer(image, tmp_path / "p.sock")
    try:
        with RawClient(srv.sock) as c:
            c.start()
            for cookie, first in enumerate((1, 12, 0)):
                c.request(0, first * CLUSTER, 4 * CLUSTER, cookie=cookie)
                got = chunks(c, cookie)
                (at,) = struct.unpack(">Q", got[0][2][:8])
                data = got[0][2][8:]
                assert (at, got[-1][0]) == (first * CLUSTER, DONE)
                assert data == expected[first * CLUSTER : (first + 4) * CLUSTER]
    finally:
        srv.stop()
    assert calls, "sendfile was never used"


def test_failure_after_the_reply_began_closes_only_that_connection(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = content(image)
    srv = InProcessServer(image, tmp_path / "p.sock")
    try:
        real_readinto = srv.image.readinto
        failing = threading.Event()

        def readinto(buffer: bytearray, offset: int) -> int:
            if failing.is_set():
                raise AddCowIOError(f"{srv.image.image_path}: read: [Errno 5] injected")
            return real_readinto(buffer, offset)

        def no_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
            raise BlockingIOError(errno.EAGAIN, "full")

        monkeypatch.setattr(srv.image, "readinto", readinto)
        monkeypatch.setattr(routing.os, "sendfile", no_sendfile)
        with RawClient(srv.sock) as c:
            c.start()
            failing.set()
            c.request(0, CLUSTER, 4 * CLUSTER, cookie=1)
            # The chunk header and the offset went out, then nothing can follow.
            head = struct.unpack(">IHHQIQ", c.recv_exact(28))
            assert head == (STRUCTURED_REPLY_MAGIC, 0, OFFSET_DATA, 1, 8 + 4 * CLUSTER, CLUSTER)
            assert c.closed_by_server()
        failing.clear()
        monkeypatch.undo()
        with RawClient(srv.sock) as c:
            c.start()
            assert c.read(0, SIZE) == expected
    finally:
        srv.stop()
