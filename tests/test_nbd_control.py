"""The control socket of ``addcow serve --control``, driven while real clients use the server.

``addcow status`` / ``addcow control`` (the CLI over it) and raw JSON lines on
the socket; ``query`` checked against ``addcow info -U``; a stream paused,
resumed and re-rated while qemu-io writes; detach and flush; bad requests
answered while serving goes on; the socket private to its owner; a stream
started on a server run without ``--stream``, cancelled mid-way and started
again, its content compared with ``qemu-img compare``.

The disk: 8 MiB, 64 KiB clusters (128), over a backing of random bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER, require_tool
from conftest import addcow as addcow_cli
from nbd_util import served

import addcow
from addcow.units import human_size

SIZE = 128 * CLUSTER


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, bytearray]:
    """(image, model of the disk's content)."""
    base = tmp_path / "base.raw"
    data = bytearray(random.Random(11).randbytes(SIZE))
    base.write_bytes(data)
    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", backing_file=base, backing_format="raw")
    return image, data


class Control:
    """A JSON-lines connection to the control socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send_line(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        reply = json.loads(self.file.readline())
        assert isinstance(reply, dict)
        return reply

    def __call__(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        reply = self.send_line(json.dumps(message).encode())
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def qemu_io(uri: str, *commands: str) -> None:
    tool = require_tool("qemu-io")
    args = [tool, "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr


def read_all(uri: str, tmp_path: Path) -> bytes:
    out = tmp_path / "copy.raw"
    subprocess.run([require_tool("nbdcopy"), uri, str(out)], check=True, timeout=60)
    return out.read_bytes()


def same_content(uri: str, model: bytearray, tmp_path: Path) -> None:
    """qemu-img compare of what the server serves with the model (exit 0: identical)."""
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    proc = subprocess.run(
        [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(expected), uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def stream_of(control: Control) -> dict[str, Any]:
    stream: dict[str, Any] = control("query")["exports"][0]["stream"]
    return stream


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_query_agrees_with_addcow_info_after_a_flush(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        qemu_io(srv.uri, "write -P 0x5a 0 192k", "write -P 0x33 1M 4k", "read 2M 64k")
        control = Control(sock)
        try:
            assert control("flush") == {}
            status = control("query")
        finally:
            control.close()
        info = json.loads(addcow_cli("info", "-U", "--output=json", str(image)).stdout)
        info = info["format-specific"]["data"]
        (export,) = status["exports"]
        assert export["allocated-clusters"] == info["allocated-clusters"] == 4
        assert export["total-clusters"] == info["total-clusters"] == 128
        assert export["virtual-size"] == SIZE and export["cluster-size"] == CLUSTER
        assert export["file"] == str(image) and not export["complete"]
        assert export["stream"] == {
            "status": "none", "offset": 4 * CLUSTER, "len": SIZE, "speed": 0, "paused": False,
            "copied": 0,
        }  # fmt: skip
        assert (export["wr_operations"], export["wr_bytes"]) == (2, 192 * 1024 + 4096)
        assert (export["rd_operations"], export["rd_bytes"]) == (1, 64 * 1024)
        assert export["flush_operations"] >= 1  # qemu-io flushes before it exits
        assert status["server"]["uris"] == [srv.uri] and status["server"]["tls"] == "off"
        assert status["clients"] == []  # qemu-io has gone
    assert srv.logged("control: flush")


def test_status_lists_a_connected_client_with_its_counters(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    sock = tmp_path / "control.sock"
    nbdsh = require_tool("nbdsh")
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        script = (
            f"h.connect_uri({srv.uri!r})\n"
            "h.pwrite(b'x' * 8192, 65536)\n"
            "h.pread(4096, 0)\n"
            "import sys; print('ready', flush=True); sys.stdin.readline()\n"
        )
        env = dict(os.environ, PATH=f"{os.path.dirname(nbdsh)}{os.pathsep}{os.environ['PATH']}")
        client = subprocess.Popen(
            [nbdsh, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env,
        )  # fmt: skip
        try:
            assert client.stdout is not None and client.stdout.readline().strip() == "ready"
            out = addcow_cli("status", "--output=json", str(sock)).stdout
            (peer,) = json.loads(out)["clients"]
            assert peer["export"] == "d.add-cow" and not peer["tls"]
            assert (peer["wr_operations"], peer["wr_bytes"]) == (1, 8192)
            assert (peer["rd_operations"], peer["rd_bytes"]) == (1, 4096)
            human = addcow_cli("status", str(sock)).stdout.splitlines()
            assert human[0].startswith(f"server: pid {srv.proc.pid}, on {srv.uri}, TLS off")
            assert human[1] == f"export 'd.add-cow': {image} (image file {tmp_path / 'd.raw'}, " \
                f"backing file {tmp_path / 'base.raw'}), read-write"  # fmt: skip
            assert human[2] == "  allocated: 1 of 128 clusters (0.8%)"
            assert human[-1].startswith("client 1: local, export 'd.add-cow', connected ")
            assert human[-1].endswith("1 reads (4 KiB), 1 writes (8 KiB), 0 trims, 0 flushes")
        finally:
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=30)
    assert srv.logged("connection 1 closed: 1 reads (4096 bytes), 1 writes (8192 bytes)")


def test_stream_paused_resumed_and_rerated_while_a_client_writes(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, model = setup
    sock = tmp_path / "control.sock"
    args = ("--control", str(sock), "--stream", "--stream-rate", "512k")
    with served(tmp_path, image, args=args) as srv:
        control = Control(sock)
        try:
            wait_until(lambda: control("query")["exports"][0]["stream"]["copied"] > 0)
            assert control("stream-pause") == {"changed": True}
            assert control("stream-pause") == {"changed": False}
            time.sleep(0.3)  # the span in flight finishes
            paused = control("query")["exports"][0]["stream"]
            assert paused["status"] == "paused" and paused["paused"]
            # A client writes while the stream is paused: its clusters count, the
            # stream's own copying does not move.
            qemu_io(srv.uri, f"write -P 0x77 {100 * CLUSTER} {4 * CLUSTER}")
            model[100 * CLUSTER : 104 * CLUSTER] = b"\x77" * (4 * CLUSTER)
            time.sleep(1.0)
            later = control("query")["exports"][0]["stream"]
            assert later["copied"] == paused["copied"]
            assert later["offset"] == paused["offset"] + 4 * CLUSTER
            assert control("stream-resume") == {"changed": True}
            wait_until(lambda: control("query")["exports"][0]["stream"]["copied"] > later["copied"])
            running = control("query")["exports"][0]["stream"]
            assert running["status"] == "running" and running["speed"] == 512 * 1024
            # At 512 KiB/s the 8 MiB disk would take many seconds; no limit ends it now.
            assert control("stream-set-rate", speed=0) == {}
            wait_until(lambda: control("query")["exports"][0]["complete"], timeout=20)
            done = control("query")["exports"][0]
            assert done["stream"]["status"] == "concluded" and done["stream"]["speed"] == 0
            assert done["stream"]["offset"] == SIZE
        finally:
            control.close()
        assert read_all(srv.uri, tmp_path) == bytes(model)
    log = srv.stderr()
    for line in ("stream paused", "stream resumed", "stream rate unlimited", "stream complete"):
        assert line in log, log


def test_stream_started_on_a_server_run_without_stream(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, model = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        qemu_io(srv.uri, f"write -P 0x61 {3 * CLUSTER} {5 * CLUSTER}", "write -P 0x62 100k 8k")
        model[3 * CLUSTER : 8 * CLUSTER] = b"\x61" * (5 * CLUSTER)
        model[100 << 10 : 108 << 10] = b"\x62" * (8 << 10)
        status = addcow_cli("status", str(sock)).stdout
        assert "stream:" not in status  # not streaming
        assert addcow_cli("control", str(sock), "stream-start").stdout == ""
        control = Control(sock)
        try:
            wait_until(lambda: control("query")["exports"][0]["complete"], timeout=20)
            done = control("query")["exports"][0]
            assert done["stream"]["status"] == "concluded" and done["stream"]["offset"] == SIZE
            assert done["stream"]["copied"] == SIZE - 6 * CLUSTER  # the rest was written
            assert srv.logged("backing file closed; serving the raw file directly")
            released = control("query")["exports"][0]
            assert released["backing-file"] is None and not released["detached"]
        finally:
            control.close()
        same_content(srv.uri, model, tmp_path)
        # Complete: nothing more to stream, nothing to cancel; the state stays concluded.
        again = addcow_cli("control", str(sock), "stream-start")
        assert again.stdout == "addcow: the export is complete: nothing to stream\n"
        cancel = addcow_cli("control", str(sock), "stream-cancel")
        assert cancel.stdout == "addcow: the stream had already ended\n"
        assert "stream: concluded, 8 MiB of 8 MiB" in addcow_cli("status", str(sock)).stdout
    assert image.exists()  # no --detach-when-complete
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)


def test_stream_start_completes_as_serve_options_say(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    """With --detach-when-complete, a stream started later detaches on completion too."""
    image, model = setup
    sock = tmp_path / "control.sock"
    args = ("--control", str(sock), "--detach-when-complete")
    with served(tmp_path, image, args=args) as srv:
        control = Control(sock)
        try:
            assert control("stream-start", speed=0) == {"changed": True}
            wait_until(lambda: control("query")["exports"][0]["detached"], timeout=20)
        finally:
            control.close()
        assert srv.logged("detached: removed the .add-cow file")
        assert not image.exists()
        same_content(srv.uri, model, tmp_path)
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)


def test_stream_cancelled_mid_way_and_started_again(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, model = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        qemu_io(srv.uri, f"write -P 0x71 {10 * CLUSTER} {2 * CLUSTER}")
        model[10 * CLUSTER : 12 * CLUSTER] = b"\x71" * (2 * CLUSTER)
        control = Control(sock)
        try:
            # 512 KiB/s: the 8 MiB disk would take 16 s.
            assert control("stream-start", speed=512 << 10) == {"changed": True}
            wait_until(lambda: stream_of(control)["copied"] > 2 * CLUSTER)
            already = control.send_line(b'{"execute": "stream-start"}')
            assert already["error"]["desc"] == "d.add-cow: already streaming (status running)"
            assert control("stream-cancel") == {"changed": True}
            cancelled = control("query")["exports"][0]
            assert cancelled["stream"]["status"] == "none" and not cancelled["complete"]
            assert cancelled["stream"]["copied"] > 0 and cancelled["stream"]["offset"] < SIZE
            # What was copied is durable: the file says what the server says.
            info = json.loads(addcow_cli("info", "-U", "--output=json", str(image)).stdout)
            on_disk = info["format-specific"]["data"]["allocated-clusters"]
            assert on_disk == cancelled["allocated-clusters"]
            time.sleep(0.5)  # nothing goes on copying
            assert stream_of(control) == cancelled["stream"]
            assert "stream:" not in addcow_cli("status", str(sock)).stdout
            # Served with copy on write as before: a write, then the content.
            qemu_io(srv.uri, f"write -P 0x72 {120 * CLUSTER} 4k")
            model[120 * CLUSTER : 120 * CLUSTER + 4096] = b"\x72" * 4096
            same_content(srv.uri, model, tmp_path)
            # Cancelled while it waits to keep its rate (at 1 byte/s, hours after
            # its first cluster), and while it waits paused: it ends at once.
            copied = stream_of(control)["copied"]
            assert control("stream-start", speed=1) == {"changed": True}
            wait_until(lambda: stream_of(control)["copied"] > copied)
            assert control("stream-cancel") == {"changed": True}
            assert control("stream-start", speed=512 << 10) == {"changed": True}
            assert control("stream-pause") == {"changed": True}
            time.sleep(0.3)  # the span in flight finishes; the stream waits for a resume
            assert control("stream-cancel") == {"changed": True}
            assert stream_of(control)["status"] == "none"
            left = SIZE - stream_of(control)["offset"]
            # Started again, no limit: it copies only what is left and completes.
            assert addcow_cli("control", str(sock), "stream-start").stdout == ""
            wait_until(lambda: control("query")["exports"][0]["complete"], timeout=20)
            assert stream_of(control)["status"] == "concluded"
            assert addcow_cli("control", str(sock), "stream-cancel").returncode == 0
        finally:
            control.close()
        same_content(srv.uri, model, tmp_path)
    log = srv.stderr()
    assert log.count("stream cancelled") == 3, log
    assert f"streaming {human_size(left)} from the backing file" in log, log
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)


def test_stream_start_refused_while_streaming_and_on_a_read_only_export(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    sock = tmp_path / "control.sock"
    args = ("--control", str(sock), "--stream", "--stream-rate", "256k")
    with served(tmp_path, image, args=args):
        assert addcow_cli("control", str(sock), "stream-pause").returncode == 0
        refused = addcow_cli("control", str(sock), "stream-start", "1M", check=False)
        assert refused.returncode == 1
        assert refused.stderr == "addcow: d.add-cow: already streaming (status paused)\n"
        no_rate = addcow_cli("control", str(sock), "stream-cancel", "1M", check=False)
        assert (no_rate.returncode, no_rate.stderr) == (1, "addcow: stream-cancel takes no RATE\n")
        # A cancel of --stream's own stream, and a start with the serve's --stream-rate.
        assert addcow_cli("control", str(sock), "stream-cancel").stdout == ""
        assert addcow_cli("control", str(sock), "stream-start").stdout == ""
        status = json.loads(addcow_cli("status", "--output=json", str(sock)).stdout)
        stream = status["exports"][0]["stream"]
        assert stream["status"] == "running" and stream["speed"] == 256 << 10
    sock_ro = tmp_path / "control-ro.sock"
    with served(tmp_path, image, args=("--control", str(sock_ro), "--read-only"), name="ro"):
        refused = addcow_cli("control", str(sock_ro), "stream-start", check=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            "addcow: d.add-cow: read-only export; streaming needs it writable\n"
        )
        status = json.loads(addcow_cli("status", "--output=json", str(sock_ro)).stdout)
        assert status["exports"][0]["stream"]["status"] == "none"


def test_a_new_rate_ends_a_wait_computed_under_the_old_one(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    """At 1 byte/s the stream copies one cluster, then would wait 18 hours for the next."""
    image, model = setup
    sock = tmp_path / "control.sock"
    args = ("--control", str(sock), "--stream", "--stream-rate", "1")
    with served(tmp_path, image, args=args) as srv:
        control = Control(sock)
        try:
            wait_until(lambda: control("query")["exports"][0]["stream"]["copied"] > 0)
            assert control("stream-set-rate", speed=0) == {}
            wait_until(lambda: control("query")["exports"][0]["complete"], timeout=20)
            assert control("stream-set-rate", speed=1) == {}  # concluded: nothing waits
            assert control("stream-pause") == {"changed": False}
        finally:
            control.close()
        assert read_all(srv.uri, tmp_path) == bytes(model)


def test_sizes_read_the_same_in_progress_bars_the_log_and_status(tmp_path: Path) -> None:
    """A 255.6 MiB disk over a backing that is one hole: the progress bar of
    ``addcow stream -p``, its summary, ``addcow info``, the server's log and
    ``addcow status`` all say 256 MiB (powers of 1024, three digits)."""
    size = 268017664
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    for name in ("cli", "served"):
        addcow.create(tmp_path / f"{name}.add-cow", image_file=f"{name}.raw",
                      backing_file=base, backing_format="raw")  # fmt: skip
    proc = addcow_cli("stream", "-p", tmp_path / "cli.add-cow")
    lines = proc.stderr.replace("\r", "\n").splitlines()
    assert any(line.endswith("| 0 B of 256 MiB [00:00<?, ?/s]") for line in lines), lines
    assert any("| 256 MiB of 256 MiB [" in line for line in lines), lines
    assert "MB" not in proc.stderr and "GB" not in proc.stderr, lines
    assert ": 0 B copied, 256 MiB left as zero, " in lines[-1], lines
    info = addcow_cli("info", tmp_path / "served.add-cow").stdout
    assert "virtual size: 256 MiB (268017664 bytes)" in info, info
    sock = tmp_path / "control.sock"
    with served(tmp_path, tmp_path / "served.add-cow", args=("--control", str(sock), "--stream")
                ) as srv:  # fmt: skip
        assert srv.logged("stream complete")
        status = addcow_cli("status", str(sock)).stdout
    assert "  stream: concluded, 256 MiB of 256 MiB in the image file" in status, status
    log = srv.stderr()
    assert "streaming 256 MiB from the backing file" in log, log
    assert "stream complete: 0 B copied, 256 MiB left as zero" in log, log


def test_detach_through_the_control_socket(tmp_path: Path, setup: tuple[Path, bytearray]) -> None:
    image, model = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        refused = addcow_cli("control", str(sock), "detach", check=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            "addcow: d.add-cow: not complete: 128 of 128 clusters are still read from the "
            "backing file\n"
        )
        assert image.exists()
        qemu_io(srv.uri, f"write -P 0x42 0 {SIZE}")
        out = addcow_cli("control", str(sock), "detach").stdout
        assert out == f"addcow: detached: serving {tmp_path / 'd.raw'} alone\n"
        assert not image.exists()
        qemu_io(srv.uri, "write -P 0x43 0 4k", "read -P 0x43 0 4k", "read -P 0x42 4k 60k")
        status = json.loads(addcow_cli("status", "--output=json", str(sock)).stdout)
        assert status["exports"][0]["detached"] and status["exports"][0]["backing-file"] is None
        again = addcow_cli("control", str(sock), "detach").stdout  # nothing more to do
        assert again == out
    model[:] = b"\x42" * SIZE
    model[:4096] = b"\x43" * 4096
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"{not json", "not JSON: "),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b'{"execute": "reboot"}', "unknown command 'reboot'; expected one of query, "),
        (b'{"execute": "query", "arguments": {"x": 1}}', "unknown argument 'x' (expected none)"),
        (b'{"execute": "stream-set-rate", "arguments": {"speed": -5}}', "speed: expected bytes"),
        (b'{"execute": "stream-pause"}', "d.add-cow: not streaming (stream-start starts a"),
        (b'{"execute": "stream-cancel"}', "d.add-cow: not streaming (stream-start starts a"),
        (b'{"execute": "stream-start", "arguments": {"export": "nope"}}',
         "export: expected one of 'd.add-cow', found 'nope'"),
        (b'{"execute": "stream-cancel", "arguments": {"export": "nope"}}',
         "export: expected one of 'd.add-cow', found 'nope'"),
        (b'{"execute": "stream-start", "arguments": {"speed": "1M"}}', "speed: expected bytes"),
        (b'{"execute": "stream-start", "arguments": {"rate": 1}}',
         "unknown argument 'rate' (expected export, speed)"),
        (b'{"execute": "flush", "arguments": {"export": "nope"}}',
         "export: expected one of 'd.add-cow', found 'nope'"),
        (b'{"execute": "query", "bogus": true}', "unknown member 'bogus'"),
        (b"\xff\xfe", "not JSON: "),
        (b"[" * 5000 + b"]" * 5000, "not JSON this server reads: nested too deeply"),
        (b'{"execute": "query", "id": NaN}', "not JSON: NaN is not a JSON number"),
        (b'{"execute": "stream-set-rate", "arguments": {"speed": 1e400}}',
         "not JSON: 1e400 is beyond the range of a number"),
    ],
)  # fmt: skip
def test_bad_requests_get_errors_and_serving_goes_on(
    tmp_path: Path, setup: tuple[Path, bytearray], line: bytes, error: str
) -> None:
    image, model = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))) as srv:
        control = Control(sock)
        try:
            reply = control.send_line(line)
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(error), reply
            # The same connection still answers, and NBD clients are served.
            assert control("query")["exports"][0]["name"] == "d.add-cow"
        finally:
            control.close()
        assert read_all(srv.uri, tmp_path) == bytes(model)


def test_an_overlong_line_is_refused_and_the_server_goes_on(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))):
        control = Control(sock)
        try:
            control.sock.sendall(b"{" + b" " * (70 << 10))
            reply = json.loads(control.file.readline())
            assert reply["error"]["desc"] == "request longer than 65536 bytes"
            assert control.file.readline() == b""  # and that connection is closed
        finally:
            control.close()
        second = Control(sock)
        try:
            assert second("query")["server"]["connections"] == 0
        finally:
            second.close()


def test_a_ninth_control_connection_is_told_why_it_is_closed(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    sock = tmp_path / "control.sock"
    with served(tmp_path, image, args=("--control", str(sock))):
        served_ones = [Control(sock) for _ in range(8)]
        try:
            for control in served_ones:  # each is served before the next connects
                assert control("query")["exports"][0]["name"] == "d.add-cow"
            ninth = Control(sock)
            try:
                reply = json.loads(ninth.file.readline())
                assert reply["error"]["desc"] == "too many control connections (at most 8)"
                assert ninth.file.readline() == b""
            finally:
                ninth.close()
        finally:
            for control in served_ones:
                control.close()

        def served_again() -> bool:  # once the server has seen the eight go
            again = Control(sock)
            try:
                return "return" in again.send_line(b'{"execute": "query"}')
            except OSError:
                return False
            finally:
                again.close()

        wait_until(served_again)


def test_the_control_socket_is_private_to_its_owner(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    # A folder anyone may enter, so that only the socket's own mode keeps others out.
    where = Path(tempfile.mkdtemp(prefix="addcow-control-", dir="/tmp"))
    os.chmod(where, 0o755)
    sock = where / "control.sock"
    try:
        with served(tmp_path, image, args=("--control", str(sock))):
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
            if os.getuid() == 0:
                # Another user can connect to a socket open to all in that folder,
                # but not to the control socket.
                with socket.socket(socket.AF_UNIX) as open_to_all:
                    open_to_all.bind(str(where / "open.sock"))
                    open_to_all.listen()
                    os.chmod(where / "open.sock", 0o666)
                    assert connect_as_nobody(where / "open.sock").returncode == 0
                    probe = connect_as_nobody(sock)
                    assert probe.returncode != 0 and "PermissionError" in probe.stderr
        assert not sock.exists()  # removed at exit: this server bound it
    finally:
        shutil.rmtree(where)


def connect_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
    return subprocess.run(
        ["python3", "-c", connect], user=65534, capture_output=True, text=True, timeout=30
    )


def test_a_file_at_the_control_path_is_refused_and_kept(
    tmp_path: Path, setup: tuple[Path, bytearray]
) -> None:
    image, _ = setup
    precious = tmp_path / "precious.txt"
    precious.write_text("important data")
    proc = addcow_cli(
        "serve", "--foreground", "--socket", str(tmp_path / "nbd.sock"),
        "--control", str(precious), str(image), check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr == f"addcow: {precious}: exists and is a regular file, not a socket\n"
    assert precious.read_text() == "important data"
    assert not (tmp_path / "nbd.sock").exists()
