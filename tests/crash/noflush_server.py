"""Run ``addcow serve`` with a broken ``flush`` (a mutant for the crash harness).

Usage: ``python noflush_server.py serve ARGS...``. ``AddCowImage.flush`` (used by
NBD FLUSH and FUA) returns without writing anything, so the bitmap pages of
acknowledged writes stay in memory only: after kill -9 the judge of
``test_cli_kill.py`` must report acknowledged data missing.
"""

from __future__ import annotations

import sys

from addcow.cli.main import main as addcow_main
from addcow.image import AddCowImage


def main() -> int:
    AddCowImage.flush = lambda self: None  # type: ignore[method-assign]
    return addcow_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
