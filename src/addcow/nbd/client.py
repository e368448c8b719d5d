"""The client side of the NBD protocol, without sockets (:class:`ClientConnection`).

Quotes marked "proto.md" are from the NetworkBlockDevice project's
``doc/proto.md``; the wire layout is :mod:`addcow.nbd.wire`, shared with the
server.

Design note
===========

Sans-IO. :class:`ClientConnection` never touches a socket. Its caller (the
NBD backing store, :mod:`addcow.stores.remote.nbd`) loops: send what
:meth:`~ClientConnection.data_to_send` returns, look at
:attr:`~ClientConnection.need` (how many bytes the protocol wants next, and
optionally the buffer they must land in), receive exactly that many bytes and
hand them to :meth:`~ClientConnection.feed`, then collect
:meth:`~ClientConnection.events`. A need of 0 bytes is a pause: the caller
acts on the events (``StartTLS``: wrap the socket) and feeds ``b""``. The
parser is a generator that yields its needs, so the protocol reads top to
bottom; its state between two feeds is the generator's frame.

Negotiation (fixed newstyle only). Greeting, client flags (FIXED_NEWSTYLE,
and NO_ZEROES when the server offers it), then in order: STARTTLS when asked
for (the server refusing it is fatal), STRUCTURED_REPLY (refused: simple
replies), SET_META_CONTEXT "base:allocation" (refused or not granted: no
block status, the caller reports everything as data), then GO asking for
NBD_INFO_BLOCK_SIZE. A server that answers GO with ERR_UNSUP gets the old
NBD_OPT_EXPORT_NAME instead. ERR_UNKNOWN (no such export) and ERR_TLS_REQD
(the URI should be nbds) are errors that say so.

Everything the server sends is hostile until checked. Option replies must
carry the magic and the option sent and are bounded by
:data:`wire.MAX_OPTION_DATA`; info payloads have their documented lengths.
In transmission every reply must name an outstanding cookie; a simple reply
to a READ is refused once structured replies are on ("MUST NOT use a simple
reply for NBD_CMD_READ"). READ chunks must lie inside their request and not
overlap each other, and a successful reply must cover the request exactly;
data lands straight in the caller's buffer, so a reply costs no memory of
its own beyond a bounded list of covered ranges (:data:`MAX_FRAGMENTS`).
BLOCK_STATUS chunks are bounded as proto.md bounds them (2^20 descriptors),
must use the negotiated context id once per reply, every descriptor must be
nonzero and all but the last must end inside the request; the last may reach
past it ("MAY result in a sum larger than the original requested length")
and is clipped. Error chunks need a nonzero error and a message that fits.
Any breach raises :class:`~addcow.errors.RemoteReplyError`; the connection is
then out of step and must be dropped. A reply's chunk count is bounded too
(:func:`_max_chunks`), so a server cannot keep one request alive forever.
"""

from __future__ import annotations

import bisect
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import RemoteBackingError, RemoteReplyError
from ..sysio import fill_zero
from . import wire

# proto.md, "Newstyle negotiation": the old style greeting puts this after NBDMAGIC.
OLDSTYLE_MAGIC = 0x00420281861253
# proto.md, NBD_REPLY_TYPE_BLOCK_STATUS: "the size of NBD_REPLY_TYPE_BLOCK_STATUS
# should not be more than 4 + 8*2^20 (8,388,612 bytes)".
MAX_STATUS_PAYLOAD = 4 + 8 * (1 << 20)
# The most disjoint covered ranges one READ reply may leave at a time. Servers
# send chunks in order (one range); a reply scattering more is refused.
MAX_FRAGMENTS = 4096
# Error chunk payloads: error, message length, message, and an offset.
MAX_ERROR_PAYLOAD = wire.ERROR_PAYLOAD.size + wire.MAX_STRING + 8
# The largest READ or BLOCK_STATUS length one request may carry (32-bit field).
MAX_REQUEST_LENGTH = 0xFFFFFFFF


def _max_chunks(length: int) -> int:
    """Chunks one reply may have: generous for real servers, finite for hostile ones."""
    return length // 64 + 1024


# -- events ------------------------------------------------------------------------------


class StartTLS(NamedTuple):
    """The server accepted STARTTLS: wrap the socket in TLS, then feed ``b""``."""


class Ready(NamedTuple):
    """Negotiation is over; transmission may start."""

    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    structured: bool
    block_status: bool


class ReadDone(NamedTuple):
    """A READ succeeded: its buffer holds every byte asked for."""

    cookie: int


class StatusDone(NamedTuple):
    """A BLOCK_STATUS succeeded; :meth:`extents` gives (offset, length, flags)."""

    cookie: int
    offset: int
    length: int
    descriptors: bytes

    def extents(self) -> Iterator[tuple[int, int, int]]:
        """The extents, clipped to the request (at least one, all nonempty)."""
        pos, end = self.offset, self.offset + self.length
        for length, flags in wire.BLOCK_STATUS_DESCRIPTOR.iter_unpack(self.descriptors):
            take = min(length, end - pos)
            yield pos, take, flags
            pos += take


class RequestFailed(NamedTuple):
    """The server answered a request with an error (the connection stays usable)."""

    cookie: int
    errno: int
    message: str


Event = StartTLS | Ready | ReadDone | StatusDone | RequestFailed


class Need(NamedTuple):
    """What the protocol wants next: ``size`` bytes, received into ``into`` if set."""

    size: int
    into: memoryview | None = None


_Parser = Generator[Need, bytes | None, None]


@dataclass
class _Request:
    command: int
    offset: int
    length: int
    buffer: memoryview | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)
    error: tuple[int, str] | None = None
    status: bytes | None = None
    chunks: int = 0


def _reply_error(message: str) -> RemoteReplyError:
    return RemoteReplyError(f"NBD server broke the protocol: {message}")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


_OPTION_NAMES = {
    wire.OPT_STARTTLS: "STARTTLS",
    wire.OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    wire.OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    wire.OPT_GO: "GO",
}

_ERROR_NAMES = {
    wire.REP_ERR_UNSUP: "ERR_UNSUP",
    wire.REP_ERR_POLICY: "ERR_POLICY",
    wire.REP_ERR_INVALID: "ERR_INVALID",
    wire.REP_ERR_PLATFORM: "ERR_PLATFORM",
    wire.REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    wire.REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    wire.REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    wire.REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    wire.REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}


class ClientConnection:
    """One NBD client connection's protocol state, from greeting to disconnect."""

    def __init__(self, export: str, *, tls: bool = False, structured: bool = True,
                 block_status: bool = True) -> None:  # fmt: skip
        name = export.encode("utf-8")
        if len(name) > wire.MAX_STRING or b"\0" in name:
            raise RemoteBackingError(
                f"NBD export name: expected at most {wire.MAX_STRING} bytes without NUL, "
                f"found {len(name)} bytes"
            )
        self.export = export
        self._name = name
        self._tls = tls
        self._want_structured = structured
        self._want_status = block_status
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._requests: dict[int, _Request] = {}
        self._next_cookie = 1
        self.ready: Ready | None = None
        self.structured = False
        self._context_id: int | None = None
        self.closed = False
        self._parser: _Parser = self._negotiate()
        self.need: Need = next(self._parser)

    # -- the caller's loop ---------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to send now (and forget)."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes | None) -> None:
        """Give the bytes asked for by :attr:`need` (None when they went into its buffer)."""
        if data is not None and len(data) != self.need.size:
            raise ValueError(f"fed {len(data)} bytes, {self.need.size} were needed")
        self.need = self._parser.send(data)

    def events(self) -> list[Event]:
        """Events since the last call."""
        out = self._events
        self._events = []
        return out

    @property
    def outstanding(self) -> int:
        return len(self._requests)

    # -- transmission requests -----------------------------------------------------------

    def read(self, offset: int, buffer: memoryview) -> int:
        """Queue a READ filling ``buffer`` from ``offset``; returns its cookie."""
        return self._request(wire.CMD_READ, offset, len(buffer), buffer)

    def block_status(self, offset: int, length: int) -> int:
        """Queue a BLOCK_STATUS for base:allocation; returns its cookie."""
        if self._context_id is None:
            raise RemoteBackingError("NBD block status: expected base:allocation negotiated, "
                                     "found the server does not offer it")  # fmt: skip
        return self._request(wire.CMD_BLOCK_STATUS, offset, length, None)

    def disconnect(self) -> None:
        """Queue NBD_CMD_DISC; nothing more may be sent."""
        if self.ready is not None and not self.closed:
            self._out.append(wire.REQUEST_HEADER.pack(
                wire.REQUEST_MAGIC, 0, wire.CMD_DISC, 0, 0, 0))  # fmt: skip
        self.closed = True

    def _request(self, command: int, offset: int, length: int, buffer: memoryview | None) -> int:
        ready = self.ready
        if ready is None or self.closed:
            raise RemoteBackingError(
                "NBD request: expected an open connection, found "
                + ("it closed" if self.closed else "negotiation")
            )
        if not 0 < length <= MAX_REQUEST_LENGTH or offset < 0 or offset + length > ready.size:
            raise RemoteBackingError(
                f"NBD request: expected a range inside the export's {ready.size} bytes, "
                f"found {length} bytes at {offset}"
            )
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < (1 << 64) - 1 else 1
        self._requests[cookie] = _Request(command, offset, length, buffer)
        self._out.append(wire.REQUEST_HEADER.pack(
            wire.REQUEST_MAGIC, 0, command, cookie, offset, length))  # fmt: skip
        return cookie

    # -- negotiation ---------------------------------------------------------------------

    def _option(self, option: int, data: bytes = b"") -> None:
        self._out.append(wire.OPTION_HEADER.pack(wire.IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> Generator[Need, bytes | None, tuple[int, bytes]]:
        header = yield Need(wire.OPTION_REPLY_HEADER.size)
        assert header is not None
        magic, got, reply, length = wire.OPTION_REPLY_HEADER.unpack(header)
        if magic != wire.OPT_REPLY_MAGIC:
            raise _reply_error(f"option reply magic: expected {wire.OPT_REPLY_MAGIC:#x}, "
                               f"found {magic:#x}")  # fmt: skip
        if got != option:
            raise _reply_error(f"option reply: expected an answer to option {option}, "
                               f"found one to option {got}")  # fmt: skip
        if length > wire.MAX_OPTION_DATA:
            raise _reply_error(f"option reply length: expected at most {wire.MAX_OPTION_DATA}, "
                               f"found {length}")  # fmt: skip
        data: bytes | None = b""
        if length:
            data = yield Need(length)
        assert data is not None
        if reply == wire.REP_ERR_TLS_REQD:
            raise RemoteBackingError(
                f"NBD server: expected to serve {self.export!r} in clear, found it requires "
                "TLS (use an nbds:// or nbds+unix:// URI)"
            )
        return reply, data

    def _refusal(self, option: int, reply: int, data: bytes) -> RemoteBackingError:
        name = _ERROR_NAMES.get(reply, f"{reply:#x}")
        detail = f": {_text(data[: wire.MAX_STRING])}" if data else ""
        return RemoteBackingError(
            f"NBD option {_OPTION_NAMES.get(option, option)}: expected the server to accept "
            f"it, found {name}{detail}"
        )

    def _negotiate(self) -> _Parser:
        greeting = yield Need(wire.GREETING.size)
        assert greeting is not None
        magic, opt_magic, flags = wire.GREETING.unpack(greeting)
        if magic != wire.NBDMAGIC:
            raise _reply_error(f"greeting: expected NBDMAGIC, found {magic:#x}")
        if opt_magic == OLDSTYLE_MAGIC:
            raise RemoteBackingError("NBD greeting: expected the newstyle handshake, found "
                                     "an oldstyle server")  # fmt: skip
        if opt_magic != wire.IHAVEOPT:
            raise _reply_error(f"greeting: expected IHAVEOPT, found {opt_magic:#x}")
        if not flags & wire.FLAG_FIXED_NEWSTYLE:
            raise RemoteBackingError(f"NBD greeting: expected the FIXED_NEWSTYLE flag, "
                                     f"found handshake flags {flags:#x}")  # fmt: skip
        no_zeroes = bool(flags & wire.FLAG_NO_ZEROES)
        client = wire.FLAG_C_FIXED_NEWSTYLE | (wire.FLAG_C_NO_ZEROES if no_zeroes else 0)
        self._out.append(wire.CLIENT_FLAGS.pack(client))

        if self._tls:
            self._option(wire.OPT_STARTTLS)
            reply, data = yield from self._option_reply(wire.OPT_STARTTLS)
            if reply != wire.REP_ACK:
                raise self._refusal(wire.OPT_STARTTLS, reply, data)
            self._events.append(StartTLS())
            yield Need(0)

        if self._want_structured:
            self._option(wire.OPT_STRUCTURED_REPLY)
            reply, data = yield from self._option_reply(wire.OPT_STRUCTURED_REPLY)
            if reply == wire.REP_ACK:
                self.structured = True
            elif not reply & (1 << 31):
                raise _reply_error(f"STRUCTURED_REPLY: expected ACK or an error, found {reply}")

        if self.structured and self._want_status:
            yield from self._set_meta_context()

        self._option(wire.OPT_GO, wire.U32.pack(len(self._name)) + self._name
                     + wire.U16.pack(1) + wire.U16.pack(wire.INFO_BLOCK_SIZE))  # fmt: skip
        export: tuple[int, int] | None = None
        sizes = (1, wire.DEFAULT_PREFERRED_BLOCK, wire.DEFAULT_MAX_BLOCK)
        while True:
            reply, data = yield from self._option_reply(wire.OPT_GO)
            if reply == wire.REP_ACK:
                break
            if reply == wire.REP_INFO:
                if len(data) < 2:
                    raise _reply_error(f"INFO reply: expected at least 2 bytes, found {len(data)}")
                (kind,) = wire.U16.unpack_from(data)
                if kind == wire.INFO_EXPORT:
                    if len(data) != wire.INFO_EXPORT_PAYLOAD.size:
                        raise _reply_error(f"INFO_EXPORT: expected {wire.INFO_EXPORT_PAYLOAD.size}"
                                           f" bytes, found {len(data)}")  # fmt: skip
                    _kind, size, tflags = wire.INFO_EXPORT_PAYLOAD.unpack(data)
                    export = (size, tflags)
                elif kind == wire.INFO_BLOCK_SIZE:
                    if len(data) != wire.INFO_BLOCK_SIZE_PAYLOAD.size:
                        raise _reply_error(
                            f"INFO_BLOCK_SIZE: expected {wire.INFO_BLOCK_SIZE_PAYLOAD.size} "
                            f"bytes, found {len(data)}")  # fmt: skip
                    _kind, low, preferred, high = wire.INFO_BLOCK_SIZE_PAYLOAD.unpack(data)
                    sizes = _check_block_sizes(low, preferred, high)
                continue  # other information (name, description) is not needed
            if reply == wire.REP_ERR_UNKNOWN:
                raise RemoteBackingError(f"NBD server: expected an export named "
                                         f"{self.export!r}, found none"
                                         + (f" ({_text(data)})" if data else ""))  # fmt: skip
            if reply == wire.REP_ERR_UNSUP and export is None:
                export = yield from self._export_name(no_zeroes)
                break
            if reply & (1 << 31):
                raise self._refusal(wire.OPT_GO, reply, data)
            raise _reply_error(f"GO: expected INFO, ACK or an error, found reply type {reply}")
        if export is None:
            raise _reply_error("GO: expected NBD_INFO_EXPORT before the ACK, found none")
        size, tflags = export
        if not tflags & wire.FLAG_HAS_FLAGS:
            raise _reply_error(f"transmission flags: expected HAS_FLAGS, found {tflags:#x}")
        if size >= 1 << 63:
            raise _reply_error(f"export size: expected less than 2^63, found {size}")
        self.ready = Ready(size, tflags, *sizes, self.structured, self._context_id is not None)
        self._events.append(self.ready)
        yield from self._transmission()

    def _set_meta_context(self) -> Generator[Need, bytes | None, None]:
        query = wire.CONTEXT_BASE_ALLOCATION.encode()
        self._option(wire.OPT_SET_META_CONTEXT,
                     wire.U32.pack(len(self._name)) + self._name + wire.U32.pack(1)
                     + wire.U32.pack(len(query)) + query)  # fmt: skip
        granted: int | None = None
        while True:
            reply, data = yield from self._option_reply(wire.OPT_SET_META_CONTEXT)
            if reply == wire.REP_ACK:
                break
            if reply == wire.REP_META_CONTEXT:
                if len(data) < 4 or data[4:] != query or granted is not None:
                    raise _reply_error(f"META_CONTEXT: expected one {query.decode()!r}, "
                                       f"found {_text(data[4:260])!r}")  # fmt: skip
                (granted,) = wire.U32.unpack_from(data)
                continue
            if reply & (1 << 31):
                return  # no block status: everything reads as data
            raise _reply_error(f"SET_META_CONTEXT: expected META_CONTEXT, ACK or an error, "
                               f"found reply type {reply}")  # fmt: skip
        self._context_id = granted

    def _export_name(self, no_zeroes: bool) -> Generator[Need, bytes | None, tuple[int, int]]:
        """NBD_OPT_EXPORT_NAME, for servers without GO: no reply but the export's."""
        self._context_id = None  # the metadata context belonged to the refused GO path
        self._out.append(wire.OPTION_HEADER.pack(wire.IHAVEOPT, wire.OPT_EXPORT_NAME,
                                                 len(self._name)) + self._name)  # fmt: skip
        count = wire.EXPORT_NAME_REPLY.size + (0 if no_zeroes else len(wire.EXPORT_NAME_ZEROES))
        data = yield Need(count)
        assert data is not None
        size, tflags = wire.EXPORT_NAME_REPLY.unpack_from(data)
        return size, tflags

    # -- transmission --------------------------------------------------------------------

    def _transmission(self) -> _Parser:
        while True:
            head = yield Need(4)
            assert head is not None
            (magic,) = wire.U32.unpack(head)
            if magic == wire.SIMPLE_REPLY_MAGIC:
                yield from self._simple_reply(head)
            elif magic == wire.STRUCTURED_REPLY_MAGIC and self.structured:
                yield from self._chunk(head)
            else:
                raise _reply_error(f"reply magic: expected {wire.SIMPLE_REPLY_MAGIC:#x}"
                                   + (f" or {wire.STRUCTURED_REPLY_MAGIC:#x}"
                                      if self.structured else "")
                                   + f", found {magic:#x}")  # fmt: skip

    def _lookup(self, cookie: int) -> _Request:
        request = self._requests.get(cookie)
        if request is None:
            raise _reply_error(f"reply cookie: expected one of {len(self._requests)} "
                               f"outstanding requests, found {cookie:#x}")  # fmt: skip
        return request

    def _simple_reply(self, head: bytes) -> _Parser:
        rest = yield Need(wire.SIMPLE_REPLY_HEADER.size - 4)
        assert rest is not None
        _magic, error, cookie = wire.SIMPLE_REPLY_HEADER.unpack(head + rest)
        request = self._lookup(cookie)
        if error:
            del self._requests[cookie]
            self._events.append(RequestFailed(cookie, error, ""))
            return
        if request.command == wire.CMD_READ:
            if self.structured:
                raise _reply_error("READ reply: expected a structured reply, found a simple one")
            assert request.buffer is not None
            yield Need(request.length, request.buffer)
            del self._requests[cookie]
            self._events.append(ReadDone(cookie))
            return
        raise _reply_error("BLOCK_STATUS reply: expected a structured reply, found a simple "
                           "one without an error")  # fmt: skip

    def _chunk(self, head: bytes) -> _Parser:
        rest = yield Need(wire.CHUNK_HEADER.size - 4)
        assert rest is not None
        _magic, flags, kind, cookie, length = wire.CHUNK_HEADER.unpack(head + rest)
        request = self._lookup(cookie)
        request.chunks += 1
        if request.chunks > _max_chunks(request.length):
            raise _reply_error(f"reply to cookie {cookie:#x}: expected at most "
                               f"{_max_chunks(request.length)} chunks, found more")  # fmt: skip
        if kind == wire.REPLY_TYPE_OFFSET_DATA and request.command == wire.CMD_READ:
            yield from self._data_chunk(request, length)
        elif kind == wire.REPLY_TYPE_OFFSET_HOLE and request.command == wire.CMD_READ:
            if length != wire.OFFSET_HOLE_PAYLOAD.size:
                raise _reply_error(f"OFFSET_HOLE length: expected "
                                   f"{wire.OFFSET_HOLE_PAYLOAD.size}, found {length}")  # fmt: skip
            payload = yield Need(length)
            assert payload is not None
            offset, size = wire.OFFSET_HOLE_PAYLOAD.unpack(payload)
            start = self._cover(request, offset, size, "OFFSET_HOLE")
            assert request.buffer is not None
            fill_zero(request.buffer[start : start + size])
        elif kind == wire.REPLY_TYPE_BLOCK_STATUS and request.command == wire.CMD_BLOCK_STATUS:
            yield from self._status_chunk(request, length)
        elif kind == wire.REPLY_TYPE_NONE:
            if length or not flags & wire.REPLY_FLAG_DONE:
                raise _reply_error(f"NONE chunk: expected length 0 and the DONE flag, "
                                   f"found length {length}, flags {flags:#x}")  # fmt: skip
        elif kind & (1 << 15):
            yield from self._error_chunk(request, kind, length)
        else:
            name = wire.COMMAND_NAMES.get(request.command, str(request.command))
            raise _reply_error(f"reply to {name}: expected a chunk type valid for it, "
                               f"found type {kind}")  # fmt: skip
        if flags & wire.REPLY_FLAG_DONE:
            self._finish(cookie, request)

    def _cover(self, request: _Request, offset: int, size: int, what: str) -> int:
        """Record [offset, offset+size) as answered; returns its start in the buffer."""
        start = offset - request.offset
        if size <= 0 or start < 0 or start + size > request.length:
            raise _reply_error(
                f"{what} chunk: expected a nonempty range inside the {request.length} bytes "
                f"at {request.offset}, found {size} bytes at {offset}"
            )
        end = start + size
        covered = request.covered
        i = bisect.bisect_right(covered, (start, 1 << 64))
        if (i and covered[i - 1][1] > start) or (i < len(covered) and covered[i][0] < end):
            raise _reply_error(f"{what} chunk: expected no overlap with earlier chunks, "
                               f"found {size} bytes at {offset} read twice")  # fmt: skip
        # Merge with neighbours so that chunks sent in order keep one range.
        if i and covered[i - 1][1] == start:
            i -= 1
            start = covered.pop(i)[0]
        if i < len(covered) and covered[i][0] == end:
            end = covered.pop(i)[1]
        covered.insert(i, (start, end))
        if len(covered) > MAX_FRAGMENTS:
            raise _reply_error(f"READ reply: expected chunks mostly in order, found more than "
                               f"{MAX_FRAGMENTS} disjoint pieces")  # fmt: skip
        return offset - request.offset

    def _data_chunk(self, request: _Request, length: int) -> _Parser:
        head = wire.OFFSET_DATA_PAYLOAD.size
        if not head < length <= head + request.length:
            raise _reply_error(f"OFFSET_DATA length: expected {head + 1} to "
                               f"{head + request.length}, found {length}")  # fmt: skip
        payload = yield Need(head)
        assert payload is not None
        (offset,) = wire.OFFSET_DATA_PAYLOAD.unpack(payload)
        start = self._cover(request, offset, length - head, "OFFSET_DATA")
        assert request.buffer is not None
        yield Need(length - head, request.buffer[start : start + length - head])

    def _status_chunk(self, request: _Request, length: int) -> _Parser:
        size = wire.BLOCK_STATUS_DESCRIPTOR.size
        if length < 4 + size or (length - 4) % size or length > MAX_STATUS_PAYLOAD:
            raise _reply_error(f"BLOCK_STATUS length: expected 4 + 8n bytes (n from 1 to "
                               f"2^20), found {length}")  # fmt: skip
        payload = yield Need(length)
        assert payload is not None
        (context,) = wire.U32.unpack_from(payload)
        if context != self._context_id or request.status is not None:
            raise _reply_error(f"BLOCK_STATUS chunk: expected one for context "
                               f"{self._context_id}, found context {context}"
                               + (" again" if request.status is not None else ""))  # fmt: skip
        descriptors = payload[4:]
        total = 0
        for extent, _flags in wire.BLOCK_STATUS_DESCRIPTOR.iter_unpack(descriptors):
            if total >= request.length:
                raise _reply_error(
                    f"BLOCK_STATUS chunk: expected extents ending inside the {request.length} "
                    f"bytes requested at {request.offset} (all but the last), found more"
                )
            if extent == 0:
                raise _reply_error("BLOCK_STATUS chunk: expected nonzero extent lengths, "
                                   "found 0")  # fmt: skip
            total += extent
        request.status = descriptors

    def _error_chunk(self, request: _Request, kind: int, length: int) -> _Parser:
        head = wire.ERROR_PAYLOAD.size
        if not head <= length <= MAX_ERROR_PAYLOAD:
            raise _reply_error(f"error chunk length: expected {head} to {MAX_ERROR_PAYLOAD}, "
                               f"found {length}")  # fmt: skip
        payload = yield Need(length)
        assert payload is not None
        error, size = wire.ERROR_PAYLOAD.unpack_from(payload)
        tail = 8 if kind == wire.REPLY_TYPE_ERROR_OFFSET else 0
        if error == 0 or head + size + tail > length:
            raise _reply_error(f"error chunk: expected a nonzero error and a message of at "
                               f"most {length - head - tail} bytes, found error {error}, "
                               f"message length {size}")  # fmt: skip
        message = _text(payload[head : head + size])
        if kind == wire.REPLY_TYPE_ERROR_OFFSET:
            (offset,) = wire.OFFSET_DATA_PAYLOAD.unpack_from(payload, head + size)
            if not request.offset <= offset < request.offset + request.length:
                raise _reply_error(f"ERROR_OFFSET chunk: expected an offset inside the request "
                                   f"at {request.offset}, found {offset}")  # fmt: skip
            message = f"{message} (at offset {offset})" if message else f"at offset {offset}"
        if request.error is None:
            request.error = (error, message)

    def _finish(self, cookie: int, request: _Request) -> None:
        del self._requests[cookie]
        if request.error is not None:
            self._events.append(RequestFailed(cookie, *request.error))
        elif request.command == wire.CMD_READ:
            done = request.covered == [(0, request.length)]
            if not done:
                got = sum(end - start for start, end in request.covered)
                raise _reply_error(f"READ reply: expected {request.length} bytes, "
                                   f"found {got}")  # fmt: skip
            self._events.append(ReadDone(cookie))
        else:
            if request.status is None:
                raise _reply_error("BLOCK_STATUS reply: expected a status chunk, found none")
            self._events.append(StatusDone(cookie, request.offset, request.length, request.status))


def _check_block_sizes(low: int, preferred: int, high: int) -> tuple[int, int, int]:
    """Validate NBD_INFO_BLOCK_SIZE ("minimum ... MUST be a power of 2", and so on)."""

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not (
        power_of_two(low)
        and low <= 1 << 16
        and power_of_two(preferred)
        and preferred >= low
        and high >= low
        and (high == 0xFFFFFFFF or high % low == 0)
    ):
        raise _reply_error(f"INFO_BLOCK_SIZE: expected a power-of-two minimum up to 64 KiB, "
                           f"preferred and maximum multiples of it, found {low}, {preferred}, "
                           f"{high}")  # fmt: skip
    return low, preferred, min(high, MAX_REQUEST_LENGTH)
