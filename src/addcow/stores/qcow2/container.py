"""What a qcow2 file's bytes are read from: its *container*.

Design note
===========

A qcow2 image is a file of bytes (header, tables, clusters) that encodes a
guest disk. :class:`~addcow.stores.qcow2.store.Qcow2File` needs four things of those
bytes, and takes them from a :class:`Container` only:

* ``size``, taken once at open: it bounds every offset the header and the
  tables name, so a truncated file is an error, never zeros;
* ``read_full(view, offset)``, a positional read that fills the caller's
  buffer completely or raises;
* ``file_ids()``, the (device, inode) of a local file for the chain's loop
  check (none for a remote one);
* ``fd`` and ``local``: a local container's descriptor, which the image may
  copy from file to file (``copy_file_range``) and whose reads only wait for
  the page cache; -1 and False for a remote one;
* ``route(offset, length)``: where a run of the file's bytes can be read
  from (:class:`~addcow.stores.base.Route`): FILE for a local container, the
  store's own route for a remote one (REMOTE for an NBD export), so that a
  contiguous run of data clusters is read from there directly.

The two containers:

* :class:`LocalContainer`, an open descriptor: ``preadv`` straight into the
  caller's buffer (:func:`addcow.sysio.pread_full`), the size from ``lseek``;
* :class:`RemoteContainer`, a remote store holding the qcow2 file as bytes
  (:class:`~addcow.stores.remote.nbd.NBDStore`, :class:`~addcow.stores.remote.http.HTTPStore`):
  its ``readinto(buffer, offset)`` and ``size``, pinned by the store. A read
  that would reach past that size is refused here, because a store fills such
  bytes with zeros.
"""

from __future__ import annotations

import os
from typing import Protocol

from ... import sysio
from ...errors import AddCowIOError
from ..base import POOL, BlockSource, Route, file_route


class Container(Protocol):
    """The bytes of a qcow2 file."""

    name: str
    size: int
    fd: int
    local: bool

    def read_full(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``; a short read is an error."""

    def file_ids(self) -> set[tuple[int, int]]:
        """(device, inode) of the local file, or nothing."""

    def route(self, offset: int, length: int) -> Route:
        """Where the file's bytes [offset, offset+length) can be read from."""

    def close(self) -> None: ...


class LocalContainer:
    """A qcow2 file open on this host: ``fd``, read with ``preadv``.

    Closes ``fd`` on :meth:`close` only if ``owned``.
    """

    local = True

    def __init__(self, fd: int, name: str, *, size: int | None = None, owned: bool = True) -> None:
        self.fd = fd
        self.name = name
        self.size = sysio.file_size(fd, name) if size is None else size
        self._owned = owned

    def read_full(self, view: memoryview, offset: int) -> None:
        sysio.pread_full(self.fd, view, offset, self.name)

    def route(self, offset: int, length: int) -> Route:
        return file_route(self.fd, offset)

    def file_ids(self) -> set[tuple[int, int]]:
        st = os.fstat(self.fd)
        return {(st.st_dev, st.st_ino)}

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if self._owned and fd >= 0:
            os.close(fd)


class RemoteContainer:
    """A qcow2 file behind a URI: the bytes of ``store``, which this container owns."""

    local = False
    fd = -1

    def __init__(self, store: BlockSource, name: str) -> None:
        self.name = name
        self.size = store.size
        self._store: BlockSource | None = store

    def read_full(self, view: memoryview, offset: int) -> None:
        store = self._store
        if store is None:
            raise AddCowIOError(f"{self.name}: read at offset {offset}: the store is closed")
        if offset < 0 or offset + len(view) > self.size:
            raise AddCowIOError(
                f"{self.name}: unexpected end of file: {len(view)} bytes at offset {offset} "
                f"run past the file of {self.size} bytes"
            )
        store.readinto(view, offset)

    def route(self, offset: int, length: int) -> Route:
        store = self._store
        return POOL if store is None else store.route(offset, length)

    def file_ids(self) -> set[tuple[int, int]]:
        return set()

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()
