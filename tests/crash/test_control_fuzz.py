"""A fuzzer for the control socket of ``addcow serve --control``, while a stream runs
and an NBD client writes.

One server streams a 64 MiB image (at a rate the fuzzer keeps changing) while
qemu-io writes known patterns into it. Seeded cases open one to three control
connections and send, in random pieces and pipelined: valid commands with random
arguments (``stream-start``/``-cancel``/``-pause``/``-resume``/``-set-rate``
with speeds good and bad, ``flush``, ``query``, ``detach`` before completion,
export names that exist and do not), requests mutated byte by byte, JSON that is
deep, huge, duplicated or not UTF-8, lines cut off by a close, more connections
than the server takes. The judge: every request line gets exactly one reply
line, in order, a JSON object with either ``return`` or an ``error`` of class
``GenericError`` with a description, and ``id`` echoed when the request was an
object with one; valid commands get the reply their state implies; the server
never logs an internal error. At the end the stream is started (if a cancel left
it stopped) and resumed unthrottled, and completes, the disk reads back as the
model (the backing, then the client's writes), ``detach`` through the socket
leaves the raw file alone holding the same bytes, and the server's descriptors
are back to their count.

:data:`CASES` cases in ``make test``; ``make campaign`` (ADDCOW_CAMPAIGN=1)
runs many more.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import require_tool
from nbd_util import served

import addcow

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
CASES = 20000 if CAMPAIGN else 150

CLUSTER = 64 << 10
SIZE = 1024 * CLUSTER
NAME = "d.add-cow"
SLOW = {"execute": "stream-set-rate", "arguments": {"speed": 256 << 10}}


class Conn:
    """One control connection: the lines it sent and the replies it read."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buffer = b""

    def send_in_pieces(self, data: bytes, rng: random.Random) -> None:
        while data:
            n = rng.randint(1, max(1, len(data)))
            self.sock.sendall(data[:n])
            data = data[n:]

    def reply(self, request: bytes) -> bytes:
        """The next reply line, which answers ``request``."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise AssertionError(f"no answer in 30 s to {request[:200]!r}") from None
            if not chunk:
                raise AssertionError(f"control connection closed instead of answering "
                                     f"{request[:200]!r}")  # fmt: skip
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        self.sock.close()


def valid_request(rng: random.Random) -> dict[str, Any]:
    command = rng.choice(
        ["query", "stream-start", "stream-cancel", "stream-pause", "stream-resume",
         "stream-set-rate", "flush", "detach"]
    )  # fmt: skip
    request: dict[str, Any] = {"execute": command}
    arguments: dict[str, Any] = {}
    if command != "query" and rng.random() < 0.4:
        arguments["export"] = rng.choice([NAME, NAME, "", "nope", 7, None, [NAME]])
    if command == "stream-set-rate" or (command == "stream-start" and rng.random() < 0.7):
        # Mostly rates that keep the stream going for the whole fuzz; now and then none.
        arguments["speed"] = rng.choice(
            [256 << 10, 512 << 10, 1 << 20] * 6
            + [0, 1, 2**63, 10**40, -1, 1.5, "1M", True, None, 1e300, -(2**70)]
        )
    if arguments:
        request["arguments"] = arguments
    if rng.random() < 0.3:
        request["id"] = rng.choice([1, "x", [1, 2], {"a": None}, 2**70, -0.5])
    return request


def mutated(rng: random.Random) -> bytes:
    """A request line that may not be one (no newline inside: the judge counts lines)."""
    kind = rng.randrange(9)
    if kind == 0:  # byte flips in a valid request
        line = bytearray(json.dumps(valid_request(rng)).encode())
        for _ in range(rng.randint(1, 4)):
            line[rng.randrange(len(line))] = rng.randrange(256)
        return bytes(line).replace(b"\n", b" ")
    if kind == 1:  # deep nesting, inside the line limit
        depth = rng.choice([100, 5000, 30000])
        return b'{"execute": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 2:  # a long string, inside the line limit
        return json.dumps({"execute": "x" * rng.randint(1000, 60000)}).encode()
    if kind == 3:  # duplicate members, odd numbers
        return rng.choice(
            [b'{"execute": "query", "execute": "detach"}', b'{"execute": "flush", "id": NaN}',
             b'{"execute": "stream-set-rate", "arguments": {"speed": 1e400}}',
             b'{"execute": "query", "id": -Infinity}', b'{"execute": "query"} trailing']
        )  # fmt: skip
    if kind == 4:  # not UTF-8, NULs, control characters
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))).replace(b"\n", b"")
    if kind == 5:
        return rng.choice([b"null", b"[]", b'"query"', b"1", b"true", b"{}", b'{"id": 3}'])
    if kind == 6:  # arguments of the wrong shape
        arguments = rng.choice(["[]", "1", '"x"', "null", '{"speed": {}}', '{"bogus": 1}'])
        return f'{{"execute": "stream-set-rate", "arguments": {arguments}}}'.encode()
    if kind == 7:
        return json.dumps(valid_request(rng)).encode() + b"\r"
    return b"\xef\xbb\xbf" + json.dumps(valid_request(rng)).encode()  # a BOM


def strict_json(text: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity, no number beyond a double."""

    def refuse(name: str) -> float:
        raise ValueError(name)

    def finite(digits: str) -> float:
        if not math.isfinite(value := float(digits)):
            raise ValueError(digits)
        return value

    return json.loads(text, parse_constant=refuse, parse_float=finite)


def judge(request: bytes, reply_line: bytes, state: dict[str, Any]) -> None:
    reply = json.loads(reply_line)
    assert isinstance(reply, dict), reply_line
    assert ("return" in reply) != ("error" in reply), reply_line
    state["returns" if "return" in reply else "errors"] += 1
    assert set(reply) <= {"return", "error", "id"}, reply_line
    if "error" in reply:
        error = reply["error"]
        assert error["class"] == "GenericError" and error["desc"], reply_line
    try:
        sent = strict_json(request)
    except (ValueError, RecursionError):
        assert "error" in reply, (request[:200], reply_line)
        return
    if not isinstance(sent, dict) or set(sent) - {"execute", "arguments", "id"}:
        assert "error" in reply, (request[:200], reply_line)
        return
    if "id" in sent and "return" in reply:
        assert reply["id"] == sent["id"], (request[:200], reply_line)
    command, arguments = sent.get("execute"), sent.get("arguments", {})
    good_export = not isinstance(arguments, dict) or arguments.get("export", NAME) in (NAME, None)
    if command == "query" and arguments == {}:
        assert "return" in reply, reply_line
        (export,) = reply["return"]["exports"]
        assert export["name"] == NAME and export["total-clusters"] == SIZE // CLUSTER
        status = export["stream"]["status"]
        assert status in ("none", "running", "paused", "concluded"), reply_line
        assert status != "concluded" or export["complete"], reply_line
        state["complete"] = export["complete"]
    elif command in ("stream-cancel", "stream-pause", "stream-resume"):
        if isinstance(arguments, dict) and good_export and set(arguments) <= {"export"}:
            # A cancel (from any connection) leaves no stream to steer until a start.
            returned(reply, reply_line, {"changed"}, "not streaming")
    elif command in ("stream-start", "stream-set-rate") and isinstance(arguments, dict):
        speed = arguments.get("speed", 0 if command == "stream-start" else None)
        good = isinstance(speed, int) and not isinstance(speed, bool) and speed >= 0
        if good_export and set(arguments) <= {"export", "speed"}:
            if not good:
                assert "error" in reply and "speed: expected" in reply["error"]["desc"], reply_line
            elif command == "stream-start":
                returned(reply, reply_line, {"changed"}, "already streaming")
            else:
                returned(reply, reply_line, set(), "not streaming")
    elif command == "detach" and arguments == {}:
        # The stream may complete during the fuzz (a fast rate): then detach works.
        if "return" in reply:
            assert reply["return"] == {"image-file": state["raw"]}, reply_line
            state["detached"] = True
        else:
            assert "not complete" in reply["error"]["desc"], reply_line


def returned(reply: dict[str, Any], line: bytes, keys: set[str], refusal: str) -> None:
    """A return with ``keys``, or the one error the export's stream state may cause."""
    if "return" in reply:
        assert set(reply["return"]) == keys, line
    else:
        assert refusal in reply["error"]["desc"], line


def writer(
    uri: str, model: bytearray, rng: random.Random, stop: threading.Event, writes: list[int]
) -> None:
    """qemu-io writing patterns while the fuzzer runs; each write lands in the model."""
    tool = require_tool("qemu-io")
    while not stop.is_set():
        offset = rng.randrange(0, SIZE // 4096) * 4096
        length = min(rng.choice([4096, 65536, 3 * 65536 + 4096]), SIZE - offset)
        byte = rng.randrange(1, 256)
        proc = subprocess.run(
            [tool, "-f", "raw", "-c", f"write -P {byte} {offset} {length}", uri],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
        model[offset : offset + length] = bytes([byte]) * length
        writes[0] += 1


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(pid: int, count: int) -> None:
    deadline = time.monotonic() + 10
    while fds(pid) > count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_control_socket_fuzz(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    base = tmp_path / "base.raw"
    model = bytearray(rng.randbytes(SIZE))
    base.write_bytes(model)
    image = tmp_path / NAME
    addcow.create(image, image_file="d.raw", backing_file=base, backing_format="raw")
    control = tmp_path / "control.sock"
    args = ("--control", str(control), "--stream", "--stream-rate", "1M")
    with served(tmp_path, image, args=args) as srv:
        pid = srv.proc.pid
        quiet = fds(pid)
        stop, failures, writes = threading.Event(), [], [0]

        def write() -> None:
            try:
                writer(srv.uri, model, random.Random(7), stop, writes)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        state: dict[str, Any] = {"complete": False, "detached": False, "returns": 0,
                                 "errors": 0, "raw": str(tmp_path / "d.raw")}  # fmt: skip
        replies = 0
        try:
            for _case in range(CASES):
                conns = [Conn(control) for _ in range(rng.randint(1, 3))]
                pending: list[tuple[Conn, bytes]] = []
                for _ in range(rng.randint(1, 6)):
                    conn = rng.choice(conns)
                    if rng.random() < 0.5:
                        request = valid_request(rng)
                        line = json.dumps(request).encode()
                        if request.get("arguments", {}).get("speed") in (0, 2**63, 10**40):
                            # No limit for a moment only: the stream is to outlast the fuzz.
                            line += b"\n" + json.dumps(SLOW).encode()
                    else:
                        line = mutated(rng)
                    conn.send_in_pieces(line + b"\n", rng)
                    # A blank line (JSON's whitespace only) gets no reply.
                    pending.extend((conn, one) for one in line.split(b"\n") if one.strip(b" \t\r"))
                    if rng.random() < 0.5:  # read as it goes, or pipeline
                        for c, sent in pending:
                            judge(sent, c.reply(sent), state)
                            replies += 1
                        pending = []
                for c, sent in pending:
                    judge(sent, c.reply(sent), state)
                    replies += 1
                if rng.random() < 0.1:  # a line cut off by the close
                    conns[0].sock.sendall(b'{"execute": "stream-pau')
                for conn in conns:
                    conn.close()
                if rng.random() < 0.02:  # more connections than the server takes
                    crowd = [Conn(control) for _ in range(12)]
                    for conn in crowd[8:]:
                        refused = json.loads(conn.reply(b"(a connection over the limit)"))
                        desc = refused["error"]["desc"]
                        assert desc == "too many control connections (at most 8)", desc
                    for conn in crowd:
                        conn.close()
                    wait_for_fds(pid, quiet)  # the server has seen them go
                assert srv.proc.poll() is None, srv.stderr()
                assert not failures, failures
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not failures, failures
        # The end: unthrottled, resumed, complete, as the model says.
        final = Conn(control)
        try:
            start = b'{"execute": "stream-start", "arguments": {"speed": 0}}'
            final.sock.sendall(start + b"\n")
            started = json.loads(final.reply(start))  # or it was streaming (or paused)
            assert "return" in started or "already streaming" in started["error"]["desc"]
            for line in (b'{"execute": "stream-set-rate", "arguments": {"speed": 0}}',
                         b'{"execute": "stream-resume"}'):  # fmt: skip
                final.sock.sendall(line + b"\n")
                assert "return" in json.loads(final.reply(line))
            deadline = time.monotonic() + 60
            while True:
                final.sock.sendall(b'{"execute": "query"}\n')
                export = json.loads(final.reply(b"query"))["return"]["exports"][0]
                if export["complete"]:
                    break
                assert time.monotonic() < deadline, (export["stream"], export["allocated-clusters"])
                time.sleep(0.1)
            assert export["stream"]["status"] == "concluded"
            copy = tmp_path / "copy.raw"
            subprocess.run([require_tool("nbdcopy"), srv.uri, str(copy)], check=True, timeout=60)
            assert copy.read_bytes() == bytes(model)
            final.sock.sendall(b'{"execute": "detach"}\n')
            detached = json.loads(final.reply(b"detach"))["return"]
            assert detached == {"image-file": str(tmp_path / "d.raw")}
        finally:
            final.close()
        assert not image.exists()
        assert (tmp_path / "d.raw").read_bytes() == bytes(model)
        wait_for_fds(pid, quiet)
        assert fds(pid) <= quiet, (fds(pid), quiet)
    log = srv.stderr()
    for bad in ("Traceback", "internal error", "Task exception", "Unhandled"):
        assert bad not in log, log[-4000:]
    print(
        f"\ncontrol fuzz: {CASES} cases, {replies} replies judged ({state['returns']} "
        f"returns, {state['errors']} errors), {writes[0]} client writes, "
        f"detached during the fuzz: {state['detached']}; violations 0"
    )
