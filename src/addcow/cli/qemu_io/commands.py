"""qemu-io's commands (read, write, discard, flush, alloc, map, length, help, quit).

Each command takes the session, the name it was called by and its
arguments; it prints what qemu-io 7.2 prints and raises ``Failed`` when it
fails. ``COMMANDS`` is the table a ``Session`` looks commands up in.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from ... import sysio
from ...errors import AddCowError, AddCowIOError
from ...image import AddCowImage
from .formatting import cvtstr, dump_buffer
from .parse import getopt
from .session import Command, Failed, Session, strerror

BDRV_SECTOR_SIZE = 512
BDRV_REQUEST_MAX_BYTES = ((2**31 - 1) >> 9) << 9  # 2147483136, as QEMU

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
        raise Failed(path) from None
    except OSError as exc:
        s.complain(f"{path}: {exc.strerror}")
        raise Failed(path) from None
    with os.fdopen(fd, "rb") as f:
        try:
            head = f.read(count)
        except OSError as exc:
            s.complain(f"{path}: {exc.strerror}")
            raise Failed(path) from None
    if count and not head:
        s.complain(f"{path}: file is empty")
        raise Failed(path)
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
        raise Failed("flush") from None


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
        s.complain(f"addcow: Failed to get allocation status: {strerror(exc)}")
        raise Failed("map") from None
    for start, n, allocated in runs:
        state = "    allocated" if allocated else "not allocated"
        s.say(f"{cvtstr(n)} (0x{n:x}) bytes {state} at offset {cvtstr(start)} (0x{start:x})")


def length_f(s: Session, name: str, args: list[str]) -> None:
    s.say(cvtstr(s.image.size))


def help_f(s: Session, name: str, args: list[str]) -> None:
    if not args:
        for cmd in sorted(s.commands, key=lambda c: c.name):
            s.say(_oneline(cmd.name, cmd))
        s.say("\nUse 'help commandname' for extended help.")
        return
    found = s.find(args[0])
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
