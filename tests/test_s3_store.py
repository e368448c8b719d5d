"""S3Store against a hostile S3 server: a clear error, never wrong data.

The tiny socket server of tests/test_http_store.py plays the endpoint
(``AWS_ENDPOINT_URL``); it checks no signature (signatures are RGW's part, in
tests/test_s3_rgw.py). Each broken reply must end in a RemoteBackingError (or a
subclass) quickly, with bounded memory; the URI records of s3:// URIs are
parsed as strictly as the others.
"""

from __future__ import annotations

import re
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from helpers import hide_package
from test_http_store import DATA, ETAG, Hostile, Reply, _stream, good, hostile

from addcow.errors import (
    AddCowError,
    RemoteAuthError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReplyError,
)
from addcow.stores.remote import BackingURI, RetryPolicy
from addcow.stores.remote.http import HTTPPin
from addcow.stores.remote.s3 import LEAST_REQUEST, S3Store

S3 = "x-amz-request-id: tx0001\r\n"
URI = "s3://golden/img.raw"
SECRET = "5ecretKey0fTheFleet"


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFLEET")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


def s3_probe(version: str | None = None) -> Reply:
    extra = S3 + (f"x-amz-version-id: {version}\r\n" if version else "")
    return lambda first, last, headers: good(first, last, extra)


def xml_error(status: str, code: str, extra: str = "") -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>nope</Message><RequestId>tx1</RequestId></Error>").encode()  # fmt: skip
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n{S3}{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


def _read(store: S3Store, offset: int, length: int) -> bytes:
    buf = bytearray(b"\xee" * length)
    store.readinto(memoryview(buf), offset)
    return bytes(buf)


@contextmanager
def s3_server(reply: Reply, probe: Reply | None = None, *,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[Hostile]:  # fmt: skip
    """The hostile server as the S3 endpoint of the environment."""
    with hostile(reply, probe or s3_probe()) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
        yield server


def test_signed_range_reads_of_the_path_style_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(lambda a, b, h: good(a, b), monkeypatch=monkeypatch) as server:
        store = S3Store.open("s3://golden/dir/debian%2012.raw", retry=RetryPolicy(0.3))
        try:
            assert store.identity() == HTTPPin(len(DATA), ETAG, None, None)
            assert store.shown_url == "s3://golden/dir/debian%2012.raw"
            assert _read(store, 123_456, 200_000) == DATA[123_456:323_456]
        finally:
            store.close()
    for request in server.requests:
        assert request["request"] == "GET /golden/dir/debian%2012.raw HTTP/1.1"
        assert request["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAFLEET/")
        assert "range" in request["authorization"] and "x-amz-date" in request
        assert SECRET not in str(request)
    assert server.requests[1]["if-match"] == ETAG


def test_a_version_is_named_in_every_read(monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(lambda a, b, h: good(a, b, "x-amz-version-id: v+1/x\r\n"),
                   s3_probe("v+1/x"), monkeypatch=monkeypatch) as server:  # fmt: skip
        store = S3Store.open(URI, retry=RetryPolicy(0.3))
        try:
            assert store.identity() == HTTPPin(len(DATA), ETAG, None, "v+1/x")
            assert _read(store, 1000, 5000) == DATA[1000:6000]
        finally:
            store.close()
        # the version pinned: the probe names it too
        store = S3Store.open(URI, pin=HTTPPin(len(DATA), ETAG, None, "v+1/x"))
        store.close()
    paths = [r["request"].split()[1] for r in server.requests]
    assert paths == ["/golden/img.raw", "/golden/img.raw?versionId=v%2B1%2Fx",
                     "/golden/img.raw?versionId=v%2B1%2Fx"]  # fmt: skip


def test_a_short_read_asks_for_the_least_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short reads that are not sequential (a qcow2 golden image's header and tables)
    each ask for LEAST_REQUEST bytes, kept as a window: the reads inside it send
    nothing, and the last request stops at the end of the object."""
    end = len(DATA) - 1000
    with s3_server(lambda a, b, h: good(a, b, S3), monkeypatch=monkeypatch) as server:
        store = S3Store.open(URI, retry=RetryPolicy(0.3))
        try:
            assert _read(store, 0, 104) == DATA[:104]
            assert _read(store, 40_000, 8) == DATA[40_000:40_008]
            assert _read(store, 500_000, 100) == DATA[500_000:500_100]
            assert _read(store, end, 10) == DATA[end : end + 10]
        finally:
            store.close()
    ranges = [r["range"] for r in server.requests]
    assert ranges == ["bytes=0-0", f"bytes=0-{LEAST_REQUEST - 1}",
                      f"bytes=500000-{500_000 + LEAST_REQUEST - 1}",
                      f"bytes={end}-{len(DATA) - 1}"]  # fmt: skip


def _error_body(code: str, filler: int = 0) -> bytes:
    body = f"<Error>{' ' * filler}<Code>{code}</Code></Error>".encode()
    return (f"HTTP/1.1 403 Forbidden\r\n{S3}Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body  # fmt: skip


READ_CASES: dict[str, tuple[Reply, type[Exception], str]] = {
    "content-range of another range": (lambda a, b, h: good(a + 1, b + 1), RemoteReplyError,
                                       "expected Content-Range: bytes 123456-323455/1000000"),
    "short body": (lambda a, b, h: good(a, b)[: -(b - a + 1) // 2], RemoteBackingError,
                   "; expected the server back within 0.3 s"),
    "200 to a range request": (
        lambda a, b, h: b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + DATA,
        RemoteBackingError, "found 200 (the server ignores Range)"),
    "an S3 error body with 206": (
        lambda a, b, h: xml_error("206 Partial Content", "InternalError"), RemoteReplyError,
        "expected Content-Range: bytes 123456-323455/1000000, found none"),
    "an S3 error body with 206 and a Content-Range": (
        lambda a, b, h: xml_error("206 Partial Content", "InternalError",
                                  f"Content-Range: bytes {a}-{b}/1000000\r\n"),
        RemoteReplyError, "expected Content-Length: 200000"),
    "503 SlowDown": (lambda a, b, h: xml_error("503 Slow Down", "SlowDown", "Retry-After: 0\r\n"),
                     RemoteBackingError, "(HTTP 503 SlowDown); expected the server back within "
                     "0.3 s"),
    "412 PreconditionFailed": (lambda a, b, h: xml_error("412 Precondition Failed",
                                                         "PreconditionFailed"),
                               RemoteChangedError, 'changed since this image was created: ETag '
                               '"v1", now different'),
    "403 AccessDenied": (lambda a, b, h: xml_error("403 Forbidden", "AccessDenied"),
                         RemoteAuthError, "access key AKIAFLEET (from the environment "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)): expected permission to "
                         "read the object (s3:GetObject), found access denied (HTTP 403 "
                         "AccessDenied)"),
    "400 ExpiredToken": (lambda a, b, h: xml_error("400 Bad Request", "ExpiredToken"),
                         RemoteAuthError, "expected credentials still valid, found expired"),
    "403 RequestTimeTooSkewed": (lambda a, b, h: xml_error("403 Forbidden",
                                                           "RequestTimeTooSkewed"),
                                 RemoteAuthError, "this host's clock"),
    "an unknown code": (lambda a, b, h: xml_error("409 Conflict", "Weird.Code"),
                        RemoteBackingError, "found HTTP 409 Weird.Code"),
    "an HTML page": (lambda a, b, h: b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                     b"Content-Length: 13\r\n\r\n<html></html>", RemoteReplyError,
                     "found HTTP 404 with no S3 error in its body (text/html)"),
    "a code past the bounded read": (lambda a, b, h: _error_body("AccessDenied", 64 << 10),
                                     RemoteReplyError, "no S3 error in its body"),
    "an endless error body": (
        lambda a, b, h: _stream(b"HTTP/1.1 403 Forbidden\r\n" + S3.encode() + b"\r\n<Error>",
                                64 << 20),
        RemoteReplyError, "no S3 error in its body"),
    "a code too long": (lambda a, b, h: _error_body("A" * 100_000), RemoteReplyError,
                        "no S3 error in its body"),
    "a code with markup": (lambda a, b, h: _error_body("<!ENTITY x 'y'>"), RemoteReplyError,
                           "no S3 error in its body"),
    "another version": (lambda a, b, h: good(a, b, "x-amz-version-id: v2\r\n"),
                        RemoteReplyError, "asked for version v1, the reply is of version v2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(READ_CASES))
def test_hostile_read(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reply, error, message = READ_CASES[case]
    version = "v1" if case == "another version" else None
    with s3_server(reply, s3_probe(version), monkeypatch=monkeypatch) as server:
        store = S3Store.open(URI, timeout=0.5, retry=RetryPolicy(0.3))
        try:
            tracemalloc.start()
            start = time.monotonic()
            try:
                with pytest.raises(error, match=re.escape(message)) as info:
                    _read(store, 123_456, 200_000)
            finally:
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            assert time.monotonic() - start < 5
            assert peak < 4 << 20, peak
            assert "\n" not in str(info.value) and SECRET not in str(info.value)
            assert info.value.__cause__ is None
            if "server back" not in message:
                assert len(server.requests) == 2  # the probe and one read: no retry
        finally:
            store.close()


def test_throttled_then_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """503 SlowDown twice, with Retry-After: the read waits and gets the right bytes."""
    failures = [xml_error("503 Slow Down", "SlowDown", "Retry-After: 0\r\n")] * 2

    def reply(first: int, last: int, headers: dict[str, str]) -> bytes:
        return failures.pop() if failures else good(first, last)

    with s3_server(reply, monkeypatch=monkeypatch) as server:
        store = S3Store.open(URI, retry=RetryPolicy(10))
        try:
            assert _read(store, 500, 70_000) == DATA[500:70_500]
        finally:
            store.close()
    assert len(server.requests) == 4
    dates = {r["x-amz-date"] for r in server.requests}
    assert all(r["authorization"] for r in server.requests) and dates  # each attempt signed


PROBE_CASES: dict[str, tuple[Reply, type[Exception], str]] = {
    "not S3": (lambda a, b, h: good(a, b), RemoteReplyError,
               "expected an S3 server at http://127.0.0.1:"),
    "no ETag": (lambda a, b, h: good(a, b, S3, etag=None), RemoteReplyError,
                "expected a strong ETag, as S3 sends for every object, found none"),
    "a version ID with spaces": (lambda a, b, h: good(a, b, S3 + "x-amz-version-id: a b\r\n"),
                                 RemoteReplyError, "expected a version ID of printable "
                                 "characters, found a b"),
    "SignatureDoesNotMatch": (lambda a, b, h: xml_error("403 Forbidden",
                                                        "SignatureDoesNotMatch"),
                              RemoteAuthError, "access key AKIAFLEET (from the environment "
                              "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)): expected its secret "
                              "key, found another"),
    "NoSuchBucket": (lambda a, b, h: xml_error("404 Not Found", "NoSuchBucket"),
                     RemoteBackingError, "expected a bucket 'golden' at http://127.0.0.1:"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_hostile_probe(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reply, error, message = PROBE_CASES[case]
    with (s3_server(reply, reply, monkeypatch=monkeypatch),
          pytest.raises(error, match=re.escape(message)) as info):  # fmt: skip
        S3Store.open(URI, timeout=0.5, retry=RetryPolicy(0.3))
    assert "\n" not in str(info.value) and SECRET not in str(info.value)


def test_a_changed_etag_at_open_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with s3_server(lambda a, b, h: good(a, b), monkeypatch=monkeypatch), \
            pytest.raises(RemoteChangedError, match='ETag "v0", now "v1"'):  # fmt: skip
        S3Store.open(URI, pin=HTTPPin(len(DATA), '"v0"', None, None))


def test_the_chain_and_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1:1")
    with pytest.raises(RemoteBackingError, match=re.escape(
            "expected an http(s) S3 endpoint URL without a query (AWS_ENDPOINT_URL), "
            "found ftp://127.0.0.1:1")):  # fmt: skip
        S3Store.open(URI)
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(RemoteBackingError, match="expected a usable AWS configuration, found: "
                       "The config profile \\(nobody\\) could not be found"):  # fmt: skip
        S3Store.open(URI)


def test_missing_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_package(monkeypatch, "botocore")
    with pytest.raises(AddCowError) as info:
        S3Store.open(URI)
    assert str(info.value) == (
        "s3 backing files need botocore; install the 's3' extra: "
        "pip install 'addcow[s3]' (from a checkout: pip install '.[s3]')"
    )


def test_s3_uri_records() -> None:
    pinned = BackingURI("s3://golden/g.raw", 10, '"abc-2"', None, "0123456789abcdef" * 4,
                        "3sL4kqtJlcpXroDT+MTRCxf3/vjVBH4")  # fmt: skip
    assert pinned.encode() == (b's3://golden/g.raw\nsize=10\netag="abc-2"\nsha256='
                               + b"0123456789abcdef" * 4
                               + b"\nversion-id=3sL4kqtJlcpXroDT+MTRCxf3/vjVBH4")  # fmt: skip
    assert BackingURI.decode(pinned.encode()) == pinned
    for raw, problem in (
        (b"s3://golden/g.raw\nsize=1\nlast-modified=x",
         "expected only size=, etag=, version-id=, sha256= in the record of a s3:// URI"),
        (b"https://h/g.raw\nsize=1\nversion-id=x",
         "expected only size=, etag=, last-modified=, sha256= in the record of a https:// URI"),
        (b"s3://golden/g.raw\nsize=1\nversion-id=a\nversion-id=b", "once each"),
        (b"s3://golden/g.raw\nsize=1\nversion-id=", "once each"),
    ):  # fmt: skip
        with pytest.raises(RemoteBackingError, match=re.escape(problem)):
            BackingURI.decode(raw)
