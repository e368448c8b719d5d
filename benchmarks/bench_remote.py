"""Benchmarks: add-cow images over a golden image on another machine (NBD, HTTP, S3), on loopback.

Every figure is measured in the same run as its baseline, the sides
alternating (``bench_nbd.compare``: the order rotates and reverses from run
to run); the table shows median figures and the median of the per-run ratios
(higher is better). The golden image's file is read just before each timed
command (the golden server's page cache is warm), and ``sync`` runs before
and after each one (untimed). Results count as done when durable: ``addcow
stream`` flushes; its peers get ``sync -d`` of their output (fdatasync)
inside the timed command.

    .venv/bin/python benchmarks/bench_remote.py [--size 1G] [--runs 3] [--seconds 5]
        [--fleet-size 256M] [--fleet-hosts 1,4,8] [--stream-rate 50M] [--workdir DIR]
        [--keep] [--json [DIR]] [--cases nbd,nbd8,http,randread,latency,fleet,qcow2,s3,s3fleet]

``--json`` also writes the run's figures, ratios and fleet samples to one file in
``benchmarks/results/`` (or DIR); ``record.py`` describes it.

Golden images: ``golden.raw``, ``--size`` of random data; for ``fleet``, its
own ``fleet.raw`` of ``--fleet-size``; for ``qcow2``, the golden qcow2 of
``benchmarks/golden.py`` (ext4 40% full, zlib).

Cases:

nbd     ``addcow create -b nbd+unix:///?socket=S -F raw`` (untimed), then ``addcow
        stream -q`` of it, the export served by ``qemu-nbd --read-only -t -f raw -k
        S`` (qemu-nbd's defaults: one client at a time, so no multi-conn), against
        ``qemu-img convert -t writeback -O raw URI OUT`` and ``nbdcopy URI OUT``,
        each followed by ``sync -d OUT``. MiB/s of the golden image.
nbd8    the same with ``qemu-nbd -e 8``: multi-conn, so ``addcow`` and ``nbdcopy``
        open 4 connections (``qemu-img`` opens one).
http    the same over ``http://127.0.0.1:PORT/golden.raw`` served by nginx
        (``nginx-light``, sendfile), against ``qemu-img convert -m 1 -t writeback``
        through QEMU's curl driver (``json:{"file.driver":"http",...}``; with its
        default ``-m 8`` qemu-img 7.2 stops making progress part way in most
        tries) and ``curl -s -o OUT URL``, each followed by ``sync -d OUT``.
randread  ``fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32`` (as
        bench_nbd) through ``addcow serve`` of an image over the golden export
        (``qemu-nbd -e 16``) with its first half written, against ``qemu-nbd``
        serving a qcow2 overlay (``qemu-img create -f qcow2 -b URI -F raw``) over
        the same URI with the same half written. IOPS.
latency one host's own reads while it streams: ``fio --rw=randread --bs=4k
        --iodepth=1`` over the written first half of a fresh image (the
        clusters the stream does not touch) through ``addcow serve``, without
        ``--stream``, with ``--stream --stream-rate RATE`` and with ``--stream``
        unlimited (information); clat p50 and p99 in us, and their ratio to the
        run without streaming (lower is better).
fleet   one golden server on 127.0.0.1 (``qemu-nbd --read-only -t -e 0``; ``nbdkit
        --read-only file``; nginx) and N hosts (``--fleet-hosts``), each an
        ``addcow serve --stream --detach-when-complete`` of its own image over
        the golden URI with an ``nbdcopy nbd+unix:///?socket=HOST null:`` client
        reading its disk meanwhile. Time until every image is complete (its
        .add-cow file removed: ALL_ALLOCATED durable), aggregate MiB/s against N
        parallel copies of the golden image made durable (``nbdcopy URI OUT &&
        sync -d OUT``; ``curl`` for nginx): the floor; fairness (slowest / fastest
        host); the golden server's established connections (``ss``), the most
        seen; the time to first guest read: from the start of ``addcow serve``
        until ``qemu-io -r -c 'read 0 4k'`` through it has exited (the median
        over hosts and runs, and the slowest), after which the host's
        ``nbdcopy`` starts.
qcow2   ``nbd`` and ``http`` over the golden qcow2 (``addcow create -b URI -F
        qcow2``; ``qemu-img convert -f qcow2``; the peers' copy is of the
        compressed file).
s3      one host streaming ``s3://BUCKET/golden.raw`` and the golden qcow2 from a
        Ceph RADOS Gateway of the benchmark's own (``s3_golden.py``: the test
        suite's single-node cluster, started after the other cases and stopped
        at the end; credentials and endpoint in ``AWS_*`` variables), against
        the aws-style floor of ``s3_golden.py`` (10 signed range GETs of 8 MiB
        in flight) into nothing and into a file made durable, and against
        ``qemu-img convert`` from a presigned URL through QEMU's curl driver
        where that driver can read it (a probe with ``qemu-img info`` first;
        it sends ``HEAD`` before its ranged ``GET``s, a presigned URL signs
        one method, and the row says n/a).
s3fleet ``fleet`` with the gateway as the golden server (``--fleet-size``, one
        object); the floor is N aws-style durable copies at once.

The first run of every streamed image checks that its raw file equals the
golden image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bench_lifecycle as lifecycle
import bench_nbd as nbd
import golden as golden_image
import record
import s3_golden
from bench_nbd import ADDCOW

MiB = 1 << 20
CASES = ("nbd", "nbd8", "http", "randread", "latency", "fleet", "qcow2", "s3", "s3fleet")
FLEET_SERVERS = ("qemu-nbd", "nbdkit", "nginx")
FLEET_COPY = {"nginx": "curl -s -o \"$0\" '{uri}'", "qemu-nbd": "nbdcopy '{uri}' \"$0\"",
              "nbdkit": "nbdcopy '{uri}' \"$0\""}  # fmt: skip
"""A golden server's floor: a copy of its image into ``$0`` (then made durable)."""
FLEET_TARGET = 0.8
"""A fleet's aggregate against its floor, at every host count."""
CURL_NA = "n/a: curl driver sends HEAD, the signature covers the method"
PATTERN = 0x5A
POLL = 0.02  # seconds between looks at the fleet's images
SS_EVERY = 0.25  # seconds between connection counts


@dataclass
class Row:
    """One comparison: median figures per side, median per-run ratios, targets."""

    case: str
    unit: str
    figures: dict[str, float]
    ratios: dict[str, float]
    targets: dict[str, float] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)
    """Ratios that could not be measured (label -> why), with their targets."""

    def verdict(self, label: str) -> str:
        if label not in self.targets:
            return "info"
        return "met" if self.ratios[label] >= self.targets[label] else "MISS"


@dataclass
class FleetRow:
    server: str
    hosts: int
    seconds: list[float]
    floor_seconds: list[float]
    fairness: list[float]
    connections: list[int]
    floor_connections: list[int]
    client_seconds: list[float]
    size: int
    first_read: list[float] = field(default_factory=list)

    def mibs(self, seconds: float) -> float:
        return self.hosts * self.size / MiB / seconds

    def summary(self) -> dict[str, float]:
        med = statistics.median
        return {
            "all complete s": med(self.seconds),
            "aggregate MiB/s": self.mibs(med(self.seconds)),
            "floor MiB/s": self.mibs(med(self.floor_seconds)),
            "ratio": med(f / s for s, f in zip(self.seconds, self.floor_seconds, strict=True)),
            "fairness": med(self.fairness),
            "connections": max(self.connections),
            "floor connections": max(self.floor_connections),
            "client MiB/s": self.size / MiB / med(self.client_seconds),
            "first read s": med(self.first_read),
            "first read max s": max(self.first_read),
        }


# -- helpers ---------------------------------------------------------------------------


def sh(*cmd: str) -> str:
    return nbd.sh(*cmd)


def unix_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def make_random(path: Path, size: int) -> Path:
    """``size`` bytes of random data at ``path`` (kept if it is already that size)."""
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as f:
            for _ in range(size // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
            f.write(os.urandom(size % (16 * MiB)))
        os.sync()
    return path


def create(image: Path, raw: Path, backing: str, fmt: str = "raw") -> None:
    """A fresh add-cow image over ``backing`` (its old files removed first)."""
    lifecycle.remove(str(image), str(raw))
    sh(ADDCOW, "create", "-q", "-b", backing, "-F", fmt, "-o", f"image_file={raw}", str(image))


def mibs(size: int, cmd: Sequence[str], warm: Path) -> float:
    """MiB/s of ``size`` bytes for the whole command ``cmd``, ``warm`` read first."""
    nbd.warm(warm)
    return size / MiB / lifecycle.timed(cmd)


def durable(cmd: str, out: Path) -> list[str]:
    """``cmd`` (a shell command line) followed by fdatasync of its output ``out``."""
    return ["sh", "-c", f'{cmd} && sync -d "$0"', str(out)]


def established(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` on the server's side."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sum(1 for line in out.splitlines() if line.strip())


def nginx_config(root: Path, work: Path, port: int) -> Path:
    temps = "".join(f"    {kind}_temp_path {work / ('tmp-' + kind)};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    conf = work / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
        f"error_log {work / 'error.log'};\nevents {{\n    worker_connections 1024;\n}}\n"
        f"http {{\n    access_log off;\n{temps}    default_type application/octet-stream;\n"
        "    sendfile on;\n    keepalive_requests 1000000;\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n        root {root};\n"
        "        location / {\n        }\n    }\n}\n"
    )
    return conf


@contextmanager
def golden_server(kind: str, image: Path, listen: nbd.Listen,
                  extra: Sequence[str] = ()) -> Iterator[str]:  # fmt: skip
    """Serve ``image`` read-only (qemu-nbd, nbdkit or nginx); yields its URI."""
    if isinstance(listen, Path):
        listen.unlink(missing_ok=True)
    if kind == "qemu-nbd":
        where = nbd.listen_args(kind, listen)
        cmd = ["qemu-nbd", "--read-only", "-t", "-f", "raw", *extra, *where, str(image)]
    elif kind == "nbdkit":
        where = nbd.listen_args(kind, listen)
        cmd = ["nbdkit", "--foreground", "--read-only", *where, "file", f"file={image}"]
    else:
        assert isinstance(listen, int)
        work = image.parent / f"nginx-{listen}"
        work.mkdir(exist_ok=True)
        conf = nginx_config(image.parent, work, listen)
        cmd = ["nginx", "-p", f"{work}/", "-c", str(conf), "-e", str(work / "error.log")]
    with nbd.running(cmd, listen, kind):
        if kind == "nginx":
            yield f"http://127.0.0.1:{listen}/{image.name}"
        else:
            yield nbd.uri(listen)


def fio_latency(target: str, seconds: int) -> tuple[float, float]:
    """p50 and p99 completion latency (us) of 4k random reads at QD1 over the first half."""
    out = sh("fio", "--name=lat", "--ioengine=nbd", f"--uri={target}", "--rw=randread",
             "--bs=4k", "--iodepth=1", "--offset=0", "--size=50%", "--time_based",
             f"--runtime={seconds}", "--randrepeat=1", "--output-format=json")  # fmt: skip
    pct = json.loads(out[out.index("{") :])["jobs"][0]["read"]["clat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000


# -- the benchmark ---------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size: int = args.size
        self.runs: int = args.runs
        self.rows: list[Row] = []
        self.fleet: list[FleetRow] = []
        self.digests: dict[Path, str] = {}
        self.rgw: s3_golden.RGW | None = None

    def path(self, name: str) -> Path:
        return self.work / name

    def golden(self) -> Path:
        return make_random(self.path("golden.raw"), self.size)

    def check(self, raw: Path, golden: Path) -> None:
        """The streamed raw file must hold the golden image's bytes."""
        if golden not in self.digests:
            self.digests[golden] = lifecycle.digest(str(golden))
        if lifecycle.digest(str(raw)) != self.digests[golden]:
            raise SystemExit(f"{raw}: content differs from {golden}")

    def addcow_stream(
        self, img: Path, raw: Path, uri: str, fmt: str, golden: Path
    ) -> Callable[[int], float]:
        """The addcow side of a stream case: a fresh image over ``uri`` streamed whole
        (MiB/s of the disk, until durable); run 0 checks the bytes."""

        def side(i: int) -> float:
            create(img, raw, uri, fmt)
            got = mibs(self.size, [ADDCOW, "stream", "-q", str(img)], golden)
            if i == 0:
                self.check(raw, self.golden_disk(golden, fmt))
            lifecycle.remove(str(img), str(raw))
            return got

        return side

    def compare(self, case: str, unit: str, sides: dict[str, Callable[[int], float]],
                targets: dict[str, float]) -> Row:  # fmt: skip
        """Each side once per run (bench_nbd.compare's order); ratios addcow / peer."""
        counts = dict.fromkeys(sides, 0)

        def measure(side: str) -> float:
            counts[side] += 1
            return sides[side](counts[side] - 1)

        peers = [side for side in sides if side != "addcow"]
        ratios = {f"vs {peer}": ("addcow", peer) for peer in peers}
        result = nbd.compare(self.runs, list(sides), measure, ratios)
        row = Row(case, unit, {s: result[s] for s in sides}, {r: result[r] for r in ratios},
                  {f"vs {peer}": t for peer, t in targets.items()})  # fmt: skip
        lifecycle.log(f"  {case}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
        self.rows.append(row)
        return row

    # -- streaming a whole golden image

    def stream_sides(self, uri: str, golden: Path, fmt: str, qemu: Sequence[str],
                     copy: str) -> dict[str, Callable[[int], float]]:  # fmt: skip
        """addcow stream, qemu-img convert (``qemu``: its arguments before OUT) and a copy
        (``copy``: a shell command line writing OUT), each durable; MiB/s."""
        img, raw = self.path("s.add-cow"), self.path("s.raw")
        out = self.path("peer.raw")
        size = self.size

        addcow_side = self.addcow_stream(img, raw, uri, fmt, golden)

        def qemu_side(i: int) -> float:
            lifecycle.remove(str(out))
            cmd = " ".join(f"'{a}'" for a in [*qemu, str(out)])
            got = mibs(size, durable(cmd, out), golden)
            lifecycle.remove(str(out))
            return got

        def copy_side(i: int) -> float:
            lifecycle.remove(str(out))
            got = mibs(size, durable(copy.replace("OUT", str(out)), out), golden)
            lifecycle.remove(str(out))
            return got

        return {"addcow": addcow_side, "qemu-img": qemu_side, "copy": copy_side}

    def golden_disk(self, golden: Path, fmt: str) -> Path:
        return golden if fmt == "raw" else self.path("golden-fs.raw")

    def nbd_case(self, name: str, extra: Sequence[str], golden: Path | None = None,
                 fmt: str = "raw") -> None:  # fmt: skip
        golden = golden or self.golden()
        sock = self.path("golden.sock")
        with golden_server("qemu-nbd", golden, sock, extra) as uri:
            qemu = ["qemu-img", "convert", "-f", fmt, "-t", "writeback", "-O", "raw", uri]
            sides = self.stream_sides(uri, golden, fmt, qemu, f"nbdcopy '{uri}' OUT")
            sides["nbdcopy"] = sides.pop("copy")
            targets = {"qemu-img": 1.0, "nbdcopy": 0.8} if fmt == "raw" else {"qemu-img": 1.0}
            label = "qemu-nbd" + (" " + " ".join(extra) if extra else "")
            self.compare(f"{name}: addcow stream from {label} ({fmt})", "MiB/s", sides, targets)

    def http_case(self, name: str, golden: Path | None = None, fmt: str = "raw") -> None:
        golden = golden or self.golden()
        with golden_server("nginx", golden, nbd.free_port()) as url:
            source = f'json:{{"file.driver":"http","file.url":"{url}"}}'
            qemu = ["qemu-img", "convert", "-m", "1", "-f", fmt, "-t", "writeback", "-O", "raw",
                    source]  # fmt: skip
            sides = self.stream_sides(url, golden, fmt, qemu, f"curl -s -o OUT '{url}'")
            sides["curl"] = sides.pop("copy")
            targets = {"qemu-img": 1.0, "curl": 0.8} if fmt == "raw" else {"qemu-img": 1.0}
            self.compare(f"{name}: addcow stream from nginx ({fmt})", "MiB/s", sides, targets)

    # -- random reads through addcow serve

    def randread_case(self) -> None:
        golden = self.golden()
        gsock, sock = self.path("golden.sock"), self.path("s.sock")
        img, raw, ov = self.path("r.add-cow"), self.path("r.raw"), self.path("r.qcow2")
        half = f"write -q -P {PATTERN:#x} 0 {self.size // 2}"
        with golden_server("qemu-nbd", golden, gsock, ["-e", "16"]) as uri:
            create(img, raw, uri)
            sh(ADDCOW, "io", "-c", half, str(img))
            lifecycle.remove(str(ov))
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw", str(ov))
            sh("qemu-io", "-f", "qcow2", "-c", half, str(ov))
            images = {"addcow": img, "qemu-nbd": ov}

            def side(kind: str) -> Callable[[int], float]:
                def measure(i: int) -> float:
                    for path in (golden, raw, ov):
                        nbd.warm(path)
                    with nbd.server(kind, images[kind], sock):
                        return nbd.fio(nbd.uri(sock), "randread", self.args.seconds)

                return measure

            self.compare("randread: fio 4k QD32, half local, over qemu-nbd -e 16", "IOPS",
                         {k: side(k) for k in images}, {"qemu-nbd": 1.0})  # fmt: skip
        lifecycle.remove(str(img), str(raw), str(ov))

    # -- a host's own latency while it streams

    def latency_case(self) -> None:
        golden = self.golden()
        gsock, sock = self.path("golden.sock"), self.path("l.sock")
        img, raw = self.path("l.add-cow"), self.path("l.raw")
        half = f"write -q -P {PATTERN:#x} 0 {self.size // 2}"
        rate = self.args.stream_rate
        modes = {"no stream": [], f"--stream-rate {rate}": ["--stream", "--stream-rate", rate],
                 "--stream": ["--stream"]}  # fmt: skip
        samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        with golden_server("qemu-nbd", golden, gsock, ["-e", "16"]) as uri:
            for i in range(self.runs):
                order = list(modes)
                k = i % len(order)
                for mode in order[k:] + order[:k]:
                    create(img, raw, uri)
                    sh(ADDCOW, "io", "-c", half, str(img))
                    nbd.warm(raw)
                    nbd.warm(golden)
                    with nbd.server("addcow", img, sock, modes[mode]):
                        samples[mode].append(fio_latency(nbd.uri(sock), self.args.seconds))
        lifecycle.remove(str(img), str(raw))
        base = samples["no stream"]
        for mode, got in samples.items():
            figures = {"p50 us": statistics.median(p for p, _ in got),
                       "p99 us": statistics.median(p for _, p in got)}  # fmt: skip
            pairs = list(zip(got, base, strict=True))
            ratios = {
                "p50 / no stream": statistics.median(a[0] / b[0] for a, b in pairs),
                "p99 / no stream": statistics.median(a[1] / b[1] for a, b in pairs),
            }
            self.rows.append(Row(f"latency: fio 4k QD1, {mode}", "us", figures, ratios))
            lifecycle.log(f"  latency {mode}: {figures} {ratios}")

    # -- the fleet

    def fleet_case(self) -> None:
        golden = make_random(self.path("fleet.raw"), self.args.fleet_size)
        for kind in FLEET_SERVERS:
            port = nbd.free_port()
            extra = ["-e", "0"] if kind == "qemu-nbd" else []
            with golden_server(kind, golden, port, extra) as uri:
                self.fleet_rows(kind, uri, golden, port, FLEET_COPY[kind].format(uri=uri))

    def fleet_rows(self, kind: str, uri: str, golden: Path, port: int, copy: str) -> None:
        """One row per host count: the fleet over ``uri`` against N ``copy`` commands."""
        for hosts in self.args.fleet_hosts:
            row = FleetRow(kind, hosts, [], [], [], [], [], [], golden.stat().st_size)
            for i in range(self.runs):
                sides = ("addcow", "floor") if i % 2 == 0 else ("floor", "addcow")
                for side in sides:
                    if side == "addcow":
                        self.fleet_addcow(row, uri, golden, port, i)
                    else:
                        self.fleet_floor(row, golden, port, copy)
            lifecycle.log(f"  fleet {kind} x{hosts}: {row.summary()}")
            self.fleet.append(row)

    def fleet_addcow(self, row: FleetRow, uri: str, golden: Path, port: int, i: int) -> None:
        hosts = range(row.hosts)
        images = [self.path(f"h{h}.add-cow") for h in hosts]
        raws = [self.path(f"h{h}.raw") for h in hosts]
        socks = [self.path(f"h{h}.sock") for h in hosts]
        for img, raw, sock in zip(images, raws, socks, strict=True):
            create(img, raw, uri)
            sock.unlink(missing_ok=True)
        nbd.warm(golden)
        os.sync()
        done: list[float | None] = [None] * row.hosts
        started: list[float] = []
        conns = 0
        with ExitStack() as stack:
            logs = [stack.enter_context(open(self.path(f"h{h}.log"), "wb")) for h in hosts]
            servers: list[subprocess.Popen[bytes]] = []
            t0 = time.perf_counter()
            for img, sock, log in zip(images, socks, logs, strict=True):
                started.append(time.perf_counter())
                servers.append(subprocess.Popen(
                    [ADDCOW, "serve", "--foreground", "--socket", str(sock), "--stream",
                     "--detach-when-complete", str(img)],
                    stdout=subprocess.DEVNULL, stderr=log))  # fmt: skip
            stack.callback(self._stop, servers)
            clients: list[tuple[subprocess.Popen[bytes], float]] = []
            first: dict[int, subprocess.Popen[bytes]] = {}
            waiting = list(hosts)
            next_ss = 0.0
            while waiting or first or any(d is None for d in done):
                now = time.perf_counter()
                for h in list(waiting):
                    if socks[h].exists():
                        waiting.remove(h)
                        first[h] = subprocess.Popen(
                            ["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", unix_uri(socks[h])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
                for h, probe in list(first.items()):
                    if probe.poll() is None:
                        continue
                    if probe.returncode != 0:
                        err = probe.stderr.read().decode() if probe.stderr else ""
                        raise SystemExit(f"qemu-io's first read from a host failed: {err}")
                    del first[h]
                    row.first_read.append(now - started[h])
                    clients.append((subprocess.Popen(
                        ["nbdcopy", unix_uri(socks[h]), "null:"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), now))  # fmt: skip
                for h in hosts:
                    if done[h] is None and not images[h].exists():
                        done[h] = now - started[h]
                for server in servers:
                    if server.poll() is not None:
                        raise SystemExit(f"addcow serve exited with {server.returncode}")
                if now >= next_ss:
                    conns, next_ss = max(conns, established(port)), now + SS_EVERY
                time.sleep(POLL)
            elapsed = time.perf_counter() - t0
            for client, t_start in clients:
                if client.wait() != 0:
                    err = client.stderr.read().decode() if client.stderr else ""
                    raise SystemExit(f"nbdcopy from a host failed: {err}")
                row.client_seconds.append(time.perf_counter() - t_start)
        # The clients' times are upper bounds (they end before we look); the streams'
        # are what the row reports.
        finished = [d for d in done if d is not None]
        row.seconds.append(elapsed)
        row.fairness.append(max(finished) / min(finished))
        row.connections.append(conns)
        if i == 0:
            for raw in raws:
                self.check(raw, golden)
        lifecycle.remove(*(str(p) for p in (*images, *raws)))

    def _stop(self, servers: Sequence[subprocess.Popen[bytes]]) -> None:
        for server in servers:
            if server.poll() is None:
                server.terminate()
        for server in servers:
            server.wait(timeout=60)

    def fleet_floor(self, row: FleetRow, golden: Path, port: int, copy: str) -> None:
        outs = [self.path(f"floor{h}.raw") for h in range(row.hosts)]
        lifecycle.remove(*(str(p) for p in outs))
        nbd.warm(golden)
        os.sync()
        cmd = copy + ' && sync -d "$0"'
        conns = 0
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["sh", "-c", cmd, str(out)], stderr=subprocess.PIPE)
                 for out in outs]  # fmt: skip
        next_ss = 0.0
        while any(p.poll() is None for p in procs):
            now = time.perf_counter()
            if now >= next_ss:
                conns, next_ss = max(conns, established(port)), now + SS_EVERY
            time.sleep(POLL)
        elapsed = time.perf_counter() - t0
        for p in procs:
            if p.returncode:
                raise SystemExit(f"{cmd} failed: {p.stderr.read().decode() if p.stderr else ''}")
        row.floor_seconds.append(elapsed)
        row.floor_connections.append(conns)
        lifecycle.remove(*(str(p) for p in outs))
        os.sync()

    # -- a golden qcow2 over a URI

    def qcow2_cases(self) -> None:
        qcow2 = self.golden_qcow2()
        self.nbd_case("qcow2 nbd", [], qcow2, "qcow2")
        self.http_case("qcow2 http", qcow2, "qcow2")

    def golden_qcow2(self) -> Path:
        qcow2 = self.path("golden.qcow2")
        if not qcow2.exists():
            lifecycle.log(f"building the golden qcow2 ({lifecycle.size_text(self.size)})")
            golden_image.build(str(self.work), self.size)
        return qcow2

    # -- a golden image in S3 (Ceph's RADOS Gateway)

    def s3_case(self, golden: Path, fmt: str) -> None:
        rgw = self.rgw
        assert rgw is not None
        key = golden.name
        uri = rgw.upload(golden, key)
        img, raw, out = self.path("s.add-cow"), self.path("s.raw"), self.path("peer.raw")
        size, length = self.size, golden.stat().st_size

        addcow_side = self.addcow_stream(img, raw, uri, fmt, golden)

        def floor_side(durable: bool) -> Callable[[int], float]:
            def measure(i: int) -> float:
                lifecycle.remove(str(out))
                got = mibs(size, rgw.floor(key, length, out if durable else None), golden)
                lifecycle.remove(str(out))
                return got

            return measure

        sides = {"addcow": addcow_side, "aws-style null": floor_side(False),
                 "aws-style durable": floor_side(True)}  # fmt: skip
        targets = {"aws-style durable": 0.8}
        source = json.dumps({"file.driver": "http", "file.url": rgw.presigned(key)})
        probe = subprocess.run(["qemu-img", "info", "-f", fmt, f"json:{source}"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode == 0:
            qemu = ["qemu-img", "convert", "-m", "1", "-f", fmt, "-t", "writeback", "-O", "raw",
                    f"json:{source}"]  # fmt: skip
            sides["qemu-img"] = self.stream_sides(uri, golden, fmt, qemu, "")["qemu-img"]
            targets["qemu-img"] = 1.5
        row = self.compare(f"s3: addcow stream from RGW ({fmt})", "MiB/s", sides, targets)
        if probe.returncode != 0:
            said = probe.stderr.strip().rsplit("': ", 1)[-1]  # not the URL: it holds a signature
            row.na["vs qemu-img"] = f"{CURL_NA} (qemu-img info: {said})"
            row.targets["vs qemu-img"] = 1.5

    def s3_fleet_case(self) -> None:
        rgw = self.rgw
        assert rgw is not None
        golden = make_random(self.path("fleet.raw"), self.args.fleet_size)
        uri = rgw.upload(golden, "fleet.raw")
        copy = shlex.join(rgw.floor("fleet.raw", golden.stat().st_size)) + ' --out "$0"'
        self.fleet_rows("rgw", uri, golden, rgw.port, copy)


def print_report(bench: Bench, info: dict[str, object]) -> None:
    print(
        f"bench_remote: {info['size_text']} golden image, fleet {info['fleet_size_text']} per "
        f"host, {info['runs']} runs (medians), {info['cpus']} CPUs, Python {info['python']}, "
        f"{info['qemu_img']}, workdir {info['workdir']} ({info['workdir_fs']}), "
        f"addcow serve on {info['event_loop']}, {info['seconds']:.0f} s in all"
    )
    for row in bench.rows:
        figures = ", ".join(f"{side} {value:.1f}" for side, value in row.figures.items())
        print(f"{row.case} ({row.unit}): {figures}")
        for label, ratio in row.ratios.items():
            target = f">= {row.targets[label]:.1f}x" if label in row.targets else "-"
            print(f"    {label:24} {ratio:6.2f}x  target {target:8} {row.verdict(label)}")
        for label, why in row.na.items():
            print(f"    {label:24}    n/a  target >= {row.targets[label]:.1f}x  {why}")
    if bench.fleet:
        header = ("server", "N", "all complete s", "aggregate MiB/s", "floor MiB/s", "ratio",
                  "target", "fairness", "connections", "floor connections", "client MiB/s",
                  "first read s (max)")  # fmt: skip
        lines = []
        for row in bench.fleet:
            s = row.summary()
            verdict = "met" if s["ratio"] >= FLEET_TARGET else "MISS"
            lines.append((row.server, str(row.hosts), f"{s['all complete s']:.2f}",
                          f"{s['aggregate MiB/s']:.0f}", f"{s['floor MiB/s']:.0f}",
                          f"{s['ratio']:.2f}x", f">= {FLEET_TARGET}x {verdict}",
                          f"{s['fairness']:.2f}", str(s["connections"]),
                          str(s["floor connections"]), f"{s['client MiB/s']:.0f}",
                          f"{s['first read s']:.2f} ({s['first read max s']:.2f})"))  # fmt: skip
        widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
        for line in (header, *lines):
            print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


def parse_hosts(text: str) -> list[int]:
    try:
        hosts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected host counts like 1,4,8, found {text!r}"
        ) from None
    if not hosts or min(hosts) < 1:
        raise argparse.ArgumentTypeError(f"expected host counts of 1 or more, found {text!r}")
    return hosts


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"unknown cases {sorted(unknown)}; known: {CASES}")
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=lifecycle.parse_size, default=1 << 30,
                        help="golden image size (1G)")  # fmt: skip
    parser.add_argument("--fleet-size", type=lifecycle.parse_size, default=256 * MiB,
                        help="golden image size of the fleet case (256M)")  # fmt: skip
    parser.add_argument("--fleet-hosts", type=parse_hosts, default=[1, 4, 8],
                        help="host counts of the fleet case (1,4,8)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="runs per case (3)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per fio run (5)")
    parser.add_argument("--stream-rate", default="50M", help="--stream-rate of latency (50M)")
    parser.add_argument("--workdir", help="directory for the files (a new one under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    record.add_option(parser)
    parser.add_argument("--cases", type=parse_cases, default=list(CASES),
                        help=f"comma-separated subset of {','.join(CASES)} (all)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("ADDCOW_EVENT_LOOP", "asyncio")  # ADDCOW_EVENT_LOOP=uvloop to compare
    for tool in ("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy", "nbdkit", "fio", "nginx",
                 "curl", "ss", "mke2fs"):  # fmt: skip
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    if not os.access(ADDCOW, os.X_OK):
        raise SystemExit(f"{ADDCOW} not found: run from the project's venv")
    lifecycle.compile_package()
    run = record.Run("bench_remote", args)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=args.workdir or "/var/tmp"))
    bench = Bench(args, work)
    try:
        if "nbd" in args.cases:
            bench.nbd_case("nbd", [])
        if "nbd8" in args.cases:
            bench.nbd_case("nbd8", ["-e", "8"])
        if "http" in args.cases:
            bench.http_case("http")
        if "randread" in args.cases:
            bench.randread_case()
        if "latency" in args.cases:
            bench.latency_case()
        if "fleet" in args.cases:
            bench.fleet_case()
        if "qcow2" in args.cases:
            bench.qcow2_cases()
        if {"s3", "s3fleet"} & set(args.cases):
            with s3_golden.rgw(work) as bench.rgw:
                lifecycle.log(f"RGW at {bench.rgw.endpoint}, bucket {bench.rgw.bucket}")
                if "s3" in args.cases:
                    bench.s3_case(bench.golden(), "raw")
                    bench.s3_case(bench.golden_qcow2(), "qcow2")
                if "s3fleet" in args.cases:
                    bench.s3_fleet_case()
            bench.rgw = None
        info: dict[str, object] = {
            "size_text": lifecycle.size_text(args.size),
            "fleet_size_text": lifecycle.size_text(args.fleet_size),
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "event_loop": os.environ["ADDCOW_EVENT_LOOP"],
            "qemu_img": lifecycle.qemu_img_version(),
            "workdir": str(work),
            "workdir_fs": lifecycle.fs_type(str(work)),
            "seconds": time.monotonic() - started,
        }
        if {"s3", "s3fleet"} & set(args.cases):
            info["ceph"] = sh("ceph", "--version").strip()
        print_report(bench, info)
        fleet = [{**asdict(r), "summary": r.summary()} for r in bench.fleet]
        run.write(info=info, rows=[asdict(r) for r in bench.rows], fleet=fleet)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
