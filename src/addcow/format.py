"""The on-disk layout of a .add-cow file, and nothing else.

An .add-cow file is a header of ``header_size`` bytes followed by the cluster
bitmap (docs/specification.md, "File layout")::

    +---------------------------+--------------------------------+
    | header (header_size bytes)| bitmap: ceil(clusters / 8) bytes|
    +---------------------------+--------------------------------+

Version 1 is the original proposal: a fixed 4096-byte header with the fields
below ending at byte 36, 64 KiB clusters, and a virtual size equal to the size
of the image file. Version 2 keeps bytes 0-35 (byte 28-35 become the
incompatible features) and appends the fields of ``_V2_FIELDS``.

Every integer is little endian. This module owns every offset and constant of
the format; no other module hard-codes one. :meth:`Header.unpack` validates in
a fixed order (length, magic, version, sizes, names, features) and raises a
:class:`~addcow.errors.HeaderError` naming the field, the expected value and the
value found.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from .errors import HeaderError, UnsupportedFeatureError

MAGIC = b"ADD_COW\xff"
VERSIONS = (1, 2)

PAGE = 4096
"""Header sizes are multiples of this (specification, "Header size")."""

MAX_HEADER_SIZE = 1 << 20
"""Largest header_size a reader accepts (specification, "Version 2 header")."""

V1_CLUSTER_BITS = 16
MIN_CLUSTER_BITS = 12
MAX_CLUSTER_BITS = 30
DEFAULT_CLUSTER_BITS = 16

MAX_IMAGE_SIZE = 1 << 62
"""Largest virtual size the format allows (specification, "Version 2 header")."""

MAX_CLUSTERS = 1 << 32
"""Implementation limit: the bitmap is kept in memory, so at most 512 MiB of it."""

# Version 1 feature bits (specification, "Version 1 header", bytes 28-35).
V1_F_BACKING_FILE = 0x01
V1_F_BACKING_FORMAT_NO_PROBE = 0x02
V1_KNOWN_FEATURES = V1_F_BACKING_FILE | V1_F_BACKING_FORMAT_NO_PROBE
V1_FEATURES = {V1_F_BACKING_FILE: "backing-file", V1_F_BACKING_FORMAT_NO_PROBE: "no-probe"}

# Version 2 feature bits (specification, "Feature bits").
V2_INCOMPAT_BACKING_URI = 0x01
"""The backing_filename field holds a URI record (specification, "Backing URIs"),
never a file name: a reader that does not know the bit refuses the image."""
V2_INCOMPAT_VIEW = 0x02
"""A qcow2 view over the image file is in force (specification, "Views"): QEMU may
be writing the image file through it, so no reader may use the image; the view's
name is in the view record, the last :data:`VIEW_RECORD_SIZE` bytes of the header."""
V2_INCOMPATIBLE_FEATURES = {V2_INCOMPAT_BACKING_URI: "backing_uri", V2_INCOMPAT_VIEW: "view"}
V2_KNOWN_INCOMPATIBLE = V2_INCOMPAT_BACKING_URI | V2_INCOMPAT_VIEW
INCOMPATIBLE_OFFSET = 28
"""Bytes 28-35: version 2's incompatible features, in the first sector."""
_INCOMPATIBLE = struct.Struct("<Q")

VIEW_RECORD_SIZE = 512
"""The view record is the header's last sector: one write of it is atomic."""
_VIEW_NAME_SIZE = struct.Struct("<I")
MAX_VIEW_NAME = VIEW_RECORD_SIZE - _VIEW_NAME_SIZE.size
V2_COMPAT_ALL_ALLOCATED = 0x01
V2_COMPATIBLE_FEATURES = {V2_COMPAT_ALL_ALLOCATED: "all_allocated"}
V2_AUTOCLEAR_FEATURES: dict[int, str] = {}

BACKING_FORMATS = ("raw", "add-cow", "qcow2")
"""Formats a version 2 header may record (specification, "Backing formats")."""
FORMAT_FIELD_SIZE = 16

# Bytes 0-35, common to both versions (specification, "Version 1 header"):
# magic, version, backing_filename_offset, backing_filename_size,
# image_filename_offset, image_filename_size, features.
_COMMON = struct.Struct("<8sIIIIIQ")
COMMON_HEADER_SIZE = _COMMON.size
"""Bytes of the header fields common to both versions: a shorter file is no image."""
# Bytes 36-83 of version 2 (specification, "Version 2 header"):
# compatible_features, autoclear_features, header_size, cluster_bits,
# image_size, backing_format.
_V2_FIELDS = struct.Struct("<QQIIQ16s")

# Bytes 36-51 of version 2: compatible_features, autoclear_features. A change of
# these flags alone rewrites only these bytes (specification, "Crash ordering").
_FEATURE_WORDS = struct.Struct("<QQ")
FEATURE_WORDS_OFFSET = _COMMON.size  # 36

_VERSION = struct.Struct("<I")  # bytes 8-11
_HEADER_SIZE = struct.Struct("<I")  # bytes 52-55 of version 2
_HEADER_SIZE_OFFSET = FEATURE_WORDS_OFFSET + _FEATURE_WORDS.size

V1_HEADER_SIZE = PAGE
V1_NAMES_START = _COMMON.size  # 36
V2_NAMES_START = _COMMON.size + _V2_FIELDS.size  # 84


def header_length(head: bytes) -> int:
    """How many bytes the header starting with ``head`` (its first page) spans.

    A version 2 header may be longer than a page (``header_size``); anything
    else, or a ``header_size`` that :meth:`Header.unpack` will refuse, needs
    only the first page read, which is then refused with the right message.
    """
    if len(head) < _COMMON.size + _V2_FIELDS.size:
        return PAGE
    version = _VERSION.unpack_from(head, len(MAGIC))[0]
    header_size = _HEADER_SIZE.unpack_from(head, _HEADER_SIZE_OFFSET)[0]
    if version == 2 and PAGE < header_size <= MAX_HEADER_SIZE and header_size % PAGE == 0:
        return int(header_size)
    return PAGE


def cluster_count(image_size: int, cluster_bits: int) -> int:
    """Number of clusters (bits) that cover ``image_size`` bytes."""
    return (image_size + (1 << cluster_bits) - 1) >> cluster_bits


def largest_image_size(cluster_bits: int) -> int:
    """The largest virtual size, in bytes, that MAX_CLUSTERS clusters of this size hold."""
    return min(MAX_CLUSTERS << cluster_bits, MAX_IMAGE_SIZE)


def bitmap_length(clusters: int) -> int:
    """Bytes of bitmap that hold one bit per cluster."""
    return (clusters + 7) // 8


class Header(NamedTuple):
    """A decoded, validated .add-cow header.

    ``image_size`` is None for version 1, whose virtual size is the size of
    the image file. ``backing_format`` is None when a version 1 image has a
    backing file but does not record its format (no NO_PROBE bit). (A named
    tuple, not a dataclass: importing ``dataclasses`` would slow every
    command's start.)
    """

    version: int
    image_name: bytes
    backing_name: bytes | None = None
    backing_format: str | None = None
    image_size: int | None = None
    cluster_bits: int = DEFAULT_CLUSTER_BITS
    header_size: int = PAGE
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    view_name: bytes | None = None
    """The view record's name (version 2): with the VIEW bit the view in force;
    without it, a view being made or folded (:attr:`view_pending`)."""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def all_allocated(self) -> bool:
        return bool(self.compatible_features & V2_COMPAT_ALL_ALLOCATED)

    @property
    def backing_uri(self) -> bool:
        """Whether ``backing_name`` is a URI record rather than a file name (version 2)."""
        return self.version == 2 and bool(self.incompatible_features & V2_INCOMPAT_BACKING_URI)

    @property
    def view(self) -> bool:
        """Whether a qcow2 view is in force (the VIEW bit, version 2)."""
        return self.version == 2 and bool(self.incompatible_features & V2_INCOMPAT_VIEW)

    @property
    def view_pending(self) -> bool:
        """A view record without the VIEW bit: a view being made, or folded."""
        return self.view_name is not None and not self.view

    def with_changes(self, **changes: Any) -> Header:
        """A copy with some fields changed, validated again."""
        new = self._replace(**changes)
        return Header.unpack(new.pack())

    # -- decoding ---------------------------------------------------------------

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """Decode and validate a header from the first bytes of a .add-cow file.

        ``buf`` must hold the whole header (for version 2, ``header_size``
        bytes); a shorter buffer raises HeaderError naming the length.
        """
        if len(buf) < _COMMON.size:
            raise HeaderError("length", f"at least {_COMMON.size} bytes", len(buf))
        magic, version, b_off, b_len, i_off, i_len, features = _COMMON.unpack_from(buf)
        if magic != MAGIC:
            raise HeaderError("magic", repr(MAGIC), repr(magic))
        if version not in VERSIONS:
            raise UnsupportedFeatureError("version", "1 or 2", version)
        if version == 1:
            return cls._unpack_v1(buf, b_off, b_len, i_off, i_len, features)
        return cls._unpack_v2(buf, b_off, b_len, i_off, i_len, features)

    @classmethod
    def _unpack_v1(
        cls, buf: bytes, b_off: int, b_len: int, i_off: int, i_len: int, features: int
    ) -> Header:
        if features & ~V1_KNOWN_FEATURES:
            raise UnsupportedFeatureError("features", "only bits 0x1 and 0x2", hex(features))
        if len(buf) < V1_HEADER_SIZE:
            raise HeaderError("length", f"{V1_HEADER_SIZE} bytes", len(buf))
        names_end = V1_HEADER_SIZE
        image_name = _name(buf, "image_filename", i_off, i_len, V1_NAMES_START, names_end)
        backing_name = None
        if b_off or b_len:
            backing_name = _name(buf, "backing_filename", b_off, b_len, V1_NAMES_START, names_end)
            _no_overlap(b_off, b_len, i_off, i_len)
        has_backing = bool(features & V1_F_BACKING_FILE)
        if has_backing != (backing_name is not None):
            raise HeaderError(
                "features",
                f"BACKING_FILE bit {'set' if backing_name else 'clear'} "
                f"(backing_filename_offset is {b_off})",
                hex(features),
            )
        backing_format = None
        if backing_name is not None and features & V1_F_BACKING_FORMAT_NO_PROBE:
            backing_format = "raw"
        return cls(
            version=1,
            image_name=image_name,
            backing_name=backing_name,
            backing_format=backing_format,
            cluster_bits=V1_CLUSTER_BITS,
            header_size=V1_HEADER_SIZE,
            incompatible_features=features,
        )

    @classmethod
    def _unpack_v2(
        cls, buf: bytes, b_off: int, b_len: int, i_off: int, i_len: int, features: int
    ) -> Header:
        if features & ~V2_KNOWN_INCOMPATIBLE:
            # Checked first: an unknown incompatible feature may change what the
            # other fields mean, so they are not judged.
            raise UnsupportedFeatureError(
                "incompatible_features",
                f"only known bits ({V2_KNOWN_INCOMPATIBLE:#x}: backing_uri, view)",
                hex(features),
            )
        if len(buf) < V2_NAMES_START:
            raise HeaderError("length", f"at least {V2_NAMES_START} bytes", len(buf))
        compat, autoclear, header_size, cluster_bits, image_size, fmt_raw = _V2_FIELDS.unpack_from(
            buf, _COMMON.size
        )
        if header_size < PAGE or header_size % PAGE or header_size > MAX_HEADER_SIZE:
            raise HeaderError(
                "header_size",
                f"a multiple of {PAGE} between {PAGE} and {MAX_HEADER_SIZE}",
                header_size,
            )
        if len(buf) < header_size:
            raise HeaderError("length", f"{header_size} bytes (header_size)", len(buf))
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise HeaderError(
                "cluster_bits", f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", cluster_bits
            )
        if not 0 < image_size <= MAX_IMAGE_SIZE:
            raise HeaderError("image_size", f"1..{MAX_IMAGE_SIZE}", image_size)
        if cluster_count(image_size, cluster_bits) > MAX_CLUSTERS:
            raise HeaderError(
                "image_size",
                f"at most {MAX_CLUSTERS} clusters of {1 << cluster_bits} bytes, so at most "
                f"{largest_image_size(cluster_bits)} bytes (implementation limit)",
                f"{image_size} bytes",
            )
        image_name = _name(buf, "image_filename", i_off, i_len, V2_NAMES_START, header_size)
        backing_name = None
        if b_off or b_len:
            backing_name = _name(buf, "backing_filename", b_off, b_len, V2_NAMES_START, header_size)
            _no_overlap(b_off, b_len, i_off, i_len)
        backing_format = _decode_format(fmt_raw)
        if (backing_format is None) != (backing_name is None):
            raise HeaderError(
                "backing_format",
                "a format name exactly when backing_filename_offset is non-zero"
                if backing_name
                else "all zero bytes when there is no backing file",
                repr(fmt_raw.rstrip(b"\0")),
            )
        if features & V2_INCOMPAT_BACKING_URI and backing_name is None:
            raise HeaderError(
                "incompatible_features",
                "no BACKING_URI bit without a backing (backing_filename_offset is 0)",
                hex(features),
            )
        used = [(b_off, b_len), (i_off, i_len)] if backing_name else [(i_off, i_len)]
        record = header_size - VIEW_RECORD_SIZE
        names_end = max(off + size for off, size in used)
        view_name = None
        if features & V2_INCOMPAT_VIEW:
            if names_end > record:
                raise HeaderError(
                    "incompatible_features",
                    f"no VIEW bit while the file names reach the view record at byte {record}",
                    hex(features),
                )
            view_name = _view_record(buf, record, required=True)
        elif names_end <= record:
            view_name = _view_record(buf, record, required=False)
        if view_name is not None:
            used.append((record, VIEW_RECORD_SIZE))
        _check_padding_zero(buf, header_size, used)
        return cls(
            version=2,
            image_name=image_name,
            backing_name=backing_name,
            backing_format=backing_format,
            image_size=image_size,
            cluster_bits=cluster_bits,
            header_size=header_size,
            incompatible_features=features,
            compatible_features=compat,
            autoclear_features=autoclear,
            view_name=view_name,
        )

    # -- encoding ---------------------------------------------------------------

    def pack(self) -> bytes:
        """Encode the header: names laid out right after the fixed fields."""
        names_start = V1_NAMES_START if self.version == 1 else V2_NAMES_START
        buf = bytearray(self.header_size)
        pos = names_start
        b_off = b_len = 0
        if self.backing_name is not None:
            b_off, b_len = pos, len(self.backing_name)
            pos += b_len
        i_off, i_len = pos, len(self.image_name)
        pos += i_len
        room = self.header_size - (VIEW_RECORD_SIZE if self.view_name is not None else 0)
        if pos > room:
            raise HeaderError(
                "header_size",
                f"room for the file names ({pos} bytes)"
                + (" before the view record" if self.view_name is not None else ""),
                self.header_size,
            )
        if self.view_name is not None:
            buf[room:] = view_record(self.view_name)
        if self.backing_name is not None:
            buf[b_off : b_off + b_len] = self.backing_name
        buf[i_off : i_off + i_len] = self.image_name
        features = self.incompatible_features
        if self.version == 1 and self.backing_format not in (None, "raw"):
            raise HeaderError(
                "backing_format", "raw (version 1 records no other format)", self.backing_format
            )
        if self.version == 1:
            features = 0
            if self.backing_name is not None:
                features |= V1_F_BACKING_FILE
                if self.backing_format == "raw":
                    features |= V1_F_BACKING_FORMAT_NO_PROBE
        _COMMON.pack_into(buf, 0, MAGIC, self.version, b_off, b_len, i_off, i_len, features)
        if self.version == 2:
            fmt = (self.backing_format or "").encode("ascii")
            _V2_FIELDS.pack_into(
                buf,
                _COMMON.size,
                self.compatible_features,
                self.autoclear_features,
                self.header_size,
                self.cluster_bits,
                self.image_size or 0,
                fmt,
            )
        return bytes(buf)

    def incompatible_word(self) -> tuple[int, bytes]:
        """(offset, bytes) of the version 2 incompatible features: 8 bytes of sector 0."""
        if self.version != 2:
            raise HeaderError("version", "2 (version 1 has no such field)", self.version)
        return INCOMPATIBLE_OFFSET, _INCOMPATIBLE.pack(self.incompatible_features)

    def view_record(self) -> tuple[int, bytes]:
        """(offset, bytes) of the header's last sector: the view record, or zeros."""
        if self.version != 2:
            raise HeaderError("version", "2 (version 1 has no view record)", self.version)
        raw = view_record(self.view_name) if self.view_name is not None else bytes(VIEW_RECORD_SIZE)
        return self.header_size - VIEW_RECORD_SIZE, raw

    def feature_words(self) -> tuple[int, bytes]:
        """(offset, bytes) of the version 2 compatible and autoclear feature fields.

        Writing just these 16 bytes, which lie in the first sector, changes the
        flags without moving the names (which may be anywhere in the name area).
        """
        if self.version != 2:
            raise HeaderError("version", "2 (version 1 has no such fields)", self.version)
        words = _FEATURE_WORDS.pack(self.compatible_features, self.autoclear_features)
        return FEATURE_WORDS_OFFSET, words

    def fields(self) -> list[tuple[str, object]]:
        """(name, value) pairs in on-disk order, for ``info`` and debugging."""
        rows: list[tuple[str, object]] = [
            ("magic", MAGIC),
            ("version", self.version),
            ("backing_filename", self.backing_name),
            ("image_filename", self.image_name),
            (
                "features" if self.version == 1 else "incompatible_features",
                hex(self.incompatible_features),
            ),
        ]
        if self.version == 2:
            rows += [
                ("compatible_features", hex(self.compatible_features)),
                ("autoclear_features", hex(self.autoclear_features)),
                ("header_size", self.header_size),
                ("cluster_bits", self.cluster_bits),
                ("image_size", self.image_size),
                ("backing_format", self.backing_format),
            ]
        return rows


def view_record(name: bytes) -> bytes:
    """The view record sector: u32 name size, the name, zeros."""
    if not 1 <= len(name) <= MAX_VIEW_NAME or b"\0" in name:
        raise HeaderError("view_filename", f"1..{MAX_VIEW_NAME} bytes without NUL", repr(name[:80]))
    return (_VIEW_NAME_SIZE.pack(len(name)) + name).ljust(VIEW_RECORD_SIZE, b"\0")


def _view_record(buf: bytes, start: int, *, required: bool) -> bytes | None:
    """The view record's name; None when it is absent (all zero) and not ``required``.

    Without the VIEW bit a non-zero last sector that is not a valid record is left
    to the zero rule (``byte N``); a valid one is a view being made or folded.
    """
    sector = bytes(buf[start : start + VIEW_RECORD_SIZE])
    if not required and not sector.strip(b"\0"):
        return None
    size = _VIEW_NAME_SIZE.unpack_from(sector)[0]
    body = _VIEW_NAME_SIZE.size
    name = sector[body : body + size] if 1 <= size <= MAX_VIEW_NAME else b""
    valid = bool(name) and b"\0" not in name and not sector[body + size :].strip(b"\0")
    if valid:
        return name
    if required:
        raise HeaderError(
            f"view_filename_size (byte {start})",
            f"a view record: 1..{MAX_VIEW_NAME}, a name without NUL, then zero bytes",
            size,
        )
    return None


def _name(buf: bytes, field: str, offset: int, size: int, lo: int, hi: int) -> bytes:
    """Return the file name stored at [offset, offset+size) after checking bounds."""
    if not lo <= offset < hi:
        raise HeaderError(f"{field}_offset", f"{lo}..{hi - 1}", offset)
    if not 1 <= size <= hi - offset:
        raise HeaderError(f"{field}_size", f"1..{hi - offset}", size)
    name = bytes(buf[offset : offset + size])
    if b"\0" in name:
        raise HeaderError(field, "a name without NUL bytes", repr(name))
    return name


def _no_overlap(b_off: int, b_len: int, i_off: int, i_len: int) -> None:
    if b_off < i_off + i_len and i_off < b_off + b_len:
        raise HeaderError(
            "image_filename_offset",
            f"a range not overlapping the backing file name [{b_off}, {b_off + b_len})",
            f"[{i_off}, {i_off + i_len})",
        )


def _decode_format(raw: bytes) -> str | None:
    if raw == bytes(FORMAT_FIELD_SIZE):
        return None
    name, _, padding = raw.partition(b"\0")
    if padding.strip(b"\0"):
        raise HeaderError("backing_format", "ASCII text padded with NUL bytes", repr(raw))
    text = name.decode("ascii", errors="replace")
    if text not in BACKING_FORMATS:
        raise HeaderError("backing_format", " or ".join(BACKING_FORMATS), repr(text))
    return text


def _check_padding_zero(buf: bytes, header_size: int, used: list[tuple[int, int]]) -> None:
    """Every header byte outside the fixed fields and the names must be zero."""
    pos = V2_NAMES_START
    for off, size in [*sorted(used), (header_size, 0)]:
        gap = buf[pos:off]
        if gap.strip(b"\0"):
            first = pos + len(gap) - len(gap.lstrip(b"\0"))
            raise HeaderError(f"byte {first}", "zero (unused header space)", buf[first])
        pos = max(pos, off + size)
