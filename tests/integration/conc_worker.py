"""Workers of the concurrency and load tests: mixes of libvirt calls on real domains.

Each worker records every call it makes as one JSON object (operation, domain,
whether it succeeded, libvirt's error code and message), so the test can check
afterwards that every caller got an answer and that every error has an
expected code.  Observations of the snapshot metadata (the leaf and the current
snapshot seen at one moment) are recorded too: the test checks them against
the final linear order of the snapshots.

The same functions run in threads sharing one connection, or in a process of
their own: ``python conc_worker.py SPEC.json OUT.jsonl`` (SPEC names the URI,
the role and its arguments; OUT gets one line per call, flushed at once, so a
worker that hangs still shows how far it got).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import virtshift.libvirt as libvirt

MiB = 1024 * 1024
DISK_ONLY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
LEAVES = libvirt.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES
PIVOT = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
COPY_SHALLOW = libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
COMMIT_ACTIVE = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
#: Seconds a worker waits for one of its block jobs to become ready.
READY_TIMEOUT = 180.0


class Recorder:
    """Collects call records; writes each to ``out`` (a JSON-lines file) when given."""

    def __init__(self, worker: str, out: Path | None = None) -> None:
        self.worker = worker
        self.records: list[dict[str, Any]] = []
        self._out = out.open("a", buffering=1) if out is not None else None
        self._lock = threading.Lock()

    def note(self, **record: Any) -> None:
        record["worker"] = self.worker
        with self._lock:
            self.records.append(record)
            if self._out is not None:
                self._out.write(json.dumps(record) + "\n")

    def call(self, op: str, domain: str, fn: Callable[[], Any], **extra: Any) -> Any:
        """Run ``fn``; record its outcome and duration; return its result, or None
        after an error."""
        start = time.perf_counter()
        try:
            result = fn()
        except libvirt.libvirtError as err:
            self.note(
                op=op,
                domain=domain,
                ok=False,
                code=err.get_error_code(),
                msg=str(err),
                seconds=time.perf_counter() - start,
                **extra,
            )
            return None
        except Exception as err:  # anything but libvirtError is a defect: record it
            self.note(op=op, domain=domain, ok=False, code=None, msg=repr(err), **extra)
            return None
        self.note(op=op, domain=domain, ok=True, seconds=time.perf_counter() - start, **extra)
        return result

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def snapshot_xml(name: str, overlay: Path) -> str:
    """A disk-only snapshot of vda onto ``overlay`` (created by QEMU); vdb is left out."""
    return (
        f"<domainsnapshot><name>{name}</name><disks>"
        f"<disk name='vda' snapshot='external'><source file='{overlay}'/></disk>"
        "<disk name='vdb' snapshot='no'/>"
        "</disks></domainsnapshot>"
    )


def observe(conn: Any, dom: Any, name: str, rec: Recorder) -> None:
    """The read-only mix: snapshot listings, current snapshot, job info, XML, lists.

    Records the leaf snapshot, then the current one: the test checks that the
    current one is never older than the leaf seen just before it (a torn view
    of the metadata would show the new leaf with the old current, or none)."""
    leaves = rec.call("snapshotListNames", name, lambda: dom.snapshotListNames(LEAVES))
    if leaves:  # snapshots are never deleted here: from now on there is a current one
        current = rec.call("snapshotCurrent", name, lambda: dom.snapshotCurrent(0).getName())
        has = rec.call("hasCurrentSnapshot", name, lambda: dom.hasCurrentSnapshot(0))
        rec.note(op="observed", domain=name, ok=True, leaves=leaves, current=current, has=has)
    snaps = rec.call("listAllSnapshots", name, lambda: dom.listAllSnapshots(0))
    if snaps:
        last = snaps[-1]
        rec.call("snapshotGetXMLDesc", name, lambda: last.getXMLDesc(0))
        rec.call("snapshotLookupByName", name, lambda: dom.snapshotLookupByName(last.getName()))
    rec.call("blockJobInfo", name, lambda: dom.blockJobInfo("vdb", 0))
    rec.call("XMLDesc", name, lambda: dom.XMLDesc(0))
    rec.call("info", name, lambda: dom.info())
    rec.call("listAllDomains", name, lambda: [d.name() for d in conn.listAllDomains(0)])
    rec.call("getVersion", name, lambda: conn.getVersion())


def snapshot_worker(
    conn: Any, rec: Recorder, *, domains: list[str], rounds: int, images: str, tag: str
) -> None:
    """Per round and domain: one disk-only snapshot of vda, then the read-only mix."""
    for i in range(rounds):
        for name in domains:
            dom = rec.call("lookupByName", name, lambda n=name: conn.lookupByName(n))
            if dom is None:
                continue
            snap = f"{tag}-{i}"
            overlay = Path(images) / f"{name}-{snap}.qcow2"
            made = rec.call(
                "snapshotCreateXML",
                name,
                lambda d=dom, s=snap, o=overlay: d.snapshotCreateXML(snapshot_xml(s, o), DISK_ONLY),
                snapshot=snap,
                overlay=str(overlay),
            )
            if made is not None:
                rec.note(op="created", domain=name, ok=True, snapshot=snap, overlay=str(overlay))
            observe(conn, dom, name, rec)


def reader_worker(conn: Any, rec: Recorder, *, domains: list[str], rounds: int) -> None:
    """Only reads, as fast as it can."""
    for _ in range(rounds):
        for name in domains:
            dom = rec.call("lookupByName", name, lambda n=name: conn.lookupByName(n))
            if dom is not None:
                observe(conn, dom, name, rec)


def _wait_ready(dom: Any, name: str, rec: Recorder) -> bool:
    """Poll blockJobInfo like a libvirt program until cur == end (the job is ready)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        info = rec.call("blockJobInfo", name, lambda: dom.blockJobInfo("vdb", 0))
        if info is not None and info and info["cur"] == info["end"]:
            return True
        if info == {}:
            rec.note(op="job vanished", domain=name, ok=False, code=None, msg="no job on vdb")
            return False
        time.sleep(0.05)
    rec.note(op="wait ready", domain=name, ok=False, code=None, msg="job not ready in time")
    return False


def copy_worker(
    conn: Any, rec: Recorder, *, domains: list[str], rounds: int, images: str, bandwidth: int
) -> None:
    """Per round: a throttled shallow copy of vdb on every domain at once, then a pivot
    of each; at the end an active commit of vdb's top into its base, and a pivot."""
    doms = {n: conn.lookupByName(n) for n in domains}

    def finish(started: list[str], what: str) -> None:
        for name in started:
            if _wait_ready(doms[name], name, rec):
                rec.call(
                    "blockJobAbort(pivot)",
                    name,
                    lambda d=doms[name]: d.blockJobAbort("vdb", PIVOT),
                    job=what,
                )

    for r in range(rounds):
        started = []
        for name, dom in doms.items():
            dest = Path(images) / f"{name}-copy{r}.qcow2"
            xml = f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>"
            ok = rec.call(
                "blockCopy",
                name,
                lambda d=dom, x=xml: d.blockCopy("vdb", x, {"bandwidth": bandwidth}, COPY_SHALLOW),
                dest=str(dest),
            )
            if ok is not None:
                started.append(name)
        finish(started, "copy")
    started = [
        name
        for name, dom in doms.items()
        if rec.call(
            "blockCommit",
            name,
            lambda d=dom: d.blockCommit("vdb", None, None, 0, COMMIT_ACTIVE),
        )
        is not None
    ]
    finish(started, "active commit")


ROLES: dict[str, Callable[..., None]] = {
    "snapshot": snapshot_worker,
    "reader": reader_worker,
    "copy": copy_worker,
}


def run(conn: Any, rec: Recorder, role: str, args: dict[str, Any]) -> None:
    """Run one role; an unexpected exception is recorded, never lost."""
    try:
        ROLES[role](conn, rec, **args)
    except Exception as err:
        rec.note(op=f"{role} worker", domain="", ok=False, code=None, msg=repr(err))
    rec.note(op="done", domain="", ok=True)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    rec = Recorder(spec["worker"], Path(argv[2]))
    conn = libvirt.open(spec["uri"])
    try:
        run(conn, rec, spec["role"], spec["args"])
    finally:
        conn.close()
        rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
