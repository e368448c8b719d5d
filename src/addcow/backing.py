"""Backing stores: what an unallocated cluster is read from.

A backing store is anything with a size that can fill a buffer and describe
its allocation (:class:`BlockSource`). Two kinds exist:

* :class:`RawFile`, a plain file or block device. Bytes past its end read as
  zero, so a raw image file larger than its backing reads zeros there.
* another add-cow image (:class:`addcow.image.AddCowImage`), opened read-only,
  which may itself have a backing: a chain.

Names stored in a header are local file names taken literally: no URL, no
``json:``, no protocol prefix. A relative name is relative to the directory
holding the .add-cow file that names it, never to the current directory.

:class:`ChainGuard` follows one open: it refuses a chain deeper than
:data:`MAX_CHAIN_DEPTH` and any file (by device and inode) that appears twice,
which catches an image file that is its own backing, a .add-cow naming itself,
and loops through symlinks or hard links.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from . import sysio
from .errors import (
    BackingError,
    BackingFormatError,
    BackingLoopError,
    ImageFileError,
    PathPolicyError,
)
from .format import BACKING_FORMATS
from .locking import lock_raw
from .magic import article
from .magic import sniff_format as sniff_format  # re-exported: image.py reads it here

MAX_CHAIN_DEPTH = 16
"""Most backing files below one image (specification, "Backing chains")."""


class Extent(NamedTuple):
    """One range of the virtual disk with uniform allocation.

    ``depth`` is the layer holding the data: 0 is this image's image file, 1 its
    backing, and so on. ``present`` is False where no layer holds the range (it
    reads as zero); ``depth`` is then the layer that decided so. ``host_offset``
    is where the bytes can be read directly in the raw file of that layer, or
    None.
    """

    offset: int
    length: int
    depth: int
    present: bool
    zero: bool
    host_offset: int | None

    @property
    def data(self) -> bool:
        return self.present and not self.zero


class BlockSource(Protocol):
    """What an image needs from its backing store."""

    @property
    def size(self) -> int: ...

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` with the bytes at ``offset`` (zeros past the end)."""

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Extents covering [offset, offset+length), tagged from ``depth``."""

    def file_ids(self) -> set[tuple[int, int]]:
        """(device, inode) of every file this source reads, down the chain."""

    def close(self) -> None: ...


class ChainGuard:
    """Files already met while opening one chain, and how deep it goes.

    With a ``root``, every file an image names must resolve inside that directory.
    (A plain class: ``dataclasses`` would add 10 ms to every command's start.)
    """

    def __init__(self, root: str | None = None) -> None:
        self.seen: dict[tuple[int, int], str] = {}
        self.depth = 0
        self.root = root

    def check_path(self, path: str) -> None:
        """Refuse a named file outside ``root`` before opening it."""
        if self.root is not None:
            _check_length(path)
            _inside_root(self.root, os.path.realpath(path), path)

    def check_open(self, fd: int, path: str) -> None:
        """Refuse an opened named file outside ``root`` (catches symlink races)."""
        if self.root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as exc:  # ENAMETOOLONG: deeper than PATH_MAX
                raise PathPolicyError(
                    f"{_shown(path)}: cannot tell where the opened file is "
                    f"({exc.strerror}), so it is refused (backing_root / --backing-root)"
                ) from exc
            _inside_root(self.root, real, path)

    def add(self, fd: int, path: str) -> None:
        """Record a file, refusing one that is already part of the chain."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            raise BackingLoopError(
                f"{path}: the file is already used as {self.seen[key]} in this chain "
                "(a backing chain must not loop)"
            )
        self.seen[key] = path

    def descend(self, path: str) -> None:
        self.depth += 1
        if self.depth > MAX_CHAIN_DEPTH:
            raise BackingLoopError(
                f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH} levels (or it loops)"
            )


def _inside_root(root: str, real: str, path: str) -> None:
    root = os.path.realpath(root)
    if os.path.commonpath([real, root]) != root:
        raise PathPolicyError(
            f"{_shown(path)}: resolves to {_shown(real)}, outside the allowed directory "
            f"{root} (backing_root / --backing-root)"
        )


PATH_MAX = 4096
"""Longest path the kernel opens; a longer stored name can only fail (and
resolving it, component by component, costs time that grows with its square)."""


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) >= PATH_MAX:
        raise PathPolicyError(
            f"{_shown(path)}: name of {len(os.fsencode(path))} bytes, longer than "
            f"PATH_MAX ({PATH_MAX}) (backing_root / --backing-root)"
        )


def _shown(path: str, limit: int = 200) -> str:
    """A path for a message: at most ``limit`` characters."""
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-limit // 2 :]}"


class RawFile:
    """A raw backing file, opened read-only; reads past its end return zeros.

    ``size`` and ``fd`` are plain attributes (read on the image's read fast path).
    """

    def __init__(self, path: str, *, force_share: bool = False, guard: ChainGuard) -> None:
        self.path = path
        guard.check_path(path)
        try:
            self.fd = sysio.open_file(path, os.O_RDONLY)
        except OSError as exc:
            raise BackingError(f"{path}: cannot open backing file: {exc.strerror}") from exc
        try:
            guard.add(self.fd, path)
            guard.check_open(self.fd, path)
            if not force_share:
                lock_raw(self.fd, path, writable=False)
            self.size = sysio.file_size(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise

    def readinto(self, buffer: memoryview, offset: int) -> int:
        sysio.pread_zero_fill(self.fd, buffer, offset, self.path)
        return len(buffer)

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        end = min(offset + length, self.size)
        for start, stop, has_data in sysio.data_runs(self.fd, offset, end):
            yield Extent(start, stop - start, depth, True, not has_data, start)
        if offset + length > end:
            lo = max(offset, end)
            yield Extent(lo, offset + length - lo, depth, False, True, None)

    def file_ids(self) -> set[tuple[int, int]]:
        st = os.fstat(self.fd)
        return {(st.st_dev, st.st_ino)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_as_backing(source: BlockSource | None, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``source`` as a backing reads: zeros past its end, or
    everywhere when there is no source."""
    inside = 0 if source is None else max(0, min(len(view), source.size - offset))
    if source is not None and inside:
        source.readinto(view[:inside], offset)
    if inside < len(view):
        sysio.fill_zero(view[inside:])


def resolve_name(name: bytes, relative_to: str) -> str:
    """The path a stored name refers to: relative names start at ``relative_to``'s dir."""
    path = os.fsdecode(name)
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(relative_to), path)


def open_image_file(path: str, *, readonly: bool, what: str = "image file") -> int:
    """Open an image file, with a clear error when it is missing."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return sysio.open_file(path, flags)
    except FileNotFoundError as exc:
        raise ImageFileError(f"{path}: {what} not found") from exc
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open {what}: {exc.strerror}") from exc


def open_backing(
    name: bytes,
    fmt: str,
    relative_to: str,
    *,
    guard: ChainGuard,
    force_share: bool,
) -> BlockSource:
    """Open the backing file ``name`` of the image at ``relative_to`` as ``fmt``."""
    path = resolve_name(name, relative_to)
    guard.descend(path)
    if fmt == "raw":
        return RawFile(path, force_share=force_share, guard=guard)
    from .image import AddCowImage  # an add-cow backing is an image itself

    return AddCowImage.open(path, readonly=True, force_share=force_share, guard=guard)


def choose_backing_format(
    name: bytes, fmt: str | None, path: str, version: int, *, guard: ChainGuard | None = None
) -> str:
    """The backing format to record for ``name`` (stored in the image at ``path``).

    Without ``fmt``, ``raw`` is chosen only if the file does not start with a
    known image magic; otherwise the caller must say (a guest can write such a
    header into a raw disk). ``raw`` is never recorded for a file that starts
    with a known image magic, even when asked for: read as raw, it would be a
    disk that starts with an image header. Version 1 can record only ``raw``.
    With a ``guard``, its ``backing_root`` policy is applied before the file is read.
    """
    if fmt is not None and fmt not in BACKING_FORMATS:
        raise BackingFormatError(
            f"unsupported backing format {fmt!r}: expected one of {', '.join(BACKING_FORMATS)}"
        )
    if fmt in (None, "raw"):
        backing_path = resolve_name(name, path)
        if guard is not None:
            guard.check_path(backing_path)
        found = sniff_format(backing_path)
        if found is not None and fmt is None:
            raise BackingFormatError(
                f"{backing_path}: the backing file starts with {article(found)} header; "
                f"refusing to guess its format (a guest can write such a header into a raw "
                f"disk). Give the format explicitly with -F"
            )
        if found is not None:
            raise BackingFormatError(
                f"{backing_path} starts with {article(found)} header; refusing to record it "
                "as raw (a raw disk must not start with an image header)"
            )
        fmt = "raw"
    if version == 1 and fmt != "raw":
        raise BackingFormatError(
            f"a version 1 image can only record a raw backing file, not {fmt!r} (use compat=2)"
        )
    return fmt
