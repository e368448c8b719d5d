"""The control socket of ``addcow serve --control PATH``: status and commands while serving.

Protocol
    A Unix stream socket; each request is one line of JSON, each reply one
    line of JSON, in order, in the shape of QEMU's QMP (which operators
    already script against)::

        -> {"execute": "query"}
        <- {"return": {"server": {...}, "exports": [...], "clients": [...]}}
        -> {"execute": "stream-set-rate", "arguments": {"export": "disk", "speed": 1048576}}
        <- {"return": {}}
        -> {"execute": "detach"}
        <- {"error": {"class": "GenericError", "desc": "disk: not complete: ..."}}

    Commands: ``query``, ``stream-start`` (optional ``speed``, as
    ``--stream-rate``; default that option) and ``stream-cancel``, as QEMU's
    ``block-stream`` and ``block-job-cancel``; ``stream-pause``,
    ``stream-resume``, ``stream-set-rate`` (``speed``: bytes per second, 0 for
    no limit), ``detach`` (a complete export: remove its .add-cow file and go
    on serving the raw file), ``flush`` and ``handoff`` (``qmp``: the path of
    the QMP socket of the QEMU that uses the export; see
    :mod:`addcow.serve.handoff`). All but ``query`` take an optional
    ``export`` (a name; default: every export for ``flush``, the only or the
    default export otherwise). A line that is not JSON, not an object, too
    long (:data:`MAX_LINE`), or names an unknown command or argument gets an
    error reply and the connection goes on (a blank line gets none); nothing
    a control client sends affects NBD clients except what its commands ask
    for.

``query`` fields
    Per export, the stream is described with the names of QEMU's
    ``query-block-jobs`` where they mean the same: ``status`` (``none``,
    ``running``, ``paused``, ``concluded``), ``offset`` and ``len`` (bytes of
    the virtual disk in the image file, and the virtual size), ``speed`` (the
    rate limit, 0: none), ``paused``. Counters use the names of QEMU's
    ``query-blockstats``: ``rd_operations``, ``rd_bytes``, ``wr_operations``,
    ``wr_bytes`` (writes and write-zeroes), ``unmap_operations``,
    ``unmap_bytes`` (trims), ``flush_operations``; each export has them, and
    so has each connected client. ``allocated-clusters`` and
    ``total-clusters`` are those of ``addcow info --output=json``. ``handoff``
    has ``status`` (``none``, ``waiting`` for ``--handoff-qmp``, ``running``,
    ``done``, ``failed``), ``qmp`` (the ``--handoff-qmp`` path) and ``detail``
    (where QEMU runs the disk, or why the last handoff failed).

Who may use it
    The socket is created mode 0600 (bound under a umask that allows nothing
    more, so it is never reachable by others even for a moment), and each
    connection's peer is checked with ``SO_PEERCRED``: only the server's own
    user (and root) is served. The path follows the NBD socket's rules: a stale
    socket there is replaced, anything else refused, and it is removed at exit
    only if it is still the socket this server bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import AddCowError
from . import handoff, live
from .commands import COMMANDS
from .export import STREAM_PAUSED, Export
from .server import NBDServer
from .sockets import bind_unix

log = logging.getLogger("addcow.serve")

MAX_LINE = 64 << 10
"""Longest request line accepted (bytes)."""
MAX_CLIENTS = 8
"""Control connections served at once; more get an error line and are closed."""

JSON_SPACE = b" \t\r\n"
"""What a blank line, which gets no reply, may hold (RFC 8259's whitespace)."""


class ControlError(AddCowError):
    """A control request that cannot be carried out (its reply is an error)."""


def query(server: NBDServer) -> dict[str, Any]:
    """What ``query`` returns: the server, its exports and its connected clients."""
    now = time.time()
    tls = server.tls
    return {
        "server": {
            "pid": os.getpid(),
            "uris": list(server.uris),
            "tls": tls.mode if tls is not None else "off",
            "tls-verify-peer": bool(tls and tls.verify_peer),
            "uptime": round(now - server.started_at, 3),
            "connections": len(server.clients),
            "shared": server.max_connections,
        },
        "exports": [_export(e) for e in server.exports],
        "clients": [
            {
                "id": c.number,
                "address": c.address,
                "export": c.export.info.name if c.export is not None else None,
                "tls": c.identity is not None,
                "identity": str(c.identity) if c.identity is not None else None,
                "connected": round(now - c.connected_at, 3),
                **c.counters.as_dict(),
            }
            for c in sorted(server.clients, key=lambda c: c.number)
        ],
    }


def _export(export: Export) -> dict[str, Any]:
    image, state = export.image, export.live
    size = image.size
    return {
        "name": export.info.name,
        "file": image.path,
        "image-file": image.image_path,
        "backing-file": getattr(image.backing, "path", None),
        "read-only": export.info.read_only,
        "virtual-size": size,
        "cluster-size": image.cluster_size,
        "allocated-clusters": image.allocated_clusters,
        "total-clusters": image.total_clusters,
        "complete": image.complete,
        "detached": image.detached,
        "copy-on-read": state.copies_on_read,
        "handoff": handoff.describe(export),
        "stream": {
            "status": state.stream_status,
            "offset": size - image.unallocated_bytes,
            "len": size,
            "speed": (state.rate.rate or 0) if state.rate is not None else 0,
            "paused": state.stream_status == STREAM_PAUSED,
            "copied": state.stream_copied,
        },
        **export.counters.as_dict(),
    }


class ControlServer:
    """Serves the control socket for an :class:`~addcow.serve.server.NBDServer`."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self._listener: asyncio.Server | None = None
        self._bound: Any = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def listen(self, path: str) -> None:
        """Listen at ``path`` (mode 0600); see "Who may use it"."""
        old = os.umask(0o177)
        try:
            sock, self._bound = bind_unix(path)
        finally:
            os.umask(old)
        try:
            sock.setblocking(False)
            self._listener = await asyncio.start_unix_server(
                self._accept, sock=sock, limit=MAX_LINE + 1
            )
        except BaseException:
            self._bound.remove()
            sock.close()
            raise

    async def close(self) -> None:
        """Stop listening, end control connections, remove the socket this server bound."""
        if self._listener is not None:
            self._listener.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        if self._bound is not None:
            self._bound.remove()
            self._bound = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if not _same_user(writer):
                return
            if len(self._connections) >= MAX_CLIENTS:
                writer.write(_error(f"too many control connections (at most {MAX_CLIENTS})"))
                return
            if task is not None:
                self._connections.add(task)
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_error(f"request longer than {MAX_LINE} bytes"))
                    return
                if line.strip(JSON_SPACE):
                    writer.write(await self.handle(line))
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()

    async def handle(self, line: bytes) -> bytes:
        """The reply line to one request line."""
        try:
            request = json.loads(line, parse_constant=_not_a_number, parse_float=_finite)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(f"not JSON: {exc}")
        except RecursionError:
            return _error("not JSON this server reads: nested too deeply")
        if not isinstance(request, dict):
            return _error(f"expected a JSON object, found {type(request).__name__}")
        ident = request.get("id")
        command = request.get("execute")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            found = type(arguments).__name__
            return _error(f"arguments: expected an object, found {found}", ident)
        unknown = set(request) - {"execute", "arguments", "id"}
        if unknown:
            member = sorted(unknown)[0]
            return _error(f"unknown member {member!r} (expected execute, arguments, id)", ident)
        handler = self._handlers().get(command) if isinstance(command, str) else None
        if handler is None:
            expected = ", ".join(COMMANDS)
            return _error(f"unknown command {command!r}; expected one of {expected}", ident)
        try:
            result = await handler(arguments)
        except AddCowError as exc:
            return _error(str(exc), ident)
        if command != "query":
            log.info("control: %s%s", command, f" {json.dumps(arguments)}" if arguments else "")
        reply: dict[str, Any] = {"return": result}
        if ident is not None:
            reply["id"] = ident
        return _line(reply)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]]:
        return {
            "query": self._query,
            "stream-start": self._start,
            "stream-cancel": self._cancel,
            "stream-pause": self._pause,
            "stream-resume": self._resume,
            "stream-set-rate": self._set_rate,
            "detach": self._detach,
            "flush": self._flush,
            "handoff": self._handoff,
        }

    async def _query(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ())
        return query(self.server)

    async def _start(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export", "speed"))
        export = self._export(arguments)
        speed = _speed(arguments) if "speed" in arguments else export.live.options.stream_rate
        return {"changed": live.start_stream(self.server, export, speed)}

    async def _cancel(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export",))
        return {"changed": await live.cancel_stream(self.server, self._export(arguments))}

    async def _pause(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export",))
        return {"changed": live.pause_stream(self._export(arguments))}

    async def _resume(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export",))
        return {"changed": live.resume_stream(self._export(arguments))}

    async def _set_rate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export", "speed"))
        speed = _speed(arguments)
        live.set_stream_rate(self._export(arguments), speed)
        return {}

    async def _detach(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export",))
        raw = await live.detach(self.server, self._export(arguments))
        return {"image-file": raw}

    async def _flush(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export",))
        exports = [self._export(arguments)] if "export" in arguments else self.server.exports
        for export in exports:
            if not export.info.read_only and not export.image.closed:
                await self.server.call(export.image.flush)
        return {}

    async def _handoff(self, arguments: dict[str, Any]) -> dict[str, Any]:
        _expect(arguments, ("export", "qmp"))
        qmp = arguments.get("qmp")
        if not isinstance(qmp, str) or not qmp:
            raise ControlError(f"qmp: expected the path of QEMU's QMP socket, found {qmp!r}")
        return await handoff.hand_over(self.server, self._export(arguments), qmp)

    def _export(self, arguments: dict[str, Any]) -> Export:
        name = arguments.get("export")
        exports = self.server.exports
        if name is None:
            return exports[0]
        for export in exports:
            if export.info.name == name:
                return export
        names = ", ".join(repr(e.info.name) for e in exports)
        raise ControlError(f"export: expected one of {names}, found {name!r}")


def _expect(arguments: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in arguments:
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise ControlError(f"unknown argument {key!r} (expected {expected})")


def _speed(arguments: dict[str, Any]) -> int:
    speed = arguments.get("speed")
    if not isinstance(speed, int) or isinstance(speed, bool) or speed < 0:
        raise ControlError(
            f"speed: expected bytes per second (an integer, 0 for no limit), found {speed!r}"
        )
    return speed


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of a Unix connection runs as this user (or as root)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid in (os.getuid(), 0):
            return True
        log.warning("control: refused a connection from uid %d", uid)
    return False


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a number")
    return value


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error(desc: str, ident: Any = None) -> bytes:
    reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": desc}}
    if ident is not None:
        reply["id"] = ident
    return _line(reply)
