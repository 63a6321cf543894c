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

It also keeps ``DIR/.index.json``, a cache of what each document says about
the tree (:class:`IndexEntry`: its :class:`SnapNode` and current flag), with
the (inode, size, mtime) of the file it was taken from.  A reader trusts an
entry only while the file still has that inode, size and mtime, so a new
process can build the tree of 1,000 snapshots from one file and 1,000
``lstat`` calls instead of parsing every document.  The index is a hint: it
is written without ``fsync``, and a missing, damaged or stale one only costs
parsing again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from virtshift.errors import ErrorCode, NoDomainSnapshot, VirtError
from virtshift.model.names import MAX_NAME_LENGTH, check_snapshot_name
from virtshift.model.snaptree import SnapNode
from virtshift.store.files import (
    PreparedFile,
    ensure_dir,
    prepare_atomic,
    refuse_link,
    remove_quietly,
)

_SUFFIX = ".xml"

__all__ = ["MAX_NAME_LENGTH", "FileKeyT", "IndexEntry", "SnapshotStore", "check_snapshot_name"]

_INDEX = ".index.json"
_T = TypeVar("_T")

#: (inode, size, mtime in ns) of a document file: while these are unchanged, so
#: is the content (documents are only ever replaced by rename).
FileKeyT = tuple[int, int, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexEntry:
    """What one document says about the tree, and which file version said it."""

    key: FileKeyT
    node: SnapNode
    current: bool


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
        self.prepare(name, xml_text).commit()

    def prepare(self, name: str, xml_text: str) -> PreparedFile:
        """:meth:`write`, up to putting the file in place (``commit()``; its
        ``key`` is the document's key from then on).

        :raise VirtError: as :meth:`write`.
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
        return prepare_atomic(path, data)

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
        return self._each(self.read)

    def _each(self, get: Callable[[str], _T]) -> dict[str, _T]:
        """``get(name)`` of every document, by name (a file removed meanwhile is skipped)."""
        out: dict[str, _T] = {}
        for name in self.names():
            try:
                out[name] = get(name)
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

    def key(self, name: str) -> FileKeyT:
        """The (inode, size, mtime) of the document of ``name`` (``lstat``).

        :raise NoDomainSnapshot: when there is none.
        :raise VirtError: XML_DETAIL for an unsafe name; OPERATION_FAILED for a
            symbolic link or anything but a regular file.
        """
        path = self.path(name)
        refuse_link(self.dir, want_dir=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NoDomainSnapshot(f"no domain snapshot with matching name '{name}'") from None
        except OSError as err:
            raise _failed(path, err) from err
        if stat.S_ISLNK(st.st_mode):
            raise _refused(path, "is a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise _refused(path, "is not a regular file")
        return st.st_ino, st.st_size, st.st_mtime_ns

    def keys(self) -> dict[str, FileKeyT]:
        """:meth:`key` of every document, by name (a file removed meanwhile is skipped).

        One directory scan and one ``lstat`` per document (this runs on every
        load of the tree, for 1,000 snapshots as for 10).

        :raise VirtError: OPERATION_FAILED as :meth:`key`.
        """
        out: dict[str, FileKeyT] = {}
        refuse_link(self.dir, want_dir=True)
        try:
            entries = os.scandir(self.dir)
        except FileNotFoundError:
            return out
        except OSError as err:
            raise _failed(self.dir, err) from err
        with entries:
            for entry in entries:
                name = _document_name(entry.name)
                if name is None:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise _failed(Path(entry.path), err) from err
                if stat.S_ISLNK(st.st_mode):
                    raise _refused(Path(entry.path), "is a symbolic link")
                if not stat.S_ISREG(st.st_mode):
                    raise _refused(Path(entry.path), "is not a regular file")
                out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def read_index(self) -> dict[str, IndexEntry]:
        """The index entries by document name; {} when there is no usable index
        (missing, not a regular file, not the expected JSON: entries that do not
        check are left out)."""
        path = self.dir / _INDEX
        refuse_link(self.dir, want_dir=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return {}
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        finally:
            os.close(fd)
        if not isinstance(data, dict):
            return {}
        out: dict[str, IndexEntry] = {}
        for name, raw in data.items():
            entry = _entry_from(raw)
            if entry is not None:
                out[name] = entry
        return out

    def write_index(self, entries: Mapping[str, IndexEntry]) -> None:
        """Replace the index (best effort, no ``fsync``: it is only a cache)."""
        prepared = self.prepare_index(entries)
        if prepared is not None:
            with contextlib.suppress(VirtError):
                prepared.commit()

    def prepare_index(self, entries: Mapping[str, IndexEntry]) -> PreparedFile | None:
        """:meth:`write_index` up to putting it in place; None if it could not
        be written (it is only a cache)."""
        data = {
            name: {
                "key": list(e.key),
                "name": e.node.name,
                "parent": e.node.parent,
                "creationTime": e.node.creation_time,
                "state": e.node.state,
                "external": e.node.external,
                "current": e.current,
            }
            for name, e in entries.items()
        }
        refuse_link(self.dir, want_dir=True)
        try:
            return prepare_atomic(
                self.dir / _INDEX, json.dumps(data, separators=(",", ":")), durable=False
            )
        except VirtError:
            return None

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
        return sorted(n for n in map(_document_name, entries) if n is not None)


def _document_name(entry: str) -> str | None:
    """The snapshot name of a directory entry, or None if it is not a document."""
    if not entry.endswith(_SUFFIX) or entry.startswith("."):
        return None
    name = entry[: -len(_SUFFIX)]
    try:
        check_snapshot_name(name)
    except VirtError:
        return None
    return name


def _entry_from(raw: Any) -> IndexEntry | None:
    """An index entry from its JSON form, or None if any field is of the wrong type."""
    if not isinstance(raw, dict):
        return None
    key, name, parent = raw.get("key"), raw.get("name"), raw.get("parent")
    ctime, state = raw.get("creationTime"), raw.get("state")
    external, current = raw.get("external"), raw.get("current")
    if not (
        isinstance(key, list)
        and len(key) == 3
        and all(type(k) is int for k in key)
        and isinstance(name, str)
        and (parent is None or isinstance(parent, str))
        and type(ctime) is int
        and isinstance(state, str)
        and type(external) is bool
        and type(current) is bool
    ):
        return None
    node = SnapNode(name=name, parent=parent, creation_time=ctime, state=state, external=external)
    return IndexEntry(key=(key[0], key[1], key[2]), node=node, current=current)


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
