"""The QMP client's wire behaviour against a scripted peer on a unix socket.

The integration tests run the client against QEMU; these script what QEMU
rarely does on demand: a connection whose first message is not a greeting.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from virtshift.qmp.client import Monitor

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'


class Peer:
    """Serves two connections: the first answers with a stale reply instead of
    a greeting, the second speaks QMP and answers every command ``{}``."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(2)
        self.first = b""
        self.commands: list[dict[str, object]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b'{"return": {}, "id": "left-by-a-dead-client"}\n')
            while chunk := conn.recv(65536):
                self.first += chunk
        conn, _ = self.server.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(GREETING)
            for line in lines:
                msg = json.loads(line)
                self.commands.append(msg)
                conn.sendall(json.dumps({"return": {}, "id": msg["id"]}).encode() + b"\n")

    def close(self) -> None:
        self.server.close()
        self.thread.join(10)


def test_a_primed_command_goes_whole_on_the_connection_made_again(tmp_path: Path) -> None:
    # prime() writes on a connection still being made; when that connection
    # turns out bad (its first message is no greeting), connect() makes another,
    # the primed text is gone with the first, and submit() sends the command whole
    peer = Peer(tmp_path / "mon.sock")
    mon = Monitor(str(tmp_path / "mon.sock"), timeout=10).connect_soon()
    actions = {"actions": [{"type": "blockdev-snapshot-sync", "data": {"node-name": "n1"}}]}
    mon.prime("transaction", actions)
    assert mon.submit("transaction", actions).result() == {}
    mon.close()
    peer.close()
    # the first connection got the negotiation and the command but its closing
    # brace: QEMU could not have run it there
    first = peer.first.decode().splitlines()
    assert json.loads(first[0])["execute"] == "qmp_capabilities"
    assert first[1].startswith('{"execute":"transaction"')
    assert not first[1].endswith("}")
    assert len(first) == 2
    # the second got the command once, whole
    assert [c["execute"] for c in peer.commands] == ["qmp_capabilities", "transaction"]
    assert peer.commands[1]["arguments"] == actions
