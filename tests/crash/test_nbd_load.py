"""Load and concurrency: 40 connections at once against one ``addcow serve``.

One server (``--shared 64``) exports three add-cow images over one 32 MiB raw
backing file, on a Unix socket. For each round, until its deadline, at once:

* ``nbdcopy --connections=8 --flush`` copies a local 16 MiB file *into* export
  ``in.add-cow`` (alternating between two sources), again and again;
* ``nbdcopy --connections=8`` copies export ``out.add-cow`` *out* to a local
  file, again and again, each copy compared with the expected content;
* ``fio --ioengine=nbd`` runs 8 jobs (8 connections) on ``main.add-cow``, job
  j rewriting its own 2 MiB region with the byte pattern of j (random 4 KiB
  writes, each block once per loop, ``--fsync=16``: NBD flushes while the
  other jobs write);
* 8 raw clients in threads, each with two connections to ``main.add-cow``:
  pipelined batches of writes of random sizes (some FUA, most unaligned) in
  its own 1 MiB region, then FLUSH and read-back on the *other* connection
  (multi-conn: a flush on any connection covers every completed write), the
  region compared with the client's model.

The model is exact because every writer owns its region: after the soak the
whole of each export, read over a fresh connection, must equal it (fio
regions the pattern, raw regions the clients' models, the last 8 MiB the
backing, ``in`` the last source copied), and again from disk through the
library after the server stops; ``check_image`` is clean.

Leaks: the server's open descriptors (``/proc/PID/fd``) must return to their
count before the round once the clients are gone, its threads
(``/proc/PID/task``) must stay within the main thread plus the I/O pool, and
its ``VmRSS`` after the last round must stay within 48 MiB of the first.

``test_load_32_tls_connections`` runs the same kind of soak with 32 connections,
every one inside TLS (see the comment above it), with the same model and the
same leak checks (RSS: at most 32 MiB of growth from the first round to the last).

``make test`` runs two rounds of 3 s (TLS: two of 2 s); ``make campaign`` six
of 30 s (TLS: four of 30 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import require_tool
from nbd_util import RawClient, Server, served, served_tcp
from tls_util import TLSRawClient, client_context, make_certs

import addcow
from addcow.check import check_image

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
ROUNDS = 6 if CAMPAIGN else 2
ROUND_SECONDS = 30.0 if CAMPAIGN else 3.0
MIB = 1 << 20
CLUSTER = 65536
SIZE = 32 * MIB
COPY_SIZE = 16 * MIB
FIO_JOBS, FIO_REGION = 8, 2 * MIB
RAW_CLIENTS, RAW_REGION, RAW_BASE = 8, MIB, 16 * MIB
POOL_THREADS = 8  # NBDServer's I/O workers
RSS_GROWTH_KIB = 48 << 10


def backing_content() -> bytes:
    return b"".join(bytes([(7 * i + 3) & 0xFF]) * CLUSTER for i in range(SIZE // CLUSTER))


def fio_byte(job: int) -> int:
    return 0xC0 + job


def proc_counts(pid: int) -> tuple[int, int, int, int]:
    """The server's open descriptors, sockets among them, threads and VmRSS (KiB)."""
    fd_dir = f"/proc/{pid}/fd"
    links = []
    for name in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed while listing
            links.append(os.readlink(f"{fd_dir}/{name}"))
    sockets = sum(link.startswith("socket:") for link in links)
    tasks = len(os.listdir(f"/proc/{pid}/task"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return len(links), sockets, tasks, rss


def settle(pid: int, sockets_before: int, timeout: float = 15) -> tuple[int, int, int, int]:
    """Counts once the server holds no more sockets than before (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = proc_counts(pid)
        if counts[1] <= sockets_before or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


class RawWriter:
    """A client with two connections that owns ``[base, base + RAW_REGION)``.

    ``connect`` opens one connection (a Unix socket by default, TLS in the TLS soak).
    """

    def __init__(self, srv: Server | None, index: int, seed: int, initial: bytes,
                 connect: Callable[[], RawClient] | None = None) -> None:
        self.connect = connect or (lambda: RawClient(srv.socket if srv else ""))
        self.base = RAW_BASE + index * RAW_REGION
        self.rng = random.Random(seed)
        self.model = bytearray(initial)
        self.writes = self.flushes = 0

    def run(self, deadline: float) -> None:
        with self.connect() as a, self.connect() as b:
            a.start(name="main.add-cow", structured=False)
            b.start(name="main.add-cow", structured=False)
            cookie = 1
            while time.monotonic() < deadline:
                slots = self.rng.sample(range(RAW_REGION // CLUSTER), 8)
                pending = {}
                for slot in slots:
                    length = self.rng.choice((1, 512, 4096, self.rng.randrange(1, CLUSTER + 1)))
                    start = slot * CLUSTER + self.rng.randrange(0, CLUSTER - length + 1)
                    data = self.rng.randbytes(length)
                    flags = 1 if self.rng.random() < 0.1 else 0
                    a.request(1, self.base + start, length, flags=flags, cookie=cookie, data=data)
                    pending[cookie] = (start, data)
                    cookie += 1
                while pending:
                    error, got = a.simple_reply()
                    assert error == 0, f"write failed with {error}"
                    start, data = pending.pop(got)
                    self.model[start : start + len(data)] = data
                    self.writes += 1
                if self.rng.random() < 0.3:
                    b.request(3, cookie=cookie)  # FLUSH on the other connection
                    assert b.simple_reply() == (0, cookie)
                    self.flushes += 1
                    cookie += 1
                    lo = self.rng.randrange(0, RAW_REGION - 4096)
                    got_back = read_simple(b, self.base + lo, 4096, cookie)
                    assert got_back == bytes(self.model[lo : lo + 4096]), "read-back differs"
                    cookie += 1
            b.request(3, cookie=cookie)
            assert b.simple_reply() == (0, cookie)
            self.flushes += 1
            assert read_simple(b, self.base, RAW_REGION, cookie + 1) == bytes(self.model)


def read_simple(c: RawClient, offset: int, length: int, cookie: int) -> bytes:
    c.request(0, offset, length, cookie=cookie)
    error, got = c.simple_reply()
    assert (error, got) == (0, cookie)
    return c.recv_exact(length)


def loop_tool(deadline: float, step: Callable[[int], None], counter: dict[str, int],
              key: str, errors: list[str]) -> None:
    n = 0
    try:
        while time.monotonic() < deadline:
            step(n)
            n += 1
    except BaseException as exc:  # reported by the main thread
        errors.append(f"{key}: {exc}")
    finally:
        counter[key] = counter.get(key, 0) + n


def run_once(w: RawWriter, deadline: float, counter: dict[str, int], errors: list[str]) -> None:
    try:
        w.run(deadline)
        counter["raw clients"] = counter.get("raw clients", 0) + 1
    except BaseException as exc:  # reported by the main thread
        errors.append(f"raw client at {w.base}: {exc!r}")


def test_load_40_connections(tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    fio = require_tool("fio")
    base = tmp_path / "base.raw"
    backing = backing_content()
    base.write_bytes(backing)
    rng = random.Random(0x10AD)
    sources = []
    for k in range(2):
        src = tmp_path / f"src{k}.raw"
        src.write_bytes(rng.randbytes(COPY_SIZE // 2) + bytes(COPY_SIZE // 2))  # data, then zeros
        sources.append(src)
    images = {}
    for name in ("main", "in", "out"):
        path = tmp_path / f"{name}.add-cow"
        addcow.create(path, image_file=f"{name}.raw", backing_file=base, backing_format="raw",
                      size=SIZE if name != "in" else COPY_SIZE)
        images[name] = path
    with addcow.open(images["out"]) as img:
        for i in range(0, SIZE, 3 * CLUSTER):
            img.write(rng.randbytes(CLUSTER), i)
        out_expected = img.read(0, SIZE)
    out_hash = hashlib.sha256(out_expected).hexdigest()

    main_model = bytearray(backing)
    for j in range(FIO_JOBS):
        main_model[j * FIO_REGION : (j + 1) * FIO_REGION] = bytes([fio_byte(j)]) * FIO_REGION
    stats: dict[str, int] = {}
    last_in = -1
    with served(tmp_path, images["main"], images["in"], images["out"],
                args=("--shared", "64")) as srv:
        sock = srv.socket
        pid = srv.proc.pid

        def uri(name: str) -> str:
            return f"nbd+unix:///{name}.add-cow?socket={sock}"

        writers = [RawWriter(srv, i, 1000 + i, backing[RAW_BASE + i * RAW_REGION :
                                                         RAW_BASE + (i + 1) * RAW_REGION])
                   for i in range(RAW_CLIENTS)]
        fio_cmd = [fio, "--ioengine=nbd", f"--uri={uri('main')}", "--rw=randwrite", "--bs=4k",
                   "--iodepth=8", f"--size={FIO_REGION}", "--loops=2", "--fsync=16",
                   "--scramble_buffers=0", "--group_reporting", "--output-format=terse"]
        for j in range(FIO_JOBS):
            fio_cmd += [f"--name=j{j}", f"--offset={j * FIO_REGION}",
                        f"--buffer_pattern={fio_byte(j):#04x}"]

        def copy_in(n: int) -> None:
            nonlocal last_in
            proc = subprocess.run([nbdcopy, "--connections=8", "--flush",
                                   str(sources[n % 2]), uri("in")],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            last_in = n % 2

        def copy_out(n: int) -> None:
            dest = tmp_path / "copied.raw"
            proc = subprocess.run([nbdcopy, "--connections=8", uri("out"), str(dest)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == out_hash, "copy differs"
            dest.unlink()

        def run_fio(n: int) -> None:
            proc = subprocess.run(fio_cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr

        counts_before = proc_counts(pid)
        rounds = []
        for _round in range(ROUNDS):
            deadline = time.monotonic() + ROUND_SECONDS
            errors: list[str] = []
            threads = [
                threading.Thread(target=loop_tool, args=(deadline, copy_in, stats, "nbdcopy in",
                                                         errors)),
                threading.Thread(target=loop_tool, args=(deadline, copy_out, stats,
                                                         "nbdcopy out", errors)),
                threading.Thread(target=loop_tool, args=(deadline, run_fio, stats, "fio", errors)),
            ]
            for w in writers:
                threads.append(threading.Thread(target=run_once, args=(w, deadline, stats, errors)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, "\n".join(errors)
            assert srv.proc.poll() is None, srv.stderr()
            rounds.append(settle(pid, counts_before[1]))
        print(f"\nload: {ROUNDS} rounds of {ROUND_SECONDS:.0f} s; runs {stats}; raw writes "
              f"{sum(w.writes for w in writers)}, raw flushes {sum(w.flushes for w in writers)}; "
              f"server fds/sockets/threads/RSS KiB before {counts_before}, "
              f"after each round {rounds}")
        # After the first round the export "in" is complete and its backing file is
        # released (one descriptor fewer, by design): later rounds compare with it.
        for fds, sockets, tasks, _rss in rounds:
            assert sockets == counts_before[1], f"sockets leaked: {counts_before} -> {rounds}"
            assert fds == rounds[0][0], f"descriptors leaked: {counts_before} -> {rounds}"
            assert tasks <= 1 + POOL_THREADS, f"threads leaked: {counts_before} -> {rounds}"
        assert rounds[-1][3] - rounds[0][3] <= RSS_GROWTH_KIB, f"memory grew: {rounds}"
        assert stats["nbdcopy in"] > 0 and stats["nbdcopy out"] > 0 and stats["fio"] > 0
        assert stats["raw clients"] == ROUNDS * RAW_CLIENTS and all(w.writes for w in writers)
        for w in writers:
            lo = w.base
            main_model[lo : lo + RAW_REGION] = w.model
        with RawClient(sock) as c:
            c.start(name="main.add-cow", structured=False)
            got = b"".join(read_simple(c, off, 4 * MIB, 9) for off in range(0, SIZE, 4 * MIB))
            assert got == bytes(main_model), "main export differs from the model"
        copied = tmp_path / "in-copy.raw"
        subprocess.run([nbdcopy, uri("in"), str(copied)], check=True, timeout=300)
        assert copied.read_bytes() == sources[last_in].read_bytes()
    with addcow.open(images["main"], readonly=True) as img:
        assert img.read(0, SIZE) == bytes(main_model)
    with addcow.open(images["in"], readonly=True) as img:
        assert img.read(0, COPY_SIZE) == sources[last_in].read_bytes()
    for path in images.values():
        report = check_image(path)
        assert report.corruptions == 0 and report.check_errors == 0, report
    assert base.read_bytes() == backing


# -- the same soak through TLS ---------------------------------------------------------------
#
# ``addcow serve --port 0 --tls-creds DIR --tls-verify-peer`` (TLS required): 32
# connections at once, every one inside TLS: nbdcopy --connections=8 in and out
# (nbds:// URIs with tls-certificates=), an nbdsh job of 8 connections (fio's nbd
# engine refuses tls-certificates= in a URI) rewriting 8 regions of 2 MiB with
# their own byte, FLUSHes among the writes and each region read back on another
# connection, and 4 raw TLS clients (Python's ssl) with two connections each.

TLS_ROUNDS = 4 if CAMPAIGN else 3
TLS_ROUND_SECONDS = 30.0 if CAMPAIGN else 2.0
TLS_RAW_CLIENTS = 4
TLS_RSS_GROWTH_KIB = 32 << 10

NBDSH_JOB = """
import random, threading
uri, region, jobs = URI, REGION, JOBS
handles = []
for j in range(jobs):
    x = nbd.NBD()
    x.set_uri_allow_local_file(True)
    x.connect_uri(uri)
    handles.append(x)
errors = []
def job(j):
    try:
        x = handles[j]
        block = bytes([0xC0 + j]) * 65536
        order = list(range(region // 65536))
        random.shuffle(order)
        for n, k in enumerate(order):
            x.pwrite(block, j * region + k * 65536)
            if n % 16 == 15:
                x.flush()
        x.flush()
        other = handles[(j + 1) % jobs]  # multi-conn: the flush covers every connection
        if other.pread(region, j * region) != bytes([0xC0 + j]) * region:
            errors.append(f"region {j} reads back wrong")
    except Exception as exc:
        errors.append(f"job {j}: {exc}")
threads = [threading.Thread(target=job, args=(j,)) for j in range(jobs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
for x in handles:
    x.shutdown()
print("ok" if not errors else "\\n".join(errors))
"""


def test_load_32_tls_connections(tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    nbdsh = require_tool("nbdsh")
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    base = tmp_path / "base.raw"
    backing = backing_content()
    base.write_bytes(backing)
    rng = random.Random(0x7150AD)
    sources = []
    for k in range(2):
        src = tmp_path / f"src{k}.raw"
        src.write_bytes(rng.randbytes(COPY_SIZE // 2) + bytes(COPY_SIZE // 2))
        sources.append(src)
    images = {}
    for name in ("main", "in", "out"):
        path = tmp_path / f"{name}.add-cow"
        addcow.create(path, image_file=f"{name}.raw", backing_file=base, backing_format="raw",
                      size=SIZE if name != "in" else COPY_SIZE)
        images[name] = path
    with addcow.open(images["out"]) as img:
        for i in range(0, SIZE, 3 * CLUSTER):
            img.write(rng.randbytes(CLUSTER), i)
        out_expected = img.read(0, SIZE)
    out_hash = hashlib.sha256(out_expected).hexdigest()
    main_model = bytearray(backing)
    for j in range(FIO_JOBS):
        main_model[j * FIO_REGION : (j + 1) * FIO_REGION] = bytes([fio_byte(j)]) * FIO_REGION
    context = client_context(certs["client"])
    stats: dict[str, int] = {}
    last_in = -1
    args = ("--tls-creds", str(certs["srv"]), "--tls-verify-peer", "--shared", "64")
    with served_tcp(tmp_path, images["main"], images["in"], images["out"], args=args) as srv:
        pid = srv.proc.pid

        def uri(name: str) -> str:
            return f"nbds://localhost:{srv.port}/{name}.add-cow?tls-certificates={certs['client']}"

        def connect() -> RawClient:
            return TLSRawClient(srv.port, context, timeout=60)

        writers = [RawWriter(None, i, 2000 + i, backing[RAW_BASE + i * RAW_REGION :
                                                        RAW_BASE + (i + 1) * RAW_REGION],
                             connect=connect)
                   for i in range(TLS_RAW_CLIENTS)]
        job = NBDSH_JOB.replace("URI", repr(uri("main"))).replace("REGION", str(FIO_REGION))
        job = job.replace("JOBS", str(FIO_JOBS))

        def copy_in(n: int) -> None:
            nonlocal last_in
            proc = subprocess.run([nbdcopy, "--connections=8", "--flush",
                                   str(sources[n % 2]), uri("in")],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            last_in = n % 2

        def copy_out(n: int) -> None:
            dest = tmp_path / "copied.raw"
            proc = subprocess.run([nbdcopy, "--connections=8", uri("out"), str(dest)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == out_hash, "copy differs"
            dest.unlink()

        env = dict(os.environ)  # nbdsh runs the python3 its libnbd module is built for
        env["PATH"] = f"{os.path.dirname(nbdsh)}{os.pathsep}{env.get('PATH', '')}"

        def run_nbdsh(n: int) -> None:
            proc = subprocess.run([nbdsh, "-c", job], capture_output=True, text=True,
                                  timeout=300, env=env)
            assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr

        counts_before = proc_counts(pid)
        rounds = []
        for _round in range(TLS_ROUNDS):
            deadline = time.monotonic() + TLS_ROUND_SECONDS
            errors: list[str] = []
            threads = [
                threading.Thread(target=loop_tool, args=(deadline, copy_in, stats, "nbdcopy in",
                                                         errors)),
                threading.Thread(target=loop_tool, args=(deadline, copy_out, stats,
                                                         "nbdcopy out", errors)),
                threading.Thread(target=loop_tool, args=(deadline, run_nbdsh, stats, "nbdsh",
                                                         errors)),
            ]
            for w in writers:
                threads.append(threading.Thread(target=run_once, args=(w, deadline, stats, errors)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, "\n".join(errors)
            assert srv.proc.poll() is None, srv.stderr()
            rounds.append(settle(pid, counts_before[1]))
        tls_sessions = srv.stderr().count("TLS started (")
        print(f"\nTLS load: {TLS_ROUNDS} rounds of {TLS_ROUND_SECONDS:.0f} s; runs {stats}; "
              f"raw writes {sum(w.writes for w in writers)}, raw flushes "
              f"{sum(w.flushes for w in writers)}; {tls_sessions} TLS sessions; server "
              f"fds/sockets/threads/RSS KiB before {counts_before}, after each round {rounds}")
        for fds, sockets, tasks, _rss in rounds:
            assert sockets == counts_before[1], f"sockets leaked: {counts_before} -> {rounds}"
            assert fds == rounds[0][0] <= counts_before[0], \
                f"descriptors leaked: {counts_before} -> {rounds}"
            assert tasks <= 1 + POOL_THREADS, f"threads leaked: {counts_before} -> {rounds}"
        # Memory from the end of the first round on: that round warms the allocator up
        # (the arenas of the pool's threads, the TLS buffers), and a short one ends
        # before it has.
        assert rounds[-1][3] - rounds[1][3] <= TLS_RSS_GROWTH_KIB, f"memory grew: {rounds}"
        assert stats["nbdcopy in"] > 0 and stats["nbdcopy out"] > 0 and stats["nbdsh"] > 0
        assert stats["raw clients"] == TLS_ROUNDS * TLS_RAW_CLIENTS
        assert all(w.writes for w in writers)
        log = srv.stderr()
        assert "TLS handshake failed" not in log and "internal error" not in log, log[-3000:]
        for w in writers:
            main_model[w.base : w.base + RAW_REGION] = w.model
        with connect() as c:
            c.start(name="main.add-cow", structured=False)
            got = b"".join(read_simple(c, off, 4 * MIB, 9) for off in range(0, SIZE, 4 * MIB))
            assert got == bytes(main_model), "main export differs from the model"
        copied = tmp_path / "in-copy.raw"
        subprocess.run([nbdcopy, uri("in"), str(copied)], check=True, timeout=300)
        assert copied.read_bytes() == sources[last_in].read_bytes()
    with addcow.open(images["main"], readonly=True) as img:
        assert img.read(0, SIZE) == bytes(main_model)
    with addcow.open(images["in"], readonly=True) as img:
        assert img.read(0, COPY_SIZE) == sources[last_in].read_bytes()
    for path in images.values():
        report = check_image(path)
        assert report.corruptions == 0 and report.check_errors == 0, report
    assert base.read_bytes() == backing
