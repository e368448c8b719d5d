"""An open add-cow image (:class:`AddCowImage`), and the add-cow format's entry
in the registry of backing stores.

Three files make one image: the .add-cow file (header and bitmap), the image
file (raw, holds every allocated cluster at its guest offset) and the backing
store (read-only; :mod:`addcow.stores`). The package, one module per job:

* :mod:`.core`: opening, reads, writes and copy on write, claims, flush and
  its crash ordering, close, block status (the design note of the image);
* :mod:`.zeroes`: ``write_zeroes`` and ``discard``;
* :mod:`.populate`: copying clusters in from the backing (copy on read, streaming);
* :mod:`.reshape`: resize, rebase (``set_backing``), header rewrites;
* :mod:`.finish`: releasing the backing and detaching while in use;
* :mod:`.fileobj`: the virtual disk as a binary file (``as_file``);
* :mod:`.metafile`: reading and writing the .add-cow file;
* :mod:`.describe`: what ``addcow info`` shows of an image.

:class:`AddCowImage` is composed from the classes of the first five; each
adds methods to :class:`~addcow.image.core.ImageCore`, which holds the state.
An add-cow image is a backing store too: :data:`FORMAT` registers it, so the
chain opener of :mod:`addcow.stores` opens add-cow layers without importing
this package.
"""

from __future__ import annotations

from ..format import MAGIC
from ..stores import registry
from ..stores.base import BackingOpener, StoreFormat
from ..stores.chain import ChainGuard
from .core import Buffer, open_header_backing
from .describe import describe_image
from .fileobj import ImageFile
from .finish import Finishing
from .populate import Populated
from .reshape import Reshaping
from .zeroes import Zeroing

__all__ = ["FORMAT", "AddCowImage", "Buffer", "ImageFile", "Populated", "open_header_backing"]


class AddCowImage(Reshaping, Zeroing, Finishing):
    """An open add-cow image. Use :meth:`open` (or :func:`addcow.open`).

    The image owns and closes the three kinds of file it opened itself: the
    .add-cow file, the image file and the backing chain.
    """

    def as_file(self) -> ImageFile:
        """A seekable ``io.RawIOBase`` over the virtual disk (shares this image)."""
        return ImageFile(self)


def _open_as_backing(
    path: str, *, guard: ChainGuard, force_share: bool, open_backing: BackingOpener
) -> AddCowImage:
    """Open the add-cow image at ``path`` read-only as a store of a chain (its own
    backing is opened by the chain opener, under the same guard)."""
    return AddCowImage.open(path, readonly=True, force_share=force_share, guard=guard)


FORMAT = StoreFormat(
    "add-cow",
    _open_as_backing,
    describe_image,
    magic=((0, MAGIC),),
    commit_target=True,
)
registry.register(FORMAT)
