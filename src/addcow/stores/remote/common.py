"""What the remote stores share: how they retry, read ahead, stop waiting, and how many
connections and how long a wait they allow.

Retrying (:class:`RetryPolicy`)
    One policy for every remote store: a request that fails in a way another
    attempt may cure (a lost NBD connection, a refused or broken HTTP
    connection, a timeout, HTTP ``429`` or ``5xx``) is tried again with
    backoff until the policy's window has passed since it first failed, so a
    golden server restarted within the window never reaches the guest, whatever
    its protocol. The window is :data:`RETRY_WINDOW` seconds unless
    :data:`RECONNECT_DELAY_ENV` sets it; :func:`interrupt_waits` ends every wait
    at once when the process stops.

Readahead (:class:`ReadAhead`)
    A read shorter than :data:`READAHEAD` that starts where a recent read ended, or
    before that end and runs past it (a qcow2 golden image's compressed clusters:
    each is read to the end of its last 512-byte sector, where the next one starts),
    or that runs on past a window, fetches :data:`READAHEAD` bytes instead (any
    other read: the store's least request, if it has one), kept as
    the window of the thread that fetched it; later reads inside any window are
    served from memory. There is a window per thread because the readers of a stream
    each walk their own span (a qcow2 golden image's compressed clusters, one short
    read each): one window for all would be replaced at every read and help none of
    them. Reads are matched against every window and every recent end, not only
    their own thread's, because the server's pool hands one client's sequential
    reads to whichever thread is free. A window holds bytes of the pinned golden
    image, so it never goes stale. Memory stays bounded: at most :data:`MAX_WINDOWS`
    windows and four times as many read ends (the least recently used go), plus one
    window being fetched per reading thread. A window the server answers with an
    error for some of its range (:class:`~addcow.errors.RemoteReadError`) is dropped
    and the read asked for alone, so an error reaches only the reads that touch it.

Connections (:data:`MAX_CONNECTIONS`, :data:`TIMEOUT`)
    Each store keeps at most :data:`MAX_CONNECTIONS` connections to its server
    and waits at most :data:`TIMEOUT` seconds for any one reply.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping

from ...errors import RemoteBackingError, RemoteReadError

TLS_CERTIFICATES_ENV = "ADDCOW_TLS_CERTIFICATES"
"""The directory of the client's TLS credentials for ``nbds://`` backings."""
RECONNECT_DELAY_ENV = "ADDCOW_RECONNECT_DELAY"
"""The retry window of every remote store, in seconds (:class:`RetryPolicy`)."""
RETRY_WINDOW = 30.0
"""The default retry window: a golden server's restart must not reach the guest.
(QEMU's default reconnect-delay is 0; outliving a restart is the point here.)"""
MAX_RETRY_WINDOW = 3600.0

MAX_CONNECTIONS = 4
"""Connections a store keeps open to its server at most."""
TIMEOUT = 30.0
"""Seconds a store waits for a connection, a reply or a piece of one."""

_stop_events: weakref.WeakSet[threading.Event] = weakref.WeakSet()
_stop_events_lock = threading.Lock()


def stop_event() -> threading.Event:
    """An event for one store to wait on between attempts; :func:`interrupt_waits`
    sets it."""
    event = threading.Event()
    with _stop_events_lock:
        _stop_events.add(event)
    return event


def interrupt_waits() -> None:
    """End the waits of every remote store open in this process (an NBD store's for its
    server to come back, an HTTP store's between retries), now and for the rest of
    their lives: the process is stopping. Their requests fail at once with EIO."""
    with _stop_events_lock:
        events = list(_stop_events)
    for event in events:
        event.set()


class RetryPolicy:
    """How every remote store rides out a failing server: it tries again for ``window``
    seconds after a request first failed (NBD: since the connection was lost), waiting
    ``first`` seconds, then twice as long each time up to ``most``, each wait drawn
    from its upper half so that the clients of one restarted server do not return in
    step. A server's own ``Retry-After`` is honoured up to what is left of the window.
    Waits end at once when the process stops (:func:`interrupt_waits`)."""

    __slots__ = ("first", "most", "window")

    def __init__(self, window: float = RETRY_WINDOW, first: float = 0.1, most: float = 2.0) -> None:
        self.window, self.first, self.most = window, first, most
        if not 0 <= self.window <= MAX_RETRY_WINDOW or not 0 < self.first <= self.most:
            raise RemoteBackingError(
                f"retry policy: expected a window of 0 to {MAX_RETRY_WINDOW:g} s and waits "
                f"0 < first <= most, found {self.window}, {self.first}, {self.most}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RetryPolicy:
        """The policy with the window :data:`RECONNECT_DELAY_ENV` sets (else the default)."""
        text = environ.get(RECONNECT_DELAY_ENV)
        if text is None:
            return cls()
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= MAX_RETRY_WINDOW:
            raise RemoteBackingError(
                f"{RECONNECT_DELAY_ENV}: expected seconds between 0 and "
                f"{MAX_RETRY_WINDOW:g}, found {text!r}"
            )
        return cls(window=value)

    def pause(self, attempt: int, since: float, asked: float | None = None) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (0 for the first) of a
        request failing since ``since`` (:func:`time.monotonic`), at least ``asked``
        (a Retry-After) but never past the window; None once the window has run out."""
        left = since + self.window - time.monotonic()
        if left <= 0:
            return None
        delay: float = min(self.most, self.first * 2.0 ** min(attempt, 32))
        delay *= random.uniform(0.5, 1.0)
        if asked is not None:
            delay = max(delay, asked)
        return min(delay, left)

    def gave_up(self) -> str:
        """The end of a message for a request that failed for the whole window."""
        return f"expected the server back within {self.window:g} s ({RECONNECT_DELAY_ENV})"


READAHEAD = 2 << 20
"""Size of the readahead window fetched for short sequential reads."""

MAX_WINDOWS = 16
"""Readahead windows a store keeps (one per reading thread, the most recent)."""


class ReadAhead:
    """Readahead windows over ``fetch(view, offset)``, which fills ``view`` from the
    remote file (any length inside its ``size`` bytes); a read that is not sequential
    still fetches at least ``least`` bytes, kept as a window."""

    def __init__(self, fetch: Callable[[memoryview, int], None], size: int,
                 least: int = 0) -> None:  # fmt: skip
        self._fetch = fetch
        self.size = size
        self.least = least
        """The fewest bytes one fetch asks for (a window of them for a shorter read)."""
        self._lock = threading.Lock()
        # Windows by the thread that fetched each: (where it starts, its bytes),
        # least recently used first; and where recent reads ended, likewise.
        self._windows: collections.OrderedDict[int, tuple[int, bytearray]] = (
            collections.OrderedDict()
        )
        self._ends: collections.OrderedDict[int, None] = collections.OrderedDict()

    def read(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` (inside the file) from ``offset``, from a window where it can."""
        with self._lock:
            end = offset + len(view)
            # A recent read ended where this one starts, or inside it: a qcow2
            # golden image's compressed clusters are read to the end of their
            # last sector, which holds the start of the next one.
            sequential = offset in self._ends or any(offset < e < end for e in self._ends)
            self._ends[end] = None
            self._ends.move_to_end(end)
            while len(self._ends) > 4 * MAX_WINDOWS:
                self._ends.popitem(last=False)
            start, window = 0, bytearray()
            for key, (lo, data) in self._windows.items():
                if lo <= offset < lo + len(data):
                    start, window = lo, data
                    self._windows.move_to_end(key)
                    break
        if window:
            take = min(len(view), start + len(window) - offset)
            view[:take] = memoryview(window)[offset - start : offset - start + take]
            view = view[take:]
            offset += take
            sequential = True
        if not view:
            return
        window_size = min(READAHEAD if sequential else self.least, self.size - offset)
        if len(view) < window_size:
            ahead = bytearray(window_size)
            try:
                self._fetch(memoryview(ahead), offset)
            except RemoteReadError:
                # The server fails a range of the window (a bad sector past the
                # read, say): the read itself may not touch it.
                self._fetch(view, offset)
                return
            view[:] = memoryview(ahead)[: len(view)]
            with self._lock:  # never written again: readers copy from it without the lock
                me = threading.get_ident()
                self._windows.pop(me, None)
                self._windows[me] = (offset, ahead)
                while len(self._windows) > MAX_WINDOWS:
                    self._windows.popitem(last=False)
            return
        self._fetch(view, offset)

    def clear(self) -> None:
        """Drop every window."""
        with self._lock:
            self._windows.clear()
            self._ends.clear()
