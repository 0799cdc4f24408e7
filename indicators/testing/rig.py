"""A real s390x guest with an ``indicators`` daemon attached: the integration rig.

:class:`IndicatorsRig` starts, in a private temporary directory:

1. ``qemu-system-s390x`` (TCG) running the airq guest
   (:class:`~indicators.testing.qemu.AirqGuest`) over the layout of the
   devices (:mod:`indicators.testing.layout`), with a second QMP monitor for
   the daemon's VMM link;
2. an in-process :class:`~indicators.daemon.service.Service` configured
   like any other: the emulated backend over the guest's RAM file (``ram =
   "auto"``, found by the VMM link's ``qom-get``), the VMM link on that
   second monitor with the rig's ``[vmm]`` settings (``disconnect_grace``,
   ``skeys_refresh``: the daemon loads the storage keys the guest set from
   ``dump-skeys`` itself, at start, periodically and when it attaches to a
   new QEMU; the rig only waits until it has), the control socket in the
   directory.

Whether every acknowledged notification reached the guest is judged from
the caller's side by a :class:`~indicators.testing.oracle.DeliveryOracle`
over the guest's memory and its own per-vector counters (:meth:`IndicatorsRig.oracle`):

    async with IndicatorsRig(devices) as rig:
        client = await rig.client()
        oracle = rig.oracle()
        await notify(client, oracle, "net0", [0, 1])   # indicators.testing.delivery
        await rig.settle()                       # the guest consumed every bit
        verdict = oracle.verdict()
        assert verdict.ok, verdict

Closing (also after an exception) stops the daemon, kills QEMU and removes
the directory with the RAM file and the sockets.  :mod:`indicators.testing.plugin`
wraps this in pytest fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient

from indicators.adapters import build_model
from indicators.config import Config, parse_config
from indicators.daemon.service import Service
from indicators.engine import Engine
from indicators.guestmem import GuestMemory
from indicators.testing.delivery import guest_oracle
from indicators.testing.driver import (
    DRIVER_GADDR,
    DriverSlots,
    DriverStats,
    read_stats,
    register_records,
    wait_published,
)
from indicators.testing.errors import RigError
from indicators.testing.guest import FREE_GADDR, GuestState
from indicators.testing.layout import GuestLayout, derived_storage_keys, guest_layout
from indicators.testing.oracle import DeliveryOracle
from indicators.testing.qemu import DEFAULT_MEMORY, AirqGuest, StorageKey

__all__ = ["DEFAULT_DEVICES", "IndicatorsRig", "daemon_config"]

#: The layout a test gets when it names none: two virtio-ccw devices behind
#: one summary byte (ISC 3) and a zPCI function with a single-bit summary.
DEFAULT_DEVICES: tuple[dict[str, Any], ...] = (
    {
        "name": "net0",
        "kind": "virtio-ccw",
        "summary_indicator": 0x30000,
        "device_indicator": 0x31000,
        "vectors": 8,
        "isc": 3,
    },
    {
        "name": "blk0",
        "kind": "virtio-ccw",
        "summary_indicator": 0x30000,
        "device_indicator": 0x31001,
        "vectors": 4,
        "isc": 3,
    },
    {
        "name": "pci0",
        "kind": "zpci",
        "aisb": 0x30010,
        "aisbo": 0,
        "aibv": 0x31010,
        "noi": 16,
        "isc": 2,
    },
)

_DAEMON_STOP = 15.0
#: The rig's default ``[vmm] skeys_refresh``: often enough that a guest which
#: sets its keys after the daemon attached is seen within a second.
SKEYS_REFRESH = 0.5


def daemon_config(
    devices: Sequence[Mapping[str, Any]],
    *,
    memory_size: int,
    control_socket: str,
    vmm_socket: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The raw daemon config of a rig; ``overrides`` sections are merged key by key."""
    raw: dict[str, Any] = {
        "backend": {"kind": "emulated", "memory_size": memory_size, "ram": "auto"},
        "devices": [dict(device) for device in devices],
        "control": {"socket": control_socket},
        "vmm": {"qmp_socket": vmm_socket, "skeys_refresh": SKEYS_REFRESH},
    }
    for section, value in (overrides or {}).items():
        current = raw.get(section)
        if isinstance(value, Mapping) and isinstance(current, dict):
            raw[section] = {**current, **value}
        else:
            raw[section] = value
    return raw


class IndicatorsRig:
    """QEMU with the airq guest, and a daemon attached to it; use ``async with``.

    ``devices`` are device config dicts as in a config file (their bits at
    :data:`~indicators.testing.guest.FREE_GADDR` or above); ``storage_keys``
    maps page gaddrs to the key byte the guest sets (default:
    :func:`~indicators.testing.layout.derived_storage_keys`); ``config``
    holds extra daemon config sections (``{"vmm": {"hold_while_stopped":
    False}}``); ``vmm_grace`` is ``[vmm] disconnect_grace``, how long the
    daemon holds notifications for a vanished QEMU before it refuses them
    (the daemon's default: 5 s).
    """

    def __init__(
        self,
        devices: Sequence[Mapping[str, Any]] = DEFAULT_DEVICES,
        *,
        storage_keys: Mapping[int, int] | None = None,
        config: Mapping[str, Any] | None = None,
        memory_size: int = DEFAULT_MEMORY,
        vmm_grace: float | None = None,
        workdir: str | None = None,
        driver: DriverSlots | None = None,
    ) -> None:
        self.memory_size = memory_size
        #: Driver mode: the guest picks its areas per boot and the daemon starts with
        #: no devices; :meth:`register` adds them the way a VMM would.
        self.driver = driver
        self._templates = {str(d["name"]): dict(d) for d in devices}
        self._dir = Path(tempfile.mkdtemp(prefix="indicators-rig-", dir=workdir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        try:
            overrides = dict(config or {})
            if vmm_grace is not None:
                overrides["vmm"] = {"disconnect_grace": vmm_grace, **overrides.get("vmm", {})}
            raw = daemon_config(
                devices,
                memory_size=memory_size,
                control_socket=str(self._dir / "control.sock"),
                vmm_socket=str(self._dir / "vmm.sock"),
                overrides=overrides,
            )
            #: The daemon's validated config (in driver mode: the template devices).
            self.config: Config = parse_config(raw, "<indicators rig>")
            self._daemon_config = self.config
            if driver is not None:
                self._daemon_config = parse_config({**raw, "devices": []}, "<indicators rig>")
            keys = (
                derived_storage_keys(self.config.devices) if storage_keys is None else storage_keys
            )
            if driver is not None:  # every slot's pages get slot 0's keys
                keys = driver.keys_for_slots(keys)
            #: ``{page gaddr: key byte}`` the guest sets.
            self.storage_key_settings: dict[int, int] = dict(keys)
            #: The guest's layout and counter map.
            self.layout: GuestLayout = guest_layout(self.config.devices, keys, memory_size)
            if driver is not None:
                driver.check(self.layout.layout, memory_size)
        except BaseException:
            self._cleanup()
            raise
        self._guest: AirqGuest | None = None
        self._service: Service | None = None
        self._clients: list[QMPClient] = []
        self._owned = sorted(self.config_owned_bytes())

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> IndicatorsRig:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Boot the guest, start the daemon, wait until it loaded the storage keys;
        undone on failure."""
        try:
            await self.start_qemu()
            service = Service(self._daemon_config)
            self._service = service
            await service.start()
            await self._wait_keys_loaded(service, 10.0)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect clients, stop the daemon, kill QEMU, remove the files.  Idempotent."""
        try:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    await client.disconnect()
            self._clients.clear()
            if self._service is not None:
                service, self._service = self._service, None
                try:
                    await asyncio.wait_for(service.stop(grace=5.0), _DAEMON_STOP)
                finally:
                    if service.wiring is not None:  # stop timed out: unmap anyway
                        service.wiring.close()
        finally:
            await self.kill_qemu()
            self._cleanup()

    async def kill_qemu(self) -> None:
        """Kill QEMU (SIGKILL, no shutdown) and remove its RAM file; the daemon stays."""
        if self._guest is not None:
            await self._guest.close()

    async def start_qemu(self, *, timeout: float = 10.0) -> None:
        """Boot a (new) QEMU with the same layout and VMM socket.

        With the daemon running, wait until it re-attached (mapped the new
        RAM file) and loaded the storage keys the new guest set.
        """
        if self._guest is not None and self._guest.running:
            raise RigError("QEMU is still running: kill_qemu() first")
        guest = AirqGuest(
            self.layout.layout,
            memory_size=self.memory_size,
            workdir=str(self._dir),
            vmm_socket=self._dir / "vmm.sock",
            pages={} if self.driver is None else {DRIVER_GADDR: self.driver.encode()},
        )
        await guest.start(timeout=timeout)
        self._guest = guest
        service = self._service
        if service is not None:
            await self._wait_attached(service, guest.ram_path, timeout)
            await self._wait_keys_loaded(service, timeout)

    async def _wait_attached(self, service: Service, ram_path: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            wiring, vmm = service.wiring, service.vmm
            memory = getattr(wiring.backend, "memory", None) if wiring else None
            if (
                isinstance(memory, GuestMemory)
                and memory.path == ram_path
                and vmm is not None
                and vmm.status != "disconnected"
                and service.engine.unavailable is None
            ):
                return
            if loop.time() > deadline:
                raise RigError(f"the daemon did not attach to the new QEMU in {timeout:g} s")
            await asyncio.sleep(0.005)

    async def _wait_keys_loaded(self, service: Service, timeout: float) -> None:
        """Wait until the daemon's backend has the access-control and fetch bits
        of every key the guest set (it loads them from ``dump-skeys`` itself)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            backend = service.wiring.backend if service.wiring else None
            get_key = getattr(backend, "get_storage_key", None)
            if get_key is None:
                return  # not an emulated backend: nothing to load
            if all(
                get_key(page) & 0xF8 == key & 0xF8
                for page, key in self.storage_key_settings.items()
            ):
                return
            if loop.time() > deadline:
                raise RigError(
                    f"the daemon did not load the guest's storage keys in {timeout:g} s "
                    "(is [vmm] skeys_refresh set?)"
                )
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------ accessors

    @property
    def guest(self) -> AirqGuest:
        """The running guest (QEMU, its RAM, its own QMP client)."""
        if self._guest is None:
            raise RigError("the rig is not started")
        return self._guest

    @property
    def service(self) -> Service:
        """The daemon, running in this process."""
        if self._service is None:
            raise RigError("the daemon is not running")
        return self._service

    @property
    def engine(self) -> Engine:
        """The daemon's engine."""
        return self.service.engine

    @property
    def control_socket(self) -> str:
        """The daemon's control socket (QMP)."""
        return self.service.socket_path

    @property
    def vmm_socket(self) -> str:
        """QEMU's second QMP monitor, the daemon's VMM link."""
        return str(self._dir / "vmm.sock")

    @property
    def directory(self) -> Path:
        """The rig's private directory (sockets, QEMU's files)."""
        return self._dir

    async def client(self, name: str = "indicators-test") -> QMPClient:
        """A new ``QMPClient`` connected to the daemon (disconnected by :meth:`close`)."""
        client = QMPClient(name)
        await client.connect(self.control_socket)
        self._clients.append(client)
        return client

    # ------------------------------------------------------- driver mode

    def driver_stats(self) -> DriverStats:
        """The guest's boot, stray-byte and leftover counters (driver mode)."""
        return read_stats(self.guest.memory)

    async def wait_boot(self, boot: int, *, timeout: float = 10.0) -> None:
        """Wait until the guest published the records of boot ``boot`` (or a later one)."""
        await wait_published(self.guest.memory, boot, timeout)

    async def register(self, client: QMPClient) -> dict[str, str]:
        """Play the VMM: ``device-add`` (lifetime ``guest``) this boot's registration
        records as ``<template name>-b<boot>``; returns template -> live name."""
        if self.driver is None:
            raise RigError("register() needs a rig in driver mode")
        return await register_records(self.guest.memory, self.layout, self._templates, client)

    async def reboot_guest(self, *, timeout: float = 10.0) -> int:
        """Have the guest reboot itself (``diag 308``); returns the new boot's number once
        its records are out (with ``manage_reboot`` the daemon dropped the old devices)."""
        boot = self.driver_stats().boots
        await self.guest.reboot()
        await self.wait_boot(boot + 1, timeout=timeout)
        return boot + 1

    # ---------------------------------------------------------- the guest

    async def settle(self, *, timeout: float = 10.0) -> None:
        """Wait until the daemon applied everything and the guest consumed it."""
        await asyncio.wait_for(self.engine.drain(), timeout)
        # A full round that starts after the last host store clears every bit.
        await self.guest.wait_rounds(3, timeout=timeout)

    async def park(self, *, timeout: float = 5.0) -> Counter[tuple[str, int]]:
        """Park the guest; its clear counts per (device, vector) (zeros left out)."""
        return Counter(self.layout.by_target(await self.guest.park(timeout=timeout)))

    async def resume(self, *, timeout: float = 5.0) -> None:
        """Let a parked guest scan again."""
        await self.guest.resume(timeout=timeout)

    def counts(self) -> Counter[tuple[str, int]]:
        """The guest's counts now, without parking (each one exact, not a snapshot)."""
        return Counter(self.layout.by_target(self.guest.counts(require_parked=False)))

    def state(self) -> GuestState:
        """The guest's state word."""
        return self.guest.state()

    async def storage_keys(self) -> dict[int, StorageKey]:
        """Every page's storage key as QEMU reports it (``dump-skeys``), by page gaddr."""
        return await self.guest.storage_keys()

    def oracle(self) -> DeliveryOracle:
        """A delivery oracle over the current guest's memory and its own per-vector
        counters (make a new one after :meth:`start_qemu`); see
        :mod:`indicators.testing.delivery`."""
        return guest_oracle(self.guest, self.layout)

    # ------------------------------------------------------------- memory

    def config_owned_bytes(self) -> set[int]:
        """Every gaddr that holds a configured DSCI or summary bit."""
        return build_model(self.config).owned_bytes()

    def indicators(self) -> bytes:
        """The indicator and summary bytes, in gaddr order (a snapshot to compare)."""
        read = self.guest.memory.read
        return bytes(read(gaddr, 1)[0] for gaddr in self._owned)

    def snapshot(self) -> bytes:
        """Guest RAM from :data:`~indicators.testing.guest.FREE_GADDR` up: everything
        but the guest's own lowcore, parameter block, results and program."""
        return self.guest.memory.read(FREE_GADDR, self.memory_size - FREE_GADDR)

    def changes_outside_indicators(self, before: bytes, after: bytes) -> dict[int, tuple[int, int]]:
        """``{gaddr: (old, new)}`` of bytes that differ between two :meth:`snapshot`\\ s,
        leaving out the indicator and summary bytes."""
        owned = set(self._owned)
        changed: dict[int, tuple[int, int]] = {}
        page = 4096
        for offset in range(0, len(before), page):
            if before[offset : offset + page] == after[offset : offset + page]:
                continue
            for i in range(offset, min(offset + page, len(before))):
                gaddr = FREE_GADDR + i
                if before[i] != after[i] and gaddr not in owned:
                    changed[gaddr] = (before[i], after[i])
        return changed
