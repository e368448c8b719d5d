"""Symlinks swapped while an image opens: ``backing_root`` must still hold.

``ChainGuard.check_path`` resolves a name before it is opened; a symlink
swapped between that check and the ``open`` would slip an outside file in.
``ChainGuard.check_open`` closes that window by asking the kernel where the
opened descriptor really is. Here a separate process swaps symlinks without
pause (``rename`` of a new symlink over the old one, so the name always
exists), flipping each between a file inside ROOT and a secret file outside,
while this process opens the image again and again with
``backing_root=ROOT``. Three names race:

* ``backing``: the backing file name is a symlink (``link.raw``);
* ``directory``: a directory on the way is a symlink (``d/file.raw``);
* ``image file``: the image file name is a symlink (``img.raw``).

Every open must either raise an ``AddCowError`` or give the inside content,
with no secret byte; no descriptor may be left open. Both outcomes must be
seen for each name (the race really ran), and the same run without
``check_open`` must leak the secret (the race reached the window that only
``check_open`` guards).

``make test`` runs ``ROUNDS`` opens per name (more if the race has not yet gone
both ways for every name); ``ADDCOW_CAMPAIGN=1`` 5000.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CLUSTER

import addcow
from addcow.errors import PathPolicyError
from addcow.stores.chain import ChainGuard

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
ROUNDS = 5000 if CAMPAIGN else 400
SIZE = 4 * CLUSTER
GOOD = b"\x11" * SIZE
TOP = b"\x22" * CLUSTER  # cluster 0 of the image file; the rest reads the backing
SECRET = b"SECRET!!" * (SIZE // 8)
NAMES = ("backing", "directory", "image file")

SWAPPER = r"""
import os, sys
pairs = [line.split("\t") for line in sys.argv[1:]]
tmp = [link + ".swap" for link, _, _ in pairs]
n = 0
while True:
    for (link, inside, outside), t in zip(pairs, tmp):
        os.symlink(outside if n & 1 else inside, t)
        os.rename(t, link)
    n += 1
"""


def build(base: Path) -> tuple[Path, dict[str, Path], list[str]]:
    """ROOT with one top image per racing name, the outside secrets, and the swaps."""
    root, outside = base / "root", base / "outside"
    (root / "gooddir").mkdir(parents=True)
    outside.mkdir()
    for path, data in [
        (root / "good.raw", GOOD),
        (root / "gooddir" / "file.raw", GOOD),
        (outside / "secret.raw", SECRET),
        (outside / "file.raw", SECRET),
    ]:
        path.write_bytes(data)
    swaps = {
        "backing": (root / "link.raw", "good.raw", "../outside/secret.raw"),
        "directory": (root / "d", "gooddir", "../outside"),
        "image file": (root / "img.raw", "top-image.raw", "../outside/secret.raw"),
    }
    for link, inside, _outside in swaps.values():
        link.symlink_to(inside)
    tops = {
        "backing": root / "backing.add-cow",
        "directory": root / "directory.add-cow",
        "image file": root / "imagefile.add-cow",
    }
    image_files = {"backing": "b-image.raw", "directory": "d-image.raw", "image file": "img.raw"}
    backings = {"backing": "link.raw", "directory": "d/file.raw", "image file": "good.raw"}
    for name in NAMES:
        addcow.create(tops[name], image_file=image_files[name], backing_file=backings[name],
                      backing_format="raw", size=SIZE)
        with addcow.open(tops[name]) as img:
            img.write(TOP, 0)
    pairs = [f"{link}\t{inside}\t{out}" for link, inside, out in swaps.values()]
    return root, tops, pairs


@contextmanager
def swapping(pairs: list[str]) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", SWAPPER, *pairs])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, "the swapper died on its own"


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def race(
    root: Path,
    tops: dict[str, Path],
    pairs: list[str],
    seen_enough: Callable[[Counter[str], int], bool],
) -> tuple[Counter[str], int]:
    """Open every top ROUNDS times while the swapper runs: (outcomes, secret leaks).

    The interleaving is up to the scheduler: until ``seen_enough(outcomes, leaks)``
    the rounds go on, up to 10 x ROUNDS, so that a slow swapper does not make the
    test fail for want of a race.
    """
    outcomes: Counter[str] = Counter()
    leaks = 0
    expected = TOP + GOOD[CLUSTER:]
    before = open_fds()
    with swapping(pairs):
        for done in range(10 * ROUNDS):
            if done >= ROUNDS and seen_enough(outcomes, leaks):
                break
            for name in NAMES:
                try:
                    with addcow.open(tops[name], readonly=True, backing_root=str(root)) as img:
                        content = img.read(0, SIZE)
                except addcow.AddCowError as exc:
                    outcomes[f"{name}: {type(exc).__name__}"] += 1
                    continue
                if b"SECRET" in content:
                    leaks += 1
                else:
                    assert content == expected, f"{name}: neither the inside nor the secret"
                outcomes[f"{name}: opened"] += 1
    assert open_fds() == before, "descriptors left open"
    return outcomes, leaks


def test_swapped_symlinks_never_let_an_outside_file_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caught = Counter[str]()  # refusals by check_open: the name had passed check_path
    real_check_open = ChainGuard.check_open

    def check_open(self: ChainGuard, fd: int, path: str) -> None:
        try:
            real_check_open(self, fd, path)
        except PathPolicyError:
            caught["after open"] += 1
            raise

    monkeypatch.setattr(ChainGuard, "check_open", check_open)
    root, tops, pairs = build(tmp_path)

    def both_ways(outcomes: Counter[str], leaks: int) -> bool:
        return caught["after open"] > 0 and all(
            outcomes[f"{name}: opened"] and outcomes[f"{name}: PathPolicyError"]
            for name in NAMES
        )

    outcomes, leaks = race(root, tops, pairs, both_ways)
    print(f"\nbacking-root race: {dict(sorted(outcomes.items()))}, "
          f"{caught['after open']} refused by check_open")
    assert leaks == 0, f"{leaks} opens read the secret outside the root"
    assert caught["after open"] > 0, "no swap fell between check_path and the open"
    for name in NAMES:
        assert outcomes[f"{name}: opened"] > 0, f"{name}: never opened: {outcomes}"
        assert outcomes[f"{name}: PathPolicyError"] > 0, f"{name}: never refused: {outcomes}"


def test_the_race_needs_the_check_of_the_opened_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: without check_open the same race lets the secret in."""
    monkeypatch.setattr(ChainGuard, "check_open", lambda self, fd, path: None)
    root, tops, pairs = build(tmp_path)
    outcomes, leaks = race(root, tops, pairs, lambda outcomes, leaks: leaks > 0)
    print(f"\nbacking-root race without check_open: {leaks} leaks, {dict(outcomes)}")
    assert leaks > 0, f"the race never reached the window after check_path: {outcomes}"
