"""Property-based hostile arguments for every public call of the facade.

Names with '/', '..', NUL, a leading '.', control characters, lone surrogates
or 300 characters; flags with unknown bits; negative or huge bandwidths; XML
of any shape; arguments of the wrong type.  Each call answers with a
libvirtError carrying a sensible code (never INTERNAL_ERROR, never an OS error
turned SYSTEM_ERROR), or a TypeError where libvirt-python raises one for a
wrong argument type, and nothing under the root changes.  Here against a shut
off domain; tests/integration/test_hostile_api_live.py runs the block calls
against a running one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import virtshift.libvirt as libvirt

#: Codes a refusal of bad input may carry.
SENSIBLE = {
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA,
    libvirt.VIR_ERR_OPERATION_INVALID,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_OVERFLOW,
    libvirt.VIR_ERR_NO_SUPPORT,
}

_short = st.text(max_size=6)

#: Strings no domain, snapshot, disk or image may be named by.  None starts with
#: '/': an absolute path in an existing directory is a valid image path.
hostile_str = st.one_of(
    st.just(""),
    st.just(".."),
    st.builds(lambda a, b: f"{a}/{b}", _short, _short),
    st.builds(lambda a: f"../{a}", _short),
    st.builds(lambda a: f".{a}", _short),
    st.builds(lambda a, b: f"{a}\0{b}", _short, _short),
    st.builds(lambda a: f"{a}\ud800", _short),  # a lone surrogate: not encodable
    st.text(alphabet=st.characters(max_codepoint=31), min_size=1, max_size=6),
    st.builds(lambda c, n: c * n, st.sampled_from("ab\u00e9\u4e2d"), st.integers(201, 400)),
).filter(lambda s: not s.startswith("/"))

#: Values of the wrong type for a string argument.
wrong_type = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
)

#: Flags with bits no call knows (and negative numbers).
bad_flags = st.one_of(st.integers(1 << 20, (1 << 31) - 1), st.integers(-(1 << 31), -1))

#: Bandwidths libvirt refuses (negative or beyond the unsigned long range in bytes).
bad_bandwidth = st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 64))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def domain_doc(name: str) -> str:
    return (
        f"<domain type='qemu'><name>{_escape(name)}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )


def snapshot_doc(name: str, disk: str = "vda", path: str | None = None) -> str:
    source = f"<source file='{_escape(path)}'/>" if path is not None else ""
    return (
        f"<domainsnapshot><name>{_escape(name)}</name><disks>"
        f"<disk name='{_escape(disk)}' snapshot='external'>{source}</disk>"
        "</disks></domainsnapshot>"
    )


def copy_doc(path: str) -> str:
    return f"<disk type='file'><source file='{_escape(path)}'/><driver type='qcow2'/></disk>"


def calls_with_name(conn: Any, dom: Any, s: Any) -> list[Callable[[], object]]:
    """Every public call, with ``s`` as its name, disk or path argument."""
    return [
        lambda: conn.lookupByName(s),
        lambda: conn.lookupByUUIDString(s),
        lambda: dom.snapshotLookupByName(s),
        lambda: dom.blockPull(s),
        lambda: dom.blockRebase(s, None),
        lambda: dom.blockRebase("vda", s),
        lambda: dom.blockRebase("vda", s, 0, libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY),
        lambda: dom.snapshotRebase(s, None),
        lambda: dom.blockCommit(s, None, None),
        lambda: dom.blockCommit("vda", s, None),
        lambda: dom.blockCommit("vda", None, s),
        lambda: dom.blockCopy(s, copy_doc("/nonexistent/x.qcow2")),
        lambda: dom.blockJobInfo(s),
        lambda: dom.blockJobAbort(s),
        lambda: dom.blockJobSetSpeed(s, 1),
        lambda: dom.blockInfo(s),
    ]


def calls_with_text(conn: Any, dom: Any, s: str) -> list[Callable[[], object]]:
    """Calls that take a name inside XML, or an XML document itself."""
    return [
        lambda: conn.defineXML(domain_doc(s)),
        lambda: conn.createXML(domain_doc(s), 0),
        lambda: dom.snapshotCreateXML(
            snapshot_doc(s), libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        ),
        lambda: dom.snapshotCreateXML(
            snapshot_doc("ok", disk=s), libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        ),
        lambda: dom.snapshotCreateXML(s, 0),
        lambda: conn.defineXML(s),
        lambda: dom.blockCopy("vda", s),
    ]


def calls_with_flags(conn: Any, dom: Any, f: int) -> list[Callable[[], object]]:
    snap = snapshot_doc("fl", path="/nonexistent/fl.qcow2")
    return [
        lambda: conn.defineXMLFlags(domain_doc("fl"), f),
        lambda: conn.createXML(domain_doc("fl"), f),
        lambda: conn.listAllDomains(f),
        lambda: dom.XMLDesc(f),
        lambda: dom.createWithFlags(f),
        lambda: dom.destroyFlags(f),
        lambda: dom.undefineFlags(f),
        lambda: dom.snapshotCreateXML(snap, f),
        lambda: dom.snapshotLookupByName("x", f),
        lambda: dom.snapshotListNames(f),
        lambda: dom.snapshotNum(f),
        lambda: dom.snapshotCurrent(f),
        lambda: dom.hasCurrentSnapshot(f),
        lambda: dom.blockPull("vda", 0, f),
        lambda: dom.blockRebase("vda", None, 0, f),
        lambda: dom.blockCopy("vda", copy_doc("/nonexistent/c.qcow2"), None, f),
        lambda: dom.blockCommit("vda", None, None, 0, f),
        lambda: dom.blockJobAbort("vda", f),
        lambda: dom.blockJobInfo("vda", f),
        lambda: dom.blockJobSetSpeed("vda", 1, f),
        lambda: dom.blockInfo("vda", f),
    ]


def calls_with_bandwidth(dom: Any, bw: int) -> list[Callable[[], object]]:
    return [
        lambda: dom.blockPull("vda", bw),
        lambda: dom.blockRebase("vda", None, bw),
        lambda: dom.blockCommit("vda", None, None, bw),
        lambda: dom.blockJobSetSpeed("vda", bw),
        lambda: dom.blockCopy("vda", copy_doc("/nonexistent/b.qcow2"), {"bandwidth": bw}),
    ]


def state_of(*dirs: Path) -> dict[str, str]:
    """Every entry under ``dirs``: kind and, for files, a hash of the content
    (lock files, created empty on first use, aside)."""
    out: dict[str, str] = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.suffix == ".lock":
                continue
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if p.is_dir() else "other"
    return out


def refused(
    call: Callable[[], object], *, type_ok: bool = False, also: frozenset[int] = frozenset()
) -> None:
    """``call`` raises a libvirtError with a sensible code (or TypeError if allowed).

    :param also: codes accepted besides :data:`SENSIBLE` for this call.
    """
    allowed: tuple[type[Exception], ...] = (
        (libvirt.libvirtError, TypeError) if type_ok else (libvirt.libvirtError,)
    )
    with pytest.raises(allowed) as exc:
        call()
    if isinstance(exc.value, libvirt.libvirtError):
        assert exc.value.get_error_code() in SENSIBLE | also, str(exc.value)


@pytest.fixture(scope="module")
def shutoff(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    base = tmp_path_factory.mktemp("hostile-api")
    root = base / "root"
    disk = base / "d.raw"
    disk.write_bytes(b"\0" * 65536)
    conn = libvirt.open(f"qemu:///embed?root={root}")
    dom = conn.defineXML(
        "<domain type='qemu'><name>vm</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    yield conn, dom, base
    conn.close()


SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _unchanged(shutoff: Any, call: Callable[[], object], *, type_ok: bool = False) -> None:
    base = shutoff[2]
    before = state_of(base)
    refused(call, type_ok=type_ok)
    assert state_of(base) == before


@pytest.mark.parametrize("which", range(16))
@SETTINGS
@given(s=hostile_str)
def test_hostile_names_and_paths(shutoff, s: str, which: int) -> None:
    _unchanged(shutoff, calls_with_name(shutoff[0], shutoff[1], s)[which])


@pytest.mark.parametrize("which", range(7))
@SETTINGS
@given(s=hostile_str.filter(bool))
def test_hostile_text_in_xml(shutoff, s: str, which: int) -> None:
    _unchanged(shutoff, calls_with_text(shutoff[0], shutoff[1], s)[which])


@pytest.mark.parametrize("which", range(21))
@SETTINGS
@given(f=bad_flags)
def test_unknown_flags(shutoff, f: int, which: int) -> None:
    _unchanged(shutoff, calls_with_flags(shutoff[0], shutoff[1], f)[which])


@pytest.mark.parametrize("which", range(5))
@SETTINGS
@given(bw=bad_bandwidth)
def test_bad_bandwidth(shutoff, bw: int, which: int) -> None:
    _unchanged(shutoff, calls_with_bandwidth(shutoff[1], bw)[which])


@pytest.mark.parametrize("which", range(16))
@SETTINGS
@given(v=wrong_type)
def test_wrong_types(shutoff, v: Any, which: int) -> None:
    _unchanged(shutoff, calls_with_name(shutoff[0], shutoff[1], v)[which], type_ok=True)
    _unchanged(shutoff, lambda: shutoff[1].XMLDesc(str(v)), type_ok=True)
