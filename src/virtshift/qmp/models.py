"""Typed views of QMP replies.

Each function takes a decoded ``return`` value, checks every key and type it
uses, and raises :class:`~virtshift.errors.VirtError` (INTERNAL_ERROR) naming
the command when QEMU's answer is not what QEMU 7.2 documents.  A ``dict`` from
the wire never travels further than this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.status import QemuCaps

__all__ = ["BlockDevice", "ImageLayer", "caps_from_replies", "parse_query_block"]


def _bad(command: str, what: str) -> VirtError:
    return VirtError(ErrorCode.INTERNAL_ERROR, f"unexpected reply to '{command}': {what}")


def caps_from_replies(version: Any, commands: Any) -> QemuCaps:
    """Capabilities from ``query-version`` and ``query-commands`` replies."""
    if not isinstance(version, dict) or not isinstance(version.get("qemu"), dict):
        raise _bad("query-version", "no 'qemu' member")
    q = version["qemu"]
    try:
        ver = f"{int(q['major'])}.{int(q['minor'])}.{int(q['micro'])}"
    except (KeyError, TypeError, ValueError) as err:
        raise _bad("query-version", f"bad version numbers {q!r}") from err
    package = version.get("package", "")
    if not isinstance(commands, list):
        raise _bad("query-commands", "not a list")
    names: set[str] = set()
    for c in commands:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise _bad("query-commands", f"bad entry {c!r}")
        names.add(c["name"])
    return QemuCaps(
        version=ver, package=str(package).strip() if package else "", commands=frozenset(names)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageLayer:
    """One layer of ``query-block``'s ``inserted.image`` nesting."""

    filename: str
    format: str
    virtual_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockDevice:
    """One entry of ``query-block``: a guest device and its active chain."""

    #: qdev path, e.g. '/machine/peripheral/virtio-disk0/virtio-backend'.
    qdev: str
    #: Node name of the active (top) format layer.
    node_name: str | None
    #: The chain, top first.
    chain: tuple[ImageLayer, ...]

    @property
    def alias(self) -> str | None:
        """The device id ('virtio-disk0').  QEMU gives virtio devices as a QOM path
        (``/machine/peripheral/virtio-disk0/virtio-backend``) but IDE/SATA and SCSI
        disks by their bare id (``sata0-0-1``)."""
        if self.qdev and "/" not in self.qdev:
            return self.qdev
        parts = self.qdev.split("/")
        if len(parts) >= 4 and parts[1] == "machine" and parts[2] == "peripheral":
            return parts[3]
        return None


def parse_query_block(reply: Any) -> list[BlockDevice]:
    """Typed ``query-block`` reply."""
    if not isinstance(reply, list):
        raise _bad("query-block", "not a list")
    out: list[BlockDevice] = []
    for entry in reply:
        if not isinstance(entry, dict):
            raise _bad("query-block", f"bad entry {entry!r}")
        qdev = entry.get("qdev", "")
        inserted = entry.get("inserted")
        chain: list[ImageLayer] = []
        node = None
        if isinstance(inserted, dict):
            node = inserted.get("node-name")
            image = inserted.get("image")
            while isinstance(image, dict):
                fn, fmt = image.get("filename"), image.get("format")
                if not isinstance(fn, str) or not isinstance(fmt, str):
                    raise _bad("query-block", "image without filename or format")
                chain.append(
                    ImageLayer(
                        filename=fn, format=fmt, virtual_size=int(image.get("virtual-size", 0))
                    )
                )
                image = image.get("backing-image")
        out.append(
            BlockDevice(
                qdev=str(qdev),
                node_name=node if isinstance(node, str) else None,
                chain=tuple(chain),
            )
        )
    return out
