"""The .add-cow file on disk, and the open sequence of an image's two files.

This module does every read and write of the .add-cow file: the header
(:func:`read_header`, :func:`write_header`), the version 2 feature words alone
(:func:`write_features`), the incompatible word and the view record alone
(:func:`write_incompatible`, :func:`write_view_record`), the bitmap
(:func:`read_bitmap`) and its dirty pages (:func:`write_bitmap_pages`). The
layout itself (offsets, fields, rules) is :mod:`addcow.format`'s; *when* each
write may happen (data durable before the bits that point at it, the header
last) is decided by the callers, and argued in :mod:`addcow.image.core` (and,
for views, :mod:`addcow.view.record`).

:func:`open_image_files` is the one open sequence shared by the image, check
and commit: open the .add-cow file (refusing FIFOs and other special files),
record it in the chain guard, lock it, read and validate the header, open and
lock the image file under the same guard, find the virtual size, read the
bitmap. On any failure it closes what it opened and raises; ``findings``
lets the checker collect the two problems it reports instead (the image file
is the .add-cow file itself; the image file is too small).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from .. import sysio
from ..bitmap import Bitmap
from ..errors import (
    AddCowError,
    BackingFormatError,
    BackingLoopError,
    BitmapError,
    ForeignFormatError,
    HeaderError,
    ImageFileError,
    ViewActiveError,
)
from ..format import (
    MAX_CLUSTERS,
    MAX_IMAGE_SIZE,
    PAGE,
    Header,
    bitmap_length,
    cluster_count,
    header_length,
)
from ..locking import lock_raw, lock_whole
from ..stores.chain import ChainGuard, resolve_name
from ..stores.magic import HEAD_LENGTH, identify, sniff_format


def open_metafile(path: str, *, writable: bool) -> int:
    """Open a .add-cow file (a regular file or block device only)."""
    try:
        return sysio.open_file(path, os.O_RDWR if writable else os.O_RDONLY)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open: {exc.strerror}") from exc


def open_image_file(path: str, *, readonly: bool, what: str = "image file") -> int:
    """Open an image file, with a clear error when it is missing."""
    try:
        return sysio.open_file(path, os.O_RDONLY if readonly else os.O_RDWR)
    except FileNotFoundError as exc:
        raise ImageFileError(f"{path}: {what} not found") from exc
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open {what}: {exc.strerror}") from exc


def read_header(fd: int, path: str, *, view_ok: bool = False) -> Header:
    """Read and validate the header of an open .add-cow file.

    An image with a view record (a qcow2 view in force, or one being made or
    folded) is refused unless ``view_ok``: only ``addcow fold`` takes it.
    """
    head = sysio.pread_upto(fd, PAGE, 0, f"{path}: read header")
    length = header_length(head)
    if length > len(head):
        head = sysio.pread_upto(fd, length, 0, f"{path}: read header")
    try:
        header = Header.unpack(head)
    except HeaderError as exc:
        if exc.field == "magic":
            other = identify(head[:HEAD_LENGTH])
            if other is not None:
                raise ForeignFormatError(other, exc.found, path) from None
        exc.path = path
        raise
    if header.view_name is not None and not view_ok:
        raise view_active_error(header, path)
    return header


def view_active_error(header: Header, path: str) -> ViewActiveError:
    """The one-line refusal of an image that has a view record."""
    view = resolve_name(header.view_name or b"", path)
    if header.view:
        return ViewActiveError(
            f"{path}: the image has a qcow2 view in force, {view} (QEMU may be writing "
            f"its image file through it); run: addcow fold {path}"
        )
    return ViewActiveError(
        f"{path}: a qcow2 view, {view}, was being made or folded when it stopped; "
        f"run: addcow fold {path}"
    )


def write_header(fd: int, path: str, header: Header, header_size: int) -> None:
    """Rewrite a header in place (its size cannot change: the bitmap follows it)."""
    raw = header.pack()
    if len(raw) != header_size:
        raise HeaderError("header_size", f"{header_size} (the bitmap cannot move)", len(raw))
    sysio.pwrite_full(fd, [memoryview(raw)], 0, path)
    sysio.fdatasync(fd, path)


def write_features(fd: int, path: str, header: Header) -> None:
    """Rewrite only a version 2 header's compatible and autoclear words, durably."""
    offset, raw = header.feature_words()
    sysio.pwrite_full(fd, [memoryview(raw)], offset, path)
    sysio.fdatasync(fd, path)


def write_incompatible(fd: int, path: str, header: Header) -> None:
    """Rewrite only a version 2 header's incompatible features (sector 0), durably."""
    offset, raw = header.incompatible_word()
    sysio.pwrite_full(fd, [memoryview(raw)], offset, path)
    sysio.fdatasync(fd, path)


def write_view_record(fd: int, path: str, header: Header) -> None:
    """Rewrite only the header's last sector (``header``'s view record, or zeros), durably."""
    offset, raw = header.view_record()
    sysio.pwrite_full(fd, [memoryview(raw)], offset, path)
    sysio.fdatasync(fd, path)


def write_bitmap_pages(
    fd: int, path: str, header_size: int, chunks: list[tuple[int, bytes]]
) -> None:
    """Write bitmap pages (``Bitmap.take_dirty``'s copies); the caller syncs."""
    for offset, chunk in chunks:
        sysio.pwrite_full(fd, [memoryview(chunk)], header_size + offset, path)


def read_bitmap(fd: int, path: str, header: Header, size: int) -> Bitmap:
    """Read the bitmap for an image of ``size`` bytes, checking the file holds it."""
    clusters = cluster_count(size, header.cluster_bits)
    length = bitmap_length(clusters)
    file_size = sysio.file_size(fd, path)
    if file_size < header.header_size + length:
        raise BitmapError(
            f"{path}: bitmap truncated: expected {header.header_size + length} bytes "
            f"({clusters} clusters), found a file of {file_size} bytes"
        )
    data = bytearray(length)
    if length:
        sysio.pread_full(fd, memoryview(data), header.header_size, path)
    return Bitmap(data, clusters)


def virtual_size(header: Header, actual: int, image_path: str) -> int:
    """The virtual size, given the image file's size, checked against the limits."""
    if header.image_size is None:
        if actual == 0:
            raise ImageFileError(
                f"{image_path}: image file is empty (a version 1 image's size is "
                "its image file's size)"
            )
        if actual > MAX_IMAGE_SIZE or cluster_count(actual, header.cluster_bits) > MAX_CLUSTERS:
            raise ImageFileError(
                f"{image_path}: image file of {actual} bytes is larger than a version 1 "
                f"image may be (at most {MAX_CLUSTERS} clusters of {header.cluster_size} bytes)"
            )
        return actual
    if actual < header.image_size:
        raise ImageFileError(
            f"{image_path}: image file too small: expected at least {header.image_size} "
            f"bytes (image_size), found {actual}"
        )
    return header.image_size


def backing_format(header: Header, path: str, *, probe: bool = False) -> str:
    """The format of the image's backing file: recorded, or (version 1, only when
    the library caller asks with ``probe``) taken from the file's first bytes."""
    if header.backing_format is not None:
        return header.backing_format
    name = header.backing_name or b""
    if not probe:
        raise BackingFormatError(
            f"{path}: backing file format not recorded (version 1 image without the "
            f"BACKING_FORMAT_NO_PROBE bit); addcow does not probe formats. Record it "
            f"with: addcow rebase -u -b {os.fsdecode(name)} -F raw {path} (library "
            "callers may pass probe_backing=True to trust the backing file's first bytes)"
        )
    backing = resolve_name(name, path)
    found = sniff_format(backing)
    if found in (None, "add-cow"):
        return found or "raw"
    raise BackingFormatError(f"{backing}: backing file is {found}, which addcow cannot read")


class ImageFiles(NamedTuple):
    """An image's two files, open and locked, with what was read from them."""

    meta_fd: int
    header: Header
    image_path: str
    image_fd: int
    size: int
    bitmap: Bitmap

    def close(self) -> None:
        os.close(self.image_fd)
        os.close(self.meta_fd)


def open_image_files(
    path: str,
    *,
    meta_writable: bool,
    image_writable: bool,
    lock: bool,
    guard: ChainGuard,
    findings: list[AddCowError] | None = None,
    view_ok: bool = False,
) -> ImageFiles:
    """Open, guard and lock the .add-cow file and its image file; read header and bitmap.

    ``lock`` takes the .add-cow file's lock (exclusive when ``meta_writable``)
    and QEMU's locks on the image file; without it nothing is locked (``-U``).
    A backing (``guard.depth`` > 0) is checked against the guard's root by name
    first, since an image names it.
    """
    if guard.depth:
        guard.check_path(path)
    meta_fd = open_metafile(path, writable=meta_writable)
    opened = [meta_fd]
    try:
        guard.add(meta_fd, path)
        if guard.depth:
            guard.check_open(meta_fd, path)
        if lock:
            lock_whole(meta_fd, path, exclusive=meta_writable)
        header = read_header(meta_fd, path, view_ok=view_ok)
        image_path = resolve_name(header.image_name, path)
        guard.check_path(image_path)
        image_fd = open_image_file(image_path, readonly=not image_writable)
        opened.append(image_fd)
        guard.check_open(image_fd, image_path)
        try:
            guard.add(image_fd, image_path)
        except BackingLoopError as exc:
            if findings is None:
                raise
            findings.append(exc)  # the .add-cow file itself: locked above already
        else:
            if lock:
                lock_raw(image_fd, image_path, writable=image_writable)
        try:
            size = virtual_size(header, sysio.file_size(image_fd, image_path), image_path)
        except ImageFileError as exc:
            if findings is None:
                raise
            findings.append(exc)
            size = header.image_size or 0
        bitmap = read_bitmap(meta_fd, path, header, size)
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return ImageFiles(meta_fd, header, image_path, image_fd, size, bitmap)
