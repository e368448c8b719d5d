"""The NBD backing store (addcow.stores.remote.nbd) against real servers and hostile ones.

Real peers: qemu-nbd (raw files over Unix sockets and TCP, TLS, multi-conn,
killed and restarted), nbdkit (pattern, memory, sparse-random, --no-sr, the
error and delay filters, TLS) and ``addcow serve --read-only``. A small
Python server in this file sends broken replies; each must end in
RemoteReplyError or RemoteBackingError within a timeout.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import CLUSTER, require_tool
from nbd_util import InProcessServer, RawClient, ddrescue_mapfile, served
from qcow2_util import qemu_img, qemu_io
from tls_util import make_certs

import addcow
from addcow.errors import (
    AddCowError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReadError,
    RemoteReplyError,
)
from addcow.nbd import wire
from addcow.serve import loop_reader as loop_store
from addcow.serve.loop_reader import LoopReader
from addcow.stores import Extent
from addcow.stores.base import remote_route
from addcow.stores.remote import RetryPolicy
from addcow.stores.remote import nbd as nbd_store
from addcow.stores.remote.nbd import NBDStore
from addcow.stores.remote.uri import parse_nbd

KiB = 1 << 10
MiB = 1 << 20


# -- servers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], sock: Path | None, port: int | None,
                    timeout: float = 15) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.args}")
        with suppress(OSError):
            if sock is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server not listening within {timeout}s: {proc.args}")
        time.sleep(0.02)


@contextmanager
def server(cmd: list[str], sock: Path | None = None, port: int | None = None
           ) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """Run a server in the foreground until the block ends (killed, always reaped)."""
    if sock is not None:
        sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(proc, sock, port)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def qemu_nbd(path: Path, sock: Path, *args: str) -> list[str]:
    return [require_tool("qemu-nbd"), "-r", "-t", "-f", "raw", "-k", str(sock), *args, str(path)]


def nbdkit(sock: Path, *args: str) -> list[str]:
    return [require_tool("nbdkit"), "-f", "-U", str(sock), *args]


def unix_uri(sock: Path, export: str = "", scheme: str = "nbd+unix") -> str:
    return f"{scheme}:///{export}?socket={sock}"


def random_file(path: Path, size: int, holes: tuple[tuple[int, int], ...] = ()) -> bytes:
    data = bytearray(os.urandom(size))
    for start, length in holes:
        data[start : start + length] = bytes(length)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        for start, length in (*holes, (size, 0)):
            f.seek(pos)
            f.write(data[pos:start])
            pos = start + length
    return bytes(data)


def read(store: NBDStore, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert store.readinto(memoryview(buf), offset) == length
    return bytes(buf)


def check_reads(store: NBDStore, data: bytes) -> None:
    size = len(data)
    padded = data + bytes(8192)
    for offset, length in ((0, size), (1, 4095), (12345, 65537), (size - 100, 100),
                           (size - 7, 4000), (size + 10, 300), (4096 * 3 + 5, 1)):  # fmt: skip
        assert read(store, offset, length) == padded[offset : offset + length], (offset, length)


# -- URIs ---------------------------------------------------------------------------------


def test_parse_nbd_accepts_doc_uri_examples() -> None:
    p = parse_nbd
    assert p("nbd://example.com/disk")[1:] == (False, "example.com", 10809, None, "disk")
    assert p("nbd://example.com")[-1] == "" and p("nbd://example.com/")[-1] == ""
    assert p("nbd://example.com//disk").export == "/disk"
    assert p("nbd://example.com/hello%20world").export == "hello world"
    assert p("nbds://[::1]:1234/x")[1:] == (True, "::1", 1234, None, "x")
    assert p("nbd+unix:///disk?socket=sock")[1:] == (False, None, None, "sock", "disk")
    assert p("nbds+unix:///?socket=/run/a%20b.sock").socket == "/run/a b.sock"


@pytest.mark.parametrize("uri", [
    "http://example.com/x", "nbd:///x", "nbd://example.com:0/x", "nbd://example.com:99999/",
    "nbd://user@example.com/x", "nbd://example.com/x?socket=/s", "nbd://h/x#frag",
    "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd+unix:///x?socket=/s&socket=/t",
    "nbds+unix:///x?socket=/s&tls-certificates=/tmp/evil", "nbds://h/x?tls-certificates=/d",
    "nbd+unix:///x?socket=/s&tls-verify-peer=0", "nbd://h/%ff", "nbd://h/a%00b",
    "nbd+unix:///x?socket=",
])  # fmt: skip
def test_parse_nbd_refuses(uri: str) -> None:
    with pytest.raises(RemoteBackingError, match=r"expected .*found"):
        parse_nbd(uri)


def test_nbds_needs_a_certificate_directory(tmp_path: Path) -> None:
    with pytest.raises(RemoteBackingError, match="TLS certificate directory"):
        NBDStore.open(unix_uri(tmp_path / "none.sock", scheme="nbds+unix"))
    with pytest.raises(RemoteBackingError, match=r"ca-cert\.pem"):
        NBDStore.open(unix_uri(tmp_path / "none.sock", scheme="nbds+unix"),
                      tls_certificates=str(tmp_path))  # fmt: skip


def test_missing_server_and_export_fail_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteBackingError) as info:
        NBDStore.open(unix_uri(tmp_path / "none.sock"))
    assert info.value.errno == errno.EIO and time.monotonic() - start < 5
    sock = tmp_path / "q.sock"
    raw = tmp_path / "a.raw"
    random_file(raw, 65536)
    with server(qemu_nbd(raw, sock, "-x", "golden"), sock), \
            pytest.raises(RemoteBackingError, match="expected an export named 'other'"):
        NBDStore.open(unix_uri(sock, "other"))


# -- real servers -------------------------------------------------------------------------


def test_qemu_nbd_raw_over_unix_and_tcp(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    data = random_file(raw, 3 * MiB + 1536, holes=((MiB, 256 * 1024),))
    sock = tmp_path / "q.sock"
    with server(qemu_nbd(raw, sock), sock), NBDStore.open(unix_uri(sock)) as store:
        assert store.size == store.identity() == len(data)
        assert store.file_ids() == set() and store.route(0, 1) == remote_route(store, 0)
        check_reads(store, data)
    port = _free_port()
    cmd = [require_tool("qemu-nbd"), "-r", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
           str(raw)]  # fmt: skip
    with server(cmd, port=port), NBDStore.open(f"nbd://127.0.0.1:{port}") as store:
        check_reads(store, data)


def test_block_status_of_sparse_file(tmp_path: Path) -> None:
    raw = tmp_path / "s.raw"
    data = random_file(raw, 4 * MiB, holes=((MiB, MiB), (3 * MiB, MiB)))
    sock = tmp_path / "q.sock"
    with server(qemu_nbd(raw, sock), sock), NBDStore.open(unix_uri(sock)) as store:
        extents = list(store.block_status_at(0, 5 * MiB, 1))
        assert sum(e.length for e in extents) == 5 * MiB
        assert all(a.offset + a.length == b.offset for a, b in pairwise(extents))
        assert all(e.depth == 1 and e.host_offset is None for e in extents)
        for e in extents:
            if e.offset >= 4 * MiB:
                assert not e.present and e.zero
            elif e.zero:
                assert data[e.offset : e.offset + e.length] == bytes(e.length)
        zero = sum(e.length for e in extents if e.present and e.zero)
        assert zero == 2 * MiB
        # An unaligned window inside.
        window = list(store.block_status_at(MiB - 100, 300, 0))
        assert [(e.offset, e.length, e.zero) for e in window] == [
            (MiB - 100, 100, False), (MiB, 200, True)]  # fmt: skip


def test_nbdkit_sparse_random_block_status_matches_data(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    cmd = nbdkit(sock, "sparse-random", "size=8M", "seed=7", "runlength=131072", "percent=40")
    with server(cmd, sock), \
            NBDStore.open(unix_uri(sock)) as store:  # fmt: skip
        extents = list(store.block_status_at(0, store.size, 0))
        assert sum(e.length for e in extents) == 8 * MiB
        assert any(e.zero for e in extents) and any(not e.zero for e in extents)
        content = read(store, 0, store.size)
        for e in extents:
            chunk = content[e.offset : e.offset + e.length]
            if e.zero:
                assert chunk == bytes(e.length)
            else:
                assert chunk != bytes(e.length)


def test_nbdkit_pattern_and_memory(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    with server(nbdkit(sock, "pattern", "size=2M"), sock), \
            NBDStore.open(unix_uri(sock)) as store:  # fmt: skip
        expected = b"".join(struct.pack(">Q", i * 8) for i in range(2 * MiB // 8))
        check_reads(store, expected)
    with server(nbdkit(sock, "memory", "size=1M"), sock), \
            NBDStore.open(unix_uri(sock)) as store:  # fmt: skip
        check_reads(store, bytes(MiB))
        assert all(e.zero for e in store.block_status_at(0, MiB, 0))


def test_server_without_structured_replies_falls_back(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    with server(nbdkit(sock, "--no-sr", "pattern", "size=1M"), sock), \
            NBDStore.open(unix_uri(sock)) as store:  # fmt: skip
        assert not store.structured
        expected = b"".join(struct.pack(">Q", i * 8) for i in range(MiB // 8))
        check_reads(store, expected)
        assert list(store.block_status_at(10, 2 * MiB, 2)) == [
            Extent(10, MiB - 10, 2, True, False, None), Extent(MiB, MiB + 10, 2, False, True, None)]


def test_addcow_serve_read_only(tmp_path: Path, base_raw: Path) -> None:
    image = tmp_path / "img.add-cow"
    addcow.create(image, image_file="d.raw", backing_file=base_raw, backing_format="raw")
    with served(tmp_path, image, args=("--read-only",)) as srv, \
            NBDStore.open(srv.uri) as store:  # fmt: skip
        check_reads(store, base_raw.read_bytes())
        zero = [e for e in store.block_status_at(0, store.size, 0) if e.zero]
        assert sum(e.length for e in zero) >= 4 * 65536


@pytest.mark.parametrize("shared", [None, "4"])
def test_multi_conn_only_when_advertised(tmp_path: Path, shared: str | None) -> None:
    raw = tmp_path / "a.raw"
    data = random_file(raw, 4 * MiB)
    sock = tmp_path / "q.sock"
    args = ("-e", shared) if shared else ()
    # qemu-nbd 7.2 advertises multi-conn on a read-only export that it shares.
    with server(qemu_nbd(raw, sock, *args), sock), \
            NBDStore.open(unix_uri(sock), connections=3) as store:  # fmt: skip
        assert store.multi_conn == bool(shared)
        barrier = threading.Barrier(6)

        def work(i: int) -> bool:
            barrier.wait(timeout=10)
            ok = True
            for j in range(20):
                off = (i * 977 + j * 65521) % (len(data) - 70000)
                ok &= read(store, off, 65536 + j) == data[off : off + 65536 + j]
            return ok

        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(work, range(6)))
        assert (1 < store.connections_open <= 3) if shared else store.connections_open == 1
    assert store.connections_open == 0


def test_error_reply_carries_errno_and_connection_survives(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    trigger = tmp_path / "fail"
    trigger.touch()
    cmd = nbdkit(sock, "--filter=error", "pattern", "size=1M", "error-pread=EIO",
                 "error-pread-rate=1", f"error-pread-file={trigger}")  # fmt: skip
    with server(cmd, sock), NBDStore.open(unix_uri(sock), retry=RetryPolicy(5)) as store:
        start = time.monotonic()
        with pytest.raises(RemoteBackingError) as info:
            read(store, 4096, 8192)
        assert info.value.errno == errno.EIO and "EIO" in str(info.value)
        assert not isinstance(info.value, RemoteReplyError)
        assert time.monotonic() - start < 3  # not retried
        trigger.unlink()
        assert read(store, 8, 8) == struct.pack(">Q", 8)
        assert store.connections_open == 1


def test_readahead_past_a_bad_range_does_not_fail_the_reads_before_it(tmp_path: Path) -> None:
    """Short sequential reads just before a range the server fails with EIO: their
    readahead window reaches into it, and is dropped; only reads that touch the
    range fail, with RemoteReadError."""
    raw = tmp_path / "a.raw"
    data = random_file(raw, 4 * MiB)
    mapfile = ddrescue_mapfile(tmp_path / "a.map", 4 * MiB, 2 * MiB, 2 * MiB + 65536)
    sock = tmp_path / "k.sock"
    cmd = nbdkit(sock, "--filter=ddrescue", "file", str(raw), f"ddrescue-mapfile={mapfile}")
    with server(cmd, sock), NBDStore.open(unix_uri(sock), retry=RetryPolicy(0)) as store:
        for off in range(2 * MiB - 16 * 4096, 2 * MiB, 4096):
            assert read(store, off, 4096) == data[off : off + 4096]
        with pytest.raises(RemoteReadError) as info:
            read(store, 2 * MiB, 4096)
        assert info.value.errno == errno.EIO
        assert read(store, 3 * MiB, 4096) == data[3 * MiB : 3 * MiB + 4096]
        assert store.connections_open == 1


def test_slow_server_times_out(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    cmd = nbdkit(sock, "--filter=delay", "memory", "size=1M", "delay-read=5")
    with server(cmd, sock), \
            NBDStore.open(unix_uri(sock), timeout=0.5, retry=RetryPolicy(0)) as store:  # fmt: skip
        start = time.monotonic()
        with pytest.raises(RemoteBackingError) as info:
            read(store, 0, 512)
        assert info.value.errno == errno.EIO and time.monotonic() - start < 3


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("certs")
    dirs = make_certs(work)
    wrong = work / "wrongca"
    wrong.mkdir()
    (wrong / "ca-cert.pem").write_bytes((work / "otherca.pem").read_bytes())
    dirs["wrongca"] = wrong
    return dirs


def test_tls_with_qemu_nbd(tmp_path: Path, certs: dict[str, Path]) -> None:
    raw = tmp_path / "a.raw"
    data = random_file(raw, MiB + 512)
    sock = tmp_path / "q.sock"
    tls = ("--object", f"tls-creds-x509,id=tls0,dir={certs['srv']},endpoint=server",
           "--tls-creds", "tls0")  # fmt: skip
    with server(qemu_nbd(raw, sock, *tls), sock):
        with NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                           tls_certificates=str(certs["client"])) as store:  # fmt: skip
            check_reads(store, data)
        with pytest.raises(RemoteBackingError, match="requires TLS"):
            NBDStore.open(unix_uri(sock))
        with pytest.raises(RemoteBackingError, match="expected a server certificate"):
            NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                          tls_certificates=str(certs["wrongca"]))  # fmt: skip
        # qemu-nbd checks client certificates: one from another CA is refused.
        with pytest.raises(RemoteBackingError):
            NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                          tls_certificates=str(certs["other"]))  # fmt: skip
    port = _free_port()
    cmd = [require_tool("qemu-nbd"), "-r", "-t", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
           *tls, str(raw)]  # fmt: skip
    uri = f"nbds://127.0.0.1:{port}/"
    with server(cmd, port=port), \
            NBDStore.open(uri, tls_certificates=str(certs["client"])) as store:  # fmt: skip
        check_reads(store, data)


def test_tls_with_nbdkit(tmp_path: Path, certs: dict[str, Path]) -> None:
    sock = tmp_path / "k.sock"
    cmd = nbdkit(sock, "--tls=require", f"--tls-certificates={certs['srv']}", "pattern",
                 "size=1M")  # fmt: skip
    with server(cmd, sock):
        with NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                           tls_certificates=str(certs["nocert"])) as store:  # fmt: skip
            assert read(store, MiB - 8, 16) == struct.pack(">Q", MiB - 8) + bytes(8)
            assert store.structured
        with pytest.raises(RemoteBackingError, match="requires TLS"):
            NBDStore.open(unix_uri(sock))
        with pytest.raises(RemoteBackingError, match="expected a server certificate"):
            NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                          tls_certificates=str(certs["wrongca"]))  # fmt: skip


# -- reconnection -------------------------------------------------------------------------


def test_reconnect_after_restart(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    data = random_file(raw, 2 * MiB)
    sock = tmp_path / "q.sock"
    with server(qemu_nbd(raw, sock), sock) as first:
        store = NBDStore.open(unix_uri(sock), retry=RetryPolicy(15), timeout=5)
        assert read(store, 0, 4096) == data[:4096]
        first.send_signal(signal.SIGKILL)
        first.wait()
    restarted: list[subprocess.Popen[bytes]] = []

    def restart() -> None:
        time.sleep(0.3)
        sock.unlink(missing_ok=True)
        restarted.append(subprocess.Popen(qemu_nbd(raw, sock), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        assert read(store, 12345, 100000) == data[12345:112345]  # waits for the restart
        check_reads(store, data)
    finally:
        thread.join()
        store.close()
        for proc in restarted:
            proc.kill()
            proc.wait()


def test_no_restart_fails_with_eio_after_the_delay(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    with server(nbdkit(sock, "memory", "size=8M"), sock) as proc:
        store = NBDStore.open(unix_uri(sock), retry=RetryPolicy(1))
        assert read(store, 0, 10) == bytes(10)
        proc.kill()
        proc.wait()
    start = time.monotonic()
    with pytest.raises(RemoteBackingError) as info:
        read(store, 6 * MiB, 10)  # past the first read's readahead window: the network
    elapsed = time.monotonic() - start
    assert info.value.errno == errno.EIO and "within 1 s" in str(info.value)
    assert 0.9 <= elapsed < 4
    with pytest.raises(RemoteBackingError):
        list(store.block_status_at(0, 10, 0))
    store.close()


def test_reconnect_to_a_changed_export(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    with server(nbdkit(sock, "memory", "size=1M"), sock) as proc:
        store = NBDStore.open(unix_uri(sock), retry=RetryPolicy(10))
        proc.kill()
        proc.wait()
    with server(nbdkit(sock, "memory", "size=2M"), sock), \
            pytest.raises(RemoteChangedError, match="golden image changed"):  # fmt: skip
        read(store, 0, 10)
    store.close()


# -- a hostile server ---------------------------------------------------------------------

Behaviour = Callable[[int, int, int, int], bytes | None]
SIZE = MiB


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return wire.OPTION_REPLY_HEADER.pack(wire.OPT_REPLY_MAGIC, option, reply, len(data)) + data


def _serve_one(conn: socket.socket, behave: Behaviour, structured: bool, flags: int) -> None:
    conn.sendall(wire.GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT, 3))
    _recv(conn, 4)
    while True:
        _magic, option, length = wire.OPTION_HEADER.unpack(_recv(conn, 16))
        _recv(conn, length)
        if option == wire.OPT_STRUCTURED_REPLY:
            conn.sendall(_option_reply(option, wire.REP_ACK if structured
                                       else wire.REP_ERR_UNSUP))  # fmt: skip
        elif option == wire.OPT_SET_META_CONTEXT:
            conn.sendall(_option_reply(option, wire.REP_META_CONTEXT,
                                       struct.pack(">I", 1) + b"base:allocation")
                         + _option_reply(option, wire.REP_ACK))  # fmt: skip
        elif option == wire.OPT_GO:
            info = wire.INFO_EXPORT_PAYLOAD.pack(wire.INFO_EXPORT, SIZE, flags)
            conn.sendall(_option_reply(option, wire.REP_INFO, info)
                         + _option_reply(option, wire.REP_ACK))  # fmt: skip
            break
        else:
            conn.sendall(_option_reply(option, wire.REP_ERR_UNSUP))
    while True:
        _m, _f, command, cookie, offset, length = wire.REQUEST_HEADER.unpack(_recv(conn, 28))
        if command == wire.CMD_DISC:
            return
        out = behave(command, cookie, offset, length)
        if out is None:
            return
        conn.sendall(out)


@contextmanager
def hostile(tmp_path: Path, behave: Behaviour, structured: bool = True,
            flags: int = wire.FLAG_HAS_FLAGS | wire.FLAG_READ_ONLY) -> Iterator[str]:  # fmt: skip
    path = tmp_path / "hostile.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn, suppress(OSError, EOFError):
            conn.settimeout(5)
            _serve_one(conn, behave, structured, flags)

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            served.append(threading.Thread(target=one, args=(conn,), daemon=True))
            served[-1].start()

    served: list[threading.Thread] = []
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield unix_uri(path)
    finally:
        stop.set()
        thread.join(timeout=10)
        for t in served:
            t.join(timeout=10)
        listener.close()


def chunk(cookie: int, kind: int, payload: bytes, flags: int = wire.REPLY_FLAG_DONE) -> bytes:
    return wire.CHUNK_HEADER.pack(wire.STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                  len(payload)) + payload  # fmt: skip


def data(cookie: int, offset: int, length: int, flags: int = wire.REPLY_FLAG_DONE) -> bytes:
    return chunk(cookie, wire.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", offset) + bytes(length),
                 flags)  # fmt: skip


def status(cookie: int, *extents: int, context: int = 1) -> bytes:
    payload = struct.pack(">I", context) + b"".join(struct.pack(">II", e, 0) for e in extents)
    return chunk(cookie, wire.REPLY_TYPE_BLOCK_STATUS, payload)


def simple(cookie: int, error: int = 0) -> bytes:
    return wire.SIMPLE_REPLY_HEADER.pack(wire.SIMPLE_REPLY_MAGIC, error, cookie)


BROKEN_READS: dict[str, Behaviour] = {
    "wrong cookie": lambda cmd, c, off, n: data(c + 1, off, n),
    "bad magic": lambda cmd, c, off, n: b"\xde\xad\xbe\xef" + bytes(16),
    "oversized chunk": lambda cmd, c, off, n: wire.CHUNK_HEADER.pack(
        wire.STRUCTURED_REPLY_MAGIC, 1, wire.REPLY_TYPE_OFFSET_DATA, c, 0xFFFFFFFF),
    "oversized error chunk": lambda cmd, c, off, n: wire.CHUNK_HEADER.pack(
        wire.STRUCTURED_REPLY_MAGIC, 1, wire.REPLY_TYPE_ERROR, c, 0xFFFFFFF0),
    "data outside request": lambda cmd, c, off, n: data(c, off + 1, n),
    "data before request": lambda cmd, c, off, n: data(c, off - 1, n),
    "overlapping data": lambda cmd, c, off, n: data(c, off, n, 0) + data(c, off, 1),
    "short coverage": lambda cmd, c, off, n: data(c, off, n - 1),
    "empty hole": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_OFFSET_HOLE,
                                               struct.pack(">QI", off, 0)),
    "simple reply to read": lambda cmd, c, off, n: simple(c) + bytes(n),
    "error without errno": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_ERROR,
                                                        struct.pack(">IH", 0, 0)),
    "error message too long": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_ERROR,
                                                           struct.pack(">IH", 5, 100) + b"x"),
    "unknown chunk type": lambda cmd, c, off, n: chunk(c, 77, b""),
    "status to a read": lambda cmd, c, off, n: status(c, n),
    "none with payload": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_NONE, b"x"),
    "chunk flood": lambda cmd, c, off, n: (data(c, off, n, 0)
                                           + chunk(c, wire.REPLY_TYPE_ERROR,
                                                   struct.pack(">IH", 5, 0), 0) * 3000),
}  # fmt: skip


def _answer_when(count: int) -> Behaviour:
    """A server that answers only once ``count`` reads have arrived, in reverse
    order, each byte of a read the low byte of its offset's 4 KiB page."""
    held: list[tuple[int, int, int]] = []

    def behave(command: int, cookie: int, offset: int, length: int) -> bytes:
        held.append((cookie, offset, length))
        if len(held) < count:
            return b""
        replies = [chunk(c, wire.REPLY_TYPE_OFFSET_DATA,
                         struct.pack(">Q", off) + page_bytes(off, n))
                   for c, off, n in reversed(held)]  # fmt: skip
        held.clear()
        return b"".join(replies)

    return behave


def page_bytes(offset: int, length: int) -> bytes:
    pages = b"".join(bytes([page & 0xFF]) * 4096 for page in range((offset + length + 4095) >> 12))
    return pages[offset : offset + length]


def test_requests_in_flight_together_on_one_connection(tmp_path: Path) -> None:
    """Eight threads' reads share one connection (no multi-conn) at once."""
    with hostile(tmp_path, _answer_when(8)) as uri, NBDStore.open(uri, timeout=5) as store:
        assert not store.multi_conn
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: read(store, i * 4096, 4096), range(8)))
        assert got == [bytes([i]) * 4096 for i in range(8)]
        assert store.connections_open == 1


def test_a_long_read_goes_out_as_requests_sent_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 MiB from one thread in requests of 256 KiB: four in flight at once."""
    monkeypatch.setattr(nbd_store, "READ_REQUEST", 256 * KiB)
    with hostile(tmp_path, _answer_when(4)) as uri, NBDStore.open(uri, timeout=5) as store:
        assert read(store, 0, SIZE) == page_bytes(0, SIZE)
        # Not aligned to the request size: four requests again, the first and last short.
        assert read(store, 100, 3 * 256 * KiB) == page_bytes(100, 3 * 256 * KiB)


@pytest.mark.parametrize("name", sorted(BROKEN_READS))
def test_hostile_read_replies(tmp_path: Path, name: str) -> None:
    with hostile(tmp_path, BROKEN_READS[name]) as uri, \
            NBDStore.open(uri, timeout=2, retry=RetryPolicy(0)) as store:  # fmt: skip
        start = time.monotonic()
        with pytest.raises(RemoteReplyError, match=r"expected .*found"):
            read(store, 4096, 1000)
        assert time.monotonic() - start < 3
        assert store.connections_open == 0  # the connection out of step was dropped


BROKEN_STATUS: dict[str, Behaviour] = {
    "past the request": lambda cmd, c, off, n: status(c, n, 512),
    "zero extent": lambda cmd, c, off, n: status(c, 0, n),
    "wrong context": lambda cmd, c, off, n: status(c, n, context=9),
    "two chunks": lambda cmd, c, off, n: (
        chunk(c, wire.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, n, 0), 0) + status(c, n)),
    "no status": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_NONE, b""),
    "ragged length": lambda cmd, c, off, n: chunk(c, wire.REPLY_TYPE_BLOCK_STATUS,
                                                  struct.pack(">IIH", 1, n, 0)),
    "huge status": lambda cmd, c, off, n: wire.CHUNK_HEADER.pack(
        wire.STRUCTURED_REPLY_MAGIC, 1, wire.REPLY_TYPE_BLOCK_STATUS, c, 0x7FFFFFFC),
    "simple success": lambda cmd, c, off, n: simple(c),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN_STATUS))
def test_hostile_block_status_replies(tmp_path: Path, name: str) -> None:
    with hostile(tmp_path, BROKEN_STATUS[name]) as uri, \
            NBDStore.open(uri, timeout=2, retry=RetryPolicy(0)) as store, \
            pytest.raises(RemoteReplyError, match=r"expected .*found"):  # fmt: skip
        list(store.block_status_at(4096, 8192, 0))


def test_hostile_compliant_oddities_are_accepted(tmp_path: Path) -> None:
    """Things proto.md allows: a last extent past the request, chunks out of order,
    holes, error chunks (reported with their errno), a short status reply."""

    def behave(cmd: int, c: int, off: int, n: int) -> bytes:
        if cmd == wire.CMD_BLOCK_STATUS:
            return status(c, 100) if off == 0 else status(c, n + 4096)
        if off == 8192:
            return chunk(c, wire.REPLY_TYPE_ERROR_OFFSET,
                         struct.pack(">IH", errno.ENOSPC, 2) + b"no" + struct.pack(">Q", off + 1))
        half = n // 2
        return (chunk(c, wire.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", off + half, n - half),
                      0) + data(c, off, half))  # fmt: skip

    with hostile(tmp_path, behave) as uri, NBDStore.open(uri, timeout=2) as store:
        assert read(store, 4096, 1000) == bytes(1000)
        assert [(e.offset, e.length) for e in store.block_status_at(0, 300, 0)] == [
            (0, 100), (100, 200)]  # fmt: skip
        with pytest.raises(RemoteBackingError) as info:
            read(store, 8192, 10)
        assert info.value.errno == errno.ENOSPC and "no (at offset 8193)" in str(info.value)
        assert not isinstance(info.value, RemoteReplyError)


def test_hostile_truncated_and_silent_replies(tmp_path: Path) -> None:
    """A reply cut short or never sent is a broken connection: EIO, not a hang."""
    cases: list[Behaviour] = [
        lambda cmd, c, off, n: data(c, off, n)[:-10],
        lambda cmd, c, off, n: None,
        lambda cmd, c, off, n: b"",
    ]
    for behave in cases:
        with hostile(tmp_path, behave) as uri, \
                NBDStore.open(uri, timeout=1, retry=RetryPolicy(0.5)) as store:  # fmt: skip
            start = time.monotonic()
            with pytest.raises(RemoteBackingError) as info:
                read(store, 0, 4096)
            assert info.value.errno == errno.EIO and time.monotonic() - start < 4
        (tmp_path / "hostile.sock").unlink()


def test_hostile_without_structured_replies(tmp_path: Path) -> None:
    def behave(cmd: int, c: int, off: int, n: int) -> bytes:
        return simple(c + 5) + bytes(n)

    with hostile(tmp_path, behave, structured=False) as uri, \
            NBDStore.open(uri, timeout=2) as store:  # fmt: skip
        assert not store.structured
        assert next(iter(store.block_status_at(0, 10, 0))).zero is False
        with pytest.raises(RemoteReplyError, match="cookie"):
            read(store, 0, 10)


# -- reads from an event loop (addcow.serve.loop_reader) ----------------------------------

MULTI_CONN = wire.FLAG_HAS_FLAGS | wire.FLAG_READ_ONLY | wire.FLAG_CAN_MULTI_CONN
Outcome = bytes | bool | AddCowError


def loop_reads(store: NBDStore, reads: list[tuple[int, int]]) -> list[Outcome] | None:
    """Send ``reads`` (offset, length) together on a LoopReader's connection, in one
    turn of an event loop; each read's bytes, False (its connection broke) or its
    error. None if the reader gets no connection."""

    async def main() -> list[Outcome] | None:
        reader = LoopReader(store)
        reader.start()
        if not await reader.opened():
            return None
        buffers = [bytearray(n) for _, n in reads]
        pairs = zip(buffers, reads, strict=True)
        started = [reader.read(memoryview(b), off) for b, (off, _) in pairs]
        assert all(f is not None for f in started)
        futures = [f for f in started if f is not None]
        await asyncio.wait_for(asyncio.wait(futures), 10)
        out: list[Outcome] = []
        for future, buf, (off, n) in zip(futures, buffers, reads, strict=True):
            try:
                out.append(bytes(buf) if loop_store.outcome(future, store.uri, off, n) else False)
            except AddCowError as exc:
                out.append(exc)
        broken = not reader.connected
        await reader.close()
        assert reader.read(memoryview(bytearray(512)), 0) is None  # closed
        return [*out, broken]

    return asyncio.run(main())


def test_loop_reads_from_qemu_nbd(tmp_path: Path) -> None:
    """Reads sent together from an event loop, against qemu-nbd with multi-conn."""
    raw = tmp_path / "a.raw"
    data = random_file(raw, 4 * MiB)
    sock = tmp_path / "q.sock"
    reads = [((i * 7919 * 4096) % (4 * MiB - 65536), 4096 * (1 + i % 16)) for i in range(64)]
    reads.append((0, MiB))
    with server(qemu_nbd(raw, sock, "-e", "4"), sock), NBDStore.open(unix_uri(sock)) as store:
        got = loop_reads(store, reads)
        assert got is not None
        assert got[:-1] == [data[off : off + n] for off, n in reads]
        assert got[-1] is False  # still connected at the end
        # Only what the store would send unchanged: inside the export, one request long.
        assert not store.loop_reads(4 * MiB - 4096, 8192)
        assert not store.loop_reads(0, 2 * MiB)
        assert store.loop_reads(4 * MiB - 4096, 4096)


def test_served_reads_of_a_qcow2_golden_image_over_nbd_go_out_from_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image over a qcow2 golden image that qemu-nbd exports as bytes (``-f raw``),
    served: a read of the golden image's normal clusters lies at their host offset
    in that NBD store, and the server sends it on its event loop's own connection to
    the store. Once that connection is open the store's own reads (watched) see
    none of them, only the compressed clusters' reads in the pool; qemu-img compare,
    the referee, finds the served disk equal to the golden image."""
    src, qcow2, sock = tmp_path / "g.src", tmp_path / "g.qcow2", tmp_path / "g.sock"
    src.write_bytes(b"".join(bytes([0x10 + i]) * CLUSTER for i in range(16)))
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", src, qcow2)
    qemu_io(qcow2, f"write -P 0x5a {4 * CLUSTER} {8 * CLUSTER}")  # 4-11 normal, the rest compressed
    store_reads: list[tuple[int, int]] = []
    store_readinto = NBDStore.readinto

    def watched(store: NBDStore, buffer: memoryview, offset: int) -> int:
        store_reads.append((offset, len(buffer)))
        return store_readinto(store, buffer, offset)

    monkeypatch.setattr(NBDStore, "readinto", watched)
    with server(qemu_nbd(qcow2, sock, "-e", "4"), sock):
        path = tmp_path / "d.add-cow"
        addcow.create(path, image_file="d.raw", backing_file=unix_uri(sock),
                      backing_format="qcow2")  # fmt: skip
        srv = InProcessServer(path, tmp_path / "s.sock")
        try:
            with RawClient(srv.sock) as c:
                c.start()
                # The first reads map the clusters (the L2 table comes through the
                # store) and open the loop's connection to the store holding them.
                deadline = time.monotonic() + 5
                while True:
                    seen = len(store_reads)
                    assert c.read(4 * CLUSTER, CLUSTER) == b"\x5a" * CLUSTER
                    if len(store_reads) == seen:
                        break
                    assert time.monotonic() < deadline, "the store still reads them"
                    time.sleep(0.02)
                for offset, length in ((5, 1), (6, 2), (8, 3.5)):
                    got = c.read(int(offset * CLUSTER), int(length * CLUSTER))
                    assert got == b"\x5a" * int(length * CLUSTER), offset
                assert len(store_reads) == seen, store_reads[seen:]
                c.read(15 * CLUSTER, CLUSTER)  # compressed: inflated in the pool
                assert len(store_reads) > seen
            uri = f"nbd+unix:///?socket={srv.sock}"
            got = subprocess.run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                                  uri, str(qcow2)], capture_output=True, text=True)  # fmt: skip
            assert got.returncode == 0 and "Images are identical" in got.stdout, got
        finally:
            srv.stop()


def test_loop_reads_only_with_multi_conn(tmp_path: Path) -> None:
    """A server that does not advertise multi-conn may take one client at a time: the
    reader never opens a connection of its own."""
    with hostile(tmp_path, lambda cmd, c, off, n: data(c, off, n)) as uri, \
            NBDStore.open(uri, timeout=2) as store:  # fmt: skip
        assert not store.multi_conn
        assert loop_reads(store, [(0, 4096)]) is None


def test_loop_reads_not_over_tls(tmp_path: Path, certs: dict[str, Path]) -> None:
    raw = tmp_path / "a.raw"
    random_file(raw, MiB)
    sock = tmp_path / "q.sock"
    tls = ("--object", f"tls-creds-x509,id=tls0,dir={certs['srv']},endpoint=server",
           "--tls-creds", "tls0")  # fmt: skip
    with server(qemu_nbd(raw, sock, "-e", "4", *tls), sock), \
            NBDStore.open(unix_uri(sock, scheme="nbds+unix"),
                          tls_certificates=str(certs["client"])) as store:  # fmt: skip
        assert store.multi_conn
        assert loop_reads(store, [(0, 4096)]) is None


def test_loop_reads_replies_out_of_order(tmp_path: Path) -> None:
    with hostile(tmp_path, _answer_when(8), flags=MULTI_CONN) as uri, \
            NBDStore.open(uri, timeout=5) as store:  # fmt: skip
        got = loop_reads(store, [(i * 4096, 4096) for i in range(8)])
        assert got == [bytes([i]) * 4096 for i in range(8)] + [False]


@pytest.mark.parametrize("name", sorted(BROKEN_READS))
def test_loop_reads_hostile_replies(tmp_path: Path, name: str) -> None:
    """A reply that breaks the protocol fails its read with RemoteReplyError, fast,
    and the connection is dropped."""
    with hostile(tmp_path, BROKEN_READS[name], flags=MULTI_CONN) as uri, \
            NBDStore.open(uri, timeout=2, retry=RetryPolicy(0)) as store:  # fmt: skip
        start = time.monotonic()
        got = loop_reads(store, [(4096, 1024)])
        assert time.monotonic() - start < 3
        assert got is not None and got[-1] is True
        assert isinstance(got[0], RemoteReplyError), got[0]
        assert re.search(r"expected .*found", str(got[0]))


def test_loop_reads_truncated_and_silent_replies(tmp_path: Path) -> None:
    """A reply cut short or never sent breaks the connection (after the store's
    timeout at most): the read ends with False, for the store to retry."""
    cases: list[Behaviour] = [
        lambda cmd, c, off, n: data(c, off, n)[:-10] if off else None,
        lambda cmd, c, off, n: b"",
    ]
    for behave in cases:
        with hostile(tmp_path, behave, flags=MULTI_CONN) as uri, \
                NBDStore.open(uri, timeout=1, retry=RetryPolicy(0)) as store:  # fmt: skip
            start = time.monotonic()
            assert loop_reads(store, [(4096, 4096)]) == [False, True]
            assert time.monotonic() - start < 4
        (tmp_path / "hostile.sock").unlink()


def test_loop_reads_error_replies_keep_the_connection(tmp_path: Path) -> None:
    def behave(cmd: int, c: int, off: int, n: int) -> bytes:
        if off == 8192:
            return chunk(c, wire.REPLY_TYPE_ERROR,
                         struct.pack(">IH", errno.ENOSPC, 2) + b"no")  # fmt: skip
        return data(c, off, n)

    with hostile(tmp_path, behave, flags=MULTI_CONN) as uri, \
            NBDStore.open(uri, timeout=2) as store:  # fmt: skip
        got = loop_reads(store, [(8192, 512), (0, 512)])
        assert got is not None
        error, ok, broken = got
        assert isinstance(error, RemoteReadError)
        assert error.errno == errno.ENOSPC and "ENOSPC: no" in str(error)
        assert ok == bytes(512) and broken is False
