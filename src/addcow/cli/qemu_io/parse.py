"""qemu-io's argument syntax: sizes with suffixes, ``-P`` pattern bytes, getopt.

Each helper reads its text the way qemu-io's C code does, so that a command
line qemu-io refuses is refused here too, with the same message.
"""

from __future__ import annotations

import errno
import re

from ..common import CommandError, parse_size

INT64_MAX = 2**63 - 1

EINVAL_TEXT = "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {}"
ERANGE_TEXT = "Parsing error: argument too large -- {}"


def cvtnum(text: str) -> int:
    """A size like qemu-io's cvtnum, or -errno (EINVAL, ERANGE) when it is not one."""
    # parse_size reads "010" as an octal mistake; qemu's parser reads decimal 10.
    match = re.fullmatch(r"0+(\d.*)", text)
    try:
        value = parse_size(match.group(1) if match else text)
    except CommandError:
        return -errno.EINVAL
    if value > INT64_MAX:
        return -errno.ERANGE
    return value


def parse_pattern(text: str) -> int | None:
    """The byte of ``-P``: C strtol(text, &end, 0), refused unless 0..255 and fully used."""
    s = text.lstrip(" \t\n\r\f\v")
    m = re.match(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    if m is None:
        return 0 if text == "" else None  # strtol("") is 0 with nothing left over
    if m.end() != len(s):
        return None
    digits = m.group(1)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if s.startswith("-"):
        value = -value
    return value if 0 <= value <= 255 else None


def getopt(name: str, args: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU getopt with argument permutation, as qemu-io's commands use it.

    Returns the options in order, then the operands. A bad option becomes the
    pair ``("?", message)`` at its place; processing must stop there.
    """
    takes_arg = {c for i, c in enumerate(optstring) if optstring[i + 1 : i + 2] == ":"}
    known = set(optstring.replace(":", ""))
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c not in known:
                opts.append(("?", f"{name}: invalid option -- '{c}'"))
                return opts, operands
            if c in takes_arg:
                if j < len(arg):
                    opts.append((c, arg[j:]))
                elif i < len(args):
                    opts.append((c, args[i]))
                    i += 1
                else:
                    opts.append(("?", f"{name}: option requires an argument -- '{c}'"))
                    return opts, operands
                break
            opts.append((c, ""))
    return opts, operands
