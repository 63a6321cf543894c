"""The transaction guessed from a plain request before it is parsed and planned
(:func:`plain_disk_requests`, :func:`likely_actions`): when there is a guess,
it is exactly the plan's transaction; when that is not clear, there is none.
A wrong guess would cost a withdrawn command, never a wrong one (the plan
decides what is submitted), but every guess below must be right."""

from __future__ import annotations

import dataclasses

import pytest

from virtshift.model.domain import Disk, Domain, StorageSource
from virtshift.model.status import QemuCaps
from virtshift.ops.snapshot import (
    CreateFlags,
    SnapshotPlan,
    likely_actions,
    plan_snapshot,
    snapshot_sync_arguments,
    transaction_actions,
)
from virtshift.xml.snapshot import (
    apply_creation_defaults,
    parse_snapshot,
    parse_snapshot_root,
    plain_disk_requests,
)

ATOMIC = CreateFlags.DISK_ONLY | CreateFlags.ATOMIC
REUSE = ATOMIC | CreateFlags.REUSE_EXT


def _disk(target: str, node: int, **kw: object) -> Disk:
    source = StorageSource(
        path=f"/images/{target}.qcow2",
        format="qcow2",
        index=node,
        node_name=f"libvirt-{node}-format",
    )
    return Disk(target=target, source=source, alias=f"virtio-disk{node}", **kw)  # type: ignore[arg-type]


DOMAIN = Domain(
    name="g",
    uuid="c7a5fdbd-edaf-9455-926a-d65c16db1809",
    disks=(
        _disk("vda", 1),
        _disk("vdb", 2),
        _disk("hdc", 3, device="cdrom", readonly=True),
        _disk("vdc", 4, snapshot="no"),
    ),
)


def _request(disks: str) -> str:
    return f"<domainsnapshot><name>s</name><disks>{disks}</disks></domainsnapshot>"


def _planned(xml: str, flags: int) -> list[dict[str, object]]:
    return transaction_actions(_plan(xml, flags))


def _plan(xml: str, flags: int) -> SnapshotPlan:
    snap = apply_creation_defaults(parse_snapshot(xml), creation_time=1)
    return plan_snapshot(
        DOMAIN,
        snap,
        flags=flags,
        caps=QemuCaps(commands=frozenset({"transaction"})),
        next_index=7,
        parent=None,
        creation_time=1,
        state="running",
    )


def _guessed(xml: str, flags: int) -> list[dict[str, object]] | None:
    requested = plain_disk_requests(parse_snapshot_root(xml))
    if requested is None:
        return None
    return likely_actions(
        DOMAIN, requested, reuse=bool(flags & CreateFlags.REUSE_EXT), next_index=7
    )


A = "<disk name='vda' snapshot='external'><source file='/o/a.qcow2'/></disk>"
B = "<disk name='vdb' snapshot='external'><source file='/o/b.qcow2'/></disk>"


@pytest.mark.parametrize("flags", [ATOMIC, REUSE])
@pytest.mark.parametrize(
    "disks",
    [
        A + B,
        B + A,  # the plan's order is the domain's
        A.replace(" snapshot='external'", "") + B,  # a source says external
        A + B.replace("<source", "<driver type='qcow2'/><source"),
        A
        + B
        + "<disk name='vdc' snapshot='no'/>".replace(
            "snapshot='no'", "snapshot='external'"
        ).replace("/>", "><source file='/o/c.qcow2'/></disk>"),
        A + B.replace("snapshot='external'", "snapshot='external' type='file'"),
    ],
)
def test_a_guess_is_the_plans_transaction(disks: str, flags: int) -> None:
    xml = _request(disks)
    guess = _guessed(xml, flags)
    assert guess is not None
    assert guess == _planned(xml, flags)


@pytest.mark.parametrize(
    "disks",
    [
        A,  # vdb would get an overlay of a default name
        A + B.replace("name='vdb'", "name='/images/vdb.qcow2'"),  # named by its path
        A + B.replace("snapshot='external'", "snapshot='no'"),
        A
        + B.replace(
            "<source file='/o/b.qcow2'/>", "<source file='/o/b.qcow2'/><mirror file='/m'/>"
        ),
        A + B.replace("type", "x").replace("snapshot=", "type='block' snapshot="),
        A + B.replace("/o/b.qcow2", "o/b.qcow2"),  # relative (the parse refuses it)
        A + B.replace("<source file='/o/b.qcow2'/>", ""),
        A + B + "<disk name='hdc' snapshot='external'><source file='/o/c.iso'/></disk>",
        A + B + "<!-- a comment -->",
        A + B + B,  # twice (the plan refuses it)
        A + B + "<disk name='vdz' snapshot='external'><source file='/o/z.qcow2'/></disk>",
    ],
)
def test_no_guess_when_the_request_is_not_plain(disks: str) -> None:
    assert _guessed(_request(disks), ATOMIC) is None


def test_no_guess_without_disks() -> None:
    assert plain_disk_requests(parse_snapshot_root("<domainsnapshot/>")) is None
    assert plain_disk_requests(parse_snapshot_root(_request(""))) == {}
    assert likely_actions(DOMAIN, {}, reuse=False, next_index=7) is None


def test_the_parsed_root_parses_as_the_text() -> None:
    xml = _request(A + B)
    assert parse_snapshot(parse_snapshot_root(xml)) == parse_snapshot(xml)


@pytest.mark.parametrize(
    ("disk", "flags", "data"),
    [
        # QEMU's defaults (format qcow2, the only one planned; mode
        # absolute-paths, which creates the overlay) are left out of what QEMU
        # reads one byte at a time
        (A, ATOMIC, {}),
        (A.replace("<source", "<driver type='qcow2'/><source"), ATOMIC, {}),
        (A, REUSE, {"mode": "existing"}),
    ],
)
def test_the_transaction_leaves_out_qemus_defaults(
    disk: str, flags: int, data: dict[str, str]
) -> None:
    xml = _request(disk + B)
    actions = _planned(xml, flags)
    assert actions == [
        {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": f"libvirt-{node}-format",
                "snapshot-file": f"/o/{name}.qcow2",
                "snapshot-node-name": f"libvirt-{new}-format",
                **data,
            },
        }
        for node, name, new in ((1, "a", 7), (2, "b", 8))
    ]
    assert _guessed(xml, flags) == actions


def test_a_format_other_than_qcow2_is_sent() -> None:
    ov = _plan(_request(A + B), REUSE).overlays[0]
    args = snapshot_sync_arguments(dataclasses.replace(ov, format="qed"), reuse=True)
    assert args["format"] == "qed"
    assert args["mode"] == "existing"
