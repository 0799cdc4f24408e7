"""The ``indicators status`` table, from ``query-adapters`` and ``query-stats``.

Its own module so that the command line and the demo both print it without
importing each other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_status"]


def format_status(adapters: Any, stats: Any) -> str:
    """The ``indicators status`` table."""
    lines = [f"{'adapter':>8} {'isc':>3} {'kind':10} {'device':16} {'key':>3} "
             f"{'vectors':>7} {'set':>5} {'summary':>7} {'suppr':>5}"]  # fmt: skip
    for adapter in adapters:
        suppr = "nimm" if adapter["nimm"] else ("simm" if adapter["simm"] else "-")
        for device in adapter["devices"]:
            key = "-" if device["key"] is None else device["key"]
            bits = len(device.get("indicators-set", []))
            summary = "set" if device.get("summary-set") else "clear"
            lines.append(f"{adapter['id']:>8} {adapter['isc']:>3} {adapter['kind']:10} "
                         f"{device['name']:16} {key:>3} {device['vectors']:>7} {bits:>5} "
                         f"{summary:>7} {suppr:>5}")  # fmt: skip
    lines.append("")
    for name in ("notifications", "applied", "merged", "cmpxchg", "no-xchg", "eagain",
                 "interrupts-injected", "interrupts-suppressed", "interrupts-coalesced",
                 "pending", "eventfd-signals"):  # fmt: skip
        lines.append(f"{name:>24}: {stats.get(name)}")
    for name in ("latency-p50", "latency-p99"):  # bucket upper bounds, accepted -> applied
        value = stats.get(name)
        shown = value if value is None or isinstance(value, str) else f"<= {value * 1e6:,.0f} us"
        lines.append(f"{name:>24}: {shown or '-'}")
    lines.append(f"{'failures':>24}: {stats.get('failures') or 'none'}")
    lines.append(f"{'vmm':>24}: {stats.get('vmm') or 'no link'}")
    return "\n".join(lines)
