"""Plain-text tables laid out exactly like virsh's (libvirt's ``vsh-table``).

Every cell is preceded by a space, every column but the last is padded to its
widest cell plus two spaces, and the rule under the header has width + 3
dashes per column.  Control characters are shown as ``\\xNN``; wide
characters count two columns.  Pure text, no IO.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

__all__ = ["render_table"]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The table as text, one line per row, each ending with a newline."""
    table = [[_safe_cell(c) for c in cells] for cells in [list(header), *rows]]
    widths = [max(_width(cells[i]) for cells in table) for i in range(len(header))]
    out = [_table_row(table[0], widths), "-" * sum(w + 3 for w in widths)]
    out.extend(_table_row(cells, widths) for cells in table[1:])
    return "".join(line + "\n" for line in out)


def _table_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = []
    for i, cell in enumerate(cells):
        pad = widths[i] - _width(cell) + 2 if i < len(cells) - 1 else 0
        parts.append(" " + cell + " " * pad)
    return "".join(parts)


def _safe_cell(text: str) -> str:
    """Replace characters without a printable width by ``\\xNN`` per UTF-8 byte."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            out.append("".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def _width(text: str) -> int:
    """Terminal columns of ``text`` (combining and format characters take none)."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width
