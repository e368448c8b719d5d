"""Creating a new add-cow image over a new or existing raw image file.

Order of work, so that a crash leaves either no image or a valid one:

1. Validate everything and open the backing chain (read-only) before touching
   any file; refuse loops (the image file, the .add-cow file and the backing
   files must all be distinct files).
2. Create the image file sparse, or extend an existing one sparse to the
   virtual size; its existing content is left as it is (every bit starts at 0,
   so none of it is read until written). Sync it.
3. Write the .add-cow file (header, then a sparse all-zero bitmap) under a
   temporary name, sync it, rename it into place and sync the directory.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from . import sysio
from .backing import BlockSource, ChainGuard, choose_backing_format, open_backing, resolve_name
from .errors import AddCowError, BackingFormatError, HeaderError, ImageFileError
from .format import (
    MAX_CLUSTER_BITS,
    MAX_HEADER_SIZE,
    MAX_IMAGE_SIZE,
    MIN_CLUSTER_BITS,
    PAGE,
    V1_CLUSTER_BITS,
    V1_HEADER_SIZE,
    V1_NAMES_START,
    V2_NAMES_START,
    Header,
    bitmap_length,
    cluster_count,
)
from .locking import lock_raw, lock_whole


def create(
    path: str | os.PathLike[str],
    *,
    image_file: str | os.PathLike[str],
    backing_file: str | os.PathLike[str] | None = None,
    backing_format: str | None = None,
    size: int | None = None,
    cluster_size: int = 65536,
    version: int = 2,
) -> None:
    """Create the add-cow image ``path`` whose data lives in ``image_file``.

    Relative ``image_file`` and ``backing_file`` names are stored as given and
    mean a path relative to the directory of ``path``. ``backing_format``
    defaults to ``raw`` when the backing file does not start with a known image
    magic; if it does, the format must be given. ``size`` defaults to the
    backing file's virtual size (or, without a backing file, the size of an
    existing image file).
    """
    path = os.fspath(path)
    image_name = os.fsencode(os.fspath(image_file))
    backing_name = None if backing_file is None else os.fsencode(os.fspath(backing_file))
    cluster_bits = _cluster_bits(cluster_size, version)
    image_path = resolve_name(image_name, path)

    with ExitStack() as stack:
        guard = ChainGuard()
        backing: BlockSource | None = None
        if backing_name is not None:
            if not backing_name:
                raise HeaderError("backing_filename", "a non-empty file name", "''")
            backing_format = choose_backing_format(backing_name, backing_format, path, version)
            backing = open_backing(
                backing_name, backing_format, path, guard=guard, force_share=False
            )
            stack.callback(backing.close)
        elif backing_format is not None:
            raise BackingFormatError("a backing format was given without a backing file")

        for other in (path, image_path):
            _refuse_if_in_chain(other, guard)
        if (
            os.path.exists(path)
            and os.path.exists(image_path)
            and os.path.samefile(path, image_path)
        ) or os.path.abspath(path) == os.path.abspath(image_path):
            raise ImageFileError(f"{image_path}: the image file cannot be the .add-cow file itself")

        existing = _existing_size(image_path)
        if size is None:
            if backing is not None:
                size = backing.size
            elif existing:
                size = existing
            else:
                raise AddCowError("a size is needed when there is no backing file")
        if version == 1 and existing > size:
            size = existing  # a version 1 image's virtual size is its image file's size
        if not 0 < size <= MAX_IMAGE_SIZE:
            raise HeaderError("image_size", f"1..{MAX_IMAGE_SIZE}", size)

        header = Header(
            version=version,
            image_name=image_name,
            backing_name=backing_name,
            backing_format=backing_format if backing_name is not None else None,
            image_size=size if version == 2 else None,
            cluster_bits=cluster_bits,
            header_size=_header_size(version, image_name, backing_name),
        )
        raw_header = header.pack()
        Header.unpack(raw_header)  # everything we write must read back

        _prepare_image_file(image_path, size)
        _write_metadata(path, raw_header, header.header_size, size, cluster_bits)


def _cluster_bits(cluster_size: int, version: int) -> int:
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or cluster_size != 1 << bits:
        raise HeaderError("cluster_size", "a power of two", cluster_size)
    if version == 1 and bits != V1_CLUSTER_BITS:
        raise HeaderError("cluster_size", "65536 for a version 1 image", cluster_size)
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise HeaderError(
            "cluster_size", f"{1 << MIN_CLUSTER_BITS}..{1 << MAX_CLUSTER_BITS}", cluster_size
        )
    if version not in (1, 2):
        raise HeaderError("version", "1 or 2", version)
    return bits


def _header_size(version: int, image_name: bytes, backing_name: bytes | None) -> int:
    names = len(image_name) + len(backing_name or b"")
    if version == 1:
        if V1_NAMES_START + names > V1_HEADER_SIZE:
            raise HeaderError(
                "image_filename_size",
                f"file names of at most {V1_HEADER_SIZE - V1_NAMES_START} bytes in all (version 1)",
                names,
            )
        return V1_HEADER_SIZE
    needed = -(-(V2_NAMES_START + names) // PAGE) * PAGE
    if needed > MAX_HEADER_SIZE:
        raise HeaderError("header_size", f"at most {MAX_HEADER_SIZE}", needed)
    return needed


def _refuse_if_in_chain(path: str, guard: ChainGuard) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ImageFileError(f"{path}: {exc.strerror}") from exc
    role = guard.seen.get((st.st_dev, st.st_ino))
    if role is not None:
        raise ImageFileError(f"{path}: this file is part of the backing chain ({role})")


def _existing_size(image_path: str) -> int:
    try:
        return os.stat(image_path).st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise ImageFileError(f"{image_path}: {exc.strerror}") from exc


def _prepare_image_file(image_path: str, size: int) -> None:
    """Create the image file sparse, or grow an existing one to ``size``."""
    try:
        fd = os.open(image_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageFileError(f"{image_path}: cannot create image file: {exc.strerror}") from exc
    try:
        lock_raw(fd, image_path, writable=True)
        if sysio.file_size(fd, image_path) < size:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                raise ImageFileError(
                    f"{image_path}: cannot extend image file to {size} bytes: {exc.strerror}"
                ) from exc
        sysio.fdatasync(fd, image_path)
    finally:
        os.close(fd)


def _write_metadata(
    path: str, raw_header: bytes, header_size: int, size: int, cluster_bits: int
) -> None:
    """Write the .add-cow file under a temporary name, sync it, then rename it in place.

    A crash leaves either the old file (or none) or the complete new one. An
    existing image at ``path`` is replaced only if nobody has it open (its lock
    is held until the rename).
    """
    length = header_size + bitmap_length(cluster_count(size, cluster_bits))
    directory = os.path.dirname(path) or "."
    old_fd = None
    if os.path.lexists(path):
        old_fd = _open_or_fail(path, os.O_RDWR)  # an exclusive lock needs write access
    try:
        if old_fd is not None:
            lock_whole(old_fd, path, exclusive=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        fd = _open_or_fail(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            try:
                sysio.pwrite_full(fd, [memoryview(raw_header)], 0, tmp)
                os.ftruncate(fd, length)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
    finally:
        if old_fd is not None:
            os.close(old_fd)
    sysio.sync_directory(directory)


def _open_or_fail(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot create: {exc.strerror}") from exc
