"""Shared pytest fixtures for virtshift's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The shared libvirt / libvirt-test-API corpus, a sibling of the repository
#: (``../shared/corpus``).  Never written to by tests.
CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared corpus directory; skips the test when it is not there."""
    if not CORPUS_DIR.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS_DIR} (expected ../shared/corpus)")
    return CORPUS_DIR
