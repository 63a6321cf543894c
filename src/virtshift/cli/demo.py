"""``virtshift demo``: the README's main job, a live storage migration end to end.

It builds a throwaway embedded root with two storage domains (directories),
a domain with two qcow2 disks (``vda``: base <- snap1, ``vdb``: one layer),
writes known patterns, starts the domain (real QEMU, no guest OS), keeps a
guest writer busy through HMP ``qemu-io`` on both disks during the whole move,
migrates both disks live to the second storage domain (``migrate-storage
--merge --verify full``), destroys the domain and checks every pattern ever
written on the destination images offline with ``qemu-io -r``, then prints a
timeline: each step's duration, bytes copied and throughput, pivot pause.
It removes what it made and exits non-zero if any check fails.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

MIB = 1024 * 1024


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _io(path: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(path)], check=True, capture_output=True
    )


def _read_ok(path: Path, pattern: int, offset: int, length: int) -> bool:
    res = subprocess.run(
        [
            "qemu-io",
            "-r",
            "-f",
            "qcow2",
            "-c",
            f"read -P 0x{pattern:x} {offset} {length}",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0 and "Pattern verification failed" not in res.stdout


class _Writer(threading.Thread):
    """A busy guest: writes 256 KiB patterns round-robin on both disks."""

    def __init__(self, dom: object) -> None:
        super().__init__(daemon=True)
        self.dom = dom
        self.stop = threading.Event()
        #: (alias, pattern, offset, length) of every write QEMU acknowledged
        self.done: list[tuple[str, int, int, int]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        from virtshift import libvirt, libvirt_qemu

        n = 0
        while not self.stop.is_set():
            alias = ("virtio-disk0", "virtio-disk1")[n % 2]
            pattern = 0x40 + n % 64
            offset = 32 * MIB + (n // 2 % 64) * 256 * 1024
            cmd = (
                f"qemu-io -d /machine/peripheral/{alias}/virtio-backend "
                f'"write -P 0x{pattern:x} {offset} 256k"'
            )
            try:
                libvirt_qemu.qemuMonitorCommand(self.dom, cmd, 1)  # type: ignore[arg-type]
                self.done.append((alias, pattern, offset, 256 * 1024))
            except libvirt.libvirtError as err:
                self.errors.append(str(err))
            n += 1
            time.sleep(0.01)


def run_demo(keep: bool = False) -> int:
    """Run the demo; return the exit status."""
    from virtshift import libvirt
    from virtshift.migrate.engine import Migration

    work = Path(tempfile.mkdtemp(prefix="virtshift-demo-"))
    sd1, sd2 = work / "storage1", work / "storage2"
    sd1.mkdir()
    sd2.mkdir()
    uri = f"qemu:///embed?root={work / 'root'}"
    t_start = time.monotonic()
    ok = True
    dom = None
    try:
        click.echo(f"-- storage domains: {sd1} -> {sd2}")
        _img("create", "-q", "-f", "qcow2", str(sd1 / "base.qcow2"), "64M")
        _io(sd1 / "base.qcow2", "write -P 0x11 0 16M")
        _img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(sd1 / "base.qcow2"),
            "-F",
            "qcow2",
            str(sd1 / "snap1.qcow2"),
        )
        _io(sd1 / "snap1.qcow2", "write -P 0x22 16M 8M")
        _img("create", "-q", "-f", "qcow2", str(sd1 / "data.qcow2"), "64M")
        _io(sd1 / "data.qcow2", "write -P 0x33 0 24M")
        xml = f"""<domain type='qemu'>
  <name>demo</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{sd1 / "snap1.qcow2"}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{sd1 / "data.qcow2"}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""
        conn = libvirt.open(uri)
        dom = conn.defineXML(xml)
        dom.create()
        click.echo(f"-- domain 'demo' running (QEMU, id {dom.ID()}); disks: base <- snap1, data")
        writer = _Writer(dom)
        writer.start()
        time.sleep(0.2)

        def progress(event: str, data: dict[str, Any]) -> None:
            if event == "step":
                click.echo(f"   {data['disk']}: {data['step']:<10} {float(data['seconds']):6.3f} s")

        click.echo("-- migrate-storage --merge --verify full, while the guest writes")
        t0 = time.monotonic()
        journal = Migration(dom, progress).start(str(sd2), merge=True, verify="full")
        took = time.monotonic() - t0
        time.sleep(0.2)
        writer.stop.set()
        writer.join()
        after = dom.XMLDesc(0)
        on_dest = str(sd1) not in after
        click.echo(f"-- moved in {took:.2f} s; live XML names only {sd2}: {on_dest}")
        ok &= on_dest and not writer.errors
        dom.destroy()
        dom.undefine()
        dom = None
        tops = {m.target: Path(m.mirror) for m in journal.disks}
        checks = [
            ("vda", 0x11, 0, 16 * MIB),
            ("vda", 0x22, 16 * MIB, 8 * MIB),
            ("vdb", 0x33, 0, 24 * MIB),
        ]
        for alias, pattern, offset, length in writer.done:
            checks.append(("vda" if alias.endswith("0") else "vdb", pattern, offset, length))
        # later writes to the same place win: check the last one of each place
        last: dict[tuple[str, int], tuple[str, int, int, int]] = {}
        for c in checks:
            last[(c[0], c[2])] = c
        bad = [c for c in last.values() if not _read_ok(tops[c[0]], c[1], c[2], c[3])]
        ok &= not bad
        click.echo(
            f"-- verified {len(last)} written ranges on the destination "
            f"({len(writer.done)} guest writes during the move): "
            + ("all intact" if not bad else f"{len(bad)} MISMATCHES")
        )
        click.echo("\ntimeline (per disk and step):")
        for m in journal.disks:
            mib = m.bytes_copied / MIB
            copy_s = m.timings.get("copied", 0.0)
            rate = mib / copy_s if copy_s else 0.0
            steps = ", ".join(f"{k} {v:.3f}s" for k, v in m.timings.items())
            click.echo(f"  {m.target}: {steps}")
            pivot_ms = m.timings.get("reopen-mirror", 0.0) * 1000
            click.echo(
                f"        copied {mib:.1f} MiB at {rate:.0f} MiB/s; "
                f"pivot (REOPEN_MIRROR: verify, attach, switch) {pivot_ms:.1f} ms"
            )
        click.echo(f"  total {time.monotonic() - t_start:.2f} s")
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
        if keep:
            click.echo(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    click.echo("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
