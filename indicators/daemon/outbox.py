"""A control client's output: sent at once, kept in order only while the kernel will not take it.

An :class:`Outbox` writes to a non-blocking socket from event-loop
callbacks, without a task:

- :meth:`Outbox.send` tries ``send`` at once; whatever the kernel does not
  take waits in :attr:`Outbox.waiting`, in order, and goes out when the
  socket is writable;
- while :meth:`Outbox.cork` holds (one read of the client being handled),
  everything waits and leaves in one ``send`` at :meth:`Outbox.uncork`;
- :meth:`Outbox.send_soon` waits for the end of the loop pass, so that an
  event and the reply of the command that raised it leave together: one
  wake-up of the client instead of two.

Its owner hears of progress (``on_sent``: output left, so it may read the
client again) and of a failed send (``on_failed``: the peer is gone, the
outbox is closed and empty).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

__all__ = ["Outbox"]


class Outbox:
    """The bytes on their way to one client, in order."""

    def __init__(
        self,
        sock: socket.socket,
        on_sent: Callable[[], None],
        on_failed: Callable[[OSError], None],
    ) -> None:
        self._sock = sock
        self._fileno = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._on_sent = on_sent
        self._on_failed = on_failed
        #: Output the kernel has not taken yet (or held by the cork).
        self.waiting = bytearray()
        self._writing = False  # registered for writability
        self._corked = False
        #: Closed: nothing is sent any more (the session ended or the send failed).
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send ``data`` now, after the output waiting before it."""
        if self.closed:
            return
        if self.waiting or self._corked:
            self.waiting += data
            if not (self._writing or self._corked):
                self._flush()
            return
        sent = self._send(data)
        if sent is None:
            return
        if sent < len(data):
            self.waiting += memoryview(data)[sent:]
            self._loop.add_writer(self._fileno, self._flush)
            self._writing = True

    def send_soon(self, data: bytes) -> None:
        """Send ``data`` at the end of this loop pass, with whatever else comes in it."""
        if self.waiting or self._corked or self.closed:
            self.send(data)
            return
        self.waiting += data
        self._loop.call_soon(self._deferred)

    def cork(self) -> None:
        """Hold everything sent until :meth:`uncork`."""
        self._corked = True

    def uncork(self) -> None:
        """Send what the cork held, in one ``send``."""
        self._corked = False
        if self.waiting and not self._writing:
            self._flush()

    def close(self) -> None:
        """Send nothing more; stop waiting for the socket to be writable."""
        self.closed = True
        if self._writing:
            self._loop.remove_writer(self._fileno)
            self._writing = False

    def _deferred(self) -> None:
        if self.waiting and not (self._writing or self._corked or self.closed):
            self._flush()

    def _flush(self) -> None:
        """Send what waits; wait for the socket to be writable if the kernel took part."""
        waiting = self.waiting
        sent = self._send(waiting)
        if sent is None:
            return
        del waiting[:sent]
        if waiting:
            if not self._writing:
                self._loop.add_writer(self._fileno, self._flush)
                self._writing = True
        elif self._writing:
            self._loop.remove_writer(self._fileno)
            self._writing = False
        self._on_sent()

    def _send(self, data: bytes | bytearray) -> int | None:
        """One non-blocking ``send``: the bytes the kernel took, or None when it failed."""
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: OSError) -> None:
        self.waiting.clear()
        self.close()
        self._on_failed(exc)
