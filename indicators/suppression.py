"""Adapter-interruption suppression: the per-ISC state and the only ways to change it.

For a suppressible adapter, the guest re-arms its ISC with SIC
(``set-ais-mode``): mode ALL delivers every interrupt; mode SINGLE delivers
one and then suppresses the ISC until the next re-arm.  KVM keeps this as two
masks over the ISCs (``simm``: single mode set; ``nimm``: no interrupt
allowed now), bit ``0x80 >> isc``.  :class:`Suppression` holds them;
the engine asks it before each interrupt (:meth:`Suppression.admit`), the
commands and the VMM hooks change it through its verbs.
"""

from __future__ import annotations

from .abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE, isc_mask

__all__ = ["Suppression"]


class Suppression:
    """The ``simm`` / ``nimm`` masks of one guest's ISCs."""

    __slots__ = ("nimm", "simm")

    def __init__(self) -> None:
        self.simm = 0
        self.nimm = 0

    def set_mode(self, isc: int, mode: int) -> None:
        """The guest's SIC re-arm: ALL (0) clears simm and nimm, SINGLE (1) sets simm."""
        if mode not in (KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE):
            raise ValueError(f"AIS mode {mode} is neither ALL (0) nor SINGLE (1)")
        mask = isc_mask(isc)
        self.nimm &= ~mask
        if mode == KVM_S390_AIS_MODE_ALL:
            self.simm &= ~mask
        else:
            self.simm |= mask

    def admit(self, isc: int) -> bool:
        """Whether an interrupt for ``isc`` is delivered now; in SINGLE mode the one
        delivered suppresses the next ones (until a re-arm)."""
        mask = isc_mask(isc)
        if self.nimm & mask:
            return False
        if self.simm & mask:
            self.nimm |= mask
        return True

    def reset(self, isc: int) -> None:
        """Clear ``isc``'s state (``reset-adapter``)."""
        mask = isc_mask(isc)
        self.simm &= ~mask
        self.nimm &= ~mask

    def reset_all(self) -> None:
        """Clear every ISC's state, as a FLIC reset (a guest reset) does."""
        self.simm = self.nimm = 0

    def state(self, isc: int) -> tuple[bool, bool]:
        """``(simm, nimm)`` of ``isc``."""
        mask = isc_mask(isc)
        return bool(self.simm & mask), bool(self.nimm & mask)
