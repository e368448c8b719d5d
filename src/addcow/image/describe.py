"""What ``addcow info`` shows of an add-cow image, read from its header and
bitmap alone.

The .add-cow file is opened and read; the image file and a backing file are
only *stat*'ed (and checked against the chain's guard first): their content is
never read and no backing file is opened as an image, so describing an
untrusted image cannot make addcow read a file the image names (the lesson of
CVE-2024-4467). A backing URI is described from its record (the pinned size
and validators): nothing is sent over the network.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ImageFileError
from ..format import (
    V1_FEATURES,
    V2_AUTOCLEAR_FEATURES,
    V2_COMPATIBLE_FEATURES,
    V2_INCOMPATIBLE_FEATURES,
    Header,
)
from ..locking import lock_whole
from ..stores import remote
from ..stores.chain import ChainGuard, resolve_name
from .metafile import open_metafile, read_bitmap, read_header, virtual_size


def describe_image(path: str, *, guard: ChainGuard, force_share: bool) -> dict[str, Any]:
    """qemu-img style information about the add-cow image at ``path``.

    A file the image names outside ``guard``'s root is refused (PathPolicyError)
    before it is even stat'ed, and a backing URI unless the guard allows it.
    """
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
        image_stat = stat_or_none(image_path)
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


def stat_or_none(path: str) -> os.stat_result | None:
    """``os.stat(path)``, or None when there is no such file (ImageFileError otherwise)."""
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
