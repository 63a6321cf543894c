"""The ``<domainsnapshot>`` document of ``snapshot-create-as``, as virsh builds it.

:func:`build_snapshot_xml` turns the already-separated values of
``snapshot-create-as`` (name, description, ``--memspec`` and every
``--diskspec``) into the text virsh prints with ``--print-xml`` and sends to
``snapshotCreateXML`` otherwise:

* a diskspec is ``DISK[,snapshot=MODE][,driver=FORMAT][,stype=file|block][,file=PATH]``;
* a memspec is ``[file=]PATH[,snapshot=MODE]`` (a bare path must be absolute);
* in both, ``,,`` stands for a literal comma;
* text and attribute values are escaped like libvirt's ``virBufferEscapeString``
  (``& < > ' "`` become entities, other control characters are dropped).

This module does not distribute positional arguments (the command does:
``snapshot-create-as DOMAIN [NAME [DESCRIPTION [DISKSPEC...]]]``), does not
check the values beyond their syntax (modes, formats and paths are checked by
:func:`virtshift.xml.snapshot.parse_snapshot` when the snapshot is created)
and does no IO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from virtshift.errors import ErrorCode, VirtError
from virtshift.xml.snapshot import libvirt_escape

__all__ = ["build_snapshot_xml", "split_spec"]

_INDENT: Final = "  "
_DISKSPEC_KEYS: Final = ("snapshot", "driver", "stype", "file")
_STORAGE_TYPES: Final = ("file", "block")


def split_spec(spec: str) -> list[str]:
    """Split a diskspec or memspec at single commas; ``,,`` is a literal comma.

    :param spec: the option value.
    :return: the items, at least one (``""`` gives ``[""]``).
    """
    items: list[str] = []
    current: list[str] = []
    pos = 0
    while pos < len(spec):
        char = spec[pos]
        if char == "," and spec[pos + 1 : pos + 2] == ",":
            current.append(",")
            pos += 2
            continue
        if char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        pos += 1
    items.append("".join(current))
    return items


def _invalid(what: str, spec: str, reason: str | None = None) -> VirtError:
    detail = f"unable to parse {what}: {spec}"
    if reason:
        detail += f" ({reason})"
    return VirtError(ErrorCode.INVALID_ARG, detail)


def _memory_line(memspec: str) -> str:
    snapshot: str | None = None
    file: str | None = None
    for item in split_spec(memspec):
        if snapshot is None and item.startswith("snapshot="):
            snapshot = item.removeprefix("snapshot=")
        elif file is None and item.startswith("file="):
            file = item.removeprefix("file=")
        elif file is None and item.startswith("/"):
            file = item
        else:
            raise _invalid("memspec", memspec)
    line = "<memory"
    if snapshot is not None:
        line += f" snapshot='{libvirt_escape(snapshot)}'"
    if file is not None:
        line += f" file='{libvirt_escape(file)}'"
    return line + "/>"


def _disk_lines(diskspec: str) -> list[str]:
    name, *rest = split_spec(diskspec)
    if not name:
        raise _invalid("diskspec", diskspec, "missing disk name")
    values: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in _DISKSPEC_KEYS or key in values:
            raise _invalid("diskspec", diskspec)
        values[key] = value
    start = f"<disk name='{libvirt_escape(name)}'"
    if "snapshot" in values:
        start += f" snapshot='{libvirt_escape(values['snapshot'])}'"
    stype = values.get("stype")
    if stype is not None:
        if stype not in _STORAGE_TYPES:
            raise _invalid("diskspec", diskspec, f"Unknown storage type: '{libvirt_escape(stype)}'")
        start += f" type='{stype}'"
    children: list[str] = []
    if "driver" in values:
        children.append(f"<driver type='{libvirt_escape(values['driver'])}'/>")
    if "file" in values:
        attr = "dev" if stype == "block" else "file"
        children.append(f"<source {attr}='{libvirt_escape(values['file'])}'/>")
    if not children:
        return [start + "/>"]
    return [start + ">", *(_INDENT + child for child in children), "</disk>"]


def build_snapshot_xml(
    *,
    name: str | None,
    description: str | None,
    diskspecs: Sequence[str],
    memspec: str | None = None,
    disk_only: bool = False,
) -> str:
    """Build the snapshot document of ``snapshot-create-as``, byte for byte as virsh does.

    ``<disks>`` is written only when at least one diskspec is given; a
    diskspec without ``driver`` or ``file`` becomes an empty ``<disk/>``.

    :param name: ``--name`` (or the first positional after the domain).
    :param description: ``--description`` (or the next positional).
    :param diskspecs: every ``--diskspec`` and the remaining positionals, in
        command-line order.
    :param memspec: ``--memspec``.
    :param disk_only: ``--disk-only``.  As in virsh it does not change the
        document: it becomes the DISK_ONLY flag of the creation call.
    :raise VirtError: ``INVALID_ARG`` for an empty name or description, and
        for a diskspec or memspec that cannot be parsed ("unable to parse
        diskspec: vda,foo=1"): a diskspec without disk name, with an unknown,
        repeated or valueless key, or with a storage type other than file or
        block; a memspec item that is neither ``snapshot=``, ``file=`` nor an
        absolute path, or that repeats one.
    :return: the document, ending with a newline (virsh's ``--print-xml``
        prints one more newline after it).
    """
    del disk_only  # a creation flag, not part of the document (see docstring)
    lines = ["<domainsnapshot>"]
    for option, value, tag in (
        ("--name", name, "name"),
        ("--description", description, "description"),
    ):
        if value is None:
            continue
        if not value:
            raise VirtError(ErrorCode.INVALID_ARG, f"option {option} must not be empty")
        lines.append(f"{_INDENT}<{tag}>{libvirt_escape(value)}</{tag}>")
    if memspec is not None:
        lines.append(_INDENT + _memory_line(memspec))
    if diskspecs:
        lines.append(f"{_INDENT}<disks>")
        for spec in diskspecs:
            lines.extend(_INDENT * 2 + line for line in _disk_lines(spec))
        lines.append(f"{_INDENT}</disks>")
    lines.append("</domainsnapshot>")
    return "\n".join(lines) + "\n"
