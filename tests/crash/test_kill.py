"""kill -9 of a writer process at random moments, then the same judge as power loss.

``writer.py`` runs the seeded workload of :mod:`workload` through the library
and logs "begin I" / "ack I" around every operation to a side file. The parent
waits until the log reaches a seeded random operation, lets a random few
milliseconds pass and kills it with SIGKILL, replays the log into
:class:`workload.Model` (acknowledged writes, completed flushes, the operation
in flight) and checks the reopened image cluster by cluster and with
``check_image``; every other run also writes to the recovered image.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from workload import Model, build, gen_ops, replay, verify

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
KILLS = 200 if CAMPAIGN else 6
OPS = 400
WRITER = Path(__file__).with_name("writer.py")


def parse(log: Path) -> list[tuple[object, ...]]:
    events: list[tuple[object, ...]] = []
    for line in log.read_text().splitlines():
        kind, *rest = line.split()
        arg: object = rest[0] if rest else None
        if isinstance(arg, str) and arg.isdigit():
            arg = int(arg)
        events.append((kind, arg))
    return events


def test_writer_killed_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(4242)
    stats: Counter[str] = Counter()
    problems: list[str] = []
    for run in range(KILLS):
        seed = 5000 + run
        content = build(tmp_path)
        log = tmp_path / "ops.log"
        log.unlink(missing_ok=True)  # a writer killed before it starts logs nothing
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(tmp_path / "d.add-cow"), str(seed), str(OPS),
             str(log)], stderr=subprocess.PIPE,
        )
        if run == 0:  # a control run that is not killed
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        else:
            # kill during a random operation: wait until the log reaches it, then
            # a random few milliseconds more (inside it, or a few operations on)
            target = rng.randrange(OPS)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if log.exists() and log.read_bytes().count(b"\n") >= 2 * target + 1:
                    break
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.004))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode in (0, -signal.SIGKILL), err
        events = parse(log) if log.exists() else []
        ops = gen_ops(seed, OPS)
        model = Model(bytearray(content))
        for e in events:
            replay(model, ops, e)
        acked = sum(1 for e in events if e[0] == "ack")
        stats["finished" if events and events[-1][0] == "done" else "killed"] += 1
        stats["operations acknowledged"] += acked
        if 0 < acked < OPS:
            stats["killed mid-workload"] += 1
        if events and events[-1][0] == "begin":
            stats["killed inside an operation"] += 1
        for p in verify(tmp_path / "d.add-cow", model, reopen_write=run % 2 == 0):
            problems.append(f"run {run} (seed {seed}, {acked} acked): {p}")
    print(f"\nkill -9: {KILLS} runs, {dict(stats)}")
    assert stats["killed mid-workload"] >= max(1, KILLS // 3), stats
    assert problems == [], "\n".join(problems[:20])
