"""qcow2 golden images through three command paths, with QEMU as the referee.

* ``addcow serve --copy-on-read`` of an add-cow image over a compressed qcow2:
  real NBD clients (nbdsh, qemu-io) read through it; afterwards exactly the
  clusters they touched are allocated (``addcow map``, ``addcow info``), the
  zero cluster among them is a hole in the image file, and the disk equals the
  golden image (``qemu-img compare``).
* A qcow2 chain under ``--backing-root`` on the command line: a chain inside
  the root works in every command; a qcow2 whose backing file name escapes the
  root (``..``, an absolute name, a symlink, a qcow2 outside, or an escape two
  layers down) is refused with one ``addcow:`` line.
* ``addcow stream`` over an uncompressed qcow2 copies runs of plain clusters
  with ``copy_file_range`` from the qcow2 file at their host offsets (spied on
  in-process); over ``qemu-img convert -c`` output it copies the clusters
  stored plainly and writes the compressed ones, inflated.
* ``addcow map`` over ``qemu-img convert -c`` output shows every range of data
  qemu-img's JSON map shows, the compressed ones with ``-`` for the offset
  and the reason in the human table, ``"compressed": true`` in the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER, allocated_clusters, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import BIN, env_with_addcow, served
from qcow2_util import convert_raw, converted, data_segments, qemu_img, qemu_io

from addcow.cli.main import main as cli_main

KiB = 1024
MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identical(raw: Path, golden: Path) -> subprocess.CompletedProcess[str]:
    return run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(raw),
                str(golden)], check=False)  # fmt: skip


# -- serve --copy-on-read over a compressed qcow2 ------------------------------------------


def nbdsh(script: str) -> Any:
    """Run an nbdsh script that prints one JSON value; return it."""
    tool = require_tool("nbdsh")
    env = env_with_addcow()
    env["PATH"] = f"{os.path.dirname(tool)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run([tool, "-c", script], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_serve_copy_on_read_over_a_compressed_qcow2(tmp_path: Path) -> None:
    require_tool("qemu-io")
    golden = converted(tmp_path, "golden", compress=True)  # zlib; zeros from 2 to 6 MiB
    digest = sha256(golden)
    content = convert_raw(golden)
    size = len(content)
    last = (size - 1) // CLUSTER
    assert size % CLUSTER and not any(content[40 * CLUSTER : 41 * CLUSTER])
    image = tmp_path / "d.add-cow"
    addcow_cli("create", "-q", "-b", golden, "-F", "qcow2", "-o", "image_file=d.raw", image)
    # 3: a small read; 6-7: a large one (the thread pool's path); 9-10: 20 bytes
    # across a boundary; 40: a cluster the golden image holds no data for (zeros);
    # the last, partial cluster; and 16, read by qemu-io.
    reads = [(3 * CLUSTER + 100, 4096), (6 * CLUSTER, 2 * CLUSTER),
             (10 * CLUSTER - 10, 20), (40 * CLUSTER, 512), (size - 5000, 5000)]  # fmt: skip
    with served(tmp_path, image, args=("--copy-on-read",)) as srv:
        got = nbdsh(f"""
import json
h.connect_uri({srv.uri!r})
print(json.dumps([h.pread(n, off).hex() for off, n in {reads!r}]))
""")
        run([require_tool("qemu-io"), "-r", "-f", "raw", "-c", "read 1M 4k", srv.uri])
    assert got == [content[o : o + n].hex() for o, n in reads]
    expected = {3, 6, 7, 9, 10, 16, 40, last}
    assert allocated_clusters(image) == expected
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["allocated-clusters"] == len(expected)
    assert info["format-specific"]["data"]["complete"] is False
    # the image file holds the golden bytes of the copied clusters and nothing else:
    # the zero cluster stayed a hole
    raw = tmp_path / "d.raw"
    held = raw.read_bytes()
    for c in expected:
        assert held[c * CLUSTER : (c + 1) * CLUSTER] == content[c * CLUSTER : (c + 1) * CLUSTER]
    for lo, hi in data_segments(raw):
        assert {c for c in range(lo // CLUSTER, -(-hi // CLUSTER))} <= expected - {40}, (lo, hi)
    out = tmp_path / "out.raw"
    addcow_cli("convert", image, out)
    proc = identical(out, golden)
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    assert addcow_cli("check", image).returncode == 0
    assert sha256(golden) == digest


# -- a qcow2 chain under --backing-root ---------------------------------------------------------


@dataclass
class Tree:
    root: Path
    secret: Path
    good: Path  # an add-cow image over top.qcow2 -> mid.qcow2 -> base.raw, all in root
    top: Path


def build_tree(tmp_path: Path) -> Tree:
    require_tool("qemu-io")
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.raw"
    secret.write_bytes(b"\x5e" * MiB)
    (root / "base.raw").write_bytes(random.Random(3).randbytes(MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", root / "mid.qcow2",
             "1M")  # fmt: skip
    qemu_io(root / "mid.qcow2", "write -P 0x44 64k 64k", "write -z 192k 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             root / "top.qcow2", "1M")  # fmt: skip
    qemu_io(root / "top.qcow2", "write -P 0x55 256k 64k")
    good = root / "good.add-cow"
    addcow_cli("create", "-q", "-b", "top.qcow2", "-F", "qcow2", "-o", "image_file=good.raw",
               good, cwd=root)  # fmt: skip
    return Tree(root, secret, good, root / "top.qcow2")


def commands(image: Path, out: Path) -> dict[str, list[str | Path]]:
    return {
        "map": ["map", image],
        "info": ["info", "--backing-chain", image],
        "convert": ["convert", image, out],
        "io": ["io", "-c", "read 0 64k", image],
        "stream": ["stream", image],
    }


def test_a_qcow2_chain_inside_the_backing_root_works(tmp_path: Path) -> None:
    t = build_tree(tmp_path)
    root = ["--backing-root", str(t.root)]
    js = json.loads(addcow_cli("map", "--output=json", *root, t.good).stdout)
    assert {e["depth"] for e in js if e["present"]} == {1, 2, 3}
    human = addcow_cli("map", *root, t.good).stdout
    assert all(name in human for name in ("top.qcow2", "mid.qcow2", "base.raw")), human
    chain = json.loads(addcow_cli("info", "--backing-chain", "--output=json", *root,
                                  t.good).stdout)  # fmt: skip
    assert [layer["format"] for layer in chain] == ["add-cow", "qcow2", "qcow2", "raw"]
    out = tmp_path / "out.raw"
    addcow_cli("convert", *root, t.good, out)
    proc = identical(out, t.top)
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    addcow_cli("stream", *root, t.good)
    assert allocated_clusters(t.good) == set(range(MiB // CLUSTER))
    proc = identical(t.root / "good.raw", t.top)
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr


def test_info_names_a_backing_format_addcow_does_not_read_and_stops(tmp_path: Path) -> None:
    """Each layer is described by the format its parent records; a format with no
    entry in the registry is refused by name, never read as another format."""
    t = build_tree(tmp_path)
    qemu_img("create", "-q", "-f", "vmdk", t.root / "old.vmdk", "1M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "old.vmdk", "-F", "vmdk", t.root / "mid.qcow2")
    proc = addcow_cli("info", "--backing-chain", t.good, check=False)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == [
        f"addcow: {t.root / 'old.vmdk'}: unsupported format 'vmdk': "
        "expected one of raw, qcow2, add-cow"
    ], proc.stderr


ESCAPES = ["dotdot", "absolute", "symlink", "qcow2_outside", "two_layers_down"]


def escaping_qcow2(t: Tree, kind: str) -> Path:
    """root/evil.qcow2, whose chain names a file outside the root."""
    evil = t.root / "evil.qcow2"

    def qcow2_over(path: Path, backing: str | Path, fmt: str = "raw") -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, path, "1M")

    if kind == "dotdot":
        qcow2_over(evil, "../outside/secret.raw")
    elif kind == "absolute":
        qcow2_over(evil, t.secret)
    elif kind == "symlink":
        (t.root / "link.raw").symlink_to("../outside/secret.raw")
        qcow2_over(evil, "link.raw")
    elif kind == "qcow2_outside":
        qcow2_over(t.secret.parent / "other.qcow2", "secret.raw")
        qcow2_over(evil, "../outside/other.qcow2", "qcow2")
    else:
        qcow2_over(t.root / "evil-mid.qcow2", "../outside/secret.raw")
        qcow2_over(evil, "evil-mid.qcow2", "qcow2")
    return evil


@pytest.mark.parametrize("kind", ESCAPES)
def test_a_qcow2_naming_a_file_outside_the_backing_root_is_refused(
    tmp_path: Path, kind: str
) -> None:
    t = build_tree(tmp_path)
    evil = escaping_qcow2(t, kind)
    image = t.root / "bad.add-cow"
    addcow_cli("create", "-q", "-b", evil.name, "-F", "qcow2", "-o", "image_file=bad.raw", image,
               cwd=t.root)  # fmt: skip
    out = tmp_path / "bad-out.raw"
    for name, args in commands(image, out).items():
        proc = addcow_cli(args[0], "--backing-root", t.root, *args[1:], check=False)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("addcow: "), (name, proc.stderr)
        assert "outside the allowed directory" in lines[0], (name, lines[0])
        assert str(t.root) in lines[0], (name, lines[0])
    assert not out.exists()
    # check reports the refusal in its own form (exit 1: could not check)
    proc = addcow_cli("check", "--backing-root", t.root, image, check=False)
    assert proc.returncode == 1
    assert "outside the allowed directory" in proc.stderr
    assert "No errors were found" not in proc.stdout
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["allocated-clusters"] == 0
    assert data_segments(t.root / "bad.raw") == []
    # control: without --backing-root the same chain opens and reads the outside file
    proc = addcow_cli("io", "-c", "read -P 0x5e 0 64k", image)
    assert "read 65536/65536 bytes at offset 0" in proc.stdout


# -- stream: copy_file_range from a plain qcow2 --------------------------------------------------


@dataclass
class Copy:
    src_ino: int
    dst_ino: int
    count: int
    src_offset: int
    dst_offset: int
    copied: int


def plain_golden(tmp_path: Path, compress: bool) -> Path:
    """4 MiB of random data, 2 MiB of zeros, 2 MiB of random data, 1 MiB of text,
    converted to a qcow2 (its data clusters stored in order, in runs)."""
    rng = random.Random(21)
    text = b"".join(b"golden line %6d\n" % i for i in range(MiB // 18 + 1))[:MiB]
    src = tmp_path / "plain.src"
    src.write_bytes(rng.randbytes(4 * MiB) + bytes(2 * MiB) + rng.randbytes(2 * MiB) + text)
    golden = tmp_path / ("zlib.qcow2" if compress else "plain.qcow2")
    qemu_img("convert", "-q", *(["-c"] if compress else []), "-O", "qcow2", "-o",
             "cluster_size=64k", src, golden)  # fmt: skip
    src.unlink()
    return golden


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zlib"])
def test_stream_copies_runs_of_plain_qcow2_clusters_with_copy_file_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool
) -> None:
    golden = plain_golden(tmp_path, compress)
    image, raw = tmp_path / "s.add-cow", tmp_path / "s.raw"
    addcow_cli("create", "-q", "-b", golden, "-F", "qcow2", "-o", f"image_file={raw}", image)
    golden_ino, raw_ino = os.stat(golden).st_ino, os.stat(raw).st_ino
    copies: list[Copy] = []
    written: list[tuple[int, int]] = []  # (offset, bytes) of pwritev into the image file
    lock = threading.Lock()
    real_copy, real_pwritev = os.copy_file_range, os.pwritev

    def copy_file_range(src: int, dst: int, count: int, offset_src: int | None = None,
                        offset_dst: int | None = None) -> int:  # fmt: skip
        n = real_copy(src, dst, count, offset_src, offset_dst)
        assert offset_src is not None and offset_dst is not None
        with lock:
            copies.append(Copy(os.fstat(src).st_ino, os.fstat(dst).st_ino, count, offset_src,
                               offset_dst, n))  # fmt: skip
        return n

    def pwritev(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        n = real_pwritev(fd, buffers, offset, *flags)
        if os.fstat(fd).st_ino == raw_ino:
            with lock:
                written.append((offset, n))
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    monkeypatch.setattr(os, "pwritev", pwritev)
    assert cli_main(["stream", "-q", str(image)]) == 0
    monkeypatch.undo()

    qmap = json.loads(qemu_img("map", "--output=json", golden))
    plain = [e for e in qmap if e["data"] and "offset" in e]
    packed = [e for e in qmap if e["data"] and "offset" not in e]  # compressed clusters
    plain_bytes = sum(e["length"] for e in plain)
    packed_bytes = sum(e["length"] for e in packed)
    assert plain_bytes + packed_bytes == 7 * MiB  # the zero MiBs are not stored
    if compress:  # qemu-img stores the random MiBs plainly, the text compressed
        assert (plain_bytes, packed_bytes) == (6 * MiB, MiB)
    else:
        assert packed_bytes == 0
    # the compressed clusters, inflated, are written; nothing else is
    assert sum(n for _, n in written) == packed_bytes
    assert all(any(e["start"] <= off < e["start"] + e["length"] for e in packed)
               for off, _ in written)  # fmt: skip
    # every plain cluster is copied file to file, from the qcow2 file at its host offset
    assert all((c.src_ino, c.dst_ino) == (golden_ino, raw_ino) for c in copies)
    assert sum(c.copied for c in copies) == plain_bytes
    for c in copies:
        e = next(e for e in plain if e["start"] <= c.dst_offset < e["start"] + e["length"])
        assert c.dst_offset + c.count <= e["start"] + e["length"], (c, e)
        assert c.src_offset == e["offset"] + c.dst_offset - e["start"], (c, e)
    # runs, not clusters: a copy spans many clusters
    assert max(c.count for c in copies) >= MiB
    assert len(copies) <= plain_bytes // (16 * CLUSTER)
    proc = identical(raw, golden)
    assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["complete"] is True
    # the 2 MiB of zeros the golden image does not store stay a hole
    assert all(hi <= 4 * MiB or lo >= 6 * MiB for lo, hi in data_segments(raw))


# -- map over a compressed qcow2 -------------------------------------------------------------


def test_map_shows_the_compressed_ranges_of_a_qcow2_golden(tmp_path: Path) -> None:
    golden = plain_golden(tmp_path, compress=True)
    addcow_cli("create", "-q", "-b", golden.name, "-F", "qcow2", "disk.add-cow", cwd=tmp_path)
    qmap = json.loads(qemu_img("map", "--output=json", golden))
    expected = [(e["start"], e["length"], e.get("offset")) for e in qmap if e["data"]]
    assert [n for _, n, off in expected if off is None] == [MiB]  # the text, compressed
    js = json.loads(addcow_cli("map", "--output=json", "disk.add-cow", cwd=tmp_path).stdout)
    data = [e for e in js if e["data"]]
    assert [(e["start"], e["length"], e.get("offset")) for e in data] == expected
    assert [e.get("compressed", False) for e in data] == [off is None for *_, off in expected]
    human = addcow_cli("map", "disk.add-cow", cwd=tmp_path).stdout.splitlines()
    assert human[0].split() == ["Offset", "Length", "Mapped", "to", "File"]
    assert [line.split() for line in human[1:]] == [
        [hex(start), hex(n), "-", golden.name, "(compressed)"] if off is None
        else [hex(start), hex(n), hex(off), golden.name]
        for start, n, off in expected
    ]
