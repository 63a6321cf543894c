"""Live storage migration of a domain's disks, journaled and crash-safe.

For each disk, the proposal's flow (SPEC.md, "The storage migration"):

1. OVERLAYS: create a new source overlay S (backing onto the current top by
   absolute path) and its mirror M on the destination (backing by *relative*
   name onto the copy-to-be of the current top);
2. MIRRORING: a mirrored snapshot (REUSE_EXT | DISK_ONLY | ATOMIC, QUIESCE when
   a guest agent answers): the guest now writes to S, and QEMU mirrors S to M;
3. COPIED: every lower layer is copied to the destination (sparse, throttled,
   with progress; the layers together, on a few threads) and linked to its new
   neighbour by relative name; each layer is journaled, in order, once it is
   fsynced;
4. VERIFIED: the destination chain is checked (quick: formats, sizes, chain;
   full: content compared layer by layer with ``qemu-img compare``);
5. PIVOTED: REOPEN_MIRROR, which verifies the chain once more and switches the
   disk onto M and its chain;
6. MERGED (``--merge``): the old top's copy is streamed into M and removed;
7. CLEANED (``--delete-source``): the source files of the move are removed,
   only after the pivot and only those this move owns.

Every step is journaled before it starts and after it ends (see
:mod:`virtshift.migrate.journal`).  Until a disk's pivot the source storage
domain holds its consistent chain (S and below); from the pivot on, the
destination does.  ``resume`` finishes an interrupted move (if QEMU itself
died, it first starts the domain again on the consistent chain, with
``createXML`` for a transient domain: the proposal's R10); a disk interrupted
before its pivot in a way that cannot simply be continued is re-planned from
its current chain.  ``abort`` returns every disk that has not pivoted to the
source and removes what the move created on the destination.

Test-only: ``VIRTSHIFT_MIGRATE_CRASH_AFTER=STEP`` makes the process SIGKILL
itself right after journaling STEP (see :mod:`virtshift.faults`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from lxml import etree

from virtshift import faults
from virtshift import libvirt as lv
from virtshift.errors import ErrorCode, VirtError
from virtshift.migrate import journal as jn
from virtshift.migrate.copy import copy_files
from virtshift.migrate.journal import DiskMove, Journal, Layer, Step
from virtshift.model.image import ImageLayer
from virtshift.store.files import FileLock
from virtshift.store.images import read_chain, read_layer

__all__ = ["Migration", "ProgressT"]

_log = logging.getLogger("virtshift.migrate")

#: progress(event, data): events 'step', 'copy', 'done'.
ProgressT = Callable[[str, dict[str, Any]], None]

MIB = 1024 * 1024


def _img(*args: str) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"qemu-img {args[0]} failed: {res.stderr.strip()}"
        )
    return res.stdout


def _img_together(*calls: tuple[str, ...]) -> None:
    """Run independent ``qemu-img`` calls at the same time; fail if any failed
    (after all of them ended)."""
    procs = [
        subprocess.Popen(
            ["qemu-img", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for args in calls
    ]
    errors = [(args[0], p.communicate()[1]) for args, p in zip(calls, procs, strict=True)]
    for (verb, err), p in zip(errors, procs, strict=True):
        if p.returncode != 0:
            raise VirtError(ErrorCode.OPERATION_FAILED, f"qemu-img {verb} failed: {err.strip()}")


def _read(path: str, fmt: str, *, chain: bool = False) -> list[ImageLayer]:
    """The header facts of an image (and its chain), read in process."""
    try:
        return read_chain(path, fmt) if chain else [read_layer(path, fmt)]
    except VirtError as err:
        raise VirtError(ErrorCode.OPERATION_FAILED, err.detail) from err


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Migration:
    """The storage migration of one domain, through the libvirt-compatible API.

    :param dom: the domain (a :class:`virtshift.libvirt.virDomain`).
    :param progress: optional callback for steps and copy progress.
    """

    def __init__(self, dom: lv.virDomain, progress: ProgressT | None = None) -> None:
        self.dom = dom
        self.conn = dom.connect()
        self.driver = dom._driver
        self.path = jn.journal_path(self.driver.lib_dir, dom.name())
        self.progress = progress or (lambda event, data: None)
        self._lock = FileLock(
            self.driver.lock_dir / f"{dom.name()}.migrate.lock",
            what=f"the storage migration of domain '{dom.name()}'",
            timeout=0,
        )
        self.journal: Journal | None = None

    # -- journal ------------------------------------------------------------------------

    def _save(self, j: Journal) -> Journal:
        jn.save(self.path, j)
        self.journal = j
        return j

    def status(self) -> Journal | None:
        """The current or last migration of this domain."""
        return jn.load(self.path)

    def _hold(self) -> None:
        try:
            self._lock.acquire("migrate-storage")
        except VirtError as err:
            raise VirtError(
                ErrorCode.OPERATION_INVALID,
                f"a storage migration of domain '{self.dom.name()}' is running in another "
                f"process ({err.detail.split('(held by ')[-1].rstrip(')')})",
            ) from err

    # -- planning -------------------------------------------------------------------------

    def _live_chain(self, target: str) -> list[tuple[str, str, str]]:
        """(path, format, type) of each layer of the disk's live chain, top first."""
        doc = etree.fromstring(self.dom.XMLDesc(0).encode())
        for disk in doc.findall("devices/disk"):
            tgt = disk.find("target")
            if tgt is None or tgt.get("dev") != target:
                continue
            out: list[tuple[str, str, str]] = []
            node, fmt_el, typ = disk, disk.find("driver"), disk.get("type", "file")
            src = disk.find("source")
            while src is not None and (src.get("file") or src.get("dev")):
                fmt = fmt_el.get("type") if fmt_el is not None else None
                out.append((str(src.get("file") or src.get("dev")), fmt or "raw", typ))
                bs = node.find("backingStore")
                if bs is None or bs.find("source") is None:
                    break
                node, fmt_el, typ, src = (
                    bs,
                    bs.find("format"),
                    bs.get("type", "file"),
                    bs.find("source"),
                )
            return out
        raise VirtError(ErrorCode.INVALID_ARG, f"disk '{target}' not found in domain")

    def _plan_disk(self, target: str, dest: str, stamp: str) -> DiskMove:
        chain = self._live_chain(target)
        for path, _fmt, typ in chain:
            if typ != "file":
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    f"disk '{target}': only file images can be migrated ('{path}' is {typ})",
                )
        # each live layer read as its live format; the backing file each header
        # names must be the next live layer, and the last must name none
        infos = [_read(p, f)[0] for p, f, _t in chain]
        for depth, info in enumerate(infos):
            below = chain[depth + 1][0] if depth + 1 < len(chain) else None
            named = info.full_backing_filename
            if (named is None) != (below is None) or (
                named is not None and below is not None and not _same_file(named, below)
            ):
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"disk '{target}': the image chain on disk does not match the live chain",
                )
        layers = tuple(
            Layer(path=p, format=f, virtual_size=i.virtual_size)
            for (p, f, _t), i in zip(chain, infos, strict=True)
        )
        names: list[str] = []
        for layer in layers:
            name = os.path.basename(layer.path)
            while name in names:
                name = f"{len(names)}-{name}"
            names.append(name)
        dest_layers = tuple(os.path.join(dest, n) for n in names)
        snap = f"migrate-{stamp}"
        overlay = os.path.join(os.path.dirname(layers[0].path), f"{target}.{snap}.qcow2")
        mirror = os.path.join(dest, f"{target}.{snap}.qcow2")
        for path in (*dest_layers, overlay, mirror):
            if os.path.lexists(path):
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"'{path}' exists already; a storage migration never overwrites a file "
                    "it did not create",
                )
        for layer in layers:
            if os.path.dirname(layer.path) == os.path.normpath(dest):
                raise VirtError(
                    ErrorCode.INVALID_ARG,
                    f"image '{layer.path}' of disk '{target}' is in the destination already",
                )
        return DiskMove(
            target=target,
            layers=layers,
            dest_layers=dest_layers,
            overlay=overlay,
            mirror=mirror,
            snapshot=snap,
        )

    def start(
        self,
        dest: str,
        *,
        disks: list[str] | None = None,
        bandwidth: int = 0,
        merge: bool = False,
        delete_source: bool = False,
        verify: str = "quick",
    ) -> Journal:
        """Plan and run a migration of ``disks`` (default: all) to ``dest``."""
        self._hold()
        try:
            old = self.status()
            if old is not None and old.state == "running":
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"a storage migration of domain '{self.dom.name()}' to '{old.dest}' is "
                    "unfinished; finish it with --resume or undo it with --abort",
                )
            if verify not in ("quick", "full"):
                raise VirtError(
                    ErrorCode.INVALID_ARG, f"--verify must be quick or full, not {verify!r}"
                )
            if bandwidth < 0:
                raise VirtError(ErrorCode.INVALID_ARG, "bandwidth must not be negative")
            dest = os.path.abspath(dest)
            if not os.path.isdir(dest):
                raise VirtError(
                    ErrorCode.INVALID_ARG, f"destination directory '{dest}' does not exist"
                )
            if not self.dom.isActive():
                raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
            doc = etree.fromstring(self.dom.XMLDesc(0).encode())
            all_disks = [
                str(d.find("target").get("dev"))  # type: ignore[union-attr]
                for d in doc.findall("devices/disk")
                if d.get("device", "disk") == "disk"
                and d.find("readonly") is None
                and d.find("target") is not None
            ]
            targets = disks or all_disks
            for t in targets:
                if t not in all_disks:
                    raise VirtError(ErrorCode.INVALID_ARG, f"disk '{t}' not found in domain")
                if self.dom.blockJobInfo(t, 0):
                    raise VirtError(
                        ErrorCode.BLOCK_COPY_ACTIVE, f"disk '{t}' already in active block job"
                    )
            if len(set(targets)) != len(targets):
                raise VirtError(ErrorCode.INVALID_ARG, "a disk is named twice")
            stamp = str(int(time.time()))
            moves = tuple(self._plan_disk(t, dest, stamp) for t in targets)
            j = Journal(
                domain=self.dom.name(),
                uuid=self.dom.UUIDString(),
                dest=dest,
                bandwidth=bandwidth,
                merge=merge,
                delete_source=delete_source,
                verify=verify,
                domain_xml=self.dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE),
                persistent=bool(self.dom.isPersistent()),
                disks=moves,
                created=time.time(),
            )
            self._save(j.note(time.time(), f"planned: {', '.join(targets)} -> {dest}"))
            return self._run()
        finally:
            self._lock.release()

    # -- running ------------------------------------------------------------------------

    def resume(self) -> Journal:
        """Finish an interrupted migration (safe to run twice)."""
        self._hold()
        try:
            j = self._unfinished("resume")
            if j.state != "running":
                return j
            self._restart_if_needed()
            return self._run()
        finally:
            self._lock.release()

    def _unfinished(self, verb: str) -> Journal:
        """The domain's journal (made current), or an error naming ``verb``."""
        j = self.status()
        if j is None:
            raise VirtError(
                ErrorCode.OPERATION_INVALID,
                f"domain '{self.dom.name()}' has no storage migration to {verb}",
            )
        self.journal = j
        return j

    def _active(self) -> bool:
        """Whether the domain runs; a transient domain whose QEMU died no longer exists."""
        try:
            return bool(self.dom.isActive())
        except lv.libvirtError as err:
            if err.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return False
            raise

    def _restart_if_needed(self) -> None:
        """QEMU died: start the domain again on the consistent chain (R10)."""
        if self._active():
            return
        j = self.journal
        assert j is not None
        note = "QEMU was not running: "
        try:
            self.dom = self.conn.lookupByName(j.domain)
            defined = bool(self.dom.isPersistent())
        except lv.libvirtError:
            defined = False
        if defined:
            self.dom.create()
            note += "started the persistent domain on its recorded chain"
        else:
            self.dom = self.conn.createXML(j.domain_xml, 0)
            note += "started a transient domain (createXML) on the consistent chain"
        j = j.note(time.time(), note)
        # every disk that had not pivoted starts its move again from its current chain,
        # under a name no earlier attempt used (names carry the stamp)
        used = [int(m.snapshot.rsplit("-", 1)[-1]) for m in j.disks if m.snapshot[-1:].isdigit()]
        stamp = str(max([int(time.time()), *(u + 1 for u in used)]))
        moves = []
        for move in j.disks:
            if move.step.order < Step.PIVOTED.order:
                self._cleanup_unpivoted(move)
                moves.append(self._plan_disk(move.target, j.dest, stamp))
            else:
                moves.append(move)
        self._save(dataclasses.replace(j, disks=tuple(moves)))

    def _run(self) -> Journal:
        j = self.journal
        assert j is not None
        for move in j.disks:
            while True:
                j = self.journal
                assert j is not None
                move = j.disk(move.target)
                if move.step == Step.DONE:
                    break
                self._advance(move)
        j = self.journal
        assert j is not None
        return self._save(dataclasses.replace(j, state="done").note(time.time(), "done"))

    def _set(
        self,
        move: DiskMove,
        step: Step,
        started: float,
        extra: dict[str, float] | None = None,
        **changes: Any,
    ) -> DiskMove:
        timings = {**move.timings, **(extra or {})}
        timings[step.value] = round(time.time() - started, 3)
        move = dataclasses.replace(move, step=step, timings=timings, **changes)
        j = self.journal
        assert j is not None
        j = j.with_disk(move).note(
            time.time(), f"{move.target}: {step.value} ({timings[step.value]:.3f} s)"
        )
        if step in (Step.MIRRORING, Step.PIVOTED):
            j = dataclasses.replace(j, domain_xml=self.dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
        self._save(j)
        self.progress(
            "step", {"disk": move.target, "step": step.value, "seconds": timings[step.value]}
        )
        faults.crash_after(step.value)
        return move

    def _advance(self, move: DiskMove) -> None:
        t0 = time.time()
        step = move.step
        if step == Step.PLANNED:
            move = self._make_overlays(move)
            self._set(move, Step.OVERLAYS, t0)
        elif step == Step.OVERLAYS:
            self._snapshot(move)
            self._set(move, Step.MIRRORING, t0)
        elif step == Step.MIRRORING:
            move = self._copy_layers(move)
            self._set(move, Step.COPIED, t0)
        elif step == Step.COPIED:
            self._verify(move)
            self._set(move, Step.VERIFIED, t0)
        elif step == Step.VERIFIED:
            call = self._pivot(move)  # REOPEN_MIRROR's duration: verify, attach, switch
            self._set(move, Step.PIVOTED, t0, extra={"reopen-mirror": call})
        elif step == Step.PIVOTED:
            self._merge(move)
            self._set(move, Step.MERGED, t0)
        elif step == Step.MERGED:
            self._delete_source(move)
            self._set(move, Step.CLEANED, t0)
        elif step == Step.CLEANED:
            self._set(move, Step.DONE, t0)

    # -- the steps ----------------------------------------------------------------------

    def _record_created(self, move: DiskMove, *paths: str) -> DiskMove:
        move = dataclasses.replace(move, created=tuple(dict.fromkeys((*move.created, *paths))))
        j = self.journal
        assert j is not None
        self._save(j.with_disk(move))
        return move

    def _make_overlays(self, move: DiskMove) -> DiskMove:
        move = self._record_created(move, move.overlay, move.mirror)  # intent first
        top = move.layers[0]
        for path in (move.overlay, move.mirror):
            if os.path.lexists(path) and path in move.created:
                os.unlink(path)  # ours, from an interrupted attempt
        # the two files do not depend on each other: one process each, together;
        # if one fails, the other is removed too, so a failed step changes nothing
        try:
            _img_together(
                ("create", "-q", "-f", "qcow2", "-b", top.path, "-F", top.format, move.overlay),
                ("create", "-q", "-f", "qcow2", "-u", "-b", os.path.basename(move.dest_layers[0]),
                 "-F", top.format, move.mirror, str(top.virtual_size)),
            )  # fmt: skip
        except VirtError:
            for path in (move.overlay, move.mirror):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        return move

    def _agent_answers(self) -> bool:
        from virtshift.qmp.agent import GuestAgent

        doc = etree.fromstring(self.dom.XMLDesc(0).encode())
        for ch in doc.findall("devices/channel"):
            tgt, src = ch.find("target"), ch.find("source")
            if tgt is not None and tgt.get("name") == "org.qemu.guest_agent.0" and src is not None:
                try:
                    with GuestAgent(str(src.get("path")), timeout=1.0):
                        return True
                except VirtError:
                    return False
        return False

    def _snapshot(self, move: DiskMove) -> None:
        try:
            self.dom.snapshotLookupByName(move.snapshot)
            return  # taken before an interruption
        except lv.libvirtError:
            pass
        if self._live_chain(move.target)[0][0] != move.layers[0].path:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"disk '{move.target}' changed under the migration (its top is no longer "
                f"'{move.layers[0].path}'); use --abort",
            )
        xml = _mirror_snapshot_xml(
            move, self.journal.dest if self.journal else "", self._all_disk_targets()
        )
        flags = (
            lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | lv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        if self._agent_answers():
            flags |= lv.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        self.dom.snapshotCreateXML(xml, flags)

    def _all_disk_targets(self) -> list[str]:
        doc = etree.fromstring(self.dom.XMLDesc(0).encode())
        return [str(t.get("dev")) for t in doc.findall("devices/disk/target")]

    def _copy_layers(self, move: DiskMove) -> DiskMove:
        j = self.journal
        assert j is not None
        n, first = len(move.layers), move.copied
        if first >= n:
            return move
        dsts = move.dest_layers[first:]
        move = self._record_created(move, *dsts)  # intent first, for every copy at once
        for dst in dsts:
            if os.path.lexists(dst):
                os.unlink(dst)  # ours: a copy that did not finish
        pairs = [(layer.path, dst) for layer, dst in zip(move.layers[first:], dsts, strict=True)]
        t0 = time.monotonic()

        def report(k: int, done: int, total: int, disk: str = move.target) -> None:
            self.progress("copy", {"disk": disk, "layer": dsts[k], "done": done, "total": total})

        # the layers are copied together; each is journaled, in order, once it is
        # fsynced under its final name and linked to the copy below it
        for k, written in copy_files(pairs, bandwidth=j.bandwidth, progress=report):
            i = first + k
            src, dst = move.layers[i], move.dest_layers[i]
            if i + 1 < n:
                below = move.layers[i + 1]
                rel = os.path.basename(move.dest_layers[i + 1])
                _img("rebase", "-u", "-f", src.format, "-b", rel, "-F", below.format, dst)
            move = dataclasses.replace(move, copied=i + 1, bytes_copied=move.bytes_copied + written)
            took = time.monotonic() - t0
            j = self.journal
            assert j is not None
            self._save(
                j.with_disk(move).note(
                    time.time(),
                    f"{move.target}: copied {os.path.basename(src.path)} "
                    f"({written / MIB:.1f} MiB, done {took:.2f} s into the copy)",
                )
            )
            faults.crash_after("copy-layer")
        return move

    def _verify(self, move: DiskMove) -> None:
        j = self.journal
        assert j is not None
        infos = _read(move.mirror, "qcow2", chain=True)
        want = [move.mirror, *move.dest_layers]
        got = [i.filename for i in infos]
        if got != want:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"destination chain of disk '{move.target}' is {got}, expected {want}",
            )
        for info, layer in zip(infos[1:], move.layers, strict=True):
            if info.format != layer.format or info.virtual_size != layer.virtual_size:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"copy '{info.filename}' does not match '{layer.path}' (format or size)",
                )
        if j.verify == "full":
            # each layer on its own (its backing left out): a damaged layer is named,
            # and lower layers are read once
            for layer, dst in zip(move.layers, move.dest_layers, strict=True):
                argv = ["qemu-img", "compare", "-U", _alone(layer.path, layer.format),
                        _alone(dst, layer.format)]  # fmt: skip
                res = subprocess.run(argv, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    raise VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"copy '{dst}' differs from '{layer.path}': {res.stdout.strip()} "
                        f"{res.stderr.strip()}",
                    )

    def _wait_ready(self, target: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.dom.blockJobInfo(target, 0)
            if not info:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"the mirror of disk '{target}' is not running any more",
                )
            doc = etree.fromstring(self.dom.XMLDesc(0).encode())
            for disk in doc.findall("devices/disk"):
                m, tgt = disk.find("mirror"), disk.find("target")
                if (
                    tgt is not None
                    and tgt.get("dev") == target
                    and m is not None
                    and m.get("ready") == "yes"
                ):
                    return
            time.sleep(0.02)
        raise VirtError(ErrorCode.OPERATION_TIMEOUT, f"the mirror of disk '{target}' is not ready")

    def _pivot(self, move: DiskMove) -> float:
        if self._live_chain(move.target)[0][0] == move.mirror:
            self._drop_snapshot_metadata(move)
            return 0.0  # pivoted before an interruption
        self._wait_ready(move.target)
        snap = self.dom.snapshotLookupByName(move.snapshot)
        t0 = time.monotonic()
        snap.delete(lv.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR)
        return round(time.monotonic() - t0, 4)

    def _drop_snapshot_metadata(self, move: DiskMove) -> None:
        with contextlib.suppress(lv.libvirtError):
            self.dom.snapshotLookupByName(move.snapshot).delete(
                lv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
            )

    def _merge(self, move: DiskMove) -> None:
        j = self.journal
        assert j is not None
        old_top = move.dest_layers[0]
        chain = [p for p, _f, _t in self._live_chain(move.target)]
        if not j.merge or old_top not in chain:
            return
        base = move.dest_layers[1] if len(move.dest_layers) > 1 else None
        if not self.dom.blockJobInfo(move.target, 0):
            self.dom.snapshotRebase(move.target, base, 0, 0)
        deadline = time.monotonic() + 3600
        while self.dom.blockJobInfo(move.target, 0):
            if time.monotonic() > deadline:
                raise VirtError(
                    ErrorCode.OPERATION_TIMEOUT, f"merge of disk '{move.target}' too slow"
                )
            time.sleep(0.02)
        self.dom._jobs.refresh(self.dom.name(), wait=True)  # the result is applied
        chain = [p for p, _f, _t in self._live_chain(move.target)]
        if old_top in chain:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"merge of disk '{move.target}' did not finish"
            )
        os.unlink(old_top)

    def _delete_source(self, move: DiskMove) -> None:
        j = self.journal
        assert j is not None
        if not j.delete_source:
            return
        in_use = {p for t in self._all_disk_targets() for p, _f, _t in self._live_chain(t)}
        for path in (move.overlay, *(layer.path for layer in move.layers)):
            if path in in_use:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"'{path}' is still used by the domain; not deleting it",
                )
        for path in (move.overlay, *(layer.path for layer in move.layers)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- abort ------------------------------------------------------------------------------

    def _cleanup_unpivoted(self, move: DiskMove) -> None:
        """Stop a disk's mirror, drop its snapshot metadata and the files the move
        created on the destination.  The disk stays on its source chain."""
        active = self._active()
        if active and self.dom.blockJobInfo(move.target, 0):
            try:
                self.dom.blockJobAbort(move.target, 0)
            except lv.libvirtError as err:
                _log.warning("cancelling the mirror of %s: %s", move.target, err)
        self._drop_snapshot_metadata(move)
        chain = set()
        if active:
            chain = {p for p, _f, _t in self._live_chain(move.target)}
        for path in move.created:
            if path in chain:
                continue  # the source overlay, now the disk's top on the source: keep
            for p in (path, f"{path}.part"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    def abort(self) -> Journal:
        """Return every disk that has not pivoted to the source (safe to run twice)."""
        self._hold()
        try:
            j = self._unfinished("abort")
            if j.state != "running":
                return j
            pivoted = [m.target for m in j.disks if m.step.order >= Step.PIVOTED.order]
            for move in j.disks:
                if move.step.order < Step.PIVOTED.order:
                    self._cleanup_unpivoted(move)
            note = "aborted; back on the source"
            if pivoted:
                note += f" (disks already on the destination stay there: {', '.join(pivoted)})"
            return self._save(dataclasses.replace(j, state="aborted").note(time.time(), note))
        finally:
            self._lock.release()


def _alone(path: str, fmt: str) -> str:
    """An image opened without its backing chain (``json:`` filename for qemu-img)."""
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt != "raw":
        spec["backing"] = None
    return "json:" + json.dumps(spec)


def _mirror_snapshot_xml(move: DiskMove, dest: str, targets: list[str]) -> str:
    """The ``<domainsnapshot>`` of the proposal: the disk's new overlay and its mirror."""
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = move.snapshot
    etree.SubElement(root, "description").text = f"storage migration of {move.target} to {dest}"
    disks = etree.SubElement(root, "disks")
    for t in targets:
        if t != move.target:
            etree.SubElement(disks, "disk", name=t, snapshot="no")
            continue
        disk = etree.SubElement(disks, "disk", name=t, snapshot="external")
        etree.SubElement(disk, "driver", type="qcow2")
        etree.SubElement(disk, "source", file=move.overlay)
        etree.SubElement(disk, "mirror", file=move.mirror, format="qcow2")
    return etree.tostring(root, encoding="unicode")


def describe(j: Journal) -> dict[str, Any]:
    """A JSON-able summary of a journal (for ``migrate-storage-status --json``)."""
    return {
        "domain": j.domain,
        "dest": j.dest,
        "state": j.state,
        "disks": [
            {
                "disk": m.target,
                "step": m.step.value,
                "consistent": m.consistent,
                "layers": [x.path for x in m.layers],
                "dest_layers": list(m.dest_layers),
                "overlay": m.overlay,
                "mirror": m.mirror,
                "copied": m.copied,
                "bytes_copied": m.bytes_copied,
                "timings": m.timings,
            }
            for m in j.disks
        ],
        "events": [{"time": t, "text": x} for t, x in j.events],
    }
