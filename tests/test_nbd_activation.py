"""Socket activation and ``--stdio``, with real peers.

libnbd's ``[ CMD ]`` (nbdinfo, nbdcopy, nbdsh's ``connect_systemd_socket_activation``)
and ``systemd-socket-activate`` start ``addcow serve`` with a listening socket on
fd 3, LISTEN_PID and LISTEN_FDS; ``connect_command`` runs ``addcow serve --stdio``
on a socketpair. Every subprocess has a timeout, so a server that hangs fails
its test.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import (
    ADDCOW,
    BIN,
    PipeChannel,
    RawClient,
    activation_cmd,
    env_with_addcow,
    raw_client_over,
)

import addcow

SIZE = 16 * CLUSTER
TIMEOUT = 60


@pytest.fixture
def image(tmp_path: Path, base_raw: Path) -> Path:
    """An add-cow image over base_raw with data, zeroes and backing clusters."""
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file=base_raw, backing_format="raw")
    with addcow.open(path) as img:
        img.write(pattern(0xA0, CLUSTER), 0)
        img.write_zeroes(2 * CLUSTER, CLUSTER)
        img.write(pattern(0xA9, CLUSTER), 9 * CLUSTER)
    return path


def content(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, img.size)


def tool_env(tool: str) -> dict[str, str]:
    """PATH with the tool's own folder first (nbdsh runs Debian's python3), then addcow's."""
    env = env_with_addcow()
    env["PATH"] = f"{os.path.dirname(tool)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    return env


def peer(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a client that starts addcow itself; a hang fails after TIMEOUT seconds."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT, env=tool_env(cmd[0])
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def unlocked(path: Path) -> bool:
    """True once ``path`` opens read-write (the server that had it has exited)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with addcow.open(path):
                return True
        except addcow.AddCowError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


# -- libnbd's [ CMD ]: socket activation ---------------------------------------------------


def test_nbdinfo_size_and_map_through_socket_activation(tmp_path: Path, image: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    proc = peer([nbdinfo, "--size", "--", "[", ADDCOW, "serve", str(image), "]"])
    # stdout is nbdinfo's alone: the ready line went to stderr.
    assert proc.stdout == f"{SIZE}\n"
    assert f"addcow: serving {image} on nbd+unix:///?socket=" in proc.stderr
    entries = json.loads(addcow_cli("map", "--output=json", image).stdout)
    proc = peer([nbdinfo, "--json", "--map=qemu:allocation-depth", "--",
                 "[", ADDCOW, "serve", "--read-only", str(image), "]"])  # fmt: skip
    got = [(e["offset"], e["length"], e["type"]) for e in json.loads(proc.stdout)]
    want = [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in entries]
    assert _merged(got) == _merged(want)
    assert {t for _, _, t in got} == {1, 2}  # control: both layers appear
    assert unlocked(image)


def _merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for start, length, value in runs:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((start, length, value))
    return out


def test_nbdcopy_through_socket_activation_copies_the_disk(tmp_path: Path, image: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    qemu_img = require_tool("qemu-img")
    out = tmp_path / "out.raw"
    peer([nbdcopy, "--", "[", ADDCOW, "serve", str(image), "]", str(out)])
    ref = tmp_path / "ref.raw"
    addcow_cli("convert", image, ref)
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(out), str(ref)])
    assert out.read_bytes() == content(image)  # control: qemu-img compared real bytes
    assert unlocked(image)


def test_nbdsh_socket_activation_reads_and_writes(tmp_path: Path, image: Path) -> None:
    nbdsh = require_tool("nbdsh")
    script = f"""
import json, nbd
h = nbd.NBD()
h.connect_systemd_socket_activation(["addcow", "serve", {str(image)!r}])
h.pwrite(b"activated", {4 * CLUSTER + 10})
h.flush()
r = {{"size": h.get_size(), "head": h.pread(4, 0).hex(), "back": h.pread(9, {4 * CLUSTER + 10})}}
r["back"] = r["back"].decode()
h.shutdown()
print(json.dumps(r))
"""
    result = json.loads(peer([nbdsh, "-c", script]).stdout.splitlines()[-1])
    assert result == {"size": SIZE, "head": "a0" * 4, "back": "activated"}
    assert unlocked(image)
    data = content(image)
    assert data[4 * CLUSTER + 10 : 4 * CLUSTER + 19] == b"activated"
    assert data[4 * CLUSTER : 4 * CLUSTER + 10] == pattern(0x14, 10)  # copy on write kept


def test_stdio_under_socket_activation_is_refused_at_once(tmp_path: Path, image: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    nbdcopy = require_tool("nbdcopy")
    line = "addcow: --stdio cannot be used with socket activation (LISTEN_FDS)"
    proc = peer([nbdinfo, "--size", "--", "[", ADDCOW, "serve", "--stdio", str(image), "]"],
                check=False)  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert line in proc.stderr.splitlines() and "Traceback" not in proc.stderr, proc.stderr
    out = tmp_path / "out.raw"
    proc = peer([nbdcopy, "--", "[", ADDCOW, "serve", "--stdio", str(image), "]", str(out)],
                check=False)  # fmt: skip
    assert proc.returncode != 0
    assert line in proc.stderr.splitlines() and "Traceback" not in proc.stderr, proc.stderr


# -- systemd-socket-activate ----------------------------------------------------------------


def _activate(*args: str) -> subprocess.Popen[bytes]:
    """``systemd-socket-activate ARGS``: without -a it execs the server in its own process."""
    tool = require_tool("systemd-socket-activate")
    return subprocess.Popen(
        [tool, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_with_addcow()
    )


def _listening(path: Path) -> bool:
    """Whether a Unix socket bound at ``path`` listens (``__SO_ACCEPTCON`` in
    /proc/net/unix): the file appears at bind(), before listen(), and a connection
    in between is refused. Asked without connecting, which with Accept=yes would
    start a server."""
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False


def _wait_listening(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not _listening(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never listened")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the server did not stop on SIGTERM") from None
    return proc.returncode, out.decode(), err.decode()


def test_systemd_socket_activate_unix(tmp_path: Path, image: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    path = tmp_path / "activated.sock"
    proc = _activate("-l", str(path), ADDCOW, "serve", str(image))
    try:
        _wait_listening(path)
        ino = path.stat().st_ino
        uri = f"nbd+unix:///?socket={path}"
        # The server starts on the first connection and serves every later one.
        for _ in range(2):
            assert run([nbdinfo, "--size", uri]).stdout == f"{SIZE}\n"
        fdinfo = Path(f"/proc/{proc.pid}/fdinfo/3").read_text()
        flags = int(fdinfo.split("flags:", 1)[1].split()[0], 8)
        assert flags & os.O_CLOEXEC, fdinfo  # not passed on to anything the server runs
    finally:
        status, out, err = _stop(proc)
    assert status == 0, err
    assert out == ""
    assert f"addcow: serving {image} on {uri}" in err.splitlines()
    # The socket belongs to the launcher: the server leaves it in place.
    assert path.stat().st_ino == ino
    assert unlocked(image)


def test_systemd_socket_activate_tcp(tmp_path: Path, image: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = _activate("-l", f"127.0.0.1:{port}", ADDCOW, "serve", "--read-only", str(image))
    uri = f"nbd://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 10
        while True:
            got = subprocess.run([nbdinfo, "--size", uri], capture_output=True, text=True,
                                 timeout=TIMEOUT)  # fmt: skip
            if got.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got.stdout == f"{SIZE}\n", got.stderr
    finally:
        status, out, err = _stop(proc)
    assert status == 0, err
    assert out == ""
    assert f"addcow: serving {image} on {uri}" in err.splitlines()


@pytest.mark.parametrize("style", ["accept", "accept-stdio", "inetd-stdio"])
def test_systemd_socket_activate_one_server_per_connection(
    tmp_path: Path, image: Path, style: str
) -> None:
    """Accept=yes: each connection gets its own server, on fd 3 or on stdin/stdout."""
    path = tmp_path / "each.sock"
    flags = ["-a", "--inetd"] if style == "inetd-stdio" else ["-a"]
    stdio = ["--stdio"] if style.endswith("stdio") else []
    proc = _activate(*flags, "-l", str(path), ADDCOW, "serve", *stdio, str(image))
    try:
        _wait_listening(path)
        for i in range(2):
            with RawClient(str(path), timeout=30) as c:
                c.start()
                c.request(1, offset=5 * CLUSTER, length=4, cookie=7, data=b"w%03d" % i)
                assert c.simple_reply() == (0, 7)
                assert c.read(5 * CLUSTER, 4, cookie=8) == b"w%03d" % i
                c.request(2)  # NBD_CMD_DISC: the server flushes and exits
            assert unlocked(image)
    finally:
        _status, _out, err = _stop(proc)  # the launcher's own status on SIGTERM
    assert "Traceback" not in err, err
    assert content(image)[5 * CLUSTER : 5 * CLUSTER + 4] == b"w001"


def test_activation_refuses_what_makes_no_sense(tmp_path: Path, image: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "l.sock"))
    listener.listen()
    fd = listener.fileno()
    cases = {
        ("--socket", str(tmp_path / "x.sock")): "--socket cannot be used with socket "
        "activation (LISTEN_FDS)",
        ("--port", "10809"): "--port cannot be used with socket activation (LISTEN_FDS)",
        ("--bind", "127.0.0.1"): "--bind cannot be used with socket activation (LISTEN_FDS)",
        ("--pidfile", str(tmp_path / "p.pid")): "--pidfile cannot be used with socket "
        "activation (LISTEN_FDS)",
        ("--stdio",): "--stdio cannot be used with socket activation (LISTEN_FDS)",
    }
    try:
        for args, message in cases.items():
            proc = subprocess.run(
                activation_cmd(fd, "serve", *args, str(image)), pass_fds=(fd,),
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert (proc.returncode, proc.stderr) == (1, f"addcow: {message}\n")
        for count in ("2", "0", "x"):
            proc = subprocess.run(
                activation_cmd(fd, "serve", str(image), listen_fds=count), pass_fds=(fd,),
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert proc.returncode == 1
            assert proc.stderr == (
                f"addcow: socket activation passed LISTEN_FDS={count}: "
                "addcow serve takes exactly 1 socket\n"
            )
        with open(tmp_path / "not-a-socket", "w") as f:
            proc = subprocess.run(
                activation_cmd(f.fileno(), "serve", str(image)), pass_fds=(f.fileno(),),
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (
            1, "addcow: socket activation: fd 3 is not a socket\n"
        )  # fmt: skip
        assert not (tmp_path / "x.sock").exists() and not (tmp_path / "p.pid").exists()
    finally:
        listener.close()
    assert unlocked(image)


def test_listen_variables_for_another_process_are_ignored(tmp_path: Path, image: Path) -> None:
    env = env_with_addcow()
    env.update(LISTEN_PID="1", LISTEN_FDS="1")
    sock = tmp_path / "own.sock"
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--socket", str(sock), str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line == f"addcow: serving {image} on nbd+unix:///?socket={sock}\n"
    finally:
        status, _out, err = _stop(proc)
    assert status == 0, err


# -- --stdio -----------------------------------------------------------------------------------


def test_nbdsh_connect_command_on_a_socketpair(tmp_path: Path, image: Path) -> None:
    nbdsh = require_tool("nbdsh")
    script = f"""
import json, nbd
h = nbd.NBD()
h.connect_command(["addcow", "serve", "--stdio", {str(image)!r}])
h.pwrite(b"stdio", {6 * CLUSTER})
h.flush()
print(json.dumps({{"head": h.pread(2, 0).hex(), "back": h.pread(5, {6 * CLUSTER}).decode()}}))
h.shutdown()
"""
    result = json.loads(peer([nbdsh, "-c", script]).stdout.splitlines()[-1])
    assert result == {"head": "a0a0", "back": "stdio"}
    assert unlocked(image)
    assert content(image)[6 * CLUSTER : 6 * CLUSTER + 5] == b"stdio"


def test_stdio_on_pipes(tmp_path: Path, image: Path) -> None:
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--stdio", str(image)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    channel = PipeChannel(proc.stdout.fileno(), proc.stdin.fileno(), timeout=30)
    try:
        c = raw_client_over(channel)
        c.start()
        assert c.read(0, 8) == pattern(0xA0, 8)
        c.request(1, offset=7 * CLUSTER, length=5, cookie=3, data=b"piped")
        assert c.simple_reply() == (0, 3)
        c.request(2)
        proc.stdin.close()
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode() if proc.stderr else ""
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert "Traceback" not in err, err
    assert content(image)[7 * CLUSTER : 7 * CLUSTER + 5] == b"piped"


def _stdio_refused(image: Path, stdin: int, stdout: int) -> str:
    proc = subprocess.run(
        [ADDCOW, "serve", "--stdio", str(image)], stdin=stdin, stdout=stdout,
        stderr=subprocess.PIPE, timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 1
    return proc.stderr.decode()


def test_stdio_refuses_a_regular_file(tmp_path: Path, image: Path) -> None:
    """``addcow serve --stdio img > file``, from a pipe and from a terminal."""
    out = tmp_path / "file"
    main, tty = pty.openpty()
    try:
        for stdin in (subprocess.PIPE, tty):
            with open(out, "wb") as f:
                err = _stdio_refused(image, stdin, f.fileno())
            assert err == (
                "addcow: --stdio needs a socket or pipe on stdin/stdout, found a regular file\n"
            )
            assert out.read_bytes() == b""
    finally:
        os.close(main)
        os.close(tty)
    assert unlocked(image)


def test_stdio_refuses_a_terminal_and_a_device(tmp_path: Path, image: Path) -> None:
    main, tty = pty.openpty()
    try:
        err = _stdio_refused(image, tty, tty)
    finally:
        os.close(main)
        os.close(tty)
    assert err == "addcow: --stdio needs a socket or pipe on stdin/stdout, found a terminal\n"
    with open(os.devnull, "r+b") as null:
        err = _stdio_refused(image, null.fileno(), null.fileno())
    assert err == (
        "addcow: --stdio needs a socket or pipe on stdin/stdout, found a character device\n"
    )
    assert unlocked(image)


def test_stdio_refuses_a_pidfile(tmp_path: Path, image: Path) -> None:
    pidfile = tmp_path / "p.pid"
    proc = subprocess.run(
        [ADDCOW, "serve", "--stdio", "--pidfile", str(pidfile), str(image)],
        stdin=subprocess.PIPE, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr == b"addcow: --pidfile cannot be used with --stdio\n"
    assert not pidfile.exists()
