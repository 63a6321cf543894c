"""The ``migrate-storage`` cells of the fault matrix that no test of test_migrate.py
already makes (see fault_matrix.py for which ones those are).

Each uses test_migrate.py's laboratory (vda: base <- snap1, vdb: one layer, on
sd1; sd2 the destination; every pattern the guest wrote read back at the end) and
its crash switch ``VIRTSHIFT_MIGRATE_CRASH_AFTER``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxml import etree

from .conftest import read_only_dir
from .fault_lab import proxy_emulator
from .fault_matrix import Cell
from .test_migrate import Lab as MigrateLab
from .test_migrate import (
    MiB,
    _wait_past_stamp,
    crash_at,
    disk_of,
    kill_qemu,
    make_lab,
    status_json,
    under,
    virsh,
)

#: CLI flags that make each step happen (merge and cleanup are optional steps)
_FLAGS = ("--merge", "--delete-source")


def _resume_done(capsys: Any, lab: MigrateLab) -> None:
    rc, _out, err = virsh(capsys, lab.uri, "migrate-storage", "vm", "--resume")
    assert rc == 0, err
    assert lab.journal()["state"] == "done"
    lab.dom = lab.conn.lookupByName("vm")
    assert all(under(p, lab.sd2) for p in lab.paths()), lab.paths()
    lab.write("vda", 0x33, 4 * MiB, flush=True)
    lab.write("vdb", 0x43, 4 * MiB, flush=True)
    lab.stop_and_verify()


def _under_proxy(lab: MigrateLab, images: Path) -> Path:
    """Restart the lab's domain with its QMP behind the closing proxy; the trigger file."""
    emulator, trigger = proxy_emulator(images)
    lab.dom.destroy()
    doc = etree.fromstring(lab.dom.XMLDesc(0x2).encode())  # inactive
    devices = doc.find("devices")
    el = etree.SubElement(devices, "emulator")
    el.text = emulator
    devices.insert(0, el)
    lab.dom = lab.conn.defineXML(etree.tostring(doc).decode())
    lab.dom.create()
    return trigger


def migrate_cell(cell: Cell, conn: Any, uri: str, root: Path, images: Path, capsys: Any) -> None:
    step = cell.op.split(":", 1)[1]
    lab = make_lab(conn, uri, root, images)
    lab.write("vda", 0x31, 2 * MiB, flush=True)
    lab.write("vdb", 0x41, 2 * MiB, flush=True)
    if cell.fault == "qemu-killed":
        crash_at(uri, "vm", lab.sd2, step, *_FLAGS)
        old = lab.journal()
        lab.write("vda", 0x32, 3 * MiB, flush=True)
        kill_qemu(root, "vm")
        _wait_past_stamp(old)
        _resume_done(capsys, lab)
    elif cell.fault == "python-killed":
        crash_at(uri, "vm", lab.sd2, step, *_FLAGS)
        lab.write("vda", 0x32, 3 * MiB, flush=True)
        _resume_done(capsys, lab)
    elif cell.fault == "file-missing":
        assert step == "verified"
        crash_at(uri, "vm", lab.sd2, step)
        layer = Path(disk_of(lab.journal(), "vda")["dest_layers"][-1])
        layer.unlink()
        lab.write("vda", 0x32, 3 * MiB)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
        assert rc != 0
        assert str(layer) in err, err
        assert "Traceback" not in err
        assert disk_of(status_json(capsys, lab), "vda")["consistent"] == "source"
        assert not any(under(p, lab.sd2) for p in lab.paths()), lab.paths()
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--abort")
        assert rc == 0, err
        assert not any(under(p, lab.sd2) for p in lab.paths())
        lab.write("vda", 0x33, 4 * MiB)
        lab.stop_and_verify()
    elif cell.fault == "read-only-dir":
        assert step == "copied"
        crash_at(uri, "vm", lab.sd2, "mirroring")
        with read_only_dir(lab.sd2):
            rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--resume")
            assert rc != 0
            assert str(lab.sd2) in err, err
            assert disk_of(status_json(capsys, lab), "vda")["consistent"] == "source"
            assert not any(under(p, lab.sd2) for p in lab.paths())
            lab.write("vda", 0x32, 3 * MiB)
        _resume_done(capsys, lab)
    elif cell.fault == "qmp-closed":
        trigger = _under_proxy(lab, images)
        lab.write("vda", 0x32, 3 * MiB, flush=True)
        command = {
            "overlays": "transaction",
            "pivoted": "block-job-complete",
            "merged": "block-stream",
        }[step]
        trigger.write_text(command)
        rc, _out, err = virsh(capsys, uri, "migrate-storage", "vm", "--dest", str(lab.sd2),
                              "--merge")  # fmt: skip
        assert not trigger.exists(), "the proxy never saw the command"
        assert "Traceback" not in err
        if step == "overlays":
            # the lost reply is found out at once: the move goes on and finishes
            assert rc == 0, err
            lab.write("vda", 0x33, 4 * MiB, flush=True)
            lab.stop_and_verify()
            return
        assert rc != 0
        assert "connection" in err, err
        _resume_done(capsys, lab)
    else:
        raise AssertionError(cell)
