"""systemd's notification protocol (sd_notify), without libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; the service sends
``READY=1`` when it serves, ``STOPPING=1`` when it begins to stop,
``STATUS=...`` lines, and ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` when
``WatchdogSec=`` is set.  Outside systemd every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["Notifier"]


class Notifier:
    """Sends sd_notify datagrams when ``NOTIFY_SOCKET`` is set."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None
        self._task: asyncio.Task[None] | None = None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields; False outside systemd or on failure."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        """``READY=1`` and start the watchdog pings when asked for."""
        self.send("READY=1", f"STATUS={status}")
        if self.watchdog_interval and self._task is None:
            self._task = asyncio.create_task(self._watchdog(self.watchdog_interval))

    def stopping(self, status: str) -> None:
        """``STOPPING=1``; stop the watchdog pings."""
        self.send("STOPPING=1", f"STATUS={status}")
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
