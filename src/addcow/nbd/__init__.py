"""The NBD server behind ``addcow serve``.

:mod:`addcow.nbd.protocol` is the protocol alone: bytes in, events out,
replies as bytes, no sockets (in the manner of h11). Its wire layout (magics,
numbers, limits, one struct per record) is :mod:`addcow.nbd.wire`, and its
states with the table of transitions between them :mod:`addcow.nbd.state`.
:mod:`addcow.nbd.server` is the asyncio loop around it that owns sockets,
images and threads; :mod:`addcow.nbd.live` finishes images while they are
served, through the narrow :class:`~addcow.nbd.live.LivePool` interface.
"""

from __future__ import annotations
