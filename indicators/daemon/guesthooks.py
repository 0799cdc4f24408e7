"""What the VMM link's news does to the daemon: holds, availability, resets, reboots.

:class:`GuestHooks` is the daemon's side of
:class:`~indicators.daemon.vmm.VmmHooks`.  A stopped or migrating guest
holds notifications (:class:`~indicators.daemon.holds.Holds`); a vanished
QEMU makes them fail; a reset, a new QEMU or a reboot QEMU hands over
(``manage_reboot``) removes the guest-lifetime devices from the
:class:`~indicators.daemon.registry.DeviceRegistry` before anything else
is applied.  What a new QEMU changes in the wiring (its RAM file) is the
service's business: ``attached`` calls back into it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..engine import Engine
from .holds import Holds
from .registry import DeviceRegistry
from .vmm import VmmLink

__all__ = ["GuestHooks"]

log = logging.getLogger(__name__)


class GuestHooks:
    """The daemon's answers to the VMM link (see :class:`~indicators.daemon.vmm.VmmHooks`)."""

    def __init__(
        self,
        holds: Holds,
        registry: DeviceRegistry,
        *,
        report: Callable[[str, dict[str, Any]], None],
        on_attached: Callable[[], Awaitable[None]],
    ) -> None:
        self.holds = holds
        self.registry = registry
        self.report = report
        self.on_attached = on_attached
        #: The link these hooks answer (set once it exists): resets go through it.
        self.vmm: VmmLink | None = None
        self._reboots: set[asyncio.Task[list[str]]] = set()

    @property
    def engine(self) -> Engine | None:
        """The engine, once the service made it (the link starts earlier)."""
        return self.registry.engine

    def hold(self, reason: str) -> None:
        """Hold notifications for ``reason``."""
        self.holds.hold(reason)

    def release(self, reason: str) -> None:
        """Drop ``reason``; resume when nothing holds any more."""
        self.holds.release(reason)

    def unavailable(self, reason: str) -> None:
        """QEMU is gone: fail pending and new notifications."""
        engine = self.engine
        if engine is not None:
            engine.set_unavailable(reason)
            if self.holds:
                engine.pause()

    def available(self) -> None:
        """QEMU is back."""
        if self.engine is not None:
            self.engine.set_available()

    def reset(self) -> None:
        """The guest was reset: drop its devices, clear suppression state."""
        self.registry.drop_guest("guest-reset")
        if self.engine is not None:
            self.engine.reset_suppression()

    def replaced(self, reason: str) -> None:
        """Connected again (``reason``: ``qemu-replaced`` or ``vmm-reconnected``): the
        guest's registrations cannot be trusted any more."""
        self.registry.drop_guest(reason)

    def rebooting(self) -> None:
        """The guest asked for a reboot and QEMU paused it (``manage_reboot``): drop the
        guest's devices, then reset and continue the VM once their bits are closed."""
        task = asyncio.get_running_loop().create_task(self.guest_reset("guest-reset"))
        self._reboots.add(task)
        task.add_done_callback(self._reboot_done)

    def _reboot_done(self, task: asyncio.Task[list[str]]) -> None:
        self._reboots.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("resetting the guest after its reboot failed: %s", task.exception())

    async def guest_reset(self, reason: str) -> list[str]:
        """Drop every ``guest`` device (before any further notification is applied), then,
        with a VMM link, reset and continue the VM; the names dropped."""
        self.holds.hold("guest-reset")
        try:
            names, narrowing = self.registry.drop_guest(reason)
            if self.engine is not None:
                self.engine.reset_suppression()
            if narrowing is not None:
                await narrowing  # the removed bits are closed before the guest runs again
            if self.vmm is not None:
                await self.vmm.reset_and_continue()
        finally:
            self.holds.release("guest-reset")
        return names

    async def close(self) -> None:
        """Stop a reboot still being handled (the daemon is stopping)."""
        for task in list(self._reboots):
            task.cancel()
        await asyncio.gather(*self._reboots, return_exceptions=True)

    def vmm_state(self, status: str, data: dict[str, Any]) -> None:
        """Report ``VMM_STATE``."""
        self.report("VMM_STATE", {"status": status, **data})

    async def attached(self) -> None:
        """QEMU (re)connected: let the service re-learn what a new QEMU changed."""
        await self.on_attached()
