"""Many callers at once on real QEMU: processes, threads sharing a connection, many domains.

Workers (``conc_worker.py``) take disk-only snapshots of vda, read the snapshot
metadata, the XML and the job of vdb, while a copier runs throttled shallow
copies of vdb with pivots and an active commit.  Afterwards, for every domain:

* every call either succeeded or raised a libvirtError with a listed code, and
  every worker finished (a worker still running after the overall timeout is
  killed and the test fails);
* every snapshot a worker reported created is in the metadata exactly once, the
  snapshots form one linear chain in creation order, the current one is its
  leaf, and every metadata file parses;
* QEMU's real backing chain of vda (query-block) and the chain read from the
  files on disk are the snapshots' overlays in that order; the live XML shows
  QEMU's graph for every disk; no overlay of a failed snapshot exists;
* no lock is held and no temporary file is left;
* no reader ever saw the metadata between two states (a current snapshot
  older than the leaf it had just listed, or none).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from . import conc_worker
from .conftest import domain_xml, make_image

MiB = 1024 * 1024
WORKER = Path(conc_worker.__file__)
#: Seconds every worker of one test together may take before they are killed.
OVERALL_TIMEOUT = 600.0

#: The error codes a caller may get while others work on the same domain:
#: a lock wait longer than VIRTSHIFT_LOCK_TIMEOUT.  Nothing else is expected.
ALLOWED_CODES: dict[str, set[int]] = {"*": {libvirt.VIR_ERR_OPERATION_TIMEOUT}}


# -- setting up ------------------------------------------------------------------


def make_domain(conn: Any, images: Path, name: str, memory_mib: int = 128) -> Any:
    """vda: one empty image; vdb: a 32 MiB top with 8 MiB of data over a base."""
    vda = make_image(images / f"{name}-vda.qcow2")
    base = make_image(images / f"{name}-vdb-base.qcow2", size="32M")
    top = make_image(images / f"{name}-vdb-top.qcow2", size="32M", backing=base)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(top)],
        check=True,
        capture_output=True,
    )
    xml = domain_xml(name, [("vda", vda, "qcow2"), ("vdb", top, "qcow2")])
    xml = xml.replace(
        "<memory unit='MiB'>128</memory>", f"<memory unit='MiB'>{memory_mib}</memory>"
    )
    dom = conn.defineXML(xml)
    dom.create()
    return dom


# -- running workers -------------------------------------------------------------


def run_processes(uri: str, specs: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    """Run each spec in its own process; return all records.  Fails (after killing
    them) when the workers do not all end within OVERALL_TIMEOUT."""
    work.mkdir(exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    for spec in specs:
        spec_path = work / f"{spec['worker']}.json"
        out = work / f"{spec['worker']}.jsonl"
        spec_path.write_text(json.dumps({**spec, "uri": uri}))
        with open(work / f"{spec['worker']}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(spec_path), str(out)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        procs.append((spec["worker"], proc, out))
    deadline = time.monotonic() + OVERALL_TIMEOUT
    hung = []
    for worker, proc, _out in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(worker)
    for _worker, proc, _out in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = []
    for _worker, _proc, out in procs:
        if out.exists():
            records += [json.loads(line) for line in out.read_text().splitlines() if line]
    if hung:
        last = {w: [r for r in records if r["worker"] == w][-1:] for w in hung}
        pytest.fail(f"workers did not finish in {OVERALL_TIMEOUT:.0f} s: {last}")
    for worker, proc, _out in procs:
        err = (work / f"{worker}.err").read_text()
        assert proc.returncode == 0, f"worker {worker} exited {proc.returncode}: {err[-2000:]}"
    return records


def run_threads(conn: Any, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each spec in a thread of this process, all sharing ``conn``."""
    recorders = [conc_worker.Recorder(spec["worker"]) for spec in specs]
    threads = [
        threading.Thread(
            target=conc_worker.run, args=(conn, rec, spec["role"], spec["args"]), daemon=True
        )
        for rec, spec in zip(recorders, specs, strict=True)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + OVERALL_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [spec["worker"] for t, spec in zip(threads, specs, strict=True) if t.is_alive()]
    records = [r for rec in recorders for r in list(rec.records)]
    if hung:  # daemon threads: they die with the test process
        pytest.fail(f"threads did not finish in {OVERALL_TIMEOUT:.0f} s: {hung}")
    return records


# -- checking ----------------------------------------------------------------------


def check_records(records: list[dict[str, Any]], workers: list[str]) -> None:
    """Every worker finished; every failed call has an allowed libvirt error code."""
    done = {r["worker"] for r in records if r["op"] == "done"}
    assert done == set(workers), f"workers without an end: {set(workers) - done}"
    bad = [
        r
        for r in records
        if not r["ok"]
        and (
            r.get("code") is None or r["code"] not in ALLOWED_CODES.get(r["op"], ALLOWED_CODES["*"])
        )
    ]
    assert not bad, f"{len(bad)} unexpected failures, first: {bad[:5]}"


def qemu_chains(dom: Any) -> dict[str, list[str]]:
    """QEMU's real chain (files, top first) of each device, from query-block."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    out = {}
    for dev in reply["return"]:
        files, image = [], dev["inserted"]["image"]
        while image:
            files.append(image["filename"])
            image = image.get("backing-image")
        # "/machine/peripheral/virtio-disk0/virtio-backend" -> "virtio-disk0"
        out[dev["qdev"].removeprefix("/machine/peripheral/").split("/")[0]] = files
    return out


def xml_chains(dom: Any) -> dict[str, list[str]]:
    """The live XML's chain (files, top first) of each disk, by device alias."""
    doc = etree.fromstring(dom.XMLDesc(0).encode())
    out = {}
    for disk in doc.findall("devices/disk"):
        files = [disk.find("source").get("file")]
        bs = disk.find("backingStore")
        while bs is not None and bs.find("source") is not None:
            files.append(bs.find("source").get("file"))
            bs = bs.find("backingStore")
        out[disk.find("alias").get("name")] = files
    return out


def file_chain(path: str) -> list[str]:
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "--backing-chain", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return [layer["filename"] for layer in json.loads(info.stdout)]


def check_domain(conn: Any, name: str, records: list[dict[str, Any]], images: Path) -> list[str]:
    """The metadata, QEMU and the files agree (see the module docstring); returns the
    snapshots in creation order."""
    mine = [r for r in records if r["domain"] == name]
    created = {r["snapshot"]: r["overlay"] for r in mine if r["op"] == "created"}
    assert len(created) == len([r for r in mine if r["op"] == "created"])
    dom = conn.lookupByName(name)
    listed = dom.snapshotListNames(0)
    assert sorted(listed) == sorted(created), "metadata differs from what workers created"
    # one linear chain: each snapshot's parent is the one taken just before it
    children: dict[str | None, list[str]] = {}
    for snap in dom.listAllSnapshots(0):
        doc = etree.fromstring(snap.getXMLDesc(0).encode())
        parent: str | None = doc.findtext("parent/name")
        children.setdefault(parent, []).append(snap.getName())
    order: list[str] = []
    at: str | None = None
    while at in children:
        assert len(children[at]) == 1, f"snapshot {at} has several children: {children[at]}"
        at = children[at][0]
        order.append(at)
    assert len(order) == len(created), "snapshots do not form one chain"
    if order:
        assert dom.snapshotCurrent(0).getName() == order[-1]
    # each snapshot records its overlay; QEMU's chain and the files' chain agree
    for snap in order:
        doc = etree.fromstring(dom.snapshotLookupByName(snap).getXMLDesc(0).encode())
        vda = next(d for d in doc.findall("disks/disk") if d.get("name") == "vda")
        assert vda.find("source").get("file") == created[snap]
    base = str(images / f"{name}-vda.qcow2")
    want = [created[s] for s in reversed(order)] + [base]
    qemu = qemu_chains(dom)
    assert qemu["virtio-disk0"] == want
    assert file_chain(want[0]) == want
    assert xml_chains(dom) == qemu, "live XML differs from QEMU's block graph"
    # a snapshot that failed left no overlay behind
    overlays = {str(p) for p in images.glob(f"{name}-*.qcow2") if "-vd" not in p.name}
    overlays -= {str(p) for p in images.glob(f"{name}-copy*.qcow2")}
    assert overlays == set(created.values())
    # no reader saw the metadata half-way between two states
    for r in mine:
        if r["op"] != "observed" or not r["leaves"]:
            continue
        assert len(r["leaves"]) == 1, f"a reader saw several leaves: {r}"
        assert r["has"] == 1, f"a reader saw no current: {r}"
        assert r["current"] is not None, f"a reader saw no current: {r}"
        assert order.index(r["current"]) >= order.index(r["leaves"][0]), f"torn view: {r}"
    return order


def check_files(root: Path) -> None:
    """Every metadata file parses; no temporary file is left; no lock is held."""
    for path in (root / "lib" / "qemu" / "snapshot").rglob("*"):
        if path.is_file():
            assert not path.name.startswith("."), f"temporary file left: {path}"
            etree.fromstring(path.read_bytes())
    left = [p for p in root.rglob(".*.tmp")]
    assert not left, f"temporary files left: {left}"
    for lock in (root / "run" / "lock").glob("*.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if anyone holds it
        finally:
            os.close(fd)
        assert lock.read_text() == "", f"{lock} still names a holder: {lock.read_text()!r}"


def check_vdb_committed(conn: Any, name: str, images: Path) -> None:
    """After the copies and the final active commit, vdb is back on its base."""
    dom = conn.lookupByName(name)
    assert dom.blockJobInfo("vdb", 0) == {}
    assert qemu_chains(dom)["virtio-disk1"] == [str(images / f"{name}-vdb-base.qcow2")]


# -- tests -----------------------------------------------------------------------------


def snapshot_specs(domains: list[str], workers: int, rounds: int, images: Path) -> list[dict]:
    return [
        {
            "worker": f"snap{w}",
            "role": "snapshot",
            "args": {
                # each worker starts on a different domain
                "domains": domains[w % len(domains) :] + domains[: w % len(domains)],
                "rounds": rounds,
                "images": str(images),
                "tag": f"w{w}",
            },
        }
        for w in range(workers)
    ]


def copy_spec(domains: list[str], rounds: int, images: Path) -> dict:
    return {
        "worker": "copier",
        "role": "copy",
        "args": {"domains": domains, "rounds": rounds, "images": str(images), "bandwidth": 8 * MiB},
    }


def test_processes_on_one_domain(conn, uri: str, root: Path, images: Path, tmp_path: Path) -> None:
    make_domain(conn, images, "vm")
    specs = [
        *snapshot_specs(["vm"], workers=6, rounds=5, images=images),
        {"worker": "reader", "role": "reader", "args": {"domains": ["vm"], "rounds": 40}},
        copy_spec(["vm"], rounds=2, images=images),
    ]
    records = run_processes(uri, specs, tmp_path / "work")
    check_records(records, [s["worker"] for s in specs])
    order = check_domain(conn, "vm", records, images)
    assert len(order) == 30
    check_vdb_committed(conn, "vm", images)
    check_files(root)


def test_threads_share_one_connection(conn, root: Path, images: Path) -> None:
    make_domain(conn, images, "vm")
    specs = [
        *snapshot_specs(["vm"], workers=5, rounds=4, images=images),
        {"worker": "reader", "role": "reader", "args": {"domains": ["vm"], "rounds": 30}},
        copy_spec(["vm"], rounds=2, images=images),
    ]
    records = run_threads(conn, specs)
    check_records(records, [s["worker"] for s in specs])
    order = check_domain(conn, "vm", records, images)
    assert len(order) == 20
    check_vdb_committed(conn, "vm", images)
    check_files(root)


def test_processes_on_many_domains(
    conn, uri: str, root: Path, images: Path, tmp_path: Path
) -> None:
    names = [f"vm{i}" for i in range(6)]
    for name in names:
        make_domain(conn, images, name)
    specs = [
        *snapshot_specs(names, workers=4, rounds=3, images=images),
        {"worker": "reader", "role": "reader", "args": {"domains": names, "rounds": 6}},
        copy_spec(names, rounds=1, images=images),
    ]
    records = run_processes(uri, specs, tmp_path / "work")
    check_records(records, [s["worker"] for s in specs])
    for name in names:
        assert len(check_domain(conn, name, records, images)) == 12
        check_vdb_committed(conn, name, images)
    check_files(root)


def test_threads_probe_the_emulator_at_once(conn) -> None:
    """The first getVersion of a root starts QEMU to probe it: threads doing that at
    the same moment each get the answer (each probe has its own socket)."""
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def probe() -> None:
        barrier.wait()
        try:
            results.append(conn.getVersion())
        except libvirt.libvirtError as err:
            results.append(err)

    threads = [threading.Thread(target=probe) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
