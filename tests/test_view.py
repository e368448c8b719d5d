"""``addcow view`` and ``addcow fold`` against the real QEMU tools.

A view is checked by ``qemu-img check`` and read by ``qemu-img convert``; writes go
through ``qemu-io`` on the view and, as the reference, on a qcow2 overlay of the same
backing that gets the same commands; after the fold the image must read as the
overlay (``addcow compare``), and again after ``stream``. Hostile views are refused at
fold with the image unchanged; every command refuses the image while it has a view.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest
from conftest import CLUSTER, addcow, require_tool, run
from qcow2_util import convert_raw, converted, qemu_img, qemu_io

import addcow as lib
from addcow import ViewActiveError, ViewError
from addcow.format import V2_INCOMPAT_VIEW, Header
from addcow.view import fold_view, make_view
from addcow.view.layout import qemu_names

MiB = 1 << 20

# qemu-io commands, each run on the view and on the reference overlay: a partial
# write into an unallocated cluster over the backing (copy on write), whole clusters,
# write -z over allocated and unallocated clusters, a discard, a partial write -z.
WRITES = (
    "write -P 0x41 4096 512",
    "write -P 0x42 196608 131072",
    "write -z 0 65536",
    "write -z 393216 131072",
    "discard 589824 65536",
    "write -z 720896 1000",
    "write -P 0x43 978944 8192",
)


def _image(d: Path, backing: Path, fmt: str = "raw") -> Path:
    """An image over ``backing`` with clusters 2, 6 and 9 written by addcow."""
    image = d / "d.add-cow"
    lib.create(image, image_file="d.raw", backing_file=backing.name, backing_format=fmt)
    with lib.open(image) as img:
        img.write(b"\x21" * 100, 2 * CLUSTER + 10)
        img.write(b"\x22" * CLUSTER, 6 * CLUSTER)
        img.write(b"\x23" * 4096, 9 * CLUSTER)
    return image


def _content(image: Path) -> bytes:
    with lib.open(image, readonly=True) as img:
        return img.read(0, img.size)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _reference(d: Path, backing: Path, fmt: str, view_writes: tuple[str, ...]) -> Path:
    """A qcow2 overlay of ``backing`` with the image's own writes, then ``view_writes``."""
    ref = d / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing.name, "-F", fmt, ref)
    qemu_io(ref, "write -P 0x21 131082 100", "write -P 0x22 393216 65536",
            "write -P 0x23 589824 4096", *view_writes)  # fmt: skip
    return ref


def test_a_fresh_view_is_clean_and_reads_as_the_image(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    content = _content(image)
    make_view(image, tmp_path / "v.qcow2")
    out = qemu_img("check", tmp_path / "v.qcow2")
    assert "No errors were found on the image." in out
    assert convert_raw(tmp_path / "v.qcow2") == content
    info = qemu_img("info", tmp_path / "v.qcow2")
    assert "backing file: base.raw" in info and f"data file: {tmp_path}/d.raw" in info


def test_writes_through_the_view_fold_into_the_image(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    addcow("view", image, view)
    qemu_io(view, *WRITES)
    assert "No errors were found" in qemu_img("check", view)
    ref = _reference(tmp_path, base_raw, "raw", WRITES)
    seen = convert_raw(view)
    assert seen == convert_raw(ref)
    proc = addcow("fold", image)
    assert proc.stderr.startswith(f"folded {view} into {image}: ")
    assert not view.exists()
    assert _content(image) == seen
    addcow("compare", "-F", "qcow2", image, ref)
    addcow("check", image)
    addcow("stream", "-q", image)
    addcow("compare", "-F", "qcow2", image, ref)


def test_zero_clusters_become_holes(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    qemu_io(view, "write -z 393216 65536")  # cluster 6, allocated with data before
    stats = fold_view(image)
    assert (stats.data, stats.zero, stats.kept) == (0, 1, 0)
    with open(tmp_path / "d.raw", "rb") as f:
        assert os.lseek(f.fileno(), 6 * CLUSTER, os.SEEK_DATA) >= 7 * CLUSTER


def test_view_over_a_compressed_qcow2_golden_image(tmp_path: Path) -> None:
    golden = converted(tmp_path, "golden", compress=True)
    image = tmp_path / "d.add-cow"
    lib.create(image, image_file="d.raw", backing_file=golden.name, backing_format="qcow2")
    with lib.open(image) as img:
        img.write(b"\x31" * 700, 5 * CLUSTER + 3)
    content = _content(image)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    assert convert_raw(view) == content
    qemu_io(view, "write -P 0x32 65536 4096", "write -z 3145728 65536")
    seen = convert_raw(view)
    fold_view(image)
    assert _content(image) == seen
    addcow("stream", "-q", image)
    assert _content(image) == seen


def test_a_complete_image_s_view_names_no_backing(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    addcow("stream", "-q", image)
    content = _content(image)
    make_view(image, tmp_path / "v.qcow2")
    assert "backing file" not in qemu_img("info", tmp_path / "v.qcow2")
    assert convert_raw(tmp_path / "v.qcow2") == content
    fold_view(image)
    assert _content(image) == content


def test_every_command_refuses_the_image_while_it_has_a_view(
    tmp_path: Path, base_raw: Path
) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    before = _files(tmp_path)
    commands = [
        ("info", image), ("map", image), ("check", image), ("check", "-r", "all", image),
        ("io", "-c", "read 0 512", image), ("stream", image), ("commit", image),
        ("rebase", "-u", "-b", "base.raw", "-F", "raw", image), ("resize", image, "2M"),
        ("amend", "-o", "compat=1", image), ("detach", image),
        ("convert", "-O", "raw", image, tmp_path / "out.raw"),
        ("compare", image, base_raw), ("view", image, tmp_path / "w.qcow2"),
        ("serve", "--foreground", "--socket", tmp_path / "s.sock", image),
    ]  # fmt: skip
    for args in commands:
        proc = addcow(*args, check=False)
        assert proc.returncode != 0, args
        line = proc.stderr.strip()
        assert "\n" not in line, (args, proc.stderr)
        assert str(view) in line and f"addcow fold {image}" in line, (args, line)
    with pytest.raises(ViewActiveError):
        lib.open(image, readonly=True)
    assert _files(tmp_path) == before
    fold_view(image)
    addcow("check", image)


def _refused_at_fold(image: Path, view: Path, found: str) -> None:
    d = image.parent
    before = _files(d)
    proc = addcow("fold", image, check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"addcow: {view}: not a view addcow can fold")
    assert found in line, line
    assert _files(d) == before


def _l2_of(view: Path, index: int = 0) -> int:
    raw = view.read_bytes()
    l1_offset = struct.unpack_from(">Q", raw, 40)[0]
    return struct.unpack_from(">Q", raw, l1_offset + 8 * index)[0] & 0x00FFFFFFFFFFFE00


def test_hostile_views_are_refused_at_fold(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    good = view.read_bytes()
    l2 = _l2_of(view)
    cases = [
        # cluster 3 made to point at cluster 6's data
        (l2 + 3 * 8, struct.pack(">Q", 1 << 63 | 6 * CLUSTER), "points at 0x60000"),
        # cluster 4 as a compressed cluster
        (l2 + 4 * 8, struct.pack(">Q", 1 << 62 | 0x20000), "is compressed"),
        # a reserved bit
        (l2 + 5 * 8, struct.pack(">Q", 1 << 63 | 5 * CLUSTER | 2), "reserved bits"),
        # the L1 entry pointing past the end of the file
        (struct.unpack_from(">Q", good, 40)[0], struct.pack(">Q", 1 << 63 | 1 << 30),
         "inside the file"),
    ]  # fmt: skip
    for offset, raw, found in cases:
        bad = bytearray(good)
        bad[offset : offset + len(raw)] = raw
        view.write_bytes(bad)
        _refused_at_fold(image, view, found)
    # the data file renamed: the extension's name is another file of the same length
    name = str(tmp_path / "d.raw").encode()
    other = str(tmp_path / "e.raw").encode()
    view.write_bytes(good.replace(name, other))
    _refused_at_fold(image, view, "data_file_name changed")
    view.write_bytes(good.replace(b"base.raw", b"bose.raw"))
    _refused_at_fold(image, view, "backing_name changed")
    view.write_bytes(good)
    fold_view(image)
    addcow("check", image)


def test_a_view_in_use_is_not_folded_or_replaced(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    fd = os.open(view, os.O_RDONLY)
    try:  # a shared lock on the qcow2, as QEMU takes on a file it has open
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 100, 1, 0))
        proc = addcow("fold", image, check=False)
        assert proc.returncode == 1 and "the view is in use" in proc.stderr
        assert view.exists()
    finally:
        os.close(fd)
    fold_view(image)


def test_an_existing_file_is_replaced_only_with_force(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    view = tmp_path / "v.qcow2"
    view.write_bytes(b"precious")
    proc = addcow("view", image, view, check=False)
    assert proc.returncode == 1 and "the file exists" in proc.stderr
    assert view.read_bytes() == b"precious"
    assert Header.unpack((tmp_path / "d.add-cow").read_bytes()[:4096]).view_name is None
    proc = addcow("view", "--force", image, tmp_path / "d.raw", check=False)
    assert proc.returncode == 1 and "one of the image's own files" in proc.stderr
    addcow("view", "--force", image, view)
    assert view.read_bytes()[:4] == b"QFI\xfb"
    fold_view(image)


def test_limits_are_refused_with_one_line(tmp_path: Path, base_raw: Path) -> None:
    cases = [
        (("-o", "compat=1"), "a version 1 image cannot record a view"),
        (("-o", "cluster_size=4M"), "qcow2 clusters are at most 2 MiB"),
    ]
    for n, (options, found) in enumerate(cases):
        image = tmp_path / f"i{n}.add-cow"
        addcow("create", "-b", base_raw, "-F", "raw", *options, image)
        proc = addcow("view", image, tmp_path / f"v{n}.qcow2", check=False)
        assert proc.returncode == 1 and found in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert not (tmp_path / f"v{n}.qcow2").exists()
    addcow("create", "-f", "add-cow", tmp_path / "odd.add-cow", "1000")
    proc = addcow("view", tmp_path / "odd.add-cow", tmp_path / "odd.qcow2", check=False)
    assert proc.returncode == 1 and "not a multiple of 512" in proc.stderr
    lower = tmp_path / "lower.add-cow"
    addcow("create", "-b", base_raw, "-F", "raw", lower)
    upper = tmp_path / "upper.add-cow"
    addcow("create", "-b", lower, "-F", "add-cow", upper)
    proc = addcow("view", upper, tmp_path / "u.qcow2", check=False)
    assert proc.returncode == 1 and "QEMU cannot open an add-cow backing" in proc.stderr


def test_http_and_tls_backings_are_refused(tmp_path: Path) -> None:
    for uri, found in (("https://img.example/disk.raw", "serve the image through addcow"),
                       ("nbds://img.example/disk", "TLS backing")):  # fmt: skip
        header = Header(
            version=2, image_name=b"d.raw", backing_name=f"{uri}\nsize=1048576".encode(),
            backing_format="raw", image_size=1 << 20, incompatible_features=1,
        )  # fmt: skip
        with pytest.raises(ViewError, match=found):
            qemu_names(header, str(tmp_path / "d.add-cow"), str(tmp_path / "v.qcow2"),
                       str(tmp_path / "d.raw"), complete=False)  # fmt: skip


def test_a_missing_view_is_forgotten_only_when_asked(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    content = _content(image)
    view = tmp_path / "v.qcow2"
    make_view(image, view)
    view.unlink()
    proc = addcow("fold", image, check=False)
    assert proc.returncode == 1 and f"addcow fold --forget {image}" in proc.stderr
    addcow("fold", "--forget", image)
    assert _content(image) == content
    raw = (tmp_path / "d.add-cow").read_bytes()
    assert not Header.unpack(raw[:4096]).incompatible_features & V2_INCOMPAT_VIEW


def test_view_over_an_nbd_backing(tmp_path: Path, base_raw: Path) -> None:
    nbd = require_tool("qemu-nbd")
    sock = tmp_path / "golden.sock"
    pid = tmp_path / "nbd.pid"
    run([nbd, "--fork", "-r", "-f", "raw", "-k", str(sock), "-x", "golden",
         "--pid-file", str(pid), "--persistent", str(base_raw)])  # fmt: skip
    try:
        uri = f"nbd+unix:///golden?socket={sock}"
        image = tmp_path / "n.add-cow"
        addcow("create", "-b", uri, "-F", "raw", "-o", "image_file=n.raw", image)
        with lib.open(image) as img:
            img.write(b"\x51" * 300, CLUSTER + 5)
        content = _content(image)
        view = tmp_path / "nv.qcow2"
        make_view(image, view)
        assert f"backing file: {uri}" in qemu_img("info", view)
        assert convert_raw(view) == content
        qemu_io(view, "write -P 0x52 0 4096")
        seen = convert_raw(view)
        fold_view(image)
        assert _content(image) == seen
    finally:
        os.kill(int(pid.read_text()), 15)


def test_a_pending_view_is_refused_and_fold_finishes_it(tmp_path: Path, base_raw: Path) -> None:
    image = _image(tmp_path, base_raw)
    content = _content(image)
    raw = bytearray(image.read_bytes())
    header = Header.unpack(bytes(raw[:4096]))
    raw[:4096] = header._replace(view_name=b"v.qcow2").pack()  # the record, no bit
    image.write_bytes(raw)
    (tmp_path / "v.qcow2").write_bytes(b"a view cut short")
    for args in (("info", image), ("check", "-r", "all", image)):
        proc = addcow(*args, check=False)
        assert proc.returncode == 1, args
        assert proc.stderr == (f"addcow: {image}: a qcow2 view, {tmp_path / 'v.qcow2'}, was "
                               f"being made or folded when it stopped; run: addcow fold "
                               f"{image}\n")  # fmt: skip
    assert image.read_bytes() == bytes(raw)
    addcow("fold", image)
    assert not (tmp_path / "v.qcow2").exists()
    assert _content(image) == content
