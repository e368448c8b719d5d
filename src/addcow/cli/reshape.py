"""``addcow rebase``, ``resize`` and ``amend``: changing an image's backing, size or version."""

from __future__ import annotations

import argparse

from ..errors import RemoteChangedError
from ..image import AddCowImage
from ..lifecycle import amend, rebase, repin
from ..stores import remote
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
    p.add_argument(
        "--backing-sha256",
        metavar="HEX",
        help="for a backing URI: the SHA-256 the whole golden image must have (read "
        "and checked, then recorded); a safe re-pin of a golden image whose ETag changed "
        "checks it against the one recorded",
    )
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
    if backing is not None and remote.scheme_of(backing) is not None:
        return _rebase_onto_uri(args, backing)
    if args.backing_sha256 is not None:
        raise CommandError("--backing-sha256 is for a backing URI")
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


def _rebase_onto_uri(args: argparse.Namespace, uri: str) -> int:
    """Safe: compare with the old golden image where it can still be read, else check
    the recorded sha256 (:func:`addcow.lifecycle.repin`); -u: re-pin unchecked."""
    sha256 = None
    if args.backing_sha256 is not None:
        sha256 = remote.check_sha256(args.backing_sha256)
    where = {"backing_root": args.backing_root, "allowed_uris": args.allow_backing_uri}
    why = ""
    if not args.unsafe:
        try:
            image = AddCowImage.open(args.filename, **where)
        except RemoteChangedError as exc:
            why = str(exc)  # the old pin no longer holds: only a digest can vouch
        else:
            with image:
                todo = (image.total_clusters - image.allocated_clusters) << image.cluster_bits
                with progress_bar(todo, args.progress, "rebase") as update:
                    rebase(image, uri, args.backing_fmt, progress=update, backing_sha256=sha256)
            return 0
    with AddCowImage.open(args.filename, with_backing=False, **where) as image:
        repin(image, uri, args.backing_fmt, unsafe=args.unsafe, sha256=sha256, why=why)
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
