"""``addcow check``: every finding built by hand, its exit status, and its repair.

The test image, unless a test says otherwise (version 2, 64 KiB clusters)::

    d.add-cow   header 4096 bytes, bitmap 2 bytes at 4096 (10 clusters, 6 padding bits)
    d.raw       640 KiB image file
    base.raw    1 MiB raw backing (conftest's base_raw, 16 clusters)

Header fields are poked at the offsets of the specification's table:
compatible_features at 36, autoclear_features at 44, incompatible at 28.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern, require_tool, run
from conftest import addcow as addcow_cli

import addcow
from addcow import sysio
from addcow.check import CheckResult, check_image
from addcow.format import Header

CLUSTERS = 10
BITMAP = 4096
COMPAT = 36
AUTOCLEAR = 44

NO_ERRORS = "No errors were found on the image.\n"
CORRUPT = (
    "errors were found on the image.\n"
    "Data may be corrupted, or further writes to the image may corrupt it.\n"
)
LEAKED = (
    "leaked clusters were found on the image.\n"
    "This means waste of disk space, but no harm to data.\n"
)


# -- building images --------------------------------------------------------------


def make_image(tmp_path: Path, base: Path | None, *, version: int = 2, name: str = "d") -> Path:
    path = tmp_path / f"{name}.add-cow"
    image_file = tmp_path / f"{name}.raw"
    if version == 1:
        with open(image_file, "wb") as f:
            f.truncate(CLUSTERS * CLUSTER)
    addcow.create(
        path,
        image_file=image_file.name,
        backing_file=base.name if base is not None else None,
        size=CLUSTERS * CLUSTER,
        version=version,
    )
    return path


def write_clusters(path: Path, clusters: range) -> None:
    with addcow.open(path) as img:
        for c in clusters:
            img.write(pattern(0xA0 + c, CLUSTER), c * CLUSTER)


def peek(path: Path, offset: int, length: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def poke_u64(path: Path, offset: int, value: int) -> None:
    poke(path, offset, struct.pack("<Q", value))


def read_u64(path: Path, offset: int) -> int:
    value: int = struct.unpack("<Q", peek(path, offset, 8))[0]
    return value


def rewrite_header(path: Path, **changes: object) -> None:
    """Change header fields through the codec (keeps the header valid)."""
    raw = peek(path, 0, 4096)
    poke(path, 0, Header.unpack(raw).with_changes(**changes).pack())


def check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return addcow_cli("check", *args, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("addcow: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def summary(allocated: int, total: int = CLUSTERS, end: int = BITMAP + 2) -> str:
    percent = 100.0 * allocated / total
    return f"{allocated}/{total} = {percent:.2f}% allocated\nImage end offset: {end}\n"


_HOLD = (
    "import sys, addcow\n"
    "img = addcow.open(sys.argv[1], readonly=sys.argv[2] == 'ro')\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
    "img.close()\n"
)


@contextmanager
def held_open(path: Path, mode: str) -> Iterator[None]:
    """Another process keeps ``path`` open ('rw' or 'ro') until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        yield
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


# -- clean images -----------------------------------------------------------------


def test_clean_new_image(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    proc = check(path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == NO_ERRORS + summary(0)


def test_clean_image_with_data_counts_allocated(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(0, 3))
    proc = check("-f", "add-cow", path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == NO_ERRORS + summary(3)


def test_clean_version_1_image(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw, version=1)
    write_clusters(path, range(CLUSTERS))  # full bitmap: version 1 has no flag to set
    proc = check(path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == NO_ERRORS + summary(CLUSTERS)


def test_clean_image_without_backing_file(tmp_path: Path) -> None:
    path = make_image(tmp_path, None)
    assert check(path).returncode == 0


def test_quiet_prints_nothing_on_stdout(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    proc = check("-q", path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_repair_of_a_clean_image_changes_nothing(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    before = path.read_bytes()
    proc = check("-r", "all", path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == NO_ERRORS + summary(0)
    assert path.read_bytes() == before


# -- padding bits (leak: readers ignore them, -r leaks) ---------------------------------


def test_padding_bits_are_a_leak(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(9, 10))  # bit 1 of byte 1 is cluster 9, a real bit
    assert peek(path, BITMAP + 1) == b"\x02"
    poke(path, BITMAP + 1, b"\xc2")  # bits 6 and 7: padding
    before = path.read_bytes()
    stat_before = os.stat(path)

    proc = check(path)
    assert proc.returncode == 3
    assert proc.stderr == (
        "Leak bitmap: padding bits past the last cluster (9) must be zero, "
        "found bitmap byte 1 = 0xc2\n"
    )
    assert proc.stdout == "\n2 " + LEAKED + summary(1)
    assert path.read_bytes() == before  # a check without -r writes nothing
    assert os.stat(path).st_mtime_ns == stat_before.st_mtime_ns


def test_padding_bits_are_repaired_by_repair_leaks(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    poke(path, BITMAP + 1, b"\x80")
    proc = check("-r", "leaks", path)
    assert proc.returncode == 0
    assert proc.stderr == "Repairing bitmap: clearing the padding bits of bitmap byte 1\n"
    assert peek(path, BITMAP + 1) == b"\x00"


def test_padding_bits_repaired(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(9, 10))
    poke(path, BITMAP + 1, b"\xc2")

    proc = check("-r", "all", path)
    assert proc.returncode == 0
    assert proc.stderr == "Repairing bitmap: clearing the padding bits of bitmap byte 1\n"
    assert proc.stdout == (
        "The following inconsistencies were found and repaired:\n\n"
        "    2 leaked clusters\n"
        "    0 corruptions\n\n"
        "Double checking the fixed image now...\n" + NO_ERRORS + summary(1)
    )
    assert peek(path, BITMAP, 2) == b"\x00\x02"  # cluster 9's bit survives
    assert check(path).returncode == 0
    with addcow.open(path, readonly=True) as img:
        assert img.read(9 * CLUSTER, CLUSTER) == pattern(0xA9, CLUSTER)


# -- ALL_ALLOCATED set with clear bits (corruption, -r all) --------------------------


def test_all_allocated_with_clear_bits_is_a_corruption(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(0, 4))
    poke_u64(path, COMPAT, 0x1)

    proc = check(path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "ERROR compatible_features: ALL_ALLOCATED is set but 6 of 10 clusters have a "
        "clear bit (first: cluster 4)\n"
    )
    assert proc.stdout == "\n6 " + CORRUPT + summary(4)
    assert check("-r", "leaks", path).returncode == 2
    assert peek(path, BITMAP, 2) == b"\x0f\x00"


def test_all_allocated_with_clear_bits_repaired_keeps_content(
    tmp_path: Path, base_raw: Path
) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(0, 4))
    # Readers honour the flag: every cluster now reads from the image file.
    poke(tmp_path / "d.raw", 5 * CLUSTER, pattern(0x55, CLUSTER))
    poke_u64(path, COMPAT, 0x1)
    with addcow.open(path, readonly=True) as img:
        content = img.read(0, img.size)
    assert content[5 * CLUSTER : 6 * CLUSTER] == pattern(0x55, CLUSTER)

    proc = check("-r", "all", path)
    assert proc.returncode == 0
    assert proc.stderr == (
        "Repairing bitmap: setting the 6 bits that ALL_ALLOCATED implies "
        "(readers already use the image file for those clusters)\n"
    )
    assert "    6 corruptions\n" in proc.stdout
    assert proc.stdout.endswith(NO_ERRORS + summary(CLUSTERS))
    assert peek(path, BITMAP, 2) == b"\xff\x03"
    assert read_u64(path, COMPAT) == 0x1
    with addcow.open(path, readonly=True) as img:
        assert img.read(0, img.size) == content


def test_all_allocated_repair_over_several_bitmap_pages(tmp_path: Path) -> None:
    """4 KiB clusters, 32771 of them: a 4097-byte bitmap, two pages to write."""
    path = tmp_path / "big.add-cow"
    clusters = 4096 * 8 + 3
    addcow.create(path, image_file="big.raw", size=clusters * 4096, cluster_size=4096)
    poke_u64(path, COMPAT, 0x1)
    result = check_image(path)
    assert (result.corruptions, result.exit_status) == (clusters, 2)

    result = check_image(path, repair="all")
    assert (result.corruptions, result.corruptions_fixed, result.exit_status) == (0, clusters, 0)
    assert result.allocated_clusters == result.total_clusters == clusters
    assert peek(path, BITMAP, 4097) == b"\xff" * 4096 + b"\x07"


# -- ALL_ALLOCATED out of date (leak, -r leaks) ---------------------------------------


def test_full_bitmap_sets_the_flag_on_flush(tmp_path: Path, base_raw: Path) -> None:
    """Control for the next test: a writer sets ALL_ALLOCATED itself."""
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(CLUSTERS))
    assert read_u64(path, COMPAT) == 0x1
    assert check(path).returncode == 0


def test_flag_out_of_date_is_a_leak(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(CLUSTERS))
    poke_u64(path, COMPAT, 0)

    proc = check(path)
    assert proc.returncode == 3
    assert proc.stderr == (
        "Leak compatible_features: all 10 clusters are allocated but ALL_ALLOCATED is "
        "not set (flag out of date)\n"
    )
    assert proc.stdout == "\n1 " + LEAKED + summary(CLUSTERS)

    proc = check("-r", "leaks", path)
    assert proc.returncode == 0
    assert proc.stderr == (
        "Repairing compatible_features: setting ALL_ALLOCATED (every cluster is allocated)\n"
    )
    assert "    1 leaked clusters\n    0 corruptions\n" in proc.stdout
    assert read_u64(path, COMPAT) == 0x1
    assert check(path).returncode == 0


# -- unknown autoclear bits (leak, -r leaks) ------------------------------------------


def test_unknown_autoclear_bits_are_a_leak(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    poke_u64(path, AUTOCLEAR, 0x8000000000000004)
    before = path.read_bytes()

    proc = check(path)
    assert proc.returncode == 3
    assert proc.stderr == (
        "Leak autoclear_features: unknown bits 0x8000000000000004 are set "
        "(a writer that does not know them clears them)\n"
    )
    assert path.read_bytes() == before  # unlike a read-write open, check keeps them

    proc = check("-r", "leaks", path)
    assert proc.returncode == 0
    assert proc.stderr == "Repairing autoclear_features: clearing unknown bits 0x8000000000000004\n"
    after = path.read_bytes()
    assert read_u64(path, AUTOCLEAR) == 0
    assert after[:AUTOCLEAR] == before[:AUTOCLEAR]
    assert after[AUTOCLEAR + 8 :] == before[AUTOCLEAR + 8 :]


def test_repair_leaks_leaves_corruptions(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    poke_u64(path, COMPAT, 0x1)  # ALL_ALLOCATED with no bit set: corruption
    poke_u64(path, AUTOCLEAR, 0x4)

    proc = check("-r", "leaks", "--output=json", path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "Repairing autoclear_features: clearing unknown bits 0x4",
        f"ERROR compatible_features: ALL_ALLOCATED is set but {CLUSTERS} of {CLUSTERS} "
        "clusters have a clear bit (first: cluster 0)",
    ]
    assert json.loads(proc.stdout) == {
        "filename": str(path),
        "format": "add-cow",
        "check-errors": 0,
        "image-end-offset": BITMAP + 2,
        "corruptions": CLUSTERS,
        "leaks-fixed": 1,
        "total-clusters": CLUSTERS,
    }
    assert read_u64(path, AUTOCLEAR) == 0
    assert peek(path, BITMAP, 2) == b"\x00\x00"


def test_corruption_and_leak_together(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    poke_u64(path, COMPAT, 0x1)
    poke_u64(path, AUTOCLEAR, 0x4)
    proc = check(path)
    assert proc.returncode == 2
    assert proc.stdout == f"\n{CLUSTERS} " + CORRUPT + "\n1 " + LEAKED + summary(0)

    proc = check("-r", "all", path)
    assert proc.returncode == 0
    assert f"    1 leaked clusters\n    {CLUSTERS} corruptions\n" in proc.stdout
    assert (peek(path, BITMAP, 2), read_u64(path, AUTOCLEAR)) == (b"\xff\x03", 0)


def test_repair_writes_bitmap_then_header_with_syncs(
    tmp_path: Path, base_raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash ordering: image file synced, bitmap written and synced, header last."""
    path = make_image(tmp_path, base_raw)
    poke_u64(path, COMPAT, 0x1)
    poke_u64(path, AUTOCLEAR, 0x4)
    calls: list[tuple[str, str, int]] = []
    real_write, real_sync = sysio.pwrite_full, sysio.fdatasync

    def write(fd: int, buffers: list[memoryview], offset: int, name: str) -> None:
        calls.append(("write", os.path.basename(name), offset))
        real_write(fd, buffers, offset, name)

    def sync(fd: int, name: str) -> None:
        calls.append(("sync", os.path.basename(name), 0))
        real_sync(fd, name)

    monkeypatch.setattr(sysio, "pwrite_full", write)
    monkeypatch.setattr(sysio, "fdatasync", sync)
    result = check_image(path, repair="all")
    assert calls == [
        ("sync", "d.raw", 0),
        ("write", "d.add-cow", BITMAP),
        ("sync", "d.add-cow", 0),
        ("write", "d.add-cow", 36),  # only the feature fields, bytes 36-51
        ("sync", "d.add-cow", 0),
    ]
    assert (result.corruptions_fixed, result.leaks_fixed, result.exit_status) == (CLUSTERS, 1, 0)


def test_repair_with_a_larger_header(tmp_path: Path) -> None:
    """header_size 8192: the bitmap (and its repair) starts at byte 8192."""
    path = tmp_path / "h.add-cow"
    with open(tmp_path / "h.raw", "wb") as f:
        f.truncate(CLUSTERS * CLUSTER)
    header = Header(version=2, image_name=b"h.raw", image_size=CLUSTERS * CLUSTER, header_size=8192)
    path.write_bytes(header.pack() + b"\x00\xfc")  # the 6 padding bits set
    poke_u64(path, AUTOCLEAR, 0x2)
    result = check_image(path)
    assert (result.corruptions, result.leaks, result.image_end_offset) == (0, 7, 8194)

    result = check_image(path, repair="all")
    assert (result.corruptions_fixed, result.leaks_fixed, result.exit_status) == (0, 7, 0)
    assert peek(path, 8192, 2) == b"\x00\x00"
    assert Header.unpack(peek(path, 0, 8192)) == header


# -- could not check: one line on stderr, exit 1 ----------------------------------------


def _bad_magic(path: Path) -> None:
    poke(path, 0, b"NOT_COW!")


def _missing_image_file(path: Path) -> None:
    os.unlink(path.with_suffix(".raw"))


def _truncated_bitmap(path: Path) -> None:
    os.truncate(path, BITMAP + 1)


def _unknown_incompatible_bit(path: Path) -> None:
    poke_u64(path, 28, 0x10)


def _bad_cluster_bits(path: Path) -> None:
    poke(path, 56, struct.pack("<I", 40))


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (_bad_magic, ("invalid header field magic", "b'NOT_COW!'")),
        (_missing_image_file, ("d.raw: image file not found",)),
        (_truncated_bitmap, ("bitmap truncated", "expected 4098 bytes", "4097 bytes")),
        (_unknown_incompatible_bit, ("incompatible_features", "0x10")),
        (_bad_cluster_bits, ("cluster_bits", "12..30", "40")),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_could_not_check(
    tmp_path: Path, base_raw: Path, damage: Callable[[Path], None], needles: tuple[str, ...]
) -> None:
    path = make_image(tmp_path, base_raw)
    assert check(path).returncode == 0  # control: the undamaged image
    damage(path)
    proc = check(path)
    assert_one_line_error(proc, str(path) if damage is not _missing_image_file else "", *needles)
    assert_one_line_error(check("--output=json", path), *needles)


def test_missing_add_cow_file(tmp_path: Path) -> None:
    assert_one_line_error(check(tmp_path / "nope.add-cow"), "nope.add-cow: cannot open")


def test_could_not_check_raises_addcow_errors(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    _truncated_bitmap(path)
    with pytest.raises(addcow.BitmapError, match="bitmap truncated"):
        check_image(path)
    _bad_magic(path)
    with pytest.raises(addcow.HeaderError, match="magic"):
        check_image(path)


# -- the image file ---------------------------------------------------------------------


def test_image_file_too_small_is_a_corruption(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    os.truncate(tmp_path / "d.raw", 3 * CLUSTER)
    poke(path, BITMAP + 1, b"\x80")  # the rest of the check still runs
    proc = check("-r", "all", path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"ERROR image file: {tmp_path / 'd.raw'}: image file too small: expected at least "
        f"{CLUSTERS * CLUSTER} bytes (image_size), found {3 * CLUSTER}",
        "Repairing bitmap: clearing the padding bits of bitmap byte 1",
    ]
    assert "\n1 " + CORRUPT in proc.stdout
    assert os.path.getsize(tmp_path / "d.raw") == 3 * CLUSTER  # not "repaired" by guessing


def test_image_file_is_the_add_cow_file(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    rewrite_header(path, image_name=b"d.add-cow")
    proc = check(path)
    assert proc.returncode == 2
    assert "ERROR image file: " in proc.stderr
    assert "already used as" in proc.stderr


# -- the backing chain ------------------------------------------------------------------


def test_missing_backing_file_is_a_check_error(tmp_path: Path, base_raw: Path) -> None:
    """As qemu-img check: a file it cannot open is a check not done (1), not a
    corruption (2), which scripts act on."""
    path = make_image(tmp_path, base_raw)
    os.unlink(base_raw)
    proc = check(path)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"Check error backing chain: {base_raw}: cannot open backing file: "
        "No such file or directory\naddcow: check failed\n"
    )
    assert proc.stdout == "\n1 internal errors have occurred during the check.\n" + summary(0)
    assert check("-r", "all", path).returncode == 1


def test_complete_image_does_not_need_its_backing_file(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(CLUSTERS))
    os.unlink(base_raw)
    assert check(path).returncode == 0


def test_repairing_the_flag_makes_the_backing_file_unneeded(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(CLUSTERS))
    poke_u64(path, COMPAT, 0)
    os.unlink(base_raw)
    assert check(path).returncode == 1  # readers would open the backing: it is gone
    proc = check("-r", "leaks", path)
    assert proc.returncode == 0
    assert proc.stdout.endswith(NO_ERRORS + summary(CLUSTERS))


def test_backing_chain_loop(tmp_path: Path, base_raw: Path) -> None:
    lower = make_image(tmp_path, base_raw, name="a")
    upper = tmp_path / "b.add-cow"
    addcow.create(upper, image_file="b.raw", backing_file="a.add-cow", backing_format="add-cow")
    assert check(upper).returncode == 0  # control
    rewrite_header(lower, backing_name=b"b.add-cow", backing_format="add-cow")
    for path in (upper, lower):
        proc = check(path)
        assert proc.returncode == 2
        assert proc.stderr.startswith("ERROR backing chain: ")
        assert "must not loop" in proc.stderr


def test_backing_chain_too_deep(tmp_path: Path, base_raw: Path) -> None:
    below: Path = base_raw
    fmt = "raw"
    for level in range(16):  # 16 backing files below the top one: the limit
        path = tmp_path / f"l{level}.add-cow"
        addcow.create(path, image_file=f"l{level}.raw", backing_file=below.name, backing_format=fmt)
        below, fmt = path, "add-cow"
    assert check(below).returncode == 0
    top = tmp_path / "top.add-cow"
    addcow.create(top, image_file="top.raw", size=16 * CLUSTER)
    rewrite_header(top, backing_name=below.name.encode(), backing_format="add-cow")
    proc = check(top)
    assert proc.returncode == 2
    assert "backing chain deeper than 16 levels" in proc.stderr


def test_broken_add_cow_in_the_chain(tmp_path: Path, base_raw: Path) -> None:
    lower = make_image(tmp_path, base_raw, name="a")
    upper = tmp_path / "b.add-cow"
    addcow.create(upper, image_file="b.raw", backing_file="a.add-cow", backing_format="add-cow")
    _truncated_bitmap(lower)
    proc = check(upper)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ERROR backing chain: ")
    assert "bitmap truncated" in proc.stderr


def test_version_1_without_recorded_backing_format(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw, version=1)
    assert check(path).returncode == 0  # control: NO_PROBE recorded by create
    poke_u64(path, 28, 0x1)  # BACKING_FILE without BACKING_FORMAT_NO_PROBE
    proc = check(path)
    assert proc.returncode == 1  # the chain cannot be checked without probing
    assert "backing file format not recorded" in proc.stderr
    assert "addcow does not probe formats" in proc.stderr


def test_locked_backing_file_is_a_check_error(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    writer = tmp_path / "w.add-cow"  # an image whose image file is base.raw
    addcow.create(writer, image_file=base_raw.name, image_file_raw=True)
    with held_open(writer, "rw"):
        proc = check(path)
        assert proc.returncode == 1
        lines = proc.stderr.splitlines()
        assert lines[0].startswith(f"Check error backing chain: {base_raw}: failed to get")
        assert lines[-1] == "addcow: check failed"
        assert proc.stdout == "\n1 internal errors have occurred during the check.\n" + summary(0)
        assert json.loads(check("--output=json", path).stdout)["check-errors"] == 1
        assert check("-U", path).returncode == 0


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes; check must refuse it."""
    fifo = tmp_path / "d.add-cow"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "addcow", "check", str(fifo)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr == f"addcow: {fifo}: cannot open: not a regular file or block device\n"


# -- locking ------------------------------------------------------------------------------


def test_image_in_use_needs_force_share(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    with held_open(path, "rw"):
        assert_one_line_error(check(path), "failed to get read lock", "-U")
        proc = check("-U", path)
        assert (proc.returncode, proc.stderr) == (0, "")
        assert proc.stdout == NO_ERRORS + summary(0)
        assert_one_line_error(check("-U", "-r", "all", path), "-U cannot be used with -r")


def test_repair_needs_the_exclusive_lock(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    poke_u64(path, AUTOCLEAR, 0x4)
    with held_open(path, "ro"):
        assert check(path).returncode == 3  # two readers share the lock
        assert_one_line_error(check("-r", "leaks", path), "failed to get write lock")
        assert read_u64(path, AUTOCLEAR) == 0x4
    assert check("-r", "leaks", path).returncode == 0


# -- JSON, against qemu-img's own output ------------------------------------------------------


def test_json_fields(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(0, 2))
    proc = check("--output=json", path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout) == {
        "filename": str(path),
        "format": "add-cow",
        "check-errors": 0,
        "image-end-offset": BITMAP + 2,
        "total-clusters": CLUSTERS,
        "allocated-clusters": 2,
    }


def test_json_has_the_fields_qemu_img_check_has(tmp_path: Path, base_raw: Path) -> None:
    """Same key set as qemu-img check on a clean qcow2 and on a repaired one."""
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    qcow2 = tmp_path / "q.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(qcow2), "1M"])
    run([qemu_io, "-c", "write 0 64k", str(qcow2)])
    ours = make_image(tmp_path, base_raw)
    write_clusters(ours, range(0, 1))
    qemu = json.loads(run([qemu_img, "check", "--output=json", str(qcow2)]).stdout)
    mine = json.loads(check("--output=json", ours).stdout)
    assert set(mine) == set(qemu)

    # A leak in the qcow2: a refcount of 1 for an unused cluster (cluster 10).
    with open(qcow2, "r+b") as f:
        f.seek(48)
        (reftable,) = struct.unpack(">Q", f.read(8))
        f.seek(reftable)
        (refblock,) = struct.unpack(">Q", f.read(8))
        f.seek(refblock + 2 * 10)
        f.write(struct.pack(">H", 1))
        f.truncate(12 * CLUSTER)
    poke_u64(ours, AUTOCLEAR, 0x4)
    for qemu_args, our_args, status in (([], [], 3), (["-r", "leaks"], ["-r", "leaks"], 0)):
        proc = run([qemu_img, "check", *qemu_args, "--output=json", str(qcow2)], check=False)
        assert proc.returncode == status
        mine_proc = check(*our_args, "--output=json", ours)
        assert mine_proc.returncode == status
        assert set(json.loads(mine_proc.stdout)) == set(json.loads(proc.stdout))


# -- the library --------------------------------------------------------------------------------


def test_library_result(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    write_clusters(path, range(0, 3))
    poke_u64(path, AUTOCLEAR, 0x4)
    result = check_image(path)
    assert result == CheckResult(
        filename=str(path),
        leaks=1,
        messages=[
            "Leak autoclear_features: unknown bits 0x4 are set "
            "(a writer that does not know them clears them)"
        ],
        allocated_clusters=3,
        total_clusters=CLUSTERS,
        image_end_offset=BITMAP + 2,
    )
    assert result.exit_status == 3
    fixed = check_image(path, repair="leaks")
    assert (fixed.leaks, fixed.leaks_fixed, fixed.exit_status) == (0, 1, 0)
    assert fixed.messages == ["Repairing autoclear_features: clearing unknown bits 0x4"]


def test_library_rejects_bad_arguments(tmp_path: Path, base_raw: Path) -> None:
    path = make_image(tmp_path, base_raw)
    with pytest.raises(ValueError, match="repair must be"):
        check_image(path, repair="some")
    with pytest.raises(ValueError, match="force_share"):
        check_image(path, repair="all", force_share=True)
