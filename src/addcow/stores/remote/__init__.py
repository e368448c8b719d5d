"""Backing URIs: how a remote golden image is named, pinned, allowed and opened.

Recording (specification, "Backing URIs")
    A version 2 image whose backing is remote sets the incompatible feature
    bit BACKING_URI, and its backing_filename field then holds a *URI record*:
    the URI on the first line, then ``key=value`` lines, ASCII, separated by
    ``\\n``::

        https://images.example.com/golden.raw
        size=2147483648
        etag="5f2c-61a1b"

    Without the bit the field is a file name, whatever it looks like: a file
    literally named ``nbd://x`` stays a file, and a reader that does not know
    the bit refuses the image instead of opening a file of that name. A URI
    has no newline (RFC 3986 allows none unescaped), so the record splits
    without ambiguity; :meth:`BackingURI.decode` refuses any other key, a
    repeated key, or bytes outside printable ASCII.

Pinning
    ``size`` (the size of the remote file, always: the raw disk, or the
    qcow2 file, whose virtual size comes from its own header) and, for HTTP,
    ``etag`` (a strong ETag) or ``last-modified``: what the golden image was
    when the image was created. Opening checks them, and an HTTP store sends them
    with every read (``If-Match`` / ``If-Unmodified-Since``), so an image
    never reads a golden image that changed under it: the clusters it has
    not copied yet would otherwise mix two disks. A record may also carry
    ``sha256``, the digest of the whole resource, written only after it was
    read and checked (:func:`check_digest`; ``rebase -b URI --backing-sha256``).

Re-pinning (:func:`addcow.lifecycle.rebase`, :func:`addcow.lifecycle.repin`)
    A server may change the validator of unchanged bytes (nginx's ETag follows
    the file's mtime). ``rebase -u -b URI`` re-pins on the user's word;
    a safe ``rebase -b URI`` compares clusters while the old pin still
    holds, and once it does not, re-pins only when the whole resource at its
    new pin digests to the recorded ``sha256``.

Trust (docs/reliability.md, "Threat model")
    A URI stored in an image is a network request that the image's author
    chose (the server-side request form of CVE-2024-4467): opening an image
    from someone else could make this host connect anywhere. With a
    ``backing_root`` (the CLI's ``--backing-root``, the mode for images one
    did not create) every URI is refused unless it starts with a prefix the
    user allowed (``--allow-backing-uri PREFIX``). A prefix matches whole
    components only: ``https://img.example.com/`` does not allow
    ``https://img.example.com.evil.test/``. Certificates and keys for TLS
    never come from the image: NBD over TLS takes its directory from
    ``ADDCOW_TLS_CERTIFICATES`` (laid out as libnbd's ``tls-certificates``),
    HTTPS the system's CA store (``SSL_CERT_FILE`` overrides it).

Opening
    :func:`open_remote` checks the policy, opens the store for the scheme
    (:mod:`addcow.stores.remote.nbd` for ``nbd*``, :mod:`addcow.stores.remote.http` for
    ``http(s)``), checks the pin, and returns the store itself as a raw
    backing, or a :class:`~addcow.stores.qcow2.Qcow2File` reading the store as its
    file (:class:`~addcow.stores.qcow2.RemoteContainer`) for ``qcow2``. Such a qcow2
    may not name a backing file (a file of this host, chosen by the image's
    author), and the qcow2 checks are those of a local file: external data
    files, encryption, truncation refused alike. An add-cow golden image is
    two files (its .add-cow file names its image file) and is not read over a
    URI: serve it (``addcow serve --read-only``) and name the export as raw.

Retrying (:class:`RetryPolicy`, used by both stores)
    One policy for every remote store: a request that fails in a way another
    attempt may cure (a lost NBD connection, a refused or broken HTTP
    connection, a timeout, HTTP ``429`` or ``5xx``) is tried again with
    backoff until the policy's window has passed since it first failed, so a
    golden server restarted within the window never reaches the guest, whatever
    its protocol. The window is :data:`RETRY_WINDOW` seconds unless
    :data:`RECONNECT_DELAY_ENV` sets it; :func:`interrupt_waits` ends every wait
    at once when the process stops.

Readahead (:class:`ReadAhead`, used by both stores)
    A read shorter than :data:`READAHEAD` that starts where a recent read
    ended (or runs on past a window) fetches :data:`READAHEAD` bytes instead,
    kept as the window of the thread that fetched it; later reads inside any
    window are served from memory. There is a window per thread because the
    readers of a stream each walk their own span (a qcow2 golden image's
    compressed clusters, one short read each): one window for all would be
    replaced at every read and help none of them. Reads are matched against
    every window and every recent end, not only their own thread's, because
    the server's pool hands one client's sequential reads to whichever
    thread is free. A window holds bytes of the pinned golden image, so it
    never goes stale. Memory stays bounded: at most :data:`MAX_WINDOWS`
    windows and four times as many read ends (the least recently used go),
    plus one window being fetched per reading thread. A window the server
    answers with an error for some of its range
    (:class:`~addcow.errors.RemoteReadError`) is dropped and the read asked
    for alone, so an error reaches only the reads that touch it.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ...errors import (
    BackingFormatError,
    PathPolicyError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReadError,
)
from .. import registry
from ..base import BlockSource
from ..chain import ChainGuard
from ..magic import HEAD_LENGTH, article, identify
from ..qcow2 import Qcow2File, RemoteContainer

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
HTTP_SCHEMES = ("http", "https")
SCHEMES = NBD_SCHEMES + HTTP_SCHEMES

MAX_RECORD = 8192
"""Longest URI record (bytes): a URI and its pin, not a file."""
TLS_CERTIFICATES_ENV = "ADDCOW_TLS_CERTIFICATES"
RECONNECT_DELAY_ENV = "ADDCOW_RECONNECT_DELAY"
"""The retry window of every remote store, in seconds (:class:`RetryPolicy`)."""
RETRY_WINDOW = 30.0
"""The default retry window: a golden server's restart must not reach the guest.
(QEMU's default reconnect-delay is 0; outliving a restart is the point here.)"""
MAX_RETRY_WINDOW = 3600.0

_KEYS = ("size", "etag", "last-modified", "sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")
DIGEST_PIECE = 8 << 20
"""Bytes read per request while a golden image is digested."""


class BackingURI(NamedTuple):
    """A URI record: the golden image's URI, its identity when it was pinned and,
    when known, the SHA-256 of its bytes."""

    uri: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0].lower()

    def encode(self) -> bytes:
        lines = [self.uri, f"size={self.size}"]
        if self.etag is not None:
            lines.append(f"etag={self.etag}")
        if self.last_modified is not None:
            lines.append(f"last-modified={self.last_modified}")
        if self.sha256 is not None:
            lines.append(f"sha256={self.sha256}")
        record = "\n".join(lines).encode("ascii")
        BackingURI.decode(record)  # everything written must read back
        return record

    @classmethod
    def decode(cls, raw: bytes) -> BackingURI:
        """Parse a URI record from a header, refusing anything but the exact form."""
        if len(raw) > MAX_RECORD:
            raise RemoteBackingError(
                f"backing URI record: expected at most {MAX_RECORD} bytes, found {len(raw)}"
            )
        if any((b < 0x20 and b != 0x0A) or b > 0x7E for b in raw):
            raise RemoteBackingError(
                f"backing URI record: expected printable ASCII lines, found {raw[:80]!r}"
            )
        first, *rest = raw.decode("ascii").split("\n")
        check_uri(first)
        fields: dict[str, str] = {}
        for line in rest:
            key, sep, value = line.partition("=")
            if not sep or key not in _KEYS or key in fields or not value:
                raise RemoteBackingError(
                    f"backing URI record: expected size=, etag=, last-modified= or sha256= "
                    "once each, "
                    f"found {line[:80]!r}"
                )
            fields[key] = value
        size = fields.get("size", "")
        if not size.isdigit() or int(size) <= 0:
            raise RemoteBackingError(
                f"backing URI record: expected size=BYTES (more than 0), found {size!r}"
            )
        if scheme_of(first) in NBD_SCHEMES and fields.keys() - {"size", "sha256"}:
            raise RemoteBackingError(
                "backing URI record: expected only size= and sha256= for an NBD URI, "
                f"found {', '.join(sorted(fields))}"
            )
        digest = fields.get("sha256")
        if digest is not None and not _SHA256.fullmatch(digest):
            raise RemoteBackingError(
                "backing URI record: sha256: expected 64 lower-case hexadecimal digits, "
                f"found {digest[:80]!r}"
            )
        return cls(first, int(size), fields.get("etag"), fields.get("last-modified"), digest)


def scheme_of(text: str) -> str | None:
    """The backing scheme ``text`` starts with (``nbd``, ``https``, ...), or None."""
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else None


def check_uri(uri: str) -> None:
    """Refuse anything that is not a backing URI addcow can open."""
    scheme = scheme_of(uri)
    if scheme is None:
        raise RemoteBackingError(
            f"backing URI: expected one of {', '.join(s + '://' for s in SCHEMES)}, "
            f"found {shown(uri)!r}"
        )
    if any(c.isspace() for c in uri) or not uri.isascii():
        raise RemoteBackingError(f"backing URI: expected no spaces, found {shown(uri)!r}")
    from urllib.parse import urlsplit  # here: most commands never see a URI

    parts = urlsplit(uri)
    if parts.fragment:
        raise RemoteBackingError(f"backing URI: expected no #fragment, found {shown(uri)!r}")
    if scheme in HTTP_SCHEMES and not parts.hostname:
        raise RemoteBackingError(f"backing URI: expected a host name, found {shown(uri)!r}")


def shown(uri: str) -> str:
    """A URI as it may be printed: an HTTP query (presigned URLs carry secrets) left out."""
    if scheme_of(uri) in HTTP_SCHEMES and "?" in uri:
        return uri.split("?", 1)[0] + "?..."
    return uri


def allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``uri`` starts with one of ``prefixes`` at a component boundary."""
    for prefix in prefixes:
        if uri == prefix:
            return True
        if uri.startswith(prefix) and (prefix.endswith("/") or uri[len(prefix)] in "/?"):
            return True
    return False


def check_policy(uri: str, guard: ChainGuard) -> None:
    """Refuse a URI an untrusted image names (``backing_root``) unless it was allowed."""
    if guard.root is None or allowed(uri, guard.allowed_uris):
        return
    hint = "give --allow-backing-uri PREFIX to allow it"
    raise PathPolicyError(
        f"backing URI {shown(uri)!r}: refused: an image opened with --backing-root may name "
        f"only files inside it ({hint})"
    )


def open_remote(ref: BackingURI, fmt: str, *, guard: ChainGuard) -> BlockSource:
    """Open the golden image a URI record names, after the policy and the pin agree."""
    check_policy(ref.uri, guard)
    guard.descend(shown(ref.uri))
    _check_format(ref.uri, fmt)
    store = _open_store(ref.uri, ref)
    try:
        if store.size != ref.size:
            raise RemoteChangedError(
                f"{shown(ref.uri)}: the golden image changed since this image was created: "
                f"size {ref.size} when pinned, now {store.size}"
            )
    except BaseException:
        store.close()
        raise
    return _layer(store, ref.uri, fmt, guard)


def pin(
    uri: str, fmt: str | None, *, guard: ChainGuard, sha256: str | None = None
) -> tuple[BackingURI, BlockSource]:
    """Open ``uri`` to record it in an image (``create -b URI``, ``rebase -b URI``): its
    record and the open golden image (the store, or the qcow2 read from it).

    ``fmt`` None means raw; a raw golden image that starts with an image header is
    refused (a guest can write one into a raw disk, so it is never guessed). With
    ``sha256`` the whole resource is read at its pin and must digest to it
    (:class:`RemoteChangedError` if not); the record then carries it.
    """
    check_uri(uri)
    check_policy(uri, guard)
    _check_format(uri, fmt or "raw")
    store = _open_store(uri, None)
    try:
        etag = last_modified = None
        identity = getattr(store, "identity", None)
        if scheme_of(uri) in HTTP_SCHEMES and identity is not None:
            found = identity()
            etag, last_modified = found.etag, found.last_modified
        if sha256 is not None:
            check_digest(store, uri, sha256)
        ref = BackingURI(uri, store.size, etag, None if etag else last_modified, sha256)
        ref.encode()
        if fmt in (None, "raw"):
            _refuse_image_header(store, uri, fmt)
    except BaseException:
        store.close()
        raise
    return ref, _layer(store, uri, fmt or "raw", guard)


def check_sha256(text: str) -> str:
    """A SHA-256 given by the user (``--backing-sha256``) in hex, in lower case."""
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise RemoteBackingError(
            f"--backing-sha256: expected 64 hexadecimal digits (a SHA-256), found {text[:80]!r}"
        )
    return digest


def check_digest(store: BlockSource, uri: str, sha256: str) -> None:
    """Read the whole of ``store`` (at its pin) and refuse it unless its SHA-256 is
    ``sha256``: :class:`RemoteChangedError` naming both."""
    digest = hashlib.sha256()
    buf = bytearray(min(DIGEST_PIECE, store.size))
    view = memoryview(buf)
    for offset in range(0, store.size, DIGEST_PIECE):
        piece = view[: min(DIGEST_PIECE, store.size - offset)]
        store.readinto(piece, offset)
        digest.update(piece)
    if digest.hexdigest() != sha256:
        raise RemoteChangedError(
            f"{shown(uri)}: expected the golden image's SHA-256 {sha256}, found "
            f"{digest.hexdigest()}: not the content this image was made over"
        )


def _refuse_image_header(backing: BlockSource, uri: str, fmt: str | None) -> None:
    """Record a remote golden image as raw only if it does not start with an image header."""
    head = memoryview(bytearray(min(HEAD_LENGTH, backing.size)))
    backing.readinto(head, 0)
    found = identify(bytes(head))
    if found is None:
        return
    over_uri = registry.names(over_uri=True)
    if found in over_uri:
        advice = f"if it is {article(found)} image, give -F {found}"
    else:
        advice = f"addcow reads {', '.join(over_uri)} golden images over a URI, not {found}"
    if fmt is None:
        raise BackingFormatError(
            f"{shown(uri)}: the golden image starts with {article(found)} header; "
            f"refusing to guess its format (a guest can write such a header into a raw disk): "
            f"{advice}"
        )
    raise BackingFormatError(
        f"{shown(uri)} starts with {article(found)} header; refusing to record it as raw "
        f"(a raw disk must not start with an image header): {advice}"
    )


def _check_format(uri: str, fmt: str) -> None:
    if fmt == "add-cow":
        raise BackingFormatError(
            f"{shown(uri)}: backing format 'add-cow' over a URI is not read: an add-cow "
            "golden image is two files; serve it with addcow serve --read-only and give "
            "that export's URI with -F raw"
        )
    formats = registry.names(over_uri=True)
    if fmt not in formats:
        raise BackingFormatError(
            f"{shown(uri)}: backing format {fmt!r} over a URI is not read; "
            f"expected one of {', '.join(formats)}"
        )


def _layer(store: BlockSource, uri: str, fmt: str, guard: ChainGuard) -> BlockSource:
    """The golden image in ``store`` as ``fmt`` reads it; closes the store on failure."""
    if fmt == "raw":
        return store
    # Qcow2File closes its container, and with it the store, if it refuses the file.
    container = RemoteContainer(store, shown(uri))
    return Qcow2File(
        shown(uri), guard=guard, force_share=True, open_backing=None, container=container
    )


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


@dataclass(frozen=True)
class RetryPolicy:
    """How every remote store rides out a failing server: it tries again for ``window``
    seconds after a request first failed (NBD: since the connection was lost), waiting
    ``first`` seconds, then twice as long each time up to ``most``, each wait drawn
    from its upper half so that the clients of one restarted server do not return in
    step. A server's own ``Retry-After`` is honoured up to what is left of the window.
    Waits end at once when the process stops (:func:`interrupt_waits`)."""

    window: float = RETRY_WINDOW
    first: float = 0.1
    most: float = 2.0

    def __post_init__(self) -> None:
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
    remote file (any length inside its ``size`` bytes)."""

    def __init__(self, fetch: Callable[[memoryview, int], None], size: int) -> None:
        self._fetch = fetch
        self.size = size
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
            sequential = offset in self._ends
            self._ends[offset + len(view)] = None
            self._ends.move_to_end(offset + len(view))
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
        window_size = min(READAHEAD, self.size - offset)
        if sequential and len(view) < window_size:
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


def _open_store(uri: str, ref: BackingURI | None) -> BlockSource:
    scheme = scheme_of(uri)
    retry = RetryPolicy.from_env()
    if scheme in NBD_SCHEMES:
        from .nbd import NBDStore

        return NBDStore.open(
            uri, tls_certificates=os.environ.get(TLS_CERTIFICATES_ENV), retry=retry
        )
    from . import http as http_store

    pinned = None
    if ref is not None:
        pinned = http_store.HTTPPin(ref.size, ref.etag, ref.last_modified)
    return http_store.HTTPStore.open(uri, pin=pinned, retry=retry)
