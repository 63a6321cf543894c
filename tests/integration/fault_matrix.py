"""The fault matrix as data: operation x fault -> outcome, one cell each.

This one structure parametrizes ``test_fault_matrix.py`` and renders the table of
``docs/FAULT-MATRIX.md`` (``python -m tests.integration.fault_matrix`` prints it;
a unit test fails when the document's table differs).  A cell is run by the
matrix (``run``), or names the existing test that already makes exactly that
fault (``covered``), or cannot happen (outcome ``n/a`` and the reason).
No QEMU here: pure data, importable by unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass

#: (id, what the operation is)
OPS: tuple[tuple[str, str], ...] = (
    ("snapshot-1", "snapshot create ATOMIC, 1 disk"),
    ("snapshot-16", "snapshot create ATOMIC, 16 disks"),
    ("blockcopy", "mirror start (blockCopy)"),
    ("mirror-snapshot", "mirror start (snapshot with a `<mirror>`)"),
    ("pivot", "pivot (blockJobAbort PIVOT)"),
    ("reopen-mirror", "pivot (snapshot delete REOPEN_MIRROR)"),
    ("stream", "stream (blockRebase onto base)"),
    ("commit", "commit (blockCommit, not active)"),
    ("active-commit", "commit (blockCommit ACTIVE + pivot)"),
    ("migrate:overlays", "migrate-storage: overlays"),
    ("migrate:mirroring", "migrate-storage: mirroring"),
    ("migrate:copied", "migrate-storage: copy layers"),
    ("migrate:verified", "migrate-storage: verify"),
    ("migrate:pivoted", "migrate-storage: pivot"),
    ("migrate:merged", "migrate-storage: merge (stream)"),
    ("migrate:cleaned", "migrate-storage: delete source"),
)

#: (id, how the fault is made)
FAULTS: tuple[tuple[str, str], ...] = (
    ("file-missing", "a file the operation needs is not there"),
    ("dir-missing", "the target directory is not there"),
    ("read-only-dir", "the target directory takes no new file (`chattr +i` / ro bind mount)"),
    ("no-space", "the target is a full (or 1 MiB) tmpfs"),
    ("wrong-format", "a reused file is not the declared format"),
    ("qemu-killed", "SIGKILL of QEMU at a named point of the operation"),
    ("python-killed", "SIGKILL of the calling process at a named point"),
    ("qmp-closed", "the QMP connection closes after QEMU ran the command, before its reply"),
)

REFUSED = "refused, nothing changed"
ROLLED_BACK = "rolled back"
COMPLETED = "completed"
RECOVERED = "recovered at next call"
RESUME = "resume/abort"
NA = "n/a"
OUTCOMES = (REFUSED, ROLLED_BACK, COMPLETED, RECOVERED, RESUME, NA)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cell:
    op: str
    fault: str
    outcome: str
    #: what happens, or why the cell cannot happen
    note: str
    #: run by test_fault_matrix.py
    run: bool = False
    #: only with --long
    long: bool = False
    #: the existing test that makes this fault ("file::test[param]")
    covered: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}--{self.fault}"


def _c(op: str, fault: str, outcome: str, note: str, **kw: object) -> Cell:
    return Cell(op=op, fault=fault, outcome=outcome, note=note, **kw)  # type: ignore[arg-type]


_SNAP = "tests/integration/test_snapshot.py"
_JOBS = "tests/integration/test_blockjobs.py"
_CLIJOBS = "tests/integration/test_cli_blockjobs.py"
_MIG = "tests/integration/test_migrate.py"
_OPEN = "QEMU holds every layer of the running chain open: removing or locking a path does not reach the operation"
_NO_FILE = "creates no file"
_STEPS_NO_FILE = ("mirroring", "verified", "pivoted", "merged")

CELLS: tuple[Cell, ...] = (
    # -- snapshot create, 1 and 16 disks ------------------------------------------------
    _c(
        "snapshot-1",
        "file-missing",
        REFUSED,
        "REUSE_EXT overlay missing: OPERATION_INVALID before QEMU is asked",
        covered=f"{_SNAP}::test_reuse_external",
    ),
    _c(
        "snapshot-16",
        "file-missing",
        REFUSED,
        "REUSE_EXT, the 16th overlay missing: OPERATION_INVALID, the 15 others untouched",
        run=True,
        long=True,
    ),
    _c("snapshot-1", "dir-missing", REFUSED, "INVALID_ARG before QEMU is asked", run=True),
    _c(
        "snapshot-16",
        "dir-missing",
        REFUSED,
        "INVALID_ARG before QEMU is asked",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-1",
        "read-only-dir",
        ROLLED_BACK,
        "QEMU cannot create the overlay: the transaction fails, INTERNAL_ERROR",
        run=True,
    ),
    _c(
        "snapshot-16",
        "read-only-dir",
        ROLLED_BACK,
        "QEMU created 15 overlays, the 16th fails: graph rolled back, the 15 files removed",
        run=True,
    ),
    _c(
        "snapshot-1",
        "no-space",
        ROLLED_BACK,
        "the overlay cannot be written: transaction fails, file removed",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-16",
        "no-space",
        ROLLED_BACK,
        "the 16th overlay cannot be written: transaction fails, 16 files removed",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-1",
        "wrong-format",
        REFUSED,
        "REUSE_EXT overlay is not qcow2: its header is read before QEMU is asked, OPERATION_FAILED naming it, the user's file untouched",
        run=True,
    ),
    _c(
        "snapshot-16",
        "wrong-format",
        REFUSED,
        "REUSE_EXT, 15 good overlays and a non-qcow2 one: refused before QEMU is asked, all 16 user files untouched",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-1",
        "qemu-killed",
        ROLLED_BACK,
        "killed before the transaction: error, domain shut off, definition and metadata as before",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-16",
        "qemu-killed",
        ROLLED_BACK,
        "killed before the transaction: error, domain shut off, definition and metadata as before",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-1",
        "python-killed",
        RECOVERED,
        "killed after QEMU switched, before anything was recorded: the next call finds the switched graph and completes the snapshot (XML, definition, metadata)",
        run=True,
    ),
    _c(
        "snapshot-16",
        "python-killed",
        RECOVERED,
        "as for 1 disk, all 16 disks",
        run=True,
        long=True,
    ),
    _c(
        "snapshot-1",
        "qmp-closed",
        COMPLETED,
        "QEMU ran the transaction: the call reconnects, sees the switched graph and records the snapshot",
        run=True,
    ),
    _c("snapshot-16", "qmp-closed", COMPLETED, "as for 1 disk, all 16 disks", run=True, long=True),
    # -- blockCopy ------------------------------------------------------------------------
    _c(
        "blockcopy",
        "file-missing",
        REFUSED,
        "REUSE_EXT destination missing: refused before QEMU is asked",
        run=True,
        long=True,
    ),
    _c("blockcopy", "dir-missing", REFUSED, "INVALID_ARG before QEMU is asked", run=True),
    _c(
        "blockcopy",
        "read-only-dir",
        REFUSED,
        "qemu-img create fails: OPERATION_FAILED, nothing recorded",
        run=True,
        long=True,
    ),
    _c(
        "blockcopy",
        "no-space",
        ROLLED_BACK,
        "the copy job fails with ENOSPC: disk stays on its source",
        covered=f"{_CLIJOBS}::test_wait_exits_1_when_the_copy_fails",
    ),
    _c(
        "blockcopy",
        "wrong-format",
        REFUSED,
        "REUSE_EXT destination is not qcow2: refused, the file untouched",
        run=True,
    ),
    _c(
        "blockcopy",
        "qemu-killed",
        RECOVERED,
        "killed once the job runs: domain shut off, definition on the source; the copy file it created stays",
        run=True,
        long=True,
    ),
    _c(
        "blockcopy",
        "python-killed",
        RECOVERED,
        "killed after the job was recorded, before QEMU was asked: the next call forgets the job and removes the file it created",
        run=True,
    ),
    _c(
        "blockcopy",
        "qmp-closed",
        RECOVERED,
        "QEMU started the job: the call fails, the job is kept and the next call adopts it (the copy reaches ready)",
        run=True,
    ),
    # -- snapshot with a mirror -------------------------------------------------------------
    _c(
        "mirror-snapshot",
        "file-missing",
        REFUSED,
        "REUSE_EXT mirror missing: OPERATION_INVALID",
        covered=f"{_JOBS}::test_mirror_snapshot_bad_input",
    ),
    _c(
        "mirror-snapshot",
        "dir-missing",
        REFUSED,
        "the mirror's directory is missing: INVALID_ARG before the snapshot",
        run=True,
        long=True,
    ),
    _c(
        "mirror-snapshot",
        "read-only-dir",
        REFUSED,
        "the mirror cannot be created: refused before the snapshot",
        run=True,
    ),
    _c(
        "mirror-snapshot",
        "no-space",
        REFUSED,
        "the mirror cannot be created on a full file system: refused before the snapshot",
        run=True,
        long=True,
    ),
    _c(
        "mirror-snapshot",
        "wrong-format",
        REFUSED,
        "REUSE_EXT mirror not an image: CONFIG_UNSUPPORTED (a locked one: snapshot undone)",
        covered=f"{_JOBS}::test_mirror_that_cannot_start_undoes_the_snapshot",
    ),
    _c(
        "mirror-snapshot",
        "qemu-killed",
        RECOVERED,
        "killed after the snapshot, before the mirror starts: domain shut off, definition on the new overlay (all data there)",
        run=True,
        long=True,
    ),
    _c(
        "mirror-snapshot",
        "python-killed",
        RECOVERED,
        "killed after the snapshot, with the mirror recorded but not started: the next call forgets the mirror and records the snapshot as taken",
        run=True,
        long=True,
    ),
    _c(
        "mirror-snapshot",
        "qmp-closed",
        COMPLETED,
        "QEMU started the mirror: the call reconnects, adopts the job and records the snapshot",
        run=True,
        long=True,
    ),
    # -- pivot ---------------------------------------------------------------------------------
    _c(
        "pivot",
        "file-missing",
        REFUSED,
        "the reused destination's backing file is gone: OPERATION_INVALID, no pivot (QEMU would pivot onto zeros)",
        run=True,
    ),
    _c(
        "pivot",
        "dir-missing",
        NA,
        f"the destination is open in QEMU since the copy started; {_OPEN}",
    ),
    _c("pivot", "read-only-dir", NA, f"a pivot {_NO_FILE}"),
    _c(
        "pivot",
        "no-space",
        NA,
        f"a pivot {_NO_FILE}; running out during the copy is blockcopy/no-space",
    ),
    _c(
        "pivot",
        "wrong-format",
        NA,
        "the destination's format is checked when the copy starts (blockcopy/wrong-format)",
    ),
    _c(
        "pivot",
        "qemu-killed",
        RECOVERED,
        "killed after block-job-complete was answered: domain shut off, definition on the source, which holds every write",
        run=True,
        long=True,
    ),
    _c(
        "pivot",
        "python-killed",
        RECOVERED,
        "killed after block-job-complete was answered: the next call applies the pivot",
        run=True,
    ),
    _c(
        "pivot",
        "qmp-closed",
        RECOVERED,
        "QEMU pivoted but the reply was lost: error, the next call applies the pivot",
        run=True,
    ),
    _c(
        "reopen-mirror",
        "file-missing",
        REFUSED,
        "destination chain incomplete: OPERATION_INVALID, nothing changed",
        covered=f"{_JOBS}::test_ovirt_flow_of_the_proposal",
    ),
    _c("reopen-mirror", "dir-missing", NA, f"the mirror is open in QEMU; {_OPEN}"),
    _c("reopen-mirror", "read-only-dir", NA, f"a pivot {_NO_FILE}"),
    _c("reopen-mirror", "no-space", NA, f"a pivot {_NO_FILE}"),
    _c(
        "reopen-mirror",
        "wrong-format",
        NA,
        "the mirror's format is checked when the snapshot is taken (mirror-snapshot/wrong-format)",
    ),
    _c(
        "reopen-mirror",
        "qemu-killed",
        RECOVERED,
        "killed after block-job-complete was answered: domain shut off, definition on the source overlay, which holds every write",
        run=True,
        long=True,
    ),
    _c(
        "reopen-mirror",
        "python-killed",
        RECOVERED,
        "killed after block-job-complete: the next call applies the pivot; REOPEN_MIRROR again drops the snapshot",
        run=True,
        long=True,
    ),
    _c(
        "reopen-mirror",
        "qmp-closed",
        RECOVERED,
        "the reply to block-job-complete is lost: the next call applies the pivot; REOPEN_MIRROR again drops the snapshot",
        run=True,
    ),
    # -- stream and commit -------------------------------------------------------------------
    _c(
        "stream",
        "file-missing",
        REFUSED,
        "a base not in the chain: INVALID_ARG",
        covered=f"{_JOBS}::test_bad_block_job_input",
    ),
    _c("stream", "dir-missing", NA, f"a stream {_NO_FILE}; {_OPEN}"),
    _c("stream", "read-only-dir", NA, f"a stream {_NO_FILE} (it writes into the open top)"),
    _c(
        "stream",
        "no-space",
        NA,
        "writes go to the already open top; an ENOSPC there is a guest I/O error, not this operation's",
    ),
    _c("stream", "wrong-format", NA, "every layer's format is fixed when the chain was opened"),
    _c(
        "stream",
        "qemu-killed",
        RECOVERED,
        "killed right after job-finalize (QEMU 7.2 rewrote vda's backing name): the call that finalized flushed vda first, so the data the stream moved reads back with every guest write; definition as before, the domain starts again",
        run=True,
    ),
    _c(
        "stream",
        "python-killed",
        RECOVERED,
        "killed after QEMU started the job, before it was recorded running: the next call adopts and finishes it",
        run=True,
    ),
    _c(
        "stream",
        "qmp-closed",
        RECOVERED,
        "QEMU started the job, the reply was lost: error; the next call adopts and finishes it",
        run=True,
        long=True,
    ),
    _c(
        "commit",
        "file-missing",
        REFUSED,
        "top not above base: INVALID_ARG",
        covered=f"{_JOBS}::test_bad_block_job_input",
    ),
    _c("commit", "dir-missing", NA, f"a commit {_NO_FILE}; {_OPEN}"),
    _c("commit", "read-only-dir", NA, f"a commit {_NO_FILE} (it writes into the open base)"),
    _c(
        "commit",
        "no-space",
        NA,
        "writes go to the already open base; an ENOSPC there is a guest I/O error, not this operation's",
    ),
    _c("commit", "wrong-format", NA, "every layer's format is fixed when the chain was opened"),
    _c(
        "commit",
        "qemu-killed",
        RECOVERED,
        "killed right after job-finalize (QEMU 7.2 dropped mid from vda's backing name): base was flushed first, so the committed data reads back with every guest write; definition as before, the domain starts again",
        run=True,
        long=True,
    ),
    _c(
        "commit",
        "python-killed",
        RECOVERED,
        "killed after QEMU started the job: the next call adopts and finishes it",
        run=True,
        long=True,
    ),
    _c(
        "commit",
        "qmp-closed",
        RECOVERED,
        "QEMU started the job, the reply was lost: the next call adopts and finishes it",
        run=True,
    ),
    _c(
        "active-commit",
        "file-missing",
        REFUSED,
        "a base index beyond the chain: INVALID_ARG",
        covered=f"{_JOBS}::test_bad_block_job_input",
    ),
    _c("active-commit", "dir-missing", NA, f"an active commit {_NO_FILE}; {_OPEN}"),
    _c("active-commit", "read-only-dir", NA, f"an active commit {_NO_FILE}"),
    _c("active-commit", "no-space", NA, "writes go to the already open base"),
    _c(
        "active-commit",
        "wrong-format",
        NA,
        "every layer's format is fixed when the chain was opened",
    ),
    _c(
        "active-commit",
        "qemu-killed",
        RECOVERED,
        "killed after block-job-complete was answered: domain shut off, definition on the old top, which holds every write",
        run=True,
        long=True,
    ),
    _c(
        "active-commit",
        "python-killed",
        RECOVERED,
        "killed after block-job-complete: the next call applies the pivot onto the base",
        run=True,
        long=True,
    ),
    _c(
        "active-commit",
        "qmp-closed",
        RECOVERED,
        "the reply to block-job-complete is lost: the next call applies the pivot",
        run=True,
        long=True,
    ),
    # -- migrate-storage, step by step -------------------------------------------------------
    _c(
        "migrate:overlays",
        "file-missing",
        REFUSED,
        "the destination directory is missing: refused, nothing written",
        covered=f"{_MIG}::test_missing_destination_changes_nothing",
    ),
    _c(
        "migrate:overlays",
        "dir-missing",
        REFUSED,
        "the destination directory is missing: refused, nothing written",
        covered=f"{_MIG}::test_missing_destination_changes_nothing",
    ),
    _c(
        "migrate:overlays",
        "read-only-dir",
        RESUME,
        "the source overlay cannot be created: fails before any change; --abort, then a move succeeds",
        covered=f"{_MIG}::test_read_only_source_fails_before_any_change",
    ),
    _c(
        "migrate:overlays",
        "no-space",
        RESUME,
        "the destination fills up: consistent on the source; --abort cleans up",
        covered=f"{_MIG}::test_destination_fills_up",
    ),
    _c(
        "migrate:overlays",
        "wrong-format",
        NA,
        "migrate-storage creates its overlays; it reuses no file",
    ),
    _c(
        "migrate:overlays",
        "qemu-killed",
        RESUME,
        "QEMU killed after the step: --resume restarts the domain on the source chain and finishes",
        run=True,
        long=True,
    ),
    _c(
        "migrate:overlays",
        "python-killed",
        RESUME,
        "--resume finishes, --abort returns to the source",
        covered=f"{_MIG}::test_crash_then_resume[overlays]",
    ),
    _c(
        "migrate:overlays",
        "qmp-closed",
        COMPLETED,
        "the reply to the mirrored snapshot's transaction is lost: the call connects again, sees QEMU carried it out, and the move finishes",
        run=True,
    ),
    *(
        _c(
            f"migrate:{s}",
            f,
            NA,
            f"this step {_NO_FILE}; the fault bites at 'overlays' or 'copy layers'",
        )
        for s in _STEPS_NO_FILE
        for f in ("file-missing", "dir-missing", "read-only-dir", "no-space")
        if not (s == "verified" and f == "file-missing")
    ),
    _c(
        "migrate:verified",
        "file-missing",
        RESUME,
        "a copied layer removed before the pivot: --resume refuses to pivot (consistent on the source), --abort returns",
        run=True,
    ),
    *(
        _c(f"migrate:{s}", "wrong-format", NA, "no file is reused; a damaged copy is 'copy layers'")
        for s in ("mirroring", "pivoted", "merged", "cleaned")
    ),
    _c("migrate:copied", "file-missing", NA, "the step copies from files QEMU holds open"),
    _c(
        "migrate:copied",
        "dir-missing",
        NA,
        "checked at 'overlays' (the destination directory is where the mirror lives)",
    ),
    _c(
        "migrate:copied",
        "read-only-dir",
        RESUME,
        "the destination takes no new file when the layers are copied: --resume fails, consistent on the source; once writable, --resume finishes",
        run=True,
        long=True,
    ),
    _c(
        "migrate:copied",
        "no-space",
        RESUME,
        "the copy runs out of space: consistent on the source; --abort cleans up",
        covered=f"{_MIG}::test_destination_fills_up",
    ),
    _c(
        "migrate:copied",
        "wrong-format",
        RESUME,
        "a damaged copied layer: never pivoted to; --abort",
        covered=f"{_MIG}::test_damaged_destination_layer_is_never_pivoted_to",
    ),
    _c(
        "migrate:verified",
        "wrong-format",
        RESUME,
        "content damage found by --verify full: never pivoted to",
        covered=f"{_MIG}::test_full_verify_names_the_damaged_layer",
    ),
    _c(
        "migrate:cleaned",
        "file-missing",
        NA,
        "a source file already gone is not an error when deleting it",
    ),
    _c(
        "migrate:cleaned",
        "dir-missing",
        NA,
        "the source directory holds the running chain until the pivot",
    ),
    _c(
        "migrate:cleaned",
        "read-only-dir",
        NA,
        "cleaning runs after the pivot: the destination holds the consistent chain whatever it leaves",
    ),
    _c("migrate:cleaned", "no-space", NA, "deleting needs no space"),
    *(
        _c(
            f"migrate:{s}",
            "python-killed",
            RESUME,
            "--resume finishes, --abort returns to the source",
            covered=f"{_MIG}::test_crash_then_resume[{s}]",
        )
        for s in ("mirroring", "copied", "verified", "pivoted", "merged")
    ),
    _c(
        "migrate:cleaned",
        "python-killed",
        RESUME,
        "killed after journaling the cleanup: --resume finishes it",
        run=True,
        long=True,
    ),
    _c(
        "migrate:mirroring",
        "qemu-killed",
        RESUME,
        "--resume restarts the domain on the source chain and finishes",
        covered=f"{_MIG}::test_qemu_killed_then_resume_restarts_on_the_consistent_chain[mirroring-persistent]",
    ),
    _c(
        "migrate:pivoted",
        "qemu-killed",
        RESUME,
        "--resume restarts the domain on the destination chain and finishes",
        covered=f"{_MIG}::test_qemu_killed_then_resume_restarts_on_the_consistent_chain[pivoted-persistent]",
    ),
    *(
        _c(
            f"migrate:{s}",
            "qemu-killed",
            RESUME,
            "QEMU killed after the step: --resume restarts the domain on the consistent chain and finishes",
            run=True,
            long=True,
        )
        for s in ("copied", "verified", "merged")
    ),
    _c(
        "migrate:cleaned",
        "qemu-killed",
        RESUME,
        "QEMU killed after the pivot and cleanup: --resume restarts on the destination",
        run=True,
        long=True,
    ),
    _c(
        "migrate:mirroring",
        "qmp-closed",
        NA,
        "a mirror runs inside QEMU with no command; its start is 'overlays'",
    ),
    _c("migrate:copied", "qmp-closed", NA, "copying is qemu-img and the file system, no QMP"),
    _c("migrate:verified", "qmp-closed", NA, "verifying reads files, no QMP"),
    _c(
        "migrate:pivoted",
        "qmp-closed",
        RESUME,
        "the reply to block-job-complete is lost: the call fails; --resume finishes",
        run=True,
    ),
    _c(
        "migrate:merged",
        "qmp-closed",
        RESUME,
        "the reply to block-stream is lost: the call fails; --resume finishes",
        run=True,
        long=True,
    ),
    _c("migrate:cleaned", "qmp-closed", NA, "deleting source files sends no QMP"),
)


def cell(op: str, fault: str) -> Cell:
    return next(c for c in CELLS if (c.op, c.fault) == (op, fault))


def render_table() -> str:
    """The Markdown table of docs/FAULT-MATRIX.md: one row per operation, one column
    per fault, each cell's outcome (``*``: run only with ``--long``)."""
    short = {
        REFUSED: "refused",
        ROLLED_BACK: "rolled back",
        COMPLETED: "completed",
        RECOVERED: "recovered",
        RESUME: "resume/abort",
        NA: "n/a",
    }
    head = "| operation | " + " | ".join(f for f, _ in FAULTS) + " |"
    rows = [head, "|" + "---|" * (len(FAULTS) + 1)]
    for op, what in OPS:
        cells = []
        for fault, _ in FAULTS:
            c = cell(op, fault)
            cells.append(short[c.outcome] + ("\\*" if c.run and c.long else ""))
        rows.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def render_notes() -> str:
    """Every cell, one row: what happens or why it cannot, and which test shows it."""
    lines = []
    for op, _what in OPS:
        for fault, _ in FAULTS:
            c = cell(op, fault)
            if c.covered:
                where = f"`{c.covered}`"
            elif c.run:
                where = f"`test_cell[{c.id}]`" + (" (long)" if c.long else "")
            else:
                where = "-"
            lines.append(f"| {op} | {fault} | {c.outcome} | {c.note} | {where} |")
    head = "| operation | fault | outcome | what happens | test |\n|---|---|---|---|---|\n"
    return head + "\n".join(lines) + "\n"


#: The generated parts of docs/FAULT-MATRIX.md sit between these markers.
MARKERS = {
    "table": ("<!-- fault-table: generated from tests/integration/fault_matrix.py -->",
              "<!-- fault-table: end -->"),
    "notes": ("<!-- fault-notes: generated from tests/integration/fault_matrix.py -->",
              "<!-- fault-notes: end -->"),
}  # fmt: skip


def generated(doc: str, part: str) -> str:
    """The text between the markers of ``part`` in ``doc`` (without the newline
    that follows the opening marker)."""
    begin, end = MARKERS[part]
    return doc.split(begin + "\n", 1)[1].split(end, 1)[0]


def rewrite(doc: str) -> str:
    """``doc`` with both generated parts rendered anew."""
    for part, text in (("table", render_table()), ("notes", render_notes())):
        old = generated(doc, part)
        begin = MARKERS[part][0]
        doc = doc.replace(begin + "\n" + old, begin + "\n" + text, 1)
    return doc


if __name__ == "__main__":
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "FAULT-MATRIX.md"
    if sys.argv[1:] == ["--write"]:
        path.write_text(rewrite(path.read_text()))
    else:
        print(render_table())
        print(render_notes())
