"""Run ``addcow serve`` that kills itself (SIGKILL) right after a handoff released its
locks on the raw file, before QEMU is switched: the fault point between steps 2 and 3
of :mod:`addcow.serve.handoff` (a test harness, like the crash campaigns' injection).

Usage: ``python handoff_kill_server.py serve ARGS...``. ``addcow.locking.unlock_raw``
is wrapped before :mod:`addcow.serve.handoff` imports it.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    from addcow import locking

    real = locking.unlock_raw

    def unlock_then_die(fd: int, path: str) -> None:
        real(fd, path)
        os.kill(os.getpid(), signal.SIGKILL)

    locking.unlock_raw = unlock_then_die
    from addcow.cli.main import main as addcow_main

    return addcow_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
