"""Planning a domain start: node names, aliases and the QEMU command line.

:func:`plan_start` is pure: given a domain whose disk chains are fully known
(see :func:`chain_from_image_info`), it returns the live domain (aliases,
``index=`` and node names filled in) and the argv of ``qemu-system-*``.  The
runtime executes the plan; nothing here starts processes or reads files.

Conventions, chosen so that libvirt users' QMP and HMP habits keep working:

* every chain layer ``N`` (numbered bottom-up across disks, like libvirt's
  ``index=``) is two ``-blockdev`` nodes, ``libvirt-N-storage`` (file or
  host_device) and ``libvirt-N-format`` (qcow2/raw), with the format always
  given and ``backing`` always explicit: QEMU never probes a format and never
  opens a backing file on its own;
* devices are named like libvirt's aliases: ``virtio-disk0`` for ``vda``,
  ``sata0-0-1`` for ``sdb``, ``scsi0-0-0-2`` for ``sdc`` on a SCSI bus, and the
  guest agent port ``channel0``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import Channel, Disk, Domain, StorageSource

__all__ = [
    "AGENT_PORT",
    "StartPlan",
    "chain_from_image_info",
    "disk_alias",
    "format_node",
    "plan_start",
    "storage_node",
]

AGENT_PORT = "org.qemu.guest_agent.0"
#: Image formats virtshift opens.  Anything else is refused: no probing.
KNOWN_FORMATS = frozenset({"qcow2", "raw"})


def format_node(index: int) -> str:
    """QEMU node name of the format layer of chain index ``index``."""
    return f"libvirt-{index}-format"


def storage_node(index: int) -> str:
    """QEMU node name of the protocol (file) layer of chain index ``index``."""
    return f"libvirt-{index}-storage"


def _dev_index(target: str) -> int:
    """libvirt's disk name to index: vda -> 0, vdz -> 25, vdaa -> 26."""
    letters = target.lstrip("/")
    for prefix in ("vd", "sd", "hd", "xvd"):
        if letters.startswith(prefix):
            letters = letters[len(prefix) :]
            break
    if not letters or not letters.isalpha() or not letters.islower():
        raise VirtError(ErrorCode.CONFIG_UNSUPPORTED, f"cannot derive index of disk '{target}'")
    idx = 0
    for ch in letters:
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    return idx - 1


def disk_alias(disk: Disk) -> str:
    """The device id libvirt would give ``disk``."""
    n = _dev_index(disk.target)
    bus = disk.bus or ("virtio" if disk.target.startswith("vd") else "sata")
    if bus == "virtio":
        return f"virtio-disk{n}"
    if bus == "sata":
        return f"sata0-0-{n}"
    if bus == "scsi":
        return f"scsi0-0-0-{n}"
    if bus == "ide":
        return f"ide0-{n // 2}-{n % 2}"
    raise VirtError(
        ErrorCode.CONFIG_UNSUPPORTED, f"disk bus '{bus}' of disk '{disk.target}' is not supported"
    )


def chain_from_image_info(
    top: StorageSource, infos: Sequence[Mapping[str, Any]], *, disk: str
) -> StorageSource:
    """Build a disk's chain from ``qemu-img info --backing-chain --output=json``.

    ``infos`` is that command's list, top first.  Every backing layer must have
    its format recorded in the image above it: virtshift never probes formats,
    so an image without ``backing-filename-format`` is refused, as libvirt does.

    :raise VirtError: CONFIG_UNSUPPORTED for a missing backing format or an
        unknown format; OPERATION_INVALID when the chain is inconsistent.
    """
    if not infos:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"no image information for disk '{disk}'")
    layers: list[StorageSource] = []
    fmt = top.format
    path = top.path
    for i, info in enumerate(infos):
        actual = info.get("format")
        if fmt is not None and actual is not None and actual != fmt:
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"image '{path}' of disk '{disk}' is {actual}, not {fmt}",
            )
        if fmt not in KNOWN_FORMATS:
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"unsupported image format '{fmt}' of '{path}' (disk '{disk}')",
            )
        layer = top if i == 0 else StorageSource(type="file", path=path, format=fmt)
        layers.append(layer)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing is None:
            break
        bfmt = info.get("backing-filename-format")
        if not bfmt:
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"format of backing image '{backing}' of image '{path}' was not specified "
                "in the image metadata (See https://libvirt.org/kbase/backing_chains.html "
                "for troubleshooting)",
            )
        if i + 1 >= len(infos):
            raise VirtError(
                ErrorCode.OPERATION_INVALID,
                f"backing image '{backing}' of '{path}' (disk '{disk}') cannot be opened",
            )
        fmt, path = str(bfmt), str(backing)
    # link bottom-up
    chain: StorageSource | None = None
    for layer in reversed(layers):
        chain = dataclasses.replace(layer, backing=chain, backing_end=chain is None)
    assert chain is not None
    return chain


@dataclass(frozen=True, slots=True, kw_only=True)
class StartPlan:
    """What the runtime needs to start a domain."""

    #: The live domain: aliases, chain indexes and node names filled in.
    domain: Domain
    #: The full QEMU command line (an argv list, never a shell string).
    argv: list[str]
    #: The next free chain index (for overlays created later).
    next_index: int


def _number_chains(domain: Domain) -> tuple[Domain, int]:
    n = 1
    disks: list[Disk] = []
    for disk in domain.disks:
        layers = disk.source.chain()
        numbered: StorageSource | None = None
        for layer in reversed(layers):
            numbered = dataclasses.replace(
                layer,
                index=n,
                node_name=format_node(n),
                backing=numbered,
                backing_end=numbered is None,
            )
            n += 1
        assert numbered is not None
        disks.append(dataclasses.replace(disk, source=numbered, alias=disk_alias(disk)))
    return dataclasses.replace(domain, disks=tuple(disks)), n


def blockdev_layers(layer: StorageSource, *, readonly: bool) -> list[dict[str, Any]]:
    """``-blockdev`` objects for one layer and everything below it, bottom first."""
    out: list[dict[str, Any]] = []
    if layer.backing is not None:
        out.extend(blockdev_layers(layer.backing, readonly=True))
    assert layer.index is not None
    assert layer.path is not None
    assert layer.format is not None
    out.append(
        {
            "driver": "host_device" if layer.type == "block" else "file",
            "filename": layer.path,
            "node-name": storage_node(layer.index),
            "auto-read-only": True,
            "discard": "unmap",
        }
    )
    fmt: dict[str, Any] = {
        "node-name": format_node(layer.index),
        "read-only": readonly,
        "driver": layer.format,
        "file": storage_node(layer.index),
    }
    if layer.format != "raw":  # raw has no backing; qcow2 always gets an explicit one
        fmt["backing"] = (
            format_node(layer.backing.index)
            if layer.backing is not None and layer.backing.index is not None
            else None
        )
    out.append(fmt)
    return out


#: Virtio disks placed on the root PCI bus before bridges are added.
ROOT_SLOTS = 20
#: Usable slots of one PCI bridge (slot 0 is the bridge's own).
BRIDGE_SLOTS = 31


def _bridge(machine: str, n: int) -> str:
    """A PCI bridge ``pci.N`` for the machine type (PCIe root on q35)."""
    if "q35" in machine:
        return json.dumps({"driver": "pcie-pci-bridge", "id": f"pci.{n}", "bus": "pcie.0"})
    return json.dumps({"driver": "pci-bridge", "id": f"pci.{n}", "chassis_nr": n, "bus": "pci.0"})


def _device(disk: Disk, alias: str) -> dict[str, Any]:
    bus = disk.bus or "virtio"
    drive = disk.source.node_name
    n = _dev_index(disk.target)
    dev: dict[str, Any]
    if bus == "virtio":
        dev = {"driver": "virtio-blk-pci", "drive": drive, "id": alias}
    elif bus == "sata":
        dev = {"driver": "ide-hd", "bus": f"ide.{n}", "drive": drive, "id": alias}
    elif bus == "scsi":
        dev = {"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": n, "drive": drive, "id": alias}
    else:  # ide on a pc machine
        dev = {
            "driver": "ide-hd",
            "bus": f"ide.{n // 2}",
            "unit": n % 2,
            "drive": drive,
            "id": alias,
        }
    if disk.serial:
        dev["serial"] = disk.serial
    if disk.readonly and bus == "virtio":
        dev["share-rw"] = False
    return dev


def plan_start(
    domain: Domain,
    *,
    emulator: str,
    monitor: str,
    query_monitor: str,
    agent_socket: str | None,
    accel: str,
    rundir: str = "",
) -> StartPlan:
    """Plan the start of ``domain`` (pure).

    :param domain: the definition, with every disk's chain known and ending
        (``backing_end`` on its last layer).
    :param emulator: the ``qemu-system-*`` binary.
    :param monitor: unix socket of the main QMP monitor.
    :param query_monitor: unix socket of the second monitor used by read-only calls.
    :param agent_socket: host socket of the guest agent channel, if the domain has one.
    :param accel: 'tcg' or 'kvm'.
    :param rundir: QEMU's working directory; socket paths under it are passed
        relative, so that a deep root never overflows a unix socket path.
    :raise VirtError: CONFIG_UNSUPPORTED for what virtshift cannot start
        (network disks, unknown buses or formats, devices other than disks).
    """
    for disk in domain.disks:
        if disk.type == "network" or disk.source.type == "network":
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"network disk '{disk.target}' is not supported by virtshift; "
                "only file and block disks can be started",
            )
        if disk.device != "disk":
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"disk '{disk.target}': device '{disk.device}' is not supported "
                "(only device='disk')",
            )
        for layer in disk.source.chain():
            if layer.path is None:
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED, f"disk '{disk.target}' has no source path"
                )
            if layer.format not in KNOWN_FORMATS:
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    f"disk '{disk.target}': image '{layer.path}' needs an explicit format "
                    f"(qcow2 or raw), not {layer.format!r}",
                )

    def qpath(path: str) -> str:
        if rundir and path.startswith(rundir.rstrip("/") + "/"):
            path = path[len(rundir.rstrip("/")) + 1 :]
        return path.replace(",", ",,")  # QEMU option syntax

    live, next_index = _number_chains(domain)
    mem_mib = max(1, domain.memory_kib // 1024)
    machine = domain.machine or "q35"
    argv = [
        emulator,
        "-name",
        f"guest={domain.name},debug-threads=on",
        "-uuid",
        domain.uuid,
        "-machine",
        f"{machine},accel={accel}",
        "-m",
        str(mem_mib),
        "-smp",
        str(max(1, domain.vcpu)),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-chardev",
        f"socket,id=charmonitor,path={qpath(monitor)},server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-chardev",
        f"socket,id=charquery,path={qpath(query_monitor)},server=on,wait=off",
        "-mon",
        "chardev=charquery,id=query,mode=control",
        "-msg",
        "timestamp=on",
    ]
    buses = {d.bus or "virtio" for d in live.disks}
    if "scsi" in buses:
        argv += ["-device", json.dumps({"driver": "virtio-scsi-pci", "id": "scsi0"})]
    virtio_seen = 0
    bridges = 0
    for disk in live.disks:
        for obj in blockdev_layers(disk.source, readonly=disk.readonly):
            argv += ["-blockdev", json.dumps(obj, separators=(",", ":"))]
        assert disk.alias is not None
        dev = _device(disk, disk.alias)
        if dev["driver"] == "virtio-blk-pci":
            # the root bus has about 30 free slots: past ROOT_SLOTS disks, PCI
            # bridges of BRIDGE_SLOTS slots each take them (libvirt adds
            # controllers the same way)
            if virtio_seen >= ROOT_SLOTS:
                k, slot = divmod(virtio_seen - ROOT_SLOTS, BRIDGE_SLOTS)
                if k + 1 > bridges:
                    bridges = k + 1
                    argv += ["-device", _bridge(machine, bridges)]
                dev["bus"] = f"pci.{k + 1}"
                dev["addr"] = hex(slot + 1)
            virtio_seen += 1
        argv += ["-device", json.dumps(dev, separators=(",", ":"))]
    channels: list[Channel] = []
    port = 0
    for ch in live.channels:
        if ch.target_type == "virtio" and ch.type == "unix":
            port += 1
            if port == 1:
                argv += ["-device", "virtio-serial-pci,id=virtio-serial0"]
            path = ch.path or (agent_socket if ch.target_name == AGENT_PORT else None)
            if path is None:
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED, f"channel '{ch.target_name}' needs a source path"
                )
            cid = f"channel{port - 1}"
            argv += [
                "-chardev",
                f"socket,id=char{cid},path={qpath(path)},server=on,wait=off",
                "-device",
                f"virtserialport,bus=virtio-serial0.0,nr={port},chardev=char{cid},id={cid}"
                + (f",name={ch.target_name}" if ch.target_name else ""),
            ]
            ch = dataclasses.replace(ch, path=path, alias=cid)
        channels.append(ch)
    live = dataclasses.replace(live, channels=tuple(channels))
    return StartPlan(domain=live, argv=argv, next_index=next_index)
