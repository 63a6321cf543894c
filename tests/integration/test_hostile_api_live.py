"""Hostile arguments against a running domain: every refusal is a libvirtError
with a sensible code, and neither the files nor QEMU's block graph change.

The strategies and call lists are those of tests/unit/test_hostile_api.py;
here the path arguments (copy destinations, overlay files, commit bases) reach
the code that looks at the file system and at QEMU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu
from tests.unit.test_hostile_api import (
    bad_flags,
    calls_with_flags,
    calls_with_name,
    copy_doc,
    hostile_str,
    refused,
    snapshot_doc,
    state_of,
)

from .conftest import domain_xml, make_image

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path, Path]]:
    base_dir = tmp_path_factory.mktemp("hostile-live")
    images = base_dir / "images"
    images.mkdir()
    base = make_image(images / "base.qcow2")
    top = make_image(images / "top.qcow2", backing=base)
    root = base_dir / "root"
    conn = libvirt.open(f"qemu:///embed?root={root}")
    dom = conn.createXML(domain_xml("live", [("vda", top, "qcow2")]), 0)
    try:
        yield conn, dom, root, images
    finally:
        if dom.isActive():
            dom.destroy()
        conn.close()


def graph(dom: Any) -> list[tuple[str, str]]:
    reply = json.loads(
        libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-named-block-nodes"}', 0)
    )
    return sorted((n["node-name"], n["file"]) for n in reply["return"])


def hostile_path(images: Path) -> st.SearchStrategy[str]:
    """Paths no overlay, copy or base may be: relative, with NUL or a lone
    surrogate, in a missing directory, a directory, a file of the chain, too long."""
    img = str(images)
    word = st.text(alphabet="abc.", min_size=1, max_size=6)
    return st.one_of(
        hostile_str.filter(bool),  # an empty source path means "no path" to libvirt
        st.builds(lambda a: f"rel/{a}.qcow2", word),
        st.builds(lambda a: f"{img}/{a}\0.qcow2", word),
        st.builds(lambda a: f"{img}/{a}\ud800.qcow2", word),
        st.builds(lambda a: f"{img}/missing-dir/{a}.qcow2", word),
        st.sampled_from([img, f"{img}/base.qcow2", f"{img}/top.qcow2", f"{img}/../images"]),
        st.builds(lambda n: f"{img}/{'a' * n}.qcow2", st.integers(256, 5000)),
    )


def path_calls(dom: Any, p: Any) -> list[Any]:
    disk_only = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    return [
        lambda: dom.blockCopy("vda", copy_doc(p)),
        lambda: dom.blockCopy("vda", copy_doc(p), None, libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT),
        lambda: dom.blockRebase("vda", p, 0, libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY),
        lambda: dom.blockCommit("vda", p, None),
        lambda: dom.blockCommit("vda", None, p),
        lambda: dom.blockRebase("vda", p),
        lambda: dom.snapshotCreateXML(snapshot_doc("hp", path=p), disk_only),
        lambda: dom.snapshotCreateXML(
            snapshot_doc("hp", path=p), disk_only | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        ),
    ]


def _unchanged(running: Any, call: Any, also: frozenset[int] = frozenset()) -> None:
    _conn, dom, root, images = running
    before = (state_of(root, images), graph(dom), dom.XMLDesc(0))
    refused(call, also=also)
    assert (state_of(root, images), graph(dom), dom.XMLDesc(0)) == before
    assert dom.blockJobInfo("vda", 0) == {}
    assert dom.snapshotNum(0) == 0


@pytest.mark.parametrize("which", range(8))
@SETTINGS
@given(data=st.data())
def test_hostile_paths(running, which: int, data: st.DataObject) -> None:
    p = data.draw(hostile_path(running[3]))
    # pulling down to a layer of the chain (by its path) is a valid request
    assume(not (which == 5 and p.endswith("/base.qcow2")))
    # SYSTEM_ERROR: what libvirt reports when stat() of a path fails (a name too long)
    _unchanged(
        running, path_calls(running[1], p)[which], also=frozenset({libvirt.VIR_ERR_SYSTEM_ERROR})
    )


@pytest.mark.parametrize("which", range(16))
@SETTINGS
@given(s=hostile_str)
def test_hostile_names(running, which: int, s: str) -> None:
    _unchanged(running, calls_with_name(running[0], running[1], s)[which])


@pytest.mark.parametrize("which", range(21))
@SETTINGS
@given(f=bad_flags)
def test_unknown_flags(running, which: int, f: int) -> None:
    _unchanged(running, calls_with_flags(running[0], running[1], f)[which])
    assert running[1].isActive() == 1
