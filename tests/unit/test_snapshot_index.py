"""The snapshot index: a new connection builds the tree without parsing documents,
and a missing, damaged or stale index never changes what it sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import virtshift.libvirt as libvirt
import virtshift.runtime.snapshot as rs
from virtshift.store.snapshots import SnapshotStore

DOMAIN = (
    "<domain type='qemu'><name>vm</name><memory unit='MiB'>128</memory>"
    "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
    "<driver name='qemu' type='qcow2'/><source file='/guest/disk.qcow2'/>"
    "<target dev='vda' bus='virtio'/></disk></devices></domain>"
)
CHAIN = [("a", None), ("b", "a"), ("c", "b"), ("d", "b"), ("e", "d")]


def _doc(name: str, parent: str | None, t: int, external: bool = False) -> str:
    par = f"<parent><name>{parent}</name></parent>" if parent else ""
    where = "external" if external else "internal"
    return (
        f"<domainsnapshot><name>{name}</name>{par}<state>disk-snapshot</state>"
        f"<creationTime>{t}</creationTime><memory snapshot='no'/>"
        f"<disks><disk name='vda' snapshot='{where}'/></disks></domainsnapshot>"
    )


@pytest.fixture
def uri(tmp_path: Path) -> str:
    uri = f"qemu:///embed?root={tmp_path / 'root'}"
    dom = libvirt.open(uri).defineXML(DOMAIN)
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
    for t, (name, parent) in enumerate(CHAIN):
        dom.snapshotCreateXML(_doc(name, parent, 1_700_000_000 + t, external=name == "e"), flags)
    return uri


def _store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "root" / "lib" / "qemu" / "snapshot" / "vm")


def _view(uri: str) -> tuple[list[tuple[str, str | None]], str, list[str]]:
    """The tree as a fresh connection sees it: (name, parent), current, external ones."""
    dom = libvirt.open(uri).lookupByName("vm")
    snaps = dom.listAllSnapshots()
    pairs = []
    for s in snaps:
        try:
            parent = s.getParent().getName()
        except libvirt.libvirtError:
            parent = None
        pairs.append((s.getName(), parent))
    external = [
        s.getName() for s in dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL)
    ]
    return sorted(pairs), dom.snapshotCurrent().getName(), sorted(external)


EXPECTED = (sorted(CHAIN), "e", ["e"])


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the metadata documents parsed by Snapshots."""
    calls: list[int] = []
    real = rs.parse_snapshot

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rs, "parse_snapshot", counting)
    return calls


def test_new_connection_parses_no_document_for_the_tree(
    uri: str, tmp_path: Path, parses: list[int]
) -> None:
    index = _store(tmp_path).read_index()
    assert sorted(index) == ["a", "b", "c", "d", "e"]
    assert [n for n, e in index.items() if e.current] == ["e"]
    assert _view(uri) == EXPECTED
    assert parses == []
    # a lookup parses only the snapshot it returns
    dom = libvirt.open(uri).lookupByName("vm")
    assert "<name>c</name>" in dom.snapshotLookupByName("c").getXMLDesc()
    assert len(parses) == 1


def test_changes_keep_the_index_current(uri: str, tmp_path: Path, parses: list[int]) -> None:
    dom = libvirt.open(uri).lookupByName("vm")
    dom.snapshotLookupByName("c").delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    libvirt.open(uri).lookupByName("vm")._snapshots.set_current("vm", "b")
    parses.clear()
    want = ([p for p in sorted(CHAIN) if p[0] != "c"], "b", ["e"])
    assert _view(uri) == want
    assert parses == []
    assert "c" not in _store(tmp_path).read_index()


@pytest.mark.parametrize(
    "damage",
    [b"", b"{not json", b"[]", b'{"a": 1}', b'{"a": {"key": [1, 2]}}', "\u00e9".encode("latin-1")],
)
def test_damaged_index_is_rebuilt(uri: str, tmp_path: Path, damage: bytes) -> None:
    store = _store(tmp_path)
    (store.dir / ".index.json").write_bytes(damage)
    assert _view(uri) == EXPECTED
    assert sorted(store.read_index()) == ["a", "b", "c", "d", "e"]


def test_index_lies_are_caught_by_the_file_keys(uri: str, tmp_path: Path) -> None:
    store = _store(tmp_path)
    path = store.dir / ".index.json"
    data = json.loads(path.read_text())
    # an entry for a file that is gone, and wrong facts under a stale key
    data["ghost"] = dict(data["a"], name="ghost")
    data["d"] = dict(data["d"], parent="c", key=[0, 0, 0])
    path.write_text(json.dumps(data))
    assert _view(uri) == EXPECTED
    # a document replaced behind the index's back (another program, a restore)
    internal = _doc("d", "a", 1_700_000_003).replace("</domainsnapshot>", "<active>0</active>")
    store.write("d", internal + "</domainsnapshot>")
    pairs, current, external = _view(uri)
    assert ("d", "a") in pairs
    assert (current, external) == ("e", ["e"])


def test_no_index_at_all(uri: str, tmp_path: Path, parses: list[int]) -> None:
    store = _store(tmp_path)
    (store.dir / ".index.json").unlink()
    assert _view(uri) == EXPECTED
    assert len(parses) == 5
    assert (store.dir / ".index.json").exists()
    assert not [p.name for p in store.dir.iterdir() if p.name.endswith(".tmp")]
