"""Engine statistics: plain counters, cheap to bump on the hot path.

:class:`EngineStats` counts what the engine did; :meth:`EngineStats.as_dict`
is what ``query-stats``, ``indicators status`` and the metrics endpoint
show.  Per-adapter counters are keyed by adapter id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdapterCounters", "EngineStats"]


@dataclass
class AdapterCounters:
    """What happened to one adapter."""

    interrupts: int = 0
    suppressed: int = 0
    failures: int = 0


@dataclass
class EngineStats:
    """Counters of one engine."""

    notifications: int = 0  # accepted
    applied: int = 0  # acknowledged as in guest memory
    merged: int = 0  # notifications that shared a bit with another in their batch
    cmpxchg: int = 0  # backend cmpxchg calls, all outcomes
    no_xchg: int = 0  # compare-failed rounds retried
    eagain: int = 0  # -EAGAIN results retried
    interrupts_injected: int = 0
    interrupts_suppressed: int = 0
    interrupts_coalesced: int = 0  # decisions folded into another interrupt of the batch
    failures: Counter[str] = field(default_factory=Counter)  # by code
    adapters: dict[int, AdapterCounters] = field(default_factory=dict)

    def _adapter(self, adapter_id: int) -> AdapterCounters:
        counters = self.adapters.get(adapter_id)
        if counters is None:
            counters = self.adapters[adapter_id] = AdapterCounters()
        return counters

    def fail(self, code: str, adapter_id: int) -> None:
        """Count a failed notification (or injection) with ``code``."""
        self.failures[code] += 1
        self._adapter(adapter_id).failures += 1

    def injected(self, adapter_id: int) -> None:
        """Count a delivered interrupt."""
        self.interrupts_injected += 1
        self._adapter(adapter_id).interrupts += 1

    def suppressed(self, adapter_id: int) -> None:
        """Count a suppressed interrupt."""
        self.interrupts_suppressed += 1
        self._adapter(adapter_id).suppressed += 1

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot."""
        return {
            "notifications": self.notifications,
            "applied": self.applied,
            "merged": self.merged,
            "cmpxchg": self.cmpxchg,
            "no-xchg": self.no_xchg,
            "eagain": self.eagain,
            "interrupts-injected": self.interrupts_injected,
            "interrupts-suppressed": self.interrupts_suppressed,
            "interrupts-coalesced": self.interrupts_coalesced,
            "failures": dict(self.failures),
            "adapters": {
                str(aid): {
                    "interrupts": c.interrupts,
                    "suppressed": c.suppressed,
                    "failures": c.failures,
                }
                for aid, c in sorted(self.adapters.items())
            },
        }
