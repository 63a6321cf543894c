"""Typed model of a block job (copy, pull, commit, active commit).

A :class:`BlockJob` is recorded in the domain's status file *before* its QMP
command is sent, moved through the state machine of
:mod:`virtshift.jobs.machine`, and kept until its end has been applied to the
domain.  Its values are what a process that starts later needs to finish the
job: the QEMU job id, the nodes, the destination chain, what virtshift
created for it.

The enum values are written to status files: once shipped, they never change.
No IO here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from virtshift.model.domain import StorageSource

__all__ = ["BlockJob", "Effect", "JobState", "JobType", "Trigger"]


class JobType(enum.StrEnum):
    """What the job does (libvirt's ``virDomainBlockJobType``, as words)."""

    PULL = "pull"
    COPY = "copy"
    COMMIT = "commit"
    ACTIVE_COMMIT = "active-commit"

    @property
    def libvirt(self) -> int:
        """libvirt's number: PULL 1, COPY 2, COMMIT 3, ACTIVE_COMMIT 4."""
        return {"pull": 1, "copy": 2, "commit": 3, "active-commit": 4}[self.value]

    @property
    def qemu(self) -> str:
        """QEMU's job type in ``query-jobs``."""
        return {"pull": "stream", "copy": "mirror", "commit": "commit",
                "active-commit": "commit"}[self.value]  # fmt: skip

    @property
    def two_phase(self) -> bool:
        """True for jobs that go READY and wait to be pivoted or aborted."""
        return self in (JobType.COPY, JobType.ACTIVE_COMMIT)


class JobState(enum.StrEnum):
    """Where a recorded job is."""

    #: Recorded; the QMP command that starts it is not known to have succeeded.
    NEW = "new"
    RUNNING = "running"
    #: A copy or active commit has caught up and mirrors every write.
    READY = "ready"
    #: ``block-job-complete`` was (or is about to be) sent.
    PIVOTING = "pivoting"
    #: ``block-job-cancel`` was (or is about to be) sent.
    ABORTING = "aborting"
    #: Ended as asked: pull/commit done, copy or active commit pivoted.
    COMPLETED = "completed"
    #: Ended by an abort: the disk stays where it was.
    CANCELLED = "cancelled"
    #: Ended with an error.
    FAILED = "failed"
    #: Its state could not be read back after a restart; it is being cancelled.
    BROKEN = "broken"

    @property
    def ended(self) -> bool:
        return self in (JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED)


class Trigger(enum.StrEnum):
    """What happened to a job: an event, a reply, or our own command."""

    #: QEMU accepted the start command.
    STARTED = "started"
    #: QEMU refused the start command.
    START_FAILED = "start-failed"
    #: BLOCK_JOB_READY, or query-jobs says ready.
    READY = "ready"
    #: We are sending block-job-complete.
    PIVOT = "pivot"
    #: We are sending block-job-cancel.
    ABORT = "abort"
    #: The job concluded without error (BLOCK_JOB_COMPLETED).
    CONCLUDED = "concluded"
    #: The job concluded with an error (BLOCK_JOB_COMPLETED with ``error``).
    CONCLUDED_ERROR = "concluded-error"
    #: BLOCK_JOB_CANCELLED (a cancel before READY, or a forced one).
    CANCELLED = "cancelled"
    #: A pull or commit finished its work and waits at QEMU's ``pending`` for
    #: ``job-finalize`` (they start with ``auto-finalize: false``).
    FINALIZABLE = "finalizable"
    #: QEMU no longer knows the job (restarted QEMU, dismissed by someone else).
    VANISHED = "vanished"
    #: A recorded job whose QEMU state cannot be parsed.
    UNKNOWN = "unknown"


class Effect(enum.StrEnum):
    """What the runtime must do after a transition, in list order."""

    #: Write the status file (the job's new state).
    SAVE = "save"
    #: ``job-dismiss`` the concluded QEMU job.
    DISMISS = "dismiss"
    #: Apply the job's successful outcome to the domain: pull/commit drop the
    #: merged layers; a pivoted copy or active commit moves the disk.
    APPLY_RESULT = "apply-result"
    #: The job ended without pivot: drop the ``<mirror>`` and the nodes and
    #: files virtshift added for it.
    DROP_MIRROR = "drop-mirror"
    #: The job is no longer active.  A NEW job (never started) is forgotten; an
    #: ended one stays in the status file as its disk's last job, so a process
    #: that waited on it learns how it ended, until the disk's next job replaces it.
    UNREGISTER = "unregister"
    #: Flush the node the pull or commit wrote (its top or base), then send
    #: ``job-finalize``: QEMU 7.2 rewrites the backing file name of the image
    #: above in the finalize phase without flushing first (QEMU-NOTES).
    FINALIZE = "finalize"
    #: Send ``block-job-cancel`` with ``force`` (a BROKEN job).
    CANCEL = "cancel"
    #: Tell event listeners how the job ended (or that it is ready).
    NOTIFY = "notify"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockJob:
    """A block job as recorded with the domain."""

    #: QEMU's job id, deterministic: ``f"{type}-{disk}-{node}"``.
    job_id: str
    type: JobType
    #: Disk target ('vda').
    disk: str
    state: JobState = JobState.NEW
    #: The QMP ``device`` node the job was started on.
    node: str = ""
    #: Chain index of the top layer merged (commit) or None for the active layer.
    top: int | None = None
    #: Chain index of the base (pull/commit), None for "no base" (full pull).
    base: int | None = None
    #: Copy: the destination chain (top first), with indexes and node names.
    mirror: StorageSource | None = None
    #: Bytes per second, 0 for unlimited.
    bandwidth: int = 0
    #: libvirt flags the job was started with.
    flags: int = 0
    #: The mirrored snapshot this copy belongs to (REOPEN_MIRROR), if any.
    snapshot: str | None = None
    #: Files to delete once the job completed (commit with DELETE).
    delete_after: tuple[str, ...] = ()
    #: Files virtshift created for the job (removed if it never starts or is aborted).
    created_files: tuple[str, ...] = ()
    #: Nodes virtshift added with blockdev-add (deleted when the job ends without pivot).
    added_nodes: tuple[str, ...] = ()
    #: Last error reported by QEMU.
    error: str | None = None
    #: The trigger recorded by an event handler, not yet applied.
    pending: Trigger | None = None
    #: Progress from the last query (bytes).
    cur: int = 0
    end: int = 0
    #: Unix time when the job was recorded.
    created: float = field(default=0.0)
