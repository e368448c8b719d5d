"""Helpers shared by the command modules: sizes, -o option lists, output."""

from __future__ import annotations

import argparse
import sys
from typing import Any

_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}


class CommandError(Exception):
    """A mistake on the command line, reported as one line like library errors."""


def parse_size(text: str) -> int:
    """A size with qemu's optional suffix: k, M, G, T, P, E (powers of 1024)."""
    raw = text.strip()
    suffix = raw[-1:].lower() if raw[-1:].isalpha() else ""
    number = raw[: len(raw) - len(suffix)] if suffix else raw
    if suffix not in _SUFFIXES:
        raise CommandError(f"invalid size {text!r}: unknown suffix {raw[-1]!r} (use k, M, G, T)")
    try:
        value = float(number) if "." in number else int(number, 0)
    except ValueError:
        raise CommandError(f"invalid size {text!r}") from None
    result = int(value * _SUFFIXES[suffix])
    if result < 0 or (isinstance(value, float) and result != value * _SUFFIXES[suffix]):
        raise CommandError(f"invalid size {text!r}: must be a whole, non-negative byte count")
    return result


def size_arg(text: str) -> int:
    """argparse type for sizes."""
    try:
        return parse_size(text)
    except CommandError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_options(values: list[str] | None, known: set[str]) -> dict[str, str]:
    """Merge ``-o key=value,key=value`` options, refusing unknown keys."""
    options: dict[str, str] = {}
    for value in values or []:
        for item in value.split(","):
            if not item:
                continue
            key, sep, val = item.partition("=")
            if not sep:
                raise CommandError(f"invalid option {item!r}: expected key=value")
            if key not in known:
                raise CommandError(
                    f"unknown option {key!r}: expected one of {', '.join(sorted(known))}"
                )
            options[key] = val
    return options


def print_json(value: Any) -> None:
    import json  # only here: it costs every command's start 3 ms

    json.dump(value, sys.stdout, indent=4)
    sys.stdout.write("\n")


def add_backing_root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backing-root",
        metavar="DIR",
        help="refuse any file the image names (image file, backing chain) outside DIR",
    )


def add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format"
    )
