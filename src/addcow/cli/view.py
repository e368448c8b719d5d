"""``addcow view`` and ``addcow fold``: QEMU on an add-cow image through a qcow2 view."""

from __future__ import annotations

import argparse
import sys

from ..view import fold_view, make_view
from .common import add_backing_root_arg


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "view",
        help="write a qcow2 view of the image, for QEMU to use it natively",
        description="Write VIEW, a small qcow2 file (metadata only) whose external data "
        "file is the image file and whose backing is the image's, and record it in the "
        "image: QEMU, qemu-img and qemu-nbd then use the disk as a qcow2 image, and every "
        "addcow command refuses the image until 'addcow fold' takes the view back.",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing VIEW file (never one in use or one of the image's own)",
    )
    p.add_argument("filename")
    p.add_argument("view")
    add_backing_root_arg(p)
    p.set_defaults(func=run_view)

    p = sub.add_parser(
        "fold",
        help="take what QEMU wrote through the image's qcow2 view back, and remove the view",
        description="Read the view's tables, set the bits of the clusters QEMU wrote, "
        "punch its zero clusters, then remove the view. Safe to interrupt and run again.",
    )
    p.add_argument(
        "--forget",
        action="store_true",
        help="the view file is gone: drop the view record without folding (what QEMU "
        "wrote through the view is then not in the image)",
    )
    p.add_argument("-q", dest="quiet", action="store_true", help="no summary line")
    p.add_argument("filename")
    p.set_defaults(func=run_fold)


def run_view(args: argparse.Namespace) -> int:
    make_view(
        args.filename,
        args.view,
        force=args.force,
        backing_root=args.backing_root,
        allowed_uris=tuple(args.allow_backing_uri),
    )
    print(f"{args.view}: qcow2 view of {args.filename}; run 'addcow fold {args.filename}' "
          "when QEMU is done with it")  # fmt: skip
    return 0


def run_fold(args: argparse.Namespace) -> int:
    stats = fold_view(args.filename, forget=args.forget)
    if not args.quiet:
        if stats.folded:
            print(
                f"folded {stats.view} into {args.filename}: {stats.data} clusters written, "
                f"{stats.zero} zeroed, {stats.kept} kept",
                file=sys.stderr,
            )
        else:
            print(f"removed the view {stats.view} of {args.filename}", file=sys.stderr)
    return 0
