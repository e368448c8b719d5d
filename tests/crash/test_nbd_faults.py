"""I/O faults inside a running ``addcow serve``: the client gets the right NBD errno.

Two sources of faults, both against a real server on a Unix socket:

* **Injected** (``fault_server.py``): the server runs with ``os.pwritev``,
  ``os.preadv``, ``os.pread`` and ``os.fdatasync`` wrapped so that calls on
  the *image file* fail with a chosen errno while a trigger file says so. The
  test switches faults on and off while clients are connected.
* **A really full file system**: the image on a 2 MiB tmpfs (``mount -t tmpfs
  -o size=2m``, the suite runs as root) with a filler file, written cluster
  after cluster until the kernel says ENOSPC.

Required: the failing request gets an NBD error reply with the right errno
(EIO 5, ENOSPC 28, as nbdsh reports them: ``nbd.Error.errno``), the server
stays up and goes on serving that connection and new ones, the failed range
reads its old content (no bit for data that never reached the image file),
and once the fault is gone the same request succeeds. A failed ``fdatasync``
of the image file puts the image in fail-stop (docs/reliability.md): FLUSH
gets EIO, later writes get EIO, reads go on working.

``make test`` runs :data:`ROUNDS` seeded fault rounds on raw sockets (small
in-loop writes, large pool writes, FUA writes, small and large reads, EIO and
ENOSPC); ``make campaign`` runs many more.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool
from nbd_util import RawClient, _ready_line, env_with_addcow

import addcow
from addcow.check import check_image

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
ROUNDS = 1500 if CAMPAIGN else 60
CLUSTER = 65536
CLUSTERS = 64
SIZE = CLUSTERS * CLUSTER
EIO, ENOSPC = 5, 28
HERE = Path(__file__).parent


@dataclass
class FaultServer:
    proc: subprocess.Popen[bytes]
    socket: str
    uri: str
    trigger: Path
    log: Path

    def fault(self, **calls: int) -> None:
        self.trigger.write_text("".join(f"{call} {code}\n" for call, code in calls.items()))


@contextmanager
def fault_served(tmp_path: Path, image: Path, watched: Path) -> Iterator[FaultServer]:
    sock = tmp_path / "fault.sock"
    log = tmp_path / "fault.log"
    trigger = tmp_path / "faults"
    trigger.write_text("")
    cmd = [sys.executable, str(HERE / "fault_server.py"), str(trigger), str(watched),
           "serve", "--foreground", "-v", "--socket", str(sock), str(image)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env_with_addcow())
    try:
        line = _ready_line(proc, log)
        assert " on nbd+unix:///" in line, line
        yield FaultServer(proc, str(sock), line.rsplit(" on ", 1)[1], trigger, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def nbdsh(uri: str, op: str) -> str:
    """Run one libnbd call in nbdsh; 'ok', 'ok <hex of 8 bytes>' or 'error ERRNO'."""
    script = (
        "import errno\n"
        "try:\n"
        f"    r = {op}\n"
        "    print('ok' if r is None else 'ok ' + bytes(r[:8]).hex())\n"
        "except nbd.Error as e:\n"
        "    print('error', errno.errorcode.get(e.errno, e.errno))\n"
    )
    tool = require_tool("nbdsh")
    env = dict(os.environ)  # nbdsh runs "python3 -m nbd": Debian's python3 must come first
    env["PATH"] = f"{os.path.dirname(tool)}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run([tool, "-u", uri, "-c", script],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def make_image(tmp_path: Path, where: Path) -> tuple[Path, bytes]:
    base = tmp_path / "base.raw"
    backing = b"".join(bytes([0x40 + c]) * CLUSTER for c in range(CLUSTERS))
    base.write_bytes(backing)
    path = where / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file=base, backing_format="raw")
    return path, backing


def test_injected_eio_and_enospc_become_nbd_errors(tmp_path: Path) -> None:
    path, backing = make_image(tmp_path, tmp_path)
    model = bytearray(backing)
    with addcow.open(path) as img:  # clusters 0-3 allocated: reads of them hit the image file
        img.write(b"\xa0" * 4 * CLUSTER, 0)
    model[: 4 * CLUSTER] = b"\xa0" * 4 * CLUSTER
    rng = random.Random(0xFA17)
    stats = {"rounds": 0, "EIO": 0, "ENOSPC": 0, "retried ok": 0}
    with fault_served(tmp_path, path, tmp_path / "d.raw") as srv:
        # The headline cases through nbdsh, as a user sees them.
        srv.fault(pwritev=EIO)
        assert nbdsh(srv.uri, "h.pwrite(b'\\x55' * 4096, 8 * 65536)") == "error EIO"
        assert nbdsh(srv.uri, "h.pread(8, 8 * 65536)") == "ok " + "48" * 8  # the backing
        srv.fault(pwritev=ENOSPC)
        assert nbdsh(srv.uri, "h.pwrite(b'\\x55' * 4096, 8 * 65536)") == "error ENOSPC"
        srv.fault(preadv=EIO, pread=EIO)
        assert nbdsh(srv.uri, "h.pread(4096, 0)") == "error EIO"
        srv.fault()
        assert nbdsh(srv.uri, "h.pwrite(b'\\x55' * 4096, 8 * 65536)") == "ok"
        model[8 * CLUSTER : 8 * CLUSTER + 4096] = b"\x55" * 4096
        assert nbdsh(srv.uri, "h.pread(8, 8 * 65536)") == "ok " + "55" * 8

        # Seeded rounds on raw sockets: fault on, request fails with its errno, the
        # range holds its old content, fault off, the same request succeeds.
        with RawClient(srv.socket) as c, RawClient(srv.socket) as other:
            c.start(structured=False)
            other.start(structured=False)
            for n in range(ROUNDS):
                kind = rng.choice(("small write", "big write", "fua write", "small read",
                                   "big read"))
                code = EIO if "read" in kind or rng.random() < 0.5 else ENOSPC
                if kind == "small write":
                    cl = rng.randrange(0, CLUSTERS)
                    length = rng.randrange(1, 4097)
                    offset = cl * CLUSTER + rng.randrange(0, CLUSTER - length + 1)
                elif kind == "big write":
                    length = rng.choice((CLUSTER + 1, 2 * CLUSTER, 3 * CLUSTER - 7))
                    offset = rng.randrange(0, SIZE - length)
                elif kind == "fua write":
                    length = rng.randrange(1, 2 * CLUSTER)
                    offset = rng.randrange(0, SIZE - length)
                elif kind == "small read":
                    length = rng.randrange(1, 4097)
                    offset = rng.randrange(0, 4 * CLUSTER - length)
                else:
                    length, offset = 2 << 20, 0  # over INLINE_READ_MAX: read in the pool
                write = "write" in kind
                data = rng.randbytes(length) if write else b""
                flags = 1 if kind == "fua write" else 0
                command = 1 if write else 0
                srv.fault(**({"pwritev": code} if write else {"preadv": code, "pread": code}))
                c.request(command, offset, length, flags=flags, cookie=2 * n + 1, data=data)
                error, cookie = c.simple_reply()
                assert (error, cookie) == (code, 2 * n + 1), f"round {n} {kind}: {error}"
                stats["EIO" if code == EIO else "ENOSPC"] += 1
                srv.fault()
                assert srv.proc.poll() is None, srv.log.read_text()
                old = bytes(model[offset : offset + length])
                assert read(other, offset, length, 10**6 + n) == old, f"round {n}: not old"
                c.request(command, offset, length, flags=flags, cookie=2 * n + 2, data=data)
                assert c.simple_reply() == (0, 2 * n + 2), f"round {n} {kind}: retry failed"
                if write:
                    model[offset : offset + length] = data
                else:
                    assert c.recv_exact(length) == old
                stats["retried ok"] += 1
                stats["rounds"] += 1
            got = b"".join(read(other, off, CLUSTER * 8, 7) for off in range(0, SIZE, 8 * CLUSTER))
            assert got == bytes(model)

            # A failed sync of the image file: fail-stop. FLUSH and later writes get
            # EIO, reads go on; the server stays up.
            c.request(1, 0, 512, cookie=1, data=b"\x77" * 512)
            assert c.simple_reply() == (0, 1)
            model[:512] = b"\x77" * 512
            srv.fault(fdatasync=EIO)
            c.request(3, cookie=2)
            assert c.simple_reply() == (EIO, 2)
            srv.fault()
            c.request(1, CLUSTER, 512, cookie=3, data=b"\x78" * 512)
            assert c.simple_reply() == (EIO, 3)
            c.request(3, cookie=4)
            assert c.simple_reply() == (EIO, 4)
            assert read(other, 0, SIZE, 5) == bytes(model)
        assert nbdsh(srv.uri, "h.pread(8, 0)") == "ok " + "77" * 8
        assert srv.proc.poll() is None
    print(f"\nserver faults: {stats}")
    # Reopening recovers from fail-stop: what was written and acknowledged is there.
    with addcow.open(path) as img:
        assert img.read(0, SIZE) == bytes(model)
    report = check_image(path)
    assert report.corruptions == 0 and report.check_errors == 0, report


def read(c: RawClient, offset: int, length: int, cookie: int) -> bytes:
    c.request(0, offset, length, cookie=cookie)
    assert c.simple_reply() == (0, cookie)
    return c.recv_exact(length)


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[None]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_file_system_under_the_server_is_enospc(tmp_path: Path) -> None:
    from nbd_util import served

    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "2m"):
        path, backing = make_image(tmp_path, mnt)
        filler = mnt / "filler"
        filler.write_bytes(b"\x01" * 8 * CLUSTER)  # freed later, to make room
        written: list[int] = []
        failed = -1
        with served(tmp_path, path) as srv:
            for cl in range(CLUSTERS):
                result = nbdsh(srv.uri, f"h.pwrite(bytes([{cl}]) * 65536, {cl} * 65536)")
                if result != "ok":
                    assert result == "error ENOSPC", result
                    failed = cl
                    break
                written.append(cl)
            assert failed > 0, "the 2 MiB tmpfs never filled up"
            assert srv.proc.poll() is None
            with RawClient(srv.socket) as c:
                c.start(structured=False)
                for cl in written:
                    assert read(c, cl * CLUSTER, CLUSTER, cl) == bytes([cl]) * CLUSTER
                assert read(c, failed * CLUSTER, CLUSTER, 999) == backing[
                    failed * CLUSTER : (failed + 1) * CLUSTER]
            filler.unlink()
            assert nbdsh(srv.uri, f"h.pwrite(bytes([{failed}]) * 65536, {failed} * 65536)") == "ok"
            assert nbdsh(srv.uri, "h.flush()") == "ok"
        print(f"\ntmpfs: {len(written)} clusters written, ENOSPC at cluster {failed}, "
              "retry after freeing space ok")
        with addcow.open(path, readonly=True) as img:
            for cl in [*written, failed]:
                assert img.read(cl * CLUSTER, CLUSTER) == bytes([cl]) * CLUSTER
        report = check_image(path)
        assert report.corruptions == 0 and report.check_errors == 0, report
