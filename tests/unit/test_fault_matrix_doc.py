"""docs/FAULT-MATRIX.md shows the fault matrix the integration test runs.

The matrix's cells are data (tests/integration/fault_matrix.py); the table and
the notes of the document are rendered from it.  These tests fail when the
document drifts from the data, or the data from itself.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from tests.integration import fault_matrix as fm

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "FAULT-MATRIX.md"


def test_doc_table_and_notes_are_the_data() -> None:
    doc = DOC.read_text()
    assert fm.generated(doc, "table") == fm.render_table(), (
        "docs/FAULT-MATRIX.md is stale: python -m tests.integration.fault_matrix --write"
    )
    assert fm.generated(doc, "notes") == fm.render_notes(), (
        "docs/FAULT-MATRIX.md is stale: python -m tests.integration.fault_matrix --write"
    )


def test_every_operation_meets_every_fault_once() -> None:
    pairs = Counter((c.op, c.fault) for c in fm.CELLS)
    ops = [op for op, _ in fm.OPS]
    faults = [f for f, _ in fm.FAULTS]
    assert set(pairs) == {(o, f) for o in ops for f in faults}
    assert max(pairs.values()) == 1


def test_every_cell_says_how_it_is_shown() -> None:
    for c in fm.CELLS:
        assert c.outcome in fm.OUTCOMES, c
        assert c.note.strip(), c
        if c.outcome == fm.NA:
            assert not c.run, c  # a reason, not a test
            assert not c.covered, c
        else:
            assert c.run != bool(c.covered), c  # run here, or by exactly one other test
        assert not (c.long and not c.run), c


def test_covering_tests_exist() -> None:
    for c in fm.CELLS:
        if not c.covered:
            continue
        path, name = c.covered.split("::")
        func = re.sub(r"\[.*\]$", "", name)
        text = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(func)}\(", text, re.M), c.covered
        param = re.search(r"\[(.*)\]$", name)
        if param:  # the parameter id appears in that file
            for part in param.group(1).split("-"):
                assert part in text, c.covered


def test_rewrite_is_stable() -> None:
    doc = DOC.read_text()
    assert fm.rewrite(doc) == doc
