"""File locks that keep two writers (or a writer and a reader) apart.

Two kinds of lock, both open-file-description (OFD) locks, so they belong to
the open file and vanish when it is closed, even after kill -9:

* The .add-cow file gets a whole-file lock: exclusive for a read-write open,
  shared for a read-only one. Taking it is one atomic call, so of two
  processes racing to open an image read-write exactly one wins.
* Raw files (the image file and raw backing files) get the byte-range
  protocol QEMU uses on the files it opens (``block/file-posix.c``): for each
  permission held, a shared lock on byte 100 + bit; for each permission not
  shared with others, a shared lock on byte 200 + bit. A conflict is another
  open file holding the opposite byte. Speaking QEMU's protocol means qemu-img,
  qemu-io and qemu-nbd refuse to write a backing file that addcow is using,
  and addcow refuses a raw file QEMU is writing.

:func:`unlock_raw` drops a raw file's byte-range locks while the file stays
open (a served image handed over to QEMU); :func:`lock_raw` takes them again.

``force_share`` (the CLI's ``-U``) takes no lock at all, for inspecting an image
that is in use; what it reads may be inconsistent.

:func:`record_lock_holder` names the process holding a POSIX record lock, as
``addcow serve``'s pidfile is locked (:mod:`addcow.serve.daemon`).
"""

from __future__ import annotations

import fcntl
import os
import struct

from .errors import LockError

# struct flock: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
# l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("hhqqi4x" if struct.calcsize("l") == 8 else "hhqqi")

# QEMU's permission bits and lock byte bases (block/file-posix.c).
PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
_PERM_BITS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
_PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}
_PERM_BASE = 100
_SHARED_BASE = 200


INSPECT_HINT = "read-only commands take -U / force_share to inspect it anyway"
"""The :attr:`~addcow.errors.LockError.hint` of a refused read-only open."""


def _flock(fd: int, cmd: int, kind: int, start: int, length: int) -> tuple[int, int]:
    """One lock call on ``fd``; the ``l_type`` and ``l_pid`` the kernel hands back."""
    packed = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
    l_type, _whence, _start, _length, l_pid = _FLOCK.unpack(fcntl.fcntl(fd, cmd, packed))
    return int(l_type), int(l_pid)


def lock_whole(fd: int, path: str, *, exclusive: bool) -> None:
    """Lock all of ``fd``'s file, or raise LockError naming ``path``."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        _flock(fd, fcntl.F_OFD_SETLK, kind, 0, 0)
    except OSError as exc:
        if exclusive:
            raise LockError(
                f"{path}: failed to get write lock: the image is in use by another process"
            ) from exc
        raise LockError(
            f"{path}: failed to get read lock: the image is in use by another process",
            INSPECT_HINT,
        ) from exc


def lock_raw(fd: int, path: str, *, writable: bool) -> None:
    """Take QEMU-compatible permission locks on a raw file, or raise LockError."""
    perms = PERM_CONSISTENT_READ
    if writable:
        perms |= PERM_WRITE | PERM_RESIZE
    unshared = PERM_WRITE | PERM_RESIZE
    try:
        for bit_index, bit in enumerate(_PERM_BITS):
            if perms & bit:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _PERM_BASE + bit_index, 1)
            if unshared & bit:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, _SHARED_BASE + bit_index, 1)
    except OSError as exc:
        raise LockError(f"{path}: failed to lock: the file is in use ({exc.strerror})") from exc
    hint = None if writable else INSPECT_HINT
    for bit_index, bit in enumerate(_PERM_BITS):
        if perms & bit and _held_by_other(fd, _SHARED_BASE + bit_index):
            raise LockError(
                f'{path}: failed to get "{_PERM_NAMES[bit]}" lock: another process '
                "is using the file and does not share it",
                hint,
            )
        if unshared & bit and _held_by_other(fd, _PERM_BASE + bit_index):
            raise LockError(
                f'{path}: failed to get shared "{_PERM_NAMES[bit]}" lock: another process '
                "is using the file",
                hint,
            )


def unlock_raw(fd: int, path: str) -> None:
    """Release the QEMU-compatible permission locks :func:`lock_raw` took on ``fd``.

    For handing a raw file over to a QEMU that opens it itself
    (:mod:`addcow.serve.handoff`); :func:`lock_raw` takes them back.
    """
    try:
        _flock(
            fd,
            fcntl.F_OFD_SETLK,
            fcntl.F_UNLCK,
            _PERM_BASE,
            _SHARED_BASE + len(_PERM_BITS) - _PERM_BASE,
        )
    except OSError as exc:
        raise LockError(f"{path}: failed to release its locks ({exc.strerror})") from exc


def held_by_another(fd: int) -> bool:
    """True if another open file holds a lock on any byte of ``fd``'s file: an
    image or a raw file some process (addcow, QEMU) has open, or a pidfile."""
    return _held_by_other(fd, 0, 0)


def _held_by_other(fd: int, byte: int, length: int = 1) -> bool:
    """True if another open file holds any lock on ``length`` bytes from ``byte``
    (0: to the end of the file)."""
    try:
        kind, _pid = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte, length)
    except OSError:
        return False
    return kind != fcntl.F_UNLCK


def record_lock_holder(fd: int) -> int | None:
    """The pid of a process whose POSIX record lock (``fcntl.lockf``) keeps this
    one from write-locking all of ``fd``'s file; None if there is none, or if
    the conflicting lock is an open-file-description lock (which names no pid).
    """
    try:
        kind, pid = _flock(fd, fcntl.F_GETLK, fcntl.F_WRLCK, 0, 0)
    except OSError:
        return None
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None
