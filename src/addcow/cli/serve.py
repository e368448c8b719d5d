"""``addcow serve``: export add-cow images over NBD (like qemu-nbd / nbdkit).

Listening defaults are safe: a Unix socket (a new private directory when no
``--socket`` is given), or with ``--port`` / ``--bind`` TCP on 127.0.0.1 only.
When the server listens it prints one flushed line on stdout::

    addcow: serving disk.add-cow on nbd+unix:///?socket=/tmp/addcow-x/nbd.sock

Without ``--foreground`` the server then detaches (the line is printed by
the process that was started, which exits 0 once the daemon listens), with
``--pidfile`` naming the daemon; it then logs to ``--log-file``, or to
syslog (:mod:`addcow.cli.serve_log`). ``--stdio`` serves one connection on
stdin/stdout, which must be a socket or pipes, and exits when it ends (for
``nbdsh``'s ``connect_command`` and inetd); logs then go to stderr (and a
log file or syslog if asked). ``--control PATH`` adds the control socket of
:mod:`addcow.serve.control`.

Socket activation (systemd, libnbd's ``[ CMD ]``): when ``LISTEN_PID`` is this
process and ``LISTEN_FDS`` is set, the server serves the one socket on fd 3:
a listening socket (Unix or TCP) until SIGTERM, or a connected one
(``Accept=yes``) for that one connection. It stays in the foreground, logs
and prints its ready line on stderr (stdout is often the launching client's
own, as with ``nbdinfo --size -- [ addcow serve disk.add-cow ]``), and
refuses ``--socket``, ``--bind``, ``--port`` and ``--pidfile`` (and
``--stdio`` with a listening socket): the launcher owns the socket and
knows the pid.

Files: a process removes only what it created itself, after it created it.
It records what it made: the socket it bound (its ``st_dev`` and ``st_ino``,
unlinked at exit only while the path still names that inode), the pidfile
(unlinked only if this process created it or wrote its pid into it, and
the path still names the file it locked), its private directory, and a
``--log-file`` it created (removed if the start fails before the server
serves; :class:`~addcow.cli.serve_log.Logs`). A start that fails therefore
leaves every existing file as it was: a file or a directory at the socket
path, another server's live socket, another server's pidfile, a log file.
The one file replaced is a stale socket nobody listens on (it holds no
data). The pidfile is locked with a POSIX record lock while
the server runs, as qemu-nbd locks its own: a second server naming it is
refused before it opens anything, and the pid is written only once the
server listens. A pidfile that starts with an image header (a disk image named
by mistake) is refused, never truncated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import logging
import os
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable

from ..errors import AddCowError
from ..extras import install_hint
from ..image import AddCowImage
from ..nbd.negotiation import TLS_MODES, TLS_OFF, TLS_REQUIRE
from ..nbd.wire import PORT as DEFAULT_PORT
from ..serve import handoff
from ..serve.control import ControlServer
from ..serve.daemon import Activation, Pidfile, daemonize, socket_activation
from ..serve.export import Export, LiveOptions
from ..serve.server import NBDServer
from ..serve.sockets import stdio_problem
from ..serve.tls import TLSConfig, load_credentials, parse_allowed
from . import serve_log
from .common import CommandError, add_backing_root_arg, size_arg


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
    where.add_argument(
        "--stdio",
        action="store_true",
        help="serve one connection on stdin/stdout (a socket or pipes)",
    )
    p.add_argument("--bind", metavar="ADDR", help="listen on TCP at ADDR (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, metavar="N", help=f"TCP port (default {DEFAULT_PORT}; 0 picks one)"
    )
    p.add_argument("--read-only", action="store_true", help="export read-only")
    p.add_argument(
        "--allow-insecure",
        action="store_true",
        help="export a writable disk on a TCP address other than loopback without TLS "
        "(anyone who can reach the port can then write it)",
    )
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
    p.add_argument(
        "--pidfile",
        metavar="F",
        help="lock F while serving and write the server's process id to it",
    )
    p.add_argument("--foreground", action="store_true", help="do not detach once listening")
    tls = p.add_argument_group("TLS (x509 certificates, as qemu-nbd's tls-creds-x509)")
    tls.add_argument(
        "--tls",
        choices=TLS_MODES,
        help="off; on (offered); require (default with --tls-creds: nothing served in clear)",
    )
    tls.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="directory with server-cert.pem, server-key.pem, and ca-cert.pem (and "
        "optionally ca-crl.pem) to check clients",
    )
    tls.add_argument(
        "--allow-readable-key",
        action="store_true",
        help="serve with a DIR/server-key.pem that group or others may access "
        "(refused otherwise: chmod 600 it)",
    )
    tls.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="require a client certificate signed by DIR/ca-cert.pem",
    )
    tls.add_argument(
        "--tls-authz",
        action="append",
        metavar="ID",
        help="allow only this client: its distinguished name (CN=...,O=..., RFC 4514 order) "
        "or sha256:FINGERPRINT of its certificate; repeat for more (implies --tls-verify-peer)",
    )
    tls.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="pre-shared keys (user:hexkey lines); needs Python 3.13 or later",
    )
    p.add_argument(
        "--control",
        metavar="PATH",
        help="a control socket at PATH (JSON lines: query, stream-start, stream-cancel, "
        "stream-pause, stream-resume, stream-set-rate, detach, flush); see addcow status and "
        "addcow control",
    )
    logs = p.add_argument_group("logging (stderr, and a file or syslog)")
    logs.add_argument("--log-file", metavar="FILE", help="append the log to FILE")
    logs.add_argument(
        "--syslog",
        action="store_true",
        help="log to syslog (/dev/log; the default of a detached server without --log-file)",
    )
    logs.add_argument(
        "--log-format", choices=serve_log.FORMATS, default="text", help="text or json lines"
    )
    logs.add_argument(
        "-v", "--verbose", action="store_true", help="log negotiation details and refusals too"
    )
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
        help="limit --stream to about this many bytes per second read from the backing "
        "(holes and zero ranges cost nothing; k, M, G suffixes)",
    )
    live.add_argument(
        "--detach-when-complete",
        action="store_true",
        help="once every cluster is in the image file, remove the .add-cow file and go "
        "on serving the raw image file",
    )
    live.add_argument(
        "--handoff-qmp",
        metavar="PATH",
        help="once an export is complete and QEMU uses it, switch that QEMU (its QMP "
        "socket at PATH) to the raw image file, detach the .add-cow file, and exit "
        "when every export is handed over",
    )
    live.add_argument(
        "--handoff-stay",
        action="store_true",
        help="keep serving after the last export is handed over (by --handoff-qmp or "
        "the control socket's handoff)",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="add-cow images to export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    activation = socket_activation()
    if activation is not None:
        _refuse_with_activation(args, activation)
    if args.stdio and (args.bind is not None or args.port is not None):
        raise CommandError("--stdio cannot be combined with --bind or --port")
    if args.socket is not None and (args.bind is not None or args.port is not None):
        raise CommandError("--socket cannot be combined with --bind or --port")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise CommandError(f"invalid port {args.port}: expected 0..65535")
    live_wanted = args.copy_on_read or args.stream or args.detach_when_complete
    if args.read_only and (live_wanted or args.handoff_qmp is not None):
        raise CommandError(
            "--copy-on-read, --stream, --detach-when-complete and --handoff-qmp write the "
            "image: not with --read-only"
        )
    if args.handoff_qmp is not None and (
        args.stdio or (activation is not None and not activation.listening)
    ):
        raise CommandError("--handoff-qmp needs a listening server (not --stdio)")
    if args.stream_rate is not None and not args.stream:
        raise CommandError("--stream-rate needs --stream")
    if args.stream_rate == 0:
        raise CommandError("--stream-rate must be more than 0")
    if args.shared < 0:
        raise CommandError(f"invalid --shared {args.shared}: expected 0 or more")
    args.loop_factory = _loop_factory()
    names = list(args.export_name or [])
    if len(names) > len(args.files):
        raise CommandError(f"{len(names)} export names for {len(args.files)} files")
    names += [os.path.basename(f) for f in args.files[len(names) :]]
    if len(set(names)) != len(names):
        raise CommandError(f"export names must be unique, got {names} (use --export-name)")
    if any(len(n.encode()) > 4096 or "\0" in n for n in names):
        raise CommandError("export names must be at most 4096 bytes, without NUL")
    if args.stdio and activation is None:
        if args.pidfile is not None:
            raise CommandError("--pidfile cannot be used with --stdio")
        problem = stdio_problem()
        if problem is not None:
            raise CommandError(f"--stdio needs a socket or pipe on stdin/stdout, found {problem}")
    if args.log_file is not None and args.syslog:
        raise CommandError("--log-file and --syslog: give one")
    detached = not (args.stdio or args.foreground or activation is not None)
    logs = serve_log.configure(
        verbose=args.verbose,
        log_format=args.log_format,
        log_file=args.log_file,
        syslog=args.syslog,
        detached=detached,
    )
    try:
        args.tls_config = _tls_config(args)
        _check_exposure(args, activation)
    except BaseException:
        logs.discard()
        raise
    if activation is not None:
        return _serve(args, names, _print_ready_to_stderr, activation, logs)
    if args.stdio or args.foreground:
        return _serve(args, names, _print_ready, None, logs)
    status = daemonize(lambda ready: _serve(args, names, ready, None, logs))
    if not logs.keeps_log:
        print(serve_log.NO_LOG_WARNING, file=sys.stderr, flush=True)
    return status


def _check_exposure(args: argparse.Namespace, activation: Activation | None) -> None:
    """Refuse a writable export that the network can reach without TLS; warn for the rest.

    A TCP address other than loopback (``--bind 0.0.0.0``, a host's address, a
    socket passed by socket activation) lets anyone who reaches the port read
    the disk, and write it unless it is read-only. Writable needs
    ``--allow-insecure``, said explicitly; both are logged as warnings.
    """
    if activation is not None:
        if activation.sock.family == socket.AF_UNIX:
            return
        host = str(activation.sock.getsockname()[0])
    elif args.bind is not None or args.port is not None:
        host = args.bind if args.bind is not None else "127.0.0.1"
    else:
        return
    if not _reachable_from_outside(host):
        return
    log = logging.getLogger("addcow.serve")
    tls: TLSConfig | None = args.tls_config
    if tls is not None and tls.mode == TLS_REQUIRE:
        if not tls.verify_peer:
            log.warning(
                "serving on %s with TLS but without --tls-verify-peer: any client can "
                "connect, encrypted",
                host,
            )
        return
    if args.read_only:
        log.warning("serving on %s without TLS: anyone who can reach it can read the disk", host)
        return
    if not args.allow_insecure:
        raise CommandError(
            f"refusing to export a writable disk on {host} without TLS: anyone who can reach "
            "the port could write it. Give --tls-creds DIR (TLS required), listen on 127.0.0.1 "
            "or a Unix socket, serve --read-only, or give --allow-insecure to accept that"
        )
    log.warning(
        "INSECURE: serving a writable disk on %s without TLS (--allow-insecure): anyone who "
        "can reach it can read and write the disk",
        host,
    )


def _tls_config(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings from --tls, --tls-creds, --allow-readable-key, --tls-verify-peer
    and --tls-authz."""
    if args.tls_psk is not None:
        if not getattr(ssl, "HAS_PSK", False) or sys.version_info < (3, 13):
            raise CommandError(
                f"--tls-psk needs Python 3.13 or later with TLS-PSK in its ssl module (this is "
                f"Python {sys.version.split()[0]}); use --tls-creds with x509 certificates"
            )
        raise CommandError("--tls-psk is not offered by this addcow; use --tls-creds")
    mode = args.tls or (TLS_REQUIRE if args.tls_creds is not None else TLS_OFF)
    verify = args.tls_verify_peer or bool(args.tls_authz)
    if mode == TLS_OFF:
        if args.tls_creds is not None or verify or args.allow_readable_key:
            raise CommandError(
                "--tls=off cannot be combined with --tls-creds, --tls-verify-peer, "
                "--tls-authz or --allow-readable-key"
            )
        return None
    if args.tls_creds is None:
        raise CommandError(f"--tls={mode} needs --tls-creds DIR")
    try:
        context = load_credentials(
            args.tls_creds, verify_peer=verify, allow_readable_key=args.allow_readable_key
        )
        allowed = parse_allowed(args.tls_authz or [])
    except AddCowError as exc:
        raise CommandError(str(exc)) from exc
    return TLSConfig(mode, context, verify, allowed)


def _reachable_from_outside(host: str) -> bool:
    """Whether a listening address accepts connections from other machines."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM)
    except OSError:
        return True  # cannot tell: assume the worst (listening fails anyway)
    for *_rest, address in infos:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
        if not ip.is_loopback:
            return True
    return not infos


def _print_ready(line: str) -> None:
    print(line, flush=True)


def _print_ready_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _refuse_with_activation(args: argparse.Namespace, activation: Activation) -> None:
    """One line for the first option that socket activation leaves no sense in."""
    given = (
        ("--socket", args.socket is not None),
        ("--bind", args.bind is not None),
        ("--port", args.port is not None),
        ("--pidfile", args.pidfile is not None),
        # A connected socket (Accept=yes) is the stdio connection itself.
        ("--stdio", args.stdio and activation.listening),
    )
    for option, present in given:
        if present:
            raise CommandError(f"{option} cannot be used with socket activation (LISTEN_FDS)")


def _serve(
    args: argparse.Namespace,
    names: list[str],
    ready: Callable[[str], None],
    activation: Activation | None,
    logs: serve_log.Logs,
) -> int:
    """Open the images and serve them; a start that fails discards the log file it made."""
    try:
        return _serve_images(args, names, ready, activation, logs)
    except BaseException:
        logs.discard()
        raise


def _serve_images(
    args: argparse.Namespace,
    names: list[str],
    ready: Callable[[str], None],
    activation: Activation | None,
    logs: serve_log.Logs,
) -> int:
    pidfile = Pidfile.acquire(args.pidfile) if args.pidfile is not None else None
    try:
        images: list[AddCowImage] = []
        try:
            for path in args.files:
                images.append(
                    AddCowImage.open(
                        path,
                        readonly=args.read_only,
                        backing_root=args.backing_root,
                        allowed_uris=args.allow_backing_uri,
                    )
                )
            options = LiveOptions(
                copy_on_read=args.copy_on_read,
                stream=args.stream,
                stream_rate=args.stream_rate,
                detach_when_complete=args.detach_when_complete,
                handoff_qmp=os.path.abspath(args.handoff_qmp) if args.handoff_qmp else None,
                handoff_stay=args.handoff_stay,
            )
            exports = [
                Export.from_image(image, name, read_only=args.read_only, live=options)
                for image, name in zip(images, names, strict=True)
            ]
        except BaseException:
            for image in images:
                image.close()
            raise
        if args.stdio or activation is not None:
            # stdout is the protocol channel, or the launching client's own:
            # nothing else may be written to it.
            sys.stdout = sys.stderr
        with asyncio.Runner(loop_factory=args.loop_factory) as runner:
            return runner.run(_main(args, exports, ready, pidfile, activation, logs))
    finally:
        if pidfile is not None:
            pidfile.release()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when installed (the ``fast`` extra), else asyncio's.

    ``ADDCOW_EVENT_LOOP=asyncio`` forces the standard loop and ``=uvloop``
    requires uvloop (to compare the two, and to test each).
    """
    wanted = os.environ.get("ADDCOW_EVENT_LOOP", "")
    if wanted not in ("", "asyncio", "uvloop"):
        raise CommandError(f"ADDCOW_EVENT_LOOP: expected asyncio or uvloop, found {wanted!r}")
    if wanted == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if wanted == "uvloop":
            raise CommandError(
                "ADDCOW_EVENT_LOOP=uvloop: expected uvloop installed, found none; "
                + install_hint("fast")
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _main(
    args: argparse.Namespace,
    exports: list[Export],
    ready: Callable[[str], None],
    pidfile: Pidfile | None,
    activation: Activation | None,
    logs: serve_log.Logs,
) -> int:
    server = NBDServer(exports, max_connections=args.shared, tls=args.tls_config)
    server.install_signal_handlers()
    loop = asyncio.get_running_loop()
    logging.getLogger("addcow.serve").debug("event loop: %s", type(loop).__module__.split(".")[0])
    tempdir: str | None = None
    control: ControlServer | None = None
    try:
        if args.control is not None:
            control = ControlServer(server)
            await control.listen(os.path.abspath(args.control))
        if activation is not None and not activation.listening:
            logs.keep()
            server.start_live()
            await server.serve_connection(activation.sock)
        elif args.stdio:
            logs.keep()
            server.start_live()
            await server.serve_stdio()
        else:
            if activation is not None:
                uri = await server.listen_socket(activation.sock)
            elif args.bind is not None or args.port is not None:
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
            if pidfile is not None:
                pidfile.write(os.getpid())
            files = ", ".join(args.files)
            logs.keep()
            ready(f"addcow: serving {files} on {uri}")
            server.start_live()
            handoff.start(server)
            await server.wait_stopped()
    finally:
        server.stop()
        if control is not None:
            await control.close()
        await server.close()
        server.remove_sockets()
        if tempdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(tempdir)
    return 0
