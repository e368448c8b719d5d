"""A raw disk image on an HTTP(S) server as a read-only backing store (:class:`HTTPStore`).

Design note
===========

What the server must do. The golden image is a raw file behind a URL: a web
server, a CDN or an S3 presigned URL. Every read is one ``GET`` with
``Range: bytes=a-b``; nothing else is ever sent. The size comes from
``GET`` with ``Range: bytes=0-0`` (a ``206`` with ``Content-Range: bytes
0-0/SIZE``), never from ``HEAD``, which presigned URLs refuse (the signature
covers the method). A server that answers a range request with ``200`` (it
ignores ranges) is refused before its body is read: the whole file is never
downloaded.

Pinning. A copy-on-write image over a backing that changes underneath shows
the guest a mix of two disks, silently. So the store pins the identity of the
file (:class:`HTTPPin`: size and a validator) when it opens, or checks the pin
recorded when the image was created, and sends the validator as a condition
on every range read: a strong ``ETag`` with ``If-Match``; without one (a
weak ``W/`` ETag cannot be used with ``If-Match``, RFC 9110 13.1.1)
``Last-Modified`` with ``If-Unmodified-Since``. A ``412`` is
:class:`RemoteChangedError` and nothing of that read is returned. Each ``206``
must also name the pinned size in its ``Content-Range`` and, when it carries
one, the pinned validator. A server sending neither validator is refused:
pinning by size alone would let a same-size replacement through, and the
guest would read a corrupt disk with no error anywhere; every server addcow
targets (nginx, Apache, S3, the common CDNs) sends at least one. The
``Last-Modified`` pin has one-second resolution, which is why the ETag is
preferred when there is one.

Hostile replies. Every byte from the network is checked before use: the
status, ``Content-Range`` exactly (start, end and total), ``Content-Length``
when present, no ``Content-Encoding``, and exactly the requested number of
bytes followed by the end of the body. Bodies are read in bounded pieces
straight into the caller's buffer; header sizes are bounded by
``http.client``. Connect and read timeouts bound every wait.

Retries. Connection errors, timeouts, a body cut short, ``429`` and ``5xx``
are retried under the store's :class:`~addcow.stores.remote.common.RetryPolicy`,
the one of every remote store: with backoff (and a ``Retry-After`` honoured)
until its window has passed since the request first failed, then
:class:`RemoteBackingError` with ``errno`` EIO. A web server restarted (a
second or two refusing connections) is ridden out, as an NBD server's is. A
process that is stopping (:func:`addcow.stores.remote.common.interrupt_waits`)
ends every store's wait at once: the request fails as after its last retry.
Other ``4xx``,
TLS failures and replies that break the protocol (:class:`RemoteReplyError`)
are not retried: asking again would get the same answer.

Redirects are refused (a ``3xx`` is an error naming where it pointed). The
URL is recorded in the image, and every range read would follow the redirect
again: an extra round trip per read, and a target (another host, or plain
``http`` after ``https``) that nobody chose. Presigned and CDN URLs do not
redirect; a user with a redirecting URL records the final one.

URLs with a user name or password (``user:pass@host``) are refused
(:func:`~addcow.stores.remote.uri.parse`): the URL is stored in the image
header in clear and shown by ``addcow info`` and in error messages. A
presigned URL keeps its secret in the query string, so messages name the URL
without its query (:func:`~addcow.stores.remote.uri.shown`), and errors from
the HTTP library are reworded rather than chained, since they may quote it.

Connections and threads. One ``urllib3.PoolManager`` per store, with at most
:data:`~addcow.stores.remote.common.MAX_CONNECTIONS` connections (threads
beyond that wait for one, for at most ``timeout`` seconds); it is
thread-safe, and so is everything here.
Reads longer than :data:`MAX_REQUEST` are split into several requests.

Readahead. Short sequential reads of each thread are served from a window
of :data:`addcow.stores.remote.common.READAHEAD` bytes fetched in one
request (:class:`~addcow.stores.remote.common.ReadAhead`, which says why and
how much memory).

urllib3 is an optional dependency (the ``http`` extra); it is imported only
when a store is opened.
"""

from __future__ import annotations

import errno
import re
import ssl
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, NamedTuple, Self, TypeVar

from ... import sysio
from ...errors import (
    ClosedImageError,
    RangeError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReplyError,
)
from ...extras import install_hint
from ...version import __version__
from ..base import INLINE, POOL, Extent, Route
from .common import MAX_CONNECTIONS, TIMEOUT, ReadAhead, RetryPolicy, stop_event
from .uri import HTTP_SCHEMES, BackingURI, Identity, parse, shown

if TYPE_CHECKING:
    import urllib3

MAX_REQUEST = 8 * 1024 * 1024
"""The longest range one request asks for; longer reads are split."""

PIECE = 256 * 1024
"""The most bytes read from a response body in one call."""

MAX_SIZE = 2**63 - 1
MAX_VALIDATOR = 256
"""Limits on a size and on an ETag or Last-Modified value the store accepts."""

_T = TypeVar("_T")
_MISSING = f"http(s) backing files need urllib3; {install_hint('http')}"
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]{1,19})", re.IGNORECASE)
_DIGITS = re.compile(r"[0-9]{1,19}")
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e\x80-\xff]*"')
_WEAK_ETAG = re.compile(r'W/"[\x21\x23-\x7e\x80-\xff]*"')
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
"""A header value a message may quote as it is."""


class HTTPPin(NamedTuple):
    """The identity of a golden image: its size and validators, as recorded at creation
    (and, for an S3 object in a bucket that keeps versions, its version)."""

    size: int
    etag: str | None
    last_modified: str | None
    version_id: str | None = None

    def found(self) -> Identity:
        """The identity to record in a new image."""
        return Identity(self.etag, self.last_modified, self.version_id)


def open_uri(uri: str, ref: BackingURI | None, retry: RetryPolicy) -> tuple[HTTPStore, Identity]:
    """The file at the URL ``uri``, pinned to ``ref``'s identity when there is one, and
    the identity it was opened at."""
    pinned = None if ref is None else HTTPPin(ref.size, ref.etag, ref.last_modified)
    store = HTTPStore.open(uri, pin=pinned, retry=retry)
    return store, store.identity().found()


class _Retry(Exception):
    """A failure worth another attempt; ``reason`` says what it was."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def _strong_etag(value: str | None) -> str | None:
    """The ETag if it is strong and well formed, else None (it cannot be used with If-Match)."""
    if value is None or len(value) > MAX_VALIDATOR:
        return None
    value = value.strip()
    return value if _STRONG_ETAG.fullmatch(value) else None


def _http_date(value: str | None) -> str | None:
    """The Last-Modified value if it is a well-formed HTTP date, else None."""
    if value is None or len(value) > MAX_VALIDATOR:
        return None
    value = value.strip()
    if not _PRINTABLE.fullmatch(value):
        return None
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return value


def _header(value: str | None) -> str:
    """A header value as a message shows it (bounded, printable)."""
    if value is None:
        return "none"
    if len(value) > MAX_VALIDATOR or not _PRINTABLE.fullmatch(value):
        return repr(value[:MAX_VALIDATOR])
    return value


def _describe(exc: BaseException, url: str) -> str:
    """What went wrong in an exception from the HTTP library, without the URL's query."""
    import urllib3.exceptions as u3e

    cause: BaseException = exc
    if isinstance(exc, u3e.ProtocolError) and len(exc.args) > 1:
        inner = exc.args[1]
        if isinstance(inner, BaseException):
            cause = inner
    if isinstance(exc, u3e.NewConnectionError | u3e.SSLError) and exc.__context__ is not None:
        cause = exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        text = f"{type(cause).__name__}: {cause.strerror}"
    elif isinstance(cause, ssl.SSLError):
        text = f"TLS: {cause.reason or cause}"
    else:
        text = f"{type(cause).__name__}: {cause}"
    query = url.partition("?")[2]
    if query:
        text = text.replace(query, "...")
    return text[:500]


class HTTPStore:
    """A raw golden image behind an http(s) URL, read with range requests.

    Open with :meth:`open`. ``size`` is a plain attribute; ``url`` is the URL
    every request goes to (with its query) and ``shown_url`` the name messages
    use: the URL without its query, or ``name`` when given.

    Subclasses for servers that speak more than HTTP (an S3 store) hook in at
    three places: :meth:`_sign` (headers of each attempt), :meth:`_check_status`
    (what a reply's status means) and :meth:`_identify` (the identity a probe
    found).
    """

    def __init__(
        self,
        url: str,
        pool: urllib3.PoolManager,
        *,
        timeout: float,
        retry: RetryPolicy,
        name: str | None = None,
    ) -> None:
        """Use :meth:`open`: it checks the URL and the server before anything reads."""
        self.url = url
        self.shown_url = shown(name if name is not None else url)
        self._pool = pool
        self._timeout = timeout
        self._retry = retry
        self._pin = HTTPPin(0, None, None)
        self.size = 0
        self._closed = False
        self._readahead = ReadAhead(self._fetch_all, 0)
        self._interrupted = stop_event()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        pin: HTTPPin | None = None,
        ca_file: str | None = None,
        timeout: float = TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> HTTPStore:
        """Open ``url``: find its size and validators, and check them against ``pin``.

        Without ``pin`` the identity found is pinned for the life of the store
        (:meth:`identity` returns it, to be recorded in a new image). ``ca_file``
        replaces the system CA store for https (it is not used for http); ``retry``
        (default: :class:`~.common.RetryPolicy`'s) says how long failing requests
        are retried.
        """
        parse(url, HTTP_SCHEMES)
        pool = make_pool(shown(url), ca_file, timeout)
        return cls(url, pool, timeout=timeout, retry=retry or RetryPolicy())._start(pin)

    def _start(self, pin: HTTPPin | None) -> Self:
        """Probe the server and pin (or check ``pin``); drops the connections on failure."""
        try:
            self._pin = self._probe(pin)
            self.size = self._readahead.size = self._pin.size
        except BaseException:
            self._pool.clear()
            raise
        return self

    def identity(self) -> HTTPPin:
        """The pinned identity of the golden image (size, strong ETag, Last-Modified)."""
        return self._pin

    # -- the BlockSource protocol ------------------------------------------------

    def readinto(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; zeros past the end of the image."""
        if offset < 0:
            raise RangeError(f"{self.shown_url}: expected an offset >= 0, found {offset}")
        if self._closed:
            raise ClosedImageError(f"{self.shown_url}: the HTTP backing store is closed")
        length = len(buffer)
        inside = max(0, min(length, self.size - offset))
        if inside:
            self._readahead.read(buffer[:inside], offset)
        if inside < length:
            sysio.fill_zero(buffer[inside:])
        return length

    def block_status_at(self, offset: int, length: int, depth: int) -> Iterator[Extent]:
        """Data everywhere inside the image (ranges carry no allocation), absent past it."""
        end = min(offset + length, self.size)
        if end > offset:
            yield Extent(offset, end - offset, depth, True, False, None)
        if offset + length > end:
            lo = max(offset, end)
            yield Extent(lo, offset + length - lo, depth, False, True, None)

    def file_ids(self) -> set[tuple[int, int]]:
        """None: the store reads no local file."""
        return set()

    def route(self, offset: int, length: int) -> Route:
        """POOL: every read may wait on the network (INLINE past the end: zeros)."""
        return INLINE if offset >= self.size else POOL

    def close(self) -> None:
        """Drop the connections; later reads raise :class:`ClosedImageError`."""
        self._closed = True
        self._readahead.clear()
        self._pool.clear()

    # -- reading -------------------------------------------------------------------

    def _fetch_all(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from inside the image: requests of at most MAX_REQUEST bytes."""
        for lo in range(0, len(view), MAX_REQUEST):
            self._fetch(view[lo : lo + MAX_REQUEST], offset + lo)

    def _fetch(self, view: memoryview, offset: int) -> None:
        """One range request for [offset, offset+len(view)), with retries."""
        last = offset + len(view) - 1
        headers = {"Range": f"bytes={offset}-{last}"}
        if self._pin.etag is not None:
            headers["If-Match"] = self._pin.etag
        elif self._pin.last_modified is not None:
            headers["If-Unmodified-Since"] = self._pin.last_modified
        what = f"reading bytes {offset}-{last}"
        self._with_retries(what, lambda: self._fetch_once(view, offset, headers))

    def _with_retries(self, what: str, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` until it returns, retrying :class:`_Retry` under the policy."""
        since: float | None = None
        n = 0
        while True:
            if self._closed:
                raise ClosedImageError(f"{self.shown_url}: the HTTP backing store is closed")
            try:
                return attempt()
            except _Retry as exc:
                since = time.monotonic() if since is None else since
                delay = self._retry.pause(n, since, exc.delay)
                n += 1
                if delay is None:
                    tries = "1 attempt" if n == 1 else f"{n} attempts"
                    raise RemoteBackingError(
                        f"{self.shown_url}: {what} failed after {tries} ({exc.reason}); "
                        f"{self._retry.gave_up()}",
                        errno.EIO,
                    ) from None
                if self._interrupted.wait(delay):
                    raise RemoteBackingError(
                        f"{self.shown_url}: {what} failed ({exc.reason}); stopped retrying: "
                        "addcow is stopping",
                        errno.EIO,
                    ) from None

    def _request(self, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """Send one GET; connection failures become :class:`_Retry` or RemoteBackingError."""
        import http.client

        import urllib3.exceptions as u3e

        sent = self._sign({
            "User-Agent": f"addcow/{__version__}",
            "Accept-Encoding": "identity",
            **headers,
        })  # fmt: skip
        try:
            return self._pool.urlopen(
                "GET",
                self.url,
                headers=sent,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                pool_timeout=self._timeout,
            )
        except u3e.SSLError as exc:
            raise RemoteBackingError(
                f"{self.shown_url}: TLS failed ({_describe(exc, self.url)})"
            ) from None
        except u3e.EmptyPoolError:
            raise RemoteBackingError(
                f"{self.shown_url}: expected a free connection within {self._timeout} s, "
                f"found all {MAX_CONNECTIONS} busy"
            ) from None
        except u3e.ProtocolError as exc:
            inner = exc.args[1] if len(exc.args) > 1 else None
            if isinstance(inner, http.client.HTTPException) and not isinstance(
                inner, ConnectionError | http.client.IncompleteRead
            ):
                raise RemoteReplyError(
                    f"{self.shown_url}: expected an HTTP reply, found garbage "
                    f"({_describe(exc, self.url)})"
                ) from None
            raise _Retry(_describe(exc, self.url)) from None
        except (u3e.TimeoutError, u3e.NewConnectionError) as exc:
            raise _Retry(_describe(exc, self.url)) from None
        except u3e.HTTPError as exc:
            raise RemoteBackingError(f"{self.shown_url}: {_describe(exc, self.url)}") from None

    def _sign(self, headers: dict[str, str]) -> dict[str, str]:
        """The headers one attempt sends (a subclass adds its signature); may raise
        :class:`_Retry`."""
        return headers

    def _check_status(self, resp: urllib3.BaseHTTPResponse, what: str) -> None:
        """Raise for every status but 206 (the caller handles 416 first where it may)."""
        status = resp.status
        if status == 206:
            return
        if status == 200:
            raise RemoteBackingError(
                f"{self.shown_url}: expected HTTP 206 Partial Content for a range request, "
                "found 200 (the server ignores Range); a backing URL must support byte "
                "ranges (nothing was downloaded)"
            )
        if status == 412:
            raise self._changed(resp)
        if status == 429 or 500 <= status <= 599:
            raise _Retry(f"HTTP {status}", self._retry_after(resp))
        if 300 <= status <= 399:
            where = resp.headers.get("Location")
            target = _header(shown(where)) if where is not None else "nowhere"
            raise RemoteBackingError(
                f"{self.shown_url}: HTTP {status} redirects to {target}: redirects are "
                "refused; give the final URL"
            )
        hint = " (an expired or wrong presigned URL?)" if status in (401, 403) else ""
        raise RemoteBackingError(
            f"{self.shown_url}: expected HTTP 206 {what}, found HTTP {status}{hint}"
        )

    def _retry_after(self, resp: urllib3.BaseHTTPResponse) -> float | None:
        value = resp.headers.get("Retry-After", "").strip()
        if _DIGITS.fullmatch(value):
            return float(value)  # the policy waits no longer than its window
        return None

    def _check_headers(self, resp: urllib3.BaseHTTPResponse, first: int, last: int,
                       total: int | None) -> int:  # fmt: skip
        """Check Content-Range (and Content-Length, encoding); return the total size."""
        raw = resp.headers.get("Content-Range")
        found = _CONTENT_RANGE.fullmatch(raw.strip()) if raw is not None else None
        if found is None:
            raise RemoteReplyError(
                f"{self.shown_url}: expected Content-Range: bytes {first}-{last}/"
                f"{total if total is not None else 'SIZE'}, found {_header(raw)}"
            )
        start, end, size = (int(g) for g in found.groups())
        if (start, end) != (first, last) or (total is not None and size != total) or \
                size > MAX_SIZE or end >= size:  # fmt: skip
            raise RemoteReplyError(
                f"{self.shown_url}: expected Content-Range: bytes {first}-{last}/"
                f"{total if total is not None else 'SIZE'}, found {_header(raw)}"
            )
        length = resp.headers.get("Content-Length")
        expected = last - first + 1
        if length is not None and not (
            _DIGITS.fullmatch(length.strip()) and int(length) == expected
        ):
            raise RemoteReplyError(
                f"{self.shown_url}: expected Content-Length: {expected}, found {_header(length)}"
            )
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RemoteReplyError(
                f"{self.shown_url}: expected no Content-Encoding, found {_header(encoding)}"
            )
        return size

    def _read_body(self, resp: urllib3.BaseHTTPResponse, view: memoryview) -> None:
        """Read exactly ``len(view)`` bytes into ``view``, then the end of the body."""
        import urllib3.exceptions as u3e

        done = 0
        try:
            while done < len(view):
                piece = resp.read(min(PIECE, len(view) - done), decode_content=False)
                if not piece:
                    raise _Retry(f"the body ended after {done} of {len(view)} bytes")
                if len(piece) > len(view) - done:
                    raise RemoteReplyError(f"{self.shown_url}: the body is longer than expected")
                view[done : done + len(piece)] = piece
                done += len(piece)
            extra = resp.read(1, decode_content=False)
        except (u3e.ProtocolError, u3e.TimeoutError, u3e.SSLError) as exc:
            raise _Retry(
                f"the body broke off after {done} of {len(view)} bytes ({_describe(exc, self.url)})"
            ) from None
        if extra:
            raise RemoteReplyError(
                f"{self.shown_url}: expected a body of {len(view)} bytes, found more"
            )

    def _fetch_once(self, view: memoryview, offset: int, headers: dict[str, str]) -> None:
        """One attempt of a range read; on any failure ``view`` holds nothing usable."""
        last = offset + len(view) - 1
        resp = self._request(headers)
        reusable = False
        try:
            self._check_status(resp, f"Partial Content for bytes {offset}-{last}")
            self._check_headers(resp, offset, last, self.size)
            self._check_validators(resp)
            self._read_body(resp, view)
            reusable = True
        finally:
            _finish(resp, reusable)

    def _check_validators(self, resp: urllib3.BaseHTTPResponse) -> None:
        """A reply naming another ETag (or Last-Modified) than the pinned one is a change."""
        etag = resp.headers.get("ETag")
        if self._pin.etag is not None and etag is not None and etag.strip() != self._pin.etag:
            raise self._changed(resp)
        modified = resp.headers.get("Last-Modified")
        if (
            self._pin.etag is None
            and self._pin.last_modified is not None
            and modified is not None
            and modified.strip() != self._pin.last_modified
        ):
            raise self._changed(resp)

    def _changed(self, resp: urllib3.BaseHTTPResponse | None) -> RemoteChangedError:
        """The error for a golden image that is no longer the pinned one."""
        if self._pin.etag is not None:
            now = resp.headers.get("ETag") if resp is not None else None
            return self._changed_error("ETag", self._pin.etag, now)
        now = resp.headers.get("Last-Modified") if resp is not None else None
        return self._changed_error("Last-Modified", self._pin.last_modified, now)

    def _changed_error(self, field: str, was: object, now: object) -> RemoteChangedError:
        shown_now = "different" if now is None else _header(str(now).strip())
        return RemoteChangedError(
            f"the golden image at {self.shown_url} changed since this image was created: "
            f"{field} {_header(str(was))}, now {shown_now}"
        )

    # -- opening ---------------------------------------------------------------------

    def _probe(self, pin: HTTPPin | None) -> HTTPPin:
        """Size and validators from ``GET`` of bytes 0-0; checked against ``pin``."""
        found = self._with_retries("finding the size (GET of bytes 0-0)", self._probe_once)
        if pin is None:
            if found.etag is None and found.last_modified is None:
                raise RemoteBackingError(
                    f"{self.shown_url}: the golden image cannot be pinned: expected a strong "
                    "ETag or a Last-Modified header, found neither, so a replaced file "
                    "would go unnoticed"
                )
            return found
        if pin.etag is None and pin.last_modified is None:
            raise RemoteBackingError(
                f"{self.shown_url}: expected a pin with an ETag or Last-Modified, found "
                f"size {pin.size} only"
            )
        if pin.etag is not None and found.etag != pin.etag:
            raise self._changed_error("ETag", pin.etag, found.etag or "none (or a weak one)")
        if pin.etag is None and found.last_modified != pin.last_modified:
            raise self._changed_error("Last-Modified", pin.last_modified,
                                      found.last_modified or "none")  # fmt: skip
        if found.size != pin.size:
            raise self._changed_error("size", pin.size, found.size)
        return pin

    def _probe_once(self) -> HTTPPin:
        resp = self._request({"Range": "bytes=0-0"})
        reusable = False
        try:
            if resp.status == 416:
                raw = resp.headers.get("Content-Range")
                empty = _UNSATISFIED_RANGE.fullmatch(raw.strip()) if raw is not None else None
                if empty is None or int(empty.group(1)) != 0:
                    raise RemoteReplyError(
                        f"{self.shown_url}: HTTP 416 to a range request for bytes 0-0: "
                        f"expected Content-Range: bytes */0 (an empty file), found {_header(raw)}"
                    )
                size = 0
            else:
                self._check_status(resp, "Partial Content to a range request for bytes 0-0")
                size = self._check_headers(resp, 0, 0, None)
                self._read_body(resp, memoryview(bytearray(1)))
                reusable = True
            etag = _strong_etag(resp.headers.get("ETag"))
            modified = _http_date(resp.headers.get("Last-Modified"))
            return self._identify(resp, HTTPPin(size, etag, modified))
        finally:
            _finish(resp, reusable)

    def _identify(self, resp: urllib3.BaseHTTPResponse, found: HTTPPin) -> HTTPPin:
        """The identity a probe's reply shows (``found``: from its HTTP headers)."""
        return found


def make_pool(what: str, ca_file: str | None, timeout: float) -> urllib3.PoolManager:
    """The connection pool of one store of ``what`` (a URL as shown): at most
    :data:`MAX_CONNECTIONS` connections, ``ca_file`` (or the system's CA store) for https."""
    if timeout <= 0:
        raise ValueError(f"expected timeout > 0, found {timeout}")
    try:
        import urllib3
    except ImportError:
        raise RemoteBackingError(_MISSING) from None
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise RemoteBackingError(
            f"{ca_file}: cannot load the CA certificates for {what}: {exc}"
        ) from None
    return urllib3.PoolManager(
        num_pools=2,
        maxsize=MAX_CONNECTIONS,
        block=True,
        retries=False,
        timeout=urllib3.Timeout(connect=timeout, read=timeout),
        ssl_context=context,
        cert_reqs="CERT_REQUIRED",
    )


def _finish(resp: urllib3.BaseHTTPResponse, reusable: bool) -> None:
    """Give the connection back to the pool; closed first unless its reply was read whole."""
    if not reusable:
        resp.close()
    resp.release_conn()
