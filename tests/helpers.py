"""Helpers shared by several test modules (so that no test module imports another).

* hand-made .add-cow headers, laid out by the specification's tables
  (test_format.py, tests/corpus/make_corpus.py);
* qemu-io's timing lines filtered as qemu-iotests filters them (test_io.py,
  test_interop_qemu.py);
* an optional package made unimportable, as on a machine without it
  (test_http_store.py, test_s3_store.py).
"""

from __future__ import annotations

import builtins
import re
import struct

import pytest

MAGIC = b"ADD_COW\xff"
MiB = 1 << 20

# The spec table: field -> (byte offset, struct format). Little endian.
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, "8s"),
    "version": (8, "<I"),
    "backing_filename_offset": (12, "<I"),
    "backing_filename_size": (16, "<I"),
    "image_filename_offset": (20, "<I"),
    "image_filename_size": (24, "<I"),
    "features": (28, "<Q"),
    "compatible_features": (36, "<Q"),
    "autoclear_features": (44, "<Q"),
    "header_size": (52, "<I"),
    "cluster_bits": (56, "<I"),
    "image_size": (60, "<Q"),
    "backing_format": (68, "16s"),
}
V1_NAMES = 36
V2_NAMES = 84


def peek(buf: bytes, field: str) -> object:
    offset, fmt = FIELDS[field]
    return struct.unpack_from(fmt, buf, offset)[0]


def poke(buf: bytearray, field: str, value: object) -> bytearray:
    offset, fmt = FIELDS[field]
    struct.pack_into(fmt, buf, offset, value)
    return buf


def v2_header(
    *,
    backing: bytes | None = b"base.raw",
    image: bytes = b"disk.raw",
    fmt: bytes = b"raw",
    header_size: int = 4096,
    cluster_bits: int = 16,
    image_size: int = MiB,
    names_at: int = V2_NAMES,
) -> bytearray:
    """A valid version 2 header: backing name then image name from ``names_at``."""
    buf = bytearray(header_size)
    b_off = b_len = 0
    pos = names_at
    if backing is not None:
        b_off, b_len = pos, len(backing)
        buf[pos : pos + b_len] = backing
        pos += b_len
    i_off, i_len = pos, len(image)
    buf[pos : pos + i_len] = image
    struct.pack_into("<8sIIIIIQ", buf, 0, MAGIC, 2, b_off, b_len, i_off, i_len, 0)
    struct.pack_into(
        "<QQIIQ16s", buf, 36, 0, 0, header_size, cluster_bits, image_size,
        fmt if backing is not None else b"",
    )
    return buf


def v1_header(
    *, backing: bytes | None = b"base.raw", image: bytes = b"disk.raw", features: int | None = None
) -> bytearray:
    """A valid version 1 header (BACKING_FILE and NO_PROBE set when there is a backing)."""
    buf = bytearray(4096)
    b_off = b_len = 0
    pos = V1_NAMES
    if backing is not None:
        b_off, b_len = pos, len(backing)
        buf[pos : pos + b_len] = backing
        pos += b_len
    i_off, i_len = pos, len(image)
    buf[pos : pos + i_len] = image
    if features is None:
        features = 0x03 if backing is not None else 0
    struct.pack_into("<8sIIIIIQ", buf, 0, MAGIC, 1, b_off, b_len, i_off, i_len, features)
    return buf



# -- qemu-io output ------------------------------------------------------------------

T = "XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"
_TIMING = re.compile(
    r"^(?P<size>\S+ \S+), (?P<ops>\d+) ops; (?:\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) "
    r"\(\S+ \S+/sec and \S+ ops/sec\)$",
    re.M,
)
_TIMING_C = re.compile(r"^(?P<n>\d+),(?P<ops>\d+),\d+:\d\d:\d\d\.\d\d,\S+,\S+$", re.M)


def filter_timing(text: str) -> str:
    """Replace the measured part of qemu-io's timing lines, keep the byte counts."""
    text = _TIMING.sub(rf"\g<size>, \g<ops> ops; {T}", text)
    return _TIMING_C.sub(r"\g<n>,\g<ops>,X:XX:XX.X,XXX,XXX", text)


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` (and its submodules) fail to import until the test ends."""
    real = builtins.__import__

    def fake(name: str, *args: object, **kwargs: object) -> object:
        if name == package or name.startswith(package + "."):
            raise ImportError(name)
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", fake)
