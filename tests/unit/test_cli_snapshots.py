"""The snapshot verbs of the CLI against libvirt's own virsh test scripts.

* ``snapshot-create-args.in`` -> ``.out``: ``snapshot-create-as --print-xml``
  argument parsing, byte for byte.
* ``snapshot.in`` -> ``.out``: tree view, current snapshot, list filters and
  delete flags, on a domain whose snapshot tree is built with
  ``snapshot-create --redefine`` (libvirt's script builds the fan-out with
  ``snapshot-revert``, which virtshift's external snapshots do not have).
  Deletes carry ``--metadata``: the snapshots are metadata only here.  No
  QEMU runs: every step is metadata.
"""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

from virtshift.cli.main import main


def run(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        main(list(args))
    return out.getvalue()


def test_snapshot_create_as_print_xml(corpus_dir: Path) -> None:
    virsh = corpus_dir / "libvirt" / "virsh"
    got = "".join(
        run(*shlex.split(line))
        for line in (virsh / "snapshot-create-args.in").read_text().splitlines()
        if line.strip()
    )
    assert got == (virsh / "snapshot-create-args.out").read_text()


def _redefine_xml(name: str, parent: str | None, t: int) -> str:
    par = f"<parent><name>{parent}</name></parent>" if parent else ""
    return (f"<domainsnapshot><name>{name}</name>{par}<state>running</state>"
            f"<creationTime>{t}</creationTime><memory snapshot='internal'/>"
            "<disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>")  # fmt: skip


def test_virsh_snapshot_scenario(corpus_dir: Path, tmp_path: Path) -> None:
    virsh = corpus_dir / "libvirt" / "virsh"
    uri = f"qemu:///embed?root={tmp_path / 'root'}"
    xml = tmp_path / "test.xml"
    xml.write_text(
        "<domain type='qemu'><name>test</name><memory unit='MiB'>128</memory>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2'/><source file='/guest/diskimage1'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    assert "defined" in run("-c", uri, "define", str(xml))
    # the tree snapshot.in builds: revert to X makes the next snapshot a child of X
    tree = [("s1", None), ("s3", "s1"), ("s2", "s3"), ("s6", "s3"), ("s5", "s6"),
            ("s4", "s6"), ("s7", "s1"), ("s8", "s7")]  # fmt: skip
    for t, (name, parent) in enumerate(tree):
        f = tmp_path / f"{name}.xml"
        f.write_text(_redefine_xml(name, parent, 1_700_000_000 + t))
        assert run("-c", uri, "snapshot-create", "test", str(f), "--redefine", "--current") == (
            f"Snapshot {name} redefined\n\n"
        )
    script = (virsh / "snapshot.in").read_text().splitlines()
    expected = (virsh / "snapshot.out").read_text()
    start = script.index("echo Checking tree view (siblings sorted alphabetically)")
    stop = script.index("snapshot-dumpxml test s3")
    got = []
    for line in script[start:stop]:
        if line.startswith("echo "):
            got.append(line[5:] + "\n")
            continue
        if not line.strip():
            continue
        args = shlex.split(line)
        if args[0] == "snapshot-delete":
            args.append("--metadata")
        got.append(run("-c", uri, *args))
    text = "".join(got)
    want = expected[expected.index("Checking tree view") : expected.index("<domainsnapshot>")]
    assert text == want
