"""Process settings that keep a running daemon's notify latency short.

Two costs that land on a notification without being its own work:

- a full garbage collection walks every container object of the process;
  the model, engine and server made at start-up (tens of thousands of
  objects, about 8 ms a pass for a small config) live as long as the
  daemon, so :func:`freeze_long_lived` moves them out of the collector's
  sight (``gc.freeze``), and again after a reload;
- the Prometheus endpoint serves scrapes from its own thread, which holds
  the GIL for the whole Python part of a scrape (about 30 ms for 1,000
  adapters); by default the loop waits up to 5 ms per hand-over, and
  :func:`gil_handback` shortens that while the endpoint runs.

Only ``Service.run`` (the ``indicators run`` process) uses these: a Service
started inside someone else's process leaves that process's settings alone.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator

__all__ = ["SWITCH_INTERVAL", "freeze_long_lived", "gil_handback"]

#: The GIL switch interval (seconds) while another thread may hold the GIL.
SWITCH_INTERVAL = 0.0005


def freeze_long_lived() -> None:
    """Keep every object alive now out of future collections.

    What was frozen before goes back to the collector first, so that what a
    reload replaced (and any reference cycle through it) is freed, not
    pinned for the life of the process.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def gil_handback(enabled: bool) -> Iterator[None]:
    """While inside, a thread holding the GIL hands it back within :data:`SWITCH_INTERVAL`."""
    before = sys.getswitchinterval()
    if enabled:
        sys.setswitchinterval(min(before, SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
