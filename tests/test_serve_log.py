"""Where ``addcow serve`` logs: ``--log-file``, ``--log-format json``, syslog, the detached server.

Each test starts the installed command as an operator would, connects real
clients (nbdinfo, qemu-io) and reads the log the server left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from nbd_util import ADDCOW, env_with_addcow, served, snapshot

import addcow
from addcow.cli import serve_log

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(4 * MiB))
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file=base, backing_format="raw")
    return path


def use(uri: str) -> None:
    """One client that writes and reads: nbdinfo can't write, qemu-io can."""
    proc = subprocess.run(
        [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "read 1M 4k",
         uri], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def wait_gone(pidfile: Path) -> None:
    deadline = time.monotonic() + 30
    while pidfile.exists():
        if time.monotonic() > deadline:
            raise AssertionError("the server did not exit")
        time.sleep(0.05)


def test_a_detached_server_logs_to_its_log_file_as_json(tmp_path: Path, image: Path) -> None:
    log, pidfile, sock = tmp_path / "serve.log", tmp_path / "serve.pid", tmp_path / "nbd.sock"
    out = addcow_cli(
        "serve", "--socket", sock, "--pidfile", pidfile, "--log-file", log,
        "--log-format", "json", image,
    )  # fmt: skip
    assert out.stderr == ""
    uri = out.stdout.strip().rsplit(" on ", 1)[1]
    use(uri)
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait_gone(pidfile)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries and all(
        set(e) >= {"time", "level", "logger", "message", "pid"} and e["time"].endswith("Z")
        for e in entries
    ), entries
    served = [e for e in entries if "serving export 'd.add-cow'" in e["message"]]
    closed = [e for e in entries if " closed: 1 reads (4096 bytes), 1 writes (65536 bytes)"
              in e["message"]]  # fmt: skip
    assert len(served) == 1 and len(closed) == 1, entries
    assert served[0]["export"] == closed[0]["export"] == "d.add-cow"
    assert served[0]["level"] == "info" and "client" in served[0]
    # A client's close may be logged after the signal: "stopped" comes after both.
    assert "shutting down" in [e["message"] for e in entries]
    assert entries[-1]["message"] == "stopped"
    assert os.stat(log).st_mode & 0o777 == 0o600


def test_a_foreground_server_logs_text_to_stderr_and_the_file(
    tmp_path: Path, image: Path
) -> None:
    log, sock = tmp_path / "serve.log", tmp_path / "nbd.sock"
    log.write_text("an earlier line\n")
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--socket", str(sock), "--log-file", str(log),
         str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_with_addcow(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip().rsplit(" on ", 1)[1]
        use(uri)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    text = log.read_text().splitlines()
    assert text[0] == "an earlier line"  # appended to, never truncated
    assert any(" INFO addcow serve[" in line and "serving export 'd.add-cow'" in line
               for line in text), text  # fmt: skip
    assert "addcow serve: connection 1: serving export 'd.add-cow'" in err


def test_log_file_mistakes_are_one_line_and_change_nothing(tmp_path: Path, image: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    for args, message in (
        (("--log-file", str(folder)), f"addcow: --log-file {folder}: Is a directory"),
        (("--log-file", str(tmp_path / "no" / "x.log")),
         f"addcow: --log-file {tmp_path / 'no' / 'x.log'}: No such file or directory"),
        (("--log-file", "x.log", "--syslog"), "addcow: --log-file and --syslog: give one"),
    ):  # fmt: skip
        proc = addcow_cli("serve", "--foreground", "--socket", tmp_path / "s.sock", *args, image,
                          check=False)  # fmt: skip
        assert (proc.returncode, proc.stderr) == (1, message + "\n")
    assert list(folder.iterdir()) == [] and not (tmp_path / "s.sock").exists()


def test_a_log_file_that_is_a_disk_image_is_refused(tmp_path: Path, image: Path) -> None:
    """A disk image named as --log-file by mistake: the lines appended would change it."""
    golden, other = tmp_path / "golden.qcow2", tmp_path / "other.add-cow"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(golden), "1M"])
    addcow.create(other, image_file="other.raw", size=MiB)
    before = snapshot(golden, other)
    for path, holds in ((golden, "a qcow2 image"), (other, "an add-cow image")):
        proc = addcow_cli("serve", "--foreground", "--socket", tmp_path / "s.sock",
                          "--log-file", path, image, check=False)  # fmt: skip
        assert (proc.returncode, proc.stderr) == (1, (
            f"addcow: --log-file {path}: the file exists and holds {holds}; refusing to "
            "append the log to it (give another log file)\n"
        ))  # fmt: skip
    assert snapshot(golden, other) == before and not (tmp_path / "s.sock").exists()


def test_syslog_or_a_clear_word_that_there_is_none(tmp_path: Path, image: Path) -> None:
    pidfile, sock = tmp_path / "serve.pid", tmp_path / "nbd.sock"
    if serve_log.syslog_available():
        out = addcow_cli("serve", "--socket", sock, "--pidfile", pidfile, image)
        assert out.stderr == ""  # it logs to syslog
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        wait_gone(pidfile)
        return
    refused = addcow_cli("serve", "--syslog", "--socket", sock, image, check=False)
    assert (refused.returncode, refused.stderr) == (
        1, "addcow: --syslog: no syslog socket at /dev/log\n"
    )  # fmt: skip
    out = addcow_cli("serve", "--socket", sock, "--pidfile", pidfile, image)
    assert out.stdout.startswith("addcow: serving ")
    assert out.stderr == serve_log.NO_LOG_WARNING + "\n"
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait_gone(pidfile)


@pytest.mark.parametrize("mode", ["foreground", "detached"])
def test_a_log_file_that_is_a_fifo_is_refused_not_waited_on(
    tmp_path: Path, image: Path, mode: str
) -> None:
    """Opening a FIFO for writing blocks until a reader comes; --log-file refuses it
    at once (with or without a reader), as it refuses a directory or a device."""
    fifo, sock = tmp_path / "log.fifo", tmp_path / "s.sock"
    os.mkfifo(fifo)
    where = ("--foreground",) if mode == "foreground" else ("--pidfile", tmp_path / "s.pid")
    for reader in (False, True):
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else -1
        try:
            proc = subprocess.run(
                [ADDCOW, "serve", *map(str, where), "--socket", str(sock),
                 "--log-file", str(fifo), str(image)],
                capture_output=True, text=True, timeout=15, env=env_with_addcow(),
            )  # fmt: skip
        finally:
            if fd >= 0:
                os.close(fd)
        assert (proc.returncode, proc.stderr) == (
            1, f"addcow: --log-file {fifo}: is a named pipe, not a regular file\n"
        )  # fmt: skip
        assert proc.stdout == ""
    assert fifo.is_fifo() and not sock.exists() and not (tmp_path / "s.pid").exists()
    proc = addcow_cli("serve", "--foreground", "--socket", sock, "--log-file", "/dev/null", image,
                      check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        1, "addcow: --log-file /dev/null: is a character device, not a regular file\n"
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["foreground", "detached"])
def test_a_failed_start_removes_the_log_file_it_created_and_no_other(
    tmp_path: Path, image: Path, mode: str
) -> None:
    """An image in use, a socket path that cannot be bound and missing TLS
    credentials fail the start: a log file the start created is gone, one that
    was there is left as it was."""
    other = tmp_path / "other.add-cow"
    addcow.create(other, image_file="other.raw", size=MiB)
    earlier = tmp_path / "earlier.log"
    earlier.write_text("an earlier line\n")
    earlier.chmod(0o640)
    before = earlier.stat()
    where = ("--foreground",) if mode == "foreground" else ()
    with served(tmp_path, image):  # holds the image's write lock
        for failing, message in (
            (("--socket", str(tmp_path / "k.sock"), str(image)),
             f"addcow: {image}: failed to get write lock"),
            (("--socket", str(tmp_path / "no" / "k.sock"), str(other)),
             f"addcow: {tmp_path / 'no' / 'k.sock'}: cannot listen"),
            (("--socket", str(tmp_path / "k.sock"), "--tls-creds", str(tmp_path / "no"),
              str(other)), f"addcow: {tmp_path / 'no'}: "),
        ):  # fmt: skip
            for log in (tmp_path / "new.log", earlier):
                proc = subprocess.run(
                    [ADDCOW, "serve", *where, "--log-file", str(log), *failing],
                    capture_output=True, text=True, timeout=60, env=env_with_addcow(),
                )  # fmt: skip
                assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr
                assert proc.stdout == ""
            assert not (tmp_path / "new.log").exists()
            assert earlier.read_text() == "an earlier line\n"
            after = earlier.stat()
            assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
                before.st_ino, before.st_mode, before.st_mtime_ns
            )  # fmt: skip
    assert not (tmp_path / "k.sock").exists()
