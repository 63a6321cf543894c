"""The status file of a running domain (libvirt's ``<domstatus>`` idea).

::

    <domstatus state='running' reason='booted' pid='4242'>
      <monitor path='/root/run/qemu/domain-vm1/monitor.sock' type='unix'/>
      <monitor path='/root/run/qemu/domain-vm1/query.sock' type='unix' role='query'/>
      <virtshift persistent='yes' nextIndex='5' rundir='...' log='...'/>
      <qemu version='7.2.22' package='Debian ...' caps='caps-0123456789abcdef.json'/>
      <blockjobs active='yes'>
        <blockjob name='copy-vda-libvirt-3-format' type='copy' state='ready' disk='vda'
                  node='libvirt-3-format' bandwidth='0' flags='0' created='1700000000.5'
                  cur='1048576' end='1048576' top='2' base='1' snapshot='s1' pending='concluded'>
          <error>Invalid argument</error>
          <createdFile path='/i/copy.qcow2'/>
          <addedNode name='libvirt-5-format'/>
          <deleteAfter path='/i/old.qcow2'/>
          <mirror type='file' format='qcow2'>
            <source file='/i/copy.qcow2' index='5'/>
            <backingStore type='file' index='4'>
              <format type='qcow2'/>
              <source file='/i/base.qcow2'/>
              <backingStore/>
            </backingStore>
          </mirror>
        </blockjob>
      </blockjobs>
      <domain type='qemu' id='1'> ... live definition ... </domain>
    </domstatus>

Node names are not stored: chain layer ``index=N`` is always QEMU node
``libvirt-N-format`` (see :mod:`virtshift.ops.start`), and parsing fills them in,
in the domain's chains and in each job's ``<mirror>`` chain alike.  The job's
optional attributes (``top``, ``base``, ``snapshot``, ``pending``) and
``<error>`` appear only when set; ``<blockjobs>`` only when there are jobs, so
a status without jobs reads exactly as before jobs were recorded.  A
``<mirror>`` chain is written like a disk chain of the domain XML (``type``
and ``format`` of the top layer as attributes, ``<backingStore>`` below, an
empty ``<backingStore/>`` where the chain is known to end).

QEMU's command list is not in the file: ``<qemu caps=>`` names the entry of
the capability cache that holds it (the runtime stores and loads it; parsing
leaves ``QemuCaps.commands`` empty then).  Older files list one
``<command name=>`` per command and still read; a status without a cache
entry name is written that way too.

Pure text <-> model; no file access.  Job states are stored as they are: this
module does not check that a job's state makes sense (see
:mod:`virtshift.jobs.reconcile`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lxml import etree

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import StorageSource
from virtshift.model.status import DomainState, DomainStatus, QemuCaps
from virtshift.xml.domain import domain_element, domain_from_element

if TYPE_CHECKING:  # imported by the jobs' own functions: most statuses have none
    from virtshift.model.job import BlockJob
from virtshift.xml.safe import parse_document

__all__ = ["format_status", "parse_status"]


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
    if status.caps.key is not None:
        qemu.set("caps", status.caps.key)
    else:
        for name in sorted(status.caps.commands):
            etree.SubElement(qemu, "command", name=name)
    if status.jobs:
        jobs = etree.SubElement(root, "blockjobs", active="yes")
        for job in status.jobs:
            jobs.append(_job_element(job))
    root.append(domain_element(status.domain))
    # An internal file, read and written on every change: lxml's C serializer
    # (quoting style does not matter here; libvirt-exact text is for user XML).
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"


#: Which ``<source>`` attribute holds a mirror layer's path, per storage type
#: (as in the domain XML); other types keep it in ``file``.
_PATH_ATTR = {"file": "file", "block": "dev", "dir": "dir"}


def _path_attr(typ: str) -> str:
    return _PATH_ATTR.get(typ, "file")


def _source_element(layer: StorageSource, *, index_here: bool) -> etree._Element | None:
    attrs: dict[str, str] = {}
    if layer.path is not None:
        attrs[_path_attr(layer.type)] = layer.path
    if layer.protocol is not None:
        attrs["protocol"] = layer.protocol
    if layer.name is not None:
        attrs["name"] = layer.name
    if index_here and layer.index is not None:
        attrs["index"] = str(layer.index)
    return etree.Element("source", attrs) if attrs else None


def _backing_element(layer: StorageSource | None, end: bool) -> etree._Element | None:
    """``<backingStore>`` for ``layer`` and below; an empty one ends the chain."""
    if layer is None:
        return etree.Element("backingStore") if end else None
    # ``type`` is always written, so a layer never looks like the end marker.
    bs = etree.Element("backingStore", type=layer.type)
    if layer.index is not None:
        bs.set("index", str(layer.index))
    if layer.format is not None:
        etree.SubElement(bs, "format", type=layer.format)
    _append(bs, _source_element(layer, index_here=False))
    _append(bs, _backing_element(layer.backing, layer.backing_end))
    return bs


def _append(parent: etree._Element, child: etree._Element | None) -> None:
    if child is not None:
        parent.append(child)


def _mirror_element(top: StorageSource) -> etree._Element:
    el = etree.Element("mirror", type=top.type)
    if top.format is not None:
        el.set("format", top.format)
    _append(el, _source_element(top, index_here=True))
    _append(el, _backing_element(top.backing, top.backing_end))
    return el


def _job_element(job: BlockJob) -> etree._Element:
    el = etree.Element("blockjob")
    el.set("name", job.job_id)
    el.set("type", job.type.value)
    el.set("state", job.state.value)
    el.set("disk", job.disk)
    el.set("node", job.node)
    el.set("bandwidth", str(job.bandwidth))
    el.set("flags", str(job.flags))
    el.set("created", repr(job.created))  # repr() of a float reads back exactly
    el.set("cur", str(job.cur))
    el.set("end", str(job.end))
    optional = {
        "top": None if job.top is None else str(job.top),
        "base": None if job.base is None else str(job.base),
        "snapshot": job.snapshot,
        "pending": None if job.pending is None else job.pending.value,
    }
    for name, value in optional.items():
        if value is not None:
            el.set(name, value)
    if job.error is not None:
        etree.SubElement(el, "error").text = job.error
    for path in job.created_files:
        etree.SubElement(el, "createdFile", path=path)
    for node in job.added_nodes:
        etree.SubElement(el, "addedNode", name=node)
    for path in job.delete_after:
        etree.SubElement(el, "deleteAfter", path=path)
    if job.mirror is not None:
        el.append(_mirror_element(job.mirror))
    return el


def _required(el: etree._Element, name: str) -> str:
    value = el.get(name)
    if value is None:
        raise ValueError(f"<{el.tag}> without {name}=")
    return value


def _optional_int(el: etree._Element, name: str) -> int | None:
    value = el.get(name)
    return None if value is None else int(value)


def _layer_from(
    el: etree._Element, *, typ: str, fmt: str | None, index: int | None
) -> StorageSource:
    src = el.find("source")
    backing, end = _chain_below(el)
    return StorageSource(
        type=typ,
        path=src.get(_path_attr(typ)) if src is not None else None,
        format=fmt,
        protocol=src.get("protocol") if src is not None else None,
        name=src.get("name") if src is not None else None,
        index=index,
        backing=backing,
        backing_end=end,
    )


def _chain_below(el: etree._Element) -> tuple[StorageSource | None, bool]:
    bs = el.find("backingStore")
    if bs is None:
        return None, False
    if not bs.attrib and len(bs) == 0:
        return None, True
    fmt = bs.find("format")
    layer = _layer_from(
        bs,
        typ=_required(bs, "type"),
        fmt=fmt.get("type") if fmt is not None else None,
        index=_optional_int(bs, "index"),
    )
    return layer, False


def _mirror_from(el: etree._Element) -> StorageSource:
    src = el.find("source")
    index = _optional_int(src, "index") if src is not None else None
    top = _layer_from(el, typ=el.get("type", "file"), fmt=el.get("format"), index=index)
    nodes = _layer_nodes(top)
    assert nodes is not None
    return nodes


def _job_from(el: etree._Element) -> BlockJob:
    from virtshift.model.job import BlockJob, JobState, JobType, Trigger

    pending = el.get("pending")
    error = el.find("error")
    mirror = el.find("mirror")
    return BlockJob(
        job_id=_required(el, "name"),
        type=JobType(_required(el, "type")),
        disk=_required(el, "disk"),
        state=JobState(_required(el, "state")),
        node=el.get("node", ""),
        top=_optional_int(el, "top"),
        base=_optional_int(el, "base"),
        mirror=_mirror_from(mirror) if mirror is not None else None,
        bandwidth=int(el.get("bandwidth", "0")),
        flags=int(el.get("flags", "0")),
        snapshot=el.get("snapshot"),
        delete_after=tuple(_required(x, "path") for x in el.findall("deleteAfter")),
        created_files=tuple(_required(x, "path") for x in el.findall("createdFile")),
        added_nodes=tuple(_required(x, "name") for x in el.findall("addedNode")),
        error=(error.text or "") if error is not None else None,
        pending=Trigger(pending) if pending is not None else None,
        cur=int(el.get("cur", "0")),
        end=int(el.get("end", "0")),
        created=float(el.get("created", "0")),
    )


def _layer_nodes(layer: StorageSource | None) -> StorageSource | None:
    """``layer`` and below with the node names their indexes give."""
    if layer is None:
        return None
    return dataclasses.replace(
        layer,
        node_name=f"libvirt-{layer.index}-format" if layer.index is not None else None,
        backing=_layer_nodes(layer.backing),
    )


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
        domain = domain_from_element(dom_el, node_names=True)
        jobs_el = root.find("blockjobs")
        jobs = () if jobs_el is None else tuple(_job_from(j) for j in jobs_el.findall("blockjob"))
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
                key=qemu.get("caps"),
            ),
            domain=domain,
            jobs=jobs,
        )
    except (KeyError, ValueError, StopIteration) as err:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"malformed domain status: {err}") from err
