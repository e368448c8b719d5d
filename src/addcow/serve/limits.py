"""The numbers that bound the NBD server: per connection, per request, at shutdown.

Bounds (per connection)
    At most :data:`MAX_REQUESTS` requests in flight and :data:`MAX_PAYLOAD`
    bytes of read/write payload held by them; the reading task waits for room
    before it reads more, so a client that pipelines without limit, or never
    reads its replies (the writer's ``drain`` then blocks every request task),
    only stalls itself. Memory per connection is at most the budget plus one
    request (the export's maximum block size, 32 MiB) plus one read buffer.

The event loop's fast paths (:mod:`addcow.serve.routing`) are bounded by
:data:`INLINE_READ_MAX`, :data:`INLINE_WRITE_MAX` and :data:`SENDFILE_MIN`;
the holding and batching of replies (:mod:`addcow.serve.session`) by
:data:`MAX_HELD`, :data:`MAX_HELD_BYTES` and :data:`MAX_FREE_BUFFERS`; the
shutdown (:mod:`addcow.serve.server`) by :data:`SHUTDOWN_GRACE` and
:data:`CLOSE_GRACE`.
"""

from __future__ import annotations

MAX_REQUESTS = 64
"""Requests one connection may have in flight."""
MAX_PAYLOAD = 64 << 20
"""Bytes of read/write payload one connection's requests may hold at once."""
READ_SIZE = 256 << 10
"""Bytes received but not yet parsed at which a connection stops reading until its
session asks for more (:mod:`addcow.serve.intake`)."""
MAX_EXTENTS = 1 << 16
"""Most extents examined for one BLOCK_STATUS (the spec lets a reply fall short)."""
SHUTDOWN_GRACE = 10.0
"""Seconds a connection's requests get to finish at shutdown."""
CLOSE_GRACE = 1.0
"""Seconds a closing TLS connection waits for the client's close_notify."""
SHARED_WAIT = 60.0
"""Seconds a client over the ``--shared`` limit waits for a turn before it is closed."""
INLINE_READ_MAX = 1 << 20
"""Reads up to this size run in the event loop instead of the pool (0: never).

They block the loop for one ``pread`` (from the page cache, usually), which costs
far less than handing the request to a thread and back."""


SENDFILE_MIN = 64 << 10
"""Inline reads at least this long, of data in one file, go out with ``sendfile``.

The kernel then hands the page-cache pages to the socket: no copy into a
Python buffer and none out of it. Smaller reads stay with ``preadv``, where the
extra ``lseek`` and the second chunk would cost more than the copy they save."""


INLINE_WRITE_MAX = 256 << 10
"""Writes up to this size may run in the event loop (0: never).

Into allocated clusters that is one ``pwrite``; inside one unallocated cluster
it is its copy on write, when the backing bytes are in the page cache
(:meth:`~addcow.image.AddCowImage.write_nowait`); otherwise the pool does it."""
MAX_FREE_BUFFERS = 16
"""Inline read buffers one connection keeps for reuse (and tracks while lent)."""
MAX_HELD = 64
"""Replies (buffers of them) held back at most before they are sent together."""
MAX_HELD_BYTES = 256 << 10
"""Bytes of replies held back at most before they are sent together."""
SEND_BUFFER = 4 << 20
"""SO_SNDBUF asked for each connection (the kernel caps it at ``wmem_max``)."""
