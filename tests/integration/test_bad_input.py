"""Bad input gets a libvirtError with libvirt's code, and nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lxml import etree

import virtshift.libvirt as libvirt

from .conftest import blank_backing_format, domain_xml, make_image, status_pid, tree_state


def _code(call) -> tuple[int, str]:
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    return exc.value.get_error_code(), str(exc.value)


@pytest.fixture
def disk(images: Path) -> Path:
    return make_image(images / "d.qcow2")


@pytest.mark.parametrize(
    ("xml", "code", "fragment"),
    [
        ("<domain type='qemu'><name>x</name", libvirt.VIR_ERR_XML_ERROR, ""),
        (
            "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"
            "<domain type='qemu'><name>&e;</name></domain>",
            libvirt.VIR_ERR_XML_ERROR,
            "",
        ),
        (
            "<!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>"
            "<domain type='qemu'><name>&b;</name></domain>",
            libvirt.VIR_ERR_XML_ERROR,
            "",
        ),
        (
            "<domain type='qemu'><name>" + "x" * (2 * 1024 * 1024) + "</name></domain>",
            libvirt.VIR_ERR_XML_ERROR,
            "",
        ),
        ("<network><name>n</name></network>", libvirt.VIR_ERR_XML_ERROR, ""),
        (
            "<domain type='qemu'><name>a/b</name><memory>1024</memory></domain>",
            libvirt.VIR_ERR_XML_ERROR,
            "a/b",
        ),
        (
            "<domain type='qemu'><name>.hidden</name><memory>1024</memory></domain>",
            libvirt.VIR_ERR_XML_ERROR,
            ".hidden",
        ),
    ],
)
def test_define_rejects_bad_xml(conn, root: Path, xml: str, code: int, fragment: str) -> None:
    before = tree_state(root)
    got, msg = _code(lambda: conn.defineXML(xml))
    assert got == code, msg
    assert fragment in msg
    assert "root:" not in msg  # no /etc/passwd content leaks
    assert tree_state(root) == before
    assert conn.listAllDomains(0) == []


def test_duplicate_targets_and_relative_paths(conn, root: Path, disk: Path) -> None:
    before = tree_state(root)
    dup = domain_xml("dup", [("vda", disk, "qcow2"), ("vda", disk, "qcow2")])
    got, msg = _code(lambda: conn.defineXML(dup))
    assert got == libvirt.VIR_ERR_XML_ERROR
    assert "vda" in msg
    rel = domain_xml("rel", [("vda", Path("images/d.qcow2"), "qcow2")])
    got, msg = _code(lambda: conn.defineXML(rel))
    assert got == libvirt.VIR_ERR_XML_ERROR
    assert "absolute" in msg
    assert tree_state(root) == before


def test_duplicate_name_with_other_uuid(conn, root: Path, disk: Path) -> None:
    conn.defineXML(
        domain_xml("one", [("vda", disk, "qcow2")], uuid="11111111-2222-3333-4444-555555555555")
    )
    before = tree_state(root)
    got, msg = _code(
        lambda: conn.defineXML(
            domain_xml("one", [("vda", disk, "qcow2")], uuid="11111111-2222-3333-4444-666666666666")
        )
    )
    assert got == libvirt.VIR_ERR_OPERATION_FAILED
    assert "already exists with uuid 11111111-2222-3333-4444-555555555555" in msg
    got, _ = _code(
        lambda: conn.defineXML(
            domain_xml("two", [("vda", disk, "qcow2")], uuid="11111111-2222-3333-4444-555555555555")
        )
    )
    assert got == libvirt.VIR_ERR_OPERATION_FAILED
    assert tree_state(root) == before


def test_missing_image_start_changes_nothing(conn, root: Path, images: Path) -> None:
    dom = conn.defineXML(domain_xml("miss", [("vda", images / "nope.qcow2", "qcow2")]))
    before = tree_state(root)
    got, msg = _code(dom.create)
    assert got == libvirt.VIR_ERR_SYSTEM_ERROR
    assert "nope.qcow2" in msg
    assert dom.isActive() == 0
    after = tree_state(root)
    after.pop(str(root / "run" / "qemu" / "next-id"), None)
    before.pop(str(root / "run" / "qemu" / "next-id"), None)
    assert after == before


def test_backing_without_format_is_refused(conn, images: Path) -> None:
    base = make_image(images / "b.qcow2")
    top = images / "t.qcow2"
    # an overlay whose header names its backing file but not the backing format
    make_image(top, backing=base)
    blank_backing_format(top)
    info = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", str(top)], capture_output=True, text=True, check=True
    ).stdout
    assert "backing file format" not in info
    dom = conn.defineXML(domain_xml("nofmt", [("vda", top, "qcow2")]))
    got, msg = _code(dom.create)
    assert got == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "format of backing image" in msg
    assert dom.isActive() == 0


def test_network_disk_start_refused(conn) -> None:
    xml = textwrap.dedent("""\
        <domain type='qemu'>
          <name>net</name>
          <memory unit='MiB'>128</memory>
          <os><type arch='x86_64' machine='q35'>hvm</type></os>
          <devices>
            <disk type='network' device='disk'>
              <driver name='qemu' type='raw'/>
              <source protocol='nbd' name='bar'>
                <host name='example.org' port='6000'/>
              </source>
              <target dev='vda' bus='virtio'/>
            </disk>
          </devices>
        </domain>
        """)
    dom = conn.defineXML(xml)  # parses and is kept
    assert "protocol='nbd'" in dom.XMLDesc(0)
    got, msg = _code(dom.create)
    assert got == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "network disk 'vda'" in msg
    assert dom.isActive() == 0


def test_lifecycle_misuse(conn, disk: Path) -> None:
    got, _ = _code(lambda: conn.lookupByName("ghost"))
    assert got == libvirt.VIR_ERR_NO_DOMAIN
    dom = conn.defineXML(domain_xml("m", [("vda", disk, "qcow2")]))
    got, msg = _code(dom.destroy)
    assert got == libvirt.VIR_ERR_OPERATION_INVALID
    assert "not running" in msg
    dom.create()
    got, msg = _code(dom.create)
    assert got == libvirt.VIR_ERR_OPERATION_INVALID
    assert "already running" in msg
    got, _ = _code(lambda: dom.createWithFlags(1 << 20))
    assert got == libvirt.VIR_ERR_INVALID_ARG
    dom.destroy()
    dom.undefine()
    got, _ = _code(dom.undefine)
    assert got == libvirt.VIR_ERR_NO_DOMAIN


def test_bad_uris() -> None:
    got, _ = _code(lambda: libvirt.open("qemu:///system"))
    assert got == libvirt.VIR_ERR_NO_CONNECT
    got, _ = _code(lambda: libvirt.open("qemu:///embed?root=relative/dir"))
    assert got == libvirt.VIR_ERR_INVALID_ARG
    got, _ = _code(lambda: libvirt.open("xen:///"))
    assert got == libvirt.VIR_ERR_NO_CONNECT


def test_destroy_never_signals_a_foreign_pid(conn, disk: Path, root: Path) -> None:
    dom = conn.defineXML(domain_xml("fake", [("vda", disk, "qcow2")]))
    dom.create()
    status = root / "run" / "qemu" / "fake.xml"
    real_pid = status_pid(status)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        doc = etree.fromstring(status.read_bytes())
        doc.set("pid", str(sleeper.pid))
        status.write_bytes(etree.tostring(doc))
        assert dom.isActive() == 0  # the recorded pid is not this domain's QEMU
        got, _ = _code(dom.destroy)
        assert got == libvirt.VIR_ERR_OPERATION_INVALID
        assert sleeper.poll() is None  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
        os.kill(real_pid, 9)


def test_second_process_racing(conn, disk: Path, uri: str, root: Path) -> None:
    """A process holding the domain lock blocks changes, not reads."""
    dom = conn.defineXML(domain_xml("race", [("vda", disk, "qcow2")]))
    dom.create()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from virtshift.runtime.driver import Driver
            d = Driver(Path({str(root)!r}))
            with d.locked("race", "long operation"):
                print("locked", flush=True)
                time.sleep(30)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        os.environ["VIRTSHIFT_LOCK_TIMEOUT"] = "0.3"
        try:
            t0 = time.monotonic()
            got, msg = _code(dom.suspend)
            assert got == libvirt.VIR_ERR_OPERATION_TIMEOUT
            assert "long operation" in msg
            assert str(holder.pid) in msg
            assert time.monotonic() - t0 < 5
            # reads still answer
            assert dom.isActive() == 1
            assert "virtio-disk0" in dom.XMLDesc(0)
            assert [d.name() for d in conn.listAllDomains(0)] == ["race"]
        finally:
            del os.environ["VIRTSHIFT_LOCK_TIMEOUT"]
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    dom.destroy()
