"""Every error the addcow library raises.

The tree::

    AddCowError                     root: catch this to catch everything addcow raises
    +-- HeaderError                 the .add-cow header breaks a rule of the specification
    |   +-- UnsupportedFeatureError     a version or incompatible feature bit we do not know
    +-- BitmapError                 the bitmap is truncated or inconsistent
    +-- ImageFileError              the image file is missing, too small or unusable
    +-- BackingError                a backing file cannot be opened or used
    |   +-- BackingFormatError          format not recorded, unknown, or would need probing
    |   +-- BackingLoopError            a file appears twice in one chain, or the chain is too deep
    +-- PathPolicyError             a file named by an image is outside the allowed tree
    +-- LockError                   another process holds a conflicting lock
    +-- RangeError                  a request reaches past the end of the image
    +-- ReadOnlyError               a write on an image opened read-only
    +-- ClosedImageError            a call on an image that was closed
    +-- AddCowIOError               an operating-system I/O call failed (carries errno)

Messages name the field or file, the expected value and the value found, so a
user can act on them without reading the code. Library code raises the most
specific class; the CLI and the NBD server catch ``AddCowError``.
"""

from __future__ import annotations


class AddCowError(Exception):
    """Root of every error raised by addcow."""


class HeaderError(AddCowError):
    """The .add-cow header breaks a rule of the specification."""

    def __init__(self, field: str, expected: str, found: object, path: str | None = None) -> None:
        super().__init__(field, expected, found)
        self.field = field
        self.expected = expected
        self.found = found
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return (
            f"{where}invalid header field {self.field}: "
            f"expected {self.expected}, found {self.found}"
        )


class UnsupportedFeatureError(HeaderError):
    """The header asks for a version or incompatible feature we do not implement."""


class BitmapError(AddCowError):
    """The cluster bitmap is truncated or inconsistent with the header."""


class ImageFileError(AddCowError):
    """The image file named by the header is missing, too small or unusable."""


class BackingError(AddCowError):
    """A backing file cannot be opened or used."""


class BackingFormatError(BackingError):
    """The backing format is not recorded, unknown, or would need probing."""


class BackingLoopError(BackingError):
    """A file appears twice in one backing chain, or the chain is too deep."""


class PathPolicyError(AddCowError):
    """A file named by an image resolves outside the tree allowed by ``backing_root``."""


class LockError(AddCowError):
    """Another user holds a conflicting lock on one of the image's files."""


class RangeError(AddCowError):
    """A request reaches outside the virtual disk."""


class ReadOnlyError(AddCowError):
    """A write was attempted on an image opened read-only."""


class SlowZeroError(AddCowError):
    """Zeroing was asked to be fast (NBD FAST_ZERO) and would not be; nothing changed."""


class ClosedImageError(AddCowError):
    """The image was used after close()."""


class AddCowIOError(AddCowError):
    """An operating-system call failed; ``errno`` holds its error number."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def wrap(cls, what: str, exc: OSError) -> AddCowIOError:
        """Turn an OSError into an AddCowIOError that says what was being done."""
        return cls(f"{what}: {exc.strerror or exc}", exc.errno)
