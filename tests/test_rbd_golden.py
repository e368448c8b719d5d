"""Ceph RBD golden images through docs/serving.md's bridge, on a real cluster.

A golden disk (ext4 made by ``mke2fs -d``; for qcow2, that disk compressed) is
imported into the cluster's RBD pool (tests/ceph_util.py), snapshotted and
protected, and its image's head is written afterwards, so that reading the head
instead of the snapshot would show. ``qemu-storage-daemon`` exports the
snapshot with the command line of docs/serving.md's unit (its paths and names
pointed at the test's), run as systemd would (``Type=forking``), with the Ceph
user and capabilities the document gives. addcow then creates an image over
the export, serves it (``qemu-img compare`` reads through the server, started
while the bridge restarts), streams and detaches it; the referee is ``rbd
export`` of the snapshot.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ceph_util import RBD_CAPS, Ceph, RBDPool, alive, rbd_pool, stop_pid
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from nbd_util import served
from test_serving_docs import DOC, unit

MiB = 1 << 20
DISK = 16 * MiB
UNIT = "golden-debian-v1.service"


@pytest.fixture
def pool(ceph: Ceph) -> RBDPool:
    return rbd_pool(ceph)


def golden_disk(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """(the file to import, the disk it holds as raw): ext4 with a few files."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("golden\n")
    # incompressible, so that the qcow2 stays larger than what the store reads ahead
    # while it opens it: a client's reads must reach the bridge
    (tree / "blob").write_bytes(os.urandom(6 * MiB))
    disk = tmp_path / "golden.raw"
    run([require_tool("mke2fs"), "-q", "-t", "ext4", "-d", str(tree), "-F", str(disk), "16M"])
    if fmt == "raw":
        return disk, disk
    qcow2 = tmp_path / "golden.qcow2"
    run([require_tool("qemu-img"), "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
         str(disk), str(qcow2)])  # fmt: skip
    return qcow2, disk


def bridge_command(pool: RBDPool, image: str, where: Path) -> tuple[list[str], Path, Path]:
    """The bridge unit's ``ExecStart`` for ``pool/image@v1``: (argv, socket, pid file)."""
    service = unit(UNIT)
    assert service["Type"] == "forking" and service["PIDFile"] == "/run/golden-debian-v1/qsd.pid"
    line = (service["ExecStart"].replace("/run/golden-debian-v1", str(where))
            .replace("conf=/etc/ceph/ceph.conf", f"conf={pool.conf}")
            .replace("image=debian,", f"image={image},")
            .replace("rbd/debian@v1", f"{pool.name}/{image}@v1"))  # fmt: skip
    argv = shlex.split(line)
    assert argv[0] == "/usr/bin/qemu-storage-daemon"
    argv[0] = require_tool("qemu-storage-daemon")
    assert f"pool={pool.name}," in line and f"user={pool.user}," in line
    return argv, where / "nbd.sock", where / "qsd.pid"


@contextmanager
def bridge(argv: list[str], pidfile: Path) -> Iterator[int]:
    """Start the bridge as systemd's ``Type=forking`` does; SIGTERM it on exit (unless
    the test stopped it)."""
    run(argv)
    pid = int(pidfile.read_text())
    try:
        yield pid
    finally:
        if alive(pid):
            stop_pid(pid)
    assert not pidfile.exists(), "the bridge left its pid file"


def test_the_documented_ceph_user_is_the_one_the_tests_use() -> None:
    text = DOC.read_text()
    mon, mon_caps, osd, osd_caps = RBD_CAPS
    assert f"ceph auth get-or-create client.golden {mon} '{mon_caps}' {osd} '{osd_caps}'" in text


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_an_rbd_snapshot_through_the_bridge(ceph: Ceph, pool: RBDPool, tmp_path: Path,
                                            fmt: str) -> None:  # fmt: skip
    upload, disk = golden_disk(tmp_path, fmt)
    image = f"debian-{fmt}"
    ceph.rbd("import", str(upload), f"{pool.name}/{image}")
    ceph.rbd("snap", "create", f"{pool.name}/{image}@v1")
    ceph.rbd("snap", "protect", f"{pool.name}/{image}@v1")
    # the head moves on after the snapshot: only the snapshot may be read
    ceph.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "4M",
             "--io-pattern", "rand", f"{pool.name}/{image}")  # fmt: skip
    exported = tmp_path / "export.bin"
    ceph.rbd("export", f"{pool.name}/{image}@v1", str(exported))
    assert exported.read_bytes() == upload.read_bytes()
    head = tmp_path / "head.bin"
    ceph.rbd("export", f"{pool.name}/{image}", str(head))
    assert head.read_bytes() != exported.read_bytes()

    where = tmp_path / "run"
    where.mkdir()
    argv, sock, pidfile = bridge_command(pool, image, where)
    uri = f"nbd+unix:///{pool.name}/{image}@v1?socket={sock}"
    vm, raw = tmp_path / "vm1.add-cow", tmp_path / "vm1.raw"
    compare = [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw"]
    with bridge(argv, pidfile) as first:
        addcow_cli("create", "-q", "-b", uri, "-F", fmt, "-o", f"image_file={raw}", vm)
        info = addcow_cli("info", vm).stdout
        assert f"virtual size: 16 MiB ({DISK} bytes)" in info and f"backing file: {uri}" in info
        with served(tmp_path, vm) as server:
            # the bridge restarts under a served image: a client's reads wait for it
            stop_pid(first)
            with open(tmp_path / "compare.log", "wb") as out:
                client = subprocess.Popen([*compare, server.uri, str(disk)], stdout=out,
                                          stderr=subprocess.STDOUT)  # fmt: skip
            try:
                time.sleep(0.5)
                assert client.poll() is None, (tmp_path / "compare.log").read_text()
                with bridge(argv, pidfile):
                    assert client.wait(timeout=60) == 0, (tmp_path / "compare.log").read_text()
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            assert (tmp_path / "compare.log").read_text() == "Images are identical.\n"
    with bridge(argv, pidfile):
        addcow_cli("stream", "-q", vm)
    assert raw.read_bytes() == disk.read_bytes()
    addcow_cli("detach", vm)
    assert not vm.exists() and raw.read_bytes() == disk.read_bytes()
