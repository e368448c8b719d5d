"""Benchmarks: ``addcow serve`` against ``qemu-nbd`` serving the equivalent qcow2 overlay.

The referee is a qcow2 overlay with an external data file over the same raw
backing (``qemu-img create -f qcow2 -o data_file=q.raw -b base.raw -F raw``),
the nearest QEMU equivalent of an add-cow image, served by ``qemu-nbd
--cache=writeback --aio=threads`` (its defaults, named explicitly); ``addcow
serve`` goes through the page cache too (buffered I/O, fdatasync on FLUSH),
which is the same cache mode. Both images have their first half allocated
(written with the same bytes) over 1 GiB of random data. Each case runs
``--runs`` times, the servers interleaved (the order changing from run to
run); the table shows median figures and the median of the per-run ratios.

The page cache is in the same state for every server: once a server is up
(and, for nbdkit-cow, its overlay written), each of its files is written back
and dropped from the page cache (``fdatasync``, ``POSIX_FADV_DONTNEED``; the
cow overlay, an unlinked file, through ``/proc/PID/fd``), then read once with
16 MiB reads under ``POSIX_FADV_RANDOM`` (no readahead: 4 KiB page-cache
folios, what random 4 KiB reads leave). Nothing waits for the disk during a
measurement, and every server reads from, and writes into, folios of one
size, whatever wrote its files before: a 4 KiB buffered write into a large
folio (left by sequential reads or large writes) costs ext4 tens of
microseconds (``ext4_block_write_begin`` walks the whole folio), a cost that
would otherwise differ from server to server with how its files were made.

For each fio case the table also gives each server's CPU time per request
completed: the server process's user + system time (``/proc/PID/stat``,
which counts threads that have already exited, such as nbdkit's
per-connection threads) over the fio run, divided by the requests fio
completed; a figure of the work per request that the machine's other load
does not change much.

    .venv/bin/python benchmarks/bench_nbd.py [--size 1G] [--runs 3] [--seconds 5]
                                             [--workdir DIR] [--json [DIR]] [--cases ...]
                                             [--no-anchors] [--addcow-args "..."]

``--json`` also writes the run's figures and ratios to one file in
``benchmarks/results/`` (or DIR); ``record.py`` describes it.

Anchors (cases copy, copy1, randread, randwrite; left out with ``--no-anchors``
or when ``nbdkit`` is missing), measured in the same runs as the two servers:

nbdkit-file  ``nbdkit file`` serving ``full.raw``, a raw file with the disk's
        bytes (the first half written in one write, the rest copied from the
        backing): a multi-threaded C server with no copy-on-write, the limit
        for a server on this machine;
nbdkit-cow  ``nbdkit --filter=cow file`` over ``base.raw``, the nearest
        copy-on-write peer (64 KiB blocks, its overlay a temporary file in the
        work directory); the overlay lives as long as the server, so the
        same first half is written through it (``qemu-io`` over NBD) after
        each start, before the measurement.

Cases:

copy    ``nbdcopy URI null:`` of the whole disk, default settings (nbdcopy uses
        4 connections when the server advertises multi-conn: addcow does,
        qemu-nbd 7.2 does not for a writable export);
copy1   the same with ``--connections=1`` for both;
randread  ``fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32``, IOPS;
tlscopy ``nbdcopy nbds://127.0.0.1:PORT/?tls-certificates=DIR null:`` over TCP
        with TLS on both sides: ``addcow serve --tls-creds DIR`` against
        ``qemu-nbd --object tls-creds-x509,dir=DIR,endpoint=server,
        verify-peer=off --tls-creds``, the same certificates (EC P-256, made
        with openssl in the work directory), no client certificates; the same
        two servers over TCP without TLS in the same runs give each side's
        TLS/plain ratio;
tlsread the same four servers under ``fio --ioengine=nbd --rw=randread --bs=4k
        --iodepth=32 --uri=nbds://127.0.0.1:PORT/``, IOPS; fio's nbd engine
        does not let libnbd read local files named in the URI, so fio runs
        with HOME pointing at a directory whose ``.pki/libnbd`` (libnbd's
        default certificate directory) holds the same CA;
randwrite ``fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=32`` into
        fresh half-allocated images, IOPS;
randwrite128k  the same with ``--bs=128k`` (writes over several clusters; no
        target, informational);
qcow2read  ``fio --rw=randread --bs=4k --iodepth=32`` of an add-cow image over a
        golden qcow2 built like a cloud image (ext4 40% full, zlib,
        benchmarks/golden.py), half of its clusters allocated (every other
        MiB, interleaved with the golden image's files), against
        ``qemu-nbd`` serving a qcow2 overlay over the same golden image with
        the same half written, IOPS;
rss     ``addcow serve`` of a 1 TiB image: resident memory after random reads.

The TLS cases also print the protocol and cipher each server negotiated with
libnbd (from ``LIBNBD_DEBUG=1 nbdinfo``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import golden as golden_image
import record

ROOT = Path(__file__).resolve().parent.parent
ADDCOW = str(Path(sys.executable).parent / "addcow")
CASES = ("copy", "copy1", "randread", "tlscopy", "tlsread", "randwrite", "randwrite128k",
         "qcow2read", "rss")  # fmt: skip
ANCHORED = ("copy", "copy1", "randread", "randwrite")
ANCHORS = ("nbdkit-file", "nbdkit-cow")
TLS_SIDES = ("addcow", "qemu-nbd", "addcow plain", "qemu-nbd plain")
TLS_RATIOS = {
    "ratio": ("addcow", "qemu-nbd"),
    "addcow TLS/plain": ("addcow", "addcow plain"),
    "qemu-nbd TLS/plain": ("qemu-nbd", "qemu-nbd plain"),
}
PATTERN = 0x5A  # the byte of the written first half, on every side

# Where a server listens: a Unix socket, or a TCP port on 127.0.0.1.
Listen = Path | int
# One measurement on a running server: (side, its URI, its pid) -> figure.
Measure = Callable[[str, str, int], float]


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {proc.stderr}")
    return proc.stdout


def make_base(work: Path, size: int) -> Path:
    base = work / "base.raw"
    if not base.exists() or base.stat().st_size != size:
        with open(base, "wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))
    return base


def warm(path: Path | str, small_folios: bool = False) -> None:
    """Read a file once so that it is in the page cache; with ``small_folios``,
    without readahead (4 KiB folios)."""
    buf = bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        if small_folios:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        while f.readinto(buf):
            pass


def evict(path: Path | str) -> None:
    """Write a file's dirty pages back and drop all its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def unlinked_files(pid: int, work: Path) -> list[str]:
    """``/proc`` paths of the unlinked files under ``work`` that process ``pid`` holds open
    (nbdkit's cow overlay)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(work)) and target.endswith(" (deleted)"):
            found.append(str(fd))
    return found


def settle(files: Sequence[Path | str]) -> None:
    """The page cache for one measurement: every one of ``files`` dropped, then
    read once (see the module docstring)."""
    for path in files:
        evict(path)
    for path in files:
        warm(path, small_folios=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, its exited threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_addcow_image(work: Path, base: Path, size: int) -> Path:
    """A half-allocated add-cow image over ``base``."""
    for name in ("a.add-cow", "a.raw"):
        (work / name).unlink(missing_ok=True)
    sh(ADDCOW, "create", "-b", str(base), "-F", "raw", "-o", "image_file=a.raw",
       str(work / "a.add-cow"))  # fmt: skip
    sh(ADDCOW, "io", "-c", f"write -P {PATTERN:#x} 0 {size // 2}", str(work / "a.add-cow"))
    return work / "a.add-cow"


def make_qcow2_image(work: Path, base: Path, size: int) -> Path:
    """The equivalent qcow2 overlay (external data file), the same half written."""
    for name in ("q.qcow2", "q.raw"):
        (work / name).unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'q.raw'}",
       "-b", str(base), "-F", "raw", str(work / "q.qcow2"), str(size))  # fmt: skip
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN:#x} 0 {size // 2}",
       str(work / "q.qcow2"))  # fmt: skip
    return work / "q.qcow2"


def make_full_raw(work: Path, base: Path, size: int) -> Path:
    """A raw file with the disk's bytes: the first half in one write, the rest from base."""
    full = work / "full.raw"
    full.unlink(missing_ok=True)
    half = size // 2
    with open(base, "rb") as src, open(full, "wb") as dst:
        dst.write(bytes([PATTERN]) * half)
        done = 0
        while done < size - half:
            done += os.copy_file_range(src.fileno(), dst.fileno(), size - half - done,
                                       half + done, half + done)  # fmt: skip
    return full


def make_golden_images(work: Path, size: int) -> tuple[Path, Path]:
    """An add-cow image and a qcow2 overlay over one golden qcow2, first half written."""
    golden = work / "golden.qcow2"
    if not golden.exists():
        golden_image.build(str(work), size)
    for name in ("g.add-cow", "g.raw", "gov.qcow2"):
        (work / name).unlink(missing_ok=True)
    sh(ADDCOW, "create", "-b", str(golden), "-F", "qcow2", "-o", "image_file=g.raw",
       str(work / "g.add-cow"))  # fmt: skip
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2",
       str(work / "gov.qcow2"))  # fmt: skip
    # Every other MiB written: half the clusters, interleaved with the golden
    # image's files, so that reads of unallocated clusters meet compressed data.
    writes = [arg for mib in range(0, size >> 20, 2) for arg in ("-c", f"write -P 0x5a {mib}M 1M")]
    sh(ADDCOW, "io", *writes, str(work / "g.add-cow"))
    sh("qemu-io", "-f", "qcow2", *writes, str(work / "gov.qcow2"))
    for name in ("g.raw", "gov.qcow2", "golden.qcow2"):
        warm(work / name)
    return work / "g.add-cow", work / "gov.qcow2"


def make_tls_creds(work: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (EC P-256): (server dir, client
    dir, client home).

    The server directory is laid out as qemu-nbd's tls-creds-x509 and ``addcow
    serve --tls-creds`` want it; the client directory (libnbd's
    ``tls-certificates``) holds only the CA: the servers do not ask for a
    client certificate. fio's nbd engine passes its URI to libnbd without
    allowing local files, so ``tls-certificates`` is refused there: fio runs
    with HOME set to the client home, where ``.pki/libnbd`` (libnbd's default
    certificate directory) holds the same CA.
    """
    tls = work / "tls"
    server_dir, client_dir, home = tls / "server", tls / "client", tls / "home"
    pki = home / ".pki" / "libnbd"
    if (server_dir / "server-cert.pem").exists() and (pki / "ca-cert.pem").exists():
        return server_dir, client_dir, home
    for d in (server_dir, client_dir, pki):
        d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    sh("openssl", "req", "-x509", *ec, "-keyout", str(tls / "ca-key.pem"),
       "-out", str(server_dir / "ca-cert.pem"), "-days", "30", "-subj", "/CN=bench_nbd CA",
       "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    sh("openssl", "req", "-new", *ec, "-keyout", str(server_dir / "server-key.pem"),
       "-out", str(tls / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    (tls / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    sh("openssl", "x509", "-req", "-in", str(tls / "server.csr"),
       "-CA", str(server_dir / "ca-cert.pem"), "-CAkey", str(tls / "ca-key.pem"),
       "-CAcreateserial", "-days", "30", "-extfile", str(tls / "server.ext"),
       "-out", str(server_dir / "server-cert.pem"))  # fmt: skip
    shutil.copy(server_dir / "ca-cert.pem", client_dir / "ca-cert.pem")
    shutil.copy(server_dir / "ca-cert.pem", pki / "ca-cert.pem")
    return server_dir, client_dir, home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_args(kind: str, listen: Listen) -> list[str]:
    if isinstance(listen, Path):
        return ["--unix" if kind.startswith("nbdkit") else "--socket", str(listen)]
    if kind.startswith("nbdkit"):
        return ["--ipaddr", "127.0.0.1", "--port", str(listen)]
    return ["--bind", "127.0.0.1", "--port", str(listen)]


def listening(listen: Listen) -> bool:
    if isinstance(listen, Path):
        return listen.exists()
    try:
        socket.create_connection(("127.0.0.1", listen), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def server(
    kind: str,
    image: Path,
    listen: Listen,
    extra: Sequence[str] = (),
    tls: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Serve ``image``: kind is addcow, qemu-nbd, nbdkit-file or nbdkit-cow."""
    if isinstance(listen, Path):
        listen.unlink(missing_ok=True)
    where = listen_args(kind, listen)
    env = None
    if kind == "addcow":
        creds = ["--tls-creds", str(tls)] if tls else []
        cmd = [ADDCOW, "serve", "--foreground", *where, *creds, *extra, str(image)]
    elif kind == "qemu-nbd":
        creds = []
        if tls:
            obj = f"tls-creds-x509,id=tls0,dir={tls},endpoint=server,verify-peer=off"
            creds = ["--object", obj, "--tls-creds", "tls0"]
        cmd = ["qemu-nbd", "-f", "qcow2", "--cache=writeback", "--aio=threads", "-t", "-e", "16",
               *where, *creds, str(image)]  # fmt: skip
    else:
        cow = ["--filter=cow"] if kind == "nbdkit-cow" else []
        cmd = ["nbdkit", "--foreground", *where, *cow, "file", f"file={image}"]
        env = {**os.environ, "TMPDIR": str(image.parent)}  # where the cow overlay goes
    with running(cmd, listen, kind, env) as proc:
        yield proc


@contextmanager
def running(
    cmd: Sequence[str], listen: Listen, what: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run the server ``cmd`` once it listens at ``listen``; SIGTERM and wait at the end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while not listening(listen):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{what} did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def uri(listen: Listen, tls_client: Path | None = None) -> str:
    if isinstance(listen, Path):
        return f"nbd+unix:///?socket={listen}"
    if tls_client:
        return f"nbds://127.0.0.1:{listen}/?tls-certificates={tls_client}"
    return f"nbd://127.0.0.1:{listen}/"


def write_half(target: str, size: int) -> None:
    """Write the first half of the disk with the pattern through NBD (nbdkit-cow)."""
    sh("qemu-io", "-f", "raw", "-c", f"write -P {PATTERN:#x} 0 {size // 2}", target)


def tls_session(target: str) -> str:
    """The protocol and cipher that libnbd negotiated with the server at ``target``."""
    proc = subprocess.run(["nbdinfo", "--size", target], capture_output=True, text=True,
                          env={**os.environ, "LIBNBD_DEBUG": "1"})  # fmt: skip
    found = re.search(r"connection is using TLS: ([^\n]*)", proc.stderr)
    return found.group(1).strip() if found else "(not in libnbd's debug output)"


def nbdcopy(target: str, connections: int | None) -> float:
    extra = [f"--connections={connections}"] if connections else []
    start = time.perf_counter()
    sh("nbdcopy", *extra, target, "null:")
    return time.perf_counter() - start


def fio(
    target: str,
    rw: str,
    seconds: int,
    bs: str = "4k",
    home: Path | None = None,
    server: int | None = None,
    cpu: list[float] | None = None,
) -> float:
    """IOPS of one fio run; with ``server`` (its pid) and ``cpu``, also appends the
    server's CPU microseconds per request completed to ``cpu``."""
    env = {**os.environ, "HOME": str(home)} if home else None
    before = cpu_seconds(server) if server is not None else 0.0
    out = sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={target}", f"--rw={rw}",
             f"--bs={bs}", "--iodepth=32", "--size=100%", "--time_based",
             f"--runtime={seconds}", "--randrepeat=1", "--output-format=json", env=env)  # fmt: skip
    used = cpu_seconds(server) - before if server is not None else 0.0
    job = json.loads(out[out.index("{") :])["jobs"][0]  # after "fio: connected to ..."
    done = job["read" if rw == "randread" else "write"]
    if cpu is not None and server is not None and done["total_ios"]:
        cpu.append(used * 1e6 / done["total_ios"])
    return float(done["iops"])


def rss_case(work: Path, seconds: int) -> float:
    image = work / "big.add-cow"
    for name in ("big.add-cow", "big.raw", "bigbase.raw"):
        (work / name).unlink(missing_ok=True)
    with open(work / "bigbase.raw", "wb") as f:
        f.truncate(1 << 40)
    sh(ADDCOW, "create", "-b", str(work / "bigbase.raw"), "-F", "raw", "-o", "image_file=big.raw",
       str(image))  # fmt: skip
    sock = work / "big.sock"
    with server("addcow", image, sock) as proc:
        fio(uri(sock), "randrw", seconds)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmHWM:"))  # fmt: skip
    for name in ("big.add-cow", "big.raw", "bigbase.raw"):
        (work / name).unlink(missing_ok=True)
    return rss_kb / 1024


def compare(
    runs: int,
    sides: Sequence[str],
    measure: Callable[[str], float],
    ratios: dict[str, tuple[str, str]],
) -> dict[str, float]:
    """Each side once per run, the order rotating and reversing from run to run;
    median figure per side, median of each per-run ratio (higher is better)."""
    figures: dict[str, list[float]] = {side: [] for side in sides}
    per_run: dict[str, list[float]] = {label: [] for label in ratios}
    for i in range(runs):
        shift = (i // 2) % len(sides)
        order = list(sides[shift:]) + list(sides[:shift])
        if i % 2:
            order.reverse()
        got = {side: measure(side) for side in order}
        for side, value in got.items():
            figures[side].append(value)
        for label, (num, den) in ratios.items():
            per_run[label].append(got[num] / got[den])
    result = {side: statistics.median(values) for side, values in figures.items()}
    result.update({label: statistics.median(values) for label, values in per_run.items()})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workdir")
    record.add_option(parser)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-anchors", action="store_true",
                        help="leave nbdkit out of copy, copy1, randread, randwrite")  # fmt: skip
    parser.add_argument("--addcow-args", default="", help="extra arguments for addcow serve")
    args = parser.parse_args()
    os.environ.setdefault("ADDCOW_EVENT_LOOP", "asyncio")  # ADDCOW_EVENT_LOOP=uvloop to compare
    run = record.Run("bench_nbd", args)
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {','.join(CASES)}")
    extra = tuple(args.addcow_args.split())
    anchors = () if args.no_anchors or not shutil.which("nbdkit") else ANCHORS
    if not anchors and not args.no_anchors:
        print("nbdkit not found: no anchors", file=sys.stderr)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-nbd-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    base = make_base(work, size)
    prepare: dict[str, Callable[[], Path]] = {
        "addcow": lambda: make_addcow_image(work, base, size),
        "qemu-nbd": lambda: make_qcow2_image(work, base, size),
        "nbdkit-file": lambda: make_full_raw(work, base, size),
        "nbdkit-cow": lambda: base,
    }
    wanted = ("addcow", "qemu-nbd", *(anchors if set(cases) & set(ANCHORED) else ()))
    images = {kind: prepare[kind]() for kind in wanted}
    sock = work / "s.sock"
    results: dict[str, dict[str, float]] = {}
    sessions: dict[str, str] = {}

    # Each side's files (nbdkit-cow's overlay is found once it runs).
    files: dict[str, list[Path]] = {
        "addcow": [work / "a.add-cow", work / "a.raw", base],
        "qemu-nbd": [work / "q.qcow2", work / "q.raw", base],
        "nbdkit-file": [work / "full.raw"],
        "nbdkit-cow": [base],
    }
    # CPU microseconds per request: case -> side -> one figure per run.
    cpu: dict[str, dict[str, list[float]]] = {}

    def with_server(kind: str, fn: Measure, fresh: bool = False) -> float:
        """``fn(kind, uri, server pid)`` on a fresh server of ``kind``, the page cache settled."""
        if fresh:
            images[kind] = prepare[kind]()
        with server(kind, images[kind], sock, extra if kind == "addcow" else ()) as proc:
            if kind == "nbdkit-cow":
                write_half(uri(sock), size)
            settle([*files[kind], *unlinked_files(proc.pid, work)])
            return fn(kind, uri(sock), proc.pid)

    def anchored(case: str, fn: Measure, fresh: bool = False) -> dict[str, float]:
        sides = ("addcow", "qemu-nbd", *anchors)
        ratios = {"ratio": ("addcow", "qemu-nbd")}
        ratios.update({f"addcow/{kind}": ("addcow", kind) for kind in anchors})
        return compare(args.runs, sides, lambda k: with_server(k, fn, fresh), ratios)

    def fio_case(case: str, rw: str, bs: str = "4k") -> Measure:
        """A measurement that runs fio and keeps each server's CPU per request."""
        per_side = cpu.setdefault(case, {})

        def measure(kind: str, target: str, pid: int) -> float:
            return fio(target, rw, args.seconds, bs, server=pid, cpu=per_side.setdefault(kind, []))

        return measure

    tls_cases = {"tlscopy", "tlsread"} & set(cases)
    server_dir, client_dir, client_home = make_tls_creds(work) if tls_cases else (work,) * 3

    def tls_compare(fn: Callable[[str], float]) -> dict[str, float]:

        def measure(side: str) -> float:
            kind, plain = side.split()[0], side.endswith("plain")
            port = free_port()
            tls = None if plain else server_dir
            with server(kind, images[kind], port, extra if kind == "addcow" else (), tls):
                target = uri(port, None if plain else client_dir)
                if not plain and kind not in sessions:
                    sessions[kind] = tls_session(target)
                return fn(target)

        return compare(args.runs, TLS_SIDES, measure, TLS_RATIOS)

    mib = size / (1 << 20)
    if "copy" in cases:
        results["nbdcopy to null: (MiB/s)"] = anchored(
            "copy", lambda _k, t, _p: mib / nbdcopy(t, None)
        )
    if "copy1" in cases:
        results["nbdcopy --connections=1 (MiB/s)"] = anchored(
            "copy1", lambda _k, t, _p: mib / nbdcopy(t, 1)
        )
    if "randread" in cases:
        results["fio 4k randread QD32 (IOPS)"] = anchored(
            "randread", fio_case("randread", "randread")
        )
    # The TLS cases read the images as made: before the write cases change them.
    if "tlscopy" in cases:
        results["TLS nbdcopy to null: (MiB/s)"] = tls_compare(lambda t: mib / nbdcopy(t, None))
    if "tlsread" in cases:
        # fio: the URI without its query, the CA found through HOME (make_tls_creds).
        results["TLS fio 4k randread QD32 (IOPS)"] = tls_compare(
            lambda t: fio(t.split("?")[0], "randread", args.seconds, home=client_home)
        )
    if "randwrite" in cases:
        results["fio 4k randwrite QD32, half allocated (IOPS)"] = anchored(
            "randwrite", fio_case("randwrite", "randwrite"), fresh=True
        )
    if "randwrite128k" in cases:
        results["fio 128k randwrite QD32, half allocated (IOPS)"] = compare(
            args.runs,
            ("addcow", "qemu-nbd"),
            lambda k: with_server(k, fio_case("randwrite128k", "randwrite", "128k"), True),
            {"ratio": ("addcow", "qemu-nbd")},
        )
    if "qcow2read" in cases:
        golden_images = dict(zip(("addcow", "qemu-nbd"), make_golden_images(work, size),
                                 strict=True))  # fmt: skip

        def qcow2_read(kind: str) -> float:
            with server(kind, golden_images[kind], sock, extra if kind == "addcow" else ()):
                return fio(uri(sock), "randread", args.seconds)

        results["fio 4k randread QD32 over a golden qcow2 (IOPS)"] = compare(
            args.runs, ("addcow", "qemu-nbd"), qcow2_read, {"ratio": ("addcow", "qemu-nbd")}
        )
    if "rss" in cases:
        rss = statistics.median(rss_case(work, args.seconds) for _ in range(args.runs))
        results["addcow serve RSS, 1 TiB image (MiB, peak)"] = {"addcow": rss}
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"addcow serve's event loop: {os.environ['ADDCOW_EVENT_LOOP']}")
    print(f"{'case':48} {'addcow':>10} {'qemu-nbd':>10} {'ratio':>7}")
    for name, r in results.items():
        q = f"{r['qemu-nbd']:10.0f}" if "qemu-nbd" in r else " " * 10
        ratio = f"{r['ratio']:6.2f}x" if "ratio" in r else ""
        others = [f"{k} {r[k]:.2f}x" if "/" in k else f"{k} {r[k]:.0f}"
                  for k in r if k not in ("addcow", "qemu-nbd", "ratio")]  # fmt: skip
        tail = "   " + ", ".join(others) if others else ""
        print(f"{name:48} {r['addcow']:10.0f} {q} {ratio:>7}{tail}")
    cpu_us = {case: {side: statistics.median(v) for side, v in sides.items()}
              for case, sides in cpu.items()}  # fmt: skip
    for case, sides in cpu_us.items():
        figures = ", ".join(f"{side} {us:.1f}" for side, us in sides.items())
        print(f"CPU us per request, {case}: {figures}")
    for kind, session in sessions.items():
        print(f"TLS session with {kind}: {session}")
    info = {"size": size, "runs": args.runs, "fio_seconds": args.seconds, "anchors": list(anchors),
            "event_loop": os.environ["ADDCOW_EVENT_LOOP"]}  # fmt: skip
    run.write(
        info=info,
        results=results,
        cpu_us_per_request=cpu_us,
        cpu_us_per_request_runs=cpu,
        tls_sessions=sessions,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
