"""Finishing an image while ``addcow serve`` serves it: copy on read, ``--stream``,
completion (ALL_ALLOCATED, backing closed) and ``--detach-when-complete``, driven by
real clients (nbdsh, qemu-io, qemu-img); plus the library calls behind them.

The disk: 8 MiB, 64 KiB clusters (128), over a backing of random bytes with a hole
at clusters 40-47. Streams are rate limited so that clients write while they run;
each test checks that the overlap really happened.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, allocated_clusters, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import BIN, env_with_addcow, served

import addcow
from addcow.errors import BackingError, ImageFileError, SlowZeroError

SIZE = 128 * CLUSTER


def make_base(path: Path) -> bytes:
    data = bytearray(random.Random(7).randbytes(SIZE))
    data[40 * CLUSTER : 48 * CLUSTER] = bytes(8 * CLUSTER)
    with open(path, "wb") as f:
        f.write(data[: 40 * CLUSTER])
        f.seek(48 * CLUSTER)
        f.write(data[48 * CLUSTER :])
    return bytes(data)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, bytearray]:
    """(image, backing, model of the disk's content)."""
    base = tmp_path / "base.raw"
    model = bytearray(make_base(base))
    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", backing_file=base, backing_format="raw")
    return image, base, model


def nbdsh_proc(script: str) -> subprocess.Popen[str]:
    tool = require_tool("nbdsh")
    env = env_with_addcow()
    env["PATH"] = f"{os.path.dirname(tool)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    return subprocess.Popen(
        [tool, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish_nbdsh(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"nbdsh timed out\n{out}\n{err}") from None
    if proc.returncode != 0:
        raise AssertionError(f"nbdsh failed:\n{out}\n{err}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def nbdsh(script: str) -> dict[str, object]:
    return finish_nbdsh(nbdsh_proc(script))


def wait_for_log(log: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout}s:\n{log.read_text()}")


def image_content(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, img.size)


def fds_of(pid: int) -> list[str]:
    fd_dir = f"/proc/{pid}/fd"
    names = []
    for fd in os.listdir(fd_dir):
        try:
            names.append(os.readlink(os.path.join(fd_dir, fd)))
        except FileNotFoundError:
            continue
    return names


# -- --stream with clients writing ----------------------------------------------------------------


def test_stream_while_nbdsh_and_qemu_io_write(setup: tuple[Path, Path, bytearray],
                                               tmp_path: Path) -> None:  # fmt: skip
    image, base, model = setup
    rng = random.Random(3)
    writes = []
    for i in range(60):
        cluster = rng.randrange(128)
        offset = cluster * CLUSTER + rng.choice([0, 1, 4095, 30000])
        length = min(rng.choice([512, 4096, CLUSTER, 100000]), SIZE - offset)
        writes.append((offset, length, 0x40 + i))
    for offset, length, byte in writes:
        model[offset : offset + length] = bytes([byte]) * length
    # Whole-cluster zeroing and discard while streaming, too.
    model[50 * CLUSTER : 52 * CLUSTER] = bytes(2 * CLUSTER)
    qemu_io_cmds = ["write -P 0x77 5000000 70000", "write -z 6291456 131072", "flush"]
    model[5000000:5070000] = b"\x77" * 70000
    model[6291456 : 6291456 + 131072] = bytes(131072)

    # About 4 MiB left to stream at 1 MiB/s: long enough for a progress line (every 2 s).
    with served(tmp_path, image, args=("--stream", "--stream-rate", "1M")) as srv:
        result = nbdsh(f"""
import json, time
h.connect_uri({srv.uri!r})
for off, n, byte in {writes!r}:
    h.pwrite(bytes([byte]) * n, off)
    time.sleep(0.005)
h.zero(2 * {CLUSTER}, 50 * {CLUSTER})
h.flush()
depths = []
def cb(meta, off, entries, err):
    if meta == "qemu:allocation-depth":
        depths.extend(entries[1::2])
h.block_status({SIZE}, 0, cb)
print(json.dumps({{"backing_left": 2 in depths}}))
""".replace("h.connect_uri", "h.add_meta_context('qemu:allocation-depth'); h.connect_uri"))
        # The writes ran while the stream still had clusters to copy.
        assert result["backing_left"] is True
        qemu_io = require_tool("qemu-io")
        args = [qemu_io, "-f", "raw", srv.uri]
        for cmd in qemu_io_cmds:
            args += ["-c", cmd]
        args += ["-c", "read -P 0x77 5000000 70000"]
        out = run(args).stdout
        assert "Pattern verification failed" not in out
        log = wait_for_log(srv.log, "complete: every cluster is in")
        assert "stream complete" in log and "stream progress" in log, log
        expected = tmp_path / "expected.raw"
        expected.write_bytes(model)
        run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri,
             str(expected)])  # fmt: skip
        # ALL_ALLOCATED is durable while the server still runs.
        info = json.loads(addcow_cli("info", "-U", "--output=json", image).stdout)
        data = info["format-specific"]["data"]
        assert data["complete"] is True and data["allocated-clusters"] == 128
        assert data["compatible-features"] != []
    assert image_content(image) == bytes(model)
    assert (tmp_path / "d.raw").read_bytes() == bytes(model)
    assert base.read_bytes() == make_base(tmp_path / "again.raw")  # backing untouched


def test_stream_rate_counts_only_the_bytes_read_from_the_backing(tmp_path: Path) -> None:
    """32 MiB, of which 512 KiB of data, at 512 KiB/s: about 1 s, the holes costing
    nothing (counting the whole disk would take 64 s)."""
    size, piece = 32 << 20, 128 << 10
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
        for at in (0, 5 << 20, 17 << 20, size - piece):
            f.seek(at)
            f.write(random.Random(at).randbytes(piece))
    image = tmp_path / "s.add-cow"
    addcow.create(image, image_file="s.raw", backing_file=base, backing_format="raw")
    started = time.monotonic()
    with served(tmp_path, image, args=("--stream", "--stream-rate", "512K")) as srv:
        log = wait_for_log(srv.log, "stream complete", timeout=10)
        took = time.monotonic() - started
    assert "stream complete: 512 KiB copied, 31.5 MiB left as zero" in log, log
    assert took >= 0.7, log  # the data still keeps the rate
    assert (tmp_path / "s.raw").read_bytes() == base.read_bytes()


# -- copy on read ---------------------------------------------------------------------------------


def test_copy_on_read_populates_exactly_the_clusters_read(
    setup: tuple[Path, Path, bytearray], tmp_path: Path
) -> None:
    image, _base, model = setup
    with addcow.open(image) as img:  # cluster 20 written before serving
        img.write(b"\xee" * CLUSTER, 20 * CLUSTER)
    model[20 * CLUSTER : 21 * CLUSTER] = b"\xee" * CLUSTER
    # 3: one small read; 6-7: a large read (thread pool path); 9-10: 20 bytes across
    # a boundary; 41: a hole in the backing; 20: already allocated; 30: written by
    # the client after a read, never overwritten by the copy.
    reads = [(3 * CLUSTER + 100, 4096), (6 * CLUSTER, 2 * CLUSTER),
             (10 * CLUSTER - 10, 20), (41 * CLUSTER, 512), (20 * CLUSTER, 4096),
             (30 * CLUSTER, 4096)]  # fmt: skip
    with served(tmp_path, image, args=("--copy-on-read",)) as srv:
        result = nbdsh(f"""
import json
h.connect_uri({srv.uri!r})
got = [h.pread(n, off).hex() for off, n in {reads!r}]
h.pwrite(b"\\x31" * 1000, 30 * {CLUSTER} + 5)
again = h.pread(8192, 30 * {CLUSTER}).hex()
print(json.dumps({{"got": got, "again": again}}))
""")
    assert result["got"] == [model[o : o + n].hex() for o, n in reads]
    model[30 * CLUSTER + 5 : 30 * CLUSTER + 1005] = b"\x31" * 1000
    assert result["again"] == model[30 * CLUSTER : 30 * CLUSTER + 8192].hex()
    assert allocated_clusters(image) == {3, 6, 7, 9, 10, 20, 30, 41}
    assert image_content(image) == bytes(model)


# -- completion: ALL_ALLOCATED, backing closed ----------------------------------------------------


def test_complete_image_releases_the_backing_file(
    setup: tuple[Path, Path, bytearray], tmp_path: Path
) -> None:
    image, base, model = setup
    with served(tmp_path, image, args=("--stream", "--stream-rate", "4M")) as srv:
        pid = srv.proc.pid
        assert str(base) in fds_of(pid)  # the stream takes about 2 s
        nbdsh(f"""
h.connect_uri({srv.uri!r})
h.pwrite(b"\\x99" * 3000, 100 * {CLUSTER} + 7)
h.flush()
print("{{}}")
""")
        model[100 * CLUSTER + 7 : 100 * CLUSTER + 3007] = b"\x99" * 3000
        wait_for_log(srv.log, "backing file closed")
        assert str(base) not in fds_of(pid)
        info = json.loads(addcow_cli("info", "-U", "--output=json", image).stdout)
        assert info["format-specific"]["data"]["complete"] is True
        base.unlink()  # nothing reads it any more
        result = nbdsh(f"""
import json
h.connect_uri({srv.uri!r})
h.pwrite(b"\\x5a" * 4096, 4096)
print(json.dumps({{"all": h.pread({SIZE}, 0).hex()}}))
""")
        model[4096:8192] = b"\x5a" * 4096
        assert bytes.fromhex(str(result["all"])) == bytes(model)
    # The image opens and reads without its backing file: ALL_ALLOCATED is set.
    assert image_content(image) == bytes(model)


def test_client_writes_alone_complete_the_image(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * (4 * CLUSTER))
    image = tmp_path / "w.add-cow"
    addcow.create(image, image_file="w.raw", backing_file=base, backing_format="raw")
    with served(tmp_path, image) as srv:
        nbdsh(f"""
h.connect_uri({srv.uri!r})
h.pwrite(b"\\x02" * (4 * {CLUSTER}), 0)
print("{{}}")
""")
        wait_for_log(srv.log, "backing file closed")
        assert str(base) not in fds_of(srv.proc.pid)
    assert image_content(image) == b"\x02" * (4 * CLUSTER)


# -- --detach-when-complete -----------------------------------------------------------------------


def test_detach_when_complete_keeps_a_connected_client_working(
    setup: tuple[Path, Path, bytearray], tmp_path: Path
) -> None:
    image, _base, model = setup
    args = ("--stream", "--stream-rate", "4M", "--detach-when-complete")
    with served(tmp_path, image, args=args) as srv:
        client = nbdsh_proc(f"""
import json, os, time
h.connect_uri({srv.uri!r})
first = h.pread(4096, 0).hex()
h.pwrite(b"\\x11" * 5000, 3 * {CLUSTER} + 10)
was_there = os.path.exists({str(image)!r})
deadline = time.monotonic() + 30
while os.path.exists({str(image)!r}) and time.monotonic() < deadline:
    h.pread(4096, 64 * {CLUSTER})
    time.sleep(0.05)
detached = not os.path.exists({str(image)!r})
h.pwrite(b"\\x22" * {CLUSTER}, 7 * {CLUSTER})
h.zero({CLUSTER}, 9 * {CLUSTER})
h.flush()
print(json.dumps({{"first": first, "was_there": was_there, "detached": detached,
                  "all": h.pread({SIZE}, 0).hex()}}))
""")
        result = finish_nbdsh(client)
        log = wait_for_log(srv.log, "detached: removed the .add-cow file")
        assert "failed" not in log
    model[3 * CLUSTER + 10 : 3 * CLUSTER + 5010] = b"\x11" * 5000
    model[7 * CLUSTER : 8 * CLUSTER] = b"\x22" * CLUSTER
    model[9 * CLUSTER : 10 * CLUSTER] = bytes(CLUSTER)
    assert result["was_there"] is True and result["detached"] is True
    assert result["first"] == model[:4096].hex()
    assert bytes.fromhex(str(result["all"])) == bytes(model)
    assert not image.exists()
    assert sorted(p.name for p in tmp_path.glob("*.raw")) == ["base.raw", "d.raw"]
    raw = tmp_path / "d.raw"
    assert raw.stat().st_size == SIZE
    assert raw.read_bytes() == bytes(model)


def test_detach_when_complete_at_start_for_a_complete_image(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x03" * (2 * CLUSTER))
    image = tmp_path / "c.add-cow"
    addcow.create(image, image_file="c.raw", backing_file=base, backing_format="raw")
    with addcow.open(image) as img:
        img.write(b"\x04" * (2 * CLUSTER), 0)
    with served(tmp_path, image, args=("--detach-when-complete",)) as srv:
        wait_for_log(srv.log, "detached")
        result = nbdsh(f"""
import json
h.connect_uri({srv.uri!r})
print(json.dumps({{"data": h.pread(2 * {CLUSTER}, 0) == b"\\x04" * (2 * {CLUSTER})}}))
""")
        assert result["data"] is True
    assert not image.exists()


def test_live_options_refused_with_read_only(setup: tuple[Path, Path, bytearray]) -> None:
    image, _base, _model = setup
    proc = addcow_cli("serve", "--read-only", "--stream", image, check=False)
    assert proc.returncode == 1 and "--read-only" in proc.stderr
    proc = addcow_cli("serve", "--stream-rate", "1M", image, check=False)
    assert proc.returncode == 1 and "--stream-rate needs --stream" in proc.stderr


# -- the library calls behind it ------------------------------------------------------------------


def test_release_backing_and_detach_in_place(setup: tuple[Path, Path, bytearray]) -> None:
    image, _base, model = setup
    with addcow.open(image) as img:
        with pytest.raises(BackingError):
            img.release_backing()  # incomplete
        img.populate(0, SIZE)
        with pytest.raises(BackingError):
            img.detach_in_place()  # backing not released yet
        img.release_backing()
        assert img.backing is None
        assert img.read(0, SIZE) == bytes(model)
        assert img.detach_in_place() == str(image.parent / "d.raw")
        assert img.detached and not image.exists()
        img.write(b"\x66" * 100, 12345)
        img.flush()  # only the image file is synced
        with pytest.raises(ImageFileError):
            img.resize(2 * SIZE)
    model[12345:12445] = b"\x66" * 100
    assert (image.parent / "d.raw").read_bytes() == bytes(model)


def test_fast_write_zeroes_refuses_partial_clusters_unchanged(
    setup: tuple[Path, Path, bytearray],
) -> None:
    image, _base, model = setup
    with addcow.open(image) as img:
        with pytest.raises(SlowZeroError):
            img.write_zeroes(CLUSTER + 512, CLUSTER, fast=True)
        with pytest.raises(SlowZeroError):
            img.write_zeroes(CLUSTER, CLUSTER + 1, fast=True)
        assert img.allocated_clusters == 0
        assert img.read(0, SIZE) == bytes(model)
        img.write_zeroes(CLUSTER, 2 * CLUSTER, fast=True)  # tmpfs/ext4/xfs punch holes
        img.write_zeroes(4 * CLUSTER, CLUSTER, may_unmap=False, fast=True)
        assert img.read(CLUSTER, 2 * CLUSTER) == bytes(2 * CLUSTER)
        assert img.read(4 * CLUSTER, CLUSTER) == bytes(CLUSTER)
        assert img.allocated_clusters == 3
