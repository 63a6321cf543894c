"""The status file of a running domain (libvirt's ``<domstatus>`` idea).

::

    <domstatus state='running' reason='booted' pid='4242'>
      <monitor path='/root/run/qemu/domain-vm1/monitor.sock' type='unix'/>
      <monitor path='/root/run/qemu/domain-vm1/query.sock' type='unix' role='query'/>
      <virtshift persistent='yes' nextIndex='5' rundir='...' log='...'/>
      <qemu version='7.2.22' package='Debian ...'>
        <command name='transaction'/>
        ...
      </qemu>
      <domain type='qemu' id='1'> ... live definition ... </domain>
    </domstatus>

Node names are not stored: chain layer ``index=N`` is always QEMU node
``libvirt-N-format`` (see :mod:`virtshift.ops.start`), and parsing fills them in.
Pure text <-> model; no file access.
"""

from __future__ import annotations

import dataclasses

from lxml import etree

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import Disk, Domain, StorageSource
from virtshift.model.status import DomainState, DomainStatus, QemuCaps
from virtshift.xml.domain import format_domain, parse_domain
from virtshift.xml.safe import parse_document, serialize_document

__all__ = ["fill_node_names", "format_status", "parse_status"]


def format_status(status: DomainStatus) -> str:
    """The status document for ``status``."""
    root = etree.Element("domstatus")
    root.set("state", status.state.name.lower())
    root.set("reason", status.reason)
    root.set("pid", str(status.pid))
    etree.SubElement(root, "monitor", path=status.monitor, type="unix")
    etree.SubElement(root, "monitor", path=status.query_monitor, type="unix", role="query")
    etree.SubElement(
        root,
        "virtshift",
        persistent="yes" if status.persistent else "no",
        nextIndex=str(status.next_index),
        rundir=status.rundir,
        log=status.log,
    )
    qemu = etree.SubElement(root, "qemu", version=status.caps.version, package=status.caps.package)
    for name in sorted(status.caps.commands):
        etree.SubElement(qemu, "command", name=name)
    root.append(etree.fromstring(format_domain(status.domain).encode()))
    return serialize_document(root)


def _layer_nodes(layer: StorageSource | None) -> StorageSource | None:
    if layer is None:
        return None
    return dataclasses.replace(
        layer,
        node_name=f"libvirt-{layer.index}-format" if layer.index is not None else None,
        backing=_layer_nodes(layer.backing),
    )


def fill_node_names(domain: Domain) -> Domain:
    """Set every indexed layer's node name from its index."""
    disks: list[Disk] = []
    for d in domain.disks:
        src = _layer_nodes(d.source)
        assert src is not None
        mirror = d.mirror
        if mirror is not None:
            msrc = _layer_nodes(mirror.source)
            assert msrc is not None
            mirror = dataclasses.replace(mirror, source=msrc)
        disks.append(dataclasses.replace(d, source=src, mirror=mirror))
    return dataclasses.replace(domain, disks=tuple(disks))


def parse_status(text: str | bytes) -> DomainStatus:
    """Read a status document.

    :raise VirtError: INTERNAL_ERROR when the file is not a status document.
    """
    root = parse_document(text, what="domain status", root_tag="domstatus")
    try:
        state = DomainState[root.get("state", "running").upper()]
        monitors = root.findall("monitor")
        main = next(m for m in monitors if m.get("role") is None)
        query = next(m for m in monitors if m.get("role") == "query")
        vs = root.find("virtshift")
        qemu = root.find("qemu")
        dom_el = root.find("domain")
        if vs is None or qemu is None or dom_el is None:
            raise ValueError("incomplete status document")
        domain = fill_node_names(parse_domain(etree.tostring(dom_el)))
        return DomainStatus(
            state=state,
            reason=root.get("reason", "unknown"),
            pid=int(root.get("pid", "0")),
            monitor=main.get("path", ""),
            query_monitor=query.get("path", ""),
            log=vs.get("log", ""),
            rundir=vs.get("rundir", ""),
            persistent=vs.get("persistent") == "yes",
            next_index=int(vs.get("nextIndex", "1")),
            caps=QemuCaps(
                version=qemu.get("version", ""),
                package=qemu.get("package", ""),
                commands=frozenset(c.get("name", "") for c in qemu.findall("command")),
            ),
            domain=domain,
        )
    except (KeyError, ValueError, StopIteration) as err:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"malformed domain status: {err}") from err
