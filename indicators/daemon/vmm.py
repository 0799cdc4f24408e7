"""The VMM link: follow QEMU's run state over its QMP socket with qemu.qmp.

:class:`VmmLink` connects a ``qemu.qmp.QMPClient`` to QEMU's QMP socket and
turns what it hears into calls on a :class:`VmmHooks` (the daemon):

- ``STOP`` / ``RESUME`` (and ``query-status`` at every connect): hold
  notifications while the guest is stopped, when configured;
- ``MIGRATION`` with an active status: hold shared-RAM writes, which
  QEMU's dirty tracking would not see, until it completes, fails or is
  cancelled;
- ``RESET``: the guest's registrations are void: drop its devices, clear
  adapter state (suppression);
- a reconnect: drop the guest's devices before notifications are accepted
  again (another QEMU's guest registered nothing; the same QEMU's guest may
  have reset while the link was down);
- ``manage_reboot``: at every connect ``set-action`` makes a guest reboot
  pause the VM (``SHUTDOWN`` reason ``guest-reset``) instead of resetting
  it; the hooks then drop the guest's devices and reset and continue the
  VM themselves (``system_reset``, ``cont``); a guest poweroff, paused by
  the same setting, is finished with ``quit`` as QEMU's default would;
- ``SHUTDOWN`` and a lost connection: hold, then, after a grace period
  without QEMU, refuse notifications with a clear error; reconnect with
  exponential backoff and accept again when QEMU is back (after the hooks'
  ``attached`` re-learned what a new QEMU changed, e.g. its RAM file).

It also answers questions for the daemon: who QEMU is (:meth:`VmmLink.peer`,
the kernel's ``SO_PEERCRED`` of the QMP socket: QEMU's pid and uid, which
QEMU cannot lie about), where the guest's RAM file is
(:meth:`VmmLink.ram_path`, ``qom-get`` of ``mem-path``: a name QEMU chose,
opened only through :mod:`indicators.daemon.hostfiles`) and what the storage
keys are (:meth:`VmmLink.storage_keys`, ``dump-skeys`` into a file the
daemon made, parsed by :func:`parse_skeys`).

It logs once per change of the link's state, naming the socket; the
attempts in between are at debug level (qemu.qmp's own connection errors
too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from typing import Any, Protocol

from qemu.qmp import QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from ..config import VmmConfig
from .hostfiles import HostFileError, SkeysDump
from .qmp_session import PeerCredentials

__all__ = ["VmmHooks", "VmmLink", "parse_skeys"]


log = logging.getLogger(__name__)

EVENTS = ("STOP", "RESUME", "RESET", "SHUTDOWN", "MIGRATION")
_MIGRATING = {"setup", "active", "postcopy-active", "pre-switchover", "device", "wait-unplug"}
#: SHUTDOWN reasons that are reset requests QEMU turned into a pause (``manage_reboot``).
_RESET_CAUSES = {"guest-reset", "host-qmp-system-reset"}
_SKEY = re.compile(r"^\s*page=([0-9a-fA-F]+):\s*key\((\d+)\)")


class _Quiet(logging.Filter):
    """qemu.qmp logs every failed connection attempt at ERROR; the link retries them
    and reports the state change itself, so they go down to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and record.levelno < logging.CRITICAL:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # The logger let it through at its old level: drop it unless DEBUG is on.
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


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
        """The guest was reset: drop its devices, clear adapter state."""

    def replaced(self, reason: str) -> None:
        """Connected again: ``"qemu-replaced"`` (another QEMU) or ``"vmm-reconnected"``
        (the same one, whose guest may have reset unseen): drop the guest's devices."""

    def rebooting(self) -> None:
        """The guest rebooted and QEMU paused it (``manage_reboot``): drop its devices,
        then reset and continue the VM."""

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
        if not match:  # the contents are not quoted: the file may not be what QEMU wrote
            raise ValueError(f"dump-skeys line {number} is not 'page=HEX: key(DEC) ...'")
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
        self._reported = ""  # the link state last logged (logged once per change)
        self._qemu_pid: int | None = None  # the QEMU of the last connection
        #: Whether QEMU accepted to pause on a guest reboot (``manage_reboot``).
        self.owns_reboot = False
        self._reset_seen = asyncio.Event()
        self._quits: set[asyncio.Task[None]] = set()
        #: Seconds a dump-skeys (the command and the read) may take.
        self.skeys_timeout = 10.0

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

    def _report(self, state: str, level: int, message: str, *args: object) -> None:
        """Log ``message`` when the link enters ``state``; the same state again is debug."""
        if state == self._reported:
            level = logging.DEBUG
        self._reported = state
        log.log(level, message, *args)

    async def _run(self) -> None:
        backoff = 0.05
        path = self.config.qmp_socket
        while True:
            client = QMPClient("indicators")
            client.logger.addFilter(_Quiet())
            try:
                await client.connect(path)
            except (QMPError, OSError) as exc:
                self._report(
                    "unreachable",
                    logging.WARNING,
                    "QEMU's QMP socket %s is unreachable (%s); retrying every %g s at most",
                    path,
                    getattr(exc, "exc", exc),  # qemu.qmp's ConnectError wraps the cause
                    self.config.reconnect_backoff_cap,
                )
                if not self.config.reconnect and self.connects:
                    return
                await asyncio.sleep(backoff)
                backoff = min(self.config.reconnect_backoff_cap, backoff * 2)
                continue
            attach_failed = False
            try:
                await self._session(client)
            except (RuntimeError, ValueError, HostFileError) as exc:
                # attached() failed (no usable RAM file): keep trying, slower.
                self._report("attach-failed", logging.ERROR,
                             "attaching to QEMU at %s failed: %s", path, exc)  # fmt: skip
                attach_failed = True
            except (QMPError, OSError, EOFError) as exc:
                self._report("lost", logging.WARNING, "QMP link to %s lost: %s", path, exc)
            else:
                self._report("lost", logging.WARNING, "QMP link to %s lost: QEMU hung up", path)
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
            peer = self.peer()
            pid = peer.pid if peer is not None else None
            if self.connects > 1:
                # Before anything is released.  The same QEMU may have reset its guest
                # while the link was down (a RESET nobody heard): its devices go too.
                same = pid is not None and pid == self._qemu_pid
                self.hooks.replaced("vmm-reconnected" if same else "qemu-replaced")
            self._qemu_pid = pid
            if self.config.manage_reboot:
                await self._own_reboot(client)
            await self.hooks.attached()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
            self.hooks.available()
            status = str(reply["status"]) if isinstance(reply, dict) else "unknown"
            self._follow_status(status)
            if self.owns_reboot and status == "shutdown":
                # Paused by our set-action while nobody listened: a reboot or a poweroff,
                # QEMU no longer says which.  Leave the decision to a person.
                log.warning("QEMU at %s is paused after a guest reboot or poweroff the daemon "
                            "missed; guest-reset restarts the guest, quit ends it",
                            self.config.qmp_socket)  # fmt: skip
            self.hooks.release("disconnected")
            self._connected.set()
            self._report("connected", logging.INFO, "connected to QEMU at %s (%s)",
                         self.config.qmp_socket, status)  # fmt: skip
            events = asyncio.create_task(self._events(listener))
            try:
                while client.runstate == Runstate.RUNNING:
                    await client.runstate_changed()
            finally:
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events

    async def _own_reboot(self, client: QMPClient) -> None:
        """Make a guest reboot pause the VM (QEMU >= 6.0), so the daemon resets it."""
        self.owns_reboot = False
        try:
            await client.execute("set-action", {"reboot": "shutdown", "shutdown": "pause"})
            self.owns_reboot = True
        except QMPError as exc:
            # An older QEMU: the RESET event still drops the guest's devices, only later.
            log.error("manage_reboot: QEMU at %s refused set-action (%s); a guest reboot is "
                      "seen only by its RESET event", self.config.qmp_socket, exc)  # fmt: skip

    def _finish_shutdown(self) -> None:
        async def quit_qemu() -> None:
            try:
                await self.execute("quit")
            except (QMPError, RuntimeError, EOFError, OSError) as exc:
                log.warning("quitting QEMU at %s after the guest's shutdown failed: %s",
                            self.config.qmp_socket, exc)  # fmt: skip

        task = asyncio.get_running_loop().create_task(quit_qemu())
        self._quits.add(task)
        task.add_done_callback(self._quits.discard)

    async def _events(self, listener: Any) -> None:
        async for event in listener:
            # The history is unbounded otherwise.  Not clear(): that empties the queue
            # and drops the events that arrived together with this one (a guest
            # reboot's STOP and SHUTDOWN); qemu.qmp has no public way to trim it.
            listener._history.clear()
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
            self._reset_seen.set()
            self.hooks.reset()
            self._set_status("reset", data)
        elif name == "SHUTDOWN":
            self.hooks.hold("stopped")
            self._set_status("shutdown", data)
            # Owning the reboot, every reset request arrives as a paused shutdown: the
            # guest's own, and a system_reset someone else sent.
            if self.owns_reboot and data.get("reason") in _RESET_CAUSES:
                self.hooks.rebooting()
            elif self.owns_reboot and data.get("guest"):
                # The guest powered off: ``shutdown: "pause"`` (set for the reboots) kept
                # QEMU alive; finish it as QEMU's default action would have.
                self._finish_shutdown()
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

    async def reset_and_continue(self, timeout: float = 10.0) -> None:
        """Reset the VM (``system_reset``, waiting for its RESET) and continue it (``cont``).

        While the link owns the reboot, QEMU turns every reset request into a
        shutdown (that is what ``reboot: "shutdown"`` means, for ``system_reset``
        too), so the reset action is put back for this one reset; the VM is
        paused or its guest devices are gone by then.  RuntimeError says what
        QEMU refused.
        """
        self._reset_seen.clear()
        try:
            if self.owns_reboot:
                await self.execute("set-action", {"reboot": "reset"})
            try:
                await self.execute("system_reset")
                # The reset happens in QEMU's main loop after the reply; cont before it
                # would be refused ("Resetting the Virtual Machine is required").
                await asyncio.wait_for(self._reset_seen.wait(), timeout)
            finally:
                if self.owns_reboot:
                    await self.execute("set-action", {"reboot": "shutdown"})
            await self.execute("cont")
        except QMPError as exc:
            raise RuntimeError(f"QEMU at {self.config.qmp_socket} refused: {exc}") from None
        except TimeoutError:
            raise RuntimeError(
                f"QEMU at {self.config.qmp_socket} sent no RESET within {timeout:g} s"
            ) from None

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

    def peer(self) -> PeerCredentials | None:
        """QEMU's pid and uid as the kernel saw them (None while disconnected)."""
        client = self._client
        writer = getattr(client, "_writer", None)  # qemu.qmp's own send_fd_scm reads it too
        sock = writer.transport.get_extra_info("socket") if writer is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            return PeerCredentials.of(sock)
        except OSError:
            return None

    async def storage_keys(self, pages: int) -> dict[int, int] | None:
        """The guest's storage keys from ``dump-skeys``; None when it uses none.

        ``pages`` (the guest's 4 KiB pages) caps what is read back.  QEMU
        writes into a file the daemon created and reads back through its own
        fd (:class:`~indicators.daemon.hostfiles.SkeysDump`); the command and
        the read together take at most :attr:`skeys_timeout` seconds.
        """
        peer = self.peer()
        with SkeysDump(self.scratch_dir, pages, peer.uid if peer else None) as dump:
            try:
                async with asyncio.timeout(self.skeys_timeout):
                    await self.execute("dump-skeys", {"filename": dump.path})
                    text = await asyncio.to_thread(dump.read)
            except QMPError as exc:
                if "not using storage keys" in str(exc):
                    return None
                raise
            except TimeoutError:
                raise TimeoutError(
                    f"dump-skeys through {self.config.qmp_socket} took over "
                    f"{self.skeys_timeout:g} s"
                ) from None
        return parse_skeys(text)
