"""``addcow rebase``, ``resize`` and ``amend``: changing an image's backing, size or version."""

from __future__ import annotations

import argparse

from ..image import AddCowImage
from ..lifecycle import amend, rebase
from .common import CommandError, add_backing_root_arg, add_options_arg, parse_options, parse_size
from .progress import progress_bar

AMEND_OPTIONS = {"compat": "the header version to convert to, 1 or 2"}
"""The -o options of ``amend`` (``-o help`` prints them)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rebase",
        help="change the backing file",
        description="Change the backing file. Safe mode (default) first copies into the "
        "image every cluster whose content would change; -u only rewrites the name. "
        "-b '' removes the backing file.",
    )
    p.add_argument("-u", dest="unsafe", action="store_true", help="only change the name")
    p.add_argument("-b", dest="backing", required=True, help="new backing file ('' for none)")
    p.add_argument("-F", dest="backing_fmt", help="new backing format: raw, add-cow or qcow2")
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run_rebase)

    p = sub.add_parser("resize", help="change the virtual size")
    p.add_argument("--shrink", action="store_true", help="allow shrinking (drops the tail)")
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.add_argument("size", help="new size, or +SIZE / -SIZE relative to the current one")
    p.set_defaults(func=run_resize)

    p = sub.add_parser("amend", help="convert between header versions (-o compat=1|2)")
    add_options_arg(p, AMEND_OPTIONS, required=True)
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run_amend)


def run_rebase(args: argparse.Namespace) -> int:
    backing = args.backing or None
    if backing is None and args.backing_fmt:
        raise CommandError("-F needs a backing file (-b)")
    if args.unsafe:
        with AddCowImage.open(
            args.filename,
            with_backing=False,
            backing_root=args.backing_root,
            allowed_uris=args.allow_backing_uri,
        ) as image:
            image.set_backing(backing, args.backing_fmt)
        return 0
    with AddCowImage.open(
        args.filename, backing_root=args.backing_root, allowed_uris=args.allow_backing_uri
    ) as image:
        todo = (image.total_clusters - image.allocated_clusters) << image.cluster_bits
        with progress_bar(todo, args.progress, "rebase") as update:
            rebase(image, backing, args.backing_fmt, progress=update)
    return 0


def run_resize(args: argparse.Namespace) -> int:
    text: str = args.size
    with AddCowImage.open(
        args.filename, backing_root=args.backing_root, allowed_uris=args.allow_backing_uri
    ) as image:
        if text[:1] in "+-":
            delta = parse_size(text[1:])
            new_size = image.size + delta if text[0] == "+" else image.size - delta
        else:
            new_size = parse_size(text)
        image.resize(new_size, shrink=args.shrink)
    if not args.quiet:
        print("Image resized.")
    return 0


def run_amend(args: argparse.Namespace) -> int:
    options = parse_options(args.options, AMEND_OPTIONS)
    if "compat" not in options:
        raise CommandError("amend needs -o compat=1 or -o compat=2")
    compat = options["compat"]
    if compat not in ("1", "2"):
        raise CommandError(f"invalid compat {compat!r}: expected 1 or 2")
    with AddCowImage.open(
        args.filename,
        with_backing=False,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    ) as image:
        amend(image, int(compat))
    return 0
