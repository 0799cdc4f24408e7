"""The live device set: one registry that the engine, the guard and the commands share.

A device comes from the config file (lifetime ``persistent``) or from a
``device-add`` at run time (lifetime ``guest``, the default, or
``persistent``).  :class:`DeviceRegistry` is the one place that changes the
set, always in the same order, so that the engine never stops and the guard
never lets a stray bit through:

adding
    validate against the live set (the config's own model and rules:
    names, overlaps, memory bounds, summary ISCs, adapter identity; for a
    runtime device also the ``[control] device_ranges``), then the model,
    then the guard's allowed bits, then the engine's targets: the first
    notification accepted for the device finds everything in place;
removing
    the engine first: a later notification fails as an unknown device, the
    queued ones fail with code ``REMOVED`` (guest memory unchanged); the
    device's eventfds are detached and closed; the batch being applied at
    that moment completes, and only then does the guard drop the device's
    bits.  From then on no write can change them.

A guest reset (or a new QEMU) removes every ``guest`` device
(:meth:`DeviceRegistry.drop_guest`); a config reload is a diff of the
config's devices applied through the same two paths
(:meth:`DeviceRegistry.apply_config`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from ..adapters import AdapterModel, Device
from ..config import DeviceConfig
from ..config_rules import device_problems
from ..engine import Engine
from ..errors import IndicatorsError
from ..memop import MemopBackend
from ..memop.guard import ConfinedBackend
from .eventfds import EventfdSources

__all__ = ["DeviceRegistry", "Lifetime", "RegistryError"]

log = logging.getLogger(__name__)

#: ``guest``: dropped when the guest resets or QEMU is replaced; ``persistent``: kept.
Lifetime = Literal["guest", "persistent"]

#: Where a device came from: the config file (a reload diffs these) or a command.
Origin = Literal["config", "runtime"]


class RegistryError(IndicatorsError, ValueError):
    """A device that cannot be added or removed; ``device`` names it, ``problems``
    lists ``(where, what)`` as the config check does."""

    def __init__(self, device: str, problems: Sequence[tuple[str, str]]) -> None:
        self.device = device
        self.problems = list(problems)
        text = "; ".join(f"{where}: {what}" for where, what in self.problems)
        if not any(device in where for where, _ in self.problems):
            # A rule reported on the other device (its bits on this one's summary byte).
            text = f"adding {device!r} conflicts: {text}"
        super().__init__(text)


class DeviceRegistry:
    """The live devices of one guest, their lifetimes, and who must follow a change."""

    def __init__(
        self,
        model: AdapterModel,
        memory_size: int,
        *,
        ranges: Sequence[tuple[int, int]] | None = None,
        announce: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.model = model
        self.memory_size = memory_size
        #: ``[start, end)`` ranges runtime devices must lie in (None: anywhere).
        self.ranges = list(ranges) if ranges is not None else None
        self.announce = announce or (lambda name, data: None)
        self.lifetimes: dict[str, Lifetime] = {name: "persistent" for name in model.devices}
        self.origins: dict[str, Origin] = {name: "config" for name in model.devices}
        self.engine: Engine | None = None
        self.eventfds: EventfdSources | None = None
        self.guard: ConfinedBackend | None = None
        self._retiring: list[Device] = []  # removed, but their last batch may still run
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ wiring

    def confine(self, inner: MemopBackend) -> ConfinedBackend:
        """A guard over ``inner`` that follows this set (a new one per backend)."""
        self.guard = ConfinedBackend(inner, self._allowed())
        return self.guard

    def bind(self, engine: Engine, eventfds: EventfdSources) -> None:
        """The engine and the eventfds that follow this set."""
        self.engine, self.eventfds = engine, eventfds

    def _allowed(self) -> dict[int, int]:
        allowed = self.model.allowed_bits()
        for device in self._retiring:
            for bit in (*device.dsci, device.summary):
                allowed[bit.gaddr] = allowed.get(bit.gaddr, 0) | bit.mask
        return allowed

    def _follow(self) -> None:
        if self.guard is not None:
            self.guard.set_allowed(self._allowed())

    # ------------------------------------------------------------ checks

    def specs(self) -> list[DeviceConfig]:
        """The live devices as config entries."""
        return [device.config for device in self.model.devices.values()]

    def problems(
        self, specs: Sequence[DeviceConfig], added: Iterable[DeviceConfig]
    ) -> list[tuple[str, str]]:
        """What is wrong with the set ``specs``; ``added`` (runtime devices) must also
        lie inside :attr:`ranges`."""
        problems = device_problems(self.memory_size, specs)
        if self.ranges is not None:
            for spec in added:
                problems += self._outside(spec)
        return problems

    def _outside(self, spec: DeviceConfig) -> list[tuple[str, str]]:
        assert self.ranges is not None
        bits = spec.dsci_bits()
        areas = [
            (spec.indicator_field, bits.start // 8, (bits.stop - 1) // 8 + 1),
            (spec.summary_field, spec.summary_bit() // 8, spec.summary_bit() // 8 + 1),
        ]
        shown = ", ".join(f"[{start:#x}, {end:#x})" for start, end in self.ranges) or "none"
        return [
            (
                f"device {spec.name!r}.{field}",
                f"bytes [{first:#x}, {end:#x}) are outside the [control] device_ranges ({shown})",
            )
            for field, first, end in areas
            if not any(start <= first and end <= stop for start, stop in self.ranges)
        ]

    # ------------------------------------------------------------ changes

    def add(self, spec: DeviceConfig, lifetime: Lifetime, origin: Origin = "runtime") -> Device:
        """Validate ``spec`` against the live set and add it; RegistryError names the problems."""
        problems = self.problems([*self.specs(), spec], [spec] if origin == "runtime" else [])
        if problems:
            raise RegistryError(spec.name, problems)
        return self._add(spec, lifetime, origin)

    def _add(self, spec: DeviceConfig, lifetime: Lifetime, origin: Origin) -> Device:
        device = self.model.add(spec)
        self.lifetimes[spec.name] = lifetime
        self.origins[spec.name] = origin
        self._follow()  # the guard first: the engine may apply its first notification at once
        if self.engine is not None:
            self.engine.add_device(device)
        log.info("device %r added (%s, %s)", spec.name, lifetime, origin)
        self.announce("DEVICE_ADDED", {"name": spec.name, "kind": spec.kind, "lifetime": lifetime})
        return device

    def withdraw(self, names: Iterable[str], reason: str) -> asyncio.Task[None] | None:
        """Remove ``names`` now (see the module's description); the returned task narrows
        the guard once the batch being applied has finished (None: nothing removed)."""
        names = [name for name in names if name in self.model.devices]
        if not names:
            return None
        if self.engine is not None:
            self.engine.remove_devices(names, reason)
        for name in names:
            if self.eventfds is not None:
                self.eventfds.detach_device(name)
            self._retiring.append(self.model.remove(name))
            self.lifetimes.pop(name, None)
            self.origins.pop(name, None)
            log.info("device %r removed (%s)", name, reason)
            self.announce("DEVICE_DELETED", {"name": name, "reason": reason})
        task = asyncio.get_running_loop().create_task(self._narrow())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _narrow(self) -> None:
        retiring = list(self._retiring)
        if self.engine is not None:
            await self.engine.settle()
        self._retiring = [device for device in self._retiring if device not in retiring]
        self._follow()

    async def remove(self, name: str, reason: str) -> None:
        """Remove one device; returns once its bits are no longer writable."""
        if name not in self.model.devices:
            known = ", ".join(sorted(self.model.devices)) or "none"
            raise RegistryError(name, [(f"device {name!r}", f"no such device (devices: {known})")])
        task = self.withdraw([name], reason)
        if task is not None:
            await task

    def drop_guest(self, reason: str) -> tuple[list[str], asyncio.Task[None] | None]:
        """Remove every ``guest``-lifetime device now; their names and the narrowing task."""
        names = sorted(name for name, life in self.lifetimes.items() if life == "guest")
        return names, self.withdraw(names, reason)

    def apply_config(self, specs: Sequence[DeviceConfig]) -> list[str]:
        """Make the config file's devices ``specs``: remove, replace and add as the diff
        says; runtime devices stay.  RegistryError (nothing changed) when the result
        would break a rule.  Returns the names removed, replaced or added."""
        wanted = {spec.name: spec for spec in specs}
        ours = {n for n, origin in self.origins.items() if origin == "config"}
        gone = [n for n in ours if n not in wanted or self.model.devices[n].config != wanted[n]]
        kept = [d.config for n, d in self.model.devices.items() if n not in gone]
        new = [spec for name, spec in wanted.items() if name not in ours or name in gone]
        problems = self.problems([*kept, *new], [])
        if problems:
            raise RegistryError("(config)", problems)
        self.withdraw(gone, "reload")  # the old bits stay writable until their batch is done
        for spec in new:
            self._add(spec, "persistent", "config")
        return sorted({*gone, *(spec.name for spec in new)})
