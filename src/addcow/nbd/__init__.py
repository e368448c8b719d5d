"""The NBD protocol without sockets: bytes in, events out, replies as bytes (as h11 does).

Nothing in this package opens, reads or writes a socket; its users do.

Server side
    :mod:`addcow.nbd.connection`
        :class:`~addcow.nbd.connection.ServerConnection`, the object a server
        holds for each connection: it buffers the peer's bytes, keeps the
        state and composes the two phases below.
    :mod:`addcow.nbd.negotiation`
        The handshake: client flags and options, answered from the export table.
    :mod:`addcow.nbd.transmission`
        Requests parsed and checked; replies built.
    :mod:`addcow.nbd.events`
        The exports the connection is given, the events it reports and the
        errors it raises.
    :mod:`addcow.nbd.state`
        The states and the table of transitions between them.

Both sides
    :mod:`addcow.nbd.wire`
        The wire layout: magics, numbers, limits, one struct per record.

Client side
    :mod:`addcow.nbd.client`
        :class:`~addcow.nbd.client.ClientConnection`, the client's protocol alone.

The asyncio server around :class:`~addcow.nbd.connection.ServerConnection` is
the :mod:`addcow.serve` package: :mod:`addcow.serve.server` owns the sockets
and connections, :mod:`addcow.serve.export` the served images,
:mod:`addcow.serve.routing` the thread pool and where each request runs. A
golden image on an NBD server used as a backing store is
:mod:`addcow.stores.remote.nbd` (blocking sockets shared by threads), and
:mod:`addcow.serve.loop_reader` reads such a store from the server's own event
loop; both drive :mod:`addcow.nbd.client`.
"""

from __future__ import annotations
