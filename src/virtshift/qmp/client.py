"""A synchronous QMP monitor on a blocking unix socket.

QMP is JSON text, one message per line: QEMU greets, the client negotiates
with ``qmp_capabilities``, then each command (sent with an ``id``) gets one
reply with the same ``id``, and events come in between.  :class:`Monitor`
speaks that on a plain socket in the caller's thread: ``execute`` returns
QEMU's ``return`` value or raises :class:`QMPError`; events read while
waiting for a reply are queued for :meth:`Monitor.events` and
:meth:`Monitor.wait_event`, and an event that QEMU sent while the caller did
other work is read when the caller next asks.

No thread and no event loop: every use of a monitor is one short call under
the domain's (or the query monitor's) lock, so nothing needs to listen in the
background; the caller's thread works while QEMU does (:meth:`Monitor.submit`,
:meth:`Monitor.connect_soon`) without sharing the interpreter with a loop
thread, and :meth:`Monitor.close` has closed the socket when it returns.

What this module does not do: build commands (see :mod:`virtshift.qmp.commands`),
interpret replies into models, or decide what to do on errors.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # socket (~4 ms): only QEMU-talking calls need it
    import socket

from virtshift.errors import ErrorCode, QMPError, VirtError
from virtshift.logs import DEBUG, get_logger

__all__ = ["Monitor", "Pending", "connect_unix"]

_log = get_logger("virtshift.qmp")

#: Unix socket paths longer than this do not fit ``sockaddr_un`` (108 bytes).
_SUN_PATH_MAX = 107

#: Bytes asked of the socket per read.
_CHUNK = 1 << 16

#: Seconds :meth:`Monitor.submit` sleeps once the command is written.
_SUBMIT_PAUSE = 50e-6

#: What :meth:`Monitor.prime` holds back of a command: the ``}`` that closes
#: its JSON object, and the end of line.
_HELD = 2

#: ``ioctl`` request for the bytes of a socket's send queue (Linux
#: ``SIOCOUTQ``, the same number as ``TIOCOUTQ``).
_SIOCOUTQ = 0x5411


class _Lost(Exception):
    """The monitor's connection is gone (QEMU closed it, or it broke)."""


class _NoGreeting(Exception):
    """The first message of a connection was not QEMU's greeting."""


def connect_unix(path: str) -> socket.socket:
    """A connected unix stream socket to ``path``, even when the path is long.

    ``sockaddr_un`` holds about 107 bytes; for longer paths connect through
    ``/proc/self/fd/N/NAME`` with ``N`` an ``O_PATH`` descriptor of the directory.
    """
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) <= _SUN_PATH_MAX:
            sock.connect(path)
        else:
            dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
            finally:
                os.close(dirfd)
    except OSError:
        sock.close()
        raise
    return sock


def _check_socket(path: str) -> None:
    """Raise unless ``path`` is a unix socket owned by this user (``lstat``)."""
    try:
        st = os.lstat(path)
    except OSError as err:
        raise VirtError(
            ErrorCode.OPERATION_FAILED,
            f"cannot connect to QEMU monitor '{path}': {err.strerror}",
        ) from err
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise VirtError(
            ErrorCode.OPERATION_FAILED,
            f"QEMU monitor '{path}' is not a socket owned by this user; refusing to connect",
        )


class Pending:
    """A command sent by :meth:`Monitor.submit`, whose reply is still to come."""

    def __init__(
        self, monitor: Monitor, command: str, sent: dict[str, Any], ident: str, timeout: float
    ) -> None:
        self._monitor = monitor
        self._command = command
        self._sent = sent
        self._id = ident
        self._timeout = timeout
        self._got: dict[str, Any] | None = None

    def done(self) -> bool:
        """True once the reply (or the failure) is in (reads what QEMU has
        sent so far, never waits)."""
        return self._got is not None or self._monitor._arrived(self._id)

    def result(self) -> Any:
        """QEMU's ``return`` value.

        :raise QMPError: as :meth:`Monitor.execute`.
        """
        if self._got is None:
            self._got = self._monitor._reply(self._command, self._sent, self._id, self._timeout)
        reply = self._got
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QMPError(
                self._command,
                str(error.get("desc", "unknown error")),
                error_class=str(error.get("class", "GenericError")),
                sent=self._sent,
                received=reply,
            )
        return reply.get("return")


class _Primed:
    """A command written but for its last bytes (:meth:`Monitor.prime`)."""

    __slots__ = ("arguments", "command", "ident", "tail")

    def __init__(
        self, command: str, arguments: dict[str, Any] | None, ident: str, tail: bytes
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.ident = ident
        self.tail = tail


class Monitor:
    """A QMP monitor connection (blocking API).

    :param path: the monitor's unix socket.
    :param timeout: seconds to wait for connecting and for each command.

    One thread at a time uses it (a lock keeps two from mixing their reads).
    """

    def __init__(self, path: str, *, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        #: bytes read and not yet split into messages; ``_scan``: how far
        #: they are known to hold no end of line
        self._buf = bytearray()
        self._scan = 0
        self._events: deque[dict[str, Any]] = deque()
        #: replies read while waiting for something else, by id
        self._replies: dict[str, dict[str, Any]] = {}
        #: ids whose caller stopped waiting (time-out): their replies are dropped
        self._abandoned: set[str] = set()
        #: ids are unique to this object: a reply left behind by a client that
        #: died mid-command is never taken for one of ours
        self._tag = os.urandom(4).hex()
        self._count = 0
        #: set by :meth:`connect_soon`: the greeting and the negotiation's
        #: reply are still to be read
        self._soon = False
        self._caps = ""
        self._lost: str | None = None
        #: the command :meth:`prime` wrote but for its last bytes
        self._primed: _Primed | None = None
        self._lock = threading.RLock()

    # -- connection -------------------------------------------------------

    def connect(self) -> Monitor:
        """Connect and negotiate capabilities.

        A monitor whose previous client died mid-command may hand that command's
        reply to the next client before the greeting (seen after SIGKILLs); such
        a connection is dropped and made again, a few times.

        :raise VirtError: OPERATION_FAILED when the socket cannot be reached, is
            not a socket of this user (a symbolic link is never followed), or
            QEMU does not greet.
        """
        with self._lock:
            if self._sock is not None and self._soon:
                try:
                    self._negotiated()
                    return self
                except (_NoGreeting, _Lost, OSError, ValueError) as err:
                    _log.debug("monitor %s: early connection failed (%s)", self.path, err)
                    self._drop()
            _check_socket(self.path)
            for attempt in range(4):
                try:
                    self._open()
                except OSError as err:
                    raise VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"cannot connect to QEMU monitor '{self.path}': {err.strerror}",
                    ) from err
                try:
                    self._negotiated()
                    return self
                except (_NoGreeting, _Lost, OSError, ValueError) as err:
                    self._drop()
                    if not isinstance(err, _NoGreeting) or attempt == 3:
                        raise VirtError(
                            ErrorCode.OPERATION_FAILED,
                            f"QEMU monitor '{self.path}' did not answer: {_describe(err)}",
                        ) from err
                    _log.debug("monitor %s: bad greeting (%s), connecting again", self.path, err)
                    time.sleep(0.05)
            raise AssertionError("unreachable")

    def connect_soon(self) -> Monitor:
        """Start connecting and return at once: QEMU greets and negotiates
        while the caller works (under the domain lock, as every use of the
        monitor); :meth:`connect` (or ``with``) reads the answers, and reports
        any failure as it would have."""
        with self._lock:
            try:
                _check_socket(self.path)
                self._open()
            except (VirtError, OSError):
                self._drop()  # connect() meets it again and says so
            return self

    def _open(self) -> None:
        """A new connection, its negotiation sent (QEMU reads it after its greeting)."""
        self._drop()
        self._sock = connect_unix(self.path)
        self._soon = True
        self._caps = self._next_id()
        self._write({"execute": "qmp_capabilities", "id": self._caps})

    def _negotiated(self) -> None:
        """Read the greeting and the negotiation's reply."""
        deadline = time.monotonic() + self.timeout
        first = self._message(deadline)
        if "QMP" not in first:
            raise _NoGreeting(f"expected a greeting, got {json.dumps(first)[:200]}")
        self.greeting = first
        while self._caps not in self._replies:
            self._take(self._message(deadline))
        reply = self._replies.pop(self._caps)
        if "error" in reply:
            raise _NoGreeting(f"negotiation failed: {json.dumps(reply)[:200]}")
        self._soon = False

    def reconnect(self) -> Monitor:
        """Drop the connection (one that failed mid-command) and connect again.

        :raise VirtError: as :meth:`connect`.
        """
        with self._lock:
            self._drop()
            self._events.clear()
            return self.connect()

    def close(self) -> None:
        """Disconnect (safe to call twice); the socket is closed on return,
        so QEMU can take the next client at once."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()
        self._scan = 0
        self._replies.clear()
        self._abandoned.clear()
        self._soon = False
        self._lost = None
        # closing the connection is what withdraws it: QEMU drops what it read
        # of an unfinished command when its client goes
        self._primed = None

    @property
    def connected(self) -> bool:
        """True between a successful :meth:`connect` and :meth:`close`."""
        return self._sock is not None and not self._soon and self._lost is None

    def __enter__(self) -> Monitor:
        return self if self.connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one command and return its ``return`` value.

        :raise QMPError: QEMU answered with an error (``desc`` and ``class`` kept),
            or the monitor went away.
        """
        return self._pending(command, arguments, timeout).result()

    def submit(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Pending:
        """Send one command and return at once, once it is written to QEMU; its
        :meth:`Pending.result` is what :meth:`execute` would have returned or raised.

        The caller's thread can then work while QEMU does (formatting what
        the command's success will need written): the command is on the wire
        before this returns, so that work does not delay it.

        When the same command (equal arguments) was :meth:`prime`-d on this
        connection, only its last bytes are written.
        """
        with self._lock:
            primed = self._primed
            if primed is not None and primed.command == command and primed.arguments == arguments:
                pending = self._finish(primed, timeout)
            else:
                pending = self._pending(command, arguments, timeout)
        # Linux wakes the reader of a unix socket "synchronously": QEMU's main
        # thread is queued on this thread's CPU, on the guess that the writer
        # now waits.  This one works instead, and the two would share one CPU
        # (seen: 2 ms of Python taking 4-6 ms of wall time in 4 calls of 48)
        # until the balancer moves one.  Sleeping a moment lets QEMU start
        # here; this thread then wakes on a CPU that is free, if there is one.
        # (execute() waits for the reply at once: it needs no pause.)
        time.sleep(_SUBMIT_PAUSE)
        return pending

    def _pending(
        self, command: str, arguments: dict[str, Any] | None, timeout: float | None
    ) -> Pending:
        sent = _command(command, arguments)
        ident = self._send(command, sent)
        return Pending(self, command, sent, ident, timeout if timeout else self.timeout)

    def prime(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Write all of a command but the ``}`` that closes it, and return:
        QEMU reads it while the caller works; :meth:`submit` of the same
        command writes the rest, and QEMU runs it at once.

        QEMU 7.2 reads a QMP command one byte per ``read`` (about 3
        microseconds a byte here: 9 ms for a transaction of 16 snapshots), and
        cannot run a JSON object that is not closed.  A primed command runs only once
        :meth:`submit` sends the rest; until then it is withdrawn by anything
        that ends the connection (:meth:`close`, a process that dies, an early
        connection that fails in :meth:`connect`), because QEMU drops what it
        read of an unfinished command when its client goes.  Any other command
        on this monitor withdraws it the same way before it is written.

        On a connection started by :meth:`connect_soon` it is written after the
        negotiation, without waiting for QEMU's answers.  Priming the command
        that is primed already does nothing; priming another withdraws that
        one first (a new connection, started as :meth:`connect_soon` does), so a
        command can be primed on a guess and again once it is known.  Does
        nothing when the monitor is not connected: :meth:`submit` then writes
        the command whole, as always.
        """
        with self._lock:
            primed = self._primed
            if primed is not None:
                if primed.command == command and primed.arguments == arguments:
                    return
                _log.debug("monitor %s: %s withdrawn", self.path, primed.ident)
                self._primed = None
                try:
                    self._open()
                except (VirtError, OSError):
                    self._drop()  # submit() connects again and meets it
                    return
            if self._sock is None or self._lost is not None:
                return
            ident = self._next_id()
            data = self._encode({**_command(command, arguments), "id": ident})
            assert data.endswith(b'"}\n'), data[-20:]  # the id, a string, ends it
            try:
                self._sock.sendall(data[:-_HELD])
            except OSError as err:
                self._lost = _describe(err)  # submit() meets it
                return
            self._primed = _Primed(command, arguments, ident, data[-_HELD:])

    def unread(self) -> int:
        """Bytes written to QEMU that it has not read yet (0 when that cannot
        be told): while a primed command is being read, this is above 0."""
        sock = self._sock
        if sock is None:
            return 0
        import fcntl

        try:
            got = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(got, sys.byteorder, signed=True)

    def _finish(self, primed: _Primed, timeout: float | None) -> Pending:
        """Write the rest of ``primed`` (the whole command again if the
        connection it was written on is gone)."""
        sent = _command(primed.command, primed.arguments)
        if self._soon:
            # the greeting and the negotiation's answer: an early connection
            # that failed is made again, and the primed text went with it
            self.connect()
        if self._primed is not primed:
            return self._pending(primed.command, primed.arguments, timeout)
        self._primed = None
        assert self._sock is not None
        try:
            self._sock.sendall(primed.tail)
        except OSError as err:
            self._lost = _describe(err)
            raise QMPError(
                primed.command, f"monitor connection failed: {self._lost}", sent=sent
            ) from err
        if _log.isEnabledFor(DEBUG):
            _log.debug("--> (the rest of %s)", primed.ident)
        return Pending(
            self, primed.command, sent, primed.ident, timeout if timeout else self.timeout
        )

    def execute_raw(self, text: str) -> dict[str, Any]:
        """Pass a QMP JSON command through; return the whole reply (pass-through API).

        Errors from QEMU come back inside the reply (``{"error": ...}``), as
        libvirt's ``qemuMonitorCommand`` returns them.
        """
        try:
            msg = json.loads(text)
        except ValueError as err:
            raise VirtError(ErrorCode.INVALID_ARG, f"not a QMP JSON object: {text[:80]!r}") from err
        if not isinstance(msg, dict):
            raise VirtError(ErrorCode.INVALID_ARG, f"not a QMP JSON object: {text[:80]!r}")
        if "execute" not in msg:
            raise VirtError(ErrorCode.INVALID_ARG, "QMP command must have an 'execute' member")
        msg.pop("id", None)
        command = str(msg["execute"])
        ident = self._send(command, msg)
        reply = dict(self._reply(command, msg, ident, self.timeout))
        reply.pop("id", None)
        return reply

    def _next_id(self) -> str:
        self._count += 1
        return f"{self._tag}.{self._count}"

    def _send(self, command: str, sent: dict[str, Any]) -> str:
        """Write ``sent`` with a new id; return the id."""
        with self._lock:
            if self._primed is not None:
                # never written into the middle of another command: the
                # primed one is withdrawn with its connection
                _log.debug("monitor %s: %s withdrawn", self.path, self._primed.ident)
                self._drop()
                self.connect()
            if self._soon:
                self.connect()
            if self._sock is None or self._lost is not None:
                raise QMPError(
                    command,
                    f"monitor connection failed: {self._lost or 'not connected'}",
                    sent=sent,
                )
            ident = self._next_id()
            try:
                self._write({**sent, "id": ident})
            except OSError as err:
                self._lost = _describe(err)
                raise QMPError(
                    command, f"monitor connection failed: {self._lost}", sent=sent
                ) from err
            return ident

    def _write(self, msg: dict[str, Any]) -> None:
        assert self._sock is not None
        self._sock.sendall(self._encode(msg))

    @staticmethod
    def _encode(msg: dict[str, Any]) -> bytes:
        # no blanks after separators: QEMU reads every byte on its own
        text = json.dumps(msg, separators=(",", ":"))
        if _log.isEnabledFor(DEBUG):
            _log.debug("--> %s", text)
        return text.encode() + b"\n"

    def _reply(self, command: str, sent: dict[str, Any], ident: str, timeout: float) -> Any:
        """The reply to ``ident``, read until it comes.

        :raise QMPError: time-out (OPERATION_TIMEOUT) or a lost connection,
            both unanswered: the command may have run."""
        deadline = time.monotonic() + timeout
        with self._lock:
            try:
                while ident not in self._replies:
                    self._take(self._message(deadline))
            except TimeoutError as err:
                self._abandoned.add(ident)
                raise QMPError(
                    command,
                    "no reply from QEMU in time",
                    sent=sent,
                    code=ErrorCode.OPERATION_TIMEOUT,
                ) from err
            except (_Lost, OSError, ValueError) as err:
                self._lost = _describe(err)
                raise QMPError(
                    command, f"monitor connection failed: {self._lost}", sent=sent
                ) from err
            return self._replies.pop(ident)

    def _arrived(self, ident: str) -> bool:
        with self._lock:
            if ident not in self._replies and self._lost is None:
                try:
                    self._poll()
                except (_Lost, OSError, ValueError) as err:
                    self._lost = _describe(err)
            return ident in self._replies or self._lost is not None

    # -- wire -------------------------------------------------------------

    def _take(self, msg: dict[str, Any]) -> None:
        """File a message read while waiting for something: an event is queued,
        a reply kept under its id."""
        if "event" in msg:
            self._events.append(msg)
            return
        ident = msg.get("id")
        if isinstance(ident, str) and ident.startswith(self._tag + "."):
            if ident in self._abandoned:
                self._abandoned.discard(ident)
            else:
                self._replies[ident] = msg
            return
        _log.debug("monitor %s: dropped a message that is not ours: %.200s", self.path, msg)

    def _line(self) -> bytes | None:
        """The next whole line of what was read, if there is one."""
        end = self._buf.find(b"\n", self._scan)
        if end < 0:
            self._scan = len(self._buf)
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scan = 0
        return line

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        if _log.isEnabledFor(DEBUG):
            _log.debug("<-- %s", line.decode(errors="replace").strip())
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError(f"QMP message is not an object: {line[:200]!r}")
        return msg

    def _message(self, deadline: float) -> dict[str, Any]:
        """The next message, waiting until ``deadline`` (TimeoutError) for it."""
        assert self._sock is not None
        while True:
            line = self._line()
            if line is not None:
                msg = self._parse(line)
                if msg is not None:
                    return msg
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            chunk = self._sock.recv(_CHUNK)  # TimeoutError at the deadline
            if not chunk:
                raise _Lost("QEMU closed the monitor")
            self._buf += chunk

    def _poll(self) -> None:
        """Read and file whatever QEMU has sent, without waiting."""
        if self._sock is None:
            return
        self._sock.settimeout(0)  # (a socket with a time-out would wait first)
        while True:
            try:
                chunk = self._sock.recv(_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                raise _Lost("QEMU closed the monitor")
            self._buf += chunk
        while (line := self._line()) is not None:
            msg = self._parse(line)
            if msg is not None:
                self._take(msg)

    # -- events -----------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Take every event received so far (reading what QEMU has sent)."""
        with self._lock:
            if self._lost is None and not self._soon:
                try:
                    self._poll()
                except (_Lost, OSError, ValueError) as err:
                    self._lost = _describe(err)
            out = list(self._events)
            self._events.clear()
            return out

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """Remove and return the first event for which ``match`` is true.

        Waits up to ``timeout`` seconds; returns None on time-out.  Events that do
        not match stay queued.

        :raise QMPError: the connection was lost (no event can come).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for ev in self._events:
                    if match(ev):
                        self._events.remove(ev)
                        return ev
                if self._sock is None or self._lost is not None:
                    raise QMPError(
                        "wait for an event",
                        f"monitor connection failed: {self._lost or 'not connected'}",
                    )
                try:
                    self._take(self._message(deadline))
                except TimeoutError:
                    return None
                except (_Lost, OSError, ValueError) as err:
                    self._lost = _describe(err)


def _command(command: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """A QMP command message without its id (no ``arguments`` when there are none)."""
    sent: dict[str, Any] = {"execute": command}
    if arguments:
        sent["arguments"] = arguments
    return sent


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
