"""Snapshot metadata files: round trip, atomic writes, unsafe names, planted links."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from virtshift.errors import ErrorCode, NoDomainSnapshot, VirtError
from virtshift.store.snapshots import SnapshotStore, check_snapshot_name

DOC_S3 = "<domainsnapshot>\n  <name>s3</name>\n</domainsnapshot>\n"
DOC_S2 = (
    "<domainsnapshot>\n  <name>s2</name>\n  <parent>\n    <name>s3</name>\n  </parent>\n"
    "  <description>caf\u00e9 \u5feb\u7167</description>\n</domainsnapshot>\n"
)


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshot" / "vm1")


def test_round_trip(store: SnapshotStore) -> None:
    assert store.names() == []
    assert store.read_all() == {}
    assert store.keys() == {}
    store.write("s3", DOC_S3)
    store.write("s2", DOC_S2)
    assert store.read("s3") == DOC_S3
    assert store.read("s2") == DOC_S2
    assert store.names() == ["s2", "s3"]
    assert store.read_all() == {"s2": DOC_S2, "s3": DOC_S3}
    st = os.lstat(store.dir / "s2.xml")
    assert store.keys()["s2"] == store.key("s2") == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert sorted(store.keys()) == ["s2", "s3"]
    assert (store.dir / "s2.xml").read_text(encoding="utf-8") == DOC_S2


def test_files_and_directory_are_private(store: SnapshotStore) -> None:
    store.write("s1", DOC_S3)
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((store.dir / "s1.xml").stat().st_mode) == 0o600


def test_replace_is_atomic_and_leaves_no_temp_files(store: SnapshotStore) -> None:
    store.write("s1", "old")
    inode_before = (store.dir / "s1.xml").stat().st_ino
    store.write("s1", "new")
    assert store.read("s1") == "new"
    # replaced by rename: a new inode, never the old file rewritten in place
    assert (store.dir / "s1.xml").stat().st_ino != inode_before
    assert sorted(os.listdir(store.dir)) == ["s1.xml"]


def test_failed_write_keeps_old_document(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("s1", "old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(VirtError) as info:
        store.write("s1", "new")
    monkeypatch.undo()
    assert info.value.code == ErrorCode.OPERATION_FAILED
    assert "No space left on device" in info.value.message
    assert store.read("s1") == "old"
    assert sorted(os.listdir(store.dir)) == ["s1.xml"]


def test_unencodable_text_is_refused_before_touching_disk(store: SnapshotStore) -> None:
    with pytest.raises(VirtError) as info:
        store.write("s1", "\udcff")
    assert info.value.code == ErrorCode.INVALID_ARG
    assert not store.dir.exists()


def test_temp_files_and_other_files_are_not_snapshots(store: SnapshotStore) -> None:
    store.write("s1", DOC_S3)
    (store.dir / ".s2.xml.1234.tmp").write_text("half written")
    (store.dir / ".hidden.xml").write_text("x")
    (store.dir / "notes.txt").write_text("x")
    (store.dir / "s1.xml.bak").write_text("x")
    (store.dir / ".xml").write_text("x")
    assert store.names() == ["s1"]
    assert store.read_all() == {"s1": DOC_S3}


def test_names_after_restart(tmp_path: Path) -> None:
    first = SnapshotStore(tmp_path / "snap")
    for name in ("b", "a", "c d", "\u5feb\u7167"):
        first.write(name, f"<domainsnapshot><name>{name}</name></domainsnapshot>")
    first.remove("c d")
    again = SnapshotStore(tmp_path / "snap")
    assert again.names() == ["a", "b", "\u5feb\u7167"]
    assert again.read("a") == "<domainsnapshot><name>a</name></domainsnapshot>"


def test_remove(store: SnapshotStore) -> None:
    store.write("s1", DOC_S3)
    store.remove("s1")
    store.remove("s1")  # already gone: quiet
    store.remove("never")  # store dir exists, file does not
    assert store.names() == []
    with pytest.raises(NoDomainSnapshot) as info:
        store.read("s1")
    assert info.value.message == (
        "Domain snapshot not found: no domain snapshot with matching name 's1'"
    )


def test_missing_directory_is_an_empty_store(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "absent")
    assert store.names() == []
    assert store.read_all() == {}
    store.remove("s1")
    with pytest.raises(NoDomainSnapshot):
        store.read("s1")
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a/b", "invalid snapshot name 'a/b': name can't contain '/'"),
        ("../etc/passwd", "invalid snapshot name '../etc/passwd': name can't contain '/'"),
        ("/abs", "invalid snapshot name '/abs': name can't contain '/'"),
        (".hidden", "invalid snapshot name '.hidden': name can't start with '.'"),
        ("..", "invalid snapshot name '..': name can't start with '.'"),
        (".", "invalid snapshot name '.': name can't start with '.'"),
        ("", "invalid snapshot name '': name can't be empty"),
        ("a\0b", "invalid snapshot name 'a\\0b': name can't contain a NUL character"),
        (
            "x" * 201,
            f"invalid snapshot name '{'x' * 201}': name can't be longer than 200 characters",
        ),
        (
            "\u00e9" * 101,
            f"invalid snapshot name '{chr(0xE9) * 101}': name can't be longer than 200 bytes",
        ),
    ],
)
def test_unsafe_names_are_refused_before_touching_disk(
    tmp_path: Path, name: str, message: str
) -> None:
    store = SnapshotStore(tmp_path / "snap")
    for call in (
        lambda: store.write(name, "x"),
        lambda: store.read(name),
        lambda: store.remove(name),
        lambda: store.path(name),
        lambda: check_snapshot_name(name),
    ):
        with pytest.raises(VirtError) as info:
            call()
        assert info.value.code == ErrorCode.XML_DETAIL
        assert info.value.message == message
    assert list(tmp_path.iterdir()) == []


def test_longest_names_are_accepted(store: SnapshotStore) -> None:
    store.write("x" * 200, "a")
    store.write("\u00e9" * 100, "b")
    assert store.names() == sorted(["x" * 200, "\u00e9" * 100])


def test_planted_symlink_is_refused(store: SnapshotStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("do not touch")
    store.write("s1", DOC_S3)
    (store.dir / "evil.xml").symlink_to(secret)
    with pytest.raises(VirtError) as info:
        store.write("evil", "<domainsnapshot/>")
    assert info.value.code == ErrorCode.OPERATION_FAILED
    assert "is a symbolic link" in info.value.message
    with pytest.raises(VirtError, match="is a symbolic link") as info:
        store.read("evil")
    assert info.value.code == ErrorCode.OPERATION_FAILED
    # listing shows it, and reading everything fails loudly instead of hiding it
    assert store.names() == ["evil", "s1"]
    with pytest.raises(VirtError, match="is a symbolic link"):
        store.read_all()
    with pytest.raises(VirtError, match="is a symbolic link"):
        store.keys()  # what a load of the tree reads first
    assert secret.read_text() == "do not touch"
    assert (store.dir / "evil.xml").is_symlink()
    # removing unlinks the link itself, never its target
    store.remove("evil")
    assert secret.read_text() == "do not touch"
    assert store.names() == ["s1"]


def test_dangling_symlink_is_refused(store: SnapshotStore, tmp_path: Path) -> None:
    store.write("s1", DOC_S3)
    target = tmp_path / "would-be-created"
    (store.dir / "evil.xml").symlink_to(target)
    with pytest.raises(VirtError, match="is a symbolic link"):
        store.write("evil", "x")
    with pytest.raises(VirtError, match="is a symbolic link"):
        store.read("evil")
    assert not target.exists()


def test_non_regular_file_is_refused(store: SnapshotStore) -> None:
    store.write("s1", DOC_S3)
    (store.dir / "dir.xml").mkdir()
    os.mkfifo(store.dir / "fifo.xml")
    for name in ("dir", "fifo"):
        with pytest.raises(VirtError, match="is not a regular file"):
            store.write(name, "x")
        with pytest.raises(VirtError, match="is not a regular file"):
            store.read(name)
        with pytest.raises(VirtError, match="is not a regular file"):
            store.key(name)
    with pytest.raises(VirtError, match="is not a regular file"):
        store.keys()
    with pytest.raises(VirtError) as info:
        store.remove("dir")
    assert info.value.code == ErrorCode.OPERATION_FAILED


def test_non_utf8_document_is_reported(store: SnapshotStore) -> None:
    store.write("s1", DOC_S3)
    (store.dir / "s1.xml").write_bytes(b"<domainsnapshot>\xff</domainsnapshot>")
    with pytest.raises(VirtError, match="is not UTF-8 text") as info:
        store.read("s1")
    assert info.value.code == ErrorCode.OPERATION_FAILED
