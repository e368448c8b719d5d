"""Existing files a command was named to write: which of them it may replace.

A target named by mistake (``addcow convert disk.add-cow golden.qcow2`` for
``golden.raw``) must not destroy an image. Before a command replaces, truncates
or appends to an existing file it was only given the name of, it looks at that
file through the descriptor it is about to write, so that the file judged is
the file written:

* a file that another open file holds a lock on (an image or raw file that
  ``addcow serve``, another addcow command or QEMU has open) is refused,
  ``force`` or not: the process using it would see its disk change under it;
* a file that starts with an image header (:func:`addcow.stores.magic.known_magics`) is
  replaced only with ``force`` (``--force``);
* any other file (a raw disk, an old copy) is replaced, as ``qemu-img convert``
  replaces its target, unless the caller refuses every existing file
  (``create`` does, for its .add-cow path).

The first bytes are looked at only to refuse, never to choose a format
(:mod:`addcow.stores.magic`).
"""

from __future__ import annotations

from . import sysio
from .errors import ExistingFileError, LockError
from .locking import held_by_another
from .stores.magic import HEAD_LENGTH, article, identify


def refuse_replacing(
    fd: int,
    path: str,
    *,
    force: bool,
    advice: str,
    action: str = "replace it",
    every_file: bool = False,
    probe_locks: bool = True,
) -> None:
    """Raise unless the existing file open as ``fd`` (named ``path``) may be written.

    LockError if another open file holds a lock on it (not probed with
    ``probe_locks=False``, for a caller that holds a lock of its own on it);
    ExistingFileError, unless ``force``, if it starts with an image header, or
    with ``every_file`` whatever it holds. The message names the file, what it
    holds, that it is refused to ``action``, and ``advice`` (how to go on).
    """
    head = sysio.pread_upto(fd, HEAD_LENGTH, 0, f"{path}: read")
    found = identify(head)
    if found is not None:
        holds = f"{article(found)} image"
    else:
        size = sysio.file_size(fd, path)
        holds = f"{size} bytes and no image header" if size else "nothing"
    if probe_locks and held_by_another(fd):
        raise LockError(
            f"{path}: the file exists, holds {holds} and is in use by another process; "
            f"refusing to {action}"
        )
    if not force and (found is not None or every_file):
        raise ExistingFileError(
            f"{path}: the file exists and holds {holds}; refusing to {action} ({advice})"
        )
