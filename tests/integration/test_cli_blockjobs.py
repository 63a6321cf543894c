"""The block-job verbs of the CLI on real QEMU, several processes at once, and SIGKILL.

1. A walk-through of blockpull / blockcommit / blockcopy / blockjob / domblkinfo
   with guest writes during the jobs, every pattern checked offline at the end.
2. While one process waits (``blockcopy --wait``), another queries, changes
   the speed, aborts or pivots; the waiter's exit status is what really happened.
   Where the order of two processes matters, the waiter is held with SIGSTOP
   while it holds no lock, so the interleaving is the same on every run.
3. A process is SIGKILLed during a copy, a pull, and a pivot (held with SIGSTOP
   just before or just after ``block-job-complete``); a new connection
   reconciles and finishes the job.
4. ``--wait`` fails for real: a copy onto a 1 MiB tmpfs, and ``--timeout``.

The last tests reproduce bugs these tests found (old nodes never released after
a pivot or an active commit, suspend/resume not reconciling, cur == end before
ready); they stay as regression tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu
from virtshift.cli.main import main

from .conftest import domain_xml, make_image, qemu_img, qemu_io_read, small_tmpfs, xml_chain

MiB = 1024 * 1024
PIVOT = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
BYTES = libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"
INFO = re.compile(r"Block Copy: \[ *(\d+) %\]\n")
RAW = re.compile(r" type=Block Copy\n bandwidth=(\d+)\n cur=(\d+)\n end=(\d+)\n")


# -- helpers ----------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """One virtshift command in this process: (exit status, stdout, stderr)."""
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def parse_info(out: str) -> tuple[int, str]:
    """``blockjob --info`` of a copy: the percentage and the lines after the first."""
    m = INFO.match(out)
    assert m, out
    return int(m.group(1)), out[m.end() :]


def parse_raw(out: str) -> tuple[int, int, int]:
    """``blockjob --raw`` of a copy: bandwidth, cur, end."""
    m = RAW.fullmatch(out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@contextlib.contextmanager
def spawned(*argv: str) -> Iterator[subprocess.Popen[str]]:
    """A process of ours; killed (even when stopped) when the block ends."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def virtshift(uri: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "virtshift", "-c", uri, *args]


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def hmp_write(dom, pattern: int, offset: int, length: str = "1M") -> None:
    """A guest write through the virtio device (never by node name: QEMU-NOTES)."""
    cmd = f'qemu-io -d {DEVICE} "write -P 0x{pattern:x} {offset} {length}"'
    libvirt_qemu.qemuMonitorCommand(dom, cmd, 1)


def qmp(dom, command: str, **arguments):
    """QMP pass-through (a locked operation: it reconciles recorded jobs first)."""
    msg = {"execute": command, "arguments": arguments}
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))["return"]


def qemu_only(dom, command: str):
    """Ask QEMU directly on the domain's second (query) monitor, bypassing virtshift:
    no lock, no reconciliation, so a job QEMU concluded stays visible as concluded."""
    from virtshift.qmp.client import Monitor

    status = dom._driver.record(dom.name()).status
    with Monitor(status.query_monitor).connect() as mon:
        return mon.execute(command)


def chain_of(xml: str, target: str = "vda") -> list[str]:
    return xml_chain(xml, target)


def mirror_ready(xml: str, target: str = "vda") -> str | None:
    """The live ``<mirror ready=>`` word, '' for a mirror without it, None without mirror."""
    doc = etree.fromstring(xml.encode())
    for disk in doc.findall("devices/disk"):
        if disk.find("target").get("dev") == target:
            m = disk.find("mirror")
            return None if m is None else m.get("ready", "")
    raise AssertionError(target)


def top_files(dom) -> list[str]:
    """QEMU's view of vda: its top node name, then the files of its chain."""
    for dev in qmp(dom, "query-block"):
        if dev.get("qdev") == DEVICE:
            files, image = [], dev["inserted"]["image"]
            while image:
                files.append(image["filename"])
                image = image.get("backing-image")
            return [dev["inserted"]["node-name"], *files]
    raise AssertionError("no vda in query-block")


def recorded_jobs(root: Path, name: str = "vm") -> list[tuple[str, str]]:
    """(type, state) of every job in the status file."""
    doc = etree.fromstring((root / "run" / "qemu" / f"{name}.xml").read_bytes())
    return [(j.get("type"), j.get("state")) for j in doc.findall("blockjobs/blockjob")]


def wait_until(what: str, cond, timeout: float = 15, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def job_visible(dom) -> dict[str, int]:
    return wait_until("the block job", lambda: dom.blockJobInfo("vda", BYTES))


def qemu_ready(dom) -> None:
    wait_until(
        "QEMU to report the job ready",
        lambda: any(j.get("ready") for j in qmp(dom, "query-block-jobs")),
    )


def lock_free(root: Path, name: str = "vm") -> bool:
    fd = os.open(root / "run" / "lock" / f"{name}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def stop_waiter(proc: subprocess.Popen[str], root: Path) -> None:
    """SIGSTOP a waiter whose job is still throttled.

    Such a waiter takes the domain lock only when QEMU says ready or concluded,
    so once the lock is seen free it stays free; stopped, it cannot learn
    anything until SIGCONT: what it reports then comes from the recorded state.
    It may be stopped holding the query monitor's lock: until SIGCONT, use
    calls that go through the main monitor (qmp(), blockjob --bandwidth/--pivot/
    --abort), not blockJobInfo / blockjob --info.
    """
    wait_until("the waiter to release the domain lock", lambda: lock_free(root))
    os.kill(proc.pid, signal.SIGSTOP)
    assert lock_free(root)


def big_disk(images: Path) -> Path:
    """64M qcow2 with 32 MiB written.  At 1 MiB/s QEMU copies a first burst of
    16 MiB (its default buffer), then sleeps 16 s: far from ready during a test."""
    disk = make_image(images / "disk.qcow2", size="64M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 32M", str(disk)],
        check=True,
        capture_output=True,
    )
    return disk


def offline_write(path: Path, pattern: int, offset: int, length: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{pattern:x} {offset} {length}", str(path)],
        check=True,
        capture_output=True,
    )


# -- 1. the walk-through ------------------------------------------------------------------


def test_cli_walkthrough(capsys, uri: str, root: Path, images: Path, tmp_path: Path) -> None:
    base = make_image(images / "base.qcow2", size="32M")
    offline_write(base, 0x01, 0, "1M")
    mid = make_image(images / "mid.qcow2", backing=base, size="32M")
    offline_write(mid, 0x02, MiB, "18M")  # more than one 16 MiB mirror burst
    top = make_image(images / "top.qcow2", backing=mid, size="32M")
    finished, copy3, copy1 = (images / n for n in ("finished.qcow2", "c3.qcow2", "c1.qcow2"))
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml("vm", [("vda", top, "qcow2")]))
    c = ("-c", uri)
    conn = libvirt.open(uri)
    dom = None

    def write(pattern: int, offset: int) -> None:
        cmd = f'qemu-io -d {DEVICE} "write -P 0x{pattern:x} {offset} 1M"'
        assert run(capsys, *c, "qemu-monitor-command", "vm", "--hmp", cmd)[0] == 0

    def live_chain() -> list[str]:
        rc, out, _ = run(capsys, *c, "dumpxml", "vm")
        assert rc == 0
        return chain_of(out)

    def during(proc: subprocess.Popen[str], pattern: int, offset: int) -> None:
        """A guest write while the job of ``proc`` runs (and still runs after it)."""
        job_visible(dom)
        write(pattern, offset)
        assert dom.blockJobInfo("vda", 0), "the job ended before the write: not during"
        assert proc.poll() is None

    assert run(capsys, *c, "define", str(xml))[0] == 0
    assert run(capsys, *c, "start", "vm")[0] == 0
    dom = conn.lookupByName("vm")
    write(0x11, 20 * MiB)

    # blockpull --base: mid's data comes up into top, the chain loses mid
    with spawned(
        *virtshift(
            uri,
            "blockpull",
            "vm",
            "vda",
            "--base",
            str(base),
            "--wait",
            "--verbose",
            "--bandwidth",
            "8",
        )
    ) as proc:
        during(proc, 0x12, 21 * MiB)
        rc, out, err = finish(proc)
    assert (rc, out) == (0, "\nPull complete\n"), err
    assert "Block Pull" in err  # the progress bar
    assert live_chain() == [str(top), str(base)]

    # blockcopy --wait --finish: a full point-in-time copy; the disk stays on top
    rc, out, err = run(
        capsys,
        *c,
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        str(finished),
        "--wait",
        "--finish",
        "--verbose",
    )
    assert (rc, out) == (0, "\nSuccessfully copied\n"), err
    assert live_chain() == [str(top), str(base)]
    write(0x13, 22 * MiB)  # on top only, not in the finished copy

    # blockcopy without --wait, then blockjob from this process; a 1 MiB buffer
    # makes QEMU copy 1 MiB a second (by default it copies 16 MiB, then sleeps)
    rc, out, err = run(
        capsys,
        *c,
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        str(copy3),
        "--shallow",
        "--bandwidth",
        "1",
        "--buf-size",
        str(MiB),
    )
    assert (rc, out) == (0, "Block Copy started\n"), err
    rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--info")
    assert rc == 0
    pct, rest = parse_info(out)
    assert pct < 100
    assert rest == "    Bandwidth limit: 1048576 bytes/s (1.000 MiB/s)\n"
    write(0x14, 23 * MiB)  # while copying
    rc, out, err = run(capsys, *c, "blockjob", "vm", "vda", "--pivot")
    assert (rc, out) == (5, "")  # BLOCK_COPY_ACTIVE: busy
    assert "not ready for pivot" in err
    assert run(capsys, *c, "blockjob", "vm", "vda", "--bandwidth", "5")[:2] == (0, "")
    rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--info", "--bytes")
    assert rc == 0
    assert parse_info(out)[1] == "    Bandwidth limit: 5242880 bytes/s (5.000 MiB/s)\n"
    rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--raw")
    assert rc == 0
    bandwidth, cur, end = parse_raw(out)
    assert bandwidth == 5  # virsh: --raw lists MiB/s unless --bytes
    assert cur <= end
    rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--raw", "--bytes")
    assert rc == 0
    assert parse_raw(out)[0] == 5 * MiB
    assert run(capsys, *c, "blockjob", "vm", "vda", "--bandwidth", "0")[:2] == (0, "")
    wait_until(
        "the copy to be ready",
        lambda: (
            run(capsys, *c, "blockjob", "vm", "vda")[1] == "Block Copy: [100 %]\n"
            and mirror_ready(dom.XMLDesc(0)) == "yes"
        ),
    )
    write(0x15, 24 * MiB)  # mirrored
    assert run(capsys, *c, "blockjob", "vm", "vda", "--pivot")[:2] == (
        0,
        "\nSuccessfully pivoted\n",
    )
    assert live_chain() == [str(copy3), str(base)]
    assert run(capsys, *c, "blockjob", "vm", "vda", "--info")[:2] == (
        0,
        "No current block job for vda\n",
    )
    assert run(capsys, *c, "blockjob", "vm", "vda", "--raw")[:2] == (0, "")  # virsh: nothing

    # blockcopy --wait --pivot with a bandwidth, guest writing meanwhile
    with spawned(
        *virtshift(
            uri,
            "blockcopy",
            "vm",
            "vda",
            "--dest",
            str(copy1),
            "--shallow",
            "--wait",
            "--pivot",
            "--verbose",
            "--bandwidth",
            "8",
        )
    ) as proc:
        during(proc, 0x16, 25 * MiB)
        rc, out, err = finish(proc)
    assert (rc, out) == (0, "\nSuccessfully pivoted\n"), err
    assert live_chain() == [str(copy1), str(base)]

    # blockcommit --active --pivot: everything down into base, the disk on base
    with spawned(
        *virtshift(
            uri, "blockcommit", "vm", "vda", "--active", "--pivot", "--verbose", "--bandwidth", "8"
        )
    ) as proc:
        during(proc, 0x17, 26 * MiB)
        rc, out, err = finish(proc)
    assert (rc, out) == (0, "\nSuccessfully pivoted\n"), err
    assert "Block Commit" in err
    assert live_chain() == [str(base)]
    rc, out, _ = run(capsys, *c, "dumpxml", "vm", "--inactive")
    assert chain_of(out)[0] == str(base)  # the definition follows
    assert run(capsys, *c, "blockjob", "vm", "vda", "--info")[:2] == (
        0,
        "No current block job for vda\n",
    )
    write(0x18, 27 * MiB)

    # domblkinfo: the active image, base
    rc, out, _ = run(capsys, *c, "domblkinfo", "vm", "vda")
    assert rc == 0
    lines = out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["Capacity", "Allocation", "Physical", ""]
    assert all(ln[:16].endswith(" ") and ln[16:].isdigit() for ln in lines[:3]), out
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(base)))
    assert lines[0] == f"Capacity:       {info['virtual-size']}"
    assert info["virtual-size"] == 32 * MiB
    assert int(lines[1][16:]) > 0
    assert lines[2] == f"Physical:       {base.stat().st_size}"

    assert run(capsys, *c, "destroy", "vm")[0] == 0
    conn.close()
    written = {
        0x01: 0,
        0x11: 20,
        0x12: 21,
        0x13: 22,
        0x14: 23,
        0x15: 24,
        0x16: 25,
        0x17: 26,
        0x18: 27,
    }
    for pat, mib in written.items():
        assert qemu_io_read(base, "qcow2", pat, mib * MiB, "1M"), hex(pat)
    assert qemu_io_read(base, "qcow2", 0x02, MiB, "18M")
    # the finished copy: everything up to the finish, nothing after
    assert (
        json.loads(qemu_img("info", "--output=json", "-f", "qcow2", str(finished))).get(
            "backing-filename"
        )
        is None
    )
    for pat, mib, ln in ((0x01, 0, "1M"), (0x02, 1, "18M"), (0x11, 20, "1M"), (0x12, 21, "1M")):
        assert qemu_io_read(finished, "qcow2", pat, mib * MiB, ln), hex(pat)
    assert not qemu_io_read(finished, "qcow2", 0x13, 22 * MiB, "1M")


def test_info_before_qemu_sized_the_job(monkeypatch, capsys, uri: str, conn, images: Path) -> None:
    """QEMU reports 0 of 0 for a job that has not sized its work yet: 0 %, not 100 %."""
    disk = make_image(images / "disk.qcow2")
    conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    fresh = {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, "bandwidth": 0, "cur": 0, "end": 0}
    monkeypatch.setattr(libvirt.virDomain, "blockJobInfo", lambda self, path, flags=0: fresh)
    assert run(capsys, "-c", uri, "blockjob", "vm", "vda")[:2] == (0, "Block Copy: [  0 %]\n")


# -- 2. one process waits, another acts ---------------------------------------------------


@pytest.mark.parametrize("unthrottle", [False, True], ids=["throttled", "unthrottled-ready"])
def test_another_process_aborts_while_one_waits(
    capsys, uri: str, conn, root: Path, images: Path, unthrottle: bool
) -> None:
    """The waiter of ``blockcopy --wait`` exits 1, "job was cancelled", when another
    process aborts its copy: a running one, or (held with SIGSTOP so that it cannot
    see the copy get ready first) one that was unthrottled and got ready."""
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    c = ("-c", uri)
    with spawned(
        *virtshift(
            uri,
            "blockcopy",
            "vm",
            "vda",
            "--dest",
            str(dest),
            "--wait",
            "--verbose",
            "--bandwidth",
            "1",
        )
    ) as waiter:
        job_visible(dom)
        rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--info")
        assert rc == 0
        pct, rest = parse_info(out)
        assert pct < 100
        assert rest == "    Bandwidth limit: 1048576 bytes/s (1.000 MiB/s)\n"
        hmp_write(dom, 0x22, 40 * MiB)  # during the copy
        if unthrottle:
            stop_waiter(waiter, root)
            assert run(capsys, *c, "blockjob", "vm", "vda", "--bandwidth", "0")[:2] == (0, "")
            qemu_ready(dom)
            hmp_write(dom, 0x23, 41 * MiB)  # mirrored: in the point-in-time copy too
        assert waiter.poll() is None
        assert run(capsys, *c, "blockjob", "vm", "vda", "--abort")[:2] == (0, "")
        if unthrottle:
            os.kill(waiter.pid, signal.SIGCONT)
        rc, out, err = finish(waiter)
    assert (rc, out) == (1, "")
    assert err.endswith("error: job was cancelled\n\n"), err
    assert chain_of(dom.XMLDesc(0)) == [str(disk)]
    assert mirror_ready(dom.XMLDesc(0)) is None
    assert dom.blockJobInfo("vda", 0) == {}
    assert recorded_jobs(root) == [("copy", "cancelled")]
    assert top_files(dom)[1:] == [str(disk)]
    hmp_write(dom, 0x24, 42 * MiB)
    dom.destroy()
    for pat, mib in ((0x22, 40), (0x24, 42)) + (((0x23, 41),) if unthrottle else ()):
        assert qemu_io_read(disk, "qcow2", pat, mib * MiB, "1M"), hex(pat)
    assert qemu_io_read(disk, "qcow2", 0x21, 0, "32M")
    if unthrottle:  # cancelled after READY: the copy is complete as of the abort
        assert qemu_io_read(dest, "qcow2", 0x21, 0, "32M")
        assert qemu_io_read(dest, "qcow2", 0x23, 41 * MiB, "1M")
    assert not qemu_io_read(dest, "qcow2", 0x24, 42 * MiB, "1M")


def test_waiter_stops_at_ready_then_another_process_pivots(
    capsys, uri: str, conn, root: Path, images: Path
) -> None:
    """``blockcopy --wait`` alone returns at READY ("Now in mirroring phase", 0) once
    another process has lifted its throttle; that process then pivots.  The pivot
    comes after the waiter's exit, so the waiter always sees READY first."""
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    c = ("-c", uri)
    with spawned(
        *virtshift(
            uri,
            "blockcopy",
            "vm",
            "vda",
            "--dest",
            str(dest),
            "--wait",
            "--verbose",
            "--bandwidth",
            "1",
        )
    ) as waiter:
        job_visible(dom)
        rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--info")
        assert rc == 0
        assert parse_info(out)[0] < 100
        hmp_write(dom, 0x31, 40 * MiB)
        assert waiter.poll() is None
        assert run(capsys, *c, "blockjob", "vm", "vda", "--bandwidth", "0")[:2] == (0, "")
        rc, out, err = finish(waiter)
    assert (rc, out) == (0, "\nNow in mirroring phase\n"), err
    assert mirror_ready(dom.XMLDesc(0)) == "yes"
    hmp_write(dom, 0x32, 41 * MiB)  # mirrored
    assert run(capsys, *c, "blockjob", "vm", "vda", "--pivot")[:2] == (
        0,
        "\nSuccessfully pivoted\n",
    )
    assert chain_of(dom.XMLDesc(0)) == [str(dest)]
    assert top_files(dom)[1:] == [str(dest)]
    assert run(capsys, *c, "blockjob", "vm", "vda")[:2] == (0, "No current block job for vda\n")
    hmp_write(dom, 0x33, 42 * MiB)
    dom.destroy()
    assert qemu_io_read(dest, "qcow2", 0x21, 0, "32M")
    for pat, mib in ((0x31, 40), (0x32, 41), (0x33, 42)):
        assert qemu_io_read(dest, "qcow2", pat, mib * MiB, "1M"), hex(pat)
    assert not qemu_io_read(disk, "qcow2", 0x33, 42 * MiB, "1M")


@pytest.mark.parametrize(
    ("flags", "status", "stdout", "stderr"),
    [
        (
            ("--wait",),
            0,
            "\nBlock Copy complete: another process pivoted the disk to the copy\n",
            "",
        ),
        (
            ("--wait", "--pivot"),
            0,
            "\nBlock Copy complete: another process pivoted the disk to the copy\n",
            "",
        ),
        (
            ("--wait", "--finish"),
            1,
            "",
            "error: Block Copy was pivoted by another process: the disk is on the copy, not on the source\n\n",
        ),
    ],
    ids=["wait", "pivot", "finish"],
)
def test_waiter_reports_a_pivot_made_by_another_process(
    capsys, uri: str, conn, root: Path, images: Path, flags, status: int, stdout: str, stderr: str
) -> None:
    """The waiter is held (SIGSTOP) while another process unthrottles and pivots:
    it wakes up to a completed copy and says so; with --finish it fails (the disk
    is not on the source as asked)."""
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    c = ("-c", uri)
    with spawned(
        *virtshift(uri, "blockcopy", "vm", "vda", "--dest", str(dest), *flags, "--bandwidth", "1")
    ) as waiter:
        job_visible(dom)
        stop_waiter(waiter, root)
        assert run(capsys, *c, "blockjob", "vm", "vda", "--bandwidth", "0")[:2] == (0, "")
        qemu_ready(dom)
        hmp_write(dom, 0x41, 40 * MiB)
        assert run(capsys, *c, "blockjob", "vm", "vda", "--pivot")[:2] == (
            0,
            "\nSuccessfully pivoted\n",
        )
        os.kill(waiter.pid, signal.SIGCONT)
        rc, out, err = finish(waiter)
    assert (rc, out) == (status, stdout), err
    assert err.endswith(stderr)
    assert chain_of(dom.XMLDesc(0)) == [str(dest)]
    assert recorded_jobs(root) == [("copy", "completed")]
    dom.destroy()
    assert qemu_io_read(dest, "qcow2", 0x41, 40 * MiB, "1M")


def test_waiter_pivots_while_another_process_queries(
    capsys, uri: str, conn, root: Path, images: Path
) -> None:
    """``blockcopy --wait --pivot`` at 16 MiB/s while this process asks ``blockjob``
    over and over: every query answers at once (the waiter holds no lock, and the
    query monitor is a second one), progress moves, the waiter pivots."""
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    c = ("-c", uri)
    seen: list[int] = []
    with spawned(
        *virtshift(
            uri,
            "blockcopy",
            "vm",
            "vda",
            "--dest",
            str(dest),
            "--wait",
            "--pivot",
            "--verbose",
            "--bandwidth",
            "16",
        )
    ) as waiter:
        job_visible(dom)
        hmp_write(dom, 0x51, 40 * MiB)
        rc, out, _ = run(capsys, *c, "blockjob", "vm", "vda", "--raw")
        assert rc == 0
        assert parse_raw(out)[0] == 16
        while waiter.poll() is None:
            t0 = time.monotonic()
            rc, out, err = run(capsys, *c, "blockjob", "vm", "vda", "--info")
            assert rc == 0, err
            assert time.monotonic() - t0 < 5  # never waits for the waiter
            m = INFO.match(out)
            if m:
                seen.append(int(m.group(1)))
            else:
                assert out == "No current block job for vda\n"
            time.sleep(0.05)
        rc, out, err = finish(waiter)
    assert (rc, out) == (0, "\nSuccessfully pivoted\n"), err
    assert len(seen) >= 3, seen
    assert seen[0] < 100
    assert max(seen) > seen[0]  # it moved while we asked
    assert chain_of(dom.XMLDesc(0)) == [str(dest)]
    assert top_files(dom)[1:] == [str(dest)]
    hmp_write(dom, 0x52, 41 * MiB)
    dom.destroy()
    assert qemu_io_read(dest, "qcow2", 0x21, 0, "32M")
    assert qemu_io_read(dest, "qcow2", 0x51, 40 * MiB, "1M")
    assert qemu_io_read(dest, "qcow2", 0x52, 41 * MiB, "1M")


# -- 3. SIGKILL, then reconcile -----------------------------------------------------------

_COPY_THEN_SLEEP = """
import sys, time
import virtshift.libvirt as libvirt
uri, dest = sys.argv[1:3]
dom = libvirt.open(uri).lookupByName("vm")
dom.blockCopy("vda", f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
              {"bandwidth": 1024 * 1024}, 0)
print("started", flush=True)
time.sleep(600)
"""

_PULL_THEN_SLEEP = """
import sys, time
import virtshift.libvirt as libvirt
dom = libvirt.open(sys.argv[1]).lookupByName("vm")
dom.blockPull("vda", 1, 0)
print("started", flush=True)
time.sleep(600)
"""

_PIVOT_THEN_STOP = """
import os, signal, sys
import virtshift.libvirt as libvirt
from virtshift.qmp.client import Monitor

uri, when = sys.argv[1:3]
execute = Monitor.execute

def stop():
    print("stopped", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)

def held(self, command, *args, **kwargs):
    if command == "block-job-complete" and when == "before":
        stop()
    reply = execute(self, command, *args, **kwargs)
    if command == "block-job-complete" and when == "after":
        stop()
    return reply

Monitor.execute = held
libvirt.open(uri).lookupByName("vm").blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
print("pivoted", flush=True)
"""


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_sigkill_during_copy_then_a_new_connection_pivots(
    uri: str, conn, root: Path, images: Path
) -> None:
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    with spawned(sys.executable, "-c", _COPY_THEN_SLEEP, uri, str(dest)) as proc:
        assert proc.stdout.readline() == "started\n"
        hmp_write(dom, 0x61, 40 * MiB)  # during the copy
        kill(proc)
    hmp_write(dom, 0x62, 41 * MiB)  # its starter is dead; the copy goes on
    assert recorded_jobs(root) == [("copy", "running")]

    c2 = libvirt.open(uri)
    d2 = c2.lookupByName("vm")
    info = d2.blockJobInfo("vda", BYTES)
    assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
    assert info["bandwidth"] == MiB
    assert info["cur"] < info["end"]
    d2.blockJobSetSpeed("vda", 0, 0)
    assert d2.blockJobInfo("vda", BYTES)["bandwidth"] == 0

    def caught_up() -> bool:
        got = d2.blockJobInfo("vda", 0)
        # cur == end is not enough today: see test_cur_equals_end_only_when_ready
        return got["cur"] == got["end"] and mirror_ready(d2.XMLDesc(0)) == "yes"

    wait_until("the copy to catch up", caught_up)
    hmp_write(dom, 0x63, 42 * MiB)  # mirrored
    d2.blockJobAbort("vda", PIVOT)
    live = d2.XMLDesc(0)
    assert chain_of(live) == [str(dest)]
    assert mirror_ready(live) is None
    index = etree.fromstring(live.encode()).find("devices/disk/source").get("index")
    assert top_files(d2) == [f"libvirt-{index}-format", str(dest)]
    assert d2.blockJobInfo("vda", 0) == {}
    assert recorded_jobs(root) == [("copy", "completed")]
    hmp_write(dom, 0x64, 43 * MiB)
    d2.destroy()
    c2.close()
    assert qemu_io_read(dest, "qcow2", 0x21, 0, "32M")
    for pat, mib in ((0x61, 40), (0x62, 41), (0x63, 42), (0x64, 43)):
        assert qemu_io_read(dest, "qcow2", pat, mib * MiB, "1M"), hex(pat)
    assert not qemu_io_read(disk, "qcow2", 0x64, 43 * MiB, "1M")


def _finalize_by_info(d2) -> None:
    assert d2.blockJobInfo("vda", 0) == {}


def _finalize_by_suspend_resume(d2) -> None:
    d2.suspend()
    d2.resume()


def _finalize_by_abort_too_late(d2) -> None:
    """A cancel of a pull QEMU has finished comes too late: the call applies the
    end first (flush, finalize: the pull completes), then finds no job to cancel,
    with libvirt's code and message for an abort that lost the race."""
    with pytest.raises(libvirt.libvirtError) as info:
        d2.blockJobAbort("vda", 0)
    assert info.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG, info.value
    assert "disk vda does not have an active block job" in str(info.value)


@pytest.mark.parametrize(
    "finalize",
    [
        pytest.param(_finalize_by_info, id="blockJobInfo"),
        pytest.param(_finalize_by_abort_too_late, id="abort-too-late"),
        pytest.param(
            _finalize_by_suspend_resume,
            id="suspend-resume",
        ),
    ],
)
def test_pull_that_ended_unwatched_is_finalized_by_the_next_locked_call(
    uri: str, conn, root: Path, images: Path, finalize
) -> None:
    base = make_image(images / "base.qcow2", size="64M")
    offline_write(base, 0x71, 0, "16M")
    top = make_image(images / "top.qcow2", backing=base, size="64M")
    dom = conn.createXML(domain_xml("vm", [("vda", top, "qcow2")]), 0)
    with spawned(sys.executable, "-c", _PULL_THEN_SLEEP, uri) as proc:
        assert proc.stdout.readline() == "started\n"
        hmp_write(dom, 0x72, 40 * MiB)
        kill(proc)
    assert recorded_jobs(root) == [("pull", "running")]
    (job,) = qmp(dom, "query-jobs")
    assert job["status"] == "running"
    # QMP pass-through: unthrottle, let QEMU finish while nobody reconciles; it
    # holds the finished pull at pending (auto-finalize off) and has not rewritten
    # top's backing file name: that waits for the flush of the next locked call
    assert qmp(dom, "block-job-set-speed", device=job["id"], speed=0) == {}
    wait_until(
        "QEMU to finish the pull",
        lambda: [j["status"] for j in qemu_only(dom, "query-jobs")] == ["pending"],
    )
    assert recorded_jobs(root) == [("pull", "running")]  # nobody has applied it yet
    info = qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(top))
    assert json.loads(info)["backing-filename"] == str(base)

    c2 = libvirt.open(uri)
    d2 = c2.lookupByName("vm")
    finalize(d2)
    assert recorded_jobs(root) == [("pull", "completed")]  # no longer active
    assert chain_of(d2.XMLDesc(0)) == [str(top)]
    assert qmp(dom, "query-jobs") == []  # dismissed
    assert d2.blockJobInfo("vda", 0) == {}
    hmp_write(dom, 0x73, 41 * MiB)
    d2.destroy()
    c2.close()
    assert "backing-filename" not in json.loads(
        qemu_img("info", "--output=json", "-f", "qcow2", str(top))
    )
    assert qemu_io_read(top, "qcow2", 0x71, 0, "16M")
    assert qemu_io_read(top, "qcow2", 0x72, 40 * MiB, "1M")
    assert qemu_io_read(top, "qcow2", 0x73, 41 * MiB, "1M")


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_during_pivot(uri: str, conn, root: Path, images: Path, when: str) -> None:
    """The pivoting process is held (SIGSTOP from inside, by a wrapper of
    Monitor.execute) just before or just after it sends ``block-job-complete``,
    then SIGKILLed: a new connection either pivots again (the job is PIVOTING,
    QEMU's is still ready) or finds QEMU has pivoted and applies it."""
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    dom.blockCopy(
        "vda", f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>", None, 0
    )
    hmp_write(dom, 0x81, 40 * MiB)
    # dumpxml alone never reconciles: blockJobInfo records READY once QEMU has it
    wait_until(
        "the copy to be ready",
        lambda: dom.blockJobInfo("vda", 0) and mirror_ready(dom.XMLDesc(0)) == "yes",
    )
    hmp_write(dom, 0x82, 41 * MiB)
    with spawned(sys.executable, "-c", _PIVOT_THEN_STOP, uri, when) as proc:
        assert proc.stdout.readline() == "stopped\n"
        kill(proc)
    assert recorded_jobs(root) == [("copy", "pivoting")]
    hmp_write(dom, 0x83, 42 * MiB)

    c2 = libvirt.open(uri)
    d2 = c2.lookupByName("vm")
    if when == "before":
        assert [j["status"] for j in qmp(dom, "query-jobs")] == ["ready"]
        info = d2.blockJobInfo("vda", 0)
        assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
        assert mirror_ready(d2.XMLDesc(0)) == "pivot"
        assert chain_of(d2.XMLDesc(0)) == [str(disk)]
        d2.blockJobAbort("vda", PIVOT)  # sends block-job-complete again
    else:
        # the hmp_write above was a locked call: it may have applied the pivot already
        wait_until(
            "QEMU to conclude the pivot",
            lambda: [j["status"] for j in qemu_only(dom, "query-jobs")] in (["concluded"], []),
        )
        assert d2.blockJobInfo("vda", 0) == {}  # applies QEMU's pivot (if not done yet)
        with pytest.raises(libvirt.libvirtError) as exc:
            d2.blockJobAbort("vda", PIVOT)
        assert exc.value.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
        assert "does not have an active block job" in str(exc.value)
    live = d2.XMLDesc(0)
    assert chain_of(live) == [str(dest)]
    assert mirror_ready(live) is None
    assert top_files(d2)[1:] == [str(dest)]
    assert recorded_jobs(root) == [("copy", "completed")]
    assert qmp(dom, "query-jobs") == []
    hmp_write(dom, 0x84, 43 * MiB)
    d2.destroy()
    c2.close()
    assert qemu_io_read(dest, "qcow2", 0x21, 0, "32M")
    for pat, mib in ((0x81, 40), (0x82, 41), (0x83, 42), (0x84, 43)):
        assert qemu_io_read(dest, "qcow2", pat, mib * MiB, "1M"), hex(pat)


# -- 4. --wait reports a real failure ----------------------------------------------------


@pytest.mark.parametrize("flags", [("--wait",), ("--wait", "--pivot")], ids=["wait", "pivot"])
def test_wait_exits_1_when_the_copy_fails(
    capsys, uri: str, conn, root: Path, images: Path, tmp_path: Path, flags
) -> None:
    """A copy onto a 1 MiB tmpfs runs out of space: QEMU fails the job, and
    ``--wait`` says so with exit 1; the disk stays on its source."""
    disk = make_image(images / "disk.qcow2", size="32M")
    offline_write(disk, 0x91, 0, "8M")
    with small_tmpfs(tmp_path / "tiny") as tiny:
        dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
        try:
            rc, out, err = run(
                capsys,
                "-c",
                uri,
                "blockcopy",
                "vm",
                "vda",
                "--dest",
                str(tiny / "copy.qcow2"),
                *flags,
                "--verbose",
            )
            assert (rc, out) == (1, "")
            assert err.endswith("error: job failed: No space left on device\n\n"), err
            assert recorded_jobs(root) == [("copy", "failed")]
            assert chain_of(dom.XMLDesc(0)) == [str(disk)]
            assert mirror_ready(dom.XMLDesc(0)) is None
            assert top_files(dom)[1:] == [str(disk)]
            assert dom.blockJobInfo("vda", 0) == {}
            hmp_write(dom, 0x92, 8 * MiB)
        finally:
            if dom.isActive():  # before the umount: QEMU holds files on it
                dom.destroy()
    assert qemu_io_read(disk, "qcow2", 0x91, 0, "8M")
    assert qemu_io_read(disk, "qcow2", 0x92, 8 * MiB, "1M")


def test_wait_timeout_aborts_the_job(capsys, uri: str, conn, root: Path, images: Path) -> None:
    disk = big_disk(images)
    dest = images / "copy.qcow2"
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    rc, out, err = run(
        capsys,
        "-c",
        uri,
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        str(dest),
        "--wait",
        "--bandwidth",
        "1",
        "--timeout",
        "1",
    )
    assert (rc, out) == (1, "")
    assert err == "error: Block Copy aborted: timed out after 1.0 s\n\n"
    assert dom.blockJobInfo("vda", 0) == {}
    assert recorded_jobs(root) == [("copy", "cancelled")]
    assert chain_of(dom.XMLDesc(0)) == [str(disk)]
    dom.destroy()


# -- bugs of src/ reproduced --------------------------------------------------------------


def test_copy_after_an_active_commit(capsys, uri: str, conn, images: Path) -> None:
    base = make_image(images / "base.qcow2", size="32M")
    top = make_image(images / "top.qcow2", backing=base)
    dom = conn.createXML(domain_xml("vm", [("vda", top, "qcow2")]), 0)
    c = ("-c", uri)
    assert run(capsys, *c, "blockcommit", "vm", "vda", "--active", "--pivot")[0] == 0
    assert chain_of(dom.XMLDesc(0)) == [str(base)]
    rc, out, err = run(
        capsys,
        *c,
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        str(images / "copy.qcow2"),
        "--wait",
        "--pivot",
    )
    assert (rc, out, err) == (0, "\nSuccessfully pivoted\n", "")


def test_pivot_releases_the_old_source(capsys, uri: str, conn, images: Path) -> None:
    disk = make_image(images / "disk.qcow2", size="32M")
    conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    rc, _, err = run(
        capsys,
        "-c",
        uri,
        "blockcopy",
        "vm",
        "vda",
        "--dest",
        str(images / "copy.qcow2"),
        "--wait",
        "--pivot",
    )
    assert rc == 0, err
    res = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5 0 64k", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr  # today: Failed to get "write" lock


def test_cur_equals_end_only_when_ready(conn, images: Path) -> None:
    disk = make_image(images / "small.qcow2", size="8M")
    offline_write(disk, 0xA1, 0, "4M")
    dom = conn.createXML(domain_xml("vm", [("vda", disk, "qcow2")]), 0)
    for i in range(4):
        dest = images / f"copy{i}.qcow2"
        dom.blockCopy(
            "vda",
            f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
            {"bandwidth": 2 * MiB},
            0,
        )
        wait_until(
            "cur == end",
            lambda: (j := dom.blockJobInfo("vda", 0)) and j["cur"] == j["end"],
            timeout=30,
        )
        # libvirt-python would pivot now; QEMU must be ready for that
        assert [j["ready"] for j in qmp(dom, "query-block-jobs")] == [True], i
        dom.blockJobAbort("vda", 0)
        assert dom.blockJobInfo("vda", 0) == {}
