"""Shared fixtures: real peer tools, the addcow CLI, and sample images.

A test that needs an external program (qemu-img, qemu-io, nbdinfo, ...) calls
``require_tool``: a missing tool is a failure, never a skip, because ``make
test`` installs every tool the suite uses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ceph_util import Ceph, ceph_cluster

CLUSTER = 65536

# addcow serve runs on the standard asyncio loop unless a test asks for another
# (the serve_loop fixture): uvloop, installed with the test extras, is what
# `pip install addcow[fast]` users get, and the standard loop what everyone else gets.
os.environ["ADDCOW_EVENT_LOOP"] = "asyncio"


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop addcow serve runs on in this test: each one it supports."""
    monkeypatch.setenv("ADDCOW_EVENT_LOOP", request.param)
    return str(request.param)


def popen_interruptible(cmd: list[str], **kwargs: object) -> subprocess.Popen[str]:
    """``subprocess.Popen(cmd, text=True, ...)`` of a command a test interrupts with
    SIGINT, started as from a terminal: SIGINT at its default, even when the tests
    run as a background job (whose commands inherit SIGINT ignored, so Python would
    keep it ignored and no Ctrl-C could reach the command)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return subprocess.Popen(cmd, text=True, **kwargs)  # type: ignore[call-overload]
    finally:
        signal.signal(signal.SIGINT, previous)


def require_tool(name: str) -> str:
    """Path of an external program; fail the test if it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs it)")
    return path


def run(cmd: list[str], *, check: bool = True, cwd: Path | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; with ``check`` a failure shows stderr."""
    proc = subprocess.run(
        cmd, cwd=cwd, input=input.decode() if input is not None else None,
        capture_output=True, text=True, timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def addcow(*args: str | os.PathLike[str], check: bool = True,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the addcow command line as a user would (python -m addcow)."""
    return run([sys.executable, "-m", "addcow", *map(str, args)], check=check, cwd=cwd)


def allocated_clusters(image: Path) -> set[int]:
    """Clusters at depth 0 in ``addcow map --output=json``."""
    out: set[int] = set()
    for ext in json.loads(addcow("map", "--output=json", image).stdout):
        if ext["depth"] == 0:
            end = ext["start"] + ext["length"]
            out.update(range(ext["start"] // CLUSTER, -(-end // CLUSTER)))
    return out


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


@pytest.fixture
def base_raw(tmp_path: Path) -> Path:
    """A 1 MiB raw backing file: cluster i filled with byte 0x10 + i, clusters 8-11 holes."""
    path = tmp_path / "base.raw"
    with open(path, "wb") as f:
        f.truncate(16 * CLUSTER)
        for i in range(16):
            if 8 <= i < 12:
                continue
            f.seek(i * CLUSTER)
            f.write(pattern(0x10 + i, CLUSTER))
    return path


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """The single-node Ceph cluster with its S3 gateway (tests/ceph_util.py), started
    once per test run: the xdist workers of one run share it through a directory
    beside their own temporary directories, and the last one out stops it."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    root = base.parent / f"ceph-{run_id}" if run_id else base / "ceph"
    with ceph_cluster(root) as cluster:
        yield cluster
