"""eventfd sources: a device backend in another process signals a vector by writing.

After ``attach-eventfd {device, vector, fdname}`` every write to that eventfd
is a notification of the vector, the user-space counterpart of KVM's irqfd
on an adapter route.  The eventfd counter coalesces writes that arrive
before the daemon reads: one read, one notification, whatever the count
(the bit is one bit).  ``signals`` counts the writes (the counter values).

An eventfd is shared with the client that passed it, so the daemon takes
only what cannot be turned against it: a semaphore eventfd (one unit per
read: a large count would keep the daemon reading long after its client is
gone) and a blocking one (the daemon would have to change the flags of an
open file it shares) are refused.  Limits and ownership are keyed on the
client's uid, so reconnecting gains nothing; ``detach-eventfd`` is for the
uid that attached (or a managing uid: root, the daemon's own).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import select
import stat
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..errors import IndicatorsError

__all__ = ["EventfdError", "EventfdSources", "is_eventfd"]

log = logging.getLogger(__name__)

_SEMAPHORE_READS = 64  # reads of one unit in a row that unmask a semaphore eventfd


class EventfdError(IndicatorsError, ValueError):
    """An eventfd that cannot be attached or detached; ``device``, ``vector``
    (None when not about one) and ``reason`` say which and why."""

    def __init__(self, reason: str, device: str | None = None, vector: int | None = None) -> None:
        self.reason = reason
        self.device = device
        self.vector = vector
        where = "" if device is None else f"device {device!r} vector {vector}: "
        super().__init__(f"{where}{reason}")


def eventfd_semaphore(fd: int) -> bool | None:
    """Whether ``fd`` is a semaphore eventfd (/proc fdinfo); None if the kernel does not say."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name == "eventfd-semaphore":
                    return value.strip() != "0"
    except OSError:
        return None
    return None


def _still_readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


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
    owner: int | None = None  # the attaching client's uid
    signals: int = 0
    reads: int = 0
    semaphore_unknown: bool = False  # the kernel's fdinfo did not say: watch the reads
    ones: int = 0  # reads in a row that took one unit and left the eventfd readable


class EventfdSources:
    """The attached eventfds of one engine."""

    def __init__(
        self,
        engine: Engine,
        limit: int = 1024,
        per_owner: int = 256,
        managers: frozenset[int] | None = None,
    ) -> None:
        self.engine = engine
        self.limit = limit
        self.per_owner = per_owner
        #: uids that may detach anyone's eventfd (root and the daemon's own by default).
        self.managers = managers if managers is not None else frozenset({0, os.getuid()})
        self._sources: dict[tuple[str, int], _Source] = {}
        self._inflight: set[asyncio.Future[Any]] = set()
        self.signals = 0

    def attach(self, device: str, vector: int, fd: int, owner: int | None = None) -> None:
        """Take ownership of ``fd`` and notify ``device``/``vector`` on every write.

        ``owner`` (the client's uid) is limited to ``per_owner`` attachments,
        over all its connections.  The fd is closed when it is refused.
        """
        key = (device, vector)
        try:
            self.engine.check_target(device, vector)
            if not is_eventfd(fd):
                raise EventfdError("the fd is not an eventfd", device, vector)
            semaphore = eventfd_semaphore(fd)
            if semaphore:
                raise EventfdError(
                    "a semaphore eventfd (EFD_SEMAPHORE) is refused: create it without",
                    device,
                    vector,
                )
            if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
                raise EventfdError(
                    "a blocking eventfd is refused: create it with EFD_NONBLOCK "
                    "(the daemon does not change the flags of a file it shares)",
                    device,
                    vector,
                )
            if key in self._sources:
                raise EventfdError("it already has an eventfd", device, vector)
            if len(self._sources) >= self.limit:
                raise EventfdError(f"at most {self.limit} eventfds may be attached")
            mine = sum(1 for s in self._sources.values() if owner is not None and s.owner == owner)
            if mine >= self.per_owner:
                raise EventfdError(f"uid {owner} may attach at most {self.per_owner} eventfds")
        except ValueError:
            os.close(fd)
            raise
        source = _Source(fd, device, vector, owner, semaphore_unknown=semaphore is None)
        self._sources[key] = source
        asyncio.get_running_loop().add_reader(fd, self._readable, source)

    def detach(self, device: str, vector: int, requester: int | None = None) -> None:
        """Stop watching and close the eventfd of ``device``/``vector``.

        ``requester`` (a client's uid; None: the daemon itself) must be the
        uid that attached it or one of :attr:`managers`.
        """
        source = self._sources.get((device, vector))
        if source is None:
            self.engine.check_target(device, vector)  # ValueError: say what is unknown
            raise EventfdError("it has no eventfd attached", device, vector)
        if (
            requester is not None
            and requester not in self.managers
            and source.owner not in (None, requester)
        ):
            raise EventfdError(
                f"its eventfd belongs to uid {source.owner}; uid {requester} may not detach it",
                device,
                vector,
            )
        del self._sources[(device, vector)]
        self._close(source)

    def detach_device(self, device: str) -> int:
        """Detach and close every eventfd of ``device`` (it is being removed); how many."""
        mine = [key for key in self._sources if key[0] == device]
        for key in mine:
            self._close(self._sources.pop(key))
        return len(mine)

    def _close(self, source: _Source) -> None:
        asyncio.get_running_loop().remove_reader(source.fd)
        os.close(source.fd)

    def _readable(self, source: _Source) -> None:
        try:
            value = int.from_bytes(os.read(source.fd, 8), "little")
        except BlockingIOError:
            return
        if source.semaphore_unknown:
            # One unit per read while still readable, again and again: a semaphore
            # after all (a plain eventfd hands over its whole count in one read).
            one = value == 1 and _still_readable(source.fd)
            source.ones = source.ones + 1 if one else 0
        if source.ones >= _SEMAPHORE_READS:
            log.warning(
                "eventfd of %s/%d is a semaphore eventfd; detached", source.device, source.vector
            )
            self._sources.pop((source.device, source.vector), None)
            self._close(source)
            return
        source.signals += value
        source.reads += 1
        self.signals += value
        # An idle engine applies it here, in this callback; a failure is
        # reported by the engine's listeners.  Only a queued one is tracked.
        try:
            outcome = self.engine.notify_nowait(((source.device, source.vector),))
        except ValueError as exc:  # not expected: a removed device's eventfds are closed
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
