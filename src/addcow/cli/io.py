"""``addcow io``: qemu-io's commands over an add-cow image.

A qemu-io command script runs unchanged, and prints what qemu-io 7.2 prints,
so the two outputs can be compared once the timing line is filtered (as
qemu-iotests does)::

    addcow io -c 'write -P 0xaa 0 64k' -c 'read -P 0xaa 0 64k' disk.add-cow
    qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' -c 'read -P 0xaa 0 64k' disk.qcow2

Commands (qemu-io's names, short names, options and argument counts)::

    read    (r)  [-bCqv] [-P pattern [-s off] [-l len]] off len
    write   (w)  [-bcCfnquz] [-P pattern | -s source_file] off len
    discard (d)  [-Cq] off len
    flush   (f)
    alloc   (a)  offset [count]      bytes allocated in the image file itself
    map          allocated / not allocated ranges of the image file itself
    length  (l)
    help    (?)  [command]
    quit    (q)

Where the text goes, as in qemu-io:

* results, and the failure of a command once its arguments are parsed, go to
  stdout: ``wrote N/N bytes at offset O`` and the timing line, ``read failed:
  Input/output error``, ``Pattern verification failed at offset O, N bytes``,
  ``Parsing error: ...``, the usage line after a bad option;
* problems with the command line itself go to stderr: ``bad argument count``,
  ``command "x" not found``, getopt's ``read: invalid option -- 'x'``, and
  ``Block node is read-only`` for a write command on an image opened with -r.

Every command runs, even after one failed (until ``quit``); the exit status
is 1 if any command failed, else 0. Offsets and lengths take qemu's suffixes
(k, M, G, T, P, E; powers of 1024).

Library errors become the errno the QEMU block layer would report: a request
outside the disk is EIO ("Input/output error"), an operating-system failure
keeps its errno. ``--debug`` adds the library's message and traceback on
stderr.

Deliberate differences from qemu-io: lines qemu-io prefixes with ``qemu-io:``
start with ``addcow:``; -b (VM state) and -c (compressed) fail with
"Operation not supported", as they do on a raw image in qemu-io; ``write -z
-n`` refuses (ENOTSUP) a partial cluster whose other bytes do not already
read as zero, which is qcow2's rule; without -c, commands are read from stdin
one per line, and the prompt is shown only when stdin is a terminal (qemu-io
prints ``qemu-io>`` even into a pipe); a failed ``flush`` says so on stderr
(qemu-io says nothing).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from .. import sysio
from ..errors import AddCowError, AddCowIOError
from ..image import AddCowImage
from .common import CommandError, add_backing_root_arg, parse_size

BDRV_SECTOR_SIZE = 512
BDRV_REQUEST_MAX_BYTES = ((2**31 - 1) >> 9) << 9  # 2147483136, as QEMU
INT64_MAX = 2**63 - 1

_DESCRIPTION = (
    "Run qemu-io commands (read, write, discard, flush, alloc, map, length, help, "
    "quit) on an add-cow image, with qemu-io's options, messages and exit status: "
    "1 if any command failed. Each -c is one command; without -c, commands are "
    "read from standard input, one per line."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("io", help="run qemu-io commands on an image", description=_DESCRIPTION)
    p.add_argument(
        "-c",
        "--cmd",
        dest="commands",
        action="append",
        metavar="CMD",
        help="a qemu-io command, e.g. 'write -P 0xaa 0 64k' (repeatable; "
        "without -c commands come from stdin)",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="open read-only")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    add_backing_root_arg(p)
    p.add_argument("-f", "--format", dest="fmt", choices=("add-cow",), help="image format")
    p.add_argument("filename")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.force_share and not args.read_only:
        raise CommandError(
            f"{args.filename}: -U (force share) can only be used with read-only images (-r)"
        )
    image = AddCowImage.open(
        args.filename,
        readonly=args.read_only,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    with image:
        session = Session(image, debug=getattr(args, "debug", False))
        if args.commands is not None:
            lines: Iterable[str] = args.commands
        else:
            lines = _stdin_lines()
        for line in lines:
            session.run_line(line)
            if session.quit:
                break
        sys.stdout.flush()
    return 1 if session.failed else 0


def _stdin_lines() -> Iterable[str]:
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            sys.stdout.write("addcow io> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line[:-1] if line.endswith("\n") else line


class _Failed(Exception):
    """A command failed after printing its message (the exit status becomes 1)."""


# -- qemu-io's number parsing and formatting -----------------------------------------


_EINVAL_TEXT = "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {}"
_ERANGE_TEXT = "Parsing error: argument too large -- {}"


def cvtnum(text: str) -> int:
    """A size like qemu-io's cvtnum, or -errno (EINVAL, ERANGE) when it is not one."""
    # parse_size reads "010" as an octal mistake; qemu's parser reads decimal 10.
    match = re.fullmatch(r"0+(\d.*)", text)
    try:
        value = parse_size(match.group(1) if match else text)
    except CommandError:
        return -errno.EINVAL
    if value > INT64_MAX:
        return -errno.ERANGE
    return value


def parse_pattern(text: str) -> int | None:
    """The byte of ``-P``: C strtol(text, &end, 0), refused unless 0..255 and fully used."""
    s = text.lstrip(" \t\n\r\f\v")
    m = re.match(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    if m is None:
        return 0 if text == "" else None  # strtol("") is 0 with nothing left over
    if m.end() != len(s):
        return None
    digits = m.group(1)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if s.startswith("-"):
        value = -value
    return value if 0 <= value <= 255 else None


_UNITS = ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: '64 KiB', '1.074 KiB', '100 bytes', '31.700 MiB'."""
    for shift, unit in _UNITS:
        if value >= 1 << shift:
            text, suffix = f"{value / (1 << shift):.3f}", " " + unit
            break
    else:
        text, suffix = f"{value:f}", " bytes"
    cut = text.find(".000")
    return text[:cut] + suffix if cut >= 0 else text + suffix


def timestr(elapsed_ns: int, *, verbose: bool) -> str:
    """qemu-io's timestr: '00.00 sec', or 'H:MM:SS.ss' (always with -C)."""
    sec, nsec = divmod(elapsed_ns, 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60 + frac:05.2f}"
    return f"{frac:05.2f} sec"


def _tdiv(value: float, elapsed_ns: int) -> float:
    seconds = elapsed_ns / 1e9
    if seconds == 0:
        return math.inf if value else math.nan
    return value / seconds


def dump_buffer(data: bytes, offset: int) -> list[str]:
    """qemu-io's ``read -v`` hex dump."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexes = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        lines.append(f"{offset + i:08x}:  {hexes} {text}")
    return lines


def getopt(name: str, args: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU getopt with argument permutation, as qemu-io's commands use it.

    Returns the options in order, then the operands. A bad option becomes the
    pair ``("?", message)`` at its place; processing must stop there.
    """
    takes_arg = {c for i, c in enumerate(optstring) if optstring[i + 1 : i + 2] == ":"}
    known = set(optstring.replace(":", ""))
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c not in known:
                opts.append(("?", f"{name}: invalid option -- '{c}'"))
                return opts, operands
            if c in takes_arg:
                if j < len(arg):
                    opts.append((c, arg[j:]))
                elif i < len(args):
                    opts.append((c, args[i]))
                    i += 1
                else:
                    opts.append(("?", f"{name}: option requires an argument -- '{c}'"))
                    return opts, operands
                break
            opts.append((c, ""))
    return opts, operands


# -- the command table ---------------------------------------------------------------

_READ_HELP = """
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output
"""

_WRITE_HELP = """
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -s, -- use a pattern file to fill the write buffer
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_co_pwrite_zeroes
"""

_DISCARD_HELP = """
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
"""


@dataclass(frozen=True)
class Command:
    """One qemu-io command: its names, argument counts and help text."""

    name: str
    altname: str | None
    func: Callable[[Session, str, list[str]], None]
    argmin: int = 0
    argmax: int = 0  # -1: no maximum
    args: str | None = None
    oneline: str = ""
    help: str | None = None
    writes: bool = False

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}"


class Session:
    """Runs command lines against one open image and remembers whether any failed."""

    def __init__(
        self,
        image: AddCowImage,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        debug: bool = False,
    ) -> None:
        self.image = image
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.debug = debug
        self.failed = False
        self.quit = False

    # -- output ----------------------------------------------------------------

    def say(self, line: str) -> None:
        self.out.write(line + "\n")

    def complain(self, line: str) -> None:
        self.out.flush()
        self.err.write(line + "\n")
        self.err.flush()

    def fail(self, line: str) -> _Failed:
        """Print a failure on stdout (as qemu-io does) and return the exception to raise."""
        self.say(line)
        return _Failed(line)

    def report(self, op: str, elapsed_ns: int, offset: int, count: int, cflag: bool) -> None:
        """qemu-io's print_report: one request of ``count`` bytes."""
        ts = timestr(elapsed_ns, verbose=cflag)
        rate, ops = _tdiv(count, elapsed_ns), _tdiv(1, elapsed_ns)
        if cflag:
            self.say(f"{count},1,{ts},{rate:.3f},{ops:.3f}")
            return
        self.say(f"{op} {count}/{count} bytes at offset {offset}")
        self.say(f"{cvtstr(count)}, 1 ops; {ts} ({cvtstr(rate)}/sec and {ops:.4f} ops/sec)")

    # -- dispatch --------------------------------------------------------------

    def run_line(self, line: str) -> bool:
        """Run one command line; return False (and remember it) if it failed."""
        argv = [word for word in line.split(" ") if word]
        if not argv:
            return True
        ok = self.run(argv)
        if not ok:
            self.failed = True
        return ok

    def run(self, argv: list[str]) -> bool:
        name, args = argv[0], argv[1:]
        cmd = find_command(name)
        if cmd is None:
            self.complain(f'command "{name}" not found')
            return False
        n = len(args)
        if n < cmd.argmin or (cmd.argmax != -1 and n > cmd.argmax):
            if cmd.argmax == -1:
                expected = f"at least {cmd.argmin} arguments"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin} arguments"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax} arguments"
            self.complain(f"bad argument count {n} to {name}, expected {expected}")
            return False
        if cmd.writes and self.image.readonly:
            self.complain("addcow: Block node is read-only")
            return False
        try:
            cmd.func(self, name, args)
        except _Failed:
            return False
        return True

    def bad_option(self, cmd: Command, message: str) -> _Failed:
        self.complain(message)
        return self.fail(cmd.usage())

    def number(self, text: str) -> int:
        value = cvtnum(text)
        if value == -errno.ERANGE:
            raise self.fail(_ERANGE_TEXT.format(text))
        if value < 0:
            raise self.fail(_EINVAL_TEXT.format(text))
        return value

    def pattern(self, text: str) -> int:
        value = parse_pattern(text)
        if value is None:
            raise self.fail(f"{text} is not a valid pattern byte")
        return value

    def io_error(self, what: str, exc: AddCowError) -> _Failed:
        """``read failed: Input/output error`` and friends, from a library error."""
        if self.debug:
            self.complain(f"addcow: {exc}")
            traceback.print_exception(exc, file=self.err)
        return self.fail(f"{what} failed: {_strerror(exc)}")


def find_command(name: str) -> Command | None:
    for cmd in COMMANDS:
        if name in (cmd.name, cmd.altname):
            return cmd
    return None


# -- the commands --------------------------------------------------------------------


def read_f(s: Session, name: str, args: list[str]) -> None:
    cmd = READ
    opts, operands = getopt(name, args, "bCl:pP:qs:v")
    bflag = cflag = qflag = vflag = pflag = lflag = sflag = False
    pattern = pattern_offset = pattern_count = 0
    for opt, arg in opts:
        if opt == "?":
            raise s.bad_option(cmd, arg)
        if opt == "b":
            bflag = True
        elif opt == "C":
            cflag = True
        elif opt == "l":
            lflag, pattern_count = True, s.number(arg)
        elif opt == "P":
            pflag, pattern = True, s.pattern(arg)
        elif opt == "q":
            qflag = True
        elif opt == "s":
            sflag, pattern_offset = True, s.number(arg)
        elif opt == "v":
            vflag = True
    if len(operands) != 2:
        raise s.fail(cmd.usage())
    offset = s.number(operands[0])
    count = s.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        raise s.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}")
    if not pflag and (lflag or sflag):
        raise s.fail(cmd.usage())
    if not lflag:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise s.fail("pattern verification range exceeds end of read data")
    if bflag:
        _check_sector_aligned(s, offset, count)
    if offset + count > s.image.size and not bflag:
        raise s.fail("read failed: " + os.strerror(errno.EIO))  # before allocating a buffer
    buf = bytearray(count)
    start = time.monotonic_ns()
    try:
        if bflag:
            raise AddCowIOError("VM state is not supported by add-cow", errno.ENOTSUP)
        s.image.readinto(buf, offset)
    except AddCowError as exc:
        raise s.io_error("read", exc) from None
    elapsed = time.monotonic_ns() - start
    failed = None
    if pflag:
        region = buf[pattern_offset : pattern_offset + pattern_count]
        if region != bytes([pattern]) * pattern_count:
            failed = s.fail(
                f"Pattern verification failed at offset {offset + pattern_offset}, "
                f"{pattern_count} bytes"
            )
    if not qflag:
        if vflag:
            for line in dump_buffer(bytes(buf), offset):
                s.say(line)
        s.report("read", elapsed, offset, count, cflag)
    if failed is not None:
        raise failed


def write_f(s: Session, name: str, args: list[str]) -> None:
    cmd = WRITE
    opts, operands = getopt(name, args, "bcCfnpP:qs:uz")
    bflag = cflag = big_c = fua = no_fallback = pflag = qflag = sflag = unmap = zflag = False
    pattern = 0xCD
    source = ""
    for opt, arg in opts:
        if opt == "?":
            raise s.bad_option(cmd, arg)
        if opt == "b":
            bflag = True
        elif opt == "c":
            cflag = True
        elif opt == "C":
            big_c = True
        elif opt == "f":
            fua = True
        elif opt == "n":
            no_fallback = True
        elif opt == "P":
            pflag, pattern = True, s.pattern(arg)
        elif opt == "q":
            qflag = True
        elif opt == "s":
            sflag, source = True, arg
        elif opt == "u":
            unmap = True
        elif opt == "z":
            zflag = True
    if len(operands) != 2:
        raise s.fail(cmd.usage())
    if bflag and zflag:
        raise s.fail("-b and -z cannot be specified at the same time")
    if fua and (bflag or cflag):
        raise s.fail("-f and -b or -c cannot be specified at the same time")
    if no_fallback and not zflag:
        raise s.fail("-n requires -z to be specified")
    if unmap and not zflag:
        raise s.fail("-u requires -z to be specified")
    if zflag + pflag + sflag > 1:
        raise s.fail("Only one of -z, -P, and -s can be specified at the same time")
    offset = s.number(operands[0])
    count = s.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES and not no_fallback:
        raise s.fail(
            f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {operands[1]}"
        )
    if bflag or cflag:
        _check_sector_aligned(s, offset, count)
    data = _source_buffer(s, source, count) if sflag else b""  # qemu-io reads it first
    if offset + count > s.image.size and not (bflag or cflag):
        raise s.fail("write failed: " + os.strerror(errno.EIO))  # before allocating a buffer
    if not zflag and not sflag:
        data = bytes([pattern]) * count
    image = s.image
    start = time.monotonic_ns()
    try:
        if bflag or cflag:
            what = "VM state" if bflag else "compressed writes"
            raise AddCowIOError(f"{what}: not supported by add-cow", errno.ENOTSUP)
        if zflag:
            if no_fallback and not _zero_fast_path(image, offset, count):
                raise AddCowIOError("write -z -n: partial cluster needs a fallback", errno.ENOTSUP)
            image.write_zeroes(offset, count, may_unmap=unmap)
            if fua:
                image.flush()
        else:
            image.write(data, offset, fua=fua)
    except AddCowError as exc:
        raise s.io_error("write", exc) from None
    elapsed = time.monotonic_ns() - start
    if not qflag:
        s.report("wrote", elapsed, offset, count, big_c)


def _check_sector_aligned(s: Session, offset: int, count: int) -> None:
    if offset % BDRV_SECTOR_SIZE:
        raise s.fail(f"{offset} is not a sector-aligned value for 'offset'")
    if count % BDRV_SECTOR_SIZE:
        raise s.fail(f"{count} is not a sector-aligned value for 'count'")


def _file_or_device(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)


def _source_buffer(s: Session, path: str, count: int) -> bytes:
    """``write -s FILE``: the file's first bytes, repeated to fill ``count``."""
    try:
        fd = sysio.open_file(path, os.O_RDONLY, accept=_file_or_device,
                             expected="a regular file or device")  # fmt: skip
    except sysio.WrongFileType as exc:  # a FIFO would wait in the open
        s.complain(f"{path}: is {exc.kind}, not {exc.expected}")
        raise _Failed(path) from None
    except OSError as exc:
        s.complain(f"{path}: {exc.strerror}")
        raise _Failed(path) from None
    with os.fdopen(fd, "rb") as f:
        try:
            head = f.read(count)
        except OSError as exc:
            s.complain(f"{path}: {exc.strerror}")
            raise _Failed(path) from None
    if count and not head:
        s.complain(f"{path}: file is empty")
        raise _Failed(path)
    if not head:
        return b""
    return (head * (count // len(head) + 1))[:count]


def _zero_fast_path(image: AddCowImage, offset: int, count: int) -> bool:
    """qcow2's rule for ``write -z -n``: a partial cluster is fine if its other bytes read zero."""
    size, cs = image.size, image.cluster_size
    end = offset + count
    if count == 0 or end > size:
        return True  # nothing to do, or the range error comes from write_zeroes
    lo = offset - offset % cs
    hi = end if end == size or end % cs == 0 else min(size, end - end % cs + cs)
    rest = [(lo, offset), (end, hi)]
    return all(not any(image.read(a, b - a)) for a, b in rest if b > a)


def discard_f(s: Session, name: str, args: list[str]) -> None:
    cmd = DISCARD
    opts, operands = getopt(name, args, "Cq")
    cflag = qflag = False
    for opt, arg in opts:
        if opt == "?":
            raise s.bad_option(cmd, arg)
        cflag = cflag or opt == "C"
        qflag = qflag or opt == "q"
    if len(operands) != 2:
        raise s.fail(cmd.usage())
    offset = s.number(operands[0])
    count = s.number(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        raise s.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}")
    start = time.monotonic_ns()
    try:
        s.image.discard(offset, count)
    except AddCowError as exc:
        raise s.io_error("discard", exc) from None
    elapsed = time.monotonic_ns() - start
    if not qflag:
        s.report("discard", elapsed, offset, count, cflag)


def flush_f(s: Session, name: str, args: list[str]) -> None:
    try:
        s.image.flush()
    except AddCowError as exc:
        s.complain(f"addcow: flush failed: {exc}")
        raise _Failed("flush") from None


def _allocated_runs(image: AddCowImage, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """(start, length, allocated in the image file) runs, adjacent equal runs merged.

    "Allocated" is qemu's bdrv_is_allocated on the top layer: the image file
    holds the range (data or zeroes, depth 0), so the backing is not read.
    """
    runs: list[tuple[int, int, bool]] = []
    for ext in image.block_status(offset, length):
        allocated = ext.depth == 0 and ext.present
        if runs and runs[-1][2] == allocated:
            start, n, _ = runs[-1]
            runs[-1] = (start, n + ext.length, allocated)
        else:
            runs.append((ext.offset, ext.length, allocated))
    return runs


def alloc_f(s: Session, name: str, args: list[str]) -> None:
    offset = s.number(args[0])
    count = s.number(args[1]) if len(args) == 2 else BDRV_SECTOR_SIZE
    image = s.image
    count = max(0, min(count, image.size - offset))
    try:
        runs = _allocated_runs(image, offset, count) if count else []
    except AddCowError as exc:
        raise s.io_error("is_allocated", exc) from None
    allocated = sum(n for _, n, is_allocated in runs if is_allocated)
    s.say(f"{allocated}/{count} bytes allocated at offset {cvtstr(offset)}")


def map_f(s: Session, name: str, args: list[str]) -> None:
    try:
        runs = _allocated_runs(s.image, 0, s.image.size)
    except AddCowError as exc:
        if s.debug:
            s.complain(f"addcow: {exc}")
        s.complain(f"addcow: Failed to get allocation status: {_strerror(exc)}")
        raise _Failed("map") from None
    for start, n, allocated in runs:
        state = "    allocated" if allocated else "not allocated"
        s.say(f"{cvtstr(n)} (0x{n:x}) bytes {state} at offset {cvtstr(start)} (0x{start:x})")


def _strerror(exc: AddCowError) -> str:
    """The C strerror text QEMU would print for this library error."""
    code = exc.errno if isinstance(exc, AddCowIOError) and exc.errno else errno.EIO
    return os.strerror(code)


def length_f(s: Session, name: str, args: list[str]) -> None:
    s.say(cvtstr(s.image.size))


def help_f(s: Session, name: str, args: list[str]) -> None:
    if not args:
        for cmd in sorted(COMMANDS, key=lambda c: c.name):
            s.say(_oneline(cmd.name, cmd))
        s.say("\nUse 'help commandname' for extended help.")
        return
    found = find_command(args[0])
    if found is None:
        raise s.fail(f"command {args[0]} not found")
    s.say(_oneline(args[0], found))
    if found.help:
        s.out.write(found.help + "\n")


def _oneline(name: str, cmd: Command) -> str:
    args = f"{cmd.args} " if cmd.args is not None else ""
    return f"{name} {args}-- {cmd.oneline}"


def quit_f(s: Session, name: str, args: list[str]) -> None:
    s.quit = True


READ = Command(
    "read",
    "r",
    read_f,
    2,
    -1,
    "[-abCqv] [-P pattern [-s off] [-l len]] off len",
    "reads a number of bytes at a specified offset",
    _READ_HELP,
)
WRITE = Command(
    "write",
    "w",
    write_f,
    2,
    -1,
    "[-bcCfnquz] [-P pattern | -s source_file] off len",
    "writes a number of bytes at a specified offset",
    _WRITE_HELP,
    writes=True,
)
DISCARD = Command(
    "discard",
    "d",
    discard_f,
    2,
    -1,
    "[-Cq] off len",
    "discards a number of bytes at a specified offset",
    _DISCARD_HELP,
    writes=True,
)
COMMANDS: tuple[Command, ...] = (
    READ,
    WRITE,
    DISCARD,
    Command("flush", "f", flush_f, oneline="flush all in-core file state to disk"),
    Command(
        "alloc",
        "a",
        alloc_f,
        1,
        2,
        "offset [count]",
        "checks if offset is allocated in the file",
    ),
    Command("map", None, map_f, 0, 0, "", "prints the allocated areas of a file"),
    Command("length", "l", length_f, oneline="gets the length of the current file"),
    Command("help", "?", help_f, 0, 1, "[command]", "help for one or all commands"),
    Command("quit", "q", quit_f, -1, -1, oneline="exit the program"),
)
