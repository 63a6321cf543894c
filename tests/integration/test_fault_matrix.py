"""The fault matrix: every operation x every fault that can hit it, on real QEMU.

The cells, their outcomes and the reasons for "n/a" live in ``fault_matrix.py``
(which also renders the table of docs/FAULT-MATRIX.md).  Each cell here:

1. builds the lab (``fault_lab.make_lab``) and brings it to the moment before the
   operation; the guest writes a pattern into every disk;
2. takes the picture (``fault_lab.capture``: live and persistent XML, snapshot
   metadata, QEMU's block graph, the files);
3. makes the fault and runs the operation;
4. asserts the cell's outcome: *refused* / *rolled back* (the picture equals the
   one before, the libvirtError code checked), *completed* (the after-state of
   the operation), *recovered* (the next call brings it to before or after, never
   in between), *resume/abort* (``migrate-storage``);
5. in every cell: every pattern written reads back, live and (after destroy)
   offline from the files the definition names, and the guest writes again.

Default runs the cells not marked long; ``--long`` runs all of them
(``scripts/test --long`` or ``python -m pytest tests/integration/test_fault_matrix.py --long``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import virtshift.libvirt as libvirt

from .conftest import kill_and_wait, read_only_dir, small_tmpfs
from .fault_lab import (
    DISK_ONLY,
    PIVOT,
    REOPEN_MIRROR,
    REUSE,
    TARGETS,
    Lab,
    MiB,
    capture,
    child_op,
    code_of,
    copy_xml,
    diff,
    img,
    make_lab,
    mirror_snapshot_xml,
    qemu_pid,
    resume,
    run_op,
    snapshot_xml,
    wait_gone,
    wait_ready,
)
from .fault_matrix import CELLS, COMPLETED, RECOVERED, REFUSED, ROLLED_BACK, Cell

ERR = libvirt.libvirtError


def _params() -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.long] if c.long else []) for c in CELLS if c.run
    ]


# -- the lab before each operation ---------------------------------------------------------


def _reused_copy(lab: Lab) -> Path:
    """A shallow, reused copy of vda on sd2 (oVirt's way): leaf.qcow2 <- mid.qcow2 <-
    base.qcow2, each backing by relative name onto the copy of the layer below."""
    img("convert", "-U", "-f", "qcow2", "-O", "qcow2", str(lab.sd1 / "base.qcow2"),
        str(lab.sd2 / "base.qcow2"))  # fmt: skip
    img("convert", "-U", "-f", "qcow2", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
        str(lab.sd1 / "mid.qcow2"), str(lab.sd2 / "mid.qcow2"))  # fmt: skip
    leaf = lab.sd2 / "leaf.qcow2"
    img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(leaf), "16M")
    return leaf


def prepare(lab: Lab, op: str) -> None:
    """Bring the lab to the moment just before ``op``."""
    dom = lab.dom
    if op in ("pivot", "reopen-mirror", "active-commit"):
        # written before the job starts: a write while a mirror runs is copied by the
        # job later, and the files would not stay still for the picture
        lab.write("vda", 0x30, 4 * MiB)
    if op == "pivot":
        leaf = _reused_copy(lab)
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        dom.blockCopy("vda", copy_xml(str(leaf)), None, flags)
        wait_ready(dom)
    elif op == "reopen-mirror":
        dom.snapshotCreateXML(mirror_snapshot_xml(lab.ctx(), f"{lab.sd2}/vda.mig"), DISK_ONLY)
        wait_ready(dom)
    elif op == "active-commit":
        run_op("active-commit", lab.ctx())
        wait_ready(dom)
    else:
        lab.write("vda", 0x30, 4 * MiB)


def pivot_op(op: str) -> str:
    """The call that a fault at the pivot hits: an active commit's is blockJobAbort."""
    return "pivot" if op == "active-commit" else op


def after_state(lab: Lab, op: str) -> bool:
    """True when the lab shows ``op`` done (its after-state), consistently."""
    dom = lab.dom
    chain = lab.chain("vda")
    names = dom.snapshotListNames()
    if op in ("snapshot-1", "snapshot-16"):
        n = 1 if op == "snapshot-1" else 16
        tops = lab.tops()
        inactive = lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE)
        want = {t: str((lab.sd2 if i == n - 1 else lab.sd1) / f"{t}.s1") for i, t in
                enumerate(TARGETS[:n])}  # fmt: skip
        return (
            all(tops[t][0] == p and inactive[t][0] == p for t, p in want.items())
            and names == ["s1"]
            and dom.snapshotCurrent().getName() == "s1"
        )
    if op == "blockcopy":
        return bool(dom.blockJobInfo("vda", 0))
    if op == "mirror-snapshot":
        return chain[0] == f"{lab.sd1}/vda.mig" and bool(dom.blockJobInfo("vda", 0))
    if op == "pivot":
        return chain[0] == f"{lab.sd2}/leaf.qcow2" and not dom.blockJobInfo("vda", 0)
    if op == "reopen-mirror":
        return chain[0] == f"{lab.sd2}/vda.mig" and names == []
    if op == "stream":
        return chain == [f"{lab.sd1}/vda.qcow2", f"{lab.sd1}/base.qcow2"]
    if op == "commit":
        return chain == [f"{lab.sd1}/vda.qcow2", f"{lab.sd1}/base.qcow2"]
    if op == "active-commit":
        return chain == [f"{lab.sd1}/mid.qcow2", f"{lab.sd1}/base.qcow2"]
    raise AssertionError(op)


def assert_consistent(lab: Lab) -> None:
    """The live XML and QEMU's graph name the same chain; the definition starts at
    the same top (never in between)."""
    from .fault_lab import block_graph

    dom = lab.dom
    graph = block_graph(dom)
    tops = lab.tops()
    inactive = lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE)
    for i, t in enumerate(TARGETS[: lab.ndisks]):
        layers = graph[f"/machine/peripheral/virtio-disk{i}/virtio-backend"]["layers"]
        files = " ".join(f for _fmt, f in layers)
        for path in lab.chain(t):
            assert path in files, (t, path, layers)
        assert tops[t] == inactive[t], (t, tops[t], inactive[t])


def finish(lab: Lab) -> None:
    """Guest data holds live; the guest writes again; everything reads back offline
    from the files the persistent definition names."""
    lab.check_data()
    lab.write_all(0x50, 6 * MiB)
    lab.check_data()
    with contextlib.suppress(ERR):
        for t in TARGETS[: lab.ndisks]:
            if lab.dom.blockJobInfo(t, 0):
                lab.dom.blockJobAbort(t, 0)
    lab.dom.destroy()
    lab.check_data(lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE))


def offline_check(lab: Lab) -> None:
    """QEMU is gone: the data reads back from the definition's files, and the domain
    starts again on them."""
    assert not lab.dom.isActive()
    lab.check_data(lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE))
    lab.dom.create()
    lab.check_data()
    finish(lab)


def expect_unchanged(lab: Lab, call: Callable[[], object], code: int, fragment: str = "") -> str:
    before = capture(lab)
    got, msg = code_of(call)
    assert got == code, msg
    assert fragment in msg, msg
    after = capture(lab)
    assert after == before, (diff(before, after), msg)
    return msg


# -- file faults ------------------------------------------------------------------------------


def _reuse_overlays(lab: Lab, n: int, last: Callable[[Path], None] | None) -> Path:
    """Pre-create the REUSE_EXT overlays of snapshot_xml; ``last`` makes the last one
    (or it is left missing when None)."""
    tops = lab.tops()
    for i, t in enumerate(TARGETS[:n]):
        path = (lab.sd2 if i == n - 1 else lab.sd1) / f"{t}.s1"
        if i == n - 1:
            if last is not None:
                last(path)
            continue
        img("create", "-q", "-f", "qcow2", "-b", tops[t][0], "-F", "qcow2", str(path), "16M")
    return lab.sd2 / f"{TARGETS[n - 1]}.s1"


def _garbage(path: Path) -> None:
    path.write_bytes(b"raw user data, not a qcow2 image\n" * 4096)


_MISSING_DIR = (libvirt.VIR_ERR_INVALID_ARG, "does not exist")
_TRANSACTION = (libvirt.VIR_ERR_INTERNAL_ERROR, "transaction")
#: the plain operation, with the fault made on sd2: (libvirt code, part of the message)
PLAIN: dict[tuple[str, str], tuple[int, str]] = {
    **{(op, "dir-missing"): _MISSING_DIR for op in ("snapshot-1", "snapshot-16", "blockcopy",
                                                    "mirror-snapshot")},
    **{(op, f): _TRANSACTION for op in ("snapshot-1", "snapshot-16")
       for f in ("read-only-dir", "no-space")},
    ("blockcopy", "read-only-dir"): (libvirt.VIR_ERR_OPERATION_FAILED, "copy.qcow2"),
    ("mirror-snapshot", "read-only-dir"): (libvirt.VIR_ERR_OPERATION_FAILED, "vda.mig"),
    ("mirror-snapshot", "no-space"): (libvirt.VIR_ERR_OPERATION_FAILED, "vda.mig"),
}  # fmt: skip


@contextlib.contextmanager
def made(fault: str, d: Path) -> Iterator[None]:
    """The fault on directory ``d`` (its tmpfs is mounted by the caller for no-space)."""
    if fault == "dir-missing":
        d.rmdir()
        yield
    elif fault == "read-only-dir":
        with read_only_dir(d):
            yield
    elif fault == "no-space":
        _fill(d)
        yield
    else:
        raise AssertionError(fault)


def file_fault(cell: Cell, lab: Lab, tmp: Path) -> None:
    op, fault, ctx = cell.op, cell.fault, lab.ctx()
    reuse_copy = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
    dest = lab.sd2 / "copy.qcow2"
    if (op, fault) in PLAIN:
        code, fragment = PLAIN[op, fault]
        with made(fault, lab.sd2):
            expect_unchanged(lab, lambda: run_op(op, ctx), code, fragment)
        assert not [p for p in lab.sd1.iterdir() if p.suffix == ".s1"]  # created, removed
    elif op.startswith("snapshot-"):
        n = 16 if op == "snapshot-16" else 1
        bad = _reuse_overlays(lab, n, None if fault == "file-missing" else _garbage)
        content = bad.read_bytes() if bad.exists() else None
        code = {
            "file-missing": libvirt.VIR_ERR_OPERATION_INVALID,
            "wrong-format": libvirt.VIR_ERR_OPERATION_FAILED,
        }[fault]
        xml = snapshot_xml(ctx, n)
        expect_unchanged(
            lab, lambda: lab.dom.snapshotCreateXML(xml, DISK_ONLY | REUSE), code, str(bad)
        )
        assert (bad.read_bytes() if bad.exists() else None) == content  # the user's file
    elif op == "blockcopy":
        if fault == "wrong-format":
            _garbage(dest)
        content = dest.read_bytes() if dest.exists() else None
        code = {
            "file-missing": libvirt.VIR_ERR_INVALID_ARG,
            "wrong-format": libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        }[fault]
        expect_unchanged(
            lab,
            lambda: lab.dom.blockCopy("vda", copy_xml(str(dest)), None, reuse_copy),
            code,
            str(dest),
        )
        assert (dest.read_bytes() if dest.exists() else None) == content
    elif op == "pivot" and fault == "file-missing":
        (lab.sd2 / "base.qcow2").unlink()
        expect_unchanged(
            lab,
            lambda: lab.dom.blockJobAbort("vda", PIVOT),
            libvirt.VIR_ERR_OPERATION_INVALID,
            "refusing to pivot",
        )
    else:
        raise AssertionError(cell)
    finish(lab)


def _fill(d: Path) -> None:
    """Fill the file system of ``d`` up to the last byte."""
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


# -- QEMU killed ------------------------------------------------------------------------------

#: per operation: where QEMU is killed, where the process is killed, which command's
#: reply the proxy swallows
FAULT_POINTS: dict[str, tuple[str, str, str]] = {
    "snapshot-1": ("snapshot-before-transaction", "snapshot-after-transaction", "transaction"),
    "snapshot-16": ("snapshot-before-transaction", "snapshot-after-transaction", "transaction"),
    "blockcopy": ("job-started", "job-recorded", "blockdev-mirror"),
    "mirror-snapshot": ("job-recorded", "job-recorded", "blockdev-mirror"),
    "pivot": ("pivot-sent", "pivot-sent", "block-job-complete"),
    "reopen-mirror": ("pivot-sent", "pivot-sent", "block-job-complete"),
    "stream": ("job-started", "job-started", "block-stream"),
    "commit": ("job-started", "job-started", "block-commit"),
    "active-commit": ("pivot-sent", "pivot-sent", "block-job-complete"),
}


def header_backing(path: Path) -> str | None:
    info = json.loads(img("info", "-U", "--output=json", "-f", "qcow2", str(path)))
    return info.get("backing-filename")


def qemu_killed_around_finalize(op: str, lab: Lab, point: str) -> None:
    """A stream or commit waits at QEMU's pending (``auto-finalize: false``) until a
    call flushes the node it wrote and sends ``job-finalize``, which rewrites vda's
    backing file name (QEMU 7.2 flushes nothing itself there).  QEMU killed at
    ``point`` of the call that finishes the job (``job-pending``: before the flush;
    ``job-finalized``: right after the rewrite): the definition is as before, and
    every write, the data the job moved (mid's 1 MiB at 3 MiB) too, reads back with
    qemu-io offline and through the restarted domain."""
    top = lab.sd1 / "vda.qcow2"
    mid, base = str(lab.sd1 / "mid.qcow2"), str(lab.sd1 / "base.qcow2")
    pid = qemu_pid(lab)
    with child_op(lab, op, "job-started") as proc:
        rc, _out, err = resume(proc)
    assert rc == 0, err
    # no call has finished the job yet (XMLDesc or blockJobInfo here would)
    assert header_backing(top) == mid
    with child_op(lab, "wait-job", point) as proc:
        assert header_backing(top) == (base if point == "job-finalized" else mid)
        kill_and_wait(pid)
        resume(proc)
    assert not lab.dom.isActive()
    assert lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"][0] == str(top)
    assert ("vda", 0x02, 3 * MiB) in lab.written  # the moved data is checked too
    offline_check(lab)


def qemu_killed(cell: Cell, lab: Lab, tmp: Path) -> None:
    op = cell.op
    if op in ("stream", "commit"):
        qemu_killed_around_finalize(op, lab, "job-finalized")
        return
    before = capture(lab)
    pid = qemu_pid(lab)
    with child_op(lab, pivot_op(op), FAULT_POINTS[op][0]) as proc:
        kill_and_wait(pid)
        rc, _out, err = resume(proc)
    assert "Traceback" not in err, err
    assert not lab.dom.isActive()
    after = capture(lab)
    assert after["meta"] == before["meta"], diff(before, after)
    if op == "blockcopy":
        # the call ends with an error (QEMU went away under it) or before noticing;
        # the copy it created stays on sd2 (as with libvirt): nothing else changed
        assert rc == 0 or "domain is not running" in err, err
        assert after["files"] == before["files"], diff(before, after)
        assert after["inactive"] == before["inactive"]
    elif op == "mirror-snapshot":
        # the snapshot was taken; its mirror never started: the definition follows the
        # new overlay, which holds every write
        assert rc != 0
        assert lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"][0] == f"{lab.sd1}/vda.mig"
    else:
        assert rc != 0, err
        assert after["inactive"] == before["inactive"], diff(before, after)
        if op.startswith("snapshot-"):
            assert after["files"] == before["files"], diff(before, after)
    offline_check(lab)


# -- the calling process killed ----------------------------------------------------------------


def python_killed(cell: Cell, lab: Lab, tmp: Path) -> None:
    op = cell.op
    before = capture(lab)
    with child_op(lab, pivot_op(op), FAULT_POINTS[op][1]) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    recover(lab, op, before)


def recover(lab: Lab, op: str, before: dict[str, Any]) -> None:
    """The next calls bring the lab to before or after, never in between."""
    dom = lab.dom
    if op in ("blockcopy", "stream", "commit", "mirror-snapshot"):
        if dom.blockJobInfo("vda", 0) and op in ("stream", "commit"):
            wait_gone(dom)
        elif op in ("blockcopy", "mirror-snapshot") and dom.blockJobInfo("vda", 0):
            wait_ready(dom)
    if op == "reopen-mirror":
        dom.blockJobInfo("vda", 0)  # a call: applies what QEMU did
        if dom.snapshotListNames():
            dom.snapshotLookupByName("mig").delete(REOPEN_MIRROR)
    now = capture(lab)
    if op == "mirror-snapshot" and not dom.blockJobInfo("vda", 0):
        # the snapshot was taken, its mirror never started: the next call forgets the
        # mirror job and removes the mirror file; the snapshot stands (unmirrored)
        assert lab.chain("vda")[0] == f"{lab.sd1}/vda.mig", lab.chain("vda")
        assert dom.snapshotListNames() == ["mig"]
        assert not (lab.sd2 / "vda.mig").exists()
    elif now != before:
        assert after_state(lab, op), diff(before, now)
    assert_consistent(lab)
    # nothing the dead process wrote under a temporary name is left behind
    assert not sorted(lab.root.rglob(".*.tmp"))
    finish(lab)


# -- the QMP connection closed mid-command ---------------------------------------------------


def qmp_closed(cell: Cell, lab: Lab, tmp: Path) -> None:
    op = cell.op
    assert lab.trigger is not None
    before = capture(lab)
    lab.trigger.write_text(FAULT_POINTS[op][2])
    try:
        run_op(pivot_op(op), lab.ctx())
        raised = None
    except ERR as err:
        raised = err
    assert not lab.trigger.exists(), "the proxy never saw the command"
    if cell.outcome == COMPLETED:
        assert raised is None, raised
        assert after_state(lab, op), diff(before, capture(lab))
        assert_consistent(lab)
        finish(lab)
        return
    assert raised is not None
    assert "monitor connection" in str(raised) or "connection" in str(raised), raised
    recover(lab, op, before)


# -- the matrix ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _sd2_for(cell: Cell, images: Path) -> Iterator[None]:
    if cell.fault == "no-space":
        with small_tmpfs(images / "sd2", "1m"):
            yield
    else:
        yield


HANDLERS: dict[str, Callable[[Cell, Lab, Path], None]] = {
    "file-missing": file_fault,
    "dir-missing": file_fault,
    "read-only-dir": file_fault,
    "no-space": file_fault,
    "wrong-format": file_fault,
    "qemu-killed": qemu_killed,
    "python-killed": python_killed,
    "qmp-closed": qmp_closed,
}


@pytest.mark.parametrize("cell", _params())
def test_cell(cell: Cell, conn, uri: str, root: Path, images: Path, tmp_path: Path, capsys) -> None:
    if cell.op.startswith("migrate:"):
        from .fault_migrate import migrate_cell

        migrate_cell(cell, conn, uri, root, images, capsys)
        return
    assert cell.outcome in (REFUSED, ROLLED_BACK, COMPLETED, RECOVERED)
    with _sd2_for(cell, images):
        lab = make_lab(
            conn,
            uri,
            root,
            images,
            ndisks=16 if cell.op == "snapshot-16" else 1,
            proxy=cell.fault == "qmp-closed",
        )
        try:
            prepare(lab, cell.op)
            HANDLERS[cell.fault](cell, lab, tmp_path)
        finally:
            with contextlib.suppress(ERR):
                if lab.dom.isActive():
                    lab.dom.destroy()  # before any umount: QEMU holds files there


@pytest.mark.parametrize("op", ["stream", "commit"])
def test_qemu_killed_at_pending_keeps_the_moved_data(
    op: str, conn, uri: str, root: Path, images: Path
) -> None:
    """The other side of the ``qemu-killed`` cells of stream and commit: QEMU killed
    while the finished job waits at pending, before its node is flushed."""
    lab = make_lab(conn, uri, root, images, ndisks=1, proxy=False)
    try:
        prepare(lab, op)
        qemu_killed_around_finalize(op, lab, "job-pending")
    finally:
        with contextlib.suppress(ERR):
            if lab.dom.isActive():
                lab.dom.destroy()


def test_a_lost_intent_source_still_completes_the_snapshot(
    conn, uri: str, root: Path, images: Path, caplog
) -> None:
    """The intent keeps the snapshot's domain file beside it; if that file is
    gone when the next call recovers, the snapshot QEMU took still stands (the
    definition follows the new overlay, nothing is left behind), without its
    metadata, and the log says so."""
    lab = make_lab(conn, uri, root, images, ndisks=1, proxy=False)
    try:
        run = root / "run" / "qemu" / f"domain-{lab.name}"
        with child_op(lab, pivot_op("snapshot-1"), "snapshot-after-transaction") as proc:
            assert (run / "snapshot-intent.json").exists()
            (run / "snapshot-intent.source.xml").unlink()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        with caplog.at_level(logging.WARNING, logger="virtshift"):
            lab.dom.suspend()  # a call under the domain lock: it recovers first
        lab.dom.resume()
        assert not (run / "snapshot-intent.json").exists()
        assert lab.dom.snapshotListNames() == []
        top = lab.tops(libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"][0]
        assert "snapshot stands without its metadata" in caplog.text
        assert top != str(lab.sd1 / "vda.qcow2")
        assert lab.tops()["vda"][0] == top
        assert_consistent(lab)
        assert not sorted(lab.root.rglob(".*.tmp"))
        finish(lab)
    finally:
        with contextlib.suppress(ERR):
            if lab.dom.isActive():
                lab.dom.destroy()


def test_every_run_cell_has_a_handler() -> None:
    assert {c.fault for c in CELLS if c.run} <= set(HANDLERS)
    assert {c.op for c in CELLS if c.run and not c.op.startswith("migrate:")} == set(FAULT_POINTS)
