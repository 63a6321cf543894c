"""Copying one image file: sparse-aware, bandwidth-limited, with progress.

The copy is of the image *container* (the qcow2 or raw file as it is), so a
layer's allocation, including clusters that are allocated and zero, is kept
exactly; only the data ranges (``SEEK_DATA``/``SEEK_HOLE``) are read and
written, holes stay holes.  The destination is written to a temporary name,
fsynced and renamed, so a crash never leaves a half-copied file under the final
name.  Backing names are rewritten afterwards by the caller
(``qemu-img rebase -u``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

__all__ = ["copy_sparse"]

CHUNK = 4 * 1024 * 1024


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of every data range of the file."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no more data
                break
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                return [(pos, size)]
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        pos = end
    return out


def copy_sparse(
    src: str,
    dst: str,
    *,
    bandwidth: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Copy ``src`` to ``dst``; return the bytes written.

    :param bandwidth: bytes per second, 0 for unlimited.
    :param progress: called with (bytes done, bytes of data in the file).
    :raise OSError: on any read or write error (the temporary file is removed).
    """
    tmp = f"{dst}.part"
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(sfd).st_size
        ranges = _data_ranges(sfd, size)
        total = sum(e - s for s, e in ranges)
        dfd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            os.ftruncate(dfd, size)
            done = 0
            t0 = time.monotonic()
            kernel_copy = hasattr(os, "copy_file_range")
            for start, end in ranges:
                pos = start
                while pos < end:
                    n = min(CHUNK, end - pos)
                    copied = 0
                    if kernel_copy:
                        # in-kernel copy: no trip through user space (and reflinks
                        # or server-side copies where the file system offers them)
                        try:
                            copied = os.copy_file_range(sfd, dfd, n, pos, pos)
                        except OSError as err:
                            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                 errno.EOPNOTSUPP):  # fmt: skip
                                raise
                            kernel_copy = False
                    if not copied:
                        buf = os.pread(sfd, n, pos)
                        if not buf:
                            raise OSError(errno.EIO, f"short read of '{src}' at {pos}")
                        view = memoryview(buf)
                        off = pos
                        while view:
                            w = os.pwrite(dfd, view, off)
                            view = view[w:]
                            off += w
                        copied = len(buf)
                    pos += copied
                    done += copied
                    if progress is not None:
                        progress(done, total)
                    if bandwidth > 0:
                        ahead = done / bandwidth - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(sfd)
    dirfd = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return done
