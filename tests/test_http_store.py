"""HTTPStore: a raw golden image read with range requests, from a real nginx and a hostile server.

nginx (tests/http_util.py) serves the good cases: bytes at unaligned offsets
and past the end, https with a test CA, a location refusing HEAD, one
ignoring Range, a file replaced after pinning, the server going away, many
threads. QEMU's curl driver reads the same URL as referee. A tiny socket
server here answers with broken replies; each must end in a RemoteBackingError
(or its subclasses) quickly, with bounded memory.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import urllib3
from conftest import require_tool, run
from helpers import hide_package
from http_util import Nginx, nginx_server

from addcow.errors import AddCowError, RemoteBackingError, RemoteChangedError, RemoteReplyError
from addcow.stores import Extent, remote
from addcow.stores.base import POOL
from addcow.stores.remote import RetryPolicy
from addcow.stores.remote import http as http_store
from addcow.stores.remote.http import HTTPPin, HTTPStore

SIZE = 3 * 1024 * 1024 + 12345
SECRET = "X-Amz-Signature=5ecret"


def _data(size: int = SIZE, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Nginx, Path, bytes]]:
    root = tmp_path / "root"
    root.mkdir()
    data = _data()
    (root / "base.raw").write_bytes(data)
    with nginx_server(root, tmp_path / "nginx") as server:
        yield server, root, data


def _read(store: HTTPStore, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xee" * length)
    assert store.readinto(memoryview(buf), offset) == length
    return bytes(buf)


def _expected(data: bytes, offset: int, length: int) -> bytes:
    part = data[offset : offset + length]
    return part + bytes(length - len(part))


def _replace(path: Path, data: bytes, mtime_delta: float = 100.0) -> None:
    """Replace ``path`` atomically by ``data``, with another modification time."""
    old = path.stat().st_mtime
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.utime(tmp, (old + mtime_delta, old + mtime_delta))
    os.replace(tmp, path)


# -- nginx ---------------------------------------------------------------------------


def test_size_and_bytes(served: tuple[Nginx, Path, bytes],
                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    server, _root, data = served
    monkeypatch.setattr(http_store, "MAX_REQUEST", 300_000)  # exercise splitting
    store = HTTPStore.open(f"{server.url}/base.raw?{SECRET}")
    try:
        pin = store.identity()
        assert store.size == pin.size == SIZE
        assert pin.etag is not None and pin.etag.startswith('"')
        assert pin.last_modified is not None
        assert store.file_ids() == set()
        assert store.route(0, 512) == POOL
        for offset, length in [(0, 1), (1, 4095), (12345, 65537), (SIZE - 7, 7),
                               (SIZE - 100, 5000), (SIZE, 100), (SIZE + 5000, 3),
                               (777, 1_000_001), (0, SIZE + 10), (5, 0)]:  # fmt: skip
            assert _read(store, offset, length) == _expected(data, offset, length), (offset, length)
        # Short sequential reads: served through the readahead window.
        monkeypatch.undo()
        before = len(server.access_log())
        out = b"".join(
            _read(store, off, 4096) for off in range(1 << 20, (1 << 20) + (1 << 21), 4096)
        )
        assert out == data[1 << 20 : (1 << 20) + (1 << 21)]
        assert len(server.access_log()) - before <= 3
        assert list(store.block_status_at(100, SIZE, 1)) == [
            Extent(100, SIZE - 100, 1, True, False, None),
            Extent(SIZE, 100, 1, False, True, None),
        ]
        assert list(store.block_status_at(SIZE + 1, 10, 2)) == [
            Extent(SIZE + 1, 10, 2, False, True, None)
        ]
    finally:
        store.close()
    log = server.access_log()
    assert {entry[0] for entry in log} == {"GET"}
    assert all(re.fullmatch(r"bytes=\d+-\d+", entry[4]) for entry in log), log
    assert all(entry[2] == "206" for entry in log), log
    assert not any(SECRET in line for line in server.error_log().splitlines() if "error" in line)


def test_https_test_ca(tmp_path: Path) -> None:
    from tls_util import make_certs

    certs = tmp_path / "certs"
    certs.mkdir()
    creds = make_certs(certs)
    root = tmp_path / "root"
    root.mkdir()
    data = _data(200_000, seed=2)
    (root / "base.raw").write_bytes(data)
    with nginx_server(root, tmp_path / "nginx", tls=creds["srv"]) as server:
        url = f"{server.url}/base.raw"
        assert url.startswith("https://")
        store = HTTPStore.open(url, ca_file=str(creds["srv"] / "ca-cert.pem"))
        try:
            assert store.size == len(data)
            assert _read(store, 1234, 100_000) == data[1234:101234]
        finally:
            store.close()
        for ca in (str(certs / "otherca.pem"), None):  # another CA; the system store
            start = time.monotonic()
            with pytest.raises(RemoteBackingError, match="TLS") as info:
                HTTPStore.open(url, ca_file=ca, retry=RetryPolicy(5))
            assert time.monotonic() - start < 5  # not retried
            assert "certificate" in str(info.value)
        with pytest.raises(RemoteBackingError, match="cannot load the CA"):
            HTTPStore.open(url, ca_file=str(tmp_path / "missing.pem"))


def test_head_refused_still_works(served: tuple[Nginx, Path, bytes]) -> None:
    server, _root, data = served
    url = f"{server.url}/nohead/base.raw"
    assert urllib3.request("HEAD", url, retries=False).status == 405
    store = HTTPStore.open(url)
    try:
        assert store.size == SIZE
        assert _read(store, SIZE - 10, 20) == _expected(data, SIZE - 10, 20)
    finally:
        store.close()


def test_range_ignored_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    big = 256 * 1024 * 1024
    with open(root / "big.raw", "wb") as f:
        f.truncate(big)
    with nginx_server(root, tmp_path / "nginx") as server:
        start = time.monotonic()
        with pytest.raises(RemoteBackingError, match="ignores Range"):
            HTTPStore.open(f"{server.url}/norange/big.raw")
        assert time.monotonic() - start < 5
        deadline = time.monotonic() + 10
        while not server.access_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        (entry,) = server.access_log()
        assert entry[2] == "200"
        assert int(entry[3]) < big // 4, entry  # the client hung up: never the whole file


def test_changed_at_open(served: tuple[Nginx, Path, bytes]) -> None:
    server, root, data = served
    url = f"{server.url}/base.raw?{SECRET}"
    pin = HTTPStore.open(url).identity()
    HTTPStore.open(url, pin=pin).close()
    _replace(root / "base.raw", data[::-1])
    with pytest.raises(
        RemoteChangedError, match="changed since this image was created: ETag"
    ) as info:
        HTTPStore.open(url, pin=pin)
    assert SECRET not in str(info.value)
    assert pin.etag is not None and pin.etag in str(info.value)
    # Same ETag with another size: a pin that lies about the size.
    now = HTTPStore.open(url).identity()
    with pytest.raises(RemoteChangedError, match="size"):
        HTTPStore.open(url, pin=now._replace(size=now.size + 1))
    # Last-Modified only (nginx with etag off).
    lm_url = f"{server.url}/lastmod/base.raw"
    lm_pin = HTTPStore.open(lm_url).identity()
    assert lm_pin.etag is None and lm_pin.last_modified is not None
    _replace(root / "base.raw", data)
    with pytest.raises(RemoteChangedError, match="Last-Modified"):
        HTTPStore.open(lm_url, pin=lm_pin)
    with pytest.raises(RemoteBackingError, match="expected a pin with an ETag"):
        HTTPStore.open(url, pin=HTTPPin(SIZE, None, None))


@pytest.mark.parametrize("location", ["", "/lastmod"])
def test_changed_on_read(served: tuple[Nginx, Path, bytes], location: str) -> None:
    server, root, data = served
    store = HTTPStore.open(f"{server.url}{location}/base.raw?{SECRET}")
    try:
        assert _read(store, 100, 1000) == data[100:1100]
        _replace(root / "base.raw", data[::-1])
        buf = bytearray(b"\xee" * 50_000)
        with pytest.raises(
            RemoteChangedError, match="changed since this image was created"
        ) as info:
            store.readinto(memoryview(buf), 500_000)
        assert buf == b"\xee" * 50_000  # nothing of the new file reached the caller
        assert SECRET not in str(info.value)
        statuses = [entry[2] for entry in server.access_log()]
        assert statuses[-1] == "412", statuses
    finally:
        store.close()


def test_server_stopped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = _data(100_000, seed=3)
    (root / "base.raw").write_bytes(data)
    with nginx_server(root, tmp_path / "nginx") as server:
        store = HTTPStore.open(
            f"{server.url}/base.raw?{SECRET}", timeout=2.0, retry=RetryPolicy(1)
        )
        assert _read(store, 10, 10) == data[10:20]
    try:
        start = time.monotonic()
        window = r"failed after \d+ attempts \(.*\); expected the server back within 1 s"
        with pytest.raises(RemoteBackingError, match=window) as info:
            _read(store, 5000, 100)
        assert 1 <= time.monotonic() - start < 10
        assert SECRET not in str(info.value) and "5ecret" not in str(info.value)
        assert info.value.__cause__ is None
    finally:
        store.close()
    with pytest.raises(RemoteBackingError, match="finding the size"):
        HTTPStore.open(f"{server.url}/base.raw", timeout=1.0, retry=RetryPolicy(0.3))


def run_threads(store: HTTPStore, worker: Callable[[int], None], args: Iterable[int]) -> None:
    """``worker(arg)`` in a thread per arg, all joined; then the store is closed."""
    threads = [threading.Thread(target=worker, args=(arg,)) for arg in args]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        store.close()


def test_threads(served: tuple[Nginx, Path, bytes]) -> None:
    server, _root, data = served
    store = HTTPStore.open(f"{server.url}/base.raw")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            offset = rng.randrange(SIZE)
            for _ in range(40):
                if rng.random() < 0.5:  # a sequential run, to meet the readahead window
                    offset = min(offset + 4096, SIZE)
                else:
                    offset = rng.randrange(SIZE + 1000)
                length = rng.choice([1, 511, 4096, 65536, 300_000])
                assert _read(store, offset, length) == _expected(data, offset, length)
        except BaseException as exc:
            errors.append(exc)

    run_threads(store, worker, range(12))
    assert not errors, errors[0]


def test_each_thread_reads_ahead_in_its_own_window(served: tuple[Nginx, Path, bytes]) -> None:
    """Two threads each make short sequential reads of their own run, in lock step, as
    a stream's threads read the compressed clusters of their spans: each meets its own
    readahead window (one window for both would see neither run as sequential and
    send a request per read)."""
    server, _root, data = served
    store = HTTPStore.open(f"{server.url}/base.raw")
    step = threading.Barrier(2, timeout=30)
    runs = {0: 100, 1: 9 << 18}  # where each thread's run starts: 2.25 MiB apart
    got: dict[int, bytes] = {}

    def worker(k: int) -> None:
        parts = []
        for i in range(128):
            step.wait()
            parts.append(_read(store, runs[k] + i * 4096, 4096))
        got[k] = b"".join(parts)

    before = len(server.access_log())
    run_threads(store, worker, runs)
    for k, start in runs.items():
        assert got[k] == data[start : start + (1 << 19)]
    requests = len(server.access_log()) - before
    assert requests <= 4, requests  # per thread: its first read, then one window


def test_reads_overlapping_the_last_one_are_read_ahead(served: tuple[Nginx, Path, bytes]) -> None:
    """A qcow2 golden image's compressed clusters, packed end to end, each read to the end
    of its last 512-byte sector: every read starts a little before the previous one
    ended. The run is still sequential and read ahead, not a request per cluster."""
    server, _root, data = served
    store = HTTPStore.open(f"{server.url}/base.raw")
    rng = random.Random(7)
    offset, reads = 1000, 0
    before = len(server.access_log())
    try:
        while offset < 1 << 20:
            length = rng.randrange(1000, 40_000)
            end = -(-(offset + length) // 512) * 512  # to the end of the last sector
            assert _read(store, offset, end - offset) == data[offset:end]
            offset += length
            reads += 1
    finally:
        store.close()
    requests = len(server.access_log()) - before
    assert reads > 40 and requests <= 3, (reads, requests)  # the first read, then a window


def test_one_run_read_by_threads_in_turn_is_read_ahead(served: tuple[Nginx, Path, bytes]) -> None:
    """One client's sequential reads handed to whichever pool thread is free, here two
    threads in turn: the run is still seen as sequential and read ahead."""
    server, _root, data = served
    store = HTTPStore.open(f"{server.url}/base.raw")
    step = threading.Barrier(2, timeout=30)
    got: dict[int, bytes] = {}

    def worker(k: int) -> None:
        for i in range(256):
            step.wait()
            if i % 2 == k:
                got[i] = _read(store, 100 + i * 4096, 4096)

    before = len(server.access_log())
    run_threads(store, worker, (0, 1))
    assert b"".join(got[i] for i in range(256)) == data[100 : 100 + (1 << 20)]
    requests = len(server.access_log()) - before
    assert requests <= 3, requests  # the first read, then one window


def test_qemu_curl_referee(served: tuple[Nginx, Path, bytes], tmp_path: Path) -> None:
    """qemu-img's curl driver reads the URL as HTTPStore does (a copy made by HTTPStore)."""
    server = served[0]
    url = f"{server.url}/base.raw"
    rounded = -(-SIZE // 512) * 512  # QEMU rounds the size up to a sector, reading zeros
    store = HTTPStore.open(url)
    copy = tmp_path / "copy.raw"
    try:
        with open(copy, "wb") as f:
            for offset in range(0, rounded, 1 << 20):
                f.write(_read(store, offset, min(1 << 20, rounded - offset)))
    finally:
        store.close()
    spec = "json:" + json.dumps({"file.driver": "http", "file.url": url})
    qemu_img = require_tool("qemu-img")
    info = run([qemu_img, "info", "--output=json", spec])
    assert json.loads(info.stdout)["virtual-size"] == rounded
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", spec, str(copy)])


# -- URLs and options -----------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.com/x.raw", "expected one of http://, https://, found scheme 'ftp'"),
    ("http://user:hunter2@example.com/x.raw", "user name or password"),
    ("http:///x.raw", "expected a host name"),
    ("http://example.com/a b.raw", "printable ASCII"),
    ("http://example.com:99999/x.raw", "a port from 1 to 65535"),
])  # fmt: skip
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(RemoteBackingError, match=message) as info:
        HTTPStore.open(url)
    assert "hunter2" not in str(info.value)


def test_missing_urllib3(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "urllib3")
    with pytest.raises(AddCowError) as info:
        HTTPStore.open("http://127.0.0.1:1/x.raw")
    assert str(info.value) == (
        "http(s) backing files need urllib3; install the 'http' extra: "
        "pip install 'addcow[http]' (from a checkout: pip install '.[http]')"
    )


# -- a hostile server -----------------------------------------------------------------

Reply = Callable[[int, int, dict[str, str]], bytes | Iterator[bytes] | None]
"""(first, last, request headers) -> the raw reply to send (or its pieces), or None to hang."""

DATA = _data(1_000_000, seed=4)
ETAG = '"v1"'


def good(first: int, last: int, extra: str = "", *, total: int = len(DATA),
         etag: str | None = ETAG, body: bytes | None = None) -> bytes:  # fmt: skip
    content = DATA[first : last + 1] if body is None else body
    tag = f"ETag: {etag}\r\n" if etag else ""
    return (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{total}\r\n"
            f"Content-Length: {len(content)}\r\n{tag}Connection: close\r\n{extra}\r\n"
            ).encode() + content  # fmt: skip


class Hostile:
    """A socket server answering each request with ``probe`` (bytes 0-0) or ``reply``."""

    def __init__(self, reply: Reply, probe: Reply | None = None) -> None:
        self.reply = reply
        self.probe = probe or (lambda first, last, headers: good(first, last))
        self.requests: list[dict[str, str]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/img.raw?{SECRET}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, suppress(OSError):
            conn.settimeout(10)
            raw = b""
            while b"\r\n\r\n" not in raw and len(raw) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                raw += chunk
            lines = raw.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}  # fmt: skip
            self.requests.append({"request": lines[0], **headers})
            found = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
            first, last = (int(found[1]), int(found[2])) if found else (0, len(DATA) - 1)
            answer = (self.probe if (first, last) == (0, 0) else self.reply)(first, last, headers)
            if answer is None:
                self.stop.wait(30)
                return
            for piece in [answer] if isinstance(answer, bytes) else answer:
                conn.sendall(piece)
            conn.shutdown(socket.SHUT_WR)
            # Let the client read before the close (a close with unread input resets).
            conn.settimeout(2)
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


@contextmanager
def hostile(reply: Reply, probe: Reply | None = None) -> Iterator[Hostile]:
    server = Hostile(reply, probe)
    try:
        yield server
    finally:
        server.close()


def _stream(head: bytes, n: int) -> Iterator[bytes]:
    """``head``, then ``n`` more bytes in pieces (so the server's memory stays small)."""
    yield head
    piece = b"\xab" * 65536
    for _ in range(n // len(piece)):
        yield piece


READ_CASES: dict[str, tuple[Reply, type[Exception], str]] = {
    "wrong start": (lambda a, b, h: good(a + 1, b + 1), RemoteReplyError, "Content-Range"),
    "wrong total": (lambda a, b, h: good(a, b, total=len(DATA) + 1), RemoteReplyError,
                    "Content-Range"),
    "star total": (lambda a, b, h: good(a, b).replace(b"/1000000", b"/*"), RemoteReplyError,
                   "Content-Range"),
    "no content-range": (lambda a, b, h: good(a, b).replace(b"Content-Range", b"X-Range"),
                         RemoteReplyError, "expected Content-Range"),
    "multipart": (lambda a, b, h: good(a, b, "Content-Type: multipart/byteranges; "
                                       "boundary=x\r\n").replace(b"Content-Range", b"X-R"),
                  RemoteReplyError, "expected Content-Range"),
    "two content-ranges": (lambda a, b, h: good(a, b, f"Content-Range: bytes {a}-{b}/5\r\n"),
                           RemoteReplyError, "Content-Range"),
    "gzip": (lambda a, b, h: good(a, b, "Content-Encoding: gzip\r\n"), RemoteReplyError,
             "Content-Encoding"),
    "short body": (lambda a, b, h: good(a, b)[: -(b - a + 1) // 2], RemoteBackingError,
                   "; expected the server back within 0.3 s"),
    "short close-delimited": (
        lambda a, b, h: good(a, b).replace(b"Content-Length", b"X-Length")[: -(b - a + 1) // 2],
        RemoteBackingError, "; expected the server back within 0.3 s"),
    "long content-length": (lambda a, b, h: good(a, b).replace(
        f"Content-Length: {b - a + 1}".encode(), f"Content-Length: {b - a + 1001}".encode()),
        RemoteReplyError, "Content-Length"),
    "huge content-length": (lambda a, b, h: good(a, b).replace(
        f"Content-Length: {b - a + 1}".encode(), b"Content-Length: 99999999999999999999999"),
        RemoteReplyError, "Content-Length"),
    "oversized close-delimited": (
        lambda a, b, h: _stream(good(a, b).replace(b"Content-Length", b"X-Length"), 64 << 20),
        RemoteReplyError, "found more"),
    "200 whole file": (lambda a, b, h: b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + DATA,
                       RemoteBackingError, "ignores Range"),
    "garbage": (lambda a, b, h: b"SPAM SPAM SPAM\r\n\r\n", RemoteReplyError, "garbage"),
    "hang": (lambda a, b, h: None, RemoteBackingError, "; expected the server back within 0.3 s"),
    "other etag": (lambda a, b, h: good(a, b, etag='"v2"'), RemoteChangedError,
                   'ETag "v1", now "v2"'),
    "412": (lambda a, b, h: b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n",
            RemoteChangedError, 'ETag "v1", now different'),
    "416": (lambda a, b, h: b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n",
            RemoteBackingError, "HTTP 416"),
    "redirect": (lambda a, b, h: b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.example/x?"
                 + SECRET.encode() + b"\r\nContent-Length: 0\r\n\r\n",
                 RemoteBackingError, "redirects are refused"),
    "403": (lambda a, b, h: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            RemoteBackingError, "presigned"),
    "503 always": (lambda a, b, h: b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 0"
                   b"\r\n\r\n", RemoteBackingError,
                   "(HTTP 503); expected the server back within 0.3 s"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(READ_CASES))
def test_hostile_read(case: str) -> None:
    reply, error, message = READ_CASES[case]
    with hostile(reply) as server:
        store = HTTPStore.open(server.url, timeout=0.5, retry=RetryPolicy(0.3))
        try:
            assert store.identity() == HTTPPin(len(DATA), ETAG, None)
            tracemalloc.start()
            start = time.monotonic()
            try:
                with pytest.raises(error, match=re.escape(message)) as info:
                    _read(store, 123_456, 200_000)
            finally:
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            assert time.monotonic() - start < 5
            assert peak < 4 << 20, peak
            assert SECRET not in str(info.value) and "5ecret" not in str(info.value)
            assert info.value.__cause__ is None
            if error is not RemoteBackingError or "server back" not in message:
                assert len(server.requests) == 2  # the probe and one read: no retry
            assert all(r["if-match"] == ETAG for r in server.requests[1:])
        finally:
            store.close()


def test_hostile_retry_then_success() -> None:
    failures = [b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"]

    def reply(first: int, last: int, headers: dict[str, str]) -> bytes:
        return failures.pop() if failures else good(first, last)

    with hostile(reply) as server:
        store = HTTPStore.open(server.url, retry=RetryPolicy(5))
        try:
            assert _read(store, 5000, 10_000) == DATA[5000:15000]
            assert len(server.requests) == 3
        finally:
            store.close()


PROBE_CASES: dict[str, tuple[Reply, type[Exception], str]] = {
    "no validators": (lambda a, b, h: good(a, b, etag=None), RemoteBackingError,
                      "cannot be pinned"),
    "weak etag only": (lambda a, b, h: good(a, b, etag='W/"x"'), RemoteBackingError,
                       "cannot be pinned"),
    "total not a number": (lambda a, b, h: good(a, b).replace(b"/1000000", b"/1e6"),
                           RemoteReplyError, "Content-Range"),
    "total too big": (lambda a, b, h: good(a, b, total=10**25), RemoteReplyError,
                      "Content-Range"),
    "range 0-1": (lambda a, b, h: good(0, 1), RemoteReplyError, "Content-Range"),
    "two bytes for one": (lambda a, b, h: good(0, 0, body=b"xy"), RemoteReplyError,
                          "Content-Length"),
    "200": (lambda a, b, h: b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + DATA,
            RemoteBackingError, "ignores Range"),
    "416 nonempty": (lambda a, b, h: b"HTTP/1.1 416 No\r\nContent-Range: bytes */7\r\n"
                     b"Content-Length: 0\r\n\r\n", RemoteReplyError, "bytes */0"),
    "404": (lambda a, b, h: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            RemoteBackingError, "found HTTP 404"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_hostile_probe(case: str) -> None:
    reply, error, message = PROBE_CASES[case]
    with hostile(reply, probe=reply) as server:
        start = time.monotonic()
        with pytest.raises(error, match=re.escape(message)) as info:
            HTTPStore.open(server.url, timeout=0.5, retry=RetryPolicy(0.3))
        assert time.monotonic() - start < 5
        assert SECRET not in str(info.value)
        assert len(server.requests) == 1
        assert server.requests[0]["range"] == "bytes=0-0"
        assert server.requests[0]["request"].startswith("GET ")


def test_weak_etag_falls_back_to_last_modified() -> None:
    modified = "Wed, 21 Oct 2015 07:28:00 GMT"

    def reply(first: int, last: int, headers: dict[str, str]) -> bytes:
        return good(first, last, f"Last-Modified: {modified}\r\n", etag='W/"weak"')

    with hostile(reply, probe=reply) as server:
        store = HTTPStore.open(server.url)
        try:
            assert store.identity() == HTTPPin(len(DATA), None, modified)
            assert _read(store, 999_990, 20) == _expected(DATA, 999_990, 20)
            read = server.requests[-1]
            assert read["if-unmodified-since"] == modified and "if-match" not in read
        finally:
            store.close()


def test_empty_file() -> None:
    def probe(first: int, last: int, headers: dict[str, str]) -> bytes:
        return (b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */0\r\n"
                b'ETag: "e"\r\nContent-Length: 0\r\n\r\n')  # fmt: skip

    with hostile(probe, probe=probe) as server:
        store = HTTPStore.open(server.url)
        try:
            assert store.identity() == HTTPPin(0, '"e"', None)
            assert _read(store, 0, 100) == bytes(100)
            assert len(server.requests) == 1
        finally:
            store.close()


def test_stopping_ends_the_retry_wait_at_once() -> None:
    """A server answering 503 with a long Retry-After: interrupt_waits (serve's
    shutdown, Ctrl-C of stream) ends the wait, the read fails with EIO at once."""
    busy = b"HTTP/1.1 503 Busy\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"
    with hostile(lambda first, last, headers: busy) as server:
        store = HTTPStore.open(server.url, retry=RetryPolicy(60))
        try:
            stopper = threading.Timer(0.5, remote.interrupt_waits)
            stopper.start()
            start = time.monotonic()
            with pytest.raises(RemoteBackingError, match="stopped retrying") as info:
                _read(store, 5000, 10_000)
            assert time.monotonic() - start < 5
            assert info.value.errno == errno.EIO
            stopper.join()
        finally:
            store.close()
    # A store opened later is not affected.
    with hostile(lambda first, last, headers: good(first, last)) as server:
        store = HTTPStore.open(server.url, retry=RetryPolicy(1))
        try:
            assert _read(store, 0, 100) == DATA[:100]
        finally:
            store.close()
