"""``addcow serve``'s NBD server: asyncio around the sans-IO protocol of :mod:`addcow.nbd`.

One module per job, each importing only those above it in this list:

* :mod:`~addcow.serve.qmp`: a client of QEMU's QMP monitor (sans-IO parsing,
  a thin asyncio loop), for the handoff.
* :mod:`~addcow.serve.limits`: the numbers that bound the server (requests
  and payload per connection, inline sizes, held replies, grace periods).
* :mod:`~addcow.serve.tls`: TLS credentials, the client's identity, the
  ``--tls-authz`` allow list.
* :mod:`~addcow.serve.loop_reader`: reads of an NBD store sent from the
  event loop, on a connection of its own.
* :mod:`~addcow.serve.export`: one served image (:class:`~addcow.serve.export.Export`),
  its counters, live state and loop readers, and its block status in NBD's terms.
* :mod:`~addcow.serve.session`: one connection (:class:`~addcow.serve.session.Client`):
  its replies, held and sent together, reply buffers, budget, STARTTLS and close.
* :mod:`~addcow.serve.live`: finishing an image while it is served: copy on
  read, streaming, completion, detach.
* :mod:`~addcow.serve.routing`: how a request is served, by the image's
  route for a read (event loop, the loop's connection to an NBD store, or
  the thread pool, which
  :class:`~addcow.serve.routing.Router` owns), and errors as NBD errors.
* :mod:`~addcow.serve.sockets`: binding and listening, stdin/stdout, stale
  sockets, addresses and URIs.
* :mod:`~addcow.serve.server`: :class:`~addcow.serve.server.NBDServer`, the
  server's life: listening, the export table, connections, signals, shutdown.
* :mod:`~addcow.serve.handoff`: switching the QEMU that uses a complete
  export onto the raw image file, over QMP.
* :mod:`~addcow.serve.control`: the control socket (JSON lines).
* :mod:`~addcow.serve.daemon`: the process around a server: pidfile,
  detaching, socket activation.

The command line (:mod:`addcow.cli.serve`) parses options and puts these
together.
"""
