"""One served image: the export table's entries, their counters and live state.

Design
    One :class:`Export` per image file, opened once at start-up and shared by
    every connection to it: the library's :class:`~addcow.image.AddCowImage`
    is thread-safe, so there is one bitmap, one set of claims and one flush
    for all connections. That is what makes ``NBD_FLAG_CAN_MULTI_CONN``
    honest: a FLUSH on any connection runs ``image.flush()``, which makes
    every write that any connection has completed durable.

    Beside the image an export holds what the rest of the server keeps per
    image: its protocol description (:class:`~addcow.nbd.events.ExportInfo`),
    its :class:`Counters`, the state of its live features (:class:`LiveState`,
    worked by :mod:`addcow.serve.live`), and the event loop's readers of NBD
    stores (:mod:`addcow.serve.loop_reader`). :func:`block_status` turns the
    image's extents into the descriptors of NBD's metadata contexts.

Loop readers
    One per NBD store that a REMOTE route of the image names: the image's
    backing, or the store holding the file of a qcow2 golden image behind an
    NBD URI. :meth:`Export.reader_of` makes it on first use and keeps it
    until :meth:`Export.close_readers`; the reader itself decides whether it
    ever opens a connection (not over TLS, only when the server advertises
    multi-conn, reopened at most once every
    :data:`~addcow.serve.loop_reader.REOPEN_AFTER` seconds after a failure).

This module sits below the server, the session, the routing of requests and
the live features: it imports none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..image import AddCowImage
from ..nbd import wire
from ..nbd.events import ExportInfo
from ..stores.base import BlockSource
from ..stores.remote.nbd import NBDStore
from ..streaming import RateLimit
from .limits import MAX_EXTENTS
from .loop_reader import LoopReader


@dataclass
class LiveOptions:
    """What the server does to finish an export while serving it."""

    copy_on_read: bool = False
    stream: bool = False
    stream_rate: int | None = None
    detach_when_complete: bool = False
    handoff_qmp: str | None = None  # QEMU's QMP socket: hand the export over once complete
    handoff_stay: bool = False  # keep serving after the last export is handed over


STREAM_NONE, STREAM_RUNNING, STREAM_PAUSED, STREAM_CONCLUDED = (
    "none",
    "running",
    "paused",
    "concluded",
)
"""States of an export's stream, named as QEMU's block job statuses where they exist."""

HANDOFF_NONE, HANDOFF_WAITING, HANDOFF_RUNNING, HANDOFF_DONE, HANDOFF_FAILED = (
    "none",
    "waiting",
    "running",
    "done",
    "failed",
)
"""States of an export's handoff to QEMU (:mod:`addcow.serve.handoff`)."""


@dataclass
class LiveState:
    """Per-export run-time state of the live features."""

    options: LiveOptions = field(default_factory=LiveOptions)
    last_request: float = 0.0
    finishing: bool = False
    cor_queue: asyncio.Queue[tuple[int, int]] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    finish_task: asyncio.Task[None] | None = None
    stream_status: str = STREAM_NONE
    stream_task: asyncio.Task[None] | None = None
    cancelling: bool = False  # the stream is to stop after the spans in the pool
    stream_done: int = 0  # bytes of the virtual disk this stream has dealt with
    stream_copied: int = 0  # bytes streams copied from the backing (not left as zero)
    stream_read: int = 0  # bytes this stream read from the backing: what the rate counts
    rate: RateLimit | None = None
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    rate_changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a new rate or a resume: ends the stream's wait to keep the old rate."""
    writes_open: asyncio.Event = field(default_factory=asyncio.Event)
    """Cleared while a handoff holds the export's writes: they wait, they do not fail."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the export completes or a client starts using it (a handoff waits for it)."""
    handoff_status: str = HANDOFF_NONE
    handoff_detail: str = ""  # the failure, or where QEMU runs the disk now

    def __post_init__(self) -> None:
        self.resumed.set()
        self.writes_open.set()

    @property
    def copies_on_read(self) -> bool:
        """Whether reads of this export are followed by :func:`~addcow.serve.live.copy_on_read`."""
        return self.cor_queue is not None


@dataclass(slots=True)
class Counters:
    """Requests and bytes served, by kind (the names of QEMU's ``query-blockstats``)."""

    rd_operations: int = 0
    rd_bytes: int = 0
    wr_operations: int = 0  # writes and write-zeroes
    wr_bytes: int = 0
    unmap_operations: int = 0  # trims
    unmap_bytes: int = 0
    flush_operations: int = 0

    def count(self, command: int, length: int) -> None:
        if command == wire.CMD_READ:
            self.rd_operations += 1
            self.rd_bytes += length
        elif command in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES):
            self.wr_operations += 1
            self.wr_bytes += length
        elif command == wire.CMD_TRIM:
            self.unmap_operations += 1
            self.unmap_bytes += length
        elif command == wire.CMD_FLUSH:
            self.flush_operations += 1

    def count_reads(self, count: int, length: int) -> None:
        """``count`` reads of ``length`` bytes in all."""
        self.rd_operations += count
        self.rd_bytes += length

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __str__(self) -> str:
        return (
            f"{self.rd_operations} reads ({self.rd_bytes} bytes), "
            f"{self.wr_operations} writes ({self.wr_bytes} bytes), "
            f"{self.unmap_operations} trims, {self.flush_operations} flushes"
        )


@dataclass
class Export:
    """One served image: its protocol description and the open image."""

    info: ExportInfo
    image: AddCowImage
    live: LiveState = field(default_factory=LiveState)
    counters: Counters = field(default_factory=Counters)
    # Reads of NBD stores from the event loop, by store (see "Loop readers" above).
    readers: dict[NBDStore, LoopReader] = field(default_factory=dict)
    readers_closed: bool = False

    @classmethod
    def from_image(
        cls,
        image: AddCowImage,
        name: str,
        *,
        read_only: bool,
        live: LiveOptions | None = None,
    ) -> Export:
        backing = getattr(image.backing, "path", None)
        description = f"add-cow image {image.path} (data in {image.image_path}"
        description += f", backing file {backing})" if backing else ")"
        info = ExportInfo(name=name, size=image.size, read_only=read_only, description=description)
        return cls(info, image, LiveState(live or LiveOptions()))

    def reader_of(self, store: BlockSource | None) -> LoopReader | None:
        """The event loop's reader of ``store``, made on first use; None unless
        ``store`` is an NBD store, and once the readers are closed."""
        if not isinstance(store, NBDStore):
            return None
        reader = self.readers.get(store)
        if reader is None and not self.readers_closed:
            reader = self.readers[store] = LoopReader(store)
        return reader

    async def close_readers(self) -> None:
        """Close every loop reader (reads in flight end as broken ones do); none is
        made after."""
        self.readers_closed = True
        for reader in self.readers.values():
            await reader.close()


def block_status(
    image: AddCowImage, offset: int, length: int, contexts: Iterable[str], req_one: bool
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Descriptors (length, flags) per context for [offset, offset+length).

    ``base:allocation``: NBD_STATE_ZERO where the range reads as zero, and
    NBD_STATE_HOLE where no layer holds data for it (the ``data`` column of
    ``addcow map`` is false). ``qemu:allocation-depth``: 0 where no layer has
    the range, else the ``depth`` of ``addcow map`` plus one (1 = the image
    file, 2 = the first backing file, ...).
    """
    wanted = list(contexts)
    out: dict[str, list[list[int]]] = {name: [] for name in wanted}
    for count, ext in enumerate(image.block_status(offset, length)):
        for name in wanted:
            if name == wire.CONTEXT_BASE_ALLOCATION:
                status = (0 if ext.data else wire.STATE_HOLE) | (wire.STATE_ZERO if ext.zero else 0)
            else:
                status = ext.depth + 1 if ext.present else 0
            descs = out[name]
            if descs and descs[-1][1] == status:
                descs[-1][0] += ext.length
            else:
                descs.append([ext.length, status])
        # "If the client used the NBD_CMD_FLAG_REQ_ONE flag, each chunk contains
        # exactly one descriptor"; the server "MAY return fewer descriptors ... if
        # looking up the information would be too resource-intensive".
        if req_one and all(len(d) > 1 for d in out.values()):
            break
        if count + 1 >= MAX_EXTENTS:
            break
    result: list[tuple[str, list[tuple[int, int]]]] = []
    for name in wanted:
        descs = out[name][:1] if req_one else out[name]
        result.append((name, [(n, s) for n, s in descs]))
    return result
