"""``create`` never hides or loses what a user had, and a failed create leaves nothing.

* An existing file at the .add-cow path is replaced only with ``--force``
  (``force=True``), and never while it is in use.
* An existing image file that holds data is refused, unless it is named with
  ``-o image_file=`` and accepted with ``image_file_raw=on``: its data clusters
  then start allocated (qemu-img map of the raw file referees which), its holes
  unallocated; the bitmap is inside the .add-cow file before its rename, after
  the image file's data is durable.
* A failed create removes only the files it created, names the target (not
  its temporary file) and raises only AddCowError subclasses.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER, require_tool, run
from conftest import addcow as addcow_cli

import addcow
from addcow.errors import AddCowError, AddCowIOError, ExistingFileError, LockError
from addcow.format import Header

MiB = 1 << 20


def fails(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run addcow expecting exit 1 and one 'addcow: ...' line; return that line."""
    proc = addcow_cli(*args, check=False, cwd=cwd)
    assert proc.returncode == 1, f"{args}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.stderr.startswith("addcow: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip()


def fingerprint(*paths: Path) -> dict[Path, tuple[bytes, int, int]]:
    """Content, size and mtime of each file (mtimes set in the past first)."""
    out = {}
    for p in paths:
        os.utime(p, ns=(10**18, 10**18))
        st = p.stat()
        out[p] = (p.read_bytes(), st.st_size, st.st_mtime_ns)
    return out


@contextmanager
def untouched(*paths: Path) -> Iterator[None]:
    before = fingerprint(*paths)
    yield
    for p, (data, size, mtime) in before.items():
        st = p.stat()
        assert (p.read_bytes(), st.st_size, st.st_mtime_ns) == (data, size, mtime), p


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def read_disk(path: Path, out: Path) -> bytes:
    addcow_cli("convert", path, out)
    return out.read_bytes()


@pytest.fixture
def used(tmp_path: Path) -> Path:
    """d.add-cow over d.raw, 1 MiB, with data written in clusters 0 and 5."""
    image = tmp_path / "d.add-cow"
    addcow_cli("create", "-q", "-o", "image_file=d.raw", image, "1M")
    addcow_cli("io", "-c", "write -P 0xab 0 4k", "-c", f"write -P 0xcd {5 * CLUSTER} 64k", image)
    return image


# -- an existing .add-cow file ----------------------------------------------------------


def test_create_again_over_an_image_is_refused(used: Path, tmp_path: Path) -> None:
    disk = read_disk(used, tmp_path / "before.raw")
    with untouched(used, tmp_path / "d.raw"):
        err = fails("create", "-o", "image_file=d.raw", used, "1M")
        assert err == (
            f"addcow: {used}: the file exists and holds an add-cow image; refusing to replace "
            "it (give --force, or force=True, to replace it; its image file stays as it is)"
        )
        # checked first: a new image file is not even created
        fails("create", "-o", "image_file=new.raw", used, "1M")
        with pytest.raises(ExistingFileError, match="the file exists"):
            addcow.create(used, image_file="new.raw", size=MiB)
    assert not (tmp_path / "new.raw").exists()
    assert read_disk(used, tmp_path / "after.raw") == disk


def test_force_replaces_an_image_nobody_has_open(used: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.raw"
    addcow_cli("create", "-q", "--force", "-o", "image_file=fresh.raw", used, "2M")
    info = json.loads(addcow_cli("info", "--output=json", used).stdout)
    assert info["virtual-size"] == 2 * MiB
    assert info["format-specific"]["data"]["image-file"] == "fresh.raw"
    assert fresh.stat().st_blocks == 0
    # in use: refused before anything is created
    with addcow.open(used), untouched(used), pytest.raises(LockError):
        addcow.create(used, image_file="other.raw", size=MiB, force=True)
    assert not (tmp_path / "other.raw").exists()


# -- an existing image file ---------------------------------------------------------------


def test_an_image_file_holding_data_is_refused(used: Path, tmp_path: Path) -> None:
    used.unlink()  # d.raw holds data and is no image's image file (that is refused anyway)
    target = tmp_path / "e.add-cow"
    with untouched(tmp_path / "d.raw"):
        err = fails("create", "-o", "image_file=d.raw", target)
        assert err.startswith(f"addcow: {tmp_path / 'd.raw'}: the image file holds data")
        assert "-o image_file=NAME,image_file_raw=on" in err
        with pytest.raises(ExistingFileError, match="holds data"):
            addcow.create(target, image_file="d.raw")
        # the default image file name is never taken over, whatever it holds
        err = fails("create", "-o", "image_file_raw=on", tmp_path / "d.add-cow2")
        assert "image_file_raw=on needs the image file named explicitly" in err
    assert listing(tmp_path) == ["d.raw"]


def test_another_images_image_file_is_refused_even_empty(tmp_path: Path) -> None:
    """f.add-cow uses f.raw (all holes): a second image over f.raw would share it, each
    overwriting the other's clusters, so it is refused whatever f.raw holds; the
    image that --force replaces does not count, and an open image's locks refuse
    it from anywhere."""
    first, raw = tmp_path / "f.add-cow", tmp_path / "f.raw"
    addcow_cli("create", "-q", "-o", "image_file=f.raw", first, "1M")
    (tmp_path / "sub").mkdir()
    refused = (
        f"addcow: {raw}: is the image file of {first}; refusing to share it (two images "
        "would overwrite each other's clusters): detach or remove that image first, or use "
        "another image file"
    )
    with untouched(first, raw):
        assert fails("create", "-o", "image_file=f.raw", tmp_path / "f2.add-cow", "1M") == refused
        # named another way, from another directory, with image_file_raw=on
        assert fails("create", "-o", "image_file=../f.raw,image_file_raw=on",
                     tmp_path / "sub" / "g.add-cow", "1M") == refused.replace(
                         str(tmp_path), str(tmp_path / "sub" / ".."))  # fmt: skip
        os.symlink("f.raw", tmp_path / "alias.raw")
        assert "is the image file of" in fails("create", "-o", "image_file=alias.raw",
                                               tmp_path / "f3.add-cow", "1M")  # fmt: skip
        with pytest.raises(ExistingFileError, match=f"is the image file of {first}"):
            addcow.create(tmp_path / "f4.add-cow", image_file="f.raw", size=MiB)
    assert listing(tmp_path) == ["alias.raw", "f.add-cow", "f.raw", "sub"]
    assert listing(tmp_path / "sub") == []
    # a file named *.add-cow that is no image names nothing
    (tmp_path / "junk.add-cow").write_bytes(b"not an image")
    addcow_cli("create", "-q", "-o", "image_file=j.raw", tmp_path / "j.add-cow", "1M")
    # re-creating f.add-cow itself over its own image file (--force) is not sharing
    addcow_cli("create", "-q", "--force", "-o", "image_file=f.raw", first, "2M")
    assert json.loads(addcow_cli("info", "--output=json", first).stdout)["virtual-size"] == 2 * MiB
    # an image elsewhere that names it is found by its locks while it is open
    elsewhere = tmp_path / "sub" / "h.add-cow"
    addcow.create(elsewhere, image_file="../h.raw", size=MiB)
    with addcow.open(elsewhere, readonly=True):
        err = fails("create", "-o", "image_file=h.raw", tmp_path / "h2.add-cow", "1M")
        assert err.startswith(f"addcow: {tmp_path / 'h.raw'}: failed to get") and "lock" in err
    assert not (tmp_path / "h2.add-cow").exists()


def test_a_neighbour_image_that_cannot_be_read_fails_the_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether f.add-cow uses the image file asked for is unknown when its header
    cannot be read (an I/O error, a damaged header): the create fails, creating
    nothing. A file named *.add-cow that is no add-cow image is passed over."""
    first = tmp_path / "f.add-cow"
    addcow_cli("create", "-q", "-o", "image_file=f.raw", first, "1M")
    real = os.pread

    def failing(fd: int, *args: Any) -> Any:
        if os.readlink(f"/proc/self/fd/{fd}") == str(first):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, *args)

    monkeypatch.setattr(os, "pread", failing)
    with untouched(first), pytest.raises(AddCowIOError) as exc:
        addcow.create(tmp_path / "g.add-cow", image_file="g.raw", size=MiB)
    monkeypatch.undo()
    assert str(exc.value) == f"{first}: read header: Input/output error"
    assert exc.value.errno == errno.EIO
    damaged = bytearray(first.read_bytes())
    damaged[8:12] = (7).to_bytes(4, "little")  # version 7
    first.write_bytes(bytes(damaged))
    err = fails("create", "-o", "image_file=g.raw", tmp_path / "g.add-cow", "1M")
    assert err.startswith(
        f"addcow: {tmp_path / 'g.raw'}: cannot tell whether {first} uses it as its image file: "
    ) and "version" in err
    assert listing(tmp_path) == ["f.add-cow", "f.raw"]
    # no add-cow image: too short for its magic, another magic, not a file
    (tmp_path / "empty.add-cow").touch()
    qemu_img = require_tool("qemu-img")
    run([qemu_img, "create", "-q", "-f", "qcow2", str(tmp_path / "q.add-cow"), "1M"])
    (tmp_path / "dir.add-cow").mkdir()
    first.unlink()
    addcow_cli("create", "-q", "-o", "image_file=g.raw", tmp_path / "g.add-cow", "1M")


def test_an_empty_or_all_hole_image_file_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty.raw").touch()
    with open(tmp_path / "holes.raw", "wb") as f:
        f.truncate(3 * MiB)
    addcow_cli("create", "-q", "-o", "image_file=empty.raw", tmp_path / "a.add-cow", "1M")
    addcow_cli("create", "-q", "-o", "image_file=holes.raw", tmp_path / "b.add-cow")
    sizes = [json.loads(addcow_cli("info", "--output=json", tmp_path / n).stdout)["virtual-size"]
             for n in ("a.add-cow", "b.add-cow")]
    assert sizes == [MiB, 3 * MiB]
    assert (tmp_path / "empty.raw").stat().st_size == MiB


def qemu_data_clusters(raw: Path, size: int) -> set[int]:
    """Clusters of [0, size) where qemu-img map finds data in a raw file."""
    out = run([require_tool("qemu-img"), "map", "-f", "raw", "--output=json", str(raw)]).stdout
    clusters: set[int] = set()
    for e in json.loads(out):
        if e["data"] and e["start"] < size:
            end = min(e["start"] + e["length"], size)
            clusters.update(range(e["start"] // CLUSTER, -(-end // CLUSTER)))
    return clusters


def addcow_allocated(image: Path) -> set[int]:
    out = addcow_cli("map", "--output=json", image).stdout
    clusters: set[int] = set()
    for e in json.loads(out):
        if e["depth"] == 0 and e["present"]:
            clusters.update(range(e["start"] // CLUSTER, -(-(e["start"] + e["length"]) // CLUSTER)))
    return clusters


def test_image_file_raw_makes_the_data_clusters_part_of_the_disk(tmp_path: Path) -> None:
    size = 16 * CLUSTER
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (size // 256))
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, data in ((0, b"\x11" * CLUSTER), (3 * CLUSTER + 100, b"\x22" * 9000),
                             (9 * CLUSTER - 5000, b"\x33" * 10000)):
            f.seek(offset)
            f.write(data)
    content = raw.read_bytes()
    expected_clusters = qemu_data_clusters(raw, size)
    assert len(expected_clusters) >= 4  # clusters 0, 3, 8 and 9 at least hold data
    image = tmp_path / "d.add-cow"
    with untouched(raw, base):
        proc = addcow_cli("create", "-b", "base.raw", "-F", "raw",
                          "-o", "image_file=d.raw,image_file_raw=on", image)
    assert proc.stdout.splitlines()[-1] == (
        f"image_file_raw: {len(expected_clusters)} of 16 clusters hold data in d.raw and "
        "are marked allocated"
    )
    assert addcow_allocated(image) == expected_clusters
    # the disk: the image file's clusters that hold data, the backing file elsewhere
    want = b"".join(
        (content if c in expected_clusters else base.read_bytes())[c * CLUSTER:(c + 1) * CLUSTER]
        for c in range(16)
    )
    (tmp_path / "want.raw").write_bytes(want)
    out = tmp_path / "out.raw"
    assert read_disk(image, out) == want
    run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(out),
         str(tmp_path / "want.raw")])
    image.unlink()  # d.raw is no other image's image file any more
    created = addcow.create(tmp_path / "again.add-cow", image_file="d.raw", backing_file="base.raw",
                            image_file_raw=True)
    assert (created.clusters, created.allocated) == (16, len(expected_clusters))


def test_image_file_raw_bits_are_in_the_file_before_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(MiB)
        f.seek(2 * CLUSTER)
        f.write(b"\x44" * 100)
    events: list[str] = []

    def name_of(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def recording(real: Callable[..., Any], what: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if what == "rename":
                tmp = Path(args[0])
                head = tmp.read_bytes()
                header = Header.unpack(head)
                events.append(f"rename bitmap={head[header.header_size:].hex()}")
            else:
                events.append(f"{what} {name_of(args[0])}")
            return real(*args)
        return call

    monkeypatch.setattr(os, "fdatasync", recording(os.fdatasync, "fdatasync"))
    monkeypatch.setattr(os, "fsync", recording(os.fsync, "fsync"))
    monkeypatch.setattr(os, "rename", recording(os.rename, "rename"))
    addcow.create(tmp_path / "d.add-cow", image_file="d.raw", image_file_raw=True)
    assert events[0] == "fdatasync d.raw"
    assert events[1].startswith("fsync .d.add-cow.") and events[1].endswith(".tmp")
    assert events[2] == "rename bitmap=0400"  # cluster 2 of 16 allocated
    assert addcow_allocated(tmp_path / "d.add-cow") == {2}


# -- a failed create leaves nothing behind --------------------------------------------


def test_a_failed_create_removes_the_image_file_it_created(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    err = fails("create", "adir", "1G", cwd=tmp_path)
    assert err == "addcow: adir: is a directory; cannot create an image there"
    assert listing(tmp_path) == ["adir"] and listing(tmp_path / "adir") == []


@pytest.mark.parametrize("call", ["fsync", "rename", "ftruncate"])
def test_a_failing_system_call_is_an_addcow_error_naming_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    real = getattr(os, call)

    def broken(*args: Any) -> Any:
        if call == "ftruncate" and not name_of_fd(args[0]).endswith(".tmp"):
            return real(*args)  # the image file's own extension works; the .add-cow's fails
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def name_of_fd(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    (tmp_path / "kept.raw").touch()
    fingerprint(tmp_path / "kept.raw")
    monkeypatch.setattr(os, call, broken)
    for image_file in ("new.raw", "kept.raw"):
        with pytest.raises(AddCowIOError) as exc:
            addcow.create(tmp_path / "x.add-cow", image_file=image_file, size=MiB)
        message = str(exc.value)
        assert message.startswith(f"{tmp_path / 'x.add-cow'}: ") and ".tmp" not in message
        assert message.endswith("Input/output error") and exc.value.errno == errno.EIO
    monkeypatch.undo()
    # the file it created is gone, the one it found is as it was (size included)
    assert listing(tmp_path) == ["kept.raw"]
    assert (tmp_path / "kept.raw").stat().st_size == 0


def test_a_size_beyond_the_limit_is_said_in_bytes(tmp_path: Path) -> None:
    err = fails("create", "x", "1P", cwd=tmp_path)
    assert err == (
        "addcow: invalid header field image_size: expected at most 281474976710656 bytes with "
        "65536-byte clusters (4294967296 clusters, an implementation limit; larger clusters "
        "allow larger images), found 1125899906842624 bytes"
    )
    assert listing(tmp_path) == []
    with pytest.raises(AddCowError, match="found 1125899906842624 bytes"):
        addcow.create(tmp_path / "y", image_file="y.raw", size=1 << 50)
    err = fails("create", "-o", "cluster_size=4k", "x", "17T", cwd=tmp_path)
    assert "expected at most 17592186044416 bytes with 4096-byte clusters" in err
    assert listing(tmp_path) == []
