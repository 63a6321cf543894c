"""virsh's snapshot verbs: snapshot-create(-as), -list, -info, -dumpxml, -current,
-parent, -delete.  Parsing and printing only; the work is the library's."""

from __future__ import annotations

from typing import Any

import click

from virtshift.cli.main import EXIT_NOT_FOUND, _domain, _Fail, _read_file, _run, cli


def _create_flags(**opts: bool) -> int:
    from virtshift import libvirt as lv

    table = {
        "redefine": lv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE,
        "current": lv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
        "no_metadata": lv.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA,
        "halt": lv.VIR_DOMAIN_SNAPSHOT_CREATE_HALT,
        "disk_only": lv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY,
        "reuse_external": lv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT,
        "quiesce": lv.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE,
        "atomic": lv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
        "live": lv.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE,
        "validate": lv.VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE,
    }
    flags = 0
    for key, value in opts.items():
        if value:
            flags |= table[key]
    return flags


_COMMON = [
    click.option("--no-metadata", is_flag=True, help="Take the snapshot, keep no metadata."),
    click.option("--halt", is_flag=True, help="Halt after the snapshot (unsupported)."),
    click.option("--disk-only", is_flag=True, help="Disks only, no memory state."),
    click.option("--reuse-external", is_flag=True, help="Overlays exist: open them as they are."),
    click.option("--quiesce", is_flag=True, help="Freeze guest file systems (guest agent)."),
    click.option("--atomic", is_flag=True, help="All disks or none."),
    click.option("--live", is_flag=True, help="Live full-system snapshot (unsupported)."),
    click.option("--validate", is_flag=True, help="Validate the XML against the schema."),
]


def _common(fn: Any) -> Any:
    for opt in reversed(_COMMON):
        fn = opt(fn)
    return fn


@cli.command(name="snapshot-create")
@click.argument("domain")
@click.argument("xmlfile", required=False)
@click.option("--redefine", is_flag=True, help="Redefine metadata of an existing snapshot.")
@click.option("--current", is_flag=True, help="With --redefine: make it current.")
@_common
@click.pass_context
@_run
def snapshot_create(ctx: click.Context, /, domain: str, xmlfile: str | None, **opts: bool) -> None:
    """Create a snapshot from <domainsnapshot> XML (a bare one without XMLFILE)."""
    dom = _domain(ctx, domain)
    xml = _read_file(xmlfile) if xmlfile else "<domainsnapshot/>"
    snap = dom.snapshotCreateXML(xml, _create_flags(**opts))
    if opts.get("redefine"):
        click.echo(f"Snapshot {snap.getName()} redefined\n")
    elif xmlfile:
        click.echo(f"Domain snapshot {snap.getName()} created from '{xmlfile}'\n")
    else:
        click.echo(f"Domain snapshot {snap.getName()} created\n")


@cli.command(
    name="snapshot-create-as",
    context_settings={"ignore_unknown_options": True},
    epilog="DISKSPEC (positional or --diskspec, repeatable, kept in command-line order): "
    "DISK[,snapshot=MODE][,driver=FMT][,stype=file|block][,file=PATH]; ',,' escapes a comma.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--domain", "domain_opt", help="Domain name (or give it first).")
@click.option("--name", help="Snapshot name (default: the creation time).")
@click.option("--description", help="Description.")
@click.option("--print-xml", is_flag=True, help="Print the XML instead of creating.")
@click.option("--memspec", help="Memory: [file=]PATH[,snapshot=MODE].")
@_common
@click.pass_context
@_run
def snapshot_create_as(
    ctx: click.Context,
    /,
    args: tuple[str, ...],
    domain_opt: str | None,
    name: str | None,
    description: str | None,
    print_xml: bool,
    memspec: str | None,
    **opts: bool,
) -> None:
    """Create a snapshot from arguments: DOMAIN [NAME] [DESCRIPTION] [DISKSPEC]..."""
    from virtshift.cli.snapshot_args import build_snapshot_xml

    positional: list[str] = []
    specs: list[tuple[int, str]] = []  # (position, spec): virsh keeps command-line order
    tokens = list(args)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--diskspec":
            if i + 1 >= len(tokens):
                raise click.UsageError("Option '--diskspec' requires an argument.")
            specs.append((i, tokens[i + 1]))
            i += 2
            continue
        if tok.startswith("--diskspec="):
            specs.append((i, tok.split("=", 1)[1]))
        elif tok.startswith("--"):
            raise click.UsageError(f"No such option: {tok}")
        else:
            positional.append(tok)
            specs.append((i, "\0positional"))
        i += 1
    domain = domain_opt
    pos = iter(positional)
    used = 0
    if domain is None:
        domain = next(pos, None)
        used += 1
        if domain is None:
            raise click.UsageError("Missing argument 'DOMAIN'.")
    if name is None:
        name = next(pos, None)
        used += 1 if name is not None else 0
    if description is None:
        description = next(pos, None)
        used += 1 if description is not None else 0
    rest = iter(positional[used:])
    ordered: list[str] = []
    skipped = 0
    for _i, spec in specs:
        if spec == "\0positional":
            if skipped < used:
                skipped += 1
                continue
            ordered.append(next(rest))
        else:
            ordered.append(spec)
    xml = build_snapshot_xml(
        name=name,
        description=description,
        diskspecs=ordered,
        memspec=memspec,
        disk_only=bool(opts.get("disk_only")),
    )
    if print_xml:
        click.echo(xml)
        return
    snap = _domain(ctx, domain).snapshotCreateXML(xml, _create_flags(**opts))
    click.echo(f"Domain snapshot {snap.getName()} created\n")


def _pick(ctx: click.Context, domain: str, name: str | None, current: bool) -> Any:
    dom = _domain(ctx, domain)
    if current or name is None:
        return dom, dom.snapshotCurrent()
    return dom, dom.snapshotLookupByName(name)


@cli.command(name="snapshot-list")
@click.argument("domain")
@click.option("--parent", is_flag=True, help="Add a Parent column.")
@click.option("--roots", is_flag=True, help="Only snapshots without a parent.")
@click.option("--leaves", is_flag=True, help="Only snapshots without children.")
@click.option("--no-leaves", is_flag=True, help="Only snapshots with children.")
@click.option("--metadata", is_flag=True, help="Only snapshots with metadata.")
@click.option("--no-metadata", is_flag=True, help="Only snapshots without metadata.")
@click.option("--inactive", is_flag=True, help="Only snapshots of a shut-off domain.")
@click.option("--active", is_flag=True, help="Only snapshots of a running domain.")
@click.option("--disk-only", is_flag=True, help="Only disk-only snapshots.")
@click.option("--internal", is_flag=True, help="Only internal snapshots.")
@click.option("--external", is_flag=True, help="Only external snapshots.")
@click.option("--tree", is_flag=True, help="Show the snapshot tree.")
@click.option("--from", "from_", metavar="SNAPSHOT", help="Children of SNAPSHOT.")
@click.option("--current", is_flag=True, help="Children of the current snapshot.")
@click.option("--descendants", is_flag=True, help="With --from/--current: all descendants.")
@click.option("--name", "names_only", is_flag=True, help="Names only.")
@click.option("--topological", is_flag=True, help="Parents before children.")
@click.pass_context
@_run
def snapshot_list(ctx: click.Context, /, domain: str, **o: Any) -> None:
    """List a domain's snapshots."""
    from virtshift import libvirt as lv
    from virtshift.model.snaptree import render_list, render_names, render_tree

    dom = _domain(ctx, domain)
    svc = dom._snapshots
    tree, _defs = svc.load(dom.name())
    start = o["from_"]
    if o["current"]:
        start = tree.current_node().name
    if o["tree"]:
        click.echo(render_tree(tree, start=start))
        return
    bits = {
        "roots": lv.VIR_DOMAIN_SNAPSHOT_LIST_ROOTS,
        "leaves": lv.VIR_DOMAIN_SNAPSHOT_LIST_LEAVES,
        "no_leaves": lv.VIR_DOMAIN_SNAPSHOT_LIST_NO_LEAVES,
        "metadata": lv.VIR_DOMAIN_SNAPSHOT_LIST_METADATA,
        "no_metadata": lv.VIR_DOMAIN_SNAPSHOT_LIST_NO_METADATA,
        "inactive": lv.VIR_DOMAIN_SNAPSHOT_LIST_INACTIVE,
        "active": lv.VIR_DOMAIN_SNAPSHOT_LIST_ACTIVE,
        "disk_only": lv.VIR_DOMAIN_SNAPSHOT_LIST_DISK_ONLY,
        "internal": lv.VIR_DOMAIN_SNAPSHOT_LIST_INTERNAL,
        "external": lv.VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL,
        "topological": lv.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL,
    }
    flags = 0
    for key, bit in bits.items():
        if o[key]:
            flags |= bit
    if start is not None:
        if o["roots"]:
            raise _Fail("--roots and --from are mutually exclusive", 2)
        if o["descendants"]:
            flags |= lv.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS
        names = tree.list(flags, of=start)
    else:
        names = tree.list(flags)
    if o["names_only"]:
        parents = {n: tree.get(n).parent for n in names} if o["parent"] else None
        click.echo(render_names(names, parents))
        return
    click.echo(render_list([tree.get(n) for n in names], parent=o["parent"]))


@cli.command(name="snapshot-dumpxml")
@click.argument("domain")
@click.argument("snapshotname")
@click.option("--security-info", is_flag=True, help="Include security-sensitive data.")
@click.pass_context
@_run
def snapshot_dumpxml(
    ctx: click.Context, domain: str, snapshotname: str, security_info: bool
) -> None:
    """Print a snapshot's XML."""
    _dom, snap = _pick(ctx, domain, snapshotname, False)
    click.echo(snap.getXMLDesc(1 if security_info else 0), nl=False)


@cli.command(name="snapshot-current")
@click.argument("domain")
@click.argument("snapshotname", required=False)
@click.option("--name", "name_only", is_flag=True, help="Print the name only.")
@click.option("--security-info", is_flag=True, help="Include security-sensitive data.")
@click.pass_context
@_run
def snapshot_current(
    ctx: click.Context, domain: str, snapshotname: str | None, name_only: bool, security_info: bool
) -> None:
    """Show the current snapshot, or make SNAPSHOTNAME current."""
    from virtshift import libvirt as lv

    dom = _domain(ctx, domain)
    if snapshotname is not None:
        dom.snapshotLookupByName(snapshotname)
        dom._snapshots.set_current(dom.name(), snapshotname)
        click.echo(f"Snapshot {snapshotname} set as current")
        return
    if not dom.hasCurrentSnapshot():
        raise _Fail(f"domain '{dom.name()}' has no current snapshot", EXIT_NOT_FOUND)
    snap = dom.snapshotCurrent()
    if name_only:
        click.echo(snap.getName())
        return
    click.echo(snap.getXMLDesc(lv.VIR_DOMAIN_SNAPSHOT_XML_SECURE if security_info else 0), nl=False)


@cli.command(name="snapshot-parent")
@click.argument("domain")
@click.argument("snapshotname", required=False)
@click.option("--current", is_flag=True, help="Parent of the current snapshot.")
@click.pass_context
@_run
def snapshot_parent(
    ctx: click.Context, domain: str, snapshotname: str | None, current: bool
) -> None:
    """Print the name of a snapshot's parent."""
    _dom, snap = _pick(ctx, domain, snapshotname, current)
    click.echo(snap.getParent().getName())


@cli.command(name="snapshot-info")
@click.argument("domain")
@click.argument("snapshotname", required=False)
@click.option("--current", is_flag=True, help="The current snapshot.")
@click.pass_context
@_run
def snapshot_info(ctx: click.Context, domain: str, snapshotname: str | None, current: bool) -> None:
    """Information about a snapshot."""
    from virtshift import libvirt as lv

    dom, snap = _pick(ctx, domain, snapshotname, current)
    sdef, tree = dom._snapshots.get(dom.name(), snap.getName())
    parent = tree.get(snap.getName()).parent
    rows = [
        ("Name", snap.getName()),
        ("Domain", dom.name()),
        ("Current", "yes" if snap.isCurrent() else "no"),
        ("State", sdef.state or "-"),
        ("Location", "external" if sdef.is_external else "internal"),
        ("Parent", parent or "-"),
        ("Children", str(snap.numChildren(0))),
        ("Descendants", str(snap.numChildren(lv.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS))),
        ("Metadata", "yes" if snap.hasMetadata() else "no"),
    ]
    for k, v in rows:
        click.echo(f"{k + ':':<16}{v}")
    click.echo("")


@cli.command(name="snapshot-delete")
@click.argument("domain")
@click.argument("snapshotname", required=False)
@click.option("--current", is_flag=True, help="Delete the current snapshot.")
@click.option("--children", is_flag=True, help="Also delete its descendants.")
@click.option("--children-only", is_flag=True, help="Delete only its descendants.")
@click.option("--metadata", is_flag=True, help="Delete metadata only; keep the images.")
@click.option(
    "--reopen-mirror",
    is_flag=True,
    help="Pivot mirrored disks onto their mirrors, then drop the snapshot.",
)
@click.pass_context
@_run
def snapshot_delete(
    ctx: click.Context,
    domain: str,
    snapshotname: str | None,
    current: bool,
    children: bool,
    children_only: bool,
    metadata: bool,
    reopen_mirror: bool,
) -> None:
    """Delete a snapshot (metadata, or with --children its subtree)."""
    from virtshift import libvirt as lv

    if snapshotname is None and not current:
        raise click.UsageError("give a SNAPSHOTNAME or --current")
    _dom, snap = _pick(ctx, domain, snapshotname, current)
    flags = (
        (lv.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN if children else 0)
        | (lv.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY if children_only else 0)
        | (lv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY if metadata else 0)
        | (lv.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR if reopen_mirror else 0)
    )
    snap.delete(flags)
    if children_only:
        click.echo(f"Domain snapshot {snap.getName()} children deleted\n")
    else:
        click.echo(f"Domain snapshot {snap.getName()} deleted\n")
