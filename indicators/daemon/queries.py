"""What ``query-adapters`` and ``query-stats`` answer, from the parts that know it."""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from .eventfds import EventfdSources
from .holds import Holds
from .registry import DeviceRegistry
from .reports import describe_device
from .vmm import VmmLink

__all__ = ["describe_adapters", "describe_stats"]


def describe_adapters(engine: Engine, registry: DeviceRegistry) -> list[dict[str, Any]]:
    """``query-adapters``: config, lifetime, live bits and suppression per adapter."""
    result = []
    for adapter in engine.model.adapters.values():
        simm, nimm = engine.suppression.state(adapter.isc)
        result.append(
            {
                "id": adapter.id,
                "name": adapter.name,
                "isc": adapter.isc,
                "kind": adapter.kind,
                "suppressible": adapter.suppressible,
                "simm": simm,
                "nimm": nimm,
                "devices": [
                    {
                        **describe_device(device, engine.backend.read),
                        "lifetime": registry.lifetimes.get(device.name, "persistent"),
                    }
                    for device in adapter.devices
                ],
            }
        )
    return result


def describe_stats(
    engine: Engine,
    eventfds: EventfdSources,
    holds: Holds,
    vmm: VmmLink | None,
    generation: str | None,
) -> dict[str, Any]:
    """``query-stats``: the engine's counters, holds, eventfds, the VMM link."""
    return {
        **engine.stats.as_dict(),
        "pending": engine.pending,
        "paused": engine.paused,
        "holds": list(holds),
        "unavailable": engine.unavailable,
        "eventfd-signals": eventfds.signals,
        "eventfds": eventfds.describe(),
        "vmm": vmm.status if vmm else None,
        "owns-reboot": vmm.owns_reboot if vmm else False,
        "kernel-generation": generation,
    }
