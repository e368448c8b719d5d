"""qcow2 golden images under add-cow images, with QEMU as the referee.

Every golden image G is made by qemu-img / qemu-io (the builders of
``test_qcow2``): compat 0.10 and 1.1; clusters of 512 B, 4 KiB, 64 KiB and
2 MiB; zlib (``-c``) and zstd compression; extended L2 with partly written,
zeroed and discarded subclusters; zero clusters; a virtual size that is not a
multiple of the cluster size; qcow2 over raw and qcow2 over qcow2. Over each G,
two disks are built and given the same writes (:func:`script`: distinct byte
patterns, partial clusters, zeroes, a discard, the last bytes of the disk)::

    (a) addcow create -b G -F qcow2 -o image_file=img.raw img.add-cow
        addcow io -c CMD ... img.add-cow
    (b) qemu-img create -f qcow2 -b G -F qcow2 ov.qcow2        (64 KiB clusters)
        qemu-io -f qcow2 -c CMD ... ov.qcow2

and then, for every G:

* both tools print the same text (timing filtered out);
* ``addcow convert`` of (a) and ``qemu-img convert -O raw`` of (b) are the
  same disk (``qemu-img compare``);
* ``addcow map --output=json`` and ``qemu-img map --output=json`` agree on
  which ranges come from which depth, and on present / zero / data (see
  :func:`normalise` for the one convention in which they differ, at depth 0),
  and on the host offset wherever both give one below depth 0 (there both
  name the same file: G, or G's own backing); neither says ``zero`` for a
  range holding a non-zero byte;
* ``addcow stream`` and ``addcow detach`` leave a raw disk equal to (b), with
  holes wherever (b)'s map says the golden image reads zero and nothing was
  written, and G unchanged;
* ``addcow check`` exits 0 (it reads every L2 table of G), and ``addcow info
  --backing-chain --output=json`` describes G's layers with the field names
  and values of ``qemu-img info --backing-chain --output=json G``.

Then the NBD server over a compressed G (allocation depths and content as
QEMU sees them, and ``--stream --detach-when-complete``), and the command
line: formats never guessed, ``convert`` and ``compare`` of G itself, a new
add-cow image from G, a safe rebase from one golden image to another, and a
corrupt L2 entry found by ``check``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from helpers import filter_timing
from nbd_util import served
from qcow2_util import IMAGES, convert_raw, data_segments, l2_entry, patch, qemu_img
from qcow2_util import converted as qemu_converted

KiB = 1024
MiB = 1 << 20
CLUSTER = 64 * KiB  # both the add-cow image's and the qcow2 overlay's

GOLDEN = [
    "v2_64k",  # compat=0.10, 64 KiB clusters, from a converted disk
    "v3_64k",  # compat=1.1
    "c512",
    "c4k",
    "c2m",
    "zlib",  # qemu-img convert -c
    "zstd",  # -o compression_type=zstd -c
    "extl2",  # extended_l2=on over raw: 4 KiB writes, write -z, discard in 64 KiB clusters
    "extl2_zlib",  # extended_l2=on, compressed
    "v2_written",  # compat=0.10 written by qemu-io (write -z allocates zeros)
    "v3_zero_clusters",  # zero clusters, unallocated clusters between them
    "size_unaligned",  # 1000448 bytes: not a multiple of 64 KiB
    "over_raw",  # qcow2 over raw, zero clusters over backing data
    "over_qcow2",  # qcow2 over qcow2 over raw
]
COMPRESSED = {"zlib", "zstd", "extl2_zlib"}


def script(size: int) -> list[str]:
    """The writes made to both disks: partial clusters, zeroes, a discard, the disk's end."""
    return [
        "write -P 0xa1 0 4k",  # partial first cluster
        "write -P 0xa2 100k 8k",  # inside one cluster, unaligned
        "write -P 0xa3 250k 20k",  # straddles a cluster boundary
        "write -z 320k 64k",  # a whole cluster of zeroes
        "discard 448k 64k",  # a whole unallocated cluster discarded: reads zero
        "write -z 700k 6k",  # partial zeroes straddling a boundary: copy on write
        f"write -P 0xa5 {size - 5000} 5000",  # the last bytes of the disk
        "flush",
        "read -P 0xa2 100k 8k",
        f"read -P 0xa5 {size - 5000} 5000",
    ]


# -- building ---------------------------------------------------------------------------


@dataclass
class Golden:
    """A golden image and what QEMU says about it and about an overlay over it."""

    name: str
    path: Path  # G
    dir: Path  # where both disks over G live
    size: int
    info_chain: list[dict[str, Any]]  # qemu-img info --backing-chain --output=json G
    overlay: Path  # ov.qcow2 over G, after script()
    overlay_out: str  # what qemu-io printed
    overlay_map: list[dict[str, Any]]
    overlay_raw: bytes  # qemu-img convert -O raw ov.qcow2
    digest: str  # sha256 of G's bytes when built

    def unchanged(self) -> bool:
        return sha256(self.path) == self.digest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def io_flags(commands: list[str]) -> list[str]:
    return [arg for c in commands for arg in ("-c", c)]


def make_overlay(golden: Path, path: Path, commands: list[str]) -> str:
    """qemu-img create a qcow2 over ``golden`` and run ``commands`` with qemu-io."""
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", str(golden),
         "-F", "qcow2", "-o", "cluster_size=64k", str(path)])  # fmt: skip
    return run([require_tool("qemu-io"), "-f", "qcow2", *io_flags(commands), str(path)]).stdout


def qemu_map_of(path: Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(
        qemu_img("map", "--output=json", "-f", fmt, path)
    )
    return result


@pytest.fixture(scope="module")
def goldens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Golden]:
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("golden")
    out: dict[str, Golden] = {}
    for name in GOLDEN:
        path = IMAGES[name](d)
        work = d / name
        work.mkdir()
        os.sync()  # the file's allocation settled: actual-size must not move under the tests
        info = json.loads(qemu_img("info", "--backing-chain", "--output=json", path))
        size = info[0]["virtual-size"]
        overlay = work / "ov.qcow2"
        printed = make_overlay(path, overlay, script(size))
        out[name] = Golden(
            name, path, work, size, info, overlay, printed, qemu_map_of(overlay),
            convert_raw(overlay), sha256(path),
        )  # fmt: skip
    return out


@dataclass
class Ours:
    image: Path
    io: Any  # CompletedProcess of addcow io


def make_ours(g: Golden, stem: str) -> Ours:
    """addcow create over G and the same script as the overlay got."""
    image = g.dir / f"{stem}.add-cow"
    addcow_cli("create", "-q", "-b", g.path, "-F", "qcow2", "-o", f"image_file={stem}.raw",
               image, cwd=g.dir)  # fmt: skip
    io = addcow_cli("io", *io_flags(script(g.size)), image, cwd=g.dir)
    return Ours(image, io)


@pytest.fixture(scope="module")
def ours(goldens: dict[str, Golden]) -> Callable[[str], Ours]:
    """The add-cow image over each golden image, built once (tests only read it)."""
    cache: dict[str, Ours] = {}

    def get(name: str) -> Ours:
        if name not in cache:
            cache[name] = make_ours(goldens[name], "img")
        return cache[name]

    return get


# -- maps -----------------------------------------------------------------------------------

Key = tuple[int, bool, bool, bool]  # depth, present, zero, data
Entry = tuple[int, int, Key, int | None]  # start, end, key, offset


def entries_of(js: list[dict[str, Any]], size: int) -> list[Entry]:
    """Map JSON as entries; they must tile [0, size) in order."""
    out: list[Entry] = []
    pos = 0
    for e in js:
        assert e["start"] == pos, f"map entries do not tile the disk at {pos}: {e}"
        key = (e["depth"], e["present"], e["zero"], e["data"])
        out.append((pos, pos + e["length"], key, e.get("offset")))
        pos += e["length"]
    assert pos == size, f"map covers {pos} bytes, the disk has {size}"
    return out


def false_zeros(entries: list[Entry], content: bytes) -> list[Entry]:
    """Entries that claim ``zero`` over a non-zero byte (must be none, on both sides)."""
    return [e for e in entries if e[2][2] and any(content[e[0] : e[1]])]


def normalise(entries: list[Entry], content: bytes) -> list[tuple[int, int, Key]]:
    """Entries without offsets, the depth-0 convention made equal, adjacent equal ones merged.

    Below depth 0 both tools read the same golden image (and its backing) and
    must agree exactly. At depth 0 they describe zero bytes in their own top
    file differently: the qcow2 overlay per cluster (``zero`` only for zero
    clusters; a data cluster holding zeros is ``data``), addcow per byte range
    of its raw image file (``SEEK_HOLE``: a punched range is ``zero`` even
    inside a partly written cluster, and written zeros are ``data``). Both are
    right, since ``zero`` is a hint that may be missing but never false (that is
    checked apart, unnormalised, by :func:`false_zeros`). So at depth 0 both
    sides get what they agree on: per 64 KiB cluster (the allocation unit of
    both top images), ``zero`` if the cluster's bytes are all zero, ``data``
    otherwise.
    """
    pieces: list[tuple[int, int, Key]] = []
    for start, end, key, _offset in entries:
        depth, present, _zero, _data = key
        if depth != 0 or not present:
            pieces.append((start, end, key))
            continue
        pos = start
        while pos < end:
            first = pos - pos % CLUSTER
            stop = min(end, first + CLUSTER)
            zero = not any(content[first : first + CLUSTER])
            pieces.append((pos, stop, (0, True, zero, not zero)))
            pos = stop
    merged: list[tuple[int, int, Key]] = []
    for start, end, key in pieces:
        if merged and merged[-1][2] == key and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, key)
        else:
            merged.append((start, end, key))
    return merged


def at(entries: list[Entry], pos: int) -> Entry:
    for e in entries:
        if e[0] <= pos < e[1]:
            return e
    raise AssertionError(f"no map entry covers {pos:#x}")


def offset_mismatches(ours: list[Entry], theirs: list[Entry], size: int) -> list[str]:
    """Below depth 0, where both maps give a host offset, it must be the same.

    (At depth 0 addcow's offset is in its raw image file and QEMU's in
    ov.qcow2: different files, not compared.)
    """
    cuts = sorted({e[0] for e in ours} | {e[0] for e in theirs} | {size})
    bad = []
    for lo, hi in itertools.pairwise(cuts):
        a, b = at(ours, lo), at(theirs, lo)
        if a[2][0] == 0 or a[3] is None or b[3] is None:
            continue
        if a[3] + lo - a[0] != b[3] + lo - b[0]:
            bad.append(f"[{lo:#x}, {hi:#x}) depth {a[2][0]}: addcow {a[3] + lo - a[0]:#x}, "
                       f"qemu {b[3] + lo - b[0]:#x}")  # fmt: skip
    return bad


def show(runs: list[tuple[int, int, Key]]) -> str:
    return "\n".join(f"  [{s:#9x}, {e:#9x}) depth {k[0]} present {k[1]:d} zero {k[2]:d} "
                     f"data {k[3]:d}" for s, e, k in runs)  # fmt: skip


# -- every golden image ----------------------------------------------------------------------


@pytest.mark.parametrize("name", GOLDEN)
def test_io_prints_what_qemu_io_prints(
    goldens: dict[str, Golden], ours: Callable[[str], Ours], name: str
) -> None:
    g, o = goldens[name], ours(name)
    assert (o.io.returncode, o.io.stderr) == (0, "")
    assert filter_timing(o.io.stdout) == filter_timing(g.overlay_out)


@pytest.mark.parametrize("name", GOLDEN)
def test_convert_equals_the_qcow2_overlay(
    goldens: dict[str, Golden], ours: Callable[[str], Ours], name: str
) -> None:
    g, o = goldens[name], ours(name)
    out = g.dir / "out.raw"
    addcow_cli("convert", o.image, out)
    assert out.stat().st_size == g.size
    proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(out),
                str(g.overlay)], check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    assert out.read_bytes() == g.overlay_raw


@pytest.mark.parametrize("name", GOLDEN)
def test_map_agrees_with_qemu_img_map_of_the_overlay(
    goldens: dict[str, Golden], ours: Callable[[str], Ours], name: str
) -> None:
    g, o = goldens[name], ours(name)
    mine = entries_of(json.loads(addcow_cli("map", "--output=json", o.image).stdout), g.size)
    theirs = entries_of(g.overlay_map, g.size)
    content = g.overlay_raw  # the same disk (test_convert_equals_the_qcow2_overlay)
    assert false_zeros(mine, content) == []
    assert false_zeros(theirs, content) == []
    a, b = normalise(mine, content), normalise(theirs, content)
    assert a == b, f"addcow:\n{show(a)}\nqemu:\n{show(b)}"
    assert offset_mismatches(mine, theirs, g.size) == []
    # addcow's depth 0 is its raw image file, which holds the disk at the disk's offsets
    assert all(e[3] in (None, e[0]) for e in mine if e[2][0] == 0)
    # the image really is its variant, so the comparison means something
    depths = {e[2][0] for e in mine if e[2][1]}
    assert 0 in depths
    # below the writes: G's data, or (size_unaligned: both its data clusters are
    # rewritten) only its unallocated ranges
    assert len(depths) >= 2 or name == "size_unaligned"
    if name.startswith("over_"):
        assert max(depths) >= 2, "data from G's backing"
    if name in COMPRESSED:  # compressed clusters: data without a host offset, on both sides
        assert any(e[2][:2] == (1, True) and e[2][3] and e[3] is None for e in mine)
    assert any(e[2][0] >= 1 and e[2][2] for e in mine), "a range of G that reads zero"


def test_control_one_extra_write_on_the_overlay_is_caught(
    goldens: dict[str, Golden], ours: Callable[[str], Ours], tmp_path: Path
) -> None:
    """Control: the comparisons above fail when the two disks differ by one 1 KiB write
    into a cluster still read from G."""
    g, o = goldens["zlib"], ours("zlib")
    other = tmp_path / "other.qcow2"
    make_overlay(g.path, other, [*script(g.size), "write -P 0x5a 1500k 1k"])
    out = tmp_path / "out.raw"
    addcow_cli("convert", o.image, out)
    proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(out),
                str(other)], check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (1, f"Content mismatch at offset {1500 * KiB}!\n")
    mine = entries_of(json.loads(addcow_cli("map", "--output=json", o.image).stdout), g.size)
    theirs = entries_of(qemu_map_of(other), g.size)
    content = convert_raw(other)
    a, b = normalise(mine, content), normalise(theirs, content)
    assert a != b
    assert at([(*r, None) for r in b], 1500 * KiB)[2][0] == 0
    assert at([(*r, None) for r in a], 1500 * KiB)[2][0] == 1


@pytest.mark.parametrize("name", GOLDEN)
def test_stream_and_detach_leave_the_overlays_disk_sparse(
    goldens: dict[str, Golden], name: str
) -> None:
    g = goldens[name]
    o = make_ours(g, "streamed")
    raw = g.dir / "streamed.raw"
    addcow_cli("stream", o.image)
    info = json.loads(addcow_cli("info", "--output=json", o.image).stdout)
    assert info["format-specific"]["data"]["complete"] is True
    detach = addcow_cli("detach", o.image)
    assert str(raw.name) in detach.stdout
    assert not o.image.exists()
    assert raw.stat().st_size == g.size
    proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(raw),
                str(g.overlay)], check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    # where the golden image reads zero (unallocated, zero clusters, holes in its
    # backing, past its end) and nothing was written, the raw disk has holes
    block = os.statvfs(raw).f_bsize
    zero_ranges = [(e["start"], e["start"] + e["length"]) for e in g.overlay_map
                   if e["depth"] >= 1 and (e["zero"] or not e["present"])]  # fmt: skip
    whole = sum(max(0, hi // block * block - -(-lo // block) * block) for lo, hi in zero_ranges)
    assert whole > 0, "the golden image has zero ranges of whole blocks"
    data_there = [(lo, hi, seg) for lo, hi in zero_ranges
                  for seg in data_segments(raw, lo, hi, block)]  # fmt: skip
    assert data_there == []
    # and QEMU's map of the raw disk says the same: no data in those ranges
    raw_map = qemu_map_of(raw, "raw")
    for lo, hi in zero_ranges:
        lo, hi = -(-lo // block) * block, hi // block * block
        for e in raw_map:
            if lo < hi and e["data"] and e["start"] < hi and e["start"] + e["length"] > lo:
                raise AssertionError(f"qemu-img map: data at {e} inside zero range "
                                     f"[{lo:#x}, {hi:#x})")  # fmt: skip
    assert g.unchanged()


INFO_KEYS = ("format", "virtual-size", "cluster-size", "backing-filename",
             "backing-filename-format", "dirty-flag", "actual-size")  # fmt: skip
QCOW2_DATA_KEYS = ("compat", "compression-type", "extended-l2", "refcount-bits",
                   "lazy-refcounts", "corrupt")  # fmt: skip


@pytest.mark.parametrize("name", GOLDEN)
def test_check_and_info_of_the_backing_chain(
    goldens: dict[str, Golden], ours: Callable[[str], Ours], name: str
) -> None:
    g, o = goldens[name], ours(name)
    check = addcow_cli("check", o.image, check=False)
    assert (check.returncode, check.stderr) == (0, ""), check.stdout
    assert "No errors were found on the image." in check.stdout
    chain = json.loads(addcow_cli("info", "--backing-chain", "--output=json", o.image).stdout)
    top = chain[0]
    assert (top["format"], top["virtual-size"]) == ("add-cow", g.size)
    assert (top["backing-filename"], top["backing-filename-format"]) == (str(g.path), "qcow2")
    # below the add-cow image: G and its own backing files, as qemu-img describes them now
    # (actual-size is the file's allocation, which ext4 may still settle after the fixture)
    now = json.loads(qemu_img("info", "--backing-chain", "--output=json", g.path))
    assert [layer["filename"] for layer in now] == [layer["filename"] for layer in g.info_chain]
    assert len(chain) == len(now) + 1
    for mine, theirs in zip(chain[1:], now, strict=True):
        where = f"layer {theirs['filename']}"
        for key in INFO_KEYS:
            assert mine.get(key) == theirs.get(key), f"{where}: {key}"
        assert os.path.realpath(mine["filename"]) == os.path.realpath(theirs["filename"])
        if theirs["format"] == "qcow2":
            a, b = mine["format-specific"], theirs["format-specific"]
            assert a["type"] == b["type"] == "qcow2"
            for key in QCOW2_DATA_KEYS:
                assert a["data"].get(key) == b["data"].get(key), f"{where}: {key}"
            assert set(a["data"]) == set(b["data"]), f"{where}: the fields qemu-img shows"


# -- the NBD server over a qcow2 golden image ------------------------------------------------------


def merge_depths(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(length, depth) runs with adjacent equal depths merged."""
    out: list[tuple[int, int]] = []
    for length, depth in runs:
        if out and out[-1][1] == depth:
            out[-1] = (out[-1][0] + length, depth)
        else:
            out.append((length, depth))
    return out


def test_serve_gives_the_allocation_depths_and_content_qemu_sees(
    goldens: dict[str, Golden], tmp_path: Path
) -> None:
    """nbdinfo's qemu:allocation-depth of the served add-cow image over zlib G equals
    qemu-img map of the overlay (depth + 1 where present, 0 where absent)."""
    g = goldens["zlib"]
    o = make_ours(g, "served")
    with served(tmp_path, o.image) as srv:
        js = json.loads(run([require_tool("nbdinfo"), "--json", "--map=qemu:allocation-depth",
                             srv.uri]).stdout)  # fmt: skip
        compared = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                        srv.uri, str(g.overlay)], check=False)  # fmt: skip
    pos = 0
    for e in js:
        assert e["offset"] == pos
        pos += e["length"]
    assert pos == g.size
    served_depths = merge_depths([(e["length"], e["type"]) for e in js])
    qemu_depths = merge_depths([(e["length"], e["depth"] + 1 if e["present"] else 0)
                                for e in g.overlay_map])  # fmt: skip
    assert served_depths == qemu_depths
    assert {d for _, d in served_depths} >= {1, 2}
    assert (compared.returncode, compared.stdout) == (0, "Images are identical.\n"), (
        compared.stderr
    )
    assert g.unchanged()


def test_serve_stream_detach_when_complete_over_qcow2(
    goldens: dict[str, Golden], tmp_path: Path
) -> None:
    g = goldens["over_qcow2"]
    o = make_ours(g, "live")
    raw = g.dir / "live.raw"
    args = ("--stream", "--detach-when-complete")
    with served(tmp_path, o.image, args=args) as srv:
        for _ in range(600):
            if "detached: removed the .add-cow file" in srv.stderr():
                break
            time.sleep(0.05)
        log = srv.stderr()
        assert "detached: removed the .add-cow file" in log, log
        compared = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                        srv.uri, str(g.overlay)], check=False)  # fmt: skip
        assert (compared.returncode, compared.stdout) == (0, "Images are identical.\n")
    assert not o.image.exists()
    proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(raw),
                str(g.overlay)], check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    assert g.unchanged()


# -- the command line ------------------------------------------------------------------------------


def test_create_over_qcow2_without_a_format_is_refused(
    goldens: dict[str, Golden], tmp_path: Path
) -> None:
    g = goldens["v3_64k"]
    proc = addcow_cli("create", "-b", g.path, "-o", "image_file=n.raw", "n.add-cow",
                      check=False, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "if it is a qcow2 image, give -F qcow2" in proc.stderr
    assert sorted(tmp_path.iterdir()) == []
    proc = addcow_cli("create", "-b", g.path, "-F", "raw", "n.add-cow", check=False,
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "qcow2" in proc.stderr
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", GOLDEN)
def test_convert_and_compare_of_the_golden_image_itself(
    goldens: dict[str, Golden], tmp_path: Path, name: str
) -> None:
    g = goldens[name]
    out = tmp_path / "g.raw"
    refused = addcow_cli("convert", g.path, out, check=False)
    assert refused.returncode == 1
    assert "starts with a qcow2 header" in refused.stderr and "-f qcow2" in refused.stderr
    assert not out.exists()
    addcow_cli("convert", "-f", "qcow2", g.path, out)
    assert out.read_bytes() == convert_raw(g.path)
    same = addcow_cli("compare", "-f", "qcow2", "-F", "raw", g.path, out)
    assert same.stdout == "Images are identical.\n"
    with open(out, "r+b") as f:  # one byte differs
        f.seek(g.size // 2)
        byte = f.read(1)
        f.seek(g.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    differ = addcow_cli("compare", "-f", "qcow2", g.path, out, check=False)
    referee = run([require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw",
                   str(g.path), str(out)], check=False)  # fmt: skip
    assert (referee.returncode, differ.returncode) == (1, 1)
    assert referee.stdout.startswith("Content mismatch at offset ")
    assert differ.stdout == referee.stdout


@pytest.mark.parametrize("name", ["zstd", "over_qcow2", "extl2"])
def test_convert_qcow2_to_a_new_add_cow_image(
    goldens: dict[str, Golden], tmp_path: Path, name: str
) -> None:
    g = goldens[name]
    image = tmp_path / "x.add-cow"
    addcow_cli("convert", "-f", "qcow2", "-O", "add-cow", "-o", "image_file=x.raw", g.path,
               image)  # fmt: skip
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["virtual-size"] == g.size
    assert "backing-filename" not in info
    full = tmp_path / "full.raw"
    addcow_cli("convert", image, full)
    proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(full),
                str(g.path)], check=False)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    assert addcow_cli("check", image).returncode == 0


def test_safe_rebase_from_one_golden_qcow2_to_another(tmp_path: Path) -> None:
    """G2 is G1 with three clusters rewritten: a safe rebase copies exactly those in."""
    require_tool("qemu-io")
    g1 = qemu_converted(tmp_path, "g1", compress=True, size=3 * MiB, seed=11)
    g2 = tmp_path / "g2.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", g1, g2)
    changed = [16, 17, 40]  # clusters of G2 that differ from G1, none written below
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write -P 0x5e 1M 128k",
         "-c", "write -P 0x5f 2560k 4k", str(g2)])  # fmt: skip
    commands = ["write -P 0xb1 0 4k", "write -P 0xb2 300k 70k"]  # clusters 0, 4, 5
    image = tmp_path / "r.add-cow"
    addcow_cli("create", "-q", "-b", g1, "-F", "qcow2", "-o", "image_file=r.raw", image)
    addcow_cli("io", *io_flags(commands), image)
    overlay = tmp_path / "ov.qcow2"
    make_overlay(g1, overlay, commands)

    def same_as_overlay() -> bool:
        out = tmp_path / "now.raw"
        addcow_cli("convert", image, out)
        proc = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(out),
                    str(overlay)], check=False)  # fmt: skip
        out.unlink()
        return proc.returncode == 0

    def allocated() -> set[int]:
        js = json.loads(addcow_cli("map", "--output=json", image).stdout)
        return {c for e in js if e["depth"] == 0 and e["present"]
                for c in range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER))}

    assert same_as_overlay()
    before = allocated()
    assert before == {0, 4, 5}
    addcow_cli("rebase", "-b", g2, "-F", "qcow2", image)
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == (str(g2), "qcow2")
    assert same_as_overlay()
    assert allocated() == before | set(changed)
    assert addcow_cli("check", image).returncode == 0


@pytest.mark.parametrize(
    ("layer", "cluster", "readable"),
    [("chain_mid.qcow2", 1, True), ("over_qcow2.qcow2", 4, False)],
    ids=["middle-layer-shadowed", "top-layer"],
)
def test_a_corrupt_l2_entry_in_a_layer_fails_check(
    goldens: dict[str, Golden], tmp_path: Path, layer: str, cluster: int, readable: bool
) -> None:
    """A copy of the chain over_qcow2 -> chain_mid -> chain_base with one L2 entry of
    ``layer`` pointing past the end of its file. check reads every L2 table of every
    layer, so it finds the entry even where a layer above hides that cluster; a read
    of the cluster fails rather than return wrong bytes."""
    g = goldens["over_qcow2"]
    for p in [*g.path.parent.glob("chain_*"), g.path]:
        shutil.copy(p, tmp_path / p.name)
    bad = tmp_path / layer
    at_, entry = l2_entry(bad, 0, cluster)
    assert entry & 0x00FFFFFFFFFFFE00, f"cluster {cluster} of {layer} holds data"
    patch(bad, at_, "Q", (entry & ~0x00FFFFFFFFFFFE00) | (1 << 40))
    image = tmp_path / "c.add-cow"
    addcow_cli("create", "-q", "-b", tmp_path / g.path.name, "-F", "qcow2",
               "-o", "image_file=c.raw", image)  # fmt: skip
    proc = addcow_cli("check", image, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"ERROR backing chain: {bad}: corrupt qcow2" in proc.stderr
    assert f"guest offset {cluster * CLUSTER:#x}" in proc.stderr
    assert "No errors were found" not in proc.stdout
    js = addcow_cli("check", "--output=json", image, check=False)
    assert js.returncode == 2
    assert json.loads(js.stdout)["corruptions"] == 1
    out = addcow_cli("convert", image, tmp_path / "c.out", check=False)
    if readable:
        assert out.returncode == 0
        assert addcow_cli("compare", tmp_path / "c.out", "-F", "qcow2", g.path).returncode == 0
    else:
        assert out.returncode == 1 and f"{bad}: corrupt qcow2" in out.stderr
