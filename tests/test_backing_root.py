"""backing_root / --backing-root: files an image names must stay inside one tree.

For services that open images they did not create (the qcow2 data-file class of
bug, CVE-2024-32498 / CVE-2024-4467): absolute names, ``..``, symlinks out of
the tree and names of devices are refused before any content is read.

    root/                        outside/
      ok.add-cow -> ok.raw         secret.raw
      ok.raw
      base.raw
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import addcow as run_addcow

import addcow
from addcow.format import Header

MiB = 1 << 20


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.raw").write_bytes(b"secret" * 1000)
    with open(root / "base.raw", "wb") as f:
        f.truncate(MiB)
    return root, outside


def named(root: Path, image_name: bytes, backing_name: bytes | None = b"base.raw") -> Path:
    """An image in ``root`` whose header names ``image_name`` and ``backing_name``."""
    path = root / "t.add-cow"
    header = Header(
        version=2,
        image_name=image_name,
        backing_name=backing_name,
        backing_format="raw" if backing_name else None,
        image_size=MiB,
    )
    path.write_bytes(header.pack() + bytes(2))
    return path


def test_control_names_inside_the_root_open(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    path = named(root, b"ok.raw")
    with addcow.open(path, backing_root=str(root)) as img:
        assert img.read(0, 4) == bytes(4)


@pytest.mark.parametrize(
    ("image_name", "backing_name"),
    [
        ("ok.raw", "../outside/secret.raw"),
        ("ok.raw", "{outside}/secret.raw"),
        ("../outside/secret.raw", None),
    ],
    ids=["backing-dotdot", "backing-absolute", "image-file-outside"],
)
def test_names_outside_the_root_are_refused(
    tree: tuple[Path, Path], image_name: str, backing_name: str | None
) -> None:
    root, outside = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    backing = None if backing_name is None else os.fsencode(backing_name.format(outside=outside))
    path = named(root, os.fsencode(image_name), backing)
    with pytest.raises(addcow.PathPolicyError, match="outside the allowed directory"):
        addcow.open(path, readonly=True, backing_root=str(root))


def test_a_symlink_out_of_the_root_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    (root / "link.raw").symlink_to(outside / "secret.raw")
    path = named(root, b"ok.raw", b"link.raw")
    with pytest.raises(addcow.PathPolicyError, match=r"secret\.raw"):
        addcow.open(path, readonly=True, backing_root=str(root))


def test_a_device_name_is_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    path = named(root, b"ok.raw", b"/dev/zero")
    with pytest.raises(addcow.PathPolicyError, match="/dev/zero"):
        addcow.open(path, readonly=True, backing_root=str(root))


def test_the_cli_refuses_with_one_line(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    path = named(root, b"ok.raw", b"../outside/secret.raw")
    commands = (
        ["map"],
        ["io", "-r", "-c", "read 0 512"],
        ["convert", "--backing-root", root, path, root / "out.raw"],
        ["compare", "--backing-root", root, path, root / "ok.raw"],
        ["stream"],
        ["commit"],
        ["rebase", "-b", "ok.raw", "-F", "raw"],
    )
    for cmd in commands:
        args = cmd if "--backing-root" in cmd else [*cmd, "--backing-root", root, path]
        proc = run_addcow(*args, check=False)
        assert proc.returncode == (2 if cmd[0] == "compare" else 1), proc  # compare: 2 = error
        assert proc.stderr.startswith("addcow: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "outside the allowed directory" in proc.stderr
    # check reports the refused backing as a chain it could not check (exit 1)
    proc = run_addcow("check", "--backing-root", root, path, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("Check error backing chain: ")
    assert "outside the allowed directory" in proc.stderr
    # without the restriction the same image opens (the control for the CLI case)
    assert run_addcow("map", path).returncode == 0


def test_a_symlink_loop_is_refused_cleanly(tree: tuple[Path, Path]) -> None:
    """A backing name that is a symlink loop fails with an AddCowError, with or
    without a root, instead of hanging or raising OSError."""
    root, _ = tree
    with open(root / "ok.raw", "wb") as f:
        f.truncate(MiB)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    path = named(root, b"ok.raw", b"loop-a")
    for kw in ({}, {"backing_root": str(root)}):
        with pytest.raises(addcow.AddCowError, match="loop-a"):
            addcow.open(path, readonly=True, **kw)
