"""kill -9 at every I/O call of ``addcow view`` and of ``addcow fold``.

For each call number N, :mod:`view_killer` makes a view of (or folds the view of)
a fresh image and dies just before call N. Then ``fold_view`` in this process must
finish the job (:mod:`addcow.view.record` argues why it can), and:

* after a killed ``view``: the image reads as before, checks clean, and no view
  file is left (a kill before the view record is written leaves no record and no
  view file; any later one leaves a record that fold retires);
* after a killed ``fold``: the image reads as QEMU saw the view (``qemu-img
  convert`` of it before the fold), checks clean, and the view file is gone.

``make test`` runs every 4th call number; ``make campaign`` (ADDCOW_CAMPAIGN=1)
and ``make campaign-sites`` (ADDCOW_CAMPAIGN=sites) run all of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from qcow2_util import convert_raw, qemu_io

import addcow
from addcow.check import check_image
from addcow.format import Header
from addcow.view import fold_view, make_view

EVERY_SITE = os.environ.get("ADDCOW_CAMPAIGN") in ("1", "sites")
STRIDE = 1 if EVERY_SITE else 4
KILLER = Path(__file__).with_name("view_killer.py")
CLUSTER = 65536
SIZE = 16 * CLUSTER - 1536  # a partial last cluster; whole 512-byte sectors, as QEMU needs
WRITES = ("write -P 0x61 4096 512", "write -P 0x62 0x50000 0x20000", "write -z 0 0x10000",
          "discard 0x80000 0x10000", "write -z 0x30000 0x20000")  # fmt: skip


def _prepare(d: Path, with_view: bool) -> bytes:
    """A fresh image (and, ``with_view``, its view written through by qemu-io); the
    content the image must read as once folded."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    base = b"".join(bytes([0x30 + i]) * CLUSTER for i in range(16))
    (d / "base.raw").write_bytes(base)
    addcow.create(d / "d.add-cow", image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=SIZE)  # fmt: skip
    with addcow.open(d / "d.add-cow") as img:
        img.write(b"\x51" * 3 * CLUSTER, CLUSTER)
        img.write(b"\x52" * 100, SIZE - 100)
    content = base[:CLUSTER] + b"\x51" * 3 * CLUSTER + base[4 * CLUSTER : SIZE - 100]
    content += b"\x52" * 100
    if not with_view:
        return content
    make_view(d / "d.add-cow", d / "v.qcow2")
    qemu_io(d / "v.qcow2", *WRITES)
    return convert_raw(d / "v.qcow2")


def _kill(d: Path, phase: str, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KILLER), str(d), phase, str(n)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _judge(d: Path, content: bytes) -> list[str]:
    problems = []
    header = Header.unpack((d / "d.add-cow").read_bytes()[:4096])
    if header.view_name is not None:
        fold_view(d / "d.add-cow")
    result = check_image(d / "d.add-cow")
    if result.corruptions or result.check_errors:
        problems.append(f"check: {result.messages}")
    with addcow.open(d / "d.add-cow", readonly=True) as img:
        if img.size != SIZE or img.read(0, SIZE) != content:
            problems.append("the content is not the expected one")
    if (d / "v.qcow2").exists():
        problems.append("a view file was left")
    return problems


def _campaign(tmp_path: Path, phase: str) -> None:
    d = tmp_path / "run"
    content = _prepare(d, phase == "fold")
    control = _kill(d, phase, -1)
    assert control.returncode == 0, control.stderr
    calls = int(control.stdout)
    assert calls > 5
    assert _judge(d, content) == []
    problems: list[str] = []
    killed = 0
    for n in range(0, calls, STRIDE):
        content = _prepare(d, phase == "fold")
        proc = _kill(d, phase, n)
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr)
        killed += 1
        problems += [f"{phase} killed before call {n}: {p}" for p in _judge(d, content)]
    print(f"\n{phase}: {calls} calls, {killed} kills")
    assert problems == [], "\n".join(problems)


def test_view_killed_at_every_call(tmp_path: Path) -> None:
    _campaign(tmp_path, "view")


def test_fold_killed_at_every_call(tmp_path: Path) -> None:
    _campaign(tmp_path, "fold")
