"""The optional extras of the addcow package, and how to install one.

Each extra brings one package that a feature imports only when it is used
(pyproject.toml's ``[project.optional-dependencies]``). :func:`install_hint`
is the one sentence every "this needs an extra" message ends with; it gives
the command for an install from a package index and the one for a checkout
of the source (which names the checkout, ``.``, instead of the package), both
quoted as a shell needs them (``[...]`` is a glob pattern to zsh).
"""

from __future__ import annotations

EXTRAS = {
    "fast": "uvloop",  # a faster event loop for addcow serve
    "zstd": "zstandard",  # zstd-compressed qcow2 backing files
    "http": "urllib3",  # golden images on HTTP(S) servers
    "s3": "botocore",  # golden images in S3 buckets (with urllib3)
}
"""Each extra, and the package it installs."""


def install_hint(extra: str) -> str:
    """How to install ``extra``, from an index and from a checkout."""
    if extra not in EXTRAS:
        raise ValueError(f"extra: expected one of {', '.join(EXTRAS)}, found {extra!r}")
    return (
        f"install the {extra!r} extra: pip install 'addcow[{extra}]' "
        f"(from a checkout: pip install '.[{extra}]')"
    )
