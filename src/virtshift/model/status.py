"""The live state of a running domain, as kept in its status file.

A :class:`DomainStatus` is what a later process needs to take over a QEMU that
an earlier process started: the pid (checked against the command line before
anything is signalled), the monitor sockets, the capabilities probed at start,
the next free chain index, the live domain definition and the block jobs
recorded for it.

No IO here; :mod:`virtshift.xml.status` reads and writes the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtshift.model.domain import Domain

if TYPE_CHECKING:  # a status without jobs never needs the job model
    from virtshift.model.job import BlockJob

__all__ = ["DomainState", "DomainStatus", "QemuCaps"]


class DomainState(enum.IntEnum):
    """libvirt's ``virDomainState`` values."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7

    @property
    def label(self) -> str:
        """The word virsh prints ('running', 'shut off', ...)."""
        return {5: "shut off", 0: "no state", 7: "pmsuspended"}.get(self.value, self.name.lower())


#: The QMP commands whose presence changes what virtshift does.
FEATURE_COMMANDS: tuple[str, ...] = (
    "transaction",
    "blockdev-snapshot-sync",
    "blockdev-snapshot",
    "blockdev-create",
    "blockdev-add",
    "drive-mirror",
    "blockdev-mirror",
    "block-stream",
    "block-commit",
    "block-job-complete",
    "block-job-cancel",
    "block-job-set-speed",
    "job-dismiss",
    "blockdev-reopen",
    "human-monitor-command",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class QemuCaps:
    """What one QEMU binary offers, from ``query-version`` and ``query-commands``."""

    #: 'major.minor.micro' of QEMU.
    version: str = ""
    #: The package string (distribution build), may be empty.
    package: str = ""
    #: Every QMP command the monitor accepts.
    commands: frozenset[str] = frozenset()
    #: Name of the capability cache entry that holds ``commands`` (status
    #: files record this name instead of the list), or None when not stored yet.
    key: str | None = None

    def has(self, command: str) -> bool:
        """True when QEMU knows ``command``."""
        return command in self.commands

    @property
    def transaction(self) -> bool:
        """The proposal's capability bit (R1): atomic multi-disk snapshots."""
        return "transaction" in self.commands

    def features(self) -> dict[str, bool]:
        """The feature commands virtshift cares about, present or not."""
        return {c: c in self.commands for c in FEATURE_COMMANDS}


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainStatus:
    """Status of a running (or paused) domain."""

    state: DomainState = DomainState.RUNNING
    #: libvirt's reason word: 'booted', 'user', 'unknown', ...
    reason: str = "booted"
    pid: int = 0
    #: Main QMP monitor socket (used under the domain lock).
    monitor: str = ""
    #: Second QMP monitor for read-only queries while the lock is held elsewhere.
    query_monitor: str = ""
    #: QEMU's log file.
    log: str = ""
    #: The directory QEMU runs in (sockets are relative to it on its command line).
    rundir: str = ""
    #: True when a persistent config exists for the domain.
    persistent: bool = False
    caps: QemuCaps = field(default_factory=QemuCaps)
    #: Next free backing-chain index (``libvirt-N-format`` node names).
    next_index: int = 1
    #: The live definition (aliases, chains with index and node names).
    domain: Domain = field(default_factory=Domain)
    #: Recorded block jobs, in the order they were started (see :mod:`virtshift.jobs`).
    jobs: tuple[BlockJob, ...] = ()
