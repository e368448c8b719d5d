"""What a name stored in an image means, and the policy for following it.

Names stored in a header are local file names taken literally: no URL, no
``json:``, no protocol prefix. A relative name is relative to the directory
holding the file that names it (the .add-cow file, or a qcow2 file for its own
backing), never to the current directory: :func:`resolve_name`.

:class:`ChainGuard` follows one open of a chain. It refuses a chain deeper than
:data:`MAX_CHAIN_DEPTH` and any file (by device and inode) that appears twice,
which catches an image file that is its own backing, a .add-cow naming itself,
and loops through symlinks or hard links. With a ``root`` (the library's
``backing_root``, the CLI's ``--backing-root``) it also refuses every named file
that resolves outside that directory, once by name before opening and once by
the opened descriptor (which catches a symlink swapped in between): the policy
for services that open images they did not create.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import BackingLoopError, PathPolicyError

MAX_CHAIN_DEPTH = 16
"""Most backing files below one image (specification, "Backing chains")."""


def resolve_name(name: bytes, relative_to: str) -> str:
    """The path a stored name refers to: relative names start at ``relative_to``'s dir."""
    path = os.fsdecode(name)
    if os.path.isabs(path):
        return path
    return os.path.join(os.path.dirname(relative_to), path)


class ChainGuard:
    """Files already met while opening one chain, and how deep it goes.

    With a ``root``, every file an image names must resolve inside that directory,
    and every URI must start with one of ``allowed_uris`` (:mod:`addcow.stores.remote`).
    (A plain class: importing ``dataclasses`` would slow every command's start.)
    """

    def __init__(self, root: str | None = None, allowed_uris: Sequence[str] = ()) -> None:
        self.seen: dict[tuple[int, int], str] = {}
        self.depth = 0
        self.root = root
        self.allowed_uris = tuple(allowed_uris)  # URI prefixes allowed despite ``root``

    def check_path(self, path: str) -> None:
        """Refuse a named file outside ``root`` before opening it."""
        if self.root is not None:
            _check_length(path)
            _inside_root(self.root, os.path.realpath(path), path)

    def check_open(self, fd: int, path: str) -> None:
        """Refuse an opened named file outside ``root`` (catches symlink races)."""
        if self.root is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as exc:  # ENAMETOOLONG: deeper than PATH_MAX
                raise PathPolicyError(
                    f"{_shown(path)}: cannot tell where the opened file is "
                    f"({exc.strerror}), so it is refused (backing_root / --backing-root)"
                ) from exc
            _inside_root(self.root, real, path)

    def add(self, fd: int, path: str) -> None:
        """Record a file, refusing one that is already part of the chain."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            raise BackingLoopError(
                f"{path}: the file is already used as {self.seen[key]} in this chain "
                "(a backing chain must not loop)"
            )
        self.seen[key] = path

    def descend(self, path: str) -> None:
        self.depth += 1
        if self.depth > MAX_CHAIN_DEPTH:
            raise BackingLoopError(
                f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH} levels (or it loops)"
            )


def _inside_root(root: str, real: str, path: str) -> None:
    root = os.path.realpath(root)
    if os.path.commonpath([real, root]) != root:
        raise PathPolicyError(
            f"{_shown(path)}: resolves to {_shown(real)}, outside the allowed directory "
            f"{root} (backing_root / --backing-root)"
        )


PATH_MAX = 4096
"""Longest path the kernel opens; a longer stored name can only fail (and
resolving it, component by component, costs time that grows with its square)."""


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) >= PATH_MAX:
        raise PathPolicyError(
            f"{_shown(path)}: name of {len(os.fsencode(path))} bytes, longer than "
            f"PATH_MAX ({PATH_MAX}) (backing_root / --backing-root)"
        )


def _shown(path: str, limit: int = 200) -> str:
    """A path for a message: at most ``limit`` characters."""
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-limit // 2 :]}"
