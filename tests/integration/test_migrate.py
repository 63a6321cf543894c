"""Live storage migration (``migrate-storage``) on real QEMU.

Guest writes go through the virtio devices with HMP ``qemu-io`` before, during and
after the move and are read back offline with ``qemu-io -r``.  Crashes are made with
the engine's test switch ``VIRTSHIFT_MIGRATE_CRASH_AFTER`` (the CLI SIGKILLs itself
right after journaling a step); QEMU crashes with a SIGKILL of the pid in the status
file.

Four bugs found by these tests have their own exception types (raised only by
the exact symptom: files left behind, a transient domain lost, a name reused,
the wrong layer blamed), so a regression says which one came back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu
from virtshift.cli.main import main

from .conftest import (
    domain_xml,
    kill_and_wait,
    make_image,
    qemu_img,
    qemu_io_read,
    read_only_dir,
    small_tmpfs,
    status_pid,
    tree_state,
    wait_for,
    xml_chain,
)

MiB = 1024 * 1024
CRASH_ENV = "VIRTSHIFT_MIGRATE_CRASH_AFTER"
BEFORE_PIVOT = ("overlays", "mirroring", "copy-layer", "copied", "verified")
CRASH_STEPS = (*BEFORE_PIVOT, "pivoted", "merged")
ALIAS = {"vda": "virtio-disk0", "vdb": "virtio-disk1"}
ALL_STEPS = ("overlays", "mirroring", "copied", "verified", "pivoted", "merged", "cleaned", "done")


# -- known bugs: one exception per diagnosed symptom ---------------------------------


class CreatedFilesLeft(AssertionError):
    """Files the migration created (its source overlay / destination mirror) are left
    behind, or block a re-plan, because the journal forgot them."""


class TransientDomainLost(AssertionError):
    """A transient domain whose QEMU died cannot be found, so --resume cannot restart it."""


class StampReused(AssertionError):
    """A re-plan in the same second as the first plan collides with the first plan's files."""


class WrongLayerBlamed(AssertionError):
    """--verify full reports damage in a lower copy against another layer."""


BUG_TRANSIENT = (
    "a transient domain whose QEMU died is reaped by the driver: the CLI's lookup (and "
    "Migration._restart_if_needed's dom.isActive()) raise NO_DOMAIN, so the createXML "
    "recovery branch is unreachable"
)


# -- helpers -------------------------------------------------------------------------


def offline_write(path: Path, pattern: int, offset: int, length: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{pattern:x} {offset} {length}", str(path)],
        check=True,
        capture_output=True,
    )


def virsh(capsys: pytest.CaptureFixture[str], uri: str, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (fast): (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["-c", uri, *args])
    out, err = capsys.readouterr()
    return rc, out, err


@contextlib.contextmanager
def spawned(uri: str, *args: str, crash: str | None = None) -> Iterator[subprocess.Popen[str]]:
    """The CLI as a child process; killed on the way out whatever happens."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash is not None:
        env[CRASH_ENV] = crash
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtshift", "-c", uri, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)


def crash_at(uri: str, name: str, dest: Path, step: str, *extra: str) -> str:
    """Run migrate-storage with the crash switch; it must die by SIGKILL. Returns stderr."""
    with spawned(uri, "migrate-storage", name, "--dest", str(dest), *extra, crash=step) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    return err


def under(path: str, d: Path) -> bool:
    return os.path.abspath(path).startswith(f"{d}/")


def disk_of(j: dict, target: str) -> dict:
    """One disk of a journal (``target``) or of a status document (``disk``)."""
    return next(d for d in j["disks"] if d.get("disk", d.get("target")) == target)


def kill_qemu(root: Path, name: str) -> int:
    pid = status_pid(root / "run" / "qemu" / f"{name}.xml")
    kill_and_wait(pid)
    return pid


def open_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.append(os.readlink(fd))
    return out


def chain_files(top: str) -> list[str]:
    """Every file of the image chain under ``top``, read from the files."""
    info = json.loads(
        qemu_img("info", "-U", "--output=json", "--backing-chain", "-f", "qcow2", top)
    )
    return [i["filename"] for i in info]


def assert_clean(d: Path, keep: set[str], j: dict) -> None:
    """``d`` holds ``keep`` and nothing else; leftovers that are exactly the journal's
    overlays or mirrors are the known bug (CreatedFilesLeft)."""
    left = set(os.listdir(d)) - keep
    if not left:
        return
    ours = {os.path.basename(m[k]) for m in j["disks"] for k in ("overlay", "mirror")}
    if left <= ours:
        raise CreatedFilesLeft(f"left in {d}: {sorted(left)}")
    raise AssertionError(f"unexpected files in {d}: {sorted(left)}")


@dataclass
class Lab:
    """A running domain (vda: base <- snap1, data in both; vdb: one layer) on sd1,
    an empty sd2, and every pattern written to it."""

    conn: libvirt.virConnect
    uri: str
    root: Path
    sd1: Path
    sd2: Path
    dom: libvirt.virDomain
    name: str = "vm"
    written: list[tuple[str, int, int]] = field(default_factory=list)

    def write(self, target: str, pattern: int, offset: int, *, flush: bool = False) -> None:
        dev = f"/machine/peripheral/{ALIAS[target]}/virtio-backend"
        cmd = f'qemu-io -d {dev} "write -P 0x{pattern:x} {offset} 1M"'
        assert libvirt_qemu.qemuMonitorCommand(self.dom, cmd, 1).strip() == ""
        if flush:
            libvirt_qemu.qemuMonitorCommand(self.dom, f'qemu-io -d {dev} "flush"', 1)
        self.written.append((target, pattern, offset))

    def chain(self, target: str) -> list[str]:
        return xml_chain(self.dom.XMLDesc(0), target)

    def paths(self) -> list[str]:
        return [p for t in ALIAS for p in self.chain(t)]

    def tops(self) -> dict[str, str]:
        return {t: self.chain(t)[0] for t in ALIAS}

    def journal_path(self) -> Path:
        return self.root / "lib" / "qemu" / "migrate" / f"{self.name}.json"

    def journal(self) -> dict:
        return json.loads(self.journal_path().read_text())

    def step(self, target: str) -> str | None:
        try:
            j = self.journal()
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return next(d["step"] for d in j["disks"] if d["target"] == target)

    def verify(self, tops: dict[str, str]) -> None:
        """Every pattern reads back offline from ``tops`` (the domain must be down)."""
        for target, pattern, offset in self.written:
            assert qemu_io_read(Path(tops[target]), "qcow2", pattern, offset, "1M"), (
                f"{target}: 0x{pattern:x} at {offset // MiB} MiB missing from {tops[target]}"
            )

    def stop_and_verify(self) -> dict[str, str]:
        tops = self.tops()
        self.dom.destroy()
        self.verify(tops)
        return tops


def make_lab(
    conn: libvirt.virConnect,
    uri: str,
    root: Path,
    images: Path,
    *,
    persistent: bool = True,
    base_mib: int = 1,
    dest: Path | None = None,
) -> Lab:
    sd1 = images / "sd1"
    sd1.mkdir()
    if dest is None:
        dest = images / "sd2"
        dest.mkdir()
    base = make_image(sd1 / "base.qcow2", size="16M")
    offline_write(base, 0x11, 0, f"{base_mib}M")
    snap1 = make_image(sd1 / "snap1.qcow2", backing=base, size="16M")
    offline_write(snap1, 0x12, MiB, "1M")
    vdb = make_image(sd1 / "vdb.qcow2", size="16M")
    offline_write(vdb, 0x21, 0, "2M")
    xml = domain_xml("vm", [("vda", snap1, "qcow2"), ("vdb", vdb, "qcow2")])
    if persistent:
        dom = conn.defineXML(xml)
        dom.create()
    else:
        dom = conn.createXML(xml, 0)
    lab = Lab(conn=conn, uri=uri, root=root, sd1=sd1, sd2=dest, dom=dom)
    lab.written += [("vda", 0x11, m * MiB) for m in range(base_mib) if m != 1]
    lab.written += [("vda", 0x12, MiB), ("vdb", 0x21, 0), ("vdb", 0x21, MiB)]
    return lab


def status_json(capsys: pytest.CaptureFixture[str], lab: Lab) -> dict:
    rc, out, err = virsh(capsys, lab.uri, "migrate-storage-status", lab.name, "--json")
    assert rc == 0, err
    return json.loads(out)


# -- 1. the happy path -----------------------------------------------------------------


def test_two_disks_merge_verify_full_with_writes_during_the_move(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    sd1, sd2 = lab.sd1, lab.sd2
    lab.write("vda", 0x31, 2 * MiB)
    lab.write("vdb", 0x41, 2 * MiB)
    args = ("--merge", "--verify", "full", "--bandwidth", "1", "--json")
    with spawned(uri, "migrate-storage", "vm", "--dest", str(sd2), *args) as proc:
        # vda's lower layers are being copied (1 MiB/s) while its mirror runs
        wait_for(lambda: lab.step("vda") == "mirroring" or proc.poll() is not None, "vda copy")
        lab.write("vda", 0x32, 3 * MiB)
        lab.write("vdb", 0x42, 3 * MiB)
        assert lab.step("vda") == "mirroring", "the writes did not land during the copy"
        # vda has moved; vdb is being copied
        wait_for(lambda: lab.step("vdb") == "mirroring" or proc.poll() is not None, "vdb copy")
        lab.write("vda", 0x33, 4 * MiB)
        lab.write("vdb", 0x43, 4 * MiB)
        assert lab.step("vdb") == "mirroring", "the writes did not land during the copy"
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["state"] == "done"
    lab.write("vda", 0x34, 5 * MiB)
    lab.write("vdb", 0x44, 5 * MiB)

    # the live XML: destination paths only; --merge streamed snap1's copy away
    rc, out, err = virsh(capsys, uri, "domblklist", "vm", "--details")
    assert rc == 0, err
    rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
    assert [r[2] for r in rows] == ["vda", "vdb"]
    assert all(under(r[3], sd2) for r in rows), rows
    rc, out, err = virsh(capsys, uri, "dumpxml", "vm")
    assert rc == 0, err
    live = etree.fromstring(out.encode())
    files = live.xpath("devices/disk//source/@file")
    assert files
    assert all(under(f, sd2) for f in files), files
    assert live.find("devices/disk/mirror") is None
    st = status_json(capsys, lab)
    vda, vdb = disk_of(st, "vda"), disk_of(st, "vdb")
    assert lab.chain("vda") == [vda["mirror"], str(sd2 / "base.qcow2")]
    assert lab.chain("vdb") == [vdb["mirror"]]
    # the persistent definition follows
    rc, out, err = virsh(capsys, uri, "dumpxml", "vm", "--inactive")
    assert rc == 0, err
    inactive = etree.fromstring(out.encode()).xpath("devices/disk/source/@file")
    assert inactive == [vda["mirror"], vdb["mirror"]]
    # the status: done, with a timing for every step of every disk
    assert st["state"] == "done"
    for d in st["disks"]:
        assert (d["step"], d["consistent"]) == ("done", "destination")
        assert set(ALL_STEPS) <= set(d["timings"]), d["timings"]
        assert all(isinstance(v, float) and v >= 0 for v in d["timings"].values())
        assert d["copied"] == len(d["layers"])
    assert vda["timings"]["copied"] > 1.0  # throttled to 1 MiB/s
    assert lab.dom.snapshotListNames() == []
    assert lab.dom.blockJobInfo("vda", 0) == {} == lab.dom.blockJobInfo("vdb", 0)
    assert sorted(os.listdir(sd2)) == sorted(
        ["base.qcow2", os.path.basename(vda["mirror"]), os.path.basename(vdb["mirror"])]
    )
    for top in lab.tops().values():
        assert all(under(f, sd2) for f in chain_files(top))

    # every pattern from the destination chain; restarted, it runs there only
    lab.stop_and_verify()
    lab.dom.create()
    assert all(under(p, sd2) for p in lab.paths())
    pid = status_pid(root / "run" / "qemu" / "vm.xml")
    assert not [f for f in open_files(pid) if under(f, sd1)]
    assert [f for f in open_files(pid) if under(f, sd2)]
    lab.write("vda", 0x35, 6 * MiB)
    lab.write("vdb", 0x45, 6 * MiB)
    lab.stop_and_verify()


def test_delete_source_removes_only_the_moved_files(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    sd1, sd2 = lab.sd1, lab.sd2
    (sd1 / "notes.txt").write_text("not part of any disk")
    make_image(sd1 / "other.qcow2")
    unrelated = {
        p: b for p, b in tree_state(sd1).items() if p.endswith(("notes.txt", "other.qcow2"))
    }
    lab.write("vda", 0x31, 2 * MiB)
    lab.write("vdb", 0x41, 2 * MiB)
    rc, out, err = virsh(
        capsys, uri, "migrate-storage", "vm", "--dest", str(sd2), "--delete-source"
    )
    assert rc == 0, err
    assert out.startswith(f"Storage of domain 'vm' moved to {sd2} (vda, vdb)")
    assert sorted(os.listdir(sd1)) == ["notes.txt", "other.qcow2"]
    assert tree_state(sd1) == unrelated
    assert all(under(p, sd2) for p in lab.paths())
    assert len(lab.chain("vda")) == 3  # no --merge: mirror, snap1, base
    lab.write("vda", 0x32, 3 * MiB)
    lab.write("vdb", 0x42, 3 * MiB)
    lab.stop_and_verify()
    lab.dom.create()
    assert all(under(p, sd2) for p in lab.paths())
    lab.dom.destroy()


# -- 2. the crash matrix ---------------------------------------------------------------


def _after_crash(capsys, lab: Lab, step: str) -> str:
    """(a) and (b) after a crash at ``step``; returns the consistent storage domain."""
    j = lab.journal()
    want = "mirroring" if step == "copy-layer" else step
    assert j["state"] == "running"
    assert disk_of(j, "vda")["step"] == want
    assert disk_of(j, "vdb")["step"] == "planned"
    if step == "copy-layer":
        assert disk_of(j, "vda")["copied"] == 1
    saved = lab.journal_path().read_bytes()
    # (a) a new migration is refused, pointing at --resume / --abort, and changes nothing
    rc, _out, err = virsh(capsys, lab.uri, "migrate-storage", "vm", "--dest", str(lab.sd2))
    assert rc != 0
    for word in ("unfinished", "--resume", "--abort"):
        assert word in err, err
    assert lab.journal_path().read_bytes() == saved
    # (b) the status says which storage domain is consistent
    consistent = "destination" if step in ("pivoted", "merged") else "source"
    rc, out, err = virsh(capsys, lab.uri, "migrate-storage-status", "vm")
    assert rc == 0, err
    assert re.search(rf"Disk vda:\s+step {want}; consistent chain on the {consistent}\b", out), out
    assert re.search(r"Disk vdb:\s+step planned; consistent chain on the source\b", out), out
    st = status_json(capsys, lab)
    assert disk_of(st, "vda")["consistent"] == consistent
    # and the live chain agrees
    chain = lab.chain("vda")
    if consistent == "source":
        assert not any(under(p, lab.sd2) for p in chain), chain
    else:
        assert all(under(p, lab.sd2) for p in chain), chain
    return consistent


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_crash_then_resume(step: str, capsys, conn, uri: str, root: Path, images: Path) -> None:
    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB)
    lab.write("vdb", 0x41, 2 * MiB)
    crash_at(uri, "vm", lab.sd2, step, "--merge")
    _after_crash(capsys, lab, step)
    lab.write("vda", 0x32, 3 * MiB)
    lab.write("vdb", 0x42, 3 * MiB)
    # (c) --resume finishes; a second one is harmless
    rc, out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
    assert rc == 0, err
    assert out.startswith(f"Storage of domain 'vm' moved to {lab.sd2}")
    saved = lab.journal_path().read_bytes()
    rc, out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
    assert rc == 0, err
    assert lab.journal_path().read_bytes() == saved
    st = status_json(capsys, lab)
    assert st["state"] == "done"
    assert [d["step"] for d in st["disks"]] == ["done", "done"]
    lab.write("vda", 0x33, 4 * MiB)
    lab.write("vdb", 0x43, 4 * MiB)
    assert all(under(p, lab.sd2) for p in lab.paths()), lab.paths()
    assert lab.chain("vda") == [disk_of(st, "vda")["mirror"], str(lab.sd2 / "base.qcow2")]
    assert not [n for n in os.listdir(lab.sd2) if n.endswith(".part")]
    assert lab.dom.snapshotListNames() == []
    lab.stop_and_verify()


@pytest.mark.parametrize("step", BEFORE_PIVOT)
def test_crash_then_abort(step: str, capsys, conn, uri: str, root: Path, images: Path) -> None:
    lab = make_lab(conn, uri, root, images)
    source_files = set(os.listdir(lab.sd1))
    lab.write("vda", 0x31, 2 * MiB)
    lab.write("vdb", 0x41, 2 * MiB)
    crash_at(uri, "vm", lab.sd2, step, "--merge")
    assert _after_crash(capsys, lab, step) == "source"
    lab.write("vda", 0x32, 3 * MiB)
    lab.write("vdb", 0x42, 3 * MiB)
    rc, out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
    assert (rc, out) == (0, "Storage migration of domain 'vm' aborted\n"), err
    j = lab.journal()
    assert j["state"] == "aborted"
    for t in ALIAS:
        assert not any(under(p, lab.sd2) for p in lab.chain(t)), lab.chain(t)
        assert lab.dom.blockJobInfo(t, 0) == {}
    assert lab.dom.snapshotListNames() == []
    lab.write("vda", 0x33, 4 * MiB)
    lab.write("vdb", 0x43, 4 * MiB)
    saved = lab.journal_path().read_bytes()
    rc, out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
    assert (rc, out) == (0, "Storage migration of domain 'vm' aborted\n"), err
    assert lab.journal_path().read_bytes() == saved
    in_use = {os.path.basename(p) for p in lab.paths()}
    tops = lab.stop_and_verify()
    assert all(under(p, lab.sd1) for p in tops.values())
    assert_clean(lab.sd2, set(), j)
    assert_clean(lab.sd1, source_files | in_use, j)


# -- 3. QEMU killed as well ------------------------------------------------------------


def _wait_past_stamp(j: dict) -> None:
    """Resume in a later second than the first plan (the same second is StampReused)."""
    stamp = int(disk_of(j, "vda")["snapshot"].rsplit("-", 1)[1])
    while time.time() < stamp + 1.05:
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("step", "persistent"),
    [
        pytest.param(
            "mirroring",
            True,
            id="mirroring-persistent",
        ),
        pytest.param(
            "mirroring",
            False,
            id="mirroring-transient",
        ),
        pytest.param("pivoted", True, id="pivoted-persistent"),
        pytest.param(
            "pivoted",
            False,
            id="pivoted-transient",
        ),
    ],
)
def test_qemu_killed_then_resume_restarts_on_the_consistent_chain(
    step: str, persistent: bool, capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images, persistent=persistent)
    lab.write("vda", 0x31, 2 * MiB, flush=True)
    lab.write("vdb", 0x41, 2 * MiB, flush=True)
    crash_at(uri, "vm", lab.sd2, step, "--merge")
    old = lab.journal()
    lab.write("vda", 0x32, 3 * MiB, flush=True)
    lab.write("vdb", 0x42, 3 * MiB, flush=True)
    chain = lab.chain("vda")
    consistent_dir = lab.sd1 if step == "mirroring" else lab.sd2
    assert all(under(p, consistent_dir) for p in chain), chain
    old_pid = kill_qemu(root, "vm")
    _wait_past_stamp(old)
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
    if not persistent and rc == 3 and "Domain not found" in err:
        raise TransientDomainLost(err)
    if rc != 0 and "exists already" in err and ".migrate-" in err:
        raise CreatedFilesLeft(err)
    assert rc == 0, err
    j = lab.journal()
    how = "persistent domain" if persistent else "createXML"
    assert any("QEMU was not running" in text and how in text for _t, text in j["events"])
    dom = conn.lookupByName("vm")
    assert dom.isActive()
    assert bool(dom.isPersistent()) == persistent
    assert status_pid(root / "run" / "qemu" / "vm.xml") != old_pid
    vda = disk_of(j, "vda")
    if step == "mirroring":
        # re-planned from the chain it was restarted on: the source overlay on top
        assert [layer["path"] for layer in vda["layers"]] == chain
    else:
        assert vda["layers"] == disk_of(old, "vda")["layers"]
        assert vda["mirror"] == disk_of(old, "vda")["mirror"]
    assert j["state"] == "done"
    lab.dom = dom
    assert all(under(p, lab.sd2) for p in lab.paths()), lab.paths()
    lab.write("vda", 0x33, 4 * MiB)
    lab.write("vdb", 0x43, 4 * MiB)
    lab.stop_and_verify()


def test_restart_and_replan_in_the_same_second(
    capsys, conn, uri: str, root: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtshift.migrate import engine, resume_storage_migration

    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB, flush=True)
    crash_at(uri, "vm", lab.sd2, "mirroring")
    vda = disk_of(lab.journal(), "vda")
    stamp = int(vda["snapshot"].rsplit("-", 1)[1])
    kill_qemu(root, "vm")
    # what a correct cleanup removes anyway (CreatedFilesLeft is another bug)
    Path(vda["mirror"]).unlink()
    clock = types.SimpleNamespace(
        time=lambda: stamp + 0.5, monotonic=time.monotonic, sleep=time.sleep
    )
    monkeypatch.setattr(engine, "time", clock)
    try:
        j = resume_storage_migration(conn.lookupByName("vm"))
    except libvirt.libvirtError as err:
        if "exists already" in str(err) and vda["overlay"] in str(err):
            raise StampReused(str(err)) from err
        raise
    assert j.state == "done"
    lab.dom = conn.lookupByName("vm")
    assert all(under(p, lab.sd2) for p in lab.paths())
    lab.stop_and_verify()


# -- 4. failures -----------------------------------------------------------------------


def test_destination_fills_up(capsys, conn, uri: str, root: Path, images: Path) -> None:
    with small_tmpfs(images / "small", "4m") as small:
        _fill_up(capsys, conn, uri, root, images, small)


def _fill_up(capsys, conn, uri: str, root: Path, images: Path, small: Path) -> None:
    lab = None
    try:
        lab = make_lab(conn, uri, root, images, base_mib=8, dest=small)
        lab.write("vda", 0x31, 10 * MiB)
        lab.write("vdb", 0x41, 2 * MiB)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(small))
        assert rc != 0
        assert "No space left on device" in err, err
        assert lab.dom.isActive()
        j = lab.journal()
        assert j["state"] == "running"
        assert disk_of(status_json(capsys, lab), "vda")["consistent"] == "source"
        assert not any(under(p, small) for p in lab.paths())
        assert not [n for n in os.listdir(small) if n.endswith(".part")]
        lab.write("vda", 0x32, 11 * MiB)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
        assert rc == 0, err
        for t in ALIAS:
            assert lab.dom.blockJobInfo(t, 0) == {}
        assert not any(under(p, small) for p in lab.paths())
        lab.write("vda", 0x33, 12 * MiB)
        lab.stop_and_verify()
        assert_clean(small, set(), j)
    finally:
        if lab is not None:
            with contextlib.suppress(libvirt.libvirtError):
                lab.dom.destroy()  # before the umount: QEMU holds files there


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        size = path.stat().st_size
        path.write_bytes((b"\xde\xad\xbe\xef" * (size // 4 + 1))[:size])
        return
    # content only: the qcow2 metadata stays valid, one data cluster changes
    mapping = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(path)))
    host = next(m["offset"] for m in mapping if m["data"] and m["start"] == 0)
    with path.open("r+b") as f:
        f.seek(host)
        f.write(b"\xee" * 65536)


@pytest.mark.parametrize(("damage", "verify"), [("garbage", "quick"), ("content", "full")])
def test_damaged_destination_layer_is_never_pivoted_to(
    damage: str, verify: str, capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB)
    crash_at(uri, "vm", lab.sd2, "copied", "--verify", verify)
    vda = disk_of(lab.journal(), "vda")
    base_copy = Path(vda["dest_layers"][-1])
    assert base_copy == lab.sd2 / "base.qcow2"
    _damage(base_copy, damage)
    lab.write("vda", 0x32, 3 * MiB)
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
    assert rc != 0
    assert "Traceback" not in err
    assert str(lab.sd2) in err, err
    if damage == "garbage":
        assert f"'{base_copy}'" in err, err
    else:
        assert "differs" in err, err
    j = lab.journal()
    assert (j["state"], disk_of(j, "vda")["step"]) == ("running", "copied")
    assert disk_of(status_json(capsys, lab), "vda")["consistent"] == "source"
    assert lab.chain("vda")[0] == vda["overlay"]
    assert not any(under(p, lab.sd2) for p in lab.paths()), lab.paths()
    lab.write("vda", 0x33, 4 * MiB)
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
    assert rc == 0, err
    assert lab.dom.blockJobInfo("vda", 0) == {}
    assert not any(under(p, lab.sd2) for p in lab.paths())
    lab.write("vda", 0x34, 5 * MiB)
    lab.stop_and_verify()
    assert_clean(lab.sd2, set(), lab.journal())


def test_full_verify_names_the_damaged_layer(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    crash_at(uri, "vm", lab.sd2, "copied", "--verify", "full")
    damaged = Path(disk_of(lab.journal(), "vda")["dest_layers"][-1])
    _damage(damaged, "content")
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
    assert rc != 0
    blamed = re.search(r"copy '([^']+)' differs from '([^']+)'", err)
    assert blamed, err
    assert disk_of(lab.journal(), "vda")["step"] == "copied"
    if blamed.group(1) != str(damaged):
        raise WrongLayerBlamed(f"{damaged} was damaged; the error blames {blamed.group(1)}")
    assert blamed.group(2) == str(lab.sd1 / "base.qcow2")


def test_read_only_source_fails_before_any_change(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB)
    lab.write("vdb", 0x41, 2 * MiB)
    with read_only_dir(lab.sd1):
        assert subprocess.run(["touch", str(lab.sd1 / "probe")], check=False).returncode != 0
        before = (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        files = tree_state(lab.sd1, lab.sd2)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(lab.sd2))
        assert rc != 0
        assert "qemu-img create failed" in err, err
        assert str(lab.sd1) in err, err
        after = (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert after == before
        assert tree_state(lab.sd1, lab.sd2) == files
        assert lab.dom.snapshotListNames() == []
        assert lab.dom.blockJobInfo("vda", 0) == {}
        st = status_json(capsys, lab)
        assert [(d["step"], d["consistent"]) for d in st["disks"]] == [("planned", "source")] * 2
        lab.write("vda", 0x32, 3 * MiB)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
        assert rc == 0, err
        assert tree_state(lab.sd2) == {}
    # writable again: the move now goes through
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(lab.sd2))
    assert rc == 0, err
    lab.write("vda", 0x33, 4 * MiB)
    assert all(under(p, lab.sd2) for p in lab.paths())
    lab.stop_and_verify()


def test_missing_destination_changes_nothing(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB)
    nowhere = images / "nowhere"
    before = (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    files = tree_state(images)
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(nowhere))
    assert rc == 4
    assert f"destination directory '{nowhere}' does not exist" in err, err
    assert (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == before
    assert tree_state(images) == files
    assert not nowhere.exists()
    assert not lab.journal_path().exists()
    rc, _out, err = virsh(capsys, uri, "migrate-storage-status", "vm")
    assert rc == 3
    assert "has no storage migration" in err
    lab.write("vda", 0x32, 3 * MiB)
    lab.stop_and_verify()


def test_disk_with_an_active_block_job_is_refused(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    lab = make_lab(conn, uri, root, images)
    copy = images / "vdb-copy.qcow2"
    lab.dom.blockCopy(
        "vdb", f"<disk type='file'><source file='{copy}'/><driver type='qcow2'/></disk>", None, 0
    )

    def ready() -> bool:
        info = lab.dom.blockJobInfo("vdb", 0)  # like a libvirt-python program: poll
        if not info or info["cur"] != info["end"]:
            return False
        m = etree.fromstring(lab.dom.XMLDesc(0).encode()).find("devices/disk/mirror")
        return m is not None and m.get("ready") == "yes"

    wait_for(ready, "the block copy of vdb to be ready")
    before = (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(lab.sd2))
    assert rc == 5
    assert "disk 'vdb' already in active block job" in err, err
    assert (lab.dom.XMLDesc(0), lab.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) == before
    assert os.listdir(lab.sd2) == []
    assert not lab.journal_path().exists()
    assert lab.dom.blockJobInfo("vdb", 0)
    # only that job was in the way
    lab.dom.blockJobAbort("vdb", 0)
    lab.write("vda", 0x31, 2 * MiB)
    rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(lab.sd2))
    assert rc == 0, err
    lab.stop_and_verify()


# -- 5. two migrations at once ---------------------------------------------------------


def test_second_migration_while_the_first_runs_is_refused(
    capsys, conn, uri: str, root: Path, images: Path
) -> None:
    sd1, sd2, other = images / "sd1", images / "sd2", images / "sd3"
    for d in (sd1, sd2, other):
        d.mkdir()
    big = make_image(sd1 / "big.qcow2", size="24M")
    offline_write(big, 0x51, 0, "8M")
    dom = conn.defineXML(domain_xml("vm", [("vda", big, "qcow2")]))
    dom.create()
    lab = Lab(conn=conn, uri=uri, root=root, sd1=sd1, sd2=sd2, dom=dom)
    lab.written += [("vda", 0x51, m * MiB) for m in range(8)]
    with spawned(uri, "migrate-storage", "vm", "--dest", str(sd2), "--bandwidth", "1") as first:
        wait_for(lambda: lab.step("vda") == "mirroring" or first.poll() is not None, "the copy")
        for args in (("--dest", str(other)), ("--resume",), ("--abort",)):
            rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", *args)
            assert rc != 0, args
            assert "is running in another process" in err, err
            assert f"pid {first.pid} " in err, err
        lab.written.append(("vda", 0x52, 9 * MiB))
        libvirt_qemu.qemuMonitorCommand(
            dom,
            'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x52 9M 1M"',
            1,
        )
        assert first.poll() is None, "the first migration was not running any more"
        assert lab.step("vda") == "mirroring"
        assert os.listdir(other) == []
        out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert out.startswith(f"Storage of domain 'vm' moved to {sd2} (vda)")
    assert lab.journal()["state"] == "done"
    top = lab.chain("vda")[0]
    assert under(top, sd2)
    dom.destroy()
    lab.verify({"vda": top})
