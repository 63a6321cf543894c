"""The virsh-like CLI on real QEMU: the issue's walk-through, output and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from virtshift.cli.main import main

from .conftest import domain_xml, make_image, qemu_io_read


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_walkthrough(capsys, uri: str, images: Path, tmp_path: Path) -> None:
    base = make_image(images / "base.qcow2")
    top = make_image(images / "vda.qcow2", backing=base)
    vdb = make_image(images / "vdb.qcow2")
    xml = tmp_path / "vm1.xml"
    xml.write_text(domain_xml("vm1", [("vda", top, "qcow2"), ("vdb", vdb, "qcow2")]))
    c = ("-c", uri)

    assert run(capsys, *c, "define", str(xml)) == (0, f"Domain 'vm1' defined from {xml}\n\n", "")
    rc, out, _ = run(capsys, *c, "start", "vm1")
    assert (rc, out) == (0, "Domain 'vm1' started\n\n")
    rc, out, _ = run(capsys, *c, "list", "--all")
    lines = out.splitlines()
    assert lines[0].split() == ["Id", "Name", "State"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split()[1:] == ["vm1", "running"]
    rc, out, _ = run(capsys, *c, "domblklist", "vm1", "--details")
    rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
    assert rows == [["file", "disk", "vda", str(top)], ["file", "disk", "vdb", str(vdb)]]
    rc, out, _ = run(capsys, *c, "dumpxml", "vm1")
    live = etree.fromstring(out.encode())
    assert live.find("devices/disk/alias").get("name") == "virtio-disk0"
    assert live.find("devices/disk/backingStore/source").get("file") == str(base)
    rc, out, _ = run(capsys, *c, "dumpxml", "vm1", "--inactive")
    assert "alias" not in out
    assert "id=" not in out.splitlines()[0]
    rc, out, _ = run(capsys, *c, "domcapabilities", "vm1")
    caps = etree.fromstring(out.encode())
    assert caps.find("qemu/command[@name='transaction']").get("supported") == "yes"
    rc, out, err = run(
        capsys,
        *c,
        "qemu-monitor-command",
        "vm1",
        "--hmp",
        'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0xab 0 1M"',
    )
    assert rc == 0, err
    rc, out, _ = run(capsys, *c, "qemu-monitor-command", "vm1", '{"execute":"query-status"}')
    assert '"status": "running"' in out
    rc, out, _ = run(capsys, *c, "domstate", "vm1", "--reason")
    assert out.strip() == "running (booted)"
    assert run(capsys, *c, "destroy", "vm1")[:2] == (0, "Domain 'vm1' destroyed\n\n")
    assert qemu_io_read(top, "qcow2", 0xAB, 0, "1M")
    rc, out, _ = run(capsys, *c, "list", "--all")
    assert out.splitlines()[2].split() == ["-", "vm1", "shut", "off"]
    assert run(capsys, *c, "undefine", "vm1")[0] == 0
    rc, out, _ = run(capsys, *c, "list", "--all", "--name")
    assert out.strip() == ""


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("start", "ghost"), 3, "error: Domain not found: no domain with matching name 'ghost'"),
        (("destroy", "ghost"), 3, "error: Domain not found"),
        (("define", "/nonexistent/vm.xml"), 1, "error: Failed to open file '/nonexistent/vm.xml'"),
        (("frobnicate",), 2, "No such command"),
        (("start",), 2, "Missing argument"),
    ],
)
def test_errors_have_no_traceback(capsys, uri: str, args, status: int, message: str) -> None:
    rc, out, err = run(capsys, "-c", uri, *args)
    assert rc == status
    assert message in err
    assert "Traceback" not in err + out


def test_bad_xml_file_and_busy_exit_codes(capsys, uri: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='qemu'><name>x</name")
    rc, _out, err = run(capsys, "-c", uri, "define", str(bad))
    assert rc == 4
    assert err.startswith("error: XML error")
    bad.write_bytes(b"<domain>\xff\xfe</domain>")
    rc, _out, err = run(capsys, "-c", uri, "define", str(bad))
    assert rc == 4
    assert "UTF-8" in err


def test_console_script_and_module(uri: str) -> None:
    for cmd in (["virtshift"], [sys.executable, "-m", "virtshift"]):
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=False)
        assert res.returncode == 0
        assert res.stdout.strip() == "0.1.0"
        res = subprocess.run([*cmd, "-c", uri, "list", "--all"], capture_output=True, text=True)
        assert res.returncode == 0
        assert res.stdout.split()[:3] == ["Id", "Name", "State"]
        res = subprocess.run([*cmd, "-c", "qemu:///system", "list"], capture_output=True, text=True)
        assert res.returncode == 4
        assert res.stderr.startswith("error: no connection driver")


def test_snapshot_verbs_on_real_qemu(capsys, uri: str, images: Path, tmp_path: Path) -> None:
    a = make_image(images / "a.qcow2")
    b = make_image(images / "b.qcow2")
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml("vm", [("vda", a, "qcow2"), ("vdb", b, "qcow2")]))
    c = ("-c", uri)
    assert run(capsys, *c, "define", str(xml))[0] == 0
    assert run(capsys, *c, "start", "vm")[0] == 0
    rc, out, err = run(
        capsys, *c, "snapshot-create-as", "vm", "--name", "s1", "--description", "first",
        "--disk-only", "--atomic",
        "--diskspec", f"vda,snapshot=external,file={images}/a-s1.qcow2,driver=qcow2",
        "--diskspec", "vdb,snapshot=no",
    )  # fmt: skip
    assert (rc, out, err) == (0, "Domain snapshot s1 created\n\n", "")
    rc, out, _ = run(capsys, *c, "snapshot-create-as", "vm", "s2", "--disk-only")
    assert rc == 0
    rc, out, _ = run(capsys, *c, "domblklist", "vm")
    rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
    assert rows == [["vda", f"{images}/a-s1.s2"], ["vdb", f"{images}/b.s2"]]
    rc, out, _ = run(capsys, *c, "snapshot-list", "vm", "--tree")
    assert out == "s1\n  |\n  +- s2\n    \n\n"
    rc, out, _ = run(capsys, *c, "snapshot-list", "vm", "--parent")
    lines = out.splitlines()
    assert lines[0].split() == ["Name", "Creation", "Time", "State", "Parent"]
    assert lines[3].split()[0] == "s2"
    assert lines[3].split()[-2:] == ["disk-snapshot", "s1"]
    rc, out, _ = run(capsys, *c, "snapshot-info", "vm", "--current")
    info = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    assert {k: v.strip() for k, v in info.items()} == {
        "Name": "s2", "Domain": "vm", "Current": "yes", "State": "disk-snapshot",
        "Location": "external", "Parent": "s1", "Children": "0", "Descendants": "0",
        "Metadata": "yes",
    }  # fmt: skip
    rc, out, _ = run(capsys, *c, "snapshot-parent", "vm", "s2")
    assert out == "s1\n"
    rc, out, _ = run(capsys, *c, "snapshot-dumpxml", "vm", "s1")
    doc = etree.fromstring(out.encode())
    assert doc.findtext("description") == "first"
    assert doc.find("disks/disk[@name='vda']/source").get("file") == f"{images}/a-s1.qcow2"
    assert doc.find("disks/disk[@name='vdb']").get("snapshot") == "no"
    rc, out, err = run(capsys, *c, "snapshot-create-as", "vm", "s1", "--disk-only")
    assert rc == 1
    assert err == "error: operation failed: domain moment s1 already exists\n\n"
    rc, out, err = run(capsys, *c, "snapshot-dumpxml", "vm", "nope")
    assert rc == 3
    assert "no domain snapshot with matching name 'nope'" in err
    rc, out, _ = run(capsys, *c, "snapshot-delete", "vm", "s1", "--metadata", "--children")
    assert out == "Domain snapshot s1 deleted\n\n"
    rc, out, err = run(capsys, *c, "snapshot-current", "vm", "--name")
    assert (rc, err) == (3, "error: domain 'vm' has no current snapshot\n\n")
    assert run(capsys, *c, "destroy", "vm")[0] == 0
