"""``addcow map``: which layer holds each range (qemu-img map).

Every range of data is shown, also one with no offset in a local file: the
human table says ``-`` there and why (``compressed``: a qcow2 layer's
compressed clusters; ``remote``: a layer read over NBD or HTTP), where
``qemu-img map`` refuses the whole image. The JSON is qemu-img's, with
``"compressed": true`` on the compressed ranges (as QEMU 8.2 and later say).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..image import AddCowImage
from ..stores import remote
from .common import add_backing_root_arg, add_output_arg, print_json, size_arg


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("map", help="show where each range of the disk is stored")
    add_output_arg(p)
    p.add_argument("-s", "--start-offset", type=size_arg, default=0)
    p.add_argument("-l", "--max-length", type=size_arg, default=None)
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    add_backing_root_arg(p)
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("filename")
    p.set_defaults(func=run)


def map_entries(image: AddCowImage, start: int, length: int) -> list[dict[str, Any]]:
    """qemu-img map JSON entries for [start, start+length), adjacent equals merged."""
    entries: list[dict[str, Any]] = []
    for ext in image.block_status(start, length):
        entry: dict[str, Any] = {
            "start": ext.offset,
            "length": ext.length,
            "depth": ext.depth,
            "present": ext.present,
            "zero": ext.zero,
            "data": ext.data,
        }
        if ext.host_offset is not None:
            entry["offset"] = ext.host_offset
        if ext.compressed:
            entry["compressed"] = True
        if entries and _continues(entries[-1], entry):
            entries[-1]["length"] += ext.length
        else:
            entries.append(entry)
    return entries


def _continues(prev: dict[str, Any], new: dict[str, Any]) -> bool:
    for key in ("depth", "present", "zero", "data", "compressed"):
        if prev.get(key) != new.get(key):
            return False
    if ("offset" in prev) != ("offset" in new):
        return False
    return "offset" not in prev or prev["offset"] + prev["length"] == new["offset"]


def run(args: argparse.Namespace) -> int:
    with AddCowImage.open(
        args.filename,
        readonly=True,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    ) as image:
        start = min(args.start_offset, image.size)
        length = image.size - start
        if args.max_length is not None:
            length = min(length, args.max_length)
        entries = map_entries(image, start, length)
        files = _layer_files(image)
    if args.output == "json":
        print_json(entries)
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in entries:
        if not e["data"]:
            continue
        name = files[e["depth"]] if e["depth"] < len(files) else "?"
        if "offset" in e:
            print(f"{e['start']:<#16x}{e['length']:<#16x}{e['offset']:<#16x}{name}")
        else:
            why = "compressed" if e.get("compressed") else "remote"
            print(f"{e['start']:<#16x}{e['length']:<#16x}{'-':<16}{name} ({why})")
    return 0


def _layer_files(image: AddCowImage) -> list[str]:
    """The file that holds each depth's data: image file, then each backing's."""
    files: list[str] = []
    layer: object = image
    while layer is not None:
        if isinstance(layer, AddCowImage):
            files.append(layer.image_path)
        elif hasattr(layer, "path"):
            files.append(str(layer.path))
        else:  # a remote store: its URI as it may be shown
            files.append(remote.shown(str(getattr(layer, "url", getattr(layer, "uri", "?")))))
        layer = getattr(layer, "backing", None)
    return files
