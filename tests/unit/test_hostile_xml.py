"""Property-based hostile input for every XML entry point: whatever the bytes,
the parsers answer with a VirtError (libvirt's codes) or a model, never another
exception, never entity expansion, never a file read."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtshift.errors import VirtError
from virtshift.xml.domain import parse_disk_source, parse_domain
from virtshift.xml.snapshot import parse_snapshot, validate_snapshot_xml
from virtshift.xml.status import parse_status

PARSERS = {
    "domain": parse_domain,
    "snapshot": parse_snapshot,
    "snapshot-redefine": lambda t: parse_snapshot(t, redefine=True, internal=True),
    "status": parse_status,
    "disk": parse_disk_source,
    "validate": validate_snapshot_xml,
}

TAGS = ["domain", "domainsnapshot", "disk", "domstatus", "name", "source", "backingStore",
        "disks", "devices", "memory", "target", "driver", "mirror", "uuid", "state"]  # fmt: skip
ATTRS = ["file", "dev", "name", "type", "snapshot", "index", "unit", "path", "format"]


@st.composite
def xmlish(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(TAGS))
    attrs = "".join(
        f" {a}='{draw(st.text(max_size=12)).replace(chr(39), '')}'"
        for a in draw(st.lists(st.sampled_from(ATTRS), max_size=3, unique=True))
    )
    kids = "" if depth > 3 else "".join(draw(st.lists(xmlish(depth + 1), max_size=3)))
    text = draw(st.sampled_from(["", "x", "/abs/path", "rel/path", "&amp;", "1024", "-1",
                                 "99999999999999999999999", "\x7f", "é"]))  # fmt: skip
    return f"<{tag}{attrs}>{text}{kids}</{tag}>"


def _check(parse, data: str | bytes) -> None:
    message = None
    try:
        parse(data)
    except VirtError as err:  # the only exception allowed
        message = err.message
    if message is not None:
        assert message
        assert "root:x:" not in message


@pytest.mark.parametrize("which", sorted(PARSERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300), xmlish()))
def test_parsers_only_raise_virterror(which: str, data: str | bytes) -> None:
    _check(PARSERS[which], data)


@pytest.mark.parametrize("which", sorted(PARSERS))
@pytest.mark.parametrize(
    "doc",
    [
        "<!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domain>&e;</domain>",
        "<!DOCTYPE d [<!ENTITY % p SYSTEM 'http://127.0.0.1:9/x'> %p;]><domain/>",
        "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;&a;'>"
        "<!ENTITY c '&b;&b;&b;&b;'>]><domainsnapshot><name>&c;</name></domainsnapshot>",
        "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd' parse='text'/>",
        "<domain>" * 5000 + "</domain>" * 5000,
        "<domain " + " ".join(f"a{i}='x'" for i in range(20000)) + "/>",
        b"<domain>\xff\xfe\x00</domain>",
        "<domain><name>a\x00b</name></domain>",
    ],
)
def test_classic_attacks(which: str, doc: str | bytes) -> None:
    with pytest.raises(VirtError):
        PARSERS[which](doc)


def test_no_file_is_read_through_xinclude_or_entities(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    doc = (f"<!DOCTYPE d [<!ENTITY e SYSTEM 'file://{secret}'>]>"
           f"<domain type='qemu'><name>&e;</name></domain>")  # fmt: skip
    with pytest.raises(VirtError) as exc:
        parse_domain(doc)
    assert "TOP-SECRET" not in exc.value.message
