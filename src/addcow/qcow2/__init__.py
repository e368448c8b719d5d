"""A native, read-only qcow2 reader used as a backing store.

:mod:`.format` holds the on-disk layout (header, extensions, table entries);
:mod:`.store` holds :class:`~addcow.qcow2.store.Qcow2File`, a
:class:`~addcow.backing.BlockSource` beside :class:`~addcow.backing.RawFile`.
"""

from __future__ import annotations

from .format import Header
from .store import Qcow2File

__all__ = ["Header", "Qcow2File"]
