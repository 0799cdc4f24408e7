"""A simulated guest: the Linux airq handler's side of the protocol, on the host.

:class:`SimulatedGuest` polls the summaries of an :class:`AdapterModel` in a
thread and, like Linux's virtio-ccw and zPCI handlers, scans the dsci bits
behind a set summary, clears each set bit atomically (counting it), clears
the summary, and scans once more.  It works on any :class:`GuestMemory`, so
it runs against the emulated backend's memory concurrently with the engine:
the demo, the contention benchmark and the engine's tests use it where no
real guest is at hand.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from .adapters import AdapterModel, Bit, Device
from .guestmem import GuestMemory

__all__ = ["SimulatedGuest"]


@dataclass
class _Summary:
    bit: Bit
    devices: list[Device]


class SimulatedGuest:
    """Consumes indicators as a guest would; ``counts[(device, vector)]`` says how often."""

    def __init__(self, memory: GuestMemory, model: AdapterModel, *, idle_sleep: float = 0.0):
        self.memory = memory
        self.idle_sleep = idle_sleep
        self.counts: Counter[tuple[str, int]] = Counter()
        self.rounds = 0
        self._summaries: dict[Bit, _Summary] = {}
        for device in model.devices.values():
            entry = self._summaries.setdefault(device.summary, _Summary(device.summary, []))
            entry.devices.append(device)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- handler

    def _clear_bit(self, bit: Bit) -> bool:
        """Atomically clear ``bit``; True if it was set."""
        mem = self.memory
        current = mem.load(bit.gaddr, 1)
        while current & bit.mask:
            exchanged, current = mem.cas(bit.gaddr, 1, current, current & ~bit.mask)
            if exchanged:
                return True
        return False

    def _scan(self, devices: list[Device]) -> None:
        mem = self.memory
        for device in devices:
            for vector, bit in enumerate(device.dsci):
                if mem.load(bit.gaddr, 1) & bit.mask and self._clear_bit(bit):
                    self.counts[(device.name, vector)] += 1

    def poll_once(self) -> bool:
        """One pass over every summary; True if any was set."""
        mem = self.memory
        found = False
        for summary in self._summaries.values():
            if not mem.load(summary.bit.gaddr, 1) & summary.bit.mask:
                continue
            found = True
            self._scan(summary.devices)
            self._clear_bit(summary.bit)
            self._scan(summary.devices)  # Linux rescans after clearing the summary
        self.rounds += 1
        return found

    # ------------------------------------------------------------- thread

    def start(self) -> None:
        """Poll in a background thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="simulated-guest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.poll_once() and self.idle_sleep:
                time.sleep(self.idle_sleep)

    def stop(self) -> None:
        """Stop polling, then consume whatever is still set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while self.poll_once():
            pass

    @property
    def total(self) -> int:
        """Bits consumed so far."""
        return sum(self.counts.values())
