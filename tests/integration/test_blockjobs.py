"""Block jobs on real QEMU with guest writes during every job: no write is lost.

Stream, intermediate and active commit, block copy (full and shallow,
created and reused), cancel, the proposal's whole oVirt flow, VDSM's modern
sequence, events, and every bad input of the block-job issue.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import (
    blank_backing_format,
    domain_xml,
    make_image,
    qemu_chains,
    qemu_img,
    qemu_io_read,
    tree_state,
    xml_chain,
)

MiB = 1024 * 1024
PIVOT = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT


def hmp_write(dom, pattern: int, offset: int, length: str, alias: str = "virtio-disk0") -> None:
    cmd = (f"qemu-io -d /machine/peripheral/{alias}/virtio-backend "
           f'"write -P 0x{pattern:x} {offset} {length}"')  # fmt: skip
    libvirt_qemu.qemuMonitorCommand(dom, cmd, 1)


def chain(dom, target: str = "vda") -> list[str]:
    return xml_chain(dom.XMLDesc(0), target)


def mirror_of(dom, target: str = "vda"):
    doc = etree.fromstring(dom.XMLDesc(0).encode())
    for disk in doc.findall("devices/disk"):
        if disk.find("target").get("dev") == target:
            return disk.find("mirror")
    return None


graph = qemu_chains


def wait_job(dom, disk: str = "vda", *, ready: bool = False, timeout: float = 60) -> None:
    """Poll blockJobInfo like a libvirt-python program: until cur == end (ready) or {}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dom.blockJobInfo(disk, 0)
        if not info:
            return
        if ready and info["cur"] == info["end"]:
            m = mirror_of(dom, disk)
            if m is not None and m.get("ready") == "yes":
                return
        time.sleep(0.02)
    raise AssertionError(f"job on {disk} did not finish: {dom.blockJobInfo(disk, 0)}")


def code_of(call) -> tuple[int, str]:
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    return exc.value.get_error_code(), str(exc.value)


@pytest.fixture
def chain3(images: Path) -> tuple[Path, Path, Path]:
    base = make_image(images / "base.qcow2", size="32M")
    mid = make_image(images / "mid.qcow2", backing=base)
    top = make_image(images / "top.qcow2", backing=mid)
    return base, mid, top


def start3(conn, chain3, name: str = "vm"):
    _base, _mid, top = chain3
    dom = conn.createXML(domain_xml(name, [("vda", top, "qcow2")]), 0)
    return dom


def test_stream_with_base_keeps_base_and_every_write(conn, chain3) -> None:
    base, mid, top = chain3
    dom = start3(conn, chain3)
    hmp_write(dom, 0x11, 0, "1M")
    dom.destroy()
    # data in every layer: base 0x01, mid 0x02, top 0x11
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x01 2M 1M", str(base)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 3M 1M", str(mid)],
        check=True,
        capture_output=True,
    )
    dom = start3(conn, chain3)
    dom.snapshotRebase("vda", str(base), 0, 0)  # the proposal's R8
    hmp_write(dom, 0x33, 4 * MiB, "1M")  # during the stream
    wait_job(dom)
    assert chain(dom) == [str(top), str(base)]
    assert graph(dom)["/machine/peripheral/virtio-disk0/virtio-backend"][1:] == [
        str(top),
        str(base),
    ]
    hmp_write(dom, 0x44, 5 * MiB, "1M")
    dom.destroy()
    info = qemu_img("info", "--output=json", "-f", "qcow2", str(top))
    assert json.loads(info)["backing-filename"] == str(base)
    for pat, off in ((0x11, 0), (0x01, 2 * MiB), (0x02, 3 * MiB), (0x33, 4 * MiB), (0x44, 5 * MiB)):
        assert qemu_io_read(top, "qcow2", pat, off, "1M"), hex(pat)


def test_full_pull_and_events(conn, chain3) -> None:
    _base, _mid, top = chain3
    dom = start3(conn, chain3)
    libvirt.virEventRegisterDefaultImpl()
    seen: list[tuple] = []
    cb_id = conn.domainEventRegisterAny(
        dom,
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
        lambda c, d, disk, typ, status, opaque: seen.append((d.name(), disk, typ, status, opaque)),
        "opaque!",
    )
    path_seen: list[tuple] = []
    cb8 = conn.domainEventRegisterAny(
        None,
        libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB,
        lambda c, d, disk, typ, status, opaque: path_seen.append((disk, status)),
        None,
    )
    hmp_write(dom, 0x55, 0, "1M")
    dom.blockPull("vda", 0, 0)
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        libvirt.virEventRunDefaultImpl()
    assert seen == [
        (
            "vm",
            "vda",
            libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL,
            libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
            "opaque!",
        )
    ]
    assert path_seen == [(str(top), libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)]
    conn.domainEventDeregisterAny(cb_id)
    conn.domainEventDeregisterAny(cb8)
    assert chain(dom) == [str(top)]
    assert dom.blockJobInfo("vda", 0) == {}
    dom.destroy()
    assert "backing" not in json.loads(qemu_img("info", "--output=json", "-f", "qcow2", str(top)))


def test_intermediate_commit_with_delete(conn, chain3) -> None:
    base, mid, top = chain3
    dom = start3(conn, chain3)
    dom.destroy()
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 0 1M", str(mid)],
        check=True,
        capture_output=True,
    )
    dom = start3(conn, chain3)
    hmp_write(dom, 0x13, MiB, "1M")
    dom.blockCommit("vda", "vda[1]", "vda[2]", 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_DELETE)
    hmp_write(dom, 0x14, 2 * MiB, "1M")
    wait_job(dom)
    assert chain(dom) == [str(top), str(base)]
    assert not mid.exists()  # DELETE
    dom.destroy()
    assert qemu_io_read(base, "qcow2", 0x02, 0, "1M")  # mid's data is in base now
    assert qemu_io_read(top, "qcow2", 0x13, MiB, "1M")
    assert qemu_io_read(top, "qcow2", 0x14, 2 * MiB, "1M")


def test_active_commit_and_pivot(conn, chain3, images: Path) -> None:
    base, mid, _top = chain3
    dom = start3(conn, chain3)
    hmp_write(dom, 0x21, 0, "2M")
    code, msg = code_of(lambda: dom.blockCommit("vda", None, None, 0, 0))
    assert code == libvirt.VIR_ERR_INVALID_ARG
    assert "requires active flag" in msg
    dom.blockCommit("vda", str(mid), None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    wait_job(dom, ready=True)
    m = mirror_of(dom)
    assert m.get("job") == "active-commit"
    assert m.get("ready") == "yes"
    hmp_write(dom, 0x22, 4 * MiB, "1M")  # mirrored into mid as well
    dom.blockJobAbort("vda", PIVOT)
    assert chain(dom) == [str(mid), str(base)]
    assert mirror_of(dom) is None
    hmp_write(dom, 0x23, 6 * MiB, "1M")
    dom.destroy()
    for pat, off, ln in ((0x21, 0, "2M"), (0x22, 4 * MiB, "1M"), (0x23, 6 * MiB, "1M")):
        assert qemu_io_read(mid, "qcow2", pat, off, ln)


def test_full_copy_pivot_with_writes(conn, chain3, images: Path) -> None:
    _base, _mid, top = chain3
    dom = start3(conn, chain3)
    hmp_write(dom, 0x31, 0, "4M")
    dest = images / "copy.qcow2"
    dom.blockCopy(
        "vda",
        f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
        {"bandwidth": 64 * MiB, "granularity": 65536},
        0,
    )
    hmp_write(dom, 0x32, 8 * MiB, "1M")  # while copying
    wait_job(dom, ready=True)
    info = dom.blockJobInfo("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
    assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY
    assert info["bandwidth"] == 64 * MiB
    assert dom.blockJobInfo("vda", 0)["bandwidth"] == 64
    m = mirror_of(dom)
    assert (m.get("job"), m.get("ready"), m.find("source").get("file")) == (
        "copy",
        "yes",
        str(dest),
    )
    hmp_write(dom, 0x33, 10 * MiB, "1M")  # mirrored
    dom.blockJobAbort("vda", PIVOT)
    assert chain(dom) == [str(dest)]
    hmp_write(dom, 0x34, 12 * MiB, "1M")
    dom.destroy()
    for pat, off in ((0x31, 0), (0x32, 8 * MiB), (0x33, 10 * MiB), (0x34, 12 * MiB)):
        assert qemu_io_read(dest, "qcow2", pat, off, "1M"), hex(pat)
    assert not qemu_io_read(top, "qcow2", 0x34, 12 * MiB, "1M")


def test_cancel_ready_copy_stays_on_source(conn, chain3, images: Path) -> None:
    base, mid, top = chain3
    dom = start3(conn, chain3)
    dest = images / "copy.qcow2"
    dom.blockRebase(
        "vda",
        str(dest),
        0,
        libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY | libvirt.VIR_DOMAIN_BLOCK_REBASE_SHALLOW,
    )
    wait_job(dom, ready=True)
    hmp_write(dom, 0x41, 0, "1M")
    dom.blockJobAbort("vda", 0)
    assert chain(dom) == [str(top), str(mid), str(base)]
    assert mirror_of(dom) is None
    assert dom.blockJobInfo("vda", 0) == {}
    hmp_write(dom, 0x42, MiB, "1M")
    dom.destroy()
    assert qemu_io_read(top, "qcow2", 0x41, 0, "1M")
    assert qemu_io_read(top, "qcow2", 0x42, MiB, "1M")
    assert qemu_io_read(dest, "qcow2", 0x41, 0, "1M")  # the point-in-time copy stays
    assert json.loads(qemu_img("info", "--output=json", "-f", "qcow2", str(dest)))[
        "backing-filename"
    ] == str(mid)


def test_vdsm_sequence(conn, images: Path, tmp_path: Path) -> None:
    """VDSM's modern live storage migration: snapshot NO_METADATA|REUSE_EXT|DISK_ONLY,
    blockCopy SHALLOW|REUSE_EXT|TRANSIENT_JOB, poll blockJobInfo until cur == end,
    blockJobAbort PIVOT."""
    src, dst = images / "src", images / "dst"
    src.mkdir()
    dst.mkdir()
    base = make_image(src / "base.qcow2", size="32M")
    dom = conn.defineXML(domain_xml("vdsm", [("vda", base, "qcow2")]))
    dom.create()
    hmp_write(dom, 0x51, 0, "2M")
    # the new leaf on the source, pre-created (relative backing), and its twin on the destination
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            str(src / "leaf.qcow2"),
        ],
        check=True,
    )
    snap = (
        f"<domainsnapshot><disks><disk name='vda' snapshot='external' type='file'>"
        f"<source file='{src}/leaf.qcow2'/></disk></disks></domainsnapshot>"
    )
    dom.snapshotCreateXML(
        snap,
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
    )
    assert chain(dom) == [f"{src}/leaf.qcow2", str(base)]
    # copy the now read-only base to the destination, and pre-create the leaf there
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            str(base),
            str(dst / "base.qcow2"),
        ],
        check=True,
    )
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            str(dst / "leaf.qcow2"),
        ],
        check=True,
    )
    hmp_write(dom, 0x52, 4 * MiB, "1M")
    dom.blockCopy(
        "vda",
        f"<disk type='file'><source file='{dst}/leaf.qcow2'/><driver type='qcow2'/></disk>",
        None,
        libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
        | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
    )
    hmp_write(dom, 0x53, 6 * MiB, "1M")
    wait_job(dom, ready=True)
    hmp_write(dom, 0x54, 8 * MiB, "1M")
    dom.blockJobAbort("vda", PIVOT)
    assert chain(dom) == [f"{dst}/leaf.qcow2", f"{dst}/base.qcow2"]
    g = graph(dom)["/machine/peripheral/virtio-disk0/virtio-backend"]
    idx = etree.fromstring(dom.XMLDesc(0).encode()).find("devices/disk/source").get("index")
    assert g[0] == f"libvirt-{idx}-format"
    # QEMU names an image whose backing was attached by node with a json: pseudo
    # name (QEMU-NOTES trap 5); what matters is which files it names
    assert f"{dst}/leaf.qcow2" in g[1]
    assert f"{dst}/base.qcow2" in g[1] + g[-1]
    assert str(src) not in "".join(g)
    # the source chain is released: the persistent definition follows the pivot
    inactive = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    assert inactive.find("devices/disk/source").get("file") == f"{dst}/leaf.qcow2"
    hmp_write(dom, 0x55, 10 * MiB, "1M")
    dom.destroy()
    for pat, off in (
        (0x51, 0),
        (0x52, 4 * MiB),
        (0x53, 6 * MiB),
        (0x54, 8 * MiB),
        (0x55, 10 * MiB),
    ):
        assert qemu_io_read(dst / "leaf.qcow2", "qcow2", pat, off, "1M"), hex(pat)
    # and it starts again on the destination only
    dom.create()
    assert chain(dom) == [f"{dst}/leaf.qcow2", f"{dst}/base.qcow2"]
    dom.destroy()


def _ovirt_setup(conn, images: Path):
    """Storage domain 1 holds base <- snap1; the guest writes to snap1."""
    sd1, sd2 = images / "sd1", images / "sd2"
    sd1.mkdir()
    sd2.mkdir()
    base = make_image(sd1 / "base.qcow2", size="32M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(base)],
        check=True,
        capture_output=True,
    )
    snap1 = make_image(sd1 / "snap1.qcow2", backing=base, size="32M")
    dom = conn.defineXML(domain_xml("ovirt", [("vda", snap1, "qcow2")]))
    dom.create()
    hmp_write(dom, 0x62, MiB, "1M")
    return dom, sd1, sd2, base, snap1


def _precreate_dest_top(sd2: Path) -> None:
    """Snapshot 2 on storage domain 2, backing by relative name onto the copy-to-be
    of Snapshot 1 (-u: that backing file does not exist yet)."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "snap1.qcow2", "-F", "qcow2",
             str(sd2 / "snap2.qcow2"), "32M")  # fmt: skip


def _ovirt_mirror_snapshot(dom, sd1: Path, sd2: Path):
    # oVirt pre-creates Snapshot 2 on storage domain 2, backing by relative name onto
    # the copy-to-be of Snapshot 1
    # (-u: the backing file does not exist yet on the destination)
    _precreate_dest_top(sd2)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(sd1 / "snap1.qcow2"),
            "-F",
            "qcow2",
            str(sd1 / "snap2.qcow2"),
        ],
        check=True,
    )
    xml = f"""<domainsnapshot><name>mig</name><disks>
        <disk name='vda' snapshot='external'>
          <source file='{sd1}/snap2.qcow2'/>
          <mirror file='{sd2}/snap2.qcow2'/>
        </disk></disks></domainsnapshot>"""
    return dom.snapshotCreateXML(
        xml,
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT,
    )


def _copy_layer(src: Path, dst: Path, backing_rel: str | None) -> None:
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            str(src),
            str(dst),
        ],
        check=True,
    )
    if backing_rel is not None:
        subprocess.run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing_rel, "-F", "qcow2", str(dst)],
            check=True,
        )


def test_ovirt_flow_of_the_proposal(conn, images: Path) -> None:
    """base <- snap1 on sd1; mirrored snapshot onto sd2; copy the chain; REOPEN_MIRROR;
    then snapshotRebase onto Base.  Guest writes at every step."""
    dom, sd1, sd2, base, snap1 = _ovirt_setup(conn, images)
    snap = _ovirt_mirror_snapshot(dom, sd1, sd2)
    assert snap.getName() == "mig"
    assert chain(dom) == [f"{sd1}/snap2.qcow2", str(snap1), str(base)]
    m = mirror_of(dom)
    assert m.get("job") == "copy"
    assert m.find("source").get("file") == f"{sd2}/snap2.qcow2"
    hmp_write(dom, 0x63, 2 * MiB, "1M")  # goes to sd1/snap2 and its mirror
    # the copy of the rest of the chain, while the guest runs
    _copy_layer(base, sd2 / "base.qcow2", None)
    hmp_write(dom, 0x64, 3 * MiB, "1M")
    # REOPEN_MIRROR before the chain is complete: refused, nothing changes
    wait_job(dom, ready=True)
    before = (dom.XMLDesc(0), graph(dom))
    code, msg = code_of(lambda: snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert "refusing to pivot" in msg
    assert (dom.XMLDesc(0), graph(dom)) == before
    assert dom.snapshotListNames() == ["mig"]
    _copy_layer(snap1, sd2 / "snap1.qcow2", "base.qcow2")
    # a destination layer that does not record its backing file's format: refused
    # (formats are never probed), nothing changes
    blank_backing_format(sd2 / "snap1.qcow2")
    code, msg = code_of(lambda: snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert "does not record the format of its backing file" in msg
    assert (dom.XMLDesc(0), graph(dom)) == before
    qemu_img(
        "rebase", "-u", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(sd2 / "snap1.qcow2")
    )
    wait_job(dom, ready=True)
    hmp_write(dom, 0x65, 4 * MiB, "1M")
    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR)  # R7
    assert dom.snapshotListNames() == []
    assert chain(dom) == [f"{sd2}/snap2.qcow2", f"{sd2}/snap1.qcow2", f"{sd2}/base.qcow2"]
    g = "".join(graph(dom)["/machine/peripheral/virtio-disk0/virtio-backend"])
    assert all(p in g for p in chain(dom))
    assert str(sd1) not in g
    hmp_write(dom, 0x66, 5 * MiB, "1M")
    # cut Snapshot 1 out: snap2 backed directly by Base (R8)
    dom.snapshotRebase("vda", f"{sd2}/base.qcow2", 0, 0)
    hmp_write(dom, 0x67, 6 * MiB, "1M")
    wait_job(dom)
    assert chain(dom) == [f"{sd2}/snap2.qcow2", f"{sd2}/base.qcow2"]
    dom.destroy()
    top = sd2 / "snap2.qcow2"
    for pat, off in (
        (0x61, 0),
        (0x62, MiB),
        (0x63, 2 * MiB),
        (0x64, 3 * MiB),
        (0x65, 4 * MiB),
        (0x66, 5 * MiB),
        (0x67, 6 * MiB),
    ):
        assert qemu_io_read(top, "qcow2", pat, off, "1M"), hex(pat)
    # storage domain 1 still holds its consistent chain up to the snapshot
    assert qemu_io_read(sd1 / "snap1.qcow2", "qcow2", 0x62, MiB, "1M")


def test_reopen_mirror_refusals_and_created_mirror(conn, images: Path) -> None:
    dom, sd1, sd2, base, snap1 = _ovirt_setup(conn, images)
    plain = dom.snapshotCreateXML(
        "<domainsnapshot><name>plain</name></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
    )
    code, msg = code_of(lambda: plain.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert "no mirrored disk" in msg
    # without REUSE_EXT virtshift creates the mirror, backing onto the old top by absolute path
    xml = f"""<domainsnapshot><name>mig</name><disks>
        <disk name='vda' snapshot='external'><source file='{sd1}/over.qcow2'/>
          <mirror file='{sd2}/m.qcow2'/></disk></disks></domainsnapshot>"""
    mig = dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", "qcow2", str(sd2 / "m.qcow2")))
    assert info["backing-filename"] == f"{sd1}/snap1.plain"
    assert info["backing-filename-format"] == "qcow2"
    hmp_write(dom, 0x81, 0, "1M")
    # a second job on the disk while the mirror runs
    code, _ = code_of(lambda: dom.blockPull("vda", 0, 0))
    assert code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    code, _ = code_of(
        lambda: dom.blockCopy(
            "vda", f"<disk type='file'><source file='{sd2}/x.qcow2'/></disk>", None, 0
        )
    )
    assert code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    assert not (sd2 / "x.qcow2").exists()
    # REOPEN_MIRROR on a snapshot that is not current
    dom._snapshots.set_current(dom.name(), "plain")
    code, msg = code_of(lambda: mig.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR))
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert "not the current snapshot" in msg
    dom._snapshots.set_current(dom.name(), "mig")
    wait_job(dom, ready=True)
    mig.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR)
    assert chain(dom)[0] == f"{sd2}/m.qcow2"
    assert chain(dom)[1:] == [f"{sd1}/snap1.plain", str(snap1), str(base)]
    hmp_write(dom, 0x82, MiB, "1M")
    dom.destroy()
    assert qemu_io_read(sd2 / "m.qcow2", "qcow2", 0x81, 0, "1M")
    assert qemu_io_read(sd2 / "m.qcow2", "qcow2", 0x82, MiB, "1M")
    assert qemu_io_read(sd2 / "m.qcow2", "qcow2", 0x62, MiB, "1M") is False  # overwritten by 0x82
    assert qemu_io_read(sd2 / "m.qcow2", "qcow2", 0x61, 0, "1M") is False  # 0x81 on top


def test_pivot_before_ready(conn, images: Path) -> None:
    disk = make_image(images / "big.qcow2", size="64M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x91 0 48M", str(disk)],
        check=True,
        capture_output=True,
    )
    dom = conn.createXML(domain_xml("slow", [("vda", disk, "qcow2")]), 0)
    dest = images / "slow-copy.qcow2"
    dom.blockCopy("vda", f"<disk type='file'><source file='{dest}'/></disk>", {"bandwidth": MiB}, 0)
    code, msg = code_of(lambda: dom.blockJobAbort("vda", PIVOT))
    assert code == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE
    assert "not ready for pivot" in msg
    assert chain(dom) == [str(disk)]
    dom.blockJobSetSpeed("vda", 0, 0)  # unthrottled: it catches up
    wait_job(dom, ready=True)
    dom.blockJobAbort("vda", PIVOT)
    assert chain(dom) == [str(dest)]
    dom.destroy()
    assert qemu_io_read(dest, "qcow2", 0x91, 0, "48M")


def test_mirror_that_cannot_start_undoes_the_snapshot(conn, images: Path) -> None:
    dom, sd1, sd2, _base, snap1 = _ovirt_setup(conn, images)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(snap1),
            "-F",
            "qcow2",
            str(sd1 / "snap2.qcow2"),
        ],
        check=True,
    )
    xml = f"""<domainsnapshot><name>mig</name><disks>
        <disk name='vda' snapshot='external'><source file='{sd1}/snap2.qcow2'/>
          <mirror file='{sd2}/snap2.qcow2'/></disk></disks></domainsnapshot>"""
    flags = (
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    )

    def state():
        return (
            dom.XMLDesc(0),
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
            graph(dom),
            tree_state(sd1),
            sorted(p.name for p in sd2.iterdir()),
            dom.snapshotListNames(),
        )

    # a mirror that is not an image at all: refused before anything happens
    (sd2 / "snap2.qcow2").write_bytes(b"not an image at all" * 1000)
    before = state()
    code, msg = code_of(lambda: dom.snapshotCreateXML(xml, flags))
    assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "not a usable qcow2 image" in msg
    assert state() == before
    # a good mirror that QEMU cannot open for writing (another process holds its
    # lock): the snapshot is taken, the mirror fails to start, the snapshot is undone
    (sd2 / "snap2.qcow2").unlink()
    _precreate_dest_top(sd2)
    opts = json.dumps(
        {
            "driver": "qcow2",
            "backing": None,
            "file": {"driver": "file", "filename": str(sd2 / "snap2.qcow2")},
        }
    )
    holder = subprocess.Popen(
        ["qemu-io", f"json:{opts}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        assert holder.poll() is None
        hmp_write(dom, 0x71, 0, "1M")
        before = state()
        code, msg = code_of(lambda: dom.snapshotCreateXML(xml, flags))
        assert "snapshot was undone" in msg
        assert "lock" in msg
        assert state() == before
    finally:
        holder.stdin.close()
        holder.wait()
    hmp_write(dom, 0x72, MiB, "1M")
    dom.destroy()
    assert qemu_io_read(snap1, "qcow2", 0x71, 0, "1M")
    assert qemu_io_read(snap1, "qcow2", 0x72, MiB, "1M")


def test_bad_block_job_input(conn, chain3, images: Path) -> None:
    base, mid, top = chain3
    dom = start3(conn, chain3)
    state = (dom.XMLDesc(0), graph(dom), sorted(p.name for p in images.iterdir()))
    copy = libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY
    cases = [
        (
            lambda: dom.blockRebase("vda", str(images / "nowhere.qcow2"), 0, 0),
            libvirt.VIR_ERR_INVALID_ARG,
            "could not find image",
        ),
        (
            lambda: dom.blockCommit("vda", str(top), str(mid), 0, 0),
            libvirt.VIR_ERR_INVALID_ARG,
            "beneath",
        ),
        (
            lambda: dom.blockCommit(
                "vda", "vda[9]", None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            ),
            libvirt.VIR_ERR_INVALID_ARG,
            "backing store index '9'",
        ),
        (lambda: dom.blockRebase("vda", str(top), 0, copy), libvirt.VIR_ERR_INVALID_ARG, "chain"),
        (lambda: dom.blockRebase("vda", str(mid), 0, copy), libvirt.VIR_ERR_INVALID_ARG, "chain"),
        (
            lambda: dom.blockRebase("vda", "relative.qcow2", 0, copy),
            libvirt.VIR_ERR_INVALID_ARG,
            "absolute",
        ),
        (
            lambda: dom.blockCopy(
                "vda", f"<disk type='file'><source file='{base}'/></disk>", None, 0
            ),
            libvirt.VIR_ERR_INVALID_ARG,
            "chain",
        ),
        (lambda: dom.blockRebase("vda", None, 2**62, 0), libvirt.VIR_ERR_OVERFLOW, "bandwidth"),
        (
            lambda: dom.blockCopy(
                "vda",
                f"<disk type='file'><source file='{images}/g.qcow2'/></disk>",
                {"granularity": 1000},
                0,
            ),
            libvirt.VIR_ERR_INVALID_ARG,
            "power of 2",
        ),
        (
            lambda: dom.blockJobAbort("vda", 0),
            libvirt.VIR_ERR_INVALID_ARG,
            "does not have an active block job",
        ),
        (lambda: dom.blockJobInfo("vdz", 0), libvirt.VIR_ERR_INVALID_ARG, "not found"),
        (
            lambda: dom.blockCopy("vda", "<disk type='file'><source file='/x'/>", None, 0),
            libvirt.VIR_ERR_XML_ERROR,
            "",
        ),
    ]
    existing = images / "exists.qcow2"
    existing.write_text("precious")
    cases.append(
        (
            lambda: dom.blockRebase("vda", str(existing), 0, copy),
            libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
            "already exists",
        )
    )
    state = (dom.XMLDesc(0), graph(dom), sorted(p.name for p in images.iterdir()))
    for call, code, fragment in cases:
        got, msg = code_of(call)
        assert (got, fragment in msg) == (code, True), msg
        assert (dom.XMLDesc(0), graph(dom), sorted(p.name for p in images.iterdir())) == state, msg
    assert existing.read_text() == "precious"
    with pytest.raises(TypeError):
        dom.blockCopy("vda", "<disk/>", ["not", "a", "dict"], 0)
    dom.destroy()


def test_mirror_snapshot_bad_input(conn, images: Path) -> None:
    a, b = make_image(images / "a.qcow2"), make_image(images / "b.qcow2")
    dom = conn.createXML(domain_xml("mm", [("vda", a, "qcow2"), ("vdb", b, "qcow2")]), 0)
    (images / "exists.qcow2").write_text("precious")
    state = (dom.XMLDesc(0), graph(dom), tree_state(images))
    two = f"""<domainsnapshot><disks>
        <disk name='vda'><source file='{images}/a.ov'/><mirror file='{images}/a.m'/></disk>
        <disk name='vdb'><source file='{images}/b.ov'/><mirror file='{images}/b.m'/></disk>
      </disks></domainsnapshot>"""
    code, msg = code_of(
        lambda: dom.snapshotCreateXML(two, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
    )
    assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "at most one" in msg
    exists = f"""<domainsnapshot><disks>
        <disk name='vda'><source file='{images}/a.ov'/><mirror file='{images}/exists.qcow2'/></disk>
        <disk name='vdb' snapshot='no'/></disks></domainsnapshot>"""
    code, msg = code_of(
        lambda: dom.snapshotCreateXML(exists, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
    )
    assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    assert "already exists" in msg
    missing = exists.replace("exists.qcow2", "missing.qcow2")
    code, _ = code_of(
        lambda: dom.snapshotCreateXML(
            missing,
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT,
        )
    )
    assert code == libvirt.VIR_ERR_OPERATION_INVALID
    assert (dom.XMLDesc(0), graph(dom), tree_state(images)) == state
    assert (images / "exists.qcow2").read_text() == "precious"
    dom.destroy()


def test_synchronous_writes_copy_and_async_abort(conn, chain3, images: Path) -> None:
    _base, _mid, top = chain3
    dom = start3(conn, chain3)
    dest = images / "sync.qcow2"
    dom.blockCopy(
        "vda",
        f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
        {"buf-size": 1048576},
        libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES | libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW,
    )
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-jobs"}', 0))
    assert [j["type"] for j in reply["return"]] == ["mirror"]
    wait_job(dom, ready=True)
    hmp_write(dom, 0xA1, 0, "1M")
    dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC)
    wait_job(dom)  # ends by itself; the next call that looks applies it
    assert mirror_of(dom) is None
    assert chain(dom)[0] == str(top)
    dom.destroy()
    assert qemu_io_read(dest, "qcow2", 0xA1, 0, "1M")  # written through to the copy
