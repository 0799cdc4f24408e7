"""Opt-in faults for the emulation: transient errors, forced protection, fault-in errors.

A :class:`FaultInjector` is consulted by :class:`~indicators.memop.EmulatedBackend`
(and so by the KVM fake built on it) at the points where a kernel can fail:

- ``-EAGAIN`` on a cmpxchg (by default of sizes 1 and 2, the only sizes a
  kernel makes transient), at random with ``eagain_probability``;
- program exception 4 on every store into a ``protected`` range, whatever
  the key;
- an error from the page fault-in that the 7.0 cmpxchg does before the
  exchange (``kvm_s390_faultin_gfn()``): ``-EINTR`` at random with
  ``eintr_probability``, or the errnos queued in ``faultin_errors`` (each
  used once, first first).  A 6.3 kernel has no such step, so these fire
  only on an emulation of generation ``"7.0"``.

``injected`` counts what fired, by name.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

__all__ = ["FAULTIN_ERRNOS", "FaultInjector"]

#: What the 7.0 fault-in can fail with besides addressing and a read-only
#: memslot: a pending fatal signal, no memory, any other host fault.
FAULTIN_ERRNOS = frozenset({errno.EINTR, errno.ENOMEM, errno.EFAULT})


def _counters() -> dict[str, int]:
    return {"eagain": 0, "protection": 0, "eintr": 0, "enomem": 0, "efault": 0}


@dataclass
class FaultInjector:
    """Opt-in faults: random ``-EAGAIN``, forced protection, 7.0 fault-in errors."""

    eagain_probability: float = 0.0
    eagain_sizes: frozenset[int] = frozenset({1, 2})
    protected: list[tuple[int, int]] = field(default_factory=list)
    seed: int | None = None
    eintr_probability: float = 0.0
    faultin_errors: list[int] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=_counters)

    def __post_init__(self) -> None:
        for name in ("eagain_probability", "eintr_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} is outside 0..1")
        for code in self.faultin_errors:
            if code not in FAULTIN_ERRNOS:
                raise ValueError(
                    f"faultin_errors: {errno.errorcode.get(code, code)} is not an error the "
                    f"fault-in returns (EINTR, ENOMEM, EFAULT)"
                )
        self._random = random.Random(self.seed)

    def protect(self, start: int, size: int) -> None:
        """Force protection on ``[start, start + size)``."""
        self.protected.append((start, start + size))

    def is_protected(self, gaddr: int, size: int) -> bool:
        """Whether a store to ``[gaddr, gaddr + size)`` touches a protected range."""
        end = gaddr + size
        return any(start < end and gaddr < stop for start, stop in self.protected)

    def store_protected(self, gaddr: int, size: int) -> bool:
        """Decide (and count) a forced protection fault for a store."""
        if self.protected and self.is_protected(gaddr, size):
            self.injected["protection"] += 1
            return True
        return False

    def transient(self, size: int) -> bool:
        """Decide (and count) an injected ``-EAGAIN`` for a cmpxchg of ``size``."""
        if (
            self.eagain_probability
            and size in self.eagain_sizes
            and self._random.random() < self.eagain_probability
        ):
            self.injected["eagain"] += 1
            return True
        return False

    def faultin(self) -> int | None:
        """Decide (and count) an error of the 7.0 fault-in: its errno, or None."""
        if self.faultin_errors:
            code = self.faultin_errors.pop(0)
        elif self.eintr_probability and self._random.random() < self.eintr_probability:
            code = errno.EINTR
        else:
            return None
        self.injected[errno.errorcode[code].lower()] += 1
        return code
