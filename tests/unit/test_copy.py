"""copy_sparse / copy_files: exact bytes, holes stay holes, progress, no half-written
file, several threads, one bandwidth limit for all of them, write-behind and its
fallbacks, durability before each file is handed back."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from virtshift.migrate import copy as cp
from virtshift.migrate.copy import Pacer, WriteBehind, copy_files, copy_sparse

MiB = 1024 * 1024


def _sparse_file(path: Path, size_mib: int, fills: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
        for offset, data in fills:
            f.seek(offset)
            f.write(data)
    return path


def _data_bytes(path: Path) -> int:
    """Bytes in the data ranges of a file (what a sparse copy moves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(e - s for s, e in cp._data_ranges(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _failing(code: int, calls: list[int]) -> Callable[..., int]:
    """A sync_file_range stand-in that fails with ``code`` as the C function would."""

    def func(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append(length)
        ctypes.set_errno(code)
        return -1

    return func


def test_copy_is_exact_and_sparse(tmp_path: Path) -> None:
    src = _sparse_file(
        tmp_path / "src.img",
        64,
        [(MiB, b"\xab" * 3 * MiB), (40 * MiB, b"\x00" * 65536 + b"tail")],  # zeros kept as data
    )
    seen: list[tuple[int, int]] = []
    dst = tmp_path / "dst.img"
    written = copy_sparse(str(src), str(dst), progress=lambda d, t: seen.append((d, t)))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == src.stat().st_size
    # holes stayed holes: far less allocated than the apparent size
    assert dst.stat().st_blocks * 512 < 16 * MiB
    assert written == seen[-1][0] == seen[-1][1]
    assert not (tmp_path / "dst.img.part").exists()
    assert oct(dst.stat().st_mode & 0o777) == "0o600"


def test_failed_copy_leaves_no_file(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 10000)
    with pytest.raises(OSError):  # noqa: PT011 - the point is that nothing is left
        copy_sparse(str(src), str(tmp_path / "missing-dir" / "dst.img"))
    assert sorted(os.listdir(tmp_path)) == ["src.img"]


def test_several_files_in_pieces_over_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # small pieces and steps: every file is cut up and the threads interleave
    monkeypatch.setattr(cp, "PIECE", 256 * 1024)
    monkeypatch.setattr(cp, "CHUNK", 64 * 1024)
    srcs = [
        _sparse_file(
            tmp_path / f"s{i}.img",
            8,
            [
                (j * MiB + i * 4096, bytes([i + 1, j + 1]) * (100_000 + i * 777))
                for j in range(0, 8, 2)
            ],
        )
        for i in range(4)
    ]
    srcs.append(tmp_path / "empty.img")
    srcs[-1].write_bytes(b"")
    dsts = [tmp_path / f"d{i}.img" for i in range(len(srcs))]
    progress: dict[int, list[tuple[int, int]]] = {}
    threads: set[int] = set()
    two = threading.Barrier(2, timeout=30)

    def first_two_meet(fd: int, offset: int, length: int, flags: int) -> int:
        """Write-behind hook: the first thread waits until a second one copies too."""
        me = threading.get_ident()
        if me not in threads:
            threads.add(me)
            if len(threads) <= 2:
                two.wait()
        return 0

    def report(index: int, done: int, total: int) -> None:
        progress.setdefault(index, []).append((done, total))

    out = list(
        copy_files(
            [(str(s), str(d)) for s, d in zip(srcs, dsts, strict=True)],
            progress=report,
            threads=3,
            write_behind=WriteBehind(first_two_meet),
        )
    )
    assert [i for i, _n in out] == list(range(len(srcs)))  # in order
    for (_i, n), s, d in zip(out, srcs, dsts, strict=True):
        assert d.read_bytes() == s.read_bytes(), d
        assert n == _data_bytes(s)
    assert out[-1][1] == 0
    for i in range(4):
        dones = [dn for dn, _t in progress[i]]
        assert dones == sorted(dones)
        assert dones[-1] == progress[i][-1][1] == out[i][1]
    assert 4 not in progress  # nothing to copy, nothing reported
    assert len(threads) >= 2  # the copy really ran on several threads
    assert not list(tmp_path.glob("*.part"))


def test_each_file_is_fsynced_before_it_is_handed_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srcs = [_sparse_file(tmp_path / f"s{i}", 4, [(0, b"z" * 300_000)]) for i in range(3)]
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    gen = copy_files([(str(s), str(tmp_path / f"d{i}")) for i, s in enumerate(srcs)])
    for i, _n in gen:
        dst = tmp_path / f"d{i}"
        # the file itself and then its directory, before the caller hears of it
        assert synced[-2:] == [dst.stat().st_ino, tmp_path.stat().st_ino]
        assert not (tmp_path / f"d{i}.part").exists()


def test_stopping_early_keeps_finished_files_only(tmp_path: Path) -> None:
    srcs = [_sparse_file(tmp_path / f"s{i}", 4, [(0, b"q" * MiB)]) for i in range(3)]
    gen = copy_files([(str(s), str(tmp_path / f"d{i}")) for i, s in enumerate(srcs)])
    assert next(gen)[0] == 0
    gen.close()
    assert (tmp_path / "d0").read_bytes() == srcs[0].read_bytes()
    assert not (tmp_path / "d1").exists()
    assert not (tmp_path / "d2").exists()
    assert not list(tmp_path.glob("*.part"))


def test_write_behind_runs_on_real_files_and_falls_back_on_pipes(tmp_path: Path) -> None:
    wb = WriteBehind()
    if not wb.active:
        pytest.skip("no sync_file_range in this C library")
    f = tmp_path / "f"
    f.write_bytes(b"w" * 65536)
    fd = os.open(f, os.O_RDWR)
    try:
        wb(fd, 0, 65536)
    finally:
        os.close(fd)
    assert wb.active
    r, w = os.pipe()
    try:
        wb(w, 0, 4096)  # ESPIPE: not supported here, so switched off, not an error
    finally:
        os.close(r)
        os.close(w)
    assert not wb.active


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_copy_without_write_behind_support_is_still_exact(tmp_path: Path, code: int) -> None:
    src = _sparse_file(tmp_path / "s", 16, [(0, b"a" * 5 * MiB), (9 * MiB, b"b" * 100)])
    calls: list[int] = []
    wb = WriteBehind(_failing(code, calls))
    out = list(copy_files([(str(src), str(tmp_path / "d"))], write_behind=wb, threads=1))
    assert (tmp_path / "d").read_bytes() == src.read_bytes()
    assert out == [(0, _data_bytes(src))]
    assert len(calls) == 1  # tried once, then left to the final fsync
    assert not wb.active


def test_copy_without_sync_file_range_at_all(tmp_path: Path) -> None:
    src = _sparse_file(tmp_path / "s", 16, [(MiB, b"c" * 3 * MiB)])
    wb = WriteBehind(probe=False)
    assert not wb.active
    out = list(copy_files([(str(src), str(tmp_path / "d"))], write_behind=wb))
    assert out == [(0, _data_bytes(src))]
    assert (tmp_path / "d").read_bytes() == src.read_bytes()


def test_a_write_behind_error_fails_the_copy_and_leaves_nothing(tmp_path: Path) -> None:
    srcs = [_sparse_file(tmp_path / f"s{i}", 4, [(0, b"e" * MiB)]) for i in range(2)]
    wb = WriteBehind(_failing(errno.EIO, []))
    with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked below
        list(copy_files([(str(s), str(tmp_path / f"d{i}")) for i, s in enumerate(srcs)],
                        write_behind=wb))  # fmt: skip
    assert info.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]


def test_pacer_limits_all_threads_together() -> None:
    sleeps: list[float] = []
    lock = threading.Lock()

    def sleep(s: float) -> None:
        with lock:
            sleeps.append(s)

    pacer = Pacer(1000, clock=lambda: 0.0, sleep=sleep)  # time stands still
    workers = [
        threading.Thread(target=lambda: [pacer.account(100) for _ in range(10)]) for _ in range(3)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    # every byte of every thread counts against the one limit: 3,000 bytes at
    # 1,000 bytes/s are 3 s ahead of a clock that did not move
    assert sorted(sleeps) == pytest.approx([k * 0.1 for k in range(1, 31)])


def test_pacer_unlimited_never_sleeps_and_chunks() -> None:
    pacer = Pacer(0, sleep=lambda s: pytest.fail("slept"))
    pacer.account(10**12)
    assert pacer.chunk() == cp.CHUNK
    assert Pacer(MiB).chunk() == 64 * 1024  # about 1/10 s of data when limited
    assert Pacer(1000 * MiB).chunk() == cp.CHUNK
