"""``addcow check``: validate an image, optionally repair it (qemu-img check).

Output follows qemu-img: one line per finding on stderr ("ERROR ...",
"Leak ...", "Repairing ..."), the summary on stdout (human text, or JSON with
qemu-img's field names). Exit status: 0 clean or fully repaired, 1 the check
could not be completed, 2 corruptions remain, 3 only leaks remain.
"""

from __future__ import annotations

import argparse
import sys

from ..check import REPAIR_MODES, CheckResult, check_image
from .common import CommandError, add_backing_root_arg, add_output_arg, print_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="check an image for errors, optionally repair them",
        description="Check an add-cow image against the specification. Exit status: "
        "0 no errors, 1 check not completed, 2 corruptions, 3 leaks only.",
    )
    add_output_arg(p)
    p.add_argument(
        "-r",
        dest="repair",
        choices=REPAIR_MODES,
        help="repair leaks only, or all errors that can be repaired without guessing",
    )
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    p.add_argument("-f", dest="fmt", choices=("add-cow",), help="image format (add-cow)")
    p.add_argument("-q", dest="quiet", action="store_true", help="print nothing on stdout")
    p.add_argument("filename")
    add_backing_root_arg(p)
    p.set_defaults(func=run, error_status=1)


def run(args: argparse.Namespace) -> int:
    if args.repair and args.force_share:
        raise CommandError("-U cannot be used with -r: a repair needs the image's write lock")
    result = check_image(
        args.filename,
        repair=args.repair,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    for line in result.messages:
        print(line, file=sys.stderr)
    if not args.quiet:
        if args.output == "json":
            print_json(result.to_json())
        else:
            print(human(result))
    if result.check_errors:
        print("addcow: check failed", file=sys.stderr)
    return result.exit_status


def human(result: CheckResult) -> str:
    """The summary qemu-img check prints, for an add-cow image."""
    lines: list[str] = []
    if result.corruptions_fixed or result.leaks_fixed:
        lines += [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {result.leaks_fixed} leaked clusters",
            f"    {result.corruptions_fixed} corruptions",
            "",
            "Double checking the fixed image now...",
        ]
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    if result.corruptions:
        lines += [
            "",
            f"{result.corruptions} errors were found on the image.",
            "Data may be corrupted, or further writes to the image may corrupt it.",
        ]
    if result.leaks:
        lines += [
            "",
            f"{result.leaks} leaked clusters were found on the image.",
            "This means waste of disk space, but no harm to data.",
        ]
    if result.check_errors:
        lines += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters:
        percent = 100.0 * result.allocated_clusters / result.total_clusters
        lines.append(
            f"{result.allocated_clusters}/{result.total_clusters} = {percent:.2f}% allocated"
        )
    lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines)
