"""Symbolic links planted in the driver's root or at a user-given image path.

Inside the root nothing is followed: a link where a state file, lock, log, run
directory, snapshot directory or QMP socket belongs makes the call fail with a
libvirtError, and nothing is written or connected through it.  At a user-given
overlay or copy destination a link is refused too (no clobbering of whatever
it points at, with or without REUSE_EXT).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import destroy_all, domain_xml, make_image, status_pid, tree_state

DISK_ONLY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
REUSE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT


def _error(call: Callable[[], object]) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    return exc.value


def _replace_with_link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the root, with a file a planted link points at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_text("precious\n")
    return d


@pytest.fixture
def disk(images: Path) -> Path:
    return make_image(images / "d.qcow2")


@pytest.mark.parametrize("where", ["config", "lock", "log", "rundir", "snapdir"])
@pytest.mark.parametrize("dangling", [False, True])
def test_link_in_root_is_never_followed(
    conn, root: Path, disk: Path, images: Path, outside: Path, where: str, dangling: bool
) -> None:
    dom = conn.defineXML(domain_xml("d", [("vda", disk, "qcow2")]))
    target = outside / ("nothing" if dangling else "victim")
    if where in ("rundir", "snapdir") and not dangling:
        target = outside
    planted = {
        "config": root / "etc" / "qemu" / "d.xml",
        "lock": root / "run" / "lock" / "d.lock",
        "log": root / "log" / "qemu" / "d.log",
        "rundir": root / "run" / "qemu" / "domain-d",
        "snapdir": root / "lib" / "qemu" / "snapshot" / "d",
    }[where]
    planted.parent.mkdir(parents=True, exist_ok=True)
    _replace_with_link(planted, target)
    before_outside = tree_state(outside)
    before_images = tree_state(images)
    if where == "snapdir":
        snap = f"<domainsnapshot><name>s</name><disks><disk name='vda'><source file='{images}/ov.qcow2'/></disk></disks></domainsnapshot>"
        err = _error(lambda: dom.snapshotCreateXML(snap, DISK_ONLY))
        assert "symbolic link" in str(err)
        err = _error(lambda: dom.snapshotListNames(0))
    elif where == "config":
        err = _error(lambda: conn.lookupByName("d"))
        assert conn.listAllDomains(0) == []  # the refused domain is skipped, not fatal
        err2 = _error(lambda: conn.defineXML(domain_xml("d", [("vda", disk, "qcow2")])))
        assert err2.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    else:
        err = _error(dom.create)
        assert dom.isActive() == 0
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED, str(err)
    assert "symbolic link" in str(err)
    assert tree_state(outside) == before_outside  # nothing written through the link
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert tree_state(images) == before_images  # no overlay left behind
    assert planted.is_symlink()


def test_status_file_link_is_refused(conn, root: Path, disk: Path, outside: Path) -> None:
    dom = conn.defineXML(domain_xml("st", [("vda", disk, "qcow2")]))
    dom.create()
    status = root / "run" / "qemu" / "st.xml"
    copy = outside / "st.xml"
    copy.write_bytes(status.read_bytes())
    _replace_with_link(status, copy)
    err = _error(dom.suspend)
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
    assert "symbolic link" in str(err)
    before = copy.read_bytes()
    _error(dom.destroy)
    assert copy.read_bytes() == before
    status.unlink()
    copy.rename(status)  # the real status back: the domain is managed again
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    dom.destroy()


def test_monitor_socket_link_and_status_paths_reach_no_other_qemu(
    tmp_path: Path, conn, root: Path, disk: Path, images: Path
) -> None:
    """A link in place of a monitor socket, or a status file naming another
    root's socket, never reaches that other QEMU."""
    other_root = tmp_path / "other-root"
    other = libvirt.open(f"qemu:///embed?root={other_root}")
    try:
        victim = other.createXML(
            domain_xml("victim", [("vda", make_image(images / "v.qcow2"), "qcow2")]), 0
        )
        dom = conn.createXML(domain_xml("mine", [("vda", disk, "qcow2")]), 0)
        other_sock = other_root / "run" / "qemu" / "domain-victim" / "monitor.sock"
        assert other_sock.exists()
        # 1. the status file names the other socket: ignored, paths come from the root
        status = root / "run" / "qemu" / "mine.xml"
        text = status.read_text()
        mine_sock = str(root / "run" / "qemu" / "domain-mine" / "monitor.sock")
        assert mine_sock in text
        status.write_text(text.replace(mine_sock, str(other_sock)))
        dom.suspend()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert victim.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        dom.resume()
        # 2. the socket itself replaced by a link to the other one: refused
        _replace_with_link(Path(mine_sock), other_sock)
        err = _error(dom.suspend)
        assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
        assert "not a socket owned by this user" in str(err)
        err = _error(lambda: libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"stop"}', 0))
        assert victim.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(victim, '{"execute":"query-status"}', 0))
        assert reply["return"]["status"] == "running"
        dom.destroy()
    finally:
        destroy_all(other)
        other.close()


def _running_with_link(conn, root: Path, images: Path, outside: Path, name: str, *, dangling: bool):
    """A running domain and, in the images directory, a link to an overlay of its
    disk outside (or to nothing); returns them and the state to compare."""
    top = make_image(images / "top.qcow2")
    dom = conn.createXML(domain_xml(name, [("vda", top, "qcow2")]), 0)
    link = images / "link.qcow2"
    if dangling:
        link.symlink_to(outside / "made-elsewhere.qcow2")
    else:
        make_image(outside / "existing.qcow2", backing=top)
        link.symlink_to(outside / "existing.qcow2")
    return dom, link, _state(dom, root, images, outside)


def _state(dom, root: Path, images: Path, outside: Path):
    return (tree_state(root), tree_state(images), tree_state(outside), dom.XMLDesc(0))


@pytest.mark.parametrize(("dangling", "reuse"), [(False, False), (True, False), (True, True)])
def test_overlay_path_link_is_refused(
    conn, root: Path, images: Path, outside: Path, dangling: bool, reuse: bool
) -> None:
    """A new overlay is never created through a link, and a dangling link is no
    pre-created overlay: refused, nothing changes."""
    dom, link, before = _running_with_link(conn, root, images, outside, "ov", dangling=dangling)
    xml = f"<domainsnapshot><name>s</name><disks><disk name='vda'><source file='{link}'/></disk></disks></domainsnapshot>"
    err = _error(lambda: dom.snapshotCreateXML(xml, DISK_ONLY | (REUSE if reuse else 0)))
    if reuse:
        assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
        assert "does not exist" in str(err)
    else:
        assert err.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
        assert "symbolic link" in str(err)
    assert _state(dom, root, images, outside) == before
    assert dom.snapshotNum(0) == 0
    dom.destroy()


def test_reused_overlay_through_a_link_is_checked_and_used(
    conn, root: Path, images: Path, outside: Path
) -> None:
    """REUSE_EXT follows a link to a pre-created overlay, as libvirt does and as
    oVirt's block storage domains need (each volume is a link to its LV); the
    target must still be an overlay of the current top."""
    dom, link, before = _running_with_link(conn, root, images, outside, "ovr", dangling=False)
    # a link to a file that is not an overlay of the current top: refused, nothing changes
    stray = make_image(outside / "stray.qcow2")
    other = images / "other.qcow2"
    other.symlink_to(stray)
    before = _state(dom, root, images, outside)
    xml = f"<domainsnapshot><name>bad</name><disks><disk name='vda'><source file='{other}'/></disk></disks></domainsnapshot>"
    err = _error(lambda: dom.snapshotCreateXML(xml, DISK_ONLY | REUSE))
    assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert _state(dom, root, images, outside) == before
    # the link to a real overlay of the current top: taken, and QEMU writes the target
    xml = f"<domainsnapshot><name>s</name><disks><disk name='vda'><source file='{link}'/></disk></disks></domainsnapshot>"
    dom.snapshotCreateXML(xml, DISK_ONLY | REUSE)
    assert dom.snapshotNum(0) == 1
    assert f"<source file='{link}'" in dom.XMLDesc(0) or f'<source file="{link}"' in dom.XMLDesc(0)
    assert link.is_symlink()
    dom.destroy()


@pytest.mark.parametrize(("dangling", "reuse"), [(False, False), (True, False), (True, True)])
def test_copy_destination_link_is_refused(
    conn, root: Path, images: Path, outside: Path, dangling: bool, reuse: bool
) -> None:
    """A new copy destination is never created through a link; a dangling link
    is no pre-created destination."""
    dom, link, before = _running_with_link(conn, root, images, outside, "cp", dangling=dangling)
    dest = f"<disk type='file'><source file='{link}'/><driver type='qcow2'/></disk>"
    flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT if reuse else 0
    err = _error(lambda: dom.blockCopy("vda", dest, None, flags))
    if reuse:
        assert err.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
        assert "does not exist" in str(err)
    else:
        assert err.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
        assert "symbolic link" in str(err)
    err = _error(
        lambda: dom.blockRebase(
            "vda",
            str(link),
            0,
            libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY
            | (libvirt.VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT if reuse else 0),
        )
    )
    assert _state(dom, root, images, outside) == before
    assert dom.blockJobInfo("vda", 0) == {}
    dom.destroy()


def test_reused_copy_destination_through_a_link(
    conn, root: Path, images: Path, outside: Path
) -> None:
    """A pre-created copy destination reached through a link is used (the link
    stays a link); without REUSE_EXT the same link is refused."""
    dom, link, _ = _running_with_link(conn, root, images, outside, "cpr", dangling=False)
    dest = f"<disk type='file'><source file='{link}'/><driver type='qcow2'/></disk>"
    dom.blockCopy("vda", dest, None, libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT)
    assert dom.blockJobInfo("vda", 0) != {}
    dom.blockJobAbort("vda", 0)
    assert link.is_symlink()
    assert (outside / "existing.qcow2").is_file()
    dom.destroy()


def test_status_pid_of_another_roots_qemu_is_not_ours(
    tmp_path: Path, conn, root: Path, images: Path
) -> None:
    """A status file naming the pid of a QEMU of another root, even one running a
    domain of the same name and UUID, never lets virtshift signal it."""
    import os
    import signal

    uuid = "6a1c9d3e-0b7f-4e35-9a59-2f0d8b7c1e44"
    other_root = tmp_path / "other-root"
    other = libvirt.open(f"qemu:///embed?root={other_root}")
    try:
        theirs = other.createXML(
            domain_xml("twin", [("vda", make_image(images / "t.qcow2"), "qcow2")], uuid=uuid), 0
        )
        mine = conn.createXML(
            domain_xml("twin", [("vda", make_image(images / "m.qcow2"), "qcow2")], uuid=uuid), 0
        )
        status = root / "run" / "qemu" / "twin.xml"
        my_pid = status_pid(status)
        their_pid = status_pid(other_root / "run" / "qemu" / "twin.xml")
        text = status.read_text()
        assert f'pid="{my_pid}"' in text
        status.write_text(text.replace(f'pid="{my_pid}"', f'pid="{their_pid}"'))
        try:
            # that pid runs in another root's directory: this transient domain is gone
            err = _error(mine.destroy)
            assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
            assert theirs.isActive() == 1
            assert theirs.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        finally:
            os.kill(my_pid, signal.SIGKILL)
    finally:
        destroy_all(other)
        other.close()
