"""libvirt_qemu's pass-through to QEMU's monitors.

``qemuMonitorCommand(domain, cmd, flags)`` sends ``cmd`` as QMP JSON (flags 0)
and returns the reply as JSON text, or runs it as an HMP command line (flags
``VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP`` = 1) and returns its output, as
libvirt_qemu does.  The call holds the domain's lock like any change, because
a pass-through command may change anything.
"""

from __future__ import annotations

import json

from virtshift.errors import ErrorCode, VirtError
from virtshift.libvirt import _api, _check_flags, virDomain

__all__ = ["VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT", "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP",
           "qemuMonitorCommand"]  # fmt: skip

VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT = 0
VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP = 1


@_api
def qemuMonitorCommand(domain: virDomain, cmd: str, flags: int = 0) -> str:
    """Run a QMP (flags 0) or HMP (flags 1) command on the domain's QEMU."""
    _check_flags(flags, VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP, "virDomainQemuMonitorCommand")
    if not isinstance(cmd, str) or not cmd.strip():
        raise VirtError(ErrorCode.INVALID_ARG, "monitor command must be a non-empty string")
    with domain._driver.monitor(domain.name(), "monitor command") as (_rec, mon):
        if flags & VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP:
            out = mon.execute("human-monitor-command", {"command-line": cmd})
            return str(out)
        return json.dumps(mon.execute_raw(cmd))
