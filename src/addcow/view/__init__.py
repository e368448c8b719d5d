"""A qcow2 view of an add-cow image: QEMU uses the disk natively, with no server.

QEMU's qcow2 driver can keep guest data in an external data file while it has a
backing file; a cluster's host offset in the data file is then its guest
offset. An add-cow image file is laid out exactly so, so a small qcow2 file of
metadata only (a *view*: header, L1 and L2 tables, refcounts) over the same
image file and the same backing gives QEMU, qemu-img and qemu-nbd the disk.

:mod:`.layout` lays out the view's tables from the bitmap (and names the files
as QEMU must find them); :mod:`.make` writes a view and records it in the
.add-cow file (the VIEW incompatible bit and the view record); :mod:`.fold`
reads what QEMU did to the view back into the bitmap and retires the view.
Each module's docstring argues its crash safety.
"""

from __future__ import annotations

from .fold import FoldStats, fold_view
from .make import make_view

__all__ = ["FoldStats", "fold_view", "make_view"]
