"""Progress bars for long commands (tqdm), shown only when asked for with -p."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, enabled: bool, desc: str) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback taking a byte count, or None when progress is off."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # imported lazily: the library never needs it

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        dynamic_ncols=True,
        leave=True,
    ) as bar:

        def update(n: int) -> None:
            bar.update(n)

        yield update
