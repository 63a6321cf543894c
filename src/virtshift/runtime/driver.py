"""The embedded QEMU driver: domains, their files, their QEMU processes.

One :class:`Driver` per root directory (``qemu:///embed?root=DIR`` or the
per-user session root).  Layout under the root, after libvirt's embedded
driver::

    etc/qemu/NAME.xml                 persistent definition (inactive XML)
    run/qemu/NAME.xml                 status of a running domain (see xml/status.py)
    run/qemu/domain-NAME/             QEMU's working directory: monitor.sock,
                                      query.sock, guest agent socket, a running
                                      snapshot's snapshot-intent.json, and the
                                      last snapshot's snapshot-intent.source.xml
    run/lock/NAME.lock                per-domain lock (flock), run/lock/driver.lock
    log/qemu/NAME.log                 QEMU's stdout/stderr, appended per start
    lib/qemu/snapshot/NAME/           snapshot metadata (store/snapshots.py)

Rules kept here:

* every change to a domain happens under its lock, across processes; reads of
  the definition or status take no lock and see whole files (atomic writes);
* QEMU runs in its own session and outlives the process that started it; a
  later process finds it through the status file, and signals it only after
  checking that pid's command line names this domain (pid reuse is not ours);
* every image is opened with an explicit format and an explicit backing chain;
* the root belongs to the user running virtshift and is private (0700, files
  0600, QEMU runs with umask 177 so its sockets are 0600); nothing under it is
  followed through a symbolic link, and socket, log and run-directory paths are
  derived from the root and the domain name, never read from a status file.

What this module does not do: XML text (``xml/``), QMP wire details
(``qmp/``), command-line planning (``ops/start.py``), the libvirt-python shapes
(``libvirt.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtshift.errors import ErrorCode, NoDomain, VirtError
from virtshift.logs import get_logger
from virtshift.model.domain import Disk, Domain
from virtshift.model.status import DomainState, DomainStatus, QemuCaps
from virtshift.ops.start import AGENT_PORT, KNOWN_FORMATS, chain_from_image_info, plan_start
from virtshift.qmp.client import Monitor
from virtshift.qmp.models import caps_from_replies, parse_query_block
from virtshift.store.files import (
    FileLock,
    PreparedFile,
    ensure_dir,
    open_private,
    prepare_atomic,
    refuse_link,
    remove_quietly,
    write_atomic,
)
from virtshift.store.images import read_chain
from virtshift.xml.domain import format_domain, parse_domain
from virtshift.xml.status import format_status, parse_status

if TYPE_CHECKING:
    import subprocess  # imported where QEMU is started: `list` never needs it

__all__ = ["DEFAULT_EMULATOR", "DomainRecord", "Driver"]

_log = get_logger("virtshift.driver")

DEFAULT_EMULATOR = "qemu-system-x86_64"
#: QMP sockets in a domain's run directory (the paths are never read from files).
MONITOR_SOCKET = "monitor.sock"
QUERY_SOCKET = "query.sock"
#: Seconds to wait for a new QEMU's monitor.
START_TIMEOUT = 30.0
#: Names of capability cache entries that status files refer to.
_CAPS_KEY = re.compile(r"caps-[0-9a-f]{16}\.json")


def _lock_timeout() -> float:
    try:
        return float(os.environ.get("VIRTSHIFT_LOCK_TIMEOUT", "30"))
    except ValueError:
        return 30.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DomainRecord:
    """What the driver knows of one domain at one moment."""

    name: str
    #: The persistent definition, or None for a transient domain.
    config: Domain | None
    #: The status of the running QEMU, or None when shut off.
    status: DomainStatus | None

    @property
    def active(self) -> bool:
        return self.status is not None

    @property
    def persistent(self) -> bool:
        return self.config is not None

    @property
    def definition(self) -> Domain:
        """The live definition when running, else the persistent one."""
        if self.status is not None:
            return self.status.domain
        assert self.config is not None
        return self.config


class Driver:
    """All domains under one root directory.

    :param root: the driver's root (created 0700 when missing).
    :raise VirtError: SYSTEM_ERROR when the root belongs to another user or is
        not a directory; OPERATION_FAILED when a directory under it is a
        symbolic link.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        _check_root_owner(self.root)
        if not os.path.exists(self.root):
            ensure_dir(self.root)
        os.chmod(self.root, 0o700)
        self.config_dir = ensure_dir(self.root / "etc" / "qemu")
        self.run_dir = ensure_dir(self.root / "run" / "qemu")
        self.lock_dir = ensure_dir(self.root / "run" / "lock")
        self.log_dir = ensure_dir(self.root / "log" / "qemu")
        self.lib_dir = ensure_dir(self.root / "lib" / "qemu")
        #: path -> (file key, what parsing it gave, its bytes): the bytes let a
        #: snapshot's intent keep the definition it was taken from without
        #: formatting it (see :meth:`source_of`)
        self._parsed: dict[Path, tuple[tuple[int, int, int], Any, bytes]] = {}
        #: Capability cache entries on disk that this process read or wrote, by name.
        self._caps: dict[str, QemuCaps] = {}
        #: Called with (domain name, monitor) whenever :meth:`monitor` opens the
        #: main monitor under the lock: the block-job layer plugs its reconcile in
        #: here, so that every locked operation first applies jobs QEMU ended.
        self.on_monitor: Callable[[str, Monitor], None] | None = None

    # -- paths --------------------------------------------------------------

    def config_path(self, name: str) -> Path:
        return self.config_dir / f"{name}.xml"

    def status_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.xml"

    def domain_run_dir(self, name: str) -> Path:
        return self.run_dir / f"domain-{name}"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def snapshot_dir(self, name: str) -> Path:
        return self.lib_dir / "snapshot" / name

    def lock(self, name: str, timeout: float | None = None) -> FileLock:
        """The per-domain lock (not yet taken)."""
        return FileLock(
            self.lock_dir / f"{name}.lock",
            what=f"domain '{name}'",
            timeout=_lock_timeout() if timeout is None else timeout,
        )

    def metadata_lock(self, name: str, *, shared: bool) -> FileLock:
        """The lock of the domain's snapshot metadata files (not yet taken).

        A writer holds it exclusively, inside the domain lock, only while it
        rewrites the files of one change; a reader holds it shared while it
        reads them all.  So a reader never waits for QEMU work, and sees the
        metadata before a change or after it, never half-way (a new snapshot
        while the old one is still current, or no current one).
        """
        return FileLock(
            self.lock_dir / f"{name}.snapshots.lock",
            what=f"snapshot metadata of domain '{name}'",
            timeout=_lock_timeout(),
            shared=shared,
        )

    def _driver_lock(self) -> FileLock:
        return FileLock(self.lock_dir / "driver.lock", what="the driver", timeout=_lock_timeout())

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of every domain: persistent ones and running transient ones."""
        names = {p.stem for p in self.config_dir.glob("*.xml") if not p.name.startswith(".")}
        names |= {p.stem for p in self.run_dir.glob("*.xml") if not p.name.startswith(".")}
        return sorted(n for n in names if self._exists(n))

    def _exists(self, name: str) -> bool:
        try:
            return os.path.lexists(self.config_path(name)) or self._read_status(name) is not None
        except VirtError:  # a refused file: listed, so that reading it reports why
            return True

    def _cached(self, path: Path, parse: Callable[[bytes], Any]) -> Any:
        """Parse ``path``, reusing the last result while the file is the same file.

        State files are only ever replaced by rename (``write_atomic``), so a file
        with the same inode, size and mtime has the same content.  Returns None
        when the file does not exist.

        :raise VirtError: OPERATION_FAILED for a symbolic link (never followed)
            or anything but a regular file.
        """
        try:
            fd = open_private(path, os.O_RDONLY | os.O_NONBLOCK)
        except VirtError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None
            raise
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise VirtError(ErrorCode.OPERATION_FAILED, f"'{path}' is not a regular file")
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            hit = self._parsed.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
            text = f.read()
        value = parse(text)
        self._parsed[path] = (key, value, text)
        return value

    def source_of(self, name: str, domain: Domain) -> tuple[str, bytes] | None:
        """The file ``domain`` was parsed from, if it is this domain's persistent
        definition (``("config", bytes)``) or the domain of its status
        (``("status", bytes)``) as last read by this driver; None otherwise
        (a model built or changed since).  Parsing the bytes again gives an equal
        model: see :func:`domain_from_source`."""
        for kind, path in (("config", self.config_path(name)), ("status", self.status_path(name))):
            hit = self._parsed.get(path)
            if hit is None:
                continue
            value = hit[1]
            if (value.domain if kind == "status" else value) is domain:
                return kind, hit[2]
        return None

    def keep_source(self, name: str, kind: str, data: bytes, target: Path) -> None:
        """Make ``target`` (a runtime file: not synced) hold ``data``, the file
        :meth:`source_of` gave as ``kind``: a hard link to that file while it
        is still the file this driver read, else a copy.

        Linked, the file's blocks stay in use until ``target`` is removed, so
        replacing the file (a rename over it) frees nothing then: a rename over
        a file whose blocks are on disk took 0.25 ms here, over one still
        linked 0.04 ms.  Whoever removes ``target`` pays for the freeing.
        State files are only replaced by rename, never written in place, so
        the link keeps the bytes that were read.

        :raise VirtError: OPERATION_FAILED when ``target`` cannot be written."""
        origin = self.config_path(name) if kind == "config" else self.status_path(name)
        remove_quietly(target)
        hit = self._parsed.get(origin)
        try:
            st = os.lstat(origin)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
            if hit is not None and hit[2] is data and hit[0] == now:
                os.link(origin, target, follow_symlinks=False)
                return
        except OSError:
            pass  # (another file system, or gone): a copy
        write_atomic(target, data, durable=False)

    def _read_config(self, name: str) -> Domain | None:
        return self._cached(self.config_path(name), parse_domain)  # type: ignore[no-any-return]

    def _read_status(self, name: str) -> DomainStatus | None:
        """The status if its QEMU is still the one recorded and alive.

        The socket, log and run-directory paths are the ones this root gives the
        domain, whatever the file says: a status file can never point virtshift
        at another QEMU's monitor.
        """
        rundir = self.domain_run_dir(name)
        try:
            status: DomainStatus | None = self._cached(self.status_path(name), self._parse_status)
        except VirtError as err:
            # written without fsync (see _write_status): after a power loss the
            # file may be empty or cut short, and its QEMU is gone with the boot
            if err.code != ErrorCode.XML_ERROR or _listening(rundir / MONITOR_SOCKET):
                raise
            _log.warning("domain '%s': unreadable status of a QEMU that is gone (%s)", name, err)
            return None
        if status is None:
            return None
        if not _qemu_alive(status, rundir):
            return None
        return dataclasses.replace(
            status,
            monitor=str(rundir / MONITOR_SOCKET),
            query_monitor=str(rundir / QUERY_SOCKET),
            rundir=str(rundir),
            log=str(self.log_path(name)),
        )

    def record(self, name: str) -> DomainRecord:
        """The domain named ``name``.

        :raise NoDomain: no persistent or running domain has that name.
        """
        _check_name(name)
        return self._record(name, self._read_status(name))

    def _record(self, name: str, status: DomainStatus | None) -> DomainRecord:
        config = self._read_config(name)
        if config is None and status is None:
            raise NoDomain(name)
        return DomainRecord(name=name, config=config, status=status)

    def record_by_uuid(self, uuid: str) -> DomainRecord:
        """The domain with this UUID (case-insensitive)."""
        for name in self.names():
            rec = self.record(name)
            if rec.definition.uuid.lower() == uuid.lower():
                return rec
        raise VirtError(ErrorCode.NO_DOMAIN, f"no domain with matching uuid '{uuid}'")

    @contextlib.contextmanager
    def locked(
        self, name: str, operation: str, timeout: float | None = None
    ) -> Iterator[DomainRecord]:
        """Hold the domain's lock; yield a fresh record read under it.

        Cleans up after a QEMU that died while nobody watched (stale status).
        """
        _check_name(name)
        lock = self.lock(name, timeout)
        with lock.hold(operation):
            status = self._reap_stale(name)
            if self.domain_run_dir(name).joinpath("snapshot-intent.json").exists():
                from virtshift.runtime.snapshot import recover_intent

                recover_intent(self, name)
                yield self.record(name)
            else:
                yield self._record(name, status)  # (read just now, under this lock)

    def _reap_stale(self, name: str) -> DomainStatus | None:
        """The status of a running domain; a stale one is cleared (None then)."""
        path = self.status_path(name)
        if not path.exists():
            return None
        status = self._read_status(name)
        if status is None:
            _log.info("domain '%s': QEMU is gone, clearing its status", name)
            self._clear_runtime(name)
        return status

    # -- definition -----------------------------------------------------------

    def define(self, xml: str | bytes) -> Domain:
        """Define (or redefine) a persistent domain.

        :raise VirtError: XML errors; OPERATION_FAILED when another domain has the
            same name with a different UUID, or the same UUID under another name.
        """
        dom = parse_domain(xml)
        with self._driver_lock().hold(f"define {dom.name}"):
            self._check_identity(dom)
            with self.lock(dom.name).hold("define"):
                write_atomic(self.config_path(dom.name), format_domain(dom, inactive=True))
                status = self._read_status(dom.name)
                if status is not None and not status.persistent:
                    self._write_status(dom.name, dataclasses.replace(status, persistent=True))
        return dom

    def _check_identity(self, dom: Domain) -> None:
        for other in self.names():
            rec = self.record(other)
            uuid = rec.definition.uuid
            if other == dom.name and uuid.lower() != dom.uuid.lower():
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"domain '{dom.name}' already exists with uuid {uuid}",
                )
            if other != dom.name and uuid.lower() == dom.uuid.lower():
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"domain '{other}' is already defined with uuid {uuid}",
                )

    def undefine(self, name: str, *, snapshots_metadata: bool = False) -> None:
        """Remove the persistent definition; a running domain becomes transient.

        :raise VirtError: NO_DOMAIN; OPERATION_INVALID for a transient domain or
            when snapshot metadata exists and ``snapshots_metadata`` is False.
        """
        with self.locked(name, "undefine") as rec:
            if rec.config is None:
                raise VirtError(ErrorCode.OPERATION_INVALID, "cannot undefine transient domain")
            snapdir = self.snapshot_dir(name)
            snaps = [p for p in snapdir.glob("*.xml")] if snapdir.exists() else []
            if snaps and not snapshots_metadata and not rec.active:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"cannot delete inactive domain with {len(snaps)} snapshots",
                )
            remove_quietly(self.config_path(name))
            if rec.status is not None:
                self._write_status(name, dataclasses.replace(rec.status, persistent=False))
            elif snapdir.exists():
                with self.metadata_lock(name, shared=False).hold("undefine"):
                    shutil.rmtree(snapdir, ignore_errors=True)

    # -- lifecycle ------------------------------------------------------------

    def start(self, name: str, *, paused: bool = False) -> DomainStatus:
        """Start a defined domain.

        :raise VirtError: OPERATION_INVALID when it is running already; what
            :meth:`_launch` raises.
        """
        with self.locked(name, "start") as rec:
            if rec.active:
                raise VirtError(ErrorCode.OPERATION_INVALID, "domain is already running")
            assert rec.config is not None
            return self._launch(rec.config, persistent=True, paused=paused)

    def create_transient(self, xml: str | bytes, *, paused: bool = False) -> DomainStatus:
        """Start a domain from XML without defining it (``createXML``)."""
        dom = parse_domain(xml)
        with self._driver_lock().hold(f"create {dom.name}"):
            self._check_identity(dom)
            with self.locked_new(dom.name, "create") as existing:
                if existing is not None and existing.active:
                    raise VirtError(
                        ErrorCode.OPERATION_INVALID, f"domain '{dom.name}' is already running"
                    )
                if existing is not None and existing.config is not None:
                    raise VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"domain '{dom.name}' is already defined; start it instead",
                    )
                return self._launch(dom, persistent=False, paused=paused)

    @contextlib.contextmanager
    def locked_new(self, name: str, operation: str) -> Iterator[DomainRecord | None]:
        """Like :meth:`locked`, but yields None when no such domain exists."""
        with self.lock(name).hold(operation):
            self._reap_stale(name)
            rec: DomainRecord | None
            try:
                rec = self.record(name)
            except NoDomain:
                rec = None
            yield rec

    def _resolve_chains(self, dom: Domain) -> Domain:
        """Fill every disk's backing chain from its images; check they exist."""
        disks: list[Disk] = []
        for disk in dom.disks:
            if disk.type == "network" or disk.source.type == "network":
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    f"network disk '{disk.target}' is not supported by virtshift; "
                    "only file and block disks can be started",
                )
            src = disk.source
            if src.path is None:
                raise VirtError(ErrorCode.CONFIG_UNSUPPORTED, f"disk '{disk.target}' has no source")
            if src.format is None:  # libvirt's default when no format is given
                src = dataclasses.replace(src, format="raw")
            for layer in src.chain():
                if layer.path is not None and not os.path.exists(layer.path):
                    raise VirtError(
                        ErrorCode.SYSTEM_ERROR,
                        f"Cannot access storage file '{layer.path}' of disk '{disk.target}': "
                        "No such file or directory",
                    )
            if src.backing is None and not src.backing_end:
                assert src.path is not None
                assert src.format is not None
                infos = _header_chain(src.path, src.format)
                src = chain_from_image_info(src, infos, disk=disk.target)
            disks.append(dataclasses.replace(disk, source=src))
        return dataclasses.replace(dom, disks=tuple(disks))

    def _launch(self, config: Domain, *, persistent: bool, paused: bool) -> DomainStatus:
        name = config.name
        dom = self._resolve_chains(config)
        emulator = dom.emulator or shutil.which(DEFAULT_EMULATOR) or DEFAULT_EMULATOR
        if dom.arch and dom.arch != "x86_64" and not dom.emulator:
            emulator = f"qemu-system-{dom.arch}"
        accel = "tcg"
        if dom.type == "kvm":
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                raise VirtError(
                    ErrorCode.CONFIG_UNSUPPORTED,
                    "Domain requires KVM, but it is not available. Check that "
                    "virtualization is enabled in the host BIOS, and host configuration "
                    "is setup to load the kvm modules.",
                )
            accel = "kvm"
        rundir = self.domain_run_dir(name)
        refuse_link(rundir)
        refuse_link(self.log_path(name))
        if rundir.exists():
            shutil.rmtree(rundir, ignore_errors=True)
        ensure_dir(rundir)
        monitor = str(rundir / MONITOR_SOCKET)
        query = str(rundir / QUERY_SOCKET)
        plan = plan_start(
            dom,
            emulator=emulator,
            monitor=monitor,
            query_monitor=query,
            agent_socket=str(rundir / AGENT_PORT),
            accel=accel,
            rundir=str(rundir),
        )
        log = self.log_path(name)
        dom_id = self._next_id()
        live = dataclasses.replace(plan.domain, id=dom_id)
        logfd = open_private(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with open(logfd, "ab", buffering=0) as logf:
            os.fchmod(logfd, 0o600)
            logf.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} starting: {plan.argv!r}\n".encode())
            import subprocess

            try:
                proc = subprocess.Popen(
                    plan.argv,
                    cwd=rundir,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    umask=0o177,  # its monitor and agent sockets: 0600
                )
            except OSError as err:
                shutil.rmtree(rundir, ignore_errors=True)
                raise VirtError(
                    ErrorCode.OPERATION_FAILED, f"cannot run emulator '{emulator}': {err.strerror}"
                ) from err
        _CHILDREN[proc.pid] = proc
        status = DomainStatus(
            state=DomainState.PAUSED if paused else DomainState.RUNNING,
            reason="user" if paused else "booted",
            pid=proc.pid,
            monitor=monitor,
            query_monitor=query,
            log=str(log),
            rundir=str(rundir),
            persistent=persistent,
            next_index=plan.next_index,
            domain=live,
        )
        try:
            mon = self._wait_monitor(proc, monitor, log)
            try:
                caps = caps_from_replies(
                    mon.execute("query-version"), mon.execute("query-commands")
                )
                live = _check_chains(live, mon.execute("query-block"))
                if not paused:
                    mon.execute("cont")
            finally:
                mon.close()
            status = dataclasses.replace(status, caps=caps, domain=live)
            # read back now, while QEMU's start is the cost: the first locked
            # call on the domain in this process then finds it parsed, and its
            # QEMU known (_qemu_alive)
            self.write_prepared_status(name, self.prepare_status(name, status))
            _qemu_alive(status, rundir)
        except BaseException:
            _kill(proc.pid)
            self._clear_runtime(name)
            raise
        return status

    def _wait_monitor(self, proc: subprocess.Popen[bytes], monitor: str, log: Path) -> Monitor:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    "QEMU exited while starting: " + _log_tail(log),
                )
            if os.path.exists(monitor):
                try:
                    return Monitor(monitor).connect()
                except VirtError:
                    if time.monotonic() > deadline:
                        raise
            if time.monotonic() > deadline:
                raise VirtError(
                    ErrorCode.OPERATION_TIMEOUT, "QEMU did not open its monitor: " + _log_tail(log)
                )
            time.sleep(0.01)

    def _next_id(self) -> int:
        path = self.run_dir / "next-id"
        idlock = FileLock(self.lock_dir / "id.lock", what="domain ids", timeout=_lock_timeout())
        with idlock.hold("allocate id"):
            try:
                n = int(path.read_text().strip() or "1")
            except (FileNotFoundError, ValueError):
                n = 1
            write_atomic(path, f"{n + 1}\n")
        return n

    def destroy(self, name: str) -> None:
        """Stop the domain's QEMU at once (SIGTERM, then SIGKILL).

        :raise VirtError: OPERATION_INVALID when it is not running.
        """
        with self.locked(name, "destroy") as rec:
            if rec.status is None:
                raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
            _kill(rec.status.pid)
            self._clear_runtime(name)

    def set_paused(self, name: str, paused: bool) -> None:
        """``suspend`` (QMP ``stop``) or ``resume`` (``cont``)."""
        with self.monitor(name, "suspend" if paused else "resume") as (rec, mon):
            assert rec.status is not None
            mon.execute("stop" if paused else "cont")
            new = dataclasses.replace(
                rec.status,
                state=DomainState.PAUSED if paused else DomainState.RUNNING,
                reason="user" if paused else "unpaused",
            )
            self._write_status(name, new)

    def _parse_status(self, text: bytes) -> DomainStatus:
        status = parse_status(text)
        caps = self._load_caps(status.caps, status.domain)
        return status if caps is status.caps else dataclasses.replace(status, caps=caps)

    def _write_status(self, name: str, status: DomainStatus) -> None:
        """Replace the status file: atomically (a process that dies finds the old
        or the new one), but not synced.  It describes a QEMU process, which a
        power loss ends: no status needs to outlive one, and a file it cut short
        reads as the status of a QEMU that is gone (:meth:`_read_status`).  What
        must outlive it (the persistent definition, snapshot metadata) is synced."""
        status = dataclasses.replace(status, caps=self._store_caps(status.caps))
        write_atomic(self.status_path(name), format_status(status), durable=False)

    # -- QEMU's command list, kept in the capability cache ----------------------

    def _store_caps(self, caps: QemuCaps) -> QemuCaps:
        """``caps`` with its cache entry name; the entry is written (durably,
        before any status names it) the first time this content is seen.

        The name is a hash of the content, so an entry never changes."""
        if caps.key is not None or not caps.commands:
            return caps
        import hashlib  # ~4 ms to import: only when a domain starts

        text = json.dumps(
            {"version": caps.version, "package": caps.package, "commands": sorted(caps.commands)}
        )
        key = f"caps-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if key not in self._caps:
            path = ensure_dir(self.root / "cache" / "qemu") / key
            if not path.exists():
                write_atomic(path, text)
            self._caps[key] = dataclasses.replace(caps, key=key)
        return self._caps[key]

    def _load_caps(self, caps: QemuCaps, domain: Domain) -> QemuCaps:
        """The command list a status names by its cache entry (older status
        files carry the list itself).  An entry that is gone or unreadable is
        replaced by a probe of the domain's emulator binary."""
        key = caps.key
        if key is None or caps.commands:
            return caps
        hit = self._caps.get(key)
        if hit is not None:
            return hit
        try:
            if not _CAPS_KEY.fullmatch(key):
                raise ValueError(f"bad entry name {key!r}")
            data = json.loads((self.root / "cache" / "qemu" / key).read_text())
            commands = data["commands"]
            if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
                raise ValueError("bad command list")
            loaded = dataclasses.replace(caps, commands=frozenset(commands))
        except (OSError, ValueError, KeyError, TypeError) as err:
            _log.warning("capability cache entry %s unusable (%s); probing the emulator", key, err)
            emulator = domain.emulator or shutil.which(DEFAULT_EMULATOR) or DEFAULT_EMULATOR
            # no name (and not remembered): the next status write stores the list again
            probed = self.probe_emulator(emulator).commands
            return dataclasses.replace(caps, commands=probed, key=None)
        self._caps[key] = loaded
        return loaded

    def write_status(self, name: str, status: DomainStatus) -> None:
        """Replace the status of a running domain (caller holds the domain lock)."""
        self._write_status(name, status)

    def prepare_status(
        self, name: str, status: DomainStatus, *, read_back: bool = True
    ) -> PreparedStatus:
        """Everything :meth:`write_prepared_status` needs but putting the file
        in place (done while QEMU works on a command): the text, written under
        a temporary name (not synced: see :meth:`_write_status`), and, with
        ``read_back``, what reading it back gives, so that the next call in
        this process need not parse it (:meth:`read_back` adds that later).

        (Not the model itself: what formatting a model gives depends on the
        elements it was parsed from, so a model built in memory can format
        another document, for instance a snapshot's inactive ``<domain>``,
        than the same model read back from the file.)

        The caller either writes it or calls :meth:`PreparedStatus.discard`."""
        status = dataclasses.replace(status, caps=self._store_caps(status.caps))
        text = format_status(status)
        file = prepare_atomic(self.status_path(name), text, durable=False)
        prepared = PreparedStatus(text=text, read_back=None, file=file)
        if not read_back:
            return prepared
        try:
            return self.read_back(prepared)
        except BaseException:
            file.discard()
            raise

    def read_back(self, prepared: PreparedStatus) -> PreparedStatus:
        """``prepared`` with what reading its document back gives: a moment's
        parsing that only a next call in this process gains from, for when
        the caller waits anyway."""
        if prepared.read_back is not None:
            return prepared
        return dataclasses.replace(prepared, read_back=self._parse_status(prepared.text.encode()))

    def write_prepared_status(self, name: str, prepared: PreparedStatus) -> None:
        """Write a status made by :meth:`prepare_status` (caller holds the domain
        lock); the next read in this process finds it parsed, if it was."""
        path = self.status_path(name)
        assert prepared.file.path == path, (prepared.file.path, path)
        prepared.file.commit()
        if prepared.read_back is not None:
            # the lock keeps every other writer out, so the file is still ours
            # (a rename keeps the key the temporary file had)
            self._parsed[path] = (prepared.file.key, prepared.read_back, prepared.text.encode())

    def write_config(
        self, name: str, config: Domain | None = None, *, text: str | None = None
    ) -> None:
        """Replace the persistent definition (caller holds the domain lock).

        :param text: ``config`` already formatted (inactive form), if it was.
        """
        if text is None:
            assert config is not None
            text = format_domain(config, inactive=True)
        write_atomic(self.config_path(name), text)

    def _clear_runtime(self, name: str) -> None:
        remove_quietly(self.status_path(name))
        shutil.rmtree(self.domain_run_dir(name), ignore_errors=True)

    # -- monitors ---------------------------------------------------------------

    @contextlib.contextmanager
    def monitor(
        self, name: str, operation: str, timeout: float | None = None
    ) -> Iterator[tuple[DomainRecord, Monitor]]:
        """Hold the domain lock and its main monitor for one operation."""
        with self.locked(name, operation, timeout) as rec:
            if rec.status is None:
                raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
            with Monitor(rec.status.monitor).connect() as mon:
                if self.on_monitor is not None and any(not j.state.ended for j in rec.status.jobs):
                    self.on_monitor(name, mon)
                    rec = self.record(name)
                yield rec, mon

    @contextlib.contextmanager
    def query_monitor(self, name: str) -> Iterator[tuple[DomainRecord, Monitor]]:
        """The second monitor, for read-only queries; needs no domain lock."""
        rec = self.record(name)
        if rec.status is None:
            raise VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
        qlock = FileLock(
            self.lock_dir / f"{name}.query.lock", what=f"query monitor of '{name}'", timeout=30
        )
        with qlock.hold("query"), Monitor(rec.status.query_monitor).connect() as mon:
            yield rec, mon

    def caps_for(self, name: str) -> QemuCaps:
        """Capabilities of the QEMU running ``name``, or of its emulator binary."""
        rec = self.record(name)
        if rec.status is not None:
            return rec.status.caps
        emulator = rec.definition.emulator or shutil.which(DEFAULT_EMULATOR) or DEFAULT_EMULATOR
        return self.probe_emulator(emulator)

    def probe_emulator(self, emulator: str) -> QemuCaps:
        """Capabilities of an emulator binary, cached by path, size and mtime."""
        cache = ensure_dir(self.root / "cache" / "qemu")
        try:
            st = os.stat(shutil.which(emulator) or emulator)
        except OSError as err:
            raise VirtError(
                ErrorCode.OPERATION_FAILED, f"cannot find emulator '{emulator}': {err.strerror}"
            ) from err
        key = f"{os.path.basename(emulator)}-{st.st_size}-{int(st.st_mtime)}.json"
        path = cache / key
        try:
            data = json.loads(path.read_text())
            return QemuCaps(
                version=data["version"],
                package=data["package"],
                commands=frozenset(data["commands"]),
            )
        except (FileNotFoundError, ValueError, KeyError):
            pass
        caps = _probe_binary(emulator, cache)
        write_atomic(
            path,
            json.dumps(
                {
                    "version": caps.version,
                    "package": caps.package,
                    "commands": sorted(caps.commands),
                }
            ),
        )
        return caps


# -- helpers ------------------------------------------------------------------

#: QEMU children started by this process, so they are reaped when they exit.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"domain name must be str, not {type(name).__name__}")
    bad = not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 200
    if not bad:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            bad = True
    if bad:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\0")
        raise VirtError(ErrorCode.INVALID_ARG, f"invalid domain name '{shown[:300]}'")


def _check_root_owner(root: Path) -> None:
    """Refuse a root that belongs to another user (or is not a directory)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    except OSError as err:
        raise VirtError(
            ErrorCode.SYSTEM_ERROR, f"cannot access driver root '{root}': {err.strerror}"
        ) from err
    if not stat.S_ISDIR(st.st_mode):
        raise VirtError(ErrorCode.SYSTEM_ERROR, f"driver root '{root}' is not a directory")
    if st.st_uid != os.geteuid():
        raise VirtError(
            ErrorCode.SYSTEM_ERROR,
            f"driver root '{root}' belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.geteuid()}); refusing to use it",
        )


def _pid_alive(pid: int) -> bool:
    return _proc_start(pid) is not None


def _proc_start(pid: int) -> bytes | None:
    """When process ``pid`` started (``/proc/PID/stat`` field 22, clock ticks
    since boot), or None if it is gone or a zombie.  A pid and its start time
    name one process: a reused pid starts later."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)  # another thread may have seen it end too
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the fields after the parenthesised command name: state first, start time 20th
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X") or len(fields) < 20:
        return None
    return fields[19]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


#: Processes found to be a domain's QEMU by :func:`_qemu_alive`: (pid, start
#: time, domain name, UUID, run directory).  A process's command line and
#: working directory are read once; later checks only see that it still runs.
_VERIFIED: set[tuple[int, bytes, str, str, str]] = set()


def _qemu_alive(status: DomainStatus, rundir: Path) -> bool:
    """True when ``status.pid`` is alive and is the QEMU of that domain, started
    here: its command line names the domain and its UUID, and it runs in this
    root's run directory of the domain (a QEMU of the same domain under another
    root, or of another user, is not ours)."""
    if status.pid <= 0:
        return False
    start = _proc_start(status.pid)
    if start is None:
        return False
    key = (status.pid, start, status.domain.name, status.domain.uuid, str(rundir))
    if key in _VERIFIED:
        return True
    argv = _cmdline(status.pid)
    want = f"guest={status.domain.name},debug-threads=on"
    if want not in argv or status.domain.uuid not in argv:
        return False
    try:
        cwd = os.readlink(f"/proc/{status.pid}/cwd")
    except OSError:  # another user's process, or gone
        return False
    if cwd != os.path.realpath(rundir):
        return False
    if len(_VERIFIED) >= 4096:
        _VERIFIED.clear()
    _VERIFIED.add(key)
    return True


def _kill(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            # QEMU leads its own session (start_new_session): signal the group,
            # so a wrapper and its QEMU go together
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                _reap(pid)
                return
            time.sleep(0.01)
    _reap(pid)


def domain_from_source(kind: str, text: bytes) -> Domain:
    """The domain :meth:`Driver.source_of` named: a persistent definition's
    document (``config``) or a status document's domain (``status``)."""
    if kind == "config":
        return parse_domain(text)
    if kind == "status":
        return parse_status(text).domain
    raise ValueError(f"unknown definition source {kind!r}")


@dataclasses.dataclass(frozen=True)
class PreparedStatus:
    """A status document ready to be written (:meth:`Driver.prepare_status`)."""

    #: The document.
    text: str
    #: What parsing the document gives (as :meth:`Driver._cached` would keep
    #: it); None when there was no time to spare for it.
    read_back: DomainStatus | None
    #: The document written under a temporary name.
    file: PreparedFile

    def discard(self) -> None:
        """Remove the temporary file, unless written (safe to call twice)."""
        self.file.discard()


def _listening(sock: Path) -> bool:
    """Whether a process accepts connections on the unix socket ``sock`` (True
    when that cannot be told)."""
    from virtshift.qmp.client import connect_unix

    try:
        connect_unix(str(sock)).close()
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect a QEMU child of this process that has exited (no zombie, no warning)."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        import subprocess

        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:  # still running: keep watching it
            _CHILDREN[pid] = child


def _log_tail(log: Path, limit: int = 2000) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [ln for ln in text.splitlines() if ln and " starting: [" not in ln]
    return "\n".join(lines[-5:])[-limit:] or "(no output)"


def _header_chain(path: str, fmt: str) -> list[dict[str, Any]]:
    """The chain below ``path`` as its headers name it, in ``qemu-img info`` shape.

    Read in process one image at a time with the format each header records:
    nothing is probed, and a backing name in protocol form, a FIFO or device, a
    loop are refused (:func:`virtshift.store.images.read_chain`).
    """
    if fmt not in KNOWN_FORMATS:  # chain_from_image_info refuses it
        return [{"filename": path, "format": fmt}]
    return [
        {
            "filename": layer.filename,
            "format": layer.format,
            "backing-filename": layer.backing_filename,
            "full-backing-filename": layer.full_backing_filename,
            "backing-filename-format": layer.backing_format,
        }
        for layer in read_chain(path, fmt)
    ]


def _check_chains(live: Domain, reply: Any) -> Domain:
    """Compare QEMU's view of each disk's chain with ours; QEMU's wins on paths."""
    devices = {d.alias: d for d in parse_query_block(reply)}
    for disk in live.disks:
        dev = devices.get(disk.alias)
        layers = disk.source.chain()
        if dev is None or dev.node_name != disk.source.node_name or len(dev.chain) != len(layers):
            raise VirtError(
                ErrorCode.INTERNAL_ERROR,
                f"QEMU's block graph for disk '{disk.target}' does not match the definition",
            )
    return live


def _probe_binary(emulator: str, workdir: Path) -> QemuCaps:
    """Start ``emulator`` with no machine, ask for its version and commands."""
    # per process and thread: concurrent first calls each probe with their own socket
    sock = workdir / f"probe-{os.getpid()}-{threading.get_native_id()}.sock"
    remove_quietly(sock)
    argv = [
        emulator, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
        "-S", "-chardev", f"socket,id=m,path={sock.name},server=on,wait=off",
        "-mon", "chardev=m,mode=control",
    ]  # fmt: skip
    import subprocess

    try:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as err:
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"cannot run emulator '{emulator}': {err.strerror}"
        ) from err
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err_text = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise VirtError(
                    ErrorCode.OPERATION_FAILED, f"cannot probe '{emulator}': {err_text.strip()}"
                )
            time.sleep(0.01)
        while True:
            # the socket file appears at bind(), a moment before QEMU listens
            try:
                mon = Monitor(str(sock)).connect()
                break
            except VirtError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        with mon:
            return caps_from_replies(mon.execute("query-version"), mon.execute("query-commands"))
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        remove_quietly(sock)
