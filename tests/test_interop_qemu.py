"""QEMU is the referee: the same disk built by addcow and by qemu-io must agree.

Each scenario builds one virtual disk two ways over the same raw backing, with
64 KiB clusters on both sides:

    (a) addcow create -b base.raw -F raw -o image_file=img.raw img.add-cow SIZE
        addcow io -c CMD ... img.add-cow
    (b) qemu-img create -f qcow2 -b base.raw -F raw -o cluster_size=64k ov.qcow2 SIZE
        qemu-io -f qcow2 -c CMD ... ov.qcow2

with the same command script, and then requires:

* both tools print the same text (timing lines filtered) and exit with status 0;
* ``qemu-img compare`` says ``addcow convert``'s raw output and ov.qcow2 are
  identical (and the raw output has the virtual size);
* ``addcow map --output=json`` and ``qemu-img map --output=json`` agree, byte
  for byte, on (depth, present, zero) once :func:`normalise` is applied, and
  both match the scenario's allocation diagram; neither ever says ``zero``
  for a range holding a non-zero byte;
* the backing file's bytes and mtime did not change.

Diagram letters, one per 64 KiB cluster (``X+Y``: a cluster split between two)::

    A  data in the top image          depth 0, present
    Z  zeroes in the top image        depth 0, present, zero
    B  data read from the backing     depth 1, present
    h  a hole in the backing          depth 1, present, zero
    -  past the backing's end         depth 0, not present, zero

Backing files hold byte ``first + i`` in cluster i (holes where the diagram
says ``..``); everything a script writes uses its own byte, 0xa0 and up.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER, require_tool, run
from conftest import addcow as addcow_cli
from helpers import filter_timing

Key = tuple[int, bool, bool]  # (depth, present, zero)
Run = tuple[int, int, Key]  # [start, end) and its key

LETTERS: dict[Key, str] = {
    (0, True, False): "A",
    (0, True, True): "Z",
    (1, True, False): "B",
    (1, True, True): "h",
    (0, False, True): "-",
}


# -- building both disks --------------------------------------------------------------


def make_backing(path: Path, size: int, first: int, holes: Sequence[int] = ()) -> None:
    """A raw file of ``size`` bytes: cluster i filled with ``first + i``, holes left sparse."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(-(-size // CLUSTER)):
            if i in holes:
                continue
            f.seek(i * CLUSTER)
            f.write(bytes([first + i]) * min(CLUSTER, size - i * CLUSTER))


@dataclass
class Built:
    """Both disks of one scenario, after the script ran on each."""

    dir: Path
    size: int
    ours: Any  # CompletedProcess of addcow io
    theirs: Any  # CompletedProcess of qemu-io


def build(tmp_path: Path, size: int, script: Sequence[str]) -> Built:
    """Create img.add-cow and ov.qcow2 over tmp_path/base.raw and run ``script`` on both."""
    qemu_img, qemu_io = require_tool("qemu-img"), require_tool("qemu-io")
    addcow_cli(
        "create", "-b", "base.raw", "-F", "raw", "-o", "image_file=img.raw",
        "img.add-cow", str(size), cwd=tmp_path,
    )
    run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         "-o", "cluster_size=64k", "ov.qcow2", str(size)],
        cwd=tmp_path,
    )
    flags = [arg for command in script for arg in ("-c", command)]
    ours = addcow_cli("io", *flags, "img.add-cow", cwd=tmp_path, check=False)
    theirs = run([qemu_io, "-f", "qcow2", *flags, "ov.qcow2"], cwd=tmp_path, check=False)
    return Built(tmp_path, size, ours, theirs)


# -- comparing the two maps -------------------------------------------------------------


def runs_of(entries: list[dict[str, Any]], size: int) -> list[Run]:
    """qemu-img map JSON entries as runs; they must tile [0, size) in order."""
    runs: list[Run] = []
    pos = 0
    for e in entries:
        assert e["start"] == pos, f"map entries do not tile the disk at {pos}: {e}"
        runs.append((pos, pos + e["length"], (e["depth"], e["present"], e["zero"])))
        pos += e["length"]
    assert pos == size, f"map covers {pos} bytes, the disk has {size}"
    return runs


def zero_flags_are_true(runs: list[Run], content: bytes) -> list[Run]:
    """The runs that claim ``zero`` but hold a non-zero byte (must be none, on both sides)."""
    return [r for r in runs if r[2][2] and any(content[r[0] : r[1]])]


def normalise(runs: list[Run], content: bytes) -> list[Run]:
    """The one convention where qcow2 and add-cow differ, made equal; runs merged.

    The convention: how finely the *top image* (depth 0) reports zeroes. Both
    formats keep allocation per cluster, but they describe zero bytes inside
    the top image differently:

    * qcow2 sets ``zero`` per cluster, and only for zero clusters: ``write
      -z`` of whole clusters, ``discard``, and a partial ``write -z`` into a
      cluster whose other bytes already read as zero (qcow2 widens it to the
      cluster). A data cluster is ``zero: false`` in full, even if it holds
      zero bytes (e.g. a partial write into a zero cluster: qcow2 allocates a
      new cluster and writes the zeros).
    * add-cow asks its raw image file with ``SEEK_DATA``/``SEEK_HOLE``, at
      byte-range granularity: a punched range reads ``zero: true`` even inside
      a cluster that is partly data (a partial write into a discarded
      cluster), and written zero bytes read ``zero: false`` (a partial ``write
      -z``, copy on write of zeros, FALLOC_FL_ZERO_RANGE that ext4 turns into
      written blocks).

    Both are correct, since block status's ``zero`` flag is a hint: it may be
    absent for zero data, it must never be present on non-zero data (that is
    checked separately by :func:`zero_flags_are_true`, on both sides, and
    never normalised). So for ranges at depth 0 that are present, ``zero``
    is replaced by what both formats agree on: whether the *cluster's* bytes
    (``content``, the disk's bytes) are all zero. Depth and presence
    everywhere, and ``zero`` at every other depth or where nothing is present,
    are compared exactly as reported.
    """
    pieces: list[Run] = []
    for start, end, key in runs:
        pos = start
        while pos < end:
            first = pos - pos % CLUSTER
            stop = min(end, first + CLUSTER)
            depth, present, _ = key
            if depth == 0 and present:
                key = (0, True, not any(content[first : first + CLUSTER]))
            pieces.append((pos, stop, key))
            pos = stop
    merged: list[Run] = []
    for start, end, key in pieces:
        if merged and merged[-1][2] == key and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, key)
        else:
            merged.append((start, end, key))
    return merged


def diagram(runs: list[Run], size: int) -> list[str]:
    """One diagram letter per cluster (``X+Y`` for a cluster split between layers)."""
    codes = []
    for first in range(0, size, CLUSTER):
        last = min(size, first + CLUSTER)
        letters: list[str] = []
        for start, end, key in runs:
            if start < last and end > first:
                letter = LETTERS.get(key, f"?{key}")
                if not letters or letters[-1] != letter:
                    letters.append(letter)
        codes.append("+".join(letters))
    return codes


def maps(built: Built) -> tuple[list[Run], list[Run]]:
    """(addcow's, qemu's) normalised maps, each with its own disk's content.

    addcow's content is ``addcow convert``'s out.raw; qemu's is ``qemu-img
    convert``'s, so a difference in content can never make the maps look alike.
    """
    qemu_img = require_tool("qemu-img")
    ours = json.loads(addcow_cli("map", "--output=json", "img.add-cow", cwd=built.dir).stdout)
    theirs = json.loads(
        run([qemu_img, "map", "--output=json", "-f", "qcow2", "ov.qcow2"], cwd=built.dir).stdout
    )
    run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", "ov.qcow2", "qemu.raw"], cwd=built.dir)
    our_runs, our_content = runs_of(ours, built.size), (built.dir / "out.raw").read_bytes()
    qemu_runs, qemu_content = runs_of(theirs, built.size), (built.dir / "qemu.raw").read_bytes()
    assert zero_flags_are_true(our_runs, our_content) == []
    assert zero_flags_are_true(qemu_runs, qemu_content) == []
    return normalise(our_runs, our_content), normalise(qemu_runs, qemu_content)


def convert_and_compare(built: Built) -> Any:
    """``addcow convert`` to out.raw, then ``qemu-img compare`` it with the qcow2 overlay."""
    qemu_img = require_tool("qemu-img")
    addcow_cli("convert", "img.add-cow", "out.raw", cwd=built.dir)
    assert (built.dir / "out.raw").stat().st_size == built.size
    return run(
        [qemu_img, "compare", "-f", "raw", "-F", "qcow2", "out.raw", "ov.qcow2"],
        cwd=built.dir,
        check=False,
    )


def check_scenario(tmp_path: Path, size: int, script: Sequence[str], expected: str) -> None:
    """Build both disks, then hold addcow to everything the module docstring lists."""
    base = tmp_path / "base.raw"
    before = (base.read_bytes(), base.stat().st_mtime_ns)
    built = build(tmp_path, size, script)

    assert built.theirs.returncode == 0, built.theirs.stdout + built.theirs.stderr
    assert (built.ours.returncode, built.ours.stderr) == (0, "")
    assert filter_timing(built.ours.stdout) == filter_timing(built.theirs.stdout)

    compared = convert_and_compare(built)
    assert (compared.returncode, compared.stdout) == (0, "Images are identical.\n")

    ours, theirs = maps(built)
    assert ours == theirs, (
        f"addcow: {' '.join(diagram(ours, size))}\nqemu:   {' '.join(diagram(theirs, size))}"
    )
    assert diagram(ours, size) == expected.split()

    assert (base.read_bytes(), base.stat().st_mtime_ns) == before


# -- scenarios ----------------------------------------------------------------------------

MIB = 1 << 20

MIXED_SCRIPT = (
    "write -P 0xa0 0 64k",  # c0: aligned, one whole cluster
    "write -P 0xa2 130k 1k",  # c2: unaligned inside one cluster (copy on write)
    "write -P 0xa3 250k 20k",  # c3, c4: straddles a cluster boundary
    "write -z 320k 64k",  # c5: zeroes, whole cluster
    "write -z -u 384k 64k",  # c6: zeroes with unmap, whole cluster
    "write -z -u 460k 8k",  # c7: partial zeroes over backing data: copy on write
    "write -z 520k 8k",  # c8: partial zeroes over a backing hole
    "discard 576k 64k",  # c9: discard a whole unallocated cluster
    "discard 640k 96k",  # c10 whole, c11 partial (left alone)
    "discard 790k 10k",  # c12: partial, left alone
    "write -P 0xad 832k 64k",  # c13: written ...
    "discard 832k 64k",  # ... then discarded while allocated
    "write -P 0xae 900k 4k",  # c14
    "flush",
    "write -f -P 0xaf 1020k 4k",  # c15: FUA write at the end of the disk
    "read -P 0xa0 0 64k",
    "read -P 0x11 64k 64k",
    "read -P 0x12 128k 2k",
    "read -P 0xa2 130k 1k",
    "read -P 0x12 131k 61k",
    "read -P 0x13 192k 58k",
    "read -P 0xa3 250k 20k",
    "read -P 0x14 270k 50k",
    "read -P 0 320k 128k",
    "read -P 0x17 448k 12k",
    "read -P 0 460k 8k",
    "read -P 0x17 468k 44k",
    "read -P 0 512k 256k",
    "read -P 0x1c 768k 64k",
    "read -P 0 832k 64k",
    "read -P 0x1e 896k 4k",
    "read -P 0xae 900k 4k",
    "read -P 0x1e 904k 56k",
    "read -P 0x1f 960k 60k",
    "read -P 0xaf 1020k 4k",
    "map",
    "alloc 0 1M",
    "alloc 130k",
    "alloc 700k 100k",
)


def test_mixed_clusters(tmp_path: Path) -> None:
    """Every kind of request on a 1 MiB disk over a 1 MiB backing with holes.

    cluster  0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15
    backing  10 11 12 13 14 15 16 17 .. .. .. .. 1c 1d 1e 1f
    script   a0    a2 a3 a3 z  zu zu z  d  d  d  d  ad 0xae af
                   (partial writes: c2, c7, c8, c14, c15; partial discards: c11, c12)
    result   A  B  A  A  A  Z  Z  A  Z  Z  Z  h  B  Z  A  A
    """
    make_backing(tmp_path / "base.raw", MIB, 0x10, holes=range(8, 12))
    check_scenario(tmp_path, MIB, MIXED_SCRIPT, "A B A A A Z Z A Z Z Z h B Z A A")


def test_image_larger_than_the_backing(tmp_path: Path) -> None:
    """A 2 MiB disk over a 1 MiB backing: past the backing's end reads zero.

    cluster  0-7  8-11  12-14  15  16  17  18  19  20  21  22  23-31
    backing  data holes data   1f  (end of backing at 1 MiB)
    script                     bf  bf  c1  c2  z   zu  d   d   d(partial)
    result   B    h     B      A   A   A   A   Z   Z   Z   Z   -
    """
    make_backing(tmp_path / "base.raw", MIB, 0x10, holes=range(8, 12))
    script = (
        "write -P 0xbf 1020k 8k",  # c15|c16: straddles the backing's end
        "write -P 0xc1 1088k 64k",  # c17: whole cluster past the end
        "write -P 0xc2 1160k 1k",  # c18: partial, past the end (copy on write of zeros)
        "write -z 1216k 64k",  # c19
        "write -z -u 1300k 4k",  # c20: partial zeroes where everything reads zero
        "discard 1344k 128k",  # c21, c22: unallocated, past the end
        "discard 1500k 10k",  # c23: partial, left alone
        "flush",
        "read -P 0x1f 960k 60k",
        "read -P 0xbf 1020k 8k",
        "read -P 0 1028k 60k",
        "read -P 0xc1 1088k 64k",
        "read -P 0 1152k 8k",
        "read -P 0xc2 1160k 1k",
        "read -P 0 1161k 887k",
        "alloc 1M 1M",
        "map",
    )
    expected = " ".join(["B"] * 8 + ["h"] * 4 + ["B"] * 3 + list("AAAAZZZZ") + ["-"] * 9)
    check_scenario(tmp_path, 2 * MIB, script, expected)


ODD_SIZE = 1000448  # 15 clusters + 17 KiB (qcow2 sizes are multiples of 512)
ODD_BACKING = 614912  # 9 clusters + 24.5 KiB: the backing ends inside cluster 9


def test_odd_size_not_a_cluster_multiple(tmp_path: Path) -> None:
    """A disk of 15 clusters + 17 KiB over a backing that ends inside cluster 9.

    cluster  0  1  2  3-8  9         10  11  12  13  14  15 (17 KiB, last)
    backing  40 41 42 ...  49|end    (past the backing's end)
    script      d1 d1      d9        z   d   zu      de  df, then discarded to the end
    result   B  A  A  B    A         Z   Z   Z   -   A   Z
    """
    make_backing(tmp_path / "base.raw", ODD_BACKING, 0x40)
    script = (
        "write -P 0xd1 100k 64k",  # c1|c2
        "write -P 0xd9 598k 4k",  # c9: straddles the backing's end inside the cluster
        "write -z 640k 64k",  # c10
        "discard 704k 64k",  # c11
        "write -z -u 800k 1k",  # c12: partial zeroes where everything reads zero
        "write -P 0xdf 970k 7k",  # c15: partial last cluster, up to the end of the disk
        "write -P 0xde 900k 4k",  # c14
        "discard 930k 47k",  # c14 partial (left alone), c15 whole up to the end
        "read -P 0x40 0 64k",
        "read -P 0x41 64k 36k",
        "read -P 0xd1 100k 64k",
        "read -P 0x42 164k 28k",
        "read -P 0x48 512k 64k",
        "read -P 0x49 576k 22k",
        "read -P 0xd9 598k 4k",
        "read -P 0 602k 38k",
        "read -P 0 640k 260k",
        "read -P 0xde 900k 4k",
        "read -P 0 904k 73k",
        "alloc 960k 17k",
        "alloc 999999 1000",
        "map",
    )
    expected = "B A A B B B B B B A Z Z Z - A Z"
    check_scenario(tmp_path, ODD_SIZE, script, expected)


@pytest.mark.parametrize(
    ("size", "backing", "holes", "expected"),
    [
        (MIB, MIB, range(8, 12), "B B B B B B B B h h h h B B B B"),
        (ODD_SIZE, ODD_BACKING, (), "B B B B B B B B B B+- - - - - - -"),
    ],
    ids=["1MiB-with-holes", "odd-sizes"],
)
def test_control_untouched_disk(
    tmp_path: Path, size: int, backing: int, holes: Sequence[int], expected: str
) -> None:
    """Control: no writes. Both disks are their backing, and both maps say so.

    cluster  0 .. 15
    script   (reads, map and alloc only)
    result   every cluster from the backing (B, or h for its holes), nothing in the top image
    """
    make_backing(tmp_path / "base.raw", backing, 0x10, holes=holes)
    script = ("read -P 0x10 0 64k", "read -P 0x17 448k 64k", "flush", "map", "alloc 0 64k")
    check_scenario(tmp_path, size, script, expected)


def test_control_a_difference_is_caught(tmp_path: Path) -> None:
    """Control: one extra write on the qcow2 side only must fail every comparison.

    cluster  0  1  ...  10 ...
    addcow   (as test_mixed_clusters)
    qemu     (as test_mixed_clusters) + write -P 0x5a 700k 1k in c10
    """
    make_backing(tmp_path / "base.raw", MIB, 0x10, holes=range(8, 12))
    built = build(tmp_path, MIB, MIXED_SCRIPT)
    assert built.ours.returncode == built.theirs.returncode == 0
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write -q -P 0x5a 700k 1k", "ov.qcow2"],
        cwd=tmp_path)
    compared = convert_and_compare(built)
    assert (compared.returncode, compared.stdout) == (1, "Content mismatch at offset 716800!\n")
    ours, theirs = maps(built)
    assert ours != theirs
    assert diagram(ours, MIB)[10] == "Z"
    assert diagram(theirs, MIB)[10] == "A"


def random_script(seed: int, size: int) -> list[str]:
    """Writes, zeroes and discards at random places, aligned or not, some straddling."""
    rng = random.Random(seed)
    script = []
    for k in range(rng.randrange(5, 25)):
        offset = rng.randrange(size)
        if rng.random() < 0.5:
            offset -= offset % CLUSTER
        length = min(size - offset, rng.choice([CLUSTER, 2 * CLUSTER, rng.randrange(1, 3 * CLUSTER),
                                                rng.randrange(1, 600)]))
        op = rng.choice(["write -P 0x%x" % (0xa0 + k), "write -f -P 0x%x" % (0x50 + k),
                         "write -z", "write -z -u", "discard"])
        script.append(f"{op} {offset} {length}")
        if rng.random() < 0.2:
            script.append("flush")
    return [*script, "map", f"alloc 0 {size}"]


@pytest.mark.parametrize(
    ("seed", "size", "backing"),
    [(1, MIB, MIB), (7, 2 * MIB, 414208), (10, MIB, ODD_BACKING), (13, ODD_SIZE, 718848),
     (21, 797696, ODD_BACKING), (35, ODD_SIZE, MIB)],
)
def test_random_scripts_agree(tmp_path: Path, seed: int, size: int, backing: int) -> None:
    """Seeded random scripts: no diagram is drawn, the two tools must simply agree.

    backing  byte 0x10 + i in cluster i, holes at random clusters
    script   random_script(seed): whole, partial and straddling requests
    result   whatever qemu-io makes of it, and addcow must make the same
    """
    rng = random.Random(seed)
    make_backing(tmp_path / "base.raw", backing, 0x10, [i for i in range(32) if rng.random() < 0.2])
    built = build(tmp_path, size, random_script(seed, size))
    assert built.theirs.returncode == 0, built.theirs.stdout + built.theirs.stderr
    assert (built.ours.returncode, built.ours.stderr) == (0, "")
    assert filter_timing(built.ours.stdout) == filter_timing(built.theirs.stdout)
    compared = convert_and_compare(built)
    assert (compared.returncode, compared.stdout) == (0, "Images are identical.\n")
    ours, theirs = maps(built)
    assert ours == theirs, (
        f"addcow: {' '.join(diagram(ours, size))}\nqemu:   {' '.join(diagram(theirs, size))}"
    )


# -- qemu-io referees the text of every message ----------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        ("write -P 0xaa 0 64k", "read -P 0xaa 0 100", "read -P 0xaa 0 200", "read 0 10"),
        ("read -P 0xaa -s 10 -l 20 0 100", "read -P 0x10 -s 10 -l 20 0 200"),
        ("read -P 0xbb -s 190 -l 20 0 200", "read -P 0xbb -s 300 0 200", "read -s 10 0 100"),
        ("write -P 0x61 0 20", "read -v 0 40", "read 0 1 -P 0x61", "read -qP 0x61 0 1"),
        ("read 1M 1", "read 1048575 2", "read 2M 0", "write 1048575 2", "discard 1048575 2",
         "write -z 1048575 2"),
        ("read 0", "read 0 1 2", "read -x 0 1", "r -x 0 1", "read 0 1 -P", "read -1 1"),
        ("read -P 0x1ff 0 1", "read -P zz 0 1", "read -P -1 0 1", "read -P 256 0 1",
         "read -P 010 0 1"),
        ("read x 1", "read 1q 1", "read 1.5 1", "read 0 99999999999999999999", "read 0 9E",
         "read 010 1", "read 1.5k 1", "read 0 1B"),
        ("read 0 3G", "write 0 3G", "discard 0 3G", "write -z 0 3G"),
        ("write 0", "write 0 1 2", "discard 0", "discard 0 1 2", "alloc", "alloc 0 1 2",
         "map 0", "flush 0", "l 1"),
        ("write -z -P 1 0 1", "write -u 0 1", "write -n 0 1", "write -u -n 0 1",
         "write -b -z 0 512", "write -bf 0 512", "write -cf 0 512", "write -c 0 1000",
         "write -b 100 512", "read -b 0 1000"),
        ("write -z -n 520k 8k", "write -z -n 4k 8k", "write -zu 64k 64k", "write -zqu 0 1"),
        ("write -f 0 1", "write -z -f 0 1", "write -zuf 0 1", "write -q 0 1", "write -p 0 1",
         "discard -q 0 64k", "discard 330k 1k", "d 0 64k", "w 1 1", "r 0 1"),
        ("write -s /nonexistent/file 0 1",),
        ("frob 0 1", "help bogus", "help read", "help w", "help discard", "help alloc", "help a",
         "help map", "help flush", "help quit", "help ?", "help length", "length"),
        ("write -P 0x11 100k 1k", "alloc 0", "alloc 0 1M", "alloc 64k 128k", "alloc 1M",
         "alloc 2M", "alloc 1048000 1000", "alloc 100k 1k", "alloc 101k", "map"),
        ("quit", "read 0 1"),
    ],
    ids=lambda script: script[0],
)
def test_qemu_io_prints_the_same_text(tmp_path: Path, script: tuple[str, ...]) -> None:
    """The same script through qemu-io and addcow io: same stdout, stderr and status."""
    make_backing(tmp_path / "base.raw", MIB, 0x10, holes=range(8, 12))
    built = build(tmp_path, MIB, script)
    assert filter_timing(built.ours.stdout) == filter_timing(built.theirs.stdout)
    assert built.ours.stderr == built.theirs.stderr.replace("qemu-io: ", "addcow: ")
    assert built.ours.returncode == built.theirs.returncode


@pytest.mark.parametrize("command", ["write 0 1", "write -z 0 64k", "discard 0 64k", "flush"])
def test_read_only_text_matches_qemu_io(tmp_path: Path, command: str) -> None:
    """With -r, write commands are refused before they run, in qemu-io's words."""
    make_backing(tmp_path / "base.raw", MIB, 0x10)
    build(tmp_path, MIB, ())
    ours = addcow_cli("io", "-r", "-c", command, "img.add-cow", cwd=tmp_path, check=False)
    theirs = run(
        [require_tool("qemu-io"), "-r", "-f", "qcow2", "-c", command, "ov.qcow2"],
        cwd=tmp_path,
        check=False,
    )
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    assert ours.stderr == theirs.stderr.replace("qemu-io: ", "addcow: ")


def test_stdin_script_matches_qemu_io_without_its_prompt(tmp_path: Path) -> None:
    """Commands on stdin: the same results; qemu-io's "qemu-io> " prompts are its own."""
    make_backing(tmp_path / "base.raw", MIB, 0x10)
    build(tmp_path, MIB, ())
    script = b"write -P 0x5 0 4k\nread -P 0x5 0 4k\nbogus\nread -P 0x6 0 1\nquit\nread 0 1\n"
    argv = [sys.executable, "-m", "addcow", "io", "img.add-cow"]
    ours = run(argv, cwd=tmp_path, input=script, check=False)
    theirs = run(
        [require_tool("qemu-io"), "-f", "qcow2", "ov.qcow2"], cwd=tmp_path, input=script,
        check=False,
    )
    assert filter_timing(ours.stdout) == filter_timing(theirs.stdout.replace("qemu-io> ", ""))
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr)


def test_backing_helper_layout(tmp_path: Path) -> None:
    """The diagrams' backing files really hold what they say (a check of the helper)."""
    make_backing(tmp_path / "b.raw", ODD_BACKING, 0x40, holes=(3,))
    data = (tmp_path / "b.raw").read_bytes()
    assert len(data) == ODD_BACKING
    assert data[:CLUSTER] == b"\x40" * CLUSTER
    assert data[3 * CLUSTER : 4 * CLUSTER] == bytes(CLUSTER)
    assert data[9 * CLUSTER :] == b"\x49" * (ODD_BACKING - 9 * CLUSTER)
    assert os.stat(tmp_path / "b.raw").st_blocks * 512 < ODD_BACKING  # the hole is sparse
