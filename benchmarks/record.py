"""One machine-readable result file per benchmark run, for every benchmark.

Each benchmark takes ``--json [DIR]`` (:func:`add_option`). With it, the run
ends by writing ``DIR/<benchmark>-<UTC start, YYYYmmddTHHMMSSZ>.json``
(``DIR`` defaults to ``benchmarks/results/``) and printing its path; the
human-readable table is printed either way. The file holds:

``benchmark``    the script's name (``bench_image``, ...);
``source``       ``"measured"`` (written by a run) or ``"transcribed"`` (typed
                 in from an earlier write-up of a run);
``date``         the UTC start of the run (ISO 8601), ``seconds`` its length;
``commit``       ``git rev-parse HEAD`` of the checkout holding the ``addcow``
                 package that was measured (``PYTHONPATH`` decides which), and
                 ``tree_clean``: whether its tracked files matched that commit;
                 both ``null`` outside a git checkout;
``machine``      CPUs (``nproc``: those this process may use), memory, kernel,
                 CPU model, Python, and the load average at the start and end;
``command``      the command line; ``arguments`` the parsed options;
``info``, ``rows`` and any other keys: the benchmark's own results, as its
                 docstring describes them.

Nothing else is written: a run without ``--json`` leaves no file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--json [DIR]``: write this run's result file into DIR (benchmarks/results/)."""
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(RESULTS),
        metavar="DIR",
        help=f"write the results as one JSON file into DIR (default {RESULTS})",
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checkout() -> tuple[str | None, bool | None]:
    """(commit, tree clean) of the git checkout holding the ``addcow`` package measured."""
    spec = importlib.util.find_spec("addcow")
    if spec is None or spec.origin is None:
        return None, None
    where = os.path.dirname(spec.origin)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else status == ""


class Run:
    """A benchmark run: its start, then :meth:`write` of its result file."""

    def __init__(self, benchmark: str, args: argparse.Namespace) -> None:
        self.benchmark = benchmark
        self.args = args
        self.started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.clock = time.monotonic()
        self.load_before = os.getloadavg()

    def write(self, **results: object) -> Path | None:
        """Write the result file if ``--json`` was given; return its path."""
        if self.args.json is None:
            return None
        commit, clean = checkout()
        record: dict[str, object] = {
            "benchmark": self.benchmark,
            "source": "measured",
            "date": self.started.isoformat(),
            "seconds": round(time.monotonic() - self.clock, 1),
            "commit": commit,
            "tree_clean": clean,
            "machine": {
                "nproc": len(os.sched_getaffinity(0)),
                "cpus": os.cpu_count(),
                "memory_bytes": memory_bytes(),
                "kernel": platform.release(),
                "cpu_model": cpu_model(),
                "python": platform.python_version(),
                "load_before": [round(x, 2) for x in self.load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
            },
            "command": sys.argv,
            "arguments": vars(self.args),
            **results,
        }
        directory = Path(self.args.json)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{self.benchmark}-{self.started.strftime('%Y%m%dT%H%M%SZ')}"
        for n in range(1, 100):
            path = directory / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
            try:
                with open(path, "x") as f:  # never over another run's file
                    json.dump(record, f, indent=1, default=str)
                    f.write("\n")
            except FileExistsError:
                continue
            print(f"results: {path}")
            return path
        raise SystemExit(f"{directory}: no free name for {stem}.json")
