"""A minimal QEMU guest agent (QGA) client, for quiescing file systems.

The guest agent listens inside the guest on the virtio-serial port
``org.qemu.guest_agent.0``; QEMU exposes the host end as a unix socket (the
domain's ``<channel>`` source path).  The protocol is QMP-like JSON without a
greeting.  Because a previous client may have left a half-read reply in the
pipe, every session starts with ``guest-sync`` carrying a random id, and
replies are read until that id comes back (the QGA documentation's resync
procedure).

Only what snapshots need is here: ``guest-sync``, ``guest-fsfreeze-freeze``,
``guest-fsfreeze-thaw``, ``guest-fsfreeze-status``.  Failures raise
:class:`~virtshift.errors.VirtError` with AGENT_UNRESPONSIVE (86).
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from typing import Any

from virtshift.errors import ErrorCode, VirtError
from virtshift.qmp.client import connect_unix

__all__ = ["GuestAgent", "agent_timeout"]


def agent_timeout() -> float:
    """Seconds to wait for the agent (``$VIRTSHIFT_AGENT_TIMEOUT``, default 5)."""
    try:
        return float(os.environ.get("VIRTSHIFT_AGENT_TIMEOUT", "5"))
    except ValueError:
        return 5.0


class GuestAgent:
    """A connection to a guest agent socket.

    :param path: the host end of the agent channel.
    :param timeout: seconds to wait for each reply.
    """

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = agent_timeout() if timeout is None else timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and synchronise.

        :raise VirtError: AGENT_UNRESPONSIVE when the socket is absent or the
            agent does not answer ``guest-sync`` in time.
        """
        try:
            self._sock = connect_unix(self.path)
        except OSError as err:
            raise VirtError(
                ErrorCode.AGENT_UNRESPONSIVE,
                f"QEMU guest agent is not connected (socket '{self.path}': {err.strerror})",
            ) from err
        self._sock.settimeout(self.timeout)
        token = random.randint(1, 2**31 - 1)
        try:
            self._send({"execute": "guest-sync", "arguments": {"id": token}})
            deadline = time.monotonic() + self.timeout
            while self._recv(deadline).get("return") != token:
                pass
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one agent command; return its ``return`` value.

        :raise VirtError: AGENT_UNRESPONSIVE on time-out; OPERATION_FAILED when
            the agent answers with an error.
        """
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._recv(time.monotonic() + self.timeout)
        if "error" in reply:
            desc = (
                reply["error"].get("desc", "unknown error")
                if isinstance(reply["error"], dict)
                else str(reply["error"])
            )
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"guest agent command '{command}' failed: {desc}",
            )
        return reply.get("return")

    def freeze(self) -> int:
        """Freeze the guest's file systems; return how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze"))

    def thaw(self) -> int:
        """Thaw the guest's file systems; return how many were thawed."""
        return int(self.execute("guest-fsfreeze-thaw"))

    # -- wire -------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as err:
            raise VirtError(
                ErrorCode.AGENT_UNRESPONSIVE, f"cannot talk to the guest agent: {err.strerror}"
            ) from err

    def _recv(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        decoder = json.JSONDecoder()
        while True:
            text = self._buf.lstrip(b"\xff \r\n\t")
            if text:
                try:
                    obj, end = decoder.raw_decode(text.decode())
                except (ValueError, UnicodeDecodeError):
                    obj, end = None, 0
                if obj is not None:
                    self._buf = text[len(text.decode()[:end].encode()) :]
                    if isinstance(obj, dict):
                        return obj
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise VirtError(
                    ErrorCode.AGENT_UNRESPONSIVE,
                    "QEMU guest agent is not responding (no reply in time)",
                )
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise VirtError(
                    ErrorCode.AGENT_UNRESPONSIVE, f"guest agent connection failed: {err.strerror}"
                ) from err
            if not chunk:
                raise VirtError(ErrorCode.AGENT_UNRESPONSIVE, "guest agent closed the connection")
            self._buf = text + chunk
