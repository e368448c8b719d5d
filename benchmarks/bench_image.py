"""Benchmarks: addcow images against the raw file under them, in one run.

Every figure is compared with a baseline measured in the same run, by the same
Python process, with ``os.preadv``/``os.pwritev`` on the raw file (case 5 uses
``qemu-img bench`` on a qcow2 overlay instead, cases 6 and 7 fixed limits). Each case
is measured ``--runs`` times; the table shows the median figures and the median
of the per-run ratios. Read cases interleave addcow and raw in small chunks
within every run and are timed by the thread's CPU time (see ``interleaved``
and ``CLOCK``); write cases alternate whole runs, timed by the wall clock. The
page cache is warm and in the same state for both sides (see ``recache``).

    .venv/bin/python benchmarks/bench_image.py [--size 1G] [--runs 5] [--workdir DIR]
        [--json [DIR]] [--cases 1,3,6] [--keep] [--wall-clock] [--fail-on-miss]

``--json`` also writes the run's samples, medians and verdicts to one file in
``benchmarks/results/`` (or DIR); ``record.py`` describes it.

Cases (docs/performance.md explains each one):

1. sequential 1 MiB reads vs the raw file, of an image with every cluster
   allocated but the last (a: the bitmap is consulted on every request) and
   of a fully allocated one (b: the bitmap is not consulted);
2. sequential 1 MiB reads of an empty image over a raw backing vs the backing;
3. random 4 KiB reads (fixed seed), half the clusters allocated, vs the raw file
   (w: the same reads through a Python method that only calls ``os.preadv``);
4. sequential 1 MiB writes into unallocated clusters, then flush, vs
   raw writes then fdatasync;
5. 4 KiB copy-on-write writes in ``qemu-img bench -w -s 4k -c N``'s pattern
   vs ``qemu-img bench`` on a qcow2 overlay over the same backing;
6. a 16 TiB image with a sparse bitmap: create, open, map, memory, measured
   in a fresh subprocess each time;
7. qcow2 golden images, against fixed limits: (a) ``create`` of an add-cow
   image over a 1 GiB golden qcow2 built as cloud images are
   (``benchmarks/golden.py``: ext4 40% full, zlib), in the library and as the
   whole ``addcow create`` command; (b) open and map (``block_status`` over
   the whole disk) of an add-cow image over a 1 TiB sparse qcow2 made by
   ``qemu-img create`` and a few ``qemu-io`` writes, in a fresh subprocess
   each time, and the whole ``addcow map`` command; peak RSS of each
   subprocess from ``wait4`` (``ru_maxrss``, forked by a small launcher).
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field

import golden as golden_image
import record

import addcow

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CLUSTER = 64 * KiB
SEED = 20240229
RANDOM_READS = 200_000  # reads per run in case 3 (each side reads them all)
RANDOM_CHUNK = 2_000  # requests per timed chunk in case 3 (raw and addcow alternate)
RANDOM_LAG = 10  # chunks between the two sides in case 3: 80 MiB of pages, > the L3 cache
SEQ_CHUNK = 8  # 1 MiB requests per timed chunk in cases 1 and 2
SEQ_LAG = 8  # chunks between the two sides in cases 1 and 2: 64 MiB, > the L3 cache
QEMU_BENCH_DEFAULT_COUNT = 75_000  # qemu-img bench's default -c
SCALE_SIZE = 16 * TiB
SCALE_BACKING = 64 * MiB
SCALE_WRITES = 64  # clusters written into the 16 TiB image before it is mapped
SCALE_SECONDS = 1.0
SCALE_MEGABYTES = 100.0
GOLDEN_SIZE = GiB  # case 7a: the golden qcow2's virtual size
GOLDEN_FILL = 40  # percent of its file system holding files
GOLDEN_CREATE_SECONDS = 0.05  # case 7a: addcow.create in the library
GOLDEN_COMMAND_SECONDS = 0.2  # case 7a: the whole addcow create command
SPARSE_SIZE = TiB  # case 7b: the sparse qcow2 backing
SPARSE_WRITES = (  # case 7b: qemu-io writes into it (pattern, offset, length)
    (0x71, 0, 64 * KiB),
    (0x72, 3 * GiB + 4 * KiB, 4 * KiB),
    (0x73, 512 * GiB, 128 * KiB),
    (0x74, TiB - 64 * KiB, 64 * KiB),
)
ADDCOW = os.path.join(os.path.dirname(sys.executable), "addcow")
SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}


# -- results ---------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: medians of the samples and the verdict."""

    key: str
    case: str
    unit: str
    addcow: list[float]
    baseline: list[float]
    baseline_name: str
    target: float
    higher_is_better: bool = True
    informational: bool = False
    notes: str = ""
    ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ratios:
            pairs = zip(self.addcow, self.baseline, strict=False)
            if self.higher_is_better:
                self.ratios = [a / b for a, b in pairs if b]
            else:  # times and sizes: the ratio is limit / figure, higher is better
                self.ratios = [b / a for a, b in pairs if a]

    @classmethod
    def limit(cls, key: str, case: str, unit: str, figures: list[float], limit: float,
              notes: str = "") -> Row:  # fmt: skip
        """A row of times or sizes held to a fixed limit (ratio = limit / figure)."""
        return cls(key, case, unit, figures, [limit] * len(figures), "", 1.0,
                   higher_is_better=False, notes=notes)  # fmt: skip

    @property
    def addcow_median(self) -> float:
        return statistics.median(self.addcow)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def result(self) -> str:
        if self.informational:
            return "info"
        return "PASS" if self.ratio >= self.target else "MISS"

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(
            addcow_median=self.addcow_median,
            baseline_median=self.baseline_median,
            ratio=self.ratio,
            result=self.result,
        )
        return out


def fmt_figure(value: float, unit: str) -> str:
    if unit == "GiB/s":
        return f"{value:.2f} GiB/s"
    if unit == "IOPS":
        return f"{value / 1000:.1f}k IOPS"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.3g} {unit}"


def print_table(rows: Sequence[Row], info: dict[str, object]) -> None:
    print(
        f"addcow {addcow.__version__} from {info['addcow_module']}: {info['size_text']} image, "
        f"{info['runs']} runs (medians), {info['cpus']} CPUs ({info['cpu_model']}), "
        f"Python {info['python']}, "
        f"{info['qemu_img']}"
    )
    print(
        f"workdir {info['workdir']} ({info['workdir_fs']}); scale case on {info['scale_dir']}; "
        f"read cases timed by {info['read_clock']}"
    )
    header = ("case", "addcow", "baseline", "ratio", "target", "result")
    lines = []
    for r in rows:
        baseline = fmt_figure(r.baseline_median, r.unit)
        if not r.higher_is_better:
            baseline = f"limit {baseline}"
        lines.append(
            (
                f"{r.key} {r.case}",
                fmt_figure(r.addcow_median, r.unit),
                f"{baseline} ({r.baseline_name})" if r.baseline_name else baseline,
                f"{r.ratio:.2f}" if r.ratio < 100 else f"{r.ratio:.0f}",
                f">= {r.target:.2f}",
                r.result,
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    notes = [f"{r.key}: {r.notes}" for r in rows if r.notes]
    if notes:
        print("notes:")
        for note in notes:
            print(f"  {note}")


# -- helpers ---------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1G, 256M)")
    return int(m.group(1)) * SUFFIXES[m.group(2)]


def size_text(size: int) -> str:
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB")):
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def paired(
    runs: int,
    addcow_fn: Callable[[], float],
    baseline_fn: Callable[[], float],
    *,
    warmup: bool = False,
) -> tuple[list[float], list[float]]:
    """Run both ``runs`` times, interleaved, alternating which goes first.

    With ``warmup`` both run once first, untimed: the first large write of a
    process is slower (the kernel finds and zeroes fresh pages for the cache).
    """
    if warmup:
        baseline_fn()
        addcow_fn()
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            b.append(baseline_fn())
            a.append(addcow_fn())
        else:
            a.append(addcow_fn())
            b.append(baseline_fn())
    return a, b


def fill_file(path: str, size: int, seed: int) -> None:
    """A file of ``size`` bytes of pseudo-random data (no holes)."""
    rng = random.Random(seed)
    block = bytearray(rng.randbytes(MiB))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, MiB):
            block[:8] = off.to_bytes(8, "little")  # no two MiB alike
            n = min(MiB, size - off)
            os.pwrite(fd, memoryview(block)[:n], off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def recache(*paths: str) -> None:
    """Put whole files in the page cache, in the same state whatever wrote them.

    A file written in 64 KiB pieces (an image file filled cluster by cluster)
    sits in the page cache in smaller folios than one written or read ahead in
    large chunks, and reading it is measurably slower (about 20% for random
    4 KiB reads here). That is the kernel's doing, not the image format's, so
    every file a read case uses is written back, dropped from the cache and
    read once sequentially, which gives them all the readahead layout.
    """
    buf = memoryview(bytearray(MiB))
    for path in paths:
        with raw_fd(path) as fd:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            off = 0
            while n := os.preadv(fd, [buf], off):
                off += n


def settle() -> None:
    """Write back everything dirty before a timed write starts (untimed).

    Otherwise the previous run's writeback, and the discards of the files it
    deleted (``-o discard``), would still occupy the disk during this one.
    """
    os.sync()
    time.sleep(0.2)


def remove(*paths: str) -> None:
    for p in paths:
        with suppress(FileNotFoundError):
            os.unlink(p)


@contextmanager
def raw_fd(path: str, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best
                ):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def qemu_img_version() -> str:
    try:
        out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "qemu-img missing"
    return out.stdout.splitlines()[0].strip()


# -- timed loops (kept minimal: both sides do the same Python work) ---------------

CLOCK = time.thread_time
"""The clock of the read cases (1-3): the thread's CPU time, user and system.

Those reads never wait (the page cache is warm, no lock is taken), so their CPU
time is their wall time on an idle machine; on a shared one it leaves out the
time other processes hold the CPU, which is noise. ``--wall-clock`` makes it
``time.perf_counter``. The write cases always use the wall clock: they wait
for the disk.
"""


def read_raw(fd: int, offsets: Sequence[int], view: memoryview) -> float:
    """Seconds to ``os.preadv`` ``view`` at every offset."""
    preadv = os.preadv
    bufs = [view]
    t = CLOCK()
    for off in offsets:
        preadv(fd, bufs, off)
    return CLOCK() - t


class PreadvMethod:
    """A reader whose ``readinto`` does nothing but call ``os.preadv``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readinto(self, view: memoryview, offset: int) -> int:
        return os.preadv(self.fd, (view,), offset)


def read_img(
    img: addcow.AddCowImage | PreadvMethod, offsets: Sequence[int], view: memoryview
) -> float:
    """Seconds to ``img.readinto`` ``view`` at every offset."""
    readinto = img.readinto
    t = CLOCK()
    for off in offsets:
        readinto(view, off)
    return CLOCK() - t


def interleaved(
    runs: int,
    offsets: Sequence[int],
    chunk: int,
    lag: int,
    img: addcow.AddCowImage | PreadvMethod,
    fd: int,
    view: memoryview,
) -> tuple[list[float], list[float]]:
    """Seconds per run for addcow and raw, each reading every offset once.

    The offsets are cut in chunks of ``chunk`` requests and both sides go
    through them in step, one of them ``lag`` chunks behind the other (which
    side leads alternates from run to run, and so does which side goes first
    in each step). Both run on the same machine at the same moment, so a
    noisy neighbour slows both alike; both read the same data in the same
    page-cache state; and the lag (set to more than the CPU caches hold) keeps
    the trailing side from reading what the leading side just brought in.
    """
    chunks = [offsets[i : i + chunk] for i in range(0, len(offsets), chunk)]
    lag = min(lag, max(1, len(chunks) // 2))  # small --size: keep the two sides overlapping
    read_raw(fd, chunks[0], view)  # warm up the code paths
    read_img(img, chunks[0], view)
    a: list[float] = []
    b: list[float] = []
    for run in range(runs):
        ta = tb = 0.0
        for step in range(len(chunks) + lag):
            ahead, behind = step, step - lag
            raw_i, img_i = (ahead, behind) if run % 2 == 0 else (behind, ahead)
            if step % 2:
                if 0 <= img_i < len(chunks):
                    ta += read_img(img, chunks[img_i], view)
                if 0 <= raw_i < len(chunks):
                    tb += read_raw(fd, chunks[raw_i], view)
            else:
                if 0 <= raw_i < len(chunks):
                    tb += read_raw(fd, chunks[raw_i], view)
                if 0 <= img_i < len(chunks):
                    ta += read_img(img, chunks[img_i], view)
        a.append(ta)
        b.append(tb)
    return a, b


def overhead_note(a: list[float], b: list[float], requests: int) -> str:
    """The median extra time addcow spends per request."""
    extra = statistics.median(x - y for x, y in zip(a, b, strict=True)) / requests
    return f"addcow spends {extra * 1e9:+.0f} ns per request more than raw preadv"


# -- the cases -------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.size: int = args.size
        self.runs: int = args.runs
        self.dir = workdir
        self.base = self.path("base.raw")  # the backing file, data everywhere
        self.data = self.path("data.raw")  # the raw file of cases 1 and 3
        self.qemu_count: int = min(args.qemu_count, self.size // (4 * KiB))
        self.random_reads: int = args.random_reads
        self.scale_dir = ""

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def setup(self) -> None:
        log(f"setup: writing {size_text(self.size)} backing file and raw file")
        fill_file(self.base, self.size, SEED)
        fill_file(self.data, self.size, SEED + 1)

    # 1. sequential reads, fully allocated ------------------------------------------

    def make_full(self, name: str, *, all_but_last: bool = False) -> str:
        """An image over data.raw with every cluster allocated (or all but the last).

        data.raw already holds the disk's bytes. ``create`` refuses an image file
        that holds data unless ``image_file_raw`` accepts it as the disk; for all
        but the last cluster, data.raw is cut before the last cluster for
        ``create`` and that cluster's bytes are put back after it. A library
        without ``image_file_raw`` takes the file as it is, and every cluster is
        written with the bytes it holds, which only sets the bits.
        """
        meta = self.path(name)
        end = self.size - CLUSTER if all_but_last else self.size
        if "image_file_raw" in inspect.signature(addcow.create).parameters:
            tail = bytearray(CLUSTER)
            with raw_fd(self.data, os.O_RDWR) as fd:
                if all_but_last:
                    os.preadv(fd, [tail], end)
                    os.ftruncate(fd, end)
                addcow.create(meta, image_file=self.data, size=self.size, image_file_raw=True)
                if all_but_last:
                    os.pwritev(fd, [tail], end)
                    os.fsync(fd)
        else:
            addcow.create(meta, image_file=self.data, size=self.size)
            view = memoryview(bytearray(MiB))
            with raw_fd(self.data) as fd, addcow.open(meta) as img:
                for off in range(0, end, MiB):
                    part = view[: min(MiB, end - off)]
                    os.preadv(fd, [part], off)
                    img.write(part, off)  # the same bytes: only the bits change
        with addcow.open(meta, readonly=True) as img:
            if img.allocated_clusters != end // CLUSTER:
                raise RuntimeError(f"{meta}: {img.allocated_clusters} clusters allocated")
        return meta

    def read_case(
        self,
        key: str,
        case: str,
        meta: str,
        raw: str,
        offsets: Sequence[int],
        chunk: int,
        lag: int,
        view: memoryview,
        target: float,
        baseline_name: str = "raw",
        notes: str = "",
        check_at: Sequence[int] | None = None,
    ) -> Row:
        """Interleaved runs of readinto on ``meta`` vs preadv on ``raw``."""
        with raw_fd(raw) as fd, addcow.open(meta, readonly=True) as img:
            if check_at is None:
                check_at = (0, self.size // 2, self.size - MiB)
            check_same(img, fd, check_at)
            a, b = interleaved(self.runs, offsets, chunk, lag, img, fd, view)
        requests = len(offsets)
        nbytes = requests * len(view)
        if len(view) >= MiB:
            unit = "GiB/s"
            fig_a, fig_b = [nbytes / x / GiB for x in a], [nbytes / x / GiB for x in b]
        else:
            unit = "IOPS"
            fig_a, fig_b = [requests / x for x in a], [requests / x for x in b]
        note = overhead_note(a, b, requests)
        return Row(
            key,
            case,
            unit,
            fig_a,
            fig_b,
            baseline_name,
            target,
            notes=f"{notes}; {note}" if notes else note,
        )

    def case1(self) -> list[Row]:
        log("case 1: sequential 1 MiB reads, fully allocated image vs raw file")
        view = memoryview(bytearray(MiB))
        rows = []
        # One image over data.raw at a time: create refuses an image file that
        # another image names, so 1a's .add-cow file goes before 1b's is made.
        for key, name, all_but_last, what, checked in (
            ("1a", "almost-full.add-cow", True, "all clusters but the last: bitmap consulted",
             (0, self.size // 2)),
            ("1b", "full.add-cow", False, "fully allocated (ALL_ALLOCATED)",
             (0, self.size // 2, self.size - MiB)),
        ):  # fmt: skip
            meta = self.make_full(name, all_but_last=all_but_last)
            recache(self.data)
            rows.append(
                self.read_case(
                    key,
                    f"seq read 1M, {what}",
                    meta,
                    self.data,
                    range(0, self.size, MiB),
                    SEQ_CHUNK,
                    SEQ_LAG,
                    view,
                    0.95,
                    check_at=checked,
                )
            )
            remove(meta)
        return rows

    # 2. sequential reads, empty image over a raw backing -----------------------------

    def case2(self) -> list[Row]:
        log("case 2: sequential 1 MiB reads, empty image over raw backing vs the backing")
        meta = self.path("empty.add-cow")
        addcow.create(
            meta, image_file=self.path("empty.raw"), backing_file=self.base, backing_format="raw"
        )
        recache(self.base)
        view = memoryview(bytearray(MiB))
        what = "seq read 1M, empty image over raw backing"
        return [
            self.read_case(
                "2",
                what,
                meta,
                self.base,
                range(0, self.size, MiB),
                SEQ_CHUNK,
                SEQ_LAG,
                view,
                0.95,
                baseline_name="backing",
            )
        ]

    # 3. random 4 KiB reads, half the clusters allocated -------------------------------

    def case3(self) -> list[Row]:
        log("case 3: random 4 KiB reads, half the clusters allocated vs raw file")
        meta = self.path("half.add-cow")
        addcow.create(
            meta, image_file=self.path("half.raw"), backing_file=self.base, backing_format="raw"
        )
        rng = random.Random(SEED)
        clusters = self.size // CLUSTER
        chosen = sorted(rng.sample(range(clusters), clusters // 2))
        block = memoryview(rng.randbytes(CLUSTER))
        with addcow.open(meta) as img:
            for c in chosen:
                img.write(block, c * CLUSTER)
        blocks = self.size // (4 * KiB)
        offsets = [rng.randrange(blocks) * 4 * KiB for _ in range(self.random_reads)]
        with addcow.open(meta, readonly=True) as img:
            if img.allocated_clusters != clusters // 2:
                raise RuntimeError(f"{meta}: {img.allocated_clusters} clusters allocated")
            inside = sum(1 for off in offsets if img.bitmap.is_set(off // CLUSTER))
            free = next(c for c in range(clusters) if not img.bitmap.is_set(c))
            with raw_fd(self.base) as fd:
                if img.read(chosen[0] * CLUSTER, CLUSTER) != block or img.read(
                    free * CLUSTER, CLUSTER
                ) != os.pread(fd, CLUSTER, free * CLUSTER):
                    raise RuntimeError(f"{meta}: reads do not match what was written")
        recache(self.data, self.base, self.path("half.raw"))
        view = memoryview(bytearray(4 * KiB))
        notes = (
            f"{len(offsets)} reads per run, seed {SEED}, "
            f"{inside / len(offsets):.0%} of them in allocated clusters"
        )
        what = "random 4k reads, half the clusters allocated"
        row = self.read_case(
            "3", what, meta, self.data, offsets, RANDOM_CHUNK, RANDOM_LAG, view, 0.80,
            notes=notes, check_at=(),
        )  # fmt: skip
        # The same reads through a Python method that only calls os.preadv: the
        # floor of any readinto written in Python, measured in the same run.
        with raw_fd(self.data) as fd:
            a, b = interleaved(
                self.runs, offsets, RANDOM_CHUNK, RANDOM_LAG, PreadvMethod(fd), fd, view
            )
        floor = Row(
            "3w", "random 4k reads, a Python method calling only os.preadv", "IOPS",
            [len(offsets) / x for x in a], [len(offsets) / x for x in b], "raw", 0.80,
            informational=True, notes="the floor of any interpreted readinto",
        )  # fmt: skip
        return [row, floor]

    # 4. sequential writes into unallocated clusters, then flush -----------------------

    def case4(self) -> list[Row]:
        log("case 4: sequential 1 MiB writes into unallocated clusters + flush vs raw + fdatasync")
        payload = memoryview(random.Random(SEED + 4).randbytes(MiB))
        meta, image, raw = self.path("w.add-cow"), self.path("w.raw"), self.path("w-base.raw")

        def run_addcow() -> float:
            remove(meta, image)
            addcow.create(meta, image_file=image, backing_file=self.base, backing_format="raw")
            with addcow.open(meta) as img:
                write = img.write
                settle()
                t = time.perf_counter()
                for off in range(0, self.size, MiB):
                    write(payload, off)
                img.flush()
                elapsed = time.perf_counter() - t
            remove(meta, image)
            return self.size / elapsed / GiB

        def run_raw() -> float:
            remove(raw)
            with raw_fd(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC) as fd:
                os.ftruncate(fd, self.size)  # sparse, like a new add-cow image file
                os.fdatasync(fd)
                pwritev = os.pwritev
                bufs = [payload]
                settle()
                t = time.perf_counter()
                for off in range(0, self.size, MiB):
                    pwritev(fd, bufs, off)
                os.fdatasync(fd)
                elapsed = time.perf_counter() - t
            remove(raw)
            return self.size / elapsed / GiB

        a, b = paired(self.runs, run_addcow, run_raw, warmup=True)
        return [
            Row(
                "4",
                "seq write 1M into unallocated clusters + flush",
                "GiB/s",
                a,
                b,
                "raw+fdatasync",
                0.80,
                notes="fresh sparse files every run, system synced before each (untimed); "
                "the time includes flush / fdatasync",
            )
        ]

    # 5. 4 KiB copy-on-write writes vs qemu-img bench on a qcow2 overlay ---------------

    def qemu_bench(self, data_file: bool) -> tuple[float, int]:
        """IOPS of ``qemu-img bench -w -s 4k -c N -t writeback`` on a fresh overlay."""
        overlay = self.path("ov.qcow2")
        raw = self.path("ov-data.raw")
        remove(overlay, raw)
        opts = "cluster_size=65536" + (f",data_file={raw}" if data_file else "")
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
        subprocess.run([*create, "-b", self.base, "-F", "raw", overlay], check=True)
        bench = ["qemu-img", "bench", "-w", "-s", "4k", "-c", str(self.qemu_count)]
        out = subprocess.run(
            [*bench, "-t", "writeback", "-f", "qcow2", overlay],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        remove(overlay, raw)
        m = re.search(r"Run completed in ([0-9.]+) seconds", out)
        depth = re.search(r"(\d+) in parallel", out)
        if not m or not depth or "step size 4096" not in out or "offset 0," not in out:
            raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
        return self.qemu_count / float(m.group(1)), int(depth.group(1))

    def addcow_cow_writes(self) -> float:
        """The same requests as qemu-img bench: N writes of 4 KiB of zeros at 0, 4k, 8k..."""
        meta, image = self.path("cow.add-cow"), self.path("cow.raw")
        remove(meta, image)
        addcow.create(meta, image_file=image, backing_file=self.base, backing_format="raw")
        buf = memoryview(bytes(4 * KiB))  # qemu-img bench writes pattern 0 by default
        offsets = [(i * 4 * KiB) % self.size for i in range(self.qemu_count)]
        with addcow.open(meta) as img:
            write = img.write
            t = time.perf_counter()
            for off in offsets:
                write(buf, off)
            elapsed = time.perf_counter() - t
        remove(meta, image)
        return self.qemu_count / elapsed

    def case5(self) -> list[Row]:
        log("case 5: 4 KiB copy-on-write writes vs qemu-img bench on a qcow2 overlay")
        depth = 0
        rows = []
        for key, data_file, informational, what in (
            ("5", False, False, "qcow2"),
            ("5i", True, True, "qcow2 data_file"),
        ):

            def qemu(data_file: bool = data_file) -> float:
                nonlocal depth
                iops, depth = self.qemu_bench(data_file)
                return iops

            a, b = paired(self.runs, self.addcow_cow_writes, qemu)
            rows.append(
                Row(
                    key,
                    f"4k COW writes, qemu-img bench pattern, vs {what}",
                    "IOPS",
                    a,
                    b,
                    what,
                    1.0,
                    informational=informational,
                    notes=(
                        f"-c {self.qemu_count} -s 4k, offsets 0,4k,8k.. (step = size), "
                        f"qemu depth {depth}, -t writeback, no flush in the timed part; "
                        "addcow issues the same requests in order from one thread"
                        if not informational
                        else "qcow2 with an external data_file (clusters 1:1, the nearest "
                        "QEMU equivalent of add-cow)"
                    ),
                )
            )
        return rows

    # 6. scale: a 16 TiB image with a sparse bitmap ------------------------------------

    def scale_location(self) -> str:
        """A directory whose file system holds a 16 TiB sparse file (ext4 cannot)."""
        for directory in (self.dir, "/dev/shm"):
            probe = os.path.join(directory, ".addcow-bench-16t-probe")
            try:
                with raw_fd(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC) as fd:
                    os.ftruncate(fd, SCALE_SIZE)
            except OSError as exc:
                if exc.errno not in (errno.EFBIG, errno.EINVAL, errno.ENOSPC):
                    raise
                continue
            finally:
                remove(probe)
            if directory == self.dir:
                return self.dir
            return tempfile.mkdtemp(prefix="addcow-bench-scale-", dir=directory)
        raise RuntimeError("no file system here holds a 16 TiB sparse file")

    def case6(self) -> list[Row]:
        log("case 6: 16 TiB image with a sparse bitmap: create, open, map, memory")
        self.scale_dir = self.scale_location()
        backing = os.path.join(self.scale_dir, "scale-base.raw")
        fill_file(backing, SCALE_BACKING, SEED + 6)
        rows = []
        try:
            for key, with_backing in (("6a", False), ("6b", True)):
                timed = [
                    self.scale_child(with_backing, backing, trace=False) for _ in range(self.runs)
                ]
                traced = self.scale_child(with_backing, backing, trace=True)
                what = "no backing"
                if with_backing:
                    what = f"with {SCALE_BACKING // MiB} MiB raw backing"
                start_mb = timed[0]["rss_at_start"] / 1e6
                extents = timed[0]["extents"]
                for step in ("create", "open", "map"):
                    rows.append(
                        Row.limit(
                            key,
                            f"16 TiB {step}, {what}",
                            "s",
                            [r[step] for r in timed],
                            SCALE_SECONDS,
                            notes=(
                                f"{SCALE_WRITES} clusters written, map walks {extents} extents"
                                if step == "map"
                                else ""
                            ),
                        )
                    )
                rows.append(
                    Row.limit(
                        key,
                        f"16 TiB peak RSS, {what}",
                        "MB",
                        [r["max_rss"] / 1e6 for r in timed],
                        SCALE_MEGABYTES,
                        notes=(
                            f"whole subprocess ({start_mb:.0f} MB before the first step); "
                            "tracemalloc peak of the same steps: "
                            f"{traced['traced_peak'] / 1e6:.1f} MB"
                        ),
                    )
                )
        finally:
            remove(backing)
            if self.scale_dir != self.dir:
                shutil.rmtree(self.scale_dir, ignore_errors=True)
        return rows

    def scale_child(self, with_backing: bool, backing: str, *, trace: bool) -> dict[str, float]:
        cmd = [sys.executable, os.path.abspath(__file__), "--scale-child", self.scale_dir]
        if with_backing:
            cmd += ["--scale-backing", backing]
        if trace:
            cmd.append("--scale-trace")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result: dict[str, float] = json.loads(out)
        return result

    # 7. qcow2 golden images: create over a cloud-like one, open and map a 1 TiB one ----

    def case7(self) -> list[Row]:
        log("case 7: qcow2 golden images: create over 1 GiB compressed, open and map 1 TiB sparse")
        for tool in ("qemu-img", "qemu-io", "mke2fs"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"case 7 needs {tool}")
        compile_package()
        return [*self.golden_create(), *self.sparse_open_map()]

    def golden_create(self) -> list[Row]:
        log(f"  building the golden qcow2 ({size_text(GOLDEN_SIZE)}, {GOLDEN_FILL}% full)")
        fs, golden = golden_image.build(self.dir, GOLDEN_SIZE, fill=GOLDEN_FILL)
        remove(fs)
        meta, image = self.path("golden.add-cow"), self.path("golden-img.raw")
        command = [ADDCOW, "create", "-q", "-b", golden, "-F", "qcow2",
                   "-o", f"image_file={image}", meta]  # fmt: skip
        recache(golden)

        def library() -> float:
            remove(meta, image)
            t = time.perf_counter()
            addcow.create(meta, image_file=image, backing_file=golden, backing_format="qcow2")
            elapsed = time.perf_counter() - t
            remove(meta, image)
            return elapsed

        def whole_command() -> float:
            remove(meta, image)
            _, elapsed, _ = measured(command)
            with addcow.open(meta, readonly=True) as img:
                if img.size != GOLDEN_SIZE or img.allocated_clusters != 0:
                    raise RuntimeError(f"{meta}: not an empty {GOLDEN_SIZE}-byte image")
            remove(meta, image)
            return elapsed

        library()  # untimed: the first create opens the golden image's pages
        whole_command()
        a, b = paired(self.runs, library, whole_command)
        golden_mb = os.stat(golden).st_size / 1e6
        remove(golden)
        what = f"{size_text(GOLDEN_SIZE)} zlib qcow2 golden ({golden_mb:.0f} MB file)"
        return [
            Row.limit(
                "7a",
                f"create over {what}, library",
                "s",
                a,
                GOLDEN_CREATE_SECONDS,
                notes="addcow.create (reads the qcow2 header, names and sizes; "
                "creates the .add-cow and a sparse image file)",
            ),
            Row.limit(
                "7a",
                "`addcow create -b G -F qcow2`, whole command",
                "s",
                b,
                GOLDEN_COMMAND_SECONDS,
                notes="wall time of the process, bytecode compiled (compileall) first",
            ),
        ]

    def sparse_open_map(self) -> list[Row]:
        log(f"  a {size_text(SPARSE_SIZE)} sparse qcow2 backing, {len(SPARSE_WRITES)} writes")
        backing = self.path("sparse.qcow2")
        meta, image = self.path("sparse.add-cow"), self.path("sparse-img.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", backing, str(SPARSE_SIZE)],
                       check=True)  # fmt: skip
        writes = [arg for p, off, n in SPARSE_WRITES for arg in ("-c", f"write -P {p} {off} {n}")]
        subprocess.run(["qemu-io", "-f", "qcow2", *writes, backing], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        qemu_map = json.loads(subprocess.run(["qemu-img", "map", "--output=json", backing],
                                             capture_output=True, check=True).stdout)  # fmt: skip
        expected = sparse_data_ranges()
        if [(e["start"], e["length"]) for e in qemu_map if e["data"]] != expected:
            raise RuntimeError(f"qemu-img map of {backing}: {qemu_map}")
        addcow.create(meta, image_file=image, backing_file=backing, backing_format="qcow2")
        child = [sys.executable, os.path.abspath(__file__), "--sparse-child", meta]
        command = [ADDCOW, "map", "--output=json", meta]
        results: list[dict[str, float]] = []
        commands: list[tuple[float, int]] = []
        try:
            measured(child)  # untimed: the first run reads the files into the page cache
            for _ in range(self.runs):
                out, _, rss = measured(child)
                result: dict[str, float] = json.loads(out)
                result["max_rss"] = rss
                results.append(result)
                out, elapsed, rss = measured(command)
                data = [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]
                if data != expected:
                    raise RuntimeError(f"addcow map of {meta}: data at {data}")
                commands.append((elapsed, rss))
        finally:
            remove(meta, image, backing)
        what = f"{size_text(SPARSE_SIZE)} sparse qcow2 backing"
        extents = results[0]["extents"]
        start_mb = results[0]["rss_at_start"] / 1e6
        rows = [
            Row.limit(
                "7b",
                f"open add-cow over {what}",
                "s",
                [r["open"] for r in results],
                SCALE_SECONDS,
                notes="addcow.open(readonly=True) in a fresh subprocess: the add-cow "
                "header and bitmap, the qcow2 header and L1 table",
            ),
            Row.limit(
                "7b",
                f"map (block_status, whole disk) over {what}",
                "s",
                [r["map"] for r in results],
                SCALE_SECONDS,
                notes=f"{len(SPARSE_WRITES)} qemu-io writes in the qcow2, "
                f"{extents} extents, the written bytes read back and checked",
            ),
            Row.limit(
                "7b",
                f"peak RSS, open + map over {what}",
                "MB",
                [r["max_rss"] / 1e6 for r in results],
                SCALE_MEGABYTES,
                notes=f"ru_maxrss of the whole subprocess from wait4 ({start_mb:.0f} MB "
                "VmHWM before the first step: interpreter and imports)",
            ),
            Row.limit(
                "7b",
                f"`addcow map --output=json` over {what}, whole command",
                "s",
                [t for t, _ in commands],
                SCALE_SECONDS,
                notes="wall time of the process, output parsed and checked against the writes",
            ),
            Row.limit(
                "7b",
                "peak RSS, `addcow map` command",
                "MB",
                [m / 1e6 for _, m in commands],
                SCALE_MEGABYTES,
                notes="ru_maxrss of the process from wait4, forked by a small launcher "
                "(see LAUNCHER)",
            ),
        ]
        return rows


LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = next(line for line in f if line.startswith("VmHWM:")).split()[1]
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {elapsed} {usage.ru_maxrss} {hwm}")
"""
"""Runs a command and writes its exit code, wall time and ``ru_maxrss`` (``wait4``).

A child's ``ru_maxrss`` counts the memory of the process it was forked from
(the kernel carries the old address space's high-water mark across
``execve``): a command forked by this script would report this script's
RSS if that is larger. So the command is forked by this small launcher
(``python -I -S``, about 5 MB), whose own high-water mark is reported too.
"""


def measured(cmd: Sequence[str]) -> tuple[str, float, int]:
    """stdout, wall seconds and peak RSS in bytes of one whole process (see ``LAUNCHER``)."""
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile() as out:
        report = os.path.join(d, "rusage")
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, report, *cmd],
            stdout=out,
            stderr=subprocess.PIPE,
            check=False,
        )
        with open(report) as f:
            code, elapsed, maxrss, launcher = f.read().split()
        if proc.returncode or int(code):
            raise RuntimeError(f"{' '.join(cmd)} exited {code}: {proc.stderr.decode()}")
        if int(maxrss) <= int(launcher):
            raise RuntimeError(f"{' '.join(cmd)}: peak RSS {maxrss} kB, not above the launcher's")
        out.seek(0)
        return out.read().decode(), float(elapsed), int(maxrss) * KiB


def compile_package() -> None:
    """Compile the package's bytecode, as ``pip install`` does (see bench_lifecycle.py)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.dirname(addcow.__file__)], check=True
    )


def sparse_data_ranges() -> list[tuple[int, int]]:
    """The data ranges of case 7b's qcow2: its writes rounded out to whole clusters."""
    ranges: list[tuple[int, int]] = []
    for _, off, n in SPARSE_WRITES:
        lo, hi = off // CLUSTER * CLUSTER, -(-(off + n) // CLUSTER) * CLUSTER
        if ranges and ranges[-1][0] + ranges[-1][1] == lo:
            lo = ranges.pop()[0]
        ranges.append((lo, hi - lo))
    return ranges


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM``, which belongs to the address space
    ``execve`` made (``ru_maxrss`` keeps the high-water mark of the process forked from)."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * KiB


def sparse_child(meta: str) -> None:
    """Open and map an add-cow image over the 1 TiB sparse qcow2; print the figures as JSON."""
    rss_at_start = peak_rss()
    t = time.perf_counter()
    img = addcow.open(meta, readonly=True)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    extents = list(img.block_status())
    t_map = time.perf_counter() - t
    try:
        data = [(e.offset, e.length) for e in extents if e.depth == 1 and e.present]
        if data != sparse_data_ranges():
            raise RuntimeError(f"{meta}: data extents {data}")
        for byte, off, n in SPARSE_WRITES:
            if img.read(off, n) != bytes([byte]) * n:
                raise RuntimeError(f"{meta}: wrong bytes at {off}")
    finally:
        img.close()
    result = {"open": t_open, "map": t_map, "extents": len(extents), "rss_at_start": rss_at_start}
    print(json.dumps(result))


def check_same(img: addcow.AddCowImage, fd: int, offsets: Sequence[int]) -> None:
    """A cheap check that the image reads what the raw file holds (1 MiB at each offset)."""
    a = memoryview(bytearray(MiB))
    b = memoryview(bytearray(MiB))
    for off in offsets:
        start = off // MiB * MiB
        img.readinto(a, start)
        os.preadv(fd, [b], start)
        if a != b:
            raise RuntimeError(f"{img.path}: reads differ from the raw file at {start}")


def scale_child(directory: str, backing: str | None, trace: bool) -> None:
    """Create, populate lightly, open and map a 16 TiB image; print the figures as JSON."""
    rss_at_start = peak_rss()
    if trace:
        import tracemalloc

        tracemalloc.start()
    meta = os.path.join(directory, "scale.add-cow")
    image = os.path.join(directory, "scale.raw")
    remove(meta, image)
    try:
        t = time.perf_counter()
        addcow.create(
            meta,
            image_file=image,
            size=SCALE_SIZE,
            backing_file=backing,
            backing_format="raw" if backing else None,
        )
        t_create = time.perf_counter() - t
        # A sparse bitmap: a few clusters spread over the disk, a few in the backing.
        offsets = [i * (SCALE_SIZE // SCALE_WRITES) + 4 * KiB for i in range(SCALE_WRITES)]
        offsets += [i * MiB for i in range(1, 9)]
        with addcow.open(meta) as writer:
            for off in offsets:
                writer.write(b"\x5a" * 4096, off)
        del writer  # its bitmap must not stay alive while the next open reads another
        t = time.perf_counter()
        img = addcow.open(meta, readonly=True)
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        extents = sum(1 for _ in img.block_status())
        t_map = time.perf_counter() - t
        img.close()
        result = {
            "create": t_create,
            "open": t_open,
            "map": t_map,
            "extents": extents,
            "max_rss": peak_rss(),
            "rss_at_start": rss_at_start,
        }
        if trace:
            result["traced_peak"] = tracemalloc.get_traced_memory()[1]
        print(json.dumps(result))
    finally:
        remove(meta, image)


# -- main ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=GiB, help="image size (default 1G)")
    p.add_argument("--runs", type=int, default=5, help="measurements per case (default 5)")
    p.add_argument(
        "--workdir",
        help="directory in which a temporary work directory is made and removed (default: $TMPDIR)",
    )
    record.add_option(p)
    p.add_argument("--cases", default="1,2,3,4,5,6,7", help="which cases to run (default all)")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--qemu-count",
        type=int,
        default=QEMU_BENCH_DEFAULT_COUNT,
        help="requests of case 5 (qemu-img bench -c; default its own 75000)",
    )
    p.add_argument(
        "--random-reads",
        type=int,
        default=RANDOM_READS,
        help=f"reads per run of case 3 (default {RANDOM_READS})",
    )
    p.add_argument(
        "--wall-clock",
        action="store_true",
        help="time the read cases (1-3) by the wall clock instead of the thread's CPU "
        "time (which is steadier on a machine shared with other busy processes)",
    )
    p.add_argument("--scale-child", help=argparse.SUPPRESS)
    p.add_argument("--scale-backing", help=argparse.SUPPRESS)
    p.add_argument("--scale-trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sparse-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_child:
        scale_child(args.scale_child, args.scale_backing, args.scale_trace)
        return 0
    if args.sparse_child:
        sparse_child(args.sparse_child)
        return 0
    if args.size % MiB or args.size < 4 * MiB:
        p.error("--size must be a multiple of 1 MiB, at least 4 MiB")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.wall_clock:
        global CLOCK
        CLOCK = time.perf_counter
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not cases <= set("1234567"):
        p.error(f"unknown case in --cases {args.cases!r} (use 1..7)")

    run = record.Run("bench_image", args)
    parent = args.workdir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="addcow-bench-", dir=parent)
    bench = Bench(args, workdir)
    started = time.perf_counter()
    rows: list[Row] = []
    try:
        if cases & set("12345"):
            bench.setup()
        for case in "1234567":
            if case in cases:
                rows += getattr(bench, f"case{case}")()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    info: dict[str, object] = {
        "size": args.size,
        "size_text": size_text(args.size),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "addcow_module": os.path.dirname(addcow.__file__),
        "platform": platform.platform(),
        "cpu_model": record.cpu_model(),
        "qemu_img": qemu_img_version(),
        "workdir": workdir,
        "workdir_fs": fs_type(parent),
        "scale_dir": (
            f"{bench.scale_dir} ({fs_type(bench.scale_dir)})" if bench.scale_dir else "-"
        ),
        "read_clock": "wall clock" if args.wall_clock else "thread CPU time",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print_table(rows, info)
    print(f"({info['seconds']} s)")
    run.write(info=info, rows=[r.as_dict() for r in rows])
    if args.fail_on_miss and any(r.result == "MISS" for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
