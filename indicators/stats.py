"""Engine statistics: plain counters, cheap to bump on the hot path.

:class:`EngineStats` counts what the engine did; :meth:`EngineStats.as_dict`
is what ``query-stats``, ``indicators status`` and the metrics endpoint
show.  Per-adapter counters are keyed by adapter id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdapterCounters", "EngineStats", "LatencyHistogram"]

#: Upper bounds (seconds) of the notify latency buckets, accepted -> applied:
#: 5 us to 1 s, six per decade (1, 1.5, 2, 3, 5, 7), so neighbouring buckets
#: differ by 1.3-1.7x and 10 us, 30 us and 100 us land in different buckets.
#: Round numbers keep the Prometheus ``le`` labels readable.
LATENCY_BOUNDS = (
    5e-6, 7e-6, 1e-5, 1.5e-5, 2e-5, 3e-5,
    5e-5, 7e-5, 1e-4, 1.5e-4, 2e-4, 3e-4,
    5e-4, 7e-4, 1e-3, 1.5e-3, 2e-3, 3e-3,
    5e-3, 7e-3, 1e-2, 1.5e-2, 2e-2, 3e-2,
    5e-2, 7e-2, 0.1, 0.15, 0.2, 0.3,
    0.5, 0.7, 1.0,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Notify latency in fixed buckets: one bisect and one increment per observation.

    ``counts[i]`` holds the notifications that took at most ``bounds[i]``
    and more than ``bounds[i - 1]``; the last count is everything over
    ``bounds[-1]``.  Quantiles are read from the counts at query time.
    """

    bounds: tuple[float, ...] = LATENCY_BOUNDS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    total: float = 0.0

    def observe(self, seconds: float, weight: int = 1) -> None:
        """Record ``weight`` notifications that took ``seconds``."""
        self.counts[bisect_left(self.bounds, seconds)] += weight
        self.total += seconds * weight

    @property
    def count(self) -> int:
        """Notifications observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, notifications at or below it)``, ending with +inf."""
        result, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result

    def report(self, q: float) -> float | str | None:
        """:meth:`quantile` for JSON: past the last bucket is a string, not infinity."""
        value = self.quantile(q)
        if value is not None and value == float("inf"):
            return f"over {self.bounds[-1]:g} s"
        return value

    def quantile(self, q: float) -> float | None:
        """Quantile ``q`` (0 < q <= 1) in seconds, interpolated within its bucket.

        The notifications of a bucket are taken as spread evenly between its
        lower and upper bound (the lowest bucket starts at 0), as
        Prometheus' ``histogram_quantile`` does, so the answer moves with
        the data instead of jumping from bound to bound.  None when nothing
        was observed; infinity when the quantile lies past the last bound.
        """
        total = self.count
        if not total:
            return None
        rank = q * total
        below, lower = 0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            if count and below + count >= rank:
                return lower + (bound - lower) * max(0.0, rank - below) / count
            below += count
            lower = bound
        return float("inf")


@dataclass
class AdapterCounters:
    """What happened to one adapter."""

    notifications: int = 0
    interrupts: int = 0
    suppressed: int = 0
    failures: int = 0


@dataclass
class EngineStats:
    """Counters of one engine."""

    notifications: int = 0  # accepted
    applied: int = 0  # acknowledged: dsci bit and summary in guest memory
    merged: int = 0  # notifications that shared a bit with another in their batch
    cmpxchg: int = 0  # backend cmpxchg calls, all outcomes
    no_xchg: int = 0  # compare-failed rounds retried
    eagain: int = 0  # -EAGAIN results retried
    interrupts_injected: int = 0
    interrupts_suppressed: int = 0
    interrupts_coalesced: int = 0  # decisions folded into another interrupt of the batch
    interrupts_failed: int = 0  # injections the sink refused (their notifications are applied)
    undone: int = 0  # dsci bits cleared again because their summary could not be set
    stranded: int = 0  # such bits that could not be cleared (left behind a clear summary)
    failures: Counter[str] = field(default_factory=Counter)  # failed notifications, by code
    adapters: dict[int, AdapterCounters] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def _adapter(self, adapter_id: int) -> AdapterCounters:
        counters = self.adapters.get(adapter_id)
        if counters is None:
            counters = self.adapters[adapter_id] = AdapterCounters()
        return counters

    def applied_to(self, adapter_id: int, count: int) -> None:
        """Count ``count`` notifications applied for an adapter."""
        self._adapter(adapter_id).notifications += count

    def applied_to_each(self, per_adapter: dict[int, int]) -> None:
        """:meth:`applied_to` for each adapter id and count of ``per_adapter``."""
        adapters = self.adapters
        for adapter_id, count in per_adapter.items():
            counters = adapters.get(adapter_id)
            if counters is None:
                counters = adapters[adapter_id] = AdapterCounters()
            counters.notifications += count

    def fail(self, code: str, adapter_id: int) -> None:
        """Count a failed notification with ``code``."""
        self.failures[code] += 1
        self._adapter(adapter_id).failures += 1

    def injected(self, adapter_id: int) -> None:
        """Count a delivered interrupt."""
        self.interrupts_injected += 1
        counters = self.adapters.get(adapter_id)
        if counters is None:
            counters = self.adapters[adapter_id] = AdapterCounters()
        counters.interrupts += 1

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
            "interrupts-failed": self.interrupts_failed,
            "undone": self.undone,
            "stranded": self.stranded,
            "failures": dict(self.failures),
            "latency-p50": self.latency.report(0.5),
            "latency-p99": self.latency.report(0.99),
            "adapters": {
                str(aid): {
                    "notifications": c.notifications,
                    "interrupts": c.interrupts,
                    "suppressed": c.suppressed,
                    "failures": c.failures,
                }
                for aid, c in sorted(self.adapters.items())
            },
        }
