"""The VMM link: follow QEMU's run state over its QMP socket with qemu.qmp.

:class:`VmmLink` connects a ``qemu.qmp.QMPClient`` to QEMU's QMP socket and
turns what it hears into calls on a :class:`VmmHooks` (the daemon):

- ``STOP`` / ``RESUME`` (and ``query-status`` at every connect): hold
  notifications while the guest is stopped, when configured;
- ``MIGRATION`` with an active status: hold shared-RAM writes, which
  QEMU's dirty tracking would not see, until it completes, fails or is
  cancelled;
- ``RESET``: clear adapter state (suppression);
- ``SHUTDOWN`` and a lost connection: hold, then, after a grace period
  without QEMU, refuse notifications with a clear error; reconnect with
  exponential backoff and accept again when QEMU is back (after the hooks'
  ``attached`` re-learned what a new QEMU changed, e.g. its RAM file).

It also answers two questions for the daemon: where the guest's RAM file is
(:meth:`VmmLink.ram_path`, ``qom-get`` of ``mem-path``) and what the storage
keys are (:meth:`VmmLink.storage_keys`, ``dump-skeys``, parsed by
:func:`parse_skeys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from typing import Any, Protocol

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from ..config import VmmConfig

__all__ = ["VmmHooks", "VmmLink", "parse_skeys"]

log = logging.getLogger(__name__)

EVENTS = ("STOP", "RESUME", "RESET", "SHUTDOWN", "MIGRATION")
_MIGRATING = {"setup", "active", "postcopy-active", "pre-switchover", "device", "wait-unplug"}
_SKEY = re.compile(r"^\s*page=([0-9a-fA-F]+):\s*key\((\d+)\)")


class VmmHooks(Protocol):
    """What the link asks of the daemon."""

    def hold(self, reason: str) -> None:
        """Stop applying notifications for ``reason`` (they stay pending)."""

    def release(self, reason: str) -> None:
        """``reason`` no longer holds notifications."""

    def unavailable(self, reason: str) -> None:
        """Fail pending and new notifications: the guest is gone."""

    def available(self) -> None:
        """The guest is back."""

    def reset(self) -> None:
        """The guest was reset: clear adapter state."""

    def vmm_state(self, status: str, data: dict[str, Any]) -> None:
        """Report a state change (the VMM_STATE event)."""

    async def attached(self) -> None:
        """Connected (again), before notifications are accepted: re-learn what a
        new QEMU may have changed (its RAM file).  An exception drops the
        connection; the link tries again."""


def parse_skeys(text: str) -> dict[int, int]:
    """Parse QEMU's ``dump-skeys`` output into {page number: storage key byte}.

    Lines look like ``page=080: key(54) => ACC=3, FP=0, REF=4, ch=2, reserved=0``
    (page in hex, the key byte in decimal).
    """
    keys: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _SKEY.match(line)
        if not match:
            raise ValueError(f"dump-skeys line {number} is not 'page=HEX: key(DEC) ...': {line!r}")
        key = int(match.group(2))
        if key > 0xFF:
            raise ValueError(f"dump-skeys line {number}: key {key} is not a byte")
        keys[int(match.group(1), 16)] = key
    return keys


class VmmLink:
    """Keeps a QMP connection to QEMU and reports its state to ``hooks``."""

    def __init__(
        self,
        config: VmmConfig,
        hooks: VmmHooks,
        *,
        grace: float = 5.0,
        scratch_dir: str | None = None,
    ) -> None:
        self.config = config
        #: Where QEMU writes dump-skeys files: QEMU must see it too (not a PrivateTmp).
        self.scratch_dir = scratch_dir
        self.hooks = hooks
        self.grace = grace
        self.status = "disconnected"
        self.connects = 0
        self._client: QMPClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._connected = asyncio.Event()

    # ------------------------------------------------------------ lifetime

    def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        self.hooks.hold("disconnected")
        self._arm_grace()
        self._task = asyncio.create_task(self._run(), name="vmm-link")

    async def stop(self) -> None:
        """Disconnect and stop reconnecting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._grace_timer is not None:
            self._grace_timer.cancel()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the link is up; TimeoutError names the socket."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"QEMU's QMP socket {self.config.qmp_socket} did not answer in {timeout:g} s"
            ) from None

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            client = QMPClient("indicators")
            try:
                await client.connect(self.config.qmp_socket)
            except (QMPError, OSError) as exc:
                log.debug("QMP connect to %s failed: %s", self.config.qmp_socket, exc)
                if not self.config.reconnect and self.connects:
                    return
                await asyncio.sleep(backoff)
                backoff = min(self.config.reconnect_backoff_cap, backoff * 2)
                continue
            attach_failed = False
            try:
                await self._session(client)
            except (QMPError, OSError, EOFError) as exc:
                log.info("QMP link to %s lost: %s", self.config.qmp_socket, exc)
            except (RuntimeError, ValueError) as exc:
                # attached() failed (no RAM file, a wrong size): keep trying, slower.
                log.error("attaching to QEMU at %s failed: %s", self.config.qmp_socket, exc)
                attach_failed = True
            finally:
                self._client = None
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await client.disconnect()
            if attach_failed:
                await asyncio.sleep(backoff)
                backoff = min(self.config.reconnect_backoff_cap, backoff * 2)
            else:
                backoff = 0.05
            self._set_status("disconnected", {})
            self.hooks.hold("disconnected")
            self._arm_grace()
            if not self.config.reconnect:
                return

    def _arm_grace(self) -> None:
        if self._grace_timer is None:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(
                self.grace, self.hooks.unavailable, f"VMM {self.config.qmp_socket} unreachable"
            )

    async def _session(self, client: QMPClient) -> None:
        with client.listener(names=EVENTS) as listener:
            reply = await client.execute("query-status")
            self._client = client
            self.connects += 1
            await self.hooks.attached()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
            self.hooks.available()
            status = str(reply["status"]) if isinstance(reply, dict) else "unknown"
            self._follow_status(status)
            self.hooks.release("disconnected")
            self._connected.set()
            events = asyncio.create_task(self._events(listener))
            try:
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
            finally:
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events

    async def _events(self, listener: Any) -> None:
        async for event in listener:
            listener.clear()  # the history is unbounded otherwise
            self._on_event(str(event["event"]), dict(event.get("data", {})))

    # -------------------------------------------------------------- events

    def _follow_status(self, status: str) -> None:
        if status == "running":
            self.hooks.release("stopped")
        elif self.config.hold_while_stopped:
            self.hooks.hold("stopped")
        if status in ("inmigrate", "postmigrate", "finish-migrate"):
            self.hooks.hold("migration")
        self._set_status(status, {})

    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        log.info("VMM event %s %s", name, data)
        if name == "STOP":
            if self.config.hold_while_stopped:
                self.hooks.hold("stopped")
            self._set_status("paused", data)
        elif name == "RESUME":
            self.hooks.release("stopped")
            self._set_status("running", data)
        elif name == "RESET":
            self.hooks.reset()
            self._set_status("reset", data)
        elif name == "SHUTDOWN":
            self.hooks.hold("stopped")
            self._set_status("shutdown", data)
        elif name == "MIGRATION":
            if data.get("status") in _MIGRATING:
                self.hooks.hold("migration")
            else:
                self.hooks.release("migration")
            self._set_status(f"migration-{data.get('status', 'unknown')}", data)

    def _set_status(self, status: str, data: dict[str, Any]) -> None:
        self.status = status
        self.hooks.vmm_state(status, data)

    # ------------------------------------------------------------- queries

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on QEMU; RuntimeError when the link is down."""
        if self._client is None:
            raise RuntimeError(f"not connected to QEMU at {self.config.qmp_socket}")
        return await self._client.execute(command, arguments)

    async def ram_path(self) -> str:
        """The guest RAM's backing file: ``mem-path`` of the (first) memory backend."""
        memdevs = await self.execute("query-memdev")
        ids = [m["id"] for m in memdevs if isinstance(m, dict) and m.get("id")]
        if not ids:
            raise RuntimeError("QEMU reports no memory backend with an id (use -object "
                               "memory-backend-file,id=...,share=on)")  # fmt: skip
        for memdev in ids:
            try:
                path = await self.execute(
                    "qom-get", {"path": f"/objects/{memdev}", "property": "mem-path"}
                )
            except QMPError:
                continue  # not a file backend
            if isinstance(path, str) and path:
                return path
        raise RuntimeError(f"none of QEMU's memory backends {ids} has a mem-path")

    async def storage_keys(self) -> dict[int, int] | None:
        """The guest's storage keys from ``dump-skeys``; None when it uses none."""
        directory = tempfile.mkdtemp(prefix="indicators-skeys-", dir=self.scratch_dir)
        os.chmod(directory, 0o770)  # QEMU may run under another uid of the same group
        path = os.path.join(directory, "skeys")
        try:
            await self.execute("dump-skeys", {"filename": path})
            with open(path) as dump:
                return parse_skeys(dump.read())
        except QMPError as exc:
            if "not using storage keys" in str(exc):
                return None
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.rmdir(directory)
