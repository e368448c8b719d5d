"""Helpers shared by the command modules: sizes, -o option lists, output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
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


OptionTable = Mapping[str, str]
"""The -o options of a command: name -> what it sets (shown by ``-o help``)."""


def split_options(value: str) -> list[str]:
    """Split one -o argument at commas; ``,,`` is a literal comma (as in QEMU)."""
    items: list[str] = []
    current: list[str] = []
    pos = 0
    while pos < len(value):
        char = value[pos]
        if char == "," and value[pos + 1 : pos + 2] == ",":
            current.append(",")
            pos += 2
            continue
        if char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        pos += 1
    items.append("".join(current))
    return items


def wants_help(values: list[str] | None) -> bool:
    """True if an -o argument asks for the list of options (``help`` or ``?``)."""
    return any(item in ("help", "?") for v in values or [] for item in split_options(v))


def options_help(known: OptionTable | set[str]) -> str:
    """The ``-o help`` text: one option a line, as qemu-img prints it."""
    table = known if isinstance(known, Mapping) else dict.fromkeys(known, "")
    width = max(len(name) for name in table) + 2
    lines = ["Supported add-cow options:"]
    for name in sorted(table):
        text = table[name]
        lines.append(f"  {name:<{width}}- {text}" if text else f"  {name}")
    return "\n".join(lines)


def parse_options(values: list[str] | None, known: OptionTable | set[str]) -> dict[str, str]:
    """Merge ``-o key=value,key=value`` options, refusing unknown keys.

    ``,,`` in a value is a literal comma (``-o help`` is answered while parsing
    the command line: see :func:`add_options_arg`).
    """
    options: dict[str, str] = {}
    for value in values or []:
        for item in split_options(value):
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


class _OptionsAction(argparse.Action):
    """``-o``: collects its arguments; ``-o help`` lists the options and exits 0
    at once (before argparse asks for the file names)."""

    def __init__(self, *args: Any, table: OptionTable, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        value = str(values)
        if wants_help([value]):
            print(options_help(self.table))
            parser.exit(0)
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(value)
        setattr(namespace, self.dest, items)


def add_options_arg(
    parser: argparse.ArgumentParser, table: OptionTable, *, required: bool = False
) -> None:
    """``-o key=value[,key=value...]`` (repeatable; ``-o help`` lists ``table``)."""
    parser.add_argument(
        "-o",
        dest="options",
        action=_OptionsAction,
        table=table,
        required=required,
        metavar="OPTIONS",
        help="key=value[,key=value...] (',,' is a comma in a value; -o help lists them)",
    )


def print_json(value: Any) -> None:
    import json  # only here: importing it slows every command's start

    json.dump(value, sys.stdout, indent=4)
    sys.stdout.write("\n")


def add_backing_root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backing-root",
        metavar="DIR",
        help="refuse any file the image names (image file, backing chain) outside DIR, "
        "and every backing URI",
    )
    parser.add_argument(
        "--allow-backing-uri",
        action="append",
        default=[],
        metavar="PREFIX",
        help="with --backing-root: allow backing URIs that start with PREFIX (repeatable)",
    )


def add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format"
    )
