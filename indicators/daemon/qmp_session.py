"""One QMP client connection, as served by :class:`~indicators.daemon.qmp_server.QmpServer`.

A :class:`QmpSession` owns a connected unix socket and three tasks: a reader
(``recvmsg`` on the raw socket, because asyncio streams drop the SCM_RIGHTS
fds that ``getfd`` needs), a replier that hands replies to the writer in
request order, and a writer that drains a per-client output queue.  Command
handlers get the session of their caller and use it to send that client
events, claim the fds it passed (:meth:`QmpSession.take_fd`) or close it.

The session asks its host (:class:`QmpHost`, which the server implements)
for the command table, the limits and the greeting; it never imports the
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, Field

from .qmp_wire import (
    COMMAND_NOT_FOUND,
    FramingError,
    JsonFramer,
    QmpArgs,
    QmpCommandError,
    Request,
    encode,
    error_reply,
    event_message,
    parse_request,
    result_value,
    return_reply,
    timestamp,
    validate_arguments,
)

__all__ = ["CapabilitiesArgs", "Handler", "PeerCredentials", "QmpCommand", "QmpHost", "QmpSession"]

logger = logging.getLogger(__name__)

_RECV_SIZE = 65536
_MAX_FDS_PER_RECV = 8
_MAX_UNCLAIMED_FDS = 16  # fds passed but not yet claimed by getfd
_BATCH_BYTES = 256 * 1024  # output coalesced into one send
_DENY_LINGER = 1.0  # seconds to deliver the refusal to a peer that is not allowed

#: ``async def handler(args, session) -> JSON-able``; ``args`` is the validated model or None.
Handler = Callable[[Any, "QmpSession"], Awaitable[object]]


class PeerCredentials(NamedTuple):
    """The peer process as the kernel saw it at connect time (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCredentials:
        """Read the credentials of the process connected to ``sock``."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class QmpCommand:
    """A registered command: its handler, argument model and return description."""

    name: str
    handler: Handler
    args_model: type[BaseModel] | None
    returns: str


class QmpSession:
    """One client connection: negotiation state, peer credentials and passed fds.

    Handlers receive the session of the client that called them; they may
    send it events, claim its fds and close it.
    """

    def __init__(self, server: QmpHost, sock: socket.socket, number: int) -> None:
        #: Connection number, unique within the server.
        self.number = number
        #: Who connected, from ``SO_PEERCRED``.
        self.credentials = PeerCredentials.of(sock)
        #: Capabilities the client enabled with ``qmp_capabilities``.
        self.capabilities: frozenset[str] = frozenset()
        self.server = server
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._negotiated = False
        # Events start only after the qmp_capabilities reply is queued: a client
        # (qemu.qmp included) expects that reply as the first message after the greeting.
        self._capabilities_reply: asyncio.Future[bytes] | None = None
        self._events_on = False
        self._fds: dict[str, int] = {}
        self._unclaimed: deque[int] = deque()
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._out_bytes = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._replies: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()
        self._slots = asyncio.Semaphore(server.max_pending)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._grace: float | None = None

    def __repr__(self) -> str:
        pid, uid, _ = self.credentials
        return f"<QmpSession #{self.number} pid={pid} uid={uid}>"

    @property
    def negotiated(self) -> bool:
        """Whether the client has completed ``qmp_capabilities``."""
        return self._negotiated

    @property
    def fd_names(self) -> frozenset[str]:
        """Names of the fds stored by ``getfd`` and not yet taken or closed."""
        return frozenset(self._fds)

    def send_event(self, name: str, data: Mapping[str, object] | None = None) -> bool:
        """Queue an event for this client; False if it is not negotiated or is closing."""
        return self.send_encoded_event(encode(event_message(name, data, timestamp())))

    def take_fd(self, name: str) -> int:
        """Remove the fd stored under ``name``; the caller owns (and must close) it."""
        try:
            return self._fds.pop(name)
        except KeyError:
            raise QmpCommandError(f"File descriptor named '{name}' not found") from None

    def close(self, grace: float = 1.0) -> None:
        """Stop reading; deliver in-flight replies for up to ``grace`` seconds, then hang up."""
        self._grace = grace
        self._closing.set()
        if self._reader is not None:
            self._reader.cancel()

    def store_received_fd(self, name: str) -> None:
        """``getfd``: store the oldest fd the client passed and no command claimed yet."""
        if not self._unclaimed:
            raise QmpCommandError("No file descriptor supplied via SCM_RIGHTS")
        fd = self._unclaimed.popleft()
        if name[:1].isdigit():  # QEMU consumes the fd in this case too
            os.close(fd)
            raise QmpCommandError("Parameter 'fdname' expects a name not starting with a digit")
        old = self._fds.pop(name, None)
        if old is not None:
            os.close(old)
        self._fds[name] = fd

    # -- lifetime ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until EOF, a fatal error or :meth:`close`; always cleans up."""
        writer = self._spawn(self._write_loop(), "writer")
        try:
            if self._admitted():
                await self._serve(writer)
            else:
                self._out.put_nowait(None)
                await asyncio.wait({writer}, timeout=_DENY_LINGER)
        finally:
            await self._teardown()

    def _admitted(self) -> bool:
        if self.server.admits(self.credentials):
            self._enqueue(self.server.greeting)
            return True
        logger.warning("QMP peer %s refused", self.credentials)
        denied = QmpCommandError(f"Permission denied for uid {self.credentials.uid}")
        self._enqueue(encode(error_reply(denied, {})))
        return False

    async def _serve(self, writer: asyncio.Task[None]) -> None:
        if self._closing.is_set():
            return
        self._spawn(self._reply_loop(), "replier")
        self._reader = self._spawn(self._read_loop(), "reader")
        await asyncio.wait({self._reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer.done():  # the peer is gone
            return
        self._replies.put_nowait(None)  # the replier finishes in-flight replies, then the writer
        closing = self._spawn(self._closing.wait(), "closing")
        await asyncio.wait({writer, closing}, return_when=asyncio.FIRST_COMPLETED)
        if not writer.done():
            await asyncio.wait({writer}, timeout=self._grace)

    async def _teardown(self) -> None:
        self._closing.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for fd in [*self._fds.values(), *self._unclaimed]:
                _close_quietly(fd)
            self._fds.clear()
            self._unclaimed.clear()
            self._sock.close()
            logger.debug("QMP %r disconnected", self)

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"qmp-{self.number}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.debug("QMP %r: %s ended: %r", self, task, exc)

    # -- input ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        framer = JsonFramer(self.server.max_message)
        rate = self.server.max_rate
        tokens, last = rate or 0.0, self._loop.time()
        while data := await self._recv():
            for frame in framer.feed(data):
                if rate:  # token bucket: a client over its rate is read more slowly
                    now = self._loop.time()
                    tokens = min(rate, tokens + (now - last) * rate)
                    last = now
                    if tokens < 1.0:
                        await asyncio.sleep((1.0 - tokens) / rate)
                        tokens, last = 1.0, self._loop.time()
                    tokens -= 1.0
                await self._dispatch(frame)
                if isinstance(frame, FramingError):
                    return

    async def _recv(self) -> bytes:
        """Read the next chunk, keeping any fds that came with it (streams drop them)."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self._sock, _RECV_SIZE, _MAX_FDS_PER_RECV, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._readable()
                continue
            if flags & socket.MSG_CTRUNC:  # the kernel closed the fds that did not fit
                logger.warning("QMP %r passed more than %d fds at once", self, _MAX_FDS_PER_RECV)
            self._keep_fds(fds)
            return data

    async def _readable(self) -> None:
        ready = self._loop.create_future()
        fd = self._sock.fileno()
        self._loop.add_reader(fd, _resolve, ready)
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)

    def _keep_fds(self, fds: list[int]) -> None:
        self._unclaimed.extend(fds)
        while len(self._unclaimed) > _MAX_UNCLAIMED_FDS:
            logger.warning("QMP %r passed too many fds without getfd; closing one", self)
            os.close(self._unclaimed.popleft())

    async def _dispatch(self, frame: object) -> None:
        """Start one request once this client has room for another reply."""
        await self._writable.wait()
        await self._slots.acquire()
        self._replies.put_nowait(self._start(frame))

    def _start(self, frame: object) -> asyncio.Future[bytes]:
        if isinstance(frame, QmpCommandError):
            return self._answered(error_reply(frame, {}))
        echo, request = parse_request(frame)
        if isinstance(request, QmpCommandError):
            return self._answered(error_reply(request, echo))
        if not self._negotiated:
            reply = self._answered(self._negotiate(request, echo))
            if self._negotiated:
                self._capabilities_reply = reply
            return reply
        command = self.server.commands.get(request.command)
        if command is None:
            missing = QmpCommandError(
                f"The command {request.command} has not been found", COMMAND_NOT_FOUND
            )
            return self._answered(error_reply(missing, echo))
        return self._spawn(self._execute(command, request.arguments, echo), command.name)

    def _answered(self, reply: Mapping[str, object]) -> asyncio.Future[bytes]:
        done: asyncio.Future[bytes] = self._loop.create_future()
        done.set_result(encode(reply))
        return done

    def _negotiate(self, request: Request, echo: dict[str, object]) -> dict[str, object]:
        """Capabilities mode: only ``qmp_capabilities`` is accepted (synchronously, in order)."""
        if request.command != "qmp_capabilities":
            expecting = QmpCommandError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", COMMAND_NOT_FOUND
            )
            return error_reply(expecting, echo)
        try:
            args = validate_arguments(CapabilitiesArgs, request.arguments)
            assert isinstance(args, CapabilitiesArgs)
            for name in args.enable:
                if name not in self.server.capabilities:
                    raise QmpCommandError(f"Capability '{name}' not available")
        except QmpCommandError as exc:
            return error_reply(exc, echo)
        self._negotiated = True
        self.capabilities = frozenset(args.enable)
        return return_reply({}, echo)

    async def _execute(
        self, command: QmpCommand, arguments: dict[str, object], echo: dict[str, object]
    ) -> bytes:
        try:
            args = validate_arguments(command.args_model, arguments)
            result = await command.handler(args, self)
            return encode(return_reply(result_value(result), echo))
        except QmpCommandError as exc:
            return encode(error_reply(exc, echo))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the session is tearing down
                raise
            # Something the handler awaited was cancelled, not the handler itself.
            failed = QmpCommandError(f"Command '{command.name}' was cancelled")
            return encode(error_reply(failed, echo))
        except Exception:
            logger.exception("QMP command %s from %r failed", command.name, self)
            failed = QmpCommandError(f"Internal error in command '{command.name}'")
            return encode(error_reply(failed, echo))

    # -- output -----------------------------------------------------------------

    async def _reply_loop(self) -> None:
        """Send replies in request order as their handlers finish."""
        while (pending := await self._replies.get()) is not None:
            await asyncio.wait({pending})
            self._slots.release()
            if pending.cancelled():
                self._enqueue(encode(error_reply(QmpCommandError("Command cancelled"), {})))
            else:
                self._enqueue(pending.result())
                if pending is self._capabilities_reply:
                    self._events_on = True
        self._out.put_nowait(None)

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._out.get()]
            size = len(batch[0] or b"")
            while batch[-1] is not None and size < _BATCH_BYTES and not self._out.empty():
                batch.append(self._out.get_nowait())
                size += len(batch[-1] or b"")
            if size:
                await self._loop.sock_sendall(self._sock, b"".join(b for b in batch if b))
                self._out_bytes -= size
                if self._out_bytes <= self.server.max_queued // 2:
                    self._writable.set()
            if batch[-1] is None:
                return

    def _enqueue(self, data: bytes) -> None:
        self._out_bytes += len(data)
        self._out.put_nowait(data)
        if self._out_bytes > self.server.max_queued // 2:
            self._writable.clear()  # stop reading requests until the client reads replies

    def send_encoded_event(self, data: bytes) -> bool:
        """:meth:`send_event` for an event already encoded (a broadcast encodes once)."""
        reading = self._reader is not None and not self._reader.done()
        if not (self._events_on and reading) or self._closing.is_set():
            return False
        if self._out_bytes + len(data) > self.server.max_queued:
            logger.warning("QMP %r does not read its events; disconnecting it", self)
            self.close(grace=0.0)
            return False
        self._enqueue(data)
        return True


class CapabilitiesArgs(QmpArgs):
    """``qmp_capabilities`` arguments: the capabilities to enable."""

    enable: list[str] = Field(default_factory=list)


class QmpHost(Protocol):
    """What a session needs from its server."""

    @property
    def commands(self) -> Mapping[str, QmpCommand]:
        """The command table."""

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities a client may enable."""

    @property
    def greeting(self) -> bytes:
        """The encoded greeting."""

    @property
    def max_message(self) -> int:
        """Largest request in bytes."""

    @property
    def max_pending(self) -> int:
        """Requests of one client in flight at once."""

    @property
    def max_queued(self) -> int:
        """Unsent output of one client, in bytes, before events disconnect it."""

    @property
    def max_rate(self) -> float | None:
        """Requests per second one client may send (a burst of one second's worth)."""

    def admits(self, credentials: PeerCredentials) -> bool:
        """Whether a peer with these credentials may use the server."""
        ...


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
