"""Copying image files: sparse-aware, in parallel, bandwidth-limited, with progress.

The copy is of the image *container* (the qcow2 or raw file as it is), so a
layer's allocation, including clusters that are allocated and zero, is kept
exactly; only the data ranges (``SEEK_DATA``/``SEEK_HOLE``) are copied, holes
stay holes.  Each destination is written to a temporary name, fsynced and
renamed (and its directory fsynced), so a crash never leaves a half-copied file
under the final name and a file under its final name is on disk.  Backing names
are rewritten afterwards by the caller (``qemu-img rebase -u``).

How it is fast without giving up durability:

- the data moves in the kernel (``copy_file_range``), with ``pread``/``pwrite``
  where the kernel or the file systems cannot;
- the writeback of each copied stretch is started at once
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, where the C library has it), so
  the disk writes while the copy goes on and the final ``fsync`` finds little
  left to do; without it the final ``fsync`` writes everything;
- the data of all the files is cut into pieces that a few threads copy at the
  same time; the files are finished (fsync, rename) in order, each as soon as
  its last piece is copied, while the threads go on with the next files.

The bandwidth limit is for all threads together.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["copy_files", "copy_sparse"]

#: Most bytes one copy call moves.  Large, because each return from the kernel
#: waits for the GIL: with another Python thread busy in the process (a guest
#: writer, a caller's event loop), a 2 GiB copy in 8 MiB calls took ~50% longer
#: than in 32 MiB calls, and 32 MiB calls ~50% longer than 64 MiB calls.
CHUNK = 64 * 1024 * 1024
#: The data of a file is cut into pieces of at most this size, one thread each.
PIECE = 64 * 1024 * 1024
#: Writeback is started after each this many bytes copied by one thread.
WRITE_BEHIND = 64 * 1024 * 1024
#: Copy threads (with write-behind the disk bounds the copy soon: a few are enough).
THREADS = min(4, max(2, os.cpu_count() or 2))

_SYNC_FILE_RANGE_WRITE = 2
#: errnos that mean "no write-behind here", not "the write failed".
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE)


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


def _pieces(ranges: list[tuple[int, int]], piece: int) -> list[tuple[int, int]]:
    """The data ranges cut into pieces of at most ``piece`` bytes."""
    return [
        (pos, min(pos + piece, end)) for start, end in ranges for pos in range(start, end, piece)
    ]


class WriteBehind:
    """Start the writeback of a written range without waiting for it.

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` through the C library; a no-op
    where there is none, or once the kernel or the file system says it is not
    supported.  It never replaces the final ``fsync``.
    """

    def __init__(self, func: Callable[..., int] | None = None, *, probe: bool = True) -> None:
        self._func = func
        if func is None and probe:
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                f = libc.sync_file_range
                f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                f.restype = ctypes.c_int
                self._func = f

    @property
    def active(self) -> bool:
        return self._func is not None

    def __call__(self, fd: int, offset: int, length: int) -> None:
        func = self._func
        if func is None or length <= 0:
            return
        if func(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0:
            return
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            self._func = None  # e.g. a file system without it: the fsync does it all
            return
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class Pacer:
    """The bandwidth limit, for every thread of a copy together."""

    def __init__(
        self,
        bandwidth: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bandwidth = bandwidth
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._t0 = clock()
        self._done = 0

    def chunk(self) -> int:
        """How much one copy call should move (about 1/10 s worth when limited)."""
        if self.bandwidth <= 0:
            return CHUNK
        return max(64 * 1024, min(CHUNK, self.bandwidth // 10 // 65536 * 65536))

    def account(self, n: int) -> None:
        """``n`` more bytes were copied: wait until the limit allows them."""
        if self.bandwidth <= 0:
            return
        with self._lock:
            self._done += n
            ahead = self._done / self.bandwidth - (self._clock() - self._t0)
        if ahead > 0:
            self._sleep(ahead)


def _copy_range(
    sfd: int,
    dfd: int,
    start: int,
    end: int,
    *,
    pacer: Pacer,
    write_behind: WriteBehind,
    kernel_copy: list[bool],
    copied: Callable[[int], None],
    stop: threading.Event,
) -> None:
    """Copy [start, end) of ``sfd`` to the same offsets of ``dfd``."""
    pos = unsynced = start
    chunk = pacer.chunk()
    while pos < end:
        if stop.is_set():
            return
        n = min(chunk, end - pos)
        got = 0
        if kernel_copy[0]:
            # in-kernel copy: no trip through user space (and reflinks or
            # server-side copies where the file system offers them)
            try:
                got = os.copy_file_range(sfd, dfd, n, pos, pos)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                kernel_copy[0] = False
        if not got:
            buf = os.pread(sfd, n, pos)
            if not buf:
                raise OSError(errno.EIO, f"short read at {pos}")
            view = memoryview(buf)
            off = pos
            while view:
                w = os.pwrite(dfd, view, off)
                view = view[w:]
                off += w
            got = len(buf)
        pos += got
        if pos - unsynced >= WRITE_BEHIND or pos >= end:
            write_behind(dfd, unsynced, pos - unsynced)
            unsynced = pos
        copied(got)
        pacer.account(got)


@dataclass(slots=True)
class _File:
    src: str
    dst: str
    sfd: int = -1
    dfd: int = -1
    total: int = 0
    done: int = 0
    pending: int = 0
    finished: bool = False

    @property
    def tmp(self) -> str:
        return f"{self.dst}.part"


def _fsync_dir(path: str) -> None:
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def copy_files(
    pairs: Sequence[tuple[str, str]],
    *,
    bandwidth: int = 0,
    progress: Callable[[int, int, int], None] | None = None,
    threads: int = THREADS,
    write_behind: WriteBehind | None = None,
) -> Iterator[tuple[int, int]]:
    """Copy each (src, dst) of ``pairs``; yield (index, bytes written) of each file,
    in the order of ``pairs``, once it is complete and durable under ``dst``.

    Stopping the iteration early (or an error) stops the threads and removes
    the temporary files of the copies that did not finish; files already
    yielded stay.

    :param bandwidth: bytes per second for all threads together, 0 for unlimited.
    :param progress: called with (index, bytes done, bytes of data in the file),
        from the copying threads, one call at a time.
    :param threads: how many threads copy at the same time.
    :raise OSError: on any read or write error.
    """
    wb = write_behind if write_behind is not None else WriteBehind()
    pacer = Pacer(bandwidth)
    files = [_File(src, dst) for src, dst in pairs]
    lock = threading.Condition()
    stop = threading.Event()
    failed: list[BaseException] = []
    queue: collections.deque[tuple[int, int, int]] = collections.deque()
    kernel_copy = [hasattr(os, "copy_file_range")]
    workers: list[threading.Thread] = []

    def report(index: int, n: int) -> None:
        f = files[index]
        with lock:
            f.done += n
            if progress is not None:
                progress(index, f.done, f.total)

    def work() -> None:
        while True:
            with lock:
                if stop.is_set() or not queue:
                    return
                index, start, end = queue.popleft()
            f = files[index]
            try:
                _copy_range(
                    f.sfd,
                    f.dfd,
                    start,
                    end,
                    pacer=pacer,
                    write_behind=wb,
                    kernel_copy=kernel_copy,
                    copied=functools.partial(report, index),
                    stop=stop,
                )
            except BaseException as err:  # handed to the caller's thread
                with lock:
                    failed.append(err)
                    stop.set()
                    lock.notify_all()
                return
            with lock:
                f.pending -= 1
                lock.notify_all()

    try:
        for index, f in enumerate(files):
            f.sfd = os.open(f.src, os.O_RDONLY | os.O_CLOEXEC)
            size = os.fstat(f.sfd).st_size
            ranges = _data_ranges(f.sfd, size)
            f.total = sum(e - s for s, e in ranges)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            f.dfd = os.open(f.tmp, flags, 0o600)
            os.ftruncate(f.dfd, size)
            pieces = _pieces(ranges, PIECE)
            f.pending = len(pieces)
            queue.extend((index, s, e) for s, e in pieces)
        for _ in range(max(1, min(threads, len(queue)))):
            t = threading.Thread(target=work, name="virtshift-copy", daemon=True)
            workers.append(t)
            t.start()
        for index, f in enumerate(files):
            with lock:
                while f.pending and not failed:
                    lock.wait()
                if failed:
                    raise failed[0]
            os.fsync(f.dfd)
            os.close(f.dfd)
            f.dfd = -1
            os.rename(f.tmp, f.dst)
            f.finished = True
            _fsync_dir(f.dst)
            yield index, f.done
    finally:
        stop.set()
        for t in workers:
            t.join()
        for f in files:
            for fd in (f.sfd, f.dfd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if not f.finished:
                with contextlib.suppress(OSError):
                    os.unlink(f.tmp)


def copy_sparse(
    src: str,
    dst: str,
    *,
    bandwidth: int = 0,
    progress: Callable[[int, int], None] | None = None,
    threads: int = THREADS,
) -> int:
    """Copy one file ``src`` to ``dst`` (see :func:`copy_files`); return the bytes written.

    :param progress: called with (bytes done, bytes of data in the file).
    """
    report = None if progress is None else (lambda _i, done, total: progress(done, total))
    written = 0
    for _index, n in copy_files([(src, dst)], bandwidth=bandwidth, progress=report,
                                threads=threads):  # fmt: skip
        written = n
    return written
