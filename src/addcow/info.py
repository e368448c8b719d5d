"""What ``addcow info`` reports, read from the header and bitmap alone.

Inspection opens the .add-cow file and only *stats* the image file and the
backing file: their content is never read, and no backing file is opened as
an image, so inspecting an untrusted image cannot make addcow read a file the
image names (the lesson of CVE-2024-4467).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import sysio
from .errors import BackingLoopError, ImageFileError
from .format import (
    V1_FEATURES,
    V2_AUTOCLEAR_FEATURES,
    V2_COMPATIBLE_FEATURES,
    V2_INCOMPATIBLE_FEATURES,
    Header,
)
from .image.metafile import open_metafile, read_bitmap, read_header, virtual_size
from .locking import lock_whole
from .stores import remote
from .stores.chain import MAX_CHAIN_DEPTH, ChainGuard, resolve_name
from .stores.qcow2 import Qcow2File
from .stores.qcow2.format import COMPAT_LAZY_REFCOUNTS as QCOW2_COMPAT_LAZY_REFCOUNTS
from .stores.qcow2.format import INCOMPAT_CORRUPT as QCOW2_INCOMPAT_CORRUPT
from .stores.qcow2.format import INCOMPAT_DIRTY as QCOW2_INCOMPAT_DIRTY
from .stores.qcow2.format import Header as Qcow2Header
from .stores.qcow2.store import read_header as read_qcow2_header


def image_info(
    path: str,
    *,
    force_share: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> dict[str, Any]:
    """qemu-img style information about one add-cow image, as a JSON-ready dict.

    With ``backing_root``, an image file or backing file named outside that
    directory is refused (PathPolicyError) before it is even stat'ed, and a
    backing URI unless ``allowed_uris`` allows it. A backing URI is described
    from its record (the pinned size and validator): nothing is sent over the
    network.
    """
    guard = ChainGuard(backing_root, allowed_uris)
    ref: remote.BackingURI | None = None
    fd = open_metafile(path, writable=False)
    try:
        if not force_share:
            lock_whole(fd, path, exclusive=False)
        header = read_header(fd, path)
        image_path = resolve_name(header.image_name, path)
        guard.check_path(image_path)
        if header.backing_uri and header.backing_name is not None:
            ref = remote.BackingURI.decode(header.backing_name)
            remote.check_policy(ref.uri, guard)
        elif header.backing_name is not None:
            guard.check_path(resolve_name(header.backing_name, path))
        image_stat = _stat(image_path)
        size = _size(header, image_stat, image_path)
        bitmap = read_bitmap(fd, path, header, size)
        meta_blocks = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    actual = (meta_blocks + (image_stat.st_blocks if image_stat else 0)) * 512
    complete = header.all_allocated or bitmap.full
    data: dict[str, Any] = {
        "version": header.version,
        "image-file": os.fsdecode(header.image_name),
        "full-image-file": image_path,
        "header-size": header.header_size,
        "allocated-clusters": bitmap.allocated,
        "total-clusters": bitmap.clusters,
        "complete": complete,
    }
    if header.version == 1:
        data["features"] = _names(header.incompatible_features, V1_FEATURES)
    else:
        data["incompatible-features"] = _names(
            header.incompatible_features, V2_INCOMPATIBLE_FEATURES
        )
        data["compatible-features"] = _names(header.compatible_features, V2_COMPATIBLE_FEATURES)
        data["autoclear-features"] = _names(header.autoclear_features, V2_AUTOCLEAR_FEATURES)
    info: dict[str, Any] = {
        "filename": path,
        "format": "add-cow",
        "virtual-size": size,
        "actual-size": actual,
        "cluster-size": header.cluster_size,
        "dirty-flag": False,
    }
    if ref is not None:
        info["backing-filename"] = info["full-backing-filename"] = remote.shown(ref.uri)
        info["backing-filename-format"] = header.backing_format
        pin = {"size": ref.size, "etag": ref.etag, "last-modified": ref.last_modified,
               "version-id": ref.version_id, "sha256": ref.sha256}  # fmt: skip
        data["backing-pin"] = {k: v for k, v in pin.items() if v is not None}
    elif header.backing_name is not None:
        info["backing-filename"] = os.fsdecode(header.backing_name)
        info["full-backing-filename"] = resolve_name(header.backing_name, path)
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
    info["format-specific"] = {"type": "add-cow", "data": data}
    return info


def backing_chain_info(
    path: str,
    *,
    force_share: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """``image_info`` for the image and each add-cow below it, qcow2 layers as
    ``qemu-img info`` describes them, then the raw base.

    The chain stops at a backing file whose format is not recorded (a version 1
    image without NO_PROBE): its format is never guessed. A raw golden image
    behind a backing URI is described from its pin, without contacting it; a
    qcow2 one is opened, since only its header knows its virtual size.
    """
    chain: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    current: str | None = path
    fmt: str | None = "add-cow"
    while current is not None and fmt is not None:
        st = _stat(current)
        if st is None:
            raise ImageFileError(f"{current}: backing file not found")
        if (st.st_dev, st.st_ino) in seen:
            raise BackingLoopError(f"{current}: backing chain loops")
        if len(seen) > MAX_CHAIN_DEPTH:
            raise BackingLoopError(f"{current}: backing chain deeper than {MAX_CHAIN_DEPTH}")
        seen.add((st.st_dev, st.st_ino))
        if fmt == "raw":
            chain.append(
                {
                    "filename": current,
                    "format": "raw",
                    "virtual-size": st.st_size,
                    "actual-size": st.st_blocks * 512,
                    "dirty-flag": False,
                }
            )
            break
        if fmt == "qcow2":
            entry = qcow2_info(current, st, backing_root=backing_root)
        else:
            entry = image_info(
                current,
                force_share=force_share,
                backing_root=backing_root,
                allowed_uris=allowed_uris,
            )
        chain.append(entry)
        pin = entry.get("format-specific", {}).get("data", {}).get("backing-pin")
        if pin is not None:
            if entry["backing-filename-format"] == "qcow2":
                guard = ChainGuard(backing_root, allowed_uris)
                chain.append(remote_qcow2_info(current, guard, entry["full-backing-filename"]))
            else:  # a raw golden image: described from its pin, never contacted
                chain.append(
                    {
                        "filename": entry["full-backing-filename"],
                        "format": "raw",
                        "virtual-size": pin["size"],
                        "dirty-flag": False,
                    }
                )
            break
        current = entry.get("full-backing-filename")
        fmt = entry.get("backing-filename-format")
    return chain


def qcow2_info(path: str, st: os.stat_result, *, backing_root: str | None = None) -> dict[str, Any]:
    """What ``qemu-img info`` says of a qcow2 layer, from its header alone."""
    try:
        fd = sysio.open_file(path, os.O_RDONLY)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        header = read_qcow2_header(fd, path, sysio.file_size(fd, path))
    finally:
        os.close(fd)
    info = _qcow2_entry(path, header, st.st_blocks * 512)
    if header.backing_name is not None:
        full = resolve_name(header.backing_name, path)
        ChainGuard(root=backing_root).check_path(full)
        info["backing-filename"] = os.fsdecode(header.backing_name)
        info["full-backing-filename"] = full
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
    return info


def remote_qcow2_info(path: str, guard: ChainGuard, shown: str) -> dict[str, Any]:
    """What ``qemu-img info`` says of the qcow2 golden image behind the URI that the
    image at ``path`` records: its header, read over the network under the pin
    and the URI policy (``guard``). ``shown`` names it."""
    fd = open_metafile(path, writable=False)
    try:
        header = read_header(fd, path)
    finally:
        os.close(fd)
    if header.backing_name is None or not header.backing_uri:
        raise ImageFileError(f"{path}: the backing URI changed while it was described")
    golden = remote.open_remote(remote.BackingURI.decode(header.backing_name), "qcow2", guard=guard)
    try:
        assert isinstance(golden, Qcow2File)
        return _qcow2_entry(shown, golden.header)
    finally:
        golden.close()


def _qcow2_entry(
    filename: str, header: Qcow2Header, actual_size: int | None = None
) -> dict[str, Any]:
    """The fields ``qemu-img info`` shows for a qcow2 file with ``header``; a file
    read over a URI has no ``actual-size``."""
    info: dict[str, Any] = {"filename": filename, "format": "qcow2"}
    info["virtual-size"] = header.virtual_size
    if actual_size is not None:
        info["actual-size"] = actual_size
    info |= {
        "cluster-size": header.cluster_size,
        "dirty-flag": bool(header.incompatible_features & QCOW2_INCOMPAT_DIRTY),
    }
    data: dict[str, Any] = {
        "compat": "0.10" if header.version == 2 else "1.1",
        "compression-type": header.compression,
    }
    if header.version >= 3:  # version 2 has no feature bits, and qemu-img shows none
        data["lazy-refcounts"] = bool(header.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS)
    data["refcount-bits"] = 1 << header.refcount_order
    if header.version >= 3:
        data["corrupt"] = bool(header.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
        data["extended-l2"] = header.extended_l2
    info["format-specific"] = {"type": "qcow2", "data": data}
    return info


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageFileError(f"{path}: {exc.strerror}") from exc


def _size(header: Header, image_stat: os.stat_result | None, image_path: str) -> int:
    if header.image_size is not None:
        return header.image_size
    if image_stat is None:
        raise ImageFileError(
            f"{image_path}: image file not found (a version 1 image's size is its image "
            "file's size)"
        )
    return virtual_size(header, image_stat.st_size, image_path)


def _names(bits: int, known: dict[int, str]) -> list[str]:
    names = [name for bit, name in sorted(known.items()) if bits & bit]
    unknown = bits & ~sum(known)
    if unknown:
        names.append(hex(unknown))
    return names
