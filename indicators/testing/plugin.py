"""pytest plugin ``indicators``: adapter-interrupt integration tests on a real s390x guest.

Installed with the package (entry point ``pytest11``), so every project that
installs ``indicators`` (with pytest and pytest-asyncio) has these fixtures:

==========================  ===================================================
``indicators_devices``      the adapter layout: device config dicts, as in a
                            config file (marker, or override the fixture)
``indicators_storage_keys`` ``{page gaddr: key byte}`` the guest sets with SSKE
``indicators_config``       extra daemon config sections, merged over the rig's
``indicators_rig``          the running :class:`~indicators.testing.rig.IndicatorsRig`
``indicators_guest``        its :class:`~indicators.testing.qemu.AirqGuest`
``indicators_daemon``       its :class:`~indicators.daemon.service.Service`
``indicators_qmp``          a ``qemu.qmp.QMPClient`` connected to the daemon
``indicators_oracle``       a :class:`~indicators.testing.oracle.DeliveryOracle`
                            over the guest: did what was acknowledged arrive?
==========================  ===================================================

and the marker ``indicators_layout``, read by the first three::

    @pytest.mark.indicators_layout(
        [{"name": "net0", "kind": "virtio-ccw", "summary_indicator": 0x30000,
          "device_indicator": 0x31000, "vectors": 4, "isc": 3}],
        storage_keys={0x31000: 0x30},                 # optional
        config={"vmm": {"hold_while_stopped": False}},  # optional
        vmm_grace=1.0,                                # optional
    )
    async def test_notify(indicators_rig, indicators_qmp, indicators_oracle):
        from indicators.testing.delivery import notify

        assert await notify(indicators_qmp, indicators_oracle, "net0", [1])
        await indicators_rig.settle()
        assert indicators_oracle.verdict().ok
        assert await indicators_rig.park() == {("net0", 1): 1}

A guest that registers like a driver and reboots itself: ``driver=DriverSlots()``
in the marker (:mod:`indicators.testing.driver`) starts the daemon with no
devices; the guest picks its areas per boot (the layout's devices shifted to
slot ``boot mod slots``) and publishes SET_IND_ADAPTER-shaped records::

    @pytest.mark.indicators_layout(driver=DriverSlots(), config={"vmm": {"manage_reboot": True}})
    async def test_reboot(indicators_rig, indicators_qmp):
        names = await indicators_rig.register(indicators_qmp)  # device-add, lifetime guest
        await indicators_qmp.execute("notify", {"device": names["net0"], "vector": [1]})
        await indicators_rig.reboot_guest()         # diag 308; returns at the new boot
        assert indicators_rig.driver_stats().stray == 0

``rig.register(client)`` reads the records and calls ``device-add`` for each
(names ``<template>-b<boot>``); ``rig.driver_stats()`` has the boot count, the
stray bytes found in previous boots' areas and the bits a boot found left
over; :func:`indicators.testing.driver.read_registrations` the records.  The
torture run is :mod:`indicators.testing.reboot`.

Without QEMU or the s390x assembler the rig's tests skip, saying what to
install; with the environment variable ``CI`` set they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from indicators.testing.build import skip_reason

if TYPE_CHECKING:  # the rest loads when a test asks for the rig, not in every pytest run
    from qemu.qmp import QMPClient

    from indicators.daemon.service import Service
    from indicators.testing.oracle import DeliveryOracle
    from indicators.testing.qemu import AirqGuest
    from indicators.testing.rig import IndicatorsRig

_NO_ASYNCIO = "the indicators fixtures need pytest-asyncio: pip install 'indicators[test]'"

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - the plugin loads in every pytest run: never fail it

    def _async_fixture(function: Any) -> Any:  # type: ignore[no-redef]
        """Stand-in for pytest_asyncio.fixture: the fixture fails, saying what to install."""

        @pytest.fixture(name=function.__name__)
        def unavailable() -> None:
            pytest.fail(_NO_ASYNCIO)

        return unavailable


__all__ = [
    "indicators_config",
    "indicators_daemon",
    "indicators_devices",
    "indicators_guest",
    "indicators_oracle",
    "indicators_qmp",
    "indicators_rig",
    "indicators_storage_keys",
    "require_qemu",
]

MARKER = "indicators_layout"
_MARKER_HELP = (
    f"{MARKER}(devices, *, storage_keys=None, config=None, vmm_grace=None, memory_size=None, "
    "driver=None): the adapter layout of the indicators_rig fixture (device config dicts)"
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line("markers", _MARKER_HELP)


def _marker_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    kwargs = dict(marker.kwargs)
    if marker.args:
        if len(marker.args) > 1 or "devices" in kwargs:
            raise pytest.UsageError(f"{MARKER}: pass the devices once, as one list")
        kwargs["devices"] = marker.args[0]
    known = {"devices", "storage_keys", "config", "vmm_grace", "memory_size", "driver"}
    unknown = set(kwargs) - known
    if unknown:
        raise pytest.UsageError(f"{MARKER}: unknown arguments {sorted(unknown)}")
    return kwargs


@pytest.fixture
def indicators_devices(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The devices (config dicts) of the rig: the marker's, else a default layout.

    Override it in a conftest or module for a layout of your own.  Bits must
    lie at 0x30000 or above (the guest uses the memory below).
    """
    from indicators.testing.rig import DEFAULT_DEVICES

    devices = _marker_kwargs(request).get("devices", DEFAULT_DEVICES)
    return [dict(device) for device in devices]


@pytest.fixture
def indicators_storage_keys(request: pytest.FixtureRequest) -> dict[int, int] | None:
    """``{page gaddr: storage key byte}`` the guest sets before its first round.

    None (the default): every page holding a keyed device's bits gets that
    device's key as ACC (``key << 4``).  ``{}``: no keys at all.
    """
    keys: Mapping[int, int] | None = _marker_kwargs(request).get("storage_keys")
    return None if keys is None else dict(keys)


@pytest.fixture
def indicators_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Extra daemon config sections (``{"vmm": {"reconnect": False}}``), merged key by key."""
    return dict(_marker_kwargs(request).get("config") or {})


def require_qemu() -> None:
    """Skip the calling test without QEMU and the s390x binutils; fail instead with CI set."""
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the QEMU tests: {reason}")
        pytest.skip(reason)


@_async_fixture
async def indicators_rig(
    request: pytest.FixtureRequest,
    indicators_devices: list[dict[str, Any]],
    indicators_storage_keys: dict[int, int] | None,
    indicators_config: dict[str, Any],
) -> AsyncIterator[IndicatorsRig]:
    """QEMU running the airq guest, with an ``indicators`` daemon attached to it.

    Torn down after the test, also when it failed or was interrupted: no QEMU
    process, RAM file or socket is left behind.
    """
    require_qemu()
    from indicators.testing.qemu import DEFAULT_MEMORY
    from indicators.testing.rig import IndicatorsRig

    options = _marker_kwargs(request)
    rig = IndicatorsRig(
        indicators_devices,
        storage_keys=indicators_storage_keys,
        config=indicators_config,
        vmm_grace=options.get("vmm_grace"),
        memory_size=options.get("memory_size") or DEFAULT_MEMORY,
        driver=options.get("driver"),
    )
    async with rig:
        yield rig


@pytest.fixture
def indicators_guest(indicators_rig: IndicatorsRig) -> AirqGuest:
    """The rig's guest: its RAM (``.memory``), QEMU's QMP (``.qmp``), park/resume."""
    return indicators_rig.guest


@pytest.fixture
def indicators_daemon(indicators_rig: IndicatorsRig) -> Service:
    """The rig's daemon, running in the test's process and event loop."""
    return indicators_rig.service


@_async_fixture
async def indicators_qmp(indicators_rig: IndicatorsRig) -> AsyncIterator[QMPClient]:
    """A ``qemu.qmp.QMPClient`` connected to the daemon's control socket."""
    yield await indicators_rig.client("indicators-qmp")


@pytest.fixture
def indicators_oracle(indicators_rig: IndicatorsRig) -> DeliveryOracle:
    """A delivery oracle over the rig's guest (its memory and its own counters).

    Tell it what you send and what came back (or use
    :func:`indicators.testing.delivery.notify`), let the guest settle, then
    ``assert oracle.verdict().ok``.
    """
    return indicators_rig.oracle()
