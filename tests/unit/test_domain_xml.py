"""Tests of :mod:`virtshift.xml.domain` and :mod:`virtshift.xml.safe`.

Golden data is libvirt's own: ``corpus/libvirt/domain/qemuxmlconfdata`` and
``qemuxmlactive2xmldata`` (see ``corpus/libvirt/HOW_TESTS_WORK.md`` section 3)
and the schema ``corpus/libvirt/schemas/domain.rng``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import Channel, Disk, Domain, Mirror, StorageSource
from virtshift.xml.domain import domain_element, format_domain, parse_domain, validate_domain
from virtshift.xml.safe import MAX_DOCUMENT_BYTES, parse_document, serialize_document

_CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
_DOMAIN_DIRS = ("qemuxmlconfdata", "qemuxmlactive2xmldata")


def _corpus_names() -> list[str]:
    root = _CORPUS / "libvirt" / "domain"
    names = sorted(
        f"{d}/{p.name}"
        for d in _DOMAIN_DIRS
        if (root / d).is_dir()
        for p in (root / d).glob("*.xml")
    )
    # Without the corpus, one case still runs so that corpus_dir skips it
    # with a clear reason instead of pytest reporting an empty parameter set.
    return names or ["<corpus missing>"]


_NAMES = _corpus_names()
_ACTIVE_NAMES = [n for n in _NAMES if "-active." in n] or ["<corpus missing>"]


def _canonical(text: str | bytes) -> bytes:
    """C14N 2.0 of the document with insignificant whitespace stripped."""
    data = text.encode() if isinstance(text, str) else text
    # lxml-stubs do not know the c14n2 keyword strip_text.
    options: dict[str, Any] = {"method": "c14n2", "strip_text": True}
    result: bytes = etree.tostring(etree.fromstring(data), **options)
    return result


def _is_live_document(name: str, dom: Domain) -> bool:
    # The -active outputs are live; three qemuxmlconfdata inputs (the ones
    # with <mirror>) also carry <domain id=>, i.e. they are live documents.
    return "-active." in name or dom.id is not None


@pytest.fixture(scope="session")
def domain_rng(corpus_dir: Path) -> etree.RelaxNG:
    # domain.rng includes its siblings by relative href; parse it from its path.
    return etree.RelaxNG(etree.parse(str(corpus_dir / "libvirt" / "schemas" / "domain.rng")))


def _assert_valid(rng: etree.RelaxNG, text: str) -> None:
    doc = etree.fromstring(text.encode())
    assert rng.validate(doc), str(rng.error_log.last_error)


def _read(corpus_dir: Path, name: str) -> bytes:
    return (corpus_dir / "libvirt" / "domain" / name).read_bytes()


# --------------------------------------------------------------------------
# Corpus round trips


@pytest.mark.parametrize("name", _NAMES)
def test_corpus_round_trip(corpus_dir: Path, name: str) -> None:
    original = _read(corpus_dir, name)
    dom = parse_domain(original)
    inactive = not _is_live_document(name, dom)
    out = format_domain(dom, inactive=inactive)
    assert _canonical(out) == _canonical(original)
    if "x86_64-latest" in name:
        # Files libvirt wrote itself come back byte for byte.
        assert out == original.decode()
    again = format_domain(parse_domain(out), inactive=inactive)
    assert again == out


@pytest.mark.parametrize("name", _ACTIVE_NAMES)
def test_corpus_active_to_inactive(corpus_dir: Path, name: str) -> None:
    dom = parse_domain(_read(corpus_dir, name))
    expected = _read(corpus_dir, name.replace("-active.", "-inactive."))
    out = format_domain(dom, inactive=True)
    assert _canonical(out) == _canonical(expected)
    assert out == expected.decode()


@pytest.mark.parametrize("name", _NAMES)
def test_corpus_output_matches_schema(
    corpus_dir: Path, domain_rng: etree.RelaxNG, name: str
) -> None:
    dom = parse_domain(_read(corpus_dir, name))
    _assert_valid(domain_rng, format_domain(dom))
    _assert_valid(domain_rng, format_domain(dom, inactive=True))


def test_corpus_parses_expected_model(corpus_dir: Path) -> None:
    dom = parse_domain(
        _read(corpus_dir, "qemuxmlactive2xmldata/disk-mirror-active.x86_64-latest.xml")
    )
    assert (dom.type, dom.name, dom.id) == ("qemu", "QEMUGuest1", 1)
    assert dom.uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    assert (dom.memory_kib, dom.vcpu, dom.os_type) == (219136, 1, "hvm")
    assert (dom.arch, dom.machine, dom.emulator) == ("x86_64", "pc", "/usr/bin/qemu-system-x86_64")
    assert [d.target for d in dom.disks] == ["hda", "hdc", "vda", "vdb", "vdc"]
    hda = dom.disks[0]
    assert (hda.type, hda.device, hda.driver_name, hda.format, hda.bus) == (
        "block",
        "disk",
        "qemu",
        "raw",
        "ide",
    )
    assert hda.path == "/dev/HostVG/QEMUGuest1"
    assert hda.source.backing is None
    assert hda.source.backing_end
    assert hda.mirror is not None
    assert (hda.mirror.job, hda.mirror.ready, hda.mirror.source.type) == ("copy", "yes", "block")
    assert dom.disks[1].readonly
    assert dom.disks[1].device == "cdrom"
    vdb = dom.disk("vdb")
    assert vdb is not None
    assert vdb.mirror is not None
    mirror = vdb.mirror
    assert (mirror.ready, mirror.source.path, mirror.source.format) == (
        "abort",
        "/tmp/logcopy.img",
        "qcow2",
    )
    assert mirror.source.index == 1
    base = mirror.source.backing
    assert base is not None
    assert (base.type, base.path, base.format, base.index, base.backing_end) == (
        "block",
        "/dev/HostVG/backing",
        "raw",
        2,
        True,
    )


def test_corpus_backing_chain_and_network(corpus_dir: Path) -> None:
    dom = parse_domain(_read(corpus_dir, "qemuxmlconfdata/disk-backing-chains-index.xml"))
    vdb = dom.disk("vdb")
    assert vdb is not None
    chain = vdb.source.chain()
    assert (chain[0].type, chain[0].protocol, chain[0].name, chain[0].index) == (
        "network",
        "nbd",
        "bar",
        9,
    )
    assert [layer.index for layer in chain] == [9, 8, 7, 6, 5, 4, 3]
    assert [layer.format for layer in chain[1:]] == [
        "qcow2",
        "vmdk",
        "qcow2",
        "qcow2",
        "qcow2",
        "raw",
    ]
    assert chain[1].path == "/dev/HostVG/QEMUGuest1"
    assert chain[1].type == "block"
    assert chain[-1].backing_end
    assert not chain[0].backing_end
    vda = dom.disk("vda")
    assert vda is not None
    assert vda.source.backing is not None
    # No <backingStore/> under the last layer: the chain is not known to end.
    assert vda.source.backing.backing is None
    assert not vda.source.backing.backing_end
    vdc = dom.disk("vdc")
    assert vdc is not None
    assert vdc.source.backing_end


def test_corpus_old_style_mirror(corpus_dir: Path) -> None:
    dom = parse_domain(_read(corpus_dir, "qemuxmlconfdata/disk-mirror-old.xml"))
    vda = dom.disk("vda")
    assert vda is not None
    assert vda.mirror is not None
    assert (vda.mirror.job, vda.mirror.source.path, vda.mirror.source.format) == (
        "copy",
        "/tmp/copy.img",
        "qcow2",
    )


# --------------------------------------------------------------------------
# A minimal user definition and domains built in code

_MINIMAL = """\
<domain type='kvm'>
  <name>vm1</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/virtshift/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/virtshift/data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


def test_minimal_definition() -> None:
    dom = parse_domain(_MINIMAL)
    assert (dom.type, dom.name, dom.id, dom.memory_kib, dom.vcpu) == (
        "kvm",
        "vm1",
        None,
        512 * 1024,
        2,
    )
    assert (dom.os_type, dom.arch, dom.machine, dom.emulator) == ("hvm", "x86_64", None, None)
    assert uuid.UUID(dom.uuid).version == 4
    assert dom.tree.findtext("uuid") == dom.uuid
    vda, vdb = dom.disks
    assert (vda.type, vda.device, vda.driver_name, vda.format, vda.path, vda.target, vda.bus) == (
        "file",
        "disk",
        "qemu",
        "qcow2",
        "/var/lib/virtshift/vm1.qcow2",
        "vda",
        "virtio",
    )
    assert vda.source.backing is None
    assert not vda.source.backing_end
    assert vda.source.index is None
    assert (vda.alias, vda.mirror, vda.readonly, vda.serial, vda.snapshot) == (
        None,
        None,
        False,
        None,
        None,
    )
    assert (vdb.format, vdb.path, vdb.target) == ("raw", "/var/lib/virtshift/data.raw", "vdb")
    agent = dom.agent_channel
    assert agent is not None
    assert (agent.type, agent.path, agent.target_type, agent.target_name) == (
        "unix",
        None,
        "virtio",
        "org.qemu.guest_agent.0",
    )
    out = format_domain(dom)
    assert out.startswith("<domain type='kvm'>\n  <name>vm1</name>\n  <uuid>")
    assert "<memory unit='MiB'>512</memory>" in out
    assert parse_domain(out).uuid == dom.uuid


def test_generated_uuid_differs_per_parse() -> None:
    assert parse_domain(_MINIMAL).uuid != parse_domain(_MINIMAL).uuid


def _built_domain() -> Domain:
    base = StorageSource(
        type="file", path="/images/base.qcow2", format="qcow2", index=1, backing_end=True
    )
    top = StorageSource(
        type="file", path="/images/top.qcow2", format="qcow2", index=2, backing=base
    )
    copy_dest = StorageSource(
        type="file", path="/images/copy.qcow2", format="qcow2", index=3, backing_end=True
    )
    return Domain(
        type="qemu",
        name="built",
        uuid="6f6a3e7a-0d6f-4c1a-9d0c-2f2a8e2b6c11",
        id=7,
        memory_kib=1048576,
        vcpu=2,
        arch="x86_64",
        machine="q35",
        emulator="/usr/bin/qemu-system-x86_64",
        disks=(
            Disk(
                type="file",
                driver_name="qemu",
                target="vda",
                bus="virtio",
                source=top,
                alias="virtio-disk0",
                mirror=Mirror(job="copy", ready="yes", source=copy_dest),
            ),
            Disk(
                type="block",
                device="cdrom",
                driver_name="qemu",
                target="sda",
                bus="sata",
                source=StorageSource(type="block", path="/dev/sr0", format="raw"),
                readonly=True,
                serial="CD-1",
                snapshot="no",
            ),
        ),
        channels=(
            Channel(
                type="unix",
                path="/run/virtshift/built/agent.sock",
                target_type="virtio",
                target_name="org.qemu.guest_agent.0",
                alias="channel0",
            ),
        ),
    )


def test_built_domain_without_tree(domain_rng: etree.RelaxNG) -> None:
    dom = _built_domain()
    live = format_domain(dom)
    inactive = format_domain(dom, inactive=True)
    _assert_valid(domain_rng, live)
    _assert_valid(domain_rng, inactive)
    assert live.startswith("<domain type='qemu' id='7'>\n  <name>built</name>\n")
    assert live.endswith("</domain>\n")
    assert (
        "\n      <mirror type='file' file='/images/copy.qcow2' format='qcow2'"
        " job='copy' ready='yes'>\n        <format type='qcow2'/>\n" in live
    )
    assert "<source file='/images/copy.qcow2' index='3'/>" in live
    assert "index=" not in inactive
    assert "<mirror" not in inactive
    assert "<alias" not in inactive
    again = parse_domain(live)
    # Every modelled field comes back (``tree`` is not compared).
    assert again == dom
    persistent = parse_domain(inactive)
    vda = persistent.disk("vda")
    assert vda is not None
    assert (persistent.id, vda.alias, vda.mirror) == (None, None, None)
    assert [layer.path for layer in vda.source.chain()] == [
        "/images/top.qcow2",
        "/images/base.qcow2",
    ]
    assert [layer.index for layer in vda.source.chain()] == [None, None]


def test_built_domain_element_order() -> None:
    out = format_domain(_built_domain())
    order = [line.strip().split(">")[0] for line in out.splitlines()[1:6]]
    assert order == ["<name", "<uuid", "<memory unit='KiB'", "<vcpu placement='static'", "<os"]
    disk = out[out.index("<disk type='file'") : out.index("</disk>")]
    tags = [seg.split()[0].rstrip("/>") for seg in disk.split("<")[1:] if not seg.startswith("/")]
    assert tags == [
        "disk",
        "driver",
        "source",
        "backingStore",
        "format",
        "source",
        "backingStore",
        "mirror",
        "format",
        "source",
        "backingStore",
        "target",
        "alias",
    ]


# --------------------------------------------------------------------------
# Model changes written back


def test_replace_source_path_keeps_other_elements(corpus_dir: Path) -> None:
    dom = parse_domain(_read(corpus_dir, "qemuxmlconfdata/luks-disks-source-qcow2.xml"))
    vda = dom.disk("vda")
    assert vda is not None
    changed = dom.with_disk(
        dataclasses.replace(vda, source=dataclasses.replace(vda.source, path="/storage/new.qcow2"))
    )
    out = format_domain(changed)
    again = parse_domain(out)
    new_vda = again.disk("vda")
    assert new_vda is not None
    assert new_vda.path == "/storage/new.qcow2"
    assert new_vda.format == "qcow2"
    # The disk's address and the other disks are untouched.
    assert new_vda.tree.find("address").get("slot") == "0x04"
    assert [d.path for d in again.disks[1:]] == [d.path for d in dom.disks[1:]]
    assert "encryptdisk2" in out
    # The parsed tree itself is never modified by formatting.
    assert vda.tree.find("source").get("file") == "/storage/guest_disks/encryptdisk"


def test_add_backing_chain_and_index() -> None:
    dom = parse_domain(_MINIMAL)
    vda = dom.disk("vda")
    assert vda is not None
    base = StorageSource(
        type="file", path="/var/lib/virtshift/base.raw", format="raw", index=1, backing_end=True
    )
    new_vda = dataclasses.replace(
        vda, source=dataclasses.replace(vda.source, index=2, backing=base)
    )
    dom = dataclasses.replace(dom.with_disk(new_vda), id=3)
    live = format_domain(dom)
    assert "<source file='/var/lib/virtshift/vm1.qcow2' index='2'/>" in live
    again = parse_domain(live)
    got = again.disk("vda")
    assert got is not None
    assert [(s.path, s.format, s.index) for s in got.source.chain()] == [
        ("/var/lib/virtshift/vm1.qcow2", "qcow2", 2),
        ("/var/lib/virtshift/base.raw", "raw", 1),
    ]
    assert got.source.backing is not None
    assert got.source.backing.backing_end
    assert again.id == 3
    inactive = parse_domain(format_domain(dom, inactive=True))
    got = inactive.disk("vda")
    assert got is not None
    assert inactive.id is None
    assert [(s.path, s.index) for s in got.source.chain()] == [
        ("/var/lib/virtshift/vm1.qcow2", None),
        ("/var/lib/virtshift/base.raw", None),
    ]


def test_alias_live_only_except_user_alias() -> None:
    dom = parse_domain(_MINIMAL)
    vda, vdb = dom.disks
    agent = dom.channels[0]
    dom = dataclasses.replace(
        dom,
        disks=(
            dataclasses.replace(vda, alias="virtio-disk0"),
            dataclasses.replace(vdb, alias="ua-data"),
        ),
        channels=(dataclasses.replace(agent, alias="channel0", path="/run/agent.sock"),),
    )
    live = parse_domain(format_domain(dom))
    assert [d.alias for d in live.disks] == ["virtio-disk0", "ua-data"]
    assert live.channels[0].alias == "channel0"
    assert live.channels[0].path == "/run/agent.sock"
    inactive_text = format_domain(dom, inactive=True)
    inactive = parse_domain(inactive_text)
    assert [d.alias for d in inactive.disks] == [None, "ua-data"]
    assert inactive.channels[0].alias is None
    # libvirt's place for <alias>: after <target>.
    assert "<target dev='vdb' bus='virtio'/>\n      <alias name='ua-data'/>" in inactive_text


def test_add_and_drop_mirror(domain_rng: etree.RelaxNG) -> None:
    dom = parse_domain(_MINIMAL)
    vda = dom.disk("vda")
    assert vda is not None
    dest = StorageSource(
        type="file", path="/dest/vm1.qcow2", format="qcow2", index=5, backing_end=True
    )
    dom = dom.with_disk(dataclasses.replace(vda, mirror=Mirror(job="copy", source=dest)))
    live_text = format_domain(dom)
    _assert_valid(domain_rng, live_text)
    assert "<mirror type='file' file='/dest/vm1.qcow2' format='qcow2' job='copy'>" in live_text
    mirror = parse_domain(live_text).disks[0].mirror
    assert mirror is not None
    assert (mirror.job, mirror.ready, mirror.source.path, mirror.source.format) == (
        "copy",
        None,
        "/dest/vm1.qcow2",
        "qcow2",
    )
    assert (mirror.source.index, mirror.source.backing_end) == (5, True)
    # Ready, then pivot state, written into the mirror's existing element.
    ready = parse_domain(live_text)
    rd = ready.disks[0]
    assert rd.mirror is not None
    ready = ready.with_disk(
        dataclasses.replace(rd, mirror=dataclasses.replace(rd.mirror, ready="yes"))
    )
    assert (
        "<mirror type='file' file='/dest/vm1.qcow2' format='qcow2' job='copy' ready='yes'>"
        in format_domain(ready)
    )
    assert "<mirror" not in format_domain(dom, inactive=True)
    # Dropping the mirror from the model drops the element.
    dropped = ready.with_disk(dataclasses.replace(ready.disks[0], mirror=None))
    assert "<mirror" not in format_domain(dropped)


def test_mirror_pivot_keeps_destination_elements(corpus_dir: Path) -> None:
    dom = parse_domain(
        _read(corpus_dir, "qemuxmlactive2xmldata/disk-mirror-active.x86_64-latest.xml")
    )
    vdc = dom.disk("vdc")
    assert vdc is not None
    assert vdc.mirror is not None
    pivoted = dom.with_disk(
        dataclasses.replace(vdc, type="file", source=vdc.mirror.source, mirror=None)
    )
    out = format_domain(pivoted)
    again = parse_domain(out).disk("vdc")
    assert again is not None
    assert again.mirror is None
    assert (again.path, again.format, again.source.backing_end) == ("/tmp/copy2.img", "qcow2", True)


def test_chain_read_from_qemu_keeps_layer_children(corpus_dir: Path) -> None:
    dom = parse_domain(_read(corpus_dir, "qemuxmlconfdata/disk-backing-chains-index.xml"))
    vdb = dom.disk("vdb")
    assert vdb is not None

    def detached(layer: StorageSource | None, index: int) -> StorageSource | None:
        if layer is None:
            return None
        below = detached(layer.backing, index - 1)
        return dataclasses.replace(
            layer, tree=None, index=index, backing=below, node_name=f"n{index}"
        )

    fresh = detached(vdb.source, 50)
    assert fresh is not None
    out = format_domain(dom.with_disk(dataclasses.replace(vdb, source=fresh)))
    got = parse_domain(out).disk("vdb")
    assert got is not None
    assert [s.index for s in got.source.chain()] == [50, 49, 48, 47, 46, 45, 44]
    assert [s.path for s in got.source.chain()] == [s.path for s in vdb.source.chain()]
    # The network source's <host> and the <seclabel> of /tmp/image3.qcow followed their images.
    assert got.source.tree.find("host").get("socket") == "/var/run/nbdsock"
    image3 = got.source.chain()[3]
    assert image3.path == "/tmp/image3.qcow"
    assert image3.tree.find("source/seclabel/label").text == "system_u:system_r:public_content_t:s0"


def test_snapshot_overlay_moves_old_top_down(corpus_dir: Path, domain_rng: etree.RelaxNG) -> None:
    dom = parse_domain(_read(corpus_dir, "qemuxmlconfdata/disk-slices.xml"))
    vda = dom.disk("vda")
    assert vda is not None
    overlay = StorageSource(
        type="file", path="/var/lib/libvirt/images/raw.snap1", format="qcow2", backing=vda.source
    )
    out = format_domain(dom.with_disk(dataclasses.replace(vda, source=overlay)), inactive=True)
    _assert_valid(domain_rng, out)
    got = parse_domain(out).disk("vda")
    assert got is not None
    assert (got.path, got.format) == ("/var/lib/libvirt/images/raw.snap1", "qcow2")
    below = got.source.backing
    assert below is not None
    assert (below.path, below.format, below.backing_end) == (
        "/var/lib/libvirt/images/raw.img",
        "raw",
        True,
    )
    # The <slices> of the old top image moved with it into the backingStore.
    assert below.tree.find("source/slices/slice").get("size") == "321"


def test_domain_fields_written_back() -> None:
    dom = parse_domain(_MINIMAL)
    changed = dataclasses.replace(
        dom,
        name="vm2",
        memory_kib=2 * 1024 * 1024,
        vcpu=4,
        machine="q35",
        emulator="/usr/bin/qemu-kvm",
    )
    out = format_domain(changed)
    assert "<memory unit='KiB'>2097152</memory>" in out
    again = parse_domain(out)
    assert (again.name, again.memory_kib, again.vcpu, again.machine, again.emulator) == (
        "vm2",
        2097152,
        4,
        "q35",
        "/usr/bin/qemu-kvm",
    )
    assert again.uuid == dom.uuid
    # Removing a disk removes its element; adding one places it after the others.
    extra = Disk(
        target="vdc",
        bus="virtio",
        driver_name="qemu",
        source=StorageSource(path="/var/lib/virtshift/extra.qcow2", format="qcow2"),
    )
    edited = parse_domain(format_domain(dataclasses.replace(dom, disks=(dom.disks[1], extra))))
    assert [d.target for d in edited.disks] == ["vdb", "vdc"]
    assert edited.disks[1].path == "/var/lib/virtshift/extra.qcow2"


def test_disk_and_channel_fields_written_back() -> None:
    dom = parse_domain(_MINIMAL)
    vda, vdb = dom.disks
    block = StorageSource(type="block", path="/dev/vg/data", format="raw")
    dom = dataclasses.replace(
        dom,
        disks=(
            dataclasses.replace(
                vda, bus="scsi", target="sda", driver_name=None, serial="S1", snapshot="external"
            ),
            dataclasses.replace(vdb, source=block, readonly=True, device="lun"),
        ),
        channels=(dataclasses.replace(dom.channels[0], target_name="org.example.other"),),
    )
    out = format_domain(dom)
    assert "<source dev='/dev/vg/data'/>" in out
    assert "<disk type='block' device='lun'>" in out
    again = parse_domain(out)
    sda, data = again.disks
    assert (sda.target, sda.bus, sda.driver_name, sda.format) == ("sda", "scsi", None, "qcow2")
    assert (sda.serial, sda.snapshot, sda.readonly) == ("S1", "external", False)
    assert (data.type, data.source.type, data.path, data.readonly) == (
        "block",
        "block",
        "/dev/vg/data",
        True,
    )
    assert again.channels[0].target_name == "org.example.other"
    assert again.agent_channel is None
    # And back: clearing optional fields removes their elements.
    cleared = again.with_disk(dataclasses.replace(sda, serial=None, snapshot=None))
    cleared = cleared.with_disk(dataclasses.replace(data, readonly=False))
    text = format_domain(cleared)
    assert "<serial>" not in text
    assert "snapshot=" not in text
    assert "<readonly/>" not in text


def test_quoting_and_escaping() -> None:
    dom = parse_domain(_MINIMAL)
    nasty_path = '/tmp/it\'s "quoted" & <odd>\tname.qcow2'
    nasty_name = "vm 'one' & \"two\" <three>"
    vda = dom.disks[0]
    dom = dataclasses.replace(
        dom.with_disk(
            dataclasses.replace(vda, source=dataclasses.replace(vda.source, path=nasty_path))
        ),
        name=nasty_name,
    )
    out = format_domain(dom)
    assert "file='/tmp/it&apos;s &quot;quoted&quot; &amp; &lt;odd&gt;&#9;name.qcow2'" in out
    assert "<name>vm 'one' &amp; \"two\" &lt;three&gt;</name>" in out
    again = parse_domain(out)
    assert again.name == nasty_name
    assert again.disks[0].path == nasty_path
    assert format_domain(again) == out


def test_control_character_cannot_be_written() -> None:
    dom = parse_domain(_MINIMAL)
    vda = dom.disks[0]
    bad = dom.with_disk(
        dataclasses.replace(vda, source=dataclasses.replace(vda.source, path="/tmp/a\x01"))
    )
    with pytest.raises(VirtError) as info:
        format_domain(bad)
    assert info.value.code == ErrorCode.INVALID_ARG


def test_unknown_elements_and_namespaces_survive() -> None:
    text = """\
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>ns</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <metadata>
    <app:info xmlns:app="http://example.org/app" app:level="3">keep &amp; me</app:info>
  </metadata>
  <!-- a comment -->
  <memory unit='GiB'>1</memory>
  <devices>
    <disk type='volume' device='disk'>
      <source pool='default' volume='v1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-S'/>
  </qemu:commandline>
</domain>
"""
    dom = parse_domain(text)
    assert dom.memory_kib == 1024 * 1024
    assert dom.disks[0].type == "volume"
    assert dom.disks[0].path is None
    out = format_domain(dataclasses.replace(dom, vcpu=3))
    assert (
        "<app:info xmlns:app='http://example.org/app' app:level='3'>keep &amp; me</app:info>" in out
    )
    assert "<qemu:arg value='-S'/>" in out
    assert "<!-- a comment -->" in out
    assert "<source pool='default' volume='v1'/>" in out
    assert "<memory unit='GiB'>1</memory>" in out
    assert "<vcpu placement='static'>3</vcpu>" in out


def test_format_is_pure() -> None:
    dom = parse_domain(_MINIMAL)
    before = etree.tostring(dom.tree)
    format_domain(dataclasses.replace(dom, id=9, name="other"), inactive=False)
    format_domain(dom, inactive=True)
    assert etree.tostring(dom.tree) == before


@pytest.mark.parametrize(
    ("memory", "kib"),
    [
        ("<memory>2048</memory>", 2048),
        ("<memory unit='KiB'>2048</memory>", 2048),
        ("<memory unit='k'>7</memory>", 7),
        ("<memory unit='MiB'>3</memory>", 3072),
        ("<memory unit='M'>3</memory>", 3072),
        ("<memory unit='GiB'>2</memory>", 2 * 1024 * 1024),
        ("<memory unit='G'>1</memory>", 1024 * 1024),
        ("<memory unit='TiB'>1</memory>", 1024**3),
        ("<memory unit='bytes'>1025</memory>", 2),
        ("<memory unit='b'>1024</memory>", 1),
        ("<memory unit='KB'>1000</memory>", 977),
        ("<memory unit='MB'>1</memory>", 977),
    ],
)
def test_memory_units(memory: str, kib: int) -> None:
    text = _MINIMAL.replace("<memory unit='MiB'>512</memory>", memory)
    assert parse_domain(text).memory_kib == kib


# --------------------------------------------------------------------------
# Hostile and invalid input

_BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE domain [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<domain type='kvm'><name>&lol4;</name></domain>
"""

_EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE domain [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<domain type='kvm'><name>&xxe;</name></domain>
"""


def _nested(levels: int) -> str:
    return (
        "<domain type='kvm'><name>deep</name><metadata>"
        + "<a>" * levels
        + "</a>" * levels
        + "</metadata></domain>"
    )


def _with_devices(devices: str) -> str:
    return f"<domain type='kvm'><name>vm</name><devices>{devices}</devices></domain>"


_HOSTILE: list[tuple[str, str | bytes, str]] = [
    ("billion-laughs", _BILLION_LAUGHS, "DOCTYPE and ENTITY declarations are not allowed"),
    ("external-entity", _EXTERNAL_ENTITY, "DOCTYPE and ENTITY declarations are not allowed"),
    ("doctype-only", "<!DOCTYPE domain><domain type='kvm'><name>a</name></domain>", "DOCTYPE"),
    (
        "too-large",
        "<domain type='kvm'><name>big</name><description>"
        + "x" * (2 * MAX_DOCUMENT_BYTES)
        + "</description></domain>",
        "larger than 1048576 bytes",
    ),
    ("deep", _nested(100), "nested deeper than 64 levels"),
    ("very-deep", _nested(1000), "domain definition: "),
    ("invalid-utf8", b"<domain type='kvm'><name>\xff\xfe</name></domain>", "not valid UTF-8"),
    ("utf16", "<domain type='kvm'><name>a</name></domain>".encode("utf-16"), "not valid UTF-8"),
    ("malformed", "<domain type='kvm'><name>a</domain>", "malformed XML"),
    ("empty", "   ", "document is empty"),
    ("not-xml", "hello", "malformed XML"),
    (
        "wrong-root",
        "<domainsnapshot><name>a</name></domainsnapshot>",
        "unexpected root element <domainsnapshot>",
    ),
    (
        "namespaced-root",
        "<domain xmlns='urn:x' type='kvm'><name>a</name></domain>",
        "unexpected root element",
    ),
    ("nul-char-ref", "<domain type='kvm'><name>a&#0;b</name></domain>", "malformed XML"),
    ("raw-nul", "<domain type='kvm'><name>a\x00b</name></domain>", "domain definition: "),
    ("lone-surrogate", "<domain type='kvm'><name>a\ud800</name></domain>", "not valid Unicode"),
    ("no-type", "<domain><name>a</name></domain>", "missing domain type attribute"),
    ("no-name", "<domain type='kvm'></domain>", "domain name is missing"),
    (
        "slash-name",
        "<domain type='kvm'><name>a/b</name></domain>",
        "domain name 'a/b' must not contain '/'",
    ),
    (
        "dot-name",
        "<domain type='kvm'><name>.hidden</name></domain>",
        "domain name '.hidden' must not start with '.'",
    ),
    (
        "long-name",
        f"<domain type='kvm'><name>{'n' * 201}</name></domain>",
        "longer than 200 characters",
    ),
    ("tab-name", "<domain type='kvm'><name>a\tb</name></domain>", "printable characters only"),
    (
        "bad-uuid",
        "<domain type='kvm'><name>a</name><uuid>not-a-uuid</uuid></domain>",
        "malformed uuid element",
    ),
    ("bad-id", "<domain type='kvm' id='x1'><name>a</name></domain>", "invalid domain id 'x1'"),
    (
        "bad-vcpu",
        "<domain type='kvm'><name>a</name><vcpu>two</vcpu></domain>",
        "invalid vcpu count 'two'",
    ),
    (
        "bad-memory",
        "<domain type='kvm'><name>a</name><memory>-5</memory></domain>",
        "invalid memory size '-5'",
    ),
    (
        "bad-unit",
        "<domain type='kvm'><name>a</name><memory unit='parsec'>5</memory></domain>",
        "unknown memory unit 'parsec'",
    ),
    (
        "bad-index",
        _with_devices(
            "<disk type='file'><source file='/a' index='one'/><target dev='vda'/></disk>"
        ),
        "invalid disk source index 'one'",
    ),
    (
        "huge-index",
        _with_devices(f"<disk type='file'><source file='/a' index='{'9' * 5000}'/></disk>"),
        "disk source index '999999999999999999999999...' is too large",
    ),
    (
        "duplicate-target",
        _with_devices(
            "<disk type='file'><source file='/a.img'/><target dev='vda'/></disk>"
            "<disk type='file'><source file='/b.img'/><target dev='vda'/></disk>"
        ),
        "target 'vda' duplicated for disk sources '/a.img' and '/b.img'",
    ),
    (
        "no-target",
        _with_devices("<disk type='file'><source file='/a.img'/></disk>"),
        "missing target information for disk source '/a.img'",
    ),
    (
        "relative-source",
        _with_devices("<disk type='file'><source file='images/a.img'/><target dev='vda'/></disk>"),
        "disk source path 'images/a.img' must be absolute",
    ),
    (
        "relative-block",
        _with_devices("<disk type='block'><source dev='sdb'/><target dev='vda'/></disk>"),
        "disk source path 'sdb' must be absolute",
    ),
    (
        "relative-backing",
        _with_devices(
            "<disk type='file'><source file='/top.qcow2'/>"
            "<backingStore type='file'><format type='qcow2'/>"
            "<source file='base.qcow2'/></backingStore>"
            "<target dev='vda'/></disk>"
        ),
        "disk source path 'base.qcow2' must be absolute",
    ),
    (
        "relative-mirror",
        _with_devices(
            "<disk type='file'><source file='/top.qcow2'/>"
            "<mirror type='file' job='copy'><source file='copy.qcow2'/></mirror>"
            "<target dev='vda'/></disk>"
        ),
        "disk source path 'copy.qcow2' must be absolute",
    ),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [h[1:] for h in _HOSTILE], ids=[h[0] for h in _HOSTILE]
)
def test_hostile_input_rejected(text: str | bytes, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        parse_domain(text)
    err = info.value
    assert err.code == ErrorCode.XML_ERROR
    assert fragment in err.message
    assert err.message.startswith("XML error: ")
    assert "root:x:0:0" not in err.message
    assert "/bin/bash" not in err.message


def test_memory_overflow() -> None:
    text = _MINIMAL.replace("<memory unit='MiB'>512</memory>", "<memory unit='EiB'>99999</memory>")
    with pytest.raises(VirtError) as info:
        parse_domain(text)
    assert info.value.code == ErrorCode.OVERFLOW


def test_parse_error_names_the_document() -> None:
    with pytest.raises(VirtError) as info:
        parse_document("<a>", what="snapshot definition", root_tag="a")
    assert info.value.message.startswith("XML error: snapshot definition: malformed XML")


def test_non_text_input_rejected() -> None:
    with pytest.raises(VirtError) as info:
        parse_domain(None)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.XML_ERROR


def test_external_entity_never_read() -> None:
    # Even handed to the parser directly, nothing of /etc/passwd is read.
    with pytest.raises(VirtError) as info:
        parse_document(_EXTERNAL_ENTITY.encode(), what="domain definition", root_tag="domain")
    assert "root:" not in str(info.value)


def test_depth_limit_boundary() -> None:
    # Root is level 1, <metadata> level 2: 62 nested <a> reach level 64 exactly.
    assert parse_domain(_nested(62)).name == "deep"
    with pytest.raises(VirtError):
        parse_domain(_nested(63))


def test_size_limit_boundary() -> None:
    head = "<domain type='kvm'><name>big</name><description>"
    tail = "</description></domain>"
    fill = MAX_DOCUMENT_BYTES - len(head) - len(tail)
    assert parse_domain(head + "x" * fill + tail).name == "big"
    with pytest.raises(VirtError):
        parse_domain(head + "x" * (fill + 1) + tail)


def test_validate_domain_on_models() -> None:
    dom = parse_domain(_MINIMAL)
    cases = [
        (dataclasses.replace(dom, name="a\x00b"), "must not contain NUL"),
        (dataclasses.replace(dom, name=""), "domain name is missing"),
        (dataclasses.replace(dom, uuid="xyz"), "malformed uuid element"),
        (
            dataclasses.replace(
                dom, disks=(dom.disks[0], dataclasses.replace(dom.disks[1], target="vda"))
            ),
            "target 'vda' duplicated",
        ),
    ]
    for bad, fragment in cases:
        with pytest.raises(VirtError) as info:
            validate_domain(bad)
        assert info.value.code == ErrorCode.XML_ERROR
        assert fragment in info.value.message
    validate_domain(dom)


def test_serialize_document_escapes() -> None:
    root = etree.Element("a")
    root.set("v", "x'y\"z&<>\n")
    child = etree.SubElement(root, "b")
    child.text = "1 < 2 & 3 > 2 'q'"
    assert serialize_document(root) == (
        "<a v='x&apos;y&quot;z&amp;&lt;&gt;&#10;'>\n  <b>1 &lt; 2 &amp; 3 &gt; 2 'q'</b>\n</a>\n"
    )
    again = etree.fromstring(serialize_document(root).encode())
    assert again.get("v") == "x'y\"z&<>\n"


def _write_with(root: etree._Element, scope: dict[str | None, str] | None) -> str:
    from virtshift.xml.safe import _write_node

    out: list[str] = []
    _write_node(root, 0, out, scope, pretty=True)
    return "".join(out)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in _CORPUS.rglob("*.xml") if b"xmlns" not in p.read_bytes()),
    ids=lambda p: p.name,
)
def test_every_serializer_path_writes_the_same_text(path: Path) -> None:
    # Documents without namespaces skip every nsmap lookup; the bytes must be
    # those the namespace-aware path writes (libvirt's own test documents).
    root = etree.fromstring(path.read_bytes())
    root.set("extra", "a'b\"c&d<e>f\ng\th\ri")
    assert _write_with(root, None) == _write_with(root, {})
    # A tree the caller owns is re-indented and written by lxml's C serializer,
    # then its attributes are quoted libvirt's way: the text must be what the
    # Python serializer writes for the tree as it was, and the result of
    # formatting each corpus domain through both paths must agree too.
    root.set("extra", "a'b\"c&d<e>f\ng\th")
    expected = serialize_document(root)
    assert serialize_document(copy.deepcopy(root), owned=True) == expected
    if root.tag == "domain":
        dom = parse_domain(path.read_bytes())
        assert format_domain(dom) == serialize_document(domain_element(dom))


_LEAF_TEXT = st.sampled_from(["", "x", "  ", "\n  ", "a'b\"c<&>", "caf\u00e9\ttab", "\r", None])


@st.composite
def _trees(draw: st.DrawFn, depth: int = 0) -> etree._Element:
    el = etree.Element(draw(st.sampled_from(["a", "b", "disk", "source"])))
    for name in draw(st.lists(st.sampled_from(["x", "y", "file"]), unique=True, max_size=2)):
        el.set(name, draw(_LEAF_TEXT) or "")
    el.text = draw(_LEAF_TEXT)
    if depth < 3:
        for _ in range(draw(st.integers(0, 3))):
            child = draw(_trees(depth + 1))
            child.tail = draw(st.sampled_from([None, "\n  ", "\n", " tail ", ""]))
            if draw(st.integers(0, 9)) == 0:
                el.append(etree.Comment("c"))
            el.append(child)
    return el


@given(_trees())
@settings(max_examples=300, deadline=None)
def test_owned_path_writes_what_the_python_path_writes(root: etree._Element) -> None:
    # mixed content, blank and empty texts, quotes, tabs, carriage returns,
    # comments: whatever the tree, both paths give the same text
    assert serialize_document(copy.deepcopy(root), owned=True) == serialize_document(root)


def _rebuilt(layer: StorageSource | None) -> StorageSource | None:
    """``layer`` and its chain as new objects (same values, same trees): never
    taken for "as parsed", so formatted layer by layer."""
    if layer is None:
        return None
    return dataclasses.replace(layer, backing=_rebuilt(layer.backing))


def _layer_by_layer(dom: Domain) -> Domain:
    out = dom
    for disk in dom.disks:
        source = _rebuilt(disk.source)
        assert source is not None
        mirror = disk.mirror
        if mirror is not None:
            mirror = dataclasses.replace(mirror, source=_rebuilt(mirror.source))
        out = out.with_disk(dataclasses.replace(disk, source=source, mirror=mirror))
    return out


_CHAIN_DOCS = sorted(
    p
    for p in _CORPUS.rglob("*.xml")
    # a layer below a top (an end marker alone has no attributes)
    if re.search(rb"<backingStore\s", p.read_bytes())
    and p.read_bytes().lstrip().startswith(b"<domain")
)


@pytest.mark.parametrize("path", _CHAIN_DOCS, ids=lambda p: p.name)
def test_layers_read_from_a_status_are_copied_as_formatting_them_gives(path: Path) -> None:
    # A status document's <backingStore> layers are read as "as parsed" and
    # formatting copies their elements; the text must be what formatting each
    # layer gives, for the status as read and with a new top on every disk
    # (a snapshot: the old chain goes one level down), live and inactive.
    from virtshift.model.status import DomainState, DomainStatus, QemuCaps
    from virtshift.ops.snapshot import OverlayPlan, apply_overlays
    from virtshift.xml.status import format_status, parse_status

    try:
        dom = parse_domain(path.read_bytes())
    except VirtError:
        pytest.skip("not a document virtshift reads")
    if not dom.uuid:
        dom = dataclasses.replace(dom, uuid=str(uuid.uuid4()))
    status = DomainStatus(
        state=DomainState.RUNNING,
        reason="booted",
        pid=1,
        monitor="/r/m.sock",
        query_monitor="/r/q.sock",
        log="/l/vm.log",
        rundir="/r",
        persistent=False,
        caps=QemuCaps(version="7.2.22", package="p", commands=frozenset({"a"})),
        next_index=100,
        domain=dom,
    )
    back = parse_status(format_status(status))
    chains = [d.source for d in back.domain.disks] + [
        d.mirror.source for d in back.domain.disks if d.mirror is not None
    ]
    below = [layer for top in chains for layer in top.chain()[1:]]
    assert below
    assert all(layer.as_parsed for layer in below)
    assert not any(top.as_parsed for top in chains)  # a top's tree is its <source>
    snapped = apply_overlays(
        back.domain,
        [
            OverlayPlan(target=d.target, path=f"/new/{d.target}", node="n", index=90 + i)
            for i, d in enumerate(back.domain.disks)
            if d.target
        ],
    )
    for model in (back.domain, snapped):
        slow = _layer_by_layer(model)
        for inactive in (False, True):
            assert format_domain(model, inactive=inactive) == format_domain(slow, inactive=inactive)
        assert format_status(dataclasses.replace(back, domain=model)) == format_status(
            dataclasses.replace(back, domain=slow)
        )


def test_serializer_declares_namespaces_wherever_one_is_in_scope() -> None:
    text = (
        "<domain type='qemu'><name>n</name><metadata>"
        "<app:info xmlns:app='http://example.org/app' xml:lang='en'>"
        "<app:item app:key='v'>x</app:item></app:info></metadata></domain>"
    )
    root = etree.fromstring(text.encode())
    written = serialize_document(root)
    assert written == (
        "<domain type='qemu'>\n  <name>n</name>\n  <metadata>\n"
        "    <app:info xmlns:app='http://example.org/app' xml:lang='en'>\n"
        "      <app:item app:key='v'>x</app:item>\n    </app:info>\n  </metadata>\n</domain>\n"
    )
    plain = etree.fromstring(b"<a><b xml:lang='en'>t</b></a>")
    assert serialize_document(plain) == "<a>\n  <b xml:lang='en'>t</b>\n</a>\n"


def _nested_backing_stores() -> list[tuple[str, int]]:
    found = []
    for path in sorted(_CORPUS.rglob("*.xml")):
        root = etree.fromstring(path.read_bytes())
        for pos, bs in enumerate(root.iter("backingStore")):
            if bs.find("backingStore") is not None and len(bs.find("backingStore")) > 0:
                found.append((str(path), pos))
    return found


@pytest.mark.parametrize(("path", "pos"), _nested_backing_stores())
def test_a_layer_copy_keeps_everything_but_the_rest_of_the_chain(path: str, pos: int) -> None:
    # formatting copies one <backingStore> per level and rebuilds the nested
    # one; the copy must be the element itself with the nested one in place
    from virtshift.xml.domain import _copy_layer

    bs = list(etree.fromstring(Path(path).read_bytes()).iter("backingStore"))[pos]
    copied = _copy_layer(bs)
    nested = bs.find("backingStore")
    assert nested is not None
    stand_in = copied.find("backingStore")
    assert stand_in is not None
    assert len(stand_in) == 0
    assert list(copied).index(stand_in) == list(bs).index(nested)
    copied.replace(stand_in, copy.deepcopy(nested))
    assert etree.tostring(copied) == etree.tostring(copy.deepcopy(bs))
