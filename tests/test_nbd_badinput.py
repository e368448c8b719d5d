"""Hostile input on raw sockets against a real ``addcow serve``.

Every case sends bytes a well-behaved client never would, checks the reply the
spec prescribes (or that the server hangs up where the spec lets it), and then
checks that the server still serves a fresh connection and that the image
holds exactly what it held before (plus any valid write of the test).

The image: conftest's 1 MiB ``base_raw`` under a fresh add-cow image with
cluster 0 written as 0xA0; everything else reads from the backing.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern
from nbd_util import IHAVEOPT, RawClient, Server, served

import addcow

SIZE = 16 * CLUSTER
MAX_BLOCK = 32 << 20
EPERM, EINVAL, ENOSPC = 1, 22, 28
REP_ACK, REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_TOO_BIG = 1, 2**31 + 1, 2**31 + 3, 2**31 + 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 4, 6, 7


@pytest.fixture
def image(tmp_path: Path, base_raw: Path) -> Path:
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file=base_raw, backing_format="raw")
    with addcow.open(path) as img:
        img.write(pattern(0xA0, CLUSTER), 0)
    return path


@pytest.fixture
def before(image: Path) -> bytes:
    with addcow.open(image, readonly=True) as img:
        return img.read(0, img.size)


@pytest.fixture
def server(tmp_path: Path, image: Path, before: bytes) -> Iterator[Server]:
    with served(tmp_path, image) as srv:
        yield srv
        assert healthy(srv) == before
    with addcow.open(image, readonly=True) as img:
        assert img.read(0, img.size) == before  # intact on disk after shutdown


def healthy(srv: Server) -> bytes:
    """A fresh, well-behaved connection: the whole disk as the server reads it."""
    with RawClient(srv.socket) as c:
        c.start()
        return c.read(0, SIZE, cookie=42)


def test_control_a_good_client_reads_the_image(server: Server, before: bytes) -> None:
    assert before[:CLUSTER] == pattern(0xA0, CLUSTER)
    assert healthy(server) == before


# -- handshake ----------------------------------------------------------------------------


def test_unknown_client_flags_close_the_connection(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags(0x49484156)  # someone sending IHAVEOPT before the flags
        assert c.closed_by_server()


def test_wrong_option_magic_closes_the_connection(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags()
        c.option(3, magic=0x1234)
        assert c.closed_by_server()
    assert "option magic" in server.stderr()


def test_unknown_option_is_unsupported_and_the_handshake_goes_on(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags()
        c.option(0xBAD, b"payload")
        assert c.option_reply() == (0xBAD, REP_ERR_UNSUP, b"option 2989 is not supported")
        c.option(8)
        assert c.option_reply()[1] == REP_ACK
        c.option(7, struct.pack(">IH", 0, 0))
        while (reply := c.option_reply())[1] != REP_ACK:
            assert reply[1] == 3
        assert c.read(0, 8) == pattern(0xA0, 8)


def test_oversized_option_payload_is_refused_too_big(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags()
        c.option(7, bytes(1 << 20))  # a 1 MiB "GO"
        option, reply, message = c.option_reply()
        assert (option, reply) == (7, REP_ERR_TOO_BIG) and b"limit" in message
        c.option(3)  # haggling goes on: LIST
        assert c.option_reply()[1] == 2


def test_oversized_export_name_in_go_is_invalid(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags()
        c.option(7, struct.pack(">I", 5000) + b"n" * 5000 + b"\0\0")
        assert c.option_reply()[1] == REP_ERR_INVALID


def test_oversized_export_name_option_closes_the_connection(server: Server) -> None:
    # NBD_OPT_EXPORT_NAME cannot carry an error: the server must terminate.
    with RawClient(server.socket) as c:
        c.greeting()
        c.client_flags()
        c.sock.sendall(struct.pack(">QII", IHAVEOPT, 1, 1 << 30))
        assert c.closed_by_server()


# -- transmission --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "offset", "length", "error"),
    [
        (CMD_READ, SIZE - 512, 1024, EINVAL),
        (CMD_READ, (1 << 64) - 512, 1024, EINVAL),
        (CMD_TRIM, SIZE, 1, EINVAL),
        (CMD_WRITE_ZEROES, SIZE - 1, 2, ENOSPC),
        (CMD_BLOCK_STATUS, SIZE, 1, EINVAL),
        (CMD_READ, 0, MAX_BLOCK + 1, EINVAL),
        (0x7F, 0, 0, EINVAL),
    ],
    ids=["read", "read-wrapping", "trim", "write-zeroes", "block-status", "read-too-long",
         "unknown-command"],
)
def test_requests_refused_with_the_spec_errors(
    server: Server, command: int, offset: int, length: int, error: int
) -> None:
    with RawClient(server.socket) as c:
        c.start(contexts=("base:allocation",))
        c.request(command, offset, length, cookie=77)
        _kind, flags, rtype, cookie, payload = c.reply()
        assert (flags, rtype, cookie) == (1, 0x8001, 77)  # structured ERROR, done
        assert struct.unpack(">I", payload[:4])[0] == error
        assert c.read(0, 4) == pattern(0xA0, 4)  # the connection goes on


def test_write_past_the_end_is_enospc_and_writes_nothing(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.start()
        c.request(CMD_WRITE, SIZE - 4, 8, data=b"overflow")
        assert c.error_of() == ENOSPC
        assert c.read(SIZE - 4, 4) == pattern(0x1F, 4)


def test_write_over_the_maximum_block_size_is_refused_and_its_payload_skipped(
    server: Server,
) -> None:
    with RawClient(server.socket, timeout=60) as c:
        c.start()
        c.request(CMD_WRITE, 0, MAX_BLOCK + 4096, data=b"\xee" * (MAX_BLOCK + 4096))
        assert c.error_of() == EINVAL
        assert c.read(0, 4) == pattern(0xA0, 4)


def test_simple_replies_for_structured_only_requests(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.start(structured=False)
        c.request(CMD_BLOCK_STATUS, 0, 512, cookie=5)
        assert c.simple_reply() == (EINVAL, 5)
        c.request(CMD_READ, 0, 512, flags=1 << 2, cookie=6)  # DF without SEND_DF
        assert c.simple_reply() == (EINVAL, 6)
        c.request(CMD_READ, 0, 4, cookie=7)
        assert c.simple_reply() == (0, 7)
        assert c.recv_exact(4) == pattern(0xA0, 4)


def test_bad_request_magic_closes_the_connection(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.start()
        c.request(CMD_READ, 0, 512, magic=0x12560953)
        assert c.closed_by_server()


@pytest.mark.parametrize("cut", [10, 28 + 1000], ids=["mid-header", "mid-payload"])
def test_disconnect_in_the_middle_of_a_request(server: Server, cut: int) -> None:
    with RawClient(server.socket) as c:
        c.start()
        header = struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, 4096)
        c.sock.sendall((header + b"\xdd" * 4096)[:cut])
    deadline = time.monotonic() + 10
    while "in the middle of" not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "in the middle of" in server.stderr()
    # The fixture checks that nothing of the partial write reached the image.


def test_disc_then_close(server: Server) -> None:
    with RawClient(server.socket) as c:
        c.start()
        c.request(CMD_DISC)
        assert c.closed_by_server()


def test_read_only_export_refuses_writes_with_eperm(
    tmp_path: Path, image: Path, before: bytes
) -> None:
    with served(tmp_path, image, args=("--read-only",)) as srv, RawClient(srv.socket) as c:
        flags = c.start()
        assert flags & 2  # NBD_FLAG_READ_ONLY
        c.request(CMD_WRITE, 0, 4, data=b"nope")
        assert c.error_of() == EPERM
        c.request(CMD_TRIM, 0, CLUSTER)
        assert c.error_of() == EPERM
        c.request(CMD_WRITE_ZEROES, 0, CLUSTER)
        assert c.error_of() == EPERM
        assert c.read(0, SIZE) == before


def test_client_that_never_reads_replies_stalls_only_itself(server: Server) -> None:
    greedy = RawClient(server.socket)
    greedy.start()
    # 4096 reads of the whole 1 MiB disk (4 GiB of replies), never read back.
    header = b"".join(
        struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, i, 0, SIZE) for i in range(4096)
    )
    greedy.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(header) and time.monotonic() < deadline:
        try:
            sent += greedy.sock.send(header[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    # Others are still served while the greedy client's replies pile up...
    assert healthy(server)[:4] == pattern(0xA0, 4)
    # ...and the server's memory stays bounded.
    rss_kib = _rss_kib(server.proc.pid)
    assert rss_kib < 400 * 1024, f"server RSS {rss_kib} KiB"
    # When it goes away, what it left in the pipe is dropped, not run into memory.
    greedy.close()
    time.sleep(1)
    assert healthy(server)[:4] == pattern(0xA0, 4)
    rss_kib = _rss_kib(server.proc.pid)
    assert rss_kib < 400 * 1024, f"server RSS {rss_kib} KiB after the client left"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_bad_clients_in_parallel_leave_the_server_serving(server: Server) -> None:
    clients = []
    for i in range(20):
        c = RawClient(server.socket)
        c.greeting()
        c.sock.sendall(os.urandom(64) if i % 2 else b"\0\0\0\3" + os.urandom(64))
        clients.append(c)
    assert healthy(server)[:4] == pattern(0xA0, 4)
    for c in clients:
        c.close()
