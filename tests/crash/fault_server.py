"""Run ``addcow serve`` with switchable I/O faults on one file (a test harness).

Usage: ``python fault_server.py TRIGGER WATCHED serve ARGS...``

Before addcow is imported (the read fast path binds ``os.preadv`` at import),
``os.pwritev``, ``os.preadv``, ``os.pread`` and ``os.fdatasync`` are wrapped:
a call on the file WATCHED (matched by device and inode) fails with
``OSError(errno)`` while the file TRIGGER holds a line ``CALL ERRNO`` for it
(e.g. ``pwritev 5``). The test switches faults on and off by rewriting
TRIGGER while the server runs; with TRIGGER empty or missing nothing changes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def main() -> int:
    trigger, watched = sys.argv[1], sys.argv[2]
    st = os.stat(watched)
    ident = (st.st_dev, st.st_ino)

    def faults() -> dict[str, int]:
        try:
            with open(trigger) as f:
                pairs = [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return {}
        return {call: int(code) for call, code in pairs}

    def wrap(name: str) -> None:
        real: Callable[..., Any] = getattr(os, name)

        def call(fd: int, *args: Any) -> Any:
            code = faults().get(name)
            if code is not None:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) == ident:
                    raise OSError(code, os.strerror(code))
            return real(fd, *args)

        setattr(os, name, call)

    for name in ("pwritev", "preadv", "pread", "fdatasync"):
        wrap(name)
    from addcow.cli.main import main as addcow_main

    return addcow_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
