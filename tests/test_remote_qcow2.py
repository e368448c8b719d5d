"""qcow2 golden images behind a URI: the qcow2 file served as bytes, read natively.

The golden image is a compressed qcow2 (``qemu-img convert -c``, as cloud
images are built) exported as a plain file by qemu-nbd (``-f raw``) or nginx.
QEMU is the referee: a qcow2 overlay over the same qcow2 file, read locally
and written by qemu-io with the same writes, must read the same
(``qemu-img compare``) and map the same.

A remote qcow2 is held to a local one's checks, and one more: it may not name a
backing file, because that name would be a file of this host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from http_util import nginx_server
from nbd_util import qemu_nbd, served
from qcow2_util import MiB, base_raw, converted, create, l2_entry, qemu_img, qemu_io

import addcow
from addcow.errors import AddCowError, BackingError, Qcow2UnsupportedError

WRITES = ("write -P 0xab 0 64k", "write -P 0xcd 1000000 5000", "write -z 3M 128k")


@contextmanager
def exported(kind: str, qcow2: Path, work: Path) -> Iterator[str]:
    """The URI of ``qcow2``'s bytes, served by qemu-nbd (``nbd``) or nginx (``http``)."""
    if kind == "nbd":
        with qemu_nbd(qcow2, work / f"{qcow2.stem}.sock") as uri:
            yield uri
        return
    www = work / "www"
    www.mkdir(exist_ok=True)
    os.link(qcow2, www / qcow2.name)
    with nginx_server(www, work / "nginx") as web:
        yield f"{web.url}/{qcow2.name}"


def create_over(tmp_path: Path, uri: str, name: str = "d") -> Path:
    addcow_cli("create", "-q", "-b", uri, "-F", "qcow2", "-o", f"image_file={name}.raw",
               tmp_path / f"{name}.add-cow")  # fmt: skip
    return tmp_path / f"{name}.add-cow"


def compare(a: Path | str, a_fmt: str, b: Path | str, b_fmt: str) -> str:
    return run([require_tool("qemu-img"), "compare", "-f", a_fmt, "-F", b_fmt, str(a),
                str(b)], check=False).stdout  # fmt: skip


def map_of(text: str) -> list[tuple[int, int, int, bool, bool]]:
    """(start, length, depth, zero, data) of a JSON map, adjacent equal entries merged."""
    merged: list[tuple[int, int, int, bool, bool]] = []
    for e in json.loads(text):
        key = (e["depth"], e["zero"], e["data"])
        if merged and merged[-1][2:] == key and sum(merged[-1][:2]) == e["start"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"], *key)
        else:
            merged.append((e["start"], e["length"], *key))
    return merged


@pytest.mark.parametrize("kind", ["nbd", "http"])
def test_a_compressed_qcow2_golden_image_over_a_uri_with_qemu_as_referee(
    tmp_path: Path, kind: str
) -> None:
    golden = converted(tmp_path, "golden", compress=True)
    size = json.loads(qemu_img("info", "--output=json", golden))["virtual-size"]
    script = [arg for w in WRITES for arg in ("-c", w)]
    overlay = create(tmp_path / "overlay.qcow2", size, backing=golden, backing_fmt="qcow2")
    run([require_tool("qemu-io"), "-f", "qcow2", *script, str(overlay)])
    with exported(kind, golden, tmp_path) as uri:
        image = create_over(tmp_path, uri)
        chain = json.loads(addcow_cli("info", "--backing-chain", "--output=json", image).stdout)
        assert [(e["filename"], e["format"]) for e in chain] == [
            (str(image), "add-cow"), (uri, "qcow2"),
        ]  # fmt: skip
        assert chain[1]["virtual-size"] == chain[0]["virtual-size"]
        assert chain[1]["format-specific"]["data"]["compression-type"] == "zlib"
        shown = addcow_cli("info", "--backing-chain", image).stdout
        assert f"image: {uri}\nfile format: qcow2\nvirtual size: " in shown
        data = json.loads(addcow_cli("info", "--output=json", image).stdout)
        assert data["format-specific"]["data"]["backing-pin"]["size"] == golden.stat().st_size
        addcow_cli("io", *script, image)
        assert addcow_cli("check", image).returncode == 0
        full = tmp_path / "full.raw"
        addcow_cli("convert", image, full)
        assert compare(full, "raw", overlay, "qcow2") == "Images are identical.\n"
        # map: the same layers and zeros as qemu-img map of the local overlay
        ours = map_of(addcow_cli("map", "--output=json", image).stdout)
        theirs = map_of(qemu_img("map", "--output=json", "-f", "qcow2", overlay))
        assert [(s, n, d, z) for s, n, d, z, _ in ours] == [
            (s, n, d, z) for s, n, d, z, _ in theirs
        ]
        assert {d for _, _, d, _, _ in ours} >= {0, 1}
        # served: NBD clients read the same disk
        with served(tmp_path, image, args=("--read-only",)) as srv:
            assert compare(srv.uri, "raw", overlay, "qcow2") == "Images are identical.\n"
        # streamed and detached: a standalone raw disk, sparse where the golden image is
        addcow_cli("stream", image)
        addcow_cli("detach", image)
    assert not image.exists()
    raw = tmp_path / "d.raw"
    assert raw.read_bytes() == full.read_bytes()
    assert raw.stat().st_blocks * 512 <= raw.stat().st_size - 3 * MiB  # the 4 MiB zero region


def test_a_remote_qcow2_that_names_a_backing_file_is_refused(tmp_path: Path) -> None:
    base = base_raw(tmp_path / "base.raw")
    top = create(tmp_path / "top.qcow2", "2M", backing=base)
    qemu_io(top, "write -P 0x44 64k 64k")
    with exported("nbd", top, tmp_path) as uri:
        proc = addcow_cli("create", "-q", "-b", uri, "-F", "qcow2", "-o", "image_file=d.raw",
                          tmp_path / "d.add-cow", check=False)  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr == (
            f"addcow: {uri}: this remote qcow2 names the backing file 'base.raw'; a qcow2 read "
            "over a URI may not have a backing file (its name would be a file of this host); "
            "flatten it with qemu-img convert -O qcow2 and serve that\n"
        )
        assert not (tmp_path / "d.add-cow").exists() and not (tmp_path / "d.raw").exists()


def test_a_remote_qcow2_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    qcow2 = create(tmp_path / "df.qcow2", "1M", f"data_file={tmp_path / 'data.raw'}")
    with exported("http", qcow2, tmp_path) as uri:
        proc = addcow_cli("create", "-q", "-b", uri, "-F", "qcow2", "-o", "image_file=d.raw",
                          tmp_path / "d.add-cow", check=False)  # fmt: skip
        assert proc.returncode == 1 and "found 0x4 (external data file)" in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        with pytest.raises(Qcow2UnsupportedError):
            addcow.create(tmp_path / "e.add-cow", image_file="e.raw", backing_file=uri,
                          backing_format="qcow2")
    assert not (tmp_path / "d.add-cow").exists() and not (tmp_path / "e.add-cow").exists()


def test_a_remote_qcow2_cut_short_is_an_error_not_zeros(tmp_path: Path) -> None:
    """The server holds a qcow2 whose last data cluster is cut off: every read of it
    fails and names the cluster, where QEMU would read zeros."""
    qcow2 = create(tmp_path / "cut.qcow2", "1M")
    qemu_io(qcow2, "write -P 0x11 0 64k", "write -P 0x22 64k 64k")
    _, value = l2_entry(qcow2, 0, 1)
    os.truncate(qcow2, (value & 0x00FFFFFFFFFFFE00) + 4096)
    with exported("nbd", qcow2, tmp_path) as uri:
        image = create_over(tmp_path, uri)
        assert addcow_cli("io", "-c", "read -P 0x11 0 64k", image).returncode == 0
        proc = addcow_cli("io", "-c", "read 64k 64k", image, check=False)
        assert (proc.returncode, proc.stdout) == (1, "read failed: Input/output error\n")
        with addcow.open(image, readonly=True) as img, pytest.raises(
            AddCowError, match=r"data cluster \(L1 index 0, L2 index 1, guest offset 0x10000\)"
        ):
            img.read(65536, 65536)
        proc = addcow_cli("convert", image, tmp_path / "out.raw", check=False)
        assert proc.returncode == 1 and "guest offset 0x10000" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_qcow2_golden_image_that_changed_is_refused(tmp_path: Path) -> None:
    qcow2 = create(tmp_path / "g.qcow2", "1M")
    qemu_io(qcow2, "write -P 0x11 0 64k")
    sock = tmp_path / "g.sock"
    with qemu_nbd(qcow2, sock) as uri:
        image = create_over(tmp_path, uri)
    qemu_io(qcow2, "write -P 0x22 512k 64k")  # the file grows by a cluster
    with qemu_nbd(qcow2, sock):
        proc = addcow_cli("io", "-c", "read 0 4k", image, check=False)
        assert proc.returncode == 1
        assert "the golden image changed since this image was created: size" in proc.stderr
    with pytest.raises(BackingError):
        addcow.open(image, readonly=True)  # no server at all now


def test_a_remote_qcow2_is_never_recorded_as_raw_or_guessed(tmp_path: Path) -> None:
    qcow2 = create(tmp_path / "g.qcow2", "1M")
    with exported("nbd", qcow2, tmp_path) as uri:
        for given, message in (
            ((), f"addcow: {uri}: the golden image starts with a qcow2 header; refusing to "
                 "guess its format (a guest can write such a header into a raw disk): if it is "
                 "a qcow2 image, give -F qcow2\n"),
            (("-F", "raw"), f"addcow: {uri} starts with a qcow2 header; refusing to record it "
                            "as raw (a raw disk must not start with an image header): if it is "
                            "a qcow2 image, give -F qcow2\n"),
        ):  # fmt: skip
            proc = addcow_cli("create", "-q", "-b", uri, *given, "-o", "image_file=d.raw",
                              tmp_path / "d.add-cow", check=False)  # fmt: skip
            assert (proc.returncode, proc.stderr) == (1, message)
            assert not (tmp_path / "d.add-cow").exists() and not (tmp_path / "d.raw").exists()
