"""``addcow stream``, ``detach`` and ``commit``: finishing with a standalone disk."""

from __future__ import annotations

import argparse
import sys

from ..image import AddCowImage
from ..lifecycle import commit, detach, stream
from ..units import human_size
from .common import add_backing_root_arg, size_arg
from .progress import progress_bar


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stream",
        help="copy every cluster still in the backing file into the image file",
        description="Copy every unallocated cluster from the backing chain into the image "
        "file, then mark the image complete. Safe to interrupt and run again.",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument(
        "--rate",
        type=size_arg,
        help="limit to about this many bytes per second read from the backing "
        "(holes and zero ranges cost nothing)",
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="no summary line")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run_stream)

    p = sub.add_parser(
        "detach",
        help="remove the .add-cow file of a complete image, leaving a standalone raw disk",
    )
    p.add_argument("--dry-run", action="store_true", help="check only; remove nothing")
    p.add_argument(
        "--keep-backing",
        action="store_true",
        help="keep the backing file (always the case: detach never removes a backing "
        "file, which other images may share; the flag is accepted for scripts that say so)",
    )
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run_detach)

    p = sub.add_parser(
        "commit",
        help="write the image's allocated clusters into its backing file",
        description="Write every allocated cluster into the backing file (raw or add-cow), "
        "which then holds the combined content. The image stays valid and unchanged.",
    )
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run_commit)


def run_stream(args: argparse.Namespace) -> int:
    with (
        AddCowImage.open(
            args.filename, backing_root=args.backing_root, allowed_uris=args.allow_backing_uri
        ) as image,
        progress_bar(image.unallocated_bytes, args.progress, "stream") as update,
    ):
        stats = stream(image, rate=args.rate, progress=update)
    if not args.quiet:
        print(
            f"streamed {args.filename}: {human_size(stats.copied)} copied, "
            f"{human_size(stats.zero)} left as zero, {stats.seconds:.2f} s",
            file=sys.stderr,
        )
    return 0


def run_detach(args: argparse.Namespace) -> int:
    image = AddCowImage.open(
        args.filename, backing_root=args.backing_root, allowed_uris=args.allow_backing_uri
    )
    try:
        raw = detach(image, dry_run=args.dry_run)
    finally:
        image.close()
    if args.dry_run:
        print(f"{args.filename} is complete; detach would leave the raw disk {raw}")
    else:
        print(raw)
    return 0


def run_commit(args: argparse.Namespace) -> int:
    with AddCowImage.open(
        args.filename,
        readonly=True,
        with_backing=False,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    ) as image:
        total = image.allocated_clusters << image.cluster_bits
        with progress_bar(total, args.progress, "commit") as update:
            commit(image, progress=update)
    if not args.quiet:
        print("Image committed.")
    return 0
