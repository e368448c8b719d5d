"""``addcow serve`` driven by the real NBD clients: qemu-img, qemu-io, nbdinfo,
nbdcopy and nbdsh, each launched as a user would launch it.

The scenario image (64 KiB clusters, 1 MiB, over conftest's ``base_raw``)::

    cluster   0    1    2     3    4    5          6  7  8  9     10 11  12     13 14 15
    base.raw  10   11   12    13   14   15         16 17 .  .     .  .   1c     1d 1e 1f
    image     A0   -    zero  -    -    15+A5 (*)  -  -  -  A9    -  -   disc   -  -  -

    .  a hole in base.raw      -  unallocated (reads the backing)
    (*) 3000 bytes of A5 at 1000 into the cluster, the rest copied from the backing
    disc  discarded: allocated, reads as zero
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import ADDCOW, BIN, RawClient, env_with_addcow, served

import addcow

SIZE = 16 * CLUSTER


def make_scenario(tmp_path: Path, base_raw: Path) -> Path:
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file=base_raw, backing_format="raw")
    with addcow.open(path) as img:
        img.write(pattern(0xA0, CLUSTER), 0)
        img.write_zeroes(2 * CLUSTER, CLUSTER)
        img.write(pattern(0xA5, 3000), 5 * CLUSTER + 1000)
        img.write(pattern(0xA9, CLUSTER), 9 * CLUSTER)
        img.discard(12 * CLUSTER, CLUSTER)
    return path


@pytest.fixture
def scenario(tmp_path: Path, base_raw: Path) -> Path:
    return make_scenario(tmp_path, base_raw)


def content(path: Path) -> bytes:
    with addcow.open(path, readonly=True) as img:
        return img.read(0, img.size)


def expected_scenario(base_raw: Path) -> bytes:
    data = bytearray(base_raw.read_bytes())
    data[0:CLUSTER] = pattern(0xA0, CLUSTER)
    data[2 * CLUSTER : 3 * CLUSTER] = bytes(CLUSTER)
    data[5 * CLUSTER + 1000 : 5 * CLUSTER + 4000] = pattern(0xA5, 3000)
    data[9 * CLUSTER : 10 * CLUSTER] = pattern(0xA9, CLUSTER)
    data[12 * CLUSTER : 13 * CLUSTER] = bytes(CLUSTER)
    return bytes(data)


def mixed_raw(path: Path) -> bytes:
    """1 MiB of data with zero runs and odd-sized patterns, written to ``path``."""
    data = bytearray()
    for i in range(SIZE // 4096):
        data += bytes(4096) if i % 7 in (2, 3) else bytes([(i * 37) & 0xFF]) * 4096
    data[12345:12400] = b"unaligned" * 6 + b"x"
    path.write_bytes(data)
    return bytes(data)


def nbdsh(script: str) -> dict[str, object]:
    """Run ``nbdsh -c script`` (Debian's python3-libnbd); the script prints one JSON line."""
    tool = require_tool("nbdsh")
    env = env_with_addcow()
    # nbdsh runs "python3 -m nbd": Debian's python3 (beside nbdsh) must come first,
    # the venv's bin (for the addcow script) after it.
    env["PATH"] = f"{os.path.dirname(tool)}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [tool, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    if proc.returncode != 0:
        raise AssertionError(f"nbdsh failed:\n{proc.stdout}\n{proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_scenario_model_matches_library(scenario: Path, base_raw: Path) -> None:
    # Control: the expected bytes the client tests compare against are right.
    assert content(scenario) == expected_scenario(base_raw)


# -- qemu-img -----------------------------------------------------------------------------


def test_qemu_img_info_convert_and_compare_round_trip(
    tmp_path: Path, scenario: Path, base_raw: Path
) -> None:
    qemu_img = require_tool("qemu-img")
    expected = tmp_path / "expected.raw"
    expected.write_bytes(expected_scenario(base_raw))
    source = tmp_path / "source.raw"
    new = mixed_raw(source)
    with served(tmp_path, scenario) as srv:
        info = json.loads(run([qemu_img, "info", "--output=json", "-f", "raw", srv.uri]).stdout)
        assert info["virtual-size"] == SIZE and info["format"] == "raw"

        out = tmp_path / "out.raw"
        run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
        assert out.read_bytes() == expected.read_bytes()
        run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(expected)])
        # Control: compare does notice a difference.
        changed = tmp_path / "changed.raw"
        changed.write_bytes(expected.read_bytes()[:-1] + b"\x01")
        proc = run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(changed)],
                   check=False)  # fmt: skip
        assert proc.returncode == 1, proc.stdout + proc.stderr

        # The other direction: qemu-img writes the whole disk through the server.
        run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source), srv.uri])
        run([qemu_img, "compare", "-f", "raw", "-F", "raw", srv.uri, str(source)])
    assert content(scenario) == new
    assert base_raw.read_bytes()[:CLUSTER] == pattern(0x10, CLUSTER)  # backing untouched


# -- qemu-io against a qcow2 referee ------------------------------------------------------------

QEMU_IO_SCRIPT = [
    "read -P 0x10 0 64k",
    "write -P 0xa1 4k 8k",
    "write -P 0xa2 60k 72k",
    "write -z 128k 64k",
    "write -z 200k 10k",
    "discard 256k 128k",
    "write -P 0xa3 1000k 24k",
    "write -P 0xa4 524287 3",
    "flush",
    "read -P 0x10 0 4k",
    "read -P 0xa1 4k 8k",
    "read -P 0xa2 60k 68k",
    "read -P 0 128k 64k",
    "read -P 0x13 192k 8k",
    "read -P 0 200k 10k",
    "read -P 0x13 210k 46k",
    "read -P 0 256k 128k",
    "read -P 0x17 448k 65535",
    "read -P 0 524290 12286",
    "read -P 0xa4 524287 3",
    "read -P 0x1f 960k 40k",
    "read -P 0xa3 1000k 24k",
]


def _qemu_io(tool: str, fmt: str, target: str) -> list[str]:
    args = [tool, "-f", fmt]
    for command in QEMU_IO_SCRIPT:
        args += ["-c", command]
    proc = run([*args, target])
    # Drop the timing lines ("64 KiB, 1 ops; 00.00 sec (...)"), keep the rest.
    return [line for line in proc.stdout.splitlines() if " ops; " not in line]


def test_qemu_io_script_matches_a_qcow2_overlay(
    tmp_path: Path, base_raw: Path, serve_loop: str
) -> None:
    qemu_io = require_tool("qemu-io")
    qemu_img = require_tool("qemu-img")
    ref = tmp_path / "ref.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ref.raw'}",
         "-b", str(base_raw), "-F", "raw", str(ref), str(SIZE)])  # fmt: skip
    expected = _qemu_io(qemu_io, "qcow2", str(ref))
    assert not any("verification failed" in line for line in expected), expected

    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", backing_file=base_raw, backing_format="raw")
    with served(tmp_path, image) as srv:
        got = _qemu_io(qemu_io, "raw", srv.uri)
        assert got == expected
        assert f"event loop: {serve_loop}" in srv.stderr()
    # Final contents equal, compared by qemu-img itself once the server is gone.
    final = tmp_path / "final.raw"
    final.write_bytes(content(image))
    run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(ref), str(final)])


# -- nbdinfo --map against addcow map ---------------------------------------------------------


def _merged(entries: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for start, length, value in entries:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((start, length, value))
    return out


def test_nbdinfo_map_and_allocation_depth_match_addcow_map(
    tmp_path: Path, scenario: Path
) -> None:
    nbdinfo = require_tool("nbdinfo")
    entries = json.loads(addcow_cli("map", "--output=json", scenario).stdout)
    # base:allocation: bit 0 HOLE = no data, bit 1 ZERO = reads as zero.
    want_base = _merged(
        [(e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
         for e in entries]
    )  # fmt: skip
    # qemu:allocation-depth: 0 unallocated, 1 the image file, 2 the backing file.
    want_depth = _merged(
        [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in entries]
    )
    assert {v for _, _, v in want_depth} == {1, 2}  # control: both layers appear
    with served(tmp_path, scenario, args=("--read-only",)) as srv:
        base = json.loads(run([nbdinfo, "--json", "--map", srv.uri]).stdout)
        depth = json.loads(
            run([nbdinfo, "--json", "--map=qemu:allocation-depth", srv.uri]).stdout
        )
    assert _merged([(e["offset"], e["length"], e["type"]) for e in base]) == want_base
    assert _merged([(e["offset"], e["length"], e["type"]) for e in depth]) == want_depth
    # The diagram, spelled out for the depth map: image file = 1, backing = 2.
    by_cluster = {}
    for start, length, value in want_depth:
        for c in range(start // CLUSTER, (start + length) // CLUSTER):
            by_cluster[c] = value
    assert [by_cluster[c] for c in range(16)] == [1, 2, 1, 2, 2, 1, 2, 2, 2, 1, 2, 2, 1, 2, 2, 2]


# -- nbdcopy, several connections ------------------------------------------------------------------


def test_nbdcopy_both_directions_with_multi_conn(
    tmp_path: Path, scenario: Path, base_raw: Path, serve_loop: str
) -> None:
    nbdcopy = require_tool("nbdcopy")
    out = tmp_path / "out.raw"
    out.write_bytes(b"")
    source = tmp_path / "source.raw"
    new = mixed_raw(source)
    with served(tmp_path, scenario) as srv:
        run([nbdcopy, "--connections=4", "--requests=16", srv.uri, str(out)])
        assert out.read_bytes() == expected_scenario(base_raw)
        run([nbdcopy, "--connections=4", "--requests=16", str(source), srv.uri])
        log = srv.stderr()
    # Several connections were really used (the server advertised CAN_MULTI_CONN).
    assert log.count("serving export") >= 4, log
    assert f"event loop: {serve_loop}" in log
    assert content(scenario) == new


# -- nbdsh: protocol corners --------------------------------------------------------------

NBDSH_PRELUDE = """
import json, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri({uri!r})
def err(call):
    try:
        call()
        return "ok"
    except nbd.Error as e:
        return e.errno
"""


def test_nbdsh_unaligned_io(tmp_path: Path, scenario: Path, base_raw: Path) -> None:
    model = bytearray(expected_scenario(base_raw))
    writes = [(3 * CLUSTER - 1000, 3001, 0xB1), (1, 7, 0xB2), (SIZE - 333, 333, 0xB3),
              (8 * CLUSTER + 4095, 2, 0xB4)]  # fmt: skip
    reads = [(0, 1), (3 * CLUSTER - 2000, 5000), (12345, 54321), (SIZE - 1, 1), (5, 3 * CLUSTER)]
    for off, n, byte in writes:
        model[off : off + n] = bytes([byte]) * n
    with served(tmp_path, scenario) as srv:
        script = NBDSH_PRELUDE.format(uri=srv.uri) + f"""
for off, n, byte in {writes!r}:
    h.pwrite(bytes([byte]) * n, off)
print(json.dumps({{"reads": [h.pread(n, off).hex() for off, n in {reads!r}]}}))
"""
        result = nbdsh(script)
    assert result["reads"] == [bytes(model[o : o + n]).hex() for o, n in reads]
    assert content(scenario) == bytes(model)


def test_nbdsh_pipelined_reads_of_every_route_match_the_disk(
    tmp_path: Path, scenario: Path, base_raw: Path
) -> None:
    """Hundreds of short reads in flight at once, so that the server takes them in
    runs: inside allocated clusters, in the backing, across cluster boundaries,
    unaligned, of 1 byte to 64 KiB, with a flush and a write (to the last cluster,
    which no read touches) in the middle of the pipeline. Each reply is the disk's
    bytes, and the write lands."""
    rng = random.Random(26)
    reads = []
    for _ in range(600):
        n = rng.choice([1, 512, 4096, 4096, 4096, 65535, 65536])
        end = 15 * CLUSTER
        off = rng.choice([rng.randrange(end - n), rng.randrange(end // 4096) * 4096])
        reads.append((min(off, end - n), n))
    model = expected_scenario(base_raw)
    with served(tmp_path, scenario) as srv:
        script = NBDSH_PRELUDE.format(uri=srv.uri) + f"""
reads = {reads!r}
bufs = [nbd.Buffer(n) for _, n in reads]
cookies = []
for i, (off, n) in enumerate(reads):
    cookies.append(h.aio_pread(bufs[i], off))
    if i == 300:
        cookies.append(h.aio_flush())
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 7)), {SIZE - 7}))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
print(json.dumps({{"reads": [b.to_bytearray().hex() for b in bufs]}}))
"""
        result = nbdsh(script)
    assert result["reads"] == [model[o : o + n].hex() for o, n in reads]
    assert content(scenario) == model[:-7] + b"w" * 7


def _on_disk_bits(path: Path, clusters: list[int]) -> list[bool]:
    """Bits as the .add-cow file holds them now (no lock: the server has it)."""
    with addcow.open(path, readonly=True, force_share=True) as img:
        return [img.bitmap.is_set(c) for c in clusters]


def test_nbdsh_fua_makes_the_write_durable_before_the_reply(
    tmp_path: Path, scenario: Path
) -> None:
    with served(tmp_path, scenario) as srv:
        prelude = NBDSH_PRELUDE.format(uri=srv.uri)
        nbdsh(prelude + f"""
h.pwrite(b"\\xc6" * 100, {6 * CLUSTER + 50})
print(json.dumps({{}}))
""")
        # Control: a plain write's bit is still only in memory (the bitmap lags).
        assert _on_disk_bits(scenario, [6, 7]) == [False, False]
        nbdsh(prelude + f"""
h.pwrite(b"\\xc7" * 100, {7 * CLUSTER + 50}, nbd.CMD_FLAG_FUA)
print(json.dumps({{}}))
""")
        assert _on_disk_bits(scenario, [6, 7]) == [True, True]
        with addcow.open(scenario, readonly=True, force_share=True) as img:
            assert img.read(7 * CLUSTER + 50, 100) == b"\xc7" * 100
            assert img.read(6 * CLUSTER + 50, 100) == b"\xc6" * 100


def test_nbdsh_fast_zero_refused_when_not_whole_clusters(
    tmp_path: Path, scenario: Path, base_raw: Path
) -> None:
    model = bytearray(expected_scenario(base_raw))
    with served(tmp_path, scenario) as srv:
        result = nbdsh(NBDSH_PRELUDE.format(uri=srv.uri) + f"""
flags = nbd.CMD_FLAG_FAST_ZERO
r = {{
  "can_fast_zero": h.can_fast_zero(),
  "unaligned": err(lambda: h.zero(4096, {10 * CLUSTER + 512}, flags)),
  "partial_tail": err(lambda: h.zero({CLUSTER + 10}, {13 * CLUSTER}, flags)),
  "after_refusal": h.pread({2 * CLUSTER}, {10 * CLUSTER}).hex(),
  "aligned": err(lambda: h.zero({2 * CLUSTER}, {13 * CLUSTER}, flags)),
  "to_the_end": err(lambda: h.zero({CLUSTER}, {15 * CLUSTER}, flags)),
  "slow_without_flag": err(lambda: h.zero(4096, {10 * CLUSTER + 512})),
}}
print(json.dumps(r))
""")
    assert result["can_fast_zero"] is True
    assert result["unaligned"] == "ENOTSUP" and result["partial_tail"] == "ENOTSUP"
    # "SHOULD NOT alter the contents of the export when returning this failure"
    assert result["after_refusal"] == bytes(model[10 * CLUSTER : 12 * CLUSTER]).hex()
    assert result["aligned"] == "ok" and result["to_the_end"] == "ok"
    assert result["slow_without_flag"] == "ok"
    model[13 * CLUSTER :] = bytes(3 * CLUSTER)
    model[10 * CLUSTER + 512 : 10 * CLUSTER + 4608] = bytes(4096)
    assert content(scenario) == bytes(model)


def test_nbdsh_req_one_cache_and_block_status_at_the_end(
    tmp_path: Path, scenario: Path
) -> None:
    with served(tmp_path, scenario) as srv:
        result = nbdsh(NBDSH_PRELUDE.format(uri=srv.uri) + f"""
h.set_strict_mode(0)   # let bad requests reach the server
def status(length, offset, flags=0):
    got = {{}}
    def cb(context, off, entries, error):
        got[context] = list(entries)
        return 0
    h.block_status(length, offset, cb, flags)
    return got
r = {{
  "req_one": status({SIZE}, 0, nbd.CMD_FLAG_REQ_ONE),
  "req_one_mid": status({SIZE - 9 * CLUSTER - 100}, {9 * CLUSTER + 100}, nbd.CMD_FLAG_REQ_ONE),
  "full": status({SIZE}, 0),
  "last_512": status(512, {SIZE - 512}),
  "last_byte": status(1, {SIZE - 1}),
  "past_end": err(lambda: status(1024, {SIZE - 512})),
  "cache": err(lambda: h.cache({4 * CLUSTER}, {8 * CLUSTER})),
  "cache_past_end": err(lambda: h.cache(4096, {SIZE - 2048})),
  "read_past_end": err(lambda: h.pread(4096, {SIZE - 2048})),
  "write_past_end": err(lambda: h.pwrite(b"x" * 4096, {SIZE - 2048})),
  "still_works": h.pread(4, 0).hex(),
}}
print(json.dumps(r))
""")
    base, depth = "base:allocation", "qemu:allocation-depth"
    # REQ_ONE: "each chunk contains exactly one descriptor" per context.
    assert result["req_one"] == {base: [2 * CLUSTER, 0], depth: [CLUSTER, 1]}
    assert result["req_one_mid"] == {base: [CLUSTER - 100, 0], depth: [CLUSTER - 100, 1]}
    full = result["full"]
    assert isinstance(full, dict) and sum(full[depth][0::2]) == SIZE
    assert full[depth][:6] == [CLUSTER, 1, CLUSTER, 2, CLUSTER, 1]
    assert result["last_512"] == {base: [512, 0], depth: [512, 2]}
    assert result["last_byte"] == {base: [1, 0], depth: [1, 2]}
    assert result["past_end"] == "EINVAL"
    assert result["cache"] == "ok" and result["cache_past_end"] == "EINVAL"
    assert result["read_past_end"] == "EINVAL" and result["write_past_end"] == "ENOSPC"
    assert result["still_works"] == "a0a0a0a0"


def test_nbdsh_connect_command_stdio(tmp_path: Path, scenario: Path, base_raw: Path) -> None:
    assert shutil.which("addcow", path=str(BIN))
    result = nbdsh(f"""
import json, nbd
h = nbd.NBD()
h.add_meta_context("qemu:allocation-depth")
h.connect_command(["addcow", "serve", "--stdio", {str(scenario)!r}])
r = {{"size": h.get_size(), "multi_conn": h.can_multi_conn(), "head": h.pread(8, 0).hex()}}
h.pwrite(b"stdio!", {4 * CLUSTER})
h.flush()
depth = []
h.block_status({CLUSTER}, {4 * CLUSTER}, lambda c, o, e, err: depth.extend(e) or 0)
r["depth"] = depth
h.shutdown()
print(json.dumps(r))
""")
    assert result == {"size": SIZE, "multi_conn": True, "head": "a0" * 8,
                      "depth": [CLUSTER, 1]}  # fmt: skip
    data = content(scenario)
    assert data[4 * CLUSTER : 4 * CLUSTER + 6] == b"stdio!"
    assert data[4 * CLUSTER + 6 : 5 * CLUSTER] == pattern(0x14, CLUSTER - 6)


# -- listening, daemon mode and shutdown ---------------------------------------------------------


def test_tcp_port_0_binds_loopback_and_prints_the_uri(tmp_path: Path, scenario: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--port", "0", "--read-only", str(scenario)],
        stdout=subprocess.PIPE, text=True, env=env_with_addcow(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        prefix = f"addcow: serving {scenario} on nbd://127.0.0.1:"
        assert line.startswith(prefix) and line.endswith("/"), line
        uri = line.rsplit(" on ", 1)[1]
        assert int(uri.rsplit(":", 1)[1].rstrip("/")) > 0
        out = run([nbdinfo, "--size", uri]).stdout
        assert out.strip() == str(SIZE)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_daemon_mode_with_pidfile(tmp_path: Path, scenario: Path, base_raw: Path) -> None:
    nbdinfo = require_tool("nbdinfo")
    sock = tmp_path / "d.sock"
    pidfile = tmp_path / "serve.pid"
    proc = run([ADDCOW, "serve", "--socket", str(sock), "--pidfile", str(pidfile),
                str(scenario)])  # fmt: skip
    assert proc.stdout == f"addcow: serving {scenario} on nbd+unix:///?socket={sock}\n"
    pid = int(pidfile.read_text())
    try:
        assert run([nbdinfo, "--size", f"nbd+unix:///?socket={sock}"]).stdout.strip() == str(SIZE)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while (pidfile.exists() or sock.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists() and not sock.exists()
    # The daemon released its lock: the image opens read-write again.
    with addcow.open(scenario) as img:
        assert img.read(0, 4) == pattern(0xA0, 4)


def test_serve_refuses_an_image_in_use(tmp_path: Path, scenario: Path) -> None:
    with addcow.open(scenario):
        proc = addcow_cli("serve", "--foreground", "--socket", tmp_path / "x.sock", scenario,
                          check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("addcow: ")
    assert not (tmp_path / "x.sock").exists()


def test_sigterm_with_requests_in_flight_keeps_every_acknowledged_write(
    tmp_path: Path, scenario: Path
) -> None:
    with served(tmp_path, scenario) as srv, RawClient(srv.socket, timeout=30) as c:
        c.start()
        writes = 64
        for i in range(writes):
            data = bytes([0x40 + i % 64]) * (CLUSTER // 4)
            try:
                c.request(1, i * (CLUSTER // 4), len(data), cookie=i, data=data)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server finished its in-flight requests and hung up: allowed
            if i == writes // 2:
                srv.proc.send_signal(signal.SIGTERM)
        acknowledged = []
        try:
            while True:
                _kind, _flags, error, cookie, _payload = c.reply()
                assert error == 0
                acknowledged.append(cookie)
        except (EOFError, ConnectionResetError):
            pass
    # served() checked the exit status (0); every acknowledged write is on disk.
    assert acknowledged, "no write completed before the shutdown"
    data = content(scenario)
    for i in acknowledged:
        quarter = CLUSTER // 4
        assert data[i * quarter : (i + 1) * quarter] == bytes([0x40 + i % 64]) * quarter


def test_pipelined_writes_into_one_unallocated_cluster_all_survive(
    tmp_path: Path, scenario: Path, base_raw: Path
) -> None:
    # Sixteen 4 KiB writes into cluster 3 (unallocated), sent without waiting on two
    # connections: each copy-on-write must keep the others' bytes.
    model = bytearray(expected_scenario(base_raw))
    with served(tmp_path, scenario) as srv, RawClient(srv.socket) as a, RawClient(srv.socket) as b:
        a.start()
        b.start()
        for i in range(16):
            off = 3 * CLUSTER + i * 4096 + 7
            data = bytes([0x60 + i]) * 4000
            (a if i % 2 else b).request(1, off, len(data), cookie=i, data=data)
            model[off : off + len(data)] = data
        cookies = sorted([a.reply()[3] for _ in range(8)] + [b.reply()[3] for _ in range(8)])
        assert cookies == list(range(16))
        a.request(3, cookie=99)  # FLUSH on one connection covers both (multi-conn)
        assert a.reply()[2:4] == (0, 99)
        assert _on_disk_bits(scenario, [3]) == [True]
        assert a.read(3 * CLUSTER, CLUSTER) == bytes(model[3 * CLUSTER : 4 * CLUSTER])
    assert content(scenario) == bytes(model)


def test_several_exports_listed_and_reached_by_name(
    tmp_path: Path, scenario: Path, base_raw: Path
) -> None:
    nbdinfo = require_tool("nbdinfo")
    qemu_io = require_tool("qemu-io")
    other = tmp_path / "e.add-cow"
    addcow.create(other, image_file="e.raw", backing_file=base_raw, backing_format="raw")
    with served(tmp_path, scenario, other, args=("--export-name", "first")) as srv:
        listing = json.loads(run([nbdinfo, "--json", "--list", srv.uri]).stdout)
        names = [e["export-name"] for e in listing["exports"]]
        assert names == ["first", "e.add-cow"]
        assert "backing file" in listing["exports"][1]["description"]
        sock = srv.socket
        run([qemu_io, "-f", "raw", "-c", "read -P 0x10 0 64k",
             f"nbd+unix:///e.add-cow?socket={sock}"])  # fmt: skip
        run([qemu_io, "-f", "raw", "-c", "read -P 0xa0 0 64k", f"nbd+unix:///first?socket={sock}"])
        run([qemu_io, "-f", "raw", "-c", "read -P 0xa0 0 64k", srv.uri])  # "" = the first
        missing = run([nbdinfo, f"nbd+unix:///nope?socket={sock}"], check=False)
        assert missing.returncode != 0
