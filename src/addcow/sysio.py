"""Thin, checked wrappers over the system calls the image uses.

Each wrapper loops over short transfers, turns OSError into
:class:`~addcow.errors.AddCowIOError` naming the file and operation, and never
copies the caller's buffer: reads land in the caller's memoryview
(``os.preadv``), writes go out from it (``os.pwritev``).

``fallocate`` with flags (hole punching, zero ranges) is not in the os module,
so it is called through ctypes; where the file system refuses it the callers
fall back to writing zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator

from . import zeros
from .errors import AddCowIOError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter already uses
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)


def pread_full(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset``; a read that ends early is an error."""
    done = _pread_until_eof(fd, view, offset, name)
    if done < len(view):
        raise AddCowIOError(
            f"{name}: unexpected end of file at offset {offset + done} "
            f"(the file was truncated while in use?)"
        )


def _pread_until_eof(fd: int, view: memoryview, offset: int, name: str) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; bytes read."""
    done = 0
    total = len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise AddCowIOError.wrap(f"{name}: read at offset {offset + done}", exc) from exc
        if n == 0:
            break
        done += n
    return done


def pread_upto(fd: int, length: int, offset: int, what: str) -> bytes:
    """Up to ``length`` bytes from ``offset``, fewer only at the end of the file.

    One ``pread`` may return less than asked before the end of the file (a
    signal, a network file system); this reads on until it has them all.
    ``what`` names the file and the read in error messages.
    """
    chunks: list[bytes] = []
    done = 0
    while done < length:
        try:
            chunk = os.pread(fd, length - done, offset + done)
        except OSError as exc:
            raise AddCowIOError.wrap(what, exc) from exc
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def pread_zero_fill(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the file read as zero."""
    done = _pread_until_eof(fd, view, offset, name)
    if done < len(view):
        fill_zero(view[done:])


def pwrite_full(fd: int, buffers: list[memoryview], offset: int, name: str) -> None:
    """Write all ``buffers`` contiguously at ``offset`` (one call unless short)."""
    try:
        n = os.pwritev(fd, buffers, offset)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: write at offset {offset}", exc) from exc
    total = sum(map(len, buffers))
    while n < total:
        # Short write: continue from where it stopped, one buffer at a time.
        skip = n
        rest: list[memoryview] = []
        for b in buffers:
            if skip >= len(b):
                skip -= len(b)
                continue
            rest.append(b[skip:])
            skip = 0
        try:
            more = os.pwritev(fd, rest, offset + n)
        except OSError as exc:
            raise AddCowIOError.wrap(f"{name}: write at offset {offset + n}", exc) from exc
        if more == 0:
            raise AddCowIOError(f"{name}: write at offset {offset + n} made no progress")
        n += more


def fill_zero(view: memoryview) -> None:
    """Set every byte of ``view`` to zero."""
    source = zeros.ZERO_VIEW
    pos = 0
    while pos < len(view):
        step = min(len(view) - pos, len(source))
        view[pos : pos + step] = source[:step]
        pos += step


def write_zeros(fd: int, offset: int, length: int, name: str) -> None:
    """Write explicit zero bytes over [offset, offset+length)."""
    source = zeros.ZERO_VIEW
    while length:
        step = min(length, len(source))
        pwrite_full(fd, [source[:step]], offset, name)
        offset += step
        length -= step


def punch_hole(fd: int, offset: int, length: int, name: str) -> bool:
    """Deallocate [offset, offset+length) so it reads as zero; False if unsupported."""
    return _fallocate_flags(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, name)


def zero_range(fd: int, offset: int, length: int, name: str) -> None:
    """Make [offset, offset+length) read as zero while keeping it allocated."""
    if not try_zero_range(fd, offset, length, name):
        write_zeros(fd, offset, length, name)


def try_zero_range(fd: int, offset: int, length: int, name: str) -> bool:
    """FALLOC_FL_ZERO_RANGE only (no fallback to writing zeros); False if unsupported."""
    return _fallocate_flags(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, name)


def _fallocate_flags(fd: int, mode: int, offset: int, length: int, name: str) -> bool:
    if length <= 0:
        return True
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise AddCowIOError(f"{name}: fallocate at offset {offset}: {os.strerror(err)}", err)


def allocate(fd: int, offset: int, length: int, name: str) -> None:
    """Reserve blocks for [offset, offset+length) (``posix_fallocate``), where supported.

    For metadata that must be writable later even on a full file system; content
    is unchanged (new blocks read as zero).
    """
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise AddCowIOError.wrap(f"{name}: allocate {length} bytes at {offset}", exc) from exc


def file_kind(mode: int) -> str:
    """``"a regular file"``, ``"a directory"``, ... for an ``st_mode``."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


class WrongFileType(OSError):
    """:func:`open_file` found a file of a type it does not take: ``kind`` (``"a named
    pipe"``) instead of ``expected``."""

    def __init__(self, path: str, kind: str, expected: str) -> None:
        super().__init__(errno.EINVAL, f"not {expected}", path)
        self.kind = kind
        self.expected = expected


def _regular_or_block(mode: int) -> bool:
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def open_file(
    path: str,
    flags: int,
    mode: int = 0o666,
    *,
    accept: Callable[[int], bool] = _regular_or_block,
    expected: str = "a regular file or block device",
) -> int:
    """``os.open`` that refuses a file whose type ``accept`` (of its ``st_mode``) refuses.

    A name read from a header or given by a user may point at a FIFO, whose open
    would block forever, or a directory or character device. The open is
    non-blocking, the type is checked, then the descriptor is made blocking
    again. Raises :class:`WrongFileType` (EINVAL, "not ``expected``") for other
    file types.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not accept(st_mode):
            raise WrongFileType(path, file_kind(st_mode), expected)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fdatasync(fd: int, name: str) -> None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: fdatasync", exc) from exc


def sync_directory(directory: str) -> None:
    """Make a created or removed directory entry durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{directory}: open directory", exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{directory}: fsync directory", exc) from exc
    finally:
        os.close(fd)


def truncate(fd: int, size: int, name: str) -> None:
    """Set a file's size (``ftruncate``)."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: truncate to {size} bytes", exc) from exc


def unlink(path: str, what: str) -> None:
    """Remove ``path``; the error names ``what`` and its directory."""
    try:
        os.unlink(path)
    except OSError as exc:
        directory = os.path.dirname(path) or "."
        raise AddCowIOError.wrap(f"{path}: cannot remove {what} (in {directory})", exc) from exc


def file_size(fd: int, name: str) -> int:
    """Size of a regular file or block device."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: cannot find size", exc) from exc


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Runs (start, stop, has_data) of [start, end) using SEEK_DATA / SEEK_HOLE.

    A file system without hole reporting shows everything as data. Bytes past
    the end of the file are reported as a hole.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                yield pos, end, False
                return
            yield pos, end, True
            return
        if data > pos:
            yield pos, min(data, end), False
            if data >= end:
                return
            pos = data  # data starts here: no second SEEK_DATA
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        stop = min(max(hole, pos + 1), end)
        yield pos, stop, True
        pos = stop


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True if the file holds no data in [offset, offset+length) (one SEEK_DATA).

    False where the file system cannot tell (it then reports everything as data)
    or on any error: callers use a False to do the safe, slower thing.
    """
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data at or after offset


def write_sparse(
    fd: int,
    buf: bytearray,
    length: int,
    offset: int,
    name: str,
    *,
    punch: bool,
    copy_from: int = -1,
    copy_delta: int = 0,
) -> tuple[int, int]:
    """Write ``buf[:length]`` at ``offset``, leaving 4 KiB blocks of zeros as holes.

    With ``punch`` the zero blocks are punched (the file may hold old bytes
    there; where punching is unsupported zeros are written); without it they are
    skipped, for a file known to be a hole there. With ``copy_from``, a file
    holding the same bytes at ``copy_delta`` bytes further on, the data runs are
    copied from it with ``copy_file_range`` (a reflink on XFS and btrfs),
    falling back to writing the buffer. Returns (bytes written, bytes left as zero). ``buf`` is a
    bytearray so that zero checks are memcmp calls.
    """
    view = memoryview(buf)
    if zeros.is_zero(buf, 0, length):
        _zero_run(fd, offset, length, name, punch)
        return 0, length
    written = 0
    pos = 0
    while pos < length:
        zero = zeros.is_zero_block(buf, pos, length)
        stop = min(pos + zeros.GRANULE, length)
        if zero:
            stop = zeros.zero_run_end(buf, stop, length)
        else:
            stop = zeros.data_run_end(buf, stop, length)
        if zero:
            _zero_run(fd, offset + pos, stop - pos, name, punch)
        else:
            if copy_from < 0 or not copy_range(
                copy_from, fd, offset + pos, stop - pos, name, copy_delta
            ):
                pwrite_full(fd, [view[pos:stop]], offset + pos, name)
            written += stop - pos
        pos = stop
    return written, length - written


def copy_range(src: int, dst: int, offset: int, length: int, name: str, src_delta: int = 0) -> bool:
    """copy_file_range [offset, offset+length) between two files; False if unsupported.

    The bytes are read at ``offset + src_delta`` of ``src`` (0: the same
    offsets). Where the kernel or file system cannot copy (EXDEV, EINVAL,
    ENOSYS, ...) the caller writes the same bytes itself; a real I/O error
    (EIO, ENOSPC) is raised.
    """
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(
                src, dst, length - done, offset + src_delta + done, offset + done
            )
        except OSError as exc:
            if exc.errno in _UNSUPPORTED or exc.errno in (errno.EXDEV, errno.EBADF):
                return False
            raise AddCowIOError.wrap(f"{name}: copy at offset {offset + done}", exc) from exc
        if n == 0:
            return False
        done += n
    return True


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range back now (a hint: errors are ignored).

    A later fdatasync then has less left to wait for; durability still comes
    only from fdatasync.
    """
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def settle_writeback(fd: int, offset: int, length: int) -> None:
    """Wait until a range is written back, then drop its pages from the page cache
    (hints: errors are ignored).

    For a copy nobody reads back soon (``addcow stream`` from a backing URI, as
    nbdcopy does for files): its written pages neither pile up dirty nor stay
    in the cache. Durability still comes only from fdatasync.

    ``fd`` must be a descriptor of its own (:func:`reopen_for_settling`), never
    the one whose fdatasync makes the data durable: the waits of
    ``sync_file_range`` report a writeback error to the open file they are
    called on, and only once (the kernel's errseq), so on the writer's own
    descriptor they would take the error away from its next fdatasync, which
    would then succeed over lost data.
    """
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    if _sync_file_range(fd, offset, length, flags) == 0:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def reopen_for_settling(fd: int) -> int:
    """A new open file of the same file as ``fd`` (read-only), for
    :func:`settle_writeback`; -1 if it cannot be had (then nothing is settled)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _zero_run(fd: int, offset: int, length: int, name: str, punch: bool) -> None:
    if punch and not punch_hole(fd, offset, length, name):
        write_zeros(fd, offset, length, name)
