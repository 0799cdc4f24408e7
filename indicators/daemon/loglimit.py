"""Rate-limited logging: a line any peer can provoke must not fill the disk.

A refused peer, a failing notification or a failing storage-key refresh
logs through a :class:`LogLimiter`: at most ``burst`` lines per ``period``
seconds for one key, then silence, then one line that says how many were
left out.

    limiter = LogLimiter(burst=5, period=60.0)
    limiter.warning(log, "refused-peer", "refused control client uid %d", uid)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

__all__ = ["LogLimiter"]


@dataclass
class _Window:
    start: float
    lines: int = 0
    dropped: int = 0


class LogLimiter:
    """At most ``burst`` lines per key in each ``period`` (monotonic seconds)."""

    def __init__(self, burst: int = 5, period: float = 60.0, max_keys: int = 1024) -> None:
        self.burst = burst
        self.period = period
        self._max_keys = max_keys  # the keys themselves must not grow without bound
        self._windows: dict[str, _Window] = {}
        #: Lines left out so far, over every key.
        self.dropped = 0

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether a line for ``key`` may be written now, and how many were dropped before."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.period:
            dropped = window.dropped if window is not None else 0
            if window is None and len(self._windows) >= self._max_keys:
                self._windows.clear()
            self._windows[key] = _Window(now, 1)
            return True, dropped
        if window.lines < self.burst:
            window.lines += 1
            return True, 0
        window.dropped += 1
        self.dropped += 1
        return False, 0

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its rate; True if logged."""
        allowed, dropped = self.allow(key)
        if not allowed:
            return False
        if dropped:
            msg += " (%d similar lines left out)"
            args = (*args, dropped)
        logger.log(level, msg, *args)
        return True

    def warning(self, logger: logging.Logger, key: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logger, logging.WARNING, key, msg, *args)


class RepeatFilter(logging.Filter):
    """A logging filter: a line repeated (same logger, format and device) is limited.

    Installed on a logger that logs per event a peer can provoke (the
    engine's ``notify failed``), so a flood is a few lines and a count.
    """

    def __init__(self, limiter: LogLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = f"{record.name}:{record.msg}:{getattr(record, 'device', '')}"
        allowed, dropped = self.limiter.allow(key)
        if allowed and dropped:
            record.msg = f"{record.msg} (%d similar lines left out)"
            record.args = (*(record.args or ()), dropped)
        return allowed


def limit_repeats(logger: logging.Logger, limiter: LogLimiter) -> None:
    """Install a :class:`RepeatFilter` on ``logger`` unless one is there."""
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter(limiter))
