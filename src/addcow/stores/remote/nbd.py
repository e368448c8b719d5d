"""An NBD export as a read-only backing store (:class:`NBDStore`): the remote golden image.

Design note
===========

URIs. ``nbd://host[:port]/export``, ``nbds://...``, ``nbd+unix:///export?socket=PATH``
and ``nbds+unix:///export?socket=PATH``, as the NBD project's ``doc/uri.md``
defines them: the export name is the path without its leading ``/``,
percent-decoded; the port defaults to 10809; IPv6 literals are bracketed. The
only query parameter accepted is ``socket`` (Unix schemes only). Everything
else, ``tls-certificates=`` and the other TLS parameters included, is refused:
a URI stored in an image is chosen by the image's author, so what to trust
comes from the caller (``tls_certificates``), never from the URI.
:func:`~addcow.stores.remote.uri.parse_nbd` checks a URI without connecting.

TLS (``nbds``). STARTTLS, then the socket is wrapped with a context built
from the caller's directory, laid out as qemu's and libnbd's client
directories: ``ca-cert.pem`` (required; the server's certificate must chain to
it) and ``client-cert.pem`` with ``client-key.pem`` (sent when present). Over
TCP the certificate must name the URI's host. A Unix socket has no host
name; its certificate must name ``localhost``, the host the socket is on,
rather than skip the check, so that a certificate the same CA issued to some
other machine cannot stand in for the local server.

Connections. Blocking sockets shared by the image's threads. A plain
connection carries the requests of up to :data:`PIPELINE_DEPTH` threads at
once: each sends its requests whole, and one of them at a time reads replies
for all, matching them to requests by cookie (:class:`_Link` says how the
reading passes from thread to thread). A long read is several requests sent
together (:data:`READ_REQUEST`, :data:`READ_GROUP`). A TLS connection serves
one thread at a time, since an ``ssl`` socket must not be read and written by
two threads at once. With ``NBD_FLAG_CAN_MULTI_CONN`` ("the server ...
allows ... multiple connections" with a consistent view) the store opens up
to ``connections`` (default :data:`~.common.MAX_CONNECTIONS`) on demand, a
new one while every connection is busy, otherwise exactly one; requests go to the
least busy connection with room, and past that threads queue. A server that
accepts fewer connections than it advertises (the extra one fails or times
out) lowers the pool's limit to what it has. An extra connection waits at most
:data:`EXTRA_GREETING_TIMEOUT` for the server's greeting: a server at its
limit (``qemu-nbd --shared N`` with N clients) leaves it unanswered in its
listen queue, and the request that opened it would otherwise wait the whole
``timeout`` while the connections the pool has sit idle. Reads are split at
the server's maximum block size (at most :data:`MAX_READ`) and widened to its
minimum block size through a bounce buffer when unaligned; replies are checked
by :class:`~addcow.nbd.client.ClientConnection`. Short sequential reads of
each thread are served from a window read ahead (:class:`addcow.stores.remote.common.ReadAhead`).

Failures. A connection that breaks (EOF, a reset, a timeout of ``timeout``
seconds on any socket call) fails every request on it; it is closed and
reopened under the store's :class:`~addcow.stores.remote.common.RetryPolicy` (the one of every
remote store: backoff, until its window, QEMU's reconnect-delay, has passed
since the failure); then the requests, READs or
BLOCK_STATUS and so idempotent, are sent again on the new connection. While
the pool has no connection, one thread reconnects and the others wait for
it, and a request that arrives during the outage gets the outage's window,
not one of its own. When the window runs out the request fails with
:class:`~addcow.errors.RemoteBackingError` and ``errno`` EIO, and so does
every wait when the process stops (:func:`~.common.interrupt_waits`: ``addcow serve``
shutting down, Ctrl-C of ``addcow stream``), rather than outlive the window.
A reconnected export must have the size pinned at open (else
:class:`~addcow.errors.RemoteChangedError`). The first connection, made by
:meth:`NBDStore.open`, is not retried: a wrong URI fails at once. An error
reply from the server (EIO, say) is not retried either; it raises
:class:`~addcow.errors.RemoteReadError` with the server's errno once
every reply of its group has come (they land in the caller's buffer), and
the connection, still in step, stays in the pool. A reply that breaks the
protocol raises :class:`~addcow.errors.RemoteReplyError` in every request on
its connection, which is dropped; a failing connection returns to its
callers only once no thread is receiving into their buffers. Refusals
during a reconnect (no such export, a certificate that does not verify) are
final as well. A failed request raises and names its range; bytes of its
reply already in the caller's buffer (data chunks before an error chunk) are
not valid, and :meth:`~addcow.image.AddCowImage.populate`, which sets bits
only for what it wrote after a read returned, marks none of that range.

Block status. With ``base:allocation`` an extent is ``zero`` when the server
sets NBD_STATE_ZERO; NBD_STATE_HOLE alone (unallocated, contents unknown) is
data. A server without it (no structured replies, or the context refused)
has every byte reported as data. Ranges past the export's end are not
present and read as zero, as for :class:`~addcow.stores.RawFile`.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from typing import cast

from ...errors import RemoteBackingError, RemoteChangedError, RemoteReadError, RemoteReplyError
from ...nbd import wire
from ...nbd.client import ClientConnection, Event, Ready, RequestFailed, StartTLS, StatusDone
from ...sysio import fill_zero
from ..base import INLINE, POOL, Extent, Route, remote_route
from .common import (
    MAX_CONNECTIONS,
    TIMEOUT,
    TLS_CERTIFICATES_ENV,
    ReadAhead,
    RetryPolicy,
    stop_event,
)
from .uri import NBDURI, BackingURI, Identity, parse_nbd

# Threads with requests in flight on one plain connection. A TLS connection
# serves one at a time: an ssl socket must not be read and written by two
# threads at once.
PIPELINE_DEPTH = 16
# Replies are read through a buffer of this size (small replies cost one receive).
READ_BUFFER = 1 << 16
# proto.md: "a client desiring maximum interoperability SHOULD ... limit
# NBD_CMD_READ ... to a maximum block size of 2^25".
MAX_READ = wire.DEFAULT_MAX_BLOCK
# A long read goes out as requests of this size (or the server's maximum), up to
# READ_GROUP of them at once, so the server reads the next while it sends one.
READ_REQUEST = 1 << 20
READ_GROUP = 8
# The longest range one BLOCK_STATUS asks about; the loop asks again for the rest.
MAX_STATUS_REQUEST = 1 << 30
# A live server greets at once; one at its connection limit never does.
EXTRA_GREETING_TIMEOUT = 2.0


class _Broken(Exception):
    """A connection failed in a way a reconnect may cure (EOF, reset, timeout)."""


def open_uri(uri: str, ref: BackingURI | None, retry: RetryPolicy) -> tuple[NBDStore, Identity]:
    """The NBD export ``uri`` names (its size is checked against ``ref`` by the caller);
    an export has no identity beyond its size."""
    store = NBDStore.open(uri, tls_certificates=os.environ.get(TLS_CERTIFICATES_ENV), retry=retry)
    return store, Identity()


def tls_context(directory: str) -> ssl.SSLContext:
    """A client context from a qemu/libnbd style directory (ca-cert.pem, client-*.pem)."""
    ca = os.path.join(directory, "ca-cert.pem")
    cert = os.path.join(directory, "client-cert.pem")
    key = os.path.join(directory, "client-key.pem")
    if not os.path.isfile(ca):
        raise RemoteBackingError(f"TLS certificate directory {directory}: expected "
                                 f"ca-cert.pem, found none")  # fmt: skip
    if os.path.exists(cert) != os.path.exists(key):
        raise RemoteBackingError(
            f"TLS certificate directory {directory}: expected "
            "client-cert.pem and client-key.pem together, found one"
        )
    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if os.path.exists(cert):
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteBackingError(f"TLS certificate directory {directory}: expected usable "
                                 f"PEM files, found {exc}") from None  # fmt: skip
    return context


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise _Broken(f"the server closed the connection ({got} of {size} bytes received)")
        got += n
    return bytes(buffer)


def _read_into(rfile: io.BufferedReader, view: memoryview) -> None:
    got = rfile.readinto(view)
    if got != len(view):
        raise _Broken(f"the server closed the connection ({got or 0} of {len(view)} bytes "
                      "received)")  # fmt: skip


def _read_exact(rfile: io.BufferedReader, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise _Broken(f"the server closed the connection ({len(data)} of {size} bytes "
                      "received)")  # fmt: skip
    return data


def _is_final_tls_error(exc: OSError) -> bool:
    """A TLS failure no reconnect cures (not the peer vanishing mid-session)."""
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
    )


def _failure(exc: OSError) -> Exception:
    """What a socket error on a connection means: final for TLS, else a reconnect."""
    if _is_final_tls_error(exc):
        return RemoteBackingError(f"NBD TLS session failed: {exc}")
    return _Broken(str(exc) or type(exc).__name__)


_local = threading.local()


def _thread_event() -> threading.Event:
    """This thread's wake-up event (a thread waits for one reply at a time)."""
    event: threading.Event | None = getattr(_local, "event", None)
    if event is None:
        event = _local.event = threading.Event()
    event.clear()
    return event


class _Link:
    """One connection: its socket, protocol state and the requests in flight on it.

    Up to ``depth`` threads may each have a request on it. A request's bytes go
    out whole under ``_send_lock``. One thread at a time reads replies: a caller
    whose reply has not come becomes the reader when there is none, reads
    replies (its own and others') until its own is complete, wakes the callers
    whose replies it read, and hands the role to one still waiting. The protocol
    state is touched only under ``_lock``; the reader receives without it, into
    the buffer the state names, so others can send meanwhile. A failure is
    recorded once and every caller on the link sees it.
    """

    def __init__(self, sock: socket.socket, conn: ClientConnection, ready: Ready) -> None:
        self.sock = sock
        self.conn = conn
        self.ready = ready
        self.depth = 1
        # Kept by the store under its pool lock: callers holding a place, and
        # whether the link has left the pool.
        self.inflight = 0
        self.dropped = False
        self._rfile: io.BufferedReader | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._done: dict[int, Event] = {}
        self._waiting: dict[int, threading.Event] = {}
        self._reading = False
        self._reader_gone = threading.Condition(self._lock)
        self._failure: BaseException | None = None

    def start(self, depth: int) -> None:
        """Negotiation is over: replies are read through a buffer from now on."""
        self.depth = depth
        self._rfile = cast(io.BufferedReader, self.sock.makefile("rb", buffering=READ_BUFFER))

    def call(self, makes: Sequence[Callable[[_Link], int | None]]) -> list[Event] | None:
        """Queue the requests ``makes`` build (None if the first builds none), send
        them together, and wait for every reply, even after one failed: the
        replies land in the caller's buffers."""
        wake = _thread_event()
        cookies: list[int] = []
        with self._lock:
            self._raise_failure()
            try:
                for make in makes:
                    cookie = make(self)
                    if cookie is None:
                        return None
                    cookies.append(cookie)
                    self._waiting[cookie] = wake
            except BaseException:
                for cookie in cookies:
                    del self._waiting[cookie]
                if cookies:  # queued and never sent: the connection is out of step
                    self._failure = _Broken("a request could not be built")
                raise
            out = self.conn.data_to_send()
        try:
            try:
                with self._send_lock:
                    self.sock.sendall(out)
            except OSError as exc:
                self._fail(_failure(exc))
            return [self._await(cookie, wake) for cookie in cookies]
        except BaseException as exc:
            # A reply may still land in this caller's buffer: nobody else may use the link.
            seen = exc
            if not isinstance(exc, _Broken | RemoteBackingError):
                seen = _Broken(f"a request was interrupted ({type(exc).__name__})")
            self._fail(seen)
            raise
        finally:
            with self._lock:
                for cookie in cookies:
                    self._waiting.pop(cookie, None)

    def _await(self, cookie: int, wake: threading.Event) -> Event:
        while True:
            with self._lock:
                event = self._done.pop(cookie, None)
                if event is not None:
                    del self._waiting[cookie]
                    return event
                self._raise_failure()
                lead = not self._reading
                if lead:
                    self._reading = True
            if lead:
                self._read_until(cookie)
            else:
                wake.wait()
                wake.clear()

    def _read_until(self, cookie: int) -> None:
        """As the reader: read replies until the one to ``cookie`` is complete."""
        rfile = self._rfile
        assert rfile is not None
        try:
            while True:
                with self._lock:
                    need = self.conn.need
                if need.into is not None:
                    _read_into(rfile, need.into)
                    data = None
                else:
                    data = _read_exact(rfile, need.size)
                with self._lock:
                    self.conn.feed(data)
                    mine = False
                    for event in self.conn.events():
                        other = getattr(event, "cookie", None)
                        assert isinstance(other, int)
                        self._done[other] = event
                        if other == cookie:
                            mine = True
                        elif other in self._waiting:
                            self._waiting[other].set()
                    if mine:
                        self._reading = False
                        for other, wake in self._waiting.items():
                            if other not in self._done:
                                wake.set()  # the next reader
                                break
                        return
        except OSError as exc:
            self._stop_reading()
            raise _failure(exc) from None
        except BaseException:
            self._stop_reading()
            raise

    def _stop_reading(self) -> None:
        with self._lock:
            self._reading = False
            self._reader_gone.notify_all()

    def _fail(self, exc: BaseException) -> None:
        """Record the link's first failure, wake every caller on it, and return once
        no reader is receiving: no more bytes land in any caller's buffer."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
            for wake in self._waiting.values():
                wake.set()
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            while self._reading:
                self._reader_gone.wait()

    def _raise_failure(self) -> None:
        failure = self._failure
        if isinstance(failure, RemoteBackingError):
            raise type(failure)(str(failure), failure.errno)
        if failure is not None:
            raise _Broken(str(failure))

    def close(self, polite: bool = False) -> None:
        if polite and self._failure is None:
            self.conn.disconnect()
            with suppress(OSError):
                self.sock.sendall(self.conn.data_to_send())
        with suppress(OSError):
            if self._rfile is not None:
                self._rfile.close()
            self.sock.close()


def failed_request(uri: str, what: str, event: RequestFailed) -> RemoteReadError:
    """The error for a request the server answered with an error (``what`` names it)."""
    name = errno.errorcode.get(event.errno, str(event.errno))
    detail = f": {event.message}" if event.message else ""
    return RemoteReadError(f"{uri}: the server failed {what} with {name}{detail}", event.errno)


def _load(link: _Link) -> int:
    return link.inflight


def _read_request(offset: int, target: memoryview) -> Callable[[_Link], int | None]:
    """READ of ``target``'s length at ``offset`` into it."""
    return lambda link: link.conn.read(offset, target)


def _status_request(offset: int, length: int) -> Callable[[_Link], int | None]:
    """BLOCK_STATUS on a link that has base:allocation; None on one without."""

    def make(link: _Link) -> int | None:
        if not link.ready.block_status:
            return None
        return link.conn.block_status(offset, length)

    return make


class NBDStore:
    """A read-only NBD export as a :class:`~addcow.stores.BlockSource`, shared by threads.

    ``size`` is the export's size, pinned at open; ``connections_open`` counts the
    connections the pool holds now.
    """

    def __init__(
        self,
        target: NBDURI,
        *,
        context: ssl.SSLContext | None,
        retry: RetryPolicy,
        connections: int | None,
        timeout: float,
    ) -> None:
        self.target = target
        self.uri = target.uri
        self._context = context
        self.retry = retry
        self.timeout = timeout
        self._wanted = connections or MAX_CONNECTIONS
        self._cond = threading.Condition()
        self._links: list[_Link] = []
        # When the pool lost its last connection, until it has one again.
        self._outage: float | None = None
        self.connections_open = 0
        self._limit = 1
        self._closed = False
        self._interrupted = stop_event()
        self.size = -1
        first = self._connect()
        self.size = first.ready.size
        self._min = first.ready.min_block
        self._max = max(self._min, min(first.ready.max_block, MAX_READ) // self._min * self._min)
        self._request = max(self._min, min(self._max, READ_REQUEST) // self._min * self._min)
        if first.ready.flags & wire.FLAG_CAN_MULTI_CONN:
            self._limit = self._wanted
        self.multi_conn = bool(first.ready.flags & wire.FLAG_CAN_MULTI_CONN)
        self.structured = first.ready.structured
        self.connections_open = 1
        self._links.append(first)
        self._readahead = ReadAhead(self._read_all, self.size)

    @classmethod
    def open(cls, uri: str, *, tls_certificates: str | None = None,
             retry: RetryPolicy | None = None, connections: int | None = None,
             timeout: float = TIMEOUT) -> NBDStore:  # fmt: skip
        """Connect to the export ``uri`` names; TLS credentials come from the caller.
        ``retry`` (default: :class:`~.common.RetryPolicy`'s) says how long a lost
        connection is reopened."""
        target = parse_nbd(uri)
        if connections is not None and connections < 1:
            raise RemoteBackingError(f"NBD connections: expected 1 or more, found {connections}")
        if timeout <= 0:
            raise RemoteBackingError(f"NBD timeout: expected more than 0 s, found {timeout}")
        context = None
        if target.tls:
            if tls_certificates is None:
                raise RemoteBackingError(
                    f"NBD URI {uri!r}: expected a TLS certificate directory "
                    "(tls_certificates) for an nbds scheme, found none"
                )
            context = tls_context(tls_certificates)
        try:
            return cls(target, context=context, retry=retry or RetryPolicy(),
                       connections=connections, timeout=timeout)  # fmt: skip
        except _Broken as exc:
            raise RemoteBackingError(f"{uri}: cannot connect: {exc}", errno.EIO) from None

    # -- connecting ----------------------------------------------------------------------

    def _socket(self, timeout: float) -> socket.socket:
        target = self.target
        if target.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(target.socket)
            except BaseException:
                sock.close()
                raise
            return sock
        assert target.host is not None and target.port is not None
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self, greeting_timeout: float | None = None, *, start: bool = True) -> _Link:
        """Open and negotiate one connection; _Broken if the server is not there (or
        sends no greeting within ``greeting_timeout``). Without ``start`` nothing
        has been read past the negotiation (the socket can change hands)."""
        target = self.target
        first_wait = min(self.timeout, greeting_timeout or self.timeout)
        try:
            sock = self._socket(first_wait)
        except OSError as exc:
            raise _Broken(f"{exc.strerror or exc}") from None
        link = _Link(sock, ClientConnection(target.export, tls=target.tls),
                     Ready(0, 0, 1, 1, 1, False, False))  # fmt: skip
        conn = link.conn
        try:
            while conn.ready is None:
                out = conn.data_to_send()
                if out:
                    link.sock.sendall(out)
                for event in conn.events():
                    if isinstance(event, StartTLS):
                        link.sock = self._wrap(link.sock)
                need = conn.need
                if need.size == 0:
                    conn.feed(b"")
                else:
                    conn.feed(_recv_exact(link.sock, need.size))
                    link.sock.settimeout(self.timeout)  # the server answered: full waits
            link.ready = conn.ready
            conn.events()  # the Ready event, kept above
            if start:
                link.start(1 if target.tls else PIPELINE_DEPTH)
        except OSError as exc:
            link.close()
            if _is_final_tls_error(exc):
                raise RemoteBackingError(f"{self.uri}: TLS session failed: {exc}") from None
            raise _Broken(f"{exc.strerror or exc}") from None
        except BaseException:
            link.close()
            raise
        if self.size >= 0:
            self._check_same(link)
        return link

    def _wrap(self, sock: socket.socket) -> socket.socket:
        assert self._context is not None
        name = self.target.host if self.target.host is not None else "localhost"
        try:
            return self._context.wrap_socket(sock, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise RemoteBackingError(
                f"{self.uri}: expected a server certificate for {name!r} signed by the CA in "
                f"the TLS certificate directory, found: {exc.verify_message}"
            ) from None
        except OSError as exc:
            if _is_final_tls_error(exc):
                raise RemoteBackingError(f"{self.uri}: TLS handshake failed: {exc}") from None
            raise

    def _check_same(self, link: _Link) -> None:
        ready = link.ready
        if ready.size != self.size:
            link.close()
            raise RemoteChangedError(
                f"{self.uri}: the golden image changed since the store was opened: "
                f"expected an export of {self.size} bytes, found {ready.size}"
            )
        if self._min % ready.min_block or ready.max_block < self._max:
            link.close()
            raise RemoteChangedError(
                f"{self.uri}: expected block size limits {self._min}..{self._max} after "
                f"reconnecting, found {ready.min_block}..{ready.max_block}"
            )

    def _reconnect(self, failed_at: float, cause: str, *, try_once: bool = False) -> _Link:
        """Reopen a connection until the retry window has passed since ``failed_at``
        (with ``try_once``, at least one attempt even when it already has)."""
        attempt = 0
        wait = self.retry.pause(attempt, failed_at)
        while True:
            if self._closed:
                raise RemoteBackingError(f"{self.uri}: the store was closed", errno.EIO)
            if wait is None and not try_once:
                raise RemoteBackingError(
                    f"{self.uri}: connection lost ({cause}); {self.retry.gave_up()}, "
                    "found it still unreachable",
                    errno.EIO,
                )
            if self._interrupted.is_set():
                raise RemoteBackingError(
                    f"{self.uri}: connection lost ({cause}); stopped waiting for the server: "
                    "addcow is stopping",
                    errno.EIO,
                )
            try_once = False
            try:
                return self._connect()
            except _Broken as exc:
                cause = str(exc)
            wait = self.retry.pause(attempt, failed_at)
            attempt += 1
            if wait is not None:
                self._interrupted.wait(wait)

    def loop_connection(self) -> tuple[socket.socket, ClientConnection] | None:
        """A new negotiated connection outside the pool, for a caller that does its
        own I/O (:mod:`addcow.serve.loop_reader`); None where there must be no extra
        one: TLS (an ``ssl`` socket cannot change hands), or a server that does
        not advertise multi-conn (it may take one client at a time). Blocks while
        it connects; RemoteBackingError if it cannot, RemoteChangedError if the
        export is not the one pinned at open."""
        if self._context is not None or not self.multi_conn or self._closed:
            return None
        try:
            link = self._connect(EXTRA_GREETING_TIMEOUT, start=False)
        except _Broken as exc:
            raise RemoteBackingError(f"{self.uri}: cannot connect: {exc}", errno.EIO) from None
        link.sock.settimeout(None)
        return link.sock, link.conn

    def loop_reads(self, offset: int, length: int) -> bool:
        """Whether a READ of exactly this range may be sent as it is: aligned to
        the minimum block size, at most one request long, inside the export."""
        return (
            0 < length <= self._request
            and offset >= 0
            and offset + length <= self.size
            and not (offset | length) % self._min
        )

    # -- the pool ------------------------------------------------------------------------

    def _acquire(self, failed_at: float | None = None, cause: str = "no connection") -> _Link:
        """A place on a link: an idle one; else a new connection while the pool may
        grow; else the least busy link with room; else wait. With no link at all,
        one thread connects (waiting for the server as :meth:`_reconnect` does,
        from ``failed_at``, or from when the last connection was lost) and the
        others wait for it."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        raise RemoteBackingError(f"{self.uri}: the store was closed")
                    best = min(self._links, key=_load, default=None)
                    if best is not None and best.inflight == 0:
                        break
                    opening = self.connections_open > len(self._links)
                    if self.connections_open < self._limit and (self._links or not opening):
                        self.connections_open += 1
                        extra = bool(self._links)
                        outage = self._outage
                        best = None
                        break
                    if best is not None and best.inflight < best.depth:
                        break
                    self._cond.wait()
                if best is not None:
                    best.inflight += 1
                    return best
            try:
                if extra:
                    link = self._connect(greeting_timeout=EXTRA_GREETING_TIMEOUT)
                elif failed_at is not None:
                    link = self._reconnect(failed_at, cause)
                else:
                    # A request that has not failed yet tries at least once, within
                    # the delay of the outage it arrives in.
                    since = time.monotonic() if outage is None else outage
                    link = self._reconnect(since, cause, try_once=True)
            except _Broken:
                # The server takes fewer connections than it advertised: use those.
                with self._cond:
                    self.connections_open -= 1
                    self._limit = max(1, self.connections_open)
                    self._cond.notify_all()
                continue
            except BaseException:
                self._forget()
                raise
            with self._cond:
                link.inflight = 1
                self._links.append(link)
                self._outage = None
                self._cond.notify_all()  # its other places are free
            return link

    def _release(self, link: _Link) -> None:
        with self._cond:
            link.inflight -= 1
            last = link.inflight == 0 and (link.dropped or self._closed)
            if last and not link.dropped:
                self._drop_locked(link)
            self._cond.notify()
        if last:
            link.close(polite=self._closed)

    def _drop(self, link: _Link) -> None:
        """Take a failed link out of the pool; it closes when its last caller leaves."""
        with self._cond:
            if not link.dropped:
                self._drop_locked(link)
                if not self._links and self._outage is None:
                    self._outage = time.monotonic()
            self._cond.notify_all()

    def _drop_locked(self, link: _Link) -> None:
        link.dropped = True
        self._links.remove(link)
        self.connections_open -= 1

    def _forget(self) -> None:
        with self._cond:
            self.connections_open -= 1
            self._cond.notify_all()

    def _call(self, makes: Sequence[Callable[[_Link], int | None]],
              names: Sequence[str]) -> list[Event] | None:  # fmt: skip
        """Run requests together (``names`` name them in errors) on a pooled
        connection, reconnecting and sending them again as needed."""
        link: _Link | None = self._acquire()
        failed_at: float | None = None
        try:
            while True:
                assert link is not None
                try:
                    events = link.call(makes)
                except _Broken as exc:
                    self._drop(link)
                    self._release(link)
                    link = None
                    if failed_at is None:
                        failed_at = time.monotonic()
                    link = self._acquire(failed_at, str(exc))
                    continue
                except BaseException:
                    # Out of step with the server (a protocol breach, an interrupt).
                    self._drop(link)
                    raise
                for event, what in zip(events or (), names, strict=False):
                    if isinstance(event, RequestFailed):
                        raise failed_request(self.uri, what, event)
                return events
        finally:
            if link is not None:
                self._release(link)

    # -- BlockSource ---------------------------------------------------------------------

    def identity(self) -> int:
        """What pins this golden image: the export's size."""
        return self.size

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        start = offset // self._min * self._min
        end = min(-(-(offset + length) // self._min) * self._min, self.size)
        return start, end

    def _read_group(self, view: memoryview, offset: int) -> None:
        """Read ``view`` as requests of at most ``_request`` bytes sent together,
        each aligned to the minimum block size (the first and last through a
        bounce buffer when the range is not)."""
        pieces: list[tuple[int, memoryview, memoryview, int]] = []
        pos = 0
        while pos < len(view):
            at = offset + pos
            n = min(len(view) - pos, self._request - at % self._request)
            part = view[pos : pos + n]
            start, end = self._aligned(at, n)
            exact = start == at and end == at + n
            pieces.append((start, part if exact else memoryview(bytearray(end - start)), part, at))
            pos += n
        self._call([_read_request(start, target) for start, target, _, _ in pieces],
                   [f"the read of bytes {start}-{start + len(target) - 1}"
                    for start, target, _, _ in pieces])  # fmt: skip
        for start, target, part, at in pieces:
            if target is not part:
                part[:] = target[at - start : at - start + len(part)]

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; zeros past the export's end."""
        view = buffer.cast("B") if buffer.format != "B" else buffer
        inside = max(0, min(len(view), self.size - offset))
        if inside:
            self._readahead.read(view[:inside], offset)
        if inside < len(view):
            fill_zero(view[inside:])
        return len(view)

    def _read_all(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from inside the export, a group of requests at a time."""
        group = self._request * READ_GROUP
        pos = 0
        while pos < len(view):
            n = min(len(view) - pos, group - (offset + pos) % self._request)
            self._read_group(view[pos : pos + n], offset + pos)
            pos += n

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Extents of [offset, offset+length) from base:allocation (all data without it)."""
        end = offset + length
        inside = min(end, self.size)
        pos = offset
        while pos < inside:
            start, stop = self._aligned(pos, min(inside - pos, MAX_STATUS_REQUEST))
            events = self._call([_status_request(start, stop - start)],
                                [f"BLOCK_STATUS of bytes {start}-{stop - 1}"])  # fmt: skip
            if events is None:
                yield Extent(pos, inside - pos, depth, True, False, None)
                break
            event = events[0]
            assert isinstance(event, StatusDone)
            reached = pos
            for e_off, e_len, flags in event.extents():
                lo, hi = max(e_off, pos), min(e_off + e_len, inside)
                if lo < hi:
                    yield Extent(lo, hi - lo, depth, True, bool(flags & wire.STATE_ZERO), None)
                    reached = hi
            if reached <= pos:
                raise RemoteReplyError(
                    f"{self.uri}: BLOCK_STATUS at {start}: expected extents reaching past "
                    f"{pos}, found none")  # fmt: skip
            pos = reached
        if end > inside:
            lo = max(offset, inside)
            yield Extent(lo, end - lo, depth, False, True, None)

    def file_ids(self) -> set[tuple[int, int]]:
        """None: the store reads no local file."""
        return set()

    def route(self, offset: int, length: int) -> Route:
        """REMOTE (this store, same offset) inside the export: an event loop may
        send the read on a connection of its own; INLINE past the end (zeros),
        POOL for a range across the end."""
        if offset >= self.size:
            return INLINE
        if offset + length > self.size:
            return POOL
        return remote_route(self, offset)

    def close(self) -> None:
        """Send NBD_CMD_DISC on every idle connection and close them; busy ones close
        when their request ends."""
        with self._cond:
            self._closed = True
            idle = [link for link in self._links if link.inflight == 0]
            for link in idle:
                self._drop_locked(link)
            self._cond.notify_all()
        for link in idle:
            link.close(polite=True)

    def __enter__(self) -> NBDStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
