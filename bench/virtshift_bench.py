"""virtshift benchmarks: every row of BENCHMARKS.md, each against its reference
in the same run, on real QEMU.  Run it with ``bench/run`` (see there).

Rows (ids in results.json):

* ``snapshot``  -- ``snapshotCreateXML`` ATOMIC disk-only on 1/4/16/30/64 disks,
  overlays created by QEMU (``created``) or pre-created and reused
  (``precreated``, REUSE_EXT), against the same ``transaction`` sent raw over
  QMP to a QEMU with the same ``-blockdev`` layout (a twin domain started by
  virtshift, driven over its monitor socket while virtshift is not connected),
  and against libvirt 9.0 (``--with-libvirt``).
* ``pivot``     -- ``blockJobAbort(PIVOT)`` of a ready ``blockCopy`` and
  ``snapshot.delete(REOPEN_MIRROR)`` of a mirrored snapshot, call to return,
  against raw ``block-job-complete`` -> ``BLOCK_JOB_COMPLETED``.
* ``migrate``   -- ``migrate_storage`` of a two-layer chain (2 GiB of data; 256
  MiB with --quick), idle and busy guest, against ``qemu-img convert`` of the
  same chain + raw snapshot/mirror/pivot, and against a libvirt flow.
* ``startup``   -- ``virtshift --version`` and ``virtshift list`` against
  ``python3 -c pass`` (same interpreter).
* ``tree``      -- 10/100/1,000 snapshots (REDEFINE, metadata only) in one
  domain: ``snapshot-list --tree``, ``snapshotLookupByName``, creating one more.

Every repetition of a row runs its systems one after the other, in an order
that rotates, so that a change in machine load hits all of them alike.  The
first repetition of each series is a warm-up and is not counted.  Nothing here
changes virtshift: slow parts are measured (per-phase timings, cProfile) and
reported.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import io
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import virtshift
import virtshift.libvirt as vlv
import virtshift.libvirt_qemu as vlvq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1024 * 1024
NOBODY = 65534
SNAP_FLAGS = vlv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | vlv.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
BEGIN = "<!-- BEGIN GENERATED NUMBERS (bench/run rewrites this section) -->"
END = "<!-- END GENERATED NUMBERS -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- statistics -------------------------------------------------------------------------------


def stats(xs: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles (seconds) of one series."""
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    q1, q3 = (
        (statistics.quantiles(s, n=4, method="inclusive")[i] for i in (0, 2))
        if len(s) > 1
        else (s[0], s[0])
    )
    return {
        "n": len(s),
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "q1": q1,
        "q3": q3,
        "values": [round(x, 6) for x in xs],
    }


def ratio_info(a: list[float], b: list[float]) -> dict[str, Any]:
    """median(a)/median(b), and the quartiles of the paired per-repetition ratios."""
    if not a or not b:
        return {}
    out: dict[str, Any] = {"ratio": statistics.median(a) / statistics.median(b)}
    pairs = [x / y for x, y in zip(a, b, strict=False) if y > 0]
    if len(pairs) > 1:
        q = statistics.quantiles(pairs, n=4, method="inclusive")
        out["paired_q1"], out["paired_q3"] = q[0], q[2]
    return out


# -- small helpers ----------------------------------------------------------------------------


def img(*args: str) -> str:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def target(i: int) -> str:
    """vda, vdb, ..., vdz, vdaa, ..."""
    s, i = "", i + 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(97 + r) + s
    return "vd" + s


def domain_xml(name: str, paths: list[str]) -> str:
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{p}'/><target dev='{target(i)}' bus='virtio'/></disk>"
        for i, p in enumerate(paths)
    )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>"
        f"<devices>{disks}</devices></domain>"
    )


def snapshot_xml(name: str, overlays: list[str], mirror: str | None = None) -> str:
    m = f"<mirror file='{mirror}' format='qcow2'/>" if mirror else ""
    disks = "".join(
        f"<disk name='{target(i)}' snapshot='external'><driver type='qcow2'/>"
        f"<source file='{p}'/>{m if i == 0 else ''}</disk>"
        for i, p in enumerate(overlays)
    )
    return f"<domainsnapshot><name>{name}</name><disks>{disks}</disks></domainsnapshot>"


def precreate(pairs: list[tuple[str, str]]) -> None:
    """qemu-img create OVERLAY -b BACKING for each (backing, overlay), 4 at a time."""
    with ThreadPoolExecutor(4) as ex:
        list(
            ex.map(
                lambda p: img("create", "-q", "-f", "qcow2", "-b", p[0], "-F", "qcow2", p[1]), pairs
            )
        )


def cp_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


# -- raw QMP ----------------------------------------------------------------------------------


#: A node name in libvirt's scheme, and its index.
_NODE_INDEX = re.compile(r"libvirt-([0-9]+)-(?:format|storage)")


class RawQMP:
    """A bare QMP client on a blocking unix socket: JSON lines, an id per
    command, events kept while a reply is awaited.  Written here, apart from
    virtshift's Monitor, so the reference does not share its code; like it,
    no thread and no event loop, and one thread uses it.

    ``soon=True`` sends the negotiation and returns at once: :meth:`ready`
    reads the greeting and the negotiation's reply (a connection overlapped
    with other work, as the floors do)."""

    def __init__(self, path: str, *, soon: bool = False) -> None:
        import socket

        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.count = 0
        self.tail = b""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.caps = self.send("qmp_capabilities", None)
        if not soon:
            self.ready()

    def ready(self) -> None:
        greeting = self.read()
        assert "QMP" in greeting, greeting
        self.reply(self.caps)

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("QEMU closed the monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, cmd: str, args: dict[str, Any] | None, *, held: int = 0) -> int:
        """Write a command (as virtshift does: no blanks after separators); with
        ``held``, all but its last ``held`` bytes, which :meth:`finish` writes."""
        self.count += 1
        msg: dict[str, Any] = {"execute": cmd, "id": self.count}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        self.sock.sendall(data[: len(data) - held])
        self.tail = data[len(data) - held :]
        return self.count

    def finish(self) -> None:
        """Write what :meth:`send` held back."""
        self.sock.sendall(self.tail)
        self.tail = b""

    def unread(self) -> int:
        """Bytes written that QEMU has not read yet (``SIOCOUTQ``)."""
        import fcntl

        got = fcntl.ioctl(self.sock.fileno(), 0x5411, b"\0\0\0\0")
        return int.from_bytes(got, sys.byteorder, signed=True)

    def reply(self, ident: int) -> Any:
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"QMP error: {msg['error']}")
                return msg.get("return")

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.reply(self.send(cmd, args))

    def execute_until(
        self, cmd: str, args: dict[str, Any], events: tuple[str, ...], job: str
    ) -> dict[str, Any]:
        """Send a command and wait for the first of ``events`` about ``job``."""
        self.events.clear()  # only what comes after the command counts
        self.execute(cmd, args)
        while True:
            for ev in self.events:
                if ev["event"] in events and ev.get("data", {}).get("device") == job:
                    self.events.remove(ev)
                    return ev
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


# -- per-phase timing of virtshift calls ------------------------------------------------------

#: (module, class or None, attribute, label or None = derived from the arguments)
PATCH_POINTS: list[tuple[str, str | None, str, str | None]] = [
    ("virtshift.qmp.client", "Monitor", "connect", "QMP connect + negotiate"),
    ("virtshift.qmp.client", "Monitor", "close", "QMP disconnect"),
    ("virtshift.qmp.client", "Monitor", "execute", None),
    # a command sent (primed first, or whole), then its reply awaited after other
    # work (all count as the command)
    ("virtshift.qmp.client", "Monitor", "prime", None),
    ("virtshift.qmp.client", "Monitor", "submit", None),
    ("virtshift.qmp.client", "Pending", "result", None),
    (
        "virtshift.runtime.driver",
        "Driver",
        "prepare_status",
        "build the new status while QEMU works (overlapped)",
    ),
    (
        "virtshift.runtime.driver",
        "Driver",
        "read_back",
        "parse the new status back for a next call (while QEMU runs)",
    ),
    ("virtshift.qmp.client", "Monitor", "wait_event", "wait for a QEMU event"),
    ("virtshift.store.files", "FileLock", "acquire", "take the domain lock"),
    ("virtshift.runtime.driver", "Driver", "record", "read + parse status/config XML"),
    ("virtshift.runtime.driver", None, "write_atomic", "state writes (write_atomic)"),
    ("virtshift.store.snapshots", None, "write_atomic", "state writes (write_atomic)"),
    ("virtshift.migrate.journal", None, "write_atomic", "state writes (write_atomic)"),
    # a snapshot writes its status and metadata files (and syncs them) while QEMU
    # works, and puts them in place (renames, one directory sync each) after
    (
        "virtshift.runtime.driver",
        None,
        "prepare_atomic",
        "state files written under temporary names (prepare_atomic)",
    ),
    (
        "virtshift.store.snapshots",
        None,
        "prepare_atomic",
        "state files written under temporary names (prepare_atomic)",
    ),
    (
        "virtshift.store.files",
        None,
        "commit_prepared",
        "state files put in place (rename + directory fsync)",
    ),
    ("virtshift.runtime.driver", None, "format_status", "format status XML"),
    ("virtshift.runtime.driver", None, "format_domain", "format domain XML"),
    ("virtshift.runtime.snapshot", None, "format_snapshot", "format snapshot XML"),
    ("virtshift.runtime.snapshot", "Snapshots", "load", "load snapshot tree (parse every file)"),
    ("virtshift.migrate.engine", None, "copy_files", "copy layers (copy_files)"),
    ("subprocess", None, "run", None),
    ("time", None, "sleep", "sleep (polling)"),
]


class Phases:
    """Exclusive wall time per phase of the calls made on this thread meanwhile."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}
        self.total = 0.0
        self._undo: list[tuple[Any, str, Any]] = []
        self._stack: list[list[float]] = []
        self._tid = threading.get_ident()

    def _wrap(self, fn: Callable[..., Any], label: str | None, attr: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._tid:
                return fn(*args, **kwargs)
            if label is not None:
                name = label
            elif attr in ("execute", "submit", "prime"):
                name = f"QMP {args[1]}"
            elif attr == "result":  # Pending.result
                name = f"QMP {args[0]._command}"
            else:  # subprocess.run
                argv = args[0] if args else kwargs.get("args", [])
                name = "subprocess " + " ".join(str(a) for a in list(argv)[:2])
            if inspect.isgeneratorfunction(fn):  # time each step, not the creation
                return self._steps(name, fn(*args, **kwargs))
            return self._measure(name, lambda: fn(*args, **kwargs))

        return wrapper

    def _measure(self, name: str, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        self._stack.append([0.0])
        try:
            return call()
        finally:
            el = time.perf_counter() - t0
            child = self._stack.pop()[0]
            slot = self.acc.setdefault(name, [0.0, 0])
            slot[0] += el - child
            slot[1] += 1
            if self._stack:
                self._stack[-1][0] += el

    def _steps(self, name: str, gen: Iterator[Any]) -> Iterator[Any]:
        done = object()
        while (item := self._measure(name, lambda: next(gen, done))) is not done:
            yield item

    def __enter__(self) -> Phases:
        import importlib

        self.missing: list[str] = []
        for modname, cls, attr, label in PATCH_POINTS:
            try:  # src/ changes under the bench: skip a point that moved
                mod = importlib.import_module(modname)
                owner = getattr(mod, cls) if cls else mod
                orig = owner.__dict__[attr] if cls else getattr(owner, attr)
            except (ImportError, AttributeError, KeyError):
                self.missing.append(f"{modname}.{cls + '.' if cls else ''}{attr}")
                continue
            self._undo.append((owner, attr, orig))
            setattr(owner, attr, self._wrap(orig, label, attr))
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total = time.perf_counter() - self._t0
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)

    def report(self) -> dict[str, Any]:
        items = sorted(self.acc.items(), key=lambda kv: -kv[1][0])
        accounted = sum(v[0] for _k, v in items)
        out = {k: {"ms": round(v[0] * 1000, 3), "calls": int(v[1])} for k, v in items}
        out["other Python (parsing, planning, bookkeeping)"] = {
            "ms": round((self.total - accounted) * 1000, 3),
            "calls": 0,
        }
        rep: dict[str, Any] = {"total_ms": round(self.total * 1000, 3), "phases": out}
        if self.missing:
            rep["not_instrumented"] = self.missing
        return rep


def profile_text(fn: Callable[[], Any], path: Path, limit: int = 45) -> None:
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.strip_dirs().sort_stats("cumulative").print_stats(limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())


# -- libvirt in session mode, as uid 65534 ----------------------------------------------------


class Libvirt:
    """libvirtd (session mode) and the libvirt side script, both as uid 65534."""

    def __init__(self, work: Path) -> None:
        self.base = work / "lv"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.side: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}

    def _env(self) -> list[str]:
        b = self.base
        return [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/bin",
            f"HOME={b}/home",
            f"XDG_RUNTIME_DIR={b}/run",
            f"XDG_CONFIG_HOME={b}/cfg",
            f"XDG_CACHE_HOME={b}/cache",
            "LC_ALL=C.UTF-8",
        ]

    @staticmethod
    def _missing() -> list[str]:
        missing = []
        if not shutil.which("libvirtd"):
            missing.append("libvirtd")
        if (
            not Path("/usr/bin/python3").exists()
            or subprocess.run(
                ["/usr/bin/python3", "-c", "import libvirt, libvirt_qemu"], capture_output=True
            ).returncode
        ):
            missing.append("python3-libvirt")
        if not shutil.which("setpriv"):
            missing.append("setpriv")
        return missing

    def start(self) -> None:
        """Install (apt) if needed, start libvirtd and the side script; raise with a reason."""
        if os.geteuid() != 0:
            raise RuntimeError("needs root (to run libvirtd as uid 65534 with setpriv)")
        if self._missing():
            log("libvirt: installing libvirt-daemon, libvirt-daemon-driver-qemu, python3-libvirt")
            pkgs = [
                "libvirt-daemon",
                "libvirt-daemon-driver-qemu",
                "python3-libvirt",
                "libvirt-clients",
            ]
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]
            if subprocess.run(cmd, capture_output=True, env=env).returncode:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
                subprocess.run(cmd, capture_output=True, env=env)
            if self._missing():
                raise RuntimeError(f"missing after apt-get install: {', '.join(self._missing())}")
        b = self.base
        for d in ("home", "run", "cfg", "cache", "img"):
            (b / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "libvirt_side.py", b / "libvirt_side.py")
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(b)], check=True)
        os.chmod(b / "run", 0o700)
        dlog = open(b / "libvirtd.log", "wb")  # noqa: SIM115 - kept open for the daemon
        self.daemon = subprocess.Popen(
            [*self._env(), "libvirtd"],
            cwd=b,
            stdout=dlog,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        sock = b / "run" / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                tail = (b / "libvirtd.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"libvirtd did not start: {tail}")
            time.sleep(0.05)
        self.side = subprocess.Popen(
            [*self._env(), "/usr/bin/python3", str(b / "libvirt_side.py")],
            cwd=b,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(b / "side.log", "w"),  # noqa: SIM115
            text=True,
            start_new_session=True,
        )
        hello = self.call({"op": "hello"})
        v, q = int(hello["libvirt"]), int(hello["qemu"])
        self.info = {
            "libvirt": f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}",
            "qemu": f"{q // 1000000}.{q // 1000 % 1000}.{q % 1000}",
            "uid": hello["uid"],
            "uri": "qemu:///session",
        }

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.side is not None
        assert self.side.stdin is not None
        assert self.side.stdout is not None
        self.side.stdin.write(json.dumps(req) + "\n")
        self.side.stdin.flush()
        line = self.side.stdout.readline()
        if not line:
            raise RuntimeError(
                "libvirt side script died: " + (self.base / "side.log").read_text()[-800:]
            )
        out = json.loads(line)
        if not out.get("ok"):
            raise RuntimeError(f"libvirt {req['op']}: {out.get('error')}\n{out.get('trace', '')}")
        return out  # type: ignore[no-any-return]

    def subdir(self, name: str) -> str:
        d = self.base / "img" / name
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, NOBODY, NOBODY)
        return str(d)

    def stop(self) -> None:
        if self.side is not None:
            with contextlib.suppress(Exception):
                self.call({"op": "snap_teardown"})
            with contextlib.suppress(Exception):
                assert self.side.stdin
                self.side.stdin.close()
                self.side.wait(20)
            if self.side.poll() is None:
                self.side.kill()
                self.side.wait()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()


#: virtio-blk-pci devices that fit on q35's root bus next to QEMU's own devices (the
#: 31st fails: "PCI: no slot/function available"); past that, the bench first asks
#: virtshift whether it can start the domain at all.
VIRTIO_MAX = 30


class _SnapSystem:
    """One system's side of a snapshot repetition: setup (not timed), rep (timed), teardown."""

    name = ""

    def __init__(self, bench: Bench, n: int, mode: str, row: dict[str, Any], tag: str) -> None:
        self.b, self.n, self.mode, self.row, self.tag = bench, n, mode, row, tag
        self.reuse = mode == "precreated"
        self.dir: Path | None = None
        self.tops: list[str] = []

    def _images(self, k: int) -> list[str]:
        self.dir = self.b.work / "snap" / f"{self.name}-{self.tag}-{k}"
        self.dir.mkdir(parents=True)
        paths = [str(self.dir / f"d{i}.qcow2") for i in range(self.n)]
        precreate_images(paths)
        self.tops = paths
        return paths

    def _new(self, k: int) -> list[str]:
        assert self.dir is not None
        new = [str(self.dir / f"d{i}.s{k}.qcow2") for i in range(self.n)]
        if self.reuse:
            precreate(list(zip(self.tops, new, strict=True)))
        return new

    def setup(self, k: int) -> None:
        raise NotImplementedError

    def rep(self, k: int, how: str = "timed") -> float:
        raise NotImplementedError

    def teardown(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class _VsSnap(_SnapSystem):
    name = "virtshift"

    def setup(self, k: int) -> None:
        self.dom: vlv.virDomain | None = None
        paths = self._images(k)
        self.dname = f"vs{self.tag}-{k}"
        self.dom = self.b.vs_start(self.dname, paths)

    def rep(self, k: int, how: str = "timed") -> float:
        assert self.dom is not None
        dom, new = self.dom, self._new(k)
        flags = SNAP_FLAGS | (vlv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT if self.reuse else 0)
        xml = snapshot_xml(f"s{k}", new)
        box: list[Any] = []
        os.sync()  # no writeback of what ran before counts against this call
        t0 = time.perf_counter()
        if how == "phases":
            with Phases() as ph:
                box.append(dom.snapshotCreateXML(xml, flags))
            self.row["phases"] = ph.report()
        elif how == "profile":
            prof = self.b.out / "profiles" / f"snapshot-{self.n}-{self.mode}.txt"
            profile_text(lambda: box.append(dom.snapshotCreateXML(xml, flags)), prof)
            self.row["profile"] = str(prof.relative_to(self.b.out))
        else:
            box.append(dom.snapshotCreateXML(xml, flags))
        t = time.perf_counter() - t0
        box[0].delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)  # metadata never piles up
        self.tops = new
        return t

    def status_file_facts(self) -> dict[str, Any]:
        text = (self.b.root / "run" / "qemu" / f"{self.dname}.xml").read_text()
        return {
            "bytes": len(text),
            "elements": text.count("<"),
            "qemu_command_elements": text.count("<command "),
        }

    def xml_costs(self) -> dict[str, float]:
        """virtshift's status (de)serialization against libxml2 alone on the same document."""
        from lxml import etree

        from virtshift.xml.status import format_status, parse_status

        text = (self.b.root / "run" / "qemu" / f"{self.dname}.xml").read_bytes()
        st = parse_status(text)
        tree = etree.fromstring(text)

        def med(fn: Callable[[], Any]) -> float:
            xs = []
            for _ in range(15):
                t0 = time.perf_counter()
                fn()
                xs.append(time.perf_counter() - t0)
            return round(statistics.median(xs) * 1000, 3)

        return {
            "format_status_ms": med(lambda: format_status(st)),
            "lxml_tostring_same_tree_ms": med(lambda: etree.tostring(tree)),
            "parse_status_ms": med(lambda: parse_status(text)),
            "lxml_fromstring_same_text_ms": med(lambda: etree.fromstring(text)),
        }

    def teardown(self) -> None:
        dom = getattr(self, "dom", None)
        self.b.destroy(dom)
        self.dom = None
        super().teardown()


class _RawSnap(_SnapSystem):
    """The same transaction over a bare QMP connection: to a twin domain that
    virtshift started (same -blockdev layout), or, past virtshift's disk limit,
    to a QEMU the bench starts with the same layout behind pcie-root-ports."""

    name = "raw"

    def __init__(self, *args: Any, twin: bool = True) -> None:
        super().__init__(*args)
        self.use_twin = twin

    def setup(self, k: int) -> None:
        self.twin: vlv.virDomain | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.raw: RawQMP | None = None
        paths = self._images(k)
        name = f"raw{self.tag}-{k}"
        if self.use_twin:
            self.twin = self.b.vs_start(name, paths)
            self.raw = RawQMP(self.b.monitor_path(name))
            self.row["raw_qemu"] = "twin domain started by virtshift (identical -blockdev layout)"
        else:
            self.proc, self.raw = self.b.raw_qemu_many_disks(name, paths)
            self.row["raw_qemu"] = (
                "QEMU started by the bench: virtshift's -blockdev layout, each "
                "virtio disk behind its own pcie-root-port"
            )
        nodes = self.b.top_nodes(self.raw)
        self.nodes = [nodes[f"virtio-disk{i}"] for i in range(self.n)]
        # new nodes are named as virtshift names them (libvirt's scheme), so that
        # the command is as long as virtshift's: QEMU reads it byte by byte
        used = [int(m.group(1)) for v in nodes.values() if (m := _NODE_INDEX.fullmatch(v))]
        self.next_index = max(used, default=self.n) + 1

    def _actions(self, new: list[str], names: list[str]) -> list[dict[str, Any]]:
        """The snapshot's ``transaction`` actions: each disk's top onto ``new``,
        written as virtshift writes them (QEMU's defaults, ``format`` qcow2 and
        ``mode`` absolute-paths, left out)."""
        extra = {"mode": "existing"} if self.reuse else {}
        return [
            {
                "type": "blockdev-snapshot-sync",
                "data": {
                    "node-name": self.nodes[i],
                    "snapshot-file": new[i],
                    "snapshot-node-name": names[i],
                    **extra,
                },
            }
            for i in range(self.n)
        ]

    def _names(self) -> list[str]:
        """Names for the next snapshot's new nodes, ``libvirt-N-format`` as virtshift's."""
        first, self.next_index = self.next_index, self.next_index + self.n
        return [f"libvirt-{first + i}-format" for i in range(self.n)]

    def rep(self, k: int, how: str = "timed") -> float:
        assert self.raw is not None
        new = self._new(k)
        names = self._names()
        actions = self._actions(new, names)
        os.sync()  # as _VsSnap.rep
        t0 = time.perf_counter()
        self.raw.execute("transaction", {"actions": actions})
        t = time.perf_counter() - t0
        self.nodes, self.tops = names, new
        return t

    def teardown(self) -> None:
        if getattr(self, "raw", None) is not None:
            assert self.raw is not None
            self.raw.close()
            self.raw = None
        self.b.destroy(getattr(self, "twin", None))
        self.twin = None
        proc = getattr(self, "proc", None)
        if proc is not None:
            proc.kill()
            proc.wait()
            self.proc = None
        super().teardown()


class _FloorSnap(_RawSnap):
    """The floor of a crash-safe call without a daemon: the steps any such
    implementation takes around the same raw ``transaction``, each in its
    cheapest form, and nothing of a request's own (no model, no checks but
    the REUSE_EXT overlay's header read, no XML formatting):

    take the domain's lock (``flock``); read and parse the state file (lxml);
    parse the request (lxml); write the transaction but its closing brace
    (QEMU reads it meanwhile, as virtshift's ``Monitor.prime``); read each
    pre-created overlay's header; write the intent (runtime: rename, no
    ``fsync``, as virtshift's); connect and negotiate QMP (the socket opened
    and the negotiation sent first, so QEMU answers during the above); write
    the new state file and write and sync the new metadata document under
    temporary names, while QEMU still reads the command, and the rest once it
    has, after sending the closing brace; after the reply rename both, sync
    the metadata's directory, remove the intent, close the socket, drop the
    lock.  The state file is not
    synced (as virtshift's since it stopped syncing status files): it
    describes a QEMU, which a power loss ends.

    The state and metadata bytes are the twin's virtshift status file as it
    was after start (the size of what virtshift writes).  Same twin QEMU as
    ``raw``; run as a third system of the row."""

    name = "floor"

    def setup(self, k: int) -> None:
        super().setup(k)
        assert self.raw is not None
        assert self.dir is not None
        self.raw.close()  # connected inside the timed call instead
        self.raw = None
        status = self.b.root / "run" / "qemu" / f"raw{self.tag}-{k}.xml"
        self.state = self.dir / "floor-run"
        self.meta = self.dir / "floor-snapshots"
        self.state.mkdir()
        self.meta.mkdir()
        # without a twin (no virtshift status file), a status of the same size
        text = status.read_bytes() if status.exists() else b"<domstatus/>" + b" " * 600 * self.n
        (self.state / "status.xml").write_bytes(text)
        self.monitor = self.b.monitor_path(f"raw{self.tag}-{k}")

    def rep(self, k: int, how: str = "timed") -> float:
        import fcntl

        from lxml import etree

        new = self._new(k)
        names = self._names()
        request = snapshot_xml(f"s{k}", new)
        actions = self._actions(new, names)
        state, meta = self.state, self.meta
        os.sync()  # as _VsSnap.rep
        t0 = time.perf_counter()
        lock = os.open(state / "domain.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = RawQMP(self.monitor, soon=True)
        with open(state / "status.xml", "rb") as f:
            text = f.read()
        etree.fromstring(text)
        paths = [e.get("file") for e in etree.fromstring(request.encode()).iter("source")]
        # QEMU reads the command, all but its closing brace, meanwhile
        pending = client.send("transaction", {"actions": actions}, held=2)
        if self.reuse:
            for path in paths:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                os.pread(fd, 512, 0)
                os.close(fd)
        intent = state / "intent.json"
        with open(state / "intent.json.tmp", "w") as f:
            f.write(json.dumps({"new": names, "paths": paths}))
        os.replace(state / "intent.json.tmp", intent)
        client.ready()
        writes = [(state, "status.xml", False), (meta, f"s{k}.xml", True)]
        tmps = []

        def write() -> None:
            d, name, sync = writes.pop(0)
            fd = os.open(d / f".{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, text)
            if sync:
                os.fsync(fd)
            os.close(fd)
            tmps.append((d, name))

        # the writes while QEMU still reads, the rest while it runs the command
        while writes and client.unread() > 0:
            write()
        client.finish()
        while writes:
            write()
        client.reply(pending)
        for d, name in tmps:
            os.replace(d / f".{name}.tmp", d / name)
        fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        os.unlink(intent)
        client.close()
        os.close(lock)
        t = time.perf_counter() - t0
        self.nodes, self.tops = names, new
        return t


class _PivotFloor:
    """The floor of a crash-safe pivot without a daemon (PIVOT row): around
    the raw ``block-job-complete`` -> ``BLOCK_JOB_COMPLETED``, the steps any
    such implementation takes, each in its cheapest form: the domain's lock,
    the state file read and parsed, QMP connected and negotiated (started
    first), the pivot's intent written before QEMU is asked, the
    completion's ``error`` read, the result written (both atomically, not
    synced: runtime state of a transient domain, as virtshift's), the job
    dismissed (``auto-dismiss`` off: a process that dies still finds the
    outcome), the socket closed.  Not done: removing the old chain
    from QEMU's graph, reading the graph back.  Each repetition's mirror is
    set up to ready over a connection of its own, untimed."""

    def __init__(self, monitor: str, node: str, status: Path, d: Path) -> None:
        self.monitor, self.node, self.dir = monitor, node, d
        self.state = d / "run"
        self.state.mkdir()
        self.text = status.read_bytes()
        (self.state / "status.xml").write_bytes(self.text)
        self._next = node

    def _ready(self, k: int, dest: str) -> str:
        client = RawQMP(self.monitor)
        try:
            fmt, sto, job = f"fc{k}-format", f"fc{k}-storage", f"floor-{k}"
            client.execute(
                "blockdev-add",
                {"driver": "file", "filename": dest, "node-name": sto, "auto-read-only": True},
            )
            client.execute(
                "blockdev-add",
                {"node-name": fmt, "driver": "qcow2", "file": sto, "backing": None},
            )
            client.execute_until(
                "blockdev-mirror",
                {
                    "job-id": job,
                    "device": self.node,
                    "target": fmt,
                    "sync": "full",
                    "auto-dismiss": False,
                },
                ("BLOCK_JOB_READY",),
                job,
            )
            self._next = fmt
            return job
        finally:
            client.close()

    def rep(self, k: int) -> float:
        import fcntl

        from lxml import etree

        dest = str(self.dir / f"c{k + 1}.qcow2")
        img("create", "-q", "-f", "qcow2", dest, "64M")
        job = self._ready(k, dest)
        state = self.state

        def runtime(name: str, data: bytes) -> None:
            # (atomic, not synced: it describes a QEMU, which a power loss ends)
            fd = os.open(state / f".{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, data)
            os.close(fd)
            os.replace(state / f".{name}.tmp", state / name)

        os.sync()  # as the other systems' reps
        t0 = time.perf_counter()
        lock = os.open(state / "domain.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = RawQMP(self.monitor, soon=True)
        with open(state / "status.xml", "rb") as f:
            etree.fromstring(f.read())
        runtime("pivot-intent.json", json.dumps({"job": job, "pivot": dest}).encode())
        client.ready()
        ev = client.execute_until(
            "block-job-complete", {"device": job}, ("BLOCK_JOB_COMPLETED",), job
        )
        assert not ev["data"].get("error"), ev
        runtime("status.xml", self.text)
        client.execute("job-dismiss", {"id": job})
        os.unlink(state / "pivot-intent.json")
        client.close()
        os.close(lock)
        t = time.perf_counter() - t0
        self.node = self._next
        return t


class _LvSnap(_SnapSystem):
    """libvirt 9.0, through the side script (uid 65534, its own images)."""

    name = "libvirt"

    def setup(self, k: int) -> None:
        assert self.b.lv is not None
        self.up = False
        self.b.lv.call(
            {
                "op": "snap_setup",
                "n": self.n,
                "dir": self.b.lv.subdir(f"snap-{self.tag}-{k}"),
                "name": f"lv{self.tag}-{k}",
            }
        )
        self.up = True

    def rep(self, k: int, how: str = "timed") -> float:
        assert self.b.lv is not None
        return float(self.b.lv.call({"op": "snap_rep", "k": k, "mode": self.mode})["t"])

    def teardown(self) -> None:
        if getattr(self, "up", False) and self.b.lv is not None:
            with contextlib.suppress(RuntimeError):
                self.b.lv.call({"op": "snap_teardown"})
            self.up = False


# -- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "profiles").mkdir(exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="vsb-", dir=args.workdir))
        os.chmod(self.work, 0o755)  # the libvirt user reads the golden images
        self.root = self.work / "root"
        self.uri = f"qemu:///embed?root={self.root}"
        self.conn = vlv.open(self.uri)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lv: Libvirt | None = None
        self.lv_skip: str | None = None
        q = self.quick
        self.cfg: dict[str, Any] = {
            "snapshot_sizes": [1, 4, 16] if q else [1, 4, 16, 30, 64],
            "snapshot_reps": 5 if q else 15,
            "pivot_reps": 5 if q else 15,
            "migrate_data_mib": 256 if q else 2048,
            "migrate_reps": 3 if q else 9,
            "startup_reps": 15 if q else 40,
            "tree_sizes": [10, 100] if q else [10, 100, 1000],
            "tree_reps": 3 if q else 5,
            "depth_disks": 4 if q else 16,
            "depth_max": 10 if q else 40,
            "warmup": 1,
        }
        if args.snapshot_sizes:
            self.cfg["snapshot_sizes"] = [int(x) for x in args.snapshot_sizes.split(",")]
        if args.reps:
            for key in self.cfg:
                if key.endswith("_reps"):
                    self.cfg[key] = args.reps
        self.results: dict[str, Any] = {"rows": [], "notes": []}

    # -- plumbing ------------------------------------------------------------------------------

    def vs_start(self, name: str, paths: list[str]) -> vlv.virDomain:
        return self.conn.createXML(domain_xml(name, paths), vlv.VIR_DOMAIN_START_PAUSED)

    def monitor_path(self, name: str) -> str:
        return str(self.root / "run" / "qemu" / f"domain-{name}" / "monitor.sock")

    @staticmethod
    def top_nodes(raw: RawQMP) -> dict[str, str]:
        return {
            d["qdev"].split("/")[3]: d["inserted"]["node-name"]
            for d in raw.execute("query-block")
            if d.get("inserted") and d.get("qdev", "").startswith("/machine/peripheral/")
        }

    def destroy(self, dom: vlv.virDomain | None) -> None:
        if dom is not None:
            with contextlib.suppress(vlv.libvirtError):
                if dom.isActive():
                    dom.destroy()

    def add_row(self, row: dict[str, Any]) -> None:
        self.results["rows"].append(row)
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def machine(self) -> dict[str, Any]:
        cpu = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        free = subprocess.run(["free", "-m"], capture_output=True, text=True).stdout
        qemu = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True
        ).stdout
        return {
            "nproc": os.cpu_count(),
            "cpu": cpu,
            "mem_total_mib": int(free.split("\n")[1].split()[1]) if free else None,
            "free_m": free.strip(),
            "kernel": platform.release(),
            "os": _os_release(),
            "python": sys.version.split()[0],
            "python_exe": sys.executable,
            "qemu": qemu.splitlines()[0] if qemu else "",
            "virtshift": virtshift.__version__,
            "src_uncommitted": subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
            ).stdout.split("\n")[:-1],
            "git_head": subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
            "work_fs": subprocess.run(["df", "-hT", str(self.work)], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1],
            "uptime_start": subprocess.run(
                ["uptime"], capture_output=True, text=True
            ).stdout.strip(),
            "fsync_write_atomic_ms": _fsync_cost(self.work),
            "create_file_ms": _create_cost(self.work),
        }

    # -- row: snapshots ------------------------------------------------------------------------

    def raw_qemu_many_disks(
        self, name: str, paths: list[str]
    ) -> tuple[subprocess.Popen[bytes], RawQMP]:
        """QEMU with virtshift's -blockdev layout, each virtio disk behind its own
        pcie-root-port (8 functions per slot, as libvirt does): for more disks
        than q35's root bus has slots, which virtshift cannot start."""
        from virtshift.ops.start import plan_start
        from virtshift.runtime.driver import Driver
        from virtshift.xml.domain import parse_domain

        rundir = self.work / f"own-{name}"
        rundir.mkdir()
        dom = Driver(self.root)._resolve_chains(parse_domain(domain_xml(name, paths)))
        plan = plan_start(
            dom,
            emulator=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            monitor=str(rundir / "monitor.sock"),
            query_monitor=str(rundir / "query.sock"),
            agent_socket=None,
            accel="tcg",
            rundir=str(rundir),
        )
        argv: list[str] = []
        port = 0
        for i, a in enumerate(plan.argv):
            if (
                i > 0
                and plan.argv[i - 1] == "-device"
                and '"virtio-blk-pci"' in a
                and '"bus"' not in a
            ):
                dev = json.loads(a)
                slot, fn = divmod(port, 8)
                argv[-1:] = [
                    "-device",
                    json.dumps(
                        {
                            "driver": "pcie-root-port",
                            "id": f"rp{port}",
                            "bus": "pcie.0",
                            "chassis": port + 1,
                            "addr": f"{slot + 2:x}.{fn}",
                            "multifunction": fn == 0,
                        }
                    ),
                    "-device",
                ]
                dev["bus"] = f"rp{port}"
                port += 1
                a = json.dumps(dev)
            argv.append(a)
        logf = open(rundir / "qemu.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            cwd=rundir,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while not (rundir / "monitor.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "raw QEMU did not start: " + (rundir / "qemu.log").read_text()[-500:]
                )
            time.sleep(0.02)
        return proc, RawQMP(str(rundir / "monitor.sock"))

    def row_snapshot(self) -> None:
        reps, warm = self.cfg["snapshot_reps"], self.cfg["warmup"]
        for n in self.cfg["snapshot_sizes"]:
            for mode in ("created", "precreated"):
                log(
                    f"snapshot: {n} disks, {mode} overlays, {reps} repetitions "
                    "(fresh domains each time)"
                )
                self._snapshot_case(n, mode, reps, warm)
        n, depth = self.cfg["depth_disks"], self.cfg["depth_max"]
        log(
            f"snapshot: {n} disks, created overlays, chain depth 1..{depth} (one domain per system)"
        )
        self._snapshot_depth(n, depth)

    def _snap_systems(self, n: int, mode: str, row: dict[str, Any], tag: str) -> list[Any]:
        vs_ok = True
        if n > VIRTIO_MAX:
            # past q35's root-bus slots: can virtshift start it?  (its own words if not)
            probe = _VsSnap(self, n, mode, row, tag + "probe")
            try:
                probe.setup(0)
            except vlv.libvirtError as err:
                vs_ok = False
                row["errors"]["virtshift"] = f"cannot start {n} disks: {err}"
                log(f"  virtshift: {row['errors']['virtshift'][:200]}")
            finally:
                probe.teardown()
        systems: list[Any] = [_RawSnap(self, n, mode, row, tag, twin=vs_ok)]
        if vs_ok:
            systems.append(_FloorSnap(self, n, mode, row, tag + "f"))
        if vs_ok:
            systems.append(_VsSnap(self, n, mode, row, tag))
        if self.lv is not None:
            systems.append(_LvSnap(self, n, mode, row, tag))
        else:
            row["errors"]["libvirt"] = self.lv_skip
        return systems

    def _snapshot_case(self, n: int, mode: str, reps: int, warm: int) -> None:
        """Each repetition on freshly started domains whose disks are one-layer
        images: the same state (chain depth 1) every time, for every system."""
        row: dict[str, Any] = {
            "row": "snapshot",
            "what": f"snapshotCreateXML ATOMIC, {n} disk{'s' if n > 1 else ''}, {mode} overlays",
            "size": n,
            "variant": mode,
            "series": {},
            "errors": {},
        }
        systems = self._snap_systems(n, mode, row, f"{n}{mode[0]}")
        times: dict[str, list[float]] = {s.name: [] for s in systems}
        try:
            for k in range(warm + reps):
                for sysm in rotate(systems, k):
                    try:
                        sysm.setup(k)
                        t = sysm.rep(k)
                    except Exception as err:
                        row["errors"][sysm.name] = f"{type(err).__name__}: {err}"[:600]
                        log(f"  {sysm.name} failed: {row['errors'][sysm.name][:300]}")
                        systems = [x for x in systems if x is not sysm]
                        continue
                    finally:
                        sysm.teardown()
                    if k >= warm:
                        times[sysm.name].append(t)
            vs = next((x for x in systems if x.name == "virtshift"), None)
            if vs is not None:
                for how in ("phases", "profile"):
                    vs.setup(warm + reps)
                    try:
                        vs.rep(warm + reps, how)
                        if how == "phases":
                            row["status_file"] = vs.status_file_facts()
                            row["xml_costs"] = vs.xml_costs()
                    finally:
                        vs.teardown()
        finally:
            for sysm in systems:
                sysm.teardown()
            shutil.rmtree(self.work / "snap", ignore_errors=True)
        for name, xs in times.items():
            if xs:
                row["series"][name] = stats(xs)
        row["vs_raw"] = ratio_info(times.get("virtshift", []), times.get("raw", []))
        row["lv_vs"] = ratio_info(times.get("libvirt", []), times.get("virtshift", []))
        row["floor_raw"] = ratio_info(times.get("floor", []), times.get("raw", []))
        row["vs_floor"] = ratio_info(times.get("virtshift", []), times.get("floor", []))
        row["floor_lv"] = ratio_info(times.get("floor", []), times.get("libvirt", []))
        self.add_row(row)
        log("  " + summary_line(row))

    def _snapshot_depth(self, n: int, depth: int) -> None:
        """Consecutive snapshots on one domain per system: the cost per chain depth."""
        row: dict[str, Any] = {
            "row": "snapshot_depth",
            "what": f"snapshotCreateXML ATOMIC, {n} disks, created overlays, "
            f"by chain depth (1..{depth})",
            "size": n,
            "variant": "created",
            "errors": {},
            "phases_by_depth": {},
        }
        systems = self._snap_systems(n, "created", row, "depth")
        series: dict[str, list[float]] = {s.name: [] for s in systems}
        try:
            for sysm in systems:
                sysm.setup(0)
            for k in range(depth):
                for sysm in rotate(systems, k):
                    how = "phases" if sysm.name == "virtshift" and k in (0, depth - 1) else "timed"
                    series[sysm.name].append(sysm.rep(k, how))
                    if how == "phases":
                        row["phases_by_depth"][str(k + 1)] = row.pop("phases")
        finally:
            for sysm in systems:
                sysm.teardown()
            shutil.rmtree(self.work / "snap", ignore_errors=True)
        row["by_depth"] = {k: [round(x, 6) for x in v] for k, v in series.items()}
        self.add_row(row)
        first = {k: v[0] for k, v in series.items() if v}
        last = {k: v[-1] for k, v in series.items() if v}
        log(
            f"  depth 1 -> {depth}: "
            + ", ".join(f"{k} {first[k] * 1000:.1f} -> {last[k] * 1000:.1f} ms" for k in first)
        )

    # -- row: pivots ---------------------------------------------------------------------------

    def row_pivot(self) -> None:
        reps, warm = self.cfg["pivot_reps"], self.cfg["warmup"]
        base = self.work / "pivot"
        base.mkdir()
        golden = base / "golden.qcow2"
        img("create", "-q", "-f", "qcow2", str(golden), "64M")
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", str(golden)],
            check=True,
            capture_output=True,
        )
        log(f"pivot: blockJobAbort(PIVOT) of a ready blockCopy, {reps} repetitions")
        self._pivot_copy(base, golden, reps, warm)
        log(f"pivot: snapshot.delete(REOPEN_MIRROR) of a mirrored snapshot, {reps} repetitions")
        self._pivot_reopen(base, golden, reps, warm)
        shutil.rmtree(base, ignore_errors=True)

    def _vs_wait_ready(self, dom: vlv.virDomain, disk: str = "vda") -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            dom.blockJobInfo(disk, 0)  # applies READY when QEMU reports it
            if "ready='yes'" in dom.XMLDesc(0):
                return
            time.sleep(0.005)
        raise RuntimeError("virtshift mirror not ready")

    def _pivot_copy(self, base: Path, golden: Path, reps: int, warm: int) -> None:
        d = base / "copy"
        d.mkdir()
        (d / "vs").mkdir()
        (d / "raw").mkdir()
        cp_sparse(golden, d / "vs" / "c0.qcow2")
        cp_sparse(golden, d / "raw" / "c0.qcow2")
        (d / "floor").mkdir()
        cp_sparse(golden, d / "floor" / "c0.qcow2")
        dom = self.vs_start("pivvs", [str(d / "vs" / "c0.qcow2")])
        twin = self.vs_start("pivraw", [str(d / "raw" / "c0.qcow2")])
        ftwin = self.vs_start("pivfloor", [str(d / "floor" / "c0.qcow2")])
        raw = RawQMP(self.monitor_path("pivraw"))
        rawst = {"node": self.top_nodes(raw)["virtio-disk0"], "path": str(d / "raw" / "c0.qcow2")}
        vsst = {"path": str(d / "vs" / "c0.qcow2")}
        fraw = RawQMP(self.monitor_path("pivfloor"))
        fnode = self.top_nodes(fraw)["virtio-disk0"]
        fraw.close()
        floor = _PivotFloor(
            self.monitor_path("pivfloor"),
            fnode,
            self.root / "run" / "qemu" / "pivfloor.xml",
            d / "floor",
        )
        times: dict[str, list[float]] = {"virtshift": [], "raw": [], "floor": []}

        def vs_rep(k: int) -> float:
            dest = d / "vs" / f"c{k + 1}.qcow2"
            dom.blockCopy(
                "vda",
                f"<disk type='file'><driver type='qcow2'/><source file='{dest}'/></disk>",
                None,
                0,
            )
            self._vs_wait_ready(dom)
            t0 = time.perf_counter()
            dom.blockJobAbort("vda", vlv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            t = time.perf_counter() - t0
            assert str(dest) in dom.XMLDesc(0)
            os.unlink(vsst["path"])
            vsst["path"] = str(dest)
            return t

        def raw_rep(k: int) -> float:
            dest = str(d / "raw" / f"c{k + 1}.qcow2")
            img("create", "-q", "-f", "qcow2", dest, "64M")
            fmt, sto, job = f"pc{k}-format", f"pc{k}-storage", f"copy-{k}"
            raw.execute(
                "blockdev-add",
                {
                    "driver": "file",
                    "filename": dest,
                    "node-name": sto,
                    "auto-read-only": True,
                    "discard": "unmap",
                },
            )
            raw.execute(
                "blockdev-add",
                {
                    "node-name": fmt,
                    "read-only": False,
                    "driver": "qcow2",
                    "file": sto,
                    "backing": None,
                },
            )
            raw.execute_until(
                "blockdev-mirror",
                {
                    "job-id": job,
                    "device": rawst["node"],
                    "target": fmt,
                    "sync": "full",
                    "auto-dismiss": False,
                },
                ("BLOCK_JOB_READY",),
                job,
            )
            t0 = time.perf_counter()
            ev = raw.execute_until(
                "block-job-complete", {"device": job}, ("BLOCK_JOB_COMPLETED",), job
            )
            t = time.perf_counter() - t0
            assert not ev["data"].get("error"), ev
            raw.execute("job-dismiss", {"id": job})
            rawst["node"] = fmt
            return t

        try:
            for k in range(warm + reps):
                for name, fn in rotate(
                    [("virtshift", vs_rep), ("raw", raw_rep), ("floor", floor.rep)], k
                ):
                    t = fn(k)
                    if k >= warm:
                        times[name].append(t)
            k = warm + reps
            dest = d / "vs" / f"c{k + 1}.qcow2"
            dom.blockCopy(
                "vda",
                f"<disk type='file'><driver type='qcow2'/><source file='{dest}'/></disk>",
                None,
                0,
            )
            self._vs_wait_ready(dom)
            with Phases() as ph:
                dom.blockJobAbort("vda", vlv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            phases = ph.report()
            dest2 = d / "vs" / f"c{k + 2}.qcow2"
            dom.blockCopy(
                "vda",
                f"<disk type='file'><driver type='qcow2'/><source file='{dest2}'/></disk>",
                None,
                0,
            )
            self._vs_wait_ready(dom)
            prof = self.out / "profiles" / "pivot-blockjobabort.txt"
            profile_text(
                lambda: dom.blockJobAbort("vda", vlv.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT), prof
            )
        finally:
            raw.close()
            self.destroy(dom)
            self.destroy(twin)
            self.destroy(ftwin)
        row = {
            "row": "pivot",
            "what": "blockJobAbort PIVOT (ready blockCopy): call to job end",
            "variant": "blockJobAbort",
            "series": {k: stats(v) for k, v in times.items() if v},
            "vs_raw": ratio_info(times["virtshift"], times["raw"]),
            "floor_raw": ratio_info(times["floor"], times["raw"]),
            "vs_floor": ratio_info(times["virtshift"], times["floor"]),
            "phases": phases,
            "profile": str(prof.relative_to(self.out)),
            "errors": {},
        }
        self.add_row(row)
        log("  " + summary_line(row))

    def _pivot_reopen(self, base: Path, golden: Path, reps: int, warm: int) -> None:
        """A fresh domain per repetition: disk T; overlay S (T <- S) and its mirror M on
        'dest', M backing by relative name onto a copy of T (the migration's shape)."""
        times: dict[str, list[float]] = {"virtshift": [], "raw": [], "raw_attach": []}

        def prepare(tag: str) -> tuple[Path, list[str]]:
            d = base / "reopen" / tag
            (d / "dest").mkdir(parents=True)
            t = d / "t.qcow2"
            cp_sparse(golden, t)
            cp_sparse(golden, d / "dest" / "t.qcow2")
            s, m = d / "t.s.qcow2", d / "dest" / "t.m.qcow2"
            img("create", "-q", "-f", "qcow2", "-b", str(t), "-F", "qcow2", str(s))
            img("create", "-q", "-f", "qcow2", "-b", "t.qcow2", "-F", "qcow2", str(m))
            return d, [str(t), str(s), str(m), str(d / "dest" / "t.qcow2")]

        def vs_rep(k: int, phased: bool = False, profile: Path | None = None) -> tuple[float, Any]:
            d, (t, s, m, _c) = prepare(f"vs{k}")
            dom = self.vs_start(f"rvs{k}", [t])
            try:
                flags = SNAP_FLAGS | vlv.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                snap = dom.snapshotCreateXML(snapshot_xml("mig", [s], mirror=m), flags)
                self._vs_wait_ready(dom)
                ph = None
                if profile is not None:
                    profile_text(
                        lambda: snap.delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR), profile
                    )
                    return 0.0, None
                if phased:
                    with Phases() as ph:
                        snap.delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR)
                    return ph.total, ph.report()
                t0 = time.perf_counter()
                snap.delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_REOPEN_MIRROR)
                el = time.perf_counter() - t0
                assert m in dom.XMLDesc(0)
                return el, None
            finally:
                self.destroy(dom)
                shutil.rmtree(d, ignore_errors=True)

        def raw_rep(k: int) -> tuple[float, float]:
            d, (t, s, m, c) = prepare(f"raw{k}")
            twin = self.vs_start(f"rraw{k}", [t])
            raw = RawQMP(self.monitor_path(f"rraw{k}"))
            try:
                node = self.top_nodes(raw)["virtio-disk0"]
                raw.execute(
                    "blockdev-snapshot-sync",
                    {
                        "node-name": node,
                        "snapshot-file": s,
                        "snapshot-node-name": "ov",
                        "format": "qcow2",
                        "mode": "existing",
                    },
                )
                raw.execute(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "filename": m,
                        "node-name": "m-s",
                        "auto-read-only": True,
                        "discard": "unmap",
                    },
                )
                raw.execute(
                    "blockdev-add",
                    {
                        "node-name": "m",
                        "read-only": False,
                        "driver": "qcow2",
                        "file": "m-s",
                        "backing": None,
                    },
                )
                raw.execute_until(
                    "blockdev-mirror",
                    {
                        "job-id": "mir",
                        "device": "ov",
                        "target": "m",
                        "sync": "top",
                        "auto-dismiss": False,
                    },
                    ("BLOCK_JOB_READY",),
                    "mir",
                )
                # what a correct pivot needs first (QEMU-NOTES trap 4): the copy under M
                t0 = time.perf_counter()
                raw.execute(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "filename": c,
                        "node-name": "c-s",
                        "auto-read-only": True,
                        "discard": "unmap",
                    },
                )
                raw.execute(
                    "blockdev-add",
                    {
                        "node-name": "c",
                        "read-only": True,
                        "driver": "qcow2",
                        "file": "c-s",
                        "backing": None,
                    },
                )
                raw.execute("blockdev-snapshot", {"node": "c", "overlay": "m"})
                t_attach = time.perf_counter() - t0
                t0 = time.perf_counter()
                ev = raw.execute_until(
                    "block-job-complete", {"device": "mir"}, ("BLOCK_JOB_COMPLETED",), "mir"
                )
                el = time.perf_counter() - t0
                assert not ev["data"].get("error"), ev
                return el, t_attach
            finally:
                raw.close()
                self.destroy(twin)
                shutil.rmtree(d, ignore_errors=True)

        def vs_timed(k: int) -> float:
            return vs_rep(k)[0]

        def raw_timed(k: int) -> float:
            el, att = raw_rep(k)
            if k >= warm:
                times["raw_attach"].append(att)
            return el

        for k in range(warm + reps):
            for name, fn in rotate([("virtshift", vs_timed), ("raw", raw_timed)], k):
                t = fn(k)
                if k >= warm:
                    times[name].append(t)
        _t, phases = vs_rep(warm + reps, phased=True)
        prof = self.out / "profiles" / "pivot-reopen-mirror.txt"
        vs_rep(warm + reps + 1, profile=prof)
        row = {
            "row": "pivot",
            "what": "snapshot.delete(REOPEN_MIRROR): call to job end",
            "variant": "REOPEN_MIRROR",
            "series": {k: stats(v) for k, v in times.items()},
            "vs_raw": ratio_info(times["virtshift"], times["raw"]),
            "vs_raw_attach": ratio_info(
                times["virtshift"],
                [a + b for a, b in zip(times["raw"], times["raw_attach"], strict=True)],
            ),
            "phases": phases,
            "profile": str(prof.relative_to(self.out)),
            "errors": {},
        }
        self.add_row(row)
        log("  " + summary_line(row))

    # -- row: migrate-storage ------------------------------------------------------------------

    def row_migrate(self) -> None:
        mib = self.cfg["migrate_data_mib"]
        reps, warm = self.cfg["migrate_reps"], self.cfg["warmup"]
        golden = self.work / "golden"
        golden.mkdir()
        os.chmod(golden, 0o755)
        base_mib, top_mib = mib * 3 // 4, mib // 4
        base, top = golden / "base.qcow2", golden / "top.qcow2"
        log(
            f"migrate: building a {mib} MiB chain "
            f"(base {base_mib} MiB of data <- top {top_mib} MiB)"
        )
        img("create", "-q", "-f", "qcow2", str(base), f"{mib}M")
        _qemu_io_fill(base, 0x11, 0, base_mib)
        img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
        _qemu_io_fill(top, 0x22, base_mib, top_mib)
        for f in (base, top):
            os.chmod(f, 0o644)
        copy_methods = self._copy_methods(golden, reps)
        for busy in (False, True):
            label = "busy" if busy else "idle"
            log(f"migrate: {label} guest, {reps} repetitions")
            times: dict[str, list[float]] = {"virtshift": [], "raw": [], "libvirt": []}
            phases: dict[str, list[dict[str, float]]] = {"virtshift": [], "raw": [], "libvirt": []}
            writes: dict[str, list[float]] = {"virtshift": [], "raw": [], "libvirt": []}
            errors: dict[str, str] = {}
            systems = [("virtshift", self._mig_vs), ("raw", self._mig_raw)]
            if self.lv is not None:
                systems.append(("libvirt", self._mig_lv))
            for k in range(warm + reps):
                for name, fn in rotate(systems, k):
                    try:
                        t, ph, w = fn(golden, k, busy)
                    except Exception as err:  # a failed system: say so, keep the others
                        errors[name] = f"{type(err).__name__}: {err}"[:600]
                        log(f"  {name} failed: {errors[name][:300]}")
                        systems = [s for s in systems if s[0] != name]
                        continue
                    if k >= warm:
                        times[name].append(t)
                        phases[name].append(ph)
                        writes[name].append(w / t if t else 0.0)
            row: dict[str, Any] = {
                "row": "migrate",
                "what": f"migrate-storage of a {mib} MiB chain, {label} guest",
                "variant": label,
                "size": mib,
                "series": {k: stats(v) for k, v in times.items() if v},
                "phases_median_s": {k: _median_phases(v) for k, v in phases.items() if v},
                "guest_writes_per_s": {
                    k: round(statistics.median(v), 1) for k, v in writes.items() if v
                },
                "vs_raw": ratio_info(times["virtshift"], times["raw"]),
                "lv_vs": ratio_info(times["libvirt"], times["virtshift"]),
                "errors": errors,
                "copy_methods": copy_methods,
            }
            if self.lv is None:
                row["errors"]["libvirt"] = self.lv_skip
            if not busy and "virtshift" not in errors:
                box: dict[str, Any] = {}
                self._mig_vs(golden, 99, False, phases_out=box)
                row["phases"] = box["phases"]
            self.add_row(row)
            log("  " + summary_line(row))

    def _copy_methods(self, golden: Path, reps: int) -> dict[str, Any]:
        """The copy of the same chain three ways (what bounds the copy phase)."""
        from virtshift.migrate.copy import THREADS, copy_files

        d = self.work / "copytest"
        base, top = golden / "base.qcow2", golden / "top.qcow2"
        pairs = [(str(top), str(d / "top.qcow2")), (str(base), str(d / "base.qcow2"))]

        def virtshift_copy() -> None:
            list(copy_files(pairs))

        def one_thread() -> None:
            list(copy_files(pairs, threads=1))

        def convert() -> None:
            img("convert", "-f", "qcow2", "-O", "qcow2", str(top), str(d / "flat.qcow2"))

        def cp() -> None:
            cp_sparse(base, d / "base.qcow2")
            cp_sparse(top, d / "top.qcow2")
            os.sync()

        def convert_sync() -> None:
            convert()
            fd = os.open(d / "flat.qcow2", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        methods = [
            (
                f"virtshift copy_files of both layers ({THREADS} threads, copy_file_range, "
                "write-behind, fsync)",
                virtshift_copy,
            ),
            ("virtshift copy_files, 1 thread (copy_file_range, write-behind, fsync)", one_thread),
            ("qemu-img convert of the chain (flattened; no sync of the data)", convert),
            ("qemu-img convert + fsync of the result", convert_sync),
            ("cp --sparse=always of both layers + sync", cp),
        ]
        times: dict[str, list[float]] = {m: [] for m, _f in methods}
        for k in range(reps + 1):
            for name, fn in rotate(methods, k):
                d.mkdir()
                os.sync()  # no writeback of the method before counts against this one
                t0 = time.perf_counter()
                fn()
                if k:
                    times[name].append(time.perf_counter() - t0)
                shutil.rmtree(d)
        log(
            "  copy alone: "
            + ", ".join(
                f"{m.split(' (')[0]} {statistics.median(v):.2f} s" for m, v in times.items()
            )
        )
        return {m: stats(v) for m, v in times.items()}

    def _mig_prepare(self, golden: Path, d: Path) -> str:
        src, dst = d / "src", d / "dst"
        src.mkdir(parents=True)
        dst.mkdir()
        cp_sparse(golden / "base.qcow2", src / "base.qcow2")
        cp_sparse(golden / "top.qcow2", src / "top.qcow2")
        img(
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            str(src / "base.qcow2"),
            "-F",
            "qcow2",
            str(src / "top.qcow2"),
        )
        # The prepared copy (and the previous repetition's files and deletions)
        # must be on disk before the clock starts: otherwise their writeback
        # competes with the measured copy, and bills whichever system syncs.
        os.sync()
        return str(src / "top.qcow2")

    def _mig_vs(
        self, golden: Path, k: int, busy: bool, phases_out: dict[str, Any] | None = None
    ) -> tuple[float, dict[str, float], int]:
        from virtshift.migrate import migrate_storage

        d = self.work / "mig" / f"vs{k}{int(busy)}"
        top = self._mig_prepare(golden, d)
        dom = self.vs_start(f"mvs{k}{int(busy)}", [top])
        writer = Writer(lambda cmd: vlvq.qemuMonitorCommand(dom, cmd, 1)) if busy else None
        try:
            if writer:
                writer.start()
                time.sleep(0.2)
            w0 = writer.n if writer else 0
            t0 = time.perf_counter()
            if phases_out is not None:
                with Phases() as ph:
                    journal = migrate_storage(dom, str(d / "dst"))
                phases_out["phases"] = ph.report()
            else:
                journal = migrate_storage(dom, str(d / "dst"))
            t = time.perf_counter() - t0
            w = (writer.n - w0) if writer else 0
            if writer:
                writer.halt()
                if writer.errors:
                    raise RuntimeError(f"guest writes failed: {writer.errors[:2]}")
            first = re.search(r"<source file='([^']+)'", dom.XMLDesc(0))
            if not first or not first.group(1).startswith(str(d / "dst")):
                raise RuntimeError(f"disk not on the destination after migrate-storage: {first}")
            move = journal.disks[0]
            return t, {f"{s}": float(v) for s, v in move.timings.items()}, w
        finally:
            if writer:
                writer.halt()
            self.destroy(dom)
            shutil.rmtree(d, ignore_errors=True)

    def _mig_raw(self, golden: Path, k: int, busy: bool) -> tuple[float, dict[str, float], int]:
        d = self.work / "mig" / f"raw{k}{int(busy)}"
        top = self._mig_prepare(golden, d)
        name = f"mraw{k}{int(busy)}"
        twin = self.vs_start(name, [top])
        raw = RawQMP(self.monitor_path(name))
        # the guest's writes go over the domain's second (query) monitor: a
        # RawQMP belongs to one thread, and QEMU takes one client per monitor
        hmp = (
            RawQMP(self.monitor_path(name).replace("monitor.sock", "query.sock")) if busy else None
        )
        writer = (
            Writer(lambda cmd: hmp.execute("human-monitor-command", {"command-line": cmd}))
            if hmp is not None
            else None
        )
        src, dst = d / "src", d / "dst"
        try:
            node = self.top_nodes(raw)["virtio-disk0"]
            if writer:
                writer.start()
                time.sleep(0.2)
            w0 = writer.n if writer else 0
            t0 = time.perf_counter()
            raw.execute(
                "blockdev-snapshot-sync",
                {
                    "node-name": node,
                    "snapshot-file": str(src / "top.mig.qcow2"),
                    "snapshot-node-name": "ov",
                },
            )
            t1 = time.perf_counter()
            img("convert", "-f", "qcow2", "-O", "qcow2", top, str(dst / "top.qcow2"))
            img(
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "top.qcow2",
                "-F",
                "qcow2",
                str(dst / "top.mig.qcow2"),
            )
            t2 = time.perf_counter()
            raw.execute(
                "blockdev-add",
                {
                    "driver": "file",
                    "filename": str(dst / "top.qcow2"),
                    "node-name": "c-s",
                    "auto-read-only": True,
                    "discard": "unmap",
                },
            )
            raw.execute(
                "blockdev-add",
                {
                    "node-name": "c",
                    "read-only": True,
                    "driver": "qcow2",
                    "file": "c-s",
                    "backing": None,
                },
            )
            raw.execute(
                "blockdev-add",
                {
                    "driver": "file",
                    "filename": str(dst / "top.mig.qcow2"),
                    "node-name": "m-s",
                    "auto-read-only": True,
                    "discard": "unmap",
                },
            )
            raw.execute(
                "blockdev-add",
                {
                    "node-name": "m",
                    "read-only": False,
                    "driver": "qcow2",
                    "file": "m-s",
                    "backing": "c",
                },
            )
            raw.execute_until(
                "blockdev-mirror",
                {
                    "job-id": "mig",
                    "device": "ov",
                    "target": "m",
                    "sync": "top",
                    "auto-dismiss": False,
                },
                ("BLOCK_JOB_READY",),
                "mig",
            )
            t3 = time.perf_counter()
            ev = raw.execute_until(
                "block-job-complete", {"device": "mig"}, ("BLOCK_JOB_COMPLETED",), "mig"
            )
            t4 = time.perf_counter()
            assert not ev["data"].get("error"), ev
            w = (writer.n - w0) if writer else 0
            if writer:
                writer.halt()
                if writer.errors:
                    raise RuntimeError(f"guest writes failed: {writer.errors[:2]}")
            return (
                t4 - t0,
                {
                    "snapshot": t1 - t0,
                    "copy (qemu-img convert + create)": t2 - t1,
                    "mirror to ready": t3 - t2,
                    "pivot": t4 - t3,
                },
                w,
            )
        finally:
            if writer:
                writer.halt()
            if hmp is not None:
                hmp.close()
            raw.close()
            self.destroy(twin)
            shutil.rmtree(d, ignore_errors=True)

    def _mig_lv(self, golden: Path, k: int, busy: bool) -> tuple[float, dict[str, float], int]:
        assert self.lv is not None
        work = Path(self.lv.subdir(f"mig{k}{int(busy)}"))
        shutil.rmtree(work)  # the side script makes it
        out = self.lv.call(
            {
                "op": "mig_rep",
                "golden": str(golden),
                "work": str(work),
                "busy": busy,
                "name": f"mlv{k}{int(busy)}",
            }
        )
        if not out.get("on_dest"):
            raise RuntimeError("libvirt flow: disk not on the destination after the pivot")
        if out.get("write_errors"):
            raise RuntimeError(f"libvirt guest writes failed: {out['write_errors']}")
        return float(out["t"]), out["phases"], int(out["writes"])

    # -- row: start-up -------------------------------------------------------------------------

    def row_startup(self) -> None:
        reps, warm = self.cfg["startup_reps"], 2
        script = Path(sys.executable).parent / "virtshift"
        vs = [str(script)] if script.exists() else [sys.executable, "-m", "virtshift.cli.main"]
        # a root with something to list: two defined domains, one running (paused)
        d = self.work / "startup"
        d.mkdir()
        paths = [str(d / f"s{i}.qcow2") for i in range(2)]
        precreate_images(paths)
        self.conn.defineXML(domain_xml("listed-a", paths[:1]))
        run = self.vs_start("listed-b", paths[1:])
        cmds = {
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "virtshift --version": [*vs, "--version"],
            "virtshift list --all": [*vs, "-c", self.uri, "list", "--all"],
        }
        log(f"startup: {', '.join(cmds)}; {reps} repetitions each")
        times: dict[str, list[float]] = {k: [] for k in cmds}
        items = list(cmds.items())
        for k in range(warm + reps):
            for name, argv in rotate(items, k):
                t0 = time.perf_counter()
                res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                t = time.perf_counter() - t0
                if res.returncode:
                    raise RuntimeError(f"{name}: {res.stderr.decode()[-300:]}")
                if k >= warm:
                    times[name].append(t)
        imports = _importtime([*vs, "-c", self.uri, "list", "--all"])
        shim = shutil.which("virtshift")
        extra: dict[str, Any] = {}
        if shim and "shims" in shim:
            xs = []
            for _ in range(max(5, reps // 4)):
                t0 = time.perf_counter()
                subprocess.run([shim, "--version"], capture_output=True)
                xs.append(time.perf_counter() - t0)
            extra["through_pyenv_shim"] = {"command": f"{shim} --version", **stats(xs)}
        self.destroy(run)
        ref = times["python3 -c pass"]
        for name in ("virtshift --version", "virtshift list --all"):
            row: dict[str, Any] = {
                "row": "startup",
                "what": f"`{name}` start-up",
                "variant": name,
                "series": {"virtshift": stats(times[name]), "python3 -c pass": stats(ref)},
                "vs_ref": ratio_info(times[name], ref),
                "errors": {},
                "command": [*vs, *cmds[name][len(vs) :]],
            }
            if name.endswith("--all"):
                row["importtime_top"] = imports
                row.update(extra)
            self.add_row(row)
            log("  " + summary_line(row))

    # -- row: 1,000 snapshots ------------------------------------------------------------------

    def row_tree(self) -> None:
        # a chain is what external snapshots make (each the child of the last);
        # a 4-ary tree (parent of i is (i - 1) // 4) is the bushy case
        self._tree_case("chain", lambda i: i - 1)
        self._tree_case("4-ary tree", lambda i: (i - 1) // 4)

    def _tree_case(self, shape: str, parent_of: Callable[[int], int]) -> None:
        sizes, reps = self.cfg["tree_sizes"], self.cfg["tree_reps"]
        tag = shape.split()[0].replace("-", "")
        d = self.work / f"tree-{tag}"
        d.mkdir()
        disk = d / "tree.qcow2"
        img("create", "-q", "-f", "qcow2", str(disk), "16M")
        dom = self.conn.defineXML(domain_xml(f"tree{tag}", [str(disk)]))
        flags = vlv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | vlv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        build: list[tuple[int, float]] = []
        count, prev = 0, None
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}

        def redefine_xml(name: str, parent: str | None, t: int) -> str:
            par = f"<parent><name>{parent}</name></parent>" if parent else ""
            return (
                f"<domainsnapshot><name>{name}</name>{par}<state>disk-snapshot</state>"
                f"<creationTime>{t}</creationTime><disks><disk name='vda' snapshot='external'>"
                f"<driver type='qcow2'/><source file='{d}/tree.{name}.qcow2'/></disk></disks>"
                "</domainsnapshot>"
            )

        def cli(*args: str) -> tuple[int, str, int]:
            from virtshift.cli.main import main

            o, e = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                rc = main(["-c", self.uri, *args])
            return rc, e.getvalue().strip(), len(o.getvalue())

        for n in sizes:
            log(f"tree: growing a {shape} of snapshots to {n} (REDEFINE, one at a time)")
            while count < n:
                name = f"s{count:04d}"
                parent = f"s{parent_of(count):04d}" if count else None
                t0 = time.perf_counter()
                dom.snapshotCreateXML(redefine_xml(name, parent, 1_700_000_000 + count), flags)
                build.append((count, time.perf_counter() - t0))
                count, prev = count + 1, name
            res: dict[str, list[float]] = {
                "snapshot-list --tree": [],
                "snapshotLookupByName": [],
                "create one more (REDEFINE)": [],
                "create one more (disk-only, inactive: qemu-img)": [],
            }
            info: dict[str, Any] = {}
            for k in range(reps + 1):
                t0 = time.perf_counter()
                rc, err, size = cli("snapshot-list", f"tree{tag}", "--tree")
                t = time.perf_counter() - t0
                if rc:
                    errors[f"snapshot-list --tree @ {n}"] = err[:300]
                else:
                    info["tree_output_bytes"] = size
                    if k:
                        res["snapshot-list --tree"].append(t)
                t0 = time.perf_counter()
                dom.snapshotLookupByName("s0000")
                if k:
                    res["snapshotLookupByName"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s = dom.snapshotCreateXML(redefine_xml("extra", prev, 1_800_000_000 + k), flags)
                if k:
                    res["create one more (REDEFINE)"].append(time.perf_counter() - t0)
                s.delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                ov = d / f"tree.extra{n}-{k}.qcow2"
                t0 = time.perf_counter()
                s = dom.snapshotCreateXML(
                    snapshot_xml("extra2", [str(ov)]), vlv.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                )
                if k:
                    res["create one more (disk-only, inactive: qemu-img)"].append(
                        time.perf_counter() - t0
                    )
                s.delete(vlv.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                if dom.snapshotCurrent().getName() != prev:  # the chain's end stays current
                    raise RuntimeError(
                        f"current snapshot is {dom.snapshotCurrent().getName()}, not {prev}"
                    )
            out[str(n)] = {"series": {k: stats(v) for k, v in res.items() if v}, **info}
            with Phases() as ph:
                dom.snapshotLookupByName("s0000")
            out[str(n)]["lookup_phases"] = ph.report()
            if n == sizes[-1]:
                prof = self.out / "profiles" / f"tree-{tag}-lookup-{n}.txt"
                profile_text(lambda: dom.snapshotLookupByName("s0000"), prof)
                out["profile"] = str(prof.relative_to(self.out))
            log(
                f"  {n}: "
                + ", ".join(
                    f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in res.items() if v
                )
                + (
                    f"; errors: {list(errors.values())[-1][:120]}"
                    if f"snapshot-list --tree @ {n}" in errors
                    else ""
                )
            )
        growth = {}
        for op in (
            "snapshot-list --tree",
            "snapshotLookupByName",
            "create one more (REDEFINE)",
            "create one more (disk-only, inactive: qemu-img)",
        ):
            pts = [
                (n, out[str(n)]["series"][op]["median"])
                for n in sizes
                if op in out[str(n)]["series"]
            ]
            growth[op] = _growth(pts, sizes)
        self.add_row(
            {
                "row": "tree",
                "what": f"snapshots in one domain's tree ({shape}, REDEFINE metadata)",
                "variant": shape,
                "sizes": sizes,
                "by_size": out,
                "growth": growth,
                "build": [[n, round(t, 6)] for n, t in build],
                "errors": errors,
            }
        )
        with contextlib.suppress(vlv.libvirtError):
            dom.undefineFlags(vlv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    # -- main ----------------------------------------------------------------------------------

    def run(self) -> int:
        t_start = time.monotonic()
        self.results["meta"] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": self.quick,
            "config": self.cfg,
            "command": " ".join(["bench/run", *sys.argv[1:]]),
            "machine": self.machine(),
        }
        if self.args.with_libvirt:
            lv = Libvirt(self.work)
            try:
                lv.start()
                self.lv = lv
                self.results["meta"]["libvirt"] = {"status": "used", **lv.info}
                log(
                    f"libvirt {lv.info['libvirt']} (session mode, uid {lv.info['uid']}) "
                    f"against QEMU {lv.info['qemu']}"
                )
            except Exception as err:
                lv.stop()
                self.lv_skip = f"skipped: {err}"[:500]
        else:
            self.lv_skip = "skipped: run with --with-libvirt"
        if self.lv is None:
            self.results["meta"]["libvirt"] = {"status": self.lv_skip}
            log(f"libvirt rows {self.lv_skip}")
        self.save()
        rows = [
            ("startup", self.row_startup),
            ("snapshot", self.row_snapshot),
            ("pivot", self.row_pivot),
            ("migrate", self.row_migrate),
            ("tree", self.row_tree),
        ]
        only = set(self.args.only.split(",")) if self.args.only else None
        failed = []
        try:
            for name, fn in rows:
                if only and name not in only:
                    continue
                load0 = os.getloadavg()
                t0 = time.monotonic()
                try:
                    fn()
                except Exception as err:
                    failed.append(name)
                    self.results["notes"].append(f"row {name} failed: {type(err).__name__}: {err}")
                    log(f"row {name} FAILED:\n{traceback.format_exc()}")
                self.results.setdefault("row_seconds", {})[name] = round(time.monotonic() - t0, 1)
                self.results.setdefault("load", {})[name] = [
                    round(x, 2) for x in (*load0, *os.getloadavg())
                ]
        finally:
            self.cleanup()
        self.results["meta"]["uptime_end"] = subprocess.run(
            ["uptime"], capture_output=True, text=True
        ).stdout.strip()
        self.results["meta"]["duration_s"] = round(time.monotonic() - t_start, 1)
        self.save()
        from report import write_benchmarks_md, write_plot  # bench/report.py

        png = write_plot(self.results, self.out / "results.png")
        self.results["meta"]["plot"] = str(png) if png else "not written (no matplotlib)"
        self.save()
        # bench/results/ is git-ignored: BENCHMARKS.md points at a copy in bench/published/
        pub = HERE / "published"
        if pub.resolve() != self.out.resolve():
            shutil.rmtree(pub, ignore_errors=True)
            shutil.copytree(self.out, pub)
        md = REPO / "BENCHMARKS.md"
        write_benchmarks_md(self.results, md, pub, REPO)
        log(
            f"wrote {self.out / 'results.json'}, {self.out / 'results.png'}, {md} "
            f"in {self.results['meta']['duration_s']:.0f} s"
        )
        return 1 if failed else 0

    def cleanup(self) -> None:
        for name in self.conn._driver.names():
            with contextlib.suppress(vlv.libvirtError):
                self.destroy(self.conn.lookupByName(name))
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.lv is not None:
            self.lv.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")


class Writer(threading.Thread):
    """A busy guest: 256 KiB writes through the virtio device (HMP qemu-io), one
    every 10 ms, as ``virtshift demo`` does."""

    def __init__(self, send: Callable[[str], Any]) -> None:
        super().__init__(daemon=True)
        self.send = send
        self.stop_ev = threading.Event()
        self.n = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop_ev.is_set():
            off = (self.n % 256) * 256 * 1024
            cmd = (
                "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "
                f'"write -P 0x{0x40 + self.n % 64:x} {off} 256k"'
            )
            try:
                self.send(cmd)
                self.n += 1
            except Exception as err:
                self.errors.append(str(err))
            time.sleep(0.01)

    def halt(self) -> None:
        self.stop_ev.set()
        if self.is_alive():
            self.join()


def precreate_images(paths: list[str], size: str = "16M") -> None:
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda p: img("create", "-q", "-f", "qcow2", p, size), paths))


def _qemu_io_fill(path: Path, pattern: int, start_mib: int, mib: int) -> None:
    cmds: list[str] = []
    step = 256
    for off in range(start_mib, start_mib + mib, step):
        n = min(step, start_mib + mib - off)
        cmds += ["-c", f"write -P 0x{pattern:x} {off}M {n}M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True, capture_output=True)


def _median_phases(items: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for it in items for k in it))
    return {k: round(statistics.median([it.get(k, 0.0) for it in items]), 4) for k in keys}


def _growth(pts: list[tuple[int, float]], sizes: list[int]) -> dict[str, Any]:
    """Log-log slope between consecutive sizes (1 = linear)."""
    import itertools
    import math

    out: dict[str, Any] = {"points": pts}
    slopes = []
    for (n1, t1), (n2, t2) in itertools.pairwise(pts):
        slopes.append(round(math.log(t2 / t1) / math.log(n2 / n1), 3))
    out["slopes"] = slopes
    out["complete"] = len(pts) == len(sizes)
    out["pass"] = bool(out["complete"] and slopes and all(s <= 1.1 for s in slopes))
    return out


def _importtime(argv: list[str]) -> list[dict[str, Any]]:
    """The heaviest imports of one run (``-X importtime``), by cumulative time."""
    cmd = (
        [sys.executable, "-X", "importtime", *argv]
        if argv[0] != sys.executable
        else [argv[0], "-X", "importtime", *argv[1:]]
    )
    res = subprocess.run(cmd, capture_output=True, text=True)
    rows: list[dict[str, Any]] = []
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append(
                {
                    "module": m.group(4),
                    "self_ms": int(m.group(1)) / 1000,
                    "cumulative_ms": int(m.group(2)) / 1000,
                    "depth": len(m.group(3)) // 2,
                }
            )
    top = [r for r in rows if r["depth"] <= 1]
    top.sort(key=lambda r: -r["cumulative_ms"])
    return top[:18]


def _median_ms(d: Path, n: int, timed: Callable[[Path], object]) -> float:
    """Median ms of ``timed(path)`` over ``n`` fresh paths in ``d`` (each
    removed afterwards, untimed)."""
    xs = []
    for i in range(n):
        path = d / f".cost{i}"
        t0 = time.perf_counter()
        timed(path)
        xs.append(time.perf_counter() - t0)
        os.unlink(path)
    return round(statistics.median(xs) * 1000, 3)


def _fsync_cost(d: Path) -> float:
    from virtshift.store.files import write_atomic

    return _median_ms(d, 20, lambda path: write_atomic(path, "x" * 4096))


def _create_cost(d: Path) -> float:
    """What creating one empty file costs in ``d`` (every atomic write of every
    system creates one): 0.007-0.02 ms in most directories of this machine's
    ext4, 0.25-0.45 ms in some, and which ones changes from minute to minute."""
    return _median_ms(
        d, 40, lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    )


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def summary_line(row: dict[str, Any]) -> str:
    from report import row_summary

    return row_summary(row)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer sizes and repetitions; 256 MiB chain"
    )
    ap.add_argument(
        "--with-libvirt",
        action="store_true",
        help="also measure libvirt 9.0 (session mode, uid 65534)",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--only", help="comma-separated rows: startup,snapshot,pivot,migrate,tree")
    ap.add_argument(
        "--snapshot-sizes",
        help="comma-separated disk counts for the snapshot row (default 1,4,16,30,64)",
    )
    ap.add_argument("--reps", type=int, help="override every row's repetition count")
    ap.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the work directory (images, virtshift's root, libvirt's session"
        " directories) is made (default /var/tmp)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    # cleanup on SIGTERM and SIGINT, also when started in the background (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(HERE))
    bench = Bench(args)
    log(f"work directory {bench.work}; results to {bench.out}" + (" (quick)" if args.quick else ""))
    try:
        return bench.run()
    except KeyboardInterrupt:
        bench.cleanup()
        return 130


if __name__ == "__main__":
    sys.exit(main())
