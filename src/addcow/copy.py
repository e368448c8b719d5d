"""Whole-disk copies and comparisons between add-cow images and raw files.

Both work on any :class:`~addcow.stores.BlockSource`: an open
:class:`AddCowImage` or a :class:`~addcow.stores.raw.RawFile`. Ranges a source
reports as zero are not read at all; data ranges are read in large chunks
into one reused buffer, and zero-filled 4 KiB blocks inside them are skipped,
so the copy stays sparse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from . import sysio, zeros
from .errors import FormatChoiceError, ImageFileError
from .image import AddCowImage
from .locking import lock_raw
from .stores import BlockSource, Extent, open_store, registry
from .stores.chain import ChainGuard
from .stores.magic import article, identify, read_head
from .stores.raw import RawFile
from .targets import refuse_replacing

CHUNK = 4 << 20
"""Bytes read per request while copying or comparing."""


def format_of_name(path: str) -> str:
    """The format of a file named on the command line without ``-f``: by its name.

    A name ending in ``.add-cow`` is an add-cow image; anything else is raw.
    The content is never used to choose: a guest can write any header into a
    raw disk.
    """
    return "add-cow" if os.fsdecode(path).endswith(".add-cow") else "raw"


def open_source(
    path: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> BlockSource:
    """Open a file named on the command line as ``fmt`` (add-cow, qcow2 or raw).

    Without ``fmt``, the name decides (:func:`format_of_name`), and a file taken
    as raw that starts with a known image header is refused: the user must say
    which it is. With ``fmt="raw"`` the file is read as the raw disk it is,
    whatever its first bytes.
    """
    given = fmt is not None
    fmt = fmt if fmt is not None else format_of_name(path)
    if fmt != "raw":
        guard = ChainGuard(backing_root, allowed_uris)
        return open_store(path, fmt, guard=guard, force_share=force_share)
    try:
        found = identify(read_head(path))
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open: {exc.strerror}") from exc
    if found is not None and not given:
        if found in registry.names():
            hint = f", or -f {found} to open it as an image"
        else:
            readable = ", ".join(registry.names())
            hint = f" (addcow reads {readable} images; qemu-img reads {found})"
        raise FormatChoiceError(
            f"{path} starts with {article(found)} header: give -f raw to copy it as a raw "
            f"disk{hint}"
        )
    return RawFile(path, force_share=force_share, guard=ChainGuard())


@dataclass
class CopyStats:
    size: int = 0
    copied: int = 0
    skipped_zero: int = 0


def copy_to_raw(
    src: BlockSource,
    dst_path: str,
    *,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> CopyStats:
    """Write the whole virtual content of ``src`` to a sparse raw file ``dst_path``.

    An existing file there is replaced (:func:`open_target`), one that starts with
    an image header only with ``force``.
    """
    stats = CopyStats(size=src.size)
    fd = open_target(src, dst_path, force=force)
    try:
        buf = bytearray(CHUNK)
        for ext in _data_extents(src, stats, progress):
            _copy_data(src, fd, dst_path, ext.offset, ext.length, buf, stats)
        sysio.fdatasync(fd, dst_path)
    except OSError as exc:
        raise ImageFileError(f"{dst_path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return stats


def _data_extents(
    src: BlockSource, stats: CopyStats, progress: Callable[[int], None] | None
) -> Iterator[Extent]:
    """The extents of ``src`` that may hold data, none longer than :data:`CHUNK`.

    Zero ones are counted in ``stats.skipped_zero`` instead; ``progress`` hears
    of each chunk once the caller is done with its extents.
    """
    pos = 0
    while pos < src.size:
        step = min(CHUNK, src.size - pos)
        for ext in src.block_status_at(pos, step, 0):
            if ext.zero:
                stats.skipped_zero += ext.length
            else:
                yield ext
        pos += step
        if progress is not None:
            progress(step)


def open_target(src: BlockSource, dst_path: str, *, force: bool = False) -> int:
    """Create or empty ``dst_path`` as a sparse file of ``src``'s size, safely.

    The file is checked before anything is truncated: it must not be any file
    ``src`` reads (which would destroy the source while copying it), nor a file
    another process has open, nor (unless ``force``) one that starts with an
    image header (:func:`addcow.targets.refuse_replacing`); it is locked for
    writing as QEMU would, so a file opened by others from then on is refused too.
    """
    try:
        fd = sysio.open_file(dst_path, os.O_RDWR | os.O_CREAT, 0o644)
    except sysio.WrongFileType as exc:
        raise ImageFileError(f"{dst_path}: the target is {exc.kind}, not {exc.expected}") from None
    except OSError as exc:
        raise ImageFileError(f"{dst_path}: cannot create: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in src.file_ids():
            raise ImageFileError(
                f"{dst_path}: the target is a file of the source image; refusing to overwrite it"
            )
        refuse_replacing(fd, dst_path, force=force, advice="--force replaces it")
        lock_raw(fd, dst_path, writable=True)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, src.size)
    except OSError as exc:
        os.close(fd)
        raise ImageFileError(f"{dst_path}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_data(
    src: BlockSource, fd: int, name: str, offset: int, length: int, buf: bytearray, stats: CopyStats
) -> None:
    """Copy one data range; 4 KiB blocks of zeros stay holes in the new file."""
    src.readinto(memoryview(buf)[:length], offset)
    written, zero = sysio.write_sparse(fd, buf, length, offset, name, punch=False)
    stats.copied += written
    stats.skipped_zero += zero


def first_difference(
    a: BlockSource, b: BlockSource, *, progress: Callable[[int], None] | None = None
) -> int | None:
    """Offset of the first 512-byte sector where ``a`` and ``b`` differ, or None.

    Past the end of the shorter source, the longer one must read as zero.
    """
    common = min(a.size, b.size)
    buf_a, buf_b = bytearray(CHUNK), bytearray(CHUNK)
    view_a, view_b = memoryview(buf_a), memoryview(buf_b)
    pos = 0
    while pos < common:
        step = min(CHUNK, common - pos)
        a.readinto(view_a[:step], pos)
        b.readinto(view_b[:step], pos)
        if buf_a[:step] != buf_b[:step]:
            return pos + _first_mismatch(buf_a, buf_b, step)
        pos += step
        if progress is not None:
            progress(step)
    longer, buf, view = (a, buf_a, view_a) if a.size > b.size else (b, buf_b, view_b)
    while pos < longer.size:
        step = min(CHUNK, longer.size - pos)
        longer.readinto(view[:step], pos)
        if not zeros.is_zero(buf, 0, step):
            return pos + _first_mismatch(buf, bytearray(step), step)
        pos += step
    return None


def _first_mismatch(a: bytearray, b: bytearray, length: int) -> int:
    """Start of the first differing 512-byte sector (bisect with memcmp)."""
    lo, hi = 0, length
    while hi - lo > 512:
        mid = lo + ((hi - lo) // 2 + 511) // 512 * 512
        mid = min(mid, hi)
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def copy_to_addcow(
    src: BlockSource, dst: AddCowImage, *, progress: Callable[[int], None] | None = None
) -> CopyStats:
    """Write the content of ``src`` into a new, empty add-cow image without backing.

    Zero ranges and all-zero clusters are left unallocated (they read as zero),
    as ``qemu-img convert -O qcow2`` leaves them unallocated.
    """
    stats = CopyStats(size=src.size)
    buf = bytearray(CHUNK)
    cluster = dst.cluster_size
    for ext in _data_extents(src, stats, progress):
        view = memoryview(buf)[: ext.length]
        src.readinto(view, ext.offset)
        for lo in range(0, ext.length, cluster):
            hi = min(lo + cluster, ext.length)
            if zeros.is_zero(buf, lo, hi):
                stats.skipped_zero += hi - lo
            else:
                dst.write(view[lo:hi], ext.offset + lo)
                stats.copied += hi - lo
    dst.flush()
    return stats
