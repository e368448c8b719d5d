"""A seeded campaign over hostile names: ``backing_root`` must hold for any chain.

The invariant, for ``addcow.open(top, backing_root=ROOT, readonly=True)``:

* it either raises an :class:`addcow.AddCowError` or opens; no other exception
  escapes (KeyboardInterrupt excepted);
* if it opens, every descriptor the process gained (``/proc/self/fd`` before and
  after) and every file ``img.file_ids()`` reports is a file inside ROOT, judged
  by (device, inode) against a walk of ROOT that follows no symlink; reading the
  whole virtual disk never returns the secret bytes kept outside ROOT;
* no descriptor is left behind, after a failure or after ``close``;
* it agrees with an oracle computed here, independently of the library: each
  name is joined to the directory of the name of the image that holds it (the
  specification's rule), then resolved by the kernel (``os.stat``) and located
  by inode. Walking the chain in the order an open does, the first file that
  is outside ROOT must give PathPolicyError, the first repeated file or the
  17th backing BackingLoopError, and any other obstacle (missing, not a
  regular file, symlink loop, name too long, invalid header, image file too
  small, bitmap truncated, format not recorded) some AddCowError; a chain with
  none of these must open.

The generator (seeded ``random.Random``; one fresh directory per case)::

    base/root/        backing_root; the top image is root/top.add-cow
    base/root.evil/   outside, but its path starts with ROOT's path
    base/outside/     secret.raw, inner/secret.raw and evil.add-cow images whose
                      clusters all read secret.raw
    base/rootlink ->  root (ROOT and the top image are sometimes named through it)

builds a chain of 1-6 images (sometimes 15-20, to meet the depth limit); each
image file name and backing name is drawn from the shapes below (``SHAPES``):
benign ones (plain, sub directories, ``..`` that stays inside, absolute names,
symlinks and directory symlinks inside, ``/proc/self/root`` and
``/proc/self/fd`` aliases of inside files, long ``././`` names), escaping ones
(``..`` out, absolute names outside, the ``root.evil`` prefix sibling, symlinks
out with relative and absolute targets, directory symlinks out, a symlink then
``..``, ``/dev/*``, ``/proc/self/*``), broken ones (missing, symlink loops, more
than 40 symlinks, directories, a FIFO, trailing slash, a file used as a
directory, names past PATH_MAX or up to the 1 MiB header limit, the empty
name), loops (a name of a file already in the chain), and a short name
whose real path is longer than PATH_MAX. File names are sometimes odd
(spaces, newlines, non-UTF-8 bytes, escapes, ``json:``). Not generated: hard
links (an inside hard link to an outside file is inside by every path, beyond
what a path policy can see) and races (symlinks swapped during the open:
tests/test_backing_root_race.py).
Headers are version 2 (sometimes 1), with empty, partial or full bitmaps, the
ALL_ALLOCATED flag, and now and then a broken magic or a truncated bitmap.

Every ``CLI_EVERY``-th case also runs ``addcow map --backing-root ROOT top`` and
``addcow info --backing-chain --backing-root ROOT top``, every other time with a
strict UTF-8 stdout: no traceback; a failure is one line starting with
``addcow:``; ``map`` succeeds exactly when the library open does; no secret
byte in their output.

``make test`` runs ``CASES`` seeds; ``ADDCOW_CAMPAIGN=1`` runs 5000;
``ADDCOW_CAMPAIGN_CASES=N`` any number; ``ADDCOW_CAMPAIGN_SEED=S`` one seed
(reproduction). Run with ``-s`` to see the summary line.

The campaign found six defects, fixed since, each with a regression test at
the end of this file: a named file whose real path is longer than PATH_MAX gave
a bare OSError; ``info`` had no ``--backing-root`` (and with ``--backing-chain``
read the header of an add-cow backing outside the tree, echoing its first
bytes in the error); a newline in a name split a CLI error over several lines;
a name that is not UTF-8 made ``info`` and ``map`` die with a traceback on a
strict UTF-8 stdout; and a name of many ``./`` components cost seconds in
``os.path.realpath`` (names are now refused from PATH_MAX bytes on).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

import addcow
import addcow.stores.chain
from addcow import AddCowError, BackingLoopError, PathPolicyError
from addcow.format import MAX_HEADER_SIZE, PAGE, Header

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
CASES = int(os.environ.get("ADDCOW_CAMPAIGN_CASES", "5000" if CAMPAIGN else "300"))
ONLY_SEED = os.environ.get("ADDCOW_CAMPAIGN_SEED")
CLI_EVERY = 20

SIZE = 64 << 10
"""Virtual size of every version 2 image, and size of every image file."""
CLUSTER_BITS = 12
V1_CLUSTER_BITS = 16
V2_NAMES_START = 84
V1_NAMES_ROOM = PAGE - 36
SPEC_MAX_DEPTH = 16
"""Most backing files below one image (specification, "Backing chains")."""
SECRET = b"<<SECRET-BYTES>>"
SECRET_HEAD = SECRET[:8]
"""Found in anything that shows bytes of a file outside ROOT."""

SLOW_OPEN = 5.0
"""Seconds an open may take before the case is flagged (bounded time)."""

FileId = tuple[int, int]
FORMATS = {"raw": "raw", "addcow": "add-cow"}
"""backing_format for the roles of a backing name."""


def fid(st: os.stat_result) -> FileId:
    return (st.st_dev, st.st_ino)


# -- the tree of one case ------------------------------------------------------------


class Tree(NamedTuple):
    base: str
    root: str
    outside: str
    sibling: str

    @property
    def link(self) -> str:
        return os.path.join(self.base, "rootlink")


class MetaRec(NamedTuple):
    """What the generator wrote into one .add-cow file (the oracle's model)."""

    header: Header
    bitmap: bytes
    valid: bool


class Slot(NamedTuple):
    """A name for one header field; ``create``: the generator makes its target."""

    name: bytes
    create: bool


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_tree(base: str) -> tuple[Tree, dict[FileId, MetaRec]]:
    """root/, root.evil/ and outside/ (secrets and evil images), and rootlink -> root."""
    tree = Tree(base, os.path.join(base, "root"), os.path.join(base, "outside"), "")
    tree = tree._replace(sibling=tree.root + ".evil")
    os.makedirs(os.path.join(tree.outside, "inner"))
    os.mkdir(tree.root)
    os.mkdir(tree.sibling)
    os.symlink("root", tree.link)
    metas: dict[FileId, MetaRec] = {}
    secret = SECRET * (SIZE // len(SECRET))
    evil = Header(version=2, image_name=b"secret.raw", image_size=SIZE, cluster_bits=CLUSTER_BITS)
    bitmap = b"\xff" * (SIZE >> CLUSTER_BITS >> 3)
    for directory in (tree.outside, os.path.join(tree.outside, "inner"), tree.sibling):
        write_file(os.path.join(directory, "secret.raw"), secret)
        meta = os.path.join(directory, "evil.add-cow")
        write_file(meta, evil.pack() + bitmap)
        metas[fid(os.stat(meta))] = MetaRec(evil, bitmap, True)
    return tree, metas


def here(named: str) -> str:
    """The directory relative names in the image named ``named`` start from."""
    return os.path.dirname(named)


def real(named: str) -> str:
    return os.path.realpath(here(named))


def join_name(name: bytes, named: str) -> str:
    """The specification's rule: a relative name starts at the naming image's directory."""
    path = os.fsdecode(name)
    return path if path.startswith("/") else os.path.join(here(named), path)


def enc(name: str) -> bytes:
    return os.fsencode(name)


def ext(role: str) -> str:
    return ".add-cow" if role == "addcow" else ".raw"


ODD_STEMS = [
    "f{n} sp",
    "f{n}\nline",
    "f{n}\udcff\udcfe",
    "-f{n}",
    "f{n}\t\r",
    "\x1b[1mf{n}",
    "f\u00e9{n}",
    "f{n}\u202egpj",
    "f{n};$(id)`x`",
    "f{n}*?[",
    " f{n} ",
    "f{n}\\",
    "json:{{}}f{n}",
    "file:f{n}",
]


class Gen:
    """State of one case while it is generated."""

    def __init__(self, rng: random.Random, tree: Tree, metas: dict[FileId, MetaRec]) -> None:
        self.rng = rng
        self.tree = tree
        self.metas = metas
        self.count = 0
        self.held: list[int] = []
        self.chain: list[str] = []
        self.picked: list[tuple[str, str, bytes]] = []

    def fresh(self, suffix: str = ".raw") -> str:
        """A new file name component, odd one time in four."""
        self.count += 1
        stem = f"f{self.count}"
        if self.rng.random() < 0.25:
            stem = self.rng.choice(ODD_STEMS).format(n=self.count)
        return stem + suffix

    def mkdir(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.makedirs(path, exist_ok=True)

    def symlink(self, target: str, at: str) -> None:
        with contextlib.suppress(OSError):
            os.symlink(target, at)

    def file(self, path: str, data: bytes = b"") -> bool:
        try:
            write_file(path, data)
        except OSError:
            return False
        return True

    def hold(self, path: str) -> int | None:
        """Keep ``path`` open during the case (for /proc/self/fd names)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        self.held.append(fd)
        return fd

    def outside_target(self, role: str) -> str:
        """An existing file outside ROOT that a name of this role could lead to."""
        t = self.tree
        if role == "addcow":
            pool = ["outside/evil.add-cow", "outside/inner/evil.add-cow", "outside/secret.raw"]
            pool.append(os.path.relpath(os.path.join(t.sibling, "evil.add-cow"), t.base))
        else:
            pool = ["outside/secret.raw", "outside/inner/secret.raw", "outside/evil.add-cow"]
            pool.append(os.path.relpath(os.path.join(t.sibling, "secret.raw"), t.base))
        return os.path.join(t.base, self.rng.choice(pool))


# -- name shapes ---------------------------------------------------------------------
# Each takes (gen, the naming image's name, role) and returns a Slot. Roles:
# "image" (an image file), "raw" (a raw backing), "addcow" (an add-cow backing).

Shape = Callable[[Gen, str, str], Slot]


def s_plain(g: Gen, named: str, role: str) -> Slot:
    return Slot(enc(g.fresh(ext(role))), True)


def s_subdir(g: Gen, named: str, role: str) -> Slot:
    d = g.fresh("")
    g.mkdir(os.path.join(here(named), d))
    return Slot(enc(f"{d}/{g.fresh(ext(role))}"), True)


def s_dotdot_inside(g: Gen, named: str, role: str) -> Slot:
    d, f = g.fresh(""), g.fresh(ext(role))
    g.mkdir(os.path.join(here(named), d, "deeper"))
    forms = [
        f"{d}/../{f}",
        f"{d}/deeper/../../{f}",
        f"{d}/deeper/../{f}",
        f"{d}/./deeper/.././../{f}",
    ]
    return Slot(enc(g.rng.choice(forms)), True)


def s_out_and_back(g: Gen, named: str, role: str) -> Slot:
    """``../root/f``: leaves the directory (maybe ROOT) by name, comes back in."""
    parts = real(named).strip("/").split("/")
    up = min(g.rng.randint(1, 3), len(parts))
    back = "/".join(parts[len(parts) - up :])
    return Slot(enc("../" * up + back + "/" + g.fresh(ext(role))), True)


def s_abs_inside(g: Gen, named: str, role: str) -> Slot:
    bases = [real(named), here(named)]
    return Slot(enc(os.path.join(g.rng.choice(bases), g.fresh(ext(role)))), True)


def s_dot_slash(g: Gen, named: str, role: str) -> Slot:
    """``./f``, ``.//.//f``, up to a whole path of about 4000 bytes."""
    f, pad = g.fresh(ext(role)), g.rng.choice(["./", ".//"])
    room = 4000 - len(enc(here(named))) - len(enc(f))
    reps = g.rng.choice([1, 3, max(1, room // len(pad))])
    return Slot(enc(pad * reps + f), True)


def s_symlink_inside(g: Gen, named: str, role: str) -> Slot:
    link, f, d = g.fresh(".lnk"), g.fresh(ext(role)), g.fresh("")
    g.mkdir(os.path.join(here(named), d))
    target = g.rng.choice([f, os.path.join(real(named), f), f"{d}/{f}", f"./{d}/../{f}"])
    g.symlink(target, os.path.join(here(named), link))
    return Slot(enc(link), True)


def s_dirlink_inside(g: Gen, named: str, role: str) -> Slot:
    d, dl = g.fresh(""), g.fresh(".dir")
    g.mkdir(os.path.join(here(named), d))
    g.symlink(g.rng.choice([d, os.path.join(real(named), d)]), os.path.join(here(named), dl))
    return Slot(enc(f"{dl}/{g.fresh(ext(role))}"), True)


def s_link_chain_inside(g: Gen, named: str, role: str) -> Slot:
    links = [g.fresh(".lnk") for _ in range(g.rng.randint(2, 6))]
    for a, b in zip(links, [*links[1:], g.fresh(ext(role))], strict=True):
        g.symlink(b, os.path.join(here(named), a))
    return Slot(enc(links[0]), True)


def s_proc_root_inside(g: Gen, named: str, role: str) -> Slot:
    return Slot(enc("/proc/self/root" + os.path.join(real(named), g.fresh(ext(role)))), True)


def s_proc_fd_inside(g: Gen, named: str, role: str) -> Slot:
    """``/proc/self/fd/N`` (or ``/dev/fd/N``) of an inside file the test holds open."""
    path = os.path.join(here(named), g.fresh(ext(role)))
    fd = g.hold(path) if g.file(path) else None
    if fd is None:
        return Slot(enc(path), False)
    return Slot(enc(g.rng.choice(["/proc/self/fd/", "/dev/fd/"]) + str(fd)), True)


def s_dotdot_out(g: Gen, named: str, role: str) -> Slot:
    t = g.outside_target(role)
    rel = os.path.relpath(t, real(named))
    d = g.fresh("")
    g.mkdir(os.path.join(here(named), d))
    forms = [rel, "./" + rel, f"{d}/../{rel}", "../" * 40 + t.lstrip("/")]
    return Slot(enc(g.rng.choice(forms)), False)


def s_abs_out(g: Gen, named: str, role: str) -> Slot:
    t, root = g.outside_target(role), g.tree.root
    via_root = root + "/../" + os.path.relpath(t, os.path.dirname(root))
    return Slot(
        enc(
            g.rng.choice(
                [t, "//" + t.lstrip("/"), via_root, root + "/./.." + t[len(g.tree.base) :]]
            )
        ),
        False,
    )


def s_prefix_sibling(g: Gen, named: str, role: str) -> Slot:
    """``root.evil/``: its path starts with ROOT's path, a string-prefix trap."""
    t = os.path.join(g.tree.sibling, "evil.add-cow" if role == "addcow" else "secret.raw")
    return Slot(enc(g.rng.choice([t, os.path.relpath(t, real(named))])), False)


def s_symlink_out(g: Gen, named: str, role: str) -> Slot:
    t, link = g.outside_target(role), g.fresh(".lnk")
    g.symlink(g.rng.choice([t, os.path.relpath(t, real(named))]), os.path.join(here(named), link))
    return Slot(enc(link), False)


def s_dirlink_out(g: Gen, named: str, role: str) -> Slot:
    t = g.outside_target(role)
    directory, dl = os.path.dirname(t), g.fresh(".dir")
    target = g.rng.choice([directory, os.path.relpath(directory, real(named))])
    g.symlink(target, os.path.join(here(named), dl))
    return Slot(enc(f"{dl}/{os.path.basename(t)}"), False)


def s_link_then_dotdot(g: Gen, named: str, role: str) -> Slot:
    """``dl/../secret.raw``: reads as inside, but dl -> outside/inner."""
    inner, dl = os.path.join(g.tree.outside, "inner"), g.fresh(".dir")
    g.symlink(
        g.rng.choice([inner, os.path.relpath(inner, real(named))]), os.path.join(here(named), dl)
    )
    leaf = "evil.add-cow" if role == "addcow" and g.rng.random() < 0.7 else "secret.raw"
    return Slot(enc(f"{dl}/../{leaf}"), False)


def s_link_chain_out(g: Gen, named: str, role: str) -> Slot:
    links = [g.fresh(".lnk") for _ in range(g.rng.randint(2, 5))]
    t = g.outside_target(role)
    for a, b in zip(links, [*links[1:], t], strict=True):
        g.symlink(b, os.path.join(here(named), a))
    return Slot(enc(links[0]), False)


def s_special(g: Gen, named: str, role: str) -> Slot:
    """Devices, /proc files, directories outside, /proc aliases of outside files."""
    t = g.outside_target(role)
    pool = ["/dev/zero", "/dev/null", "/dev/full", "/dev/urandom", "/proc/self/environ"]
    pool += ["/proc/self/status", "/proc/self/cmdline", "/", "/tmp", "/proc/self/root" + t]
    fd = g.hold(t)
    if fd is not None:
        pool += [f"/proc/self/fd/{fd}", f"/dev/fd/{fd}"]
    return Slot(enc(g.rng.choice(pool)), False)


def s_missing(g: Gen, named: str, role: str) -> Slot:
    return Slot(enc(g.fresh(ext(role))), False)


def s_symlink_loop(g: Gen, named: str, role: str) -> Slot:
    a, b = g.fresh(".lnk"), g.fresh(".lnk")
    if g.rng.random() < 0.3:
        g.symlink(a, os.path.join(here(named), a))
    else:
        g.symlink(b, os.path.join(here(named), a))
        g.symlink(os.path.join(real(named), a), os.path.join(here(named), b))
    return Slot(enc(g.rng.choice([a, f"{a}/x.raw", f"{a}/../x.raw"])), False)


def s_long_link_chain(g: Gen, named: str, role: str) -> Slot:
    """More symlinks than the kernel follows (40): ELOOP, though no loop."""
    links = [g.fresh(".lnk") for _ in range(g.rng.randint(41, 44))]
    f = g.fresh(ext(role))
    g.file(os.path.join(here(named), f))
    for a, b in zip(links, [*links[1:], f], strict=True):
        g.symlink(b, os.path.join(here(named), a))
    return Slot(enc(links[0]), False)


def s_not_a_file(g: Gen, named: str, role: str) -> Slot:
    d = g.fresh("")
    g.mkdir(os.path.join(here(named), d))
    return Slot(enc(g.rng.choice([".", "..", d, d + "/", "./"])), False)


def s_fifo(g: Gen, named: str, role: str) -> Slot:
    f = g.fresh(ext(role))
    with contextlib.suppress(OSError):
        os.mkfifo(os.path.join(here(named), f))
    return Slot(enc(f), False)


def s_trailing_slash(g: Gen, named: str, role: str) -> Slot:
    f = g.fresh(ext(role))
    g.file(os.path.join(here(named), f), bytes(SIZE))
    return Slot(enc(f + g.rng.choice(["/", "/.", "/./"])), False)


def s_file_as_dir(g: Gen, named: str, role: str) -> Slot:
    f = g.fresh(".raw")
    g.file(os.path.join(here(named), f), bytes(SIZE))
    return Slot(enc(f"{f}/../{g.fresh(ext(role))}"), False)


def s_overlong(g: Gen, named: str, role: str) -> Slot:
    """Past PATH_MAX (4096) or NAME_MAX (255)."""
    f = g.fresh(ext(role))
    forms = ["./" * 2100 + f, "a" * 300 + ext(role), os.path.join(real(named), "x" * 256, f)]
    return Slot(enc(g.rng.choice(forms)), False)


def s_header_limit(g: Gen, named: str, role: str) -> Slot:
    """A name filling the 1 MiB header (the other name gets what is left).

    In a few long components: a name of many short ones (``././././...``) costs
    seconds in os.path.realpath, see test_known_realpath_of_a_long_name_is_slow.
    """
    f = g.fresh(ext(role))
    length = MAX_HEADER_SIZE - V2_NAMES_START - PAGE - len(enc(f))
    parts = g.rng.choice([1, 2, 8])
    return Slot(enc("/".join(["a" * (length // parts - 1)] * parts) + f), False)


def s_empty(g: Gen, named: str, role: str) -> Slot:
    return Slot(b"", False)


def s_back_ref(g: Gen, named: str, role: str) -> Slot:
    """A file already in this chain (an earlier .add-cow or image file): a loop."""
    if not g.chain:
        return s_plain(g, named, role)
    target = os.path.realpath(g.rng.choice(g.chain))
    form = g.rng.choice(["abs", "rel", "link"])
    if form == "abs":
        return Slot(enc(target), False)
    if form == "rel":
        return Slot(enc(os.path.relpath(target, real(named))), False)
    link = g.fresh(".lnk")
    g.symlink(target, os.path.join(here(named), link))
    return Slot(enc(link), False)


def deep_tree(directory: str, stem: str) -> str:
    """Directories under ``directory`` whose real path passes PATH_MAX, reached by
    two short symlinks; returns the name (relative to ``directory``) of a file there.
    """
    comp = "d" * 250
    half = "/".join([comp] * 9)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir(stem, dir_fd=fd)
        os.symlink(f"{stem}/{half}", f"{stem}.l1", dir_fd=fd)
        fds = [os.open(stem, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)]
        for level in range(18):
            os.mkdir(comp, dir_fd=fds[-1])
            fds.append(os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            if level == 8:
                os.symlink(half, "l2", dir_fd=fds[-1])
        for each in fds:
            os.close(each)
    finally:
        os.close(fd)
    return f"{stem}.l1/l2/deep.raw"


def s_deep_resolved(g: Gen, named: str, role: str) -> Slot:
    """A short name whose resolved path is longer than PATH_MAX (valid: must open)."""
    try:
        name = deep_tree(here(named), g.fresh(".deep"))
    except OSError:
        return s_missing(g, named, role)
    return Slot(enc(name[: -len("deep.raw")] + g.fresh(ext(role))), True)


SHAPES: dict[str, dict[str, Shape]] = {
    "benign": {
        "plain": s_plain,
        "subdir": s_subdir,
        "dotdot-inside": s_dotdot_inside,
        "out-and-back": s_out_and_back,
        "abs-inside": s_abs_inside,
        "dot-slash": s_dot_slash,
        "symlink-inside": s_symlink_inside,
        "dirlink-inside": s_dirlink_inside,
        "link-chain-inside": s_link_chain_inside,
        "proc-root-inside": s_proc_root_inside,
        "proc-fd-inside": s_proc_fd_inside,
    },
    "escaping": {
        "dotdot-out": s_dotdot_out,
        "abs-out": s_abs_out,
        "prefix-sibling": s_prefix_sibling,
        "symlink-out": s_symlink_out,
        "dirlink-out": s_dirlink_out,
        "link-then-dotdot": s_link_then_dotdot,
        "link-chain-out": s_link_chain_out,
        "special": s_special,
    },
    "broken": {
        "missing": s_missing,
        "symlink-loop": s_symlink_loop,
        "long-link-chain": s_long_link_chain,
        "not-a-file": s_not_a_file,
        "fifo": s_fifo,
        "trailing-slash": s_trailing_slash,
        "file-as-dir": s_file_as_dir,
        "overlong": s_overlong,
        "header-limit": s_header_limit,
        "empty": s_empty,
    },
    "loop": {"back-ref": s_back_ref},
    "deep": {"deep-resolved": s_deep_resolved},
}
SHAPES["chain"] = {  # for the long chains: names that keep the chain going
    tag: SHAPES["benign"][tag]
    for tag in (
        "plain",
        "subdir",
        "dotdot-inside",
        "abs-inside",
        "symlink-inside",
        "dirlink-inside",
    )
}
WEIGHTS = {
    "image": {"benign": 62, "escaping": 20, "broken": 9, "loop": 7, "deep": 1},
    "backing": {"benign": 50, "escaping": 27, "broken": 10, "loop": 10, "deep": 1},
}


# -- building a case -----------------------------------------------------------------


@dataclass
class Case:
    seed: int
    tree: Tree
    top: str
    root_arg: str
    metas: dict[FileId, MetaRec]
    held: list[int]
    picked: list[tuple[str, str, bytes]]

    @property
    def tags(self) -> set[str]:
        return {tag for _, tag, _ in self.picked}

    def close(self) -> None:
        for fd in self.held:
            os.close(fd)
        self.held.clear()

    def describe(self) -> str:
        def short(name: bytes) -> str:
            text = repr(name.replace(os.fsencode(self.tree.base), b"$B"))
            return text if len(text) < 100 else f"{text[:60]}...({len(name)} bytes)"

        steps = "; ".join(f"{where} {tag} {short(name)}" for where, tag, name in self.picked)
        return f"seed {self.seed}: top={self.top!r} root={self.root_arg!r}: {steps}"


def pick(g: Gen, named: str, role: str, slot: str, pool: str | None = None) -> Slot:
    """A name for ``role`` drawn from the weighted shapes (or from ``pool`` only)."""
    if pool is None:
        weights = WEIGHTS["image" if role == "image" else "backing"]
        pool = g.rng.choices(list(weights), list(weights.values()))[0]
    tag = g.rng.choice(sorted(SHAPES[pool]))
    result = SHAPES[pool][tag](g, named, role)
    g.picked.append((slot, tag, result.name))
    return result


def fit_names(image: Slot, backing: Slot | None) -> tuple[Slot, Slot | None, int]:
    """Trim an over-long name (keeping its end) so both fit; return the header size."""
    room = MAX_HEADER_SIZE - V2_NAMES_START
    other = len(backing.name) if backing else 0
    if len(image.name) + other > room:
        if len(image.name) >= other:
            image = image._replace(name=image.name[-(room - other) :])
        elif backing is not None:
            backing = backing._replace(name=backing.name[-(room - len(image.name)) :])
    used = V2_NAMES_START + len(image.name) + (len(backing.name) if backing else 0)
    return image, backing, max(PAGE, -(-used // PAGE) * PAGE)


def write_level(
    g: Gen,
    named: str,
    level: int,
    image: Slot,
    role: str | None,
    backing: Slot | None,
    quirks: bool = True,
) -> None:
    """The .add-cow file at ``named``; its image file and raw backing if theirs to make.

    With ``quirks``, now and then: version 1 (its backing format sometimes not
    recorded), a full bitmap or the ALL_ALLOCATED flag (the backing is then never
    opened), a broken magic, a truncated bitmap, an image file that is too small.
    """
    rng = g.rng

    def chance(p: float) -> bool:
        return quirks and rng.random() < p

    image, backing, header_size = fit_names(image, backing)
    names_len = len(image.name) + (len(backing.name) if backing else 0)
    v1 = role != "addcow" and names_len <= V1_NAMES_ROOM and chance(0.12)
    b_name = backing.name if backing else None
    if v1:
        fmt = "raw" if backing and rng.random() < 0.75 else None
        header = Header(version=1, image_name=image.name, backing_name=b_name, backing_format=fmt)
        clusters = SIZE >> V1_CLUSTER_BITS
    else:
        header = Header(
            version=2,
            image_name=image.name,
            backing_name=b_name,
            backing_format=FORMATS[role] if backing and role else None,
            image_size=SIZE,
            cluster_bits=CLUSTER_BITS,
            header_size=header_size,
            compatible_features=1 if chance(0.04) else 0,
        )
        clusters = SIZE >> CLUSTER_BITS
    if chance(0.08):
        bits = (1 << clusters) - 1
    else:
        bits = rng.getrandbits(clusters) if rng.random() < 0.5 else 0
    bitmap = bits.to_bytes(-(-clusters // 8), "little")
    valid = b"" not in (image.name, b_name)
    data = header.pack() + bitmap
    if chance(0.015):
        data, valid = b"XDD" + data[3:], False
    elif chance(0.015):
        data = data[: header.header_size]
    if g.file(named, data):
        g.metas[fid(os.stat(named))] = MetaRec(header, bitmap, valid)
    if image.create:
        size = SIZE // 2 if not v1 and chance(0.03) else SIZE
        path = join_name(image.name, named)
        if g.file(path, bytes([0x41 + level % 26]) * size):
            g.chain.append(path)
    if backing is not None and backing.create and role == "raw":
        size = rng.randint(SIZE // 4, 2 * SIZE)
        g.file(join_name(backing.name, named), b"b" * size)


def build_case(seed: int, base: str) -> Case:
    """The tree and chain of case ``seed`` under the empty directory ``base``."""
    rng = random.Random(seed)
    tree, metas = make_tree(base)
    g = Gen(rng, tree, metas)
    via_link = rng.random() < 0.15
    top = os.path.join(tree.link if via_link else tree.root, "top.add-cow")
    root_arg = rng.choice(
        [tree.root] * 6 + [tree.root + "/", tree.root + "/.", tree.link, os.path.relpath(tree.root)]
    )
    deep = rng.random() < 0.06
    levels = rng.randint(15, 20) if deep else rng.randint(1, 6)
    hostile_level = rng.randrange(levels) if deep and rng.random() < 0.5 else -1
    named = top
    for level in range(levels):
        pool = None if not deep or level == hostile_level else "chain"
        g.chain.append(named)
        image = pick(g, named, "image", f"L{level}.image", pool)
        if image.create:
            g.chain.append(join_name(image.name, named))
        last = level == levels - 1
        role = rng.choice([None, "raw", "raw"]) if last else "addcow"
        backing = pick(g, named, role, f"L{level}.{role}", pool) if role else None
        write_level(g, named, level, image, role, backing, quirks=pool is None)
        if backing is None or not backing.create or role != "addcow":
            break
        named = join_name(backing.name, named)
    return Case(seed, tree, top, root_arg, metas, g.held, g.picked)


# -- the oracle ----------------------------------------------------------------------


class Expect(NamedTuple):
    """What an open must do: "open", "policy", "loop" or "error" (any AddCowError)."""

    outcome: str
    why: str


def scan_inside(root: str) -> dict[FileId, int]:
    """(device, inode) -> mode of everything under ``root``, following no symlink."""
    st = os.stat(root)
    found = {fid(st): st.st_mode}
    for _, dirs, files, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in dirs + files:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                found[fid(st)] = st.st_mode
    return found


def need(path: str, inside: dict[FileId, int], seen: set[FileId]) -> os.stat_result | Expect:
    """The file an open must use at ``path``, or why the open must fail there."""
    try:
        st = os.stat(path)  # the kernel's resolution, symlinks and all
    except OSError as exc:
        return Expect("error", f"{path!r}: {exc.strerror}")
    if fid(st) not in inside:
        return Expect("policy", f"{path!r} is outside the root")
    if len(os.fsencode(os.path.realpath(path))) >= os.pathconf("/", "PC_PATH_MAX"):
        # where such a file is cannot be read back (/proc/self/fd/N): refused
        return Expect("policy", f"{path!r}: its real path is longer than PATH_MAX")
    if not stat.S_ISREG(st.st_mode):
        return Expect("error", f"{path!r} is not a regular file")
    if fid(st) in seen:
        return Expect("loop", f"{path!r} is already in the chain")
    seen.add(fid(st))
    return st


def predict(case: Case, inside: dict[FileId, int]) -> Expect:
    """Walk the chain in the order an open does; the first obstacle decides."""
    named = case.top
    st = os.stat(named)
    seen = {fid(st)}
    depth = 0
    while True:
        rec = case.metas.get(fid(st))
        if rec is None or not rec.valid:
            return Expect("error", f"{named!r}: not a valid .add-cow header")
        h = rec.header
        image = need(join_name(h.image_name, named), inside, seen)
        if isinstance(image, Expect):
            return image
        if h.version == 2 and image.st_size < SIZE:
            return Expect("error", "image file smaller than image_size")
        size = SIZE if h.version == 2 else image.st_size
        if size == 0:
            return Expect("error", "empty version 1 image file")
        clusters = -(-size // (1 << h.cluster_bits))
        if st.st_size < h.header_size + -(-clusters // 8):
            return Expect("error", "bitmap truncated")
        bits = int.from_bytes(rec.bitmap, "little")
        full = bits & ((1 << clusters) - 1) == (1 << clusters) - 1
        if h.backing_name is None or full or h.compatible_features & 1:
            return Expect("open", "complete or no backing")
        if h.backing_format is None:
            return Expect("error", "backing format not recorded")
        depth += 1
        if depth > SPEC_MAX_DEPTH:
            return Expect("loop", f"backing number {depth}")
        named = join_name(h.backing_name, named)
        backing = need(named, inside, seen)
        if isinstance(backing, Expect):
            return backing
        if h.backing_format == "raw":
            return Expect("open", "raw base")
        st = backing


# -- running a case ------------------------------------------------------------------


class Violation(NamedTuple):
    seed: int
    kind: str
    detail: str


@dataclass
class Stats:
    cases: int = 0
    opened: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    crashed: Counter[str] = field(default_factory=Counter)
    cli_runs: int = 0
    tags: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)

    def flag(self, case: Case, kind: str, detail: str) -> None:
        """Record a violation."""
        text = elide(f"{detail}\n    {case.describe()}".replace(case.tree.base, "$B"), 1200)
        self.violations.append(Violation(case.seed, kind, text))

    def summary(self, elapsed: float) -> str:
        other = dict(sorted((k, v) for k, v in self.refused.items() if k != "PathPolicyError"))
        return (
            f"backing-root campaign: {self.cases} cases, {self.opened} opened, "
            f"{self.refused['PathPolicyError']} refused by PathPolicyError, "
            f"other AddCowError {other}, non-AddCowError {dict(self.crashed)}, "
            f"{self.cli_runs} CLI runs, "
            f"{len(self.violations)} violations, "
            f"{elapsed:.1f} s"
        )


def elide(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...({len(text)} chars)...{text[-limit // 2 :]}"


def open_fds() -> set[int]:
    """Descriptors open in this process (not the one listing /proc/self/fd)."""
    alive = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        alive.add(int(name))
    return alive


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"<{exc.strerror}>"


def inspect_open(
    case: Case, img: addcow.AddCowImage, before: set[int], inside: dict[FileId, int], stats: Stats
) -> None:
    """The safety invariant of an open image: only inside files held, no secret read."""
    regular = {key for key, mode in inside.items() if stat.S_ISREG(mode)}
    for fd in sorted(open_fds() - before):
        if fid(os.fstat(fd)) not in regular:
            stats.flag(case, "holds-outside-file", f"fd {fd} -> {fd_target(fd)}")
    for key in img.file_ids() - regular:
        stats.flag(case, "holds-outside-file", f"file_ids() has {key}, not a file inside ROOT")
    data = img.read(0, img.size)
    if SECRET_HEAD in data:
        where = data.index(SECRET_HEAD)
        stats.flag(case, "secret-leaked", f"secret bytes at virtual offset {where}")


def judge(expect: Expect, exc: AddCowError | None) -> str | None:
    """Why the outcome disagrees with the oracle, or None."""
    if exc is None:
        if expect.outcome != "open":
            return f"opened, but the oracle expected {expect.outcome}: {expect.why}"
        return None
    got = f"{type(exc).__name__}: {exc}"
    if expect.outcome == "open":
        return f"refused a chain the oracle says opens: {got}"
    if expect.outcome == "policy" and not isinstance(exc, PathPolicyError):
        return f"expected PathPolicyError ({expect.why}), got {got}"
    if expect.outcome == "loop" and not isinstance(exc, BackingLoopError):
        return f"expected BackingLoopError ({expect.why}), got {got}"
    return None


def check_case(case: Case, stats: Stats, cli: bool) -> None:
    """Open the top image under the root; check the invariant and the oracle."""
    inside = scan_inside(case.tree.root)
    expect = predict(case, inside)
    stats.cases += 1
    stats.expected[expect.outcome] += 1
    if expect.why.startswith("backing number"):
        stats.expected["depth"] += 1
    stats.tags.update(case.tags)
    before = open_fds()
    error: AddCowError | None = None
    opened = False
    start = time.monotonic()
    try:
        img = addcow.open(case.top, backing_root=case.root_arg, readonly=True)
    except KeyboardInterrupt:
        raise
    except AddCowError as exc:
        error = exc
        stats.refused[type(exc).__name__] += 1
    except BaseException as exc:
        stats.crashed[type(exc).__name__] += 1
        stats.flag(case, "non-addcow-exception", f"{type(exc).__name__}: {exc}")
    else:
        opened = True
        stats.opened += 1
        try:
            inspect_open(case, img, before, inside, stats)
        finally:
            img.close()
    if opened or error is not None:
        mismatch = judge(expect, error)
        if mismatch:
            stats.flag(case, "oracle-mismatch", mismatch)
    elapsed = time.monotonic() - start
    if elapsed > SLOW_OPEN:
        stats.flag(case, "slow-open", f"open and checks took {elapsed:.1f} s")
    leaked = open_fds() - before
    if leaked:
        stats.flag(case, "fd-leak", ", ".join(f"{fd} -> {fd_target(fd)}" for fd in leaked))
    if cli:
        check_cli(case, opened, stats)


def run_cli(args: list[str], strict_stdout: bool) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8" if strict_stdout else "utf-8:surrogateescape"
    return subprocess.run(
        [sys.executable, "-m", "addcow", *args], capture_output=True, timeout=120, env=env
    )


def check_cli(case: Case, opened: bool, stats: Stats) -> None:
    """``map --backing-root`` and ``info --backing-chain`` on the same top image.

    Alternate runs use a strict UTF-8 stdout, as under LANG=en_US.UTF-8 (the C.UTF-8
    and C locales escape undecodable bytes instead).
    """
    strict = case.seed // CLI_EVERY % 2 == 1
    # /proc/self/fd/N means another file in the addcow process: no comparison then
    comparable = not any(b"/fd/" in name for _, _, name in case.picked)
    commands = (
        ["map", "--backing-root", case.root_arg, case.top],
        ["info", "--backing-chain", "--backing-root", case.root_arg, case.top],
    )
    for args in commands:
        proc = run_cli(args, strict)
        stats.cli_runs += 1
        what = f"addcow {args[0]} exited {proc.returncode}, stderr {proc.stderr[-300:]!r}"
        if b"Traceback" in proc.stderr:
            stats.flag(case, "cli-traceback", what)
        elif proc.returncode != 0 and (
            not proc.stderr.startswith(b"addcow: ") or proc.stderr.count(b"\n") != 1
        ):
            stats.flag(case, "cli-stderr", what)
        if SECRET_HEAD in proc.stdout + proc.stderr:
            stats.flag(case, "cli-secret", what)
        disagree = comparable and (proc.returncode == 0) != opened
        if args[0] == "map" and disagree and b"Traceback" not in proc.stderr:
            stats.flag(case, "cli-disagrees", f"library opened={opened}; {what}")


def run_campaign(seeds: Iterable[int], workdir: Path, *, cli: bool) -> Stats:
    """Build, check and remove one case per seed."""
    stats = Stats()
    for seed in seeds:
        base = os.path.join(workdir, f"s{seed}")
        os.mkdir(base)
        case = build_case(seed, base)
        try:
            check_case(case, stats, cli=cli and seed % CLI_EVERY == 0)
        finally:
            case.close()
            shutil.rmtree(base)
    return stats


def report(stats: Stats) -> str:
    lines = [f"{v.kind} (seed {v.seed}): {v.detail}" for v in stats.violations[:20]]
    more = len(stats.violations) - 20
    return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


# -- the tests -----------------------------------------------------------------------


def test_campaign_over_hostile_names(tmp_path: Path) -> None:
    seeds = [int(ONLY_SEED)] if ONLY_SEED else list(range(CASES))
    start = time.monotonic()
    stats = run_campaign(seeds, tmp_path, cli=True)
    print(f"\n{stats.summary(time.monotonic() - start)}")
    print(f"oracle expected: {dict(stats.expected)}")
    assert not stats.violations, report(stats)
    if ONLY_SEED:
        return
    every_shape = {tag for shapes in SHAPES.values() for tag in shapes}
    assert every_shape <= set(stats.tags), f"shapes never drawn: {every_shape - set(stats.tags)}"
    assert stats.opened >= stats.cases // 10, "too few chains open: the campaign tests little"
    assert stats.refused["PathPolicyError"] >= stats.cases // 10
    assert stats.expected["loop"] > 0 and stats.refused["BackingLoopError"] > 0
    assert stats.expected["depth"] > 0, "no chain reached the depth limit"


def test_mutation_without_the_root_check_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``_inside_root`` a no-op, the same generator must find violations."""
    assert callable(addcow.stores.chain._inside_root)
    monkeypatch.setattr(addcow.stores.chain, "_inside_root", lambda root, real, path: None)
    stats = run_campaign(range(150), tmp_path, cli=False)
    kinds = Counter(v.kind for v in stats.violations)
    print(f"\nmutant (no root check): {dict(kinds)} in {stats.cases} cases")
    assert kinds["holds-outside-file"] > 0
    assert kinds["secret-leaked"] > 0
    assert kinds["oracle-mismatch"] > 0


# -- regression tests for the defects the campaign found ---------------------------


def small_tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.raw").write_bytes(SECRET * (SIZE // len(SECRET)))
    (root / "ok.raw").write_bytes(bytes(SIZE))
    return root, outside


def top_image(root: Path, image_name: bytes, backing: bytes | None, fmt: str | None) -> Path:
    header = Header(
        version=2,
        image_name=image_name,
        backing_name=backing,
        backing_format=fmt,
        image_size=SIZE,
        cluster_bits=CLUSTER_BITS,
        header_size=fit_names(Slot(image_name, False), None)[2],
    )
    path = root / "top.add-cow"
    path.write_bytes(header.pack() + bytes(SIZE >> CLUSTER_BITS >> 3))
    return path


def test_a_real_path_longer_than_path_max_is_refused_cleanly(tmp_path: Path) -> None:
    root, _ = small_tree(tmp_path)
    name = deep_tree(str(root), "t")  # root/t.l1/l2/deep.raw: a 4.5 KiB real path
    (root / name).write_bytes(bytes(SIZE))
    top = top_image(root, b"ok.raw", name.encode(), "raw")
    with pytest.raises(PathPolicyError, match="cannot tell where the opened file is"):
        addcow.open(top, backing_root=str(root), readonly=True).close()


def test_a_newline_in_a_name_keeps_the_cli_error_on_one_line(tmp_path: Path) -> None:
    root, _ = small_tree(tmp_path)
    top = top_image(root, b"ok.raw", b"x\naddcow: forged line\n.raw", "raw")
    proc = run_cli(["map", "--backing-root", str(root), str(top)], strict_stdout=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"addcow: ") and proc.stderr.count(b"\n") == 1, proc.stderr
    assert b"x\\naddcow: forged line\\n.raw" in proc.stderr


def test_info_refuses_a_backing_outside_the_root_without_reading_it(tmp_path: Path) -> None:
    root, _ = small_tree(tmp_path)
    top = top_image(root, b"ok.raw", b"../outside/secret.raw", "add-cow")
    args = ["info", "--backing-chain", "--backing-root", str(root), str(top)]
    proc = run_cli(args, strict_stdout=False)
    assert proc.returncode == 1
    assert b"outside the allowed directory" in proc.stderr, proc.stderr
    assert SECRET_HEAD not in proc.stdout + proc.stderr


def test_info_prints_a_non_utf8_name_on_a_strict_stdout(tmp_path: Path) -> None:
    root, _ = small_tree(tmp_path)
    (root / "ok.raw").rename(os.fsdecode(os.fsencode(root / "x") + b"\xff.raw"))
    top = top_image(root, b"x\xff.raw", None, None)
    proc = run_cli(["info", str(top)], strict_stdout=True)
    assert proc.returncode == 0, proc.stderr
    assert b"image file: x\xff.raw" in proc.stdout  # the name's bytes, as qemu-img prints them


def test_a_long_name_of_many_components_is_refused_at_once(tmp_path: Path) -> None:
    """A 384 KiB image name of './' components (resolving it took about 1 s)."""
    root, _ = small_tree(tmp_path)
    top = top_image(root, b"./" * (192 << 10) + b"ok.raw", None, None)
    start = time.monotonic()
    with pytest.raises(PathPolicyError, match="longer than PATH_MAX"):
        addcow.open(top, backing_root=str(root), readonly=True)
    assert time.monotonic() - start < 0.25
