"""The rig's root error and the errors of a running guest.

Every error of :mod:`indicators.testing` is a :class:`RigError` (the
toolchain's, :class:`~indicators.testing.build.ToolsMissingError` and
:class:`~indicators.testing.build.BuildError`, too); each carries what
caused it as fields (QEMU's log, the guest's state word, its program-check
report), so callers branch on types and fields, never on message text.
"""

from __future__ import annotations

from indicators.testing.guest import ParamError, ProgramCheck

__all__ = [
    "BadParametersError",
    "BootError",
    "GuestProgramCheck",
    "GuestTimeoutError",
    "RigError",
]


class RigError(Exception):
    """Root of the rig's errors."""


class BootError(RigError):
    """QEMU exited or the guest never ran; ``log`` is QEMU's output."""

    def __init__(self, reason: str, log: str = "") -> None:
        self.log = log
        super().__init__(f"{reason}\nQEMU output:\n{log}" if log else reason)


class GuestTimeoutError(RigError):
    """The guest did not reach a state in time (``state`` is its state word)."""

    def __init__(self, what: str, timeout: float, state: int) -> None:
        self.state = state
        super().__init__(f"guest did not {what} within {timeout:g} s (state {state})")


class BadParametersError(RigError):
    """The guest rejected the parameter block: ``reason`` and ``area`` index."""

    def __init__(self, reason: ParamError, area: int) -> None:
        self.reason = reason
        self.area = area
        super().__init__(f"guest rejected the parameter block: {reason.name} (area {area})")


class GuestProgramCheck(RigError):
    """The guest took a program check; ``report`` is what it wrote."""

    def __init__(self, report: ProgramCheck) -> None:
        self.report = report
        super().__init__(f"guest {report}")
