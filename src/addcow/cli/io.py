"""``addcow io``: qemu-io's commands over an add-cow image.

A qemu-io command script runs unchanged, and prints what qemu-io 7.2 prints,
so the two outputs can be compared once the timing line is filtered (as
qemu-iotests does)::

    addcow io -c 'write -P 0xaa 0 64k' -c 'read -P 0xaa 0 64k' disk.add-cow
    qemu-io -f qcow2 -c 'write -P 0xaa 0 64k' -c 'read -P 0xaa 0 64k' disk.qcow2

Commands (qemu-io's names, short names, options and argument counts)::

    read    (r)  [-bCqv] [-P pattern [-s off] [-l len]] off len
    write   (w)  [-bcCfnquz] [-P pattern | -s source_file] off len
    discard (d)  [-Cq] off len
    flush   (f)
    alloc   (a)  offset [count]      bytes allocated in the image file itself
    map          allocated / not allocated ranges of the image file itself
    length  (l)
    help    (?)  [command]
    quit    (q)

Where the text goes, as in qemu-io:

* results, and the failure of a command once its arguments are parsed, go to
  stdout: ``wrote N/N bytes at offset O`` and the timing line, ``read failed:
  Input/output error``, ``Pattern verification failed at offset O, N bytes``,
  ``Parsing error: ...``, the usage line after a bad option;
* problems with the command line itself go to stderr: ``bad argument count``,
  ``command "x" not found``, getopt's ``read: invalid option -- 'x'``, and
  ``Block node is read-only`` for a write command on an image opened with -r.

Every command runs, even after one failed (until ``quit``); the exit status
is 1 if any command failed, else 0. Offsets and lengths take qemu's suffixes
(k, M, G, T, P, E; powers of 1024).

Library errors become the errno the QEMU block layer would report: a request
outside the disk is EIO ("Input/output error"), an operating-system failure
keeps its errno. ``--debug`` adds the library's message and traceback on
stderr.

Deliberate differences from qemu-io: lines qemu-io prefixes with ``qemu-io:``
start with ``addcow:``; -b (VM state) and -c (compressed) fail with
"Operation not supported", as they do on a raw image in qemu-io; ``write -z
-n`` refuses (ENOTSUP) a partial cluster whose other bytes do not already
read as zero, which is qcow2's rule; without -c, commands are read from stdin
one per line, and the prompt is shown only when stdin is a terminal (qemu-io
prints ``qemu-io>`` even into a pipe); a failed ``flush`` says so on stderr
(qemu-io says nothing).

The interpreter lives here (the command line of ``addcow io``, the loop over
``-c`` commands or stdin lines); ``qemu_io/`` holds the rest: ``parse.py``
and ``formatting.py`` (qemu-io's argument syntax and number formatting),
``session.py`` (running one command line) and ``commands.py`` (the commands).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from ..image import AddCowImage
from .common import CommandError, add_backing_root_arg
from .qemu_io.commands import COMMANDS
from .qemu_io.session import Session

_DESCRIPTION = (
    "Run qemu-io commands (read, write, discard, flush, alloc, map, length, help, "
    "quit) on an add-cow image, with qemu-io's options, messages and exit status: "
    "1 if any command failed. Each -c is one command; without -c, commands are "
    "read from standard input, one per line."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("io", help="run qemu-io commands on an image", description=_DESCRIPTION)
    p.add_argument(
        "-c",
        "--cmd",
        dest="commands",
        action="append",
        metavar="CMD",
        help="a qemu-io command, e.g. 'write -P 0xaa 0 64k' (repeatable; "
        "without -c commands come from stdin)",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="open read-only")
    p.add_argument("-U", "--force-share", action="store_true", help="open without locking")
    add_backing_root_arg(p)
    p.add_argument("-f", "--format", dest="fmt", choices=("add-cow",), help="image format")
    p.add_argument("filename")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.force_share and not args.read_only:
        raise CommandError(
            f"{args.filename}: -U (force share) can only be used with read-only images (-r)"
        )
    image = AddCowImage.open(
        args.filename,
        readonly=args.read_only,
        force_share=args.force_share,
        backing_root=args.backing_root,
        allowed_uris=args.allow_backing_uri,
    )
    with image:
        session = Session(image, COMMANDS, debug=getattr(args, "debug", False))
        if args.commands is not None:
            lines: Iterable[str] = args.commands
        else:
            lines = _stdin_lines()
        for line in lines:
            session.run_line(line)
            if session.quit:
                break
        sys.stdout.flush()
    return 1 if session.failed else 0


def _stdin_lines() -> Iterable[str]:
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            sys.stdout.write("addcow io> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line[:-1] if line.endswith("\n") else line
