"""A drop-in subset of libvirt-python for QEMU domains, snapshots and block jobs.

``import virtshift.libvirt as libvirt`` and a libvirt-python script's calls to
``open``, ``virConnect.defineXML``, ``virDomain.create``, ``XMLDesc`` and the
rest of the supported surface run unchanged: same class and method names,
signatures and defaults, flag constants with libvirt's values, and
:class:`libvirtError` with libvirt's error numbers.

Differences from libvirt, on purpose:

* there is no daemon: the connection drives QEMU itself (see
  :mod:`virtshift.runtime.driver`), and QEMU outlives the Python process;
* only ``qemu:///session`` and ``qemu:///embed?root=DIR`` are accepted.

This module only adapts shapes (arguments, return values, errors); the work is
done by the runtime.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from virtshift.errors import ErrorCode, ErrorDomain, VirtError
from virtshift.model.status import DomainState
from virtshift.runtime.driver import DomainRecord, Driver
from virtshift.uri import resolve_uri

__all__ = [
    "libvirtError",
    "open",
    "openReadOnly",
    "virConnect",
    "virDomain",
    "virDomainSnapshot",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

# -- constants (libvirt's numeric values) ---------------------------------------

VIR_ERR_OK = 0
VIR_ERR_INTERNAL_ERROR = 1
VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_CONNECT = 5
VIR_ERR_INVALID_ARG = 8
VIR_ERR_OPERATION_FAILED = 9
VIR_ERR_XML_ERROR = 27
VIR_ERR_DOM_EXIST = 28
VIR_ERR_OPERATION_DENIED = 29
VIR_ERR_XML_DETAIL = 35
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_CONFIG_UNSUPPORTED = 67
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_INVALID_DOMAIN_SNAPSHOT = 71
VIR_ERR_NO_DOMAIN_SNAPSHOT = 72
VIR_ERR_ARGUMENT_UNSUPPORTED = 74
VIR_ERR_OPERATION_ABORTED = 78
VIR_ERR_OVERFLOW = 82
VIR_ERR_BLOCK_COPY_ACTIVE = 83
VIR_ERR_OPERATION_UNSUPPORTED = 84
VIR_ERR_AGENT_UNRESPONSIVE = 86
VIR_ERR_RESOURCE_BUSY = 87
VIR_ERR_XML_INVALID_SCHEMA = 92
VIR_ERR_DEVICE_MISSING = 99

VIR_FROM_NONE = 0
VIR_FROM_QEMU = 10
VIR_FROM_DOMAIN = 20
VIR_FROM_DOMAIN_SNAPSHOT = 35
VIR_ERR_NONE = 0
VIR_ERR_WARNING = 1
VIR_ERR_ERROR = 2

VIR_DOMAIN_NOSTATE = 0
VIR_DOMAIN_RUNNING = 1
VIR_DOMAIN_BLOCKED = 2
VIR_DOMAIN_PAUSED = 3
VIR_DOMAIN_SHUTDOWN = 4
VIR_DOMAIN_SHUTOFF = 5
VIR_DOMAIN_CRASHED = 6
VIR_DOMAIN_PMSUSPENDED = 7

VIR_DOMAIN_RUNNING_UNKNOWN = 0
VIR_DOMAIN_RUNNING_BOOTED = 1
VIR_DOMAIN_RUNNING_UNPAUSED = 5
VIR_DOMAIN_RUNNING_FROM_SNAPSHOT = 4
VIR_DOMAIN_PAUSED_UNKNOWN = 0
VIR_DOMAIN_PAUSED_USER = 1
VIR_DOMAIN_PAUSED_FROM_SNAPSHOT = 6
VIR_DOMAIN_PAUSED_SNAPSHOT = 9
VIR_DOMAIN_PAUSED_STARTING_UP = 11
VIR_DOMAIN_SHUTOFF_UNKNOWN = 0
VIR_DOMAIN_SHUTOFF_DESTROYED = 2

VIR_DOMAIN_NONE = 0
VIR_DOMAIN_START_PAUSED = 1
VIR_DOMAIN_START_AUTODESTROY = 2
VIR_DOMAIN_START_BYPASS_CACHE = 4
VIR_DOMAIN_START_FORCE_BOOT = 8
VIR_DOMAIN_START_VALIDATE = 16
VIR_DOMAIN_START_RESET_NVRAM = 32

VIR_DOMAIN_DEFINE_VALIDATE = 1

VIR_DOMAIN_DESTROY_DEFAULT = 0
VIR_DOMAIN_DESTROY_GRACEFUL = 1

VIR_DOMAIN_UNDEFINE_MANAGED_SAVE = 1
VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA = 2
VIR_DOMAIN_UNDEFINE_NVRAM = 4
VIR_DOMAIN_UNDEFINE_KEEP_NVRAM = 8
VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 16
VIR_DOMAIN_UNDEFINE_TPM = 32
VIR_DOMAIN_UNDEFINE_KEEP_TPM = 64

VIR_DOMAIN_XML_SECURE = 1
VIR_DOMAIN_XML_INACTIVE = 2
VIR_DOMAIN_XML_UPDATE_CPU = 4
VIR_DOMAIN_XML_MIGRATABLE = 8

VIR_CONNECT_LIST_DOMAINS_ACTIVE = 1
VIR_CONNECT_LIST_DOMAINS_INACTIVE = 2
VIR_CONNECT_LIST_DOMAINS_PERSISTENT = 4
VIR_CONNECT_LIST_DOMAINS_TRANSIENT = 8
VIR_CONNECT_LIST_DOMAINS_RUNNING = 16
VIR_CONNECT_LIST_DOMAINS_PAUSED = 32
VIR_CONNECT_LIST_DOMAINS_SHUTOFF = 64
VIR_CONNECT_LIST_DOMAINS_OTHER = 128

# snapshots (used by later layers; values from libvirt 10.7)
VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE = 1
VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT = 2
VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA = 4
VIR_DOMAIN_SNAPSHOT_CREATE_HALT = 8
VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY = 16
VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT = 32
VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE = 64
VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC = 128
VIR_DOMAIN_SNAPSHOT_CREATE_LIVE = 256
VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE = 512
VIR_DOMAIN_SNAPSHOT_XML_SECURE = 1
VIR_DOMAIN_SNAPSHOT_LIST_ROOTS = 1
VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS = 1
VIR_DOMAIN_SNAPSHOT_LIST_METADATA = 2
VIR_DOMAIN_SNAPSHOT_LIST_LEAVES = 4
VIR_DOMAIN_SNAPSHOT_LIST_NO_LEAVES = 8
VIR_DOMAIN_SNAPSHOT_LIST_NO_METADATA = 16
VIR_DOMAIN_SNAPSHOT_LIST_INACTIVE = 32
VIR_DOMAIN_SNAPSHOT_LIST_ACTIVE = 64
VIR_DOMAIN_SNAPSHOT_LIST_DISK_ONLY = 128
VIR_DOMAIN_SNAPSHOT_LIST_INTERNAL = 256
VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL = 512
VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL = 1024
VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING = 1
VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED = 2
VIR_DOMAIN_SNAPSHOT_REVERT_FORCE = 4
VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN = 1
VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY = 2
VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY = 4
#: virtshift extension (the proposal's flag; libvirt never shipped it).
VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR = 8

VIR_DOMAIN_BLOCK_JOB_TYPE_UNKNOWN = 0
VIR_DOMAIN_BLOCK_JOB_TYPE_PULL = 1
VIR_DOMAIN_BLOCK_JOB_TYPE_COPY = 2
VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT = 3
VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT = 4
VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP = 5
VIR_DOMAIN_BLOCK_JOB_COMPLETED = 0
VIR_DOMAIN_BLOCK_JOB_FAILED = 1
VIR_DOMAIN_BLOCK_JOB_CANCELED = 2
VIR_DOMAIN_BLOCK_JOB_READY = 3
VIR_DOMAIN_EVENT_ID_BLOCK_JOB = 8
VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2 = 16
VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC = 1
VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 2
VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES = 1
VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES = 1
VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES = 64
VIR_DOMAIN_BLOCK_REBASE_SHALLOW = 1
VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT = 2
VIR_DOMAIN_BLOCK_REBASE_COPY_RAW = 4
VIR_DOMAIN_BLOCK_REBASE_COPY = 8
VIR_DOMAIN_BLOCK_REBASE_RELATIVE = 16
VIR_DOMAIN_BLOCK_REBASE_COPY_DEV = 32
VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES = 64
VIR_DOMAIN_BLOCK_COPY_SHALLOW = 1
VIR_DOMAIN_BLOCK_COPY_REUSE_EXT = 2
VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB = 4
VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES = 8
VIR_DOMAIN_BLOCK_COPY_BANDWIDTH = "bandwidth"
VIR_DOMAIN_BLOCK_COPY_GRANULARITY = "granularity"
VIR_DOMAIN_BLOCK_COPY_BUF_SIZE = "buf-size"
VIR_DOMAIN_BLOCK_COMMIT_SHALLOW = 1
VIR_DOMAIN_BLOCK_COMMIT_DELETE = 2
VIR_DOMAIN_BLOCK_COMMIT_ACTIVE = 4
VIR_DOMAIN_BLOCK_COMMIT_RELATIVE = 8
VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES = 16

_MIB = 1024 * 1024


_STATE_REASON: dict[tuple[DomainState, str], int] = {
    (DomainState.RUNNING, "booted"): VIR_DOMAIN_RUNNING_BOOTED,
    (DomainState.RUNNING, "unpaused"): VIR_DOMAIN_RUNNING_UNPAUSED,
    (DomainState.PAUSED, "user"): VIR_DOMAIN_PAUSED_USER,
    (DomainState.PAUSED, "starting up"): VIR_DOMAIN_PAUSED_STARTING_UP,
}


class libvirtError(Exception):
    """libvirt-python's exception, with the same accessors.

    ``err`` is libvirt's 9-tuple ``(code, domain, message, level, str1, str2,
    str3, int1, int2)``.
    """

    def __init__(self, defmsg: str, *, err: tuple[Any, ...] | None = None) -> None:
        self.err = err
        super().__init__(err[2] if err else defmsg)

    @classmethod
    def _from(cls, error: VirtError) -> libvirtError:
        return cls(
            error.message,
            err=(
                int(error.code),
                int(error.domain),
                error.message,
                VIR_ERR_ERROR,
                error.detail,
                None,
                None,
                -1,
                -1,
            ),
        )

    def get_error_code(self) -> int | None:
        return None if self.err is None else int(self.err[0])

    def get_error_domain(self) -> int | None:
        return None if self.err is None else int(self.err[1])

    def get_error_message(self) -> str | None:
        return None if self.err is None else str(self.err[2])

    def get_error_level(self) -> int | None:
        return None if self.err is None else int(self.err[3])

    def get_str1(self) -> str | None:
        return None if self.err is None else self.err[4]

    def get_str2(self) -> str | None:
        return None if self.err is None else self.err[5]

    def get_str3(self) -> str | None:
        return None if self.err is None else self.err[6]

    def get_int1(self) -> int | None:
        return None if self.err is None else self.err[7]

    def get_int2(self) -> int | None:
        return None if self.err is None else self.err[8]


def _api(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn VirtError (and stray OS errors) into libvirtError."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            _check_strings(func.__name__, (*args, *kwargs.values()))
            return func(*args, **kwargs)
        except VirtError as err:
            raise libvirtError._from(err) from err
        except OSError as err:
            raise libvirtError._from(
                VirtError(ErrorCode.SYSTEM_ERROR, f"{err.strerror or err}", domain=ErrorDomain.NONE)
            ) from err

    return wrapper


def _check_strings(api: str, values: tuple[Any, ...]) -> None:
    """Refuse a string argument that no C string can carry: one with a NUL, or a
    lone surrogate (not UTF-8).  libvirt-python raises ValueError for these
    before libvirt is called; virtshift answers with INVALID_ARG, so that every
    refusal of a value is a libvirtError."""
    for value in values:
        if not isinstance(value, str):
            continue
        if "\0" in value:
            raise VirtError(ErrorCode.INVALID_ARG, f"{api}: argument contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise VirtError(
                ErrorCode.INVALID_ARG, f"{api}: argument is not valid UTF-8 text"
            ) from None


def _check_flags(flags: int, allowed: int, api: str) -> None:
    if flags & ~allowed:
        raise VirtError(
            ErrorCode.INVALID_ARG, f"unsupported flags (0x{flags & ~allowed:x}) in function {api}"
        )


@_api
def open(name: str | None = None) -> virConnect:
    """Open a connection: ``qemu:///session`` (default) or ``qemu:///embed?root=DIR``."""
    uri, root = resolve_uri(name)
    return virConnect(uri, Driver(root))


@_api
def openReadOnly(name: str | None = None) -> virConnect:
    """Same as :func:`open`; virtshift has no separate read-only access yet."""
    uri, root = resolve_uri(name)
    return virConnect(uri, Driver(root))


def virEventRegisterDefaultImpl() -> int:
    """Set up the event loop that delivers domain events (call once)."""
    from virtshift.runtime.events import default_loop

    default_loop(create=True)
    return 0


def virEventRunDefaultImpl() -> int:
    """Run one iteration of the event loop (call it in a loop, as with libvirt)."""
    from virtshift.runtime.events import default_loop

    loop = default_loop()
    if loop is None:
        raise libvirtError._from(
            VirtError(ErrorCode.INTERNAL_ERROR, "virEventRegisterDefaultImpl() was not called")
        )
    loop.run_once()
    return 0


def getVersion() -> int:
    """virtshift's version as libvirt encodes it (major*1e6 + minor*1e3 + micro)."""
    from virtshift import __version__

    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return major * 1_000_000 + minor * 1000 + micro


class virConnect:
    """A connection to one driver root."""

    def __init__(self, uri: str, driver: Driver) -> None:
        self._uri = uri
        self._driver = driver
        self._open = True
        self._snapshots: Any = None
        self._jobs: Any = None
        self.domainEventCallbackID: dict[int, Any] = {}
        # Every locked operation on a domain with unended jobs first applies
        # what QEMU ended. The block-job layer is imported only then, so that
        # calls that never meet a job (``list``) do not load it.
        driver.on_monitor = self._reconcile_jobs

    # -- connection -----------------------------------------------------------

    def getURI(self) -> str:
        return self._uri

    def getType(self) -> str:
        return "QEMU"

    def getHostname(self) -> str:
        import socket

        return socket.gethostname()

    def getLibVersion(self) -> int:
        return getVersion()

    @_api
    def getVersion(self) -> int:
        """QEMU's version, encoded like libvirt (7.2.22 -> 7002022)."""
        caps = self._driver.probe_emulator(_default_emulator())
        major, minor, micro = (int(x) for x in caps.version.split("."))
        return major * 1_000_000 + minor * 1000 + micro

    def isAlive(self) -> int:
        return 1 if self._open else 0

    def close(self) -> int:
        self._open = False
        return 0

    def _reconcile_jobs(self, name: str, mon: Any) -> None:
        self._job_service().reconcile(name, mon)

    def _job_service(self) -> Any:
        from virtshift.runtime.blockjob import BlockJobOps

        if self._jobs is None:
            self._jobs = BlockJobOps(self._driver)
        return self._jobs

    def _snapshot_service(self) -> Any:
        from virtshift.runtime.snapshot import Snapshots

        if self._snapshots is None:
            self._snapshots = Snapshots(self._driver)
        return self._snapshots

    def __enter__(self) -> virConnect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- domains ----------------------------------------------------------------

    @_api
    def lookupByName(self, name: str) -> virDomain:
        rec = self._driver.record(name)
        return virDomain(self, rec.name, rec.definition.uuid)

    @_api
    def lookupByUUIDString(self, uuidstr: str) -> virDomain:
        if not isinstance(uuidstr, str):
            raise TypeError(f"uuidstr must be str, not {type(uuidstr).__name__}")
        rec = self._driver.record_by_uuid(uuidstr)
        return virDomain(self, rec.name, rec.definition.uuid)

    @_api
    def lookupByUUID(self, uuid: bytes) -> virDomain:
        import uuid as uuidlib

        return self.lookupByUUIDString(str(uuidlib.UUID(bytes=bytes(uuid))))

    @_api
    def defineXML(self, xml: str) -> virDomain:
        dom = self._driver.define(xml)
        return virDomain(self, dom.name, dom.uuid)

    @_api
    def defineXMLFlags(self, xml: str, flags: int = 0) -> virDomain:
        _check_flags(flags, VIR_DOMAIN_DEFINE_VALIDATE, "virDomainDefineXMLFlags")
        return self.defineXML(xml)

    @_api
    def createXML(self, xmlDesc: str, flags: int = 0) -> virDomain:
        _check_flags(
            flags, VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_VALIDATE, "virDomainCreateXML"
        )
        status = self._driver.create_transient(
            xmlDesc, paused=bool(flags & VIR_DOMAIN_START_PAUSED)
        )
        return virDomain(self, status.domain.name, status.domain.uuid)

    @_api
    def listAllDomains(self, flags: int = 0) -> list[virDomain]:
        _check_flags(flags, 0xFF, "virConnectListAllDomains")  # the filters virtshift knows
        out: list[virDomain] = []
        for name in self._driver.names():
            try:
                rec = self._driver.record(name)
            except VirtError:
                continue
            if _domain_matches(rec, flags):
                out.append(virDomain(self, rec.name, rec.definition.uuid))
        return out

    @_api
    def listDomainsID(self) -> list[int]:
        ids = []
        for name in self._driver.names():
            rec = self._driver.record(name)
            if rec.status is not None and rec.status.domain.id is not None:
                ids.append(rec.status.domain.id)
        return ids

    @_api
    def listDefinedDomains(self) -> list[str]:
        return [n for n in self._driver.names() if not self._driver.record(n).active]

    @_api
    def numOfDomains(self) -> int:
        return len(self.listDomainsID())

    @_api
    def numOfDefinedDomains(self) -> int:
        return len(self.listDefinedDomains())

    @_api
    def domainEventRegisterAny(
        self,
        dom: virDomain | None,
        eventID: int,
        cb: Any,
        opaque: Any,
    ) -> int:
        """Register a callback; block-job events (IDs 8 and 16) are delivered by
        ``virEventRunDefaultImpl``."""
        from virtshift.runtime.events import default_loop

        loop = default_loop()
        if loop is None:
            raise VirtError(
                ErrorCode.INTERNAL_ERROR,
                "could not find event loop: call virEventRegisterDefaultImpl() first",
            )
        if eventID not in (VIR_DOMAIN_EVENT_ID_BLOCK_JOB, VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2):
            raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, f"event {eventID} is not supported")
        ident = loop.register(self, dom, eventID, cb, opaque)
        self.domainEventCallbackID[ident] = opaque
        return ident

    @_api
    def domainEventDeregisterAny(self, callbackID: int) -> None:
        from virtshift.runtime.events import default_loop

        loop = default_loop()
        if loop is None or not loop.deregister(callbackID):
            raise VirtError(ErrorCode.INVALID_ARG, f"could not find event callback {callbackID}")
        self.domainEventCallbackID.pop(callbackID, None)

    @_api
    def getDomainCapabilities(
        self,
        emulatorbin: str | None = None,
        arch: str | None = None,
        machine: str | None = None,
        virttype: str | None = None,
        flags: int = 0,
    ) -> str:
        from virtshift.xml.caps import format_domain_caps

        emulator = emulatorbin or _default_emulator()
        caps = self._driver.probe_emulator(emulator)
        return format_domain_caps(
            caps, emulator=emulator, arch=arch or "x86_64", machine=machine, virttype=virttype
        )

    @_api
    def getCapabilities(self) -> str:
        from virtshift.xml.caps import format_host_caps

        emulator = _default_emulator()
        return format_host_caps(self._driver.probe_emulator(emulator), emulator=emulator)


def _default_emulator() -> str:
    import shutil

    from virtshift.runtime.driver import DEFAULT_EMULATOR

    return shutil.which(DEFAULT_EMULATOR) or DEFAULT_EMULATOR


def _domain_matches(rec: DomainRecord, flags: int) -> bool:
    state = rec.status.state if rec.status else DomainState.SHUTOFF
    groups = [
        (VIR_CONNECT_LIST_DOMAINS_ACTIVE, rec.active, VIR_CONNECT_LIST_DOMAINS_INACTIVE),
        (VIR_CONNECT_LIST_DOMAINS_PERSISTENT, rec.persistent, VIR_CONNECT_LIST_DOMAINS_TRANSIENT),
    ]
    for yes, value, no in groups:
        if flags & (yes | no) and not ((flags & yes and value) or (flags & no and not value)):
            return False
    state_bits = (
        VIR_CONNECT_LIST_DOMAINS_RUNNING
        | VIR_CONNECT_LIST_DOMAINS_PAUSED
        | VIR_CONNECT_LIST_DOMAINS_SHUTOFF
        | VIR_CONNECT_LIST_DOMAINS_OTHER
    )
    if flags & state_bits:
        bit = {
            DomainState.RUNNING: VIR_CONNECT_LIST_DOMAINS_RUNNING,
            DomainState.PAUSED: VIR_CONNECT_LIST_DOMAINS_PAUSED,
            DomainState.SHUTOFF: VIR_CONNECT_LIST_DOMAINS_SHUTOFF,
        }.get(state, VIR_CONNECT_LIST_DOMAINS_OTHER)
        if not flags & bit:
            return False
    return True


class virDomain:
    """A domain handle (by name and UUID; state is read fresh on every call)."""

    def __init__(self, conn: virConnect, name: str, uuid: str) -> None:
        self._conn = conn
        self._name = name
        self._uuid = uuid

    @property
    def _driver(self) -> Driver:
        return self._conn._driver

    def _record(self) -> DomainRecord:
        return self._driver.record(self._name)

    def connect(self) -> virConnect:
        return self._conn

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid

    def UUID(self) -> bytes:
        import uuid

        return uuid.UUID(self._uuid).bytes

    @_api
    def ID(self) -> int:
        rec = self._record()
        if rec.status is None or rec.status.domain.id is None:
            return -1
        return rec.status.domain.id

    @_api
    def isActive(self) -> int:
        return 1 if self._record().active else 0

    @_api
    def isPersistent(self) -> int:
        return 1 if self._record().persistent else 0

    @_api
    def state(self, flags: int = 0) -> list[int]:
        rec = self._record()
        if rec.status is None:
            return [VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_UNKNOWN]
        st = rec.status
        return [int(st.state), _STATE_REASON.get((st.state, st.reason), 0)]

    @_api
    def info(self) -> list[int]:
        rec = self._record()
        d = rec.definition
        state = int(rec.status.state) if rec.status else VIR_DOMAIN_SHUTOFF
        return [state, d.memory_kib, d.memory_kib if rec.active else 0, d.vcpu, 0]

    @_api
    def XMLDesc(self, flags: int = 0) -> str:
        from virtshift.xml.domain import format_domain

        _check_flags(
            flags,
            VIR_DOMAIN_XML_SECURE
            | VIR_DOMAIN_XML_INACTIVE
            | VIR_DOMAIN_XML_UPDATE_CPU
            | VIR_DOMAIN_XML_MIGRATABLE,
            "virDomainGetXMLDesc",
        )
        rec = self._record()
        if rec.status is not None and any(not j.state.ended for j in rec.status.jobs):
            # jobs may have moved on in QEMU: apply that if nobody holds the lock
            self._jobs.refresh(self._name)
            rec = self._record()
        if flags & VIR_DOMAIN_XML_INACTIVE:
            if rec.config is not None:
                return format_domain(rec.config, inactive=True)
            return format_domain(rec.definition, inactive=True)
        if rec.status is not None:
            return format_domain(rec.status.domain)
        return format_domain(rec.definition, inactive=True)

    @_api
    def create(self) -> int:
        self._driver.start(self._name)
        return 0

    @_api
    def createWithFlags(self, flags: int = 0) -> int:
        _check_flags(
            flags, VIR_DOMAIN_START_PAUSED | VIR_DOMAIN_START_VALIDATE, "virDomainCreateWithFlags"
        )
        self._driver.start(self._name, paused=bool(flags & VIR_DOMAIN_START_PAUSED))
        return 0

    @_api
    def destroy(self) -> int:
        self._driver.destroy(self._name)
        return 0

    @_api
    def destroyFlags(self, flags: int = 0) -> int:
        _check_flags(flags, VIR_DOMAIN_DESTROY_GRACEFUL, "virDomainDestroyFlags")
        self._driver.destroy(self._name)
        return 0

    @_api
    def suspend(self) -> int:
        self._driver.set_paused(self._name, True)
        return 0

    @_api
    def resume(self) -> int:
        self._driver.set_paused(self._name, False)
        return 0

    @_api
    def undefine(self) -> int:
        self._driver.undefine(self._name)
        return 0

    @_api
    def undefineFlags(self, flags: int = 0) -> int:
        _check_flags(
            flags,
            VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | VIR_DOMAIN_UNDEFINE_NVRAM
            | VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
            | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
            "virDomainUndefineFlags",
        )
        self._driver.undefine(
            self._name, snapshots_metadata=bool(flags & VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        )
        return 0

    # -- snapshots -----------------------------------------------------------------

    @property
    def _snapshots(self) -> Any:
        return self._conn._snapshot_service()

    @_api
    def snapshotCreateXML(self, xmlDesc: str, flags: int = 0) -> virDomainSnapshot:
        snap, kept = self._snapshots.create(self._name, xmlDesc, flags)
        return virDomainSnapshot(self, snap.name, _detached=None if kept else snap)

    @_api
    def snapshotLookupByName(self, name: str, flags: int = 0) -> virDomainSnapshot:
        _check_flags(flags, 0, "virDomainSnapshotLookupByName")
        self._snapshots.tree_with(self._name, name)
        return virDomainSnapshot(self, name)

    @_api
    def snapshotListNames(self, flags: int = 0) -> list[str]:
        tree, _defs = self._snapshots.load(self._record().name)
        return list(tree.list(flags))

    @_api
    def listAllSnapshots(self, flags: int = 0) -> list[virDomainSnapshot]:
        return [virDomainSnapshot(self, n) for n in self.snapshotListNames(flags)]

    @_api
    def snapshotNum(self, flags: int = 0) -> int:
        tree, _defs = self._snapshots.load(self._record().name)
        return int(tree.count(flags))

    @_api
    def snapshotCurrent(self, flags: int = 0) -> virDomainSnapshot:
        _check_flags(flags, 0, "virDomainSnapshotCurrent")
        tree, _defs = self._snapshots.load(self._record().name)
        return virDomainSnapshot(self, tree.current_node().name)

    @_api
    def hasCurrentSnapshot(self, flags: int = 0) -> int:
        _check_flags(flags, 0, "virDomainHasCurrentSnapshot")
        tree, _defs = self._snapshots.load(self._record().name)
        return 1 if tree.current is not None else 0

    # -- block jobs ------------------------------------------------------------------

    @property
    def _jobs(self) -> Any:
        return self._conn._job_service()

    @_api
    def blockPull(self, disk: str, bandwidth: int = 0, flags: int = 0) -> int:
        _check_flags(flags, VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES, "virDomainBlockPull")
        self._jobs.pull(self._name, disk, None, bandwidth, flags)
        return 0

    @_api
    def snapshotRebase(
        self, disk: str, base: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        """The proposal's virDomainSnapshotRebase: stream into the active layer
        everything above ``base``, which becomes its backing file (R8)."""
        _check_flags(flags, VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES, "virDomainSnapshotRebase")
        self._jobs.pull(self._name, disk, base, bandwidth, flags)
        return 0

    @_api
    def blockRebase(self, disk: str, base: str | None, bandwidth: int = 0, flags: int = 0) -> int:
        _check_flags(
            flags,
            VIR_DOMAIN_BLOCK_REBASE_SHALLOW
            | VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
            | VIR_DOMAIN_BLOCK_REBASE_COPY_RAW
            | VIR_DOMAIN_BLOCK_REBASE_COPY
            | VIR_DOMAIN_BLOCK_REBASE_RELATIVE
            | VIR_DOMAIN_BLOCK_REBASE_COPY_DEV
            | VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES,
            "virDomainBlockRebase",
        )
        if not flags & VIR_DOMAIN_BLOCK_REBASE_COPY:
            if flags & (
                VIR_DOMAIN_BLOCK_REBASE_SHALLOW
                | VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT
                | VIR_DOMAIN_BLOCK_REBASE_COPY_RAW
                | VIR_DOMAIN_BLOCK_REBASE_COPY_DEV
            ):
                raise VirtError(
                    ErrorCode.INVALID_ARG, "flags only valid with VIR_DOMAIN_BLOCK_REBASE_COPY"
                )
            self._jobs.pull(self._name, disk, base, bandwidth, flags)
            return 0
        from virtshift.model.domain import StorageSource

        if base is None:
            raise VirtError(ErrorCode.INVALID_ARG, "block copy needs a destination path")
        if flags & VIR_DOMAIN_BLOCK_REBASE_RELATIVE:
            raise VirtError(
                ErrorCode.ARGUMENT_UNSUPPORTED, "Relative backing during copy not supported yet"
            )
        dest = StorageSource(
            type="block" if flags & VIR_DOMAIN_BLOCK_REBASE_COPY_DEV else "file",
            path=base,
            format="raw" if flags & VIR_DOMAIN_BLOCK_REBASE_COPY_RAW else None,
        )
        speed = bandwidth if flags & VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES else bandwidth * _MIB
        from virtshift.ops.blockjob import bandwidth_bytes

        bandwidth_bytes(bandwidth, in_bytes=bool(flags & VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES))
        copy_flags = (
            VIR_DOMAIN_BLOCK_COPY_SHALLOW if flags & VIR_DOMAIN_BLOCK_REBASE_SHALLOW else 0
        ) | (VIR_DOMAIN_BLOCK_COPY_REUSE_EXT if flags & VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT else 0)
        self._jobs.copy(
            self._name,
            disk,
            dest,
            flags=copy_flags,
            bandwidth=speed,
            granularity=None,
            buf_size=None,
        )
        return 0

    @_api
    def blockCopy(
        self, disk: str, destxml: str, params: dict[str, Any] | None = None, flags: int = 0
    ) -> int:
        from virtshift.xml.domain import parse_disk_source

        if params is not None and not isinstance(params, dict):
            raise TypeError("block params must be a dictionary")
        _check_flags(
            flags,
            VIR_DOMAIN_BLOCK_COPY_SHALLOW
            | VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
            | VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
            | VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES,
            "virDomainBlockCopy",
        )
        params = params or {}
        unknown = set(params) - {"bandwidth", "granularity", "buf-size"}
        if unknown:
            raise VirtError(
                ErrorCode.INVALID_ARG, f"unsupported block copy parameter '{sorted(unknown)[0]}'"
            )
        for key in params:
            if not isinstance(params[key], int) or isinstance(params[key], bool):
                raise VirtError(
                    ErrorCode.INVALID_ARG, f"block copy parameter '{key}' must be an integer"
                )
        dest = parse_disk_source(destxml)
        self._jobs.copy(
            self._name,
            disk,
            dest,
            flags=flags,
            bandwidth=int(params.get("bandwidth", 0)),
            granularity=params.get("granularity"),
            buf_size=params.get("buf-size"),
        )
        return 0

    @_api
    def blockCommit(
        self, disk: str, base: str | None, top: str | None, bandwidth: int = 0, flags: int = 0
    ) -> int:
        _check_flags(
            flags,
            VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
            | VIR_DOMAIN_BLOCK_COMMIT_DELETE
            | VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
            | VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
            | VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES,
            "virDomainBlockCommit",
        )
        self._jobs.commit(self._name, disk, base, top, bandwidth, flags)
        return 0

    @_api
    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        _check_flags(
            flags,
            VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC | VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
            "virDomainBlockJobAbort",
        )
        self._jobs.abort_disk(
            self._name,
            disk,
            pivot=bool(flags & VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            asynchronous=bool(flags & VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC),
        )
        return 0

    @_api
    def blockJobInfo(self, path: str, flags: int = 0) -> dict[str, int]:
        _check_flags(flags, VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES, "virDomainGetBlockJobInfo")
        info = self._jobs.info(self._name, path)
        if info is None:
            return {}
        if not flags & VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES:
            info["bandwidth"] = info["bandwidth"] // _MIB
        return dict(info)

    @_api
    def blockJobSetSpeed(self, disk: str, bandwidth: int, flags: int = 0) -> int:
        from virtshift.ops.blockjob import bandwidth_bytes

        _check_flags(flags, VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES, "virDomainBlockJobSetSpeed")
        speed = bandwidth_bytes(
            bandwidth, in_bytes=bool(flags & VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
        )
        self._jobs.set_speed_disk(self._name, disk, speed)
        return 0

    @_api
    def blockInfo(self, path: str, flags: int = 0) -> list[int]:
        """[capacity, allocation, physical] of the disk's active layer."""
        _check_flags(flags, 0, "virDomainGetBlockInfo")
        return list(self._jobs.block_info(self._name, path))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, virDomain) and other._uuid == self._uuid

    def __hash__(self) -> int:
        return hash(self._uuid)

    def __repr__(self) -> str:
        return f"<virDomain {self._name!r}>"


class virDomainSnapshot:
    """A snapshot handle (by name; metadata is read fresh on every call).

    A snapshot taken with NO_METADATA is not in the tree; its handle keeps the
    definition it was created with, answers ``getName``/``getXMLDesc`` and
    ``hasMetadata() == 0``, and every tree call on it fails like libvirt's.
    """

    def __init__(self, dom: virDomain, name: str | None, *, _detached: Any = None) -> None:
        self._dom = dom
        self._conn = dom._conn
        self._name = name or ""
        self._detached = _detached

    def domain(self) -> virDomain:
        return self._dom

    def getDomain(self) -> virDomain:
        return self._dom

    def connect(self) -> virConnect:
        return self._conn

    def getConnect(self) -> virConnect:
        return self._conn

    def getName(self) -> str:
        return self._name

    def _def(self) -> Any:
        if self._detached is not None:
            return self._detached, None
        return self._dom._snapshots.get(self._dom.name(), self._name)

    def _tree(self) -> Any:
        """The tree (None for a snapshot without metadata); parses no definition."""
        if self._detached is not None:
            return None
        return self._dom._snapshots.tree_with(self._dom.name(), self._name)

    @_api
    def getXMLDesc(self, flags: int = 0) -> str:
        from virtshift.xml.snapshot import format_snapshot

        _check_flags(flags, VIR_DOMAIN_SNAPSHOT_XML_SECURE, "virDomainSnapshotGetXMLDesc")
        snap, _tree = self._def()
        return format_snapshot(snap, domain_uuid=self._dom.UUIDString())

    @_api
    def getParent(self, flags: int = 0) -> virDomainSnapshot:
        _check_flags(flags, 0, "virDomainSnapshotGetParent")
        tree = self._tree()
        if tree is None:
            raise VirtError(
                ErrorCode.NO_DOMAIN_SNAPSHOT, f"snapshot '{self._name}' has no metadata"
            )
        return virDomainSnapshot(self._dom, tree.parent_of(self._name).name)

    @_api
    def isCurrent(self, flags: int = 0) -> int:
        _check_flags(flags, 0, "virDomainSnapshotIsCurrent")
        tree = self._tree()
        return 1 if tree is not None and tree.current == self._name else 0

    @_api
    def hasMetadata(self, flags: int = 0) -> int:
        _check_flags(flags, 0, "virDomainSnapshotHasMetadata")
        if self._detached is not None:
            return 0
        self._tree()
        return 1

    @_api
    def listChildrenNames(self, flags: int = 0) -> list[str]:
        tree = self._tree()
        if tree is None:
            return []
        return list(tree.list(flags, of=self._name))

    @_api
    def listAllChildren(self, flags: int = 0) -> list[virDomainSnapshot]:
        return [virDomainSnapshot(self._dom, n) for n in self.listChildrenNames(flags)]

    @_api
    def numChildren(self, flags: int = 0) -> int:
        tree = self._tree()
        return 0 if tree is None else int(tree.count(flags, of=self._name))

    @_api
    def delete(self, flags: int = 0) -> int:
        if self._detached is not None:
            raise VirtError(
                ErrorCode.NO_DOMAIN_SNAPSHOT,
                f"no domain snapshot with matching name '{self._name}'",
            )
        self._dom._snapshots.delete(self._dom.name(), self._name, flags)
        return 0

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, virDomainSnapshot)
            and other._name == self._name
            and other._dom == self._dom
        )

    def __hash__(self) -> int:
        return hash((self._dom, self._name))

    def __repr__(self) -> str:
        return f"<virDomainSnapshot {self._name!r} of {self._dom.name()!r}>"
