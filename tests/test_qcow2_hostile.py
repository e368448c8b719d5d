"""Hostile qcow2 files: one named case per malformed field, then a fuzzer.

Every case starts from an image qemu-img made (the control case checks that
it still opens and reads as QEMU reads it), patches one field with
``struct.pack``, and asserts the exact fragment of the error. Header cases
fail at open; table and cluster cases open and fail on the first read or
block status that touches the bad entry, naming its L1 and L2 index.

The fuzzer mutates seeds made by qemu-img (header fields, header bytes, L1
and L2 entries, compressed descriptors, compressed data, truncation) and
requires: only :class:`addcow.AddCowError` subclasses escape, no example
allocates more than 64 MiB (tracemalloc peak), none takes more than 5 seconds
(hypothesis deadline). A few hundred examples by default (``make test``);
ADDCOW_CAMPAIGN=1 (``make campaign``) runs 200,000 (16-22 minutes on a shared
2-core machine); ADDCOW_QCOW2_FUZZ_EXAMPLES=N runs N.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import sys
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import require_tool, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_util import (
    convert_raw,
    create,
    l1_entry,
    l2_entry,
    open_qcow2,
    patch,
    qemu_img,
    qemu_io,
    read_all,
    read_u64,
)

from addcow.errors import (
    AddCowError,
    BackingFormatError,
    Qcow2CorruptError,
    Qcow2Error,
    Qcow2UnsupportedError,
)
from addcow.stores.chain import ChainGuard

KiB = 1024
MiB = 1 << 20
CAMPAIGN = os.environ.get("ADDCOW_CAMPAIGN") == "1"
EXAMPLES = int(os.environ.get("ADDCOW_QCOW2_FUZZ_EXAMPLES", "200000" if CAMPAIGN else "300"))
MEMORY_LIMIT = 64 * MiB
COPIED = 1 << 63
COMPRESSED = 1 << 62


def _source(path: Path, size: int) -> Path:
    """64 KiB blocks: text, random bytes (stored uncompressed), zeros, one byte
    repeated, and random bytes over four values (compressed to many sectors)."""
    rng = random.Random(5)
    blocks = []
    for i in range(size // (64 * KiB)):
        kind = i % 5
        if kind == 0:
            blocks.append((b"hostile qcow2 %06d " % i) * (64 * KiB // 20) + bytes(64 * KiB % 20))
        elif kind == 1:
            blocks.append(rng.randbytes(64 * KiB))
        elif kind == 2:
            blocks.append(bytes(64 * KiB))
        elif kind == 3:
            blocks.append(bytes([i]) * (64 * KiB))
        else:
            blocks.append(bytes(rng.choice(b"ACGT") for _ in range(64 * KiB)))
    path.write_bytes(b"".join(blocks))
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images made by qemu-img/qemu-io, one per family of cases.

    v3: 4 MiB over base.raw; L2 entries 0,1 data, entry 4 a zero cluster.
    v2: compat=0.10, entries 0,1 data. zlib/zstd/zlib_c4k: convert -c of 1 MiB.
    extl2: extended L2, 64 KiB clusters, a 4 KiB write in cluster 0.
    """
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("qcow2_templates")
    base = d / "base.raw"
    base.write_bytes(bytes([0x42]) * MiB)
    v3 = create(d / "v3.qcow2", "4M", backing=base)
    qemu_io(v3, "write -P 0x11 0 128k", "write -z 256k 64k")
    v2 = create(d / "v2.qcow2", "4M", "compat=0.10")
    qemu_io(v2, "write -P 0x11 0 128k")
    src = _source(d / "src.raw", MiB)
    out = {"v3": v3, "v2": v2}
    for name, opts in (("zlib", []), ("zstd", ["-o", "compression_type=zstd"]),
                       ("zlib_c4k", ["-o", "cluster_size=4k"])):
        out[name] = d / f"{name}.qcow2"
        qemu_img("convert", "-q", "-c", "-O", "qcow2", *opts, src, out[name])
    ext = create(d / "extl2.qcow2", "1M", "extended_l2=on")
    qemu_io(ext, "write -P 0x11 4k 4k", "write -P 0x12 64k 64k")
    out["extl2"] = ext
    small = create(d / "c512.qcow2", "1M", "cluster_size=512")
    qemu_io(small, "write -P 0x13 0 4k")
    out["c512"] = small
    return out


def copy(templates: dict[str, Path], name: str, tmp_path: Path) -> Path:
    shutil.copy(templates[name].parent / "base.raw", tmp_path / "base.raw")
    dst = tmp_path / f"{name}.qcow2"
    shutil.copy(templates[name], dst)
    return dst


def refused(path: Path, kind: type[AddCowError], fragment: str) -> str:
    """Opening ``path`` raises ``kind`` whose message contains ``fragment``."""
    with pytest.raises(kind) as info:
        open_qcow2(path).close()
    message = str(info.value)
    assert fragment in message, message
    assert str(path) in message, message
    return message


def refused_on_read(path: Path, fragment: str, *, by_block_status: bool = True) -> str:
    """``path`` opens; reading it (and its block status) raises Qcow2CorruptError."""
    store = open_qcow2(path)
    try:
        with pytest.raises(Qcow2CorruptError) as info:
            read_all(store)
        message = str(info.value)
        assert fragment in message, message
        if by_block_status:
            with pytest.raises(Qcow2CorruptError, match="corrupt qcow2"):
                list(store.block_status_at(0, store.size, 0))
        return message
    finally:
        store.close()


# -- control --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["v3", "v2", "zlib", "zstd", "zlib_c4k", "extl2", "c512"])
def test_control_templates_open_and_read_as_qemu_reads(
    templates: dict[str, Path], name: str, tmp_path: Path
) -> None:
    path = copy(templates, name, tmp_path)
    store = open_qcow2(path)
    try:
        assert read_all(store) == convert_raw(path)
    finally:
        store.close()


# -- header, in validation order ------------------------------------------------------

def test_file_shorter_than_a_v2_header(tmp_path: Path) -> None:
    p = tmp_path / "short.qcow2"
    p.write_bytes(b"QFI\xfb\0\0\0\3" + bytes(40))
    refused(p, Qcow2Error, "invalid qcow2 length: expected at least 72 bytes, found 48")


def test_bad_magic(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 0, "4s", b"QFI\0")
    refused(p, Qcow2Error, "invalid qcow2 magic: expected b'QFI\\xfb', found b'QFI\\x00'")


@pytest.mark.parametrize("version", [1, 4, 0xFFFFFFFF])
def test_version_not_2_or_3(templates: dict[str, Path], tmp_path: Path, version: int) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 4, "I", version)
    refused(p, Qcow2UnsupportedError,
            f"unsupported qcow2 version: expected 2 or 3, found {version}")


@pytest.mark.parametrize("length", [72, 100, 108])
def test_v3_header_length_too_short_or_unaligned(
    templates: dict[str, Path], tmp_path: Path, length: int
) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 100, "I", length)
    refused(p, Qcow2Error,
            f"header_length: expected a multiple of 8, at least 104, found {length}")


def test_header_length_past_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 100, "I", 65536 + 8)
    refused(p, Qcow2Error, "header_length: expected at most the cluster size (65536), found 65544")


@pytest.mark.parametrize("bits", [8, 22, 63])
def test_cluster_bits_out_of_range(templates: dict[str, Path], tmp_path: Path,
                                   bits: int) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 20, "I", bits)
    refused(p, Qcow2UnsupportedError, f"cluster_bits: expected 9..21, found {bits}")


def test_unknown_incompatible_bit(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 72, "Q", 1 << 5)
    refused(p, Qcow2UnsupportedError,
            "incompatible_features: expected only bits of 0x1f, found 0x20 (unknown: bit 5)")


def test_unknown_incompatible_bit_named_by_the_feature_table(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """The feature name table (at 128 in qemu-img's v3 layout) names an unknown bit."""
    p = copy(templates, "v3", tmp_path)
    assert read_u64(p, 128) >> 32 == 0x6803F857
    patch(p, 136, "BB46s", 0, 40, b"time travel")  # first table entry: incompatible bit 40
    patch(p, 72, "Q", 1 << 40)
    refused(p, Qcow2UnsupportedError, "(unknown: bit 40 'time travel')")


def test_corrupt_bit(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 72, "Q", 0x2)
    refused(p, Qcow2Error, "expected corrupt bit (0x2) clear, found 0x2 (corrupt bit)")


def test_external_data_file_bit(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 72, "Q", 0x4)
    message = refused(p, Qcow2UnsupportedError, "external data file bit (0x4) clear")
    assert "a host file that the qcow2 names" in message


def test_external_data_file_made_by_qemu_img(tmp_path: Path) -> None:
    p = create(tmp_path / "df.qcow2", "1M", f"data_file={tmp_path / 'data.raw'}")
    refused(p, Qcow2UnsupportedError, "found 0x4 (external data file)")


def test_raw_external_data_bit_without_a_data_file(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 88, "Q", 0x2)
    refused(p, Qcow2Error, "autoclear_features: expected raw external data bit (0x2) clear")


def test_dirty_bit_and_lazy_refcounts_are_ignored(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """Stale refcounts do not matter to a reader that never writes."""
    p = copy(templates, "v3", tmp_path)
    want = convert_raw(p)
    patch(p, 72, "Q", 0x1)
    patch(p, 80, "Q", 0x1)
    patch(p, 88, "Q", 0x1 | 1 << 40)  # bitmaps bit and an unknown autoclear bit
    store = open_qcow2(p)
    try:
        assert read_all(store) == want
    finally:
        store.close()


def test_unknown_compression_type(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zstd", tmp_path)
    patch(p, 104, "B", 2)
    refused(p, Qcow2UnsupportedError,
            "compression_type: expected 0 (zlib) or 1 (zstd), found 2")


def test_zstd_type_without_incompatible_bit_3(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zstd", tmp_path)
    patch(p, 72, "Q", 0)
    refused(p, Qcow2Error, "exactly when incompatible bit 3 (compression type) is clear, "
                           "found 1 with incompatible_features 0x0")


def test_incompatible_bit_3_with_zlib_type(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zlib", tmp_path)
    patch(p, 72, "Q", 0x8)
    refused(p, Qcow2Error, "found 0 with incompatible_features 0x8")


def test_incompatible_bit_3_without_a_compression_type_field(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """header_length 104: byte 104 is not part of the header, so the type is zlib."""
    p = copy(templates, "zstd", tmp_path)
    patch(p, 100, "I", 104)
    refused(p, Qcow2Error, "found 0 with incompatible_features 0x8")


def test_extended_l2_with_clusters_below_16k(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zlib_c4k", tmp_path)
    patch(p, 72, "Q", 0x10)
    refused(p, Qcow2Error,
            "cluster_bits: expected at least 14 with extended L2 entries, found 12")


@pytest.mark.parametrize(("method", "name"), [(1, "AES-CBC"), (2, "LUKS"), (7, "unknown")])
def test_encryption(templates: dict[str, Path], tmp_path: Path, method: int, name: str) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 32, "I", method)
    refused(p, Qcow2UnsupportedError, f"crypt_method: expected 0 (no encryption; addcow does "
                                      f"not decrypt), found {method} ({name})")


def test_luks_image_made_by_qemu_img(tmp_path: Path) -> None:
    p = tmp_path / "luks.qcow2"
    cmd = [require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "--object",
           "secret,id=s0,data=pw", "-o", "encrypt.format=luks,encrypt.key-secret=s0",
           str(p), "1M"]  # fmt: skip
    # qemu-img times its key derivation and gives up on a busy machine ("Unable to get
    # accurate CPU usage"): that is QEMU's benchmark, not what is tested here.
    for _ in range(5):
        made = run(cmd, check=False)
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr
    refused(p, Qcow2UnsupportedError, "found 2 (LUKS)")


def test_refcount_order_above_6(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 96, "I", 7)
    refused(p, Qcow2Error, "refcount_order: expected at most 6, found 7")


def test_size_beyond_a_32_mib_l1_table_is_refused_before_allocating(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """512-byte clusters map 32 KiB per L1 entry: 2^55 bytes would need 2^40 entries."""
    p = copy(templates, "c512", tmp_path)
    patch(p, 24, "Q", 1 << 55)
    tracemalloc.start()
    try:
        refused(p, Qcow2UnsupportedError,
                "size: expected at most 137438953472 bytes with 512-byte clusters "
                "(a 32 MiB L1 table), found 36028797018963968")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_l1_size_above_32_mib(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 36, "I", 0xFFFFFFFF)
    tracemalloc.start()
    try:
        refused(p, Qcow2Error,
                "l1_size: expected at most 4194304 entries (32 MiB), found 4294967295")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_l1_size_too_small_for_the_virtual_size(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 24, "Q", 1 << 30)  # 1 GiB needs two L1 entries of 512 MiB
    refused(p, Qcow2Error,
            "l1_size: expected at least 2 entries for a virtual size of 1073741824 bytes, "
            "found 1")


def test_l1_table_offset_unaligned(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 40, "Q", 0x30200)
    refused(p, Qcow2Error,
            "l1_table_offset: expected a multiple of the cluster size (65536), found 197120")


def test_l1_table_in_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 40, "Q", 0)
    refused(p, Qcow2Error, "l1_table_offset: expected past cluster 0, which holds the header")


def test_l1_table_past_the_end_of_the_file(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    size = p.stat().st_size
    patch(p, 40, "Q", size)
    refused(p, Qcow2Error, f"l1_table_offset: expected a table of 8 bytes inside the file of "
                           f"{size} bytes, found {size}")


def test_refcount_table_offset_unaligned(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 48, "Q", 0x10008)
    refused(p, Qcow2Error, "refcount_table_offset: expected a multiple of the cluster size")


def test_refcount_table_in_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 48, "Q", 0)
    refused(p, Qcow2Error, "refcount_table_offset: expected past cluster 0")


def test_refcount_table_past_the_end(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 48, "Q", 1 << 40)
    refused(p, Qcow2Error, "refcount_table_offset: expected a table of 65536 bytes inside the file")


def test_refcount_table_clusters_zero(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 56, "I", 0)
    refused(p, Qcow2Error, "refcount_table_clusters: expected at least 1, found 0")


def test_refcount_table_above_8_mib(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 56, "I", 129)
    refused(p, Qcow2Error, "refcount_table_clusters: expected at most 128 (8 MiB), found 129")


def test_too_many_snapshots(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 60, "I", 65537)
    refused(p, Qcow2Error, "nb_snapshots: expected at most 65536, found 65537")


def test_snapshots_offset_unaligned(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 64, "Q", 12)
    refused(p, Qcow2Error, "snapshots_offset: expected a multiple of the cluster size")


def test_snapshot_table_past_the_end(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 60, "IQ", 10000, 0x30000)
    refused(p, Qcow2Error, "snapshots_offset: expected a table of 400000 bytes inside the file")


def test_backing_name_offset_past_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 8, "Q", 65536)
    refused(p, Qcow2Error,
            "backing_file_offset: expected 112..65535 (after the header, inside cluster 0), "
            "found 65536")


def test_backing_name_inside_the_header(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 8, "Q", 40)
    refused(p, Qcow2Error, "backing_file_offset: expected 112..65535")


@pytest.mark.parametrize("size", [0, 1024])
def test_backing_name_size(templates: dict[str, Path], tmp_path: Path, size: int) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 16, "I", size)
    refused(p, Qcow2Error, f"backing_file_size: expected 1..1023 (inside cluster 0, at most "
                           f"1023), found {size}")


def test_backing_name_running_past_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 8, "QI", 65536 - 10, 11)
    refused(p, Qcow2Error, "backing_file_size: expected 1..10 (inside cluster 0")


def test_backing_name_with_a_nul_byte(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 528 + 4, "B", 0)  # base\0raw
    refused(p, Qcow2Error, "backing file name: expected a name without NUL bytes")


def test_extension_running_past_its_area(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 116, "I", 1000)  # backing format record claims 1000 data bytes; area ends at 528
    refused(p, Qcow2Error,
            "header extension 0xe2792aca at byte 112: expected at most 408 data bytes "
            "(the extension area ends at byte 528), found 1000")


def test_unknown_extension_running_past_cluster_0(tmp_path: Path) -> None:
    p = create(tmp_path / "nb.qcow2", "1M")  # no backing: the area ends with cluster 0
    assert read_u64(p, 504) == 0  # the end record, after the feature name table
    patch(p, 504, "II", 0x12345678, 0xFFFFFFF0)
    refused(p, Qcow2Error, "header extension 0x12345678 at byte 504: expected at most 65024 "
                           "data bytes (the extension area ends at byte 65536), found 4294967280")


def test_backing_name_offset_far_past_cluster_0_does_not_stretch_the_extension_area(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """The extension area ends with cluster 0 even when backing_file_offset points
    far beyond it: an extension claiming 256 MiB, walked to name an unknown
    incompatible bit (before the offset itself is checked), is not read into
    memory; the bit is refused unnamed."""
    p = copy(templates, "v3", tmp_path)
    patch(p, 8, "Q", 2**31 - 1)
    patch(p, 72, "Q", 1 << 6)  # an unknown incompatible bit
    patch(p, 112, "II", 0x12345678, 256 << 20)
    tracemalloc.start()
    try:
        refused(p, Qcow2Error, "expected only bits of 0x1f, found 0x40 (unknown: bit 6)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB


def test_extension_header_cut_by_the_backing_name(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 8, "Q", 116)
    patch(p, 116, "4s", b"base")
    patch(p, 16, "I", 4)
    refused(p, Qcow2Error, "header extension at byte 112: expected a record ending before "
                           "byte 116 (end of the extension area), found 4 bytes left")


def test_backing_format_longer_than_15_bytes(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 116, "I", 16)
    refused(p, Qcow2Error,
            "backing format extension: expected a name of at most 15 bytes, found 16 bytes")


def test_backing_format_recorded_twice(templates: dict[str, Path], tmp_path: Path) -> None:
    """A second record could make two readers see two formats: refused."""
    p = copy(templates, "v3", tmp_path)
    patch(p, 128, "II8s", 0xE2792ACA, 5, b"qcow2")
    patch(p, 144, "II", 0, 0)
    refused(p, Qcow2Error, "header extension 0xe2792aca at byte 128: expected at most one")


def test_encryption_pointer_without_encryption(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 128, "IIQQ", 0x0537BE77, 16, 0x70000, 4096)
    patch(p, 152, "II", 0, 0)
    refused(p, Qcow2Error, "full disk encryption extension: expected absent (crypt_method is 0)")


def test_backing_format_not_recorded(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    patch(p, 112, "I", 0x12345678)  # the record becomes an unknown, ignored extension
    refused(p, BackingFormatError, "backing format not recorded; addcow does not probe: "
                                   "record it with qemu-img rebase -u -F raw")


def test_backing_format_not_raw_or_qcow2(tmp_path: Path) -> None:
    (tmp_path / "b.vmdk").write_bytes(bytes(4096))
    p = create(tmp_path / "v.qcow2", "1M")
    qemu_img("rebase", "-u", "-b", "b.vmdk", "-F", "vmdk", p)
    refused(p, BackingFormatError, "has format 'vmdk': expected one of raw, qcow2")


# -- tables and clusters, found on first use -------------------------------------------

def test_l1_entry_reserved_bits(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    at, value = l1_entry(p, 0)
    patch(p, at, "Q", value | 1 << 56)
    refused_on_read(p, "L1 entry 0: expected reserved bits (0x7f000000000001ff) clear")


def test_l2_table_unaligned(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    at, value = l1_entry(p, 0)
    patch(p, at, "Q", value + 512)
    refused_on_read(p, "L2 table offset (L1 index 0): expected a multiple of the cluster size")


def test_l2_table_past_the_end_of_the_file(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    at, _ = l1_entry(p, 0)
    patch(p, at, "Q", COPIED | 1 << 40)
    refused_on_read(p, "L2 table offset (L1 index 0): expected a table inside the file")


def test_l2_entry_reserved_bits(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    at, value = l2_entry(p, 0, 1)
    patch(p, at, "Q", value | 0x2)
    refused_on_read(p, "L1 index 0, L2 index 1, guest offset 0x10000: expected reserved bits "
                       "(0x3f000000000001fe) clear")


def test_data_cluster_unaligned(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v3", tmp_path)
    at, value = l2_entry(p, 0, 1)
    patch(p, at, "Q", value + 0x200)
    refused_on_read(p, "cluster offset (L1 index 0, L2 index 1, guest offset 0x10000): "
                       "expected a multiple of the cluster size (65536)")


def test_data_cluster_past_the_end_of_the_file(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    at, _ = l2_entry(p, 0, 1)
    patch(p, at, "Q", COPIED | 1 << 40)
    refused_on_read(p, "data cluster (L1 index 0, L2 index 1, guest offset 0x10000): expected "
                       "host bytes inside the file")


def test_truncated_data_cluster_is_an_error_where_qemu_reads_zeros(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "v3", tmp_path)
    _, value = l2_entry(p, 0, 1)
    os.truncate(p, (value & 0x00FFFFFFFFFFFE00) + 4096)
    run([require_tool("qemu-img"), "convert", "-O", "raw", str(p), str(tmp_path / "q.raw")])
    assert (tmp_path / "q.raw").read_bytes()[65536 + 4096 : 131072] == bytes(61440)
    refused_on_read(p, "data cluster (L1 index 0, L2 index 1, guest offset 0x10000)")


def test_zero_flag_in_a_version_2_image(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "v2", tmp_path)
    at, _ = l2_entry(p, 0, 5)
    patch(p, at, "Q", 1)
    refused_on_read(p, "L1 index 0, L2 index 5, guest offset 0x50000: expected no zero flag "
                       "(bit 0) in a version 2 image")


def _compressed_entry(path: Path, entry_size: int = 8, *, longest: bool = False
                      ) -> tuple[int, int, int]:
    """(file offset, value, l2 index) of the first (or the longest) compressed L2 entry."""
    found = []
    for i in range(64):
        at, value = l2_entry(path, 0, i, entry_size)
        if value & COMPRESSED:
            found.append((value >> 54 & 0xFF, at, value, i))
    assert found, "no compressed cluster"
    _, at, value, i = max(found) if longest else found[0]
    return at, value, i


def test_compressed_stream_in_cluster_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zlib", tmp_path)
    at, _, i = _compressed_entry(p)
    patch(p, at, "Q", COMPRESSED | 100)
    refused_on_read(p, f"compressed cluster (L1 index 0, L2 index {i}, guest offset "
                       f"{i * 65536:#x}): expected a host offset between cluster 0 and the end "
                       "of the file")


def test_compressed_stream_past_the_end(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zlib", tmp_path)
    at, _, _ = _compressed_entry(p)
    size = p.stat().st_size
    patch(p, at, "Q", COMPRESSED | 0xFF << 54 | (size - 100))
    refused_on_read(p, "expected a stream inside the file of")


def test_truncated_compressed_image(templates: dict[str, Path], tmp_path: Path) -> None:
    """The last 512 bytes of the last stream cut off."""
    p = copy(templates, "zlib", tmp_path)
    os.truncate(p, p.stat().st_size - 512)
    refused_on_read(p, "expected a stream inside the file of")


def test_compressed_offset_above_bit_55(templates: dict[str, Path], tmp_path: Path) -> None:
    """4 KiB clusters: the offset field reaches bit 57; bits 56-57 must be clear."""
    p = copy(templates, "zlib_c4k", tmp_path)
    at, value, _ = _compressed_entry(p)
    patch(p, at, "Q", value | 1 << 56)
    refused_on_read(p, "expected a host offset below 2^56")


def test_compressed_stream_too_short(templates: dict[str, Path], tmp_path: Path) -> None:
    """One sector of a multi-sector stream inflates to less than a cluster."""
    p = copy(templates, "zlib", tmp_path)
    at, value, i = _compressed_entry(p, longest=True)
    assert value >> 54 & 0xFF > 10
    patch(p, at, "Q", value & ~(0xFF << 54))
    message = refused_on_read(p, f"L2 index {i}", by_block_status=False)
    assert "a zlib stream inflating to 65536 bytes" in message


def test_compressed_stream_garbage(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zlib", tmp_path)
    _, value, _ = _compressed_entry(p)
    patch(p, value & ((1 << 54) - 1), "8s", b"\xff" * 8)
    refused_on_read(p, "a broken stream", by_block_status=False)


def test_zstd_stream_garbage(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "zstd", tmp_path)
    _, value, _ = _compressed_entry(p)
    patch(p, value & ((1 << 54) - 1), "8s", b"\xff" * 8)
    message = refused_on_read(p, "a broken stream", by_block_status=False)
    assert "a zstd stream" in message


def test_zstd_frame_with_a_huge_window(templates: dict[str, Path], tmp_path: Path) -> None:
    """A frame asking for a 1 GiB window is refused, not allocated."""
    import zstandard

    p = copy(templates, "zstd", tmp_path)
    _, value, _ = _compressed_entry(p)
    params = zstandard.ZstdCompressionParameters.from_level(
        1, window_log=30, write_content_size=False
    )
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = stream.compress(b"x" * 65536) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 30
    assert len(frame) < 512
    offset = value & ((1 << 54) - 1)
    patch(p, offset, f"{len(frame)}s", frame)
    refused_on_read(p, "a broken stream", by_block_status=False)


def test_extended_subcluster_allocated_and_zero(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "extl2", tmp_path)
    at, _ = l2_entry(p, 0, 0, 16)
    bitmap = read_u64(p, at + 8)
    patch(p, at + 8, "Q", bitmap | bitmap << 32)
    refused_on_read(p, "L1 index 0, L2 index 0, guest offset 0x0: expected no subcluster both "
                       "allocated and zero")


def test_extended_allocated_subclusters_without_a_host_cluster(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    p = copy(templates, "extl2", tmp_path)
    at, _ = l2_entry(p, 0, 2, 16)  # an unallocated cluster
    patch(p, at, "QQ", 0, 0x3)
    refused_on_read(p, "L2 index 2, guest offset 0x20000: expected no allocated subclusters "
                       "in a cluster without a host offset")


def test_extended_zero_flag_bit_0(templates: dict[str, Path], tmp_path: Path) -> None:
    p = copy(templates, "extl2", tmp_path)
    at, value = l2_entry(p, 0, 1, 16)
    patch(p, at, "Q", value | 1)
    refused_on_read(p, "expected reserved bits (0x3f000000000001ff) clear with extended L2")


def test_extended_compressed_cluster_with_a_bitmap(tmp_path: Path) -> None:
    src = _source(tmp_path / "src.raw", MiB)
    p = tmp_path / "ec.qcow2"
    qemu_img("convert", "-q", "-c", "-O", "qcow2", "-o", "extended_l2=on", src, p)
    at, _, i = _compressed_entry(p, 16)
    patch(p, at + 8, "Q", 1)
    refused_on_read(p, f"L2 index {i}, guest offset {i * 65536:#x}: expected a zero subcluster "
                       "bitmap for a compressed cluster")


def test_extended_subcluster_past_the_end_of_the_file(
    templates: dict[str, Path], tmp_path: Path
) -> None:
    """The file may end inside a host cluster after its last written subcluster, not before."""
    p = copy(templates, "extl2", tmp_path)
    _, value = l2_entry(p, 0, 1, 16)
    host = value & 0x00FFFFFFFFFFFE00
    assert p.stat().st_size == host + 65536
    os.truncate(p, host + 2048)
    refused_on_read(p, "data cluster (L1 index 0, L2 index 1, guest offset 0x10000)")


# -- fuzzer -----------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x200, 0x1000, 0xFFFF, 0x10000, 0x30000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 55, 1 << 56, 1 << 60, 1 << 62,
               1 << 63, (1 << 64) - 1, COPIED | 0x50000, COMPRESSED | 0x50000,
               COMPRESSED | 0xFF << 54 | 0x50000]
U32_FIELDS = [4, 16, 20, 32, 36, 56, 60, 96, 100]
U64_FIELDS = [8, 24, 40, 48, 64, 72, 80, 88]


class Seed:
    """A qemu-img-made image and where its mutable structures are."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.ext = bool(struct.unpack_from(">Q", self.data, 72)[0] & 0x10)
        l1_size = struct.unpack_from(">I", self.data, 36)[0]
        l1 = struct.unpack_from(">Q", self.data, 40)[0]
        cluster = 1 << struct.unpack_from(">I", self.data, 20)[0]
        self.l1 = [l1 + 8 * i for i in range(l1_size)]
        self.l2: list[int] = []
        self.compressed: list[int] = []
        for pos in self.l1:
            table = struct.unpack_from(">Q", self.data, pos)[0] & 0x00FFFFFFFFFFFE00
            if not table:
                continue
            for at in range(table, table + cluster, 16 if self.ext else 8):
                entry = struct.unpack_from(">Q", self.data, at)[0]
                if entry:
                    self.l2.append(at)
                if entry & COMPRESSED:
                    self.compressed.append(at)


mutation = st.one_of(
    st.tuples(st.just("u32"), st.sampled_from(U32_FIELDS), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u64"), st.sampled_from(U64_FIELDS), st.sampled_from(INTERESTING)),
    st.tuples(st.just("byte"), st.integers(0, 1100), st.integers(0, 255)),
    st.tuples(st.just("l1"), st.integers(0, 1000), st.sampled_from(INTERESTING)),
    st.tuples(st.just("l1_bit"), st.integers(0, 1000), st.integers(0, 63)),
    st.tuples(st.just("l2"), st.integers(0, 1000), st.sampled_from(INTERESTING)),
    st.tuples(st.just("l2_bit"), st.integers(0, 1000), st.integers(0, 127)),
    st.tuples(st.just("desc_bit"), st.integers(0, 1000), st.integers(0, 63)),
    st.tuples(st.just("data"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 70000), st.integers(0, 255)),
)


def mutate(seed: Seed, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(seed.data)

    def put(fmt: str, pos: int, value: int) -> None:
        if pos + struct.calcsize(fmt) <= len(buf):
            struct.pack_into(fmt, buf, pos, value & (0xFFFFFFFF if fmt == ">I" else (1 << 64) - 1))

    def word(pos: int) -> int:
        if pos + 8 > len(buf):
            return 0
        value: int = struct.unpack_from(">Q", buf, pos)[0]
        return value

    for kind, pos, value in edits:
        if kind == "u32":
            put(">I", pos, value)
        elif kind == "u64":
            put(">Q", pos, value)
        elif kind == "byte" and pos < len(buf):
            buf[pos] = value
        elif kind in ("l1", "l1_bit") and seed.l1:
            at = seed.l1[pos % len(seed.l1)]
            put(">Q", at, value if kind == "l1" else word(at) ^ 1 << value)
        elif kind == "l2" and seed.l2:
            put(">Q", seed.l2[pos % len(seed.l2)], value)
        elif kind == "l2_bit" and seed.l2:
            at = seed.l2[pos % len(seed.l2)] + (8 if value >= 64 and seed.ext else 0)
            put(">Q", at, word(at) ^ 1 << (value % 64))
        elif kind == "desc_bit" and seed.compressed:
            at = seed.compressed[pos % len(seed.compressed)]
            put(">Q", at, word(at) ^ 1 << value)
        elif kind == "data" and buf:
            buf[pos % len(buf)] = value
        elif kind == "truncate" and buf:
            del buf[pos % len(buf) :]
        elif kind == "extend":
            buf += bytes([value]) * pos
    return bytes(buf)


@pytest.fixture(scope="module")
def seeds(templates: dict[str, Path]) -> dict[str, Seed]:
    return {name: Seed(path) for name, path in templates.items()}


stats = {"executions": 0, "refused_at_open": 0, "refused_on_read": 0, "read": 0}
# One worker runs the whole file (make test: --dist loadgroup): the report reads ``stats``.
pytestmark = pytest.mark.xdist_group("hostile-qcow2")


def exercise(path: Path, root: Path) -> None:
    """Open under a backing root, map the whole disk, read it (or its ends)."""
    stats["executions"] += 1
    try:
        store = open_qcow2(path, ChainGuard(root=str(root)))
    except AddCowError as exc:
        assert str(exc)
        stats["refused_at_open"] += 1
        return
    try:
        for n, _ in enumerate(store.block_status_at(0, store.size, 0)):
            if n > 200_000:
                break
        chunk = bytearray(MiB)
        if store.size <= 8 * MiB:
            for off in range(0, store.size, MiB):
                store.readinto(memoryview(chunk), off)
        else:
            rng = random.Random(store.size)
            for off in [0, store.size - 65536, *(rng.randrange(store.size) for _ in range(4))]:
                store.readinto(memoryview(chunk)[:65536], max(0, off))
        stats["read"] += 1
    except AddCowError as exc:
        assert str(exc)
        stats["refused_on_read"] += 1
    finally:
        store.close()


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=not CAMPAIGN,
          suppress_health_check=[HealthCheck.too_slow], database=None)
@given(name=st.sampled_from(["v3", "v2", "zlib", "zstd", "zlib_c4k", "extl2", "c512"]),
       edits=st.lists(mutation, min_size=1, max_size=6))
def test_mutated_qcow2_raise_only_addcow_errors_in_bounded_memory(
    seeds: dict[str, Seed], templates: dict[str, Path], name: str,
    edits: list[tuple[str, int, int]]
) -> None:
    root = templates["v3"].parent
    path = root / "fuzz" / "d.qcow2"
    path.parent.mkdir(exist_ok=True)
    if not (path.parent / "base.raw").exists():
        shutil.copy(root / "base.raw", path.parent / "base.raw")
    path.write_bytes(mutate(seeds[name], edits))
    tracemalloc.start()
    try:
        exercise(path, path.parent)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{name} {edits}: {peak} bytes allocated"


def test_report_fuzz_executions() -> None:
    """Runs after the fuzzer: it did open and read images, and refused some."""
    print(f"\nhostile qcow2: {stats}", file=sys.stderr)
    assert stats["executions"] >= EXAMPLES
    assert stats["read"] > 0
    assert stats["refused_at_open"] > 0
    assert stats["refused_on_read"] > 0
