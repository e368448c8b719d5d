"""A small client of QEMU's QMP monitor: greeting, capabilities, commands, events.

Protocol (QEMU's ``docs/interop/qmp-spec.rst``)
    A Unix stream socket (``-qmp unix:PATH,server=on,wait=off``) carrying JSON
    objects, one per line (QEMU ends each with CRLF). The server speaks first::

        <- {"QMP": {"version": {...}, "capabilities": [...]}}
        -> {"execute": "qmp_capabilities", "id": 1}
        <- {"return": {}, "id": 1}
        -> {"execute": "query-block", "id": 2}
        <- {"event": "...", "data": {...}, "timestamp": {...}}   (at any time)
        <- {"return": [...], "id": 2}

    Until ``qmp_capabilities`` succeeds the monitor is in capabilities
    negotiation mode and refuses every other command. One command is in
    flight at a time here (QEMU answers a monitor's commands in order), so
    each reply must carry the ``id`` of the command sent; events in between
    are recorded (the last :data:`MAX_EVENTS`) and otherwise skipped.

Hostile input
    Everything QEMU sends is checked before it is used: a line longer than
    :data:`MAX_MESSAGE` bytes, bytes that are not UTF-8 or not JSON, a JSON value that is
    not an object, a greeting without the ``QMP`` member, a reply with another
    ``id`` or with neither ``return`` nor a well-formed ``error`` is a
    :class:`QMPProtocolError` and the connection is not used again. Helpers
    (:func:`members`, :func:`text`, :func:`flag`) read fields out of replies
    with their types checked.

Errors (all :class:`~addcow.errors.AddCowError`)::

    QMPError              QEMU refused a command: its name, QEMU's class and desc
    QMPProtocolError      QEMU sent something that is not QMP (or not in time)
    QMPConnectError       the socket could not be reached

Layers
    :class:`QMPParser` is sans-IO (bytes in, messages out) and holds the
    checks; :class:`QMPClient` is a thin asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
from typing import Any

from ..errors import AddCowError

MAX_MESSAGE = 4 << 20
"""Longest line accepted from QEMU (bytes); a large graph's query fits well within it."""
MAX_EVENTS = 64
"""Events kept (the latest) for the log and for tests."""
TIMEOUT = 10.0
"""Seconds to wait for the greeting or for a command's reply."""


class QMPError(AddCowError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPProtocolError(AddCowError):
    """What QEMU sent is not QMP as expected (or it did not answer in time)."""


class QMPConnectError(AddCowError):
    """The QMP socket could not be reached."""


class QMPParser:
    """Splits QEMU's bytes into checked JSON objects (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The complete messages ``data`` ends; raises QMPProtocolError on bad input."""
        self._buffer += data
        out: list[dict[str, Any]] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_MESSAGE:
                    raise QMPProtocolError(
                        f"QMP message: expected at most {MAX_MESSAGE} bytes, "
                        f"found {len(self._buffer)} without a line end"
                    )
                return out
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if end > MAX_MESSAGE:
                raise QMPProtocolError(
                    f"QMP message: expected at most {MAX_MESSAGE} bytes, found {end}"
                )
            if line.strip():
                out.append(parse_message(line))


def parse_message(line: bytes) -> dict[str, Any]:
    """One line of QMP as a JSON object, or QMPProtocolError.

    The line is decoded as UTF-8 here, strictly: given bytes, ``json.loads``
    would guess UTF-16 or UTF-32 from NUL bytes and let lone surrogates through.
    """
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QMPProtocolError(f"QMP message: expected UTF-8, found {line[:60]!r} ({exc})") from exc
    try:
        value = json.loads(decoded, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise QMPProtocolError(f"QMP message: expected JSON, found {line[:60]!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise QMPProtocolError(f"QMP message: expected an object, found {type(value).__name__}")
    return value


def check_greeting(message: dict[str, Any]) -> dict[str, Any]:
    """The ``QMP`` member of the greeting (version, capabilities), checked."""
    greeting = message.get("QMP")
    if not isinstance(greeting, dict) or not isinstance(greeting.get("version"), dict):
        raise QMPProtocolError(
            f"QMP greeting: expected {{'QMP': {{'version': ...}}}}, found {_short(message)}"
        )
    if not isinstance(greeting.get("capabilities", []), list):
        raise QMPProtocolError(
            f"QMP greeting: capabilities: expected a list, found {_short(greeting['capabilities'])}"
        )
    return greeting


def reply_value(command: str, ident: int, message: dict[str, Any]) -> Any:
    """The ``return`` value of the reply to ``command`` (sent with ``ident``).

    QMPError if QEMU refused it; QMPProtocolError if ``message`` is not its reply.
    """
    if message.get("id") != ident:
        raise QMPProtocolError(
            f"QMP reply to {command}: expected id {ident}, found {_short(message.get('id'))}"
        )
    if "return" in message:
        return message["return"]
    if "error" in message:
        error = message["error"]
        if isinstance(error, dict):
            cls, desc = error.get("class"), error.get("desc")
            if isinstance(cls, str) and isinstance(desc, str):
                raise QMPError(command, cls, desc)
        raise QMPProtocolError(
            f"QMP reply to {command}: error: expected an object with 'class' and 'desc' "
            f"strings, found {_short(error)}"
        )
    raise QMPProtocolError(
        f"QMP reply to {command}: expected 'return' or 'error', found {_short(message)}"
    )


def members(value: Any, what: str) -> list[dict[str, Any]]:
    """``value`` as a list of objects (a query's answer), or QMPProtocolError."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise QMPProtocolError(f"{what}: expected a list of objects, found {_short(value)}")
    return value


def text(obj: dict[str, Any], key: str, what: str) -> str:
    """``obj[key]`` as a string, or QMPProtocolError naming ``what``."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise QMPProtocolError(f"{what}: {key}: expected a string, found {_short(value)}")
    return value


def flag(obj: dict[str, Any], key: str, what: str) -> bool:
    """``obj[key]`` as a boolean (False when absent), or QMPProtocolError."""
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise QMPProtocolError(f"{what}: {key}: expected true or false, found {_short(value)}")
    return value


class QMPClient:
    """One QMP connection, used by one task at a time (``async with`` closes it)."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.version: dict[str, Any] = {}
        self._parser = QMPParser()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._broken = False

    async def __aenter__(self) -> QMPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting and leave capabilities negotiation mode."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            raise QMPConnectError(f"{self.path}: cannot reach QEMU's QMP socket: {reason}") from exc
        greeting = check_greeting(await self._receive("the greeting"))
        self.version = greeting["version"]
        await self.execute("qmp_capabilities")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return QEMU's ``return`` value (QMPError if refused)."""
        if self._writer is None or self._broken:
            raise QMPProtocolError(f"{self.path}: the QMP connection is not usable")
        self._next_id += 1
        ident = self._next_id
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            self._writer.write(json.dumps(request).encode() + b"\n")
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except (OSError, TimeoutError) as exc:
            self._broken = True
            raise QMPProtocolError(f"{self.path}: sending {command} failed: {exc}") from exc
        while True:
            message = await self._receive(f"the reply to {command}")
            if "event" in message:
                self.events.append(message)
                continue
            try:
                return reply_value(command, ident, message)
            except QMPProtocolError:
                self._broken = True
                raise

    async def _receive(self, what: str) -> dict[str, Any]:
        reader = self._reader
        assert reader is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not self._pending:
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                data = await asyncio.wait_for(reader.read(65536), left)
            except (OSError, TimeoutError) as exc:
                self._broken = True
                raise QMPProtocolError(
                    f"{self.path}: no {what} from QEMU within {self.timeout:g} s"
                    if isinstance(exc, TimeoutError)
                    else f"{self.path}: reading {what} failed: {exc}"
                ) from exc
            if not data:
                self._broken = True
                raise QMPProtocolError(f"{self.path}: QEMU closed the QMP connection before {what}")
            try:
                self._pending.extend(self._parser.feed(data))
            except QMPProtocolError:
                self._broken = True
                raise
        return self._pending.popleft()


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value} is beyond the range of a number")
    return number


def _short(value: Any) -> str:
    shown = json.dumps(value) if not isinstance(value, str) else repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
