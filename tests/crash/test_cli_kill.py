"""kill -9 of the command line and of the server, judged by the crash model.

Two writers, both real subprocesses started exactly as a user would:

* ``addcow serve`` (half the runs with ``--stream`` copying the backing file in
  the background, rate-limited so the kill lands mid-stream) driven by a
  :class:`nbd_util.RawClient` in a thread of the test process. The thread sends
  the seeded workload of :mod:`workload` one request at a time (WRITE whole and
  partial clusters, WRITE with FUA, WRITE_ZEROES with and without NO_HOLE, TRIM,
  FLUSH, READ) and logs "begin I" before sending and "ack I" once the reply
  arrived; the main thread SIGKILLs the server at a seeded moment (once the log
  reaches a random operation, plus a random few milliseconds).
* ``addcow io`` running a long command script from stdin (``write -P``,
  ``write -f`` (FUA), ``write -z [-u]``, ``discard``, ``read``, ``flush``
  followed by ``length`` so that the flush's completion shows on stdout). With
  PYTHONUNBUFFERED=1 the test reads stdout line by line: ``wrote N/N bytes at
  offset O`` (``discard ...``, ``read ...``, the size printed by ``length``)
  acknowledges the next command of the script. It kills the process once a
  random number of commands were acknowledged, then reads what was printed
  before the death.

After the kill the acknowledged operations are replayed into
:class:`workload.Model` (the operation in flight as begun) and
:func:`workload.verify` checks the reopened image cluster by cluster and with
``check_image``; ``addcow check`` must exit 0 (or 3: leaks only). Then the
server is started again on the crashed image and must serve exactly what the
library reads; for ``--stream`` runs it streams to completion and the final
image (complete, backing released) still holds exactly that content.

``make test`` runs :data:`SERVE_KILLS` + :data:`IO_KILLS` kills; ``make
campaign`` (ADDCOW_CAMPAIGN=1) many more.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from nbd_util import ADDCOW, RawClient, env_with_addcow, killable_server, served
from workload import SIZE, Model, Op, build, gen_ops, replay, verify

import addcow
from addcow.check import check_image

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
SERVE_KILLS = 150 if CAMPAIGN else 6
IO_KILLS = 100 if CAMPAIGN else 4
OPS = 300
STREAM_RATE = "64k"  # the 160 KiB image takes a few seconds: kills land mid-stream

CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 3, 4, 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2


def workload(seed: int) -> list[Op]:
    """The library workload without streams; populate becomes a plain read."""
    return [("read", *op[1:]) if op[0] == "populate" else op
            for op in gen_ops(seed, OPS, stream=False)]  # fmt: skip


def model_of(content: bytes, ops: list[Op], events: list[tuple[object, ...]]) -> Model:
    model = Model(bytearray(content))
    for event in events:
        replay(model, ops, event)
    return model


def cli_check(path: Path) -> list[str]:
    """``addcow check`` as a user runs it: 0 (clean) or 3 (leaks only) is fine."""
    proc = subprocess.run([ADDCOW, "check", str(path)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    if proc.returncode not in (0, 3):
        return [f"addcow check exited {proc.returncode}: {proc.stdout}{proc.stderr}"]
    return []


def library_content(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, SIZE)


# -- addcow serve ------------------------------------------------------------------------


def drive(sock: Path, ops: list[Op], events: list[tuple[object, ...]], errors: list[str]) -> None:
    """Send ``ops`` one at a time until the server dies, logging begin / ack."""
    try:
        client = RawClient(str(sock), timeout=30)
    except OSError:
        return  # killed before it accepted the connection
    try:
        client.start()
    except (OSError, EOFError, AssertionError, struct.error):
        client.close()
        return  # killed before the handshake finished
    try:
        for i, op in enumerate(ops):
            kind = op[0]
            events.append(("begin", i))
            if kind == "read":
                client.read(op[1], op[2], cookie=i)
            else:
                if kind == "write":
                    client.request(CMD_WRITE, op[1], len(op[2]), FLAG_FUA if op[3] else 0,
                                   cookie=i, data=op[2])  # fmt: skip
                elif kind == "zero":
                    client.request(CMD_WRITE_ZEROES, op[1], op[2],
                                   0 if op[3] else FLAG_NO_HOLE, cookie=i)  # fmt: skip
                elif kind == "discard":
                    client.request(CMD_TRIM, op[1], op[2], cookie=i)
                elif kind == "flush":
                    client.request(CMD_FLUSH, cookie=i)
                error = client.error_of()
                if error:
                    errors.append(f"operation {i} {kind}: NBD error {error}")
                    return
            events.append(("ack", i))
    except (OSError, EOFError, struct.error):
        pass  # the server died
    except AssertionError as exc:  # a short structured reply: the server died mid-reply
        if "read error" in str(exc):
            errors.append(f"read failed: {exc}")
    finally:
        client.close()


def complete_and_unchanged(tmp_path: Path, image: Path, expected: bytes, stream: bool,
                           name: str) -> list[str]:  # fmt: skip
    """Serve the recovered image again: same content; with --stream, to completion."""
    problems: list[str] = []
    args = ("--stream",) if stream else ()
    (tmp_path / name).unlink(missing_ok=True)
    with served(tmp_path, image, args=args, name=name) as server:
        with RawClient(server.socket) as client:
            client.start()
            if client.read(0, SIZE) != expected:
                problems.append("the restarted server serves other content than the library reads")
        if stream:
            deadline = time.monotonic() + 30
            while "complete: every cluster" not in server.stderr():
                if time.monotonic() > deadline:
                    problems.append(f"--stream did not complete\n{server.stderr()}")
                    break
                time.sleep(0.02)
    with addcow.open(image, readonly=True) as img:
        if stream and not img.complete:
            problems.append("image not complete after --stream")
        if img.read(0, SIZE) != expected:
            problems.append("content changed by serving / streaming")
    result = check_image(image)
    if result.corruptions or result.check_errors:
        problems.append(f"check after restart: {result.messages}")
    return problems


def test_server_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(0x5E4E)
    stats: Counter[str] = Counter()
    problems: list[str] = []
    image, sock = tmp_path / "d.add-cow", tmp_path / "kill.sock"
    for run in range(SERVE_KILLS):
        seed = 9000 + run
        stream = run % 2 == 1
        content = build(tmp_path)
        ops = workload(seed)
        events: list[tuple[object, ...]] = []
        errors: list[str] = []
        args = ("--stream", "--stream-rate", STREAM_RATE) if stream else ()
        with killable_server(sock, image, args) as proc:
            thread = threading.Thread(target=drive, args=(sock, ops, events, errors))
            thread.start()
            target = rng.randrange(OPS)
            deadline = time.monotonic() + 60
            while thread.is_alive() and time.monotonic() < deadline:
                if sum(1 for e in events if e[0] == "ack") >= target:
                    break
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.003))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            thread.join(timeout=60)
            assert not thread.is_alive()
        acked = sum(1 for e in events if e[0] == "ack")
        problems += [f"run {run} (seed {seed}): {e}" for e in errors]
        stats["operations acknowledged"] += acked
        stats["flushes completed"] += sum(1 for i in range(acked) if ops[i][0] == "flush")
        if events and events[-1][0] == "begin":
            stats["killed with a request in flight"] += 1
            stats[f"in flight: {ops[acked][0]}"] += 1
        elif acked < OPS:
            stats["killed between requests"] += 1
        model = model_of(content, ops, events)
        found = verify(image, model) + cli_check(image)
        if not found:
            with addcow.open(image, readonly=True) as img:
                if stream:
                    stats["stream runs"] += 1
                    stats["killed before the stream completed"] += not img.complete
            expected = library_content(image)
            found += complete_and_unchanged(tmp_path, image, expected, stream, f"r{run}.sock")
        problems += [f"run {run} (seed {seed}, stream {stream}, {acked} acked): {p}"
                     for p in found]  # fmt: skip
    print(f"\nkill -9 of addcow serve: {SERVE_KILLS} runs, {dict(stats)}")
    assert problems == [], "\n".join(problems[:20])
    assert stats["killed with a request in flight"] + stats["killed between requests"] >= (
        SERVE_KILLS * 2 // 3
    ), stats
    assert stats["killed before the stream completed"] >= 1, stats


def test_the_harness_catches_a_server_whose_flush_does_nothing(tmp_path: Path) -> None:
    """Mutation check: the same drive / kill / judge path sees lost acknowledged data."""
    image, sock = tmp_path / "d.add-cow", tmp_path / "mutant.sock"
    mutant = (sys.executable, str(Path(__file__).with_name("noflush_server.py")))
    content = build(tmp_path)
    ops = [op for op in workload(9000) if op[0] != "read"][:120]
    events: list[tuple[object, ...]] = []
    errors: list[str] = []
    with killable_server(sock, image, (), program=mutant) as proc:
        drive(sock, ops, events, errors)  # every request answered: nothing in flight
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert errors == [] and sum(1 for e in events if e[0] == "ack") == len(ops)
    assert any(op[0] == "flush" for op in ops)
    problems = verify(image, model_of(content, ops, events))
    assert problems, "the judge missed writes lost by a flush that does nothing"


# -- addcow io ---------------------------------------------------------------------------


def io_script(ops: list[Op]) -> tuple[list[str], list[str]]:
    """(command lines, the stdout line acknowledging each operation)."""
    lines: list[str] = []
    acks: list[str] = []
    for op in ops:
        kind = op[0]
        if kind == "write":
            offset, data, fua = op[1], op[2], op[3]
            lines.append(f"write {'-f ' if fua else ''}-P {data[0]:#x} {offset} {len(data)}")
            acks.append(f"wrote {len(data)}/{len(data)} bytes at offset {offset}")
        elif kind == "zero":
            lines.append(f"write -z {'-u ' if op[3] else ''}{op[1]} {op[2]}")
            acks.append(f"wrote {op[2]}/{op[2]} bytes at offset {op[1]}")
        elif kind == "discard":
            lines.append(f"discard {op[1]} {op[2]}")
            acks.append(f"discard {op[2]}/{op[2]} bytes at offset {op[1]}")
        elif kind == "read":
            lines.append(f"read {op[1]} {op[2]}")
            acks.append(f"read {op[2]}/{op[2]} bytes at offset {op[1]}")
        elif kind == "flush":
            lines.append("flush\nlength")  # length prints only once the flush returned
            acks.append("LENGTH")
        else:
            raise ValueError(op)
    return lines, acks


class Acks:
    """Counts the commands that ``addcow io``'s stdout acknowledged, in script order."""

    def __init__(self, acks: list[str], size_line: str) -> None:
        self.acks = [size_line if a == "LENGTH" else a for a in acks]
        self.count = 0
        self.tail: list[str] = []

    def take(self, line: str) -> None:
        self.tail = [*self.tail[-4:], line]
        if self.count < len(self.acks) and line == self.acks[self.count]:
            self.count += 1


def run_io(image: Path, script: Path, acks: Acks, kill_after: int | None,
           delay: float) -> tuple[int, str]:  # fmt: skip
    """Run ``addcow io`` on the script; SIGKILL it once ``kill_after`` commands were acked."""
    env = dict(env_with_addcow(), PYTHONUNBUFFERED="1")
    with open(script, "rb") as stdin:
        proc = subprocess.Popen([ADDCOW, "io", str(image)], stdin=stdin, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for raw in iter(proc.stdout.readline, b""):
            acks.take(raw.decode().rstrip("\n"))
            if kill_after is not None and acks.count >= kill_after:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        for line in proc.stdout.read().decode().splitlines():  # printed before the death
            acks.take(line)
        proc.wait(timeout=60)
        return proc.returncode, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_io_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(0x10C0)
    stats: Counter[str] = Counter()
    problems: list[str] = []
    image, script = tmp_path / "d.add-cow", tmp_path / "script.txt"
    size_line = ""
    for run in range(IO_KILLS):
        seed = 7000 + run
        content = build(tmp_path)
        if run == 0:  # what ``length`` prints for this image
            size_line = subprocess.run([ADDCOW, "io", "-r", "-c", "length", str(image)],
                                       capture_output=True, text=True).stdout.strip()  # fmt: skip
        ops = workload(seed)
        lines, expected_acks = io_script(ops)
        script.write_text("\n".join(lines) + "\n")
        acks = Acks(expected_acks, size_line)
        # run 0 is never killed (the control); the others during a random command
        kill_after = None if run == 0 else rng.randrange(OPS)
        status, err = run_io(image, script, acks, kill_after, rng.uniform(0, 0.003))
        acked = acks.count
        events: list[tuple[object, ...]] = []
        for i in range(acked):
            events += [("begin", i), ("ack", i)]
        if status == 0:
            assert acked == len(ops), (acked, acks.tail, err)
            events += [("begin", "close"), ("ack", "close")]
            stats["finished"] += 1
        else:
            assert status == -signal.SIGKILL, (status, err)
            stats["killed"] += 1
            if acked < len(ops):
                events.append(("begin", acked))  # the command in flight, if any
                stats["killed mid-script"] += 1
                stats[f"next command: {ops[acked][0]}"] += 1
        stats["commands acknowledged"] += acked
        stats["flushes completed"] += sum(1 for i in range(acked) if ops[i][0] == "flush")
        model = model_of(content, ops, events)
        found = verify(image, model, reopen_write=run % 2 == 0) + cli_check(image)
        problems += [f"run {run} (seed {seed}, {acked} acked): {p}" for p in found]
    print(f"\nkill -9 of addcow io: {IO_KILLS} runs, {dict(stats)}")
    assert problems == [], "\n".join(problems[:20])
    assert stats["finished"] >= 1 and stats["killed mid-script"] >= IO_KILLS // 2, stats
