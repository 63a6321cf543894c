"""The ``virtshift`` command line: virsh's verbs and flags on virtshift's library.

Output and errors follow virsh: tables with a dashed rule, ``error: <libvirt
message>`` on stderr and a non-zero exit status, no traceback.  Exit statuses:

====  ===========================================================
0     success
1     the operation failed (QEMU, files, anything else)
2     usage error (unknown verb or option)
3     no such domain or snapshot
4     invalid input: bad XML, bad argument, unsupported configuration
5     busy: another process holds the domain, a job is active, time-out
====  ===========================================================

Only argument parsing and printing live here; heavy modules are imported inside
the commands so that ``virtshift --help`` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from virtshift import __version__

if TYPE_CHECKING:
    from virtshift import libvirt as lv

_F = TypeVar("_F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_BUSY = 5

_EXIT_BY_CODE = {
    42: EXIT_NOT_FOUND, 72: EXIT_NOT_FOUND,
    8: EXIT_INVALID, 27: EXIT_INVALID, 35: EXIT_INVALID, 67: EXIT_INVALID, 74: EXIT_INVALID,
    92: EXIT_INVALID, 5: EXIT_INVALID,
    68: EXIT_BUSY, 83: EXIT_BUSY, 87: EXIT_BUSY,
}  # fmt: skip


class _Fail(click.ClickException):
    """An error already worded for the user, with its exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        # virsh follows an error with an empty line, as it does a command's output
        click.echo(f"error: {self.message}\n", err=True)


def _run(fn: _F) -> _F:
    """Map libvirtError (and OS errors) to ``error: ...`` and an exit status."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from virtshift.libvirt import libvirtError

        try:
            return fn(*args, **kwargs)
        except libvirtError as err:
            code = err.get_error_code() or 1
            raise _Fail(str(err), _EXIT_BY_CODE.get(code, EXIT_FAILED)) from err
        except OSError as err:
            raise _Fail(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "), 1) from err

    return wrapper  # type: ignore[return-value]


def _conn(ctx: click.Context) -> lv.virConnect:
    from virtshift import libvirt

    obj = ctx.find_root().obj
    if obj.get("conn") is None:
        obj["conn"] = libvirt.open(obj.get("uri"))
    return obj["conn"]  # type: ignore[no-any-return]


def _domain(ctx: click.Context, name: str) -> lv.virDomain:
    """Look a domain up by name, then UUID, like virsh."""
    from virtshift import libvirt

    conn = _conn(ctx)
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN or len(name) != 36:
            raise
        try:
            return conn.lookupByUUIDString(name)
        except libvirt.libvirtError:
            raise err from None


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4 * 1024 * 1024)
    except UnicodeDecodeError as err:
        raise _Fail(f"file '{path}' is not UTF-8 text", EXIT_INVALID) from err
    except OSError as err:
        raise _Fail(f"Failed to open file '{path}': {err.strerror}", EXIT_FAILED) from err


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A virsh-style table, then the blank line virsh prints after a command."""
    from virtshift.text import render_table

    click.echo(render_table(headers, rows))


_HELP = """virtshift: live disk snapshots and storage migration for QEMU, with virsh's verbs.

\b
URIs: qemu:///session (default, per-user data directory) or
      qemu:///embed?root=DIR (every file of the driver under DIR).
\b
Exit status: 0 ok, 1 failed, 2 usage, 3 no such domain/snapshot,
             4 invalid input, 5 busy (locked, job active, time-out).
"""


#: Verbs defined in their own modules, imported only when one of them is run or
#: listed (``--version`` and the verbs of this module import none of them).
LAZY_VERBS: dict[str, str] = {
    **dict.fromkeys(
        ("blockcommit", "blockcopy", "blockjob", "blockpull", "domblkinfo"),
        "virtshift.cli.blockjob",
    ),
    **dict.fromkeys(("migrate-storage", "migrate-storage-status"), "virtshift.cli.migrate"),
    **dict.fromkeys(
        (
            "snapshot-create",
            "snapshot-create-as",
            "snapshot-current",
            "snapshot-delete",
            "snapshot-dumpxml",
            "snapshot-info",
            "snapshot-list",
            "snapshot-parent",
        ),
        "virtshift.cli.snapshot",
    ),
}


class _LazyGroup(click.Group):
    """A group whose verbs in :data:`LAZY_VERBS` register themselves (on import
    of their module) the first time they are looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_VERBS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = LAZY_VERBS.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            import importlib

            importlib.import_module(module)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--connect", "uri", metavar="URI", help="Connection URI.")
@click.option("-d", "--debug", is_flag=True, help="Log QMP traffic and driver steps to stderr.")
@click.version_option(__version__, "-v", "--version", prog_name="virtshift", message="%(version)s")
@click.pass_context
def cli(ctx: click.Context, uri: str | None, debug: bool) -> None:
    ctx.obj = {"uri": uri, "conn": None}
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


# -- domains ------------------------------------------------------------------


@cli.command()
@click.argument("file", metavar="FILE")
@click.option("--validate", is_flag=True, help="Validate the XML (accepted; always checked).")
@click.pass_context
@_run
def define(ctx: click.Context, file: str, validate: bool) -> None:
    """Define a persistent domain from an XML file."""
    dom = _conn(ctx).defineXML(_read_file(file))
    click.echo(f"Domain '{dom.name()}' defined from {file}\n")


@cli.command()
@click.argument("file", metavar="FILE")
@click.option("--paused", is_flag=True, help="Leave the guest paused after start.")
@click.pass_context
@_run
def create(ctx: click.Context, file: str, paused: bool) -> None:
    """Create and start a transient domain from an XML file."""
    from virtshift import libvirt

    flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
    dom = _conn(ctx).createXML(_read_file(file), flags)
    click.echo(f"Domain '{dom.name()}' created from {file}\n")


@cli.command()
@click.argument("domain")
@click.option("--paused", is_flag=True, help="Leave the guest paused after start.")
@click.pass_context
@_run
def start(ctx: click.Context, domain: str, paused: bool) -> None:
    """Start a defined domain (real qemu-system-x86_64)."""
    from virtshift import libvirt

    dom = _domain(ctx, domain)
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
    click.echo(f"Domain '{dom.name()}' started\n")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def destroy(ctx: click.Context, domain: str) -> None:
    """Stop a domain's QEMU at once."""
    dom = _domain(ctx, domain)
    dom.destroy()
    click.echo(f"Domain '{dom.name()}' destroyed\n")


@cli.command()
@click.argument("domain")
@click.option("--snapshots-metadata", is_flag=True, help="Also remove snapshot metadata.")
@click.pass_context
@_run
def undefine(ctx: click.Context, domain: str, snapshots_metadata: bool) -> None:
    """Remove a persistent definition (a running domain becomes transient)."""
    from virtshift import libvirt

    dom = _domain(ctx, domain)
    flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA if snapshots_metadata else 0
    dom.undefineFlags(flags)
    click.echo(f"Domain '{dom.name()}' has been undefined\n")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def suspend(ctx: click.Context, domain: str) -> None:
    """Pause the guest's vCPUs."""
    dom = _domain(ctx, domain)
    dom.suspend()
    click.echo(f"Domain '{dom.name()}' suspended\n")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def resume(ctx: click.Context, domain: str) -> None:
    """Resume a paused guest."""
    dom = _domain(ctx, domain)
    dom.resume()
    click.echo(f"Domain '{dom.name()}' resumed\n")


def _state_label(state: int) -> str:
    from virtshift.model.status import DomainState

    return DomainState(state).label


@cli.command(name="list")
@click.option("--all", "all_", is_flag=True, help="Active and inactive domains.")
@click.option("--inactive", is_flag=True, help="Inactive domains only.")
@click.option("--transient", is_flag=True, help="Transient domains only.")
@click.option("--persistent", is_flag=True, help="Persistent domains only.")
@click.option("--name", "name_only", is_flag=True, help="Print names only.")
@click.option("--uuid", "uuid_only", is_flag=True, help="Print UUIDs only.")
@click.pass_context
@_run
def list_(
    ctx: click.Context,
    all_: bool,
    inactive: bool,
    transient: bool,
    persistent: bool,
    name_only: bool,
    uuid_only: bool,
) -> None:
    """List domains (running ones unless --all or --inactive)."""
    from virtshift import libvirt

    flags = 0
    if inactive:
        flags |= libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE
    elif not all_:
        flags |= libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    if transient:
        flags |= libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT
    if persistent:
        flags |= libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
    doms = _conn(ctx).listAllDomains(flags)
    if name_only or uuid_only:
        for d in doms:
            click.echo(d.name() if name_only else d.UUIDString())
        click.echo("")
        return
    rows = []
    for d in doms:
        did = d.ID()
        rows.append([str(did) if did >= 0 else "-", d.name(), _state_label(d.state()[0])])
    rows.sort(key=lambda r: (r[0] == "-", int(r[0]) if r[0] != "-" else 0, r[1]))
    print_table(["Id", "Name", "State"], rows)


@cli.command()
@click.argument("domain")
@click.option("--reason", is_flag=True, help="Also print the reason.")
@click.pass_context
@_run
def domstate(ctx: click.Context, domain: str, reason: bool) -> None:
    """Print the domain's state."""
    dom = _domain(ctx, domain)
    st, _why = dom.state()
    word = ""
    if reason:
        rec = _conn(ctx)._driver.record(dom.name())
        word = f" ({rec.status.reason if rec.status else 'unknown'})"
    click.echo(_state_label(st) + word + "\n")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def dominfo(ctx: click.Context, domain: str) -> None:
    """Basic information about a domain."""
    dom = _domain(ctx, domain)
    state, maxmem, _mem, vcpus, _cpu = dom.info()
    did = dom.ID()
    rows = [
        ("Id", str(did) if did >= 0 else "-"),
        ("Name", dom.name()),
        ("UUID", dom.UUIDString()),
        ("OS Type", "hvm"),
        ("State", _state_label(state)),
        ("CPU(s)", str(vcpus)),
        ("Max memory", f"{maxmem} KiB"),
        ("Persistent", "yes" if dom.isPersistent() else "no"),
    ]
    for k, v in rows:
        click.echo(f"{k + ':':<16}{v}")
    click.echo("")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def domuuid(ctx: click.Context, domain: str) -> None:
    """Print the domain's UUID."""
    click.echo(_domain(ctx, domain).UUIDString() + "\n")


@cli.command()
@click.argument("domain")
@click.pass_context
@_run
def domid(ctx: click.Context, domain: str) -> None:
    """Print the domain's id (running domains only)."""
    did = _domain(ctx, domain).ID()
    click.echo((str(did) if did >= 0 else "-") + "\n")


@cli.command()
@click.argument("domain")
@click.option("--inactive", is_flag=True, help="The persistent definition, not the live one.")
@click.option("--security-info", is_flag=True, help="Include security-sensitive data.")
@click.option("--update-cpu", is_flag=True, help="Accepted for virsh compatibility.")
@click.option("--migratable", is_flag=True, help="Accepted for virsh compatibility.")
@click.pass_context
@_run
def dumpxml(
    ctx: click.Context,
    domain: str,
    inactive: bool,
    security_info: bool,
    update_cpu: bool,
    migratable: bool,
) -> None:
    """Print the domain XML (live: aliases, backing chains, mirrors)."""
    from virtshift import libvirt

    flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | (
        libvirt.VIR_DOMAIN_XML_SECURE if security_info else 0
    )
    click.echo(_domain(ctx, domain).XMLDesc(flags), nl=False)


@cli.command()
@click.argument("domain")
@click.option("--inactive", is_flag=True, help="Disks of the persistent definition.")
@click.option("--details", is_flag=True, help="Also print type and device.")
@click.pass_context
@_run
def domblklist(ctx: click.Context, domain: str, inactive: bool, details: bool) -> None:
    """List the domain's disks."""
    from virtshift import libvirt
    from virtshift.xml.domain import parse_domain

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    dom = parse_domain(_domain(ctx, domain).XMLDesc(flags))
    rows = []
    for d in dom.disks:
        src = d.source.path or (
            f"{d.source.protocol}/{d.source.name}" if d.source.protocol else "-"
        )
        rows.append([d.type, d.device, d.target, src] if details else [d.target, src])
    headers = ["Type", "Device", "Target", "Source"] if details else ["Target", "Source"]
    print_table(headers, rows)


@cli.command()
@click.argument("domain", required=False)
@click.option("--emulatorbin", help="Emulator binary to describe.")
@click.option("--arch", help="Guest architecture.")
@click.option("--machine", help="Machine type.")
@click.option("--virttype", help="Virtualization type (qemu, kvm).")
@click.pass_context
@_run
def domcapabilities(
    ctx: click.Context,
    domain: str | None,
    emulatorbin: str | None,
    arch: str | None,
    machine: str | None,
    virttype: str | None,
) -> None:
    """What QEMU offers (transaction, mirror, ...), for a domain or an emulator.

    With DOMAIN: the capabilities probed when it started (or of its emulator
    when it is shut off).
    """
    from virtshift.xml.caps import format_domain_caps

    conn = _conn(ctx)
    if domain is not None:
        dom = _domain(ctx, domain)
        caps = conn._driver.caps_for(dom.name())
        d = conn._driver.record(dom.name()).definition
        click.echo(
            format_domain_caps(
                caps,
                emulator=d.emulator or emulatorbin or "qemu-system-x86_64",
                arch=d.arch or arch or "x86_64",
                machine=d.machine or machine,
                virttype=d.type,
            ),
            nl=False,
        )
        return
    click.echo(conn.getDomainCapabilities(emulatorbin, arch, machine, virttype), nl=False)


@cli.command()
@click.pass_context
@_run
def capabilities(ctx: click.Context) -> None:
    """Host and QEMU capabilities."""
    click.echo(_conn(ctx).getCapabilities(), nl=False)


@cli.command(name="qemu-monitor-command")
@click.argument("domain")
@click.argument("command", nargs=-1, required=True)
@click.option("--hmp", is_flag=True, help="COMMAND is an HMP command line, not QMP JSON.")
@click.option("--pretty", is_flag=True, help="Pretty-print the QMP reply.")
@click.pass_context
@_run
def qemu_monitor_command(
    ctx: click.Context, domain: str, command: tuple[str, ...], hmp: bool, pretty: bool
) -> None:
    """Pass a QMP or HMP command to the domain's QEMU."""
    import json

    from virtshift import libvirt_qemu

    dom = _domain(ctx, domain)
    text = " ".join(command)
    flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
    out = libvirt_qemu.qemuMonitorCommand(dom, text, flags)
    if pretty and not hmp:
        out = json.dumps(json.loads(out), indent=2)
    click.echo(out)


@cli.command()
@click.pass_context
@_run
def uri(ctx: click.Context) -> None:
    """Print the connection URI."""
    click.echo(_conn(ctx).getURI() + "\n")


@cli.command()
@click.pass_context
@_run
def version(ctx: click.Context) -> None:
    """Versions of virtshift and of QEMU."""
    conn = _conn(ctx)
    click.echo(f"Compiled against library: virtshift {__version__}")
    click.echo(f"Using library: virtshift {__version__}")
    click.echo("Using API: QEMU")
    v = conn.getVersion()
    click.echo(f"Running hypervisor: QEMU {v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}\n")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo's files (printed at the end).")
@_run
def demo(keep: bool) -> None:
    """The main job: a live storage migration of two disks while the guest writes."""
    from virtshift.cli.demo import run_demo

    rc = run_demo(keep=keep)
    if rc:
        raise _Fail("demo failed", rc)


def _long_globals(args: list[str]) -> list[str]:
    """``args`` with the leading ``-c URI`` / ``-d`` in their long forms.

    click first looks a short option up as a long one and, when that fails,
    builds a "no such option" error with difflib's suggestions, importing
    difflib (about 6 ms of every start that gives ``-c``)."""
    out = list(args)
    i = 0
    while i < len(out) and out[i] in ("-c", "-d"):
        if out[i] == "-d":
            out[i] = "--debug"
            i += 1
        elif i + 1 < len(out):
            out[i] = "--connect"
            i += 2
        else:  # no URI follows: click's error then names -c as typed
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``virtshift`` console script."""
    args = _long_globals(list(argv) if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=args, prog_name="virtshift", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return EXIT_FAILED
    except _Fail as err:
        err.show()
        return err.exit_code
    except click.UsageError as err:
        err.show()
        return EXIT_USAGE
    except click.ClickException as err:
        err.show()
        return EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return EXIT_FAILED
    except Exception as err:  # a bug of ours: say so, without a traceback
        import logging

        logging.getLogger("virtshift").debug("unexpected error", exc_info=True)
        click.echo(f"error: internal error: {type(err).__name__}: {err}", err=True)
        return EXIT_FAILED
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
