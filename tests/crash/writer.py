"""Writer process for the kill -9 test: runs a seeded workload, logging each step.

Usage: writer.py IMAGE SEED COUNT LOG. Before each operation it appends
"begin I" to LOG and after it returns "ack I" (plain writes to the page cache,
which survive the death of the process), so the parent knows exactly what was
acknowledged when it killed us.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workload import gen_ops, run_workload


def main() -> None:
    image, seed, count, log = sys.argv[1:5]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def note(*event: object) -> None:
        os.write(fd, (" ".join(map(str, event)) + "\n").encode())

    run_workload(Path(image), gen_ops(int(seed), int(count)), note)
    note("done")


if __name__ == "__main__":
    main()
