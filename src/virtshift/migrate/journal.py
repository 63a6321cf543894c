"""The journal of a live storage migration: what was done, what is next, which
storage domain holds the consistent chain.

One JSON document per domain under the driver's root
(``lib/qemu/migrate/DOMAIN.json``), replaced atomically before each step starts
and after it ends.  A process that dies at any point leaves a journal from
which ``--resume`` finishes the move and ``--abort`` undoes it.  The step
values are written to disk: once shipped, they never change.

No QEMU and no image IO here; :mod:`virtshift.migrate.engine` does the work.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtshift.errors import ErrorCode, VirtError
from virtshift.store.files import ensure_dir, remove_quietly, write_atomic

__all__ = ["DiskMove", "Journal", "Layer", "Step", "journal_path", "load", "save"]

FORMAT_VERSION = 1


class Step(enum.StrEnum):
    """Where one disk's move is.  Each value means "this step is done"."""

    PLANNED = "planned"
    #: The new source overlay and its mirror on the destination exist.
    OVERLAYS = "overlays"
    #: The mirrored snapshot is taken: writes go to both storage domains.
    MIRRORING = "mirroring"
    #: Every lower layer is copied to the destination and linked by relative name.
    COPIED = "copied"
    #: The copies were checked (quick: format, size, chain; full: content).
    VERIFIED = "verified"
    #: The disk runs on the destination chain (REOPEN_MIRROR done).
    PIVOTED = "pivoted"
    #: With --merge: the intermediate layer was streamed away.
    MERGED = "merged"
    #: With --delete-source: the source files of the move are removed.
    CLEANED = "cleaned"
    DONE = "done"

    @property
    def order(self) -> int:
        return list(Step).index(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
    """One layer of the chain being moved."""

    path: str
    format: str
    virtual_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskMove:
    """The move of one disk."""

    target: str
    #: The chain at the start (top first): these layers are copied.
    layers: tuple[Layer, ...]
    #: Destination path of each layer, same order.
    dest_layers: tuple[str, ...]
    #: The new top on the source storage domain (receives writes until the pivot).
    overlay: str
    #: Its mirror on the destination: the destination chain's top.
    mirror: str
    #: The mirrored snapshot's name.
    snapshot: str
    step: Step = Step.PLANNED
    #: Layers copied so far (index into ``layers``).
    copied: int = 0
    bytes_copied: int = 0
    #: Files this migration created (removed by --abort).
    created: tuple[str, ...] = ()
    #: Step name -> seconds it took.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def consistent(self) -> str:
        """Which storage domain holds the complete, consistent chain."""
        return "destination" if self.step.order >= Step.PIVOTED.order else "source"


@dataclass(frozen=True, slots=True, kw_only=True)
class Journal:
    """The whole migration of one domain."""

    domain: str
    uuid: str
    dest: str
    bandwidth: int = 0
    merge: bool = False
    delete_source: bool = False
    verify: str = "quick"
    #: The domain's inactive XML, refreshed after every step that changes disks:
    #: what ``--resume`` starts (``createXML``) when QEMU itself has died.
    domain_xml: str = ""
    persistent: bool = True
    disks: tuple[DiskMove, ...] = ()
    #: 'running', 'done' or 'aborted'.
    state: str = "running"
    created: float = 0.0
    #: (time, text) lines for the timeline.
    events: tuple[tuple[float, str], ...] = ()

    def disk(self, target: str) -> DiskMove:
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)

    def with_disk(self, move: DiskMove) -> Journal:
        return dataclasses.replace(
            self, disks=tuple(move if d.target == move.target else d for d in self.disks)
        )

    def note(self, when: float, text: str) -> Journal:
        return dataclasses.replace(self, events=(*self.events, (when, text)))


def journal_path(lib_dir: Path, domain: str) -> Path:
    return lib_dir / "migrate" / f"{domain}.json"


def _to_json(j: Journal) -> dict[str, Any]:
    data = dataclasses.asdict(j)
    data["version"] = FORMAT_VERSION
    return data


def _from_json(data: dict[str, Any]) -> Journal:
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"journal version {data.get('version')!r}")
    disks = []
    for d in data["disks"]:
        disks.append(
            DiskMove(
                target=d["target"],
                layers=tuple(Layer(**x) for x in d["layers"]),
                dest_layers=tuple(d["dest_layers"]),
                overlay=d["overlay"],
                mirror=d["mirror"],
                snapshot=d["snapshot"],
                step=Step(d["step"]),
                copied=int(d["copied"]),
                bytes_copied=int(d["bytes_copied"]),
                created=tuple(d["created"]),
                timings={str(k): float(v) for k, v in d["timings"].items()},
            )
        )
    return Journal(
        domain=data["domain"],
        uuid=data["uuid"],
        dest=data["dest"],
        bandwidth=int(data["bandwidth"]),
        merge=bool(data["merge"]),
        delete_source=bool(data["delete_source"]),
        verify=str(data["verify"]),
        domain_xml=str(data["domain_xml"]),
        persistent=bool(data["persistent"]),
        disks=tuple(disks),
        state=str(data["state"]),
        created=float(data["created"]),
        events=tuple((float(t), str(x)) for t, x in data["events"]),
    )


def save(path: Path, journal: Journal) -> None:
    """Write the journal atomically."""
    ensure_dir(path.parent)
    write_atomic(path, json.dumps(_to_json(journal), indent=1) + "\n")


def load(path: Path) -> Journal | None:
    """The journal, or None when there is none.

    :raise VirtError: INTERNAL_ERROR when the file is not a journal.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return _from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        raise VirtError(
            ErrorCode.INTERNAL_ERROR, f"storage migration journal '{path}' is damaged: {err}"
        ) from err


def remove(path: Path) -> None:
    remove_quietly(path)
