"""Interrupt sinks: where the engine delivers an adapter interrupt.

An :class:`InterruptSink` receives "adapter interrupt for this adapter"
once the engine has decided one is due.  Two implementations:

- :class:`KvmSink`: ``KVM_S390_INTERRUPT`` on the VM fd, or, for a
  suppressible adapter when a FLIC fd is given, the FLIC ``AIRQ_INJECT``
  attribute, with which the kernel applies adapter-interruption suppression
  itself (``handles_suppression``);
- :class:`CountingSink`: counts the interrupts per ISC and keeps nothing
  else: the daemon's emulated set-up, where no real guest takes interrupts
  from outside QEMU under TCG and the interrupts reach clients as events;
- :class:`QueueSink`: a counting sink that also keeps the last interrupts
  as an in-process stream of :class:`InterruptEvent`, for tests and the demo.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from . import abi
from .adapters import Adapter
from .memop.kvm import KvmBackend

__all__ = ["CountingSink", "InterruptEvent", "InterruptSink", "KvmSink", "QueueSink"]


@dataclass(frozen=True, slots=True)
class InterruptEvent:
    """One delivered adapter interrupt."""

    adapter_id: int
    isc: int
    time: float


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


class CountingSink(InterruptSink):
    """Counts delivered interrupts per ISC in ``count``; keeps nothing else."""

    def __init__(self) -> None:
        self.count = [0] * 8

    def inject(self, adapter: Adapter) -> None:
        """Count the interrupt."""
        self.count[adapter.isc] += 1


class QueueSink(CountingSink):
    """Keeps the last ``maxlen`` delivered interrupts as events, and counts them."""

    def __init__(self, maxlen: int = 10_000) -> None:
        super().__init__()
        self._queue: asyncio.Queue[InterruptEvent] = asyncio.Queue(maxlen)

    def inject(self, adapter: Adapter) -> None:
        """Record the interrupt; the oldest unread event is dropped when full."""
        self.count[adapter.isc] += 1
        event = InterruptEvent(adapter.id, adapter.isc, time.time())
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[InterruptEvent]:
        """Yield interrupts as they are delivered."""
        while True:
            yield await self._queue.get()

    def drain(self) -> list[InterruptEvent]:
        """Take every event delivered so far."""
        taken = []
        while not self._queue.empty():
            taken.append(self._queue.get_nowait())
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
