"""Process for the view and fold kill test: ``view_killer.py DIR PHASE N``.

Runs ``addcow view`` (PHASE ``view``: DIR/d.add-cow to DIR/v.qcow2) or ``addcow
fold`` (PHASE ``fold``) through the library, with every I/O call on the files of
DIR counted by :class:`storage.Layer`; call number N (from 0) is never made: the
process kills itself with SIGKILL just before it, leaving the files as a crash
there leaves them (writes already made are in the page cache, which survives the
process). N = -1 kills nothing and prints the number of calls made.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from storage import Layer

from addcow.view import fold_view, make_view


class Killer(Layer):
    kill_at = -1

    def _fail(self, call: str, name: str) -> str | None:
        if len(self.calls) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.calls.append((call, name))
        return None


def main() -> None:
    d, phase, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    layer = Killer({}, record=False, directory=d)
    layer.kill_at = n
    with layer.active():
        if phase == "view":
            make_view(d / "d.add-cow", d / "v.qcow2")
        else:
            fold_view(d / "d.add-cow")
    print(len(layer.calls))


if __name__ == "__main__":
    main()
