"""External disk snapshots on real QEMU: the proposal's R1-R4 and R9, metadata, bad input.

Every failure test compares the whole observable state before and after: live
and inactive XML, QEMU's block graph (query-block), the snapshot metadata
files and the image directory listing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import (
    domain_xml,
    make_image,
    qemu_chains,
    qemu_io_read,
    status_commands,
    tree_state,
    xml_chains,
)
from .fake_agent import FakeAgent

DISK_ONLY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
ATOMIC = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
REUSE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
QUIESCE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
NO_META = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
REDEFINE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
CURRENT = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
VALIDATE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE
TARGETS = [
    f"vd{chr(ord('a') + i // 26 - 1) if i >= 26 else ''}{chr(ord('a') + i % 26)}" for i in range(64)
]
#: A path whose directory exists but where nobody, not even root, can create a file:
#: QEMU's own attempt fails, after our checks passed.
UNCREATABLE = "/proc/virtshift-cannot-create.qcow2"


def hmp_write(dom, alias: str, pattern: int, offset: int, length: str) -> None:
    cmd = (
        f"qemu-io -d /machine/peripheral/{alias}/virtio-backend "
        f'"write -P 0x{pattern:x} {offset} {length}"'
    )
    libvirt_qemu.qemuMonitorCommand(dom, cmd, 1)


query_block = qemu_chains


def observe(dom, root: Path, images: Path) -> dict:
    """Everything a snapshot may change."""
    return {
        "live": dom.XMLDesc(0),
        "inactive": dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
        "graph": query_block(dom) if dom.isActive() else None,
        "metadata": tree_state(root / "lib"),
        "images": sorted(p.name for p in images.iterdir()),
        "config": tree_state(root / "etc"),
    }


def make_domain(conn, images: Path, n: int, name: str = "vm", **kw):
    disks = [(t, make_image(images / f"{t}.qcow2"), "qcow2") for t in TARGETS[:n]]
    dom = conn.defineXML(domain_xml(name, disks, **kw))
    dom.create()
    return dom


def code_of(call) -> tuple[int, str]:
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    return exc.value.get_error_code(), str(exc.value)


def live_sources(dom) -> dict[str, list[str]]:
    return xml_chains(dom.XMLDesc(0))


# -- ATOMIC success -----------------------------------------------------------------


@pytest.mark.parametrize("ndisks", [1, 3, 16, 64])
def test_atomic_snapshot_of_n_disks(conn, images: Path, root: Path, ndisks: int) -> None:
    dom = make_domain(conn, images, ndisks)
    for i in range(ndisks):
        hmp_write(dom, f"virtio-disk{i}", 0x10 + i, 0, "64k")
    before = live_sources(dom)
    snap = dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>",
                                 DISK_ONLY | ATOMIC)  # fmt: skip
    assert snap.getName() == "s1"
    assert snap.isCurrent() == 1
    after = live_sources(dom)
    graph = query_block(dom)
    for i, t in enumerate(TARGETS[:ndisks]):
        overlay = str(images / f"{t}.s1")  # libvirt's generated name: suffix replaced
        assert after[t] == [overlay, *before[t]]
        assert graph[f"/machine/peripheral/virtio-disk{i}/virtio-backend"][1:] == after[t]
        hmp_write(dom, f"virtio-disk{i}", 0x80 + i, 65536, "64k")
    # the persistent definition now starts from the overlays too
    inactive = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert inactive.find("devices/disk/source").get("file") == str(images / "vda.s1")
    sx = etree.fromstring(snap.getXMLDesc().encode())
    assert sx.findtext("state") == "disk-snapshot"
    assert len(sx.findall("disks/disk[@snapshot='external']")) == ndisks
    assert sx.find("domain/devices/disk/source").get("file") == str(images / "vda.qcow2")
    dom.destroy()
    for i, t in enumerate(TARGETS[:ndisks]):
        base, top = images / f"{t}.qcow2", images / f"{t}.s1"
        assert qemu_io_read(base, "qcow2", 0x10 + i, 0, "64k")
        assert not qemu_io_read(base, "qcow2", 0x80 + i, 65536, "64k")  # the base is frozen
        assert qemu_io_read(top, "qcow2", 0x10 + i, 0, "64k")
        assert qemu_io_read(top, "qcow2", 0x80 + i, 65536, "64k")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(top)],
                capture_output=True,
                check=True,
            ).stdout
        )
        # QEMU's defaults, which the transaction leaves out: a qcow2 overlay
        # created with its backing file's absolute path
        assert info["format"] == "qcow2"
        assert info["backing-filename"] == str(base)
        assert info["backing-filename-format"] == "qcow2"  # explicit backing format
    # and it starts again from the new chain, read from the image headers
    dom.create()
    assert live_sources(dom)["vda"] == [str(images / "vda.s1"), str(images / "vda.qcow2")]
    dom.destroy()


@pytest.mark.parametrize("ndisks", [1, 3, 16])
def test_atomic_failure_changes_nothing(conn, images: Path, root: Path, ndisks: int) -> None:
    dom = make_domain(conn, images, ndisks)
    dom.snapshotCreateXML("<domainsnapshot><name>s0</name></domainsnapshot>", DISK_ONLY)
    state = observe(dom, root, images)
    # every disk but the last gets a creatable overlay; QEMU creates those
    # files, then the last action fails and the transaction is rolled back
    disks = "".join(
        f"<disk name='{t}' snapshot='external'><source file='{images}/{t}.ovl'/></disk>"
        for t in TARGETS[: ndisks - 1]
    )
    last = TARGETS[ndisks - 1]
    xml = (f"<domainsnapshot><name>s1</name><disks>{disks}<disk name='{last}' "
           f"snapshot='external'><source file='{UNCREATABLE}'/></disk></disks></domainsnapshot>")  # fmt: skip
    code, msg = code_of(lambda: dom.snapshotCreateXML(xml, DISK_ONLY | ATOMIC))
    assert code == libvirt.VIR_ERR_INTERNAL_ERROR
    assert "transaction" in msg
    assert observe(dom, root, images) == state
    assert not list(images.glob("*.ovl"))
    assert dom.snapshotCurrent().getName() == "s0"
    assert dom.snapshotListNames() == ["s0"]
    dom.destroy()


def test_per_disk_snapshot_default_from_domain_xml(conn, images: Path) -> None:
    a, b = make_image(images / "a.qcow2"), make_image(images / "b.qcow2")
    xml = domain_xml("vm", [("vda", a, "qcow2"), ("vdb", b, "qcow2")]).replace(
        "<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n"
        f"      <source file='{b}'/>",
        "<disk type='file' device='disk' snapshot='no'>\n      <driver name='qemu' type='qcow2'/>\n"
        f"      <source file='{b}'/>",
    )
    assert "snapshot='no'" in xml
    dom = conn.defineXML(xml)
    dom.create()
    snap = dom.snapshotCreateXML("<domainsnapshot><name>d</name></domainsnapshot>", DISK_ONLY)
    assert live_sources(dom) == {"vda": [str(images / "a.d"), str(a)], "vdb": [str(b)]}
    doc = etree.fromstring(snap.getXMLDesc().encode())
    assert doc.find("disks/disk[@name='vdb']").get("snapshot") == "no"
    dom.destroy()


# -- R3: no transaction -----------------------------------------------------------------


@pytest.fixture
def hiding_emulator(tmp_path: Path) -> str:
    """An emulator path whose QEMU hides 'transaction' (see qemu_hiding_commands.py)."""
    script = Path(__file__).with_name("qemu_hiding_commands.py")
    wrapper = tmp_path / "qemu-no-transaction"
    wrapper.write_text(
        f'#!/bin/sh\nexec {sys.executable} {script} transaction -- /usr/bin/qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_fallback_without_transaction(conn, images: Path, root: Path, hiding_emulator) -> None:
    dom = make_domain(conn, images, 3, extra=f"\n    <emulator>{hiding_emulator}</emulator>")
    caps = etree.fromstring(conn.getDomainCapabilities().encode())  # the real binary has it
    assert caps.find("qemu/command[@name='transaction']").get("supported") == "yes"
    probed = status_commands(root, "vm")
    assert "transaction" not in probed  # R1: this QEMU's probe says no
    assert "blockdev-snapshot-sync" in probed
    state = observe(dom, root, images)
    # R2: ATOMIC with several disks is refused up front
    code, msg = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", DISK_ONLY | ATOMIC))
    assert code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert "transaction" in msg
    # R4: REUSE_EXT implies ATOMIC, so it is refused too
    code, _ = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", DISK_ONLY | REUSE))
    assert code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert observe(dom, root, images) == state
    # ATOMIC with one disk needs no transaction
    one = (
        "<domainsnapshot><name>one</name><disks><disk name='vda'/><disk name='vdb' snapshot='no'/>"
        "<disk name='vdc' snapshot='no'/></disks></domainsnapshot>"
    )
    dom.snapshotCreateXML(one, DISK_ONLY | ATOMIC)
    assert live_sources(dom)["vda"][0] == str(images / "vda.one")
    # R3: disk by disk; the second fails, the first stays switched and says so
    hmp_write(dom, "virtio-disk0", 0x11, 0, "64k")
    xml = f"""<domainsnapshot><name>s1</name><disks>
        <disk name='vda' snapshot='external'><source file='{images}/a.ovl'/></disk>
        <disk name='vdb' snapshot='external'><source file='{UNCREATABLE}'/></disk>
        <disk name='vdc' snapshot='external'><source file='{images}/c.ovl'/></disk>
      </disks></domainsnapshot>"""
    code, msg = code_of(lambda: dom.snapshotCreateXML(xml, DISK_ONLY))
    assert code == libvirt.VIR_ERR_OPERATION_FAILED
    assert "disk 'vdb' failed" in msg
    assert f"'vda' (now on '{images}/a.ovl')" in msg
    sources = live_sources(dom)
    assert sources["vda"][0] == f"{images}/a.ovl"
    assert sources["vdb"] == [str(images / "vdb.qcow2")]
    assert sources["vdc"] == [str(images / "vdc.qcow2")]
    graph = query_block(dom)
    assert graph["/machine/peripheral/virtio-disk0/virtio-backend"][1] == f"{images}/a.ovl"
    assert not (images / "c.ovl").exists()
    assert dom.snapshotListNames() == ["one"]  # no metadata for a partial snapshot
    hmp_write(dom, "virtio-disk0", 0x22, 65536, "64k")
    dom.destroy()
    assert qemu_io_read(images / "a.ovl", "qcow2", 0x11, 0, "64k")
    assert qemu_io_read(images / "a.ovl", "qcow2", 0x22, 65536, "64k")
    assert not qemu_io_read(images / "vda.one", "qcow2", 0x22, 65536, "64k")


# -- R4: REUSE_EXT -------------------------------------------------------------------


def test_reuse_external(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 2)
    hmp_write(dom, "virtio-disk0", 0x33, 0, "64k")
    state = observe(dom, root, images)
    xml = f"""<domainsnapshot><name>r</name><disks>
        <disk name='vda'><source file='{images}/vda-pre.qcow2'/></disk>
        <disk name='vdb' snapshot='no'/></disks></domainsnapshot>"""
    # missing file: refused before QEMU is asked
    code, msg = code_of(lambda: dom.snapshotCreateXML(xml, DISK_ONLY | REUSE))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert "vda-pre.qcow2" in msg
    assert observe(dom, root, images) == state
    # pre-created overlay with a relative backing name: opened as it is (mode existing)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "vda.qcow2", "-F", "qcow2",
                    str(images / "vda-pre.qcow2")], check=True)  # fmt: skip
    header = (images / "vda-pre.qcow2").read_bytes()[:4096]
    dom.snapshotCreateXML(xml, DISK_ONLY | REUSE)
    assert live_sources(dom)["vda"][0] == f"{images}/vda-pre.qcow2"
    assert (images / "vda-pre.qcow2").read_bytes()[:4096] == header  # nothing rewritten
    hmp_write(dom, "virtio-disk0", 0x44, 65536, "64k")
    dom.destroy()
    info = subprocess.run(["qemu-img", "info", "-f", "qcow2", str(images / "vda-pre.qcow2")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "backing file: vda.qcow2" in info  # still relative
    assert qemu_io_read(images / "vda-pre.qcow2", "qcow2", 0x33, 0, "64k")
    assert qemu_io_read(images / "vda-pre.qcow2", "qcow2", 0x44, 65536, "64k")


def test_existing_file_without_reuse_is_refused_and_untouched(
    conn, images: Path, root: Path
) -> None:
    dom = make_domain(conn, images, 1)
    precious = images / "precious.qcow2"
    precious.write_bytes(b"user data, not an image" * 100)
    state = observe(dom, root, images)
    xml = f"<domainsnapshot><disks><disk name='vda'><source file='{precious}'/></disk></disks></domainsnapshot>"
    code, msg = code_of(lambda: dom.snapshotCreateXML(xml, DISK_ONLY))
    assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "already exists and is not a block device" in msg
    assert precious.read_bytes() == b"user data, not an image" * 100
    assert observe(dom, root, images) == state
    dom.destroy()


# -- R9: QUIESCE -----------------------------------------------------------------------


def _agent_path(dom) -> str:
    doc = etree.fromstring(dom.XMLDesc(0).encode())
    return doc.find("devices/channel/source").get("path")


def test_metadata_files_are_what_formatting_the_definitions_gives(
    conn, images: Path, root: Path
) -> None:
    # the new snapshot's file is the text formatted once for its intent, and
    # the old current one's is rewritten from its own text with <active>
    # flipped: both must be exactly what formatting their definitions gives
    from virtshift.xml.snapshot import format_snapshot, parse_snapshot

    dom = make_domain(conn, images, 2)
    for name in ("m1", "m2", "m3"):
        dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", DISK_ONLY)
    files = {p.stem: p.read_text() for p in (root / "lib/qemu/snapshot/vm").glob("*.xml")}
    assert sorted(files) == ["m1", "m2", "m3"]
    for name, text in files.items():
        snap = parse_snapshot(text, redefine=True, internal=True)
        assert bool(snap.current) == (name == "m3")
        assert text.endswith(f"<active>{1 if name == 'm3' else 0}</active>\n</domainsnapshot>\n")
        assert format_snapshot(snap, internal=True) == text
    dom.destroy()


@pytest.mark.parametrize("persistent", [True, False])
def test_intent_parts_give_the_document_the_call_writes(
    conn, images: Path, root: Path, monkeypatch, persistent: bool
) -> None:
    # the intent keeps the new snapshot's document without its <domain>, and the
    # file that domain was read from (the definition for a persistent domain, the
    # status for a transient one); the document is formatted while QEMU works.
    # What a recovery formats from those parts must be the very file the call wrote.
    import virtshift.runtime.snapshot as runtime_snapshot

    kept: list[tuple[dict, bytes]] = []
    real_remove = runtime_snapshot.remove_intent
    origin = root / ("etc/qemu/vm.xml" if persistent else "run/qemu/vm.xml")
    read: list[os.stat_result] = []  # the domain's file as the call found it

    def keep_intent(path: Path) -> None:
        source = path.with_name("snapshot-intent.source.xml")
        kept.append((json.loads(path.read_text()), source.read_bytes()))
        # the file that was read, linked (not copied), though replaced since
        assert source.stat().st_ino == read[-1].st_ino
        assert origin.stat().st_ino != read[-1].st_ino
        real_remove(path)
        assert not path.exists()
        assert source.exists()  # freed by the next snapshot (or with the domain)

    monkeypatch.setattr(runtime_snapshot, "remove_intent", keep_intent)
    disks = [(t, make_image(images / f"{t}.qcow2"), "qcow2") for t in TARGETS[:3]]
    xml = domain_xml("vm", disks)
    dom = conn.defineXML(xml) if persistent else conn.createXML(xml, 0)
    if persistent:
        dom.create()
    # p1: the snapshot's own values are plain fields in the intent; p2 keeps
    # an element of the request as it is (a <source> child), so its intent
    # holds the document with <domain><uuid> for its domain
    seclabel = "<seclabel model='dac' relabel='no'/>"
    overlay = images / f"{TARGETS[0]}.p2-own"
    for name, disk in (
        ("p1", ""),
        (
            "p2",
            f"<disks><disk name='{TARGETS[0]}' snapshot='external'>"
            f"<source file='{overlay}'>{seclabel}</source></disk></disks>",
        ),
    ):
        desc = "caf\u00e9 & <tea> 'quoted' \"too\""
        read.append(origin.stat())
        dom.snapshotCreateXML(
            f"<domainsnapshot><name>{name}</name><description>{escape(desc)}</description>"
            f"{disk}</domainsnapshot>",
            DISK_ONLY | ATOMIC,
        )
    assert len(kept) == 2
    for (intent, source), name in zip(kept, ("p1", "p2"), strict=True):
        assert intent["snapshot"] is None  # the document was not formatted before QEMU
        parts = intent["snapshot_parts"]
        assert parts["kind"] == ("config" if persistent else "status")
        if name == "p1":
            assert isinstance(parts["head"], dict)
            assert parts["head"]["description"] == desc
            assert [d["name"] for d in parts["head"]["disks"]] == list(TARGETS[:3])
        else:
            assert "<domain>" in parts["head"]
            assert "<disk" not in parts["head"].split("<domain>")[1]
            assert "<seclabel" in parts["head"]
        recovered = runtime_snapshot.SnapshotDocument.from_parts(
            parts["head"], parts["kind"], source
        )
        written = (root / "lib/qemu/snapshot/vm" / f"{name}.xml").read_text()
        if name == "p1":  # no longer current: only its <active> changed since
            written = written.replace("<active>0</active>", "<active>1</active>")
        assert recovered == written
        assert "caf\u00e9 &amp; &lt;tea&gt;" in written
        assert (seclabel in written) == (name == "p2")
    dom.destroy()


def test_status_is_built_while_qemu_works_but_not_while_the_guest_is_frozen(
    conn, images: Path, monkeypatch
) -> None:
    # without QUIESCE the new status is built between sending the transaction
    # and its reply; with it, only after the thaw, so the guest stays frozen
    # no longer than QEMU takes
    from virtshift.runtime.driver import Driver

    dom = make_domain(conn, images, 2, agent=True)
    agent = FakeAgent(_agent_path(dom), probe=lambda: False)
    real = Driver.prepare_status

    def prepare_status(self, name, status, **kw):  # type: ignore[no-untyped-def]
        agent.calls.append(("prepare_status", False))
        return real(self, name, status, **kw)

    monkeypatch.setattr(Driver, "prepare_status", prepare_status)
    try:
        dom.snapshotCreateXML("<domainsnapshot><name>plain</name></domainsnapshot>", DISK_ONLY)
        assert [c[0] for c in agent.calls] == ["prepare_status"]
        agent.calls.clear()
        dom.snapshotCreateXML(
            "<domainsnapshot><name>frozen</name></domainsnapshot>", DISK_ONLY | QUIESCE
        )
        assert [c[0] for c in agent.calls if c[0] != "guest-sync"] == [
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw",
        ]
        chains = xml_chains(dom.XMLDesc(0))
        assert chains["vda"][:2] == [str(images / "vda.frozen"), str(images / "vda.plain")]
    finally:
        agent.close()


def test_quiesce_order_and_thaw_on_failure(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 2, agent=True)
    overlay = images / "vda.q1"
    agent = FakeAgent(_agent_path(dom), probe=overlay.exists)
    try:
        dom.snapshotCreateXML("<domainsnapshot><name>q1</name></domainsnapshot>",
                              DISK_ONLY | QUIESCE)  # fmt: skip
        calls = [c for c in agent.calls if c[0] != "guest-sync"]
        # frozen before the overlay existed, thawed after
        assert calls == [("guest-fsfreeze-freeze", False), ("guest-fsfreeze-thaw", True)]
        assert agent.commands()[0] == "guest-sync"
        # a failing snapshot still thaws
        agent.calls.clear()
        state = observe(dom, root, images)
        bad = f"""<domainsnapshot><name>q2</name><disks>
            <disk name='vda'><source file='{images}/x.ovl'/></disk>
            <disk name='vdb'><source file='{UNCREATABLE}'/></disk></disks></domainsnapshot>"""
        code, _ = code_of(lambda: dom.snapshotCreateXML(bad, DISK_ONLY | QUIESCE | ATOMIC))
        assert code == libvirt.VIR_ERR_INTERNAL_ERROR
        assert [c for c in agent.commands() if c != "guest-sync"] == [
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw",
        ]
        assert observe(dom, root, images) == state
        # freeze refused by the guest: nothing happens, nothing to thaw
        agent.calls.clear()
        agent.fail = {"guest-fsfreeze-freeze"}
        code, msg = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", DISK_ONLY | QUIESCE))
        assert code == libvirt.VIR_ERR_OPERATION_FAILED
        assert "guest-fsfreeze-freeze" in msg
        assert "guest-fsfreeze-thaw" not in agent.commands()
        assert observe(dom, root, images) == state
        # an agent that never answers
        agent.fail = set()
        agent.silent = True
        os.environ["VIRTSHIFT_AGENT_TIMEOUT"] = "0.5"
        try:
            code, _ = code_of(
                lambda: dom.snapshotCreateXML("<domainsnapshot/>", DISK_ONLY | QUIESCE)
            )
        finally:
            del os.environ["VIRTSHIFT_AGENT_TIMEOUT"]
        assert code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
        assert observe(dom, root, images) == state
    finally:
        agent.close()
    dom.destroy()


def test_quiesce_without_agent_or_disk_only(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 1)  # no agent channel
    state = observe(dom, root, images)
    code, msg = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", DISK_ONLY | QUIESCE))
    assert code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert "not configured" in msg
    code, _ = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", QUIESCE))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert observe(dom, root, images) == state
    dom.destroy()


# -- flags and metadata -------------------------------------------------------------------


def test_unsupported_flags_and_memory(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 1)
    state = observe(dom, root, images)
    for flags in (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_HALT | DISK_ONLY,
                  libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE, 0):  # fmt: skip
        code, _ = code_of(lambda f=flags: dom.snapshotCreateXML("<domainsnapshot/>", f))
        assert code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    code, _ = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", CURRENT))
    assert code == libvirt.VIR_ERR_INVALID_ARG
    code, _ = code_of(lambda: dom.snapshotCreateXML("<domainsnapshot/>", 1 << 20))
    assert code == libvirt.VIR_ERR_INVALID_ARG
    assert observe(dom, root, images) == state
    dom.destroy()


def test_no_metadata(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 1)
    snap = dom.snapshotCreateXML("<domainsnapshot><name>nm</name></domainsnapshot>",
                                 DISK_ONLY | NO_META)  # fmt: skip
    assert snap.hasMetadata() == 0
    assert "<name>nm</name>" in snap.getXMLDesc()
    assert live_sources(dom)["vda"][0] == str(images / "vda.nm")
    assert dom.snapshotNum() == 0
    assert dom.hasCurrentSnapshot() == 0
    assert not list((root / "lib").rglob("nm.xml"))
    code, _ = code_of(lambda: dom.snapshotLookupByName("nm"))
    assert code == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT
    dom.destroy()


def test_redefine_validate_and_tree_across_processes(conn, images: Path, root: Path, uri) -> None:
    dom = make_domain(conn, images, 1)
    s1 = dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", DISK_ONLY)
    s2 = dom.snapshotCreateXML("<domainsnapshot><name>s2</name></domainsnapshot>", DISK_ONLY)
    assert s2.getParent().getName() == "s1"
    assert s1.listChildrenNames() == ["s2"]
    xml1 = s1.getXMLDesc()
    state = observe(dom, root, images)
    # redefine with a missing parent, and a cycle
    bad_parent = xml1.replace("<name>s1</name>", "<name>s3</name>").replace(
        "<state>", "<parent><name>ghost</name></parent>\n  <state>"
    )
    code, msg = code_of(lambda: dom.snapshotCreateXML(bad_parent, REDEFINE))
    assert code == libvirt.VIR_ERR_INVALID_ARG
    assert "parent ghost for moment s3 not found" in msg
    cycle = xml1.replace("<state>", "<parent><name>s2</name></parent>\n  <state>")
    code, msg = code_of(lambda: dom.snapshotCreateXML(cycle, REDEFINE))
    assert code == libvirt.VIR_ERR_INVALID_ARG
    assert "cycle" in msg
    # VALIDATE: the schema refuses what libvirt's refuses
    code, _ = code_of(
        lambda: dom.snapshotCreateXML(
            "<domainsnapshot><bogus/></domainsnapshot>", DISK_ONLY | VALIDATE
        )
    )
    assert code == libvirt.VIR_ERR_XML_INVALID_SCHEMA
    # a name that exists already
    code, msg = code_of(
        lambda: dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", DISK_ONLY)
    )
    assert code == libvirt.VIR_ERR_OPERATION_FAILED
    assert msg == "operation failed: domain moment s1 already exists"
    assert observe(dom, root, images) == state
    # redefine s1 as current (metadata only)
    dom.snapshotCreateXML(xml1, REDEFINE | CURRENT)
    assert dom.snapshotCurrent().getName() == "s1"
    assert observe(dom, root, images)["live"] == state["live"]
    # another process sees the same tree
    script = textwrap.dedent(f"""
        import virtshift.libvirt as libvirt
        dom = libvirt.open({uri!r}).lookupByName("vm")
        print(dom.snapshotListNames(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL),
              dom.snapshotCurrent().getName(),
              dom.snapshotLookupByName("s2").getParent().getName())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['s1', 's2'] s1 s1"
    dom.destroy()


def test_delete_metadata_children(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 1)
    for name in ("a", "b", "c"):
        dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", DISK_ONLY)
    live = dom.XMLDesc(0)
    a = dom.snapshotLookupByName("a")
    # merging the data of a snapshot that has children is refused, nothing changes
    code, msg = code_of(lambda: a.delete(0))
    assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "children" in msg
    assert dom.XMLDesc(0) == live
    a.delete(
        libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
        | libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY
    )
    assert dom.snapshotListNames() == ["a"]
    assert dom.snapshotCurrent().getName() == "a"  # current (c) was deleted: moves to a
    a.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    assert dom.snapshotNum() == 0
    assert dom.hasCurrentSnapshot() == 0
    assert dom.XMLDesc(0) == live  # metadata only: the disks are untouched
    assert (images / "vda.c").exists()
    dom.destroy()


def test_delete_merges_external_snapshot_data(conn, images: Path) -> None:
    """Without METADATA_ONLY the overlay a snapshot created is committed into the image
    it captured and removed, as libvirt 9 does; guest data survives."""
    dom = make_domain(conn, images, 1)
    hmp_write(dom, "virtio-disk0", 0x01, 0, "1M")
    dom.snapshotCreateXML("<domainsnapshot><name>a</name></domainsnapshot>", DISK_ONLY)
    hmp_write(dom, "virtio-disk0", 0x02, 1048576, "1M")
    dom.snapshotCreateXML("<domainsnapshot><name>b</name></domainsnapshot>", DISK_ONLY)
    hmp_write(dom, "virtio-disk0", 0x03, 2097152, "1M")
    assert live_sources(dom)["vda"] == [
        str(images / "vda.b"),
        str(images / "vda.a"),
        str(images / "vda.qcow2"),
    ]
    dom.snapshotLookupByName("b").delete(0)  # current, its overlay is the active layer
    assert live_sources(dom)["vda"] == [str(images / "vda.a"), str(images / "vda.qcow2")]
    assert not (images / "vda.b").exists()
    assert dom.snapshotListNames() == ["a"]
    assert dom.snapshotCurrent().getName() == "a"
    hmp_write(dom, "virtio-disk0", 0x04, 3145728, "1M")
    dom.snapshotLookupByName("a").delete(0)
    assert live_sources(dom)["vda"] == [str(images / "vda.qcow2")]
    assert not (images / "vda.a").exists()
    assert dom.snapshotNum() == 0
    inactive = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert inactive.find("devices/disk/source").get("file") == str(images / "vda.qcow2")
    dom.destroy()
    for pat, off in ((0x01, 0), (0x02, 1048576), (0x03, 2097152), (0x04, 3145728)):
        assert qemu_io_read(images / "vda.qcow2", "qcow2", pat, off, "1M"), hex(pat)


# -- bad input ----------------------------------------------------------------------------


def _bad_cases(images: Path) -> list[tuple[str, int, str]]:
    return [
        ("<domainsnapshot><disks><disk name='vdz'/></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "no disk named 'vdz'"),
        ("<domainsnapshot><disks><disk name='vda'/><disk name='vda'/></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "disk 'vda' specified twice"),
        (f"<domainsnapshot><disks><disk name='{images}/vda.first'/><disk name='vda'/></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "specified twice"),
        ("<domainsnapshot><disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "require external disk snapshots"),
        ("<domainsnapshot><disks><disk name='vda'><source file='rel/o.qcow2'/></disk></disks></domainsnapshot>",
         libvirt.VIR_ERR_XML_ERROR, "must be absolute"),
        (f"<domainsnapshot><disks><disk name='vda'><source file='{images}/vda.qcow2'/></disk></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "backing chain"),
        (f"<domainsnapshot><disks><disk name='vda'><source file='{images}/same.qcow2'/></disk>"
         f"<disk name='vdb'><source file='{images}/same.qcow2'/></disk></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "also the overlay of disk 'vda'"),
        (f"<domainsnapshot><disks><disk name='vda'><source file='{images}/nodir/o.qcow2'/></disk></disks></domainsnapshot>",
         libvirt.VIR_ERR_INVALID_ARG, "does not exist"),
        ("<domainsnapshot><name>a/b</name></domainsnapshot>", libvirt.VIR_ERR_XML_DETAIL, "can't contain '/'"),
        ("<domainsnapshot><name>.hidden</name></domainsnapshot>", libvirt.VIR_ERR_XML_DETAIL, "can't start with '.'"),
        ("<domainsnapshot><disks><disk name='vda'><driver type='raw'/></disk></disks></domainsnapshot>",
         libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "unsupported: raw"),
        ("<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domainsnapshot><name>&e;</name></domainsnapshot>",
         libvirt.VIR_ERR_XML_ERROR, ""),
        ("<domainsnapshot><name>x</name>", libvirt.VIR_ERR_XML_ERROR, ""),
        ("<domainsnapshot>" + "<description>x</description>" * 60000 + "</domainsnapshot>",
         libvirt.VIR_ERR_XML_ERROR, ""),
        ("<domainsnapshot><memory snapshot='external' file='/m.img'/></domainsnapshot>",
         libvirt.VIR_ERR_OPERATION_UNSUPPORTED, "memory"),
    ]  # fmt: skip


def test_bad_input_changes_nothing(conn, images: Path, root: Path) -> None:
    dom = make_domain(conn, images, 2)
    dom.snapshotCreateXML("<domainsnapshot><name>first</name></domainsnapshot>", DISK_ONLY)
    state = observe(dom, root, images)
    for xml, code, fragment in _bad_cases(images):
        got, msg = code_of(lambda x=xml: dom.snapshotCreateXML(x, DISK_ONLY))
        assert (got, fragment in msg) == (code, True), (xml[:120], got, msg)
        assert "root:x:" not in msg
        assert observe(dom, root, images) == state, xml[:120]
    dom.destroy()


def test_offline_snapshot_of_an_inactive_domain(conn, images: Path, root: Path) -> None:
    disk = make_image(images / "vda.qcow2")
    dom = conn.defineXML(domain_xml("off", [("vda", disk, "qcow2")]))
    snap = dom.snapshotCreateXML("<domainsnapshot/>", 0)  # libvirt-python's own test call
    name = snap.getName()
    assert etree.fromstring(snap.getXMLDesc().encode()).findtext("state") == "shutoff"
    inactive = etree.fromstring(dom.XMLDesc(0).encode())
    assert inactive.find("devices/disk/source").get("file") == str(images / f"vda.{name}")
    dom.create()
    assert live_sources(dom)["vda"] == [str(images / f"vda.{name}"), str(disk)]
    dom.destroy()
    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    assert dom.snapshotNum() == 0
