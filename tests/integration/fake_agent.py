"""A test guest agent on the host end of a domain's agent channel.

With no guest OS, nobody answers on ``org.qemu.guest_agent.0``.  This agent
takes over the channel's socket path (QEMU's listening socket is unlinked
from the file system, then this agent binds the same path), speaks the QGA
protocol, and records every call with what a caller-supplied probe saw at
that moment, so tests can check the order of freeze, snapshot and thaw.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any


class FakeAgent:
    def __init__(self, path: str, probe: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.probe = probe or (lambda: None)
        self.calls: list[tuple[str, Any]] = []
        self.fail: set[str] = set()
        self.silent = False
        os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind through the directory's descriptor: test paths can exceed sun_path
        dirfd = os.open(os.path.dirname(path), os.O_PATH)
        try:
            self._sock.bind(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
        finally:
            os.close(dirfd)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = ""
        dec = json.JSONDecoder()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = dec.raw_decode(buf.lstrip())
                    except ValueError:
                        break
                    buf = buf.lstrip()[end:]
                    cmd = msg.get("execute")
                    self.calls.append((cmd, self.probe()))
                    if self.silent:
                        continue
                    if cmd in self.fail:
                        reply = {"error": {"class": "GenericError", "desc": f"{cmd} refused"}}
                    elif cmd == "guest-sync":
                        reply = {"return": msg["arguments"]["id"]}
                    elif cmd in ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw"):
                        reply = {"return": 2}
                    else:
                        reply = {"error": {"class": "CommandNotFound", "desc": cmd}}
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
