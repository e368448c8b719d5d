"""``addcow convert`` and ``addcow compare`` (qemu-img convert / compare)."""

from __future__ import annotations

import argparse
import sys

from ..copy import copy_to_raw, first_difference, open_source
from .common import CommandError
from .progress import progress_bar

_FORMATS = ("add-cow", "raw")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="write an image's whole content to a raw file")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-f", dest="src_fmt", choices=_FORMATS, help="source format")
    p.add_argument("-O", dest="dst_fmt", default="raw", help="output format (raw)")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("compare", help="compare the content of two images")
    p.add_argument("-s", dest="strict", action="store_true", help="strict: sizes must match")
    p.add_argument("-f", dest="fmt1", choices=_FORMATS, help="format of the first image")
    p.add_argument("-F", dest="fmt2", choices=_FORMATS, help="format of the second image")
    p.add_argument("-p", dest="progress", action="store_true", help="show progress")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("image1")
    p.add_argument("image2")
    p.set_defaults(func=run_compare, error_status=2)


def run_convert(args: argparse.Namespace) -> int:
    if args.dst_fmt != "raw":
        raise CommandError(f"unsupported output format {args.dst_fmt!r}: expected raw")
    src = open_source(args.source, args.src_fmt, force_share=args.force_share)
    try:
        with progress_bar(src.size, args.progress, "convert") as update:
            copy_to_raw(src, args.target, progress=update)
    finally:
        src.close()
    return 0


def run_compare(args: argparse.Namespace) -> int:
    a = open_source(args.image1, args.fmt1, force_share=args.force_share)
    try:
        b = open_source(args.image2, args.fmt2, force_share=args.force_share)
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
