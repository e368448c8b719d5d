"""``addcow io``: qemu-io's commands, messages and exit status on an add-cow image.

The image under test, unless a test says otherwise (64 KiB clusters, 1 MiB)::

    cluster   0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15
    base.raw  10 11 12 13 14 15 16 17 .. .. .. .. 1c 1d 1e 1f   (.. = hole, reads 0)
    img       every cluster unallocated (reads come from base.raw)

Expected texts are qemu-io 7.2's, written out literally; the timing line is
filtered as qemu-iotests does (its numbers are measured, its shape is kept).
test_interop_qemu.py runs the same commands through qemu-io itself.
"""

from __future__ import annotations

import errno
import io as stdio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLUSTER, run
from conftest import addcow as addcow_cli
from helpers import T, filter_timing

from addcow.cli.qemu_io.commands import COMMANDS
from addcow.cli.qemu_io.formatting import cvtstr, timestr
from addcow.cli.qemu_io.parse import cvtnum, getopt, parse_pattern
from addcow.cli.qemu_io.session import Session
from addcow.errors import AddCowIOError


def report(op: str, n: int, offset: int, size_text: str) -> str:
    return f"{op} {n}/{n} bytes at offset {offset}\n{size_text}, 1 ops; {T}\n"


READ_USAGE = (
    "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
    "reads a number of bytes at a specified offset\n"
)


@pytest.fixture
def img(tmp_path: Path, base_raw: Path) -> Path:
    addcow_cli(
        "create", "-b", "base.raw", "-F", "raw", "-o", "image_file=img.raw", "img.add-cow",
        cwd=tmp_path,
    )
    return tmp_path / "img.add-cow"


def io(image: Path, *commands: str, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Run ``addcow io`` with one -c per command: (status, filtered stdout, stderr)."""
    args: list[str] = ["io", *options]
    for command in commands:
        args += ["-c", command]
    proc = addcow_cli(*args, image, check=False)
    assert "Traceback" not in proc.stderr
    return proc.returncode, filter_timing(proc.stdout), proc.stderr


# -- each command ----------------------------------------------------------------------


def test_write_then_read_with_pattern(img: Path) -> None:
    status, out, err = io(img, "write -P 0xaa 0 64k", "read -P 0xaa 0 64k")
    assert (status, err) == (0, "")
    assert out == report("wrote", 65536, 0, "64 KiB") + report("read", 65536, 0, "64 KiB")
    # The data is in the image file, and a new process reads it back.
    assert (img.parent / "img.raw").read_bytes()[:CLUSTER] == b"\xaa" * CLUSTER
    assert io(img, "read -P 0xaa 0 64k")[0] == 0


def test_reads_of_unallocated_clusters_come_from_the_backing(img: Path) -> None:
    status, out, err = io(img, "read -P 0x11 64k 64k", "read -P 0 512k 256k")
    assert (status, err) == (0, "")
    assert out == report("read", 65536, 65536, "64 KiB") + report("read", 262144, 524288, "256 KiB")
    assert io(img, "r -P 0x1f 1048575 1") == (0, report("read", 1, 1048575, "1 bytes"), "")


def test_pattern_verification_failure_message_and_exit_status(img: Path) -> None:
    status, out, err = io(img, "read -P 0xaa 0 200", "read -P 0x10 0 200")
    assert status == 1  # one failed command fails the run, even when later ones pass
    assert err == ""
    assert out == (
        "Pattern verification failed at offset 0, 200 bytes\n"
        + report("read", 200, 0, "200 bytes")
        + report("read", 200, 0, "200 bytes")
    )


def test_pattern_verification_of_a_sub_range(img: Path) -> None:
    # -s/-l check bytes [s, s+l) of the read; the offset printed is offset + s.
    assert io(img, "write -P 0x22 64k 10", "read -P 0x22 -s 0 -l 10 64k 100")[0] == 0
    status, out, _ = io(img, "read -q -P 0x22 -s 10 -l 20 64k 100")
    assert (status, out) == (1, "Pattern verification failed at offset 65546, 20 bytes\n")


def test_unaligned_write_copies_the_rest_of_the_cluster(img: Path) -> None:
    status, out, err = io(
        img,
        "write -P 0xbb 100 1000",
        "read -P 0x10 0 100",
        "read -P 0xbb 100 1000",
        "read -P 0x10 1100 64436",
        "alloc 0 64k",
    )
    assert (status, err) == (0, "")
    assert out.startswith(report("wrote", 1000, 100, "1000 bytes"))
    assert out.endswith("65536/65536 bytes allocated at offset 0 bytes\n")


def test_write_straddling_two_clusters(img: Path) -> None:
    status, out, _ = io(
        img,
        "write -P 0xcc 60k 8k",
        "read -P 0x10 0 60k",
        "read -P 0xcc 60k 8k",
        "read -P 0x11 68k 60k",
        "alloc 0 192k",
    )
    assert status == 0
    assert out.endswith("131072/196608 bytes allocated at offset 0 bytes\n")


def test_write_zeroes_whole_and_partial_clusters(img: Path) -> None:
    status, out, err = io(
        img,
        "write -z 128k 64k",
        "write -z -u 192k 64k",
        "write -z -u 260k 1k",
        "read -P 0 128k 128k",
        "read -P 0x14 256k 4k",
        "read -P 0 260k 1k",
        "read -P 0x14 261k 59k",
        "alloc 128k 192k",
    )
    assert (status, err) == (0, "")
    assert out.startswith(
        report("wrote", 65536, 131072, "64 KiB")
        + report("wrote", 65536, 196608, "64 KiB")
        + report("wrote", 1024, 266240, "1 KiB")
    )
    assert out.endswith("196608/196608 bytes allocated at offset 128 KiB\n")


def test_write_zeroes_without_fallback(img: Path) -> None:
    # Cluster 8 is a backing hole: the rest of it reads zero, no fallback needed.
    assert io(img, "write -z -n 520k 8k")[0] == 0
    # Cluster 0 holds data: zeroing part of it needs the slow path, which -n forbids.
    assert io(img, "write -z -n 4k 8k") == (1, "write failed: Operation not supported\n", "")
    assert io(img, "read -P 0x10 0 64k")[0] == 0


def test_discard_whole_and_partial_clusters(img: Path) -> None:
    status, out, err = io(
        img,
        "discard 256k 64k",
        "discard 330k 1k",
        "read -P 0 256k 64k",
        "read -P 0x15 320k 64k",
        "alloc 256k 128k",
    )
    assert (status, err) == (0, "")
    assert out.startswith(
        report("discard", 65536, 262144, "64 KiB") + report("discard", 1024, 337920, "1 KiB")
    )
    # The whole cluster now reads zero from the image; the partial one is untouched.
    assert out.endswith("65536/131072 bytes allocated at offset 256 KiB\n")


def test_flush_prints_nothing_and_fua_writes_report(img: Path) -> None:
    status, out, err = io(img, "write -f -P 0x77 0 4k", "flush", "f", "write -z -f 64k 64k")
    assert (status, err) == (0, "")
    assert out == report("wrote", 4096, 0, "4 KiB") + report("wrote", 65536, 65536, "64 KiB")


def test_map_lines(img: Path) -> None:
    assert io(img, "write -P 0xa0 0 64k", "write -z 192k 128k")[0] == 0
    status, out, err = io(img, "map", options=("-r",))
    assert (status, err) == (0, "")
    assert out == (
        "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)\n"
        "128 KiB (0x20000) bytes not allocated at offset 64 KiB (0x10000)\n"
        "128 KiB (0x20000) bytes     allocated at offset 192 KiB (0x30000)\n"
        "704 KiB (0xb0000) bytes not allocated at offset 320 KiB (0x50000)\n"
    )


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("alloc 0", "512/512 bytes allocated at offset 0 bytes"),
        ("alloc 0 1M", "65536/1048576 bytes allocated at offset 0 bytes"),
        ("alloc 32k 64k", "32768/65536 bytes allocated at offset 32 KiB"),
        ("alloc 1100 1k", "1024/1024 bytes allocated at offset 1.074 KiB"),
        ("alloc 1048000 1000", "0/576 bytes allocated at offset 1023.438 KiB"),
        ("alloc 1M", "0/0 bytes allocated at offset 1 MiB"),
        ("alloc 2M", "0/0 bytes allocated at offset 2 MiB"),
        ("a 0x10000 0x10000", "0/65536 bytes allocated at offset 64 KiB"),
    ],
)
def test_alloc_lines(img: Path, command: str, expected: str) -> None:
    assert io(img, "write -q -P 0xa0 0 64k")[0] == 0
    assert io(img, command) == (0, expected + "\n", "")


def test_length(img: Path) -> None:
    assert io(img, "length", "l", options=("-f", "add-cow")) == (0, "1 MiB\n1 MiB\n", "")


def test_read_verbose_dump(img: Path) -> None:
    status, out, _ = io(img, "write -q -P 0x41 0 20", "read -v 16 20")
    assert status == 0
    assert out == (
        "00000010:  41 41 41 41 10 10 10 10 10 10 10 10 10 10 10 10  AAAA............\n"
        "00000020:  10 10 10 10  ....\n" + report("read", 20, 16, "20 bytes")
    )


def test_sizes_take_qemu_suffixes(img: Path) -> None:
    status, out, _ = io(img, "write -P 0x33 1k 0.5k", "read -q -P 0x33 1024 512", "read -q 010 1")
    assert status == 0
    assert out == report("wrote", 512, 1024, "512 bytes")


def test_write_from_a_source_file(img: Path, tmp_path: Path) -> None:
    (tmp_path / "pat.bin").write_bytes(b"abc")
    status, out, _ = io(img, f"write -q -s {tmp_path / 'pat.bin'} 0 10", "read -v 0 10")
    assert status == 0
    assert out.startswith("00000000:  61 62 63 61 62 63 61 62 63 61  abcabcabca\n")


def test_a_source_file_that_is_a_fifo_is_refused_not_waited_on(img: Path, tmp_path: Path) -> None:
    """``write -s FIFO`` would block in open until a writer comes; it is refused at
    once, and a device (``/dev/zero``) is still a source."""
    fifo = tmp_path / "src.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "addcow", "io", "-c", f"write -s {fifo} 0 1", "-c",
         "write -s /dev/zero 0 1", str(img)], capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        1, f"{fifo}: is a named pipe, not a regular file or device\n"
    )  # fmt: skip
    assert filter_timing(proc.stdout) == report("wrote", 1, 0, "1 bytes")


def test_machine_readable_statistics(img: Path) -> None:
    status, out, _ = io(img, "write -C 0 1", "read -C 0 1", "discard -C 0 64k")
    assert status == 0
    assert out == "1,1,X:XX:XX.X,XXX,XXX\n1,1,X:XX:XX.X,XXX,XXX\n65536,1,X:XX:XX.X,XXX,XXX\n"


def test_help(img: Path) -> None:
    assert io(img, "help alloc", "? map") == (
        0,
        "alloc offset [count] -- checks if offset is allocated in the file\n"
        "map  -- prints the allocated areas of a file\n",
        "",
    )
    status, out, _ = io(img, "help")
    assert status == 0
    first = out.splitlines()[0]
    assert first == "alloc offset [count] -- checks if offset is allocated in the file"
    assert out.endswith("\nUse 'help commandname' for extended help.\n")


def test_quit_stops_the_script(img: Path) -> None:
    assert io(img, "quit", "write -P 0x99 0 64k") == (0, "", "")
    assert io(img, "q", "read 1M 1") == (0, "", "")
    assert io(img, "alloc 0 64k") == (0, "0/65536 bytes allocated at offset 0 bytes\n", "")


def test_commands_from_stdin(img: Path) -> None:
    proc = run(
        [sys.executable, "-m", "addcow", "io", str(img)],
        input=b"write -P 0x5 0 4k\n\nread -P 0x5 0 4k\nquit\nwrite 0 1\n",
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert filter_timing(proc.stdout) == (
        report("wrote", 4096, 0, "4 KiB") + report("read", 4096, 0, "4 KiB")
    )


# -- errors: one line each, the status qemu-io gives, no traceback -----------------------


@pytest.mark.parametrize(
    ("command", "line"),
    [
        ("read 1M 1", "read failed: Input/output error"),
        ("read 1048575 2", "read failed: Input/output error"),
        ("read 2M 0", "read failed: Input/output error"),
        ("write 1048575 2", "write failed: Input/output error"),
        ("write -z 1M 64k", "write failed: Input/output error"),
        ("discard 1048575 2", "discard failed: Input/output error"),
    ],
)
def test_requests_outside_the_disk(img: Path, command: str, line: str) -> None:
    assert io(img, command) == (1, line + "\n", "")


@pytest.mark.parametrize("command", ["write 0 1", "w -z 0 64k", "discard 0 64k", "write -x 0 1"])
def test_read_only_refuses_write_commands(img: Path, command: str) -> None:
    assert io(img, command, options=("-r",)) == (1, "", "addcow: Block node is read-only\n")
    assert io(img, "read -P 0x10 0 64k", "alloc 0 1M", options=("-r",)) == (
        0,
        report("read", 65536, 0, "64 KiB") + "0/1048576 bytes allocated at offset 0 bytes\n",
        "",
    )


def test_read_only_allows_reads_flush_and_map(img: Path) -> None:
    status, _, err = io(img, "read 0 1", "flush", "map", "alloc 0", options=("-r",))
    assert (status, err) == (0, "")


@pytest.mark.parametrize(
    ("command", "out", "err"),
    [
        ("read 0", "", "bad argument count 1 to read, expected at least 2 arguments\n"),
        ("read 0 1 2", READ_USAGE, ""),
        ("read -x 0 1", READ_USAGE, "read: invalid option -- 'x'\n"),
        ("r -x 0 1", READ_USAGE, "r: invalid option -- 'x'\n"),
        ("read 0 1 -P", READ_USAGE, "read: option requires an argument -- 'P'\n"),
        ("read -s 10 0 100", READ_USAGE, ""),
        ("read -P 0x1ff 0 1", "0x1ff is not a valid pattern byte\n", ""),
        ("read -P -1 0 1", "-1 is not a valid pattern byte\n", ""),
        (
            "read x 1",
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x\n",
            "",
        ),
        (
            "read 1.5 1",
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5\n",
            "",
        ),
        (
            "read 0 99999999999999999999",
            "Parsing error: argument too large -- 99999999999999999999\n",
            "",
        ),
        ("read 0 9E", "Parsing error: argument too large -- 9E\n", ""),
        ("read 0 3G", "length cannot exceed 2147483136, given 3G\n", ""),
        ("write 0 3G", "length cannot exceed 2147483136 without -n, given 3G\n", ""),
        ("discard 0 3G", "length cannot exceed 2147483136, given 3G\n", ""),
        (
            "read -P 0xbb -s 190 -l 20 0 200",
            "pattern verification range exceeds end of read data\n",
            "",
        ),
        ("write -z -P 1 0 1", "Only one of -z, -P, and -s can be specified at the same time\n", ""),
        ("write -u 0 1", "-u requires -z to be specified\n", ""),
        ("write -u -n 0 1", "-n requires -z to be specified\n", ""),
        ("write -b -z 0 512", "-b and -z cannot be specified at the same time\n", ""),
        ("write -bf 0 512", "-f and -b or -c cannot be specified at the same time\n", ""),
        ("write -c 0 1000", "1000 is not a sector-aligned value for 'count'\n", ""),
        ("write -c 0 64k", "write failed: Operation not supported\n", ""),
        ("read -b 100 512", "100 is not a sector-aligned value for 'offset'\n", ""),
        ("read -b 0 512", "read failed: Operation not supported\n", ""),
        ("write -s /nonexistent/file 0 1", "", "/nonexistent/file: No such file or directory\n"),
        ("frob 0 1", "", 'command "frob" not found\n'),
        ("alloc", "", "bad argument count 0 to alloc, expected between 1 and 2 arguments\n"),
        ("alloc -5", "Parsing error: non-numeric argument, or extraneous/unrecognized "
         "suffix -- -5\n", ""),
        ("map 0", "", "bad argument count 1 to map, expected 0 arguments\n"),
        ("f 0", "", "bad argument count 1 to f, expected 0 arguments\n"),
        ("help bogus", "command bogus not found\n", ""),
    ],
)
def test_command_errors(img: Path, command: str, out: str, err: str) -> None:
    assert io(img, command) == (1, out, err)


def test_a_failed_command_does_not_stop_the_script(img: Path) -> None:
    status, out, _ = io(img, "read 1M 1", "write -P 0x55 0 1", "read -P 0x55 0 1")
    assert status == 1
    assert out == (
        "read failed: Input/output error\n"
        + report("wrote", 1, 0, "1 bytes")
        + report("read", 1, 0, "1 bytes")
    )


def test_missing_image_is_one_line(tmp_path: Path) -> None:
    proc = addcow_cli("io", "-c", "read 0 1", tmp_path / "missing.add-cow", check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("addcow: ")
    assert proc.stderr.count("\n") == 1


def test_debug_shows_the_traceback_before_the_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.add-cow"
    proc = addcow_cli("--debug", "info", missing, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.splitlines()[-1].startswith(f"addcow: {missing}: ")


def test_force_share_needs_read_only(img: Path) -> None:
    proc = addcow_cli("io", "-U", "-c", "read 0 1", img, check=False)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        f"addcow: {img}: -U (force share) can only be used with read-only images (-r)\n"
    )
    assert io(img, "read -q -P 0x10 0 1", options=("-U", "-r")) == (0, "", "")


def test_unsupported_format_is_refused(img: Path) -> None:
    proc = addcow_cli("io", "-f", "qcow2", "-c", "read 0 1", img, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_library_io_error_becomes_the_errno_line() -> None:
    class FullDisk:
        readonly = False
        size = cluster_size = CLUSTER

        def write(self, *args: object, **kwargs: object) -> None:
            raise AddCowIOError("img.raw: write at offset 0: No space left", errno.ENOSPC)

    out, err = stdio.StringIO(), stdio.StringIO()
    session = Session(FullDisk(), COMMANDS, out=out, err=err)  # type: ignore[arg-type]
    assert session.run_line("write 0 512") is False
    assert session.failed
    assert (out.getvalue(), err.getvalue()) == ("write failed: No space left on device\n", "")


# -- qemu-io's formatting helpers --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 bytes"),
        (100, "100 bytes"),
        (1024, "1 KiB"),
        (1100, "1.074 KiB"),
        (65536, "64 KiB"),
        (1537, "1.501 KiB"), (1536.5, "1.500 KiB"),
        (3 << 30, "3 GiB"),
        (512.5, "512.500000 bytes"),
        (float("inf"), "inf EiB"),
    ],
)
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


def test_timestr() -> None:
    assert timestr(0, verbose=False) == "00.00 sec"
    assert timestr(123_456_789, verbose=False) == "00.12 sec"
    assert timestr(123_456_789, verbose=True) == "0:00:00.12"
    assert timestr(3_661_500_000_000, verbose=False) == "1:01:01.50"


@pytest.mark.parametrize(
    ("text", "value"),
    [("0xaa", 0xAA), ("255", 255), ("010", 8), ("0", 0), ("+7", 7), ("-0", 0),
     ("256", None), ("-1", None), ("08", None), ("0x", None), ("zz", None), ("1 ", None)],
)
def test_parse_pattern_is_strtol_base_0(text: str, value: int | None) -> None:
    assert parse_pattern(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("010", 10), ("64k", 65536), ("1M", 1 << 20), ("0.5k", 512), ("0x10", 16),
     ("1.5", -errno.EINVAL), ("x", -errno.EINVAL), ("-1", -errno.EINVAL),
     ("9E", -errno.ERANGE)],
)
def test_cvtnum(text: str, value: int) -> None:
    assert cvtnum(text) == value


def test_getopt_permutes_and_clusters_like_glibc() -> None:
    assert getopt("w", ["-zu", "0", "1", "-P", "5"], "P:uz") == (
        [("z", ""), ("u", ""), ("P", "5")],
        ["0", "1"],
    )
    assert getopt("w", ["-P0x5", "--", "-1", "2"], "P:") == ([("P", "0x5")], ["-1", "2"])
    assert getopt("w", ["-q", "-x", "-P"], "P:q") == (
        [("q", ""), ("?", "w: invalid option -- 'x'")],
        [],
    )
