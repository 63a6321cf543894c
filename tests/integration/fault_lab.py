"""The fault matrix's laboratory: a domain to break, the operations to run on it,
and one comparable picture of everything an operation may change.

:func:`capture` takes that picture: the live and persistent domain XML
(normalized), the snapshot metadata (names, parents, current, XML), QEMU's block
graph per disk (top node name and each layer's driver and file, the file names
of QEMU's ``json:`` pseudo names extracted), and every file under the lab's
directories (type, size, link target).  Guest data is checked separately: the
patterns written through the virtio devices before an operation are read back
after it (online after a flush, offline with ``qemu-io -r`` once QEMU is gone).

Operations run in this process, or in a child process
(``python -m tests.integration.fault_lab OP CONTEXT-JSON``) that the test can
stop at a named point (``VIRTSHIFT_FAULT_STOP_AT``, see :mod:`virtshift.faults`)
and then SIGKILL, or whose QEMU it can SIGKILL while the child waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

import virtshift.libvirt as libvirt
import virtshift.libvirt_qemu as libvirt_qemu

from .conftest import wait_for, xml_chain

MiB = 1024 * 1024
DISK_ONLY = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
ATOMIC = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
REUSE = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
PIVOT = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
REOPEN_MIRROR = libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR
TARGETS = [f"vd{chr(ord('a') + i)}" for i in range(16)]
PROXY = Path(__file__).with_name("qemu_hiding_commands.py")


# -- the lab ---------------------------------------------------------------------------


@dataclass
class Lab:
    """Domain ``vm`` with ``ndisks`` disks on ``sd1``; ``sd2`` is where faults are made.

    vda is base <- mid <- top (data in each layer), the others one layer each.
    """

    conn: Any
    uri: str
    root: Path
    sd1: Path
    sd2: Path
    ndisks: int
    name: str = "vm"
    #: (target, pattern, offset) of every 1 MiB the guest (or qemu-io offline) wrote
    written: list[tuple[str, int, int]] = field(default_factory=list)
    trigger: Path | None = None

    @property
    def dom(self) -> Any:
        return self.conn.lookupByName(self.name)

    def ctx(self) -> dict[str, Any]:
        return {"uri": self.uri, "name": self.name, "sd1": str(self.sd1), "sd2": str(self.sd2)}

    def alias(self, target: str) -> str:
        return f"virtio-disk{TARGETS.index(target)}"

    def write(self, target: str, pattern: int, offset: int) -> None:
        """A guest write through the device, flushed (so it survives a QEMU SIGKILL)."""
        dev = f"/machine/peripheral/{self.alias(target)}/virtio-backend"
        for cmd in (f'"write -P 0x{pattern:x} {offset} 1M"', '"flush"'):
            out = libvirt_qemu.qemuMonitorCommand(self.dom, f"qemu-io -d {dev} {cmd}", 1)
            assert out.strip() == "", out
        self.written.append((target, pattern, offset))

    def write_all(self, pattern: int, offset: int) -> None:
        for i, t in enumerate(TARGETS[: self.ndisks]):
            self.write(t, pattern + i, offset)

    def tops(self, flags: int = 0) -> dict[str, tuple[str, str]]:
        """Each disk's top file and format, from the live (or given) XML."""
        doc = etree.fromstring(self.dom.XMLDesc(flags).encode())
        out = {}
        for disk in doc.findall("devices/disk"):
            out[disk.find("target").get("dev")] = (
                disk.find("source").get("file"),
                disk.find("driver").get("type"),
            )
        return out

    def chain(self, target: str = "vda") -> list[str]:
        return xml_chain(self.dom.XMLDesc(0), target)

    def check_data(self, tops: dict[str, tuple[str, str]] | None = None) -> None:
        """Every pattern reads back from each disk's top (force-shared while QEMU runs:
        the writes were flushed)."""
        if tops is None:
            tops = self.tops()
            for t in TARGETS[: self.ndisks]:  # a job's writes may sit in QEMU's caches
                dev = f"/machine/peripheral/{self.alias(t)}/virtio-backend"
                libvirt_qemu.qemuMonitorCommand(self.dom, f'qemu-io -d {dev} "flush"', 1)
        for target, pattern, offset in self.written:
            path, fmt = tops[target]
            res = subprocess.run(
                ["qemu-io", "-r", "-U", "-f", fmt, "-c",
                 f"read -P 0x{pattern:x} {offset} 1M", path],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            assert res.returncode == 0, (path, res.stdout, res.stderr)
            assert "Pattern verification failed" not in res.stdout, (
                f"{target}: 0x{pattern:x} at {offset // MiB} MiB lost from {path}"
            )


def offline_write(path: Path, pattern: int, offset: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{pattern:x} {offset} 1M", str(path)],
        check=True,
        capture_output=True,
    )


def img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def proxy_emulator(tmp: Path) -> tuple[str, Path]:
    """An emulator whose QMP goes through the proxy; returns it and its trigger file
    (write a command name there to have the next such command's reply swallowed and
    the connection closed)."""
    trigger = tmp / "close-on"
    wrapper = tmp / "qemu-closing-proxy"
    wrapper.write_text(
        f"#!/bin/sh\nQMP_PROXY_CLOSE_TRIGGER={trigger} exec {sys.executable} {PROXY} '' -- "
        '/usr/bin/qemu-system-x86_64 "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper), trigger


def make_lab(
    conn: Any, uri: str, root: Path, images: Path, *, ndisks: int = 1, proxy: bool = False
) -> Lab:
    from .conftest import domain_xml, make_image

    sd1, sd2 = images / "sd1", images / "sd2"
    sd1.mkdir()
    sd2.mkdir(exist_ok=True)
    base = make_image(sd1 / "base.qcow2", size="16M")
    offline_write(base, 0x01, 2 * MiB)
    mid = make_image(sd1 / "mid.qcow2", size="16M", backing=base)
    offline_write(mid, 0x02, 3 * MiB)
    disks = [("vda", make_image(sd1 / "vda.qcow2", size="16M", backing=mid), "qcow2")]
    disks += [(t, make_image(sd1 / f"{t}.qcow2", size="16M"), "qcow2") for t in TARGETS[1:ndisks]]
    extra, trigger = "", None
    if proxy:
        emulator, trigger = proxy_emulator(images)
        extra = f"\n    <emulator>{emulator}</emulator>"
    dom = conn.defineXML(domain_xml("vm", disks, extra=extra))
    dom.create()
    lab = Lab(conn=conn, uri=uri, root=root, sd1=sd1, sd2=sd2, ndisks=ndisks, trigger=trigger)
    lab.written += [("vda", 0x01, 2 * MiB), ("vda", 0x02, 3 * MiB)]
    lab.write_all(0x10, 0)
    return lab


# -- the picture -------------------------------------------------------------------------


def _xml(text: str) -> str:
    doc = etree.fromstring(text.encode(), etree.XMLParser(remove_blank_text=True))
    return etree.tostring(doc, method="c14n").decode()


def _files_of(name: str) -> str:
    """A QEMU file name, or the file names inside a ``json:`` pseudo name (trap 5)."""
    if not name.startswith("json:"):
        return name
    found: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "filename" and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)

    walk(json.loads(name[5:]))
    return "json:" + ",".join(found)


def block_graph(dom: Any) -> dict[str, Any]:
    """Per device: the top node name and (driver, file) of every layer, from query-block."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    out: dict[str, Any] = {}
    for dev in reply["return"]:
        inserted = dev.get("inserted")
        if inserted is None:
            continue
        layers, image = [], inserted["image"]
        while image:
            layers.append((image.get("format"), _files_of(image["filename"])))
            image = image.get("backing-image")
        out[dev["qdev"]] = {"node": inserted["node-name"], "layers": layers}
    return out


def file_set(*dirs: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``dirs``: (kind, size) or ("symlink", target); locks skipped."""
    out: dict[str, tuple[Any, ...]] = {}
    for d in dirs:
        if not d.exists():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix == ".lock":
                continue
            if p.is_symlink():
                out[str(p)] = ("symlink", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", p.stat().st_size)
            elif p.is_dir():
                out[str(p)] = ("dir",)
    return out


def snapshot_meta(dom: Any) -> dict[str, Any]:
    snaps = {}
    for snap in dom.listAllSnapshots(0):
        try:
            parent = snap.getParent().getName()
        except libvirt.libvirtError:
            parent = None
        snaps[snap.getName()] = (parent, _xml(snap.getXMLDesc(0)))
    current = dom.snapshotCurrent().getName() if dom.hasCurrentSnapshot() else None
    return {"snapshots": snaps, "current": current}


def capture(lab: Lab) -> dict[str, Any]:
    """Everything an operation may change (guest data aside: see Lab.check_data)."""
    dom = lab.dom
    active = bool(dom.isActive())
    return {
        "active": active,
        "live": _xml(dom.XMLDesc(0)) if active else None,
        "inactive": _xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)),
        "meta": snapshot_meta(dom),
        "graph": block_graph(dom) if active else None,
        "files": file_set(lab.sd1, lab.sd2),
    }


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of two pictures that differ (for assertion messages)."""
    return [k for k in a if a[k] != b.get(k)]


# -- waiting and faults --------------------------------------------------------------------


def mirror_ready(dom: Any, disk: str = "vda") -> bool:
    info = dom.blockJobInfo(disk, 0)
    if not info or info["cur"] != info["end"]:
        return False
    doc = etree.fromstring(dom.XMLDesc(0).encode())
    for d in doc.findall("devices/disk"):
        if d.find("target").get("dev") == disk:
            m = d.find("mirror")
            return m is not None and m.get("ready") == "yes"
    return False


def wait_ready(dom: Any, disk: str = "vda") -> None:
    wait_for(lambda: mirror_ready(dom, disk), f"the job on {disk} to be ready")


def wait_gone(dom: Any, disk: str = "vda") -> None:
    wait_for(lambda: not dom.blockJobInfo(disk, 0), f"the job on {disk} to end")


def qemu_pid(lab: Lab) -> int:
    from .conftest import status_pid

    return status_pid(lab.root / "run" / "qemu" / f"{lab.name}.xml")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return "X"


@contextlib.contextmanager
def child_op(lab: Lab, op: str, stop_at: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``op`` in a child process that stops itself at ``stop_at``; yields it once
    stopped.  The child is killed on the way out whatever happens."""
    env = {**os.environ, "VIRTSHIFT_FAULT_STOP_AT": stop_at}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.fault_lab", op, json.dumps(lab.ctx())],
        env=env,
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: _state(proc.pid) == "T" or proc.poll() is not None, f"{op} to reach {stop_at}"
        )
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"{op} ended before {stop_at}: {proc.returncode} {out} {err}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def resume(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Let a stopped child go on; returns (exit status, stdout, stderr)."""
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


# -- the operations (also run by the child process) --------------------------------------


def snapshot_xml(ctx: dict[str, Any], ndisks: int, name: str = "s1") -> str:
    """All overlays but the last on sd1, the last one on sd2 (where faults are made), so
    a fault on sd2 fails the last action of the transaction, after QEMU created the
    other overlays."""
    sd1, sd2 = ctx["sd1"], ctx["sd2"]
    disks = "".join(
        f"<disk name='{t}' snapshot='external'>"
        f"<source file='{sd2 if i == ndisks - 1 else sd1}/{t}.{name}'/></disk>"
        for i, t in enumerate(TARGETS[:ndisks])
    )
    return f"<domainsnapshot><name>{name}</name><disks>{disks}</disks></domainsnapshot>"


def copy_xml(path: str, fmt: str = "qcow2") -> str:
    return f"<disk type='file'><source file='{path}'/><driver type='{fmt}'/></disk>"


def mirror_snapshot_xml(ctx: dict[str, Any], mirror: str) -> str:
    return (
        f"<domainsnapshot><name>mig</name><disks><disk name='vda' snapshot='external'>"
        f"<source file='{ctx['sd1']}/vda.mig'/><mirror file='{mirror}'/></disk>"
        "</disks></domainsnapshot>"
    )


def run_op(op: str, ctx: dict[str, Any]) -> None:
    """One operation of the matrix on the domain of ``ctx``."""
    conn = libvirt.open(ctx["uri"])
    try:
        dom = conn.lookupByName(ctx["name"])
        sd2 = ctx["sd2"]
        if op == "snapshot-1":
            dom.snapshotCreateXML(snapshot_xml(ctx, 1), DISK_ONLY | ATOMIC)
        elif op == "snapshot-16":
            dom.snapshotCreateXML(snapshot_xml(ctx, 16), DISK_ONLY | ATOMIC)
        elif op == "blockcopy":
            dom.blockCopy("vda", copy_xml(f"{sd2}/copy.qcow2"), None, 0)
        elif op == "mirror-snapshot":
            dom.snapshotCreateXML(mirror_snapshot_xml(ctx, f"{sd2}/vda.mig"), DISK_ONLY)
        elif op == "pivot":
            dom.blockJobAbort("vda", PIVOT)
        elif op == "reopen-mirror":
            dom.snapshotLookupByName("mig").delete(REOPEN_MIRROR)
        elif op == "stream":
            dom.blockRebase("vda", f"{ctx['sd1']}/base.qcow2", 0, 0)
        elif op == "commit":
            dom.blockCommit("vda", f"{ctx['sd1']}/base.qcow2", f"{ctx['sd1']}/mid.qcow2", 0, 0)
        elif op == "wait-job":
            # what a libvirt program does after blockRebase/blockCommit: poll until
            # the job is gone (the call that sees it pending flushes and finalizes it)
            while dom.blockJobInfo("vda", 0):
                time.sleep(0.05)
        elif op == "active-commit":
            dom.blockCommit(
                "vda", f"{ctx['sd1']}/mid.qcow2", None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            )
        else:
            raise AssertionError(f"unknown operation {op}")
    finally:
        conn.close()


def code_of(call: Callable[[], object]) -> tuple[int, str]:
    try:
        call()
    except libvirt.libvirtError as err:
        return err.get_error_code(), str(err)
    raise AssertionError("no libvirtError raised")


if __name__ == "__main__":
    try:
        run_op(sys.argv[1], json.loads(sys.argv[2]))
    except libvirt.libvirtError as err:
        print(f"error {err.get_error_code()}: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
