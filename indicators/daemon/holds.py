"""Why notifications are held: one set of reasons, one engine that follows it.

The VMM link holds notifications while the guest is stopped (``"stopped"``),
migrating (``"migration"``) or QEMU is unreachable (``"disconnected"``);
the engine applies them again only once no reason is left.  Holds taken
before the engine exists (the link starts first) apply when it is bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from ..engine import Engine

__all__ = ["Holds"]

log = logging.getLogger(__name__)


class Holds:
    """The reasons notifications are held, and the engine that obeys them."""

    def __init__(self) -> None:
        self.reasons: set[str] = set()
        self.engine: Engine | None = None

    def bind(self, engine: Engine) -> None:
        """From now on ``engine`` follows the holds (those taken already apply at once)."""
        self.engine = engine
        for reason in sorted(self.reasons):
            engine.pause()
            log.info("holding notifications: %s", reason)

    def hold(self, reason: str) -> None:
        """Hold notifications for ``reason``."""
        self.reasons.add(reason)
        if self.engine is not None:
            self.engine.pause()

    def release(self, reason: str) -> None:
        """Drop ``reason``; resume when nothing holds any more."""
        self.reasons.discard(reason)
        if not self.reasons and self.engine is not None:
            self.engine.resume()

    def __bool__(self) -> bool:
        return bool(self.reasons)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.reasons))
