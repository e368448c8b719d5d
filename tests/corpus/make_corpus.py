"""Write the seed corpus of .add-cow files for tests/test_hostile_images.py.

One file per malformed case of tests/test_format.py (same names), plus the two
valid control images and the huge-size cases. Each file is the whole .add-cow
file (header and bitmap); the fuzzer pairs it with a 1 MiB ``disk.raw`` image
file and a 1 MiB ``base.raw`` backing file (``fifo`` is a FIFO). Run from the
repository root to regenerate: ``.venv/bin/python tests/corpus/make_corpus.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import MiB, poke, v1_header, v2_header  # noqa: E402


def cases() -> dict[str, bytes]:
    v2, v1 = v2_header, v1_header
    bm = b"\0\0"
    out: dict[str, bytes] = {
        "control_valid_v2": bytes(v2()) + bm,
        "control_valid_v1": bytes(v1()) + bm,
        "control_v2_no_backing_small_clusters": bytes(
            v2(backing=None, header_size=8192, cluster_bits=12, image_size=20 * 4096)
        ) + b"\x01\x02\x08",
        "short_buffer": bytes(v2()[:20]),
        "short_v2_header": bytes(v2()[:60]),
        "short_v1_header": bytes(v1()[:100]),
        "v2_file_shorter_than_header_size": bytes(v2(header_size=8192)[:5000]),
        "bad_magic": bytes(poke(v2(), "magic", b"QFI\xfb\0\0\0\x03")) + bm,
        "version_0": bytes(poke(v2(), "version", 0)) + bm,
        "version_3": bytes(poke(v2(), "version", 3)) + bm,
        "header_size_not_multiple_of_4096": bytes(poke(v2(), "header_size", 5000)) + bm,
        "header_size_too_small": bytes(poke(v2(), "header_size", 0)) + bm,
        "header_size_too_large": bytes(poke(v2(), "header_size", 2 * MiB)) + bm,
        "cluster_bits_11": bytes(poke(v2(), "cluster_bits", 11)) + bm,
        "cluster_bits_31": bytes(poke(v2(), "cluster_bits", 31)) + bm,
        "image_size_0": bytes(poke(v2(), "image_size", 0)) + bm,
        "image_size_huge": bytes(poke(v2(), "image_size", 1 << 63)) + bm,
        "image_size_too_many_clusters": bytes(
            poke(poke(v2(), "cluster_bits", 12), "image_size", (1 << 44) + 4096)
        ) + bm,
        "image_name_offset_past_header": bytes(poke(v2(), "image_filename_offset", 5000)) + bm,
        "backing_name_offset_past_header": bytes(
            poke(v2(), "backing_filename_offset", 4095)
        ) + bm,
        "image_name_runs_past_header": bytes(poke(v2(), "image_filename_size", 4050)) + bm,
        "backing_size_without_offset": bytes(poke(v2(), "backing_filename_offset", 0)) + bm,
        "v1_name_offset_past_header": bytes(poke(v1(), "image_filename_offset", 4096)) + bm,
        "image_name_size_zero": bytes(poke(v2(), "image_filename_size", 0)) + bm,
        "backing_name_size_zero": bytes(poke(v2(), "backing_filename_size", 0)) + bm,
        "v1_backing_name_size_zero": bytes(poke(v1(), "backing_filename_size", 0)) + bm,
        "names_overlap_each_other": bytes(poke(v2(), "image_filename_offset", 88)) + bm,
        "v1_names_overlap_each_other": bytes(poke(v1(), "image_filename_offset", 40)) + bm,
        "name_overlaps_fixed_fields": bytes(poke(v2(), "backing_filename_offset", 60)) + bm,
        "v1_name_overlaps_fixed_fields": bytes(poke(v1(), "backing_filename_offset", 20)) + bm,
        "nul_in_image_name": bytes(v2(image=b"disk\0raw")) + bm,
        "nul_in_backing_name": bytes(v2(backing=b"base\0raw")) + bm,
        "backing_format_unknown": bytes(v2(fmt=b"vmdk")) + bm,
        "backing_format_not_ascii": bytes(v2(fmt=b"r\xffw")) + bm,
        "backing_format_garbage_padding": bytes(v2(fmt=b"raw\0x")) + bm,
        "backing_format_set_without_backing": bytes(
            poke(v2(backing=None), "backing_format", b"raw")
        ) + bm,
        "backing_format_missing_with_backing": bytes(v2(fmt=b"")) + bm,
        "incompatible_feature_bit_set": bytes(poke(v2(), "features", 1)) + bm,
        "v1_unknown_feature_bit": bytes(v1(features=0x07)) + bm,
        "v1_backing_file_bit_clear_with_backing_name": bytes(v1(features=0x02)) + bm,
        "v1_backing_file_bit_set_without_backing_name": bytes(
            v1(backing=None, features=0x01)
        ) + bm,
        "truncated_bitmap": bytes(v2()) + b"\0",
        "v1_truncated_bitmap": bytes(v1()),
        "missing_image_file": bytes(v2(image=b"missing.raw")) + bm,
        "missing_backing_file": bytes(v2(backing=b"missing-base.raw")) + bm,
        "names_are_literal_files_not_urls_or_json": bytes(
            v2(backing=b'json:{"file": {"driver": "file", "filename": "/etc/passwd"}}')
        ) + bm,
        "backing_file_is_a_fifo": bytes(v2(backing=b"fifo")) + bm,
        "image_file_is_the_add_cow_file": bytes(v2(image=b"d.add-cow")) + bm,
        "backing_file_is_the_add_cow_file": bytes(v2(backing=b"d.add-cow", fmt=b"add-cow"))
        + bm,
        "v1_backing_without_no_probe": bytes(v1(features=0x01)) + bm,
        "unknown_autoclear_bits": bytes(
            poke(v2(), "autoclear_features", 0x8000_0000_0000_0010)
        ) + bm,
        "unknown_compatible_bits": bytes(poke(v2(), "compatible_features", 0x40)) + bm,
        "bits_past_the_last_cluster": bytes(v2(image_size=13 * 65536 + 1)) + b"\x00\xc0",
        "all_allocated_with_truncated_bitmap": bytes(
            poke(v2(), "compatible_features", 0x1)
        ) + b"\xff",
        "all_allocated_flag_bits_clear": bytes(poke(v2(), "compatible_features", 0x1)) + bm,
        "huge_image_with_small_image_file": bytes(
            v2(backing=None, cluster_bits=30, image_size=1 << 60)
        ),
        "huge_image_truncated_bitmap": bytes(
            v2(backing=None, cluster_bits=12, image_size=(16 << 40) - 4096)
        ),
        "huge_name_sizes": bytes(
            poke(poke(v2(), "image_filename_size", 0xFFFFFFFF), "header_size", 1 << 20)
        ) + bytes((1 << 20) - 4096),
    }
    buf = v2(header_size=8192)
    buf[8191] = 0xFF
    out["nonzero_byte_in_second_header_page"] = bytes(buf) + bm
    buf = v2()
    buf[150] = 1
    out["nonzero_unused_v2_header_byte"] = bytes(buf) + bm
    return out


def main() -> None:
    for old in HERE.glob("*.add-cow"):
        old.unlink()
    for name, data in cases().items():
        (HERE / f"{name}.add-cow").write_bytes(data)
    print(f"{len(cases())} seeds written to {HERE}")


if __name__ == "__main__":
    main()
