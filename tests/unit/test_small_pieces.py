"""Errors, URIs, capability replies, query-block, status files, locks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from virtshift.errors import ErrorCode, NoDomain, QMPError, VirtError
from virtshift.model.domain import Disk, Domain, StorageSource
from virtshift.model.status import DomainState, DomainStatus, QemuCaps
from virtshift.qmp.models import caps_from_replies, parse_query_block
from virtshift.store.files import FileLock, write_atomic
from virtshift.uri import resolve_uri
from virtshift.xml.status import format_status, parse_status


def test_error_messages_follow_libvirt() -> None:
    assert str(NoDomain("vm1")) == "Domain not found: no domain with matching name 'vm1'"
    assert NoDomain("x").code == 42
    err = VirtError(ErrorCode.OPERATION_INVALID, "domain is not running")
    assert err.message == "Requested operation is not valid: domain is not running"
    assert VirtError(ErrorCode.NO_CONNECT, "xen:///").message == (
        "no connection driver available for xen:///"
    )
    q = QMPError("transaction", "Could not create file")
    assert q.message == (
        "internal error: unable to execute QEMU command 'transaction': Could not create file"
    )


def test_uris(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_uri("qemu:///embed?root=/srv/lab") == (
        "qemu:///embed?root=/srv/lab",
        Path("/srv/lab"),
    )
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("VIRTSHIFT_DEFAULT_URI", raising=False)
    assert resolve_uri(None) == ("qemu:///session", tmp_path / "virtshift" / "session")
    monkeypatch.setenv("VIRTSHIFT_DEFAULT_URI", "qemu:///embed?root=/x")
    assert resolve_uri(None)[1] == Path("/x")
    for bad, code in [
        ("qemu:///system", 5),
        ("qemu+ssh://h/session", 5),
        ("lxc:///", 5),
        ("qemu:///embed", 8),
        ("qemu:///embed?root=rel", 8),
    ]:
        with pytest.raises(VirtError) as exc:
            resolve_uri(bad)
        assert exc.value.code == code, bad


def test_caps_from_replies() -> None:
    caps = caps_from_replies(
        {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2 "},
        [{"name": "transaction"}, {"name": "query-block"}],
    )
    assert caps.version == "7.2.22"
    assert caps.package == "Debian 1:7.2"
    assert caps.transaction
    assert caps.has("query-block")
    assert not caps.has("drive-mirror")
    assert caps.features()["drive-mirror"] is False
    hidden = caps_from_replies({"qemu": {"major": 7, "minor": 2, "micro": 0}}, [{"name": "x"}])
    assert not hidden.transaction
    for version, commands in [
        ({}, []),
        ({"qemu": {"major": "x"}}, []),
        ({"qemu": {"major": 1, "minor": 2, "micro": 3}}, [{"nom": 1}]),
    ]:
        with pytest.raises(VirtError):
            caps_from_replies(version, commands)


def test_parse_query_block() -> None:
    reply = [
        {
            "device": "",
            "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
            "inserted": {
                "node-name": "libvirt-2-format",
                "image": {
                    "filename": "/i/top.qcow2",
                    "format": "qcow2",
                    "virtual-size": 16,
                    "backing-image": {
                        "filename": "/i/base.qcow2",
                        "format": "qcow2",
                        "virtual-size": 16,
                    },
                },
            },
        }
    ]
    (dev,) = parse_query_block(reply)
    assert dev.alias == "virtio-disk0"
    assert dev.node_name == "libvirt-2-format"
    assert [x.filename for x in dev.chain] == ["/i/top.qcow2", "/i/base.qcow2"]
    with pytest.raises(VirtError):
        parse_query_block({"not": "a list"})
    with pytest.raises(VirtError):
        parse_query_block([{"qdev": "q", "inserted": {"image": {"filename": 1}}}])


def test_status_round_trip() -> None:
    base = StorageSource(path="/i/base.qcow2", format="qcow2", index=1, backing_end=True)
    top = StorageSource(path="/i/top.qcow2", format="qcow2", index=2, backing=base)
    dom = Domain(
        name="vm",
        uuid="0e8a6b2c-3f6e-4a3b-9f0a-5b9a2e1f7c11",
        id=3,
        memory_kib=131072,
        disks=(
            Disk(target="vda", bus="virtio", driver_name="qemu", source=top, alias="virtio-disk0"),
        ),
    )
    st = DomainStatus(
        state=DomainState.PAUSED,
        reason="user",
        pid=1234,
        monitor="/r/m.sock",
        query_monitor="/r/q.sock",
        log="/l/vm.log",
        rundir="/r",
        persistent=True,
        caps=QemuCaps(version="7.2.22", package="p", commands=frozenset({"a", "b"})),
        next_index=3,
        domain=dom,
    )
    back = parse_status(format_status(st))
    assert back.state == DomainState.PAUSED
    assert back.pid == 1234
    assert back.next_index == 3
    assert back.caps == st.caps
    assert back.persistent
    assert back.rundir == "/r"
    disk = back.domain.disks[0]
    assert disk.alias == "virtio-disk0"
    assert back.domain.id == 3
    assert [(x.path, x.index, x.node_name) for x in disk.source.chain()] == [
        ("/i/top.qcow2", 2, "libvirt-2-format"),
        ("/i/base.qcow2", 1, "libvirt-1-format"),
    ]
    assert format_status(back) == format_status(st)
    with pytest.raises(VirtError) as exc:
        parse_status("<domstatus state='bogus'/>")
    assert exc.value.code == ErrorCode.INTERNAL_ERROR


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    p = tmp_path / "s.xml"
    write_atomic(p, "one")
    write_atomic(p, b"two")
    assert p.read_text() == "two"
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert [x.name for x in tmp_path.iterdir()] == ["s.xml"]  # no temp files left
    with pytest.raises(VirtError) as exc:
        write_atomic(tmp_path / "missing-dir" / "f", "x")
    assert exc.value.code == ErrorCode.OPERATION_FAILED


def test_file_lock_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "d.lock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from virtshift.store.files import FileLock
        lock = FileLock(Path({str(path)!r}), what="domain 'x'")
        lock.acquire("snapshot-create")
        print("held", flush=True)
        sys.stdin.readline()
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        lock = FileLock(path, what="domain 'x'", timeout=0.2)
        with pytest.raises(VirtError) as exc:
            lock.acquire("start")
        assert exc.value.code == ErrorCode.OPERATION_TIMEOUT
        assert f"pid {child.pid} operation snapshot-create" in exc.value.message
        assert not lock.held
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
    # the holder died: the lock is free again, no stale lock file blocks it
    lock = FileLock(path, what="domain 'x'", timeout=1)
    with lock.hold("start"):
        assert lock.held
    assert os.path.exists(path)


def test_write_atomic_never_follows_a_planted_temp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "s.xml"
    planted = tmp_path / f".s.xml.{os.getpid()}.{threading.get_native_id()}.tmp"
    planted.symlink_to(victim)
    write_atomic(target, "state")
    assert not planted.is_symlink()  # the planted name was the one used, and removed
    assert target.read_text() == "state"
    assert victim.read_text() == "precious"
    assert not target.is_symlink()


def test_prepared_files_take_effect_only_when_committed(tmp_path: Path) -> None:
    from virtshift.store.files import commit_prepared, prepare_atomic

    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text("old a")
    pa = prepare_atomic(a, "new a")
    pb = prepare_atomic(b, "new b", durable=False)
    # written under temporary names; nothing in place yet
    assert a.read_text() == "old a"
    assert not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(
        [pa.tmp.name, pb.tmp.name]
    )
    commit_prepared([pa, pb])
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    st = os.lstat(a)
    assert pa.key == (st.st_ino, st.st_size, st.st_mtime_ns)  # the key once in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.xml", "b.xml"]
    pa.discard()  # after commit: nothing to remove
    assert a.read_text() == "new a"
    with pytest.raises(ValueError, match="not prepared"):
        pa.commit()
    # discarded: nothing changes, and nothing is left
    pc = prepare_atomic(a, "never")
    pc.discard()
    pc.discard()
    assert a.read_text() == "new a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.xml", "b.xml"]


def test_a_failed_commit_leaves_the_rest_unwritten(tmp_path: Path) -> None:
    from virtshift.store.files import commit_prepared, prepare_atomic

    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    pa, pb = prepare_atomic(a, "a"), prepare_atomic(b, "b")
    os.unlink(pa.tmp)  # the first rename fails
    with pytest.raises(VirtError) as exc:
        commit_prepared([pa, pb])
    assert exc.value.code == ErrorCode.OPERATION_FAILED
    assert "a.xml" in str(exc.value)
    assert sorted(tmp_path.iterdir()) == []


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    from virtshift.store.files import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(dead.stdout)
    names = [
        f".vm.xml.{gone}.7.tmp",  # a dead process's: removed
        f".other.xml.{gone}.7.tmp",  # not asked for below, then removed
        f".vm.xml.{os.getpid()}.7.tmp",  # this process's: kept
        f".vm.xml.{os.getppid()}.7.tmp",  # a live process's: kept
        "vm.xml",
        ".vm.xml.tmp",
    ]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_stale_temps(tmp_path, {"vm.xml"}) == [tmp_path / names[0]]
    assert remove_stale_temps(tmp_path) == [tmp_path / names[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_snapshot_reads_its_status_back_only_with_a_spare_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # QEMU keeps two CPUs busy reading and running a snapshot's transaction
    from virtshift.runtime import snapshot

    for cpus, spare in ((1, False), (2, False), (3, True), (8, True)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert snapshot._spare_cpu() is spare
