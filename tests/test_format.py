"""Byte-level tests of the .add-cow header against the specification's tables.

The first half checks, field by field, that :class:`addcow.Header` puts each
value at the byte offset the specification gives (little endian) and reads it
back. The second half builds broken images by hand, qemu-iotests style: a
valid header is assembled with ``struct.pack`` from the spec table below (not
from ``addcow.format``), then one field is poked. There is one named test per
malformed case, after a control case that must keep opening. Each asserts the
exact exception class and that the message names the field, what was expected
and what was found.

Spec table, bytes 0-83 (version 1 uses bytes 0-35 only)::

    offset  size  field
         0     8  magic                      "ADD_COW\\xff"
         8     4  version                    1 or 2
        12     4  backing_filename_offset
        16     4  backing_filename_size
        20     4  image_filename_offset
        24     4  image_filename_size
        28     8  features (v1) / incompatible_features (v2)
        36     8  compatible_features        v2
        44     8  autoclear_features         v2
        52     4  header_size                v2
        56     4  cluster_bits               v2
        60     8  image_size                 v2
        68    16  backing_format             v2, ASCII, NUL padded
        84     .  names (v2; version 1 names start at 36)
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from helpers import MAGIC, V1_NAMES, V2_NAMES, MiB, peek, poke, v1_header, v2_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import addcow
from addcow import (
    AddCowError,
    BackingError,
    BackingFormatError,
    BitmapError,
    Header,
    HeaderError,
    ImageFileError,
    UnsupportedFeatureError,
)


def base_content(size: int = MiB) -> bytes:
    return bytes((i // 4096 + 1) & 0xFF for i in range(size))


@pytest.fixture
def d(tmp_path: Path) -> Path:
    """A directory with base.raw (1 MiB of data) and a 1 MiB disk.raw."""
    (tmp_path / "base.raw").write_bytes(base_content())
    with open(tmp_path / "disk.raw", "wb") as f:
        f.truncate(MiB)
    return tmp_path


def put(directory: Path, header: bytes, bitmap: bytes = b"\0\0") -> Path:
    """Write ``header`` + ``bitmap`` as disk.add-cow (default bitmap: 16 clusters)."""
    path = directory / "disk.add-cow"
    path.write_bytes(bytes(header) + bitmap)
    return path


def open_fails(path: Path, cls: type[AddCowError], *fragments: str, **kw: bool) -> AddCowError:
    """Open ``path``; require exactly ``cls`` and every fragment in the message."""
    with pytest.raises(AddCowError) as info:
        addcow.open(path, **kw)
    exc = info.value
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return exc


def header_fails(
    path: Path, cls: type[HeaderError], field: str, expected: str, found: str, **kw: bool
) -> None:
    """A header error: the message names the field, the expected and the found value."""
    exc = open_fails(
        path, cls, str(path), f"field {field}:", f"expected {expected}", f"found {found}", **kw
    )
    assert isinstance(exc, HeaderError)
    assert exc.field == field
    assert exc.path == str(path)


# == Layout: each field at its byte offset =========================================


def test_v2_pack_puts_every_field_at_its_spec_offset() -> None:
    h = Header(
        version=2,
        image_name=b"test.raw",
        backing_name=b"ubuntu.img",
        backing_format="raw",
        image_size=0x0102030405060708,
        cluster_bits=30,
        header_size=8192,
        compatible_features=0x1122334455667701,
        autoclear_features=0,
    )
    raw = h.pack()
    assert len(raw) == 8192
    assert raw[0:8] == b"ADD_COW\xff"
    assert raw[8:12] == b"\x02\x00\x00\x00"
    assert raw[12:16] == (84).to_bytes(4, "little")
    assert raw[16:20] == (10).to_bytes(4, "little")
    assert raw[20:24] == (94).to_bytes(4, "little")
    assert raw[24:28] == (8).to_bytes(4, "little")
    assert raw[28:36] == bytes(8)
    assert raw[36:44] == bytes.fromhex("0177665544332211")  # little endian
    assert raw[44:52] == bytes(8)
    assert raw[52:56] == bytes.fromhex("00200000")
    assert raw[56:60] == bytes.fromhex("1e000000")
    assert raw[60:68] == bytes.fromhex("0807060504030201")
    assert raw[68:84] == b"raw" + bytes(13)
    assert raw[84:94] == b"ubuntu.img"
    assert raw[94:102] == b"test.raw"
    assert raw[102:] == bytes(8192 - 102), "every other header byte is zero"


def test_v2_pack_without_backing_leaves_backing_fields_zero() -> None:
    raw = Header(version=2, image_name=b"x.raw", image_size=4096, cluster_bits=12).pack()
    assert peek(raw, "backing_filename_offset") == 0
    assert peek(raw, "backing_filename_size") == 0
    assert peek(raw, "image_filename_offset") == V2_NAMES
    assert peek(raw, "image_filename_size") == 5
    assert peek(raw, "backing_format") == bytes(16)
    assert peek(raw, "cluster_bits") == 12
    assert peek(raw, "header_size") == 4096
    assert raw[84:89] == b"x.raw"
    assert raw[89:] == bytes(4096 - 89)


def test_v1_pack_is_the_seed_layout() -> None:
    raw = Header(
        version=1, image_name=b"test.raw", backing_name=b"ubuntu.img", backing_format="raw"
    ).pack()
    assert len(raw) == 4096
    assert raw[0:8] == MAGIC
    assert peek(raw, "version") == 1
    assert raw[12:16] == b"\x24\x00\x00\x00"  # backing name right after the fields: 36
    assert peek(raw, "backing_filename_size") == 10
    assert peek(raw, "image_filename_offset") == 46
    assert peek(raw, "image_filename_size") == 8
    assert raw[28:36] == b"\x03" + bytes(7)  # BACKING_FILE | BACKING_FORMAT_NO_PROBE
    assert raw[36:46] == b"ubuntu.img"
    assert raw[46:54] == b"test.raw"
    assert raw[54:] == bytes(4096 - 54)


def test_v1_pack_without_backing_sets_no_feature_bit() -> None:
    raw = Header(version=1, image_name=b"test.raw").pack()
    assert peek(raw, "features") == 0
    assert peek(raw, "backing_filename_offset") == 0
    assert peek(raw, "backing_filename_size") == 0
    assert peek(raw, "image_filename_offset") == 36


def test_v2_unpack_of_a_hand_built_header_reads_every_field() -> None:
    buf = v2_header(image_size=3 * MiB + 5, cluster_bits=13, header_size=8192)
    poke(buf, "compatible_features", 0x1 | 0x80)  # unknown compatible bits are ignored
    poke(buf, "autoclear_features", 0x4)
    h = Header.unpack(bytes(buf))
    assert h.version == 2
    assert h.backing_name == b"base.raw"
    assert h.image_name == b"disk.raw"
    assert h.backing_format == "raw"
    assert h.image_size == 3 * MiB + 5
    assert h.cluster_bits == 13
    assert h.cluster_size == 8192
    assert h.header_size == 8192
    assert h.incompatible_features == 0
    assert h.compatible_features == 0x81
    assert h.all_allocated
    assert h.autoclear_features == 0x4


def test_v1_unpack_of_a_hand_built_header_reads_every_field() -> None:
    h = Header.unpack(bytes(v1_header()))
    assert h.version == 1
    assert h.backing_name == b"base.raw"
    assert h.image_name == b"disk.raw"
    assert h.backing_format == "raw"
    assert h.image_size is None
    assert h.cluster_bits == 16
    assert h.header_size == 4096
    assert h.incompatible_features == 0x3


def test_v1_without_no_probe_has_no_recorded_format() -> None:
    h = Header.unpack(bytes(v1_header(features=0x01)))
    assert h.backing_name == b"base.raw"
    assert h.backing_format is None


def test_names_may_be_anywhere_in_the_header_and_in_any_order() -> None:
    buf = v2_header(header_size=8192, names_at=6000)
    # Swap the order: image name first, backing name after it.
    poke(buf, "image_filename_offset", 6000)
    poke(buf, "backing_filename_offset", 7000)
    buf[6000:6016] = bytes(16)
    buf[6000:6008] = b"disk.raw"
    buf[7000:7008] = b"base.raw"
    h = Header.unpack(bytes(buf))
    assert (h.image_name, h.backing_name) == (b"disk.raw", b"base.raw")
    # A name may end exactly at header_size.
    poke(buf, "backing_filename_offset", 8192 - 8)
    buf[7000:7008] = bytes(8)
    buf[8184:8192] = b"base.raw"
    assert Header.unpack(bytes(buf)).backing_name == b"base.raw"


def test_fields_lists_the_header_in_on_disk_order() -> None:
    h = Header.unpack(bytes(v2_header()))
    names = [name for name, _ in h.fields()]
    assert names == [
        "magic", "version", "backing_filename", "image_filename", "incompatible_features",
        "compatible_features", "autoclear_features", "header_size", "cluster_bits",
        "image_size", "backing_format",
    ]
    assert [n for n, _ in Header.unpack(bytes(v1_header())).fields()] == [
        "magic", "version", "backing_filename", "image_filename", "features",
    ]


name_bytes = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)


@settings(max_examples=200, deadline=None)
@given(
    image=name_bytes,
    backing=st.none() | name_bytes,
    fmt=st.sampled_from(["raw", "add-cow"]),
    cluster_bits=st.integers(12, 30),
    image_size=st.integers(1, 1 << 44),
    compat=st.integers(0, (1 << 64) - 1),
    autoclear=st.integers(0, (1 << 64) - 1),
    extra_pages=st.integers(0, 2),
)
def test_v2_pack_unpack_round_trip(
    image: bytes, backing: bytes | None, fmt: str, cluster_bits: int, image_size: int,
    compat: int, autoclear: int, extra_pages: int,
) -> None:
    names = len(image) + len(backing or b"")
    header_size = ((V2_NAMES + names + 4095) // 4096 + extra_pages) * 4096
    h = Header(
        version=2, image_name=image, backing_name=backing,
        backing_format=fmt if backing is not None else None, image_size=image_size,
        cluster_bits=cluster_bits, header_size=header_size, compatible_features=compat,
        autoclear_features=autoclear,
    )
    raw = h.pack()
    assert len(raw) == header_size
    assert Header.unpack(raw) == h
    assert peek(raw, "image_size") == image_size
    assert peek(raw, "compatible_features") == compat
    assert peek(raw, "autoclear_features") == autoclear
    assert peek(raw, "cluster_bits") == cluster_bits
    assert peek(raw, "header_size") == header_size
    assert Header.unpack(raw).pack() == raw


@settings(max_examples=100, deadline=None)
@given(image=name_bytes, backing=st.none() | st.binary(min_size=1, max_size=200))
def test_v1_pack_unpack_round_trip(image: bytes, backing: bytes | None) -> None:
    if backing is not None:
        backing = backing.replace(b"\0", b"x")
    h = Header(
        version=1, image_name=image, backing_name=backing,
        backing_format="raw" if backing is not None else None,
        incompatible_features=0x3 if backing is not None else 0,
    )
    raw = h.pack()
    assert Header.unpack(raw) == h
    assert Header.unpack(raw).pack() == raw


def test_bitmap_starts_at_header_size_lsb_first(tmp_path: Path) -> None:
    """Byte 0 bit 0 of the bitmap is cluster 0 (specification, "Bitmap")."""
    (tmp_path / "disk.raw").write_bytes(bytes(20 * 4096))
    path = put(tmp_path, v2_header(backing=None, header_size=8192, cluster_bits=12,
                                   image_size=20 * 4096), bitmap=b"\x00\x00\x00")
    with addcow.open(path) as img:
        img.write(b"\xaa" * 4096, 0)  # cluster 0
        img.write(b"\xbb", 9 * 4096)  # cluster 9
        img.write(b"\xcc", 19 * 4096 + 100)  # cluster 19, the last one
    raw = path.read_bytes()
    assert len(raw) == 8192 + 3
    assert raw[8192:] == bytes([0b00000001, 0b00000010, 0b00001000])
    assert raw[:8192] == bytes(v2_header(backing=None, header_size=8192, cluster_bits=12,
                                         image_size=20 * 4096))


# == Malformed headers: one named case each, control cases first ===================


def test_control_valid_v2_header_opens(d: Path) -> None:
    path = put(d, v2_header())
    with addcow.open(path) as img:
        assert img.size == MiB
        assert img.cluster_size == 65536
        assert img.read(0, 4096) == base_content()[:4096]
    with addcow.open(path, readonly=True) as img:
        assert img.total_clusters == 16


def test_control_valid_v1_header_opens(d: Path) -> None:
    path = put(d, v1_header())
    with addcow.open(path) as img:
        assert img.size == MiB
        assert img.read(MiB - 10, 10) == base_content()[-10:]


def test_short_buffer(d: Path) -> None:
    path = put(d, v2_header()[:20], bitmap=b"")
    header_fails(path, HeaderError, "length", "at least 36 bytes", "20")
    with pytest.raises(HeaderError, match="field length: expected at least 36 bytes, found 0"):
        Header.unpack(b"")


def test_short_v2_header(d: Path) -> None:
    path = put(d, v2_header()[:60], bitmap=b"")
    header_fails(path, HeaderError, "length", "at least 84 bytes", "60")


def test_short_v1_header(d: Path) -> None:
    path = put(d, v1_header()[:100], bitmap=b"")
    header_fails(path, HeaderError, "length", "4096 bytes", "100")


def test_v2_file_shorter_than_header_size(d: Path) -> None:
    path = put(d, v2_header(header_size=8192)[:5000], bitmap=b"")
    header_fails(path, HeaderError, "length", "8192 bytes (header_size)", "5000")


def test_bad_magic(d: Path) -> None:
    path = put(d, poke(v2_header(), "magic", b"NOT_COW!"))
    header_fails(path, HeaderError, "magic", repr(MAGIC), repr(b"NOT_COW!"))


def test_version_0(d: Path) -> None:
    path = put(d, poke(v2_header(), "version", 0))
    header_fails(path, UnsupportedFeatureError, "version", "1 or 2", "0")


def test_version_3(d: Path) -> None:
    path = put(d, poke(v2_header(), "version", 3))
    header_fails(path, UnsupportedFeatureError, "version", "1 or 2", "3")


def test_header_size_not_multiple_of_4096(d: Path) -> None:
    path = put(d, poke(v2_header(header_size=8192), "header_size", 6000))
    header_fails(path, HeaderError, "header_size", "a multiple of 4096", "6000")


def test_header_size_too_small(d: Path) -> None:
    path = put(d, poke(v2_header(), "header_size", 0))
    header_fails(path, HeaderError, "header_size", "a multiple of 4096 between 4096 and", "0")


def test_header_size_too_large(d: Path) -> None:
    path = put(d, poke(v2_header(), "header_size", 2 * MiB))
    header_fails(
        path, HeaderError, "header_size", "a multiple of 4096 between 4096 and 1048576",
        str(2 * MiB),
    )


def test_cluster_bits_11(d: Path) -> None:
    path = put(d, poke(v2_header(), "cluster_bits", 11))
    header_fails(path, HeaderError, "cluster_bits", "12..30", "11")


def test_cluster_bits_31(d: Path) -> None:
    path = put(d, poke(v2_header(), "cluster_bits", 31))
    header_fails(path, HeaderError, "cluster_bits", "12..30", "31")


def test_image_size_0(d: Path) -> None:
    path = put(d, poke(v2_header(), "image_size", 0))
    header_fails(path, HeaderError, "image_size", f"1..{1 << 62}", "0")


def test_image_size_huge(d: Path) -> None:
    path = put(d, poke(v2_header(), "image_size", (1 << 62) + 1))
    header_fails(path, HeaderError, "image_size", f"1..{1 << 62}", str((1 << 62) + 1))


def test_image_size_too_many_clusters(d: Path) -> None:
    path = put(d, poke(poke(v2_header(), "image_size", 1 << 62), "cluster_bits", 12))
    header_fails(path, HeaderError, "image_size", "at most 4294967296 clusters", str(1 << 62))


def test_image_name_offset_past_header(d: Path) -> None:
    path = put(d, poke(v2_header(), "image_filename_offset", 4096))
    header_fails(path, HeaderError, "image_filename_offset", "84..4095", "4096")


def test_backing_name_offset_past_header(d: Path) -> None:
    path = put(d, poke(v2_header(), "backing_filename_offset", 0xFFFFFFFF))
    header_fails(path, HeaderError, "backing_filename_offset", "84..4095", str(0xFFFFFFFF))


def test_image_name_runs_past_header(d: Path) -> None:
    buf = poke(v2_header(), "image_filename_offset", 4090)
    buf[92:100] = bytes(8)
    buf[4090:4096] = b"disk.r"
    path = put(d, buf)
    header_fails(path, HeaderError, "image_filename_size", "1..6", "8")


def test_backing_size_without_offset(d: Path) -> None:
    path = put(d, poke(v2_header(), "backing_filename_offset", 0))
    header_fails(path, HeaderError, "backing_filename_offset", "84..4095", "0")


def test_v1_name_offset_past_header(d: Path) -> None:
    path = put(d, poke(v1_header(), "image_filename_offset", 5000))
    header_fails(path, HeaderError, "image_filename_offset", "36..4095", "5000")


def test_image_name_size_zero(d: Path) -> None:
    path = put(d, poke(v2_header(), "image_filename_size", 0))
    header_fails(path, HeaderError, "image_filename_size", "1..", "0")


def test_backing_name_size_zero(d: Path) -> None:
    path = put(d, poke(v2_header(), "backing_filename_size", 0))
    header_fails(path, HeaderError, "backing_filename_size", "1..", "0")


def test_v1_backing_name_size_zero(d: Path) -> None:
    path = put(d, poke(v1_header(), "backing_filename_size", 0))
    header_fails(path, HeaderError, "backing_filename_size", "1..", "0")


def test_names_overlap_each_other(d: Path) -> None:
    # image name = the last 3 bytes of the backing name ("raw"), a suffix overlap.
    buf = poke(poke(v2_header(), "image_filename_offset", V2_NAMES + 5), "image_filename_size", 3)
    buf[92:100] = bytes(8)
    path = put(d, buf)
    header_fails(
        path, HeaderError, "image_filename_offset",
        "a range not overlapping the backing file name [84, 92)", "[89, 92)",
    )


def test_v1_names_overlap_each_other(d: Path) -> None:
    buf = poke(v1_header(), "image_filename_offset", V1_NAMES)
    buf[44:52] = bytes(8)
    path = put(d, buf)
    header_fails(
        path, HeaderError, "image_filename_offset",
        "a range not overlapping the backing file name [36, 44)", "[36, 44)",
    )


def test_name_overlaps_fixed_fields(d: Path) -> None:
    path = put(d, poke(v2_header(), "image_filename_offset", 60))
    header_fails(path, HeaderError, "image_filename_offset", "84..4095", "60")


def test_v1_name_overlaps_fixed_fields(d: Path) -> None:
    path = put(d, poke(v1_header(), "backing_filename_offset", 30))
    header_fails(path, HeaderError, "backing_filename_offset", "36..4095", "30")


def test_nul_in_image_name(d: Path) -> None:
    path = put(d, v2_header(image=b"disk\0raw"))
    header_fails(path, HeaderError, "image_filename", "a name without NUL bytes",
                 repr(b"disk\0raw"))


def test_nul_in_backing_name(d: Path) -> None:
    path = put(d, v1_header(backing=b"base.raw\0"))
    header_fails(path, HeaderError, "backing_filename", "a name without NUL bytes",
                 repr(b"base.raw\0"))


def test_backing_format_unknown(d: Path) -> None:
    path = put(d, v2_header(fmt=b"vmdk"))
    header_fails(path, HeaderError, "backing_format", "raw or add-cow or qcow2", "'vmdk'")


def test_backing_format_not_ascii(d: Path) -> None:
    path = put(d, v2_header(fmt=b"r\xe4w"))
    exc = open_fails(path, HeaderError, "field backing_format:", "expected raw or add-cow or qcow2")
    assert "found" in str(exc)


def test_backing_format_garbage_padding(d: Path) -> None:
    path = put(d, v2_header(fmt=b"raw\0junk"))
    header_fails(path, HeaderError, "backing_format", "ASCII text padded with NUL bytes",
                 repr(b"raw\0junk" + bytes(8)))


def test_backing_format_set_without_backing(d: Path) -> None:
    path = put(d, poke(v2_header(backing=None), "backing_format", b"raw"))
    header_fails(path, HeaderError, "backing_format",
                 "all zero bytes when there is no backing file", "b'raw'")


def test_backing_format_missing_with_backing(d: Path) -> None:
    path = put(d, v2_header(fmt=b""))
    header_fails(path, HeaderError, "backing_format",
                 "a format name exactly when backing_filename_offset is non-zero", "b''")


def test_incompatible_feature_bit_set(d: Path) -> None:
    path = put(d, poke(v2_header(), "features", 1 << 5))
    header_fails(path, UnsupportedFeatureError, "incompatible_features",
                 "only known bits (0x3: backing_uri, view)", "0x20")


def test_backing_uri_bit_without_a_backing(d: Path) -> None:
    # Only the image file is named: BACKING_URI must not be set.
    path = put(d, poke(v2_header(backing=None, fmt=b""), "features", 1))
    header_fails(path, HeaderError, "incompatible_features",
                 "no BACKING_URI bit without a backing (backing_filename_offset is 0)", "0x1")


def test_v1_unknown_feature_bit(d: Path) -> None:
    path = put(d, v1_header(features=0x03 | 0x10))
    header_fails(path, UnsupportedFeatureError, "features", "only bits 0x1 and 0x2", "0x13")


def test_v1_backing_file_bit_clear_with_backing_name(d: Path) -> None:
    path = put(d, v1_header(features=0x02))
    header_fails(path, HeaderError, "features",
                 "BACKING_FILE bit set (backing_filename_offset is 36)", "0x2")


def test_v1_backing_file_bit_set_without_backing_name(d: Path) -> None:
    path = put(d, v1_header(backing=None, features=0x01))
    header_fails(path, HeaderError, "features",
                 "BACKING_FILE bit clear (backing_filename_offset is 0)", "0x1")


def test_nonzero_unused_v2_header_byte(d: Path) -> None:
    buf = v2_header()
    buf[3000] = 0x5A
    path = put(d, buf)
    header_fails(path, HeaderError, "byte 3000", "zero (unused header space)", "90")


def test_nonzero_byte_between_names(d: Path) -> None:
    buf = poke(v2_header(), "image_filename_offset", 200)
    buf[92:100] = bytes(8)
    buf[200:208] = b"disk.raw"
    buf[150] = 1
    path = put(d, buf)
    header_fails(path, HeaderError, "byte 150", "zero (unused header space)", "1")


def test_nonzero_byte_in_second_header_page(d: Path) -> None:
    buf = v2_header(header_size=8192)
    buf[8191] = 0xFF
    path = put(d, buf)
    header_fails(path, HeaderError, "byte 8191", "zero (unused header space)", "255")


def test_truncated_bitmap(d: Path) -> None:
    path = put(d, v2_header(), bitmap=b"\0")
    open_fails(path, BitmapError, str(path), "bitmap truncated", "expected 4098 bytes",
               "16 clusters", "found a file of 4097 bytes")


def test_v1_truncated_bitmap(d: Path) -> None:
    path = put(d, v1_header(), bitmap=b"")
    open_fails(path, BitmapError, "bitmap truncated", "expected 4098 bytes",
               "found a file of 4096 bytes")


def test_missing_image_file(d: Path) -> None:
    (d / "disk.raw").unlink()
    path = put(d, v2_header())
    open_fails(path, ImageFileError, str(d / "disk.raw"), "image file not found")


def test_image_file_too_small(d: Path) -> None:
    os.truncate(d / "disk.raw", 1000)
    path = put(d, v2_header())
    open_fails(path, ImageFileError, str(d / "disk.raw"), "image file too small",
               f"expected at least {MiB} bytes (image_size)", "found 1000")


def test_v1_empty_image_file(d: Path) -> None:
    os.truncate(d / "disk.raw", 0)
    path = put(d, v1_header(), bitmap=b"")
    open_fails(path, ImageFileError, str(d / "disk.raw"), "image file is empty",
               "its image file's size")


def test_missing_backing_file(d: Path) -> None:
    (d / "base.raw").unlink()
    path = put(d, v2_header())
    open_fails(path, BackingError, str(d / "base.raw"), "cannot open backing file")


def test_names_are_literal_files_not_urls_or_json(d: Path) -> None:
    name = b'json:{"file": {"driver": "file", "filename": "/etc/passwd"}}'
    path = put(d, v2_header(backing=name))
    open_fails(path, BackingError, f"{d}/{os.fsdecode(name)}: cannot open backing file")
    path = put(d, v2_header(backing=b"nbd://localhost/x"))
    open_fails(path, BackingError, f"{d}/nbd://localhost/x: cannot open backing file")


def test_backing_file_is_a_fifo_does_not_hang(d: Path) -> None:
    """A hostile header naming a FIFO must give an error, not block forever in open()."""
    os.mkfifo(d / "fifo")
    put(d, v2_header(backing=b"fifo"))
    script = (
        "import addcow, sys\n"
        "try:\n"
        "    addcow.open(sys.argv[1], readonly=True)\n"
        "except addcow.BackingError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(d / "disk.add-cow")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BackingError "), proc.stdout
    assert str(d / "fifo") in proc.stdout
    assert "not a regular file or block device" in proc.stdout


def test_v1_backing_without_no_probe_is_refused(d: Path) -> None:
    path = put(d, v1_header(features=0x01))
    exc = open_fails(path, BackingFormatError, str(path), "backing file format not recorded",
                     "BACKING_FORMAT_NO_PROBE", "-F raw", "probe_backing=True")
    assert "base.raw" in str(exc)


def test_v1_backing_without_no_probe_opens_with_probe_backing(d: Path) -> None:
    path = put(d, v1_header(features=0x01))
    with addcow.open(path, probe_backing=True) as img:
        assert img.read(0, MiB) == base_content()


def test_v1_probe_backing_refuses_a_backing_that_looks_like_qcow2(d: Path) -> None:
    with open(d / "base.raw", "r+b") as f:
        f.write(b"QFI\xfb")
    path = put(d, v1_header(features=0x01))
    open_fails(path, BackingFormatError, str(d / "base.raw"), "qcow2", probe_backing=True)


def test_unknown_autoclear_bits_cleared_on_rw_open(d: Path) -> None:
    path = put(d, poke(v2_header(), "autoclear_features", 0x8000_0000_0000_0010))
    with addcow.open(path, readonly=True) as img:
        assert img.header.autoclear_features == 0x8000_0000_0000_0010
    assert peek(path.read_bytes(), "autoclear_features") == 0x8000_0000_0000_0010
    with addcow.open(path) as img:
        assert img.header.autoclear_features == 0
        assert peek(path.read_bytes(), "autoclear_features") == 0
    raw = path.read_bytes()
    assert peek(raw, "autoclear_features") == 0
    assert raw[:4096] == bytes(v2_header()), "only the autoclear field changed"


def test_clearing_autoclear_bits_rewrites_only_their_field(d: Path) -> None:
    """Names stored elsewhere than the reference writer puts them stay where they are."""
    buf = v2_header(header_size=8192, names_at=5000)
    poke(buf, "autoclear_features", 0x2)
    path = put(d, buf)
    with addcow.open(path) as img:
        assert img.header.autoclear_features == 0
    raw = path.read_bytes()
    want = bytes(poke(bytearray(buf), "autoclear_features", 0))
    changed = [i for i in range(8192) if raw[i] != want[i]]
    assert changed == [], f"bytes {changed[:8]}... changed besides autoclear_features"


def test_unknown_compatible_bits_are_ignored_and_kept(d: Path) -> None:
    path = put(d, poke(v2_header(), "compatible_features", 0x40))
    with addcow.open(path) as img:
        img.write(b"x", 0)
    assert peek(path.read_bytes(), "compatible_features") == 0x40


def test_bits_past_the_last_cluster_and_bytes_after_the_bitmap_are_accepted(d: Path) -> None:
    """What a reader must not refuse (specification, "Validation")."""
    os.truncate(d / "disk.raw", 2 * MiB)  # image file longer than image_size
    path = put(d, v2_header(image_size=MiB - 4096), bitmap=b"\x01\x80" + b"trailing bytes")
    with addcow.open(path) as img:
        assert img.total_clusters == 16
        assert img.allocated_clusters == 2  # 16 clusters: bit 15 is a cluster, not padding
    path = put(d, v2_header(image_size=13 * 65536 + 1), bitmap=b"\x00\xc0")  # 14 clusters
    with addcow.open(path) as img:
        assert img.total_clusters == 14
        assert img.allocated_clusters == 0, "set padding bits are not clusters"
        assert not img.complete
        img.write(b"x", 0)
    assert path.read_bytes()[4096:] == b"\x01\xc0", "padding bits kept as found"


def test_v1_unused_name_area_bytes_are_accepted(d: Path) -> None:
    buf = v1_header()
    buf[100:4096] = b"\xa5" * 3996  # other version 1 writers may leave anything there
    path = put(d, buf)
    with addcow.open(path) as img:
        assert img.read(0, 3) == base_content()[:3]


def test_image_file_that_is_a_directory(d: Path) -> None:
    (d / "disk.raw").unlink()
    (d / "disk.raw").mkdir()
    path = put(d, v2_header())
    open_fails(path, ImageFileError, f"{d / 'disk.raw'}: cannot open image file: "
               "not a regular file or block device", readonly=True)
    open_fails(path, ImageFileError, f"{d / 'disk.raw'}: cannot open image file: "
               "Is a directory")


def test_all_allocated_image_with_truncated_bitmap(d: Path) -> None:
    path = put(d, poke(v2_header(), "compatible_features", 0x1), bitmap=b"\xff")
    open_fails(path, BitmapError, "bitmap truncated", "expected 4098 bytes")


# == Huge headers must not allocate what they claim ================================

HUGE_FILE = (16 << 40) - 4096  # the largest file ext4 allows with 4 KiB blocks


def _peak_while(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_image_truncated_bitmap_allocates_nothing(d: Path) -> None:
    """2^32 - 1 clusters (a 512 MiB bitmap) claimed, bitmap missing: error before allocation."""
    os.truncate(d / "disk.raw", HUGE_FILE)
    path = put(d, v2_header(backing=None, cluster_bits=12, image_size=HUGE_FILE), bitmap=b"")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def attempt() -> None:
        open_fails(path, BitmapError, "bitmap truncated",
                   f"expected {4096 + (HUGE_FILE // 4096 + 7) // 8} bytes",
                   "found a file of 4096 bytes")

    assert _peak_while(attempt) < 4 * MiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


def test_huge_image_with_small_image_file_allocates_nothing(d: Path) -> None:
    path = put(d, v2_header(backing=None, cluster_bits=30, image_size=1 << 62), bitmap=b"")

    def attempt() -> None:
        open_fails(path, ImageFileError, "image file too small", f"{1 << 62} bytes")

    assert _peak_while(attempt) < 4 * MiB


def test_huge_name_sizes_allocate_nothing(d: Path) -> None:
    buf = poke(poke(v2_header(), "image_filename_size", 0xFFFFFFFF), "header_size", 1 << 20)
    path = put(d, buf + bytes((1 << 20) - 4096))

    def attempt() -> None:
        open_fails(path, HeaderError, "image_filename_size", f"found {0xFFFFFFFF}")

    assert _peak_while(attempt) < 8 * MiB


# == Hostile input: any corruption gives an AddCowError, nothing else ==============


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    version=st.sampled_from([1, 2]),
    edits=st.lists(
        st.tuples(st.integers(0, 120), st.integers(0, 255)), min_size=1, max_size=6
    ),
)
def test_random_header_corruption_raises_only_addcow_errors(
    d: Path, version: int, edits: list[tuple[int, int]]
) -> None:
    buf = v2_header() if version == 2 else v1_header()
    for offset, value in edits:
        buf[offset] = value
    path = put(d, buf)
    for readonly in (True, False):
        try:
            with addcow.open(path, readonly=readonly) as img:
                n = min(img.size, 4096)
                assert len(img.read(0, n)) == n
        except AddCowError as exc:  # anything else fails the test
            assert str(exc), "the message says what is wrong"
