"""A qcow2 file opened read-only as a backing store (:class:`Qcow2File`).

Design note
===========

Cluster kinds. An L2 entry (QEMU docs/interop/qcow2.rst, "Cluster mapping")
makes a guest cluster one of:

* NORMAL: the bytes are at a host offset in this file;
* ZERO: the cluster reads as zeros and does not fall through to the backing
  (version 3 zero flag, or an extended-L2 subcluster zero bit);
* UNALLOCATED: read from the backing file, zeros past its end or without one
  (an L1 entry of 0 makes a whole L2 range unallocated);
* COMPRESSED: a deflate (zlib) or zstd stream at a byte offset, inflating to
  exactly one cluster.

With extended L2 entries a standard cluster is cut into 32 subclusters, each
NORMAL (allocated bit), ZERO (zero bit) or UNALLOCATED (neither; it reads from
the backing even when the host cluster is reserved). Both bits set, or
allocated bits in a cluster with no host offset, are corruption.

How a read travels. :meth:`Qcow2File.readinto` asks :meth:`_runs` for the runs
of [offset, offset+length) inside the virtual size: consecutive pieces of one
kind, NORMAL pieces only while their host bytes are contiguous too. A NORMAL
run is one ``preadv`` straight into the caller's buffer; ZERO is filled with
zeros; UNALLOCATED is handed to the backing (:func:`read_as_backing`);
COMPRESSED clusters are inflated (or found in the cache) and the wanted slice
copied out. Bytes past the virtual size read as zero, like :class:`RawFile`.
:meth:`Qcow2File.block_status_at` walks the same runs, so a range that a read
would refuse is refused by block status as well.

Caches and their bounds. The L1 entries that map the virtual size are read at
open, after the header has bounded them (at most 32 MiB, and inside the file).
L2 tables are read on first use into an LRU cache bounded in bytes
(:data:`L2_CACHE_BYTES`, QEMU's default maximum), whatever the virtual size.
Inflated clusters go to a small LRU (:data:`CLUSTER_CACHE_BYTES`, at least
two clusters). The first read of a compressed cluster inflates it only up to
the last byte it wants (a random 4 KiB read inflates half a cluster on
average); a later read that wants more inflates the whole cluster, so
sequential reads inflate each cluster at most twice.
Beyond the L1 entries, bounded as said, nothing grows with the virtual size.

Thread safety. Several threads may read at once. One lock guards the two
caches (look-up and insertion only); reading the file, checking entries and
inflating happen outside it (zlib and zstd release the GIL). Two threads
missing the same table both read it; the second insertion wins.

Stricter than QEMU. QEMU 7.2 reads a data cluster past the end of the file as
zeros (its block layer zero-fills reads past EOF), and so turns a truncated
image into silently wrong guest data. Here any L2 table, data cluster or
compressed stream past the end of the file is an error naming the L1 and L2
index, as are unaligned offsets, reserved bits in L1 and L2 entries (QEMU
ignores them when reading), a zero flag in a version 2 image, and compressed
clusters with subcluster bits. Only the last 512-byte sector of a compressed
stream may be cut short, as qemu-io writes them. The file size is taken at
open; a file that shrinks later fails its reads (:func:`sysio.pread_full`).

Where the bytes come from. Every byte of the qcow2 file is read through its
:class:`~addcow.stores.qcow2.container.Container`: a local descriptor
(:class:`LocalContainer`, ``preadv`` into the caller's buffer), or a remote
store holding the file (:class:`RemoteContainer`, a qcow2 golden image behind
a backing URI). The container's size is the file size above, for both. A
remote qcow2 may not name a backing file: the name would be a file of this
host that the image's author chose (the class of CVE-2024-4467), so it is
refused at open, before anything is opened by that name. A remote qcow2
has no file ids.

Routes. :meth:`Qcow2File.route` maps a range as a read would and answers
where it can be read from: one run of contiguous NORMAL clusters is the
container's route at the host offset (FILE for a local file, REMOTE for a
qcow2 file in an NBD export), ZERO reads in place, UNALLOCATED is the
backing's route, COMPRESSED goes to the pool (inflating), and several runs
read in place only if each does. Mapping a remote file's range whose L2
tables are not cached would wait on the network, so the answer is then POOL
(the pool's read brings them in); a mapping that fails is POOL too, so that
the read reports the corruption.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import NamedTuple

from ... import sysio
from ...errors import (
    AddCowError,
    BackingError,
    BackingFormatError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2UnsupportedError,
)
from ...extras import install_hint
from ...locking import lock_raw
from ..base import (
    INLINE,
    POOL,
    BlockSource,
    Extent,
    Route,
    joined,
    read_as_backing,
    route_as_backing,
)
from ..chain import ChainGuard
from . import format as fmt
from .container import Container, LocalContainer
from .format import Header

BACKING_FORMATS = ("raw", "qcow2")
"""Backing formats a qcow2 may name."""

L2_CACHE_BYTES = 32 << 20
"""Most L2 table bytes kept (QEMU's DEFAULT_L2_CACHE_MAX_SIZE)."""
_CACHE_ENTRY_OVERHEAD = 256
"""Bytes a cached object costs beyond its payload (array header, dict slot), so
that a cache of many small tables stays within its bound too."""
CLUSTER_CACHE_BYTES = 4 << 20
"""Most inflated cluster bytes kept (at least two clusters)."""
ZSTD_MAX_WINDOW = 8 << 20
"""Largest zstd window accepted: a cluster is at most 2 MiB, so a frame needing
more is hostile, and the decoder would allocate it."""
ZLIB_WBITS = -12
"""Raw deflate with a 4 KiB window, as QEMU compresses and decompresses."""

_ZSTD_HINT = f"this qcow2 image uses zstd compression; to read it, {install_hint('zstd')}"

NORMAL, ZERO, UNALLOCATED, COMPRESSED = range(4)


class _Run(NamedTuple):
    """[start, start+length) of the guest disk of one kind.

    ``host`` is the host offset of ``start`` for NORMAL and the raw L2 entry
    (the descriptor) for COMPRESSED, which is always one cluster or less.
    """

    kind: int
    start: int
    length: int
    host: int


def _zstd() -> ModuleType | None:
    """The zstandard module, imported on first need; None if not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def read_header(fd: int, path: str, file_size: int) -> Header:
    """Read and validate the header (and extensions) of an open qcow2 file."""
    return read_container_header(LocalContainer(fd, path, size=file_size, owned=False))


def read_container_header(container: Container) -> Header:
    """Read and validate the header (and extensions) of the qcow2 file in ``container``."""
    size = container.size
    try:
        cluster = fmt.cluster0_size(_read_bytes(container, min(fmt.V3_MIN_HEADER_LENGTH, size), 0))
        return Header.unpack(_read_bytes(container, min(cluster, size), 0), size)
    except Qcow2Error as exc:
        exc.path = container.name
        raise


def _read_bytes(container: Container, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    if length:
        container.read_full(memoryview(buf), offset)
    return bytes(buf)


class Qcow2File:
    """A qcow2 file read as a backing store: a :class:`~addcow.stores.BlockSource`.

    ``open_backing(name, format)`` opens this file's own backing file (the
    caller resolves the stored name, applies its path policy and the chain
    guard); it may be None for a file without one. ``guard`` records this
    file in the chain as :class:`~addcow.stores.RawFile` does, and applies
    its ``backing_root`` when the file is a backing (``guard.depth`` > 0), not
    a file the user named. Closes only
    what it opened: its own descriptor and the backing it got from
    ``open_backing``.

    With ``container`` (a :class:`~addcow.stores.qcow2.container.RemoteContainer`)
    the qcow2 file is read from it instead of opened at ``path``, which then
    only names it in messages; the file is closed with the container, and a
    backing file it names is refused. ``fd`` is the local descriptor, or -1.
    """

    def __init__(
        self,
        path: str,
        *,
        guard: ChainGuard,
        force_share: bool,
        open_backing: Callable[[bytes, str], BlockSource] | None,
        container: Container | None = None,
    ) -> None:
        self.path = path
        self.backing: BlockSource | None = None
        if container is None:
            container = _open_local(path, guard, force_share)
        self._container = container
        self.fd = container.fd
        self._local = container.local
        self._read = container.read_full
        try:
            self._file_size = container.size
            self.header = read_container_header(container)
            self._setup()
            self.backing_name = self.header.backing_name
            self.backing_format = self.header.backing_format
            if self.backing_name is not None:
                if not self._local:
                    raise BackingError(
                        f"{path}: this remote qcow2 names the backing file "
                        f"{os.fsdecode(self.backing_name)!r}; a qcow2 read over a URI may not "
                        "have a backing file (its name would be a file of this host); "
                        "flatten it with qemu-img convert -O qcow2 and serve that"
                    )
                self.backing = self._open_backing(self.backing_name, open_backing)
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------

    def _setup(self) -> None:
        h = self.header
        self.size = h.virtual_size
        self._cluster_bits = h.cluster_bits
        self._cluster_size = h.cluster_size
        self._l2_bits = h.l2_entries.bit_length() - 1
        self._l1_bits = self._cluster_bits + self._l2_bits
        self._extended = h.extended_l2
        self._stride = 2 if self._extended else 1
        self._subcluster_bits = self._cluster_bits - 5  # 32 subclusters
        self._geometry = h.compressed
        self._v2 = h.version == 2
        self._zstd: ModuleType | None = None
        if h.compression_type == fmt.COMPRESSION_ZSTD:
            self._zstd = _zstd()
            if self._zstd is None:
                raise Qcow2UnsupportedError(
                    "compression_type",
                    "0 (zlib), or 1 (zstd) with the zstandard package installed",
                    "1 (zstd)",
                    self.path,
                    hint=_ZSTD_HINT,
                )
        self._l1 = self._read_table(h.l1_table_offset, h.l1_needed)
        self._lock = threading.Lock()
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cache_max = max(1, L2_CACHE_BYTES // (self._cluster_size + _CACHE_ENTRY_OVERHEAD))
        self._clusters: OrderedDict[int, bytes] = OrderedDict()
        self._clusters_max = max(
            2, CLUSTER_CACHE_BYTES // (self._cluster_size + _CACHE_ENTRY_OVERHEAD)
        )

    def _read_table(self, offset: int, entries: int) -> array[int]:
        """``entries`` big-endian u64 at ``offset`` (bounds checked by the caller)."""
        raw = bytearray(entries * 8)
        if entries:
            self._read(memoryview(raw), offset)
        table = array("Q")
        table.frombytes(raw)
        if sys.byteorder == "little":
            table.byteswap()
        return table

    def _open_backing(
        self, name: bytes, open_backing: Callable[[bytes, str], BlockSource] | None
    ) -> BlockSource:
        shown = os.fsdecode(name)
        if self.backing_format is None:
            raise BackingFormatError(
                f"{self.path}: backing file {shown!r}: backing format not recorded; "
                f"addcow does not probe: record it with qemu-img rebase -u -F raw "
                f"(or -F qcow2) -b {shown} {self.path}"
            )
        if self.backing_format not in BACKING_FORMATS:
            raise BackingFormatError(
                f"{self.path}: backing file {shown!r} has format {self.backing_format!r}: "
                f"expected one of {', '.join(BACKING_FORMATS)}"
            )
        if open_backing is None:
            raise BackingError(
                f"{self.path}: names backing file {shown!r}; none may be opened here"
            )
        return open_backing(name, self.backing_format)

    # -- the BlockSource protocol ------------------------------------------------

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` with the guest bytes at ``offset`` (zeros past the end)."""
        n = len(buffer)
        inside = max(0, min(n, self.size - offset))
        single = self._single_piece(offset, offset + inside)
        runs: Iterable[_Run] = self._runs(offset, offset + inside) if single is None else (single,)
        for run in runs:
            lo = run.start - offset
            part = buffer[lo : lo + run.length]
            if run.kind == NORMAL:
                if self.fd >= 0:  # a local file: straight to preadv (the hot path)
                    sysio.pread_full(self.fd, part, run.host, self.path)
                else:
                    self._read(part, run.host)
            elif run.kind == ZERO:
                sysio.fill_zero(part)
            elif run.kind == UNALLOCATED:
                read_as_backing(self.backing, part, run.start)
            else:
                data = self._inflated(run)
                within = run.start & (self._cluster_size - 1)
                part[:] = data[within : within + run.length]
        if inside < n:
            sysio.fill_zero(buffer[inside:])
        return n

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Extents of [offset, offset+length): this file's at ``depth``, the backing's below."""
        return _merged(self._extents(offset, length, depth))

    def _extents(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        end = offset + length
        inside = max(offset, min(end, self.size))
        for run in self._runs(offset, inside):
            if run.kind == NORMAL:
                yield Extent(run.start, run.length, depth, True, False, run.host)
            elif run.kind == COMPRESSED:
                yield Extent(run.start, run.length, depth, True, False, None, compressed=True)
            elif run.kind == ZERO:
                yield Extent(run.start, run.length, depth, True, True, None)
            else:
                yield from self._backing_extents(run.start, run.length, depth)
        if end > inside:
            yield Extent(inside, end - inside, depth, False, True, None)

    def _backing_extents(self, start: int, length: int, depth: int) -> Iterator[Extent]:
        """An unallocated range: the backing's extents, then what lies past its end."""
        covered = 0
        if self.backing is not None:
            covered = max(0, min(length, self.backing.size - start))
            if covered:
                yield from self.backing.block_status_at(start, covered, depth + 1)
        if covered < length:
            yield Extent(start + covered, length - covered, depth, False, True, None)

    def route(self, offset: int, length: int) -> Route:
        """Where [offset, offset+length) can be read from (see "Routes" above)."""
        end = offset + length
        inside = max(offset, min(end, self.size))
        if offset < 0 or not (self._local or self._tables_cached(offset, inside)):
            return POOL
        try:
            single = self._single_piece(offset, inside)
            runs = [single] if single is not None else list(self._runs(offset, inside))
        except AddCowError:
            return POOL
        parts = [self._run_route(run) for run in runs]
        if inside < end:
            parts.append(INLINE)
        return joined(parts)

    def _run_route(self, run: _Run) -> Route:
        if run.kind == NORMAL:
            return self._container.route(run.host, run.length)
        if run.kind == ZERO:
            return INLINE
        if run.kind == UNALLOCATED:
            return route_as_backing(self.backing, run.start, run.length)
        return POOL

    def _tables_cached(self, pos: int, end: int) -> bool:
        """Whether mapping [pos, end) needs no L2 table that is not in the cache."""
        if pos >= end:
            return True
        with self._lock:
            for l1_index in range(pos >> self._l1_bits, ((end - 1) >> self._l1_bits) + 1):
                table = self._l1[l1_index] & fmt.L1E_OFFSET_MASK
                if table and table not in self._l2_cache:
                    return False
        return True

    def file_ids(self) -> set[tuple[int, int]]:
        ids = self._container.file_ids()
        if self.backing is not None:
            ids |= self.backing.file_ids()
        return ids

    def close(self) -> None:
        """Close the backing this file opened, then this file (its container)."""
        backing, self.backing = self.backing, None
        try:
            if backing is not None:
                backing.close()
        finally:
            self.fd = -1
            self._container.close()

    # -- mapping ----------------------------------------------------------------

    def _runs(self, pos: int, end: int) -> Iterator[_Run]:
        """Runs covering [pos, end), which lies inside the virtual size."""
        pending: _Run | None = None
        for piece in self._pieces(pos, end):
            if pending is None:
                pending = piece
            elif (
                piece.kind == pending.kind
                and piece.kind != COMPRESSED
                and (piece.kind != NORMAL or pending.host + pending.length == piece.host)
            ):
                pending = pending._replace(length=pending.length + piece.length)
            else:
                yield pending
                pending = piece
        if pending is not None:
            yield pending

    def _single_piece(self, pos: int, end: int) -> _Run | None:
        """The one piece of [pos, end) inside one standard cluster, else None.

        The common request of random I/O, mapped without the generators of
        :meth:`_runs` (the same checks, through :meth:`_standard_piece`).
        """
        bits = self._cluster_bits
        if self._extended or pos >= end or pos >> bits != (end - 1) >> bits:
            return None
        l1_index = pos >> self._l1_bits
        table = self._l2_table(l1_index)
        if table is None:
            return _Run(UNALLOCATED, pos, end - pos, 0)
        l2_index = (pos >> bits) & ((1 << self._l2_bits) - 1)
        return self._standard_piece(table[l2_index], pos, end, l1_index, l2_index)

    def _pieces(self, pos: int, end: int) -> Iterator[_Run]:
        """Pieces of [pos, end): at most one cluster (or subcluster run) each."""
        cluster_mask = self._cluster_size - 1
        l2_mask = (1 << self._l2_bits) - 1
        while pos < end:
            l1_index = pos >> self._l1_bits
            table_end = min(end, (l1_index + 1) << self._l1_bits)
            table = self._l2_table(l1_index)
            if table is None:
                yield _Run(UNALLOCATED, pos, table_end - pos, 0)
                pos = table_end
                continue
            while pos < table_end:
                l2_index = (pos >> self._cluster_bits) & l2_mask
                base = pos & ~cluster_mask
                stop = min(base + self._cluster_size, table_end)
                entry = table[l2_index * self._stride]
                if self._extended:
                    bitmap = table[l2_index * 2 + 1]
                    yield from self._extended_pieces(entry, bitmap, pos, stop, l1_index, l2_index)
                else:
                    yield self._standard_piece(entry, pos, stop, l1_index, l2_index)
                pos = stop

    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table of an L1 entry, or None for an unallocated range."""
        entry = self._l1[l1_index]
        if entry & fmt.L1E_RESERVED_MASK:
            raise self._corrupt(
                f"L1 entry {l1_index}",
                f"reserved bits ({fmt.L1E_RESERVED_MASK:#x}) clear",
                f"{entry:#018x}",
            )
        offset = entry & fmt.L1E_OFFSET_MASK
        if offset == 0:
            return None
        if offset & (self._cluster_size - 1):
            raise self._corrupt(
                f"L2 table offset (L1 index {l1_index})",
                f"a multiple of the cluster size ({self._cluster_size})",
                f"{offset:#x}",
            )
        if offset + self._cluster_size > self._file_size:
            raise self._corrupt(
                f"L2 table offset (L1 index {l1_index})",
                f"a table inside the file of {self._file_size} bytes",
                f"{offset:#x} + {self._cluster_size}",
            )
        with self._lock:
            table = self._l2_cache.get(offset)
            if table is not None:
                self._l2_cache.move_to_end(offset)
                return table
        table = self._read_table(offset, self._cluster_size // 8)
        with self._lock:
            self._l2_cache[offset] = table
            if len(self._l2_cache) > self._l2_cache_max:
                self._l2_cache.popitem(last=False)
        return table

    def _standard_piece(self, entry: int, pos: int, stop: int, l1: int, l2: int) -> _Run:
        if entry & fmt.L2E_COMPRESSED:
            self._check_compressed(entry, l1, l2)
            return _Run(COMPRESSED, pos, stop - pos, entry)
        if entry & fmt.L2E_STD_RESERVED_MASK:
            raise self._corrupt(
                self._entry_name(l1, l2),
                f"reserved bits ({fmt.L2E_STD_RESERVED_MASK:#x}) clear",
                f"{entry:#018x}",
            )
        offset = entry & fmt.L2E_OFFSET_MASK
        if entry & fmt.L2E_ZERO:
            if self._v2:
                raise self._corrupt(
                    self._entry_name(l1, l2),
                    "no zero flag (bit 0) in a version 2 image",
                    f"{entry:#018x}",
                )
            if offset:
                self._check_aligned(offset, l1, l2)
            return _Run(ZERO, pos, stop - pos, 0)
        if offset == 0:
            return _Run(UNALLOCATED, pos, stop - pos, 0)
        self._check_aligned(offset, l1, l2)
        host = offset + (pos & (self._cluster_size - 1))
        self._check_inside(host, stop - pos, l1, l2)
        return _Run(NORMAL, pos, stop - pos, host)

    def _extended_pieces(
        self, entry: int, bitmap: int, pos: int, stop: int, l1: int, l2: int
    ) -> Iterator[_Run]:
        if entry & fmt.L2E_COMPRESSED:
            if bitmap:
                raise self._corrupt(
                    self._entry_name(l1, l2),
                    "a zero subcluster bitmap for a compressed cluster",
                    f"{bitmap:#018x}",
                )
            self._check_compressed(entry, l1, l2)
            yield _Run(COMPRESSED, pos, stop - pos, entry)
            return
        reserved = fmt.L2E_STD_RESERVED_MASK | fmt.L2E_ZERO
        if entry & reserved:
            raise self._corrupt(
                self._entry_name(l1, l2),
                f"reserved bits ({reserved:#x}) clear with extended L2 entries",
                f"{entry:#018x}",
            )
        alloc = bitmap & fmt.SUBCLUSTER_ALLOC_MASK
        zero = bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT
        if alloc & zero:
            raise self._corrupt(
                self._entry_name(l1, l2),
                "no subcluster both allocated and zero",
                f"bitmap {bitmap:#018x}",
            )
        offset = entry & fmt.L2E_OFFSET_MASK
        if alloc and offset == 0:
            raise self._corrupt(
                self._entry_name(l1, l2),
                "no allocated subclusters in a cluster without a host offset",
                f"bitmap {bitmap:#018x}",
            )
        if offset:
            self._check_aligned(offset, l1, l2)
        base = pos & ~(self._cluster_size - 1)
        if alloc == 0 and zero == 0:
            yield _Run(UNALLOCATED, pos, stop - pos, 0)
            return
        sc_bits = self._subcluster_bits
        index = (pos - base) >> sc_bits
        last = (stop - 1 - base) >> sc_bits
        while index <= last:
            kind = NORMAL if alloc >> index & 1 else ZERO if zero >> index & 1 else UNALLOCATED
            run_end = index + 1
            while run_end <= last and _sub_kind(alloc, zero, run_end) == kind:
                run_end += 1
            lo = max(pos, base + (index << sc_bits))
            hi = min(stop, base + (run_end << sc_bits))
            host = 0
            if kind == NORMAL:
                host = offset + (lo - base)
                self._check_inside(host, hi - lo, l1, l2)
            yield _Run(kind, lo, hi - lo, host)
            index = run_end

    def _check_aligned(self, offset: int, l1: int, l2: int) -> None:
        if offset & (self._cluster_size - 1):
            raise self._corrupt(
                f"cluster offset ({self._entry_name(l1, l2)})",
                f"a multiple of the cluster size ({self._cluster_size})",
                f"{offset:#x}",
            )

    def _check_inside(self, host: int, length: int, l1: int, l2: int) -> None:
        if host + length > self._file_size:
            raise self._corrupt(
                f"data cluster ({self._entry_name(l1, l2)})",
                f"host bytes inside the file of {self._file_size} bytes",
                f"{length} bytes at {host:#x}",
            )

    def _check_compressed(self, entry: int, l1: int, l2: int) -> None:
        """The compressed stream lies past cluster 0 and in the file (its last
        sector may be cut short)."""
        offset, length = self._geometry.decode(entry)
        if offset >> 56:
            raise self._corrupt(
                f"compressed cluster ({self._entry_name(l1, l2)})",
                "a host offset below 2^56",
                f"{offset:#x}",
            )
        if offset < self._cluster_size or offset >= self._file_size:
            raise self._corrupt(
                f"compressed cluster ({self._entry_name(l1, l2)})",
                f"a host offset between cluster 0 and the end of the file "
                f"({self._cluster_size}..{self._file_size - 1})",
                f"{offset:#x}",
            )
        if offset + length - self._file_size >= fmt.SECTOR:
            raise self._corrupt(
                f"compressed cluster ({self._entry_name(l1, l2)})",
                f"a stream inside the file of {self._file_size} bytes",
                f"{length} bytes at {offset:#x}",
            )

    # -- compressed clusters -----------------------------------------------------

    def _inflated(self, run: _Run) -> bytes:
        """The cluster a COMPRESSED run lies in, inflated at least to the run's end
        (through the cache). The first read of a cluster inflates only what it
        needs; one that needs more than the cache holds inflates it all."""
        entry = run.host
        need = (run.start & (self._cluster_size - 1)) + run.length
        with self._lock:
            data = self._clusters.get(entry)
            if data is not None:
                self._clusters.move_to_end(entry)
                if len(data) >= need:
                    return data
        want = need if data is None else self._cluster_size
        offset, length = self._geometry.decode(entry)
        raw = bytearray(min(length, self._file_size - offset))
        self._read(memoryview(raw), offset)
        data = self._decompress(raw, run.start, want)
        with self._lock:
            cached = self._clusters.get(entry)
            if cached is None or len(cached) < len(data):
                self._clusters[entry] = data
            if len(self._clusters) > self._clusters_max:
                self._clusters.popitem(last=False)
        return data

    def _decompress(self, raw: bytearray, guest: int, want: int) -> bytes:
        """The first ``want`` bytes of the cluster ``raw`` holds."""
        zstd = self._zstd
        failures: tuple[type[Exception], ...] = (zlib.error,) if zstd is None else (zstd.ZstdError,)
        try:
            if zstd is None:
                data = zlib.decompressobj(ZLIB_WBITS).decompress(raw, want)
            else:
                data = self._zstd_decompress(zstd, raw, want)
        except failures as exc:
            raise self._compressed_error(guest, f"a broken stream ({exc})") from exc
        if len(data) != want:
            raise self._compressed_error(guest, f"{len(data)} bytes inflated")
        return data

    def _zstd_decompress(self, zstd: ModuleType, raw: bytearray, want: int) -> bytes:
        """Frame after frame until ``want`` bytes are out; trailing input is ignored
        (the last sector may hold the start of another cluster's stream)."""
        dctx = zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        reader = dctx.stream_reader(raw, read_across_frames=True)
        chunks: list[bytes] = []
        got = 0
        while got < want:
            chunk = reader.read(want - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _compressed_error(self, guest: int, found: str) -> Qcow2CorruptError:
        l1 = guest >> self._l1_bits
        l2 = (guest >> self._cluster_bits) & ((1 << self._l2_bits) - 1)
        return self._corrupt(
            f"compressed cluster ({self._entry_name(l1, l2)})",
            f"a {self.header.compression} stream inflating to {self._cluster_size} bytes",
            found,
        )

    # -- messages ---------------------------------------------------------------

    def _entry_name(self, l1: int, l2: int) -> str:
        guest = (l1 << self._l1_bits) + (l2 << self._cluster_bits)
        return f"L1 index {l1}, L2 index {l2}, guest offset {guest:#x}"

    def _corrupt(self, field: str, expected: str, found: str) -> Qcow2CorruptError:
        return Qcow2CorruptError(field, expected, found, self.path)


def _open_local(path: str, guard: ChainGuard, force_share: bool) -> LocalContainer:
    """Open the qcow2 file at ``path`` as a chain opens a store: policy, guard, lock."""
    named = guard.depth > 0  # a file an image names, not one the user gave
    if named:
        guard.check_path(path)
    try:
        fd = sysio.open_file(path, os.O_RDONLY)
    except OSError as exc:
        what = "backing file" if named else "qcow2 image"
        raise BackingError(f"{path}: cannot open {what}: {exc.strerror}") from exc
    try:
        guard.add(fd, path)
        if named:
            guard.check_open(fd, path)
        if not force_share:
            lock_raw(fd, path, writable=False)
        return LocalContainer(fd, path)
    except BaseException:
        os.close(fd)
        raise


def _sub_kind(alloc: int, zero: int, index: int) -> int:
    return NORMAL if alloc >> index & 1 else ZERO if zero >> index & 1 else UNALLOCATED


def _merged(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Adjacent extents with the same depth and flags (and contiguous host bytes) as one."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if (
            pending is not None
            and pending.offset + pending.length == ext.offset
            and (pending.depth, pending.present, pending.zero, pending.compressed)
            == (ext.depth, ext.present, ext.zero, ext.compressed)
            and (
                (pending.host_offset is None and ext.host_offset is None)
                or (
                    pending.host_offset is not None
                    and ext.host_offset is not None
                    and pending.host_offset + pending.length == ext.host_offset
                )
            )
        ):
            pending = pending._replace(length=pending.length + ext.length)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending
