"""The view as the .add-cow file records it, and the crash argument of view and fold.

Two things in the header record a view (docs/specification.md, "Views"): the
view record (the header's last sector: the view file's name) and the VIEW
incompatible bit (sector 0). Each is changed by one sector write followed by
``fdatasync``, so a crash leaves each one old or new, never torn. An image is in
one of four states:

=====  ======  ===========  =========================================================
bit    record  view file    meaning, and what ``addcow fold`` does
=====  ======  ===========  =========================================================
0      none    (not ours)   no view: every command uses the image
0      name    any          *pending*: a view being made, or one already folded.
                            QEMU has not written through it (below). Fold retires
                            it: removes the view file if there is one, then the
                            record.
1      name    present      *in force*: QEMU may be writing through the view. Fold
                            folds it, then retires it.
1      name    missing      the view was removed by someone else: what QEMU wrote
                            through it is unknown. Fold refuses, unless told to
                            forget the view (``--forget``).
=====  ======  ===========  =========================================================

Every command but fold refuses the image while it has a record, with or
without the bit (the bit alone makes older readers refuse it; the record
without the bit breaks the zero rule for them).

Making a view (:func:`addcow.view.make.make_view`) goes: (1) write the record
(pending); (2) create the view file exclusively, write it and make it and its
directory entry durable; (3) set the bit (in force). A crash before (1) leaves
the image as it was; between (1) and (3) a pending image, whose view file
(complete, partial or absent) was never handed to anyone: ``make_view`` had not
returned. Folding (:mod:`addcow.view.fold`) goes: (a) read and check the whole
view, changing nothing; (b) punch the zero clusters, ``fdatasync`` the image
file (QEMU's writes and the punches are then durable), write the new bitmap
bits and ``fdatasync`` the .add-cow file; (c) clear the bit; (d) remove the
view file and make its directory durable; (e) clear the record. A crash in (a)
or (b) leaves the view in force and unchanged: the next fold reads the same
view and does the same work again (bits only go from 0 to 1; punching a zero
cluster twice leaves it zero; nothing else writes the image in between, since
every command refuses it). A crash after (c) leaves a pending image: the
bitmap already holds everything, and the retire finishes (d) and (e). The view
file is removed before the record, so no view file outlives the record that
names it: a stale view, whose tables no longer match the bitmap, is never left
for QEMU to open.

An I/O error is not a crash: the call goes on, and must leave one of the
states above and raise the error. A write whose ``fdatasync`` failed may
still reach the file later (the page stays in the cache), so it counts as
made. Making a view that fails anywhere from (1) on undoes it all: clears the
bit (a no-op write if (3) was not reached), removes the view file if this call
created it, clears the record, each made durable; a failed make therefore
leaves the image as it was, not pending (only if the undo fails too is it left
pending, for fold). Folding that fails leaves what a crash at the same call
leaves: the view in force and its file untouched before (c), pending from (c)
on (still in force if the bit's write did not reach the file), and the next
fold finishes. The fault-injection campaign (``tests/crash/test_lifecycle_faults.py``)
fails every I/O call of both, once each, and checks exactly this.
"""

from __future__ import annotations

import os

from .. import sysio
from ..errors import LockError
from ..format import V2_INCOMPAT_VIEW, Header
from ..image.metafile import write_incompatible, write_view_record
from ..locking import lock_whole
from ..stores.chain import resolve_name


def view_path(header: Header, path: str) -> str:
    """The view file the record of the .add-cow file at ``path`` names."""
    return resolve_name(header.view_name or b"", path)


def open_view_locked(view: str) -> int | None:
    """Open the view file read-write under an exclusive lock; None if it is gone.

    QEMU holds byte-range locks on a qcow2 file it has open, so the lock fails
    while QEMU (or addcow) uses the view.
    """
    try:
        fd = sysio.open_file(view, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        lock_whole(fd, view, exclusive=True)
    except LockError as exc:
        os.close(fd)
        raise LockError(f"{view}: the view is in use (QEMU has it open?): {exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def record_pending(meta_fd: int, path: str, pending: Header) -> None:
    """Step (1): write the view record ``pending`` names, bit clear."""
    write_view_record(meta_fd, path, pending)


def set_in_force(meta_fd: int, path: str, header: Header) -> Header:
    """Step (3): set the VIEW bit."""
    in_force = header._replace(
        incompatible_features=header.incompatible_features | V2_INCOMPAT_VIEW
    )
    write_incompatible(meta_fd, path, in_force)
    return in_force


def retire(meta_fd: int, path: str, header: Header, view_fd: int | None) -> Header:
    """Steps (c) to (e): clear the bit, remove the view file (``view_fd`` is it,
    open and locked, or None when there is none), clear the record."""
    if header.view:
        header = header._replace(
            incompatible_features=header.incompatible_features & ~V2_INCOMPAT_VIEW
        )
        write_incompatible(meta_fd, path, header)
    if view_fd is not None:
        view = view_path(header, path)
        sysio.unlink(view, "view")
        sysio.sync_directory(os.path.dirname(view) or ".")
    header = header._replace(view_name=None)
    write_view_record(meta_fd, path, header)
    return header
