"""The daemon: wires the config's backend, adapters and engine to its sources.

:class:`Service` owns one guest's engine and everything that feeds it:

- the control socket (:class:`~indicators.daemon.qmp_server.QmpServer` with
  the commands of :mod:`indicators.daemon.commands`);
- attached eventfds (:class:`~indicators.daemon.eventfds.EventfdSources`);
- the VMM link (:class:`~indicators.daemon.vmm.VmmLink`), which holds
  notifications while the guest is stopped or migrating, refuses them
  while QEMU is gone, and (``ram = "auto"``) maps the RAM of a QEMU
  restarted behind the same socket;
- systemd notification and signals: SIGTERM/SIGINT stop gracefully (stop
  accepting, apply every pending notification, exit), SIGHUP reloads the
  config's devices (a diff of the live set) and retry policy.

The live device set is a :class:`~indicators.daemon.registry.DeviceRegistry`
the engine, the write guard, the eventfds and the commands share; the holds
are a :class:`~indicators.daemon.holds.Holds`.  A guest reset (the RESET
event, a new QEMU, a guest reboot QEMU hands over with ``manage_reboot``,
the ``guest-reset`` command) removes the guest-lifetime devices first.

    service = Service(load_config("guest.toml"))
    await service.run()      # until SIGTERM, SIGINT or the quit command
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from .. import __version__
from ..adapters import AdapterModel, build_model
from ..config import Config, ConfigError, load_config
from ..engine import Engine, EngineEvent
from ..errors import ResourceError
from ..metrics import EngineCollector, serve_metrics
from .commands import register_commands
from .eventfds import EventfdSources
from .guesthooks import GuestHooks
from .guestram import GuestRam, load_storage_keys, refresh_storage_keys_forever
from .holds import Holds
from .libvirt import resolve as resolve_libvirt
from .loglimit import LogLimiter, limit_repeats
from .privileges import drop_to, forbid_new_privileges
from .qmp_server import PeerCredentials, QmpServer
from .queries import describe_adapters, describe_stats
from .registry import DeviceRegistry, RegistryError
from .reloadlog import device_changes
from .reports import FailureBatch
from .sdnotify import Notifier
from .vmm import VmmLink
from .wiring import Wiring, open_backend

__all__ = ["Service"]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/indicators/indicators.sock"


class Service:
    """One guest's indicator service."""

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        control = config.control
        #: The live device set (config devices and those added at run time).
        self.registry = DeviceRegistry(
            build_model(config),
            config.backend.memory_size,
            ranges=control.device_ranges if control else None,
            announce=self._announce,
        )
        self.wiring: Wiring | None = None
        self.engine: Engine
        self.eventfds: EventfdSources
        self.server: QmpServer | None = None
        self.vmm: VmmLink | None = None
        self.notifier = Notifier()
        self.holds = Holds()
        #: What the VMM link's news does (holds, resets, reboots).
        self.hooks = GuestHooks(
            self.holds, self.registry, report=self._announce, on_attached=self._attached
        )
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._skeys_task: asyncio.Task[None] | None = None
        self._failed: dict[str, FailureBatch] = {}  # this batch's failures, by device
        self._ram: GuestRam | None = None  # ram = "auto": QEMU's RAM, as it hands it over
        self._metrics: Any = None
        #: The metrics endpoint's port (useful with port 0), once started.
        self.metrics_port: int | None = None

    @property
    def model(self) -> AdapterModel:
        """The live adapter model (the registry's)."""
        return self.registry.model

    @property
    def socket_path(self) -> str:
        """Where the control socket listens."""
        return self.config.control.socket if self.config.control else DEFAULT_SOCKET

    # ------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Open the backend, start the engine, the VMM link and the control socket.

        All or nothing: when a step fails, what the earlier ones opened is
        closed again (and a RAM file the backend created is removed) before
        the error propagates.
        """
        try:
            await self._start()
        except BaseException:
            wiring = self.wiring
            try:
                await self.stop(grace=0)
            finally:
                if wiring is not None:
                    wiring.discard()
            raise

    async def _start(self) -> None:
        vmm_config, backend_config = resolve_libvirt(self.config)  # [vmm] libvirt = "NAME"
        if vmm_config is not None:
            scratch = os.path.dirname(os.path.abspath(self.socket_path))
            self.vmm = self.hooks.vmm = VmmLink(
                vmm_config, self.hooks, grace=vmm_config.disconnect_grace, scratch_dir=scratch
            )
            self.vmm.start()
        if self.vmm is not None and getattr(self.config.backend, "ram", None) == "auto":
            # QEMU names the RAM file: open it with no more rights than run_as has.
            self._drop_privileges()
            self._ram = GuestRam(backend_config, self.vmm)
            await self.vmm.wait_connected(30.0)
            mapped = await self._ram.map()
            assert mapped is not None  # nothing was mapped before
            self.wiring = mapped[0]
        else:
            self.wiring = open_backend(backend_config)
            self._drop_privileges()
        # One failing notification per vector, thousands a second: a few lines and a count.
        limit_repeats(logging.getLogger(Engine.__module__), LogLimiter(burst=10, period=60.0))
        self.engine = Engine(
            self.model, self.registry.confine(self.wiring.backend), self.wiring.sink,
            self.config.retry,
        )  # fmt: skip
        self.engine.subscribe(self._on_engine_event)
        self.holds.bind(self.engine)
        control = self.config.control
        self.eventfds = EventfdSources(
            self.engine,
            control.max_eventfds if control else 1024,
            control.max_eventfds_per_client if control else 256,
            managers=frozenset(control.manager_uids) if control and control.manager_uids else None,
        )
        self.registry.bind(self.engine, self.eventfds)
        self.server = QmpServer(
            self.socket_path,
            mode=control.mode if control else 0o600,
            version=_version_tuple(),
            package=f"indicators {__version__} (kernel {self.wiring.backend.generation or '?'})",
            max_message=control.max_message if control else 65536,
            max_pending=control.max_pending if control else 8,
            max_rate=control.max_rate if control else None,
            allowed=self._admits,
            max_sessions=control.max_clients if control else 128,
            max_sessions_per_uid=control.max_clients_per_uid if control else 64,
            max_fds=control.max_fds_per_client if control else 16,
            negotiation_timeout=control.negotiation_timeout if control else 30.0,
            idle_timeout=control.idle_timeout if control else None,
        )
        register_commands(self.server, self)
        try:
            await self.server.start()
        except OSError as exc:
            raise ResourceError.from_os_error(
                "control socket", self.socket_path, exc, action="create"
            ) from None
        if self.config.metrics is not None:
            collector = EngineCollector(
                lambda: self.engine.stats, lambda: self.engine.model.adapters
            )
            address, port = self.config.metrics.address, self.config.metrics.port
            try:
                self._metrics, self.metrics_port = serve_metrics(collector, address, port)
            except OSError as exc:
                where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
                raise ResourceError.from_os_error(
                    "metrics endpoint", where, exc, action="bind"
                ) from None
            log.info(
                "metrics on http://%s:%d/metrics", self.config.metrics.address, self.metrics_port
            )
        if self.vmm is not None and self.config.vmm and self.config.vmm.skeys_refresh:
            self._skeys_task = asyncio.create_task(
                refresh_storage_keys_forever(
                    self.vmm,
                    lambda: self.wiring.backend if self.wiring else None,
                    self.config.vmm.skeys_refresh,
                )
            )
        self.notifier.ready(f"serving {len(self.model.devices)} devices on {self.socket_path}")
        log.info("serving %d devices on %s", len(self.model.devices), self.socket_path)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, apply every pending notification, then close everything."""
        self.notifier.stopping("finishing pending notifications")
        engine = self._engine()
        if engine is not None:
            self.eventfds.stop_reading()
            if engine.paused and engine.unavailable is None:
                engine.resume()  # what was acknowledged as accepted must land before exit
        if self.server is not None:
            # No new clients or commands; in-flight notifies finish and get their replies.
            await self.server.stop(grace)
        if engine is not None:
            await self.eventfds.drain()
            await engine.drain()
            self.eventfds.close()
        if self._skeys_task is not None:
            self._skeys_task.cancel()
        await self.hooks.close()
        if self.vmm is not None:
            await self.vmm.stop()
        if self._metrics is not None:
            server, thread = self._metrics
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._metrics = None
        if self.wiring is not None:
            self.wiring.close()
            self.wiring = None

    def _drop_privileges(self) -> None:
        if self.config.run_as is not None:
            uid, gid = drop_to(self.config.run_as.user, self.config.run_as.group)
            log.info("running as uid %d gid %d", uid, gid)

    def _engine(self) -> Engine | None:
        """The engine once :meth:`start` made it (VMM hooks may come earlier)."""
        return getattr(self, "engine", None)

    def request_stop(self, reason: str) -> None:
        """Ask :meth:`run` to stop (signal handlers and the quit command use this)."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self, *, no_new_privs: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT/quit, then stop gracefully.

        Once started (every privileged thing done), the process forbids
        itself new privileges (``no_new_privs``; irreversible, so an
        in-process caller such as a test may turn it off).
        """
        loop = asyncio.get_running_loop()
        await self.start()
        if no_new_privs:
            forbid_new_privileges()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self._stop.wait()
            log.info("stopping (%s)", self._stop_reason)
        finally:
            # No reload while stopping.  A second SIGTERM (a hook's after a manager's, an
            # impatient operator) must not kill the drain or the exit after it: the
            # SIGTERM/SIGINT handlers stay until the loop closes (asyncio removes them).
            loop.remove_signal_handler(signal.SIGHUP)
            await self.stop()

    # ------------------------------------------------------------ reload

    def reload(self) -> str:
        """Re-read the config; apply its devices as a diff of the live set (and its retry
        policy), or keep everything and say why."""
        if self.config_path is None:
            return self._reload_refused("the config did not come from a file")
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return self._reload_refused(str(exc))
        for section in ("backend", "control", "vmm"):
            if getattr(new, section) != getattr(self.config, section):
                return self._reload_refused(f"the [{section}] section changed; restart instead")
        before = build_model(self.config)
        try:
            self.registry.apply_config(new.devices)
        except RegistryError as exc:
            return self._reload_refused(str(exc))
        self.engine.policy = new.retry
        self.config = new
        for line in device_changes(before, build_model(new)):
            log.info("reload: %s", line)
        log.info("config reloaded: %d devices", len(self.model.devices))
        return "reloaded"

    def _reload_refused(self, why: str) -> str:
        log.warning("config reload refused, keeping the old config: %s", why)
        return f"refused: {why}"

    # ---------------------------------------------------- for the commands

    async def guest_reset(self, reason: str) -> list[str]:
        """Drop the guest's devices, then reset and continue the VM (see :class:`GuestHooks`)."""
        return await self.hooks.guest_reset(reason)

    def may_manage(self, peer: PeerCredentials) -> bool:
        """Whether ``peer`` may add and remove devices and reset the guest."""
        control = self.config.control
        uids = set(control.manager_uids) if control else set()
        gids = set(control.manager_gids) if control else set()
        if not uids and not gids:
            uids = {0, os.getuid()}
        return peer.uid in uids or peer.gid in gids

    def describe_adapters(self) -> list[dict[str, Any]]:
        """``query-adapters``."""
        return describe_adapters(self.engine, self.registry)

    def describe_stats(self) -> dict[str, Any]:
        """``query-stats``."""
        generation = self.wiring.backend.generation if self.wiring else None
        return describe_stats(self.engine, self.eventfds, self.holds, self.vmm, generation)

    # ---------------------------------------------------- a new QEMU

    async def _attached(self) -> None:
        """QEMU (re)connected: with ``ram = "auto"``, map its RAM file if it is a new one.

        A QEMU restarted behind the same QMP socket has a new RAM file (or a
        new file under the old name); writing into the old mapping would
        reach nobody.  The new guest also starts with fresh suppression state.
        """
        vmm = self.config.vmm
        if self.wiring is None or self._ram is None or vmm is None:
            return
        mapped = await self._ram.map()  # HostFileError: the link tries again
        if mapped is None:
            return
        new, path = mapped
        old, self.wiring = self.wiring, Wiring(new.backend, self.wiring.sink, new.fds)
        engine = self._engine()
        if engine is not None:
            engine.backend = self.registry.confine(new.backend)
            engine.reset_suppression()
        old.close()
        log.info("QEMU restarted: guest RAM re-mapped from %s", path)
        if vmm.skeys_refresh:
            await self.refresh_storage_keys()

    async def refresh_storage_keys(self) -> int:
        """Load the guest's storage keys from ``dump-skeys`` into the emulated backend."""
        if self.vmm is None:
            return 0
        return await load_storage_keys(self.vmm, self.wiring.backend if self.wiring else None)

    # ------------------------------------------------------------ reports

    def _on_engine_event(self, event: EngineEvent) -> None:
        if self.server is None:
            return
        adapter = event.adapter
        if event.kind == "interrupt":
            self.server.broadcast_event(
                "ADAPTER_INTERRUPT", {"adapter": adapter.id, "isc": adapter.isc}
            )
        elif event.kind == "suppressed":
            self.server.broadcast_event(
                "INTERRUPT_SUPPRESSED", {"adapter": adapter.id, "isc": adapter.isc}
            )
        elif event.error is not None:
            # One NOTIFY_FAILED per device and batch (what fails together is
            # reported in one event when the engine's flush step is over).
            if not self._failed:
                asyncio.get_running_loop().call_soon(self._report_failures)
            batch = self._failed.get(event.error.device)
            if batch is None:
                batch = self._failed[event.error.device] = FailureBatch()
            batch.add(event.error)

    def _announce(self, name: str, data: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.broadcast_event(name, data)

    def _report_failures(self) -> None:
        failed, self._failed = self._failed, {}
        if self.server is None:
            return
        for batch in failed.values():
            self.server.broadcast_event("NOTIFY_FAILED", batch.summary())

    def _admits(self, peer: PeerCredentials) -> bool:
        control = self.config.control
        uids = set(control.allowed_uids) if control and control.allowed_uids else set()
        gids = set(control.allowed_gids) if control and control.allowed_gids else set()
        if not uids and not gids:
            uids = {0, os.getuid()}
        return peer.uid in uids or peer.gid in gids  # the server logs a refusal


def _version_tuple() -> tuple[int, int, int]:
    major, minor, micro = (int(part) for part in __version__.split(".")[:3])
    return major, minor, micro
