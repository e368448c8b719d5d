"""``addcow serve``: export add-cow images over NBD (like qemu-nbd / nbdkit).

Listening defaults are safe: a Unix socket (a new private directory when no
``--socket`` is given), or with ``--port`` / ``--bind`` TCP on 127.0.0.1 only.
When the server listens it prints one flushed line on stdout::

    addcow: serving disk.add-cow on nbd+unix:///?socket=/tmp/addcow-x/nbd.sock

Without ``--foreground`` the server then detaches (the line is printed by
the process that was started, which exits 0 once the daemon listens), with
``--pidfile`` naming the daemon; a detached server keeps no log.
``--stdio`` serves one connection on stdin/stdout and exits when it ends
(for ``nbdsh``'s ``connect_command`` and inetd); logs then go to stderr only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from ..errors import AddCowError
from ..image import AddCowImage
from ..nbd.live import LiveOptions
from ..nbd.server import Export, NBDServer
from .common import CommandError, add_backing_root_arg, size_arg

DEFAULT_PORT = 10809
"""The IANA port for NBD."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve add-cow images over NBD",
        description="Export each FILE over NBD; the first is the default export. "
        "Connect with e.g. qemu-system-x86_64 -drive "
        "file=nbd+unix:///?socket=PATH,format=raw.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--stdio", action="store_true", help="serve one connection on stdin/stdout")
    p.add_argument("--bind", metavar="ADDR", help="listen on TCP at ADDR (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, metavar="N", help=f"TCP port (default {DEFAULT_PORT}; 0 picks one)"
    )
    p.add_argument("--read-only", action="store_true", help="export read-only")
    add_backing_root_arg(p)
    p.add_argument(
        "--export-name",
        action="append",
        metavar="NAME",
        help="export name of the next FILE (repeat per FILE; default: the file's base name)",
    )
    p.add_argument(
        "--shared",
        type=int,
        default=16,
        metavar="N",
        help="serve at most N connections at once (0: no limit; default 16)",
    )
    p.add_argument("--pidfile", metavar="F", help="write the server's process id to F")
    p.add_argument("--foreground", action="store_true", help="do not detach once listening")
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    live = p.add_argument_group("finishing the images while serving them")
    live.add_argument(
        "--copy-on-read",
        action="store_true",
        help="copy every cluster a client reads from the backing file into the image file",
    )
    live.add_argument(
        "--stream",
        action="store_true",
        help="copy every remaining cluster from the backing file in the background",
    )
    live.add_argument(
        "--stream-rate",
        type=size_arg,
        metavar="BYTES/S",
        help="limit --stream to about this many bytes per second (k, M, G suffixes)",
    )
    live.add_argument(
        "--detach-when-complete",
        action="store_true",
        help="once every cluster is in the image file, remove the .add-cow file and go "
        "on serving the raw image file",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="add-cow images to export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.stdio and (args.bind is not None or args.port is not None):
        raise CommandError("--stdio cannot be combined with --bind or --port")
    if args.socket is not None and (args.bind is not None or args.port is not None):
        raise CommandError("--socket cannot be combined with --bind or --port")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CommandError(f"invalid port {args.port}: expected 0..65535")
    live_wanted = args.copy_on_read or args.stream or args.detach_when_complete
    if args.read_only and live_wanted:
        raise CommandError(
            "--copy-on-read, --stream and --detach-when-complete write the image: "
            "not with --read-only"
        )
    if args.stream_rate is not None and not args.stream:
        raise CommandError("--stream-rate needs --stream")
    if args.stream_rate == 0:
        raise CommandError("--stream-rate must be more than 0")
    if args.shared < 0:
        raise CommandError(f"invalid --shared {args.shared}: expected 0 or more")
    names = list(args.export_name or [])
    if len(names) > len(args.files):
        raise CommandError(f"{len(names)} export names for {len(args.files)} files")
    names += [os.path.basename(f) for f in args.files[len(names) :]]
    if len(set(names)) != len(names):
        raise CommandError(f"export names must be unique, got {names} (use --export-name)")
    if any(len(n.encode()) > 4096 or "\0" in n for n in names):
        raise CommandError("export names must be at most 4096 bytes, without NUL")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="addcow serve: %(message)s",
    )
    # Streaming progress and completion are always reported (on stderr).
    logging.getLogger("addcow.serve.live").setLevel(logging.INFO)
    if args.stdio or args.foreground:
        return _serve(args, names, _print_ready)
    return _daemonize(lambda ready: _serve(args, names, ready))


def _print_ready(line: str) -> None:
    print(line, flush=True)


def _serve(args: argparse.Namespace, names: list[str], ready: Callable[[str], None]) -> int:
    images: list[AddCowImage] = []
    try:
        for path in args.files:
            images.append(
                AddCowImage.open(path, readonly=args.read_only, backing_root=args.backing_root)
            )
        options = LiveOptions(
            copy_on_read=args.copy_on_read,
            stream=args.stream,
            stream_rate=args.stream_rate,
            detach_when_complete=args.detach_when_complete,
        )
        exports = [
            Export.from_image(image, name, read_only=args.read_only, live=options)
            for image, name in zip(images, names, strict=True)
        ]
    except BaseException:
        for image in images:
            image.close()
        raise
    if args.stdio:
        # stdout is the protocol channel now: nothing else may be written to it.
        sys.stdout = sys.stderr
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_main(args, exports, ready))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (``pip install addcow[fast]``), else asyncio's.

    ``ADDCOW_EVENT_LOOP=asyncio`` forces the standard loop (to compare the two).
    """
    if os.environ.get("ADDCOW_EVENT_LOOP") == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _main(
    args: argparse.Namespace, exports: list[Export], ready: Callable[[str], None]
) -> int:
    server = NBDServer(exports, max_connections=args.shared)
    server.install_signal_handlers()
    tempdir: str | None = None
    socket_path: str | None = None
    try:
        if args.stdio:
            server.start_live()
            await server.serve_stdio()
            server.stop()
        else:
            if args.bind is not None or args.port is not None:
                host = args.bind if args.bind is not None else "127.0.0.1"
                port = args.port if args.port is not None else DEFAULT_PORT
                uri = await server.listen_tcp(host, port)
            else:
                if args.socket is None:
                    tempdir = tempfile.mkdtemp(prefix="addcow-serve-")
                    socket_path = os.path.join(tempdir, "nbd.sock")
                else:
                    socket_path = os.path.abspath(args.socket)
                uri = await server.listen_unix(socket_path)
            if args.pidfile:
                _write_pidfile(args.pidfile)
            files = ", ".join(args.files)
            ready(f"addcow: serving {files} on {uri}")
            server.start_live()
            await server.wait_stopped()
    except BaseException:
        server.stop()
        await server.close()
        _cleanup(args, socket_path, tempdir)
        raise
    await server.close()
    _cleanup(args, socket_path, tempdir)
    return 0


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _cleanup(args: argparse.Namespace, socket_path: str | None, tempdir: str | None) -> None:
    if socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    if tempdir is not None:
        shutil.rmtree(tempdir, ignore_errors=True)
    if args.pidfile:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.pidfile)


def _daemonize(serve: Callable[[Callable[[str], None]], int]) -> int:
    """Run ``serve`` in a detached process; print its ready line here, then exit.

    The daemon reports through a pipe: ``ok <ready line>`` once it listens, or
    ``error <message>`` if it fails first.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        os.waitpid(pid, 0)
        kind, _, text = report.partition(" ")
        if kind == "ok":
            print(text, flush=True)
            return 0
        raise CommandError(text.strip() or "the server exited before it was ready")
    # First child: a new session, then fork again so the daemon is no session leader.
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    reported = False

    def ready(line: str) -> None:
        nonlocal reported
        os.write(write_fd, f"ok {line}".encode())
        os.close(write_fd)
        reported = True
        # Let go of the caller's terminal or pipes: a detached server logs nothing
        # (run it with --foreground to see its log on stderr).
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    status = 1
    try:
        status = serve(ready)
    except (AddCowError, CommandError, OSError) as exc:
        if not reported:
            os.write(write_fd, f"error {exc}".encode())
    except BaseException as exc:
        if not reported:
            os.write(write_fd, f"error {type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(status)
