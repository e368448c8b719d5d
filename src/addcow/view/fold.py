"""``addcow fold``: take what QEMU did through a view back into the bitmap (:func:`fold_view`).

The view file is hostile input: QEMU wrote it, but so may anything else. The
whole view is read and checked before anything changes, as the qcow2 reader
checks a backing (:class:`~addcow.stores.qcow2.format.Header` with the data
file allowed, then every table), and more: its data file, backing, backing
format, cluster size and virtual size must be the ones the view was made with;
every L1 and L2 table must be aligned and inside the file; every L2 entry must
be unallocated, a zero cluster, or a data cluster at its own guest offset (no
compressed cluster, no reserved bit, nothing past the virtual size). Any other
view is refused with one line and the image is left unchanged.

Then each cluster of the view is one of:

* data (``NORMAL``): QEMU wrote it in place in the image file: its bit is set;
* zero (``ZERO``, as ``write -z`` and ``discard`` leave it over a backing): the
  cluster is punched (or zeroed, where the file system cannot punch) in the
  image file and its bit is set;
* unallocated: its bit stays as it was. A cluster allocated in the image but
  unallocated in the view was dropped by a foreign tool (``qemu-img commit``
  empties the view after writing its clusters into the backing): its bit stays
  1, since bits never go back to 0, and it reads as it did before the view was
  made (the image file's content, which such a commit also wrote into the
  backing). :class:`FoldStats` counts them (``kept``).

An L2 table equal to the one the view was made with is skipped without being
walked, so folding costs the reads of the tables plus a walk of the ones QEMU
changed. The memory used is the L1 table, one L2 table and two bitmaps the
size of the image's. The crash argument is :mod:`.record`'s.
"""

from __future__ import annotations

import os
from array import array

from .. import sysio
from ..bitmap import Bitmap
from ..errors import AddCowError, Qcow2Error, ViewError
from ..format import Header
from ..image.metafile import ImageFiles, open_image_files, write_bitmap_pages
from ..stores.chain import ChainGuard
from ..stores.qcow2.format import (
    AUTOCLEAR_DATA_FILE_RAW,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    L2E_ZERO,
    V3_MIN_HEADER_LENGTH,
    cluster0_size,
    unpack_entries,
)
from ..stores.qcow2.format import Header as Qcow2Header
from ..zeros import is_zero
from .layout import QemuNames, allocated_runs, entries_per_table, l2_tables, qemu_names
from .record import open_view_locked, retire, view_path


class FoldStats:
    """What a fold did, in clusters: newly allocated with QEMU's data, made zero,
    kept allocated although the view had dropped them."""

    def __init__(self) -> None:
        self.data = 0
        self.zero = 0
        self.kept = 0
        self.folded = False
        self.view = ""


def fold_view(path: str | os.PathLike[str], *, forget: bool = False) -> FoldStats:
    """Fold the view the image at ``path`` records, then retire it.

    ``forget`` retires a view whose file is gone without folding it: what QEMU
    wrote through it stays in the image file but not in the bitmap.
    """
    path = os.fspath(path)
    files = open_image_files(
        path,
        meta_writable=True,
        image_writable=True,
        lock=True,
        guard=ChainGuard(),
        view_ok=True,
    )
    stats = FoldStats()
    try:
        header = files.header
        if header.view_name is None:
            raise ViewError(f"{path}: the image has no qcow2 view to fold")
        view = stats.view = view_path(header, path)
        view_fd = open_view_locked(view)
        try:
            if header.view and view_fd is None and not forget:
                raise ViewError(
                    f"{view}: the view file is missing, so what QEMU wrote through it is "
                    "unknown; to drop the view and keep the image as it was when the view "
                    f"was made, run: addcow fold --forget {path}"
                )
            if header.view and view_fd is not None:
                zero = _read_view(files, path, view, view_fd, stats)
                _apply(files, path, zero)
                stats.folded = True
            retire(files.meta_fd, path, header, view_fd)
        finally:
            if view_fd is not None:
                os.close(view_fd)
    finally:
        files.close()
    return stats


def _refused(view: str, what: str) -> ViewError:
    return ViewError(f"{view}: not a view addcow can fold: {what}")


def _read_view(files: ImageFiles, path: str, view: str, fd: int, stats: FoldStats) -> Bitmap:
    """Check the whole view; set the bits of its data and zero clusters in
    ``files.bitmap`` (in memory only), and return the bitmap of its zero clusters."""
    header, bitmap = files.header, files.bitmap
    size = sysio.file_size(fd, view)
    prefix = sysio.pread_upto(fd, V3_MIN_HEADER_LENGTH, 0, view)
    try:
        head = sysio.pread_upto(fd, min(cluster0_size(prefix), size), 0, view)
        qcow2 = Qcow2Header.unpack(head, size, data_file=True)
    except Qcow2Error as exc:
        raise _refused(view, str(exc)) from None
    complete = header.all_allocated or bitmap.full
    names = qemu_names(header, path, view, files.image_path, complete=complete)
    _check_header(view, qcow2, header, files.size, names)
    zero = Bitmap(bytearray(len(bitmap.data)), bitmap.clusters)
    found = Bitmap(bytearray(len(bitmap.data)), bitmap.clusters)
    l1 = _read_entries(fd, view, qcow2.l1_table_offset, qcow2.l1_size)
    expected = l2_tables(allocated_runs(bitmap, complete), header.cluster_bits)
    want = next(expected, None)
    per = entries_per_table(header.cluster_bits)
    cluster = 1 << header.cluster_bits
    for index in range(qcow2.l1_needed):
        mine = None
        if want is not None and want[0] == index:
            mine, want = want, next(expected, None)
        entry = l1[index]
        if entry & L1E_RESERVED_MASK:
            raise _refused(view, f"L1 entry {index} has reserved bits set ({entry:#x})")
        offset = entry & L1E_OFFSET_MASK
        if offset == 0:
            if mine is not None:
                stats.kept += len(mine[2]) // 8 - mine[2][::8].count(0)
            continue
        if offset % cluster or offset < cluster or offset + cluster > size:
            raise _refused(
                view,
                f"L1 entry {index}: L2 table at {offset:#x} is not an aligned cluster "
                f"inside the file of {size} bytes (past cluster 0)",
            )
        raw = sysio.pread_upto(fd, cluster, offset, view)
        if len(raw) == cluster and _unchanged(raw, mine):
            continue
        table = unpack_entries(raw)
        _walk(view, table, index * per, header.cluster_bits, bitmap, found, zero, stats)
    for first, end, value in found.runs(0, found.clusters):
        if value:
            stats.data += bitmap.set_range(first, end)
    for first, end, value in zero.runs(0, zero.clusters):
        if value:
            bitmap.set_range(first, end)
    return zero


def _check_header(
    view: str, qcow2: Qcow2Header, header: Header, size: int, names: QemuNames
) -> None:
    expected = {
        "version": 3,
        "cluster_bits": header.cluster_bits,
        "size": size,
        "nb_snapshots": 0,
        "data_file_name": names.data_file,
        "backing_name": names.backing,
        "backing_format": names.backing_format,
    }
    for field, want in expected.items():
        found = getattr(qcow2, field)
        if found != want:
            raise _refused(view, f"{field} changed: expected {want!r}, found {found!r}")
    extra = qcow2.incompatible_features & ~(INCOMPAT_DATA_FILE | INCOMPAT_DIRTY)
    if extra:
        raise _refused(view, f"incompatible features {extra:#x} (a view has none)")
    if qcow2.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise _refused(view, "raw external data (autoclear bit 0x2)")


def _read_entries(fd: int, view: str, offset: int, count: int) -> list[int]:
    return list(unpack_entries(sysio.pread_upto(fd, count * 8, offset, view)))


def _unchanged(raw: bytes, mine: tuple[int, int, bytes] | None) -> bool:
    """Whether the L2 table read is the one the view was made with (``mine``)."""
    if mine is None:
        return is_zero(raw, 0, len(raw))
    _, first, entries = mine
    lo, hi = first * 8, first * 8 + len(entries)
    return raw[lo:hi] == entries and is_zero(raw, 0, lo) and is_zero(raw, hi, len(raw))


def _walk(
    view: str,
    entries: array[int],
    base: int,
    cluster_bits: int,
    bitmap: Bitmap,
    found: Bitmap,
    zero: Bitmap,
    stats: FoldStats,
) -> None:
    clusters = bitmap.clusters
    for n, entry in enumerate(entries):
        if entry == 0:
            if base + n < clusters and bitmap.is_set(base + n):
                stats.kept += 1
            continue
        guest = base + n
        where = f"L2 entry for cluster {guest} ({entry:#x})"
        if guest >= clusters:
            raise _refused(view, f"{where} is past the virtual size")
        if entry & L2E_COMPRESSED:
            raise _refused(view, f"{where} is compressed")
        if entry & L2E_STD_RESERVED_MASK:
            raise _refused(view, f"{where} has reserved bits set")
        host = entry & L2E_OFFSET_MASK
        if entry & L2E_ZERO:
            if host and host != guest << cluster_bits:
                raise _refused(view, f"{where} points at {host:#x}, not its guest offset")
            zero.set_range(guest, guest + 1)
            stats.zero += 1
        elif host or entry & L2E_COPIED:
            if host != guest << cluster_bits:
                raise _refused(view, f"{where} points at {host:#x}, not its guest offset")
            found.set_range(guest, guest + 1)
        elif bitmap.is_set(guest):
            stats.kept += 1


def _apply(files: ImageFiles, path: str, zero: Bitmap) -> None:
    """Punch the zero clusters, make the image file durable, then the bits."""
    bits, size = files.header.cluster_bits, files.size
    for first, end, value in zero.runs(0, zero.clusters):
        if value:
            lo, hi = first << bits, min(end << bits, size)
            if not sysio.punch_hole(files.image_fd, lo, hi - lo, files.image_path):
                sysio.zero_range(files.image_fd, lo, hi - lo, files.image_path)
    sysio.fdatasync(files.image_fd, files.image_path)
    chunks = files.bitmap.take_dirty()
    try:
        write_bitmap_pages(files.meta_fd, path, files.header.header_size, chunks)
        sysio.fdatasync(files.meta_fd, path)
    except AddCowError:
        files.bitmap.mark_dirty(chunks)
        raise
