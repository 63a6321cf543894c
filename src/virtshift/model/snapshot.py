"""Typed model of a libvirt ``<domainsnapshot>`` definition.

A :class:`SnapshotDef` is what :func:`virtshift.xml.snapshot.parse_snapshot`
reads and :func:`virtshift.xml.snapshot.format_snapshot` writes: the snapshot's
own fields (name, state, memory mode, per-disk requests), the domain
definition recorded with it, and the elements it was parsed from (``tree``,
which never takes part in comparisons).  Values are frozen; change them with
:func:`dataclasses.replace`.

Beyond libvirt's format, a snapshot disk may carry a :class:`SnapshotMirror`
(``<mirror file='...'/>``): the write-only copy of the new overlay that
mirrored live storage migration creates together with the snapshot.

This module does no IO and knows nothing of XML text, QEMU or the snapshot
tree (parent / children / current bookkeeping lives in ``store``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from virtshift.model.domain import Domain

__all__ = ["SnapshotDef", "SnapshotDisk", "SnapshotLocation", "SnapshotMirror", "SnapshotState"]


class SnapshotLocation(enum.StrEnum):
    """Where a disk's (or the memory's) snapshot goes: libvirt's ``snapshot=`` values."""

    NO = "no"
    INTERNAL = "internal"
    EXTERNAL = "external"
    #: The caller snapshots the storage itself while the guest is paused.
    MANUAL = "manual"


class SnapshotState(enum.StrEnum):
    """The domain state a snapshot recorded (``<state>``)."""

    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    #: Only disks were captured, no memory state.
    DISK_SNAPSHOT = "disk-snapshot"


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotMirror:
    """The write-only mirror of a disk's new overlay (``<mirror file= format= type=/>``)."""

    #: Absolute path of the mirror image (the ``file`` attribute, also for block devices).
    path: str
    #: Image format of the mirror, or None for "same as the overlay".
    format: str | None = None
    #: 'file' or 'block'.
    type: str = "file"
    tree: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotDisk:
    """One ``<disk>`` of a snapshot: what to do with that domain disk.

    ``tree`` keeps the ``<disk>`` element; the children of its ``<source>``
    that are not modelled here (``<seclabel>``, network ``<host>`` elements,
    ``<auth>``, ``<encryption>``...) are written back from it.
    """

    #: The domain disk's target ('vda') or its source path.
    name: str
    #: no | internal | external | manual; None when unspecified (the driver
    #: then takes the domain disk's default).
    snapshot: str | None = None
    #: Storage type of the new overlay: file | block | network.  The parser
    #: always sets it (libvirt's default is 'file'); None in a model built in
    #: code means the same default.
    type: str | None = None
    #: Image format of the new overlay (``<driver type=>``).
    format: str | None = None
    #: The overlay's path: ``<source file=>`` (file) or ``<source dev=>`` (block).
    path: str | None = None
    #: Network overlays: ``<source protocol=>`` and ``<source name=>``.
    protocol: str | None = None
    source_name: str | None = None
    #: ``<driver><metadata_cache><max_size>`` in bytes.
    metadata_cache_max_size: int | None = None
    #: ``<snapshotDeleteInProgress/>``: a delete of this snapshot did not finish.
    delete_in_progress: bool = False
    #: The write-only mirror of the overlay (mirrored live storage migration).
    mirror: SnapshotMirror | None = None
    tree: Any = field(default=None, repr=False, compare=False)

    @property
    def storage_type(self) -> str:
        """The overlay's storage type, with libvirt's default applied."""
        return self.type or "file"

    @property
    def is_external(self) -> bool:
        """True when this disk gets a new overlay file."""
        return self.snapshot == SnapshotLocation.EXTERNAL


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotDef:
    """A ``<domainsnapshot>`` definition.

    Fields that libvirt treats as read-only (state, parent, creation time, the
    recorded domains) are only set by a *redefine* parse or by the code that
    takes the snapshot.
    """

    #: Snapshot name; None until defaulted to the creation time.
    name: str | None = None
    description: str | None = None
    #: A :class:`SnapshotState` value, or None (not recorded yet).
    state: str | None = None
    #: Name of the parent snapshot.
    parent: str | None = None
    #: Seconds since the Epoch.
    creation_time: int | None = None
    #: Memory mode: no | internal | external; None when unspecified.
    memory_snapshot: str | None = None
    #: Absolute path of the memory state file (external memory only).
    memory_file: str | None = None
    disks: tuple[SnapshotDisk, ...] = ()
    #: libvirt's ``<revertDisks>``: disk overlays to use when reverting.
    revert_disks: tuple[SnapshotDisk, ...] = ()
    #: The inactive domain definition at snapshot time.
    domain: Domain | None = None
    #: UUID of a legacy snapshot that recorded only ``<domain><uuid>``.
    domain_uuid: str | None = None
    #: The persistent definition of a running domain, when it differed.
    inactive_domain: Domain | None = None
    #: Whether this is the domain's current snapshot; only known from
    #: internal (saved metadata) documents, None otherwise.
    current: bool | None = None
    #: The hypervisor's save cookie (an lxml ``<cookie>`` element), kept verbatim.
    cookie: Any = field(default=None, repr=False, compare=False)
    tree: Any = field(default=None, repr=False, compare=False)

    @property
    def is_disk_only(self) -> bool:
        """True for a disk-only snapshot (state ``disk-snapshot``)."""
        return self.state == SnapshotState.DISK_SNAPSHOT

    @property
    def is_external(self) -> bool:
        """True when the memory state or any disk goes to an external file."""
        return self.memory_snapshot == SnapshotLocation.EXTERNAL or any(
            d.is_external for d in self.disks
        )

    @property
    def mirrored_disks(self) -> tuple[SnapshotDisk, ...]:
        """The disks whose new overlay also gets a ``<mirror>``."""
        return tuple(d for d in self.disks if d.mirror is not None)

    def disk(self, name: str) -> SnapshotDisk | None:
        """The first disk entry with this name, or None."""
        for d in self.disks:
            if d.name == name:
                return d
        return None
