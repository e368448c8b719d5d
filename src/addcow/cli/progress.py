"""Progress bars for long commands (tqdm), shown only when asked for with -p.

Sizes and speeds are printed by :func:`addcow.units.human_size`, as everywhere
else (tqdm's own scaling would say MB for MiB): the bar's fields ``n_size``,
``total_size`` and ``rate_size`` are added through :attr:`_Bar.format_dict`,
tqdm's documented place for custom fields of ``bar_format``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from ..units import human_size

BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_size} of {total_size} "
    "[{elapsed}<{remaining}, {rate_size}]"
)


@contextmanager
def progress_bar(total: int, enabled: bool, desc: str) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback taking a byte count, or None when progress is off."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # imported lazily: the library never needs it

    class _Bar(tqdm):  # type: ignore[type-arg]
        @property
        def format_dict(self) -> MutableMapping[str, Any]:
            fields = super().format_dict
            rate = fields.get("rate")
            if rate is None and fields["elapsed"]:  # tqdm's fallback: the average so far
                rate = (fields["n"] - fields["initial"]) / fields["elapsed"]
            fields["n_size"] = human_size(fields["n"])
            fields["total_size"] = human_size(fields["total"] or 0)
            fields["rate_size"] = f"{human_size(rate)}/s" if rate else "?/s"
            return fields

    with _Bar(
        total=total,
        unit="B",
        desc=desc,
        bar_format=BAR_FORMAT,
        dynamic_ncols=True,
        leave=True,
    ) as bar:

        def update(n: int) -> None:
            bar.update(n)

        yield update
