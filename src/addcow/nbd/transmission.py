"""The transmission phase of an NBD connection, server side: requests in, replies out.

Quotes marked "proto.md" are from the NetworkBlockDevice project's
``doc/proto.md``, the protocol's specification.

:class:`Transmission` knows only what the handshake settled, as
:class:`~addcow.nbd.events.TransmissionStarted` reported it: the export, the
transmission flags, structured replies and the selected metadata contexts.

Requests
    :meth:`Transmission.next_request` parses the request at the head of the
    connection's buffer and checks it (command, flags, range, alignment,
    permissions) per proto.md's "Error values": a valid one is a
    :class:`~addcow.nbd.events.Request`, a refused one a
    :class:`~addcow.nbd.events.RequestError` that the server answers with
    :meth:`Transmission.reply_error`. Only a wrong magic ends the connection
    (there is no length to skip by). A WRITE over the maximum block size is
    refused and its payload skipped as it arrives, never buffered.
    :meth:`Transmission.plain_reads` takes a run of *plain* reads (no flags,
    in range, aligned, short) from the head of the buffer at once, as tuples:
    the requests a server answers most, without an event each. It stops at
    the first request of any other kind, which :meth:`next_request` then
    parses and checks as always.

Replies
    Built as bytes (or a list of buffers, so a read's data is never copied)
    by the ``reply_*`` methods; the server may send them in any order, as the
    protocol allows. With structured replies, runs of zeros in a read become
    OFFSET_HOLE chunks and errors carry their message.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import zeros
from .events import (
    Disconnect,
    ExportInfo,
    LocalProtocolError,
    Move,
    Need,
    RemoteProtocolError,
    Request,
    RequestError,
    Skip,
    Step,
    TransmissionStarted,
)
from .negotiation import truncate_utf8
from .state import Trigger
from .wire import (
    BLOCK_STATUS_DESCRIPTOR,
    CHUNK_HEADER,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    COMMAND_NAMES,
    CONTEXT_IDS,
    EINVAL,
    ENOSPC,
    EPERM,
    ERROR_PAYLOAD,
    FLAG_READ_ONLY,
    FLAG_SEND_DF,
    MAX_STRING,
    OFFSET_DATA_PAYLOAD,
    OFFSET_HOLE_PAYLOAD,
    READ_HEADROOM,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
)

__all__ = ["Transmission"]

# Command flags each command accepts. "NBD_CMD_FLAG_FUA; This flag is valid for
# all commands, provided NBD_FLAG_SEND_FUA has been negotiated".
_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}
_WRITING = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


class Transmission:
    """The transmission phase of one connection: requests checked, replies built."""

    def __init__(self, started: TransmissionStarted) -> None:
        self.export = started.export
        self.flags = started.flags
        self.structured = started.structured
        self.contexts = started.contexts
        # Commands that, without flags, in range and aligned, need no other check.
        self._plain = (CMD_READ,) if started.export.read_only else (CMD_READ, CMD_WRITE)

    # -- requests ----------------------------------------------------------------------------

    def next_request(self, buf: bytearray, start: int, end: int) -> tuple[Step, int]:
        """The request at the head of ``buf[start:end]``, checked, and how many bytes it
        took from there (a Skip takes its own)."""
        if end - start < REQUEST_HEADER.size:
            return Need("a request header" if end > start else ""), 0
        magic, flags, command, cookie, offset, length = REQUEST_HEADER.unpack_from(buf, start)
        if magic != REQUEST_MAGIC:
            # No length to skip by: the stream cannot be resynchronised.
            raise RemoteProtocolError(
                f"request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}"
            )
        export = self.export
        data: bytes | None = None
        used = REQUEST_HEADER.size
        if command == CMD_WRITE:
            if length > export.max_block:
                # Refused, but the payload still follows: skip it without buffering.
                message = f"{length} bytes is over the maximum block size {export.max_block}"
                event = _refuse(cookie, command, flags, offset, length, EINVAL, message)
                return Skip(used, length, event, "an oversized write payload"), 0
            used += length
            if end - start < used:
                return Need("a write payload"), 0
            data = bytes(memoryview(buf)[start + REQUEST_HEADER.size : start + used])
        if (
            not flags
            and command in self._plain
            and offset + length <= export.size
            and length <= export.max_block
            and not (offset % export.min_block or length % export.min_block)
        ):
            return Request(cookie, command, flags, offset, length, data), used
        if command == CMD_DISC:
            # "The server MUST handle all outstanding requests ... and close".
            return Move(Trigger.DISC, Disconnect()), used
        problem = self._check(export, command, flags, offset, length)
        if problem is not None:
            return _refuse(cookie, command, flags, offset, length, *problem), used
        return Request(cookie, command, flags, offset, length, data), used

    def plain_reads(
        self, buf: bytearray, start: int, end: int, longest: int
    ) -> tuple[list[tuple[int, int, int]], int]:
        """The plain reads at the head of ``buf[start:end]`` as (cookie, offset, length),
        and the bytes they took: READs without flags, of 1 to ``longest`` bytes (and
        no more than the maximum block size), aligned to the minimum block size and
        inside the export. They need no other check; anything else ends the run."""
        export = self.export
        size, align = export.size, export.min_block
        longest = min(longest, export.max_block)
        unpack = REQUEST_HEADER.unpack_from
        step = REQUEST_HEADER.size
        reads: list[tuple[int, int, int]] = []
        pos = start
        while end - pos >= step:
            magic, flags, command, cookie, offset, length = unpack(buf, pos)
            if (
                magic != REQUEST_MAGIC
                or flags
                or command != CMD_READ
                or not 0 < length <= longest
                or offset + length > size
                or offset % align
                or length % align
            ):
                break
            reads.append((cookie, offset, length))
            pos += step
        return reads, pos - start

    def _check(
        self, export: ExportInfo, command: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """The error a request gets, per proto.md "Error values", or None."""
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return EINVAL, "unknown command"
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command
        # flag. It also SHOULD return NBD_EINVAL if it receives a request with a
        # flag not explicitly documented as applicable to the given request."
        if not self.flags & FLAG_SEND_DF:
            allowed &= ~CMD_FLAG_DF
        if self.flags & FLAG_READ_ONLY:
            allowed &= ~CMD_FLAG_FAST_ZERO
        if flags & ~allowed:
            return EINVAL, f"flags {flags:#x} not valid for this command"
        # "it SHOULD return NBD_EPERM if it receives a write or trim request on a
        # read-only export."
        if command in _WRITING and export.read_only:
            return EPERM, "the export is read-only"
        if command == CMD_BLOCK_STATUS:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending
            # NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            if not self.structured:
                return EINVAL, "needs structured replies (NBD_OPT_STRUCTURED_REPLY)"
            if not self.contexts:
                return EINVAL, "no metadata context was selected"
            if length == 0:
                return EINVAL, "length 0 (a reply needs at least one extent)"
        if command == CMD_FLUSH:
            # "For a flush request, length and offset are reserved, and MUST be set
            # to all-zero."
            if offset or length:
                return EINVAL, "offset and length must be zero"
            return None
        if offset + length > export.size:
            where = f"{length} bytes at offset {offset} go past the end ({export.size})"
            # "The server SHOULD return NBD_ENOSPC if it receives a write request
            # including one or more sectors beyond the size of the device. ... It
            # SHOULD return NBD_EINVAL if it receives a read or trim request
            # including one or more sectors beyond the size of the device"; write
            # zeroes: "SHOULD return NBD_ENOSPC"; block status: "SHOULD return
            # NBD_EINVAL".
            if command in (CMD_WRITE, CMD_WRITE_ZEROES):
                return ENOSPC, where
            return EINVAL, where
        # "for NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_CACHE and NBD_CMD_WRITE_ZEROES
        # (except for when NBD_CMD_FLAG_FAST_ZERO is set), the client MUST NOT use a
        # length larger than any advertised maximum block size. The server SHOULD
        # report an NBD_EINVAL error if ... [it] is larger than the advertised
        # maximum block size." Write zeroes carries no payload, so we serve any
        # length of it (the limit protects memory, which zeroing does not use).
        if command in (CMD_READ, CMD_CACHE) and length > export.max_block:
            return EINVAL, f"{length} bytes is over the maximum block size {export.max_block}"
        # EOVERFLOW: "A server MAY reject a client's request with the error
        # NBD_EOVERFLOW if the length is too large to send without fragmentation".
        # A DF read up to the maximum block size is always sent whole, and longer
        # reads are refused above with EINVAL, so EOVERFLOW is never needed.
        if offset % export.min_block or length % export.min_block:
            return EINVAL, f"not aligned to the minimum block size {export.min_block}"
        return None

    # -- replies ------------------------------------------------------------------------------

    def reply_ok(self, cookie: int) -> bytes:
        """Success without data (any command but READ and BLOCK_STATUS)."""
        # "If structured replies have been negotiated, a simple reply MAY be used
        # as a reply to any request other than NBD_CMD_READ, but only if the reply
        # has no data payload."
        return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        """An error reply; with structured replies it carries ``message``."""
        if error <= 0 or error > 0xFFFFFFFF:
            raise LocalProtocolError(f"error value {error} is not a positive 32-bit number")
        if not self.structured:
            # Simple reply: "If it chooses not to [disconnect], it MUST NOT send any
            # payload for this request."
            return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        # "The server SHOULD prefer sending errors via a structured reply, as the
        # error can then be accompanied by a string payload"; "MUST NOT use a
        # simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL)".
        # "message length MUST NOT exceed the 4096 bytes string length limit".
        text = truncate_utf8(message, MAX_STRING)
        payload = ERROR_PAYLOAD.pack(error, len(text)) + text
        return (
            CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)
            )
            + payload
        )

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: memoryview,
        *,
        df: bool = False,
        base: bytearray | None = None,
    ) -> list[bytes | memoryview]:
        """The reply to a successful READ of ``data`` at ``offset``, as buffers.

        With structured replies, runs of zeros (:func:`addcow.zeros.segments`)
        become OFFSET_HOLE chunks; with ``df`` (NBD_CMD_FLAG_DF) at most one
        content chunk is sent.
        """
        if not self.structured:
            return [SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        length = len(data)
        if length == 0:
            return [
                CHUNK_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
                )
            ]
        if df or length < zeros.GRANULE:
            # "If the area being read contains both data and a hole, the server MUST
            # use NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present."
            runs = [(0, length, zeros.is_zero(_whole(data), 0, length))]
        elif base is not None:
            # data is base[READ_HEADROOM:][:length]: scan it there, without a copy.
            runs = zeros.segments(base, READ_HEADROOM, length, offset)
        else:
            runs = zeros.segments(_whole(data), 0, length, offset)
        out: list[bytes | memoryview] = []
        last = len(runs) - 1
        for i, (lo, hi, zero) in enumerate(runs):
            # Everything is in memory, so no error can follow the last chunk: it
            # may carry DONE ("MUST NOT do so for a content chunk if it would still
            # be possible to detect an error while transmitting the chunk").
            flags = REPLY_FLAG_DONE if i == last else 0
            if zero:
                out.append(
                    CHUNK_HEADER.pack(
                        STRUCTURED_REPLY_MAGIC,
                        flags,
                        REPLY_TYPE_OFFSET_HOLE,
                        cookie,
                        OFFSET_HOLE_PAYLOAD.size,
                    )
                    + OFFSET_HOLE_PAYLOAD.pack(offset + lo, hi - lo)
                )
            else:
                out.append(
                    CHUNK_HEADER.pack(
                        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + hi - lo
                    )
                    + OFFSET_DATA_PAYLOAD.pack(offset + lo)
                )
                out.append(data[lo:hi])
        return out

    def reply_read_into(
        self, buf: bytearray, cookie: int, offset: int, length: int, *, df: bool = False
    ) -> list[bytes | memoryview]:
        """:meth:`reply_read` for data already read into ``buf[READ_HEADROOM:][:length]``.

        When the reply is one chunk (the usual case for data) its header is
        written into the headroom, so the reply is one buffer: a view of ``buf``.
        """
        end = READ_HEADROOM + length
        view = memoryview(buf)
        if not self.structured:
            start = READ_HEADROOM - SIMPLE_REPLY_HEADER.size
            SIMPLE_REPLY_HEADER.pack_into(buf, start, SIMPLE_REPLY_MAGIC, 0, cookie)
            return [view[start:end]]
        if length >= zeros.GRANULE and not zeros.has_zero_segment(
            buf, READ_HEADROOM, length, offset
        ):
            # No zero segment: one data chunk (as reply_read would send).
            CHUNK_HEADER.pack_into(
                buf, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                cookie, 8 + length,
            )  # fmt: skip
            OFFSET_DATA_PAYLOAD.pack_into(buf, CHUNK_HEADER.size, offset)
            return [view[:end]]
        return self.reply_read(cookie, offset, view[READ_HEADROOM:end], df=df, base=buf)

    def reply_read_around(self, cookie: int, offset: int, length: int) -> tuple[bytes, bytes]:
        """The bytes that go before and after ``length`` data bytes sent by the caller.

        For a reply whose data the caller copies to the socket itself (``sendfile``).
        Structured: one OFFSET_DATA chunk *without* DONE, then a NONE chunk with
        DONE, because the data is not in memory yet ("The server MUST NOT set
        [DONE] for a content chunk if it would still be possible to detect an
        error while transmitting the chunk"). Simple: the header, and nothing
        after; an error in the middle can then only be answered by closing the
        connection.
        """
        if not self.structured:
            return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, 0, cookie), b""
        head = CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, 0, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length
        ) + OFFSET_DATA_PAYLOAD.pack(offset)
        tail = CHUNK_HEADER.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
        )
        return head, tail

    def reply_block_status(
        self, cookie: int, extents: Sequence[tuple[str, Sequence[tuple[int, int]]]]
    ) -> bytes:
        """The reply to BLOCK_STATUS: for each context, its (length, flags) descriptors."""
        if not self.structured:
            raise LocalProtocolError("block status needs structured replies")
        if {name for name, _ in extents} != set(self.contexts) or len(extents) != len(
            self.contexts
        ):
            raise LocalProtocolError(
                f"block status must answer each selected context once: {self.contexts}"
            )
        out = bytearray()
        for i, (name, descriptors) in enumerate(extents):
            if not descriptors:
                raise LocalProtocolError(f"no extent for {name} (at least one is required)")
            payload = bytearray(U32.pack(CONTEXT_IDS[name]))
            for length, status in descriptors:
                if not 0 < length <= 0xFFFFFFFF:
                    raise LocalProtocolError(f"extent length {length} (must be 1..2^32-1)")
                payload += BLOCK_STATUS_DESCRIPTOR.pack(length, status)
            flags = REPLY_FLAG_DONE if i == len(extents) - 1 else 0
            out += CHUNK_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)
            )
            out += payload
        return bytes(out)


def _refuse(
    cookie: int, command: int, flags: int, offset: int, length: int, error: int, message: str
) -> RequestError:
    name = COMMAND_NAMES.get(command, f"command {command}")
    return RequestError(cookie, command, flags, offset, length, error, f"{name}: {message}")


def _whole(data: memoryview) -> bytes | bytearray:
    """The bytes object behind ``data`` when it views all of it, else a copy."""
    obj = data.obj
    if isinstance(obj, (bytes, bytearray)) and len(obj) == data.nbytes:
        return obj
    return data.tobytes()
