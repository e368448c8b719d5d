"""``addcow view``: write a qcow2 view of an image and record it (:func:`make_view`).

The image is opened as every writer opens it (exclusive lock on the .add-cow
file, QEMU's write locks on the image file) and its backing chain is opened and
closed again, which checks it as a read would (depth, loops, a backing URI's
pin). Then the limits of a qcow2 view are checked (:mod:`.layout`), and the
view is written in the order :mod:`.record` argues: record, view file, bit.

The view file is created exclusively (``O_EXCL``): an existing file is never
replaced unless ``force``, and then only when no one has it open (an exclusive
lock on it, which QEMU's locks and addcow's conflict with) and it is none of
the image's own files. If making the view fails from the record's write on
(a write whose ``fdatasync`` failed may still reach the file), what this call
wrote is undone (the bit, the view file it created, then the record); if even
that fails, the image is left pending, which ``addcow fold`` finishes.
"""

from __future__ import annotations

import os

from .. import sysio
from ..errors import AddCowError, ViewError
from ..format import V2_INCOMPAT_VIEW, Header
from ..image.core import open_header_backing
from ..image.metafile import open_image_files
from ..stores.chain import ChainGuard
from ..stores.qcow2.format import Header as Qcow2Header
from .layout import (
    Layout,
    allocated_runs,
    check_geometry,
    l2_tables,
    qemu_names,
    touched_indexes,
    view_name_for,
)
from .record import open_view_locked, record_pending, retire, set_in_force


def make_view(
    path: str | os.PathLike[str],
    view: str | os.PathLike[str],
    *,
    force: bool = False,
    backing_root: str | None = None,
    allowed_uris: tuple[str, ...] = (),
) -> str:
    """Write the qcow2 view ``view`` of the image at ``path`` and record it; return
    the name the image records for it."""
    path, view = os.fspath(path), os.fspath(view)
    guard = ChainGuard(backing_root, allowed_uris)
    files = open_image_files(path, meta_writable=True, image_writable=True, lock=True, guard=guard)
    try:
        header, bitmap = files.header, files.bitmap
        if header.version != 2:
            raise ViewError(
                f"{path}: a version 1 image cannot record a view; convert it first: "
                f"addcow amend -o compat=2 {path}"
            )
        check_geometry(path, header.cluster_bits, files.size)
        complete = header.all_allocated or bitmap.full
        names = qemu_names(header, path, view, files.image_path, complete=complete)
        own = {(st.st_dev, st.st_ino) for st in map(os.fstat, (files.meta_fd, files.image_fd))}
        if names.backing is not None:
            backing = open_header_backing(header, path, guard=guard, force_share=False)
            own |= backing.file_ids()
            backing.close()
        name = view_name_for(view, path)
        _clear_the_way(view, force, own)
        runs = list(allocated_runs(bitmap, complete))
        layout = Layout.plan(
            header.cluster_bits, files.size, touched_indexes(runs, header.cluster_bits)
        )
        qcow2 = layout.header(files.size, names)
        cluster0 = qcow2.pack()
        pending = header._replace(view_name=name)
        created = False
        try:
            record_pending(files.meta_fd, path, pending)
            fd = os.open(view, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created = True
            try:
                _write_view(fd, view, layout, cluster0, qcow2, runs)
            finally:
                os.close(fd)
            sysio.sync_directory(os.path.dirname(view) or ".")
            set_in_force(files.meta_fd, path, pending)
        except BaseException:
            _undo(files.meta_fd, path, pending, view, created=created)
            raise
        return os.fsdecode(name)
    finally:
        files.close()


def _clear_the_way(view: str, force: bool, own: set[tuple[int, int]]) -> None:
    """Refuse an existing ``view`` unless ``force``; with it, remove it if it is
    none of the image's files and no one has it open."""
    try:
        st = os.stat(view)
    except FileNotFoundError:
        return
    if not force:
        raise ViewError(f"{view}: the file exists; a view never replaces a file (--force does)")
    if (st.st_dev, st.st_ino) in own:
        raise ViewError(f"{view}: this is one of the image's own files, not a view to replace")
    fd = open_view_locked(view)
    if fd is not None:
        try:
            sysio.unlink(view, "file the view replaces")
        finally:
            os.close(fd)


def _write_view(
    fd: int,
    view: str,
    layout: Layout,
    cluster0: bytes,
    qcow2: Qcow2Header,
    runs: list[tuple[int, int]],
) -> None:
    sysio.truncate(fd, layout.file_size, view)
    pieces = [
        (0, cluster0),
        (layout.l1_offset, layout.l1_table()),
        (layout.refcount_table_offset, layout.refcount_table()),
        (layout.refcount_blocks_offset, layout.refcount_block_bytes()),
    ]
    for offset, raw in pieces:
        sysio.pwrite_full(fd, [memoryview(raw)], offset, view)
    entry = 8
    for n, (index, first, raw) in enumerate(l2_tables(runs, qcow2.cluster_bits)):
        assert index == layout.l2_indexes[n]
        sysio.pwrite_full(fd, [memoryview(raw)], layout.l2_table_offset(n) + first * entry, view)
    sysio.fdatasync(fd, view)


def _undo(meta_fd: int, path: str, pending: Header, view: str, *, created: bool) -> None:
    """Remove what a failed :func:`make_view` created: the bit (which may have
    reached the disk even if its sync failed), the view file, the record. If that
    fails too, the image is left pending, which addcow fold finishes."""
    try:
        fd = open_view_locked(view) if created else None
        try:
            retire(
                meta_fd,
                path,
                pending._replace(
                    incompatible_features=pending.incompatible_features | V2_INCOMPAT_VIEW
                ),
                fd,
            )
        finally:
            if fd is not None:
                os.close(fd)
    except AddCowError:
        pass
