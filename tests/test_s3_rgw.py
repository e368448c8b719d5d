"""s3:// golden images on a real S3 server: Ceph's RADOS Gateway (tests/ceph_util.py).

Every test runs the way a fleet does: the credentials, the endpoint and the
region come from the environment (variables, a profile in a credentials file,
or an instance-metadata server on loopback), never from the image, whose
bytes are checked for them. The golden image is uploaded with botocore; the
commands read it as a user would, with QEMU as referee where it reads the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from ceph_util import Ceph, Gateway
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from http_util import nginx_server
from nbd_util import served

import addcow
from addcow.errors import (
    RemoteAuthError,
    RemoteBackingError,
    RemoteChangedError,
    RemoteReplyError,
)
from addcow.image import AddCowImage
from addcow.stores.remote import BackingURI
from addcow.stores.remote.s3 import S3Store

SIZE = 4 << 20
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_DISABLED",
)  # fmt: skip


def golden_bytes(seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(SIZE)


@pytest.fixture
def aws(ceph: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ceph:
    """An environment with alice's keys and the gateway's endpoint in variables, and
    nothing else of AWS's: no files, no instance metadata."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", ceph.endpoint)
    access, secret = ceph.keys["alice"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return ceph


def client(ceph: Ceph, endpoint: str | None = None) -> Any:
    """A botocore S3 client of alice's, to upload golden images as a fleet would."""
    access, secret = ceph.keys["alice"]
    return botocore.session.Session().create_client(
        "s3", endpoint_url=endpoint or ceph.endpoint, region_name="us-east-1",
        aws_access_key_id=access, aws_secret_access_key=secret,
    )  # fmt: skip


def bucket(s3: Any, versioned: bool = False) -> str:
    name = f"golden-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def image_over(tmp_path: Path, uri: str, name: str = "d") -> Path:
    addcow_cli("create", "-q", "-b", uri, "-F", "raw", "-o", f"image_file={name}.raw",
               tmp_path / f"{name}.add-cow")  # fmt: skip
    return tmp_path / f"{name}.add-cow"


def record(image: Path) -> BackingURI:
    with AddCowImage.open(image, readonly=True, with_backing=False) as img:
        assert img.header.backing_name is not None
        return BackingURI.decode(img.header.backing_name)


def refused(args: tuple[str | Path, ...], message: str) -> str:
    """Run a command that must fail with one ``addcow:`` line containing ``message``."""
    proc = addcow_cli(*args, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("addcow: "), proc.stderr
    return proc.stderr


def identical(a: Path | str, b: Path | str) -> None:
    compared = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(a), str(b)])
    assert compared.stdout == "Images are identical.\n"


def test_every_command_over_an_s3_golden_image(aws: Ceph, tmp_path: Path) -> None:
    """create, io, convert, serve, stream, detach with keys from environment variables."""
    s3 = client(aws)
    name, data = bucket(s3), golden_bytes()
    s3.put_object(Bucket=name, Key="debian 12.raw", Body=data)
    uri = f"s3://{name}/debian%2012.raw"
    image = image_over(tmp_path, uri)
    ref = record(image)
    assert (ref.uri, ref.size, ref.version_id) == (uri, SIZE, None)
    assert ref.etag is not None and ref.etag.startswith('"')
    access, secret = aws.keys["alice"]
    meta = image.read_bytes()
    for secret_thing in (secret, access, aws.endpoint, aws.endpoint.rsplit(":", 1)[1]):
        assert secret_thing.encode() not in meta
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["backing-filename"] == uri
    assert info["format-specific"]["data"]["backing-pin"] == {"size": SIZE, "etag": ref.etag}
    addcow_cli("io", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1000000 5000", image)
    expected = bytearray(data)
    expected[:65536] = b"\xab" * 65536
    expected[1000000:1005000] = b"\xcd" * 5000
    (tmp_path / "expected.raw").write_bytes(expected)
    addcow_cli("convert", image, tmp_path / "full.raw")
    identical(tmp_path / "full.raw", tmp_path / "expected.raw")
    with served(tmp_path, image, args=("--read-only",)) as srv:
        identical(srv.uri, tmp_path / "expected.raw")
    addcow_cli("stream", image)
    addcow_cli("detach", image)
    assert not image.exists()
    identical(tmp_path / "d.raw", tmp_path / "expected.raw")


def test_credentials_and_endpoint_from_a_profile(
    aws: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = client(aws)
    name, data = bucket(s3), golden_bytes(8)
    s3.put_object(Bucket=name, Key="g.raw", Body=data)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(variable)
    access, secret = aws.keys["bob"]  # bob may not read alice's bucket...
    credentials, config = tmp_path / "credentials", tmp_path / "config"
    credentials.write_text(f"[fleet]\naws_access_key_id = {access}\n"
                           f"aws_secret_access_key = {secret}\n")  # fmt: skip
    config.write_text(f"[profile fleet]\nregion = eu-west-3\nendpoint_url = {aws.endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "fleet")
    uri = f"s3://{name}/g.raw"
    message = refused(("create", "-b", uri, "-F", "raw", tmp_path / "d.add-cow"),
                      f"access key {access} (from shared-credentials-file): expected "
                      "permission to read the object (s3:GetObject), found access denied "
                      "(HTTP 403 AccessDenied)")  # fmt: skip
    assert secret not in message and not (tmp_path / "d.add-cow").exists()
    access, secret = aws.keys["alice"]  # ... alice may
    credentials.write_text(f"[fleet]\naws_access_key_id = {access}\n"
                           f"aws_secret_access_key = {secret}\n")  # fmt: skip
    image = image_over(tmp_path, uri)
    assert secret.encode() not in image.read_bytes()
    addcow_cli("convert", image, tmp_path / "full.raw")
    assert (tmp_path / "full.raw").read_bytes() == data


class CredentialServer:
    """A fake credential service on loopback, as a fleet's hosts have: EC2's instance
    metadata (IMDSv2: a session token for a PUT, then the role's credentials) and a
    container's credentials endpoint (``/container``); the test changes the keys."""

    def __init__(self) -> None:
        self.credentials: dict[str, str] = {}
        self.fetched: list[str] = []
        self.token = uuid.uuid4().hex
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: str) -> None:
                raw = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_PUT(self) -> None:
                if self.path == "/latest/api/token":
                    self._send(200, meta.token)
                else:
                    self._send(404, "")

            def do_GET(self) -> None:
                if self.path == "/container":
                    meta.fetched.append(meta.credentials["AccessKeyId"])
                    self._send(200, json.dumps(meta.credentials))
                elif self.headers.get("X-aws-ec2-metadata-token") != meta.token:
                    self._send(401, "")
                elif self.path == "/latest/meta-data/iam/security-credentials/":
                    self._send(200, "golden-reader")
                elif self.path == "/latest/meta-data/iam/security-credentials/golden-reader":
                    meta.fetched.append(meta.credentials["AccessKeyId"])
                    self._send(200, json.dumps(meta.credentials))
                else:
                    self._send(404, "")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, access: str, secret: str, expires_in: timedelta) -> None:
        expiry = (datetime.now(UTC) + expires_in).strftime("%Y-%m-%dT%H:%M:%SZ")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # RGW takes a session token for an STS one: these keys are a user's, so none.
        self.credentials = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": access,
                            "SecretAccessKey": secret, "Token": "", "Expiration": expiry,
                            "LastUpdated": now}  # fmt: skip

    def __enter__(self) -> CredentialServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextmanager
def extra_keys(ceph: Ceph, n: int) -> Iterator[list[tuple[str, str]]]:
    """``n`` more S3 keys of alice's, removed on exit (those still there)."""
    keys = [(f"TEMP{uuid.uuid4().hex[:12].upper()}", uuid.uuid4().hex) for _ in range(n)]
    for access, secret in keys:
        ceph.admin("key", "create", "--uid=alice", "--key-type=s3", f"--access-key={access}",
                   f"--secret-key={secret}")  # fmt: skip
    try:
        yield keys
    finally:
        listed = json.loads(ceph.admin("user", "info", "--uid=alice"))["keys"]
        for access, _ in keys:
            if any(k["access_key"] == access for k in listed):
                ceph.admin("key", "rm", "--uid=alice", "--key-type=s3", f"--access-key={access}")


def without_static_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(variable)


def test_credentials_from_instance_metadata(
    aws: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = client(aws)
    name, data = bucket(s3), golden_bytes(9)
    s3.put_object(Bucket=name, Key="g.raw", Body=data)
    without_static_keys(monkeypatch)
    with CredentialServer() as imds, extra_keys(aws, 1) as keys:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
        imds.serve(*keys[0], timedelta(hours=6))
        image = image_over(tmp_path, f"s3://{name}/g.raw")
        addcow_cli("convert", image, tmp_path / "full.raw")
        assert imds.fetched == [keys[0][0]] * 2  # one process each
    assert (tmp_path / "full.raw").read_bytes() == data
    assert keys[0][1].encode() not in image.read_bytes()


def test_expiring_credentials_refreshed_while_reading(
    aws: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container role's keys near their expiry while the store reads: botocore
    fetches new ones ahead of it (15 minutes), the old key is then revoked, and every
    read still gets the golden image's bytes, with no error in between."""
    s3 = client(aws)
    name, data = bucket(s3), golden_bytes(9)
    s3.put_object(Bucket=name, Key="g.raw", Body=data)
    without_static_keys(monkeypatch)
    with CredentialServer() as role, extra_keys(aws, 2) as keys:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", role.endpoint + "container")
        role.serve(*keys[0], timedelta(minutes=15, seconds=3))
        store = S3Store.open(f"s3://{name}/g.raw")
        try:
            buf = bytearray(65536)
            store.readinto(memoryview(buf), 0)
            assert buf == data[:65536]
            assert role.fetched == [keys[0][0]]
            role.serve(*keys[1], timedelta(hours=6))
            time.sleep(3.5)  # the first keys now expire within 15 minutes
            store.readinto(memoryview(buf), 1 << 20)
            assert buf == data[1 << 20 : (1 << 20) + 65536]
            assert role.fetched == [keys[0][0], keys[1][0]]
            aws.admin("key", "rm", "--uid=alice", "--key-type=s3", f"--access-key={keys[0][0]}")
            store.readinto(memoryview(buf), 3 << 20)
            assert buf == data[3 << 20 : (3 << 20) + 65536]
        finally:
            store.close()


def test_a_versioned_key_overwritten_after_create_still_reads_its_version(
    aws: Ceph, tmp_path: Path
) -> None:
    s3 = client(aws)
    name, first, second = bucket(s3, versioned=True), golden_bytes(10), golden_bytes(11)
    version = s3.put_object(Bucket=name, Key="g.raw", Body=first)["VersionId"]
    uri = f"s3://{name}/g.raw"
    image = image_over(tmp_path, uri)
    ref = record(image)
    assert ref.version_id == version and ref.etag is not None
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["backing-pin"]["version-id"] == version
    s3.put_object(Bucket=name, Key="g.raw", Body=second)
    addcow_cli("convert", image, tmp_path / "full.raw")
    assert (tmp_path / "full.raw").read_bytes() == first
    # the version deleted: refused as a change, nothing copied
    s3.delete_object(Bucket=name, Key="g.raw", VersionId=version)
    refused(("convert", image, tmp_path / "x.raw"),
            f"expected its version {version}, found that version gone (HTTP 404 NoSuch")
    # re-pinned on the user's word: the current version
    addcow_cli("rebase", "-u", "-b", uri, image)
    assert record(image).version_id not in (None, version)
    addcow_cli("convert", image, tmp_path / "now.raw")
    assert (tmp_path / "now.raw").read_bytes() == second


def test_an_unversioned_object_changed_is_refused_then_repinned(aws: Ceph, tmp_path: Path) -> None:
    s3 = client(aws)
    name, data = bucket(s3), golden_bytes(12)
    s3.put_object(Bucket=name, Key="g.raw", Body=data)
    uri = f"s3://{name}/g.raw"
    digest = hashlib.sha256(data).hexdigest()
    addcow_cli("create", "-q", "-b", uri, "-F", "raw", tmp_path / "d.add-cow")
    image = tmp_path / "d.add-cow"
    addcow_cli("rebase", "-b", uri, "--backing-sha256", digest, image)
    before = record(image)
    assert before.sha256 == digest and before.version_id is None
    # the same bytes uploaded again as a multipart object (of one part): another ETag
    upload = s3.create_multipart_upload(Bucket=name, Key="g.raw")["UploadId"]
    etag = s3.upload_part(Bucket=name, Key="g.raw", UploadId=upload, PartNumber=1,
                          Body=data)["ETag"]  # fmt: skip
    parts = {"Parts": [{"ETag": etag, "PartNumber": 1}]}
    s3.complete_multipart_upload(Bucket=name, Key="g.raw", UploadId=upload, MultipartUpload=parts)
    meta = image.read_bytes()
    refused(("convert", image, tmp_path / "x.raw"),
            f"the golden image at {uri} changed since this image was created: ETag "
            f"{before.etag}, now")  # fmt: skip
    assert image.read_bytes() == meta
    # the safe re-pin reads the whole object at its new ETag and checks the digest
    addcow_cli("rebase", "-b", uri, image)
    after = record(image)
    assert after.etag != before.etag and after.sha256 == digest
    with addcow.open(image, readonly=True) as img:
        assert img.read(0, SIZE) == data
    # changed content: refused by the digest; the image is left as it was
    s3.put_object(Bucket=name, Key="g.raw", Body=golden_bytes(13))
    meta = image.read_bytes()
    refused(("rebase", "-b", uri, image), f"expected the golden image's SHA-256 {digest}")
    assert image.read_bytes() == meta
    with pytest.raises(RemoteChangedError, match="changed since this image was created"):
        addcow.open(image, readonly=True)


def test_errors_a_fleet_meets_are_one_line_each(
    aws: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = client(aws)
    name = bucket(s3)
    s3.put_object(Bucket=name, Key="g.raw", Body=golden_bytes(14))
    target = tmp_path / "d.add-cow"
    create = ("create", "-b", f"s3://{name}/g.raw", "-F", "raw", target)
    access, secret = aws.keys["alice"]
    refused(("create", "-b", f"s3://{name}/nope.raw", "-F", "raw", target),
            f"expected an object 'nope.raw' in bucket '{name}', found none "
            "(HTTP 404 NoSuchKey)")  # fmt: skip
    with pytest.raises(RemoteBackingError, match=re.escape(
            "expected a bucket 'no-such-bucket-here' at http://127.0.0.1:")):  # fmt: skip
        S3Store.open("s3://no-such-bucket-here/g.raw")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret[::-1])
    message = refused(create, f"access key {access} (from the environment (AWS_ACCESS_KEY_ID, "
                      "AWS_SECRET_ACCESS_KEY)): expected its secret key, found another: the "
                      "server refused the signature (HTTP 403 SignatureDoesNotMatch)")  # fmt: skip
    assert secret[::-1] not in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY")
    with pytest.raises(RemoteAuthError, match=re.escape(
            "access key AKIAUNKNOWNKEY (from the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY)): expected an access key the server at")):  # fmt: skip
        S3Store.open(f"s3://{name}/g.raw")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = refused(create, f"s3://{name}/g.raw: expected AWS credentials, found none; "
                      "looked in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), ")
    assert f"{tmp_path / 'no-aws-credentials'} (profile default), " in message
    assert "the instance metadata service (disabled by AWS_EC2_METADATA_DISABLED)" in message
    assert not target.exists()
    # an endpoint that is not S3: nginx answering with its own pages
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    www = tmp_path / "www"
    (www / name).mkdir(parents=True)
    (www / name / "g.raw").write_bytes(b"x" * 4096)
    with nginx_server(www, tmp_path / "nginx") as web:
        monkeypatch.setenv("AWS_ENDPOINT_URL", web.url)
        for key, found in (("none.raw", "HTTP 404 with no S3 error in its body (text/html)"),
                           ("g.raw", "a reply without x-amz-request-id (HTTP 206)")):
            with pytest.raises(RemoteReplyError, match=re.escape(
                    f"expected an S3 server at {web.url} (AWS_ENDPOINT_URL), found {found}")):
                S3Store.open(f"s3://{name}/{key}")
    for bad, problem in (("s3://Golden/g.raw", "expected a bucket name"),
                         ("s3://golden", "found no key"), ("s3://golden/", "found no key"),
                         ("s3://golden/g.raw?versionId=1", "expected no query"),
                         ("s3://golden:9000/g.raw", "expected a bucket name"),
                         ("s3://AKIA:secret@golden/g.raw", "credentials come from the "
                          "environment")):  # fmt: skip
        with pytest.raises(RemoteBackingError, match=problem):
            S3Store.open(bad)


def test_a_stream_rides_out_the_gateway_restarting(
    aws: Ceph, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway of this test's own is stopped while ``addcow stream`` reads from it and
    started again: the stream completes, and the disk is the object's bytes."""
    size = 32 << 20
    data = random.Random(15).randbytes(size)
    (tmp_path / "golden.raw").write_bytes(data)
    with Gateway(aws, "restart") as gateway:
        s3 = client(aws, gateway.endpoint)
        name = bucket(s3)
        s3.put_object(Bucket=name, Key="g.raw", Body=data)
        monkeypatch.setenv("AWS_ENDPOINT_URL", gateway.endpoint)
        monkeypatch.setenv("ADDCOW_RECONNECT_DELAY", "60")
        image = image_over(tmp_path, f"s3://{name}/g.raw")
        stream = subprocess.Popen(
            [sys.executable, "-m", "addcow", "stream", "--rate", "8M", str(image)],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            gateway.stop()
            time.sleep(1.0)
            assert stream.poll() is None, "the stream failed instead of waiting"
            gateway.start()
            _, err = stream.communicate(timeout=120)
        finally:
            if stream.poll() is None:
                stream.kill()
                stream.wait()
        assert stream.returncode == 0, err
    identical(tmp_path / "d.raw", tmp_path / "golden.raw")

