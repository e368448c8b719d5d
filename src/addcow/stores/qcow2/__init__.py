"""A native, read-only qcow2 reader used as a backing store.

:mod:`.format` holds the on-disk layout (header, extensions, table entries);
:mod:`.store` holds :class:`~addcow.stores.qcow2.store.Qcow2File`, a
:class:`~addcow.stores.BlockSource` beside :class:`~addcow.stores.RawFile`;
:mod:`.container` holds what a qcow2 file's bytes are read from (a local
descriptor, or a remote store behind a backing URI); :mod:`.describe` what
``addcow info`` shows of a qcow2 file. :data:`FORMAT` is the format's entry in
the registry of :mod:`addcow.stores`.
"""

from __future__ import annotations

from ..base import StoreFormat
from .container import LocalContainer, RemoteContainer
from .describe import describe_qcow2
from .format import MAGIC, Header
from .store import Qcow2File

FORMAT = StoreFormat("qcow2", Qcow2File, describe_qcow2, magic=((0, MAGIC),), over_uri=True)

__all__ = ["FORMAT", "Header", "LocalContainer", "Qcow2File", "RemoteContainer"]
