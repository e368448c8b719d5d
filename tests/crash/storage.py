"""An injected storage layer: records, and can fail, every I/O call on chosen files.

Every system call addcow makes on a file goes through :mod:`addcow.sysio` (and a
few direct ``os`` calls in :mod:`addcow.image`, the read fast path among them),
which look up ``os.pwritev``,
``os.preadv``, ``os.pread``, ``os.ftruncate``, ``os.fdatasync``, ``os.fsync``,
``os.lseek``, ``os.copy_file_range`` at call time and call ``fallocate`` through
``sysio._fallocate``.
:class:`Layer` replaces those attributes while it is active (a context manager)
and, for descriptors whose file (device, inode) it was told to watch:

* records every mutation (write, truncate, punch/zero range) and every sync in
  one global :attr:`Layer.log`, with the workload's own events interleaved by
  :meth:`Layer.note`, so that a crash can be simulated at any point afterwards
  (:func:`power_loss`);
* counts every call (``calls``) and can fail exactly one of them (``fault``):
  raise EIO / ENOSPC, or make a read or write short.

Files not watched (pytest's own, the test's scratch files) pass straight through.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addcow import sysio

SECTOR = 512

# kinds of failure, and which calls they apply to
EIO, ENOSPC, SHORT = "EIO", "ENOSPC", "short"
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "pwritev": (EIO, ENOSPC, SHORT),
    "preadv": (EIO, SHORT),
    "pread": (EIO, SHORT),
    "ftruncate": (EIO, ENOSPC),
    "fdatasync": (EIO, ENOSPC),
    "fsync": (EIO, ENOSPC),
    "fallocate": (EIO, ENOSPC),
    "lseek": (EIO,),
    "copy_file_range": (EIO, ENOSPC, SHORT),
    "rename": (EIO, ENOSPC),
    "unlink": (EIO,),
}
ERRNO = {EIO: errno.EIO, ENOSPC: errno.ENOSPC}


@dataclass
class Fault:
    """Fail call number ``index`` (counting watched calls from 0) with ``kind``."""

    index: int
    kind: str
    fired: bool = False
    call: str = ""
    file: str = ""


@dataclass
class Layer:
    """Watch ``files`` (name -> path); see the module docstring."""

    files: dict[str, Path]
    fault: Fault | None = None
    log: list[tuple[Any, ...]] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (call, file name)
    record: bool = True
    directory: Path | None = None
    """Also watch every file in this directory, by its name there (files created
    while the layer is active among them), and ``rename``/``unlink`` of names in it."""
    _ids: dict[tuple[int, int], str] = field(default_factory=dict)

    def refresh(self) -> None:
        """(Re)learn the inodes of the watched files (after they were recreated)."""
        self._ids = {}
        for name, path in self.files.items():
            if os.path.exists(path) or self.directory is None:
                st = os.stat(path)
                self._ids[(st.st_dev, st.st_ino)] = name

    def snapshot(self) -> dict[str, bytes]:
        return {name: Path(path).read_bytes() for name, path in self.files.items()}

    def note(self, *event: Any) -> None:
        """Interleave a workload event with the storage events."""
        if self.record:
            self.log.append(("event", *event))

    def _name(self, fd: int) -> str | None:
        try:
            st = _real["fstat"](fd)
        except OSError:
            return None
        name = self._ids.get((st.st_dev, st.st_ino))
        if name is None and self.directory is not None:
            try:
                name = self._in_directory(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return None
        return name

    def _in_directory(self, path: str) -> str | None:
        """The watched name of ``path`` (a temporary name without its pid), or None."""
        if self.directory is None:
            return None
        where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        if where != os.path.realpath(self.directory):
            return None
        base = os.path.basename(path)
        return base.replace(f".{os.getpid()}.", ".") if base.startswith(".") else base

    def _path_call(self, call: str, path: Any) -> None:
        name = self._in_directory(os.fspath(path)) if isinstance(path, (str, Path)) else None
        if name is not None:
            kind = self._fail(call, name)
            if kind in ERRNO:
                raise OSError(ERRNO[kind], os.strerror(ERRNO[kind]), os.fspath(path))

    def rename(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        self._path_call("rename", dst)
        _real["rename"](src, dst, *args, **kwargs)

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        self._path_call("rename", dst)
        _real["replace"](src, dst, *args, **kwargs)

    def unlink(self, path: Any, *args: Any, **kwargs: Any) -> None:
        self._path_call("unlink", path)
        _real["unlink"](path, *args, **kwargs)

    def _fail(self, call: str, name: str) -> str | None:
        """Count a call; return the fault kind if this is the one to fail."""
        self.calls.append((call, name))
        f = self.fault
        if f is not None and not f.fired and len(self.calls) - 1 == f.index:
            if f.kind not in FAULT_KINDS[call]:
                return None
            f.fired, f.call, f.file = True, call, name
            return f.kind
        return None

    # -- the replacements -----------------------------------------------------------

    def pwritev(self, fd: int, buffers: list[Any], offset: int) -> int:
        name = self._name(fd)
        if name is None:
            return _real["pwritev"](fd, buffers, offset)  # type: ignore[no-any-return]
        kind = self._fail("pwritev", name)
        if kind in ERRNO:
            raise OSError(ERRNO[kind], os.strerror(ERRNO[kind]))
        data = b"".join(bytes(b) for b in buffers)
        if kind == SHORT and len(data) > 1:
            data = data[: max(1, len(data) // 2 - 1)]
            n = _real["pwritev"](fd, [data], offset)
        else:
            n = _real["pwritev"](fd, buffers, offset)
        if self.record and n:
            self.log.append(("write", name, offset, data[:n]))
        return n  # type: ignore[no-any-return]

    def copy_file_range(
        self, src: int, dst: int, count: int, offset_src: int, offset_dst: int
    ) -> int:
        """Recorded as a write of the bytes copied (read from the source first)."""
        name = self._name(dst)
        if name is None:
            return _real["copy_file_range"](  # type: ignore[no-any-return]
                src, dst, count, offset_src, offset_dst
            )
        kind = self._fail("copy_file_range", name)
        if kind in ERRNO:
            raise OSError(ERRNO[kind], os.strerror(ERRNO[kind]))
        if kind == SHORT and count > 1:
            count = max(1, count // 2 - 1)
        data = _real["pread"](src, count, offset_src)
        n = _real["copy_file_range"](src, dst, len(data), offset_src, offset_dst)
        if self.record and n:
            self.log.append(("write", name, offset_dst, data[:n]))
        return n  # type: ignore[no-any-return]

    def preadv(self, fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        name = self._name(fd)
        if name is not None:
            kind = self._fail("preadv", name)
            if kind == EIO:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if kind == SHORT:
                view = memoryview(buffers[0]).cast("B")
                if len(view) > 1:
                    return _real["preadv"](fd, [view[: len(view) // 2]], offset, *flags)  # type: ignore[no-any-return]
        return _real["preadv"](fd, buffers, offset, *flags)  # type: ignore[no-any-return]

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        name = self._name(fd)
        if name is not None:
            kind = self._fail("pread", name)
            if kind == EIO:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if kind == SHORT and length > 1:
                return _real["pread"](fd, length // 2, offset)  # type: ignore[no-any-return]
        return _real["pread"](fd, length, offset)  # type: ignore[no-any-return]

    def ftruncate(self, fd: int, size: int) -> None:
        name = self._name(fd)
        if name is not None:
            kind = self._fail("ftruncate", name)
            if kind in ERRNO:
                raise OSError(ERRNO[kind], os.strerror(ERRNO[kind]))
        _real["ftruncate"](fd, size)
        if name is not None and self.record:
            self.log.append(("truncate", name, size))

    def _sync(self, call: str, fd: int) -> None:
        name = self._name(fd)
        if name is not None:
            kind = self._fail(call, name)
            if kind in ERRNO:
                raise OSError(ERRNO[kind], os.strerror(ERRNO[kind]))
        _real[call](fd)
        if name is not None and self.record:
            self.log.append(("sync", name))

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        name = self._name(fd)
        if name is not None and self._fail("lseek", name) == EIO:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return _real["lseek"](fd, pos, how)  # type: ignore[no-any-return]

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> int:
        name = self._name(fd)
        if name is not None:
            kind = self._fail("fallocate", name)
            if kind in ERRNO:
                ctypes.set_errno(ERRNO[kind])
                return -1
        r = _real["fallocate"](fd, mode, offset, length)
        if r == 0 and name is not None and self.record:
            self.log.append(("zero", name, offset, length))
        return r  # type: ignore[no-any-return]

    @contextmanager
    def active(self) -> Iterator[Layer]:
        self.refresh()
        saved = {n: getattr(os, n) for n in _OS_CALLS}
        saved_falloc = sysio._fallocate
        for n in _OS_CALLS:
            setattr(os, n, getattr(self, n))
        sysio._fallocate = self.fallocate  # type: ignore[assignment]
        try:
            yield self
        finally:
            for n, fn in saved.items():
                setattr(os, n, fn)
            sysio._fallocate = saved_falloc


_OS_CALLS = (
    "pwritev",
    "preadv",
    "pread",
    "ftruncate",
    "fdatasync",
    "fsync",
    "lseek",
    "copy_file_range",
    "rename",
    "replace",
    "unlink",
)
_real: dict[str, Callable[..., Any]] = {n: getattr(os, n) for n in _OS_CALLS}
_real["fstat"] = os.fstat
_real["fallocate"] = sysio._fallocate


# -- power loss ----------------------------------------------------------------------


def _apply(buf: bytearray, op: tuple[Any, ...], sectors: set[int] | None = None) -> None:
    """Apply one storage op to a file image; ``sectors`` tears a write to those sectors."""
    kind = op[0]
    if kind == "write":
        _, _, offset, data = op
        end = offset + len(data)
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        if sectors is None:
            buf[offset:end] = data
            return
        for s in sectors:  # sector numbers relative to the file
            lo, hi = max(offset, s * SECTOR), min(end, (s + 1) * SECTOR)
            if lo < hi:
                buf[lo:hi] = data[lo - offset : hi - offset]
    elif kind == "truncate":
        size = op[2]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
    elif kind == "zero":  # punch hole / zero range, KEEP_SIZE
        _, _, offset, length = op
        end = min(offset + length, len(buf))
        if offset < end:
            buf[offset:end] = bytes(end - offset)


class Disk:
    """Per file: the content made durable by its last sync, and the ops since."""

    def __init__(self, initial: dict[str, bytes]) -> None:
        self.durable = {name: bytearray(data) for name, data in initial.items()}
        self.pending: dict[str, list[tuple[Any, ...]]] = {name: [] for name in initial}

    def step(self, op: tuple[Any, ...]) -> None:
        name = op[1]
        if op[0] == "sync":
            for p in self.pending[name]:
                _apply(self.durable[name], p)
            self.pending[name] = []
        else:
            self.pending[name].append(op)

    def lose_power(self, rng: random.Random) -> tuple[dict[str, bytes], str]:
        """Each file: durable state plus a random choice of its unsynced ops.

        Modes: none of them reach the disk, all of them (process death), a
        prefix with the next one torn, or an arbitrary subset, any write torn
        at sector granularity.
        """
        mode = rng.choice(["none", "all", "prefix", "subset", "subset"])
        out: dict[str, bytes] = {}
        for name, durable in self.durable.items():
            buf = bytearray(durable)
            pending = self.pending[name]
            if mode == "all":
                chosen = [(p, None) for p in pending]
            elif mode == "none":
                chosen = []
            elif mode == "prefix":
                k = rng.randint(0, len(pending))
                chosen = [(p, None) for p in pending[:k]]
                if k < len(pending):
                    chosen.append((pending[k], _torn(pending[k], rng)))
            else:
                chosen = []
                for p in pending:
                    r = rng.random()
                    if r < 0.4:
                        chosen.append((p, None))
                    elif r < 0.6:
                        chosen.append((p, _torn(p, rng)))
            for p, sectors in chosen:
                _apply(buf, p, sectors)
            out[name] = bytes(buf)
        return out, mode


def _torn(op: tuple[Any, ...], rng: random.Random) -> set[int] | None:
    if op[0] != "write":
        return None
    _, _, offset, data = op
    first, last = offset // SECTOR, (offset + len(data) - 1) // SECTOR
    return {s for s in range(first, last + 1) if rng.random() < 0.5}
