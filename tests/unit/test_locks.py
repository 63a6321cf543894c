"""Locks and atomic writes between threads of one process (and shared locks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from virtshift.errors import ErrorCode, VirtError
from virtshift.store.files import FileLock, write_atomic


def test_shared_locks_coexist_and_keep_the_exclusive_one_out(tmp_path: Path) -> None:
    path = tmp_path / "meta.lock"
    r1 = FileLock(path, what="metadata", shared=True, timeout=0)
    r2 = FileLock(path, what="metadata", shared=True, timeout=0)
    with r1.hold("read"), r2.hold("read"):
        assert r1.held
        assert r2.held
        assert path.read_text() == ""  # readers do not write themselves in
        writer = FileLock(path, what="metadata", timeout=0.1)
        with pytest.raises(VirtError) as exc:
            writer.acquire("write")
        assert exc.value.code == ErrorCode.OPERATION_TIMEOUT
    with FileLock(path, what="metadata", timeout=0).hold("write"):
        assert "operation write" in path.read_text()
        with pytest.raises(VirtError) as exc:
            FileLock(path, what="metadata", shared=True, timeout=0.1).acquire("read")
        assert exc.value.code == ErrorCode.OPERATION_TIMEOUT
        assert "operation write" in exc.value.message


def test_two_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "vm.lock"
    inside = 0
    most = 0
    guard = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal inside, most
        try:
            for _ in range(50):
                with FileLock(path, what="domain 'vm'", timeout=30).hold("change"):
                    with guard:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.001)
                    with guard:
                        inside -= 1
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert most == 1


def test_write_atomic_from_many_threads_to_one_file(tmp_path: Path) -> None:
    """Unlocked writers of the same file (a capabilities cache): every write lands
    whole, none fails because another thread used the same temporary file."""
    path = tmp_path / "cache.json"
    payloads = [f"{i}".encode() * 4096 for i in range(8)]
    errors: list[BaseException] = []

    def work(data: bytes) -> None:
        try:
            for _ in range(100):
                write_atomic(path, data)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]
