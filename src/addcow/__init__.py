"""addcow: add-cow disk images (a raw image file plus a backing file).

    import addcow
    addcow.create("disk.add-cow", image_file="disk.raw", backing_file="base.raw")
    with addcow.open("disk.add-cow") as img:
        img.write(b"hello", 0)
        img.read(0, 5)

Every error raised is a subclass of :class:`AddCowError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .create import create
from .errors import (
    AddCowError,
    AddCowIOError,
    AmendError,
    BackingError,
    BackingFormatError,
    BackingLoopError,
    BitmapError,
    ClosedImageError,
    ExistingFileError,
    ForeignFormatError,
    FormatChoiceError,
    HeaderError,
    ImageFileError,
    IncompleteImageError,
    LockError,
    PathPolicyError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2UnsupportedError,
    RangeError,
    ReadOnlyError,
    RemoteAuthError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReadError,
    RemoteReplyError,
    SlowZeroError,
    UnsupportedFeatureError,
    ViewActiveError,
    ViewError,
)
from .format import Header
from .image import AddCowImage
from .stores import Extent
from .stores.chain import MAX_CHAIN_DEPTH
from .version import __version__


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    force_share: bool = False,
    probe_backing: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> AddCowImage:
    """Open an add-cow image.

    ``readonly`` takes a shared lock instead of an exclusive one;
    ``force_share`` takes no lock (inspecting an image in use);
    ``probe_backing`` lets a version 1 image without a recorded backing format
    use the format its backing file appears to have;
    ``backing_root`` refuses (PathPolicyError) any file the image names, its image
    file and every backing file down the chain, that resolves outside that
    directory: for services that open images they did not create; a backing
    URI is then refused unless it starts with one of ``allowed_uris``.
    """
    return AddCowImage.open(
        path,
        readonly=readonly,
        force_share=force_share,
        probe_backing=probe_backing,
        backing_root=backing_root,
        allowed_uris=allowed_uris,
    )


__all__ = [
    "MAX_CHAIN_DEPTH",
    "AddCowError",
    "AddCowIOError",
    "AddCowImage",
    "AmendError",
    "BackingError",
    "BackingFormatError",
    "BackingLoopError",
    "BitmapError",
    "ClosedImageError",
    "ExistingFileError",
    "Extent",
    "ForeignFormatError",
    "FormatChoiceError",
    "Header",
    "HeaderError",
    "ImageFileError",
    "IncompleteImageError",
    "LockError",
    "PathPolicyError",
    "Qcow2CorruptError",
    "Qcow2Error",
    "Qcow2UnsupportedError",
    "RangeError",
    "ReadOnlyError",
    "RemoteAuthError",
    "RemoteBackingError",
    "RemoteChangedError",
    "RemoteReadError",
    "RemoteReplyError",
    "SlowZeroError",
    "UnsupportedFeatureError",
    "ViewActiveError",
    "ViewError",
    "__version__",
    "create",
    "open",
]
