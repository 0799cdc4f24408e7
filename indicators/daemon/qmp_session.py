"""One QMP client connection, as served by :class:`~indicators.daemon.qmp_server.QmpServer`.

A :class:`QmpSession` owns a connected unix socket and runs on event-loop
callbacks, not tasks, so that a request costs as few loop iterations and
system calls as possible:

- the socket stays registered for reading while the client may send; each
  readable callback does one ``recvmsg`` on the raw socket (asyncio streams
  drop the SCM_RIGHTS fds that ``getfd`` needs) and starts the requests it
  completes, in order;
- each command handler runs as its own task, which hands its reply over the
  moment it returns; replies leave in request order (a finished reply waits
  only for the earlier ones);
- output is written at once with a non-blocking ``send``; only what the
  kernel does not take waits, sent when the socket is writable
  (:class:`~indicators.daemon.outbox.Outbox`).

fds passed with SCM_RIGHTS belong to the message they came with, and
whatever that message's command did not store is closed when it is answered
(:mod:`indicators.daemon.passedfds`).

Input stops being read while the client has ``max_pending`` requests in
flight, while more than half of ``max_queued`` of its output is unsent, and
while it is over its rate.  Command handlers get the session of their caller
and use it to send that client events, claim the fds it passed
(:meth:`QmpSession.take_fd`) or close it.

The session asks its host (:class:`QmpHost`, which the server implements)
for the command table, the limits and the greeting; it never imports the
server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, Field

from .outbox import Outbox
from .passedfds import ANCILLARY_SIZE, PassedFds, close_all, fds_of, message_fds
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


class _Reply:
    """A reply slot in request order: None until its handler has answered."""

    __slots__ = ("data", "events", "fds", "task")

    def __init__(self, data: bytes | None = None, events: bool = False) -> None:
        self.data = data
        self.events = events  # the qmp_capabilities reply: events may follow it
        self.task: asyncio.Task[None] | None = None
        self.fds: list[int] = []  # its message's fds not (yet) claimed by the handler


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
        self._commands = server.commands  # a live view: later registrations show
        self._sock = sock
        self._fileno = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._negotiated = False
        # Events start only after the qmp_capabilities reply is queued: a client
        # (qemu.qmp included) expects that reply as the first message after the greeting.
        self._events_on = False
        self._passed = PassedFds(server.max_fds)
        # Input: frames read but not started wait in _frames; the socket is read
        # (the reader stays registered) only while none wait.
        self._framer = JsonFramer(server.max_message)
        self._frames: deque[tuple[object, list[int]]] = deque()  # (frame, its fds)
        self._input_open = True  # False after EOF, a read error, a framing error, close()
        self._reading = False
        self._rate = server.max_rate
        self._tokens = self._rate or 0.0
        self._last = self._loop.time()
        self._throttle: asyncio.TimerHandle | None = None
        self._token_due = False  # the throttle timer paid for the next frame
        self._pumping = False
        # Replies in request order; at most max_pending at once.
        self._replies: deque[_Reply] = deque()
        self._max_pending = server.max_pending
        # Output not yet taken by the kernel; requests are not started while
        # more than half of max_queued waits (the client does not read).
        self._outbox = Outbox(sock, self._output_progress, self._output_failed)
        self._resume_below = server.max_queued // 2
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: asyncio.Future[None] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._closing = False
        self._ended = False  # torn down: nothing is read, started or sent any more
        self._deadline: asyncio.TimerHandle | None = None  # negotiation, then idle
        self._last_input = self._loop.time()

    def __repr__(self) -> str:
        pid, uid, _ = self.credentials
        return f"<QmpSession #{self.number} pid={pid} uid={uid}>"

    @property
    def negotiated(self) -> bool:
        """Whether the client has completed ``qmp_capabilities``."""
        return self._negotiated

    def send_event(self, name: str, data: Mapping[str, object] | None = None) -> bool:
        """Queue an event for this client; False if it is not negotiated or is closing."""
        return self.send_encoded_event(encode(event_message(name, data, timestamp())))

    def take_fd(self, name: str) -> int:
        """Remove the fd stored under ``name``; the caller owns (and must close) it."""
        return self._passed.take(name)

    def close(self, grace: float = 1.0) -> None:
        """Stop reading; deliver in-flight replies for up to ``grace`` seconds, then hang up."""
        self._closing = True
        self._input_open = False
        self._drop_frames()
        if self._finished is None or self._ended:  # not serving yet: run() returns at once
            return
        self._want_input()
        deadline = self._loop.time() + grace
        if self._grace is None or deadline < self._grace.when():
            if self._grace is not None:
                self._grace.cancel()
            self._grace = self._loop.call_at(deadline, self._finish)
        self._check_done()

    def store_received_fd(self, name: str) -> None:
        """``getfd``: store the fd that came with this command's message.

        Call it from a command handler.  Without an fd, or over the
        per-client cap, a :class:`QmpCommandError` says so (the fd is closed
        with the message's other unclaimed fds).
        """
        self._passed.store(name)

    # -- lifetime ---------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until EOF, a fatal error or :meth:`close`; always cleans up."""
        self._finished = self._loop.create_future()
        try:
            if self._closing:
                return
            if self._admitted():
                self._want_input()
                timeout = self.server.negotiation_timeout
                if timeout is not None:
                    self._deadline = self._loop.call_later(timeout, self._negotiation_expired)
            else:
                self.close(_DENY_LINGER)
            await self._finished
        finally:
            await self._teardown()

    def _admitted(self) -> bool:
        if self.server.admits(self.credentials):
            self._outbox.send(self.server.greeting)
            return True
        denied = QmpCommandError(f"Permission denied for uid {self.credentials.uid}")
        self._outbox.send(encode(error_reply(denied, {})))
        return False

    def _check_done(self) -> None:
        """End the session once input is over and every reply has been sent."""
        if not (self._input_open or self._replies or self._outbox.waiting):
            self._finish()

    def _finish(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def _teardown(self) -> None:
        self._ended = self._closing = True
        self._input_open = False
        self._want_input()
        self._outbox.close()
        for timer in (self._throttle, self._grace, self._deadline):
            if timer is not None:
                timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for reply in self._replies:  # handlers cancelled before they ever ran
                close_all(reply.fds)
            self._passed.close()
            self._drop_frames()
            self._sock.close()
            logger.debug("QMP %r disconnected", self)

    # -- deadlines --------------------------------------------------------------

    def _negotiation_expired(self) -> None:
        self._deadline = None
        if self._negotiated or self._closing:
            return
        logger.debug("QMP %r did not negotiate in time; disconnecting it", self)
        late = QmpCommandError("Capabilities negotiation timed out; disconnecting")
        self._outbox.send(encode(error_reply(late, {})))
        self.close(grace=0.0)

    def _arm_idle(self) -> None:
        idle = self.server.idle_timeout
        if idle is not None and not self._closing:
            self._deadline = self._loop.call_at(self._last_input + idle, self._idle_check)

    def _idle_check(self) -> None:
        """Hang up on a client that sent nothing for ``idle_timeout`` and awaits nothing."""
        self._deadline = None
        idle = self.server.idle_timeout
        if idle is None or self._closing:
            return
        now = self._loop.time()
        if self._replies or now - self._last_input < idle:  # busy, or input came since
            when = max(self._last_input + idle, now + min(idle, 1.0))
            self._deadline = self._loop.call_at(when, self._idle_check)
            return
        logger.debug("QMP %r idle for %g s; disconnecting it", self, idle)
        self.close(grace=0.0)

    # -- input ------------------------------------------------------------------

    def _want_input(self) -> None:
        """Keep the socket registered for reading exactly while frames are wanted."""
        if self._input_open and not self._frames and not self._ended:
            if not self._reading:
                self._loop.add_reader(self._fileno, self._on_readable)
                self._reading = True
        elif self._reading:
            self._loop.remove_reader(self._fileno)
            self._reading = False

    def _on_readable(self) -> None:
        """Read one chunk, keeping any fds that came with it (streams drop them)."""
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(
                _RECV_SIZE, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.debug("QMP %r: read failed: %r", self, exc)
            self._end_input()
            return
        carried = fds_of(ancdata) if ancdata else []
        if flags & socket.MSG_CTRUNC:  # the kernel closed the fds that did not fit
            logger.debug("QMP %r passed more fds at once than one read takes", self)
        if not data:
            close_all(carried)
            self._end_input()
            return
        self._last_input = self._loop.time()
        framer = self._framer
        frames = framer.feed(data)
        owned = self._passed.assign(len(frames), carried, framer.partial)
        if not frames:
            return
        self._frames.extend(zip(frames, owned, strict=True))
        self._outbox.cork()
        try:
            self._pump()
        except Exception:  # a bug: stop reading this client rather than spin
            logger.exception("QMP %r: reading failed", self)
            self._drop_frames()
            self._end_input()
        finally:
            self._outbox.uncork()

    def _end_input(self) -> None:
        self._input_open = False
        self._want_input()
        self._check_done()

    def _pump(self) -> None:
        """Start waiting requests in order while this client has room for their replies."""
        if self._pumping:  # called back from a request being started: the loop below goes on
            return
        self._pumping = True
        try:
            frames = self._frames
            while frames:
                if (
                    len(self._outbox.waiting) > self._resume_below  # it does not read: read no more
                    or len(self._replies) >= self._max_pending
                    or self._throttle is not None
                    or (self._rate and not self._take_token())
                ):
                    break
                frame, fds = frames.popleft()
                self._start(frame, fds)
                if isinstance(frame, FramingError):  # the stream cannot be trusted any more
                    self._drop_frames()
                    self._end_input()
                    return
        finally:
            self._pumping = False
        self._want_input()

    def _take_token(self) -> bool:
        """Token bucket: a client over its rate is read more slowly."""
        rate = self._rate
        assert rate
        now = self._loop.time()
        if self._token_due:
            self._token_due = False
            self._tokens, self._last = 0.0, now
            return True
        tokens = min(rate, self._tokens + (now - self._last) * rate)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            self._throttle = self._loop.call_later((1.0 - tokens) / rate, self._unthrottle)
            return False
        self._tokens = tokens - 1.0
        return True

    def _unthrottle(self) -> None:
        self._throttle = None
        self._token_due = True
        self._pump()

    def _drop_frames(self) -> None:
        """Forget the frames not started, closing the fds that came with them."""
        for _, fds in self._frames:
            close_all(fds)
        self._frames.clear()

    def _start(self, frame: object, fds: list[int]) -> None:
        if not self._start_frame(frame, fds):
            close_all(fds)  # answered at once: no handler could claim them

    def _start_frame(self, frame: object, fds: list[int]) -> bool:
        """Answer ``frame`` or start its handler; True if the handler took ``fds``."""
        if isinstance(frame, QmpCommandError):
            self._answer(error_reply(frame, {}))
            return False
        echo, request = parse_request(frame)
        if isinstance(request, QmpCommandError):
            self._answer(error_reply(request, echo))
            return False
        if not self._negotiated:
            self._answer(self._negotiate(request, echo), events=self._negotiated)
            if self._negotiated and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
                self._arm_idle()
            return False
        command = self._commands.get(request.command)
        if command is None:
            missing = QmpCommandError(
                f"The command {request.command} has not been found", COMMAND_NOT_FOUND
            )
            self._answer(error_reply(missing, echo))
            return False
        reply = _Reply()
        reply.fds = fds
        self._replies.append(reply)
        task = self._loop.create_task(
            self._execute(command, request.arguments, echo, reply, fds),
            name=f"qmp-{self.number}-{command.name}",
        )
        if not task.done():  # an eager task factory may have run it to completion
            reply.task = task
            self._tasks.add(task)
        return True

    def _answer(self, message: Mapping[str, object], events: bool = False) -> None:
        """A reply known at once: sent now unless earlier requests are still running."""
        data = encode(message)
        if self._replies:
            self._replies.append(_Reply(data, events))
            return
        self._outbox.send(data)
        if events:
            self._events_on = True

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
        self,
        command: QmpCommand,
        arguments: dict[str, object],
        echo: dict[str, object],
        reply: _Reply,
        fds: list[int],
    ) -> None:
        """Run one handler and hand its reply over as soon as it is done (no task hop).

        The handler may claim ``fds`` (the ones its message carried); the rest
        are closed when it is done.
        """
        message_fds.set(fds)
        try:
            await self._run_handler(command, arguments, echo, reply)
        finally:
            close_all(fds)

    async def _run_handler(
        self,
        command: QmpCommand,
        arguments: dict[str, object],
        echo: dict[str, object],
        reply: _Reply,
    ) -> None:
        try:
            args = validate_arguments(command.args_model, arguments)
            result = await command.handler(args, self)
            data = encode(return_reply(result_value(result), echo))
        except QmpCommandError as exc:
            data = encode(error_reply(exc, echo))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # the session is tearing down
                self._complete(reply, encode(error_reply(QmpCommandError("Command cancelled"), {})))
                raise
            # Something the handler awaited was cancelled, not the handler itself.
            failed = QmpCommandError(f"Command '{command.name}' was cancelled")
            data = encode(error_reply(failed, echo))
        except Exception:
            logger.exception("QMP command %s from %r failed", command.name, self)
            failed = QmpCommandError(f"Internal error in command '{command.name}'")
            data = encode(error_reply(failed, echo))
        self._complete(reply, data)

    def _complete(self, reply: _Reply, data: bytes) -> None:
        """Record a reply; send it and the finished ones after it if it is the oldest."""
        if reply.task is not None:
            self._tasks.discard(reply.task)
        reply.data = data
        replies = self._replies
        if self._ended or replies[0] is not reply:
            return  # head-of-line: an earlier request is still running
        while replies and (ready := replies[0].data) is not None:
            if replies.popleft().events:
                self._outbox.send(ready)
                self._events_on = True
            else:
                self._outbox.send(ready)
        if self._frames:
            self._pump()
        self._check_done()

    # -- output -----------------------------------------------------------------

    def _output_progress(self) -> None:
        """Output left: read the client again if it was held for its output; maybe done."""
        if self._frames and len(self._outbox.waiting) <= self._resume_below:
            self._pump()
        self._check_done()

    def _output_failed(self, exc: OSError) -> None:
        logger.debug("QMP %r: write failed: %r", self, exc)
        self._drop_frames()
        self._input_open = False
        self._ended = self._closing = True  # the peer is gone: nothing more can reach it
        self._want_input()
        self._finish()

    def send_encoded_event(self, data: bytes) -> bool:
        """:meth:`send_event` for an event already encoded (a broadcast encodes once)."""
        if not (self._events_on and self._input_open) or self._closing:
            return False
        if len(self._outbox.waiting) + len(data) > self.server.max_queued:
            logger.warning("QMP %r does not read its events; disconnecting it", self)
            self.close(grace=0.0)
            return False
        # Sent at the end of this loop pass, not now: the reply of the command
        # that caused the event (and other events of the pass) go in the same send.
        self._outbox.send_soon(data)
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

    @property
    def max_fds(self) -> int:
        """fds one client may keep stored with ``getfd``."""

    @property
    def negotiation_timeout(self) -> float | None:
        """Seconds a new client has to send ``qmp_capabilities``."""

    @property
    def idle_timeout(self) -> float | None:
        """Seconds without input before a negotiated client is hung up on."""

    def admits(self, credentials: PeerCredentials) -> bool:
        """Whether a peer with these credentials may use the server."""
        ...
