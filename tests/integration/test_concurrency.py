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

from . import conc_worker
from .conftest import domain_xml, make_image, qemu_chains, status_pid, xml_chains

MiB = 1024 * 1024
WORKER = Path(conc_worker.__file__)
#: Seconds every worker of one test together may take before they are killed.
OVERALL_TIMEOUT = 600.0
BANDWIDTH_BYTES = libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES

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


def device_chains(dom: Any) -> dict[str, list[str]]:
    """QEMU's real chain (files, top first) of each device, from query-block."""
    # "/machine/peripheral/virtio-disk0/virtio-backend" -> "virtio-disk0"
    return {
        qdev.removeprefix("/machine/peripheral/").split("/")[0]: chain[1:]
        for qdev, chain in qemu_chains(dom).items()
    }


def alias_chains(dom: Any) -> dict[str, list[str]]:
    """The live XML's chain (files, top first) of each disk, by device alias."""
    return xml_chains(dom.XMLDesc(0), key="alias")


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
    qemu = device_chains(dom)
    assert qemu["virtio-disk0"] == want
    assert file_chain(want[0]) == want
    assert alias_chains(dom) == qemu, "live XML differs from QEMU's block graph"
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


def check_index(index: Path) -> None:
    """An index entry whose file key still matches says what the file says."""
    for name, entry in json.loads(index.read_text()).items():
        doc = index.parent / f"{name}.xml"
        if not doc.exists():
            continue
        st = os.lstat(doc)
        if entry["key"] != [st.st_ino, st.st_size, st.st_mtime_ns]:
            continue  # stale: a reader parses the file again
        xml = etree.fromstring(doc.read_bytes())
        assert entry["name"] == xml.findtext("name")
        assert entry["parent"] == xml.findtext("parent/name")
        assert entry["current"] == (xml.findtext("active") == "1")


def check_files(root: Path) -> None:
    """Every metadata file parses; the index agrees with every file it still
    describes; no temporary file is left; no lock is held."""
    for path in (root / "lib" / "qemu" / "snapshot").rglob("*"):
        if path.is_file():
            if path.name == ".index.json":
                check_index(path)
                continue
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
    assert device_chains(dom)["virtio-disk1"] == [str(images / f"{name}-vdb-base.qcow2")]


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


def test_readers_answer_while_a_writer_holds_the_lock(
    conn, root: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the domain lock is held (here by this very process, through another
    open file: flock locks belong to the open file, not the process), every read
    answers from the files and the query monitor, and a change gives up after
    VIRTSHIFT_LOCK_TIMEOUT with OPERATION_TIMEOUT, naming the holder, having
    changed nothing."""
    from virtshift.store.files import FileLock

    dom = make_domain(conn, images, "vm")
    dom.snapshotCreateXML(
        conc_worker.snapshot_xml("s1", images / "vm-s1.qcow2"), conc_worker.DISK_ONLY
    )
    dest = images / "vm-copy.qcow2"
    dom.blockCopy(
        "vdb",
        f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
        # 8 MiB to copy, at most 256 KiB at a time: the job is still copying meanwhile
        {"bandwidth": 256 * 1024, "buf-size": 256 * 1024},
        conc_worker.COPY_SHALLOW,
    )
    monkeypatch.setenv("VIRTSHIFT_LOCK_TIMEOUT", "0.3")
    before = {p.name: p.read_bytes() for p in (root / "lib").rglob("*.xml")}
    images_before = sorted(p.name for p in images.iterdir())
    live_before = dom.XMLDesc(0)
    holder = FileLock(root / "run" / "lock" / "vm.lock", what="domain 'vm'")
    with holder.hold("a long change"):
        assert dom.snapshotListNames(0) == ["s1"]
        assert dom.snapshotCurrent(0).getName() == "s1"
        assert dom.XMLDesc(0) == live_before
        info = dom.blockJobInfo("vdb", 0)
        assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
        assert info["cur"] < info["end"]
        assert [d.name() for d in conn.listAllDomains(0)] == ["vm"]
        assert dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING
        changes = [
            lambda: dom.snapshotCreateXML(
                conc_worker.snapshot_xml("s2", images / "vm-s2.qcow2"), conc_worker.DISK_ONLY
            ),
            lambda: dom.blockJobAbort("vdb", 0),
            lambda: dom.blockJobSetSpeed("vdb", 2, 0),
            lambda: dom.suspend(),
        ]
        for change in changes:
            with pytest.raises(libvirt.libvirtError) as exc:
                change()
            assert exc.value.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
            assert f"pid {os.getpid()} operation a long change" in str(exc.value)
    assert {p.name: p.read_bytes() for p in (root / "lib").rglob("*.xml")} == before
    assert sorted(p.name for p in images.iterdir()) == images_before
    assert dom.blockJobInfo("vdb", 0)["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
    dom.blockJobAbort("vdb", 0)
    assert dom.blockJobInfo("vdb", 0) == {}
    check_files(root)


# -- load: many running domains with jobs in flight ----------------------------------


def qemu_usage(root: Path) -> list[dict[str, float]]:
    """Per running QEMU: RSS and PSS (MiB), open fds, threads, CPU seconds so far."""
    out = []
    for status in sorted((root / "run" / "qemu").glob("*.xml")):
        if status.name.startswith("."):
            continue
        pid = status_pid(status)
        proc = Path(f"/proc/{pid}")
        fields = dict(
            line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line
        )
        pss = next(
            int(line.split()[1])
            for line in (proc / "smaps_rollup").read_text().splitlines()
            if line.startswith("Pss:")
        )
        stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out.append(
            {
                "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
                "pss_mib": pss / 1024,
                "fds": len(os.listdir(proc / "fd")),
                "threads": int(fields["Threads"]),
                "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
            }
        )
    return out


def timing_table(records: list[dict[str, Any]]) -> str:
    by_op: dict[str, list[float]] = {}
    for r in records:
        if "seconds" in r:
            by_op.setdefault(r["op"], []).append(r["seconds"])
    lines = [f"{'call':24} {'n':>5} {'median ms':>10} {'max ms':>9}"]
    for op, xs in sorted(by_op.items()):
        xs.sort()
        lines.append(f"{op:24} {len(xs):5d} {1000 * xs[len(xs) // 2]:10.1f} {1000 * xs[-1]:9.1f}")
    return "\n".join(lines)


def run_load(conn, uri: str, root: Path, images: Path, work: Path, n: int, workers: int) -> None:
    """``n`` running domains, each with a throttled job on vdb (copies on even
    domains, active commits on odd ones); then every call on every domain, first
    from this process one domain after the other, then from ``workers`` processes
    at once.  Prints timings and resource use; asserts only that everything
    answered and stayed consistent."""
    t0 = time.perf_counter()
    names = [f"load{i:02d}" for i in range(n)]
    for name in names:
        make_domain(conn, images, name, memory_mib=32)
    started = time.perf_counter() - t0
    for i, name in enumerate(names):
        dom = conn.lookupByName(name)
        if i % 2 == 0:
            dest = images / f"{name}-copy-load.qcow2"
            xml = f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>"
            dom.blockCopy(
                "vdb",
                xml,
                {"bandwidth": 64 * 1024, "buf-size": 64 * 1024},
                conc_worker.COPY_SHALLOW,
            )
        else:
            dom.blockCommit(
                "vdb", None, None, 64 * 1024, conc_worker.COMMIT_ACTIVE | BANDWIDTH_BYTES
            )
    usage_before = qemu_usage(root)
    seq = conc_worker.Recorder("sequential")
    for name in names:
        dom = seq.call("lookupByName", name, lambda n=name: conn.lookupByName(n))
        assert dom is not None
        info = seq.call("blockJobInfo", name, lambda d=dom: d.blockJobInfo("vdb", 0))
        assert info, f"no job in flight on {name}"  # throttled: still running
        made = seq.call(
            "snapshotCreateXML",
            name,
            lambda d=dom, nm=name: d.snapshotCreateXML(
                conc_worker.snapshot_xml("seq", images / f"{nm}-seq.qcow2"), conc_worker.DISK_ONLY
            ),
        )
        if made is not None:
            seq.note(op="created", domain=name, ok=True, snapshot="seq",
                     overlay=str(images / f"{name}-seq.qcow2"))  # fmt: skip
        conc_worker.observe(conn, dom, name, seq)
    specs = snapshot_specs(names, workers=workers, rounds=1, images=images)
    t1 = time.perf_counter()
    par = run_processes(uri, specs, work)
    parallel = time.perf_counter() - t1
    records = seq.records + par
    check_records(par, [s["worker"] for s in specs])
    bad = [r for r in seq.records if not r["ok"]]
    assert not bad, bad[:5]
    for name in names:
        assert conn.lookupByName(name).blockJobInfo("vdb", 0), f"job on {name} ended early"
    usage = qemu_usage(root)
    # the jobs were still in flight for every call above; now end them and check
    for name in names:
        conn.lookupByName(name).blockJobAbort("vdb", 0)
    for name in names:
        assert len(check_domain(conn, name, records, images)) == 1 + workers
    check_files(root)
    mem = {
        k: int(v.split()[0]) // 1024
        for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        if k in ("MemTotal", "MemAvailable")
    }
    rss = sorted(u["rss_mib"] for u in usage)
    pss = sorted(u["pss_mib"] for u in usage)
    cpu = [a["cpu_s"] - b["cpu_s"] for a, b in zip(usage, usage_before, strict=True)]
    print(
        f"\n{n} running domains, a throttled block job on each, {os.cpu_count()} cores\n"
        f"start {n} domains: {started:.1f} s; {workers} processes x {n} domains "
        f"(snapshot + reads): {parallel:.1f} s\n"
        f"QEMU RSS MiB median {rss[n // 2]:.1f} max {rss[-1]:.1f}; PSS MiB median "
        f"{pss[n // 2]:.1f}, total {sum(pss):.0f}; fds max {max(u['fds'] for u in usage)}; "
        f"threads max {max(u['threads'] for u in usage)}; QEMU CPU during the calls "
        f"{sum(cpu):.1f} s total\nhost MemTotal {mem['MemTotal']} MiB, "
        f"MemAvailable {mem['MemAvailable']} MiB\n"
        f"sequential calls:\n{timing_table(seq.records)}\n"
        f"calls from {workers} processes:\n{timing_table(par)}"
    )


def test_load_8_domains(conn, uri: str, root: Path, images: Path, tmp_path: Path) -> None:
    run_load(conn, uri, root, images, tmp_path / "work", n=8, workers=3)


@pytest.mark.long
def test_load_32_domains(conn, uri: str, root: Path, images: Path, tmp_path: Path) -> None:
    run_load(conn, uri, root, images, tmp_path / "work", n=32, workers=4)
