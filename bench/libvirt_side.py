"""The libvirt side of the virtshift benchmarks (run by ``bench/run --with-libvirt``).

Runs under Debian's ``/usr/bin/python3`` with ``python3-libvirt``, as the
unprivileged user that runs ``libvirtd`` in session mode (``qemu:///session``),
and answers one JSON request per line on stdin with one JSON line on stdout, so
that the benchmark can interleave libvirt's repetitions with virtshift's and
raw QMP's.  Every time is measured here with ``time.perf_counter`` around the
libvirt call, as the main benchmark does for virtshift.

Requests (``op``): ``hello``; ``snap_setup`` / ``snap_rep`` / ``snap_teardown``
(an ATOMIC disk-only snapshot of N disks); ``mig_rep`` (a storage migration
built from libvirt calls: snapshot + copy of the old chain + blockCopy
SHALLOW|REUSE_EXT + pivot).  Only the standard library and libvirt are used.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback

import libvirt
import libvirt_qemu

MIB = 1024 * 1024
STATE = {}


def img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def target(i):
    s, i = "", i + 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(97 + r) + s
    return "vd" + s


def domain_xml(name, paths):
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{p}'/><target dev='{target(i)}' bus='virtio'/></disk>"
        for i, p in enumerate(paths)
    )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>"
        f"<devices>{disks}</devices></domain>"
    )


def conn():
    if "conn" not in STATE:
        STATE["conn"] = libvirt.open("qemu:///session")
    return STATE["conn"]


def op_hello(req):
    c = conn()
    return {"libvirt": c.getLibVersion(), "qemu": c.getVersion(), "uid": os.getuid()}


def op_snap_setup(req):
    n, d, name = req["n"], req["dir"], req["name"]
    os.makedirs(d, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(d, f"d{i}.qcow2")
        img("create", "-q", "-f", "qcow2", p, req.get("size", "16M"))
        paths.append(p)
    t0 = time.perf_counter()
    dom = conn().createXML(domain_xml(name, paths), libvirt.VIR_DOMAIN_START_PAUSED)
    STATE["snap"] = {"dom": dom, "tops": paths, "dir": d}
    return {"start_s": time.perf_counter() - t0}


def op_snap_rep(req):
    st = STATE["snap"]
    k, reuse = req["k"], req["mode"] == "precreated"
    new = [os.path.join(st["dir"], f"d{i}.s{k}.qcow2") for i in range(len(st["tops"]))]
    if reuse:
        for top, ov in zip(st["tops"], new, strict=True):
            img("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", ov)
    disks = "".join(
        f"<disk name='{target(i)}' snapshot='external'><driver type='qcow2'/>"
        f"<source file='{p}'/></disk>"
        for i, p in enumerate(new)
    )
    xml = f"<domainsnapshot><name>s{k}</name><disks>{disks}</disks></domainsnapshot>"
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    if reuse:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
    os.sync()  # as virtshift_bench's snapshot reps: no writeback of what ran before counts
    t0 = time.perf_counter()
    snap = st["dom"].snapshotCreateXML(xml, flags)
    t = time.perf_counter() - t0
    # the same state before every repetition: drop the metadata (not timed)
    snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    st["tops"] = new
    return {"t": t}


def op_snap_teardown(req):
    st = STATE.pop("snap", None)
    if st is not None:
        with contextlib.suppress(libvirt.libvirtError):
            st["dom"].destroy()
        shutil.rmtree(st["dir"], ignore_errors=True)
    return {}


class Writer(threading.Thread):
    """A busy guest: 256 KiB writes through the virtio device, one every 10 ms."""

    def __init__(self, dom):
        super().__init__(daemon=True)
        self.dom, self.stop, self.n, self.errors = dom, threading.Event(), 0, []

    def run(self):
        while not self.stop.is_set():
            off = (self.n % 256) * 256 * 1024
            cmd = (
                "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "
                f'"write -P 0x{0x40 + self.n % 64:x} {off} 256k"'
            )
            try:
                libvirt_qemu.qemuMonitorCommand(
                    self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
                )
                self.n += 1
            except libvirt.libvirtError as err:
                self.errors.append(str(err))
            time.sleep(0.01)


def wait_ready(dom, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "ready='yes'" in dom.XMLDesc(0):
            return
        time.sleep(0.01)
    raise RuntimeError("mirror not ready")


def op_mig_rep(req):
    golden, work, busy = req["golden"], req["work"], req["busy"]
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.makedirs(src)
    os.makedirs(dst)
    for f in ("base.qcow2", "top.qcow2"):
        subprocess.run(
            ["cp", "--sparse=always", os.path.join(golden, f), os.path.join(src, f)], check=True
        )
    top = os.path.join(src, "top.qcow2")
    img("rebase", "-u", "-f", "qcow2", "-b", os.path.join(src, "base.qcow2"), "-F", "qcow2", top)
    os.sync()  # as virtshift_bench._mig_prepare: the prepared files are on disk first
    dom = conn().createXML(domain_xml(req["name"], [top]), libvirt.VIR_DOMAIN_START_PAUSED)
    writer = Writer(dom) if busy else None
    phases = {}
    try:
        if writer:
            writer.start()
            time.sleep(0.2)
        overlay = os.path.join(src, "top.mig.qcow2")
        flat = os.path.join(dst, "top.qcow2")
        mirror = os.path.join(dst, "top.mig.qcow2")
        t0 = time.perf_counter()
        xml = (
            "<domainsnapshot><name>mig</name><disks><disk name='vda' snapshot='external'>"
            f"<driver type='qcow2'/><source file='{overlay}'/></disk></disks></domainsnapshot>"
        )
        dom.snapshotCreateXML(
            xml,
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
        )
        t1 = time.perf_counter()
        img("convert", "-f", "qcow2", "-O", "qcow2", top, flat)
        img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", mirror)
        t2 = time.perf_counter()
        dom.blockCopy(
            "vda",
            f"<disk type='file'><driver type='qcow2'/><source file='{mirror}'/></disk>",
            None,
            libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT,
        )
        wait_ready(dom)
        t3 = time.perf_counter()
        dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        t4 = time.perf_counter()
        phases = {
            "snapshot": t1 - t0,
            "copy (qemu-img convert + create)": t2 - t1,
            "blockCopy to ready": t3 - t2,
            "pivot": t4 - t3,
        }
        ok = mirror in dom.XMLDesc(0)
    finally:
        if writer:
            writer.stop.set()
            writer.join()
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "t": t4 - t0,
        "phases": phases,
        "on_dest": ok,
        "writes": writer.n if writer else 0,
        "write_errors": writer.errors[:3] if writer else [],
    }


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            out = {"ok": True, **globals()["op_" + req["op"]](req)}
        except Exception as err:  # report, keep serving
            out = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-2000:],
            }
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    op_snap_teardown({})


if __name__ == "__main__":
    main()
