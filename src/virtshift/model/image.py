"""What an image file's header says: format, virtual size, backing file.

:class:`ImageLayer` is one layer of a chain as read from the files (by
:mod:`virtshift.store.images`), the facts ``qemu-img info`` reports that
virtshift checks before it trusts a chain: a pivot's destination, a storage
migration's copy, a reused mirror.  No IO here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ImageLayer"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageLayer:
    """One image of a chain, as its header describes it."""

    #: The path the image was opened by (for a backing layer: the backing file
    #: name resolved against the directory of the image above, as QEMU does).
    filename: str
    #: The format it was read as ('qcow2' or 'raw').
    format: str
    #: Guest-visible size in bytes.
    virtual_size: int
    #: The backing file name as recorded in the header, or None.
    backing_filename: str | None = None
    #: That name resolved against this image's directory, or None.
    full_backing_filename: str | None = None
    #: The backing file's format as recorded in the header, or None (not recorded).
    backing_format: str | None = None
