"""The NBD wire layout, and nothing else: magics, numbers, limits, records.

Quotes marked "proto.md" are from the NetworkBlockDevice project's
``doc/proto.md``, the protocol's specification; section names are its own.

Every integer on the wire is big endian ("network byte order"). This module
owns every magic, flag, option, reply, command, information type, error value,
metadata context and limit of the protocol as this server speaks it, and one
precompiled :class:`struct.Struct` per record, each with its size and the
quote that names it; the server's two phases (:mod:`addcow.nbd.negotiation`,
:mod:`addcow.nbd.transmission`) build and parse messages with them and
hard-code no layout of their own. A record covers the fixed fields of a
message; the variable part that follows (a name, a payload) is the caller's,
sized by a field of the record.

Record sizes (bytes)::

    GREETING 18        OPTION_HEADER 16       OPTION_REPLY_HEADER 20
    CLIENT_FLAGS 4     EXPORT_NAME_REPLY 10   EXPORT_NAME_ZEROES 124
    INFO_EXPORT_PAYLOAD 12                    INFO_BLOCK_SIZE_PAYLOAD 14
    REQUEST_HEADER 28  SIMPLE_REPLY_HEADER 16 CHUNK_HEADER 20
    OFFSET_DATA_PAYLOAD 8   OFFSET_HOLE_PAYLOAD 12   ERROR_PAYLOAD 6
    BLOCK_STATUS_DESCRIPTOR 8
"""

from __future__ import annotations

import struct

PORT = 10809
"""The IANA port for NBD (proto.md: "the default port for NBD connections is 10809")."""

# -- magics (proto.md, "Newstyle negotiation", "Fixed newstyle negotiation",
# "Request message", "Simple reply message", "Structured reply chunk message") --------

# "S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC') (also known as the INIT_PASSWD)"
NBDMAGIC = 0x4E42444D41474943
# "S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')"; the client repeats it before
# every option.
IHAVEOPT = 0x49484156454F5054
# "S: 64 bits, 0x3e889045565a9 (magic number for replies)"
OPT_REPLY_MAGIC = 0x3E889045565A9
# "C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)"
REQUEST_MAGIC = 0x25609513
# "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC ...)"
SIMPLE_REPLY_MAGIC = 0x67446698
# "S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)"
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- numbers (proto.md, "Values") ------------------------------------------------------

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags (16 bits).
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Option types.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_REP_INFO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands ("Request types").
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# Command flags (16 bits).
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values ("The following error values are defined").
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation flags: "NBD_STATE_HOLE (bit 0)", "NBD_STATE_ZERO (bit 1)".
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# The metadata contexts this server offers, with the ids it hands out for them.
# qemu:allocation-depth (QEMU docs/interop/nbd.txt): "the entire 32-bit value
# represents a depth of which layer in a thin-provisioned backing chain provided
# the data (0 for unallocated, 1 for the active layer, 2 for the first backing
# layer, and so forth)."
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_IDS = {CONTEXT_BASE_ALLOCATION: 1, CONTEXT_ALLOCATION_DEPTH: 2}

# -- limits ----------------------------------------------------------------------------

# "that string ... SHOULD be no longer than 256 bytes and MUST be no longer than
# 4096 bytes. This applies to export names and error messages (amongst others)."
MAX_STRING = 4096
# The largest option payload we buffer. GO needs 4 + 4096 + 2 + 2n bytes; a
# SET_META_CONTEXT with a few dozen full-length queries fits as well.
MAX_OPTION_DATA = 64 * 1024
# Options one connection may send before it is deemed a denial of service
# ("if a server believes a client's behaviour constitutes a denial of service,
# it MAY initiate a hard disconnect").
MAX_OPTIONS = 4096
# Block size constraints we advertise by default. "a client desiring maximum
# interoperability SHOULD ... limit NBD_CMD_READ and NBD_CMD_WRITE commands to a
# maximum block size of 2^25 (33,554,432)."
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 1 << 25

# -- records ---------------------------------------------------------------------------

# Newstyle negotiation: "S: 64 bits NBDMAGIC, S: 64 bits IHAVEOPT, S: 16 bits,
# handshake flags"
GREETING = struct.Struct(">QQH")
# Newstyle negotiation: "C: 32 bits, client flags"
CLIENT_FLAGS = struct.Struct(">I")
# Newstyle negotiation: "C: 64 bits IHAVEOPT, C: 32 bits, option, C: 32 bits,
# length of option data (unsigned)", then that many bytes of data.
OPTION_HEADER = struct.Struct(">QII")
# Fixed newstyle negotiation: "S: 64 bits magic, S: 32 bits, the option ..., S: 32
# bits, reply type ..., S: 32 bits, length of the reply", then that many bytes.
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# NBD_OPT_EXPORT_NAME reply: "S: 64 bits, size of the export in bytes (unsigned),
# S: 16 bits, transmission flags, S: 124 bytes, zeroes (reserved) (unless
# NBD_FLAG_C_NO_ZEROES was negotiated by the client)"
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_ZEROES = bytes(124)
# NBD_INFO_EXPORT payload of NBD_REP_INFO: type, size, transmission flags ("length
# MUST be 12").
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload of NBD_REP_INFO: type, minimum, preferred, maximum
# ("length MUST be 14").
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
# Request message: "C: 32 bits, 0x25609513, magic, C: 16 bits, command flags, C: 16
# bits, type, C: 64 bits, handle, C: 64 bits, offset (unsigned), C: 32 bits,
# length (unsigned)", then "length bytes of data if the request is of type
# NBD_CMD_WRITE".
REQUEST_HEADER = struct.Struct(">IHHQQI")
# Simple reply message: "S: 32 bits, 0x67446698, magic, S: 32 bits, error (MAY be
# zero), S: 64 bits, handle", then the data of a READ.
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
# Structured reply chunk message: "S: 32 bits, 0x668e33ef, magic, S: 16 bits, flags,
# S: 16 bits, type, S: 64 bits, handle, S: 32 bits, length of payload (unsigned)"
CHUNK_HEADER = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA payload: "64 bits: offset (unsigned)", then "length - 8
# bytes: data".
OFFSET_DATA_PAYLOAD = struct.Struct(">Q")
# NBD_REPLY_TYPE_OFFSET_HOLE payload: "64 bits: offset (unsigned), 32 bits: hole
# size (unsigned, MUST be nonzero)"
OFFSET_HOLE_PAYLOAD = struct.Struct(">QI")
# NBD_REPLY_TYPE_ERROR payload: "32 bits: error (MUST be nonzero), 16 bits: message
# length (no more than header length - 6)", then the message.
ERROR_PAYLOAD = struct.Struct(">IH")
# NBD_REPLY_TYPE_BLOCK_STATUS: the payload "starts with: 32 bits, metadata context
# ID" (a U32) "and is followed by a list of one or more descriptors, each with this
# layout: 32 bits, length (unsigned, MUST NOT be zero), 32 bits, status flags".
BLOCK_STATUS_DESCRIPTOR = struct.Struct(">II")
# Fields that stand alone: an information type, a string's length ("32 bits,
# length of name"), a metadata context ID.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# Bytes before the data in a buffer for reply_read_into: a structured chunk
# header and its offset (a simple reply's header fits in it as well).
READ_HEADROOM = CHUNK_HEADER.size + OFFSET_DATA_PAYLOAD.size
