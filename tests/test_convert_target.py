"""A file ``convert`` is named to write, and would destroy if named by mistake.

``addcow convert disk.add-cow golden.qcow2`` (a typo for ``golden.raw``) must
not turn an image into a raw disk:

* a target that starts with an image header (qcow2, add-cow, any known magic)
  is refused unless ``--force``, and left as it was (content and mtime);
* a target another process has open (qemu-nbd or ``addcow serve`` using it) is
  refused even with ``--force``;
* a raw target (no image header) is overwritten, as ``qemu-img convert`` does.

qemu-img makes the images and referees the content written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import served, snapshot

import addcow
from addcow.copy import copy_to_raw
from addcow.errors import ExistingFileError

MiB = 1 << 20
GIVE_FORCE = "refusing to replace it (--force replaces it)"


def fails(*args: str | os.PathLike[str]) -> str:
    """Run addcow expecting exit 1 and one 'addcow: ...' line; return that line."""
    proc = addcow_cli(*args, check=False)
    assert proc.returncode == 1, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("addcow: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip()


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return run([require_tool("qemu-img"), *map(str, args)]).stdout


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """w.add-cow, 1 MiB, with 0x5a in its first cluster."""
    image = tmp_path / "w.add-cow"
    addcow.create(image, image_file="w.raw", size=MiB)
    with addcow.open(image) as img:
        img.write(b"\x5a" * CLUSTER, 0)
    return image


def assert_is_copy(target: Path, source: Path) -> None:
    out = qemu_img("compare", "-f", "raw", "-F", "raw", target, source.with_suffix(".raw"))
    assert "Images are identical." in out


def test_a_qcow2_target_is_refused_and_left_as_it_was(source: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", golden, "1M")
    before = snapshot(golden)
    err = fails("convert", source, golden)
    assert err == f"addcow: {golden}: the file exists and holds a qcow2 image; {GIVE_FORCE}"
    assert snapshot(golden) == before
    assert "file format: qcow2" in qemu_img("info", golden)
    # the library refuses it too
    with addcow.open(source, readonly=True) as img, pytest.raises(ExistingFileError):
        copy_to_raw(img, str(golden))
    assert snapshot(golden) == before


def test_an_add_cow_target_is_refused(source: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.add-cow"
    addcow.create(other, image_file="other.raw", size=MiB)
    before = snapshot(other, tmp_path / "other.raw")
    for args in (["convert"], ["convert", "-O", "add-cow", "-o", "image_file=n.raw"]):
        err = fails(*args, source, other)
        assert err.startswith(f"addcow: {other}: the file exists and holds an add-cow image; ")
        assert "--force" in err
    assert snapshot(other, tmp_path / "other.raw") == before
    assert not (tmp_path / "n.raw").exists()


def test_force_replaces_an_image_target(source: Path, tmp_path: Path) -> None:
    golden = tmp_path / "golden.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", golden, "1M")
    addcow_cli("convert", "--force", source, golden)
    assert_is_copy(golden, source)
    assert "file format: raw" in qemu_img("info", "-f", "raw", golden)
    # -O add-cow: --force replaces the .add-cow file (create --force)
    other = tmp_path / "other.add-cow"
    addcow.create(other, image_file="other.raw", size=2 * MiB)
    addcow_cli("convert", "--force", "-O", "add-cow", "-o", "image_file=n.raw", source, other)
    out = tmp_path / "out.raw"
    addcow_cli("convert", other, out)
    assert_is_copy(out, source)


def test_a_raw_target_is_overwritten(source: Path, tmp_path: Path) -> None:
    """The control: a file without an image header is replaced, as qemu-img convert does."""
    old = tmp_path / "old.raw"
    old.write_bytes(b"\x11" * (3 * MiB))
    addcow_cli("convert", source, old)
    assert old.stat().st_size == MiB
    assert_is_copy(old, source)


@contextlib.contextmanager
def qemu_nbd(path: Path, fmt: str, sock: Path) -> Iterator[None]:
    """qemu-nbd serving ``path`` read-write, as for a running guest."""
    proc = subprocess.Popen(
        [require_tool("qemu-nbd"), "-f", fmt, "-t", "-k", str(sock), str(path)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_target_in_use_is_refused_even_with_force(source: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", busy, "1M")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x22" * MiB)
    plain = f"{MiB} bytes and no image header"
    for path, fmt, holds in ((busy, "qcow2", "a qcow2 image"), (disk, "raw", plain)):
        before = snapshot(path)
        with qemu_nbd(path, fmt, tmp_path / "q.sock"):
            for force in ([], ["--force"]):
                err = fails("convert", *force, source, path)
                assert err == (
                    f"addcow: {path}: the file exists, holds {holds} and is in use by another "
                    "process; refusing to replace it"
                )
        assert snapshot(path) == before
    # addcow serve: its .add-cow file and its image file
    served_image = tmp_path / "s.add-cow"
    addcow.create(served_image, image_file="s.raw", size=MiB)
    files = (served_image, tmp_path / "s.raw")
    before = snapshot(*files)
    with served(tmp_path, served_image):
        for path, holds in zip(files, ("an add-cow image", plain), strict=True):
            err = fails("convert", "--force", source, path)
            assert err.startswith(f"addcow: {path}: the file exists, holds {holds} and is in use")
    assert snapshot(*files) == before
