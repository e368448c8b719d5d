"""Benchmarks: ``addcow serve`` against ``qemu-nbd`` serving the equivalent qcow2 overlay.

The referee is a qcow2 overlay with an external data file over the same raw
backing (``qemu-img create -f qcow2 -o data_file=q.raw -b base.raw -F raw``),
the nearest QEMU equivalent of an add-cow image, served by ``qemu-nbd
--cache=writeback --aio=threads`` (its defaults, named explicitly); ``addcow
serve`` goes through the page cache too (buffered I/O, fdatasync on FLUSH),
which is the same cache mode. Both images have their first half allocated
(written with the same bytes) over 1 GiB of random data; the page cache is
warm. Each case runs ``--runs`` times, the two servers interleaved (the order
alternating); the table shows median figures and the median of the per-run
ratios.

    .venv/bin/python benchmarks/bench_nbd.py [--size 1G] [--runs 3] [--seconds 5]
                                             [--workdir DIR] [--json] [--cases ...]

Cases:

copy    ``nbdcopy URI null:`` of the whole disk, default settings (nbdcopy uses
        4 connections when the server advertises multi-conn: addcow does,
        qemu-nbd 7.2 does not for a writable export);
copy1   the same with ``--connections=1`` for both;
randread  ``fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32``, IOPS;
randwrite ``fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=32`` into
        fresh half-allocated images, IOPS;
randwrite128k  the same with ``--bs=128k`` (writes over several clusters; no
        target in the issue, informational);
qcow2read  ``fio --rw=randread --bs=4k --iodepth=32`` of an add-cow image over a
        golden qcow2 built like a cloud image (ext4 40% full, zlib,
        benchmarks/golden.py), half of its clusters allocated (every other
        MiB, interleaved with the golden image's files), against
        ``qemu-nbd`` serving a qcow2 overlay over the same golden image with
        the same half written, IOPS;
rss     ``addcow serve`` of a 1 TiB image: resident memory after random reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import golden as golden_image

ROOT = Path(__file__).resolve().parent.parent
ADDCOW = str(Path(sys.executable).parent / "addcow")
CASES = ("copy", "copy1", "randread", "randwrite", "randwrite128k", "qcow2read", "rss")


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
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


def warm(path: Path) -> None:
    """Read a file once so that it is in the page cache."""
    buf = bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def make_images(work: Path, base: Path, size: int) -> tuple[Path, Path]:
    """A half-allocated add-cow image and the equivalent qcow2 overlay."""
    for name in ("a.add-cow", "a.raw", "q.qcow2", "q.raw"):
        (work / name).unlink(missing_ok=True)
    sh(ADDCOW, "create", "-b", str(base), "-F", "raw", "-o", "image_file=a.raw",
       str(work / "a.add-cow"))  # fmt: skip
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'q.raw'}",
       "-b", str(base), "-F", "raw", str(work / "q.qcow2"), str(size))  # fmt: skip
    half = size // 2
    sh(ADDCOW, "io", "-c", f"write -P 0x5a 0 {half}", str(work / "a.add-cow"))
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {half}", str(work / "q.qcow2"))
    for name in ("a.raw", "q.raw", "base.raw"):
        warm(work / name)
    return work / "a.add-cow", work / "q.qcow2"


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


@contextmanager
def server(
    kind: str, image: Path, sock: Path, extra: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    sock.unlink(missing_ok=True)
    if kind == "addcow":
        cmd = [ADDCOW, "serve", "--foreground", "--socket", str(sock), *extra, str(image)]
    else:
        cmd = ["qemu-nbd", "-f", "qcow2", "--cache=writeback", "--aio=threads", "-t", "-e", "16",
               "--socket", str(sock), str(image)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def nbdcopy(sock: Path, connections: int | None) -> float:
    extra = [f"--connections={connections}"] if connections else []
    start = time.perf_counter()
    sh("nbdcopy", *extra, uri(sock), "null:")
    return time.perf_counter() - start


def fio(sock: Path, rw: str, seconds: int, bs: str = "4k") -> float:
    out = sh("fio", "--name=bench", "--ioengine=nbd", f"--uri={uri(sock)}", f"--rw={rw}",
             f"--bs={bs}", "--iodepth=32", "--size=100%", "--time_based",
             f"--runtime={seconds}", "--randrepeat=1", "--output-format=json")  # fmt: skip
    job = json.loads(out[out.index("{") :])["jobs"][0]  # after "fio: connected to ..."
    return float(job["read" if rw == "randread" else "write"]["iops"])


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
        fio(sock, "randrw", seconds)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmHWM:"))  # fmt: skip
    for name in ("big.add-cow", "big.raw", "bigbase.raw"):
        (work / name).unlink(missing_ok=True)
    return rss_kb / 1024


def compare(runs: int, measure: Callable[[str], float], higher_is_better: bool) -> dict[str, float]:
    figures: dict[str, list[float]] = {"addcow": [], "qemu-nbd": []}
    ratios = []
    for i in range(runs):
        order = ["addcow", "qemu-nbd"] if i % 2 == 0 else ["qemu-nbd", "addcow"]
        got = {kind: measure(kind) for kind in order}
        for kind, value in got.items():
            figures[kind].append(value)
        a, q = got["addcow"], got["qemu-nbd"]
        ratios.append(a / q if higher_is_better else q / a)
    return {
        "addcow": statistics.median(figures["addcow"]),
        "qemu-nbd": statistics.median(figures["qemu-nbd"]),
        "ratio": statistics.median(ratios),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workdir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--addcow-args", default="", help="extra arguments for addcow serve")
    args = parser.parse_args()
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    cases = args.cases.split(",")
    extra = tuple(args.addcow_args.split())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-nbd-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    base = make_base(work, size)
    images = dict(zip(("addcow", "qemu-nbd"), make_images(work, base, size), strict=True))
    sock = work / "s.sock"
    results: dict[str, dict[str, float]] = {}

    def with_server(kind: str, fn: Callable[[Path], float], fresh: bool = False) -> float:
        if fresh:
            images.update(zip(("addcow", "qemu-nbd"), make_images(work, base, size), strict=True))
        with server(kind, images[kind], sock, extra if kind == "addcow" else ()):
            return fn(sock)

    mib = size / (1 << 20)
    if "copy" in cases:
        r = compare(args.runs, lambda k: mib / with_server(k, lambda s: nbdcopy(s, None)), True)
        results["nbdcopy to null: (MiB/s)"] = r
    if "copy1" in cases:
        r = compare(args.runs, lambda k: mib / with_server(k, lambda s: nbdcopy(s, 1)), True)
        results["nbdcopy --connections=1 (MiB/s)"] = r
    if "randread" in cases:
        r = compare(
            args.runs, lambda k: with_server(k, lambda s: fio(s, "randread", args.seconds)), True
        )
        results["fio 4k randread QD32 (IOPS)"] = r
    if "randwrite" in cases:
        r = compare(
            args.runs,
            lambda k: with_server(k, lambda s: fio(s, "randwrite", args.seconds), fresh=True),
            True,
        )
        results["fio 4k randwrite QD32, half allocated (IOPS)"] = r
    if "randwrite128k" in cases:
        r = compare(
            args.runs,
            lambda k: with_server(
                k, lambda s: fio(s, "randwrite", args.seconds, "128k"), fresh=True
            ),
            True,
        )
        results["fio 128k randwrite QD32, half allocated (IOPS)"] = r
    if "qcow2read" in cases:
        golden_images = dict(zip(("addcow", "qemu-nbd"), make_golden_images(work, size),
                                 strict=True))  # fmt: skip

        def qcow2_read(kind: str) -> float:
            with server(kind, golden_images[kind], sock, extra if kind == "addcow" else ()):
                return fio(sock, "randread", args.seconds)

        results["fio 4k randread QD32 over a golden qcow2 (IOPS)"] = compare(
            args.runs, qcow2_read, True
        )
    if "rss" in cases:
        rss = statistics.median(rss_case(work, args.seconds) for _ in range(args.runs))
        results["addcow serve RSS, 1 TiB image (MiB, peak)"] = {"addcow": rss}
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'case':48} {'addcow':>10} {'qemu-nbd':>10} {'ratio':>7}")
    for name, r in results.items():
        q = f"{r['qemu-nbd']:10.0f}" if "qemu-nbd" in r else " " * 10
        ratio = f"{r['ratio']:6.2f}x" if "ratio" in r else ""
        print(f"{name:48} {r['addcow']:10.0f} {q} {ratio:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
