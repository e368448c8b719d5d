"""Handing a complete export over to QEMU (``--handoff-qmp``, the control socket's ``handoff``).

QEMU runs paused (``-S``, ``-machine microvm``, no kernel): its block layer and
QMP work, and a virtio-blk device on the NBD node is enough to switch the graph.
A second QMP socket lets the test look at the graph. The image::

    cluster  0..15 (1 MiB)   0x5a  from the backing, streamed into the image file
             16..31 (1 MiB)  0xa5  written through the server before the handoff
             the rest        zero

The guest test (real I/O across the handoff) is in ``test_handoff_guest.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import addcow, require_tool, run
from nbd_util import env_with_addcow, served

MiB = 1 << 20
HERE = Path(__file__).parent


class Monitor:
    """A blocking QMP client for the test's own look at QEMU."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        assert "QMP" in json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                break
        if "error" in reply:
            raise AssertionError(f"{command}: {reply['error']}")
        return reply["return"]

    def nodes(self) -> dict[str, dict[str, object]]:
        found = self.execute("query-named-block-nodes", flat=True)
        assert isinstance(found, list)
        return {n["node-name"]: n for n in found}

    def device_node(self) -> dict[str, object]:
        blocks = self.execute("query-block")
        assert isinstance(blocks, list)
        return blocks[0]["inserted"]


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    qmp: Path  # for the server
    monitor: Monitor  # for the test


@contextmanager
def qemu(tmp_path: Path, *drive: str, machine: str = "microvm") -> Iterator[Qemu]:
    """A paused QEMU with a second QMP socket, until the block ends (then SIGTERM)."""
    qmp, watch = tmp_path / "qmp.sock", tmp_path / "watch.sock"
    cmd = [require_tool("qemu-system-x86_64"), "-S", "-nodefaults", "-no-user-config",
           "-display", "none", "-machine", machine, "-accel", "tcg",
           "-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{watch},server=on,wait=off",
           *drive]  # fmt: skip
    log = tmp_path / "qemu.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:  # the socket file exists from bind(); connections wait for listen()
            try:
                monitor = Monitor(watch)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "QEMU did not listen on its QMP socket"
                time.sleep(0.02)
        yield Qemu(proc, qmp, monitor)
        assert proc.poll() is None, f"QEMU died: {log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def blockdev(sock: str, export: str = "", extra: str = "") -> tuple[str, ...]:
    name = f",export={export}" if export else ""
    return ("-blockdev",
            f"driver=nbd,server.type=unix,server.path={sock}{name}{extra},node-name=proto",
            "-blockdev", "driver=raw,file=proto,node-name=fmt,detect-zeroes=on",
            "-device", "virtio-blk-device,drive=fmt")  # fmt: skip


def legacy_drive(sock: str, device: str = "virtio-blk-device,drive=d0") -> tuple[str, ...]:
    return ("-drive", f"file=nbd+unix:///?socket={sock},format=raw,if=none,id=d0,cache=none",
            "-device", device)  # fmt: skip


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """disk.add-cow over base.raw, 4 MiB: 1 MiB of 0x5a in the backing, the rest zero."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * MiB + bytes(3 * MiB))
    addcow("create", "-q", "-b", "base.raw", "-F", "raw", "-o", "image_file=disk.raw",
           "disk.add-cow", cwd=tmp_path)  # fmt: skip
    return tmp_path / "disk.add-cow"


def write_through(uri: str) -> None:
    run([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0xa5 1M 1M", uri])


def expected_disk() -> bytes:
    return b"\x5a" * MiB + b"\xa5" * MiB + bytes(2 * MiB)


def check_on_raw(q: Qemu, node: str, raw: Path) -> None:
    """QEMU's device runs on a file node on ``raw``, no NBD node is left, and the raw
    file holds the disk."""
    nodes = q.monitor.nodes()
    assert not [n for n in nodes.values() if n["drv"] == "nbd"], nodes
    top = q.monitor.device_node()
    assert top["node-name"] == node
    assert top["file"] == str(raw)
    assert raw.read_bytes() == expected_disk()


def control(ctl: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return addcow("control", ctl, *args, check=check)


def test_handoff_qmp_of_a_complete_image_blockdev(tmp_path: Path, image: Path) -> None:
    """--handoff-qmp, complete at start: handed over once QEMU connects; the format
    node is reopened on the file, the NBD node deleted, the .add-cow detached, and
    the server exits 0 on its own."""
    addcow("stream", image)
    with served(tmp_path, image, args=("--handoff-qmp", str(tmp_path / "qmp.sock"))) as srv:
        write_through(srv.uri)
        with qemu(tmp_path, *blockdev(srv.socket)) as q:
            srv.proc.wait(timeout=60)
            log = srv.stderr()
            assert "handed over to QEMU: device" in log, log
            assert "every export is handed over to QEMU: stopping" in log
            check_on_raw(q, "fmt", tmp_path / "disk.raw")
            fmt = q.monitor.nodes()["fmt"]
            assert fmt["detect_zeroes"] == "on"  # the format node's options are kept
    assert not image.exists()


def test_handoff_by_control_drive_form_refused_until_complete(tmp_path: Path, image: Path) -> None:
    """-drive (generated node names, cache=none): refused while incomplete, with
    everything still served; after stream-start, handed over by the operator."""
    ctl = tmp_path / "ctl.sock"
    with (
        served(tmp_path, image, args=("--control", str(ctl))) as srv,
        qemu(tmp_path, *legacy_drive(srv.socket)) as q,
    ):
        refused = control(ctl, "handoff", str(q.qmp), check=False)
        assert refused.returncode == 1
        assert "not complete: 64 of 64 clusters are still read" in refused.stderr
        write_through(srv.uri)
        control(ctl, "stream-start")
        assert srv.logged("complete: every cluster is in")
        done = control(ctl, "handoff", str(q.qmp))
        raw = tmp_path / "disk.raw"
        assert f"runs on node addcow-raw0 ({raw})" in done.stdout
        srv.proc.wait(timeout=60)
        check_on_raw(q, "addcow-raw0", raw)
        file_node = q.monitor.nodes()["addcow-file0"]
        assert file_node["cache"]["direct"] is True  # as the NBD node had it
    assert not image.exists()


def test_handoff_refused_when_qemus_node_is_not_ours(tmp_path: Path, image: Path) -> None:
    """QEMU's disk is another export of this server, or another server's export:
    refused, QEMU's graph unchanged, everything still served."""
    addcow("stream", image)
    other = tmp_path / "other.add-cow"
    addcow("create", "-q", "-o", "image_file=other.raw", other, "4M", cwd=tmp_path)
    (tmp_path / "b").mkdir()
    third = tmp_path / "b" / "third.add-cow"
    addcow("create", "-q", "-o", "image_file=third.raw", third, "4M", cwd=tmp_path / "b")
    ctl = tmp_path / "ctl.sock"
    args = ("--control", str(ctl), "--export-name", "disk", "--export-name", "other")
    with served(tmp_path, image, other, args=args) as srv, served(tmp_path / "b", third) as srv_b:
        for sock, export in ((srv.socket, "other"), (srv_b.socket, "")):
            with qemu(tmp_path, *blockdev(sock, export)) as q:
                refused = control(ctl, "handoff", str(q.qmp), "--export", "disk", check=False)
                assert refused.returncode == 1
                assert "QEMU's node is not ours" in refused.stderr, refused.stderr
                assert "serving as before" in refused.stderr
                assert q.monitor.nodes()["proto"]["drv"] == "nbd"
                assert q.monitor.device_node()["node-name"] == "fmt"
            status = json.loads(addcow("status", "--output=json", ctl).stdout)
            assert status["exports"][0]["handoff"]["status"] == "failed"
            write_through(srv.uri.replace(":///", ":///disk"))
        assert srv.proc.poll() is None and srv_b.proc.poll() is None
    assert image.exists()


def lock_refused(raw: Path) -> bool:
    """Whether a writer (qemu-io) is refused the raw file: the server holds its locks."""
    out = run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 512", str(raw)], check=False)
    return out.returncode != 0 and "lock" in out.stderr


def hold_write_unshared(raw: Path) -> int:
    """Another process's QEMU-protocol lock on ``raw``: byte 201, "I do not share
    write" (block/file-posix.c). QEMU then refuses to take write on the file."""
    fd = os.open(raw, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 201, 1, 0))
    return fd


def test_handoff_undone_when_qemu_refuses_half_way(tmp_path: Path, image: Path) -> None:
    """QEMU refuses a step. The raw file renamed: blockdev-add cannot open it. A third
    process holding a lock on the raw file that denies writers: the file node is added,
    then QEMU refuses the switch (blockdev-reopen; qom-set for -drive). Each time the
    added nodes are deleted, the device stays on NBD, the server serves as before, and
    once the obstacle is gone the next handoff goes through."""
    addcow("stream", image)
    ctl = tmp_path / "ctl.sock"
    raw = tmp_path / "disk.raw"
    with served(tmp_path, image, args=("--control", str(ctl))) as srv:
        raw.rename(tmp_path / "moved.raw")
        with qemu(tmp_path, *blockdev(srv.socket)) as q:
            refused = control(ctl, "handoff", str(q.qmp), check=False)
            assert "QEMU refused blockdev-add" in refused.stderr, refused.stderr
            assert "serving as before" in refused.stderr
            assert set(q.monitor.nodes()) == {"proto", "fmt"}
            (tmp_path / "moved.raw").rename(raw)
            assert lock_refused(raw)  # the server has its locks back
            fd = hold_write_unshared(raw)
            try:
                refused = control(ctl, "handoff", str(q.qmp), check=False)
                assert "QEMU refused blockdev-reopen" in refused.stderr, refused.stderr
                assert '"write" lock' in refused.stderr
                assert set(q.monitor.nodes()) == {"proto", "fmt"}
                write_through(srv.uri)  # served as before
            finally:
                os.close(fd)
        with qemu(tmp_path, *legacy_drive(srv.socket)) as q:
            before = set(q.monitor.nodes())
            fd = hold_write_unshared(raw)
            try:
                refused = control(ctl, "handoff", str(q.qmp), check=False)
                assert "QEMU refused qom-set" in refused.stderr, refused.stderr
                assert set(q.monitor.nodes()) == before
            finally:
                os.close(fd)
            control(ctl, "handoff", str(q.qmp))
            srv.proc.wait(timeout=60)
            check_on_raw(q, "addcow-raw0", raw)
    assert not image.exists()


def test_server_killed_between_lock_release_and_switch(tmp_path: Path, image: Path) -> None:
    """SIGKILL right after the locks are released (fault point): QEMU is still on
    its NBD node, the raw file holds every acknowledged write, the .add-cow file is
    there and complete. A new server on the same socket, which QEMU's NBD node
    reconnects to (reconnect-delay), finishes the handoff."""
    addcow("stream", image)
    sock, ctl, raw = tmp_path / "nbd.sock", tmp_path / "ctl.sock", tmp_path / "disk.raw"
    args = ["serve", "--foreground", "--socket", str(sock), "--control", str(ctl), str(image)]
    dying = subprocess.Popen([sys.executable, str(HERE / "handoff_kill_server.py"), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env_with_addcow())  # fmt: skip
    assert dying.stdout is not None and dying.stdout.readline().startswith(b"addcow: serving")
    uri = f"nbd+unix:///?socket={sock}"
    write_through(uri)
    with qemu(tmp_path, *blockdev(str(sock), extra=",reconnect-delay=10")) as q:
        control(ctl, "handoff", str(q.qmp), check=False)
        assert dying.wait(timeout=30) == -signal.SIGKILL
        assert q.monitor.nodes()["proto"]["drv"] == "nbd"
        assert q.monitor.device_node()["node-name"] == "fmt"
        assert raw.read_bytes() == expected_disk()
        info = json.loads(addcow("info", "--output=json", image).stdout)["format-specific"]
        assert info["data"]["complete"] is True
        assert addcow("check", image).returncode == 0
        with served(tmp_path, image, args=("--control", str(ctl))) as srv:
            assert srv.socket == str(sock)
            control(ctl, "handoff", str(q.qmp))
            srv.proc.wait(timeout=60)
        check_on_raw(q, "fmt", raw)
    assert not image.exists()
    for stream in (dying.stdout, dying.stderr):
        if stream is not None:
            stream.close()
