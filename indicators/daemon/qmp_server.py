"""A generic asyncio QMP server on a unix socket.

QEMU's monitor protocol, served by this process instead of by QEMU, so that
any QMP client (``qemu.qmp.QMPClient``, ``socat``, libvirt) can drive it.  The
server knows no commands of its own beyond QMP's housekeeping; an application
registers its commands, each with an optional pydantic argument model:

    from indicators.daemon.qmp_server import QmpArgs, QmpServer, QmpSession

    class EchoArgs(QmpArgs):
        text: str

    async def echo(args: EchoArgs, session: QmpSession) -> dict[str, str]:
        return {"text": args.text}

    server = QmpServer("/run/indicators.qmp", version=(0, 1, 0), package="indicators")
    server.register("echo", echo, EchoArgs, returns="{'text': str}")
    async with server:
        server.broadcast_event("READY", {"adapters": 2})
        ...

Built in: ``qmp_capabilities`` (must come first, once), ``query-commands``,
``query-version``, ``getfd {fdname}`` (stores the fd the client passed with
SCM_RIGHTS; a handler later claims it with :meth:`QmpSession.take_fd`) and
``closefd {fdname}``.  The wire format is QEMU's (see
:mod:`indicators.daemon.qmp_wire`); one connection is a
:class:`~indicators.daemon.qmp_session.QmpSession`.  Handlers raise
:class:`QmpCommandError` to answer with an error of their choice.

Behaviour a client can rely on:

- Replies come back in request order (as QEMU's do) and echo the request's
  ``id``.  Up to ``max_pending`` handlers of one client run concurrently
  (each as its own task, started in request order); the ordering costs only
  head-of-line waiting for the *reply* of a slow command, never its work.
- Events go out as they happen, between replies; only negotiated clients
  get them.
- Flow control is per client: a client that does not read its replies stops
  being read (its socket fills, it blocks), and a client whose unsent output
  would exceed ``max_queued`` because of events is disconnected.  Neither
  ever delays another client.
- A message over ``max_message`` bytes (or nested deeper than QEMU allows)
  is answered with a ``GenericError`` and the connection is closed, as the
  stream can no longer be resynchronised; invalid JSON is answered and the
  stream resynchronises after it.
- When a client hangs up, its in-flight handlers still run to completion (a
  half-closed client still gets the replies); their fds are closed.
- Bounded: at most ``max_sessions`` clients at once and
  ``max_sessions_per_uid`` of one uid (a client over either gets one
  ``GenericError`` and is hung up on); ``getfd`` stores at most ``max_fds``
  fds per client; a client that has not negotiated within
  ``negotiation_timeout`` seconds, or sent nothing for ``idle_timeout``
  seconds (when set), is disconnected.  An fd belongs to the message it came
  with; a command that does not store it (``getfd``) closes it.
- The socket file is created with its final mode (never chmod-ed by path),
  in a directory no other user can write (else :class:`SocketDirError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import TypeVar, overload

from pydantic import BaseModel

from .loglimit import LogLimiter
from .qmp_session import CapabilitiesArgs, Handler, PeerCredentials, QmpCommand, QmpSession
from .qmp_wire import (
    COMMAND_NOT_FOUND,
    QmpArgs,
    QmpCommandError,
    encode,
    error_reply,
    event_message,
    greeting_message,
    timestamp,
    version_info,
)
from .socketfile import SocketDirError, check_socket_dir, listen_unix

# The server with everything an application needs to register commands on it.
__all__ = [
    "PeerCredentials",
    "QmpArgs",
    "QmpCommand",
    "QmpCommandError",
    "QmpServer",
    "QmpSession",
    "SocketDirError",
]

logger = logging.getLogger(__name__)


ArgsT = TypeVar("ArgsT", bound=BaseModel)

# Lines a local peer can provoke at will (refusals) are rate-limited.
_LIMITER = LogLimiter(burst=5, period=60.0)


class QmpServer:
    """Listens on a unix socket and serves QMP to every client that connects.

    ``allowed`` decides from a peer's credentials whether it may talk at all;
    a refused peer gets one ``GenericError`` instead of the greeting.
    """

    def __init__(
        self,
        path: str,
        *,
        mode: int = 0o600,
        version: tuple[int, int, int],
        package: str = "",
        capabilities: Sequence[str] = (),
        max_message: int = 64 * 1024,
        max_pending: int = 8,
        max_queued: int = 1024 * 1024,
        max_rate: float | None = None,
        allowed: Callable[[PeerCredentials], bool] | None = None,
        max_sessions: int = 128,
        max_sessions_per_uid: int = 64,
        max_fds: int = 16,
        negotiation_timeout: float | None = 30.0,
        idle_timeout: float | None = None,
    ) -> None:
        if min(max_message, max_pending, max_queued, max_sessions, max_sessions_per_uid) < 1:
            raise ValueError("QMP server limits must be positive")
        self.path = path
        self.mode = mode
        self.version = version
        self.package = package
        self.capabilities = tuple(capabilities)
        self.max_message = max_message
        self.max_pending = max_pending
        self.max_queued = max_queued
        #: Requests per second per client (None: unlimited); excess is read later.
        self.max_rate = max_rate
        #: Clients served at once, in all and per uid.
        self.max_sessions = max_sessions
        self.max_sessions_per_uid = max_sessions_per_uid
        #: fds one client may keep stored with ``getfd``.
        self.max_fds = max_fds
        #: Seconds a client has for ``qmp_capabilities``; None: forever.
        self.negotiation_timeout = negotiation_timeout
        #: Seconds without input after which a client is hung up on; None: never.
        self.idle_timeout = idle_timeout
        #: Clients turned away because a cap was reached.
        self.refused_over_cap = 0
        #: The greeting every admitted client gets first.
        self.greeting = encode(greeting_message(version, package, self.capabilities))
        self._allowed = allowed
        self._commands: dict[str, QmpCommand] = {}
        self._sessions: dict[QmpSession, asyncio.Task[None]] = {}
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._inode: tuple[int, int] | None = None
        self._count = 0
        self._register_builtins()

    @property
    def commands(self) -> Mapping[str, QmpCommand]:
        """Every command clients can execute, built-ins included."""
        return MappingProxyType(self._commands)

    @property
    def sessions(self) -> tuple[QmpSession, ...]:
        """The connected clients."""
        return tuple(self._sessions)

    @overload
    def register(
        self,
        name: str,
        handler: Callable[[None, QmpSession], Awaitable[object]],
        args_model: None = None,
        *,
        returns: str = "",
    ) -> None: ...

    @overload
    def register(
        self,
        name: str,
        handler: Callable[[ArgsT, QmpSession], Awaitable[object]],
        args_model: type[ArgsT],
        *,
        returns: str = "",
    ) -> None: ...

    def register(
        self,
        name: str,
        handler: Handler,
        args_model: type[BaseModel] | None = None,
        *,
        returns: str = "",
    ) -> None:
        """Add command ``name``; ``handler(args, session)`` returns the JSON-able result.

        ``args`` is an instance of ``args_model`` (None when it is None: the
        command then takes no arguments).  A returned pydantic model is dumped
        in JSON mode and None becomes ``{}``.  ``returns`` documents the result.
        """
        if not name or name in self._commands:
            raise ValueError(f"QMP command name {name!r} is empty or already registered")
        self._commands[name] = QmpCommand(name, handler, args_model, returns)

    def admits(self, credentials: PeerCredentials) -> bool:
        """Whether a peer with these credentials may use the server (a refusal is logged,
        rate-limited, once)."""
        if self._allowed is None:
            return True
        try:
            allowed = bool(self._allowed(credentials))
        except Exception:
            logger.exception("QMP peer check failed for %s", credentials)
            allowed = False
        if not allowed:
            _LIMITER.warning(
                logger,
                "refused-peer",
                "refused control client pid %d uid %d gid %d on %s",
                *credentials,
                self.path,
            )
        return allowed

    async def start(self) -> None:
        """Bind the socket (mode ``mode``, set before anyone can connect) and accept clients."""
        if self._listener is not None:
            raise RuntimeError(f"QMP server on {self.path} is already started")
        check_socket_dir(os.path.dirname(os.path.abspath(self.path)))
        self._listener = listen_unix(self.path, self.mode)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"qmp-accept {self.path}")

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting, give clients ``grace`` seconds for in-flight replies, then disconnect."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink_socket()
        tasks = list(self._sessions.values())
        for session in list(self._sessions):
            session.close(grace)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace + 1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def broadcast_event(self, name: str, data: Mapping[str, object] | None = None) -> int:
        """Send an event to every negotiated client; return how many it was queued for.

        Call it from the event loop's thread (``loop.call_soon_threadsafe`` otherwise).
        """
        message = encode(event_message(name, data, timestamp()))
        return sum(session.send_encoded_event(message) for session in list(self._sessions))

    async def __aenter__(self) -> QmpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    #: The commands every server has (QMP's negotiation, introspection and fd passing).
    BUILTINS = ("qmp_capabilities", "query-commands", "query-version", "getfd", "closefd")

    def _register_builtins(self) -> None:
        async def query_commands(args: None, session: QmpSession) -> object:
            return [{"name": name} for name in self._commands]

        async def query_version(args: None, session: QmpSession) -> object:
            return version_info(self.version, self.package)

        self.register("qmp_capabilities", _capabilities_again, CapabilitiesArgs)
        self.register("query-commands", query_commands, returns="[{'name': str}]")
        self.register("query-version", query_version, returns="{'qemu': {...}, 'package': str}")
        self.register("getfd", _getfd, _FdnameArgs)
        self.register("closefd", _closefd, _FdnameArgs)

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving the others
                logger.warning("QMP accept on %s failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            self._open_session(conn)

    def _open_session(self, conn: socket.socket) -> None:
        try:
            session = QmpSession(self, conn, self._count)
        except OSError as exc:
            logger.debug("QMP peer on %s vanished before it was served: %s", self.path, exc)
            conn.close()
            return
        # Refusals are answered at once and never counted: a refused peer that
        # lingered would hold an fd and a place under the caps it is kept from.
        if not self.admits(session.credentials):
            self._turn_away(conn, f"Permission denied for uid {session.credentials.uid}")
            return
        over = self._over_cap(session.credentials.uid)
        if over is not None:
            self.refused_over_cap += 1
            _LIMITER.warning(logger, "over-cap", "QMP %r refused: %s", session, over)
            self._turn_away(conn, over)
            return
        self._count += 1
        task = asyncio.create_task(session.run(), name=f"qmp-session-{session.number}")
        self._sessions[session] = task
        task.add_done_callback(functools.partial(self._session_done, session))

    @staticmethod
    def _turn_away(conn: socket.socket, why: str) -> None:
        """One GenericError instead of the greeting, then hang up."""
        with contextlib.suppress(OSError):  # a fresh socket's buffer takes one short line
            conn.send(encode(error_reply(QmpCommandError(why), {})))
        conn.close()

    def _over_cap(self, uid: int) -> str | None:
        """Why a new client of ``uid`` may not be served now (None: it may)."""
        if len(self._sessions) >= self.max_sessions:
            return f"too many clients: at most {self.max_sessions} at once"
        mine = sum(1 for s in self._sessions if s.credentials.uid == uid)
        if mine >= self.max_sessions_per_uid:
            return f"too many clients of uid {uid}: at most {self.max_sessions_per_uid} at once"
        return None

    def _session_done(self, session: QmpSession, task: asyncio.Task[None]) -> None:
        self._sessions.pop(session, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("QMP %r failed", session, exc_info=exc)

    def _unlink_socket(self) -> None:
        """Remove the socket file unless someone else has replaced it since."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class _FdnameArgs(QmpArgs):
    fdname: str


async def _capabilities_again(args: CapabilitiesArgs, session: QmpSession) -> object:
    raise QmpCommandError(
        "Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND
    )


async def _getfd(args: _FdnameArgs, session: QmpSession) -> object:
    session.store_received_fd(args.fdname)
    return {}


async def _closefd(args: _FdnameArgs, session: QmpSession) -> object:
    os.close(session.take_fd(args.fdname))
    return {}
