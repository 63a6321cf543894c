"""Atomic state files and cross-process locks.

* :func:`write_atomic` writes a file so that a reader sees the old content or the
  new one, never a torn mix, even across a crash: temporary file in the same
  directory, ``fsync``, ``rename``, ``fsync`` of the directory.
* :class:`FileLock` is an ``flock`` on a lock file, with a timeout, exclusive
  or shared.  An exclusive holder writes its pid and the operation into the
  lock file, so a waiter that gives up can say who holds the lock.  ``flock``
  locks die with their process, so a crashed holder never leaves a stale lock
  behind.  Each :meth:`FileLock.acquire` opens the file anew: ``flock`` belongs
  to the open file description, so two threads of one process exclude each
  other exactly as two processes do.

Everything virtshift writes is private to its owner (directories 0700, files
0600, whatever the umask), and nothing here follows a symbolic link planted in
the driver's root: directories must be real directories, state files are read
with ``O_NOFOLLOW``, replaced by ``rename`` (which replaces a link, never writes
through it), and lock files are opened with ``O_NOFOLLOW``.  This module knows
nothing of domains or XML.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Container, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

from virtshift.errors import ErrorCode, VirtError

__all__ = [
    "FileLock",
    "PreparedFile",
    "commit_prepared",
    "ensure_dir",
    "open_private",
    "prepare_atomic",
    "refuse_link",
    "remove_quietly",
    "remove_stale_temps",
    "write_atomic",
]


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as directories private to the owner.

    Every directory created here is 0700 whatever the umask.  An existing
    ``path`` must be a real directory, not a symbolic link to one.

    :raise VirtError: OPERATION_FAILED when ``path`` is a symbolic link or not a
        directory, or cannot be created.
    """
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        for p in reversed(missing):
            try:
                os.mkdir(p, 0o700)
            except FileExistsError:  # created meanwhile: checked below like any other
                continue
            os.chmod(p, 0o700, follow_symlinks=False)
    except OSError as err:
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"cannot create directory '{path}': {err.strerror}"
        ) from err
    refuse_link(path, want_dir=True)
    return path


def refuse_link(path: Path, *, want_dir: bool = False) -> None:
    """Raise unless ``path`` is missing or a real file (a directory if ``want_dir``).

    ``lstat``: a symbolic link is refused, never followed.

    :raise VirtError: OPERATION_FAILED naming the path.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"cannot access '{path}': {err.strerror}"
        ) from err
    if stat.S_ISLNK(mode):
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"'{path}' is a symbolic link; refusing to follow it"
        )
    if want_dir and not stat.S_ISDIR(mode):
        raise VirtError(ErrorCode.OPERATION_FAILED, f"'{path}' is not a directory")


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of a state file: never through a symbolic link, created 0600.

    :raise VirtError: OPERATION_FAILED for a symbolic link or another error.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"'{path}' is a symbolic link; refusing to follow it"
            ) from None
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"cannot open '{path}': {err.strerror}"
        ) from err


class PreparedFile:
    """A file's new content, written and (if durable) synced under a temporary
    name, waiting for :meth:`commit` to put it in place (or :meth:`discard`).

    Made by :func:`prepare_atomic`: the slow part of a durable write (the data
    and its ``fsync``) can be done while the caller waits for something else,
    and only the rename and the directory's ``fsync`` remain when the content
    is to take effect.
    """

    def __init__(self, path: Path, tmp: Path, durable: bool, key: tuple[int, int, int]) -> None:
        #: The file to replace, and the temporary file holding the new content.
        self.path, self.tmp = path, tmp
        self.durable = durable
        #: (inode, size, mtime) the file will have once in place (a rename keeps them).
        self.key = key
        self._state = "prepared"

    def commit(self) -> None:
        """Put the new content in place (and sync the directory if durable).

        :raise VirtError: OPERATION_FAILED; the old content is then still in place.
        """
        commit_prepared([self])

    def discard(self) -> None:
        """Remove the temporary file, unless committed (safe to call twice)."""
        if self._state == "prepared":
            self._state = "discarded"
            remove_quietly(self.tmp)


def prepare_atomic(path: Path, data: str | bytes, *, durable: bool = True) -> PreparedFile:
    """Write ``data`` for ``path`` under a temporary name in the same directory
    (mode 0600; synced if ``durable``); :meth:`PreparedFile.commit` replaces
    ``path`` with it.

    :raise VirtError: OPERATION_FAILED when it cannot be written (nothing is
        left behind).
    """
    raw = data.encode() if isinstance(data, str) else data
    # one temporary name per process and thread: two threads writing the same file
    # must not unlink or overwrite each other's temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:  # left by a crash, or planted: never write through it
            os.unlink(tmp)
            fd = os.open(tmp, flags, 0o600)
        try:
            view = memoryview(raw)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as err:
        remove_quietly(tmp)
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"cannot write state file '{path}': {err.strerror}"
        ) from err
    return PreparedFile(path, tmp, durable, (st.st_ino, st.st_size, st.st_mtime_ns))


def commit_prepared(files: list[PreparedFile]) -> None:
    """Put each prepared file in place, in order, then sync each directory that
    holds a durable one, once.  On an error the files not yet in place are
    discarded.

    :raise VirtError: OPERATION_FAILED naming the file that failed.
    """
    dirs: dict[Path, Path] = {}  # directory -> a file put in place there
    for i, f in enumerate(files):
        if f._state != "prepared":
            raise ValueError(f"'{f.path}' is not prepared ({f._state})")
        try:
            os.replace(f.tmp, f.path)
        except OSError as err:
            for rest in files[i:]:
                rest.discard()
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"cannot write state file '{f.path}': {err.strerror}"
            ) from err
        f._state = "committed"
        if f.durable:
            dirs.setdefault(f.path.parent, f.path)
    for d, path in dirs.items():
        try:
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"cannot write state file '{path}': {err.strerror}"
            ) from err


def write_atomic(path: Path, data: str | bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (mode 0600).

    :param durable: fsync the file and its directory, so that the new content
        survives a power loss; without, it survives the death of any process (the
        page cache keeps it), which is enough for a runtime file that dies with QEMU.
    :raise VirtError: OPERATION_FAILED when the file cannot be written; the old
        content is then still in place.
    """
    prepare_atomic(path, data, durable=durable).commit()


#: prepare_atomic's temporary name: ``.NAME.PID.TID.tmp``.
_TEMP_NAME: Final = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9]+\.tmp")


def remove_stale_temps(directory: Path, names: Container[str] | None = None) -> list[Path]:
    """Remove the temporary files :func:`prepare_atomic` left in ``directory``
    (for the files named in ``names``, if given) whose process is gone;
    return them.  A process killed between preparing and committing leaves
    its files there."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or (names is not None and m["name"] not in names):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid) or not entry.is_file(follow_symlinks=False):
            continue
        remove_quietly(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_quietly(path: Path) -> None:
    """Remove a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class FileLock:
    """An ``flock`` on ``path``, taken with a timeout.

    :param path: the lock file (created if missing).
    :param what: what the lock protects, for messages ("domain 'vm1'").
    :param timeout: seconds to wait; 0 means try once.
    :param shared: take a shared lock (readers), not an exclusive one; a shared
        holder does not write itself into the file.
    """

    def __init__(
        self, path: Path, *, what: str, timeout: float = 30.0, shared: bool = False
    ) -> None:
        self.path = path
        self.what = what
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None

    def acquire(self, operation: str = "") -> None:
        """Take the lock, or raise.

        :raise VirtError: OPERATION_TIMEOUT when another process keeps it longer
            than the timeout; the message names that process and its operation;
            OPERATION_FAILED when the lock file is a symbolic link.
        """
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT)
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise VirtError(
                        ErrorCode.OPERATION_TIMEOUT,
                        f"cannot acquire state change lock for {self.what}"
                        + (f" (held by {holder})" if holder else ""),
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} operation {operation or '?'}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (safe to call twice)."""
        if self._fd is not None:
            if not self.shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @contextlib.contextmanager
    def hold(self, operation: str) -> Iterator[None]:
        """Context manager: hold the lock for ``operation``."""
        self.acquire(operation)
        try:
            yield
        finally:
            self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
