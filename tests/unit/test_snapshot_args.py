"""Tests of :mod:`virtshift.cli.snapshot_args` against virsh's own test data.

``corpus/libvirt/virsh/snapshot-create-args.in`` holds nine
``snapshot-create-as --print-xml`` command lines; ``.out`` holds what virsh
printed for each (the document, then the empty line ``--print-xml`` adds).

:func:`build_snapshot_xml` receives values the command-line parser has
already separated, so every command line is translated into a call by hand
below (:data:`CALLS`, in file order).  The mapping follows virsh's rules for
``snapshot-create-as DOMAIN [NAME [DESCRIPTION [DISKSPEC...]]]``:

* the first positional is the domain (``test``) unless ``--domain`` names it;
  it does not reach the builder;
* the next free positionals fill ``--name`` and then ``--description``, unless
  those options were given explicitly; every positional after them is a
  diskspec;
* ``--diskspec`` values and positional diskspecs keep their command-line
  order;
* ``--memspec`` is passed through as ``memspec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree

from virtshift.cli.snapshot_args import build_snapshot_xml, split_spec
from virtshift.errors import ErrorCode, VirtError
from virtshift.xml.snapshot import format_snapshot, parse_snapshot, validate_snapshot_xml


@dataclass(frozen=True)
class Call:
    """One line of snapshot-create-args.in and the builder call it becomes."""

    #: The arguments after ``snapshot-create-as --print-xml``, as in the file.
    command: str
    name: str | None
    description: str | None
    diskspecs: list[str] = field(default_factory=list)
    memspec: str | None = None


CALLS: list[Call] = [
    # NAME, DESCRIPTION and two DISKSPECs all positional.
    Call("test name desc vda vdb", "name", "desc", ["vda", "vdb"]),
    # --diskspec takes vda; vdb is a positional diskspec.
    Call("test name desc --diskspec vda vdb", "name", "desc", ["vda", "vdb"]),
    Call("test name desc --diskspec vda --diskspec vdb", "name", "desc", ["vda", "vdb"]),
    Call("test name desc vda vdb", "name", "desc", ["vda", "vdb"]),
    # Options between positionals: name and desc are still NAME and DESCRIPTION.
    Call("test --diskspec vda name --diskspec vdb desc", "name", "desc", ["vda", "vdb"]),
    # Everything named; vda and vdb are the only positionals left.
    Call(
        "--description desc --name name --domain test vda vdb",
        "name",
        "desc",
        ["vda", "vdb"],
    ),
    Call(
        "--description desc --diskspec vda --name name --domain test vdb",
        "name",
        "desc",
        ["vda", "vdb"],
    ),
    # Only three positionals after the domain: vda becomes the DESCRIPTION.
    Call("test name vda vdb", "name", "vda", ["vdb"]),
    # No NAME at all; ',,' escapes a comma, '&' and '<' get escaped.
    Call(
        "test --diskspec vda,file=a&b,,c,snapshot=external --description 1<2 "
        "--diskspec vdb --memspec file=d,,e",
        None,
        "1<2",
        ["vda,file=a&b,,c,snapshot=external", "vdb"],
        "file=d,,e",
    ),
]


def _build(call: Call) -> str:
    return build_snapshot_xml(
        name=call.name,
        description=call.description,
        diskspecs=call.diskspecs,
        memspec=call.memspec,
    )


@pytest.fixture(scope="session")
def virsh_dir(corpus_dir: Path) -> Path:
    return corpus_dir / "libvirt" / "virsh"


def test_calls_follow_the_command_lines(virsh_dir: Path) -> None:
    lines = (virsh_dir / "snapshot-create-args.in").read_text().splitlines()
    prefix = "snapshot-create-as --print-xml "
    assert [line.removeprefix(prefix) for line in lines] == [c.command for c in CALLS]
    assert all(line.startswith(prefix) for line in lines)


def test_whole_output_file(virsh_dir: Path) -> None:
    # virsh prints each document followed by one more newline.
    expected = (virsh_dir / "snapshot-create-args.out").read_text()
    assert "".join(_build(call) + "\n" for call in CALLS) == expected


@pytest.mark.parametrize("index", range(len(CALLS)), ids=[c.command for c in CALLS])
def test_each_command_line(virsh_dir: Path, index: int) -> None:
    chunks = (virsh_dir / "snapshot-create-args.out").read_text().split("\n\n")
    documents = [chunk.strip("\n") + "\n" for chunk in chunks if chunk.strip()]
    assert len(documents) == len(CALLS)
    assert _build(CALLS[index]) == documents[index]


def test_escaped_document_is_well_formed() -> None:
    root = etree.fromstring(_build(CALLS[-1]).encode())
    assert root.findtext("description") == "1<2"
    assert root.find("disks/disk/source").get("file") == "a&b,c"  # type: ignore[union-attr]
    assert root.find("memory").get("file") == "d,e"  # type: ignore[union-attr]


def test_relative_paths_are_left_to_the_parser() -> None:
    # virsh does not check paths; the snapshot parser refuses the corpus
    # line's relative ones when the snapshot is created.
    with pytest.raises(VirtError) as info:
        parse_snapshot(
            build_snapshot_xml(
                name=None, description=None, diskspecs=["vda,file=a&b,,c,snapshot=external"]
            )
        )
    assert info.value.code == ErrorCode.XML_ERROR
    assert "disk snapshot image path 'a&b,c' must be absolute" in info.value.message


def test_block_overlay_driver_and_memspec() -> None:
    text = build_snapshot_xml(
        name="s1",
        description=None,
        diskspecs=[
            "vda,snapshot=external,driver=qcow2,stype=block,file=/dev/vg/o",
            "vdb,snapshot=no",
        ],
        memspec="/var/lib/mem.img,snapshot=external",
        disk_only=False,
    )
    assert text == (
        "<domainsnapshot>\n"
        "  <name>s1</name>\n"
        "  <memory snapshot='external' file='/var/lib/mem.img'/>\n"
        "  <disks>\n"
        "    <disk name='vda' snapshot='external' type='block'>\n"
        "      <driver type='qcow2'/>\n"
        "      <source dev='/dev/vg/o'/>\n"
        "    </disk>\n"
        "    <disk name='vdb' snapshot='no'/>\n"
        "  </disks>\n"
        "</domainsnapshot>\n"
    )
    validate_snapshot_xml(text)
    snap = parse_snapshot(text)
    assert (snap.disks[0].type, snap.disks[0].path, snap.disks[0].format) == (
        "block",
        "/dev/vg/o",
        "qcow2",
    )
    assert (snap.memory_snapshot, snap.memory_file) == ("external", "/var/lib/mem.img")
    # The parser writes the same disks (plus type= as libvirt does).
    assert "<source dev='/dev/vg/o'/>" in format_snapshot(snap)


def test_disk_only_does_not_change_the_document() -> None:
    with_flag = build_snapshot_xml(name="n", description=None, diskspecs=["vda"], disk_only=True)
    assert with_flag == build_snapshot_xml(name="n", description=None, diskspecs=["vda"])


def test_no_disks_no_disks_element() -> None:
    assert build_snapshot_xml(name=None, description=None, diskspecs=[]) == (
        "<domainsnapshot>\n</domainsnapshot>\n"
    )


def test_quotes_are_escaped_in_attributes_and_text() -> None:
    text = build_snapshot_xml(name="it's", description='"q"', diskspecs=["vda,file=/a'b"])
    assert "<name>it&apos;s</name>" in text
    assert "<description>&quot;q&quot;</description>" in text
    assert "<source file='/a&apos;b'/>" in text
    assert parse_snapshot(text).disks[0].path == "/a'b"


@pytest.mark.parametrize(
    ("spec", "items"),
    [
        ("vda", ["vda"]),
        ("", [""]),
        ("a,,b", ["a,b"]),
        ("a,,,b", ["a,", "b"]),
        ("a,b,", ["a", "b", ""]),
        (",,", [","]),
        ("file=d,,e", ["file=d,e"]),
    ],
)
def test_split_spec(spec: str, items: list[str]) -> None:
    assert split_spec(spec) == items


@pytest.mark.parametrize(
    ("diskspec", "fragment"),
    [
        pytest.param("", "unable to parse diskspec: ", id="empty"),
        pytest.param(",snapshot=external", "missing disk name", id="empty-name"),
        pytest.param("vda,foo=1", "unable to parse diskspec: vda,foo=1", id="unknown-key"),
        pytest.param("vda,snapshot", "unable to parse diskspec: vda,snapshot", id="no-value"),
        pytest.param("vda,file=/a,file=/b", "unable to parse diskspec", id="repeated-key"),
        pytest.param("vda,", "unable to parse diskspec: vda,", id="trailing-comma"),
        pytest.param("vda,stype=network", "Unknown storage type: 'network'", id="storage-type"),
    ],
)
def test_invalid_diskspec(diskspec: str, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        build_snapshot_xml(name="s", description=None, diskspecs=["vdb", diskspec])
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message.startswith("invalid argument: unable to parse diskspec: ")
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "memspec", ["relative.img", "", "file=/a,file=/b", "/a,snapshot=no,snapshot=no", "size=1"]
)
def test_invalid_memspec(memspec: str) -> None:
    with pytest.raises(VirtError) as info:
        build_snapshot_xml(name=None, description=None, diskspecs=[], memspec=memspec)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert info.value.message == f"invalid argument: unable to parse memspec: {memspec}"


@pytest.mark.parametrize("option", ["name", "description"])
def test_empty_name_or_description(option: str) -> None:
    values: dict[str, str | None] = {"name": None, "description": None, option: ""}
    with pytest.raises(VirtError) as info:
        build_snapshot_xml(name=values["name"], description=values["description"], diskspecs=[])
    assert info.value.code == ErrorCode.INVALID_ARG
    assert f"--{option}" in info.value.message


def test_overlays_are_applied_in_one_pass_as_one_by_one() -> None:
    # apply_overlays / config_after rebuild the domain once; the result is what
    # putting the overlays on one at a time gives, stacked ones included, and a
    # disk the definition lacks is left out of config_after only
    import dataclasses

    from virtshift.model.domain import StorageSource
    from virtshift.ops.snapshot import OverlayPlan, apply_overlays, config_after
    from virtshift.xml.domain import parse_domain

    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='/x/d{i}.qcow2'/><target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
        for i in range(6)
    )
    dom = parse_domain(
        "<domain type='qemu'><name>p</name><memory unit='MiB'>128</memory>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"
    )
    ovs = [
        OverlayPlan(target="vdc", path="/x/c1.qcow2", node="n3", index=7, new_node="n7"),
        OverlayPlan(target="vda", path="/x/a1.qcow2", node="n1", index=8, new_node="n8"),
        OverlayPlan(target="vdc", path="/x/c2.qcow2", node="n7", index=9, new_node="n9"),
        OverlayPlan(target="vdf", path="/dev/vg/f1", type="block", node="n6", index=10),
    ]

    def one_by_one_live(domain, overlays):
        for ov in overlays:
            disk = domain.disk(ov.target)
            top = StorageSource(
                type=ov.type,
                path=ov.path,
                format=ov.format,
                index=ov.index,
                node_name=ov.new_node,
                backing=disk.source,
                backing_end=False,
            )
            domain = domain.with_disk(dataclasses.replace(disk, type=ov.type, source=top))
        return domain

    def one_by_one_config(domain, overlays):
        for ov in overlays:
            disk = domain.disk(ov.target)
            if disk is None:
                continue
            src = StorageSource(type=ov.type, path=ov.path, format=ov.format)
            domain = domain.with_disk(dataclasses.replace(disk, type=ov.type, source=src))
        return domain

    live = apply_overlays(dom, ovs)
    assert live == one_by_one_live(dom, ovs)
    assert [layer.path for layer in live.disk("vdc").source.chain()] == [
        "/x/c2.qcow2",
        "/x/c1.qcow2",
        "/x/d2.qcow2",
    ]
    assert live.disk("vdf").type == "block"
    assert live.disk("vdb") is dom.disk("vdb")
    gone = [*ovs, OverlayPlan(target="vdz", path="/x/z.qcow2")]
    assert config_after(dom, gone) == one_by_one_config(dom, gone)
    assert config_after(dom, []) is dom
    with pytest.raises(AssertionError, match="vdz"):
        apply_overlays(dom, gone)
