"""The driver's root is private to its owner, whatever the umask, and another
user reaches neither it nor its QEMU through virtshift."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtshift.libvirt as libvirt

from .conftest import destroy_all, domain_xml, make_image

NOBODY = 65534


def _modes(root: Path) -> dict[str, tuple[str, int]]:
    """Kind and permission bits of everything under (and including) ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = os.lstat(p)
            kind = (
                "dir"
                if stat.S_ISDIR(st.st_mode)
                else "sock"
                if stat.S_ISSOCK(st.st_mode)
                else "file"
                if stat.S_ISREG(st.st_mode)
                else "other"
            )
            out[str(p)] = (kind, stat.S_IMODE(st.st_mode))
    return out


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o000], indirect=True)
def test_everything_under_the_root_is_owner_only(tmp_path: Path, images: Path, umask: int) -> None:
    root = tmp_path / "deep" / "root"
    conn = libvirt.open(f"qemu:///embed?root={root}")
    try:
        disk = make_image(images / "d.qcow2")
        dom = conn.defineXML(domain_xml("perm", [("vda", disk, "qcow2")], agent=True))
        dom.create()
        xml = f"<domainsnapshot><name>s1</name><disks><disk name='vda'><source file='{images}/s1.qcow2'/></disk></disks></domainsnapshot>"
        dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
        modes = _modes(root)
        kinds = {k for k, _ in modes.values()}
        assert kinds == {"dir", "file", "sock"}
        socks = [p for p, (k, _) in modes.items() if k == "sock"]
        assert {Path(p).name for p in socks} >= {
            "monitor.sock",
            "query.sock",
            "org.qemu.guest_agent.0",
        }
        assert str(root / "log" / "qemu" / "perm.log") in modes
        assert str(root / "lib" / "qemu" / "snapshot" / "perm" / "s1.xml") in modes
        wrong = {
            p: (k, oct(m))
            for p, (k, m) in modes.items()
            if m != {"dir": 0o700, "file": 0o600, "sock": 0o600}[k]
        }
        assert wrong == {}
    finally:
        destroy_all(conn)
        conn.close()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory any user can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="virtshift-perm-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_nobody_env(shared: Path) -> tuple[list[str], dict[str, str]]:
    """An interpreter and environment ``nobody`` can use: the system Python and a
    world-readable copy of virtshift and the packages it imports."""
    import lxml

    py = shared / "py"
    shutil.copytree(Path(libvirt.__file__).parent, py / "virtshift")
    shutil.copytree(Path(lxml.__file__).parent, py / "lxml")
    for dirpath, dirnames, filenames in os.walk(py):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    os.chmod(py, 0o755)
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 for the unprivileged user")
    argv = [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        system_python,
        "-c",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(py), "HOME": str(shared)}
    return argv, env


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_another_user_reaches_neither_the_root_nor_its_qemu(shared_tmp: Path, images: Path) -> None:
    root = shared_tmp / "root"
    conn = libvirt.open(f"qemu:///embed?root={root}")
    try:
        dom = conn.createXML(
            domain_xml("mine", [("vda", make_image(images / "d.qcow2"), "qcow2")]), 0
        )
        monitor = root / "run" / "qemu" / "domain-mine" / "monitor.sock"
        assert monitor.exists()
        argv, env = _as_nobody_env(shared_tmp)
        script = textwrap.dedent(f"""\
            import errno, os, socket
            import virtshift.libvirt as libvirt
            assert os.geteuid() == {NOBODY}
            try:
                libvirt.open("qemu:///embed?root={root}")
                print("OPENED")
            except libvirt.libvirtError as err:
                print("ERR", err.get_error_code(), err)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("{monitor}")
                print("CONNECTED")
            except OSError as err:
                print("SOCK", errno.errorcode[err.errno])
            """)
        res = subprocess.run(
            [*argv, script], env=env, capture_output=True, text=True, check=False, timeout=120
        )
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith(f"ERR {libvirt.VIR_ERR_SYSTEM_ERROR} "), res.stdout
        assert "belongs to uid 0" in lines[0]
        assert lines[1] == "SOCK EACCES"
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        destroy_all(conn)
        conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(libvirt.libvirtError) as exc:
        libvirt.open(f"qemu:///embed?root={theirs}")
    assert exc.value.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
    assert f"belongs to uid {NOBODY}" in str(exc.value)
    assert list(theirs.iterdir()) == []  # nothing created in another user's root
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o700
