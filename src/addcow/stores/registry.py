"""The formats of backing file addcow reads, by name: one table, filled by the
packages that implement them.

Each format registers a :class:`~addcow.stores.base.StoreFormat` once, from the
package that implements it: :mod:`addcow.stores` registers its own stores (raw,
qcow2) and :mod:`addcow.image` registers ``add-cow``, so that this package
never imports the image. Everything that needs the list of formats (what a
header may record, what ``convert -f`` accepts, what ``commit`` writes into,
what a URI may carry) asks here instead of keeping a list of its own.
"""

from __future__ import annotations

from ..errors import BackingFormatError
from .base import StoreFormat

_FORMATS: dict[str, StoreFormat] = {}


def register(fmt: StoreFormat) -> None:
    """Add ``fmt`` to the table (once per name)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt


def names(*, over_uri: bool = False, commit_target: bool = False) -> tuple[str, ...]:
    """The registered formats' names, in the order they were registered; only
    those read over a URI, or committed into, when asked."""
    return tuple(
        name
        for name, fmt in _FORMATS.items()
        if (fmt.over_uri or not over_uri) and (fmt.commit_target or not commit_target)
    )


def get(name: str, path: str | None = None) -> StoreFormat:
    """The format called ``name``; BackingFormatError naming ``path`` if none is."""
    fmt = _FORMATS.get(name)
    if fmt is None:
        where = f"{path}: " if path else ""
        raise BackingFormatError(
            f"{where}unsupported format {name!r}: expected one of {', '.join(names())}"
        )
    return fmt


def magics() -> tuple[tuple[int, bytes, str], ...]:
    """(offset, magic, name) of every registered format that has a magic."""
    return tuple(
        (offset, magic, name) for name, fmt in _FORMATS.items() for offset, magic in fmt.magic
    )
