"""plan_start and chain_from_image_info: pure, exact argv and chains."""

from __future__ import annotations

import json

import pytest

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import Channel, Disk, Domain, StorageSource
from virtshift.ops.start import (
    chain_from_image_info,
    disk_alias,
    plan_start,
)


def _disk(
    target: str,
    path: str,
    fmt: str = "qcow2",
    backing: StorageSource | None = None,
    bus: str = "virtio",
) -> Disk:
    src = StorageSource(path=path, format=fmt, backing=backing, backing_end=backing is None)
    return Disk(target=target, bus=bus, source=src)


def _plan(dom: Domain):
    return plan_start(
        dom,
        emulator="/usr/bin/qemu-system-x86_64",
        monitor="/r/d/monitor.sock",
        query_monitor="/r/d/query.sock",
        agent_socket="/r/d/org.qemu.guest_agent.0",
        accel="tcg",
        rundir="/r/d",
    )


def _blockdevs(argv: list[str]) -> list[dict]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]


def test_chain_numbered_bottom_up_with_explicit_formats() -> None:
    base = StorageSource(path="/img/base.raw", format="raw", backing_end=True)
    mid = StorageSource(path="/img/mid.qcow2", format="qcow2", backing=base)
    dom = Domain(
        name="vm",
        uuid="u-1",
        memory_kib=131072,
        disks=(_disk("vda", "/img/top.qcow2", backing=mid), _disk("vdb", "/img/data.qcow2")),
    )
    plan = _plan(dom)
    vda, vdb = plan.domain.disks
    assert [layer.index for layer in vda.source.chain()] == [3, 2, 1]
    assert [layer.node_name for layer in vda.source.chain()] == [
        "libvirt-3-format",
        "libvirt-2-format",
        "libvirt-1-format",
    ]
    assert vdb.source.index == 4
    assert vdb.source.backing is None
    assert vdb.source.backing_end
    assert plan.next_index == 5
    assert (vda.alias, vdb.alias) == ("virtio-disk0", "virtio-disk1")
    nodes = _blockdevs(plan.argv)
    assert nodes[0] == {
        "driver": "file",
        "filename": "/img/base.raw",
        "node-name": "libvirt-1-storage",
        "auto-read-only": True,
        "discard": "unmap",
    }
    assert nodes[1] == {
        "node-name": "libvirt-1-format",
        "read-only": True,
        "driver": "raw",
        "file": "libvirt-1-storage",
    }
    assert nodes[3]["backing"] == "libvirt-1-format"
    assert nodes[3]["read-only"] is True
    assert nodes[5] == {
        "node-name": "libvirt-3-format",
        "read-only": False,
        "driver": "qcow2",
        "file": "libvirt-3-storage",
        "backing": "libvirt-2-format",
    }
    assert (
        nodes[7]["backing"] is None
    )  # qcow2 without backing: explicit null, never opened from the header
    devices = [plan.argv[i + 1] for i, a in enumerate(plan.argv) if a == "-device"]
    assert json.loads(devices[0]) == {
        "driver": "virtio-blk-pci",
        "drive": "libvirt-3-format",
        "id": "virtio-disk0",
    }


def test_argv_basics_and_relative_sockets() -> None:
    dom = Domain(
        name="vm",
        uuid="u-1",
        memory_kib=262144,
        vcpu=2,
        machine="pc",
        disks=(_disk("vda", "/img/a.qcow2"),),
        channels=(
            Channel(type="unix", target_type="virtio", target_name="org.qemu.guest_agent.0"),
        ),
    )
    plan = _plan(dom)
    argv = plan.argv
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert argv[argv.index("-name") + 1] == "guest=vm,debug-threads=on"
    assert argv[argv.index("-machine") + 1] == "pc,accel=tcg"
    assert argv[argv.index("-m") + 1] == "256"
    assert argv[argv.index("-smp") + 1] == "2"
    assert "-S" in argv
    assert "-nodefaults" in argv
    assert "socket,id=charmonitor,path=monitor.sock,server=on,wait=off" in argv
    assert "socket,id=charquery,path=query.sock,server=on,wait=off" in argv
    assert "socket,id=charchannel0,path=org.qemu.guest_agent.0,server=on,wait=off" in argv
    ch = plan.domain.channels[0]
    assert ch.path == "/r/d/org.qemu.guest_agent.0"
    assert ch.alias == "channel0"


def test_paths_with_commas_are_escaped_for_qemu() -> None:
    dom = Domain(
        name="vm",
        uuid="u",
        memory_kib=1024,
        disks=(_disk("vda", "/img/a.qcow2"),),
        channels=(
            Channel(
                type="unix",
                path="/x,y/agent.sock",
                target_type="virtio",
                target_name="org.qemu.guest_agent.0",
            ),
        ),
    )
    assert "socket,id=charchannel0,path=/x,,y/agent.sock,server=on,wait=off" in _plan(dom).argv


@pytest.mark.parametrize(
    ("disk", "detail"),
    [
        (
            Disk(
                target="vda", type="network", source=StorageSource(type="network", protocol="nbd")
            ),
            "network disk 'vda'",
        ),
        (
            Disk(
                target="hdc",
                device="cdrom",
                source=StorageSource(path="/a.iso", format="raw", backing_end=True),
            ),
            "cdrom",
        ),
        (_disk("vda", "/img/a.vmdk", fmt="vmdk"), "explicit format"),
        (_disk("vda", "/img/a.qcow2", bus="usb"), "bus 'usb'"),
    ],
)
def test_refused_configurations(disk: Disk, detail: str) -> None:
    with pytest.raises(VirtError) as exc:
        _plan(Domain(name="vm", uuid="u", memory_kib=1024, disks=(disk,)))
    assert exc.value.code == ErrorCode.CONFIG_UNSUPPORTED
    assert detail in exc.value.message


@pytest.mark.parametrize(
    ("target", "bus", "alias"),
    [
        ("vda", "virtio", "virtio-disk0"),
        ("vdz", "virtio", "virtio-disk25"),
        ("vdaa", "virtio", "virtio-disk26"),
        ("sdb", "sata", "sata0-0-1"),
        ("sdc", "scsi", "scsi0-0-0-2"),
        ("hdb", "ide", "ide0-0-1"),
        ("hdc", "ide", "ide0-1-0"),
    ],
)
def test_aliases_like_libvirt(target: str, bus: str, alias: str) -> None:
    assert disk_alias(Disk(target=target, bus=bus)) == alias


def test_chain_from_image_info() -> None:
    infos = [
        {
            "filename": "/i/top.qcow2",
            "format": "qcow2",
            "backing-filename": "base.qcow2",
            "full-backing-filename": "/i/base.qcow2",
            "backing-filename-format": "qcow2",
        },
        {
            "filename": "/i/base.qcow2",
            "format": "qcow2",
            "backing-filename": "/i/raw.img",
            "backing-filename-format": "raw",
        },
        {"filename": "/i/raw.img", "format": "raw"},
    ]
    top = StorageSource(path="/i/top.qcow2", format="qcow2")
    chain = chain_from_image_info(top, infos, disk="vda").chain()
    assert [(c.path, c.format) for c in chain] == [
        ("/i/top.qcow2", "qcow2"),
        ("/i/base.qcow2", "qcow2"),
        ("/i/raw.img", "raw"),
    ]
    assert chain[-1].backing_end
    assert not chain[0].backing_end


def test_chain_refuses_missing_backing_format_and_mismatch() -> None:
    top = StorageSource(path="/i/top.qcow2", format="qcow2")
    with pytest.raises(VirtError) as exc:
        chain_from_image_info(
            top, [{"format": "qcow2", "backing-filename": "/i/b"}, {}], disk="vda"
        )
    assert exc.value.code == ErrorCode.CONFIG_UNSUPPORTED
    assert "format of backing image '/i/b'" in exc.value.message
    with pytest.raises(VirtError) as exc:
        chain_from_image_info(top, [{"format": "raw"}], disk="vda")
    assert "is raw, not qcow2" in exc.value.message
    with pytest.raises(VirtError) as exc:
        chain_from_image_info(
            top,
            [{"format": "qcow2", "backing-filename": "/i/b", "backing-filename-format": "qcow2"}],
            disk="vda",
        )
    assert exc.value.code == ErrorCode.OPERATION_INVALID


def test_many_virtio_disks_go_on_pci_bridges() -> None:
    disks = tuple(
        _disk(f"vd{chr(97 + i // 26) if i >= 26 else ''}{chr(97 + i % 26)}", f"/i/{i}.qcow2")
        for i in range(64)
    )
    for machine, bridge in (("q35", "pcie-pci-bridge"), ("pc", "pci-bridge")):
        plan = _plan(Domain(name="vm", uuid="u", memory_kib=1024, machine=machine, disks=disks))
        devices = [json.loads(plan.argv[i + 1]) for i, a in enumerate(plan.argv) if a == "-device"]
        bridges = [d for d in devices if d["driver"] == bridge]
        blk = [d for d in devices if d["driver"] == "virtio-blk-pci"]
        assert [b["id"] for b in bridges] == ["pci.1", "pci.2"]
        assert all("bus" not in d for d in blk[:20])
        assert [(d["bus"], d["addr"]) for d in blk[20:22]] == [("pci.1", "0x1"), ("pci.1", "0x2")]
        assert (blk[50]["bus"], blk[50]["addr"]) == ("pci.1", "0x1f")
        assert (blk[51]["bus"], blk[51]["addr"]) == ("pci.2", "0x1")
        assert len(blk) == 64
