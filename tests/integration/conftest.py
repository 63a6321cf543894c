"""Fixtures for tests that start real QEMU and use real qemu-img / qemu-io.

Tests here are marked ``qemu``; they skip when QEMU is missing, unless
``VIRTSHIFT_REQUIRE_QEMU=1`` (set by CI), where a missing QEMU is a failure.
Each test gets its own embedded root; every QEMU started under it is killed at
teardown, so no test leaves a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lxml import etree

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    missing = not (QEMU and QEMU_IMG and QEMU_IO)
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.qemu)
            if missing:
                if os.environ.get("VIRTSHIFT_REQUIRE_QEMU") == "1":
                    item.add_marker(
                        pytest.mark.xfail(
                            reason="QEMU required but missing", strict=True, run=False
                        )
                    )
                else:
                    item.add_marker(
                        pytest.mark.skip(reason="qemu-system-x86_64/qemu-img/qemu-io not installed")
                    )


def qemu_img(*args: str) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)
    return res.stdout


def make_image(
    path: Path,
    fmt: str = "qcow2",
    size: str = "16M",
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
) -> Path:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    qemu_img(*args, str(path), size)
    return path


def blank_backing_format(path: Path) -> None:
    """Make ``path`` name its backing file but not the backing format.

    QEMU 7.2 no longer writes such images, so the backing-format header
    extension (magic 0xE2792ACA) of a normal one is renamed to an unknown
    extension, which QEMU skips.
    """
    raw = bytearray(path.read_bytes())
    pos = raw.find(bytes.fromhex("E2792ACA"), 0, 65536)
    assert pos > 0
    raw[pos : pos + 4] = bytes.fromhex("0badcafe")
    path.write_bytes(bytes(raw))


def status_commands(root: Path, name: str) -> set[str]:
    """QEMU's commands as the status of domain ``name`` records them: in the
    capability cache entry it names (or inline, in older status files)."""
    qemu = etree.fromstring((root / "run" / "qemu" / f"{name}.xml").read_bytes()).find("qemu")
    assert qemu is not None
    if qemu.get("caps") is None:
        return {c.get("name", "") for c in qemu.findall("command")}
    assert qemu.findall("command") == []
    entry = root / "cache" / "qemu" / qemu.get("caps", "")
    return set(json.loads(entry.read_text())["commands"])


def qemu_io_read(path: Path, fmt: str, pattern: int, offset: int, length: str) -> bool:
    """True when qemu-io reads ``pattern`` at ``offset`` (offline, read-only)."""
    res = subprocess.run(
        ["qemu-io", "-r", "-f", fmt, "-c", f"read -P 0x{pattern:x} {offset} {length}", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0 and "Pattern verification failed" not in res.stdout


def domain_xml(
    name: str,
    disks: list[tuple[str, Path, str]],
    *,
    uuid: str | None = None,
    agent: bool = False,
    extra: str = "",
) -> str:
    """A minimal libvirt domain: ``disks`` is [(target, path, format)]."""
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>"""
        for target, path, fmt in disks
    )
    chan = (
        """
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>"""
        if agent
        else ""
    )
    uuid_xml = f"\n  <uuid>{uuid}</uuid>" if uuid else ""
    return textwrap.dedent(f"""\
<domain type='qemu'>
  <name>{name}</name>{uuid_xml}
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>{disk_xml}{chan}{extra}
  </devices>
</domain>
""")


def destroy_all(conn) -> None:
    """Stop every running domain of ``conn`` (for roots other than the fixture's,
    which its teardown does not clean up)."""
    for dom in conn.listAllDomains(1):  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        dom.destroy()


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _released(pid: int) -> bool:
    """True once ``pid`` has exited and closed its files.  A killed multi-threaded
    process shows 'Z' for its leader while other threads still tear down and hold
    its files (and QEMU's image locks): wait until no thread is left but a zombie."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if state not in "ZX":
            return False
    return True


def kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` (not necessarily our child) and wait until its files are closed."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _released(pid), f"process {pid} to die")


def xml_chains(xml: str, key: str = "target") -> dict[str, list[str]]:
    """The files of every disk's chain in a domain XML, top first, by target
    (``key="target"``) or by device alias (``key="alias"``)."""
    from lxml import etree

    doc = etree.fromstring(xml.encode())
    out = {}
    for disk in doc.findall("devices/disk"):
        files = [disk.find("source").get("file")]
        bs = disk.find("backingStore")
        while bs is not None and bs.find("source") is not None:
            files.append(bs.find("source").get("file"))
            bs = bs.find("backingStore")
        out[disk.find(key).get("dev" if key == "target" else "name")] = files
    return out


def xml_chain(xml: str, target: str = "vda") -> list[str]:
    """The files of disk ``target``'s chain in a domain XML, top first."""
    chains = xml_chains(xml)
    if target not in chains:
        raise AssertionError(target)
    return chains[target]


def qemu_chains(dom) -> dict[str, list[str]]:
    """QEMU's graph from query-block: per device (qdev), its top node name and
    then the file of every layer, top first."""
    import json

    import virtshift.libvirt_qemu as libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    out = {}
    for dev in reply["return"]:
        files, image = [], dev["inserted"]["image"]
        while image:
            files.append(image["filename"])
            image = image.get("backing-image")
        out[dev["qdev"]] = [dev["inserted"]["node-name"], *files]
    return out


def status_pid(status: Path) -> int:
    """The QEMU pid recorded in a status file."""
    from lxml import etree

    return int(etree.fromstring(status.read_bytes()).get("pid"))


def _kill_all(root: Path) -> None:
    for status in (root / "run" / "qemu").glob("*.xml"):
        if status.name.startswith("."):
            continue
        pid = status_pid(status)
        if pid:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if (
                b"qemu-system" in cmd
                and str(root).encode() in Path(f"/proc/{pid}/cwd").resolve().as_posix().encode()
            ):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(
                    pid, signal.SIGKILL
                )
    time.sleep(0.05)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    r = tmp_path / "root"
    yield r
    if r.exists():
        _kill_all(r)


@pytest.fixture
def uri(root: Path) -> str:
    return f"qemu:///embed?root={root}"


@pytest.fixture
def conn(uri: str):
    import virtshift.libvirt as libvirt

    c = libvirt.open(uri)
    yield c
    c.close()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def tree_state(*dirs: Path) -> dict[str, bytes]:
    """Every regular file under ``dirs`` with its content (sockets and locks skipped)."""
    out: dict[str, bytes] = {}
    for d in dirs:
        if not d.exists():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.suffix != ".lock":
                out[str(p)] = p.read_bytes()
    return out


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created); skips the test when it cannot
    be mounted (needs root and mount(8)).  Unmounted on the way out."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"mounting a {size} tmpfs needs root and mount(8)")
    path.mkdir(exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def read_only_dir(d: Path) -> Iterator[str]:
    """No new file in ``d`` (root ignores modes): chattr +i, else a read-only bind mount.
    Yields which of the two it used; skips the test when neither works."""
    res = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True, check=False)
    if res.returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(d)], check=False)
        return
    why = res.stderr.strip()
    res = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"neither chattr +i ({why}) nor a bind mount is possible here")
    try:
        res = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(d)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount: {res.stderr.strip()}")
        yield "read-only bind mount"
    finally:
        subprocess.run(["umount", str(d)], check=False)
