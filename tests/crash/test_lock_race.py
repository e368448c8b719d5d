"""Two processes race to open the same image read-write: exactly one wins.

Two worker processes (``multiprocessing``, spawn) meet at a barrier before
every round and then call ``addcow.open(path)`` at once. Each reports whether
it got the image or an ``addcow.LockError``; the winner keeps the image open
until the loser has reported, writes one byte (its round number) to prove it
really holds it read-write, and closes it. Required every round: exactly one
winner, the other gets ``LockError`` whose message names the .add-cow file,
and no other exception. After the race the image holds the last round's byte
and checks clean. Every tenth round the loser retries once the winner has
closed and must then succeed (the lock is gone with the close).

``make test`` runs :data:`ROUNDS` rounds; ``make campaign`` many more.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import addcow
from addcow.check import check_image

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
ROUNDS = 5000 if CAMPAIGN else 150


def racer(path: str, rounds: int, start: Barrier, done: Barrier, results: Queue[Any]) -> None:
    for n in range(rounds):
        start.wait(timeout=60)
        img = None
        try:
            img = addcow.open(path)
            results.put((n, os.getpid(), "won", ""))
        except addcow.LockError as exc:
            results.put((n, os.getpid(), "lock", str(exc)))
        except BaseException as exc:  # reported and judged by the parent
            results.put((n, os.getpid(), "error", repr(exc)))
        done.wait(timeout=60)  # both have reported: the winner may close
        if img is not None:
            img.write(bytes([n & 0xFF]), 0)
            img.close()
        done.wait(timeout=60)  # the image is closed
        if img is None and n % 10 == 0:  # the loser retries, now alone
            try:
                with addcow.open(path) as again:
                    again.read(0, 1)
                results.put((n, os.getpid(), "retry", ""))
            except BaseException as exc:
                results.put((n, os.getpid(), "retry failed", repr(exc)))
        done.wait(timeout=60)


def test_two_processes_race_to_open_read_write(tmp_path: Path) -> None:
    path = tmp_path / "race.add-cow"
    addcow.create(path, image_file="race.raw", size=1 << 20)
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(2), ctx.Barrier(2)
    results: Queue[Any] = ctx.Queue()
    procs = [ctx.Process(target=racer, args=(str(path), ROUNDS, start, done, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes: dict[int, list[tuple[int, str, str]]] = {}
        retries = 0
        expected = 2 * ROUNDS + len(range(0, ROUNDS, 10))
        for _ in range(expected):
            n, pid, what, message = results.get(timeout=120)
            if what == "retry":
                retries += 1
                continue
            assert what != "retry failed", f"round {n}: retry after the winner closed: {message}"
            outcomes.setdefault(n, []).append((pid, what, message))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    wins = {pid: 0 for pid in (p.pid for p in procs)}
    for n in range(ROUNDS):
        kinds = sorted(what for _pid, what, _m in outcomes[n])
        assert kinds == ["lock", "won"], f"round {n}: {outcomes[n]}"
        for pid, what, message in outcomes[n]:
            if what == "won":
                wins[pid] += 1
            else:
                assert str(path) in message and "lock" in message, message
    assert retries == len(range(0, ROUNDS, 10))
    print(f"\nlock race: {ROUNDS} rounds, wins per process {sorted(wins.values())}, "
          f"{retries} retries after close, 0 double opens")
    with addcow.open(path, readonly=True) as img:
        assert img.read(0, 1) == bytes([(ROUNDS - 1) & 0xFF])
    report = check_image(path)
    assert report.corruptions == 0 and report.check_errors == 0, report
