"""Bring recorded block jobs up to date with QEMU's ``query-jobs`` after a restart.

A process that takes over a running QEMU reads the jobs its predecessor
recorded in the status file and asks QEMU ``query-jobs``.  :func:`reconcile`
compares the two and says, per recorded job, where it is now and what the
runtime must do (the same :class:`~virtshift.model.job.Effect` lists as
:func:`virtshift.jobs.machine.apply`, which it uses for every move):

==========================================  ===========================================
QEMU says                                   recorded job
==========================================  ===========================================
nothing about the job id                    VANISHED (a NEW job: unregistered only)
``created running paused waiting pending    no change; ``cur`` / ``end`` refreshed
aborting``
``pending`` of a pull or commit             FINALIZABLE: flush, then ``job-finalize``
``ready`` / ``standby``                     READY if it was RUNNING, else nothing (stale)
``concluded`` without ``error``             CONCLUDED (a RUNNING copy passes READY first)
``concluded``, ``error`` is                 CANCELLED: QEMU's text for a cancelled job
``'Operation canceled'``                    (``strerror(ECANCELED)``), not a failure
``concluded`` with another ``error``        CONCLUDED_ERROR with QEMU's text
``null`` (being dismissed)                  VANISHED
anything not understood                     UNKNOWN: BROKEN, then SAVE and CANCEL
==========================================  ===========================================

"Not understood" is an entry whose ``status`` is not one of QEMU's words (or
``undefined``), whose ``type`` is not the recorded job's QEMU type, whose
``error`` is not a string, an id listed twice, or a status the job's state
cannot have (a ``ready`` pull).  When the reply is not a list, or an entry has
no string ``id``, jobs that are missing cannot be told apart from unreadable
ones, so they are UNKNOWN rather than VANISHED.

A NEW job that QEMU knows is STARTED first (the process died after sending
the start command but before saving RUNNING), then treated by its status.  A
trigger that an event handler recorded in ``pending`` is superseded by
QEMU's status; only when QEMU has already forgotten the job does it say how
the job ended (better than "vanished"; without DISMISS then).

Idempotent: applying the result and reconciling again with the same reply
returns nothing, except for FINALIZE: a pull or commit that QEMU still holds
at ``pending`` gets it again on every call until QEMU leaves ``pending``.
A job is returned only when its state, error, progress or ``pending``
changed, or when there are effects; a stale trigger gives no SAVE.

Pure: no QMP, no files, no clock.  It does not look at the block graph (the
runtime does before APPLY_RESULT) and ignores jobs it did not record; see
:func:`foreign_jobs` for those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

from virtshift.jobs.machine import END_TRIGGERS, IllegalTransition, apply, apply_chain
from virtshift.model.job import BlockJob, Effect, JobState, JobType, Trigger

__all__ = ["awaits_finalize", "foreign_jobs", "reconcile"]

#: QEMU's ``error`` for a job that was cancelled (``strerror(ECANCELED)``).
CANCELED_ERROR: Final = "Operation canceled"

#: Statuses in which the job still runs, or waits, or is being aborted by QEMU.
_GOING: Final = frozenset({"created", "running", "paused", "waiting", "pending", "aborting"})
_READY: Final = frozenset({"ready", "standby"})
_STATUSES: Final = _GOING | _READY | {"concluded", "null"}

_StepT = tuple[Trigger, str | None]


def awaits_finalize(job: BlockJob, status: Any) -> bool:
    """True when QEMU holds ``job`` (a pull or commit) at ``pending``: it did
    its work and waits for the flush and ``job-finalize`` of a locked call.

    Pollers that take no lock use it to know that taking the lock is due.
    """
    return status == "pending" and not job.type.two_phase and not job.state.ended


def _index(query_jobs: Any) -> tuple[dict[str, Mapping[str, Any] | None], bool]:
    """QEMU's entries by id (None for an id listed twice), and whether some entry was unusable."""
    if not isinstance(query_jobs, list):
        return {}, True
    by_id: dict[str, Mapping[str, Any] | None] = {}
    blind = False
    for item in query_jobs:
        job_id = item.get("id") if isinstance(item, Mapping) else None
        if not isinstance(job_id, str):
            blind = True
            continue
        by_id[job_id] = None if job_id in by_id else item
    return by_id, blind


def _problem(job: BlockJob, item: Mapping[str, Any] | None) -> str | None:
    """Why QEMU's entry for ``job`` is not understood, or None."""
    if item is None:
        return f"query-jobs lists job '{job.job_id}' twice"
    status = item.get("status")
    if not isinstance(status, str) or status not in _STATUSES:
        return f"query-jobs reports status {status!r} for job '{job.job_id}'"
    qtype = item.get("type")
    if qtype != job.type.qemu:
        return f"query-jobs reports type {qtype!r} for {job.type} job '{job.job_id}'"
    error = item.get("error")
    if error is not None and not isinstance(error, str):
        return f"query-jobs reports a non-text error for job '{job.job_id}'"
    return None


def _progress(value: Any, old: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return old


def _ending(
    job_type: JobType, state: JobState, trigger: Trigger, error: str | None
) -> list[_StepT]:
    """The steps for an end seen now; a RUNNING copy that concluded was READY before."""
    steps: list[_StepT] = []
    if trigger == Trigger.CONCLUDED and job_type.two_phase and state == JobState.RUNNING:
        steps.append((Trigger.READY, None))
    steps.append((trigger, error if trigger == Trigger.CONCLUDED_ERROR else None))
    return steps


def _steps(job: BlockJob, status: str, error: str | None) -> list[_StepT]:
    steps: list[_StepT] = []
    state = job.state
    if state == JobState.NEW:
        steps.append((Trigger.STARTED, None))
        state = JobState.RUNNING
    if status in _READY:
        if state == JobState.RUNNING:
            steps.append((Trigger.READY, None))
    elif status == "pending" and not job.type.two_phase:
        steps.append((Trigger.FINALIZABLE, None))
    elif status == "concluded":
        if error is None:
            trigger = Trigger.CONCLUDED
        elif error == CANCELED_ERROR:
            trigger = Trigger.CANCELLED
        else:
            trigger = Trigger.CONCLUDED_ERROR
        steps.extend(_ending(job.type, state, trigger, error))
    elif status == "null":
        steps.append((Trigger.VANISHED, None))
    return steps


def _unknown(job: BlockJob, why: str) -> tuple[BlockJob, list[Effect]]:
    # An ended job keeps the error it ended with.
    return apply(job, Trigger.UNKNOWN, error=None if job.state.ended else why)


def _missing(job: BlockJob) -> tuple[BlockJob, list[Effect]]:
    """A job QEMU does not list (any more)."""
    if job.pending in END_TRIGGERS:
        assert job.pending is not None
        steps: list[_StepT] = []
        state = job.state
        if state == JobState.NEW:
            steps.append((Trigger.STARTED, None))
            state = JobState.RUNNING
        steps.extend(_ending(job.type, state, job.pending, job.error))
        try:
            new, effects = apply_chain(job, steps)
        except IllegalTransition:
            pass
        else:
            # QEMU has nothing left to dismiss.
            return new, [e for e in effects if e != Effect.DISMISS]
    return apply(job, Trigger.VANISHED)


def _one(
    job: BlockJob, by_id: Mapping[str, Mapping[str, Any] | None], blind: bool
) -> tuple[BlockJob, list[Effect]]:
    if job.job_id not in by_id:
        if blind:
            return _unknown(job, f"query-jobs reply does not say whether job '{job.job_id}' exists")
        return _missing(job)
    item = by_id[job.job_id]
    why = _problem(job, item)
    if why is not None:
        return _unknown(job, why)
    assert item is not None
    status: str = item["status"]
    error: str | None = item.get("error")
    fresh = dataclasses.replace(
        job,
        pending=None,
        cur=_progress(item.get("current-progress"), job.cur),
        end=_progress(item.get("total-progress"), job.end),
    )
    try:
        return apply_chain(fresh, _steps(fresh, status, error))
    except IllegalTransition:
        return _unknown(
            fresh, f"query-jobs reports status '{status}' for {job.type} job '{job.job_id}' "
            f"in state '{job.state}'",
        )  # fmt: skip


def reconcile(saved: Sequence[BlockJob], query_jobs: Any) -> list[tuple[BlockJob, list[Effect]]]:
    """What became of each recorded job, according to QEMU.

    :param saved: the jobs of the status file.
    :param query_jobs: the raw return value of ``query-jobs`` (normally a list
        of ``{id, type, status, current-progress, total-progress, error?}``);
        anything else makes every recorded job UNKNOWN.
    :return: ``(job, effects)`` for each recorded job that changed, in the
        order of ``saved``; effects are for the runtime to carry out in order.
        Jobs QEMU has and ``saved`` does not are not returned.
    """
    by_id, blind = _index(query_jobs)
    out: list[tuple[BlockJob, list[Effect]]] = []
    for job in saved:
        new, effects = _one(job, by_id, blind)
        if effects or new != job:
            out.append((new, effects))
    return out


def foreign_jobs(saved: Sequence[BlockJob], query_jobs: Any) -> list[str]:
    """Ids of QEMU jobs that are not recorded: started by someone else.

    Callers refuse to start a job with such an id, or on a node such a job
    uses.  Concluded jobs are listed too: their id stays taken until somebody
    dismisses them.

    :param query_jobs: the raw ``query-jobs`` return value.
    :return: the ids in QEMU's order; ``[]`` when the reply is not a list
        (entries without a string id are skipped).
    """
    if not isinstance(query_jobs, list):
        return []
    mine = {j.job_id for j in saved}
    out: list[str] = []
    for item in query_jobs:
        job_id = item.get("id") if isinstance(item, Mapping) else None
        if isinstance(job_id, str) and job_id not in mine and job_id not in out:
            out.append(job_id)
    return out
