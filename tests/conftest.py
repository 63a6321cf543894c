"""Shared pytest fixtures for virtshift's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The shared libvirt / libvirt-test-API corpus, a sibling of the repository
#: (``../shared/corpus``).  Never written to by tests.
CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run the long variants (tests marked 'long'): the full fault matrix and the "
        "32-domain load test; `scripts/test --long` runs everything",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long variant: run with `scripts/test --long`")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared corpus directory; skips the test when it is not there."""
    if not CORPUS_DIR.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS_DIR} (expected ../shared/corpus)")
    return CORPUS_DIR
