"""Taking external disk snapshots, and the snapshot metadata of each domain.

Execution of a :class:`~virtshift.ops.snapshot.SnapshotPlan`:

* running domain, ``transaction`` present: optional guest-agent freeze, one
  ``transaction`` of ``blockdev-snapshot-sync`` actions, thaw.  On failure QEMU
  rolls the graph back, but keeps the overlay file an earlier action created
  (QEMU-NOTES trap 1): every overlay that did not exist before is removed, the
  graph is checked to be as before, and nothing else was written;
* running domain without ``transaction`` (R3): one ``blockdev-snapshot-sync``
  per disk; when disk k fails, disks before it stay on their new overlays, the
  live XML and the persistent definition say so, and the error names them;
* inactive domain: ``qemu-img create -b OLD -F FMT`` per disk, all removed
  again if one fails.

Metadata lives in ``lib/qemu/snapshot/DOMAIN/NAME.xml`` (libvirt's internal
format, with ``<active>`` marking the current one); the tree is rebuilt from
those files on every call, so it survives restarts and is shared by processes.
Every change happens under the domain's lock; its file writes also under the
exclusive metadata lock, which readers take shared (see Driver.metadata_lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtshift import faults
from virtshift.errors import ErrorCode, NoDomainSnapshot, QMPError, VirtError
from virtshift.model.domain import Domain, StorageSource
from virtshift.model.job import JobState
from virtshift.model.snapshot import SnapshotDef, SnapshotMirror
from virtshift.model.snaptree import SnapNode, SnapshotTree
from virtshift.model.status import DomainState, DomainStatus
from virtshift.ops import blockjob as plans
from virtshift.ops.blockjob import (
    COMMIT_ACTIVE,
    COMMIT_DELETE,
    COMMIT_SHALLOW,
    COPY_REUSE_EXT,
    COPY_SHALLOW,
)
from virtshift.ops.snapshot import (
    CreateFlags,
    OverlayPlan,
    PathKind,
    SnapshotPlan,
    apply_overlays,
    check_create_flags,
    check_paths,
    config_after,
    likely_actions,
    plan_snapshot,
    snapshot_sync_arguments,
    transaction_actions,
)
from virtshift.qmp.agent import GuestAgent
from virtshift.qmp.client import Monitor, Pending
from virtshift.qmp.models import parse_query_block
from virtshift.runtime.driver import DomainRecord, Driver, PreparedStatus, domain_from_source
from virtshift.store.files import (
    PreparedFile,
    commit_prepared,
    remove_quietly,
    remove_stale_temps,
    write_atomic,
)
from virtshift.store.images import read_layer
from virtshift.store.snapshots import FileKeyT, IndexEntry, SnapshotStore
from virtshift.xml.domain import format_domain
from virtshift.xml.snapshot import (
    apply_creation_defaults,
    check_snapshot_name,
    format_snapshot,
    head_fields,
    parse_snapshot,
    parse_snapshot_root,
    plain_disk_requests,
    snapshot_from_fields,
    validate_snapshot_xml,
)

if TYPE_CHECKING:
    from lxml import etree

__all__ = ["DeleteFlags", "Snapshots", "path_kind", "take_snapshot"]

_log = logging.getLogger("virtshift.snapshot")


def path_kind(path: str, *, follow: bool = False) -> PathKind:
    """What is at ``path``; a symlink is ``SYMLINK`` unless ``follow``, when it
    is what the link leads to (``MISSING`` for a dangling link)."""
    try:
        st = os.lstat(path)
        if follow and stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
    except FileNotFoundError:
        return PathKind.MISSING
    except NotADirectoryError:
        return PathKind.OTHER
    except OSError as err:
        raise VirtError(
            ErrorCode.SYSTEM_ERROR, f"cannot access '{path}': {err.strerror}", cause=err
        ) from err
    if stat.S_ISLNK(st.st_mode):
        return PathKind.SYMLINK
    if stat.S_ISREG(st.st_mode):
        return PathKind.FILE
    if stat.S_ISBLK(st.st_mode):
        return PathKind.BLOCK
    if stat.S_ISDIR(st.st_mode):
        return PathKind.DIRECTORY
    return PathKind.OTHER


def preflight(plan: SnapshotPlan, domain: Domain) -> dict[str, PathKind]:
    """Look at every overlay path and check the plan against it; return the kinds.

    With REUSE_EXT, each qcow2 overlay's header must name the disk's current
    top (and its format) as its backing file: QEMU attaches the current top
    whatever the header says, but the next start reads the chain from the
    headers, and would then open a file the user never gave.
    """
    paths = [ov.path for ov in plan.overlays] + [
        ov.mirror.path for ov in plan.overlays if ov.mirror is not None
    ]
    # A pre-created (REUSE_EXT) overlay may be reached through a link, as oVirt's
    # block storage domains link each volume to its LV: its target is checked.
    # A new overlay is never created through a link.
    kinds = {p: path_kind(p, follow=plan.reuse) for p in paths}
    dirs = {p: os.path.isdir(os.path.dirname(p)) for p in paths}
    check_paths(plan, kinds, dirs)
    if plan.reuse:
        disks = {d.target: d for d in domain.disks}
        for ov in plan.overlays:
            disk = disks.get(ov.target)
            if ov.format == "qcow2" and disk is not None and disk.source.path is not None:
                _check_reused_backing(ov, disk.source)
    return kinds


def preflight_now(plan: SnapshotPlan, rec: DomainRecord) -> dict[str, PathKind] | None:
    """:func:`preflight` of a live plan before its monitor is used, or None
    when a block job of the domain is unended: the plan is then checked after
    the job is brought up to date (reconcile may change the domain).  (``rec``
    was read under this lock: with no job to bring up to date, reconcile would
    change nothing, and the overlays are looked at while the monitor connects.)"""
    if _job_unended(rec):
        return None
    return preflight(plan, rec.definition)


def _job_unended(rec: DomainRecord) -> bool:
    assert rec.status is not None
    return any(not j.state.ended for j in rec.status.jobs)


def _check_reused_backing(ov: OverlayPlan, top: StorageSource) -> None:
    layer = read_layer(ov.path, "qcow2")
    backing = layer.full_backing_filename
    bfmt = layer.backing_format
    assert top.path is not None
    if (
        backing is None
        or bfmt != (top.format or "raw")
        # the same name is the same file; only other names need resolving
        or (backing != top.path and os.path.realpath(backing) != os.path.realpath(top.path))
    ):
        raise VirtError(
            ErrorCode.OPERATION_INVALID,
            f"external snapshot file for disk {ov.target} ({ov.path}) names backing file "
            f"'{backing}' ({bfmt or 'no format'}), not the current top '{top.path}' "
            f"({top.format or 'raw'}); VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT needs an overlay "
            "of the current top",
        )


def _remove_created(
    overlays: list[OverlayPlan] | tuple[OverlayPlan, ...], before: dict[str, PathKind]
) -> list[str]:
    """Remove overlay files that did not exist before this call; return them."""
    removed = []
    for ov in overlays:
        if before.get(ov.path) == PathKind.MISSING and path_kind(ov.path) == PathKind.FILE:
            try:
                os.unlink(ov.path)
                removed.append(ov.path)
            except OSError as err:
                _log.warning("cannot remove overlay '%s': %s", ov.path, err)
    return removed


def _agent(rec: DomainRecord, plan: SnapshotPlan) -> GuestAgent | None:
    """A connected guest agent when the plan quiesces, else None."""
    if not plan.quiesce:
        return None
    channel = rec.definition.agent_channel
    if channel is None or channel.path is None:
        raise VirtError(
            ErrorCode.AGENT_UNRESPONSIVE,
            f"QEMU guest agent is not configured for domain '{rec.name}'",
        )
    agent = GuestAgent(channel.path)
    agent.connect()
    return agent


def _thaw(agent: GuestAgent | None, frozen: bool) -> VirtError | None:
    """Thaw (when frozen) and close; return the thaw error instead of raising it."""
    if agent is None:
        return None
    try:
        if frozen:
            agent.thaw()
        return None
    except VirtError as err:
        _log.error("thawing the guest failed: %s", err)
        return err
    finally:
        agent.close()


def _tops(mon: Monitor) -> dict[str, str | None]:
    return {
        d.alias: d.node_name
        for d in parse_query_block(mon.execute("query-block"))
        if d.alias is not None
    }


def take_live(
    driver: Driver,
    rec: DomainRecord,
    plan: SnapshotPlan,
    mon: Monitor,
    *,
    kinds: dict[str, PathKind] | None = None,
    window: Sequence[Callable[[], object]] = (),
) -> Domain:
    """Run the QMP part of a snapshot on a running domain; return the new live domain.

    Writes the status (and the persistent definition) only once QEMU has
    switched disks; on failure everything is as before (the transaction path),
    or the error says exactly which disks switched (R3, no transaction).  With
    QUIESCE the guest is frozen just before QEMU is asked and thawed on every
    path; a thaw that fails after a successful snapshot is reported as an
    error that says the snapshot was taken.

    :param kinds: what :func:`preflight` returned for this plan under the same
        lock, if the caller already ran it (each pre-created overlay's header is
        then read once per call, not twice).
    :param window: work of the caller's to do while QEMU reads and runs the
        transaction (not while the guest is frozen), in steps; what a step
        raises is logged and left for the caller to meet again when it does
        the work itself.
    """
    assert rec.status is not None
    before = kinds if kinds is not None else preflight(plan, rec.definition)
    # what QEMU's graph must look like if a transaction fails: our record of each
    # disk's top node (no query before the transaction: it is on the hot path)
    tops: dict[str, str | None] = {
        d.alias: d.source.node_name for d in rec.status.domain.disks if d.alias is not None
    }
    agent = _agent(rec, plan)
    frozen = False
    done: list[OverlayPlan] = []
    failure: VirtError | None = None
    prepared: _Prepared | None = None
    try:
        if agent is not None:
            agent.freeze()
            frozen = True
        if plan.use_transaction:
            faults.point("snapshot-before-transaction")
            try:
                pending: Pending | None = None
                # what the success will write, built while QEMU works (not
                # while the guest is frozen: that must end as soon as QEMU
                # answers)
                work: list[Callable[[], object]] = []
                if agent is None:
                    work.extend(functools.partial(_in_window, step) for step in window)

                    def prepare() -> None:
                        nonlocal prepared
                        prepared = _prepare_commit(driver, rec, plan)

                    work.append(prepare)

                def read_back() -> None:
                    nonlocal prepared
                    assert prepared is not None
                    prepared = dataclasses.replace(
                        prepared, status=driver.read_back(prepared.status)
                    )

                # while QEMU still reads a primed transaction (Monitor.prime),
                # work delays nothing; once it runs the transaction, work competes
                # with it for the CPUs: QEMU gets the rest of the command as soon
                # as it has read the beginning
                while work and mon.unread() > 0:
                    work.pop(0)()
                pending = mon.submit("transaction", {"actions": transaction_actions(plan)})
                for each in work:
                    each()
                if prepared is not None and _spare_cpu() and not pending.done():
                    # what only a next call in this process gains from, while
                    # QEMU still runs the transaction (never before it may)
                    _in_window(read_back)
                pending.result()
            except VirtError as err:
                if not (isinstance(err, QMPError) and err.unanswered and _ran(mon, rec, plan, err)):
                    removed = _remove_created(plan.overlays, before)
                    _log.info("transaction failed (%s); removed %s", err, removed)
                    if isinstance(err, QMPError):
                        check_graph_unchanged(mon, tops)
                    raise
            done = list(plan.overlays)
            faults.point("snapshot-after-transaction")
        else:
            for ov in plan.overlays:
                args = snapshot_sync_arguments(ov, reuse=plan.reuse)
                try:
                    mon.execute("blockdev-snapshot-sync", args)
                except VirtError as err:
                    _remove_created([ov], before)
                    if not done:
                        raise
                    changed = ", ".join(f"'{d.target}' (now on '{d.path}')" for d in done)
                    failure = VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"snapshot of disk '{ov.target}' failed: {err.detail}; without QEMU's "
                        "'transaction' the disks are switched one by one, and these disks "
                        f"were snapshotted and stay on their new overlays: {changed}",
                        cause=err,
                    )
                    break
                done.append(ov)
    finally:
        thaw_error = _thaw(agent, frozen)
        if prepared is not None and not done:
            prepared.status.discard()
    if not done:  # pragma: no cover - every failure above raised
        raise VirtError(ErrorCode.INTERNAL_ERROR, "snapshot switched no disk")
    try:
        live = _commit_live(driver, rec, plan, done, prepared)
    finally:
        if prepared is not None:
            prepared.status.discard()  # (nothing once written)
    if failure is not None:
        raise failure
    if thaw_error is not None:
        raise VirtError(
            ErrorCode.OPERATION_FAILED,
            f"the snapshot was taken, but thawing the guest's file systems failed: "
            f"{thaw_error.detail}",
        ) from thaw_error
    return live


def _primable(plan: SnapshotPlan, rec: DomainRecord) -> bool:
    """True when the monitor's next command is this plan's transaction: no
    unended block job to bring up to date first, no reused mirror to look at
    (a primed command another one comes before is withdrawn: never wrong,
    only wasted)."""
    if _job_unended(rec):
        return False
    return not (plan.reuse and any(ov.mirror is not None for ov in plan.overlays))


def _spare_cpu() -> bool:
    """Whether this process may use more CPUs than the two that QEMU's
    monitor thread and main loop keep busy while a snapshot's transaction is
    read and run.  With only two, parsing the new status back for a next call
    while QEMU runs the transaction took a CPU from QEMU: 7-8 % longer calls
    at 1 and 16 pre-created disks and at 4 created ones, on the 2-CPU machine
    of BENCHMARKS.md."""
    try:
        return len(os.sched_getaffinity(0)) > 2
    except OSError:  # pragma: no cover - Linux always answers for itself
        return False


def _prime_likely(rec: DomainRecord, request: etree._Element, flags: int, monitor: Monitor) -> None:
    """Prime the transaction a plain request most likely takes
    (:func:`likely_actions`), before the request is parsed and planned: at
    16 disks that is a millisecond or two more of QEMU reading the command
    while the call works.  The plan's own prime keeps it if it guessed right
    and replaces it if not; nothing runs before ``submit`` either way."""
    status = rec.status
    if status is None or not status.caps.transaction or _job_unended(rec):
        return
    requested = plain_disk_requests(request)
    if requested is None:
        return
    actions = likely_actions(
        status.domain,
        requested,
        reuse=bool(flags & CreateFlags.REUSE_EXT),
        next_index=status.next_index,
    )
    if actions is not None:
        monitor.prime("transaction", {"actions": actions})


def _in_window(work: Callable[[], object]) -> None:
    try:
        work()
    except Exception:  # the caller does the work again and meets the error then
        _log.debug("work while QEMU ran the transaction failed", exc_info=True)


def _new_tops(rec: DomainRecord, plan: SnapshotPlan) -> dict[str, str]:
    """What QEMU's graph shows per disk alias once the snapshot's transaction ran."""
    assert rec.status is not None
    out = {}
    for ov in plan.overlays:
        disk = rec.status.domain.disk(ov.target)
        if disk is not None and disk.alias is not None:
            out[disk.alias] = ov.new_node
    return out


def _ran(mon: Monitor, rec: DomainRecord, plan: SnapshotPlan, err: QMPError) -> bool:
    """After the reply to ``transaction`` was lost: connect again and look whether
    QEMU carried it out (True) or not (False); raise ``err`` when that cannot be told,
    leaving every file in place (the next call finds out, see recover_intent)."""
    try:
        mon.reconnect()
        now = _tops(mon)
    except VirtError as again:
        _log.error("transaction reply lost and the monitor is gone (%s)", again)
        raise err from again
    new = _new_tops(rec, plan)
    if all(now.get(alias) == node for alias, node in new.items()):
        _log.warning("transaction reply lost; QEMU carried it out: the snapshot stands")
        return True
    return False


def check_graph_unchanged(mon: Monitor, tops: dict[str, str | None]) -> None:
    """After a failed transaction: QEMU must have rolled every disk back."""
    after = _tops(mon)
    if after != tops:
        raise VirtError(
            ErrorCode.INTERNAL_ERROR,
            f"QEMU's block graph changed although the transaction failed "
            f"(before {tops}, after {after})",
        )


def _after_live(
    rec: DomainRecord, done: list[OverlayPlan] | tuple[OverlayPlan, ...]
) -> tuple[DomainStatus, Domain | None]:
    """The status and persistent definition once QEMU switched the disks of ``done``."""
    assert rec.status is not None
    live = apply_overlays(rec.status.domain, list(done))
    used = max((ov.index for ov in done), default=rec.status.next_index - 1) + 1
    status = dataclasses.replace(
        rec.status, domain=live, next_index=max(used, rec.status.next_index)
    )
    config = config_after(rec.config, list(done)) if rec.config is not None else None
    return status, config


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What a snapshot of every overlay of a plan writes once QEMU switched them."""

    domain: Domain
    status: PreparedStatus
    config: str | None


def _prepare_commit(driver: Driver, rec: DomainRecord, plan: SnapshotPlan) -> _Prepared | None:
    """The status and definition documents for when every overlay of ``plan``
    is in place; None if they cannot be built (:func:`_commit_live` then builds
    them again after QEMU's answer and raises what building raises).  The
    status is not read back here (:func:`take_live` does that once QEMU runs
    the transaction)."""
    try:
        status, config = _after_live(rec, list(plan.overlays))
        config_text = format_domain(config, inactive=True) if config is not None else None
        return _Prepared(
            domain=status.domain,
            status=driver.prepare_status(rec.name, status, read_back=False),
            config=config_text,
        )
    except Exception:  # raised again by the path that does not prepare
        _log.debug("preparing the snapshot's documents failed", exc_info=True)
        return None


def _commit_live(
    driver: Driver,
    rec: DomainRecord,
    plan: SnapshotPlan,
    done: list[OverlayPlan],
    prepared: _Prepared | None = None,
) -> Domain:
    if prepared is not None and len(done) == len(plan.overlays):
        driver.write_prepared_status(rec.name, prepared.status)
        if prepared.config is not None:
            driver.write_config(rec.name, text=prepared.config)
        return prepared.domain
    status, config = _after_live(rec, done)
    driver.write_status(rec.name, status)
    if config is not None:
        driver.write_config(rec.name, config)
    return status.domain


# -- the intent of a snapshot, for a process that dies in the middle ----------------------


class SnapshotDocument:
    """A new snapshot's metadata document, formatted once.

    Its ``<domain>`` is what costs: every disk and every layer of the domain.
    When that domain is the definition this process read from its file
    (:meth:`Driver.source_of`), the document is formatted by :meth:`make`,
    which a snapshot calls while QEMU runs its transaction; until then, the
    snapshot's intent keeps the cheap :meth:`parts` instead.  Otherwise the
    document is formatted at once.

    :param snap: the new snapshot (current).
    :param uuid: the domain's UUID.
    :param source: ``(kind, bytes)`` of the file ``snap.domain`` was parsed
        from, or None.
    """

    def __init__(self, snap: SnapshotDef, uuid: str, source: tuple[str, bytes] | None) -> None:
        self._snap = snap
        self._uuid = uuid
        self._source = source
        #: The document, once formatted.
        self.text: str | None = None if source is not None else self._format()

    def _format(self) -> str:
        return format_snapshot(self._snap, internal=True, domain_uuid=self._uuid)

    def make(self) -> str:
        """The document (formatted on the first call)."""
        if self.text is None:
            self.text = self._format()
        return self.text

    def parts(self) -> tuple[str | dict[str, object], str, bytes]:
        """The snapshot without its domain, and the kind and bytes of the file
        the domain was read from: what :meth:`from_parts` formats the same
        document from.  The first part is the snapshot's own values as plain
        fields (:func:`head_fields`: every text checked writable), or, when
        those do not say everything the document holds, the document with
        ``<domain><uuid>`` for its domain, whose formatting checks every
        value.  (The domain's were checked when its file was written.)"""
        assert self._source is not None
        kind, source = self._source
        snap = dataclasses.replace(self._snap, domain=None)
        head: str | dict[str, object] | None = head_fields(snap)
        if head is None:
            head = format_snapshot(snap, internal=True, domain_uuid=self._uuid)
        return head, kind, source

    @staticmethod
    def from_parts(head: str | dict[str, object], kind: str, source: bytes) -> str:
        """The document :meth:`parts` describe."""
        snap = (
            parse_snapshot(head, redefine=True, internal=True)
            if isinstance(head, str)
            else snapshot_from_fields(head)
        )
        domain = domain_from_source(kind, source)
        return format_snapshot(
            dataclasses.replace(snap, domain=domain, domain_uuid=None),
            internal=True,
            domain_uuid=domain.uuid,
        )


def intent_path(driver: Driver, name: str) -> Path:
    """Where a running snapshot's intent is kept (runtime: gone with QEMU)."""
    return driver.domain_run_dir(name) / "snapshot-intent.json"


def _unanswered(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, QMPError) and err.unanswered:
            return True
        err = getattr(err, "cause", None) or err.__cause__
    return False


#: The OverlayPlan fields an intent keeps (all that apply_overlays / config_after read).
_INTENT_FIELDS = ("target", "path", "type", "format", "node", "index", "new_node")


def write_intent(
    driver: Driver,
    rec: DomainRecord,
    plan: SnapshotPlan,
    snapshot: SnapshotDocument | None,
    kinds: dict[str, PathKind] | None = None,
) -> Path:
    """Record, before QEMU is asked, what a snapshot changes: how to tell that QEMU
    carried it out (each disk's new top node), the overlays (from which the status
    and definition that then follow are derived again), the snapshot's metadata
    document (None with NO_METADATA), and the files to remove if it did not.

    The metadata document is kept as it is if it is already formatted; if not,
    as the document without its ``<domain>`` and the file that domain was read
    from (:meth:`SnapshotDocument.parts`), from which :func:`recover_intent`
    formats the same document.

    :param kinds: what :func:`preflight` found at each overlay path, if it ran
        (else each path is looked at here)."""
    data: dict[str, Any] = {
        "new": _new_tops(rec, plan),
        "overlays": [{f: getattr(ov, f) for f in _INTENT_FIELDS} for ov in plan.overlays],
        "snapshot": None,
        "created": [
            ov.path
            for ov in plan.overlays
            if (kinds[ov.path] if kinds is not None else path_kind(ov.path)) == PathKind.MISSING
        ],
    }
    source: tuple[str, bytes] | None = None
    if snapshot is not None:
        if snapshot.text is not None:
            data["snapshot"] = snapshot.text
        else:
            head, kind, data_bytes = snapshot.parts()
            data["snapshot_parts"] = {"head": head, "kind": kind}
            source = (kind, data_bytes)
    path = intent_path(driver, rec.name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if source is not None:
        # as it is, beside the intent (no JSON escaping of a whole status file),
        # and before it: an intent that names it finds it
        driver.keep_source(rec.name, *source, _intent_source(path))
    write_atomic(path, json.dumps(data), durable=False)  # runtime: dies with QEMU
    return path


def _intent_source(path: Path) -> Path:
    """Where the file the snapshot's domain was read from is kept for its
    intent (a hard link to it, as a rule: see :meth:`Driver.keep_source`).

    Left in place when the intent goes: the link is what makes the rename of
    the new status over the old one cheap once QEMU has answered, and its
    removal (the old file's blocks freed) waits for the domain's next
    snapshot, which does it before QEMU is asked, or for the domain's end
    (the run directory goes).  Without an intent beside it, it means nothing."""
    return path.with_name("snapshot-intent.source.xml")


def remove_intent(path: Path) -> None:
    """Remove an intent (what says a snapshot is under way); the domain's file
    kept beside it stays (see :func:`_intent_source`)."""
    remove_quietly(path)


def recover_intent(driver: Driver, name: str) -> None:
    """Finish or undo a snapshot whose process died (or lost the monitor) between
    recording its intent and recording its result (domain lock held).

    QEMU's graph decides: every disk on its new overlay means the transaction ran,
    and the status, definition and metadata recorded in the intent are written
    (completed); otherwise the overlay files the snapshot created are removed
    (rolled back).  Never in between.
    """
    path = intent_path(driver, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return
    # what the dead process wrote while QEMU worked and never put in place
    status_file = driver.status_path(name)
    stale = remove_stale_temps(status_file.parent, {status_file.name}) + remove_stale_temps(
        driver.snapshot_dir(name)
    )
    if stale:
        _log.info("domain '%s': removed %s", name, [str(p) for p in stale])
    rec = driver.record(name)
    if rec.status is None:
        remove_intent(path)
        return
    with Monitor(rec.status.monitor).connect() as mon:
        now = _tops(mon)
    new: dict[str, str] = data["new"]
    if all(now.get(alias) == node for alias, node in new.items()):
        recorded = {d.alias: d.source.node_name for d in rec.status.domain.disks}
        if any(recorded.get(alias) != node for alias, node in new.items()):
            overlays = [OverlayPlan(**ov) for ov in data["overlays"]]
            status, config = _after_live(rec, overlays)
            driver.write_status(name, status)
            if config is not None:
                driver.write_config(name, config)
        text = data.get("snapshot")
        parts = data.get("snapshot_parts")
        if text is None and parts is not None:
            try:
                source = _intent_source(path).read_bytes()
            except OSError as err:
                # (only if someone removed it: it is written before the intent)
                _log.error(
                    "domain '%s': the interrupted snapshot's domain file is gone (%s); "
                    "the snapshot stands without its metadata",
                    name,
                    err.strerror,
                )
            else:
                text = SnapshotDocument.from_parts(parts["head"], parts["kind"], source)
        if text is not None:
            _record_recovered(driver, rec, text)
        _log.warning("domain '%s': an interrupted snapshot was completed", name)
    else:
        for p in data["created"]:
            if path_kind(p) == PathKind.FILE:
                os.unlink(p)
        _log.warning("domain '%s': an interrupted snapshot was rolled back", name)
    remove_intent(path)


def _record_recovered(driver: Driver, rec: DomainRecord, text: str) -> None:
    """Add the metadata of a snapshot whose transaction ran (as create would have)."""
    snaps = Snapshots(driver)
    tree, defs = snaps.load(rec.name)
    snap = parse_snapshot(text, redefine=True, internal=True)
    assert snap.name is not None
    if snap.name in tree:
        return
    new = tree.add(_node(snap), make_current=True)
    with snaps._changing(rec.name, "snapshot-create recovery"):
        defs[snap.name] = snap
        snaps._sync(rec.name, rec.definition.uuid, tree, new, defs)


def take_offline(driver: Driver, rec: DomainRecord, plan: SnapshotPlan) -> Domain:
    """Create the overlays of an inactive domain with qemu-img; return the new config."""
    assert rec.config is not None
    before = preflight(plan, rec.definition)
    made: list[OverlayPlan] = []
    try:
        for ov in plan.overlays:
            if plan.reuse:
                made.append(ov)
                continue
            base = ov.backing
            assert base.path is not None
            argv = [
                "qemu-img",
                "create",
                "-q",
                "-f",
                ov.format,
                "-b",
                base.path,
                "-F",
                base.format or "raw",
                ov.path,
            ]
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            made.append(ov)
            if res.returncode != 0:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"cannot create overlay '{ov.path}' for disk '{ov.target}': "
                    f"{res.stderr.strip()}",
                )
    except BaseException:
        _remove_created(made, before)
        raise
    config = config_after(rec.config, list(plan.overlays))
    driver.write_config(rec.name, config)
    return config


def state_word(rec: DomainRecord) -> str:
    """The domain state as a snapshot records it."""
    if rec.status is None:
        return "shutoff"
    return "paused" if rec.status.state == DomainState.PAUSED else "running"


def now() -> int:
    return int(time.time())


def qmp_summary(actions: list[dict[str, Any]]) -> str:
    """A one-line description of a transaction for logs."""
    return ", ".join(f"{a['data']['node-name']}->{a['data']['snapshot-file']}" for a in actions)


def ensure_snapshot_dir(driver: Driver, name: str) -> Path:
    path = driver.snapshot_dir(name)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def take_snapshot(
    driver: Driver,
    rec: DomainRecord,
    plan: SnapshotPlan,
    *,
    window: Sequence[Callable[[], object]] = (),
    monitor: Monitor | None = None,
    kinds: dict[str, PathKind] | None = None,
) -> SnapshotDef:
    """Execute ``plan`` on the domain of ``rec`` (lock held by the caller).

    ``window``: see :func:`take_live`.  ``monitor``: the domain's monitor,
    if the caller started connecting it (:meth:`Monitor.connect_soon`).
    ``kinds``: what :func:`preflight` returned for ``plan`` under this lock,
    if the caller ran it (it must not with an unended block job: see
    :func:`preflight_now`).

    A disk with a ``<mirror>`` (R5) gets its mirror job right after the
    transaction; if the job cannot start, the snapshot is undone (each new
    overlay is committed back into its backing and pivoted away), what was
    created is removed, and the error is raised: ATOMIC still holds.
    """
    if not plan.live:
        take_offline(driver, rec, plan)
        return plan.snapshot
    assert rec.status is not None
    from virtshift.runtime.blockjob import BlockJobOps

    jobs = BlockJobOps(driver)
    before = kinds if kinds is not None else preflight_now(plan, rec)
    with monitor if monitor is not None else Monitor(rec.status.monitor) as mon:
        if before is None:
            jobs.reconcile(rec.name, mon)
            rec = driver.record(rec.name)
            before = preflight(plan, rec.definition)
        if plan.reuse and any(ov.mirror is not None for ov in plan.overlays):
            _check_reused_mirrors(plan, mon, rec)
        take_live(driver, rec, plan, mon, kinds=before, window=window)
        mirrored = [ov for ov in plan.overlays if ov.mirror is not None]
        for ov in mirrored:
            assert ov.mirror is not None
            dest = StorageSource(
                type=ov.mirror.type, path=ov.mirror.path, format=ov.mirror.format or "qcow2"
            )
            flags = COPY_SHALLOW | (COPY_REUSE_EXT if plan.reuse else 0)
            try:
                st = driver.record(rec.name).status
                assert st is not None
                jobs.start_copy(
                    rec.name,
                    mon,
                    st,
                    ov.target,
                    dest,
                    flags=flags,
                    bandwidth=0,
                    granularity=None,
                    buf_size=None,
                    snapshot=plan.snapshot.name,
                )
            except VirtError as err:
                if _unanswered(err) and _mirror_started(jobs, rec.name, mon, ov.target, err):
                    continue
                _log.error(
                    "mirror of disk '%s' did not start (%s): undoing the snapshot", ov.target, err
                )
                undo_overlays(driver, rec, plan, mon, before)
                raise VirtError(
                    err.code,
                    f"{err.detail}; the mirror of disk '{ov.target}' could not start, so the "
                    "snapshot was undone and nothing changed",
                ) from err
    return plan.snapshot


def _mirror_started(jobs: Any, name: str, mon: Monitor, target: str, err: VirtError) -> bool:
    """After the reply to a mirror's start was lost: connect again and let reconcile
    adopt the job (True: QEMU started it) or forget it and its files (False).
    Raises ``err`` when QEMU cannot be asked."""
    try:
        mon.reconnect()
        jobs.reconcile(name, mon)
    except VirtError as again:
        raise err from again
    st = jobs.driver.record(name).status
    return st is not None and any(
        j.disk == target and not j.state.ended and j.state != JobState.NEW for j in st.jobs
    )


def _check_reused_mirrors(plan: SnapshotPlan, mon: Monitor, rec: DomainRecord) -> None:
    """A reused mirror must be an image of the stated format and of the disk's
    virtual size; checked before the snapshot so that a bad one changes nothing."""
    sizes = {
        d.alias: d.chain[0].virtual_size
        for d in parse_query_block(mon.execute("query-block"))
        if d.chain
    }
    from virtshift.runtime.blockjob import usable_image

    for ov in plan.overlays:
        if ov.mirror is None:
            continue
        disk = rec.definition.disk(ov.target)
        want_fmt = ov.mirror.format or "qcow2"
        what = f"mirror '{ov.mirror.path}' of disk '{ov.target}'"
        size = usable_image(ov.mirror.path, want_fmt, what).virtual_size
        want = sizes.get(disk.alias if disk is not None else None)
        if want is not None and size != want:
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"mirror '{ov.mirror.path}' of disk '{ov.target}' has virtual size {size}, "
                f"the disk {want}",
            )


def _job_event(job_id: str, *names: str) -> Callable[[dict[str, Any]], bool]:
    def match(event: dict[str, Any]) -> bool:
        data = event.get("data")
        return (
            event.get("event") in names and isinstance(data, dict) and data.get("device") == job_id
        )

    return match


def undo_overlays(
    driver: Driver,
    rec: DomainRecord,
    plan: SnapshotPlan,
    mon: Monitor,
    before: dict[str, PathKind],
) -> None:
    """Take the snapshot's overlays out again: active commit of each new overlay into
    its old top, pivot, then restore the status and definition and remove the files.
    Guest writes made meanwhile end up in the old top: nothing is lost."""
    assert rec.status is not None
    for ov in plan.overlays:
        jid = f"undo-{ov.target}-{ov.new_node}"
        mon.execute(
            "block-commit",
            {
                "job-id": jid,
                "device": ov.new_node,
                "top-node": ov.new_node,
                "base-node": ov.node,
                "auto-dismiss": False,
            },
        )
        ready = mon.wait_event(_job_event(jid, "BLOCK_JOB_READY"), timeout=60)
        if ready is None:
            raise VirtError(
                ErrorCode.INTERNAL_ERROR,
                f"undo of the snapshot of disk '{ov.target}' "
                "did not become ready; the disk stays on its new overlay",
            )
        mon.execute("block-job-complete", {"device": jid})
        done = mon.wait_event(
            _job_event(jid, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), timeout=60
        )
        mon.execute("job-dismiss", {"id": jid})
        if done is None or done["data"].get("error"):
            raise VirtError(
                ErrorCode.INTERNAL_ERROR,
                f"undo of the snapshot of disk '{ov.target}' "
                f"failed: {done['data'].get('error') if done else 'no end'}",
            )
    current = driver.record(rec.name).status
    assert current is not None
    driver.write_status(
        rec.name, dataclasses.replace(rec.status, jobs=current.jobs, next_index=current.next_index)
    )
    if rec.config is not None:
        driver.write_config(rec.name, rec.config)
    _remove_created(plan.overlays, before)
    _remove_created(
        [dataclasses.replace(ov, path=ov.mirror.path) for ov in plan.overlays if ov.mirror],
        before,
    )


# -- the snapshot service: metadata, tree, create, delete ----------------------------


class Definitions(MutableMapping[str, SnapshotDef]):
    """The snapshot definitions of one :meth:`Snapshots.load`, by name, parsed
    when first asked for (the tree needs none of them: it comes from the index).

    Callers that change metadata hold the domain lock, so a definition read
    later is the one the tree was built from; :meth:`Snapshots.get` asks for its
    definition inside the load instead.
    """

    def __init__(self, parse: Callable[[str], SnapshotDef], files: dict[str, str]) -> None:
        self._parse = parse
        #: Snapshot name -> document name (file stem); they differ only in
        #: hand-placed files.
        self._files = files
        self._defs: dict[str, SnapshotDef] = {}

    def __getitem__(self, name: str) -> SnapshotDef:
        hit = self._defs.get(name)
        if hit is None:
            hit = self._parse(self._files[name])  # KeyError: no such snapshot
            self._defs[name] = hit
        return hit

    def __setitem__(self, name: str, snap: SnapshotDef) -> None:
        self._files.setdefault(name, name)
        self._defs[name] = snap

    def __delitem__(self, name: str) -> None:
        del self._files[name]
        self._defs.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@dataclasses.dataclass
class _Staged:
    """Snapshot metadata written under temporary names (:meth:`Snapshots._stage`)."""

    files: list[PreparedFile] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    index: PreparedFile | None = None

    def discard(self) -> None:
        """Remove what was not put in place (safe to call twice)."""
        for f in self.files:
            f.discard()
        if self.index is not None:
            self.index.discard()


class Snapshots:
    """Snapshot metadata and operations of the domains of one driver.

    The tree is rebuilt from the metadata files on every call, so processes
    never disagree about it.  What each file says about the tree is cached in
    the store's index (checked against each file's inode, size and mtime), and
    a definition is parsed only when it is used, once per file version and
    connection.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self._parsed: dict[tuple[str, str], tuple[FileKeyT, SnapshotDef]] = {}

    def store(self, domain: str) -> SnapshotStore:
        return SnapshotStore(self.driver.snapshot_dir(domain))

    def _parse(self, domain: str, document: str, key: FileKeyT | None = None) -> SnapshotDef:
        """The definition in ``document`` (parsed once per file version).

        :raise NoDomainSnapshot: the file is gone.
        """
        store = self.store(domain)
        if key is None:
            key = store.key(document)
        hit = self._parsed.get((domain, document))
        if hit is not None and hit[0] == key:
            return hit[1]
        snap = parse_snapshot(store.read(document), redefine=True, internal=True)
        self._parsed[(domain, document)] = (key, snap)
        return snap

    def load(
        self, domain: str, *, need: tuple[str, ...] = (), domain_locked: bool = False
    ) -> tuple[SnapshotTree, Definitions]:
        """The domain's snapshot tree and definitions, as of one moment (the files
        are read under the shared metadata lock: no change is seen half-done).

        :param need: names whose definitions are parsed under that lock too.
        :param domain_locked: the caller holds the domain lock.  Every writer of
            the metadata holds it too, so nothing changes while it is held and
            the shared metadata lock is not taken.
        """
        store = self.store(domain)
        entries: dict[str, IndexEntry] = {}
        defs: dict[str, SnapshotDef] = {}
        reading = (
            contextlib.nullcontext()
            if domain_locked
            else self.driver.metadata_lock(domain, shared=True).hold("read")
        )
        with reading:
            keys = store.keys()
            index = store.read_index()
            stale = index.keys() != keys.keys()
            for document, key in keys.items():
                hit = index.get(document)
                if hit is not None and hit.key == key and document not in need:
                    entries[document] = hit
                    continue
                try:
                    snap = self._parse(domain, document, key)
                except NoDomainSnapshot:
                    stale = True
                    continue
                entry = IndexEntry(key=key, node=_node(snap), current=bool(snap.current))
                stale = stale or entry != hit
                entries[document] = entry
                defs[entry.node.name] = snap
            if stale:
                store.write_index(entries)
        # forget removed documents (list() copies at once: other threads may add)
        for cached in [k for k in list(self._parsed) if k[0] == domain and k[1] not in keys]:
            self._parsed.pop(cached, None)
        currents = sorted(
            (e.node for e in entries.values() if e.current), key=lambda n: n.creation_time
        )
        tree = SnapshotTree(
            [e.node for e in entries.values()], current=currents[-1].name if currents else None
        )
        out = Definitions(
            lambda document: self._parse(domain, document),
            {e.node.name: document for document, e in entries.items()},
        )
        for name, snap in defs.items():
            out[name] = snap
        return tree, out

    def _changing(self, domain: str, operation: str) -> contextlib.AbstractContextManager[None]:
        """Hold the exclusive metadata lock for the writes of one change."""
        return self.driver.metadata_lock(domain, shared=False).hold(operation)

    def _sync(
        self,
        domain: str,
        uuid: str,
        old: SnapshotTree,
        new: SnapshotTree,
        defs: MutableMapping[str, SnapshotDef],
        *,
        rewrite: str | None = None,
        formatted: Mapping[str, str] | None = None,
    ) -> None:
        """Write the files whose parent or current flag changed between two trees
        (and ``rewrite``'s in any case), remove those of removed snapshots, and
        bring the index up to date with them.

        :param formatted: documents already formatted for ``new`` (a new
            snapshot's, made once for its intent and its file), by name.

        The caller holds the domain lock and the exclusive metadata lock
        (:meth:`_changing`), so readers see all of these writes or none."""
        staged = self._stage(domain, uuid, old, new, defs, rewrite=rewrite, formatted=formatted)
        try:
            self._commit_staged(domain, staged)
        finally:
            staged.discard()

    def _stage(
        self,
        domain: str,
        uuid: str,
        old: SnapshotTree,
        new: SnapshotTree,
        defs: MutableMapping[str, SnapshotDef],
        *,
        rewrite: str | None = None,
        formatted: Mapping[str, str] | None = None,
    ) -> _Staged:
        """What :meth:`_sync` writes, written and synced under temporary names
        (needs the domain lock only: nothing is in place until
        :meth:`_commit_staged`).  The caller commits or discards it."""
        store = self.store(domain)
        staged = _Staged()
        try:
            written: dict[str, IndexEntry] = {}
            for name, node in new.nodes.items():
                before = old.nodes.get(name)
                changed_parent = before is None or before.parent != node.parent
                changed_current = (old.current == name) != (new.current == name)
                if changed_parent or changed_current or name == rewrite:
                    current = new.current == name
                    text = formatted.get(name) if formatted else None
                    if text is None and not changed_parent and name != rewrite:
                        # only <active> differs: the document's last line, no need to
                        # parse and format the whole definition (its <domain>) again
                        text = _with_active(store.read(name), current)
                    if text is None:
                        snap = dataclasses.replace(defs[name], parent=node.parent, current=current)
                        text = format_snapshot(snap, internal=True, domain_uuid=uuid)
                    file = store.prepare(name, text)
                    staged.files.append(file)
                    # a rename keeps inode, size and mtime: the key once in place
                    written[name] = IndexEntry(key=file.key, node=node, current=current)
            staged.removed = [name for name in old.nodes if name not in new.nodes]
            if written or staged.removed:
                index = store.read_index()
                index.update(written)
                for name in staged.removed:
                    index.pop(name, None)
                staged.index = store.prepare_index(index)
        except BaseException:
            staged.discard()
            raise
        return staged

    def _commit_staged(self, domain: str, staged: _Staged) -> None:
        """Put what :meth:`_stage` wrote in place (the caller holds the domain
        lock and the exclusive metadata lock)."""
        store = self.store(domain)
        commit_prepared(staged.files)
        for name in staged.removed:
            store.remove(name)
        if staged.index is not None:
            with contextlib.suppress(VirtError):  # only a cache
                staged.index.commit()

    # -- create -----------------------------------------------------------------

    def create(self, domain: str, xml: str, flags: int) -> tuple[SnapshotDef, bool]:
        """snapshotCreateXML; return the snapshot and whether metadata was kept."""
        if flags & CreateFlags.VALIDATE:
            validate_snapshot_xml(xml)
        with self.driver.locked(domain, "snapshot-create") as rec:
            check_create_flags(flags, active=rec.active)
            if flags & CreateFlags.REDEFINE:
                return self._redefine(rec, xml, flags), True
            if rec.status is None:
                return self._create(rec, xml, flags, None)
            # QEMU greets and negotiates while the request is parsed and planned
            monitor = Monitor(rec.status.monitor).connect_soon()
            try:
                return self._create(rec, xml, flags, monitor)
            finally:
                monitor.close()

    def _create(
        self, rec: DomainRecord, xml: str, flags: int, monitor: Monitor | None
    ) -> tuple[SnapshotDef, bool]:
        """:meth:`create` of a new snapshot, domain lock held; ``monitor``: the
        running domain's, being connected."""
        domain = rec.name
        request = parse_snapshot_root(xml)
        if monitor is not None:
            _prime_likely(rec, request, flags, monitor)
        tree, defs = self.load(domain, domain_locked=True)
        snap = apply_creation_defaults(parse_snapshot(request), creation_time=now())
        assert snap.name is not None
        check_snapshot_name(snap.name)
        if snap.name in tree:
            raise VirtError(ErrorCode.OPERATION_FAILED, f"domain moment {snap.name} already exists")
        before = rec.definition
        plan = plan_snapshot(
            before,
            snap,
            flags=flags,
            caps=rec.status.caps if rec.status is not None else None,
            next_index=rec.status.next_index if rec.status is not None else 1,
            parent=tree.current,
            creation_time=snap.creation_time or now(),
            state=state_word(rec),
        )
        plan = dataclasses.replace(
            plan, snapshot=dataclasses.replace(plan.snapshot, domain=rec.config or before)
        )
        transaction = plan.live and plan.use_transaction
        if transaction and monitor is not None and _primable(plan, rec):
            # QEMU reads the command while the overlays are checked and the
            # intent is written; it runs only once take_live sends the rest
            # (primed already, unless the guess above was wrong or not made)
            monitor.prime("transaction", {"actions": transaction_actions(plan)})
        # the new snapshot's document, formatted once (for the intent and its
        # file): while QEMU runs the transaction when the intent can do
        # without it, else now
        document = (
            SnapshotDocument(
                dataclasses.replace(plan.snapshot, current=True),
                before.uuid,
                self.driver.source_of(domain, plan.snapshot.domain)
                if transaction and plan.snapshot.domain is not None
                else None,
            )
            if plan.metadata
            else None
        )
        intent = None
        kinds = None
        if transaction:
            # the overlays are checked first: bad input never leaves an intent
            kinds = preflight_now(plan, rec)
            # a process that dies from here on leaves this for the next call
            intent = write_intent(self.driver, rec, plan, document, kinds)
        new = tree.add(_node(plan.snapshot), make_current=True) if document is not None else tree
        staged: list[_Staged] = []

        # while QEMU works: the document, then the metadata files it changes
        # (the new snapshot's, the old current one's, the index), written and
        # synced under temporary names
        def make() -> None:
            assert document is not None
            document.make()

        def stage() -> None:
            assert document is not None
            assert snap.name is not None
            text = document.make()
            defs[snap.name] = plan.snapshot
            staged.append(
                self._stage(domain, before.uuid, tree, new, defs, formatted={snap.name: text})
            )

        try:
            take_snapshot(
                self.driver,
                rec,
                plan,
                window=(make, stage) if document is not None else (),
                monitor=monitor,
                kinds=kinds,
            )
            faults.point("snapshot-before-metadata")
            if document is not None:
                # writes the new snapshot and the old current one (no longer current)
                with self._changing(domain, "snapshot-create"):
                    if staged:
                        self._commit_staged(domain, staged[0])
                    else:  # not staged while QEMU worked (QUIESCE, or it failed)
                        defs[snap.name] = plan.snapshot
                        text = document.make()
                        self._sync(
                            domain, before.uuid, tree, new, defs, formatted={snap.name: text}
                        )
        except BaseException as err:
            if intent is not None and not _unanswered(err):
                remove_intent(intent)
            raise
        finally:
            for each in staged:
                each.discard()
        if intent is not None:
            remove_intent(intent)
        return plan.snapshot, plan.metadata

    def _redefine(self, rec: DomainRecord, xml: str, flags: int) -> SnapshotDef:
        snap = parse_snapshot(xml, redefine=True)
        assert snap.name is not None
        check_snapshot_name(snap.name)
        uuid = rec.definition.uuid
        recorded_uuid = snap.domain.uuid if snap.domain is not None else snap.domain_uuid
        if recorded_uuid and recorded_uuid.lower() != uuid.lower():
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"definition for snapshot {snap.name} must use uuid {uuid}",
            )
        if flags & CreateFlags.DISK_ONLY and snap.state != "disk-snapshot":
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"disk-only flag for snapshot {snap.name} requires disk-snapshot state",
            )
        tree, defs = self.load(rec.name)
        old = defs.get(snap.name)
        if old is not None and (old.state == "disk-snapshot") != (snap.state == "disk-snapshot"):
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"cannot change between disk only and full system in snapshot {snap.name}",
            )
        new = tree.redefine(_node(snap), make_current=bool(flags & CreateFlags.CURRENT))
        defs[snap.name] = snap
        with self._changing(rec.name, "snapshot-create redefine"):
            self._sync(rec.name, uuid, tree, new, defs, rewrite=snap.name)
        return snap

    # -- queries ---------------------------------------------------------------

    def tree_with(self, domain: str, name: str) -> SnapshotTree:
        """The tree, which has ``name`` (no definition is parsed).

        :raise NoDomainSnapshot: with libvirt's message, when it has not.
        """
        tree, _defs = self.load(domain)
        tree.get(name)
        return tree

    def get(self, domain: str, name: str) -> tuple[SnapshotDef, SnapshotTree]:
        tree, defs = self.load(domain, need=(name,))
        tree.get(name)  # raises NoDomainSnapshot with libvirt's message
        return defs[name], tree

    def set_current(self, domain: str, name: str) -> None:
        with self.driver.locked(domain, "snapshot-current") as rec:
            tree, defs = self.load(domain)
            with self._changing(domain, "snapshot-current"):
                self._sync(domain, rec.definition.uuid, tree, tree.set_current(name), defs)

    # -- delete -------------------------------------------------------------------

    def delete(self, domain: str, name: str, flags: int) -> list[str]:
        """Delete a snapshot (and/or its children); return the names removed.

        * METADATA_ONLY: only the metadata goes;
        * REOPEN_MIRROR (the proposal's R7): pivot every mirrored disk of the
          current snapshot onto its verified mirror, then drop the snapshot;
        * otherwise the data of an external snapshot is merged the way libvirt
          9 does: the overlay the snapshot created is committed into the image
          it captured and deleted (active commit + pivot when it is the active
          layer).
        """
        known = DeleteFlags.CHILDREN | DeleteFlags.METADATA_ONLY | DeleteFlags.CHILDREN_ONLY
        if flags & ~int(known | DeleteFlags.REOPEN_MIRROR):
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"unsupported flags (0x{flags & ~int(known | DeleteFlags.REOPEN_MIRROR):x}) in "
                "function virDomainSnapshotDelete",
            )
        if flags & DeleteFlags.REOPEN_MIRROR:
            if flags & known:
                raise VirtError(
                    ErrorCode.INVALID_ARG,
                    "VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR cannot be combined with other flags",
                )
            return self._reopen_mirror(domain, name)
        with self.driver.locked(domain, "snapshot-delete") as rec:
            tree, defs = self.load(domain)
            new, removed = tree.delete(
                name,
                children=bool(flags & DeleteFlags.CHILDREN),
                children_only=bool(flags & DeleteFlags.CHILDREN_ONLY),
            )
            if not flags & DeleteFlags.METADATA_ONLY:
                external = [n for n in removed if defs[n].is_external]
                if len(external) > 1 or (external and tree.children(external[0])):
                    raise VirtError(
                        ErrorCode.CONFIG_UNSUPPORTED,
                        "deletion of external disk snapshots with children not supported; "
                        "delete the children first, or only the metadata "
                        "(VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)",
                    )
                if external:
                    self._merge(rec, defs[external[0]])
            with self._changing(domain, "snapshot-delete"):
                self._sync(domain, rec.definition.uuid, tree, new, defs)
            return removed

    def _merge(self, rec: DomainRecord, snap: SnapshotDef) -> None:
        """Commit each overlay the snapshot created into the image it captured."""
        from virtshift.runtime.blockjob import BlockJobOps

        if rec.status is None:
            raise VirtError(
                ErrorCode.OPERATION_INVALID,
                "deleting the data of an external snapshot needs a running domain; delete "
                "only the metadata (VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY) or start it",
            )
        live = rec.status.domain
        work: list[tuple[str, str, bool]] = []  # (disk, overlay path, is active layer)
        for sd in snap.disks:
            if not sd.is_external or sd.path is None:
                continue
            disk = live.disk(sd.name)
            chain = disk.source.chain() if disk is not None else []
            pos = next((i for i, x in enumerate(chain) if x.path == sd.path), None)
            if disk is None or pos is None or pos + 1 >= len(chain):
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    f"deletion of non-leaf external snapshot that is not in active chain is not "
                    f"supported (disk '{sd.name}', overlay '{sd.path}')",
                )
            work.append((disk.target, sd.path, pos == 0))
        jobs = BlockJobOps(self.driver)
        with Monitor(rec.status.monitor).connect() as mon:
            jobs.reconcile(rec.name, mon)
            for target, path, active in work:
                st = self.driver.record(rec.name).status
                assert st is not None
                commit_flags = COMMIT_SHALLOW | COMMIT_DELETE | (COMMIT_ACTIVE if active else 0)
                plan = plans.plan_commit(
                    st.domain,
                    target,
                    None,
                    path,
                    bandwidth=0,
                    flags=commit_flags,
                    jobs=st.jobs,
                    now=now(),
                )
                job = jobs.start(rec.name, mon, plan)
                if active:
                    job = jobs.wait_ready_locked(rec.name, mon, job)
                    jobs.pivot(rec.name, mon, job)
                else:
                    jobs.wait_end_locked(rec.name, mon, job)

    def _reopen_mirror(self, domain: str, name: str) -> list[str]:
        from virtshift.runtime.blockjob import BlockJobOps

        with self.driver.locked(domain, "snapshot-delete reopen-mirror") as rec:
            tree, defs = self.load(domain)
            snap = defs.get(name)
            if snap is None:
                tree.get(name)  # raises NoDomainSnapshot
            assert snap is not None
            if tree.current != name:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"snapshot '{name}' is not the current snapshot; "
                    "VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR needs the current one",
                )
            mirrored = [d for d in snap.disks if d.mirror is not None]
            if not mirrored:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID, f"snapshot '{name}' has no mirrored disk"
                )
            if rec.status is None:
                raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
            jobs = BlockJobOps(self.driver)
            with Monitor(rec.status.monitor).connect() as mon:
                jobs.reconcile(domain, mon)
                st = self.driver.record(domain).status
                assert st is not None
                todo = []
                for d in mirrored:
                    job = next(
                        (
                            j
                            for j in st.jobs
                            if j.snapshot == name and j.disk == d.name and not j.state.ended
                        ),
                        None,
                    )
                    if job is None and _pivoted_onto(st.domain, d.name, d.mirror):
                        # an earlier REOPEN_MIRROR pivoted this disk and then died or
                        # lost the monitor: only the snapshot is left to drop
                        continue
                    if job is None:
                        raise VirtError(
                            ErrorCode.OPERATION_INVALID,
                            f"the mirror of disk '{d.name}' of snapshot '{name}' is not running",
                        )
                    if job.state != JobState.READY:
                        raise VirtError(
                            ErrorCode.BLOCK_COPY_ACTIVE,
                            f"block job '{d.name}' not ready for pivot yet",
                        )
                    todo.append(job)
                for job in todo:
                    jobs.pivot(domain, mon, job)
            new, removed = tree.delete(name, children=False, children_only=False)
            with self._changing(domain, "snapshot-delete"):
                self._sync(domain, rec.definition.uuid, tree, new, defs)
            return removed


def _pivoted_onto(live: Domain, target: str, mirror: SnapshotMirror | None) -> bool:
    """True when disk ``target`` already runs on ``mirror``'s file."""
    disk = live.disk(target)
    path = mirror.path if mirror is not None else None
    return (
        disk is not None and disk.mirror is None and path is not None and (disk.source.path == path)
    )


class DeleteFlags(enum.IntFlag):
    """``virDomainSnapshotDeleteFlags``; REOPEN_MIRROR is virtshift's (the proposal's)."""

    CHILDREN = 1
    METADATA_ONLY = 2
    CHILDREN_ONLY = 4
    REOPEN_MIRROR = 8


_ACTIVE_END = ("  <active>{}</active>\n</domainsnapshot>\n").format


def _with_active(text: str, current: bool) -> str | None:
    """``text`` (an internal-form document) with its ``<active>`` set to ``current``;
    None unless the document ends with that element as :func:`format_snapshot` writes it."""
    for was in (_ACTIVE_END(1), _ACTIVE_END(0)):
        if text.endswith(was):
            return text[: -len(was)] + _ACTIVE_END(1 if current else 0)
    return None


def _node(snap: SnapshotDef) -> SnapNode:
    assert snap.name is not None
    return SnapNode(
        name=snap.name,
        parent=snap.parent,
        creation_time=snap.creation_time or 0,
        state=snap.state or "disk-snapshot",
        external=snap.is_external,
    )
