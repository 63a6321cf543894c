"""Errors of virtshift, with libvirt's error numbers.

Every failure a caller can see is a :class:`VirtError`.  Its ``code`` is an
:class:`ErrorCode` with libvirt's ``virErrorNumber`` value, and its message is
built the way libvirt builds it: ``"<generic text of the code>: <detail>"``
(for example ``Domain not found: no domain with matching name 'vm1'``).  The
facade (:mod:`virtshift.libvirt`) re-raises these as ``libvirtError``; the CLI
prints ``error: <message>`` and exits with a status derived from the code.

Hierarchy::

    Exception
     +-- VirtError                 code, detail, message; every user-facing failure
          +-- NoDomain             NO_DOMAIN (42): lookups by name or UUID
          +-- NoDomainSnapshot     NO_DOMAIN_SNAPSHOT (72)
          +-- QMPError             a QMP command failed; keeps what was sent and received

This module does not log, format for terminals or know about QEMU processes.
"""

from __future__ import annotations

import enum
from typing import Any, Final

__all__ = ["ErrorCode", "ErrorDomain", "NoDomain", "NoDomainSnapshot", "QMPError", "VirtError"]


class ErrorCode(enum.IntEnum):
    """libvirt's ``virErrorNumber`` values (only those virtshift raises or maps)."""

    OK = 0
    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    NO_CONNECT = 5
    INVALID_CONN = 6
    INVALID_DOMAIN = 7
    INVALID_ARG = 8
    OPERATION_FAILED = 9
    XML_ERROR = 27
    DOM_EXIST = 28
    OPERATION_DENIED = 29
    OPEN_FAILED = 30
    XML_DETAIL = 35
    SYSTEM_ERROR = 38
    NO_DOMAIN = 42
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    INVALID_DOMAIN_SNAPSHOT = 71
    NO_DOMAIN_SNAPSHOT = 72
    ARGUMENT_UNSUPPORTED = 74
    OPERATION_ABORTED = 78
    OVERFLOW = 82
    BLOCK_COPY_ACTIVE = 83
    OPERATION_UNSUPPORTED = 84
    AGENT_UNRESPONSIVE = 86
    RESOURCE_BUSY = 87
    XML_INVALID_SCHEMA = 92
    DEVICE_MISSING = 99


class ErrorDomain(enum.IntEnum):
    """libvirt's ``virErrorDomain`` values used by virtshift."""

    NONE = 0
    CONF = 9
    QEMU = 10
    STORAGE = 18
    DOMAIN = 20
    DOMAIN_SNAPSHOT = 35


#: The generic text libvirt puts in front of the detail, per code.  Codes
#: missing here use the detail alone (libvirt does the same for XML_DETAIL).
_GENERIC: Final[dict[ErrorCode, str]] = {
    ErrorCode.INTERNAL_ERROR: "internal error",
    ErrorCode.NO_SUPPORT: "this function is not supported by the connection driver",
    ErrorCode.NO_CONNECT: "no connection driver available for",
    ErrorCode.INVALID_CONN: "invalid connection pointer in",
    ErrorCode.INVALID_ARG: "invalid argument",
    ErrorCode.OPERATION_FAILED: "operation failed",
    ErrorCode.XML_ERROR: "XML error",
    ErrorCode.DOM_EXIST: "operation failed",
    ErrorCode.OPERATION_DENIED: "operation forbidden",
    ErrorCode.OPEN_FAILED: "failed to open",
    ErrorCode.NO_DOMAIN: "Domain not found",
    ErrorCode.OPERATION_INVALID: "Requested operation is not valid",
    ErrorCode.CONFIG_UNSUPPORTED: "unsupported configuration",
    ErrorCode.OPERATION_TIMEOUT: "Timed out during operation",
    ErrorCode.INVALID_DOMAIN_SNAPSHOT: "Invalid domain snapshot",
    ErrorCode.NO_DOMAIN_SNAPSHOT: "Domain snapshot not found",
    ErrorCode.ARGUMENT_UNSUPPORTED: "argument unsupported",
    ErrorCode.OPERATION_ABORTED: "operation aborted",
    ErrorCode.OVERFLOW: "numerical overflow",
    ErrorCode.BLOCK_COPY_ACTIVE: "block copy still active",
    ErrorCode.OPERATION_UNSUPPORTED: "Operation not supported",
    ErrorCode.AGENT_UNRESPONSIVE: "Guest agent is not responding",
    ErrorCode.RESOURCE_BUSY: "resource busy",
    ErrorCode.XML_INVALID_SCHEMA: "XML document failed to validate against schema",
    ErrorCode.DEVICE_MISSING: "device not found",
}


class VirtError(Exception):
    """A failure with a libvirt error code.

    :param code: libvirt's error number.
    :param detail: what went wrong, naming the object ("disk 'vda' ...").
    :param domain: libvirt's error domain (where the error comes from).
    :param cause: the lower-level exception, if any (also chained with ``from``).
    """

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        *,
        domain: ErrorDomain = ErrorDomain.QEMU,
        cause: BaseException | None = None,
    ) -> None:
        self.code: ErrorCode = code
        self.detail: str = detail
        self.domain: ErrorDomain = domain
        self.cause: BaseException | None = cause
        generic = _GENERIC.get(code)
        if generic and detail:
            sep = " " if generic.endswith((" for", " in")) else ": "
            self.message: str = f"{generic}{sep}{detail}"
        else:
            self.message = detail or generic or ""
        super().__init__(self.message)


class NoDomain(VirtError):
    """No domain of that name or UUID (NO_DOMAIN, 42)."""

    def __init__(self, name: str) -> None:
        super().__init__(ErrorCode.NO_DOMAIN, f"no domain with matching name '{name}'")


class NoDomainSnapshot(VirtError):
    """No snapshot of that name, or no parent/current one (NO_DOMAIN_SNAPSHOT, 72)."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.NO_DOMAIN_SNAPSHOT, detail, domain=ErrorDomain.DOMAIN_SNAPSHOT)


class QMPError(VirtError):
    """A QMP command answered with an error, or the monitor went away.

    Users see the command name and QEMU's ``desc``; the full exchange is kept in
    :attr:`sent` and :attr:`received` for the debug log.  :attr:`unanswered` is
    true when no reply came (connection lost, time-out): QEMU may or may not
    have carried the command out, and the caller must look before it undoes
    anything.
    """

    def __init__(
        self,
        command: str,
        desc: str,
        *,
        error_class: str | None = None,
        sent: dict[str, Any] | None = None,
        received: dict[str, Any] | None = None,
        code: ErrorCode = ErrorCode.INTERNAL_ERROR,
    ) -> None:
        self.command: str = command
        self.desc: str = desc
        self.error_class: str | None = error_class
        self.sent: dict[str, Any] | None = sent
        self.received: dict[str, Any] | None = received
        #: True when QEMU's reply never came: the command may have run.
        self.unanswered: bool = error_class is None and received is None
        detail = f"unable to execute QEMU command '{command}': {desc}"
        super().__init__(code, detail)
