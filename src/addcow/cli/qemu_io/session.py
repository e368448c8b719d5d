"""One qemu-io session: an open image, the command table, and how text is printed.

``Session.run_line`` splits a command line, finds the command by name or
short name, checks its argument count and that a writing command has a
writable image, then calls it. A command reports its own failure on stdout
(``Session.fail``) or stderr (``Session.complain``) and raises ``Failed``;
the session remembers that one failed, for the exit status.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from ...errors import AddCowError, AddCowIOError
from ...image import AddCowImage
from .formatting import cvtstr, tdiv, timestr
from .parse import EINVAL_TEXT, ERANGE_TEXT, cvtnum, parse_pattern


class Failed(Exception):
    """A command failed after printing its message (the exit status becomes 1)."""


@dataclass(frozen=True)
class Command:
    """One qemu-io command: its names, argument counts and help text."""

    name: str
    altname: str | None
    func: Callable[[Session, str, list[str]], None]
    argmin: int = 0
    argmax: int = 0  # -1: no maximum
    args: str | None = None
    oneline: str = ""
    help: str | None = None
    writes: bool = False

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}"


class Session:
    """Runs command lines against one open image and remembers whether any failed."""

    def __init__(
        self,
        image: AddCowImage,
        commands: Sequence[Command],
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        debug: bool = False,
    ) -> None:
        self.image = image
        self.commands = commands
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.debug = debug
        self.failed = False
        self.quit = False

    def find(self, name: str) -> Command | None:
        """The command called ``name`` (its name or its short name), if any."""
        for cmd in self.commands:
            if name in (cmd.name, cmd.altname):
                return cmd
        return None

    # -- output ----------------------------------------------------------------

    def say(self, line: str) -> None:
        self.out.write(line + "\n")

    def complain(self, line: str) -> None:
        self.out.flush()
        self.err.write(line + "\n")
        self.err.flush()

    def fail(self, line: str) -> Failed:
        """Print a failure on stdout (as qemu-io does) and return the exception to raise."""
        self.say(line)
        return Failed(line)

    def report(self, op: str, elapsed_ns: int, offset: int, count: int, cflag: bool) -> None:
        """qemu-io's print_report: one request of ``count`` bytes."""
        ts = timestr(elapsed_ns, verbose=cflag)
        rate, ops = tdiv(count, elapsed_ns), tdiv(1, elapsed_ns)
        if cflag:
            self.say(f"{count},1,{ts},{rate:.3f},{ops:.3f}")
            return
        self.say(f"{op} {count}/{count} bytes at offset {offset}")
        self.say(f"{cvtstr(count)}, 1 ops; {ts} ({cvtstr(rate)}/sec and {ops:.4f} ops/sec)")

    # -- dispatch --------------------------------------------------------------

    def run_line(self, line: str) -> bool:
        """Run one command line; return False (and remember it) if it failed."""
        argv = [word for word in line.split(" ") if word]
        if not argv:
            return True
        ok = self.run(argv)
        if not ok:
            self.failed = True
        return ok

    def run(self, argv: list[str]) -> bool:
        name, args = argv[0], argv[1:]
        cmd = self.find(name)
        if cmd is None:
            self.complain(f'command "{name}" not found')
            return False
        n = len(args)
        if n < cmd.argmin or (cmd.argmax != -1 and n > cmd.argmax):
            if cmd.argmax == -1:
                expected = f"at least {cmd.argmin} arguments"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin} arguments"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax} arguments"
            self.complain(f"bad argument count {n} to {name}, expected {expected}")
            return False
        if cmd.writes and self.image.readonly:
            self.complain("addcow: Block node is read-only")
            return False
        try:
            cmd.func(self, name, args)
        except Failed:
            return False
        return True

    def bad_option(self, cmd: Command, message: str) -> Failed:
        self.complain(message)
        return self.fail(cmd.usage())

    def number(self, text: str) -> int:
        value = cvtnum(text)
        if value == -errno.ERANGE:
            raise self.fail(ERANGE_TEXT.format(text))
        if value < 0:
            raise self.fail(EINVAL_TEXT.format(text))
        return value

    def pattern(self, text: str) -> int:
        value = parse_pattern(text)
        if value is None:
            raise self.fail(f"{text} is not a valid pattern byte")
        return value

    def io_error(self, what: str, exc: AddCowError) -> Failed:
        """``read failed: Input/output error`` and friends, from a library error."""
        if self.debug:
            self.complain(f"addcow: {exc}")
            traceback.print_exception(exc, file=self.err)
        return self.fail(f"{what} failed: {strerror(exc)}")


def strerror(exc: AddCowError) -> str:
    """The C strerror text QEMU would print for this library error."""
    code = exc.errno if isinstance(exc, AddCowIOError) and exc.errno else errno.EIO
    return os.strerror(code)
