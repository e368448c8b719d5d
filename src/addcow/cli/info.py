"""``addcow info``: what an image is, read from its header (qemu-img info)."""

from __future__ import annotations

import argparse
from typing import Any

from ..info import backing_chain_info, image_info
from ..units import human_size
from .common import add_backing_root_arg, add_output_arg, print_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", help="show information about an image")
    add_output_arg(p)
    p.add_argument("--backing-chain", action="store_true", help="also show every backing file")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    add_backing_root_arg(p)
    p.add_argument("filename")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.backing_chain:
        chain = backing_chain_info(
            args.filename,
            force_share=args.force_share,
            backing_root=args.backing_root,
            allowed_uris=args.allow_backing_uri,
        )
        if args.output == "json":
            print_json(chain)
        else:
            print("\n\n".join(human(entry) for entry in chain))
        return 0
    info = image_info(
        args.filename,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    if args.output == "json":
        print_json(info)
    else:
        print(human(info))
    return 0


def human(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
    ]
    if "actual-size" in info:  # a golden image read over a URI has none
        lines.append(f"disk size: {human_size(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(
            f"backing file: {info['backing-filename']} "
            f"(actual path: {info['full-backing-filename']})"
        )
        lines.append(
            f"backing file format: {info.get('backing-filename-format', '(not recorded)')}"
        )
    specific = info.get("format-specific")
    if specific and specific["type"] == "qcow2":
        lines.append("Format specific information:")
        for key, value in specific["data"].items():
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {shown}")
    elif specific:
        data = specific["data"]
        lines.append("Format specific information:")
        allocated, total = data["allocated-clusters"], data["total-clusters"]
        percent = 100.0 * allocated / total if total else 100.0
        lines.append(f"    version: {data['version']}")
        lines.append(
            f"    image file: {data['image-file']} (actual path: {data['full-image-file']})"
        )
        lines.append(f"    allocated clusters: {allocated}/{total} ({percent:.2f}%)")
        lines.append(f"    complete: {str(data['complete']).lower()}")
        for key in (
            "features",
            "incompatible-features",
            "compatible-features",
            "autoclear-features",
        ):
            if key in data:
                lines.append(f"    {key}: {', '.join(data[key]) or 'none'}")
    return "\n".join(lines)
