"""Block-job events delivered the way libvirt-python delivers them.

libvirt pushes events from its daemon; virtshift has none, so
``virEventRunDefaultImpl()`` runs one iteration of a poll loop: for every
domain with a registered block-job callback it reads the recorded jobs, asks
QEMU (through the query monitor) whether an active job became ready or ended,
applies an ended job under the domain lock (the same reconcile every process
does), and calls the callbacks for each change it sees:
``cb(conn, dom, disk, type, status, opaque)`` with libvirt's status numbers
(COMPLETED 0, FAILED 1, CANCELED 2, READY 3).  ``disk`` is the target name for
``VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2`` and the active layer's path for
``VIR_DOMAIN_EVENT_ID_BLOCK_JOB``.

Changes made by any process are seen, because the loop compares recorded job
states, not QMP events of one connection.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from virtshift.errors import VirtError
from virtshift.jobs.machine import libvirt_event_status
from virtshift.jobs.reconcile import awaits_finalize
from virtshift.model.job import JobState

__all__ = ["EventLoop", "default_loop"]

_log = logging.getLogger("virtshift.events")

EVENT_ID_BLOCK_JOB = 8
EVENT_ID_BLOCK_JOB_2 = 16


@dataclass
class _Registration:
    ident: int
    conn: Any
    dom: Any  # virDomain or None (all domains)
    event_id: int
    cb: Any
    opaque: Any
    #: job id -> last state reported
    seen: dict[str, JobState] = field(default_factory=dict)


class EventLoop:
    """The process's event loop (``virEventRegisterDefaultImpl`` makes it)."""

    def __init__(self) -> None:
        self._regs: dict[int, _Registration] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.interval = 0.05

    def register(self, conn: Any, dom: Any, event_id: int, cb: Any, opaque: Any) -> int:
        reg = _Registration(next(self._ids), conn, dom, event_id, cb, opaque)
        for d in self._domains(reg):
            for job in self._jobs(d):
                reg.seen[job.job_id] = job.state  # only later changes are events
        with self._lock:
            self._regs[reg.ident] = reg
        return reg.ident

    def deregister(self, ident: int) -> bool:
        with self._lock:
            return self._regs.pop(ident, None) is not None

    def _domains(self, reg: _Registration) -> list[Any]:
        if reg.dom is not None:
            return [reg.dom]
        try:
            return list(reg.conn.listAllDomains(1))  # active ones
        except Exception:  # a connection that went away
            return []

    @staticmethod
    def _jobs(dom: Any) -> list[Any]:
        try:
            rec = dom._driver.record(dom.name())
        except VirtError:
            return []
        return list(rec.status.jobs) if rec.status is not None else []

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration: look, dispatch, and sleep a little if nothing happened."""
        with self._lock:
            regs = list(self._regs.values())
        fired = False
        for reg in regs:
            if reg.event_id not in (EVENT_ID_BLOCK_JOB, EVENT_ID_BLOCK_JOB_2):
                continue
            for dom in self._domains(reg):
                fired |= self._poll_domain(reg, dom)
        if not fired:
            time.sleep(self.interval if timeout is None else min(self.interval, timeout))

    def _poll_domain(self, reg: _Registration, dom: Any) -> bool:
        jobs = self._jobs(dom)
        live = [j for j in jobs if not j.state.ended]
        if live:
            svc = dom._jobs
            try:
                qjobs = {q.get("id"): q for q in svc.qemu_jobs(dom.name())}
                stale = any(
                    (q := qjobs.get(j.job_id)) is None
                    or q.get("status") == "concluded"
                    or awaits_finalize(j, q.get("status"))
                    or (q.get("status") == "ready" and j.state == JobState.RUNNING)
                    for j in live
                )
                if stale:
                    with dom._driver.monitor(dom.name(), "event loop"):
                        pass  # opening it under the lock reconciles (Driver.on_monitor)
                    jobs = self._jobs(dom)
            except VirtError as err:
                _log.debug("event poll of %s: %s", dom.name(), err)
        fired = False
        for job in jobs:
            if reg.seen.get(job.job_id) == job.state:
                continue
            reg.seen[job.job_id] = job.state
            status = libvirt_event_status(job)
            if status is None:
                continue
            disk: str = job.disk
            if reg.event_id == EVENT_ID_BLOCK_JOB:
                try:
                    d = dom._driver.record(dom.name()).definition.disk(job.disk)
                    disk = (d.source.path if d is not None else None) or job.disk
                except VirtError:
                    pass
            try:
                reg.cb(reg.conn, dom, disk, job.type.libvirt, status, reg.opaque)
            except Exception:
                _log.exception("block job callback failed")
            fired = True
        return fired


_DEFAULT: EventLoop | None = None


def default_loop(create: bool = False) -> EventLoop | None:
    """The loop made by ``virEventRegisterDefaultImpl`` (None before)."""
    global _DEFAULT
    if _DEFAULT is None and create:
        _DEFAULT = EventLoop()
    return _DEFAULT
