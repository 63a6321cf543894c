"""The block-job state machine: one transition table and the function that applies it.

A recorded :class:`~virtshift.model.job.BlockJob` moves only through
:func:`apply`, which looks up ``(job.state, trigger)`` in :data:`TRANSITIONS`
and returns the new job and the :class:`~virtshift.model.job.Effect` list the
runtime must carry out, in order.  A pair that is not in the table raises
:class:`IllegalTransition`, naming the job, its state and the trigger (h11's
rule: a protocol violation is an error, never a silent no-op).

Tutorial::

    job = BlockJob(job_id="copy-vda-libvirt-3-format", type=JobType.COPY, disk="vda")
    job, effects = apply(job, Trigger.STARTED)    # RUNNING, [SAVE]
    # in the QMP event listener: only record what happened (libvirt's newstate)
    job = record_pending(job, Trigger.READY)
    # later, under the domain lock: apply it
    job, effects = apply_pending(job)             # READY, [SAVE, NOTIFY]
    job, effects = apply(job, Trigger.PIVOT)      # PIVOTING, [SAVE]; then block-job-complete
    job, effects = apply(job, Trigger.CONCLUDED)  # COMPLETED, [APPLY_RESULT, DISMISS, ...]

The table in short (``*`` = RUNNING, READY, PIVOTING, ABORTING)::

    NEW       STARTED          -> RUNNING    SAVE
    NEW       START_FAILED     -> NEW        UNREGISTER            (libvirt StartupFinalize)
    NEW       VANISHED         -> NEW        UNREGISTER            (never started)
    RUNNING   READY            -> READY      SAVE NOTIFY           (copy, active commit)
    READY     PIVOT            -> PIVOTING   SAVE
    RUNNING   ABORT            -> ABORTING   SAVE
    RUNNING   FINALIZABLE      -> RUNNING    FINALIZE              (pull, commit)
    ABORTING  FINALIZABLE      -> ABORTING   FINALIZE              (pull, commit)
    BROKEN    FINALIZABLE      -> BROKEN     FINALIZE              (pull, commit)
    READY     ABORT            -> ABORTING   SAVE
    RUNNING   CONCLUDED        -> COMPLETED  APPLY_RESULT DISMISS UNREGISTER NOTIFY  (pull, commit)
    READY     CONCLUDED        -> COMPLETED  APPLY_RESULT DISMISS UNREGISTER NOTIFY  (ambiguous)
    PIVOTING  CONCLUDED        -> COMPLETED  APPLY_RESULT DISMISS UNREGISTER NOTIFY
    ABORTING  CONCLUDED        -> CANCELLED  DROP_MIRROR DISMISS UNREGISTER NOTIFY
    *         CANCELLED        -> CANCELLED  DROP_MIRROR DISMISS UNREGISTER NOTIFY
    *         CONCLUDED_ERROR  -> FAILED     DROP_MIRROR DISMISS UNREGISTER NOTIFY
    *         VANISHED         -> FAILED     DROP_MIRROR UNREGISTER NOTIFY
    NEW, *    UNKNOWN          -> BROKEN     SAVE CANCEL
    BROKEN    CANCELLED, CONCLUDED, CONCLUDED_ERROR
                               -> FAILED     DROP_MIRROR DISMISS UNREGISTER NOTIFY
    BROKEN    VANISHED         -> FAILED     DROP_MIRROR UNREGISTER NOTIFY
    stale (same state, no effect): READY on READY, PIVOTING, ABORTING, BROKEN;
                                   UNKNOWN on BROKEN
    ended     CONCLUDED, CONCLUDED_ERROR, CANCELLED -> same, DISMISS
    ended     VANISHED, UNKNOWN, FINALIZABLE        -> same, no effect

Job types matter in four places, listed next to the table:
:data:`TWO_PHASE_TRIGGERS` (READY and PIVOT only exist for copy and active
commit), :data:`ONE_PHASE_TRIGGERS` (FINALIZABLE only exists for pull and
commit: they start with ``auto-finalize: false`` and wait at QEMU's
``pending`` until the node they wrote is flushed and ``job-finalize`` is
sent), :data:`ONE_PHASE_ONLY` (only pull and commit finish by themselves
from RUNNING) and :data:`ONE_PHASE_OVERRIDES` (a pull or commit that
concludes without error while being aborted had finished first: its result
is applied).  A PIVOT on a copy or active commit that is not READY yet raises
:class:`NotReadyForPivot` (``BLOCK_COPY_ACTIVE``, libvirt's error).

Two entries cannot be decided from the job alone, and the runtime must look
at QEMU's block graph before carrying out ``APPLY_RESULT`` / ``DROP_MIRROR``:

* READY + CONCLUDED: somebody else completed the job, or cancelled it after
  READY (QEMU ends a soft-cancelled READY mirror with ``BLOCK_JOB_COMPLETED``
  and no error).  The table assumes the pivot happened.
* PIVOTING + CONCLUDED_ERROR: QEMU 7.2 pivots even when completion fails to
  open the destination's backing chain (QEMU-NOTES trap 3).

A job in an ended state is normally gone (its end carried UNREGISTER); the
ended rows exist for a status file written between a job's end and its
removal, so that :func:`virtshift.jobs.reconcile.reconcile` can still dismiss
the QEMU job and free the job id.

This module does no IO: it sends no QMP command, reads no clock and writes no
file.  It does not know the block graph, and it does not decide *when* a
trigger is applied (the runtime does, under the domain lock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.job import BlockJob, Effect, JobState, JobType, Trigger

__all__ = [
    "END_TRIGGERS",
    "ONE_PHASE_ONLY",
    "ONE_PHASE_OVERRIDES",
    "ONE_PHASE_TRIGGERS",
    "TRANSITIONS",
    "TWO_PHASE_TRIGGERS",
    "VANISHED_ERROR",
    "IllegalTransition",
    "NotReadyForPivot",
    "TransitionT",
    "apply",
    "apply_chain",
    "apply_pending",
    "catch_up",
    "event_trigger",
    "libvirt_event_status",
    "record_pending",
]

#: A table row's result: the new state and the effects, in order.
TransitionT = tuple[JobState, tuple[Effect, ...]]

_S = JobState
_T = Trigger
_E = Effect

#: States in which QEMU runs the job and we wait for its end.
_LIVE: Final = (_S.RUNNING, _S.READY, _S.PIVOTING, _S.ABORTING)
_ENDED: Final = (_S.COMPLETED, _S.CANCELLED, _S.FAILED)

_SAVED: Final = (_E.SAVE,)
_DONE: Final = (_E.APPLY_RESULT, _E.DISMISS, _E.UNREGISTER, _E.NOTIFY)
_DROPPED: Final = (_E.DROP_MIRROR, _E.DISMISS, _E.UNREGISTER, _E.NOTIFY)
_GONE: Final = (_E.DROP_MIRROR, _E.UNREGISTER, _E.NOTIFY)
_BREAK: Final = (_E.SAVE, _E.CANCEL)


def _table() -> dict[tuple[JobState, Trigger], TransitionT]:
    t: dict[tuple[JobState, Trigger], TransitionT] = {
        # Start (vdsm: the intent is saved as NEW before the command is sent).
        (_S.NEW, _T.STARTED): (_S.RUNNING, _SAVED),
        (_S.NEW, _T.START_FAILED): (_S.NEW, (_E.UNREGISTER,)),
        (_S.NEW, _T.VANISHED): (_S.NEW, (_E.UNREGISTER,)),
        (_S.NEW, _T.UNKNOWN): (_S.BROKEN, _BREAK),
        # Copy / active commit caught up (TWO_PHASE_TRIGGERS).
        (_S.RUNNING, _T.READY): (_S.READY, (_E.SAVE, _E.NOTIFY)),
        # Our own commands.
        (_S.READY, _T.PIVOT): (_S.PIVOTING, _SAVED),
        (_S.RUNNING, _T.ABORT): (_S.ABORTING, _SAVED),
        # A pull or commit waits at QEMU's pending (ONE_PHASE_TRIGGERS).  QEMU 7.2
        # ignores a cancel there (the job has left its coroutine), so an ABORTING
        # one finished first: it is finalized too and ONE_PHASE_OVERRIDES applies
        # its result; a BROKEN one is finalized to end it (it then FAILED).
        (_S.RUNNING, _T.FINALIZABLE): (_S.RUNNING, (_E.FINALIZE,)),
        (_S.ABORTING, _T.FINALIZABLE): (_S.ABORTING, (_E.FINALIZE,)),
        (_S.BROKEN, _T.FINALIZABLE): (_S.BROKEN, (_E.FINALIZE,)),
        (_S.READY, _T.ABORT): (_S.ABORTING, _SAVED),
        # Successful ends.  RUNNING + CONCLUDED is for pull/commit only
        # (ONE_PHASE_ONLY); READY + CONCLUDED is the ambiguous row (see above).
        (_S.RUNNING, _T.CONCLUDED): (_S.COMPLETED, _DONE),
        (_S.READY, _T.CONCLUDED): (_S.COMPLETED, _DONE),
        (_S.PIVOTING, _T.CONCLUDED): (_S.COMPLETED, _DONE),
        # A cancelled READY mirror ends with BLOCK_JOB_COMPLETED, no pivot.
        (_S.ABORTING, _T.CONCLUDED): (_S.CANCELLED, _DROPPED),
        # Stale READY events (libvirt ignores them too).
        (_S.READY, _T.READY): (_S.READY, ()),
        (_S.PIVOTING, _T.READY): (_S.PIVOTING, ()),
        (_S.ABORTING, _T.READY): (_S.ABORTING, ()),
        (_S.BROKEN, _T.READY): (_S.BROKEN, ()),
        # A broken job is being cancelled: however it ends, it failed.
        (_S.BROKEN, _T.CANCELLED): (_S.FAILED, _DROPPED),
        (_S.BROKEN, _T.CONCLUDED): (_S.FAILED, _DROPPED),
        (_S.BROKEN, _T.CONCLUDED_ERROR): (_S.FAILED, _DROPPED),
        (_S.BROKEN, _T.VANISHED): (_S.FAILED, _GONE),
        # Still unreadable: the cancel was sent when it became BROKEN.
        (_S.BROKEN, _T.UNKNOWN): (_S.BROKEN, ()),
    }
    for state in _LIVE:
        t[(state, _T.CANCELLED)] = (_S.CANCELLED, _DROPPED)
        t[(state, _T.CONCLUDED_ERROR)] = (_S.FAILED, _DROPPED)
        t[(state, _T.VANISHED)] = (_S.FAILED, _GONE)
        t[(state, _T.UNKNOWN)] = (_S.BROKEN, _BREAK)
    for state in _ENDED:
        # Left in a status file between the end and the removal: free the id.
        t[(state, _T.CONCLUDED)] = (state, (_E.DISMISS,))
        t[(state, _T.CONCLUDED_ERROR)] = (state, (_E.DISMISS,))
        t[(state, _T.CANCELLED)] = (state, (_E.DISMISS,))
        t[(state, _T.VANISHED)] = (state, ())
        t[(state, _T.UNKNOWN)] = (state, ())
        t[(state, _T.FINALIZABLE)] = (state, ())
    return t


#: Every legal ``(state, trigger)`` pair and where it leads.  A pair missing
#: here is illegal; see the module docstring for the table in short.
TRANSITIONS: Final[Mapping[tuple[JobState, Trigger], tuple[JobState, tuple[Effect, ...]]]] = (
    MappingProxyType(_table())
)

#: Triggers that exist only for copy and active commit (two-phase jobs).
TWO_PHASE_TRIGGERS: Final[frozenset[Trigger]] = frozenset({_T.READY, _T.PIVOT})

#: Triggers that exist only for pull and commit (one-phase jobs).
ONE_PHASE_TRIGGERS: Final[frozenset[Trigger]] = frozenset({_T.FINALIZABLE})

#: Rows that hold only for pull and commit: they finish without READY.
ONE_PHASE_ONLY: Final[frozenset[tuple[JobState, Trigger]]] = frozenset({(_S.RUNNING, _T.CONCLUDED)})

#: Rows where pull and commit go elsewhere than :data:`TRANSITIONS` says: a
#: cancel that comes too late finds the job finished, and QEMU reports it
#: concluded without error; the merge happened and must be applied.
ONE_PHASE_OVERRIDES: Final[Mapping[tuple[JobState, Trigger], TransitionT]] = MappingProxyType(
    {(_S.ABORTING, _T.CONCLUDED): (_S.COMPLETED, _DONE)}
)

#: Triggers that end a job (as far as QEMU is concerned).
END_TRIGGERS: Final[frozenset[Trigger]] = frozenset(
    {_T.CONCLUDED, _T.CONCLUDED_ERROR, _T.CANCELLED}
)

#: ``job.error`` of a job that QEMU no longer knows.
VANISHED_ERROR: Final = "job vanished from QEMU"

#: libvirt's ``virConnectDomainEventBlockJobStatus`` per state.
_EVENT_STATUS: Final[Mapping[JobState, int]] = MappingProxyType(
    {_S.COMPLETED: 0, _S.FAILED: 1, _S.CANCELLED: 2, _S.READY: 3}
)


class IllegalTransition(VirtError):
    """A trigger that the job's state does not accept (OPERATION_INVALID).

    :param job: the job as it was.
    :param trigger: what was applied to it.
    """

    def __init__(
        self,
        job: BlockJob,
        trigger: Trigger,
        *,
        code: ErrorCode = ErrorCode.OPERATION_INVALID,
        detail: str | None = None,
    ) -> None:
        #: The job's id, state and type, and the refused trigger.
        self.job_id: str = job.job_id
        self.state: JobState = job.state
        self.job_type: JobType = job.type
        self.trigger: Trigger = trigger
        text = f"block job '{job.job_id}' cannot go from '{job.state}' on '{trigger}'"
        super().__init__(code, detail if detail is not None else text)


class NotReadyForPivot(IllegalTransition):
    """PIVOT on a copy or active commit that is not READY (BLOCK_COPY_ACTIVE, 83).

    The text is libvirt's, naming the disk: ``block job 'vda' not ready for
    pivot yet``.
    """

    def __init__(self, job: BlockJob) -> None:
        super().__init__(
            job,
            Trigger.PIVOT,
            code=ErrorCode.BLOCK_COPY_ACTIVE,
            detail=f"block job '{job.disk}' not ready for pivot yet",
        )


def _lookup(job: BlockJob, trigger: Trigger) -> TransitionT:
    key = (job.state, trigger)
    if job.type.two_phase:
        if trigger == _T.PIVOT and job.state in (_S.NEW, _S.RUNNING):
            raise NotReadyForPivot(job)
        if key in ONE_PHASE_ONLY or trigger in ONE_PHASE_TRIGGERS:
            raise IllegalTransition(job, trigger)
    else:
        if trigger in TWO_PHASE_TRIGGERS:
            raise IllegalTransition(job, trigger)
        if key in ONE_PHASE_OVERRIDES:
            return ONE_PHASE_OVERRIDES[key]
    try:
        return TRANSITIONS[key]
    except KeyError:
        raise IllegalTransition(job, trigger) from None


def apply(
    job: BlockJob, trigger: Trigger, *, error: str | None = None
) -> tuple[BlockJob, list[Effect]]:
    """Move ``job`` on ``trigger``.

    :param job: the recorded job.
    :param trigger: what happened.
    :param error: QEMU's error text (CONCLUDED_ERROR, or why a job is UNKNOWN);
        stored in ``job.error``.  A VANISHED job gets :data:`VANISHED_ERROR`
        when no text is given.  Without text, ``job.error`` is kept.
    :raise NotReadyForPivot: PIVOT on a copy or active commit in NEW or RUNNING.
    :raise IllegalTransition: for every other pair the table does not allow.
    :return: the new job (``pending`` cleared) and the effects, in order.
    """
    state, effects = _lookup(job, trigger)
    if error is None and trigger == _T.VANISHED and state != job.state and state == _S.FAILED:
        error = VANISHED_ERROR
    new = dataclasses.replace(
        job, state=state, pending=None, error=error if error is not None else job.error
    )
    return new, list(effects)


def _merge(done: list[Effect], more: Iterable[Effect]) -> list[Effect]:
    """Effects of consecutive transitions: each once, at its last place.

    A SAVE is dropped when the job is unregistered in the end anyway.
    """
    out = [e for e in done if e not in more]
    out.extend(more)
    if _E.UNREGISTER in out:
        out = [e for e in out if e != _E.SAVE]
    # The same effect twice in ``more`` cannot happen: rows list each once.
    return out


def apply_chain(
    job: BlockJob, steps: Iterable[tuple[Trigger, str | None]]
) -> tuple[BlockJob, list[Effect]]:
    """Apply several triggers in a row, as one change.

    Used when a restarted process learns several things at once (a NEW job that
    QEMU knows is STARTED, then READY...).  Every effect appears once, at its
    last place; SAVE is dropped when the job is unregistered at the end.

    :param steps: ``(trigger, error)`` pairs, in order.
    :raise IllegalTransition: when one of the steps is illegal.
    :return: the final job and the merged effects.
    """
    effects: list[Effect] = []
    for trigger, error in steps:
        job, more = apply(job, trigger, error=error)
        effects = _merge(effects, more)
    return job, effects


def catch_up(
    job: BlockJob, trigger: Trigger, *, error: str | None = None
) -> tuple[BlockJob, list[Effect]]:
    """Like :func:`apply`, filling in a READY that was missed.

    A copy or active commit recorded as RUNNING can only conclude without
    error after it was READY; when the READY event was lost (or overwritten in
    ``pending`` by the end), it is applied first.  Everything else is
    :func:`apply`.

    :raise IllegalTransition: as :func:`apply`.
    """
    if job.type.two_phase and job.state == _S.RUNNING and trigger == _T.CONCLUDED:
        return apply_chain(job, [(_T.READY, None), (trigger, error)])
    return apply(job, trigger, error=error)


def record_pending(job: BlockJob, trigger: Trigger, *, error: str | None = None) -> BlockJob:
    """What a QMP event handler does: remember the trigger, change nothing else.

    The runtime later applies it with :func:`apply_pending` under the domain
    lock (libvirt's ``newstate``).  An end never gets overwritten by a later
    READY (which would be stale anyway); any other trigger replaces the one
    recorded before.

    :param error: the event's error text, kept in ``job.error``.
    :return: the job with ``pending`` (and ``error``) set.
    """
    if job.pending in END_TRIGGERS and trigger == _T.READY:
        return job
    return dataclasses.replace(
        job, pending=trigger, error=error if error is not None else job.error
    )


def apply_pending(job: BlockJob) -> tuple[BlockJob, list[Effect]]:
    """Apply the trigger recorded by :func:`record_pending`, if any.

    Uses :func:`catch_up`, so a copy whose READY and COMPLETED events both came
    before the lock was taken still ends properly.

    :raise IllegalTransition: as :func:`apply` (``pending`` is left set).
    :return: the job with ``pending`` cleared and the effects; ``(job, [])``
        when nothing is pending.
    """
    if job.pending is None:
        return job, []
    return catch_up(job, job.pending, error=job.error)


_EVENT_TRIGGERS: Final[Mapping[str, Trigger]] = MappingProxyType(
    {
        "BLOCK_JOB_READY": _T.READY,
        "BLOCK_JOB_COMPLETED": _T.CONCLUDED,
        "BLOCK_JOB_CANCELLED": _T.CANCELLED,
    }
)


def event_trigger(event: Mapping[str, Any]) -> tuple[str, Trigger, str | None] | None:
    """The job and trigger a QMP event means.

    ``BLOCK_JOB_READY`` is READY; ``BLOCK_JOB_COMPLETED`` is CONCLUDED, or
    CONCLUDED_ERROR when it carries ``error``; ``BLOCK_JOB_CANCELLED`` is
    CANCELLED.  ``BLOCK_JOB_ERROR`` (an I/O error that may be retried) and
    ``JOB_STATUS_CHANGE`` are informational and give None, as does any other
    event.  In every ``BLOCK_JOB_*`` event ``data.device`` is the job id.

    :param event: the event as received: ``{"event": ..., "data": {...}, "timestamp": ...}``.
    :raise VirtError: INTERNAL_ERROR when a block-job event lacks a string
        ``data.device`` or has a non-string ``error``.
    :return: ``(job_id, trigger, error)`` or None.
    """
    name = event.get("event")
    if not isinstance(name, str) or name not in _EVENT_TRIGGERS:
        return None
    data = event.get("data")
    device = data.get("device") if isinstance(data, Mapping) else None
    if not isinstance(device, str):
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"malformed QMP event {name}: no data.device")
    trigger = _EVENT_TRIGGERS[name]
    error: str | None = None
    if trigger == _T.CONCLUDED and isinstance(data, Mapping) and "error" in data:
        raw = data["error"]
        if not isinstance(raw, str):
            raise VirtError(
                ErrorCode.INTERNAL_ERROR, f"malformed QMP event {name}: error is not a string"
            )
        trigger, error = _T.CONCLUDED_ERROR, raw
    return device, trigger, error


def libvirt_event_status(job: BlockJob) -> int | None:
    """libvirt's ``virConnectDomainEventBlockJobStatus`` for a NOTIFY of ``job``.

    :return: COMPLETED 0, FAILED 1, CANCELED 2, READY 3; None for other states.
    """
    return _EVENT_STATUS.get(job.state)
