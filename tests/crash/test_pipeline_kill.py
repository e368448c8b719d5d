"""kill -9 of ``addcow serve`` with several connections, each with many requests in flight.

The one-request-at-a-time runs of ``test_cli_kill.py`` have an exact model.
Here three connections to one export pipeline up to :data:`DEPTH` requests
each (writes of whole and partial clusters over one to four clusters, reads
of up to 32 clusters, FLUSH), replies come back in any order, and the server
is killed at a seeded moment. What a crash may leave is then a set, judged
cluster by cluster:

* Each connection owns a block of clusters and never has two requests in
  flight over the same cluster when one of them is a write, so the writes to a
  cluster are totally ordered: w1, w2, ..., wn (wn may still be in flight).
* kill -9 keeps the page cache: every acknowledged write's data is in the image
  file. Its bit may not be on disk, unless a FLUSH covers it: a FLUSH on *any*
  connection, sent after the write's reply arrived and itself acknowledged
  (multi-conn: "a flush on one connection makes every write completed on any
  connection durable").
* So cluster c reads as w1..wm applied over the backing, for some m with
  max(A, F) <= m <= n (A: writes acknowledged, F: the last write covered by a
  flush), or, only if F = 0, as the backing (its bit never reached the disk).

Reads are judged as they arrive: a read never overlaps a write in flight on
its connection, so it must return exactly w1..wA over the backing. Reads of 16
clusters and more go out with ``sendfile`` when they lie in one file.
Afterwards ``check_image`` must find no corruption. A mutant server whose
flush does nothing must be caught by the same judge.

``make test`` runs :data:`KILLS` kills; ``make campaign`` many more.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbd_util import RawClient, killable_server

import addcow
from addcow.check import check_image

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
KILLS = 100 if CAMPAIGN else 5
CLUSTER = 4096
BLOCK = 48  # clusters per connection
CONNECTIONS = 3
CLUSTERS = BLOCK * CONNECTIONS
SIZE = CLUSTERS * CLUSTER
DEPTH = 8
CMD_READ, CMD_WRITE, CMD_FLUSH = 0, 1, 3


@dataclass
class Write:
    """One write as one cluster sees it: its bytes at their offset in the cluster."""

    start: int
    data: bytes
    acked_ns: int = 0  # 0: no reply yet


@dataclass
class Log:
    """What the clients saw, shared by their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: dict[int, list[Write]] = field(default_factory=dict)  # cluster -> in order
    flushes: list[tuple[int, int]] = field(default_factory=list)  # (sent_ns, acked_ns)
    problems: list[str] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)


def apply(base: bytes, writes: Sequence[Write]) -> bytes:
    out = bytearray(base)
    for w in writes:
        out[w.start : w.start + len(w.data)] = w.data
    return bytes(out)


def build(directory: Path, rng: random.Random) -> tuple[Path, bytes]:
    base = directory / "base.raw"
    base.write_bytes(rng.randbytes(SIZE))
    image = directory / "p.add-cow"
    for name in ("p.add-cow", "p.raw"):
        (directory / name).unlink(missing_ok=True)
    addcow.create(image, image_file="p.raw", backing_file="base.raw", backing_format="raw",
                  cluster_size=CLUSTER)  # fmt: skip
    return image, base.read_bytes()


def client(sock: Path, index: int, seed: int, base: bytes, log: Log, stop: threading.Event) -> None:
    """One connection: keep DEPTH requests in flight over its own block until the server dies."""
    rng = random.Random(seed)
    lo_cluster = index * BLOCK
    try:
        c = RawClient(str(sock), timeout=30)
        c.start()
    except (OSError, EOFError, AssertionError, struct.error):
        return
    inflight: dict[int, tuple[str, int, int, bytes | None]] = {}  # cookie -> request
    busy_write: set[int] = set()  # clusters with a write in flight
    busy_read: Counter[int] = Counter()  # clusters with reads in flight
    flush_sent: dict[int, int] = {}
    reads: dict[int, bytearray] = {}
    cookie = 0

    def clusters(offset: int, length: int) -> range:
        return range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1)

    def send_one() -> bool:
        """Send one request that conflicts with none in flight; False if none was found."""
        nonlocal cookie
        for _attempt in range(10):
            kind = rng.choices(("write", "read", "flush"), (6, 3, 1))[0]
            if kind == "flush":
                if flush_sent:
                    continue
                cookie += 1
                flush_sent[cookie] = time.monotonic_ns()
                inflight[cookie] = ("flush", 0, 0, None)
                c.request(CMD_FLUSH, cookie=cookie)
                return True
            span = rng.randint(1, 4) if kind == "write" else rng.choice((1, 4, 16, 32))
            first = lo_cluster + rng.randrange(BLOCK - span + 1)
            offset, length = first * CLUSTER, span * CLUSTER
            if kind == "write" and rng.random() < 0.5:  # partial: trim head and tail
                offset += rng.randrange(CLUSTER // 2)
                length -= rng.randrange(CLUSTER // 2) + (offset - first * CLUSTER)
            touched = clusters(offset, length)
            if any(k in busy_write for k in touched):
                continue
            if kind == "write" and any(busy_read[k] for k in touched):
                continue
            cookie += 1
            if kind == "read":
                for k in touched:
                    busy_read[k] += 1
                inflight[cookie] = ("read", offset, length, None)
                c.request(CMD_READ, offset, length, cookie=cookie)
                return True
            data = rng.randbytes(length)
            with log.lock:
                for k in touched:
                    busy_write.add(k)
                    lo, hi = max(offset, k * CLUSTER), min(offset + length, (k + 1) * CLUSTER)
                    log.writes.setdefault(k, []).append(
                        Write(lo - k * CLUSTER, data[lo - offset : hi - offset])
                    )
            inflight[cookie] = ("write", offset, length, data)
            c.request(CMD_WRITE, offset, length, cookie=cookie, data=data)
            return True
        return False

    try:
        while not stop.is_set():
            while len(inflight) < DEPTH and send_one():
                pass
            kind_magic, flags, value, got, payload = c.reply()
            kind, offset, length, _data = inflight[got]
            if kind == "read":
                part = reads.setdefault(got, bytearray(length))
                if value == 1:  # OFFSET_DATA
                    (at,) = struct.unpack(">Q", payload[:8])
                    part[at - offset : at - offset + len(payload) - 8] = payload[8:]
                elif value & 0x8000:
                    log.problems.append(f"read error {payload!r}")
                    return
                if not flags & 1:
                    continue
                del inflight[got]
                got_bytes = bytes(reads.pop(got))
                with log.lock:
                    for k in clusters(offset, length):
                        busy_read[k] -= 1
                        acked = [w for w in log.writes.get(k, []) if w.acked_ns]
                        want = apply(base[k * CLUSTER : (k + 1) * CLUSTER], acked)
                        have = got_bytes[k * CLUSTER - offset : (k + 1) * CLUSTER - offset]
                        if have != want:
                            log.problems.append(f"connection {index}: read of cluster {k} "
                                                f"differs from its {len(acked)} acked writes")
                    log.stats["reads checked"] += 1
                continue
            error = value if kind_magic == 0x67446698 or value & 0x8000 else 0
            if error:
                log.problems.append(f"connection {index}: {kind} failed with NBD error {error}")
                return
            del inflight[got]
            now = time.monotonic_ns()
            with log.lock:
                if kind == "flush":
                    log.flushes.append((flush_sent.pop(got), now))
                    log.stats["flushes acked"] += 1
                    continue
                for k in clusters(offset, length):
                    busy_write.discard(k)
                    # the write to k without an ack is this one (one write per cluster in flight)
                    next(w for w in log.writes[k] if not w.acked_ns).acked_ns = now
                log.stats["writes acked"] += 1
    except (OSError, EOFError, struct.error, AssertionError):
        with log.lock:
            log.stats["requests in flight at the kill"] += len(inflight)
    finally:
        c.close()


def judge(image: Path, base: bytes, log: Log) -> list[str]:
    """Every cluster holds a state the rules in the module docstring allow."""
    problems = []
    with addcow.open(image, readonly=True) as img:
        content = img.read(0, SIZE)
    for k in range(CLUSTERS):
        writes = log.writes.get(k, [])
        old = base[k * CLUSTER : (k + 1) * CLUSTER]
        acked = sum(1 for w in writes if w.acked_ns)
        covered = max(
            (i + 1 for i, w in enumerate(writes)
             if w.acked_ns and any(sent > w.acked_ns for sent, _ack in log.flushes)),
            default=0,
        )  # fmt: skip
        allowed = {apply(old, writes[:m]) for m in range(max(acked, covered), len(writes) + 1)}
        if not covered:
            allowed.add(old)
        have = content[k * CLUSTER : (k + 1) * CLUSTER]
        if have not in allowed:
            problems.append(f"cluster {k}: {len(writes)} writes, {acked} acked, "
                            f"{covered} covered by a flush: content matches none")  # fmt: skip
    result = check_image(image)
    if result.corruptions or result.check_errors:
        problems.append(f"check: {result.messages}")
    return problems


def run_once(tmp_path: Path, seed: int, program: tuple[str, ...] | None = None) -> Log:
    rng = random.Random(seed)
    image, base = build(tmp_path, rng)
    sock = tmp_path / "pipe.sock"
    log = Log()
    stop = threading.Event()
    extra = {"program": program} if program else {}
    with killable_server(sock, image, (), **extra) as proc:
        threads = [
            threading.Thread(target=client, args=(sock, i, seed * 10 + i, base, log, stop))
            for i in range(CONNECTIONS)
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
    log.problems += judge(image, base, log)
    return log


def test_pipelined_connections_killed_at_random_moments(tmp_path: Path) -> None:
    stats: Counter[str] = Counter()
    problems: list[str] = []
    for run in range(KILLS):
        seed = 7100 + run
        log = run_once(tmp_path, seed)
        stats.update(log.stats)
        problems += [f"run {run} (seed {seed}): {p}" for p in log.problems]
    print(f"\nkill -9 of addcow serve, {CONNECTIONS} pipelining connections: {KILLS} runs, "
          f"{dict(stats)}")  # fmt: skip
    assert problems == [], "\n".join(problems[:20])
    assert stats["writes acked"] >= 100 * KILLS, stats
    assert stats["flushes acked"] >= KILLS, stats
    assert stats["requests in flight at the kill"] >= KILLS * CONNECTIONS, stats


def test_the_judge_catches_a_server_whose_flush_does_nothing(tmp_path: Path) -> None:
    """Mutation check: flushed writes whose bits never reach the disk are reported."""
    mutant = (sys.executable, str(Path(__file__).with_name("noflush_server.py")))
    log = run_once(tmp_path, 7000, program=mutant)
    assert log.stats["flushes acked"] >= 1
    assert any("covered by a flush" in p for p in log.problems), log.problems[:5]
