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

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

from .errors import AddCowIOError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)
_ZEROS = bytes(1 << 20)


def pread_full(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset``; a read that ends early is an error."""
    done = 0
    total = len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise AddCowIOError.wrap(f"{name}: read at offset {offset + done}", exc) from exc
        if n == 0:
            raise AddCowIOError(
                f"{name}: unexpected end of file at offset {offset + done} "
                f"(the file was truncated while in use?)"
            )
        done += n


def pread_zero_fill(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the file read as zero."""
    done = 0
    total = len(view)
    while done < total:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise AddCowIOError.wrap(f"{name}: read at offset {offset + done}", exc) from exc
        if n == 0:
            fill_zero(view[done:])
            return
        done += n


def pwrite_full(fd: int, buffers: list[memoryview], offset: int, name: str) -> None:
    """Write all ``buffers`` contiguously at ``offset`` (one call unless short)."""
    try:
        n = os.pwritev(fd, buffers, offset)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: write at offset {offset}", exc) from exc
    total = sum(len(b) for b in buffers)
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
    pos = 0
    while pos < len(view):
        step = min(len(view) - pos, len(_ZEROS))
        view[pos : pos + step] = _ZEROS[:step]
        pos += step


def write_zeros(fd: int, offset: int, length: int, name: str) -> None:
    """Write explicit zero bytes over [offset, offset+length)."""
    zeros = memoryview(_ZEROS)
    while length:
        step = min(length, len(_ZEROS))
        pwrite_full(fd, [zeros[:step]], offset, name)
        offset += step
        length -= step


def punch_hole(fd: int, offset: int, length: int, name: str) -> bool:
    """Deallocate [offset, offset+length) so it reads as zero; False if unsupported."""
    return _fallocate_flags(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, name)


def zero_range(fd: int, offset: int, length: int, name: str) -> None:
    """Make [offset, offset+length) read as zero while keeping it allocated."""
    if not _fallocate_flags(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, name):
        write_zeros(fd, offset, length, name)


def _fallocate_flags(fd: int, mode: int, offset: int, length: int, name: str) -> bool:
    if length <= 0:
        return True
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise AddCowIOError(f"{name}: fallocate at offset {offset}: {os.strerror(err)}", err)


def fdatasync(fd: int, name: str) -> None:
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{name}: fdatasync", exc) from exc


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
            pos = min(data, end)
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        stop = min(max(hole, pos + 1), end)
        yield pos, stop, True
        pos = stop
