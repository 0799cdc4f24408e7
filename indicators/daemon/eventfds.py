"""eventfd sources: a device backend in another process signals a vector by writing.

After ``attach-eventfd {device, vector, fdname}`` every write to that eventfd
is a notification of the vector, the user-space counterpart of KVM's irqfd
on an adapter route.  The eventfd counter coalesces writes that arrive
before the daemon reads: one read, one notification, whatever the count
(the bit is one bit).  ``signals`` counts the writes (the counter values).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from ..engine import Engine

__all__ = ["EventfdError", "EventfdSources", "is_eventfd"]

log = logging.getLogger(__name__)


class EventfdError(ValueError):
    """An eventfd that cannot be attached; the message says which and why."""


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (its /proc link reads ``anon_inode:[eventfd]``)."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) and os.readlink(f"/proc/self/fd/{fd}") == (
            "anon_inode:[eventfd]"
        ):
            return True
    except OSError:
        return False
    return False


@dataclass
class _Source:
    fd: int
    device: str
    vector: int
    owner: int | None = None
    signals: int = 0
    reads: int = 0


class EventfdSources:
    """The attached eventfds of one engine."""

    def __init__(self, engine: Engine, limit: int = 1024, per_owner: int = 256) -> None:
        self.engine = engine
        self.limit = limit
        self.per_owner = per_owner
        self._sources: dict[tuple[str, int], _Source] = {}
        self._inflight: set[asyncio.Future[Any]] = set()
        self.signals = 0

    def attach(self, device: str, vector: int, fd: int, owner: int | None = None) -> None:
        """Take ownership of ``fd`` and notify ``device``/``vector`` on every write.

        ``owner`` (a client's number) is limited to ``per_owner`` attachments.
        The fd is closed when it is refused.
        """
        key = (device, vector)
        try:
            self.engine.check_target(device, vector)
            if not is_eventfd(fd):
                raise EventfdError(f"fd for device {device!r} vector {vector} is not an eventfd")
            if key in self._sources:
                raise EventfdError(f"device {device!r} vector {vector} already has an eventfd")
            if len(self._sources) >= self.limit:
                raise EventfdError(f"at most {self.limit} eventfds may be attached")
            mine = sum(1 for s in self._sources.values() if owner is not None and s.owner == owner)
            if mine >= self.per_owner:
                raise EventfdError(f"a client may attach at most {self.per_owner} eventfds")
        except ValueError:
            os.close(fd)
            raise
        os.set_blocking(fd, False)
        source = _Source(fd, device, vector, owner)
        self._sources[key] = source
        asyncio.get_running_loop().add_reader(fd, self._readable, source)

    def detach(self, device: str, vector: int) -> None:
        """Stop watching and close the eventfd of ``device``/``vector``."""
        source = self._sources.pop((device, vector), None)
        if source is None:
            raise EventfdError(f"device {device!r} vector {vector} has no eventfd attached")
        self._close(source)

    def _close(self, source: _Source) -> None:
        asyncio.get_running_loop().remove_reader(source.fd)
        os.close(source.fd)

    def _readable(self, source: _Source) -> None:
        try:
            value = int.from_bytes(os.read(source.fd, 8), "little")
        except BlockingIOError:
            return
        source.signals += value
        source.reads += 1
        self.signals += value
        # An idle engine applies it here, in this callback; a failure is
        # reported by the engine's listeners.  Only a queued one is tracked.
        try:
            outcome = self.engine.notify_nowait(((source.device, source.vector),))
        except ValueError as exc:  # the device left in a reload
            log.debug("eventfd notify of %s/%d refused: %s", source.device, source.vector, exc)
            return
        if not isinstance(outcome, list):
            self._inflight.add(outcome)
            outcome.add_done_callback(self._inflight.discard)

    def stop_reading(self) -> None:
        """Stop watching every eventfd (they stay attached)."""
        loop = asyncio.get_running_loop()
        for source in self._sources.values():
            loop.remove_reader(source.fd)

    async def drain(self) -> None:
        """Wait for the notifications already read."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def close(self) -> None:
        """Detach and close everything."""
        for source in self._sources.values():
            self._close(source)
        self._sources.clear()

    def describe(self) -> list[dict[str, object]]:
        """What ``query-stats`` shows of each eventfd."""
        return [
            {"device": s.device, "vector": s.vector, "signals": s.signals, "reads": s.reads}
            for s in self._sources.values()
        ]
