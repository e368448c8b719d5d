"""The sparse writer and hole test of ``addcow.sysio``, against plain Python.

``write_sparse`` must leave the file equal to the buffer, report the bytes it
wrote and left as zero exactly (4 KiB granules, the tail counted as one), and
leave zero granules as holes. Its zero-run search gallops (steps double and
halve), so runs of every length around the step sizes are generated; its
data-run search samples the first byte of each granule, so data granules that
begin with a zero byte are generated too.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addcow import sysio, zeros

G = zeros.GRANULE


def expected_counts(data: bytes) -> tuple[int, int]:
    """(written, zero) computed granule by granule, the slow obvious way."""
    written = 0
    for pos in range(0, len(data), G):
        block = data[pos : pos + G]
        if any(block):
            written += len(block)
    return written, len(data) - written


runs = st.lists(
    st.tuples(st.booleans(), st.integers(min_value=1, max_value=300)), min_size=1, max_size=12
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(layout=runs, tail=st.integers(min_value=0, max_value=G - 1), punch=st.booleans(),
       lead_zero=st.booleans())  # fmt: skip
def test_write_sparse_matches_the_buffer_and_counts(
    tmp_path: Path, layout: list[tuple[bool, int]], tail: int, punch: bool, lead_zero: bool
) -> None:
    granule = (b"\0" + b"\xa5" * (G - 1)) if lead_zero else b"\xa5" * G
    data = bytearray()
    for is_data, granules in layout:
        data += (granule * granules) if is_data else bytes(granules * G)
    data += b"\x01" * tail
    path = tmp_path / "f.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        after = b"\xdd" * (3 * G)  # bytes past the range, which must stay
        os.pwrite(fd, after, len(data))
        if punch:
            os.pwrite(fd, b"\xee" * len(data), 0)  # old bytes the zero runs must erase
        buf = data + bytearray(3 * G)  # the writer must respect length, not len(buf)
        got = sysio.write_sparse(fd, buf, len(data), 0, str(path), punch=punch)
        assert got == expected_counts(bytes(data))
        assert os.pread(fd, len(data), 0) == bytes(data)
        assert os.pread(fd, len(after), len(data)) == after
    finally:
        os.close(fd)


def test_zero_granules_stay_holes(tmp_path: Path) -> None:
    data = bytearray(b"\x07" * G + bytes(300 * G) + b"\x07" * G)
    path = tmp_path / "f.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(data))
        assert sysio.write_sparse(fd, data, len(data), 0, str(path), punch=False) == (
            2 * G,
            300 * G,
        )
        assert sysio.is_hole(fd, G, 300 * G)
        assert not sysio.is_hole(fd, 0, G)
        assert not sysio.is_hole(fd, G, 301 * G)
    finally:
        os.close(fd)


def test_is_hole_past_the_end_and_in_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "f.raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 1 << 20)
        assert sysio.is_hole(fd, 0, 1 << 20)
        os.pwrite(fd, b"x", 5000)
        assert not sysio.is_hole(fd, 0, 1 << 20)
        assert sysio.is_hole(fd, 8192, 1 << 19)
        assert sysio.is_hole(fd, 2 << 20, G)  # past the end: ENXIO
    finally:
        os.close(fd)


@given(
    kinds=st.lists(st.sampled_from([b"\0" * G, b"\0" + b"\x01" * (G - 1), b"\x02" * G,
                                    b"\0" * (G - 1) + b"\x03"]), max_size=40),
    tail=st.integers(min_value=0, max_value=G - 1),
    start=st.integers(min_value=0, max_value=40),
)  # fmt: skip
def test_data_run_end_finds_the_first_zero_granule(
    kinds: list[bytes], tail: int, start: int
) -> None:
    buf = bytearray(b"".join(kinds) + bytes(tail))
    pos = min(start, len(kinds)) * G
    expected = next((p for p in range(pos, len(buf), G) if not any(buf[p : p + G])), len(buf))
    assert zeros.data_run_end(buf, pos, len(buf)) == expected
