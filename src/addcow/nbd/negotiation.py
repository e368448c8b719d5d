"""The handshake of an NBD connection, server side: client flags, then options.

Quotes marked "proto.md" are from the NetworkBlockDevice project's
``doc/proto.md``, the protocol's specification.

:class:`Negotiation` holds what the handshake has settled so far (the client
flags, TLS, structured replies, the selected metadata contexts) and answers
every option itself from the export table it was given: replies are queued in
:attr:`Negotiation.out`, and only what the server must act on comes back as an
event (:class:`~addcow.nbd.events.OptionRefused`,
:class:`~addcow.nbd.events.AbortRequested`,
:class:`~addcow.nbd.events.StartTLS`,
:class:`~addcow.nbd.events.TransmissionStarted`). Each call parses one
message from the head of the connection's buffer and returns a
:data:`~addcow.nbd.events.Step`; the connection, not this module, moves
along the transition table. A peer that breaks a MUST here raises
:class:`~addcow.nbd.events.RemoteProtocolError`.

Option payloads are read through :class:`_Reader`, whose every shortfall is
an NBD_REP_ERR_INVALID reply; payloads over :data:`~addcow.nbd.wire.MAX_OPTION_DATA`
are refused with NBD_REP_ERR_TOO_BIG and skipped, never buffered.

TLS modes
    ``off``: STARTTLS is not offered (NOTLS); ``on``: offered, not needed;
    ``require``: every option but STARTTLS and ABORT is refused until TLS is
    active (FORCEDTLS).
"""

from __future__ import annotations

import struct

from .events import (
    AbortRequested,
    ExportInfo,
    Move,
    Need,
    OptionRefused,
    RemoteProtocolError,
    Skip,
    StartTLS,
    Step,
    TransmissionStarted,
    take,
)
from .state import Trigger
from .wire import (
    CLIENT_FLAGS,
    CONTEXT_IDS,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_PAYLOAD,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_EXPORT_PAYLOAD,
    INFO_NAME,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_STRING,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    U16,
    U32,
)

__all__ = ["TLS_MODES", "TLS_OFF", "TLS_ON", "TLS_REQUIRE", "Negotiation", "truncate_utf8"]

TLS_OFF, TLS_ON, TLS_REQUIRE = "off", "on", "require"
TLS_MODES = (TLS_OFF, TLS_ON, TLS_REQUIRE)
"""``off``: no STARTTLS (NOTLS); ``on``: offered, not needed; ``require``: FORCEDTLS."""

_TLS_REQUIRED = "TLS is required: send NBD_OPT_STARTTLS first"


class _Option(Exception):
    """Internal: end an option with an error reply."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class Negotiation:
    """The handshake phase of one connection: what it settled, and the option replies."""

    def __init__(self, exports: tuple[ExportInfo, ...], tls_mode: str) -> None:
        self.exports = exports
        self.tls_mode = tls_mode
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.contexts: tuple[str, ...] = ()
        self._meta_export: ExportInfo | None = None
        self._options_seen = 0
        self.out = bytearray()
        """Replies queued for the peer, taken by the connection's ``data_to_send``."""

    def greeting(self) -> bytes:
        """The server's greeting: fixed newstyle, with NO_ZEROES offered."""
        return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def client_flags(self, buf: bytearray) -> Step:
        """The 32 client flags that answer the greeting."""
        if len(buf) < CLIENT_FLAGS.size:
            return Need("the client flags" if buf else "")
        (flags,) = CLIENT_FLAGS.unpack_from(buf)
        del buf[: CLIENT_FLAGS.size]
        # "the server MUST drop the TCP connection if the client sets an unknown
        # flag, or a flag that does not match something advertised by the server."
        unknown = flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if unknown:
            raise RemoteProtocolError(f"client flags {flags:#x} set unknown bits {unknown:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        return Move(Trigger.CLIENT_FLAGS)

    def tls_started(self) -> None:
        """The TLS handshake is done: negotiation starts again, from nothing.

        "When this command succeeds, the server MUST NOT preserve any
        negotiation state (such as a request for NBD_OPT_STRUCTURED_REPLY, or
        metadata contexts from NBD_OPT_SET_META_CONTEXT) issued before this
        command."
        """
        self.tls_active = True
        self.structured = False
        self.contexts = ()
        self._meta_export = None

    # -- options ---------------------------------------------------------------------------

    def next_option(self, buf: bytearray) -> Step:
        """The option at the head of ``buf``, answered."""
        if len(buf) < OPTION_HEADER.size:
            return Need("an option header" if buf else "")
        magic, option, length = OPTION_HEADER.unpack_from(buf)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(
                f"option magic {magic:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}"
            )
        if self._options_seen >= MAX_OPTIONS:
            raise RemoteProtocolError(
                f"more than {MAX_OPTIONS} options without entering transmission"
            )
        if option == OPT_EXPORT_NAME and self._tls_required():
            # "If the server receives a request to enter transmission mode via
            # NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this
            # request cannot error, it MUST terminate the session."
            raise RemoteProtocolError(
                "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (TLS is required)"
            )
        if option == OPT_EXPORT_NAME and length > MAX_STRING:
            # EXPORT_NAME cannot be answered with an error: "If the chosen export
            # does not exist or requirements ... are not met ..., the server MUST
            # terminate the session."
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME with a {length}-byte name")
        if length > MAX_OPTION_DATA:
            self._options_seen += 1
            # Skip the payload as it arrives; "NBD_REP_ERR_TOO_BIG: The request or
            # the reply is too large to process."
            reply = REP_ERR_TOO_BIG
            message = f"option {option} carries {length} bytes; the limit is {MAX_OPTION_DATA}"
            if self._tls_required() and option not in (OPT_STARTTLS, OPT_ABORT):
                reply, message = REP_ERR_TLS_REQD, _TLS_REQUIRED
            self._reply(option, reply, message.encode())
            event = OptionRefused(option, reply, message)
            return Skip(OPTION_HEADER.size, length, event, "an oversized option payload")
        end = OPTION_HEADER.size + length
        if len(buf) < end:
            return Need("an option payload")
        data = take(buf, OPTION_HEADER.size, end)
        self._options_seen += 1
        try:
            return self._option(option, data, trailing=bool(buf))
        except _Option as refusal:
            self._reply(option, refusal.reply, refusal.message.encode())
            return OptionRefused(option, refusal.reply, refusal.message)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.out += OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, option, reply, len(data))
        self.out += data

    def _tls_required(self) -> bool:
        return self.tls_mode == TLS_REQUIRE and not self.tls_active

    def _option(self, option: int, data: bytes, trailing: bool) -> Step:
        """Answer one option; ``trailing``: more bytes followed it in the buffer."""
        # FORCEDTLS: "If the server receives any other option, including
        # NBD_OPT_INFO and unsupported options, it MUST reply with
        # NBD_REP_ERR_TLS_REQD if TLS has not been initiated" (other than
        # STARTTLS and ABORT; EXPORT_NAME, which cannot error, is handled before).
        if self._tls_required() and option not in (OPT_STARTTLS, OPT_ABORT):
            raise _Option(REP_ERR_TLS_REQD, _TLS_REQUIRED)
        if option == OPT_STARTTLS:
            return self._opt_starttls(data, trailing)
        if option == OPT_EXPORT_NAME:
            return self._opt_export_name(data)
        if option == OPT_ABORT:
            # "The server MUST reply with NBD_REP_ACK." "a server SHOULD ignore any
            # data sent by the client rather than rejecting the request".
            self._reply(option, REP_ACK)
            return Move(Trigger.ABORT, AbortRequested())
        if option == OPT_LIST:
            # "The client MUST NOT send any additional data with the option, and
            # the server SHOULD reject a request that includes data with
            # NBD_REP_ERR_INVALID."
            if data:
                raise _Option(REP_ERR_INVALID, "NBD_OPT_LIST carries no data")
            for export in self.exports:
                # "32 bits, length of name; String, name of the export; If length of
                # name < (reply packet header length - 4), then the rest of the data
                # ... [is] a string suitable for direct display to a human being."
                name = export.name.encode()
                text = truncate_utf8(export.description, MAX_STRING)
                self._reply(option, REP_SERVER, U32.pack(len(name)) + name + text)
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._opt_info_go(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                raise _Option(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
            self.structured = True
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._opt_meta_context(option, data)
            return None
        # "Servers that receive messages which they do not implement MUST reply
        # to them with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next
        # message".
        raise _Option(REP_ERR_UNSUP, f"option {option} is not supported")

    def _opt_starttls(self, data: bytes, trailing: bool) -> Step:
        if self.tls_mode == TLS_OFF or not self.fixed_newstyle:
            # NOTLS ("The server MUST operate in NOTLS mode unless ... the client
            # replied with NBD_FLAG_C_FIXED_NEWSTYLE"): "If the server receives
            # NBD_OPT_STARTTLS it MUST respond with ... NBD_REP_ERR_UNSUP (if it
            # does not support the NBD_OPT_STARTTLS option at all)".
            raise _Option(REP_ERR_UNSUP, "TLS is not offered on this connection")
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been
            # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
            raise _Option(REP_ERR_INVALID, "TLS is already active")
        if data:
            # "The client MUST NOT send any additional data with the option."
            raise _Option(REP_ERR_INVALID, "NBD_OPT_STARTTLS carries no data")
        if trailing:
            # "After an NBD_REP_ACK reply has been sent, ... all further data MUST
            # be sent and received over TLS": plain bytes already sent after the
            # option can only be a broken client (or an attacker's injection).
            raise RemoteProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
        self._reply(OPT_STARTTLS, REP_ACK)
        return Move(Trigger.STARTTLS, StartTLS())

    def _find_export(self, name: str) -> ExportInfo | None:
        # 'A special, "empty", name ... is reserved for a "default" export'.
        if name == "":
            return self.exports[0]
        for export in self.exports:
            if export.name == name:
                return export
        return None

    def _opt_export_name(self, data: bytes) -> Move:
        try:
            name = _decode_string(data, "export name")
        except _Option as exc:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: {exc.message}") from None
        export = self._find_export(name)
        if export is None:
            raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        flags = export.transmission_flags(self.structured)
        # "S: 64 bits, size ... S: 16 bits, transmission flags, S: 124 bytes, zeroes
        # (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)"
        self.out += EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self.out += EXPORT_NAME_ZEROES
        return self._start(Trigger.EXPORT_NAME, export, flags)

    def _start(self, trigger: Trigger, export: ExportInfo, flags: int) -> Move:
        # Contexts count only if "the final time it was sent, it referred to the
        # same export name that was ultimately selected for transmission phase".
        if self._meta_export is not export or not self.structured:
            self.contexts = ()
        return Move(trigger, TransmissionStarted(export, flags, self.structured, self.contexts))

    def _opt_info_go(self, option: int, data: bytes) -> Move | None:
        # "32 bits, length of name (unsigned); MUST be no larger than the option
        # data length - 6; String: name of the export; 16 bits, number of
        # information requests; 16 bits x n - list of NBD_INFO information requests"
        reader = _Reader(data)
        name = reader.string("export name", min_rest=2)
        count = reader.u16()
        requests = [reader.u16() for _ in range(count)] if reader.left == 2 * count else None
        if requests is None or reader.left:
            raise _Option(REP_ERR_INVALID, "information request list does not match the length")
        export = self._find_export(name)
        if export is None:
            # "NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server."
            raise _Option(REP_ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(self.structured)
        self._reply(option, REP_INFO, INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, export.size, flags))
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, U16.pack(INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests and export.description:
            text = export.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, U16.pack(INFO_DESCRIPTION) + text)
        # Sent whether asked or not: our maximum is below the default "effectively
        # unlimited", so "The server MUST send this info if it is requested and it
        # intends to enforce block size constraints other than the defaults".
        self._reply(
            option,
            REP_INFO,
            INFO_BLOCK_SIZE_PAYLOAD.pack(
                INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
            ),
        )
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._start(Trigger.GO, export, flags)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata contexts
            # (including when this command fails)".
            self.contexts = ()
            self._meta_export = None
        # "This option MUST NOT be requested unless structured replies have been
        # negotiated first. If a client attempts to do so, a server SHOULD send
        # NBD_REP_ERR_INVALID."
        if not self.structured:
            raise _Option(REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
        # "32 bits, length of export name; String, name of export; 32 bits, number
        # of queries; Zero or more queries, each being: 32 bits, length of query;
        # String, query"
        reader = _Reader(data)
        name = reader.string("export name", min_rest=4)
        count = reader.u32()
        queries = []
        for _ in range(count):
            if reader.left < 4:
                raise _Option(REP_ERR_INVALID, "query list is longer than the option")
            queries.append(reader.string("query"))
        if reader.left:
            raise _Option(REP_ERR_INVALID, f"{reader.left} bytes after the last query")
        export = self._find_export(name)
        if export is None:
            raise _Option(REP_ERR_UNKNOWN, f"no export named {name!r}")
        found: list[str] = []
        if not queries and not setting:
            # "If zero queries are sent, then the server MUST return all the
            # metadata contexts that are available"; for SET: "the server MUST
            # select no metadata contexts."
            found = list(CONTEXT_IDS)
        for query in queries:
            namespace, colon, leaf = query.partition(":")
            if not colon:
                raise _Option(REP_ERR_INVALID, f"query {query!r} has no namespace")
            for context in CONTEXT_IDS:
                ns, _, ctx_leaf = context.partition(":")
                # "base:" is a wildcard for LIST and "the server MUST ignore this
                # form during NBD_OPT_SET_META_CONTEXT"; unknown leaves and
                # namespaces are ignored, not errors.
                wanted = leaf == ctx_leaf or (leaf == "" and not setting)
                if ns == namespace and wanted and context not in found:
                    found.append(context)
        for context in found:
            context_id = CONTEXT_IDS[context] if setting else 0
            self._reply(option, REP_META_CONTEXT, U32.pack(context_id) + context.encode())
        self._reply(option, REP_ACK)
        if setting:
            self.contexts = tuple(found)
            self._meta_export = export


# -- strings and option payloads ----------------------------------------------------------------


class _Reader:
    """Length-checked reads from an option payload; shortfalls become ERR_INVALID."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def _get(self, st: struct.Struct, what: str) -> int:
        if self.left < st.size:
            raise _Option(REP_ERR_INVALID, f"option data too short for {what}")
        (value,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return int(value)

    def u16(self) -> int:
        return self._get(U16, "a 16-bit field")

    def u32(self) -> int:
        return self._get(U32, "a 32-bit field")

    def string(self, what: str, min_rest: int = 0) -> str:
        """A 32-bit length then that many bytes of UTF-8, leaving ``min_rest`` bytes."""
        length = self._get(U32, f"the length of the {what}")
        if length > MAX_STRING:
            raise _Option(REP_ERR_INVALID, f"{what} of {length} bytes (limit {MAX_STRING})")
        if length > self.left - min_rest:
            raise _Option(REP_ERR_INVALID, f"{what} length {length} overruns the option")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return _decode_string(raw, what)


def _decode_string(raw: bytes, what: str) -> str:
    # "a sequence of UTF-8 code points, which is not NUL terminated, MUST NOT
    # contain NUL characters, ... MUST be no longer than 4096 bytes."
    if len(raw) > MAX_STRING:
        raise _Option(REP_ERR_INVALID, f"{what} of {len(raw)} bytes (limit {MAX_STRING})")
    if b"\0" in raw:
        raise _Option(REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Option(REP_ERR_INVALID, f"{what} is not valid UTF-8") from None


def truncate_utf8(message: str, limit: int) -> bytes:
    """``message`` as UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()
