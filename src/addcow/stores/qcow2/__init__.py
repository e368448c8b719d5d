"""A native, read-only qcow2 reader used as a backing store.

:mod:`.format` holds the on-disk layout (header, extensions, table entries);
:mod:`.store` holds :class:`~addcow.stores.qcow2.store.Qcow2File`, a
:class:`~addcow.stores.BlockSource` beside :class:`~addcow.stores.RawFile`;
:mod:`.container` holds what a qcow2 file's bytes are read from (a local
descriptor, or a remote store behind a backing URI).
"""

from __future__ import annotations

from .container import LocalContainer, RemoteContainer
from .format import Header
from .store import FORMAT, Qcow2File

__all__ = ["FORMAT", "Header", "LocalContainer", "Qcow2File", "RemoteContainer"]
