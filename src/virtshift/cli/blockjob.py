"""virsh's block-job verbs: blockcopy, blockpull, blockcommit, blockjob, domblkinfo.

``--wait`` returns the job's real outcome as the exit status (0 completed or
ready as asked, 1 failed or cancelled); ``--verbose`` draws a live progress
bar on stderr.  While one process waits, others can query, pivot, abort or
change the speed of the same job (the waiter holds no lock).  A copy that
another process pivoted while ``blockcopy --wait`` waited says so (exit 0;
exit 1 with ``--finish``, whose "stay on the source" can no longer be met).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from virtshift.cli.main import _conn, _domain, _Fail, _run, cli

_MIB = 1024 * 1024
_LABEL = {1: "Block Pull", 2: "Block Copy", 3: "Block Commit", 4: "Active Block Commit"}


def _speed(bandwidth: int | None, in_bytes: bool) -> int:
    if bandwidth is None:
        return 0
    if bandwidth < 0:
        raise _Fail(f"bandwidth must be a non-negative number, not {bandwidth}", 4)
    return bandwidth if in_bytes else bandwidth * _MIB


class _Progress:
    """A rich progress bar on stderr (only with --verbose)."""

    def __init__(self, label: str, verbose: bool) -> None:
        self.label = label
        self.verbose = verbose
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.verbose:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TransferSpeedColumn

            self._bar = Progress(
                "[bold]{task.description}",
                BarColumn(),
                TaskProgressColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=None)
        return self

    def update(self, cur: int, end: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=cur, total=end or None)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _wait(
    ctx: click.Context,
    dom: Any,
    job: Any,
    *,
    until_ready: bool,
    verbose: bool,
    timeout: float | None,
    label: str,
) -> Any:
    svc = dom._jobs
    with _Progress(label, verbose) as bar:
        update: Callable[[int, int], None] = bar.update
        try:
            return svc.wait(
                dom.name(), job.job_id, until_ready=until_ready, progress=update, timeout=timeout
            )
        except Exception as err:
            from virtshift.errors import ErrorCode, VirtError

            if isinstance(err, VirtError) and err.code == ErrorCode.OPERATION_TIMEOUT:
                dom.blockJobAbort(job.disk, 0)
                raise _Fail(f"{label} aborted: timed out after {timeout} s", 1) from err
            raise


def _outcome(job: Any, ok_text: str) -> None:
    from virtshift.model.job import JobState

    if job.state == JobState.COMPLETED:
        click.echo(f"\n{ok_text}")
        return
    if job.state == JobState.CANCELLED:
        raise _Fail("job was cancelled", 1)
    raise _Fail(f"job failed: {job.error or job.state.value}", 1)


def _active_job(dom: Any, disk: str) -> Any:
    from virtshift.ops.blockjob import job_for_disk, resolve_disk

    rec = dom._driver.record(dom.name())
    d = resolve_disk(rec.definition, disk)
    st = rec.status
    return job_for_disk(st.jobs, d.target) if st is not None else None


@cli.command()
@click.argument("domain")
@click.argument("path")
@click.option("--dest", required=True, help="Destination file or block device.")
@click.option("--format", "fmt", help="Destination format (qcow2, raw).")
@click.option("--blockdev", is_flag=True, help="The destination is a block device.")
@click.option("--bandwidth", type=int, help="Bandwidth limit, MiB/s (bytes/s with --bytes).")
@click.option("--bytes", "in_bytes", is_flag=True, help="--bandwidth is in bytes/s.")
@click.option("--granularity", type=int, help="Dirty-bitmap granularity (power of 2).")
@click.option("--buf-size", type=int, help="Copy buffer size in bytes.")
@click.option("--shallow", is_flag=True, help="Copy only the top layer; share the backing chain.")
@click.option("--reuse-external", is_flag=True, help="The destination exists already.")
@click.option("--transient-job", is_flag=True, help="Accepted (virtshift records every job).")
@click.option("--synchronous-writes", is_flag=True, help="Guest writes wait for the copy.")
@click.option("--wait", is_flag=True, help="Wait until the copy is ready.")
@click.option("--verbose", is_flag=True, help="Show progress (with --wait).")
@click.option("--timeout", type=float, help="With --wait: abort after this many seconds.")
@click.option("--pivot", is_flag=True, help="With --wait: then switch to the copy.")
@click.option(
    "--finish", is_flag=True, help="With --wait: then end the copy, staying on the source."
)
@click.option("--async", "asynchronous", is_flag=True, help="Accepted for virsh compatibility.")
@click.pass_context
@_run
def blockcopy(
    ctx: click.Context,
    /,
    domain: str,
    path: str,
    dest: str,
    fmt: str | None,
    blockdev: bool,
    bandwidth: int | None,
    in_bytes: bool,
    granularity: int | None,
    buf_size: int | None,
    shallow: bool,
    reuse_external: bool,
    transient_job: bool,
    synchronous_writes: bool,
    wait: bool,
    verbose: bool,
    timeout: float | None,
    pivot: bool,
    finish: bool,
    asynchronous: bool,
) -> None:
    """Copy a disk to a new image while the guest runs (then pivot or finish)."""
    from virtshift import libvirt as lv
    from virtshift.model.domain import StorageSource

    if (pivot or finish) and not wait:
        wait = True
    if pivot and finish:
        raise click.UsageError("--pivot and --finish are mutually exclusive")
    dom = _domain(ctx, domain)
    flags = (
        (lv.VIR_DOMAIN_BLOCK_COPY_SHALLOW if shallow else 0)
        | (lv.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT if reuse_external else 0)
        | (lv.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB if transient_job else 0)
        | (lv.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES if synchronous_writes else 0)
    )
    src = StorageSource(type="block" if blockdev else "file", path=dest, format=fmt)
    svc = dom._jobs
    from virtshift.errors import VirtError

    try:
        job = svc.copy(
            dom.name(),
            path,
            src,
            flags=flags,
            bandwidth=_speed(bandwidth, in_bytes),
            granularity=granularity,
            buf_size=buf_size,
        )
    except VirtError as err:
        raise lv.libvirtError._from(err) from err
    if not wait:
        click.echo("Block Copy started")
        return
    job = _wait(
        ctx, dom, job, until_ready=True, verbose=verbose, timeout=timeout, label="Block Copy"
    )
    from virtshift.model.job import JobState

    if job.state == JobState.COMPLETED:
        # ended while we waited, and not by us: a copy that ends completed was
        # pivoted (one that ended on the source is CANCELLED), by another process
        if finish:
            raise _Fail(
                "Block Copy was pivoted by another process: the disk is on the copy, "
                "not on the source",
                1,
            )
        click.echo("\nBlock Copy complete: another process pivoted the disk to the copy")
        return
    if job.state != JobState.READY:
        _outcome(job, "")
        return
    if pivot:
        dom.blockJobAbort(job.disk, lv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        click.echo("\nSuccessfully pivoted")
    elif finish:
        dom.blockJobAbort(job.disk, 0)
        click.echo("\nSuccessfully copied")
    else:
        click.echo("\nNow in mirroring phase")


@cli.command()
@click.argument("domain")
@click.argument("path")
@click.option("--base", help="Keep this layer (path or vda[N]) as the new backing file.")
@click.option("--bandwidth", type=int, help="Bandwidth limit, MiB/s (bytes/s with --bytes).")
@click.option("--bytes", "in_bytes", is_flag=True, help="--bandwidth is in bytes/s.")
@click.option("--wait", is_flag=True, help="Wait until the pull is done.")
@click.option("--verbose", is_flag=True, help="Show progress (with --wait).")
@click.option("--timeout", type=float, help="With --wait: abort after this many seconds.")
@click.option("--async", "asynchronous", is_flag=True, help="Accepted for virsh compatibility.")
@click.option("--keep-relative", is_flag=True, help="Keep a relative backing name.")
@click.pass_context
@_run
def blockpull(
    ctx: click.Context,
    /,
    domain: str,
    path: str,
    base: str | None,
    bandwidth: int | None,
    in_bytes: bool,
    wait: bool,
    verbose: bool,
    timeout: float | None,
    asynchronous: bool,
    keep_relative: bool,
) -> None:
    """Pull data from the backing chain into the active layer (block stream)."""
    from virtshift import libvirt as lv
    from virtshift.errors import VirtError

    dom = _domain(ctx, domain)
    flags = lv.VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES | (
        lv.VIR_DOMAIN_BLOCK_REBASE_RELATIVE if keep_relative else 0
    )
    try:
        job = dom._jobs.pull(dom.name(), path, base, _speed(bandwidth, in_bytes), flags)
    except VirtError as err:
        raise lv.libvirtError._from(err) from err
    if not wait:
        click.echo("Block Pull started")
        return
    job = _wait(
        ctx, dom, job, until_ready=False, verbose=verbose, timeout=timeout, label="Block Pull"
    )
    _outcome(job, "Pull complete")


@cli.command()
@click.argument("domain")
@click.argument("path")
@click.option("--base", help="Merge into this layer (path or vda[N]); default the bottom.")
@click.option("--top", help="Top layer to merge (path or vda[N]); default the active one.")
@click.option("--active", is_flag=True, help="Commit the active layer (then pivot or keep).")
@click.option("--shallow", is_flag=True, help="Base is the layer right below top.")
@click.option("--delete", is_flag=True, help="Delete the merged files afterwards.")
@click.option("--bandwidth", type=int, help="Bandwidth limit, MiB/s (bytes/s with --bytes).")
@click.option("--bytes", "in_bytes", is_flag=True, help="--bandwidth is in bytes/s.")
@click.option("--wait", is_flag=True, help="Wait until done (or synchronized, with --active).")
@click.option("--verbose", is_flag=True, help="Show progress (with --wait).")
@click.option("--timeout", type=float, help="With --wait: abort after this many seconds.")
@click.option("--pivot", is_flag=True, help="With --active: then switch the disk to the base.")
@click.option("--keep-overlay", is_flag=True, help="With --active: end without pivot.")
@click.option("--async", "asynchronous", is_flag=True, help="Accepted for virsh compatibility.")
@click.option("--keep-relative", is_flag=True, help="Keep relative backing names.")
@click.pass_context
@_run
def blockcommit(
    ctx: click.Context,
    /,
    domain: str,
    path: str,
    base: str | None,
    top: str | None,
    active: bool,
    shallow: bool,
    delete: bool,
    bandwidth: int | None,
    in_bytes: bool,
    wait: bool,
    verbose: bool,
    timeout: float | None,
    pivot: bool,
    keep_overlay: bool,
    asynchronous: bool,
    keep_relative: bool,
) -> None:
    """Merge layers of the backing chain down into a base."""
    from virtshift import libvirt as lv
    from virtshift.errors import VirtError

    if (pivot or keep_overlay) and not active:
        active = True
    if pivot or keep_overlay:
        wait = True
    dom = _domain(ctx, domain)
    flags = (
        lv.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
        | (lv.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE if active else 0)
        | (lv.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW if shallow else 0)
        | (lv.VIR_DOMAIN_BLOCK_COMMIT_DELETE if delete else 0)
        | (lv.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE if keep_relative else 0)
    )
    try:
        job = dom._jobs.commit(dom.name(), path, base, top, _speed(bandwidth, in_bytes), flags)
    except VirtError as err:
        raise lv.libvirtError._from(err) from err
    if not wait:
        click.echo("Block Commit started")
        return
    job = _wait(
        ctx, dom, job, until_ready=active, verbose=verbose, timeout=timeout, label="Block Commit"
    )
    from virtshift.model.job import JobState

    if active and job.state == JobState.READY:
        if pivot:
            dom.blockJobAbort(job.disk, lv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            click.echo("\nSuccessfully pivoted")
        elif keep_overlay:
            dom.blockJobAbort(job.disk, 0)
            click.echo("\nCommit complete, overlay image kept")
        else:
            click.echo("\nNow in synchronized phase")
        return
    _outcome(job, "Commit complete")


@cli.command()
@click.argument("domain")
@click.argument("path")
@click.option("--abort", is_flag=True, help="Cancel the job (a copy stays on the source).")
@click.option("--async", "asynchronous", is_flag=True, help="With --abort: do not wait.")
@click.option("--pivot", is_flag=True, help="Switch to the copy / the commit's base.")
@click.option("--info", is_flag=True, help="Show progress (the default).")
@click.option("--raw", is_flag=True, help="Machine-readable --info.")
@click.option("--bytes", "in_bytes", is_flag=True, help="Bandwidth in bytes/s.")
@click.option("--bandwidth", type=int, help="Set the bandwidth limit (MiB/s, or bytes/s).")
@click.pass_context
@_run
def blockjob(
    ctx: click.Context,
    /,
    domain: str,
    path: str,
    abort: bool,
    asynchronous: bool,
    pivot: bool,
    info: bool,
    raw: bool,
    in_bytes: bool,
    bandwidth: int | None,
) -> None:
    """Query, pivot, abort or change the speed of a disk's block job."""
    from virtshift import libvirt as lv

    dom = _domain(ctx, domain)
    if abort or pivot:
        flags = (lv.VIR_DOMAIN_BLOCK_JOB_ABORT_ASYNC if asynchronous else 0) | (
            lv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT if pivot else 0
        )
        dom.blockJobAbort(path, flags)
        if pivot:
            click.echo("\nSuccessfully pivoted")
        return
    if bandwidth is not None:
        speed_flags = lv.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES if in_bytes else 0
        dom.blockJobSetSpeed(path, bandwidth, speed_flags)
        return
    # virsh: --raw lists the bandwidth in MiB/s unless --bytes; the summary in bytes/s
    info_flags = lv.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES if in_bytes or not raw else 0
    got = dom.blockJobInfo(path, info_flags)
    if not got:
        if not raw:  # virsh's --raw prints nothing when there is no job
            click.echo(f"No current block job for {path}")
        return
    if raw:
        click.echo(
            f" type={_LABEL.get(got['type'], 'Unknown job')}\n bandwidth={got['bandwidth']}"
            f"\n cur={got['cur']}\n end={got['end']}"
        )
        return
    if got["end"]:
        pct = int(100 * got["cur"] / got["end"])
    else:
        # QEMU says 0 of 0 until a job has sized its work: that is 0 %, not 100 %
        # (libvirt reports end=1 then), unless the job is recorded ready
        from virtshift.model.job import JobState

        job = _active_job(dom, path)
        pct = 100 if job is not None and job.state == JobState.READY else 0
    click.echo(f"{_LABEL.get(got['type'], 'Unknown job')}: [{pct:3d} %]")
    if got["bandwidth"]:
        bw = got["bandwidth"]
        click.echo(f"    Bandwidth limit: {bw} bytes/s ({bw / _MIB:.3f} MiB/s)")


@cli.command()
@click.argument("domain")
@click.argument("device")
@click.option("--human", is_flag=True, help="Sizes with units.")
@click.pass_context
@_run
def domblkinfo(ctx: click.Context, /, domain: str, device: str, human: bool) -> None:
    """Capacity, allocation and physical size of a disk's active image."""
    cap, alloc, phys = _domain(ctx, domain).blockInfo(device, 0)

    def fmt(n: int) -> str:
        if not human:
            return str(n)
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.3f} {unit}" if unit != "bytes" else f"{n} bytes"
            n = n / 1024  # type: ignore[assignment]
        return str(n)

    click.echo(
        f"{'Capacity:':<16}{fmt(cap)}\n{'Allocation:':<16}{fmt(alloc)}\n{'Physical:':<16}{fmt(phys)}\n"
    )
    _ = _conn


__all__ = ["blockcommit", "blockcopy", "blockjob", "blockpull", "domblkinfo"]
