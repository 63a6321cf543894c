"""Tests of :mod:`virtshift.xml.snapshot` and :mod:`virtshift.model.snapshot`.

Golden data is libvirt's own snapshot test data: ``corpus/libvirt/in`` and
``out``, driven by ``corpus/libvirt/cases.json`` with the rules of
``corpus/libvirt/HOW_TESTS_WORK.md`` section 1 (libvirt's
qemudomainsnapshotxml2xmltest), and the schema check of section 2 (libvirt's
virschematest) with ``corpus/libvirt/schemas/domainsnapshot.rng``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from virtshift.errors import ErrorCode, ErrorDomain, VirtError
from virtshift.model.snapshot import (
    SnapshotDef,
    SnapshotDisk,
    SnapshotLocation,
    SnapshotMirror,
    SnapshotState,
)
from virtshift.xml.safe import MAX_DEPTH, MAX_DOCUMENT_BYTES
from virtshift.xml.snapshot import (
    MAX_SNAPSHOT_NAME_LENGTH,
    apply_creation_defaults,
    check_snapshot_name,
    format_snapshot,
    head_fields,
    parse_snapshot,
    snapshot_from_fields,
    validate_snapshot_xml,
)

_LIBVIRT = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "libvirt"
_MISSING = "<corpus missing>"


def _load_cases() -> list[dict[str, Any]]:
    path = _LIBVIRT / "cases.json"
    if not path.is_file():
        # One placeholder case, so that corpus_dir skips it with a reason.
        return [{"id": _MISSING}]
    cases: list[dict[str, Any]] = json.loads(path.read_text())["roundtrip_cases"]
    return cases


def _schema_files() -> list[str]:
    names = sorted(
        f"{d}/{p.name}"
        for d in ("in", "out")
        if (_LIBVIRT / d).is_dir()
        for p in (_LIBVIRT / d).glob("*.xml")
    )
    return names or [_MISSING]


_CASES = _load_cases()
_SCHEMA_FILES = _schema_files()

PROPOSAL_XML = """\
<domainsnapshot>
  <disks>
    <disk name='vda' snapshot='external'>
      <source file='/src/snap.img'/>
      <mirror file='/dest/snap.img'/>
    </disk>
  </disks>
</domainsnapshot>
"""


@pytest.fixture(scope="session")
def libvirt_dir(corpus_dir: Path) -> Path:
    return corpus_dir / "libvirt"


@pytest.fixture(scope="session")
def libvirt_rng(libvirt_dir: Path) -> etree.RelaxNG:
    # domainsnapshot.rng includes its siblings by relative href.
    return etree.RelaxNG(etree.parse(str(libvirt_dir / "schemas" / "domainsnapshot.rng")))


def _run_case(libvirt_dir: Path, case: dict[str, Any]) -> str:
    """One qemudomainsnapshotxml2xmltest case (HOW_TESTS_WORK.md 1.1)."""
    flags = set(case["test_flags"])
    internal = "INTERNAL" in flags
    text = (libvirt_dir / case["input"]).read_text()
    snap = parse_snapshot(text, redefine="REDEFINE" in flags, internal=internal)
    if not internal:
        assert snap.current is None
    mock_time = case["mock_creation_time"]
    if mock_time:
        # The post-parse hook runs only on the creation path, which never
        # reads a creation time from the document.
        assert snap.creation_time is None
        snap = apply_creation_defaults(snap, creation_time=mock_time)
    if "RUNNING" in flags:
        assert snap.state is None
        snap = dataclasses.replace(snap, state=SnapshotState.RUNNING)
    # FORMAT_CURRENT is added when the document said <active>1</active>;
    # format_snapshot reads that from snap.current.
    return format_snapshot(snap, internal=internal, domain_uuid=case["domain_uuid"])


def _assert_error(err: VirtError, code: ErrorCode, fragment: str) -> None:
    assert err.code == code, err.message
    assert fragment in err.message, err.message


# --------------------------------------------------------------------------
# libvirt's round-trip cases


@pytest.mark.parametrize("case", _CASES, ids=[c["id"] for c in _CASES])
def test_corpus_case(libvirt_dir: Path, case: dict[str, Any]) -> None:
    expected = (libvirt_dir / case["expected"]).read_text()
    assert _run_case(libvirt_dir, case) == expected


@pytest.mark.parametrize("case", _CASES, ids=[c["id"] for c in _CASES])
def test_corpus_case_output_matches_libvirt_schema(
    libvirt_dir: Path, libvirt_rng: etree.RelaxNG, case: dict[str, Any]
) -> None:
    out = _run_case(libvirt_dir, case)
    assert libvirt_rng.validate(etree.fromstring(out.encode())), str(libvirt_rng.error_log)
    validate_snapshot_xml(out)


def test_corpus_case_table_is_complete() -> None:
    if _CASES[0]["id"] == _MISSING:
        pytest.skip("shared corpus not found")
    assert len(_CASES) == 19
    kinds = [c["kind"] for c in _CASES]
    assert (kinds.count("out->out"), kinds.count("in->out"), kinds.count("in->in")) == (9, 7, 3)


@pytest.mark.parametrize("case", _CASES, ids=[c["id"] for c in _CASES])
def test_plain_fields_format_what_the_definition_formats(
    libvirt_dir: Path, case: dict[str, Any]
) -> None:
    # a snapshot intent keeps a new snapshot's own values as plain fields when
    # they say everything its document holds (else it keeps the document): both
    # must format the very same document, with the domain put back or not
    if case.get("expect_error"):
        pytest.skip("an error case")
    flags = set(case["test_flags"])
    text = (libvirt_dir / case["input"]).read_text()
    snap = parse_snapshot(text, redefine="REDEFINE" in flags, internal="INTERNAL" in flags)
    snap = apply_creation_defaults(snap, creation_time=case["mock_creation_time"] or 1)
    bare = dataclasses.replace(snap, domain=None)
    fields = head_fields(bare)
    has_own_elements = (
        snap.cookie is not None
        or snap.inactive_domain is not None
        or bool(snap.revert_disks)
        or any(
            d.tree is not None
            and (src := d.tree.find("source")) is not None
            and (len(src) > 0 or set(src.attrib) - {"file", "dev", "dir", "protocol", "name"})
            for d in snap.disks
        )
    )
    if fields is None:
        assert has_own_elements
        return
    assert json.loads(json.dumps(fields)) == fields  # what an intent can hold
    back = snapshot_from_fields(json.loads(json.dumps(fields)))
    uuid = case["domain_uuid"] or "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    assert format_snapshot(back, internal=True, domain_uuid=uuid) == format_snapshot(
        bare, internal=True, domain_uuid=uuid
    )
    if snap.domain is not None:
        full = dataclasses.replace(back, domain=snap.domain, domain_uuid=None)
        assert format_snapshot(full, internal=True) == format_snapshot(
            dataclasses.replace(snap, domain_uuid=None), internal=True
        )


def test_plain_fields_refuse_text_xml_cannot_hold() -> None:
    # such a text is left to formatting: libvirt drops control characters from
    # element text, and an attribute that cannot hold one is refused, before
    # QEMU is asked
    uuid = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    snap = SnapshotDef(name="s", description="bell\x07", creation_time=1, current=True)
    assert head_fields(snap) is None
    assert "<description>bell</description>" in format_snapshot(
        snap, internal=True, domain_uuid=uuid
    )
    assert head_fields(dataclasses.replace(snap, description="fine")) is not None
    disk = SnapshotDisk(name="vda", snapshot="external", path="/images/a\x07b")
    odd = dataclasses.replace(snap, description=None, disks=(disk,))
    assert head_fields(odd) is None
    with pytest.raises(VirtError) as info:
        format_snapshot(odd, internal=True, domain_uuid=uuid)
    assert info.value.code == ErrorCode.INVALID_ARG


def test_corpus_redefine_is_idempotent(libvirt_dir: Path) -> None:
    # The out->out documents parse back (creation path too) and format the same.
    text = (libvirt_dir / "out" / "disk_snapshot_redefine.xml").read_text()
    snap = parse_snapshot(text, redefine=True, internal=True)
    again = parse_snapshot(format_snapshot(snap, internal=True), redefine=True, internal=True)
    assert again == snap
    assert format_snapshot(again, internal=True) == text


def test_corpus_parses_expected_model(libvirt_dir: Path) -> None:
    snap = parse_snapshot(
        (libvirt_dir / "out" / "disk_snapshot_redefine.xml").read_text(),
        redefine=True,
        internal=True,
    )
    assert (snap.name, snap.state, snap.parent, snap.creation_time) == (
        "my snap name",
        "disk-snapshot",
        "earlier_snap",
        1272917631,
    )
    assert (snap.memory_snapshot, snap.memory_file, snap.current) == ("no", None, True)
    assert snap.is_disk_only
    assert snap.is_external
    assert [(d.name, d.snapshot) for d in snap.disks] == [
        ("hda", "no"),
        ("hdb", "no"),
        ("hdc", "internal"),
        ("hdd", "external"),
        ("hde", "external"),
        ("hdf", "external"),
    ]
    hdd = snap.disk("hdd")
    assert hdd is not None
    assert (hdd.type, hdd.format, hdd.path) == ("file", "qed", "/path/to/generated4")
    assert snap.domain is not None
    assert (snap.domain.name, snap.domain.uuid) == (
        "QEMUGuest1",
        "c7a5fdbd-edaf-9455-926a-d65c16db1809",
    )
    assert snap.domain_uuid is None
    assert snap.mirrored_disks == ()


def test_corpus_creation_path_ignores_readonly_fields(libvirt_dir: Path) -> None:
    snap = parse_snapshot((libvirt_dir / "in" / "noparent.xml").read_text())
    assert (snap.state, snap.parent, snap.creation_time, snap.domain, snap.domain_uuid) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert snap.memory_snapshot == "internal"
    ext = parse_snapshot((libvirt_dir / "in" / "external_vm.xml").read_text())
    assert (ext.memory_snapshot, ext.memory_file, ext.parent) == (
        "external",
        "/dev/HostVG/GuestMemory",
        None,
    )


def test_corpus_disks_network_and_metadata_cache(libvirt_dir: Path) -> None:
    snap = parse_snapshot((libvirt_dir / "in" / "disk_snapshot.xml").read_text())
    first = snap.disks[0]
    assert (first.name, first.snapshot, first.type, first.path) == (
        "/dev/HostVG/QEMUGuest1",
        None,
        "file",
        None,
    )
    hdf = snap.disks[6]
    assert (hdf.type, hdf.path, hdf.snapshot) == ("block", "/path/to/new3", "external")
    hdh = snap.disks[8]
    assert (hdh.type, hdh.protocol, hdh.source_name, hdh.path) == (
        "network",
        "rbd",
        "vol/name",
        None,
    )
    cache = parse_snapshot((libvirt_dir / "in" / "qcow2-metadata-cache.xml").read_text())
    assert cache.disks[0].metadata_cache_max_size == 1234


def test_legacy_domain_uuid_is_kept_on_redefine(libvirt_dir: Path) -> None:
    text = (libvirt_dir / "out" / "noparent.xml").read_text()
    snap = parse_snapshot(text, redefine=True)
    assert snap.domain is None
    assert snap.domain_uuid == "9d37b878-a7cc-9f9a-b78f-49b3abad25a8"
    # Without a UUID from the caller, the document's own one is written.
    assert format_snapshot(snap) == text
    other = format_snapshot(snap, domain_uuid="c7a5fdbd-edaf-9455-926a-d65c16db1809")
    assert "<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>" in other


# --------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("name", _SCHEMA_FILES)
def test_corpus_file_against_libvirt_schema(
    libvirt_dir: Path, libvirt_rng: etree.RelaxNG, name: str
) -> None:
    doc = etree.parse(str(libvirt_dir / name))
    expect_valid = "-invalid." not in name
    assert libvirt_rng.validate(doc) is expect_valid, str(libvirt_rng.error_log)


@pytest.mark.parametrize("name", _SCHEMA_FILES)
def test_corpus_file_against_our_schema(libvirt_dir: Path, name: str) -> None:
    data = (libvirt_dir / name).read_bytes()
    if "-invalid." not in name:
        validate_snapshot_xml(data)
        return
    with pytest.raises(VirtError) as info:
        validate_snapshot_xml(data)
    _assert_error(info.value, ErrorCode.XML_INVALID_SCHEMA, "Unable to validate doc")
    assert info.value.domain == ErrorDomain.DOMAIN_SNAPSHOT


def test_schema_is_package_data() -> None:
    resource = importlib.resources.files("virtshift.xml").joinpath("schemas/domainsnapshot.rng")
    assert resource.is_file()
    etree.RelaxNG(etree.fromstring(resource.read_bytes()))


@pytest.mark.parametrize(
    "mirror",
    [
        "<mirror file='/dest/snap.img'/>",
        "<mirror file='/dest/snap.img' format='qcow2'/>",
        "<mirror file='/dev/vg/dest' format='raw' type='block'/>",
    ],
)
def test_our_schema_accepts_mirror(mirror: str) -> None:
    validate_snapshot_xml(PROPOSAL_XML.replace("<mirror file='/dest/snap.img'/>", mirror))


@pytest.mark.parametrize(
    ("xml", "fragment"),
    [
        (PROPOSAL_XML.replace("/dest/snap.img", "dest/snap.img"), "disks"),
        (PROPOSAL_XML.replace("<mirror file=", "<mirror type='network' file="), "disks"),
        (PROPOSAL_XML.replace("<mirror file=", "<mirror bogus='1' file="), "disks"),
        (
            "<domainsnapshot><disks><disk name='vda' snapshot='no'>"
            "<mirror file='/d'/></disk></disks></domainsnapshot>",
            "disks",
        ),
        (
            "<domainsnapshot><disks><disk name='vda'><source file='/a' startupPolicy='optional'/>"
            "</disk></disks></domainsnapshot>",
            "",
        ),
        ("<domainsnapshot><state>sleeping</state></domainsnapshot>", "state"),
        ("<domainsnapshot><memory snapshot='manual'/></domainsnapshot>", ""),
        ("<domainsnapshot><bogus/></domainsnapshot>", ""),
        ("<domainsnapshot><domain><name>x</name></domain></domainsnapshot>", ""),
    ],
)
def test_our_schema_rejects(xml: str, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        validate_snapshot_xml(xml)
    _assert_error(info.value, ErrorCode.XML_INVALID_SCHEMA, fragment)


def test_our_schema_is_lax_inside_domain_and_cookie() -> None:
    validate_snapshot_xml(
        "<domainsnapshot><domain type='kvm' x='1'><anything><at all='yes'/></anything></domain>"
        "<inactiveDomain type='kvm'><devices/></inactiveDomain>"
        "<cookie><cpu mode='custom'/><whatever/></cookie></domainsnapshot>"
    )


def test_validate_refuses_hostile_xml() -> None:
    with pytest.raises(VirtError) as info:
        validate_snapshot_xml(
            '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domainsnapshot/>'
        )
    _assert_error(info.value, ErrorCode.XML_ERROR, "DOCTYPE")
    with pytest.raises(VirtError) as info:
        validate_snapshot_xml("<domain/>")
    _assert_error(info.value, ErrorCode.XML_ERROR, "unexpected root element")


# --------------------------------------------------------------------------
# Errors with libvirt's codes and texts

_DISKS = "<domainsnapshot><disks>{}</disks></domainsnapshot>"
_REDEFINE = "<domainsnapshot>{}</domainsnapshot>"
_FULL = "<name>s</name><creationTime>1</creationTime><state>running</state>"


@pytest.mark.parametrize(
    ("xml", "kwargs", "code", "fragment"),
    [
        pytest.param(
            _DISKS.format("<disk snapshot='no'/>"),
            {},
            ErrorCode.INTERNAL_ERROR,
            "internal error: missing name from disk snapshot element",
            id="disk-without-name",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><source file='images/new.qcow2'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "disk snapshot image path 'images/new.qcow2' must be absolute",
            id="relative-disk-path",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' type='block'><source dev='sdb'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "disk snapshot image path 'sdb' must be absolute",
            id="relative-block-path",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='external' file='mem.img'/></domainsnapshot>",
            {},
            ErrorCode.XML_ERROR,
            "memory snapshot file path (mem.img) must be absolute",
            id="relative-memory-file",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='manual'/></domainsnapshot>",
            {},
            ErrorCode.XML_ERROR,
            "'manual' memory snapshot mode not supported",
            id="manual-memory",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='internal' file='/m.img'/></domainsnapshot>",
            {},
            ErrorCode.XML_ERROR,
            "memory filename '/m.img' requires external snapshot",
            id="memory-file-without-external",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='external'/></domainsnapshot>",
            {},
            ErrorCode.XML_ERROR,
            "external memory snapshots require a filename",
            id="external-memory-without-file",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='later'/></domainsnapshot>",
            {},
            ErrorCode.XML_ERROR,
            "Invalid value for attribute 'snapshot' in element 'memory': 'later'.",
            id="unknown-memory-mode",
        ),
        pytest.param(
            "<domainsnapshot><memory snapshot='internal'/></domainsnapshot>",
            {"offline": True},
            ErrorCode.XML_ERROR,
            "memory state cannot be saved with offline or disk-only snapshot",
            id="offline-with-memory",
        ),
        pytest.param(
            _REDEFINE.format(
                "<name>s</name><creationTime>1</creationTime><state>disk-snapshot</state>"
                "<memory snapshot='internal'/>"
            ),
            {"redefine": True},
            ErrorCode.XML_ERROR,
            "memory state cannot be saved with offline or disk-only snapshot",
            id="disk-only-state-with-memory",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><driver type='qcow3'/></disk>"),
            {},
            ErrorCode.CONFIG_UNSUPPORTED,
            "unsupported configuration: unknown disk snapshot driver 'qcow3'",
            id="unknown-driver-type",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' snapshot='sometimes'/>"),
            {},
            ErrorCode.XML_ERROR,
            "Invalid value for attribute 'snapshot' in element 'disk': 'sometimes'.",
            id="unknown-disk-mode",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' snapshot='default'/>"),
            {},
            ErrorCode.XML_ERROR,
            "Zero is not permitted",
            id="explicit-default-mode",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' type='volume'/>"),
            {},
            ErrorCode.XML_ERROR,
            "unsupported disk snapshot type 'volume'",
            id="volume-disk",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' type='dir'/>"),
            {},
            ErrorCode.XML_ERROR,
            "unsupported disk snapshot type 'dir'",
            id="dir-disk",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' type='network'><source name='v'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "Missing required attribute 'protocol' in element 'source'",
            id="network-without-protocol",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' type='network'><source protocol='rbd'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "missing name for disk source",
            id="network-without-name",
        ),
        pytest.param(
            _DISKS.format(
                "<disk name='vda'><driver type='qcow2'><metadata_cache>"
                "<max_size unit='furlong'>1</max_size></metadata_cache></driver></disk>"
            ),
            {},
            ErrorCode.INVALID_ARG,
            "unknown suffix 'furlong'",
            id="metadata-cache-unit",
        ),
        pytest.param(
            _DISKS.format(
                "<disk name='vda'><driver type='qcow2'><metadata_cache>"
                "<max_size>lots</max_size></metadata_cache></driver></disk>"
            ),
            {},
            ErrorCode.XML_ERROR,
            "could not parse element ./driver/metadata_cache/max_size",
            id="metadata-cache-value",
        ),
        pytest.param(
            _DISKS.format(
                "<disk name='vda'><driver type='qcow2'><metadata_cache>"
                "<max_size unit='EiB'>16</max_size></metadata_cache></driver></disk>"
            ),
            {},
            ErrorCode.OVERFLOW,
            "value too large: 16EiB",
            id="metadata-cache-overflow",
        ),
        pytest.param(
            _REDEFINE.format("<creationTime>1</creationTime><state>running</state>"),
            {"redefine": True},
            ErrorCode.XML_ERROR,
            "a redefined snapshot must have a name",
            id="redefine-without-name",
        ),
        pytest.param(
            _REDEFINE.format("<name>s</name><state>running</state>"),
            {"redefine": True},
            ErrorCode.INTERNAL_ERROR,
            "missing creationTime from existing snapshot",
            id="redefine-without-creation-time",
        ),
        pytest.param(
            _REDEFINE.format(
                "<name>s</name><creationTime>soon</creationTime><state>running</state>"
            ),
            {"redefine": True},
            ErrorCode.INTERNAL_ERROR,
            "missing creationTime from existing snapshot",
            id="redefine-bad-creation-time",
        ),
        pytest.param(
            _REDEFINE.format("<name>s</name><creationTime>1</creationTime>"),
            {"redefine": True},
            ErrorCode.XML_ERROR,
            "missing state from existing snapshot",
            id="redefine-without-state",
        ),
        pytest.param(
            _REDEFINE.format("<name>s</name><creationTime>1</creationTime><state>sleeping</state>"),
            {"redefine": True},
            ErrorCode.CONFIG_UNSUPPORTED,
            "Invalid state 'sleeping' in domain snapshot XML",
            id="invalid-state",
        ),
        pytest.param(
            _REDEFINE.format("<name>s</name><creationTime>1</creationTime><state>nostate</state>"),
            {"redefine": True},
            ErrorCode.CONFIG_UNSUPPORTED,
            "Invalid state 'nostate' in domain snapshot XML",
            id="nostate",
        ),
        pytest.param(
            _REDEFINE.format(_FULL),
            {"redefine": True, "internal": True},
            ErrorCode.INTERNAL_ERROR,
            "Could not find 'active' element",
            id="internal-without-active",
        ),
        pytest.param(
            _REDEFINE.format("<name>a/b</name>"),
            {},
            ErrorCode.XML_DETAIL,
            "invalid snapshot name 'a/b': name can't contain '/'",
            id="name-with-slash",
        ),
        pytest.param(
            _REDEFINE.format("<name>.hidden</name>"),
            {},
            ErrorCode.XML_DETAIL,
            "invalid snapshot name '.hidden': name can't start with '.'",
            id="name-with-leading-dot",
        ),
        pytest.param(
            _REDEFINE.format(
                "<name>a/b</name><creationTime>1</creationTime><state>running</state>"
            ),
            {"redefine": True},
            ErrorCode.XML_DETAIL,
            "name can't contain '/'",
            id="redefined-name-with-slash",
        ),
        pytest.param(
            _REDEFINE.format("<name>a&#0;b</name>"),
            {},
            ErrorCode.XML_ERROR,
            "malformed XML",
            id="name-with-nul",
        ),
        pytest.param(
            _REDEFINE.format(f"<name>{'n' * (MAX_SNAPSHOT_NAME_LENGTH + 1)}</name>"),
            {},
            ErrorCode.XML_DETAIL,
            "name can't be longer than 200 characters",
            id="name-too-long",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><mirror file='dest.img'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "disk snapshot mirror path 'dest.img' must be absolute",
            id="relative-mirror",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><mirror format='qcow2'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "missing file attribute of mirror for disk 'vda'",
            id="mirror-without-file",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda' snapshot='internal'><mirror file='/d'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "mirror for disk 'vda' requires external snapshot",
            id="mirror-of-internal-snapshot",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><mirror file='/d' type='network'/></disk>"),
            {},
            ErrorCode.XML_ERROR,
            "unsupported disk snapshot mirror type 'network'",
            id="mirror-type",
        ),
        pytest.param(
            _DISKS.format("<disk name='vda'><mirror file='/d' format='qcow7'/></disk>"),
            {},
            ErrorCode.CONFIG_UNSUPPORTED,
            "unknown disk snapshot mirror format 'qcow7'",
            id="mirror-format",
        ),
    ],
)
def test_parse_errors(xml: str, kwargs: dict[str, bool], code: ErrorCode, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        parse_snapshot(xml, **kwargs)
    _assert_error(info.value, code, fragment)
    assert info.value.domain == ErrorDomain.DOMAIN_SNAPSHOT


def test_embedded_domain_errors_come_from_the_domain_parser() -> None:
    xml = _REDEFINE.format(_FULL + "<domain type='qemu'><uuid>x</uuid></domain>")
    with pytest.raises(VirtError) as info:
        parse_snapshot(xml, redefine=True)
    _assert_error(info.value, ErrorCode.XML_ERROR, "malformed uuid element 'x'")


def test_readonly_fields_are_not_checked_on_creation() -> None:
    # state / creationTime / domain are ignored, so their errors never show.
    snap = parse_snapshot(
        _REDEFINE.format(
            "<state>sleeping</state><creationTime>soon</creationTime>"
            "<domain type='qemu'><uuid>x</uuid></domain>"
        )
    )
    assert (snap.state, snap.creation_time, snap.domain) == (None, None, None)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("a/b", "invalid snapshot name 'a/b': name can't contain '/'"),
        (".snap", "invalid snapshot name '.snap': name can't start with '.'"),
        ("a\x00b", "invalid snapshot name 'a\\0b': name can't contain a NUL character"),
        ("", "name can't be empty"),
        ("x" * (MAX_SNAPSHOT_NAME_LENGTH + 1), "name can't be longer than 200 characters"),
    ],
)
def test_check_snapshot_name_refuses(name: str, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        check_snapshot_name(name)
    _assert_error(info.value, ErrorCode.XML_DETAIL, fragment)
    # XML_DETAIL has no generic prefix: the message is the detail.
    assert info.value.message.startswith("invalid snapshot name '")


@pytest.mark.parametrize(
    "name", ["snap1", "my snap name", "a.b", "x" * MAX_SNAPSHOT_NAME_LENGTH, "é"]
)
def test_check_snapshot_name_accepts(name: str) -> None:
    check_snapshot_name(name)


# --------------------------------------------------------------------------
# Hostile documents


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(
            '<!DOCTYPE d [<!ENTITY x "y">]><domainsnapshot><name>&x;</name></domainsnapshot>',
            "DOCTYPE and ENTITY declarations are not allowed",
            id="internal-entity",
        ),
        pytest.param(
            '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            "<domainsnapshot><description>&x;</description></domainsnapshot>",
            "DOCTYPE and ENTITY declarations are not allowed",
            id="external-entity",
        ),
        pytest.param(
            "<domainsnapshot><description>"
            + "a" * MAX_DOCUMENT_BYTES
            + "</description></domainsnapshot>",
            "larger than",
            id="over-1MiB",
        ),
        pytest.param(
            "<domainsnapshot><cookie>"
            + "<a>" * MAX_DEPTH
            + "</a>" * MAX_DEPTH
            + "</cookie></domainsnapshot>",
            "nested deeper than",
            id="deep-nesting",
        ),
        pytest.param(
            b"<domainsnapshot><name>\xff\xfe</name></domainsnapshot>",
            "not valid UTF-8",
            id="invalid-utf8",
        ),
        pytest.param("<domain type='qemu'/>", "unexpected root element <domain>", id="wrong-root"),
        pytest.param("<domainsnapshot><name>x</domainsnapshot>", "malformed XML", id="malformed"),
        pytest.param("", "document is empty", id="empty"),
    ],
)
def test_hostile_xml_is_refused(text: str | bytes, fragment: str) -> None:
    with pytest.raises(VirtError) as info:
        parse_snapshot(text, redefine=True)
    _assert_error(info.value, ErrorCode.XML_ERROR, fragment)
    assert info.value.message.startswith("XML error: domain snapshot: ")
    assert info.value.domain == ErrorDomain.DOMAIN_SNAPSHOT


# --------------------------------------------------------------------------
# The proposal: <mirror> inside a snapshot disk


def test_proposal_mirror_parses_and_formats() -> None:
    snap = parse_snapshot(PROPOSAL_XML)
    vda = snap.disks[0]
    assert (vda.name, vda.snapshot, vda.path) == ("vda", SnapshotLocation.EXTERNAL, "/src/snap.img")
    assert vda.mirror == SnapshotMirror(path="/dest/snap.img")
    assert snap.mirrored_disks == (vda,)
    assert snap.is_external
    assert not snap.is_disk_only
    assert format_snapshot(snap) == (
        "<domainsnapshot>\n"
        "  <disks>\n"
        "    <disk name='vda' snapshot='external' type='file'>\n"
        "      <source file='/src/snap.img'/>\n"
        "      <mirror file='/dest/snap.img'/>\n"
        "    </disk>\n"
        "  </disks>\n"
        "</domainsnapshot>\n"
    )


def test_proposal_mirror_with_format_and_block_type() -> None:
    snap = parse_snapshot(
        _DISKS.format(
            "<disk name='/src/base.img'><driver type='qcow2'/><source file='/src/snap.img'/>"
            "<mirror type='block' format='raw' file='/dev/vg/dest'/></disk>"
        )
    )
    disk = snap.disks[0]
    # A mirror (like a path) implies an external snapshot.
    assert disk.snapshot == "external"
    assert disk.mirror == SnapshotMirror(path="/dev/vg/dest", format="raw", type="block")
    out = format_snapshot(snap)
    assert (
        "    <disk name='/src/base.img' snapshot='external' type='file'>\n"
        "      <driver type='qcow2'/>\n"
        "      <source file='/src/snap.img'/>\n"
        "      <mirror file='/dev/vg/dest' format='raw' type='block'/>\n"
        "    </disk>\n"
    ) in out
    assert parse_snapshot(out) == snap
    validate_snapshot_xml(out)


def test_mirror_alone_implies_external() -> None:
    snap = parse_snapshot(_DISKS.format("<disk name='vda'><mirror file='/d.img'/></disk>"))
    assert snap.disks[0].snapshot == "external"
    assert (
        "<disk name='vda' snapshot='external'>\n      <mirror file='/d.img'/>"
        in format_snapshot(snap)
    )


# --------------------------------------------------------------------------
# Behaviour details


def test_apply_creation_defaults() -> None:
    snap = parse_snapshot("<domainsnapshot/>")
    done = apply_creation_defaults(snap, creation_time=1386166249)
    assert (done.name, done.creation_time) == ("1386166249", 1386166249)
    named = apply_creation_defaults(
        parse_snapshot(_REDEFINE.format("<name>s</name>")), creation_time=5
    )
    assert (named.name, named.creation_time) == ("s", 5)


def test_internal_active_flag() -> None:
    base = _REDEFINE.format(_FULL + "<active>{}</active>")
    assert parse_snapshot(base.format("1"), redefine=True, internal=True).current is True
    assert parse_snapshot(base.format(" 0"), redefine=True, internal=True).current is False
    snap = parse_snapshot(base.format("0"), redefine=True, internal=True)
    assert format_snapshot(snap, internal=True).endswith(
        "  <active>0</active>\n</domainsnapshot>\n"
    )
    assert "<active>" not in format_snapshot(snap)
    # Without the internal flag, <active> is not read.
    assert parse_snapshot(base.format("junk"), redefine=True).current is None


def test_redefine_memory_defaults() -> None:
    running = parse_snapshot(_REDEFINE.format(_FULL), redefine=True)
    assert running.memory_snapshot == "internal"
    offline = _REDEFINE.format("<name>s</name><creationTime>1</creationTime><state>shutoff</state>")
    assert parse_snapshot(offline, redefine=True).memory_snapshot == "no"
    # Creation path: no default at all.
    assert parse_snapshot("<domainsnapshot/>").memory_snapshot is None


def test_memory_file_implies_external() -> None:
    snap = parse_snapshot("<domainsnapshot><memory file='/m.img'/></domainsnapshot>")
    assert (snap.memory_snapshot, snap.memory_file) == ("external", "/m.img")
    assert "<memory snapshot='external' file='/m.img'/>" in format_snapshot(snap)


def test_cookie_is_kept_unless_offline() -> None:
    xml = "<domainsnapshot><name>s</name><cookie><slirpHelper/></cookie></domainsnapshot>"
    assert format_snapshot(parse_snapshot(xml)) == (
        "<domainsnapshot>\n  <name>s</name>\n"
        "  <cookie>\n    <slirpHelper/>\n  </cookie>\n</domainsnapshot>\n"
    )
    assert "<cookie>" not in format_snapshot(parse_snapshot(xml, offline=True))
    empty = parse_snapshot("<domainsnapshot><cookie/></domainsnapshot>")
    assert (
        format_snapshot(empty) == "<domainsnapshot>\n  <cookie>\n  </cookie>\n</domainsnapshot>\n"
    )


def test_unknown_elements_and_empty_values_are_dropped() -> None:
    snap = parse_snapshot(
        "<domainsnapshot><name>s</name><description></description><bogus/>"
        "<disks><disk name='vda'><source/><driver/><extra/></disk></disks></domainsnapshot>"
    )
    assert snap.description is None
    assert format_snapshot(snap) == (
        "<domainsnapshot>\n  <name>s</name>\n"
        "  <disks>\n    <disk name='vda'/>\n  </disks>\n</domainsnapshot>\n"
    )


def test_source_attributes_libvirt_does_not_write_are_dropped() -> None:
    snap = parse_snapshot(
        _DISKS.format(
            "<disk name='vda'><source file='/tmp/foo' startupPolicy='optional' index='3'>"
            "<seclabel model='dac' relabel='no'/></source></disk>"
        )
    )
    assert (
        "<source file='/tmp/foo'>\n        <seclabel model='dac' relabel='no'/>\n      </source>"
        in format_snapshot(snap)
    )


def test_text_is_escaped_like_libvirt() -> None:
    snap = SnapshotDef(name="it's", description='say "<hi>" & go')
    out = format_snapshot(snap)
    assert "  <name>it&apos;s</name>\n" in out
    assert "  <description>say &quot;&lt;hi&gt;&quot; &amp; go</description>\n" in out
    again = parse_snapshot(out)
    assert (again.name, again.description) == ("it's", 'say "<hi>" & go')


def test_format_model_built_in_code() -> None:
    snap = SnapshotDef(
        name="s1",
        state=SnapshotState.DISK_SNAPSHOT,
        creation_time=10,
        memory_snapshot=SnapshotLocation.NO,
        disks=(
            SnapshotDisk(name="vda", snapshot="external", format="qcow2", path="/o/vda.s1"),
            SnapshotDisk(name="vdb", snapshot="no"),
            SnapshotDisk(
                name="vdc",
                snapshot="external",
                type="network",
                protocol="nbd",
                source_name="export",
                delete_in_progress=True,
            ),
        ),
        current=True,
    )
    assert format_snapshot(
        snap, internal=True, domain_uuid="9d37b878-a7cc-9f9a-b78f-49b3abad25a8"
    ) == (
        "<domainsnapshot>\n"
        "  <name>s1</name>\n"
        "  <state>disk-snapshot</state>\n"
        "  <creationTime>10</creationTime>\n"
        "  <memory snapshot='no'/>\n"
        "  <disks>\n"
        "    <disk name='vda' snapshot='external' type='file'>\n"
        "      <driver type='qcow2'/>\n"
        "      <source file='/o/vda.s1'/>\n"
        "    </disk>\n"
        "    <disk name='vdb' snapshot='no'/>\n"
        "    <disk name='vdc' snapshot='external' type='network'>\n"
        "      <snapshotDeleteInProgress/>\n"
        "      <source protocol='nbd' name='export'/>\n"
        "    </disk>\n"
        "  </disks>\n"
        "  <domain>\n"
        "    <uuid>9d37b878-a7cc-9f9a-b78f-49b3abad25a8</uuid>\n"
        "  </domain>\n"
        "  <active>1</active>\n"
        "</domainsnapshot>\n"
    )


def test_delete_in_progress_is_read_only_on_redefine() -> None:
    disks = "<disks><disk name='vda' snapshot='external'><snapshotDeleteInProgress/></disk></disks>"
    assert not parse_snapshot(_REDEFINE.format(disks)).disks[0].delete_in_progress
    redefined = parse_snapshot(_REDEFINE.format(_FULL + disks), redefine=True)
    assert redefined.disks[0].delete_in_progress


def test_revert_disks_are_read_only_on_redefine() -> None:
    revert = (
        "<revertDisks><disk name='vda' snapshot='external'><source file='/r'/></disk></revertDisks>"
    )
    assert parse_snapshot(_REDEFINE.format(revert)).revert_disks == ()
    snap = parse_snapshot(_REDEFINE.format(_FULL + revert), redefine=True)
    assert [d.path for d in snap.revert_disks] == ["/r"]
    assert (
        "  <revertDisks>\n    <disk name='vda' snapshot='external' type='file'>\n"
        "      <source file='/r'/>\n    </disk>\n  </revertDisks>\n"
    ) in format_snapshot(snap)


def test_model_is_frozen_and_tree_not_compared() -> None:
    a = parse_snapshot(PROPOSAL_XML)
    b = parse_snapshot(PROPOSAL_XML.replace("  ", "    "))
    assert a == b
    assert a.tree is not b.tree
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "x"  # type: ignore[misc]
