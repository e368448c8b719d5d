"""The magics of known image formats, to refuse (never to choose) a format.

A guest can write any bytes into a raw disk, including an image header. The
first bytes of a file are therefore looked at only to refuse something: to
record ``raw`` for a file that starts with an image header, to open such a file
as raw without the user saying so, or to say what a non-add-cow file given as
add-cow really is. No caller picks a format other than raw from them.
"""

from __future__ import annotations

import os

from .. import sysio
from ..errors import BackingError, BackingFormatError
from ..format import BACKING_FORMATS
from . import registry
from .chain import ChainGuard, resolve_name

OTHER_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
)
"""(offset, magic, format name) of the image formats addcow does not read,
recognised so that a file of one is never taken for a raw disk."""


def known_magics() -> tuple[tuple[int, bytes, str], ...]:
    """(offset, magic, format name) of every format whose header is recognised:
    the registered formats' own and :data:`OTHER_MAGICS`."""
    return registry.magics() + OTHER_MAGICS


HEAD_LENGTH = 128
"""Bytes at the start of a file that hold every magic of :func:`known_magics`."""


def identify(head: bytes) -> str | None:
    """The format whose magic ``head`` (the first bytes of a file) starts with, or None."""
    for offset, magic, name in known_magics():
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def read_head(path: str) -> bytes:
    """The first :data:`HEAD_LENGTH` bytes of ``path`` (fewer if it is shorter).

    Raises OSError when the file cannot be opened (only regular files and block
    devices are), AddCowIOError when it cannot be read.
    """
    fd = sysio.open_file(path, os.O_RDONLY)
    try:
        return sysio.pread_upto(fd, HEAD_LENGTH, 0, f"{path}: read")
    finally:
        os.close(fd)


def sniff_format(path: str) -> str | None:
    """The image format whose magic the backing file ``path`` starts with, or None.

    Used to refuse recording ``raw`` for a file that starts with an image header;
    opening an image never probes.
    """
    try:
        return identify(read_head(path))
    except OSError as exc:
        raise BackingError(f"{path}: cannot open backing file: {exc.strerror}") from exc


def article(name: str) -> str:
    """``name`` with its indefinite article: "an add-cow", "a qcow2"."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


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
            if found in BACKING_FORMATS:
                advice = f"if it is {article(found)} image, give -F {found}"
            else:
                advice = f"addcow reads {', '.join(BACKING_FORMATS)} backing files, not {found}"
            raise BackingFormatError(
                f"{backing_path}: the backing file starts with {article(found)} header; "
                f"refusing to guess its format (a guest can write such a header into a raw "
                f"disk): {advice}"
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
