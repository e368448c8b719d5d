"""Creating a new add-cow image over a new or existing raw image file.

Order of work, so that a failure changes nothing a user had and a crash leaves
either no image or a valid one:

1. Validate everything and open the backing chain (read-only) before touching
   any file; refuse loops (the image file, the .add-cow file and the backing
   files must all be distinct files) and an image file that another image
   names (the header of a ``*.add-cow`` file in its directory or ``path``'s),
   whatever it holds: two images sharing one would overwrite each other.
2. Check the .add-cow path: an existing file there is replaced only with
   ``force`` (and only while nobody has it open: its lock is held until the
   rename; :func:`addcow.targets.refuse_replacing`). Create the temporary .add-cow file next to it.
3. Open the image file, creating it if missing (``O_EXCL`` tells whether this
   call created it: only then does a failure remove it; an existing one only
   loses again the sparse tail this call added). An existing image file
   that holds data is refused unless ``image_file_raw`` accepts its content as
   the disk; its data clusters then start allocated; an open image's image
   file is refused by its locks. Extend it sparse to the virtual size and
   sync it, so that its data is durable before any bit says so.
4. Write the .add-cow file (header, then the bitmap, sparse where zero) under
   the temporary name, sync it, rename it into place and sync the directory.
"""

from __future__ import annotations

import os
import stat
from contextlib import ExitStack, suppress
from typing import NamedTuple

from . import sysio
from .bitmap import Bitmap
from .errors import (
    AddCowError,
    AddCowIOError,
    BackingFormatError,
    ExistingFileError,
    HeaderError,
    ImageFileError,
)
from .format import (
    COMMON_HEADER_SIZE,
    MAX_CLUSTER_BITS,
    MAX_CLUSTERS,
    MAX_HEADER_SIZE,
    MAX_IMAGE_SIZE,
    MIN_CLUSTER_BITS,
    PAGE,
    V1_CLUSTER_BITS,
    V1_HEADER_SIZE,
    V1_NAMES_START,
    V2_INCOMPAT_BACKING_URI,
    V2_NAMES_START,
    Header,
    bitmap_length,
    cluster_count,
    largest_image_size,
)
from .image.metafile import read_header
from .locking import lock_raw, lock_whole
from .stores import BlockSource, open_backing, remote
from .stores.chain import ChainGuard, resolve_name
from .stores.magic import choose_backing_format
from .targets import refuse_replacing


class Created(NamedTuple):
    """What :func:`create` made: the image file's path, the clusters of the
    disk, and how many start allocated (image_file_raw)."""

    image_path: str
    clusters: int
    allocated: int


def create(
    path: str | os.PathLike[str],
    *,
    image_file: str | os.PathLike[str],
    backing_file: str | os.PathLike[str] | None = None,
    backing_format: str | None = None,
    size: int | None = None,
    cluster_size: int = 65536,
    version: int = 2,
    force: bool = False,
    image_file_raw: bool = False,
) -> Created:
    """Create the add-cow image ``path`` whose data lives in ``image_file``.

    Relative ``image_file`` and ``backing_file`` names are stored as given and
    mean a path relative to the directory of ``path``. A ``backing_file`` that
    starts with ``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://``,
    ``http://`` or ``https://`` is a backing URI (version 2 only): its size,
    and for HTTP its ETag or Last-Modified, are pinned in the image
    (:mod:`addcow.stores.remote`); a local file of such a name is given as ``./nbd:...``.
    ``backing_format`` defaults to ``raw`` when the backing file does not start with a known image
    magic; if it does, the format must be given. ``size`` defaults to the
    backing file's virtual size (or, without a backing file, the size of an
    existing image file).

    An existing file at ``path`` is replaced only with ``force``. An existing
    image file that holds data is refused unless ``image_file_raw``: its content
    is then part of the disk (every cluster holding data starts allocated;
    holes stay unallocated and read from the backing file). An image file that
    another image uses is refused (ExistingFileError), even an empty one.
    """
    path = os.fspath(path)
    image_name = os.fsencode(os.fspath(image_file))
    backing_name = None if backing_file is None else os.fsencode(os.fspath(backing_file))
    uri = None
    if isinstance(backing_file, str) and remote.scheme_of(backing_file) is not None:
        uri = backing_file
        if version != 2:
            raise BackingFormatError(
                f"a backing URI needs a version 2 image (compat=2), not version {version}"
            )
    cluster_bits = _cluster_bits(cluster_size, version)
    image_path = resolve_name(image_name, path)

    with ExitStack() as stack:
        guard = ChainGuard()
        backing: BlockSource | None = None
        if uri is not None:
            ref, backing = remote.pin(uri, backing_format, guard=guard)
            stack.callback(backing.close)
            backing_name, backing_format = ref.encode(), backing_format or "raw"
        elif backing_name is not None:
            if not backing_name:
                raise HeaderError("backing_filename", "a non-empty file name", "''")
            backing_format = choose_backing_format(
                backing_name, backing_format, path, version, guard=guard
            )
            backing = open_backing(
                backing_name, backing_format, path, guard=guard, force_share=False
            )
            stack.callback(backing.close)
        elif backing_format is not None:
            raise BackingFormatError("a backing format was given without a backing file")

        for other in (path, image_path):
            _refuse_if_in_chain(other, guard)
        if _same_file(path, image_path):
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
        _check_size(size, cluster_bits)

        header = Header(
            version=version,
            image_name=image_name,
            backing_name=backing_name,
            backing_format=backing_format if backing_name is not None else None,
            image_size=size if version == 2 else None,
            cluster_bits=cluster_bits,
            header_size=_header_size(version, image_name, backing_name),
            incompatible_features=V2_INCOMPAT_BACKING_URI if uri is not None else 0,
        )
        raw_header = header.pack()
        Header.unpack(raw_header)  # everything we write must read back

        _refuse_another_images_file(path, image_path)
        old_fd = _claim_target(path, force)
        if old_fd is not None:
            stack.callback(os.close, old_fd)
        return _write_image(path, image_path, raw_header, header, size, image_file_raw)


def _check_size(size: int, cluster_bits: int) -> None:
    if not 0 < size <= MAX_IMAGE_SIZE:
        raise HeaderError("image_size", f"1..{MAX_IMAGE_SIZE}", size)
    if cluster_count(size, cluster_bits) > MAX_CLUSTERS:
        raise HeaderError(
            "image_size",
            f"at most {largest_image_size(cluster_bits)} bytes with {1 << cluster_bits}-byte "
            f"clusters ({MAX_CLUSTERS} clusters, an implementation limit; larger clusters "
            "allow larger images)",
            f"{size} bytes",
        )


def _same_file(path: str, image_path: str) -> bool:
    if os.path.abspath(path) == os.path.abspath(image_path):
        return True
    try:
        return os.path.samefile(path, image_path)
    except OSError:  # one of them does not exist yet
        return False


def _claim_target(path: str, force: bool) -> int | None:
    """Check the .add-cow path before any file is touched.

    Returns the locked descriptor of an existing image to replace (``force``),
    held until the rename, or None when the path is free.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ExistingFileError(
                f"{path}: a dangling symbolic link is in the way of the new image"
            ) from None
        return None
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot create: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ExistingFileError(f"{path}: is {kind}; cannot create an image there")
    # an exclusive lock needs write access; without force the file is only looked at
    try:
        fd = sysio.open_file(path, os.O_RDWR if force else os.O_RDONLY)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot replace: {exc.strerror}") from exc
    try:
        refuse_replacing(
            fd,
            path,
            force=force,
            every_file=True,
            advice="give --force, or force=True, to replace it; its image file stays as it is",
        )
        lock_whole(fd, path, exclusive=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_image(
    path: str,
    image_path: str,
    raw_header: bytes,
    header: Header,
    size: int,
    image_file_raw: bool,
) -> Created:
    """Steps 2 to 4 of the module docstring; a failure removes only what it created."""
    directory = os.path.dirname(path) or "."
    tmp, tmp_fd = _create_temporary(directory, path)
    image_fd = -1
    created_image = renamed = False
    grown_from: int | None = None
    try:
        image_fd, created_image = _open_image_file(image_path)
        lock_raw(image_fd, image_path, writable=True)
        clusters = cluster_count(size, header.cluster_bits)
        bitmap = None
        if not created_image:
            bitmap = _existing_data(image_fd, image_path, size, header, image_file_raw)
        grown_from = _extend(image_fd, image_path, size)
        sysio.fdatasync(image_fd, image_path)  # its data is durable before any bit says so
        _write_metadata(tmp_fd, path, raw_header, header.header_size, clusters, bitmap)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            raise AddCowIOError.wrap(f"{path}: cannot create", exc) from exc
        renamed = True
        sysio.sync_directory(directory)
    except BaseException:
        if not renamed:  # once renamed, the image is complete: nothing is removed
            _remove_quietly(tmp, tmp_fd)
            if created_image:
                _remove_quietly(image_path, image_fd)
            elif grown_from is not None:  # give back only the sparse tail this call added
                with suppress(OSError):
                    os.ftruncate(image_fd, grown_from)
        raise
    finally:
        _close_quietly(tmp_fd)
        _close_quietly(image_fd)
    return Created(image_path, clusters, 0 if bitmap is None else bitmap.allocated)


def _create_temporary(directory: str, path: str) -> tuple[str, int]:
    """A new temporary file next to ``path``: (name, fd). Errors name ``path``."""
    stem = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    for attempt in range(100):
        tmp = f"{stem}.tmp" if not attempt else f"{stem}.{attempt}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue  # left by a process that had the same id: not ours to remove
        except OSError as exc:
            raise ImageFileError(f"{path}: cannot create: {exc.strerror}") from exc
        return tmp, fd
    raise ImageFileError(f"{path}: cannot create: no free temporary name in {directory}")


def _open_image_file(image_path: str) -> tuple[int, bool]:
    """Open the image file read-write, creating it if missing: (fd, created).

    A name that is a dangling symlink creates the file it points to (as qemu-img
    create does); O_EXCL alone would refuse the symlink itself.
    """
    target = image_path
    for _ in range(3):  # a file removed or created between the two opens: try again
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            return fd, True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ImageFileError(f"{image_path}: cannot create image file: {exc.strerror}") from exc
        try:
            return sysio.open_file(image_path, os.O_RDWR), False
        except FileNotFoundError:
            if os.path.islink(image_path):
                target = os.path.realpath(image_path)
            continue
        except OSError as exc:
            raise ImageFileError(f"{image_path}: cannot open image file: {exc.strerror}") from exc
    raise ImageFileError(f"{image_path}: cannot open image file: it keeps appearing and vanishing")


def _existing_data(
    fd: int, image_path: str, size: int, header: Header, image_file_raw: bool
) -> Bitmap | None:
    """Refuse an image file that holds data, unless its content is accepted as the
    disk: then the bitmap with the clusters that hold data set, or None for none."""
    end = sysio.file_size(fd, image_path)
    runs = [(lo, hi) for lo, hi, data in sysio.data_runs(fd, 0, end) if data]
    if not runs:
        return None
    if not image_file_raw:
        raise ExistingFileError(
            f"{image_path}: the image file holds data (at offset {runs[0][0]}); refusing to "
            "use it, since every cluster would start unallocated and hide it. Use a new or "
            "empty file, or accept its content as the disk with -o image_file=NAME,"
            "image_file_raw=on (image_file_raw=True)"
        )
    clusters = cluster_count(size, header.cluster_bits)
    bitmap = Bitmap(bytearray(bitmap_length(clusters)), clusters)
    bits = header.cluster_bits
    for lo, hi in runs:
        if lo < size:
            bitmap.set_range(lo >> bits, cluster_count(min(hi, size), bits))
    return bitmap


def _extend(fd: int, image_path: str, size: int) -> int | None:
    """Grow the image file sparse to ``size`` (never shrink it); the old size, or None."""
    old = sysio.file_size(fd, image_path)
    if old >= size:
        return None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise ImageFileError(
            f"{image_path}: cannot extend image file to {size} bytes: {exc.strerror}"
        ) from exc
    return old


def _write_metadata(
    fd: int, path: str, raw_header: bytes, header_size: int, clusters: int, bitmap: Bitmap | None
) -> None:
    """Header, bitmap (only its non-zero pages are written), full length, fsync.

    Errors name ``path``, the file being created, not the temporary name.
    """
    sysio.pwrite_full(fd, [memoryview(raw_header)], 0, path)
    if bitmap is not None:
        for offset, chunk in bitmap.take_dirty():
            sysio.pwrite_full(fd, [memoryview(chunk)], header_size + offset, path)
    length = header_size + bitmap_length(clusters)
    try:
        os.ftruncate(fd, length)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{path}: cannot write", exc) from exc
    # The bitmap's blocks are reserved now, so that its bits can still be written
    # when the image file later fills the file system.
    sysio.allocate(fd, header_size, length - header_size, path)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise AddCowIOError.wrap(f"{path}: cannot write", exc) from exc


def _remove_quietly(name: str, fd: int) -> None:
    """Remove ``name`` if it is still the file open as ``fd`` (cleanup after a failure)."""
    try:
        st, now = os.fstat(fd), os.lstat(name)
        if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(name)
    except OSError:
        pass


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with suppress(OSError):
            os.close(fd)


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


def _refuse_another_images_file(path: str, image_path: str) -> None:
    """Refuse an image file that another image names (step 1 of the module docstring).

    The images looked at are the ``*.add-cow`` files in the image file's directory
    and in ``path``'s, ``path`` itself aside (``force`` replaces it). An image
    elsewhere is refused by its locks while it is open. A ``*.add-cow`` file that
    cannot be read fails the create (:func:`_image_file_of`): skipping it would skip
    the check.
    """
    wanted = _file_key(image_path)
    seen: set[str] = set()
    for directory in (os.path.dirname(image_path), os.path.dirname(path)):
        real = os.path.realpath(directory or ".")
        if real in seen:
            continue
        seen.add(real)
        try:
            names = sorted(n for n in os.listdir(directory or ".") if n.endswith(".add-cow"))
        except OSError:
            continue
        for name in names:
            other = os.path.join(directory, name)
            if (
                not _same_file(other, path)
                and _file_key(_image_file_of(other, image_path)) == wanted
            ):
                raise ExistingFileError(
                    f"{image_path}: is the image file of {other}; refusing to share it (two "
                    "images would overwrite each other's clusters): detach or remove that "
                    "image first, or use another image file"
                )


def _image_file_of(path: str, image_path: str) -> str | None:
    """The image file the add-cow image ``path`` names; None if ``path`` is no add-cow
    image (a file without its magic or shorter than a header, a directory, gone
    since it was listed).

    Anything else fails the create: an I/O error, or an add-cow header that cannot
    be read, leaves unknown whether ``path`` uses ``image_path``.
    """
    try:
        fd = sysio.open_file(path, os.O_RDONLY)
    except (FileNotFoundError, sysio.WrongFileType):
        return None
    except OSError as exc:
        raise AddCowIOError.wrap(
            f"{path}: cannot open to see which image file it names", exc
        ) from exc
    try:
        return resolve_name(read_header(fd, path).image_name, path)
    except HeaderError as exc:
        short = isinstance(exc.found, int) and exc.found < COMMON_HEADER_SIZE
        if exc.field == "magic" or (exc.field == "length" and short):
            return None
        raise ExistingFileError(
            f"{image_path}: cannot tell whether {path} uses it as its image file: {exc}"
        ) from exc
    finally:
        os.close(fd)


def _file_key(path: str | None) -> object:
    """What tells two names of one file apart from others: its inode, or its real path."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


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
