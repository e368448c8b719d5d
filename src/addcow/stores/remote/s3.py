"""An object in an S3 bucket as a read-only backing store (:class:`S3Store`, ``s3://BUCKET/KEY``).

Design note
===========

The HTTP store, signed. An S3 object is read exactly as an HTTP resource is
(:class:`~addcow.stores.remote.http.HTTPStore`, whose design note holds for
everything here): ``GET`` with ``Range`` on a pooled urllib3 connection,
every reply checked (status, ``Content-Range``, length, validators), retries
under the common :class:`~addcow.stores.remote.common.RetryPolicy`,
readahead. :class:`S3Store` adds three things through the HTTP store's hooks:
a SigV4 signature on each attempt, the meaning of S3's error replies, and
the object's version in its identity; and one to the readahead: no request
for fewer than :data:`LEAST_REQUEST` bytes.

Request size. S3 charges and throttles by the request, and a request's
first byte costs more than any of the bytes after it, so a short read that
is not sequential (a qcow2 golden image's header, its tables, the first
compressed cluster of each span a stream copies) still asks for
:data:`LEAST_REQUEST` bytes, kept as a readahead window. A gateway that
leaves Nagle's algorithm on (Ceph's RGW unless its frontend sets
``tcp_nodelay``) holds a reply shorter than a TCP segment until the client's
delayed acknowledgement, some 40 ms: on loopback, where a segment is 64 KiB,
that is every read shorter than that.

Nothing secret in the image. The URI names a bucket and a key, nothing else:
no endpoint, no region, no credentials (a user name or password, a port or a
query in the URI are refused). All three come from the standard AWS chain
when the store opens, resolved by botocore, the reference implementation:
credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), the shared credentials and config files
(``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``),
web identity, a container role or the instance metadata service (IMDSv2);
the endpoint from ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or a
profile's ``endpoint_url`` (else AWS's own for the region); the region from
``AWS_REGION``, ``AWS_DEFAULT_REGION`` or the profile; a CA bundle for an
https endpoint from ``AWS_CA_BUNDLE`` or the profile's ``ca_bundle``.
Requests are path-style (``ENDPOINT/BUCKET/KEY``), which needs no DNS name
per bucket: a gateway on loopback (Ceph's RGW, MinIO) works as AWS does.

Signing. Each attempt of each request is signed anew with botocore's
``S3SigV4Auth``, using the chain's credentials frozen at that moment:
credentials that expire (instance metadata, web identity, assumed roles) are
refreshed by botocore ahead of their expiry, between two requests, and no
reader notices. A refresh that fails is retried like a failed request.

Pinning. A bucket that keeps versions answers with the object's
``x-amz-version-id``: the image records it (``version-id=`` in the URI
record) and every read names it (``?versionId=``), so a key overwritten
after the image was created still reads the version the image was made
from. In a bucket without versions the object's ETag (always a strong one
in S3) is the pin, sent as ``If-Match`` with every read, as for HTTP; a
changed object is refused with the HTTP store's message. The ETag is
recorded and checked in both cases.

Errors. A refusal from S3 is an XML body with a ``<Code>``; the store reads
at most :data:`MAX_ERROR_BODY` bytes of it and takes the code with a
bounded pattern, never with an XML parser (a hostile body cannot expand).
Each code a fleet meets gets one line that says what was expected:
credentials not found (naming every place the chain looked), a wrong secret
(``SignatureDoesNotMatch``), an unknown access key, access denied, a clock
too far off, expired credentials, no such bucket, key or version. ``503
SlowDown`` (throttling), ``500`` and ``429`` are retried with backoff under
the retry policy and, once its window has passed, fail naming the code and
the number of attempts. An endpoint that is not S3 (an error page in HTML, a
reply without ``x-amz-request-id``) is refused as such.

botocore is an optional dependency (the ``s3`` extra); it is imported only
when a store is opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from ...errors import RemoteAuthError, RemoteBackingError, RemoteChangedError, RemoteReplyError
from ...extras import install_hint
from .common import TIMEOUT, RetryPolicy
from .http import HTTPPin, HTTPStore, _header, _Retry, make_pool
from .uri import HTTP_SCHEMES, S3_SCHEMES, BackingURI, Identity, parse

if TYPE_CHECKING:
    import urllib3

MAX_ERROR_BODY = 16 * 1024
"""The most bytes of an error reply's body read to find its S3 error code."""

MAX_VERSION_ID = 1024

LEAST_REQUEST = 64 * 1024
"""The fewest bytes one read request asks for (a shorter read: a window of them)."""
"""The longest version ID accepted from a server."""

_MISSING = f"s3 backing files need botocore; {install_hint('s3')}"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_XML_ERROR = re.compile(rb"\s*(<\?xml[^>]{0,256}\?>)?\s*<Error>")
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_VERSION_ID = re.compile(r"[\x21-\x7e]+")
_RETRIED = ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout")
_WHERE = {
    "env": "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
    "assume-role-with-web-identity": "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)",
    "container-role": "a container role (AWS_CONTAINER_CREDENTIALS_*)",
    "iam-role": "the instance metadata service",
}


def open_uri(uri: str, ref: BackingURI | None, retry: RetryPolicy) -> tuple[S3Store, Identity]:
    """The object ``uri`` names, pinned to ``ref``'s version or ETag when there is one,
    and the identity it was opened at."""
    pinned = None if ref is None else HTTPPin(ref.size, ref.etag, None, ref.version_id)
    store = S3Store.open(uri, pin=pinned, retry=retry)
    return store, store.identity().found()


class S3Location:
    """Where an ``s3://BUCKET/KEY`` URI's object is: the parts of the URI, checked."""

    def __init__(self, uri: str) -> None:
        parts = parse(uri, S3_SCHEMES)
        authority = urlsplit(uri).netloc
        if not _BUCKET.fullmatch(authority) or ".." in authority:
            raise RemoteBackingError(
                f"{uri}: expected a bucket name (3 to 63 lower-case letters, digits, dots and "
                f"hyphens) after s3://, found {authority!r}"
            )
        if parts.query or "?" in uri:
            raise RemoteBackingError(
                f"{uri}: expected no query in an s3:// URI (the version is recorded apart), "
                "found one"
            )
        key = unquote(parts.path[1:])
        if not key:
            raise RemoteBackingError(f"{uri}: expected s3://BUCKET/KEY, found no key")
        self.uri = uri
        self.bucket = authority
        self.key = key

    def path(self) -> str:
        """The request path, encoded as SigV4's canonical URI is for S3."""
        return f"/{self.bucket}/{quote(self.key, safe='/~')}"


class S3Store(HTTPStore):
    """An S3 object read with signed range requests (:class:`HTTPStore` with a signer).

    Open with :meth:`open`; ``shown_url`` is the ``s3://`` URI.
    """

    def __init__(
        self,
        url: str,
        pool: urllib3.PoolManager,
        *,
        timeout: float,
        retry: RetryPolicy,
        location: S3Location,
        chain: _Chain,
    ) -> None:
        """Use :meth:`open`: it resolves the chain and checks the object first."""
        super().__init__(url, pool, timeout=timeout, retry=retry, name=location.uri)
        self._location = location
        self._chain = chain
        self._readahead.least = LEAST_REQUEST
        self._object_url = url
        self._version: str | None = None
        """The version every request names (None: the current one)."""

    @classmethod
    def open(
        cls,
        url: str,
        *,
        pin: HTTPPin | None = None,
        ca_file: str | None = None,
        timeout: float = TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> S3Store:
        """Open the object the ``s3://`` URI ``url`` names: resolve the endpoint, region
        and credentials, find its size and identity, and check them against ``pin``.

        Without ``pin`` the identity found (its version when the bucket keeps
        versions, and its ETag) is pinned for the life of the store. ``ca_file``
        replaces the chain's CA bundle for an https endpoint.
        """
        uri = url
        location = S3Location(uri)
        chain = _Chain.resolve(uri)
        url = chain.endpoint + location.path()
        pool = make_pool(uri, ca_file or chain.ca_bundle, timeout)
        store = cls(url, pool, timeout=timeout, retry=retry or RetryPolicy(),
                    location=location, chain=chain)  # fmt: skip
        if pin is not None and pin.version_id is not None:
            store._name_version(pin.version_id)
        store._start(pin)
        if pin is None and store._pin.version_id is not None:
            store._name_version(store._pin.version_id)
        return store

    def _name_version(self, version_id: str) -> None:
        """Make every later request read version ``version_id`` of the object."""
        self.url = f"{self._object_url}?versionId={quote(version_id, safe='-_.~')}"
        self._version = version_id

    # -- the HTTP store's hooks ------------------------------------------------------

    def _sign(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with a SigV4 signature for a GET of ``self.url``."""
        return self._chain.sign(self.url, headers)

    def _identify(self, resp: urllib3.BaseHTTPResponse, found: HTTPPin) -> HTTPPin:
        """An S3 reply's identity: its ETag and its version, if the bucket keeps them."""
        if resp.headers.get("x-amz-request-id") is None:
            raise self._not_s3(f"a reply without x-amz-request-id (HTTP {resp.status})")
        version = resp.headers.get("x-amz-version-id")
        if version is not None:
            version = version.strip()
            if len(version) > MAX_VERSION_ID or not _VERSION_ID.fullmatch(version):
                raise RemoteReplyError(
                    f"{self.shown_url}: expected a version ID of printable characters, found "
                    f"{_header(version)}"
                )
        pinned = self._version
        if pinned is not None and version != pinned:
            raise RemoteReplyError(
                f"{self.shown_url}: asked for version {pinned}, the reply is of version "
                f"{_header(version)}"
            )
        if found.etag is None:
            raise RemoteReplyError(
                f"{self.shown_url}: expected a strong ETag, as S3 sends for every object, "
                f"found {_header(resp.headers.get('ETag'))}"
            )
        # "null" is the version of an object stored while the bucket kept none.
        kept = version if version not in (None, "null") else None
        return HTTPPin(found.size, found.etag, None, kept)

    def _check_validators(self, resp: urllib3.BaseHTTPResponse) -> None:
        """The HTTP checks, and a reply to a read of a version must be of that version."""
        super()._check_validators(resp)
        version = resp.headers.get("x-amz-version-id")
        if self._version is not None and version is not None and version.strip() != self._version:
            raise RemoteReplyError(
                f"{self.shown_url}: asked for version {self._version}, the reply is of "
                f"version {_header(version)}"
            )

    def _check_status(self, resp: urllib3.BaseHTTPResponse, what: str) -> None:
        status = resp.status
        if status in (200, 206, 412) or 300 <= status <= 399:
            super()._check_status(resp, what)
            return
        code = _error_code(resp)
        if code is None:
            if status == 429 or 500 <= status <= 599:  # a proxy in front of S3, say
                raise _Retry(f"HTTP {status}", self._retry_after(resp))
            kind = _header(resp.headers.get("Content-Type"))
            raise self._not_s3(f"HTTP {status} with no S3 error in its body ({kind})")
        if code == "PreconditionFailed":
            raise self._changed(resp)
        if status == 429 or 500 <= status <= 599 or code in _RETRIED:
            raise _Retry(f"HTTP {status} {code}", self._retry_after(resp))
        raise self._refusal(status, code, what)

    # -- errors ----------------------------------------------------------------------

    def _not_s3(self, found: str) -> RemoteReplyError:
        return RemoteReplyError(
            f"{self.shown_url}: expected an S3 server at {self._chain.endpoint} "
            f"({self._chain.endpoint_from}), found {found}"
        )

    def _refusal(self, status: int, code: str, what: str) -> RemoteBackingError:
        """The one-line error for S3's refusal ``code`` (HTTP ``status``)."""
        loc, chain = self._location, self._chain
        key = f"access key {chain.access_key()} ({chain.source})"
        said = f"HTTP {status} {code}"
        if code == "SignatureDoesNotMatch":
            return RemoteAuthError(
                f"{self.shown_url}: {key}: expected its secret key, found another: the "
                f"server refused the signature ({said})"
            )
        if code == "InvalidAccessKeyId":
            return RemoteAuthError(
                f"{self.shown_url}: {key}: expected an access key the server at "
                f"{chain.endpoint} knows, found an unknown one ({said})"
            )
        if code in ("ExpiredToken", "TokenRefreshRequired"):
            return RemoteAuthError(
                f"{self.shown_url}: {key}: expected credentials still valid, found expired "
                f"ones ({said}): renew them where the chain found them"
            )
        if code == "RequestTimeTooSkewed":
            return RemoteAuthError(
                f"{self.shown_url}: expected this host's clock within 15 minutes of the "
                f"server's, found it further off ({said})"
            )
        if code == "AccessDenied":
            return RemoteAuthError(
                f"{self.shown_url}: {key}: expected permission to read the object "
                f"(s3:GetObject{'Version' if self._version else ''}), found access denied "
                f"({said})"
            )
        if code == "NoSuchBucket":
            return RemoteBackingError(
                f"{self.shown_url}: expected a bucket {loc.bucket!r} at {chain.endpoint}, "
                f"found none ({said})"
            )
        if code == "NoSuchVersion" or (code == "NoSuchKey" and self._version is not None):
            # RGW answers NoSuchKey for a version of a key that is gone
            return RemoteChangedError(
                f"the golden image at {self.shown_url} changed since this image was created: "
                f"expected its version {self._version}, found that version gone ({said})"
            )
        if code == "NoSuchKey":
            return RemoteBackingError(
                f"{self.shown_url}: expected an object {loc.key!r} in bucket {loc.bucket!r}, "
                f"found none ({said})"
            )
        return RemoteBackingError(f"{self.shown_url}: expected HTTP 206 {what}, found {said}")


def _error_code(resp: urllib3.BaseHTTPResponse) -> str | None:
    """The S3 error code in the body of ``resp`` (at most MAX_ERROR_BODY bytes read),
    or None if the body is not an S3 error."""
    import urllib3.exceptions as u3e

    try:
        body = resp.read(MAX_ERROR_BODY, decode_content=False)
    except (u3e.HTTPError, OSError):
        return None
    if not _XML_ERROR.match(body):
        return None
    found = _CODE.search(body)
    return found.group(1).decode("ascii") if found else None


class _Chain:
    """What the AWS chain resolved for one store: endpoint, region, CA bundle and
    credentials (refreshed by botocore when they expire)."""

    def __init__(self, uri: str, endpoint: str, endpoint_from: str, region: str,
                 ca_bundle: str | None, credentials: Any, sign: Callable[..., Any],
                 request: Callable[..., Any], error: type[Exception]) -> None:  # fmt: skip
        self.uri = uri
        self.endpoint = endpoint
        self.endpoint_from = endpoint_from
        self.region = region
        self.ca_bundle = ca_bundle
        self._credentials = credentials
        self.source = _source(str(getattr(credentials, "method", "unknown")))
        self._auth = sign
        self._request = request
        self._error = error

    def access_key(self) -> str:
        key = getattr(self._credentials, "access_key", None)
        return _header(key if isinstance(key, str) else None)

    def sign(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` and a SigV4 signature of a GET of ``url`` with the current
        credentials (refreshed first if they are about to expire)."""
        try:
            frozen = self._credentials.get_frozen_credentials()
        except self._error as exc:
            raise _Retry(f"refreshing the credentials ({self.source}) failed: {exc}") from None
        request = self._request(method="GET", url=url, headers=headers)
        self._auth(frozen, "s3", self.region).add_auth(request)
        return {str(k): str(v) for k, v in request.headers.items()}

    @classmethod
    def resolve(cls, uri: str) -> _Chain:
        """Resolve the chain for ``uri`` (botocore's session: environment, files, metadata)."""
        try:
            import botocore.auth
            import botocore.awsrequest
            import botocore.config
            import botocore.exceptions
            import botocore.session
        except ImportError:
            raise RemoteBackingError(_MISSING) from None
        session = botocore.session.Session()
        try:
            client = session.create_client(
                "s3",
                region_name=os.environ.get("AWS_REGION") or None,
                config=botocore.config.Config(s3={"addressing_style": "path"}),
            )
            credentials = session.get_credentials()
            ca_bundle = session.get_config_variable("ca_bundle")
        except botocore.exceptions.BotoCoreError as exc:
            raise RemoteBackingError(
                f"{uri}: expected a usable AWS configuration, found: {exc}"
            ) from None
        if credentials is None:
            raise RemoteAuthError(
                f"{uri}: expected AWS credentials, found none; looked in {_looked_in(session)}"
            )
        endpoint = str(client.meta.endpoint_url).rstrip("/")
        endpoint_from = _endpoint_from(session)
        parts = urlsplit(endpoint)
        if parts.scheme not in HTTP_SCHEMES or not parts.hostname or parts.query:
            raise RemoteBackingError(
                f"{uri}: expected an http(s) S3 endpoint URL without a query "
                f"({endpoint_from}), found {_header(endpoint)}"
            )
        return cls(uri, endpoint, endpoint_from, str(client.meta.region_name),
                   str(ca_bundle) if ca_bundle else None, credentials,
                   botocore.auth.S3SigV4Auth, botocore.awsrequest.AWSRequest,
                   botocore.exceptions.BotoCoreError)  # fmt: skip


def _source(method: str) -> str:
    """Where credentials of botocore's ``method`` came from, for messages."""
    return f"from {_WHERE.get(method, method)}"


def _endpoint_from(session: Any) -> str:
    """What set the endpoint, for messages."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return name
    if session.get_scoped_config().get("endpoint_url"):
        return f"endpoint_url of profile {session.profile or 'default'}"
    return "AWS's endpoint for the region"


def _looked_in(session: Any) -> str:
    """Every place the credential chain looked, in its order."""
    profile = session.profile or "default"
    places = {
        "env": _WHERE["env"],
        "shared-credentials-file": f"{session.get_config_variable('credentials_file')} "
        f"(profile {profile})",
        "config-file": f"{session.get_config_variable('config_file')} (profile {profile})",
        "iam-role": _WHERE["iam-role"]
        + (" (disabled by AWS_EC2_METADATA_DISABLED)"
           if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true" else ""),
    }  # fmt: skip
    providers = session.get_component("credential_provider").providers
    return ", ".join(places.get(p.METHOD, p.METHOD) for p in providers)
