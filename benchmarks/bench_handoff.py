"""Benchmark: a complete image served by ``addcow serve`` against the raw file served by QEMU.

After a handoff QEMU runs the disk's raw file through its own ``file`` node
and addcow is out of the path. What that gains cannot be timed inside a VM
here (no KVM on these machines; under TCG the guest's CPU, not its disk, is
the limit), so this measures the nearest thing that can be: the same raw file
exported over NBD by QEMU's block layer (``qemu-storage-daemon``: a ``file``
node, ``aio=threads``, no ``cache.direct``, the options a handoff gives the
node it adds, under a ``raw`` node) against ``addcow serve`` of the complete
add-cow image over that file (what the guest reaches before the handoff).
Both are NBD servers on a Unix socket, measured by the same client:

randread   ``fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32``, IOPS;
randwrite  the same with ``--rw=randwrite`` (the image is complete: no
           copy-on-write, every write goes to the raw file on both sides).

The image: ``--size`` of random data as the backing file, an add-cow image
over it streamed complete (``addcow stream``), its raw file warm in the page
cache.

Before an image is complete, QEMU can run it with no server at all through a
qcow2 view (``addcow view``): the ``view`` cases compare ``addcow serve`` of a
half-allocated image (its first half written) with ``qemu-storage-daemon``
running the qcow2 view of an identical image (``qcow2`` over a ``file`` node;
the view names the raw file as its data file and the backing file as its
backing), the same randread and randwrite.

Each case runs ``--runs`` times, the two servers interleaved (the order
changing from run to run, ``bench_nbd.compare``); the table shows median
figures and the median of the per-run ratios addcow/QEMU.

    .venv/bin/python benchmarks/bench_handoff.py [--size 1G] [--runs 3] [--seconds 5]
                                                 [--workdir DIR] [--json [DIR]]

``--json`` writes the figures to one file in ``benchmarks/results/`` (or
DIR); ``record.py`` describes it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bench_nbd
import record

CASES = ("randread", "randwrite")
SIDES = ("addcow", "qemu")


def make_image(work: Path, size: int) -> Path:
    """``a.add-cow`` over random ``base.raw``, streamed complete; its raw file warm."""
    base = bench_nbd.make_base(work, size)
    for name in ("a.add-cow", "a.raw"):
        (work / name).unlink(missing_ok=True)
    bench_nbd.sh(bench_nbd.ADDCOW, "create", "-b", str(base), "-F", "raw",
                 "-o", "image_file=a.raw", str(work / "a.add-cow"))  # fmt: skip
    bench_nbd.sh(bench_nbd.ADDCOW, "stream", str(work / "a.add-cow"))
    bench_nbd.warm(work / "a.raw")
    return work / "a.add-cow"


def make_half_images(work: Path, size: int) -> tuple[Path, Path]:
    """Two identical add-cow images over random ``base.raw``, their first half written:
    ``h.add-cow`` for addcow serve, and ``v.add-cow`` with its qcow2 view ``v.qcow2``."""
    base = bench_nbd.make_base(work, size)
    for stem in ("h", "v"):
        for suffix in (".add-cow", ".raw", ".qcow2"):
            (work / f"{stem}{suffix}").unlink(missing_ok=True)
        image = work / f"{stem}.add-cow"
        bench_nbd.sh(bench_nbd.ADDCOW, "create", "-b", str(base), "-F", "raw",
                     "-o", f"image_file={stem}.raw", str(image))  # fmt: skip
        bench_nbd.sh(bench_nbd.ADDCOW, "io", "-c",
                     f"write -P {bench_nbd.PATTERN:#x} 0 {size // 2}", str(image))  # fmt: skip
        bench_nbd.warm(work / f"{stem}.raw")
    bench_nbd.sh(bench_nbd.ADDCOW, "view", str(work / "v.add-cow"), str(work / "v.qcow2"))
    bench_nbd.warm(base)
    return work / "h.add-cow", work / "v.qcow2"


def _qsd(sock: Path, blockdevs: list[str]) -> list[str]:
    """qemu-storage-daemon exporting the last of ``blockdevs`` (``disk0``) on ``sock``."""
    cmd = ["qemu-storage-daemon"]
    for spec in blockdevs:
        cmd += ["--blockdev", spec]
    return [*cmd, "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=disk0,name=,writable=on"]  # fmt: skip


@contextmanager
def served(side: str, image: Path, sock: Path) -> Iterator[str]:
    """Serve the disk on ``sock``: the add-cow image by addcow, its raw file by QEMU
    (``qemu``), or ``image``, a qcow2 view, by QEMU (``qemu view``)."""
    sock.unlink(missing_ok=True)
    if side == "addcow":
        cmd = [bench_nbd.ADDCOW, "serve", "--foreground", "--socket", str(sock), str(image)]
    elif side == "qemu":
        raw = image.with_suffix(".raw")
        cmd = _qsd(sock, [f"driver=file,filename={raw},node-name=file0,aio=threads",
                          "driver=raw,file=file0,node-name=disk0"])  # fmt: skip
    else:
        cmd = _qsd(sock, [f"driver=file,filename={image},node-name=file0,aio=threads",
                          "driver=qcow2,file=file0,node-name=disk0"])  # fmt: skip
    with bench_nbd.running(cmd, sock, side):
        yield bench_nbd.uri(sock)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workdir")
    record.add_option(parser)
    args = parser.parse_args()
    os.environ.setdefault("ADDCOW_EVENT_LOOP", "asyncio")
    run = record.Run("bench_handoff", args)
    for tool in ("fio", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    size = int(args.size[:-1]) << {"M": 20, "G": 30}[args.size[-1]]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-handoff-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    image = make_image(work, size)
    sock = work / "s.sock"
    half, view = make_half_images(work, size)
    results: dict[str, dict[str, float]] = {}
    for case in CASES:

        def measure(side: str, rw: str = case) -> float:
            with served(side, image, sock) as target:
                return bench_nbd.fio(target, rw, args.seconds)

        results[f"fio 4k {case} QD32 (IOPS)"] = bench_nbd.compare(
            args.runs, SIDES, measure, {"ratio": ("addcow", "qemu")}
        )
    for case in CASES:

        def measure_half(side: str, rw: str = case) -> float:
            with served(side, half if side == "addcow" else view, sock) as target:
                return bench_nbd.fio(target, rw, args.seconds)

        results[f"fio 4k {case} QD32, half allocated, view (IOPS)"] = bench_nbd.compare(
            args.runs, ("addcow", "qemu view"), measure_half, {"ratio": ("addcow", "qemu view")}
        )
    bench_nbd.sh(bench_nbd.ADDCOW, "fold", str(work / "v.add-cow"))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"addcow serve's event loop: {os.environ['ADDCOW_EVENT_LOOP']}")
    print(f"{'case':48} {'addcow':>10} {'QEMU':>10} {'addcow/QEMU':>12}")
    for name, r in results.items():
        qemu = r["qemu"] if "qemu" in r else r["qemu view"]
        print(f"{name:48} {r['addcow']:10.0f} {qemu:10.0f} {r['ratio']:11.2f}x")
    info = {"size": size, "runs": args.runs, "fio_seconds": args.seconds,
            "event_loop": os.environ["ADDCOW_EVENT_LOOP"],
            "qemu": bench_nbd.sh("qemu-storage-daemon", "--version").splitlines()[0]}  # fmt: skip
    run.write(info=info, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
