"""Planning block jobs: pull (stream), commit, copy (mirror) and their pivots.

Pure functions: they resolve libvirt's ways of naming things (a disk by target
or active path; a layer by path or ``vda[N]``), check the request the way
libvirt does (with its error codes and messages), and return the
:class:`~virtshift.model.job.BlockJob` to record plus the QMP arguments that
start it.  Functions named ``after_*`` give the domain once a job's result is
applied.  The runtime (:mod:`virtshift.runtime.blockjob`) does the IO.

Node names: every layer virtshift opens is ``libvirt-N-format`` (N = chain
index).  A copy's target is added by virtshift with ``blockdev-add`` and no
backing (``backing: null``); its backing chain is attached right before the
pivot, after it has been verified (QEMU-NOTES traps 3 and 4).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtshift.errors import ErrorCode, VirtError
from virtshift.model.domain import Disk, Domain, Mirror, StorageSource
from virtshift.model.image import ImageLayer
from virtshift.model.job import BlockJob, JobState, JobType
from virtshift.ops.start import format_node, storage_node

__all__ = [
    "after_active_commit",
    "after_commit",
    "after_pivot",
    "after_pull",
    "bandwidth_bytes",
    "check_dest_chain",
    "job_id",
    "plan_commit",
    "plan_copy",
    "plan_pull",
    "resolve_disk",
    "resolve_layer",
    "with_mirror",
]

#: libvirt refuses bandwidths that overflow when scaled to bytes per second.
MAX_BANDWIDTH_BYTES = 2**63 - 1
MIB = 1024 * 1024

#: Block job flag values (libvirt's).
REBASE_SHALLOW = 1
REBASE_REUSE_EXT = 2
REBASE_COPY_RAW = 4
REBASE_COPY = 8
REBASE_RELATIVE = 16
REBASE_COPY_DEV = 32
REBASE_BANDWIDTH_BYTES = 64
COPY_SHALLOW = 1
COPY_REUSE_EXT = 2
COPY_TRANSIENT_JOB = 4
COPY_SYNCHRONOUS_WRITES = 8
COMMIT_SHALLOW = 1
COMMIT_DELETE = 2
COMMIT_ACTIVE = 4
COMMIT_RELATIVE = 8
COMMIT_BANDWIDTH_BYTES = 16
PULL_BANDWIDTH_BYTES = 64


def job_id(kind: JobType, disk: str, node: str) -> str:
    """Deterministic, readable QEMU job id (libvirt's shape)."""
    return f"{kind.value}-{disk}-{node}"


def bandwidth_bytes(bandwidth: int, *, in_bytes: bool) -> int:
    """Bandwidth in bytes/s from MiB/s (or bytes/s with the BYTES flag).

    :raise VirtError: OVERFLOW when it does not fit (libvirt's check).
    """
    if bandwidth < 0:
        raise VirtError(ErrorCode.OVERFLOW, f"bandwidth must be less than {MAX_BANDWIDTH_BYTES}")
    value = bandwidth if in_bytes else bandwidth * MIB
    if value > MAX_BANDWIDTH_BYTES:
        limit = MAX_BANDWIDTH_BYTES if in_bytes else MAX_BANDWIDTH_BYTES // MIB
        raise VirtError(ErrorCode.OVERFLOW, f"bandwidth must be less than {limit}")
    return value


def resolve_disk(domain: Domain, disk: str) -> Disk:
    """The disk named by target ('vda') or by the path of its active layer."""
    for d in domain.disks:
        if d.target == disk or (d.source.path is not None and d.source.path == disk):
            return d
    raise VirtError(ErrorCode.INVALID_ARG, f"disk '{disk}' not found in domain")


_INDEXED = re.compile(r"^(?P<target>[a-z]+)\[(?P<index>[0-9]+)\]$")


def resolve_layer(disk: Disk, spec: str) -> StorageSource:
    """A layer of ``disk``'s chain, by path or ``vda[N]`` (N = ``index=``)."""
    m = _INDEXED.match(spec)
    chain = disk.source.chain()
    if m:
        if m.group("target") != disk.target:
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"requested target '{m.group('target')}' does not match target '{disk.target}'",
            )
        idx = int(m.group("index"))
        for layer in chain:
            if layer.index == idx:
                return layer
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"could not find backing store index '{idx}' in chain for '{disk.target}'",
        )
    for layer in chain:
        if layer.path is not None and os.path.normpath(layer.path) == os.path.normpath(spec):
            return layer
    raise VirtError(
        ErrorCode.INVALID_ARG, f"could not find image '{spec}' in chain for '{disk.target}'"
    )


def _below(top: StorageSource, layer: StorageSource) -> bool:
    """True when ``layer`` is strictly below ``top`` in its chain."""
    return any(x is not top and x.index == layer.index for x in top.chain()[1:])


def _check_no_job(disk: Disk, jobs: Sequence[BlockJob]) -> None:
    for job in jobs:
        if job.disk == disk.target and not job.state.ended:
            raise VirtError(
                ErrorCode.BLOCK_COPY_ACTIVE,
                f"disk '{disk.target}' already in active block job ('{job.job_id}', "
                f"{job.state.value})",
            )


def _node(layer: StorageSource) -> str:
    if layer.index is None:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"layer '{layer.path}' has no QEMU node")
    return format_node(layer.index)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartPlan:
    """A job to record and the QMP command that starts it."""

    job: BlockJob
    command: str
    arguments: dict[str, Any]
    #: blockdev-add arguments to send first (copy targets), in order.
    add: tuple[dict[str, Any], ...] = ()
    #: Image files virtshift must create before anything else: (argv of qemu-img).
    create: tuple[tuple[str, ...], ...] = ()


def plan_pull(
    domain: Domain,
    disk_name: str,
    base: str | None,
    *,
    bandwidth: int,
    flags: int,
    jobs: Sequence[BlockJob],
    now: float,
) -> StartPlan:
    """``blockRebase`` without COPY / ``blockPull`` / ``snapshotRebase``: stream into the
    active layer everything above ``base`` (all of the chain when None)."""
    disk = resolve_disk(domain, disk_name)
    _check_no_job(disk, jobs)
    top = disk.source
    base_layer = None if base is None else resolve_layer(disk, base)
    if base_layer is not None and base_layer.index == top.index:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"base '{base}' is the active layer of disk '{disk.target}'; nothing to pull",
        )
    if base_layer is not None and not _below(top, base_layer):
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"could not find image '{base}' beneath '{top.path}' in chain for '{disk.target}'",
        )
    if flags & REBASE_RELATIVE and base_layer is None:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            "flag VIR_DOMAIN_BLOCK_REBASE_RELATIVE is valid only with non-null base",
        )
    if top.backing is None:
        raise VirtError(
            ErrorCode.INVALID_ARG, f"disk '{disk.target}' has no backing file to pull from"
        )
    speed = bandwidth_bytes(bandwidth, in_bytes=bool(flags & REBASE_BANDWIDTH_BYTES))
    node = _node(top)
    job = BlockJob(
        job_id=job_id(JobType.PULL, disk.target, node),
        type=JobType.PULL,
        disk=disk.target,
        node=node,
        base=None if base_layer is None else base_layer.index,
        bandwidth=speed,
        flags=flags,
        created=now,
    )
    # auto-finalize off: the top is flushed before QEMU rewrites its backing name
    # (runtime/blockjob.py, Effect.FINALIZE)
    args: dict[str, Any] = {
        "job-id": job.job_id,
        "device": node,
        "auto-dismiss": False,
        "auto-finalize": False,
    }
    if base_layer is not None:
        args["base-node"] = _node(base_layer)
        assert base_layer.path is not None
        args["backing-file"] = base_layer.path
    if speed:
        args["speed"] = speed
    return StartPlan(job=job, command="block-stream", arguments=args)


def plan_commit(
    domain: Domain,
    disk_name: str,
    base: str | None,
    top: str | None,
    *,
    bandwidth: int,
    flags: int,
    jobs: Sequence[BlockJob],
    now: float,
) -> StartPlan:
    """``blockCommit``: merge ``top`` (default: the active layer, which needs ACTIVE)
    and everything down to just above ``base`` (default: the bottom) into ``base``."""
    disk = resolve_disk(domain, disk_name)
    _check_no_job(disk, jobs)
    if disk.source.path is None:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED, f"disk {disk.target} has no source file to be committed"
        )
    active = disk.source
    top_layer = active if top is None else resolve_layer(disk, top)
    is_active = top_layer.index == active.index
    if is_active and not flags & COMMIT_ACTIVE:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"commit of '{disk.target}' active layer requires active flag",
        )
    if flags & COMMIT_ACTIVE and not is_active:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"active commit requested but '{top_layer.path}' is not active",
        )
    if top_layer.backing is None:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"top '{top_layer.path}' in chain for '{disk.target}' has no backing file",
        )
    if base is None:
        base_layer = top_layer.backing if flags & COMMIT_SHALLOW else top_layer.chain()[-1]
    else:
        base_layer = resolve_layer(disk, base)
        if not _below(top_layer, base_layer):
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"could not find image '{base}' beneath '{top_layer.path}' in chain for "
                f"'{disk.target}'",
            )
        if flags & COMMIT_SHALLOW and base_layer.index != top_layer.backing.index:
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"base '{base}' is not immediately below '{top_layer.path}' in chain for "
                f"'{disk.target}'",
            )
    speed = bandwidth_bytes(bandwidth, in_bytes=bool(flags & COMMIT_BANDWIDTH_BYTES))
    kind = JobType.ACTIVE_COMMIT if is_active else JobType.COMMIT
    removed: list[str] = []
    for x in top_layer.chain():
        if x.index == base_layer.index:
            break
        if x.path is not None:
            removed.append(x.path)
    node = _node(active)
    job = BlockJob(
        job_id=job_id(kind, disk.target, node),
        type=kind,
        disk=disk.target,
        node=node,
        top=top_layer.index,
        base=base_layer.index,
        bandwidth=speed,
        flags=flags,
        delete_after=tuple(removed) if flags & COMMIT_DELETE else (),
        created=now,
    )
    args: dict[str, Any] = {
        "job-id": job.job_id,
        "device": node,
        "top-node": _node(top_layer),
        "base-node": _node(base_layer),
        "auto-dismiss": False,
    }
    if not is_active:
        assert base_layer.path is not None
        args["backing-file"] = base_layer.path
        # the base is flushed before QEMU drops the merged layers from the image
        # above (runtime/blockjob.py, Effect.FINALIZE); an active commit pivots
        # with block-job-complete and keeps QEMU's default
        args["auto-finalize"] = False
    if speed:
        args["speed"] = speed
    return StartPlan(job=job, command="block-commit", arguments=args)


def plan_copy(
    domain: Domain,
    disk_name: str,
    dest: StorageSource,
    *,
    flags: int,
    bandwidth: int,
    granularity: int | None,
    buf_size: int | None,
    jobs: Sequence[BlockJob],
    next_index: int,
    dest_exists: bool,
    dest_is_block: bool,
    now: float,
    snapshot: str | None = None,
    virtual_size: int | None = None,
) -> StartPlan:
    """``blockCopy`` (and the mirror of a mirrored snapshot): mirror the active layer
    onto ``dest``.

    :param dest: the destination's top layer (path, format, type).
    :param flags: VIR_DOMAIN_BLOCK_COPY_* flags.
    :param bandwidth: bytes per second.
    :param next_index: first free chain index (the target becomes that one).
    :param dest_exists: whether a file exists at the destination path.
    :param virtual_size: the disk's virtual size, for creating the target.
    """
    disk = resolve_disk(domain, disk_name)
    _check_no_job(disk, jobs)
    if disk.readonly:
        raise VirtError(ErrorCode.OPERATION_UNSUPPORTED, "copy of read-only disks is not supported")
    path = dest.path
    if path is None or not os.path.isabs(path):
        raise VirtError(ErrorCode.INVALID_ARG, "absolute path must be used as block copy target")
    for layer in disk.source.chain():
        if layer.path is not None and os.path.normpath(layer.path) == os.path.normpath(path):
            raise VirtError(
                ErrorCode.INVALID_ARG,
                f"block copy destination '{path}' is an image of the chain of disk '{disk.target}'",
            )
    shallow = bool(flags & COPY_SHALLOW)
    reuse = bool(flags & COPY_REUSE_EXT)
    fmt = dest.format
    if reuse and fmt is None:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED, "reused mirror destination format must be specified"
        )
    fmt = fmt or disk.source.format or "raw"
    if shallow and fmt == "raw" and disk.source.backing is not None:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"shallow copy of disk '{disk.target}' into a raw file is not possible",
        )
    if dest_exists and not reuse and not dest_is_block:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"external destination file for disk {disk.target} already exists and is not a "
            f"block device: {path}",
        )
    if reuse and not dest_exists:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"destination '{path}' of disk '{disk.target}' does not exist "
            "(VIR_DOMAIN_BLOCK_COPY_REUSE_EXT needs it)",
        )
    if granularity is not None and (granularity <= 0 or granularity & (granularity - 1)):
        raise VirtError(ErrorCode.INVALID_ARG, "granularity must be power of 2")
    if bandwidth < 0 or bandwidth > MAX_BANDWIDTH_BYTES:
        raise VirtError(ErrorCode.OVERFLOW, f"bandwidth must be less than {MAX_BANDWIDTH_BYTES}")
    top = disk.source
    node = _node(top)
    target_node = format_node(next_index)
    backing = top.backing if shallow else None
    create: list[tuple[str, ...]] = []
    created: list[str] = []
    if not reuse and not dest_is_block:
        argv: list[str] = ["qemu-img", "create", "-q", "-f", fmt]
        if backing is not None:
            assert backing.path is not None
            argv += ["-b", backing.path, "-F", backing.format or "raw"]
        argv.append(path)
        if virtual_size is not None:
            argv.append(str(virtual_size))
        create.append(tuple(argv))
        created.append(path)
    # the target: added with no backing; for our own shallow target the source's
    # backing node (already open, read-only) is its backing from the start, for a
    # reused one the chain is verified and attached just before the pivot
    add_storage = {
        "driver": "host_device" if dest.type == "block" else "file",
        "filename": path,
        "node-name": storage_node(next_index),
        "auto-read-only": True,
        "discard": "unmap",
    }
    add_format: dict[str, Any] = {
        "node-name": target_node,
        "read-only": False,
        "driver": fmt,
        "file": storage_node(next_index),
    }
    if fmt != "raw":
        add_format["backing"] = _node(backing) if backing is not None and not reuse else None
    mirror_src = StorageSource(
        type=dest.type,
        path=path,
        format=fmt,
        index=next_index,
        node_name=target_node,
        backing=backing if not reuse else None,
        backing_end=not shallow,
    )
    job = BlockJob(
        job_id=job_id(JobType.COPY, disk.target, node),
        type=JobType.COPY,
        disk=disk.target,
        node=node,
        mirror=mirror_src,
        bandwidth=bandwidth,
        flags=flags,
        snapshot=snapshot,
        created_files=tuple(created),
        added_nodes=(target_node, storage_node(next_index)),
        created=now,
    )
    args: dict[str, Any] = {
        "job-id": job.job_id,
        "device": node,
        "target": target_node,
        "sync": "top" if shallow else "full",
        "auto-dismiss": False,
    }
    if bandwidth:
        args["speed"] = bandwidth
    if granularity:
        args["granularity"] = granularity
    if buf_size:
        args["buf-size"] = buf_size
    if flags & COPY_SYNCHRONOUS_WRITES:
        args["copy-mode"] = "write-blocking"
    return StartPlan(
        job=job,
        command="blockdev-mirror",
        arguments=args,
        add=(add_storage, add_format),
        create=tuple(create),
    )


# -- verifying a destination chain before the pivot -------------------------------


def check_dest_chain(
    disk: str, infos: Sequence[ImageLayer], source: Sequence[tuple[str, int]]
) -> None:
    """Verify a destination chain before the pivot (read from the image headers).

    ``infos`` has one entry per destination layer, the target first (as
    :func:`virtshift.store.images.read_chain` returns it: every layer could be
    read); ``source`` is (format, virtual size) of each source layer, the
    active layer first.  Every destination layer must record the format of its
    backing file (no probing), and have the format and virtual size of the
    source layer at the same depth.  Otherwise QEMU 7.2 would pivot onto an
    image without its backing data (QEMU-NOTES trap 3).

    :raise VirtError: OPERATION_INVALID naming the first bad layer.
    """
    for depth, info in enumerate(infos):
        name = info.filename
        backing = info.full_backing_filename or info.backing_filename
        if backing is not None:
            bfmt = info.backing_format
            if not bfmt:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"destination image '{name}' of disk '{disk}' does not record the format "
                    f"of its backing file '{backing}'; refusing to pivot",
                )
            if depth + 1 < len(infos) and infos[depth + 1].format != bfmt:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"backing file '{backing}' of '{name}' is "
                    f"{infos[depth + 1].format}, not {bfmt}; refusing to pivot",
                )
        if depth < len(source):
            fmt, size = source[depth]
            if info.format != fmt or info.virtual_size != size:
                raise VirtError(
                    ErrorCode.OPERATION_INVALID,
                    f"destination layer '{name}' of disk '{disk}' is "
                    f"{info.format} of {info.virtual_size} bytes, the source "
                    f"layer at that depth is {fmt} of {size} bytes; refusing to pivot",
                )
    if len(infos) != len(source):
        raise VirtError(
            ErrorCode.OPERATION_INVALID,
            f"destination chain of disk '{disk}' has {len(infos)} layers, the source chain "
            f"{len(source)}; refusing to pivot",
        )


# -- the domain after a job ---------------------------------------------------------


def with_mirror(domain: Domain, job: BlockJob, *, ready: str | None) -> Domain:
    """The live domain showing the job's ``<mirror>`` (copy and active commit)."""
    disk = domain.disk(job.disk)
    if disk is None:
        return domain
    if job.type == JobType.COPY and job.mirror is not None:
        mirror = Mirror(job="copy", ready=ready, source=job.mirror)
    elif job.type == JobType.ACTIVE_COMMIT:
        base = next((x for x in disk.source.chain() if x.index == job.base), None)
        if base is None:
            return domain
        mirror = Mirror(job="active-commit", ready=ready, source=dataclasses.replace(base))
    else:
        return domain
    return domain.with_disk(dataclasses.replace(disk, mirror=mirror))


def without_mirror(domain: Domain, disk_name: str) -> Domain:
    disk = domain.disk(disk_name)
    if disk is None or disk.mirror is None:
        return domain
    return domain.with_disk(dataclasses.replace(disk, mirror=None))


def _drop_between(top: StorageSource, upper: int | None, base: int) -> StorageSource:
    """Rebuild ``top``'s chain with every layer strictly between ``upper`` (kept; None
    means ``top`` itself) and ``base`` removed."""
    layers = top.chain()
    out: list[StorageSource] = []
    skipping = False
    for layer in layers:
        if skipping and layer.index != base:
            continue
        skipping = False
        out.append(layer)
        if (upper is None and layer is top) or layer.index == upper:
            skipping = True
    chain: StorageSource | None = None
    for layer in reversed(out):
        chain = dataclasses.replace(
            layer, backing=chain, backing_end=chain is None and layer.backing_end
        )
    assert chain is not None
    return chain


def after_pull(domain: Domain, job: BlockJob) -> Domain:
    """The active layer now holds everything above the base; the base (if any) is its
    backing, lower layers are unchanged."""
    disk = domain.disk(job.disk)
    assert disk is not None
    top = disk.source
    if job.base is None:
        src = dataclasses.replace(top, backing=None, backing_end=True)
    else:
        src = _drop_between(top, None, job.base)
    return domain.with_disk(dataclasses.replace(disk, source=src))


def after_commit(domain: Domain, job: BlockJob) -> Domain:
    """Intermediate commit: the layers from ``top`` down to just above ``base`` are gone;
    the layer that was above ``top`` now backs onto ``base``."""
    disk = domain.disk(job.disk)
    assert disk is not None
    assert job.base is not None
    layers = disk.source.chain()
    above = None
    for i, layer in enumerate(layers):
        if layer.index == job.top and i > 0:
            above = layers[i - 1].index
    src = _drop_between(disk.source, above, job.base)
    return domain.with_disk(dataclasses.replace(disk, source=src))


def after_active_commit(domain: Domain, job: BlockJob) -> Domain:
    """Pivoted active commit: the base is the active layer."""
    disk = domain.disk(job.disk)
    assert disk is not None
    base = next(x for x in disk.source.chain() if x.index == job.base)
    return domain.with_disk(dataclasses.replace(disk, source=base, mirror=None))


def after_pivot(domain: Domain, job: BlockJob, mirror_chain: StorageSource) -> Domain:
    """Pivoted copy: the disk is the mirror's chain."""
    disk = domain.disk(job.disk)
    assert disk is not None
    return domain.with_disk(
        dataclasses.replace(disk, type=mirror_chain.type, source=mirror_chain, mirror=None)
    )


def active_jobs(jobs: Sequence[BlockJob]) -> list[BlockJob]:
    return [j for j in jobs if not j.state.ended]


def job_for_disk(jobs: Sequence[BlockJob], disk: str) -> BlockJob | None:
    """The disk's active job, else its last ended one, else None."""
    mine = [j for j in jobs if j.disk == disk]
    live = [j for j in mine if not j.state.ended]
    if live:
        return live[-1]
    return mine[-1] if mine else None


def is_new(job: BlockJob) -> bool:
    return job.state == JobState.NEW
