"""The qcow2 view's layout: which files it names, and its tables, from the bitmap.

A view of an image with ``clusters`` clusters of ``2^cluster_bits`` bytes is a
version 3 qcow2 file with the same cluster size and virtual size::

    cluster 0        header, backing format and data file extensions, backing name
    L1               l1_size entries, in whole clusters
    refcount table   in whole clusters
    refcount blocks  16-bit refcounts of every cluster of the view file (all 1)
    L2 tables        one per L1 entry whose range holds an allocated cluster

An L2 entry of an allocated cluster ``g`` is ``COPIED | g * cluster_size``: its
host offset in the data file is its guest offset, with bit 63 set as QEMU writes
for a fresh cluster (and which, with a data file, makes offset 0 a data cluster,
not an unallocated one). Unallocated clusters have entry 0 and read from the
backing. Refcounts count the view file's own clusters only: with an external
data file the data clusters are not refcounted (QEMU's ``qemu-img check`` of a
view is then clean). An L2 table is written only from its first to its last
non-zero entry; the rest is a hole, read back as unallocated entries.

Names (:func:`qemu_names`). QEMU 7.2 resolves a relative data file name
against its current directory, not the qcow2 file's, so the data file is named
by its real absolute path. A backing name is resolved against the qcow2 file's
directory: a view in the .add-cow file's directory keeps the stored name, any
other gets the backing's real absolute path. A relative name with a ``:``
before its first ``/`` would be read by QEMU as a protocol (``json:``,
``nbd:``): it gets ``./`` in front. An NBD backing URI is the backing name as
it is (QEMU opens ``nbd://`` and ``nbd+unix://`` backing names itself); TLS and
HTTP(S) URIs and add-cow backings are refused (:func:`qemu_names` says why).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from ..bitmap import Bitmap
from ..errors import ViewError
from ..format import Header
from ..stores.chain import resolve_name
from ..stores.qcow2.format import (
    ENTRY_SIZE,
    INCOMPAT_DATA_FILE,
    L2E_COPIED,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    SECTOR,
    V2_REFCOUNT_ORDER,
    pack_entries,
    pack_refcounts,
)
from ..stores.qcow2.format import Header as Qcow2Header
from ..stores.remote.uri import HTTP_SCHEMES, TLS_SCHEMES, BackingURI

REFCOUNT_BYTES = 1 << V2_REFCOUNT_ORDER >> 3
"""Bytes per refcount (16-bit, QEMU's default)."""


class QemuNames(NamedTuple):
    """The names a view records, as QEMU reads them."""

    data_file: bytes
    backing: bytes | None
    backing_format: str | None


def view_name_for(view_path: str, image_path: str) -> bytes:
    """The name of the view the .add-cow file records: its base name when the view
    is in the .add-cow file's directory, else its real absolute path."""
    if _same_directory(view_path, image_path):
        return os.fsencode(os.path.basename(view_path))
    return os.fsencode(os.path.realpath(view_path))


def qemu_names(
    header: Header, path: str, view_path: str, image_path: str, *, complete: bool
) -> QemuNames:
    """The data file and backing names and the backing format a view of the image at
    ``path`` records (see the module docstring); refuses a backing QEMU cannot open
    as addcow does. A ``complete`` image's view names no backing: it never reads one."""
    data_file = os.fsencode(os.path.realpath(image_path))
    name = header.backing_name
    if name is None or complete:
        return QemuNames(data_file, None, None)
    fmt = header.backing_format
    if fmt == "add-cow":
        raise ViewError(
            f"{path}: QEMU cannot open an add-cow backing; serve it (addcow serve) and "
            "rebase onto the export, or stream the image first"
        )
    if fmt is None:
        raise ViewError(f"{path}: the backing format is not recorded; record it first")
    if header.backing_uri:
        uri = BackingURI.decode(name)
        if uri.scheme in HTTP_SCHEMES:
            raise ViewError(
                f"{path}: QEMU would read the {uri.scheme} backing without addcow's pin "
                "(its curl driver does not check the recorded size and ETag); serve the "
                "image through addcow (addcow serve) instead"
            )
        if uri.scheme in TLS_SCHEMES:
            raise ViewError(
                f"{path}: a view cannot name the TLS backing {uri.scheme}:// (QEMU needs "
                "its credentials as an object, not in a backing name); serve the image "
                "through addcow (addcow serve) instead"
            )
        return QemuNames(data_file, uri.uri.encode("ascii"), fmt)
    if _same_directory(view_path, path):
        backing = name
        head = backing.split(b"/", 1)[0]
        if not backing.startswith(b"/") and b":" in head:
            backing = b"./" + backing
    else:
        backing = os.fsencode(os.path.realpath(resolve_name(name, path)))
    if len(backing) > MAX_BACKING_NAME:
        raise ViewError(
            f"{path}: a qcow2 backing name has at most {MAX_BACKING_NAME} bytes; "
            f"the view's would have {len(backing)}"
        )
    return QemuNames(data_file, backing, fmt)


def _same_directory(a: str, b: str) -> bool:
    def where(p: str) -> str:
        return os.path.realpath(os.path.dirname(os.path.abspath(p)))

    return where(a) == where(b)


def check_geometry(path: str, cluster_bits: int, size: int) -> None:
    """Refuse what a qcow2 view cannot express, each with one line."""
    if cluster_bits > MAX_CLUSTER_BITS:
        raise ViewError(
            f"{path}: qcow2 clusters are at most {1 << MAX_CLUSTER_BITS >> 20} MiB; the "
            f"image's are {1 << cluster_bits >> 20} MiB (a view keeps the cluster size)"
        )
    if size % SECTOR:
        raise ViewError(
            f"{path}: QEMU sees disks in whole {SECTOR}-byte sectors; the image's "
            f"size, {size} bytes, is not a multiple of {SECTOR}"
        )
    needed = l1_size(cluster_bits, size) * ENTRY_SIZE
    if needed > MAX_L1_BYTES:
        raise ViewError(
            f"{path}: a qcow2 L1 table has at most {MAX_L1_BYTES >> 20} MiB; a view of "
            f"{size} bytes in {1 << cluster_bits}-byte clusters needs {needed} bytes"
        )


def entries_per_table(cluster_bits: int) -> int:
    return (1 << cluster_bits) // ENTRY_SIZE


def l1_size(cluster_bits: int, size: int) -> int:
    span = entries_per_table(cluster_bits) << cluster_bits
    return max(1, -(-size // span))


def allocated_runs(bitmap: Bitmap, all_allocated: bool) -> Iterator[tuple[int, int]]:
    """Runs [first, end) of allocated clusters."""
    if all_allocated:
        if bitmap.clusters:
            yield 0, bitmap.clusters
        return
    for first, end, value in bitmap.runs(0, bitmap.clusters):
        if value:
            yield first, end


def l2_tables(
    runs: Iterable[tuple[int, int]], cluster_bits: int
) -> Iterator[tuple[int, int, bytes]]:
    """(L1 index, first entry, entries) of each L2 table that maps a run: the
    entries from the first to the last non-zero one, big endian, in L1 order."""
    per = entries_per_table(cluster_bits)
    step = 1 << cluster_bits
    current, first, pos = -1, 0, 0
    parts: list[array[int]] = []
    for a, b in runs:
        while a < b:
            index, lo = divmod(a, per)
            hi = min(b - index * per, per)
            if index != current:
                if parts:
                    yield current, first, _joined(parts)
                current, first, pos, parts = index, lo, lo, []
            if lo > pos:
                parts.append(array("Q", [0]) * (lo - pos))
            parts.append(array("Q", range(L2E_COPIED | a << cluster_bits,
                                          L2E_COPIED | (index * per + hi) << cluster_bits,
                                          step)))  # fmt: skip
            pos = hi
            a = index * per + hi
    if parts:
        yield current, first, _joined(parts)


def _joined(parts: list[array[int]]) -> bytes:
    entries = parts[0]
    for part in parts[1:]:
        entries += part
    return pack_entries(entries)


class Layout(NamedTuple):
    """Where each of a view's tables lies (byte offsets in the view file)."""

    cluster_bits: int
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    refcount_blocks_offset: int
    refcount_blocks: int
    l2_offset: int
    l2_indexes: list[int]
    clusters: int
    """Clusters of the view file, all of them refcounted 1."""

    @classmethod
    def plan(cls, cluster_bits: int, size: int, l2_indexes: list[int]) -> Layout:
        c = 1 << cluster_bits
        entries = l1_size(cluster_bits, size)
        l1_clusters = -(-entries * ENTRY_SIZE // c)
        fixed = 1 + l1_clusters + len(l2_indexes)
        per_block = c // REFCOUNT_BYTES
        table = blocks = 0
        while True:  # the refcount structures count themselves
            new_blocks = -(-(fixed + table + blocks) // per_block)
            new_table = -(-new_blocks * ENTRY_SIZE // c)
            if (new_blocks, new_table) == (blocks, table):
                break
            blocks, table = new_blocks, new_table
        table_offset = (1 + l1_clusters) * c
        blocks_offset = table_offset + table * c
        return cls(
            cluster_bits,
            entries,
            c,
            table_offset,
            table,
            blocks_offset,
            blocks,
            blocks_offset + blocks * c,
            l2_indexes,
            fixed + table + blocks,
        )

    @property
    def file_size(self) -> int:
        return self.clusters << self.cluster_bits

    def header(self, size: int, names: QemuNames) -> Qcow2Header:
        return Qcow2Header(
            version=3,
            backing_file_offset=0,
            backing_file_size=0,
            cluster_bits=self.cluster_bits,
            size=size,
            crypt_method=0,
            l1_size=self.l1_size,
            l1_table_offset=self.l1_offset,
            refcount_table_offset=self.refcount_table_offset,
            refcount_table_clusters=self.refcount_table_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            incompatible_features=INCOMPAT_DATA_FILE,
            refcount_order=V2_REFCOUNT_ORDER,
            backing_name=names.backing,
            backing_format=names.backing_format,
            data_file_name=names.data_file,
        )

    def l1_table(self) -> bytes:
        entries = array("Q", [0]) * self.l1_size
        c = 1 << self.cluster_bits
        for n, index in enumerate(self.l2_indexes):
            entries[index] = L2E_COPIED | (self.l2_offset + n * c)
        return pack_entries(entries)

    def refcount_table(self) -> bytes:
        c = 1 << self.cluster_bits
        return pack_entries(
            [self.refcount_blocks_offset + n * c for n in range(self.refcount_blocks)]
        )

    def refcount_block_bytes(self) -> bytes:
        """Every refcount block, one after the other (1 for each cluster of the view)."""
        return pack_refcounts(array("H", [1]) * self.clusters)

    def l2_table_offset(self, n: int) -> int:
        return self.l2_offset + (n << self.cluster_bits)


def touched_indexes(runs: Iterable[tuple[int, int]], cluster_bits: int) -> list[int]:
    """The L1 indexes whose range holds a cluster of ``runs``, in order."""
    per = entries_per_table(cluster_bits)
    indexes: list[int] = []
    for a, b in runs:
        lo, hi = a // per, (b - 1) // per
        if indexes and indexes[-1] == lo:
            lo += 1
        indexes.extend(range(lo, hi + 1))
    return indexes
