"""The on-disk layout of a qcow2 file, and nothing else.

Everything is big endian (QEMU docs/interop/qcow2.rst, "General"). Cluster 0
holds the header, then the header extensions, then the backing file name::

    +--------------+----------------------------+---------------+--------+
    | header       | extensions: type, length,  | backing name  | unused |
    | header_length| data, padding to 8 bytes   | (not NUL-     |        |
    | bytes        | ... end (type 0)           |  terminated)  |        |
    +--------------+----------------------------+---------------+--------+
    0                                            backing_file_offset     cluster_size

The guest disk is mapped by a two-level table: an L1 table of ``l1_size``
64-bit entries, each naming an L2 table of one cluster; each L2 entry describes
one guest cluster (spec, "Cluster mapping"). With extended L2 entries an entry
is 128 bits and its second word holds 32 subcluster allocation bits and 32
subcluster zero bits (spec, "Extended L2 Entries").

:meth:`Header.unpack` validates in a fixed order: length, magic, version,
header_length, cluster_bits, incompatible features, compression type,
encryption, refcount_order, size and l1_size, table offsets, backing file name,
extensions. Each failure raises a :class:`~addcow.errors.Qcow2Error` naming the
field, the value expected and the value found.

Ignored, because a read-only reader that never writes and never looks at
refcounts needs none of it: the dirty bit (stale refcounts), lazy refcounts,
the bitmaps extension and autoclear bit 0, bit 63 of L1 and L2 entries
(refcount exactly one), the snapshot table beyond its bounds, unknown
compatible and autoclear bits, unknown header extensions.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from ...errors import Qcow2Error, Qcow2UnsupportedError

MAGIC = b"QFI\xfb"
VERSIONS = (2, 3)

SECTOR = 512
"""QEMU's block layer counts the virtual size in 512-byte sectors."""

# Header, bytes 0-71 (spec, "Header"): magic, version, backing_file_offset,
# backing_file_size, cluster_bits, size, crypt_method, l1_size,
# l1_table_offset, refcount_table_offset, refcount_table_clusters,
# nb_snapshots, snapshots_offset.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
V2_HEADER_LENGTH = _HEADER_V2.size  # 72
# Version 3, bytes 72-103 (spec, "Header"): incompatible_features,
# compatible_features, autoclear_features, refcount_order, header_length.
_HEADER_V3 = struct.Struct(">QQQII")
V3_MIN_HEADER_LENGTH = V2_HEADER_LENGTH + _HEADER_V3.size  # 104
COMPRESSION_TYPE_OFFSET = 104
"""Byte 104, present when header_length > 104 (spec, "Additional fields")."""

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
"""QEMU's implementation limit of 2 MiB clusters (spec, "Header", cluster_bits)."""
MIN_CLUSTER_BITS_EXTENDED_L2 = 14
"""Extended L2 needs 16 KiB clusters: 32 subclusters of 512 bytes (spec, "Header")."""

V2_REFCOUNT_ORDER = 4
MAX_REFCOUNT_ORDER = 6

MAX_L1_BYTES = 32 << 20
"""QEMU's QCOW_MAX_L1_SIZE (spec, "Header", size note)."""
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
"""QEMU's QCOW_MAX_REFTABLE_SIZE (spec, "Reference count")."""
MAX_SNAPSHOTS = 65536
"""QEMU's QCOW_MAX_SNAPSHOTS."""
SNAPSHOT_ENTRY_MIN = 40
"""Fixed part of a snapshot table entry (spec, "Snapshots")."""

MAX_BACKING_NAME = 1023
"""spec, "Header", backing_file_size."""
MAX_BACKING_FORMAT = 15
"""QEMU keeps the format in a 16-byte C string (qcow2_read_extensions)."""

# Incompatible feature bits (spec, "Header", bytes 72-79).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# Compatible feature bits (bytes 80-87) and autoclear bits (bytes 88-95).
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}
"""Names QEMU writes into the feature name table: (type, bit) -> name."""

# Compression types (spec, "Additional fields", byte 104).
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_NAMES = {1: "AES-CBC", 2: "LUKS"}

# Header extensions (spec, "Header extensions"): u32 type, u32 length, data,
# padding to a multiple of 8.
_EXTENSION = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# Feature name table entry (spec, "Feature name table"): type, bit, name[46].
_FEATURE_ENTRY = struct.Struct(">BB46s")
# Full disk encryption header pointer (spec): offset, length.
_CRYPTO_EXT = struct.Struct(">QQ")

# L1 and L2 entries (spec, "Cluster mapping").
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
L2E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62
L2E_ZERO = 1 << 0
"""Standard cluster descriptor bit 0: reads as zeros (version 3 only)."""

ENTRY_SIZE = 8
EXTENDED_ENTRY_SIZE = 16
SUBCLUSTERS = 32
"""Subclusters per cluster with extended L2 entries (spec, "Extended L2 Entries")."""
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
SUBCLUSTER_ZERO_SHIFT = 32


def _feature_list(mask: int, kind: int) -> str:
    """``mask``'s bits as "0x.. (names)" for a message."""
    names = [FEATURE_NAMES.get((kind, bit), f"bit {bit}") for bit in range(64) if mask >> bit & 1]
    return f"{mask:#x} ({', '.join(names)})"


class CompressedGeometry(NamedTuple):
    """Where a compressed cluster descriptor keeps offset and size.

    ``x = 62 - (cluster_bits - 8)``: bits 0..x-1 are the host byte offset,
    bits x..61 the number of 512-byte sectors beyond the one holding that
    offset (spec, "Compressed Clusters Descriptor").
    """

    shift: int
    sector_mask: int
    offset_mask: int

    @classmethod
    def for_cluster_bits(cls, cluster_bits: int) -> CompressedGeometry:
        shift = 62 - (cluster_bits - 8)
        return cls(shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1)

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, bytes to read there) of a compressed descriptor."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.shift) & self.sector_mask) + 1
        return offset, sectors * SECTOR - (offset & (SECTOR - 1))


class Header(NamedTuple):
    """A decoded, validated qcow2 header with what its extensions say.

    For version 2 the version 3 fields hold their implied values (no features,
    refcount_order 4, header_length 72, zlib). ``backing_name`` is the raw
    stored name, ``backing_format`` the backing format extension (None when
    not recorded). (A named tuple: ``dataclasses`` is slow to import.)
    """

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = V2_REFCOUNT_ORDER
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_name: bytes | None = None
    backing_format: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()
    data_file_name: bytes | None = None

    # -- geometry ---------------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        return EXTENDED_ENTRY_SIZE if self.extended_l2 else ENTRY_SIZE

    @property
    def l2_entries(self) -> int:
        """Entries in one L2 table (one cluster)."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_span(self) -> int:
        """Guest bytes described by one L1 entry."""
        return self.cluster_size * self.l2_entries

    @property
    def virtual_size(self) -> int:
        """The guest disk size: ``size`` in whole sectors, as QEMU opens it."""
        return self.size - self.size % SECTOR

    @property
    def l1_needed(self) -> int:
        """L1 entries needed to map ``virtual_size`` bytes."""
        return -(-self.virtual_size // self.l1_span)

    @property
    def compressed(self) -> CompressedGeometry:
        return CompressedGeometry.for_cluster_bits(self.cluster_bits)

    @property
    def compression(self) -> str:
        return COMPRESSION_NAMES[self.compression_type]

    def fields(self) -> list[tuple[str, object]]:
        """(name, value) pairs in on-disk order, for ``info`` and debugging."""
        return [
            ("magic", MAGIC),
            ("version", self.version),
            ("backing_file_offset", self.backing_file_offset),
            ("backing_file_size", self.backing_file_size),
            ("cluster_bits", self.cluster_bits),
            ("size", self.size),
            ("crypt_method", self.crypt_method),
            ("l1_size", self.l1_size),
            ("l1_table_offset", self.l1_table_offset),
            ("refcount_table_offset", self.refcount_table_offset),
            ("refcount_table_clusters", self.refcount_table_clusters),
            ("nb_snapshots", self.nb_snapshots),
            ("snapshots_offset", self.snapshots_offset),
            ("incompatible_features", hex(self.incompatible_features)),
            ("compatible_features", hex(self.compatible_features)),
            ("autoclear_features", hex(self.autoclear_features)),
            ("refcount_order", self.refcount_order),
            ("header_length", self.header_length),
            ("compression_type", self.compression),
            ("backing_file", self.backing_name),
            ("backing_format", self.backing_format),
        ]

    # -- decoding ---------------------------------------------------------------

    @classmethod
    def unpack(cls, buf: bytes, file_size: int, *, data_file: bool = False) -> Header:
        """Decode and validate a header from the start of a qcow2 file.

        ``buf`` holds the first ``min(cluster0_size(buf), file_size)`` bytes of
        the file (the whole of cluster 0 when the file is that long);
        ``file_size`` bounds every table offset. ``data_file`` accepts an
        external data file (its name is then required): only for a view that
        addcow wrote itself, whose data file name the caller checks.
        """
        h = _fixed_fields(buf)
        cluster_size = _check_cluster_bits(h.cluster_bits)
        if h.header_length > cluster_size:
            raise Qcow2Error(
                "header_length", f"at most the cluster size ({cluster_size})", h.header_length
            )
        if len(buf) < h.header_length:
            raise Qcow2Error("length", f"at least {h.header_length} bytes", len(buf))
        h = _check_features(buf, h, data_file)
        if h.crypt_method != CRYPT_NONE:
            name = CRYPT_NAMES.get(h.crypt_method, "unknown")
            raise Qcow2UnsupportedError(
                "crypt_method",
                "0 (no encryption; addcow does not decrypt)",
                f"{h.crypt_method} ({name})",
            )
        if h.refcount_order > MAX_REFCOUNT_ORDER:
            raise Qcow2Error("refcount_order", f"at most {MAX_REFCOUNT_ORDER}", h.refcount_order)
        _check_size(h)
        _check_tables(h, file_size)
        h = _backing_name(buf, h, file_size)
        h = _extensions(buf, h)
        if data_file and h.data_file_name is None:
            raise Qcow2Error("data file extension", "the external data file's name", "none")
        return h

    # -- encoding ---------------------------------------------------------------

    def pack(self) -> bytes:
        """Encode a version 3 header, its extensions and the backing name (cluster 0).

        The fields written are this header's; ``header_length`` (112, as QEMU
        writes it), ``backing_file_offset`` and ``backing_file_size`` follow from
        the layout: header, backing format and data file extensions, the end
        marker, then the backing name. The bytes returned are cluster 0 up to the
        end of the name; the rest of the cluster is zero.
        """
        extensions = b""
        if self.backing_format is not None:
            extensions += _extension(EXT_BACKING_FORMAT, self.backing_format.encode("ascii"))
        if self.data_file_name is not None:
            extensions += _extension(EXT_DATA_FILE, self.data_file_name)
        extensions += _EXTENSION.pack(EXT_END, 0)
        length = PACKED_HEADER_LENGTH
        b_off = b_len = 0
        if self.backing_name is not None:
            b_off, b_len = length + len(extensions), len(self.backing_name)
        end = length + len(extensions) + b_len
        if end > self.cluster_size or b_len > MAX_BACKING_NAME:
            raise Qcow2Error(
                "cluster 0",
                f"header, extensions and a backing name of at most {MAX_BACKING_NAME} bytes "
                f"in {self.cluster_size} bytes",
                f"{end} bytes",
            )
        fixed = _HEADER_V2.pack(
            MAGIC, 3, b_off, b_len, self.cluster_bits, self.size, self.crypt_method,
            self.l1_size, self.l1_table_offset, self.refcount_table_offset,
            self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset,
        )  # fmt: skip
        v3 = _HEADER_V3.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            length,
        )
        head = (fixed + v3).ljust(length, b"\0")  # compression type 0 (zlib), padding
        return head + extensions + (self.backing_name or b"")


PACKED_HEADER_LENGTH = 112
"""header_length of the version 3 headers :meth:`Header.pack` writes (QEMU's too)."""


def _extension(kind: int, data: bytes) -> bytes:
    return _EXTENSION.pack(kind, len(data)) + data.ljust((len(data) + 7) // 8 * 8, b"\0")


def pack_entries(entries: Sequence[int]) -> bytes:
    """L1, L2 or refcount table entries (u64) as stored: big endian."""
    table = array("Q", entries)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


def unpack_entries(raw: bytes) -> array[int]:
    """The u64 entries of a table read from the file (big endian)."""
    table = array("Q")
    table.frombytes(raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def pack_refcounts(counts: Sequence[int]) -> bytes:
    """A refcount block of 16-bit entries (refcount_order 4), big endian."""
    table = array("H", counts)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


def cluster0_size(prefix: bytes) -> int:
    """Bytes of cluster 0 to read for :meth:`Header.unpack`.

    ``prefix`` holds at least the first :data:`V3_MIN_HEADER_LENGTH` bytes of
    the file (or all of a shorter file); the checks of the fixed order up to
    cluster_bits run here too.
    """
    return _check_cluster_bits(_fixed_fields(prefix).cluster_bits)


def _fixed_fields(buf: bytes) -> Header:
    """Length, magic, version and header_length: the header's fixed fields."""
    if len(buf) < V2_HEADER_LENGTH:
        raise Qcow2Error("length", f"at least {V2_HEADER_LENGTH} bytes", len(buf))
    magic, version, *fields = _HEADER_V2.unpack_from(buf)
    if magic != MAGIC:
        raise Qcow2Error("magic", repr(MAGIC), repr(magic))
    if version not in VERSIONS:
        raise Qcow2UnsupportedError("version", "2 or 3", version)
    h = Header(version, *fields[:11])  # bytes 8-71, in order
    if version == 2:
        return h
    if len(buf) < V3_MIN_HEADER_LENGTH:
        raise Qcow2Error("length", f"at least {V3_MIN_HEADER_LENGTH} bytes", len(buf))
    incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
        buf, V2_HEADER_LENGTH
    )
    if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
        raise Qcow2Error(
            "header_length",
            f"a multiple of 8, at least {V3_MIN_HEADER_LENGTH}",
            header_length,
        )
    return h._replace(
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
    )


def _check_cluster_bits(cluster_bits: int) -> int:
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2UnsupportedError(
            "cluster_bits", f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}", cluster_bits
        )
    return 1 << cluster_bits


def _check_features(buf: bytes, h: Header, data_file: bool = False) -> Header:
    """Incompatible bits, then the compression type they imply."""
    incompat = h.incompatible_features
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        # Checked first: an unknown incompatible feature may change what every
        # other field means. The feature name table, if readable, names it.
        named = _names_for_message(buf, h, unknown)
        raise Qcow2UnsupportedError(
            "incompatible_features",
            f"only bits of {INCOMPAT_KNOWN:#x}",
            f"{incompat:#x} (unknown: {named})",
        )
    if incompat & INCOMPAT_CORRUPT:
        raise Qcow2Error(
            "incompatible_features",
            "corrupt bit (0x2) clear",
            _feature_list(incompat, 0),
            hint="QEMU marked the image corrupt; check it with qemu-img check",
        )
    if incompat & INCOMPAT_DATA_FILE and not data_file:
        raise Qcow2UnsupportedError(
            "incompatible_features",
            "external data file bit (0x4) clear",
            _feature_list(incompat, 0),
            hint="the guest data would come from a host file that the qcow2 names; "
            "addcow does not follow such a reference",
        )
    if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise Qcow2Error(
            "autoclear_features",
            "raw external data bit (0x2) clear without an external data file",
            _feature_list(h.autoclear_features, 2),
        )
    ctype = buf[COMPRESSION_TYPE_OFFSET] if h.header_length > COMPRESSION_TYPE_OFFSET else 0
    if ctype not in COMPRESSION_NAMES:
        raise Qcow2UnsupportedError("compression_type", "0 (zlib) or 1 (zstd)", ctype)
    if bool(incompat & INCOMPAT_COMPRESSION) != (ctype != COMPRESSION_ZLIB):
        raise Qcow2Error(
            "compression_type",
            "0 (zlib) exactly when incompatible bit 3 (compression type) is clear",
            f"{ctype} with incompatible_features {incompat:#x}",
        )
    if incompat & INCOMPAT_EXTENDED_L2 and h.cluster_bits < MIN_CLUSTER_BITS_EXTENDED_L2:
        raise Qcow2Error(
            "cluster_bits",
            f"at least {MIN_CLUSTER_BITS_EXTENDED_L2} with extended L2 entries",
            h.cluster_bits,
        )
    return h._replace(compression_type=ctype)


def _names_for_message(buf: bytes, h: Header, bits: int) -> str:
    """Unknown incompatible ``bits`` named from the feature name table, if it parses."""
    names = {}
    try:
        for kind, bit, name in _extensions(buf, h).feature_names:
            if kind == 0:
                names[bit] = name
    except Qcow2Error:
        pass
    parts = [
        f"bit {bit}" + (f" {names[bit]!r}" if bit in names else "")
        for bit in range(64)
        if bits >> bit & 1
    ]
    return ", ".join(parts)


def _check_size(h: Header) -> None:
    """l1_size: within QEMU's 32 MiB, and enough for the virtual size."""
    max_entries = MAX_L1_BYTES // ENTRY_SIZE
    needed = h.l1_needed
    if needed > max_entries:
        raise Qcow2UnsupportedError(
            "size",
            f"at most {max_entries * h.l1_span} bytes with {h.cluster_size}-byte clusters "
            f"(a {MAX_L1_BYTES >> 20} MiB L1 table)",
            h.size,
        )
    if h.l1_size > max_entries:
        raise Qcow2Error(
            "l1_size", f"at most {max_entries} entries ({MAX_L1_BYTES >> 20} MiB)", h.l1_size
        )
    if h.l1_size < needed:
        raise Qcow2Error(
            "l1_size",
            f"at least {needed} entries for a virtual size of {h.virtual_size} bytes",
            h.l1_size,
        )


def _check_tables(h: Header, file_size: int) -> None:
    """L1, refcount and snapshot tables: aligned, past cluster 0, inside the file."""
    _check_table("l1_table_offset", h.l1_table_offset, h.l1_size * ENTRY_SIZE, h, file_size)
    if h.refcount_table_clusters == 0:
        raise Qcow2Error("refcount_table_clusters", "at least 1", 0)
    reftable = h.refcount_table_clusters * h.cluster_size
    if reftable > MAX_REFCOUNT_TABLE_BYTES:
        raise Qcow2Error(
            "refcount_table_clusters",
            f"at most {MAX_REFCOUNT_TABLE_BYTES // h.cluster_size} "
            f"({MAX_REFCOUNT_TABLE_BYTES >> 20} MiB)",
            h.refcount_table_clusters,
        )
    _check_table("refcount_table_offset", h.refcount_table_offset, reftable, h, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise Qcow2Error("nb_snapshots", f"at most {MAX_SNAPSHOTS}", h.nb_snapshots)
    snapshots = h.nb_snapshots * SNAPSHOT_ENTRY_MIN
    _check_table("snapshots_offset", h.snapshots_offset, snapshots, h, file_size)


def _check_table(field: str, offset: int, length: int, h: Header, file_size: int) -> None:
    if offset % h.cluster_size:
        raise Qcow2Error(field, f"a multiple of the cluster size ({h.cluster_size})", offset)
    if length == 0:
        return  # an empty table may sit anywhere, even at 0
    if offset < h.cluster_size:
        raise Qcow2Error(
            field, f"past cluster 0, which holds the header (>= {h.cluster_size})", offset
        )
    if offset + length > file_size:
        raise Qcow2Error(
            field,
            f"a table of {length} bytes inside the file of {file_size} bytes",
            offset,
        )


def _backing_name(buf: bytes, h: Header, file_size: int) -> Header:
    """The backing file name: inside cluster 0, after the header, in the file."""
    offset, size = h.backing_file_offset, h.backing_file_size
    if offset == 0:
        return h  # no backing file; backing_file_size is undefined
    cluster = h.cluster_size
    if not h.header_length <= offset < cluster:
        raise Qcow2Error(
            "backing_file_offset",
            f"{h.header_length}..{cluster - 1} (after the header, inside cluster 0)",
            offset,
        )
    if not 1 <= size <= min(MAX_BACKING_NAME, cluster - offset):
        raise Qcow2Error(
            "backing_file_size",
            f"1..{min(MAX_BACKING_NAME, cluster - offset)} (inside cluster 0, "
            f"at most {MAX_BACKING_NAME})",
            size,
        )
    if offset + size > min(len(buf), file_size):
        raise Qcow2Error(
            "backing_file_offset",
            f"a name ending inside the file of {file_size} bytes",
            f"{offset} + {size}",
        )
    name = bytes(buf[offset : offset + size])
    if b"\0" in name:
        raise Qcow2Error("backing file name", "a name without NUL bytes", repr(name))
    return h._replace(backing_name=name)


def _extensions(buf: bytes, h: Header) -> Header:
    """Walk the header extensions from header_length to the backing name or cluster 0's end.

    Bytes of cluster 0 past the end of a short file read as zero, which is
    the end marker (QEMU reads them so too). The area never runs past cluster
    0, whatever backing_file_offset says (it is checked only later, and the
    walk may come first, to name unknown feature bits).
    """
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size)
    pos = h.header_length
    backing_format: str | None = None
    feature_names: list[tuple[int, int, str]] = []
    data_file: bytes | None = None
    seen: set[int] = set()
    while pos < end:
        if pos + _EXTENSION.size > end:
            raise Qcow2Error(
                f"header extension at byte {pos}",
                f"a record ending before byte {end} (end of the extension area)",
                f"{end - pos} bytes left for its 8-byte type and length",
            )
        head = bytes(buf[pos : pos + _EXTENSION.size]).ljust(_EXTENSION.size, b"\0")
        kind, length = _EXTENSION.unpack(head)
        start = pos + _EXTENSION.size
        if length > end - start:
            raise Qcow2Error(
                f"header extension {kind:#010x} at byte {pos}",
                f"at most {end - start} data bytes (the extension area ends at byte {end})",
                length,
            )
        if kind == EXT_END:
            break
        data = bytes(buf[start : start + length]).ljust(length, b"\0")
        if kind in seen and kind in (EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO):
            raise Qcow2Error(
                f"header extension {kind:#010x} at byte {pos}",
                "at most one record of this type",
                "a second one",
            )
        seen.add(kind)
        if kind == EXT_BACKING_FORMAT:
            backing_format = _backing_format(data)
        elif kind == EXT_FEATURE_TABLE:
            feature_names.extend(_feature_table(data))
        elif kind == EXT_CRYPTO:
            offset, size = _CRYPTO_EXT.unpack(data.ljust(_CRYPTO_EXT.size, b"\0")[:16])
            raise Qcow2Error(
                "full disk encryption extension",
                "absent (crypt_method is 0)",
                f"a pointer to {size} bytes at offset {offset}",
            )
        elif kind == EXT_DATA_FILE:
            data_file = data  # a view's (data_file=True); otherwise refused before
        # EXT_BITMAPS and unknown types: nothing a reader needs
        pos = start + (length + 7) // 8 * 8
    return h._replace(
        backing_format=backing_format,
        feature_names=tuple(feature_names),
        data_file_name=data_file,
    )


def _backing_format(data: bytes) -> str:
    if len(data) > MAX_BACKING_FORMAT:
        raise Qcow2Error(
            "backing format extension",
            f"a name of at most {MAX_BACKING_FORMAT} bytes",
            f"{len(data)} bytes",
        )
    if not data or not data.isascii() or b"\0" in data:
        raise Qcow2Error("backing format extension", "an ASCII name without NUL", repr(data))
    return data.decode("ascii")


def _feature_table(data: bytes) -> list[tuple[int, int, str]]:
    entries = []
    for pos in range(0, len(data) - _FEATURE_ENTRY.size + 1, _FEATURE_ENTRY.size):
        kind, bit, raw = _FEATURE_ENTRY.unpack_from(data, pos)
        name = raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
        entries.append((kind, bit, name))
    return entries
