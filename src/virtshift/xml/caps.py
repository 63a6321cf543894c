"""Capabilities documents: ``<domainCapabilities>`` and ``<capabilities>``.

Shaped like libvirt's, with one virtshift section: ``<qemu>`` names the QEMU
version and every block-job command virtshift looks for, with
``supported='yes|no'``, so a user sees at a glance whether ``transaction``
(atomic multi-disk snapshots, the proposal's capability bit) is there.
Pure model -> text.
"""

from __future__ import annotations

import os
import platform

from lxml import etree

from virtshift.model.status import QemuCaps
from virtshift.xml.safe import serialize_document

__all__ = ["format_domain_caps", "format_host_caps"]


def _qemu_section(parent: etree._Element, caps: QemuCaps) -> None:
    q = etree.SubElement(parent, "qemu", version=caps.version)
    if caps.package:
        q.set("package", caps.package)
    for name, present in caps.features().items():
        etree.SubElement(q, "command", name=name, supported="yes" if present else "no")


def _text(parent: etree._Element, tag: str, text: str) -> etree._Element:
    el = etree.SubElement(parent, tag)
    el.text = text
    return el


def _tostring(root: etree._Element) -> str:
    return serialize_document(root)


def format_domain_caps(
    caps: QemuCaps,
    *,
    emulator: str,
    arch: str = "x86_64",
    machine: str | None = None,
    virttype: str | None = None,
) -> str:
    """``<domainCapabilities>`` for one emulator (and optionally one machine)."""
    root = etree.Element("domainCapabilities")
    _text(root, "path", emulator)
    _text(root, "domain", virttype or "qemu")
    if machine:
        _text(root, "machine", machine)
    _text(root, "arch", arch)
    _qemu_section(root, caps)
    return _tostring(root)


def format_host_caps(caps: QemuCaps, *, emulator: str) -> str:
    """A small ``<capabilities>``: the host and the one guest type virtshift runs."""
    root = etree.Element("capabilities")
    host = etree.SubElement(root, "host")
    cpu = etree.SubElement(host, "cpu")
    _text(cpu, "arch", platform.machine())
    guest = etree.SubElement(root, "guest")
    _text(guest, "os_type", "hvm")
    arch = etree.SubElement(guest, "arch", name="x86_64")
    _text(arch, "wordsize", "64")
    _text(arch, "emulator", emulator)
    etree.SubElement(arch, "domain", type="qemu")
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        etree.SubElement(arch, "domain", type="kvm")
    _qemu_section(root, caps)
    return _tostring(root)
