"""``addcow create``: a new add-cow image (qemu-img create -f add-cow)."""

from __future__ import annotations

import argparse
import os

from ..create import create
from ..stores.remote import shown
from .common import CommandError, add_options_arg, parse_options, parse_size, size_arg

OPTIONS = {
    "image_file": "the raw file that holds the data (default: FILE without .add-cow, plus .raw)",
    "image_file_raw": "on: the named image_file's content is the disk (its data clusters "
    "start allocated); needed for an image file that holds data",
    "backing_file": "file name of the backing image (as -b)",
    "backing_fmt": "format of the backing image, raw, add-cow or qcow2 (as -F)",
    "cluster_size": "cluster size, a power of two from 4k to 1G (default 64k)",
    "compat": "header version, 1 or 2 (default 2)",
}
"""The -o options of ``create`` (``-o help`` prints them)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "create",
        help="create an add-cow image",
        description="Create an add-cow image whose data lives in a raw image file. "
        "Options (-o; -o help lists them): image_file, image_file_raw, backing_file, "
        "backing_fmt, cluster_size, compat=1|2.",
    )
    p.add_argument("-f", dest="fmt", default="add-cow", help="image format (only add-cow)")
    p.add_argument("-b", dest="backing", help="backing file")
    p.add_argument("-F", dest="backing_fmt", help="backing file format: raw, add-cow or qcow2")
    add_options_arg(p, OPTIONS)
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument(
        "--force", action="store_true", help="replace an existing file at FILE (not its image file)"
    )
    p.add_argument("filename")
    p.add_argument("size", nargs="?", type=size_arg)
    p.set_defaults(func=run)


def default_image_file(filename: str) -> str:
    """disk.add-cow -> disk.raw (in the same directory, stored relative)."""
    base = os.path.basename(filename)
    stem = base[: -len(".add-cow")] if base.endswith(".add-cow") else base
    return stem + ".raw"


def on_off(name: str, value: str) -> bool:
    """An on/off option value, as QEMU spells them."""
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise CommandError(f"invalid {name} {value!r}: expected on or off")


def run(args: argparse.Namespace) -> int:
    if args.fmt != "add-cow":
        raise CommandError(f"unsupported format {args.fmt!r}: addcow creates add-cow images")
    opts = parse_options(args.options, OPTIONS)
    backing = args.backing if args.backing is not None else opts.get("backing_file")
    backing_fmt = args.backing_fmt or opts.get("backing_fmt")
    compat = opts.get("compat", "2")
    if compat not in ("1", "2"):
        raise CommandError(f"invalid compat {compat!r}: expected 1 or 2")
    cluster_size = parse_size(opts.get("cluster_size", "64k"))
    image_file = opts.get("image_file")
    image_file_raw = on_off("image_file_raw", opts.get("image_file_raw", "off"))
    if image_file is None:
        if image_file_raw:
            raise CommandError(
                "image_file_raw=on needs the image file named explicitly with -o image_file=NAME"
            )
        image_file = default_image_file(args.filename)
        target = os.path.join(os.path.dirname(args.filename), image_file)
        if os.path.lexists(target):
            raise CommandError(
                f"{target} exists; name the image file explicitly with -o image_file={image_file}"
            )
    if backing == "":
        backing = None
    created = create(
        args.filename,
        image_file=image_file,
        backing_file=backing,
        backing_format=backing_fmt,
        size=args.size,
        cluster_size=cluster_size,
        version=int(compat),
        force=args.force,
        image_file_raw=image_file_raw,
    )
    if not args.quiet:
        parts = [f"Formatting '{args.filename}', fmt=add-cow"]
        if args.size is not None:
            parts.append(f"size={args.size}")
        if backing:
            parts.append(f"backing_file={shown(backing)}")
        parts.append(f"image_file={image_file}")
        parts.append(f"cluster_size={cluster_size} compat={compat}")
        print(" ".join(parts))
    if image_file_raw and not args.quiet:
        print(
            f"image_file_raw: {created.allocated} of {created.clusters} clusters hold data "
            f"in {image_file} and are marked allocated"
        )
    return 0
