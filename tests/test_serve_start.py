"""``addcow serve`` start-up: a start that fails leaves every file as it was.

A server removes only what it created itself, after it created it: its own
socket, its own pidfile, its private folder. Each failing start below runs in
the foreground and as a daemon (the default), and each compares the files
involved before and after (existence, kind, inode, mtime, size, content).
A server that is still running beside it must stay reachable, with its
pidfile still naming it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, require_tool, run
from nbd_util import ADDCOW, env_with_addcow, served, served_daemon, snapshot

import addcow

SIZE = 4 * CLUSTER

MODES = {"foreground": ("--foreground",), "daemon": ()}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.add-cow"
    addcow.create(path, size=SIZE, image_file="d.raw")
    with addcow.open(path) as img:
        img.write(b"\xa0" * CLUSTER, 0)
    return path


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return MODES[request.param]


def failed_start(*args: str | Path) -> str:
    """Run ``addcow serve ARGS``, which must fail with one ``addcow:`` line; return it."""
    proc = subprocess.run(
        [ADDCOW, "serve", *map(str, args)],
        capture_output=True, text=True, timeout=60, env=env_with_addcow(),
    )  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("addcow: "), proc.stderr
    return lines[0]


def size_over(uri: str) -> int:
    nbdinfo = require_tool("nbdinfo")
    return int(run([nbdinfo, "--size", uri]).stdout)


def test_socket_path_is_a_regular_file(tmp_path: Path, image: Path, mode: tuple[str, ...]) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("data\n")
    pidfile = tmp_path / "new.pid"
    before = snapshot(precious, pidfile)
    line = failed_start(*mode, "--socket", precious, "--pidfile", pidfile, image)
    assert line == f"addcow: {precious}: exists and is a regular file, not a socket"
    assert snapshot(precious, pidfile) == before
    assert precious.read_text() == "data\n"


def test_a_pidfile_that_is_a_disk_image_is_refused(
    tmp_path: Path, image: Path, mode: tuple[str, ...]
) -> None:
    """A disk image named as --pidfile by mistake is refused, never truncated."""
    golden = tmp_path / "golden.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(golden), "1M"])
    before = snapshot(golden)
    line = failed_start(*mode, "--socket", tmp_path / "s.sock", "--pidfile", golden, image)
    assert line == (
        f"addcow: --pidfile {golden}: the file exists and holds a qcow2 image; refusing to "
        "replace it (give another pidfile)"
    )
    assert snapshot(golden) == before and not (tmp_path / "s.sock").exists()


def test_socket_path_is_a_directory(tmp_path: Path, image: Path, mode: tuple[str, ...]) -> None:
    folder = tmp_path / "vm.sock"
    folder.mkdir()
    (folder / "inside").write_text("keep\n")
    before = snapshot(folder)
    line = failed_start(*mode, "--socket", folder, image)
    assert line == f"addcow: {folder}: exists and is a directory, not a socket"
    assert snapshot(folder) == before


def test_socket_and_pidfile_of_a_running_server(
    tmp_path: Path, image: Path, mode: tuple[str, ...]
) -> None:
    sock, pidfile = tmp_path / "vm.sock", tmp_path / "vm.pid"
    other = tmp_path / "other.add-cow"
    addcow.create(other, size=SIZE, image_file="other.raw")
    with served_daemon(sock, pidfile, image, args=("--read-only",)) as a:
        before = snapshot(sock, pidfile)
        # The same socket and pidfile: the pidfile is held by A.
        line = failed_start(*mode, "--socket", sock, "--pidfile", pidfile, other)
        assert line == f"addcow: another server (pid {a.pid}) holds the pidfile {pidfile}"
        assert snapshot(sock, pidfile) == before
        # The same socket and a new pidfile: the socket is A's.
        new_pid = tmp_path / "b.pid"
        line = failed_start(*mode, "--socket", sock, "--pidfile", new_pid, other)
        assert line == f"addcow: {sock}: another server is listening on this socket"
        assert snapshot(sock, pidfile, new_pid) == {**before, str(new_pid): None}
        # A is still reachable, and its pidfile still names it.
        assert size_over(f"nbd+unix:///?socket={sock}") == SIZE
        assert int(pidfile.read_text()) == a.pid
    # (served_daemon stopped A through its pidfile and saw it remove both files.)


def test_pidfile_held_by_a_running_server(
    tmp_path: Path, image: Path, mode: tuple[str, ...]
) -> None:
    sock, pidfile = tmp_path / "a.sock", tmp_path / "vm.pid"
    other = tmp_path / "other.add-cow"
    addcow.create(other, size=SIZE, image_file="other.raw")
    with served_daemon(sock, pidfile, image) as a:
        b_sock = tmp_path / "b.sock"
        before = snapshot(sock, pidfile, b_sock)
        line = failed_start(*mode, "--socket", b_sock, "--pidfile", pidfile, other)
        assert line == f"addcow: another server (pid {a.pid}) holds the pidfile {pidfile}"
        assert snapshot(sock, pidfile, b_sock) == before
        # Refused before the image was opened: it is not locked.
        with addcow.open(other) as img:
            assert img.size == SIZE
        assert size_over(f"nbd+unix:///?socket={sock}") == SIZE


def test_tcp_port_taken(tmp_path: Path, image: Path, mode: tuple[str, ...]) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        fresh = tmp_path / "fresh.pid"
        stale = tmp_path / "stale.pid"
        stale.write_text("12345\n")  # left by a server that is gone: nobody holds it
        before = snapshot(fresh, stale)
        for pidfile in (fresh, stale):
            line = failed_start(*mode, "--port", str(port), "--pidfile", pidfile, image)
            assert line == (
                f"addcow: cannot listen on 127.0.0.1 port {port}: Address already in use"
            )
            assert snapshot(fresh, stale) == before
        # A running server's pidfile, with the port taken: the pidfile is refused first.
        sock, pidfile = tmp_path / "a.sock", tmp_path / "a.pid"
        other = tmp_path / "other.add-cow"
        addcow.create(other, size=SIZE, image_file="other.raw")
        with served_daemon(sock, pidfile, other) as a:
            before = snapshot(sock, pidfile)
            line = failed_start(*mode, "--port", str(port), "--pidfile", pidfile, image)
            assert line == f"addcow: another server (pid {a.pid}) holds the pidfile {pidfile}"
            assert snapshot(sock, pidfile) == before
    finally:
        taken.close()


def test_image_locked_by_another_addcow_process(
    tmp_path: Path, image: Path, mode: tuple[str, ...]
) -> None:
    b_sock, b_pid = tmp_path / "b.sock", tmp_path / "b.pid"
    stale = tmp_path / "stale.pid"
    stale.write_text("12345\n")
    with served(tmp_path, image, name="a.sock") as a:
        a_sock = Path(a.socket)
        before = snapshot(a_sock, b_sock, b_pid, stale)
        for pidfile in (b_pid, stale):
            line = failed_start(*mode, "--socket", b_sock, "--pidfile", pidfile, image)
            assert "failed to get write lock" in line, line
            assert snapshot(a_sock, b_sock, b_pid, stale) == before
        assert size_over(a.uri) == SIZE


def test_stale_socket_is_replaced(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vm.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # a socket file nobody listens on
    with served(tmp_path, image, name="vm.sock") as srv:
        assert size_over(srv.uri) == SIZE
    # (served checked that the server removed the socket it bound.)


def test_files_replaced_while_serving_are_left_alone(tmp_path: Path, image: Path) -> None:
    sock, pidfile = tmp_path / "vm.sock", tmp_path / "vm.pid"
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [ADDCOW, "serve", "--foreground", "--socket", str(sock), "--pidfile", str(pidfile),
             str(image)],
            stdout=subprocess.PIPE, stderr=err, env=env_with_addcow(),
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"addcow: serving ")
        assert int(pidfile.read_text()) == proc.pid
        # Someone else's files now stand at both paths.
        sock.rename(tmp_path / "moved.sock")
        sock.write_text("not the server's\n")
        pidfile.rename(tmp_path / "moved.pid")
        pidfile.write_text("999\n")
        before = snapshot(sock, pidfile)
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    assert status == 0, log.read_text()
    assert snapshot(sock, pidfile) == before


def test_private_folder_is_removed_at_exit(tmp_path: Path, image: Path) -> None:
    env = env_with_addcow()
    env["TMPDIR"] = str(tmp_path / "tmp")
    os.mkdir(env["TMPDIR"])
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--read-only", str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().decode().strip().rsplit(" on ", 1)[1]
        sock = Path(uri.split("socket=", 1)[1])
        assert sock.parent.parent == tmp_path / "tmp" and sock.exists()
        assert size_over(uri) == SIZE
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    assert status == 0
    deadline = time.monotonic() + 5
    while os.listdir(tmp_path / "tmp") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(tmp_path / "tmp") == []


# -- exposure: TCP beyond loopback ---------------------------------------------------


def test_a_writable_export_on_every_address_without_tls_is_refused(
    image: Path, mode: tuple[str, ...]
) -> None:
    before = snapshot(image, image.with_name("d.raw"))
    line = failed_start(*mode, "--bind", "0.0.0.0", "--port", "0", image)
    assert line == (
        "addcow: refusing to export a writable disk on 0.0.0.0 without TLS: anyone who can "
        "reach the port could write it. Give --tls-creds DIR (TLS required), listen on "
        "127.0.0.1 or a Unix socket, serve --read-only, or give --allow-insecure to accept that"
    )
    assert snapshot(image, image.with_name("d.raw")) == before
    # The image was not even opened: it is not locked.
    with addcow.open(image):
        pass


def _start_tcp(*args: str | Path) -> tuple[subprocess.Popen[str], str, str]:
    """``addcow serve --foreground ARGS``; its ready line and what it said before it."""
    proc = subprocess.Popen([ADDCOW, "serve", "--foreground", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with_addcow())  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    ready = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc, ready, err


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        (("--read-only",), "serving on 0.0.0.0 without TLS: anyone who can reach it can read "
                           "the disk"),
        (("--allow-insecure",), "INSECURE: serving a writable disk on 0.0.0.0 without TLS "
                                "(--allow-insecure)"),
    ],
    ids=["read-only", "allow-insecure"],
)  # fmt: skip
def test_what_the_network_can_reach_is_said_loudly(
    image: Path, extra: tuple[str, ...], warning: str
) -> None:
    _proc, ready, err = _start_tcp(*extra, "--bind", "0.0.0.0", "--port", "0", image)
    assert ready.startswith("addcow: serving ") and " on nbd://0.0.0.0:" in ready
    assert err.splitlines()[0].startswith(f"addcow serve: {warning}"), err


def test_loopback_needs_no_warning(image: Path) -> None:
    for host in ("127.0.0.1", "localhost"):
        _proc, ready, err = _start_tcp("--bind", host, "--port", "0", image)
        assert " on nbd://127.0.0.1:" in ready
        assert "TLS" not in err, err


def test_an_unknown_event_loop_is_one_line(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADDCOW_EVENT_LOOP", "trio")
    line = failed_start("--foreground", "--socket", tmp_path / "s.sock", image)
    assert line == "addcow: ADDCOW_EVENT_LOOP: expected asyncio or uvloop, found 'trio'"
    assert not (tmp_path / "s.sock").exists()
