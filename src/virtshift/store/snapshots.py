"""Snapshot metadata documents on disk: one file per snapshot, ``DIR/NAME.xml``.

:class:`SnapshotStore` keeps the XML text of each snapshot of one domain, the
way libvirt keeps ``/var/lib/libvirt/qemu/snapshot/DOMAIN/NAME.xml``:

* writes are atomic (:func:`virtshift.store.files.write_atomic`: temporary file,
  ``fsync``, ``rename``), so a crash leaves the old document or the new one;
* names are checked before anything touches the file system, so a snapshot
  name can never address a file outside the directory ('/', NUL, a leading
  '.', empty, longer than 200 characters or bytes);
* a directory or file that is a symbolic link (or anything but what it should
  be) is refused, never followed: reads open with ``O_NOFOLLOW``, writes check with ``lstat``;
* temporary files (names starting with '.') and files not ending in ``.xml``
  are not snapshots and are never listed.

The store deliberately does not parse the documents, know which snapshot is
current or how they form a tree (:mod:`virtshift.model.snaptree`), nor lock:
callers hold the per-domain lock of :mod:`virtshift.runtime` around changes.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from virtshift.errors import ErrorCode, NoDomainSnapshot, VirtError
from virtshift.model.names import MAX_NAME_LENGTH, check_snapshot_name
from virtshift.store.files import ensure_dir, refuse_link, remove_quietly, write_atomic

_SUFFIX = ".xml"

__all__ = ["MAX_NAME_LENGTH", "SnapshotStore", "check_snapshot_name"]


class SnapshotStore:
    """The snapshot metadata documents of one domain, under ``dir``.

    The directory is created (0700) on the first :meth:`write`; a store whose
    directory does not exist yet is empty.

    :param dir: the domain's snapshot directory.
    """

    def __init__(self, dir: Path) -> None:
        #: The directory holding ``NAME.xml`` files.
        self.dir: Path = dir

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.dir)!r})"

    def path(self, name: str) -> Path:
        """The file of snapshot ``name``.

        :raise VirtError: XML_DETAIL for an unsafe name.
        """
        check_snapshot_name(name)
        return self.dir / f"{name}{_SUFFIX}"

    def write(self, name: str, xml_text: str) -> None:
        """Save (or replace) the document of ``name`` atomically (mode 0600).

        :raise VirtError: XML_DETAIL for an unsafe name; INVALID_ARG for text that
            cannot be encoded as UTF-8; OPERATION_FAILED when the file is a
            symbolic link or not a regular file, or cannot be written (the old
            document is then still in place).
        """
        path = self.path(name)
        try:
            data = xml_text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise VirtError(
                ErrorCode.INVALID_ARG, f"document of snapshot '{name}' is not valid UTF-8 text"
            ) from err
        ensure_dir(self.dir)
        _refuse_odd_file(path)
        write_atomic(path, data)

    def read(self, name: str) -> str:
        """The document of ``name``.

        :raise VirtError: XML_DETAIL for an unsafe name; OPERATION_FAILED when the
            file is a symbolic link, not a regular file, unreadable or not UTF-8.
        :raise NoDomainSnapshot: when there is no document for ``name``.
        """
        path = self.path(name)
        refuse_link(self.dir, want_dir=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NoDomainSnapshot(f"no domain snapshot with matching name '{name}'") from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _refused(path, "is a symbolic link") from None
            raise _failed(path, err) from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _refused(path, "is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        except OSError as err:
            raise _failed(path, err) from err
        finally:
            os.close(fd)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"snapshot metadata file '{path}' is not UTF-8 text"
            ) from err

    def read_all(self) -> dict[str, str]:
        """Every document, by snapshot name (a file removed meanwhile is skipped).

        :raise VirtError: OPERATION_FAILED as :meth:`read`; a planted symbolic
            link makes the whole store unreadable rather than silently hiding a
            snapshot.
        """
        out: dict[str, str] = {}
        for name in self.names():
            try:
                out[name] = self.read(name)
            except NoDomainSnapshot:
                continue
        return out

    def remove(self, name: str) -> None:
        """Remove the document of ``name``; no error when there is none.

        ``unlink`` never follows a symbolic link, so a planted link is removed
        itself and nothing outside the directory is touched.

        :raise VirtError: XML_DETAIL for an unsafe name; OPERATION_FAILED when the
            entry cannot be removed (a directory, no permission).
        """
        path = self.path(name)
        refuse_link(self.dir, want_dir=True)
        try:
            remove_quietly(path)
        except OSError as err:
            raise _failed(path, err) from err

    def names(self) -> list[str]:
        """The names that have a document, sorted.

        Temporary files, other suffixes and file names that are not valid
        snapshot names are ignored.
        """
        refuse_link(self.dir, want_dir=True)
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _failed(self.dir, err) from err
        out = []
        for entry in entries:
            if not entry.endswith(_SUFFIX) or entry.startswith("."):
                continue
            name = entry[: -len(_SUFFIX)]
            try:
                check_snapshot_name(name)
            except VirtError:
                continue
            out.append(name)
        return sorted(out)


def _refuse_odd_file(path: Path) -> None:
    """Raise unless ``path`` is missing or a regular file (``lstat``: links are not followed)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise _failed(path, err) from err
    if stat.S_ISLNK(mode):
        raise _refused(path, "is a symbolic link")
    if not stat.S_ISREG(mode):
        raise _refused(path, "is not a regular file")


def _refused(path: Path, what: str) -> VirtError:
    return VirtError(
        ErrorCode.OPERATION_FAILED, f"snapshot metadata file '{path}' {what}; refusing to use it"
    )


def _failed(path: Path, err: OSError) -> VirtError:
    return VirtError(
        ErrorCode.OPERATION_FAILED,
        f"cannot access snapshot metadata '{path}': {err.strerror or err}",
        cause=err,
    )
