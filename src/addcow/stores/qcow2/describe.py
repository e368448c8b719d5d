"""What ``addcow info`` shows of a qcow2 file: the fields ``qemu-img info`` shows,
from the header alone.

The header is read and validated as when the file is opened as a store; no
table is read, and the backing file it names is only checked against the
chain's guard, never opened.
"""

from __future__ import annotations

import os
from typing import Any

from ... import sysio
from ...errors import ImageFileError
from ..chain import ChainGuard, resolve_name
from .format import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, Header
from .store import read_header


def describe_qcow2(path: str, *, guard: ChainGuard, force_share: bool) -> dict[str, Any]:
    """What ``qemu-img info`` says of the qcow2 file at ``path``."""
    try:
        fd = sysio.open_file(path, os.O_RDONLY)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        header = read_header(fd, path, sysio.file_size(fd, path))
        blocks = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    info = entry(path, header, blocks * 512)
    if header.backing_name is not None:
        full = resolve_name(header.backing_name, path)
        guard.check_path(full)
        info["backing-filename"] = os.fsdecode(header.backing_name)
        info["full-backing-filename"] = full
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
    return info


def entry(filename: str, header: Header, actual_size: int | None = None) -> dict[str, Any]:
    """The fields ``qemu-img info`` shows for a qcow2 file with ``header``; a file
    read over a URI has no ``actual-size``."""
    info: dict[str, Any] = {"filename": filename, "format": "qcow2"}
    info["virtual-size"] = header.virtual_size
    if actual_size is not None:
        info["actual-size"] = actual_size
    info |= {
        "cluster-size": header.cluster_size,
        "dirty-flag": bool(header.incompatible_features & INCOMPAT_DIRTY),
    }
    data: dict[str, Any] = {
        "compat": "0.10" if header.version == 2 else "1.1",
        "compression-type": header.compression,
    }
    if header.version >= 3:  # version 2 has no feature bits, and qemu-img shows none
        data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    data["refcount-bits"] = 1 << header.refcount_order
    if header.version >= 3:
        data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        data["extended-l2"] = header.extended_l2
    info["format-specific"] = {"type": "qcow2", "data": data}
    return info
