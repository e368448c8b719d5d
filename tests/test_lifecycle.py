"""The image lifecycle: stream, detach, commit, rebase, resize, amend, convert.

Every command is run as a user runs it (``python -m addcow ...``) and checked
three ways: against a small reference model of the virtual disk written here,
against QEMU doing the same job on a qcow2 overlay (``qemu-img commit``,
``rebase [-u]``, ``resize [--shrink]``, ``convert -O raw``) compared with
``qemu-img compare``, and, where a command promises it, against the files on disk
(holes, hashes and mtimes of backing files, the .add-cow header).

Each QEMU comparison builds two twin directories from the same recipe: ``a/``
holds ``d.add-cow`` + ``d.raw`` over ``base.raw``, ``q/`` holds ``o.qcow2``
(64 KiB clusters) over an identical ``base.raw``; the same writes go to both,
through the library on one side and ``qemu-io`` on the other.

The main scenario (64 KiB clusters; ``.`` a hole, ``0`` explicit zero bytes,
``-`` past the backing's end; ``w`` data written, ``z`` write_zeroes, ``d``
discard, lower case letters a partial cluster)::

    cluster      0   1   2   3   4   5   6   7   8   9   10  11  12  13  14
    base.raw     A   B   .   0   C   D/0 .   E   0   F   G|  -   -   -   -
    overlay      .   w   W   w   z   W   .   Z   .   D   w   .   w   .   w|
    allocated    .   x   x   x   x   x   .   x   .   x   x   .   x   .   x

    base.raw   10 clusters + 1000 bytes (ends 1000 bytes into cluster 10, "G|");
               D/0: first half data, second half explicit zero bytes
    disk       14 clusters + 12800 bytes: larger than its backing, not a cluster
               multiple (but a multiple of 512, which qcow2 needs); cluster 14 partial
    writes     w1 [1C+1000, 3C+5000)  data: partial clusters at both ends
               w2 cluster 5            data, whole cluster
               z1 [4C+4096, 4C+12288)  write_zeroes inside a data cluster
               z2 cluster 7            write_zeroes, whole cluster (a hole, allocated)
               d1 cluster 9            discard, whole cluster (reads zero, allocated)
               w3 [10C+500, 10C+3000)  data straddling the backing's end
               w4 [12C+100, 12C+400)   data past the backing's end
               w5 the disk's last 100 bytes

Every cluster of the backing and every write has its own byte pattern, which
also varies with the position inside the cluster (see :func:`fill`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CLUSTER, popen_interruptible, require_tool, run
from conftest import addcow as addcow_cli

import addcow
from addcow import lifecycle, streaming, sysio
from addcow.errors import AddCowIOError
from addcow.format import Header
from addcow.image import AddCowImage

C = CLUSTER
SIZE = 14 * C + 12800
BASE_SIZE = 10 * C + 1000
HOLE = "hole"
ZERO = "zero"
HALF = "half"

# cluster -> tag (data), HOLE, ZERO, or (HALF, tag): data then explicit zero bytes
BASE_LAYOUT: dict[int, object] = {
    0: 0xA0,
    1: 0xA1,
    2: HOLE,
    3: ZERO,
    4: 0xA4,
    5: (HALF, 0xA5),
    6: HOLE,
    7: 0xA7,
    8: ZERO,
    9: 0xA9,
    10: 0xAA,
}

# (kind, offset, length, tag): kind is write, zero or discard
OPS: list[tuple[str, int, int, int]] = [
    ("write", 1 * C + 1000, 2 * C + 4000, 0xB1),
    ("write", 5 * C, C, 0xB5),
    ("zero", 4 * C + 4096, 8192, 0),
    ("zero", 7 * C, C, 0),
    ("discard", 9 * C, C, 0),
    ("write", 10 * C + 500, 2500, 0xBA),
    ("write", 12 * C + 100, 300, 0xBC),
    ("write", SIZE - 100, 100, 0xBE),
]
ALLOCATED = {1, 2, 3, 4, 5, 7, 9, 10, 12, 14}
CLUSTERS = 15

LOCKED = "the image is in use by another process"


# -- content --------------------------------------------------------------------



def stale_bytes(raw: Path, length: int, byte: int = 0xEE) -> None:
    """Fill an image file with old bytes after its image was created (every bit still
    0, so none of them is read): the state a crash or an earlier use leaves."""
    with open(raw, "r+b") as f:
        f.write(bytes([byte]) * length)

def fill(tag: int, offset: int, length: int) -> bytes:
    """Bytes for [offset, offset+length): 16-byte units of 8 x ``tag`` + the unit's offset.

    Distinct per cluster (its tag) and per position, never a 4 KiB block of zeros.
    """
    start = offset & ~15
    end = (offset + length + 15) & ~15
    head = bytes([tag]) * 8
    data = b"".join(head + pos.to_bytes(8, "little") for pos in range(start, end, 16))
    return data[offset - start : offset - start + length]


def build_base(path: Path, layout: dict[int, object] | None = None,
               size: int = BASE_SIZE) -> bytes:
    """Write a raw backing file following ``layout``; return its content.

    Holes are never written; ZERO clusters get explicit zero bytes (allocated on disk).
    """
    layout = BASE_LAYOUT if layout is None else layout
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for cluster, kind in layout.items():
            lo = cluster * C
            hi = min(lo + C, size)
            if kind == HOLE:
                continue
            if kind == ZERO:
                chunk = bytes(hi - lo)
            elif isinstance(kind, tuple):
                half = (hi - lo) // 2
                chunk = fill(kind[1], lo, half) + bytes(hi - lo - half)
            else:
                assert isinstance(kind, int)
                chunk = fill(kind, lo, hi - lo)
            f.seek(lo)
            f.write(chunk)
            content[lo:hi] = chunk
        f.flush()
        os.fsync(f.fileno())
    return bytes(content)


def model(base: bytes, size: int, ops: list[tuple[str, int, int, int]]) -> bytes:
    """The reference model: the backing's content (zeros past its end) then the writes."""
    disk = bytearray(size)
    disk[: min(size, len(base))] = base[:size]
    for kind, offset, length, tag in ops:
        if kind == "write":
            disk[offset : offset + length] = fill(tag, offset, length)
        else:
            disk[offset : offset + length] = bytes(length)
    return bytes(disk)


def apply_addcow(path: Path, ops: list[tuple[str, int, int, int]]) -> None:
    with addcow.open(path) as img:
        for kind, offset, length, tag in ops:
            if kind == "write":
                img.write(fill(tag, offset, length), offset)
            elif kind == "zero":
                img.write_zeroes(offset, length)
            else:
                img.discard(offset, length)


def apply_qemu(path: Path, ops: list[tuple[str, int, int, int]], fmt: str = "qcow2") -> None:
    """The same operations with qemu-io (data from pattern files of the exact length)."""
    qemu_io = require_tool("qemu-io")
    cmds: list[str] = []
    for n, (kind, offset, length, tag) in enumerate(ops):
        if kind == "write":
            src = path.parent / f"op{n}.bin"
            src.write_bytes(fill(tag, offset, length))
            cmds += ["-c", f"write -s {src} {offset} {length}"]
        elif kind == "zero":
            cmds += ["-c", f"write -z {offset} {length}"]
        else:
            cmds += ["-c", f"discard {offset} {length}"]
    if cmds:
        run([qemu_io, "-f", fmt, *cmds, str(path)])


def read_all(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, img.size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(addcow_cli("info", "--output=json", path).stdout))


def specific(path: Path) -> dict[str, object]:
    data = info(path)["format-specific"]
    assert isinstance(data, dict)
    return dict(data["data"])


def bitmap_bits(path: Path) -> set[int]:
    """Allocated clusters according to the image (library view of the bitmap)."""
    with addcow.open(path, readonly=True) as img:
        return {c for c in range(img.total_clusters) if img.bitmap.is_set(c)}


def data_blocks(path: Path, lo: int, hi: int, block: int = 4096) -> set[int]:
    """Offsets of the ``block``-sized blocks of [lo, hi) the file system reports as data."""
    found: set[int] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        for pos in range(lo, hi, block):
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data from here on
            if data < pos + block:
                found.add(pos)
    finally:
        os.close(fd)
    return found


def disk_blocks(path: Path) -> int:
    """st_blocks once the file's delayed allocations are on disk (fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_blocks
    finally:
        os.close(fd)


def nonzero_blocks(content: bytes, lo: int, hi: int, block: int = 4096) -> set[int]:
    zero = bytes(block)
    return {
        pos for pos in range(lo, hi, block)
        if content[pos : min(pos + block, hi)] != zero[: min(block, hi - pos)]
    }


# -- QEMU -------------------------------------------------------------------------


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), *map(str, args)], check=check)


def qemu_compare(a: Path, fa: str, b: Path, fb: str) -> None:
    """``qemu-img compare`` says identical, and both have the same virtual size."""
    proc = qemu_img("compare", "-f", fa, "-F", fb, a, b, check=False)
    assert proc.returncode == 0, f"qemu-img compare {a} {b}:\n{proc.stdout}{proc.stderr}"
    assert "Images are identical." in proc.stdout
    assert "mismatch" not in proc.stderr, proc.stderr
    assert virtual_size(a, fa) == virtual_size(b, fb)


def virtual_size(path: Path, fmt: str) -> int:
    out = qemu_img("info", "-U", "--output=json", "-f", fmt, path).stdout
    return int(json.loads(out)["virtual-size"])


def qemu_allocated(qcow2: Path) -> set[int]:
    """Clusters the qcow2 overlay itself holds (qemu-img map depth 0)."""
    entries = json.loads(qemu_img("map", "--output=json", "-U", qcow2).stdout)
    clusters: set[int] = set()
    for e in entries:
        if e["depth"] == 0 and e["present"]:
            assert e["start"] % C == 0
            clusters.update(range(e["start"] // C, -(-(e["start"] + e["length"]) // C)))
    return clusters


def to_raw(image: Path, out: Path) -> Path:
    """The add-cow image's content as a raw file, written by ``addcow convert``."""
    addcow_cli("convert", image, out)
    return out


# -- scenario ---------------------------------------------------------------------


@dataclass
class Twin:
    """An add-cow overlay and a qcow2 overlay with the same history."""

    root: Path
    img: Path  # a/d.add-cow
    raw: Path  # a/d.raw
    base: Path  # a/base.raw
    qcow2: Path  # q/o.qcow2
    qbase: Path  # q/base.raw
    base_content: bytes
    ops: list[tuple[str, int, int, int]] = field(default_factory=list)
    size: int = SIZE

    def expected(self) -> bytes:
        return model(self.base_content, self.size, self.ops)

    def compare(self, tag: str = "out") -> Path:
        """addcow convert, then qemu-img compare against the qcow2 and the model."""
        out = to_raw(self.img, self.root / f"{tag}.raw")
        qemu_compare(out, "raw", self.qcow2, "qcow2")
        assert sha(out.read_bytes()) == sha(self.expected())
        return out


def make_twin(root: Path, *, size: int = SIZE, layout: dict[int, object] | None = None,
              base_size: int = BASE_SIZE,
              ops: list[tuple[str, int, int, int]] | None = None) -> Twin:
    ops = OPS if ops is None else ops
    a, q = root / "a", root / "q"
    a.mkdir()
    q.mkdir()
    content = build_base(a / "base.raw", layout, base_size)
    assert build_base(q / "base.raw", layout, base_size) == content
    addcow_cli("create", "-b", "base.raw", "-F", "raw", "-o", "image_file=d.raw",
               a / "d.add-cow", str(size))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             "-o", "cluster_size=64k", q / "o.qcow2", str(size))
    apply_addcow(a / "d.add-cow", ops)
    apply_qemu(q / "o.qcow2", ops)
    return Twin(root, a / "d.add-cow", a / "d.raw", a / "base.raw", q / "o.qcow2",
                q / "base.raw", content, list(ops), size)


@pytest.fixture
def twin(tmp_path: Path) -> Twin:
    return make_twin(tmp_path)


@contextmanager
def untouched(*paths: Path) -> Iterator[None]:
    """Assert the files keep their sha256 and mtime (mtimes are first set in the past,
    so a write in the same clock tick cannot go unnoticed)."""
    before = {}
    for p in paths:
        os.utime(p, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        st = os.stat(p)
        before[p] = (file_sha(p), st.st_mtime_ns, st.st_size)
    yield
    for p in paths:
        st = os.stat(p)
        assert (file_sha(p), st.st_mtime_ns, st.st_size) == before[p], f"{p} was modified"


@contextmanager
def held(path: Path, *, readonly: bool = False) -> Iterator[None]:
    """Another user of the image: this test process keeps it open (OFD locks)."""
    img = addcow.open(path, readonly=readonly)
    try:
        yield
    finally:
        img.close()


@contextmanager
def qemu_io_holding(path: Path, fmt: str = "raw") -> Iterator[None]:
    """qemu-io keeps ``path`` open read-write (with QEMU's locks) for the block."""
    proc = subprocess.Popen(
        [require_tool("qemu-io"), "-f", fmt, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("length\n")  # answered once the file is open (and locked)
        proc.stdin.flush()
        assert proc.stdout.readline().strip(), "qemu-io did not open " + str(path)
        yield
    finally:
        proc.communicate("quit\n", timeout=10)


def fails(*args: str | os.PathLike[str]) -> str:
    """Run addcow expecting exit status 1 and one 'addcow: ...' line; return stderr."""
    proc = addcow_cli(*args, check=False)
    assert proc.returncode == 1, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("addcow: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


# -- the scenario itself and convert ----------------------------------------------


def test_scenario_reads_like_the_model_and_like_qemu(twin: Twin) -> None:
    """Precondition of everything below: same history, same disk, same allocation."""
    assert read_all(twin.img) == twin.expected()
    assert bitmap_bits(twin.img) == ALLOCATED
    assert qemu_allocated(twin.qcow2) == ALLOCATED
    assert twin.size > os.path.getsize(twin.base)
    assert twin.size % C and os.path.getsize(twin.base) % C


def test_convert_to_raw_matches_qemu_convert(twin: Twin) -> None:
    with untouched(twin.base, twin.img, twin.raw):
        out = to_raw(twin.img, twin.root / "addcow.raw")
    qemu_img("convert", "-O", "raw", twin.qcow2, twin.root / "qemu.raw")
    qemu_compare(out, "raw", twin.root / "qemu.raw", "raw")
    qemu_compare(out, "raw", twin.qcow2, "qcow2")
    assert out.read_bytes() == twin.expected()
    assert os.path.getsize(out) == SIZE
    # sparse like qemu-img convert's output
    assert data_blocks(out, 0, SIZE) <= data_blocks(twin.root / "qemu.raw", 0, SIZE)
    assert disk_blocks(out) <= disk_blocks(twin.root / "qemu.raw")


def test_convert_to_addcow_from_addcow_matches_qemu(twin: Twin) -> None:
    dst = twin.root / "a" / "c.add-cow"
    with untouched(twin.base, twin.img, twin.raw):
        addcow_cli("convert", "-O", "add-cow", "-o", "image_file=c.raw", twin.img, dst)
    meta = info(dst)
    assert "backing-filename" not in meta
    assert meta["virtual-size"] == SIZE
    # standalone: the original overlay and its backing can go away
    twin.img.unlink()
    twin.base.unlink()
    assert read_all(dst) == twin.expected()
    out = to_raw(dst, twin.root / "c-out.raw")
    qemu_compare(out, "raw", twin.qcow2, "qcow2")
    qemu_img("convert", "-O", "qcow2", twin.qcow2, twin.root / "flat.qcow2")
    qemu_compare(out, "raw", twin.root / "flat.qcow2", "qcow2")


def test_convert_to_addcow_from_raw_matches_qemu(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    content = build_base(src)
    dst = tmp_path / "n.add-cow"
    with untouched(src):
        addcow_cli("convert", "-O", "add-cow", "-o", "image_file=n.raw", src, dst)
    assert read_all(dst) == content
    qemu_img("convert", "-f", "raw", "-O", "qcow2", src, tmp_path / "n.qcow2")
    out = to_raw(dst, tmp_path / "out.raw")
    qemu_compare(out, "raw", tmp_path / "n.qcow2", "qcow2")
    qemu_compare(out, "raw", src, "raw")
    # holes and zero clusters of the source stay unallocated, as in qemu's qcow2
    assert bitmap_bits(dst) == {0, 1, 4, 5, 7, 9, 10}
    assert qemu_allocated(tmp_path / "n.qcow2") == {0, 1, 4, 5, 7, 9, 10}


@pytest.mark.parametrize("target", ["base.raw", "d.raw", "d.add-cow", "link.raw"])
def test_convert_refuses_to_overwrite_a_file_of_its_own_source(twin: Twin, target: str) -> None:
    """The output must not be a file the source reads: its backing file, its image
    file or its .add-cow file (also through a symlink). qemu-img convert refuses the
    same (Failed to get "write" lock); truncating it would destroy the source."""
    (twin.root / "a" / "link.raw").symlink_to("base.raw")
    dst = twin.root / "a" / target
    with untouched(twin.base, twin.raw, twin.img):
        err = fails("convert", twin.img, dst)
    assert target in err or "base.raw" in err, err
    twin.compare()


def test_convert_to_add_cow_refuses_to_replace_its_own_backing(twin: Twin) -> None:
    with untouched(twin.base, twin.raw, twin.img):
        fails("convert", "-O", "add-cow", "-o", "image_file=n.raw", twin.img, twin.base)
    twin.compare()


def test_convert_refuses_existing_image_file(twin: Twin) -> None:
    (twin.root / "a" / "taken.raw").write_bytes(b"keep me")
    err = fails("convert", "-O", "add-cow", "-o", "image_file=taken.raw",
                twin.img, twin.root / "a" / "t.add-cow")
    assert "taken.raw exists; convert writes a new image file" in err
    assert (twin.root / "a" / "taken.raw").read_bytes() == b"keep me"


# -- stream ------------------------------------------------------------------------


def test_stream_keeps_content_sets_all_allocated_and_matches_qemu(twin: Twin) -> None:
    before = sha(read_all(twin.img))
    assert before == sha(twin.expected())
    with untouched(twin.base):
        proc = addcow_cli("stream", twin.img)
    assert proc.returncode == 0
    assert sha(read_all(twin.img)) == before
    data = specific(twin.img)
    assert data["complete"] is True
    assert "all_allocated" in data["compatible-features"]  # type: ignore[operator]
    assert data["allocated-clusters"] == data["total-clusters"] == CLUSTERS
    # the image file alone is the disk now, like qemu-img convert's output of the qcow2
    qemu_img("convert", "-O", "raw", twin.qcow2, twin.root / "qemu.raw")
    assert os.path.getsize(twin.raw) == SIZE
    qemu_compare(twin.raw, "raw", twin.root / "qemu.raw", "raw")
    qemu_compare(twin.raw, "raw", twin.qcow2, "qcow2")
    # with the backing file deleted the image opens and reads the same
    twin.base.unlink()
    assert sha(read_all(twin.img)) == before
    with addcow.open(twin.img) as img:
        assert img.read(10 * C, 2 * C) == twin.expected()[10 * C : 12 * C]
        img.write(b"after", 3)
    assert read_all(twin.img)[:8] == twin.expected()[:3] + b"after"
    assert info(twin.img)["backing-filename"] == "base.raw"


def test_stream_leaves_holes_where_the_backing_reads_zero(tmp_path: Path) -> None:
    """Holes and 4 KiB blocks of explicit zeros in the backing, and everything past
    its end, stay holes in the image file; no more blocks than qemu-img convert."""
    t = make_twin(tmp_path, ops=[])
    with untouched(t.base):
        addcow_cli("stream", t.img)
    content = t.expected()
    assert data_blocks(t.raw, 0, SIZE) == nonzero_blocks(content, 0, SIZE)
    qemu_img("convert", "-O", "raw", t.qcow2, tmp_path / "qemu.raw")
    qemu_compare(t.raw, "raw", tmp_path / "qemu.raw", "raw")
    assert disk_blocks(t.raw) <= disk_blocks(tmp_path / "qemu.raw")


def test_stream_punches_old_bytes_where_the_backing_reads_zero(tmp_path: Path) -> None:
    """An image file full of old bytes (every bit 0, so never read): after the stream,
    zero ranges of the backing and the area past its end read zero and are holes."""
    t = make_twin(tmp_path, ops=[])
    t.img.unlink()
    t.raw.unlink()
    addcow.create(t.img, image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=SIZE)
    stale_bytes(t.raw, SIZE + 5000)  # longer than the disk, too
    apply_addcow(t.img, OPS[:2])  # whole and partial clusters over data
    t.ops = OPS[:2]
    apply_qemu(t.qcow2, OPS[:2])
    assert read_all(t.img) == t.expected()
    untouched_clusters = sorted(set(range(CLUSTERS)) - {1, 2, 3, 5})
    with untouched(t.base):
        addcow_cli("stream", t.img)
    content = t.expected()
    with open(t.raw, "rb") as f:
        assert f.read(SIZE) == content
    t.compare("streamed")
    for c in untouched_clusters:
        # whole 4 KiB blocks inside the disk (the block holding its end also holds
        # the old bytes past it, which are not part of the disk)
        lo, hi = c * C, min((c + 1) * C, SIZE & ~4095)
        assert data_blocks(t.raw, lo, hi) == nonzero_blocks(content, lo, hi), f"cluster {c}"
    qemu_img("convert", "-O", "raw", t.qcow2, tmp_path / "qemu.raw")
    assert data_blocks(t.raw, 0, SIZE & ~4095) <= data_blocks(tmp_path / "qemu.raw", 0, SIZE) | {
        pos for c in (1, 2, 3, 5) for pos in range(c * C, (c + 1) * C, 4096)
    }


def test_stream_never_touches_allocated_clusters(twin: Twin) -> None:
    """Allocated clusters keep their image-file bytes and holes, whatever the backing holds."""
    before = twin.raw.read_bytes()
    holes_before = {c: data_blocks(twin.raw, c * C, (c + 1) * C) for c in ALLOCATED}
    assert holes_before[7] == set() and holes_before[9] == set()  # zeroed / discarded
    addcow_cli("stream", twin.img)
    after = twin.raw.read_bytes()
    for c in ALLOCATED:
        lo, hi = c * C, min((c + 1) * C, SIZE)
        assert after[lo:hi] == before[lo:hi], f"allocated cluster {c} was rewritten"
        assert data_blocks(twin.raw, lo, hi) == holes_before[c], f"cluster {c} reallocated"
    for c in set(range(CLUSTERS)) - ALLOCATED:
        lo, hi = c * C, min((c + 1) * C, SIZE)
        assert after[lo:hi] == twin.expected()[lo:hi], f"cluster {c}"


def test_stream_in_several_threads_gives_the_same_image(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans of two clusters handed to three threads: the same bytes, holes and bits."""
    monkeypatch.setattr(lifecycle, "STREAM_SPAN", 2 * C)
    monkeypatch.setattr(streaming, "COMMIT_BYTES", 3 * C)  # flushes while others copy
    with addcow.open(twin.img) as img:
        missing = img.unallocated_bytes
        stats = lifecycle.stream(img, threads=3)
        assert img.complete
    content = twin.expected()
    assert read_all(twin.img) == content
    with open(twin.raw, "rb") as f:
        assert f.read(SIZE) == content
    assert stats.total == missing == (CLUSTERS - len(ALLOCATED)) * C
    twin.compare("threads")


def test_stream_starts_writeback_in_file_order_from_a_thread_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans of one cluster copied by four threads: writeback is started for each
    written span once, in file order, and never by a copying thread (a busy disk
    must not hold up the copy)."""
    size = 64 * C
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(7).randbytes(size))
    img = tmp_path / "w.add-cow"
    addcow.create(img, image_file="w.raw", backing_file=base, backing_format="raw")
    monkeypatch.setattr(lifecycle, "STREAM_SPAN", C)
    hinted: list[tuple[int, int, str]] = []
    real = sysio.start_writeback

    def start_writeback(fd: int, offset: int, length: int) -> None:
        hinted.append((offset, length, threading.current_thread().name))
        real(fd, offset, length)

    monkeypatch.setattr(sysio, "start_writeback", start_writeback)
    with addcow.open(img) as image:
        lifecycle.stream(image, threads=4)
        assert image.complete
    assert [(offset, length) for offset, length, _ in hinted] == [
        (n * C, C) for n in range(64)
    ]
    assert {name for _, _, name in hinted} == {"addcow-writeback"}
    with addcow.open(img, readonly=True) as image:
        assert image.read(0, size) == base.read_bytes()


def test_stream_whose_thread_cannot_start_joins_those_that_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copying thread that cannot start (the process is out of threads): the error
    is raised, the writeback thread and the copiers already started are joined (none
    is left waiting), and a rerun completes the image."""
    size = 8 * C
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(8).randbytes(size))
    img = tmp_path / "t.add-cow"
    addcow.create(img, image_file="t.raw", backing_file=base, backing_format="raw")
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "addcow-stream-2":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    before = set(threading.enumerate())
    with addcow.open(img) as image:
        with pytest.raises(RuntimeError, match="can't start new thread"):
            lifecycle.stream(image, threads=3)
        monkeypatch.undo()
        assert set(threading.enumerate()) == before
        lifecycle.stream(image)
        assert image.complete
        assert image.read(0, size) == base.read_bytes()


def test_stream_error_in_a_helper_thread_is_raised_and_leaves_the_image_consistent(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifecycle, "STREAM_SPAN", C)
    content = twin.expected()
    with addcow.open(twin.img) as img:
        real = img.populate
        failed = threading.Event()

        def populate(offset: int, length: int, buffer: bytearray | None = None) -> tuple[int, int]:
            if threading.current_thread() is not threading.main_thread():
                failed.set()
                raise AddCowIOError(f"{img.image_path}: write: [Errno 5] injected")
            assert failed.wait(10)  # the helper fails first; this span still completes
            return real(offset, length, buffer)

        monkeypatch.setattr(img, "populate", populate)
        with pytest.raises(AddCowIOError, match="injected"):
            lifecycle.stream(img, threads=2)
        monkeypatch.undo()
        assert img.read(0, SIZE) == content
    assert read_all(twin.img) == content  # reopened: what reached the disk reads right
    addcow_cli("stream", twin.img)
    assert read_all(twin.img) == content
    twin.compare("resumed")


def _has_data_at(path: Path, offset: int) -> bool:
    """True if the file holds data (not a hole) at ``offset``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: no data from offset on
        return False
    finally:
        os.close(fd)


def test_stream_ctrl_c_stops_every_thread_promptly_and_resumes(tmp_path: Path) -> None:
    """SIGINT while two threads sit in the rate limit: exit 130 at once, then resume."""
    size = 16 * C
    base = tmp_path / "big.raw"
    base.write_bytes(random.Random(5).randbytes(size))
    img = tmp_path / "big.add-cow"
    addcow.create(img, image_file="big-img.raw", backing_file=base, backing_format="raw")
    # At 4 KiB/s each thread copies one cluster (the smallest span), then waits
    # many seconds for the rate.
    proc = popen_interruptible(
        [sys.executable, "-m", "addcow", "stream", "--rate", "4K", str(img)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    raw = tmp_path / "big-img.raw"
    deadline = time.monotonic() + 30
    while not all(_has_data_at(raw, n * C) for n in (0, 1)):
        assert time.monotonic() < deadline and proc.poll() is None, "the spans were not copied"
        time.sleep(0.02)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5, "Ctrl-C waited for the rate limit"
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "addcow: interrupted"
    assert "Traceback" not in err
    with addcow.open(img, readonly=True) as image:
        assert 0 < image.allocated_clusters < image.total_clusters
        assert image.read(0, size) == base.read_bytes()
    addcow_cli("stream", img)
    with addcow.open(img, readonly=True) as image:
        assert image.complete
        assert image.read(0, size) == base.read_bytes()


def test_stream_zero_fills_past_the_backing_end(tmp_path: Path) -> None:
    """A disk larger than its backing (byte-odd end): bytes past the backing's end are
    zero in the raw file, and the backing's own last partial block is copied exactly."""
    base = tmp_path / "base.raw"
    content = build_base(base, {0: 0xC0, 1: 0xC1}, 2 * C + 777)
    size = 5 * C + 4321
    raw = tmp_path / "big.raw"
    img = tmp_path / "big.add-cow"
    addcow.create(img, image_file="big.raw", backing_file="base.raw",
                  backing_format="raw", size=size)
    stale_bytes(raw, size, 0x5A)
    with untouched(base):
        addcow_cli("stream", img)
    assert raw.read_bytes() == content + bytes(size - len(content))
    assert os.path.getsize(raw) == size
    assert specific(img)["complete"] is True


def test_stream_summary_line_and_progress(tmp_path: Path) -> None:
    t = make_twin(tmp_path, ops=[])
    proc = addcow_cli("stream", "-p", t.img)
    # copied: clusters 0, 1, 4, 7, 9 (5 x 64 KiB), half of 5, the backing's last
    # 1000 bytes = 361448 bytes; left as zero: the other 568856 of the 930304
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"streamed {re.escape(str(t.img))}: 353 KiB copied, 556 KiB left as zero, "
        r"\d+\.\d\d s",
        line,
    ), proc.stderr
    assert "stream" in proc.stderr and "100%" in proc.stderr  # the -p progress bar
    (tmp_path / "quiet").mkdir()
    quiet = make_twin(tmp_path / "quiet", ops=[])
    proc = addcow_cli("stream", "-q", quiet.img)
    assert proc.stderr == "" and proc.stdout == ""
    # a second stream of a complete image has nothing to do
    proc = addcow_cli("stream", t.img)
    assert re.fullmatch(
        rf"streamed {re.escape(str(t.img))}: 0 B copied, 0 B left as zero, \d+\.\d\d s\n",
        proc.stderr,
    ), proc.stderr


def test_stream_rate_limits_roughly(tmp_path: Path) -> None:
    size = 8 << 20
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(size))
    for name in ("fast", "slow"):
        addcow.create(tmp_path / f"{name}.add-cow", image_file=f"{name}.raw",
                      backing_file="base.raw", backing_format="raw")

    def seconds(proc: subprocess.CompletedProcess[str]) -> float:
        found = re.search(r"(\d+\.\d\d) s$", proc.stderr.strip())
        assert found, proc.stderr
        return float(found.group(1))

    fast = seconds(addcow_cli("stream", tmp_path / "fast.add-cow"))
    started = time.monotonic()
    slow = seconds(addcow_cli("stream", "--rate", "4M", tmp_path / "slow.add-cow"))
    wall = time.monotonic() - started
    # 8 MiB at 4 MiB/s: about 2 s
    assert 1.8 <= slow <= 5.0, slow
    assert wall >= slow
    assert fast < slow / 2
    assert (tmp_path / "slow.raw").read_bytes() == base.read_bytes()


def test_stream_rate_counts_only_the_bytes_read_from_the_backing(tmp_path: Path) -> None:
    """32 MiB, of which 512 KiB of data: at 512 KiB/s about 1 s (the holes cost
    nothing), where counting the whole disk would take 64 s."""
    size, piece = 32 << 20, 128 << 10
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
        for at in (0, 5 << 20, 17 << 20, size - piece):
            f.seek(at)
            f.write(random.Random(at).randbytes(piece))
    addcow.create(tmp_path / "d.add-cow", image_file="d.raw", backing_file="base.raw",
                  backing_format="raw")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "addcow", "stream", "--rate", "512K", str(tmp_path / "d.add-cow")],
        capture_output=True, text=True, timeout=15, check=True,
    )  # fmt: skip
    found = re.search(r": 512 KiB copied, 31.5 MiB left as zero, (\d+\.\d\d) s$",
                      proc.stderr.strip())  # fmt: skip
    assert found, proc.stderr
    assert 0.7 <= float(found.group(1)) <= 6.0, proc.stderr  # the data still keeps the rate
    assert (tmp_path / "d.raw").read_bytes() == base.read_bytes()


# -- detach ------------------------------------------------------------------------


def test_detach_refuses_an_incomplete_image(twin: Twin) -> None:
    with untouched(twin.base, twin.img, twin.raw):
        err = fails("detach", twin.img)
    missing = CLUSTERS - len(ALLOCATED)
    assert (
        f"{twin.img}: {missing} of {CLUSTERS} clusters are still in the backing file; "
        f"run 'addcow stream {twin.img}' first" in err
    )
    with untouched(twin.base, twin.img, twin.raw):
        err = fails("detach", "--dry-run", twin.img)
    assert f"{missing} of {CLUSTERS} clusters" in err and "addcow stream" in err


def test_detach_dry_run_then_detach(twin: Twin) -> None:
    addcow_cli("stream", twin.img)
    with untouched(twin.base, twin.img, twin.raw):
        proc = addcow_cli("detach", "--dry-run", twin.img)
    assert proc.stdout == f"{twin.img} is complete; detach would leave the raw disk {twin.raw}\n"
    assert twin.img.exists()
    with untouched(twin.base):
        proc = addcow_cli("detach", twin.img)
    assert proc.stdout == f"{twin.raw}\n"
    assert not twin.img.exists()
    assert sorted(p.name for p in twin.img.parent.iterdir()) == ["base.raw", "d.raw"]
    assert twin.raw.read_bytes() == twin.expected()
    qemu_compare(twin.raw, "raw", twin.qcow2, "qcow2")


def test_detach_with_a_relative_path_prints_the_raw_file(twin: Twin) -> None:
    addcow_cli("stream", twin.img)
    proc = addcow_cli("detach", "d.add-cow", cwd=twin.img.parent)
    assert proc.stdout == "d.raw\n"
    assert not twin.img.exists()


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
def test_detach_refuses_an_image_in_use(twin: Twin, readonly: bool) -> None:
    addcow_cli("stream", twin.img)
    with held(twin.img, readonly=readonly), untouched(twin.img, twin.raw):
        err = fails("detach", twin.img)
    assert f"{twin.img}: failed to get write lock: {LOCKED}" in err
    assert twin.img.exists()


def test_detach_of_an_image_file_longer_than_the_disk(tmp_path: Path) -> None:
    """An image created over a longer existing raw file (its old bytes past the disk's
    end are never read): the standalone disk left by detach is the virtual disk, of
    the virtual size, not the longer file with old bytes at its end."""
    t = make_twin(tmp_path, ops=[])
    t.img.unlink()
    t.raw.unlink()
    addcow.create(t.img, image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=SIZE)
    stale_bytes(t.raw, SIZE + 3 * C)
    apply_addcow(t.img, OPS)
    apply_qemu(t.qcow2, OPS)
    t.ops = list(OPS)
    addcow_cli("stream", t.img)
    assert read_all(t.img) == t.expected()
    with untouched(t.base):
        proc = addcow_cli("detach", t.img)
    assert proc.stdout == f"{t.raw}\n"
    qemu_compare(t.raw, "raw", t.qcow2, "qcow2")
    assert os.path.getsize(t.raw) == SIZE
    assert t.raw.read_bytes() == t.expected()


def test_detach_keeps_the_backing_with_keep_backing(twin: Twin) -> None:
    """``addcow detach --keep-backing``: the image file becomes the disk, the backing
    file stays as it was."""
    addcow_cli("stream", twin.img)
    with untouched(twin.base):
        proc = addcow_cli("detach", "--keep-backing", twin.img)
    assert proc.stdout == f"{twin.raw}\n"
    assert not twin.img.exists()
    assert twin.raw.read_bytes() == twin.expected()


def test_version_1_image_after_stream_needs_no_backing(twin: Twin) -> None:
    """Version 1 has no ALL_ALLOCATED flag: a full bitmap is what says the image is
    complete. The stream's promise still holds: once complete, the image opens and
    reads (and detaches) with the backing file deleted."""
    addcow_cli("amend", "-o", "compat=1", twin.img)
    with untouched(twin.base):
        addcow_cli("stream", twin.img)
    data = specific(twin.img)
    assert data["version"] == 1 and data["complete"] is True
    assert twin.raw.read_bytes() == twin.expected()
    twin.base.unlink()
    assert read_all(twin.img) == twin.expected()
    proc = addcow_cli("detach", twin.img)
    assert proc.stdout == f"{twin.raw}\n"
    assert not twin.img.exists()


def test_detach_refuses_while_qemu_writes_the_image_file(twin: Twin) -> None:
    addcow_cli("stream", twin.img)
    with qemu_io_holding(twin.raw), untouched(twin.img):
        err = fails("detach", twin.img)
    assert f"{twin.raw}: failed to get " in err and "lock" in err
    assert twin.img.exists()


# -- commit ------------------------------------------------------------------------


def test_commit_matches_qemu_commit(twin: Twin) -> None:
    before = read_all(twin.img)
    bits = bitmap_bits(twin.img)
    proc = addcow_cli("commit", twin.img)
    assert proc.stdout == "Image committed.\n"
    qemu_img("commit", "-q", twin.qcow2)
    # the backing now holds the combined content, grown to the disk's size
    assert os.path.getsize(twin.base) == os.path.getsize(twin.qbase) == SIZE
    qemu_compare(twin.base, "raw", twin.qbase, "raw")
    assert twin.base.read_bytes() == twin.expected()
    # the add-cow stays valid and unchanged
    assert read_all(twin.img) == before
    assert bitmap_bits(twin.img) == bits
    twin.compare("after-commit")


def test_commit_starts_writeback_of_everything_it_copies(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writeback is started after every cluster committed (a hint: flush makes it
    durable): the hints cover the copied runs, and the result is qemu-img's."""
    monkeypatch.setattr(lifecycle, "WRITEBACK_BYTES", C)
    hinted: list[tuple[int, int]] = []
    real = sysio.start_writeback

    def start_writeback(fd: int, offset: int, length: int) -> None:
        hinted.append((offset, offset + length))
        real(fd, offset, length)

    monkeypatch.setattr(sysio, "start_writeback", start_writeback)
    with AddCowImage.open(twin.img, readonly=True, with_backing=False) as img:
        committed = lifecycle.commit(img)
        copied = [
            (start, stop)
            for first, end, allocated in img.bitmap.runs(0, img.total_clusters)
            if allocated
            for start, stop, data in sysio.data_runs(
                img.image_fd, first * C, min(end * C, SIZE)
            )
            if data
        ]
    assert committed and hinted
    # every copied run is hinted, but for less than WRITEBACK_BYTES after the last hint
    last = max(hi for _lo, hi in hinted)
    for start, stop in copied:
        if stop <= last:
            assert any(lo <= start and stop <= hi for lo, hi in hinted), (start, stop, hinted)
    assert sum(stop - start for start, stop in copied if stop > last) < C
    qemu_img("commit", "-q", twin.qcow2)
    qemu_compare(twin.base, "raw", twin.qbase, "raw")
    assert twin.base.read_bytes() == twin.expected()


def test_commit_into_a_longer_backing_keeps_its_tail(tmp_path: Path) -> None:
    """A disk smaller than its backing: the backing keeps its size and its tail."""
    t = make_twin(tmp_path, size=6 * C + 512, ops=[OPS[0], OPS[2], ("write", 6 * C, 512, 0xB6)])
    addcow_cli("commit", t.img)
    qemu_img("commit", "-q", t.qcow2)
    assert os.path.getsize(t.base) == os.path.getsize(t.qbase) == BASE_SIZE
    qemu_compare(t.base, "raw", t.qbase, "raw")
    expected = t.expected() + t.base_content[6 * C + 512 :]
    assert t.base.read_bytes() == expected


def test_commit_of_a_complete_image(twin: Twin) -> None:
    addcow_cli("stream", twin.img)
    addcow_cli("commit", twin.img)
    qemu_img("commit", "-q", twin.qcow2)
    qemu_compare(twin.base, "raw", twin.qbase, "raw")
    assert twin.base.read_bytes() == twin.expected()


def test_commit_without_backing_fails(tmp_path: Path) -> None:
    img = tmp_path / "solo.add-cow"
    addcow_cli("create", "-o", "image_file=solo.raw", img, "1M")
    with untouched(img, tmp_path / "solo.raw"):
        err = fails("commit", img)
    assert f"{img}: the image has no backing file to commit into" in err


def test_commit_refuses_an_image_in_use(twin: Twin) -> None:
    with held(twin.img), untouched(twin.base, twin.img, twin.raw):
        err = fails("commit", twin.img)
    assert f"{twin.img}: failed to get read lock: {LOCKED}" in err


def test_commit_refuses_a_backing_in_use(twin: Twin) -> None:
    """Another image reads the same backing: commit must not change it under that user."""
    other = twin.root / "a" / "other.add-cow"
    addcow.create(other, image_file="other.raw", backing_file="base.raw", backing_format="raw")
    with held(other), untouched(twin.base):
        err = fails("commit", twin.img)
    assert f'{twin.base}: failed to get "write" lock: another process' in err


def test_commit_refuses_a_backing_qemu_is_writing(twin: Twin) -> None:
    with qemu_io_holding(twin.base), untouched(twin.base):
        err = fails("commit", twin.img)
    assert f"{twin.base}: failed to get " in err and "lock" in err


def test_stream_refuses_a_backing_qemu_is_writing(twin: Twin) -> None:
    with qemu_io_holding(twin.base), untouched(twin.img, twin.raw):
        err = fails("stream", twin.img)
    assert f'{twin.base}: failed to get shared "write" lock: another process' in err


def clear_v1_no_probe(img: Path) -> None:
    """Make a version 1 header like QEMU's original add-cow wrote it: backing file
    named, BACKING_FORMAT_NO_PROBE (features bit 1, u64 at offset 28) clear."""
    with open(img, "r+b") as f:
        f.seek(28)
        features = int.from_bytes(f.read(8), "little")
        assert features == 0x03
        f.seek(28)
        f.write((0x01).to_bytes(8, "little"))
    assert "backing-filename-format" not in info(img)


def test_commit_of_a_v1_image_without_recorded_format_says_so(twin: Twin) -> None:
    addcow_cli("amend", "-o", "compat=1", twin.img)
    clear_v1_no_probe(twin.img)
    with untouched(twin.base, twin.img, twin.raw):
        err = fails("commit", twin.img)
    assert "no backing file" not in err, err
    assert "format" in err and "not recorded" in err, err
    assert "rebase -u -b base.raw -F raw" in err, err


def test_amend_of_a_v1_image_without_recorded_format_says_how_to_fix(twin: Twin) -> None:
    addcow_cli("amend", "-o", "compat=1", twin.img)
    clear_v1_no_probe(twin.img)
    with untouched(twin.base, twin.img, twin.raw):
        err = fails("amend", "-o", "compat=2", twin.img)
    assert (
        f"{twin.img}: the backing format is not recorded; record it first with "
        f"'addcow rebase -u -b base.raw -F raw {twin.img}'" in err
    )
    with untouched(twin.base, twin.raw):
        addcow_cli("rebase", "-u", "-b", "base.raw", "-F", "raw", twin.img)
        addcow_cli("amend", "-o", "compat=2", twin.img)
    assert specific(twin.img)["version"] == 2
    assert info(twin.img)["backing-filename-format"] == "raw"
    twin.compare()


# -- rebase ------------------------------------------------------------------------

NEW_LAYOUT: dict[int, object] = {
    0: 0xA0,  # same as the old backing
    1: 0xD1,  # different, but cluster 1 is allocated anyway
    2: 0xD2,  # data where the old backing has a hole
    3: ZERO,  # same (zero) as the old one
    4: 0xA4,
    5: 0xD5,
    6: HOLE,  # same hole
    7: 0xD7,
    8: 0xD8,  # data where the old has zero bytes
    9: 0xA9,
    10: 0xAA,
    11: 0xDB,  # past the old backing's end
    12: 0xDC,
    13: 0xDD,
}


SHORT_LAYOUT: dict[int, object] = {**NEW_LAYOUT, 0: HOLE}


@pytest.mark.parametrize(
    ("layout", "new_size", "copied"),
    [(NEW_LAYOUT, 13 * C + 2000, {8, 11, 13}), (SHORT_LAYOUT, 8 * C + 3000, {0, 8})],
    ids=["longer", "shorter"],
)
def test_rebase_safe_matches_qemu(
    twin: Twin, layout: dict[int, object], new_size: int, copied: set[int]
) -> None:
    """Safe rebase onto new.raw (``=`` same content as base.raw, ``#`` different)::

        cluster    0   1   2   3   4   5   6   7   8   9   10  11  12  13  14
        base.raw   A   B   .   0   C   D/0 .   E   0   F   G|  -   -   -   -
        longer     =   #   #   =   =   #   =   #   #   =   =   #   #   #|  -
        shorter    .   #   #   =   =   #   =   #   #|  -   -   -   -   -   -
        overlay    .   x   x   x   x   x   .   x   .   x   x   .   x   .   x
        copied     the unallocated clusters that differ: longer 8, 11, 13 (data
                   past the old end); shorter 0 (data over a hole), 8

    The image's content must not change, and the clusters copied into it must be
    those, which are also the ones qemu-img rebase allocates in the qcow2.
    """
    build_base(twin.root / "a" / "new.raw", layout, new_size)
    build_base(twin.root / "q" / "new.raw", layout, new_size)
    new = twin.root / "a" / "new.raw"
    with untouched(twin.base, new):
        addcow_cli("rebase", "-b", "new.raw", "-F", "raw", twin.img)
    qemu_img("rebase", "-f", "qcow2", "-b", "new.raw", "-F", "raw", twin.qcow2)
    meta = info(twin.img)
    assert meta["backing-filename"] == "new.raw"
    assert meta["backing-filename-format"] == "raw"
    twin.compare(f"rebased-{new_size}")
    assert bitmap_bits(twin.img) == ALLOCATED | copied
    assert qemu_allocated(twin.qcow2) == ALLOCATED | copied
    # the old backing is no longer needed
    twin.base.unlink()
    assert read_all(twin.img) == twin.expected()


def test_rebase_to_no_backing_matches_qemu(twin: Twin) -> None:
    with untouched(twin.base):
        addcow_cli("rebase", "-b", "", twin.img)
    qemu_img("rebase", "-f", "qcow2", "-b", "", twin.qcow2)
    assert "backing-filename" not in info(twin.img)
    twin.base.unlink()
    twin.compare("standalone")
    # only cluster 0 read non-zero from the backing and was unallocated
    assert bitmap_bits(twin.img) == qemu_allocated(twin.qcow2) == ALLOCATED | {0}


def test_rebase_unsafe_only_changes_the_name_like_qemu(twin: Twin) -> None:
    new_size = 13 * C + 2000
    build_base(twin.root / "a" / "new.raw", NEW_LAYOUT, new_size)
    new_content = build_base(twin.root / "q" / "new.raw", NEW_LAYOUT, new_size)
    old = twin.expected()
    raw_before = file_sha(twin.raw)
    bits = bitmap_bits(twin.img)
    with untouched(twin.base, twin.root / "a" / "new.raw"):
        addcow_cli("rebase", "-u", "-b", "new.raw", "-F", "raw", twin.img)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "new.raw", "-F", "raw", twin.qcow2)
    assert file_sha(twin.raw) == raw_before
    assert bitmap_bits(twin.img) == bits
    assert info(twin.img)["backing-filename"] == "new.raw"
    out = to_raw(twin.img, twin.root / "unsafe.raw")
    qemu_compare(out, "raw", twin.qcow2, "qcow2")
    # allocated clusters as before, the others now show the new backing
    padded = new_content[:SIZE] + bytes(max(0, SIZE - len(new_content)))
    expected = b"".join(
        (old if c in ALLOCATED else padded)[c * C : (c + 1) * C] for c in range(CLUSTERS)
    )
    assert out.read_bytes() == expected != old


def test_rebase_unsafe_after_moving_the_backing(twin: Twin) -> None:
    (twin.root / "a" / "sub").mkdir()
    moved = twin.root / "a" / "sub" / "moved.raw"
    os.rename(twin.base, moved)
    err = fails("convert", twin.img, twin.root / "x.raw")
    assert "base.raw" in err and "cannot open backing file" in err
    with untouched(moved):
        addcow_cli("rebase", "-u", "-b", "sub/moved.raw", "-F", "raw", twin.img)
    assert info(twin.img)["backing-filename"] == "sub/moved.raw"
    twin.compare("moved")


def test_rebase_onto_its_own_image_file_is_a_loop(twin: Twin) -> None:
    for unsafe in ([], ["-u"]):
        with untouched(twin.img, twin.raw, twin.base):
            err = fails("rebase", *unsafe, "-b", "d.raw", "-F", "raw", twin.img)
        assert "d.raw: the file is already used as" in err
        assert "a backing chain must not loop" in err
    assert info(twin.img)["backing-filename"] == "base.raw"
    twin.compare()


def test_rebase_onto_its_own_add_cow_file_is_a_loop(twin: Twin) -> None:
    with untouched(twin.img, twin.raw):
        err = fails("rebase", "-u", "-b", "d.add-cow", "-F", "add-cow", twin.img)
    assert "d.add-cow: the file is already used as" in err and "must not loop" in err


def test_rebase_onto_an_image_backed_by_this_one_is_a_loop(twin: Twin) -> None:
    top = twin.root / "a" / "top.add-cow"
    addcow_cli("create", "-b", "d.add-cow", "-F", "add-cow", "-o", "image_file=top.raw", top)
    for unsafe in ([], ["-u"]):
        with untouched(twin.img, twin.raw, twin.base, top):
            err = fails("rebase", *unsafe, "-b", "top.add-cow", "-F", "add-cow", twin.img)
        assert "d.add-cow: the file is already used as" in err, err
        assert "a backing chain must not loop" in err
    assert info(twin.img)["backing-filename"] == "base.raw"
    assert read_all(top) == twin.expected()


def test_rebase_onto_the_same_image_file_under_another_name_is_a_loop(twin: Twin) -> None:
    """Through a symlink, or through another add-cow whose image file is d.raw."""
    (twin.root / "a" / "link.raw").symlink_to("d.raw")
    shared = twin.root / "a" / "shared.add-cow"
    addcow.create(shared, image_file="s.raw", size=SIZE)
    # create refuses to give d.raw a second image: name it in the header by hand
    with open(shared, "r+b") as f:
        header = Header.unpack(f.read(4096))
        f.seek(0)
        f.write(header._replace(image_name=b"d.raw").pack())
    for name, fmt in (("link.raw", "raw"), ("shared.add-cow", "add-cow")):
        for unsafe in ([], ["-u"]):
            with untouched(twin.img, twin.raw):
                err = fails("rebase", *unsafe, "-b", name, "-F", fmt, twin.img)
            assert "already used as" in err and "must not loop" in err, err
    twin.compare()


def test_rebase_names_are_relative_to_the_image_not_the_cwd(twin: Twin) -> None:
    build_base(twin.root / "a" / "new.raw", NEW_LAYOUT, 13 * C + 2000)
    build_base(twin.root / "q" / "new.raw", NEW_LAYOUT, 13 * C + 2000)
    addcow_cli("rebase", "-b", "new.raw", "-F", "raw", "a/d.add-cow", cwd=twin.root)
    qemu_img("rebase", "-f", "qcow2", "-b", "new.raw", "-F", "raw", twin.qcow2)
    assert info(twin.img)["full-backing-filename"] == str(twin.root / "a" / "new.raw")
    twin.compare()


def test_rebase_onto_a_qcow2_looking_file_needs_the_format(twin: Twin) -> None:
    """A raw file starting with the qcow2 magic: never guessed as raw."""
    fake = twin.root / "a" / "looks.raw"
    fake.write_bytes(b"QFI\xfb" + bytes(SIZE - 4))
    for unsafe in ([], ["-u"]):
        with untouched(twin.img, twin.raw, fake):
            err = fails("rebase", *unsafe, "-b", "looks.raw", twin.img)
        assert "looks.raw: the backing file starts with a qcow2 header; refusing to guess" in err
        assert err.endswith("if it is a qcow2 image, give -F qcow2\n")
    # not even as raw when asked: a raw disk that starts with an image header is bogus
    for unsafe in ([], ["-u"]):
        with untouched(twin.img, twin.raw, fake):
            err = fails("rebase", *unsafe, "-b", "looks.raw", "-F", "raw", twin.img)
        assert err.strip().endswith(
            "looks.raw starts with a qcow2 header; refusing to record it as raw "
            "(a raw disk must not start with an image header)"
        )
    assert info(twin.img)["backing-filename"] == "base.raw"
    twin.compare()


def test_rebase_never_records_raw_for_a_real_image(twin: Twin) -> None:
    """qemu-img's own qcow2 and an add-cow image, offered as raw backing files."""
    qemu_img("create", "-q", "-f", "qcow2", twin.root / "a" / "new.qcow2", str(SIZE))
    addcow.create(twin.root / "a" / "new.add-cow", image_file="new-data.raw", size=SIZE)
    for name, fmt in (("new.qcow2", "a qcow2"), ("new.add-cow", "an add-cow")):
        for unsafe in ([], ["-u"]):
            with untouched(twin.img, twin.raw):
                err = fails("rebase", *unsafe, "-b", name, "-F", "raw", twin.img)
            assert f"{name} starts with {fmt} header; refusing to record it as raw" in err
        with addcow.open(twin.img) as image, pytest.raises(addcow.AddCowError,
                                                           match="refusing to record it as raw"):
            image.set_backing(name, "raw")
    assert info(twin.img)["backing-filename"] == "base.raw"
    twin.compare()


def test_rebase_onto_a_missing_file_fails(twin: Twin) -> None:
    with untouched(twin.img, twin.raw):
        err = fails("rebase", "-u", "-b", "nowhere.raw", "-F", "raw", twin.img)
    assert "nowhere.raw" in err and "No such file" in err
    err = fails("rebase", "-b", "", "-F", "raw", twin.img)
    assert "-F needs a backing file (-b)" in err


def test_rebase_version_1_cannot_record_an_add_cow_backing(twin: Twin) -> None:
    addcow_cli("amend", "-o", "compat=1", twin.img)
    other = twin.root / "a" / "other.add-cow"
    addcow.create(other, image_file="other.raw", backing_file="base.raw", backing_format="raw")
    with untouched(twin.img, twin.raw, other):
        err = fails("rebase", "-u", "-b", "other.add-cow", "-F", "add-cow", twin.img)
    assert "a version 1 image can only record a raw backing file, not 'add-cow'" in err


def test_rebase_to_no_backing_then_stream_and_detach(twin: Twin) -> None:
    addcow_cli("rebase", "-b", "", twin.img)
    twin.base.unlink()
    addcow_cli("stream", twin.img)
    assert specific(twin.img)["complete"] is True
    addcow_cli("detach", twin.img)
    assert twin.raw.read_bytes() == twin.expected()


# -- resize ------------------------------------------------------------------------


def test_resize_grow_shrink_grow_matches_qemu(twin: Twin) -> None:
    steps = [
        ("+", 3 * C + 1536, False),  # grow by an odd (sector) amount
        ("", 6 * C + 2560, True),  # shrink into the middle of cluster 6 (below the backing)
        ("", 12 * C + 512, False),  # grow again: the dropped tail and the backing must not show
    ]
    size = SIZE
    for n, (sign, amount, shrink) in enumerate(steps):
        arg = f"{sign}{amount}"
        flags = ["--shrink"] if shrink else []
        with untouched(twin.base):
            proc = addcow_cli("resize", *flags, twin.img, arg)
        assert proc.stdout == "Image resized.\n"
        qemu_img("resize", "-q", *flags, "-f", "qcow2", twin.qcow2, arg)
        size = size + amount if sign == "+" else amount
        twin.ops.append(("resize", size, 0, 0))
        twin.size = size
        assert info(twin.img)["virtual-size"] == size
        assert os.path.getsize(twin.raw) == size
        out = to_raw(twin.img, twin.root / f"step{n}.raw")
        qemu_compare(out, "raw", twin.qcow2, "qcow2")
        assert out.read_bytes() == resized_model(twin)


def resized_model(t: Twin) -> bytes:
    """Model with resizes: a grown area reads zero, a dropped tail is gone."""
    disk = bytearray(model(t.base_content, SIZE, [op for op in t.ops if op[0] != "resize"]))
    for kind, offset, _, _ in t.ops:
        if kind == "resize":
            disk = disk[:offset] + bytes(max(0, offset - len(disk)))
    return bytes(disk)


def test_resize_grow_over_a_longer_backing_reads_zero(tmp_path: Path) -> None:
    t = make_twin(tmp_path, size=4 * C + 1536, ops=[("write", 2 * C + 100, 5000, 0xB2)])
    with untouched(t.base):
        addcow_cli("resize", t.img, str(12 * C))
    qemu_img("resize", "-q", "-f", "qcow2", t.qcow2, str(12 * C))
    out = to_raw(t.img, tmp_path / "grown.raw")
    qemu_compare(out, "raw", t.qcow2, "qcow2")
    expected = model(t.base_content, 4 * C + 1536, t.ops) + bytes(12 * C - (4 * C + 1536))
    assert out.read_bytes() == expected


def test_resize_shrink_needs_the_flag(twin: Twin) -> None:
    with untouched(twin.img, twin.raw, twin.base):
        err = fails("resize", twin.img, str(4 * C))
    assert (
        f"{twin.img}: shrinking from {SIZE} to {4 * C} bytes discards the end of the disk; "
        "use --shrink" in err
    )
    with untouched(twin.img, twin.raw, twin.base):
        err = fails("resize", twin.img, "-4096")
    assert f"shrinking from {SIZE} to {SIZE - 4096} bytes" in err
    assert info(twin.img)["virtual-size"] == SIZE
    twin.compare()


def test_resize_version_1_matches_qemu(twin: Twin) -> None:
    """A version 1 image's size is its image file's size: grow, then shrink."""
    addcow_cli("amend", "-o", "compat=1", twin.img)
    # (the qcow2 stays compat=1.1: a compat=0.10 qcow2 cannot zero the grown area)
    size = SIZE
    for n, (arg, flags) in enumerate([("+70144", []), (str(5 * C + 1024), ["--shrink"]),
                                      (str(11 * C), [])]):
        with untouched(twin.base):
            addcow_cli("resize", *flags, twin.img, arg)
        qemu_img("resize", "-q", *flags, "-f", "qcow2", twin.qcow2, arg)
        size = size + 70144 if arg.startswith("+") else int(arg)
        twin.ops.append(("resize", size, 0, 0))
        assert os.path.getsize(twin.raw) == size
        assert specific(twin.img)["version"] == 1
        out = to_raw(twin.img, twin.root / f"v1-{n}.raw")
        qemu_compare(out, "raw", twin.qcow2, "qcow2")
        assert out.read_bytes() == resized_model(twin)


def test_resize_shrink_into_an_allocated_cluster_then_grow(twin: Twin) -> None:
    for n, (arg, flags) in enumerate([(str(5 * C + 2560), ["--shrink"]), (str(8 * C), [])]):
        addcow_cli("resize", *flags, twin.img, arg)
        qemu_img("resize", "-q", *flags, "-f", "qcow2", twin.qcow2, arg)
        twin.ops.append(("resize", int(arg), 0, 0))
        out = to_raw(twin.img, twin.root / f"s{n}.raw")
        qemu_compare(out, "raw", twin.qcow2, "qcow2")
        assert out.read_bytes() == resized_model(twin)


def test_resize_grow_hides_old_bytes_past_the_end(tmp_path: Path) -> None:
    """An image file longer than the disk, holding old bytes there: growing the disk
    must show zeros, not those bytes (in the last, partial cluster and beyond)."""
    t = make_twin(tmp_path, ops=[])
    t.img.unlink()
    t.raw.unlink()
    addcow.create(t.img, image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=SIZE)
    stale_bytes(t.raw, SIZE + 3 * C)
    apply_addcow(t.img, OPS)
    apply_qemu(t.qcow2, OPS)
    t.ops = list(OPS)
    with untouched(t.base):
        addcow_cli("resize", t.img, "+2M")
    qemu_img("resize", "-q", "-f", "qcow2", t.qcow2, "+2M")
    t.ops.append(("resize", SIZE + (2 << 20), 0, 0))
    out = to_raw(t.img, tmp_path / "grown.raw")
    qemu_compare(out, "raw", t.qcow2, "qcow2")
    assert out.read_bytes() == resized_model(t)


def test_resize_of_a_complete_image_keeps_it_complete(twin: Twin) -> None:
    addcow_cli("stream", twin.img)
    twin.base.unlink()
    addcow_cli("resize", twin.img, "+1M")
    qemu_img("resize", "-q", "-f", "qcow2", twin.qcow2, "+1M")
    data = specific(twin.img)
    assert data["complete"] is True and "all_allocated" in data["compatible-features"]  # type: ignore[operator]
    assert read_all(twin.img) == twin.expected() + bytes(1 << 20)
    proc = addcow_cli("detach", twin.img)
    assert proc.stdout == f"{twin.raw}\n"
    assert twin.raw.read_bytes() == twin.expected() + bytes(1 << 20)


def test_resize_refuses_an_image_in_use(twin: Twin) -> None:
    with held(twin.img, readonly=True), untouched(twin.img, twin.raw):
        err = fails("resize", twin.img, "+1M")
    assert f"{twin.img}: failed to get write lock: {LOCKED}" in err


# -- amend -------------------------------------------------------------------------


def test_amend_round_trip_keeps_the_content_like_qemu(twin: Twin) -> None:
    with untouched(twin.base, twin.raw):
        addcow_cli("amend", "-o", "compat=1", twin.img)
    assert specific(twin.img)["version"] == 1
    assert info(twin.img)["virtual-size"] == SIZE
    qemu_img("amend", "-f", "qcow2", "-o", "compat=0.10", twin.qcow2)
    twin.compare("v1")
    with untouched(twin.base, twin.raw):
        addcow_cli("amend", "-o", "compat=2", twin.img)
    data = specific(twin.img)
    assert data["version"] == 2
    assert info(twin.img)["backing-filename-format"] == "raw"
    qemu_img("amend", "-f", "qcow2", "-o", "compat=1.1", twin.qcow2)
    twin.compare("v2")
    assert bitmap_bits(twin.img) == ALLOCATED


def test_amend_to_1_refuses_4k_clusters(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    build_base(base)
    img = tmp_path / "small.add-cow"
    addcow_cli("create", "-b", "base.raw", "-F", "raw",
               "-o", "image_file=small.raw,cluster_size=4k", img)
    with untouched(img, base):
        err = fails("amend", "-o", "compat=1", img)
    assert f"{img}: cannot convert to version 1: cluster size 4096 (version 1 has 65536)" in err
    assert specific(img)["version"] == 2


def test_amend_to_1_refuses_an_add_cow_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    build_base(base)
    addcow_cli("create", "-b", "base.raw", "-F", "raw", "-o", "image_file=mid.raw",
               tmp_path / "mid.add-cow")
    top = tmp_path / "top.add-cow"
    addcow_cli("create", "-b", "mid.add-cow", "-F", "add-cow", "-o", "image_file=top.raw", top)
    with untouched(top, tmp_path / "mid.add-cow", base):
        err = fails("amend", "-o", "compat=1", top)
    assert "cannot convert to version 1: a add-cow backing file (version 1 records raw only)" \
        in err or "cannot convert to version 1: an add-cow backing file" in err
    err = fails("amend", "-o", "compat=3", top)
    assert "invalid compat '3': expected 1 or 2" in err


def test_amend_refuses_an_image_in_use(twin: Twin) -> None:
    with held(twin.img), untouched(twin.img):
        err = fails("amend", "-o", "compat=1", twin.img)
    assert f"{twin.img}: failed to get write lock: {LOCKED}" in err


# -- in use: every command ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "mode"),
    [
        (["stream", "IMG"], "write"),
        (["detach", "IMG"], "write"),
        (["commit", "IMG"], "read"),
        (["rebase", "-b", "base.raw", "-F", "raw", "IMG"], "write"),
        (["rebase", "-u", "-b", "base.raw", "-F", "raw", "IMG"], "write"),
        (["resize", "IMG", "+64k"], "write"),
        (["amend", "-o", "compat=1", "IMG"], "write"),
        (["convert", "IMG", "OUT"], "read"),
    ],
    ids=["stream", "detach", "commit", "rebase", "rebase-u", "resize", "amend", "convert"],
)
def test_every_command_refuses_an_image_in_use(twin: Twin, args: list[str], mode: str) -> None:
    out = twin.root / "out.raw"
    argv = [{"IMG": twin.img, "OUT": out}.get(a, a) for a in args]
    with held(twin.img), untouched(twin.img, twin.raw, twin.base):
        err = fails(*argv)
    assert f"{twin.img}: failed to get {mode} lock: {LOCKED}" in err
    assert not out.exists()
    twin.compare()


# -- chains ------------------------------------------------------------------------

MID_OPS = [("write", 2 * C, C, 0xE2), ("write", 6 * C + 4096, 8192, 0xE6),
           ("write", 11 * C, C, 0xEB)]
TOP_OPS = [("write", 0, C, 0xF0), ("write", 6 * C, 512, 0xF6), ("zero", 8 * C, C, 0)]
# top over mid over base; which layer holds each cluster (2: base.raw)
#   cluster  0  1  2  3  4  5  6  7  8  9  10 11 12 13 14
#   top      W  .  .  .  .  .  w  .  Z  .  .  .  .  .  .
#   mid      .  .  W  .  .  .  w  .  .  .  .  W  .  .  .
#   base     A  B  .  0  C  D/0 .  E  0  F  G| -  -  -  -
CHAIN_DEPTH = {0: 0, 1: 2, 2: 1, 3: 2, 4: 2, 5: 2, 6: 0, 7: 2, 8: 0, 9: 2, 10: 2, 11: 1}


@dataclass
class Chain:
    root: Path
    top: Path
    mid: Path
    base: Path
    qtop: Path
    qmid: Path
    qbase: Path
    base_content: bytes

    def expected(self) -> bytes:
        return model(self.base_content, SIZE, MID_OPS + TOP_OPS)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    """top.add-cow -> mid.add-cow -> base.raw, and the same as qcow2 -> qcow2 -> raw
    (diagram above ``CHAIN_DEPTH``)."""
    a, q = tmp_path / "a", tmp_path / "q"
    a.mkdir()
    q.mkdir()
    content = build_base(a / "base.raw")
    build_base(q / "base.raw")
    addcow_cli("create", "-b", "base.raw", "-F", "raw", "-o", "image_file=mid.raw",
               a / "mid.add-cow", str(SIZE))
    apply_addcow(a / "mid.add-cow", MID_OPS)
    addcow_cli("create", "-b", "mid.add-cow", "-F", "add-cow", "-o", "image_file=top.raw",
               a / "top.add-cow")
    apply_addcow(a / "top.add-cow", TOP_OPS)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             "-o", "cluster_size=64k", q / "mid.qcow2", str(SIZE))
    apply_qemu(q / "mid.qcow2", MID_OPS)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             "-o", "cluster_size=64k", q / "top.qcow2")
    apply_qemu(q / "top.qcow2", TOP_OPS)
    return Chain(tmp_path, a / "top.add-cow", a / "mid.add-cow", a / "base.raw",
                 q / "top.qcow2", q / "mid.qcow2", q / "base.raw", content)


def test_chain_create_needs_the_format(chain: Chain) -> None:
    err = fails("create", "-b", "mid.add-cow", "-o", "image_file=x.raw",
                chain.root / "a" / "x.add-cow")
    assert "starts with an add-cow header" in err
    assert err.endswith("if it is an add-cow image, give -F add-cow\n")
    assert info(chain.top)["virtual-size"] == SIZE
    assert info(chain.top)["backing-filename-format"] == "add-cow"


def test_chain_reads_like_qemu_and_maps_depths(chain: Chain) -> None:
    assert read_all(chain.top) == chain.expected()
    out = to_raw(chain.top, chain.root / "top-out.raw")
    qemu_compare(out, "raw", chain.qtop, "qcow2")
    entries = json.loads(addcow_cli("map", "--output=json", chain.top).stdout)
    assert {e["depth"] for e in entries if e["present"]} == {0, 1, 2}
    # per cluster: the depth of the layer holding it
    seen: dict[int, set[int]] = {}
    for e in entries:
        for c in range(e["start"] // C, -(-(e["start"] + e["length"]) // C)):
            if e["present"]:
                seen.setdefault(c, set()).add(e["depth"])
    assert {c: min(d) for c, d in seen.items()} == CHAIN_DEPTH
    assert entries[0]["start"] == 0
    assert sum(e["length"] for e in entries) == SIZE
    # the same as qemu-img map of the qcow2 chain, where both say present
    qmap = json.loads(qemu_img("map", "--output=json", "-U", chain.qtop).stdout)
    qdepth: dict[int, int] = {}
    for e in qmap:
        if e["present"]:
            for c in range(e["start"] // C, -(-(e["start"] + e["length"]) // C)):
                qdepth.setdefault(c, e["depth"])
    assert qdepth == CHAIN_DEPTH
    for e in entries:
        if e["data"]:
            lo, hi = e["start"], e["start"] + e["length"]
            assert any(q["start"] <= lo and hi <= q["start"] + q["length"] and q["data"]
                       and q["depth"] == e["depth"] for q in qmap), e


def test_chain_stream_copies_from_the_whole_chain(chain: Chain) -> None:
    with untouched(chain.mid, chain.root / "a" / "mid.raw", chain.base):
        addcow_cli("stream", chain.top)
    assert specific(chain.top)["complete"] is True
    top_raw = chain.root / "a" / "top.raw"
    assert top_raw.read_bytes() == chain.expected()
    qemu_compare(top_raw, "raw", chain.qtop, "qcow2")
    chain.mid.unlink()
    chain.base.unlink()
    assert read_all(chain.top) == chain.expected()
    entries = json.loads(addcow_cli("map", "--output=json", chain.top).stdout)
    assert {e["depth"] for e in entries} == {0}


def test_chain_commit_top_into_add_cow_backing_matches_qemu(chain: Chain) -> None:
    top_before = read_all(chain.top)
    with untouched(chain.base):
        addcow_cli("commit", chain.top)
    qemu_img("commit", "-q", chain.qtop)
    # the middle add-cow now holds the combined content
    assert read_all(chain.mid) == chain.expected()
    out = to_raw(chain.mid, chain.root / "mid-out.raw")
    qemu_compare(out, "raw", chain.qmid, "qcow2")
    assert bitmap_bits(chain.mid) == {0, 2, 6, 8, 11}
    assert read_all(chain.top) == top_before
    qemu_compare(to_raw(chain.top, chain.root / "top-out.raw"), "raw", chain.qtop, "qcow2")


def test_chain_rebase_top_onto_base_matches_qemu(chain: Chain) -> None:
    with untouched(chain.mid, chain.base):
        addcow_cli("rebase", "-b", "base.raw", "-F", "raw", chain.top)
    qemu_img("rebase", "-f", "qcow2", "-b", "base.raw", "-F", "raw", chain.qtop)
    chain.mid.unlink()
    assert read_all(chain.top) == chain.expected()
    qemu_compare(to_raw(chain.top, chain.root / "r.raw"), "raw", chain.qtop, "qcow2")
    # mid's clusters 2 and 11 were copied up; top had 0, 6 and 8
    assert bitmap_bits(chain.top) == qemu_allocated(chain.qtop) == {0, 2, 6, 8, 11}


def test_chain_commit_of_a_grown_top_grows_the_add_cow_backing(chain: Chain) -> None:
    new_size = SIZE + 2 * C + 512
    addcow_cli("resize", chain.top, str(new_size))
    qemu_img("resize", "-q", "-f", "qcow2", chain.qtop, str(new_size))
    tail = [("write", new_size - 700, 700, 0xF9)]
    apply_addcow(chain.top, tail)
    apply_qemu(chain.qtop, tail)
    with untouched(chain.base):
        addcow_cli("commit", chain.top)
    qemu_img("commit", "-q", chain.qtop)
    assert info(chain.mid)["virtual-size"] == new_size
    out = to_raw(chain.mid, chain.root / "mid-out.raw")
    qemu_compare(out, "raw", chain.qmid, "qcow2")
    assert out.read_bytes() == model(chain.expected() + bytes(new_size - SIZE), new_size, tail)


# -- what the commands say when they cannot -------------------------------------------


def test_a_stream_refused_by_a_lock_does_not_suggest_force_share(tmp_path: Path) -> None:
    """-U is for read-only inspection; stream rejects it, so its lock error must not
    offer it."""
    base = tmp_path / "base.raw"
    build_base(base, {0: 0xC0}, 2 * C)
    img = tmp_path / "d.add-cow"
    addcow.create(img, image_file="d.raw", backing_file="base.raw", backing_format="raw")
    with addcow.open(img):
        proc = addcow_cli("stream", img, check=False)
        assert proc.returncode == 1
        assert proc.stderr == (
            f"addcow: {img}: failed to get write lock: the image is in use by another process\n"
        )
        shown = addcow_cli("map", img, check=False)  # a read-only command: -U is offered
        assert "-U" in shown.stderr and shown.returncode == 1
        assert addcow_cli("map", "-U", img).returncode == 0


def test_commands_without_u_never_suggest_it_when_a_lock_refuses_them(tmp_path: Path) -> None:
    """A read lock refused: the commands that take -U offer it, the others (commit,
    stream, detach, rebase, resize, create, serve) name the lock and stop there."""
    base = tmp_path / "base.raw"
    build_base(base, {0: 0xC0}, 2 * C)
    mid, top = tmp_path / "mid.add-cow", tmp_path / "top.add-cow"
    addcow.create(mid, image_file="mid.raw", backing_file="base.raw", backing_format="raw")
    addcow.create(top, image_file="top.raw", backing_file=mid, backing_format="add-cow")
    refused = f"addcow: {mid}: failed to get read lock: the image is in use by another process"
    with addcow.open(mid):  # held read-write: every read-only open of it is refused
        for args in (
            ("commit", mid),  # its own image, opened read-only
            ("stream", top), ("detach", top), ("rebase", "-b", "base.raw", "-F", "raw", top),
            ("resize", top, "4M"), ("create", "-b", mid, "-F", "add-cow", tmp_path / "s.add-cow"),
            ("serve", "--foreground", "--read-only", "--socket", tmp_path / "s.sock", mid),
            ("serve", "--socket", tmp_path / "s.sock", top),  # the error the daemon relays
        ):  # fmt: skip
            proc = addcow_cli(*args, check=False)
            assert (proc.returncode, proc.stderr) == (1, refused + "\n"), args
        for args in (("map", mid), ("check", mid), ("info", "--backing-chain", top),
                     ("convert", mid, tmp_path / "out.raw"), ("compare", mid, base),
                     ("io", "-r", "-c", "read 0 1", mid)):  # fmt: skip
            proc = addcow_cli(*args, check=False)
            assert proc.returncode in (1, 2) and " -U " in proc.stderr, (args, proc.stderr)
            assert addcow_cli(args[0], "-U", *args[1:], check=False).returncode == 0, args
    assert not (tmp_path / "s.add-cow").exists() and not (tmp_path / "s.sock").exists()


def test_detach_in_a_read_only_directory_says_why(tmp_path: Path) -> None:
    """Removing the .add-cow file needs write access to its directory; the message
    says so instead of a bare "Permission denied". Run as nobody (root may write
    anywhere)."""
    require_tool("setpriv")
    where = Path(tempfile.mkdtemp(prefix="addcow-ro-", dir="/tmp"))
    try:
        os.chmod(where, 0o755)
        img = where / "d.add-cow"
        addcow.create(img, image_file="d.raw", size=2 * C)
        with addcow.open(img) as image:
            image.write(b"\x11" * 2 * C, 0)
        for p in (img, where / "d.raw"):
            os.chown(p, 65534, 65534)
        os.chmod(where, 0o555)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "addcow", "detach", str(img)],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        assert proc.returncode == 1, proc
        assert proc.stderr == (
            f"addcow: {img}: cannot remove the .add-cow file (in {where}): Permission denied\n"
        )
        assert img.exists(), "nothing was removed"
        assert addcow_cli("check", img).returncode == 0
    finally:
        os.chmod(where, 0o755)
        shutil.rmtree(where)


def test_commit_refuses_a_qcow2_backing_and_leaves_it_intact(tmp_path: Path) -> None:
    """qcow2 backings are read, never written: commit refuses, nothing changes."""
    qemu_img = require_tool("qemu-img")
    golden = tmp_path / "b.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(golden), "1M"])
    img = tmp_path / "d.add-cow"
    addcow.create(img, image_file="d.raw", backing_file="b.qcow2", backing_format="qcow2")
    with addcow.open(img) as image:
        image.write(b"\x42" * C, 0)
    before = golden.read_bytes()
    proc = addcow_cli("commit", img, check=False)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"addcow: {img}: the backing file is qcow2, which addcow only reads; commit writes "
        "into raw or add-cow backing files\n"
    )
    assert golden.read_bytes() == before
    info = json.loads(run([qemu_img, "info", "--output=json", str(golden)]).stdout)
    assert info["format"] == "qcow2"
