"""Checking an add-cow image against the specification, and repairing it.

``check_image`` reads the .add-cow file itself, read-only unless asked to
repair. It never goes through a read-write :meth:`AddCowImage.open`, because
that open clears unknown autoclear bits on its own: a check must report what
is on disk, not what an open made of it.

What is checked, in order, and what each finding counts as (the classes and
exit statuses of ``qemu-img check``)::

    finding                                   class        repair (-r)
    ---------------------------------------   ----------   ---------------------
    .add-cow unopenable, invalid header,      fatal        none: "could not check"
      unknown incompatible bit, image file
      missing, bitmap truncated, locked
    image file is the .add-cow file           corruption   none
    image file smaller than image_size (v2)   corruption   none
      or empty (v1)
    padding bits past the last cluster set    leak         leaks, all: clear them
    ALL_ALLOCATED set, some bits clear        corruption   all: set the bits
    every bit set, ALL_ALLOCATED clear (v2)   leak         leaks, all: set the flag
    unknown autoclear bits set (v2)           leak         leaks, all: clear them
    backing chain broken: a loop, too deep,   corruption   none
      an invalid add-cow layer, a qcow2
      layer with an invalid header, L1 or
      L2 entry (every table is read)
    backing chain not checkable: a file       check error  none
      missing, locked or unreadable, its
      format not recorded (v1), outside
      --backing-root, a qcow2 feature
      addcow does not read

A "leak" here is what qemu-img means by one: no harm to data, only something
out of date. Counts are per cluster for bitmap bits (per bit for padding) and
one per header field or file otherwise. The backing chain is only checked
when readers need it, that is when ALL_ALLOCATED is clear (a complete image
may have lost its backing file on purpose).

Repairs guess nothing. Setting the bits that ALL_ALLOCATED already implied is
safe because readers honoured the flag: the image file already *is* the
content of those clusters. Repairs run under the exclusive lock taken at the
start (so nothing changes between the check and the repair) and follow the
crash ordering of :mod:`addcow.image.core`: fdatasync the image file, write the
changed bitmap pages, fdatasync the .add-cow file, then write the header last
and fdatasync again. After repairing, the image is read back from disk and
checked again; the result describes that second pass, plus the counts fixed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from . import sysio
from .bitmap import Bitmap
from .errors import (
    AddCowError,
    BackingLoopError,
    BitmapError,
    HeaderError,
    Qcow2Error,
    Qcow2UnsupportedError,
)
from .format import V2_AUTOCLEAR_FEATURES, V2_COMPAT_ALL_ALLOCATED, Header, bitmap_length
from .image import open_header_backing
from .image.metafile import (
    open_image_files,
    read_bitmap,
    read_header,
    write_bitmap_pages,
    write_features,
)
from .stores import BlockSource
from .stores.chain import ChainGuard
from .stores.qcow2 import Qcow2File

REPAIR_MODES = ("leaks", "all")

CORRUPTION = "corruption"
LEAK = "leak"
CHECK_ERROR = "check-error"

_PREFIX = {CORRUPTION: "ERROR", LEAK: "Leak", CHECK_ERROR: "Check error"}

# Repair actions a finding may name.
_CLEAR_PADDING = "clear-padding"
_SET_BITS = "set-bits"
_SET_ALL_ALLOCATED = "set-all-allocated"
_CLEAR_AUTOCLEAR = "clear-autoclear"


@dataclass
class CheckResult:
    """The outcome of :func:`check_image`, in the terms of ``qemu-img check``.

    After a repair, the counts describe the image as re-read from disk, and
    ``corruptions_fixed`` / ``leaks_fixed`` say what the repair changed.
    ``messages`` holds one line per finding (and per repair), ready to print.
    """

    filename: str
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    messages: list[str] = field(default_factory=list)
    allocated_clusters: int = 0
    total_clusters: int = 0
    image_end_offset: int = 0

    @property
    def exit_status(self) -> int:
        """qemu-img check's status: 1 not completed, 2 corrupt, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """The fields of ``qemu-img check --output=json``.

        Like qemu-img, the counters other than ``check-errors`` are left out
        when they are zero.
        """
        out: dict[str, Any] = {
            "filename": self.filename,
            "format": "add-cow",
            "check-errors": self.check_errors,
        }
        optional = (
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
        )
        for key, value in optional:
            if value:
                out[key] = value
        return out


@dataclass(frozen=True)
class _Finding:
    kind: str
    count: int
    text: str
    fix: str | None = None
    repair_text: str = ""

    def line(self) -> str:
        return f"{_PREFIX[self.kind]} {self.text}"

    def fixable_by(self, repair: str | None) -> bool:
        if self.fix is None or repair is None:
            return False
        return repair == "all" or self.kind == LEAK


def check_image(
    path: str | os.PathLike[str],
    *,
    repair: str | None = None,
    force_share: bool = False,
    backing_root: str | None = None,
    allowed_uris: Sequence[str] = (),
) -> CheckResult:
    """Check the add-cow image at ``path``; with ``repair`` ("leaks" or "all"), fix it.

    Raises an :class:`~addcow.errors.AddCowError` when the check cannot be
    done at all (see the module docstring); everything else is reported in
    the returned :class:`CheckResult`.
    """
    path = os.fspath(path)
    if repair not in (None, *REPAIR_MODES):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    if repair is not None and force_share:
        raise ValueError("force_share cannot be combined with repair (it needs the write lock)")
    result = CheckResult(filename=path)
    guard = ChainGuard(backing_root, allowed_uris)
    problems: list[AddCowError] = []
    files = open_image_files(
        path,
        meta_writable=repair is not None,
        image_writable=False,
        lock=not force_share,
        guard=guard,
        findings=problems,
    )
    with closing(files):
        meta_fd, image_fd, image_path = files.meta_fd, files.image_fd, files.image_path
        header, bitmap, size = files.header, files.bitmap, files.size
        file_findings = [_Finding(CORRUPTION, 1, f"image file: {exc}") for exc in problems]

        findings = _check_metadata(header, bitmap)
        fixes = [f for f in findings if f.fixable_by(repair)]
        result.messages += [f.line() for f in file_findings]
        if fixes:
            result.messages += [f"Repairing {f.repair_text}" for f in fixes]
            _repair(meta_fd, path, image_fd, image_path, header, bitmap, {f.fix for f in fixes})
            result.corruptions_fixed = sum(f.count for f in fixes if f.kind == CORRUPTION)
            result.leaks_fixed = sum(f.count for f in fixes if f.kind == LEAK)
            # Double check: what is on disk now.
            header = read_header(meta_fd, path)
            bitmap = read_bitmap(meta_fd, path, header, size)
            findings = _check_metadata(header, bitmap)
        result.messages += [f.line() for f in findings]

        chain_findings = _check_backing_chain(header, path, guard, force_share)
        result.messages += [f.line() for f in chain_findings]

        everything = file_findings + findings + chain_findings
        result.corruptions = sum(f.count for f in everything if f.kind == CORRUPTION)
        result.leaks = sum(f.count for f in everything if f.kind == LEAK)
        result.check_errors = sum(f.count for f in everything if f.kind == CHECK_ERROR)
        result.allocated_clusters = bitmap.allocated
        result.total_clusters = bitmap.clusters
        result.image_end_offset = header.header_size + bitmap_length(bitmap.clusters)
    return result


def _check_metadata(header: Header, bitmap: Bitmap) -> list[_Finding]:
    """Findings about the header's flags and the bitmap (what a repair can change)."""
    findings: list[_Finding] = []
    clusters = bitmap.clusters
    padding = bitmap.padding_bits()
    if padding:
        last = len(bitmap.data) - 1
        findings.append(
            _Finding(
                LEAK,  # readers ignore them; a crash while growing can leave them
                padding.bit_count(),
                f"bitmap: padding bits past the last cluster ({clusters - 1}) must be zero, "
                f"found bitmap byte {last} = {bitmap.data[last]:#04x}",
                _CLEAR_PADDING,
                f"bitmap: clearing the padding bits of bitmap byte {last}",
            )
        )
    if header.version >= 2:
        missing = clusters - bitmap.allocated
        if header.all_allocated and missing:
            first = bitmap.find(0, clusters, False)
            findings.append(
                _Finding(
                    CORRUPTION,
                    missing,
                    f"compatible_features: ALL_ALLOCATED is set but {missing} of {clusters} "
                    f"clusters have a clear bit (first: cluster {first})",
                    _SET_BITS,
                    f"bitmap: setting the {missing} bits that ALL_ALLOCATED implies "
                    "(readers already use the image file for those clusters)",
                )
            )
        if not header.all_allocated and clusters and not missing:
            findings.append(
                _Finding(
                    LEAK,
                    1,
                    f"compatible_features: all {clusters} clusters are allocated but "
                    "ALL_ALLOCATED is not set (flag out of date)",
                    _SET_ALL_ALLOCATED,
                    "compatible_features: setting ALL_ALLOCATED (every cluster is allocated)",
                )
            )
        unknown = header.autoclear_features & ~sum(V2_AUTOCLEAR_FEATURES)
        if unknown:
            findings.append(
                _Finding(
                    LEAK,
                    1,
                    f"autoclear_features: unknown bits {unknown:#x} are set "
                    "(a writer that does not know them clears them)",
                    _CLEAR_AUTOCLEAR,
                    f"autoclear_features: clearing unknown bits {unknown:#x}",
                )
            )
    return findings


def _check_backing_chain(
    header: Header, path: str, guard: ChainGuard, force_share: bool
) -> list[_Finding]:
    """Open the backing chain as a reader would, and close it again."""
    if header.backing_name is None or header.all_allocated:
        return []
    try:
        backing = open_header_backing(header, path, guard=guard, force_share=force_share)
        try:
            _walk_tables(backing)
        finally:
            backing.close()
    except Qcow2UnsupportedError as exc:
        return [_Finding(CHECK_ERROR, 1, f"backing chain: {exc}")]
    except (HeaderError, BitmapError, BackingLoopError, Qcow2Error) as exc:
        # What the chain's own files say is wrong: they were read, and are invalid.
        return [_Finding(CORRUPTION, 1, f"backing chain: {exc}")]
    except AddCowError as exc:
        # A file that could not be read (missing, locked, I/O error, not allowed)
        # is a check that could not be done, as qemu-img check reports it.
        return [_Finding(CHECK_ERROR, 1, f"backing chain: {exc}")]
    return []


def _walk_tables(backing: BlockSource) -> None:
    """Read every mapping table of the qcow2 layers of a chain (not their data).

    Opening a qcow2 file checks its header and L1 table; this also checks every
    L2 entry, by asking the whole chain for its block status.
    """
    layer: object = backing
    while layer is not None:
        if isinstance(layer, Qcow2File):
            for _extent in layer.block_status_at(0, layer.size, 1):
                pass
        layer = getattr(layer, "backing", None)


def _repair(
    meta_fd: int,
    path: str,
    image_fd: int,
    image_path: str,
    header: Header,
    bitmap: Bitmap,
    fixes: set[str | None],
) -> None:
    """Apply ``fixes`` on disk: bitmap pages first and synced, the header last."""
    if _CLEAR_PADDING in fixes:
        bitmap.clear_padding()
    if _SET_BITS in fixes:
        bitmap.set_range(0, bitmap.clusters)
    chunks = bitmap.take_dirty()
    if chunks:
        # The data behind every bit is already in the image file (readers
        # honoured ALL_ALLOCATED); make sure it is durable before the bits are.
        sysio.fdatasync(image_fd, image_path)
        write_bitmap_pages(meta_fd, path, header.header_size, chunks)
        sysio.fdatasync(meta_fd, path)
    compat = header.compatible_features
    autoclear = header.autoclear_features
    if _SET_ALL_ALLOCATED in fixes:
        compat |= V2_COMPAT_ALL_ALLOCATED
    if _CLEAR_AUTOCLEAR in fixes:
        autoclear &= sum(V2_AUTOCLEAR_FEATURES)
    if (compat, autoclear) != (header.compatible_features, header.autoclear_features):
        new = header.with_changes(compatible_features=compat, autoclear_features=autoclear)
        write_features(meta_fd, path, new)
