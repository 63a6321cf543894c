"""Block-job state machine, reconcile() and block jobs in the status file."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from lxml import etree

from virtshift.errors import ErrorCode, VirtError
from virtshift.jobs.machine import (
    TRANSITIONS,
    IllegalTransition,
    NotReadyForPivot,
    apply,
    apply_chain,
    apply_pending,
    event_trigger,
    libvirt_event_status,
    record_pending,
)
from virtshift.jobs.reconcile import foreign_jobs, reconcile
from virtshift.model.domain import Disk, Domain, StorageSource
from virtshift.model.job import BlockJob, Effect, JobState, JobType, Trigger
from virtshift.model.status import DomainStatus, QemuCaps
from virtshift.xml.status import format_status, parse_status

S, T, E = JobState, Trigger, Effect

LIVE = (S.RUNNING, S.READY, S.PIVOTING, S.ABORTING)
ENDED = (S.COMPLETED, S.CANCELLED, S.FAILED)
DONE = [E.APPLY_RESULT, E.DISMISS, E.UNREGISTER, E.NOTIFY]
DROPPED = [E.DROP_MIRROR, E.DISMISS, E.UNREGISTER, E.NOTIFY]
GONE = [E.DROP_MIRROR, E.UNREGISTER, E.NOTIFY]
ILLEGAL = "illegal"
NOT_READY = "not ready"


def make_job(jt: JobType = JobType.COPY, state: JobState = S.RUNNING, **kw: Any) -> BlockJob:
    return BlockJob(
        job_id=kw.pop("job_id", f"{jt}-vda-libvirt-3-format"),
        type=jt,
        disk="vda",
        state=state,
        node="libvirt-3-format",
        **kw,
    )


# --------------------------------------------------------------------------
# The table, derived independently from the specification


def expected(jt: JobType, s: JobState, t: Trigger) -> Any:
    two = jt in (JobType.COPY, JobType.ACTIVE_COMMIT)
    if t == T.PIVOT:
        if not two:
            return ILLEGAL
        if s in (S.NEW, S.RUNNING):
            return NOT_READY
        return (S.PIVOTING, [E.SAVE]) if s == S.READY else ILLEGAL
    if t == T.READY:
        if not two:
            return ILLEGAL
        if s == S.RUNNING:
            return (S.READY, [E.SAVE, E.NOTIFY])
        return (s, []) if s in (S.READY, S.PIVOTING, S.ABORTING, S.BROKEN) else ILLEGAL
    if t == T.FINALIZABLE:
        # a pull or commit at QEMU's pending: flushed and finalized when live
        if two:
            return ILLEGAL
        if s in (S.RUNNING, S.ABORTING, S.BROKEN):
            return (s, [E.FINALIZE])
        return (s, []) if s in ENDED else ILLEGAL
    if s == S.NEW:
        return {
            T.STARTED: (S.RUNNING, [E.SAVE]),
            T.START_FAILED: (S.NEW, [E.UNREGISTER]),
            T.VANISHED: (S.NEW, [E.UNREGISTER]),
            T.UNKNOWN: (S.BROKEN, [E.SAVE, E.CANCEL]),
        }.get(t, ILLEGAL)
    if s in LIVE:
        if t == T.ABORT:
            return (S.ABORTING, [E.SAVE]) if s in (S.RUNNING, S.READY) else ILLEGAL
        if t == T.CONCLUDED:
            if s == S.RUNNING:
                return ILLEGAL if two else (S.COMPLETED, DONE)
            if s == S.ABORTING:
                return (S.CANCELLED, DROPPED) if two else (S.COMPLETED, DONE)
            return (S.COMPLETED, DONE)
        return {
            T.CANCELLED: (S.CANCELLED, DROPPED),
            T.CONCLUDED_ERROR: (S.FAILED, DROPPED),
            T.VANISHED: (S.FAILED, GONE),
            T.UNKNOWN: (S.BROKEN, [E.SAVE, E.CANCEL]),
        }.get(t, ILLEGAL)
    if s == S.BROKEN:
        if t in (T.CANCELLED, T.CONCLUDED, T.CONCLUDED_ERROR):
            return (S.FAILED, DROPPED)
        return {T.VANISHED: (S.FAILED, GONE), T.UNKNOWN: (S.BROKEN, [])}.get(t, ILLEGAL)
    assert s in ENDED
    if t in (T.CONCLUDED, T.CONCLUDED_ERROR, T.CANCELLED):
        return (s, [E.DISMISS])
    return (s, []) if t in (T.VANISHED, T.UNKNOWN) else ILLEGAL


ALL = list(itertools.product(JobType, JobState, Trigger))


@pytest.mark.parametrize(("jt", "state", "trigger"), ALL)
def test_every_pair(jt: JobType, state: JobState, trigger: Trigger) -> None:
    job = make_job(jt, state)
    want = expected(jt, state, trigger)
    if want == NOT_READY:
        with pytest.raises(NotReadyForPivot) as not_ready:
            apply(job, trigger)
        assert not_ready.value.code == ErrorCode.BLOCK_COPY_ACTIVE
        assert int(not_ready.value.code) == 83
        assert not_ready.value.detail == "block job 'vda' not ready for pivot yet"
        assert not_ready.value.message == (
            "block copy still active: block job 'vda' not ready for pivot yet"
        )
    elif want == ILLEGAL:
        with pytest.raises(IllegalTransition) as exc:
            apply(job, trigger)
        assert type(exc.value) is IllegalTransition
        assert exc.value.code == ErrorCode.OPERATION_INVALID
        assert exc.value.detail == (
            f"block job '{job.job_id}' cannot go from '{state.value}' on '{trigger.value}'"
        )
        assert (exc.value.state, exc.value.trigger) == (state, trigger)
    else:
        new, effects = apply(job, trigger)
        assert (new.state, effects) == want
        assert new.pending is None
        assert dataclasses.replace(new, state=job.state, error=job.error) == job


def test_table_is_read_only_and_covers_the_spec() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.NEW, T.STARTED)] = (S.RUNNING, ())  # type: ignore[index]
    for (state, trigger), (new, effects) in TRANSITIONS.items():
        assert isinstance(state, JobState)
        assert isinstance(trigger, Trigger)
        assert isinstance(new, JobState)
        assert isinstance(effects, tuple)
        assert len(set(effects)) == len(effects)
    # Every ended state either unregisters or never leaves a live state.
    for (state, _t), (new, effects) in TRANSITIONS.items():
        if new.ended and not state.ended:
            assert E.UNREGISTER in effects
            assert effects[-1] == E.NOTIFY


def test_illegal_message_example() -> None:
    job = make_job(JobType.PULL, S.RUNNING, job_id="copy-vda-libvirt-3-format")
    with pytest.raises(IllegalTransition) as exc:
        apply(job, T.PIVOT)
    assert str(exc.value) == (
        "Requested operation is not valid: block job 'copy-vda-libvirt-3-format' "
        "cannot go from 'running' on 'pivot'"
    )
    assert isinstance(exc.value, VirtError)


def test_pivot_before_ready_is_libvirts_error() -> None:
    for jt in (JobType.COPY, JobType.ACTIVE_COMMIT):
        with pytest.raises(VirtError) as exc:
            apply(make_job(jt, S.RUNNING), T.PIVOT)
        assert exc.value.code == 83
        assert "block job 'vda' not ready for pivot yet" in str(exc.value)
        assert isinstance(exc.value, IllegalTransition)


def test_errors_are_recorded() -> None:
    job = make_job(state=S.READY)
    failed, _ = apply(job, T.CONCLUDED_ERROR, error="Invalid argument")
    assert (failed.state, failed.error) == (S.FAILED, "Invalid argument")
    gone, effects = apply(job, T.VANISHED)
    assert (gone.state, gone.error, effects) == (S.FAILED, "job vanished from QEMU", GONE)
    assert apply(make_job(state=S.NEW), T.VANISHED)[0].error is None
    # an ended job keeps the error it ended with
    assert apply(failed, T.VANISHED)[0].error == "Invalid argument"
    broken, _ = apply(job, T.UNKNOWN, error="status 'x'")
    assert broken.error == "status 'x'"
    assert apply(broken, T.CANCELLED)[0].error == "status 'x'"


@pytest.mark.parametrize("state", [S.READY, S.PIVOTING, S.ABORTING])
def test_stale_ready_is_ignored(state: JobState) -> None:
    job = make_job(state=state, pending=T.READY)
    new, effects = apply(job, T.READY)
    assert effects == []
    assert new == dataclasses.replace(job, pending=None)


def test_start_failed_keeps_new_and_unregisters() -> None:
    new, effects = apply(make_job(state=S.NEW), T.START_FAILED)
    assert (new.state, effects) == (S.NEW, [E.UNREGISTER])


def test_a_whole_copy() -> None:
    job = make_job(state=S.NEW)
    seen: list[tuple[JobState, list[Effect]]] = []
    for trigger in (T.STARTED, T.READY, T.READY, T.PIVOT, T.READY, T.CONCLUDED):
        job, effects = apply(job, trigger)
        seen.append((job.state, effects))
    assert seen == [
        (S.RUNNING, [E.SAVE]),
        (S.READY, [E.SAVE, E.NOTIFY]),
        (S.READY, []),
        (S.PIVOTING, [E.SAVE]),
        (S.PIVOTING, []),
        (S.COMPLETED, DONE),
    ]
    assert libvirt_event_status(job) == 0


def test_apply_chain_merges_effects() -> None:
    job = make_job(state=S.NEW)
    new, effects = apply_chain(job, [(T.STARTED, None), (T.READY, None)])
    assert (new.state, effects) == (S.READY, [E.SAVE, E.NOTIFY])
    new, effects = apply_chain(job, [(T.STARTED, None), (T.READY, None), (T.CONCLUDED, None)])
    assert (new.state, effects) == (S.COMPLETED, DONE)
    assert apply_chain(job, []) == (job, [])


# --------------------------------------------------------------------------
# pending


def test_record_pending_changes_nothing_else() -> None:
    job = make_job(state=S.RUNNING)
    rec = record_pending(job, T.READY)
    assert rec == dataclasses.replace(job, pending=T.READY)
    new, effects = apply_pending(rec)
    assert (new.state, new.pending, effects) == (S.READY, None, [E.SAVE, E.NOTIFY])
    assert apply_pending(new) == (new, [])


def test_record_pending_keeps_error_and_end() -> None:
    job = make_job(state=S.PIVOTING)
    rec = record_pending(job, T.CONCLUDED_ERROR, error="Invalid argument")
    assert (rec.pending, rec.error, rec.state) == (
        T.CONCLUDED_ERROR,
        "Invalid argument",
        S.PIVOTING,
    )
    # a READY after the end does not replace it
    assert record_pending(rec, T.READY) == rec
    new, effects = apply_pending(rec)
    assert (new.state, new.error, effects) == (S.FAILED, "Invalid argument", DROPPED)


def test_apply_pending_fills_in_a_missed_ready() -> None:
    # READY and COMPLETED both arrived before the lock was taken: the end won.
    job = record_pending(record_pending(make_job(state=S.RUNNING), T.READY), T.CONCLUDED)
    assert job.pending == T.CONCLUDED
    new, effects = apply_pending(job)
    assert (new.state, new.pending, effects) == (S.COMPLETED, None, DONE)


def test_apply_pending_illegal_raises() -> None:
    job = record_pending(make_job(JobType.PULL, S.RUNNING), T.READY)
    with pytest.raises(IllegalTransition):
        apply_pending(job)


# --------------------------------------------------------------------------
# QMP events (shapes as QEMU 7.2 sends them)

TS = {"seconds": 1700000000, "microseconds": 123456}
JOB = "copy-vda-libvirt-3-format"


def _block_event(name: str, **extra: Any) -> dict[str, Any]:
    data = {"device": JOB, "len": 1073741824, "offset": 1073741824, "speed": 0, "type": "mirror"}
    data.update(extra)
    return {"event": name, "data": data, "timestamp": TS}


def test_event_trigger() -> None:
    assert event_trigger(_block_event("BLOCK_JOB_READY")) == (JOB, T.READY, None)
    assert event_trigger(_block_event("BLOCK_JOB_COMPLETED")) == (JOB, T.CONCLUDED, None)
    assert event_trigger(_block_event("BLOCK_JOB_COMPLETED", error="Invalid argument")) == (
        JOB,
        T.CONCLUDED_ERROR,
        "Invalid argument",
    )
    assert event_trigger(_block_event("BLOCK_JOB_CANCELLED")) == (JOB, T.CANCELLED, None)
    error_event = {
        "event": "BLOCK_JOB_ERROR",
        "data": {"device": JOB, "operation": "write", "action": "report"},
        "timestamp": TS,
    }
    assert event_trigger(error_event) is None
    status = {"event": "JOB_STATUS_CHANGE", "data": {"id": JOB, "status": "ready"}, "timestamp": TS}
    assert event_trigger(status) is None
    assert event_trigger({"event": "STOP", "timestamp": TS}) is None
    assert event_trigger({}) is None


def test_event_trigger_malformed() -> None:
    with pytest.raises(VirtError) as exc:
        event_trigger({"event": "BLOCK_JOB_READY", "data": {"len": 1}})
    assert exc.value.code == ErrorCode.INTERNAL_ERROR
    with pytest.raises(VirtError):
        event_trigger({"event": "BLOCK_JOB_CANCELLED", "data": "x"})
    with pytest.raises(VirtError):
        event_trigger(_block_event("BLOCK_JOB_COMPLETED", error=5))


def test_libvirt_event_status() -> None:
    want = {S.COMPLETED: 0, S.FAILED: 1, S.CANCELLED: 2, S.READY: 3}
    for state in JobState:
        assert libvirt_event_status(make_job(state=state)) == want.get(state)


# --------------------------------------------------------------------------
# reconcile


def q(
    job_id: str, status: Any, qtype: Any = "mirror", cur: Any = 10, end: Any = 10, **extra: Any
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": job_id,
        "type": qtype,
        "status": status,
        "current-progress": cur,
        "total-progress": end,
    }
    entry.update(extra)
    return entry


def settle(saved: list[BlockJob], results: list[tuple[BlockJob, list[Effect]]]) -> list[BlockJob]:
    """The recorded jobs after the runtime carried out ``results``."""
    by_id = {j.job_id: (j, e) for j, e in results}
    out = []
    for job in saved:
        new, effects = by_id.get(job.job_id, (job, []))
        if E.UNREGISTER not in effects:
            out.append(new)
    return out


def one(job: BlockJob, reply: Any) -> tuple[BlockJob, list[Effect]] | None:
    result = reconcile([job], reply)
    assert len(result) <= 1
    if result:
        assert reconcile(settle([job], result), reply) == []  # idempotent
    return result[0] if result else None


def test_reconcile_vanished() -> None:
    got = one(make_job(state=S.READY), [])
    assert got is not None
    assert (got[0].state, got[0].error, got[1]) == (S.FAILED, "job vanished from QEMU", GONE)
    assert one(make_job(state=S.NEW), []) == (make_job(state=S.NEW), [E.UNREGISTER])
    got = one(make_job(state=S.RUNNING), [q(JOB, "null")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.FAILED, GONE)


@pytest.mark.parametrize(
    ("jt", "state", "error", "want_state", "want_effects"),
    [
        (JobType.PULL, S.RUNNING, None, S.COMPLETED, DONE),
        (JobType.COMMIT, S.RUNNING, None, S.COMPLETED, DONE),
        (JobType.COPY, S.RUNNING, None, S.COMPLETED, DONE),  # READY was missed
        (JobType.COPY, S.READY, None, S.COMPLETED, DONE),
        (JobType.COPY, S.PIVOTING, None, S.COMPLETED, DONE),
        (JobType.COPY, S.ABORTING, None, S.CANCELLED, DROPPED),
        (JobType.ACTIVE_COMMIT, S.ABORTING, None, S.CANCELLED, DROPPED),
        (JobType.PULL, S.ABORTING, None, S.COMPLETED, DONE),  # finished before the cancel
        (JobType.COPY, S.RUNNING, "No space left on device", S.FAILED, DROPPED),
        (JobType.COPY, S.PIVOTING, "Invalid argument", S.FAILED, DROPPED),
        (JobType.COPY, S.ABORTING, "Input/output error", S.FAILED, DROPPED),
        (JobType.COPY, S.ABORTING, "Operation canceled", S.CANCELLED, DROPPED),
        (JobType.PULL, S.ABORTING, "Operation canceled", S.CANCELLED, DROPPED),
        (JobType.COPY, S.RUNNING, "Operation canceled", S.CANCELLED, DROPPED),
        (JobType.COPY, S.BROKEN, None, S.FAILED, DROPPED),
        (JobType.COPY, S.BROKEN, "Operation canceled", S.FAILED, DROPPED),
    ],
)
def test_reconcile_concluded(
    jt: JobType,
    state: JobState,
    error: str | None,
    want_state: JobState,
    want_effects: list[Effect],
) -> None:
    job = make_job(jt, state, cur=3, end=10)
    extra: dict[str, Any] = {} if error is None else {"error": error}
    got = one(job, [q(job.job_id, "concluded", jt.qemu, **extra)])
    assert got is not None
    new, effects = got
    assert (new.state, effects) == (want_state, want_effects)
    assert (new.cur, new.end) == (10, 10)
    if want_state == S.FAILED and error not in (None, "Operation canceled"):
        assert new.error == error
    if want_state == S.CANCELLED:
        assert new.error is None


@pytest.mark.parametrize("status", ["ready", "standby"])
def test_reconcile_ready(status: str) -> None:
    got = one(make_job(state=S.RUNNING), [q(JOB, status)])
    assert got is not None
    assert (got[0].state, got[1]) == (S.READY, [E.SAVE, E.NOTIFY])
    for state in (S.READY, S.PIVOTING, S.ABORTING, S.BROKEN):
        job = make_job(state=state, cur=10, end=10)
        assert reconcile([job], [q(JOB, status)]) == []


@pytest.mark.parametrize("status", ["created", "running", "paused", "waiting", "aborting"])
def test_reconcile_still_going_refreshes_progress(status: str) -> None:
    job = make_job(JobType.PULL, S.RUNNING, job_id="pull-vda-libvirt-3-format")
    got = one(job, [q(job.job_id, status, "stream", cur=512, end=4096)])
    assert got == (dataclasses.replace(job, cur=512, end=4096), [])
    # same progress: nothing to report, no SAVE
    same = dataclasses.replace(job, cur=512, end=4096)
    assert reconcile([same], [q(job.job_id, status, "stream", cur=512, end=4096)]) == []
    # bad progress numbers keep the old ones
    assert reconcile([same], [q(job.job_id, status, "stream", cur="x", end=-1)]) == []


@pytest.mark.parametrize(
    ("jt", "qtype", "state"),
    [
        (JobType.PULL, "stream", S.RUNNING),
        (JobType.COMMIT, "commit", S.RUNNING),
        (JobType.PULL, "stream", S.ABORTING),  # its cancel was never sent
        (JobType.COMMIT, "commit", S.ABORTING),
        (JobType.PULL, "stream", S.BROKEN),  # its cancel does nothing at pending
    ],
)
def test_reconcile_pending_pull_or_commit_is_finalized(
    jt: JobType, qtype: str, state: JobState
) -> None:
    job = make_job(jt, state, job_id=f"{jt}-vda-libvirt-3-format")
    reply = [q(job.job_id, "pending", qtype, cur=4096, end=4096)]
    got = reconcile([job], reply)
    assert got == [(dataclasses.replace(job, cur=4096, end=4096), [E.FINALIZE])]
    # not idempotent on purpose: while QEMU still holds it at pending (the flush
    # failed, or the process died before job-finalize), every call tries again
    assert reconcile(settle([job], got), reply) == got
    # a job the process started and never saw running is adopted, then finalized
    new = dataclasses.replace(job, state=S.NEW)
    got = reconcile([new], reply)
    assert [(j.state, e) for j, e in got] == [(S.RUNNING, [E.SAVE, E.FINALIZE])]
    # once finalized, QEMU says concluded: the end is applied
    done = reconcile([job], [q(job.job_id, "concluded", qtype)])
    ended = (S.FAILED, DROPPED) if state == S.BROKEN else (S.COMPLETED, DONE)
    assert [(j.state, e) for j, e in done] == [ended]


@pytest.mark.parametrize(
    ("jt", "qtype", "state"),
    [
        (JobType.COPY, "mirror", S.RUNNING),  # mirror and active commit auto-finalize:
        (JobType.COPY, "mirror", S.PIVOTING),  # their pending is a passing state
        (JobType.ACTIVE_COMMIT, "commit", S.PIVOTING),
        (JobType.PULL, "stream", S.COMPLETED),
    ],
)
def test_reconcile_pending_without_finalize(jt: JobType, qtype: str, state: JobState) -> None:
    job = make_job(jt, state, job_id=f"{jt}-vda-libvirt-3-format", cur=10, end=10)
    assert reconcile([job], [q(job.job_id, "pending", qtype)]) == []


def test_reconcile_new_known_to_qemu() -> None:
    new = make_job(state=S.NEW)
    got = one(new, [q(JOB, "running")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.RUNNING, [E.SAVE])
    got = one(new, [q(JOB, "ready")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.READY, [E.SAVE, E.NOTIFY])
    got = one(new, [q(JOB, "concluded")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.COMPLETED, DONE)
    got = one(new, [q(JOB, "concluded", error="Operation canceled")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.CANCELLED, DROPPED)
    got = one(new, [q(JOB, "bogus")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.BROKEN, [E.SAVE, E.CANCEL])


def test_reconcile_new_unknown_to_qemu() -> None:
    new = make_job(state=S.NEW)
    assert one(new, [q("someone-else", "running")]) == (new, [E.UNREGISTER])


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ([q(JOB, "bogus")], "status 'bogus'"),
        ([q(JOB, "undefined")], "status 'undefined'"),
        ([q(JOB, 7)], "status 7"),
        ([q(JOB, "running", "stream")], "type 'stream'"),
        ([{"id": JOB, "status": "running"}], "type None"),
        ([q(JOB, "concluded", error=["x"])], "non-text error"),
        ([q(JOB, "running"), q(JOB, "ready")], "twice"),
        (["garbage"], "does not say"),
        ([{"id": 5, "status": "running"}], "does not say"),
        ({"return": []}, "does not say"),
        (None, "does not say"),
    ],
)
def test_reconcile_unparseable_is_broken(reply: Any, why: str) -> None:
    job = make_job(state=S.READY)
    got = one(job, reply)
    assert got is not None
    new, effects = got
    assert (new.state, effects) == (S.BROKEN, [E.SAVE, E.CANCEL])
    assert new.error is not None
    assert why in new.error


def test_reconcile_status_the_job_cannot_have() -> None:
    pull = make_job(JobType.PULL, S.RUNNING, job_id="pull-vda-libvirt-3-format")
    got = one(pull, [q(pull.job_id, "ready", "stream")])
    assert got is not None
    assert (got[0].state, got[1]) == (S.BROKEN, [E.SAVE, E.CANCEL])
    assert got[0].error is not None
    assert "status 'ready'" in got[0].error


def test_reconcile_broken_job_ends_failed() -> None:
    broken = make_job(state=S.BROKEN, error=f"query-jobs reports status 'bogus' for job '{JOB}'")
    assert reconcile([broken], [q(JOB, "bogus")]) == []
    assert reconcile([broken], [q(JOB, "aborting")]) == [
        (dataclasses.replace(broken, cur=10, end=10), [])
    ]
    got = one(broken, [])
    assert got is not None
    assert (got[0].state, got[1]) == (S.FAILED, GONE)
    assert got[0].error == "job vanished from QEMU"


def test_reconcile_pending_superseded_by_qemu() -> None:
    job = make_job(state=S.RUNNING, pending=T.READY)
    got = one(job, [q(JOB, "concluded", error="Invalid argument")])
    assert got is not None
    assert (got[0].state, got[0].pending, got[1]) == (S.FAILED, None, DROPPED)


def test_reconcile_pending_end_of_a_job_qemu_forgot() -> None:
    job = make_job(state=S.PIVOTING, pending=T.CONCLUDED)
    got = one(job, [])
    assert got is not None
    assert (got[0].state, got[1]) == (S.COMPLETED, [E.APPLY_RESULT, E.UNREGISTER, E.NOTIFY])
    job = make_job(state=S.RUNNING, pending=T.CONCLUDED_ERROR, error="Input/output error")
    got = one(job, [])
    assert got is not None
    assert (got[0].state, got[0].error, got[1]) == (S.FAILED, "Input/output error", GONE)
    pull = make_job(
        JobType.PULL, S.ABORTING, job_id="pull-vda-libvirt-3-format", pending=T.CANCELLED
    )
    got = one(pull, [])
    assert got is not None
    assert (got[0].state, got[1]) == (S.CANCELLED, GONE)


def test_reconcile_ended_job_left_in_status() -> None:
    # QEMU still lists it (no SAVE); once dismissed there is nothing left to do
    done = make_job(state=S.COMPLETED, cur=10, end=10)
    assert reconcile([done], [q(JOB, "concluded")]) == [(done, [E.DISMISS])]
    assert reconcile([done], []) == []
    assert reconcile([done], [q(JOB, "bogus")]) == []
    assert reconcile([done], None) == []
    failed = make_job(state=S.FAILED, error="Invalid argument", cur=10, end=10)
    assert reconcile([failed], [q(JOB, "concluded", error="Invalid argument")]) == [
        (failed, [E.DISMISS])
    ]
    assert reconcile([failed], []) == []


def test_reconcile_ignores_foreign_jobs_and_lists_them() -> None:
    mine = make_job(state=S.READY, cur=10, end=10)
    reply = [
        q("backup0", "running", "backup"),
        q(JOB, "ready"),
        q("create0", "concluded", "create"),
        "garbage",
        {"id": 3},
    ]
    assert reconcile([mine], reply) == []
    assert foreign_jobs([mine], reply) == ["backup0", "create0"]
    assert foreign_jobs([], [q(JOB, "ready"), q(JOB, "ready")]) == [JOB]
    assert foreign_jobs([mine], None) == []


def test_reconcile_many_jobs_twice() -> None:
    saved = [
        make_job(JobType.COPY, S.NEW, job_id="copy-vda-libvirt-3-format"),
        make_job(JobType.COPY, S.RUNNING, job_id="copy-vdb-libvirt-5-format"),
        make_job(JobType.PULL, S.RUNNING, job_id="pull-vdc-libvirt-7-format"),
        make_job(JobType.ACTIVE_COMMIT, S.PIVOTING, job_id="active-commit-vdd-libvirt-9-format"),
        make_job(JobType.COPY, S.ABORTING, job_id="copy-vde-libvirt-11-format"),
        make_job(JobType.COMMIT, S.RUNNING, job_id="commit-vdf-libvirt-13-format"),
        make_job(JobType.COPY, S.READY, job_id="copy-vdg-libvirt-15-format"),
        make_job(JobType.COPY, S.NEW, job_id="copy-vdh-libvirt-17-format"),
    ]
    reply = [
        q("copy-vda-libvirt-3-format", "running", cur=1, end=9),
        q("copy-vdb-libvirt-5-format", "ready"),
        q("pull-vdc-libvirt-7-format", "concluded", "stream"),
        q("active-commit-vdd-libvirt-9-format", "concluded", "commit"),
        q("copy-vde-libvirt-11-format", "concluded", error="Operation canceled"),
        q("commit-vdf-libvirt-13-format", "what", "commit"),
        q("not-ours", "running", "backup"),
    ]
    first = reconcile(saved, reply)
    assert [(j.job_id, j.state, e) for j, e in first] == [
        ("copy-vda-libvirt-3-format", S.RUNNING, [E.SAVE]),
        ("copy-vdb-libvirt-5-format", S.READY, [E.SAVE, E.NOTIFY]),
        ("pull-vdc-libvirt-7-format", S.COMPLETED, DONE),
        ("active-commit-vdd-libvirt-9-format", S.COMPLETED, DONE),
        ("copy-vde-libvirt-11-format", S.CANCELLED, DROPPED),
        ("commit-vdf-libvirt-13-format", S.BROKEN, [E.SAVE, E.CANCEL]),
        ("copy-vdg-libvirt-15-format", S.FAILED, GONE),
        ("copy-vdh-libvirt-17-format", S.NEW, [E.UNREGISTER]),
    ]
    after = settle(saved, first)
    assert [j.job_id for j in after] == [
        "copy-vda-libvirt-3-format",
        "copy-vdb-libvirt-5-format",
        "commit-vdf-libvirt-13-format",
    ]
    assert reconcile(after, reply) == []
    assert reconcile(settle(after, reconcile(after, reply)), reply) == []


# --------------------------------------------------------------------------
# Status file

OLD_STATUS = """\
<domstatus state='running' reason='booted' pid='4242'>
  <monitor path='/r/m.sock' type='unix'/>
  <monitor path='/r/q.sock' type='unix' role='query'/>
  <virtshift persistent='yes' nextIndex='3' rundir='/r' log='/l/vm.log'/>
  <qemu version='7.2.22' package='p'>
    <command name='block-job-complete'/>
    <command name='transaction'/>
  </qemu>
  <domain type='qemu' id='3'>
    <name>vm</name>
    <uuid>0e8a6b2c-3f6e-4a3b-9f0a-5b9a2e1f7c11</uuid>
    <memory unit='KiB'>131072</memory>
    <vcpu placement='static'>1</vcpu>
    <os>
      <type>hvm</type>
    </os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/i/top.qcow2' index='2'/>
        <backingStore type='file' index='1'>
          <format type='qcow2'/>
          <source file='/i/base.qcow2'/>
          <backingStore/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
        <alias name='virtio-disk0'/>
      </disk>
    </devices>
  </domain>
</domstatus>
"""


def layer(index: int | None, path: str | None, **kw: Any) -> StorageSource:
    node = f"libvirt-{index}-format" if index is not None else None
    return StorageSource(index=index, path=path, node_name=node, **kw)


def base_status() -> DomainStatus:
    base = layer(1, "/i/base.qcow2", format="qcow2", backing_end=True)
    top = layer(2, "/i/top.qcow2", format="qcow2", backing=base)
    dom = Domain(
        name="vm",
        uuid="0e8a6b2c-3f6e-4a3b-9f0a-5b9a2e1f7c11",
        id=3,
        memory_kib=131072,
        disks=(
            Disk(target="vda", bus="virtio", driver_name="qemu", source=top, alias="virtio-disk0"),
        ),
    )
    return DomainStatus(
        pid=4242,
        monitor="/r/m.sock",
        query_monitor="/r/q.sock",
        log="/l/vm.log",
        rundir="/r",
        persistent=True,
        caps=QemuCaps(
            version="7.2.22", package="p", commands=frozenset({"transaction", "block-job-complete"})
        ),
        next_index=3,
        domain=dom,
    )


def _canon(text: str) -> bytes:
    """The document without quoting style (the status file is written by lxml's C
    serializer, double quotes; older files used libvirt's single quotes)."""
    return etree.tostring(etree.fromstring(text.encode()), method="c14n")


def test_status_without_jobs_is_unchanged() -> None:
    st = base_status()
    assert _canon(format_status(st)) == _canon(OLD_STATUS)
    back = parse_status(OLD_STATUS)
    assert back == st
    assert back.jobs == ()


def test_status_names_the_capability_cache_entry() -> None:
    caps = dataclasses.replace(base_status().caps, key="caps-0123456789abcdef.json")
    st = dataclasses.replace(base_status(), caps=caps)
    text = format_status(st)
    qemu = etree.fromstring(text.encode()).find("qemu")
    assert qemu is not None
    assert qemu.get("caps") == "caps-0123456789abcdef.json"
    assert qemu.findall("command") == []
    back = parse_status(text)
    # the list is the runtime's to load from the cache
    assert back.caps == QemuCaps(
        version="7.2.22", package="p", commands=frozenset(), key="caps-0123456789abcdef.json"
    )
    assert dataclasses.replace(back, caps=caps) == st


def copy_job() -> BlockJob:
    bottom = layer(4, "/d/base.qcow2", format="qcow2", backing_end=True)
    middle = layer(5, "/d/mid.qcow2", format="qcow2", backing=bottom)
    top = layer(6, "/d/top.qcow2", format="qcow2", backing=middle)
    return BlockJob(
        job_id="copy-vda-libvirt-2-format",
        type=JobType.COPY,
        disk="vda",
        state=S.READY,
        node="libvirt-2-format",
        mirror=top,
        created=1700000000.123456,
        cur=1048576,
        end=1048576,
        added_nodes=("libvirt-6-format", "libvirt-5-format", "libvirt-4-format"),
    )


def full_job() -> BlockJob:
    """Every optional field set, with values that need escaping."""
    net = StorageSource(
        type="network", protocol="nbd", name="exp<1>", index=9, node_name="libvirt-9-format"
    )
    blk = layer(10, "/dev/vg/lv", type="block", format="raw", backing=net)
    return BlockJob(
        job_id="commit-vdb-libvirt-8-format",
        type=JobType.COMMIT,
        disk="vdb",
        state=S.BROKEN,
        node="libvirt-8-format",
        top=8,
        base=3,
        mirror=blk,
        bandwidth=10485760,
        flags=7,
        snapshot="s1 & 'quoted'",
        delete_after=("/i/a b.qcow2", "/i/c'.qcow2"),
        created_files=("/i/new.qcow2",),
        added_nodes=("libvirt-10-format",),
        error="query-jobs reports status 'x' <y> & \"z\"\nsecond line",
        pending=T.CONCLUDED_ERROR,
        cur=5,
        end=0,
        created=0.1,
    )


def test_status_round_trip_with_jobs() -> None:
    pull = BlockJob(job_id="pull-vdc-libvirt-1-format", type=JobType.PULL, disk="vdc")
    unknown_chain = BlockJob(
        job_id="copy-vdd-libvirt-12-format",
        type=JobType.COPY,
        disk="vdd",
        state=S.NEW,
        mirror=StorageSource(path="/d/x.raw"),  # no format, no index, chain not known
        error="",
    )
    st = dataclasses.replace(base_status(), jobs=(copy_job(), full_job(), pull, unknown_chain))
    text = format_status(st)
    back = parse_status(text)
    assert back.jobs == st.jobs
    assert back == st
    assert format_status(back) == text
    assert '<blockjobs active="yes">' in text
    # the domain part did not move
    assert text.replace("\n", "").count("<domain ") == 1
    assert text.index("</blockjobs>") < text.index("<domain ")
    copy = back.jobs[0].mirror
    assert copy is not None
    assert [(x.path, x.index, x.node_name) for x in copy.chain()] == [
        ("/d/top.qcow2", 6, "libvirt-6-format"),
        ("/d/mid.qcow2", 5, "libvirt-5-format"),
        ("/d/base.qcow2", 4, "libvirt-4-format"),
    ]
    assert copy.chain()[-1].backing_end


def test_status_job_element() -> None:
    text = format_status(dataclasses.replace(base_status(), jobs=(copy_job(),))).replace('"', "'")
    assert (
        """  <blockjobs active='yes'>
    <blockjob name='copy-vda-libvirt-2-format' type='copy' state='ready' disk='vda' node='libvirt-2-format' bandwidth='0' flags='0' created='1700000000.123456' cur='1048576' end='1048576'>
      <addedNode name='libvirt-6-format'/>
      <addedNode name='libvirt-5-format'/>
      <addedNode name='libvirt-4-format'/>
      <mirror type='file' format='qcow2'>
        <source file='/d/top.qcow2' index='6'/>
        <backingStore type='file' index='5'>
          <format type='qcow2'/>
          <source file='/d/mid.qcow2'/>
          <backingStore type='file' index='4'>
            <format type='qcow2'/>
            <source file='/d/base.qcow2'/>
            <backingStore/>
          </backingStore>
        </backingStore>
      </mirror>
    </blockjob>
  </blockjobs>
  <domain type='qemu' id='3'>"""
        in text
    )


@pytest.mark.parametrize(
    "bad",
    [
        "<blockjob type='copy' state='new' disk='vda'/>",
        "<blockjob name='j' type='bogus' state='new' disk='vda'/>",
        "<blockjob name='j' type='copy' state='sleeping' disk='vda'/>",
        "<blockjob name='j' type='copy' state='new'/>",
        "<blockjob name='j' type='copy' state='new' disk='vda' cur='x'/>",
        "<blockjob name='j' type='copy' state='new' disk='vda' pending='later'/>",
        "<blockjob name='j' type='copy' state='new' disk='vda'><createdFile/></blockjob>",
        "<blockjob name='j' type='copy' state='new' disk='vda'><mirror><backingStore index='1'/></mirror></blockjob>",
    ],
)
def test_status_bad_job_is_refused(bad: str) -> None:
    text = OLD_STATUS.replace(
        "  <domain ", f"  <blockjobs active='yes'>{bad}</blockjobs>\n  <domain ", 1
    )
    with pytest.raises(VirtError) as exc:
        parse_status(text)
    assert exc.value.code == ErrorCode.INTERNAL_ERROR


# --------------------------------------------------------------------------
# Start commands: who finalizes


def _three_layers() -> Domain:
    base = layer(1, "/i/base.qcow2", format="qcow2", backing_end=True)
    mid = layer(2, "/i/mid.qcow2", format="qcow2", backing=base)
    top = layer(3, "/i/top.qcow2", format="qcow2", backing=mid)
    return dataclasses.replace(
        base_status().domain,
        disks=(
            Disk(target="vda", bus="virtio", driver_name="qemu", source=top, alias="virtio-disk0"),
        ),
    )


def test_pull_and_commit_wait_for_finalize_active_commit_does_not() -> None:
    """A stream and a non-active commit stop at QEMU's pending so that the node they
    wrote is flushed before the backing name above is rewritten; an active commit
    keeps QEMU's finalize (its end is the pivot)."""
    from virtshift.ops import blockjob as plans

    dom = _three_layers()
    common: dict[str, Any] = {"bandwidth": 0, "flags": 0, "jobs": (), "now": 0.0}
    pull = plans.plan_pull(dom, "vda", "/i/base.qcow2", **common)
    assert (pull.command, pull.arguments["device"]) == ("block-stream", "libvirt-3-format")
    assert pull.arguments["auto-finalize"] is False
    assert pull.arguments["auto-dismiss"] is False
    commit = plans.plan_commit(dom, "vda", "/i/base.qcow2", "/i/mid.qcow2", **common)
    assert commit.command == "block-commit"
    assert commit.arguments["base-node"] == "libvirt-1-format"
    assert commit.arguments["auto-finalize"] is False
    active = plans.plan_commit(
        dom, "vda", "/i/base.qcow2", None, **{**common, "flags": plans.COMMIT_ACTIVE}
    )
    assert active.job.type == JobType.ACTIVE_COMMIT
    assert "auto-finalize" not in active.arguments
    assert active.arguments["auto-dismiss"] is False
