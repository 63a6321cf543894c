"""The import rule of docs/ARCHITECTURE.md: pure layers never reach for IO layers.

``model``, ``xml``, ``jobs`` and the planners in ``ops`` must not import
``qmp.client``, ``runtime``, ``store`` or ``cli``; ``qmp`` must not import
``runtime`` or ``cli``.  ``jobs`` may use nothing of virtshift but ``model``,
``errors`` and itself.
The check walks every module's imports (ast), so it also catches imports
inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "virtshift"

FORBIDDEN = {
    "model": (
        "virtshift.qmp",
        "virtshift.runtime",
        "virtshift.store",
        "virtshift.cli",
        "virtshift.libvirt",
        "virtshift.xml",
        "virtshift.ops",
    ),
    "xml": (
        "virtshift.qmp",
        "virtshift.runtime",
        "virtshift.store",
        "virtshift.cli",
        "virtshift.libvirt",
        "virtshift.ops",
    ),
    "ops": (
        "virtshift.qmp.client",
        "virtshift.runtime",
        "virtshift.store",
        "virtshift.cli",
        "virtshift.libvirt",
    ),
    "qmp": ("virtshift.runtime", "virtshift.store", "virtshift.cli", "virtshift.libvirt"),
    "store": ("virtshift.qmp", "virtshift.runtime", "virtshift.cli", "virtshift.libvirt"),
}
# jobs follows the rule of model.
FORBIDDEN["jobs"] = FORBIDDEN["model"]

#: Layers that may import only these virtshift modules (and their own).
ALLOWED = {
    "jobs": ("virtshift.model", "virtshift.errors", "virtshift.jobs"),
}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = sorted((SRC / layer).glob("*.py"))
    assert files, f"layer {layer} has no modules"
    bad = [
        f"{f.relative_to(SRC)} imports {imp}"
        for f in files
        for imp in _imports(f)
        if any(imp == p or imp.startswith(p + ".") for p in FORBIDDEN[layer])
    ]
    assert bad == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_allowed_imports(layer: str) -> None:
    files = sorted((SRC / layer).glob("*.py"))
    assert files, f"layer {layer} has no modules"
    bad = [
        f"{f.relative_to(SRC)} imports {imp}"
        for f in files
        for imp in _imports(f)
        if (imp == "virtshift" or imp.startswith("virtshift."))
        and not any(imp == p or imp.startswith(p + ".") for p in ALLOWED[layer])
    ]
    assert bad == []


def test_cli_start_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, virtshift.cli.main; "
        "print(sorted(m for m in ('lxml', 'socket', 'rich', 'asyncio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
