"""Domains on real QEMU: define, start, live XML, reconnect, HMP writes, destroy."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import domain_xml, make_image, qemu_io_read, status_commands

HMP_WRITE = 'qemu-io -d /machine/peripheral/{dev}/virtio-backend "write -P 0x{pat:x} {off} {len}"'


@pytest.fixture
def two_disks(images: Path) -> tuple[Path, Path, Path]:
    base = make_image(images / "base.qcow2")
    top = make_image(images / "top.qcow2", backing=base)
    data = make_image(images / "data.raw", fmt="raw", size="8M")
    return base, top, data


def test_define_start_live_xml_destroy(conn, two_disks, root: Path) -> None:
    base, top, data = two_disks
    xml = domain_xml("vm1", [("vda", top, "qcow2"), ("vdb", data, "raw")], agent=True)
    dom = conn.defineXML(xml)
    assert dom.name() == "vm1"
    assert len(dom.UUIDString()) == 36
    assert dom.isActive() == 0
    assert dom.isPersistent() == 1
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, 0]
    assert (root / "etc" / "qemu" / "vm1.xml").exists()

    dom.create()
    assert dom.isActive() == 1
    assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]
    assert dom.ID() >= 1

    live = etree.fromstring(dom.XMLDesc(0).encode())
    assert live.get("id") == str(dom.ID())
    vda, vdb = live.findall("devices/disk")
    assert vda.find("alias").get("name") == "virtio-disk0"
    assert vdb.find("alias").get("name") == "virtio-disk1"
    # the chain, read from the images and checked against QEMU's graph
    assert vda.find("source").get("file") == str(top)
    top_index = int(vda.find("source").get("index"))
    bs = vda.find("backingStore")
    assert bs.find("source").get("file") == str(base)
    assert bs.find("format").get("type") == "qcow2"
    assert int(bs.get("index")) < top_index
    assert bs.find("backingStore") is not None
    assert len(bs.find("backingStore")) == 0
    chan = live.find("devices/channel")
    assert chan.find("source").get("path").endswith("org.qemu.guest_agent.0")

    inactive = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert inactive.get("id") is None
    assert inactive.find("devices/disk/alias") is None
    assert inactive.find("devices/disk/backingStore") is None

    # QEMU really has the nodes named as the live XML says
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    nodes = {b["qdev"]: b["inserted"]["node-name"] for b in reply["return"]}
    assert nodes["/machine/peripheral/virtio-disk0/virtio-backend"] == f"libvirt-{top_index}-format"

    names = [d.name() for d in conn.listAllDomains(0)]
    assert names == ["vm1"]
    dom.destroy()
    assert dom.isActive() == 0
    assert not (root / "run" / "qemu" / "vm1.xml").exists()
    dom.undefine()
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.lookupByName("vm1")
    assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert str(exc.value) == "Domain not found: no domain with matching name 'vm1'"


def test_hmp_write_then_offline_read(conn, two_disks) -> None:
    _base, top, data = two_disks
    dom = conn.createXML(domain_xml("w", [("vda", top, "qcow2"), ("vdb", data, "raw")]), 0)
    assert dom.isPersistent() == 0
    libvirt_qemu.qemuMonitorCommand(
        dom, HMP_WRITE.format(dev="virtio-disk0", pat=0xAB, off=0, len="1M"), 1
    )
    libvirt_qemu.qemuMonitorCommand(
        dom, HMP_WRITE.format(dev="virtio-disk1", pat=0xCD, off=1048576, len="64k"), 1
    )
    dom.destroy()
    # transient: gone once destroyed
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName("w")
    assert qemu_io_read(top, "qcow2", 0xAB, 0, "1M")
    assert not qemu_io_read(top, "qcow2", 0xCD, 0, "1M")
    assert qemu_io_read(data, "raw", 0xCD, 1048576, "64k")


def test_reconnect_from_second_process(conn, two_disks, uri: str) -> None:
    _base, top, _data = two_disks
    dom = conn.defineXML(domain_xml("rc", [("vda", top, "qcow2")]))
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    script = textwrap.dedent(f"""
        import json, sys
        import virtshift.libvirt as libvirt
        import virtshift.libvirt_qemu as lq
        conn = libvirt.open({uri!r})
        dom = conn.lookupByName("rc")
        out = {{"active": dom.isActive(), "state": dom.state()}}
        out["status"] = json.loads(lq.qemuMonitorCommand(dom, '{{"execute":"query-status"}}', 0))
        dom.resume()
        out["after"] = dom.state()
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["active"] == 1
    assert out["state"][0] == libvirt.VIR_DOMAIN_PAUSED
    assert out["status"]["return"]["status"] == "prelaunch"
    assert out["after"][0] == libvirt.VIR_DOMAIN_RUNNING
    # and this process sees the change made by the other one
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    dom.destroy()


def test_qemu_outlives_the_starting_process(two_disks, uri: str, root: Path) -> None:
    _base, top, _data = two_disks
    xml_file = root.parent / "vm.xml"
    xml_file.write_text(domain_xml("solo", [("vda", top, "qcow2")]))
    cli = [sys.executable, "-m", "virtshift", "-c", uri]
    assert subprocess.run([*cli, "define", str(xml_file)], capture_output=True).returncode == 0
    res = subprocess.run([*cli, "start", "solo"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Domain 'solo' started" in res.stdout
    # the CLI process is gone; its QEMU is not
    conn = libvirt.open(uri)
    dom = conn.lookupByName("solo")
    assert dom.isActive() == 1
    status = (root / "run" / "qemu" / "solo.xml").read_text()
    pid = int(etree.fromstring(status.encode()).get("pid"))
    assert os.path.exists(f"/proc/{pid}")
    res = subprocess.run([*cli, "destroy", "solo"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert dom.isActive() == 0


def test_capability_probe(conn, two_disks, root: Path, uri: str) -> None:
    _base, top, data = two_disks
    dom = conn.createXML(domain_xml("caps", [("vda", top, "qcow2"), ("vdb", data, "raw")]), 0)
    status = root / "run" / "qemu" / "caps.xml"
    qemu = etree.fromstring(status.read_bytes()).find("qemu")
    # the status names the capability cache entry instead of listing QEMU's commands
    assert qemu.get("caps") is not None
    commands = status_commands(root, "caps")
    assert {
        "transaction",
        "blockdev-snapshot-sync",
        "drive-mirror",
        "block-job-complete",
    } <= commands
    assert qemu.get("version", "").startswith(("7.", "8.", "9.", "10."))
    dc = etree.fromstring(conn.getDomainCapabilities().encode())
    tx = dc.find("qemu/command[@name='transaction']")
    assert tx is not None
    assert tx.get("supported") == "yes"

    def atomic_snapshot(name: str) -> None:
        # two disks, atomic: refused unless the status's commands include 'transaction'
        fresh = libvirt.open(uri).lookupByName("caps")
        fresh.snapshotCreateXML(
            f"<domainsnapshot><name>{name}</name></domainsnapshot>",
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
        )

    # a status file in the older form (the list inline, no entry name) still reads;
    # the next write stores the entry name instead
    doc = etree.fromstring(status.read_bytes())
    old = doc.find("qemu")
    del old.attrib["caps"]
    for name in sorted(commands):
        etree.SubElement(old, "command", name=name)
    status.write_bytes(etree.tostring(doc))
    atomic_snapshot("s1")
    qemu = etree.fromstring(status.read_bytes()).find("qemu")
    assert qemu.get("caps") is not None
    assert status_commands(root, "caps") == commands
    # a cache entry that is gone: the emulator is probed instead, the entry written again
    entry = root / "cache" / "qemu" / qemu.get("caps")
    entry.unlink()
    atomic_snapshot("s2")
    assert status_commands(root, "caps") == commands
    assert [s.getName() for s in dom.listAllSnapshots()] == ["s1", "s2"]
    dom.destroy()


def test_suspend_resume(conn, two_disks) -> None:
    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("sr", [("vda", top, "qcow2")]), 0)
    dom.suspend()
    assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]
    dom.resume()
    assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED]
    dom.destroy()


def test_qemu_dies_behind_our_back(conn, two_disks, root: Path) -> None:
    _base, top, _data = two_disks
    dom = conn.defineXML(domain_xml("crash", [("vda", top, "qcow2")]))
    dom.create()
    pid = int(etree.fromstring((root / "run/qemu/crash.xml").read_bytes()).get("pid"))
    os.kill(pid, 9)
    import time

    deadline = time.monotonic() + 10
    while dom.isActive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dom.isActive() == 0
    dom.create()  # the stale status does not block a new start
    assert dom.isActive() == 1
    dom.destroy()


def test_a_status_cut_short_by_a_power_loss_reads_as_a_qemu_that_is_gone(
    conn, two_disks, root: Path
) -> None:
    # status files are not synced: a power loss ends their QEMU and may leave
    # them empty or cut short.  Such a file of a QEMU that is gone (nothing
    # listens on its monitor) is cleared like any stale status; the same file
    # beside a live QEMU is an error, and nothing is cleared then
    import time

    def kill_and_wait(pid: int) -> None:
        # until its monitor refuses connections: the last of its threads is
        # gone (the first may show as a zombie before)
        from virtshift.qmp.client import connect_unix

        os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connect_unix(str(root / "run/qemu/domain-cut/monitor.sock")).close()
            except ConnectionRefusedError:
                return
            time.sleep(0.02)
        raise AssertionError(f"QEMU {pid} did not die")

    _base, top, _data = two_disks
    dom = conn.defineXML(domain_xml("cut", [("vda", top, "qcow2")]))
    dom.create()
    status = root / "run/qemu/cut.xml"
    text = status.read_bytes()
    status.write_bytes(text[: len(text) // 2])
    with pytest.raises(libvirt.libvirtError) as info:
        dom.isActive()
    assert info.value.get_error_code() == libvirt.VIR_ERR_XML_ERROR
    assert status.read_bytes() == text[: len(text) // 2]
    status.write_bytes(text)
    assert dom.isActive() == 1
    for cut in (b"", text[: len(text) // 2]):
        kill_and_wait(int(etree.fromstring(status.read_bytes()).get("pid")))
        status.write_bytes(cut)
        assert dom.isActive() == 0
        active = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        assert [d.name() for d in active] == []
        dom.create()  # the status is cleared and does not block a new start
        assert dom.isActive() == 1
        assert etree.fromstring(status.read_bytes()).get("pid") != "0"
    dom.destroy()
    dom.undefine()


def test_session_uri_uses_the_per_user_data_dir(two_disks, tmp_path: Path, monkeypatch) -> None:
    _base, top, _data = two_disks
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("VIRTSHIFT_DEFAULT_URI", raising=False)
    conn = libvirt.open()
    assert conn.getURI() == "qemu:///session"
    root = tmp_path / "xdg" / "virtshift" / "session"
    dom = conn.defineXML(domain_xml("sess", [("vda", top, "qcow2")]))
    dom.create()
    try:
        assert (root / "etc" / "qemu" / "sess.xml").exists()
        status = root / "run" / "qemu" / "sess.xml"
        assert status.exists()
        # private to the owner
        assert root.stat().st_mode & 0o777 == 0o700
        assert status.stat().st_mode & 0o777 == 0o600
        assert (root / "log" / "qemu" / "sess.log").stat().st_mode & 0o777 == 0o600
    finally:
        dom.destroy()
    dom.undefine()


def test_libvirt_error_accessors(conn) -> None:
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.lookupByName("nobody")
    e = exc.value
    assert e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert e.get_error_domain() == libvirt.VIR_FROM_QEMU
    assert e.get_error_level() == libvirt.VIR_ERR_ERROR
    assert e.get_error_message() == "Domain not found: no domain with matching name 'nobody'"
    assert e.get_str1() == "no domain with matching name 'nobody'"
    assert e.err[0] == 42
    assert isinstance(e, Exception)


def test_create_xml_over_a_defined_name_is_refused(conn, two_disks, root: Path) -> None:
    _base, top, _data = two_disks
    xml = domain_xml("taken", [("vda", top, "qcow2")])
    conn.defineXML(xml)
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.createXML(xml, 0)
    assert exc.value.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert not (root / "run" / "qemu" / "taken.xml").exists()
    assert conn.lookupByName("taken").isActive() == 0


def test_list_filters(conn, two_disks) -> None:
    _base, top, data = two_disks
    conn.defineXML(domain_xml("p-off", [("vda", top, "qcow2")]))
    conn.createXML(domain_xml("t-on", [("vda", data, "raw")]), libvirt.VIR_DOMAIN_START_PAUSED)

    def names(flags: int) -> list[str]:
        return sorted(d.name() for d in conn.listAllDomains(flags))

    assert names(0) == ["p-off", "t-on"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == ["t-on"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE) == ["p-off"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT) == ["p-off"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT) == ["t-on"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED) == ["t-on"]
    assert names(libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF) == ["p-off"]
    assert conn.listDefinedDomains() == ["p-off"]
    assert len(conn.listDomainsID()) == 1
    conn.lookupByName("t-on").destroy()
    assert names(0) == ["p-off"]


def test_sata_and_scsi_disks(conn, images: Path) -> None:
    """IDE/SATA and SCSI disks start, snapshot and copy like virtio ones (QEMU names
    them by bare id in query-block, virtio ones by QOM path)."""
    disks = [
        (t, make_image(images / f"{t}.qcow2"), b)
        for t, b in (("vda", "virtio"), ("sdb", "sata"), ("sdc", "scsi"))
    ]
    xml = domain_xml("buses", [(t, p, "qcow2") for t, p, _b in disks])
    for t, _p, b in disks:
        xml = xml.replace(f"<target dev='{t}' bus='virtio'/>", f"<target dev='{t}' bus='{b}'/>")
    dom = conn.createXML(xml, 0)
    live = etree.fromstring(dom.XMLDesc(0).encode())
    assert [a.get("name") for a in live.findall("devices/disk/alias")] == [
        "virtio-disk0",
        "sata0-0-1",
        "scsi0-0-0-2",
    ]
    dom.snapshotCreateXML(
        "<domainsnapshot><name>s</name></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
    )
    live = etree.fromstring(dom.XMLDesc(0).encode())
    assert [s.get("file") for s in live.findall("devices/disk/source")] == [
        str(images / f"{t}.s") for t, _p, _b in disks
    ]
    dom.destroy()


def test_submitted_command_answers_like_execute(conn, two_disks, root: Path) -> None:
    # Monitor.submit sends at once and leaves the reply for later: the caller's
    # thread works meanwhile, then gets what execute would have given
    from virtshift.errors import QMPError
    from virtshift.qmp.client import Monitor

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("sub", [("vda", top, "qcow2")]), 0)
    with Monitor(str(root / "run/qemu/domain-sub/monitor.sock")).connect() as mon:
        pending = mon.submit("stop")
        busy = sum(i * i for i in range(20000))  # the caller's own work
        assert busy > 0
        assert pending.result() == {}
        assert pending.done()
        assert mon.execute("query-status")["status"] == "paused"
        assert mon.submit("query-name").result() == mon.execute("query-name")
        bad = mon.submit("blockdev-del", {"node-name": "no-such-node"})
        with pytest.raises(QMPError) as info:
            bad.result()
        assert info.value.error_class == "GenericError"
        assert "no-such-node" in str(info.value)
        mon.execute("cont")
    dom.destroy()


def _read_by_qemu(mon) -> None:
    """Wait until QEMU has read every byte written to ``mon``."""
    deadline = time.monotonic() + 30
    while mon.unread() > 0:
        assert time.monotonic() < deadline, "QEMU did not read the command"
        time.sleep(0.001)


def test_a_primed_command_runs_only_once_its_rest_is_sent(conn, two_disks, root: Path) -> None:
    # Monitor.prime writes all of a command but its closing brace: QEMU reads
    # it, and runs it only when submit() sends the rest
    from virtshift.qmp.client import Monitor

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("prm", [("vda", top, "qcow2")]), 0)
    run = root / "run/qemu/domain-prm"
    query = Monitor(str(run / "query.sock")).connect()
    # primed on a connection still being made: written after the negotiation
    mon = Monitor(str(run / "monitor.sock")).connect_soon()
    try:
        mon.prime("stop")
        _read_by_qemu(mon)
        time.sleep(0.05)
        assert query.execute("query-status")["status"] == "running"
        assert mon.submit("stop").result() == {}
        assert query.execute("query-status")["status"] == "paused"
        # a command with arguments, on a connection made the usual way
        mon.reconnect()
        mon.prime("human-monitor-command", {"command-line": "cont"})
        _read_by_qemu(mon)
        assert query.execute("query-status")["status"] == "paused"
        assert mon.submit("human-monitor-command", {"command-line": "cont"}).result() == ""
        assert query.execute("query-status")["status"] == "running"
    finally:
        mon.close()
        query.close()
    dom.destroy()


def test_a_primed_command_is_withdrawn_when_it_is_not_sent_whole(
    conn, two_disks, root: Path
) -> None:
    # QEMU drops what it read of an unfinished command when its client goes:
    # a close, a process that dies, or another command on the same monitor
    # (which reconnects first) withdraws a primed command, and it never runs
    from virtshift.qmp.client import Monitor

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("wdr", [("vda", top, "qcow2")]), 0)
    run = root / "run/qemu/domain-wdr"
    sock = str(run / "monitor.sock")
    with Monitor(str(run / "query.sock")).connect() as query:
        mon = Monitor(sock).connect()
        mon.prime("stop")
        _read_by_qemu(mon)
        mon.close()
        # the next client of the monitor is served once QEMU has dropped the last
        with Monitor(sock).connect() as after:
            assert after.execute("query-status")["status"] == "running"
        code = (
            "import os, sys, time; from virtshift.qmp.client import Monitor\n"
            "m = Monitor(sys.argv[1]).connect(); m.prime('stop')\n"
            "while m.unread() > 0: time.sleep(0.001)\n"
            "os._exit(0)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, sock], timeout=60, check=False)
        assert done.returncode == 0
        with Monitor(sock).connect() as after:
            assert after.execute("query-status")["status"] == "running"
            after.prime("stop")
            _read_by_qemu(after)
            assert after.execute("query-name") == {"name": "wdr"}
            assert query.execute("query-status")["status"] == "running"
            # the withdrawn command is sent whole when it is submitted after all
            assert after.submit("stop").result() == {}
            assert query.execute("query-status")["status"] == "paused"
            after.execute("cont")
    dom.destroy()


def test_priming_another_command_withdraws_the_primed_one(
    conn, two_disks, root: Path, caplog
) -> None:
    # a command primed on a guess is replaced when another is primed, and
    # kept when the same one is: only the command submitted ever runs
    from virtshift.qmp.client import Monitor

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("rpr", [("vda", top, "qcow2")]), 0)
    run = root / "run/qemu/domain-rpr"
    with Monitor(str(run / "query.sock")).connect() as query:
        mon = Monitor(str(run / "monitor.sock")).connect_soon()
        with caplog.at_level(logging.DEBUG, logger="virtshift.qmp"):
            mon.prime("stop")
            _read_by_qemu(mon)
            mon.prime("query-name")  # the stop is withdrawn
            mon.prime("query-name")  # the same: kept as it is
            _read_by_qemu(mon)
            assert query.execute("query-status")["status"] == "running"
            assert mon.submit("query-name").result() == {"name": "rpr"}
        sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--> ")]
        named = [m for m in sent if "query-name" in m and "execute" in m]
        assert len(named) == 1, sent
        # primed on a new connection, then only its rest was sent
        assert sent[-1] == f"--> (the rest of {json.loads(named[0][4:])['id']})", sent
        assert query.execute("query-status")["status"] == "running"
        # a guess that was right is finished, not sent again
        mon.prime("stop")
        mon.prime("stop")
        assert mon.submit("stop").result() == {}
        assert query.execute("query-status")["status"] == "paused"
        mon.close()
    dom.destroy()


@pytest.mark.parametrize("plain", [False, True])
def test_a_snapshot_primes_its_transaction(
    conn, two_disks, root: Path, caplog, monkeypatch, plain: bool
) -> None:
    # the transaction is written while the request is checked and its intent
    # written, and finished once QEMU may run it; a plain request's (each disk
    # given its overlay file) before the request is even parsed, on a guess
    # the plan then keeps
    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("psn", [("vda", top, "qcow2")]), 0)
    disks = (
        f"<disks><disk name='vda' snapshot='external'><source file='{top.parent / 'psn.ov'}'/>"
        "</disk></disks>"
        if plain
        else ""
    )
    from virtshift.runtime import snapshot as runtime_snapshot

    parse = runtime_snapshot.parse_snapshot
    primed_before_parsing: list[bool] = []

    def parse_snapshot(*args: Any, **kwargs: Any) -> Any:
        said = [r.getMessage() for r in caplog.records]
        primed_before_parsing.append(any('"execute":"transaction"' in m for m in said))
        return parse(*args, **kwargs)

    monkeypatch.setattr(runtime_snapshot, "parse_snapshot", parse_snapshot)
    with caplog.at_level(logging.DEBUG, logger="virtshift.qmp"):
        dom.snapshotCreateXML(
            f"<domainsnapshot><name>s</name>{disks}</domainsnapshot>",
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
        )
    assert primed_before_parsing == [plain]
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--> ")]
    primed = [m for m in sent if '"execute":"transaction"' in m]
    assert len(primed) == 1, sent
    ident = json.loads(primed[0][4:])["id"]
    assert f"--> (the rest of {ident})" in sent
    assert not [r for r in caplog.records if "withdrawn" in r.getMessage()]
    live = etree.fromstring(dom.XMLDesc(0)).find("devices/disk/source")
    assert live is not None
    assert live.get("file") != str(top)
    assert Path(live.get("file", "")).exists()
    dom.destroy()


def test_a_monitor_is_closed_before_its_lock_is_given_up(
    conn, two_disks, root: Path, monkeypatch
) -> None:
    # close() returns with the socket closed, and the object can connect
    # again.  Every monitor a snapshot used is closed by the time it returns,
    # so a process that takes the domain lock next finds the monitor free
    # (QEMU takes one client at a time), even if this one stops right after
    from virtshift.qmp import client

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("cls", [("vda", top, "qcow2")]), 0)
    sock = str(root / "run/qemu/domain-cls/monitor.sock")
    code = (
        "import sys; from virtshift.qmp.client import Monitor\n"
        "with Monitor(sys.argv[1], timeout=10).connect() as m:\n"
        "    print(m.execute('query-status')['status'])\n"
    )

    def other_process() -> tuple[int, str]:
        out = subprocess.run(
            [sys.executable, "-c", code, sock], capture_output=True, text=True, timeout=60
        )
        return out.returncode, out.stdout.strip()

    mon = client.Monitor(sock).connect()
    assert mon.execute("query-status")["status"] == "running"
    mon.close()
    assert not mon.connected
    assert mon._sock is None
    assert other_process() == (0, "running")
    mon.close()  # twice is fine
    mon.reconnect()  # and the object can be connected again
    assert mon.execute("query-name") == {"name": "cls"}
    mon.close()
    # a connection started early and closed before it was waited for
    early = client.Monitor(sock).connect_soon()
    assert not early.connected
    early.close()
    assert other_process() == (0, "running")
    # a snapshot: every monitor it used is closed by the time it returns
    used: list[client.Monitor] = []
    real_close = client.Monitor.close

    def recording(self: client.Monitor) -> None:
        used.append(self)
        real_close(self)

    monkeypatch.setattr(client.Monitor, "close", recording)
    dom.snapshotCreateXML(
        "<domainsnapshot><name>s</name></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
    )
    assert used
    assert all(m._sock is None for m in used)
    monkeypatch.undo()
    assert other_process() == (0, "running")
    dom.destroy()


def test_qmp_messages_are_logged_only_at_debug(conn, two_disks, root: Path, caplog) -> None:
    # the QMP client formats a message for its log only when the log shows it

    from virtshift.qmp.client import Monitor

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("qlog", [("vda", top, "qcow2")]), 0)
    sock = str(root / "run/qemu/domain-qlog/monitor.sock")
    with caplog.at_level(logging.DEBUG, logger="virtshift.qmp"), Monitor(sock).connect() as mon:
        assert mon.execute("query-name") == {"name": "qlog"}
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--> ")]
    got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("<-- ")]
    assert any('"execute":"query-name"' in m for m in sent), sent
    assert any('"name": "qlog"' in m for m in got), got
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtshift.qmp"), Monitor(sock).connect() as mon:
        assert mon.execute("query-name") == {"name": "qlog"}
    assert not [r for r in caplog.records if r.getMessage().startswith(("--> ", "<-- "))]
    dom.destroy()


def test_a_qemu_is_checked_again_when_its_pid_names_another_process(
    conn, two_disks, root: Path, monkeypatch
) -> None:
    # a domain's QEMU is identified once (command line, working directory);
    # later reads trust the pid only while its start time stays the same
    from virtshift.runtime import driver as drvmod

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("ident", [("vda", top, "qcow2")]), 0)
    drv = conn._driver
    assert drv.record("ident").status is not None
    pid = drv.record("ident").status.pid
    assert any(key[0] == pid and key[2] == "ident" for key in drvmod._VERIFIED)
    reads: list[int] = []
    real = drvmod._cmdline

    def counting(p: int) -> list[str]:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(drvmod, "_cmdline", counting)
    assert drv.record("ident").status is not None
    assert reads == []  # known: not read again
    # the same pid with another start time is another process: read again,
    # and a process whose command line is not the domain's QEMU is not it
    monkeypatch.setattr(drvmod, "_proc_start", lambda p: b"1")
    monkeypatch.setattr(drvmod, "_cmdline", lambda p: reads.append(p) or ["sleep", "100"])
    assert drv._read_status("ident") is None  # (nothing cleared: a read only)
    assert reads == [pid]
    monkeypatch.undo()
    assert drv.record("ident").status is not None
    dom.destroy()


def test_status_written_during_a_snapshot_reads_back_as_parsed(
    conn, two_disks, root: Path, monkeypatch
) -> None:
    # a snapshot builds the new status while QEMU works and, while QEMU still
    # runs the transaction and a CPU is spare, keeps what parsing the document
    # gives; a later call in the same process then uses that, and it must be
    # what a fresh process reads
    from virtshift.runtime import snapshot as runtime_snapshot
    from virtshift.runtime.driver import Driver

    _base, top, _data = two_disks
    dom = conn.createXML(domain_xml("prep", [("vda", top, "qcow2")]), 0)
    overlay = top.parent / "prep-snap.qcow2"
    drv = conn._driver

    def no_parsing(text: bytes) -> None:
        raise AssertionError("the status was parsed again")

    # no spare CPU: not read back (QEMU would have waited for it), so the
    # next call parses the file
    monkeypatch.setattr(runtime_snapshot, "_spare_cpu", lambda: False)
    dom.snapshotCreateXML(
        "<domainsnapshot><name>s1</name><disks>"
        f"<disk name='vda' snapshot='external'><source file='{overlay}'/></disk>"
        "</disks></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
    )
    with monkeypatch.context() as patch:
        patch.setattr("virtshift.runtime.driver.parse_status", no_parsing)
        with pytest.raises(AssertionError, match="parsed again"):
            drv.record("prep")
    after = drv.record("prep").status
    assert after == Driver(root).record("prep").status
    assert [layer.path for layer in after.domain.disks[0].source.chain()] == [
        str(overlay),
        str(top),
        str(_base),
    ]

    # read back, the written status is kept parsed (read back when prepared,
    # or afterwards) ...
    for prepare in (
        lambda: drv.prepare_status("prep", after),
        lambda: drv.read_back(drv.prepare_status("prep", after, read_back=False)),
    ):
        drv.write_prepared_status("prep", prepare())
        fresh = Driver(root).record("prep").status
        with monkeypatch.context() as patch:
            patch.setattr("virtshift.runtime.driver.parse_status", no_parsing)
            kept = drv.record("prep").status
        assert kept == fresh
    # ... not read back, it is not, and the next read parses the new file
    drv.write_prepared_status("prep", drv.prepare_status("prep", after, read_back=False))
    with monkeypatch.context() as patch:
        patch.setattr("virtshift.runtime.driver.parse_status", no_parsing)
        with pytest.raises(AssertionError, match="parsed again"):
            drv.record("prep")
    assert drv.record("prep").status == fresh
    dom.destroy()


def test_a_kept_source_is_a_link_to_the_file_read_while_it_is_that_file(
    conn, two_disks, root: Path
) -> None:
    # a snapshot's intent keeps the file its domain was read from: a hard link
    # while the file is the one this driver read (its replacement then frees
    # nothing), a copy of the bytes read once it is not
    from virtshift.store.files import write_atomic

    _base, top, _data = two_disks
    conn.defineXML(domain_xml("keep", [("vda", top, "qcow2")]))
    drv = conn._driver
    config = root / "etc/qemu/keep.xml"
    domain = drv.record("keep").config
    found = drv.source_of("keep", domain)
    assert found is not None
    kind, data = found
    assert kind == "config"
    assert data == config.read_bytes()
    kept = root / "kept.xml"
    drv.keep_source("keep", kind, data, kept)
    assert kept.stat().st_ino == config.stat().st_ino
    write_atomic(config, data.replace(b"<name>keep</name>", b"<name>keep</name>\n"))
    drv.keep_source("keep", kind, data, kept)  # the file was replaced: a copy
    assert kept.stat().st_ino != config.stat().st_ino
    assert kept.read_bytes() == data
    assert config.read_bytes() != data
