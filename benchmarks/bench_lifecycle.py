"""Benchmarks: ``addcow stream`` and ``addcow commit`` against qemu-img, in one run.

Every figure is the wall time of a whole process, as a user runs it
(``.venv/bin/addcow stream -q IMG``, ``qemu-img convert ...``), started from
this script with ``subprocess``. Each case is measured ``--runs`` times, the
sides interleaved (the order rotates from run to run); the table shows the
median times and the median of the per-run ratios. The page cache is warm:
the backing file (and, for commit, the overlay) is read just before each timed
command, and ``sync`` runs before and after every timed command (untimed), so
no command pays for another's dirty pages. Disk usage is ``st_blocks`` of the
output file after that ``sync``.

    .venv/bin/python benchmarks/bench_lifecycle.py [--size 1G] [--runs 3] [--workdir DIR]
                                                   [--cases a,b,c,commit] [--json [DIR]] [--keep]

``--json`` also writes the run's samples, medians and verdicts to one file in
``benchmarks/results/`` (or DIR); ``record.py`` describes it.

Run it against another copy of the library with ``PYTHONPATH=DIR`` (the
``addcow`` processes inherit the environment; the first line of the output
names the module used).

Backings (``--size`` each; 64 KiB clusters; data placed with a fixed seed):

a. random data everywhere;
b. 10% of the clusters random data, the rest holes;
c. 10% of the clusters random data, the rest explicit zero bytes (allocated);
q. a golden image built the way cloud images are: an ext4 file system about
   40% full of files (text and half-random data), made with ``mke2fs -d``,
   then ``qemu-img convert -c -O qcow2`` (zlib, 64 KiB clusters).

Cases:

stream
    ``addcow create`` of a fresh add-cow over the backing (untimed), then
    ``addcow stream -q`` (timed) vs ``qemu-img convert -O raw`` of the
    equivalent qcow2 overlay (``qemu-img create -f qcow2 -b B -F raw -o
    cluster_size=64k``) vs ``cp --sparse=always`` of the backing. Targets: time
    <= 1.0x qemu-img convert, at least the speed of ``qemu-img convert -t
    writeback`` (column ``x -t wb``), and the raw image file uses no more
    blocks than qemu-img's output. ``qemu-img convert`` runs with its default cache mode for
    the destination, ``unsafe``: it never syncs, while ``addcow stream`` must
    make its data durable (fdatasync) as it goes. The informational column
    ``qemu -t wb`` is ``qemu-img convert -t writeback``, which syncs once at the
    end: the same durability as addcow. ``cp+sync`` is ``cp --sparse=always``
    followed by ``sync -d`` of its output: the same copy, made durable, by a C
    tool with no start-up cost to speak of; a floor for any durable stream.
    The script first compiles the package's bytecode (``compileall``), as
    ``pip install`` does: an editable checkout under PYTHONDONTWRITEBYTECODE=1
    would otherwise compile every module at each start.
stream q
    ``addcow stream -q`` of a fresh add-cow over the golden qcow2 vs ``qemu-img
    convert -O raw -t writeback`` of the same qcow2 (the same durable work:
    decompress, write sparse, sync once). Target: at least 1.2x its speed
    (both cores inflate: zlib releases the GIL). The same case
    times ``addcow.create`` over the golden image in the library (target under
    50 ms) and the whole ``addcow create`` command (target under 0.2 s).
commit
    an overlay with 25% of its clusters written (the same clusters, the same
    bytes, on both sides), committed into a fresh copy of backing (a):
    ``addcow commit -q`` vs ``qemu-img commit -q -d`` (the overlay is kept, as
    addcow keeps its image: the same work) and vs plain ``qemu-img commit -q``
    (which also empties the overlay; that row is informational). Each written
    cluster holds one byte value (1..255), so that ``qemu-io write -P`` and the
    library write the same bytes.

The first run checks the results: every stream output must hash equal to its
backing, and the backings committed by the two sides must hash equal.
"""

from __future__ import annotations

import argparse
import hashlib
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
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field

import golden as golden_image
import record

import addcow

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CLUSTER = 64 * KiB
SEED = 20240229
DATA_FRACTION = 10  # percent of the clusters holding data in backings b and c
COMMIT_FRACTION = 25  # percent of the clusters written in the commit overlays
CHUNK = 4 * MiB
SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": GiB * 1024}
BACKINGS = {
    "a": "random data",
    "b": "10% data, 90% holes",
    "c": "10% data, 90% zero bytes",
}
GOLDEN = "q"
GOLDEN_FILL = 40  # percent of the file system holding files
ADDCOW = os.path.join(os.path.dirname(sys.executable), "addcow")


# -- results ---------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: per-run samples, medians and verdicts."""

    case: str
    addcow: list[float]
    qemu: list[float]
    qemu_name: str
    extra: dict[str, list[float]] = field(default_factory=dict)  # informational times
    blocks_addcow: list[int] = field(default_factory=list)
    blocks_qemu: list[int] = field(default_factory=list)
    target: float = 1.0
    informational: bool = False
    speed_target: float | None = None  # x qemu-img convert -t writeback, when it is a goal

    @property
    def writeback(self) -> list[float]:
        """``qemu-img convert -t writeback`` times: the durable peer."""
        if self.qemu_name.endswith("-t writeback"):
            return self.qemu
        return self.extra.get("qemu -t writeback", [])

    @property
    def speed(self) -> float | None:
        """Median of the per-run speed ratios against ``-t writeback`` (above 1: faster)."""
        wb = self.writeback
        if not wb:
            return None
        return statistics.median(q / a for q, a in zip(wb, self.addcow, strict=True))

    @property
    def speed_result(self) -> str:
        if self.speed_target is None or self.speed is None:
            return "-"
        return "PASS" if self.speed >= self.speed_target else "MISS"

    @property
    def ratios(self) -> list[float]:
        return [a / q for a, q in zip(self.addcow, self.qemu, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def time_result(self) -> str:
        if self.informational:
            return "info"
        return "PASS" if self.ratio <= self.target else "MISS"

    @property
    def blocks_result(self) -> str:
        if not self.blocks_addcow:
            return ""
        return "PASS" if max(self.blocks_addcow) <= min(self.blocks_qemu) else "MISS"

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(
            addcow_median=statistics.median(self.addcow),
            qemu_median=statistics.median(self.qemu),
            extra_median={k: statistics.median(v) for k, v in self.extra.items()},
            ratio=self.ratio,
            time_result=self.time_result,
            blocks_result=self.blocks_result,
            speed=self.speed,
            speed_result=self.speed_result,
        )
        return out


def print_table(rows: Sequence[Row], info: dict[str, object]) -> None:
    print(
        f"addcow {addcow.__version__} from {info['addcow_module']}: {info['size_text']} "
        f"backings, {info['runs']} runs (medians), {info['cpus']} CPUs, Python "
        f"{info['python']}, {info['qemu_img']}, workdir {info['workdir']} "
        f"({info['workdir_fs']}), {info['seconds']:.0f} s in all"
    )
    header = (
        "case",
        "addcow s",
        "qemu s",
        "qemu -t wb s",
        "cp s",
        "cp+sync s",
        "ratio",
        "target",
        "time",
        "blocks addcow/qemu",
        "blocks",
        "x -t wb",
        "goal",
        "speed",
    )
    lines = []
    for r in rows:
        wb = r.extra.get("qemu -t writeback")
        cp = r.extra.get("cp --sparse=always")
        cp_sync = r.extra.get("cp + sync")
        blocks = ""
        if r.blocks_addcow:
            blocks = f"{max(r.blocks_addcow)}/{min(r.blocks_qemu)}"
        lines.append(
            (
                r.case,
                f"{statistics.median(r.addcow):.3f}",
                f"{statistics.median(r.qemu):.3f}",
                f"{statistics.median(wb):.3f}" if wb else "-",
                f"{statistics.median(cp):.3f}" if cp else "-",
                f"{statistics.median(cp_sync):.3f}" if cp_sync else "-",
                f"{r.ratio:.2f}",
                f"<= {r.target:.1f}",
                r.time_result,
                blocks or "-",
                r.blocks_result or "-",
                f"{r.speed:.2f}x" if r.speed is not None else "-",
                f">= {r.speed_target:.1f}x" if r.speed_target is not None else "-",
                r.speed_result,
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    print(
        "ratio: median of the per-run addcow/qemu time ratios; blocks: st_blocks (512 B) "
        "after sync, largest addcow figure / smallest qemu-img figure over the runs; "
        "x -t wb: median of the per-run speed ratios against qemu-img convert -t writeback "
        "(the same durability), goal: what it must reach"
    )
    for r in rows:
        print(f"  {r.case}: addcow {fmt_runs(r.addcow)}; {r.qemu_name} {fmt_runs(r.qemu)}")


def fmt_runs(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


# -- helpers ---------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 1G, 256M)")
    size = int(m.group(1)) * SUFFIXES[m.group(2)]
    if size < CLUSTER * 100 or size % CLUSTER:
        raise argparse.ArgumentTypeError("size must be a multiple of 64 KiB, >= 6400 KiB")
    return size


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = set(cases) - {*BACKINGS, GOLDEN, "commit"}
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"unknown cases {sorted(unknown)} (a, b, c, q, commit)")
    return cases


def size_text(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB")):
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def remove(*paths: str) -> None:
    for p in paths:
        with suppress(FileNotFoundError):
            os.unlink(p)


def warm(*paths: str) -> None:
    """Read every byte once so the timed command finds them in the page cache."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while os.readv(fd, [view]):
                pass
        finally:
            os.close(fd)


def timed(cmd: Sequence[str]) -> float:
    """Wall time of one whole process (its output is discarded; failure is fatal)."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    os.sync()
    return elapsed


def run(cmd: Sequence[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")


def blocks(path: str) -> int:
    return os.stat(path).st_blocks


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def copy_file(src: str, dst: str) -> None:
    """A real copy (no reflink) of ``src``, holes kept, durable."""
    remove(dst)
    run(["cp", "--reflink=never", "--sparse=always", src, dst])
    os.sync()


def fs_type(path: str) -> str:
    """The file system type of ``path`` from /proc/mounts (longest matching mount point)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if len(parts) > 2 and inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


def qemu_img_version() -> str:
    out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].replace(" version", "")


def compile_package() -> None:
    """Compile the package's bytecode, as ``pip install`` does.

    An editable checkout under PYTHONDONTWRITEBYTECODE=1 (as on the CI machines)
    never writes it, and every command would spend ~25 ms compiling its modules.
    """
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.dirname(addcow.__file__)], check=True
    )


def rotate(sides: Sequence[Callable[[int], None]], run_index: int) -> list[Callable[[int], None]]:
    """The sides in this run's order: each run starts one further along."""
    k = run_index % len(sides)
    return [*sides[k:], *sides[:k]]


# -- the benchmark ---------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.size: int = args.size
        self.runs: int = args.runs
        self.dir = workdir
        self.clusters = self.size // CLUSTER
        self.rng = random.Random(SEED)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- backings

    def make_backings(self) -> None:
        log(f"writing backings a, b, c ({size_text(self.size)} each) in {self.dir}")
        with open(self.path("a.raw"), "wb") as f:
            for _ in range(self.size // CHUNK):
                f.write(os.urandom(CHUNK))
            f.write(os.urandom(self.size % CHUNK))
        data = set(self.rng.sample(range(self.clusters), self.clusters * DATA_FRACTION // 100))
        fd_b = os.open(self.path("b.raw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_c = os.open(self.path("c.raw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd_b, self.size)
            zero = bytes(CLUSTER)
            pending: list[bytes] = []
            for c in range(self.clusters):
                if c in data:
                    block = os.urandom(CLUSTER)
                    os.pwrite(fd_b, block, c * CLUSTER)
                    pending.append(block)
                else:
                    pending.append(zero)
                if len(pending) * CLUSTER >= CHUNK or c == self.clusters - 1:
                    os.write(fd_c, b"".join(pending))
                    pending.clear()
        finally:
            os.close(fd_b)
            os.close(fd_c)
        os.sync()

    # -- stream

    def stream_case(self, name: str) -> Row:
        backing = self.path(f"{name}.raw")
        img, img_raw = self.path(f"s{name}.add-cow"), self.path(f"s{name}-img.raw")
        ov, out = self.path(f"s{name}.qcow2"), self.path(f"s{name}-qemu.raw")
        out_wb, out_cp = self.path(f"s{name}-qemu-wb.raw"), self.path(f"s{name}-cp.raw")
        row = Row(
            f"stream {name} ({BACKINGS[name]})",
            [],
            [],
            "qemu-img convert -O raw",
            extra={"qemu -t writeback": [], "cp --sparse=always": [], "cp + sync": []},
            speed_target=1.0,
        )
        expected = digest(backing)

        def check(path: str, run_index: int) -> None:
            if run_index == 0 and digest(path) != expected:
                raise SystemExit(f"{path}: content differs from {backing}")

        def side_addcow(i: int) -> None:
            remove(img, img_raw)
            addcow.create(img, image_file=img_raw, backing_file=backing, backing_format="raw")
            warm(backing)
            row.addcow.append(timed([ADDCOW, "stream", "-q", img]))
            row.blocks_addcow.append(blocks(img_raw))
            check(img_raw, i)
            remove(img, img_raw)

        def side_qemu(i: int) -> None:
            remove(ov, out)
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw",
                 "-o", "cluster_size=64k", ov])  # fmt: skip
            warm(backing)
            row.qemu.append(timed(["qemu-img", "convert", "-O", "raw", ov, out]))
            row.blocks_qemu.append(blocks(out))
            check(out, i)
            remove(out)
            warm(backing)
            row.extra["qemu -t writeback"].append(
                timed(["qemu-img", "convert", "-t", "writeback", "-O", "raw", ov, out_wb])
            )
            remove(ov, out_wb)

        def side_cp(i: int) -> None:
            remove(out_cp)
            warm(backing)
            row.extra["cp --sparse=always"].append(
                timed(["cp", "--sparse=always", backing, out_cp])
            )
            remove(out_cp)
            warm(backing)
            # The durable floor: the same copy by a C tool, then fdatasync (sync -d).
            cp_sync = 'cp --sparse=always "$1" "$2" && sync -d "$2"'
            row.extra["cp + sync"].append(timed(["sh", "-c", cp_sync, "sh", backing, out_cp]))
            remove(out_cp)

        for i in range(self.runs):
            for fn in rotate([side_addcow, side_qemu, side_cp], i):
                fn(i)
        log(f"  {row.case}: addcow {fmt_runs(row.addcow)} qemu {fmt_runs(row.qemu)}")
        return row

    # -- a golden qcow2 image

    def make_golden(self) -> str:
        log(f"building the golden qcow2 ({size_text(self.size)}, {GOLDEN_FILL}% full)")
        self.golden_fs, golden = golden_image.build(self.dir, self.size, fill=GOLDEN_FILL)
        return golden

    def golden_case(self) -> tuple[Row, dict[str, float]]:
        golden = self.make_golden()
        img, img_raw = self.path("g.add-cow"), self.path("g-img.raw")
        out = self.path("g-qemu.raw")
        row = Row(
            f"stream {GOLDEN} (golden qcow2, zlib)",
            [],
            [],
            "qemu-img convert -t writeback",
            speed_target=1.2,
        )
        expected = digest(self.golden_fs)
        created: dict[str, list[float]] = {"library": [], "command": []}

        def check(path: str, run_index: int) -> None:
            if run_index == 0 and digest(path) != expected:
                raise SystemExit(f"{path}: content differs from the golden image")

        def side_addcow(i: int) -> None:
            remove(img, img_raw)
            warm(golden)
            create = [ADDCOW, "create", "-q", "-b", golden, "-F", "qcow2",
                      "-o", f"image_file={img_raw}", img]  # fmt: skip
            created["command"].append(timed(create))
            remove(img, img_raw)
            started = time.perf_counter()
            addcow.create(img, image_file=img_raw, backing_file=golden, backing_format="qcow2")
            created["library"].append(time.perf_counter() - started)
            warm(golden)
            row.addcow.append(timed([ADDCOW, "stream", "-q", img]))
            row.blocks_addcow.append(blocks(img_raw))
            check(img_raw, i)
            remove(img, img_raw)

        def side_qemu(i: int) -> None:
            remove(out)
            warm(golden)
            row.qemu.append(timed(["qemu-img", "convert", "-t", "writeback", "-O", "raw",
                                   golden, out]))  # fmt: skip
            row.blocks_qemu.append(blocks(out))
            check(out, i)
            remove(out)

        for i in range(self.runs):
            for fn in rotate([side_addcow, side_qemu], i):
                fn(i)
        log(f"  {row.case}: addcow {fmt_runs(row.addcow)} qemu {fmt_runs(row.qemu)}")
        return row, {k: statistics.median(v) for k, v in created.items()}

    # -- commit

    def commit_cases(self) -> list[Row]:
        """One overlay per side, built once; the backing is a fresh copy per run."""
        source = self.path("a.raw")
        base = self.path("cbase.raw")
        img, img_raw = self.path("commit.add-cow"), self.path("commit-img.raw")
        ov, ov_tmp = self.path("commit.qcow2"), self.path("commit-tmp.qcow2")
        chosen = sorted(
            self.rng.sample(range(self.clusters), self.clusters * COMMIT_FRACTION // 100)
        )
        log(f"building the commit overlays ({len(chosen)} clusters written)")
        copy_file(source, base)
        remove(img, img_raw, ov)
        # Patterned clusters (1..255) so qemu-io can write the same bytes.
        addcow.create(img, image_file=img_raw, backing_file=base, backing_format="raw")
        with addcow.open(img) as image:
            for k, c in enumerate(chosen):
                image.write(bytes([k % 255 + 1]) * CLUSTER, c * CLUSTER)
            image.flush()
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
             "-o", "cluster_size=64k", ov])  # fmt: skip
        cmds: list[str] = []
        for k, c in enumerate(chosen):
            cmds += ["-c", f"write -q -P {k % 255 + 1} {c * CLUSTER} {CLUSTER}"]
        for lo in range(0, len(cmds), 2000):
            run(["qemu-io", "-f", "qcow2", *cmds[lo : lo + 2000], ov])
        os.sync()

        row = Row("commit 25% (qemu-img commit -d)", [], [], "qemu-img commit -d")
        default = Row("commit 25% (qemu-img commit)", [], [], "qemu-img commit", informational=True)
        digests: dict[str, str] = {}

        def check(side: str, i: int) -> None:
            if i == 0:
                digests[side] = digest(base)

        def side_addcow(i: int) -> None:
            copy_file(source, base)
            warm(img_raw, img, base)
            row.addcow.append(timed([ADDCOW, "commit", "-q", img]))
            check("addcow", i)

        def side_qemu(i: int) -> None:
            copy_file(source, base)
            warm(ov, base)
            row.qemu.append(timed(["qemu-img", "commit", "-q", "-d", ov]))
            check("qemu", i)

        def side_qemu_default(i: int) -> None:
            copy_file(source, base)
            remove(ov_tmp)
            shutil.copyfile(ov, ov_tmp)
            os.sync()
            warm(ov_tmp, base)
            default.qemu.append(timed(["qemu-img", "commit", "-q", ov_tmp]))
            check("qemu default", i)
            remove(ov_tmp)

        for i in range(self.runs):
            for fn in rotate([side_addcow, side_qemu, side_qemu_default], i):
                fn(i)
        if len(set(digests.values())) != 1:
            raise SystemExit(f"committed backings differ: {digests}")
        default.addcow = list(row.addcow)
        log(f"  commit: addcow {fmt_runs(row.addcow)} qemu -d {fmt_runs(row.qemu)}")
        remove(img, img_raw, ov, base)
        return [row, default]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB, help="backing size (1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (3)")
    parser.add_argument("--workdir", help="directory for the files (a new temporary one)")
    record.add_option(parser)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument(
        "--cases",
        type=parse_cases,
        default=[*BACKINGS, GOLDEN, "commit"],
        help="comma-separated subset of a,b,c,q (stream cases) and commit (all)",
    )
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "qemu-io", "cp", "mke2fs"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    if not os.access(ADDCOW, os.X_OK):
        raise SystemExit(f"{ADDCOW} not found: run from the project's venv")
    compile_package()
    run = record.Run("bench_lifecycle", args)
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="bench-lifecycle-", dir=args.workdir)
    try:
        bench = Bench(args, workdir)
        bench.make_backings()
        rows = [bench.stream_case(name) for name in BACKINGS if name in args.cases]
        create: dict[str, float] = {}
        if GOLDEN in args.cases:
            golden_row, create = bench.golden_case()
            rows.append(golden_row)
        if "commit" in args.cases:
            rows += bench.commit_cases()
        info: dict[str, object] = {
            "addcow_module": os.path.dirname(addcow.__file__),
            "size_text": size_text(args.size),
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "qemu_img": qemu_img_version(),
            "workdir": workdir,
            "workdir_fs": fs_type(workdir),
            "seconds": time.monotonic() - started,
        }
        print_table(rows, info)
        if create:
            print(
                f"create over the golden qcow2: library {create['library'] * 1000:.1f} ms "
                f"(target < 50: {'PASS' if create['library'] < 0.05 else 'MISS'}), command "
                f"{create['command']:.3f} s (target < 0.2: "
                f"{'PASS' if create['command'] < 0.2 else 'MISS'})"
            )
            info["create"] = create
        run.write(info=info, rows=[r.as_dict() for r in rows])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
