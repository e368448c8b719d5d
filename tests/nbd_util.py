"""Helpers for the NBD tests: run a real ``addcow serve``, and a raw-socket client.

``served(...)`` starts the installed ``addcow`` script exactly as a user would,
waits for its ready line, and on exit sends SIGTERM and checks that the
server exited 0 after a clean shutdown. ``InProcessServer`` runs the server
in a thread of the test's process, where a test may look at the library's
calls. ``RawClient`` speaks the NBD wire format byte by byte (for the
hostile-input tests); it checks nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool

from addcow.image import AddCowImage
from addcow.serve.export import Export
from addcow.serve.server import NBDServer

BIN = Path(sys.executable).parent
ADDCOW = str(BIN / "addcow")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF


def env_with_addcow() -> dict[str, str]:
    """The environment with the venv's bin first on PATH (for connect_command)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for_log(log: Path, text: str, timeout: float = 10) -> bool:
    """Whether ``text`` appears in ``log`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    uri: str
    socket: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether the server logs ``text`` within ``timeout`` seconds."""
        return wait_for_log(self.log, text, timeout)


@contextmanager
def served(
    tmp_path: Path, *files: Path | str, args: tuple[str, ...] = (), name: str = "nbd.sock"
) -> Iterator[Server]:
    """Run ``addcow serve --foreground --socket`` on ``files`` until the block ends."""
    sock = tmp_path / name
    log = tmp_path / f"{name}.log"
    cmd = [ADDCOW, "serve", "--foreground", "-v", "--socket", str(sock), *args, *map(str, files)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env_with_addcow())
    try:
        line = _ready_line(proc, log)
        prefix = "addcow: serving "
        if not line.startswith(prefix) or " on nbd+unix:///" not in line:
            raise AssertionError(f"unexpected ready line {line!r}")
        uri = line.rsplit(" on ", 1)[1]
        yield Server(proc, uri, str(sock), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM\n{log.read_text()}") from None
        if proc.stdout is not None:
            proc.stdout.close()
    if status != 0:
        raise AssertionError(f"server exited {status}\n{log.read_text()}")
    if sock.exists():
        raise AssertionError(f"server left its socket {sock} behind")


@dataclass
class TCPServer:
    proc: subprocess.Popen[bytes]
    uri: str
    port: int
    log: Path

    def stderr(self) -> str:
        return self.log.read_text()

    def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether the server logs ``text`` within ``timeout`` seconds."""
        return wait_for_log(self.log, text, timeout)


@contextmanager
def served_tcp(
    tmp_path: Path, *files: Path | str, args: tuple[str, ...] = (), name: str = "tcp"
) -> Iterator[TCPServer]:
    """Run ``addcow serve --foreground --port 0`` (127.0.0.1) until the block ends.

    On exit the server gets SIGTERM and must exit 0.
    """
    log = tmp_path / f"{name}.log"
    cmd = [ADDCOW, "serve", "--foreground", "-v", "--port", "0", *args, *map(str, files)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env_with_addcow())
    try:
        line = _ready_line(proc, log)
        uri = line.rsplit(" on ", 1)[1]
        port = int(uri.rsplit(":", 1)[1].rstrip("/"))
        yield TCPServer(proc, uri, port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not stop on SIGTERM\n{log.read_text()}") from None
        if proc.stdout is not None:
            proc.stdout.close()
    if status != 0:
        raise AssertionError(f"server exited {status}\n{log.read_text()}")


def _ready_line(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise AssertionError(f"no ready line within {timeout}s\n{log.read_text()}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            proc.wait()
            raise AssertionError(f"server exited {proc.returncode}\n{log.read_text()}")
        buf += chunk
    sel.close()
    return buf.split(b"\n", 1)[0].decode()


class RawClient:
    """A blocking NBD client over a Unix socket that sends whatever it is told."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (reads EOF) without sending more."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # handshake
    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recv_exact(18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT):
            raise AssertionError(f"bad greeting {magic:#x} {opt:#x}")
        return int(flags)

    def client_flags(self, flags: int = 3) -> None:
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise AssertionError(f"bad option reply magic {magic:#x}")
        return option, reply, self.recv_exact(length)

    def start(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> int:
        """Handshake through NBD_OPT_GO; returns the transmission flags."""
        self.greeting()
        self.client_flags()
        if structured:
            self.option(8)
            assert self.option_reply()[1] == 1
        if contexts:
            payload = struct.pack(">I", len(name)) + name.encode()
            payload += struct.pack(">I", len(contexts))
            for ctx in contexts:
                payload += struct.pack(">I", len(ctx)) + ctx.encode()
            self.option(10, payload)
            while self.option_reply()[1] != 1:
                pass
        self.option(7, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        flags = 0
        while True:
            _opt, reply, data = self.option_reply()
            if reply == 3 and struct.unpack(">H", data[:2])[0] == 0:
                flags = struct.unpack(">QH", data[2:])[1]
            if reply == 1:
                return flags
            if reply & (1 << 31):
                raise AssertionError(f"GO failed: {reply:#x} {data!r}")

    # transmission
    def request(
        self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
        cookie: int = 1, data: bytes = b"", magic: int = REQUEST_MAGIC,
    ) -> None:  # fmt: skip
        header = struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)
        self.sock.sendall(header + data)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise AssertionError(f"expected a simple reply, magic {magic:#x}")
        return int(error), int(cookie)

    def reply(self) -> tuple[int, int, int, int, bytes]:
        """Any reply: (kind, flags, type_or_error, cookie, payload); kind is the magic."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            return magic, 0, int(error), int(cookie), b""
        if magic != STRUCTURED_REPLY_MAGIC:
            raise AssertionError(f"bad reply magic {magic:#x}")
        flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return magic, int(flags), int(rtype), int(cookie), self.recv_exact(length)

    def error_of(self) -> int:
        """Read one reply and return its error value (0 for success)."""
        kind, _flags, value, _cookie, payload = self.reply()
        if kind == SIMPLE_REPLY_MAGIC:
            return value
        if value & 0x8000:
            return int(struct.unpack(">I", payload[:4])[0])
        return 0

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        """READ with structured replies; reassembles data and hole chunks."""
        self.request(0, offset, length, cookie=cookie)
        out = bytearray(length)
        while True:
            _kind, flags, rtype, got_cookie, payload = self.reply()
            if got_cookie != cookie:
                raise AssertionError(f"reply for cookie {got_cookie}, expected {cookie}")
            if rtype == 1:
                (off,) = struct.unpack(">Q", payload[:8])
                out[off - offset : off - offset + len(payload) - 8] = payload[8:]
            elif rtype == 2:
                off, size = struct.unpack(">QI", payload)
                out[off - offset : off - offset + size] = bytes(size)
            elif rtype & 0x8000:
                raise AssertionError(f"read error {payload!r}")
            if flags & 1:
                return bytes(out)


# -- start-up tests: what a failed start must leave alone ------------------------------------


class InProcessServer:
    """``NBDServer`` on a Unix socket in a thread of this process."""

    def __init__(self, path: Path, sock: Path) -> None:
        self.image = AddCowImage.open(path)
        self.sock = str(sock)
        self.loop = asyncio.new_event_loop()
        self.server = NBDServer([Export.from_image(self.image, "", read_only=False)])
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,))
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            await self.server.listen_unix(self.sock)
            ready.set()
            await self.server.wait_stopped()
            await self.server.close()

        self.loop.run_until_complete(main())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(30)
        assert not self.thread.is_alive()


def snapshot(*paths: Path) -> dict[str, object]:
    """What each path is: kind, inode, mtime, size, and the content of files and folders.

    A missing path maps to None. Folders are described down to their files, so a
    file removed from inside one shows as a change.
    """
    out: dict[str, object] = {}
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out[str(path)] = None
            continue
        entry: dict[str, object] = {
            "mode": st.st_mode, "dev": st.st_dev, "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns, "size": st.st_size,
        }  # fmt: skip
        if stat.S_ISREG(st.st_mode):
            entry["content"] = path.read_bytes()
        elif stat.S_ISDIR(st.st_mode):
            entry["children"] = snapshot(*sorted(path.iterdir()))
        out[str(path)] = entry
    return out


@dataclass
class Daemon:
    pid: int
    socket: Path
    pidfile: Path


@contextmanager
def served_daemon(
    socket_path: Path, pidfile: Path, *files: Path | str, args: tuple[str, ...] = ()
) -> Iterator[Daemon]:
    """Run ``addcow serve`` detached (the default mode) with a pidfile until the block ends.

    On exit the daemon gets SIGTERM and must remove its socket and pidfile.
    """
    cmd = [ADDCOW, "serve", "--socket", str(socket_path), "--pidfile", str(pidfile), *args,
           *map(str, files)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env_with_addcow())
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stderr}")
    pid = int(pidfile.read_text())
    try:
        yield Daemon(pid, socket_path, pidfile)
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if _alive(pid):
        raise AssertionError(f"daemon {pid} did not stop on SIGTERM")
    if socket_path.exists() or pidfile.exists():
        raise AssertionError(f"daemon {pid} left {socket_path} or {pidfile} behind")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


ACTIVATE = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""


def activation_cmd(fd: int, *args: str, listen_fds: str = "1") -> list[str]:
    """A command that execs ``addcow ARGS`` with ``fd`` on fd 3 and LISTEN_PID/LISTEN_FDS set.

    Run it with ``pass_fds=(fd,)``: the process keeps its pid across the exec, so
    LISTEN_PID names the addcow process, as a socket-activating launcher does it.
    """
    return [sys.executable, "-c", ACTIVATE, str(fd), listen_fds, ADDCOW, *args]


class PipeChannel:
    """Two pipe descriptors that look like a socket to ``RawClient``."""

    def __init__(self, read_fd: int, write_fd: int, timeout: float = 10) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.timeout = timeout

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def recv(self, n: int) -> bytes:
        sel = selectors.DefaultSelector()
        sel.register(self.read_fd, selectors.EVENT_READ)
        try:
            if not sel.select(self.timeout):
                raise TimeoutError(f"nothing to read within {self.timeout}s")
        finally:
            sel.close()
        return os.read(self.read_fd, n)

    def close(self) -> None:
        for fd in (self.write_fd, self.read_fd):
            with suppress(OSError):
                os.close(fd)


def raw_client_over(channel: PipeChannel) -> RawClient:
    """A ``RawClient`` speaking over ``channel`` instead of a Unix socket."""
    client = RawClient.__new__(RawClient)
    client.sock = channel  # type: ignore[assignment]
    return client


@contextmanager
def killable_server(sock: Path, image: Path, args: tuple[str, ...],
                    program: tuple[str, ...] = (ADDCOW,)) -> Iterator[subprocess.Popen[bytes]]:
    """An ``addcow serve`` the caller kills; always gone when the block ends."""
    sock.unlink(missing_ok=True)  # left behind by the previous kill -9
    log = sock.with_suffix(".log")
    cmd = [*program, "serve", "--foreground", "-v", "--socket", str(sock), *args, str(image)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env_with_addcow())
    try:
        _ready_line(proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
        sock.unlink(missing_ok=True)


class TCPRawClient(RawClient):
    """:class:`RawClient` over TCP to 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)


# -- qemu-nbd as a golden image server --------------------------------------------------


def start_qemu_nbd(path: Path, sock: Path) -> subprocess.Popen[bytes]:
    """qemu-nbd exporting ``path`` read-only on the Unix socket ``sock``, once it listens."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = subprocess.Popen(
        [require_tool("qemu-nbd"), "-r", "-f", "raw", "-t", "-e", "8", "-k", str(sock),
         str(path)], stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc


def stop_qemu_nbd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@contextmanager
def qemu_nbd(path: Path, sock: Path) -> Iterator[str]:
    """qemu-nbd exporting ``path`` read-only on ``sock`` for the block."""
    proc = start_qemu_nbd(path, sock)
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop_qemu_nbd(proc)


def ddrescue_mapfile(path: Path, size: int, bad_lo: int, bad_hi: int) -> Path:
    """A GNU ddrescue map of ``size`` bytes with [bad_lo, bad_hi) unreadable: nbdkit's
    ddrescue filter then fails reads there with EIO (its error filter injects by rate
    and trigger file, not by offset)."""
    path.write_text(
        "# Mapfile. Created by GNU ddrescue version 1.27\n"
        "# current_pos  current_status  current_pass\n0x00000000     +               1\n"
        "#      pos        size  status\n"
        f"0x00000000  {bad_lo:#010x}  +\n{bad_lo:#010x}  {bad_hi - bad_lo:#010x}  -\n"
        f"{bad_hi:#010x}  {size - bad_hi:#010x}  +\n"
    )
    return path
