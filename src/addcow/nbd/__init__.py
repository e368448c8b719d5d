"""The NBD server behind ``addcow serve``.

:mod:`addcow.nbd.protocol` is the protocol alone: bytes in, events out,
replies as bytes, no sockets (in the manner of h11). Its wire layout (magics,
numbers, limits, one struct per record) is :mod:`addcow.nbd.wire`, and its
states with the table of transitions between them :mod:`addcow.nbd.state`.
:mod:`addcow.serve.server` is the asyncio loop around it that owns sockets,
images and threads; :mod:`addcow.serve.live` finishes images while they are
served, through the narrow :class:`~addcow.serve.live.LivePool` interface.

The client side shares the wire layout: :mod:`addcow.nbd.client` is the
protocol alone, :mod:`addcow.stores.remote.nbd` a golden image on an NBD server as a
backing store (blocking sockets shared by threads), and
:mod:`addcow.serve.loop_reader` the server's reads of such a store from its own
event loop.
"""

from __future__ import annotations
