"""``migrate-storage`` and ``migrate-storage-status``: the live storage migration verbs."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from virtshift.cli.main import _domain, _Fail, _run, cli

MIB = 1024 * 1024


def _domain_or_journal(ctx: click.Context, name: str) -> Any:
    """The domain; for a transient domain whose QEMU died (and which therefore no
    longer exists) a handle by name, so that its journal can still be resumed."""
    from virtshift import libvirt as lv
    from virtshift.cli.main import _conn
    from virtshift.migrate.engine import Migration

    try:
        return _domain(ctx, name)
    except lv.libvirtError as err:
        if err.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
            raise
        handle = lv.virDomain(_conn(ctx), name, "")
        j = Migration(handle).status()
        if j is None:
            raise
        return lv.virDomain(_conn(ctx), name, j.uuid)


def _print_journal(j: Any) -> None:
    click.echo(f"Domain:       {j.domain}")
    click.echo(f"Destination:  {j.dest}")
    click.echo(f"State:        {j.state}")
    for m in j.disks:
        click.echo(
            f"Disk {m.target}:     step {m.step.value}; consistent chain on the {m.consistent}"
        )
        click.echo(
            f"              {m.copied}/{len(m.layers)} layers copied, "
            f"{m.bytes_copied / MIB:.1f} MiB"
        )
    if j.events:
        click.echo("Timeline:")
        t0 = j.events[0][0]
        for t, text in j.events:
            click.echo(f"  {t - t0:8.3f}s  {text}")


@cli.command(name="migrate-storage")
@click.argument("domain")
@click.option("--dest", help="Destination directory (another storage domain).")
@click.option("--disk", "disks", multiple=True, help="Disk to move (repeat); default: all.")
@click.option("--bandwidth", type=int, default=0, help="Copy bandwidth limit, MiB/s.")
@click.option("--merge", is_flag=True, help="Afterwards stream the old top away (shorter chain).")
@click.option("--delete-source", is_flag=True, help="Afterwards remove the moved source files.")
@click.option(
    "--verify",
    type=click.Choice(["quick", "full"]),
    default="quick",
    help="quick: formats, sizes, chain; full: also compare contents.",
)
@click.option("--resume", is_flag=True, help="Finish an interrupted migration.")
@click.option("--abort", is_flag=True, help="Undo an interrupted migration (back to the source).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--verbose", is_flag=True, help="Show steps and copy progress.")
@click.pass_context
@_run
def migrate_storage(
    ctx: click.Context,
    /,
    domain: str,
    dest: str | None,
    disks: tuple[str, ...],
    bandwidth: int,
    merge: bool,
    delete_source: bool,
    verify: str,
    resume: bool,
    abort: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Move a running domain's disks to DEST, live, crash-safe, one storage domain
    always holding a consistent chain."""
    from virtshift import libvirt as lv
    from virtshift.errors import VirtError
    from virtshift.migrate.engine import Migration, describe

    if resume and abort:
        raise click.UsageError("--resume and --abort are mutually exclusive")
    if not (resume or abort) and not dest:
        raise click.UsageError("--dest is required (or --resume / --abort)")
    dom = _domain_or_journal(ctx, domain) if (resume or abort) else _domain(ctx, domain)
    bar: Any = None
    tasks: dict[str, Any] = {}
    t0 = time.monotonic()

    def progress(event: str, data: dict[str, Any]) -> None:
        nonlocal bar
        if not verbose:
            return
        if event == "step":
            click.echo(
                f"[{time.monotonic() - t0:7.2f}s] {data['disk']}: {data['step']} "
                f"({data['seconds']:.2f} s)",
                err=True,
            )
        elif event == "copy":
            if bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

                bar = Progress(
                    "{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    console=Console(stderr=True),
                )
                bar.start()
            key = data["layer"]
            if key not in tasks:
                tasks[key] = bar.add_task(
                    f"{data['disk']} {key.rsplit('/', 1)[-1]}", total=data["total"]
                )
            bar.update(tasks[key], completed=data["done"], total=data["total"])

    mig = Migration(dom, progress)
    try:
        if resume:
            j = mig.resume()
        elif abort:
            j = mig.abort()
        else:
            assert dest is not None
            j = mig.start(
                dest,
                disks=list(disks) or None,
                bandwidth=bandwidth * MIB,
                merge=merge,
                delete_source=delete_source,
                verify=verify,
            )
    except VirtError as err:
        raise lv.libvirtError._from(err) from err
    finally:
        if bar is not None:
            bar.stop()
    if as_json:
        click.echo(json.dumps(describe(j), indent=2))
        return
    if j.state == "done":
        moved = ", ".join(m.target for m in j.disks)
        click.echo(f"Storage of domain '{j.domain}' moved to {j.dest} ({moved})")
    else:
        click.echo(f"Storage migration of domain '{j.domain}' {j.state}")


@cli.command(name="migrate-storage-status")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True, help="Print the journal as JSON.")
@click.pass_context
@_run
def migrate_storage_status(ctx: click.Context, /, domain: str, as_json: bool) -> None:
    """The current or last storage migration of DOMAIN: steps, which storage
    domain holds the consistent chain, timeline."""
    from virtshift.migrate.engine import Migration, describe

    j = Migration(_domain_or_journal(ctx, domain)).status()
    if j is None:
        raise _Fail(f"domain '{domain}' has no storage migration", 3)
    if as_json:
        click.echo(json.dumps(describe(j), indent=2))
    else:
        _print_journal(j)
