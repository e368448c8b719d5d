"""What ``addcow info`` reports: one image, or its whole backing chain.

Each format describes its own files (the ``describe`` of its entry in
:mod:`addcow.stores.registry`) from their headers alone; this module walks a
chain from one description to the next. Inspection opens only the files it
describes and only *stats* the others: no backing file is opened as an image
before it is itself described, so inspecting an untrusted image cannot make
addcow read a file the image names (the lesson of CVE-2024-4467).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .errors import BackingLoopError, ImageFileError
from .image.describe import describe_image, stat_or_none
from .image.metafile import open_metafile, read_header
from .stores import registry, remote
from .stores.chain import MAX_CHAIN_DEPTH, ChainGuard
from .stores.qcow2 import Qcow2File
from .stores.qcow2.describe import entry as qcow2_entry


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
    return describe_image(path, guard=guard, force_share=force_share)


def backing_chain_info(
    path: str,
    *,
    force_share: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """``image_info`` for the image, then what ``qemu-img info`` says of each file
    below it, each described by its format.

    The chain stops at a backing file whose format is not recorded (a version 1
    image without NO_PROBE): its format is never guessed. A raw golden image
    behind a backing URI is described from its pin, without contacting it; a
    qcow2 one is opened, since only its header knows its virtual size.
    """
    guard = ChainGuard(backing_root, allowed_uris)
    chain: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    current: str | None = path
    fmt: str | None = "add-cow"
    while current is not None and fmt is not None:
        st = stat_or_none(current)
        if st is None:
            raise ImageFileError(f"{current}: backing file not found")
        if (st.st_dev, st.st_ino) in seen:
            raise BackingLoopError(f"{current}: backing chain loops")
        if len(seen) > MAX_CHAIN_DEPTH:
            raise BackingLoopError(f"{current}: backing chain deeper than {MAX_CHAIN_DEPTH}")
        seen.add((st.st_dev, st.st_ino))
        describe = registry.get(fmt, current).describe
        entry = describe(current, guard=guard, force_share=force_share)
        chain.append(entry)
        pin = entry.get("format-specific", {}).get("data", {}).get("backing-pin")
        if pin is not None:
            if entry["backing-filename-format"] == "qcow2":
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
        return qcow2_entry(shown, golden.header)
    finally:
        golden.close()
