"""Entry point: parse the command line, run one command, turn errors into one line.

Each command module exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed arguments and returning the exit
status. Errors from the library (``AddCowError``) and from the operating system
become one line on stderr starting with ``addcow:`` and exit status 1 (or the
command's own error status, such as 2 for ``check`` and ``compare``); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import AddCowError, LockError
from ..version import __version__
from .common import CommandError

COMMANDS = {
    # command -> the module (in addcow.cli) that registers it
    "amend": "reshape",
    "check": "check",
    "commit": "lifecycle",
    "compare": "convert",
    "control": "status",
    "convert": "convert",
    "create": "create",
    "detach": "lifecycle",
    "fold": "view",
    "info": "info",
    "io": "io",
    "map": "mapping",
    "rebase": "reshape",
    "resize": "reshape",
    "serve": "serve",
    "status": "status",
    "stream": "lifecycle",
    "view": "view",
}
"""Only the module of the command being run is imported (``serve`` pulls in
asyncio, for example), so short commands start fast."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``addcow:`` line and exit status 1, like qemu-img.

    (argparse's own status 2 would read as "corruptions found" from ``check``.)
    Options are never abbreviated: ``--force`` must not be taken for
    ``--force-share`` where only the latter exists.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"addcow: {message} (try '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(1)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` alone, or for every command when None."""
    parser = _Parser(
        prog="addcow",
        description="Create, inspect and use add-cow disk images (qemu-img style).",
    )
    parser.add_argument("--version", action="version", version=f"addcow {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [COMMANDS[command]] if command in COMMANDS else sorted(set(COMMANDS.values()))
    for name in names:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command word of a command line (the first argument not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _negative_size_last(argv: list[str]) -> list[str]:
    """``resize FILE -16M``: the last argument is the size, even when it starts with '-'.

    qemu-img resize takes the size out of argv before parsing options, so that
    a negative size is not read as an option; ending the options before it
    does the same here.
    """
    last = argv[-1] if len(argv) >= 3 else ""
    if last[:1] == "-" and last[1:2].isdigit() and "--" not in argv:
        return [*argv[:-1], "--", last]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _command_in(argv) == "resize":
        argv = _negative_size_last(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        # File names are bytes: print them as they are (as qemu-img does), even
        # when they are not valid in the locale's encoding.
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(argv)  # may print: --help, --version, -o help
    except BrokenPipeError:
        return _reader_gone()
    error_status: int = getattr(args, "error_status", 1)
    try:
        status: int = args.func(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _reader_gone()
    except (AddCowError, CommandError, OSError) as exc:
        if args.debug:
            import traceback  # only here: importing it slows every command's start

            traceback.print_exc()
        if isinstance(exc, LockError) and not hasattr(args, "force_share"):
            exc.hint = None  # it offers -U, which this command does not take
        message = str(exc) if not isinstance(exc, OSError) else _os_message(exc)
        print(f"addcow: {one_line(message)}", file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print("addcow: interrupted", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """The reader of stdout went away (addcow map | head): not an error of ours.

    What is still buffered goes to /dev/null, so the flush at exit is quiet too.
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def one_line(message: str) -> str:
    """A message as one printable line: control characters and undecodable bytes escaped.

    Messages quote file names taken from images, which may hold newlines (to forge
    a second line) or bytes that are not text.
    """
    text = message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _os_message(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc.strerror or exc)
