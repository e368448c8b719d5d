"""bench_remote's S3 side: a Ceph RADOS Gateway of its own, and the parallel range-GET floor.

:class:`RGW` starts the single-node Ceph cluster of the test suite
(``tests/ceph_util.py``, loaded from there, not copied) under a directory of
the benchmark, makes a bucket with a botocore client of the user ``alice``,
and gives the environment a host of the fleet would have: her keys and the
gateway's endpoint in ``AWS_*`` variables, no AWS files, no instance metadata
(``addcow`` and the floor both read it). Leaving it stops the cluster and
removes its directory.

The floor (``python s3_golden.py floor BUCKET KEY SIZE [--out FILE]``) reads
an object the way ``aws s3 cp`` does: the object cut into ``--part`` byte
ranges (8 MiB, the CLI's chunk size), ``--connections`` of them in flight (10,
its default concurrency), each a ``GET`` with ``Range`` signed with
botocore's ``S3SigV4Auth`` on a pooled urllib3 connection. Without ``--out``
the bytes go nowhere (the network and the gateway alone); with it each part is
written at its offset (``pwrite``) and the file made durable (``fdatasync``)
before the command ends.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import botocore.session
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

MiB = 1 << 20
REGION = "us-east-1"
TESTS = Path(__file__).resolve().parent.parent / "tests"
HERE = Path(__file__).resolve()


def ceph_util() -> ModuleType:
    """tests/ceph_util.py, the cluster the test suite runs."""
    if "ceph_util" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ceph_util", TESTS / "ceph_util.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ceph_util"] = module  # its dataclasses look themselves up here
        spec.loader.exec_module(module)
    return sys.modules["ceph_util"]


class RGW:
    """A bucket on a running gateway, and the environment that reads it."""

    def __init__(self, ceph: Any, work: Path) -> None:
        access, secret = ceph.keys["alice"]
        self.endpoint: str = ceph.endpoint
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(work / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
        }  # fmt: skip
        self.client = botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access, aws_secret_access_key=secret,
            config=Config(signature_version="s3v4"),
        )  # fmt: skip
        self.bucket = f"golden-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=self.bucket)

    def upload(self, path: Path, key: str) -> str:
        """Put the file ``path`` as ``key`` (once per run); its ``s3://`` URI."""
        with open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=f)
        return f"s3://{self.bucket}/{key}"

    def presigned(self, key: str) -> str:
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=3600))  # fmt: skip

    def floor(self, key: str, size: int, out: Path | None = None) -> list[str]:
        """The floor's command line for ``key`` (``size`` bytes), into ``out`` or nowhere."""
        cmd = [sys.executable, str(HERE), "floor", self.bucket, key, str(size)]
        return [*cmd, "--out", str(out)] if out is not None else cmd


@contextmanager
def rgw(work: Path) -> Iterator[RGW]:
    """A cluster under ``work/ceph`` with a bucket; the process's environment is the
    fleet's while it runs (restored after)."""
    saved = dict(os.environ)
    with ceph_util().ceph_cluster(work / "ceph") as ceph:
        gateway = RGW(ceph, work)
        os.environ.update(gateway.env)
        try:
            yield gateway
        finally:
            os.environ.clear()
            os.environ.update(saved)


def fetch(bucket: str, key: str, size: int, out: str | None, connections: int,
          part: int) -> None:  # fmt: skip
    """Read the object in parts, ``connections`` at a time (the module's docstring)."""
    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise SystemExit("floor: no AWS credentials in the environment")
    frozen = credentials.get_frozen_credentials()
    region = session.get_config_variable("region") or REGION
    endpoint = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
    url = f"{endpoint}/{bucket}/{key}"
    pool = urllib3.PoolManager(maxsize=connections, block=True, retries=False)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if out else -1
    offsets = iter(range(0, size, part))
    lock = threading.Lock()
    errors: list[str] = []

    def worker() -> None:
        while not errors:
            with lock:
                start = next(offsets, None)
            if start is None:
                return
            end = min(start + part, size) - 1
            request = AWSRequest(method="GET", url=url, headers={"Range": f"bytes={start}-{end}"})
            S3SigV4Auth(frozen, "s3", region).add_auth(request)
            resp = pool.request("GET", url, headers=dict(request.headers.items()))
            if resp.status != 206 or len(resp.data) != end - start + 1:
                errors.append(f"bytes {start}-{end}: HTTP {resp.status}, {len(resp.data)} bytes")
            elif fd >= 0:
                os.pwrite(fd, resp.data, start)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if fd >= 0:
        os.fdatasync(fd)
        os.close(fd)
    if errors:
        raise SystemExit(f"floor: {url}: {errors[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    floor = sub.add_parser("floor", help="read an object as aws s3 cp does")
    floor.add_argument("bucket")
    floor.add_argument("key")
    floor.add_argument("size", type=int)
    floor.add_argument("--out", help="write it here and fdatasync (else: nowhere)")
    floor.add_argument("--connections", type=int, default=10)
    floor.add_argument("--part", type=int, default=8 * MiB)
    args = parser.parse_args(argv)
    fetch(args.bucket, args.key, args.size, args.out, args.connections, args.part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
