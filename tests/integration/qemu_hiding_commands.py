"""An emulator wrapper: real QEMU behind a QMP proxy that hides some commands.

Used as a domain's ``<emulator>`` (through a small shell script) to test what
virtshift does with a QEMU that lacks ``transaction`` (the proposal's R3
fallback), without a mock: every other command goes to the real QEMU.

    qemu_hiding_commands.py HIDE[,HIDE...] -- QEMU-ARGV...

The wrapper starts QEMU with each QMP monitor socket renamed (``X`` ->
``X.real``), listens on the original path itself, and forwards messages both
ways, except that:

* ``query-commands`` replies lose the hidden commands;
* a hidden command is answered with QEMU's own CommandNotFound error, and a
  ``transaction`` containing a hidden action type likewise.

With ``QMP_PROXY_CLOSE_TRIGGER=FILE`` in its environment the wrapper also
closes a monitor connection in the middle of a command, once: when FILE exists
and holds a command's name, the next such command goes to QEMU, FILE is
removed, and the client connection is closed as soon as QEMU's reply comes,
without relaying it (the fault matrix's "QMP socket closed mid-command").
Hiding no command (an empty HIDE list) makes it only that.

SIGTERM is passed to QEMU; the wrapper exits when QEMU does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def _messages(buf: bytearray) -> list[dict]:
    """Cut whole JSON objects off the front of ``buf``."""
    out = []
    dec = json.JSONDecoder()
    while True:
        text = buf.decode(errors="replace").lstrip()
        if not text:
            buf.clear()
            return out
        try:
            obj, end = dec.raw_decode(text)
        except ValueError:
            return out
        consumed = len(text[:end].encode())
        skipped = len(buf) - len(text.encode())
        del buf[: skipped + consumed]
        out.append(obj)


def _hangup(sock: socket.socket) -> None:
    """Close a socket another thread may be blocked on (close alone would not wake it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _armed(trigger: str | None, cmd: object) -> bool:
    """True (once: the trigger file is removed) when ``trigger`` names ``cmd``."""
    if trigger is None or not isinstance(cmd, str):
        return False
    try:
        with open(trigger) as f:
            wanted = f.read().strip()
    except OSError:
        return False
    if wanted != cmd:
        return False
    with contextlib.suppress(OSError):
        os.unlink(trigger)
    return True


def _serve(listener: socket.socket, real_path: str, hidden: set[str], trigger: str | None) -> None:
    while True:
        client, _ = listener.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(500):
            try:
                upstream.connect(real_path)
                break
            except OSError:
                time.sleep(0.01)
        pending: dict[str, str] = {}
        lock = threading.Lock()

        def send(sock: socket.socket, msg: dict, lock: threading.Lock = lock) -> None:
            with lock:
                sock.sendall(json.dumps(msg).encode() + b"\r\n")

        def down(client=client, upstream=upstream, pending=pending) -> None:
            buf = bytearray()
            while True:
                try:
                    data = upstream.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    _hangup(client)
                    return
                buf += data
                for msg in _messages(buf):
                    if "event" not in msg and pending.get(str(msg.get("id"))) == "close":
                        # QEMU has carried the command out; the client never hears it
                        _hangup(client)
                        _hangup(upstream)
                        return
                    if "return" in msg and pending.pop(str(msg.get("id")), "") == "query-commands":
                        msg["return"] = [c for c in msg["return"] if c.get("name") not in hidden]
                    try:
                        send(client, msg)
                    except OSError:
                        return

        threading.Thread(target=down, daemon=True).start()
        buf = bytearray()
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                _hangup(upstream)
                break
            buf += data
            for msg in _messages(buf):
                cmd = msg.get("execute")
                actions = (
                    msg.get("arguments", {}).get("actions", []) if cmd == "transaction" else []
                )
                blocked = cmd in hidden or any(a.get("type") in hidden for a in actions)
                if blocked:
                    name = (
                        cmd
                        if cmd in hidden
                        else next(a["type"] for a in actions if a.get("type") in hidden)
                    )
                    reply = {
                        "error": {
                            "class": "CommandNotFound",
                            "desc": f"The command {name} has not been found",
                        }
                    }
                    if "id" in msg:
                        reply["id"] = msg["id"]
                    send(client, reply)
                    continue
                if cmd == "query-commands":
                    pending[str(msg.get("id"))] = cmd
                elif _armed(trigger, cmd):
                    pending[str(msg.get("id"))] = "close"
                with lock:
                    upstream.sendall(json.dumps(msg).encode())


def main() -> int:
    sep = sys.argv.index("--")
    hidden = set(filter(None, sys.argv[1].split(",")))
    argv = sys.argv[sep + 1 :]
    proxies: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        if (
            arg.startswith("socket,id=char")
            and "server=on" in arg
            and ("id=charmonitor," in arg or "id=charquery," in arg)
        ):
            parts = arg.split(",")
            for j, part in enumerate(parts):
                if part.startswith("path="):
                    path = part[len("path=") :]
                    parts[j] = f"path={path}.real"
                    proxies.append((path, path + ".real"))
            argv[i] = ",".join(parts)
    listeners = []
    for path, _real in proxies:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path + ".proxy-tmp")
        sock.listen(4)
        listeners.append(sock)
    qemu = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: qemu.terminate())
    # only offer the monitor once QEMU's real one exists
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and qemu.poll() is None:
        if all(os.path.exists(real) for _p, real in proxies):
            break
        time.sleep(0.01)
    for (path, real), sock in zip(proxies, listeners, strict=True):
        os.rename(path + ".proxy-tmp", path)
        trigger = os.environ.get("QMP_PROXY_CLOSE_TRIGGER")
        threading.Thread(target=_serve, args=(sock, real, hidden, trigger), daemon=True).start()
    return qemu.wait()


if __name__ == "__main__":
    sys.exit(main())
