"""qemu-io's number formatting: sizes in KiB/MiB/..., timings, ``read -v`` dumps."""

from __future__ import annotations

import math

_UNITS = ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: '64 KiB', '1.074 KiB', '100 bytes', '31.700 MiB'."""
    for shift, unit in _UNITS:
        if value >= 1 << shift:
            text, suffix = f"{value / (1 << shift):.3f}", " " + unit
            break
    else:
        text, suffix = f"{value:f}", " bytes"
    cut = text.find(".000")
    return text[:cut] + suffix if cut >= 0 else text + suffix


def timestr(elapsed_ns: int, *, verbose: bool) -> str:
    """qemu-io's timestr: '00.00 sec', or 'H:MM:SS.ss' (always with -C)."""
    sec, nsec = divmod(elapsed_ns, 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60 + frac:05.2f}"
    return f"{frac:05.2f} sec"


def tdiv(value: float, elapsed_ns: int) -> float:
    """``value`` per second of ``elapsed_ns`` (inf or nan when no time passed)."""
    seconds = elapsed_ns / 1e9
    if seconds == 0:
        return math.inf if value else math.nan
    return value / seconds


def dump_buffer(data: bytes, offset: int) -> list[str]:
    """qemu-io's ``read -v`` hex dump."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexes = "".join(f"{b:02x} " for b in chunk)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in chunk)
        lines.append(f"{offset + i:08x}:  {hexes} {text}")
    return lines
