"""copy_sparse: exact bytes, holes stay holes, progress, no half-written file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtshift.migrate.copy import copy_sparse


def test_copy_is_exact_and_sparse(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with src.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"\xab" * 3 * 1024 * 1024)
        f.seek(40 * 1024 * 1024)
        f.write(b"\x00" * 65536 + b"tail")  # allocated zeros must be kept as data
    seen: list[tuple[int, int]] = []
    dst = tmp_path / "dst.img"
    written = copy_sparse(str(src), str(dst), progress=lambda d, t: seen.append((d, t)))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == src.stat().st_size
    # holes stayed holes: far less allocated than the apparent size
    assert dst.stat().st_blocks * 512 < 16 * 1024 * 1024
    assert written == seen[-1][0] == seen[-1][1]
    assert not (tmp_path / "dst.img.part").exists()
    assert oct(dst.stat().st_mode & 0o777) == "0o600"


def test_failed_copy_leaves_no_file(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 10000)
    with pytest.raises(OSError):  # noqa: PT011 - the point is that nothing is left
        copy_sparse(str(src), str(tmp_path / "missing-dir" / "dst.img"))
    assert sorted(os.listdir(tmp_path)) == ["src.img"]
