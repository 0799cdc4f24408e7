"""Interrupt sinks: where the engine delivers an adapter interrupt.

An :class:`InterruptSink` receives "adapter interrupt for this adapter"
once the engine has decided one is due.  Two implementations:

- :class:`KvmSink`: ``KVM_S390_INTERRUPT`` on the VM fd, or, for a
  suppressible adapter when a FLIC fd is given, the FLIC ``AIRQ_INJECT``
  attribute, with which the kernel applies adapter-interruption suppression
  itself (``handles_suppression``);
- :class:`QueueSink`: an in-process stream of :class:`InterruptEvent` for
  tests, the demo and the emulated set-up (no real guest takes interrupts
  from outside QEMU under TCG).
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator
from typing import NamedTuple

from . import abi
from .adapters import Adapter
from .memop.kvm import KvmBackend

__all__ = ["InterruptEvent", "InterruptSink", "KvmSink", "QueueSink"]


class InterruptEvent(NamedTuple):
    """One delivered adapter interrupt."""

    adapter_id: int
    isc: int
    time: float


#: Builds an event without NamedTuple's Python-level ``__new__`` (the inject path).
_new_event = tuple.__new__


class InterruptSink(ABC):
    """Delivers adapter interrupts."""

    #: True when the sink (the kernel's FLIC) applies AIS suppression itself.
    handles_suppression: bool = False

    @abstractmethod
    def inject(self, adapter: Adapter) -> None:
        """Raise an adapter interrupt for ``adapter`` (its ISC)."""

    def set_ais_mode(self, isc: int, mode: int) -> None:
        """Re-arm suppression for ``isc`` (only called when ``handles_suppression``)."""
        raise NotImplementedError

    def reset_ais(self, isc: int) -> None:
        """Clear ``isc``'s suppression state (only called when ``handles_suppression``)."""
        self.set_ais_mode(isc, abi.KVM_S390_AIS_MODE_ALL)


class QueueSink(InterruptSink):
    """Keeps delivered interrupts as events; ``count`` counts them per ISC.

    At most ``maxlen`` unread events are kept: the oldest is dropped when full.
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self.count = [0] * 8
        self._events: deque[InterruptEvent] = deque(maxlen=maxlen)
        self._waiter: asyncio.Future[None] | None = None  # readers wait on it when empty

    def inject(self, adapter: Adapter) -> None:
        """Record the interrupt (a plain append: the engine's idle path runs through it)."""
        self.count[adapter.isc] += 1
        self._events.append(_new_event(InterruptEvent, (adapter.id, adapter.isc, time.time())))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def events(self) -> AsyncIterator[InterruptEvent]:
        """Yield interrupts as they are delivered (several readers share them out)."""
        events = self._events
        while True:
            if events:
                yield events.popleft()
                continue
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # a cancelled reader leaves the others waiting

    def drain(self) -> list[InterruptEvent]:
        """Take every event delivered so far."""
        taken = list(self._events)
        self._events.clear()
        return taken


class KvmSink(InterruptSink):
    """Injects through KVM; with ``flic_fd``, suppressible adapters go through AIS."""

    def __init__(self, backend: KvmBackend, flic_fd: int | None = None) -> None:
        self.backend = backend
        self.flic_fd = flic_fd
        self.handles_suppression = flic_fd is not None

    def inject(self, adapter: Adapter) -> None:
        """``AIRQ_INJECT`` (suppressible, FLIC present) or ``KVM_S390_INTERRUPT``."""
        if self.flic_fd is not None and adapter.suppressible:
            self.backend.flic_set_attr(self.flic_fd, abi.KVM_DEV_FLIC_AIRQ_INJECT, adapter.id)
        else:
            self.backend.inject_adapter_interrupt(adapter.isc)

    def set_ais_mode(self, isc: int, mode: int) -> None:
        """``KVM_DEV_FLIC_AISM`` with a ``kvm_s390_ais_req``."""
        if self.flic_fd is None:
            raise NotImplementedError("no FLIC fd: suppression is done by the engine")
        req = abi.KvmS390AisReq(isc=isc, mode=mode)
        self.backend.flic_set_attr(self.flic_fd, abi.KVM_DEV_FLIC_AISM, 0, ctypes.addressof(req))

    def reset_ais(self, isc: int) -> None:
        """``KVM_DEV_FLIC_AISM`` mode ALL: the kernel clears ``isc``'s simm and nimm."""
        self.set_ais_mode(isc, abi.KVM_S390_AIS_MODE_ALL)
