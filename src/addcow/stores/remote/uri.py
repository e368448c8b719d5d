"""Backing URIs as text: the schemes, the one parse, the policy, the record, the redaction.

Parse (:func:`parse`)
    Every URI addcow reads is checked here, once, whatever takes it (a URI
    record, ``create -b``, :class:`~addcow.stores.remote.http.HTTPStore`,
    :class:`~addcow.stores.remote.nbd.NBDStore`): printable ASCII without
    spaces, a scheme among those the caller reads, no fragment, no user name
    or password (a URI is stored in the image in clear), a port from 1 to
    65535 when one is given, and a host name (an S3 URI's bucket), except for
    the Unix socket schemes, which must have none. What a scheme adds is
    checked on the parts returned: an NBD export name and its ``socket=``
    parameter here (:func:`parse_nbd`, doc/uri.md of the NBD project), an S3
    bucket name and key by its store.

Redaction (:func:`shown`)
    One rule for every message and every ``info`` field that prints a URI: a
    password in the user information is replaced by ``...``, and so is a query
    string (a presigned URL's signature is in it), with the fragment left out;
    the only query shown is that of an NBD URI made only of ``socket=``
    parameters, the path of a local socket.

Policy (:func:`check_policy`) and the URI record (:class:`BackingURI`) are
described in :mod:`addcow.stores.remote`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from ...errors import PathPolicyError, RemoteBackingError
from ...nbd import wire
from ..chain import ChainGuard

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
HTTP_SCHEMES = ("http", "https")
S3_SCHEMES = ("s3",)
"""``s3://BUCKET/KEY``: an object read over S3, with credentials from the environment."""
SCHEMES = NBD_SCHEMES + HTTP_SCHEMES + S3_SCHEMES
UNIX_SCHEMES = ("nbd+unix", "nbds+unix")
"""Schemes that name a Unix socket (``?socket=PATH``), not a host."""
TLS_SCHEMES = ("nbds", "nbds+unix", "https")

MAX_RECORD = 8192
"""Longest URI record (bytes): a URI and its pin, not a file."""

_KEYS = ("size", "etag", "last-modified", "sha256", "version-id")
_SCHEME_KEYS = {
    NBD_SCHEMES: ("size", "sha256"),
    HTTP_SCHEMES: ("size", "etag", "last-modified", "sha256"),
    S3_SCHEMES: ("size", "etag", "version-id", "sha256"),
}
"""The keys a record of each family of schemes may hold."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


class URIParts(NamedTuple):
    """A backing URI that :func:`parse` accepted, split into what a store needs."""

    uri: str
    scheme: str
    tls: bool
    unix: bool
    host: str | None
    port: int | None
    path: str
    query: str


def shown(uri: str) -> str:
    """``uri`` as it may be printed: no password, no query (but an NBD ``socket=``
    path), no fragment."""
    head, mark, rest = uri.partition("?")
    head, _, _ = head.partition("#")
    query = rest.partition("#")[0] if mark else ""
    scheme, sep, tail = head.partition("://")
    authority, slash, path = tail.partition("/")
    user, at, host = authority.rpartition("@")
    if at and ":" in user:
        head = f"{scheme}{sep}{user.partition(':')[0]}:...@{host}{slash}{path}"
    if not mark:
        return head
    sockets = query and all(p.startswith("socket=") for p in query.split("&"))
    return f"{head}?{query}" if sockets and scheme.lower() in NBD_SCHEMES else f"{head}?..."


def _refused(uri: str, expected: str, found: str) -> RemoteBackingError:
    return RemoteBackingError(f"backing URI {shown(uri)!r}: expected {expected}, found {found}")


def parse(uri: str, schemes: Collection[str] = SCHEMES) -> URIParts:
    """Check ``uri`` as a backing URI of one of ``schemes`` and split it;
    :class:`RemoteBackingError` naming what is wrong if it is not one."""
    bad = next((c for c in uri if not _PRINTABLE.fullmatch(c)), None)
    if bad is not None or not uri:
        raise _refused(uri, "printable ASCII without spaces (percent-encode them)",
                       repr(bad) if bad is not None else "nothing")  # fmt: skip
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise _refused(uri, "a valid URI with a port from 1 to 65535", str(exc)) from None
    scheme = parts.scheme
    if scheme_of(uri) != scheme or scheme not in schemes:
        raise _refused(uri, f"one of {', '.join(s + '://' for s in schemes)}",
                       f"scheme {scheme or 'none'!r}")  # fmt: skip
    if parts.fragment or "#" in uri:
        raise _refused(uri, "no #fragment", "one")
    if "@" in parts.netloc:
        hint = {
            "http": "; use a presigned URL instead",
            "https": "; use a presigned URL instead",
            "s3": "; S3 credentials come from the environment",
        }.get(scheme, "")
        raise _refused(uri, "no user name or password (the URI is stored in the image in "
                       f"clear{hint})", "one")  # fmt: skip
    unix = scheme in UNIX_SCHEMES
    if unix and parts.netloc:
        raise _refused(uri, "no host for a Unix socket", repr(parts.netloc))
    if not unix and not parts.hostname:
        raise _refused(uri, "a host name", "none")
    if port == 0:
        raise _refused(uri, "a port from 1 to 65535", "0")
    return URIParts(uri, scheme, scheme in TLS_SCHEMES, unix, parts.hostname, port,
                    parts.path, parts.query)  # fmt: skip


def scheme_of(text: str) -> str | None:
    """The backing scheme ``text`` starts with (``nbd``, ``https``, ...), or None."""
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else None


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


def check_sha256(text: str) -> str:
    """A SHA-256 given by the user (``--backing-sha256``) in hex, in lower case."""
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise RemoteBackingError(
            f"--backing-sha256: expected 64 hexadecimal digits (a SHA-256), found {text[:80]!r}"
        )
    return digest


class Identity(NamedTuple):
    """What a store that was just opened says identifies the bytes it serves, for a
    new record: the validators of HTTP and S3, and an S3 object's version (an NBD
    export has none: it is pinned by its size)."""

    etag: str | None = None
    last_modified: str | None = None
    version_id: str | None = None


class BackingURI(NamedTuple):
    """A URI record: the golden image's URI, its identity when it was pinned and,
    when known, the SHA-256 of its bytes."""

    uri: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    version_id: str | None = None

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
        if self.version_id is not None:
            lines.append(f"version-id={self.version_id}")
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
        parse(first)
        fields: dict[str, str] = {}
        for line in rest:
            key, sep, value = line.partition("=")
            if not sep or key not in _KEYS or key in fields or not value:
                raise RemoteBackingError(
                    "backing URI record: expected size=, etag=, last-modified=, sha256= or "
                    f"version-id= once each, found {line[:80]!r}"
                )
            fields[key] = value
        size = fields.get("size", "")
        if not size.isdigit() or int(size) <= 0:
            raise RemoteBackingError(
                f"backing URI record: expected size=BYTES (more than 0), found {size!r}"
            )
        scheme = scheme_of(first)
        allowed_keys = _SCHEME_KEYS[next(s for s in _SCHEME_KEYS if scheme in s)]
        if fields.keys() - allowed_keys:
            raise RemoteBackingError(
                f"backing URI record: expected only {', '.join(k + '=' for k in allowed_keys)} "
                f"in the record of a {scheme}:// URI, found {', '.join(sorted(fields))}"
            )
        digest = fields.get("sha256")
        if digest is not None and not _SHA256.fullmatch(digest):
            raise RemoteBackingError(
                "backing URI record: sha256: expected 64 lower-case hexadecimal digits, "
                f"found {digest[:80]!r}"
            )
        return cls(first, int(size), fields.get("etag"), fields.get("last-modified"), digest,
                   fields.get("version-id"))  # fmt: skip


class NBDURI(NamedTuple):
    """A parsed NBD URI: TCP (``host``, ``port``) or Unix (``socket``), and the export."""

    uri: str
    tls: bool
    host: str | None
    port: int | None
    socket: str | None
    export: str


def _bad_nbd_uri(uri: str, expected: str, found: str) -> RemoteBackingError:
    return RemoteBackingError(f"NBD URI {shown(uri)!r}: expected {expected}, found {found}")


def parse_nbd(uri: str) -> NBDURI:
    """Check an NBD URI (doc/uri.md) and split it; RemoteBackingError if it is not one.
    :func:`parse` checks what every backing URI must be; the export name and the
    query are checked here."""
    parts = parse(uri, NBD_SCHEMES)
    path = parts.path
    if path and not path.startswith("/"):
        raise _bad_nbd_uri(uri, "an export path starting with '/'", repr(path))
    try:
        export = unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        raise _bad_nbd_uri(uri, "an export name in UTF-8", repr(path)) from None
    if "\0" in export or len(export.encode()) > wire.MAX_STRING:
        raise _bad_nbd_uri(uri, f"an export name without NUL of at most {wire.MAX_STRING} bytes",
                           f"{len(export.encode())} bytes")  # fmt: skip
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                          errors="strict")  # fmt: skip
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_nbd_uri(uri, "a query of key=value pairs", str(exc)) from None
    keys = [key for key, _value in query]
    allowed = ["socket"] if parts.unix else []
    for key in keys:
        if key not in allowed:
            what = ("the TLS certificate directory comes from the caller, not the URI"
                    if key.startswith("tls") else "unsupported")  # fmt: skip
            raise _bad_nbd_uri(uri, f"query parameters {allowed or 'none'}",
                               f"{key!r} ({what})")  # fmt: skip
    if parts.unix:
        if keys != ["socket"] or not query[0][1]:
            raise _bad_nbd_uri(uri, "exactly one non-empty socket= parameter",
                               f"{len(keys)} parameters")  # fmt: skip
        return NBDURI(uri, parts.tls, None, None, query[0][1], export)
    return NBDURI(uri, parts.tls, parts.host, parts.port or wire.PORT, None, export)
