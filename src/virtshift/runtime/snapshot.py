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
Every change happens under the domain's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from virtshift.errors import ErrorCode, QMPError, VirtError
from virtshift.model.domain import Domain
from virtshift.model.snapshot import SnapshotDef
from virtshift.model.status import DomainState
from virtshift.ops.snapshot import (
    OverlayPlan,
    PathKind,
    SnapshotPlan,
    apply_overlays,
    check_paths,
    config_after,
    snapshot_sync_arguments,
    transaction_actions,
)
from virtshift.qmp.agent import GuestAgent
from virtshift.qmp.client import Monitor
from virtshift.qmp.models import parse_query_block
from virtshift.runtime.driver import DomainRecord, Driver

__all__ = ["path_kind", "take_snapshot"]

_log = logging.getLogger("virtshift.snapshot")


def path_kind(path: str) -> PathKind:
    """What is at ``path``, without following a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return PathKind.MISSING
    except NotADirectoryError:
        return PathKind.OTHER
    if stat.S_ISLNK(st.st_mode):
        return PathKind.SYMLINK
    if stat.S_ISREG(st.st_mode):
        return PathKind.FILE
    if stat.S_ISBLK(st.st_mode):
        return PathKind.BLOCK
    if stat.S_ISDIR(st.st_mode):
        return PathKind.DIRECTORY
    return PathKind.OTHER


def preflight(plan: SnapshotPlan) -> dict[str, PathKind]:
    """Look at every overlay path and check the plan against it; return the kinds."""
    kinds = {ov.path: path_kind(ov.path) for ov in plan.overlays}
    dirs = {ov.path: os.path.isdir(os.path.dirname(ov.path)) for ov in plan.overlays}
    check_paths(plan, kinds, dirs)
    return kinds


def _remove_created(overlays: list[OverlayPlan] | tuple[OverlayPlan, ...],
                    before: dict[str, PathKind]) -> list[str]:  # fmt: skip
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
    return {d.alias or d.qdev: d.node_name for d in parse_query_block(mon.execute("query-block"))}


def take_live(driver: Driver, rec: DomainRecord, plan: SnapshotPlan, mon: Monitor) -> Domain:
    """Run the QMP part of a snapshot on a running domain; return the new live domain.

    Writes the status (and the persistent definition) only once QEMU has
    switched disks; on failure everything is as before (the transaction path),
    or the error says exactly which disks switched (R3, no transaction).  With
    QUIESCE the guest is frozen just before QEMU is asked and thawed on every
    path; a thaw that fails after a successful snapshot is reported as an
    error that says the snapshot was taken.
    """
    assert rec.status is not None
    before = preflight(plan)
    tops = _tops(mon) if plan.use_transaction else {}
    agent = _agent(rec, plan)
    frozen = False
    done: list[OverlayPlan] = []
    failure: VirtError | None = None
    try:
        if agent is not None:
            agent.freeze()
            frozen = True
        if plan.use_transaction:
            try:
                mon.execute("transaction", {"actions": transaction_actions(plan)})
            except VirtError as err:
                removed = _remove_created(plan.overlays, before)
                _log.info("transaction failed (%s); removed %s", err, removed)
                if isinstance(err, QMPError):
                    check_graph_unchanged(mon, tops)
                raise
            done = list(plan.overlays)
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
    if not done:  # pragma: no cover - every failure above raised
        raise VirtError(ErrorCode.INTERNAL_ERROR, "snapshot switched no disk")
    live = _commit_live(driver, rec, plan, done)
    if failure is not None:
        raise failure
    if thaw_error is not None:
        raise VirtError(
            ErrorCode.OPERATION_FAILED,
            f"the snapshot was taken, but thawing the guest's file systems failed: "
            f"{thaw_error.detail}",
        ) from thaw_error
    return live


def check_graph_unchanged(mon: Monitor, tops: dict[str, str | None]) -> None:
    """After a failed transaction: QEMU must have rolled every disk back."""
    after = _tops(mon)
    if after != tops:
        raise VirtError(
            ErrorCode.INTERNAL_ERROR,
            f"QEMU's block graph changed although the transaction failed "
            f"(before {tops}, after {after})",
        )


def _commit_live(
    driver: Driver, rec: DomainRecord, plan: SnapshotPlan, done: list[OverlayPlan]
) -> Domain:
    assert rec.status is not None
    live = apply_overlays(rec.status.domain, done)
    used = max((ov.index for ov in done), default=rec.status.next_index - 1) + 1
    driver.write_status(
        rec.name,
        dataclasses.replace(rec.status, domain=live, next_index=max(used, rec.status.next_index)),
    )
    if rec.config is not None:
        driver.write_config(rec.name, config_after(rec.config, done))
    return live


def take_offline(driver: Driver, rec: DomainRecord, plan: SnapshotPlan) -> Domain:
    """Create the overlays of an inactive domain with qemu-img; return the new config."""
    assert rec.config is not None
    before = preflight(plan)
    made: list[OverlayPlan] = []
    try:
        for ov in plan.overlays:
            if plan.reuse:
                made.append(ov)
                continue
            base = ov.backing
            assert base.path is not None
            argv = ["qemu-img", "create", "-q", "-f", ov.format, "-b", base.path,
                    "-F", base.format or "raw", ov.path]  # fmt: skip
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


def take_snapshot(driver: Driver, rec: DomainRecord, plan: SnapshotPlan) -> SnapshotDef:
    """Execute ``plan`` on the domain of ``rec`` (lock held by the caller)."""
    if plan.live:
        assert rec.status is not None
        with Monitor(rec.status.monitor).connect() as mon:
            take_live(driver, rec, plan, mon)
    else:
        take_offline(driver, rec, plan)
    return plan.snapshot
