"""Running block jobs: start, reconcile, pivot, abort, speed, info, wait.

Lifecycle (STYLE.md section 5): a job is recorded NEW in the status file, then
its QMP command is sent (``auto-dismiss: false``, so a concluded job stays
visible to a process that was not connected), then it is saved RUNNING.  Its
end is applied by whichever process next holds the domain lock: every locked
operation first reconciles the recorded jobs with ``query-jobs``
(:func:`virtshift.jobs.reconcile.reconcile`) and carries out the effects the
state machine returns.  So a job survives the process that started it: a later
process can query, pivot or abort it, and finishes it when QEMU says it ended.

Pivots never trust QEMU blindly: a reused destination's backing chain is read
from the files and verified (present, formats recorded and equal, virtual
sizes equal) before it is attached and ``block-job-complete`` is sent, and
after the job ends the disk's real top node is read back from ``query-block``
before the XML is rewritten (QEMU-NOTES traps 3 and 4).

A pull or commit starts with ``auto-finalize: false``: when it has done its
work QEMU holds it at ``pending``, and the locked call that sees that (the
reconcile of any call, or the process waiting for the job) flushes the node
the job wrote and only then sends ``job-finalize``.  QEMU 7.2 rewrites the
backing file name of the image above while finalizing, without flushing the
clusters the job copied first; a QEMU killed right after that lost them.

The waiter of ``--wait`` polls through the second (query) monitor and takes
no lock while it waits, so other processes can pivot, abort or change speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from virtshift import faults
from virtshift.errors import ErrorCode, QMPError, VirtError
from virtshift.jobs.machine import apply, event_trigger
from virtshift.jobs.reconcile import awaits_finalize, reconcile
from virtshift.model.domain import StorageSource
from virtshift.model.image import ImageLayer
from virtshift.model.job import BlockJob, Effect, JobState, JobType, Trigger
from virtshift.model.status import DomainStatus
from virtshift.ops import blockjob as plans
from virtshift.ops.snapshot import OverlayPlan, config_after
from virtshift.ops.start import format_node, storage_node
from virtshift.qmp.client import Monitor
from virtshift.qmp.models import parse_query_block
from virtshift.runtime.driver import DomainRecord, Driver
from virtshift.store.images import read_chain, read_layer

__all__ = ["BlockJobs"]

_log = logging.getLogger("virtshift.blockjob")

#: Seconds a pivot or abort waits for QEMU to conclude the job.
END_TIMEOUT = 120.0


def _dest_chain(path: str, fmt: str) -> list[ImageLayer]:
    try:
        return read_chain(path, fmt)
    except VirtError as err:
        raise VirtError(
            ErrorCode.OPERATION_INVALID,
            f"destination chain of '{path}' cannot be read: {err.detail}; refusing "
            "to pivot (QEMU would pivot onto an image without its backing data)",
        ) from err


def usable_image(path: str, fmt: str, what: str) -> ImageLayer:
    """The header of a file the user hands over for reuse, opened as ``fmt``.

    :raise VirtError: CONFIG_UNSUPPORTED naming ``what`` when it is not a usable
        image of that format (no probing: SPEC's explicit-format rule).
    """
    try:
        return read_layer(path, fmt)
    except VirtError as err:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED, f"{what} is not a usable {fmt} image: {err.detail}"
        ) from err


_READY_WORD = {
    JobState.READY: "yes",
    JobState.PIVOTING: "pivot",
    JobState.ABORTING: "abort",
}


def _mirror_ready(domain: Any, job: BlockJob) -> Any:
    """The live ``<mirror ready=>`` word follows the job's state, as in libvirt."""
    disk = domain.disk(job.disk)
    if disk is None or disk.mirror is None or job.state.ended:
        return domain
    word = _READY_WORD.get(job.state)
    if disk.mirror.ready == word:
        return domain
    mirror = dataclasses.replace(disk.mirror, ready=word)
    return domain.with_disk(dataclasses.replace(disk, mirror=mirror))


class BlockJobs:
    """Block jobs of the domains of one driver."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        if driver.on_monitor is None:
            driver.on_monitor = self.reconcile

    # -- status bookkeeping ------------------------------------------------------------

    def _status(self, name: str) -> DomainStatus:
        rec = self.driver.record(name)
        if rec.status is None:
            raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
        return rec.status

    def _put(
        self, name: str, job: BlockJob, *, domain: Any = None, next_index: int = 0
    ) -> DomainStatus:
        """Save ``job`` (replacing the record of the same id, and older ended
        records of its disk), optionally a new live domain, and raise the next
        free chain index to ``next_index``.

        A status equal to the one on disk is not written again (an ended job is
        saved with its result, and its UNREGISTER then changes nothing)."""
        old = self._status(name)
        jobs = [
            j
            for j in old.jobs
            if j.job_id != job.job_id and not (j.disk == job.disk and j.state.ended)
        ]
        jobs.append(job)
        live = domain or old.domain
        disk = live.disk(job.disk)
        if job.state != JobState.NEW and not job.state.ended and disk is not None:
            if disk.mirror is None:
                # a job adopted by reconcile (its starter died or lost the monitor
                # before recording it running) shows its <mirror> like any other
                live = plans.with_mirror(live, job, ready=None)
            if job.mirror is not None and job.mirror.index is not None:
                next_index = max(next_index, job.mirror.index + 1)
        live = _mirror_ready(live, job)
        st = dataclasses.replace(
            old, jobs=tuple(jobs), domain=live, next_index=max(old.next_index, next_index)
        )
        if st != old:
            self.driver.write_status(name, st)
        return st

    def _forget(self, name: str, job: BlockJob) -> None:
        st = self._status(name)
        st = dataclasses.replace(st, jobs=tuple(j for j in st.jobs if j.job_id != job.job_id))
        self.driver.write_status(name, st)

    # -- reconcile + effects -------------------------------------------------------------

    def reconcile(self, name: str, mon: Monitor) -> None:
        """Bring recorded jobs up to date with QEMU (domain lock held).

        A pull or commit found at ``pending`` is flushed and finalized, and
        QEMU is asked again, so that its end is applied by the same call."""
        for _round in range(3):
            st = self._status(name)
            if not any(not j.state.ended for j in st.jobs):
                return
            reply = mon.execute("query-jobs")
            finalized = False
            for job, effects in reconcile(st.jobs, reply):
                self._carry_out(name, mon, job, effects)
                finalized |= Effect.FINALIZE in effects
            if not finalized:
                return

    def _carry_out(
        self,
        name: str,
        mon: Monitor,
        job: BlockJob,
        effects: Sequence[Effect],
        *,
        next_index: int = 0,
    ) -> BlockJob:
        for effect in effects:
            if effect == Effect.SAVE:
                self._put(name, job, next_index=next_index)
            elif effect == Effect.DISMISS:
                try:
                    mon.execute("job-dismiss", {"id": job.job_id})
                except QMPError as err:
                    _log.debug("job-dismiss %s: %s", job.job_id, err)
            elif effect == Effect.APPLY_RESULT:
                job = self._apply_result(name, mon, job)
            elif effect == Effect.DROP_MIRROR:
                self._drop_mirror(name, mon, job)
            elif effect == Effect.UNREGISTER:
                if job.state == JobState.NEW:
                    self._forget(name, job)
                    self._undo_prepare(mon, job)
                else:
                    self._put(name, job)
            elif effect == Effect.FINALIZE:
                self._finalize(mon, job)
            elif effect == Effect.CANCEL:
                try:
                    mon.execute("block-job-cancel", {"device": job.job_id, "force": True})
                except QMPError as err:
                    _log.warning("cancelling broken job %s: %s", job.job_id, err)
            elif effect == Effect.NOTIFY:
                pass  # listeners see the saved state change (see runtime/events.py)
        return job

    def _finalize(self, mon: Monitor, job: BlockJob) -> None:
        """Flush the node a pull (its top) or commit (its base) wrote, then let
        QEMU finalize the job, which rewrites the backing file name above.

        QMP 7.2 has no flush command; HMP ``qemu-io NODE "flush"`` flushes the
        node and, through the children it may write, its file (``bdrv_flush``:
        the qcow2 L2 and refcount caches, then fdatasync).  When the flush
        fails the job stays pending: QEMU's header is left alone, both layers
        keep the data, and the next locked call tries again."""
        node = (
            format_node(job.base)
            if job.type == JobType.COMMIT and job.base is not None
            else job.node
        )
        faults.point("job-pending")
        try:
            out = mon.execute("human-monitor-command", {"command-line": f'qemu-io {node} "flush"'})
        except QMPError as err:
            _log.warning("cannot flush %s before finalizing %s: %s", node, job.job_id, err)
            return
        if not isinstance(out, str) or out.strip():
            _log.warning("cannot flush %s before finalizing %s: %s", node, job.job_id, out)
            return
        try:
            mon.execute("job-finalize", {"id": job.job_id})
        except QMPError as err:  # finalized meanwhile, or ended otherwise
            _log.debug("job-finalize %s: %s", job.job_id, err)
            return
        faults.point("job-finalized")

    def _undo_prepare(self, mon: Monitor, job: BlockJob) -> None:
        """Remove the nodes and files prepared for a job QEMU never started (the
        process that recorded it died, or lost the monitor, before the start)."""
        for node in reversed(job.added_nodes):
            try:
                mon.execute("blockdev-del", {"node-name": node})
            except QMPError as err:
                _log.debug("blockdev-del %s: %s", node, err)
        for path in job.created_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                _log.warning("cannot remove '%s' of job %s: %s", path, job.job_id, err)

    def _top_node(self, mon: Monitor, alias: str | None) -> str | None:
        for dev in parse_query_block(mon.execute("query-block")):
            if dev.alias == alias:
                return dev.node_name
        return None

    def _apply_result(self, name: str, mon: Monitor, job: BlockJob) -> BlockJob:
        st = self._status(name)
        live = st.domain
        disk = live.disk(job.disk)
        if disk is None:
            return job
        if job.type == JobType.PULL:
            live = plans.after_pull(live, job)
        elif job.type == JobType.COMMIT:
            live = plans.after_commit(live, job)
        else:
            top = self._top_node(mon, disk.alias)
            want = (
                format_node(job.base)
                if job.type == JobType.ACTIVE_COMMIT and job.base
                else job.mirror.node_name
                if job.mirror is not None
                else None
            )
            if top != want:
                # QEMU did not switch the disk (someone else ended the job without
                # a pivot): follow the graph, not the record
                _log.warning(
                    "job %s ended but disk '%s' is on %s, not %s", job.job_id, job.disk, top, want
                )
                self._drop_mirror(name, mon, job)
                return dataclasses.replace(job, state=JobState.CANCELLED)
            if job.type == JobType.ACTIVE_COMMIT:
                live = plans.after_active_commit(live, job)
            else:
                assert job.mirror is not None
                live = plans.after_pivot(live, job, job.mirror)
        self._release_nodes(mon, st.domain, live, job.disk)
        self._put(name, job, domain=live)
        rec = self.driver.record(name)
        new_disk = live.disk(job.disk)
        if rec.config is not None and new_disk is not None and new_disk.source.path is not None:
            src = new_disk.source
            ov = OverlayPlan(
                target=job.disk, path=src.path or "", type=src.type, format=src.format or "raw"
            )
            self.driver.write_config(name, config_after(rec.config, [ov]))
        for path in job.delete_after:
            try:
                os.unlink(path)
            except OSError as err:
                _log.warning("cannot delete '%s' after commit: %s", path, err)
        return job

    def _release_nodes(self, mon: Monitor, before: Any, after: Any, disk: str) -> None:
        """``blockdev-del`` the layers a job took out of the disk's chain (top first),
        so QEMU closes them and releases their locks, as libvirt does."""
        old = before.disk(disk)
        new = after.disk(disk)
        if old is None or new is None:
            return
        keep = {x.index for d in after.disks for x in d.source.chain()}
        if new.mirror is not None:
            keep |= {x.index for x in new.mirror.source.chain()}
        for layer in old.source.chain():
            if layer.index is None or layer.index in keep:
                continue
            for node in (format_node(layer.index), storage_node(layer.index)):
                try:
                    mon.execute("blockdev-del", {"node-name": node})
                except QMPError as err:  # implicit nodes (snapshot overlays) go by themselves
                    _log.debug("blockdev-del %s: %s", node, err)

    def _drop_mirror(self, name: str, mon: Monitor, job: BlockJob) -> None:
        for node in job.added_nodes:
            try:
                mon.execute("blockdev-del", {"node-name": node})
            except QMPError as err:
                _log.debug("blockdev-del %s: %s", node, err)
        st = self._status(name)
        self._put(name, job, domain=plans.without_mirror(st.domain, job.disk))

    # -- starting ----------------------------------------------------------------------

    def start(self, name: str, mon: Monitor, plan: plans.StartPlan) -> BlockJob:
        """Record, prepare and start a planned job (domain lock held)."""
        job = plan.job
        created: list[str] = []
        try:
            for argv in plan.create:
                res = subprocess.run(list(argv), capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"cannot create '{argv[-2] if argv[-1].isdigit() else argv[-1]}': "
                        f"{res.stderr.strip()}",
                    )
                created.append(argv[-2] if argv[-1].isdigit() else argv[-1])
            st = self._put(name, job)  # intent first (NEW)
            faults.point("job-recorded")
            added: list[str] = []
            try:
                for obj in plan.add:
                    mon.execute("blockdev-add", obj)
                    added.append(str(obj["node-name"]))
                mon.execute(plan.command, plan.arguments)
            except VirtError as err:
                if isinstance(err, QMPError) and err.unanswered:
                    # QEMU may have started the job: keep its record (NEW), its nodes
                    # and files; the next call's reconcile adopts it, or removes them
                    created.clear()
                    raise VirtError(
                        err.code,
                        f"{err.detail}; whether QEMU started job '{job.job_id}' is not "
                        "known yet: the next call on this domain finds out",
                        cause=err,
                    ) from err
                for node in reversed(added):
                    try:
                        mon.execute("blockdev-del", {"node-name": node})
                    except QMPError:
                        _log.warning("cannot remove node %s after a failed start", node)
                job, _effects = apply(job, Trigger.START_FAILED)
                self._forget(name, job)
                raise
            faults.point("job-started")
            job, _effects = apply(job, Trigger.STARTED)
            live = plans.with_mirror(st.domain, job, ready=None)
            index = job.mirror.index if job.mirror is not None else None
            self._put(name, job, domain=live, next_index=0 if index is None else index + 1)
            return job
        except BaseException:
            for path in created:
                try:
                    os.unlink(path)
                except OSError:
                    _log.warning("cannot remove '%s' after a failed start", path)
            raise

    # -- ending ------------------------------------------------------------------------

    def _wait_end(
        self, name: str, mon: Monitor, job: BlockJob, timeout: float = END_TIMEOUT
    ) -> BlockJob:
        """Wait for the job's end event (or poll query-jobs) and apply it."""
        deadline = time.monotonic() + timeout
        jid = job.job_id

        def is_end(event: dict[str, Any]) -> bool:
            got = event_trigger(event)
            return got is not None and got[0] == jid and got[1] != Trigger.READY

        while time.monotonic() < deadline:
            ev = mon.wait_event(is_end, timeout=0.2)
            if ev is not None:
                got = event_trigger(ev)
                assert got is not None
                _jid, trigger, error = got
                job, effects = apply(job, trigger, error=error)
                return self._carry_out(name, mon, job, effects)
            # the event may have come before we connected: ask QEMU
            for j in mon.execute("query-jobs"):
                if not isinstance(j, dict) or j.get("id") != job.job_id:
                    continue
                if awaits_finalize(job, j.get("status")):
                    job, effects = apply(job, Trigger.FINALIZABLE)
                    job = self._carry_out(name, mon, job, effects)
                elif j.get("status") == "concluded":
                    trigger = Trigger.CONCLUDED_ERROR if j.get("error") else Trigger.CONCLUDED
                    if job.state == JobState.ABORTING and j.get("error") == "Operation canceled":
                        trigger = Trigger.CANCELLED
                    job, effects = apply(job, trigger, error=j.get("error"))
                    return self._carry_out(name, mon, job, effects)
        raise VirtError(
            ErrorCode.OPERATION_TIMEOUT,
            f"block job '{job.job_id}' did not end within {timeout:.0f} s",
        )

    def _attach_reused_chain(self, name: str, mon: Monitor, job: BlockJob) -> tuple[BlockJob, int]:
        """Verify a reused destination's chain and attach it under the target.

        Returns the job with the attached chain and the next free chain index;
        the caller saves both with the PIVOTING record (one write, before
        ``block-job-complete``)."""
        mirror = job.mirror
        assert mirror is not None
        assert mirror.path is not None
        if mirror.backing is not None or mirror.backing_end:
            return job, 0  # ours, or already attached
        st = self._status(name)
        disk = st.domain.disk(job.disk)
        assert disk is not None
        dev = next(
            d for d in parse_query_block(mon.execute("query-block")) if d.alias == disk.alias
        )
        source = [(layer.format, layer.virtual_size) for layer in dev.chain]
        infos = _dest_chain(mirror.path, mirror.format or "qcow2")
        plans.check_dest_chain(job.disk, infos, source)
        # add the layers below the target, bottom first, then attach
        n = st.next_index
        layers: list[StorageSource] = []
        added: list[str] = []
        try:
            below = infos[1:]
            indexes = list(range(n, n + len(below)))
            for depth in reversed(range(len(below))):
                info = below[depth]
                idx = indexes[depth]
                fname = info.filename
                fmt = info.format
                mon.execute(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "filename": fname,
                        "node-name": storage_node(idx),
                        "auto-read-only": True,
                        "discard": "unmap",
                    },
                )
                added.append(storage_node(idx))
                fmt_node: dict[str, Any] = {
                    "node-name": format_node(idx),
                    "read-only": True,
                    "driver": fmt,
                    "file": storage_node(idx),
                }
                if fmt != "raw":
                    fmt_node["backing"] = (
                        format_node(indexes[depth + 1]) if depth + 1 < len(below) else None
                    )
                mon.execute("blockdev-add", fmt_node)
                added.append(format_node(idx))
            if below:
                mon.execute(
                    "blockdev-snapshot",
                    {"node": format_node(indexes[0]), "overlay": mirror.node_name},
                )
        except VirtError:
            for node in reversed(added):
                try:
                    mon.execute("blockdev-del", {"node-name": node})
                except QMPError:
                    _log.warning("cannot remove node %s", node)
            raise
        chain: StorageSource | None = None
        for depth in reversed(range(len(below))):
            info = below[depth]
            chain = StorageSource(
                type="file",
                path=info.filename,
                format=info.format,
                index=indexes[depth],
                node_name=format_node(indexes[depth]),
                backing=chain,
                backing_end=chain is None,
            )
            layers.append(chain)
        new_mirror = dataclasses.replace(mirror, backing=chain, backing_end=chain is None)
        job = dataclasses.replace(job, mirror=new_mirror, added_nodes=(*job.added_nodes, *added))
        return job, n + len(below)

    def wait_ready_locked(
        self, name: str, mon: Monitor, job: BlockJob, timeout: float = END_TIMEOUT
    ) -> BlockJob:
        """Wait for READY while holding the lock and the monitor (internal jobs)."""
        ev = mon.wait_event(
            lambda e: (t := event_trigger(e)) is not None and t[0] == job.job_id,
            timeout=timeout,
        )
        if ev is None:
            raise VirtError(ErrorCode.OPERATION_TIMEOUT, f"block job '{job.job_id}' not ready")
        got = event_trigger(ev)
        assert got is not None
        job, effects = apply(job, got[1], error=got[2])
        job = self._carry_out(name, mon, job, effects)
        if job.state != JobState.READY:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"block job '{job.job_id}' ended before it was ready: {job.error or job.state}",
            )
        return job

    def wait_end_locked(self, name: str, mon: Monitor, job: BlockJob) -> BlockJob:
        ended = self._wait_end(name, mon, job)
        if ended.state != JobState.COMPLETED:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"block job '{job.job_id}' failed: {ended.error or ended.state.value}",
            )
        return ended

    def pivot(self, name: str, mon: Monitor, job: BlockJob) -> BlockJob:
        """Switch the disk onto the copy's destination (or an active commit's base).

        A job left PIVOTING by a process that died before or while sending
        ``block-job-complete`` gets the command again (it is idempotent until
        the job concludes)."""
        if job.state == JobState.PIVOTING:
            pivoting = job
        else:
            apply(job, Trigger.PIVOT)  # raises when not READY, before anything is attached
            next_index = 0
            if job.type == JobType.COPY:
                job, next_index = self._attach_reused_chain(name, mon, job)
            pivoting, effects = apply(job, Trigger.PIVOT)
            # intent first: PIVOTING (with the attached chain) is on disk before the command
            self._carry_out(name, mon, pivoting, effects, next_index=next_index)
        try:
            mon.execute("block-job-complete", {"device": job.job_id})
        except VirtError as err:
            if isinstance(err, QMPError) and err.unanswered:
                # QEMU may be pivoting: stay PIVOTING, the next call's reconcile
                # applies whatever QEMU did
                raise
            self._put(name, job)  # back to READY: nothing happened
            raise
        faults.point("pivot-sent")
        ended = self._wait_end(name, mon, pivoting)
        if ended.state != JobState.COMPLETED:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"block job '{job.disk}' failed while pivoting"
                + (f": {ended.error}" if ended.error else ""),
            )
        return ended

    def abort(self, name: str, mon: Monitor, job: BlockJob, *, wait: bool) -> BlockJob:
        """Cancel a job; a ready copy ends without pivot (the disk stays on the source).
        A job left ABORTING by a dead process gets the cancel again."""
        if job.state == JobState.ABORTING:
            aborting = job
        else:
            aborting, effects = apply(job, Trigger.ABORT)
            self._carry_out(name, mon, aborting, effects)
        try:
            mon.execute("block-job-cancel", {"device": job.job_id})
        except VirtError:
            self._put(name, job)
            raise
        if not wait:
            return aborting
        return self._wait_end(name, mon, aborting)

    def set_speed(self, name: str, mon: Monitor, job: BlockJob, speed: int) -> BlockJob:
        mon.execute("block-job-set-speed", {"device": job.job_id, "speed": speed})
        job = dataclasses.replace(job, bandwidth=speed)
        self._put(name, job)
        return job

    # -- reading without the lock ------------------------------------------------------

    def query(self, name: str) -> tuple[DomainRecord, list[dict[str, Any]]]:
        """Recorded jobs and QEMU's ``query-block-jobs``, through the query monitor."""
        with self.driver.query_monitor(name) as (rec, mon):
            reply = mon.execute("query-block-jobs")
        return rec, [j for j in reply if isinstance(j, dict)]

    def qemu_jobs(self, name: str) -> list[dict[str, Any]]:
        with self.driver.query_monitor(name) as (_rec, mon):
            reply = mon.execute("query-jobs")
        return [j for j in reply if isinstance(j, dict)]

    def wait(
        self,
        name: str,
        job_id: str,
        *,
        until_ready: bool,
        progress: Callable[[int, int], None] | None = None,
        timeout: float | None = None,
        interval: float = 0.05,
    ) -> BlockJob:
        """Wait (without the lock) until the job is ready (if asked) or ended.

        Reads QEMU's view through the query monitor; when QEMU says the job
        concluded, takes the lock once to apply it.  Returns the recorded job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rec = self.driver.record(name)
            st = rec.status
            job = next((j for j in (st.jobs if st else ()) if j.job_id == job_id), None)
            if job is None or job.state.ended:
                if job is None:
                    raise VirtError(ErrorCode.OPERATION_FAILED, f"block job '{job_id}' is gone")
                return job
            if until_ready and job.state == JobState.READY:
                return job
            concluded = False
            for q in self.qemu_jobs(name):
                if q.get("id") != job_id:
                    continue
                if progress is not None:
                    progress(int(q.get("current-progress", 0)), int(q.get("total-progress", 0)))
                status = q.get("status")
                if status == "concluded" or (status == "ready" and job.state == JobState.RUNNING):
                    concluded = True
                if awaits_finalize(job, status):
                    concluded = True  # the locked call flushes and finalizes it
            if concluded:
                with self.driver.monitor(name, "block job update"):
                    pass  # opening it under the lock reconciles (Driver.on_monitor)
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise VirtError(ErrorCode.OPERATION_TIMEOUT, f"block job '{job_id}' still running")
            time.sleep(interval)


# -- operations as the facade calls them (each takes the domain lock) ----------------------


class BlockJobOps(BlockJobs):
    """The block-job API: each call holds the domain lock and reconciles first."""

    def _locked(self, name: str, what: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def cm() -> Any:
            with self.driver.monitor(name, what) as (_rec, mon):
                yield self._status(name), mon  # reconciled by the driver's hook

        return cm()

    def _job(self, st: DomainStatus, disk: str, *, active: bool = True) -> BlockJob:
        d = plans.resolve_disk(st.domain, disk)
        job = plans.job_for_disk(st.jobs, d.target)
        if job is None or (active and job.state.ended):
            raise VirtError(
                ErrorCode.INVALID_ARG, f"disk {d.target} does not have an active block job"
            )
        return job

    def pull(self, name: str, disk: str, base: str | None, bandwidth: int, flags: int) -> BlockJob:
        with self._locked(name, "block pull") as (st, mon):
            plan = plans.plan_pull(
                st.domain,
                disk,
                base,
                bandwidth=bandwidth,
                flags=flags,
                jobs=st.jobs,
                now=time.time(),
            )
            return self.start(name, mon, plan)

    def commit(
        self, name: str, disk: str, base: str | None, top: str | None, bandwidth: int, flags: int
    ) -> BlockJob:
        with self._locked(name, "block commit") as (st, mon):
            plan = plans.plan_commit(
                st.domain,
                disk,
                base,
                top,
                bandwidth=bandwidth,
                flags=flags,
                jobs=st.jobs,
                now=time.time(),
            )
            return self.start(name, mon, plan)

    def copy(
        self,
        name: str,
        disk: str,
        dest: StorageSource,
        *,
        flags: int,
        bandwidth: int,
        granularity: int | None,
        buf_size: int | None,
        snapshot: str | None = None,
    ) -> BlockJob:
        with self._locked(name, "block copy") as (st, mon):
            return self.start_copy(
                name,
                mon,
                st,
                disk,
                dest,
                flags=flags,
                bandwidth=bandwidth,
                granularity=granularity,
                buf_size=buf_size,
                snapshot=snapshot,
            )

    def start_copy(
        self,
        name: str,
        mon: Monitor,
        st: DomainStatus,
        disk: str,
        dest: StorageSource,
        *,
        flags: int,
        bandwidth: int,
        granularity: int | None,
        buf_size: int | None,
        snapshot: str | None = None,
    ) -> BlockJob:
        """Start a copy with the lock and monitor already held."""
        import stat as stat_mod

        if dest.path is None or not os.path.isabs(dest.path):
            raise VirtError(
                ErrorCode.INVALID_ARG, "absolute path must be used as block copy target"
            )
        reuse = bool(flags & plans.COPY_REUSE_EXT)
        try:
            mode = os.lstat(dest.path).st_mode
            if stat_mod.S_ISLNK(mode):
                if not reuse:
                    raise VirtError(
                        ErrorCode.CONFIG_UNSUPPORTED,
                        f"block copy destination '{dest.path}' already exists (a symbolic "
                        "link); a new destination must be a new file",
                    )
                # A pre-created destination reached through a link (oVirt's block
                # storage domains link each volume to its LV): the target is what
                # is checked below and what QEMU opens.
                mode = os.stat(dest.path).st_mode
            exists, is_block = True, stat_mod.S_ISBLK(mode)
            if not (is_block or stat_mod.S_ISREG(mode)):
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    f"block copy destination '{dest.path}' is not a regular file or block device",
                )
        except FileNotFoundError:
            exists, is_block = False, False
        except OSError as err:
            raise VirtError(
                ErrorCode.SYSTEM_ERROR,
                f"cannot access block copy destination '{dest.path}': {err.strerror}",
                cause=err,
            ) from err
        if dest.path and not os.path.isdir(os.path.dirname(dest.path)):
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"directory of block copy destination '{dest.path}' does not exist",
            )
        if exists and not is_block and reuse and dest.format is not None:
            usable_image(dest.path, dest.format, f"block copy destination '{dest.path}'")
        d = plans.resolve_disk(st.domain, disk)
        size = None
        for dev in parse_query_block(mon.execute("query-block")):
            if dev.alias == d.alias and dev.chain:
                size = dev.chain[0].virtual_size
        plan = plans.plan_copy(
            st.domain,
            disk,
            dest,
            flags=flags,
            bandwidth=bandwidth,
            granularity=granularity,
            buf_size=buf_size,
            jobs=st.jobs,
            next_index=st.next_index,
            dest_exists=exists,
            dest_is_block=is_block,
            now=time.time(),
            snapshot=snapshot,
            virtual_size=size,
        )
        return self.start(name, mon, plan)

    def abort_disk(self, name: str, disk: str, *, pivot: bool, asynchronous: bool) -> BlockJob:
        with self._locked(name, "block job abort") as (st, mon):
            job = self._job(st, disk)
            if pivot:
                if job.type not in (JobType.COPY, JobType.ACTIVE_COMMIT):
                    raise VirtError(
                        ErrorCode.OPERATION_INVALID,
                        f"job type '{job.type.value}' does not support pivot",
                    )
                return self.pivot(name, mon, job)
            return self.abort(name, mon, job, wait=not asynchronous)

    def set_speed_disk(self, name: str, disk: str, speed: int) -> BlockJob:
        with self._locked(name, "block job speed") as (st, mon):
            return self.set_speed(name, mon, self._job(st, disk), speed)

    def refresh(self, name: str, *, wait: bool = False) -> bool:
        """Apply jobs QEMU has ended, if the domain lock is free right now (or, with
        ``wait``, once it is).

        Read-only calls use this so that a finished job is reported finished even
        when no process was connected when it ended.
        """
        try:
            timeout = None if wait else 0
            with self.driver.monitor(name, "block job update", timeout=timeout):
                pass  # opening it under the lock reconciles (Driver.on_monitor)
            return True
        except VirtError as err:
            if err.code != ErrorCode.OPERATION_TIMEOUT:
                raise
            return False

    def info(self, name: str, disk: str) -> dict[str, int] | None:
        """libvirt's blockJobInfo fields (bandwidth in bytes/s), or None when no job runs."""
        rec, qjobs = self.query(name)
        assert rec.status is not None
        stale = [
            q
            for q in qjobs
            if q.get("status") == "concluded"
            or (
                q.get("status") == "pending"
                and any(
                    j.job_id == q.get("device") and awaits_finalize(j, "pending")
                    for j in rec.status.jobs
                )
            )
            or (
                q.get("ready")
                and any(
                    j.job_id == q.get("device") and j.state == JobState.RUNNING
                    for j in rec.status.jobs
                )
            )
        ]
        # a job QEMU has ended is applied before it is reported gone, so that a
        # program that polls until {} and then reads the XML sees the result
        if stale and self.refresh(name, wait=True):
            rec, qjobs = self.query(name)
        assert rec.status is not None
        d = plans.resolve_disk(rec.status.domain, disk)
        job = plans.job_for_disk(rec.status.jobs, d.target)
        if job is None or job.state.ended:
            return None
        q = next((x for x in qjobs if x.get("device") == job.job_id), None)
        if q is None or q.get("status") == "concluded":
            return None  # ended in QEMU; whoever holds the lock now applies it
        cur, end = int(q.get("offset", 0)), int(q.get("len", 0))
        ready = bool(q.get("ready"))
        # libvirt's rules: programs poll for cur == end, so that must mean ready;
        # 0 of 0 means the job has not sized its work yet
        if cur == 0 and end == 0:
            end, cur = 1, 1 if ready else 0
        elif cur == end and not ready:
            cur -= 1
        return {
            "type": job.type.libvirt,
            "bandwidth": int(q.get("speed", job.bandwidth)),
            "cur": cur,
            "end": end,
        }

    def block_info(self, name: str, path: str) -> tuple[int, int, int]:
        """capacity (virtual size), allocation (bytes in use), physical (file size)."""
        rec = self.driver.record(name)
        d = plans.resolve_disk(rec.definition, path)
        src = d.source
        if src.path is None:
            raise VirtError(ErrorCode.INVALID_ARG, f"disk '{path}' has no source")
        argv = ["qemu-img", "info", "-U", "--output=json", "-f", src.format or "raw", src.path]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if res.returncode != 0:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"cannot read '{src.path}': {res.stderr.strip()}"
            )
        info = json.loads(res.stdout)
        physical = os.stat(src.path).st_size
        return int(info.get("virtual-size", 0)), int(info.get("actual-size", physical)), physical
