"""``addcow convert`` and ``addcow compare`` (qemu-img convert / compare)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..copy import copy_to_addcow, copy_to_raw, first_difference, open_source
from ..create import create
from ..image import AddCowImage
from ..stores import BlockSource, registry
from .common import CommandError, add_backing_root_arg, add_options_arg, parse_options, parse_size
from .progress import progress_bar

_OUTPUT_FORMATS = ("add-cow", "raw")
_FORMAT_RULE = (
    "Without -f (and -F for compare's second image) a name ending in .add-cow is an "
    "add-cow image and any other is raw; a raw file that starts with an image header "
    "is refused until -f says which it is."
)

CONVERT_OPTIONS = {
    "image_file": "-O add-cow: the new raw file that holds the data (required)",
    "cluster_size": "-O add-cow: cluster size, a power of two from 4k to 1G (default 64k)",
    "compat": "-O add-cow: header version, 1 or 2 (default 2)",
}
"""The -o options of ``convert`` (``-o help`` prints them)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert",
        help="write an image's whole content to a raw file",
        description=f"Copy the whole virtual disk of SOURCE to TARGET. {_FORMAT_RULE}",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-f", dest="src_fmt", choices=registry.names(), help="source format")
    p.add_argument(
        "-O", dest="dst_fmt", default="raw", choices=_OUTPUT_FORMATS, help="output format"
    )
    add_options_arg(p, CONVERT_OPTIONS)
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a TARGET that starts with an image header (never one in use)",
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("source")
    add_backing_root_arg(p)
    p.add_argument("target")
    p.set_defaults(func=run_convert)

    p = sub.add_parser(
        "compare",
        help="compare the content of two images",
        description=f"Compare the virtual disks of two images. {_FORMAT_RULE}",
    )
    p.add_argument("-s", dest="strict", action="store_true", help="strict: sizes must match")
    p.add_argument("-f", dest="fmt1", choices=registry.names(), help="format of the first image")
    p.add_argument("-F", dest="fmt2", choices=registry.names(), help="format of the second image")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("image1")
    add_backing_root_arg(p)
    p.add_argument("image2")
    p.set_defaults(func=run_compare, error_status=2)


def run_convert(args: argparse.Namespace) -> int:
    options = parse_options(args.options, CONVERT_OPTIONS)
    if args.dst_fmt == "raw" and options:
        raise CommandError("-o options apply to -O add-cow only")
    if args.dst_fmt == "add-cow" and "image_file" not in options:
        raise CommandError("-O add-cow needs -o image_file=PATH for the new raw image file")
    src = open_source(
        args.source,
        args.src_fmt,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    try:
        with progress_bar(src.size, args.progress, "convert") as update:
            if args.dst_fmt == "raw":
                copy_to_raw(src, args.target, progress=update, force=args.force)
            else:
                _convert_to_addcow(src, args.target, options, update, args.force)
    finally:
        src.close()
    return 0


def _convert_to_addcow(
    src: BlockSource,
    target: str,
    options: dict[str, str],
    update: Callable[[int], None] | None,
    force: bool,
) -> None:
    image_file = options["image_file"]
    image_path = os.path.join(os.path.dirname(target), image_file)
    if os.path.exists(image_path) and os.path.getsize(image_path) > 0:
        raise CommandError(f"{image_path} exists; convert writes a new image file")
    create(
        target,
        image_file=image_file,
        size=src.size,
        cluster_size=parse_size(options.get("cluster_size", "64k")),
        version=int(options.get("compat", "2")),
        force=force,
    )
    with AddCowImage.open(target) as dst:
        copy_to_addcow(src, dst, progress=update)


def run_compare(args: argparse.Namespace) -> int:
    a = open_source(
        args.image1,
        args.fmt1,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    try:
        b = open_source(
            args.image2,
            args.fmt2,
            force_share=args.force_share,
            backing_root=args.backing_root,
            allowed_uris=args.allow_backing_uri,
        )
        try:
            if a.size != b.size:
                if args.strict:
                    _say(args, "Strict mode: Image size mismatch!")
                    return 1
                print("Warning: Image size mismatch!", file=sys.stderr)
            with progress_bar(max(a.size, b.size), args.progress, "compare") as update:
                offset = first_difference(a, b, progress=update)
        finally:
            b.close()
    finally:
        a.close()
    if offset is None:
        _say(args, "Images are identical.")
        return 0
    _say(args, f"Content mismatch at offset {offset}!")
    return 1


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message)
