"""``virtshift demo``: the README's main job, end to end on real QEMU.

It builds a throwaway embedded root, two qcow2 disks (``vda`` with a backing
file, ``vdb`` alone), defines and starts a domain with no guest OS, writes guest
data through the virtio devices with HMP ``qemu-io``, shows the live XML (with
aliases and the backing chain read from QEMU), destroys the domain, checks every
written pattern offline with ``qemu-io -r``, and removes what it made.  It exits
non-zero if any check fails.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click

_WRITES = (  # (disk alias, pattern, offset, length)
    ("virtio-disk0", 0xAB, 0, "1M"),
    ("virtio-disk0", 0x5A, 4 * 1024 * 1024, "512k"),
    ("virtio-disk1", 0xCD, 1024 * 1024, "2M"),
)


def _img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def run_demo(keep: bool = False) -> int:
    """Run the demo; return the exit status."""
    from virtshift import libvirt, libvirt_qemu

    work = Path(tempfile.mkdtemp(prefix="virtshift-demo-"))
    root = work / "root"
    images = work / "images"
    images.mkdir()
    uri = f"qemu:///embed?root={root}"
    timeline: list[tuple[str, float]] = []
    t0 = time.monotonic()

    def step(label: str) -> None:
        timeline.append((label, time.monotonic()))
        click.echo(f"-- {label}")

    ok = True
    dom = None
    try:
        step("create images: base.qcow2 <- vda.qcow2, vdb.qcow2")
        _img("create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "64M")
        _img("create", "-q", "-f", "qcow2", "-b", str(images / "base.qcow2"), "-F", "qcow2",
             str(images / "vda.qcow2"))  # fmt: skip
        _img("create", "-q", "-f", "qcow2", str(images / "vdb.qcow2"), "64M")
        xml = f"""<domain type='qemu'>
  <name>demo</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{images / "vda.qcow2"}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{images / "vdb.qcow2"}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""
        step(f"define and start domain 'demo' ({uri})")
        conn = libvirt.open(uri)
        dom = conn.defineXML(xml)
        dom.create()
        click.echo(f"   running: id {dom.ID()}, state {dom.state()}")
        step("write guest data through the virtio devices (HMP qemu-io)")
        for dev, pat, off, length in _WRITES:
            cmd = (
                f"qemu-io -d /machine/peripheral/{dev}/virtio-backend "
                f'"write -P 0x{pat:x} {off} {length}"'
            )
            libvirt_qemu.qemuMonitorCommand(
                dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
            click.echo(f"   {dev}: 0x{pat:02x} x {length} at {off}")
        step("live XML")
        click.echo(dom.XMLDesc(0))
        step("destroy and undefine")
        dom.destroy()
        dom.undefine()
        dom = None
        step("verify the data offline (qemu-io -r)")
        files = {"virtio-disk0": images / "vda.qcow2", "virtio-disk1": images / "vdb.qcow2"}
        for dev, pat, off, length in _WRITES:
            res = subprocess.run(
                ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P 0x{pat:x} {off} {length}",
                 str(files[dev])],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            good = res.returncode == 0 and "Pattern verification failed" not in res.stdout
            ok &= good
            click.echo(
                f"   {files[dev].name}: 0x{pat:02x} at {off}: {'ok' if good else 'MISMATCH'}"
            )
        step("done")
    finally:
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo("\ntimeline:")
    for (label, t), (_n, t_next) in zip(
        timeline, [*timeline[1:], ("", time.monotonic())], strict=True
    ):
        click.echo(f"  {t - t0:6.3f}s  {t_next - t:6.3f}s  {label}")
    click.echo("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
