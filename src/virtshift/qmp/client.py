"""A synchronous QMP monitor on top of ``qemu.qmp``'s asyncio client.

``qemu.qmp`` speaks the protocol (greeting, negotiation, ids, events); this
module gives the rest of virtshift a blocking :class:`Monitor` whose
``execute`` returns QEMU's ``return`` value or raises :class:`QMPError`, and
whose events are kept in a queue that callers drain with :meth:`Monitor.events`
or wait on with :meth:`Monitor.wait_event`.

All monitors of a process share one event loop running in a daemon thread
(the pattern of ``qemu.qmp.legacy``, but with the loop kept alive so events are
received while the caller's thread does other work).

What this module does not do: build commands (see :mod:`virtshift.qmp.commands`),
interpret replies into models, or decide what to do on errors.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:  # asyncio (~20 ms) and socket (~4 ms): only QEMU-talking calls need them
    import asyncio
    import concurrent.futures
    import socket

from virtshift.errors import ErrorCode, QMPError, VirtError
from virtshift.logs import DEBUG, get_logger

__all__ = ["Monitor", "Pending", "connect_unix"]

_log = get_logger("virtshift.qmp")
_T = TypeVar("_T")

#: Unix socket paths longer than this do not fit ``sockaddr_un`` (108 bytes).
_SUN_PATH_MAX = 107


class _Loop:
    """The process-wide event loop thread (started on first use)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid: int = 0

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        import asyncio

        with cls._lock:
            # A fork child inherits the object but not the thread: start anew.
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="virtshift-qmp", daemon=True
                )
                thread.start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


def _run(coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
    import asyncio

    return _wait(asyncio.run_coroutine_threadsafe(coro, _Loop.get()), timeout)


def _wait(fut: concurrent.futures.Future[_T], timeout: float | None) -> _T:
    """``fut``'s result; on time-out the coroutine behind it is cancelled."""
    try:
        return fut.result(timeout)
    except TimeoutError:
        fut.cancel()
        raise


async def _disconnect(client: Any, listener: asyncio.Future[None] | None) -> None:
    if listener is not None:
        listener.cancel()
    try:
        await client.disconnect()
    except Exception:  # disconnect of a dead peer
        _log.debug("disconnect failed", exc_info=True)


_CLIENT_CLASS: Any = None


def _new_client(path: str) -> Any:
    """A ``qemu.qmp`` client for the monitor at ``path`` (heavy import, only
    when QEMU is used).

    ``qemu.qmp`` logs every message it sends or receives with its argument
    formatted first: ``str()`` of a message pretty-prints its JSON, however the
    log is set (0.7 ms for a 64-disk ``transaction``, before it is written).
    Here that is done only when the log would show it."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:
        from qemu.qmp import QMPClient

        class _Client(QMPClient):
            def _cb_outbound(self, msg: Any) -> Any:
                if self.logger.isEnabledFor(DEBUG):
                    self.logger.debug("--> %s", str(msg))
                return msg

            def _cb_inbound(self, msg: Any) -> Any:
                if self.logger.isEnabledFor(DEBUG):
                    self.logger.debug("<-- %s", str(msg))
                return msg

        _CLIENT_CLASS = _Client
    return _CLIENT_CLASS(name=os.path.basename(path))


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


def _answer(command: str, sent: dict[str, Any], wait: Callable[[], Any]) -> Any:
    """``wait()``'s reply, or the :class:`QMPError` for how it failed."""
    from qemu.qmp import ExecuteError

    debug = _log.isEnabledFor(DEBUG)
    try:
        reply = wait()
    except ExecuteError as err:
        received = dict(err.received)
        if debug:
            _log.debug("error %s", json.dumps(received))
        raise QMPError(
            command,
            str(err),
            error_class=err.error_class,
            sent=sent,
            received=received,
        ) from err
    except TimeoutError as err:
        raise QMPError(
            command, "no reply from QEMU in time", sent=sent, code=ErrorCode.OPERATION_TIMEOUT
        ) from err
    except Exception as err:
        raise QMPError(command, f"monitor connection failed: {err}", sent=sent) from err
    if debug:
        _log.debug("reply %s", json.dumps(reply))
    return reply


#: Loop turns after a command's task first runs that bring its write to the
#: socket: its first step queues the message, the writer's next step writes it
#: (one more for margin).
_WRITE_TURNS: Final = 3


async def _start(call: Coroutine[Any, Any, Any], out: concurrent.futures.Future[Any]) -> None:
    """Start ``call`` as a task whose outcome goes to ``out``, and return once
    its command is written (see :meth:`Monitor.submit`)."""
    import asyncio

    task = asyncio.ensure_future(call)

    def settle(done: asyncio.Future[Any]) -> None:
        if out.done():  # the caller gave up on it
            return
        if done.cancelled():
            out.cancel()
        elif (err := done.exception()) is not None:
            out.set_exception(err)
        else:
            out.set_result(done.result())

    def cancelled(waited: concurrent.futures.Future[Any]) -> None:
        # the caller gave up waiting (time-out): the command is cancelled, as
        # Monitor.execute's would be
        if waited.cancelled():
            loop.call_soon_threadsafe(task.cancel)

    loop = asyncio.get_running_loop()
    task.add_done_callback(settle)
    out.add_done_callback(cancelled)
    for _ in range(_WRITE_TURNS):
        await asyncio.sleep(0)


class Pending:
    """A command sent by :meth:`Monitor.submit`, whose reply is still to come."""

    def __init__(
        self,
        command: str,
        sent: dict[str, Any],
        fut: concurrent.futures.Future[Any],
        timeout: float,
    ) -> None:
        self._command = command
        self._sent = sent
        self._fut = fut
        self._timeout = timeout

    def done(self) -> bool:
        """True once the reply (or the failure) is in."""
        return self._fut.done()

    def result(self) -> Any:
        """QEMU's ``return`` value.

        :raise QMPError: as :meth:`Monitor.execute`.
        """
        return _answer(self._command, self._sent, lambda: _wait(self._fut, self._timeout))


class Monitor:
    """A connected QMP monitor (blocking API).

    :param path: the monitor's unix socket.
    :param timeout: seconds to wait for connecting and for each command.
    """

    def __init__(self, path: str, *, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._client = _new_client(path)
        self._events: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._listener_task: asyncio.Future[None] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.greeting: dict[str, Any] = {}
        #: a connection started by :meth:`connect_soon`, not yet waited for
        self._connecting: tuple[socket.socket, concurrent.futures.Future[None]] | None = None
        #: the disconnection, once :meth:`close` started it
        self._closing: concurrent.futures.Future[None] | None = None
        #: whether leaving a ``with`` block waits for the disconnection (see
        #: :meth:`close`); an owner that closes it again under its lock may
        #: let it overlap its own last steps
        self.exit_waits = True

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
        if self._connecting is not None and self._finish_connecting():
            return self
        _check_socket(self.path)
        for attempt in range(4):
            try:
                sock = connect_unix(self.path)
            except OSError as err:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"cannot connect to QEMU monitor '{self.path}': {err.strerror}",
                ) from err
            try:
                _run(self._connect(sock), self.timeout)
                return self
            except Exception as err:
                sock.close()
                greeting = "Greeting" in str(err) or "Negotiat" in str(err)
                if not greeting or attempt == 3:
                    raise VirtError(
                        ErrorCode.OPERATION_FAILED,
                        f"QEMU monitor '{self.path}' did not answer: {err}",
                    ) from err
                _log.debug("monitor %s: bad greeting (%s), connecting again", self.path, err)
                self._client = _new_client(self.path)
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def connect_soon(self) -> Monitor:
        """Start connecting and return at once: the greeting and the capability
        negotiation go on in the loop thread while the caller works (under the
        domain lock, as every use of the monitor).  :meth:`connect` (or
        ``with``) waits for it, and reports any failure as it would have;
        :meth:`close` waits for it too."""
        import asyncio

        try:
            _check_socket(self.path)
            sock = connect_unix(self.path)
        except (VirtError, OSError):
            return self  # connect() meets it again and says so
        fut = asyncio.run_coroutine_threadsafe(self._connect(sock), _Loop.get())
        self._connecting = (sock, fut)
        return self

    def _finish_connecting(self) -> bool:
        """Wait for :meth:`connect_soon`'s connection; False if it failed (then
        closed, for :meth:`connect` to try again from the start)."""
        assert self._connecting is not None
        sock, fut = self._connecting
        self._connecting = None
        try:
            _wait(fut, self.timeout)
            return True
        except Exception as err:
            _log.debug("monitor %s: early connection failed (%s)", self.path, err)
            sock.close()
            self._client = _new_client(self.path)
            return False

    def reconnect(self) -> Monitor:
        """Drop the connection (one that failed mid-command) and connect again.

        :raise VirtError: as :meth:`connect`.
        """
        self.close()
        self._closing = None
        self._client = _new_client(self.path)
        with self._cond:
            self._events.clear()
        return self.connect()

    async def _connect(self, sock: socket.socket) -> None:
        import asyncio

        await self._client.connect(sock)
        greeting = self._client.greeting
        if greeting is not None:
            self.greeting = dict(greeting._raw)
        self._listener_task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        from qemu.qmp import EventListener

        listener = EventListener()
        with self._client.listen(listener):
            async for event in listener:
                msg = dict(event)
                if _log.isEnabledFor(DEBUG):
                    _log.debug("event %s", json.dumps(msg))
                with self._cond:
                    self._events.append(msg)
                    self._cond.notify_all()
                for cb in list(self._listeners):
                    try:
                        cb(msg)
                    except Exception:  # a callback must not kill the pump
                        _log.exception("event callback failed")

    def close(self, *, wait: bool = True) -> None:
        """Disconnect (safe to call twice).

        :param wait: return once the socket is closed.  With False, the loop
            thread closes it while the caller goes on (about 1 ms); a later
            ``close()`` waits for it.  The caller must do that before it gives
            up the lock it used the monitor under: QEMU takes the next client
            only once this one is gone, and a process that stops in between
            (SIGSTOP, a debugger) would keep the monitor from the next holder.
        """
        import asyncio

        if self._closing is None:
            if self._connecting is not None:
                self._finish_connecting()
            task = self._listener_task
            self._listener_task = None
            self._closing = asyncio.run_coroutine_threadsafe(
                _disconnect(self._client, task), _Loop.get()
            )
        if wait:
            try:
                self._closing.result(10.0)
            except Exception:  # time-out: logged; QEMU drops a client that is gone
                _log.warning("monitor %s: disconnect did not finish", self.path, exc_info=True)

    @property
    def connected(self) -> bool:
        """True between a successful :meth:`connect` and :meth:`close`."""
        return self._connecting is None and self._listener_task is not None

    def __enter__(self) -> Monitor:
        return self if self.connected else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close(wait=self.exit_waits)

    # -- commands ---------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one command and return its ``return`` value.

        :raise QMPError: QEMU answered with an error (``desc`` and ``class`` kept),
            or the monitor went away.
        """
        sent = self._sent(command, arguments)
        wait = timeout if timeout else self.timeout
        return _answer(command, sent, lambda: _run(self._client.execute(command, arguments), wait))

    def submit(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Pending:
        """Send one command and return at once, once it is written to QEMU; its
        :meth:`Pending.result` is what :meth:`execute` would have returned or raised.

        The caller's thread can then work while QEMU does (formatting what
        the command's success will need written): the command is on the wire
        before this returns, so that work does not delay it.
        """
        import concurrent.futures

        sent = self._sent(command, arguments)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # One trip to the loop thread: it starts the command and comes back
        # only after the command's write ran (so the caller's thread no longer
        # contends with it for the GIL).
        _run(_start(self._client.execute(command, arguments), fut), self.timeout)
        return Pending(command, sent, fut, timeout if timeout else self.timeout)

    @staticmethod
    def _sent(command: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
        sent = {"execute": command, **({"arguments": arguments} if arguments else {})}
        if _log.isEnabledFor(DEBUG):  # the dumps cost ~1 ms at 64 disks
            _log.debug("send %s", json.dumps(sent))
        return sent

    def execute_raw(self, text: str) -> dict[str, Any]:
        """Pass a QMP JSON command through; return the whole reply (pass-through API).

        Errors from QEMU come back inside the reply (``{"error": ...}``), as
        libvirt's ``qemuMonitorCommand`` returns them.
        """
        from qemu.qmp import ExecuteError
        from qemu.qmp.message import Message

        try:
            msg = Message(text.encode())
        except Exception as err:
            raise VirtError(ErrorCode.INVALID_ARG, f"not a QMP JSON object: {text[:80]!r}") from err
        if "execute" not in msg:
            raise VirtError(ErrorCode.INVALID_ARG, "QMP command must have an 'execute' member")
        msg_dict = dict(msg)
        msg_dict.pop("id", None)
        try:
            ret = _run(self._client.execute_msg(Message(msg_dict)), self.timeout)
        except ExecuteError as err:
            reply = dict(err.received)
            reply.pop("id", None)
            return reply
        except Exception as err:
            raise QMPError(str(msg_dict["execute"]), f"monitor connection failed: {err}") from err
        return {"return": ret}

    # -- events -----------------------------------------------------------

    def add_listener(self, cb: Callable[[dict[str, Any]], None]) -> None:
        """Call ``cb(event)`` from the loop thread for every event received."""
        self._listeners.append(cb)

    def events(self) -> list[dict[str, Any]]:
        """Take every queued event."""
        with self._cond:
            out = list(self._events)
            self._events.clear()
            return out

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any] | None:
        """Remove and return the first queued event for which ``match`` is true.

        Waits up to ``timeout`` seconds; returns None on time-out.  Events that do
        not match stay queued.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._events:
                    if match(ev):
                        self._events.remove(ev)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
