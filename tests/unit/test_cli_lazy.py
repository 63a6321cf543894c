"""The CLI loads verb modules lazily: ``--version`` imports none, ``--help``
still lists every verb with its short help."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from virtshift.cli.main import LAZY_VERBS, _long_globals, cli


def _all_verbs() -> dict[str, str]:
    """Every verb and the module that defines it (all verb modules imported)."""
    for module in set(LAZY_VERBS.values()):
        importlib.import_module(module)
    return {name: cmd.callback.__module__ for name, cmd in cli.commands.items() if cmd.callback}


def test_lazy_verbs_name_each_verb_of_the_other_modules() -> None:
    verbs = _all_verbs()
    elsewhere = {n: m for n, m in verbs.items() if m != "virtshift.cli.main"}
    assert elsewhere == LAZY_VERBS
    assert "list" in verbs
    assert "snapshot-list" in verbs


def test_version_imports_no_verb_module() -> None:
    script = (
        "import json, sys\n"
        "from virtshift.cli.main import main\n"
        "rc = main(['--version'])\n"
        "print(json.dumps([rc, sorted(m for m in sys.modules if m.startswith('virtshift'))]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    version, last = res.stdout.splitlines()[0], res.stdout.splitlines()[-1]
    rc, modules = json.loads(last)
    assert rc == 0
    assert version.count(".") == 2
    assert not set(LAZY_VERBS.values()) & set(modules)
    assert "virtshift.libvirt" not in modules


def test_help_lists_every_verb_with_its_short_help() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtshift", "--help"], capture_output=True, text=True, check=True
    )
    lines = res.stdout.split("Commands:\n", 1)[1].splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.strip()}
    verbs = _all_verbs()
    assert set(listed) == set(verbs)
    for name in verbs:
        words = cli.commands[name].get_short_help_str(limit=45).rstrip(".").split()
        # click shortens the text to the terminal width; its first words are there
        assert listed[name].startswith(" ".join(words[:3])), name


def test_a_lazy_verb_runs() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtshift", "snapshot-list", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "List a domain's snapshots." in res.stdout


def test_list_loads_no_block_job_layer(tmp_path: Path) -> None:
    # `list` meets no job and logs nothing: the block-job and snapshot layers,
    # the job model, QEMU's process module, logging and difflib (click's
    # option suggestions) stay unloaded
    root = tmp_path / "root"
    script = (
        "import json, sys\n"
        "from virtshift.cli.main import main\n"
        f"rc = main(['-c', 'qemu:///embed?root={root}', 'list', '--all'])\n"
        "print(json.dumps([rc, sorted(sys.modules)]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rc, modules = json.loads(res.stdout.splitlines()[-1])
    assert rc == 0
    assert "virtshift.libvirt" in modules
    loaded = set(modules)
    heavy_modules = (
        "virtshift.runtime.blockjob",
        "virtshift.ops.snapshot",
        "virtshift.model.job",
        "subprocess",
        "difflib",
        "logging",
    )
    for heavy in heavy_modules:
        assert heavy not in loaded, heavy


@pytest.mark.parametrize(
    ("given", "passed"),
    [
        (["-c", "URI", "list", "-c"], ["--connect", "URI", "list", "-c"]),
        (["-d", "-c", "-d", "list"], ["--debug", "--connect", "-d", "list"]),
        (["list", "-d"], ["list", "-d"]),
        (["-c"], ["-c"]),
        (["-d", "-c"], ["--debug", "-c"]),
        ([], []),
    ],
)
def test_only_leading_global_options_are_spelled_long(given: list[str], passed: list[str]) -> None:
    assert _long_globals(given) == passed


def test_a_deferred_logger_logs_once_used(caplog: pytest.LogCaptureFixture) -> None:
    from virtshift.logs import DEBUG, get_logger

    log = get_logger("virtshift.test-deferred")
    with caplog.at_level(DEBUG, logger="virtshift.test-deferred"):
        assert log.isEnabledFor(DEBUG)
        log.debug("seen %s", 1)
    assert [r.getMessage() for r in caplog.records] == ["seen 1"]
    assert [r.name for r in caplog.records] == ["virtshift.test-deferred"]
