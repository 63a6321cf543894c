"""Read qcow2 and raw image headers in process (no ``qemu-img`` subprocess).

A pivot onto a reused destination, a storage migration's plan and its
verification need only header facts of each layer: format, virtual size,
backing file name and the backing format recorded in the image.  Spawning
``qemu-img info --backing-chain`` for that costs ~5 ms per call; reading a few
hundred bytes per layer costs microseconds.

What is read (qcow2, version 2 and 3, as QEMU 7.2 reads it in
``qcow2_do_open``):

* the header: magic ``QFI\\xfb``, version, backing file offset and size,
  cluster bits, virtual size, encryption method, and for version 3 the
  feature bits and the header length;
* the header extensions up to the backing file name (or the end of the first
  cluster): the backing format (``0xE2792ACA``) and the external data file
  name (``0x44415441``), which is refused;
* the backing file name.

Raw images have no header: their virtual size is the size of the file (or
block device).

The reader is strict where QEMU is lenient: it never probes a format (a
backing file whose format is not recorded ends the chain it returns, and the
caller refuses it), refuses images QEMU would refuse (unknown incompatible
features, bad offsets, a backing name longer than 1023 bytes) and also
refuses what virtshift does not handle (a corrupt mark, encryption, an
external data file, a backing name with a NUL byte or a protocol prefix such
as ``json:`` or ``nbd:``, any format but qcow2 and raw).  Every failure is a
:class:`VirtError` (OPERATION_FAILED) naming the file; nothing is written.

It does not read L1/L2 tables, refcounts or snapshots (allocation and
consistency are ``qemu-img``'s business).
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Final

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.image import ImageLayer

__all__ = ["read_chain", "read_layer"]

#: Formats this module reads.
FORMATS: Final = frozenset({"qcow2", "raw"})

_MAGIC: Final = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
# crypt_method (then l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset: not needed here)
_V2: Final = struct.Struct(">4sIQIIQI")
_V2_LENGTH: Final = 72
# incompatible, compatible, autoclear features, refcount_order, header_length
_V3: Final = struct.Struct(">QQQII")
_V3_MIN_LENGTH: Final = 104
_EXT: Final = struct.Struct(">II")
_EXT_END: Final = 0
_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_EXT_DATA_FILE: Final = 0x44415441

_INCOMPAT_DIRTY: Final = 1 << 0
_INCOMPAT_CORRUPT: Final = 1 << 1
_INCOMPAT_DATA_FILE: Final = 1 << 2
_INCOMPAT_COMPRESSION: Final = 1 << 3
_INCOMPAT_EXTL2: Final = 1 << 4
#: Incompatible features an image may have and still be read here.
_INCOMPAT_ALLOWED: Final = _INCOMPAT_DIRTY | _INCOMPAT_COMPRESSION | _INCOMPAT_EXTL2

#: QEMU's limits (block/qcow2.h): cluster bits 9..21, backing name < 1024 bytes,
#: backing format name < 16 bytes.
_MIN_CLUSTER_BITS: Final = 9
_MAX_CLUSTER_BITS: Final = 21
_MAX_BACKING_NAME: Final = 1023
_MAX_BACKING_FORMAT: Final = 15
#: Bytes read at once from the start of an image: the header, its extensions and
#: the backing name of any image qemu-img creates with the default cluster size.
_FIRST_READ: Final = 4096
#: QEMU's sector: raw sizes are rounded up to it.
_SECTOR: Final = 512
#: Longest chain followed (QEMU has no limit; a loop is caught separately).
_MAX_DEPTH: Final = 1000


def _bad(path: str, why: str) -> VirtError:
    return VirtError(ErrorCode.OPERATION_FAILED, f"cannot read image '{path}': {why}")


class _Reader:
    """Bytes of one open file: the first block is read once, the rest on demand."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.head = os.pread(fd, _FIRST_READ, 0)

    def read(self, offset: int, length: int) -> bytes:
        if offset + length <= len(self.head):
            return self.head[offset : offset + length]
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise _bad(self.path, f"file ends before byte {offset + length} (truncated)")
        return data


def _qcow2(r: _Reader, path: str) -> ImageLayer:
    raw = r.read(0, _V2.size)
    magic, version, bf_offset, bf_size, cluster_bits, size, crypt = _V2.unpack(raw)
    if magic != _MAGIC:
        raise _bad(path, "not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise _bad(path, f"unsupported qcow2 version {version}")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise _bad(path, f"unsupported cluster size 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    if crypt != 0:
        raise _bad(path, "encrypted qcow2 images are not supported")
    header_length = _V2_LENGTH
    if version == 3:
        incompat, _compat, _autoclear, _order, header_length = _V3.unpack(
            r.read(_V2_LENGTH, _V3.size)
        )
        if header_length < _V3_MIN_LENGTH or header_length > cluster_size:
            raise _bad(path, f"invalid qcow2 header length {header_length}")
        if incompat & _INCOMPAT_CORRUPT:
            raise _bad(path, "the image is marked corrupt")
        if incompat & _INCOMPAT_DATA_FILE:
            raise _bad(path, "images with an external data file are not supported")
        unknown = incompat & ~_INCOMPAT_ALLOWED
        if unknown:
            raise _bad(path, f"unknown incompatible qcow2 features {unknown:#x}")
    if bf_offset:
        if bf_offset < header_length or bf_offset > cluster_size:
            raise _bad(path, f"invalid backing file offset {bf_offset}")
        if bf_size > min(_MAX_BACKING_NAME, cluster_size - bf_offset):
            raise _bad(path, f"backing file name too long ({bf_size} bytes)")
    ext_end = bf_offset or cluster_size
    backing_format = _extensions(r, path, header_length, ext_end)
    backing: str | None = None
    if bf_offset and bf_size:
        name = r.read(bf_offset, bf_size)
        if b"\0" in name:
            raise _bad(path, "backing file name contains a NUL byte")
        backing = os.fsdecode(name)
        _check_plain(path, backing)
    elif backing_format is not None:
        backing_format = None  # a format without a backing file names nothing
    return ImageLayer(
        filename=path,
        format="qcow2",
        virtual_size=size,
        backing_filename=backing,
        full_backing_filename=None if backing is None else _combine(path, backing),
        backing_format=backing_format,
    )


def _extensions(r: _Reader, path: str, offset: int, end: int) -> str | None:
    """Walk the header extensions in [offset, end); return the backing format."""
    backing_format: str | None = None
    while offset < end:
        if end - offset < _EXT.size:
            raise _bad(path, "qcow2 header extension runs past its area")
        kind, length = _EXT.unpack(r.read(offset, _EXT.size))
        offset += _EXT.size
        if kind == _EXT_END:
            break
        if length > end - offset:
            raise _bad(path, f"qcow2 header extension {kind:#x} too large")
        if kind == _EXT_DATA_FILE:
            raise _bad(path, "images with an external data file are not supported")
        if kind == _EXT_BACKING_FORMAT:
            if length > _MAX_BACKING_FORMAT:
                raise _bad(path, f"backing format name too long ({length} bytes)")
            data = r.read(offset, length)
            if b"\0" in data:
                raise _bad(path, "backing format name contains a NUL byte")
            try:
                backing_format = data.decode("ascii")
            except UnicodeDecodeError:
                raise _bad(path, "backing format name is not ASCII") from None
        offset += (length + 7) & ~7
    return backing_format or None


def _check_plain(path: str, name: str) -> None:
    """A backing name must be a plain file name: no ``json:`` or ``proto:`` prefix.

    QEMU treats a ``:`` before the first ``/`` as a protocol (``path_has_protocol``).
    """
    head = name.split("/", 1)[0]
    if ":" in head:
        raise _bad(path, f"backing file '{name}' is not a plain file name")


def _combine(path: str, name: str) -> str:
    """Resolve a backing name against the directory of ``path`` (QEMU's ``path_combine``)."""
    if name.startswith("/"):
        return name
    return path[: path.rfind("/") + 1] + name


def read_layer(path: str, fmt: str) -> ImageLayer:
    """The header facts of one image opened as ``fmt`` (its backing file is not opened).

    :raise VirtError: OPERATION_FAILED when the file cannot be opened or read, is
        not a ``fmt`` image, or has a feature this module refuses (module docstring).
    """
    if fmt not in FORMATS:
        raise _bad(path, f"format '{fmt}' is not supported (only qcow2 and raw)")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise _bad(path, err.strerror or str(err)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise _bad(path, "not a regular file or block device")
        if fmt == "raw":
            # QEMU counts whole 512-byte sectors (bdrv_getlength rounds up)
            size = -(-os.lseek(fd, 0, os.SEEK_END) // _SECTOR) * _SECTOR
            return ImageLayer(filename=path, format="raw", virtual_size=size)
        return _qcow2(_Reader(fd, path), path)
    except OSError as err:
        raise _bad(path, err.strerror or str(err)) from None
    finally:
        os.close(fd)


def read_chain(path: str, fmt: str) -> list[ImageLayer]:
    """The chain below ``path`` (opened as ``fmt``), top first, as the headers name it.

    Each backing file is opened as the format its parent records.  The chain
    ends at a layer without a backing file, or at one whose backing format is
    not recorded (formats are never probed): such a last layer has
    ``backing_filename`` set and ``backing_format`` None, and the caller must
    refuse it.

    :raise VirtError: OPERATION_FAILED when a layer cannot be read (see
        :func:`read_layer`), or the chain loops or is deeper than 1000 layers.
    """
    layers = [read_layer(path, fmt)]
    seen = {_identity(path)}
    while True:
        top = layers[-1]
        if top.full_backing_filename is None or top.backing_format is None:
            return layers
        name = top.full_backing_filename
        ident = _identity(name)
        if ident in seen:
            raise _bad(top.filename, f"backing file '{name}' makes a loop in the chain")
        if len(layers) >= _MAX_DEPTH:
            raise _bad(path, f"backing chain deeper than {_MAX_DEPTH} layers")
        seen.add(ident)
        layers.append(read_layer(name, top.backing_format))


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as err:
        raise _bad(path, err.strerror or str(err)) from None
    return st.st_dev, st.st_ino
