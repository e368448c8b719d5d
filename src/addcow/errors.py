"""Every error the addcow library raises.

The tree::

    AddCowError                     root: catch this to catch everything addcow raises
    +-- HeaderError                 the .add-cow header breaks a rule of the specification
    |   +-- UnsupportedFeatureError     a version or incompatible feature bit we do not know
    |   +-- ForeignFormatError          the file is an image of another format (qcow2, ...)
    +-- BitmapError                 the bitmap is truncated or inconsistent
    +-- ImageFileError              the image file is missing, too small or unusable
    +-- BackingError                a backing file cannot be opened or used
    |   +-- BackingFormatError          format not recorded, unknown, or would need probing
    |   +-- BackingLoopError            a file appears twice in one chain, or the chain is too deep
    |   +-- Qcow2Error                  a qcow2 backing file breaks a rule of the qcow2 format
    |   |   +-- Qcow2UnsupportedError       a qcow2 feature addcow does not read (encryption, ...)
    |   |   +-- Qcow2CorruptError           a table entry or compressed cluster is inconsistent
    |   +-- RemoteBackingError          a remote backing (NBD, HTTP, S3) cannot be reached or used
    |       +-- RemoteReplyError            the server's reply breaks its protocol
    |       +-- RemoteReadError             the server answered a request with an error
    |       +-- RemoteChangedError          the golden image changed since the image was created
    |       +-- RemoteAuthError             the credentials are missing, wrong or not allowed
    +-- PathPolicyError             a file named by an image is outside the allowed tree
    +-- FormatChoiceError           a file named on the command line needs its format given
    +-- ExistingFileError           creating would replace a file or hide an image file's data
    +-- LockError                   another process holds a conflicting lock
    +-- RangeError                  a request reaches past the end of the image
    +-- ReadOnlyError               a write on an image opened read-only
    +-- SlowZeroError               fast zeroing (NBD FAST_ZERO) asked for, would be slow
    +-- ClosedImageError            a call on an image that was closed
    +-- IncompleteImageError        the operation needs every cluster in the image file
    +-- AmendError                  the header cannot be converted as asked
    +-- AddCowIOError               an operating-system I/O call failed (carries errno)
    +-- ViewError                   a qcow2 view cannot be made or folded as asked
        +-- ViewActiveError             the image has a qcow2 view in force: fold it first

Every class here is exported by ``addcow`` (``addcow.__all__``). The NBD
server's own errors, for its protocol, TLS credentials, live operations,
control socket and handoff to QEMU (with its QMP client), also derive from
``AddCowError`` but stay in their modules (``addcow.nbd.events``,
``addcow.serve.tls``, ``addcow.serve.live``, ``addcow.serve.control``,
``addcow.serve.handoff``, ``addcow.serve.qmp``): they are not raised by library
calls.

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
    """Another user holds a conflicting lock on one of the image's files.

    ``hint``, when set, is what a read-only caller can do about it (open with
    ``force_share``, the CLI's ``-U``); a command that has no ``-U`` drops it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RangeError(AddCowError):
    """A request reaches outside the virtual disk."""


class ReadOnlyError(AddCowError):
    """A write was attempted on an image opened read-only."""


class SlowZeroError(AddCowError):
    """Zeroing was asked to be fast (NBD FAST_ZERO) and would not be; nothing changed."""


class ClosedImageError(AddCowError):
    """The image was used after close()."""


class IncompleteImageError(AddCowError):
    """The operation needs every cluster in the image file, and some are not."""


class AmendError(AddCowError):
    """The header cannot be converted as asked."""


class AddCowIOError(AddCowError):
    """An operating-system call failed; ``errno`` holds its error number."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def wrap(cls, what: str, exc: OSError) -> AddCowIOError:
        """Turn an OSError into an AddCowIOError that says what was being done."""
        return cls(f"{what}: {exc.strerror or exc}", exc.errno)


class ForeignFormatError(HeaderError):
    """The file is an image of another known format (its magic says so), not add-cow."""

    def __init__(self, fmt: str, found: object, path: str | None = None) -> None:
        super().__init__("magic", "ADD_COW\\xff", found, path)
        self.format = fmt

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}this is a {self.format} image, not an add-cow image"


class FormatChoiceError(AddCowError):
    """A file named on the command line needs its format given (-f): its content
    starts with an image header, which a guest can write into a raw disk."""


class ExistingFileError(AddCowError):
    """Creating would replace an existing file, or hide the data an image file holds."""


class Qcow2Error(BackingError):
    """A qcow2 backing file breaks a rule of the qcow2 format.

    Like :class:`HeaderError` it names the field (or table entry), the expected
    value and the value found; ``hint`` adds what the user can do about it.
    """

    _kind = "invalid"

    def __init__(
        self,
        field: str,
        expected: str,
        found: object,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(field, expected, found)
        self.field = field
        self.expected = expected
        self.found = found
        self.path = path
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        tail = f" ({self.hint})" if self.hint else ""
        return (
            f"{where}{self._kind} qcow2 {self.field}: "
            f"expected {self.expected}, found {self.found}{tail}"
        )


class Qcow2UnsupportedError(Qcow2Error):
    """The qcow2 file uses a feature addcow does not read (encryption, data file, ...)."""

    _kind = "unsupported"


class Qcow2CorruptError(Qcow2Error):
    """A qcow2 table entry or compressed cluster met while reading is inconsistent."""

    _kind = "corrupt"


class RemoteBackingError(BackingError):
    """A remote backing store (an NBD export, an HTTP URL) cannot be reached or used.

    ``errno`` is the NBD error or operating-system error number when there is one.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RemoteReplyError(RemoteBackingError):
    """A server's reply breaks its protocol (a wrong length, cookie, range or magic)."""


class RemoteReadError(RemoteBackingError):
    """The server answered a request (a read, a block status) with an error (its
    ``errno``: a bad sector's EIO, say); the connection is still in step, and other
    ranges may read fine."""


class RemoteChangedError(RemoteBackingError):
    """The golden image behind a backing URI is not the one pinned when the image was
    created (another size, ETag or modification time)."""


class ViewError(AddCowError):
    """A qcow2 view cannot be made or folded as asked (limits, a hostile view)."""


class ViewActiveError(ViewError):
    """The image has a qcow2 view in force (or one being made or folded): fold it first."""


class RemoteAuthError(RemoteBackingError):
    """The server of a backing URI refused the credentials (wrong, unknown, expired or
    not allowed to read), or none were found where they are looked for."""
