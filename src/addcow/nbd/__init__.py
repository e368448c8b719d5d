"""The NBD server behind ``addcow serve``.

:mod:`addcow.nbd.protocol` is the protocol alone: bytes in, events out,
replies as bytes, no sockets (in the manner of h11). :mod:`addcow.nbd.server`
is the asyncio loop around it that owns sockets, images and threads.
"""

from __future__ import annotations
