"""Backing URIs: how a remote golden image is named, pinned, allowed and opened.

Recording (specification, "Backing URIs")
    A version 2 image whose backing is remote sets the incompatible feature
    bit BACKING_URI, and its backing_filename field then holds a *URI record*:
    the URI on the first line, then ``key=value`` lines, ASCII, separated by
    ``\\n``::

        https://images.example.com/golden.raw
        size=2147483648
        etag="5f2c-61a1b"

    or, for an object in an S3 bucket that keeps versions::

        s3://golden/debian-12.qcow2
        size=348913664
        etag="9b2cf535f27731c974343645a3985328"
        version-id=3sL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo

    Without the bit the field is a file name, whatever it looks like: a file
    literally named ``nbd://x`` stays a file, and a reader that does not know
    the bit refuses the image instead of opening a file of that name. A URI
    has no newline (RFC 3986 allows none unescaped), so the record splits
    without ambiguity; :meth:`BackingURI.decode` refuses any other key, a
    repeated key, or bytes outside printable ASCII.

Pinning
    ``size`` (the size of the remote file, always: the raw disk, or the
    qcow2 file, whose virtual size comes from its own header) and, for HTTP,
    ``etag`` (a strong ETag) or ``last-modified``; for S3, ``etag`` and,
    when the bucket keeps versions, ``version-id``: what the golden image was
    when the image was created. Opening checks them, and an HTTP or S3 store
    sends them with every read (``If-Match`` / ``If-Unmodified-Since``; S3
    reads name the version), so an image never reads a golden image that
    changed under it: the clusters it has not copied yet would otherwise mix
    two disks. A record may also carry
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
    HTTPS the system's CA store (``SSL_CERT_FILE`` overrides it), S3 its
    endpoint, region and credentials from the AWS chain of the host
    (:mod:`.s3`).

Opening
    :func:`open_remote` checks the policy, opens the store for the scheme
    (:mod:`addcow.stores.remote.nbd` for ``nbd*``, :mod:`addcow.stores.remote.http` for
    ``http(s)``, :mod:`addcow.stores.remote.s3` for ``s3``), checks the pin, and
    returns the store itself as a raw backing, or a
    :class:`~addcow.stores.qcow2.Qcow2File` reading the store as its file
    (:class:`~addcow.stores.qcow2.RemoteContainer`) for ``qcow2``. Such a qcow2
    may not name a backing file (a file of this host, chosen by the image's
    author), and the qcow2 checks are those of a local file: external data
    files, encryption, truncation refused alike. An add-cow golden image is
    two files (its .add-cow file names its image file) and is not read over a
    URI: serve it (``addcow serve --read-only``) and name the export as raw.

Modules
    :mod:`.uri` parses, redacts and allows URIs and holds the record;
    :mod:`.common` what both stores share (:class:`~.common.RetryPolicy`,
    :class:`~.common.ReadAhead`, :func:`~.common.interrupt_waits`);
    :mod:`.nbd`, :mod:`.http` and :mod:`.s3` (the HTTP store, signed) are the
    stores, each offering ``open_uri``. They import those two modules (and
    :mod:`.s3` imports :mod:`.http`), never this package, which imports a store
    module by its name in :data:`OPENERS` (one entry per family of schemes) only
    when a URI of its family is opened: a command that reads local files never
    loads TLS, HTTP or AWS libraries.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable

from ...errors import BackingFormatError, RemoteChangedError
from .. import registry
from ..base import BlockSource
from ..chain import ChainGuard
from ..magic import HEAD_LENGTH, article, identify
from ..qcow2 import Qcow2File, RemoteContainer
from .common import RECONNECT_DELAY_ENV, TLS_CERTIFICATES_ENV, RetryPolicy, interrupt_waits
from .uri import (
    HTTP_SCHEMES,
    NBD_SCHEMES,
    S3_SCHEMES,
    SCHEMES,
    BackingURI,
    Identity,
    check_policy,
    check_sha256,
    parse,
    scheme_of,
    shown,
)

__all__ = [
    "OPENERS",
    "RECONNECT_DELAY_ENV",
    "SCHEMES",
    "TLS_CERTIFICATES_ENV",
    "BackingURI",
    "RetryPolicy",
    "check_digest",
    "check_policy",
    "check_sha256",
    "interrupt_waits",
    "open_remote",
    "pin",
    "scheme_of",
    "shown",
]

DIGEST_PIECE = 8 << 20
"""Bytes read per request while a golden image is digested."""

Opener = Callable[[str, BackingURI | None, RetryPolicy], tuple[BlockSource, Identity]]
"""What each store module offers as ``open_uri``: the store a URI names (pinned to a
record when one is given), and the identity it was opened at."""

OPENERS: dict[tuple[str, ...], str] = {
    NBD_SCHEMES: "nbd",
    HTTP_SCHEMES: "http",
    S3_SCHEMES: "s3",
}
"""The store module of each family of schemes (:data:`~.uri.SCHEMES` lists them
all), imported when a URI of the family is first opened: every command starts
without TLS, HTTP and AWS libraries it does not use."""


def _open_store(uri: str, ref: BackingURI | None) -> tuple[BlockSource, Identity]:
    scheme = scheme_of(uri)  # parsed already: by BackingURI.decode, or by pin
    module = next(name for schemes, name in OPENERS.items() if scheme in schemes)
    opener: Opener = importlib.import_module(f"{__name__}.{module}").open_uri
    return opener(uri, ref, RetryPolicy.from_env())


def open_remote(ref: BackingURI, fmt: str, *, guard: ChainGuard) -> BlockSource:
    """Open the golden image a URI record names, after the policy and the pin agree."""
    check_policy(ref.uri, guard)
    guard.descend(shown(ref.uri))
    _check_format(ref.uri, fmt)
    store, _ = _open_store(ref.uri, ref)
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
    parse(uri)
    check_policy(uri, guard)
    _check_format(uri, fmt or "raw")
    store, (etag, last_modified, version_id) = _open_store(uri, None)
    try:
        if sha256 is not None:
            check_digest(store, uri, sha256)
        ref = BackingURI(uri, store.size, etag, None if etag else last_modified, sha256,
                         version_id)  # fmt: skip
        ref.encode()
        if fmt in (None, "raw"):
            _refuse_image_header(store, uri, fmt)
    except BaseException:
        store.close()
        raise
    return ref, _layer(store, uri, fmt or "raw", guard)


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
