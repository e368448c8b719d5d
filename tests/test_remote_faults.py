"""Remote golden images under faults: real servers stopped, killed, slowed, failing, full.

Every case runs the ``addcow`` command line as a user would, over a real
golden server (qemu-nbd, nbdkit with its filters, nginx), and judges the image
afterwards: ``qemu-img compare`` of the raw file against the golden file (or
against QEMU's curl driver over the same URL), ``addcow check``, and, after
every failure, the clusters the on-disk bitmap marks allocated must hold the
golden image's bytes: nothing is marked that was not copied.

The disk: 4 MiB of random bytes with a 256 KiB hole, 16 KiB clusters. Streams
that must be caught half way run under ``--rate``, which spreads the copy over
seconds (about ten spans a second).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest
from conftest import addcow as cli
from conftest import popen_interruptible, require_tool, run
from http_util import nginx_server
from nbd_util import ddrescue_mapfile, served
from tls_util import make_certs

import addcow
from addcow.image import metafile
from addcow.stores.remote import RECONNECT_DELAY_ENV, TLS_CERTIFICATES_ENV
from addcow.stores.remote.nbd import EXTRA_GREETING_TIMEOUT, NBDStore

MiB = 1 << 20
SIZE = 4 * MiB
CLUSTER = 16 * 1024
CLUSTERS = SIZE // CLUSTER
HOLE = (MiB, 256 * 1024)
DATA_BYTES = SIZE - HOLE[1]


# -- the golden image and its servers ---------------------------------------------------


def golden_bytes() -> bytes:
    data = bytearray(random.Random(23).randbytes(SIZE))
    data[HOLE[0] : HOLE[0] + HOLE[1]] = bytes(HOLE[1])
    return bytes(data)


def write_golden(path: Path, data: bytes) -> None:
    """The golden image as a sparse file: the hole is not written."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        f.write(data[: HOLE[0]])
        f.seek(HOLE[0] + HOLE[1])
        f.write(data[HOLE[0] + HOLE[1] :])


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, bytes]:
    data = golden_bytes()
    write_golden(tmp_path / "golden.raw", data)
    return tmp_path / "golden.raw", data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unix_uri(sock: Path, scheme: str = "nbd+unix") -> str:
    return f"{scheme}:///?socket={sock}"


def qemu_nbd(path: Path, sock: Path, *args: str, shared: str = "4") -> list[str]:
    return [require_tool("qemu-nbd"), "-r", "-t", "-f", "raw", "-e", shared, "-k", str(sock),
            *args, str(path)]  # fmt: skip


def nbdkit(sock: Path, *args: str) -> list[str]:
    return [require_tool("nbdkit"), "-f", "-U", str(sock), *args]


class Peer:
    """A golden server the test stops and starts again on the same socket or port.

    ``probe`` connects once to see it listening (nbdkit); without it the
    socket file appearing is enough (qemu-nbd binds and listens in one step,
    and a probe would count against its ``--shared`` limit).
    """

    def __init__(self, cmd: list[str], *, sock: Path | None = None, port: int | None = None,
                 probe: bool = False, log: Path | None = None) -> None:  # fmt: skip
        self.cmd, self.sock, self.port, self.probe, self.log = cmd, sock, port, probe, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Peer:
        if self.sock is not None:
            self.sock.unlink(missing_ok=True)
        with open(self.log or os.devnull, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 15
        while not self._listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.cmd}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server not listening within 15 s: {self.cmd}")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        if self.sock is not None and (not self.sock.exists() or not self.probe):
            return self.sock.exists()
        with suppress(OSError):
            if self.sock is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.sock))
            else:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


@contextmanager
def peer(cmd: list[str], *, sock: Path | None = None, port: int | None = None,
         probe: bool = False, log: Path | None = None) -> Iterator[Peer]:  # fmt: skip
    """A :class:`Peer` running for the block, killed at its end."""
    server = Peer(cmd, sock=sock, port=port, probe=probe, log=log).start()
    try:
        yield server
    finally:
        server.stop()


# -- the image and its judges -----------------------------------------------------------


def create_image(tmp_path: Path, uri: str, name: str = "d") -> Path:
    image = tmp_path / f"{name}.add-cow"
    cli("create", "-q", "-b", uri, "-F", "raw", "-o",
        f"image_file={name}.raw,cluster_size={CLUSTER}", image)  # fmt: skip
    return image


@contextmanager
def golden_and_image(
    tmp_path: Path, golden: tuple[Path, bytes], delay: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Peer, Path]]:
    """qemu-nbd serving the golden image on ``golden.sock``, the reconnect delay set
    to ``delay``, and an image over it: (the server, the image)."""
    sock = tmp_path / "golden.sock"
    monkeypatch.setenv(RECONNECT_DELAY_ENV, delay)
    with peer(qemu_nbd(golden[0], sock), sock=sock) as server:
        yield server, create_image(tmp_path, unix_uri(sock))


@contextmanager
def streaming(image: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``addcow stream`` running in the background; killed if still running at the end."""
    proc = popen_interruptible([sys.executable, "-m", "addcow", "stream", *args, str(image)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def finish(proc: subprocess.Popen[str], timeout: float = 40) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.02)


def written(raw: Path) -> int:
    """Bytes of data the image file holds so far (the stream starts with an empty one)."""
    return os.stat(raw).st_blocks * 512


def durable(image: Path) -> set[int]:
    """The clusters the .add-cow file on disk marks allocated (read without a lock,
    as a crash would leave them)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        header = metafile.read_header(fd, str(image))
        bitmap = metafile.read_bitmap(fd, str(image), header, SIZE)
    finally:
        os.close(fd)
    if header.all_allocated:
        return set(range(CLUSTERS))
    return {c for c in range(CLUSTERS) if bitmap.is_set(c)}


def misplaced(raw: Path, clusters: set[int], data: bytes) -> list[int]:
    """Clusters of ``clusters`` whose bytes in the image file are not the golden ones."""
    held = raw.read_bytes().ljust(SIZE, b"\0")

    def span(c: int) -> slice:
        return slice(c * CLUSTER, (c + 1) * CLUSTER)

    return sorted(c for c in clusters if held[span(c)] != data[span(c)])


def one_error(stderr: str) -> str:
    """The one ``addcow:`` line a failed command prints (and nothing else)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("addcow: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def qemu_compare(a: Path | str, b: Path | str) -> None:
    out = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a), str(b)])
    assert out.stdout == "Images are identical.\n"


def check_clean(image: Path) -> None:
    out = cli("check", image, check=False)
    assert out.returncode == 0 and "No errors were found" in out.stdout, out.stdout + out.stderr


# -- 1. kill -9 of a stream while the golden server restarts -----------------------------


def test_stream_killed_while_the_golden_server_restarts(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = golden
    raw = tmp_path / "d.raw"
    with golden_and_image(tmp_path, golden, "30", monkeypatch) as (server, image):
        with streaming(image, "--rate", "512K") as proc:
            # The stream commits COMMIT_SECONDS in; it needs about 8 s in all.
            wait_for(lambda: bool(durable(image)), 20, "no progress made durable")
            seen = durable(image)
            assert proc.poll() is None and len(seen) < CLUSTERS
            assert misplaced(raw, seen, data) == []
            server.stop()  # SIGKILL: the connection breaks under the stream
            time.sleep(0.5)
            assert proc.poll() is None, "the stream gave up instead of waiting for the server"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        server.start()
        with addcow.open(image, readonly=True) as img:
            after = {c for c in range(CLUSTERS) if img.bitmap.is_set(c)}
            assert not img.complete
        assert seen <= after and len(after) < CLUSTERS
        assert misplaced(raw, after, data) == []
        check_clean(image)
        again = cli("stream", image)
        assert again.stderr.startswith(f"streamed {image}: ")
        check_clean(image)
    assert durable(image) == set(range(CLUSTERS))
    qemu_compare(raw, path)


# -- 2. the golden server restarts within the reconnect delay ---------------------------


def test_stream_rides_out_a_golden_server_restart(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _data = golden
    raw = tmp_path / "d.raw"
    with golden_and_image(tmp_path, golden, "20", monkeypatch) as (server, image):
        with streaming(image, "--rate", "2M") as proc:
            wait_for(lambda: written(raw) > 0, 10, "the stream copied nothing")
            server.stop(signal.SIGTERM)
            # Under --rate the copy is spread out: most of it is still to come.
            assert written(raw) < DATA_BYTES // 2, "the stream copied everything at once"
            time.sleep(1.0)
            assert proc.poll() is None, "the stream gave up instead of waiting for the server"
            server.start()
            status, err = finish(proc)
        assert status == 0, err
        assert err.startswith(f"streamed {image}: ") and err.count("\n") == 1, err
        check_clean(image)
    qemu_compare(raw, path)


def test_serve_stream_and_a_client_read_wait_for_the_golden_server(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``addcow serve --stream``: its stream and a client's read of a cluster not copied
    yet both wait while the golden server is down, and go on when it is back."""
    _path, data = golden
    raw = tmp_path / "d.raw"
    script = "import sys; sys.stdout.buffer.write(h.pread(65536, 3 * 1024 * 1024))"
    with golden_and_image(tmp_path, golden, "20", monkeypatch) as (server, image):
        args = ("--stream", "--stream-rate", "2M", "--detach-when-complete")
        with served(tmp_path, image, args=args) as srv:
            wait_for(lambda: written(raw) > 0, 10, "the served stream copied nothing")
            server.stop()
            assert written(raw) < DATA_BYTES // 2
            nbdsh = require_tool("nbdsh")  # a script for the system's python3
            env = {
                **os.environ,
                "PATH": f"{os.path.dirname(nbdsh)}{os.pathsep}{os.environ['PATH']}",
            }
            reader = subprocess.Popen([nbdsh, "-u", srv.uri, "-c", script], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            try:
                time.sleep(1.0)
                assert reader.poll() is None, "the client's read failed instead of waiting"
                server.start()
                out, err = reader.communicate(timeout=30)
            finally:
                if reader.poll() is None:
                    reader.kill()
                    reader.communicate()
            assert reader.returncode == 0, err
            assert out == data[3 * MiB : 3 * MiB + 65536]
            assert srv.logged("detached: removed the .add-cow file", timeout=30), srv.stderr()
            assert "Traceback" not in srv.stderr()
    assert not image.exists()
    assert raw.read_bytes() == data


# -- 3. the golden server stays away past the delay --------------------------------------


@contextmanager
def stream_losing_its_server(
    tmp_path: Path, golden: tuple[Path, bytes], delay: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Peer, Path, subprocess.Popen[str]]]:
    """``addcow stream --rate 2M`` under reconnect delay ``delay``, its golden server
    stopped once the copy has begun: (the server, the image, the stream)."""
    with (
        golden_and_image(tmp_path, golden, delay, monkeypatch) as (server, image),
        streaming(image, "--rate", "2M") as proc,
    ):
        wait_for(lambda: written(tmp_path / "d.raw") > 0, 10, "the stream copied nothing")
        server.stop()
        yield server, image, proc


def resume_after_the_server_returns(
    server: Peer, image: Path, golden: tuple[Path, bytes]
) -> set[int]:
    """Every cluster the failed stream marked holds the golden bytes; with the server
    back, a new stream completes the image. Returns the clusters kept."""
    path, data = golden
    raw = image.with_suffix(".raw")
    kept = durable(image)
    assert misplaced(raw, kept, data) == []
    server.start()
    again = cli("stream", image)
    assert again.stderr.startswith(f"streamed {image}: ")
    check_clean(image)
    qemu_compare(raw, path)
    return kept


def test_stream_fails_after_the_reconnect_delay_and_resumes(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with stream_losing_its_server(tmp_path, golden, "1", monkeypatch) as (server, image, proc):
        stopped = time.monotonic()
        status, err = finish(proc)
        took = time.monotonic() - stopped
        assert status == 1
        line = one_error(err)
        uri = unix_uri(tmp_path / "golden.sock")
        assert line.startswith(f"addcow: {uri}: connection lost"), line
        assert (f"expected the server back within 1 s ({RECONNECT_DELAY_ENV}), found it still "
                "unreachable") in line
        assert took < 8, took
        # What was copied before the failure was kept (flushed on the way out), and
        # only that.
        kept = resume_after_the_server_returns(server, image, golden)
        assert 0 < len(kept) < CLUSTERS


def test_ctrl_c_of_a_stream_waiting_for_the_golden_server_stops_at_once(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The golden server is gone and the reconnect delay is long: Ctrl-C ends the wait
    (exit 130 within seconds) and keeps what was copied."""
    with stream_losing_its_server(tmp_path, golden, "120", monkeypatch) as (server, image, proc):
        time.sleep(1.0)  # every stream thread is waiting for the server by now
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        status, err = finish(proc)
        took = time.monotonic() - interrupted
        assert status == 130, err
        assert took < 5, f"Ctrl-C took {took:.1f} s"
        assert "Traceback" not in err
        resume_after_the_server_returns(server, image, golden)


def test_sigterm_of_serve_while_a_read_waits_for_the_golden_server(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``addcow serve --stream`` with a client's read and its stream waiting for a golden
    server that is gone: SIGTERM stops it within seconds, not after the reconnect delay."""
    _path, data = golden
    raw = tmp_path / "d.raw"
    with (
        golden_and_image(tmp_path, golden, "120", monkeypatch) as (server, image),
        served(tmp_path, image, args=("--stream", "--stream-rate", "2M")) as srv,
    ):
        wait_for(lambda: written(raw) > 0, 10, "the served stream copied nothing")
        server.stop()
        reader = subprocess.Popen(
            [require_tool("qemu-io"), "-f", "raw", "-c", "read 3M 64k", srv.uri],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            assert reader.poll() is None, "the client's read did not wait"
            srv.proc.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            assert srv.proc.wait(timeout=60) == 0, srv.stderr()
            took = time.monotonic() - stopping
        finally:
            reader.kill()
            reader.communicate()
        assert took < 10, f"SIGTERM took {took:.1f} s\n{srv.stderr()}"
        assert "Traceback" not in srv.stderr()
    kept = durable(image)
    assert 0 < len(kept) < CLUSTERS
    assert misplaced(raw, kept, data) == []


# -- 4. nbdkit filters as golden servers -------------------------------------------------


def test_latency_of_the_delay_filter(tmp_path: Path, golden: tuple[Path, bytes]) -> None:
    path, _data = golden
    sock = tmp_path / "golden.sock"
    cmd = nbdkit(sock, "--filter=delay", "file", str(path), "rdelay=100ms", "delay-extents=50ms")
    with peer(cmd, sock=sock, probe=True):
        image = create_image(tmp_path, unix_uri(sock))
        start = time.monotonic()
        cli("stream", "--rate", "16M", image)
        assert time.monotonic() - start >= 0.15  # at least one delayed read and status
        check_clean(image)
    qemu_compare(tmp_path / "d.raw", path)


BAD_LO, BAD_HI = 2 * MiB, 2 * MiB + 65536


def failing_golden(tmp_path: Path, path: Path, sock: Path) -> list[str]:
    """nbdkit serving ``path`` with reads of bytes BAD_LO .. BAD_HI failing with EIO
    (its ddrescue filter: the error filter of nbdkit 1.32 injects by rate and trigger
    file, not by offset)."""
    mapfile = ddrescue_mapfile(tmp_path / "golden.map", SIZE, BAD_LO, BAD_HI)
    return nbdkit(sock, "--filter=ddrescue", "file", str(path), f"ddrescue-mapfile={mapfile}")


def test_eio_at_chosen_offsets_stops_the_stream_and_marks_none_of_them(
    tmp_path: Path, golden: tuple[Path, bytes]
) -> None:
    """The golden server fails reads of bytes 2 MiB .. 2 MiB + 64 KiB with EIO."""
    path, data = golden
    sock = tmp_path / "golden.sock"
    raw = tmp_path / "d.raw"
    with peer(failing_golden(tmp_path, path, sock), sock=sock, probe=True):
        image = create_image(tmp_path, unix_uri(sock))
        failed = cli("stream", "--rate", "4M", image, check=False)
        assert failed.returncode == 1
        line = one_error(failed.stderr)
        found = re.search(r"the server failed the read of bytes (\d+)-(\d+) with EIO$", line)
        assert found, line
        lo, hi = int(found[1]), int(found[2]) + 1
        assert lo < BAD_HI and hi > BAD_LO, (lo, hi)
        kept = durable(image)
        assert kept, "nothing before the bad range was kept"
        assert not kept & set(range(lo // CLUSTER, -(-hi // CLUSTER))), sorted(kept)
        assert misplaced(raw, kept, data) == []
    with peer(nbdkit(sock, "file", str(path)), sock=sock, probe=True):
        cli("stream", image)
        check_clean(image)
    qemu_compare(raw, path)


def test_a_served_stream_that_fails_ends_and_starts_again(
    tmp_path: Path, golden: tuple[Path, bytes]
) -> None:
    """``serve --stream`` over a golden server failing a range with EIO: the stream
    ends with one line and status none (what it copied kept where it belongs, the
    export still served); once the golden server reads that range again,
    ``stream-start`` on the same server completes the image."""
    path, data = golden
    sock = tmp_path / "golden.sock"
    control = tmp_path / "control.sock"
    raw = tmp_path / "d.raw"

    def stream_status() -> str:
        query = json.loads(cli("status", "--output=json", control).stdout)
        status: str = query["exports"][0]["stream"]["status"]
        return status

    with ExitStack() as failing:
        failing.enter_context(peer(failing_golden(tmp_path, path, sock), sock=sock, probe=True))
        image = create_image(tmp_path, unix_uri(sock))
        with served(tmp_path, image, args=("--stream", "--control", str(control))) as srv:
            assert srv.logged("stream failed: ", timeout=30), srv.stderr()
            assert stream_status() == "none"
            assert misplaced(raw, durable(image), data) == []
            failing.close()
            with peer(nbdkit(sock, "file", str(path)), sock=sock, probe=True):
                cli("control", control, "stream-start")
                wait_for(lambda: stream_status() == "concluded", 30, "no second stream")
            assert "Traceback" not in srv.stderr()
    check_clean(image)
    qemu_compare(raw, path)


def test_eio_from_the_golden_server_reaches_the_client_of_serve(
    tmp_path: Path, golden: tuple[Path, bytes]
) -> None:
    """A client of ``addcow serve`` reading the failing range gets EIO; its other reads,
    from the event loop's connection to the golden server (nbdkit advertises
    multi-conn), get the golden bytes, before and after."""
    path, data = golden
    sock = tmp_path / "golden.sock"
    qemu_io = require_tool("qemu-io")
    with peer(failing_golden(tmp_path, path, sock), sock=sock, probe=True):
        image = create_image(tmp_path, unix_uri(sock))
        with served(tmp_path, image) as srv:
            assert srv.logged("reads of unallocated clusters go out from the event loop")
            for offset, fails in ((MiB, False), (BAD_LO + 4096, True), (3 * MiB, False)):
                got = subprocess.run([qemu_io, "-f", "raw", "-c", f"read -v {offset} 16",
                                      srv.uri], capture_output=True, text=True)  # fmt: skip
                if fails:
                    assert "Input/output error" in got.stdout + got.stderr, got
                else:
                    assert got.returncode == 0 and "read 16/16 bytes" in got.stdout, got
                    assert data[offset : offset + 16].hex(" ") in got.stdout.replace("  ", " ")
            assert "the server failed the read of bytes" in srv.stderr()
            assert "the event loop's connection failed" not in srv.stderr()
            assert "Traceback" not in srv.stderr()


def test_retry_filter_over_a_plugin_that_fails_then_recovers(
    tmp_path: Path, golden: tuple[Path, bytes]
) -> None:
    path, data = golden
    sock = tmp_path / "golden.sock"
    trigger = tmp_path / "fail"  # reads fail while it exists
    failing = ("--filter=error", "file", str(path), "error-pread-rate=1",
               f"error-pread-file={trigger}")  # fmt: skip
    # The plugin alone: the server's EIO stops the stream, nothing is marked.
    with peer(nbdkit(sock, *failing), sock=sock, probe=True):
        image = create_image(tmp_path, unix_uri(sock))  # create reads the first bytes
        trigger.touch()
        failed = cli("stream", image, check=False)
        assert failed.returncode == 1 and "with EIO" in one_error(failed.stderr)
        assert durable(image) == set()
    # The retry filter in front: it reopens the plugin and tries again, and the
    # plugin recovers (the trigger file goes) after its first failure.
    log = tmp_path / "nbdkit.log"
    cmd = nbdkit(sock, "-v", "--filter=retry", *failing, "retries=5", "retry-delay=1",
                 "retry-exponential=no")  # fmt: skip

    def recover() -> None:
        with suppress(AssertionError):
            wait_for(lambda: "injecting EIO error into pread" in log.read_text(), 20, "no EIO")
        trigger.unlink()

    with peer(cmd, sock=sock, probe=True, log=log):
        healer = threading.Thread(target=recover)
        healer.start()
        try:
            done = cli("stream", image, check=False)
        finally:
            healer.join()
        assert done.returncode == 0, done.stderr
        text = log.read_text()
        assert "injecting EIO error into pread" in text and "retry 1: waiting" in text
        check_clean(image)
    qemu_compare(tmp_path / "d.raw", path)
    assert (tmp_path / "d.raw").read_bytes() == data


# -- 5. a golden server with a connection limit ------------------------------------------


def test_store_under_a_connection_limit_lower_than_it_advertises(
    tmp_path: Path, golden: tuple[Path, bytes]
) -> None:
    """qemu-nbd --shared 2 advertises multi-conn; the store wants 4 connections. The
    extra ones wait in qemu-nbd's listen queue, unanswered: given up after
    EXTRA_GREETING_TIMEOUT, not the store's 30 s timeout."""
    path, data = golden
    sock = tmp_path / "golden.sock"
    with peer(qemu_nbd(path, sock, shared="2"), sock=sock), \
            NBDStore.open(unix_uri(sock), connections=4) as store:  # fmt: skip
        assert store.multi_conn
        start = time.monotonic()

        def work(i: int) -> bool:
            ok = True
            for j in range(12):
                off = (i * 7919 + j * 262139) % (SIZE - 65536)
                buf = bytearray(65536)
                store.readinto(memoryview(buf), off)
                ok &= buf == data[off : off + 65536]
            return ok

        with ThreadPoolExecutor(6) as pool:
            assert all(pool.map(work, range(6)))
        assert time.monotonic() - start < EXTRA_GREETING_TIMEOUT + 5
        assert store.connections_open == 2


@pytest.mark.parametrize("shared", ["1", "2"])
def test_serve_over_a_golden_server_with_a_connection_limit(
    tmp_path: Path, golden: tuple[Path, bytes], shared: str
) -> None:
    """``addcow serve`` reads for nbdcopy (many requests in flight) from qemu-nbd
    --shared 1 (no multi-conn: one connection) or 2 (multi-conn, fewer than wanted)."""
    path, data = golden
    sock = tmp_path / "golden.sock"
    copy = tmp_path / "copy.raw"
    with peer(qemu_nbd(path, sock, shared=shared), sock=sock):
        image = create_image(tmp_path, unix_uri(sock))
        with served(tmp_path, image, args=("--read-only",)) as srv:
            start = time.monotonic()
            run([require_tool("nbdcopy"), "--requests=16", srv.uri, str(copy)])
            took = time.monotonic() - start
            assert "Traceback" not in srv.stderr()
    assert copy.read_bytes() == data
    assert took < EXTRA_GREETING_TIMEOUT + 8


# -- 6. TLS end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("certs")
    dirs = make_certs(work)
    wrong = work / "wrongca"
    wrong.mkdir()
    (wrong / "ca-cert.pem").write_bytes((work / "otherca.pem").read_bytes())
    dirs["wrongca"] = wrong  # a client trusting another CA than the one that signed the server
    return dirs


WRONG_CA = "expected a server certificate for 'localhost' signed by the CA in the TLS certificate"


def test_tls_qemu_nbd_golden_server(
    tmp_path: Path, golden: tuple[Path, bytes], certs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path, _data = golden
    sock = tmp_path / "golden.sock"
    tls = ("--object", f"tls-creds-x509,id=tls0,dir={certs['srv']},endpoint=server",
           "--tls-creds", "tls0")  # fmt: skip
    with peer(qemu_nbd(path, sock, *tls), sock=sock):
        monkeypatch.setenv(TLS_CERTIFICATES_ENV, str(certs["client"]))
        image = create_image(tmp_path, unix_uri(sock, "nbds+unix"))
        monkeypatch.setenv(TLS_CERTIFICATES_ENV, str(certs["wrongca"]))
        refused = cli("stream", image, check=False)
        assert refused.returncode == 1 and WRONG_CA in one_error(refused.stderr)
        assert durable(image) == set()
        monkeypatch.setenv(TLS_CERTIFICATES_ENV, str(certs["client"]))
        cli("stream", image)
        check_clean(image)
    qemu_compare(tmp_path / "d.raw", path)


def test_tls_nbdkit_golden_server_over_tcp(
    tmp_path: Path, golden: tuple[Path, bytes], certs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path, _data = golden
    port = free_port()
    cmd = [require_tool("nbdkit"), "-f", "-i", "127.0.0.1", "-p", str(port), "--tls=require",
           f"--tls-certificates={certs['srv']}", "file", str(path)]  # fmt: skip
    uri = f"nbds://127.0.0.1:{port}/"
    with peer(cmd, port=port, probe=True):
        monkeypatch.setenv(TLS_CERTIFICATES_ENV, str(certs["wrongca"]))
        cases = ((f"nbd://127.0.0.1:{port}/", "requires TLS"),
                 (uri, WRONG_CA.replace("'localhost'", "'127.0.0.1'")))  # fmt: skip
        for scheme_uri, message in cases:
            refused = cli("create", "-q", "-b", scheme_uri, "-F", "raw", "-o",
                          "image_file=r.raw", tmp_path / "r.add-cow", check=False)  # fmt: skip
            assert refused.returncode == 1 and message in one_error(refused.stderr)
            assert not (tmp_path / "r.add-cow").exists() and not (tmp_path / "r.raw").exists()
        monkeypatch.setenv(TLS_CERTIFICATES_ENV, str(certs["nocert"]))
        image = create_image(tmp_path, uri)
        cli("stream", image)
        check_clean(image)
    qemu_compare(tmp_path / "d.raw", path)


# -- 7. HTTP: nginx stopped mid-stream ---------------------------------------------------


@contextmanager
def nginx_again(work: Path, port: int) -> Iterator[None]:
    """nginx started again from the configuration ``nginx_server`` left in ``work``."""
    proc = subprocess.Popen(
        [require_tool("nginx"), "-p", f"{work}/", "-c", str(work / "nginx.conf"),
         "-e", str(work / "error.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _connects(port) or proc.poll() is not None, 10, "nginx not back")
        assert proc.poll() is None, (work / "error.log").read_text()
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_http_golden_server_restart_is_ridden_out_as_an_nbd_one_is(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx down for 2 s mid-stream, under the default retry window (the NBD
    store's): the reads wait for it and the stream completes with the golden bytes."""
    path, data = golden
    monkeypatch.delenv(RECONNECT_DELAY_ENV, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    write_golden(www / "golden.raw", data)
    work = tmp_path / "nginx"
    raw = tmp_path / "d.raw"
    with nginx_server(www, work) as web:
        image = create_image(tmp_path, f"{web.url}/golden.raw")
        with streaming(image, "--rate", "2M") as proc:
            wait_for(lambda: written(raw) > 0, 10, "the stream copied nothing")
            web.proc.kill()
            web.proc.wait(timeout=10)
            assert written(raw) < DATA_BYTES // 2, "the stream copied everything at once"
            time.sleep(2.0)
            assert proc.poll() is None, "the stream gave up instead of waiting for nginx"
            with nginx_again(work, web.port):
                status, err = finish(proc)
    assert status == 0, err
    assert err.startswith(f"streamed {image}: ") and err.count("\n") == 1, err
    check_clean(image)
    qemu_compare(raw, path)


def test_http_golden_server_stopped_mid_stream_then_back(
    tmp_path: Path, golden: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx gone for good: the reads fail once the configured window (1 s) is over,
    with one line naming it."""
    monkeypatch.setenv(RECONNECT_DELAY_ENV, "1")
    _path, data = golden
    www = tmp_path / "www"
    www.mkdir()
    write_golden(www / "golden.raw", data)
    work = tmp_path / "nginx"
    raw = tmp_path / "d.raw"
    with nginx_server(www, work) as web:
        url = f"{web.url}/golden.raw"
        image = create_image(tmp_path, url)
        with streaming(image, "--rate", "2M") as proc:
            wait_for(lambda: written(raw) > 0, 10, "the stream copied nothing")
            web.proc.kill()
            web.proc.wait(timeout=10)
            stopped = time.monotonic()
            status, err = finish(proc)
            took = time.monotonic() - stopped
    assert status == 1
    line = one_error(err)
    assert re.fullmatch(rf"addcow: {re.escape(url)}: reading bytes \d+-\d+ failed after \d+ "
                        r"attempts \(.*\); expected the server back within 1 s "
                        rf"\({RECONNECT_DELAY_ENV}\)", line), line  # fmt: skip
    assert 1 <= took < 6, took  # the window, then the error
    kept = durable(image)
    assert 0 < len(kept) < CLUSTERS
    assert misplaced(raw, kept, data) == []
    with nginx_again(work, web.port):
        again = cli("stream", image)
        assert again.stderr.startswith(f"streamed {image}: ")
        check_clean(image)
        # QEMU's curl driver reads the golden image over the same URL
        spec = "json:" + json.dumps({"file.driver": "http", "file.url": url})
        qemu_compare(raw, spec)
