"""Sizes for people: one unit system and one rounding, everywhere.

QEMU's: powers of 1024 named B, KiB, MiB, GiB, TiB, PiB, three significant
digits (``size_to_str`` in QEMU's util/cutils.c): 1 KiB, 1.5 MiB, 256 MiB,
8 GiB. Whatever addcow prints for people (``info``, ``status``, the stream
summary, the progress bars, the server's log) goes through :func:`human_size`,
so the same number of bytes always reads the same. Outputs that copy another
tool byte for byte keep that tool's own format (``addcow io`` prints qemu-io's).
"""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``n`` bytes as qemu-img prints a size: 512 B, 1 KiB, 1.5 MiB, 256 MiB, 8 GiB."""
    if n < 1024:
        return f"{round(n)} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    # Three significant digits, but never in exponent form (999.7 KiB reads "1000 KiB").
    text = f"{value:.0f}" if value >= 999.5 else f"{value:.3g}"
    return f"{text} {unit}"
