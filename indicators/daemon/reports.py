"""Failures and devices as data: what replies and events say about them.

:class:`FailureBatch` keeps one device's failures of one batch small (a
count per code and the first few), :func:`failure_message` is a notify's
bounded error reply, :func:`describe_device` a device's entry in
``query-adapters``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..adapters import Device
from ..memop import MemopError

__all__ = ["FIRST_FEW", "FailureBatch", "describe_device", "describe_failure", "failure_message"]

#: Failures a notify reply or a NOTIFY_FAILED event locates one by one.
FIRST_FEW = 5


def describe_failure(error: Any) -> dict[str, Any]:
    """One failed notification as data: device, vector, code, where, gaddr, size, key."""
    return {
        "device": error.device,
        "vector": error.vector,
        "code": str(error.code),
        "where": getattr(error, "where", None),  # "dsci" or "summary"
        "gaddr": getattr(error, "gaddr", None),
        "size": getattr(error, "size", None),
        "key": getattr(error, "key", None),
        "errno": getattr(error, "errno", None),
        "desc": str(error),
    }


class FailureBatch:
    """The failures of one device in one batch, kept small: counts and the first few.

    A batch of thousands of failures keeps :data:`FIRST_FEW` errors, not all
    of them; :meth:`summary` is the ``NOTIFY_FAILED`` event's data.
    """

    __slots__ = ("codes", "count", "first")

    def __init__(self) -> None:
        self.count = 0
        self.codes: Counter[str] = Counter()
        self.first: list[Any] = []

    def add(self, error: Any) -> None:
        """Count ``error`` (a NotifyError); keep it if it is one of the first few."""
        self.count += 1
        self.codes[str(error.code)] += 1
        if len(self.first) < FIRST_FEW:
            self.first.append(error)

    def summary(self) -> dict[str, Any]:
        """The first failure's fields, a count per code, the first few failures."""
        return {
            **describe_failure(self.first[0]),
            "count": self.count,
            "codes": dict(self.codes),
            "first": [describe_failure(e) for e in self.first],
        }


def _located(error: Any) -> str:
    """``vector 1: program exception 4 (protection) (code 4) on the dsci at gaddr 0x..
    size 1 key 5``."""
    where = getattr(error, "where", None)
    gaddr = getattr(error, "gaddr", None)
    place = f" on the {where}" if where else ""
    if gaddr is not None:
        size, key = getattr(error, "size", None), getattr(error, "key", None)
        place += f" at gaddr {gaddr:#x} size {size} key {key}"
    return f"vector {error.vector}: {error.desc} (code {error.code}){place}"


def failure_message(device: str, total: int, failed: Sequence[Any]) -> str:
    """A bounded reply for a batch with failures: counts per code, then the first few."""
    codes = Counter(str(e.code) for e in failed)
    counts = ", ".join(f"code {code}: {n}" for code, n in sorted(codes.items()))
    shown = "; ".join(_located(e) for e in failed[:FIRST_FEW])
    more = f"; and {len(failed) - FIRST_FEW} more" if len(failed) > FIRST_FEW else ""
    return (
        f"device {device!r}: {total - len(failed)} of {total} applied, "
        f"{len(failed)} failed ({counts}); {shown}{more}"
    )


def describe_device(device: Device, read: Any) -> dict[str, Any]:
    """A device's config and live bits; ``read(gaddr, size, key)`` reads guest memory."""
    first = min(bit.gaddr for bit in device.dsci)
    last = max(bit.gaddr for bit in device.dsci)
    entry: dict[str, Any] = {
        "name": device.name,
        "kind": device.kind,
        "key": device.key,
        "vectors": device.vectors,
        "summary-test": device.summary_test,
        "config": device.config.model_dump(mode="json"),
    }
    try:
        area = read(first, last - first + 1, device.key)
        summary = read(device.summary.gaddr, 1, device.key)[0]
    except MemopError as exc:
        entry["error"] = str(exc)
        return entry
    entry["indicators-set"] = [
        vector for vector, bit in enumerate(device.dsci) if area[bit.gaddr - first] & bit.mask
    ]
    entry["summary-set"] = bool(summary & device.summary.mask)
    return entry
