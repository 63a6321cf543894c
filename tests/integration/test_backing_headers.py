"""Backing files named by image headers, not by the user.

QEMU is always started with explicit ``-blockdev`` chains, so the files it
opens are exactly the layers of the live XML.  When the XML gives no
``<backingStore>``, the chain is read from the headers like libvirt does, one
image at a time, with the format each header records: nothing is probed,
protocol names are refused, and only regular files and block devices are
accepted (all refused with OPERATION_FAILED naming the file).  A REUSE_EXT
overlay must name the current top as its backing file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import domain_xml, make_image, tree_state


def _error(call) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    return exc.value


def _overlay(path: Path, backing: str, backing_fmt: str | None) -> Path:
    """A qcow2 image whose header names ``backing`` (not opened: -u)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing]
    if backing_fmt:
        argv += ["-F", backing_fmt]
    subprocess.run([*argv, str(path), "16M"], check=True, capture_output=True)
    return path


def xml_files(dom) -> set[str]:
    """Every file of every disk chain in the live XML."""
    doc = etree.fromstring(dom.XMLDesc(0).encode())
    return {s.get("file") for s in doc.iter("source") if s.get("file")}


def graph_files(dom) -> set[str]:
    """Every file QEMU has open, from all its block nodes."""
    reply = json.loads(
        libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-named-block-nodes"}', 0)
    )
    return {n["file"] for n in reply["return"] if n["drv"] in ("file", "host_device")}


def test_header_chain_is_shown_and_is_all_qemu_opens(conn, images: Path) -> None:
    """No <backingStore>: the header's chain (even /etc/passwd as raw, as
    libvirt would) becomes part of the live XML, and QEMU opens nothing else."""
    top = _overlay(images / "top.qcow2", "/etc/passwd", "raw")
    dom = conn.createXML(domain_xml("hdr", [("vda", top, "qcow2")]), 0)
    assert xml_files(dom) == {str(top), "/etc/passwd"}
    assert graph_files(dom) == xml_files(dom)
    dom.destroy()


def test_explicit_chain_wins_over_the_header(conn, images: Path) -> None:
    """An explicit end of chain or another backing file: the header's backing
    file is never opened."""
    other = make_image(images / "other.qcow2")
    top = _overlay(images / "top.qcow2", "/etc/passwd", "raw")
    ended = domain_xml("ended", [("vda", top, "qcow2")]).replace(
        "<target dev='vda'", "<backingStore/>\n      <target dev='vda'"
    )
    dom = conn.createXML(ended, 0)
    assert graph_files(dom) == xml_files(dom) == {str(top)}
    dom.destroy()
    given = domain_xml("given", [("vda", top, "qcow2")]).replace(
        "<target dev='vda'",
        textwrap.dedent(f"""\
        <backingStore type='file'>
              <format type='qcow2'/>
              <source file='{other}'/>
              <backingStore/>
            </backingStore>
            <target dev='vda'"""),
    )
    dom = conn.createXML(given, 0)
    assert graph_files(dom) == xml_files(dom) == {str(top), str(other)}
    dom.destroy()


@pytest.mark.parametrize(
    "backing",
    [
        'json:{"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"9"},"export":"x"}',
        "nbd://127.0.0.1:9/x",
        "http://127.0.0.1:9/x.img",
        "nbd:127.0.0.1:9",
    ],
)
def test_protocol_backing_is_refused(conn, root: Path, images: Path, backing: str) -> None:
    top = _overlay(images / "top.qcow2", backing, "raw")
    dom = conn.defineXML(domain_xml("proto", [("vda", top, "qcow2")]))
    before = tree_state(root, images)
    err = _error(dom.create)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "is not a plain file name" in str(err)
    assert dom.isActive() == 0
    after = tree_state(root, images)
    after.pop(str(root / "run" / "qemu" / "next-id"), None)
    assert after == before


@pytest.mark.parametrize("kind", ["directory", "chardev", "fifo"])
def test_backing_that_is_not_a_file_is_refused(conn, images: Path, kind: str) -> None:
    target = {"directory": images / "adir", "chardev": Path("/dev/zero"), "fifo": images / "fifo"}[
        kind
    ]
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        import os

        os.mkfifo(target)
    top = _overlay(images / "top.qcow2", str(target), "raw")
    dom = conn.defineXML(domain_xml("odd", [("vda", top, "qcow2")]))
    err = _error(dom.create)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "not a regular file or block device" in str(err)
    assert dom.isActive() == 0


def test_backing_format_is_never_probed(conn, images: Path) -> None:
    """A header without a backing format stops the walk: the image below (a
    qcow2 whose own backing is an NBD server) is never opened or probed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        mid = _overlay(images / "mid.qcow2", f"nbd://127.0.0.1:{port}/x", "raw")
        top = _overlay(images / "top.qcow2", str(mid), "qcow2")
        raw = bytearray(top.read_bytes())
        pos = raw.find(bytes.fromhex("E2792ACA"), 0, 65536)  # backing-format extension
        assert pos > 0
        raw[pos : pos + 4] = bytes.fromhex("0badcafe")
        top.write_bytes(bytes(raw))
        dom = conn.defineXML(domain_xml("probe", [("vda", top, "qcow2")]))
        err = _error(dom.create)
        assert err.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
        assert "format of backing image" in str(err)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected: mid.qcow2's backing was never opened
    finally:
        listener.close()


def test_backing_of_another_format_than_declared(conn, images: Path) -> None:
    """Declared qcow2 but raw: refused.  Declared raw but a qcow2 file: opened as
    raw, so the backing file its header names is not opened."""
    plain = images / "plain.raw"
    plain.write_bytes(b"\0" * (1 << 20))
    top = _overlay(images / "top.qcow2", str(plain), "qcow2")
    dom = conn.defineXML(domain_xml("lie1", [("vda", top, "qcow2")]))
    err = _error(dom.create)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "plain.raw" in str(err)
    assert dom.isActive() == 0
    secret = make_image(images / "secret.qcow2")
    mid = make_image(images / "mid.qcow2", backing=secret)
    top2 = _overlay(images / "top2.qcow2", str(mid), "raw")
    dom2 = conn.createXML(domain_xml("lie2", [("vda", top2, "qcow2")]), 0)
    assert graph_files(dom2) == xml_files(dom2) == {str(top2), str(mid)}
    dom2.destroy()


def test_backing_loop_is_refused(conn, images: Path) -> None:
    a, b = images / "a.qcow2", images / "b.qcow2"
    _overlay(a, str(b), "qcow2")
    _overlay(b, str(a), "qcow2")
    dom = conn.defineXML(domain_xml("loop", [("vda", a, "qcow2")]))
    err = _error(dom.create)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "makes a loop" in str(err)


@pytest.mark.parametrize("header", ["other", "none", "wrong-format"])
def test_reused_overlay_must_back_onto_the_current_top(
    conn, root: Path, images: Path, header: str
) -> None:
    top = make_image(images / "top.qcow2")
    dom = conn.createXML(domain_xml("reuse", [("vda", top, "qcow2")]), 0)
    ov = images / "ov.qcow2"
    if header == "other":
        _overlay(ov, "/etc/passwd", "raw")
    elif header == "none":
        make_image(ov)
    else:
        _overlay(ov, str(top), "raw")
    before = (tree_state(root, images), dom.XMLDesc(0), graph_files(dom))
    xml = f"<domainsnapshot><name>s</name><disks><disk name='vda'><source file='{ov}'/></disk></disks></domainsnapshot>"
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    )
    err = _error(lambda: dom.snapshotCreateXML(xml, flags))
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert "not the current top" in str(err)
    assert (tree_state(root, images), dom.XMLDesc(0), graph_files(dom)) == before
    assert dom.snapshotNum(0) == 0
    # the same offline
    dom.destroy()
    pers = conn.defineXML(domain_xml("reuse2", [("vda", top, "qcow2")]))
    before = tree_state(root, images)
    err = _error(lambda: pers.snapshotCreateXML(xml, flags))
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert tree_state(root, images) == before
