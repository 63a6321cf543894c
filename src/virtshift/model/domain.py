"""Typed model of a libvirt ``<domain>``: the parts virtshift reads and changes.

The values are frozen dataclasses; change them with :func:`dataclasses.replace`.
A :class:`Domain` parsed from XML keeps the element it came from (``tree``), so
formatting writes the modelled fields back into a copy of that tree and every
element virtshift does not model (``<metadata>``, ``<features>``, network
interfaces, ...) survives a round trip.  See :mod:`virtshift.xml.domain`.

This module does no IO and knows nothing of QEMU processes or XML text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Channel", "Disk", "Domain", "Mirror", "StorageSource"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSource:
    """One layer of a disk's backing chain (libvirt ``virStorageSource``).

    ``backing`` is the next layer down.  libvirt distinguishes "chain unknown"
    (no ``<backingStore>`` element) from "chain ends here" (an empty
    ``<backingStore/>``); so do we: ``backing is None`` with ``backing_end``
    False means unknown, with ``backing_end`` True means this layer has no
    backing file.
    """

    #: 'file', 'block' or 'network' (libvirt's disk/backingStore ``type``).
    type: str = "file"
    #: The file or block device path (``<source file=>`` / ``<source dev=>``).
    path: str | None = None
    #: Image format (``<driver type=>`` at the top, ``<format type=>`` below).
    format: str | None = None
    #: Network disks: protocol and volume name (parsed, never started).
    protocol: str | None = None
    name: str | None = None
    #: libvirt's ``index=`` in live XML (``vda[N]`` addresses it).
    index: int | None = None
    #: The next layer down, or None (see class docstring).
    backing: StorageSource | None = None
    #: True when the chain is known to end at this layer.
    backing_end: bool = False
    #: QEMU node name of the format layer (runtime only, never in XML).
    node_name: str | None = None
    #: The element this layer was parsed from (``<source>`` for the top layer,
    #: ``<backingStore>`` below); formatting starts from a copy of it.
    tree: Any = field(default=None, repr=False, compare=False)
    #: True only for a ``<backingStore>`` layer exactly as a status document
    #: (virtshift's own, formatted by it) was parsed: nothing of it or below
    #: can have changed (a changed layer is a new object, False), so
    #: formatting it again gives its ``tree``, which is then copied as it is.
    as_parsed: bool = field(default=False, init=False, repr=False, compare=False)

    def chain(self) -> list[StorageSource]:
        """The layers from this one down, top first."""
        out: list[StorageSource] = []
        layer: StorageSource | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.backing
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    """A running copy job shown under a live disk (``<mirror>``)."""

    #: 'copy' (block copy / mirrored snapshot) or 'active-commit'.
    job: str = "copy"
    #: None while copying, then 'yes'; 'abort' / 'pivot' while ending.
    ready: str | None = None
    #: The destination chain.
    source: StorageSource = field(default_factory=StorageSource)
    tree: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A ``<disk>`` element.  ``source`` is the top of the backing chain."""

    #: 'file', 'block' or 'network'.
    type: str = "file"
    #: 'disk', 'cdrom', 'floppy' or 'lun'.
    device: str = "disk"
    #: ``<driver name=>``, normally 'qemu'.
    driver_name: str | None = None
    #: ``<target dev=>``: 'vda', 'sdb', ...
    target: str = ""
    #: ``<target bus=>``: 'virtio', 'sata', 'scsi', ...
    bus: str | None = None
    source: StorageSource = field(default_factory=StorageSource)
    readonly: bool = False
    serial: str | None = None
    #: The domain's per-disk default for snapshots (``<disk snapshot=>``).
    snapshot: str | None = None
    #: Device alias in live XML: 'virtio-disk0'.
    alias: str | None = None
    mirror: Mirror | None = None
    tree: Any = field(default=None, repr=False, compare=False)

    @property
    def format(self) -> str | None:
        """The image format of the active layer."""
        return self.source.format

    @property
    def path(self) -> str | None:
        """The path of the active layer."""
        return self.source.path


@dataclass(frozen=True, slots=True, kw_only=True)
class Channel:
    """A ``<channel>``; virtshift cares about the guest agent one."""

    #: 'unix', 'pty', ...
    type: str = "unix"
    #: Host side socket path (``<source mode='bind' path=>``).
    path: str | None = None
    #: 'virtio', 'guestfwd', ...
    target_type: str | None = None
    #: Port name, e.g. 'org.qemu.guest_agent.0'.
    target_name: str | None = None
    alias: str | None = None
    tree: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Domain:
    """A ``<domain>`` definition, inactive or live."""

    #: Hypervisor type attribute: 'qemu' or 'kvm'.
    type: str = "qemu"
    name: str = ""
    uuid: str = ""
    #: Live XML only: the domain id (``<domain id=>``).
    id: int | None = None
    #: ``<memory>`` in KiB.
    memory_kib: int = 0
    vcpu: int = 1
    os_type: str = "hvm"
    arch: str | None = None
    machine: str | None = None
    emulator: str | None = None
    disks: tuple[Disk, ...] = ()
    channels: tuple[Channel, ...] = ()
    tree: Any = field(default=None, repr=False, compare=False)

    def disk(self, target: str) -> Disk | None:
        """The disk with this target dev, or None."""
        for d in self.disks:
            if d.target == target:
                return d
        return None

    def with_disk(self, disk: Disk) -> Domain:
        """A copy with the disk of the same target replaced by ``disk``."""
        return dataclasses.replace(
            self, disks=tuple(disk if d.target == disk.target else d for d in self.disks)
        )

    @property
    def agent_channel(self) -> Channel | None:
        """The guest agent channel (``org.qemu.guest_agent.0``), if any."""
        for ch in self.channels:
            if ch.target_name == "org.qemu.guest_agent.0":
                return ch
        return None
