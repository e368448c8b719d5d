"""READ replies, byte by byte and as a client reassembles them.

``ServerConnection.reply_read_into`` builds the reply to a read whose data the
server has already read into its own buffer, after room for the chunk header
(the inline read path); it looks for zero blocks with
:func:`addcow.zeros.has_zero_segment` and, when there is one, falls back to
``reply_read``. A property test reads its output the way a client does
(proto.md, "Structured reply chunk message" and "Structured reply types") and
requires the data of the request, and the same as ``reply_read`` gives for
the same data, over random buffers (random bytes, zero runs of random lengths
at random places, all zero, no zero), unaligned offsets, lengths from 0 to
1 MiB, simple and structured replies, with and without NBD_CMD_FLAG_DF. The
examples below it are byte-exact, with the spec's words for each.

A default run tries a modest number of examples; ADDCOW_CAMPAIGN=1 tries
many more.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import dataclass
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addcow import zeros
from addcow.nbd import wire
from addcow.nbd.connection import ServerConnection
from addcow.nbd.events import ExportInfo, TransmissionStarted

CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
EXAMPLES = 20_000 if CAMPAIGN else 300
MiB = 1 << 20
GRANULE = zeros.GRANULE
HEADROOM = wire.READ_HEADROOM
DISK = ExportInfo("disk", 1 << 50)
COOKIE = 0x1122334455667788


def transmitting(structured: bool) -> ServerConnection:
    """A connection in the transmission phase, with or without structured replies."""
    conn = ServerConnection([DISK])
    conn.initiate()
    name = struct.pack(">I", 0) + struct.pack(">H", 0)
    opts = struct.pack(">QII", wire.IHAVEOPT, wire.OPT_STRUCTURED_REPLY, 0) if structured else b""
    opts += struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, len(name)) + name
    conn.receive_data(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES) + opts)
    assert isinstance(conn.next_event(), TransmissionStarted)
    conn.data_to_send()
    return conn


CONNECTIONS = {True: transmitting(True), False: transmitting(False)}


# -- a client's reading of a reply ---------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    payload: bytes


def chunks(reply: bytes, cookie: int) -> list[Chunk]:
    """Split a structured reply into its chunks, checking each header.

    "S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC); S: 16 bits,
    flags; S: 16 bits, type; S: 64 bits, handle; S: 32 bits, length of payload
    (unsigned); S: length bytes of payload data (if length is non-zero)"
    """
    out = []
    pos = 0
    while pos < len(reply):
        assert len(reply) - pos >= 20, "a truncated chunk header"
        magic, flags, kind, handle, length = struct.unpack_from(">IHHQI", reply, pos)
        assert magic == wire.STRUCTURED_REPLY_MAGIC
        # "the server MUST use the same value for handle as was sent by the client"
        assert handle == cookie
        payload = reply[pos + 20 : pos + 20 + length]
        assert len(payload) == length, "a truncated chunk payload"
        out.append(Chunk(flags, kind, payload))
        pos += 20 + length
    return out


def reassemble(reply: bytes, *, structured: bool, df: bool, offset: int, length: int) -> bytes:
    """The data a client takes from ``reply`` to a READ of ``length`` bytes at ``offset``."""
    if not structured:
        # "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC); S: 32 bits, error
        # (MAY be zero); S: 64 bits, handle; S: (length bytes of data if the request
        # is of type NBD_CMD_READ)"
        magic, error, handle = struct.unpack_from(">IIQ", reply)
        assert (magic, error, handle) == (wire.SIMPLE_REPLY_MAGIC, 0, COOKIE)
        assert len(reply) == 16 + length
        return reply[16:]
    found = chunks(reply, COOKIE)
    assert found, "a structured reply has at least one chunk"
    # "the NBD_REPLY_FLAG_DONE reply flag is used to identify the final chunk";
    # "the chunk with the flag NBD_REPLY_FLAG_DONE MUST be sent last".
    assert [c.flags for c in found] == [0] * (len(found) - 1) + [wire.REPLY_FLAG_DONE]
    data = bytearray()
    pos = offset
    content = 0
    for chunk in found:
        if chunk.type == wire.REPLY_TYPE_NONE:
            # "length MUST be 0"; "MUST always be used with the NBD_REPLY_FLAG_DONE bit set"
            assert chunk.payload == b"" and chunk.flags & wire.REPLY_FLAG_DONE
            continue
        content += 1
        if chunk.type == wire.REPLY_TYPE_OFFSET_DATA:
            # "length MUST be at least 9"; "64 bits: offset (unsigned); length - 8
            # bytes: data"
            assert len(chunk.payload) >= 9
            (at,) = struct.unpack_from(">Q", chunk.payload)
            piece = chunk.payload[8:]
        else:
            assert chunk.type == wire.REPLY_TYPE_OFFSET_HOLE, f"chunk type {chunk.type}"
            # "length MUST be exactly 12"; "64 bits: offset (unsigned); 32 bits: hole
            # size (unsigned, MUST be nonzero)"
            assert len(chunk.payload) == 12
            at, size = struct.unpack(">QI", chunk.payload)
            assert size > 0
            piece = bytes(size)
        # This server sends its content chunks in order, each where the last ended.
        assert at == pos, f"chunk at {at}, expected {pos}"
        data += piece
        pos += len(piece)
    # "the server MUST send enough data chunks to cover the entire region described
    # by the offset and length of the client's request"; "MUST NOT send chunks that
    # describe data outside the offset and length of the request".
    assert pos == offset + length
    if df:
        # "If this flag is set, the server MUST send at most one content chunk"
        assert content <= 1
    return bytes(data)


def holes_are_whole(reply: bytes, data: bytes) -> None:
    """The server's choice of chunks (:func:`addcow.zeros.segments`) for a read's ``data``.

    With no run of ``GRANULE`` zero bytes anywhere, one data chunk (finding that
    out is one search). Otherwise every disk block (``GRANULE`` bytes of the
    disk, cut to the request) that is zero is in a hole and none in a data
    chunk, and adjacent chunks differ in type.
    """
    found = [c for c in chunks(reply, COOKIE) if c.type != wire.REPLY_TYPE_NONE]
    if bytes(GRANULE) not in data:
        assert [c.type for c in found] == [wire.REPLY_TYPE_OFFSET_DATA]
        return
    assert all(a.type != b.type for a, b in itertools.pairwise(found))
    for chunk in found:
        if chunk.type != wire.REPLY_TYPE_OFFSET_DATA:
            continue
        (at,) = struct.unpack_from(">Q", chunk.payload)
        data = chunk.payload[8:]
        lo = 0
        while lo < len(data):
            hi = min(len(data), (at + lo) // GRANULE * GRANULE + GRANULE - at)
            assert any(data[lo:hi]), f"zero block at {at + lo} sent as data"
            lo = hi


# -- buffers -------------------------------------------------------------------------


def nonzero_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n).replace(b"\0", b"\1")


@st.composite
def reads(draw: st.DrawFn) -> tuple[int, bytes]:
    """(offset, data): a read's disk offset and the bytes it returns."""
    offset = draw(
        st.one_of(
            st.integers(0, 1 << 40),
            st.builds(
                lambda block, within: block * GRANULE + within,
                st.integers(0, 1 << 20),
                st.sampled_from([0, 1, 511, 512, GRANULE - 1]),
            ),
        )
    )
    length = draw(
        st.one_of(
            st.integers(0, MiB),
            st.integers(0, 4 * GRANULE),
            st.sampled_from([0, 1, GRANULE - 1, GRANULE, GRANULE + 1, 2 * GRANULE, MiB]),
        )
    )
    rng = random.Random(draw(st.integers(0, 2**32)))
    kinds = ["random", "no zero", "all zero", "zero runs", "zero runs", "zero ends"]
    kind = draw(st.sampled_from(kinds))
    if kind == "all zero":
        return offset, bytes(length)
    if kind == "random":
        return offset, rng.randbytes(length)
    data = bytearray(nonzero_bytes(rng, length))
    head = min(length, -offset % GRANULE)  # where the first disk block starts in the buffer
    if kind == "zero ends" and length:
        # The partial disk blocks at either end of the read, zero, beside GRANULE
        # zeros that cover no whole disk block (so no aligned block is zero).
        tail = (offset + length) % GRANULE
        ends = draw(st.sampled_from(["head", "tail", "both"]))
        if ends != "tail":
            data[:head] = bytes(head)
        if ends != "head" and length - tail >= head:
            data[length - tail :] = bytes(tail)
        if draw(st.sampled_from([True, True, True, False])) and length > head + 2 * GRANULE:
            start = head + draw(st.integers(1, GRANULE - 1))
            data[start : start + GRANULE] = bytes(GRANULE)
    if kind == "zero runs" and length:
        for _ in range(draw(st.integers(1, 8))):
            size = draw(
                st.one_of(
                    st.integers(1, 64),
                    st.sampled_from([GRANULE - 1, GRANULE, GRANULE + 1, 3 * GRANULE]),
                    st.integers(1, 256 << 10),
                )
            )
            start = draw(
                st.one_of(
                    st.integers(0, length - 1),
                    # at either end of the read: the unaligned head and tail blocks
                    st.sampled_from([0, max(0, length - size)]),
                    # near a disk block boundary, so that some runs make holes
                    st.builds(
                        lambda k, d: max(0, min(length - 1, head + k * GRANULE + d)),
                        st.integers(0, length // GRANULE + 1),
                        st.sampled_from([-1, 0, 1]),
                    ),
                )
            )
            end = min(length, start + size)
            data[start:end] = bytes(end - start)
    return offset, bytes(data)


def into_buffer(rng: random.Random, data: bytes, spare: int) -> bytearray:
    """``data`` behind READ_HEADROOM bytes, as the server reads it: the headroom and
    ``spare`` bytes after the data hold what a reused buffer holds, old bytes."""
    return bytearray(rng.randbytes(HEADROOM) + data + rng.randbytes(spare))


# -- the property --------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),
    derandomize=not CAMPAIGN,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(
    read=reads(),
    structured=st.sampled_from([True, True, True, False]),  # the one with choices
    df=st.sampled_from([False, False, False, True]),
    spare=st.sampled_from([0, 0, 1, GRANULE, 3 * GRANULE + 5]),
    garbage=st.integers(0, 2**32),
)
def test_read_into_reassembles_to_the_data_and_matches_reply_read(
    read: tuple[int, bytes], structured: bool, df: bool, spare: int, garbage: int
) -> None:
    offset, data = read
    length = len(data)
    df = df and structured  # "MUST NOT be set unless the transmission flags include
    # NBD_FLAG_SEND_DF", which needs structured replies
    conn = CONNECTIONS[structured]
    buf = into_buffer(random.Random(garbage), data, spare)
    tail = bytes(buf[HEADROOM + length :])

    out = conn.reply_read_into(buf, COOKIE, offset, length, df=df)
    reply = b"".join(out)

    # The data and what lies after it are left as they were; only the headroom
    # may hold a header.
    assert buf[HEADROOM : HEADROOM + length] == data
    assert buf[HEADROOM + length :] == tail
    got = reassemble(reply, structured=structured, df=df, offset=offset, length=length)
    assert got == data
    expected = b"".join(conn.reply_read(COOKIE, offset, memoryview(data), df=df))
    assert reassemble(expected, structured=structured, df=df, offset=offset, length=length) == got
    # reply_read_into is documented as reply_read for data already in the buffer.
    assert reply == expected
    if structured and not df and length >= GRANULE:
        holes_are_whole(reply, data)
    # One buffer, a view of ``buf``, whenever the reply is one header and the data.
    one_chunk = not structured or (
        length >= GRANULE and not zeros.has_zero_segment(buf, HEADROOM, length, offset)
    )
    if one_chunk:
        assert len(out) == 1
        assert isinstance(out[0], memoryview) and out[0].obj is buf


# -- byte-exact examples ---------------------------------------------------------------


def chunk(flags: int, kind: int, payload: bytes, cookie: int = 3) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, flags, kind, cookie, len(payload)) + payload


def test_simple_read_into_is_its_header_in_the_headroom_then_the_data() -> None:
    # "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC); S: 32 bits, error
    # (MAY be zero); S: 64 bits, handle; S: (length bytes of data ...)"
    conn = CONNECTIONS[False]
    buf = bytearray(b"\xee" * HEADROOM + b"hello" + b"\xee" * 3)
    (out,) = conn.reply_read_into(buf, 9, 4096, 5)
    assert isinstance(out, memoryview) and out.obj is buf
    assert bytes(out) == bytes.fromhex("67446698 00000000 0000000000000009") + b"hello"


def test_structured_read_into_without_zeros_is_one_data_chunk_with_done() -> None:
    # "NBD_REPLY_TYPE_OFFSET_DATA (1) ... 64 bits: offset (unsigned); length - 8
    # bytes: data"; DONE, as nothing can fail once the data is in memory: the
    # server "MUST NOT do so for a content chunk if it would still be possible to
    # detect an error while transmitting the chunk".
    conn = CONNECTIONS[True]
    data = b"\x01" * 8192
    buf = bytearray(HEADROOM) + data
    (out,) = conn.reply_read_into(buf, 3, 1000, len(data))
    assert out.obj is buf
    assert bytes(out) == chunk(1, 1, struct.pack(">Q", 1000) + data)


def test_structured_read_into_sends_zero_blocks_as_holes() -> None:
    # "NBD_REPLY_TYPE_OFFSET_HOLE (2) ... 64 bits: offset (unsigned); 32 bits: hole
    # size (unsigned, MUST be nonzero)". A read from 1000 of 12288 bytes: disk blocks
    # [1000,4096) data, [4096,12288) zero, [12288,13288) data.
    conn = CONNECTIONS[True]
    data = bytearray(12288)
    data[0] = 1
    data[-1] = 2
    buf = bytearray(b"\xee" * HEADROOM) + data
    out = b"".join(conn.reply_read_into(buf, 3, 1000, len(data)))
    assert out == (
        chunk(0, 1, struct.pack(">Q", 1000) + bytes(data[:3096]))
        + chunk(0, 2, struct.pack(">QI", 4096, 8192))
        + chunk(1, 1, struct.pack(">Q", 12288) + bytes(data[-1000:]))
    )


def test_read_into_keeps_a_zero_unaligned_head_as_data_without_a_zero_block() -> None:
    # A read from 100 bytes before a disk block boundary whose first 100 bytes are
    # zero, and no run of GRANULE zeros anywhere: one data chunk, zeroes present
    # ("A server SHOULD try to minimize the number of chunks sent in a reply").
    conn = CONNECTIONS[True]
    data = bytes(100) + b"\x07" * 8192
    buf = bytearray(HEADROOM) + data
    out = b"".join(conn.reply_read_into(buf, 3, GRANULE - 100, len(data)))
    assert out == chunk(1, 1, struct.pack(">Q", GRANULE - 100) + data)


def test_read_into_sends_a_zero_unaligned_head_as_a_hole_beside_a_zero_run() -> None:
    # The same zero head, and GRANULE zeros further on that cover no whole disk
    # block: the head, a whole block of the disk's up to the boundary, is a hole.
    conn = CONNECTIONS[True]
    data = bytearray(b"\x07" * (100 + 3 * GRANULE))
    data[:100] = bytes(100)
    data[2100 : 2100 + GRANULE] = bytes(GRANULE)  # disk [6096, 10192)
    buf = bytearray(HEADROOM) + data
    out = b"".join(conn.reply_read_into(buf, 3, GRANULE - 100, len(data)))
    assert out == (
        chunk(0, 2, struct.pack(">QI", GRANULE - 100, 100))
        + chunk(1, 1, struct.pack(">Q", GRANULE) + bytes(data[100:]))
    )


def test_df_read_into_sends_one_content_chunk_with_its_zeroes_present() -> None:
    # "If the area being read contains both data and a hole, the server MUST use
    # NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present."
    conn = CONNECTIONS[True]
    data = bytes(8192) + b"x"
    buf = bytearray(HEADROOM) + data
    out = b"".join(conn.reply_read_into(buf, 3, 0, len(data), df=True))
    assert out == chunk(1, 1, struct.pack(">Q", 0) + data)


def test_short_zero_read_into_is_one_hole() -> None:
    # Under one disk block there is one run: all zero, so one OFFSET_HOLE chunk.
    conn = CONNECTIONS[True]
    buf = bytearray(HEADROOM + 512)
    out = b"".join(conn.reply_read_into(buf, 3, 100, 512))
    assert out == chunk(1, 2, struct.pack(">QI", 100, 512))


def test_empty_read_into_is_a_none_chunk_with_done() -> None:
    # "NBD_REPLY_TYPE_NONE (0): length MUST be 0 (and the payload field omitted).
    # This chunk type MUST always be used with the NBD_REPLY_FLAG_DONE bit set"
    conn = CONNECTIONS[True]
    out = b"".join(conn.reply_read_into(bytearray(HEADROOM), 3, 4096, 0))
    assert out == chunk(1, 0, b"")


def test_read_into_ignores_old_bytes_around_the_data() -> None:
    """A reused buffer: old bytes in the headroom and after the data change nothing."""
    conn = CONNECTIONS[True]
    data = b"\x05" * 100 + bytes(GRANULE) + b"\x06" * 100
    fresh = bytearray(HEADROOM) + data
    reused = bytearray(b"\xff" * HEADROOM) + data + b"\xff" * GRANULE
    offset = GRANULE - 100
    assert b"".join(conn.reply_read_into(reused, 3, offset, len(data))) == b"".join(
        conn.reply_read_into(fresh, 3, offset, len(data))
    )
