"""Backing stores: what an image reads its unallocated clusters from.

A store is anything with a size that can fill a buffer and describe its
allocation (:class:`~addcow.stores.base.BlockSource`). The package:

* :mod:`.base`: what a store is (``BlockSource``, ``Extent``) and what a
  format registers (``StoreFormat``);
* :mod:`.registry`: the table of formats by name, filled by the packages
  that implement them (this one registers raw and qcow2, :mod:`addcow.image`
  registers add-cow);
* :mod:`.chain`: names relative to the file that records them, and the guard
  over a whole chain (depth, loops, ``--backing-root``);
* :mod:`.magic`: image magics, looked at to refuse a format, never to choose one;
* :mod:`.raw`, :mod:`.qcow2`: local files;
* :mod:`.remote`: golden images behind a URI (NBD, HTTP).

:func:`open_backing` opens every layer of a chain, so the qcow2 and add-cow
stores open their own backings through it, under one guard: one depth limit,
one loop check and one path policy for the whole chain.

A new format is a module (or package) whose class implements ``BlockSource``
and whose ``FORMAT`` describes it, registered below; a new URI scheme is a
store in :mod:`.remote`, registered in its table of schemes.
"""

from __future__ import annotations

from . import qcow2, raw, registry
from .base import BlockSource, Extent, StoreFormat, read_as_backing
from .chain import ChainGuard, resolve_name
from .remote import BackingURI, open_remote

__all__ = [
    "BlockSource",
    "ChainGuard",
    "Extent",
    "StoreFormat",
    "open_backing",
    "open_store",
    "read_as_backing",
]

registry.register(raw.FORMAT)
registry.register(qcow2.FORMAT)


def open_store(path: str, fmt: str, *, guard: ChainGuard, force_share: bool) -> BlockSource:
    """Open the file at ``path`` as a read-only store of format ``fmt``.

    ``guard.depth`` 0 means the user named the file (``convert -f qcow2 x``);
    the guard's root then applies to the files it names, not to it.
    """
    entry = registry.get(fmt, path)

    def below(child: bytes, child_fmt: str) -> BlockSource:
        return open_backing(child, child_fmt, path, guard=guard, force_share=force_share)

    return entry.open(path, guard=guard, force_share=force_share, open_backing=below)


def open_backing(
    name: bytes,
    fmt: str,
    relative_to: str,
    *,
    guard: ChainGuard,
    force_share: bool,
    uri: bool = False,
) -> BlockSource:
    """Open the backing file ``name``, stored in the file at ``relative_to``, as ``fmt``.

    With ``uri`` (the header's BACKING_URI bit) ``name`` is a URI record,
    opened by :func:`addcow.stores.remote.open_remote`.
    """
    if uri:
        return open_remote(BackingURI.decode(name), fmt, guard=guard)
    path = resolve_name(name, relative_to)
    guard.descend(path)
    return open_store(path, fmt, guard=guard, force_share=force_share)
